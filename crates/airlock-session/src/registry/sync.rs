//! Keeping the cache true to a store shared by replicas, and failing closed
//! when that cannot be known.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_store::Change;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{next_change, Registry};

/// How [`Registry::run_sync`] keeps the cache in step with a shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncSettings {
    /// How long cached sessions keep being served while the store cannot
    /// be read; after that, calls with them are refused until it can.
    pub max_staleness: Duration,
    /// How often cached sessions are brought up to date with the store
    /// (the safety net under the change feed; on PostgreSQL one query for
    /// the sessions changed since the last time, see `Registry::recheck`).
    pub recheck_every: Duration,
}

/// When the cache was last known to match the store.
pub(crate) struct Freshness {
    epoch: Instant,
    /// Milliseconds after `epoch` at which the last successful re-check
    /// started.
    confirmed_ms: AtomicU64,
    /// The bound, in ms; `u64::MAX` while not enforced (no shared store).
    max_stale_ms: AtomicU64,
}

// === impl SyncSettings ===

impl SyncSettings {
    /// The default bound: 5 s.
    pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(5);

    /// Settings for a staleness bound: cached sessions are re-read every
    /// second, or more often for a bound under two seconds.
    pub fn with_max_staleness(max_staleness: Duration) -> Self {
        Self {
            max_staleness,
            recheck_every: (max_staleness / 2)
                .clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self::with_max_staleness(Self::DEFAULT_MAX_STALENESS)
    }
}

// === impl Freshness ===

impl Freshness {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            confirmed_ms: AtomicU64::new(0),
            max_stale_ms: AtomicU64::new(u64::MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn enforce(&self, bound: Duration) {
        self.confirm(self.now_ms());
        let bound = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX - 1);
        self.max_stale_ms.store(bound, Ordering::Release);
    }

    fn confirm(&self, at_ms: u64) {
        self.confirmed_ms.fetch_max(at_ms, Ordering::AcqRel);
    }

    /// Whether the cache may be staler than the bound.
    pub(crate) fn is_stale(&self) -> bool {
        let bound = self.max_stale_ms.load(Ordering::Acquire);
        bound != u64::MAX
            && self.now_ms()
                > self
                    .confirmed_ms
                    .load(Ordering::Acquire)
                    .saturating_add(bound)
    }
}

// === impl Registry ===

impl Registry {
    /// On a store shared by replicas, keeps the cache in step with it until
    /// `shutdown` resolves: applies the change feed (other replicas'
    /// revocations and expiry changes, as they commit), and brings cached
    /// sessions up to date each `recheck_every` (reading only what changed
    /// where the store can tell) and whenever the feed may have missed
    /// something (then every cached session is read). While no re-check has succeeded for
    /// `max_staleness`, cached sessions are refused (fail closed); serving
    /// resumes by itself with the first re-check that succeeds.
    ///
    /// Returns at once for a store with no change feed (SQLite).
    pub async fn run_sync(
        self: Arc<Self>,
        settings: SyncSettings,
        shutdown: impl Future<Output = ()>,
    ) {
        let Some(mut feed) = self.store.changes() else {
            return;
        };
        self.freshness.enforce(settings.max_staleness);
        let recheck_now = Notify::new();
        let apply_feed = async {
            while let Some(change) = next_change(&mut feed).await {
                match change {
                    Change::Resync => {
                        self.recheck_everything();
                        recheck_now.notify_one();
                    }
                    change => {
                        if self.apply_change(&change) {
                            recheck_now.notify_one();
                        }
                    }
                }
            }
            tracing::debug!("change feed closed");
            std::future::pending::<()>().await;
        };
        let recheck = async {
            let mut ticks = tokio::time::interval(settings.recheck_every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            let mut failed_closed = false;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = recheck_now.notified() => {}
                }
                let started = self.freshness.now_ms();
                let result = tokio::time::timeout(settings.max_staleness, self.recheck()).await;
                match result {
                    Ok(Ok(())) => {
                        self.freshness.confirm(started);
                        if failing {
                            tracing::info!(
                                "session store reachable again; serving cached sessions"
                            );
                        }
                        failing = false;
                        failed_closed = false;
                    }
                    Ok(Err(e)) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot re-check cached sessions");
                        }
                        failing = true;
                    }
                    Err(_) => {
                        if !failing {
                            tracing::warn!("re-checking cached sessions timed out");
                        }
                        failing = true;
                    }
                }
                if failing && !failed_closed && self.freshness.is_stale() {
                    tracing::error!(
                        max_staleness = ?settings.max_staleness,
                        "session store unreachable for longer than max_staleness: refusing cached sessions"
                    );
                    failed_closed = true;
                    // Streams and tunnels of cached sessions end too: a
                    // revocation elsewhere could not reach this replica.
                    for session in self.by_token.read().values() {
                        session.wake_watchers();
                    }
                }
            }
        };
        tokio::select! {
            () = apply_feed => {}
            () = recheck => {}
            () = shutdown => {}
        }
    }
}
