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
//! - `/ws/split-key`: first sends, as raw frames written one at a time,
//!   the text message `{"authorization": "<the handshake's Authorization>"}`
//!   split in two fragments in the middle of the key, with a ping between
//!   them; then serves as `/ws/echo`.
//! - `/ws/hang-up`: sends the text message `bye` as one raw frame and
//!   closes the TCP connection at once, without a close handshake.
//! - `/ws/sink`: reads whatever arrives, sends nothing, and keeps every
//!   byte for [`crate::MockProvider::websocket_received`].
//! - `/v1/realtime`: OpenAI's Realtime API in miniature, for the SDK's
//!   client: a `session.created` event first, then every text message
//!   answered with a `mock.echo` event holding it and the `Authorization`
//!   header of the handshake.
//!
//! The first `Sec-WebSocket-Protocol` offered is accepted.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::body::{full, MockBody};
use super::Shared;

/// Answers a handshake to `path`: `101` and a task serving the switched
/// connection, or `400` when the request is not a handshake.
pub(crate) fn handle(
    shared: &Arc<Shared>,
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
    let path = path.to_owned();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        match path.as_str() {
            "/ws/hang-up" => {
                let _ = io.write_all(&server_frame(true, 0x1, b"bye")).await;
                // Dropped: the connection closes without a close handshake.
                return;
            }
            "/ws/sink" => {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    shared.ws_received.lock().extend_from_slice(&buf[..n]);
                }
                shared.ws_sinks_ended.send_modify(|n| *n += 1);
                return;
            }
            "/ws/split-key" if split_key(&mut io, &authorization).await.is_err() => return,
            _ => {}
        }
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        if path == "/v1/realtime" {
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

/// An unmasked server frame: `fin`, `opcode`, `payload` (7- and 16-bit
/// lengths only: the mock sends short messages).
fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    match u8::try_from(payload.len()) {
        Ok(n) if n < 126 => out.push(n),
        _ => {
            out.push(126);
            out.extend_from_slice(
                &u16::try_from(payload.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
        }
    }
    out.extend_from_slice(payload);
    out
}

/// `/ws/split-key`'s message: `{"authorization": ...}` in two fragments cut
/// in the middle of the key (after `Bearer ` and 6 more bytes), a ping
/// between them; each written (and flushed) on its own, a moment apart, so
/// that they arrive in separate reads.
async fn split_key<S>(io: &mut S, authorization: &str) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let text = serde_json::json!({ "authorization": authorization }).to_string();
    let cut = text
        .find("Bearer ")
        .map_or(text.len() / 2, |at| at + "Bearer ".len() + 6)
        .min(text.len());
    let (first, rest) = text.as_bytes().split_at(cut);
    for frame in [
        server_frame(false, 0x1, first),
        server_frame(true, 0x9, b"between"),
        server_frame(true, 0x0, rest),
    ] {
        io.write_all(&frame).await?;
        io.flush().await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    Ok(())
}
