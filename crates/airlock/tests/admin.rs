//! End-to-end tests of the admin API and the `airlock` CLI against a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::Duration;

use airlock_testkit::client::request;
use airlock_testkit::hostile::{self, exchange};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

async fn start(mock: &MockProvider) -> Airlock {
    AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", "sk-real-1", "/v1")
        .provider("anthropic", &mock.url(), "header:x-api-key", "sk-ant-1", "")
        .config("[sessions]\nmax_ttl = \"1h\"\n")
        .start()
        .await
        .unwrap()
}

fn valid_body() -> Value {
    json!({
        "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]}],
        "ttl_seconds": 900,
        "labels": {"agent": "a1"},
        "limits": {"requests_per_minute": 60, "max_requests": 1000, "max_denied": 3}
    })
}

#[tokio::test]
async fn create_show_list_revoke() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let scope = json!([
        {"provider": "openai", "methods": ["POST"], "paths": ["/v1/chat/completions"]},
        {"provider": "anthropic", "methods": ["POST"], "paths": ["/v1/messages"]}
    ]);
    let mut body = valid_body();
    body["scope"] = scope.clone();
    let created = airlock.create_session(body).await.unwrap();
    let id = created["id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    assert!(id.starts_with("ses_"));
    assert!(token.starts_with("sess_") && token.len() >= 5 + 43);
    assert_eq!(created["scope"], scope);
    assert_eq!(
        created["limits"],
        json!({"requests_per_minute": 60, "max_requests": 1000, "max_denied": 3})
    );
    assert_eq!(created["labels"], json!({"agent": "a1"}));
    assert_eq!(created["state"], "active");
    // Times have a fixed width: milliseconds always, UTC.
    for field in ["created_at", "expires_at"] {
        let at = created[field].as_str().unwrap();
        assert_eq!(at.len(), "2026-01-02T03:04:05.678Z".len(), "{field}: {at}");
        assert!(
            at.ends_with('Z') && at.as_bytes()[19] == b'.',
            "{field}: {at}"
        );
    }
    assert_eq!(
        created["env"],
        json!({
            "OPENAI_API_KEY": token,
            "OPENAI_BASE_URL": format!("{}/openai/v1", airlock.proxy_url()),
            "ANTHROPIC_API_KEY": token,
            "ANTHROPIC_BASE_URL": format!("{}/anthropic", airlock.proxy_url()),
        })
    );
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));

    let (status, shown) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        shown.get("token").is_none(),
        "show must never return the token"
    );
    assert_eq!(shown["calls"], json!({"allowed": 0, "denied": 0}));
    for key in [
        "created_at",
        "expires_at",
        "scope",
        "limits",
        "labels",
        "state",
    ] {
        assert!(shown.get(key).is_some(), "{key} missing: {shown}");
    }

    let (_, list) = airlock.admin("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(token));

    let (status, _) = airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, list) = airlock.admin("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(list["sessions"], json!([]));
    for all in ["all=true", "all=1"] {
        let (_, list) = airlock
            .admin("GET", &format!("/v1/sessions?{all}"), None)
            .await
            .unwrap();
        assert_eq!(list["sessions"][0]["state"], "revoked", "{all}");
    }
    let (_, list) = airlock
        .admin("GET", "/v1/sessions?all=0", None)
        .await
        .unwrap();
    assert_eq!(list["sessions"], json!([]));

    let (status, _) = airlock
        .admin("GET", "/v1/sessions/ses_doesnotexist", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = airlock
        .admin("DELETE", "/v1/sessions/ses_doesnotexist", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn bad_session_requests_get_400_saying_what_is_wrong() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let with = |pointer: &str, value: Value| {
        let mut body = valid_body();
        *body.pointer_mut(pointer).unwrap() = value;
        body
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with("/scope/0/provider", json!("nope")),
            "unknown provider \"nope\"",
        ),
        (with("/scope/0/methods", json!(["FETCH"])), "FETCH"),
        (with("/scope/0/methods", json!(["post"])), "\"post\""),
        (with("/scope/0/methods", json!([])), "at least one method"),
        (
            with("/scope/0/paths", json!(["v1/chat"])),
            "must start with '/'",
        ),
        (with("/scope/0/paths", json!([])), "at least one path"),
        (
            with("/scope/0/paths", json!(["/v1/../admin"])),
            "'.' or '..'",
        ),
        (with("/scope", json!([])), "at least one rule"),
        (with("/ttl_seconds", json!(-5)), "ttl_seconds"),
        (
            with("/ttl_seconds", json!(0)),
            "ttl_seconds must be between 1 and 3600",
        ),
        (
            with("/ttl_seconds", json!(3601)),
            "ttl_seconds must be between 1 and 3600",
        ),
        (with("/ttl_seconds", json!(1e30)), "ttl_seconds"),
        (with("/ttl_seconds", json!("15m")), "ttl_seconds"),
        (
            with("/limits/requests_per_minute", json!(0)),
            "requests_per_minute",
        ),
        (with("/limits/max_denied", json!(-1)), "max_denied"),
        (with("/labels", json!({"bad key": "v"})), "label key"),
        (with("/labels", json!({"owner": "a\u{1b}[31m"})), "control"),
        // Shown as something else than it holds: right-to-left override,
        // zero-width space, line separator.
        (
            with("/labels", json!({"owner": "\u{202e}gnp.exe"})),
            "format",
        ),
        (with("/labels", json!({"owner": "ad\u{200b}min"})), "format"),
        (
            with("/labels", json!({"owner": "a\u{2028}b"})),
            "line-separator",
        ),
        (
            with("/labels", json!({"owner": "a\u{e000}b"})),
            "private-use",
        ),
        // serde would read a struct's fields from an array, by position.
        (with("/limits", json!([5, 1, 2])), "limits: invalid type"),
        (with("/limits", json!([])), "limits: invalid type"),
        (
            with("/scope/0", json!(["openai", ["POST"], ["/v1/chat"]])),
            "scope[0]: invalid type",
        ),
        (json!({"scope": valid_body()["scope"]}), "ttl_seconds"),
        (json!({"ttl_seconds": 60}), "scope"),
        (
            {
                let mut b = valid_body();
                b["extra"] = json!(1);
                b
            },
            "unknown field `extra`",
        ),
        (json!("not an object"), "invalid session request"),
        (
            {
                let mut b = valid_body();
                let rule = b["scope"][0].clone();
                b["scope"] = Value::Array(vec![rule; 257]);
                b
            },
            "scope holds 257 rules; at most 256",
        ),
        (
            with(
                "/scope/0/paths",
                json!((0..1025).map(|i| format!("/v1/p{i}")).collect::<Vec<_>>()),
            ),
            "scope holds 1025 paths in all; at most 1024",
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = airlock
            .admin("POST", "/v1/sessions", Some(body.clone()))
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(want),
            "{body}\n  message: {message}\n  want: {want}"
        );
    }
    // Not JSON at all.
    let reply = request(
        "POST",
        &format!("{}/v1/sessions", airlock.admin_url()),
        &[(
            "authorization",
            &format!("Bearer {}", airlock.admin_token()),
        )],
        "{not json",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code().as_deref(), Some("bad_request"));
    // Still healthy.
    airlock.create_session(valid_body()).await.unwrap();
    // Letters of any script are labels' own.
    airlock
        .create_session(with("/labels", json!({"team": "équipe 日本"})))
        .await
        .unwrap();
}

/// `GET /v1/sessions` pages: 25 sessions by 10 are 10, 10, 5, and only
/// the last page has no `next`; every session once, newest first.
#[tokio::test]
async fn sessions_are_listed_a_page_at_a_time() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let mut created = Vec::new();
    for _ in 0..25 {
        let session = airlock.create_session(valid_body()).await.unwrap();
        created.push(session["id"].as_str().unwrap().to_owned());
    }
    let revoked = [&created[3], &created[11], &created[20]];
    for id in revoked {
        let (status, _) = airlock
            .admin("DELETE", &format!("/v1/sessions/{id}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200);
    }

    let pages = |query: &'static str| {
        let airlock = &airlock;
        async move {
            let mut pages: Vec<Vec<Value>> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    Some(cursor) => format!("/v1/sessions?{query}&after={cursor}"),
                    None => format!("/v1/sessions?{query}"),
                };
                let (status, body) = airlock.admin("GET", &path, None).await.unwrap();
                assert_eq!(status, 200, "{path}: {body}");
                pages.push(body["sessions"].as_array().unwrap().clone());
                match body.get("next") {
                    None => return pages,
                    Some(next) => {
                        let next = next.as_str().unwrap().to_owned();
                        assert!(next
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                        assert_ne!(after.as_ref(), Some(&next), "{path}: the same cursor again");
                        after = Some(next);
                    }
                }
                assert!(pages.len() < 10, "no end of pages");
            }
        }
    };
    let ids = |sessions: &[Value]| -> Vec<String> {
        sessions
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let newest_first = |sessions: &[Value]| {
        let times: Vec<&str> = sessions
            .iter()
            .map(|s| s["created_at"].as_str().unwrap())
            .collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    };

    let all = pages("all=true&limit=10").await;
    assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let listed = all.concat();
    newest_first(&listed);
    // Sessions made in the same millisecond may come in either order:
    // compared as sets, with the order checked by created_at above.
    let mut got = ids(&listed);
    got.sort();
    let mut want = created.clone();
    want.sort();
    assert_eq!(got, want, "every session exactly once");
    let states = listed.iter().filter(|s| s["state"] == "revoked").count();
    assert_eq!(states, 3);

    // The default page holds them all; a page of exactly the rest has no
    // next.
    let (status, body) = airlock
        .admin("GET", "/v1/sessions?all=true", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["sessions"].as_array().unwrap().len(), 25);
    assert!(body.get("next").is_none(), "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1);
    assert_eq!(ids(body["sessions"].as_array().unwrap()), ids(&listed));
    let twenty_five = pages("all=1&limit=25").await;
    assert_eq!(twenty_five.iter().map(Vec::len).collect::<Vec<_>>(), [25]);
    let at_max = pages("all=true&limit=10000").await;
    assert_eq!(at_max.concat().len(), 25);

    // Active only: 22, the revoked ones left out, in the same order.
    let active = pages("limit=10").await;
    assert_eq!(active.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 2]);
    let active = ids(&active.concat());
    let expected: Vec<String> = ids(&listed)
        .into_iter()
        .filter(|id| !revoked.contains(&id))
        .collect();
    assert_eq!(active, expected);
    let (_, body) = airlock.admin("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(ids(body["sessions"].as_array().unwrap()), expected);

    // Refusals: 400, JSON, naming what is wrong.
    let cursor_of_first_page = {
        let (_, body) = airlock
            .admin("GET", "/v1/sessions?all=true&limit=10", None)
            .await
            .unwrap();
        body["next"].as_str().unwrap().to_owned()
    };
    for (query, names) in [
        ("all=true&limit=0", "limit"),
        ("all=true&limit=10001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("all=true&after=garbage", "after"),
        ("after=", "after"),
        ("after=bm90LWEta2V5", "after"),
        (&*format!("after={cursor_of_first_page}x"), "after"),
        ("all=true&offset=10", "offset"),
        ("all=true&page=2", "page"),
    ] {
        let path = format!("/v1/sessions?{query}");
        let (status, body) = airlock.admin("GET", &path, None).await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{path}: {message}");
    }
    // A cursor is good for either listing: the active sessions after the
    // tenth of all.
    let (status, body) = airlock
        .admin(
            "GET",
            &format!("/v1/sessions?after={cursor_of_first_page}&limit=100"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let after_tenth: Vec<String> = ids(&listed[10..])
        .into_iter()
        .filter(|id| !revoked.contains(&id))
        .collect();
    assert_eq!(ids(body["sessions"].as_array().unwrap()), after_tenth);
}

#[tokio::test]
async fn admin_token_is_required_except_for_healthz() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let base = airlock.admin_url();
    let reply = request("GET", &format!("{base}/healthz"), &[], "").await;
    assert_eq!(reply.status, 200);
    for (method, path) in [
        ("GET", "/v1/sessions"),
        ("POST", "/v1/sessions"),
        ("GET", "/metrics"),
        ("DELETE", "/v1/sessions/ses_x"),
        // Which version runs is no one's business but the operator's.
        ("GET", "/v1/server"),
        // A route there is not: nothing said about it without the token.
        ("GET", "/v1/nothing"),
    ] {
        for headers in [
            vec![],
            vec![("authorization", "Bearer wrong")],
            vec![("authorization", "adm_x")],
        ] {
            let reply = request(method, &format!("{base}{path}"), &headers, "").await;
            assert_eq!(reply.status, 401, "{method} {path} {headers:?}");
            assert_eq!(reply.error_code().as_deref(), Some("unauthorized"));
        }
    }
    let (status, answer) = airlock.admin("GET", "/v1/nothing", None).await.unwrap();
    assert_eq!(status, 404, "{answer}");

    // Every refusal is counted by reason (no bearer token: 12; a wrong one:
    // 6), and the first is logged with the client's address, never with
    // the token it tried.
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap();
    for line in [
        "airlock_admin_auth_failures_total{reason=\"missing\"} 12",
        "airlock_admin_auth_failures_total{reason=\"invalid\"} 6",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let warning = loop {
        let output = airlock.output();
        if let Some(line) = output
            .lines()
            .find(|l| l.contains("admin API request refused"))
        {
            break line.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warning logged:\n{output}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        warning.contains("WARN") && warning.contains("peer=127.0.0.1:"),
        "{warning}"
    );
    // The warnings are spaced (at most one per 10 s): twelve refusals in
    // a row make one line.
    assert_eq!(
        airlock
            .output()
            .matches("admin API request refused")
            .count(),
        1
    );
    assert!(!airlock.output().contains("Bearer wrong"));
}

/// `null` for the optional `limits` and `labels` means what leaving them
/// out means (clients that serialise a `None` send it).
#[tokio::test]
async fn null_limits_and_labels_are_left_out() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let mut body = valid_body();
    body["limits"] = Value::Null;
    body["labels"] = Value::Null;
    let created = airlock.create_session(body).await.unwrap();
    assert_eq!(created["limits"], json!({}), "{created}");
    assert_eq!(created["labels"], json!({}), "{created}");
}

/// What axum refuses before a handler runs is JSON like every other error.
#[tokio::test]
async fn refusals_before_a_handler_are_json_too() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let base = airlock.admin_url();
    let auth = format!("Bearer {}", airlock.admin_token());
    let huge = "x".repeat(3 * 1024 * 1024);
    for (method, path, body, status, code) in [
        ("PATCH", "/v1/sessions", "", 405, "method_not_allowed"),
        ("PUT", "/v1/audit", "", 405, "method_not_allowed"),
        ("GET", "/v1/sessions/%FF", "", 400, "bad_request"),
        ("GET", "/v1/sessions?all=yes", "", 400, "bad_request"),
        (
            "POST",
            "/v1/sessions",
            huge.as_str(),
            413,
            "payload_too_large",
        ),
    ] {
        let reply = request(
            method,
            &format!("{base}{path}"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_owned(),
        )
        .await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.text());
        assert_eq!(
            reply.headers["content-type"], "application/json",
            "{method} {path}"
        );
        assert_eq!(
            reply.error_code().as_deref(),
            Some(code),
            "{}",
            reply.text()
        );
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!message.is_empty(), "{method} {path}");
        if status == 405 {
            assert!(reply.headers.contains_key("allow"), "{method} {path}");
        }
    }
    // Still healthy.
    airlock.create_session(valid_body()).await.unwrap();
}

/// Longest a test waits for an answer or a close that should come at once
/// (or after a 1 s timeout): generous for a loaded machine.
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// The admin listener gives a client `header_read_timeout` (the proxy's
/// setting) to send a complete head, before any authentication: a client
/// that sends nothing, one that sends part of a head and stops, and a
/// keep-alive connection left idle are all closed. They were kept open
/// for as long as the client liked.
#[tokio::test]
async fn admin_listener_closes_silent_slow_and_idle_clients() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", "sk-real-1", "/v1")
        .proxy_option(r#"header_read_timeout = "1s""#)
        .start()
        .await
        .unwrap();
    let url = airlock.admin_url();
    let addr = hostile::authority(&url).to_owned();

    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut partial = exchange(
        &url,
        b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\n",
        Duration::from_millis(100),
    )
    .await;
    assert!(partial.timed_out, "answered a partial head: {partial:?}");
    let mut idle = exchange(
        &url,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        CASE_LIMIT,
    )
    .await;
    assert_eq!(idle.status, Some(200), "{idle:?}");
    assert!(!idle.closed, "keep-alive connection closed after its call");

    assert!(
        hostile::closes_within(&mut silent, CASE_LIMIT).await,
        "silent client kept"
    );
    assert!(partial.closes_within(CASE_LIMIT).await, "partial head kept");
    assert!(
        idle.closes_within(CASE_LIMIT).await,
        "idle keep-alive connection kept"
    );
    // The listener still serves.
    let reply = request("GET", &format!("{url}/healthz"), &[], "").await;
    assert_eq!(reply.status, 200);
}

/// At most `ServeSettings::max_connections` admin connections are open;
/// one more is answered 503 `overloaded` (the admin API's JSON error) and
/// closed, and a slot freed is taken again.
#[tokio::test]
async fn admin_connections_over_the_limit_get_503() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let url = airlock.admin_url();
    let call = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let limit = airlock_admin::ServeSettings::default().max_connections;
    // Idle connections, each proven accepted (and holding its slot) by a
    // call answered on it, until one is refused.
    let mut held = Vec::new();
    let mut refused = loop {
        let mut ex = exchange(&url, call, CASE_LIMIT).await;
        match ex.status {
            Some(200) => held.push(ex.stream.take().expect("kept alive")),
            Some(503) => break ex,
            _ => panic!("connection {}: {ex:?}", held.len() + 1),
        }
        assert!(held.len() <= limit, "more than {limit} connections served");
    };
    // One slot may still be held by a connection of the harness's start-up
    // checks the server has not seen close yet.
    assert!((limit - 1..=limit).contains(&held.len()), "{}", held.len());
    assert_eq!(refused.error_code().as_deref(), Some("overloaded"));
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert!(refused.closes_within(CASE_LIMIT).await);

    // A connection closed gives its slot back (once the server has seen it
    // go: polled, each attempt answered at once).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + CASE_LIMIT;
    loop {
        let ex = exchange(&url, call, CASE_LIMIT).await;
        match ex.status {
            Some(200) => break,
            Some(503) => assert!(tokio::time::Instant::now() < deadline, "slot never freed"),
            _ => panic!("{ex:?}"),
        }
    }
}

/// A body declared over the admin API's limit is refused at once with 413
/// in the API's JSON shape, without waiting for the body (the request used
/// to hang, waiting for 99,999,999,999 bytes that never came). Without the
/// admin token it is a 401 as before.
#[tokio::test]
async fn a_declared_oversize_body_is_refused_at_once() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let url = airlock.admin_url();
    let head = |auth: &str| {
        format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: 99999999999\r\n\r\n"
        )
    };
    let auth = format!("Authorization: Bearer {}\r\n", airlock.admin_token());
    let ex = exchange(&url, head(&auth).as_bytes(), CASE_LIMIT).await;
    assert!(!ex.timed_out, "no answer without the body: {ex:?}");
    assert_eq!(ex.status, Some(413), "{ex:?}");
    assert_eq!(ex.header("content-type"), Some("application/json"));
    assert_eq!(
        ex.error_code().as_deref(),
        Some("payload_too_large"),
        "{ex:?}"
    );

    // Just over the limit is refused too; at the limit the body is read.
    let max = airlock_admin::MAX_BODY;
    let just_over = head(&auth).replace("99999999999", &(max + 1).to_string());
    let ex = exchange(&url, just_over.as_bytes(), CASE_LIMIT).await;
    assert_eq!(ex.status, Some(413), "{ex:?}");
    let at_limit = head(&auth).replace("99999999999", &max.to_string());
    let ex = exchange(&url, at_limit.as_bytes(), Duration::from_millis(500)).await;
    assert!(
        ex.timed_out,
        "a body within the limit was not waited for: {ex:?}"
    );

    let ex = exchange(&url, head("").as_bytes(), CASE_LIMIT).await;
    assert_eq!(ex.status, Some(401), "{ex:?}");
    // Still healthy.
    airlock.create_session(valid_body()).await.unwrap();
}

#[tokio::test]
async fn metrics_count_calls_by_provider_and_decision() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let created = airlock.create_session(valid_body()).await.unwrap();
    let token = created["token"].as_str().unwrap();
    let url = format!("{}/openai/v1/chat/completions", airlock.proxy_url());
    let auth = format!("Bearer {token}");
    assert_eq!(
        request("POST", &url, &[("authorization", &auth)], "{}")
            .await
            .status,
        200
    );
    assert_eq!(
        request("GET", &url, &[("authorization", &auth)], "")
            .await
            .status,
        403
    );
    assert_eq!(request("POST", &url, &[], "").await.status, 401);
    let (status, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    for line in [
        "airlock_proxy_calls_total{provider=\"openai\",decision=\"allow\"} 1",
        "airlock_proxy_calls_total{provider=\"openai\",decision=\"out_of_scope\"} 1",
        "airlock_proxy_calls_total{provider=\"openai\",decision=\"invalid_token\"} 1",
        "airlock_sessions_created_total 1",
        "airlock_proxy_response_seconds_bucket{",
        "airlock_audit_commit_seconds_bucket{le=",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // Every call's record was committed before its answer completed, in
    // at least one timed commit.
    let metric = |name: &str| {
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert!(metric("airlock_audit_records_written_total") >= 3.0);
    assert!(metric("airlock_audit_commit_seconds_count") >= 1.0);
    assert!(
        metric("airlock_audit_commit_seconds_count") == metric("airlock_audit_batches_total"),
        "one timing per commit"
    );
    assert!(!text.contains(token) && !text.contains("sk-real-1"));

    // Prometheus' classic text format unless OpenMetrics is asked for
    // (as Prometheus asks): the same samples, a counter's HELP and TYPE
    // named as its samples are, no `# EOF`.
    let metrics_url = format!("{}/metrics", airlock.admin_url());
    let admin_auth = format!("Bearer {}", airlock.admin_token());
    let classic = request("GET", &metrics_url, &[("authorization", &admin_auth)], "").await;
    assert_eq!(
        classic.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(classic.headers["vary"], "accept");
    let classic = classic.text();
    assert!(
        classic.contains("\n# TYPE airlock_proxy_calls_total counter\n"),
        "{classic}"
    );
    assert!(!classic.contains("# EOF"), "{classic}");
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let openmetrics = request(
        "GET",
        &metrics_url,
        &[
            ("authorization", &admin_auth),
            ("accept", prometheus_accept),
        ],
        "",
    )
    .await;
    assert_eq!(
        openmetrics.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let openmetrics = openmetrics.text();
    assert!(
        openmetrics.contains("\n# TYPE airlock_proxy_calls counter\n"),
        "{openmetrics}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    let samples = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("airlock_proxy_calls_total"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(samples(&classic), samples(&openmetrics));
}

#[tokio::test]
async fn generated_admin_token_is_printed_once_and_only_its_hash_kept() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        AirlockBuilder::new(BIN)
            .env("AIRLOCK_ADMIN_TOKEN", "")
            .dir(dir.path().to_path_buf())
            .start()
    };
    let mut first = start().await.unwrap();
    let output = first.output();
    let token = output
        .split("AIRLOCK_ADMIN_TOKEN=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the generated admin token is printed")
        .to_owned();
    let reply = list_sessions_with(&first.admin_url(), &token).await;
    assert_eq!(reply.status, 200);
    first.terminate().await.unwrap();

    let second = start().await.unwrap();
    assert!(
        !second.output().contains("AIRLOCK_ADMIN_TOKEN="),
        "printed again"
    );
    let reply = list_sessions_with(&second.admin_url(), &token).await;
    assert_eq!(reply.status, 200, "the stored hash still admits the token");
    let db = std::fs::read(dir.path().join("airlock.db")).unwrap();
    let wal = std::fs::read(dir.path().join("airlock.db-wal")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&db).contains(&token));
    assert!(!String::from_utf8_lossy(&wal).contains(&token));
}

/// `GET /v1/sessions` with a given admin token.
async fn list_sessions_with(admin_url: &str, token: &str) -> airlock_testkit::client::Reply {
    request(
        "GET",
        &format!("{admin_url}/v1/sessions"),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

async fn cli(airlock: &Airlock, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", airlock.admin_token())
        .current_dir(airlock.dir())
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn cli_session_commands() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;

    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--allow",
            "anthropic:POST:/v1/messages",
            "--ttl",
            "10m",
            "--label",
            "agent=a1",
            "--max-denied",
            "3",
            "--rpm",
            "10",
            "--max-requests",
            "5",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["limits"],
        json!({"requests_per_minute": 10, "max_requests": 5, "max_denied": 3})
    );
    assert_eq!(created["labels"], json!({"agent": "a1"}));

    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--format",
            "env",
        ],
    )
    .await;
    let env = stdout(&out);
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(lines.len(), 3, "{env}");
    assert!(lines.iter().any(|l| l.starts_with("OPENAI_API_KEY=sess_")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("AIRLOCK_SESSION_ID=ses_")));
    assert!(lines.contains(&format!("OPENAI_BASE_URL={}/openai/v1", airlock.proxy_url()).as_str()));

    let out = cli(
        &airlock,
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/chat/completions",
            "--format",
            "shell",
        ],
    )
    .await;
    let shell = stdout(&out);
    assert!(
        shell
            .lines()
            .all(|l| l.starts_with("export ") && l.ends_with('\'')),
        "{shell}"
    );
    // The shell output works in a real shell.
    let sh = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{shell}\nprintf %s \"$OPENAI_BASE_URL\""))
        .output()
        .await
        .unwrap();
    assert_eq!(stdout(&sh), format!("{}/openai/v1", airlock.proxy_url()));
    let shell_token = shell
        .lines()
        .find_map(|l| l.strip_prefix("export OPENAI_API_KEY='"))
        .unwrap()
        .trim_end_matches('\'')
        .to_owned();

    let out = cli(&airlock, &["session", "list"]).await;
    let table = stdout(&out);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains(&id) && table.contains("agent=a1") && table.contains("active"),
        "{table}"
    );
    assert!(!table.contains("sess_"));
    let header_cols = table.lines().next().unwrap().find("STATE").unwrap();
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l[header_cols..].starts_with("active")),
        "aligned:\n{table}"
    );

    let out = cli(&airlock, &["session", "show", &id]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()["id"],
        id.as_str()
    );

    let out = cli(&airlock, &["session", "revoke", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("revoked {id}"));
    let out = cli(&airlock, &["session", "revoke", &shell_token]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let reply = request(
        "POST",
        &format!("{}/openai/v1/chat/completions", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {shell_token}"))],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 401, "revoked by token");

    let out = cli(&airlock, &["session", "list", "--all", "--json"]).await;
    let all: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(all["sessions"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn cli_errors_are_one_clear_line_and_nonzero() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["session", "create", "--allow", "openai:post:/v1/x"],
            "method \"post\"",
        ),
        (
            &["session", "create", "--allow", "openai:POST"],
            "not PROVIDER:METHODS:PATH",
        ),
        (
            &["session", "create", "--allow", "openai:POST:v1"],
            "must start with '/'",
        ),
        (
            &["session", "create", "--allow", "nope:POST:/v1"],
            "unknown provider \"nope\"",
        ),
        (
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1",
                "--ttl",
                "forever",
            ],
            "not a duration",
        ),
        (
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1",
                "--ttl",
                "99999999999999d",
            ],
            "--ttl 99999999999999d: far too long",
        ),
        (
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1",
                "--ttl",
                "2h",
            ],
            "--ttl 2h: must be at most 1h",
        ),
        (
            &[
                "session",
                "create",
                "--allow",
                "openai:POST:/v1",
                "--label",
                "novalue",
            ],
            "KEY=VALUE",
        ),
        (&["session", "show", "nope"], "not a session id"),
        (&["session", "revoke", "ses_unknown"], "no session"),
    ];
    for (args, want) in cases {
        let out = cli(&airlock, args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.starts_with("airlock: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }

    let out = tokio::process::Command::new(BIN)
        .args(["session", "list"])
        .env("AIRLOCK_ADMIN_URL", "http://127.0.0.1:1")
        .env("AIRLOCK_ADMIN_TOKEN", "x")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the airlock admin API at http://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );

    let out = tokio::process::Command::new(BIN)
        .args(["session", "list"])
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", "wrong")
        .output()
        .await
        .unwrap();
    assert!(
        stderr(&out).contains("AIRLOCK_ADMIN_TOKEN"),
        "{}",
        stderr(&out)
    );
}

/// A session token pasted where something else belongs is refused without
/// being printed back, whichever part of the CLI refuses it (clap, a rule,
/// an id, a message quoting the input).
#[tokio::test]
async fn a_token_in_the_wrong_place_is_never_printed_back() {
    let mock = MockProvider::start().await;
    let airlock = start(&mock).await;
    let token = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["POST"], "paths": ["/v1/x"]}],
            "ttl_seconds": 60,
        }))
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = token.as_str();
    let cases: &[&[&str]] = &[
        &["session", "create", "--allow", t],
        &[
            "session",
            "create",
            "--allow",
            &format!("openai:POST:/v1/{t}"),
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--rpm",
            t,
        ],
        &[
            "session",
            "create",
            "--allow",
            "openai:POST:/v1/x",
            "--label",
            t,
        ],
        &["session", "show", t, "--bogus"],
        &["audit", "export", "--session", t],
        &["audit", "tail", "--session", t],
        &["audit", "verify", "--from", "-", "--session", t],
        &["completions", t],
    ];
    for args in cases {
        let out = cli(&airlock, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.is_empty(), "{args:?}");
        assert!(
            !err.contains(&t["sess_".len()..]),
            "{args:?} printed the token: {err}"
        );
    }
}

/// `./airlock.toml`, when it exists, must load for the commands that talk
/// to the admin API, as for the others: they do not fall back to the
/// default address and blame the network.
#[tokio::test]
async fn an_invalid_default_config_is_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("airlock.toml"),
        "[admin]\nlisten = \"127.0.0.1:1\"\n[proxy]\nlistn = \"x\"\n",
    )
    .unwrap();
    for args in [
        &["session", "list"][..],
        &["credential", "show", "openai"],
        &["config", "check"],
    ] {
        let out = tokio::process::Command::new(BIN)
            .args(args)
            .env("AIRLOCK_ADMIN_TOKEN", "x")
            .env_remove("AIRLOCK_ADMIN_URL")
            .current_dir(dir.path())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("invalid config: airlock.toml: proxy"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn bad_config_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("airlock.toml");
    std::fs::write(&path, "[proxy]\nlisten = \"127.0.0.1:0\"\n[providers.openai]\nupstream = \"https://x\"\nauth = \"basic\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"Y\"\n").unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: providers.openai.auth: auth must be",
            path.display()
        )),
        "{err}"
    );

    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/airlock.toml"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("/nonexistent/airlock.toml"));
}

#[tokio::test]
async fn serve_runs_with_no_config_at_all() {
    let dir = tempfile::tempdir().unwrap();
    // No airlock.toml in the working directory: built-in defaults, except
    // for the ports, which the defaults fix at 8080/8081 and may be taken
    // here. So run with only a port override to prove the rest defaults.
    let path = dir.path().join("ports.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // A token anyone could guess is refused before anything starts.
    let weak = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        .env("AIRLOCK_ADMIN_TOKEN", "t")
        .output()
        .await
        .unwrap();
    assert!(!weak.status.success());
    assert!(
        stderr(&weak).contains("AIRLOCK_ADMIN_TOKEN has only 1 characters"),
        "{}",
        stderr(&weak)
    );
    // So is one no client could send (round 33: a secret file's trailing
    // newline locked every client out, with nothing said).
    use std::os::unix::ffi::OsStrExt;
    for (token, named) in [
        (&b"adm_serve_defaults_0123\n"[..], "a line break"),
        (b" adm_serve_defaults_0123", "a space"),
        ("adm_serve_défaults_0123".as_bytes(), "not printable ASCII"),
        // Latin-1: not UTF-8 at all, once taken for unset (round 34).
        (b"adm_serve_d\xe9faults_0123", "not valid UTF-8"),
    ] {
        let unsendable = tokio::process::Command::new(BIN)
            .args(["serve", "--config", path.to_str().unwrap()])
            .current_dir(dir.path())
            .env("AIRLOCK_ADMIN_TOKEN", std::ffi::OsStr::from_bytes(token))
            .output()
            .await
            .unwrap();
        assert_eq!(unsendable.status.code(), Some(1), "{token:?}");
        let err = stderr(&unsendable);
        assert!(
            err.contains("AIRLOCK_ADMIN_TOKEN") && err.contains(named),
            "{token:?}: {err}"
        );
    }
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        .env("AIRLOCK_ADMIN_TOKEN", "adm_serve_defaults_0123")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    while let Some(line) =
        tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
    {
        if let Some(url) = line.strip_prefix("airlock admin listening on ") {
            admin = Some(url.to_owned());
            break;
        }
    }
    let admin = admin.unwrap();
    assert!(
        dir.path().join("airlock.db").exists(),
        "sqlite://airlock.db in the working directory"
    );
    // Built-in providers exist: a session for openai and anthropic can be made.
    let reply = request(
        "POST",
        &format!("{admin}/v1/sessions"),
        &[("authorization", "Bearer adm_serve_defaults_0123")],
        r#"{"scope":[{"provider":"openai","methods":["POST"],"paths":["/v1/chat/completions"]},{"provider":"anthropic","methods":["POST"],"paths":["/v1/messages"]}],"ttl_seconds":60}"#,
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let env = &reply.json()["env"];
    assert!(env["OPENAI_BASE_URL"]
        .as_str()
        .unwrap()
        .ends_with("/openai/v1"));
    assert!(env["ANTHROPIC_BASE_URL"]
        .as_str()
        .unwrap()
        .ends_with("/anthropic"));
    child.kill().await.unwrap();
}

/// `GET /v1/server` describes the process with the bounds in force: the
/// default `max_calls_in_flight` as `serve` lowered it for an open files
/// limit that holds few connections (12 with two workers: a quarter is 3).
#[tokio::test]
async fn the_server_route_says_the_bounds_in_force() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(BIN)
        .provider("openai", &mock.url(), "bearer", "sk-real-1", "/v1")
        .proxy_option("workers = 2")
        .open_files_limit(128)
        .start()
        .await
        .unwrap();
    let (status, server) = airlock.admin("GET", "/v1/server", None).await.unwrap();
    assert_eq!(status, 200, "{server}");
    assert_eq!(server["version"], env!("CARGO_PKG_VERSION"), "{server}");
    assert_eq!(server["store"], "sqlite", "{server}");
    assert_eq!(
        server["audit"],
        json!({"enabled": true, "fail_closed": true})
    );
    assert_eq!(server["sessions"]["max_calls_in_flight"], 3, "{server}");
    assert_eq!(server["sessions"]["max_ttl_seconds"], 86_400, "{server}");
    assert!(server["uptime_seconds"].as_u64().is_some(), "{server}");
    assert!(!server.to_string().contains(airlock.admin_token()));
}
