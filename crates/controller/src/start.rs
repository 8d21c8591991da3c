//! The controller from its command line: bind the admin ports first (probes answer from the start),
//! wait for the Azure configuration (alive, not ready, saying what is missing), connect to ARM, then
//! [`crate::run`] until `shutdown`.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};

use tokio::net::TcpListener;

use crate::{
    admin,
    azure::{SetupError, connect},
    cloud_config,
    config::{Args, own_pod},
    metrics::Metrics,
};

/// Why the controller could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No Kubernetes client.
    #[error(transparent)]
    Kube(#[from] pod_identity_runtime::ClientError),
    /// An admin port could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A bound admin port could not be served.
    #[error("serving the admin port: {0}")]
    Listen(std::io::Error),
    /// A file named on the command line could not be read.
    #[error("{0}")]
    Read(std::io::Error),
    /// ARM access could not be set up from the Azure configuration.
    #[error(transparent)]
    Azure(#[from] SetupError),
    /// The command line asks for something it does not configure.
    #[error("{0}")]
    Usage(&'static str),
    /// The controller stopped.
    #[error(transparent)]
    Run(#[from] crate::Error),
}

/// Runs the controller the command line describes until `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    if args.manage_federated_credentials && args.federation().namespace.is_none() {
        return Err(StartError::Usage(
            "--manage-federated-credentials needs --federation-namespace",
        ));
    }
    let client = pod_identity_runtime::client(args.kubeconfig.as_deref()).await?;
    let mut admin = Vec::new();
    for addr in args.admin_addresses() {
        let bind = async { TcpListener::bind(addr).await?.into_std() };
        admin.push(bind.await.map_err(|source| StartError::Bind { addr, source })?);
    }
    let azure = {
        // Probes answer while the configuration is missing: alive, not ready.
        let mut waiting = tokio::task::JoinSet::new();
        let not_ready = Arc::new(AtomicBool::new(false));
        let metrics = Metrics::new();
        for listener in &admin {
            let duplicate = listener.try_clone().and_then(TcpListener::from_std);
            waiting.spawn(admin::serve(
                duplicate.map_err(StartError::Listen)?,
                not_ready.clone(),
                metrics.clone(),
            ));
        }
        let own_pod = own_pod(|name| std::env::var(name).ok());
        let azure = cloud_config::wait_for(args.cloud_config.as_deref(), &client, own_pod.as_ref()).await;
        waiting.abort_all();
        azure
    };
    let compute = connect(&azure, &args.endpoints().map_err(StartError::Read)?)?;
    let mut config = args.controller_config(&azure, std::env::var("HOSTNAME").ok());
    if args.manage_federated_credentials {
        config.federation.credentials = Some(Arc::new(compute.identity_client()));
    }
    let admin = admin
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(StartError::Listen)?;
    crate::run(config, client, Arc::new(compute), admin, shutdown).await?;
    Ok(())
}
