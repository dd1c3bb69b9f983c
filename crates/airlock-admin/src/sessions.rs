//! Session request and answer bodies.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_core::audit::format_ts;
use airlock_core::{Limits, ObjectOnly, Scope};
use airlock_session::{LiveSession, NewSession, SessionState};
use airlock_store::SessionRow;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::{AdminState, ProviderEnv};

/// Most rules one session's scope may hold.
pub const MAX_SCOPE_RULES: usize = 256;
/// Most path patterns one session's scope may hold, all rules together:
/// every call the scope refuses is matched against all of them.
pub const MAX_SCOPE_PATTERNS: usize = 1024;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 256;

/// Body of `POST /v1/sessions`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    pub scope: Scope,
    pub ttl_seconds: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "object_or_null")]
    pub limits: Limits,
}

/// An object, or `null` taken as the default; never the fields as an
/// array ([`ObjectOnly`]).
fn object_or_null<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<ObjectOnly<T>>::deserialize(deserializer)?
        .map(|object| object.0)
        .unwrap_or_default())
}

/// `null` taken as the field's default, as when it is left out (clients
/// that serialise a `None` send it).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A session as the admin API shows it: never the token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    pub state: SessionState,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Why a revoked session was: its `max_denied` limit, or a revocation
    /// someone asked for (admin API, CLI, `exec` on exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_reason: Option<RevokedReason>,
    pub scope: Scope,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub calls: Calls,
}

/// Why a session was revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokedReason {
    /// It reached `max_denied` (its denials, on every replica).
    MaxDenied,
    /// Someone revoked it.
    Operator,
}

impl RevokedReason {
    /// The reason for a session in `state` with `limits` and `calls`: a
    /// session revoked once its denials reached `max_denied` was revoked
    /// for them (a revoked session's later calls are 401s, never counted).
    fn of(state: SessionState, limits: &Limits, calls: Calls) -> Option<Self> {
        (state == SessionState::Revoked).then(|| {
            if limits.max_denied.is_some_and(|max| calls.denied >= max) {
                Self::MaxDenied
            } else {
                Self::Operator
            }
        })
    }
}

/// Call counters of a session.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Calls {
    pub allowed: u64,
    pub denied: u64,
}

// === impl CreateSession ===

impl CreateSession {
    /// Parses and checks a request body; every problem is a 400 naming it.
    pub fn parse(body: &[u8], state: &AdminState) -> Result<NewSession, ApiError> {
        Self::parse_with(body, &state.providers, state.max_ttl)
    }

    /// [`CreateSession::parse`] against the configured `providers` and
    /// `[sessions] max_ttl` (no server state needed: used by the fuzzer).
    pub fn parse_with(
        body: &[u8],
        providers: &BTreeMap<String, ProviderEnv>,
        max_ttl: Duration,
    ) -> Result<NewSession, ApiError> {
        let req: CreateSession = parse_json(body, "session request")?;
        if req.scope.rules().is_empty() {
            return Err(ApiError::BadRequest(
                "scope must hold at least one rule".into(),
            ));
        }
        if req.scope.rules().len() > MAX_SCOPE_RULES {
            return Err(ApiError::BadRequest(format!(
                "scope holds {} rules; at most {MAX_SCOPE_RULES} are allowed (a rule's paths \
                 list takes several paths, and a trailing /** covers a whole subtree)",
                req.scope.rules().len()
            )));
        }
        let patterns = req.scope.pattern_count();
        if patterns > MAX_SCOPE_PATTERNS {
            return Err(ApiError::BadRequest(format!(
                "scope holds {patterns} paths in all; at most {MAX_SCOPE_PATTERNS} are allowed (a \
                 trailing /** covers a whole subtree)"
            )));
        }
        for provider in req.scope.providers() {
            if !providers.contains_key(provider) {
                return Err(ApiError::BadRequest(format!(
                    "unknown provider {provider:?}; configured: {}",
                    providers.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let max = max_ttl.as_secs();
        if req.ttl_seconds == 0 || req.ttl_seconds > max {
            return Err(ApiError::BadRequest(format!(
                "ttl_seconds must be between 1 and {max} (sessions.max_ttl)"
            )));
        }
        req.limits
            .validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        validate_labels(&req.labels)?;
        Ok(NewSession {
            scope: req.scope,
            limits: req.limits,
            labels: req.labels,
            ttl: Duration::from_secs(req.ttl_seconds),
        })
    }
}

/// Parses a JSON body; the error names the field at fault.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    // A JSON object and nothing after it: serde would also take a struct
    // written as an array of its fields, and ignore what follows the value.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(format!(
            "invalid {what}: the body must be a JSON object"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::BadRequest(format!("invalid {what}: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid {what}: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid {what}: {e}")))?;
    Ok(value)
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::BadRequest(format!("at most {MAX_LABELS} labels")));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(ApiError::BadRequest(format!(
                "label key {key:?} must be 1-{MAX_LABEL_KEY} characters of a-z, A-Z, 0-9, '_', '-', '.', '/'"
            )));
        }
        if value.len() > MAX_LABEL_VALUE || value.chars().any(is_hidden) {
            return Err(ApiError::BadRequest(format!(
                "label {key:?}: value must be at most {MAX_LABEL_VALUE} bytes without control, \
                 format, line-separator, private-use or unassigned characters"
            )));
        }
    }
    Ok(())
}

/// Whether `c` is a character a label value may not hold: one that is
/// not shown as itself — controls, format characters such as U+202E
/// (right-to-left override), U+200B (zero-width space) and the zero-width
/// joiners, line and paragraph separators, private-use and unassigned
/// code points — with which a label could show an operator something
/// else than it holds.
fn is_hidden(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
    )
}

// === impl SessionView ===

impl SessionView {
    /// Shows a stored session, preferring the live counters and revocation
    /// of this process when it has the session cached.
    pub fn new(row: &SessionRow, live: Option<&LiveSession>, now_ms: i64) -> Self {
        let (state, revoked_at, calls) = match live {
            // On a shared store the row may be ahead of this replica's
            // cache (another replica revoked it, or counted calls).
            Some(live) => (
                match row.revoked_at {
                    Some(_) => SessionState::Revoked,
                    None => live.state(now_ms),
                },
                live.revoked_at().or(row.revoked_at),
                Calls {
                    allowed: live.allowed().max(row.allowed),
                    denied: live.denied().max(row.denied),
                },
            ),
            None => {
                let state = if row.revoked_at.is_some() {
                    SessionState::Revoked
                } else if now_ms >= row.expires_at {
                    SessionState::Expired
                } else {
                    SessionState::Active
                };
                (
                    state,
                    row.revoked_at,
                    Calls {
                        allowed: row.allowed,
                        denied: row.denied,
                    },
                )
            }
        };
        Self {
            id: row.id.to_string(),
            state,
            created_at: format_ts(row.created_at),
            expires_at: format_ts(row.expires_at),
            revoked_at: revoked_at.map(format_ts),
            revoked_reason: RevokedReason::of(state, &row.limits, calls),
            scope: row.scope.clone(),
            limits: row.limits,
            labels: row.labels.clone(),
            calls,
        }
    }
}

impl SessionView {
    /// Shows a session this process has in memory.
    pub fn from_live(live: &LiveSession, now_ms: i64) -> Self {
        let state = live.state(now_ms);
        let calls = Calls {
            allowed: live.allowed(),
            denied: live.denied(),
        };
        Self {
            id: live.id().to_string(),
            state,
            created_at: format_ts(live.created_at()),
            expires_at: format_ts(live.expires_at()),
            revoked_at: live.revoked_at().map(format_ts),
            revoked_reason: RevokedReason::of(state, live.limits(), calls),
            scope: live.scope().clone(),
            limits: *live.limits(),
            labels: live.labels().clone(),
            calls,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Two {
        a: u32,
        b: u32,
    }

    #[test]
    fn only_one_json_object_is_a_body() {
        let two: Two = parse_json(b" {\"a\": 1, \"b\": 2}\n", "test").unwrap();
        assert_eq!((two.a, two.b), (1, 2));
        for body in [
            &b"[1, 2]"[..],
            b"{\"a\": 1, \"b\": 2} {}",
            b"{\"a\": 1, \"b\": 2} x",
            b"",
        ] {
            let err = parse_json::<Two>(body, "test").unwrap_err();
            assert!(
                matches!(err, ApiError::BadRequest(ref m) if m.starts_with("invalid test: ")),
                "{err:?}"
            );
        }
    }
}
