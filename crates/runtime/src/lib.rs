//! What every pod-identity binary starts with, so that the controller, the agent and the CLI start the
//! same way: the process's TLS provider ([`install_crypto_provider`]), a Kubernetes client from an
//! explicit kubeconfig or the usual lookup ([`client`]), logs in JSON or in text whose values cannot
//! forge a line ([`logging`]), and the signal that ends a run ([`shutdown`]).
//!
//! (kubert, the runtime helpers linkerd's controllers use, offers the same set, but is built on kube 1.1;
//! these binaries are on kube 5.)

pub mod client;
pub mod logging;
pub mod shutdown;

pub use client::{ClientError, client};
pub use logging::LogFormat;

/// Installs ring as the process's rustls provider. kube and reqwest both build on the process default,
/// and the workspace is built with ring only; an error means a provider was installed before.
pub fn install_crypto_provider() -> Result<(), ProviderInstalled> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| ProviderInstalled)
}

/// A TLS provider was installed before [`install_crypto_provider`].
#[derive(Debug, thiserror::Error)]
#[error("a TLS crypto provider was installed already")]
pub struct ProviderInstalled;
