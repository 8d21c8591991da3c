//! Token-path performance of the agent as pods see it: requests from pod network namespaces through the
//! real interception rules to the agent process, on a node with 110 bound pods.
//!
//! Reports cached-token throughput and p50/p99 latency at concurrency 1, 16 and 64, the overhead of a
//! cache miss over calling IMDS directly, first-token and cached-token latency of both backends (an
//! identity on the node's scale set, served from IMDS; a federated identity, served by exchanging its
//! subject's token with Entra), and the agent's resident memory. Needs root (network
//! namespaces, iptables) and the control plane of the tests. Run with
//! `cargo bench -p pod-identity-agent --bench agent_tokens` (`POD_IDENTITY_BENCH_AGENT_ARGS` adds agent
//! flags); load generator and agent share the machine,
//! so figures are for this machine only and nothing here asserts a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/netns_harness/mod.rs"]
mod netns_harness;
mod support;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use netns_harness::{CLIENT_A, CLIENT_B, Harness, TENANT, identity_resource_id, in_netns};
use pod_identity_test_support::{fixtures, netns::PodNet};
use support::{cached_load, micros};

const LOAD_PODS: usize = 4;
const NODE_PODS: usize = 110;
const RUN: Duration = Duration::from_secs(4);
const COLD_SAMPLES: usize = 40;
/// Federated identities (each with its own subject, all of the user-assigned identity id-b), one pod each.
const FEDERATED: usize = 5;

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

async fn bench() {
    let binary = env!("CARGO_BIN_EXE_pod-identity-agent");
    let subjects = pod_identity_test_support::ControlPlane::shared()
        .await
        .namespace()
        .await
        .unwrap()
        .name;
    // More agent flags, e.g. `POD_IDENTITY_BENCH_AGENT_ARGS="--audit-log /tmp/audit.log"` to measure
    // the audit stream's cost.
    let extra = std::env::var("POD_IDENTITY_BENCH_AGENT_ARGS").unwrap_or_default();
    let mut args = vec!["--log-level", "warn", "--federation-namespace", &subjects];
    args.extend(extra.split_whitespace());
    let h = Harness::start_with_binary(binary, &args).await;
    let resources: Vec<String> = (0..COLD_SAMPLES * 2)
        .map(|i| format!("https://bench-{i}.example.com"))
        .collect();
    h.emulator
        .update_settings(|s| s.extra_resources = resources.clone());

    h.bind("id-a", "web").await;
    let mut load_pods = Vec::new();
    for i in 0..LOAD_PODS {
        let pod = h.pod(&format!("load-{i}"), Some("web")).await;
        h.assigned(&pod, "id-a", "Assigned").await;
        load_pods.push(pod);
    }
    for i in LOAD_PODS..NODE_PODS {
        let ip = Ipv4Addr::new(10, 245, (i / 200) as u8, (i % 200 + 2) as u8);
        let name = format!("idle-{i}");
        fixtures::create_pod(
            &h.ns.client,
            &fixtures::PodTemplate {
                namespace: h.ns.name.clone(),
                name: name.clone(),
                labels: [("aadpodidbinding".to_owned(), "web".to_owned())].into(),
                node: Some(h.node_name.clone()),
                ip: Some(ip.to_string()),
            },
        )
        .await
        .unwrap();
        let fake = PodNet {
            netns: String::new(),
            ip,
            gateway: ip,
        };
        h.assigned(&fake, "id-a", "Assigned").await;
    }
    // Warm the cache (and the watches) from every load pod.
    for pod in &load_pods {
        assert_eq!(
            netns_harness::curl(&h, pod, netns_harness::TOKEN_URL, &["-H", "Metadata: true"]).0,
            200
        );
    }

    println!("agent token path, {NODE_PODS} pods on the node, load from {LOAD_PODS} pod namespaces\n");
    println!("| concurrency | requests/s | p50 | p99 | errors |");
    println!("|---|---|---|---|---|");
    for concurrency in [1usize, 16, 64] {
        let (rps, p50, p99, errors) = cached_load(&load_pods, concurrency, RUN).await;
        println!(
            "| {concurrency} | {rps:.0} | {} | {} | {errors} |",
            micros(p50),
            micros(p99)
        );
    }

    let (through_agent, direct) = cold_misses(&h, &load_pods[0], &resources).await;
    println!("\ncache miss (new resource each time, {COLD_SAMPLES} samples, medians):");
    println!("- through the agent from a pod: {}", micros(through_agent));
    println!("- IMDS directly from the node: {}", micros(direct));
    println!(
        "- overhead of the agent on a miss: {} ({:.2}x)",
        micros(through_agent.saturating_sub(direct)),
        through_agent.as_secs_f64() / direct.as_secs_f64().max(1e-9)
    );

    let node_cached = cached_load(&load_pods[..1], 1, RUN).await;
    // The node backend's first tokens, on new connections as the federated ones are measured.
    let node_firsts: Vec<String> = (0..FEDERATED)
        .map(|i| format!("https://node-first-{i}.example.com"))
        .collect();
    h.emulator
        .update_settings(|s| s.extra_resources.extend(node_firsts.iter().cloned()));
    let mut node_first = Vec::new();
    for resource in &node_firsts {
        let url = format!(
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
        );
        node_first.push(timed_get(&load_pods[0].netns, &url).await);
    }
    node_first.sort();
    let node_first = node_first[node_first.len() / 2];
    let federated = federated_backend(&h, &subjects, &resources[..COLD_SAMPLES]).await;
    println!(
        "\nboth backends, one client (first token: an identity's first request, nothing cached; \
         miss: a new resource; cached: keep-alive requests for {} s):",
        RUN.as_secs()
    );
    println!("| backend | first token (median) | cache miss (median) | cached p50 | cached p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| node (IMDS) | {} | {} | {} | {} |",
        micros(node_first),
        micros(through_agent),
        micros(node_cached.1),
        micros(node_cached.2)
    );
    println!(
        "| federated (TokenRequest + Entra) | {} | {} | {} | {} |",
        micros(federated.first),
        micros(federated.miss),
        micros(federated.cached_p50),
        micros(federated.cached_p99)
    );
    println!(
        "- federated first token / node first token: {:.2}x; cached: {:.2}x (p50)",
        federated.first.as_secs_f64() / node_first.as_secs_f64().max(1e-9),
        federated.cached_p50.as_secs_f64() / node_cached.1.as_secs_f64().max(1e-9)
    );
    println!(
        "- the federated first token includes one TokenRequest (mean {}) and one exchange with Entra (mean {}, \
         {} in all)",
        micros(federated.token_request_mean),
        micros(federated.entra_mean),
        federated.entra_calls
    );

    let rss = std::fs::read_to_string(format!("/proc/{}/status", h.agent_pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
        .unwrap();
    println!("\nagent RSS with {NODE_PODS} pods after the runs: {rss}");
    h.stop_agent();
}

/// Median latency of a first request for a new resource through the agent, and of the same call made
/// straight to IMDS from the node namespace.
async fn cold_misses(h: &Harness, pod: &PodNet, resources: &[String]) -> (Duration, Duration) {
    let (agent_resources, direct_resources) = resources.split_at(COLD_SAMPLES);
    let measure = |netns: String, urls: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            in_netns(&netns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let client = reqwest::Client::builder().no_proxy().build().unwrap();
                    let mut samples = Vec::new();
                    for url in urls {
                        let started = Instant::now();
                        let response = client.get(&url).header("Metadata", "true").send().await.unwrap();
                        assert_eq!(response.status().as_u16(), 200, "{url}");
                        samples.push(started.elapsed());
                    }
                    samples.sort();
                    samples[samples.len() / 2]
                })
            })
        })
    };
    let url = |resource: &str, client: bool| {
        let mut url = format!(
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
        );
        if client {
            url.push_str(&format!("&client_id={CLIENT_A}"));
        }
        url
    };
    let through_agent = measure(
        pod.netns.clone(),
        agent_resources.iter().map(|r| url(r, false)).collect(),
    )
    .await
    .unwrap();
    let direct = measure(
        h.node_netns.clone(),
        direct_resources.iter().map(|r| url(r, true)).collect(),
    )
    .await
    .unwrap();
    (through_agent, direct)
}

/// What the federated backend measured.
struct Federated {
    first: Duration,
    miss: Duration,
    cached_p50: Duration,
    cached_p99: Duration,
    token_request_mean: Duration,
    entra_mean: Duration,
    entra_calls: u64,
}

/// [`FEDERATED`] federated identities of id-b, each with its subject and federated credential and one bound
/// pod: the first request of each pod (its identity's first token: a TokenRequest and an exchange), then
/// misses for new resources and cached requests from the first pod.
async fn federated_backend(h: &Harness, subjects: &str, resources: &[String]) -> Federated {
    use pod_identity_api::{federation::TOKEN_EXCHANGE_AUDIENCE, fixtures::federated_identity};
    h.trust_the_cluster_issuer().await;
    let issuer = h.issuer().await;
    // Resources nobody asked for yet, which the emulator's Entra knows.
    let firsts: Vec<String> = (0..FEDERATED)
        .map(|i| format!("https://first-{i}.example.com"))
        .collect();
    let misses: Vec<String> = resources.iter().map(|r| format!("{r}-fed")).collect();
    h.emulator.update_settings(|s| {
        s.extra_resources.extend(firsts.iter().cloned());
        s.extra_resources.extend(misses.iter().cloned());
    });
    let mut credentials = Vec::new();
    let mut pods = Vec::new();
    for i in 0..FEDERATED {
        let name = format!("fed-{i}");
        let identity = federated_identity(&h.ns.name, &name, CLIENT_B)
            .with_resource_id(&identity_resource_id("id-b"))
            .with_tenant_id(TENANT);
        fixtures::create(&h.ns.client, &identity).await.unwrap();
        h.bind(&name, &name).await;
        credentials.push((format!("kube-{i}"), h.create_subject(subjects, &name).await));
        pods.push(h.pod(&format!("fed-pod-{i}"), Some(&name)).await);
    }
    let seeds: Vec<(&str, &str, &str, &str)> = credentials
        .iter()
        .map(|(name, subject)| {
            (
                name.as_str(),
                issuer.as_str(),
                subject.as_str(),
                TOKEN_EXCHANGE_AUDIENCE,
            )
        })
        .collect();
    h.set_federated_credentials("id-b", &seeds);
    // Until the agent's watches have the pods and their identities, a request naming an identity the pod
    // does not have waits or is refused for another reason; once they do, it is refused at once without
    // any upstream call, and nothing is cached yet.
    let unknown = "00000000-0000-4000-8000-000000000000";
    for pod in &pods {
        pod_identity_test_support::eventually(|| async {
            let url = format!(
                "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://warmup.example.com&client_id={unknown}"
            );
            match netns_harness::curl(h, pod, &url, &["-H", "Metadata: true"]) {
                (403, body) if body.contains("is not an identity of pod") => Ok(()),
                (status, body) => Err(format!("{status}: {body}")),
            }
        })
        .await
        .unwrap();
    }
    // Each identity's first token: a TokenRequest for its subject and an exchange with Entra.
    let mut first_latencies = Vec::new();
    for (pod, resource) in pods.iter().zip(&firsts) {
        let url = format!(
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
        );
        first_latencies.push(timed_get(&pod.netns, &url).await);
    }
    first_latencies.sort();
    let miss = {
        let netns = pods[0].netns.clone();
        let urls: Vec<String> = misses
            .iter()
            .map(|r| format!("http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource={r}"))
            .collect();
        tokio::task::spawn_blocking(move || {
            in_netns(&netns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let client = reqwest::Client::builder().no_proxy().build().unwrap();
                    let mut samples = Vec::new();
                    for url in urls {
                        let started = Instant::now();
                        let response = client.get(&url).header("Metadata", "true").send().await.unwrap();
                        assert_eq!(response.status().as_u16(), 200, "{url}");
                        samples.push(started.elapsed());
                    }
                    samples.sort();
                    samples[samples.len() / 2]
                })
            })
        })
        .await
        .unwrap()
    };
    let (_, cached_p50, cached_p99, errors) = cached_load(&pods[..1], 1, RUN).await;
    assert_eq!(errors, 0);
    let metrics = h.metrics();
    let mean = |upstream: &str| -> (Duration, u64) {
        let value = |suffix: &str| -> f64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "pod_identity_upstream_duration_seconds_{suffix}{{upstream=\"{upstream}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let (sum, count) = (value("sum"), value("count"));
        (Duration::from_secs_f64(sum / count.max(1.0)), count as u64)
    };
    let (token_request_mean, _) = mean("kubernetes");
    let (entra_mean, entra_calls) = mean("entra");
    Federated {
        first: first_latencies[first_latencies.len() / 2],
        miss,
        cached_p50,
        cached_p99,
        token_request_mean,
        entra_mean,
        entra_calls,
    }
}

/// The time of one token request from a pod namespace on a new connection, as an SDK's first request.
async fn timed_get(netns: &str, url: &str) -> Duration {
    let (netns, url) = (netns.to_owned(), url.to_owned());
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let started = Instant::now();
                let response = client.get(&url).header("Metadata", "true").send().await.unwrap();
                let elapsed = started.elapsed();
                assert_eq!(response.status().as_u16(), 200, "{url}");
                elapsed
            })
        })
    })
    .await
    .unwrap()
}
