//! Warnings about things a client can repeat at will (refused admin
//! tokens, misdirected or refused connections): at most one log line per
//! period, saying how many happened since the last one, so that a flood
//! shows in the log without filling it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a monotonic clock (from the first call, plus one): what
/// callers pass to [`Spaced::count`], so that a wall clock set back does
/// not silence warnings until it catches up.
pub fn monotonic_ms() -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let elapsed = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    i64::try_from(elapsed).unwrap_or(i64::MAX - 1) + 1
}

/// Counts events and says when the next warning about them is due.
#[derive(Debug)]
pub struct Spaced {
    /// Shortest time between two warnings.
    every_ms: i64,
    /// When the last warning was due (ms since the epoch; 0: never).
    last_ms: AtomicI64,
    /// Events since the last warning, not yet reported.
    unreported: AtomicU64,
}

impl Spaced {
    /// Warnings at least `every_ms` apart.
    pub const fn new(every_ms: i64) -> Self {
        Self {
            every_ms,
            last_ms: AtomicI64::new(0),
            unreported: AtomicU64::new(0),
        }
    }

    /// Counts one event at `now_ms` (see [`monotonic_ms`]). When a warning
    /// is due, the number of events it reports (this one included); one
    /// caller gets it.
    pub fn count(&self, now_ms: i64) -> Option<u64> {
        self.unreported.fetch_add(1, Ordering::Relaxed);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= self.every_ms;
        if !due
            || self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        Some(self.unreported.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_spaced_and_count_what_they_did_not_report() {
        let spaced = Spaced::new(1_000);
        let t0 = 1_800_000_000_000;
        assert_eq!(spaced.count(t0), Some(1));
        assert_eq!(spaced.count(t0 + 1), None);
        assert_eq!(spaced.count(t0 + 999), None);
        assert_eq!(spaced.count(t0 + 1_000), Some(3));
        assert_eq!(spaced.count(t0 + 1_005), None);
        assert_eq!(spaced.count(t0 + 2_000), Some(2));
    }
}
