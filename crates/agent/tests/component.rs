//! The agent in-process against a real kube-apiserver and the emulator on loopback, without interception
//! (no root needed): pods are given loopback addresses (127.0.0.x) and the test connects from them, so the
//! agent tells callers apart by source address exactly as it does behind the DNAT rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::IpAddr, time::Duration};

use clap::Parser;
use kube::Api;
use pod_identity_agent::{Args, Parts, run};
use pod_identity_api::fixtures::{binding_of, exception, user_assigned_identity, user_assigned_identity_id};
use pod_identity_emulator::{Config, Emulator, LogFilter, Seed, Service};
use pod_identity_test_support::{ControlPlane, TestNamespace, eventually, fixtures};
use serde_json::{Value, json};

const SUBSCRIPTION: &str = "5e1d0b3c-0000-4000-8000-000000000002";
const CLIENT_A: &str = "aaaaaaaa-1111-4111-8111-111111111111";
const CLIENT_NODE: &str = "dddddddd-1111-4111-8111-111111111111";

fn uami(name: &str) -> String {
    user_assigned_identity_id(SUBSCRIPTION, name)
}

fn seed() -> Seed {
    serde_json::from_value(json!({
        "tenants": [{"id": "t1"}],
        "subscriptions": [{"id": SUBSCRIPTION, "tenantId": "t1", "resourceGroups": [{
            "name": "rg", "location": "westeurope",
            "userAssignedIdentities": [
                {"name": "id-a", "clientId": CLIENT_A, "principalId": "aaaaaaaa-2222-4222-8222-222222222222"},
                {"name": "kubelet", "clientId": CLIENT_NODE, "principalId": "dddddddd-2222-4222-8222-222222222222"},
            ],
            "virtualMachineScaleSets": [{
                "name": "pool", "vmSize": "Standard_D2s_v3",
                "identity": {"userAssignedIdentities": [uami("id-a"), uami("kubelet")]},
                "instances": [{"instanceId": "0"}],
            }],
        }]}],
    }))
    .unwrap()
}

struct Setup {
    ns: TestNamespace,
    node: String,
    emulator: Emulator,
    agent: pod_identity_agent::Agent,
}

async fn setup(mode: &str) -> Setup {
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    fixtures::apply_crds(&ns.client, &pod_identity_api::crds::all())
        .await
        .unwrap();
    let node = format!("node-{}", ns.name);
    fixtures::create_node(&ns.client, &node, None).await.unwrap();
    let emulator = Emulator::start(
        Config::new(seed())
            .with_imds(&format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0")),
    )
    .await
    .unwrap();
    let imds = emulator.addresses().imds[0].addr;
    let args = Args::try_parse_from([
        "pod-identity-agent",
        "--node",
        &node,
        "--kubeconfig",
        &plane.admin_kubeconfig().display().to_string(),
        "--operation-mode",
        mode,
        "--no-interception",
        "--metadata-ip",
        &imds.ip().to_string(),
        "--metadata-port",
        &imds.port().to_string(),
        "--assignment-wait-sec",
        "2",
    ])
    .unwrap();
    let parts = Parts::from_args(&args).await.unwrap();
    let listener = run::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let admin = run::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let agent = pod_identity_agent::start(&args, parts, vec![listener], admin, None)
        .await
        .unwrap();
    Setup {
        ns,
        node,
        emulator,
        agent,
    }
}

impl Setup {
    async fn pod(&self, name: &str, ip: &str, labels: &[(&str, &str)]) {
        fixtures::create_pod(
            &self.ns.client,
            &fixtures::PodTemplate {
                namespace: self.ns.name.clone(),
                name: name.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                node: Some(self.node.clone()),
                ip: Some(ip.into()),
            },
        )
        .await
        .unwrap();
    }

    async fn bind(&self, selector: &str) {
        let ns = &self.ns.name;
        let identity = user_assigned_identity(ns, "id-a", CLIENT_A).with_resource_id(&uami("id-a"));
        fixtures::create(&self.ns.client, &identity).await.unwrap();
        fixtures::create(&self.ns.client, &binding_of(ns, "id-a", selector))
            .await
            .unwrap();
    }

    /// A token request from `from` (a loopback address the pod owns); (status, body).
    async fn token(&self, from: &str, query: &str) -> (u16, Value) {
        let client = reqwest::Client::builder()
            .local_address(from.parse::<IpAddr>().unwrap())
            .no_proxy()
            .build()
            .unwrap();
        let response = client
            .get(format!(
                "http://{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net{query}",
                self.agent.imds_addr
            ))
            .header("Metadata", "true")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn admin(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.agent.admin_addr))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

#[tokio::test]
async fn managed_mode_serves_bound_pods_and_excepted_pods_get_the_nodes_identity() {
    pod_identity_agent::azure::ensure_crypto_provider();
    let s = setup("managed").await;
    s.bind("web").await;
    s.pod("web", "127.0.0.2", &[("aadpodidbinding", "web")]).await;
    s.pod("system", "127.0.0.3", &[("app", "node-agent")]).await;
    let exception = exception(&s.ns.name, "node-agents", &[("app", "node-agent")]);
    fixtures::create(&s.ns.client, &exception).await.unwrap();
    eventually(|| async {
        let (status, body) = s.admin("/readyz").await;
        if status == 200 { Ok(()) } else { Err(body) }
    })
    .await
    .unwrap();

    let (status, body) = eventually(|| async {
        let answer = s.token("127.0.0.2", "").await;
        if answer.0 == 200 { Ok(answer) } else { Err(answer) }
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body["client_id"], CLIENT_A,
        "no assignment is needed in managed mode"
    );

    // The excepted pod asks IMDS as the node would, here for the kubelet identity by client ID.
    let (status, body) = s.token("127.0.0.3", &format!("&client_id={CLIENT_NODE}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_id"], CLIENT_NODE);
    // A pod that is neither bound nor excepted asking for the same is refused.
    s.pod("other", "127.0.0.4", &[]).await;
    let (status, _) = eventually(|| async {
        let answer = s.token("127.0.0.4", &format!("&client_id={CLIENT_NODE}")).await;
        if answer.0 == 403 { Ok(answer) } else { Err(answer) }
    })
    .await
    .unwrap();
    assert_eq!(status, 403);

    let minted: Vec<_> = s
        .emulator
        .requests(&LogFilter {
            service: Some(Service::Imds),
            status: Some(200),
            ..LogFilter::default()
        })
        .into_iter()
        .filter_map(|r| r.identity)
        .collect();
    assert_eq!(minted, vec![CLIENT_A.to_owned(), CLIENT_NODE.to_owned()]);

    let (status, metrics) = s.admin("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("pod_identity_token_decisions_total{result=\"excepted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pod_identity_watched_objects{kind=\"pod\"} 3"),
        "{metrics}"
    );
    s.agent.shutdown().await;
}

#[tokio::test]
async fn standard_mode_waits_for_the_assignment_then_answers_503_and_emits_an_event() {
    pod_identity_agent::azure::ensure_crypto_provider();
    let s = setup("standard").await;
    s.bind("web").await;
    s.pod("web", "127.0.0.5", &[("aadpodidbinding", "web")]).await;
    eventually(|| async {
        let (status, body) = s.admin("/readyz").await;
        if status == 200 { Ok(()) } else { Err(body) }
    })
    .await
    .unwrap();
    // No controller runs here: the assignment never comes, so the bounded wait ends in 503.
    let started = tokio::time::Instant::now();
    let (status, body) = s.token("127.0.0.5", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the request waited for the bound"
    );
    assert!(
        s.emulator.requests(&LogFilter::default()).is_empty(),
        "nothing went upstream"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.ns.client.clone(), &s.ns.name);
    let reasons = eventually(|| async {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        if reasons.is_empty() {
            Err("no Event yet")
        } else {
            Ok(reasons)
        }
    })
    .await
    .unwrap();
    assert_eq!(reasons, vec!["IdentityNotAssigned".to_owned()]);
    s.agent.shutdown().await;
}
