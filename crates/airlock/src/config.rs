//! `airlock.toml`: parsed into typed settings before any port is bound.
//! A bad config is refused whole, naming the file, the key and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_core::{duration, rule, Secret};
use airlock_proxy::AuthStyle;
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
    pub max_ttl: Duration,
    pub providers: BTreeMap<String, ProviderConfig>,
}

/// `[proxy]`.
#[derive(Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
}

/// `[providers.NAME]`.
#[derive(Debug)]
pub struct ProviderConfig {
    pub upstream: String,
    pub auth: AuthStyle,
    pub credential: CredentialSource,
    pub env_key: String,
    pub env_base_url: String,
    pub base_path: String,
}

/// Where a provider's real credential comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    Env(String),
    File(PathBuf),
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
    providers: Option<BTreeMap<String, RawProvider>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "default_true")]
    fail_closed: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    #[serde(default = "default_max_ttl")]
    max_ttl: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    upstream: String,
    #[serde(default = "default_auth")]
    auth: String,
    credential: String,
    env_key: String,
    env_base_url: String,
    #[serde(default)]
    base_path: String,
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
fn default_upstream_timeout() -> String {
    "300s".into()
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
fn default_max_ttl() -> String {
    "24h".into()
}
fn default_auth() -> String {
    "bearer".into()
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
        }
    }
}
impl Default for RawAudit {
    fn default() -> Self {
        Self { fail_closed: true }
    }
}
impl Default for RawSessions {
    fn default() -> Self {
        Self {
            max_ttl: default_max_ttl(),
        }
    }
}

/// The built-in providers used when the config names none.
fn builtin_providers() -> BTreeMap<String, RawProvider> {
    BTreeMap::from([
        (
            "openai".to_owned(),
            RawProvider {
                upstream: "https://api.openai.com".into(),
                auth: "bearer".into(),
                credential: "env:OPENAI_API_KEY".into(),
                env_key: "OPENAI_API_KEY".into(),
                env_base_url: "OPENAI_BASE_URL".into(),
                base_path: "/v1".into(),
            },
        ),
        (
            "anthropic".to_owned(),
            RawProvider {
                upstream: "https://api.anthropic.com".into(),
                auth: "header:x-api-key".into(),
                credential: "env:ANTHROPIC_API_KEY".into(),
                env_key: "ANTHROPIC_API_KEY".into(),
                env_base_url: "ANTHROPIC_BASE_URL".into(),
                base_path: String::new(),
            },
        ),
    ])
}

// === impl Config ===

impl Config {
    /// Loads `path`, or `./airlock.toml` when it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        };
        let Some(path) = path else {
            return Self::from_raw("<built-in defaults>", RawConfig::default());
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            key: e
                .span()
                .map(|s| format!("line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_else(|| "(document)".into()),
            reason: e.message().to_owned(),
        })?;
        Self::from_raw(file, raw)
    }

    fn from_raw(file: &str, raw: RawConfig) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let addr = |key: &str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|e| err(key, format!("{value:?} is not HOST:PORT ({e})")))
        };
        let dur =
            |key: &str, value: &str| duration::parse(value).map_err(|e| err(key, e.to_string()));
        if raw.proxy.tls_cert.is_some() || raw.proxy.tls_key.is_some() {
            return Err(err(
                "proxy.tls_cert",
                "TLS on the proxy listener is not supported by this version".into(),
            ));
        }
        let public_url = raw
            .proxy
            .public_url
            .map(|u| {
                let trimmed = u.trim_end_matches('/').to_owned();
                let ok = (trimmed.starts_with("http://") || trimmed.starts_with("https://"))
                    && trimmed.parse::<http::Uri>().is_ok();
                ok.then_some(trimmed)
                    .ok_or_else(|| err("proxy.public_url", format!("{u:?} is not an http(s) URL")))
            })
            .transpose()?;
        let proxy = ProxyConfig {
            listen: addr("proxy.listen", &raw.proxy.listen)?,
            public_url,
            upstream_timeout: dur("proxy.upstream_timeout", &raw.proxy.upstream_timeout)?,
            connect_timeout: dur("proxy.connect_timeout", &raw.proxy.connect_timeout)?,
            header_read_timeout: dur("proxy.header_read_timeout", &raw.proxy.header_read_timeout)?,
            drain_timeout: dur("proxy.drain_timeout", &raw.proxy.drain_timeout)?,
        };
        // `[audit]` is accepted for forward compatibility; the audit trail
        // itself is not part of this version.
        let _ = raw.audit.fail_closed;
        let store_url = raw.store.url;
        if !store_url.starts_with("sqlite:") {
            return Err(err(
                "store.url",
                format!("{store_url:?}: only sqlite://PATH is supported by this version"),
            ));
        }
        let max_ttl = dur("sessions.max_ttl", &raw.sessions.max_ttl)?;
        if max_ttl.is_zero() {
            return Err(err("sessions.max_ttl", "must be at least 1s".into()));
        }

        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers.unwrap_or_else(builtin_providers) {
            let key = |field: &str| format!("providers.{name}.{field}");
            rule::validate_provider(&name)
                .map_err(|e| err(&format!("providers.{name}"), e.to_string()))?;
            let auth: AuthStyle = p
                .auth
                .parse()
                .map_err(|e: airlock_proxy::ProviderError| err(&key("auth"), e.to_string()))?;
            let credential = parse_credential_source(&p.credential)
                .map_err(|reason| err(&key("credential"), reason))?;
            if !p.base_path.is_empty() && airlock_core::path::validate(&p.base_path).is_err() {
                return Err(err(
                    &key("base_path"),
                    format!("{:?} must be empty or an absolute path", p.base_path),
                ));
            }
            for (field, value) in [("env_key", &p.env_key), ("env_base_url", &p.env_base_url)] {
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
            }
            let upstream_ok = (p.upstream.starts_with("http://")
                || p.upstream.starts_with("https://"))
                && p.upstream
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.host().is_some() && u.query().is_none());
            if !upstream_ok {
                return Err(err(
                    &key("upstream"),
                    format!("{:?} is not an http(s) URL", p.upstream),
                ));
            }
            providers.insert(
                name,
                ProviderConfig {
                    upstream: p.upstream,
                    auth,
                    credential,
                    env_key: p.env_key,
                    env_base_url: p.env_base_url,
                    base_path: p.base_path.trim_end_matches('/').to_owned(),
                },
            );
        }

        Ok(Self {
            source: file.to_owned(),
            proxy,
            admin_listen: addr("admin.listen", &raw.admin.listen)?,
            store_url,
            max_ttl,
            providers,
        })
    }
}

fn parse_credential_source(value: &str) -> Result<CredentialSource, String> {
    if let Some(var) = value.strip_prefix("env:") {
        if var.is_empty() {
            return Err("env: needs a variable name".into());
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
        return Err(
            "credential = \"store\" is not supported by this version; use env:VAR or file:PATH"
                .into(),
        );
    }
    Err(format!("{value:?} must be env:VAR or file:PATH"))
}

// === impl CredentialSource ===

impl CredentialSource {
    /// Reads the credential now. `Ok(None)` when the variable is unset.
    pub fn read(&self) -> Result<Option<Secret>, String> {
        match self {
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
