//! `GET /v1/audit` and `GET /v1/audit/verify`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use airlock_audit::{verify_store, Verified};
use airlock_core::audit::{AuditKey, AuditRecord};
use airlock_core::SessionId;
use airlock_store::{take_oldest_first, AuditQuery, Store};
use axum::extract::{Query, State};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::state::AdminState;

/// Records per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 1_000;
/// Most records one page holds.
pub const MAX_LIMIT: u32 = 10_000;
/// Longest cursor text looked at (a few dozen characters a chain).
const MAX_CURSOR: usize = 4_096;

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
    after: Option<String>,
    from: Option<String>,
}

/// The answer: a page of records, and where the next one starts.
#[derive(Serialize)]
pub(crate) struct AuditList {
    records: Vec<Value>,
    /// Present only when more records may follow: pass it back as `after`
    /// for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    /// Always present: where this page ended. Passed back as `after` later,
    /// it answers the records committed since (what `audit tail --remote`
    /// polls with).
    resume: String,
    /// Present only when the cursor given as `after` was behind a chain's
    /// floor: records it had not read were pruned (`audit prune`) before
    /// it came back; per chain, the first of them and the first record
    /// there is now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pruned: Vec<Value>,
}

/// Where the next page starts: the query's filters, and per chain the last
/// seq already answered (a chain not named starts where `since` says).
#[derive(Debug, PartialEq, Eq)]
struct AuditCursor {
    since_ms: Option<i64>,
    session: Option<SessionId>,
    after: BTreeMap<u32, u64>,
}

fn access(state: &AdminState) -> Result<&AuditAccess, ApiError> {
    state.audit.as_ref().ok_or_else(|| {
        ApiError::NotFound("the audit trail is disabled ([audit] enabled = false)".into())
    })
}

/// `GET /v1/audit?session=ID&since=RFC3339&limit=N&after=CURSOR`: records,
/// each chain in seq order (with `since`, from its first record at or after
/// that time on), the chains interleaved oldest first, a page at a time;
/// `resume`, always there, is where the page ended (to poll for records
/// committed later).
///
/// A page is read by keyset, each chain after the seq the cursor names:
/// `limit` + 1 records of each chain, the page taken from their fronts.
/// `next` is there whenever a record was left over.
pub(crate) async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<ListAudit>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
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
    if let Some(from) = query.from.as_deref() {
        return end_of_trail(audit, from, &query, session).await;
    }
    let mut cursor = match query.after.as_deref() {
        None => AuditCursor {
            since_ms,
            session,
            after: BTreeMap::new(),
        },
        Some(text) => {
            let cursor = decode_cursor(text)?;
            // The filters are the cursor's: given again, they must agree.
            if query.since.is_some() && since_ms != cursor.since_ms
                || session.is_some() && session != cursor.session
            {
                return Err(ApiError::BadRequest(
                    "after: this cursor is of a listing with other `session` or `since` (pass \
                     them unchanged, or not at all, with `after`)"
                        .into(),
                ));
            }
            cursor
        }
    };
    // A follower behind a prune is told what it missed rather than left
    // to find the gap in what it kept.
    let mut pruned = Vec::new();
    if query.after.is_some() {
        for floor in audit.store.audit_floors().await? {
            if let Some(&read) = cursor.after.get(&floor.chain) {
                if read < floor.seq {
                    pruned.push(json!({
                        "chain": floor.chain,
                        "missed_from": read + 1,
                        "first_seq": floor.seq + 1,
                    }));
                }
            }
        }
    }
    let page_len = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut chains = Vec::new();
    for head in audit.store.audit_heads().await? {
        let records = audit
            .store
            .audit_records(&AuditQuery {
                session: cursor.session.as_ref().map(ToString::to_string),
                since_ms: cursor.since_ms,
                chain: Some(head.chain),
                after_seq: cursor.after.get(&head.chain).copied().unwrap_or(0),
                limit: limit.saturating_add(1),
            })
            .await?;
        chains.push(VecDeque::from(records));
    }
    let page = take_oldest_first(&mut chains, page_len);
    let more = chains.iter().any(|c| !c.is_empty());
    for record in &page {
        cursor.after.insert(record.chain, record.seq);
    }
    let resume = encode_cursor(&cursor);
    let next = more.then(|| resume.clone());
    let records = page.iter().map(AuditRecord::to_json_value).collect();
    Ok(Json(AuditList {
        records,
        next,
        resume,
        pruned,
    }))
}

/// `GET /v1/audit?from=end[&session=ID]`: no records, and a `resume` at the
/// end of every chain as committed now (each chain's head: its records up
/// to there are committed with it), from which a client follows what is
/// committed later whatever its clock says.
async fn end_of_trail(
    audit: &AuditAccess,
    from: &str,
    query: &ListAudit,
    session: Option<SessionId>,
) -> Result<Json<AuditList>, ApiError> {
    if from != "end" {
        return Err(ApiError::BadRequest(
            "from: the one place it names is `end` (from=end)".into(),
        ));
    }
    if query.after.is_some() || query.since.is_some() {
        return Err(ApiError::BadRequest(
            "from=end starts where the trail ends now: not with `after` or `since`".into(),
        ));
    }
    let after = audit
        .store
        .audit_heads()
        .await?
        .iter()
        .map(|head| (head.chain, head.seq))
        .collect();
    let cursor = AuditCursor {
        since_ms: None,
        session,
        after,
    };
    Ok(Json(AuditList {
        records: Vec::new(),
        next: None,
        resume: encode_cursor(&cursor),
        pruned: Vec::new(),
    }))
}

/// The cursor text: opaque to clients (URL-safe base64 of
/// `SINCE|SESSION|CHAIN.SEQ,…`, `-` for no filter).
fn encode_cursor(cursor: &AuditCursor) -> String {
    let since = cursor
        .since_ms
        .map_or_else(|| "-".to_owned(), |ms| ms.to_string());
    let session = cursor
        .session
        .as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let after: Vec<String> = cursor
        .after
        .iter()
        .map(|(chain, seq)| format!("{chain}.{seq}"))
        .collect();
    URL_SAFE_NO_PAD.encode(format!("{since}|{session}|{}", after.join(",")))
}

/// The cursor [`encode_cursor`] made; anything else (another encoding of
/// the same cursor included) is a 400 naming `after`.
fn decode_cursor(text: &str) -> Result<AuditCursor, ApiError> {
    let refuse = crate::listing::bad_cursor;
    let plain = crate::listing::cursor_text(text, MAX_CURSOR)?;
    let mut parts = plain.split('|');
    let (Some(since), Some(session), Some(after), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse());
    };
    let since_ms = match since {
        "-" => None,
        ms => Some(ms.parse::<i64>().map_err(|_| refuse())?),
    };
    let session = match session {
        "-" => None,
        id => Some(SessionId::parse(id).ok_or_else(refuse)?),
    };
    let mut positions = BTreeMap::new();
    for pair in after.split(',').filter(|p| !p.is_empty()) {
        let (chain, seq) = pair.split_once('.').ok_or_else(refuse)?;
        let chain = chain.parse::<u32>().map_err(|_| refuse())?;
        let seq = seq.parse::<u64>().map_err(|_| refuse())?;
        positions.insert(chain, seq);
    }
    let cursor = AuditCursor {
        since_ms,
        session,
        after: positions,
    };
    // One text per cursor: what does not re-encode to itself was not made
    // here.
    if encode_cursor(&cursor) != text {
        return Err(refuse());
    }
    Ok(cursor)
}

/// `GET /v1/audit/verify`: the whole stored trail. `records` is the number
/// of records that verified (in a broken chain, those before its first
/// break); a failing answer names the first break (`first_bad`, `chain`,
/// `reason`) and, in `broken_chains`, every broken chain's first break.
pub(crate) async fn verify(State(state): State<Arc<AdminState>>) -> Result<Json<Value>, ApiError> {
    let audit = access(&state)?;
    let verified = verify_store(audit.store.as_ref(), &audit.key).await?;
    Ok(Json(verified_json(&verified)))
}

/// A verification as `GET /v1/audit/verify` answers it (and `airlock audit
/// verify --json` prints it).
pub fn verified_json(verified: &Verified) -> Value {
    let mut verdict = match &verified.first_break {
        None => json!({ "ok": true, "records": verified.records, "chains": verified.chains }),
        Some(broken) => json!({
            "ok": false,
            "first_bad": broken.seq,
            "chain": broken.chain,
            "reason": broken.reason.to_string(),
            "records": verified.records,
            "chains": verified.chains,
            "broken_chains": verified
                .broken_chains
                .iter()
                .map(|b| json!({
                    "chain": b.chain,
                    "first_bad": b.seq,
                    "reason": b.reason.to_string(),
                }))
                .collect::<Vec<_>>(),
        }),
    };
    // Only for a trail that was pruned: the verdict of one that was not
    // stays as it always was.
    if !verified.pruned.is_empty() {
        verdict["pruned"] = verified
            .pruned
            .iter()
            .map(|(chain, first_seq)| json!({"chain": chain, "first_seq": first_seq}))
            .collect();
    }
    verdict
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cursors_round_trip_and_nothing_else_is_one() {
        let cursors = [
            AuditCursor {
                since_ms: None,
                session: None,
                after: BTreeMap::new(),
            },
            AuditCursor {
                since_ms: Some(-5),
                session: SessionId::parse("ses_Zz09"),
                after: [(1, 7), (4, 12_345_678_901)].into(),
            },
        ];
        for cursor in cursors {
            let text = encode_cursor(&cursor);
            assert_eq!(decode_cursor(&text).unwrap(), cursor);
        }
        let b64 = |text: &str| URL_SAFE_NO_PAD.encode(text);
        for bad in [
            String::new(),
            "!!".into(),
            b64("-|-"),
            b64("-|-|1.2|x"),
            b64("01|-|"),
            b64("-|nope|"),
            b64("-|-|1.2,,3.4"),
            b64("-|-|1"),
            b64("-|-|x.1"),
            b64("-|-|2.1,1.1"),
            "a".repeat(MAX_CURSOR + 1),
        ] {
            assert!(decode_cursor(&bad).is_err(), "{bad:?}");
        }
    }
}
