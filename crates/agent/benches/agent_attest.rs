//! What attesting callers (`--attest-callers`) costs per token request, beside the same agent without it:
//! requests from pod network namespaces through the real interception rules, and from the node's own
//! namespace (a process in no pod, passed through). Pod namespaces get a process in a cgroup named after
//! their pod's UID, as the kubelet would make it, so that attestation finds them.
//!
//! Reports, with and without attestation: cached-token requests/s and p50/p99 on keep-alive connections
//! (attestation runs once per connection, then once per request only for the address check, which a
//! connection remembers) and on a new connection per request (every lookup each time), and the latency of
//! a node process's `/metadata/instance` request (intercepted and attested with it, straight to IMDS
//! without). Needs root (network namespaces, iptables, cgroups) and the control plane of the tests. Run with
//! `cargo bench -p pod-identity-agent --bench agent_attest`; figures are for this machine only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/netns_harness/mod.rs"]
mod netns_harness;
mod support;

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use netns_harness::{Harness, in_netns};
use support::micros;

const LOAD_PODS: usize = 4;
const RUN: Duration = Duration::from_secs(4);
const NEW_CONNECTIONS: usize = 300;
const INSTANCE_URL: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

fn main() {
    // `cargo bench` passes `--bench`; anything else (a test run of bench targets) only builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    pod_identity_test_support::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

/// A process in a pod's network namespace and in a cgroup named as the kubelet names the pod's.
struct PodProcess {
    child: Child,
    cgroup: PathBuf,
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The `pids` hierarchy of cgroup v1, or the unified one.
fn cgroup_root() -> PathBuf {
    let v1 = PathBuf::from("/sys/fs/cgroup/pids");
    if v1.is_dir() {
        v1
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

fn pod_process(netns: &str, uid: &str) -> PodProcess {
    let cgroup = cgroup_root().join(format!("kubepods/besteffort/pod{uid}"));
    std::fs::create_dir_all(&cgroup).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "sleep", "3600"])
        .spawn()
        .unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
    PodProcess { child, cgroup }
}

struct Figures {
    keep_alive: Vec<(usize, f64, Duration, Duration, usize)>,
    new_connection: (Duration, Duration, usize),
    node_instance: (Duration, Duration, usize),
}

async fn bench() {
    let binary = env!("CARGO_BIN_EXE_pod-identity-agent");
    let without = run(binary, false).await;
    let with = run(binary, true).await;
    println!("agent token path with and without caller attestation, load from {LOAD_PODS} pod namespaces\n");
    println!("| connections | concurrency | without: req/s, p50, p99 | with: req/s, p50, p99 | p50 ratio |");
    println!("|---|---|---|---|---|");
    for (a, b) in without.keep_alive.iter().zip(&with.keep_alive) {
        println!(
            "| keep-alive | {} | {:.0}, {}, {} | {:.0}, {}, {} | {:.2}x |",
            a.0,
            a.1,
            micros(a.2),
            micros(a.3),
            b.1,
            micros(b.2),
            micros(b.3),
            b.2.as_secs_f64() / a.2.as_secs_f64().max(1e-9)
        );
    }
    let (a, b) = (without.new_connection, with.new_connection);
    println!(
        "| new per request | 1 | {}, {} | {}, {} | {:.2}x |",
        micros(a.0),
        micros(a.1),
        micros(b.0),
        micros(b.1),
        b.0.as_secs_f64() / a.0.as_secs_f64().max(1e-9)
    );
    let (a, b) = (without.node_instance, with.node_instance);
    println!(
        "\nnode process, /metadata/instance on a new connection (p50, p99): straight to IMDS {}, {}; \
         intercepted, attested and passed through {}, {} ({:.2}x); errors {} / {}",
        micros(a.0),
        micros(a.1),
        micros(b.0),
        micros(b.1),
        b.0.as_secs_f64() / a.0.as_secs_f64().max(1e-9),
        a.2,
        b.2
    );
}

async fn run(binary: &str, attest: bool) -> Figures {
    let mut args = vec!["--log-level", "warn", "--block-instance-metadata=false"];
    if attest {
        args.push("--attest-callers");
    }
    let h = Harness::start_with_binary(binary, &args).await;
    h.bind("id-a", "web").await;
    let pods_api = kube::Api::<Pod>::namespaced(h.ns.client.clone(), &h.ns.name);
    let mut load_pods = Vec::new();
    let mut processes = Vec::new();
    for i in 0..LOAD_PODS {
        let name = format!("load-{i}");
        let pod = h.pod(&name, Some("web")).await;
        h.assigned(&pod, "id-a", "Assigned").await;
        let uid = pods_api.get(&name).await.unwrap().metadata.uid.unwrap();
        processes.push(pod_process(&pod.netns, &uid));
        load_pods.push(pod);
    }
    for pod in &load_pods {
        let (status, body) =
            netns_harness::curl(&h, pod, netns_harness::TOKEN_URL, &["-H", "Metadata: true"]);
        assert_eq!(status, 200, "{body}");
    }
    let mut keep_alive = Vec::new();
    for concurrency in [1usize, 16] {
        let (rps, p50, p99, errors) = support::cached_load(&load_pods, concurrency, RUN).await;
        keep_alive.push((concurrency, rps, p50, p99, errors));
    }
    let new_connection = samples(
        load_pods[0].netns.clone(),
        netns_harness::TOKEN_URL,
        NEW_CONNECTIONS,
    )
    .await;
    let node_instance = samples(h.node_netns.clone(), INSTANCE_URL, NEW_CONNECTIONS).await;
    h.stop_agent();
    drop(processes);
    Figures {
        keep_alive,
        new_connection,
        node_instance,
    }
}

fn percentiles(mut all: Vec<Duration>) -> (Duration, Duration) {
    all.sort();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (at(0.5), at(0.99))
}

/// `count` requests for `url` from `netns`, each on a new connection: p50, p99 and errors.
async fn samples(netns: String, url: &'static str, count: usize) -> (Duration, Duration, usize) {
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                let mut latencies = Vec::new();
                let mut errors = 0;
                for _ in 0..count {
                    let started = Instant::now();
                    match client.get(url).header("Metadata", "true").send().await {
                        Ok(r) if r.status().as_u16() == 200 => latencies.push(started.elapsed()),
                        _ => errors += 1,
                    }
                }
                let (p50, p99) = percentiles(latencies);
                (p50, p99, errors)
            })
        })
    })
    .await
    .unwrap()
}
