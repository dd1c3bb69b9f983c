//! Routes of the admin API.

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_core::{token, SessionId, TokenHash};
use airlock_session::now_ms;
use axum::body::{Bytes, HttpBody};
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::exposition;
use crate::sessions::{CreateSession, SessionView};
use crate::state::AdminState;

type Shared = State<Arc<AdminState>>;

/// The admin router.
pub fn router(state: Arc<AdminState>) -> Router {
    let authenticated = Router::new()
        .route(
            "/v1/sessions",
            post(create_session).get(crate::listing::list),
        )
        .route("/v1/sessions/revoke", post(revoke_by_token))
        .route(
            "/v1/sessions/{id}",
            get(show_session).delete(revoke_session),
        )
        .route("/v1/providers", get(crate::providers::list))
        .route(
            "/v1/providers/{name}/credential",
            get(crate::providers::get_credential)
                .put(crate::providers::put_credential)
                .delete(crate::providers::delete_credential),
        )
        .route("/v1/audit", get(crate::audit::list))
        .route("/v1/audit/verify", get(crate::audit::verify))
        .route("/v1/server", get(server))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route_layer(middleware::from_fn(refuse_declared_oversize))
        // Outermost: nothing is looked at, bodies included, before the
        // admin token is.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::auth::require_admin,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(authenticated)
        // Behind the token too: without it, the API says nothing of which
        // routes it has.
        .fallback(not_found.layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::auth::require_admin,
        )))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Largest request body the admin API reads (sessions, credentials: small
/// JSON documents); a larger one is refused with 413 `payload_too_large`.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// A request whose declared length (`Content-Length`) is over [`MAX_BODY`]
/// is refused at once, before any of its body is awaited: axum's own limit
/// counts bytes as they arrive, so a client declaring a huge body and
/// sending none held the connection open waiting for it. A body of unknown
/// length (chunked) is still cut off by that limit when it passes it.
async fn refuse_declared_oversize(req: Request, next: Next) -> Result<Response, ApiError> {
    let declared = req.body().size_hint().lower();
    if declared > u64::try_from(MAX_BODY).unwrap_or(u64::MAX) {
        return Err(ApiError::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body ({declared} bytes) is over the admin API's limit of {MAX_BODY} bytes"),
        ));
    }
    Ok(next.run(req).await)
}

/// Longest text of axum's own refusal kept as the JSON error's message.
const REFUSAL_TEXT_LIMIT: usize = 1024;

/// Every error the API answers is JSON: axum's own refusals (405 for a
/// method a route does not have, 413 for a body over the limit, 400 for a
/// path segment that is not UTF-8) come as plain text or empty, and become
/// [`ApiError`]s with the same status and headers (`Allow` stays).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, REFUSAL_TEXT_LIMIT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("refused")
            .to_ascii_lowercase(),
        text => text.to_owned(),
    };
    let mut json = ApiError::Status(status, message).into_response();
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    json.headers_mut().extend(parts.headers);
    json
}

/// `GET /v1/server`: this process — version, start, store, audit, session
/// bounds in force. Behind the admin token: a version tells a scanner
/// which flaws to try.
async fn server(State(state): Shared) -> Json<Value> {
    let info = &state.server;
    Json(json!({
        "version": info.version,
        "started_at": airlock_core::audit::format_ts(info.started_at_ms),
        "uptime_seconds": info.started.elapsed().as_secs(),
        "store": info.store,
        "audit": {
            "enabled": state.audit.is_some(),
            "fail_closed": state.audit.is_some() && info.audit_fail_closed,
        },
        "sessions": {
            "max_ttl_seconds": state.max_ttl.as_secs(),
            "max_calls_in_flight": info.max_calls_in_flight,
        },
        "public_url": state.public_url,
    }))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 while serving, 503 while starting or draining, while a
/// fail-closed audit trail cannot be written, and while a shared session
/// store has been out of reach for longer than `max_staleness` (every call
/// is refused then). Like `/healthz`, it needs no admin token. When more
/// than one holds, the first in that order is named: `audit_unavailable`
/// while the audit writer cannot write (a store out of reach usually
/// stops it first), even after the staleness bound passes.
async fn readyz(State(state): Shared) -> Response {
    let status = if !state.ready.load(std::sync::atomic::Ordering::SeqCst) {
        "draining"
    } else if !(state.calls_admitted)() {
        "audit_unavailable"
    } else if !state.registry.can_vouch() {
        "store_unavailable"
    } else {
        return (StatusCode::OK, Json(json!({"status": "ready"}))).into_response();
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": status })),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such admin route".into())
}

async fn create_session(State(state): Shared, body: Bytes) -> Result<Response, ApiError> {
    let new = CreateSession::parse(&body, &state)?;
    let (live, token) = state.registry.create(new).await?;
    state.metrics.sessions_created.inc();
    let env = session_env(&state, live.scope().providers(), token.expose());
    let view = SessionView::from_live(&live, now_ms());
    tracing::info!(session = %live.id(), expires_at = %view.expires_at, "session created");
    let mut body = serde_json::to_value(&view).map_err(|e| ApiError::Internal(e.to_string()))?;
    let warnings = scope_warnings(&state, live.scope());
    if let Some(object) = body.as_object_mut() {
        object.insert("token".into(), Value::String(token.expose().to_owned()));
        object.insert("env".into(), json!(env));
        if !warnings.is_empty() {
            object.insert("warnings".into(), json!(warnings));
        }
    }
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Path patterns that cannot match a call the provider's SDKs make through
/// the session's base URL (`{public_url}/{provider}{base_path}`: every
/// such call is under `base_path`), compared segment by segment (round
/// 40: `openai:POST:/chat/completions`, a path relative to
/// `OPENAI_BASE_URL`, was taken without a word and every SDK call got
/// 403). Said, not refused: an agent may call such a path itself.
fn scope_warnings(state: &AdminState, scope: &airlock_core::Scope) -> Vec<String> {
    let mut warnings = Vec::new();
    for rule in scope.rules() {
        let name = rule.provider();
        let Some(provider) = state.providers.get(name) else {
            continue;
        };
        let base = provider.base_path.trim_end_matches('/');
        if base.is_empty() {
            continue;
        }
        for pattern in rule.paths() {
            let pattern = pattern.as_str();
            if may_match_under(pattern, base) {
                continue;
            }
            let meant = match pattern
                .strip_prefix(&format!("/{name}"))
                .filter(|rest| may_match_under(rest, base))
            {
                Some(rest) => rest.to_owned(),
                // The base itself or above it: what is under it.
                None if may_match_under(&format!("{pattern}/x"), base) => format!("{base}/**"),
                None => format!("{base}{pattern}"),
            };
            warnings.push(format!(
                "{name} path {pattern} is not under {base}, where the session's base URL \
                 ({}) sends its SDK's calls, so no SDK call matches it: did you mean {meant}?",
                provider.env_base_url
            ));
        }
    }
    warnings
}

/// Whether path `pattern` (`*` one segment, `**` the rest) can match a
/// path strictly under `base` (`/v1` → `/v1/...`).
fn may_match_under(pattern: &str, base: &str) -> bool {
    let mut base = base.trim_start_matches('/').split('/');
    for segment in pattern.trim_start_matches('/').split('/') {
        if segment == "**" {
            return true;
        }
        match base.next() {
            Some(expected) if segment == "*" || segment == expected => {}
            Some(_) => return false,
            // Deeper than the base, along it: under it.
            None => return true,
        }
    }
    // Ended at the base or above it.
    false
}

/// For every provider in scope: its key variable = token, its base-URL
/// variable = `{public_url}/{provider}{base_path}`.
fn session_env(state: &AdminState, providers: Vec<&str>, token: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for name in providers {
        if let Some(p) = state.providers.get(name) {
            env.insert(p.env_key.clone(), token.to_owned());
            env.insert(
                p.env_base_url.clone(),
                format!("{}/{name}{}", state.public_url, p.base_path),
            );
        }
    }
    env
}

pub(crate) fn parse_id(id: &str) -> Result<SessionId, ApiError> {
    /// Characters of a refused id said back (the rest elided).
    const SHOWN: usize = 64;
    SessionId::parse(id).ok_or_else(|| {
        let shown: String = id.chars().take(SHOWN).collect();
        let more = if shown.len() < id.len() { "…" } else { "" };
        ApiError::BadRequest(format!("{shown:?}{more} is not a session id (ses_...)"))
    })
}

async fn show_session(
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let id = parse_id(&id)?;
    let row = state
        .registry
        .store()
        .session_by_id(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no session {id}")))?;
    Ok(Json(SessionView::new(
        &row,
        state.registry.cached(&id).as_deref(),
        now_ms(),
    )))
}

async fn revoke_session(
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    revoke_and_show(state, id, "session revoked").await
}

/// Revokes session `id` and answers with it as `GET` shows it, plus
/// `already_revoked`: whether it had been revoked before this request
/// (revoking again changes nothing, and is neither counted nor logged as a
/// revocation; the CLI says "already revoked").
async fn revoke_and_show(
    state: Arc<AdminState>,
    id: SessionId,
    log: &'static str,
) -> Result<Json<Value>, ApiError> {
    // Read before revoking, but never in the way of it: a revocation holds
    // in this process whether or not the store can be read or written.
    let (already, expired) = ended_before(&state, &id).await;
    if !state.registry.revoke(&id).await? {
        return Err(ApiError::NotFound(format!("no session {id}")));
    }
    // Only a session that was active is newly revoked: an expired one
    // could not be used any more (the CLI says so).
    if !already && !expired {
        state.metrics.sessions_revoked.inc();
        tracing::info!(session = %id, "{log}");
    }
    let Json(view) = show_session(State(state), Path(id.to_string())).await?;
    let mut body = serde_json::to_value(&view).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(object) = body.as_object_mut() {
        object.insert("already_revoked".into(), Value::Bool(already));
    }
    Ok(Json(body))
}

/// Whether session `id` was revoked already (in this process's cache, a
/// revocation not yet stored, or in the store), and whether it had
/// expired. Only what the answer says and what is counted depend on it: a
/// store that cannot be read leaves both to the cache (false if the
/// session is not cached).
async fn ended_before(state: &AdminState, id: &SessionId) -> (bool, bool) {
    let now = now_ms();
    let cached = state.registry.cached(id);
    let row = match state.registry.store().session_by_id(id).await {
        Ok(row) => row,
        Err(e) => {
            tracing::debug!(session = %id, error = %e, "session not read before its revocation");
            None
        }
    };
    let revoked = cached.as_ref().is_some_and(|s| s.revoked_at().is_some())
        || row.as_ref().is_some_and(|r| r.revoked_at.is_some());
    let expired =
        cached.is_some_and(|s| s.expires_at() <= now) || row.is_some_and(|r| r.expires_at <= now);
    (revoked, expired)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeByToken {
    token: String,
}

/// `POST /v1/sessions/revoke {"token": "sess_..."}`: revocation by token, so
/// a token never has to appear in a URL.
async fn revoke_by_token(State(state): Shared, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: RevokeByToken = crate::sessions::parse_json(&body, "revoke request")?;
    if !token::is_well_formed(&req.token) {
        return Err(ApiError::BadRequest(
            "token is not a session token (sess_ and 43 letters and digits)".into(),
        ));
    }
    let cached = state
        .registry
        .cached_by_token(&req.token)
        .map(|live| live.id().clone());
    let id = match cached {
        Some(id) => Some(id),
        None => state
            .registry
            .store()
            .session_by_token(&TokenHash::of(&req.token))
            .await?
            .map(|row| row.id),
    };
    let id = id.ok_or_else(|| ApiError::NotFound("no session has this token".into()))?;
    revoke_and_show(state, id, "session revoked by token").await
}

/// The metrics, as OpenMetrics when the client asks for it (Prometheus
/// does), else in Prometheus' classic text format.
async fn metrics(State(state): Shared, headers: HeaderMap) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.metrics_registry)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (content_type, text) = if exposition::wants_openmetrics(&headers) {
        (exposition::OPENMETRICS, text)
    } else {
        (exposition::CLASSIC, exposition::to_classic(&text))
    };
    // The answer depends on `Accept`: a cache in between must know.
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::VARY, "accept"),
        ],
        text,
    )
        .into_response())
}
