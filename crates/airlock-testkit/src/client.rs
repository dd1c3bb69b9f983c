//! A plain HTTP/1.1 client for tests, and a raw-bytes sender for requests
//! that a client library would tidy up.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any one test call may take.
const LIMIT: Duration = Duration::from_secs(30);

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `error.code` of an airlock error body.
    pub fn error_code(&self) -> Option<String> {
        self.json()
            .pointer("/error/code")
            .and_then(|c| c.as_str())
            .map(str::to_owned)
    }
}

/// Sends one request and reads the whole answer.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let call = async {
        let response = client.request(req).await.expect("request failed");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body failed")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("request timed out")
}

/// Sends `GET url` with `Authorization: Bearer {token}`, expects 200 and
/// reads the answer's first frame: returns that frame's data and the rest
/// of the body, still streaming.
pub async fn first_frame(url: &str, token: &str) -> (Bytes, hyper::body::Incoming) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let call = async {
        let response = client.request(req).await.expect("request failed");
        assert_eq!(response.status(), 200, "GET {url}");
        let mut body = response.into_body();
        let first = body.frame().await.expect("no first frame");
        let data = first.expect("body failed").into_data().expect("not data");
        (data, body)
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("request timed out")
}

/// Writes `bytes` to `base_url`'s host and port as they are and returns
/// everything the server answers until it closes the connection (send
/// `Connection: close`). Returns what was read if the server goes quiet for
/// `LIMIT`.
pub async fn raw(base_url: &str, bytes: &[u8]) -> String {
    let authority = base_url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `request` (one HTTP/1.1 request that airlock answers with a
/// JSON body, e.g. an error) on `stream` and reads the answer through the
/// end of that body, leaving the connection open: proof that airlock has
/// accepted the connection and holds it (kept alive).
pub async fn answer_on(stream: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).ends_with('}') {
        let n = tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw HTTP/1.1 answer (0 if none).
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
