//! Wall-clock time in the unit tokens use.

/// Now, in unix seconds.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}
