//! The chart's RBAC is enough for what the binaries do: each binary runs against the real kube-apiserver
//! as the chart's ServiceAccount, with only the chart's roles, and does its whole job. A verb the chart
//! forgot shows as a forbidden call and a failed test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns_harness;

use std::process::{Child, Command, Stdio};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use netns_harness::{Harness, TOKEN_URL, curl};
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity,
    fixtures::{binding_of, user_assigned_identity},
};
use pod_identity_emulator::{Config, Emulator, Seed};
use pod_identity_test_support::{
    ControlPlane, eventually,
    fixtures::{self, PodTemplate},
    tools,
};
use serde_json::json;

async fn install_chart(plane: &ControlPlane) -> String {
    // Every optional permission the controller may use.
    netns_harness::install_chart(plane, &["--set", "prewarm.enabled=true"]).await
}

// The emulator serves from this runtime while the test blocks on curl: it needs threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_does_its_job_with_the_charts_service_account() {
    let plane = ControlPlane::shared().await;
    let release = install_chart(plane).await;
    let kubeconfig = plane
        .kubeconfig_for_service_account(&release, &format!("{release}-pod-identity-agent"))
        .await
        .unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    // Ready means every watch it needs (pods, assignments, bindings, identities, exceptions) synced.
    let h = Harness::start(&["--kubeconfig", &kubeconfig]).await;

    let web = h.pod("web", Some("web")).await;
    h.bind("id-a", "web").await;
    h.assigned(&web, "id-a", "Assigned").await;
    token_eventually(&h, &web).await;

    // A refusal is recorded as an Event on the pod.
    let stranger = h.pod("stranger", None).await;
    let (status, body) = curl(&h, &stranger, TOKEN_URL, &["-H", "Metadata: true"]);
    assert_eq!(status, 403, "{body}");
    let events = eventually(|| async {
        let events = h.events_about("stranger").await;
        if events.is_empty() {
            Err("no event yet")
        } else {
            Ok(events)
        }
    })
    .await
    .unwrap();
    assert!(!events.is_empty());

    // Service principals: the agent reads the identity's Secret.
    h.service_principal_secret("sp-secret", 1, &[]).await;
    let sp_pod = h.pod("sp", Some("sp")).await;
    h.bind("sp-secret", "sp").await;
    token_eventually(&h, &sp_pod).await;

    // The IdentityReady condition of a gated pod (pods/status), and the node's startup taint (nodes).
    let gated = h.gated_pod("gated", Some("web")).await;
    h.assigned(&gated, "id-a", "Assigned").await;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(h.ns.client.clone(), &h.ns.name);
    eventually(|| async {
        let pod = pods.get("gated").await.map_err(|e| e.to_string())?;
        let conditions = pod.status.and_then(|s| s.conditions).unwrap_or_default();
        match conditions.iter().find(|c| c.type_ == "IdentityReady") {
            Some(c) if c.status == "True" => Ok(()),
            other => Err(format!("IdentityReady is {other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", h.agent_log_text()));
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(h.ns.client.clone());
    let taint = json!({"spec": {"taints": [{
        "key": pod_identity_api::readiness::AGENT_NOT_READY_TAINT, "value": "true", "effect": "NoSchedule",
    }]}});
    nodes
        .patch(
            &h.node_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&taint),
        )
        .await
        .unwrap();
    eventually(|| async {
        let node = nodes.get(&h.node_name).await.map_err(|e| e.to_string())?;
        match node.spec.and_then(|s| s.taints).unwrap_or_default().len() {
            0 => Ok(()),
            _ => Err("still tainted".to_owned()),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", h.agent_log_text()));

    let log = h.agent_log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the agent was refused something:\n{log}"
    );
}

/// A token for the pod, once the agent's watches have caught up with what the test just created.
async fn token_eventually(h: &Harness, pod: &pod_identity_test_support::netns::PodNet) {
    let result = eventually(|| async {
        match curl(h, pod, TOKEN_URL, &["-H", "Metadata: true"]) {
            (200, _) => Ok(()),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    if let Err(last) = result {
        panic!(
            "no token for {}: {last}\nagent log:\n{}",
            pod.netns,
            h.agent_log_text()
        );
    }
}

const TENANT: &str = "e1f0c2a1-0000-4000-8000-00000000000a";
const SUBSCRIPTION: &str = "e1f0c2a1-0000-4000-8000-000000000001";
const CONTROLLER_CLIENT: &str = "e1f0c2a1-1111-4111-8111-000000000001";
const CONTROLLER_OBJECT: &str = "e1f0c2a1-2222-4222-8222-000000000001";
const IDENTITY_CLIENT: &str = "e1f0c2a1-1111-4111-8111-000000000002";

fn scale_set() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/nodes/providers/Microsoft.Compute/virtualMachineScaleSets/pool"
    )
}

fn identity_id() -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app"
    )
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_controller_does_its_job_with_the_charts_service_account() {
    let plane = ControlPlane::shared().await;
    let release = install_chart(plane).await;
    let kubeconfig = plane
        .kubeconfig_for_service_account(&release, &format!("{release}-pod-identity-controller"))
        .await
        .unwrap();
    let seed: Seed = serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [
            {"displayName": "controller", "clientId": CONTROLLER_CLIENT, "objectId": CONTROLLER_OBJECT, "secrets": ["s"]}
        ]}],
        "subscriptions": [{"id": SUBSCRIPTION, "tenantId": TENANT, "displayName": "t", "resourceGroups": [
            {"name": "ids", "location": "westeurope", "userAssignedIdentities": [
                {"name": "app", "clientId": IDENTITY_CLIENT, "principalId": "e1f0c2a1-2222-4222-8222-000000000002"}
            ]},
            {"name": "nodes", "location": "westeurope",
             "virtualMachineScaleSets": [{"name": "pool", "instances": [{"instanceId": "0"}]}]},
        ]}],
        "roleAssignments": [{"principalId": CONTROLLER_OBJECT, "scope": format!("/subscriptions/{SUBSCRIPTION}"), "roleDefinitionName": "Contributor"}],
    }))
    .unwrap();
    let emulator = Emulator::start(Config::new(seed)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, emulator.ca_pem()).unwrap();
    let azure_json = dir.path().join("azure.json");
    std::fs::write(
        &azure_json,
        json!({"tenantId": TENANT, "subscriptionId": SUBSCRIPTION, "aadClientId": CONTROLLER_CLIENT,
               "aadClientSecret": "s", "resourceGroup": "nodes", "vmType": "vmss"})
        .to_string(),
    )
    .unwrap();
    let log = dir.path().join("controller.log");
    // The chart's names for the readiness-gate webhook's Service, Secret and configuration.
    let webhook = format!("{release}-pod-identity-webhook");
    // Helm installs the webhook configuration last, so the controller may lead and write its Secret before
    // the configuration exists; here it surely does, and must then adopt the Secret with the chart's RBAC.
    let admin = plane.admin_client().await.unwrap();
    let configurations =
        Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(admin.clone());
    let mut installed = configurations.get(&webhook).await.unwrap();
    installed.metadata = kube::api::ObjectMeta {
        name: installed.metadata.name.clone(),
        labels: installed.metadata.labels.clone(),
        annotations: installed.metadata.annotations.clone(),
        ..Default::default()
    };
    configurations
        .delete(&webhook, &Default::default())
        .await
        .unwrap();
    let log_file = std::fs::File::create(&log).unwrap();
    let _controller = Killed(
        Command::new(tools::workspace_binary("pod-identity-controller").unwrap())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cloudconfig")
            .arg(&azure_json)
            .args([
                "--arm-endpoint",
                &emulator.azure_url(),
                "--authority-host",
                &emulator.azure_url(),
            ])
            .arg("--azure-ca-file")
            .arg(&ca)
            .args([
                "--leader-election-namespace",
                &release,
                "--leader-election-name",
                "pod-identity-controller",
            ])
            .args(["--bind-address", "127.0.0.1", "--log-format", "plain"])
            .args([
                "--webhook-port".to_owned(),
                free_port().to_string(),
                format!("--webhook-service={webhook}"),
                format!("--webhook-secret={webhook}-cert"),
                format!("--webhook-configuration={webhook}"),
                "--prewarm".to_owned(),
            ])
            .args([
                "--http-probe-port",
                &free_port().to_string(),
                "--prometheus-port",
                &free_port().to_string(),
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &release);
    eventually(|| async {
        secrets.get(&format!("{webhook}-cert")).await?;
        Ok::<_, kube::Error>(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; controller log:\n{}", std::fs::read_to_string(&log).unwrap()));
    configurations
        .create(&kube::api::PostParams::default(), &installed)
        .await
        .unwrap();

    let ns = plane.namespace().await.unwrap();
    let node = format!("node-{}", ns.name);
    fixtures::create_node(
        &admin,
        &node,
        Some(&format!("azure://{}/virtualMachines/0", scale_set())),
    )
    .await
    .unwrap();
    let identity = user_assigned_identity(&ns.name, "app", IDENTITY_CLIENT).with_resource_id(&identity_id());
    fixtures::create(&admin, &identity).await.unwrap();
    fixtures::create(&admin, &binding_of(&ns.name, "app", "app"))
        .await
        .unwrap();
    let template = PodTemplate {
        namespace: ns.name.clone(),
        name: "web".into(),
        labels: [(pod_identity_api::POD_LABEL.to_owned(), "app".to_owned())].into(),
        node: Some(node.clone()),
        ip: Some("10.244.9.9".into()),
    };
    fixtures::create_pod(&admin, &template).await.unwrap();

    // It takes the Lease (the namespaced Role), records and assigns (AzureAssignedIdentity verbs,
    // reads of pods, nodes, identities and bindings), and writes to Azure.
    let assignments = Api::<AzureAssignedIdentity>::namespaced(admin.clone(), &ns.name);
    let name = pod_identity_api::naming::assigned_identity_name("web", &ns.name, "app");
    let result = eventually(|| async {
        match assignments.get_opt(&name).await?.map(|a| a.assignment_status()) {
            Some(AssignmentStatus::Assigned) => Ok(()),
            other => Err(anyhow::anyhow!("assignment is {other:?}")),
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    result.unwrap_or_else(|e| panic!("{e}; controller log:\n{text}"));
    let lease = Api::<Lease>::namespaced(admin.clone(), &release)
        .get("pod-identity-controller")
        .await
        .unwrap();
    assert!(lease.spec.unwrap().holder_identity.is_some());

    // Deleting the pod releases the identity: update, patch and delete of assignments.
    fixtures::delete_pod_now(&admin, &ns.name, "web").await.unwrap();
    eventually(|| async {
        match assignments.get_opt(&name).await? {
            None => Ok(()),
            Some(_) => Err(anyhow::anyhow!("assignment still there")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; controller log:\n{}", std::fs::read_to_string(&log).unwrap()));
    // It keeps the webhook's certificate in its Secret and publishes the authority in the chart's
    // configuration (the namespaced Role on one Secret, the ClusterRole on one configuration).
    eventually(|| async {
        let secret = secrets.get(&format!("{webhook}-cert")).await?;
        let bundle = secret.data.unwrap_or_default().remove("ca.crt").map(|b| b.0);
        let configuration = configurations.get(&webhook).await?;
        let published = configuration.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone()
            .map(|b| b.0);
        if bundle.is_some() && bundle == published {
            Ok(())
        } else {
            Err(anyhow::anyhow!("the caBundle is not published yet"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; controller log:\n{}", std::fs::read_to_string(&log).unwrap()));
    // The Secret written before the configuration existed is adopted: uninstalling removes it.
    let owners = eventually(|| async {
        let secret = secrets.get(&format!("{webhook}-cert")).await?;
        let owners: Vec<String> = secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.name)
            .collect();
        anyhow::ensure!(!owners.is_empty(), "the Secret has no owner yet");
        Ok(owners)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; controller log:\n{}", std::fs::read_to_string(&log).unwrap()));
    assert_eq!(owners, vec![webhook.clone()]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden"),
        "the controller was refused something:\n{text}"
    );
}
