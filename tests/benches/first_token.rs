//! What pre-warming saves a new pod, end to end: the time from its creation until it is served its first
//! token through the metadata address, on a cold scale set whose updates take as long as Azure's (45 s
//! by default), with and without pre-warming of its workload.
//!
//! Each mode has a node of its own as network namespaces (`tests/netns_harness`): the agent binary
//! intercepting there, the emulator's IMDS at 169.254.169.254 and its ARM on the node's loopback, and the
//! controller binary in the node's namespace against the shared kube-apiserver. The pod is a network
//! namespace with its Pod object (Running, with its address), created by the benchmark as a workload's
//! ReplicaSet would; it asks for a token at once and again as soon as it is answered anything else, so
//! the time measured is what the pod waited, not a retry interval. With pre-warming the workload's
//! identity is warmed first (one scale-set update), then the pod is created.
//!
//! Run as root: `cargo build --workspace --bins && cargo bench -p pod-identity-e2e --bench first_token
//! --profile dev`. `BENCH_LRO_MS` (45000) and `BENCH_ARM_LATENCY_MS` (100) change the delays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../netns_harness/mod.rs"]
mod harness;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::{Harness, SP_CLIENT, SP_OBJECT, SP_PASSWORD, SUBSCRIPTION, TENANT, TOKEN_URL, curl};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use pod_identity_api::{AssignmentStatus, AzureAssignedIdentity, AzureIdentityBinding, POD_LABEL};
use pod_identity_controller::prewarm::{PREWARM_ANNOTATION, PREWARM_LABEL};
use pod_identity_emulator::{FaultSpec, Service};
use pod_identity_test_support::{ControlPlane, tools};
use serde_json::json;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The controller binary in the node's network namespace, where the emulator's ARM is `127.0.0.1:443`
/// and the API server is relayed to its usual address.
struct Controller(Child);

impl Controller {
    fn start(h: &Harness, kubeconfig: &Path, prewarm: bool, dir: &Path) -> Self {
        let azure_json = dir.join("azure.json");
        std::fs::write(
            &azure_json,
            json!({"tenantId": TENANT, "subscriptionId": SUBSCRIPTION, "aadClientId": SP_CLIENT,
                   "aadClientSecret": SP_PASSWORD, "resourceGroup": "rg", "vmType": "vmss"})
            .to_string(),
        )
        .unwrap();
        h.emulator.with_state(|s| {
            s.role_assignments
                .push(pod_identity_emulator::seed::RoleAssignmentSeed {
                    principal_id: SP_OBJECT.into(),
                    scope: format!("/subscriptions/{SUBSCRIPTION}"),
                    role_definition_name: "Contributor".into(),
                })
        });
        let log = std::fs::File::create(dir.join("controller.log")).unwrap();
        let mut command = Command::new("ip");
        command
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
                "--batch-window=200ms",
                "--bind-address=127.0.0.1",
                "--http-probe-port=18080",
                "--prometheus-port=18888",
            ]);
        if prewarm {
            command.arg("--prewarm");
        }
        let child = command
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `check` holds; how long it took.
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One mode's figures.
struct Measured {
    /// Pod created → first 200, as the pod saw it.
    first_token: Duration,
    /// What the pod was answered before, with the time each answer took.
    answers: Vec<(u16, Duration)>,
    /// Scale-set writes between the pod's creation and its first token.
    writes: usize,
    /// The agent's `pod_identity_pod_first_token_seconds` (its creation time has whole seconds).
    agent_metric: f64,
}

async fn measure(prewarm: bool, lro_ms: u64, latency_ms: u64) -> Measured {
    let h = Harness::start(&[]).await;
    h.emulator.update_settings(|s| s.lro_duration_ms = lro_ms);
    h.emulator.inject(FaultSpec {
        service: Some(Service::Arm),
        latency_ms: Some(latency_ms),
        ..FaultSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::shared().await;
    let _controller = Controller::start(&h, plane.admin_kubeconfig(), prewarm, dir.path());

    h.bind("id-a", "app").await;
    let client = h.ns.client.clone();
    if prewarm {
        Api::<AzureIdentityBinding>::namespaced(client.clone(), &h.ns.name)
            .patch(
                "id-a-binding",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {PREWARM_ANNOTATION: "true"}}})),
            )
            .await
            .unwrap();
    }
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app", "namespace": h.ns.name},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "app"}}, "template": {
            "metadata": {"labels": {"app": "app", POD_LABEL: "app"}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), &h.ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    if prewarm {
        let records = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &h.ns.name);
        let warmed = until("the identity warmed", || async {
            records
                .list(&ListParams::default().labels(&format!("{PREWARM_LABEL}=true")))
                .await
                .is_ok_and(|l| {
                    l.items
                        .iter()
                        .any(|a| a.assignment_status() == AssignmentStatus::Assigned)
                })
        })
        .await;
        eprintln!("  warming the scale set took {:.1} s", warmed.as_secs_f64());
    }

    let since = h.emulator.last_seq();
    let started = Instant::now();
    let pod = h.pod("app-0", Some("app")).await;
    let mut answers = Vec::new();
    let first_token = loop {
        let asked = Instant::now();
        let (status, _) = curl(&h, &pod, TOKEN_URL, &["-H", "Metadata: true"]);
        if status == 200 {
            break started.elapsed();
        }
        answers.push((status, asked.elapsed()));
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no token: {answers:?}\n{}",
            h.agent_log_text()
        );
    };
    let writes = h
        .arm_writes(since)
        .iter()
        .filter(|r| r.path.contains("virtualMachineScaleSets"))
        .count();
    let metrics = h.metrics();
    let prefix = format!(
        "pod_identity_pod_first_token_seconds_sum{{identity=\"{}/id-a\"}} ",
        h.ns.name
    );
    let agent_metric = metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in:\n{metrics}"));
    Measured {
        first_token,
        answers,
        writes,
        agent_metric,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs every bench target once without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let lro = env_or("BENCH_LRO_MS", 45_000);
    let latency = env_or("BENCH_ARM_LATENCY_MS", 100);
    println!(
        "pod created -> first token served through the metadata address, on a cold scale set \
         (update {lro} ms, ARM latency {latency} ms)"
    );
    let mut results = Vec::new();
    for prewarm in [false, true] {
        let label = if prewarm {
            "with pre-warming"
        } else {
            "without pre-warming"
        };
        let m = measure(prewarm, lro, latency).await;
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for (status, _) in &m.answers {
            *statuses.entry(*status).or_default() += 1;
        }
        let longest = m
            .answers
            .iter()
            .map(|(_, took)| took.as_secs_f64())
            .fold(0.0, f64::max);
        println!(
            "  {label}: {:.3} s (agent's pod_identity_pod_first_token_seconds: {:.3} s), scale-set updates \
             meanwhile: {}, answers before the token: {statuses:?} (status: count), the longest {longest:.1} s",
            m.first_token.as_secs_f64(),
            m.agent_metric,
            m.writes,
        );
        results.push(m.first_token.as_secs_f64());
    }
    println!("  ratio: {:.0}x", results[0] / results[1].max(1e-6));
}
