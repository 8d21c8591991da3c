//! The mutating admission webhook that gives bound pods the `IdentityReady` readiness gate, so that a
//! pod turns Ready (and a Service sends it traffic) only once the node agent reports its identities
//! usable.
//!
//! - [`admission`]: the pure decision (AdmissionReview in, allowed review with or without patch out).
//! - [`certs`]: the pure certificate rules (issue, assess, rotate).
//! - [`serve`]: the HTTPS server every replica runs.
//! - [`keeper`]: the Secret every replica serves from, and the leader's creation, rotation and
//!   publication of the `caBundle`.

pub mod admission;
pub mod certs;
pub mod keeper;
pub mod serve;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use kube::Client;
use tokio::{net::TcpListener, task::JoinSet};

use crate::leader::Leadership;

/// Where the webhook is served and how its certificates are kept.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Address of the HTTPS server.
    pub listen: SocketAddr,
    /// Install namespace: of the Service and of the Secret.
    pub namespace: String,
    /// Name of the Service in front of the replicas; the serving certificate names
    /// `<service>`, `<service>.<namespace>`, `<service>.<namespace>.svc` and
    /// `<service>.<namespace>.svc.cluster.local`.
    pub service: String,
    /// Further names (DNS names or IP addresses) the certificate carries, for a configuration that
    /// calls a URL rather than the Service.
    pub extra_names: Vec<String>,
    /// Name of the Secret that holds the certificates.
    pub secret: String,
    /// Name of the `MutatingWebhookConfiguration` whose `caBundle` the controller keeps.
    pub configuration: String,
    /// Validity of a serving certificate (renewed with a third left); the authority is valid twelve
    /// times as long.
    pub cert_validity: Duration,
    /// How often the leader checks the Secret and the configuration besides when a certificate is due.
    pub recheck: Duration,
}

impl WebhookConfig {
    /// The names the serving certificate carries.
    pub fn names(&self) -> Vec<String> {
        let (service, namespace) = (&self.service, &self.namespace);
        let mut names = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.clone(),
        ];
        for extra in &self.extra_names {
            if !extra.is_empty() && !names.contains(extra) {
                names.push(extra.clone());
            }
        }
        names
    }

    fn keeper(&self) -> keeper::KeeperConfig {
        keeper::KeeperConfig {
            namespace: self.namespace.clone(),
            secret: self.secret.clone(),
            configuration: self.configuration.clone(),
            settings: certs::CertSettings {
                names: self.names(),
                validity: self.cert_validity,
                authority_validity: self.cert_validity * 12,
            },
            recheck: self.recheck,
        }
    }
}

/// Binds the webhook's address and spawns its tasks into `tasks`: the server, the loading of the
/// Secret, and the keeper (which acts only while `leadership` holds).
///
/// Errors: the address cannot be bound.
pub async fn spawn(
    config: &WebhookConfig,
    client: &Client,
    leadership: Leadership,
    tasks: &mut JoinSet<()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let key = Arc::new(serve::ServingKey::default());
    tasks.spawn(serve::serve(listener, key.clone()));
    tasks.spawn(keeper::load(
        client.clone(),
        config.namespace.clone(),
        config.secret.clone(),
        key,
    ));
    tasks.spawn(keeper::keep(client.clone(), config.keeper(), leadership));
    Ok(())
}
