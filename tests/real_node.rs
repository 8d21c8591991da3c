//! pod-identity on a real node (kubelet, containerd, runc, CNI), installed with `helm install` from images
//! of the freshly built binaries, with values only, and the local Azure standing in for Azure.
//!
//! One node serves every test of this file; the tests take turns (each installs what it needs and leaves
//! the release as it found it where it can). The node is torn down when the test process ends, however
//! it ends. The teardown tests and the startup-taint test start nodes of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "real_node_harness/mod.rs"]
mod harness;

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use harness::{Cluster, INSTALL_NAMESPACE, RELEASE, Session, TestPod, identity_id};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Event as CoreEvent, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use pod_identity_api::{AssignmentStatus, AzureAssignedIdentity};
use pod_identity_test_support::eventually;
use tokio::sync::{Mutex, MutexGuard, OnceCell};

static CLUSTER: OnceCell<Mutex<Cluster>> = OnceCell::const_new();

/// The shared node, for this test alone while the guard lives.
async fn cluster() -> MutexGuard<'static, Cluster> {
    let cell = CLUSTER
        .get_or_try_init(|| async {
            let bin = harness::test_bin_dir()?;
            anyhow::Ok(Mutex::new(Cluster::start(&bin).await?))
        })
        .await
        .unwrap_or_else(|e| panic!("the real node could not start: {e:#}"));
    cell.lock().await
}

/// The release, installed with the local Azure's values (installed again if a test removed it).
async fn installed(session: &Session<'_>) {
    if !session.installed() {
        session.install(&[]).await.unwrap();
    }
    session.wait_agent_ready().await.unwrap();
    session.wait_controller_ready().await.unwrap();
}

/// A namespace with an identity bound to `selector`, and a bound pod that has been served once.
async fn bound_pod(session: &Session<'_>, namespace: &str, selector: &str) -> TestPod {
    session.namespace(namespace).await.unwrap();
    session
        .bind(namespace, "id-a", harness::CLIENT_A, selector)
        .await
        .unwrap();
    let pod = session.pod(namespace, "reader", Some(selector)).await.unwrap();
    served(session, &pod).await;
    pod
}

/// Waits until the pod gets a token (its identity may still be on its way to the scale set).
async fn served(session: &Session<'_>, pod: &TestPod) -> String {
    eventually(|| async {
        let (status, body) = session.token(pod)?;
        if status == 200 {
            let token: serde_json::Value = serde_json::from_str(&body)?;
            Ok(token["access_token"].as_str().unwrap_or_default().to_owned())
        } else {
            bail!("{}/{} was answered {status}: {body}", pod.namespace, pod.name)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("agent")))
}

fn assert_no_pod_reached_imds(session: &Session<'_>) {
    let leaked = session.imds_requests_from_pods();
    assert!(
        leaked.is_empty(),
        "requests from pod addresses reached IMDS: {leaked:#?}"
    );
}

#[tokio::test]
async fn install_serves_bound_pods_refuses_unbound_ones_and_no_pod_reaches_imds() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;

    // Ready means the rules and the redirect address are in place.
    let rules = session
        .node
        .in_node_ok(&["iptables", "-t", "nat", "-S", "POD-IDENTITY"])
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-d 169.254.169.254/32") && rules.contains("--to-destination 169.254.79.1:2579"),
        "{rules}"
    );
    let addresses = session
        .node
        .in_node_ok(&["ip", "-4", "addr", "show", "lo"])
        .unwrap();
    assert!(String::from_utf8_lossy(&addresses.stdout).contains("169.254.79.1/32"));

    let pod = bound_pod(&session, "install", "reader").await;
    let token = served(&session, &pod).await;
    let (status, body) = session.read_secret(&pod, &token).unwrap();
    assert_eq!(status, 200, "{body}");
    let secret: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(secret["value"], harness::SECRET_VALUE);

    let stranger = session.pod("install", "stranger", None).await.unwrap();
    let (status, body) = session.token(&stranger).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("access_denied"), "{body}");
    assert_no_pod_reached_imds(&session);
}

#[tokio::test]
async fn the_agent_intercepts_on_a_node_where_route_localnet_is_0() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    // The node runs kube-proxy without localhost node ports, so nothing sets the sysctl; the agent,
    // unprivileged with a read-only /proc/sys, must neither need it nor crash-loop over it.
    assert_eq!(
        session.node.sysctl("net.ipv4.conf.all.route_localnet").unwrap(),
        "0"
    );
    installed(&session).await;
    let pod = bound_pod(&session, "localnet", "localnet").await;
    served(&session, &pod).await;
    assert_eq!(
        session.node.sysctl("net.ipv4.conf.all.route_localnet").unwrap(),
        "0",
        "the agent changed the sysctl"
    );
    let agents = Api::<Pod>::namespaced(session.client.clone(), INSTALL_NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap();
    for agent in agents {
        let spec = agent.spec.unwrap();
        let context = spec.containers[0].security_context.clone().unwrap();
        assert_ne!(context.privileged, Some(true));
        assert_eq!(context.read_only_root_filesystem, Some(true));
        let restarts: i32 = agent
            .status
            .unwrap()
            .container_statuses
            .unwrap_or_default()
            .iter()
            .map(|s| s.restart_count)
            .sum();
        assert_eq!(restarts, 0, "the agent restarted");
    }
    assert_no_pod_reached_imds(&session);
}

/// Asks for tokens from inside the pod every 200 ms for `seconds`, printing one status per line
/// (`000` when no HTTP answer came: a reset while no agent listens).
fn token_loop(session: &Session<'_>, pod: &TestPod, seconds: u32) -> std::process::Child {
    let script = format!(
        "end=$(( $(date +%s) + {seconds} )); while [ $(date +%s) -lt $end ]; do \
         curl -s -o /dev/null -m 3 -w '%{{http_code}}\\n' -H 'Metadata: true' '{}'; sleep 0.2; done",
        harness::TOKEN_URL
    );
    session
        .node
        .kubectl()
        .args([
            "exec",
            "-n",
            &pod.namespace,
            &pod.name,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn codes(child: std::process::Child) -> Vec<String> {
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn agent_restarts_and_rollouts_keep_pods_guarded_and_bound_pods_recover() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    let pod = bound_pod(&session, "rollout", "rollout").await;
    let stranger = session.pod("rollout", "stranger", None).await.unwrap();

    let bound_load = token_loop(&session, &pod, 60);
    let unbound_load = token_loop(&session, &stranger, 60);

    // The agent's pod deleted: the DaemonSet makes a new one.
    let pods = Api::<Pod>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    let agents = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap();
    for agent in agents {
        pods.delete(&agent.metadata.name.unwrap(), &DeleteParams::default())
            .await
            .unwrap();
    }
    session.wait_agent_ready().await.unwrap();

    // A rolling update of the DaemonSet (a changed value changes the pod template).
    let mut values = session.values();
    values.push("agent.logLevel=debug".into());
    session.helm_release("upgrade", &values).unwrap();
    session.wait_agent_ready().await.unwrap();

    let bound = codes(bound_load);
    let unbound = codes(unbound_load);
    assert!(!bound.is_empty() && !unbound.is_empty());
    // While no agent listens, pods get a reset (000), never the node's IMDS; an unbound pod never gets a
    // token; the bound pod is served again without anything done for it.
    assert!(
        bound.iter().all(|c| ["200", "000", "503"].contains(&c.as_str())),
        "bound pod: {bound:?}"
    );
    assert!(
        unbound.iter().all(|c| ["403", "000"].contains(&c.as_str())),
        "unbound pod: {unbound:?}"
    );
    served(&session, &pod).await;
    assert_no_pod_reached_imds(&session);
    // Back to the release's own values for the other tests.
    session.helm_release("upgrade", &session.values()).unwrap();
    session.wait_agent_ready().await.unwrap();
}

#[tokio::test]
async fn the_standby_controller_takes_over_without_losing_or_duplicating_assignments() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    let first = bound_pod(&session, "failover", "failover").await;

    let leases = Api::<Lease>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    let leader = leases
        .get("pod-identity-controller")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a leader holds the Lease");
    let pods = Api::<Pod>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    pods.delete(&leader, &DeleteParams::default()).await.unwrap();
    let new_leader = eventually(|| async {
        let holder = leases
            .get("pod-identity-controller")
            .await?
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        if holder.is_empty() || holder == leader {
            bail!("the Lease is still {holder:?}")
        }
        Ok(holder)
    })
    .await
    .unwrap();
    assert_ne!(new_leader, leader);

    // A pod bound after the takeover is assigned by the new leader; the first pod's assignment stays.
    let second = session.pod("failover", "second", Some("failover")).await.unwrap();
    served(&session, &second).await;
    served(&session, &first).await;
    let assignments = Api::<AzureAssignedIdentity>::namespaced(session.client.clone(), "failover")
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut pods_assigned: Vec<String> = assignments
        .iter()
        .filter(|a| a.assignment_status() == AssignmentStatus::Assigned)
        .map(|a| a.spec.pod.clone())
        .collect();
    pods_assigned.sort();
    assert_eq!(
        pods_assigned,
        vec!["reader".to_owned(), "second".to_owned()],
        "one assignment per pod: {assignments:#?}"
    );
    let on_scale_set = session.scale_set_identities();
    assert_eq!(
        on_scale_set
            .iter()
            .filter(|id| **id == identity_id("id-a").to_lowercase())
            .count(),
        1
    );
    session.wait_controller_ready().await.unwrap();
}

/// The chart's readiness-gate webhook on a real cluster: the API server reaches the controller through
/// the chart's Service, trusting the certificate authority the controller made and published; a bound
/// pod then carries the `IdentityReady` gate and the kubelet keeps it not Ready until that condition is
/// true; an opted-out and an unbound pod get no gate, and the unbound one turns Ready as before.
#[tokio::test]
async fn bound_pods_get_the_identity_ready_gate_from_the_charts_webhook() {
    use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret};
    use pod_identity_api::readiness::IDENTITY_READY_CONDITION;

    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    let webhook = format!("{RELEASE}-webhook");
    let secrets = Api::<Secret>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    let configurations = Api::<MutatingWebhookConfiguration>::all(session.client.clone());
    eventually(|| async {
        let secret = secrets.get(&format!("{webhook}-cert")).await?;
        let bundle = secret.data.unwrap_or_default().remove("ca.crt").map(|b| b.0);
        let published = configurations.get(&webhook).await?.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
            .map(|b| b.0);
        if bundle.is_some() && bundle == published {
            Ok(())
        } else {
            bail!("the caBundle is not published yet")
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));

    let namespace = session.namespace("gate").await.unwrap();
    let pods = Api::<Pod>::namespaced(session.client.clone(), &namespace);
    let gates = |pod: &Pod| -> Vec<String> {
        pod.spec
            .as_ref()
            .and_then(|s| s.readiness_gates.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.condition_type)
            .collect()
    };
    let condition = |pod: &Pod, kind: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == kind))
            .map(|c| c.status.clone())
    };
    // The API server sees the configuration's new caBundle a moment after it is written; until then
    // `failurePolicy: Ignore` admits pods without the gate. Probe until a pod gets it.
    let mut attempt = 0;
    eventually(|| {
        attempt += 1;
        let name = format!("probe-{attempt}");
        let session = &session;
        let pods = &pods;
        let namespace = &namespace;
        async move {
            let probe = session.pod(namespace, &name, Some("gate")).await?;
            let created = pods.get(&probe.name).await?;
            if gates(&created).is_empty() {
                session.delete_pod(&probe).await?;
                bail!("{name} was admitted without the gate");
            }
            session.delete_pod(&probe).await
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));

    let bound = session.pod(&namespace, "bound", Some("gate")).await.unwrap();
    let opted_out = session
        .pod_with(&namespace, "opted-out", Some("gate"), |pod| {
            pod["metadata"]["annotations"] =
                serde_json::json!({"aadpodidentity.k8s.io/readiness-gate": "false"});
        })
        .await
        .unwrap();
    let unbound = session.pod(&namespace, "unbound", None).await.unwrap();
    let bound = pods.get(&bound.name).await.unwrap();
    assert_eq!(gates(&bound), vec![IDENTITY_READY_CONDITION]);
    assert!(gates(&pods.get(&opted_out.name).await.unwrap()).is_empty());
    let unbound = eventually(|| async {
        let pod = pods.get(&unbound.name).await?;
        match condition(&pod, "Ready").as_deref() {
            Some("True") => Ok(pod),
            other => bail!("the unbound pod is Ready={other:?}"),
        }
    })
    .await
    .unwrap();
    assert!(gates(&unbound).is_empty());
    // Running, and Ready only if its identity is.
    let bound = pods.get(&bound.name_any()).await.unwrap();
    let ready = condition(&bound, "Ready");
    let identity_ready = condition(&bound, IDENTITY_READY_CONDITION);
    assert!(
        ready.as_deref() != Some("True") || identity_ready.as_deref() == Some("True"),
        "Ready={ready:?} with IdentityReady={identity_ready:?}"
    );
}

#[tokio::test]
async fn a_federated_identity_is_served_through_the_metadata_address_and_never_written_to_the_scale_set() {
    use pod_identity_api::federation::{BACKEND_ANNOTATION, CREDENTIAL_STATUS_ANNOTATION};
    use pod_identity_test_support::real_node::net;
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    // Entra trusts the cluster's issuer as it trusts an AKS issuer: it knows the CA of the API server's
    // certificate, and the cluster lets anonymous clients read the issuer's discovery documents.
    let ca = std::fs::read_to_string(session.node.ca_file()).unwrap();
    session
        .emulator
        .update_settings(|s| s.federation.issuer_ca_pems = vec![ca]);
    allow_anonymous_issuer_discovery(&session).await;
    let mut values = session.values();
    values.extend([
        "federation.enabled=true".to_owned(),
        "federation.manageCredentials=true".to_owned(),
        // The agent reaches the local Entra, whose CA is in the chart's Azure Secret.
        format!("agent.extraCaSecret={}", harness::AZURE_SECRET),
    ]);
    session.helm_release("upgrade", &values).unwrap();
    session.wait_agent_ready().await.unwrap();
    session.wait_controller_ready().await.unwrap();

    session.namespace("federated").await.unwrap();
    session
        .bind("federated", "id-b", harness::CLIENT_B, "federated")
        .await
        .unwrap();
    let since = session.emulator.last_seq();
    let identities = Api::<pod_identity_api::AzureIdentity>::namespaced(session.client.clone(), "federated");
    let patch = serde_json::json!({
        "metadata": {"annotations": {BACKEND_ANNOTATION: "federated"}},
        "spec": {"tenantID": harness::TENANT, "adEndpoint": format!("https://{}/", net::NODE_IP)},
    });
    identities
        .patch("id-b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let pod = session.pod("federated", "app", Some("federated")).await.unwrap();
    let token = served(&session, &pod).await;
    let claims: serde_json::Value = {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["appid"], harness::CLIENT_B);

    // The controller wrote the federated credential, and nothing to the scale set.
    let writes: Vec<_> = session
        .emulator
        .requests(&pod_identity_emulator::LogFilter {
            service: Some(pod_identity_emulator::Service::Arm),
            since: Some(since),
            ..Default::default()
        })
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert!(
        writes
            .iter()
            .all(|r| r.path.contains("/federatedIdentityCredentials/")),
        "only the federated credential was written: {writes:#?}"
    );
    assert!(!writes.is_empty(), "the controller created the credential");
    let status = identities
        .get("id-b")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()[CREDENTIAL_STATUS_ANNOTATION]
        .clone();
    assert!(status.starts_with("managed: "), "{status}");
    let stranger = session.pod("federated", "stranger", None).await.unwrap();
    let (status, body) = session.token(&stranger).unwrap();
    assert_eq!(status, 403, "{body}");
    assert_no_pod_reached_imds(&session);

    // Leave the release as it was: the identity deleted (its credential and subject go with it), then
    // federation off again.
    identities.delete("id-b", &DeleteParams::default()).await.unwrap();
    eventually(|| async {
        let left = session.emulator.with_state(|s| {
            s.uami(&identity_id("id-b"))
                .map(|u| u.federated_credentials.len())
                .unwrap_or_default()
        });
        if left == 0 {
            Ok(())
        } else {
            bail!("{left} federated credentials left on id-b")
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));
    session.helm_release("upgrade", &session.values()).unwrap();
    session.wait_agent_ready().await.unwrap();
    session.wait_controller_ready().await.unwrap();
}

/// Lets anonymous clients read the issuer's discovery documents, as Entra fetches them (idempotent).
async fn allow_anonymous_issuer_discovery(session: &Session<'_>) {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "anonymous-issuer-discovery"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:service-account-issuer-discovery"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}],
    }))
    .unwrap();
    match Api::<ClusterRoleBinding>::all(session.client.clone())
        .create(&kube::api::PostParams::default(), &binding)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("binding issuer discovery to system:unauthenticated: {error}"),
    }
}

#[tokio::test]
async fn a_deleted_pod_releases_its_identity_and_uninstall_leaves_only_the_documented_rules() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    // The only pod bound to id-b: once it goes, the identity leaves the scale set.
    session.namespace("release").await.unwrap();
    session
        .bind("release", "id-b", harness::CLIENT_B, "release")
        .await
        .unwrap();
    let pod = session.pod("release", "reader", Some("release")).await.unwrap();
    served(&session, &pod).await;
    let id_b = identity_id("id-b").to_lowercase();
    assert!(session.scale_set_identities().contains(&id_b));
    session.delete_pod(&pod).await.unwrap();
    eventually(|| async {
        if session.scale_set_identities().contains(&id_b) {
            bail!("id-b is still on the scale set")
        }
        Ok(())
    })
    .await
    .unwrap();

    session
        .helm(&["uninstall", RELEASE, "--namespace", INSTALL_NAMESPACE, "--wait"])
        .unwrap();
    // What stays on the node, as documented: the agent's chains (fail closed) and its address.
    for table in ["nat", "filter"] {
        let listed = session
            .node
            .in_node_ok(&["iptables", "-t", table, "-S", "POD-IDENTITY"])
            .unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains("pod-identity-agent"));
    }
    // The documented step removes them.
    let agent_image = session.images.reference("agent").unwrap().to_owned();
    let output =
        Command::new(pod_identity_test_support::tools::workspace_binary("kubectl-podidentity").unwrap())
            .args(["--kubeconfig"])
            .arg(session.node.admin_kubeconfig())
            .args([
                "remove-node-rules",
                "--namespace",
                INSTALL_NAMESPACE,
                "--image",
                &agent_image,
                "--image-pull-policy",
                "Never",
            ])
            .output()
            .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for table in ["nat", "filter"] {
        let listed = session
            .node
            .in_node("iptables")
            .args(["-t", table, "-S", "POD-IDENTITY"])
            .output()
            .unwrap();
        assert!(!listed.status.success(), "chain POD-IDENTITY left in {table}");
    }
    let nat = session
        .node
        .in_node_ok(&["iptables", "-t", "nat", "-S", "PREROUTING"])
        .unwrap();
    assert!(!String::from_utf8_lossy(&nat.stdout).contains("POD-IDENTITY"));
}

#[tokio::test]
async fn default_values_on_a_node_without_azure_json_say_which_value_to_set() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    if session.installed() {
        session
            .helm(&["uninstall", RELEASE, "--namespace", INSTALL_NAMESPACE, "--wait"])
            .unwrap();
    }
    assert!(!std::path::Path::new("/etc/kubernetes/azure.json").exists());
    // The chart's defaults but the images: azure.json from the node's hostPath.
    let values = vec![
        format!(
            "image.registry={}",
            pod_identity_test_support::real_node::images::REGISTRY
        ),
        format!("image.tag={}", session.images.tag),
        "image.pullPolicy=Never".to_owned(),
    ];
    session.helm_release("install", &values).unwrap();
    let pods = Api::<Pod>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    let events = Api::<CoreEvent>::namespaced(session.client.clone(), INSTALL_NAMESPACE);
    let note = eventually(|| async {
        let controllers = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
            .await?;
        for pod in &controllers {
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase != "Running" {
                bail!("controller pod {:?} is {phase}", pod.metadata.name);
            }
        }
        let found = events
            .list(&ListParams::default())
            .await?
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("AzureConfigMissing"));
        match found {
            Some(event) => Ok(event.message.unwrap_or_default()),
            None => bail!("no AzureConfigMissing Event yet"),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));
    assert!(note.contains("azureConfig.existingSecret"), "{note}");
    assert!(note.contains("/etc/kubernetes/azure.json"), "{note}");
    let logs = session
        .node
        .kubectl_ok(&[
            "logs",
            "-n",
            INSTALL_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=controller",
            "--tail=20",
        ])
        .unwrap();
    assert!(logs.contains("azureConfig.existingSecret"), "{logs}");
    session
        .helm(&["uninstall", RELEASE, "--namespace", INSTALL_NAMESPACE, "--wait"])
        .unwrap();
}

/// `curl` from the node itself (a process in no pod): the HTTP status and the body.
fn curl_from_node(session: &Session<'_>, url: &str) -> (u16, String) {
    let output = session
        .node
        .in_node_ok(&[
            "curl",
            "-s",
            "-S",
            "-m",
            "30",
            "-H",
            "Metadata: true",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn host_network(pod: &mut serde_json::Value) {
    pod["spec"]["hostNetwork"] = serde_json::json!(true);
    pod["spec"]["dnsPolicy"] = serde_json::json!("ClusterFirstWithHostNet");
}

#[tokio::test]
async fn with_attested_callers_host_network_pods_get_only_their_own_identities_and_forged_addresses_are_refused()
 {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    let mut values = session.values();
    values.push("agent.attestHostNetwork=true".into());
    session.helm_release("upgrade", &values).unwrap();
    session.wait_agent_ready().await.unwrap();
    let nat = |hook: &str| {
        let listed = session
            .node
            .in_node_ok(&["iptables", "-t", "nat", "-S", hook])
            .unwrap();
        String::from_utf8_lossy(&listed.stdout).into_owned()
    };
    assert!(nat("OUTPUT").contains("-j POD-IDENTITY"), "{}", nat("OUTPUT"));
    assert!(
        nat("POD-IDENTITY").contains("--mark 0x2000/0x2000"),
        "{}",
        nat("POD-IDENTITY")
    );

    // Identity B is on the scale set for another pod, so the node holds both A and B.
    let namespace = "attest";
    session.namespace(namespace).await.unwrap();
    session
        .bind(namespace, "id-a", harness::CLIENT_A, "host-a")
        .await
        .unwrap();
    session
        .bind(namespace, "id-b", harness::CLIENT_B, "holder-b")
        .await
        .unwrap();
    let holder = session.pod(namespace, "holder", Some("holder-b")).await.unwrap();
    served(&session, &holder).await;

    // A bound host-network pod gets A, asked or by default, and never B, which the node also holds.
    let host_a = session
        .pod_with(namespace, "host-a", Some("host-a"), host_network)
        .await
        .unwrap();
    let token = served(&session, &host_a).await;
    assert!(!token.is_empty());
    let (status, body) = session.token(&host_a).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, answer["client_id"].as_str()),
        (200, Some(harness::CLIENT_A)),
        "{body}"
    );
    let for_b = format!("{}&client_id={}", harness::TOKEN_URL, harness::CLIENT_B);
    let (status, body) = session.curl(&host_a, &["-H", "Metadata: true", &for_b]).unwrap();
    assert_eq!(status, 403, "{body}");
    // An unbound host-network pod is refused, not answered with the node's identities.
    let host_stranger = session
        .pod_with(namespace, "host-stranger", None, host_network)
        .await
        .unwrap();
    let (status, body) = session.token(&host_stranger).unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, body) = session
        .curl(&host_stranger, &["-H", "Metadata: true", &for_b])
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // The node itself (a process in no pod, as the kubelet is) is passed through: what IMDS gives it.
    let (status, body) = curl_from_node(
        &session,
        "http://169.254.169.254/metadata/instance?api-version=2021-02-01",
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = curl_from_node(&session, &for_b);
    assert_eq!(status, 200, "{body}");

    // A pod that takes another pod's address (kubenet's ARP spoofing, CVE-2021-1677: here the node's
    // neighbour entry for the victim's address is pointed at the forger, as poisoned ARP would) reaches
    // the agent from the victim's address, and is refused: its socket is not in the victim's namespace.
    let victim = session.pod(namespace, "victim", Some("host-a")).await.unwrap();
    served(&session, &victim).await;
    let forger = session
        .pod_with(namespace, "forger", None, |pod| {
            pod["spec"]["containers"][0]["securityContext"] =
                serde_json::json!({"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}});
        })
        .await
        .unwrap();
    let (ok, mac, err) = session
        .exec(&forger, &["cat", "/sys/class/net/eth0/address"])
        .unwrap();
    assert!(ok, "{err}");
    let victim_address = format!("{}/32", victim.ip);
    let (ok, _, err) = session
        .exec(
            &forger,
            &["busybox", "ip", "addr", "add", &victim_address, "dev", "eth0"],
        )
        .unwrap();
    assert!(ok, "{err}");
    session
        .node
        .in_node_ok(&[
            "ip",
            "neigh",
            "replace",
            &victim.ip,
            "lladdr",
            mac.trim(),
            "dev",
            "cni0",
            "nud",
            "permanent",
        ])
        .unwrap();
    let forged = session.curl(
        &forger,
        &[
            "--interface",
            &victim.ip,
            "-H",
            "Metadata: true",
            harness::TOKEN_URL,
        ],
    );
    // The forger gives the address back before the node forgets the poisoned entry: while the forger holds
    // it, it answers the node's next ARP query for the victim's address too, and whichever answer comes
    // last decides where the victim's replies go.
    let (ok, _, err) = session
        .exec(
            &forger,
            &["busybox", "ip", "addr", "del", &victim_address, "dev", "eth0"],
        )
        .unwrap();
    assert!(ok, "{err}");
    session
        .node
        .in_node_ok(&["ip", "neigh", "del", &victim.ip, "dev", "cni0"])
        .unwrap();
    let (status, body) = forged.unwrap();
    assert_eq!(status, 403, "the forger was answered {status}: {body}");
    assert!(body.contains("not its own"), "{body}");
    let events = Api::<CoreEvent>::namespaced(session.client.clone(), namespace);
    eventually(|| async {
        let found = events.list(&ListParams::default()).await?;
        found
            .items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("CallerSpoofed")
                    && e.involved_object.name.as_deref() == Some("victim")
            })
            .map(|_| ())
            .context("no CallerSpoofed Event about the victim yet")
    })
    .await
    .unwrap();
    // The victim itself is still served.
    served(&session, &victim).await;

    // Nothing a pod sent reached IMDS unmediated: no request from a pod address (the host-network pods'
    // refusals above are the agent's: IMDS would have given B, which the node holds).
    assert_no_pod_reached_imds(&session);
    let (status, metrics) = curl_from_node(&session, "http://127.0.0.1:9090/metrics");
    assert_eq!(status, 200, "{metrics}");
    for result in ["pod", "node", "spoofed"] {
        assert!(
            metrics.contains(&format!(
                "pod_identity_caller_attestations_total{{result=\"{result}\"}}"
            )),
            "no {result} attestation counted:\n{metrics}"
        );
    }

    // Attestation off again: the OUTPUT jump goes, so the agent's own (now unmarked) calls are not sent
    // back to itself, and pods are served as before.
    session.helm_release("upgrade", &session.values()).unwrap();
    session.wait_agent_ready().await.unwrap();
    eventually(|| async {
        let output = nat("OUTPUT");
        if output.contains("-j POD-IDENTITY") {
            bail!("OUTPUT still jumps to the agent's chain: {output}")
        }
        Ok(())
    })
    .await
    .unwrap();
    served(&session, &holder).await;
}

/// The `IdentityReady` condition of a pod, as `(status, reason)`.
fn identity_ready(pod: &Pod) -> Option<(String, String)> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == pod_identity_api::readiness::IDENTITY_READY_CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A node of its own, registered by its kubelet with the startup taint: ordinary pods wait until the agent
/// is ready there; a gated bound pod becomes Ready only once its token works (and then at once); an
/// unbound pod is unaffected; the audit stream, on the agent's standard output, shows the decisions and
/// no token.
#[tokio::test]
async fn a_tainted_node_runs_no_pod_before_its_agent_and_a_gated_pod_is_ready_only_once_its_token_works() {
    let bin = harness::test_bin_dir().unwrap();
    let taint = pod_identity_api::readiness::AGENT_NOT_READY_TAINT;
    let cluster = Cluster::start_with(&bin, |options| {
        options
            .register_with_taints
            .push((taint.to_owned(), "true".to_owned(), "NoSchedule".to_owned()))
    })
    .await
    .unwrap();
    let session = cluster.session().await.unwrap();
    let namespace = session.namespace("tainted").await.unwrap();
    let pods = Api::<Pod>::namespaced(session.client.clone(), &namespace);

    // Before the agent: an ordinary pod is not scheduled, for the taint.
    let early: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "early"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": cluster.images.reference("toolbox").unwrap(), "imagePullPolicy": "Never",
            "command": ["sleep", "86400"],
        }]},
    }))
    .unwrap();
    pods.create(&Default::default(), &early).await.unwrap();
    eventually(|| async {
        let pod = pods.get("early").await?;
        let scheduled = pod
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled");
        match scheduled {
            Some(c)
                if c.status == "False"
                    && c.message
                        .as_deref()
                        .unwrap_or_default()
                        .contains("untolerated taint") =>
            {
                Ok(())
            }
            other => bail!("early is not held back by the taint yet: {other:?}"),
        }
    })
    .await
    .unwrap();
    // The only taint the node has is the one its kubelet registered it with.
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(session.client.clone());
    let registered = nodes.get(session.node.name()).await.unwrap();
    let keys: Vec<String> = registered
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect();
    assert_eq!(keys, [taint], "the kubelet registered the node with the taint");

    session
        .install(&["agent.prefetchResources[0]=https://vault.azure.net".to_owned()])
        .await
        .unwrap();
    // The agent is ready: the taint is gone and the early pod runs.
    eventually(|| async {
        let pod = pods.get("early").await?;
        match pod.status.and_then(|s| s.phase).as_deref() {
            Some("Running") => Ok(()),
            phase => bail!("early is {phase:?}"),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("agent")));
    let node = nodes.get(session.node.name()).await.unwrap();
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(taints.iter().all(|t| t.key != taint), "{taints:?}");
    assert!(
        pod_ready(&pods.get("early").await.unwrap()),
        "an ungated pod is Ready as usual"
    );

    // A gated pod whose binding does not exist yet runs, and is not Ready.
    let gated = session
        .pod_with(&namespace, "gated", Some("gated"), |manifest| {
            manifest["spec"]["readinessGates"] =
                serde_json::json!([{"conditionType": pod_identity_api::readiness::IDENTITY_READY_CONDITION}]);
        })
        .await
        .unwrap();
    eventually(|| async {
        let pod = pods.get("gated").await?;
        match identity_ready(&pod) {
            Some((status, reason)) if status == "False" && reason == "IdentityNotBound" => {
                anyhow::ensure!(!pod_ready(&pod), "Ready while IdentityReady is False");
                Ok(())
            }
            other => bail!("IdentityReady is {other:?}"),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("agent")));

    // Bound: the identity goes to the scale set, the agent fetches its token, then the pod is Ready.
    session
        .bind(&namespace, "id-a", harness::CLIENT_A, "gated")
        .await
        .unwrap();
    eventually(|| async {
        let pod = pods.get("gated").await?;
        if pod_ready(&pod) {
            Ok(())
        } else {
            bail!("not Ready: IdentityReady is {:?}", identity_ready(&pod))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("agent")));
    // Ready means its first request is answered at once, from the prefetched token.
    let (status, body) = session.token(&gated).unwrap();
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let access_token = token["access_token"].as_str().unwrap().to_owned();

    // The audit stream is the agent's standard output; its logs are standard error.
    let audit = eventually(|| async {
        let output = session
            .node
            .kubectl()
            .args([
                "logs",
                "-n",
                INSTALL_NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
            ])
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let served = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|r| r["decision"] == "served" && r["pod"]["name"] == "gated");
        match served {
            Some(record) => Ok((record, stdout)),
            None => bail!("no served record for gated yet"),
        }
    })
    .await
    .unwrap();
    let (record, all) = audit;
    assert_eq!(record["cacheHit"], true, "{record}");
    assert_eq!(record["identity"]["clientID"], harness::CLIENT_A);
    assert_eq!(
        record["tokenSha256"],
        serde_json::json!([pod_identity_agent::audit::token_hash(&access_token)])
    );
    assert!(!all.contains(&access_token), "a token in the agent's output");
    assert_no_pod_reached_imds(&session);
    drop(session);
    drop(cluster);
}

/// How long Azure takes to update a scale set's identities (aad-pod-identity #770: 40–60 s).
const SCALE_SET_UPDATE: std::time::Duration = std::time::Duration::from_secs(45);

/// The local Azure's scale-set updates made to take `duration` until dropped (then as before), so that a
/// failing test leaves the shared node's Azure as it found it.
struct SlowUpdates<'a> {
    emulator: &'a pod_identity_emulator::Emulator,
    before: u64,
}

impl<'a> SlowUpdates<'a> {
    fn new(emulator: &'a pod_identity_emulator::Emulator, duration: std::time::Duration) -> Self {
        let before = emulator.settings().lro_duration_ms;
        emulator.update_settings(|s| s.lro_duration_ms = duration.as_millis() as u64);
        Self { emulator, before }
    }
}

impl Drop for SlowUpdates<'_> {
    fn drop(&mut self) {
        let before = self.before;
        self.emulator.update_settings(|s| s.lro_duration_ms = before);
    }
}

/// [`eventually`] with `extra` more patience, for what waits on a scale-set update.
async fn eventually_after<T, F, Fut>(extra: std::time::Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + extra;
    loop {
        match eventually(&mut check).await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(_) => {}
        }
    }
}

/// A Deployment of `replicas` toolbox pods bound by `selector`, each asking for a token as soon as it
/// starts and again every second until served, printing each attempt's status and time.
async fn token_deployment(session: &Session<'_>, namespace: &str, name: &str, selector: &str, replicas: i32) {
    let script = "n=0; while :; do n=$((n+1)); \
         r=$(curl -s -o /dev/null -m 60 -w '%{http_code} %{time_total}' -H 'Metadata: true' 'URL'); \
         echo \"attempt $n: $r\"; case \"$r\" in 200*) break;; esac; sleep 1; done; exec sleep 86400"
        .replace("URL", harness::TOKEN_URL);
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name, (pod_identity_api::POD_LABEL): selector}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "app", "image": session.images.reference("toolbox").unwrap(),
                    "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                }],
            }}},
    }))
    .unwrap();
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(session.client.clone(), namespace)
        .create(&Default::default(), &deployment)
        .await
        .unwrap();
}

/// The one pod of Deployment `name`, once created.
async fn workload_pod(session: &Session<'_>, namespace: &str, name: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(session.client.clone(), namespace);
    eventually(|| async {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={name}")))
            .await?;
        match list.items.as_slice() {
            [pod] => Ok(pod.clone()),
            other => bail!("{} pods of {namespace}/{name}", other.len()),
        }
    })
    .await
    .unwrap()
}

/// The audit records of the pod with `uid`, oldest first.
fn audit_records(session: &Session<'_>, uid: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    // The audit stream is the agent's standard output; its logs (standard error) have no `pod` object.
    let output = session
        .node
        .kubectl()
        .args([
            "logs",
            "-n",
            INSTALL_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=agent",
            "--tail=-1",
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|r| r["pod"]["uid"] == uid)
        .collect())
}

/// Waits for the first token served to the pod with `uid`; its audit records up to it, and its time.
async fn first_served(
    session: &Session<'_>,
    uid: &str,
    extra: std::time::Duration,
) -> (Vec<serde_json::Value>, jiff::Timestamp) {
    eventually_after(extra, || async {
        let records = audit_records(session, uid)?;
        let Some(at) = records.iter().position(|r| r["decision"] == "served") else {
            bail!("no token served to {uid} yet: {records:?}");
        };
        let time: jiff::Timestamp = records[at]["time"].as_str().context("no time")?.parse()?;
        Ok((records[..=at].to_vec(), time))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("agent")))
}

/// Waits until the AzureAssignedIdentity `name` is Assigned.
async fn assigned(session: &Session<'_>, namespace: &str, name: &str, extra: std::time::Duration) {
    let api = Api::<AzureAssignedIdentity>::namespaced(session.client.clone(), namespace);
    eventually_after(extra, || async {
        let record = api.get(name).await?;
        match record.assignment_status() {
            AssignmentStatus::Assigned => Ok(()),
            other => bail!("{namespace}/{name} is {other:?}"),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));
}

/// Writes to the node's scale set that the local Azure received after request `since`.
fn scale_set_writes(session: &Session<'_>, since: u64) -> Vec<pod_identity_emulator::RequestRecord> {
    session
        .emulator
        .requests(&pod_identity_emulator::LogFilter {
            service: Some(pod_identity_emulator::Service::Arm),
            since: Some(since),
            path_contains: Some("/virtualMachineScaleSets/nodepool".into()),
            ..Default::default()
        })
        .into_iter()
        .filter(|r| !r.method.eq_ignore_ascii_case("GET"))
        .collect()
}

/// The sum and count of `pod_identity_pod_first_token_seconds` for `identity`, from the agent.
fn first_token_metric(session: &Session<'_>, identity: &str) -> (f64, u64) {
    let (status, metrics) = curl_from_node(session, "http://127.0.0.1:9090/metrics");
    assert_eq!(status, 200, "{metrics}");
    let value = |suffix: &str| {
        let prefix = format!("pod_identity_pod_first_token_seconds_{suffix}{{identity=\"{identity}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {prefix}in:\n{metrics}"))
    };
    (value("sum").parse().unwrap(), value("count").parse().unwrap())
}

fn created(pod: &Pod) -> jiff::Timestamp {
    pod.metadata.creation_timestamp.as_ref().unwrap().0
}

#[tokio::test]
async fn with_prewarming_a_new_pod_of_a_warmed_workload_is_served_without_waiting_for_a_scale_set_update() {
    let cluster = cluster().await;
    let session = cluster.session().await.unwrap();
    installed(&session).await;
    let _slow = SlowUpdates::new(&session.emulator, SCALE_SET_UPDATE);
    let mut values = session.values();
    values.push("prewarm.enabled=true".into());
    session.helm_release("upgrade", &values).unwrap();
    session.wait_controller_ready().await.unwrap();

    // An opted-in binding and a Deployment it selects, with no pod yet: the identity is warmed on the
    // node's scale set, in one update, and recorded as pre-warmed.
    let warm = session.namespace("warmed").await.unwrap();
    session
        .bind(&warm, "id-c", harness::CLIENT_C, "warm")
        .await
        .unwrap();
    Api::<pod_identity_api::AzureIdentityBinding>::namespaced(session.client.clone(), &warm)
        .patch(
            "id-c-binding",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                (pod_identity_controller::prewarm::PREWARM_ANNOTATION): "true"}}})),
        )
        .await
        .unwrap();
    let before_warming = session.emulator.last_seq();
    token_deployment(&session, &warm, "app", "warm", 0).await;
    let records = Api::<AzureAssignedIdentity>::namespaced(session.client.clone(), &warm);
    let warmed = eventually_after(SCALE_SET_UPDATE, || async {
        let list = records
            .list(&ListParams::default().labels(&format!(
                "{}=true",
                pod_identity_controller::prewarm::PREWARM_LABEL
            )))
            .await?;
        match list.items.as_slice() {
            [record] if record.assignment_status() == AssignmentStatus::Assigned => Ok(record.clone()),
            other => bail!("pre-warmed records: {other:?}"),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", session.diagnose("controller")));
    let warmed_identity = warmed.spec.azure_identity_ref.as_ref().unwrap();
    assert_eq!(warmed_identity.metadata.name.as_deref(), Some("id-c"));
    assert!(
        session
            .scale_set_identities()
            .contains(&identity_id("id-c").to_lowercase())
    );
    let warming = scale_set_writes(&session, before_warming);
    assert!(
        !warming.is_empty(),
        "the identity reached the scale set without an update"
    );
    println!(
        "warming: {} scale-set update(s) of {} s",
        warming.len(),
        SCALE_SET_UPDATE.as_secs()
    );

    // A new pod of the workload: its first token needs no scale-set update, and its assignment is
    // Assigned without waiting for one.
    let before_pod = session.emulator.last_seq();
    let asked = jiff::Timestamp::now();
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(session.client.clone(), &warm)
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let pod = workload_pod(&session, &warm, "app").await;
    let uid = pod.metadata.uid.clone().unwrap();
    let (decisions, served_at) = first_served(&session, &uid, std::time::Duration::ZERO).await;
    assigned(
        &session,
        &warm,
        &pod_identity_api::naming::assigned_identity_name(&pod.name_any(), &warm, "id-c"),
        std::time::Duration::ZERO,
    )
    .await;
    let writes = scale_set_writes(&session, before_pod);
    assert!(
        writes.is_empty(),
        "the warmed workload's pod needed a scale-set update: {writes:#?}"
    );
    assert!(
        decisions.iter().all(|r| r["reason"] != "IdentityNotAssigned"),
        "the warmed workload's pod was told to wait for its identity: {decisions:#?}"
    );
    let (measured, count) = first_token_metric(&session, &format!("{warm}/id-c"));
    assert_eq!(count, 1, "one pod, one identity: one first token");
    let pod = Api::<Pod>::namespaced(session.client.clone(), &warm)
        .get(&pod.name_any())
        .await
        .unwrap();
    println!(
        "pre-warmed, scale-set updates taking {} s: pod created -> first token {measured:.3} s \
         (pod_identity_pod_first_token_seconds; the creation time has whole seconds), scale-up asked \
         -> first token {:.3} s, created -> first token {:.3} s (audit record), scale-set updates \
         meanwhile: 0",
        SCALE_SET_UPDATE.as_secs(),
        served_at.duration_since(asked).as_secs_f64(),
        served_at.duration_since(created(&pod)).as_secs_f64(),
    );
    println!("the pod's attempts: {:?}", workload_attempts(&session, &pod));

    // The contrast: a workload whose binding is not opted in waits for its scale-set update.
    let cold = session.namespace("unwarmed").await.unwrap();
    session
        .bind(&cold, "id-d", harness::CLIENT_D, "cold")
        .await
        .unwrap();
    let before_cold = session.emulator.last_seq();
    token_deployment(&session, &cold, "app", "cold", 1).await;
    let pod = workload_pod(&session, &cold, "app").await;
    let uid = pod.metadata.uid.clone().unwrap();
    let (decisions, served_at) = first_served(&session, &uid, SCALE_SET_UPDATE).await;
    let writes = scale_set_writes(&session, before_cold);
    assert!(
        !writes.is_empty(),
        "the identity of a workload not opted in reached the scale set without an update"
    );
    assert!(
        decisions
            .iter()
            .any(|r| r["decision"] == "unavailable" && r["reason"] == "IdentityNotAssigned"),
        "the pod of a workload not opted in was not told to wait for its identity: {decisions:#?}"
    );
    let (measured_cold, count) = first_token_metric(&session, &format!("{cold}/id-d"));
    assert_eq!(count, 1);
    println!(
        "not pre-warmed, scale-set updates taking {} s: pod created -> first token {measured_cold:.3} s \
         (pod_identity_pod_first_token_seconds), created -> first token {:.3} s (audit record), \
         scale-set updates meanwhile: {}; answers before: {:?}; {:.0}x the pre-warmed pod's",
        SCALE_SET_UPDATE.as_secs(),
        served_at.duration_since(created(&pod)).as_secs_f64(),
        writes.len(),
        decisions
            .iter()
            .map(|r| format!(
                "{} {}",
                r["decision"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default()
            ))
            .collect::<Vec<_>>(),
        measured_cold / measured.max(1e-3),
    );
    println!("the pod's attempts: {:?}", workload_attempts(&session, &pod));
    assert_no_pod_reached_imds(&session);

    // Back to the release's own values and immediate updates for the other tests.
    drop(_slow);
    session.helm_release("upgrade", &session.values()).unwrap();
    session.wait_controller_ready().await.unwrap();
}

/// What the pod's container printed of its token attempts (`attempt N: <status> <seconds>`).
fn workload_attempts(session: &Session<'_>, pod: &Pod) -> Vec<String> {
    let logs = session
        .node
        .kubectl_ok(&[
            "logs",
            "-n",
            pod.metadata.namespace.as_deref().unwrap(),
            &pod.name_any(),
            "-c",
            "app",
        ])
        .unwrap_or_else(|e| e.to_string());
    logs.lines().map(str::to_owned).collect()
}
