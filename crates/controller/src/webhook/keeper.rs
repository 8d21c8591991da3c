//! Keeps the webhook's certificates in a Secret of the install namespace and their authority in the
//! `caBundle` of the `MutatingWebhookConfiguration`.
//!
//! Every replica loads the serving certificate from the Secret ([`load`]), so all serve the same one.
//! Only the leader creates and rotates it ([`keep`]): it writes the bundle into the webhook
//! configuration first and the Secret second, so the API server trusts a new authority before any
//! replica serves under it; both writes carry preconditions (the Secret's `resourceVersion`, each
//! webhook's name), so a replica that lost the Lease meanwhile cannot overwrite its successor.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Resource,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    certs::{self, CertSettings, Material, Verdict},
    serve::ServingKey,
};
use crate::leader::Leadership;

/// Secret keys: the serving pair under the names of a `kubernetes.io/tls` Secret, and the authority.
const CA_BUNDLE_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

/// Where the certificates live and what they must be.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// The install namespace (of the Secret).
    pub namespace: String,
    /// Name of the Secret.
    pub secret: String,
    /// Name of the `MutatingWebhookConfiguration` whose webhooks get the bundle.
    pub configuration: String,
    /// What the serving certificate must be.
    pub settings: CertSettings,
    /// The leader looks at the Secret and the configuration at least this often (a configuration
    /// re-created or reset by an upgrade gets its bundle back within this time).
    pub recheck: Duration,
}

/// Why a round of keeping failed; the next round tries again.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// An API call failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// Certificates could not be made.
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    /// The Lease was lost during the round.
    #[error("no longer leading")]
    NotLeading,
}

/// The material a Secret holds; `None` when a key is missing or not UTF-8.
pub fn material_of(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
    };
    Some(Material {
        ca_bundle: text(CA_BUNDLE_KEY)?,
        ca_key: text(CA_KEY_KEY)?,
        cert: text(CERT_KEY)?,
        key: text(KEY_KEY)?,
    })
}

/// Loads the serving certificate of the Secret into `key` whenever the Secret changes, until dropped.
pub async fn load(client: Client, namespace: String, secret: String, key: Arc<ServingKey>) {
    let api = Api::<Secret>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={secret}"));
    let mut events = watcher(api, config).default_backoff().applied_objects().boxed();
    loop {
        match events.try_next().await {
            Ok(Some(object)) => match material_of(&object) {
                Some(material) => match key.load(&material.cert, &material.key) {
                    Ok(()) => info!(secret = %secret, "webhook serving certificate loaded"),
                    Err(err) => warn!(secret = %secret, error = %err, "webhook serving certificate unusable"),
                },
                None => warn!(secret = %secret, "the webhook Secret lacks a certificate or key"),
            },
            Ok(None) => return,
            Err(err) => warn!(secret = %secret, error = %err, "watching the webhook Secret"),
        }
    }
}

/// How soon the leader looks again for a configuration that does not exist yet.
const CONFIGURATION_WAIT: Duration = Duration::from_secs(2);

/// While this replica leads, creates and rotates the certificates and publishes the bundle; waits
/// otherwise. Runs until dropped.
pub async fn keep(client: Client, config: KeeperConfig, mut leadership: Leadership) {
    let secrets = Api::<Secret>::namespaced(client.clone(), &config.namespace);
    let configurations = Api::<MutatingWebhookConfiguration>::all(client);
    loop {
        leadership.acquired().await;
        let wait = match round(&secrets, &configurations, &config, &leadership).await {
            Ok(due) => due
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(config.recheck),
            Err(err) => {
                warn!(secret = %config.secret, error = %err, "keeping the webhook certificate");
                config.recheck.min(Duration::from_secs(5))
            }
        };
        // At least a second apart, however soon a certificate is due.
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
    }
}

/// One look: rotate when due, publish the bundle when the configuration lacks it. Returns when the
/// kept certificates are next due.
async fn round(
    secrets: &Api<Secret>,
    configurations: &Api<MutatingWebhookConfiguration>,
    config: &KeeperConfig,
    leadership: &Leadership,
) -> Result<SystemTime, KeeperError> {
    let existing = secrets.get_opt(&config.secret).await?;

    let kept = existing.as_ref().and_then(material_of);
    let now = SystemTime::now();
    let verdict = certs::assess(kept.as_ref(), &config.settings, now);
    // A Secret written before the configuration existed (the controller can lead before Helm has created
    // the configuration, which it installs last) gets its owner now; a rewrite adds it itself.
    let unowned = match (&verdict, &existing) {
        (Verdict::Keep, Some(secret))
            if secret
                .metadata
                .owner_references
                .as_ref()
                .is_none_or(Vec::is_empty) =>
        {
            Some(secret.clone())
        }
        _ => None,
    };
    let configuration = configurations.get_opt(&config.configuration).await?;
    let current = match (&verdict, kept) {
        (Verdict::Keep, Some(kept)) => kept,
        (Verdict::Renew(reason) | Verdict::NewAuthority(reason), kept) => {
            let fresh = certs::issue(kept.as_ref(), &config.settings, now, &verdict)?;
            info!(
                secret = %config.secret,
                reason = %reason,
                new_authority = matches!(verdict, Verdict::NewAuthority(_)),
                "issuing the webhook serving certificate"
            );
            if let Some(configuration) = &configuration {
                publish(configurations, configuration, &fresh.ca_bundle, leadership).await?;
            }
            write(
                secrets,
                config,
                existing,
                &fresh,
                configuration.as_ref(),
                leadership,
            )
            .await?;
            fresh
        }
        (Verdict::Keep, None) => return Ok(now),
    };
    // Publishing comes first: the API server needs the bundle, the owner only matters at uninstall.
    match &configuration {
        Some(configuration) => publish(configurations, configuration, &current.ca_bundle, leadership).await?,
        None => warn!(
            configuration = %config.configuration,
            "the MutatingWebhookConfiguration does not exist; its caBundle is published once it does"
        ),
    }
    if let (Some(mut secret), Some(owner)) = (unowned, configuration.as_ref().and_then(owner_of)) {
        if !leadership.is_leader() {
            return Err(KeeperError::NotLeading);
        }
        // An update, the one verb the chart's Role grants on this Secret besides reading it, carrying the
        // read's resourceVersion: a Secret changed since is a conflict, not overwritten.
        secret.metadata.owner_references = Some(vec![owner]);
        secrets
            .replace(&config.secret, &PostParams::default(), &secret)
            .await?;
    }
    let due = certs::renewal_due(&current, &config.settings).unwrap_or(now);
    Ok(match configuration {
        Some(_) => due,
        // Helm creates the configuration last: look again soon rather than at the next recheck, so that
        // the webhook works moments after an install, not a recheck later.
        None => due.min(now + CONFIGURATION_WAIT),
    })
}

/// Sets every webhook's `caBundle` of `configuration` to `bundle` where it differs; each change is
/// guarded by a test of the webhook's name at that position.
async fn publish(
    api: &Api<MutatingWebhookConfiguration>,
    configuration: &MutatingWebhookConfiguration,
    bundle: &str,
    leadership: &Leadership,
) -> Result<(), KeeperError> {
    let mut operations = Vec::new();
    for (index, webhook) in configuration.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(bundle.as_bytes()) {
            continue;
        }
        operations
            .push(json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}));
        operations.push(json!({
            "op": "add",
            "path": format!("/webhooks/{index}/clientConfig/caBundle"),
            "value": ByteString(bundle.as_bytes().to_vec()),
        }));
    }
    if operations.is_empty() {
        return Ok(());
    }
    if !leadership.is_leader() {
        return Err(KeeperError::NotLeading);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(json!(operations)).map_err(kube::Error::SerdeError)?;
    let name = configuration.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    info!(configuration = %name, "webhook caBundle published");
    Ok(())
}

fn owner_of(configuration: &MutatingWebhookConfiguration) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: MutatingWebhookConfiguration::api_version(&()).into_owned(),
        kind: MutatingWebhookConfiguration::kind(&()).into_owned(),
        name: configuration.metadata.name.clone()?,
        uid: configuration.metadata.uid.clone()?,
        ..OwnerReference::default()
    })
}

/// Creates the Secret, or replaces it at the version it was read at. It is owned by the webhook
/// configuration when that exists, so that uninstalling removes it too.
async fn write(
    api: &Api<Secret>,
    config: &KeeperConfig,
    existing: Option<Secret>,
    material: &Material,
    configuration: Option<&MutatingWebhookConfiguration>,
    leadership: &Leadership,
) -> Result<(), KeeperError> {
    let data = BTreeMap::from([
        (
            CA_BUNDLE_KEY.to_owned(),
            ByteString(material.ca_bundle.clone().into_bytes()),
        ),
        (
            CA_KEY_KEY.to_owned(),
            ByteString(material.ca_key.clone().into_bytes()),
        ),
        (
            CERT_KEY.to_owned(),
            ByteString(material.cert.clone().into_bytes()),
        ),
        (KEY_KEY.to_owned(), ByteString(material.key.clone().into_bytes())),
    ]);
    let owner = configuration.and_then(owner_of);
    if !leadership.is_leader() {
        return Err(KeeperError::NotLeading);
    }
    match existing {
        Some(mut secret) => {
            secret.data = Some(data);
            secret.string_data = None;
            if secret
                .metadata
                .owner_references
                .as_ref()
                .is_none_or(Vec::is_empty)
            {
                secret.metadata.owner_references = owner.map(|o| vec![o]);
            }
            // The read's resourceVersion stays: a Secret changed since is a conflict, not overwritten.
            api.replace(&config.secret, &PostParams::default(), &secret)
                .await?;
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(config.secret.clone()),
                    namespace: Some(config.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/component".to_owned(),
                        "webhook-certificate".to_owned(),
                    )])),
                    owner_references: owner.map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".to_owned()),
                data: Some(data),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret).await?;
        }
    }
    info!(secret = %config.secret, "webhook certificate written");
    Ok(())
}
