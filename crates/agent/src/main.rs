//! `pod-identity-agent`: the DaemonSet process of every node.

use anyhow::{Context, Result};
use clap::Parser;
use pod_identity_agent::{Args, config::LogFormat};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: the agent's memory follows what pods hold of it, and glibc kept
/// the buffers of closed connections (RSS stayed at its peak after a flood closed, in
/// `benches/agent_flood.rs`) where jemalloc's background threads give unused pages back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    // One TLS provider for the whole process: kube and reqwest both build on the process default.
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was installed before main"))?;
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log_level))
        .context("parsing the log filter")?;
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => subscriber
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => subscriber
            .fmt_fields(pod_identity_agent::logging::EscapedFields)
            .init(),
    }
    if args.remove_interception {
        pod_identity_agent::run::remove_interception(&args).context("removing the interception")?;
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        pod_identity_agent::run(args, shutdown_signal())
            .await
            .context("running the agent")
    })
}

/// SIGTERM (what the kubelet sends) or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
