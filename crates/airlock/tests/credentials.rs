//! End-to-end tests of the real credentials: auth styles and formats, the
//! leak guard on echoed responses, upstream refusals, `file:` and `store`
//! sources with rotation, and a scan of everything airlock writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use airlock_testkit::client::request;
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sqlx::Connection as _;

const ADMIN_TOKEN: &str = "adm_credential_test_token_000000";
const OPENAI_KEY: &str = "sk-proj-real-openai-key-0123456789abcdef";

fn toml_provider(name: &str, upstream: &str, auth: &str, credential: &str, extra: &str) -> String {
    let upper = name.to_uppercase();
    format!(
        "[providers.{name}]\nupstream = \"{upstream}\"\nauth = \"{auth}\"\ncredential = \"{credential}\"\n\
         env_key = \"{upper}_API_KEY\"\nenv_base_url = \"{upper}_BASE_URL\"\nbase_path = \"\"\n{extra}\n"
    )
}

async fn session(airlock: &Airlock, providers: &[&str]) -> String {
    let scope: Vec<Value> = providers
        .iter()
        .map(|p| json!({"provider": p, "methods": ["*"], "paths": ["/**"]}))
        .collect();
    let s = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 600}))
        .await
        .unwrap();
    s["token"].as_str().unwrap().to_owned()
}

async fn call(airlock: &Airlock, path: &str, token: &str) -> (u16, http::HeaderMap, String) {
    let reply = request(
        "GET",
        &format!("{}{path}", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::new(),
    )
    .await;
    (reply.status, reply.headers.clone(), reply.text())
}

/// A mock provider, airlock with `openai` in front of it (env credential),
/// and a session token allowed everything on it.
async fn openai_with_session() -> (MockProvider, Airlock, String) {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .start()
        .await
        .unwrap();
    let token = session(&airlock, &["openai"]).await;
    (mock, airlock, token)
}

async fn records(airlock: &Airlock) -> Vec<Value> {
    let (status, body) = airlock
        .admin("GET", "/v1/audit?limit=10000", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    body["records"].as_array().unwrap().clone()
}

#[tokio::test]
async fn auth_styles_formats_and_static_headers() {
    let mock = MockProvider::start().await;
    let up = mock.url();
    let config = [
        toml_provider("azure", &up, "header:api-key", "env:AZURE_KEY", ""),
        toml_provider("google", &up, "header:x-goog-api-key", "env:GOOGLE_KEY", ""),
        toml_provider("gquery", &up, "query:key", "env:GOOGLE_KEY", ""),
        toml_provider(
            "github",
            &up,
            "header:authorization",
            "env:GITHUB_KEY",
            "auth_format = \"token {key}\"",
        ),
        toml_provider(
            "anthropic",
            &up,
            "header:x-api-key",
            "env:ANTHROPIC_KEY",
            "[providers.anthropic.headers]\nanthropic-version = \"2023-06-01\"\nopenai-organization = \"org-acme\"",
        ),
    ]
    .concat();
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .config(&config)
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("AZURE_KEY", "azure-real-key-000000001")
        .env("GOOGLE_KEY", "AIza-real-google-key-0002")
        .env("GITHUB_KEY", "ghp_real_github_token_0003")
        .env("ANTHROPIC_KEY", "sk-ant-real-anthropic-0004")
        .start()
        .await
        .unwrap();
    let token = session(
        &airlock,
        &["azure", "google", "gquery", "github", "anthropic"],
    )
    .await;

    let cases = [
        ("/azure/x", "api-key", "azure-real-key-000000001"),
        ("/google/x", "x-goog-api-key", "AIza-real-google-key-0002"),
        (
            "/github/x",
            "authorization",
            "token ghp_real_github_token_0003",
        ),
        ("/anthropic/x", "x-api-key", "sk-ant-real-anthropic-0004"),
    ];
    for (path, header, value) in cases {
        mock.clear();
        assert_eq!(call(&airlock, path, &token).await.0, 200, "{path}");
        let seen = &mock.requests()[0];
        assert_eq!(seen.header(header).as_deref(), Some(value), "{path}");
        assert!(!seen.contains(&token), "{path}: token forwarded");
    }
    mock.clear();
    assert_eq!(call(&airlock, "/gquery/x?a=1", &token).await.0, 200);
    assert_eq!(
        mock.requests()[0].query(),
        Some("a=1&key=AIza-real-google-key-0002")
    );
    // Static headers replace whatever the agent sent under that name.
    mock.clear();
    let reply = request(
        "GET",
        &format!("{}/anthropic/x", airlock.proxy_url()),
        &[("x-api-key", &token), ("anthropic-version", "1999-01-01")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = &mock.requests()[0];
    assert_eq!(seen.header_values("anthropic-version"), vec!["2023-06-01"]);
    assert_eq!(
        seen.header("openai-organization").as_deref(),
        Some("org-acme")
    );
}

#[tokio::test]
async fn bad_credential_config_is_refused_at_start() {
    let mock = MockProvider::start().await;
    for (extra, expected) in [
        ("auth_format = \"token\"", "auth_format"),
        ("auth_format = \"{key} {key}\"", "auth_format"),
        (
            "[providers.p.headers]\nhost = \"evil\"",
            "providers.p.headers.host",
        ),
        (
            "[providers.p.headers]\n\"x y\" = \"1\"",
            "providers.p.headers.x y",
        ),
    ] {
        let config = toml_provider("p", &mock.url(), "bearer", "env:P_KEY", extra);
        let err = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&config)
            .env("P_KEY", "p-real-key-00000001")
            .start()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{extra}: {err}");
    }
}

/// A credential serve refuses stops it before it prints or stores anything
/// else: no admin token is generated, no audit chain begun.
#[tokio::test]
async fn a_refused_credential_stops_serve_before_anything_is_written() {
    let mock = MockProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let err = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("short", &mock.url(), "bearer", "y", "")
        .env("AIRLOCK_ADMIN_TOKEN", "")
        .dir(dir.path().to_path_buf())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 8 bytes"), "{err}");
    assert!(!err.contains("AIRLOCK_ADMIN_TOKEN="), "{err}");
    assert!(!dir.path().join("airlock.db.audit-key").exists(), "{err}");
    // Nor a database (round 37: an empty one and its lock file were left).
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("airlock.db"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn echoed_credentials_are_redacted_everywhere() {
    let (_mock, airlock, token) = openai_with_session().await;

    // A JSON echo of every request header, Content-Length kept.
    let (status, headers, body) = call(&airlock, "/openai/echo", &token).await;
    assert_eq!(status, 200);
    assert!(!body.contains(OPENAI_KEY), "{body}");
    assert!(body.contains("[REDACTED BY AIRLOCK]"), "{body}");
    let length: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
    assert_eq!(length, body.len());
    serde_json::from_str::<Value>(&body).expect("redaction keeps the JSON valid");

    // An SSE stream with the secret cut across many frames, and a header.
    let reply = request(
        "GET",
        &format!("{}/openai/leak-sse", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    assert!(!text.contains(OPENAI_KEY), "{text}");
    assert!(
        text.starts_with("data: ") && text.contains("[REDACTED BY AIRLOCK]"),
        "{text}"
    );
    let leak = reply.headers["x-leak"].to_str().unwrap();
    assert!(
        !leak.contains(OPENAI_KEY) && leak.contains("[REDACTED BY AIRLOCK]"),
        "{leak}"
    );

    let recs = records(&airlock).await;
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert_eq!(r["flags"], json!(["credential_redacted"]), "{r}");
    }
    // A clean response is not flagged.
    assert_eq!(call(&airlock, "/openai/v1/models", &token).await.0, 200);
    assert_eq!(records(&airlock).await[2]["flags"], json!([]));
}

/// A compressed echo would carry the credential past the leak guard, which
/// reads bodies as they are: airlock asks providers for unencoded answers,
/// and refuses an answer encoded all the same.
#[tokio::test]
async fn compressed_answers_cannot_carry_the_credential_past_the_guard() {
    let (mock, airlock, token) = openai_with_session().await;
    let auth = format!("Bearer {token}");
    let headers = [
        ("authorization", auth.as_str()),
        ("accept-encoding", "gzip, br"),
    ];
    let url = |path: &str| format!("{}/openai{path}", airlock.proxy_url());

    // The agent asked for gzip; the provider was asked for none.
    let reply = request("GET", &url("/echo"), &headers, Bytes::new()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers.get("content-encoding"), None);
    let text = reply.text();
    assert!(!text.contains(OPENAI_KEY), "{text}");
    assert!(text.contains("[REDACTED BY AIRLOCK]"), "{text}");
    let seen = mock.requests();
    assert_eq!(seen[0].header_values("accept-encoding"), vec!["identity"]);

    // A provider that compresses regardless: airlock's 502, no body of its.
    let reply = request("GET", &url("/gzip-always"), &headers, Bytes::new()).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.error_code().as_deref(), Some("upstream_error"));
    assert!(reply.text().contains("gzip-encoded"), "{}", reply.text());
    assert_eq!(reply.headers.get("content-encoding"), None);

    let recs = records(&airlock).await;
    assert_eq!(
        recs[0]["flags"],
        json!(["credential_redacted"]),
        "{}",
        recs[0]
    );
    assert_eq!(recs[1]["decision"], "upstream_error", "{}", recs[1]);
    assert_eq!(recs[1]["upstream_status"], 200, "{}", recs[1]);
}

/// The credential in a provider's reason phrase or in a header name (where
/// no mask fits) never reaches the agent: the standard reason phrase goes
/// out, and the header is dropped.
#[tokio::test]
async fn a_credential_in_the_answer_s_head_outside_its_values_is_dropped() {
    let (_mock, airlock, token) = openai_with_session().await;
    let host = airlock.proxy_url().trim_start_matches("http://").to_owned();
    let answer = airlock_testkit::client::raw(
        &airlock.proxy_url(),
        format!(
            "GET /openai/leak-head HTTP/1.1\r\nHost: {host}\r\n\
             Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let (head, _) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let lower_key = OPENAI_KEY.to_ascii_lowercase();
    assert!(!head.to_ascii_lowercase().contains(&lower_key), "{head}");
    let recs = records(&airlock).await;
    assert_eq!(
        recs[0]["flags"],
        json!(["credential_redacted"]),
        "{}",
        recs[0]
    );
}

/// A provider's 401 (it refused the real credential) is airlock's own 502;
/// its 403 (what the key may not do: a model, a region) is relayed, as the
/// agent's SDK reports it (round 39).
#[tokio::test]
async fn an_upstream_refusing_the_credential_is_airlocks_502() {
    let (_mock, airlock, token) = openai_with_session().await;
    let (status, headers, body) = call(&airlock, "/openai/status/401", &token).await;
    assert_eq!(status, 502, "{body}");
    // Retrying cannot fix the operator's credential: SDKs are told so.
    assert_eq!(headers["x-should-retry"], "false");
    let refused: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refused["error"]["code"], "upstream_auth_failed");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(!message.contains("sk-"), "{message}");
    let (status, headers, body) = call(&airlock, "/openai/status/403", &token).await;
    assert_eq!((status, body.as_str()), (403, r#"{"status":403}"#));
    assert!(!headers.contains_key("x-should-retry"), "{headers:?}");
    // Metrics count what the agent got, as the records do.
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap();
    let line = "airlock_proxy_calls_total{provider=\"openai\",decision=\"upstream_auth_failed\"} 1";
    assert!(metrics.contains(line), "{metrics}");
    let recs = records(&airlock).await;
    assert_eq!(recs[0]["decision"], "upstream_auth_failed");
    assert_eq!(recs[0]["upstream_status"], 401);
    assert_eq!(recs[1]["decision"], "allow");
    assert_eq!(recs[1]["upstream_status"], 403);
    assert_eq!(recs[0]["status"], 502);
}

/// Polls calls until the mock sees `expected` in the Authorization header.
async fn wait_for_credential(airlock: &Airlock, mock: &MockProvider, token: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        mock.clear();
        let (status, _, _) = call(airlock, "/p/x", token).await;
        let seen = mock
            .requests()
            .first()
            .and_then(|r| r.header("authorization"));
        if status == 200 && seen.as_deref() == Some(&format!("Bearer {expected}")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {expected}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server whose provider `p` (bearer, upstream `mock`) takes its
/// credential from `file`.
async fn serve_with_file_credential(mock: &MockProvider, file: &Path) -> Airlock {
    let config = toml_provider(
        "p",
        &mock.url(),
        "bearer",
        &format!("file:{}", file.display()),
        "",
    );
    AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .config(&config)
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .start()
        .await
        .unwrap()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A credential file other users can read is warned about, with its mode
/// (never its value), once per mode: an agent on the same machine could
/// read the key airlock keeps from it (known since round 24: silent).
#[tokio::test]
async fn a_credential_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;

    const NEEDLE: &str = "the credential file can be read or written by other users";
    let mock = MockProvider::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("p.key");
    std::fs::write(&file, "file-key-kept-private\n").unwrap();
    let chmod = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode));
    chmod(0o600).unwrap();
    let airlock = serve_with_file_credential(&mock, &file).await;
    chmod(0o644).unwrap();
    let warned = airlock.wait_for_output(NEEDLE, 0).await;
    assert!(
        warned.contains("WARN") && warned.contains("mode=0644"),
        "{warned}"
    );
    // None at start (it would have come first): the file was 0600 then.
    assert_eq!(airlock.output().matches(NEEDLE).count(), 1);
    chmod(0o604).unwrap();
    let warned = airlock.wait_for_output(NEEDLE, 1).await;
    assert!(warned.contains("mode=0604"), "{warned}");
    assert!(!airlock.output().contains("file-key-kept-private"));
    // At start too.
    let restarted = serve_with_file_credential(&mock, &file).await;
    let warned = restarted.wait_for_output(NEEDLE, 0).await;
    assert!(warned.contains("mode=0604"), "{warned}");
}

/// The check `serve` makes of a credential file before it creates its
/// database reads the file as its watcher does: an empty one is a key not
/// set yet (503 until it is), one padded with whitespace is the key
/// within (the diff review after round 37: both stopped `serve`).
#[tokio::test]
async fn empty_and_padded_credential_files_do_not_stop_serve() {
    let mock = MockProvider::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("p.key");
    std::fs::write(&file, "\n").unwrap();
    let airlock = serve_with_file_credential(&mock, &file).await;
    let token = session(&airlock, &["p"]).await;
    assert_eq!(call(&airlock, "/p/x", &token).await.0, 503);
    drop(airlock);
    std::fs::write(&file, "  file-key-with-padding \n").unwrap();
    let airlock = serve_with_file_credential(&mock, &file).await;
    let token = session(&airlock, &["p"]).await;
    assert_eq!(call(&airlock, "/p/x", &token).await.0, 200);
    assert_eq!(
        mock.requests()[0].header("authorization").as_deref(),
        Some("Bearer file-key-with-padding")
    );
}

#[tokio::test]
async fn file_credentials_rotate_without_restart() {
    let mock = MockProvider::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("p.key");
    std::fs::write(&file, "file-key-version-one\n").unwrap();
    let airlock = serve_with_file_credential(&mock, &file).await;
    let token = session(&airlock, &["p"]).await;
    assert_eq!(call(&airlock, "/p/x", &token).await.0, 200);
    assert_eq!(
        mock.requests()[0].header("authorization").as_deref(),
        Some("Bearer file-key-version-one")
    );
    write_atomically(&file, "file-key-version-two\n");
    wait_for_credential(&airlock, &mock, &token, "file-key-version-two").await;
    std::fs::write(&file, "file-key-version-three").unwrap();
    wait_for_credential(&airlock, &mock, &token, "file-key-version-three").await;

    // An answer echoing the key just rotated out is masked too (it usually
    // stays valid at the provider a while); the one before is not guarded.
    let reply = request(
        "POST",
        &format!("{}/p/echo", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::from("old: file-key-version-two, older: file-key-version-one"),
    )
    .await;
    let text = reply.text();
    assert!(!text.contains("file-key-version-two"), "{text}");
    assert!(!text.contains("file-key-version-three"), "{text}");
    assert!(text.contains("file-key-version-one"), "{text}");

    // A file that cannot be used keeps the last key; each new reason is
    // logged once, not on every re-check.
    let warnings = || {
        airlock
            .output()
            .matches("keeping the last credential")
            .count()
    };
    std::fs::remove_file(&file).unwrap();
    airlock.wait_for_output("No such file", 0).await;
    write_atomically(&file, "short");
    airlock
        .wait_for_output("to be guarded against echoes", 0)
        .await;
    assert_eq!(warnings(), 2, "{}", airlock.output());
    assert_eq!(call(&airlock, "/p/x", &token).await.0, 200);
    assert_eq!(
        mock.requests()
            .last()
            .unwrap()
            .header("authorization")
            .as_deref(),
        Some("Bearer file-key-version-three")
    );
    write_atomically(&file, "file-key-version-four");
    airlock
        .wait_for_output("credential file is readable again", 0)
        .await;
    wait_for_credential(&airlock, &mock, &token, "file-key-version-four").await;
    assert_eq!(warnings(), 2, "{}", airlock.output());
}

/// `airlock status` against `airlock` with `admin_token`: its exit code,
/// and what it printed (stdout, then stderr).
fn status_cli(airlock: &Airlock, admin_token: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("status")
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", admin_token)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), printed)
}

fn credential_cli(airlock: &Airlock, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "--config",
            airlock.config_path().to_str().unwrap(),
            "credential",
        ])
        .args(args)
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn files_under(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn store_credentials_are_set_from_stdin_sealed_and_never_shown() {
    let mock = MockProvider::start().await;
    let config = [
        toml_provider("p", &mock.url(), "bearer", "store", ""),
        toml_provider("e", &mock.url(), "bearer", "env:E_KEY", ""),
    ]
    .concat();
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .config(&config)
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("E_KEY", "env-real-key-00000001")
        .env("RUST_LOG", "trace")
        .start()
        .await
        .unwrap();
    let token = session(&airlock, &["p"]).await;
    let (status, headers, body) = call(&airlock, "/p/x", &token).await;
    assert_eq!(status, 503, "no credential yet: {body}");
    assert!(body.contains("credential_unavailable"), "{body}");
    // Only an operator can fix it: the SDKs are told not to retry.
    assert_eq!(headers["x-should-retry"], "false");
    assert!(mock.requests().is_empty(), "the provider saw the call");
    let (_, shown) = airlock
        .admin("GET", "/v1/providers/p/credential", None)
        .await
        .unwrap();
    assert_eq!(
        (shown["set"].as_bool(), shown["source"].as_str()),
        (Some(false), Some("store"))
    );
    // `airlock status` says which credential is missing and how to set it
    // (the server is ready: other providers' calls go through).
    let (code, shown) = status_cli(&airlock, ADMIN_TOKEN);
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("\n  e  env:E_KEY, available\n  p  store, not set: calls get 503 (airlock credential set p)\n"),
        "{shown}"
    );

    let first = "store-secret-version-one-000";
    let out = credential_cli(&airlock, &["set", "p"], &format!("{first}\n"));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("credential for p stored sealed"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(first));
    wait_for_credential(&airlock, &mock, &token, first).await;
    let (_, shown) = status_cli(&airlock, ADMIN_TOKEN);
    assert!(shown.contains("\n  p  store, available\n"), "{shown}");
    assert!(!shown.contains(first), "{shown}");
    let (code, shown) = status_cli(&airlock, "adm_not_the_token_0123456789");
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("refused the admin token"), "{shown}");

    let second = "store-secret-version-two-000";
    let (status, shown) = airlock
        .admin(
            "PUT",
            "/v1/providers/p/credential",
            Some(json!({"value": second})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["set"], true);
    assert!(shown["updated_at"].is_string());
    assert!(!shown.to_string().contains(second));
    wait_for_credential(&airlock, &mock, &token, second).await;
    // An answer echoing the key just rotated out through the admin API is
    // masked too, as for rotations the other replicas hear of (round 35:
    // the replica that took the new key stopped guarding the old one).
    let reply = request(
        "POST",
        &format!("{}/p/echo", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::from(format!("old: {first}, new: {second}")),
    )
    .await;
    let text = reply.text();
    assert!(!text.contains(first) && !text.contains(second), "{text}");

    // Refusals: an env provider, an unknown one, a value too short, junk.
    let put = |name: &'static str, body: Value| {
        let airlock = &airlock;
        async move {
            airlock
                .admin(
                    "PUT",
                    &format!("/v1/providers/{name}/credential"),
                    Some(body),
                )
                .await
                .unwrap()
        }
    };
    let (status, body) = put("e", json!({"value": "whatever-long-enough"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        put("nobody", json!({"value": "whatever-long-enough"}))
            .await
            .0,
        404
    );
    let (status, body) = put("p", json!({"value": "short"})).await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("short\""), "{body}");
    assert_eq!(put("p", json!({"value": 5})).await.0, 400);
    assert_eq!(put("p", json!({"value": "x", "extra": 1})).await.0, 400);
    let empty = credential_cli(&airlock, &["set", "p"], "");
    assert!(!empty.status.success());
    // Removal: the next call gets 503 and the provider sees nothing; a
    // second removal removes nothing and is no error; an env provider's and
    // an unknown one's are refused.
    let removed = credential_cli(&airlock, &["remove", "p"], "");
    assert!(removed.status.success(), "{removed:?}");
    assert_eq!(
        String::from_utf8_lossy(&removed.stdout),
        "credential for p removed: its calls get 503 credential_unavailable until one is set \
         (airlock credential set p)\n"
    );
    mock.clear();
    let (status, _, body) = call(&airlock, "/p/x", &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(mock.requests().is_empty(), "the provider saw a call");
    let (status, body) = airlock
        .admin("DELETE", "/v1/providers/p/credential", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["removed"], &body["set"]),
        (&json!(false), &json!(false))
    );
    let again = credential_cli(&airlock, &["rm", "p"], "");
    assert!(again.status.success(), "{again:?}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "provider p had no stored credential: nothing removed\n"
    );
    let elsewhere = credential_cli(&airlock, &["remove", "e"], "");
    assert_eq!(elsewhere.status.code(), Some(1), "{elsewhere:?}");
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains(
            "takes its credential from env:E_KEY, not the store: to take it out of use, unset \
             the variable and restart airlock"
        ),
        "{elsewhere:?}"
    );
    let unknown = credential_cli(&airlock, &["remove", "nope"], "");
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    // The successor of a removed key guards it too: a removed (leaked) key
    // is likely still valid at the provider.
    let third = "store-secret-version-three-0";
    let (status, body) = put("p", json!({ "value": third })).await;
    assert_eq!(status, 200, "{body}");
    let reply = request(
        "POST",
        &format!("{}/p/echo", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        Bytes::from(format!("removed: {second}, new: {third}")),
    )
    .await;
    let text = reply.text();
    assert_eq!(reply.status, 200, "{text}");
    assert!(!text.contains(second) && !text.contains(third), "{text}");
    // Blank or padded (round 43: twelve spaces were stored, and the leak
    // guard masked every indentation of that width), through the API and
    // the CLI alike; the key in force stays.
    for value in [
        "            ",
        "  padded-key-000000001",
        "padded-key-000000001 \t",
    ] {
        let (status, body) = put("p", json!({ "value": value })).await;
        assert_eq!(status, 400, "{value:?}: {body}");
        assert!(body.to_string().contains("white space"), "{body}");
        let out = credential_cli(&airlock, &["set", "p"], &format!("{value}\n"));
        assert!(!out.status.success(), "{value:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("white space"), "{value:?}: {err}");
    }
    wait_for_credential(&airlock, &mock, &token, third).await;
    // A provider whose credential comes from elsewhere is refused before a
    // secret is asked for; one the server does not have is a usage error
    // naming PROVIDER and the configured ones.
    let elsewhere = credential_cli(&airlock, &["set", "e"], "never-read-00000001\n");
    assert_eq!(elsewhere.status.code(), Some(1), "{elsewhere:?}");
    let err = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        err.starts_with("airlock: provider e takes its credential from env:E_KEY;"),
        "{err}"
    );
    let unknown = credential_cli(&airlock, &["set", "nope"], "never-read-00000001\n");
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "airlock: PROVIDER: no provider \"nope\" is configured on the server (configured: e, p)\n"
    );

    // Nothing airlock wrote holds a secret: store, logs, metrics.
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let store = files_under(airlock.dir());
    let logs = airlock.output();
    for secret in [
        first,
        second,
        third,
        token.as_str(),
        "env-real-key-00000001",
    ] {
        assert!(!holds(&store, secret), "store files hold {secret}");
        assert!(!logs.contains(secret), "logs hold {secret}");
        assert!(
            !metrics.to_string().contains(secret),
            "metrics hold {secret}"
        );
    }
    // The master key file is 0600 and the sealed value survives a restart.
    let key_file = airlock.dir().join("airlock.db.master-key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn responses_stream_through_the_leak_guard_unbuffered() {
    let (mock, airlock, token) = openai_with_session().await;
    // The gated stream's first event must arrive while the provider still
    // holds the stream open: the guard holds nothing back from it.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let req = http::Request::get(format!("{}/openai/gated-sse", airlock.proxy_url()))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event held back")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: first\n\n")
    );
    mock.open_gate();
}

/// The store remembers the master key the first server started with: a
/// restart (or a replica) with another key is refused, even before any
/// credential is sealed (one it set would be unreadable to the others),
/// and the right key starts again.
#[tokio::test]
async fn serve_refuses_a_master_key_other_than_the_stores() {
    let mock = MockProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let start = |key: String| {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&toml_provider("p", &mock.url(), "bearer", "store", ""))
            .env("AIRLOCK_MASTER_KEY", &key)
            .dir(dir.path().to_path_buf())
            .start()
    };
    let mut first = start("ab".repeat(32)).await.unwrap();
    first.terminate().await.unwrap();
    let refused = start("cd".repeat(32)).await.unwrap_err().to_string();
    assert!(
        refused.contains(
            "the master key (AIRLOCK_MASTER_KEY or master_key_file) is not the one this \
             store's credentials are sealed with"
        ),
        "{refused}"
    );
    let mut again = start("ab".repeat(32)).await.unwrap();
    again.terminate().await.unwrap();
}

/// A stored credential airlock now refuses (padded: stored by a version
/// that took it) leaves its provider without a credential, said in the
/// log, rather than stopping `serve`, which would leave no way to replace
/// it; a new value set through the running server applies.
#[tokio::test]
async fn a_stored_credential_airlock_now_refuses_leaves_its_provider_unavailable() {
    let mock = MockProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let master = "ab".repeat(32);
    let start = || {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&toml_provider("p", &mock.url(), "bearer", "store", ""))
            .env("AIRLOCK_MASTER_KEY", &master)
            .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
            .dir(dir.path().to_path_buf())
            .start()
    };
    let mut first = start().await.unwrap();
    first.terminate().await.unwrap();
    let key = airlock_core::seal::MasterKey::from_encoded(&master).unwrap();
    let sealed = airlock_core::seal::seal(
        &key,
        &airlock_core::seal::credential_aad("p"),
        b"  padded-real-key-0000000001",
    )
    .unwrap();
    let mut db = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        dir.path().join("airlock.db").display()
    ))
    .await
    .unwrap();
    sqlx::query("INSERT INTO credentials (provider, sealed, updated_at) VALUES ('p', ?, 1)")
        .bind(sealed)
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();

    let airlock = start().await.unwrap();
    airlock
        .wait_for_output(
            "the stored credential of p is refused (the credential begins or ends with white space",
            0,
        )
        .await;
    let token = session(&airlock, &["p"]).await;
    let (status, _, body) = call(&airlock, "/p/x", &token).await;
    assert_eq!(status, 503, "{body}");
    assert!(mock.requests().is_empty());
    let (status, body) = airlock
        .admin(
            "PUT",
            "/v1/providers/p/credential",
            Some(json!({"value": "good-real-key-0000000001"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for_credential(&airlock, &mock, &token, "good-real-key-0000000001").await;
}

/// A key file lost while its store stays: the next start makes a new key,
/// which the store refuses, and the file it made is removed again (left
/// behind, it would pass for the store's key).
#[tokio::test]
async fn a_start_refused_for_a_new_key_leaves_no_key_file_behind() {
    let mock = MockProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&toml_provider("p", &mock.url(), "bearer", "store", ""))
            .dir(dir.path().to_path_buf())
            .start()
    };
    let mut first = start().await.unwrap();
    first.terminate().await.unwrap();
    for name in ["airlock.db.master-key", "airlock.db.audit-key"] {
        let file = dir.path().join(name);
        let saved = dir.path().join(format!("{name}.saved"));
        std::fs::rename(&file, &saved).unwrap();
        let refused = start().await.unwrap_err().to_string();
        assert!(refused.contains("is not the one this store"), "{refused}");
        // The refusal says why: the file was missing, and what to do.
        let variable = if name.contains("master") {
            "AIRLOCK_MASTER_KEY"
        } else {
            "AIRLOCK_AUDIT_KEY"
        };
        assert!(
            refused.contains(&format!(
                "{}{}{name} did not exist, so this start made a new key (removed again): put \
                 back the key file this store was written with, or set {variable} to that key",
                dir.path().canonicalize().unwrap().display(),
                std::path::MAIN_SEPARATOR
            )),
            "{refused}"
        );
        assert!(
            !file.exists(),
            "{name}: the file the refused start created was left behind"
        );
        std::fs::rename(&saved, &file).unwrap();
    }
    let mut again = start().await.unwrap();
    again.terminate().await.unwrap();
}

/// A call refused for want of a credential (the operator's to fix) spends
/// nothing of the session's limits and counts as neither allowed nor
/// denied: round 40 saw two such 503s use up a `max_requests` of 2, and the
/// session say `2 allowed` where the audit trail said `credential_unavailable`.
#[tokio::test]
async fn a_call_without_a_credential_spends_none_of_the_session_limits() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .config(&toml_provider("p", &mock.url(), "bearer", "store", ""))
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .start()
        .await
        .unwrap();
    let created = airlock
        .create_session(json!({
            "scope": [{"provider": "p", "methods": ["GET"], "paths": ["/**"]}],
            "ttl_seconds": 600,
            "limits": {"max_requests": 1, "max_denied": 2},
        }))
        .await
        .unwrap();
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    for _ in 0..3 {
        let (status, _, body) = call(&airlock, "/p/x", token).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("credential_unavailable"), "{body}");
    }
    let (_, shown) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(shown["state"], "active", "{shown}");
    assert_eq!(shown["calls"]["allowed"], 0, "{shown}");
    assert_eq!(shown["calls"]["denied"], 0, "{shown}");
    // A flood of them runs into the session's rate (a bucket of its own),
    // whose refusals count.
    let limited = airlock
        .create_session(json!({
            "scope": [{"provider": "p", "methods": ["GET"], "paths": ["/**"]}],
            "ttl_seconds": 600,
            "limits": {"requests_per_minute": 2},
        }))
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, _, _) = call(&airlock, "/p/x", limited["token"].as_str().unwrap()).await;
        statuses.push(status);
    }
    assert_eq!(statuses[0], 503, "{statuses:?}");
    assert_eq!(statuses[4], 429, "{statuses:?}");

    let (status, body) = airlock
        .admin(
            "PUT",
            "/v1/providers/p/credential",
            Some(json!({"value": "store-secret-for-the-quota-00"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // The session's one call is still there to make.
    let (status, _, body) = call(&airlock, "/p/x", token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.request_count(), 1);
    let (status, _, body) = call(&airlock, "/p/x", token).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(mock.request_count(), 1);
}
