//! A recording mock provider: an in-process hyper HTTP/1.1 server (with
//! WebSocket routes under `/ws/`, see `mock/websocket.rs`).

mod body;
mod routes;

pub use routes::MOCK_REQUEST_ID;
mod websocket;

/// The mock's request handler, for the TLS mock (`crate::tls`) that serves
/// the same routes.
pub(crate) use routes::handle;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Most body bytes kept in [`RecordedRequest::body`] (1 MiB).
pub const MAX_RECORDED_BODY: usize = 1024 * 1024;

/// How long [`MockProvider::wait_for_requests`] waits before panicking.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// The request target exactly as received (origin form: path and query).
    pub path_and_query: String,
    /// Header lines with lower-case names and raw values. Lines keep their
    /// arrival order, except that repeated names are grouped with the first
    /// line of that name (this is how hyper's `HeaderMap` stores them).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The first [`MAX_RECORDED_BODY`] bytes of the body.
    pub body: Bytes,
    /// Number of body bytes actually received.
    pub body_len: u64,
    /// Trailer fields after the body (lower-case names, raw values), if any.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive), as lossy UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// All values of header `name` (case-insensitive), in order, as lossy UTF-8.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The target up to (not including) the first `?`.
    pub fn path(&self) -> &str {
        match self.path_and_query.split_once('?') {
            Some((path, _)) => path,
            None => &self.path_and_query,
        }
    }

    /// The target after the first `?`, if there is one.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// True if `needle` appears anywhere in the request: the target, any
    /// header or trailer name or value, or the recorded body.
    pub fn contains(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        contains_bytes(self.path_and_query.as_bytes(), needle)
            || contains_bytes(self.method.as_bytes(), needle)
            || self
                .headers
                .iter()
                .chain(&self.trailers)
                .any(|(name, value)| {
                    contains_bytes(name.as_bytes(), needle) || contains_bytes(value, needle)
                })
            || contains_bytes(&self.body, needle)
    }
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A request being or having been recorded.
struct Entry {
    seq: u64,
    complete: bool,
    method: String,
    path_and_query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    body_len: u64,
    trailers: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn to_recorded(&self) -> RecordedRequest {
        RecordedRequest {
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            headers: self.headers.clone(),
            body: Bytes::copy_from_slice(&self.body),
            body_len: self.body_len,
            trailers: self.trailers.clone(),
        }
    }
}

#[derive(Default)]
struct Log {
    next_seq: u64,
    entries: Vec<Entry>,
}

impl Log {
    fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        // In-flight requests are nearly always at the end.
        self.entries.iter_mut().rev().find(|e| e.seq == seq)
    }

    fn complete_count(&self) -> usize {
        self.entries.iter().filter(|e| e.complete).count()
    }
}

/// State shared between the handle and the server.
pub(crate) struct Shared {
    log: Mutex<Log>,
    /// Number of fully recorded entries currently in the log.
    complete: watch::Sender<usize>,
    /// Permits released by [`MockProvider::open_gate`].
    gate: Semaphore,
    /// TCP connections accepted so far.
    accepted: AtomicUsize,
    /// Connections served to their end (closed by the client, mostly).
    ended: watch::Sender<usize>,
    /// Every byte the `/ws/sink` route received after its switch.
    pub(crate) ws_received: Mutex<Vec<u8>>,
    /// `/ws/sink` connections read to their end (closed by airlock).
    pub(crate) ws_sinks_ended: watch::Sender<usize>,
}

impl Shared {
    /// Counts a connection just accepted.
    pub(crate) fn count_connection(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection whose serving ended.
    pub(crate) fn count_ended(&self) {
        self.ended.send_modify(|n| *n += 1);
    }

    /// Records a request whose head just arrived; returns its sequence number.
    fn begin(
        &self,
        method: String,
        path_and_query: String,
        headers: Vec<(String, Vec<u8>)>,
    ) -> u64 {
        let mut log = self.log.lock();
        let seq = log.next_seq;
        log.next_seq += 1;
        log.entries.push(Entry {
            seq,
            complete: false,
            method,
            path_and_query,
            headers,
            body: Vec::new(),
            body_len: 0,
            trailers: Vec::new(),
        });
        seq
    }

    /// Adds a body chunk to request `seq` (ignored if it was cleared).
    fn append(&self, seq: u64, chunk: &[u8]) {
        let mut log = self.log.lock();
        if let Some(entry) = log.entry_mut(seq) {
            entry.body_len += chunk.len() as u64;
            let room = MAX_RECORDED_BODY.saturating_sub(entry.body.len());
            entry
                .body
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }

    /// Records the trailer fields of request `seq`.
    fn trailers(&self, seq: u64, fields: &http::HeaderMap) {
        let mut log = self.log.lock();
        if let Some(entry) = log.entry_mut(seq) {
            entry.trailers.extend(
                fields
                    .iter()
                    .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())),
            );
        }
    }

    /// Marks request `seq` as fully recorded (its body ended or failed).
    fn finish(&self, seq: u64) {
        let mut log = self.log.lock();
        if let Some(entry) = log.entry_mut(seq) {
            entry.complete = true;
        }
        let count = log.complete_count();
        self.complete.send_replace(count);
    }
}

/// A recording mock upstream provider on `127.0.0.1:<random port>`.
///
/// Every request is recorded as soon as its head arrives; its body and
/// `body_len` are updated while the body is read. The mock reads the whole
/// request body before answering, so a request is complete by the time its
/// response starts. [`request_count`](Self::request_count) and
/// [`requests`](Self::requests) include requests still receiving their body;
/// [`wait_for_requests`](Self::wait_for_requests) counts only complete ones.
///
/// The server (and every open connection) stops when this is dropped.
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl MockProvider {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start() -> MockProvider {
        Self::start_with(|listener, shared| tokio::spawn(serve(listener, shared))).await
    }

    /// Binds `127.0.0.1:0` and hands the listener and the recording state
    /// to `spawn`, which starts the server task (the TLS mock's hook).
    pub(crate) async fn start_with(
        spawn: impl FnOnce(TcpListener, Arc<Shared>) -> JoinHandle<()>,
    ) -> MockProvider {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("mock provider: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock provider: local_addr");
        let (complete, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            complete,
            gate: Semaphore::new(0),
            accepted: AtomicUsize::new(0),
            ended: watch::channel(0).0,
            ws_received: Mutex::new(Vec::new()),
            ws_sinks_ended: watch::Sender::new(0),
        });
        let server = spawn(listener, shared.clone());
        MockProvider {
            addr,
            shared,
            server,
        }
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of every request recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .log
            .lock()
            .entries
            .iter()
            .map(Entry::to_recorded)
            .collect()
    }

    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` until at least `n` connections have ended
    /// (closed by airlock, or broken); returns whether they did.
    pub async fn wait_for_ended_connections(&self, n: usize, limit: Duration) -> bool {
        let mut ended = self.shared.ended.subscribe();
        tokio::time::timeout(limit, ended.wait_for(|count| *count >= n))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Every byte the `/ws/sink` WebSocket route received once switched
    /// (frames as they came, masked), all its connections together.
    pub fn websocket_received(&self) -> Vec<u8> {
        self.shared.ws_received.lock().clone()
    }

    /// Waits up to `limit` until `n` `/ws/sink` connections were read to
    /// their end (everything airlock sent on them is then in
    /// [`MockProvider::websocket_received`]); returns whether they were.
    pub async fn wait_for_ended_websocket_sinks(&self, n: usize, limit: Duration) -> bool {
        let mut ended = self.shared.ws_sinks_ended.subscribe();
        tokio::time::timeout(limit, ended.wait_for(|count| *count >= n))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// Number of requests recorded so far (including ones still in flight).
    pub fn request_count(&self) -> usize {
        self.shared.log.lock().entries.len()
    }

    /// Forgets every recorded request. Requests still in flight stop being
    /// recorded.
    pub fn clear(&self) {
        let mut log = self.shared.log.lock();
        log.entries.clear();
        self.shared.complete.send_replace(0);
    }

    /// Releases one waiting `/gated-sse` or `/gated-json` answer to send the
    /// rest of its body, or one `/gated-head` answer to be sent at all.
    /// A gate opened before any stream waits is kept for the next one.
    pub fn open_gate(&self) {
        self.shared.gate.add_permits(1);
    }

    /// Waits until at least `n` requests are fully recorded (head and body).
    ///
    /// # Panics
    /// After 30 s without reaching `n`, so a broken test fails instead of
    /// hanging.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.shared.complete.subscribe();
        let reached = tokio::time::timeout(WAIT_LIMIT, async {
            // The sender lives in `self.shared`, so this cannot fail.
            let _ = rx.wait_for(|count| *count >= n).await;
        })
        .await;
        if reached.is_err() {
            panic!(
                "mock provider: timed out after {WAIT_LIMIT:?} waiting for {n} requests; \
                 recorded: {:#?}",
                self.requests()
            );
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl std::fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockProvider")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .finish()
    }
}

/// Accept loop. Connections live in a `JoinSet` owned by this task, so
/// aborting the task also aborts every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.count_connection();
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                connections.spawn(async move {
                    let recording = shared.clone();
                    let service = service_fn(move |req| routes::handle(recording.clone(), req));
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                    shared.count_ended();
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
