//! The leak guard: replaces every occurrence of a real credential in what a
//! provider sends back (headers, trailers, bodies — streamed or not, split
//! across any number of chunks) with a mask of the same length (see
//! [`mask_for`]), without buffering whole responses.
//!
//! Redaction is length-preserving: a redacted body has exactly the length of
//! the upstream body, so the upstream `Content-Length` stays valid and
//! [`RedactingBody`] passes the inner body's size hint through.
//!
//! - [`Redactor`]: the secrets to look for, with their searchers built once.
//!   Cheap to clone (one `Arc`); build one per credential version.
//! - [`RedactState`]: per-response streaming state. It holds back at most
//!   (longest secret − 1) bytes, and only while the end of the data seen so
//!   far is a proper prefix of some secret: anything else, e.g. an SSE event
//!   ending in `"\n\n"`, is emitted at once. A chunk that contains no secret
//!   and does not end in a secret prefix is passed on as the same `Bytes`,
//!   without copying.
//! - [`RedactingBody`]: an [`http_body::Body`] wrapper applying a
//!   `RedactState` frame by frame (trailers are scrubbed too).
//!
//! Matching is on literal bytes only. An echo in another encoding (JSON
//! `\uXXXX` escapes, base64, percent-encoding, a different case) is not
//! recognised. Credentials are normally plain ASCII without characters that
//! JSON escapes, so a JSON echo is literal in practice.
//!
//! Where several secrets match, the replacement is the same as a one-shot
//! scan of the whole text: the leftmost match wins, and of matches starting
//! at the same byte the longest.

use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

/// What replaces a secret of at least this many bytes (21), padded with `*`
/// to the secret's length. Shorter secrets get a shortened marker (see
/// [`mask_for`]), so that a redacted text keeps its length.
pub const REDACTION_MARKER: &str = "[REDACTED BY AIRLOCK]";
/// The marker of secrets shorter than [`REDACTION_MARKER`], if long enough for it.
const SHORT_REDACTION_MARKER: &str = "[REDACTED]";
/// The shortest secret a [`Redactor`] accepts: shorter values would match ordinary text.
pub const MIN_SECRET_LEN: usize = 8;

/// The mask that replaces a secret of `len` bytes: exactly `len` bytes of
/// visible ASCII, depending on the length only (never on the secret's bytes).
///
/// - `len >= 21`: [`REDACTION_MARKER`] followed by `*` up to `len`;
/// - `10 <= len < 21`: `[REDACTED]` followed by `*` up to `len`;
/// - `len < 10`: `*` repeated `len` times.
///
/// ```
/// use airlock_proxy::redact::mask_for;
///
/// assert_eq!(mask_for(24), b"[REDACTED BY AIRLOCK]***");
/// assert_eq!(mask_for(12), b"[REDACTED]**");
/// assert_eq!(mask_for(8), b"********");
/// ```
pub fn mask_for(len: usize) -> Vec<u8> {
    let prefix = if len >= REDACTION_MARKER.len() {
        REDACTION_MARKER
    } else if len >= SHORT_REDACTION_MARKER.len() {
        SHORT_REDACTION_MARKER
    } else {
        ""
    };
    let mut mask = Vec::with_capacity(len);
    mask.extend_from_slice(prefix.as_bytes());
    mask.resize(len, b'*');
    mask
}

/// Why a [`Redactor`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedactorError {
    /// A secret is shorter than [`MIN_SECRET_LEN`].
    #[error(
        "a credential must be at least {MIN_SECRET_LEN} bytes long to be guarded against \
         echoes (got {0} bytes)"
    )]
    TooShort(usize),
}

/// The secrets to redact. Cheap to clone.
///
/// The searchers (`memchr` finders, built once here) keep their own copy of
/// each secret, which `memchr` does not zero when it is dropped; build a
/// `Redactor` once per credential version, not per call.
#[derive(Clone)]
pub struct Redactor(Arc<Inner>);

struct Inner {
    /// One searcher per distinct secret; `Finder::needle` is the secret.
    finders: Vec<Finder<'static>>,
    /// `masks[i]` replaces the secret of `finders[i]`: [`mask_for`] its length.
    masks: Vec<Box<[u8]>>,
    /// Length of the longest secret (0 when there are none).
    max_len: usize,
    /// Length of the shortest secret (0 when there are none).
    min_len: usize,
    /// The secrets in lower case: header names are, so a secret shows in
    /// one only that way.
    lower_finders: Vec<Finder<'static>>,
    /// Whether some secret starts with this byte (prefix checks start here).
    first_bytes: [bool; 256],
}

/// Per-response streaming state of a [`Redactor`]. See the module docs.
pub struct RedactState {
    redactor: Redactor,
    /// Held-back tail: a proper prefix of some secret, shorter than the longest secret.
    held: Vec<u8>,
    /// Whether anything was redacted so far.
    redacted: bool,
}

/// A flag shared between a [`RedactingBody`] (or header scrubbing) and whoever
/// records the call: set once anything was redacted.
#[derive(Clone, Debug, Default)]
pub struct RedactionFlag(Arc<AtomicBool>);

/// A response body with every secret of a [`Redactor`] replaced, frame by frame.
///
/// Redaction preserves the body's length, so [`Body::size_hint`] is the
/// inner body's (plus any bytes held back) and an upstream `Content-Length`
/// header stays valid: keep it on the response this wraps.
pub struct RedactingBody<B> {
    inner: B,
    state: RedactState,
    flag: RedactionFlag,
    /// Trailers waiting behind the flushed tail.
    trailers: Option<HeaderMap>,
    /// The inner body ended and everything was emitted.
    done: bool,
}

/// The outcome of scanning a buffer.
struct Scan {
    /// The rewritten output for `data[..hold_from]`, or `None` when no
    /// secret was found (the output is then `data[..hold_from]` itself).
    out: Option<BytesMut>,
    /// Where the held-back tail starts (`data.len()` when nothing is held).
    hold_from: usize,
}

// === impl Redactor ===

impl Redactor {
    /// A redactor for `secrets`; each must be at least [`MIN_SECRET_LEN`]
    /// bytes. Duplicates are ignored. Each secret will be replaced by
    /// [`mask_for`] its length, computed once here.
    pub fn new(secrets: &[&[u8]]) -> Result<Self, RedactorError> {
        let mut finders: Vec<Finder<'static>> = Vec::with_capacity(secrets.len());
        let mut masks: Vec<Box<[u8]>> = Vec::with_capacity(secrets.len());
        let mut first_bytes = [false; 256];
        let mut max_len = 0;
        for secret in secrets {
            if secret.len() < MIN_SECRET_LEN {
                return Err(RedactorError::TooShort(secret.len()));
            }
            if finders.iter().any(|f| f.needle() == *secret) {
                continue;
            }
            first_bytes[usize::from(secret[0])] = true;
            max_len = max_len.max(secret.len());
            finders.push(Finder::new(secret).into_owned());
            masks.push(mask_for(secret.len()).into_boxed_slice());
        }
        let min_len = finders.iter().map(|f| f.needle().len()).min().unwrap_or(0);
        let lower_finders = finders
            .iter()
            .map(|f| Finder::new(&f.needle().to_ascii_lowercase()).into_owned())
            .collect();
        Ok(Self(Arc::new(Inner {
            finders,
            masks,
            max_len,
            min_len,
            lower_finders,
            first_bytes,
        })))
    }

    /// A redactor for the secrets of both `self` and `other`.
    pub fn union(&self, other: &Redactor) -> Result<Self, RedactorError> {
        let needles: Vec<&[u8]> = self
            .0
            .finders
            .iter()
            .chain(&other.0.finders)
            .map(Finder::needle)
            .collect();
        Self::new(&needles)
    }

    /// A redactor with no secrets: everything passes unchanged.
    pub fn empty() -> Self {
        Self(Arc::new(Inner {
            finders: Vec::new(),
            masks: Vec::new(),
            max_len: 0,
            min_len: 0,
            lower_finders: Vec::new(),
            first_bytes: [false; 256],
        }))
    }

    /// How many distinct secrets it looks for (one searcher each).
    #[cfg(test)]
    pub(crate) fn secret_count(&self) -> usize {
        self.0.finders.len()
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.0.finders.is_empty()
    }

    /// A fresh streaming state for one response.
    pub fn state(&self) -> RedactState {
        RedactState {
            redactor: self.clone(),
            held: Vec::new(),
            redacted: false,
        }
    }

    /// Whether `data` contains a secret.
    pub fn contains_secret(&self, data: &[u8]) -> bool {
        self.0.finders.iter().any(|f| f.find(data).is_some())
    }

    /// `data` with every secret replaced by its mask (one shot, for data
    /// held whole). The result has the length of `data`.
    pub fn redact<'a>(&self, data: &'a [u8]) -> Cow<'a, [u8]> {
        match self.0.scan(data, true).out {
            None => Cow::Borrowed(data),
            Some(out) => Cow::Owned(out.to_vec()),
        }
    }

    /// A replacement for `value` if it contains a secret (keeping its
    /// sensitive flag), else `None`. Secrets are replaced by the same masks
    /// as in bodies, so the value keeps its length.
    pub fn scrub_header_value(&self, value: &HeaderValue) -> Option<HeaderValue> {
        // A value shorter than every secret (most of them) holds none.
        if value.len() < self.0.min_len {
            return None;
        }
        let out = self.0.scan(value.as_bytes(), true).out?;
        // Masks are visible ASCII and the rest comes from a valid value, so
        // this cannot fail; should it, the whole value is masked.
        let mut scrubbed = HeaderValue::from_maybe_shared(out.freeze())
            .or_else(|_| HeaderValue::from_maybe_shared(Bytes::from(mask_for(value.len()))))
            .unwrap_or_else(|_| HeaderValue::from_static(REDACTION_MARKER));
        scrubbed.set_sensitive(value.is_sensitive());
        Some(scrubbed)
    }

    /// Scrubs every value of `headers` in place, and removes every header
    /// whose name holds a secret (a name cannot hold a mask). Returns
    /// whether anything changed.
    pub fn scrub_headers(&self, headers: &mut HeaderMap) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut changed = false;
        for value in headers.values_mut() {
            if let Some(scrubbed) = self.scrub_header_value(value) {
                *value = scrubbed;
                changed = true;
            }
        }
        // Names shorter than every secret (nearly all) are not searched.
        let leaking: Vec<http::HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().len() >= self.0.min_len)
            .filter(|name| {
                let name = name.as_str().as_bytes();
                self.0.lower_finders.iter().any(|f| f.find(name).is_some())
            })
            .cloned()
            .collect();
        for name in leaking {
            headers.remove(name);
            changed = true;
        }
        changed
    }
}

impl Default for Redactor {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("secrets", &self.0.finders.len())
            .finish()
    }
}

// === impl Inner ===

impl Inner {
    /// Scans `data`, replacing matches left to right (leftmost, then
    /// longest) by their masks, so the output for `data[..hold_from]` has
    /// exactly that length. Unless `at_end`, stops before the earliest position from
    /// which the rest of `data` is a proper prefix of some secret: a match
    /// there, or a longer one, may still complete with the next chunk.
    fn scan(&self, data: &[u8], at_end: bool) -> Scan {
        if self.finders.is_empty() {
            return Scan {
                out: None,
                hold_from: data.len(),
            };
        }
        // The next match start of each secret at or after `pos`; allocated
        // only once something matched (the common case allocates nothing).
        let mut next: Vec<Option<usize>> = Vec::new();
        for (i, finder) in self.finders.iter().enumerate() {
            if let Some(start) = finder.find(data) {
                if next.is_empty() {
                    next.resize(self.finders.len(), None);
                }
                next[i] = Some(start);
            }
        }
        if next.is_empty() {
            let hold_from = if at_end {
                data.len()
            } else {
                self.hold_start(data, 0).unwrap_or(data.len())
            };
            return Scan {
                out: None,
                hold_from,
            };
        }
        let mut out: Option<BytesMut> = None;
        let mut pos = 0;
        loop {
            let found = self.earliest(&next);
            let hold = if at_end {
                None
            } else {
                self.hold_start(data, pos)
            };
            match found {
                Some((start, i)) if hold.is_none_or(|h| h > start) => {
                    let mask = &self.masks[i];
                    // Length-preserving: the output never outgrows `data`.
                    let buf = out.get_or_insert_with(|| BytesMut::with_capacity(data.len()));
                    buf.extend_from_slice(&data[pos..start]);
                    buf.extend_from_slice(mask);
                    pos = start + mask.len();
                    for (finder, next) in self.finders.iter().zip(next.iter_mut()) {
                        if next.is_some_and(|n| n < pos) {
                            *next = finder.find(&data[pos..]).map(|n| n + pos);
                        }
                    }
                }
                _ => {
                    let hold_from = hold.unwrap_or(data.len());
                    if let Some(buf) = &mut out {
                        buf.extend_from_slice(&data[pos..hold_from]);
                    }
                    return Scan { out, hold_from };
                }
            }
        }
    }

    /// The earliest match as (start, index of its finder); the longest of
    /// those starting there.
    fn earliest(&self, next: &[Option<usize>]) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None;
        for (i, (finder, start)) in self.finders.iter().zip(next).enumerate() {
            let Some(start) = *start else { continue };
            let len = finder.needle().len();
            best = match best {
                Some((s, l, b)) if s < start || (s == start && l >= len) => Some((s, l, b)),
                _ => Some((start, len, i)),
            };
        }
        best.map(|(start, _, i)| (start, i))
    }

    /// The earliest `p >= from` such that `data[p..]` is a non-empty proper
    /// prefix of some secret.
    fn hold_start(&self, data: &[u8], from: usize) -> Option<usize> {
        let lo = from.max(data.len().saturating_sub(self.max_len.saturating_sub(1)));
        (lo..data.len()).find(|&p| {
            let tail = &data[p..];
            self.first_bytes[usize::from(tail[0])]
                && self.finders.iter().any(|f| {
                    let needle = f.needle();
                    needle.len() > tail.len() && needle.starts_with(tail)
                })
        })
    }
}

// === impl RedactState ===

impl RedactState {
    /// Takes the next chunk; returns what can be sent now and whether
    /// anything in it was redacted. Holds back a possible secret prefix at
    /// the end until the next chunk (or [`RedactState::finish`]) decides it.
    ///
    /// A clean chunk is returned as is (or sliced, when its end is held).
    /// The chunk after a held prefix is copied once, joined to it.
    pub fn push(&mut self, chunk: Bytes) -> (Bytes, bool) {
        if self.held.is_empty() {
            let scan = self.redactor.0.scan(&chunk, false);
            self.held.extend_from_slice(&chunk[scan.hold_from..]);
            return match scan.out {
                None if scan.hold_from == chunk.len() => (chunk, false),
                None => (chunk.slice(..scan.hold_from), false),
                Some(out) => {
                    self.redacted = true;
                    (out.freeze(), true)
                }
            };
        }
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(&chunk);
        let scan = self.redactor.0.scan(&data, false);
        let (emit, redacted) = match scan.out {
            None => (Bytes::copy_from_slice(&data[..scan.hold_from]), false),
            Some(out) => (out.freeze(), true),
        };
        data.drain(..scan.hold_from);
        self.held = data;
        self.redacted |= redacted;
        (emit, redacted)
    }

    /// Ends the stream: returns the held-back tail, redacted if it holds a
    /// secret (see [`RedactState::redacted`]).
    pub fn finish(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return Bytes::new();
        }
        match self.redactor.0.scan(&held, true).out {
            None => Bytes::from(held),
            Some(out) => {
                self.redacted = true;
                out.freeze()
            }
        }
    }

    /// Whether anything was redacted so far (including by [`RedactState::finish`]).
    pub fn redacted(&self) -> bool {
        self.redacted
    }

    /// Bytes currently held back (always fewer than the longest secret).
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

impl fmt::Debug for RedactState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactState")
            .field("held_len", &self.held.len())
            .field("redacted", &self.redacted)
            .finish()
    }
}

// === impl RedactionFlag ===

impl RedactionFlag {
    /// A flag, not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag.
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the flag was set. Final once the body has ended.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

// === impl RedactingBody ===

impl<B> RedactingBody<B> {
    /// Wraps `inner`; `flag` is set as soon as anything is redacted.
    pub fn new(inner: B, redactor: &Redactor, flag: RedactionFlag) -> Self {
        Self {
            inner,
            state: redactor.state(),
            flag,
            trailers: None,
            done: false,
        }
    }

    /// The shared flag.
    pub fn flag(&self) -> &RedactionFlag {
        &self.flag
    }

    /// Flushes the held-back tail at the end of the stream; `None` when empty.
    fn flush(&mut self) -> Option<Bytes> {
        let tail = self.state.finish();
        if self.state.redacted() {
            self.flag.set();
        }
        (!tail.is_empty()).then_some(tail)
    }
}

impl<B> Body for RedactingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.trailers.take() {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                // The stream ends here; the held tail (a secret prefix) is dropped.
                Some(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(this.flush().map(|tail| Ok(Frame::data(tail))));
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let (out, redacted) = this.state.push(data);
                    if redacted {
                        this.flag.set();
                    }
                    if out.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Err(frame) => frame,
            };
            return match frame.into_trailers() {
                Ok(mut trailers) => {
                    if this.state.redactor.scrub_headers(&mut trailers) {
                        this.flag.set();
                    }
                    match this.flush() {
                        Some(tail) => {
                            this.trailers = Some(trailers);
                            Poll::Ready(Some(Ok(Frame::data(tail))))
                        }
                        None => {
                            this.done = true;
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                    }
                }
                // A frame kind this version of http-body does not know: pass it on.
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none()
            && (self.done || (self.state.held_len() == 0 && self.inner.is_end_stream()))
    }

    /// The inner body's hint: redaction never changes the length. Bytes
    /// held back (a possible secret prefix, still to be emitted) are added,
    /// so the hint stays exact mid-stream; before the first frame nothing is
    /// held and this is the inner hint as is.
    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.state.held_len() as u64;
        if held > 0 {
            // Upper first, so that the lower bound never exceeds it.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(held));
            }
            hint.set_lower(hint.lower().saturating_add(held));
        }
        hint
    }
}

impl<B> fmt::Debug for RedactingBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactingBody")
            .field("state", &self.state)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
