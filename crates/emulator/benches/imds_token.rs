//! Throughput and latency of the emulator's IMDS token path on loopback: the same token request (identity by
//! client ID, served from IMDS's token cache as real IMDS serves repeat requests) from N concurrent
//! keep-alive clients, client and emulator in one process on one runtime. Run with
//! `cargo bench -p pod-identity-emulator --bench imds_token`; `BENCH_REQUESTS` sets requests per level.

use std::time::{Duration, Instant};

use pod_identity_emulator::{Config, Emulator, Seed};

const INSTANCE: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/0";

fn seed() -> Result<Seed, String> {
    Seed::from_text(
        r#"{"subscriptions": [{"id": "s", "tenantId": "t", "resourceGroups": [{"name": "rg", "location": "westeurope",
            "userAssignedIdentities": [{"name": "id", "clientId": "c", "principalId": "p"}],
            "virtualMachineScaleSets": [{"name": "ss", "instances": [{"instanceId": "0"}],
                "identity": {"userAssignedIdentities": ["/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id"]}}]}]}]}"#,
        false,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn level(url: &str, concurrency: usize, total: usize) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    let per_task = total / concurrency;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                let resp = client
                    .get(&url)
                    .header("Metadata", "true")
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                resp.bytes().await.map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = start.elapsed();
    all.sort();
    println!(
        "concurrency {concurrency:>3}: {:>6} requests in {:>6.2} s = {:>8.0} req/s; p50 {:>7.3} ms, p99 {:>7.3} ms, max {:>7.3} ms",
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}

fn main() -> Result<(), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let total: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let em = Emulator::start(Config::new(seed()?).with_imds(INSTANCE)).await.map_err(|e| e.to_string())?;
        let url = format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=c",
            em.imds_url(0).ok_or("no IMDS listener")?
        );
        level(&url, 1, 2_000).await?; // warm-up
        for c in [1, 8, 32, 64] {
            level(&url, c, total).await?;
        }
        let uncached = format!("{url}&bypass_cache=true");
        println!("fresh token every request (bypass_cache=true):");
        level(&uncached, 8, total / 4).await?;
        Ok(())
    })
}
