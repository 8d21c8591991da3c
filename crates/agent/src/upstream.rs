//! Where tokens come from: the node's IMDS for managed identities on the node (and for excepted pods),
//! Entra ID for service principals and federated identities. [`Upstream`] is the boundary the rest of the agent is tested against; the HTTP
//! implementation lives in [`crate::azure`].
//!
//! Retries happen here, under one fetch of the cache, so they are never multiplied by the number of
//! callers: 429 and 5xx (and IMDS's 404/410 while it updates) are retried with exponential backoff, a
//! `Retry-After` is honoured when it fits the budget, anything else is returned at once.

use std::{future::Future, pin::Pin, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::{cache::Token, request::Selector};

/// Why upstream gave no token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// 429.
    #[error("throttled (retry after {retry_after:?}): {message}")]
    Throttled {
        /// What the service asked for.
        retry_after: Option<Duration>,
        /// Its message.
        message: String,
    },
    /// 5xx, IMDS 404/410, connection failures and timeouts.
    #[error("transient failure ({status:?}): {message}")]
    Transient {
        /// HTTP status, if any.
        status: Option<u16>,
        /// What went wrong.
        message: String,
    },
    /// A definite refusal (IMDS 400 "Identity not found", Entra `invalid_client`...).
    #[error("refused ({status} {error}): {description}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The `error` code.
        error: String,
        /// The `error_description`.
        description: String,
    },
    /// The service answered something unreadable.
    #[error("unexpected response: {0}")]
    Invalid(String),
    /// The identity's credential could not be read (Secret missing, bad certificate).
    #[error("credential: {0}")]
    Credential(String),
}

impl UpstreamError {
    /// Whether asking again can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient { .. })
    }

    /// How long the service asked callers to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Throttled { .. } => "throttled",
            Self::Transient { status: Some(_), .. } => "server_error",
            Self::Transient { status: None, .. } => "transport_error",
            Self::Refused { .. } => "refused",
            Self::Invalid(_) => "invalid_response",
            Self::Credential(_) => "credential_error",
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

/// The token services, one attempt per call (retries are [`with_retries`]'s).
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

/// How hard to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: usize,
    /// First backoff delay.
    pub initial_delay: Duration,
    /// Longest backoff delay.
    pub max_delay: Duration,
    /// The longest `Retry-After` waited for; a longer one ends the attempts and is passed on.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 3,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(4),
            max_retry_after: Duration::from_secs(5),
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the policy is spent; `on_retry` sees every
/// failure that is retried.
pub async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    mut attempt: F,
    mut on_retry: impl FnMut(&UpstreamError),
) -> Result<T, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(policy.initial_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.retries)
        .with_jitter()
        .build();
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if !error.is_retryable() {
            return Err(error);
        }
        let Some(proposed) = backoff.next() else {
            return Err(error);
        };
        let delay = match error.retry_after() {
            Some(asked) if asked > policy.max_retry_after => return Err(error),
            Some(asked) => asked,
            None => proposed,
        };
        on_retry(&error);
        tokio::time::sleep(delay).await;
    }
}

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

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttling_and_server_errors_are_retried_then_passed_on() {
        let calls = AtomicUsize::new(0);
        let mut retried = 0;
        let result: Result<(), _> = with_retries(
            RetryPolicy::default(),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(UpstreamError::Transient {
                        status: Some(503),
                        message: "busy".into(),
                    })
                }
            },
            |_| retried += 1,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(retried, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_not_retried() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), _> = with_retries(
            RetryPolicy::default(),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(UpstreamError::Refused {
                        status: 400,
                        error: "invalid_request".into(),
                        description: "Identity not found".into(),
                    })
                }
            },
            |_| {},
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
            RetryPolicy::default(),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(UpstreamError::Throttled {
                            retry_after: Some(Duration::from_secs(2)),
                            message: String::new(),
                        })
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| {},
        )
        .await;
        assert_eq!(result, Ok(1));
        assert!(start.elapsed() >= Duration::from_secs(2));
        let calls = AtomicUsize::new(0);
        let result: Result<(), _> = with_retries(
            RetryPolicy::default(),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(UpstreamError::Throttled {
                        retry_after: Some(Duration::from_secs(60)),
                        message: String::new(),
                    })
                }
            },
            |_| {},
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
