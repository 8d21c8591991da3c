//! Waiting for state that changes asynchronously, with a patience that slow machines can extend.

use std::{future::Future, time::Duration};

/// How long [`eventually`] waits by default; `POD_IDENTITY_TEST_PATIENCE_SECS` overrides it, so a
/// loaded machine gets more time without any test asserting a wall-clock limit.
pub fn patience() -> Duration {
    let secs = std::env::var("POD_IDENTITY_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Polls `check` until it returns `Ok`, and returns that value; after [`patience`] returns the last
/// error, so a failing test says what it was waiting for.
pub async fn eventually<T, E, F, Fut>(mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    let mut delay = Duration::from_millis(20);
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(err) if tokio::time::Instant::now() >= deadline => return Err(err),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}
