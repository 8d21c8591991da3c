//! `pod-identity-controller`: parses its command line, sets up logging, and runs until SIGTERM.

use anyhow::{Context, Result};
use clap::Parser;
use pod_identity_controller::config::{Args, DEFAULT_LOG_FILTER};

#[tokio::main]
async fn main() -> Result<()> {
    pod_identity_runtime::install_crypto_provider()?;
    let args = Args::parse();
    pod_identity_runtime::logging::init(args.log_format, DEFAULT_LOG_FILTER)?;
    pod_identity_controller::start::run(args, pod_identity_runtime::shutdown::signal())
        .await
        .context("the controller stopped")
}
