//! `pod-identity-emulator`: the local Azure as a process, for tests that put IMDS inside a network namespace
//! and watch it over the admin API. Prints one JSON line with the bound addresses when ready (and writes it to
//! `--ready-file`), then serves until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use pod_identity_emulator::{Config, Emulator, ImdsListener, Seed, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "pod-identity-emulator",
    version,
    about = "A local Azure: IMDS, ARM, Entra ID and Key Vault"
)]
struct Args {
    /// Seed file (JSON, or YAML for .yaml/.yml) with tenants, subscriptions and their resources.
    #[arg(long, env = "POD_IDENTITY_EMULATOR_SEED")]
    seed: PathBuf,

    /// An IMDS listener: ADDR=INSTANCE, INSTANCE being the resource ID of a VM or of a scale-set instance
    /// (`.../virtualMachineScaleSets/{ss}/virtualMachines/{instanceId}`). Repeat for several.
    #[arg(long = "imds-listen", value_name = "ADDR=INSTANCE")]
    imds: Vec<String>,

    /// The TLS listener for ARM, Entra ID and Key Vault.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// The admin API (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: SocketAddr,

    /// Where to write the CA certificate (PEM) that clients must trust.
    #[arg(long)]
    ca_out: Option<PathBuf>,

    /// Where to write the ready line (bound addresses as JSON), written whole once every listener is up.
    #[arg(long)]
    ready_file: Option<PathBuf>,

    /// Extra names or IP addresses for the TLS certificate. Repeat for several.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,

    /// Settings as JSON (see `GET /admin/settings` for the fields); unspecified fields keep their defaults.
    #[arg(long)]
    settings: Option<String>,

    /// How long a VM or scale-set identity update runs, in milliseconds (overrides --settings).
    #[arg(long)]
    lro_duration_ms: Option<u64>,

    /// Turns ARM throttling off.
    #[arg(long)]
    no_throttling: bool,

    /// A PEM file of CA certificates Entra trusts when it fetches a federated credential issuer's OpenID
    /// configuration and keys (e.g. a test cluster's API server CA). Repeat for several.
    #[arg(long = "issuer-ca", value_name = "FILE")]
    issuer_cas: Vec<PathBuf>,

    /// How many requests the log keeps.
    #[arg(long, default_value_t = 100_000)]
    log_capacity: usize,
}

fn parse_imds(spec: &str) -> Result<ImdsListener> {
    let Some((addr, instance)) = spec.split_once('=') else {
        bail!("--imds-listen '{spec}' is not ADDR=INSTANCE");
    };
    Ok(ImdsListener {
        addr: addr
            .parse()
            .with_context(|| format!("--imds-listen address '{addr}'"))?,
        instance: instance.to_owned(),
    })
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The emulator's TLS config names ring itself; installing it process-wide keeps anything else in this
    // process from tripping over a missing default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let seed = Seed::from_file(&args.seed)?;
    let mut settings: Settings = match &args.settings {
        Some(s) => serde_json::from_str(s).context("--settings is not valid settings JSON")?,
        None => Settings::default(),
    };
    if let Some(ms) = args.lro_duration_ms {
        settings.lro_duration_ms = ms;
    }
    if args.no_throttling {
        settings.throttling.enabled = false;
    }
    for path in &args.issuer_cas {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading --issuer-ca {}", path.display()))?;
        settings.federation.issuer_ca_pems.push(pem);
    }
    let config = Config {
        imds: args.imds.iter().map(|s| parse_imds(s)).collect::<Result<_>>()?,
        azure_addr: args.listen,
        admin_addr: Some(args.admin_listen),
        tls_names: args.tls_names.clone(),
        settings,
        log_capacity: args.log_capacity,
        ..Config::new(seed)
    };
    let emulator = Emulator::start(config).await.context("starting the emulator")?;
    if let Some(path) = &args.ca_out {
        std::fs::write(path, emulator.ca_pem())
            .with_context(|| format!("writing the CA to {}", path.display()))?;
    }
    let ready = serde_json::to_string(emulator.addresses()).context("rendering the addresses")?;
    if let Some(path) = &args.ready_file {
        // Written under another name and renamed, so a reader never sees half a line.
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, format!("{ready}\n")).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    }
    println!("{ready}");
    wait_for_signal().await?;
    tracing::info!("shutting down");
    emulator.shutdown().await;
    Ok(())
}
