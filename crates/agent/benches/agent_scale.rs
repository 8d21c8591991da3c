//! Whether the agent's token path costs more on a bigger cluster: cached-token requests from pod network
//! namespaces through the real interception rules, with 100 and with 10,000 bindings and identities in the
//! agent's view, beside a bare HTTP handler that answers the same body from the same address (the floor:
//! what the HTTP exchange alone costs on this machine), and that handler again behind the agent's own
//! connection layer (what the limits every pod is held to cost, without the token path).
//!
//! Reports, per configuration and concurrency: requests/s, p50 and p99, and the serving process's CPU time
//! per request (user + system, from `/proc/<pid>/stat`, over the whole run); then ours / floor. The
//! bindings and identities of the scale run are real objects in the apiserver, each with a selector of its
//! own, in the namespace of the load pods, so that the agent's index holds them all. Needs root
//! (network namespaces, iptables) and the control plane of the tests. Run with
//! `cargo bench -p pod-identity-agent --bench agent_scale`; `BENCH_BINDINGS` (`100,10000`) changes the
//! sizes, `BENCH_ROUNDS` (3) the rounds each figure is the median of. Figures are for this machine only,
//! and nothing here asserts a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/netns_harness/mod.rs"]
mod netns_harness;
mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::{StreamExt, stream};
use netns_harness::Harness;
use pod_identity_api::fixtures::{binding_of, user_assigned_identity};
use pod_identity_test_support::{fixtures, netns::PodNet};
use support::{cached_load, micros};

const LOAD_PODS: usize = 4;
const RUN: Duration = Duration::from_secs(4);
const CONCURRENCY: [usize; 2] = [1, 16];
/// Where the agent's rules send intercepted requests ([`pod_identity_agent::redirect`]).
const REDIRECT: &str = "169.254.79.1:2579";
/// Set in the environment of this program run as the floor's bare handler: the body it answers.
const FLOOR_BODY: &str = "POD_IDENTITY_BENCH_FLOOR_BODY";
/// Set (to anything) beside [`FLOOR_BODY`]: the handler is served through the agent's own connection
/// layer ([`pod_identity_agent::connections::serve`], with its default limits) instead of bare hyper.
const FLOOR_WITH_LIMITS: &str = "POD_IDENTITY_BENCH_FLOOR_WITH_LIMITS";

fn main() {
    if let Ok(body) = std::env::var(FLOOR_BODY) {
        if std::env::var_os(FLOOR_WITH_LIMITS).is_some() {
            handler_behind_limits(body);
        } else {
            bare_handler(body);
        }
        return;
    }
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

/// One row of the table.
struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_request: Duration,
    errors: usize,
}

async fn bench() {
    let sizes: Vec<usize> = std::env::var("BENCH_BINDINGS")
        .unwrap_or_else(|_| "100,10000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let binary = env!("CARGO_BIN_EXE_pod-identity-agent");
    let mut h = Harness::start_with_binary(binary, &["--log-level", "warn"]).await;
    h.bind("id-a", "web").await;
    let mut load_pods = Vec::new();
    for i in 0..LOAD_PODS {
        let pod = h.pod(&format!("load-{i}"), Some("web")).await;
        h.assigned(&pod, "id-a", "Assigned").await;
        load_pods.push(pod);
    }
    let (status, body) = netns_harness::curl(
        &h,
        &load_pods[0],
        netns_harness::TOKEN_URL,
        &["-H", "Metadata: true"],
    );
    assert_eq!(status, 200, "{body}");

    let mut rows: Vec<(String, usize, Figures)> = Vec::new();
    let mut created = 0;
    for &size in &sizes {
        // One binding and one identity of the load pods' are there already.
        let wanted = size.saturating_sub(1);
        create_objects(&h, created, wanted).await;
        created = created.max(wanted);
        wait_watched(&h, created + 1).await;
        for &concurrency in &CONCURRENCY {
            let figures = measure(&load_pods, concurrency, h.agent_pid()).await;
            rows.push((format!("agent, {} bindings", created + 1), concurrency, figures));
        }
    }

    // The floor: the agent gone (its rules stay, as after SIGKILL), a bare handler on its address. Then
    // the same handler behind the agent's connection layer: what the limits every pod is held to cost.
    h.kill_agent();
    for (server, limits) in [
        ("bare handler (floor)", false),
        ("fixed body, agent's connection limits", true),
    ] {
        let mut floor = spawn_floor(&h.node_netns, &body, limits);
        wait_floor(&load_pods[0]).await;
        for &concurrency in &CONCURRENCY {
            let figures = measure(&load_pods, concurrency, floor.id()).await;
            rows.push((server.into(), concurrency, figures));
        }
        let _ = floor.kill();
        let _ = floor.wait();
    }

    println!(
        "agent cached-token path by the number of bindings and identities in its view, load from {LOAD_PODS} pod \
         namespaces, medians of rounds of {} s\n",
        RUN.as_secs()
    );
    println!("| server | concurrency | requests/s | p50 | p99 | CPU per request | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (server, concurrency, f) in &rows {
        println!(
            "| {server} | {concurrency} | {:.0} | {} | {} | {:.1} µs | {} |",
            f.rps,
            micros(f.p50),
            micros(f.p99),
            f.cpu_per_request.as_secs_f64() * 1e6,
            f.errors
        );
    }
    println!();
    for &concurrency in &CONCURRENCY {
        let floor = &rows
            .iter()
            .find(|(s, c, _)| s.starts_with("bare") && *c == concurrency)
            .unwrap()
            .2;
        for (server, _, f) in rows
            .iter()
            .filter(|(s, c, _)| !s.starts_with("bare") && *c == concurrency)
        {
            println!(
                "- concurrency {concurrency}, {server} / floor: CPU per request {:.2}x, p50 {:.2}x, requests/s {:.2}x",
                f.cpu_per_request.as_secs_f64() / floor.cpu_per_request.as_secs_f64().max(1e-12),
                f.p50.as_secs_f64() / floor.p50.as_secs_f64().max(1e-12),
                f.rps / floor.rps.max(1e-12),
            );
        }
    }
}

/// `count` more identities and bindings, numbered from `from`, each binding with a selector of its own.
async fn create_objects(h: &Harness, from: usize, count: usize) {
    let (client, ns) = (&h.ns.client, h.ns.name.as_str());
    stream::iter(from..count)
        .map(|i| async move {
            let name = format!("scale-{i}");
            let client_id = format!("{i:08x}-0000-4000-8000-000000000000");
            let identity = user_assigned_identity(ns, &name, &client_id)
                .with_resource_id(&netns_harness::identity_resource_id(&name));
            fixtures::create(client, &identity).await.unwrap();
            fixtures::create(client, &binding_of(ns, &name, &name))
                .await
                .unwrap();
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until the agent's watches hold `count` bindings.
async fn wait_watched(h: &Harness, count: usize) {
    let line = format!("kind=\"azureidentitybinding\"}} {count}");
    pod_identity_test_support::eventually(|| async {
        let metrics = h.metrics();
        if metrics
            .lines()
            .any(|l| l.contains("watched_objects") && l.ends_with(&line))
        {
            Ok(())
        } else {
            anyhow::bail!("the agent does not hold {count} bindings yet")
        }
    })
    .await
    .unwrap();
}

/// Cached load at `concurrency` in `BENCH_ROUNDS` rounds (3 unless set), each figure the median of the
/// rounds': on shared cores single runs' CPU per request varied by up to 25%.
async fn measure(pods: &[PodNet], concurrency: usize, pid: u32) -> Figures {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut all = Vec::new();
    for _ in 0..rounds {
        all.push(measure_once(pods, concurrency, pid).await);
    }
    fn median<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        values[values.len() / 2]
    }
    Figures {
        rps: median(all.iter().map(|f| f.rps).collect()),
        p50: median(all.iter().map(|f| f.p50).collect()),
        p99: median(all.iter().map(|f| f.p99).collect()),
        cpu_per_request: median(all.iter().map(|f| f.cpu_per_request).collect()),
        errors: all.iter().map(|f| f.errors).sum(),
    }
}

/// One round of cached load at `concurrency`, with the CPU time process `pid` spent serving it.
async fn measure_once(pods: &[PodNet], concurrency: usize, pid: u32) -> Figures {
    let before = cpu_time(pid);
    let (rps, p50, p99, errors) = cached_load(pods, concurrency, RUN).await;
    let spent = cpu_time(pid).saturating_sub(before);
    let requests = (rps * RUN.as_secs_f64()).max(1.0);
    Figures {
        rps,
        p50,
        p99,
        cpu_per_request: spent.div_f64(requests),
        errors,
    }
}

/// User + system time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

/// The unit of `/proc/<pid>/stat`'s times.
fn clock_ticks_per_second() -> f64 {
    let output = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
}

/// This program again, as the bare handler (behind the agent's connection layer when `limits`), in the
/// node's network namespace.
fn spawn_floor(netns: &str, body: &str, limits: bool) -> Child {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", netns])
        .arg(std::env::current_exe().unwrap())
        .env(FLOOR_BODY, body)
        .stdin(Stdio::null());
    if limits {
        command.env(FLOOR_WITH_LIMITS, "1");
    }
    command.spawn().unwrap()
}

async fn wait_floor(pod: &PodNet) {
    let netns = pod.netns.clone();
    pod_identity_test_support::eventually(|| {
        let netns = netns.clone();
        async move {
            let output = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-o",
                    "/dev/null",
                ])
                .args([
                    "-w",
                    "%{http_code}",
                    "-H",
                    "Metadata: true",
                    netns_harness::TOKEN_URL,
                ])
                .output()?;
            match String::from_utf8_lossy(&output.stdout).trim() {
                "200" => Ok(()),
                other => anyhow::bail!("the bare handler answered {other:?}"),
            }
        }
    })
    .await
    .unwrap();
}

/// Runs `serve` with a listener on the agent's address and `body`, on the runtime the agent uses (tokio,
/// one worker per core).
fn on_agent_address<F, Fut>(body: String, serve: F)
where
    F: FnOnce(tokio::net::TcpListener, hyper::body::Bytes) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let addr: SocketAddr = REDIRECT.parse().unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        serve(listener, hyper::body::Bytes::from(body)).await;
    });
}

/// Answers every request with `body`, as the agent answers a cached token, on the agent's address: the
/// same runtime and the same HTTP/1.1 server (hyper), and nothing else.
fn bare_handler(body: String) {
    on_agent_address(body, |listener, body| async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/json; charset=utf-8")
                                .body(http_body_util::Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// The same body, served by the agent's connection layer with its default limits (per-source and total
/// connection counts, header read timeout, request head size) and nothing of the token path.
fn handler_behind_limits(body: String) {
    on_agent_address(body, |listener, body| async move {
        let handler =
            move |_request: http::Request<hyper::body::Incoming>, _peer: SocketAddr, _connection| {
                let body = body.clone();
                async move {
                    http::Response::builder()
                        .header("content-type", "application/json; charset=utf-8")
                        .body(axum::body::Body::from(body))
                        .unwrap()
                }
            };
        pod_identity_agent::connections::serve(
            listener,
            handler,
            pod_identity_agent::connections::Limits::default(),
            std::sync::Arc::new(pod_identity_agent::metrics::Metrics::new()),
            std::future::pending(),
        )
        .await;
    });
}
