//! Entra's side of OpenID discovery: fetching an external issuer's `/.well-known/openid-configuration` and
//! the `jwks_uri` it names, anonymously as Entra does, trusting only the CAs the settings list, within a
//! bounded time. Keys are cached per issuer and refetched when they are old or when an assertion names a
//! key the cache lacks (after a key rotation), no more often than the settings allow. Concurrent requests
//! for one issuer share one fetch.
//!
//! How Entra joins the issuer and the well-known path is undocumented; one trailing `/` of the issuer is
//! dropped so `https://host/` and `https://host` both read `https://host/.well-known/openid-configuration`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use crate::federation::{Jwks, Rejection};
use crate::shared::lock;

/// Larger discovery documents or key sets are refused as unreadable.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// What one fetch may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPolicy {
    pub ca_pems: Vec<String>,
    /// For the discovery document and the keys together.
    pub timeout: Duration,
    /// Keys older than this are fetched again.
    pub max_age: Duration,
    /// An unknown `kid` refetches keys older than this.
    pub refetch_after: Duration,
}

#[derive(Debug)]
struct Entry {
    keys: Arc<Jwks>,
    fetched: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// Keys per issuer. Only issuers that a federated credential names are ever fetched, so the map stays as
/// small as the credentials.
#[derive(Debug, Default)]
pub struct IssuerCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl IssuerCache {
    /// The signing keys of `issuer`, holding `kid` if a fresh fetch can give it.
    pub async fn keys(
        &self,
        issuer: &str,
        kid: Option<&str>,
        policy: &FetchPolicy,
    ) -> Result<Arc<Jwks>, Rejection> {
        let slot = lock(&self.slots).entry(issuer.to_owned()).or_default().clone();
        let mut entry = slot.lock().await;
        let now = Instant::now();
        if let Some(e) = entry.as_ref() {
            let age = now.duration_since(e.fetched);
            let has_kid = kid.is_none_or(|k| e.keys.has_kid(k));
            if age < policy.max_age && (has_kid || age < policy.refetch_after) {
                return Ok(e.keys.clone());
            }
        }
        let keys = match tokio::time::timeout(policy.timeout, fetch(issuer, policy)).await {
            Ok(r) => Arc::new(r?),
            Err(_) => {
                tracing::debug!(issuer, "issuer discovery timed out");
                return Err(Rejection::Unreachable);
            }
        };
        *entry = Some(Entry {
            keys: keys.clone(),
            fetched: now,
        });
        Ok(keys)
    }

    pub fn clear(&self) {
        lock(&self.slots).clear();
    }
}

fn client(policy: &FetchPolicy) -> Option<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in &policy.ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
            let _ = roots.add(cert);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent("pod-identity-emulator (Entra issuer discovery)")
        .build()
        .ok()
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    if !url.starts_with("https://") {
        return Err(format!("{url} is not https"));
    }
    let mut resp = client.get(url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: status {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("{url}: larger than {MAX_DOCUMENT_BYTES} bytes"));
        }
    }
    Ok(body)
}

async fn fetch(issuer: &str, policy: &FetchPolicy) -> Result<Jwks, Rejection> {
    let unreachable = |why: String| {
        tracing::debug!(issuer, %why, "issuer discovery failed");
        Rejection::Unreachable
    };
    let client = client(policy).ok_or_else(|| unreachable("no TLS client".into()))?;
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        issuer.strip_suffix('/').unwrap_or(issuer)
    );
    let doc: Value = serde_json::from_slice(&get(&client, &discovery).await.map_err(unreachable)?)
        .map_err(|e| unreachable(format!("{discovery}: {e}")))?;
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| unreachable(format!("{discovery} names no jwks_uri")))?;
    let body = get(&client, jwks_uri).await.map_err(unreachable)?;
    Jwks::parse(&body)
}
