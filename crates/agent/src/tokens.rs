//! Getting a principal's tokens: through the cache, from IMDS or Entra (for a federated identity, in
//! exchange for its subject's token: [`crate::federation`]), with retries, and keeping the cache in step
//! with the world (renewing entries in use before they expire, dropping those no pod may
//! use any more).

use std::{sync::Arc, time::Duration};

use pod_identity_api::AzureIdentity;
use pod_identity_azure::retry::{RetryPolicy, with_retries};

use crate::{
    cache::{Outcome, TokenCache, Tokens},
    federation::{SubjectToken, Subjects},
    metrics::{Metrics, UpstreamLabels, UpstreamOnly},
    request::Selector,
    resolve::{self, Policy, Principal},
    upstream::Token,
    upstream::{BoxFuture, ServicePrincipal, Upstream, UpstreamError},
    world::Shared,
};

/// Reads a service principal's credential.
pub trait Credentials: Send + Sync + 'static {
    /// The credential of an AzureIdentity of type 1 or 2.
    fn load<'a>(
        &'a self,
        identity: &'a AzureIdentity,
    ) -> BoxFuture<'a, Result<ServicePrincipal, UpstreamError>>;
}

/// Credentials from the Secrets the identities name.
#[derive(Clone)]
pub struct SecretCredentials(pub kube::Client);

impl Credentials for SecretCredentials {
    fn load<'a>(
        &'a self,
        identity: &'a AzureIdentity,
    ) -> BoxFuture<'a, Result<ServicePrincipal, UpstreamError>> {
        Box::pin(crate::credentials::load(&self.0, identity))
    }
}

/// Tokens for principals.
pub struct TokenService {
    cache: TokenCache,
    upstream: Arc<dyn Upstream>,
    credentials: Arc<dyn Credentials>,
    subjects: Option<Arc<Subjects>>,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// A service over these upstreams.
    pub fn new(
        cache: TokenCache,
        upstream: Arc<dyn Upstream>,
        credentials: Arc<dyn Credentials>,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cache,
            upstream,
            credentials,
            subjects: None,
            retry,
            metrics,
        }
    }

    /// Serves federated identities with the tokens of these subjects; without them, a federated identity's
    /// request is refused with the reason.
    pub fn with_federation(mut self, subjects: Arc<Subjects>) -> Self {
        self.subjects = Some(subjects);
        self
    }

    /// The cache (for object IDs and sizes).
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The tokens of `principal` for `resource`; `identity` is the AzureIdentity of a service principal.
    pub async fn tokens(
        &self,
        principal: &Principal,
        identity: Option<&AzureIdentity>,
        resource: &str,
    ) -> (Result<Tokens, UpstreamError>, Outcome) {
        // The fetch is boxed: a cached answer, the common case, then carries a pointer to it instead
        // of the upstream requests' whole state through every move of the request's future.
        let (result, outcome) = self
            .cache
            .get(&(principal, resource), crate::clock::now(), || {
                Box::pin(self.fetch(principal, identity, resource))
            })
            .await;
        self.metrics.looked_up(outcome.label());
        // A hit found its entry there: the number of entries is unchanged.
        if outcome != Outcome::Hit {
            self.metrics
                .cache_entries
                .set(i64::try_from(self.cache.len()).unwrap_or(i64::MAX));
        }
        (result, outcome)
    }

    async fn fetch(
        &self,
        principal: &Principal,
        identity: Option<&AzureIdentity>,
        resource: &str,
    ) -> Result<Vec<Token>, UpstreamError> {
        match principal {
            Principal::Managed { client_id } => {
                let selector = Selector::ClientId(client_id.clone());
                Ok(vec![self.imds(&selector, resource).await?])
            }
            Principal::Node(selector) => Ok(vec![self.imds(selector, resource).await?]),
            Principal::ServicePrincipal { .. } => {
                let identity = identity.ok_or_else(|| {
                    UpstreamError::Credential("the service principal's AzureIdentity is gone".into())
                })?;
                let sp = self.credentials.load(identity).await?;
                let mut tokens = Vec::with_capacity(1 + sp.auxiliary_tenant_ids.len());
                tokens.push(self.entra(&sp, &sp.tenant_id, resource).await?);
                for tenant in &sp.auxiliary_tenant_ids {
                    tokens.push(self.entra(&sp, tenant, resource).await?);
                }
                Ok(tokens)
            }
            Principal::Federated { .. } => {
                let identity = identity.ok_or_else(|| {
                    UpstreamError::Credential("the federated identity's AzureIdentity is gone".into())
                })?;
                Ok(vec![self.federated(identity, resource).await?])
            }
        }
    }

    /// A token of a federated identity: its subject's token, exchanged with Entra.
    async fn federated(&self, identity: &AzureIdentity, resource: &str) -> Result<Token, UpstreamError> {
        let subjects = self.subjects.as_ref().ok_or_else(|| {
            UpstreamError::Credential(format!(
                "identity {} is federated, and this agent serves no federated identity: start it with --federation-namespace (the chart's federation.enabled)",
                crate::world::key_of(identity)
            ))
        })?;
        let exchange = subjects.exchange(identity);
        let subject: SubjectToken = self
            .observed("kubernetes", || {
                let exchange = &exchange;
                Box::pin(async move { subjects.token(exchange, crate::clock::now()).await })
            })
            .await?;
        let principal = exchange.principal(&subject)?;
        let attempt = || async {
            let result = self
                .observed_once("entra", || {
                    self.upstream
                        .entra_token(&principal, &principal.tenant_id, resource)
                })
                .await;
            result.map_err(|error| exchange.explain(error, &subject))
        };
        let result = with_retries(&self.retry, attempt, |error: &UpstreamError, delay| {
            tracing::info!(upstream = "entra", %error, delay_ms = delay.as_millis() as u64, "retrying a federated token exchange");
        })
        .await;
        if result.is_err() {
            subjects.forget(&exchange);
        }
        result
    }

    async fn imds(&self, selector: &Selector, resource: &str) -> Result<Token, UpstreamError> {
        self.observed("imds", || self.upstream.imds_token(selector, resource))
            .await
    }

    async fn entra(
        &self,
        sp: &ServicePrincipal,
        tenant: &str,
        resource: &str,
    ) -> Result<Token, UpstreamError> {
        self.observed("entra", || self.upstream.entra_token(sp, tenant, resource))
            .await
    }

    async fn observed<'a, T, F>(&self, upstream: &'static str, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> BoxFuture<'a, Result<T, UpstreamError>>,
    {
        let attempt = || self.observed_once(upstream, &call);
        with_retries(&self.retry, attempt, |error: &UpstreamError, delay| {
            tracing::info!(upstream, %error, delay_ms = delay.as_millis() as u64, "retrying upstream token request");
        })
        .await
    }

    /// One call, timed and counted.
    async fn observed_once<'a, T, F>(&self, upstream: &'static str, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> BoxFuture<'a, Result<T, UpstreamError>>,
    {
        let started = std::time::Instant::now();
        let result = call().await;
        self.metrics
            .upstream_duration
            .get_or_create(&UpstreamOnly { upstream })
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(error) => error.label(),
        };
        self.metrics
            .upstream
            .get_or_create(&UpstreamLabels {
                upstream,
                result: label,
            })
            .inc();
        result
    }

    /// Renews entries in use before they expire and drops those no live pod may use; runs until the
    /// process ends. Woken by every change of the world (bindings or assignments going away drop
    /// entries at once) and every `interval`.
    pub async fn maintain(
        self: Arc<Self>,
        shared: Arc<Shared>,
        policy: Policy,
        interval: Duration,
        idle: Duration,
    ) {
        let mut changes = shared.subscribe();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renew = tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = ticker.tick() => true,
            };
            let now = crate::clock::now();
            let used_since = now - i64::try_from(idle.as_secs()).unwrap_or(i64::MAX);
            let authorized = resolve::authorized(&shared.read(), policy);
            if let Some(authorized) = &authorized {
                let dropped = self.cache.retain(authorized, now, used_since);
                if dropped > 0 {
                    tracing::info!(
                        dropped,
                        "dropped cached tokens no pod of this node may use any more"
                    );
                }
            }
            self.metrics
                .cache_entries
                .set(i64::try_from(self.cache.len()).unwrap_or(i64::MAX));
            if renew {
                self.renew_due(&shared, now, used_since).await;
            }
        }
    }

    async fn renew_due(&self, shared: &Shared, now: i64, used_since: i64) {
        for key in self.cache.due_for_renewal(now, used_since) {
            let identity = match &key.principal {
                Principal::ServicePrincipal { identity, .. } | Principal::Federated { identity, .. } => {
                    let found = shared
                        .read()
                        .matching
                        .identity(&identity.namespace, &identity.name)
                        .cloned();
                    match found {
                        Some(object) => Some(object),
                        None => continue,
                    }
                }
                _ => None,
            };
            let renewed = self
                .cache
                .renew(&key, || {
                    self.fetch(&key.principal, identity.as_ref(), &key.resource)
                })
                .await;
            match renewed {
                Some(Ok(_)) => {
                    tracing::debug!(principal = key.principal.kind(), resource = %key.resource, "renewed a token ahead of expiry")
                }
                Some(Err(error)) => {
                    tracing::warn!(principal = key.principal.kind(), resource = %key.resource, %error, "renewing a token failed; the cached one is served while valid")
                }
                None => {}
            }
        }
    }
}
