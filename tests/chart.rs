//! The Helm chart: it lints, its values are checked at install time with messages that say what is
//! wrong, every rendered object passes a server-side dry run, and `helm install` into a real
//! kube-apiserver creates every object.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
    discovery::{Discovery, Scope},
};
use pod_identity_test_support::{ControlPlane, fixtures, tools};
use serde_json::Value;

fn chart() -> PathBuf {
    tools::repository().join("charts/pod-identity")
}

/// Runs helm; returns (success, stdout, stderr).
fn helm(args: &[&str], kubeconfig: Option<&Path>) -> (bool, String, String) {
    let mut command = Command::new(tools::helm().unwrap());
    // Helm keeps caches and settings under HOME; keep them out of the user's.
    let home = std::env::temp_dir().join("pod-identity-helm-home");
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"));
    command.env("HELM_DATA_HOME", home.join("data"));
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    let output = command.args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn render(namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "release",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = helm(&args, None);
    assert!(ok, "helm template failed: {err}");
    serde_saphyr::from_multiple::<Value>(&out)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    kinds
}

async fn api_for(
    client: &Client,
    discovery: &Discovery,
    object: &Value,
    namespace: &str,
) -> Api<DynamicObject> {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), object["apiVersion"].as_str().unwrap().to_owned()),
    };
    let gvk = kube::api::GroupVersionKind::gvk(&group, &version, object["kind"].as_str().unwrap());
    let (resource, capabilities) = discovery
        .resolve_gvk(&gvk)
        .unwrap_or_else(|| panic!("the server does not serve {gvk:?}"));
    match capabilities.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or(namespace);
            Api::namespaced_with(client.clone(), ns, &resource)
        }
    }
}

#[test]
fn chart_lints() {
    let chart = chart();
    let (ok, out, err) = helm(&["lint", "--strict", chart.to_str().unwrap()], None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");
}

#[test]
fn default_render_has_every_part_and_least_privilege() {
    let objects = render("pod-identity", &[]);
    assert_eq!(
        kinds(&objects),
        [
            "AzurePodIdentityException",
            "AzurePodIdentityException",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
        ]
    );
    let daemonset = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let security = &pod["containers"][0]["securityContext"];
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/run/xtables.lock");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([
            {"key": pod_identity_api::readiness::AGENT_NOT_READY_TAINT, "operator": "Exists", "effect": "NoSchedule"},
            {"operator": "Exists"},
        ]),
        "the startup taint is tolerated even where tolerations are overridden"
    );
    let env = &pod["containers"][0]["env"][0];
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");

    // Attestation is opt-in: without it the agent does not share the host's PID namespace.
    assert!(pod["hostPID"].is_null(), "{pod}");

    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    // The Lease is the only thing the controller may write in its namespace, and only by name.
    let role = objects.iter().find(|o| o["kind"] == "Role").unwrap();
    assert_eq!(
        role["rules"][1]["resourceNames"],
        serde_json::json!(["pod-identity-controller"])
    );
    // Nothing may write pods, nodes, identities or bindings, except that the agent patches the status of
    // pods (their IdentityReady condition) and nodes (its own node's startup taint), and only patches.
    for cluster_role in objects.iter().filter(|o| o["kind"] == "ClusterRole") {
        let agent = cluster_role["metadata"]["name"]
            .as_str()
            .unwrap()
            .ends_with("-agent");
        for rule in cluster_role["rules"].as_array().unwrap() {
            let resources: Vec<&str> = rule["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let writes = verbs
                .iter()
                .any(|v| ["create", "update", "patch", "delete"].contains(v));
            let patched_by_the_agent = agent
                && resources.iter().all(|r| ["pods/status", "nodes"].contains(r))
                && !verbs.iter().any(|v| ["create", "update", "delete"].contains(v));
            if writes && resources == ["mutatingwebhookconfigurations"] {
                assert_eq!(
                    rule["resourceNames"],
                    serde_json::json!(["release-pod-identity-webhook"]),
                    "only its own webhook configuration"
                );
            } else if writes && !patched_by_the_agent {
                assert!(
                    resources
                        .iter()
                        .all(|r| ["azureassignedidentities", "events"].contains(r)),
                    "{} may write {resources:?}",
                    cluster_role["metadata"]["name"]
                );
            }
        }
    }
}

/// Federation's RBAC is the least the two binaries need: the agent may only create tokens of the subjects,
/// the controller may keep the subjects but never create their tokens, and the identity annotation and the
/// issuer's discovery document are granted only when credentials are managed (the latter only when the
/// issuer is not given).
#[test]
fn federation_grants_the_agent_subject_tokens_only_and_the_controller_the_subjects() {
    assert!(
        kinds(&render("pod-identity", &[]))
            .iter()
            .all(|k| k != "Namespace"),
        "off by default"
    );
    let rules_of = |objects: &[Value], kind: &str, name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))["rules"]
            .clone()
    };
    let objects = render(
        "pod-identity",
        &[
            "--set",
            "federation.enabled=true",
            "--set",
            "federation.namespace=subjects",
        ],
    );
    let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert_eq!(namespace["metadata"]["name"], "subjects");
    let agent = rules_of(&objects, "Role", "release-pod-identity-agent-federation");
    assert_eq!(
        agent,
        serde_json::json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}])
    );
    let controller = rules_of(&objects, "Role", "release-pod-identity-controller-federation");
    assert_eq!(controller[0]["resources"], serde_json::json!(["serviceaccounts"]));
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "Role" && o["metadata"]["name"].as_str().unwrap().ends_with("-federation"))
    {
        assert_eq!(role["metadata"]["namespace"], "subjects");
    }
    assert!(
        !objects.iter().any(
            |o| o["metadata"]["name"] == "release-pod-identity-controller-federation"
                && o["kind"] == "ClusterRole"
        ),
        "without credential management, nothing cluster-wide"
    );
    let daemonset = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--federation-namespace=subjects"), "{args}");

    let managed = render(
        "pod-identity",
        &[
            "--set",
            "federation.enabled=true",
            "--set",
            "federation.manageCredentials=true",
        ],
    );
    let cluster = rules_of(
        &managed,
        "ClusterRole",
        "release-pod-identity-controller-federation",
    );
    assert_eq!(cluster[0]["resources"], serde_json::json!(["azureidentities"]));
    assert_eq!(cluster[0]["verbs"], serde_json::json!(["patch"]));
    assert_eq!(
        cluster[1]["nonResourceURLs"],
        serde_json::json!(["/.well-known/openid-configuration"])
    );
    let given_issuer = render(
        "pod-identity",
        &[
            "--set",
            "federation.enabled=true",
            "--set",
            "federation.manageCredentials=true",
            "--set",
            "federation.issuer=https://issuer.example/",
        ],
    );
    let cluster = rules_of(
        &given_issuer,
        "ClusterRole",
        "release-pod-identity-controller-federation",
    );
    assert_eq!(
        cluster.as_array().unwrap().len(),
        1,
        "no discovery read: {cluster}"
    );
}

#[test]
fn attesting_host_network_callers_adds_only_what_it_needs() {
    let objects = render("pod-identity", &["--set", "agent.attestHostNetwork=true"]);
    let daemonset = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let container = &pod["containers"][0];
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW", "SYS_PTRACE", "DAC_READ_SEARCH"])
    );
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "--attest-callers",
        "--node-callers=passthrough",
        "--upstream-mark=0x2000",
    ] {
        assert!(args.contains(&expected), "{expected} missing from {args:?}");
    }
    // No host path is mounted for it: /proc of the host's PID namespace is the container's own.
    assert_eq!(pod["volumes"].as_array().unwrap().len(), 2, "{}", pod["volumes"]);

    let chart = chart();
    for (value, expected) in [
        ("agent.nodeCallers=allow", "at '/agent/nodeCallers'"),
        ("agent.upstreamMark=0", "at '/agent/upstreamMark'"),
        ("agent.upstreamMark=mark", "at '/agent/upstreamMark'"),
    ] {
        let (ok, _, err) = helm(
            &["template", "release", chart.to_str().unwrap(), "--set", value],
            None,
        );
        assert!(!ok, "{value} was accepted");
        assert!(err.contains(expected), "{value}: {err}");
    }
}

/// The readiness-gate webhook as the API server must see it: pods only, on creation, only those that
/// ask for an identity, never in kube-system or the release namespace, `Ignore` on failure, called at
/// the Service the controller's certificate names; and nothing of it when turned off.
#[test]
fn the_readiness_gate_webhook_is_scoped_and_fails_open() {
    let objects = render("pod-identity", &[]);
    let configuration = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let webhooks = configuration["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(webhook["failurePolicy"], "Ignore");
    assert_eq!(webhook["sideEffects"], "None");
    assert_eq!(webhook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert!(webhook["timeoutSeconds"].as_i64().unwrap() <= 10);
    assert!(
        webhook["clientConfig"].get("caBundle").is_none(),
        "the controller publishes it"
    );
    assert_eq!(
        webhook["rules"],
        serde_json::json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        webhook["objectSelector"],
        serde_json::json!({"matchExpressions": [{"key": "aadpodidbinding", "operator": "Exists"}]})
    );
    assert_eq!(
        webhook["namespaceSelector"],
        serde_json::json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "pod-identity"]}]})
    );
    let service = &webhook["clientConfig"]["service"];
    assert_eq!(service["namespace"], "pod-identity");
    assert_eq!(service["path"], "/mutate-pods");
    let name = service["name"].as_str().unwrap();
    assert!(
        objects
            .iter()
            .any(|o| o["kind"] == "Service" && o["metadata"]["name"] == name),
        "the Service {name} is rendered"
    );
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for arg in [
        format!("--webhook-service={name}"),
        format!(
            "--webhook-configuration={}",
            configuration["metadata"]["name"].as_str().unwrap()
        ),
        "--webhook-port=9443".to_owned(),
    ] {
        assert!(args.contains(&arg), "{arg} missing from {args}");
    }

    let off = render("pod-identity", &["--set", "readinessGate.enabled=false"]);
    let text = serde_json::to_string(&off).unwrap();
    assert!(!kinds(&off).contains(&"MutatingWebhookConfiguration".to_owned()));
    assert!(
        !text.contains("webhook"),
        "nothing of the webhook is rendered when it is off"
    );
}

#[test]
fn managed_mode_runs_only_the_agent() {
    let objects = render("pod-identity", &["--set", "operationMode=managed"]);
    let kinds = kinds(&objects);
    assert!(!kinds.contains(&"Deployment".to_owned()));
    assert!(kinds.contains(&"DaemonSet".to_owned()));
    let agent_role = objects.iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    let text = agent_role.to_string();
    assert!(
        !text.contains("azureassignedidentities"),
        "managed mode reads no assignments: {text}"
    );
}

#[test]
fn credentials_from_values_become_a_secret_and_environment() {
    let objects = render(
        "pod-identity",
        &[
            "--set",
            "adminsecret.subscriptionID=00000000-0000-0000-0000-000000000001",
            "--set",
            "adminsecret.resourceGroup=nodes",
            "--set",
            "adminsecret.clientSecret=s3cret",
        ],
    );
    let secret = objects.iter().find(|o| o["kind"] == "Secret").unwrap();
    assert_eq!(secret["stringData"]["clientSecret"], "s3cret");
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"CLIENT_SECRET") && env.contains(&"SUBSCRIPTION_ID") && env.contains(&"RESOURCE_GROUP")
    );
    assert!(!container["args"].to_string().contains("--cloudconfig"));
    assert_eq!(
        deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
}

#[test]
fn identities_from_values_are_created_with_their_bindings() {
    let objects = render(
        "pod-identity",
        &[
            "--set",
            "azureIdentities.payments.namespace=shop",
            "--set",
            "azureIdentities.payments.resourceID=/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/payments",
            "--set",
            "azureIdentities.payments.clientID=5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b",
            "--set",
            "azureIdentities.payments.binding.selector=payments",
        ],
    );
    let identity = objects.iter().find(|o| o["kind"] == "AzureIdentity").unwrap();
    assert_eq!(identity["metadata"]["namespace"], "shop");
    assert_eq!(identity["spec"]["type"], 0);
    let binding = objects
        .iter()
        .find(|o| o["kind"] == "AzureIdentityBinding")
        .unwrap();
    assert_eq!(binding["metadata"]["name"], "payments-binding");
    assert_eq!(binding["spec"]["selector"], "payments");
}

#[test]
fn wrong_values_fail_at_install_with_a_clear_message() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--set", "operationMode=manual"],
            "at '/operationMode': value must be one of 'standard', 'managed'",
        ),
        (
            &["--set", "controller.replica=3"],
            "at '/controller': additional properties 'replica' not allowed",
        ),
        (
            &["--set", "agent.probePort=0"],
            "at '/agent/probePort': minimum: got 0, want 1",
        ),
        (
            &["--set", "azureIdentities.x.clientID=not-a-guid"],
            "at '/azureIdentities/x/clientID': 'not-a-guid' does not match pattern",
        ),
        (
            &[
                "--set",
                "azureIdentities.x.clientID=5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b",
                "--set",
                "azureIdentities.x.resourceID=/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            ],
            "at '/azureIdentities/x/resourceID'",
        ),
    ];
    for (values, expected) in cases {
        let mut args = vec!["template", "release", chart];
        args.extend_from_slice(values);
        let (ok, _, err) = helm(&args, None);
        assert!(!ok, "{values:?} was accepted");
        assert!(err.contains(expected), "{values:?}: {err}");
    }
}

#[tokio::test]
async fn rendered_objects_pass_a_server_side_dry_run() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
        .await
        .unwrap();
    let discovery = Discovery::new(ns.client.clone()).run().await.unwrap();
    let objects = render(
        &ns.name,
        &[
            "--set",
            &format!("controller.leaderElection.name=lease-{}", ns.name),
        ],
    );
    for object in &objects {
        let api = api_for(&ns.client, &discovery, object, &ns.name).await;
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).unwrap();
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        if let Err(err) = api.create(&params, &dynamic).await {
            panic!(
                "{} {} was refused: {err}",
                object["kind"], object["metadata"]["name"]
            );
        }
    }
}

#[tokio::test]
async fn helm_install_creates_every_object() {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let chart = chart();
    let release = ns.name.clone();
    let (ok, out, err) = helm(
        &[
            "install",
            &release,
            chart.to_str().unwrap(),
            "--namespace",
            &ns.name,
        ],
        Some(plane.admin_kubeconfig()),
    );
    assert!(ok, "helm install failed: {out}{err}");
    let discovery = Discovery::new(ns.client.clone()).run().await.unwrap();
    let (ok, manifest, err) = helm(
        &["get", "manifest", &release, "--namespace", &ns.name],
        Some(plane.admin_kubeconfig()),
    );
    assert!(ok, "{err}");
    let objects: Vec<Value> = serde_saphyr::from_multiple::<Value>(&manifest)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect();
    assert!(objects.len() >= 15, "{} objects in the release", objects.len());
    for object in &objects {
        let api = api_for(&ns.client, &discovery, object, &ns.name).await;
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(
            api.get_opt(name).await.unwrap().is_some(),
            "{} {name} was not created",
            object["kind"]
        );
    }
    // The CRDs came with the chart (or were there already) and are served.
    let crds = Api::<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    >::all(ns.client.clone());
    assert!(
        crds.get_opt("azureidentities.aadpodidentity.k8s.io")
            .await
            .unwrap()
            .is_some()
    );

    // The documented upgrade keeps the release's values and succeeds on an installed release.
    let (ok, out, err) = helm(
        &[
            "upgrade",
            &release,
            chart.to_str().unwrap(),
            "--namespace",
            &ns.name,
            "--reuse-values",
        ],
        Some(plane.admin_kubeconfig()),
    );
    assert!(ok, "helm upgrade failed: {out}{err}");
    assert!(out.contains("REVISION: 2"), "{out}");
}

/// The binaries accept every flag and value the chart passes them (they then stop at what is missing
/// outside a cluster, after the command line was parsed; clap's usage errors exit with 2).
#[test]
fn the_binaries_accept_the_arguments_the_chart_gives_them() {
    let objects = render(
        "pod-identity",
        &[
            "--set",
            "agent.enableHostToken=true",
            "--set",
            "agent.attestHostNetwork=true",
            "--set",
            "agent.nodeCallers=refuse",
            "--set",
            "controller.immutableUserMSIs[0]=5c2f3e1a-7b4d-4e8f-9a1b-2c3d4e5f6a7b",
            "--set",
            "federation.enabled=true",
            "--set",
            "federation.manageCredentials=true",
            "--set",
            "federation.issuer=https://issuer.example/",
            "--set",
            "agent.extraCaSecret=entra-ca",
            "--set",
            "prewarm.enabled=true",
        ],
    );
    for (kind, binary) in [
        ("Deployment", "pod-identity-controller"),
        ("DaemonSet", "pod-identity-agent"),
    ] {
        let workload = objects.iter().find(|o| o["kind"] == kind).unwrap();
        let args: Vec<String> = workload["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("$(NODE_NAME)", "node-1"))
            .collect();
        let output = Command::new(tools::workspace_binary(binary).unwrap())
            .args(&args)
            .args(["--kubeconfig", "/nonexistent/kubeconfig"])
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{binary} ran without a cluster");
        for clap_error in [
            "unexpected argument",
            "invalid value",
            "required arguments were not provided",
        ] {
            assert!(
                !stderr.contains(clap_error),
                "{binary} refused the chart's arguments {args:?}:\n{stderr}"
            );
        }
        assert_ne!(
            output.status.code(),
            Some(2),
            "{binary} refused its command line:\n{stderr}"
        );
    }
}
