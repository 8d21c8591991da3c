//! When to try a failed call again, and after how long: exponential backoff with jitter for transient
//! failures, the server's `Retry-After` for throttling, and no retry when that wait is longer than the
//! caller is willing to block (the error then goes up with its `retry_after` so the caller can schedule).
//! Also a gate that makes calls fail fast while a `Retry-After` is pending, so one throttled call does not
//! turn into a burst of further 429s.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};

use crate::error::AzureError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
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
}

/// The wait before the next attempt, given the error and the backoff's proposal (`None` once the backoff is
/// exhausted). `None` means stop.
pub fn next_delay(
    err: &AzureError,
    proposed: Option<Duration>,
    max_retry_after: Duration,
) -> Option<Duration> {
    let proposed = proposed?;
    match err.retry_after() {
        Some(ra) if ra > max_retry_after => None,
        Some(ra) => Some(ra),
        None => Some(proposed),
    }
}

/// Runs `op` under `policy`.
pub async fn with_retries<T, F, Fut>(policy: &RetryPolicy, what: &'static str, op: F) -> Result<T, AzureError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AzureError>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.initial_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_retries)
        .with_jitter();
    let max_ra = policy.max_retry_after;
    op.retry(backoff)
        .sleep(tokio::time::sleep)
        .when(AzureError::is_retryable)
        .adjust(move |e, d| next_delay(e, d, max_ra))
        .notify(|e, d| tracing::debug!(call = what, error = %e, delay_ms = d.as_millis() as u64, "retrying"))
        .await
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
        let r: Result<(), AzureError> = with_retries(&policy, "test", || {
            calls += 1;
            async {
                Err(AzureError::Transient {
                    status: Some(500),
                    code: String::new(),
                    message: String::new(),
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 4);
        let mut calls = 0;
        let r: Result<(), AzureError> = with_retries(&policy, "test", || {
            calls += 1;
            async {
                Err(AzureError::Other {
                    status: 400,
                    code: String::new(),
                    message: String::new(),
                })
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
