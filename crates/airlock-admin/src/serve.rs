//! The admin API's listener: accepts connections and serves the
//! [`router`](crate::router) over HTTP/1.1 until shutdown, then finishes
//! the calls in flight.
//!
//! Limits against broken or hostile clients, all before any
//! authentication:
//!
//! - a client has [`ServeSettings::header_read_timeout`] to send a complete
//!   request head, counted from the moment the connection waits for one —
//!   so a client that connects and sends nothing, one that sends part of a
//!   head and stops, and a keep-alive connection idle that long are all
//!   closed (hyper's timeout only works because a timer is installed);
//! - a request head larger than [`ServeSettings::max_header_size`] (or of
//!   more than [`MAX_HEADER_LINES`] lines) is answered 431 and the
//!   connection closed;
//! - at most [`ServeSettings::max_connections`] connections are open; one
//!   more is answered with a 503 JSON error and closed;
//! - an `accept` that fails for want of descriptors pauses the loop rather
//!   than spin, and the episode is logged once
//!   ([`airlock_proxy::descriptors::AcceptErrors`]).
//!
//! Bodies are bounded by the router itself (a declared length over the
//! limit is refused at once, see [`crate::routes`]).
//!
//! A connection hyper is done with (its client closed it, or an answer
//! refused a body unread) is closed by sending FIN and discarding what the
//! client still sends for a moment ([`linger`]), so that a client still
//! writing a refused body reads its 413 rather than a reset.
//!
//! On shutdown the listener is closed at once (new connections are
//! refused), every open connection is told to finish (after the call in
//! flight; an idle one closes at once), and [`serve`] returns when they
//! all have (as `axum::serve` with graceful shutdown did).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use airlock_proxy::descriptors::AcceptErrors;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use crate::state::AdminState;

/// Most header lines of an admin request head.
pub const MAX_HEADER_LINES: usize = 100;

/// How long a connection hyper is done with keeps reading what its client
/// still sends before it is closed (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(2);

/// How much a closing connection reads and discards at most.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// The body of the answer to a connection over
/// [`ServeSettings::max_connections`] (the admin API's error shape).
const OVERLOADED: &str = r#"{"error":{"type":"api_error","code":"overloaded","message":"too many open admin API connections"}}"#;

/// Limits of the admin listener.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// Time allowed to receive a request head, counted from when the
    /// connection is ready for a request (so it also bounds keep-alive
    /// idleness and a connection that sends nothing).
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (at least 8 KiB, hyper's minimum).
    pub max_header_size: usize,
    /// Open admin connections at most; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// How long shutdown waits for open connections to finish their call
    /// (a client stalled mid-body or not reading its answer would hold it
    /// forever); then [`serve`] returns anyway.
    pub drain_timeout: Duration,
}

impl Default for ServeSettings {
    /// 30 s to send a head (as the proxy's `header_read_timeout`), heads of
    /// up to 64 KiB, and 64 connections: the descriptors kept back from
    /// the proxy for the admin API (see
    /// [`airlock_proxy::descriptors::RESERVED_DESCRIPTORS`]) hold a few
    /// dozen, far more than orchestrators, the CLI and metrics scrapes use.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_header_size: 64 * 1024,
            max_connections: 64,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves the admin API for `state` on `listener` until `shutdown`
/// resolves, then stops accepting, lets every connection finish its call
/// in flight and returns once all are closed (or `drain_timeout` passed).
///
/// # Errors
///
/// None at present: failed accepts are retried (see the module
/// documentation); the `io::Result` leaves room for listener errors that
/// should end the server.
pub async fn serve<F>(
    listener: TcpListener,
    state: Arc<AdminState>,
    settings: ServeSettings,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let router = crate::router(state);
    let builder = connection_builder(&settings);
    let max_connections = u32::try_from(settings.max_connections.max(1)).unwrap_or(u32::MAX);
    // Each open connection holds a slot; all slots back means all closed.
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let errors = AcceptErrors::new("admin");
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.as_mut() => break,
            accepted = accept(&listener, &errors) => accepted,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin connection refused: too many open");
            airlock_proxy::descriptors::refuse_connection(&stream, OVERLOADED);
            continue;
        };
        let router = router.clone();
        let service = service_fn(move |mut req: hyper::Request<Incoming>| {
            // The client's address, for what is logged about its requests.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            // Boxed: hyper hands the connection back only for a service
            // whose future is `Unpin`.
            Box::pin(async move { router.call(req).await })
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(serve_connection(connection, peer, stop_rx.clone(), slot));
    }
    // New connections are refused from here on; open ones finish their
    // call in flight (idle ones close at once).
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(settings.drain_timeout, slots.acquire_many(max_connections)).await;
    if drained.is_err() {
        tracing::warn!(
            open = (max_connections as usize).saturating_sub(slots.available_permits()),
            "admin API connections still busy after the drain timeout; leaving them"
        );
    }
    Ok(())
}

/// One connection as hyper serves it.
type Connection<S> = http1::Connection<TokioIo<TcpStream>, S>;

/// Serves one connection until it ends (asked to finish once `stop` says
/// so), then closes it with [`linger`].
async fn serve_connection<S>(
    mut connection: Connection<S>,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) where
    S: hyper::service::HttpService<Incoming, ResBody = axum::body::Body> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut stopping = false;
    let ended = {
        let stopped = stop.wait_for(|stop| *stop);
        tokio::pin!(stopped);
        std::future::poll_fn(|cx| {
            if !stopping && stopped.as_mut().poll(cx).is_ready() {
                stopping = true;
                Pin::new(&mut connection).graceful_shutdown();
            }
            connection.poll_without_shutdown(cx)
        })
        .await
    };
    match ended {
        // At shutdown there is no lingering: airlock is about to exit.
        Ok(()) if !stopping => linger(connection.into_parts().io.into_inner()).await,
        Ok(()) => {}
        Err(e) => tracing::debug!(%peer, error = %e, "admin connection ended with an error"),
    }
    drop(slot);
}

/// Closes a connection hyper is done with: sends FIN after the last answer,
/// then reads and discards what the client still sends (a body refused
/// unread) for a moment. Closed at once, a socket with unread bytes sends
/// a reset, and a client still writing its body may see that instead of the
/// answer (a 413) that is already on its way.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut discard = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match stream.read(&mut discard).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The next connection; failed accepts are retried, pausing while
/// descriptors are short (see [`AcceptErrors`]).
async fn accept(listener: &TcpListener, errors: &AcceptErrors) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                errors.accepted();
                return accepted;
            }
            Err(e) => {
                if let Some(pause) = errors.failed(&e) {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// The HTTP/1.1 connection builder with every limit applied.
fn connection_builder(settings: &ServeSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        // Without a timer, hyper's header read timeout does nothing.
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .max_headers(MAX_HEADER_LINES)
        // The read buffer bounds the head: one that does not fit is a 431.
        // hyper requires at least 8 KiB.
        .max_buf_size(settings.max_header_size.max(8192));
    builder
}
