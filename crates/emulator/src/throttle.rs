//! ARM's throttling model: token buckets. ARM's front door keeps a read and a write bucket per principal and
//! subscription (ARM's request-limits-and-throttling document: requests are "throttled per principal ID");
//! Compute keeps, for each operation policy, one bucket per resource and one per subscription, shared by
//! every caller (refill per minute / capacity as in the Compute throttling documentation). A request goes
//! through only when every bucket it draws from holds a token; otherwise it gets 429 with the wait until the
//! emptiest one refills. A bucket that refused a request remembers until when it told the caller to wait, so
//! that a request sent inside that `Retry-After` window is told apart (ARM answers it with a fresh 429; tests
//! of a client's politeness count them). Pure over an [`Instant`] the caller passes, so tests drive time by
//! hand.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A Compute throttling policy (an operation group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Policy {
    GetVmss,
    UpdateVmss,
    GetVm,
    UpdateVm,
    GetOperation,
}

impl Policy {
    /// The operation-group name CRP reports in `x-ms-ratelimit-remaining-resource` and 429 details.
    pub fn name(self) -> &'static str {
        match self {
            Self::GetVmss => "GetVMScaleSet",
            Self::UpdateVmss => "PutVMScaleSet",
            Self::GetVm => "GetVM",
            Self::UpdateVm => "PutVM",
            Self::GetOperation => "GetOperationStatus",
        }
    }
}

/// One bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketLimit {
    pub refill_per_minute: f64,
    pub capacity: f64,
}

impl BucketLimit {
    pub const fn new(refill_per_minute: f64, capacity: f64) -> Self {
        Self {
            refill_per_minute,
            capacity,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyLimits {
    pub per_resource: BucketLimit,
    pub per_subscription: BucketLimit,
}

/// All limits; the defaults are Azure's published numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ThrottleConfig {
    pub enabled: bool,
    pub compute: BTreeMap<Policy, PolicyLimits>,
    /// ARM front door, per principal and subscription: 250 reads refilled at 25/s.
    pub arm_reads: BucketLimit,
    /// ARM front door, per principal and subscription: 200 writes refilled at 10/s.
    pub arm_writes: BucketLimit,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let p = |r: f64, c: f64, sr: f64, sc: f64| PolicyLimits {
            per_resource: BucketLimit::new(r, c),
            per_subscription: BucketLimit::new(sr, sc),
        };
        Self {
            enabled: true,
            compute: BTreeMap::from([
                (Policy::UpdateVmss, p(4.0, 12.0, 500.0, 1500.0)),
                (Policy::GetVmss, p(12.0, 36.0, 800.0, 2400.0)),
                (Policy::UpdateVm, p(4.0, 12.0, 500.0, 1500.0)),
                (Policy::GetVm, p(12.0, 36.0, 8000.0, 24000.0)),
                (Policy::GetOperation, p(15.0, 45.0, 5000.0, 15000.0)),
            ]),
            arm_reads: BucketLimit::new(25.0 * 60.0, 250.0),
            arm_writes: BucketLimit::new(10.0 * 60.0, 200.0),
        }
    }
}

/// Which bucket ran dry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// ARM's front door for the subscription (`reads` or `writes`).
    Arm {
        write: bool,
    },
    ComputeResource(Policy),
    ComputeSubscription(Policy),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the `x-ms-ratelimit-remaining-*` headers to send.
    Allowed(Vec<(&'static str, String)>),
    Throttled {
        scope: Scope,
        retry_after: Duration,
        /// The bucket's capacity, reported as `allowedRequestCount`.
        allowed: u64,
    },
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refilled(&mut self, limit: BucketLimit, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.refill_per_minute / 60.0).min(limit.capacity);
        self.last = now;
        self.tokens
    }

    fn wait_for_one(&self, limit: BucketLimit) -> Duration {
        if limit.refill_per_minute <= 0.0 {
            return Duration::from_secs(3600);
        }
        let secs = ((1.0 - self.tokens).max(0.0) * 60.0 / limit.refill_per_minute).ceil();
        Duration::from_secs((secs as u64).max(1))
    }
}

/// What a request draws from.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub subscription: &'a str,
    /// The caller's object ID (the token's `oid`).
    pub principal: &'a str,
    pub resource: &'a str,
    pub write: bool,
    pub policy: Option<Policy>,
}

/// The state of every bucket, created full on first use.
#[derive(Debug, Default)]
pub struct Throttler {
    buckets: HashMap<(String, String), Bucket>,
    /// Until when each bucket that refused a request told its caller to wait.
    windows: HashMap<(String, String), Instant>,
}

impl Throttler {
    pub fn check(&mut self, cfg: &ThrottleConfig, now: Instant, req: &Request<'_>) -> Decision {
        self.admit(cfg, now, req).0
    }

    /// [`Throttler::check`], and whether the request draws from a bucket whose `Retry-After` window is still
    /// open: its caller did not wait as told.
    pub fn admit(&mut self, cfg: &ThrottleConfig, now: Instant, req: &Request<'_>) -> (Decision, bool) {
        if !cfg.enabled {
            return (Decision::Allowed(Vec::new()), false);
        }
        let sub = req.subscription.to_ascii_lowercase();
        let mut draws: Vec<(String, String, BucketLimit, Scope)> = vec![(
            format!("arm/{}", if req.write { "writes" } else { "reads" }),
            format!("{sub}/{}", req.principal.to_ascii_lowercase()),
            if req.write { cfg.arm_writes } else { cfg.arm_reads },
            Scope::Arm { write: req.write },
        )];
        if let Some(policy) = req.policy
            && let Some(limits) = cfg.compute.get(&policy)
        {
            draws.push((
                format!("{}/sub", policy.name()),
                sub.clone(),
                limits.per_subscription,
                Scope::ComputeSubscription(policy),
            ));
            draws.push((
                format!("{}/res", policy.name()),
                req.resource.to_ascii_lowercase(),
                limits.per_resource,
                Scope::ComputeResource(policy),
            ));
        }
        let early = draws.iter().any(|(name, key, _, _)| {
            self.windows
                .get(&(name.clone(), key.clone()))
                .is_some_and(|until| *until > now)
        });
        for (name, key, limit, scope) in &draws {
            let bucket = self.buckets.entry((name.clone(), key.clone())).or_insert(Bucket {
                tokens: limit.capacity,
                last: now,
            });
            if bucket.refilled(*limit, now) < 1.0 {
                let retry_after = bucket.wait_for_one(*limit);
                let window = self.windows.entry((name.clone(), key.clone())).or_insert(now);
                *window = (*window).max(now + retry_after);
                let decision = Decision::Throttled {
                    scope: scope.clone(),
                    retry_after,
                    allowed: limit.capacity as u64,
                };
                return (decision, early);
            }
        }
        let mut remaining = Vec::with_capacity(draws.len());
        for (name, key, _, scope) in draws {
            if let Some(bucket) = self.buckets.get_mut(&(name, key)) {
                bucket.tokens -= 1.0;
                remaining.push((scope, bucket.tokens.floor() as u64));
            }
        }
        let mut headers = Vec::new();
        let mut compute = Vec::new();
        for (scope, left) in remaining {
            match scope {
                Scope::Arm { write: false } => {
                    headers.push(("x-ms-ratelimit-remaining-subscription-reads", left.to_string()))
                }
                Scope::Arm { write: true } => {
                    headers.push(("x-ms-ratelimit-remaining-subscription-writes", left.to_string()))
                }
                Scope::ComputeSubscription(p) => {
                    compute.push(format!(
                        "Microsoft.Compute/{}SubscriptionMaximum;{left}",
                        p.name()
                    ));
                }
                Scope::ComputeResource(p) => {
                    compute.push(format!("Microsoft.Compute/{}Resource;{left}", p.name()))
                }
            }
        }
        if !compute.is_empty() {
            headers.push(("x-ms-ratelimit-remaining-resource", compute.join(",")));
        }
        (Decision::Allowed(headers), early)
    }

    /// Forgets every bucket (they start full again) and every window.
    pub fn reset(&mut self) {
        self.buckets.clear();
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ThrottleConfig {
        let mut cfg = ThrottleConfig::default();
        cfg.compute.insert(
            Policy::UpdateVmss,
            PolicyLimits {
                per_resource: BucketLimit::new(6.0, 2.0),
                per_subscription: BucketLimit::new(60.0, 3.0),
            },
        );
        cfg
    }

    fn req<'a>(resource: &'a str) -> Request<'a> {
        Request {
            subscription: "sub",
            principal: "caller",
            resource,
            write: true,
            policy: Some(Policy::UpdateVmss),
        }
    }

    #[test]
    fn per_resource_bucket_empties_and_tells_when_it_refills() {
        let cfg = small();
        let mut t = Throttler::default();
        let now = Instant::now();
        let Decision::Allowed(h) = t.check(&cfg, now, &req("a")) else {
            panic!()
        };
        assert!(h.contains(&(
            "x-ms-ratelimit-remaining-resource",
            "Microsoft.Compute/PutVMScaleSetSubscriptionMaximum;2,Microsoft.Compute/PutVMScaleSetResource;1".into()
        )));
        assert!(h.contains(&("x-ms-ratelimit-remaining-subscription-writes", "199".into())));
        assert!(matches!(t.check(&cfg, now, &req("a")), Decision::Allowed(_)));
        // 6 per minute: one token every 10 s.
        assert_eq!(
            t.check(&cfg, now, &req("a")),
            Decision::Throttled {
                scope: Scope::ComputeResource(Policy::UpdateVmss),
                retry_after: Duration::from_secs(10),
                allowed: 2
            }
        );
        assert!(matches!(
            t.check(&cfg, now + Duration::from_secs(10), &req("a")),
            Decision::Allowed(_)
        ));
    }

    #[test]
    fn subscription_bucket_spans_resources() {
        let cfg = small();
        let mut t = Throttler::default();
        let now = Instant::now();
        for r in ["a", "b", "c"] {
            assert!(matches!(t.check(&cfg, now, &req(r)), Decision::Allowed(_)));
        }
        let Decision::Throttled {
            scope, retry_after, ..
        } = t.check(&cfg, now, &req("d"))
        else {
            panic!()
        };
        assert_eq!(scope, Scope::ComputeSubscription(Policy::UpdateVmss));
        assert_eq!(retry_after, Duration::from_secs(1));
    }

    #[test]
    fn a_refused_request_draws_no_token() {
        let cfg = small();
        let mut t = Throttler::default();
        let now = Instant::now();
        t.check(&cfg, now, &req("a"));
        t.check(&cfg, now, &req("a"));
        // "a" is refused; the subscription bucket must still hold its last token for "b".
        assert!(matches!(
            t.check(&cfg, now, &req("a")),
            Decision::Throttled { .. }
        ));
        assert!(matches!(t.check(&cfg, now, &req("b")), Decision::Allowed(_)));
    }

    #[test]
    fn arm_front_door_limits_reads_per_subscription() {
        let cfg = ThrottleConfig {
            arm_reads: BucketLimit::new(60.0, 1.0),
            ..ThrottleConfig::default()
        };
        let mut t = Throttler::default();
        let now = Instant::now();
        let read = Request {
            subscription: "sub",
            principal: "caller",
            resource: "x",
            write: false,
            policy: None,
        };
        assert!(matches!(t.check(&cfg, now, &read), Decision::Allowed(_)));
        let Decision::Throttled { scope, .. } = t.check(&cfg, now, &read) else {
            panic!()
        };
        assert_eq!(scope, Scope::Arm { write: false });
        let other = Request {
            subscription: "other",
            ..read
        };
        assert!(matches!(t.check(&cfg, now, &other), Decision::Allowed(_)));
    }

    #[test]
    fn the_front_door_counts_each_principal_apart_and_compute_counts_them_together() {
        let mut cfg = small();
        cfg.arm_writes = BucketLimit::new(60.0, 1.0);
        let mut t = Throttler::default();
        let now = Instant::now();
        let as_principal = |principal: &'static str, resource: &'static str| Request {
            principal,
            ..req(resource)
        };
        assert!(matches!(
            t.check(&cfg, now, &as_principal("a", "r1")),
            Decision::Allowed(_)
        ));
        assert_eq!(
            t.check(&cfg, now, &as_principal("a", "r2")),
            Decision::Throttled {
                scope: Scope::Arm { write: true },
                retry_after: Duration::from_secs(1),
                allowed: 1
            }
        );
        // Another principal has a front-door bucket of its own, but shares Compute's subscription bucket.
        assert!(matches!(
            t.check(&cfg, now, &as_principal("b", "r3")),
            Decision::Allowed(_)
        ));
        cfg.arm_writes = BucketLimit::new(60.0, 10.0);
        let mut t = Throttler::default();
        for (principal, resource) in [("a", "r1"), ("b", "r2"), ("c", "r3")] {
            assert!(matches!(
                t.check(&cfg, now, &as_principal(principal, resource)),
                Decision::Allowed(_)
            ));
        }
        assert!(matches!(
            t.check(&cfg, now, &as_principal("d", "r4")),
            Decision::Throttled {
                scope: Scope::ComputeSubscription(Policy::UpdateVmss),
                ..
            }
        ));
    }

    #[test]
    fn a_request_inside_a_retry_after_window_is_told_apart() {
        let cfg = small();
        let mut t = Throttler::default();
        let now = Instant::now();
        for _ in 0..2 {
            assert!(!t.admit(&cfg, now, &req("a")).1);
        }
        // Refused: wait 10 s for "a" (6 per minute).
        let (refused, early) = t.admit(&cfg, now, &req("a"));
        assert!(matches!(refused, Decision::Throttled { .. }) && !early);
        // Sent again after 5 s: inside the window, refused again.
        let (again, early) = t.admit(&cfg, now + Duration::from_secs(5), &req("a"));
        assert!(matches!(again, Decision::Throttled { .. }) && early);
        // Another resource draws on other buckets: inside no window.
        assert!(!t.admit(&cfg, now + Duration::from_secs(5), &req("b")).1);
        // After the window: allowed, and polite.
        let (allowed, early) = t.admit(&cfg, now + Duration::from_secs(10), &req("a"));
        assert!(matches!(allowed, Decision::Allowed(_)) && !early);
    }

    #[test]
    fn disabled_throttling_allows_everything() {
        let cfg = ThrottleConfig {
            enabled: false,
            ..small()
        };
        let mut t = Throttler::default();
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(t.check(&cfg, now, &req("a")), Decision::Allowed(Vec::new()));
        }
    }
}
