//! WebSocket upgrades through the proxy: the real `airlock` binary on port
//! 0 in front of the mock provider's `/ws/` routes, driven by
//! tokio-tungstenite clients over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use airlock_testkit::client::{raw, raw_status};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

const KEY: &str = "sk-real-realtime-0123456789abcdef";

/// How long anything awaited here may take before the test fails.
const LIMIT: Duration = Duration::from_secs(10);

type Socket = WebSocketStream<TcpStream>;

struct Setup {
    mock: MockProvider,
    airlock: Airlock,
}

async fn setup() -> Setup {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", KEY, "")
        .start()
        .await
        .unwrap();
    Setup { mock, airlock }
}

/// A session allowed WebSockets on `/ws/*` only; returns (id, token).
async fn session(airlock: &Airlock) -> (String, String) {
    let s = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["WEBSOCKET"], "paths": ["/ws/*"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    (
        s["id"].as_str().unwrap().to_owned(),
        s["token"].as_str().unwrap().to_owned(),
    )
}

/// Opens `ws://airlock/openai{path}` as the OpenAI SDK's realtime client
/// does (bearer token, a subprotocol), also offering compression.
async fn connect(
    setup: &Setup,
    path: &str,
    token: &str,
) -> Result<
    (
        Socket,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let url = setup.airlock.proxy_url().replacen("http://", "ws://", 1);
    let mut request = format!("{url}/openai{path}").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("realtime"),
    );
    headers.insert(
        "sec-websocket-extensions",
        HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
    );
    let authority = setup.airlock.proxy_url().replacen("http://", "", 1);
    let stream = TcpStream::connect(authority).await.unwrap();
    tokio::time::timeout(LIMIT, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("handshake timed out")
}

/// The next data message, within [`LIMIT`].
async fn next_message(socket: &mut Socket) -> Message {
    loop {
        let message = tokio::time::timeout(LIMIT, socket.next())
            .await
            .expect("no message in time")
            .expect("the tunnel closed")
            .expect("the tunnel failed");
        if matches!(message, Message::Text(_) | Message::Binary(_)) {
            return message;
        }
    }
}

/// Waits until the tunnel is closed (a close frame, an error or the end
/// of the stream), within [`LIMIT`].
async fn closed(socket: &mut Socket) {
    loop {
        match tokio::time::timeout(LIMIT, socket.next()).await {
            Err(_) => panic!("the tunnel stayed open"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// The close frame airlock ended the tunnel with: (code, reason). The
/// socket is read on to its end, so that the client answers the close.
async fn close_frame(socket: &mut Socket) -> (u16, String) {
    let frame = loop {
        match tokio::time::timeout(LIMIT, socket.next())
            .await
            .expect("the tunnel stayed open")
        {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => panic!("the tunnel ended without a close frame"),
        }
    };
    while let Ok(Some(Ok(_))) = tokio::time::timeout(LIMIT, socket.next()).await {}
    (u16::from(frame.code), frame.reason.to_string())
}

/// The client frames in `bytes` (masked, as the provider receives them):
/// (opcode, unmasked payload) each; `None` if the bytes end inside one.
fn client_frames(mut bytes: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (&first, rest) = bytes.split_first()?;
        let (&second, rest) = rest.split_first()?;
        assert!(second & 0x80 != 0, "an unmasked client frame");
        let (len, rest) = match second & 0x7f {
            126 => (
                usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().unwrap())),
                &rest[2..],
            ),
            127 => (
                usize::try_from(u64::from_be_bytes(rest.get(..8)?.try_into().unwrap())).unwrap(),
                &rest[8..],
            ),
            short => (usize::from(short), rest),
        };
        let mask = rest.get(..4)?;
        let payload = rest.get(4..4 + len)?;
        frames.push((
            first & 0x0f,
            payload
                .iter()
                .zip(mask.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect(),
        ));
        bytes = &rest[4 + len..];
    }
    Some(frames)
}

/// What the provider's `/ws/sink` received, once it ends with a close
/// frame: its frames, the close frame's code last.
async fn sink_until_close(mock: &MockProvider) -> (Vec<(u8, Vec<u8>)>, u16) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(frames) = client_frames(&mock.websocket_received()) {
            if let Some((0x8, payload)) = frames.last() {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (frames, code);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no close frame reached the provider: {:?}",
            mock.websocket_received()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Revokes session `id` through the admin API.
async fn revoke(airlock: &Airlock, id: &str) {
    let (status, body) = airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Waits until the provider's `/ws/sink` received a whole frame.
async fn sink_received_a_frame(mock: &MockProvider) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while client_frames(&mock.websocket_received()).is_none_or(|f| f.is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no frame reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The audit records of `session`, oldest first, once `n` are there.
async fn records(airlock: &Airlock, session: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (status, body) = airlock
            .admin(
                "GET",
                &format!("/v1/audit?session={session}&limit=10000"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let records = body["records"].as_array().cloned().unwrap_or_default();
        if records.len() >= n || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON error airlock answered a raw request with: (status, code).
fn raw_error(answer: &str) -> (u16, String) {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        raw_status(answer),
        json["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// A raw WebSocket handshake for `path` with `extra` header lines.
fn handshake(path: &str, token: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET /openai{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Opens a tunnel to `path` over a raw socket: the socket once airlock
/// answered 101, and whatever came after the head in the same reads.
async fn open_raw(setup: &Setup, path: &str, token: &str) -> (TcpStream, Vec<u8>) {
    let authority = setup.airlock.proxy_url().replacen("http://", "", 1);
    let mut stream = TcpStream::connect(authority).await.unwrap();
    let websocket = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    stream
        .write_all(&handshake(path, token, websocket))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    assert_eq!(raw_status(&head), 101, "{head}");
    (stream, got.split_off(end))
}

/// Reads `stream` to its end (or its reset), within [`LIMIT`].
async fn read_to_end(stream: &mut TcpStream, got: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .expect("the tunnel stayed open")
        {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_tunnel_carries_messages_with_the_real_key_swapped_in_and_is_recorded() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut socket, response) = connect(&s, "/ws/echo?model=gpt-realtime", &token)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "realtime",
        "the provider's choice of subprotocol reaches the agent"
    );
    assert!(response.headers().get("sec-websocket-extensions").is_none());

    // What the provider saw.
    let seen = s.mock.requests();
    assert_eq!(seen.len(), 1);
    let handshake = &seen[0];
    assert_eq!(handshake.method, "GET");
    assert_eq!(handshake.path_and_query, "/ws/echo?model=gpt-realtime");
    assert_eq!(
        handshake.header("authorization").unwrap(),
        format!("Bearer {KEY}")
    );
    assert!(
        !handshake.contains(&token),
        "the session token went upstream"
    );
    assert!(!handshake.contains(&token["sess_".len()..]));
    assert!(
        handshake.header("sec-websocket-extensions").is_none(),
        "compression was offered upstream"
    );
    assert_eq!(
        handshake.header("upgrade").unwrap().to_lowercase(),
        "websocket"
    );
    assert!(handshake
        .header("connection")
        .unwrap()
        .to_lowercase()
        .contains("upgrade"));
    assert_eq!(handshake.header("sec-websocket-version").unwrap(), "13");
    assert!(handshake.header("sec-websocket-key").is_some());
    assert_eq!(
        handshake.header("sec-websocket-protocol").unwrap(),
        "realtime"
    );

    // Messages both ways, small and large.
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::text("hello"));
    let big = vec![7u8; 200_000];
    socket.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::binary(big));

    // The provider quoting the real key: redacted in place.
    socket.send(Message::text("whoami")).await.unwrap();
    let Message::Text(quoted) = next_message(&mut socket).await else {
        panic!("not a text message");
    };
    assert!(!quoted.as_str().contains(KEY), "{quoted}");
    assert!(
        quoted.as_str().contains("[REDACTED BY AIRLOCK]"),
        "{quoted}"
    );
    let quoted: Value = serde_json::from_str(quoted.as_str()).unwrap();
    assert_eq!(
        quoted["authorization"].as_str().unwrap().len(),
        "Bearer ".len() + KEY.len()
    );

    // The agent closes; the provider answers the close and hangs up.
    socket.close(None).await.unwrap();
    closed(&mut socket).await;

    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["decision"], "allow", "{record}");
    assert_eq!(record["method"], "GET");
    assert_eq!(record["status"], 101, "{record}");
    assert_eq!(record["upstream_status"], 101, "{record}");
    assert!(record["bytes_in"].as_u64().unwrap() > 200_000, "{record}");
    assert!(record["bytes_out"].as_u64().unwrap() > 200_000, "{record}");
    assert_eq!(record["flags"], json!(["credential_redacted"]), "{record}");
}

#[tokio::test]
async fn refused_handshakes_never_reach_the_provider() {
    let s = setup().await;
    let (_, token) = session(&s.airlock).await;
    let url = s.airlock.proxy_url();
    let websocket = "Connection: Upgrade\r\nUpgrade: websocket\r\n";

    // An unknown token: 401, from tungstenite's point of view too.
    let unknown = format!("sess_{}", "A".repeat(43));
    match connect(&s, "/ws/echo", &unknown).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "invalid_token");
        }
        other => panic!("unknown token: {:?}", other.map(|(_, r)| r)),
    }
    // Out of scope: 403.
    let answer = raw(&url, &handshake("/v1/realtime", &token, websocket)).await;
    assert_eq!(raw_error(&answer), (403, "out_of_scope".into()), "{answer}");
    // GET on the path does not grant a WebSocket: a read-only scope must not
    // turn into a tunnel. Nor does a request whose own method is WEBSOCKET
    // pass for a handshake.
    let get_only = s
        .airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET", "POST"], "paths": ["/ws/*"]}],
            "ttl_seconds": 300,
        }))
        .await
        .unwrap();
    let get_only = get_only["token"].as_str().unwrap();
    let answer = raw(&url, &handshake("/ws/echo", get_only, websocket)).await;
    assert_eq!(raw_error(&answer), (403, "out_of_scope".into()), "{answer}");
    assert!(
        answer.contains("WEBSOCKET"),
        "the error says how to grant it: {answer}"
    );
    let literal = format!(
        "WEBSOCKET /openai/ws/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let answer = raw(&url, literal.as_bytes()).await;
    assert_eq!(raw_error(&answer), (400, "bad_request".into()), "{answer}");
    // An upgrade airlock does not offer (`h2c`, as `curl --http2` asks for
    // on plain HTTP) is ignored: an ordinary GET, here outside the scope
    // (the session grants only WEBSOCKET), its connection then closed.
    for upgrade in [
        "Connection: Upgrade\r\nUpgrade: h2c\r\n",
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    ] {
        let answer = raw(&url, &handshake("/ws/echo", &token, upgrade)).await;
        assert_eq!(
            raw_error(&answer),
            (403, "out_of_scope".into()),
            "{upgrade}: {answer}"
        );
        assert!(answer.contains("GET /ws/echo"), "{answer}");
        assert!(
            answer.to_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // A WebSocket with another protocol beside it, or a versioned one: 400.
    for upgrade in [
        "Connection: Upgrade\r\nUpgrade: websocket, h2c\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket/13\r\n",
    ] {
        let answer = raw(&url, &handshake("/ws/echo", &token, upgrade)).await;
        assert_eq!(
            raw_error(&answer),
            (400, "bad_request".into()),
            "{upgrade}: {answer}"
        );
        assert!(
            answer.to_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // A body, or another method.
    let answer = raw(
        &url,
        &handshake(
            "/ws/echo",
            &token,
            &format!("{websocket}Content-Length: 2\r\n"),
        )
        .into_iter()
        .chain(*b"{}")
        .collect::<Vec<u8>>(),
    )
    .await;
    assert_eq!(raw_error(&answer), (400, "bad_request".into()), "{answer}");
    // The token anywhere else, a subprotocol included.
    let smuggled = format!("{websocket}Sec-WebSocket-Protocol: realtime, {token}\r\n");
    let answer = raw(&url, &handshake("/ws/echo", &token, &smuggled)).await;
    assert_eq!(raw_error(&answer), (400, "bad_request".into()), "{answer}");
    assert!(
        answer.contains("Sec-WebSocket-Protocol") || answer.contains("sec-websocket-protocol"),
        "{answer}"
    );

    assert_eq!(s.mock.request_count(), 0, "{:#?}", s.mock.requests());
}

#[tokio::test]
async fn a_provider_negotiating_compression_gets_the_agent_a_502() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    match connect(&s, "/ws/extensions", &token).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 502);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "upstream_error", "{body}");
        }
        other => panic!("switched with extensions: {:?}", other.map(|(_, r)| r)),
    }
    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(records[0]["status"], 502, "{records:?}");
    assert_eq!(records[0]["upstream_status"], 101, "{records:?}");
    assert_eq!(records[0]["decision"], "upstream_error", "{records:?}");
}

#[tokio::test]
async fn revoking_the_session_closes_an_open_tunnel() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut socket, _) = connect(&s, "/ws/echo", &token).await.unwrap();
    socket.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::text("before"));

    let started = std::time::Instant::now();
    revoke(&s.airlock, &id).await;
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1008, "{reason}");
    assert_eq!(reason, "airlock: the session was revoked or expired");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let records = records(&s.airlock, &id, 1).await;
    let record = &records[0];
    assert_eq!(record["status"], 101, "{record}");
    assert_eq!(
        record["flags"],
        json!(["incomplete", "session_ended"]),
        "{record}"
    );
    assert!(record["bytes_in"].as_u64().unwrap() > 0, "{record}");
    assert!(record["bytes_out"].as_u64().unwrap() > 0, "{record}");
}

#[tokio::test]
async fn the_provider_is_told_going_away_when_airlock_ends_a_tunnel() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut socket, _) = connect(&s, "/ws/sink", &token).await.unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    sink_received_a_frame(&s.mock).await;
    revoke(&s.airlock, &id).await;
    assert_eq!(close_frame(&mut socket).await.0, 1008);
    let (frames, code) = sink_until_close(&s.mock).await;
    assert_eq!(code, 1001, "{frames:?}");
    assert_eq!(
        frames,
        vec![
            (0x1, b"hello".to_vec()),
            (0x8, 1001u16.to_be_bytes().to_vec())
        ],
        "the agent's message, then airlock's close frame, and nothing else"
    );
}

/// A side that already got the other's close frame gets no second one
/// (RFC 6455 §5.5.1): the agent closes, the provider (which never answers)
/// gets only that close; the session then ends during the close
/// handshake, and only the agent is told.
#[tokio::test]
async fn a_side_that_got_a_close_frame_gets_no_second_one() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut socket, _) = connect(&s, "/ws/sink", &token).await.unwrap();
    socket
        .send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: 1000.into(),
                reason: "done".into(),
            },
        )))
        .await
        .unwrap();
    sink_received_a_frame(&s.mock).await;
    revoke(&s.airlock, &id).await;
    // The agent's close is answered by airlock's (the provider never did).
    assert_eq!(close_frame(&mut socket).await.0, 1008);
    assert!(
        s.mock.wait_for_ended_websocket_sinks(1, LIMIT).await,
        "airlock kept the provider's connection open"
    );
    let mut done = 1000u16.to_be_bytes().to_vec();
    done.extend_from_slice(b"done");
    assert_eq!(
        client_frames(&s.mock.websocket_received()).unwrap(),
        vec![(0x8, done)],
        "the provider got a second close frame"
    );
}

#[tokio::test]
async fn a_quiet_tunnel_outlives_the_http_idle_timeout_until_its_own() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", KEY, "")
        .proxy_option(r#"idle_timeout = "1s""#)
        .start()
        .await
        .unwrap();
    let s = Setup { mock, airlock };
    let (id, token) = session(&s.airlock).await;
    let (mut socket, _) = connect(&s, "/ws/echo", &token).await.unwrap();
    // Traffic every 400 ms keeps it open well past the idle timeout.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        socket
            .send(Message::text(format!("ping {i}")))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut socket).await,
            Message::text(format!("ping {i}"))
        );
    }
    // Then silence: closed after about a second, saying why.
    let quiet = std::time::Instant::now();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!((code, reason.as_str()), (1001, "airlock: idle timeout"));
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(records[0]["flags"], json!(["incomplete"]), "{records:?}");
}

#[tokio::test]
async fn a_provider_hanging_up_right_after_a_message_delivers_it_once() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut stream, mut got) = open_raw(&s, "/ws/hang-up", &token).await;
    read_to_end(&mut stream, &mut got).await;
    let bye = [0x81, 3, b'b', b'y', b'e'];
    assert_eq!(got, bye, "the agent got the provider's last read once");
    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(records[0]["status"], 101, "{records:?}");
    assert_eq!(records[0]["bytes_out"], bye.len(), "{records:?}");
}

#[tokio::test]
async fn a_key_split_across_fragments_reaches_the_agent_masked() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    // The provider sends the key's first bytes as a non-final text frame,
    // a ping, then the rest as the final continuation, each on its own.
    let (mut socket, _) = connect(&s, "/ws/split-key", &token).await.unwrap();
    let Message::Text(quoted) = next_message(&mut socket).await else {
        panic!("not a text message");
    };
    assert!(!quoted.as_str().contains(KEY), "{quoted}");
    assert!(
        quoted.as_str().contains("[REDACTED BY AIRLOCK]"),
        "{quoted}"
    );
    let quoted: Value = serde_json::from_str(quoted.as_str()).unwrap();
    assert_eq!(
        quoted["authorization"].as_str().unwrap().len(),
        "Bearer ".len() + KEY.len()
    );
    // The tunnel carries on as before.
    socket.send(Message::text("after")).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::text("after"));
    socket.close(None).await.unwrap();
    closed(&mut socket).await;
    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(
        records[0]["flags"],
        json!(["credential_redacted"]),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_tunnel_closes_when_the_audit_trail_stops_taking_writes() {
    use sqlx::Connection;
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", KEY, "")
        .config("[audit]\nfail_closed = true\nstall_timeout = \"300ms\"\n")
        .start()
        .await
        .unwrap();
    let s = Setup { mock, airlock };
    let (id, token) = session(&s.airlock).await;
    let (mut socket, _) = connect(&s, "/ws/echo", &token).await.unwrap();
    socket.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut socket).await, Message::text("before"));

    // Another process takes the database's write lock and keeps it: the
    // audit journal cannot be moved in, and from then on (2 s later)
    // calls get 503.
    let db = s.airlock.dir().join("airlock.db");
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    let url = format!("{}/openai/ws/plain-http", s.airlock.proxy_url());
    let auth = format!("Bearer {token}");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let reply =
            airlock_testkit::client::request("GET", &url, &[("authorization", &auth)], "").await;
        if reply.status == 503 {
            assert_eq!(reply.json()["error"]["code"], "audit_unavailable");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gate never closed"
        );
    }
    // The tunnel ends too, promptly, saying why.
    let gate_closed = std::time::Instant::now();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, 1011, "{reason}");
    assert_eq!(reason, "airlock: the audit trail takes no records");
    assert!(
        gate_closed.elapsed() < Duration::from_secs(3),
        "{:?}",
        gate_closed.elapsed()
    );

    // Once the store takes writes again, the tunnel's record is there.
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    locker.close().await.unwrap();
    // (Held back while the trail took no records, it is written once the
    // writer's probe finds the store writable again.)
    let deadline = tokio::time::Instant::now() + LIMIT;
    let tunnel = loop {
        let records = records(&s.airlock, &id, 2).await;
        if let Some(tunnel) = records.iter().find(|r| r["path"] == "/openai/ws/echo") {
            break tunnel.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no record of the tunnel among {} records",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tunnel["status"], 101, "{tunnel}");
    let flags = tunnel["flags"].as_array().unwrap();
    assert!(flags.contains(&json!("incomplete")), "{tunnel}");
}

/// A masked client frame: FIN, `opcode`, `payload` (short).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x80 | opcode, 0x80 | u8::try_from(payload.len()).unwrap()];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

#[tokio::test]
async fn bytes_that_are_not_websocket_from_the_agent_end_the_tunnel_unforwarded() {
    let s = setup().await;
    let (id, token) = session(&s.airlock).await;
    let (mut stream, _) = open_raw(&s, "/ws/sink", &token).await;
    // A frame passes...
    let hello = client_frame(0x1, b"hello");
    stream.write_all(&hello).await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while s.mock.websocket_received().len() < hello.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the frame never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...an HTTP request smuggled after it does not.
    let smuggled =
        format!("GET /admin HTTP/1.1\r\nHost: internal\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(smuggled.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_to_end(&mut stream, &mut got).await;
    // The agent is told (1002); the provider gets the frame and airlock's
    // close frame, nothing of the request.
    let mut protocol_error = vec![0x88, 0];
    protocol_error.extend_from_slice(&1002u16.to_be_bytes());
    protocol_error.extend_from_slice(b"airlock: not a WebSocket frame");
    protocol_error[1] = u8::try_from(protocol_error.len() - 2).unwrap();
    assert_eq!(got, protocol_error);
    let (frames, code) = sink_until_close(&s.mock).await;
    assert_eq!(code, 1001);
    assert_eq!(
        frames,
        vec![
            (0x1, b"hello".to_vec()),
            (0x8, 1001u16.to_be_bytes().to_vec())
        ],
        "the provider got more than the agent's frame and the close"
    );
    let records = records(&s.airlock, &id, 1).await;
    assert_eq!(records[0]["status"], 101, "{records:?}");
    assert_eq!(
        records[0]["flags"],
        json!(["client_aborted", "incomplete"]),
        "{records:?}"
    );
}
