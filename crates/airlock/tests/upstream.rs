//! End-to-end tests of airlock's upstream connections: the real `airlock`
//! binary on port 0, with one data-plane worker so that every call shares
//! one connection pool, in front of a recording mock provider that counts
//! the connections it accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use airlock_testkit::client::{first_frame, request, Reply};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use serde_json::json;

const KEY: &str = "sk-real-upstream-0123456789";

async fn setup() -> (MockProvider, Airlock, String) {
    setup_with(|builder| builder).await
}

/// [`setup`] with more of the config: `configure` gets the builder after
/// the provider's table.
async fn setup_with(
    configure: impl FnOnce(AirlockBuilder) -> AirlockBuilder,
) -> (MockProvider, Airlock, String) {
    let mock = MockProvider::start().await;
    let builder = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", KEY, "/v1")
        .proxy_option("workers = 1");
    let airlock = configure(builder).start().await.unwrap();
    let scope = json!([
        {"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]},
        {"provider": "openai", "methods": ["GET"], "paths": ["/status/*", "/close", "/gated-sse"]},
    ]);
    let session = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 300}))
        .await
        .unwrap();
    let token = session["token"].as_str().unwrap().to_owned();
    (mock, airlock, token)
}

async fn chat(airlock: &Airlock, token: &str) -> Reply {
    request(
        "POST",
        &format!("{}/openai/v1/chat/completions", airlock.proxy_url()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        r#"{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
}

async fn get(airlock: &Airlock, token: &str, path: &str) -> Reply {
    request(
        "GET",
        &format!("{}/openai{path}", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

/// Every recorded request carried the real credential and not the token.
fn assert_credentials(mock: &MockProvider, token: &str, calls: usize) {
    let seen = mock.requests();
    assert_eq!(seen.len(), calls);
    for request in &seen {
        assert_eq!(
            request.header("authorization").unwrap(),
            format!("Bearer {KEY}")
        );
        assert!(!request.contains(token));
        // HTTP/1 requests name the upstream in origin form, with `Host`.
        assert!(request.path_and_query.starts_with('/'), "{request:?}");
        assert_eq!(request.header("host").unwrap(), mock.addr().to_string());
    }
}

#[tokio::test]
async fn calls_one_after_another_share_one_upstream_connection() {
    let (mock, airlock, token) = setup().await;
    for _ in 0..4 {
        let reply = chat(&airlock, &token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Bodiless answers give their connection back as well.
    for _ in 0..3 {
        let reply = get(&airlock, &token, "/status/204").await;
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    assert_credentials(&mock, &token, 7);
    assert_eq!(mock.connections(), 1);
}

#[tokio::test]
async fn a_provider_that_closes_its_connections_gets_a_new_one_per_call() {
    let (mock, airlock, token) = setup().await;
    for _ in 0..3 {
        let reply = get(&airlock, &token, "/close").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["closing"], true);
        // airlock's own connection to the agent stays its own business.
        assert_eq!(reply.headers.get("connection"), None);
    }
    let reply = chat(&airlock, &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_credentials(&mock, &token, 4);
    assert_eq!(mock.connections(), 4);
}

#[tokio::test]
async fn a_stream_the_agent_abandons_takes_its_connection_along() {
    let (mock, airlock, token) = setup().await;
    let reply = chat(&airlock, &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(mock.connections(), 1);

    // A stream read halfway, then dropped: its connection still owes the
    // rest of the body, so it must not serve another call.
    let url = format!("{}/openai/gated-sse", airlock.proxy_url());
    let (first, body) = first_frame(&url, &token).await;
    assert_eq!(&first[..], b"data: first\n\n");
    drop(body);

    // The next calls open one new connection and share it: the stream's
    // connection, the only one there was, is never lent again.
    for _ in 0..2 {
        let reply = chat(&airlock, &token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_credentials(&mock, &token, 4);
    assert_eq!(mock.connections(), 2);
}

/// A provider's `keepalive_timeout` bounds how long airlock keeps an idle
/// connection to it: the connection is closed (the default keeps it for
/// 90 s) and the next call opens another.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_the_keepalive_timeout() {
    let (mock, airlock, token) =
        setup_with(|builder| builder.provider_option(r#"keepalive_timeout = "1s""#)).await;
    assert_eq!(chat(&airlock, &token).await.status, 200);
    assert_eq!(mock.connections(), 1);
    assert!(
        mock.wait_for_ended_connections(1, Duration::from_secs(10))
            .await,
        "the idle upstream connection is still open"
    );
    assert_eq!(chat(&airlock, &token).await.status, 200);
    assert_eq!(mock.connections(), 2);
    assert_credentials(&mock, &token, 2);
}
