//! A minimal HTTP/1.1 client over one kept-alive connection, for the
//! measurements that need per-request timestamps (SSE, first-use tokens) and
//! for the admin API calls.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One open connection.
pub struct Conn {
    host: HeaderValue,
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects to `addr` (with `TCP_NODELAY`).
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            host: HeaderValue::from_str(&addr.to_string())?,
            sender,
        })
    }

    /// Sends a request for `target` (path and query) and returns the
    /// response head; the body is left to the caller.
    pub async fn send(
        &mut self,
        method: Method,
        target: &str,
        authorization: Option<&str>,
        json: Option<Bytes>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header(HOST, self.host.clone());
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        if json.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(json.unwrap_or_default()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| anyhow!("connection closed: {e}"))?;
        Ok(self.sender.send_request(request).await?)
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(
        &mut self,
        method: Method,
        target: &str,
        authorization: Option<&str>,
        json: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let response = self.send(method, target, authorization, json).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// The socket address of an `http://IP:PORT` base URL.
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url:?} is not an http:// URL"))?;
    let authority = rest.trim_end_matches('/');
    authority
        .parse()
        .with_context(|| format!("{url:?} does not name IP:PORT"))
}

/// Sends one call on a fresh connection and fails unless the status is
/// `expected`; returns the body.
pub async fn expect(
    addr: SocketAddr,
    method: Method,
    target: &str,
    authorization: Option<&str>,
    json: Option<Bytes>,
    expected: StatusCode,
) -> anyhow::Result<Bytes> {
    let mut conn = Conn::open(addr).await?;
    let (status, body) = conn
        .call(method.clone(), target, authorization, json)
        .await?;
    if status != expected {
        bail!(
            "{method} {target} on {addr} answered {status} (expected {expected}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            addr_of("http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        assert!(addr_of("https://127.0.0.1:1").is_err());
        assert!(addr_of("http://localhost:1").is_err());
    }
}
