//! The request path, one stage a line.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_audit::{Auditor, Delivery};
use airlock_core::audit::Flags;
use airlock_core::{path, Method};
use airlock_session::{now_ms, Admission, AuthError, LiveSession, Registry};
use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::audit::{recorded_target, CallRecord};
use crate::body::{ProxyBody, RequestBody, Withheld};
use crate::credential_source::Loaded;
use crate::credentials;
use crate::cut::{Cut, Waiting};
use crate::descriptors::UpstreamSlot;
use crate::error::{Denial, ErrorCode};
use crate::headers::{opaque_coding, strip_hop_by_hop};
use crate::in_flight::{EnteredHere, InFlightCount};
use crate::linger::linger;
use crate::metrics::ProviderMetrics;
use crate::provider::{PreparedCredential, Provider};
use crate::redact::{RedactingBody, RedactionFlag};
use crate::results_url::ResultsUrl;
use crate::upstream_pool::UpstreamBody;
use crate::websocket::{self, Tunnel};

/// Tunables of the request path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// How long the upstream may take to send response headers (504 after).
    pub upstream_timeout: Duration,
    /// Checks on the request head and body size ([`credentials::screen`]).
    pub request: crate::headers::RequestPolicy,
    /// The base URL agents are given (`proxy.public_url`, or the listener's
    /// URL), where a provider's answer names a URL of its own that agents
    /// should reach through airlock (see [`crate::results_url`]).
    pub public_url: Option<String>,
    /// The path of `proxy.public_url` (`/airlock`), if it has one: a call's
    /// path may start with it (a reverse proxy at that path that passes it
    /// on) or not (one that strips it); `/{provider}` follows either way.
    pub path_prefix: Option<String>,
    /// Calls one session may have in flight in this process
    /// (`sessions.max_calls_in_flight`); one more is refused 429.
    pub max_calls_in_flight: u32,
}

/// The proxy: providers by name, the session registry and the audit trail.
pub struct Proxy {
    /// Shutdown cutting the calls still running (drain timeout).
    cut: Arc<Cut>,
    /// This worker's calls waiting for their provider's answer, for the
    /// whole wait: one cut meanwhile leaves it only once the cut's
    /// `waiting` counts it (after [`WATCH_SESSION_AFTER`] at most).
    awaiting_heads: InFlightCount,
    providers: HashMap<String, Provider>,
    registry: Arc<Registry>,
    auditor: Auditor,
    settings: ProxySettings,
    unknown_provider: ProviderMetrics,
}

/// The provider's answer and the credential the call was sent with.
struct Forwarded {
    response: Response<UpstreamBody>,
    credential: Arc<Loaded<PreparedCredential>>,
    /// The agent's connection, for a WebSocket handshake.
    agent_upgrade: Option<OnUpgrade>,
    /// For a batches call: the answer's `results_url`s to point at airlock.
    results_url: Option<ResultsUrl>,
}

impl Forwarded {
    /// Whether the provider switched a WebSocket handshake's connection.
    fn switched(&self) -> bool {
        self.agent_upgrade.is_some() && self.response.status() == StatusCode::SWITCHING_PROTOCOLS
    }
}

/// A call that got past every check, ready to forward.
struct Admitted<'a> {
    provider: &'a Provider,
    path_start: usize,
    /// A WebSocket handshake ([`websocket::classify`]).
    websocket: bool,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy for `providers`, authenticating against `registry` and
    /// recording every call with `auditor`. `unknown_provider` counts calls
    /// to names that are not configured.
    pub fn new(
        providers: Vec<Provider>,
        registry: Arc<Registry>,
        auditor: Auditor,
        settings: ProxySettings,
        unknown_provider: ProviderMetrics,
    ) -> Self {
        Self {
            cut: Arc::default(),
            awaiting_heads: InFlightCount::default(),
            providers: providers
                .into_iter()
                .map(|mut p| {
                    if let Some(public_url) = &settings.public_url {
                        p.answer_urls_via(public_url);
                    }
                    (p.name().to_owned(), p)
                })
                .collect(),
            registry,
            auditor,
            settings,
            unknown_provider,
        }
    }

    /// A proxy for one data-plane worker: the same providers, registry,
    /// audit trail and settings, with upstream connection pools of its own.
    /// The worker spawns the returned [`Delivery`] (if any) on its runtime:
    /// it answers the worker's calls waiting for their audit records.
    pub fn for_worker(&self) -> (Self, Option<Delivery>) {
        let (auditor, delivery) = self.auditor.for_worker();
        let proxy = Self {
            cut: Arc::clone(&self.cut),
            awaiting_heads: InFlightCount::default(),
            providers: self
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), p.with_own_pool()))
                .collect(),
            registry: Arc::clone(&self.registry),
            auditor,
            settings: self.settings.clone(),
            unknown_provider: self.unknown_provider.clone(),
        };
        (proxy, delivery)
    }

    /// Counts a connection refused at `proxy.max_connections` (before any
    /// request was read: answered 503 `overloaded`, or closed unanswered on
    /// a TLS listener) under `_unknown`.
    pub(crate) fn count_refused_connection(&self) {
        self.unknown_provider
            .record_refusal(crate::error::ErrorCode::Overloaded);
    }

    /// Counts a request airlock could not parse, answered with `code` and
    /// its connection closed (no call: nothing to route or record).
    pub(crate) fn count_unparsed(&self, code: ErrorCode) {
        self.unknown_provider.record_refusal(code);
    }

    /// Closes this worker's idle upstream connections, every provider's:
    /// what a worker does when it runs out of descriptors (a failed accept
    /// or upstream connect), since pooled connections beyond one per proxy
    /// connection (left by HTTP/2 streams, each of which needed its own)
    /// are not in `descriptors`' estimate. Returns how many were closed.
    pub fn shed_idle_upstream(&self) -> usize {
        self.providers.values().map(|p| p.pool().shed_idle()).sum()
    }

    /// Marks the calls still in flight as cut by airlock: their records say
    /// `incomplete` rather than `client_aborted` when they are dropped. A
    /// call waiting for its provider's answer answers 503 `shutting_down`
    /// instead (at once after 200 ms of waiting, else when its wait
    /// reaches 200 ms); [`Proxy::cut_answered`] resolves once those
    /// answers are on their way.
    pub fn cut_calls_in_flight(&self) {
        self.cut.start();
    }

    /// Resolves once the calls [`Proxy::cut_calls_in_flight`] cut while
    /// they waited for their provider have answered: this worker's calls
    /// that had waited less than 200 ms first reach that mark (or their
    /// answer), then every worker's answers to the cut go out (the
    /// proxies of all workers share the cut).
    pub async fn cut_answered(&self) {
        // A call leaves `awaiting_heads` only once it is counted by the
        // cut's `waiting` (or has its answer), so nothing slips between.
        self.awaiting_heads.none_left().await;
        self.cut.answered().await;
    }

    /// Handles one call. Never fails: every refusal is a JSON error response.
    /// Every call gets exactly one audit record (see [`crate::audit`]).
    ///
    /// A WebSocket handshake the provider accepted comes back as a `101`
    /// with its [`Tunnel`], which the caller runs once the `101` is sent
    /// (the call's record completes when the tunnel ends).
    /// `head_timer` is the connection's (see [`HeadTimer`]).
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        head_timer: &HeadTimer,
    ) -> (Response<ProxyBody>, Option<Box<Tunnel>>) {
        let started = Instant::now();
        if !self.auditor.admits_calls() {
            // Fail closed: nothing goes upstream while records cannot be written.
            let denial = Denial::new(
                ErrorCode::AuditUnavailable,
                "the audit trail cannot be written; calls are refused until it can",
            );
            // Counted under the provider the path names (a lookup of its
            // first segment), as any other refusal of a call to it is.
            let provider = self.route(req.uri().path()).map(|(p, _)| p);
            let metrics = provider.map_or(&self.unknown_provider, |p| &p.metrics);
            metrics.record(Some(denial.code()), started.elapsed().as_secs_f64());
            // Its record is queued, not waited for (the trail cannot be
            // written now): the writer writes it once the store takes
            // writes again (held back, flagged `written_late`, if a commit
            // of it fails first).
            let mut response = denial.into_response();
            let mut call = CallRecord::begin(&self.auditor, &req, started, &self.cut);
            call.request_id().label(response.headers_mut());
            if let Some(provider) = provider {
                call.set_provider(provider.recorded_name());
                // Whose call it was, when this process knows the token: a
                // look in its cache only (a refusal asks the store nothing).
                let known =
                    credentials::find_token(provider.auth(), req.headers(), req.uri().query())
                        .ok()
                        .flatten()
                        .and_then(|token| self.registry.cached_by_token(token));
                if let Some(session) = known {
                    call.set_session(&session);
                }
            }
            withhold_presented(&mut call, &req);
            drop(finish_refused(&mut call, &response));
            linger(req.into_body(), &self.cut);
            return (response, None);
        }
        let mut call = CallRecord::begin(&self.auditor, &req, started, &self.cut);
        let request_id = call.request_id();
        let mut unread = None;
        let (provider, result) = self.process(req, &mut call, head_timer, &mut unread).await;
        let metrics = provider.map_or(&self.unknown_provider, |p| &p.metrics);
        let mut unanswered = Unanswered {
            metrics,
            answered: false,
            refused: None,
        };
        let (mut answer, tunnel) = match result {
            Ok(forwarded) if forwarded.switched() => {
                self.open_tunnel(forwarded, call, metrics).await
            }
            Ok(forwarded) => (self.relay(forwarded, call).await, None),
            Err(denial) if denial.is_agent_gone() => {
                // Nobody is left to answer: recorded (on drop) and counted
                // (by `unanswered`) as `client_aborted`, like any call whose
                // agent left before its answer, not as the 400 of a
                // malformed request.
                drop(call);
                return (denial.into_response(), None);
            }
            Err(denial) => {
                tracing::debug!(code = %denial.code(), "call refused");
                unanswered.refused = Some((denial.code(), started));
                let answer = self.refuse(denial, call).await;
                if let Some(body) = unread {
                    linger(body, &self.cut);
                }
                (answer, None)
            }
        };
        unanswered.answered = true;
        // Counted as the agent gets it: relaying may still answer with
        // airlock's own error (an encoded body, the provider refusing the
        // credential, audit that cannot be written).
        let own_error = answer.extensions().get::<ErrorCode>().copied();
        metrics.record(own_error, started.elapsed().as_secs_f64());
        if own_error.is_some() {
            request_id.label(answer.headers_mut());
        }
        (answer, tunnel)
    }

    /// `unread` receives the body of a call refused before it went
    /// upstream (see [`linger`]).
    async fn process(
        &self,
        req: Request<Incoming>,
        call: &mut CallRecord,
        head_timer: &HeadTimer,
        unread: &mut Option<Incoming>,
    ) -> (Option<&Provider>, Result<Forwarded, Denial>) {
        let Some((provider, path_start)) = self.route(req.uri().path()) else {
            // Counted as `client_aborted` should the agent leave while the
            // token or the denial waits for the store.
            let mut unanswered = Unanswered {
                metrics: &self.unknown_provider,
                answered: false,
                refused: None,
            };
            let denial = self.refuse_unrouted(&req, call).await;
            unanswered.answered = true;
            *unread = Some(req.into_body());
            return (None, Err(denial));
        };
        call.set_provider(provider.recorded_name());
        let mut unanswered = Unanswered {
            metrics: &provider.metrics,
            answered: false,
            refused: None,
        };
        let result = match self.clear(provider, path_start, &req, call).await {
            Ok((admitted, cleared, session)) => {
                self.forward(admitted, cleared, &session, req, call, head_timer)
                    .await
            }
            Err(denial) => {
                *unread = Some(req.into_body());
                Err(denial)
            }
        };
        unanswered.answered = true;
        (Some(provider), result)
    }

    /// Everything a call must pass before it goes upstream: the token, the
    /// scope, the limits, a credential to send.
    async fn clear<'a>(
        &self,
        provider: &'a Provider,
        path_start: usize,
        req: &Request<Incoming>,
        call: &mut CallRecord,
    ) -> Result<(Admitted<'a>, Cleared, Arc<LiveSession>), Denial> {
        let token = credentials::find_token(provider.auth(), req.headers(), req.uri().query())
            .inspect_err(|_| withhold_presented(call, req))?;
        let session = self
            .authenticate_call(token, call)
            .await
            .inspect_err(|_| withhold_presented(call, req))?;
        call.set_session(&session);
        let admitted = match self.authorize(&session, provider, path_start, req, token) {
            Ok(admitted) => admitted,
            Err(denial) => {
                // A path that holds the token is refused; its record must
                // not hold it either.
                if let Some(token) = token {
                    call.withhold_tokens(recorded_target(req.uri()), &[token]);
                }
                self.count_denied(&session).await;
                return Err(denial);
            }
        };
        // Before the limits: a call that cannot go upstream for want of a
        // credential (the operator's to fix) spends none of the session's
        // `max_requests` or its calls' rate (round 40: two such 503s used
        // up a `max_requests` of 2 and were counted as allowed).
        if provider.credential().is_none() {
            // As a refusal at the slots below: a bucket of its own, so
            // that a flood of them runs into the rate, whose refusals
            // count toward `max_denied`.
            if let Some(retry_after) = session.spend_rate() {
                self.count_denied(&session).await;
                return Err(rate_denial(retry_after));
            }
            return Err(credential_unavailable(provider));
        }
        // A bound on what one session holds of this process (connections,
        // upstream connections, memory), not a sign of misuse: refused
        // 429 like a rate limit, but counted toward no `max_denied` (an
        // SDK running calls in parallel would otherwise end its session).
        // Each refusal takes from a `requests_per_minute` bucket of its
        // own, so that a flood of them runs into the rate, whose refusals
        // count, while retries of such refusals never use up the rate of
        // the calls that go upstream.
        let max = self.settings.max_calls_in_flight;
        let Some(slot) = session.enter_call(max) else {
            if let Some(retry_after) = session.spend_rate() {
                self.count_denied(&session).await;
                return Err(rate_denial(retry_after));
            }
            return Err(Denial::new(
                ErrorCode::RateLimited,
                format!(
                    "this session already has {max} calls in flight, the most one session may \
                     have (sessions.max_calls_in_flight); retry once one has ended"
                ),
            )
            .retry_after(SLOT_RETRY_AFTER));
        };
        // The process's bound on calls in flight upstream (HTTP/2 streams
        // each need an upstream connection; see `descriptors`): before the
        // limits, so that a refusal here spends nothing of the session's
        // (a capacity bound, as the slot above, counted toward nothing).
        let Some(upstream_slot) = UpstreamSlot::take() else {
            if let Some(at) = UPSTREAM_FULL.count(airlock_core::spaced::monotonic_ms()) {
                tracing::warn!(
                    refused = at,
                    "as many calls are in flight upstream as proxy.max_connections allows: a \
                     call was refused 503 overloaded ({at} since the last such warning; at most \
                     one a minute): HTTP/2 streams each need an upstream connection"
                );
            }
            return Err(Denial::new(
                ErrorCode::Overloaded,
                "airlock has as many calls in flight to providers as proxy.max_connections \
                 allows; try again shortly",
            )
            .retry_after(Duration::from_secs(1))
            .capacity());
        };
        if let Err(denial) = self.admit(&session).await {
            // Free before counting the denial (a store round trip on a
            // shared store).
            drop(slot);
            drop(upstream_slot);
            // A 429 is the session's doing (unless it is a bound on
            // capacity); a store out of reach is not.
            if denial.counts_as_denial() {
                self.count_denied(&session).await;
            }
            return Err(denial);
        }
        // Taken after the limits, which may have waited for a lease: the
        // credential in force now (rotated, or gone, meanwhile).
        let Some(credential) = provider.credential() else {
            return Err(credential_unavailable(provider));
        };
        call.hold_slot(slot);
        let cleared = Cleared {
            credential,
            upstream_slot,
        };
        Ok((admitted, cleared, session))
    }

    /// The session's limits (429): `max_requests`, `requests_per_minute`.
    async fn admit(&self, session: &Arc<LiveSession>) -> Result<(), Denial> {
        // A call with `max_requests` may wait for its lease to be refilled
        // (a store round trip, only here: a call refused before costs the
        // store nothing): the registry reads the session's state again
        // after such a wait, so a session that ended meanwhile sends
        // nothing more upstream (401), spends nothing and counts no denial.
        let admission = self.registry.admit(session).await.map_err(auth_denial)?;
        match admission {
            Admission::Admitted => Ok(()),
            Admission::RateLimited { retry_after } => Err(rate_denial(retry_after)),
            Admission::QuotaExhausted => Err(Denial::new(
                ErrorCode::RateLimited,
                "max_requests reached for this session",
            )
            .no_retry()),
            // Not the session's doing, nor final: other replicas hold the
            // rest of its quota in leases they have not used yet. As the
            // refusal at `max_calls_in_flight`, each takes from a rate
            // bucket of its own, so that a flood of them runs into the
            // rate limit, whose refusals count.
            Admission::QuotaHeldElsewhere => match session.spend_rate() {
                Some(retry_after) => Err(rate_denial(retry_after)),
                None => Err(Denial::new(
                    ErrorCode::RateLimited,
                    "the rest of this session's max_requests is leased to other airlock \
                     replicas and not used yet; retry in a moment",
                )
                .retry_after(SLOT_RETRY_AFTER)
                .capacity()),
            },
        }
    }

    /// Answers with airlock's own error once its record is durable (503
    /// `audit_unavailable` instead, when fail-closed audit cannot write it).
    async fn refuse(&self, denial: Denial, mut call: CallRecord) -> Response<ProxyBody> {
        let response = denial.into_response();
        let Some(commit) = finish_refused(&mut call, &response) else {
            return response;
        };
        match commit.await {
            Ok(()) => response,
            Err(e) if call.fail_closed() => {
                tracing::error!(error = %e, "audit record not written; call refused");
                audit_unavailable()
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit record not written");
                response
            }
        }
    }

    /// Relays the provider's answer, with the credential scrubbed from its
    /// headers and body. Its record completes when the body ends; a response
    /// without a body is recorded before it is sent. A provider refusing the
    /// real credential (401) gets the agent airlock's own 502 instead of a
    /// body that may quote part of the key.
    async fn relay(&self, forwarded: Forwarded, mut call: CallRecord) -> Response<ProxyBody> {
        let Forwarded {
            response,
            credential,
            agent_upgrade: _,
            results_url,
        } = forwarded;
        let (mut parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        call.set_forwarded(status);
        if let Some(denial) = unrelayable(&parts, &body, call.provider().unwrap_or("-")) {
            return self.refuse(denial, call).await;
        }
        strip_hop_by_hop(&mut parts.headers);
        // A 204 has no body and no length (RFC 9110 §8.6): HTTP/2 agents
        // take one the provider sent anyway as a broken stream.
        if parts.status == StatusCode::NO_CONTENT {
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
        // Nothing of the upstream connection's own goes on: hyper would
        // write the provider's reason phrase (text it chose, which can
        // quote the key) in place of the standard one.
        parts.extensions.clear();
        let redactor = credential.value.redactor();
        if redactor.scrub_headers(&mut parts.headers) {
            call.flag(Flags::CREDENTIAL_REDACTED);
        }
        call.note_provider_request_id(&parts.headers);
        if !has_body(parts.status, &body) {
            if let Some(commit) = call.finish(None, status, Flags::empty()) {
                if let Err(e) = commit.await {
                    if call.fail_closed() {
                        tracing::error!(error = %e, "audit record not written; response withheld");
                        return audit_unavailable();
                    }
                    tracing::warn!(error = %e, "audit record not written");
                }
            }
            return Response::from_parts(parts, ProxyBody::upstream(body));
        }
        // Looked up only for an answer of unknown length (a stream).
        let event_stream = body.size_hint().exact().is_none()
            && parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.as_bytes().get(..b"text/event-stream".len()))
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"));
        let body = RedactingBody::new(body, redactor, RedactionFlag::default());
        // Said in a refusal should the session end before the answer.
        let session = call.session().cloned();
        let mut body = ProxyBody::audited(body, call, status, event_stream);
        // A batch answer whose `results_url` airlock may rewrite is read
        // whole first (up to a bound), with or without a length.
        let results_url = results_url.filter(|_| is_json(&parts.headers));
        let read = if results_url.is_some() {
            body.gather(REWRITE_AT_MOST).await
        } else {
            body.prefetch().await
        };
        match read {
            Ok(()) => {}
            // Fail-closed audit could not write the record (logged by the
            // body), before anything was sent.
            Err(Withheld::AuditUnwritten) => return audit_unavailable(),
            Err(Withheld::SessionEnded) => {
                return ended_during_call(session.as_deref()).into_response()
            }
            Err(Withheld::StoreUnavailable) => return store_unavailable().into_response(),
            Err(Withheld::UpstreamBroke) => {
                return Denial::new(
                    ErrorCode::UpstreamError,
                    "the provider's answer broke off before its first byte",
                )
                .into_response()
            }
        }
        if let Some(results_url) = results_url {
            if let Some(len) = body.rewrite_whole(|whole| results_url.rewrite(whole)) {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
        }
        Response::from_parts(parts, body)
    }

    /// Answers a WebSocket handshake the provider switched (101): the
    /// agent gets the `101` (the provider's headers, scrubbed, with the
    /// switch) and the caller the [`Tunnel`] to run once it is sent. A
    /// switch airlock cannot carry ([`websocket::unacceptable`]) is a 502.
    async fn open_tunnel(
        &self,
        forwarded: Forwarded,
        mut call: CallRecord,
        metrics: &ProviderMetrics,
    ) -> (Response<ProxyBody>, Option<Box<Tunnel>>) {
        let Forwarded {
            response,
            credential,
            agent_upgrade,
            results_url: _,
        } = forwarded;
        let (mut parts, body) = response.into_parts();
        call.set_forwarded(parts.status.as_u16());
        let refused = websocket::unacceptable(&parts.headers, call.provider().unwrap_or("-"));
        let provider_upgrade = parts.extensions.remove::<OnUpgrade>();
        let (Some(agent), Some(provider), None) =
            (agent_upgrade, provider_upgrade, refused.clone())
        else {
            let denial = refused.unwrap_or_else(|| {
                Denial::new(
                    ErrorCode::UpstreamError,
                    "the provider's connection cannot be switched",
                )
            });
            return (self.refuse(denial, call).await, None);
        };
        strip_hop_by_hop(&mut parts.headers);
        let redactor = credential.value.redactor().clone();
        if redactor.scrub_headers(&mut parts.headers) {
            call.flag(Flags::CREDENTIAL_REDACTED);
        }
        websocket::switching_headers(&mut parts.headers);
        // Nothing of the upstream connection's own goes on (see `relay`).
        parts.extensions.clear();
        let tunnel = Tunnel::new(agent, provider, body, call, redactor, &metrics.tunnels);
        (
            Response::from_parts(parts, ProxyBody::full(bytes::Bytes::new())),
            Some(tunnel),
        )
    }

    /// The provider named by the first path segment (after the public
    /// URL's path, where the call has it), and where the provider's own
    /// path starts; `None` when no provider is configured under it.
    fn route(&self, path: &str) -> Option<(&Provider, usize)> {
        let prefixed = self
            .settings
            .path_prefix
            .as_deref()
            .and_then(|prefix| path.strip_prefix(prefix))
            .filter(|rest| rest.starts_with('/'));
        let rest = prefixed.unwrap_or(path);
        let name = rest
            .strip_prefix('/')
            .map(|rest| match rest.bytes().position(|b| b == b'/') {
                Some(end) => &rest[..end],
                None => rest,
            })
            .unwrap_or("");
        let provider = self.providers.get(name)?;
        Some((provider, path.len() - rest.len() + 1 + name.len()))
    }

    /// The refusal of a call under no configured provider, checked in the
    /// order of every call: 400 for a token that cannot be read
    /// unambiguously, 401 without a valid session token (503 when the
    /// store cannot tell), then 400 for a head or path refused under any
    /// provider and 403 for any other, as no session's scope holds a
    /// provider airlock does not configure; counted toward the session's
    /// `max_denied` like any refusal of an identified session. The token
    /// is looked for wherever a configured provider takes one.
    async fn refuse_unrouted(&self, req: &Request<Incoming>, call: &mut CallRecord) -> Denial {
        withhold_presented(call, req);
        let mut providers: Vec<&Provider> = self.providers.values().collect();
        providers.sort_unstable_by_key(|p| p.name());
        let token = match credentials::find_token_in_any(
            providers.iter().map(|p| p.auth()),
            req.headers(),
            req.uri().query(),
        ) {
            Ok(token) => token,
            Err(denial) => return denial,
        };
        let session = match self.authenticate_call(token, call).await {
            Ok(session) => session,
            Err(denial) => return denial,
        };
        call.set_session(&session);
        let screened = credentials::screen_unrouted(req, &self.settings.request)
            .and_then(|()| {
                path::validate(req.uri().path()).map_err(|e| Denial::bad_request(e.to_string()))
            })
            .and_then(|_| request_method(req));
        let denial = match screened {
            Err(denial) => denial,
            Ok(_) => Denial::new(
                ErrorCode::OutOfScope,
                "no provider is configured under this path, so it is outside this session's \
                 scope; use /{provider}/... with a provider of the scope",
            ),
        };
        self.count_denied(&session).await;
        denial
    }

    /// 401 unless the token names an active session. A revoked or
    /// expired session's token still names it: `call`'s record then says
    /// whose ended session was used.
    async fn authenticate_call(
        &self,
        token: Option<&str>,
        call: &mut CallRecord,
    ) -> Result<Arc<LiveSession>, Denial> {
        self.registry
            .authenticate(token, now_ms())
            .await
            .map_err(auth_denial)
            .inspect_err(|_| {
                if let Some(ended) = token.and_then(|t| self.registry.cached_by_token(t)) {
                    call.set_session(&ended);
                }
            })
    }

    /// Path (400), scope (403) and limits (429), in that order.
    fn authorize<'a>(
        &self,
        session: &LiveSession,
        provider: &'a Provider,
        path_start: usize,
        req: &Request<Incoming>,
        token: Option<&str>,
    ) -> Result<Admitted<'a>, Denial> {
        let websocket = websocket::classify(req)?;
        credentials::screen(req, provider, &self.settings.request, token)?;
        let full = req.uri().path();
        let upstream_path = upstream_path(full, path_start);
        let valid_path =
            path::validate(upstream_path).map_err(|e| Denial::bad_request(e.to_string()))?;
        let method = if websocket {
            Method::WebSocket
        } else {
            request_method(req)?
        };
        if !session
            .scope()
            .allows_valid(provider.name(), method, valid_path)
        {
            let provider = provider.name();
            let message = if websocket {
                format!(
                    "a WebSocket to {upstream_path} on {provider} is outside this session's \
                     scope (a rule grants it with the method WEBSOCKET, e.g. \
                     {provider}:WEBSOCKET:{upstream_path}; GET does not)"
                )
            } else {
                format!("{method} {upstream_path} on {provider} is outside this session's scope")
            };
            return Err(Denial::new(ErrorCode::OutOfScope, message));
        }
        Ok(Admitted {
            provider,
            path_start,
            websocket,
        })
    }

    /// Counts a denial toward `max_denied`, revoking the session when it
    /// reaches it here; on a shared store, the denial is in the store
    /// before the refusal is answered (see [`Registry::write_denials`]).
    async fn count_denied(&self, session: &Arc<LiveSession>) {
        if session.count_denied() {
            self.registry.revoke_in_background(session);
        }
        self.registry.write_denials(session).await;
    }

    /// Swaps the credential in, sends upstream and relays the answer.
    async fn forward(
        &self,
        admitted: Admitted<'_>,
        cleared: Cleared,
        session: &Arc<LiveSession>,
        mut req: Request<Incoming>,
        call: &mut CallRecord,
        head_timer: &HeadTimer,
    ) -> Result<Forwarded, Denial> {
        let Cleared {
            credential,
            upstream_slot,
        } = cleared;
        let provider = admitted.provider;
        let results_url = provider.results_url_for(req.uri().path()).cloned();
        // Taken before the head is prepared (which clears the extensions).
        let agent_upgrade = admitted.websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        credentials::prepare_upstream(
            &mut parts,
            provider,
            &credential.value,
            admitted.path_start,
        )?;
        if admitted.websocket {
            websocket::prepare_handshake(&mut parts.headers);
        }
        let counted = call.count_request_body();
        let limit = self.settings.request.max_request_body;
        let body = RequestBody::new(body, Arc::clone(&counted), limit);
        let upstream_req = Request::from_parts(parts, body);

        call.set_sending();
        let sent = tokio::time::Instant::now();
        let send = async {
            if admitted.websocket {
                // A connection of its own, never a pooled one.
                let connector = provider.upgrade_connector();
                provider
                    .pool()
                    .send_upgrade(connector, upstream_req, upstream_slot)
                    .await
            } else {
                provider.pool().send(upstream_req, upstream_slot).await
            }
        };
        tokio::pin!(send);
        let deadline = sent + self.settings.upstream_timeout;
        // Counted until the wait is over: a drain that ends meanwhile waits
        // for the call to reach its timer, which then sees the cut.
        let awaiting = EnteredHere::enter(&self.awaiting_heads);
        // Most answers come sooner: the connection's timer until then, as
        // cheap as one can be; a slower one also watches the session (and
        // the cut).
        let mut timer = head_timer.take((sent + WATCH_SESSION_AFTER).min(deadline));
        let answered = tokio::select! {
            biased;
            answer = send.as_mut() => Some(answer),
            () = timer.as_mut() => None,
        };
        head_timer.give_back(timer);
        let response = match answered {
            Some(answer) => Ok(answer),
            None => head_or_end(send, deadline, session, &self.cut).await,
        };
        // Only now: a cut call is counted by the cut's `waiting` by now.
        drop(awaiting);
        provider
            .metrics
            .record_upstream(sent.elapsed().as_secs_f64());
        let response = match response {
            Err(HeadWait::TimedOut) => {
                return Err(Denial::new(
                    ErrorCode::UpstreamTimeout,
                    "the provider did not answer in time",
                ))
            }
            Err(HeadWait::Cut(waiting)) => {
                // Shutdown's drain ended: the agent learns it from an
                // answer (SDKs retry a 503, on another replica behind a
                // balancer) rather than from a connection closed unanswered.
                call.flag(Flags::INCOMPLETE);
                call.answers_cut(waiting);
                return Err(Denial::new(
                    ErrorCode::ShuttingDown,
                    "airlock is shutting down and cut the call before the provider answered",
                ));
            }
            Err(HeadWait::SessionEnded) => {
                // Dropping the request closed its upstream connection: the
                // provider stops working for a session that is over.
                call.flag(Flags::INCOMPLETE.union(Flags::SESSION_ENDED));
                return Err(ended_during_call(Some(session)));
            }
            Err(HeadWait::StoreUnavailable) => {
                // As above: a revocation elsewhere may not have reached
                // this process.
                call.flag(Flags::INCOMPLETE);
                return Err(store_unavailable());
            }
            Ok(Err(_)) if counted.load(Ordering::Relaxed) > limit => {
                // The provider saw the head and part of the body before
                // airlock cut the request: the record says so.
                call.flag(Flags::INCOMPLETE);
                return Err(Denial::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the request body is larger than proxy.max_request_body ({limit} bytes)"
                    ),
                ));
            }
            Ok(Err(e)) if e.is_agent_body_broken() => {
                call.flag(Flags::CLIENT_ABORTED);
                let denial = Denial::bad_request(
                    "the request body broke off before its end (its connection closed or its \
                     framing failed)",
                );
                return Err(if e.is_agent_gone() {
                    denial.agent_gone()
                } else {
                    denial
                });
            }
            Ok(Err(e)) if e.is_resource_shortage() => {
                // airlock's own shortage, not the provider's: the proxy's
                // usual answer when it is full (see `descriptors`).
                let shed = self.shed_idle_upstream();
                tracing::warn!(
                    provider = %provider.name(),
                    request_id = %call.request_id(),
                    error = %e,
                    idle_connections_closed = shed,
                    "no upstream connection"
                );
                return Err(Denial::new(
                    ErrorCode::Overloaded,
                    "airlock is out of file descriptors or memory for a connection to the \
                     provider; try again shortly",
                )
                .retry_after(Duration::from_secs(1)));
            }
            Ok(Err(e)) => {
                // The call's id leads to its `airlock::call` line (round
                // 43: only the time linked the two).
                tracing::warn!(
                    provider = %provider.name(),
                    request_id = %call.request_id(),
                    error = %e,
                    "upstream request failed"
                );
                return Err(Denial::new(
                    ErrorCode::UpstreamError,
                    "the provider could not be reached, or its answer could not be read",
                ));
            }
            Ok(Ok(response)) => response,
        };
        Ok(Forwarded {
            response,
            credential,
            agent_upgrade,
            results_url,
        })
    }
}

/// Most of a batch answer read before its head goes out (see
/// [`crate::results_url`]); a longer one goes on unchanged.
const REWRITE_AT_MOST: usize = 1024 * 1024;

/// Whether `headers` say `Content-Type: application/json` (parameters
/// allowed).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/json") && matches!(v.get(16), None | Some(b';' | b' '))
    })
}

/// Whether a response carries a body the agent will read.
fn has_body(status: StatusCode, body: &UpstreamBody) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || body.is_end_stream())
}

/// airlock's own error in place of a provider's answer it must not relay:
/// a 401 (the provider refused the real credential, and such bodies often
/// quote part of it: OpenAI's names its last characters), a 1xx nobody
/// asked for, or a body in a coding the leak guard cannot read. `None` for
/// an answer to relay — a 403 too: providers refuse with it what the key
/// may not do (a model, a region, a project role), which the agent's SDK
/// reports as such (round 39: it read "the provider refused airlock's
/// credential").
fn unrelayable(
    parts: &http::response::Parts,
    body: &UpstreamBody,
    provider: &str,
) -> Option<Denial> {
    let status = parts.status.as_u16();
    if parts.status == StatusCode::UNAUTHORIZED {
        tracing::warn!(%provider, status, "the provider refused the real credential");
        let message = format!(
            "the provider refused airlock's credential (HTTP {status}); ask the operator to check it"
        );
        return Some(Denial::new(ErrorCode::UpstreamAuthFailed, message).no_retry());
    }
    if parts.status.is_informational() {
        // hyper hands a request only a final answer, or a 101 nobody asked
        // for (airlock sends no Upgrade).
        let message = format!("the provider answered {status} to a call that asked for no upgrade");
        return Some(Denial::new(ErrorCode::UpstreamError, message));
    }
    // Framing the provider made ambiguous is refused, not repaired (as an
    // agent's is): its `Content-Length` would have framed the agent's
    // answer while hyper read the body chunked (round 35: answers cut, or
    // short but complete-looking).
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING)
        && parts.headers.contains_key(http::header::CONTENT_LENGTH)
    {
        tracing::warn!(
            %provider,
            "the provider's answer had both Content-Length and Transfer-Encoding"
        );
        return Some(Denial::new(
            ErrorCode::UpstreamError,
            "the provider's answer had both Content-Length and Transfer-Encoding (ambiguous \
             framing)",
        ));
    }
    let coding = opaque_coding(&parts.headers).filter(|_| has_body(parts.status, body))?;
    tracing::warn!(
        %provider,
        %coding,
        "the provider sent an encoded answer the leak guard cannot scan"
    );
    let message = format!(
        "the provider answered with a {coding}-encoded body, which airlock cannot scan for its \
         credential (it asks for unencoded answers)"
    );
    Some(Denial::new(ErrorCode::UpstreamError, message))
}

/// Withholds from `call`'s recorded path every session token `req`
/// presents, for a call refused before its own token was known.
fn withhold_presented<B>(call: &mut CallRecord, req: &Request<B>) {
    let tokens = credentials::presented_tokens(req);
    if !tokens.is_empty() {
        call.withhold_tokens(recorded_target(req.uri()), &tokens);
    }
}

/// Completes the record of a call airlock answers itself with `response`;
/// the future resolves once the record is durable (see
/// [`CallRecord::finish`]).
fn finish_refused(
    call: &mut CallRecord,
    response: &Response<ProxyBody>,
) -> Option<impl std::future::Future<Output = Result<(), airlock_audit::AuditError>> + Send + 'static>
{
    call.bytes_out = response.body().size_hint().exact().unwrap_or(0);
    call.finish(
        Some(denial_code(response)),
        response.status().as_u16(),
        Flags::empty(),
    )
}

/// What a call holds once every check passed: the credential to send and
/// its part of the bound on calls in flight upstream.
struct Cleared {
    credential: Arc<Loaded<PreparedCredential>>,
    upstream_slot: UpstreamSlot,
}

/// Calls refused for the bound on calls in flight upstream, warned about
/// once a minute.
static UPSTREAM_FULL: airlock_core::spaced::Spaced = airlock_core::spaced::Spaced::new(60_000);

/// 401 for a call whose session ended while it was under way: saying so,
/// and that `max_denied` ended it when it did (a call in flight on one
/// replica when another's denials revoked the session said only "revoked
/// or expired").
fn ended_during_call(session: Option<&LiveSession>) -> Denial {
    let message = if session.is_some_and(LiveSession::reached_max_denied) {
        "the session was revoked during the call: it reached its max_denied limit of refused \
         calls (out of scope, malformed or rate limited)"
    } else {
        "the session was revoked or expired during the call"
    };
    Denial::new(ErrorCode::InvalidToken, message)
}

/// 503 `credential_unavailable`: `provider` has no credential to send. Only
/// an operator can fix this: an SDK retrying at once would only add calls.
fn credential_unavailable(provider: &Provider) -> Denial {
    Denial::new(
        ErrorCode::CredentialUnavailable,
        format!(
            "no credential is configured for provider {}",
            provider.name()
        ),
    )
    .no_retry()
}

/// 503 `store_unavailable`: the session store is needed and cannot be reached.
fn store_unavailable() -> Denial {
    Denial::new(
        ErrorCode::StoreUnavailable,
        "the session store cannot be reached; try again shortly",
    )
}

/// Counts a call in the metrics as its record says when its agent goes
/// away (the call's future is dropped) before airlock has answered:
/// `client_aborted`, or the refusal whose record was written already.
struct Unanswered<'a> {
    metrics: &'a ProviderMetrics,
    answered: bool,
    /// Set once a refusal's record is finished: the record says it.
    refused: Option<(ErrorCode, Instant)>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        match self.refused {
            Some((code, started)) => self
                .metrics
                .record(Some(code), started.elapsed().as_secs_f64()),
            None => self.metrics.record_aborted(),
        }
    }
}

/// The error code of one of airlock's own error responses.
fn denial_code(response: &Response<ProxyBody>) -> &'static str {
    response
        .extensions()
        .get::<ErrorCode>()
        .map_or("error", |code| code.as_str())
}

fn audit_unavailable() -> Response<ProxyBody> {
    Denial::new(
        ErrorCode::AuditUnavailable,
        "the audit trail cannot be written; calls are refused until it can",
    )
    .into_response()
}

/// The answer to a token refused: 401, or 503 when the store is out of reach.
/// The call's method among those a scope can name; 400 for any other.
fn request_method<B>(req: &Request<B>) -> Result<Method, Denial> {
    Method::of_request(req.method().as_str())
        .ok_or_else(|| Denial::bad_request(format!("method {} is not supported", req.method())))
}

fn auth_denial(error: AuthError) -> Denial {
    match error {
        AuthError::StoreUnavailable => store_unavailable(),
        other => Denial::new(ErrorCode::InvalidToken, other.to_string()),
    }
}

/// The part of the request path after `/{provider}`; `/` when nothing follows.
pub(crate) fn upstream_path(full: &str, start: usize) -> &str {
    match full.get(start..) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

/// How long a call waits for the provider's answer before it also watches
/// its session, so that a revocation (or the expiry) ends the wait at once.
/// Later rather than from the start: a watch costs a registration on the
/// session and a timer, which the many calls answered sooner never need.
const WATCH_SESSION_AFTER: Duration = Duration::from_millis(200);

/// The 429 of a call over its session's `requests_per_minute`.
fn rate_denial(retry_after: Duration) -> Denial {
    Denial::new(
        ErrorCode::RateLimited,
        "requests_per_minute exceeded for this session",
    )
    .retry_after(retry_after)
}

/// The `Retry-After` of a call refused because its session has
/// `sessions.max_calls_in_flight` calls in flight.
const SLOT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The timer a connection's calls wait for the provider's answer with
/// (until [`WATCH_SESSION_AFTER`]), kept from one call to the next.
///
/// A timer made for each call is registered with the runtime and removed
/// again every time, and one due before the runtime's next planned wake-up
/// (the connection's idle timeout, mostly) makes it wake itself: a system
/// call and one more turn of its event loop, per call. A kept timer that
/// is still pending is moved later with one atomic operation. Once a
/// connection has been idle for [`WATCH_SESSION_AFTER`] the timer fires
/// unheard. Calls running at once on one HTTP/2 connection make their own
/// beside it.
#[derive(Default)]
pub struct HeadTimer(std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>);

impl HeadTimer {
    /// The timer, set to `deadline`.
    fn take(&self, deadline: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
        let kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match kept {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Keeps `timer` for the connection's next call.
    fn give_back(&self, timer: Pin<Box<tokio::time::Sleep>>) {
        let mut kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.is_none() {
            *kept = Some(timer);
        }
    }
}

/// Why a call stopped waiting for the provider's answer.
#[derive(Debug)]
enum HeadWait {
    /// `proxy.upstream_timeout` passed.
    TimedOut,
    /// The session was revoked or expired.
    SessionEnded,
    /// The session store has been out of reach for longer than
    /// `store.max_staleness`: the session cannot be vouched for.
    StoreUnavailable,
    /// Shutdown's drain ended; the call is counted until it has answered.
    Cut(Waiting),
}

/// Goes on waiting for `send` (the provider's answer) until `deadline`,
/// until `session` ends, or until shutdown cuts the calls in flight.
async fn head_or_end<F: std::future::Future>(
    mut send: std::pin::Pin<&mut F>,
    deadline: tokio::time::Instant,
    session: &Arc<LiveSession>,
    cut: &Arc<Cut>,
) -> Result<F::Output, HeadWait> {
    let waiting = cut.waiting();
    if tokio::time::Instant::now() >= deadline {
        return Err(HeadWait::TimedOut);
    }
    // Listening from here on; an end before it is read off the session.
    let mut watch = airlock_session::EndWatch::new(session);
    let ended = |end| match end {
        airlock_session::WatchEnd::Ended => HeadWait::SessionEnded,
        airlock_session::WatchEnd::Unvouched => HeadWait::StoreUnavailable,
    };
    if let Some(end) = airlock_session::WatchEnd::of(session) {
        return Err(ended(end));
    }
    tokio::select! {
        biased;
        answer = send.as_mut() => Ok(answer),
        end = std::future::poll_fn(|cx| watch.poll_ended(cx)) => Err(ended(end)),
        () = tokio::time::sleep_until(deadline) => Err(HeadWait::TimedOut),
        () = cut.started() => Err(HeadWait::Cut(waiting)),
    }
}
