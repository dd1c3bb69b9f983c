//! Row decoding of `sessions`, generic over the SQL backend.

use airlock_core::{SessionId, TokenHash};
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{decode_json, Result, SessionRow, SessionStatus, StoreError};

/// The columns a [`SessionRow`] is read from.
pub(crate) const SESSION_COLUMNS: &str =
    "id, token_hash, created_at, expires_at, revoked_at, scope, limits, labels, allowed, denied";

/// The columns a [`SessionStatus`] is read from.
pub(crate) const STATUS_COLUMNS: &str = "id, revoked_at, expires_at, allowed, denied";

/// A session from a row holding [`SESSION_COLUMNS`].
pub(crate) fn decode_session<R>(row: &R) -> Result<SessionRow>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let hash: String = row.try_get("token_hash")?;
    let scope: String = row.try_get("scope")?;
    let limits: String = row.try_get("limits")?;
    let labels: String = row.try_get("labels")?;
    Ok(SessionRow {
        id: session_id(&id)?,
        token_hash: TokenHash::from_hex(&hash).ok_or_else(|| corrupt(&id, "bad token hash"))?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        scope: decode_json(&id, "scope", &scope)?,
        limits: decode_json(&id, "limits", &limits)?,
        labels: decode_json(&id, "labels", &labels)?,
        allowed: count(row.try_get("allowed")?),
        denied: count(row.try_get("denied")?),
    })
}

/// A session's status from a row holding [`STATUS_COLUMNS`].
pub(crate) fn decode_status<R>(row: &R) -> Result<SessionStatus>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    Ok(SessionStatus {
        id: session_id(&id)?,
        revoked_at: row.try_get("revoked_at")?,
        expires_at: row.try_get("expires_at")?,
        allowed: count(row.try_get("allowed")?),
        denied: count(row.try_get("denied")?),
    })
}

fn session_id(id: &str) -> Result<SessionId> {
    SessionId::parse(id).ok_or_else(|| corrupt(id, "bad id"))
}

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn corrupt(id: &str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("session {id}"),
        reason: reason.to_owned(),
    }
}
