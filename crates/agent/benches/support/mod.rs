//! What the agent's benchmarks share: cached-token load from pod namespaces, and how figures are printed.

use std::time::{Duration, Instant};

use pod_identity_test_support::netns::PodNet;

use crate::netns_harness::in_netns;

/// A duration in whole microseconds.
pub fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Cached-token requests from `concurrency` clients spread over `pods`, for `run`; each client is a
/// keep-alive connection, as SDKs keep them. Requests/s, p50, p99 and failed requests.
pub async fn cached_load(
    pods: &[PodNet],
    concurrency: usize,
    run: Duration,
) -> (f64, Duration, Duration, usize) {
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let netns = pods[worker % pods.len()].netns.clone();
        workers.push(tokio::task::spawn_blocking(move || {
            in_netns(&netns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let client = reqwest::Client::builder().no_proxy().build().unwrap();
                    let mut latencies = Vec::new();
                    let mut errors = 0;
                    let end = Instant::now() + run;
                    while Instant::now() < end {
                        let started = Instant::now();
                        let ok = client
                            .get(crate::netns_harness::TOKEN_URL)
                            .header("Metadata", "true")
                            .send()
                            .await
                            .map(|r| r.status().as_u16() == 200)
                            .unwrap_or(false);
                        if ok {
                            latencies.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                    (latencies, errors)
                })
            })
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, failed) = worker.await.unwrap();
        all.extend(latencies);
        errors += failed;
    }
    all.sort();
    let rps = all.len() as f64 / run.as_secs_f64();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
    };
    (
        rps,
        at(0.5).unwrap_or_default(),
        at(0.99).unwrap_or_default(),
        errors,
    )
}
