//! The admin token check, and what a refused one leaves behind: a counter
//! (`airlock_admin_auth_failures_total{reason}`) and a warning naming the
//! client's address, at most one line per [`LOG_EVERY`] with the count of
//! refusals since the last one, so that a client guessing tokens shows in
//! the logs without flooding them.

use std::net::SocketAddr;
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
    /// When the next warning is due, and the refusals it reports.
    warnings: Spaced,
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
        }
    }

    /// `now_ms` on a monotonic clock ([`airlock_core::spaced::monotonic_ms`]).
    fn record(&self, failure: Failure, peer: Option<SocketAddr>, now_ms: i64) {
        match failure {
            Failure::Missing => self.missing.inc(),
            Failure::Invalid => self.invalid.inc(),
        };
        let Some(refused) = self.warnings.count(now_ms) else {
            return;
        };
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        tracing::warn!(
            %peer,
            reason = failure.as_str(),
            refused,
            "admin API request refused: {} admin token ({refused} refused since the last such \
             warning; at most one warning per {LOG_EVERY})",
            match failure {
                Failure::Missing => "no",
                Failure::Invalid => "a wrong",
            },
        );
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
    fn every_refusal_is_counted_and_warnings_are_spaced() {
        let mut registry = Registry::default();
        let failures = AuthFailures::register(&mut registry);
        let start = 1_800_000_000_000;
        failures.record(Failure::Invalid, None, start);
        for i in 1..=5 {
            failures.record(Failure::Invalid, None, start + i);
        }
        failures.record(Failure::Missing, None, start + 6);
        assert_eq!(failures.counts(), (1, 6));
        // Within the period no warning is due; the next one, a period
        // after the first, reports the refusals since (the six above and
        // its own).
        assert_eq!(failures.warnings.count(start + LOG_EVERY_MS - 1), None);
        assert_eq!(failures.warnings.count(start + LOG_EVERY_MS), Some(8));
    }
}
