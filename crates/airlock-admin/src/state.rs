//! What the admin API needs to do its job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::TokenHash;
use airlock_session::Registry;

use crate::audit::AuditAccess;
use crate::auth::AuthFailures;
use crate::providers::CredentialAdmin;
use prometheus_client::metrics::counter::Counter;

/// Per-provider values a session's `env` is built from.
#[derive(Clone, Debug)]
pub struct ProviderEnv {
    pub env_key: String,
    pub env_base_url: String,
    pub base_path: String,
}

/// Counters of the control plane.
#[derive(Clone)]
pub struct AdminMetrics {
    pub sessions_created: Counter,
    pub sessions_revoked: Counter,
    /// Requests refused for want of the admin token.
    pub auth_failures: Arc<AuthFailures>,
}

/// What `GET /v1/server` says of this process: its build and the settings
/// in force that decide how calls are treated.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// The `airlock` version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// When this process started (Unix ms, for display).
    pub started_at_ms: i64,
    /// The same on the monotonic clock, which uptime is counted on.
    pub started: std::time::Instant,
    /// `sqlite` or `postgres`.
    pub store: &'static str,
    /// `[audit] fail_closed` (meaningless with audit disabled).
    pub audit_fail_closed: bool,
    /// `sessions.max_calls_in_flight` as in force (after `serve` lowered
    /// the default).
    pub max_calls_in_flight: u32,
}

/// Shared state of the admin API.
pub struct AdminState {
    /// This process, for `GET /v1/server`.
    pub server: ServerInfo,
    pub registry: Arc<Registry>,
    /// Configured providers by name.
    pub providers: BTreeMap<String, ProviderEnv>,
    /// Base URL agents are told to use, without trailing slash.
    pub public_url: String,
    /// SHA-256 of the admin token.
    pub admin_token_hash: TokenHash,
    pub max_ttl: Duration,
    /// Provider credentials (write-only).
    pub credentials: Arc<dyn CredentialAdmin>,
    /// The audit trail; `None` when audit is disabled.
    pub audit: Option<AuditAccess>,
    pub metrics_registry: prometheus_client::registry::Registry,
    pub metrics: AdminMetrics,
    /// Whether this process accepts new calls: true once serving, false
    /// while draining after SIGTERM (`/readyz` answers 503 then).
    pub ready: std::sync::atomic::AtomicBool,
    /// Whether the proxy admits calls now: false while a fail-closed audit
    /// trail cannot be written (`/readyz` answers 503 then, so that a load
    /// balancer sends calls to a replica that can record them).
    pub calls_admitted: Box<dyn Fn() -> bool + Send + Sync>,
}

impl AdminMetrics {
    /// Creates and registers the counters.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            sessions_created: Counter::default(),
            sessions_revoked: Counter::default(),
            auth_failures: Arc::new(AuthFailures::register(registry)),
        };
        registry.register(
            "airlock_sessions_created",
            "Sessions created",
            metrics.sessions_created.clone(),
        );
        registry.register(
            "airlock_sessions_revoked",
            "Sessions revoked through the admin API",
            metrics.sessions_revoked.clone(),
        );
        metrics
    }
}
