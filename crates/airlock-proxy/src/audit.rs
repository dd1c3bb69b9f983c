//! The audit record of one call, from the first byte to the last.
//!
//! A [`CallRecord`] is created when a request arrives and fills in as the
//! call goes through its stages. It is finished exactly once: when airlock
//! answers itself, when the provider's response ends, or — if the call is
//! dropped before either (the agent went away) — on drop, flagged
//! `client_aborted` (decision `allow` once the request was on its way to
//! the provider, `client_aborted` before). Finishing logs the call's one `info` line (target
//! `airlock::call`) and submits the record to the audit trail.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use airlock_audit::{AuditError, Auditor};
use airlock_core::audit::{record_path, record_path_withholding, AuditRecord, Flags, GENESIS_MAC};
use airlock_core::token::TOKEN_PREFIX;
use airlock_session::{now_ms, CallSlot, LiveSession};
use http::{Method, Request};

use crate::cut::{Cut, Waiting};
use crate::request_id::RequestId;

/// Longest method name kept in a record.
const MAX_METHOD_LEN: usize = 32;

/// Longest provider request id logged.
const MAX_PROVIDER_REQUEST_ID: usize = 128;

/// The decision recorded (and counted) for a call dropped before airlock
/// decided.
pub(crate) const UNDECIDED: &str = "client_aborted";

/// One call's audit record in the making.
pub(crate) struct CallRecord {
    auditor: Auditor,
    started: Instant,
    /// The call's id in its log line and on airlock's own answer.
    id: RequestId,
    /// The id the provider gave its answer, for the log line.
    provider_request_id: Option<http::HeaderValue>,
    /// `None` once finished.
    record: Option<Box<AuditRecord>>,
    bytes_in: Option<Arc<AtomicU64>>,
    /// Status sent to the agent so far (for a call dropped mid-response).
    status: u16,
    /// Response body bytes sent to the agent so far.
    pub(crate) bytes_out: u64,
    /// The call's session, once known (a stream ends when it does).
    session: Option<Arc<LiveSession>>,
    /// Shutdown cutting calls in flight: a drop is then airlock's doing.
    cut: Arc<Cut>,
    /// Held by a call answering that cut until the call is done.
    answering_cut: Option<Waiting>,
    /// The session's slot for a call in flight, given back when the
    /// record is finished (the call has ended).
    slot: Option<CallSlot>,
}

// === impl CallRecord ===

/// What a record names as a call's path: the path, or for an
/// authority-form target (`CONNECT host:port`), which has none, the
/// authority.
pub(crate) fn recorded_target(uri: &http::Uri) -> &str {
    match (uri.path(), uri.authority()) {
        ("", Some(authority)) => authority.as_str(),
        (path, _) => path,
    }
}

impl CallRecord {
    /// Starts the record of `req`.
    pub(crate) fn begin<B>(
        auditor: &Auditor,
        req: &Request<B>,
        started: Instant,
        cut: &Arc<Cut>,
    ) -> Self {
        let method = recorded_method(req.method());
        let record = Some(Box::new(AuditRecord {
            chain: 0,
            seq: 0,
            ts_ms: 0,
            session: None,
            provider: None,
            method,
            path: record_path(recorded_target(req.uri())),
            decision: Cow::Borrowed(""),
            status: 0,
            upstream_status: None,
            duration_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            flags: Flags::empty(),
            prev_mac: GENESIS_MAC,
            mac: GENESIS_MAC,
        }));
        Self {
            auditor: auditor.clone(),
            started,
            id: RequestId::new(),
            provider_request_id: None,
            record,
            bytes_in: None,
            status: 0,
            bytes_out: 0,
            session: None,
            cut: Arc::clone(cut),
            answering_cut: None,
            slot: None,
        }
    }

    /// The call's id (see [`crate::request_id`]).
    pub(crate) fn request_id(&self) -> RequestId {
        self.id
    }

    /// Notes the id the provider gave its answer (`x-request-id`, else
    /// `request-id`; read after the leak guard scrubbed the headers), so
    /// that the log line of a call the provider refused can be found by
    /// the id the agent saw: 1 to [`MAX_PROVIDER_REQUEST_ID`] bytes of
    /// visible ASCII, else none.
    pub(crate) fn note_provider_request_id(&mut self, headers: &http::HeaderMap) {
        let id = crate::request_id::provider_request_id(headers);
        self.provider_request_id = id
            .filter(|v| {
                (1..=MAX_PROVIDER_REQUEST_ID).contains(&v.len())
                    && v.as_bytes().iter().all(u8::is_ascii_graphic)
            })
            .cloned();
    }

    /// Keeps the session's slot for this call until the call ends.
    pub(crate) fn hold_slot(&mut self, slot: CallSlot) {
        self.slot = Some(slot);
    }

    /// The call answers shutdown's cut; the drain waits for it until this
    /// record is done with (see [`Cut::answered`]).
    pub(crate) fn answers_cut(&mut self, waiting: Waiting) {
        self.answering_cut = Some(waiting);
    }

    /// Shutdown's cut, as the call sees it.
    pub(crate) fn cut(&self) -> &Arc<Cut> {
        &self.cut
    }

    /// The call was routed to `provider`.
    pub(crate) fn set_provider(&mut self, provider: &Arc<str>) {
        if let Some(r) = &mut self.record {
            r.provider = Some(Arc::clone(provider));
        }
    }

    /// The token named `session`.
    pub(crate) fn set_session(&mut self, session: &Arc<LiveSession>) {
        if let Some(r) = &mut self.record {
            r.session = Some(Arc::clone(session.id().shared()));
        }
        self.session = Some(Arc::clone(session));
    }

    /// Withholds from the recorded path the random part of each of
    /// `tokens` (session tokens the call presented), should it hold one.
    pub(crate) fn withhold_tokens(&mut self, path: &str, tokens: &[&str]) {
        let secrets: Vec<&str> = tokens
            .iter()
            .map(|token| token.strip_prefix(TOKEN_PREFIX).unwrap_or(token))
            .collect();
        if let (Some(r), Some(withheld)) =
            (&mut self.record, record_path_withholding(path, &secrets))
        {
            r.path = withheld;
        }
    }

    /// The call's session, once the token named one.
    pub(crate) fn session(&self) -> Option<&Arc<LiveSession>> {
        self.session.as_ref()
    }

    /// Every check passed and the request is on its way to the provider:
    /// the call is "allowed" from here on, also if the agent leaves before
    /// the answer (the record then says `allow` and `client_aborted`, never
    /// that the call stopped before the provider saw anything).
    pub(crate) fn set_sending(&mut self) {
        if let Some(r) = &mut self.record {
            r.decision = Cow::Borrowed("allow");
        }
    }

    /// The provider answered with `status`; the call is now "allowed".
    pub(crate) fn set_forwarded(&mut self, upstream_status: u16) {
        self.status = upstream_status;
        if let Some(r) = &mut self.record {
            r.upstream_status = Some(upstream_status);
            r.decision = Cow::Borrowed("allow");
        }
    }

    /// The provider name recorded so far.
    pub(crate) fn provider(&self) -> Option<&str> {
        self.record.as_ref().and_then(|r| r.provider.as_deref())
    }

    /// Adds `flags` to the record.
    pub(crate) fn flag(&mut self, flags: Flags) {
        if let Some(r) = &mut self.record {
            r.flags.insert(flags);
        }
    }

    /// A counter for request body bytes sent upstream.
    pub(crate) fn count_request_body(&mut self) -> Arc<AtomicU64> {
        let counter = Arc::new(AtomicU64::new(0));
        self.bytes_in = Some(Arc::clone(&counter));
        counter
    }

    /// The audit trail this call is recorded in.
    pub(crate) fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// Whether a failed record must fail the call.
    pub(crate) fn fail_closed(&self) -> bool {
        self.auditor.fail_closed()
    }

    /// Completes and submits the record. `decision` is `None` for a call
    /// the provider answered. The future resolves once it is durable;
    /// `None` when there is nothing to wait for (already finished, or audit
    /// disabled: the call is only logged).
    pub(crate) fn finish(
        &mut self,
        decision: Option<&'static str>,
        status: u16,
        flags: Flags,
    ) -> Option<impl Future<Output = Result<(), AuditError>> + Send + 'static> {
        let mut record = self.record.take()?;
        // The call has ended: its slot is free before the answer's last
        // frame (which waits for the commit) reaches the agent, so that
        // its next call never finds it still taken.
        self.slot = None;
        if let Some(decision) = decision {
            record.decision = Cow::Borrowed(decision);
        }
        record.ts_ms = now_ms();
        record.status = status;
        record.duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        record.bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        record.bytes_out = self.bytes_out;
        record.flags.insert(flags);
        log_call(&record, self.id, self.provider_request_id.as_ref());
        // With audit disabled there is nothing to wait for.
        self.auditor
            .is_enabled()
            .then(|| self.auditor.submit(record))
    }
}

/// The call's one log line: session, provider, method, path, decision,
/// status, duration, the call's id and the provider's. Never a token,
/// credential, query or body. Fields are recorded by `Display` (no escaping
/// pass) and numbers as integers: this line is written for every call. A
/// recorded path is visible ASCII (`airlock_core::audit::record_path`
/// escapes anything else an HTTP/2 `:path` may carry), so a line stays one
/// line. A session, provider or provider's id the call has none of is left
/// out, as the audit record's `null` (round 43: JSON logs said `"-"`).
fn log_call(r: &AuditRecord, id: RequestId, provider_id: Option<&http::HeaderValue>) {
    let upstream_id = provider_id.and_then(|v| v.to_str().ok());
    tracing::info!(
        target: "airlock::call",
        session = r.session.as_deref().map(tracing::field::display::<&str>),
        provider = r.provider.as_deref().map(tracing::field::display::<&str>),
        method = %r.method,
        path = %r.path,
        decision = %r.decision,
        status = r.status,
        duration_us = r.duration_us,
        request_id = %id,
        upstream_request_id = upstream_id.map(tracing::field::display::<&str>),
        "call"
    );
}

/// The method as recorded: the standard ones without an allocation, others
/// cut at [`MAX_METHOD_LEN`].
fn recorded_method(method: &Method) -> Cow<'static, str> {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    if let Some((_, name)) = STANDARD.iter().find(|(m, _)| m == method) {
        return Cow::Borrowed(name);
    }
    let name = method.as_str();
    Cow::Owned(name.get(..MAX_METHOD_LEN).unwrap_or(name).to_owned())
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if let Some(record) = &self.record {
            let decision = if record.decision.is_empty() {
                Some(UNDECIDED)
            } else {
                None
            };
            let status = self.status;
            let flags = if self.cut.has_started() {
                Flags::INCOMPLETE
            } else {
                Flags::CLIENT_ABORTED
            };
            // The record is queued when `finish` returns; nobody is left to
            // wait for it.
            drop(self.finish(decision, status, flags));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn standard_methods_are_borrowed_and_others_cut() {
        for method in [Method::GET, Method::POST, Method::DELETE, Method::TRACE] {
            let recorded = recorded_method(&method);
            assert!(matches!(recorded, Cow::Borrowed(_)), "{method}");
            assert_eq!(recorded, method.as_str());
        }
        let custom = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(recorded_method(&custom), "PROPFIND");
        let long = Method::from_bytes(&[b'X'; 40]).unwrap();
        assert_eq!(recorded_method(&long).len(), MAX_METHOD_LEN);
    }
}
