//! The proxy listener: accepts connections and serves HTTP/1.1 and HTTP/2
//! with the [`Proxy`] until shutdown, then drains in-flight calls.
//!
//! Limits against hostile or broken clients, all set from `[proxy]`:
//!
//! - at most `max_connections` open connections; one more is answered with
//!   a 503 JSON error and closed (`serve` lowers the setting to what the
//!   open files limit can hold, see [`crate::descriptors`]; an `accept`
//!   that fails anyway pauses the loop rather than spin);
//! - a request head (line and headers) larger than `max_header_size` is
//!   answered 431 by hyper (HTTP/1.1) or h2 (HTTP/2) and the connection
//!   closed; on HTTP/1.1 airlock puts a JSON error in hyper's answer to an
//!   unparseable head before a connection's first call ([`automatic`]);
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
//!
//! With [`ServerSettings::tls`] every connection is TLS (see [`crate::tls`]):
//! the handshake runs in the connection's own task, bounded by
//! `header_read_timeout`, so a slow client never holds up the accept loop;
//! the limits above then apply to the decrypted bytes (the sniffer reads
//! what hyper reads). ALPN picks HTTP/2 or HTTP/1.1. A TLS connection over
//! `max_connections` is closed without an answer (a plaintext 503 would
//! mean nothing to a TLS client, and a handshake is work the limit is
//! there to refuse). Without TLS, HTTP/1.1 and HTTP/2 with prior knowledge
//! (h2c) are served on the same port.
//!
//! On shutdown the listener is closed at once (new connections are
//! refused), open connections are told to finish (HTTP/1.1: after the call
//! in flight; HTTP/2: GOAWAY, streams in flight go on; one without a call
//! in flight gets a second, so a request head that never completes does
//! not hold the drain), and whatever still
//! runs after `drain_timeout` is cut; WebSocket tunnels first get a moment
//! ([`TUNNEL_GOODBYE`]) to send their close frames (1001) both ways.

mod automatic;
mod dormant;
mod misdirected;
mod sniff;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::body::{BoxError, ProxyBody};
use crate::descriptors::{AcceptErrors, AcceptFailure};
use crate::error::ErrorCode;
use crate::handler::{HeadTimer, Proxy};
use crate::headers::FramingAnomaly;
use crate::in_flight::{Entered, InFlightCount};
use crate::tls::ServerTls;
use crate::websocket::Tunnel;
use airlock_audit::Delivery;
use airlock_core::spaced::Spaced;
use automatic::Automatic;
use dormant::Dormant;
use misdirected::{Misdirection, MISDIRECTED};
use sniff::{SharedVerdicts, Sniffer, Verdicts};

/// Most concurrent HTTP/2 streams on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// How long a connection closed for idleness may take to say goodbye.
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// After the drain timeout, how long cut calls may take to let go of their
/// responses (HTTP/2 streams run in tasks of their own, which end once
/// they see their connection gone).
const CUT_GRACE: Duration = Duration::from_secs(2);
/// At the drain's end, how long open WebSocket tunnels may take to close
/// (their close handshakes, then their records) before they are cut.
const TUNNEL_GOODBYE: Duration = Duration::from_secs(2);
/// Connections refused at `max_connections`, warned about once a minute.
static FULL: Spaced = Spaced::new(60_000);
/// Connections closed for answers their agents did not take, warned about
/// once a minute.
static STALLED: Spaced = Spaced::new(60_000);
/// Requests hyper could not parse, warned about once a minute.
static UNPARSED: Spaced = Spaced::new(60_000);

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
    /// Serve HTTPS with this certificate (reloadable); `None`: plain TCP.
    pub tls: Option<Arc<ServerTls>>,
    /// Data-plane threads (at least one).
    pub workers: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_header_size: 64 * 1024,
            tls: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The running proxy listener: its worker threads and the switch that
/// stops them.
///
/// Connections are served by [`ServerSettings::workers`] threads, each with
/// a single-threaded runtime of its own that accepts from the shared
/// listener and keeps its own upstream connection pools: a call's HTTP
/// work runs from accept to upstream and back on one thread. What leaves
/// it: a store lookup for a token not yet cached (on the control runtime)
/// and the wait for the call's audit record (answered through the worker's
/// audit delivery). A worker that accepted a connection while clearly
/// busier than another hands it over once, before serving it.
pub struct ProxyServer {
    stop: watch::Sender<bool>,
    workers: Vec<oneshot::Receiver<()>>,
    /// One per worker, sent once it accepts connections.
    accepting: Vec<oneshot::Receiver<()>>,
    /// What is in flight, and the switch that ends a drain early.
    control: DrainControl,
}

/// Watches and ends a drain from outside [`ProxyServer::shutdown`] (which
/// takes the server): what is in flight, and [`DrainControl::cut_now`].
#[derive(Clone)]
pub struct DrainControl {
    cut: Arc<watch::Sender<bool>>,
    /// Each worker's calls in flight.
    calls: Vec<Arc<InFlightCount>>,
    /// Each worker's open connections.
    balance: Arc<Balance>,
}

/// Calls and connections open at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// Calls in flight (WebSocket tunnels included), until their responses
    /// are gone.
    pub calls: usize,
    /// Open proxy connections.
    pub connections: usize,
}

impl DrainControl {
    /// What is in flight now, over all workers.
    pub fn in_flight(&self) -> InFlight {
        InFlight {
            calls: self.calls.iter().map(|c| c.now()).sum(),
            connections: self
                .balance
                .open
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Ends the drain at once, as its timeout would: what still runs is
    /// cut (each cut call still queues its audit record). Before shutdown
    /// it takes effect when shutdown starts.
    pub fn cut_now(&self) {
        let _ = self.cut.send(true);
    }
}

impl ProxyServer {
    /// Starts the workers serving `proxy` on `listener`. Fails when the
    /// listener cannot be shared with them or a thread cannot be started
    /// (workers already started are stopped).
    pub fn start(
        listener: TcpListener,
        proxy: &Proxy,
        settings: &ServerSettings,
    ) -> std::io::Result<Self> {
        let listener = listener.into_std()?;
        let max_connections = settings.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(max_connections));
        let accept_errors = Arc::new(AcceptErrors::new("proxy"));
        let (stop, stop_rx) = watch::channel(false);
        let (cut, cut_rx) = watch::channel(false);
        let count = settings.workers.max(1);
        let (balance, inboxes) = Balance::new(count);
        let mut server = Self {
            stop,
            workers: Vec::new(),
            accepting: Vec::new(),
            control: DrainControl {
                cut: Arc::new(cut),
                calls: Vec::new(),
                balance: Arc::clone(&balance),
            },
        };
        for (index, inbox) in inboxes.into_iter().enumerate() {
            let (worker_proxy, delivery) = proxy.for_worker();
            let (accepting_tx, accepting_rx) = oneshot::channel();
            server.accepting.push(accepting_rx);
            let conn = Arc::new(ConnSettings::new(settings, worker_proxy));
            server.control.calls.push(Arc::clone(&conn.calls));
            let worker = Worker {
                index,
                listener: listener.try_clone()?,
                conn,
                delivery,
                accepting: accepting_tx,
                slots: Arc::clone(&slots),
                accept_errors: Arc::clone(&accept_errors),
                settings: settings.clone(),
                stop: stop_rx.clone(),
                cut: cut_rx.clone(),
                balance: Arc::clone(&balance),
                inbox,
            };
            let (done_tx, done_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("airlock-proxy-{index}"))
                .spawn(move || {
                    worker.run();
                    drop(done_tx);
                })?;
            server.workers.push(done_rx);
        }
        Ok(server)
    }

    /// Waits until every worker accepts connections (its runtime and its
    /// share of the listener are up). Fails when a worker could not start.
    pub async fn accepting(&mut self) -> std::io::Result<()> {
        for accepting in std::mem::take(&mut self.accepting) {
            if accepting.await.is_err() {
                return Err(std::io::Error::other("a proxy worker did not start"));
            }
        }
        Ok(())
    }

    /// What is in flight, and the switch that ends a drain early; usable
    /// while [`ProxyServer::shutdown`] runs.
    pub fn drain_control(&self) -> DrainControl {
        self.control.clone()
    }

    /// Stops accepting, waits up to `drain_timeout` (or until
    /// [`DrainControl::cut_now`]) for open connections to finish and cuts
    /// the rest. When this returns, every connection is
    /// gone (and every call's record queued).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for done in std::mem::take(&mut self.workers) {
            // An error only says the worker thread ended: done either way.
            let _ = done.await;
        }
    }
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        // A server dropped without `shutdown` still stops its workers.
        let _ = self.stop.send(true);
    }
}

/// One data-plane thread: its share of the listener, its own proxy (own
/// upstream pools) and its own count of calls in flight.
struct Worker {
    index: usize,
    listener: std::net::TcpListener,
    conn: Arc<ConnSettings>,
    /// Answers this worker's calls waiting for their audit records.
    delivery: Option<Delivery>,
    /// Told once the worker accepts connections.
    accepting: oneshot::Sender<()>,
    slots: Arc<Semaphore>,
    /// Failed accepts, shared by all workers (one log line per episode).
    accept_errors: Arc<AcceptErrors>,
    settings: ServerSettings,
    stop: watch::Receiver<bool>,
    /// Set to end the drain before `drain_timeout`.
    cut: watch::Receiver<bool>,
    balance: Arc<Balance>,
    /// Connections other workers accepted and handed to this one.
    inbox: mpsc::UnboundedReceiver<Handed>,
}

/// An accepted connection on its way to another worker, with its
/// `max_connections` slot.
struct Handed {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: OwnedSemaphorePermit,
    /// Counted on the receiving worker from the moment it was picked.
    counted: OpenConnection,
}

/// Keeps the workers' shares of connections even. Whichever worker wakes
/// first accepts (all of them wait on the one listener), so a burst of new
/// connections would otherwise pile onto one thread while the others idle;
/// a worker that holds more than the least loaded one passes the
/// connection on (one hand-off per connection, none per call).
struct Balance {
    /// Open connections per worker.
    open: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
}

impl Balance {
    fn new(workers: usize) -> (Arc<Self>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        let (inboxes, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let balance = Self {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            inboxes,
        };
        (Arc::new(balance), receivers)
    }

    /// The worker that should serve a connection `me` just accepted.
    fn pick(&self, me: usize) -> usize {
        let load = |i: usize| {
            self.open
                .get(i)
                .map_or(usize::MAX, |n| n.load(Ordering::Relaxed))
        };
        let (least, least_load) = (0..self.open.len())
            .map(|i| (i, load(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, 0));
        // Hysteresis: moving a connection costs a hand-off; keep it unless
        // this worker is clearly ahead.
        if load(me) > least_load + 1 {
            least
        } else {
            me
        }
    }

    /// Counts a connection on worker `index` until the guard is dropped.
    fn open(self: &Arc<Self>, index: usize) -> OpenConnection {
        if let Some(n) = self.open.get(index) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        OpenConnection {
            balance: Arc::clone(self),
            index,
        }
    }
}

/// One open connection in its worker's count.
struct OpenConnection {
    balance: Arc<Balance>,
    index: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(n) = self.balance.open.get(self.index) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Worker {
    /// Runs the worker's runtime until its connections are drained (or
    /// cut). Tasks still left when the runtime is dropped are dropped with
    /// it; a dropped call still queues its record.
    fn run(self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        match runtime {
            Ok(runtime) => runtime.block_on(self.serve()),
            Err(e) => tracing::error!(error = %e, "cannot start a proxy worker's runtime"),
        }
    }

    /// Accepts and serves connections until told to stop, then drains.
    async fn serve(self) {
        let Self {
            index,
            listener,
            conn,
            delivery,
            accepting,
            slots,
            accept_errors,
            settings,
            stop,
            cut,
            balance,
            mut inbox,
        } = self;
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "a proxy worker cannot use the listener");
                return;
            }
        };
        if let Some(delivery) = delivery {
            // Runs until the runtime goes, after the last connection.
            tokio::spawn(delivery.run());
        }
        let mut connections = JoinSet::new();
        let shutdown = stopped(stop.clone());
        // Nobody waiting is fine: the server may be shutting down already.
        let _ = accepting.send(());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer, slot, counted) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        accept_errors.accepted();
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            conn.proxy.count_refused_connection();
                            if let Some(refused) = FULL.count(airlock_core::spaced::monotonic_ms()) {
                                tracing::warn!(
                                    %peer,
                                    refused,
                                    max_connections = settings.max_connections,
                                    "proxy.max_connections ({}) open: a new \
                                     connection was refused (503 overloaded without TLS; closed \
                                     unanswered with TLS) ({refused} \
                                     since the last such warning; at most one a minute); raise \
                                     proxy.max_connections, or the open files limit it was lowered \
                                     to at start",
                                    settings.max_connections
                                );
                            }
                            if settings.tls.is_none() {
                                crate::descriptors::refuse_connection(&stream, OVERLOADED);
                            }
                            continue;
                        };
                        let target = balance.pick(index);
                        let counted = balance.open(target);
                        if target == index {
                            (stream, peer, slot, counted)
                        } else {
                            let Some(handed) = Handed::new(stream, peer, slot, counted) else {
                                continue;
                            };
                            let Some(back) = hand_off(&balance, target, handed) else {
                                continue;
                            };
                            // That worker takes no more connections: serve it here.
                            let Some(taken) = back.recount(&balance, index).take_over() else {
                                continue;
                            };
                            taken
                        }
                    }
                    Err(e) => {
                        // Out of descriptors: free the idle upstream
                        // connections, and pause rather than spin (the
                        // connection waits in the backlog), logged once.
                        if AcceptFailure::of(&e) == AcceptFailure::Resources {
                            let shed = conn.proxy.shed_idle_upstream();
                            if shed > 0 {
                                tracing::debug!(shed, "idle upstream connections closed");
                            }
                        }
                        if let Some(pause) = accept_errors.failed(&e) {
                            tokio::time::sleep(pause).await;
                        }
                        continue;
                    }
                },
                Some(handed) = inbox.recv() => match handed.take_over() {
                    Some(taken) => taken,
                    None => continue,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = &mut shutdown => break,
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
            }
            let conn = Arc::clone(&conn);
            let stop = stop.clone();
            let tls = settings.tls.as_ref().map(|tls| tls.acceptor());
            connections.spawn(async move {
                let _slot = slot;
                let _counted = counted;
                match tls {
                    None => conn.run(stream, peer, stop, Listener::Plain).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(conn.handshake_timeout, acceptor.accept(stream));
                        let stream = tokio::select! {
                            done = handshake => match done {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    if misdirected::not_tls(&e) {
                                        MISDIRECTED.report(Misdirection::PlainOnTls, peer);
                                    }
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            },
                            () = stopped(stop.clone()) => return,
                        };
                        conn.run(stream, peer, stop, Listener::Tls).await;
                    }
                }
            });
        }

        drop(listener);
        // Connections handed over from now on are closed at once (as if
        // still in the listener's backlog), and so are those already here.
        inbox.close();
        while inbox.try_recv().is_ok() {}
        let drain = tokio::time::timeout(settings.drain_timeout, async {
            while connections.join_next().await.is_some() {}
            // HTTP/2 streams run in tasks of their own and may outlive
            // their connection's future by a moment.
            conn.calls.none_left().await;
        });
        let ended = tokio::select! {
            drained = drain => drained.map_err(|_| "drain timeout reached"),
            () = stopped(cut) => Err("drain ended early"),
        };
        if let Err(why) = ended {
            tracing::warn!(
                connections = connections.len(),
                "{why}; closing remaining connections"
            );
            // Dropping a connection drops its HTTP/1.1 call; HTTP/2 streams
            // run in tasks of their own and end once they see the connection
            // gone. Either way a dropped call queues its record, so waiting
            // for the call count means the audit flush that follows writes
            // them. Those records say airlock cut the call, not that the
            // agent left.
            conn.proxy.cut_calls_in_flight();
            // Tunnels close with a close frame both ways (1001) and write
            // their records, within a bound; the rest is cut.
            conn.closing_tunnels.send_replace(true);
            // Calls waiting for their provider's answer answer 503 first.
            let _ = tokio::time::timeout(TUNNEL_GOODBYE, async {
                conn.tunnels.none_left().await;
                conn.proxy.cut_answered().await;
            })
            .await;
            connections.abort_all();
            while connections.join_next().await.is_some() {}
            if tokio::time::timeout(CUT_GRACE, conn.calls.none_left())
                .await
                .is_err()
            {
                tracing::warn!("calls still holding their responses after the drain timeout");
            }
        }
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Which kind of listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    Plain,
    Tls,
}

/// What every connection task needs.
struct ConnSettings {
    builder: auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    max_header_size: usize,
    first_timeout: Duration,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    /// Calls in flight on this worker's connections (until their responses
    /// are gone).
    calls: Arc<InFlightCount>,
    /// WebSocket tunnels open on this worker's connections.
    tunnels: Arc<InFlightCount>,
    /// Set when the drain ends with tunnels open: each says goodbye (a
    /// close frame both ways) before what still runs is cut.
    closing_tunnels: watch::Sender<bool>,
}

impl ConnSettings {
    fn new(settings: &ServerSettings, proxy: Proxy) -> Self {
        Self {
            builder: connection_builder(settings),
            proxy: Arc::new(proxy),
            max_header_size: settings.max_header_size,
            // hyper's header read timeout starts only once hyper-util has
            // seen enough bytes to pick HTTP/1 or HTTP/2: a client that
            // sends nothing at all is bounded here instead.
            first_timeout: settings.idle_timeout.min(settings.header_read_timeout),
            idle_timeout: settings.idle_timeout,
            handshake_timeout: settings.header_read_timeout,
            calls: Arc::new(InFlightCount::default()),
            tunnels: Arc::new(InFlightCount::default()),
            closing_tunnels: watch::Sender::new(false),
        }
    }

    /// Serves one connection (plain TCP, or TLS after the handshake) until
    /// it ends, is idle too long, or shutdown asks it to finish.
    async fn run<S>(
        &self,
        io: S,
        peer: std::net::SocketAddr,
        stop: watch::Receiver<bool>,
        listener: Listener,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let verdicts = SharedVerdicts::default();
        let activity = Arc::new(Activity::new());
        let io = Sniffed {
            inner: io,
            sniffer: Some(Sniffer::new(self.max_header_size, Arc::clone(&verdicts))),
            automatic: Automatic::watch(&activity),
        };
        let busy = Arc::clone(&activity);
        let proxy = Arc::clone(&self.proxy);
        let calls = Arc::clone(&self.calls);
        let opening = Arc::clone(&verdicts);
        // A WebSocket tunnel the connection's call opened, run below once
        // hyper has sent the 101 and let go of the connection.
        let switched: TunnelSlot = Arc::default();
        let slot = Arc::clone(&switched);
        let service = service_fn(move |req| {
            let anomaly = Verdicts::take(&verdicts);
            let guard = Busy::enter(&busy, &calls);
            let proxy = Arc::clone(&proxy);
            let slot = Arc::clone(&slot);
            async move { Ok::<_, Infallible>(handle(&proxy, req, anomaly, guard, &slot).await) }
        });
        let tunnel_activity = Arc::clone(&activity);
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        // The watchers are polled only when they woke, not on each of the
        // connection's many wake-ups (see `dormant`). `biased`: a connection
        // that ended is seen before a watcher that fired at the same time,
        // and shutdown before idleness.
        let (first, limit) = (self.first_timeout, self.idle_timeout);
        let watchers = Dormant::new(Box::pin(async move {
            tokio::select! {
                biased;
                () = stopped(stop) => Ending::Shutdown,
                ending = idle(&activity, first, limit) => ending,
            }
        }));
        let ended = tokio::select! {
            biased;
            ended = connection.as_mut() => Some(ended),
            ending = watchers => {
                connection.as_mut().graceful_shutdown();
                match ending {
                    // No call in flight: nothing to drain. A request head
                    // still coming in (a slow or stalled client) would
                    // otherwise hold the drain until header_read_timeout;
                    // it reached nothing, and its client may send it again.
                    Ending::Shutdown if tunnel_activity.in_flight.load(Ordering::Acquire) == 0 => {
                        match tokio::time::timeout(IDLE_GRACE, connection.as_mut()).await {
                            Ok(ended) => Some(ended),
                            // A call dispatched during the grace is drained
                            // like any other (none is, between polls, unless
                            // it counts here).
                            Err(_) if tunnel_activity.in_flight.load(Ordering::Acquire) > 0 => {
                                Some(connection.as_mut().await)
                            }
                            Err(_) => None,
                        }
                    }
                    Ending::Shutdown => Some(connection.as_mut().await),
                    Ending::Idle => {
                        tracing::debug!(%peer, "closing idle connection");
                        tokio::time::timeout(IDLE_GRACE, connection.as_mut()).await.ok()
                    }
                    Ending::Stalled => {
                        if let Some(closed) = STALLED.count(airlock_core::spaced::monotonic_ms()) {
                            tracing::warn!(
                                %peer,
                                closed,
                                "closed a connection whose calls had all waited proxy.idle_timeout \
                                 ({}) for the agent to take their answers (an agent that stopped \
                                 reading, or an HTTP/2 agent that never opened its flow-control \
                                 window); the calls' records say client_aborted ({closed} such \
                                 connections since the last such warning; at most one a minute)",
                                airlock_core::duration::format(limit)
                            );
                        }
                        tokio::time::timeout(IDLE_GRACE, connection.as_mut()).await.ok()
                    }
                }
            }
        };
        if let Some(Err(e)) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        let misdirected = listener == Listener::Plain && Verdicts::opened_tls(&opening);
        if misdirected {
            MISDIRECTED.report(Misdirection::TlsOnPlain, peer);
        }
        if let Some(&code) = tunnel_activity.unparsed.get() {
            // No call (nothing parsed to record), but not unseen either
            // (round 40): counted, and warned about at most once a minute
            // (a TLS handshake here has its own warning).
            self.proxy.count_unparsed(code);
            let due = || UNPARSED.count(airlock_core::spaced::monotonic_ms());
            if let Some(answered) = (!misdirected).then(due).flatten() {
                tracing::warn!(
                    %peer,
                    answered,
                    "a request that is not valid HTTP/1.1 was answered {} {code} and its \
                     connection closed ({answered} since the last such warning; at most one a \
                     minute): a client speaking another protocol, or a request head over \
                     proxy.max_header_size",
                    code.status().as_u16()
                );
            }
        }
        let tunnel = switched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tunnel) = tunnel {
            // The tunnel is a call in flight, and holds this connection's
            // slot, until it ends; shutdown's drain timeout cuts it with
            // the connection's task. hyper's timers are gone with the HTTP
            // connection: the tunnel applies `idle_timeout` itself.
            let _busy = Busy::enter(&tunnel_activity, &self.calls);
            let _open = Entered::enter(&self.tunnels);
            tunnel
                .run(self.idle_timeout, self.closing_tunnels.subscribe())
                .await;
        }
    }
}

/// Where a connection's call leaves the WebSocket tunnel it opened.
type TunnelSlot = Arc<Mutex<Option<Box<Tunnel>>>>;

/// Why a connection is asked to finish before its client ends it.
enum Ending {
    /// The server is shutting down.
    Shutdown,
    /// Every call in flight waited too long for the agent to take its
    /// answer.
    Stalled,
    /// No call in flight for too long.
    Idle,
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
        .max_headers(crate::headers::MAX_HEADER_LINES)
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
    switched: &TunnelSlot,
) -> Response<Tracked> {
    if let Some(what) = anomaly {
        tracing::debug!(anomaly = what, "ambiguous request framing");
        req.extensions_mut().insert(FramingAnomaly(what));
    }
    // A body airlock refuses is left unread, and hyper then closes the
    // connection after the answer: the answer says so, rather than leaving
    // the agent to find a closed socket under its next request (an answer
    // sent before the body arrived carried no `Connection: close`).
    let unread_body = req.version() < http::Version::HTTP_2 && !req.body().is_end_stream();
    // A request naming an upgrade ends HTTP on its connection: switched, or
    // answered and closed (hyper would otherwise keep a pending upgrade
    // around, and the sniffer stops following after such a head).
    let asked_upgrade =
        req.version() < http::Version::HTTP_2 && req.headers().contains_key(UPGRADE);
    let (mut response, tunnel) = proxy.handle(req, &busy.connection.head_timer).await;
    if let Some(tunnel) = tunnel {
        *switched.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
    }
    let refused = response.extensions().get::<ErrorCode>().is_some();
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if anomaly.is_some() || (unread_body && refused) || (asked_upgrade && !switching) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response.map(|body| Tracked::new(body, busy))
}

/// Passes an accepted connection to worker `target` (if that worker has
/// stopped, at shutdown, the connection is closed).
/// Hands `handed` to worker `target`; gives it back when that worker takes
/// no more connections (it is draining, or its thread is gone).
fn hand_off(balance: &Balance, target: usize, handed: Handed) -> Option<Handed> {
    match balance.inboxes.get(target) {
        Some(inbox) => inbox.send(handed).err().map(|returned| returned.0),
        None => Some(handed),
    }
}

/// A connection ready to serve: stream, peer, slot and count.
type Taken = (
    TcpStream,
    std::net::SocketAddr,
    OwnedSemaphorePermit,
    OpenConnection,
);

impl Handed {
    /// Attaches the connection to the calling worker's runtime; `None` (the
    /// connection closed) when it cannot be.
    fn take_over(self) -> Option<Taken> {
        match TcpStream::from_std(self.stream) {
            Ok(stream) => Some((stream, self.peer, self.slot, self.counted)),
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "could not take over a connection");
                None
            }
        }
    }

    /// Counts the connection on worker `index` instead.
    fn recount(mut self, balance: &Arc<Balance>, index: usize) -> Self {
        self.counted = balance.open(index);
        self
    }

    /// The connection detached from this worker's runtime; `None` (the
    /// connection closed, as if the client had gone) when it cannot be.
    fn new(
        stream: TcpStream,
        peer: std::net::SocketAddr,
        slot: OwnedSemaphorePermit,
        counted: OpenConnection,
    ) -> Option<Self> {
        match stream.into_std() {
            Ok(stream) => Some(Self {
                stream,
                peer,
                slot,
                counted,
            }),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "could not hand a connection over");
                None
            }
        }
    }
}

/// A connection's calls in flight and since when it has had none. Calls
/// only touch atomics; the idle timer reads them when it fires (no wake-up
/// per call).
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Whether any call has been made on the connection.
    served: AtomicBool,
    /// When the last call ended, in milliseconds after `opened`.
    idle_since_ms: AtomicU64,
    /// The calls' timer for the provider's answer.
    head_timer: HeadTimer,
    /// The refusal airlock put in place of hyper's answer to a first
    /// request it could not parse ([`automatic`]), counted when the
    /// connection ends.
    unparsed: std::sync::OnceLock<crate::error::ErrorCode>,
    /// Calls whose answer waits for an agent that has taken none of it:
    /// hyper holds the head or the first frame and has not asked for more.
    waiting_on_agent: AtomicUsize,
    /// Bumped whenever hyper asks a call's answer for more after a frame:
    /// the agent is taking what it is sent.
    agent_progress: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            head_timer: HeadTimer::default(),
            unparsed: std::sync::OnceLock::new(),
            waiting_on_agent: AtomicUsize::new(0),
            agent_progress: AtomicU64::new(0),
        }
    }
}

/// Resolves once the connection has had no call in flight for `limit`
/// (`first` before its first call): [`Ending::Idle`]; or once every call
/// in flight has waited on its agent, taking nothing, for a whole `limit`
/// (closed between one and two `limit`s after that began): [`Ending::Stalled`].
async fn idle(activity: &Activity, first: Duration, limit: Duration) -> Ending {
    let mut deadline = activity.opened + first;
    // The agent's progress at the last look, while every call waited on it.
    let mut stalled_at: Option<u64> = None;
    loop {
        tokio::time::sleep_until(deadline.into()).await;
        let in_flight = activity.in_flight.load(Ordering::Acquire);
        if in_flight > 0 {
            // Calls in flight keep a connection open, unless every one of
            // them waits for an agent that has taken nothing for a whole
            // `limit` (round 41: an HTTP/2 client that never opened its
            // flow-control window held its connection with a 401 airlock
            // could not send, for ever).
            let progress = activity.agent_progress.load(Ordering::Acquire);
            if activity.waiting_on_agent.load(Ordering::Acquire) >= in_flight {
                if stalled_at == Some(progress) {
                    return Ending::Stalled;
                }
                stalled_at = Some(progress);
            } else {
                stalled_at = None;
            }
            deadline = Instant::now() + limit;
            continue;
        }
        stalled_at = None;
        let bound = if activity.served.load(Ordering::Acquire) {
            limit
        } else {
            first
        };
        let since = Duration::from_millis(activity.idle_since_ms.load(Ordering::Acquire));
        let due = activity.opened + since + bound;
        if Instant::now() >= due {
            return Ending::Idle;
        }
        deadline = due;
    }
}

/// One call in flight on a connection (counted there and in the worker's
/// total), until its response body is gone.
struct Busy {
    connection: Arc<Activity>,
    all: Arc<InFlightCount>,
}

impl Busy {
    fn enter(connection: &Arc<Activity>, all: &Arc<InFlightCount>) -> Self {
        connection.served.store(true, Ordering::Release);
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        all.enter();
        Self {
            connection: Arc::clone(connection),
            all: Arc::clone(all),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = u64::try_from(self.connection.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.connection.idle_since_ms.store(now, Ordering::Release);
        self.connection.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.all.leave();
    }
}

/// A response body that keeps its call counted as in flight. The body is
/// dropped before the count (field order): once the count is down, the
/// call's record has been queued. It also tells the connection whether the
/// answer waits for an agent that has taken none of it (`handed`: hyper
/// holds the head or the first frame and has not asked for more), and
/// counts hyper coming back for more as the agent's progress.
struct Tracked {
    body: ProxyBody,
    handed: bool,
    /// Frames given to hyper so far.
    frames: u32,
    _busy: Busy,
}

impl Tracked {
    /// `body`, just handed to hyper with its response head.
    fn new(body: ProxyBody, busy: Busy) -> Self {
        busy.connection
            .waiting_on_agent
            .fetch_add(1, Ordering::AcqRel);
        Self {
            body,
            handed: true,
            frames: 0,
            _busy: busy,
        }
    }

    /// Marks the answer as waiting on the agent (`true`) or not.
    fn set_handed(&mut self, handed: bool) {
        if self.handed == handed {
            return;
        }
        self.handed = handed;
        let waiting = &self._busy.connection.waiting_on_agent;
        if handed {
            waiting.fetch_add(1, Ordering::AcqRel);
        } else {
            waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.set_handed(false);
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.frames > 0 {
            // hyper is back for more: the agent took what it was given.
            this._busy
                .connection
                .agent_progress
                .fetch_add(1, Ordering::Relaxed);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let handed = matches!(polled, Poll::Ready(Some(Ok(_))));
        if handed {
            this.frames = this.frames.saturating_add(1);
        }
        // The head, or the first frame, given to hyper waits for the agent
        // until hyper asks for the next: what an answer the agent never
        // takes looks like (airlock's own refusals are one frame). An
        // answer the agent has been taking frame by frame is never counted
        // so: how often hyper asks again follows the kernel's send buffer,
        // which can hold megabytes (round 42: steady slow readers of large
        // downloads were cut). A pending body waits for the provider.
        this.set_handed(handed && this.frames <= 1);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket (or TLS stream), with every byte read shown to
/// the sniffer until it stops following, and hyper's automatic answer to
/// an unparseable first request replaced by a JSON one ([`automatic`]).
struct Sniffed<S> {
    inner: S,
    sniffer: Option<Sniffer>,
    automatic: Automatic,
}

impl<S: AsyncWrite + Unpin> Sniffed<S> {
    /// Sends the JSON answer in place of a write of `len` bytes of hyper's
    /// automatic one (reported written); `None` when writes pass through.
    fn poll_replacing(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Option<Poll<std::io::Result<usize>>> {
        let (answer, sent) = match &mut self.automatic {
            Automatic::Replacing { answer, sent } => (answer, sent),
            Automatic::Answered => {
                return Some(Poll::Ready(Err(std::io::Error::other(
                    "the connection has been answered and is closing",
                ))))
            }
            Automatic::Watching(_) | Automatic::Passing => return None,
        };
        while *sent < answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        self.automatic = Automatic::Answered;
        Some(Poll::Ready(Ok(len)))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.automatic.is_passing() && !buf.is_empty() {
            this.automatic.decide(buf);
            if let Some(polled) = this.poll_replacing(cx, buf.len()) {
                return polled;
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.automatic.is_passing() {
            let first = automatic::first_slice(bufs);
            if !first.is_empty() {
                this.automatic.decide(first);
                let len = bufs.iter().map(|b| b.len()).sum();
                if let Some(polled) = this.poll_replacing(cx, len) {
                    return polled;
                }
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's writer over a pipe that takes 16 bytes at a time
    /// (`served`: whether a call was dispatched), and a task collecting
    /// everything that reaches the other end.
    fn writer_over_pipe(
        served: bool,
    ) -> (
        Sniffed<tokio::io::DuplexStream>,
        tokio::task::JoinHandle<Vec<u8>>,
    ) {
        use tokio::io::AsyncReadExt;

        let (near, mut far) = tokio::io::duplex(16);
        let activity = Arc::new(Activity::new());
        activity.served.store(served, Ordering::Release);
        let io = Sniffed {
            inner: near,
            sniffer: None,
            automatic: Automatic::watch(&activity),
        };
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            far.read_to_end(&mut seen).await.unwrap();
            seen
        });
        (io, reader)
    }

    /// hyper's automatic answer written through the pipe: the peer reads
    /// airlock's whole JSON answer instead, hyper is told all its bytes
    /// went out, and a later write fails.
    #[tokio::test]
    async fn an_automatic_answer_is_replaced_through_partial_writes() {
        use tokio::io::AsyncWriteExt;

        let (mut io, reader) = writer_over_pipe(false);
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        io.write_all(hyper).await.unwrap();
        assert!(io.write_all(b"more").await.is_err());
        drop(io);
        let seen = String::from_utf8(reader.await.unwrap()).unwrap();
        let (head, body) = seen.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{seen}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "headers_too_large");
    }

    /// On a connection that has served a call, the same bytes pass as they
    /// are.
    #[tokio::test]
    async fn after_a_call_writes_pass_untouched() {
        use tokio::io::AsyncWriteExt;

        let (mut io, reader) = writer_over_pipe(true);
        let hyper = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        io.write_all(hyper).await.unwrap();
        io.write_all(b"more").await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), [&hyper[..], b"more"].concat());
    }

    #[test]
    fn a_burst_accepted_by_one_worker_is_spread_evenly() {
        let (balance, _inboxes) = Balance::new(4);
        // Worker 0 wins every accept of a burst of 64 connections.
        let open: Vec<OpenConnection> = (0..64)
            .map(|_| {
                let target = balance.pick(0);
                balance.open(target)
            })
            .collect();
        let loads: Vec<usize> = balance
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        assert_eq!(loads.iter().sum::<usize>(), 64);
        let (min, max) = (loads.iter().min(), loads.iter().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 2),
            "{loads:?}"
        );
        drop(open);
        assert!(balance.open.iter().all(|n| n.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_worker_keeps_a_connection_unless_clearly_ahead() {
        let (balance, _inboxes) = Balance::new(2);
        assert_eq!(balance.pick(0), 0);
        let first = balance.open(0);
        assert_eq!(balance.pick(0), 0, "one ahead is within the hysteresis");
        let second = balance.open(0);
        assert_eq!(balance.pick(0), 1, "two ahead: pass it on");
        assert_eq!(balance.pick(1), 1);
        drop((first, second));
        assert_eq!(balance.pick(0), 0);
    }

    #[tokio::test]
    async fn a_worker_that_takes_no_more_connections_gives_them_back() {
        let (balance, mut inboxes) = Balance::new(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slots = Arc::new(Semaphore::new(4));
        let handed = || async {
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let slot = Arc::clone(&slots).try_acquire_owned().unwrap();
            Handed::new(stream, peer, slot, balance.open(1)).unwrap()
        };
        // Worker 1 takes connections while its inbox is open...
        assert!(hand_off(&balance, 1, handed().await).is_none());
        assert!(inboxes[1].try_recv().is_ok());
        // ...and gives them back once it is closed (draining, or gone).
        inboxes[1].close();
        let back = hand_off(&balance, 1, handed().await).expect("given back");
        let back = back.recount(&balance, 0);
        assert_eq!(balance.open[0].load(Ordering::Relaxed), 1);
        assert_eq!(balance.open[1].load(Ordering::Relaxed), 0);
        assert!(back.take_over().is_some());
    }
}
