//! The mock's WebSocket routes (`/ws/...`): the handshake is recorded as
//! any request; the connection is then switched with hyper's upgrade and
//! served by tokio-tungstenite.
//!
//! - `/ws/echo`: echoes every text and binary message; the text `whoami`
//!   is answered with `{"authorization": "<the Authorization header the
//!   handshake carried>"}` (the real key, which airlock must redact); the
//!   text `close` makes the mock close the connection (code 1000).
//! - `/ws/extensions`: switches with `Sec-WebSocket-Extensions:
//!   permessage-deflate`, which nobody offered.
//! - `/v1/realtime`: OpenAI's Realtime API in miniature, for the SDK's
//!   client: a `session.created` event first, then every text message
//!   answered with a `mock.echo` event holding it and the `Authorization`
//!   header of the handshake.
//!
//! The first `Sec-WebSocket-Protocol` offered is accepted.

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::body::{full, MockBody};

/// Answers a handshake to `path`: `101` and a task serving the switched
/// connection, or `400` when the request is not a handshake.
pub(crate) fn handle(
    path: &str,
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
) -> Response<MockBody> {
    let (Some(key), Some(upgrade)) = (headers.get(header::SEC_WEBSOCKET_KEY), upgrade) else {
        let mut response = Response::new(full("not a websocket handshake"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|p| HeaderValue::from_str(p.trim()).ok());
    if let Some(protocol) = protocol {
        out.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    if path == "/ws/extensions" {
        out.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let realtime = path == "/v1/realtime";
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if realtime {
            realtime_echo(socket, &authorization).await;
        } else {
            echo(socket, &authorization).await;
        }
    });
    response
}

async fn echo<S>(mut socket: WebSocketStream<S>, authorization: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = socket.next().await {
        let reply = match message {
            Message::Text(text) if text.as_str() == "whoami" => {
                Message::text(serde_json::json!({ "authorization": authorization }).to_string())
            }
            Message::Text(text) if text.as_str() == "close" => {
                let _ = socket
                    .close(Some(CloseFrame {
                        code: 1000.into(),
                        reason: "bye".into(),
                    }))
                    .await;
                continue;
            }
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
    let _ = socket.close(None).await;
}

async fn realtime_echo<S>(mut socket: WebSocketStream<S>, authorization: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let created = serde_json::json!({
        "type": "session.created",
        "event_id": "event_mock_0",
        "session": {"id": "rs_mock", "object": "realtime.session", "model": "gpt-mock"},
    });
    if socket
        .send(Message::text(created.to_string()))
        .await
        .is_err()
    {
        return;
    }
    let mut n = 0u32;
    while let Some(Ok(message)) = socket.next().await {
        match message {
            Message::Text(text) => {
                n += 1;
                let reply = serde_json::json!({
                    "type": "mock.echo",
                    "event_id": format!("event_mock_{n}"),
                    "received": text.as_str(),
                    "authorization": authorization,
                });
                if socket.send(Message::text(reply.to_string())).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => break,
            _ => continue,
        }
    }
    let _ = socket.close(None).await;
}
