//! `airlock status`: the running server as the admin API shows it — ready
//! or why not, each provider's credential, the active sessions.

use std::fmt::Write as _;
use std::process::ExitCode;

use hyper::Method;
use serde_json::{json, Value};

use crate::client::{path_segment, AdminClient, ApiRefusal, NoAdminToken};
use crate::output;

/// Runs `status` against the admin API at `admin_url` (unless
/// `AIRLOCK_ADMIN_URL` says otherwise); exit 0 when the server is ready,
/// 1 when it is not. With `json`, a server that cannot be asked is said on
/// stdout too (`ready` false and the `error`), not only on stderr.
pub async fn run(admin_url: String, json: bool) -> anyhow::Result<ExitCode> {
    let client = AdminClient::from_env(admin_url);
    let outcome = report(&client, json).await;
    let Err(e) = &outcome else {
        return outcome;
    };
    // `/readyz` needs no token: a server that answered with a refusal (a
    // wrong token, say), or was not asked for want of a token, may still
    // say whether it is ready. One that did not answer is not asked again
    // (a hung one would take the whole timeout once more).
    let asked =
        e.downcast_ref::<ApiRefusal>().is_some() || e.downcast_ref::<NoAdminToken>().is_some();
    let readiness = if asked {
        match client.readiness().await {
            Ok((_, answer)) => answer["status"].as_str().map(str::to_owned),
            Err(_) => None,
        }
    } else {
        None
    };
    if json {
        let status = json!({
            "url": client.shown_url(),
            "ready": readiness.as_deref() == Some("ready"),
            "error": format!("{e:#}"),
        });
        output::print(&format!("{}\n", serde_json::to_string_pretty(&status)?))?;
    } else if let Some(readiness) = readiness {
        // The one line the server tells anyone; the error (on stderr)
        // says what the rest needs.
        output::print(&format!(
            "server:     {}: {}\n",
            client.shown_url(),
            readiness_text(&readiness)
        ))?;
    }
    outcome
}

/// What `run` prints, read from the admin API.
async fn report(client: &AdminClient, json: bool) -> anyhow::Result<ExitCode> {
    // With the token first: a server that refuses it is named as such
    // (`/readyz` needs none).
    let names = client.provider_names().await?;
    let (ready_status, readiness) = client.readiness().await?;
    let readiness = readiness
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let ready = ready_status.is_success() && readiness == "ready";
    let mut providers = Vec::new();
    for name in names {
        let path = format!("/v1/providers/{}/credential", path_segment(&name));
        // A stored credential's state needs the store, which may be why
        // the server is not ready: said as unknown then (round 40: status
        // gave up on the whole report).
        let credential = match client.call(Method::GET, &path, None).await {
            Ok(credential) => credential,
            Err(e)
                if !ready
                    && e.downcast_ref::<ApiRefusal>()
                        .is_some_and(|r| r.status == hyper::StatusCode::SERVICE_UNAVAILABLE) =>
            {
                Value::Null
            }
            Err(e) => return Err(e),
        };
        providers.push(json!({
            "name": name,
            "source": credential.get("source").cloned().unwrap_or(Value::Null),
            "set": credential.get("set").cloned().unwrap_or(Value::Null),
        }));
    }
    // The count needs the store, which may be why the server is not
    // ready: said as unknown then, the rest still shown.
    let active = match active_sessions(client).await {
        Ok(active) => Some(active),
        Err(e) if !ready && e.downcast_ref::<ApiRefusal>().is_some() => None,
        Err(e) => return Err(e),
    };
    // A server from before `GET /v1/server` answers 404: said as unknown.
    let server = match client.exchange(Method::GET, "/v1/server", None).await? {
        (status, server) if status.is_success() => server,
        _ => Value::Null,
    };
    let text = if json {
        let status = json!({
            "url": client.shown_url(),
            "ready": ready,
            "status": readiness,
            "server": server,
            "providers": providers,
            "active_sessions": active,
        });
        format!("{}\n", serde_json::to_string_pretty(&status)?)
    } else {
        render(client.shown_url(), &readiness, &server, &providers, active)
    };
    output::print(&text)?;
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The active sessions, counted over every page of `GET /v1/sessions`.
async fn active_sessions(client: &AdminClient) -> anyhow::Result<u64> {
    let mut count: u64 = 0;
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/sessions?limit={}", airlock_admin::SESSION_PAGE_MAX);
        if let Some(after) = &after {
            let _ = write!(path, "&after={}", path_segment(after));
        }
        let (sessions, next) =
            super::session::sessions_page(client, &path, after.as_deref()).await?;
        count += u64::try_from(sessions.len()).unwrap_or(u64::MAX);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(count),
        }
    }
}

/// What `/readyz`'s status means, for people.
fn readiness_text(status: &str) -> &str {
    match status {
        "ready" => "ready",
        "draining" => "not ready: draining (shutting down, or for a moment at start)",
        "audit_unavailable" => {
            "not ready: the audit trail cannot be written, so every call is refused (fail_closed)"
        }
        "store_unavailable" => {
            "not ready: the shared store has been out of reach for longer than max_staleness, so \
             every call is refused"
        }
        _ => "not ready",
    }
}

/// The line describing the server process (`GET /v1/server`), if it says.
fn server_line(server: &Value) -> Option<String> {
    let version = printable(server.get("version")?.as_str()?);
    let version = version.as_str();
    let mut parts = vec![format!("airlock {version}")];
    if version != env!("CARGO_PKG_VERSION") {
        parts[0].push_str(&format!(" (this CLI: {})", env!("CARGO_PKG_VERSION")));
    }
    if let Some(up) = server.get("uptime_seconds").and_then(Value::as_u64) {
        parts.push(format!(
            "up {}",
            airlock_core::duration::format(std::time::Duration::from_secs(up))
        ));
    }
    if let Some(store) = server.get("store").and_then(Value::as_str) {
        parts.push(format!("store {}", printable(store)));
    }
    let audit = &server["audit"];
    match (audit["enabled"].as_bool(), audit["fail_closed"].as_bool()) {
        (Some(true), Some(true)) => parts.push("audit on (fail closed)".to_owned()),
        (Some(true), Some(false)) => parts.push("audit on (fail open)".to_owned()),
        (Some(true), None) => parts.push("audit on".to_owned()),
        (Some(false), _) => parts.push("audit OFF".to_owned()),
        (None, _) => {}
    }
    if let Some(max) = server["sessions"]["max_calls_in_flight"].as_u64() {
        parts.push(format!("{max} calls in flight a session"));
    }
    Some(parts.join(", "))
}

/// `text` from the server as a terminal may show it: control characters
/// (an escape sequence) as `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The lines for people.
fn render(
    url: &str,
    readiness: &str,
    server: &Value,
    providers: &[Value],
    active: Option<u64>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "server:     {url}: {}", readiness_text(readiness));
    if let Some(line) = server_line(server) {
        let _ = writeln!(out, "            {line}");
    }
    let _ = writeln!(out, "providers:  {}", providers.len());
    let width = providers
        .iter()
        .filter_map(|p| p["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for provider in providers {
        let name = provider["name"].as_str().unwrap_or("-");
        let Some(source) = provider["source"].as_str() else {
            let _ = writeln!(
                out,
                "  {name:<width$}  unknown (the server could not read its store)"
            );
            continue;
        };
        let state = match provider["set"].as_bool() {
            Some(true) => "available".to_owned(),
            Some(false) if source == "store" => {
                format!("not set: calls get 503 (airlock credential set {name})")
            }
            Some(false) => "not available: calls get 503".to_owned(),
            None => "unknown".to_owned(),
        };
        let _ = writeln!(out, "  {name:<width$}  {source}, {state}");
    }
    match active {
        Some(active) => {
            let plural = if active == 1 { "" } else { "s" };
            let _ = writeln!(out, "sessions:   {active} active session{plural}");
        }
        None => {
            let _ = writeln!(
                out,
                "sessions:   unknown (the server could not read its store)"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_for_people() {
        let providers = [
            json!({"name": "anthropic", "source": "env:ANTHROPIC_API_KEY", "set": true}),
            json!({"name": "gh", "source": "store", "set": false}),
        ];
        assert_eq!(
            render("http://a:1", "ready", &Value::Null, &providers, Some(1)),
            "server:     http://a:1: ready\nproviders:  2\n  anthropic  env:ANTHROPIC_API_KEY, \
             available\n  gh         store, not set: calls get 503 (airlock credential set \
             gh)\nsessions:   1 active session\n"
        );
        let server = json!({
            "version": env!("CARGO_PKG_VERSION"), "uptime_seconds": 3720, "store": "postgres",
            "audit": {"enabled": true, "fail_closed": true},
            "sessions": {"max_calls_in_flight": 115},
        });
        assert_eq!(
            server_line(&server).unwrap(),
            format!(
                "airlock {}, up {}, store postgres, audit on (fail closed), 115 calls in flight a \
                 session",
                env!("CARGO_PKG_VERSION"),
                airlock_core::duration::format(std::time::Duration::from_secs(3720))
            )
        );
        assert!(render("u", "store_unavailable", &Value::Null, &[], None)
            .ends_with("sessions:   unknown (the server could not read its store)\n"));
        let unread = [json!({"name": "vault", "source": null, "set": null})];
        assert!(
            render("u", "store_unavailable", &Value::Null, &unread, None)
                .contains("\n  vault  unknown (the server could not read its store)\n"),
        );
        let escape = json!({"version": "9.9\u{1b}[2J"});
        assert!(server_line(&escape).unwrap().starts_with("airlock 9.9?[2J"));
        let older = json!({"version": "0.0.1", "audit": {"enabled": false}});
        assert!(server_line(&older).unwrap().contains("(this CLI: "));
        assert!(server_line(&older).unwrap().ends_with("audit OFF"));
        assert!(render("u", "audit_unavailable", &Value::Null, &[], Some(0))
            .starts_with("server:     u: not ready: the audit trail cannot be written"));
    }
}
