//! The Kubernetes client of a binary: from a kubeconfig file when one is named (`--kubeconfig`,
//! `KUBECONFIG`), otherwise the usual lookup (in-cluster service account, then `~/.kube/config`).

use std::path::{Path, PathBuf};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// Why no client could be configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The named kubeconfig could not be read or parsed.
    #[error("reading {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// Nothing to configure a client from (no service account, no kubeconfig).
    #[error("finding a Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration cannot make a client (its TLS material, its proxy).
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A client from `kubeconfig` (its current context), or from the usual lookup when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let error = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere.yaml");
        let Err(error) = client(Some(&path)).await else {
            panic!("a client from a missing file");
        };
        assert!(matches!(error, ClientError::Kubeconfig { .. }), "{error}");
        assert!(error.to_string().contains("nowhere.yaml"), "{error}");
    }

    #[tokio::test]
    async fn the_current_context_of_a_kubeconfig_is_used() {
        let _ = super::super::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://192.0.2.1:6443\n    insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n    namespace: team\nusers:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        let client = client(Some(&path)).await.unwrap();
        assert_eq!(client.default_namespace(), "team");
    }
}
