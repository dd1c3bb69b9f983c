//! `airlock session create|list|show|revoke`.

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_core::rule::{self, RuleError};
use airlock_core::{duration, token, Rule};
use anyhow::anyhow;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::cli::{usage, ListFormat, OutputFormat, SessionArgs, SessionCommand, ShowFormat};
use crate::client::{AdminClient, ApiRefusal};
use crate::commands::exec::SESSION_ID_ENV;
use crate::output;

/// Runs a session subcommand against the admin API at `admin_url` (unless
/// `AIRLOCK_ADMIN_URL` says otherwise).
pub async fn run(cmd: SessionCommand, admin_url: String) -> anyhow::Result<()> {
    let client = AdminClient::from_env(admin_url);
    match cmd {
        SessionCommand::Create(args) => {
            if output::stdout_is_null() {
                // Bad arguments are told as such first.
                if let Err(e) = create_body(&args.session) {
                    return Err(with_provider_hint(&client, &args.session, e).await);
                }
                anyhow::bail!(
                    "stdout is /dev/null (or was closed): the session's token would be printed \
                     nowhere; no session created"
                );
            }
            let session = open(&client, &args.session).await?;
            let format = if args.json {
                OutputFormat::Json
            } else {
                args.format
            };
            if let Err(e) = output::print(&render_created(&session, format)) {
                // Its token went nowhere, and is not kept anywhere: nobody
                // can use the session, which is revoked rather than left to
                // run its TTL. Not a quiet end: nothing was created.
                let id = session.get("id").and_then(Value::as_str).unwrap_or("-");
                let revoked = client
                    .call(Method::DELETE, &format!("/v1/sessions/{id}"), None)
                    .await;
                let what = match revoked {
                    Ok(_) => format!("session {id} revoked"),
                    Err(why) => format!("session {id} could not be revoked ({why:#})"),
                };
                let cause = if output::is_stdout_closed(&anyhow::Error::from(e)) {
                    "stdout was closed".to_owned()
                } else {
                    "stdout could not be written".to_owned()
                };
                anyhow::bail!("{cause} before the session's token was printed; {what}");
            }
        }
        SessionCommand::List {
            all,
            format,
            json,
            limit,
            page_size,
        } => {
            let format = if json { ListFormat::Json } else { format };
            list(&client, all, format, limit, page_size).await?;
        }
        SessionCommand::Show { id, format, json } => {
            let format = if json { ShowFormat::Json } else { format };
            check_id("ID", &id)?;
            let session = client
                .call(Method::GET, &format!("/v1/sessions/{id}"), None)
                .await
                .map_err(|e| unknown_session("ID", e))?;
            let session = client.expect_fields(session, SESSION_FIELDS)?;
            match format {
                ShowFormat::Json => {
                    output::print(&format!("{}\n", serde_json::to_string_pretty(&session)?))?;
                }
                ShowFormat::Text => output::print(&render_text(&session))?,
            }
        }
        SessionCommand::Revoke {
            ids_or_tokens,
            labels,
        } if ids_or_tokens.is_empty() => {
            let labels = parse_labels(&labels)?;
            let ids = labelled(&client, &labels).await?;
            if ids.is_empty() {
                output::error_line(format_args!(
                    "no active session has the labels {}; nothing to revoke",
                    shown_labels(&labels)
                ));
            } else {
                revoke(&client, &ids).await?;
            }
        }
        SessionCommand::Revoke { ids_or_tokens, .. } => revoke(&client, &ids_or_tokens).await?,
    }
    Ok(())
}

/// Revokes each of `ids_or_tokens` in turn, every one checked for its
/// form first (a usage error revokes nothing). In an incident the
/// revocations matter more than one that fails: one the server does not
/// know, or refuses (a store out of reach: the server holds the
/// revocation and writes it later), is named on stderr and the rest are
/// still sent; an error that would fail them all (the server out of
/// reach, the admin token refused) stops at once. Exit 1 at the end if one
/// failed, else 2 if one was unknown.
async fn revoke(client: &AdminClient, ids_or_tokens: &[String]) -> anyhow::Result<()> {
    for id_or_token in ids_or_tokens {
        if id_or_token.starts_with(TOKEN_PREFIX) {
            if !token::is_well_formed(id_or_token) {
                return Err(usage(
                    "ID_OR_TOKEN: a malformed session token (sess_…): a token is sess_ and \
                     43 letters and digits",
                ));
            }
        } else if !id_or_token.starts_with("ses_")
            && airlock_core::SessionId::parse(id_or_token).is_none()
        {
            // Either is taken here (round 40: "not a session id" alone).
            return Err(usage(
                "ID_OR_TOKEN: neither a session id (ses_...) nor a session token (sess_...); \
                 `session list` shows the ids",
            ));
        } else {
            check_id("ID_OR_TOKEN", id_or_token)?;
        }
    }
    let (mut unknown, mut failed) = (false, false);
    for id_or_token in ids_or_tokens {
        let session = if id_or_token.starts_with(TOKEN_PREFIX) {
            let body = json!({ "token": id_or_token });
            client
                .call(Method::POST, "/v1/sessions/revoke", Some(&body))
                .await
        } else {
            client
                .call(Method::DELETE, &format!("/v1/sessions/{id_or_token}"), None)
                .await
        };
        let session = session.and_then(|s| client.expect_fields(s, SESSION_FIELDS));
        let error = match session.map_err(|e| unknown_session("ID_OR_TOKEN", e)) {
            Ok(session) => {
                output::print(&format!("{}\n", revoked_line(&session)?))?;
                continue;
            }
            Err(e) => e,
        };
        // Whether the server answered about this session alone.
        let of_this_one = crate::cli::is_usage(&error)
            || error
                .downcast_ref::<ApiRefusal>()
                .is_some_and(|r| r.status != StatusCode::UNAUTHORIZED);
        if ids_or_tokens.len() == 1 || !of_this_one {
            return Err(error);
        }
        output::error_line(format_args!("{error:#}"));
        if crate::cli::is_usage(&error) {
            unknown = true;
        } else {
            failed = true;
        }
    }
    if failed {
        anyhow::bail!("not every session given was revoked (see above)");
    }
    if unknown {
        return Err(usage(
            "ID_OR_TOKEN: not every session given was revoked (see above)",
        ));
    }
    Ok(())
}

/// What `session revoke` did, from the session the admin API answered with:
/// the session may have ended before (an expired session stays expired; a
/// revoked one is answered with `"already_revoked": true`).
fn revoked_line(session: &Value) -> anyhow::Result<String> {
    let id = session.get("id").and_then(Value::as_str).unwrap_or("?");
    let already = session.get("already_revoked") == Some(&Value::Bool(true));
    match session.get("state").and_then(Value::as_str) {
        Some("revoked") if already => {
            Ok(format!("session {id} was already revoked; nothing to do"))
        }
        Some("revoked") => Ok(format!("revoked {id}")),
        Some("expired") => Ok(format!("{id} had already expired; nothing to revoke")),
        state => Err(anyhow!(
            "the admin API answered that {id} is still {}",
            state.unwrap_or("in an unknown state")
        )),
    }
}

/// Opens a session for `args` through the admin API and returns its
/// answer (`id`, `token`, `env`, ...). Options are checked before anything
/// is sent; the server's refusal is said in terms of the option it came
/// from ([`refused_options`]).
pub async fn open(client: &AdminClient, args: &SessionArgs) -> anyhow::Result<Value> {
    let session = create(client, args).await?;
    // Rules the server says no SDK call can match (on stderr: stdout is
    // the session, perhaps read by a script).
    let warnings = session.get("warnings").and_then(Value::as_array);
    for warning in warnings.into_iter().flatten().filter_map(Value::as_str) {
        let shown: String = warning
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        crate::output::error_line(format_args!("warning: {shown}"));
    }
    client.expect_fields(session, &["id", "token", "env"])
}

/// Fields of every answer about a session.
const SESSION_FIELDS: &[&str] = &["id", "state"];

/// `POST /v1/sessions` for `args`, as [`open`] describes.
async fn create(client: &AdminClient, args: &SessionArgs) -> anyhow::Result<Value> {
    let body = match create_body(args) {
        Ok(body) => body,
        Err(e) => return Err(with_provider_hint(client, args, e).await),
    };
    let refusal = match client.call(Method::POST, "/v1/sessions", Some(&body)).await {
        Ok(session) => return Ok(session),
        Err(e) => e,
    };
    // Without --ttl the default is the server's max_ttl when that is
    // shorter: the server says its max_ttl only by refusing a longer TTL.
    match max_ttl_of(&refusal) {
        Some(max) if args.ttl.is_none() && (1..DEFAULT_TTL.as_secs()).contains(&max) => {
            let mut body = body;
            body["ttl_seconds"] = json!(max);
            client
                .call(Method::POST, "/v1/sessions", Some(&body))
                .await
                .map_err(|e| refused_options(e, args))
        }
        _ => Err(refused_options(refusal, args)),
    }
}

/// A session's time to live when `--ttl` is not given (or the server's
/// `sessions.max_ttl`, if that is shorter).
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// The server's `sessions.max_ttl` in seconds, from its refusal of a TTL
/// over it (`ttl_seconds must be between 1 and MAX ...`); `None` for any
/// other error.
fn max_ttl_of(error: &anyhow::Error) -> Option<u64> {
    let refusal = error.downcast_ref::<ApiRefusal>()?;
    if refusal.status != StatusCode::BAD_REQUEST {
        return None;
    }
    refusal
        .message
        .strip_prefix("ttl_seconds must be between 1 and ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// `error` (the refusal of `args`), plus `; did you mean openai?` when the
/// first rule refused names a provider in capitals (`OpenAI:POST:/v1/x`)
/// that the server configures in lower case. Asking the server is best
/// effort: without an answer the error is unchanged.
async fn with_provider_hint(
    client: &AdminClient,
    args: &SessionArgs,
    error: anyhow::Error,
) -> anyhow::Error {
    let first_refused = args
        .allow
        .iter()
        .find_map(|text| text.parse::<Rule>().err());
    let Some(RuleError::Provider(name)) = first_refused else {
        return error;
    };
    let lower = name.to_ascii_lowercase();
    if lower == name || rule::validate_provider(&lower).is_err() {
        return error;
    }
    match client.provider_names().await {
        Ok(names) if names.contains(&lower) => usage(format!("{error:#}; did you mean {lower}?")),
        _ => error,
    }
}

/// The prefix of session tokens (`sess_…`).
const TOKEN_PREFIX: &str = "sess_";

/// Refuses an `argument` that is not a session id, naming the argument. The
/// value is shown only when it is a malformed id (`ses_…`, not a secret):
/// anything else may be a token or a key pasted in the wrong place.
pub(crate) fn check_id(argument: &str, id: &str) -> anyhow::Result<()> {
    if airlock_core::SessionId::parse(id).is_some() {
        return Ok(());
    }
    Err(usage(if id.starts_with(TOKEN_PREFIX) {
        format!(
            "{argument}: a session token (sess_…) where a session id (ses_...) is expected; \
             `session list` shows ids"
        )
    } else if id.starts_with("ses_") {
        format!("{argument}: {id:?} is not a session id (ses_ and up to 60 letters and digits)")
    } else {
        format!("{argument}: not a session id (ses_...); `session list` shows them")
    }))
}

/// The admin API's 404 for a session (`no session ses_…`, `no session has
/// this token`) as a usage error naming `argument`; other errors unchanged.
fn unknown_session(argument: &str, error: anyhow::Error) -> anyhow::Error {
    match error.downcast_ref::<ApiRefusal>() {
        Some(refusal) if refusal.status == StatusCode::NOT_FOUND => {
            usage(format!("{argument}: {} on the server", refusal.message))
        }
        _ => error,
    }
}

/// The admin API's refusal of a new session (400), said in terms of the
/// options it came from, as a usage error; other errors unchanged. Every
/// field of the request is an option's value, so a 400 is the operator's
/// to fix: a TTL beyond the server's `sessions.max_ttl`, a provider it does
/// not configure, a label it refuses.
fn refused_options(error: anyhow::Error, args: &SessionArgs) -> anyhow::Error {
    let Some(refusal) = error.downcast_ref::<ApiRefusal>() else {
        return error;
    };
    if refusal.status != StatusCode::BAD_REQUEST {
        return error;
    }
    let message = refusal.message.as_str();
    if let Some(refused) = unknown_provider(message, args) {
        return refused;
    }
    if let Some(max) = max_ttl_of(&error) {
        return usage(format!(
            "--ttl {}: must be at most {} (the server's sessions.max_ttl)",
            args.ttl
                .clone()
                .unwrap_or_else(|| duration::format(DEFAULT_TTL)),
            duration::format(Duration::from_secs(max))
        ));
    }
    let flag = if message.starts_with("ttl_seconds") {
        "--ttl"
    } else if message.starts_with("limits.requests_per_minute") {
        "--rpm"
    } else if message.starts_with("limits.max_requests") {
        "--max-requests"
    } else if message.starts_with("limits.max_denied") {
        "--max-denied"
    } else if message.contains("label") {
        "--label"
    } else if message.contains("provider") || message.starts_with("scope") {
        "--allow"
    } else {
        return usage(message.to_owned());
    };
    // Without the API's field name: the option says which value it is.
    let reason = message
        .split_once(" must ")
        .filter(|(field, _)| !field.contains(' '))
        .map_or_else(|| message.to_owned(), |(_, rest)| format!("must {rest}"));
    usage(format!("{flag}: {reason}"))
}

/// The server's `unknown provider "NAME"; configured: A, B` said with the
/// `--allow` RULE that named it (`--allow "opneai:POST:/v1/x": unknown
/// provider "opneai" (configured: anthropic, openai)`); `None` for any
/// other message.
fn unknown_provider(message: &str, args: &SessionArgs) -> Option<anyhow::Error> {
    let rest = message.strip_prefix("unknown provider \"")?;
    let (name, configured) = rest.split_once("\"; configured: ")?;
    let rule = args.allow.iter().find(|text| {
        text.split_once(':')
            .is_some_and(|(provider, _)| provider == name)
    });
    let configured = if configured.is_empty() {
        "none"
    } else {
        configured
    };
    let what = format!("unknown provider {name:?} (configured: {configured})");
    Some(usage(match rule {
        Some(rule) => format!("--allow {rule:?}: {what}"),
        None => format!("--allow: {what}"),
    }))
}

/// `--label KEY=VALUE` options, each key once.
fn parse_labels(given: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for label in given {
        let (k, v) = label
            .split_once('=')
            .ok_or_else(|| usage(format!("--label {label:?} must be KEY=VALUE")))?;
        if let Some(first) = labels.get(k) {
            return Err(usage(format!(
                "--label {k:?} given twice ({k}={first} and {k}={v}): a label has one value"
            )));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

/// `labels` as given: `k=v, k2=v2`.
fn shown_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| label_pair(k, v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One label as people read it, `k=v`, with the value quoted (`k="a, b=c"`)
/// when it is empty or holds what would make the list ambiguous: a comma,
/// `=`, a quote, a backslash or white space (round 43: `team=a, b=c` read
/// as two labels). Keys hold none of these.
fn label_pair(key: &str, value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| matches!(c, ',' | '=' | '"' | '\\') || c.is_whitespace());
    if plain {
        format!("{key}={value}")
    } else {
        format!("{key}={value:?}")
    }
}

/// One page of `GET /v1/sessions` at `path` (the page after `after`): its
/// sessions and the cursor of the next page, if any. A server answering
/// with `after` again (the same page twice) is refused rather than asked
/// forever.
pub async fn sessions_page(
    client: &AdminClient,
    path: &str,
    after: Option<&str>,
) -> anyhow::Result<(Vec<Value>, Option<String>)> {
    let answer = client.call(Method::GET, path, None).await?;
    let mut answer = client.expect_fields(answer, &["sessions"])?;
    let next = answer
        .get("next")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(next) = next.as_deref().filter(|next| Some(*next) == after) {
        anyhow::bail!("the admin API answered the same page twice (next = {next:?})");
    }
    match answer.get_mut("sessions").map(Value::take) {
        Some(Value::Array(sessions)) => Ok((sessions, next)),
        _ => anyhow::bail!("the admin API's answer holds no \"sessions\" list"),
    }
}

/// The ids of the active sessions whose labels include all of `labels`,
/// every page of `GET /v1/sessions` read.
async fn labelled(
    client: &AdminClient,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = list_path(
            false,
            u64::from(airlock_admin::SESSION_PAGE_MAX),
            after.as_deref(),
        );
        let (sessions, next) = sessions_page(client, &path, after.as_deref()).await?;
        for session in &sessions {
            let has_all = labels
                .iter()
                .all(|(k, v)| session["labels"].get(k).and_then(Value::as_str) == Some(v));
            if let (true, Some(id)) = (has_all, session["id"].as_str()) {
                ids.push(id.to_owned());
            }
        }
        match next {
            Some(next) => after = Some(next),
            None => return Ok(ids),
        }
    }
}

/// Turns command-line options into the `POST /v1/sessions` body, refusing
/// bad rules, TTLs and labels before anything is sent.
fn create_body(args: &SessionArgs) -> anyhow::Result<Value> {
    let mut merged: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for text in &args.allow {
        let rule: Rule = text
            .parse()
            .map_err(|e| usage(format!("--allow {text:?}: {e}")))?;
        let value = serde_json::to_value(&rule)?;
        let methods = strings(&value["methods"]);
        let paths = strings(&value["paths"]);
        merged.push((rule.provider().to_owned(), methods, paths));
    }
    let scope: Vec<Value> = merged
        .into_iter()
        .map(|(provider, methods, paths)| json!({"provider": provider, "methods": methods, "paths": paths}))
        .collect();
    let ttl = match &args.ttl {
        Some(text) => parse_ttl(text)?,
        None => DEFAULT_TTL,
    };
    let labels = parse_labels(&args.labels)?;
    let mut limits = serde_json::Map::new();
    if let Some(rpm) = args.rpm {
        limits.insert("requests_per_minute".into(), json!(rpm));
    }
    if let Some(n) = args.max_requests {
        limits.insert("max_requests".into(), json!(n));
    }
    if let Some(n) = args.max_denied {
        limits.insert("max_denied".into(), json!(n));
    }
    Ok(json!({
        "scope": scope,
        "ttl_seconds": ttl.as_secs(),
        "labels": labels,
        "limits": limits,
    }))
}

/// `--ttl`: a duration of whole seconds, at least 1s.
fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let ttl = duration::parse(text).map_err(|e| match e {
        // Far over any max_ttl: said as such (round 43: "not a duration").
        duration::DurationError::TooLarge(_) => usage(format!(
            "--ttl {text}: far too long (the server's [sessions] max_ttl bounds a TTL; the \
             default is 24h)"
        )),
        duration::DurationError::Invalid(_) => usage(format!(
            "--ttl {text}: not a duration: use a whole number followed by s, m, h or d, e.g. \
             90s, 15m, 2h or 1h30m"
        )),
    })?;
    if ttl < Duration::from_secs(1) {
        return Err(usage(format!("--ttl {text}: a session lasts at least 1s")));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(usage(format!(
            "--ttl {text}: a TTL is a whole number of seconds (use {} or {})",
            duration::format(ttl),
            duration::format(ttl + Duration::from_secs(1))
        )));
    }
    Ok(ttl)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Prints a created session in the chosen format. `env` and `shell` give
/// the session's `env` plus `AIRLOCK_SESSION_ID` (not a secret), as `exec`
/// sets them.
pub fn render_created(session: &Value, format: OutputFormat) -> String {
    let mut env: Vec<(&str, &str)> = session
        .get("env")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    if let Some(id) = session.get("id").and_then(Value::as_str) {
        env.push((SESSION_ID_ENV, id));
    }
    match format {
        OutputFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(session).unwrap_or_default()
        ),
        OutputFormat::Env => env.iter().map(|(k, v)| format!("{k}={v}\n")).collect(),
        OutputFormat::Shell => env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect(),
    }
}

/// Single-quotes a value for POSIX shells.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `session list`: fetches page after page (following `next`) until the
/// end or `limit` sessions, and prints them in one table or one JSON
/// document, as one answer of the whole list printed before pagination.
///
/// JSON is streamed, each page printed as it comes. The table is aligned
/// to its widest cell, so it is printed at the end: only its cells (five
/// short strings a session) are kept meanwhile, never the pages.
async fn list(
    client: &AdminClient,
    all: bool,
    format: ListFormat,
    limit: Option<u64>,
    page_size: u32,
) -> anyhow::Result<()> {
    let now = airlock_session::now_ms();
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut json = JsonList::default();
    let mut listed: u64 = 0;
    let mut after: Option<String> = None;
    loop {
        let want = limit.map_or(u64::from(page_size), |limit| {
            (limit - listed).min(u64::from(page_size))
        });
        let path = list_path(all, want, after.as_deref());
        let (sessions, next) = sessions_page(client, &path, after.as_deref()).await?;
        let room =
            usize::try_from(limit.map_or(u64::MAX, |limit| limit - listed)).unwrap_or(usize::MAX);
        let page = &sessions[..sessions.len().min(room)];
        listed += u64::try_from(page.len()).unwrap_or(u64::MAX);
        match format {
            ListFormat::Table => rows.extend(page.iter().map(|s| table_row(s, now))),
            ListFormat::Json => output::print(&json.page(page))?,
        }
        match next {
            Some(next) if limit.is_none_or(|limit| listed < limit) => after = Some(next),
            _ => break,
        }
    }
    let end = match format {
        ListFormat::Table => format_table(rows),
        ListFormat::Json => json.end(),
    };
    output::print(&end)?;
    Ok(())
}

/// The path of one page: `limit` only when it is not the server's default
/// (an admin API from before pagination refuses it), `after` from the
/// previous page's `next`.
fn list_path(all: bool, limit: u64, after: Option<&str>) -> String {
    let mut params = Vec::new();
    if all {
        params.push("all=true".to_owned());
    }
    if limit != u64::from(airlock_admin::SESSION_PAGE_DEFAULT) {
        params.push(format!("limit={limit}"));
    }
    if let Some(after) = after {
        params.push(format!("after={}", crate::client::path_segment(after)));
    }
    if params.is_empty() {
        "/v1/sessions".to_owned()
    } else {
        format!("/v1/sessions?{}", params.join("&"))
    }
}

/// `{"sessions":[...]}` written a page at a time, byte for byte as
/// `serde_json::to_string_pretty` writes the whole document.
#[derive(Default)]
struct JsonList {
    started: bool,
    items: u64,
}

impl JsonList {
    /// The text of the next `sessions` (the document's start first).
    fn page(&mut self, sessions: &[Value]) -> String {
        let mut out = String::new();
        if !self.started {
            out.push_str("{\n  \"sessions\": [");
            self.started = true;
        }
        for session in sessions {
            out.push_str(if self.items == 0 { "\n" } else { ",\n" });
            // JSON strings hold no raw newline: every line of the value
            // is one of its own lines, indented as an array item.
            let pretty = serde_json::to_string_pretty(session).unwrap_or_default();
            for (i, line) in pretty.lines().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str("    ");
                out.push_str(line);
            }
            self.items += 1;
        }
        out
    }

    /// The document's end.
    fn end(&mut self) -> String {
        let mut out = self.page(&[]);
        out.push_str(if self.items == 0 {
            "]\n}\n"
        } else {
            "\n  ]\n}\n"
        });
        out
    }
}

/// `session show --format text`: one `key: value` line a field, the scope
/// as the RULEs that would grant it.
fn render_text(s: &Value) -> String {
    let text = |key: &str| s.get(key).and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut lines = vec![
        ("id", text("id")),
        ("state", text("state")),
        ("created", text("created_at")),
        ("expires", text("expires_at")),
    ];
    if s.get("revoked_at").is_some_and(Value::is_string) {
        let revoked = match s.get("revoked_reason").and_then(Value::as_str) {
            Some("max_denied") => format!("{} (max_denied reached)", text("revoked_at")),
            Some("operator") => format!("{} (by an operator)", text("revoked_at")),
            _ => text("revoked_at"),
        };
        lines.push(("revoked", revoked));
    }
    let calls = |key: &str| {
        s.pointer(&format!("/calls/{key}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    lines.push((
        "calls",
        format!("{} allowed, {} denied", calls("allowed"), calls("denied")),
    ));
    let pairs = |key: &str| {
        let joined = s
            .get(key)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v.as_str() {
                        Some(v) if key == "labels" => label_pair(k, v),
                        Some(v) => format!("{k}={v}"),
                        None => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if joined.is_empty() {
            "-".to_owned()
        } else {
            joined
        }
    };
    lines.push(("limits", pairs("limits")));
    lines.push(("labels", pairs("labels")));
    let rules: Vec<String> = s
        .get("scope")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|rule| {
            let provider = rule["provider"].as_str().unwrap_or("?").to_owned();
            let methods = strings(&rule["methods"]).join(",");
            strings(&rule["paths"])
                .into_iter()
                .map(move |path| format!("{provider}:{methods}:{path}"))
        })
        .collect();
    let mut out: String = lines
        .iter()
        .map(|(key, value)| format!("{:<8} {value}\n", format!("{key}:")))
        .collect();
    for (i, rule) in rules.iter().enumerate() {
        let key = if i == 0 { "scope:" } else { "" };
        out.push_str(&format!("{key:<8} {rule}\n"));
    }
    out
}

/// A session's cells in the table: id, state, time left, calls, labels.
fn table_row(s: &Value, now_ms: i64) -> [String; 5] {
    let text = |key: &str| s.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let expires_in = time::OffsetDateTime::parse(
        &text("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .map(|t| {
        let left_ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0) - now_ms;
        // An ended session expires in nothing, whatever its expiry said.
        if left_ms <= 0 || text("state") != "active" {
            "-".to_owned()
        } else {
            duration::format(Duration::from_millis(left_ms.unsigned_abs()))
        }
    })
    .unwrap_or_else(|_| "?".into());
    let calls = format!(
        "{}/{}",
        s.pointer("/calls/allowed")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        s.pointer("/calls/denied")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    );
    let labels = s
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| label_pair(k, v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|joined| !joined.is_empty())
        .unwrap_or_else(|| "-".to_owned());
    [text("id"), text("state"), expires_in, calls, labels]
}

/// `sessions` under a header, each column as wide as its widest cell.
fn format_table(sessions: Vec<[String; 5]>) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "STATE".to_owned(),
        "EXPIRES IN".to_owned(),
        "ALLOWED/DENIED".to_owned(),
        "LABELS".to_owned(),
    ]];
    rows.extend(sessions);
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
