//! When to try a failed call again, and after how long: the workspace's one retry policy
//! ([`RetryPolicy`], on backon), either run by [`with_retries`] around a call or consulted by a loop that
//! owns its scheduling ([`Backoff`]). Exponential backoff with jitter for transient failures, the
//! server's `Retry-After` for throttling, and no retry when that wait is longer than the caller is willing
//! to block (the error then goes up with its `retry_after` so the caller can schedule). Also a gate that
//! makes calls fail fast while a `Retry-After` is pending, so one throttled call does not turn into a burst
//! of further 429s.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

use crate::error::AzureError;

/// How to retry, for every retry of the workspace: the Azure clients' own, the agent's calls to IMDS and
/// Entra, the controller's workers and the agent's rule sync.
///
/// Waits grow exponentially from `initial_delay`, doubling up to `max_delay`, each drawn from the upper
/// half of its step (`[step/2, step)`, "equal jitter": callers that failed together do not retry together,
/// and no wait exceeds `max_delay`). A `Retry-After` replaces the wait when it is longer; one longer than
/// `max_retry_after` ends the retries, so the error goes up with it and the caller can schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt, for [`with_retries`]; a [`Backoff`] does not count them.
    pub max_retries: usize,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured by waiting; longer ones are returned to the caller.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all (the caller owns retrying).
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The waits of a loop that owns its scheduling and retries for as long as it runs (a worker, a
    /// rule sync): this policy's steps without a limit on their number.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            steps: self.steps().without_max_times().build(),
            failures: 0,
        }
    }

    /// backon's exponential backoff adds a jitter of up to one step; starting it at half the steps makes
    /// that the upper half of each step.
    fn steps(&self) -> ExponentialBuilder {
        let initial = self.initial_delay.max(Duration::from_millis(2));
        ExponentialBuilder::default()
            .with_min_delay(initial / 2)
            .with_max_delay(self.max_delay.max(initial) / 2)
            .with_jitter()
    }
}

/// What a retry needs to know of an error.
pub trait RetryableError {
    /// Whether the same request can succeed later.
    fn is_retryable(&self) -> bool;
    /// The wait the service asked for, if any.
    fn retry_after(&self) -> Option<Duration>;
}

impl RetryableError for AzureError {
    fn is_retryable(&self) -> bool {
        AzureError::is_retryable(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        AzureError::retry_after(self)
    }
}

/// The wait before the next attempt, given the error and the backoff's proposal (`None` once the backoff is
/// exhausted). `None` means stop.
pub fn next_delay<E: RetryableError>(
    err: &E,
    proposed: Option<Duration>,
    max_retry_after: Duration,
) -> Option<Duration> {
    let proposed = proposed?;
    match err.retry_after() {
        Some(ra) if ra > max_retry_after => None,
        Some(ra) => Some(ra.max(proposed)),
        None => Some(proposed),
    }
}

/// Runs `op` under `policy`: retryable failures are tried again after the policy's wait, at most
/// `max_retries` times; `notify` sees each failure that is retried and the wait before the next attempt.
pub async fn with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    op: F,
    notify: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    E: RetryableError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let max_ra = policy.max_retry_after;
    op.retry(policy.steps().with_max_times(policy.max_retries))
        .sleep(tokio::time::sleep)
        .when(E::is_retryable)
        .adjust(move |e, d| next_delay(e, d, max_ra))
        .notify(notify)
        .await
}

/// A `notify` for [`with_retries`] that logs each retry at debug level.
pub(crate) fn log_retry(call: &'static str) -> impl FnMut(&AzureError, Duration) {
    move |e, d| tracing::debug!(call, error = %e, delay_ms = d.as_millis() as u64, "retrying")
}

/// The waits of one retrying loop under a [`RetryPolicy`]: ask after each failure, reset after a success.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    steps: ExponentialBackoff,
    failures: u32,
}

impl Backoff {
    /// The wait after one more failure: the policy's next step, never shorter than `retry_after` (what
    /// the server asked for).
    pub fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let step = self.steps.next().unwrap_or(self.policy.max_delay);
        step.max(retry_after.unwrap_or_default())
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        *self = self.policy.backoff();
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Blocks calls until a `Retry-After` deadline passes.
#[derive(Debug, Default, Clone)]
pub struct ThrottleGate {
    until: Option<Instant>,
}

impl ThrottleGate {
    /// `Err(remaining)` while throttled.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        match self.until {
            Some(u) if u > now => Err(u - now),
            _ => Ok(()),
        }
    }

    /// Records a throttling answer; the later deadline wins.
    pub fn throttled(&mut self, now: Instant, retry_after: Duration) {
        let until = now + retry_after;
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled(secs: u64) -> AzureError {
        AzureError::Throttled {
            retry_after: Some(Duration::from_secs(secs)),
            message: String::new(),
        }
    }

    #[test]
    fn retry_after_replaces_the_backoff_unless_too_long() {
        let max = Duration::from_secs(60);
        let d = Some(Duration::from_millis(500));
        assert_eq!(next_delay(&throttled(7), d, max), Some(Duration::from_secs(7)));
        assert_eq!(
            next_delay(&throttled(0), Some(Duration::from_secs(2)), max),
            Some(Duration::from_secs(2)),
            "a Retry-After shorter than the backoff does not shorten it"
        );
        assert_eq!(next_delay(&throttled(61), d, max), None);
        assert_eq!(next_delay(&throttled(7), None, max), None);
        let transient = AzureError::Transient {
            status: Some(503),
            code: String::new(),
            message: String::new(),
        };
        assert_eq!(next_delay(&transient, d, max), d);
    }

    #[test]
    fn a_backoff_doubles_up_to_the_maximum_in_the_upper_half_of_each_step() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            ..RetryPolicy::default()
        };
        for _ in 0..20 {
            let mut b = policy.backoff();
            let waits: Vec<Duration> = (0..7).map(|_| b.next(None)).collect();
            for (wait, step) in waits.iter().zip([1, 2, 4, 8, 8, 8, 8]) {
                let step = Duration::from_secs(step);
                assert!(*wait >= step / 2 && *wait <= step, "{waits:?}");
            }
            assert_eq!(b.failures(), 7);
            b.reset();
            assert_eq!(b.failures(), 0);
            assert!(b.next(None) <= Duration::from_secs(1), "a reset starts over");
        }
    }

    #[test]
    fn a_backoff_never_undercuts_retry_after() {
        let mut b = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        }
        .backoff();
        assert_eq!(b.next(Some(Duration::from_secs(20))), Duration::from_secs(20));
    }

    #[test]
    fn gate_blocks_until_the_latest_deadline() {
        let now = Instant::now();
        let mut g = ThrottleGate::default();
        assert!(g.check(now).is_ok());
        g.throttled(now, Duration::from_secs(10));
        g.throttled(now, Duration::from_secs(3));
        assert_eq!(g.check(now + Duration::from_secs(4)), Err(Duration::from_secs(6)));
        assert!(g.check(now + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after(" 20 ", now), Some(Duration::from_secs(20)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_then_gives_up() {
        let policy = RetryPolicy {
            max_retries: 3,
            ..RetryPolicy::default()
        };
        let mut calls = 0;
        let mut notified = 0;
        let r: Result<(), AzureError> = with_retries(
            &policy,
            || {
                calls += 1;
                async {
                    Err(AzureError::Transient {
                        status: Some(500),
                        code: String::new(),
                        message: String::new(),
                    })
                }
            },
            |_, _| notified += 1,
        )
        .await;
        assert_eq!(notified, 3);
        assert!(r.is_err());
        assert_eq!(calls, 4);
        let mut calls = 0;
        let r: Result<(), AzureError> = with_retries(
            &policy,
            || {
                calls += 1;
                async {
                    Err(AzureError::Other {
                        status: 400,
                        code: String::new(),
                        message: String::new(),
                    })
                }
            },
            |_, _| {},
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
