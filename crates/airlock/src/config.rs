//! `airlock.toml`: parsed into typed settings before any port is bound.
//! A bad config is refused whole, naming the file, the key and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_core::{duration, rule, Secret};
use airlock_proxy::AuthStyle;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

/// The config file used when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "airlock.toml";

/// A config error: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

/// The whole configuration, validated.
#[derive(Debug)]
pub struct Config {
    pub source: String,
    pub proxy: ProxyConfig,
    pub admin_listen: SocketAddr,
    pub store_url: String,
    /// `[store] max_staleness`: how long a replica on a shared store keeps
    /// serving cached sessions while it cannot reach the database.
    pub store_max_staleness: Duration,
    /// Where the master key that seals `store` credentials is kept when
    /// `AIRLOCK_MASTER_KEY` is not set.
    pub master_key_file: PathBuf,
    /// Whether `master_key_file` was set in the config (not defaulted).
    pub master_key_file_explicit: bool,
    pub audit: AuditConfig,
    pub max_ttl: Duration,
    /// `sessions.max_calls_in_flight`: calls one session may have in
    /// flight in one process.
    pub max_calls_in_flight: u32,
    /// Whether `max_calls_in_flight` came from the file (not the default).
    pub max_calls_in_flight_set: bool,
    pub providers: BTreeMap<String, ProviderConfig>,
    /// What the file says that likely is not what was meant (shown by
    /// `config check`, logged by `serve`), besides [`Config::warnings`]'
    /// own checks.
    notes: Vec<String>,
}

/// Most data-plane threads `proxy.workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// `[proxy]`.
#[derive(Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    /// Data-plane threads (default: one per core).
    pub workers: usize,
    /// `tls_cert` / `tls_key`: serve HTTPS (both set, and loadable at start).
    pub tls: Option<airlock_proxy::tls::TlsFiles>,
    /// Connection and request limits (see [`ProxyLimits`]).
    pub limits: ProxyLimits,
}

impl ProxyConfig {
    /// The path of `public_url` (`/airlock` of `https://host/airlock`),
    /// which calls may carry before `/{provider}`; `None` without one.
    pub fn public_path(&self) -> Option<&str> {
        let url = self.public_url.as_deref()?;
        let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        after_scheme.find('/').map(|at| &after_scheme[at..])
    }
}

/// How long an idle upstream connection is kept when the provider's
/// `keepalive_timeout` is not set.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(90);

/// `[proxy]` limits against hostile or broken clients.
#[derive(Debug)]
pub struct ProxyLimits {
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open proxy connections at most; more are answered 503 and closed
    /// (`serve` lowers it to what the open files limit can hold).
    pub max_connections: usize,
    /// Whether `max_connections` came from the file (not the default): a
    /// limit the operator chose is worth a warning when it cannot be kept.
    pub max_connections_set: bool,
    /// Largest request head (request line and headers), in bytes (431 above).
    pub max_header_size: usize,
    /// Largest request body, in bytes (413 above).
    pub max_request_body: u64,
    /// `Forwarded` / `X-Forwarded-*` from agents: refused or stripped.
    pub forwarded_headers: airlock_proxy::headers::ForwardedPolicy,
    /// Host names the `Host` header may name (lower-case); empty: any.
    pub allowed_hosts: Vec<String>,
}

/// `[audit]`.
#[derive(Debug)]
pub struct AuditConfig {
    /// Write the audit trail at all (off only for benchmarks and tests).
    pub enabled: bool,
    /// Refuse calls (503) while records cannot be written.
    pub fail_closed: bool,
    /// Where the audit key is kept when `AIRLOCK_AUDIT_KEY` is not set.
    pub key_file: PathBuf,
    /// Whether `key_file` was set in the config (not defaulted).
    pub key_file_explicit: bool,
    /// A commit slower than this counts as a stuck writer.
    pub stall_timeout: Duration,
}

/// `[providers.NAME]`.
#[derive(Debug)]
pub struct ProviderConfig {
    pub upstream: String,
    pub auth: AuthStyle,
    /// How the credential is written for header styles (`token {key}`).
    pub auth_format: Option<String>,
    /// Static headers sent on every call.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Extra trusted CA certificates (PEM) for an https upstream.
    pub ca_file: Option<PathBuf>,
    /// How long an idle connection to the upstream is kept for reuse.
    pub keepalive_timeout: Duration,
    pub credential: CredentialSource,
    pub env_key: String,
    pub env_base_url: String,
    pub base_path: String,
}

/// Where a provider's real credential comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// `env:VAR`: read once at start.
    Env(String),
    /// `file:PATH`: re-read whenever the file changes.
    File(PathBuf),
    /// `store`: sealed in the store, set with `airlock credential set`.
    Store,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    sessions: RawSessions,
    providers: Option<BTreeMap<String, toml::Spanned<RawProvider>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    #[serde(default = "default_proxy_listen")]
    listen: String,
    public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default = "default_upstream_timeout")]
    upstream_timeout: String,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: String,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: String,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default = "default_max_header_size")]
    max_header_size: String,
    #[serde(default = "default_max_request_body")]
    max_request_body: String,
    #[serde(default = "default_forwarded_headers")]
    forwarded_headers: String,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    workers: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_url")]
    url: String,
    /// Unset: [`DEFAULT_MAX_STALENESS`].
    max_staleness: Option<String>,
    master_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_true")]
    fail_closed: bool,
    key_file: Option<PathBuf>,
    #[serde(default = "default_stall_timeout")]
    stall_timeout: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    #[serde(default = "default_max_ttl")]
    max_ttl: String,
    max_calls_in_flight: Option<u32>,
}

/// `sessions.max_calls_in_flight` when the file does not set it (`serve`
/// lowers it to a quarter of the connections it can hold).
pub const DEFAULT_MAX_CALLS_IN_FLIGHT: u32 = 512;

/// `[providers.NAME]` as written. The fields a built-in provider may leave
/// out are options: [`resolve_provider`] fills them from [`builtin`] (or
/// refuses a custom provider that leaves them out).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    upstream: Option<String>,
    auth: Option<String>,
    credential: Option<String>,
    env_key: Option<String>,
    env_base_url: Option<String>,
    base_path: Option<String>,
    auth_format: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    ca_file: Option<PathBuf>,
    keepalive_timeout: Option<String>,
}

/// A built-in provider's settings (SPEC §2): what a `[providers.openai]` or
/// `[providers.anthropic]` table takes for the fields it leaves out, and
/// what airlock serves with no `[providers]` at all.
struct Builtin {
    upstream: &'static str,
    auth: &'static str,
    credential: &'static str,
    env_key: &'static str,
    env_base_url: &'static str,
    base_path: &'static str,
}

/// The built-in providers' names, in order.
pub const BUILTIN_PROVIDERS: [&str; 2] = ["anthropic", "openai"];

/// The built-in provider `name`, if it is one.
fn builtin(name: &str) -> Option<Builtin> {
    match name {
        "openai" => Some(Builtin {
            upstream: "https://api.openai.com",
            auth: "bearer",
            credential: "env:OPENAI_API_KEY",
            env_key: "OPENAI_API_KEY",
            env_base_url: "OPENAI_BASE_URL",
            base_path: "/v1",
        }),
        "anthropic" => Some(Builtin {
            upstream: "https://api.anthropic.com",
            auth: "header:x-api-key",
            credential: "env:ANTHROPIC_API_KEY",
            env_key: "ANTHROPIC_API_KEY",
            env_base_url: "ANTHROPIC_BASE_URL",
            base_path: "",
        }),
        _ => None,
    }
}

/// A provider's table with every field it must have: those left out of a
/// built-in provider's table take its defaults; a custom provider must
/// name `upstream`, `credential`, `env_key` and `env_base_url` (`auth`
/// defaults to `bearer`, `base_path` to none). A built-in provider's table
/// that names `env_key`, as every table had to before built-in defaults
/// filled tables, keeps those two generic defaults too: a config written
/// then means what it meant (an `[providers.openai]` without `base_path`
/// in front of a gateway serving at its root stays at the root).
/// `Err((field, reason))`.
struct ResolvedProvider {
    upstream: String,
    auth: String,
    credential: String,
    env_key: String,
    env_base_url: String,
    base_path: String,
}

/// A built-in provider's table that sets `env_key` keeps the generic
/// `auth` and `base_path` defaults (see [`ResolvedProvider`]); where it
/// leaves one out and the built-in's differs, that is said, since a table
/// written today likely meant the built-in's.
fn legacy_defaults_note(name: &str, p: &RawProvider) -> Option<String> {
    let builtin = builtin(name)?;
    p.env_key.as_ref()?;
    let mut kept = Vec::new();
    if p.auth.is_none() && builtin.auth != "bearer" {
        kept.push(format!(
            "auth = \"bearer\" (the built-in's is \"{}\")",
            builtin.auth
        ));
    }
    if p.base_path.is_none() && !builtin.base_path.is_empty() {
        kept.push(format!(
            "base_path = \"\" (the built-in's is \"{}\")",
            builtin.base_path
        ));
    }
    (!kept.is_empty()).then(|| {
        format!(
            "providers.{name}: sets env_key, so it keeps the defaults of a custom provider: {}; \
             set them to say which you mean",
            kept.join(", ")
        )
    })
}

fn resolve_provider(
    name: &str,
    p: &RawProvider,
) -> Result<ResolvedProvider, (&'static str, String)> {
    let defaults = builtin(name);
    let field = |value: &Option<String>,
                 field: &'static str,
                 default: fn(&Builtin) -> &'static str,
                 example: &str| {
        match (value, &defaults) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some(builtin)) => Ok(default(builtin).to_owned()),
            (None, None) => Err((
                field,
                format!(
                    "missing: a provider other than the built-in {} must set {field} ({example})",
                    BUILTIN_PROVIDERS.join(" and ")
                ),
            )),
        }
    };
    let upper = name.to_ascii_uppercase().replace('-', "_");
    // `auth` and `base_path` had generic defaults for every table before
    // built-in ones existed (see above).
    let settings = defaults.as_ref().filter(|_| p.env_key.is_none());
    Ok(ResolvedProvider {
        upstream: field(
            &p.upstream,
            "upstream",
            |b| b.upstream,
            "the provider's URL, e.g. \"https://api.example.com\"",
        )?,
        credential: field(
            &p.credential,
            "credential",
            |b| b.credential,
            &format!("where the real key comes from, e.g. \"env:{upper}_API_KEY\""),
        )?,
        env_key: field(
            &p.env_key,
            "env_key",
            |b| b.env_key,
            &format!("the variable agents read their session token from, e.g. \"{upper}_API_KEY\""),
        )?,
        env_base_url: field(
            &p.env_base_url,
            "env_base_url",
            |b| b.env_base_url,
            &format!("the variable agents read airlock's base URL from, e.g. \"{upper}_BASE_URL\""),
        )?,
        auth: p
            .auth
            .clone()
            .unwrap_or_else(|| settings.map_or("bearer", |b| b.auth).to_owned()),
        base_path: p
            .base_path
            .clone()
            .unwrap_or_else(|| settings.map_or("", |b| b.base_path).to_owned()),
    })
}

fn default_stall_timeout() -> String {
    "2s".into()
}
fn default_proxy_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:8081".into()
}
fn default_store_url() -> String {
    "sqlite://airlock.db".into()
}
/// `store.max_staleness` when unset.
const DEFAULT_MAX_STALENESS: &str = "5s";
/// The official OpenAI and Anthropic SDKs wait 10 minutes for an answer:
/// a call they would still wait for is not cut here (and then retried by
/// them, the provider doing the work again).
fn default_upstream_timeout() -> String {
    "600s".into()
}
fn default_connect_timeout() -> String {
    "10s".into()
}
fn default_header_read_timeout() -> String {
    "30s".into()
}
fn default_drain_timeout() -> String {
    "30s".into()
}
fn default_idle_timeout() -> String {
    "60s".into()
}
/// `proxy.max_connections` when the file does not set it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
fn default_max_header_size() -> String {
    "64KiB".into()
}
fn default_max_request_body() -> String {
    "2GiB".into()
}
fn default_forwarded_headers() -> String {
    "refuse".into()
}
fn default_max_ttl() -> String {
    "24h".into()
}
fn default_true() -> bool {
    true
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listen: default_proxy_listen(),
            public_url: None,
            tls_cert: None,
            tls_key: None,
            upstream_timeout: default_upstream_timeout(),
            connect_timeout: default_connect_timeout(),
            header_read_timeout: default_header_read_timeout(),
            drain_timeout: default_drain_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: None,
            max_header_size: default_max_header_size(),
            max_request_body: default_max_request_body(),
            forwarded_headers: default_forwarded_headers(),
            allowed_hosts: Vec::new(),
            workers: None,
        }
    }
}
impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}
impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            max_staleness: None,
            master_key_file: None,
        }
    }
}
impl Default for RawAudit {
    fn default() -> Self {
        Self {
            enabled: true,
            fail_closed: true,
            key_file: None,
            stall_timeout: default_stall_timeout(),
        }
    }
}
impl Default for RawSessions {
    fn default() -> Self {
        Self {
            max_ttl: default_max_ttl(),
            max_calls_in_flight: None,
        }
    }
}

/// The built-in providers used when the config names none.
fn builtin_providers() -> BTreeMap<String, toml::Spanned<RawProvider>> {
    BUILTIN_PROVIDERS
        .iter()
        .map(|name| {
            (
                (*name).to_owned(),
                toml::Spanned::new(0..0, RawProvider::default()),
            )
        })
        .collect()
}

// === impl Config ===

impl Config {
    /// What in the config may keep agents from reaching the proxy, though
    /// it is valid (`serve` logs these at start, `config check` shows them).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.notes.clone();
        if let Some(url) = &self.proxy.public_url {
            if let Err(reason) = public_url_warning(
                url,
                self.proxy.tls.is_some(),
                &self.proxy.limits.allowed_hosts,
            ) {
                warnings.push(format!("proxy.public_url: {reason}"));
            }
        }
        warnings
    }

    /// Loads `tls_cert` / `tls_key` once to prove they make a server
    /// certificate (for `serve` and `config check`; a bad pair is a config
    /// error, exit 64).
    pub fn check_tls(&self) -> Result<(), ConfigError> {
        let Some(files) = &self.proxy.tls else {
            return Ok(());
        };
        airlock_proxy::tls::load_server_config(files).map_err(|e| ConfigError {
            file: self.source.clone(),
            key: e.config_key().to_owned(),
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// Loads `path`, or `./airlock.toml` when it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        };
        let Some(path) = path else {
            return Self::from_raw("<built-in defaults>", "", RawConfig::default());
        };
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// Parses config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let fail = |e: toml::de::Error, path: String| {
            let line = e
                .span()
                .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1));
            // The key where the error is (`providers.x` for a missing field),
            // and the line; either alone when the other is unknown.
            let key = match (path.as_str(), line) {
                ("" | ".", Some(line)) => line,
                ("" | ".", None) => "(document)".into(),
                (path, Some(line)) => format!("{path} ({line})"),
                (path, None) => path.to_owned(),
            };
            let reason = e
                .span()
                .filter(|_| e.message().starts_with("duplicate key"))
                .and_then(|span| duplicate_key_reason(text, span))
                // A value quoted in the message may be the store's URL.
                .unwrap_or_else(|| airlock_store::urls_for_display(e.message()).into_owned());
            ConfigError {
                file: file.to_owned(),
                key,
                reason,
            }
        };
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|e| fail(e, String::new()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // A table read with its span (`toml::Spanned`) shows up in the
            // path under the field name toml gives it inside.
            let path = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            fail(e.into_inner(), path)
        })?;
        Self::from_raw(file, text, raw)
    }

    /// Validates `raw`, parsed from `text` (which locates errors by line).
    fn from_raw(file: &str, text: &str, raw: RawConfig) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let addr = |key: &str, value: &str| {
            value.parse::<SocketAddr>().map_err(|_| {
                err(
                    key,
                    format!(
                        "{value:?}: must be an IP address and port such as 127.0.0.1:8080 \
                             (or [::1]:8080, 0.0.0.0:8080 for every interface); host names are \
                             not resolved"
                    ),
                )
            })
        };
        let dur =
            |key: &str, value: &str| duration::parse(value).map_err(|e| err(key, e.to_string()));
        // A timeout of 0 would fail every call (or close every connection)
        // at once.
        let timeout = |key: &str, value: &str| {
            let parsed = dur(key, value)?;
            if parsed.is_zero() {
                return Err(err(key, "must be at least 1ms".into()));
            }
            Ok(parsed)
        };
        let tls = match (raw.proxy.tls_cert.clone(), raw.proxy.tls_key.clone()) {
            (None, None) => None,
            // The files are loaded by `check_tls` (serve and config check
            // only): other commands need not be able to read the key.
            (Some(cert), Some(key)) => Some(airlock_proxy::tls::TlsFiles { cert, key }),
            (Some(_), None) => {
                return Err(err(
                    "proxy.tls_key",
                    "missing: tls_cert needs tls_key".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "proxy.tls_cert",
                    "missing: tls_key needs tls_cert".into(),
                ))
            }
        };
        let limits = parse_limits(file, &raw.proxy)?;
        let public_url = raw
            .proxy
            .public_url
            .map(|u| check_public_url(&u).map_err(|reason| err("proxy.public_url", reason)))
            .transpose()?;
        let proxy_listen = addr("proxy.listen", &raw.proxy.listen)?;
        let admin_listen = addr("admin.listen", &raw.admin.listen)?;
        let overlap = proxy_listen.port() != 0
            && proxy_listen.port() == admin_listen.port()
            && (proxy_listen.ip() == admin_listen.ip()
                || proxy_listen.ip().is_unspecified()
                || admin_listen.ip().is_unspecified());
        if overlap {
            return Err(err(
                "admin.listen",
                format!("{admin_listen} overlaps proxy.listen ({proxy_listen}): use another port"),
            ));
        }
        let proxy = ProxyConfig {
            listen: proxy_listen,
            public_url,
            upstream_timeout: timeout("proxy.upstream_timeout", &raw.proxy.upstream_timeout)?,
            connect_timeout: timeout("proxy.connect_timeout", &raw.proxy.connect_timeout)?,
            header_read_timeout: timeout(
                "proxy.header_read_timeout",
                &raw.proxy.header_read_timeout,
            )?,
            drain_timeout: dur("proxy.drain_timeout", &raw.proxy.drain_timeout)?,
            workers: match raw.proxy.workers {
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
                Some(n @ 1..=MAX_WORKERS) => n,
                Some(n) => {
                    return Err(err(
                        "proxy.workers",
                        format!("{n}: must be between 1 and {MAX_WORKERS}"),
                    ))
                }
            },
            tls,
            limits,
        };
        let store_url = raw.store.url;
        let stall_timeout = dur("audit.stall_timeout", &raw.audit.stall_timeout)?;
        if stall_timeout.is_zero() {
            return Err(err("audit.stall_timeout", "must be at least 1ms".into()));
        }
        let audit = AuditConfig {
            enabled: raw.audit.enabled,
            fail_closed: raw.audit.fail_closed,
            key_file_explicit: raw.audit.key_file.is_some(),
            key_file: raw
                .audit
                .key_file
                .unwrap_or_else(|| key_file_next_to_store(&store_url, "audit-key")),
            stall_timeout,
        };
        if !store_url.starts_with("sqlite:") && !airlock_store::is_postgres_url(&store_url) {
            return Err(err(
                "store.url",
                format!(
                    "{:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE",
                    airlock_store::url_for_display(&store_url)
                ),
            ));
        }
        let store_max_staleness = dur(
            "store.max_staleness",
            raw.store
                .max_staleness
                .as_deref()
                .unwrap_or(DEFAULT_MAX_STALENESS),
        )?;
        if store_max_staleness < Duration::from_millis(100) {
            return Err(err("store.max_staleness", "must be at least 100ms".into()));
        }
        let max_ttl = dur("sessions.max_ttl", &raw.sessions.max_ttl)?;
        if max_ttl.is_zero() {
            return Err(err("sessions.max_ttl", "must be at least 1s".into()));
        }
        let max_calls_in_flight_set = raw.sessions.max_calls_in_flight.is_some();
        let max_calls_in_flight = raw
            .sessions
            .max_calls_in_flight
            .unwrap_or(DEFAULT_MAX_CALLS_IN_FLIGHT);
        if !(1..=1_000_000).contains(&max_calls_in_flight) {
            return Err(err(
                "sessions.max_calls_in_flight",
                format!("must be between 1 and 1000000, not {max_calls_in_flight}"),
            ));
        }

        let mut providers = BTreeMap::new();
        let mut notes = Vec::new();
        if raw.store.max_staleness.is_some() && !airlock_store::is_postgres_url(&store_url) {
            notes.push(
                "store.max_staleness applies to a PostgreSQL store shared by replicas; a SQLite \
                 store is this process's own and never stale, so it is ignored"
                    .to_owned(),
            );
        }
        // Variable name -> the key that set it: a session's `env` holds one
        // value per name. Two providers may share an `env_key` (both get the
        // session's one token), never an `env_base_url` or a name used as
        // both.
        let mut env_names: BTreeMap<String, String> = BTreeMap::new();
        for (name, spanned) in raw.providers.unwrap_or_else(builtin_providers) {
            let key = |field: &str| format!("providers.{name}.{field}");
            rule::validate_provider(&name)
                .map_err(|e| err(&format!("providers.{name}"), e.to_string()))?;
            let line = text
                .get(..spanned.span().start)
                .map_or(1, |before| before.matches('\n').count() + 1);
            if let Some(note) = legacy_defaults_note(&name, spanned.get_ref()) {
                notes.push(note);
            }
            let fields =
                resolve_provider(&name, spanned.get_ref()).map_err(|(field, reason)| {
                    err(&format!("providers.{name}.{field} (line {line})"), reason)
                })?;
            let p = spanned.into_inner();
            let auth: AuthStyle = fields
                .auth
                .parse()
                .map_err(|e: airlock_proxy::ProviderError| err(&key("auth"), e.to_string()))?;
            if let AuthStyle::Header(header) = &auth {
                if is_reserved_header(header) {
                    return Err(err(
                        &key("auth"),
                        format!("{:?}: airlock sets this header itself", fields.auth),
                    ));
                }
            }
            let credential = parse_credential_source(&fields.credential)
                .map_err(|reason| err(&key("credential"), reason))?;
            airlock_proxy::CredentialFormat::new(auth.clone(), p.auth_format.as_deref())
                .map_err(|e| err(&key("auth_format"), e.to_string()))?;
            let headers = parse_static_headers(&p.headers, &auth)
                .map_err(|(name, reason)| err(&key(&format!("headers.{name}")), reason))?;
            if !fields.base_path.is_empty()
                && airlock_core::path::validate(&fields.base_path).is_err()
            {
                return Err(err(
                    &key("base_path"),
                    format!("{:?} must be empty or an absolute path", fields.base_path),
                ));
            }
            for (field, value) in [
                ("env_key", &fields.env_key),
                ("env_base_url", &fields.env_base_url),
            ] {
                let ok = !value.is_empty()
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    && !value.as_bytes()[0].is_ascii_digit();
                if !ok {
                    return Err(err(
                        &key(field),
                        format!("{value:?} is not an environment variable name"),
                    ));
                }
                if let Some(why) = reserved_env_name(value) {
                    return Err(err(
                        &key(field),
                        format!("{value} {why}: `airlock exec` would set it to a session value"),
                    ));
                }
                let first = env_names.insert(value.clone(), key(field));
                let shared_key =
                    field == "env_key" && first.as_deref().is_some_and(|f| f.ends_with(".env_key"));
                if let Some(first) = first.filter(|_| !shared_key) {
                    return Err(err(
                        &key(field),
                        format!("{value} is already {first}: each variable names one thing"),
                    ));
                }
            }
            check_upstream(&fields.upstream).map_err(|reason| err(&key("upstream"), reason))?;
            let keepalive_timeout = match &p.keepalive_timeout {
                Some(value) => dur(&key("keepalive_timeout"), value)?,
                None => DEFAULT_KEEPALIVE_TIMEOUT,
            };
            if keepalive_timeout < Duration::from_secs(1) {
                return Err(err(&key("keepalive_timeout"), "must be at least 1s".into()));
            }
            providers.insert(
                name,
                ProviderConfig {
                    upstream: fields.upstream,
                    auth,
                    auth_format: p.auth_format,
                    headers,
                    ca_file: p.ca_file,
                    keepalive_timeout,
                    credential,
                    env_key: fields.env_key,
                    env_base_url: fields.env_base_url,
                    base_path: fields.base_path.trim_end_matches('/').to_owned(),
                },
            );
        }

        if let Some(path) = proxy.public_path() {
            // Calls carry it: the rules of a call's path hold for it too.
            airlock_core::path::validate(path).map_err(|e| {
                err(
                    "proxy.public_url",
                    format!("its path {path:?} is not one airlock accepts in a call: {e}"),
                )
            })?;
        }
        if let Some(first) = proxy.public_path().and_then(|p| p[1..].split('/').next()) {
            if providers.contains_key(first) {
                return Err(err(
                    "proxy.public_url",
                    format!(
                        "its path starts with /{first}, a provider's name: a call to \
                         /{first}/... could be either"
                    ),
                ));
            }
        }
        Ok(Self {
            source: file.to_owned(),
            proxy,
            admin_listen,
            master_key_file_explicit: raw.store.master_key_file.is_some(),
            master_key_file: raw
                .store
                .master_key_file
                .unwrap_or_else(|| key_file_next_to_store(&store_url, "master-key")),
            store_url,
            store_max_staleness,
            audit,
            max_ttl,
            max_calls_in_flight,
            max_calls_in_flight_set,
            providers,
            notes,
        })
    }
}

/// What toml's bare "duplicate key" means at `span` (the repeated key's
/// name): a table header given twice, or a key set twice in one table.
fn duplicate_key_reason(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let name = text.get(span.clone())?;
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[span.start..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    let line = text.get(line_start..line_end)?.trim();
    if line.starts_with('[') {
        let header = line
            .split(']')
            .next()
            .unwrap_or(line)
            .trim_start_matches('[');
        let header = header.trim_start_matches('[').trim();
        Some(format!(
            "table [{header}] is defined twice: a table may appear once, so merge the two \
             into one"
        ))
    } else {
        Some(format!(
            "key `{name}` is set twice in the same table (or names a table defined \
             elsewhere): keep one"
        ))
    }
}

/// The `[proxy]` limits, validated.
fn parse_limits(file: &str, raw: &RawProxy) -> Result<ProxyLimits, ConfigError> {
    let err = |key: &str, reason: String| ConfigError {
        file: file.to_owned(),
        key: format!("proxy.{key}"),
        reason,
    };
    let idle_timeout =
        duration::parse(&raw.idle_timeout).map_err(|e| err("idle_timeout", e.to_string()))?;
    if idle_timeout.is_zero() {
        return Err(err("idle_timeout", "must be at least 1ms".into()));
    }
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=1_000_000).contains(&max_connections) {
        return Err(err(
            "max_connections",
            "must be between 1 and 1000000".into(),
        ));
    }
    let max_header_size =
        parse_byte_size(&raw.max_header_size).map_err(|reason| err("max_header_size", reason))?;
    if !(8 * 1024..=16 * 1024 * 1024).contains(&max_header_size) {
        return Err(err(
            "max_header_size",
            "must be between 8KiB and 16MiB".into(),
        ));
    }
    let max_request_body =
        parse_byte_size(&raw.max_request_body).map_err(|reason| err("max_request_body", reason))?;
    let forwarded_headers = raw
        .forwarded_headers
        .parse()
        .map_err(|reason| err("forwarded_headers", reason))?;
    let mut allowed_hosts = Vec::with_capacity(raw.allowed_hosts.len());
    for host in &raw.allowed_hosts {
        let ok = host
            .parse::<http::uri::Authority>()
            .is_ok_and(|a| a.as_str() == host.as_str() && !host.contains('@'));
        if !ok {
            return Err(err(
                "allowed_hosts",
                format!("{host:?} is not a host or host:port"),
            ));
        }
        allowed_hosts.push(host.to_ascii_lowercase());
    }
    Ok(ProxyLimits {
        idle_timeout,
        max_connections,
        max_connections_set: raw.max_connections.is_some(),
        max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
        max_request_body,
        forwarded_headers,
        allowed_hosts,
    })
}

/// Why `name` may not be a provider's `env_key` or `env_base_url`, if it
/// may not: names the system, the shell or the dynamic loader read, and
/// airlock's own. (`airlock exec` sets these variables for its command.)
fn reserved_env_name(name: &str) -> Option<&'static str> {
    const SYSTEM: [&str; 16] = [
        "PATH",
        "HOME",
        "SHELL",
        "USER",
        "LOGNAME",
        "PWD",
        "OLDPWD",
        "TERM",
        "TMPDIR",
        "LANG",
        "IFS",
        "ENV",
        "BASH_ENV",
        "CDPATH",
        "NODE_OPTIONS",
        "PYTHONPATH",
    ];
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("AIRLOCK_") {
        Some("is reserved for airlock's own variables")
    } else if upper.starts_with("LD_") || upper.starts_with("DYLD_") {
        Some("is read by the dynamic loader")
    } else if upper.starts_with("LC_") || SYSTEM.contains(&upper.as_str()) {
        Some("is read by the system or the shell")
    } else {
        None
    }
}

/// Why agents given `public_url` might not reach this proxy, if they might
/// not: the proxy serves HTTPS but the URL is http://, or `allowed_hosts`
/// (when set) does not name the URL's host. Warnings, not errors: a front
/// proxy that re-encrypts, or that rewrites `Host` to an internal name,
/// makes either right.
fn public_url_warning(url: &str, tls: bool, allowed_hosts: &[String]) -> Result<(), String> {
    let host = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(|h| h.trim_matches(['[', ']']).to_owned()));
    if host
        .as_deref()
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "{url:?} names the wildcard address: agents cannot connect to it; name this \
             host as agents reach it"
        ));
    }
    let https = url.starts_with("https://");
    if tls && !https {
        return Err(format!(
            "{url:?} is http://, but the proxy serves HTTPS (tls_cert is set): agents given it \
             cannot connect unless something in front of airlock takes plain HTTP"
        ));
    }
    if allowed_hosts.is_empty() {
        return Ok(());
    }
    let authority = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.authority().cloned());
    let Some(authority) = authority else {
        return Ok(());
    };
    let full = authority.as_str().to_ascii_lowercase();
    let bare = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if allowed_hosts.iter().any(|h| *h == full || *h == bare) {
        return Ok(());
    }
    Err(format!(
        "{url:?} names {full}, which proxy.allowed_hosts does not list: every call agents make \
         to it is refused (400) unless a proxy in front of airlock rewrites Host"
    ))
}

/// A byte size: digits and an optional unit `B`, `KB`/`MB`/`GB`/`TB`
/// (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), e.g.
/// `"64KiB"`, `"2GiB"`, `"1048576"`.
pub fn parse_byte_size(value: &str) -> Result<u64, String> {
    let text = value.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let fail = || format!("{value:?} is not a size such as \"64KiB\", \"32MiB\" or \"1048576\"");
    let number: u64 = digits.parse().map_err(|_| fail())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(fail()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{value:?} is too large"))
}

/// A key file next to the SQLite file (`airlock.db` → `airlock.db.KIND`);
/// for other stores, `airlock.KIND` in the working directory.
fn key_file_next_to_store(store_url: &str, kind: &str) -> PathBuf {
    let file = store_url
        .strip_prefix("sqlite://")
        .or_else(|| store_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|path| !path.is_empty() && !path.starts_with(':'));
    match file {
        Some(path) => PathBuf::from(format!("{path}.{kind}")),
        None => PathBuf::from(format!("airlock.{kind}")),
    }
}

fn parse_credential_source(value: &str) -> Result<CredentialSource, String> {
    if let Some(var) = value.strip_prefix("env:") {
        if var.is_empty() {
            return Err("env: needs a variable name".into());
        }
        // A key pasted after `env:` (`env:sk-proj-…`) would otherwise be
        // shown as a variable's name by `config check` and in logs.
        if !is_env_name(var) {
            return Err(
                "env: needs an environment variable name (letters, digits and _, not starting \
                 with a digit; the value is not shown: if it is the key itself, put it in that \
                 variable, not in the config)"
                    .into(),
            );
        }
        return Ok(CredentialSource::Env(var.to_owned()));
    }
    if let Some(path) = value.strip_prefix("file:") {
        if path.is_empty() {
            return Err("file: needs a path".into());
        }
        return Ok(CredentialSource::File(PathBuf::from(path)));
    }
    if value == "store" {
        return Ok(CredentialSource::Store);
    }
    // The value itself is never repeated: what is written here by mistake
    // is often the key, and this message goes to terminals and logs.
    let scheme = value
        .split_once(':')
        .map(|(scheme, _)| scheme)
        .filter(|s| !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_alphabetic()));
    let what = match scheme {
        Some(scheme) => format!("\"{scheme}:\" is not a credential source"),
        None => "the value is not a credential source".to_owned(),
    };
    Err(format!(
        "{what}: use env:VAR, file:PATH or store (the value is not shown; if it is the key \
         itself, put it in an environment variable, a file or the store, not in the config)"
    ))
}

/// Whether `name` is a portable environment variable name (POSIX: letters,
/// digits and `_`, not starting with a digit).
fn is_env_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Headers airlock itself decides: a provider's static headers may not set them.
const RESERVED_HEADERS: [&str; 15] = [
    "authorization",
    // airlock asks for unencoded answers: its leak guard reads them.
    "accept-encoding",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
    "expect",
    "forwarded",
    "cookie",
];

/// `[proxy] public_url` without its trailing `/`: `http(s)://host[:port][/path]`.
/// Agents' base URLs are built by appending `/PROVIDER/...` to it, so a
/// query string or fragment would end up in the middle of them; a user or
/// password would be handed to every agent (and is not said back here).
fn check_public_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim_end_matches('/');
    check_http_url(
        trimmed,
        url,
        "it is handed to every agent in its base URL",
        "agents' base URLs are built by appending /PROVIDER/... to it",
    )?;
    Ok(trimmed.to_owned())
}

/// An upstream URL airlock can call: `http(s)://host[:port][/path]`,
/// without a user, password, query or fragment.
fn check_upstream(upstream: &str) -> Result<(), String> {
    check_http_url(
        upstream,
        upstream,
        "the provider's key goes in `credential`",
        "calls' paths are appended to it",
    )
}

/// Checks that `url` is `http(s)://host[:port][/path]` with no user or
/// password (`no_user`: why), query string or fragment (`appended`: why);
/// errors quote `shown`, the URL as configured.
fn check_http_url(url: &str, shown: &str, no_user: &str, appended: &str) -> Result<(), String> {
    let uri = url
        .parse::<http::Uri>()
        .ok()
        .filter(|u| {
            (url.starts_with("http://") || url.starts_with("https://")) && u.host().is_some()
        })
        .ok_or_else(|| format!("{shown:?} is not an http(s) URL"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("must not hold a user or password: {no_user}"));
    }
    // Checked in the text: `http::Uri` drops a fragment, and an empty query.
    if url.contains('?') {
        return Err(format!(
            "{shown:?} must not have a query string: {appended}"
        ));
    }
    if url.contains('#') {
        return Err(format!(
            "{shown:?} must not have a fragment (#...): {appended}"
        ));
    }
    Ok(())
}

/// Whether airlock sets (or refuses) header `name` itself, so that no
/// configuration may: static headers, and the header an `auth` style names.
fn is_reserved_header(name: &HeaderName) -> bool {
    RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("x-forwarded-")
}

fn parse_static_headers(
    raw: &BTreeMap<String, String>,
    auth: &AuthStyle,
) -> Result<Vec<(HeaderName, HeaderValue)>, (String, String)> {
    raw.iter()
        .map(|(name, value)| {
            let fail = |reason: &str| (name.clone(), reason.to_owned());
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fail("not a valid header name"))?;
            let reserved =
                is_reserved_header(&header) || matches!(auth, AuthStyle::Header(h) if *h == header);
            if reserved {
                return Err(fail("airlock sets this header itself"));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| fail("not a valid header value (visible ASCII only)"))?;
            Ok((header, value))
        })
        .collect()
}

// === impl CredentialSource ===

impl CredentialSource {
    /// Reads an `env:` credential now (`Ok(None)` when the variable is
    /// unset). `file:` and `store` are loaded by their watchers instead.
    pub fn read(&self) -> Result<Option<Secret>, String> {
        match self {
            Self::Store => Ok(None),
            Self::Env(var) => Ok(std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Secret::new)),
            Self::File(path) => std::fs::read_to_string(path)
                .map(|s| Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_owned())))
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests;
