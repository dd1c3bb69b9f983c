//! `GET /v1/sessions`: sessions a page at a time, newest first.
//!
//! A page is read from the store by keyset (`created_at`, `id`), never by
//! offset, and serialised from typed structs: the cost of one call is
//! bounded by its `limit`, however many sessions were ever created.

use std::sync::Arc;

use airlock_core::SessionId;
use airlock_session::{now_ms, SessionState};
use airlock_store::{SessionKey, SessionPage, SessionRow};
use axum::extract::{Query, State};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::sessions::SessionView;
use crate::state::AdminState;

/// Sessions per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 1_000;
/// Most sessions one page holds.
pub const MAX_LIMIT: u32 = 10_000;
/// Longest cursor text looked at (a real one is under 120 characters).
const MAX_CURSOR: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default, deserialize_with = "flag")]
    all: bool,
    /// Text, so that a bad value gets an error naming `limit`.
    limit: Option<String>,
    after: Option<String>,
}

/// A query flag: `true`/`false`, or `1`/`0` as many clients write them.
fn flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(serde::de::Error::custom(format!(
            "{other:?} is not a flag (true, false, 1 or 0)"
        ))),
    }
}

/// The answer: a page of sessions, and where the next one starts.
#[derive(Serialize)]
pub(crate) struct SessionList {
    sessions: Vec<SessionView>,
    /// Present only when more sessions may follow: pass it back as
    /// `after` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `GET /v1/sessions[?all=true][&limit=N][&after=CURSOR]`.
///
/// Without `all`, only active sessions are listed: the store filters on
/// its rows, and the page is filtered again by what this process knows
/// (a session revoked or counted here but not yet flushed). A page may so
/// hold fewer than `limit` sessions, even none, and still have a `next`:
/// the cursor is that of the last row read, not of the last one shown.
pub(crate) async fn list(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(query) = query?;
    let limit = parse_limit(query.limit.as_deref())?;
    let after = query.after.as_deref().map(decode_cursor).transpose()?;
    let now = now_ms();
    // One row more than the page: whether it comes says whether another
    // page follows.
    let rows = state
        .registry
        .store()
        .list_sessions_page(&SessionPage {
            include_ended: query.all,
            now_ms: now,
            after,
            limit: limit.saturating_add(1),
        })
        .await?;
    Ok(Json(page_of(rows, limit, |row| {
        let view = SessionView::new(row, state.registry.cached(&row.id).as_deref(), now);
        (query.all || view.state == SessionState::Active).then_some(view)
    })))
}

/// The page of `limit` sessions out of `rows` (read with one more row
/// than `limit`), shown by `show` (which leaves out those it returns
/// `None` for). `next` is the cursor of the page's last row, shown or
/// not, whenever a row beyond the page was read.
fn page_of(
    mut rows: Vec<SessionRow>,
    limit: u32,
    show: impl Fn(&SessionRow) -> Option<SessionView>,
) -> SessionList {
    let page_len = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > page_len;
    rows.truncate(page_len);
    let next = if more {
        rows.last().map(|row| encode_cursor(&SessionKey::of(row)))
    } else {
        None
    };
    // Each row is dropped once shown.
    let sessions = rows.into_iter().filter_map(|row| show(&row)).collect();
    SessionList { sessions, next }
}

/// `limit`, 1 to [`MAX_LIMIT`]; [`DEFAULT_LIMIT`] when absent.
fn parse_limit(text: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_LIMIT);
    };
    let refuse = || {
        ApiError::BadRequest(format!(
            "limit: {text:?} is not a whole number between 1 and {MAX_LIMIT}"
        ))
    };
    // Digits only: no sign, no blanks.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(refuse()),
    }
}

/// The cursor of the page after the session with `key`: opaque to
/// clients (URL-safe base64 of `CREATED_AT_MS.ID`).
pub(crate) fn encode_cursor(key: &SessionKey) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", key.created_at, key.id))
}

/// The key a cursor of [`encode_cursor`] names; anything else (another
/// encoding of the same key included) is a 400 naming `after`.
pub(crate) fn decode_cursor(cursor: &str) -> Result<SessionKey, ApiError> {
    let refuse = bad_cursor;
    let text = cursor_text(cursor, MAX_CURSOR)?;
    let (created_at, id) = text.split_once('.').ok_or_else(refuse)?;
    let canonical_number = !created_at.is_empty()
        && created_at.bytes().all(|b| b.is_ascii_digit())
        && (created_at == "0" || !created_at.starts_with('0'));
    if !canonical_number {
        return Err(refuse());
    }
    let created_at: i64 = created_at.parse().map_err(|_| refuse())?;
    let id = SessionId::parse(id).ok_or_else(refuse)?;
    let key = SessionKey { created_at, id };
    // One text per key: what does not re-encode to itself was not made here.
    if encode_cursor(&key) != cursor {
        return Err(refuse());
    }
    Ok(key)
}

/// The 400 for an `after` that is no cursor of this API.
pub(crate) fn bad_cursor() -> ApiError {
    ApiError::BadRequest(
        "after: not a cursor of this API (pass back the `next` of the previous page unchanged)"
            .into(),
    )
}

/// The text inside a cursor (URL-safe base64 of UTF-8, at most `max`
/// characters); [`bad_cursor`] for anything else. Whoever made the cursor
/// checks the text re-encodes to it.
pub(crate) fn cursor_text(cursor: &str, max: usize) -> Result<String, ApiError> {
    if cursor.is_empty() || cursor.len() > max {
        return Err(bad_cursor());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad_cursor())?;
    String::from_utf8(bytes).map_err(|_| bad_cursor())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(created_at: i64, id: &str) -> SessionKey {
        SessionKey {
            created_at,
            id: SessionId::parse(id).unwrap(),
        }
    }

    #[test]
    fn cursors_round_trip() {
        for k in [key(0, "ses_a"), key(1_767_000_000_123, "ses_Zz09aBcD")] {
            let cursor = encode_cursor(&k);
            assert!(cursor
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(decode_cursor(&cursor).unwrap(), k);
        }
    }

    #[test]
    fn anything_else_is_not_a_cursor() {
        let b64 = |text: &str| URL_SAFE_NO_PAD.encode(text);
        let good = encode_cursor(&key(5, "ses_abc"));
        for bad in [
            String::new(),
            "garbage!".into(),
            format!("{good}="),
            format!("{good}A"),
            "x".repeat(300),
            b64("5"),
            b64("5.ses_"),
            b64("5.sess_abc"),
            b64("5.ses_a-b"),
            b64("-5.ses_abc"),
            b64("+5.ses_abc"),
            b64("05.ses_abc"),
            b64(" 5.ses_abc"),
            b64(".ses_abc"),
            b64("99999999999999999999.ses_abc"),
            b64("5.ses_abc.x"),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            let err = decode_cursor(&bad).unwrap_err();
            assert!(
                matches!(&err, ApiError::BadRequest(m) if m.starts_with("after: ")),
                "{bad:?}: {err:?}"
            );
        }
    }

    fn row(created_at: i64, id: &str) -> SessionRow {
        SessionRow {
            id: SessionId::parse(id).unwrap(),
            token_hash: airlock_core::TokenHash::of(id),
            created_at,
            expires_at: created_at + 1_000,
            revoked_at: None,
            scope: serde_json::from_str(
                r#"[{"provider":"openai","methods":["POST"],"paths":["/v1/x"]}]"#,
            )
            .unwrap(),
            limits: airlock_core::Limits::default(),
            labels: std::collections::BTreeMap::new(),
            allowed: 0,
            denied: 0,
        }
    }

    /// A page filtered down (even to nothing) still says where the next
    /// one starts: after the last row read, not the last one shown.
    #[test]
    fn next_follows_the_rows_read_not_the_ones_shown() {
        let rows = || vec![row(30, "ses_c"), row(20, "ses_b"), row(10, "ses_a")];
        let show_all = |r: &SessionRow| Some(SessionView::new(r, None, 0));
        let ids = |list: &SessionList| -> Vec<String> {
            list.sessions.iter().map(|v| v.id.clone()).collect()
        };

        let page = page_of(rows(), 2, show_all);
        assert_eq!(ids(&page), ["ses_c", "ses_b"]);
        let next = decode_cursor(page.next.as_deref().unwrap()).unwrap();
        assert_eq!((next.created_at, next.id.as_str()), (20, "ses_b"));

        // Only ses_c is shown: next is still after ses_b.
        let page = page_of(rows(), 2, |r: &SessionRow| {
            (r.id.as_str() == "ses_c").then(|| SessionView::new(r, None, 0))
        });
        assert_eq!(ids(&page), ["ses_c"]);
        let next = decode_cursor(page.next.as_deref().unwrap()).unwrap();
        assert_eq!(next.id.as_str(), "ses_b");
        // Nothing shown, more to come.
        let page = page_of(rows(), 2, |_: &SessionRow| None);
        assert!(page.sessions.is_empty() && page.next.is_some());

        // The last page: no next, and none in the JSON.
        let page = page_of(rows(), 3, show_all);
        assert_eq!(page.next, None);
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 1, "{json}");
        assert_eq!(json["sessions"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn limits_are_whole_numbers_in_range() {
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("10000")).unwrap(), MAX_LIMIT);
        assert_eq!(parse_limit(Some("0010")).unwrap(), 10);
        for bad in [
            "",
            "0",
            "10001",
            "-1",
            "+5",
            " 5",
            "5 ",
            "1e3",
            "abc",
            "99999999999",
        ] {
            let err = parse_limit(Some(bad)).unwrap_err();
            assert!(
                matches!(&err, ApiError::BadRequest(m) if m.starts_with("limit: ")),
                "{bad:?}: {err:?}"
            );
        }
    }
}
