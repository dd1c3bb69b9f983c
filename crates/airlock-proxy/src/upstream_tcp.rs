//! TCP connections to upstreams, as the HTTP client sees them.
//!
//! hyper-util's `HttpConnector` labels each connection with its addresses
//! (`HttpInfo`), and the pooled client copies that label into the
//! extensions of every response — a map and a box allocated per call for
//! nobody to read (airlock rebuilds the response's extensions anyway).
//! [`TcpConnector`] opens the same connections without the label.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

/// [`HttpConnector`], with connections that carry no address label.
#[derive(Clone, Debug)]
pub struct TcpConnector(HttpConnector);

/// One TCP connection opened by [`TcpConnector`].
#[derive(Debug)]
pub struct TcpConnection(TokioIo<TcpStream>);

type Connecting = Pin<Box<dyn Future<Output = Result<TcpConnection, ConnectError>> + Send>>;
type ConnectError = <HttpConnector as Service<Uri>>::Error;

// === impl TcpConnector ===

impl TcpConnector {
    /// Wraps `connector` (its timeouts and socket options apply).
    pub fn new(connector: HttpConnector) -> Self {
        Self(connector)
    }
}

impl Service<Uri> for TcpConnector {
    type Response = TcpConnection;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // Once per new connection, not per call.
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(TcpConnection) })
    }
}

// === impl TcpConnection ===

impl Connection for TcpConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for TcpConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl Write for TcpConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::client::legacy::connect::HttpInfo;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::net::TcpListener;

    use super::*;

    /// Serves `200 ok` on one connection at a local address.
    async fn one_connection_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let answer = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), answer)
                .await
                .unwrap();
        });
        addr
    }

    async fn get(connector_is_bare: bool) -> Response<hyper::body::Incoming> {
        let addr = one_connection_server().await;
        let uri: Uri = format!("http://{addr}/").parse().unwrap();
        let request = || {
            Request::get(uri.clone())
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        if connector_is_bare {
            let client = Client::builder(TokioExecutor::new())
                .build(TcpConnector::new(HttpConnector::new()));
            client.request(request()).await.unwrap()
        } else {
            let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
            client.request(request()).await.unwrap()
        }
    }

    #[tokio::test]
    async fn responses_carry_no_address_label() {
        // What the label looks like with the plain connector ...
        let labelled = get(false).await;
        assert!(labelled.extensions().get::<HttpInfo>().is_some());
        // ... and its absence through this one, with the answer intact.
        let bare = get(true).await;
        assert!(bare.extensions().get::<HttpInfo>().is_none());
        assert!(bare.extensions().is_empty());
        let body = bare.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"ok"));
    }
}
