//! The request path, one stage a line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::{path, Method};
use airlock_session::{now_ms, Admission, AuthError, LiveSession, Registry};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::credentials;
use crate::error::{Denial, ErrorCode};
use crate::headers::strip_hop_by_hop;
use crate::metrics::ProviderMetrics;
use crate::provider::Provider;

/// Tunables of the request path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// How long the upstream may take to send response headers (504 after).
    pub upstream_timeout: Duration,
}

/// The proxy: providers by name and the session registry.
pub struct Proxy {
    providers: HashMap<String, Provider>,
    registry: Arc<Registry>,
    settings: ProxySettings,
    unknown_provider: ProviderMetrics,
}

/// A call that got past every check, ready to forward.
struct Admitted<'a> {
    provider: &'a Provider,
    path_start: usize,
}

// === impl Proxy ===

impl Proxy {
    /// A proxy for `providers`, authenticating against `registry`.
    /// `unknown_provider` counts calls to names that are not configured.
    pub fn new(
        providers: Vec<Provider>,
        registry: Arc<Registry>,
        settings: ProxySettings,
        unknown_provider: ProviderMetrics,
    ) -> Self {
        Self {
            providers: providers
                .into_iter()
                .map(|p| (p.name().to_owned(), p))
                .collect(),
            registry,
            settings,
            unknown_provider,
        }
    }

    /// Handles one call. Never fails: every refusal is a JSON error response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let (provider, result) = self.process(req).await;
        let metrics = provider.map_or(&self.unknown_provider, |p| &p.metrics);
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(response) => {
                metrics.record(None, seconds);
                response
            }
            Err(denial) => {
                metrics.record(Some(denial.code()), seconds);
                tracing::debug!(code = %denial.code(), "call refused");
                denial.into_response()
            }
        }
    }

    async fn process(
        &self,
        req: Request<Incoming>,
    ) -> (Option<&Provider>, Result<Response<ProxyBody>, Denial>) {
        let provider = match self.route(req.uri().path()) {
            Ok(provider) => provider,
            Err(denial) => return (None, Err(denial)),
        };
        (Some(provider), self.process_for(provider, req).await)
    }

    async fn process_for(
        &self,
        provider: &Provider,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Denial> {
        let token = credentials::find_token(provider.auth(), req.headers(), req.uri().query())?;
        let session = self.authenticate(token).await?;
        let admitted = self
            .authorize(&session, provider, &req)
            .inspect_err(|_| self.count_denied(&session))?;
        self.forward(admitted, req).await
    }

    /// The provider named by the first path segment.
    fn route(&self, path: &str) -> Result<&Provider, Denial> {
        let name = path
            .strip_prefix('/')
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            .unwrap_or("");
        self.providers.get(name).ok_or_else(|| {
            Denial::new(
                ErrorCode::UnknownProvider,
                "no provider is configured under this path; use /{provider}/...",
            )
        })
    }

    /// 401 unless the token names an active session.
    async fn authenticate(&self, token: Option<&str>) -> Result<Arc<LiveSession>, Denial> {
        self.registry
            .authenticate(token, now_ms())
            .await
            .map_err(|e| match e {
                AuthError::StoreUnavailable => {
                    Denial::new(ErrorCode::UpstreamError, "session store unavailable")
                }
                other => Denial::new(ErrorCode::InvalidToken, other.to_string()),
            })
    }

    /// Path (400), scope (403) and limits (429), in that order.
    fn authorize<'a>(
        &self,
        session: &LiveSession,
        provider: &'a Provider,
        req: &Request<Incoming>,
    ) -> Result<Admitted<'a>, Denial> {
        let full = req.uri().path();
        let path_start = 1 + provider.name().len();
        let upstream_path = upstream_path(full, path_start);
        path::validate(upstream_path).map_err(|e| Denial::bad_request(e.to_string()))?;
        let method = Method::parse(req.method().as_str()).ok_or_else(|| {
            Denial::bad_request(format!("method {} is not supported", req.method()))
        })?;
        if !session
            .scope()
            .allows(provider.name(), method, upstream_path)
        {
            return Err(Denial::new(
                ErrorCode::OutOfScope,
                format!(
                    "{method} {upstream_path} on {} is outside this session's scope",
                    provider.name()
                ),
            ));
        }
        match session.admit() {
            Admission::Admitted => Ok(Admitted {
                provider,
                path_start,
            }),
            Admission::RateLimited => Err(Denial::new(
                ErrorCode::RateLimited,
                "requests_per_minute exceeded for this session",
            )),
            Admission::QuotaExhausted => Err(Denial::new(
                ErrorCode::RateLimited,
                "max_requests reached for this session",
            )),
        }
    }

    fn count_denied(&self, session: &Arc<LiveSession>) {
        if session.count_denied() {
            self.registry.revoke_in_background(session);
        }
    }

    /// Swaps the credential in, sends upstream and relays the answer.
    async fn forward(
        &self,
        admitted: Admitted<'_>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Denial> {
        let provider = admitted.provider;
        if !provider.has_credential() {
            return Err(Denial::new(
                ErrorCode::CredentialUnavailable,
                format!(
                    "no credential is configured for provider {}",
                    provider.name()
                ),
            ));
        }
        let (mut parts, body) = req.into_parts();
        credentials::prepare_upstream(&mut parts, provider, admitted.path_start)?;
        let upstream_req = Request::from_parts(parts, body);

        let sent = Instant::now();
        let response = tokio::time::timeout(
            self.settings.upstream_timeout,
            provider.client().request(upstream_req),
        )
        .await;
        provider
            .metrics
            .record_upstream(sent.elapsed().as_secs_f64());
        let response = match response {
            Err(_) => {
                return Err(Denial::new(
                    ErrorCode::UpstreamTimeout,
                    "the provider did not answer in time",
                ))
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = provider.name(), error = %e, "upstream request failed");
                return Err(Denial::new(
                    ErrorCode::UpstreamError,
                    "the provider could not be reached",
                ));
            }
            Ok(Ok(response)) => response,
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, ProxyBody::upstream(body)))
    }
}

/// The part of the request path after `/{provider}`; `/` when nothing follows.
pub(crate) fn upstream_path(full: &str, start: usize) -> &str {
    match full.get(start..) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}
