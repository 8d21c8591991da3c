//! The header read timeout, kept per connection instead of per request.
//!
//! A connection may take at most the timeout from being accepted, or from its last answer, to a
//! complete request head: that bounds idle keep-alive connections, heads trickled in a byte at a time,
//! and answers a caller never reads. hyper can keep the same bound itself, but it arms a fresh timer for
//! every request head and cancels it once the head is read: two trips through the runtime's timer wheel
//! on every request of a keep-alive connection, for a timer that almost never fires. Here a request
//! only stamps the connection's clock (one atomic store), and one timer per connection wakes at the
//! earliest moment the bound could be broken, at most once per timeout while the connection is busy.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// What a connection's timer finds when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// No complete request head within the timeout: close the connection.
    Close,
    /// Not yet: look again at this time (since the connection was accepted).
    WaitUntil(Duration),
}

/// The rule, over plain times since the connection was accepted: `idle_since` is when the connection
/// last went without a request (accepted, or answered its last request), `None` while a request is
/// being answered (an answer that takes long, such as one waiting for an assignment, is not the
/// caller's delay).
pub fn check(idle_since: Option<Duration>, now: Duration, timeout: Duration) -> Check {
    match idle_since {
        None => Check::WaitUntil(now + timeout),
        Some(since) if now >= since + timeout => Check::Close,
        Some(since) => Check::WaitUntil(since + timeout),
    }
}

/// Stored in [`HeadClock`] while a request is being answered.
const ANSWERING: u64 = u64::MAX;

/// One connection's clock: when it was accepted, and when it last went idle.
#[derive(Debug)]
pub struct HeadClock {
    accepted: Instant,
    /// Nanoseconds from `accepted` to when the connection last went idle, or [`ANSWERING`].
    idle_since: AtomicU64,
}

impl HeadClock {
    /// The clock of a connection accepted now, idle since then.
    pub fn accepted_now() -> Arc<Self> {
        Arc::new(Self {
            accepted: Instant::now(),
            idle_since: AtomicU64::new(0),
        })
    }

    /// When the connection's timer should first fire: the timeout after it was accepted.
    pub fn first_deadline(&self, timeout: Duration) -> Instant {
        self.accepted + timeout
    }

    /// Marks a request being answered until the returned guard is dropped (when its answer is ready,
    /// or the request is abandoned). HTTP/1.1 answers a connection's requests one at a time.
    pub fn answering(self: &Arc<Self>) -> Answering {
        self.idle_since.store(ANSWERING, Ordering::Relaxed);
        Answering(self.clone())
    }

    /// What the connection's timer finds at `now`, as a time to wait until when not [`Check::Close`].
    pub fn check(&self, now: Instant, timeout: Duration) -> Result<Instant, Closed> {
        let idle_since = match self.idle_since.load(Ordering::Relaxed) {
            ANSWERING => None,
            nanos => Some(Duration::from_nanos(nanos)),
        };
        match check(idle_since, now.saturating_duration_since(self.accepted), timeout) {
            Check::Close => Err(Closed),
            Check::WaitUntil(at) => Ok(self.accepted + at),
        }
    }

    fn went_idle(&self) {
        let nanos = u64::try_from(self.accepted.elapsed().as_nanos()).unwrap_or(ANSWERING - 1);
        self.idle_since.store(nanos, Ordering::Relaxed);
    }
}

/// The connection sent no complete request head within the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed;

/// A request being answered on a connection; the connection is idle again once this is dropped.
#[derive(Debug)]
pub struct Answering(Arc<HeadClock>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.went_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_idle_connection_is_closed_once_the_timeout_has_passed_since_it_went_idle() {
        // Accepted and never sent a complete head.
        assert_eq!(check(Some(secs(0)), secs(30), TIMEOUT), Check::Close);
        assert_eq!(check(Some(secs(0)), secs(31), TIMEOUT), Check::Close);
        // Answered a request at 20 s: the timer that fires at 30 s looks again at 50 s.
        assert_eq!(
            check(Some(secs(20)), secs(30), TIMEOUT),
            Check::WaitUntil(secs(50))
        );
        assert_eq!(check(Some(secs(20)), secs(50), TIMEOUT), Check::Close);
    }

    #[test]
    fn a_connection_answering_a_request_is_never_closed_and_is_looked_at_again_a_timeout_later() {
        assert_eq!(check(None, secs(30), TIMEOUT), Check::WaitUntil(secs(60)));
        assert_eq!(check(None, secs(600), TIMEOUT), Check::WaitUntil(secs(630)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_counts_from_acceptance_and_from_each_answer() {
        let timeout = Duration::from_millis(300);
        let clock = HeadClock::accepted_now();
        let first = clock.first_deadline(timeout);
        tokio::time::advance(Duration::from_millis(100)).await;
        let answering = clock.answering();
        // While answering, the deadline moves on with the timer.
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        assert_eq!(clock.check(now, timeout), Ok(now + timeout));
        drop(answering);
        let idle = Instant::now();
        assert_eq!(clock.check(first, timeout), Ok(idle + timeout));
        tokio::time::advance(timeout).await;
        assert_eq!(clock.check(Instant::now(), timeout), Err(Closed));
    }
}
