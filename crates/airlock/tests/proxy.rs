//! End-to-end tests of the proxy: the real `airlock` binary on port 0 in
//! front of a recording mock provider, driven over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use airlock_testkit::client::{raw, raw_status, request, Reply};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider, MOCK_REQUEST_ID};
use serde_json::{json, Value};

const OPENAI_KEY: &str = "sk-real-openai-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-real-abcdef";
const GOOGLE_KEY: &str = "AIza-real-google+/=";

struct Setup {
    mock: MockProvider,
    airlock: Airlock,
}

async fn setup_with(extra: &str) -> Setup {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "anthropic",
            &mock.url(),
            "header:x-api-key",
            ANTHROPIC_KEY,
            "",
        )
        .provider("google", &mock.url(), "query:key", GOOGLE_KEY, "")
        .config(extra)
        .start()
        .await
        .unwrap();
    Setup { mock, airlock }
}

async fn setup() -> Setup {
    setup_with("").await
}

/// Creates a session; returns (id, token).
async fn session(airlock: &Airlock, scope: Value, limits: Value) -> (String, String) {
    let s = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 300, "limits": limits}))
        .await
        .unwrap();
    (
        s["id"].as_str().unwrap().to_owned(),
        s["token"].as_str().unwrap().to_owned(),
    )
}

fn chat_scope() -> Value {
    json!([{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}])
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A call with the session token and no body.
async fn call(method: &str, url: &str, token: &str) -> Reply {
    request(method, url, &[("authorization", &bearer(token))], "").await
}

async fn chat(setup: &Setup, token: &str) -> Reply {
    request(
        "POST",
        &format!("{}/openai/v1/chat/completions", setup.airlock.proxy_url()),
        &[
            ("authorization", &bearer(token)),
            ("content-type", "application/json"),
        ],
        r#"{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
}

fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn allowed_call_carries_the_real_credential_and_never_the_token() {
    let s = setup().await;
    let (_, token) = session(&s.airlock, chat_scope(), json!({})).await;
    let reply = request(
        "POST",
        &format!(
            "{}/openai/v1/chat/completions?trace=1&x=%20y",
            s.airlock.proxy_url()
        ),
        &[
            ("authorization", &bearer(&token)),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ],
        r#"{"model":"gpt-mock","messages":[]}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Hello from mock"
    );

    let seen = s.mock.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path_and_query, "/v1/chat/completions?trace=1&x=%20y");
    assert_eq!(
        req.header("authorization").unwrap(),
        format!("Bearer {OPENAI_KEY}")
    );
    assert_eq!(req.header_values("authorization").len(), 1);
    assert_eq!(req.header("host").unwrap(), s.mock.addr().to_string());
    assert_eq!(req.header("x-custom").unwrap(), "kept");
    assert_eq!(req.body, r#"{"model":"gpt-mock","messages":[]}"#);
    assert!(
        !req.contains(&token),
        "the session token reached the provider"
    );
    assert!(!req.contains("sess_"));
}

#[tokio::test]
async fn header_style_accepts_the_token_in_either_place() {
    let s = setup().await;
    let scope = json!([{"provider": "anthropic", "methods": ["POST"], "paths": ["/v1/messages"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let url = format!("{}/anthropic/v1/messages", s.airlock.proxy_url());
    let body = r#"{"model":"claude-mock","max_tokens":5,"messages":[]}"#;
    let a = request(
        "POST",
        &url,
        &[("x-api-key", &token), ("anthropic-version", "2023-06-01")],
        body,
    )
    .await;
    let b = request("POST", &url, &[("authorization", &bearer(&token))], body).await;
    let both = request(
        "POST",
        &url,
        &[("authorization", &bearer(&token)), ("x-api-key", &token)],
        body,
    )
    .await;
    for reply in [&a, &b, &both] {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 3);
    for req in &seen {
        assert_eq!(
            req.header_values("x-api-key"),
            vec![ANTHROPIC_KEY.to_owned()]
        );
        assert!(
            req.header("authorization").is_none(),
            "authorization must not be forwarded"
        );
        assert!(!req.contains(&token));
    }
    assert_eq!(seen[0].header("anthropic-version").unwrap(), "2023-06-01");
}

#[tokio::test]
async fn query_style_moves_the_credential_into_the_query() {
    let s = setup().await;
    let scope = json!([{"provider": "google", "methods": ["GET"], "paths": ["/v1beta/models/*"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let url = format!(
        "{}/google/v1beta/models/gemini?alt=json&key={token}",
        s.airlock.proxy_url()
    );
    let reply = request("GET", &url, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = s.mock.requests();
    assert_eq!(seen[0].path(), "/v1beta/models/gemini");
    assert_eq!(
        seen[0].query().unwrap(),
        "alt=json&key=AIza-real-google%2B%2F%3D"
    );
    assert!(!seen[0].contains(&token));
    // The credential takes the token's place: the agent's order stays.
    let url = format!(
        "{}/google/v1beta/models/gemini?key={token}&alt=sse&x=1",
        s.airlock.proxy_url()
    );
    assert_eq!(request("GET", &url, &[], "").await.status, 200);
    assert_eq!(
        s.mock.requests()[1].query().unwrap(),
        "key=AIza-real-google%2B%2F%3D&alt=sse&x=1"
    );
}

/// A provider that echoes its URL (error bodies, redirects do) gives the
/// query-style key back percent-encoded: that form, in whichever spelling,
/// is masked like the raw key.
#[tokio::test]
async fn a_query_key_echoed_back_encoded_is_masked() {
    let s = setup().await;
    let scope = json!([{"provider": "google", "methods": ["GET"], "paths": ["/echo"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let url = format!("{}/google/echo?key={token}", s.airlock.proxy_url());
    let reply = request("GET", &url, &[], "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // What the provider got (and echoed) holds the key as sent.
    let sent = "AIza-real-google%2B%2F%3D";
    assert_eq!(
        s.mock.requests()[0].query(),
        Some(format!("key={sent}").as_str())
    );
    let echoed = reply.json()["path_and_query"].as_str().unwrap().to_owned();
    assert!(echoed.starts_with("/echo?key="), "{echoed}");
    assert!(!echoed.contains("google"), "the key came back: {echoed}");
    let text = reply.text();
    for form in [
        GOOGLE_KEY,
        sent,
        "AIza-real-google%2b%2f%3d",
        "AIza%2Dreal%2Dgoogle%2B%2F%3D",
        "AIza%2dreal%2dgoogle%2b%2f%3d",
    ] {
        assert!(!text.contains(form), "{form} in {text}");
    }
}

/// With a path in `proxy.public_url` (airlock behind a reverse proxy at
/// `/gw`), the base URL agents are given works whether that proxy passes
/// the path on or strips it; anything else under it is no provider's.
#[tokio::test]
async fn a_public_url_path_routes_with_or_without_it() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .proxy_option(r#"public_url = "http://airlock.test/gw""#)
        .start()
        .await
        .unwrap();
    let created = airlock
        .create_session(json!({"scope": chat_scope(), "ttl_seconds": 300}))
        .await
        .unwrap();
    assert_eq!(
        created["env"]["OPENAI_BASE_URL"], "http://airlock.test/gw/openai/v1",
        "{created}"
    );
    let token = created["token"].as_str().unwrap();
    let call = |path: &str| {
        let url = format!("{}{path}", airlock.proxy_url());
        let auth = bearer(token);
        async move { request("POST", &url, &[("authorization", &auth)], "{}").await }
    };
    for path in [
        "/gw/openai/v1/chat/completions",
        "/openai/v1/chat/completions",
    ] {
        let reply = call(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.path() == "/v1/chat/completions"));
    for path in [
        "/gwx/openai/v1/chat/completions",
        "/gw/gw/openai/v1/chat/completions",
        "/gw",
    ] {
        let reply = call(path).await;
        assert_error(&reply, 403, "out_of_scope");
    }
    assert_eq!(
        mock.request_count(),
        2,
        "refused calls reached the provider"
    );
}

/// Anthropic's SDKs fetch a message batch's `results_url` as it is, an
/// absolute URL at the provider: airlock points it at itself, so that the
/// results come through airlock (scope, record, the real key) instead of
/// the token going to the provider directly.
#[tokio::test]
async fn a_batch_results_url_points_at_airlock() {
    let s = setup().await;
    let scope = json!([{"provider": "anthropic", "methods": ["GET"], "paths": ["/v1/messages/batches/**"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let key = [("x-api-key", token.as_str())];
    let batch_url = format!("{}/anthropic/v1/messages/batches/b1", s.airlock.proxy_url());
    let reply = request("GET", &batch_url, &key, "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let results_url = reply.json()["results_url"].as_str().unwrap().to_owned();
    assert_eq!(
        results_url,
        format!("{batch_url}/results"),
        "the provider said {}",
        s.mock.requests()[0].header("host").unwrap()
    );
    assert_eq!(
        reply.headers["content-length"].to_str().unwrap(),
        reply.body.len().to_string()
    );
    let reply = request("GET", &results_url, &key, "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("\"succeeded\""), "{}", reply.text());
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].path(), "/v1/messages/batches/b1/results");
    assert_eq!(seen[1].header("x-api-key").unwrap(), ANTHROPIC_KEY);
    // The same answer without a length, in two frames: read whole first.
    let chunked_url = format!("{batch_url}-chunked");
    let reply = request("GET", &chunked_url, &key, "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["results_url"].as_str().unwrap(),
        format!("{chunked_url}/results")
    );
    assert_eq!(
        reply.headers["content-length"].to_str().unwrap(),
        reply.body.len().to_string()
    );
}

#[tokio::test]
async fn bad_tokens_get_401_and_reach_nothing() {
    let s = setup().await;
    let (_, token) = session(&s.airlock, chat_scope(), json!({})).await;
    let url = format!("{}/openai/v1/chat/completions", s.airlock.proxy_url());
    let unknown = "sess_0123456789012345678901234567890123456789abc";
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("authorization", "Bearer".to_owned())],
        vec![("authorization", bearer("sk-real-key-guess"))],
        vec![("authorization", bearer(unknown))],
        vec![("authorization", bearer(&format!("{token}x")))],
        vec![("authorization", format!("Basic {token}"))],
    ];
    for headers in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = request("POST", &url, &headers, "{}").await;
        assert_error(&reply, 401, "invalid_token");
        assert!(!reply.text().contains(&token));
    }
    // Two different tokens, or the same header twice: ambiguous -> 400.
    let reply = request(
        "POST",
        &format!("{}/anthropic/v1/messages", s.airlock.proxy_url()),
        &[("authorization", &bearer(&token)), ("x-api-key", unknown)],
        "{}",
    )
    .await;
    assert_error(&reply, 400, "bad_request");
    let answer = raw(
        &s.airlock.proxy_url(),
        format!(
            "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&answer), 400, "{answer}");
    assert_eq!(
        s.mock.request_count(),
        0,
        "a refused call reached the provider"
    );
}

#[tokio::test]
async fn out_of_scope_calls_get_403_and_reach_nothing() {
    let s = setup().await;
    let scope = json!([
        {"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]},
        {"provider": "openai", "methods": ["GET", "HEAD"], "paths": ["/v1/models/*", "/v1/files/**"]}
    ]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let base = s.airlock.proxy_url();
    let denied = [
        ("GET", "/openai/v1/chat/completions"),
        ("DELETE", "/openai/v1/models/gpt-4o"),
        ("GET", "/openai/v1/models"),
        ("GET", "/openai/v1/models/a/b"),
        ("POST", "/openai/v1/files/x"),
        ("POST", "/openai/v1/chat/completions/x"),
        ("POST", "/openai/v1/chat"),
        ("POST", "/anthropic/v1/messages"),
        ("GET", "/openai/v1/Models/gpt-4o"),
        ("GET", "/openai/v1/models/%2e%2e"),
    ];
    for (method, path) in denied {
        let reply = call(method, &format!("{base}{path}"), &token).await;
        let want = if path.contains('%') { 400 } else { 403 };
        assert_eq!(reply.status, want, "{method} {path}: {}", reply.text());
    }
    assert_eq!(s.mock.request_count(), 0);
    let allowed = [
        ("GET", "/openai/v1/models/gpt-4o"),
        ("HEAD", "/openai/v1/models/gpt-4o"),
        ("GET", "/openai/v1/files"),
        ("GET", "/openai/v1/files/a/b/c"),
    ];
    for (method, path) in allowed {
        let reply = call(method, &format!("{base}{path}"), &token).await;
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
    }
    assert_eq!(s.mock.request_count(), allowed.len());
}

#[tokio::test]
async fn ambiguous_paths_are_refused_not_normalised() {
    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["*"], "paths": ["/**"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let paths = [
        "/openai/v1/../admin",
        "/openai/./v1/models",
        "/openai/v1//models",
        "/openai/v1/%2e%2e/admin",
        "/openai/v1/%2E%2e/admin",
        "/openai/v1%2fadmin",
        "/openai/v1%5cadmin",
        "/openai/v1\\admin",
        "/openai/v1/a%00b",
        "/openai/v1/models;jsessionid=1",
        "/openai/v1/%c0%ae%c0%ae/x",
        "/openai/v1/%ff",
        "/openai/v1/a%2",
        "/openai/v1/%252e%252e/x",
        "/openai/v1/caf\u{e9}",
    ];
    for path in paths {
        let answer = raw(
            &s.airlock.proxy_url(),
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(raw_status(&answer), 400, "{path}: {answer}");
        if answer.contains("\r\n\r\n{") {
            assert!(
                answer.contains("\"code\":\"bad_request\""),
                "{path}: {answer}"
            );
        }
    }
    assert_eq!(
        s.mock.request_count(),
        0,
        "an ambiguous path reached the provider"
    );
    // The server is still healthy.
    let reply = call(
        "GET",
        &format!("{}/openai/v1/models", s.airlock.proxy_url()),
        &token,
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// A path under no configured provider is checked like any call: the
/// token first (401 without a valid one: no one learns without a token
/// which providers airlock has), then the scope (403, counted toward
/// `max_denied`: probing for providers ends a session as any probing does).
#[tokio::test]
async fn unknown_provider_and_methods() {
    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["*"], "paths": ["/**"]}]);
    let (id, token) = session(&s.airlock, scope, json!({"max_denied": 5})).await;
    let nope = format!("{}/nope/v1/models", s.airlock.proxy_url());
    assert_error(&request("GET", &nope, &[], "").await, 401, "invalid_token");
    let unknown = "sess_unknownunknownunknownunknownunknown123";
    assert_error(&call("GET", &nope, unknown).await, 401, "invalid_token");
    let x_api_key = request("GET", &nope, &[("x-api-key", unknown)], "").await;
    assert_error(&x_api_key, 401, "invalid_token");
    let reply = call("GET", &nope, &token).await;
    assert_error(&reply, 403, "out_of_scope");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no provider is configured under this path"),
        "{}",
        reply.text()
    );
    let (_, shown) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(shown["calls"]["denied"], 1, "{shown}");
    // Two different tokens: ambiguous, as under a configured provider.
    let two = request(
        "GET",
        &nope,
        &[("authorization", &bearer(&token)), ("x-api-key", unknown)],
        "",
    )
    .await;
    assert_error(&two, 400, "bad_request");
    // An ambiguous path under no provider: refused as ambiguous, counted.
    let dotted = format!("{}/nope/../openai/v1/models", s.airlock.proxy_url());
    assert_error(&call("GET", &dotted, &token).await, 400, "bad_request");
    // So is a method or head refused under any provider.
    assert_error(&call("TRACE", &nope, &token).await, 400, "bad_request");
    for method in ["TRACE", "PROPFIND"] {
        let reply = call(
            method,
            &format!("{}/openai/v1/models", s.airlock.proxy_url()),
            &token,
        )
        .await;
        assert_error(&reply, 400, "bad_request");
    }
    // TRACE and PROPFIND were its fourth and fifth denial: `max_denied`.
    let reply = call(
        "GET",
        &format!("{}/openai/v1/models", s.airlock.proxy_url()),
        &token,
    )
    .await;
    assert_error(&reply, 401, "invalid_token");
    assert_eq!(s.mock.request_count(), 0);
}

/// A session revoked while its call still waits for the provider's answer
/// ends the call then, not when (or if) the provider answers: 401, the
/// upstream request dropped with its connection (the provider stops
/// working for a session that is over), the record flagged.
#[tokio::test]
async fn a_revocation_ends_a_call_still_waiting_for_the_provider() {
    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/gated-head"]}]);
    let (id, token) = session(&s.airlock, scope, json!({})).await;
    let url = format!("{}/openai/gated-head", s.airlock.proxy_url());
    let auth = bearer(&token);
    let call =
        tokio::spawn(async move { request("GET", &url, &[("authorization", &auth)], "").await });
    // The request reached the provider, which holds its answer.
    s.mock.wait_for_requests(1).await;
    let (status, _) = s
        .airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let reply = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call waited for the provider after its session was revoked")
        .unwrap();
    assert_error(&reply, 401, "invalid_token");
    assert_eq!(
        reply.json()["error"]["message"],
        "the session was revoked or expired during the call"
    );
    assert_upstream_let_go(&s).await;
    // A refusal's record is committed just after its answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let audit = loop {
        let (_, audit) = s
            .airlock
            .admin("GET", &format!("/v1/audit?session={id}"), None)
            .await
            .unwrap();
        if audit["records"].as_array().is_some_and(|r| !r.is_empty()) {
            break audit;
        }
        assert!(tokio::time::Instant::now() < deadline, "no record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let record = &audit["records"][0];
    assert_eq!(record["status"], 401, "{record}");
    assert_eq!(
        record["flags"],
        json!(["incomplete", "session_ended"]),
        "{record}"
    );
}

/// airlock let go of the upstream connection of a call it ended: once the
/// provider's held answer is released, nobody reads it, and the
/// connection ends.
async fn assert_upstream_let_go(s: &Setup) {
    s.mock.open_gate();
    assert!(
        s.mock
            .wait_for_ended_connections(1, Duration::from_secs(10))
            .await,
        "the upstream connection stayed open"
    );
}

/// A session that expires while its call waits for the provider's answer
/// ends the call at its expiry (the wait's timer), not when the provider
/// answers.
#[tokio::test]
async fn an_expiry_ends_a_call_still_waiting_for_the_provider() {
    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/gated-head"]}]);
    let created = s
        .airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 2}))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let url = format!("{}/openai/gated-head", s.airlock.proxy_url());
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        request("GET", &url, &[("authorization", &bearer(&token))], ""),
    )
    .await
    .expect("the call waited for the provider after its session expired");
    assert_error(&reply, 401, "invalid_token");
    assert_eq!(
        reply.json()["error"]["message"],
        "the session was revoked or expired during the call"
    );
    assert_eq!(s.mock.request_count(), 1, "the call reached the provider");
    assert_upstream_let_go(&s).await;
}

#[tokio::test]
async fn revoked_and_expired_sessions_get_401() {
    let s = setup().await;
    let (id, token) = session(&s.airlock, chat_scope(), json!({})).await;
    assert_eq!(chat(&s, &token).await.status, 200);
    let (status, body) = s
        .airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["state"], "revoked");
    assert_eq!(body["revoked_reason"], "operator");
    let refused = chat(&s, &token).await;
    assert_error(&refused, 401, "invalid_token");
    assert_eq!(
        refused.json()["error"]["message"],
        "the session has been revoked"
    );
    assert_eq!(s.mock.request_count(), 1);

    let created = s
        .airlock
        .create_session(json!({"scope": chat_scope(), "ttl_seconds": 1}))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    assert_eq!(chat(&s, token).await.status, 200);
    // Wait for the session's own clock to run out (not a synchronisation sleep).
    let expires = time::OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(
        left.whole_milliseconds().max(0) as u64 + 50,
    ))
    .await;
    assert_error(&chat(&s, token).await, 401, "invalid_token");
    let (_, view) = s
        .airlock
        .admin(
            "GET",
            &format!("/v1/sessions/{}", created["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(view["state"], "expired");
    assert_eq!(s.mock.request_count(), 2);

    // The refused calls' records name the ended sessions they used.
    let (_, audit) = s
        .airlock
        .admin("GET", "/v1/audit?limit=100", None)
        .await
        .unwrap();
    let refused: Vec<&Value> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decision"] == "invalid_token")
        .collect();
    assert_eq!(refused.len(), 2, "{audit}");
    assert_eq!(refused[0]["session"], id.as_str(), "{audit}");
    assert_eq!(refused[1]["session"], created["id"], "{audit}");
}

#[tokio::test]
async fn limits_rate_and_quota() {
    let s = setup().await;
    let (_, token) = session(&s.airlock, chat_scope(), json!({"requests_per_minute": 2})).await;
    assert_eq!(chat(&s, &token).await.status, 200);
    assert_eq!(chat(&s, &token).await.status, 200);
    let limited = chat(&s, &token).await;
    assert_error(&limited, 429, "rate_limited");
    // Two a minute: the next one in at most 30 s, as SDKs read it.
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(s.mock.request_count(), 2);

    let (id, token) = session(&s.airlock, chat_scope(), json!({"max_requests": 3})).await;
    for _ in 0..3 {
        assert_eq!(chat(&s, &token).await.status, 200);
    }
    let exhausted = chat(&s, &token).await;
    assert_error(&exhausted, 429, "rate_limited");
    // No wait makes max_requests come back, and SDKs are told not to retry.
    assert_eq!(exhausted.headers.get("retry-after"), None);
    assert_eq!(exhausted.headers["x-should-retry"], "false");
    assert_eq!(limited.headers.get("x-should-retry"), None);
    assert_eq!(s.mock.request_count(), 5);
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["calls"], json!({"allowed": 3, "denied": 1}));
    assert_eq!(view["state"], "active");
}

/// One session holds at most `sessions.max_calls_in_flight` calls at once:
/// one more is refused 429 before anything goes upstream, and counts toward
/// no `max_denied`; other sessions are not held back, and a slot is free
/// again as soon as its call has ended.
#[tokio::test]
async fn a_session_has_at_most_max_calls_in_flight() {
    let s = setup_with("[sessions]\nmax_calls_in_flight = 2\n").await;
    let scope = json!([
        {"provider": "openai", "methods": ["GET"], "paths": ["/gated-head", "/v1/models"]},
    ]);
    let (id, token) = session(&s.airlock, scope.clone(), json!({"max_denied": 1})).await;
    let held = format!("{}/openai/gated-head", s.airlock.proxy_url());
    let models = format!("{}/openai/v1/models", s.airlock.proxy_url());
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (url, auth) = (held.clone(), bearer(&token));
            tokio::spawn(async move { request("GET", &url, &[("authorization", &auth)], "").await })
        })
        .collect();
    // Both reached the provider, which holds its answers.
    s.mock.wait_for_requests(2).await;
    for _ in 0..3 {
        let refused = call("GET", &models, &token).await;
        assert_error(&refused, 429, "rate_limited");
        assert_eq!(refused.headers["retry-after"], "1");
        assert!(
            refused.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("already has 2 calls in flight"),
            "{}",
            refused.json()
        );
    }
    assert_eq!(s.mock.request_count(), 2, "a refused call went upstream");
    // Another session is not held back.
    let (_, other) = session(&s.airlock, scope, json!({})).await;
    assert_eq!(call("GET", &models, &other).await.status, 200);

    // One answer released: its slot is free by the time it arrives.
    s.mock.open_gate();
    let (first, _, pending) = futures_util::future::select_all(calls).await;
    assert_eq!(first.unwrap().status, 200);
    assert_eq!(call("GET", &models, &token).await.status, 200);
    s.mock.open_gate();
    for rest in pending {
        assert_eq!(rest.await.unwrap().status, 200);
    }
    // Three refusals and max_denied 1: still active, the refusals recorded.
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["state"], "active", "{view}");
    assert_eq!(view["calls"], json!({"allowed": 3, "denied": 0}), "{view}");
    let (_, audit) = s
        .airlock
        .admin("GET", &format!("/v1/audit?session={id}"), None)
        .await
        .unwrap();
    let decisions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions.iter().filter(|d| **d == "rate_limited").count(),
        3,
        "{audit}"
    );
}

/// Refusals at the cap take from a `requests_per_minute` bucket of their
/// own: a flood of them runs into the rate, whose refusals count toward
/// `max_denied` and end the session, while the rate of calls that go
/// upstream is left whole.
#[tokio::test]
async fn a_flood_at_the_cap_runs_into_the_rate_limit() {
    let s = setup_with("[sessions]\nmax_calls_in_flight = 1\n").await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/**"]}]);
    let limits = json!({"requests_per_minute": 3, "max_denied": 2});
    let (id, token) = session(&s.airlock, scope, limits).await;
    let held = {
        let (url, auth) = (
            format!("{}/openai/gated-head", s.airlock.proxy_url()),
            bearer(&token),
        );
        tokio::spawn(async move { request("GET", &url, &[("authorization", &auth)], "").await })
    };
    s.mock.wait_for_requests(1).await;
    let models = format!("{}/openai/v1/models", s.airlock.proxy_url());
    let message = |reply: &Reply| {
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Refusals at the cap have a bucket of the same rate of their own
    // (the held call's token is not theirs): three, counted toward nothing.
    for _ in 0..3 {
        let refused = call("GET", &models, &token).await;
        assert_error(&refused, 429, "rate_limited");
        assert!(
            message(&refused).contains("calls in flight"),
            "{}",
            refused.json()
        );
    }
    // Then the rate refuses, and counts: two of them end the session.
    for _ in 0..2 {
        let refused = call("GET", &models, &token).await;
        assert_error(&refused, 429, "rate_limited");
        assert_eq!(
            message(&refused),
            "requests_per_minute exceeded for this session"
        );
    }
    assert_error(&call("GET", &models, &token).await, 401, "invalid_token");
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["state"], "revoked", "{view}");
    assert_eq!(view["revoked_reason"], "max_denied", "{view}");
    assert_eq!(s.mock.request_count(), 1);
    // The held call ended with its session.
    assert_error(&held.await.unwrap(), 401, "invalid_token");

    // A client retrying refusals at the cap does not use up the rate of
    // its calls: a stream holds the slot and one of three tokens; after a
    // flood of refusals the other two still go upstream.
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/**"]}]);
    let (_, token) = session(&s.airlock, scope, json!({"requests_per_minute": 3})).await;
    let (_, stream) = airlock_testkit::client::first_frame(
        &format!("{}/openai/gated-sse", s.airlock.proxy_url()),
        &token,
    )
    .await;
    for _ in 0..10 {
        assert_error(&call("GET", &models, &token).await, 429, "rate_limited");
    }
    // The agent leaves the stream: its slot comes back.
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while call("GET", &models, &token).await.status != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
    }
    assert_eq!(call("GET", &models, &token).await.status, 200);
    let over = call("GET", &models, &token).await;
    assert_error(&over, 429, "rate_limited");
    assert_eq!(
        message(&over),
        "requests_per_minute exceeded for this session"
    );
}

/// A call's slot is free before its answer completes: an agent making one
/// call after another over a kept-alive connection never finds its last
/// call still holding the only slot.
#[tokio::test]
async fn a_slot_is_free_when_its_answer_arrives() {
    use http_body_util::{BodyExt, Empty};

    let s = setup_with("[sessions]\nmax_calls_in_flight = 1\n").await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/v1/models"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    for n in 0..300 {
        let req = hyper::Request::get(format!("{}/openai/v1/models", s.airlock.proxy_url()))
            .header("authorization", bearer(&token))
            .body(Empty::new())
            .unwrap();
        let response = client.request(req).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "call {n}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(s.mock.connections(), 1);
}

/// However a call ends — the agent leaving while the provider holds its
/// answer, or in the middle of a stream, the provider failing — its slot
/// comes back: with one slot, the next call is admitted each time.
#[tokio::test]
async fn a_slot_comes_back_however_its_call_ends() {
    use futures_util::StreamExt;
    use http_body_util::BodyStream;

    let s = setup_with("[sessions]\nmax_calls_in_flight = 1\n").await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/**"]}]);
    let (id, token) = session(&s.airlock, scope, json!({})).await;
    let url = |path: &str| format!("{}/openai{path}", s.airlock.proxy_url());
    // Waits for the session's `n`th record: its call has ended.
    let ended = |n: usize| {
        let airlock = &s.airlock;
        let id = id.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (_, audit) = airlock
                    .admin("GET", &format!("/v1/audit?session={id}"), None)
                    .await
                    .unwrap();
                let records = audit["records"].as_array().unwrap().clone();
                if records.len() >= n {
                    return records[n - 1].clone();
                }
                assert!(tokio::time::Instant::now() < deadline, "{audit}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let admitted = || async { call("GET", &url("/v1/models"), &token).await.status };

    // The agent leaves while the provider holds the answer's head.
    let held = {
        let (url, auth) = (url("/gated-head"), bearer(&token));
        tokio::spawn(async move { request("GET", &url, &[("authorization", &auth)], "").await })
    };
    s.mock.wait_for_requests(1).await;
    assert_error(
        &call("GET", &url("/v1/models"), &token).await,
        429,
        "rate_limited",
    );
    held.abort();
    let record = ended(2).await;
    assert_eq!(record["flags"], json!(["client_aborted"]), "{record}");
    assert_eq!(admitted().await, 200);

    // The agent leaves in the middle of a stream.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = hyper::Request::get(url("/gated-sse"))
        .header("authorization", bearer(&token))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(req).await.unwrap();
    let mut frames = BodyStream::new(response.into_body());
    frames.next().await.unwrap().unwrap();
    assert_error(
        &call("GET", &url("/v1/models"), &token).await,
        429,
        "rate_limited",
    );
    drop((frames, client));
    let record = ended(5).await;
    assert_eq!(record["path"], "/openai/gated-sse", "{record}");
    assert_eq!(admitted().await, 200);

    // The provider refuses the credential: airlock's own 502.
    let refused = call("GET", &url("/status/401"), &token).await;
    assert_error(&refused, 502, "upstream_auth_failed");
    assert_eq!(admitted().await, 200);
}

#[tokio::test]
async fn max_denied_revokes_the_session() {
    let s = setup().await;
    let (id, token) = session(&s.airlock, chat_scope(), json!({"max_denied": 2})).await;
    let out = format!("{}/openai/v1/files", s.airlock.proxy_url());
    assert_eq!(chat(&s, &token).await.status, 200);
    for _ in 0..2 {
        let reply = call("GET", &out, &token).await;
        assert_error(&reply, 403, "out_of_scope");
    }
    // Now even an in-scope call is refused: the session is revoked, and
    // the agent and the operator are told why.
    let refused = chat(&s, &token).await;
    assert_error(&refused, 401, "invalid_token");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("reached its max_denied limit"),
        "{message}"
    );
    assert_eq!(s.mock.request_count(), 1);
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["state"], "revoked");
    assert_eq!(view["revoked_reason"], "max_denied");
    assert_eq!(view["calls"], json!({"allowed": 1, "denied": 2}));
}

/// Calls that wait for their session's `max_requests` lease (a store
/// round trip) while another call's denial revokes the session send
/// nothing upstream: the session's state is read again after the wait
/// (round 26: every one of them went to the provider after the
/// revocation). Another process holds the store's write lock, so the
/// lease cannot be refilled until the revocation is in force; the
/// out-of-scope call that revokes does not wait for the lease.
#[tokio::test]
async fn calls_waiting_for_a_lease_stop_when_the_session_is_revoked_meanwhile() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    // Audit off: its records would wait for the lock too.
    let s = setup_with("[audit]\nenabled = false\n").await;
    let (id, token) = session(
        &s.airlock,
        chat_scope(),
        json!({"max_requests": 50, "max_denied": 2}),
    )
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let base = s.airlock.proxy_url();
    let send = |path: &str| {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let client = client.clone();
        async move {
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // The first denial: the session is cached, its lease still empty.
    assert_eq!(send("/openai/v1/files").await.0, 403);

    let locker = s.airlock.lock_store(false).await;
    let waiting =
        futures_util::future::join_all((0..20).map(|_| send("/openai/v1/chat/completions")));
    // The second denial, sent after them on the same connection (`join`
    // polls them first), revokes; the lock goes once it is answered.
    let revoking = async {
        let answer = send("/openai/v1/files").await;
        locker.release().await;
        answer
    };
    let (answers, (status, body)) = futures_util::future::join(waiting, revoking).await;
    assert_eq!(status, 403, "{body}");
    for (status, body) in answers {
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("reached its max_denied limit"), "{body}");
    }
    assert_eq!(s.mock.request_count(), 0);
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["revoked_reason"], "max_denied");
    // The refused calls spent nothing of max_requests.
    assert_eq!(view["calls"], json!({"allowed": 0, "denied": 2}), "{view}");
}

#[tokio::test]
async fn sse_events_arrive_as_the_provider_sends_them() {
    use futures_util::StreamExt;
    use http_body_util::BodyStream;

    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/gated-sse"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = hyper::Request::get(format!("{}/openai/gated-sse", s.airlock.proxy_url()))
        .header("authorization", bearer(&token))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut frames = BodyStream::new(response.into_body());
    let mut received = String::new();
    // The provider holds its second event until the gate opens, so the
    // first one can only arrive here if airlock does not buffer.
    while !received.contains("data: first") {
        let frame = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .expect("the first event did not arrive while the provider held the stream open: airlock buffers")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            received.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(!received.contains("second"));
    s.mock.open_gate();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), frames.next())
        .await
        .unwrap()
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(received.contains("data: second"), "{received}");
}

#[tokio::test]
async fn large_bodies_stream_through_in_bounded_memory() {
    use futures_util::StreamExt;
    use http_body_util::{BodyStream, StreamBody};

    let s = setup().await;
    let scope =
        json!([{"provider": "openai", "methods": ["GET", "POST"], "paths": ["/upload", "/bytes"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let baseline = s.airlock.peak_rss_kib();
    const SIZE: u64 = 512 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;

    // Upload: a generated stream, never held whole by the client either.
    let chunks = futures_util::stream::iter((0..SIZE / CHUNK as u64).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'x';
            CHUNK
        ])))
    }));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = hyper::Request::post(format!("{}/openai/upload", s.airlock.proxy_url()))
        .header("authorization", bearer(&token))
        .header("content-length", SIZE.to_string())
        .body(StreamBody::new(chunks))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(120), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["received"], SIZE);

    // Download.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = hyper::Request::get(format!("{}/openai/bytes?n={SIZE}", s.airlock.proxy_url()))
        .header("authorization", bearer(&token))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut frames = BodyStream::new(response.into_body());
    let mut total = 0u64;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), frames.next())
        .await
        .unwrap()
    {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
        }
    }
    assert_eq!(total, SIZE);

    let grown_mib = s.airlock.peak_rss_kib().saturating_sub(baseline) / 1024;
    assert!(
        grown_mib < 64,
        "peak RSS grew by {grown_mib} MiB while moving 2 x 512 MiB"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_and_redirects_not_followed() {
    let s = setup().await;
    let scope =
        json!([{"provider": "openai", "methods": ["GET"], "paths": ["/echo", "/redirect"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let answer = raw(
        &s.airlock.proxy_url(),
        format!(
            "GET /openai/echo HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {token}\r\n\
             Connection: close, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             Proxy-Authorization: Basic Zm9v\r\nUpgrade: websocket\r\nX-Kept: yes\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let req = &s.mock.requests()[0];
    for h in [
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(req.header(h).is_none(), "{h} was forwarded");
    }
    assert_eq!(req.header("x-kept").unwrap(), "yes");
    assert_eq!(req.header("host").unwrap(), s.mock.addr().to_string());

    let reply = call(
        "GET",
        &format!("{}/openai/redirect", s.airlock.proxy_url()),
        &token,
    )
    .await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.headers["location"], "http://example.invalid/stolen");
    assert_eq!(s.mock.request_count(), 2);
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    // An upstream that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    // A port with nothing listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);

    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("slow", &silent_url, "bearer", "k1-slow-key", "")
        .provider("down", &closed_url, "bearer", "k2-down-key", "")
        .proxy_option("upstream_timeout = \"1s\"")
        .start()
        .await
        .unwrap();
    let scope = json!([
        {"provider": "slow", "methods": ["GET"], "paths": ["/**"]},
        {"provider": "down", "methods": ["GET"], "paths": ["/**"]}
    ]);
    let (_, token) = session(&airlock, scope, json!({})).await;
    let reply = call("GET", &format!("{}/down/x", airlock.proxy_url()), &token).await;
    assert_error(&reply, 502, "upstream_error");
    assert!(!reply.text().contains("k2-down-key"));
    let reply = call("GET", &format!("{}/slow/x", airlock.proxy_url()), &token).await;
    assert_error(&reply, 504, "upstream_timeout");
    holder.abort();
}

#[tokio::test]
async fn sessions_survive_a_restart() {
    let mock = MockProvider::start().await;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
            .dir(dir.path().to_path_buf())
            .start()
    };
    let mut first = start().await.unwrap();
    let (id, token) = session(&first, chat_scope(), json!({})).await;
    let (revoked_id, revoked_token) = session(&first, chat_scope(), json!({})).await;
    first
        .admin("DELETE", &format!("/v1/sessions/{revoked_id}"), None)
        .await
        .unwrap();
    let status = first.terminate().await.unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let second = start().await.unwrap();
    let s = Setup {
        mock,
        airlock: second,
    };
    assert_eq!(chat(&s, &token).await.status, 200);
    assert_error(&chat(&s, &revoked_token).await, 401, "invalid_token");
    let (_, view) = s
        .airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(view["state"], "active");

    // Only the hash of a token is stored.
    let db = std::fs::read(dir.path().join("airlock.db")).unwrap();
    let wal = std::fs::read(dir.path().join("airlock.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&token),
            "a session token is stored in plain text"
        );
        assert!(
            !text.contains(OPENAI_KEY),
            "the credential is stored in plain text"
        );
    }
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .proxy_option("max_request_body = \"1KiB\"")
        .start()
        .await
        .unwrap();
    let scope = json!([{"provider": "openai", "methods": ["POST"], "paths": ["/upload"]}]);
    let (_, token) = session(&airlock, scope, json!({})).await;
    let host = airlock.proxy_url().trim_start_matches("http://").to_owned();
    let chunk = "a".repeat(512);
    let mut raw_request = format!(
        "POST /openai/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..8 {
        raw_request.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    raw_request.push_str("0\r\n\r\n");
    let answer = raw(&airlock.proxy_url(), raw_request.as_bytes()).await;
    assert_eq!(raw_status(&answer), 413, "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // The provider had the head and part of the body: the record says the
    // call was cut, not refused before it left.
    let (_, audit) = airlock
        .admin("GET", "/v1/audit?limit=10", None)
        .await
        .unwrap();
    assert_eq!(
        audit["records"][0]["decision"], "payload_too_large",
        "{audit}"
    );
    assert_eq!(
        audit["records"][0]["flags"],
        json!(["incomplete"]),
        "{audit}"
    );
    // Within the limit, a chunked body goes through.
    let mut small = format!(
        "POST /openai/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    small.push_str(&format!("200\r\n{chunk}\r\n0\r\n\r\n"));
    let answer = raw(&airlock.proxy_url(), small.as_bytes()).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
}

/// An agent that stops sending its body before its declared end gets a
/// 400 of its own, not a 502 blaming the provider; the record says so.
#[tokio::test]
async fn a_body_the_agent_cuts_short_is_its_400() {
    use tokio::io::AsyncWriteExt;

    let s = setup().await;
    let scope = json!([{"provider": "openai", "methods": ["POST"], "paths": ["/upload"]}]);
    let (_, token) = session(&s.airlock, scope, json!({})).await;
    let host = s
        .airlock
        .proxy_url()
        .trim_start_matches("http://")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
    let head = format!(
        "POST /openai/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 100\r\n\r\nhello"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let answer = airlock_testkit::hostile::read_response(stream, Duration::from_secs(10)).await;
    assert_eq!(answer.status, Some(400), "{}", answer.raw);
    assert_eq!(
        answer.error_code().as_deref(),
        Some("bad_request"),
        "{}",
        answer.raw
    );

    let (_, audit) = s
        .airlock
        .admin("GET", "/v1/audit?limit=10", None)
        .await
        .unwrap();
    let record = &audit["records"][0];
    assert_eq!(record["decision"], "bad_request", "{audit}");
    assert_eq!(record["flags"], json!(["client_aborted"]), "{audit}");
}

/// Thread names of a running process (Linux).
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let comm = task.unwrap().path().join("comm");
            std::fs::read_to_string(comm).unwrap().trim().to_owned()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn proxy_workers_each_serve_calls_with_the_real_credential() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .proxy_option("workers = 4")
        .start()
        .await
        .unwrap();
    let workers: Vec<String> = thread_names(airlock.pid())
        .into_iter()
        .filter(|name| name.starts_with("airlock-proxy-"))
        .collect();
    assert_eq!(
        workers,
        [
            "airlock-proxy-0",
            "airlock-proxy-1",
            "airlock-proxy-2",
            "airlock-proxy-3"
        ]
    );

    let s = Setup { mock, airlock };
    let (_, token) = session(&s.airlock, chat_scope(), json!({})).await;
    // Each call on a connection of its own: the workers share the listener.
    let calls = (0..32).map(|_| chat(&s, &token));
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 32);
    for req in &seen {
        assert_eq!(
            req.header("authorization").unwrap(),
            format!("Bearer {OPENAI_KEY}")
        );
        assert!(
            !req.contains(&token),
            "the session token reached the provider"
        );
    }
}

/// The call id on airlock's own answers: both SDKs' headers, one value.
fn airlock_request_id(reply: &Reply) -> String {
    let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(reply.headers["request-id"], id.as_str());
    let digits = id
        .strip_prefix("airlock_")
        .unwrap_or_else(|| panic!("{id}"));
    assert_eq!(digits.len(), 16, "{id}");
    assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    id
}

/// airlock's own answers carry the call's id where the OpenAI and
/// Anthropic SDKs read a request id (`x-request-id`, `request-id`: round
/// 39 saw `request_id` None on every airlock error), and the call's log
/// line names the same id, so an agent's error leads to its line. A
/// provider's answer keeps the provider's id and gets none of airlock's.
#[tokio::test]
async fn airlock_answers_carry_the_id_of_their_log_line() {
    let s = setup().await;
    let (_, token) = session(
        &s.airlock,
        json!([
            {"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]},
            {"provider": "openai", "methods": ["GET"], "paths": ["/status/*"]}
        ]),
        json!({}),
    )
    .await;
    let url = |path: &str| format!("{}/openai{path}", s.airlock.proxy_url());

    let tokenless = request("POST", &url("/v1/chat/completions"), &[], "{}").await;
    assert_error(&tokenless, 401, "invalid_token");
    let first = airlock_request_id(&tokenless);
    let line = s.airlock.wait_for_output(&first, 0).await;
    assert!(
        line.contains("airlock::call") && line.contains("status=401"),
        "{line}"
    );
    // No session, no provider's id: the fields are left out, not `-`.
    assert!(line.contains("provider=openai"), "{line}");
    assert!(
        !line.contains("session=") && !line.contains("upstream_request_id") && !line.contains("=-"),
        "{line}"
    );

    let outside = call("DELETE", &url("/v1/files/f1"), &token).await;
    assert_error(&outside, 403, "out_of_scope");
    let second = airlock_request_id(&outside);
    assert_ne!(first, second);
    let line = s.airlock.wait_for_output(&second, 0).await;
    assert!(line.contains("path=/openai/v1/files/f1"), "{line}");

    // The provider refused (its id relayed); airlock's id is only in its log.
    let relayed = call("GET", &url("/status/400"), &token).await;
    assert_eq!(relayed.status, 400, "{}", relayed.text());
    assert_eq!(relayed.headers["x-request-id"], MOCK_REQUEST_ID);
    assert!(relayed.headers.get("request-id").is_none());
    let line = s
        .airlock
        .wait_for_output("path=/openai/status/400", 0)
        .await;
    assert!(line.contains("request_id=airlock_"), "{line}");
    // The provider's id is in the line too: the agent's id leads there.
    assert!(
        line.contains(&format!("upstream_request_id={MOCK_REQUEST_ID}")),
        "{line}"
    );

    // A provider's 401 is airlock's 502, under airlock's id, not the provider's.
    let rejected = call("GET", &url("/status/401"), &token).await;
    assert_error(&rejected, 502, "upstream_auth_failed");
    let third = airlock_request_id(&rejected);
    assert_ne!(third, MOCK_REQUEST_ID);
    s.airlock.wait_for_output(&third, 0).await;

    // An answer the provider gave without an id gets none.
    let allowed = chat(&s, &token).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert!(allowed.headers.get("x-request-id").is_none());
    assert!(allowed.headers.get("request-id").is_none());
    assert_eq!(s.mock.request_count(), 3);
}
