//! The admission decision: a pod created with the `aadpodidbinding` label gets one `readinessGates`
//! entry of type [`IDENTITY_READY_CONDITION`], so that it turns Ready only once its identities work.
//!
//! A pure function of the request body. The envelope (`uid`, `kind`, `operation`) is read with kube's
//! admission types; the pod itself is read field by field from its JSON, because it is untrusted input:
//! whatever shape it has, the answer is an allowed response (with a warning and no patch when the pod
//! cannot be read), never a panic and never a denial. Only a body without a readable request (no `uid`
//! to answer) is refused, and the webhook's `failurePolicy: Ignore` admits that pod unchanged.

use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use pod_identity_api::{POD_LABEL, readiness::IDENTITY_READY_CONDITION};
use serde_json::{Value, json};

/// Pod annotation that keeps the readiness gate off one pod (value `"false"`, any case); for pods
/// that must become Ready before their identity works (a pod that serves its own readiness without
/// Azure, or one that never asks for a token).
pub const READINESS_GATE_ANNOTATION: &str = "aadpodidentity.k8s.io/readiness-gate";

/// A body that holds no answerable request: not JSON, or no `request` with a `uid`.
#[derive(Debug, thiserror::Error)]
#[error("not an AdmissionReview request: {0}")]
pub struct Unreadable(String);

/// What the webhook does with one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Add the gate with this JSON patch (RFC 6902).
    Gate(json_patch::Patch),
    /// Admit unchanged: the pod is not bound, opted out, or already has the gate.
    Leave,
    /// Admit unchanged and tell the client why: the pod could not be read.
    Malformed(String),
}

/// Answers an `admission.k8s.io/v1` `AdmissionReview` (the request body) with the review to send
/// back: allowed always, with a patch that adds the readiness gate when [`decide`] says so. Requests
/// for anything but the creation of a core `v1` pod are allowed unchanged.
///
/// Errors: [`Unreadable`] when the body is not a review with a request `uid` to answer.
pub fn review(body: &[u8]) -> Result<AdmissionReview<DynamicObject>, Unreadable> {
    let mut envelope: Value = serde_json::from_slice(body).map_err(|e| Unreadable(e.to_string()))?;
    // The objects are taken out before the envelope is typed, so that no pod, however malformed,
    // keeps the request from being answered.
    let object = envelope
        .pointer_mut("/request/object")
        .map(Value::take)
        .unwrap_or(Value::Null);
    if let Some(old) = envelope.pointer_mut("/request/oldObject") {
        *old = Value::Null;
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(envelope).map_err(|e| Unreadable(e.to_string()))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| Unreadable("the review holds no request".to_owned()))?;
    if request.uid.is_empty() {
        return Err(Unreadable("the request has no uid".to_owned()));
    }
    let response = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty() && request.kind.version == "v1" && request.kind.kind == "Pod";
    if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
        return Ok(response.into_review());
    }
    let response = match decide(&object) {
        Decision::Gate(patch) => match response.clone().with_patch(patch) {
            Ok(patched) => patched,
            Err(err) => warned(response, format!("the readiness gate could not be added: {err}")),
        },
        Decision::Leave => response,
        Decision::Malformed(why) => warned(response, why),
    };
    Ok(response.into_review())
}

fn warned(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings = Some(vec![warning]);
    response
}

/// Whether `pod` (its JSON, as the API server sent it) gets the readiness gate, and the patch that
/// adds it: only a pod whose `aadpodidbinding` label is a non-empty string (no binding selects an
/// empty one), without the opt-out annotation, and without a gate of that type already (so a
/// re-admitted or hand-written pod never gets two).
pub fn decide(pod: &Value) -> Decision {
    let Some(pod) = pod.as_object() else {
        return Decision::Malformed(
            "pod identity: the pod is not an object; no readiness gate added".to_owned(),
        );
    };
    let metadata = match pod.get("metadata") {
        None | Some(Value::Null) => return Decision::Leave,
        Some(Value::Object(metadata)) => metadata,
        Some(_) => return malformed("metadata is not an object"),
    };
    let label = match metadata.get("labels") {
        None | Some(Value::Null) => None,
        Some(Value::Object(labels)) => labels.get(POD_LABEL),
        Some(_) => return malformed("metadata.labels is not an object"),
    };
    match label {
        None | Some(Value::Null) => return Decision::Leave,
        Some(Value::String(selector)) if selector.is_empty() => return Decision::Leave,
        Some(Value::String(_)) => {}
        Some(_) => return malformed("the aadpodidbinding label is not a string"),
    }
    match metadata.get("annotations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(annotations)) => match annotations.get(READINESS_GATE_ANNOTATION) {
            Some(Value::String(value)) if value.trim().eq_ignore_ascii_case("false") => {
                return Decision::Leave;
            }
            _ => {}
        },
        Some(_) => return malformed("metadata.annotations is not an object"),
    }
    let spec = match pod.get("spec") {
        Some(Value::Object(spec)) => spec,
        _ => return malformed("spec is missing or not an object"),
    };
    let gate = json!({ "conditionType": IDENTITY_READY_CONDITION });
    let operation = match spec.get("readinessGates") {
        None | Some(Value::Null) => json!({"op": "add", "path": "/spec/readinessGates", "value": [gate]}),
        Some(Value::Array(gates)) => {
            if gates
                .iter()
                .any(|g| g.get("conditionType").and_then(Value::as_str) == Some(IDENTITY_READY_CONDITION))
            {
                return Decision::Leave;
            }
            json!({"op": "add", "path": "/spec/readinessGates/-", "value": gate})
        }
        Some(_) => return malformed("spec.readinessGates is not a list"),
    };
    match serde_json::from_value(Value::Array(vec![operation])) {
        Ok(patch) => Decision::Gate(patch),
        Err(err) => Decision::Malformed(format!("pod identity: no readiness gate added: {err}")),
    }
}

fn malformed(what: &str) -> Decision {
    Decision::Malformed(format!("pod identity: {what}; no readiness gate added"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pod(labels: Value, annotations: Value, spec: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "shop", "labels": labels, "annotations": annotations},
            "spec": spec,
        })
    }

    fn containers() -> Value {
        json!({"containers": [{"name": "app", "image": "app"}]})
    }

    fn body(operation: &str, kind: Value, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": kind,
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop", "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object, "oldObject": null, "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn pod_kind() -> Value {
        json!({"group": "", "version": "v1", "kind": "Pod"})
    }

    /// The response as the API server reads it, with the patch decoded and applied to `object`.
    fn answer(body: &[u8], object: &Value) -> (Value, Option<Value>) {
        let review = review(body).unwrap();
        let wire = serde_json::to_value(&review).unwrap();
        let response = wire["response"].clone();
        assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(wire["kind"], "AdmissionReview");
        assert_eq!(
            response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
            "the uid is echoed"
        );
        assert_eq!(response["allowed"], true, "a pod is never refused");
        let patched = response.get("patch").map(|encoded| {
            assert_eq!(response["patchType"], "JSONPatch");
            // Go reads a []byte from a base64 string or from a list of numbers; kube writes the latter.
            let raw: Vec<u8> = match encoded {
                Value::String(text) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
                }
                other => serde_json::from_value(other.clone()).unwrap(),
            };
            let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
            let mut patched = object.clone();
            json_patch::patch(&mut patched, &patch).unwrap();
            patched
        });
        (response, patched)
    }

    fn gates(pod: &Value) -> Vec<Value> {
        pod["spec"]["readinessGates"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn a_bound_pod_gets_exactly_one_gate() {
        let object = pod(json!({"aadpodidbinding": "payments"}), Value::Null, containers());
        let (_, patched) = answer(&body("CREATE", pod_kind(), object.clone()), &object);
        let patched = patched.expect("a patch");
        assert_eq!(gates(&patched), vec![json!({"conditionType": "IdentityReady"})]);
        assert_eq!(
            patched["spec"]["containers"],
            containers()["containers"],
            "nothing else changes"
        );
    }

    #[test]
    fn gates_the_pod_already_has_are_kept_and_never_doubled() {
        let other = json!({"conditionType": "example.com/warm"});
        let spec = json!({"containers": [], "readinessGates": [other]});
        let object = pod(json!({"aadpodidbinding": "payments"}), Value::Null, spec);
        let (_, patched) = answer(&body("CREATE", pod_kind(), object.clone()), &object);
        let patched = patched.expect("a patch");
        assert_eq!(
            gates(&patched),
            vec![other.clone(), json!({"conditionType": "IdentityReady"})]
        );

        // Admitting the result again (a second webhook call, reinvocation) adds nothing.
        let (response, again) = answer(&body("CREATE", pod_kind(), patched.clone()), &patched);
        assert!(again.is_none() && response.get("patch").is_none(), "{response}");
    }

    #[test]
    fn unbound_opted_out_and_empty_selector_pods_are_left_alone() {
        for (labels, annotations, case) in [
            (json!({"app": "web"}), Value::Null, "no aadpodidbinding label"),
            (Value::Null, Value::Null, "no labels"),
            (json!({"aadpodidbinding": ""}), Value::Null, "an empty selector"),
            (
                json!({"aadpodidbinding": "payments"}),
                json!({READINESS_GATE_ANNOTATION: "false"}),
                "opted out",
            ),
            (
                json!({"aadpodidbinding": "payments"}),
                json!({READINESS_GATE_ANNOTATION: " False "}),
                "opted out, any case",
            ),
        ] {
            let object = pod(labels, annotations, containers());
            assert_eq!(decide(&object), Decision::Leave, "{case}");
            let (response, patched) = answer(&body("CREATE", pod_kind(), object.clone()), &object);
            assert!(patched.is_none(), "{case}: {response}");
            assert!(response.get("warnings").is_none(), "{case}: {response}");
        }
        let kept = pod(
            json!({"aadpodidbinding": "payments"}),
            json!({READINESS_GATE_ANNOTATION: "true"}),
            containers(),
        );
        assert!(
            matches!(decide(&kept), Decision::Gate(_)),
            "only \"false\" opts out"
        );
    }

    #[test]
    fn malformed_pods_are_admitted_unchanged_with_a_warning() {
        let bound = json!({"aadpodidbinding": "payments"});
        for (object, case) in [
            (json!("a string"), "the object is not a map"),
            (json!([1, 2]), "the object is a list"),
            (json!({"metadata": 7, "spec": {}}), "metadata is a number"),
            (
                json!({"metadata": {"labels": ["aadpodidbinding"]}, "spec": {}}),
                "labels is a list",
            ),
            (
                pod(json!({"aadpodidbinding": 42}), Value::Null, containers()),
                "the label is a number",
            ),
            (
                pod(bound.clone(), json!("x"), containers()),
                "annotations is a string",
            ),
            (pod(bound.clone(), Value::Null, json!(null)), "no spec"),
            (pod(bound.clone(), Value::Null, json!("spec")), "spec is a string"),
            (
                pod(
                    bound.clone(),
                    Value::Null,
                    json!({"readinessGates": {"conditionType": "IdentityReady"}}),
                ),
                "readinessGates is a map",
            ),
        ] {
            let (response, patched) = answer(&body("CREATE", pod_kind(), object.clone()), &object);
            assert!(patched.is_none(), "{case}: {response}");
            let warnings = response["warnings"].as_array().cloned().unwrap_or_default();
            assert_eq!(warnings.len(), 1, "{case}: {response}");
            assert!(
                warnings[0].as_str().unwrap().contains("no readiness gate added"),
                "{case}: {response}"
            );
        }
    }

    #[test]
    fn other_operations_and_kinds_pass_unchanged() {
        let object = pod(json!({"aadpodidbinding": "payments"}), Value::Null, containers());
        for (operation, kind) in [
            ("UPDATE", pod_kind()),
            ("DELETE", pod_kind()),
            (
                "CREATE",
                json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            ),
            ("CREATE", json!({"group": "", "version": "v1", "kind": "Secret"})),
        ] {
            let (response, patched) = answer(&body(operation, kind.clone(), object.clone()), &object);
            assert!(patched.is_none(), "{operation} {kind}: {response}");
        }
    }

    #[test]
    fn bodies_without_an_answerable_request_are_refused_not_panicked_on() {
        for body in [
            b"".to_vec(),
            b"not json".to_vec(),
            b"[]".to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#.to_vec(),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":"x"}"#.to_vec(),
        ] {
            assert!(review(&body).is_err(), "{}", String::from_utf8_lossy(&body));
        }
        let mut no_uid: Value = serde_json::from_slice(&body("CREATE", pod_kind(), json!({}))).unwrap();
        no_uid["request"]["uid"] = json!("");
        assert!(review(&serde_json::to_vec(&no_uid).unwrap()).is_err());
    }

    #[test]
    fn an_old_object_of_any_shape_does_not_keep_the_request_from_being_answered() {
        let object = pod(json!({"aadpodidbinding": "payments"}), Value::Null, containers());
        let mut wire: Value = serde_json::from_slice(&body("CREATE", pod_kind(), object.clone())).unwrap();
        wire["request"]["oldObject"] = json!({"metadata": {"labels": [1]}});
        let (_, patched) = answer(&serde_json::to_vec(&wire).unwrap(), &object);
        assert_eq!(gates(&patched.unwrap()).len(), 1);
    }
}
