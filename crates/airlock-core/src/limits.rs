//! Per-session limits. Absent means unlimited.

use serde::{Deserialize, Serialize};

/// Limits a session is held to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Calls admitted per minute (per replica), as a token bucket with a burst of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Calls admitted over the session's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    /// Denied calls after which the session is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_denied: Option<u64>,
}

/// Why limits were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("limits.{field} must be between 1 and {max}")]
pub struct LimitsError {
    field: &'static str,
    max: u64,
}

/// Largest accepted `requests_per_minute`.
pub const MAX_RPM: u32 = 1_000_000;
/// Largest accepted `max_requests` / `max_denied`.
pub const MAX_COUNT: u64 = 1_000_000_000_000;

impl Limits {
    /// Checks every limit is in range.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if let Some(rpm) = self.requests_per_minute {
            if rpm == 0 || rpm > MAX_RPM {
                return Err(LimitsError {
                    field: "requests_per_minute",
                    max: u64::from(MAX_RPM),
                });
            }
        }
        for (field, value) in [
            ("max_requests", self.max_requests),
            ("max_denied", self.max_denied),
        ] {
            if value.is_some_and(|v| v == 0 || v > MAX_COUNT) {
                return Err(LimitsError {
                    field,
                    max: MAX_COUNT,
                });
            }
        }
        Ok(())
    }
}
