//! How long to hold back besides retrying (whose waits are the Azure crate's one policy,
//! [`pod_identity_azure::RetryPolicy`]): holds on a whole subscription after it was throttled, quarantine
//! periods for identities ARM refuses, and the budget of drift-check reads. Pure over the instants callers
//! pass.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Longest quarantine reason kept, in bytes. The reason quotes ARM's error message and is written into
/// an annotation of every assignment it concerns and into Events; ARM's messages are unbounded.
pub const MAX_REASON_BYTES: usize = pod_identity_api::text::EVENT_NOTE_MAX_BYTES;

#[derive(Clone, Debug)]
struct Entry {
    until: Instant,
    strikes: u32,
    reason: String,
}

/// Identities ARM refused (missing, or not ours to assign). They are left out of requests until their
/// period ends, then tried once more; each further refusal doubles the period. Keys are case-folded IDs.
#[derive(Debug)]
pub struct Quarantine {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

impl Quarantine {
    /// Periods start at `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            entries: HashMap::new(),
        }
    }

    /// Quarantines an identity (again); returns whether it was not quarantined before and the period.
    pub fn add(&mut self, key: &str, reason: &str, now: Instant) -> (bool, Duration) {
        let strikes = self.entries.get(key).map_or(0, |e| e.strikes + 1);
        let period = self
            .initial
            .saturating_mul(1u32.checked_shl(strikes.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        let fresh = self.entries.get(key).is_none_or(|e| e.until <= now);
        self.entries.insert(
            key.to_owned(),
            Entry {
                until: now + period,
                strikes,
                reason: pod_identity_api::text::truncate(reason, MAX_REASON_BYTES).into_owned(),
            },
        );
        (fresh, period)
    }

    /// Why the identity is quarantined, while it is.
    pub fn reason(&self, key: &str, now: Instant) -> Option<String> {
        self.entries
            .get(key)
            .filter(|e| e.until > now)
            .map(|e| e.reason.clone())
    }

    /// Forgets an identity once ARM accepted it.
    pub fn clear(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// When the earliest of these identities leaves quarantine.
    pub fn next_release<'a>(&self, keys: impl IntoIterator<Item = &'a str>, now: Instant) -> Option<Instant> {
        keys.into_iter()
            .filter_map(|k| self.entries.get(k))
            .map(|e| e.until)
            .filter(|until| *until > now)
            .min()
    }

    /// How many identities are quarantined now.
    pub fn active(&self, now: Instant) -> usize {
        self.entries.values().filter(|e| e.until > now).count()
    }
}

/// A token bucket for drift-check reads: `per_period` reads per `period`, shared by all workers, so
/// that a cluster with many machines checks them in turn instead of all at once.
#[derive(Debug)]
pub struct ReadBudget {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    last: Instant,
}

impl ReadBudget {
    /// `per_period` reads per `period`, starting full.
    pub fn new(per_period: u32, period: Duration, now: Instant) -> Self {
        let capacity = f64::from(per_period.max(1));
        Self {
            capacity,
            tokens: capacity,
            per_second: capacity / period.as_secs_f64().max(0.001),
            last: now,
        }
    }

    /// Takes a read if one is left; otherwise how long until one is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

/// How long ARM asked whole subscriptions to wait: a 429 from a subscription's bucket (ARM's front door,
/// which counts the controller's requests per subscription, or one of Compute's per-subscription
/// policies) holds back every machine's calls of that kind in the subscription, not only the one that
/// was refused, so that no request is sent inside the `Retry-After` window. Keys are case-folded
/// subscription IDs.
#[derive(Debug, Default)]
pub struct SubscriptionHolds {
    holds: HashMap<(String, bool), Instant>,
}

impl SubscriptionHolds {
    /// Holds the subscription's writes (`write`) or reads until `until`; the later deadline wins.
    pub fn hold(&mut self, subscription: &str, write: bool, until: Instant) {
        let slot = self
            .holds
            .entry((subscription.to_ascii_lowercase(), write))
            .or_insert(until);
        *slot = (*slot).max(until);
    }

    /// Until when the subscription's writes (`write`) or reads are held, if they are at `now`.
    pub fn until(&self, subscription: &str, write: bool, now: Instant) -> Option<Instant> {
        self.holds
            .get(&(subscription.to_ascii_lowercase(), write))
            .copied()
            .filter(|until| *until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_periods_double_and_expire() {
        let now = Instant::now();
        let mut q = Quarantine::new(Duration::from_secs(60), Duration::from_secs(600));
        assert_eq!(q.add("x", "gone", now), (true, Duration::from_secs(60)));
        assert_eq!(q.reason("x", now).as_deref(), Some("gone"));
        assert_eq!(q.active(now), 1);
        let later = now + Duration::from_secs(61);
        assert_eq!(q.reason("x", later), None, "tried again after the period");
        assert_eq!(q.add("x", "gone", later), (true, Duration::from_secs(120)));
        assert_eq!(
            q.next_release(["x", "y"], later),
            Some(later + Duration::from_secs(120))
        );
        assert!(q.clear("x"));
        assert_eq!(q.reason("x", later), None);
    }

    #[test]
    fn a_long_reason_is_kept_cut_on_a_character_boundary() {
        let now = Instant::now();
        let mut q = Quarantine::new(Duration::from_secs(60), Duration::from_secs(600));
        let reason = format!(
            "LinkedAuthorizationFailed: {}{}",
            "a".repeat(970),
            "é".repeat(500)
        );
        q.add("x", &reason, now);
        let kept = q.reason("x", now).unwrap();
        assert!(
            kept.len() <= MAX_REASON_BYTES && kept.ends_with('…'),
            "{}",
            kept.len()
        );
    }

    #[test]
    fn a_subscription_hold_covers_one_kind_of_call_until_the_latest_deadline() {
        let now = Instant::now();
        let mut holds = SubscriptionHolds::default();
        holds.hold("Sub-1", true, now + Duration::from_secs(5));
        holds.hold("sub-1", true, now + Duration::from_secs(2));
        assert_eq!(
            holds.until("SUB-1", true, now),
            Some(now + Duration::from_secs(5))
        );
        assert_eq!(holds.until("sub-1", false, now), None, "reads go on");
        assert_eq!(holds.until("sub-2", true, now), None, "other subscriptions go on");
        assert_eq!(holds.until("sub-1", true, now + Duration::from_secs(5)), None);
    }

    #[test]
    fn read_budget_spreads_reads_over_the_period() {
        let now = Instant::now();
        let mut budget = ReadBudget::new(2, Duration::from_secs(60), now);
        assert!(budget.take(now).is_ok());
        assert!(budget.take(now).is_ok());
        let wait = budget.take(now).unwrap_err();
        assert_eq!(wait.as_secs(), 30);
        assert!(budget.take(now + Duration::from_secs(30)).is_ok());
    }
}
