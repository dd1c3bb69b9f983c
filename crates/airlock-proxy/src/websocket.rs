//! WebSocket upgrades over HTTP/1.1: the handshake's own checks, and the
//! tunnel that carries the connection once both sides switched.
//!
//! A handshake is an ordinary call until the provider answers: it goes
//! through every stage of the request path (route, token, scope with the
//! method `WEBSOCKET`, never `GET`; limits, head screen) and counts as one
//! call. [`classify`] decides whether a request is one: `Connection`
//! naming `upgrade` and `Upgrade` naming `websocket` make it an attempt,
//! which must then be `Upgrade: websocket` exactly, a `GET` over HTTP/1.1
//! with no body, or is refused with 400, as is RFC 8441's extended
//! `CONNECT` over HTTP/2. An upgrade to anything else (`h2c`, as `curl
//! --http2` offers) is ignored, as RFC 9110 §7.8 lets a server do: the
//! request is an ordinary call with `Upgrade` stripped as hop-by-hop, as
//! is an `Upgrade` header that `Connection` does not name.
//!
//! Upstream, the handshake goes on a connection of its own
//! ([`crate::upstream_pool::UpstreamPool::send_upgrade`], ALPN `http/1.1`
//! only), without `Sec-WebSocket-Extensions` ([`prepare_handshake`]): no
//! compression may be negotiated, so that the leak guard can read what
//! the provider sends. A `101` naming an extension all the same, or a
//! protocol other than `websocket`, is refused with 502 ([`unacceptable`]).
//!
//! A [`Tunnel`] then copies bytes both ways. What the provider sends is
//! followed frame by frame ([`FrameGuard`]): server frames are never masked,
//! so every data message passes through the leak guard with one redaction
//! state from its first fragment to its last (a key split across fragments,
//! a ping between them or not, is found whole), and airlock frames what the
//! guard releases itself, re-fragmenting the message as RFC 6455 §5.4 lets
//! an intermediary when no extension is negotiated. Control frames are
//! redacted whole. A masked frame, one with a reserved bit set (compression
//! nobody negotiated), a reserved opcode or a broken fragment sequence ends
//! the tunnel: its payload could not be followed. What the agent sends is
//! checked to be WebSocket frames ([`AgentFrames`]: masked, no reserved
//! bit, a known opcode, control frames whole and short, continuations in
//! sequence), counted and passed on, its payloads unread; anything else
//! (an HTTP request smuggled after the switch, say) ends the tunnel, flagged
//! `client_aborted` and `incomplete`, without reaching the provider.
//!
//! The tunnel ends when either side closes (the other then gets
//! [`LINGER`] to finish its close handshake), when the session ends
//! (revoked or expired, flagged `session_ended`), when nothing has passed
//! either way for `proxy.idle_timeout` (flagged `incomplete`), when a
//! fail-closed audit trail stops taking records (checked every
//! [`AUDIT_CHECK`]; flagged `incomplete`, as new calls then get 503), or when
//! shutdown's drain ends with it still open (its timeout or a second
//! signal; flagged `incomplete`, as any call cut then). When airlock ends
//! it, each side still there gets a close frame saying why, as long as
//! what airlock wrote to that side ends on a frame's boundary: the agent
//! 1008 (session ended), 1001 (idle, shutdown), 1011 (audit trail), 1014
//! (the provider failed or sent what the guard cannot read) or 1002 (not
//! WebSocket), with a reason; the provider 1001. Each then has
//! [`CLOSE_GRACE`] to answer. The call's record is completed when it ends,
//! with status 101, bytes both ways and the whole duration; the agent's
//! connection is closed only once that record is durable.

use std::borrow::Cow;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use airlock_core::audit::Flags;
use airlock_session::{EndWatch, WatchEnd};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::audit::CallRecord;
use crate::descriptors::UpstreamSlot;
use crate::error::{Denial, ErrorCode};
use crate::redact::{RedactState, Redactor};
use crate::upstream_pool::UpstreamBody;

/// After one side closed, how long the other may still send (the end of
/// its close handshake) before the tunnel ends.
pub const LINGER: Duration = Duration::from_secs(5);

/// How often an open tunnel checks that its audit trail still takes
/// records (fail-closed audit only; the auditor has no notification).
const AUDIT_CHECK: Duration = Duration::from_millis(250);

/// How long closing the agent's side may take once the tunnel ended.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Bytes read at once in each direction.
const BUFFER: usize = 16 * 1024;

/// Longest WebSocket frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_FRAME_HEADER: usize = 14;

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes (RFC 6455 §7.4.1, and 1014 from IANA's registry).
const GOING_AWAY: u16 = 1001;
const PROTOCOL_ERROR: u16 = 1002;
const POLICY_VIOLATION: u16 = 1008;
const INTERNAL_ERROR: u16 = 1011;
const TRY_AGAIN_LATER: u16 = 1013;
const BAD_GATEWAY: u16 = 1014;

/// Whether `req` asks for a WebSocket upgrade (`Ok(true)`), for none
/// (`Ok(false)`), or for one airlock does not carry (400).
pub fn classify<B>(req: &Request<B>) -> Result<bool, Denial> {
    if req.extensions().get::<hyper::ext::Protocol>().is_some() {
        return Err(Denial::bad_request(
            "WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is not supported; connect over \
             HTTP/1.1",
        ));
    }
    let headers = req.headers();
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let Some(upgrade) = upgrades.next() else {
        return Ok(false);
    };
    if !connection_names_upgrade(headers) {
        // An `Upgrade` the `Connection` header does not name is to be
        // ignored (RFC 9110 §7.8): stripped as hop-by-hop, as before.
        return Ok(false);
    }
    if !headers.get_all(header::UPGRADE).iter().any(names_websocket) {
        // An upgrade airlock does not offer (`h2c`): ignored, the request
        // served as it is (RFC 9110 §7.8).
        return Ok(false);
    }
    if req.version() != Version::HTTP_11 {
        return Err(Denial::bad_request(
            "protocol upgrades are accepted over HTTP/1.1 only",
        ));
    }
    if upgrades.next().is_some() || upgrade.as_bytes().contains(&b',') {
        return Err(Denial::bad_request(
            "the Upgrade header must name exactly one protocol: websocket",
        ));
    }
    let websocket = upgrade
        .to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Err(Denial::bad_request(
            "only WebSocket upgrades are supported (Upgrade: websocket)",
        ));
    }
    if req.method() != Method::GET {
        return Err(Denial::bad_request("a WebSocket handshake must be a GET"));
    }
    let length = headers.get(header::CONTENT_LENGTH);
    if headers.contains_key(header::TRANSFER_ENCODING)
        || length.is_some_and(|l| l.as_bytes() != b"0")
    {
        return Err(Denial::bad_request("a WebSocket handshake carries no body"));
    }
    Ok(true)
}

/// Whether an `Upgrade` value names the `websocket` protocol (with or
/// without a version, alone or in a list).
fn names_websocket(value: &http::HeaderValue) -> bool {
    value.as_bytes().split(|b| *b == b',').any(|protocol| {
        let name = protocol.split(|b| *b == b'/').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"websocket")
    })
}

/// Whether a `Connection` header lists `upgrade`.
fn connection_names_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Makes a prepared upstream head (hop-by-hop headers already stripped) a
/// WebSocket handshake: `Connection: Upgrade`, `Upgrade: websocket`, and no
/// `Sec-WebSocket-Extensions` (no compression: the leak guard must read
/// the provider's frames). `Sec-WebSocket-Key`, `-Version` and `-Protocol`
/// pass as any other header.
pub(crate) fn prepare_handshake(headers: &mut HeaderMap) {
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// airlock's 502 in place of a provider's `101` it cannot tunnel: one that
/// switched to another protocol than `websocket`, or negotiated an
/// extension (compression the leak guard cannot read through). `None` for
/// a switch to carry.
pub(crate) fn unacceptable(headers: &HeaderMap, provider: &str) -> Option<Denial> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !upgrade || headers.get_all(header::UPGRADE).iter().count() != 1 {
        tracing::warn!(
            %provider,
            "the provider switched to a protocol other than websocket"
        );
        return Some(Denial::new(
            ErrorCode::UpstreamError,
            "the provider answered 101 without switching to websocket",
        ));
    }
    if headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
        tracing::warn!(
            %provider,
            "the provider negotiated a WebSocket extension airlock did not offer"
        );
        return Some(Denial::new(
            ErrorCode::UpstreamError,
            "the provider negotiated a WebSocket extension (compression), which airlock cannot \
             scan for its credential",
        ));
    }
    None
}

/// The head of the agent's `101`, from the provider's (already stripped of
/// hop-by-hop headers and scrubbed of the credential): the switch itself,
/// and whatever else the provider said (`Sec-WebSocket-Accept`,
/// `Sec-WebSocket-Protocol`, request ids), without any body framing.
pub(crate) fn switching_headers(headers: &mut HeaderMap) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// A WebSocket connection switched on both sides, to be carried by the
/// agent's connection task once hyper has sent the `101` ([`Tunnel::run`]).
/// Dropped unrun (or cut while running), its call is recorded as any call
/// dropped: `client_aborted`, or `incomplete` when shutdown cut it.
pub struct Tunnel {
    agent: OnUpgrade,
    provider: OnUpgrade,
    /// The provider's (empty) answer body: it holds the upstream
    /// connection's sender until the switch is done.
    upstream: UpstreamBody,
    /// The call's part of the bound on calls in flight upstream, held for
    /// as long as the tunnel holds the upstream connection.
    _upstream_slot: Option<UpstreamSlot>,
    call: CallRecord,
    redactor: Redactor,
    /// Counts the tunnel in `airlock_proxy_websocket_tunnels` while it lives.
    _open: OpenTunnel,
}

/// One open tunnel in the provider's gauge.
struct OpenTunnel(Gauge);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Closed by the agent or the provider (and the other side finished,
    /// or its linger ran out).
    Closed,
    /// The agent's connection failed.
    AgentFailed,
    /// The agent sent bytes that are no WebSocket frame (see
    /// [`AgentFrames`]): nothing of them went on.
    AgentNotWebSocket,
    /// The provider's connection failed, or it sent a frame the leak guard
    /// cannot read.
    ProviderFailed,
    /// The session was revoked or expired.
    SessionEnded,
    /// The session store (shared) has been out of reach for longer than
    /// `max_staleness`: a revocation may not have reached this process.
    StoreUnavailable,
    /// Nothing passed either way for the idle timeout.
    Idle,
    /// The audit trail (fail-closed) stopped taking records: no new call
    /// is admitted, and no tunnel carries on.
    AuditUnavailable,
    /// Shutdown's drain ended (its timeout, or a second signal) with the
    /// tunnel still open.
    ShuttingDown,
}

impl End {
    fn flags(self) -> Flags {
        match self {
            Self::Closed => Flags::empty(),
            Self::AgentFailed => Flags::CLIENT_ABORTED,
            Self::AgentNotWebSocket => Flags::CLIENT_ABORTED.union(Flags::INCOMPLETE),
            Self::ProviderFailed
            | Self::Idle
            | Self::AuditUnavailable
            | Self::StoreUnavailable
            | Self::ShuttingDown => Flags::INCOMPLETE,
            Self::SessionEnded => Flags::INCOMPLETE.union(Flags::SESSION_ENDED),
        }
    }

    /// The close frames airlock sends when it ends the tunnel itself: the
    /// agent's (code, reason) and the provider's (code), each `None` where
    /// that side is gone or ended the tunnel itself.
    fn goodbyes(self) -> (Option<(u16, &'static str)>, Option<u16>) {
        match self {
            Self::Closed => (None, None),
            Self::AgentFailed => (None, Some(GOING_AWAY)),
            Self::AgentNotWebSocket => (
                Some((PROTOCOL_ERROR, "airlock: not a WebSocket frame")),
                Some(GOING_AWAY),
            ),
            Self::ProviderFailed => (
                Some((
                    BAD_GATEWAY,
                    "airlock: the provider's connection failed or sent a frame airlock cannot read",
                )),
                None,
            ),
            Self::SessionEnded => (
                Some((
                    POLICY_VIOLATION,
                    "airlock: the session was revoked or expired",
                )),
                Some(GOING_AWAY),
            ),
            Self::StoreUnavailable => (
                Some((
                    TRY_AGAIN_LATER,
                    "airlock: the session store is out of reach; the session cannot be vouched for",
                )),
                Some(GOING_AWAY),
            ),
            Self::Idle => (
                Some((GOING_AWAY, "airlock: idle timeout")),
                Some(GOING_AWAY),
            ),
            Self::AuditUnavailable => (
                Some((INTERNAL_ERROR, "airlock: the audit trail takes no records")),
                Some(GOING_AWAY),
            ),
            Self::ShuttingDown => (
                Some((GOING_AWAY, "airlock is shutting down")),
                Some(GOING_AWAY),
            ),
        }
    }
}

/// How one direction of the tunnel ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectionEnd {
    /// The reading side closed (EOF); the writing side was told.
    Eof,
    /// Reading from or writing to the agent failed.
    Agent,
    /// The agent sent something that is no WebSocket frame.
    AgentNotWebSocket,
    /// Reading from or writing to the provider failed, or its framing.
    Provider,
}

impl Tunnel {
    /// A tunnel for `call` between the agent's connection (`agent`, once
    /// hyper hands it over) and the provider's (`provider`), guarding the
    /// provider's frames with `redactor`; counted in `gauge` while it lives.
    pub(crate) fn new(
        agent: OnUpgrade,
        provider: OnUpgrade,
        mut upstream: UpstreamBody,
        call: CallRecord,
        redactor: Redactor,
        gauge: &Gauge,
    ) -> Box<Self> {
        gauge.inc();
        // Boxed: a call's answer carries an `Option` of it, which every call
        // moves around, and almost every call leaves empty.
        Box::new(Self {
            agent,
            provider,
            _upstream_slot: upstream.take_slot(),
            upstream,
            call,
            redactor,
            _open: OpenTunnel(gauge.clone()),
        })
    }

    /// Carries the tunnel until it ends (see the module docs); a tunnel
    /// with nothing passing either way for `idle_timeout` is closed, and so
    /// is one open when `closing` turns true (shutdown). Its record is
    /// durable (or failed) when this returns.
    pub async fn run(
        mut self: Box<Self>,
        idle_timeout: Duration,
        mut closing: watch::Receiver<bool>,
    ) {
        // Both are due at once (the tunnel runs after the 101 went out, and
        // the provider's connection switched with its 101); bounded all the
        // same, as nothing else watches this wait.
        let agent = match tokio::time::timeout(idle_timeout, self.agent).await {
            Ok(Ok(agent)) => agent,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the agent's connection did not switch");
                drop(self.call.finish(None, 101, Flags::CLIENT_ABORTED));
                return;
            }
            Err(_) => {
                tracing::debug!("the agent's connection did not switch in time");
                drop(self.call.finish(None, 101, Flags::CLIENT_ABORTED));
                return;
            }
        };
        let provider = match tokio::time::timeout(idle_timeout, self.provider).await {
            Ok(Ok(provider)) => provider,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "the provider's connection did not switch");
                drop(self.call.finish(None, 101, Flags::INCOMPLETE));
                return;
            }
            Err(_) => {
                tracing::debug!("the provider's connection did not switch in time");
                drop(self.call.finish(None, 101, Flags::INCOMPLETE));
                return;
            }
        };
        // The connection is the upgraded one's now.
        drop(self.upstream);
        let mut agent = TokioIo::new(agent);
        let mut provider = TokioIo::new(provider);
        let mut guard = FrameGuard::new(&self.redactor);
        let end = carry(
            &mut agent,
            &mut provider,
            &mut guard,
            &mut self.call,
            idle_timeout,
            &mut closing,
        )
        .await;
        let mut flags = end.flags();
        if guard.redacted() {
            flags.insert(Flags::CREDENTIAL_REDACTED);
        }
        drop(provider);
        // The agent's connection closes once the record is durable, as a
        // response's last frame waits for it.
        if let Some(commit) = self.call.finish(None, 101, flags) {
            if let Err(e) = commit.await {
                tracing::warn!(error = %e, "audit record of a WebSocket tunnel not written");
            }
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, agent.shutdown()).await;
    }
}

/// Copies bytes both ways until the tunnel ends; how it ended. When
/// airlock ends it (see [`End::goodbyes`]), each side still there gets a
/// close frame saying why, if what airlock wrote to it ends on a frame's
/// boundary, and up to [`CLOSE_GRACE`] to answer it.
async fn carry<A, P>(
    agent: &mut A,
    provider: &mut P,
    guard: &mut FrameGuard,
    call: &mut CallRecord,
    idle_timeout: Duration,
    closing: &mut watch::Receiver<bool>,
) -> End
where
    A: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    // Milliseconds after `opened` when bytes last passed, either way.
    let last_ms = AtomicU64::new(0);
    let touch = || {
        let now = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_ms.store(now, Ordering::Relaxed);
    };
    let bytes_in = call.count_request_body();
    let mut session_end = call.session().map(EndWatch::new);
    // Fail-closed audit: the tunnel ends once its trail stops taking
    // records, as new calls are then refused.
    let audited = call.fail_closed().then(|| call.auditor().clone());
    let mut audit_check = tokio::time::interval(AUDIT_CHECK);
    audit_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    let (mut provider_read, mut provider_write) = tokio::io::split(provider);
    let mut frames = AgentFrames::new();
    // Whether what went to each side so far ends on a frame's boundary
    // (no write cut short, no frame begun and not finished).
    let agent_whole = AtomicBool::new(true);
    let provider_whole = AtomicBool::new(true);

    let end = {
        let up = async {
            let mut buf = vec![0u8; BUFFER];
            let mut out = BytesMut::new();
            loop {
                let n = match agent_read.read(&mut buf).await {
                    Ok(0) => {
                        let _ = provider_write.shutdown().await;
                        return DirectionEnd::Eof;
                    }
                    Ok(n) => n,
                    Err(_) => return DirectionEnd::Agent,
                };
                touch();
                out.clear();
                if let Err(e) = frames.push(&buf[..n], &mut out) {
                    tracing::warn!(
                        violation = ?e,
                        "the agent sent bytes that are no WebSocket frame; tunnel closed"
                    );
                    return DirectionEnd::AgentNotWebSocket;
                }
                if write_flushed(&mut provider_write, &out, &provider_whole)
                    .await
                    .is_err()
                {
                    return DirectionEnd::Provider;
                }
                provider_whole.store(frames.at_boundary(), Ordering::Relaxed);
                bytes_in.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
        };
        let bytes_out = &mut call.bytes_out;
        let down = async {
            let mut buf = vec![0u8; BUFFER];
            let mut out = BytesMut::new();
            loop {
                let n = match provider_read.read(&mut buf).await {
                    Ok(0) => {
                        // Everything the guard could release went out with
                        // its read; what it still holds is the start of a
                        // message the provider never finished (a key's
                        // first bytes, perhaps): dropped with it.
                        let _ = agent_write.flush().await;
                        return DirectionEnd::Eof;
                    }
                    Ok(n) => n,
                    Err(_) => return DirectionEnd::Provider,
                };
                touch();
                out.clear();
                if guard
                    .push(Bytes::copy_from_slice(&buf[..n]), &mut out)
                    .is_err()
                {
                    tracing::warn!(
                        "the provider sent a WebSocket frame the leak guard cannot follow \
                         (masked, compressed, or out of sequence); tunnel closed"
                    );
                    return DirectionEnd::Provider;
                }
                if write_flushed(&mut agent_write, &out, &agent_whole)
                    .await
                    .is_err()
                {
                    return DirectionEnd::Agent;
                }
                *bytes_out += out.len() as u64;
            }
        };
        tokio::pin!(up, down);
        let mut up_done: Option<DirectionEnd> = None;
        let mut down_done: Option<DirectionEnd> = None;
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        let mut lingering = false;
        loop {
            tokio::select! {
                ended = &mut up, if up_done.is_none() => {
                    up_done = Some(ended);
                }
                ended = &mut down, if down_done.is_none() => {
                    down_done = Some(ended);
                }
                end = poll_fn(|cx| match session_end.as_mut() {
                    Some(watch) => watch.poll_ended(cx),
                    None => std::task::Poll::Pending,
                }) => break match end {
                    WatchEnd::Ended => End::SessionEnded,
                    WatchEnd::Unvouched => End::StoreUnavailable,
                },
                () = told(closing) => break End::ShuttingDown,
                () = &mut idle => {
                    let last = opened + Duration::from_millis(last_ms.load(Ordering::Relaxed));
                    let due = last + idle_timeout;
                    if Instant::now() >= due {
                        break End::Idle;
                    }
                    idle.as_mut().reset(due);
                    continue;
                }
                () = &mut linger, if lingering => break End::Closed,
                _ = audit_check.tick(), if audited.is_some() => {
                    if audited.as_ref().is_some_and(|a| !a.admits_calls()) {
                        tracing::warn!("the audit trail takes no records; WebSocket tunnel closed");
                        break End::AuditUnavailable;
                    }
                    continue;
                }
            }
            match (up_done, down_done) {
                (Some(DirectionEnd::AgentNotWebSocket), _) => break End::AgentNotWebSocket,
                (Some(DirectionEnd::Agent), _) | (_, Some(DirectionEnd::Agent)) => {
                    break End::AgentFailed
                }
                (Some(DirectionEnd::Provider), _) | (_, Some(DirectionEnd::Provider)) => {
                    break End::ProviderFailed
                }
                // The provider closed: nothing the agent sends can arrive.
                (_, Some(DirectionEnd::Eof)) => break End::Closed,
                (Some(DirectionEnd::Eof), None) if !lingering => {
                    lingering = true;
                    linger.as_mut().reset(Instant::now() + LINGER);
                }
                _ => {}
            }
        }
    };

    // Both directions are stopped (their futures dropped): airlock writes
    // its own close frames where it ended the tunnel.
    // Not to a side that already got a close frame (the other side's):
    // a second one breaks the protocol.
    let (to_agent, to_provider) = end.goodbyes();
    let to_agent = to_agent.filter(|_| agent_whole.load(Ordering::Relaxed) && !guard.saw_close());
    let to_provider =
        to_provider.filter(|_| provider_whole.load(Ordering::Relaxed) && !frames.saw_close());
    let agent_side = async {
        let Some((code, reason)) = to_agent else {
            return;
        };
        let mut out = BytesMut::new();
        write_close(&mut out, code, reason, None);
        if write_flushed(&mut agent_write, &out, &agent_whole)
            .await
            .is_err()
        {
            return;
        }
        // The agent's answer: its close frame, or its connection's end.
        // Nothing it sends meanwhile goes on.
        let mut buf = vec![0u8; 4 * 1024];
        let mut ignored = BytesMut::new();
        loop {
            match agent_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    ignored.clear();
                    if frames.push(&buf[..n], &mut ignored).is_err() || frames.saw_close() {
                        return;
                    }
                }
            }
        }
    };
    let provider_side = async {
        let Some(code) = to_provider else {
            return;
        };
        let mut out = BytesMut::new();
        write_close(&mut out, code, "", Some(rand::random()));
        if write_flushed(&mut provider_write, &out, &provider_whole)
            .await
            .is_err()
        {
            return;
        }
        // A server answers with its close frame and then closes the
        // connection (RFC 6455 §5.5.1, §7.1.1): read to its end.
        let mut buf = vec![0u8; 4 * 1024];
        while let Ok(n) = provider_read.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    if to_agent.is_some() || to_provider.is_some() {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            tokio::join!(agent_side, provider_side)
        })
        .await;
    }
    end
}

/// Writes all of `bytes` and flushes (over TLS, a write may leave
/// ciphertext buffered); `whole` is false while a write is under way, so a
/// write cut short leaves it false.
async fn write_flushed<W>(to: &mut W, bytes: &[u8], whole: &AtomicBool) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    if bytes.is_empty() {
        return Ok(());
    }
    let was = whole.swap(false, Ordering::Relaxed);
    to.write_all(bytes).await?;
    to.flush().await?;
    whole.store(was, Ordering::Relaxed);
    Ok(())
}

/// Resolves once shutdown closes the tunnels (never if nobody can).
async fn told(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Appends a close frame with `code` and `reason` (at most 123 bytes),
/// masked with `mask` when it goes to the provider.
fn write_close(out: &mut BytesMut, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload.truncate(MAX_CONTROL_PAYLOAD);
    write_header(out, true, 0x8, mask, payload.len() as u64);
    match mask {
        Some(mask) => out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m)),
        None => out.extend_from_slice(&payload),
    }
}

/// Follows the provider's frames (RFC 6455 §5.2) and passes every data
/// message through the leak guard with one redaction state per message,
/// across its fragments: a key split between two fragments (a ping between
/// them, or not) is found whole. airlock frames what it sends itself: the
/// payload the guard releases goes out as a fragment of the message (its
/// opcode first, continuations after, FIN clear), and the message's last
/// bytes, once the provider's final frame ended, with FIN set (RFC 6455
/// §5.4 lets an intermediary re-fragment when no extension was negotiated,
/// and airlock never lets one be). A key prefix at the end of a fragment is
/// so held back until the message's next bytes or its end decide it.
/// Control frames (at most 125 bytes, never fragmented) are redacted whole
/// and passed on between fragments without touching the message's state.
///
/// A masked frame (a server never masks), one with a reserved bit set (an
/// extension nobody negotiated: compressed), a reserved opcode, a broken
/// fragment sequence or an oversized or fragmented control frame cannot be
/// followed and is refused; nothing of it is passed on.
pub(crate) struct FrameGuard {
    redactor: Redactor,
    /// The redaction state of the data message in progress.
    state: RedactState,
    phase: Phase,
    /// The data message in progress, from its first frame to its final one.
    message: Option<Message>,
    /// What the guard released of the message in progress and not yet
    /// framed: framed at the end of each [`FrameGuard::push`], before a
    /// control frame, and with the message's end.
    pending: BytesMut,
    /// Whether a control frame's payload was redacted.
    control_redacted: bool,
    /// Whether the provider's close frame passed.
    saw_close: bool,
}

/// A data message in progress.
#[derive(Clone, Copy, Debug)]
struct Message {
    /// Its opcode: text (1) or binary (2).
    opcode: u8,
    /// Whether a fragment of it went out (what follows is continuation).
    started: bool,
}

enum Phase {
    /// Reading a frame header: `have` bytes of it so far.
    Header {
        buf: [u8; MAX_FRAME_HEADER],
        have: usize,
    },
    /// The payload of a data frame: bytes left, and whether the frame is
    /// the message's last.
    Data { left: u64, fin: bool },
    /// A control frame, collected to be redacted whole: its opcode, its
    /// length and the payload so far.
    Control {
        opcode: u8,
        len: usize,
        payload: Vec<u8>,
    },
    /// A frame could not be followed; nothing more passes.
    Refused(Unreadable),
}

/// A provider frame the leak guard cannot follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A masked frame.
    Masked,
    /// A reserved bit set: compression or another extension.
    Reserved,
    /// A 64-bit length with its top bit set.
    Length,
    /// A reserved opcode, a continuation of no message, a new message
    /// before the last one ended, or a control frame fragmented or longer
    /// than 125 bytes.
    Protocol,
}

/// A frame header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    fin: bool,
    /// The reserved bits (RSV1-3), in place.
    rsv: u8,
    opcode: u8,
    masked: bool,
    length: u64,
}

impl Head {
    fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Whether the opcode is one RFC 6455 defines: continuation, text,
    /// binary, close, ping, pong.
    fn known_opcode(&self) -> bool {
        matches!(self.opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xa)
    }
}

impl FrameGuard {
    pub(crate) fn new(redactor: &Redactor) -> Self {
        Self {
            redactor: redactor.clone(),
            state: redactor.state(),
            phase: Phase::Header {
                buf: [0; MAX_FRAME_HEADER],
                have: 0,
            },
            message: None,
            pending: BytesMut::new(),
            control_redacted: false,
            saw_close: false,
        }
    }

    /// Whether the provider's close frame went through.
    pub(crate) fn saw_close(&self) -> bool {
        self.saw_close
    }

    /// Whether anything was redacted so far.
    pub(crate) fn redacted(&self) -> bool {
        self.state.redacted() || self.control_redacted
    }

    /// Takes the next bytes from the provider; appends to `out` the frames
    /// that can be sent now. On an error, `out` holds the frames before the
    /// one refused, and nothing more passes.
    pub(crate) fn push(&mut self, data: Bytes, out: &mut BytesMut) -> Result<(), Unreadable> {
        let pushed = self.push_frames(&data, out);
        // What the guard released of the message in progress goes out now.
        self.fragment(out);
        pushed
    }

    fn push_frames(&mut self, data: &Bytes, out: &mut BytesMut) -> Result<(), Unreadable> {
        let mut at = 0;
        while at < data.len() {
            match &mut self.phase {
                Phase::Refused(e) => return Err(*e),
                Phase::Header { buf, have } => {
                    let need = header_len(&buf[..*have]);
                    let take = (need - *have).min(data.len() - at);
                    buf[*have..*have + take].copy_from_slice(&data[at..at + take]);
                    *have += take;
                    at += take;
                    if *have < header_len(&buf[..*have]) {
                        continue;
                    }
                    let head = parse_header(&buf[..*have]);
                    match head.and_then(|head| self.begin_frame(head, out)) {
                        Ok(()) => {}
                        Err(e) => {
                            self.phase = Phase::Refused(e);
                            return Err(e);
                        }
                    }
                }
                Phase::Data { left, fin } => {
                    let rest = (data.len() - at) as u64;
                    let take = usize::try_from((*left).min(rest)).unwrap_or(data.len() - at);
                    let (emit, _) = self.state.push(data.slice(at..at + take));
                    self.pending.extend_from_slice(&emit);
                    at += take;
                    *left -= take as u64;
                    if *left == 0 {
                        let fin = *fin;
                        self.phase = fresh_header();
                        if fin {
                            self.end_message(out);
                        }
                    }
                }
                Phase::Control {
                    opcode,
                    len,
                    payload,
                } => {
                    let take = (*len - payload.len()).min(data.len() - at);
                    payload.extend_from_slice(&data[at..at + take]);
                    at += take;
                    if payload.len() == *len {
                        let (opcode, payload) = (*opcode, std::mem::take(payload));
                        self.phase = fresh_header();
                        self.control(opcode, &payload, out);
                    }
                }
            }
        }
        Ok(())
    }

    /// A frame's header is complete: checks it, and sets up for its payload.
    fn begin_frame(&mut self, head: Head, out: &mut BytesMut) -> Result<(), Unreadable> {
        if head.masked {
            return Err(Unreadable::Masked);
        }
        if head.rsv != 0 {
            return Err(Unreadable::Reserved);
        }
        if !head.known_opcode() {
            return Err(Unreadable::Protocol);
        }
        if head.is_control() {
            let len = match usize::try_from(head.length) {
                Ok(len) if len <= MAX_CONTROL_PAYLOAD && head.fin => len,
                _ => return Err(Unreadable::Protocol),
            };
            if len == 0 {
                self.phase = fresh_header();
                self.control(head.opcode, &[], out);
            } else {
                self.phase = Phase::Control {
                    opcode: head.opcode,
                    len,
                    payload: Vec::with_capacity(len),
                };
            }
            return Ok(());
        }
        match (head.opcode, self.message) {
            (0x0, Some(_)) => {}
            (0x1 | 0x2, None) => {
                self.message = Some(Message {
                    opcode: head.opcode,
                    started: false,
                });
            }
            _ => return Err(Unreadable::Protocol),
        }
        if head.length == 0 {
            self.phase = fresh_header();
            if head.fin {
                self.end_message(out);
            }
        } else {
            self.phase = Phase::Data {
                left: head.length,
                fin: head.fin,
            };
        }
        Ok(())
    }

    /// Frames what was released of the message in progress as a fragment
    /// (FIN clear); nothing when nothing was.
    fn fragment(&mut self, out: &mut BytesMut) {
        let Some(message) = &mut self.message else {
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let opcode = if message.started { 0x0 } else { message.opcode };
        message.started = true;
        write_header(out, false, opcode, None, self.pending.len() as u64);
        out.extend_from_slice(&self.pending);
        self.pending.clear();
    }

    /// The provider's final frame of the message ended: the rest of it,
    /// whatever the guard held back included, goes out with FIN set.
    fn end_message(&mut self, out: &mut BytesMut) {
        let Some(message) = self.message.take() else {
            return;
        };
        let tail = self.state.finish();
        self.pending.extend_from_slice(&tail);
        let opcode = if message.started { 0x0 } else { message.opcode };
        write_header(out, true, opcode, None, self.pending.len() as u64);
        out.extend_from_slice(&self.pending);
        self.pending.clear();
    }

    /// A whole control frame: redacted in place and sent, after what was
    /// released of the message in progress.
    fn control(&mut self, opcode: u8, payload: &[u8], out: &mut BytesMut) {
        self.fragment(out);
        self.saw_close |= opcode == 0x8;
        let payload = self.redactor.redact(payload);
        if let Cow::Owned(_) = payload {
            self.control_redacted = true;
        }
        write_header(out, true, opcode, None, payload.len() as u64);
        out.extend_from_slice(&payload);
    }
}

/// A header-reading phase at the start of a frame.
fn fresh_header() -> Phase {
    Phase::Header {
        buf: [0; MAX_FRAME_HEADER],
        have: 0,
    }
}

/// Appends a frame header: `fin`, `opcode`, the mask key if any, and
/// `length` in its shortest form (7, 16 or 64 bits).
fn write_header(out: &mut BytesMut, fin: bool, opcode: u8, mask: Option<[u8; 4]>, length: u64) {
    let first = if fin { 0x80 | opcode } else { opcode };
    let masked = if mask.is_some() { 0x80 } else { 0 };
    out.extend_from_slice(&[first]);
    match (u8::try_from(length), u16::try_from(length)) {
        (Ok(short), _) if short < 126 => out.extend_from_slice(&[masked | short]),
        (_, Ok(medium)) => {
            out.extend_from_slice(&[masked | 126]);
            out.extend_from_slice(&medium.to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[masked | 127]);
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
}

/// The length of the frame header starting with `seen` (2 until its
/// second byte is known).
fn header_len(seen: &[u8]) -> usize {
    let Some(&second) = seen.get(1) else {
        return 2;
    };
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// A complete frame header, parsed; refused only for a 64-bit length with
/// its top bit set.
fn parse_header(header: &[u8]) -> Result<Head, Unreadable> {
    let (first, second) = match header {
        [first, second, ..] => (*first, *second),
        _ => return Err(Unreadable::Length),
    };
    let length = match second & 0x7f {
        126 => header
            .get(2..4)
            .map(|b| u64::from(u16::from_be_bytes([b[0], b[1]]))),
        127 => header
            .get(2..10)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes),
        short => Some(u64::from(short)),
    };
    match length {
        Some(length) if length >> 63 == 0 => Ok(Head {
            fin: first & 0x80 != 0,
            rsv: first & 0x70,
            opcode: first & 0x0f,
            masked: second & 0x80 != 0,
            length,
        }),
        _ => Err(Unreadable::Length),
    }
}

/// Checks the agent's frames as they pass (RFC 6455 §5.2, §5.4, §5.5),
/// without reading their payloads: every frame masked, no reserved bit, a
/// known opcode, control frames unfragmented and at most 125 bytes, and
/// continuations only within a message. Bytes that are not WebSocket (an
/// HTTP request written after the switch, to be smuggled past a provider's
/// proxy still reading HTTP) so never reach the provider: a frame header
/// is held until it is whole and checked, and nothing of a refused one
/// (nor anything after it) goes on.
pub(crate) struct AgentFrames {
    phase: AgentPhase,
    /// Whether a data message is in progress (its final frame not seen).
    in_message: bool,
    /// Whether a close frame's header passed.
    saw_close: bool,
}

enum AgentPhase {
    /// Reading a frame header: `have` bytes of it so far.
    Header {
        buf: [u8; MAX_FRAME_HEADER],
        have: usize,
    },
    /// Payload bytes left in the current frame.
    Payload(u64),
    /// A frame was refused; nothing more passes.
    Refused,
}

/// An agent frame refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotWebSocket {
    /// A frame without a mask (a client always masks).
    Unmasked,
    /// A reserved bit set.
    Reserved,
    /// A reserved opcode, a continuation of no message, a new message
    /// before the last ended, a control frame fragmented or over 125 bytes,
    /// or a 64-bit length with its top bit set.
    Protocol,
}

impl AgentFrames {
    pub(crate) fn new() -> Self {
        Self {
            phase: AgentPhase::Header {
                buf: [0; MAX_FRAME_HEADER],
                have: 0,
            },
            in_message: false,
            saw_close: false,
        }
    }

    /// Whether what passed so far ends on a frame's boundary (a header
    /// still incomplete is held back, so it counts as one).
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.phase, AgentPhase::Header { .. })
    }

    /// Whether the agent sent a close frame (its header at least).
    pub(crate) fn saw_close(&self) -> bool {
        self.saw_close
    }

    /// Takes the agent's next bytes; appends to `out` what may go on to the
    /// provider now (a header split across reads goes once it is whole).
    /// On an error, `out` holds the frames before the one refused.
    pub(crate) fn push(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), NotWebSocket> {
        let mut at = 0;
        while at < data.len() {
            match &mut self.phase {
                AgentPhase::Refused => return Err(NotWebSocket::Protocol),
                AgentPhase::Header { buf, have } => {
                    let need = header_len(&buf[..*have]);
                    let take = (need - *have).min(data.len() - at);
                    buf[*have..*have + take].copy_from_slice(&data[at..at + take]);
                    *have += take;
                    at += take;
                    if *have < header_len(&buf[..*have]) {
                        continue;
                    }
                    let header = &buf[..*have];
                    let checked = parse_header(header)
                        .map_err(|_| NotWebSocket::Protocol)
                        .and_then(|head| check_agent_frame(head, &mut self.in_message));
                    let length = match checked {
                        Ok(length) => length,
                        Err(e) => {
                            self.phase = AgentPhase::Refused;
                            return Err(e);
                        }
                    };
                    self.saw_close |= header[0] & 0x0f == 0x8;
                    out.extend_from_slice(header);
                    self.phase = if length == 0 {
                        AgentPhase::Header {
                            buf: [0; MAX_FRAME_HEADER],
                            have: 0,
                        }
                    } else {
                        AgentPhase::Payload(length)
                    };
                }
                AgentPhase::Payload(left) => {
                    let rest = (data.len() - at) as u64;
                    let take = usize::try_from((*left).min(rest)).unwrap_or(data.len() - at);
                    out.extend_from_slice(&data[at..at + take]);
                    at += take;
                    *left -= take as u64;
                    if *left == 0 {
                        self.phase = AgentPhase::Header {
                            buf: [0; MAX_FRAME_HEADER],
                            have: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks one agent frame's header; its payload length.
fn check_agent_frame(head: Head, in_message: &mut bool) -> Result<u64, NotWebSocket> {
    if !head.masked {
        return Err(NotWebSocket::Unmasked);
    }
    if head.rsv != 0 {
        return Err(NotWebSocket::Reserved);
    }
    if !head.known_opcode() {
        return Err(NotWebSocket::Protocol);
    }
    if head.is_control() {
        if !head.fin || head.length > MAX_CONTROL_PAYLOAD as u64 {
            return Err(NotWebSocket::Protocol);
        }
        return Ok(head.length);
    }
    match (head.opcode, *in_message) {
        (0x0, true) | (0x1 | 0x2, false) => {}
        _ => return Err(NotWebSocket::Protocol),
    }
    *in_message = !head.fin;
    Ok(head.length)
}

#[cfg(test)]
mod tests;
