//! Workload identity federation end to end: identities that never touch a node, behind the same
//! `169.254.169.254` as the others. The node and its pods are network namespaces ([`netns_harness`]), the
//! agent and the controller real processes in the node namespace running as the chart's ServiceAccounts
//! (so the chart's federation RBAC is what they are allowed), the emulator is ARM and Entra, and Entra
//! exchanges the real API server's service-account tokens after fetching its discovery documents, as Entra
//! does. Pods use curl, Python `azure-identity` and Rust `azure_identity`, unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns_harness;
mod pod_clients;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{anyhow, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use netns_harness::{
    CLIENT_A, Harness, SP_CLIENT, SP_OBJECT, SP_PASSWORD, SUBSCRIPTION, TENANT, TOKEN_URL, curl,
    curl_with_headers, identity_resource_id, install_chart,
};
use pod_clients::{python, rust_sdk_token};
use pod_identity_api::{
    AzureIdentity,
    federation::{BACKEND_ANNOTATION, CREDENTIAL_STATUS_ANNOTATION, TOKEN_EXCHANGE_AUDIENCE},
};
use pod_identity_emulator::{LogFilter, Service};
use pod_identity_test_support::{ControlPlane, eventually, netns::PodNet, tools};
use serde_json::{Value, json};

const PYTHON_TOKEN: &str = r#"
import json
from azure.identity import ManagedIdentityCredential
print(json.dumps({"token": ManagedIdentityCredential().get_token("https://vault.azure.net/.default").token}))
"#;

/// The controller binary, running in the node namespace (where the emulator's ARM is `127.0.0.1:443` and
/// the API server is relayed to its usual address) as the chart's controller ServiceAccount.
struct Controller {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(h: &Harness, kubeconfig: &Path, subjects: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let azure_json = dir.path().join("azure.json");
        std::fs::write(
            &azure_json,
            json!({"tenantId": TENANT, "subscriptionId": SUBSCRIPTION, "aadClientId": SP_CLIENT,
                   "aadClientSecret": SP_PASSWORD, "resourceGroup": "rg", "vmType": "vmss"})
            .to_string(),
        )
        .unwrap();
        // Its Azure principal may assign identities and write their federated credentials.
        h.emulator.with_state(|s| {
            s.role_assignments
                .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                    principal_id: SP_OBJECT.into(),
                    scope: format!("/subscriptions/{SUBSCRIPTION}"),
                    role_definition_name: "Contributor".into(),
                })
        });
        let log = dir.path().join("controller.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &h.node_netns])
            .arg(tools::workspace_binary("pod-identity-controller").unwrap())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cloudconfig")
            .arg(&azure_json)
            .arg("--azure-ca-file")
            .arg(&h.ca_file)
            .args([
                "--arm-endpoint=https://127.0.0.1:443",
                "--authority-host=https://127.0.0.1:443",
                "--leader-elect=false",
                "--namespace",
                &h.ns.name,
                "--federation-namespace",
                subjects,
                "--manage-federated-credentials",
                "--batch-window=200ms",
                "--bind-address=127.0.0.1",
                "--http-probe-port=18080",
                "--prometheus-port=18888",
                "--log-format=plain",
            ])
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- controller log ---\n{}", self.log());
        }
    }
}

/// The body of a 200 for `pod`, once the agent's watches caught up with what the test changed.
async fn token_eventually(h: &Harness, pod: &PodNet, url: &str) -> Value {
    let result = eventually(|| async {
        match curl(h, pod, url, &["-H", "Metadata: true"]) {
            (200, body) => Ok(serde_json::from_str::<Value>(&body).unwrap()),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    result.unwrap_or_else(|last| {
        panic!(
            "no token for {}: {last}\nagent log:\n{}",
            pod.netns,
            h.agent_log_text()
        )
    })
}

fn appid(token: &str) -> String {
    netns_harness::claims(token)["appid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Entra token requests after `since` that named `client` and were granted.
fn entra_grants(h: &Harness, since: u64, client: &str) -> usize {
    h.emulator
        .requests(&LogFilter {
            service: Some(Service::Entra),
            since: Some(since),
            status: Some(200),
            ..LogFilter::default()
        })
        .iter()
        .filter(|r| r.identity.as_deref() == Some(client))
        .count()
}

/// IMDS tokens issued for `client` after `since`.
fn imds_grants(h: &Harness, since: u64, client: &str) -> usize {
    h.imds_requests(since)
        .iter()
        .filter(|r| r.status == 200 && r.identity.as_deref() == Some(client))
        .count()
}

/// Waits for a 403 carrying Entra's `code` whose text names the credential the identity needs.
async fn expect_refusal(h: &Harness, pod: &PodNet, issuer: &str, subject: &str, code: &str) -> String {
    let result = eventually(|| async {
        let (status, body) = curl(h, pod, TOKEN_URL, &["-H", "Metadata: true"]);
        if status != 403 || !body.contains(code) {
            bail!("{status}: {body}");
        }
        for part in [
            format!("issuer {issuer}"),
            format!("subject {subject}"),
            format!("audience {TOKEN_EXCHANGE_AUDIENCE}"),
            format!("client {CLIENT_A}"),
        ] {
            if !body.contains(&part) {
                bail!("the error does not name {part}: {body}");
            }
        }
        Ok(body)
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", h.agent_log_text()))
}

async fn subject_exists(h: &Harness, subjects: &str, identity: &str) -> bool {
    let account = pod_identity_api::federation::subject_account(&pod_identity_api::ObjectKey::new(
        h.ns.name.clone(),
        identity,
    ));
    Api::<ServiceAccount>::namespaced(h.ns.client.clone(), subjects)
        .get_opt(&account)
        .await
        .unwrap()
        .is_some()
}

// The emulator serves from this runtime while the test blocks on curl and Python: it needs threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_moves_to_federation_without_a_pod_restart_and_federated_pods_cost_no_arm_write() {
    let plane = ControlPlane::shared().await;
    let subjects = plane.namespace().await.unwrap().name;
    let release = install_chart(
        plane,
        &[
            "--set",
            "federation.enabled=true",
            "--set",
            &format!("federation.namespace={subjects}"),
            "--set",
            "federation.createNamespace=false",
            "--set",
            "federation.manageCredentials=true",
        ],
    )
    .await;
    let agent_kubeconfig = plane
        .kubeconfig_for_service_account(&release, &format!("{release}-pod-identity-agent"))
        .await
        .unwrap();
    let controller_kubeconfig = plane
        .kubeconfig_for_service_account(&release, &format!("{release}-pod-identity-controller"))
        .await
        .unwrap();
    let h = Harness::start(&[
        "--kubeconfig",
        &agent_kubeconfig.display().to_string(),
        "--federation-namespace",
        &subjects,
    ])
    .await;
    h.trust_the_cluster_issuer().await;
    let controller = Controller::start(&h, &controller_kubeconfig, &subjects);
    let issuer = h.issuer().await;
    let subject = pod_identity_api::federation::subject(&subjects, &format!("{}.id-a", h.ns.name));

    // On the node backend: the controller puts id-a on the scale set, the pod's token comes from IMDS.
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    let before = h.emulator.last_seq();
    let body = token_eventually(&h, &web, TOKEN_URL).await;
    assert_eq!(body["client_id"], CLIENT_A);
    assert!(
        h.scale_set_identities()
            .contains(&identity_resource_id("id-a").to_lowercase())
    );
    assert_eq!(imds_grants(&h, before, CLIENT_A), 1);

    // Moved to the federated backend. The controller makes the subject and the credential and takes the
    // identity off the scale set; the same pod, never restarted, gets id-a's token from Entra instead.
    h.federate("id-a").await;
    eventually(|| async {
        let credentials = h.federated_credentials("id-a");
        let on_scale_set = h
            .scale_set_identities()
            .contains(&identity_resource_id("id-a").to_lowercase());
        match credentials.as_slice() {
            [(name, i, s)] if *i == issuer && *s == subject && !on_scale_set => Ok(name.clone()),
            other => Err(anyhow!(
                "credentials {other:?}, still on the scale set: {on_scale_set}"
            )),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", controller.log()));
    let migrated = h.emulator.last_seq();
    let body = token_eventually(&h, &web, TOKEN_URL).await;
    assert_eq!(body["client_id"], CLIENT_A);
    for field in [
        "access_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(
            body[field].is_string(),
            "{field} is a string, as IMDS sends it: {body}"
        );
    }
    assert_eq!(appid(body["access_token"].as_str().unwrap()), CLIENT_A);
    let python_out = python(&h, &web, PYTHON_TOKEN);
    let python_token: Value = serde_json::from_str(python_out.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(
        appid(python_token["token"].as_str().unwrap()),
        CLIENT_A,
        "{python_out}"
    );
    assert_eq!(
        appid(&rust_sdk_token(&web, "https://management.azure.com/.default").await),
        CLIENT_A
    );
    assert!(
        entra_grants(&h, migrated, CLIENT_A) >= 1,
        "tokens came from Entra"
    );
    assert_eq!(imds_grants(&h, migrated, CLIENT_A), 0, "and none from IMDS");
    let annotated = Api::<AzureIdentity>::namespaced(h.ns.client.clone(), &h.ns.name)
        .get("id-a")
        .await
        .unwrap();
    let status = annotated.metadata.annotations.unwrap_or_default()[CREDENTIAL_STATUS_ANNOTATION].clone();
    assert!(status.starts_with("managed: pod-identity-"), "{status}");

    // A pod bound to the federated identity from the start: curl, Python and Rust get its token, and ARM
    // sees no write at all, nor IMDS a request.
    let since = h.emulator.last_seq();
    let fresh = h.pod("fresh", Some("web")).await;
    let body = token_eventually(&h, &fresh, TOKEN_URL).await;
    assert_eq!(appid(body["access_token"].as_str().unwrap()), CLIENT_A);
    let python_out = python(&h, &fresh, PYTHON_TOKEN);
    assert!(python_out.contains("\"token\""), "{python_out}");
    assert_eq!(
        appid(&rust_sdk_token(&fresh, "https://storage.azure.com/.default").await),
        CLIENT_A
    );
    let writes = h.arm_writes(since);
    assert!(writes.is_empty(), "no ARM write for a federated pod: {writes:?}");
    assert_eq!(imds_grants(&h, since, CLIENT_A), 0);

    // An unbound pod, and a pod bound to another identity asking for this one, get nothing.
    let stranger = h.pod("stranger", None).await;
    let (status, body) = curl(&h, &stranger, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "{body}");
    h.bind("id-b", "db").await;
    let db = h.pod("db", Some("db")).await;
    let asking_for_a = format!("{TOKEN_URL}&client_id={CLIENT_A}");
    let refused = eventually(|| async {
        match curl(&h, &db, &asking_for_a, &["-H", "Metadata: true"]) {
            (403, body) if body.contains("is not an identity of pod") => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await
    .unwrap();
    assert!(refused.contains(CLIENT_A), "{refused}");

    // An identity that has the 20 credentials Entra allows already: the controller creates none, says why
    // on the identity (annotation and Event), and the pod's error names the credential it lacks. The 20
    // are not the controller's: none of them is ever changed or deleted.
    let issuer_of_others = "https://other-cluster.example/";
    let others: Vec<(String, String)> = (0..20)
        .map(|n| {
            (
                format!("other-{n}"),
                format!("system:serviceaccount:apps:app-{n}"),
            )
        })
        .collect();
    let seeds: Vec<(&str, &str, &str, &str)> = others
        .iter()
        .map(|(name, subject)| {
            (
                name.as_str(),
                issuer_of_others,
                subject.as_str(),
                TOKEN_EXCHANGE_AUDIENCE,
            )
        })
        .collect();
    h.set_federated_credentials("id-b", &seeds);
    h.federate("id-b").await;
    let identities = Api::<AzureIdentity>::namespaced(h.ns.client.clone(), &h.ns.name);
    let status = eventually(|| async {
        let annotations = identities
            .get("id-b")
            .await?
            .metadata
            .annotations
            .unwrap_or_default();
        match annotations.get(CREDENTIAL_STATUS_ANNOTATION) {
            Some(status) if status.contains("the most Entra ID allows") => Ok(status.clone()),
            other => Err(anyhow!("status {other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", controller.log()));
    assert!(status.contains("20 federated identity credentials"), "{status}");
    let events = h.events_about("id-b").await;
    assert!(
        events.iter().any(|e| e.starts_with("FederatedCredentialLimit")),
        "{events:?}"
    );
    let (status, body) = eventually(|| async {
        match curl(&h, &db, TOKEN_URL, &["-H", "Metadata: true"]) {
            (403, body) if body.contains("needs a federated identity credential") => Ok((403, body)),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 403);
    assert!(body.contains(&format!("{}.id-b", h.ns.name)), "{body}");
    assert_eq!(h.federated_credentials("id-b").len(), 20);

    // Back to the node backend: the controller deletes the credential it created and the subject, and
    // puts the identity on the scale set again; the pod is served from IMDS once it is there.
    let patch = json!({"metadata": {"annotations": {BACKEND_ANNOTATION: "node"}}});
    Api::<AzureIdentity>::namespaced(h.ns.client.clone(), &h.ns.name)
        .patch("id-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(|| async {
        let credentials = h.federated_credentials("id-a");
        let subject_left = subject_exists(&h, &subjects, "id-a").await;
        if credentials.is_empty() && !subject_left {
            Ok(())
        } else {
            Err(anyhow!(
                "credentials {credentials:?}, subject still there: {subject_left}"
            ))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\ncontroller log:\n{}", controller.log()));
    let back = h.emulator.last_seq();
    token_eventually(&h, &web, TOKEN_URL).await;
    assert!(
        h.scale_set_identities()
            .contains(&identity_resource_id("id-a").to_lowercase())
    );
    assert_eq!(imds_grants(&h, back, CLIENT_A), 1);

    let untouched: Vec<String> = h
        .federated_credentials("id-b")
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(
        untouched.len(),
        20,
        "credentials it did not create are never deleted: {untouched:?}"
    );

    for (who, log) in [("agent", h.agent_log_text()), ("controller", controller.log())] {
        assert!(
            !log.contains("forbidden") && !log.contains("Forbidden"),
            "the chart's RBAC refused the {who} something:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_mismatched_federated_credential_gives_the_pod_an_error_naming_it() {
    let plane = ControlPlane::shared().await;
    let subjects = plane.namespace().await.unwrap().name;
    let h = Harness::start(&["--federation-namespace", &subjects]).await;
    h.trust_the_cluster_issuer().await;
    let issuer = h.issuer().await;
    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.federate("id-a").await;
    let account = format!("{subjects}/{}.id-a", h.ns.name);

    // No subject yet (no controller here): a 503 SDKs retry, naming the ServiceAccount.
    let (headers, body) = eventually(|| async {
        match curl_with_headers(&h, &web, TOKEN_URL, &["-H", "Metadata: true"]) {
            (503, headers, body) if body.contains(&account) => Ok((headers, body)),
            (status, _, body) => Err(format!("{status}: {body}")),
        }
    })
    .await
    .unwrap();
    assert!(headers.to_ascii_lowercase().contains("retry-after:"), "{headers}");
    assert!(body.contains("does not exist"), "{body}");

    // A subject and no credential: 403 saying which credential the identity needs.
    let subject = h.create_subject(&subjects, "id-a").await;
    expect_refusal(&h, &web, &issuer, &subject, "AADSTS700211").await;

    // A credential for another subject, then one for the issuer with a trailing slash: each named.
    h.set_federated_credentials(
        "id-a",
        &[(
            "kube",
            &issuer,
            "system:serviceaccount:other:sa",
            TOKEN_EXCHANGE_AUDIENCE,
        )],
    );
    expect_refusal(&h, &web, &issuer, &subject, "AADSTS700213").await;
    let slashed = format!("{issuer}/");
    h.set_federated_credentials("id-a", &[("kube", &slashed, &subject, TOKEN_EXCHANGE_AUDIENCE)]);
    expect_refusal(&h, &web, &issuer, &subject, "AADSTS700211").await;
    // The first refusal is also an Event on the pod (one per reason and minute), naming the identity.
    let events = h.events_about("web").await;
    let identity = format!("{}/id-a", h.ns.name);
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("TokenUpstreamError") && e.contains(&identity)),
        "{events:?}"
    );

    // The right one: the same pod is served.
    h.set_federated_credentials("id-a", &[("kube", &issuer, &subject, TOKEN_EXCHANGE_AUDIENCE)]);
    let body = token_eventually(&h, &web, TOKEN_URL).await;
    assert_eq!(appid(body["access_token"].as_str().unwrap()), CLIENT_A);
    let writes = h.arm_writes(0);
    assert!(writes.is_empty(), "nothing was written to ARM: {writes:?}");
    h.stop_agent();
}
