//! Access tokens and where they come from. ARM calls take any [`TokenSource`] (IMDS for a managed identity,
//! Entra for a service principal); [`CachedTokens`] keeps one token per resource and fetches a new one only
//! when less than five minutes remain, one fetch at a time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::AzureError;

#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: String,
    /// Unix seconds.
    pub expires_on: i64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// Whether the token has less than `margin` left at `now` (unix seconds).
    pub fn expires_within(&self, now: i64, margin: Duration) -> bool {
        self.expires_on - now < margin.as_secs() as i64
    }
}

pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<AccessToken, AzureError>> + Send + 'a>>;

/// Something that hands out tokens for a resource (`https://management.azure.com/`...).
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    fn token<'a>(&'a self, resource: &'a str) -> TokenFuture<'a>;
}

/// A fixed token, for tests and for callers that manage tokens themselves.
#[derive(Debug, Clone)]
pub struct StaticToken(pub AccessToken);

impl TokenSource for StaticToken {
    fn token<'a>(&'a self, _resource: &'a str) -> TokenFuture<'a> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

pub fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

#[derive(Debug)]
pub struct CachedTokens<S> {
    inner: S,
    margin: Duration,
    cache: tokio::sync::Mutex<HashMap<String, AccessToken>>,
}

impl<S: TokenSource> CachedTokens<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            margin: Duration::from_secs(300),
            cache: tokio::sync::Mutex::default(),
        }
    }

    /// Drops the cached token for `resource` (after the service refused it).
    pub async fn invalidate(&self, resource: &str) {
        self.cache.lock().await.remove(resource);
    }
}

impl<S: TokenSource> TokenSource for CachedTokens<S> {
    fn token<'a>(&'a self, resource: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            // Held across the fetch: concurrent callers wait for one fetch instead of each making their own.
            let mut cache = self.cache.lock().await;
            if let Some(t) = cache.get(resource)
                && !t.expires_within(now_secs(), self.margin)
            {
                return Ok(t.clone());
            }
            let t = self.inner.token(resource).await?;
            cache.insert(resource.to_owned(), t.clone());
            Ok(t)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicI64);

    impl TokenSource for Counting {
        fn token<'a>(&'a self, _r: &'a str) -> TokenFuture<'a> {
            Box::pin(async move {
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                // The first token is about to expire, the second is good for an hour.
                let life = if n == 0 { 60 } else { 3600 };
                Ok(AccessToken {
                    token: format!("t{n}"),
                    expires_on: now_secs() + life,
                })
            })
        }
    }

    #[tokio::test]
    async fn refreshes_tokens_close_to_expiry_and_reuses_others() {
        let c = CachedTokens::new(Counting::default());
        assert_eq!(c.token("r").await.unwrap().token, "t0");
        assert_eq!(c.token("r").await.unwrap().token, "t1");
        assert_eq!(c.token("r").await.unwrap().token, "t1");
        assert_eq!(c.token("other").await.unwrap().token, "t2");
        c.invalidate("r").await;
        assert_eq!(c.token("r").await.unwrap().token, "t3");
    }
}
