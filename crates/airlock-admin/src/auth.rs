//! The admin token check, and what a refused one leaves behind: a counter
//! (`airlock_admin_auth_failures_total{reason}`) and a warning naming the
//! client's address, at most one line per [`LOG_EVERY`] with the count of
//! refusals since the last one, for each reason, so that a client guessing
//! tokens shows in the logs without flooding them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use airlock_core::spaced::Spaced;
use airlock_core::TokenHash;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::state::AdminState;

/// Shortest time between two warnings about refused admin tokens.
pub const LOG_EVERY_MS: i64 = 10_000;
/// [`LOG_EVERY_MS`] as the docs say it.
const LOG_EVERY: &str = "10 s";

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is not the admin token.
    Invalid,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

/// Refused admin requests: counted, and warned about at a bounded rate.
pub struct AuthFailures {
    missing: Counter,
    invalid: Counter,
    /// When the next warning is due.
    warnings: Spaced,
    /// Refusals without a token since the last warning.
    unreported_missing: AtomicU64,
    /// Refusals with a wrong token since the last warning.
    unreported_invalid: AtomicU64,
}

/// What a warning reports: the refusals since the last one, by reason
/// (round 43: a warning gave them all the reason of the request that
/// happened to make it due, so seven wrong tokens and one request without
/// any read as eight without a token).
#[derive(Debug, PartialEq, Eq)]
struct Unreported {
    missing: u64,
    invalid: u64,
}

impl AuthFailures {
    /// Creates the counters (both reasons, so they show at 0) and
    /// registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::<FailureLabels, Counter>::default();
        registry.register(
            "airlock_admin_auth_failures",
            "Admin API requests refused for a missing or wrong admin token",
            family.clone(),
        );
        let counter = |failure: Failure| {
            family
                .get_or_create(&FailureLabels {
                    reason: failure.as_str(),
                })
                .clone()
        };
        Self {
            missing: counter(Failure::Missing),
            invalid: counter(Failure::Invalid),
            warnings: Spaced::new(LOG_EVERY_MS),
            unreported_missing: AtomicU64::new(0),
            unreported_invalid: AtomicU64::new(0),
        }
    }

    /// `now_ms` on a monotonic clock ([`airlock_core::spaced::monotonic_ms`]).
    fn record(&self, failure: Failure, peer: Option<SocketAddr>, now_ms: i64) {
        let Some(Unreported { missing, invalid }) = self.count(failure, now_ms) else {
            return;
        };
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let refused = missing + invalid;
        tracing::warn!(
            %peer,
            reason = failure.as_str(),
            refused,
            wrong_token = invalid,
            no_token = missing,
            "admin API request refused: {} admin token ({refused} refused since the last such \
             warning: {invalid} with a wrong token, {missing} without one; at most one warning \
             per {LOG_EVERY})",
            match failure {
                Failure::Missing => "no",
                Failure::Invalid => "a wrong",
            },
        );
    }

    /// Counts one refusal; when a warning is due, what it reports.
    fn count(&self, failure: Failure, now_ms: i64) -> Option<Unreported> {
        let (counter, unreported) = match failure {
            Failure::Missing => (&self.missing, &self.unreported_missing),
            Failure::Invalid => (&self.invalid, &self.unreported_invalid),
        };
        counter.inc();
        unreported.fetch_add(1, Ordering::Relaxed);
        self.warnings.count(now_ms)?;
        Some(Unreported {
            missing: self.unreported_missing.swap(0, Ordering::Relaxed),
            invalid: self.unreported_invalid.swap(0, Ordering::Relaxed),
        })
    }

    /// Refusals counted for a missing and for a wrong token.
    pub fn counts(&self) -> (u64, u64) {
        (self.missing.get(), self.invalid.get())
    }
}

/// Lets a request through only with the admin token
/// (`Authorization: Bearer …`, compared by hash in constant time).
pub(crate) async fn require_admin(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let failure = match presented {
        Some(token) if TokenHash::of(token) == state.admin_token_hash => {
            return Ok(next.run(req).await)
        }
        Some(_) => Failure::Invalid,
        None => Failure::Missing,
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    state
        .metrics
        .auth_failures
        .record(failure, peer, airlock_core::spaced::monotonic_ms());
    Err(ApiError::Unauthorized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_counted_and_warnings_are_spaced_and_say_why_each_was_refused() {
        let mut registry = Registry::default();
        let failures = AuthFailures::register(&mut registry);
        let start = 1_800_000_000_000;
        assert_eq!(
            failures.count(Failure::Invalid, start),
            Some(Unreported {
                missing: 0,
                invalid: 1
            })
        );
        for i in 1..=5 {
            assert_eq!(failures.count(Failure::Invalid, start + i), None);
        }
        assert_eq!(failures.count(Failure::Missing, start + 6), None);
        assert_eq!(failures.counts(), (1, 6));
        // Within the period no warning is due; the next one, a period
        // after the first, reports the refusals since, each under its own
        // reason, whatever the reason of the one that made it due.
        assert_eq!(
            failures.count(Failure::Missing, start + LOG_EVERY_MS - 1),
            None
        );
        assert_eq!(
            failures.count(Failure::Missing, start + LOG_EVERY_MS),
            Some(Unreported {
                missing: 3,
                invalid: 5
            })
        );
        assert_eq!(failures.counts(), (3, 6));
    }
}
