//! The agent's memory under a connection flood from pods: 10,000 keep-alive connections (each makes a
//! token request and stays open) from one pod, then from 30 pods, through the real interception rules.
//! Reports the agent's resident memory before, while the connections are held, and after they closed,
//! what the flooding pods got, and whether a pod outside the flood is still served meanwhile.
//!
//! Needs root (network namespaces, iptables) and the control plane of the tests. Run with
//! `cargo bench -p pod-identity-agent --bench agent_flood`; `POD_IDENTITY_AGENT_BIN` measures another
//! agent binary (an older build, for a before/after comparison). Raises its own open-files limit to
//! the hard limit (the flood needs more than 10,000 descriptors, in this process and in the agent).
//! Figures are for this machine only; nothing here asserts a size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../tests/netns_harness/mod.rs"]
mod netns_harness;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use netns_harness::{Harness, in_netns};
use pod_identity_test_support::netns::PodNet;

const CONNECTIONS: usize = 10_000;
const PODS: usize = 30;
/// How long memory is given to settle after the connections closed.
const SETTLE: Duration = Duration::from_secs(20);
const REQUEST: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net HTTP/1.1\r\nhost: 169.254.169.254\r\nmetadata: true\r\n\r\n";

fn main() {
    // `cargo bench` passes `--bench`; anything else (a test run of bench targets) only builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    raise_open_files_limit();
    pod_identity_test_support::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard as usize > CONNECTIONS + 1000,
        "the hard open-files limit ({hard}) is too low for {CONNECTIONS} connections"
    );
}

async fn bench() {
    let binary = std::env::var_os("POD_IDENTITY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pod-identity-agent")));
    let h = Harness::start_with_binary(&binary, &["--log-level", "warn"]).await;
    h.bind("id-a", "web").await;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let pod = h.pod(&format!("flood-{i}"), Some("web")).await;
        h.assigned(&pod, "id-a", "Assigned").await;
        pods.push(pod);
    }
    let bystander = h.pod("bystander", Some("web")).await;
    h.assigned(&bystander, "id-a", "Assigned").await;
    for pod in [&pods[0], &bystander] {
        let (status, body) =
            netns_harness::curl(&h, pod, netns_harness::TOKEN_URL, &["-H", "Metadata: true"]);
        assert_eq!(status, 200, "{body}");
    }
    let pid = h.agent_pid();
    println!("agent {}\n", binary.display());
    println!(
        "| flood | RSS before | RSS with the connections open (peak) | RSS {}s after they closed | answered 200 | answered 503 | cut or refused | bystander |",
        SETTLE.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for sources in [1, PODS] {
        let before = memory(pid);
        let flooders: Vec<PodNet> = pods[..sources].to_vec();
        let held = tokio::task::spawn_blocking(move || flood(&flooders, CONNECTIONS / sources))
            .await
            .unwrap();
        let during = memory(pid);
        let (bystander_status, _) = netns_harness::curl(
            &h,
            &bystander,
            netns_harness::TOKEN_URL,
            &["-H", "Metadata: true"],
        );
        let counts = held.counts;
        drop(held.streams);
        tokio::time::sleep(SETTLE).await;
        let after = memory(pid);
        println!(
            "| {CONNECTIONS} connections from {sources} pod{} | {} | {} ({}) | {} | {} | {} | {} | {bystander_status} |",
            if sources == 1 { "" } else { "s" },
            mib(before.rss),
            mib(during.rss),
            mib(during.peak),
            mib(after.rss),
            counts.ok,
            counts.shed,
            counts.failed,
        );
    }
    let metrics = h.metrics();
    let shed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pod_identity_connections_shed_total"))
        .collect();
    println!(
        "\n{}",
        if shed.is_empty() {
            "(no shed metric: an agent without connection limits)".to_owned()
        } else {
            shed.join("\n")
        }
    );
    h.stop_agent();
}

#[derive(Clone, Copy, Default)]
struct Counts {
    ok: usize,
    shed: usize,
    failed: usize,
}

struct Held {
    streams: Vec<TcpStream>,
    counts: Counts,
}

/// `per_pod` connections from each pod, each with one token request, kept open when the agent keeps
/// them (keep-alive).
fn flood(pods: &[PodNet], per_pod: usize) -> Held {
    let mut held = Held {
        streams: Vec::new(),
        counts: Counts::default(),
    };
    for pod in pods {
        let (streams, counts) = in_netns(&pod.netns, move || {
            let target: SocketAddr = "169.254.169.254:80".parse().unwrap();
            let mut streams = Vec::new();
            let mut counts = Counts::default();
            let started = Instant::now();
            for _ in 0..per_pod {
                let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    counts.failed += 1;
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                match exchange(&mut stream) {
                    Some(200) => {
                        counts.ok += 1;
                        streams.push(stream);
                    }
                    Some(503) => counts.shed += 1,
                    _ => counts.failed += 1,
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the flood took too long"
            );
            (streams, counts)
        });
        held.streams.extend(streams);
        held.counts.ok += counts.ok;
        held.counts.shed += counts.shed;
        held.counts.failed += counts.failed;
    }
    held
}

/// Sends the token request and reads the whole answer; its status.
fn exchange(stream: &mut TcpStream) -> Option<u16> {
    stream.write_all(REQUEST.as_bytes()).ok()?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return parse_status(&buffer);
        }
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return parse_status(&buffer);
            }
        }
    }
}

fn parse_status(buffer: &[u8]) -> Option<u16> {
    String::from_utf8_lossy(buffer).split(' ').nth(1)?.parse().ok()
}

struct Memory {
    rss: u64,
    peak: u64,
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
