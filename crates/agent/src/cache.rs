//! Tokens per (principal, resource), shared by every pod of the node that may use them.
//!
//! A miss is fetched once however many requests ask at the same moment (single flight), and a failed
//! fetch is remembered for a short while so that callers arriving during or just after it get the same
//! answer instead of starting fetches of their own: upstream throttling and errors are never multiplied
//! by the number of callers. Entries are refreshed ahead of expiry by [`crate::tokens`], and dropped as
//! soon as no live pod may use their principal any more.

use std::{
    future::Future,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use pod_identity_azure::AzureError;

use crate::{
    resolve::{Authorized, ObjectIds, Principal},
    upstream::{Token, UpstreamError},
};

/// The tokens of one answer: one, or for a multi-tenant service principal the primary tenant's first and
/// then one per auxiliary tenant.
pub type Tokens = Arc<Vec<Token>>;

/// The earliest expiry of a set of tokens.
pub fn expires_on(tokens: &[Token]) -> i64 {
    tokens.iter().map(|t| t.expires_on).min().unwrap_or(0)
}

/// How long tokens are served and when they are renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// A cached token is served only while it has more than this left. SDKs treat tokens with five
    /// minutes or less as expired and would ask again at once; this stays a little above that.
    pub min_validity: Duration,
    /// Entries in use are renewed in the background once they have less than this left.
    pub refresh_ahead: Duration,
    /// Cached tokens are kept at most this long after they were fetched, however long they are valid
    /// (a cap on how long a revoked binding's token could linger elsewhere; `None`: until expiry).
    pub max_lifetime: Option<Duration>,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            min_validity: Duration::from_secs(330),
            refresh_ahead: Duration::from_secs(900),
            max_lifetime: None,
        }
    }
}

/// Where a cached token stands at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Serve it.
    Fresh,
    /// Serve it, and renew it in the background.
    RenewSoon,
    /// Do not serve it: fetch anew.
    Stale,
}

impl Freshness {
    /// Where a token fetched at `fetched_at` and expiring at `expires_on` stands at `now` (unix seconds).
    pub fn standing(&self, fetched_at: i64, expires_on: i64, now: i64) -> Standing {
        let capped = self
            .max_lifetime
            .map_or(expires_on, |cap| expires_on.min(fetched_at + secs(cap)));
        let remaining = capped - now;
        if remaining <= secs(self.min_validity) {
            Standing::Stale
        } else if remaining <= secs(self.refresh_ahead).max(secs(self.min_validity)) {
            Standing::RenewSoon
        } else {
            Standing::Fresh
        }
    }
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// A cache key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// Whose tokens.
    pub principal: Principal,
    /// For which resource (audience), as the pod asked.
    pub resource: String,
}

/// A key's principal and resource, owned ([`Key`]) or borrowed from a request (`(&Principal, &str)`):
/// a cached token is found without copying either.
pub trait KeyParts {
    /// Whose tokens, and for which resource.
    fn parts(&self) -> (&Principal, &str);
}

impl KeyParts for Key {
    fn parts(&self) -> (&Principal, &str) {
        (&self.principal, &self.resource)
    }
}

impl KeyParts for (&Principal, &str) {
    fn parts(&self) -> (&Principal, &str) {
        (self.0, self.1)
    }
}

// A key hashes and compares as its parts do, so that the entries' map is searched with borrowed ones.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

/// How a request was answered, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache.
    Hit,
    /// Fetched for this request.
    Miss,
    /// Waited for another request's fetch.
    Coalesced,
    /// A recent failure, answered again without asking upstream.
    RecentFailure,
}

impl Outcome {
    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::RecentFailure => "recent_failure",
        }
    }
}

#[derive(Debug)]
struct Stored {
    tokens: Tokens,
    fetched_at: i64,
}

#[derive(Debug)]
struct Failure {
    error: UpstreamError,
    until: tokio::time::Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct Entry {
    stored: RwLock<Option<Stored>>,
    flight: tokio::sync::Mutex<()>,
    failure: Mutex<Option<Failure>>,
    failures: AtomicU64,
    last_used: AtomicI64,
}

impl Entry {
    fn current(&self, freshness: &Freshness, now: i64) -> Option<(Tokens, Standing)> {
        let stored = self.stored.read().unwrap_or_else(|p| p.into_inner());
        stored.as_ref().map(|s| {
            let standing = freshness.standing(s.fetched_at, expires_on(&s.tokens), now);
            (s.tokens.clone(), standing)
        })
    }

    fn recent_failure(&self, since_generation: Option<u64>) -> Option<UpstreamError> {
        let failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure
            .as_ref()
            .filter(|f| f.until > tokio::time::Instant::now())
            .filter(|f| since_generation.is_none_or(|g| f.generation > g))
            .map(|f| f.error.clone())
    }
}

/// The node's token cache.
#[derive(Debug)]
pub struct TokenCache {
    entries: Mutex<foldhash::HashMap<Key, Arc<Entry>>>,
    object_ids: Mutex<foldhash::HashMap<Principal, String>>,
    freshness: Freshness,
    /// How long a failed fetch is answered from memory when upstream named no `Retry-After`.
    failure_memory: Duration,
}

impl TokenCache {
    /// An empty cache.
    pub fn new(freshness: Freshness, failure_memory: Duration) -> Self {
        Self {
            entries: Mutex::default(),
            object_ids: Mutex::default(),
            freshness,
            failure_memory,
        }
    }

    /// The freshness rules in force.
    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    fn entry(&self, key: &impl KeyParts) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = entries.get(key as &dyn KeyParts) {
            return entry.clone();
        }
        let (principal, resource) = key.parts();
        let entry = Arc::new(Entry::default());
        entries.insert(
            Key {
                principal: principal.clone(),
                resource: resource.to_owned(),
            },
            entry.clone(),
        );
        entry
    }

    /// The tokens for `key`: cached when fresh, else fetched by `fetch`, once for all concurrent callers.
    pub async fn get<F, Fut>(
        &self,
        key: &impl KeyParts,
        now: i64,
        fetch: F,
    ) -> (Result<Tokens, UpstreamError>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Token>, UpstreamError>>,
    {
        let entry = self.entry(key);
        // Written only when the second changes: both worker threads read the entry of a busy identity, and
        // a write on every request would move its cache line between them.
        if entry.last_used.load(Ordering::Relaxed) != now {
            entry.last_used.store(now, Ordering::Relaxed);
        }
        if let Some((tokens, Standing::Fresh | Standing::RenewSoon)) = entry.current(&self.freshness, now) {
            return (Ok(tokens), Outcome::Hit);
        }
        if let Some(error) = entry.recent_failure(None) {
            return (Err(error), Outcome::RecentFailure);
        }
        let generation = entry.failures.load(Ordering::Acquire);
        let (guard, waited) = match entry.flight.try_lock() {
            Ok(guard) => (guard, false),
            Err(_) => (entry.flight.lock().await, true),
        };
        if waited {
            // Whoever held the flight may have answered for us, either way.
            if let Some((tokens, Standing::Fresh | Standing::RenewSoon)) =
                entry.current(&self.freshness, now_or(now))
            {
                return (Ok(tokens), Outcome::Coalesced);
            }
            if let Some(error) = entry.recent_failure(Some(generation)) {
                return (Err(error), Outcome::RecentFailure);
            }
        }
        let result = self.fetch_locked(key, &entry, fetch).await;
        drop(guard);
        (result, if waited { Outcome::Coalesced } else { Outcome::Miss })
    }

    /// Fetches anew for `key` even if a fresh token is cached (background renewal); skipped when a fetch
    /// for it is already running.
    pub async fn renew<F, Fut>(&self, key: &impl KeyParts, fetch: F) -> Option<Result<Tokens, UpstreamError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Token>, UpstreamError>>,
    {
        let entry = self.entry(key);
        let guard = entry.flight.try_lock().ok()?;
        let result = self.fetch_locked(key, &entry, fetch).await;
        drop(guard);
        Some(result)
    }

    async fn fetch_locked<F, Fut>(
        &self,
        key: &impl KeyParts,
        entry: &Entry,
        fetch: F,
    ) -> Result<Tokens, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Token>, UpstreamError>>,
    {
        match fetch().await {
            Ok(tokens) if !tokens.is_empty() => {
                let tokens: Tokens = Arc::new(tokens);
                if let Some(oid) = tokens.first().and_then(|t| t.object_id.clone()) {
                    self.object_ids
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.parts().0.clone(), oid);
                }
                *entry.stored.write().unwrap_or_else(|p| p.into_inner()) = Some(Stored {
                    tokens: tokens.clone(),
                    fetched_at: crate::clock::now(),
                });
                *entry.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(tokens)
            }
            Ok(_) => Err(AzureError::InvalidResponse("upstream returned no token".into()).into()),
            Err(error) => {
                let memory = error.retry_after().unwrap_or(self.failure_memory);
                let generation = entry.failures.fetch_add(1, Ordering::AcqRel) + 1;
                *entry.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Failure {
                    error: error.clone(),
                    until: tokio::time::Instant::now() + memory,
                    generation,
                });
                Err(error)
            }
        }
    }

    /// Keys worth renewing now: in use since `used_since` and due for renewal.
    pub fn due_for_renewal(&self, now: i64, used_since: i64) -> Vec<Key> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .filter(|(_, entry)| entry.last_used.load(Ordering::Relaxed) >= used_since)
            .filter(|(_, entry)| {
                matches!(
                    entry.current(&self.freshness, now),
                    Some((_, Standing::RenewSoon | Standing::Stale))
                )
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Drops entries no live pod may use any more, and those unused since `used_since` whose token is no
    /// longer servable. Returns how many were dropped.
    pub fn retain(&self, authorized: &Authorized, now: i64, used_since: i64) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let before = entries.len();
        entries.retain(|key, entry| {
            if !authorized.allows(&key.principal) {
                return false;
            }
            let idle = entry.last_used.load(Ordering::Relaxed) < used_since;
            let stale = !matches!(
                entry.current(&self.freshness, now),
                Some((_, Standing::Fresh | Standing::RenewSoon))
            );
            // An entry being fetched is kept: its callers hold it.
            !(idle && stale) || entry.flight.try_lock().is_err()
        });
        let dropped = before - entries.len();
        drop(entries);
        self.object_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|principal, _| authorized.allows(principal));
        dropped
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn now_or(fallback: i64) -> i64 {
    crate::clock::now().max(fallback)
}

impl ObjectIds for TokenCache {
    fn object_id(&self, principal: &Principal) -> Option<String> {
        self.object_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(principal)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::request::Selector;

    fn key(client: &str) -> Key {
        Key {
            principal: Principal::Managed {
                client_id: client.into(),
            },
            resource: "https://vault.azure.net".into(),
        }
    }

    fn token(name: &str, expires_on: i64) -> Token {
        Token {
            access_token: name.into(),
            expires_on,
            not_before: 0,
            client_id: None,
            object_id: Some(format!("oid-{name}")),
        }
    }

    fn cache() -> TokenCache {
        TokenCache::new(Freshness::default(), Duration::from_secs(2))
    }

    #[test]
    fn standing_follows_remaining_validity() {
        let f = Freshness::default();
        assert_eq!(f.standing(0, 10_000, 0), Standing::Fresh);
        assert_eq!(f.standing(0, 10_000, 10_000 - 900), Standing::RenewSoon);
        assert_eq!(f.standing(0, 10_000, 10_000 - 330), Standing::Stale);
        assert_eq!(f.standing(0, 10_000, 20_000), Standing::Stale);
    }

    #[test]
    fn a_lifetime_cap_ages_tokens_out_early() {
        let f = Freshness {
            max_lifetime: Some(Duration::from_secs(3_600)),
            ..Freshness::default()
        };
        assert_eq!(f.standing(0, 86_400, 1_000), Standing::Fresh);
        assert_eq!(f.standing(0, 86_400, 3_600 - 100), Standing::Stale);
    }

    #[tokio::test]
    async fn a_hit_does_not_fetch() {
        let cache = cache();
        let now = crate::clock::now();
        let (first, outcome) = cache
            .get(
                &key("a"),
                now,
                || async move { Ok(vec![token("t1", now + 3600)]) },
            )
            .await;
        assert_eq!(outcome, Outcome::Miss);
        assert_eq!(first.unwrap()[0].access_token, "t1");
        let (second, outcome) = cache
            .get(&key("a"), now, || async {
                panic!("a fresh token must not be fetched again")
            })
            .await;
        assert_eq!(outcome, Outcome::Hit);
        assert_eq!(second.unwrap()[0].access_token, "t1");
        assert_eq!(cache.object_id(&key("a").principal).as_deref(), Some("oid-t1"));
    }

    #[tokio::test]
    async fn a_key_borrowed_from_a_request_finds_the_entry_of_the_same_parts_and_no_other() {
        let cache = cache();
        let now = crate::clock::now();
        let stored = key("a");
        let _ = cache
            .get(&stored, now, || async move { Ok(vec![token("t1", now + 3600)]) })
            .await;
        let principal = stored.principal.clone();
        let resource = String::from("https://vault.azure.net");
        let (found, outcome) = cache
            .get(&(&principal, resource.as_str()), now, || async {
                panic!("the owned key's entry must be found")
            })
            .await;
        assert_eq!(
            (found.unwrap()[0].access_token.as_str(), outcome),
            ("t1", Outcome::Hit)
        );
        // Another resource, or the same client ID as another kind of principal, is another entry.
        for (principal, resource) in [
            (principal.clone(), "https://management.azure.com/"),
            (
                Principal::Node(Selector::ClientId("a".into())),
                "https://vault.azure.net",
            ),
        ] {
            let (_, outcome) = cache
                .get(&(&principal, resource), now, || async move {
                    Ok(vec![token("t2", now + 3600)])
                })
                .await;
            assert_eq!(outcome, Outcome::Miss, "{principal:?} {resource}");
        }
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test]
    async fn concurrent_misses_fetch_once() {
        let cache = Arc::new(cache());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let now = crate::clock::now();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key("a"), now, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(vec![token("t", now + 3600)])
                    })
                    .await
            }));
        }
        // On this single-threaded runtime one yield runs every task until it waits: one in the fetch,
        // held by the gate, the others for its flight.
        tokio::task::yield_now().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        gate.notify_one();
        let mut outcomes = Vec::new();
        for task in tasks {
            let (result, outcome) = task.await.unwrap();
            assert_eq!(result.unwrap()[0].access_token, "t");
            outcomes.push(outcome);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Miss).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Coalesced).count(), 31);
    }

    #[tokio::test]
    async fn a_failure_is_shared_by_waiting_callers_and_remembered_briefly() {
        let cache = Arc::new(cache());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let now = crate::clock::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&key("a"), now, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Err(UpstreamError::from(AzureError::Throttled {
                            retry_after: Some(Duration::from_secs(30)),
                            message: "slow down".into(),
                        }))
                    })
                    .await
            }));
        }
        // As above: every caller is waiting, one of them in the fetch.
        tokio::task::yield_now().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        gate.notify_one();
        let mut outcomes = Vec::new();
        for task in tasks {
            let (result, outcome) = task.await.unwrap();
            assert!(result.is_err());
            outcomes.push(outcome);
        }
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Miss).count(), 1);
        assert_eq!(
            outcomes.iter().filter(|o| **o == Outcome::RecentFailure).count(),
            7
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "waiting callers reuse the failure"
        );
        let (again, outcome) = cache
            .get(&key("a"), now, || async { panic!("remembered failure") })
            .await;
        assert!(again.is_err());
        assert_eq!(outcome, Outcome::RecentFailure);
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_failure_expires() {
        let cache = cache();
        let now = crate::clock::now();
        let (first, _) = cache
            .get(&key("a"), now, || async {
                Err(AzureError::InvalidResponse("bad".into()).into())
            })
            .await;
        assert!(first.is_err());
        tokio::time::advance(Duration::from_secs(3)).await;
        let (second, outcome) = cache
            .get(&key("a"), now, || async move { Ok(vec![token("t", now + 3600)]) })
            .await;
        assert!(second.is_ok());
        assert_eq!(outcome, Outcome::Miss);
    }

    #[tokio::test]
    async fn stale_tokens_are_fetched_again_and_due_ones_listed() {
        let cache = cache();
        let now = crate::clock::now();
        let _ = cache
            .get(
                &key("a"),
                now,
                || async move { Ok(vec![token("old", now + 600)]) },
            )
            .await;
        assert_eq!(cache.due_for_renewal(now, now - 10), vec![key("a")]);
        assert!(
            cache.due_for_renewal(now, now + 10).is_empty(),
            "unused entries are not renewed"
        );
        let (fresh, outcome) = cache
            .get(&key("a"), now + 400, || async move {
                Ok(vec![token("new", now + 3600)])
            })
            .await;
        assert_eq!(outcome, Outcome::Miss);
        assert_eq!(fresh.unwrap()[0].access_token, "new");
        let renewed = cache
            .renew(&key("a"), || async move { Ok(vec![token("newer", now + 7200)]) })
            .await;
        assert_eq!(renewed.unwrap().unwrap()[0].access_token, "newer");
    }

    #[tokio::test]
    async fn entries_of_principals_no_pod_may_use_are_dropped() {
        let cache = cache();
        let now = crate::clock::now();
        for client in ["a", "b"] {
            let _ = cache
                .get(&key(client), now, || async move {
                    Ok(vec![token(client, now + 3600)])
                })
                .await;
        }
        let node_key = Key {
            principal: Principal::Node(Selector::Default),
            resource: "r".into(),
        };
        let _ = cache
            .get(&node_key, now, || async move { Ok(vec![token("n", now + 3600)]) })
            .await;
        let mut authorized = Authorized::default();
        authorized.principals.insert(key("a").principal);
        assert_eq!(cache.retain(&authorized, now, 0), 2);
        assert_eq!(cache.len(), 1);
        assert!(cache.object_id(&key("b").principal).is_none());
        let (_, outcome) = cache
            .get(&key("a"), now, || async { panic!("still cached") })
            .await;
        assert_eq!(outcome, Outcome::Hit);
    }
}
