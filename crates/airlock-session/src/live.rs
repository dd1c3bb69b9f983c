//! One session as the request path sees it: immutable grant plus atomic state.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use airlock_core::{Limits, Scope, SessionId};
use airlock_store::SessionRow;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A cached session.
pub struct LiveSession {
    id: SessionId,
    created_at: i64,
    expires_at: i64,
    scope: Scope,
    limits: Limits,
    labels: BTreeMap<String, String>,
    /// Unix ms of revocation; 0 while not revoked.
    revoked_at: AtomicI64,
    allowed: AtomicU64,
    denied: AtomicU64,
    /// Counter values already written to the store.
    flushed_allowed: AtomicU64,
    flushed_denied: AtomicU64,
    rate: Option<DefaultDirectRateLimiter>,
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
    /// `requests_per_minute` exceeded.
    RateLimited,
    /// `max_requests` reached.
    QuotaExhausted,
}

// === impl LiveSession ===

impl LiveSession {
    pub(crate) fn from_row(row: SessionRow) -> Self {
        let rate = row
            .limits
            .requests_per_minute
            .and_then(NonZeroU32::new)
            .map(|rpm| RateLimiter::direct(Quota::per_minute(rpm)));
        Self {
            id: row.id,
            created_at: row.created_at,
            expires_at: row.expires_at,
            scope: row.scope,
            limits: row.limits,
            labels: row.labels,
            revoked_at: AtomicI64::new(row.revoked_at.unwrap_or(0)),
            allowed: AtomicU64::new(row.allowed),
            denied: AtomicU64::new(row.denied),
            flushed_allowed: AtomicU64::new(row.allowed),
            flushed_denied: AtomicU64::new(row.denied),
            rate,
        }
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
        self.expires_at
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
        } else if now_ms >= self.expires_at {
            SessionState::Expired
        } else {
            SessionState::Active
        }
    }

    /// Calls forwarded so far.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Calls denied so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Applies `max_requests` and `requests_per_minute`; an admitted call is
    /// counted as allowed.
    pub fn admit(&self) -> Admission {
        if let Some(max) = self.limits.max_requests {
            let counted = self
                .allowed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
            if counted.is_err() {
                return Admission::QuotaExhausted;
            }
            if self.rate.as_ref().is_some_and(|r| r.check().is_err()) {
                self.allowed.fetch_sub(1, Ordering::AcqRel);
                return Admission::RateLimited;
            }
            return Admission::Admitted;
        }
        if self.rate.as_ref().is_some_and(|r| r.check().is_err()) {
            return Admission::RateLimited;
        }
        self.allowed.fetch_add(1, Ordering::Relaxed);
        Admission::Admitted
    }

    /// Counts a denied call. Returns `true` when this call reached
    /// `max_denied`, i.e. the caller must revoke the session.
    pub fn count_denied(&self) -> bool {
        let denied = self.denied.fetch_add(1, Ordering::AcqRel) + 1;
        self.limits.max_denied == Some(denied)
    }

    /// Marks the session revoked in memory (first revocation time wins).
    pub(crate) fn mark_revoked(&self, at_ms: i64) {
        let _ =
            self.revoked_at
                .compare_exchange(0, at_ms.max(1), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Counter increments not yet written to the store; marks them written.
    pub(crate) fn take_unflushed(&self) -> (u64, u64) {
        let allowed = self.allowed.load(Ordering::Acquire);
        let denied = self.denied.load(Ordering::Acquire);
        let prev_allowed = self.flushed_allowed.swap(allowed, Ordering::AcqRel);
        let prev_denied = self.flushed_denied.swap(denied, Ordering::AcqRel);
        (
            allowed.saturating_sub(prev_allowed),
            denied.saturating_sub(prev_denied),
        )
    }

    /// Puts back increments whose write failed, so the next flush retries them.
    pub(crate) fn restore_unflushed(&self, allowed: u64, denied: u64) {
        self.flushed_allowed.fetch_sub(allowed, Ordering::AcqRel);
        self.flushed_denied.fetch_sub(denied, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at())
            .finish_non_exhaustive()
    }
}
