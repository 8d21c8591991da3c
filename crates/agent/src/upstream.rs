//! Where tokens come from: the node's IMDS for managed identities on the node (and for excepted pods),
//! Entra ID for service principals and federated identities. [`Upstream`] is the boundary the rest of the agent is tested against; the HTTP
//! implementation lives in [`crate::azure`].
//!
//! Retries happen under one fetch of the cache ([`crate::tokens`]), so they are never multiplied by the
//! number of callers: 429 and 5xx (and IMDS's 404/410 while it updates) are retried under the workspace's
//! retry policy ([`RETRY`]), a `Retry-After` is honoured when it fits the budget, anything else is
//! returned at once.

use std::{future::Future, pin::Pin, time::Duration};

use pod_identity_azure::{
    AzureError,
    retry::{RetryPolicy, RetryableError},
};

use crate::request::Selector;

/// An access token with what a pod's answer needs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The bearer token.
    pub access_token: String,
    /// Unix seconds.
    pub expires_on: i64,
    /// Unix seconds.
    pub not_before: i64,
    /// Client ID of the principal, when known.
    pub client_id: Option<String>,
    /// Object ID of the principal (the `oid` claim), when the token carries it.
    pub object_id: Option<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("expires_on", &self.expires_on)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Why upstream gave no token: what IMDS or Entra answered, sorted by the Azure model ([`AzureError`]),
/// or an identity whose credential the agent cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// IMDS or Entra refused, failed or could not be reached.
    #[error(transparent)]
    Azure(#[from] AzureError),
    /// The identity's credential could not be read (Secret missing, bad certificate).
    #[error("credential: {0}")]
    Credential(String),
}

impl RetryableError for UpstreamError {
    fn is_retryable(&self) -> bool {
        UpstreamError::is_retryable(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        UpstreamError::retry_after(self)
    }
}

impl UpstreamError {
    /// Whether asking again can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Azure(error) if error.is_retryable())
    }

    /// How long the service asked callers to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Azure(error) => error.retry_after(),
            Self::Credential(_) => None,
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Azure(AzureError::Throttled { .. }) => "throttled",
            Self::Azure(AzureError::Transient { status: Some(_), .. }) => "server_error",
            Self::Azure(AzureError::Transient { status: None, .. }) => "transport_error",
            Self::Azure(AzureError::InvalidResponse(_)) => "invalid_response",
            Self::Azure(AzureError::Config(_)) | Self::Credential(_) => "credential_error",
            Self::Azure(_) => "refused",
        }
    }
}

/// A service principal's proof of identity.
#[derive(Clone)]
pub enum Secret {
    /// A client secret (type 1).
    Password(String),
    /// A certificate's private key (PKCS#8 DER) and the certificate (DER) it signs assertions with
    /// (type 2).
    Certificate {
        /// PKCS#8 DER of an RSA key.
        key_pkcs8: Vec<u8>,
        /// DER of the certificate registered on the application.
        certificate: Vec<u8>,
    },
    /// A token of another issuer Entra trusts through a federated identity credential (a federated
    /// identity's subject token, [`crate::federation`]).
    Assertion(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password(_) => f.write_str("Password(..)"),
            Self::Certificate { .. } => f.write_str("Certificate(..)"),
            Self::Assertion(_) => f.write_str("Assertion(..)"),
        }
    }
}

/// What Entra needs to issue a service principal's token.
#[derive(Clone, Debug)]
pub struct ServicePrincipal {
    /// Authority, e.g. `https://login.microsoftonline.com/`.
    pub authority: String,
    /// Home tenant.
    pub tenant_id: String,
    /// Further tenants whose tokens come along (multi-tenant applications).
    pub auxiliary_tenant_ids: Vec<String>,
    /// Application (client) ID.
    pub client_id: String,
    /// The proof.
    pub secret: Secret,
}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The token services, one attempt per call (the caller retries, under [`RETRY`]).
pub trait Upstream: Send + Sync + 'static {
    /// A token from the node's IMDS for `selector` and `resource`.
    fn imds_token<'a>(
        &'a self,
        selector: &'a Selector,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>>;

    /// A token from Entra for a service principal in one tenant.
    fn entra_token<'a>(
        &'a self,
        principal: &'a ServicePrincipal,
        tenant_id: &'a str,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, UpstreamError>>;
}

/// How hard the agent tries a token call: 3 retries from 200 ms up to 4 s, waiting out a `Retry-After` of
/// up to 5 s. A pod's SDK waits for the answer, so the agent keeps its retries short and leaves longer
/// waits to the SDK, through the `Retry-After` of its 503.
pub const RETRY: RetryPolicy = RetryPolicy {
    max_retries: 3,
    initial_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(4),
    max_retry_after: Duration::from_secs(5),
};

/// The `oid` and `nbf` claims of a JWT, read without checking its signature: the token came straight
/// from the token service over the node's own connection, and is only read to learn whose it is.
pub fn claims(access_token: &str) -> (Option<String>, Option<i64>) {
    use base64::Engine;
    let Some(payload) = access_token.split('.').nth(1) else {
        return (None, None);
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return (None, None);
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return (None, None);
    };
    let oid = value["oid"].as_str().map(str::to_owned);
    let nbf = value["nbf"].as_i64();
    (oid, nbf)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine;
    use pod_identity_azure::retry::with_retries;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttling_and_server_errors_are_retried_then_passed_on() {
        let calls = AtomicUsize::new(0);
        let mut retried = 0;
        let result: Result<(), UpstreamError> = with_retries(
            &RETRY,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(AzureError::Transient {
                        status: Some(503),
                        code: String::new(),
                        message: "busy".into(),
                    }
                    .into())
                }
            },
            |_: &UpstreamError, _| retried += 1,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(retried, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_not_retried() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), UpstreamError> = with_retries(
            &RETRY,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(AzureError::IdentityNotFound {
                        code: "invalid_request".into(),
                        message: "Identity not found".into(),
                    }
                    .into())
                }
            },
            |_: &UpstreamError, _| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_for_when_short_and_passed_on_when_long() {
        let start = tokio::time::Instant::now();
        let calls = AtomicUsize::new(0);
        let result = with_retries(
            &RETRY,
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(AzureError::Throttled {
                            retry_after: Some(Duration::from_secs(2)),
                            message: String::new(),
                        }
                        .into())
                    } else {
                        Ok(n)
                    }
                }
            },
            |_: &UpstreamError, _| {},
        )
        .await;
        assert_eq!(result, Ok(1));
        assert!(start.elapsed() >= Duration::from_secs(2));
        let calls = AtomicUsize::new(0);
        let result: Result<(), _> = with_retries(
            &RETRY,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(AzureError::Throttled {
                        retry_after: Some(Duration::from_secs(60)),
                        message: String::new(),
                    }
                    .into())
                }
            },
            |_: &UpstreamError, _| {},
        )
        .await;
        assert_eq!(result.unwrap_err().retry_after(), Some(Duration::from_secs(60)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"oid":"o-1","nbf":123}"#);
        assert_eq!(claims(&format!("h.{payload}.s")), (Some("o-1".into()), Some(123)));
        assert_eq!(claims("not a jwt"), (None, None));
    }
}
