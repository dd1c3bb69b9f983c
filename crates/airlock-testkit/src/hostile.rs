//! Tools for adversarial tests: a raw-bytes exchange that reports exactly
//! what the server answered (and whether it closed the connection), and a
//! scripted upstream that misbehaves on purpose — never answers, sends an
//! endless body, or streams events — and reports when airlock hangs up on
//! it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a server answered to raw bytes.
#[derive(Debug)]
pub struct Exchange {
    /// The status of the first response, if one arrived.
    pub status: Option<u16>,
    /// Header lines of the first response (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Its body (de-chunked), as lossy UTF-8.
    pub body: String,
    /// The server closed the connection (after answering or instead).
    pub closed: bool,
    /// Neither a complete response nor a close arrived in time.
    pub timed_out: bool,
    /// Everything read, as lossy UTF-8.
    pub raw: String,
    /// The connection, if still open, for further checks.
    pub stream: Option<TcpStream>,
}

impl Exchange {
    /// `error.code` of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()?
            .pointer("/error/code")?
            .as_str()
            .map(str::to_owned)
    }

    /// The value of response header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Waits up to `limit` for the server to close the connection; returns
    /// whether it did. Bytes that arrive meanwhile are discarded.
    pub async fn closes_within(&mut self, limit: Duration) -> bool {
        if self.closed {
            return true;
        }
        let Some(stream) = self.stream.as_mut() else {
            return true;
        };
        let closed = closes_within(stream, limit).await;
        if closed {
            self.closed = true;
            self.stream = None;
        }
        closed
    }
}

/// Waits up to `limit` for the peer to close `stream` (EOF or reset).
pub async fn closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The `host:port` of an `http://host:port` URL.
pub fn authority(base_url: &str) -> &str {
    base_url.trim_start_matches("http://").trim_end_matches('/')
}

/// Connects to `base_url`, writes `bytes` as they are and reads until one
/// complete response has arrived, the server closes, or `limit` passes.
pub async fn exchange(base_url: &str, bytes: &[u8], limit: Duration) -> Exchange {
    let mut stream = TcpStream::connect(authority(base_url))
        .await
        .expect("connect to the server");
    // The server may answer and close before reading everything.
    let _ = stream.write_all(bytes).await;
    read_response(stream, limit).await
}

/// Reads one response from `stream` (see [`exchange`]).
pub async fn read_response(mut stream: TcpStream, limit: Duration) -> Exchange {
    let deadline = tokio::time::Instant::now() + limit;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut closed = false;
    let mut timed_out = false;
    loop {
        if let Some(parsed) = parse_response(&raw) {
            if parsed.complete {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let parsed = parse_response(&raw);
    Exchange {
        status: parsed.as_ref().map(|p| p.status),
        headers: parsed
            .as_ref()
            .map(|p| p.headers.clone())
            .unwrap_or_default(),
        body: parsed.map(|p| p.body).unwrap_or_default(),
        closed,
        timed_out: timed_out && raw.is_empty(),
        raw: String::from_utf8_lossy(&raw).into_owned(),
        stream: (!closed).then_some(stream),
    }
}

struct Parsed {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    complete: bool,
}

/// Parses a response head and as much body as has arrived. `None` until the
/// head is complete.
fn parse_response(raw: &[u8]) -> Option<Parsed> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let (body, complete) = if bodiless {
        (Vec::new(), true)
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        (rest[..rest.len().min(len)].to_vec(), rest.len() >= len)
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)
    } else {
        (rest.to_vec(), false)
    };
    Some(Parsed {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        complete,
    })
}

/// The data of a chunked body so far, and whether its last chunk arrived.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// What a [`ScriptedUpstream`] does with each request.
#[derive(Clone, Copy, Debug)]
pub enum Script {
    /// Reads the request and never answers.
    Silent,
    /// Reads the request head, then neither reads the body nor answers for
    /// `drain_after`; then reads what was sent until airlock closes the
    /// connection (counted by [`ScriptedUpstream::hung_up`]).
    Stalled {
        /// How long the body is left unread.
        drain_after: Duration,
    },
    /// Answers 200 with a chunked body that never ends, written as fast as
    /// the connection takes it (64 KiB chunks).
    Endless,
    /// Answers 200 with `content-length: 100` and closes the connection
    /// before any byte of the body.
    HeadOnly,
    /// Answers 200 `text/event-stream` and sends `data: {"n":i}` every
    /// `interval`, forever.
    Events {
        /// Time between events.
        interval: Duration,
    },
    /// Answers every request with `status_line` (`404 Not Found`) and
    /// `body` of `content_type`, then closes the connection: a server that
    /// is not the one expected.
    Fixed {
        /// Status code and reason phrase.
        status_line: &'static str,
        /// The body's `content-type`.
        content_type: &'static str,
        /// The whole body.
        body: &'static str,
    },
    /// Answers every request with exactly these bytes (head and body, any
    /// framing), then closes the connection.
    Raw(&'static str),
}

/// A raw-TCP upstream that misbehaves on purpose and reports what happened:
/// requests received, body bytes sent, and connections that airlock closed.
pub struct ScriptedUpstream {
    addr: std::net::SocketAddr,
    state: Arc<UpstreamState>,
    server: JoinHandle<()>,
}

struct UpstreamState {
    script: Script,
    requests: AtomicUsize,
    sent: AtomicU64,
    /// Connections whose peer (airlock) went away while the script ran.
    hung_up: watch::Sender<usize>,
}

impl ScriptedUpstream {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("scripted upstream: bind");
        let addr = listener.local_addr().expect("scripted upstream: addr");
        let state = Arc::new(UpstreamState {
            script,
            requests: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            hung_up: watch::channel(0).0,
        });
        let server = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            connections.spawn(run_script(stream, Arc::clone(&state)));
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            }
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request heads received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Response body bytes written so far (accepted by the socket).
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::SeqCst)
    }

    /// Connections that airlock closed while the script was running.
    pub fn hung_up(&self) -> usize {
        *self.state.hung_up.borrow()
    }

    /// Waits up to `limit` until at least `n` connections were closed by
    /// airlock; returns how long that took, or `None` on timeout.
    pub async fn wait_hung_up(&self, n: usize, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut rx = self.state.hung_up.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|count| *count >= n))
            .await
            .ok()
            .map(|_| started.elapsed())
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn run_script(mut stream: TcpStream, state: Arc<UpstreamState>) {
    let _ = stream.set_nodelay(true);
    // Read the request head (bodies are not expected by these scripts).
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 1 << 20 {
            return;
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let (mut reader, mut writer) = stream.into_split();
    let unread_for = match state.script {
        Script::Stalled { drain_after } => drain_after,
        _ => Duration::ZERO,
    };
    // The peer going away is seen as EOF on the read side.
    let gone = async move {
        tokio::time::sleep(unread_for).await;
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let script = async {
        match state.script {
            Script::Silent => std::future::pending::<()>().await,
            Script::Stalled { .. } => std::future::pending::<()>().await,
            Script::Fixed {
                status_line,
                content_type,
                body,
            } => {
                let answer = format!(
                    "HTTP/1.1 {status_line}\r\ncontent-type: {content_type}\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = writer.write_all(answer.as_bytes()).await;
                let _ = writer.shutdown().await;
            }
            Script::Raw(answer) => {
                let _ = writer.write_all(answer.as_bytes()).await;
                let _ = writer.shutdown().await;
            }
            Script::HeadOnly => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: 100\r\n\r\n";
                let _ = writer.write_all(head).await;
                let _ = writer.shutdown().await;
            }
            Script::Endless => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                             transfer-encoding: chunked\r\n\r\n";
                if writer.write_all(head).await.is_err() {
                    return;
                }
                let mut chunk = b"10000\r\n".to_vec();
                chunk.extend(std::iter::repeat_n(b'a', 0x10000));
                chunk.extend_from_slice(b"\r\n");
                loop {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                    state.sent.fetch_add(0x10000, Ordering::SeqCst);
                }
            }
            Script::Events { interval } => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                             cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                if writer.write_all(head).await.is_err() {
                    return;
                }
                for n in 0u64.. {
                    let event = format!("data: {{\"n\":{n}}}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if writer.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    state.sent.fetch_add(event.len() as u64, Ordering::SeqCst);
                    tokio::time::sleep(interval).await;
                }
            }
        }
    };
    tokio::select! {
        () = gone => {}
        () = script => {}
    }
    state.hung_up.send_modify(|n| *n += 1);
}
