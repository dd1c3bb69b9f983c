//! A data-plane worker's connections to one provider's upstream.
//!
//! Every worker keeps its own pool per provider, so a pool is only ever
//! touched from one thread and its lock is never contended. An HTTP/1
//! connection is lent to one call at a time and comes back when the
//! response body's last frame has passed through [`UpstreamBody`] (or at
//! once, for a response without a body); a body dropped before its end
//! takes the connection with it, since what is left of the body would have
//! to be read first. An HTTP/2 connection (negotiated by ALPN) is shared by
//! every call.
//!
//! This replaces hyper-util's pooled client on the request path: it keyed
//! a shared map by a SipHash of the authority on every checkout and return
//! and spawned a task per HTTP/1 call to return the connection once its
//! body was read — about a tenth of a call's instructions.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::{AgentBodyBroke, BoxError, RequestBody};
use crate::descriptors::{self, UpstreamSlot};
use crate::provider::UpstreamConnector;

/// Most idle HTTP/1 connections a pool keeps; the oldest go first.
const MAX_IDLE: usize = 1024;

/// Shortest idle timeout a pool takes (its reaper ticks at that period).
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Smallest read buffer hyper's HTTP/1 client accepts.
const MIN_READ_BUFFER: usize = 8192;

/// How a pool opens and keeps connections.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// An idle connection is closed after this long (at least a second).
    pub idle_timeout: Duration,
    /// Most bytes an HTTP/1 connection reads ahead (hyper's read buffer
    /// limit, at least 8 KiB); it also bounds a response head.
    pub read_buffer: usize,
}

/// One worker's connections to one upstream, for requests with bodies of
/// type `B`.
pub struct UpstreamPool<B = RequestBody> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    upstream: Upstream,
    idle: Mutex<Idle<B>>,
}

/// Where a pool's connections go and how they are opened: what two pools
/// to the same upstream have in common.
#[derive(Clone)]
struct Upstream {
    connector: UpstreamConnector,
    /// `scheme://authority`, what the connector is asked for.
    target: Uri,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header of every HTTP/1 request, made once. HTTP/2
    /// requests carry none (some front ends, Google's among them, refuse
    /// it there).
    host: HeaderValue,
    settings: PoolSettings,
}

struct Idle<B> {
    /// Oldest first; calls take the most recently returned.
    http1: VecDeque<IdleConnection<B>>,
    /// The shared HTTP/2 connection, once one was negotiated, and when a
    /// call last took it.
    http2: Option<(http2::SendRequest<B>, Instant)>,
    /// Whether the task that closes expired connections runs.
    reaping: bool,
}

struct IdleConnection<B> {
    sender: Http1Sender<B>,
    since: Instant,
}

/// A connection ready for one request.
enum Lent<B> {
    Http1(Http1Sender<B>),
    Http2(http2::SendRequest<B>),
}

/// An HTTP/1 connection's sender, which ends the connection's task when it
/// is dropped: a call that stops waiting (its answer took too long, its
/// session ended, shutdown cut it) or a body dropped before its end closes
/// the connection at once. hyper alone would go on writing the request
/// body for as long as the provider keeps the connection open without
/// reading it, holding the agent's body — and with it the agent's
/// connection — all that time.
struct Http1Sender<B> {
    sender: http1::SendRequest<B>,
    /// `None` for a WebSocket handshake's connection, which hands its
    /// socket to the tunnel and must not be cut under it.
    task: Option<tokio::task::AbortHandle>,
}

impl<B> std::ops::Deref for Http1Sender<B> {
    type Target = http1::SendRequest<B>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}

impl<B> std::ops::DerefMut for Http1Sender<B> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.sender
    }
}

impl<B> Drop for Http1Sender<B> {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a pooled connection can send: [`RequestBody`] on the request
/// path, any body in tests.
pub trait SentBody: Body<Data = Bytes, Error = Self::SendError> + Send + Unpin + 'static {
    /// The body's error.
    type SendError: Into<BoxError>;
}

impl<T> SentBody for T
where
    T: Body<Data = Bytes> + Send + Unpin + 'static,
    T::Error: Into<BoxError>,
{
    type SendError = T::Error;
}

impl<B> Default for Idle<B> {
    fn default() -> Self {
        Self {
            http1: VecDeque::new(),
            http2: None,
            reaping: false,
        }
    }
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect: {0}")]
    Connect(BoxError),
    #[error("connection handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Request(hyper::Error),
    #[error("the request target cannot be sent: {0}")]
    Target(http::Error),
}

impl UpstreamError {
    /// Whether no connection could be opened for want of descriptors or
    /// memory in this process or system ([`descriptors::is_resource_shortage`]).
    pub fn is_resource_shortage(&self) -> bool {
        match self {
            Self::Connect(error) => {
                let error: &(dyn std::error::Error + 'static) = error.as_ref();
                descriptors::is_resource_shortage(error)
            }
            _ => false,
        }
    }

    /// Whether the request failed because the agent's body broke off
    /// ([`AgentBodyBroke`]) rather than anything on the provider's side.
    pub fn is_agent_body_broken(&self) -> bool {
        self.agent_body_break().is_some()
    }

    /// Whether the agent's body broke because its connection went away
    /// ([`AgentBodyBroke::agent_left`]).
    pub fn is_agent_gone(&self) -> bool {
        self.agent_body_break()
            .is_some_and(AgentBodyBroke::agent_left)
    }

    fn agent_body_break(&self) -> Option<&AgentBodyBroke> {
        let Self::Request(e) = self else {
            return None;
        };
        crate::error::cause::<AgentBodyBroke>(e)
    }
}

/// The provider's response body. It returns its HTTP/1 connection to the
/// pool when its last frame has been read.
pub struct UpstreamBody<B = RequestBody> {
    body: Incoming,
    /// The connection to return; `None` once returned or for HTTP/2.
    lease: Option<Lease<B>>,
    /// The call's part of the process's bound on calls in flight upstream
    /// ([`UpstreamSlot`]), until the answer is done with.
    slot: Option<UpstreamSlot>,
}

struct Lease<B> {
    sender: Http1Sender<B>,
    pool: Weak<Shared<B>>,
}

// === impl UpstreamPool ===

impl<B: SentBody> UpstreamPool<B> {
    /// An empty pool for `scheme://authority`, opening connections with
    /// `connector`; HTTP/1 requests are sent with `Host: host`.
    pub fn new(
        connector: UpstreamConnector,
        scheme: Scheme,
        authority: Authority,
        host: HeaderValue,
        mut settings: PoolSettings,
    ) -> Result<Self, http::Error> {
        settings.idle_timeout = settings.idle_timeout.max(MIN_IDLE_TIMEOUT);
        settings.read_buffer = settings.read_buffer.max(MIN_READ_BUFFER);
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        Ok(Self::to(Upstream {
            connector,
            target,
            scheme,
            authority,
            host,
            settings,
        }))
    }

    /// A new, empty pool to the same upstream with the same settings.
    pub fn empty_like(&self) -> Self {
        Self::to(self.shared.upstream.clone())
    }

    fn to(upstream: Upstream) -> Self {
        Self {
            shared: Arc::new(Shared {
                upstream,
                idle: Mutex::new(Idle::default()),
            }),
        }
    }

    /// Sends `req` (its URI in origin form: path and query) on an idle
    /// connection or a new one. A request that a reused connection closed
    /// before taking it is sent again on another.
    pub async fn send(
        &self,
        mut req: Request<B>,
        slot: UpstreamSlot,
    ) -> Result<Response<UpstreamBody<B>>, UpstreamError> {
        let mut slot = Some(slot);
        loop {
            let (lent, reused) = match self.shared.checkout() {
                Some(lent) => (lent, true),
                None => (self.shared.connect().await?, false),
            };
            let mut failed = match lent {
                Lent::Http1(mut sender) => {
                    self.shared.set_target(&mut req, false)?;
                    req.headers_mut()
                        .insert(HOST, self.shared.upstream.host.clone());
                    match sender.try_send_request(req).await {
                        Ok(response) => return Ok(self.shared.lend(response, sender, slot.take())),
                        Err(e) => e,
                    }
                }
                Lent::Http2(mut sender) => {
                    self.shared.set_target(&mut req, true)?;
                    req.headers_mut().remove(HOST);
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            return Ok(response.map(|body| UpstreamBody {
                                body,
                                lease: None,
                                slot: slot.take(),
                            }))
                        }
                        Err(e) => e,
                    }
                }
            };
            match failed.take_message() {
                Some(unsent) if reused => {
                    tracing::debug!("an idle upstream connection closed; sending again");
                    req = unsent;
                }
                _ => return Err(UpstreamError::Request(failed.into_error())),
            }
        }
    }

    /// Closes the idle connections (the shared HTTP/2 one once its calls
    /// in flight end) to free their descriptors; returns how many HTTP/1
    /// connections were idle. Calls in flight keep theirs.
    pub fn shed_idle(&self) -> usize {
        let mut idle = self.shared.idle();
        idle.http2 = None;
        let shed = idle.http1.len();
        idle.http1.clear();
        shed
    }
}

impl<B: SentBody> UpstreamPool<B> {
    /// Sends `req`, a protocol upgrade (a WebSocket handshake), on a new
    /// HTTP/1.1 connection of its own, opened with `connector` (which
    /// offers ALPN `http/1.1` only): never a pooled connection, and the
    /// connection never joins the pool. A `101` answer carries the
    /// connection's upgrade in its extensions (`hyper::upgrade::on`); its
    /// body holds the connection until dropped. Any other answer is read as
    /// usual, and the connection closes after it.
    pub async fn send_upgrade(
        &self,
        connector: &UpstreamConnector,
        mut req: Request<B>,
        slot: UpstreamSlot,
    ) -> Result<Response<UpstreamBody<B>>, UpstreamError> {
        let upstream = &self.shared.upstream;
        let io = connector
            .clone()
            .call(upstream.target.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            return Err(UpstreamError::Connect(
                "the provider chose HTTP/2 though only HTTP/1.1 was offered".into(),
            ));
        }
        let (mut sender, connection) = http1::Builder::new()
            .max_buf_size(upstream.settings.read_buffer)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(drive("HTTP/1 upgrade", connection.with_upgrades()));
        sender.ready().await.map_err(UpstreamError::Handshake)?;
        self.shared.set_target(&mut req, false)?;
        req.headers_mut().insert(HOST, upstream.host.clone());
        let response = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Request)?;
        // The sender stays with the body: a connection whose sender is
        // dropped closes, and this one may still have to switch. No pool
        // takes it back.
        Ok(response.map(|body| UpstreamBody {
            body,
            lease: Some(Lease {
                sender: Http1Sender { sender, task: None },
                pool: Weak::new(),
            }),
            slot: Some(slot),
        }))
    }
}

#[cfg(test)]
impl<B: SentBody> UpstreamPool<B> {
    /// HTTP/1 connections waiting for a call.
    fn idle_count(&self) -> usize {
        self.shared.idle().http1.len()
    }
}

impl<B> fmt::Debug for UpstreamPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("target", &self.shared.upstream.target)
            .finish_non_exhaustive()
    }
}

// === impl Shared ===

impl<B: SentBody> Shared<B> {
    fn idle(&self) -> MutexGuard<'_, Idle<B>> {
        // The lists stay consistent whatever panicked while holding them.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared HTTP/2 connection, or the most recently returned HTTP/1
    /// one that is still open and not expired.
    fn checkout(&self) -> Option<Lent<B>> {
        let mut idle = self.idle();
        if let Some((shared, taken)) = &mut idle.http2 {
            if shared.is_ready() && taken.elapsed() < self.upstream.settings.idle_timeout {
                *taken = Instant::now();
                return Some(Lent::Http2(shared.clone()));
            }
            idle.http2 = None;
        }
        while let Some(connection) = idle.http1.pop_back() {
            if connection.since.elapsed() >= self.upstream.settings.idle_timeout {
                // The newest is expired: so are all the others.
                idle.http1.clear();
                return None;
            }
            if connection.sender.is_ready() {
                return Some(Lent::Http1(connection.sender));
            }
        }
        None
    }

    /// Opens a connection, HTTP/2 when the TLS handshake chose it.
    async fn connect(self: &Arc<Self>) -> Result<Lent<B>, UpstreamError> {
        let mut connector = self.upstream.connector.clone();
        let io = connector
            .call(self.upstream.target.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            tokio::spawn(drive("HTTP/2", connection));
            self.start_reaping();
            let mut idle = self.idle();
            // Calls that connected at once each get a connection; the
            // first one stays shared, the others close after their call.
            if !idle
                .http2
                .as_ref()
                .is_some_and(|(shared, _)| shared.is_ready())
            {
                idle.http2 = Some((sender.clone(), Instant::now()));
            }
            return Ok(Lent::Http2(sender));
        }
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.upstream.settings.read_buffer)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let task = tokio::spawn(drive("HTTP/1", connection)).abort_handle();
        let mut sender = Http1Sender {
            sender,
            task: Some(task),
        };
        self.start_reaping();
        sender.ready().await.map_err(UpstreamError::Handshake)?;
        Ok(Lent::Http1(sender))
    }

    /// The response, lending `sender` to its body until the body ends.
    fn lend(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: Http1Sender<B>,
        slot: Option<UpstreamSlot>,
    ) -> Response<UpstreamBody<B>> {
        response.map(|body| {
            let mut body = UpstreamBody {
                body,
                lease: Some(Lease {
                    sender,
                    pool: Arc::downgrade(self),
                }),
                slot,
            };
            if body.body.is_end_stream() {
                body.give_back();
            }
            body
        })
    }

    /// Keeps `sender`'s connection for the next call.
    fn put(&self, sender: Http1Sender<B>) {
        let mut idle = self.idle();
        if idle.http1.len() >= MAX_IDLE {
            idle.http1.pop_front();
        }
        idle.http1.push_back(IdleConnection {
            sender,
            since: Instant::now(),
        });
    }

    /// Puts `req`'s target in the form of the connection it goes out on:
    /// origin form (path and query) for HTTP/1, absolute for HTTP/2. An
    /// attempt after one on the other protocol changes it back.
    fn set_target(&self, req: &mut Request<B>, absolute: bool) -> Result<(), UpstreamError> {
        if req.uri().scheme().is_some() == absolute {
            return Ok(());
        }
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        (parts.scheme, parts.authority) = if absolute {
            (
                Some(self.upstream.scheme.clone()),
                Some(self.upstream.authority.clone()),
            )
        } else {
            (None, None)
        };
        *req.uri_mut() = Uri::from_parts(parts).map_err(|e| UpstreamError::Target(e.into()))?;
        Ok(())
    }

    /// Starts the task that closes connections idle for longer than the
    /// timeout, once per pool; it ends with the pool.
    fn start_reaping(self: &Arc<Self>) {
        {
            let mut idle = self.idle();
            if idle.reaping {
                return;
            }
            idle.reaping = true;
        }
        let pool = Arc::downgrade(self);
        let period = self.upstream.settings.idle_timeout;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let timeout = pool.upstream.settings.idle_timeout;
                let mut idle = pool.idle();
                idle.http1
                    .retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
                if idle
                    .http2
                    .as_ref()
                    .is_some_and(|(shared, taken)| taken.elapsed() >= timeout || shared.is_closed())
                {
                    idle.http2 = None;
                }
            }
        });
    }
}

/// Runs a connection until it closes.
async fn drive<F>(protocol: &'static str, connection: F)
where
    F: Future<Output = hyper::Result<()>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(protocol, error = %e, "upstream connection ended");
    }
}

// === impl UpstreamBody ===

impl<B> UpstreamBody<B> {
    /// Takes the call's slot ([`UpstreamSlot`]) from the answer, for
    /// whatever holds the upstream connection after it (a WebSocket
    /// tunnel, once the connection has switched).
    pub fn take_slot(&mut self) -> Option<UpstreamSlot> {
        self.slot.take()
    }
}

impl<B: SentBody> UpstreamBody<B> {
    /// Returns the connection to its pool: now when it can take another
    /// request, else once it can (its last bytes may still be in flight).
    fn give_back(&mut self) {
        let Some(Lease { mut sender, pool }) = self.lease.take() else {
            return;
        };
        if sender.is_ready() {
            if let Some(pool) = pool.upgrade() {
                pool.put(sender);
            }
            return;
        }
        if sender.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(idle_timeout) = pool.upgrade().map(|p| p.upstream.settings.idle_timeout) else {
            return;
        };
        // A provider that answered without reading the whole request body
        // gets as long as an idle connection would to take the rest; then
        // the connection closes.
        runtime.spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, sender.ready()).await {
                if let Some(pool) = pool.upgrade() {
                    pool.put(sender);
                }
            }
        });
    }
}

impl<B: SentBody> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            // Trailers come after the whole body: nothing follows them.
            Some(Ok(frame)) if !frame.is_trailers() && !this.body.is_end_stream() => {}
            Some(Ok(_)) | None => this.give_back(),
            // The connection goes down with the body.
            Some(Err(_)) => this.lease = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("leased", &self.lease.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
