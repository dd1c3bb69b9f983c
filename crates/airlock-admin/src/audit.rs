//! `GET /v1/audit` and `GET /v1/audit/verify`.

use std::sync::Arc;

use airlock_audit::verify_store;
use airlock_core::audit::AuditKey;
use airlock_store::{AuditQuery, Store};
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::state::AdminState;

/// Records per page when `limit` is not given.
const DEFAULT_LIMIT: u32 = 100;
/// Most records one call returns.
const MAX_LIMIT: u32 = 10_000;

/// What the admin API needs to read and verify the audit trail.
pub struct AuditAccess {
    pub store: Arc<dyn Store>,
    pub key: Arc<AuditKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListAudit {
    session: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
}

fn access(state: &AdminState) -> Result<&AuditAccess, ApiError> {
    state.audit.as_ref().ok_or_else(|| {
        ApiError::NotFound("the audit trail is disabled ([audit] enabled = false)".into())
    })
}

/// `GET /v1/audit?session=ID&since=RFC3339&limit=N`: records, oldest first.
pub(crate) async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<ListAudit>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let audit = access(&state)?;
    let since_ms = query
        .since
        .as_deref()
        .map(|since| {
            OffsetDateTime::parse(since, &Rfc3339)
                .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
                .map_err(|e| {
                    ApiError::BadRequest(format!(
                        "since: {since:?} is not an RFC 3339 time such as 2026-01-02T03:04:05Z ({e})"
                    ))
                })
        })
        .transpose()?;
    // A malformed id is refused as on `/v1/sessions/{id}`, rather than
    // answered with no records.
    let session = query
        .session
        .as_deref()
        .map(crate::routes::parse_id)
        .transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit: must be between 1 and {MAX_LIMIT}"
        )));
    }
    let records = audit
        .store
        .audit_records(&AuditQuery {
            session: session.map(|id| id.to_string()),
            since_ms,
            limit,
            ..AuditQuery::default()
        })
        .await?;
    let records: Vec<Value> = records.iter().map(|r| r.to_json_value()).collect();
    Ok(Json(json!({ "records": records })))
}

/// `GET /v1/audit/verify`: the whole stored trail.
pub(crate) async fn verify(State(state): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    let audit = access(&state)?;
    let verified = verify_store(audit.store.as_ref(), &audit.key).await?;
    Ok(Json(match verified.first_break {
        None => json!({ "ok": true, "records": verified.records, "chains": verified.chains }),
        Some(broken) => json!({
            "ok": false,
            "first_bad": broken.seq,
            "chain": broken.chain,
            "reason": broken.reason.to_string(),
            "records": verified.records,
        }),
    }))
}
