//! The mock provider: a small, fast HTTP/1.1 keep-alive server.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | drains the body, a small fixed JSON |
//! | `GET /sse?events=N&interval_ms=M` | `text/event-stream`, N events, one frame each, M ms apart |
//! | `GET /bytes?n=N` | N bytes in 64 KiB frames |
//! | `POST /upload` | drains the body, `{"bytes":N}` |
//!
//! Every route waits `delay_ms` (the query parameter, else the server's
//! default) before answering. When an expected `Authorization` value is
//! configured, any other value is answered with 401, so a proxy that fails
//! to swap the credential shows up as errors in the load tool.

mod body;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};

pub use body::{MockBody, CHUNK_SIZE, SSE_EVENT};

/// The answer of `POST /v1/chat/completions`.
pub const CHAT_RESPONSE: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

/// Default number of events of `/sse`.
const DEFAULT_EVENTS: u32 = 64;
/// Default interval of `/sse`, in milliseconds.
const DEFAULT_INTERVAL_MS: u64 = 2;
/// Default size of `/bytes`.
const DEFAULT_BYTES: u64 = 1024 * 1024;

/// How the mock answers.
#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    /// Wait before answering, unless the request has `?delay_ms=`.
    pub delay: Duration,
    /// When set, requests with another `Authorization` value get 401.
    pub expect_auth: Option<HeaderValue>,
}

/// Serves connections from `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, config: MockConfig) {
    let config = Arc::new(config);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or similar: back off briefly, no logging.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&config), req));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Listen backlog: a proxy whose keep-alive pool is smaller than the load
/// opens connections in bursts, which must not overflow the accept queue of
/// the mock (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 4096;

/// Binds `addr` and returns the listener and the address it got.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG)?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

async fn handle(
    config: Arc<MockConfig>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    if let Some(expected) = &config.expect_auth {
        if req.headers().get(AUTHORIZATION) != Some(expected) {
            return Ok(fixed(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                b"bad credential\n",
            ));
        }
    }
    let query = req.uri().query();
    let delay = query_u64(query, "delay_ms").map_or(config.delay, Duration::from_millis);
    let route = (req.method().clone(), req.uri().path());
    let response = match route {
        (Method::POST, "/v1/chat/completions") => match drain(req.into_body()).await {
            Some(_) => {
                pause(delay).await;
                fixed(StatusCode::OK, "application/json", CHAT_RESPONSE)
            }
            None => bad_body(),
        },
        (Method::POST, "/upload") => match drain(req.into_body()).await {
            Some(len) => {
                pause(delay).await;
                let json = format!("{{\"bytes\":{len}}}");
                with_type(
                    StatusCode::OK,
                    "application/json",
                    MockBody::once(Bytes::from(json)),
                )
            }
            None => bad_body(),
        },
        (Method::GET, "/sse") => {
            let events = query_u64(query, "events")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(DEFAULT_EVENTS);
            let interval = query_u64(query, "interval_ms").unwrap_or(DEFAULT_INTERVAL_MS);
            pause(delay).await;
            let mut response = with_type(
                StatusCode::OK,
                "text/event-stream",
                MockBody::sse(events, Duration::from_millis(interval)),
            );
            response
                .headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-cache"));
            response
        }
        (Method::GET, "/bytes") => {
            let len = query_u64(query, "n").unwrap_or(DEFAULT_BYTES);
            pause(delay).await;
            with_type(
                StatusCode::OK,
                "application/octet-stream",
                MockBody::filler(len),
            )
        }
        _ => fixed(StatusCode::NOT_FOUND, "text/plain", b"no such mock route\n"),
    };
    Ok(response)
}

/// Reads the whole body, counting its bytes; `None` if it failed.
async fn drain(mut body: Incoming) -> Option<u64> {
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.ok()?.data_ref() {
            len += data.len() as u64;
        }
    }
    Some(len)
}

async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn bad_body() -> Response<MockBody> {
    fixed(
        StatusCode::BAD_REQUEST,
        "text/plain",
        b"could not read body\n",
    )
}

fn fixed(
    status: StatusCode,
    content_type: &'static str,
    body: &'static [u8],
) -> Response<MockBody> {
    with_type(
        status,
        content_type,
        MockBody::once(Bytes::from_static(body)),
    )
}

fn with_type(status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The value of `key` in a `a=1&b=2` query, as a number.
fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Conn;
    use crate::peers::Target;
    use crate::sse::{self, SseSpec};

    #[tokio::test]
    async fn every_route_answers() {
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let config = MockConfig {
            delay: Duration::ZERO,
            expect_auth: Some(HeaderValue::from_static("Bearer k")),
        };
        let server = tokio::spawn(serve(listener, config));
        let mut conn = Conn::open(addr).await.unwrap();
        let auth = Some("Bearer k");
        let json = Some(Bytes::from_static(b"{}"));

        let (status, body) = conn
            .call(Method::POST, "/v1/chat/completions", auth, json.clone())
            .await
            .unwrap();
        assert_eq!((status, body.as_ref()), (StatusCode::OK, CHAT_RESPONSE));
        let (status, _) = conn
            .call(Method::POST, "/v1/chat/completions", Some("Bearer x"), json)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, body) = conn
            .call(Method::GET, "/bytes?n=100000&delay_ms=1", auth, None)
            .await
            .unwrap();
        assert_eq!((status, body.len()), (StatusCode::OK, 100_000));
        let upload = Bytes::from(vec![b'a'; 70_000]);
        let (_, body) = conn
            .call(Method::POST, "/upload", auth, Some(upload))
            .await
            .unwrap();
        assert_eq!(body.as_ref(), b"{\"bytes\":70000}");

        let target = Target {
            name: "direct".to_owned(),
            addr,
            prefix: String::new(),
            authorization: "Bearer k".to_owned(),
        };
        let spec = SseSpec {
            events: 3,
            interval_ms: 1,
        };
        let stream = sse::one_stream(&mut conn, &target, spec).await.unwrap();
        assert_eq!(stream.gaps_us.len(), 2);
        assert!(stream.first_event_us > 0.0);
        server.abort();
    }

    #[test]
    fn query_values() {
        assert_eq!(
            query_u64(Some("events=64&interval_ms=2"), "interval_ms"),
            Some(2)
        );
        assert_eq!(query_u64(Some("events=64"), "delay_ms"), None);
        assert_eq!(query_u64(Some("n=x"), "n"), None);
        assert_eq!(query_u64(None, "n"), None);
    }
}
