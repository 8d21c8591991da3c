//! `pod-identity-controller`: reads its configuration, connects to Kubernetes and ARM, and runs.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use clap::Parser;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use pod_identity_api::matching::Scope;
use pod_identity_controller::{
    ControllerConfig,
    azure::{Endpoints, connect},
    cloud_config::{self, OwnPod},
    config::{Args, LogFormat},
    federation::FederationConfig,
    leader::LeaseConfig,
    worker::WorkerSettings,
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider is installed already"))?;
    let args = Args::parse();
    init_logging(args.log_format);

    let client = kube_client(&args).await.context("connecting to Kubernetes")?;
    let admin = bind_admin(&args).await?;
    let azure = {
        // Probes answer while the configuration is missing: alive, not ready.
        let mut waiting = tokio::task::JoinSet::new();
        let not_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics = pod_identity_controller::metrics::Metrics::new();
        for listener in &admin {
            let duplicate = TcpListener::from_std(listener.try_clone()?)?;
            waiting.spawn(pod_identity_controller::admin::serve(
                duplicate,
                not_ready.clone(),
                metrics.clone(),
            ));
        }
        let own_pod = match (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) {
            (Ok(name), Ok(namespace)) => Some(OwnPod { name, namespace }),
            _ => None,
        };
        let azure = cloud_config::wait_for(args.cloud_config.as_deref(), &client, own_pod.as_ref()).await;
        waiting.abort_all();
        azure
    };
    let extra_ca_pem = match &args.azure_ca_file {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let compute = connect(
        &azure,
        &Endpoints {
            arm: args.arm_endpoint.clone(),
            authority: args.authority_host.clone(),
            imds: args.imds_endpoint.clone(),
            extra_ca_pem,
        },
    )
    .context("setting up ARM access")?;
    let federation = {
        let mut federation =
            FederationConfig::new(args.federation_namespace.clone().filter(|n| !n.is_empty()));
        federation.issuer = args.federation_issuer.clone().filter(|i| !i.is_empty());
        if args.manage_federated_credentials {
            if federation.namespace.is_none() {
                anyhow::bail!("--manage-federated-credentials needs --federation-namespace");
            }
            federation.credentials = Some(Arc::new(compute.identity_client()));
        }
        federation
    };

    let instance = args
        .leader_election_instance
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "pod-identity-controller".to_owned());
    let mut immutable = args
        .immutable_user_msis
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>();
    if !azure.user_assigned_identity_id.is_empty() {
        // The cluster's own identity (the kubelet's) is never taken away.
        immutable.push(azure.user_assigned_identity_id.clone());
    }
    let config = ControllerConfig {
        scope: if args.force_namespaced {
            Scope::Namespaced
        } else {
            Scope::CrossNamespace
        },
        namespace: args.namespace.clone().filter(|n| !n.is_empty()),
        lease: args.leader_elect.then(|| LeaseConfig {
            namespace: args.leader_election_namespace.clone(),
            name: args.leader_election_name.clone(),
            identity: instance.clone(),
            duration: args.leader_election_duration,
        }),
        instance,
        worker: WorkerSettings {
            batch_window: args.batch_window,
            backoff_initial: args.retry_interval,
            backoff_max: args.max_retry_interval,
            drift_interval: args.reconcile_interval,
            write_concurrency: args.create_delete_batch.max(1),
        },
        immutable,
        drift_budget: args.drift_check_budget,
        resync: args.sync_retry_duration,
        quarantine_initial: args.quarantine_duration,
        quarantine_max: args.quarantine_max,
        federation,
    };

    let admin = admin
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<std::io::Result<Vec<_>>>()?;
    pod_identity_controller::run(config, client, Arc::new(compute), admin, shutdown_signal())
        .await
        .context("the controller stopped")
}

/// The probe port and the metrics port, bound before anything else so that probes answer from the start.
async fn bind_admin(args: &Args) -> Result<Vec<std::net::TcpListener>> {
    let mut addresses = vec![SocketAddr::new(args.bind_address, args.http_probe_port)];
    if args.prometheus_port != 0 && args.prometheus_port != args.http_probe_port {
        addresses.push(SocketAddr::new(args.bind_address, args.prometheus_port));
    }
    let mut listeners = Vec::new();
    for address in addresses {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

async fn kube_client(args: &Args) -> Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
