//! The proxy listener: accepts connections and serves HTTP/1.1 and HTTP/2
//! with the [`Proxy`] until shutdown, then drains in-flight calls.
//!
//! Limits against hostile or broken clients, all set from `[proxy]`:
//!
//! - at most `max_connections` open connections; one more is answered with
//!   a 503 JSON error and closed;
//! - a request head (line and headers) larger than `max_header_size` is
//!   answered 431 by hyper (HTTP/1.1, without a body) or h2 (HTTP/2) and the
//!   connection closed;
//! - HTTP/1.1: a client has `header_read_timeout` to send a complete head,
//!   counted from the moment the connection waits for a request — so a
//!   keep-alive connection idle that long is closed too (hyper's timeout
//!   only works because a timer is installed);
//! - any connection with no call in flight for `idle_timeout` is closed
//!   (what closes idle HTTP/2 connections, pings or not); before its first
//!   call the bound is the smaller of `idle_timeout` and
//!   `header_read_timeout` (hyper's timer starts only after the first
//!   bytes, so a client that sends nothing is caught here);
//! - HTTP/1.1 request heads are followed byte by byte ([`sniff`]) and a
//!   call whose framing the parser normalised is refused and its connection
//!   closed.

mod sniff;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::body::{BoxError, ProxyBody};
use crate::handler::Proxy;
use crate::headers::FramingAnomaly;
use sniff::{SharedVerdicts, Sniffer, Verdicts};

/// Most concurrent HTTP/2 streams on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Most header lines in an HTTP/1.1 request.
const MAX_HEADERS: usize = 100;
/// How long a connection closed for idleness may take to say goodbye.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The body of the answer to a connection over `max_connections`.
const OVERLOADED: &str = r#"{"error":{"type":"api_error","code":"overloaded","message":"too many open connections (proxy.max_connections)"}}"#;

/// Listener tunables.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Time allowed to receive a request's headers (HTTP/1.1), counted from
    /// when the connection is ready for a request.
    pub header_read_timeout: Duration,
    /// How long in-flight calls may run after shutdown begins.
    pub drain_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Largest request head, in bytes.
    pub max_header_size: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_header_size: 64 * 1024,
        }
    }
}

/// Serves `proxy` on `listener` until `shutdown` resolves, then waits up to
/// `drain_timeout` for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) {
    let builder = connection_builder(&settings);
    let max_connections = settings.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: proxy.max_connections reached");
            refuse_connection(&stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let verdicts = SharedVerdicts::default();
        let io = Sniffed {
            inner: stream,
            sniffer: Some(Sniffer::new(
                settings.max_header_size,
                Arc::clone(&verdicts),
            )),
        };
        let (busy_tx, busy_rx) = watch::channel(0usize);
        let busy = Arc::new(busy_tx);
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req| {
            let anomaly = Verdicts::take(&verdicts);
            let guard = Busy::enter(&busy);
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(handle(&proxy, req, anomaly, guard).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let stop = stop_rx.clone();
        // hyper's header read timeout starts only once hyper-util has seen
        // enough bytes to pick HTTP/1 or HTTP/2: a client that sends nothing
        // at all is bounded here instead.
        let first_timeout = settings.idle_timeout.min(settings.header_read_timeout);
        let idle_timeout = settings.idle_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let stopping = async move {
                let mut stop = stop;
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                () = stopping => {
                    connection.as_mut().graceful_shutdown();
                    Some(connection.as_mut().await)
                }
                () = idle(busy_rx, first_timeout, idle_timeout) => {
                    tracing::debug!(%peer, "closing idle connection");
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(IDLE_GRACE, connection.as_mut()).await.ok()
                }
            };
            if let Some(Err(e)) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(settings.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}

/// The HTTP/1.1 + HTTP/2 connection builder with every limit applied.
fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer, hyper's header read timeout does nothing.
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .max_headers(MAX_HEADERS)
        // The read buffer bounds the head: one that does not fit is a 431.
        // hyper requires at least 8 KiB.
        .max_buf_size(settings.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// One call: hands it to the proxy; a call whose framing was ambiguous is
/// refused by the proxy (see [`FramingAnomaly`]) and its connection closed.
async fn handle(
    proxy: &Proxy,
    mut req: Request<Incoming>,
    anomaly: Option<&'static str>,
    busy: Busy,
) -> Response<Tracked> {
    if let Some(what) = anomaly {
        tracing::debug!(anomaly = what, "ambiguous request framing");
        req.extensions_mut().insert(FramingAnomaly(what));
    }
    let mut response = proxy.handle(req).await;
    if anomaly.is_some() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response.map(|body| Tracked { body, _busy: busy })
}

/// Answers a connection over the limit with a 503 and closes it, without
/// waiting for anything.
fn refuse_connection(stream: &TcpStream) {
    let mut discard = [0u8; 4096];
    // Reading what already arrived makes a clean close (FIN, not RST) likelier.
    let _ = stream.try_read(&mut discard);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{OVERLOADED}",
        OVERLOADED.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// Resolves once the connection has had no call in flight for `limit`
/// (`first` before its first call).
async fn idle(mut busy: watch::Receiver<usize>, first: Duration, limit: Duration) {
    let mut wait = first;
    loop {
        if *busy.borrow_and_update() > 0 {
            if busy.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        }
        match tokio::time::timeout(wait, busy.changed()).await {
            Err(_) => return,
            Ok(Err(_)) => return std::future::pending().await,
            Ok(Ok(())) => wait = limit,
        }
    }
}

/// One call in flight on a connection, until its response body is gone.
struct Busy(Arc<watch::Sender<usize>>);

impl Busy {
    fn enter(count: &Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A response body that keeps its call counted as in flight.
struct Tracked {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, with every byte read shown to the sniffer
/// until it stops following.
struct Sniffed {
    inner: TcpStream,
    sniffer: Option<Sniffer>,
}

impl AsyncRead for Sniffed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(sniffer)) = (&polled, &mut this.sniffer) {
            sniffer.feed(&buf.filled()[before..]);
            if sniffer.is_off() {
                this.sniffer = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Sniffed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
