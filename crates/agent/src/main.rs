//! `pod-identity-agent`: the DaemonSet process of every node.

use anyhow::{Context, Result};
use clap::Parser;
use pod_identity_agent::Args;

/// jemalloc rather than glibc's malloc: the agent's memory follows what pods hold of it, and glibc kept
/// the buffers of closed connections (RSS stayed at its peak after a flood closed, in
/// `benches/agent_flood.rs`) where jemalloc's background threads give unused pages back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    pod_identity_runtime::install_crypto_provider()?;
    let args = Args::parse();
    pod_identity_runtime::logging::init(args.log_format, &args.log_level)?;
    if args.remove_interception {
        pod_identity_agent::run::remove_interception(&args).context("removing the interception")?;
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        pod_identity_agent::run(args, pod_identity_runtime::shutdown::signal())
            .await
            .context("running the agent")
    })
}
