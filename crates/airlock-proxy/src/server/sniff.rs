//! A look at the raw bytes of HTTP/1 requests before hyper parses them.
//!
//! hyper's parser is lenient in ways that are invisible once a request is
//! parsed: it takes a bare LF as a line end, keeps one of several equal
//! `Content-Length` headers, silently drops `Content-Length` when
//! `Transfer-Encoding` is present and cuts a `#fragment` off the target.
//! None of that can smuggle anything past airlock (it re-frames every
//! request it forwards), but each is a sign of an agent probing for a
//! parser difference, and airlock refuses such calls outright.
//!
//! The [`Sniffer`] follows the byte stream of one connection: request heads
//! line by line, then each body by its framing (fixed length, or chunked,
//! mirroring hyper's chunked decoder), so that it always knows where the
//! next head starts. For every head it queues a verdict (`None` or the
//! first anomaly); the service takes one verdict per request, in order. A
//! body whose chunked framing breaks amends the verdict of its request if
//! that request has not been dispatched yet. When the sniffer cannot follow
//! the stream any more (broken framing, a line longer than the head limit)
//! it stops, and every later request on the connection is refused. It also
//! stops after a head naming an `Upgrade`: what follows on the connection
//! is a WebSocket tunnel's bytes, or nothing (airlock closes a connection
//! whose upgrade it did not switch).
//! HTTP/2 connections (the prior-knowledge preface) are not followed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use crate::headers::FramingAnomaly;

/// Verdicts of the heads read so far, shared between the connection's
/// reader and its service.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    /// `(message number, first anomaly)` of heads not yet dispatched.
    queue: VecDeque<(u64, Option<&'static str>)>,
    /// The sniffer lost track of the framing: no verdict can be trusted.
    lost: bool,
    /// Why, when it is the request's own doing (a head too large): the
    /// verdict of every request after.
    lost_because: Option<&'static str>,
    /// The connection speaks HTTP/2: nothing to follow.
    http2: bool,
    /// The connection opened with a TLS handshake, not a request.
    tls_handshake: bool,
}

/// The verdicts of one connection.
pub(crate) type SharedVerdicts = Arc<Mutex<Verdicts>>;

/// Follows the request byte stream of one HTTP/1 connection.
pub(crate) struct Sniffer {
    state: State,
    /// The head line being read (without its LF).
    line: Vec<u8>,
    head: Head,
    /// Number of the next head.
    next: u64,
    /// Longest head followed (and so longest line).
    max_head: usize,
    verdicts: SharedVerdicts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading a head.
    Head,
    /// Skipping a fixed-length body: bytes left.
    Fixed(u64),
    /// Following a chunked body.
    Chunked(Chunk),
    /// Not following any more (HTTP/2, or lost).
    Off,
}

/// Positions in a chunked body, as in hyper's decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    Lws(u64),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What the head being read has said so far.
#[derive(Debug, Default)]
struct Head {
    /// Request line seen.
    started: bool,
    /// Bytes of the head's complete lines so far, line ends included.
    len: usize,
    anomaly: Option<&'static str>,
    http10: bool,
    content_lengths: usize,
    content_length: Option<u64>,
    /// A `Content-Length` that is not a number, or two that differ.
    bad_length: bool,
    transfer_encodings: usize,
    /// The last `Transfer-Encoding` line ends in `chunked`.
    chunked: bool,
    /// An `Upgrade` header: the connection carries no request after this
    /// one (switched, or answered and closed).
    upgrade: bool,
}

// === impl Verdicts ===

impl Verdicts {
    /// The verdict for the next request dispatched on this connection:
    /// `Some(reason)` when it must be refused.
    pub(crate) fn take(shared: &SharedVerdicts) -> Option<&'static str> {
        let mut verdicts = shared.lock().unwrap_or_else(PoisonError::into_inner);
        match verdicts.queue.pop_front() {
            Some((_, verdict)) => verdict,
            None if verdicts.http2 => None,
            None => Some(
                verdicts
                    .lost_because
                    .unwrap_or("the connection's framing could not be followed"),
            ),
        }
    }

    /// Whether the connection opened with a TLS handshake.
    pub(crate) fn opened_tls(shared: &SharedVerdicts) -> bool {
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tls_handshake
    }
}

// === impl Sniffer ===

impl Sniffer {
    /// A sniffer following heads of at most `max_head` bytes.
    pub(crate) fn new(max_head: usize, verdicts: SharedVerdicts) -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
            head: Head::default(),
            next: 0,
            max_head: max_head.saturating_add(2),
            verdicts,
        }
    }

    /// Whether the sniffer has stopped following the stream.
    pub(crate) fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// Follows `bytes`, the next bytes read from the connection.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Fixed(left) => {
                    let take = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[take..];
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Fixed(left)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let take = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[take..];
                    let left = left - take as u64;
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                State::Chunked(chunk) => {
                    self.step_chunk(chunk, bytes[0]);
                    bytes = &bytes[1..];
                }
                State::Head => {
                    if self.next == 0
                        && !self.head.started
                        && self.line.is_empty()
                        && super::misdirected::opens_tls(bytes)
                    {
                        // Not HTTP at all: hyper refuses it; the server
                        // tells the operator (see `misdirected`).
                        self.verdicts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .tls_handshake = true;
                        self.lose(None);
                        return;
                    }
                    let (line, rest) = match memchr::memchr(b'\n', bytes) {
                        Some(end) => (&bytes[..end], Some(&bytes[end + 1..])),
                        None => (bytes, None),
                    };
                    if self.head.len + self.line.len() + line.len() > self.max_head {
                        // Nothing left to follow. hyper refuses such a head
                        // (431) on a connection's first request, but after
                        // a call its own limit may be higher: refused then
                        // by the verdict.
                        self.verdicts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .lost_because = Some(FramingAnomaly::HEAD_TOO_LARGE.0);
                        self.lose(None);
                        return;
                    }
                    let Some(rest) = rest else {
                        self.line.extend_from_slice(line);
                        return;
                    };
                    if self.line.is_empty() {
                        // The whole line is in this read: no copy.
                        self.head_line(line);
                    } else {
                        self.line.extend_from_slice(line);
                        // Kept for the next line that spans reads.
                        let mut whole = std::mem::take(&mut self.line);
                        self.head_line(&whole);
                        whole.clear();
                        self.line = whole;
                    }
                    bytes = rest;
                }
            }
        }
    }

    /// One head line, without its LF.
    fn head_line(&mut self, line: &[u8]) {
        let line = match line.strip_suffix(b"\r") {
            Some(line) => line,
            None => {
                self.flag("a line ends in a bare LF");
                line
            }
        };
        if memchr::memchr(b'\r', line).is_some() {
            self.flag("a bare CR inside a line");
        }
        if !self.head.started {
            if line.is_empty() {
                // Empty lines before a request line are skipped (RFC 9112 §2.2).
                return;
            }
            self.request_line(line);
            self.head.len = line.len() + 2;
            return;
        }
        self.head.len += line.len() + 2;
        if line.is_empty() {
            self.end_of_head();
            return;
        }
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            self.flag("a folded header line");
            return;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            self.flag("a header line without a colon");
            return;
        };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.last().is_some_and(|b| b.is_ascii_whitespace()) {
            self.flag("whitespace before a header colon");
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_lengths += 1;
            if self.head.content_lengths > 1 {
                self.flag("more than one Content-Length");
            }
            match parse_length(value) {
                Some(length) if self.head.content_length.is_none_or(|l| l == length) => {
                    self.head.content_length = Some(length);
                }
                _ => {
                    self.head.bad_length = true;
                    self.flag("an invalid Content-Length");
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encodings += 1;
            let last = value.rsplit(|b| *b == b',').next().map(trim);
            self.head.chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        }
    }

    fn request_line(&mut self, line: &[u8]) {
        self.head.started = true;
        let mut parts = line.split(|b| *b == b' ');
        let (method, target, version) = (parts.next(), parts.next(), parts.next());
        if method == Some(b"PRI".as_slice()) && version == Some(b"HTTP/2.0".as_slice()) {
            // The HTTP/2 connection preface: hyper takes over.
            let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
            verdicts.http2 = true;
            self.state = State::Off;
            return;
        }
        if parts.next().is_some() {
            self.flag("extra spaces in the request line");
        }
        if target.is_some_and(|t| memchr::memchr(b'#', t).is_some()) {
            self.flag("a fragment in the request target");
        }
        self.head.http10 = version == Some(b"HTTP/1.0".as_slice());
    }

    /// The head is complete: queue its verdict, then follow its body.
    fn end_of_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        let mut anomaly = head.anomaly;
        if head.transfer_encodings > 0 && head.content_lengths > 0 {
            anomaly = anomaly.or(Some("Content-Length together with Transfer-Encoding"));
        }
        if head.transfer_encodings > 1 {
            anomaly = anomaly.or(Some("more than one Transfer-Encoding"));
        }
        {
            let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
            verdicts.queue.push_back((self.next, anomaly));
        }
        self.next += 1;
        // Framing exactly as hyper decides it.
        self.state = if head.upgrade {
            // What follows is another protocol's (a WebSocket tunnel), or
            // nothing: airlock closes a connection whose upgrade it refused.
            State::Off
        } else if head.transfer_encodings > 0 {
            if head.chunked && !head.http10 {
                State::Chunked(Chunk::Start)
            } else {
                // hyper refuses the request and closes the connection.
                State::Off
            }
        } else if head.bad_length {
            State::Off
        } else {
            match head.content_length {
                Some(length) if length > 0 => State::Fixed(length),
                _ => State::Head,
            }
        };
    }

    fn step_chunk(&mut self, chunk: Chunk, b: u8) {
        let next = match (chunk, b) {
            (Chunk::Start, _) => match hex(b) {
                Some(d) => Chunk::Size(u64::from(d)),
                None => return self.broken("a chunk size without digits"),
            },
            (Chunk::Size(size), _) if hex(b).is_some() => {
                let digit = hex(b).map_or(0, u64::from);
                match size.checked_mul(16).and_then(|s| s.checked_add(digit)) {
                    Some(size) => Chunk::Size(size),
                    None => return self.broken("a chunk size overflows"),
                }
            }
            (Chunk::Size(size) | Chunk::Lws(size), b' ' | b'\t') => Chunk::Lws(size),
            (Chunk::Size(size) | Chunk::Lws(size), b';') => Chunk::Ext(size),
            (Chunk::Size(size) | Chunk::Lws(size) | Chunk::Ext(size), b'\r') => Chunk::SizeLf(size),
            (Chunk::Ext(_), b'\n') => return self.broken("a bare LF in a chunk extension"),
            (Chunk::Ext(size), _) => Chunk::Ext(size),
            (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
            (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Start,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndLf, b'\n') => {
                self.state = State::Head;
                return;
            }
            _ => return self.broken("broken chunked framing"),
        };
        self.state = State::Chunked(next);
    }

    /// Records an anomaly of the head being read (the first one wins).
    fn flag(&mut self, what: &'static str) {
        self.head.anomaly = self.head.anomaly.or(Some(what));
    }

    /// The current body's framing broke: hyper fails it too.
    fn broken(&mut self, what: &'static str) {
        self.lose(Some(what));
    }

    /// Stops following. `what` amends the verdict of the request whose body
    /// broke, if that request has not been dispatched yet.
    fn lose(&mut self, what: Option<&'static str>) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        verdicts.lost = true;
        if let (Some(what), Some(current)) = (what, self.next.checked_sub(1)) {
            if let Some((number, verdict)) = verdicts.queue.back_mut() {
                if *number == current && self.state != State::Head {
                    *verdict = verdict.or(Some(what));
                }
            }
        }
        self.state = State::Off;
        self.line = Vec::new();
    }
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// A `Content-Length` value as hyper reads it: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

#[cfg(test)]
mod tests;
