//! How fast the controller brings a cluster to its desired state, and what that costs.
//!
//! 2,000 pods on 50 nodes in 5 scale sets, bound to 100 identities, created as a burst against a real
//! kube-apiserver, with the emulator as Azure (every ARM request delayed, every scale-set update a
//! long-running operation, Azure's throttling limits on). The controller runs as its own process (the
//! release binary), so its CPU time and memory are its own. Reports: time until every assignment is
//! `Assigned`, ARM reads and writes per scale set, the controller's CPU time and resident memory; then
//! 18,000 more pods carrying the binding label (20,000 watched) and the memory after that.
//!
//! `cargo bench -p pod-identity-controller --bench converge`; `BENCH_PODS`, `BENCH_WATCHED`,
//! `BENCH_ARM_LATENCY_MS` and `BENCH_LRO_MS` change the sizes and delays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use pod_identity_api::{
    AssignmentStatus, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, POD_LABEL,
};
use pod_identity_emulator::{Config, Emulator, FaultSpec, LogFilter, Service};
use pod_identity_test_support::{
    ControlPlane,
    fixtures::{self, PodTemplate},
};
use serde_json::json;

const TENANT: &str = "11111111-1111-4111-8111-111111111111";
const SUB: &str = "22222222-2222-4222-8222-222222222222";
const CTL_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const CTL_OBJECT: &str = "c0000000-0000-4000-8000-0000000000f1";
const CTL_SECRET: &str = "controller-secret";
const SCALE_SETS: usize = 5;
const NODES_PER_SET: usize = 10;
const IDENTITIES: usize = 100;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uami(n: usize) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-ids/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{n:03}"
    )
}

fn client_of(n: usize) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

fn scale_set(s: usize) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg-nodes/providers/Microsoft.Compute/virtualMachineScaleSets/pool-{s}"
    )
}

/// CPU seconds (user + system) and resident memory (current and peak, MiB) of a process.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (ticks / 100.0, kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods = env_or("BENCH_PODS", 2000);
    let watched = env_or("BENCH_WATCHED", 20_000);
    let latency = env_or("BENCH_ARM_LATENCY_MS", 100) as u64;
    let lro = env_or("BENCH_LRO_MS", 2000) as u64;
    pod_identity_test_support::install_crypto_provider();

    // Azure: 5 scale sets of 10 instances, 100 identities, a controller allowed to assign them.
    let identities: Vec<_> = (0..IDENTITIES)
        .map(|n| json!({"name": format!("id-{n:03}"), "clientId": client_of(n), "principalId": client_of(n + 1000)}))
        .collect();
    let sets: Vec<_> = (0..SCALE_SETS)
        .map(|s| {
            json!({"name": format!("pool-{s}"), "identity": {"systemAssigned": {}},
                   "instances": (0..NODES_PER_SET).map(|i| json!({"instanceId": i.to_string()})).collect::<Vec<_>>()})
        })
        .collect();
    let seed = serde_json::from_value(json!({
        "tenants": [{"id": TENANT, "applications": [
            {"displayName": "controller", "clientId": CTL_CLIENT, "objectId": CTL_OBJECT, "secrets": [CTL_SECRET]}]}],
        "subscriptions": [{"id": SUB, "tenantId": TENANT, "resourceGroups": [
            {"name": "rg-ids", "location": "westeurope", "userAssignedIdentities": identities},
            {"name": "rg-nodes", "location": "westeurope", "virtualMachineScaleSets": sets}]}],
        "roleAssignments": [{"principalId": CTL_OBJECT, "scope": format!("/subscriptions/{SUB}"), "roleDefinitionName": "Contributor"}],
    }))
    .unwrap();
    let mut config = Config::new(seed);
    config.log_capacity = 1_000_000;
    let em = Emulator::start(config).await.unwrap();
    em.update_settings(|s| s.lro_duration_ms = lro);
    em.inject(FaultSpec {
        service: Some(Service::Arm),
        latency_ms: Some(latency),
        ..FaultSpec::default()
    });

    // Kubernetes: nodes, identities, bindings.
    let plane = ControlPlane::shared().await;
    let ns = plane.namespace().await.unwrap();
    let client = ns.client.clone();
    fixtures::apply_crds(&client, &pod_identity_api::crds::all())
        .await
        .unwrap();
    let node = |s: usize, i: usize| format!("{}-pool{s}-{i}", ns.name);
    for s in 0..SCALE_SETS {
        for i in 0..NODES_PER_SET {
            let provider = format!("azure://{}/virtualMachines/{i}", scale_set(s));
            fixtures::create_node(&client, &node(s, i), Some(&provider))
                .await
                .unwrap();
        }
    }
    for n in 0..IDENTITIES {
        let mut identity = AzureIdentity::new(
            &format!("id-{n:03}"),
            AzureIdentitySpec {
                type_: Some(0),
                resource_id: Some(uami(n)),
                client_id: Some(client_of(n)),
                ..AzureIdentitySpec::default()
            },
        );
        identity.metadata.namespace = Some(ns.name.clone());
        Api::<AzureIdentity>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &identity)
            .await
            .unwrap();
        let mut binding = AzureIdentityBinding::new(
            &format!("id-{n:03}"),
            AzureIdentityBindingSpec {
                azure_identity: Some(format!("id-{n:03}")),
                selector: Some(format!("sel-{n:03}")),
                weight: None,
            },
        );
        binding.metadata.namespace = Some(ns.name.clone());
        Api::<AzureIdentityBinding>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
    }

    // The controller, as a process.
    let dir = tempfile::tempdir().unwrap();
    let azure_json = dir.path().join("azure.json");
    std::fs::write(
        &azure_json,
        json!({"cloud": "AzurePublicCloud", "tenantId": TENANT, "subscriptionId": SUB,
               "aadClientId": CTL_CLIENT, "aadClientSecret": CTL_SECRET})
        .to_string(),
    )
    .unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, em.ca_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pod-identity-controller"))
        .args([
            &format!("--kubeconfig={}", plane.admin_kubeconfig().display()),
            &format!("--cloudconfig={}", azure_json.display()),
            &format!("--arm-endpoint={}", em.azure_url()),
            &format!("--authority-host={}", em.azure_url()),
            &format!("--azure-ca-file={}", ca.display()),
            &format!("--namespace={}", ns.name),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            &format!("--http-probe-port={port}"),
            "--prometheus-port=0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu_idle, rss_idle, _) = usage(pid);
    em.clear_log();

    // The burst.
    let started = Instant::now();
    let templates: Vec<PodTemplate> = (0..pods)
        .map(|i| {
            let n = i % (SCALE_SETS * NODES_PER_SET);
            PodTemplate {
                namespace: ns.name.clone(),
                name: format!("pod-{i:05}"),
                labels: BTreeMap::from([(POD_LABEL.to_owned(), format!("sel-{:03}", i % IDENTITIES))]),
                node: Some(node(n / NODES_PER_SET, n % NODES_PER_SET)),
                ip: Some(format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)),
            }
        })
        .collect();
    create_all(&client, templates).await;
    let created_in = started.elapsed();
    let aais = Api::<AzureAssignedIdentity>::namespaced(client.clone(), &ns.name);
    let mut cpu_peak_rss = 0.0f64;
    loop {
        let list = aais.list(&ListParams::default()).await.unwrap();
        let assigned = list
            .items
            .iter()
            .filter(|a| a.assignment_status() == AssignmentStatus::Assigned)
            .count();
        cpu_peak_rss = cpu_peak_rss.max(usage(pid).1);
        if assigned == pods {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "no convergence: {assigned}/{pods}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    let (cpu_done, rss_done, hwm_done) = usage(pid);

    let requests = em.requests(&LogFilter {
        service: Some(Service::Arm),
        ..LogFilter::default()
    });
    let on_sets = |method: &str| {
        requests
            .iter()
            .filter(|r| r.method == method && r.path.to_lowercase().contains("virtualmachinescalesets"))
            .count()
    };
    let polls = requests
        .iter()
        .filter(|r| r.path.contains("/operations/"))
        .count();
    let throttled = requests.iter().filter(|r| r.status == 429).count();
    let mut per_set = Vec::new();
    for s in 0..SCALE_SETS {
        let path = scale_set(s).to_lowercase();
        let count = |m: &str| {
            requests
                .iter()
                .filter(|r| r.method == m && r.path.to_lowercase() == path)
                .count()
        };
        let held = em
            .snapshot()
            .subscriptions
            .iter()
            .flat_map(|sub| &sub.resource_groups)
            .flat_map(|g| &g.virtual_machine_scale_sets)
            .find(|ss| ss.name == format!("pool-{s}"))
            .map_or(0, |ss| ss.identity.user_assigned_identities.len());
        per_set.push((format!("pool-{s}"), count("GET"), count("PATCH"), held));
    }

    println!(
        "== converge: {pods} pods, {IDENTITIES} identities, {} nodes in {SCALE_SETS} scale sets",
        SCALE_SETS * NODES_PER_SET
    );
    println!("ARM latency {latency} ms per request, scale-set update {lro} ms, Azure throttling limits on");
    println!("pods created in          {:>8.2} s", created_in.as_secs_f64());
    println!(
        "all Assigned after       {:>8.2} s (from the first pod created)",
        converged.as_secs_f64()
    );
    println!("ARM GET  on scale sets   {:>8}", on_sets("GET"));
    println!("ARM PATCH on scale sets  {:>8}", on_sets("PATCH"));
    println!("ARM operation polls      {polls:>8}");
    println!("ARM 429 answers          {throttled:>8}");
    for (name, gets, patches, held) in &per_set {
        println!("  {name}: {gets} GET, {patches} PATCH, {held} identities held");
    }
    println!(
        "pods per PATCH           {:>8.1}",
        pods as f64 / on_sets("PATCH").max(1) as f64
    );
    println!(
        "controller CPU           {:>8.2} s (burst), {:.2} s at idle start",
        cpu_done - cpu_idle,
        cpu_idle
    );
    println!(
        "controller RSS           {:>8.1} MiB idle, {:.1} MiB after, {:.1} MiB peak",
        rss_idle,
        rss_done,
        hwm_done.max(cpu_peak_rss)
    );

    // Many more pods carrying the label (watched) but bound to nothing.
    if watched > pods {
        let extra: Vec<PodTemplate> = (pods..watched)
            .map(|i| {
                let n = i % (SCALE_SETS * NODES_PER_SET);
                PodTemplate {
                    namespace: ns.name.clone(),
                    name: format!("pod-{i:05}"),
                    labels: BTreeMap::from([(POD_LABEL.to_owned(), "unbound".to_owned())]),
                    node: Some(node(n / NODES_PER_SET, n % NODES_PER_SET)),
                    ip: None,
                }
            })
            .collect();
        let cpu_before = usage(pid).0;
        let t = Instant::now();
        create_all(&client, extra).await;
        let create_time = t.elapsed();
        // Let the watch and a few planning passes catch up.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (cpu_after, rss, hwm) = usage(pid);
        println!(
            "== watched: {watched} pods with the binding label ({} bound)",
            pods
        );
        println!("created in               {:>8.2} s", create_time.as_secs_f64());
        println!(
            "controller CPU           {:>8.2} s while they arrived",
            cpu_after - cpu_before
        );
        println!("controller RSS           {:>8.1} MiB ({:.1} MiB peak)", rss, hwm);
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn create_all(client: &kube::Client, templates: Vec<PodTemplate>) {
    stream::iter(templates)
        .map(|t| {
            let client = client.clone();
            async move { fixtures::create_pod(&client, &t).await.unwrap() }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}
