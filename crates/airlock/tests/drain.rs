//! Graceful shutdown end to end: on SIGTERM airlock stops accepting, says
//! "draining" on `/readyz`, lets calls in flight (streams included, over
//! HTTP/1.1 and HTTP/2) finish within `[proxy] drain_timeout`, cuts what
//! is left after it, writes every call's audit record and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::time::Instant;

const KEY: &str = "sk-real-drain-0123456789";
/// How long a poll waits for what it expects.
const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

async fn start(mock: &MockProvider, drain_timeout: &str) -> Airlock {
    AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("mock", &mock.url(), "bearer", KEY, "")
        .proxy_option(&format!("drain_timeout = \"{drain_timeout}\""))
        .start()
        .await
        .unwrap()
}

async fn token(airlock: &Airlock) -> String {
    let session = airlock
        .create_session(json!({
            "scope": [{"provider": "mock", "methods": ["GET", "WEBSOCKET"], "paths": ["/**"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    session["token"].as_str().unwrap().to_owned()
}

/// Opens `GET /mock/gated-sse` (over HTTP/2 with prior knowledge when
/// `http2`) and reads up to its first event; returns the body, unread past it.
async fn open_gated(airlock: &Airlock, token: &str, http2: bool) -> Incoming {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let request = http::Request::get(format!("{}/mock/gated-sse", airlock.proxy_url()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, client.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let want = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert_eq!(response.version(), want);
    let mut body = response.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    body
}

/// Reads the rest of a body: its text, and whether it ended cleanly.
async fn rest_of(mut body: Incoming) -> (String, bool) {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(DEADLINE, body.frame()).await.unwrap() {
            None => return (text, true),
            Some(Err(_)) => return (text, false),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
        }
    }
}

fn sigterm(airlock: &Airlock) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(airlock.pid().to_string())
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Polls until `check` holds, or fails naming `what`.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// The proxy's `host:port`.
fn proxy_addr(airlock: &Airlock) -> String {
    airlock.proxy_url().trim_start_matches("http://").to_owned()
}

/// A connection with no call in flight does not hold the drain, even one
/// whose client stopped halfway through a request head (round 24: it held
/// shutdown for the whole `drain_timeout`).
#[tokio::test]
async fn a_half_sent_request_head_does_not_hold_the_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "30s").await;
    // Half of a first head, and nothing more.
    let mut stalled = tokio::net::TcpStream::connect(proxy_addr(&airlock))
        .await
        .unwrap();
    stalled
        .write_all(b"GET /mock/x HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // A call answered on a second connection: the listener hands out
    // connections in the order they came, so the first one is held too.
    let mut second = tokio::net::TcpStream::connect(proxy_addr(&airlock))
        .await
        .unwrap();
    let answer = airlock_testkit::client::answer_on(
        &mut second,
        b"GET /nowhere/x HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");

    let signalled = Instant::now();
    sigterm(&airlock);
    // The drain had the connection to wait for.
    wait_until("the shutdown line", || {
        let said = airlock.output().contains("shutting down");
        async move { said }
    })
    .await;
    let output = airlock.output();
    let line = output
        .lines()
        .find(|l| l.contains("shutting down"))
        .unwrap();
    assert!(
        line.contains("connections=2") && line.contains("calls=0"),
        "{line}"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), airlock.wait_exit())
        .await
        .expect("the drain waited for a request head that never came")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    // The stalled client finds its connection closed, unanswered.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");
    assert_eq!(mock.request_count(), 0);
}

/// A stop that could not write every audit record exits 1, so that a
/// supervisor sees it (round 24: it exited 0, the loss only in the log).
#[tokio::test]
async fn a_stop_that_loses_audit_records_exits_1() {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "5s").await;
    let token = token(&airlock).await;
    // The database file deleted under the running server: records can no
    // longer be stored, and are held back for a store that never returns.
    std::fs::remove_file(airlock.dir().join("airlock.db")).unwrap();
    let url = format!("{}/mock/v1/models", airlock.proxy_url());
    wait_until("a call refused for its audit record", || {
        let url = url.clone();
        let token = token.clone();
        async move {
            let reply = airlock_testkit::client::request(
                "GET",
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                "",
            )
            .await;
            reply.error_code().as_deref() == Some("audit_unavailable")
        }
    })
    .await;

    let status = airlock.terminate().await.unwrap();
    assert_eq!(status.code(), Some(1), "{}", airlock.output());
    assert!(
        airlock
            .output()
            .contains("could not be written before the exit"),
        "{}",
        airlock.output()
    );
}

/// The two gated streams `readers` read (over HTTP/1.1, then HTTP/2) were
/// cut: their agents saw them end short, without the second event, with
/// airlock's `error` event saying why and then the stream's end, as a
/// provider ends a stream after an error (cut off instead, an HTTP client
/// may drop that event unread: round 27) — and their records, written
/// before the exit, say airlock cut them (`incomplete`), not that the
/// agent went away.
async fn assert_streams_cut(
    readers: [tokio::task::JoinHandle<(String, bool)>; 2],
    airlock: &Airlock,
) {
    for reader in readers {
        let (text, clean) = reader.await.unwrap();
        assert!(!text.contains("second"), "{text}");
        assert!(
            text.starts_with("event: error\ndata: ") && text.contains(r#""code":"shutting_down""#),
            "{text}"
        );
        assert!(clean, "the error event is not followed by the stream's end");
    }
    let records = exported(&airlock.config_path());
    let cut: Vec<_> = records
        .iter()
        .filter(|r| r["path"] == "/mock/gated-sse")
        .collect();
    assert_eq!(cut.len(), 2, "{records:#?}");
    for record in cut {
        assert_eq!(record["decision"], "allow", "{record}");
        assert_eq!(record["flags"], json!(["incomplete"]), "{record}");
    }
}

/// `airlock audit export` on the stopped server's store.
fn exported(config: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(config)
        .args(["audit", "export"])
        .env_remove("AIRLOCK_AUDIT_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn sigterm_lets_streams_in_flight_finish() {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "30s").await;
    let token = token(&airlock).await;
    let streams = [
        open_gated(&airlock, &token, false).await,
        open_gated(&airlock, &token, true).await,
    ];
    let (status, _) = airlock.admin("GET", "/readyz", None).await.unwrap();
    assert_eq!(status, 200);

    sigterm(&airlock);
    // Draining: not ready, and no new connection is taken.
    wait_until("/readyz answering 503", || async {
        matches!(airlock.admin("GET", "/readyz", None).await, Ok((503, _)))
    })
    .await;
    let addr = proxy_addr(&airlock);
    wait_until("new proxy connections refused", || async {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;

    // The streams in flight go on and complete.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|body| tokio::spawn(rest_of(body)))
        .collect();
    mock.open_gate();
    mock.open_gate();
    for reader in readers {
        let (text, clean) = reader.await.unwrap();
        assert_eq!(text, "data: second\n\n");
        assert!(clean, "the stream did not end cleanly");
    }

    let status = airlock.wait_exit().await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", airlock.output());

    // Both calls were recorded whole before the exit.
    let records = exported(&airlock.config_path());
    let streamed: Vec<_> = records
        .iter()
        .filter(|r| r["path"] == "/mock/gated-sse")
        .collect();
    assert_eq!(streamed.len(), 2, "{records:#?}");
    for record in streamed {
        assert_eq!(record["decision"], "allow", "{record}");
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["flags"], json!([]), "{record}");
        assert!(record["bytes_out"].as_u64().unwrap() >= 26, "{record}");
    }
}

#[tokio::test]
async fn a_stream_still_running_at_drain_timeout_is_cut() {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "1s").await;
    let token = token(&airlock).await;
    let readers = [
        tokio::spawn(rest_of(open_gated(&airlock, &token, false).await)),
        tokio::spawn(rest_of(open_gated(&airlock, &token, true).await)),
    ];

    let signalled = std::time::Instant::now();
    sigterm(&airlock);
    let status = airlock.wait_exit().await.unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", airlock.output());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before drain_timeout"
    );
    assert!(took < Duration::from_secs(10), "exit took {took:?}");

    assert_streams_cut(readers, &airlock).await;
}

/// A call still waiting for its provider's answer when the drain ends is
/// answered, not dropped: 503 `shutting_down` (which SDKs retry), recorded
/// as airlock's doing, not as an agent that left.
#[tokio::test]
async fn a_call_still_waiting_for_its_provider_at_drain_timeout_gets_503() {
    // The drain ends after the call has waited 200 ms: it is watching the cut.
    assert_waiting_call_answered_503("1s").await;
}

/// A call that has waited less than 200 ms when the drain ends (its
/// connection's timer, not yet the cut, is what it listens to) is answered
/// too: the drain waits for it to reach its timer.
#[tokio::test]
async fn a_call_that_just_started_waiting_at_drain_timeout_gets_503() {
    assert_waiting_call_answered_503("50ms").await;
}

/// Sends a call whose provider never answers, stops airlock with
/// `drain_timeout`, and checks the call's 503 and its record.
async fn assert_waiting_call_answered_503(drain_timeout: &str) {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, drain_timeout).await;
    let token = token(&airlock).await;
    let url = format!("{}/mock/gated-head", airlock.proxy_url());
    let call = tokio::spawn(async move {
        airlock_testkit::client::request(
            "GET",
            &url,
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
    });
    mock.wait_for_requests(1).await;

    sigterm(&airlock);
    let reply = tokio::time::timeout(DEADLINE, call).await.unwrap().unwrap();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.error_code().as_deref(), Some("shutting_down"));
    let status = airlock.wait_exit().await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", airlock.output());

    let records = exported(&airlock.config_path());
    let record = records
        .iter()
        .find(|r| r["path"] == "/mock/gated-head")
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(record["decision"], "shutting_down", "{record}");
    assert_eq!(record["status"], 503, "{record}");
    assert_eq!(record["flags"], json!(["incomplete"]), "{record}");
    mock.open_gate();
}

#[tokio::test]
async fn a_websocket_tunnel_open_at_drain_timeout_is_closed_going_away() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "1s").await;
    let token = token(&airlock).await;
    let url = airlock.proxy_url().replacen("http://", "ws://", 1);
    let mut request = format!("{url}/mock/ws/echo").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut socket, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, socket.next()).await.unwrap();
    assert!(matches!(echoed, Some(Ok(Message::Text(_)))), "{echoed:?}");

    let signalled = std::time::Instant::now();
    sigterm(&airlock);
    // The tunnel stays open through the drain, and at its end airlock
    // closes it, saying why (the client answers the close as it reads on).
    let ended = tokio::time::timeout(DEADLINE, async {
        let mut close = None;
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => close = frame,
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return close,
            }
        }
    })
    .await;
    let close = ended.expect("the tunnel outlived the drain");
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");
    let close = close.expect("no close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert_eq!(close.reason.as_str(), "airlock is shutting down");
    let status = airlock.wait_exit().await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", airlock.output());

    let records = exported(&airlock.config_path());
    let cut: Vec<_> = records
        .iter()
        .filter(|r| r["path"] == "/mock/ws/echo")
        .collect();
    assert_eq!(cut.len(), 1, "{records:#?}");
    assert_eq!(cut[0]["status"], 101, "{}", cut[0]);
    assert_eq!(cut[0]["flags"], json!(["incomplete"]), "{}", cut[0]);
    assert!(cut[0]["bytes_in"].as_u64().unwrap() > 0, "{}", cut[0]);
}

/// The shutdown line says which signal came, what is in flight and the
/// drain timeout; a second signal ends the drain at once: what still runs
/// is cut, every record is written, and the exit is 0, as at the timeout.
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let mock = MockProvider::start().await;
    let mut airlock = start(&mock, "60s").await;
    let token = token(&airlock).await;
    let readers = [
        tokio::spawn(rest_of(open_gated(&airlock, &token, false).await)),
        tokio::spawn(rest_of(open_gated(&airlock, &token, true).await)),
    ];

    sigterm(&airlock);
    let mut shutting_down = String::new();
    wait_until("the shutdown line", || {
        let found = airlock
            .output()
            .lines()
            .find(|l| l.contains("shutting down"))
            .map(str::to_owned);
        let done = found.is_some();
        if let Some(line) = found {
            shutting_down = line;
        }
        async move { done }
    })
    .await;
    for field in [
        "signal=\"SIGTERM\"",
        "calls=2",
        "connections=2",
        "drain_timeout=1m",
    ] {
        assert!(
            shutting_down.contains(field),
            "{field} not in {shutting_down}"
        );
    }

    // A repeat within a second is taken as the same stop request (a
    // wrapper and systemd may both pass one on): the drain goes on.
    let signalled = std::time::Instant::now();
    sigterm(&airlock);
    wait_until("the repeat taken as the same request", || {
        let said = airlock.output().contains("taken as the same stop request");
        async move { said }
    })
    .await;
    assert!(!airlock.output().contains("ending the drain now"));
    // A second signal after that ends it: sent until one is.
    wait_until("the drain cut by a second signal", || {
        let _ = airlock.signal("TERM");
        let cut = airlock
            .output()
            .contains("second signal: ending the drain now");
        async move { cut }
    })
    .await;
    let status = airlock.wait_exit().await.unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", airlock.output());
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert!(
        airlock
            .output()
            .contains("second signal: ending the drain now"),
        "{}",
        airlock.output()
    );
    assert_streams_cut(readers, &airlock).await;
}
