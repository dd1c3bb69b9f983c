#![allow(clippy::unwrap_used, clippy::expect_used)]
//! airlock driven by the official `openai` and `anthropic` Python SDKs.
//!
//! The SDKs live in a venv made by `scripts/python-sdk-setup.sh`
//! (`$AIRLOCK_SDK_VENV`, default `<repo>/.venv`). Without it the test is
//! skipped, except under `CI=true`, where it fails.
//!
//! Each case is one run of `tests/sdk/sdk_client.py` with the session's
//! environment (`OPENAI_API_KEY`, `OPENAI_BASE_URL`, `ANTHROPIC_API_KEY`,
//! `ANTHROPIC_BASE_URL`) and `SDK_CASE`; it prints one JSON line and exits 0
//! when the SDK saw what the case expects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use airlock_testkit::{Airlock, AirlockBuilder, MockProvider, RecordedRequest};
use serde_json::{json, Value};

const OPENAI_CRED: &str = "sk-real-openai-xyz";
const ANTHROPIC_CRED: &str = "sk-ant-real-abc";
/// Bound on one SDK run.
const CASE_LIMIT: Duration = Duration::from_secs(60);
/// Airlock output shown in a failure message (its tail).
const OUTPUT_TAIL: usize = 6000;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn sdk_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/sdk_client.py")
}

/// The venv's python if it can import both SDKs; otherwise why not.
fn venv_python() -> Result<PathBuf, String> {
    let venv = std::env::var_os("AIRLOCK_SDK_VENV")
        .filter(|v| !v.is_empty())
        .map_or_else(|| repo_root().join(".venv"), PathBuf::from);
    let python = venv.join("bin").join("python");
    if !python.exists() {
        return Err(format!("{} does not exist", python.display()));
    }
    let output = std::process::Command::new(&python)
        .args(["-c", "import openai, anthropic, websockets"])
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("running {}: {err}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} cannot import openai and anthropic: {}",
            python.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(python)
}

/// Outcome of one SDK run.
struct CaseRun {
    case: &'static str,
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
    /// The JSON line the script printed, if it printed one.
    result: Option<Value>,
}

impl CaseRun {
    fn describe(&self) -> String {
        format!(
            "case {case}: exit {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            case = self.case,
            status = self.status,
            stdout = self.stdout.trim_end(),
            stderr = self.stderr.trim_end(),
        )
    }
}

struct Harness {
    python: PathBuf,
    mock: MockProvider,
    airlock: Airlock,
    env: BTreeMap<String, String>,
    /// The session's id: the case that plays the operator revokes it.
    session: String,
    /// A second session (anthropic only): (id, token), for the Anthropic
    /// case that revokes its own session mid-stream.
    second: (String, String),
    /// A third session's token (openai only), for the case that stops
    /// airlock mid-stream.
    third: String,
}

impl Harness {
    fn airlock_tail(&self) -> String {
        let output = self.airlock.output();
        let start = output
            .char_indices()
            .rev()
            .nth(OUTPUT_TAIL)
            .map_or(0, |(i, _)| i);
        output[start..].to_owned()
    }

    /// Runs `SDK_CASE=case sdk_client.py` with the session's environment.
    async fn run(&self, case: &'static str) -> CaseRun {
        let mut command = tokio::process::Command::new(&self.python);
        command
            .arg(sdk_script())
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Nothing from the parent may stand in for the session's values:
        // no real keys, base URLs, org/project ids, profiles, custom headers,
        // and no HTTP proxy between the SDK and airlock.
        for (key, _) in std::env::vars_os() {
            let upper = key.to_string_lossy().to_ascii_uppercase();
            if upper.starts_with("OPENAI_")
                || upper.starts_with("ANTHROPIC_")
                || matches!(upper.as_str(), "HTTP_PROXY" | "HTTPS_PROXY" | "ALL_PROXY")
            {
                command.env_remove(&key);
            }
        }
        command.envs(&self.env);
        // Only the cases that play the operator get the admin token.
        let revoked = match case {
            "openai_stream_revoked" => Some(self.session.as_str()),
            "anthropic_stream_revoked" => {
                command.env("ANTHROPIC_API_KEY", &self.second.1);
                Some(self.second.0.as_str())
            }
            "openai_stream_drained" => {
                command
                    .env("OPENAI_API_KEY", &self.third)
                    .env("SDK_AIRLOCK_PID", self.airlock.pid().to_string());
                None
            }
            _ => None,
        };
        if let Some(id) = revoked {
            command
                .env(
                    "SDK_REVOKE_URL",
                    format!("{}/v1/sessions/{id}", self.airlock.admin_url()),
                )
                .env("SDK_REVOKE_TOKEN", self.airlock.admin_token());
        }
        command
            .env("SDK_CASE", case)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("NO_PROXY", "127.0.0.1,localhost");
        let output = tokio::time::timeout(CASE_LIMIT, command.output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "case {case}: no exit within {CASE_LIMIT:?}\n--- airlock output ---\n{}",
                    self.airlock_tail()
                )
            })
            .unwrap_or_else(|err| panic!("case {case}: running {}: {err}", self.python.display()));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let result = stdout
            .lines()
            .rev()
            .find(|line| line.trim_start().starts_with('{'))
            .and_then(|line| serde_json::from_str(line).ok());
        CaseRun {
            case,
            success: output.status.success(),
            status: output.status.to_string(),
            stdout,
            stderr,
            result,
        }
    }

    /// Runs `case`, which must succeed; returns its JSON result.
    async fn expect_ok(&self, case: &'static str) -> Value {
        let run = self.run(case).await;
        let ok = run.result.as_ref().and_then(|r| r.get("ok")) == Some(&Value::Bool(true));
        if !run.success || !ok {
            panic!(
                "{}\n--- mock recorded {} requests: {:#?}\n--- airlock output (tail) ---\n{}",
                run.describe(),
                self.mock.request_count(),
                summarize(&self.mock.requests()),
                self.airlock_tail()
            );
        }
        eprintln!("python_sdks: {case}: {}", run.stdout.trim_end());
        run.result.unwrap_or(Value::Null)
    }

    /// Runs cases that airlock must refuse, at once: each must succeed (the
    /// SDK raised the expected error) and the mock must not have been reached
    /// by any of them.
    async fn expect_refused<const N: usize>(&self, cases: [&'static str; N]) -> [Value; N] {
        let before = self.mock.request_count();
        let results = futures_util::future::join_all(cases.map(|case| self.expect_ok(case))).await;
        let after = self.mock.request_count();
        assert_eq!(
            after,
            before,
            "cases {cases:?}: airlock forwarded a refused call to the provider; new requests: {:#?}",
            summarize(&self.mock.requests()[before..])
        );
        <[Value; N]>::try_from(results).expect("one result per case")
    }
}

/// Method, target and auth-relevant headers of recorded requests, for
/// failure messages (the session token, if leaked, shows up here too).
fn summarize(requests: &[RecordedRequest]) -> Vec<String> {
    requests
        .iter()
        .map(|req| {
            format!(
                "{} {} authorization={:?} x-api-key={:?}",
                req.method,
                req.path_and_query,
                req.header_values("authorization"),
                req.header_values("x-api-key"),
            )
        })
        .collect()
}

fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

#[tokio::test]
async fn official_python_sdks_through_airlock() {
    let python = match venv_python() {
        Ok(python) => python,
        Err(why) => {
            let hint = "run scripts/python-sdk-setup.sh to create the venv with the openai \
                        and anthropic SDKs (or point AIRLOCK_SDK_VENV at one)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("python SDK venv unusable: {why}; {hint}");
            }
            eprintln!("python_sdks: SKIPPED: {why}; {hint}");
            return;
        }
    };

    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_CRED, "/v1")
        .provider(
            "anthropic",
            &mock.url(),
            "header:x-api-key",
            ANTHROPIC_CRED,
            "",
        )
        // Short, for the case that stops airlock mid-stream.
        .proxy_option(r#"drain_timeout = "1s""#)
        .start()
        .await
        .expect("start airlock");

    let session = airlock
        .create_session(json!({
            "scope": [
                {"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]},
                {"provider": "openai", "methods": ["WEBSOCKET"], "paths": ["/v1/realtime"]},
                {"provider": "anthropic", "methods": ["POST"], "paths": ["/v1/messages"]},
            ],
            "ttl_seconds": 300,
            "labels": {"test": "python_sdks"},
        }))
        .await
        .expect("create session");
    let id = str_field(&session, "id").to_owned();
    let token = str_field(&session, "token").to_owned();
    assert!(!id.is_empty(), "session without id: {session}");
    assert!(token.starts_with("sess_"), "session token {token:?}");
    let env: BTreeMap<String, String> = session
        .get("env")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("session without env: {session}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let proxy = airlock.proxy_url();
    for (key, want) in [
        ("OPENAI_API_KEY", token.clone()),
        ("OPENAI_BASE_URL", format!("{proxy}/openai/v1")),
        ("ANTHROPIC_API_KEY", token.clone()),
        ("ANTHROPIC_BASE_URL", format!("{proxy}/anthropic")),
    ] {
        assert_eq!(
            env.get(key).map(|v| v.trim_end_matches('/')),
            Some(want.as_str()),
            "session env {key}; env: {env:?}"
        );
    }

    let second = airlock
        .create_session(json!({
            "scope": [{"provider": "anthropic", "methods": ["POST"], "paths": ["/v1/messages"]}],
            "ttl_seconds": 300,
        }))
        .await
        .expect("create the second session");
    let second = (
        str_field(&second, "id").to_owned(),
        str_field(&second, "token").to_owned(),
    );
    let third = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}],
            "ttl_seconds": 300,
        }))
        .await
        .expect("create the third session");
    let third = str_field(&third, "token").to_owned();
    let h = Harness {
        python,
        mock,
        airlock,
        env,
        session: id.clone(),
        second,
        third,
    };

    // --- calls inside the scope reach the provider -------------------------
    // Independent of each other, so they run at once (each SDK run spends
    // most of its time importing the SDK).
    let allowed = [
        "openai_chat",
        "openai_stream",
        "openai_realtime",
        "anthropic_message",
        "anthropic_message_bearer",
        "anthropic_message_x_api_key",
        "anthropic_stream",
    ];
    let results = futures_util::future::join_all(allowed.map(|case| h.expect_ok(case))).await;
    let [chat, stream, realtime, message, bearer, x_api_key, astream] =
        <[Value; 7]>::try_from(results).expect("seven results");

    assert_eq!(str_field(&chat, "text"), "Hello from mock");
    assert_eq!(str_field(&chat, "sent_auth"), "authorization", "{chat}");
    assert_eq!(str_field(&stream, "text"), "Hello from mock");
    // The mock sends a role chunk, three content chunks and a finish chunk.
    assert_eq!(stream.get("chunks"), Some(&json!(5)), "{stream}");
    // `api_key=` is sent as x-api-key before SDK 2.x, as a Bearer token since.
    assert_eq!(str_field(&message, "text"), "Hello from mock");
    assert!(
        matches!(
            str_field(&message, "sent_auth"),
            "authorization" | "x-api-key"
        ),
        "{message}"
    );
    assert_eq!(str_field(&bearer, "sent_auth"), "authorization", "{bearer}");
    assert_eq!(
        str_field(&x_api_key, "sent_auth"),
        "x-api-key",
        "{x_api_key}"
    );
    // The Realtime API's WebSocket: the SDK's event came back, and the
    // mock's quote of the credential it got reached the agent masked.
    assert_eq!(str_field(&realtime, "first"), "session.created");
    let echoed: Value = serde_json::from_str(str_field(&realtime, "echoed")).unwrap();
    assert_eq!(echoed, json!({"type": "response.create"}), "{realtime}");
    let quoted = str_field(&realtime, "provider_saw");
    assert_eq!(
        quoted.len(),
        format!("Bearer {OPENAI_CRED}").len(),
        "{realtime}"
    );
    assert!(
        quoted.contains("REDACTED") && !quoted.contains(OPENAI_CRED),
        "{realtime}"
    );
    assert_eq!(str_field(&astream, "text"), "Hello from mock");
    // The mock streams the answer as three text deltas.
    assert_eq!(astream.get("deltas"), Some(&json!(3)), "{astream}");

    // --- what the provider saw ---------------------------------------------
    let requests = h.mock.requests();
    let recorded = summarize(&requests);
    let mut openai_calls = 0;
    let mut anthropic_calls = 0;
    let mut realtime_handshakes = 0;
    for req in &requests {
        assert!(
            !req.contains(&token),
            "the session token reached the provider: {} {}; all: {recorded:#?}",
            req.method,
            req.path_and_query
        );
        if req.path() == "/v1/realtime" {
            realtime_handshakes += 1;
            assert_eq!(req.method, "GET", "all: {recorded:#?}");
            assert_eq!(req.query(), Some("model=gpt-mock"), "all: {recorded:#?}");
            assert_eq!(
                req.header_values("authorization"),
                vec![format!("Bearer {OPENAI_CRED}")],
                "openai credential not in the handshake's Authorization; all: {recorded:#?}"
            );
            assert_eq!(req.header("upgrade").as_deref(), Some("websocket"));
            assert!(
                req.header("sec-websocket-extensions").is_none(),
                "compression offered to the provider; all: {recorded:#?}"
            );
            continue;
        }
        assert_eq!(req.method, "POST", "unexpected request; all: {recorded:#?}");
        match req.path() {
            "/v1/chat/completions" => {
                openai_calls += 1;
                assert_eq!(
                    req.header_values("authorization"),
                    vec![format!("Bearer {OPENAI_CRED}")],
                    "openai credential not in Authorization; all: {recorded:#?}"
                );
                assert!(
                    req.header_values("x-api-key").is_empty(),
                    "openai request carries x-api-key; all: {recorded:#?}"
                );
                assert!(
                    !req.contains(ANTHROPIC_CRED),
                    "the anthropic credential reached the openai route; all: {recorded:#?}"
                );
            }
            "/v1/messages" => {
                anthropic_calls += 1;
                assert_eq!(
                    req.header_values("x-api-key"),
                    vec![ANTHROPIC_CRED.to_owned()],
                    "anthropic credential not in x-api-key; all: {recorded:#?}"
                );
                assert!(
                    req.header_values("authorization").is_empty(),
                    "anthropic request still carries Authorization (the session token's \
                     header must be removed); all: {recorded:#?}"
                );
                assert!(
                    !req.contains(OPENAI_CRED),
                    "the openai credential reached the anthropic route; all: {recorded:#?}"
                );
                assert!(
                    req.header("anthropic-version").is_some(),
                    "anthropic-version header lost; all: {recorded:#?}"
                );
            }
            other => panic!("unexpected provider path {other}; all: {recorded:#?}"),
        }
        assert!(
            req.query().is_none(),
            "unexpected query string; all: {recorded:#?}"
        );
    }
    assert_eq!(realtime_handshakes, 1, "all: {recorded:#?}");
    assert_eq!(
        (openai_calls, anthropic_calls),
        (2, 4),
        "(openai, anthropic) calls at the provider; all: {recorded:#?}"
    );

    // --- calls outside the scope never reach it ----------------------------
    for denied in h
        .expect_refused(["openai_out_of_scope", "anthropic_out_of_scope"])
        .await
    {
        assert_eq!(denied.get("status"), Some(&json!(403)), "{denied}");
        assert_eq!(str_field(&denied, "code"), "out_of_scope", "{denied}");
    }

    // --- a session revoked mid-stream: the SDK raises airlock's error ------
    // The case opens a stream the provider holds open, revokes the session
    // through the admin API after the first chunk, and reads on.
    let cut = h.expect_ok("openai_stream_revoked").await;
    assert_openai_cut(
        &cut,
        "the session was revoked or expired during the stream",
        "invalid_token",
    );
    // The Anthropic SDK raises on the `error` event too (its own session).
    let cut = h.expect_ok("anthropic_stream_revoked").await;
    assert!(
        str_field(&cut, "message").contains("the session was revoked or expired during the stream"),
        "{cut}"
    );
    assert_eq!(str_field(&cut, "code"), "invalid_token", "{cut}");

    // --- a revoked session is refused --------------------------------------
    let (_, view) = h
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .expect("show session");
    assert_eq!(view["state"], "revoked", "{view}");
    for revoked in h
        .expect_refused(["openai_revoked", "anthropic_revoked"])
        .await
    {
        assert_eq!(revoked.get("status"), Some(&json!(401)), "{revoked}");
        assert_eq!(str_field(&revoked, "code"), "invalid_token", "{revoked}");
    }

    // The seven allowed calls and the two streams cut short.
    assert_eq!(
        h.mock.request_count(),
        9,
        "provider requests after all cases: {:#?}",
        summarize(&h.mock.requests())
    );

    // --- a stream still running when shutdown's drain ends (last: the case
    // stops airlock): the SDK raises airlock's error ------------------------
    let cut = h.expect_ok("openai_stream_drained").await;
    assert_openai_cut(
        &cut,
        "airlock is shutting down and cut the stream",
        "shutting_down",
    );
}

/// The OpenAI SDK raised its `APIError` with airlock's closing event:
/// `message` and `code`.
fn assert_openai_cut(cut: &Value, message: &str, code: &str) {
    assert_eq!(str_field(cut, "error_class"), "APIError", "{cut}");
    assert_eq!(str_field(cut, "message"), message, "{cut}");
    assert_eq!(str_field(cut, "code"), code, "{cut}");
}
