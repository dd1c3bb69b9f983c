//! One session as the request path sees it: immutable grant plus atomic state.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::{Limits, Scope, SessionId};

use crate::registry::sync::Freshness;
use airlock_store::{SessionRow, SessionStatus};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// A cached session.
pub struct LiveSession {
    id: SessionId,
    created_at: i64,
    /// Unix ms; another replica may change it.
    expires_at: AtomicI64,
    scope: Scope,
    limits: Limits,
    labels: BTreeMap<String, String>,
    /// Unix ms of revocation; 0 while not revoked.
    revoked_at: AtomicI64,
    /// Calls forwarded: by this process, plus what the store reported for
    /// all processes.
    allowed: AtomicU64,
    /// Calls denied, counted the same way.
    denied: AtomicU64,
    /// Increments not yet written to the store.
    unflushed_allowed: AtomicU64,
    unflushed_denied: AtomicU64,
    /// Set once `max_denied` was reached here (the caller revokes once).
    max_denied_reached: AtomicBool,
    /// Held while the session's counts are written to the store: one
    /// write at a time, so that a refused call waiting for its denial to
    /// be stored (`Registry::write_denials`) waits for a write already
    /// under way (the flusher's, which may have taken that denial) rather
    /// than find nothing left to write.
    count_writes: tokio::sync::Mutex<()>,
    rate: Option<DefaultDirectRateLimiter>,
    /// A bucket of the same rate for calls refused at the session's
    /// `max_calls_in_flight` ([`LiveSession::spend_rate`]): such refusals
    /// never use up the tokens of calls that go upstream.
    refusal_rate: Option<DefaultDirectRateLimiter>,
    /// `max_requests` spent from leases reserved in the store (see
    /// `Store::leases_requests`).
    lease: Option<Lease>,
    /// Asks the flusher to write denials at once: on a shared store
    /// `max_denied` then applies to the totals of every replica promptly,
    /// and a process that dies forgets few of them.
    flush_soon: Option<Arc<Notify>>,
    /// Wakes whoever waits on [`LiveSession::changes`]: the session was
    /// revoked or its expiry moved.
    changed: Arc<Notify>,
    /// Unix ms when a call last presented the token (to the second), or
    /// when the session was cached.
    last_seen: AtomicI64,
    /// Whether the registry's cache is still within `max_staleness` of the
    /// store (always, on a store of one process).
    freshness: Arc<Freshness>,
    /// Calls this process admitted for the session that have not ended
    /// (each holds a [`CallSlot`]).
    in_flight: AtomicU32,
}

/// One of a session's calls in flight (see [`LiveSession::enter_call`]);
/// the slot is free again when this is dropped.
#[must_use = "the slot is free again once this is dropped"]
pub struct CallSlot {
    session: Arc<LiveSession>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.session.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSlot")
            .field("session", &self.session.id)
            .finish()
    }
}

/// This process's share of a session's `max_requests`: calls reserved in
/// the store that this process may still admit.
pub(crate) struct Lease {
    left: AtomicU64,
    /// Size of the last grant, to decide when to ask for more early.
    last_grant: AtomicU64,
    /// Unix ms when the store last said the quota was spent; 0 otherwise.
    spent_at: AtomicI64,
    /// When the store last had nothing to grant, calls reserved by other
    /// processes were still unused: the quota is held elsewhere, not spent.
    held_elsewhere: AtomicBool,
    /// Unix ms since when the quota has been held elsewhere with the stored
    /// total of calls made unchanged (`held_total`); 0 when it is not.
    held_since: AtomicI64,
    held_total: AtomicU64,
    /// Unix ms of the last admitted call.
    last_used: AtomicI64,
    /// One refill at a time.
    pub(crate) refill: tokio::sync::Mutex<()>,
}

/// The lifecycle state shown by the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Active,
    Expired,
    Revoked,
}

/// The outcome of asking the limits to admit a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// `requests_per_minute` exceeded: the next call is admitted after
    /// `retry_after`.
    RateLimited {
        retry_after: Duration,
    },
    /// `max_requests` reached.
    QuotaExhausted,
    /// The rest of `max_requests` is leased to other processes sharing the
    /// store and not used yet: this process cannot admit the call now, but
    /// a retry may be admitted (once a lease comes back or the calls are
    /// made, when it becomes [`Admission::QuotaExhausted`]; also when no
    /// call was made for a while, the lease being a dead process's).
    QuotaHeldElsewhere,
}

/// Takes a token of `rate`; `Some(wait)` when it has none.
fn limited(rate: &DefaultDirectRateLimiter) -> Option<Duration> {
    rate.check()
        .err()
        .map(|not_until| not_until.wait_time_from(rate.clock().now()))
}

// === impl LiveSession ===

impl LiveSession {
    /// A cached session from its stored row. `flush_soon`: the flusher's
    /// wake-up for denials; `leases`: `max_requests` is spent from leases.
    pub(crate) fn from_row(
        row: SessionRow,
        flush_soon: Option<&Arc<Notify>>,
        leases: bool,
        freshness: Arc<Freshness>,
    ) -> Self {
        let quota = row
            .limits
            .requests_per_minute
            .and_then(NonZeroU32::new)
            .map(Quota::per_minute);
        let rate = quota.map(RateLimiter::direct);
        let refusal_rate = quota.map(RateLimiter::direct);
        let lease = (leases && row.limits.max_requests.is_some()).then(Lease::empty);
        let flush_soon = flush_soon
            .filter(|_| row.limits.max_denied.is_some())
            .cloned();
        Self {
            id: row.id,
            created_at: row.created_at,
            expires_at: AtomicI64::new(row.expires_at),
            scope: row.scope,
            limits: row.limits,
            labels: row.labels,
            revoked_at: AtomicI64::new(row.revoked_at.unwrap_or(0)),
            allowed: AtomicU64::new(row.allowed),
            denied: AtomicU64::new(row.denied),
            unflushed_allowed: AtomicU64::new(0),
            unflushed_denied: AtomicU64::new(0),
            max_denied_reached: AtomicBool::new(false),
            count_writes: tokio::sync::Mutex::new(()),
            rate,
            refusal_rate,
            lease,
            flush_soon,
            changed: Arc::new(Notify::new()),
            last_seen: AtomicI64::new(crate::now_ms()),
            freshness,
            in_flight: AtomicU32::new(0),
        }
    }

    /// Takes one of the session's `max` slots for calls in flight in this
    /// process; `None` when all of them are taken.
    pub fn enter_call(self: &Arc<Self>, max: u32) -> Option<CallSlot> {
        let mut now = self.in_flight.load(Ordering::Acquire);
        loop {
            if now >= max {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(CallSlot {
                        session: Arc::clone(self),
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// The session's calls in flight in this process.
    pub fn calls_in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether this process can no longer vouch for the session's state:
    /// its store is shared and has been out of reach for longer than
    /// `max_staleness`, so a revocation elsewhere may not have reached it.
    /// Calls are then refused and streams and tunnels end, as for an ended
    /// session, until the store answers again.
    pub fn unvouched(&self) -> bool {
        self.freshness.is_stale()
    }

    /// Wakes whoever waits on [`LiveSession::changes`] to look again (the
    /// registry lost its store: see [`LiveSession::unvouched`]).
    pub(crate) fn wake_watchers(&self) {
        self.changed.notify_waiters();
    }

    /// Notes that a call presented the token at `now_ms`. Written once a
    /// second at most, so that busy sessions do not share a cache line
    /// written by every call.
    pub(crate) fn seen(&self, now_ms: i64) {
        if now_ms - self.last_seen.load(Ordering::Relaxed) >= 1_000 {
            self.last_seen.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Unix ms when a call last presented the token, or when the session
    /// was cached.
    pub(crate) fn last_seen(&self) -> i64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Whether the store has everything this process knows of the session:
    /// no counts to write, no lease to give back.
    pub(crate) fn settled(&self) -> bool {
        self.unflushed_allowed.load(Ordering::Acquire) == 0
            && self.unflushed_denied.load(Ordering::Acquire) == 0
            && self.lease.as_ref().is_none_or(|lease| lease.left() == 0)
    }

    /// A future that completes at the next revocation of the session or
    /// change of its expiry (not at the expiry itself: that is a matter of
    /// time). Enable it (`OwnedNotified::enable`) before reading the state
    /// it guards, so that a change in between is not missed.
    pub fn changes(&self) -> OwnedNotified {
        Arc::clone(&self.changed).notified_owned()
    }

    /// The session id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// What the session may call.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The session's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Labels given at creation.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Creation time, unix ms.
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// Expiry time, unix ms.
    pub fn expires_at(&self) -> i64 {
        self.expires_at.load(Ordering::Acquire)
    }

    /// Revocation time, unix ms.
    pub fn revoked_at(&self) -> Option<i64> {
        match self.revoked_at.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        }
    }

    /// The state at `now_ms`.
    pub fn state(&self, now_ms: i64) -> SessionState {
        if self.revoked_at().is_some() {
            SessionState::Revoked
        } else if now_ms >= self.expires_at() {
            SessionState::Expired
        } else {
            SessionState::Active
        }
    }

    /// Calls forwarded so far (on a shared store: by every replica, as far
    /// as this one knows).
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Calls this process admitted that the store's totals lack yet.
    pub(crate) fn unflushed_allowed(&self) -> u64 {
        self.unflushed_allowed.load(Ordering::Acquire)
    }

    /// Calls denied so far (counted like [`LiveSession::allowed`]).
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Serialises the writes of this session's counts.
    pub(crate) fn count_writes(&self) -> &tokio::sync::Mutex<()> {
        &self.count_writes
    }

    /// Whether its denials reached `max_denied` (which revokes it).
    pub fn reached_max_denied(&self) -> bool {
        self.limits
            .max_denied
            .is_some_and(|max| self.denied() >= max)
    }

    /// Applies `max_requests` and `requests_per_minute`; an admitted call is
    /// counted as allowed.
    ///
    /// `requests_per_minute` is a token bucket in this process. On a store
    /// shared by replicas, `max_requests` is spent from this process's
    /// lease, which the registry refills from the store before the call
    /// gets here; alone, it is counted here.
    pub fn admit(&self) -> Admission {
        if let Some(lease) = &self.lease {
            if !lease.take() {
                return Admission::QuotaExhausted;
            }
            if let Some(retry_after) = self.rate_limited() {
                lease.give_back();
                return Admission::RateLimited { retry_after };
            }
            self.count_allowed();
            return Admission::Admitted;
        }
        if let Some(max) = self.limits.max_requests {
            let counted = self
                .allowed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
            if counted.is_err() {
                return Admission::QuotaExhausted;
            }
            if let Some(retry_after) = self.rate_limited() {
                self.allowed.fetch_sub(1, Ordering::AcqRel);
                return Admission::RateLimited { retry_after };
            }
            self.unflushed_allowed.fetch_add(1, Ordering::AcqRel);
            return Admission::Admitted;
        }
        if let Some(retry_after) = self.rate_limited() {
            return Admission::RateLimited { retry_after };
        }
        self.count_allowed();
        Admission::Admitted
    }

    /// Takes a token of `requests_per_minute` from the bucket of calls
    /// refused before the limits (its session's slots all taken), a bucket
    /// of its own so that a client retrying such refusals never uses up
    /// the rate of the calls that go upstream: a flood of them runs into
    /// it, and those refusals count toward `max_denied`. `Some(wait)` when
    /// that bucket is empty.
    pub fn spend_rate(&self) -> Option<Duration> {
        limited(self.refusal_rate.as_ref()?)
    }

    /// `Some(wait)` when `requests_per_minute` refuses a call now.
    fn rate_limited(&self) -> Option<Duration> {
        limited(self.rate.as_ref()?)
    }

    fn count_allowed(&self) {
        self.allowed.fetch_add(1, Ordering::AcqRel);
        self.unflushed_allowed.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a denied call. Returns `true` once, for the call that reached
    /// `max_denied` (counting the denials of every replica this process
    /// knows of): the caller must revoke the session.
    pub fn count_denied(&self) -> bool {
        let denied = self.denied.fetch_add(1, Ordering::AcqRel) + 1;
        self.unflushed_denied.fetch_add(1, Ordering::AcqRel);
        if let Some(flush) = &self.flush_soon {
            flush.notify_one();
        }
        self.limits.max_denied.is_some_and(|max| denied >= max)
            && !self.max_denied_reached.swap(true, Ordering::AcqRel)
    }

    /// Marks the session revoked in memory (first revocation time wins). A
    /// session that had expired by `at_ms` stays expired, as in the store.
    pub(crate) fn mark_revoked(&self, at_ms: i64) {
        if at_ms >= self.expires_at() {
            return;
        }
        let revoked = self
            .revoked_at
            .compare_exchange(0, at_ms.max(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if revoked {
            self.changed.notify_waiters();
        }
    }

    /// Takes in what the store says about the session (possibly changed by
    /// other replicas): revocation, expiry and call totals.
    pub(crate) fn apply_status(&self, status: &SessionStatus) {
        if let Some(at) = status.revoked_at {
            self.mark_revoked(at);
        }
        self.set_expires_at(status.expires_at);
        // The stored totals lack what this process has not written yet.
        let allowed = status.allowed + self.unflushed_allowed.load(Ordering::Acquire);
        let denied = status.denied + self.unflushed_denied.load(Ordering::Acquire);
        self.allowed.fetch_max(allowed, Ordering::AcqRel);
        self.denied.fetch_max(denied, Ordering::AcqRel);
    }

    /// Takes in the stored total of denied calls (every process's, as
    /// flushed) announced with a revocation.
    pub(crate) fn note_stored_denied(&self, denied: u64) {
        let denied = denied + self.unflushed_denied.load(Ordering::Acquire);
        self.denied.fetch_max(denied, Ordering::AcqRel);
    }

    /// Sets the expiry (changed elsewhere).
    pub(crate) fn set_expires_at(&self, at_ms: i64) {
        if self.expires_at.swap(at_ms, Ordering::AcqRel) != at_ms {
            self.changed.notify_waiters();
        }
    }

    /// Whether denials wait to be written to the store.
    pub(crate) fn has_unflushed_denials(&self) -> bool {
        self.unflushed_denied.load(Ordering::Acquire) > 0
    }

    /// Counter increments not yet written to the store; marks them written.
    pub(crate) fn take_unflushed(&self) -> (u64, u64) {
        (
            self.unflushed_allowed.swap(0, Ordering::AcqRel),
            self.unflushed_denied.swap(0, Ordering::AcqRel),
        )
    }

    /// Puts back increments whose write failed, so the next flush retries them.
    pub(crate) fn restore_unflushed(&self, allowed: u64, denied: u64) {
        self.unflushed_allowed.fetch_add(allowed, Ordering::AcqRel);
        self.unflushed_denied.fetch_add(denied, Ordering::AcqRel);
    }

    /// This process's lease of `max_requests`, on a shared store.
    pub(crate) fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at())
            .field("revoked_at", &self.revoked_at())
            .finish_non_exhaustive()
    }
}

// === impl Lease ===

impl Lease {
    fn empty() -> Self {
        Self {
            left: AtomicU64::new(0),
            last_grant: AtomicU64::new(0),
            spent_at: AtomicI64::new(0),
            held_elsewhere: AtomicBool::new(false),
            held_since: AtomicI64::new(0),
            held_total: AtomicU64::new(0),
            last_used: AtomicI64::new(0),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    /// Calls this process may still admit.
    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    /// Takes one call from the lease.
    fn take(&self) -> bool {
        let took = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.last_used.store(crate::now_ms(), Ordering::Relaxed);
        }
        took
    }

    fn give_back(&self) {
        self.left.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds a grant from the store.
    pub(crate) fn add(&self, granted: u64) {
        self.last_grant.store(granted, Ordering::Relaxed);
        self.left.fetch_add(granted, Ordering::AcqRel);
        self.spent_at.store(0, Ordering::Release);
        self.held_since.store(0, Ordering::Release);
    }

    /// Whether the quota, found held elsewhere with `total` calls made in
    /// all, has been held that way with no call made for longer than
    /// `limit_ms`: the calls were reserved by a process that went away
    /// without giving them back (a live one uses them, or gives them back
    /// once idle), so they are lost and the quota is spent.
    pub(crate) fn held_in_vain(&self, now_ms: i64, total: u64, limit_ms: i64) -> bool {
        let since = self.held_since.load(Ordering::Acquire);
        if since == 0 || self.held_total.load(Ordering::Acquire) != total {
            self.held_total.store(total, Ordering::Release);
            self.held_since.store(now_ms.max(1), Ordering::Release);
            return false;
        }
        now_ms - since > limit_ms
    }

    /// Takes everything left, to give it back to the store.
    pub(crate) fn take_all(&self) -> u64 {
        self.left.swap(0, Ordering::AcqRel)
    }

    /// Whether a refill should be asked for before the lease runs dry: it
    /// is down to a quarter of a grant of at least four calls. (Small
    /// grants are not refilled early, so that the last calls of a quota are
    /// not parked on a replica that does not need them.)
    pub(crate) fn running_low(&self) -> bool {
        let grant = self.last_grant.load(Ordering::Relaxed);
        grant >= 4 && self.left() <= grant / 4
    }

    /// Records that the store has nothing left to grant, and whether calls
    /// other processes reserved were still unused then (`held_elsewhere`).
    pub(crate) fn mark_spent(&self, now_ms: i64, held_elsewhere: bool) {
        self.held_elsewhere.store(held_elsewhere, Ordering::Release);
        self.spent_at.store(now_ms.max(1), Ordering::Release);
    }

    /// Whether, when the store last had nothing to grant, the quota was held
    /// by other processes rather than spent.
    pub(crate) fn held_elsewhere(&self) -> bool {
        self.held_elsewhere.load(Ordering::Acquire)
    }

    /// Whether the store said, less than `retry_ms` ago, that the quota was
    /// spent.
    pub(crate) fn recently_spent(&self, now_ms: i64, retry_ms: i64) -> bool {
        let at = self.spent_at.load(Ordering::Acquire);
        at != 0 && now_ms - at < retry_ms
    }

    /// Unix ms of the last admitted call (0 if none).
    pub(crate) fn last_used(&self) -> i64 {
        self.last_used.load(Ordering::Relaxed)
    }
}
