//! What pre-warming saves a new pod: the time from its creation until its identity is usable on its
//! scale set (its `AzureAssignedIdentity` is `Assigned`, after which the node agent's first token costs
//! one token fetch), on a cold scale set whose updates take as long as Azure's (45 s by default), with
//! and without pre-warming of its workload.
//!
//! Each run has its own namespace, emulator and in-process controller against a real kube-apiserver.
//! With pre-warming the workload's identity is warmed first (that takes one scale-set update), then the
//! pod is created.
//!
//! `cargo bench -p pod-identity-controller --bench first_assignment`; `BENCH_LRO_MS` (45000) and
//! `BENCH_ARM_LATENCY_MS` (100) change the delays, `BENCH_RUNS` (1) the number of pods measured per mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity, POD_LABEL,
    fixtures::{binding_of, user_assigned_identity},
    naming::assigned_identity_name,
};
use pod_identity_azure::AzureConfig;
use pod_identity_controller::{
    ControllerConfig,
    azure::{Endpoints, connect},
    prewarm::PREWARM_ANNOTATION,
    worker::WorkerSettings,
};
use pod_identity_emulator::{Config, Emulator, FaultSpec, Service};
use pod_identity_test_support::{
    ControlPlane,
    fixtures::{self, PodTemplate},
};
use serde_json::json;

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";
const IDENTITY_CLIENT: &str = "a0000000-0000-4000-8000-000000000001";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uami() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app"
    )
}

/// Polls until `check` holds; returns how long it took.
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assigned(client: &Client, namespace: &str, name: &str) -> bool {
    Api::<AzureAssignedIdentity>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .is_some_and(|a| a.assignment_status() == AssignmentStatus::Assigned)
}

/// One measurement per pod: creation → identity usable, in a fresh cluster namespace and Azure.
async fn measure(prewarm: bool, lro_ms: u64, latency_ms: u64, runs: u64) -> Vec<Duration> {
    let seed = serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [
            {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": ["s"]}]}],
        "subscriptions": [{"id": SUB, "tenantId": TENANT, "resourceGroups": [
            {"name": "ids", "location": "westeurope", "userAssignedIdentities": [
                {"name": "app", "clientId": IDENTITY_CLIENT, "principalId": "b0000000-0000-4000-8000-000000000001"}]},
            {"name": "nodes", "location": "westeurope", "virtualMachineScaleSets": [
                {"name": "pool-web", "instances": [{"instanceId": "0"}]}]}]}],
        "roleAssignments": [{"principalId": CTL_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Contributor"}],
    }))
    .unwrap();
    let em = Emulator::start(Config::new(seed)).await.unwrap();
    em.update_settings(|s| s.lro_duration_ms = lro_ms);
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        latency_ms: Some(latency_ms),
        ..FaultSpec::default()
    });
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let client = ns.client.clone();
    fixtures::apply_crds(&client, &pod_identity_api::crds::all())
        .await
        .unwrap();
    let node = format!("{}-web-0", ns.name);
    let provider = format!(
        "azure:///subscriptions/{SUB}/resourceGroups/nodes/providers/Microsoft.Compute/virtualMachineScaleSets/pool-web/virtualMachines/0"
    );
    fixtures::create_node(&client, &node, Some(&provider))
        .await
        .unwrap();
    Api::<Node>::all(client.clone())
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"kubernetes.azure.com/agentpool": "web"}}})),
        )
        .await
        .unwrap();
    let pp = PostParams::default();
    let identity = user_assigned_identity(&ns.name, "app", IDENTITY_CLIENT).with_resource_id(&uami());
    fixtures::create(&client, &identity).await.unwrap();
    let binding = binding_of(&ns.name, "app", "app").with_annotation(PREWARM_ANNOTATION, "true");
    fixtures::create(&client, &binding).await.unwrap();
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app", "namespace": ns.name},
        "spec": {"selector": {"matchLabels": {"app": "app"}}, "template": {
            "metadata": {"labels": {"app": "app", POD_LABEL: "app"}},
            "spec": {"nodeSelector": {"kubernetes.azure.com/agentpool": "web"},
                     "containers": [{"name": "app", "image": "example.invalid/app:1"}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .create(&pp, &deployment)
        .await
        .unwrap();

    let azure = AzureConfig {
        tenant_id: TENANT.into(),
        subscription_id: SUB.into(),
        aad_client_id: CTL_CLIENT.into(),
        aad_client_secret: "s".into(),
        ..AzureConfig::default()
    };
    let compute = connect(
        &azure,
        &Endpoints {
            arm: Some(em.azure_url()),
            authority: Some(em.azure_url()),
            imds: None,
            extra_ca_pem: Some(em.ca_pem().to_owned()),
        },
    )
    .unwrap();
    let config = ControllerConfig {
        namespace: Some(ns.name.clone()),
        worker: WorkerSettings {
            batch_window: Duration::from_millis(200),
            drift_interval: Duration::from_secs(3600),
            ..WorkerSettings::default()
        },
        prewarm_linger: prewarm.then_some(Duration::from_secs(600)),
        ..ControllerConfig::default()
    };
    let controller = tokio::spawn(pod_identity_controller::run(
        config,
        client.clone(),
        Arc::new(compute),
        Vec::new(),
        std::future::pending(),
    ));
    if prewarm {
        let warmed = until("the identity warmed", || async {
            let list = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns.name)
                .list(&Default::default())
                .await;
            list.is_ok_and(|l| {
                l.items
                    .iter()
                    .any(|a| a.assignment_status() == AssignmentStatus::Assigned)
            })
        })
        .await;
        eprintln!("  warming the scale set took {:.1} s", warmed.as_secs_f64());
    }
    let mut measured = Vec::new();
    for run in 0..runs {
        let name = format!("app-{run}");
        let started = Instant::now();
        fixtures::create_pod(
            &client,
            &PodTemplate {
                namespace: ns.name.clone(),
                name: name.clone(),
                labels: [(POD_LABEL.to_owned(), "app".to_owned())].into(),
                node: Some(node.clone()),
                ip: Some(format!("10.244.0.{}", 10 + run)),
            },
        )
        .await
        .unwrap();
        let record = assigned_identity_name(&name, &ns.name, "app");
        until("the pod's identity usable", || {
            assigned(&client, &ns.name, &record)
        })
        .await;
        measured.push(started.elapsed());
    }
    controller.abort();
    measured
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lro = env_or("BENCH_LRO_MS", 45_000);
    let latency = env_or("BENCH_ARM_LATENCY_MS", 100);
    let runs = env_or("BENCH_RUNS", 1).max(1);
    pod_identity_test_support::install_crypto_provider();
    println!(
        "pod created -> identity usable on a cold scale set (update {lro} ms, ARM latency {latency} ms)"
    );
    let mut results = Vec::new();
    for prewarm in [false, true] {
        let label = if prewarm {
            "with pre-warming"
        } else {
            "without pre-warming"
        };
        let times = measure(prewarm, lro, latency, runs).await;
        let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len() as f64;
        let max = times.iter().map(Duration::as_secs_f64).fold(0.0, f64::max);
        println!(
            "  {label}: mean {mean:.3} s, max {max:.3} s over {} pod(s)",
            times.len()
        );
        results.push(mean);
    }
    println!("  ratio: {:.0}x", results[0] / results[1].max(1e-6));
}
