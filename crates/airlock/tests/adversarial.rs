//! Adversarial end-to-end suite: a prompt-injected agent tries everything.
//!
//! Every case sends raw bytes over a socket (a client library would tidy
//! the request up) to the real `airlock` binary in front of a recording
//! mock provider, with a valid session token, and asserts: the status (a
//! JSON error from airlock — for heads hyper cannot parse, put in hyper's
//! own 400/431 answer — or a closed connection),
//! that the provider received nothing, and that airlock still answers
//! afterwards. Cases run table-driven, one airlock and one mock per group;
//! each group ends with a normal call that must still work.
//!
//! Run with `--nocapture` to see the table of cases and outcomes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_testkit::client::request;
use airlock_testkit::h2raw;
use airlock_testkit::hostile::{self, exchange, Exchange, Script, ScriptedUpstream};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OPENAI_KEY: &str = "sk-real-openai-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-real-abcdef0123";
const GOOGLE_KEY: &str = "AIza-real-google-0123";
/// How long one case may take to be answered.
const CASE_LIMIT: Duration = Duration::from_secs(10);
/// Slack on top of a configured timeout before a test calls it broken.
const SLACK: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

struct Env {
    mock: MockProvider,
    airlock: Airlock,
    token: String,
}

/// airlock in front of a recording mock, with `allowed_hosts` set, and a
/// session that may call a few narrow paths on three providers.
async fn env(proxy_options: &[&str]) -> Env {
    env_with(proxy_options, |builder| builder).await
}

/// [`env`], with `tweak` applied to the builder before airlock starts.
async fn env_with(
    proxy_options: &[&str],
    tweak: impl FnOnce(AirlockBuilder) -> AirlockBuilder,
) -> Env {
    let mock = MockProvider::start().await;
    let mut builder = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "anthropic",
            &mock.url(),
            "header:x-api-key",
            ANTHROPIC_KEY,
            "",
        )
        .provider("google", &mock.url(), "query:key", GOOGLE_KEY, "")
        .proxy_option(r#"allowed_hosts = ["127.0.0.1", "localhost"]"#);
    for option in proxy_options {
        builder = builder.proxy_option(option);
    }
    let airlock = tweak(builder).start().await.unwrap();
    let session = airlock
        .create_session(json!({
            "scope": [
                {"provider": "openai", "methods": ["GET", "POST"],
                 "paths": ["/v1/models/*", "/v1/chat/completions"]},
                {"provider": "anthropic", "methods": ["POST"], "paths": ["/v1/messages"]},
                {"provider": "google", "methods": ["GET"], "paths": ["/v1beta/models/*"]}
            ],
            "ttl_seconds": 600
        }))
        .await
        .unwrap();
    Env {
        mock,
        airlock,
        token: session["token"].as_str().unwrap().to_owned(),
    }
}

/// What a case must get back.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// airlock's own JSON error: status and `error.code`.
    Json(u16, &'static str),
    /// airlock's JSON error, and the connection closed after it.
    JsonThenClose(u16, &'static str),
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, request: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        request: request.into(),
        expect,
    }
}

const BAD: Expect = Expect::Json(400, "bad_request");
/// Refused as outside the session's scope (a provider airlock does not
/// configure, too).
const OUTSIDE: Expect = Expect::Json(403, "out_of_scope");
const BAD_CLOSE: Expect = Expect::JsonThenClose(400, "bad_request");
/// A head hyper cannot parse: hyper answers by itself and closes; on a
/// fresh connection airlock has put its JSON error in that answer.
const UNPARSEABLE: Expect = Expect::JsonThenClose(400, "bad_request");
/// A head over the size or line limit (see [`UNPARSEABLE`]).
const TOO_LARGE: Expect = Expect::JsonThenClose(431, "headers_too_large");

impl Expect {
    async fn check(self, ex: &mut Exchange) -> Result<(), String> {
        let (status, code, close) = match self {
            Expect::Json(s, c) => (s, c, false),
            Expect::JsonThenClose(s, c) => (s, c, true),
        };
        if ex.status != Some(status) {
            return Err(format!("status {:?}, expected {status}", ex.status));
        }
        if ex.error_code().as_deref() != Some(code) {
            return Err(format!("error code {:?}, expected {code}", ex.error_code()));
        }
        if ex.header("content-type") != Some("application/json") {
            return Err("error body is not application/json".into());
        }
        if close && !ex.closes_within(Duration::from_secs(2)).await {
            return Err("connection left open after an ambiguous request".into());
        }
        Ok(())
    }
}

/// Runs every case on `env`: each must be refused as expected, reach
/// nothing, and leave airlock answering. Then a normal call must work.
async fn run(group: &str, env: &Env, cases: Vec<Case>) {
    let url = env.airlock.proxy_url();
    let mut failures = Vec::new();
    println!("\n{group}: {} cases", cases.len());
    for case in &cases {
        let mut ex = exchange(&url, &case.request, CASE_LIMIT).await;
        let seen = ex.status.map_or_else(
            || {
                if ex.closed {
                    "closed".into()
                } else {
                    "no answer".into()
                }
            },
            |s| match ex.error_code() {
                Some(code) => format!("{s} {code}"),
                None => format!("{s} (bare)"),
            },
        );
        let verdict = case.expect.check(&mut ex).await;
        println!(
            "  {:<58} {:<28} {}",
            case.name,
            seen,
            if verdict.is_ok() { "ok" } else { "FAIL" }
        );
        if let Err(why) = verdict {
            failures.push(format!("{}: {why}\n---\n{}\n---", case.name, ex.raw));
        }
        if env.mock.request_count() != 0 {
            failures.push(format!(
                "{}: the provider received {:#?}",
                case.name,
                env.mock.requests()
            ));
            env.mock.clear();
        }
        assert_alive(env).await;
    }
    assert!(
        failures.is_empty(),
        "{group}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    assert_normal_call_works(env).await;
}

/// airlock answers a request that it refuses by itself (no provider call).
async fn assert_alive(env: &Env) {
    let ex = exchange(
        &env.airlock.proxy_url(),
        b"GET /no-such-provider/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        CASE_LIMIT,
    )
    .await;
    assert_eq!(
        ex.status,
        Some(401),
        "airlock stopped answering: {}",
        ex.raw
    );
}

/// A well-formed call goes through, with the real credential.
async fn assert_normal_call_works(env: &Env) {
    let before = env.mock.request_count();
    let reply = request(
        "POST",
        &format!("{}/openai/v1/chat/completions", env.airlock.proxy_url()),
        &[
            ("authorization", &format!("Bearer {}", env.token)),
            ("content-type", "application/json"),
        ],
        r#"{"model":"gpt-mock","messages":[]}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = env.mock.requests();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(
        seen[before].header("authorization").unwrap(),
        format!("Bearer {OPENAI_KEY}")
    );
}

/// A call refused on its head (out of scope, an unknown token) whose agent
/// writes its whole body before reading the answer, as Node's `fetch` does,
/// reads the refusal: airlock reads and discards the rest of the body
/// before it closes the connection (round 46: the connection was reset
/// under the upload, the SDK saw a connection error and retried, each retry
/// counting toward `max_denied`). The provider sees nothing.
#[tokio::test]
async fn a_refused_upload_s_agent_reads_the_refusal() {
    let env = env(&[]).await;
    let body = vec![b'x'; 16 * 1024 * 1024];
    let unknown = "sess_0123456789abcdefghijABCDEFGHIJ0123456789xyz";
    let cases = [
        (env.token.as_str(), false, "403", "out_of_scope"),
        (unknown, true, "401", "invalid_token"),
    ];
    for (token, chunked, status, code) in cases {
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_owned()
        } else {
            format!("Content-Length: {}", body.len())
        };
        let head = format!(
            "POST /openai/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/octet-stream\r\n{framing}\r\n\r\n"
        );
        let mut stream = TcpStream::connect(hostile::authority(&env.airlock.proxy_url()))
            .await
            .unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        if chunked {
            for chunk in body.chunks(1024 * 1024) {
                let size = format!("{:x}\r\n", chunk.len());
                stream.write_all(size.as_bytes()).await.unwrap();
                stream.write_all(chunk).await.unwrap();
                stream.write_all(b"\r\n").await.unwrap();
            }
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        } else {
            stream
                .write_all(&body)
                .await
                .unwrap_or_else(|e| panic!("{code}: the upload was cut: {e}"));
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{code}: the answer was lost: {e}"));
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{code}: {answer}"
        );
        assert!(answer.contains(&format!("\"code\":\"{code}\"")), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    assert_eq!(env.mock.request_count(), 0, "{:#?}", env.mock.requests());
}

/// The same over HTTP/2: the refusal ends its stream and the rest of the
/// upload is read, not reset (round 46: httpx took the reset after a
/// large upload for a connection error); and over HTTP/1.1 the reading
/// stops at a bound, closing the connection under an endless upload.
#[tokio::test]
async fn a_refused_upload_is_read_within_bounds() {
    let env = env(&[]).await;
    let authority = hostile::authority(&env.airlock.proxy_url()).to_owned();
    let tcp = TcpStream::connect(&authority).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{authority}/openai/v1/files"))
        .header("authorization", format!("Bearer {}", env.token))
        .body(())
        .unwrap();
    let (response, mut upload) = client.send_request(request, false).unwrap();
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..64 {
            upload.reserve_capacity(chunk.len());
            while upload.capacity() < chunk.len() {
                match std::future::poll_fn(|cx| upload.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Err(h2::Error::from(h2::Reason::CANCEL)),
                }
            }
            upload.send_data(chunk.clone(), false)?;
        }
        upload.send_data(bytes::Bytes::new(), true)?;
        Ok(())
    });
    let response = response.await.unwrap();
    assert_eq!(response.status(), 403);
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(data) = body.data().await {
        answer.extend_from_slice(&data.unwrap());
    }
    assert!(String::from_utf8_lossy(&answer).contains("out_of_scope"));
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .unwrap()
        .unwrap()
        .expect("the upload was reset");

    // HTTP/1.1, a length of 1 TiB: read up to the bound, then closed.
    let mut stream = TcpStream::connect(&authority).await.unwrap();
    let head = format!(
        "POST /openai/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1099511627776\r\n\r\n",
        env.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    let mut sent: u64 = 0;
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len() as u64;
        }
    })
    .await;
    assert!(cut.is_ok(), "still reading after {sent} bytes");
    // 64 MiB read, plus what the socket buffers held.
    assert!(sent >= 64 << 20, "{sent}");
    assert!(sent < 128 << 20, "{sent}");
    assert_eq!(env.mock.request_count(), 0);
}

/// With `forwarded_headers = "strip"` (airlock behind a load balancer or
/// gateway), client-address and target-override headers such a gateway
/// adds are removed, not refused: the call goes through and the provider
/// sees none of them (review of round 45: Envoy's `x-envoy-original-path`
/// and Azure's `X-Original-Host` had no way through).
#[tokio::test]
async fn a_gateway_s_headers_are_stripped_when_so_configured() {
    let env = env(&[r#"forwarded_headers = "strip""#]).await;
    let added = [
        ("x-forwarded-for", "10.0.0.1"),
        ("cf-connecting-ip", "10.0.0.1"),
        ("x-envoy-external-address", "10.0.0.1"),
        ("x-envoy-original-path", "/gw/openai/v1/models/x"),
        ("x-original-host", "airlock.example"),
        ("x-original-url", "/admin"),
    ];
    let mut headers = vec![("authorization".to_owned(), format!("Bearer {}", env.token))];
    headers.extend(
        added
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let reply = request(
        "GET",
        &format!("{}/openai/v1/models/x", env.airlock.proxy_url()),
        &headers,
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = env.mock.requests();
    assert_eq!(seen.len(), 1);
    for (name, _) in added {
        assert!(
            seen[0].header(name).is_none(),
            "{name} reached the provider"
        );
    }
    assert_eq!(
        seen[0].header("authorization").unwrap(),
        format!("Bearer {OPENAI_KEY}")
    );
}

/// `METHOD TARGET HTTP/1.1` with Host and the token, plus `extra` header
/// lines (each ending in CRLF), and no body.
fn req(method: &str, target: &str, token: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn get(target: &str, token: &str) -> Vec<u8> {
    req("GET", target, token, "")
}

/// A POST to the granted chat path with exactly `head_rest` after the
/// token line (header lines, the blank line and any body).
fn post_raw(token: &str, head_rest: &str) -> Vec<u8> {
    format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{head_rest}"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Path tricks on the scope check
// ---------------------------------------------------------------------------

#[tokio::test]
async fn path_tricks_are_refused() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let mut non_utf8 = get("/openai/v1/models/caf", t);
    let at = non_utf8.iter().position(|b| *b == b' ').unwrap() + "/openai/v1/models/caf".len() + 1;
    non_utf8.insert(at, 0xe9);
    let cases = vec![
        case("dot-dot segments", get("/openai/v1/models/../../admin", t), BAD),
        case("dot segment", get("/openai/v1/./models/x", t), BAD),
        case("trailing dot-dot", get("/openai/v1/models/x/..", t), BAD),
        case("%2e%2e", get("/openai/v1/models/%2e%2e/%2e%2e/admin", t), BAD),
        case("%2E%2E upper case", get("/openai/v1/models/%2E%2E/admin", t), BAD),
        case("mixed .%2E", get("/openai/v1/models/.%2E/admin", t), BAD),
        case("mixed case %2e%2E", get("/openai/v1/models/%2e%2E/admin", t), BAD),
        case("encoded slash %2f", get("/openai/v1/models/x%2f..%2f..%2fadmin", t), BAD),
        case("encoded slash %2F", get("/openai/v1/models%2Fgpt", t), BAD),
        case("encoded backslash %5c", get("/openai/v1/models/x%5c..%5cadmin", t), BAD),
        case("encoded NUL %00", get("/openai/v1/models/x%00.json", t), BAD),
        case("encoded CR LF", get("/openai/v1/models/x%0d%0aINJECTED", t), BAD),
        case("double slash", get("/openai/v1//models/x", t), BAD),
        case("double slash after provider", get("/openai//v1/models/x", t), BAD),
        case(";path parameter", get("/openai/v1/models/x;jsessionid=1", t), BAD),
        case("..;/ (Tomcat)", get("/openai/v1/models/..;/admin", t), BAD),
        case("raw backslash", get("/openai/v1/models\\..\\admin", t), Expect::Json(400, "bad_request")),
        case("non-UTF-8 byte", non_utf8, Expect::Json(400, "bad_request")),
        case("overlong UTF-8 %c0%ae", get("/openai/v1/models/%c0%ae%c0%ae/admin", t), BAD),
        case("invalid UTF-8 %ff", get("/openai/v1/models/%ff", t), BAD),
        case("double encoding %252e", get("/openai/v1/models/%252e%252e/admin", t), BAD),
        // Round 45: what NFKC (or a best-fit code page) reads as `../`.
        case(
            "fullwidth dots and slash",
            get("/openai/v1/models/%EF%BC%8E%EF%BC%8E%EF%BC%8Fadmin", t),
            BAD,
        ),
        case("two dot leader", get("/openai/v1/models/%E2%80%A5%EF%BC%8Fadmin", t), BAD),
        case("division slash", get("/openai/v1/models/x%E2%88%95..%E2%88%95admin", t), BAD),
        // A server that decodes before it splits off the query would see
        // `/v1/models/x` and a query: each of these matches `/v1/models/*`.
        case("encoded ? %3F", get("/openai/v1/models/x%3F", t), BAD),
        case("encoded # %23", get("/openai/v1/models/x%23", t), BAD),
        case("encoded ; %3b", get("/openai/v1/models/x%3b", t), BAD),
        case(
            "encoded letter is not decoded into scope",
            get("/openai/v1/%6dodels/x", t),
            Expect::Json(403, "out_of_scope"),
        ),
        case("fragment", get("/openai/v1/models/x#/../../admin", t), BAD_CLOSE),
        case("absolute-form elsewhere", get("http://evil.example/openai/v1/models/x", t), BAD),
        case(
            "absolute-form naming the upstream",
            get(&format!("{}/openai/v1/models/x", env.mock.url()), t),
            BAD,
        ),
        case(
            "authority-form (CONNECT)",
            req("CONNECT", hostile::authority(&env.mock.url()), t, ""),
            BAD,
        ),
        case("asterisk-form", req("OPTIONS", "*", t, ""), BAD),
        case("provider in other case", get("/OpenAI/v1/models/x", t), OUTSIDE),
        case("encoded provider separator", get("/openai%2fv1/models/x", t), BAD),
        case("dot segment under no provider", get("/nope/../openai/v1/models/x", t), BAD),
        case("empty first segment", get("//openai/v1/models/x", t), BAD),
        case("space in the target", get("/openai/v1/models/a b", t), UNPARSEABLE),
        case(
            "HTTP/0.9 request line",
            "GET /openai/v1/models/x\r\n\r\n",
            UNPARSEABLE,
        ),
        case(
            "unknown version HTTP/1.7",
            format!("GET /openai/v1/models/x HTTP/1.7\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n"),
            UNPARSEABLE,
        ),
    ];
    run("paths", &env, cases).await;
}

// ---------------------------------------------------------------------------
// Method tricks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn method_tricks_are_refused() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let target = "/openai/v1/models/x";
    let cases = vec![
        case(
            "X-HTTP-Method-Override",
            req("GET", target, t, "X-HTTP-Method-Override: DELETE\r\n"),
            BAD,
        ),
        case(
            "X-HTTP-Method",
            req("GET", target, t, "X-HTTP-Method: DELETE\r\n"),
            BAD,
        ),
        case(
            "X-Method-Override",
            req("GET", target, t, "X-Method-Override: DELETE\r\n"),
            BAD,
        ),
        case(
            "_method query parameter",
            get("/openai/v1/models/x?_method=DELETE", t),
            BAD,
        ),
        case(
            "_method after a ; separator",
            get("/openai/v1/models/x?a=1;_method=DELETE", t),
            BAD,
        ),
        case(
            "_method[] query parameter",
            get("/openai/v1/models/x?_method[]=DELETE", t),
            BAD,
        ),
        // Indexed names (round 38): read as `_method` by PHP, Rails, qs.
        case(
            "_method[0] query parameter",
            get("/openai/v1/models/x?_method[0]=DELETE", t),
            BAD,
        ),
        case(
            "_method%5B0%5D query parameter",
            get("/openai/v1/models/x?_method%5B0%5D=DELETE", t),
            BAD,
        ),
        case(
            "X-HTTP-Verb header",
            req("GET", target, t, "X-HTTP-Verb: DELETE\r\n"),
            BAD,
        ),
        case(
            "X-Method header",
            req("GET", target, t, "X-Method: DELETE\r\n"),
            BAD,
        ),
        case("lower-case method", req("get", target, t, ""), BAD),
        case(
            "unknown method PROPFIND",
            req("PROPFIND", target, t, ""),
            BAD,
        ),
        case("TRACE", req("TRACE", target, t, ""), BAD),
        case("CONNECT with a path", req("CONNECT", target, t, ""), BAD),
        case(
            "method with a non-token byte",
            req("G(T", target, t, ""),
            UNPARSEABLE,
        ),
        case(
            "method not granted",
            req("DELETE", target, t, ""),
            Expect::Json(403, "out_of_scope"),
        ),
    ];
    run("methods", &env, cases).await;
}

// ---------------------------------------------------------------------------
// Request framing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn framing_tricks_are_refused() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let smuggled = "GET /openai/v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let cases = vec![
        case(
            "Content-Length with Transfer-Encoding",
            post_raw(t, &format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}", 5 + smuggled.len())),
            BAD_CLOSE,
        ),
        case(
            "Transfer-Encoding with Content-Length",
            post_raw(t, "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
            BAD_CLOSE,
        ),
        case("duplicate equal Content-Length", post_raw(t, "Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}"), BAD_CLOSE),
        case("duplicate different Content-Length", post_raw(t, "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"), UNPARSEABLE),
        case("Content-Length +2", post_raw(t, "Content-Length: +2\r\n\r\n{}"), UNPARSEABLE),
        case("Content-Length 2, 2", post_raw(t, "Content-Length: 2, 2\r\n\r\n{}"), UNPARSEABLE),
        case("Content-Length -1", post_raw(t, "Content-Length: -1\r\n\r\n{}"), UNPARSEABLE),
        case("Content-Length overflow", post_raw(t, "Content-Length: 99999999999999999999999\r\n\r\n{}"), UNPARSEABLE),
        case("Transfer-Encoding xchunked", post_raw(t, "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"), UNPARSEABLE),
        case("Transfer-Encoding chunked, identity", post_raw(t, "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"), UNPARSEABLE),
        case("Transfer-Encoding chunked, chunked", post_raw(t, "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"), BAD),
        case("Transfer-Encoding twice", post_raw(t, "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), BAD_CLOSE),
        case("Transfer-Encoding then identity", post_raw(t, "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"), UNPARSEABLE),
        case("space before the colon", post_raw(t, "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"), UNPARSEABLE),
        case(
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /openai/v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            UNPARSEABLE,
        ),
        case("obs-fold continuation", req("GET", "/openai/v1/models/x", t, "X-Folded: a\r\n  b\r\n"), UNPARSEABLE),
        case(
            "bare LF line endings",
            format!("GET /openai/v1/models/x HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {t}\n\n"),
            BAD_CLOSE,
        ),
        case("bare CR in a header", req("GET", "/openai/v1/models/x", t, "X-A: a\rb\r\n"), UNPARSEABLE),
        case("NUL in a header", req("GET", "/openai/v1/models/x", t, "X-A: a\0b\r\n"), UNPARSEABLE),
        case("chunk-size overflow", post_raw(t, "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n{}\r\n0\r\n\r\n"), BAD_CLOSE),
        case("chunk size not hex", post_raw(t, "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"), BAD_CLOSE),
        case("chunk longer than its size", post_raw(t, "Transfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n"), BAD_CLOSE),
        case("Host naming another host", format!("GET /openai/v1/models/x HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer {t}\r\n\r\n"), BAD),
        case("two Host headers", req("GET", "/openai/v1/models/x", t, "Host: evil.example\r\n"), BAD),
        case("no Host header", format!("GET /openai/v1/models/x HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n"), BAD),
        case("Host with a path", format!("GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1/x\r\nAuthorization: Bearer {t}\r\n\r\n"), BAD),
        case("Host with user info", format!("GET /openai/v1/models/x HTTP/1.1\r\nHost: a@127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n"), BAD),
        case(
            "too many header lines",
            req("GET", "/openai/v1/models/x", t, &"X-Pad: 1\r\n".repeat(120)),
            TOO_LARGE,
        ),
    ];
    run("framing", &env, cases).await;
}

/// hyper answers a head it cannot parse by itself; airlock puts its JSON
/// error in that answer only where nothing else can share the write: before
/// the connection's first call. A provider's own 400 to a connection's
/// first call is relayed as the provider sent it; after a call on a
/// kept-alive connection, an unparseable head gets hyper's own 400 (no
/// body) and a close.
#[tokio::test]
async fn only_hyper_s_own_answers_are_rewritten() {
    let env = env(&[]).await;
    let url = env.airlock.proxy_url();
    let session = env
        .airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/status/*"]}],
            "ttl_seconds": 600
        }))
        .await
        .unwrap();
    let status_token = session["token"].as_str().unwrap();

    let ex = exchange(
        &url,
        format!("GET /openai/status/400 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {status_token}\r\n\r\n").as_bytes(),
        CASE_LIMIT,
    )
    .await;
    assert_eq!(ex.status, Some(400), "{}", ex.raw);
    assert_eq!(
        serde_json::from_str::<Value>(&ex.body).unwrap(),
        json!({"status": 400}),
        "the provider's answer was changed: {}",
        ex.raw
    );
    assert_eq!(env.mock.request_count(), 1);

    let mut stream = TcpStream::connect(hostile::authority(&url)).await.unwrap();
    let good = format!(
        "GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        env.token
    );
    stream.write_all(good.as_bytes()).await.unwrap();
    let ex = hostile::read_response(stream, CASE_LIMIT).await;
    assert_eq!(ex.status, Some(200), "{}", ex.raw);
    let mut stream = ex.stream.expect("kept alive after a call");
    stream
        .write_all(b"GET /openai/v1/models/x HTTP/1.7\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut ex = hostile::read_response(stream, CASE_LIMIT).await;
    assert_eq!(ex.status, Some(400), "{}", ex.raw);
    // As hyper wrote it: after a call its answer may share a write with the
    // end of the previous response, so airlock leaves it alone.
    assert_eq!(ex.body, "", "{}", ex.raw);
    assert!(ex.closes_within(Duration::from_secs(2)).await);
    assert_eq!(env.mock.request_count(), 2);
    assert_normal_call_works(&env).await;
}

/// A request target longer than hyper takes (65,534 bytes) in a head that
/// fits `max_header_size`: hyper's 414, with airlock's JSON error in it.
#[tokio::test]
async fn an_overlong_target_is_refused_with_json() {
    let env = env(&[r#"max_header_size = "128KiB""#]).await;
    let target = format!("/openai/v1/models/{}", "a".repeat(70_000));
    let cases = vec![case(
        "target over 65,534 bytes",
        get(&target, &env.token),
        Expect::JsonThenClose(414, "uri_too_long"),
    )];
    run("long target", &env, cases).await;
}

/// An HTTP/2 agent that never opens its flow-control window cannot hold
/// its connection with an answer airlock cannot send (round 41: 50 such
/// connections, without a token, held every slot of `max_connections`
/// for as long as they stayed open): once every call on a connection has
/// waited a whole `idle_timeout` for the agent to take its answer, the
/// connection is closed like an idle one.
#[tokio::test]
async fn an_agent_that_takes_no_answer_cannot_hold_its_connection() {
    let env = env(&[r#"idle_timeout = "1s""#]).await;
    let bearer = format!("Bearer {}", env.token);
    let allowed: [(&[u8], &[u8]); 5] = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1"),
        (b":path", b"/openai/v1/models/x"),
        (b"authorization", bearer.as_bytes()),
    ];
    let tokenless = &allowed[..4];
    for fields in [tokenless, &allowed[..]] {
        let lifetime = h2raw::unread_answer_lifetime(
            &env.airlock.proxy_url(),
            fields,
            Duration::from_secs(15),
        )
        .await;
        let lifetime = lifetime.expect("the connection was held open");
        assert!(lifetime >= Duration::from_millis(900), "{lifetime:?}");
    }
    // Nor by opening a new stream more often than the idle timeout (round
    // 42: one every 3 s held connections open for good).
    let lifetime = h2raw::unread_answers_lifetime(
        &env.airlock.proxy_url(),
        tokenless,
        Duration::from_millis(300),
        Duration::from_secs(15),
    )
    .await;
    let lifetime = lifetime.expect("the connection was held open by new streams");
    assert!(lifetime >= Duration::from_millis(900), "{lifetime:?}");
    let warning = env
        .airlock
        .wait_for_output("closed a connection whose calls had all waited", 0)
        .await;
    assert!(
        warning.contains("WARN") && warning.contains("peer="),
        "{warning}"
    );

    // A stream read as it comes is not cut, however quiet its provider
    // (2.5 s between events, over two idle timeouts), over HTTP/2 too.
    use http_body_util::{BodyExt, Empty};
    let streaming = env
        .airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/sse"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let request = http::Request::get(format!(
        "{}/openai/sse?events=3&delay_ms=2500",
        env.airlock.proxy_url()
    ))
    .header(
        "authorization",
        format!("Bearer {}", streaming["token"].as_str().unwrap()),
    )
    .body(Empty::new())
    .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(body.matches("data: ").count(), 3, "{body}");
    // The unread allowed call and the stream reached the provider; the
    // tokenless call nothing.
    assert_eq!(env.mock.request_count(), 2);
    env.mock.clear();
    assert_normal_call_works(&env).await;
}

/// An agent taking a large answer slowly but steadily is not taken for
/// one that takes nothing, however large the kernel's send buffer grows
/// (round 42: HTTP/1.1 and HTTP/2 readers at 100–300 KB/s of 8–12 MB
/// downloads were cut: hyper asks for the next frame only once megabytes
/// of that buffer have drained, longer than an `idle_timeout` of seconds).
#[tokio::test]
async fn a_slow_steady_reader_of_a_large_answer_is_not_cut() {
    const LEN: usize = 6_000_000;
    let env = env(&[r#"idle_timeout = "1s""#]).await;
    let session = env
        .airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/bytes"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let addr: std::net::SocketAddr = hostile::authority(&env.airlock.proxy_url())
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small window: what airlock sends waits in its own send buffer.
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /openai/bytes?n={LEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut read = 0usize;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // About 500 KB/s: the agent's reading pace, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(32)).await;
        match tokio::time::timeout(CASE_LIMIT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => read += n,
            Ok(Err(e)) => panic!("cut after {read} bytes: {e}"),
            Err(_) => panic!("no byte for {CASE_LIMIT:?} after {read}"),
        }
    }
    assert!(
        read > LEN,
        "cut after {read} of {LEN} bytes (head included)"
    );
    assert!(
        !env.airlock
            .output()
            .contains("closed a connection whose calls"),
        "{}",
        env.airlock.output()
    );
}

/// A request hyper cannot parse is no call (nothing to route or record),
/// but it is not unseen: counted under `_unknown` with the code it was
/// answered with, and warned about at most once a minute (round 40: a
/// scanner's garbage and oversized heads showed nowhere).
#[tokio::test]
async fn requests_that_cannot_be_parsed_are_counted_and_warned_about() {
    let env = env(&[r#"max_header_size = "16KiB""#]).await;
    let oversized = format!(
        "GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let cases = vec![
        case(
            "garbage",
            b"GARBAGE\r\n\r\n".to_vec(),
            Expect::JsonThenClose(400, "bad_request"),
        ),
        case(
            "garbage again",
            b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
            Expect::JsonThenClose(400, "bad_request"),
        ),
        case("head over max_header_size", oversized, TOO_LARGE),
    ];
    run("unparseable", &env, cases).await;
    let counted = |metrics: &str, decision: &str, n: u64| {
        let series = format!(
            "airlock_proxy_calls_total{{provider=\"_unknown\",decision=\"{decision}\"}} {n}"
        );
        metrics.lines().any(|l| l == series)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = env.airlock.admin("GET", "/metrics", None).await.unwrap();
        let metrics = metrics.as_str().unwrap().to_owned();
        if counted(&metrics, "bad_request", 2) && counted(&metrics, "headers_too_large", 1) {
            break;
        }
        assert!(Instant::now() < deadline, "not counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = env
        .airlock
        .wait_for_output("a request that is not valid HTTP/1.1 was answered", 0)
        .await;
    assert!(line.contains("peer="), "{line}");
    // One warning for the three (at most one a minute).
    let output = env.airlock.output();
    assert_eq!(
        output
            .matches("a request that is not valid HTTP/1.1")
            .count(),
        1,
        "{output}"
    );
}

// ---------------------------------------------------------------------------
// Headers the agent must not set upstream
// ---------------------------------------------------------------------------

#[tokio::test]
async fn header_tricks_are_refused() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let secret = &t["sess_".len()..];
    let m = "/openai/v1/models/x";
    let messages = |extra: &str| {
        format!(
            "POST /anthropic/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: 2\r\n\r\n{{}}"
        )
    };
    let cases = vec![
        case("Connection naming Authorization", req("GET", m, t, "Connection: close, Authorization\r\n"), BAD),
        case("Connection naming the auth header", messages(&format!("x-api-key: {t}\r\nConnection: x-api-key\r\n")), BAD),
        case("Connection naming Content-Length", req("GET", m, t, "Connection: content-length\r\n"), BAD),
        case("Connection naming Host", req("GET", m, t, "Connection: host\r\n"), BAD),
        case("X-Forwarded-For", req("GET", m, t, "X-Forwarded-For: 10.0.0.1\r\n"), BAD),
        case("Forwarded", req("GET", m, t, "Forwarded: for=10.0.0.1;host=api.openai.com\r\n"), BAD),
        case("X-Forwarded-Host", req("GET", m, t, "X-Forwarded-Host: evil.example\r\n"), BAD),
        case("X-Real-IP", req("GET", m, t, "X-Real-IP: 10.0.0.1\r\n"), BAD),
        case("X_Forwarded_For (underscores)", req("GET", m, t, "X_Forwarded_For: 10.0.0.1\r\n"), BAD),
        case("X-Original-URL", req("GET", m, t, "X-Original-URL: /v1/admin\r\n"), BAD),
        case("X-Rewrite-URL", req("GET", m, t, "X-Rewrite-URL: /v1/admin\r\n"), BAD),
        // Round 45: relatives of the listed ones that passed.
        case("CF-Connecting-IP", req("GET", m, t, "CF-Connecting-IP: 10.0.0.1\r\n"), BAD),
        case("Client-IP", req("GET", m, t, "Client-IP: 10.0.0.1\r\n"), BAD),
        case("X-Azure-ClientIP (round 47)", req("GET", m, t, "X-Azure-ClientIP: 10.0.0.1\r\n"), BAD),
        case("X-Original-Forwarded-For", req("GET", m, t, "X-Original-Forwarded-For: 10.0.0.1\r\n"), BAD),
        case("X-Envoy-External-Address", req("GET", m, t, "X-Envoy-External-Address: 10.0.0.1\r\n"), BAD),
        case("X-Original-Host", req("GET", m, t, "X-Original-Host: evil.example\r\n"), BAD),
        case("X-Envoy-Original-Path", req("GET", m, t, "X-Envoy-Original-Path: /v1/admin\r\n"), BAD),
        case("X-Original-Method", req("GET", m, t, "X-Original-Method: DELETE\r\n"), BAD),
        case("second Authorization header", req("GET", m, t, &format!("Authorization: Bearer {t}\r\n")), BAD),
        case(
            "Bearer and x-api-key disagree",
            messages(&format!("Authorization: Bearer {t}\r\nx-api-key: sk-ant-other-key\r\n")),
            BAD,
        ),
        case("x-api-key twice", messages(&format!("x-api-key: {t}\r\nx-api-key: {t}\r\n")), BAD),
        case("x_api_key (underscores)", messages(&format!("x-api-key: {t}\r\nx_api_key: {t}\r\n")), BAD),
        case("token in another header", req("GET", m, t, &format!("X-Debug: {t}\r\n")), BAD),
        case("token in a cookie", req("GET", m, t, &format!("Cookie: s={secret}\r\n")), BAD),
        case("token in Proxy-Authorization", req("GET", m, t, &format!("Proxy-Authorization: Bearer {t}\r\n")), BAD),
        case("token in the query", get(&format!("{m}?trace={t}"), t), BAD),
        case("token percent-encoded in the query", get(&format!("{m}?trace=sess%5F{secret}"), t), BAD),
        case("token in the path", get(&format!("/openai/v1/models/{t}"), t), BAD),
        case(
            "query credential spelled k%65y",
            format!("GET /google/v1beta/models/x?key={t}&k%65y=AIza-attacker HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            BAD,
        ),
        case(
            "query credential after a ; separator",
            format!("GET /google/v1beta/models/x?a=1;key=AIza-attacker&key={t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            BAD,
        ),
        case(
            "query credential spelled KEY",
            format!("GET /google/v1beta/models/x?KEY=AIza-attacker&key={t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            BAD,
        ),
        case(
            "query credential spelled key[]",
            format!("GET /google/v1beta/models/x?key[]=AIza-attacker&key={t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            BAD,
        ),
        case(
            "query credential spelled key[0]",
            format!("GET /google/v1beta/models/x?key[0]=AIza-attacker HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n"),
            BAD,
        ),
        case(
            "query credential spelled key%5Ba%5D",
            format!("GET /google/v1beta/models/x?key%5Ba%5D=AIza-attacker HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n"),
            BAD,
        ),
    ];
    run("headers", &env, cases).await;
}

// ---------------------------------------------------------------------------
// Audit and log injection
// ---------------------------------------------------------------------------

#[tokio::test]
async fn injection_leaves_every_record_and_log_line_one_line() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let ua = b"User-Agent: evil\" \\ ' INJECTED \xc2\x9b35;7m \xe2\x80\xae\r\n";
    let mut ua_request = format!(
        "DELETE /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n"
    )
    .into_bytes();
    ua_request.extend_from_slice(ua);
    ua_request.extend_from_slice(b"\r\n");
    let cases = vec![
        case(
            "CR LF in the path",
            get("/openai/v1/models/x%0d%0aINJECTED:%201", t),
            BAD,
        ),
        case(
            "ANSI escape in the path",
            get("/openai/v1/models/%1b%5b35;7mINJECTED", t),
            BAD,
        ),
        case(
            "CR LF after a token's shape in the path",
            get(
                "/openai/v1/models/sess_AAAAAAAAAAAAAAAAAAAA%0d%0aINJECTED:%201",
                t,
            ),
            BAD,
        ),
        case(
            "quotes in the path",
            get("/openai/v1/models/a\"INJECTED'b", t),
            BAD,
        ),
        case(
            "ESC byte in a header",
            req(
                "GET",
                "/openai/v1/models/x",
                t,
                "User-Agent: \x1b[35;7mINJECTED\r\n",
            ),
            UNPARSEABLE,
        ),
        case(
            "quotes, backslash, C1 and bidi in User-Agent",
            ua_request,
            Expect::Json(403, "out_of_scope"),
        ),
        case(
            "quote in the method",
            req("GE\"T", "/openai/v1/models/x", t, ""),
            UNPARSEABLE,
        ),
    ];
    run("injection", &env, cases).await;

    // Every audit record is one well-formed JSON object with no control
    // characters in what the agent chose.
    let body = every_record(&env).await;
    let records = body["records"].as_array().unwrap();
    assert!(records.len() >= 4, "{body}");
    for record in records {
        let line = serde_json::to_string(record).unwrap();
        assert!(!line.contains('\n'), "{line}");
        for field in ["path", "method", "decision"] {
            let text = record[field].as_str().unwrap_or("");
            assert!(!text.chars().any(char::is_control), "{field} of {line}");
        }
    }
    // No log line was split or coloured by the agent: the refused calls
    // are logged, each on its own `airlock::call` line.
    let output = env.airlock.output();
    let injected: Vec<&str> = output.lines().filter(|l| l.contains("INJECTED")).collect();
    assert!(injected.len() >= 3, "{output}");
    for line in &injected {
        assert!(
            line.contains("airlock::call") && line.contains("status"),
            "{line}"
        );
    }
    for line in output.lines() {
        assert!(!line.trim_start().starts_with("INJECTED"), "{line}");
        assert!(!line.contains("\u{1b}[35;7m"), "{line}");
        assert!(!line.contains('\r'), "{line:?}");
    }
}

/// `GET /v1/audit` (up to 1,000 records) of `env`'s server.
async fn every_record(env: &Env) -> Value {
    let (status, body) = env
        .airlock
        .admin("GET", "/v1/audit?limit=1000", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// A token put in the path is refused (or names nothing), and neither the
/// audit trail nor the log keeps it: the record's path says
/// `sess_[withheld]` or `[withheld]` where it was.
#[tokio::test]
async fn a_token_in_the_path_reaches_no_record_or_log_line() {
    let env = env(&[]).await;
    let t = env.token.as_str();
    let secret = &t["sess_".len()..];
    let no_auth =
        |target: &str| format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes();
    let cases = vec![
        case(
            "token in the path",
            get(&format!("/openai/v1/models/{t}"), t),
            BAD,
        ),
        case(
            "random part in the path",
            get(&format!("/openai/v1/models/{secret}"), t),
            BAD,
        ),
        case(
            "token escaped in the path",
            get(&format!("/openai/v1/models/sess%5F{secret}"), t),
            BAD,
        ),
        case(
            "token in the path only",
            no_auth(&format!("/openai/v1/models/{t}")),
            Expect::Json(401, "invalid_token"),
        ),
        case(
            "token as the provider",
            no_auth(&format!("/{t}/v1/models")),
            Expect::Json(401, "invalid_token"),
        ),
        case(
            "random part under an unknown provider",
            get(&format!("/0penai/v1/models/{secret}"), t),
            OUTSIDE,
        ),
        // A CONNECT target has no path: its record names the authority.
        case(
            "token as a CONNECT authority",
            format!("CONNECT {t}:443 HTTP/1.1\r\nHost: {t}:443\r\n\r\n"),
            Expect::Json(401, "invalid_token"),
        ),
        case(
            "random part as a CONNECT authority",
            req("CONNECT", &format!("{secret}:443"), t, ""),
            BAD,
        ),
    ];
    run("token in the path", &env, cases).await;

    let body = every_record(&env).await;
    let records = body["records"].as_array().unwrap();
    // Besides the eight, `run`'s own probes and check calls.
    let withheld = records
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.contains("[withheld]")))
        .count();
    assert_eq!(withheld, 8, "{body}");
    assert!(
        records
            .iter()
            .any(|r| r["method"] == "CONNECT" && r["path"] == "sess_[withheld]:443"),
        "{body}"
    );
    assert!(!body.to_string().contains(&secret[..16]), "{body}");
    let output = env.airlock.output();
    assert!(output.contains("[withheld]"), "{output}");
    assert!(!output.contains(&secret[..16]), "{output}");
    assert!(!env.mock.requests().iter().any(|r| r.contains(secret)));
}

// ---------------------------------------------------------------------------
// HTTP/2 abuse
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http2_abuse_is_refused() {
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    fn base(path: &str) -> Fields {
        vec![
            (b":method".to_vec(), b"GET".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":authority".to_vec(), b"127.0.0.1".to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
        ]
    }
    fn with(mut fields: Fields, name: &str, value: &str) -> Fields {
        fields.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        fields
    }
    let env = env(&[]).await;
    let url = env.airlock.proxy_url();
    let bearer = format!("Bearer {}", env.token);
    let ok = "/openai/v1/models/x";
    let mut foreign = base(ok);
    foreign[2].1 = b"api.openai.com".to_vec();
    let mut late_pseudo = base(ok);
    late_pseudo.insert(2, (b"x-a".to_vec(), b"1".to_vec()));
    let bad = Some((400, "bad_request"));
    // name, fields (the token is added), expected JSON error (None: any refusal)
    type H2Case<'a> = (&'a str, Fields, Option<(u16, &'a str)>);
    let cases: Vec<H2Case<'_>> = vec![
        (
            "duplicate :path",
            with(base(ok), ":path", "/openai/v1/files"),
            None,
        ),
        (
            "missing :path",
            base(ok).into_iter().take(3).collect(),
            None,
        ),
        ("pseudo-header after a regular one", late_pseudo, None),
        ("unknown pseudo-header", with(base(ok), ":evil", "1"), None),
        (
            "connection header",
            with(base(ok), "connection", "keep-alive"),
            None,
        ),
        (
            "transfer-encoding header",
            with(base(ok), "transfer-encoding", "chunked"),
            None,
        ),
        ("te other than trailers", with(base(ok), "te", "gzip"), None),
        (
            "upper-case header name",
            with(base(ok), "X-Upper", "1"),
            None,
        ),
        (
            "oversized header list",
            with(base(ok), "x-big", &"a".repeat(80 * 1024)),
            None,
        ),
        (
            "dot-dot in :path",
            base("/openai/v1/models/../../admin"),
            bad,
        ),
        ("foreign :authority", foreign, bad),
        (
            "Host disagreeing with :authority",
            with(base(ok), "host", "evil.example"),
            bad,
        ),
        (
            "method override",
            with(base(ok), "x-http-method-override", "DELETE"),
            bad,
        ),
        (
            "x-forwarded-for",
            with(base(ok), "x-forwarded-for", "10.0.0.1"),
            bad,
        ),
        (
            "token in another header",
            with(base(ok), "x-debug", &env.token),
            bad,
        ),
        (
            "more than 100 header lines",
            (0..101).fold(base(ok), |f, n| with(f, &format!("x-h{n}"), "1")),
            Some((431, "headers_too_large")),
        ),
    ];
    println!("\nhttp2: {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, fields, expect) in cases {
        let fields = with(fields, "authorization", &bearer);
        let refs: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        let outcome = h2raw::request(&url, &refs, None, CASE_LIMIT).await;
        println!(
            "  {name:<58} status={:?} code={:?} reset={:?} goaway={:?} closed={}",
            outcome.status,
            outcome.error_code(),
            outcome.reset,
            outcome.goaway,
            outcome.closed
        );
        let ok = match expect {
            Some((status, code)) => {
                outcome.status == Some(status) && outcome.error_code().as_deref() == Some(code)
            }
            None => outcome.refused(),
        };
        if !ok {
            failures.push(format!("{name}: {outcome:?}"));
        }
        if env.mock.request_count() != 0 {
            failures.push(format!("{name}: reached the provider"));
            env.mock.clear();
        }
        assert_alive(&env).await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A well-formed HTTP/2 request goes through.
    let fields = with(base(ok), "authorization", &bearer);
    let refs: Vec<(&[u8], &[u8])> = fields
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    let outcome = h2raw::request(&url, &refs, None, CASE_LIMIT).await;
    assert_eq!(outcome.status, Some(200), "{outcome:?}");
    assert_eq!(env.mock.request_count(), 1);
    assert_normal_call_works(&env).await;
}

// ---------------------------------------------------------------------------
// Resource abuse: sizes and connection counts
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused() {
    let env = env(&[
        r#"max_header_size = "16KiB""#,
        r#"max_request_body = "1KiB""#,
    ])
    .await;
    let t = env.token.as_str();
    let pad = |n: usize| format!("X-Pad: {}\r\n", "a".repeat(n));
    let cases = vec![
        case(
            "head over max_header_size",
            req("GET", "/openai/v1/models/x", t, &pad(20 * 1024)),
            TOO_LARGE,
        ),
        case(
            "head far over the limit",
            req("GET", "/openai/v1/models/x", t, &pad(1024 * 1024)),
            TOO_LARGE,
        ),
        case(
            "Content-Length over max_request_body",
            post_raw(
                t,
                &format!("Content-Length: 2048\r\n\r\n{}", "x".repeat(2048)),
            ),
            Expect::Json(413, "payload_too_large"),
        ),
        case(
            "huge Content-Length, no body sent",
            post_raw(t, "Content-Length: 1099511627776\r\n\r\n"),
            Expect::Json(413, "payload_too_large"),
        ),
    ];
    run("sizes", &env, cases).await;
    // Just under both limits passes.
    let reply = request(
        "POST",
        &format!("{}/openai/v1/chat/completions", env.airlock.proxy_url()),
        &[
            ("authorization", &format!("Bearer {}", env.token)),
            ("x-pad", &"a".repeat(12 * 1024)),
        ],
        "x".repeat(1024),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A head over `max_header_size` after a kept-alive call is refused as on
/// a connection's first request: 431 `headers_too_large` (the listener's
/// verdict: hyper's own limit is higher by then). It was refused with 400
/// "the connection's framing could not be followed".
#[tokio::test]
async fn an_oversized_head_after_a_call_is_refused_as_too_large() {
    let env = env(&[r#"max_header_size = "16KiB""#]).await;
    let addr = hostile::authority(&env.airlock.proxy_url()).to_owned();
    // One line over the limit, then (diff review) many lines each under
    // it that are over it together.
    let one_line = format!("X-Pad: {}\r\n", "a".repeat(20 * 1024));
    let many_lines: String = (0..10)
        .map(|i| format!("X-Pad-{i}: {}\r\n", "a".repeat(2 * 1024)))
        .collect();
    for pad in [one_line, many_lines] {
        let mut stream = kept_alive_connection(&addr).await;
        let answer = airlock_testkit::client::answer_on(
            &mut stream,
            &req("GET", "/openai/v1/models/x", &env.token, &pad),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("\"headers_too_large\""), "{answer}");
        assert!(answer.contains("proxy.max_header_size"), "{answer}");
    }
    assert_eq!(env.mock.request_count(), 0);
}

/// A connection to `addr` with one call answered on it (401: no token), kept alive.
async fn kept_alive_connection(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let answer = airlock_testkit::client::answer_on(
        &mut stream,
        b"GET /no-such-provider/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    stream
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_slots_come_back() {
    let env = env(&["max_connections = 4"]).await;
    let addr = hostile::authority(&env.airlock.proxy_url()).to_owned();
    let mut held = Vec::new();
    for _ in 0..4 {
        // A call answered on it: the connection is accepted and holds its
        // slot.
        held.push(kept_alive_connection(&addr).await);
    }
    let mut extra = exchange(
        &env.airlock.proxy_url(),
        b"GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        CASE_LIMIT,
    )
    .await;
    assert!(
        extra.status == Some(503) || (extra.status.is_none() && extra.closed),
        "{extra:?}"
    );
    if extra.status == Some(503) {
        assert_eq!(extra.error_code().as_deref(), Some("overloaded"));
    }
    assert!(extra.closes_within(Duration::from_secs(2)).await);
    assert_eq!(env.mock.request_count(), 0);
    // The refusal shows: counted (under `_unknown`: no request was read)
    // and warned about.
    let (_, metrics) = env.airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap().to_owned();
    let line = "airlock_proxy_calls_total{provider=\"_unknown\",decision=\"overloaded\"} 1";
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    let warning = "proxy.max_connections (4) open: a new connection was refused (503 overloaded";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.airlock.output().contains(warning) {
        assert!(Instant::now() < deadline, "{}", env.airlock.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Freed slots are usable again.
    drop(held);
    let started = Instant::now();
    loop {
        let ex = exchange(
            &env.airlock.proxy_url(),
            b"GET /no-such-provider/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            CASE_LIMIT,
        )
        .await;
        if ex.status == Some(401) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slots never came back: {ex:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_normal_call_works(&env).await;
}

/// Opens `n` HTTP/2 streams on one connection to the mock's
/// `/gated-json` (which answers once its gate opens) under a session of
/// their own; each task gives the stream's status, `Retry-After` and body.
async fn gated_streams(
    env: &Env,
    n: usize,
) -> tokio::task::JoinSet<(http::StatusCode, Option<http::HeaderValue>, bytes::Bytes)> {
    use http_body_util::{BodyExt, Full};
    let session = env
        .airlock
        .create_session(json!({
            "scope": [{"provider": "anthropic", "methods": ["GET"], "paths": ["/gated-json"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap().to_owned();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let url = format!("{}/anthropic/gated-json", env.airlock.proxy_url());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let request = http::Request::get(&url)
            .header("x-api-key", &token)
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let client = client.clone();
        calls.spawn(async move {
            let response = tokio::time::timeout(CASE_LIMIT, client.request(request))
                .await
                .expect("every stream is answered")
                .expect("over HTTP/2");
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, retry_after, body)
        });
    }
    calls
}

/// HTTP/2 streams of one connection each need an upstream connection of
/// their own: more than the descriptors left. A stream that cannot have
/// one gets 503 `overloaded` with `Retry-After` (airlock's shortage, not
/// the provider's failure: never 502), the provider sees nothing of it,
/// the streams that got a connection complete, and calls work again
/// afterwards. (With the bound on calls in flight upstream, set to the
/// `max_connections` the open files allow, the refusals come from that
/// bound before descriptors run out; an upstream connect failing for want
/// of descriptors answers the same, `UpstreamError::is_resource_shortage`.)
#[tokio::test]
async fn upstream_connections_beyond_the_descriptors_are_overloaded_not_bad_gateway() {
    const OPEN_FILES: u64 = 128;
    /// airlock's `MAX_CONCURRENT_STREAMS`, all held open at once.
    const STREAMS: usize = 100;
    // One session runs every stream: above its cap of calls in flight,
    // which the default would lower to a quarter of the few connections.
    let env = env_with(&["workers = 2"], |builder| {
        builder
            .open_files_limit(OPEN_FILES)
            .config("[sessions]\nmax_calls_in_flight = 1000\n")
    })
    .await;
    // A stream that reached the provider waits for the gate (its upstream
    // connection held); one that could not connect is answered at once.
    let mut calls = gated_streams(&env, STREAMS).await;
    let mut overloaded = 0;
    let through = loop {
        let through = env.mock.request_count();
        if through + overloaded == STREAMS {
            break through;
        }
        tokio::select! {
            answered = calls.join_next() => {
                let (status, retry_after, body) = answered.unwrap().unwrap();
                assert_eq!(status, 503, "{body:?}\noutput:\n{}", env.airlock.output());
                assert_eq!(retry_after.unwrap(), "1");
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                overloaded += 1;
            }
            () = env.mock.wait_for_requests(through + 1) => {}
        }
    };
    assert!(
        overloaded > 0 && through > 0,
        "{overloaded} overloaded, {through} through: the limit of {OPEN_FILES} open files did \
         not bind (or bound everything)"
    );
    // The streams that got a connection complete.
    for _ in 0..through {
        env.mock.open_gate();
    }
    while let Some(answered) = calls.join_next().await {
        let (status, _, body) = answered.unwrap();
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(&body[..], br#"{"gated":true}"#);
    }
    assert_eq!(env.mock.request_count(), through);
    let output = env.airlock.output();
    assert!(
        output.contains("as many calls are in flight upstream as proxy.max_connections allows")
            || output.contains("no upstream connection"),
        "{output}"
    );
    assert_normal_call_works(&env).await;
}

/// HTTP/2 streams of a few connections cannot have more calls in flight
/// upstream than `max_connections` (each proxy connection is counted with
/// one upstream connection's descriptor): one stream more gets 503
/// `overloaded` at once, the provider sees nothing of it, and the
/// descriptors kept for the store and the admin API stay free (round 41:
/// 196 streams on three connections took them, and the admin listener
/// failed its accepts).
#[tokio::test]
async fn http2_streams_have_at_most_max_connections_calls_upstream() {
    const MAX: usize = 4;
    const STREAMS: usize = 10;
    let env = env_with(&["max_connections = 4", "workers = 1"], |builder| {
        builder.config("[sessions]\nmax_calls_in_flight = 100\n")
    })
    .await;
    let mut calls = gated_streams(&env, STREAMS).await;
    // The streams over the bound are answered at once; the others wait
    // at the provider's gate.
    for _ in 0..STREAMS - MAX {
        let (status, _, body) = calls.join_next().await.unwrap().unwrap();
        assert_eq!(status, 503, "{body:?}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
    }
    env.mock.wait_for_requests(MAX).await;
    assert_eq!(env.mock.request_count(), MAX);
    // The admin API answers meanwhile.
    let (status, _) = env
        .airlock
        .admin("GET", "/v1/sessions", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    for _ in 0..MAX {
        env.mock.open_gate();
    }
    while let Some(answered) = calls.join_next().await {
        let (status, _, body) = answered.unwrap();
        assert_eq!(status, 200, "{body:?}");
    }
    env.mock.clear();
    assert_normal_call_works(&env).await;
}

/// A `max_connections` the config sets and the open files limit cannot hold
/// is lowered with a warning.
#[tokio::test]
async fn configured_max_connections_over_the_descriptors_is_a_warning() {
    const OPEN_FILES: u64 = 256;
    let env = env_with(&["max_connections = 500", "workers = 2"], |builder| {
        builder.open_files_limit(OPEN_FILES)
    })
    .await;
    let capacity = airlock_proxy::descriptors::connection_capacity(Some(OPEN_FILES), 2);
    let reserved = airlock_proxy::descriptors::reserved(2);
    // The arithmetic is shown: 2 descriptors a connection plus the reserve.
    let warning = format!(
        "proxy.max_connections = 500 needs up to {} open files (2 per connection, its own and \
         its upstream connection's, plus {reserved} for the store, the admin API and files), \
         more than the open files limit of {OPEN_FILES}: using {capacity} connections",
        500 * 2 + reserved
    );
    let output = env.airlock.output();
    let line = output
        .lines()
        .find(|line| line.contains(&warning))
        .unwrap_or_else(|| panic!("no {warning:?} in:\n{output}"));
    assert!(line.contains("WARN"), "{line}");
    assert_normal_call_works(&env).await;
}

/// Under a low open-files limit, `serve` lowers `max_connections` to what
/// the descriptors can hold and says so; connections beyond it get 503
/// `overloaded` rather than exhausting descriptors, so the admin API keeps
/// answering, the log is not flooded with failed accepts, and calls work
/// again once the idle connections go.
#[tokio::test]
async fn idle_connections_cannot_exhaust_descriptors() {
    const OPEN_FILES: u64 = 256;
    let env = env_with(
        &[
            r#"idle_timeout = "300s""#,
            r#"header_read_timeout = "300s""#,
            // The reserve grows with the workers: fixed, for a fixed capacity.
            "workers = 2",
        ],
        |builder| builder.open_files_limit(OPEN_FILES),
    )
    .await;
    let url = env.airlock.proxy_url();
    let call = b"GET /no-such-provider/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    // Idle connections, each proven accepted (and holding its slot) by a
    // call answered on it, until one is refused.
    let mut held = Vec::new();
    let mut refused = loop {
        let mut ex = exchange(&url, call, CASE_LIMIT).await;
        match ex.status {
            Some(401) => held.push(ex.stream.take().expect("kept alive")),
            Some(503) => break ex,
            _ => panic!(
                "connection {} (of at most {OPEN_FILES} open files): {ex:?}\noutput:\n{}",
                held.len() + 1,
                env.airlock.output()
            ),
        }
    };
    assert_eq!(refused.error_code().as_deref(), Some("overloaded"));
    assert!(refused.closes_within(Duration::from_secs(2)).await);
    assert_eq!(
        held.len(),
        airlock_proxy::descriptors::connection_capacity(Some(OPEN_FILES), 2)
    );
    // The default limit is lowered with a line of information, not a
    // warning: nobody asked for 10000.
    let output = env.airlock.output();
    let notice = format!(
        "proxy.max_connections = 10000 (the default) needs up to {} open files (2 per \
         connection, its own and its upstream connection's, plus {} for the store, the admin \
         API and files), more than the open files limit of {OPEN_FILES}: using {} connections",
        10_000 * 2 + airlock_proxy::descriptors::reserved(2),
        airlock_proxy::descriptors::reserved(2),
        held.len()
    );
    let line = output
        .lines()
        .find(|line| line.contains(&notice))
        .unwrap_or_else(|| panic!("no {notice:?} in:\n{output}"));
    assert!(line.contains("INFO"), "{line}");
    // Descriptors are left, enough for each held connection's call to
    // have an upstream connection too: the process's own count says so.
    let open = std::fs::read_dir(format!("/proc/{}/fd", env.airlock.pid()))
        .unwrap()
        .count();
    assert!(
        open + held.len() < usize::try_from(OPEN_FILES).unwrap(),
        "{open} descriptors open with {} connections held",
        held.len()
    );

    // Full, the proxy still answers at once, and so does the admin API.
    for _ in 0..16 {
        let extra = exchange(&url, call, CASE_LIMIT).await;
        assert_eq!(
            extra.error_code().as_deref(),
            Some("overloaded"),
            "{extra:?}"
        );
    }
    let (status, _) = tokio::time::timeout(CASE_LIMIT, env.airlock.admin("GET", "/healthz", None))
        .await
        .expect("/healthz answers while the proxy is full")
        .unwrap();
    assert_eq!(status, 200);
    let session = tokio::time::timeout(
        CASE_LIMIT,
        env.airlock.create_session(json!({
            "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}],
            "ttl_seconds": 600
        })),
    )
    .await
    .expect("sessions are created while the proxy is full")
    .unwrap();
    assert!(session["token"].as_str().is_some());
    assert_eq!(env.mock.request_count(), 0);

    // Idle connections gone, slots come back (the server sees each close
    // in its own time).
    drop(held);
    let started = Instant::now();
    loop {
        let ex = exchange(
            &url,
            b"GET /no-such-provider/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            CASE_LIMIT,
        )
        .await;
        if ex.status == Some(401) {
            break;
        }
        assert_eq!(ex.error_code().as_deref(), Some("overloaded"), "{ex:?}");
        assert!(
            started.elapsed() < CASE_LIMIT,
            "slots never came back: {ex:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_normal_call_works(&env).await;
    let output = env.airlock.output();
    let failed_accepts = output.matches("accept failed").count();
    assert_eq!(failed_accepts, 0, "accepts failed:\n{output}");
}

// ---------------------------------------------------------------------------
// Timeouts, each proven
// ---------------------------------------------------------------------------

/// Sends `bytes` one at a time, `gap` apart, until the server closes the
/// connection; returns when it closed (from the first byte) and how many
/// bytes were sent by then.
async fn trickle(addr: &str, bytes: &[u8], gap: Duration) -> (Duration, usize) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    for (i, b) in bytes.iter().enumerate() {
        if stream.write_all(&[*b]).await.is_err() {
            return (started.elapsed(), i);
        }
        match tokio::time::timeout(gap, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (started.elapsed(), i + 1),
            Ok(Ok(_)) => {
                // A 408 or similar answer: the next read sees the close.
            }
            Err(_) => {}
        }
    }
    let closed = hostile::closes_within(&mut stream, Duration::from_secs(30)).await;
    assert!(closed, "the server never closed the connection");
    (started.elapsed(), bytes.len())
}

#[tokio::test]
async fn header_read_timeout_closes_slow_and_idle_clients() {
    let env = env(&[r#"header_read_timeout = "1s""#, r#"idle_timeout = "30s""#]).await;
    let url = env.airlock.proxy_url();
    let addr = hostile::authority(&url).to_owned();
    let bound = Duration::from_secs(1) + SLACK;

    // A client that connects and sends nothing.
    let started = Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    assert!(
        hostile::closes_within(&mut silent, bound).await,
        "silent client kept"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Slowloris: a head sent one byte every 100 ms is cut off at ~1 s,
    // long before it is complete; sending bytes does not reset the timer.
    let head = format!(
        "GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nX-Slow: {}\r\n\r\n",
        env.token,
        "a".repeat(200)
    );
    let (elapsed, sent) = trickle(&addr, head.as_bytes(), Duration::from_millis(100)).await;
    assert!(elapsed < bound, "slow head kept for {elapsed:?}");
    assert!(sent < head.len(), "the whole head was accepted");

    // An idle keep-alive connection after a complete call.
    let mut ex = exchange(
        &url,
        format!("GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n", env.token).as_bytes(),
        CASE_LIMIT,
    )
    .await;
    assert_eq!(ex.status, Some(200), "{}", ex.raw);
    let started = Instant::now();
    assert!(
        ex.closes_within(bound).await,
        "idle keep-alive connection kept"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_normal_call_works(&env).await;
}

#[tokio::test]
async fn idle_timeout_closes_idle_connections_but_not_quiet_streams() {
    let upstream = ScriptedUpstream::start(Script::Events {
        interval: Duration::from_millis(2500),
    })
    .await;
    let mut env = env(&[r#"header_read_timeout = "30s""#, r#"idle_timeout = "1s""#]).await;
    let url = env.airlock.proxy_url();
    let addr = hostile::authority(&url).to_owned();
    let bound = Duration::from_secs(1) + SLACK;

    // HTTP/1.1 after a call.
    let mut ex = exchange(
        &url,
        format!("GET /openai/v1/models/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n", env.token).as_bytes(),
        CASE_LIMIT,
    )
    .await;
    assert_eq!(ex.status, Some(200), "{}", ex.raw);
    assert!(
        ex.closes_within(bound).await,
        "idle HTTP/1.1 connection kept"
    );

    // HTTP/2 with no stream at all (pings are answered: only idleness counts).
    let lifetime = h2raw::idle_connection_lifetime(&url, Duration::from_secs(10)).await;
    assert!(
        lifetime.is_some_and(|d| d < bound),
        "idle HTTP/2 connection: {lifetime:?}"
    );

    // A half-sent head with no call in flight is idle too.
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial.write_all(b"GET /openai/v1/mo").await.unwrap();
    assert!(hostile::closes_within(&mut partial, bound).await);

    // A stream whose provider is quiet for longer than idle_timeout is a
    // call in flight: it is not cut.
    drop(env.airlock);
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider(
            "events",
            &upstream.url(),
            "bearer",
            "sk-events-0123456789",
            "",
        )
        .proxy_option(r#"idle_timeout = "1s""#)
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({"scope": [{"provider": "events", "methods": ["GET"], "paths": ["/sse"]}], "ttl_seconds": 600}))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    stream
        .write_all(format!("GET /events/sse HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let text = read_until(&mut stream, "\"n\":1", Duration::from_secs(10)).await;
    assert!(text.contains("\"n\":1"), "the quiet stream was cut: {text}");
    env.airlock = airlock;
}

/// Reads from `stream` until `needle` appears, EOF, or `limit`.
async fn read_until<R: AsyncReadExt + Unpin>(
    stream: &mut R,
    needle: &str,
    limit: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains(needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => break,
        }
    }
    text
}

/// A call refused before its body arrived: airlock leaves the body unread
/// and the connection closes after the answer, which must say so. (With
/// audit off the refusal is answered at once, before hyper has noticed the
/// body was dropped; the answer had no `Connection: close`.)
#[tokio::test]
async fn a_refusal_sent_before_the_body_arrives_says_the_connection_closes() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .config("[audit]\nenabled = false")
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}],
            "ttl_seconds": 600
        }))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    for (what, token, path, status) in [
        (
            "unknown token",
            "sess_unknown",
            "/openai/v1/chat/completions",
            "401",
        ),
        ("out of scope", token, "/openai/v1/files", "403"),
        ("unknown provider", token, "/nobody/v1/x", "403"),
    ] {
        let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: 10\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, "}}", CASE_LIMIT).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{what}: {answer}"
        );
    }
    assert_eq!(mock.requests().len(), 0);
}

/// A provider that stops reading an upload and never answers: at
/// `upstream_timeout` the agent gets its 504, and airlock closes the
/// provider's connection and the agent's, rather than hold both open while
/// hyper waits to write the rest of the body (for as long as the provider
/// keeps its connection, with the agent's `max_connections` slot taken).
#[tokio::test]
async fn a_stalled_upload_at_upstream_timeout_closes_both_connections() {
    // The provider reads again 4 s in: before that only airlock can free
    // the connections.
    let upstream = ScriptedUpstream::start(Script::Stalled {
        drain_after: Duration::from_secs(4),
    })
    .await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("up", &upstream.url(), "bearer", "sk-stalled-0123456789", "")
        .proxy_option(r#"upstream_timeout = "1s""#)
        .proxy_option("max_connections = 1")
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({"scope": [{"provider": "up", "methods": ["POST"], "paths": ["/**"]}], "ttl_seconds": 600}))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    // A body far larger than the sockets' buffers: with the provider not
    // reading, the agent's writes block once the buffers on the way are
    // full, and airlock's write of the body to the provider with them.
    let head = format!(
        "POST /up/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 1073741824\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let uploading = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let chunk = vec![b'a'; 64 * 1024];
            while !stop.load(Ordering::SeqCst) {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Kept open: the agent neither finishes nor abandons its body.
            writer
        }
    });
    let answer = read_until(&mut reader, "upstream_timeout", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    stop.store(true, Ordering::SeqCst);

    // The agent's connection is gone from airlock: its one slot serves
    // another connection (503 `overloaded` while it is held), well before
    // the provider reads again.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let ex = exchange(
            &airlock.proxy_url(),
            b"GET /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            CASE_LIMIT,
        )
        .await;
        if ex.status != Some(503) {
            assert_eq!(ex.status, Some(401), "{}", ex.raw);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled call's connection still holds the slot: {}",
            ex.raw
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // When the provider reads again, it finds its connection closed after
    // what was already on its way.
    assert!(
        upstream
            .wait_hung_up(1, Duration::from_secs(10))
            .await
            .is_some(),
        "airlock kept the provider's connection open"
    );
    drop(uploading.await.unwrap());
}

#[tokio::test]
async fn a_provider_that_never_answers_is_a_504_in_bounded_time() {
    let upstream = ScriptedUpstream::start(Script::Silent).await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider(
            "silent",
            &upstream.url(),
            "bearer",
            "sk-silent-0123456789",
            "",
        )
        .proxy_option(r#"upstream_timeout = "1s""#)
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({"scope": [{"provider": "silent", "methods": ["GET"], "paths": ["/**"]}], "ttl_seconds": 600}))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let started = Instant::now();
    let ex = exchange(
        &airlock.proxy_url(),
        format!(
            "GET /silent/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
        CASE_LIMIT,
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(ex.status, Some(504), "{}", ex.raw);
    assert_eq!(ex.error_code().as_deref(), Some("upstream_timeout"));
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(1) + SLACK,
        "{elapsed:?}"
    );
    // airlock hung up on the provider.
    assert!(upstream
        .wait_hung_up(1, Duration::from_secs(5))
        .await
        .is_some());
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn an_answer_that_breaks_off_before_its_body_is_a_clean_502() {
    let (upstream, airlock, id, token) = scripted(Script::HeadOnly, "").await;
    let ex = exchange(
        &airlock.proxy_url(),
        format!("GET /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
        CASE_LIMIT,
    )
    .await;
    // Nothing of the provider's answer had gone out: airlock answers itself.
    assert_eq!(ex.status, Some(502), "{}", ex.raw);
    assert_eq!(ex.error_code().as_deref(), Some("upstream_error"));
    assert_eq!(upstream.requests(), 1);
    // The record is queued as the body breaks off; it lands shortly after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let (_, records) = airlock
            .admin("GET", &format!("/v1/audit?session={id}"), None)
            .await
            .unwrap();
        if let Some(record) = records["records"].get(0) {
            break record.clone();
        }
        assert!(Instant::now() < deadline, "no record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(record["flags"], json!(["incomplete"]), "{record}");
    // It says what the agent got, and what the provider had answered.
    assert_eq!(record["decision"], "upstream_error", "{record}");
    assert_eq!(record["status"], 502, "{record}");
    assert_eq!(record["upstream_status"], 200, "{record}");
}

/// A scripted upstream that takes requests and never answers, airlock in
/// front of it, and a session that may POST there: its id and token.
async fn upload_setup() -> (ScriptedUpstream, Airlock, String, String) {
    let (upstream, airlock, _, _) = scripted(Script::Silent, "").await;
    let session = airlock
        .create_session(json!({"scope": [{"provider": "up", "methods": ["POST"], "paths": ["/**"]}], "ttl_seconds": 600}))
        .await
        .unwrap();
    let id = session["id"].as_str().unwrap().to_owned();
    let token = session["token"].as_str().unwrap().to_owned();
    (upstream, airlock, id, token)
}

/// Waits until `upstream` has a request head.
async fn wait_for_request(upstream: &ScriptedUpstream) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the call never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The session's one call is recorded as allowed (it went to the
/// provider) and `client_aborted`, status 0, and counted `client_aborted`;
/// not as a `bad_request`.
async fn assert_one_client_aborted(airlock: &Airlock, id: &str) {
    let records = audit_records(airlock, id, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(record["status"], 0, "{record}");
    assert_eq!(record["flags"], json!(["client_aborted"]), "{record}");
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .contains("airlock_proxy_calls_total{provider=\"up\",decision=\"client_aborted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("airlock_proxy_calls_total{provider=\"up\",decision=\"bad_request\"} 0"),
        "{metrics}"
    );
}

/// An agent whose connection is reset in the middle of its request body
/// (an upload cut by a flaky network) is recorded and counted as
/// `client_aborted`, status 0 — not as the 400 `bad_request` of a malformed
/// request, which is an attack signal. (One that half-closes instead still
/// reads its 400: `proxy.rs`, `a_body_the_agent_cuts_short_is_its_400`.)
#[tokio::test]
async fn an_upload_cut_by_the_agent_leaving_is_client_aborted_not_bad_request() {
    let (upstream, airlock, id, token) = upload_setup().await;
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    let head = format!(
        "POST /up/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 1048576\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'a'; 4096]).await.unwrap();
    wait_for_request(&upstream).await;
    // Closed with a reset, as a dropped network connection. (Deprecated
    // because a lingering close blocks the thread on drop; a zero linger
    // does not: the reset goes out at once.)
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);

    assert_one_client_aborted(&airlock, &id).await;
}

/// An HTTP/1.1 agent that half-closes its connection after a complete
/// request (`shutdown(SHUT_WR)`) counts as gone, as SECURITY.md says: the
/// provider's call is cancelled, nothing is answered, and the record says
/// `client_aborted` — not a provider call held open for an agent that left.
#[tokio::test]
async fn an_agent_that_half_closes_after_its_request_is_client_aborted() {
    let (upstream, airlock, id, token) = upload_setup().await;
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    let request = format!(
        "POST /up/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {token}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    wait_for_request(&upstream).await;
    stream.shutdown().await.unwrap();

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the connection stays open")
        .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_one_client_aborted(&airlock, &id).await;
}

/// The same over HTTP/2: an agent that resets its stream (`RST_STREAM`
/// `CANCEL`) in the middle of its request body is gone — `client_aborted`,
/// status 0, in the record and in the metrics alike (it was recorded as a
/// 400 `bad_request` the agent never got, while the metrics said
/// `client_aborted`).
#[tokio::test]
async fn an_upload_stream_the_agent_resets_is_client_aborted_not_bad_request() {
    let (upstream, airlock, id, token) = upload_setup().await;
    let proxy_url = airlock.proxy_url();
    let authority = hostile::authority(&proxy_url);
    let tcp = TcpStream::connect(authority).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{authority}/up/upload"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-length", "104857600")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // More than the windows on the way take: the upload is under way
    // when the stream is reset.
    body.send_data(bytes::Bytes::from(vec![b'a'; 3 << 20]), false)
        .unwrap();
    wait_for_request(&upstream).await;
    body.send_reset(h2::Reason::CANCEL);
    drop(response);

    assert_one_client_aborted(&airlock, &id).await;
}

/// An agent that goes away while the provider has not answered yet is
/// counted in the metrics as `client_aborted`, and its record says so, with
/// the decision `allow`: the provider has the request (round 26: the
/// record could not be told from one of a call that never left airlock).
#[tokio::test]
async fn an_agent_gone_before_the_answer_is_counted_as_client_aborted() {
    let (upstream, airlock, id, token) = scripted(Script::Silent, "").await;
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    stream
        .write_all(
            format!(
                "GET /up/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the call never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stream);

    let counted = "airlock_proxy_calls_total{provider=\"up\",decision=\"client_aborted\"} 1";
    loop {
        let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
        let (_, records) = airlock
            .admin("GET", &format!("/v1/audit?session={id}"), None)
            .await
            .unwrap();
        let recorded = records["records"]
            .get(0)
            .is_some_and(|r| r["decision"] == "allow" && r["flags"] == json!(["client_aborted"]));
        if metrics.as_str().unwrap().contains(counted) && recorded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not counted: {metrics}\n{records}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Streams: back-pressure, disconnects, revocation
// ---------------------------------------------------------------------------

async fn scripted(script: Script, extra: &str) -> (ScriptedUpstream, Airlock, String, String) {
    let upstream = ScriptedUpstream::start(script).await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider(
            "up",
            &upstream.url(),
            "bearer",
            "sk-scripted-0123456789",
            "",
        )
        .config(extra)
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({"scope": [{"provider": "up", "methods": ["GET"], "paths": ["/**"]}], "ttl_seconds": 600}))
        .await
        .unwrap();
    (
        upstream,
        airlock,
        session["id"].as_str().unwrap().to_owned(),
        session["token"].as_str().unwrap().to_owned(),
    )
}

/// Opens `GET /up{path}` and returns the socket once the response head and
/// `needle` have arrived.
async fn open_stream(airlock: &Airlock, token: &str, path: &str, needle: &str) -> TcpStream {
    let mut stream = TcpStream::connect(hostile::authority(&airlock.proxy_url()))
        .await
        .unwrap();
    stream
        .write_all(format!("GET /up{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let text = read_until(&mut stream, needle, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(needle), "{text}");
    stream
}

/// Reads a chunked answer on `stream` to its end (its last chunk, or the
/// connection's close) within `limit`: what came, or `None` if it did not
/// end in time.
async fn read_to_end_within(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        while !rest.ends_with(b"\r\n0\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&rest).into_owned())
}

/// The audit records of `session`, waiting up to 5 s for `n` of them.
async fn audit_records(airlock: &Airlock, session: &str, n: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let (status, body) = airlock
            .admin("GET", &format!("/v1/audit?session={session}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let records = body["records"].as_array().cloned().unwrap_or_default();
        if records.len() >= n || started.elapsed() > Duration::from_secs(5) {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn flags(record: &Value) -> Vec<String> {
    record["flags"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_endless_body_to_a_slow_reader_stays_in_bounded_memory() {
    let (upstream, airlock, _, token) = scripted(Script::Endless, "").await;
    let baseline = airlock.rss_kib();
    let mut stream = open_stream(&airlock, &token, "/endless", "aaaa").await;
    // Read 8 MiB, then stop reading: the provider must be held back.
    let mut read = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while read < 8 * 1024 * 1024 {
        read += stream.read(&mut buf).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = upstream.sent();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = upstream.sent();
    let in_flight_mib = still.saturating_sub(read as u64) / (1024 * 1024);
    assert!(
        still - paused_at <= 1024 * 1024,
        "the provider kept sending while the agent did not read: {paused_at} -> {still}"
    );
    assert!(
        in_flight_mib < 32,
        "{in_flight_mib} MiB buffered between provider and agent"
    );
    let grown_mib = airlock.rss_kib().saturating_sub(baseline) / 1024;
    assert!(grown_mib < 32, "RSS grew by {grown_mib} MiB");
    println!(
        "read {} MiB; provider sent {} MiB, held back for 2 s; RSS grew {grown_mib} MiB",
        read / (1024 * 1024),
        still / (1024 * 1024)
    );
    // Reading resumes the flow; hanging up stops the provider.
    let resumed = Instant::now();
    while upstream.sent() <= still {
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "reading did not resume the flow"
        );
        assert!(stream.read(&mut buf).await.unwrap() > 0);
    }
    drop(stream);
    assert!(
        upstream
            .wait_hung_up(1, Duration::from_secs(5))
            .await
            .is_some(),
        "the provider kept sending after the agent hung up"
    );
}

#[tokio::test]
async fn an_agent_hanging_up_mid_stream_cancels_the_upstream_call() {
    let (upstream, airlock, session, token) = scripted(
        Script::Events {
            interval: Duration::from_millis(50),
        },
        "",
    )
    .await;
    let stream = open_stream(&airlock, &token, "/sse", "\"n\":2").await;
    drop(stream);
    let took = upstream
        .wait_hung_up(1, Duration::from_secs(5))
        .await
        .expect("the upstream stream was not cancelled");
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
    let records = audit_records(&airlock, &session, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["decision"], "allow", "{}", records[0]);
    assert!(
        flags(&records[0]).contains(&"client_aborted".to_owned()),
        "{}",
        records[0]
    );
    assert!(
        records[0]["bytes_out"].as_u64().unwrap_or(0) > 0,
        "{}",
        records[0]
    );
}

#[tokio::test]
async fn a_session_revoked_mid_stream_ends_the_stream_at_once() {
    let (upstream, airlock, session, token) = scripted(
        Script::Events {
            // Quiet between events: the bound must hold for idle streams too.
            interval: Duration::from_secs(30),
        },
        "",
    )
    .await;
    let mut stream = open_stream(&airlock, &token, "/sse", "\"n\":0").await;
    let (status, _) = airlock
        .admin("DELETE", &format!("/v1/sessions/{session}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let revoked = Instant::now();
    let rest = read_to_end_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("the stream outlived its session");
    let took = revoked.elapsed();
    // Cut between two events, the stream's last event is airlock's error,
    // which the SDKs raise with its message (a chunk of the chunked body:
    // its size line, then the event), and then the body ends as a
    // provider's does after an error. Cut off instead, an HTTP client may
    // drop the event unread and raise a network error (round 27: Node's
    // fetch did, 7 to 9 times in 10).
    let event = "event: error\ndata: {\"error\":{\"code\":\"invalid_token\",\"message\":\
                 \"the session was revoked or expired during the stream\",\
                 \"type\":\"authentication_error\"}}\n\n";
    assert!(rest.ends_with(&format!("{event}\r\n0\r\n\r\n")), "{rest:?}");
    // The revocation itself wakes the idle stream (no periodic re-check).
    assert!(
        took < Duration::from_millis(500),
        "stream ended {took:?} after revocation"
    );
    assert!(upstream
        .wait_hung_up(1, Duration::from_secs(5))
        .await
        .is_some());
    let records = audit_records(&airlock, &session, 1).await;
    assert!(
        records
            .iter()
            .any(|r| flags(r).contains(&"session_ended".to_owned())),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_session_expiring_mid_stream_ends_the_stream() {
    // An event every 200 ms: the check at every frame ends it.
    session_expiring_mid_stream(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_session_expiring_mid_stream_ends_an_idle_stream_at_its_expiry() {
    // No event before the expiry: the stream's timer ends it.
    session_expiring_mid_stream(Duration::from_secs(30)).await;
}

/// A stream whose upstream sends an event every `interval` outlives its
/// session (2 s) by no more than the slack.
async fn session_expiring_mid_stream(interval: Duration) {
    let upstream = ScriptedUpstream::start(Script::Events { interval }).await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider(
            "up",
            &upstream.url(),
            "bearer",
            "sk-scripted-0123456789",
            "",
        )
        .start()
        .await
        .unwrap();
    let session = airlock
        .create_session(json!({"scope": [{"provider": "up", "methods": ["GET"], "paths": ["/**"]}], "ttl_seconds": 2}))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap();
    let started = Instant::now();
    let mut stream = open_stream(&airlock, token, "/sse", "\"n\":0").await;
    let rest = read_to_end_within(&mut stream, Duration::from_secs(10))
        .await
        .expect("the stream outlived its session");
    assert!(rest.contains("event: error\n"), "{rest:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2) + SLACK, "{took:?}");
    assert!(upstream
        .wait_hung_up(1, Duration::from_secs(5))
        .await
        .is_some());
}

/// HTTP/2 as an HTTP/1.1 provider must get it (round 41): a cookie sent
/// as several fields ("crumbs") goes on as one `Cookie`, joined with `; `
/// (RFC 9113 §8.2.3); a query with raw bytes outside visible ASCII, which
/// HTTP/1.1's parser would refuse, is refused (it went upstream as sent).
#[tokio::test]
async fn http2_cookies_are_joined_and_raw_query_bytes_refused() {
    let env = env(&[]).await;
    let bearer = format!("Bearer {}", env.token);
    let head = |path: &[u8]| -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"GET".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":authority", b"127.0.0.1".to_vec()),
            (b":path", path.to_vec()),
            (b"authorization", bearer.clone().into_bytes()),
        ]
    };
    let mut fields = head(b"/openai/v1/models/x");
    for crumb in ["a=1", "b=2", "c=3"] {
        fields.push((b"cookie", crumb.as_bytes().to_vec()));
    }
    let borrowed: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, &v[..])).collect();
    let outcome = h2raw::request(&env.airlock.proxy_url(), &borrowed, None, CASE_LIMIT).await;
    assert_eq!(outcome.status, Some(200), "{outcome:?}");
    let seen = env.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_values("cookie"), vec!["a=1; b=2; c=3"]);
    env.mock.clear();

    for path in [
        "/openai/v1/models/x?q=\u{2028}".as_bytes(),
        "/openai/v1/models/x?caf\u{e9}=1".as_bytes(),
    ] {
        let fields = head(path);
        let borrowed: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, &v[..])).collect();
        let outcome = h2raw::request(&env.airlock.proxy_url(), &borrowed, None, CASE_LIMIT).await;
        assert_eq!(outcome.status, Some(400), "{outcome:?}");
        assert_eq!(outcome.error_code().as_deref(), Some("bad_request"));
    }
    assert_eq!(env.mock.request_count(), 0);
    assert_normal_call_works(&env).await;
}

/// An HTTP/2 `:path` carrying UTF-8 that log viewers read as a line break
/// (U+2028) and spaces that look like none (U+00A0) cannot forge a second
/// `airlock::call` line, nor put anything outside visible ASCII in one: the
/// call's path is logged and recorded escaped.
#[tokio::test]
async fn an_http2_path_cannot_forge_a_log_line() {
    let env = env_with(&[], |builder| {
        builder.env("RUST_LOG", "warn,airlock::call=info")
    })
    .await;
    let forged = "/openai/v1/models/x\u{2028}2026-01-01T00:00:00Z\u{a0}INFO\u{a0}airlock::call:\
                  \u{a0}call\u{a0}session=ses_FAKE\u{a0}decision=allow";
    let bearer = format!("Bearer {}", env.token);
    let fields: [(&[u8], &[u8]); 5] = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1"),
        (b":path", forged.as_bytes()),
        (b"authorization", bearer.as_bytes()),
    ];
    let outcome = h2raw::request(&env.airlock.proxy_url(), &fields, None, CASE_LIMIT).await;
    assert_eq!(outcome.status, Some(400), "{outcome:?}");
    assert_eq!(env.mock.request_count(), 0);

    let line = env.airlock.wait_for_output("airlock::call", 0).await;
    assert!(
        line.contains("path=/openai/v1/models/x%E2%80%A82026-01-01T00:00:00Z%C2%A0INFO"),
        "{line}"
    );
    let output = env.airlock.output();
    assert!(output.is_ascii(), "non-ASCII in the output: {output}");
    assert!(!output.contains("ses_FAKE decision"), "{output}");
    let (_, listed) = env.airlock.admin("GET", "/v1/audit", None).await.unwrap();
    let path = listed["records"][0]["path"].as_str().unwrap();
    assert!(path.bytes().all(|b| b.is_ascii_graphic()), "{path}");
}

/// The warning about an upstream request that failed (the provider closed
/// the connection without an answer) names the call's id, which the 502
/// carries and the call's `airlock::call` line names too (round 43: only
/// the time tied the warning to its call).
#[tokio::test]
async fn a_failed_upstream_request_is_warned_about_under_the_calls_id() {
    let (_upstream, airlock, _, token) = scripted(Script::Raw(""), "").await;
    let reply = request(
        "GET",
        &format!("{}/up/v1/models", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    let warning = airlock.wait_for_output("upstream request failed", 0).await;
    assert!(warning.contains(&format!("request_id={id}")), "{warning}");
    // The provider named as the call line names it, unquoted (round 43).
    assert!(warning.contains(" provider=up "), "{warning}");
}

/// A provider answer framed both by `Content-Length` and chunked
/// `Transfer-Encoding` is refused with a 502, not relayed with the length
/// framing the agent's answer while the body was read chunked (round 35:
/// cut answers, or short ones that looked complete).
#[tokio::test]
async fn a_provider_answer_with_two_framings_is_refused() {
    let (_upstream, airlock, id, token) = scripted(
        Script::Raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
             2f\r\nabcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstu\r\n0\r\n\r\n",
        ),
        "",
    )
    .await;
    let url = format!("{}/up/v1/models", airlock.proxy_url());
    let reply = request(
        "GET",
        &url,
        &[("authorization", &format!("Bearer {token}"))],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.error_code().as_deref(),
        Some("upstream_error"),
        "{reply:?}"
    );
    assert!(
        reply
            .text()
            .contains("both Content-Length and Transfer-Encoding"),
        "{reply:?}"
    );
    let records = audit_records(&airlock, &id, 1).await;
    assert_eq!(records[0]["decision"], "upstream_error", "{records:?}");
}

/// A provider's 204 with a `Content-Length` reaches an HTTP/2 agent without
/// it (RFC 9110 §8.6: a 204 has none), as hyper already sends it over
/// HTTP/1.1 (round 35: HTTP/2 clients took the stream for broken).
#[tokio::test]
async fn a_204_reaches_an_http2_agent_without_a_length() {
    let (_upstream, airlock, _, token) = scripted(
        Script::Raw("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"),
        "",
    )
    .await;
    let authority = hostile::authority(&airlock.proxy_url()).to_owned();
    let tcp = TcpStream::connect(&authority).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::get(format!("http://{authority}/up/v1/models"))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(
        response.headers().get("content-length").is_none(),
        "{:?}",
        response.headers()
    );
}
