//! `airlock config check`: validates the config (loading it is the
//! validation; a bad one never gets here) and describes what `airlock serve`
//! would run. It never prints a credential, only where it comes from and
//! whether it is available now.

use std::fmt::Write as _;
use std::process::ExitCode;

use airlock_core::duration;
use airlock_core::seal::KeyOrigin;
use airlock_proxy::credential_source::{read_credential_file, CredentialFileError};
use airlock_proxy::provider::check_ca_file;
use airlock_proxy::ProviderError;

use crate::config::{Config, CredentialSource, DEFAULT_KEEPALIVE_TIMEOUT};

/// What `config check` found: the description to print, and the problems
/// that would stop `airlock serve` from starting, each as `KEY: reason`.
#[derive(Debug, Default)]
pub struct Description {
    /// Human-readable summary, one setting per line.
    pub text: String,
    /// Problems that `serve` would refuse to start with.
    pub problems: Vec<String>,
}

/// Prints the description; exit 1 (with each problem on stderr) when serve
/// would refuse to start, whether or not stdout is still read.
pub fn run(config: &Config) -> ExitCode {
    let description = describe(config);
    if let Err(e) = crate::output::print_verdict(&description.text) {
        crate::output::error_line(format_args!("{e}"));
        return ExitCode::FAILURE;
    }
    if description.problems.is_empty() {
        return ExitCode::SUCCESS;
    }
    for problem in &description.problems {
        crate::output::error_line(format_args!("{problem}"));
    }
    ExitCode::FAILURE
}

/// A size the way the config takes it: `2GiB`, `64KiB`, or bytes.
fn bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    const GIB: u64 = KIB * KIB * KIB;
    match n {
        n if n >= GIB && n % GIB == 0 => format!("{}GiB", n / GIB),
        n if n >= KIB * KIB && n % (KIB * KIB) == 0 => format!("{}MiB", n / (KIB * KIB)),
        n if n >= KIB && n % KIB == 0 => format!("{}KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

/// Describes `config` without revealing any credential.
pub fn describe(config: &Config) -> Description {
    describe_with(config, crate::commands::serve::admin_token_from_env())
}

/// [`describe`], with `admin_token` as `AIRLOCK_ADMIN_TOKEN` gives it.
fn describe_with(config: &Config, admin_token: anyhow::Result<Option<String>>) -> Description {
    let mut d = Description::default();
    let out = &mut d.text;
    let dur = |d: std::time::Duration| duration::format(d);
    let scheme = if config.proxy.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let public_url = config.proxy.public_url.clone().unwrap_or_else(|| {
        let note = if config.proxy.listen.ip().is_unspecified() {
            " (an address no agent can reach: set proxy.public_url)"
        } else if config.proxy.listen.port() == 0 {
            " (the port is chosen at start)"
        } else {
            ""
        };
        format!("{scheme}://{}{note}", config.proxy.listen)
    });
    let base_url = config
        .proxy
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", config.proxy.listen));

    let _ = writeln!(out, "config: {} (valid)", config.source);
    for warning in config.warnings() {
        let _ = writeln!(out, "warning: {warning}");
    }
    let _ = writeln!(out, "proxy:");
    line(out, "listen", &config.proxy.listen.to_string());
    line(out, "public url", &public_url);
    if let Some(tls) = &config.proxy.tls {
        line(
            out,
            "tls",
            &format!(
                "cert {}, key {} (reloaded on SIGHUP or change)",
                tls.cert.display(),
                tls.key.display()
            ),
        );
    }
    line(out, "upstream timeout", &dur(config.proxy.upstream_timeout));
    line(out, "connect timeout", &dur(config.proxy.connect_timeout));
    line(
        out,
        "header read timeout",
        &dur(config.proxy.header_read_timeout),
    );
    line(out, "drain timeout", &dur(config.proxy.drain_timeout));
    line(out, "workers", &config.proxy.workers.to_string());
    let limits = &config.proxy.limits;
    line(out, "idle timeout", &dur(limits.idle_timeout));
    line(
        out,
        "max connections",
        &format!(
            "{} (lowered at start if the open files limit cannot hold it)",
            limits.max_connections
        ),
    );
    line(
        out,
        "max header size",
        &bytes(limits.max_header_size as u64),
    );
    line(out, "max request body", &bytes(limits.max_request_body));
    line(
        out,
        "forwarded headers",
        match limits.forwarded_headers {
            airlock_proxy::headers::ForwardedPolicy::Refuse => "refuse (400)",
            airlock_proxy::headers::ForwardedPolicy::Strip => "strip",
        },
    );
    line(
        out,
        "allowed hosts",
        &if limits.allowed_hosts.is_empty() {
            "any".to_owned()
        } else {
            limits.allowed_hosts.join(", ")
        },
    );
    if let Some(path) = config.proxy.public_path() {
        line(
            out,
            "routes",
            &format!("/{{provider}}/... and {path}/{{provider}}/... (the public URL's path)"),
        );
    }

    let _ = writeln!(out, "admin:");
    line(out, "listen", &config.admin_listen.to_string());
    // Checked as `serve` checks it (round 40: a token too short for serve
    // passed here).
    let token = match admin_token {
        Ok(Some(_)) => "env:AIRLOCK_ADMIN_TOKEN (set)",
        Ok(None) => {
            "env:AIRLOCK_ADMIN_TOKEN (not set: the stored one, or a new one printed on first start)"
        }
        Err(e) => {
            d.problems.push(format!("{e:#}"));
            "env:AIRLOCK_ADMIN_TOKEN (set, refused: see below)"
        }
    };
    line(out, "token", token);

    let _ = writeln!(out, "store:");
    line(
        out,
        "url",
        &format!(
            "{}{}",
            airlock_store::url_for_display(&config.store_url),
            if airlock_store::is_postgres_url(&config.store_url)
                || airlock_store::sqlite_file(&config.store_url).is_some()
            {
                ""
            } else {
                " (in memory)"
            }
        ),
    );
    match crate::paths::sqlite_location(&config.store_url) {
        Ok(Some(file)) => {
            let state = if file.exists() {
                "exists"
            } else {
                "does not exist yet: created on first start"
            };
            line(out, "database", &format!("{} ({state})", file.display()));
        }
        Ok(None) => {}
        Err(reason) => {
            d.problems.push(format!("store.url: {reason}"));
            line(out, "database", "cannot be created (see below)");
        }
    }
    if crate::credentials::uses_master_key(config) {
        let key = key_line(
            crate::credentials::master_key_source(config),
            crate::credentials::missing_shared_master_key(config)
                .map(|problem| format!("store.master_key_file: {problem}")),
            || crate::credentials::check_master_key(config),
            &mut d.problems,
        );
        line(out, "master key", &key);
    }

    let _ = writeln!(out, "audit:");
    if config.audit.enabled {
        line(out, "enabled", "yes");
        line(
            out,
            "fail closed",
            if config.audit.fail_closed {
                "yes (calls are refused with 503 while records cannot be written)"
            } else {
                "no (calls go on while records cannot be written)"
            },
        );
        let key = key_line(
            crate::audit_key::source(&config.audit),
            crate::audit_key::missing_shared_key(&config.audit, &config.store_url)
                .map(|problem| format!("audit.key_file: {problem}")),
            || crate::audit_key::check(&config.audit, &config.store_url),
            &mut d.problems,
        );
        line(out, "key", &key);
        line(out, "stall timeout", &dur(config.audit.stall_timeout));
    } else {
        line(out, "enabled", "no (calls are not recorded)");
    }

    let _ = writeln!(out, "sessions:");
    line(out, "max ttl", &dur(config.max_ttl));
    let calls = config.max_calls_in_flight;
    let calls_note = if !config.max_calls_in_flight_set {
        " (the default; serve lowers it to a quarter of the connections it can hold, when less)"
    } else if usize::try_from(calls).is_ok_and(|c| c >= config.proxy.limits.max_connections) {
        " (not below proxy.max_connections: one session can hold every connection)"
    } else {
        ""
    };
    line(
        out,
        "max calls in flight",
        &format!("{calls} per session and process{calls_note}"),
    );

    let _ = writeln!(out, "providers:");
    if config.providers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (name, p) in &config.providers {
        let _ = writeln!(out, "  {name}:");
        sub_line(out, "upstream", &p.upstream);
        sub_line(out, "auth", &p.auth.to_string());
        if let Some(format) = &p.auth_format {
            sub_line(out, "auth format", format);
        }
        let credential = match &p.credential {
            CredentialSource::Store => {
                "store (sealed in the store; set with `airlock credential set`)".to_owned()
            }
            CredentialSource::Env(var) if env_is_set(var) => match usable_env_credential(p) {
                Ok(()) => format!("env:{var} (set)"),
                Err(e) => {
                    d.problems.push(format!("providers.{name}.credential: {e}"));
                    format!("env:{var} (set, but cannot be used: {e})")
                }
            },
            CredentialSource::Env(var) => format!(
                "env:{var} (not set: calls to {name} get 503 until airlock is restarted with it)"
            ),
            CredentialSource::File(path) => match read_credential_file(path) {
                Ok(Some(secret)) => match usable(p, &secret) {
                    Ok(()) => format!("file:{} (readable)", path.display()),
                    Err(e) => {
                        d.problems.push(format!("providers.{name}.credential: {e}"));
                        format!(
                            "file:{} (readable, but cannot be used: {e})",
                            path.display()
                        )
                    }
                },
                Ok(None) => format!(
                    "file:{} (empty: calls to {name} get 503 until it holds a credential)",
                    path.display()
                ),
                Err(e) => {
                    let reason = match &e {
                        CredentialFileError::Read { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    d.problems.push(format!(
                        "providers.{name}.credential: cannot read {}: {reason}",
                        path.display()
                    ));
                    format!("file:{} (cannot read: {reason})", path.display())
                }
            },
        };
        sub_line(out, "credential", &credential);
        if !p.headers.is_empty() {
            let names: Vec<&str> = p.headers.iter().map(|(name, _)| name.as_str()).collect();
            sub_line(
                out,
                "headers",
                &format!("{} (values not shown)", names.join(", ")),
            );
        }
        if let Some(ca_file) = &p.ca_file {
            let state = if !p.upstream.starts_with("https://") {
                "not used: the upstream is not https".to_owned()
            } else {
                match check_ca_file(ca_file) {
                    Ok(1) => "1 certificate".to_owned(),
                    Ok(n) => format!("{n} certificates"),
                    Err(e) => {
                        d.problems.push(format!("providers.{name}: {e}"));
                        match e {
                            ProviderError::CaFile { reason, .. } => format!("cannot use: {reason}"),
                            other => format!("cannot use: {other}"),
                        }
                    }
                }
            };
            sub_line(out, "ca file", &format!("{} ({state})", ca_file.display()));
        }
        if p.keepalive_timeout != DEFAULT_KEEPALIVE_TIMEOUT {
            sub_line(out, "keepalive timeout", &dur(p.keepalive_timeout));
        }
        sub_line(
            out,
            "agents get",
            &format!(
                "{}=<session token>, {}={base_url}/{name}{}",
                p.env_key, p.env_base_url, p.base_path
            ),
        );
    }
    d
}

/// A key's line (the audit key, the master key): where it comes from and
/// whether `serve` would take it. `shared` is the problem of a shared
/// store without a shared key, if any; otherwise `check` loads the key as
/// `serve` would, creating nothing. A problem is added to `problems`, in
/// the words `serve` would refuse to start with; the key is never shown.
fn key_line(
    source: String,
    shared: Option<String>,
    check: impl FnOnce() -> anyhow::Result<Option<KeyOrigin>>,
    problems: &mut Vec<String>,
) -> String {
    if let Some(problem) = shared {
        // The default file next to a SQLite store means nothing here.
        problems.push(problem);
        return "not set (see below)".to_owned();
    }
    match check() {
        Ok(Some(KeyOrigin::Env)) => format!("{source} (set)"),
        Ok(Some(_)) => format!("{source} (exists)"),
        Ok(None) => format!("{source} (does not exist yet: created on first start)"),
        Err(e) => {
            problems.push(format!("{e:#}"));
            format!("{source} (cannot be used: see below)")
        }
    }
}

/// Whether an `env:` credential that is set is one `serve` takes.
fn usable_env_credential(p: &crate::config::ProviderConfig) -> Result<(), String> {
    let secret = p.credential.read()?.ok_or("not set")?;
    usable(p, &secret)
}

/// Whether `secret` is a credential `serve` takes for provider `p`: long
/// enough to be guarded against echoes, sendable in its header.
fn usable(p: &crate::config::ProviderConfig, secret: &airlock_core::Secret) -> Result<(), String> {
    airlock_proxy::CredentialFormat::new(p.auth.clone(), p.auth_format.as_deref())
        .and_then(|format| format.prepare(secret))
        .map(drop)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        })
}

/// Width of the setting names, so that values line up.
const LABEL_WIDTH: usize = 22;

fn line(out: &mut String, label: &str, value: &str) {
    let _ = writeln!(out, "  {:<LABEL_WIDTH$}{value}", format!("{label}:"));
}

fn sub_line(out: &mut String, label: &str, value: &str) {
    let width = LABEL_WIDTH - 2;
    let _ = writeln!(out, "    {:<width$}{value}", format!("{label}:"));
}

fn env_is_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_file_serve_would_refuse_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("p.key");
        let text = format!(
            "[providers.p]\nupstream = \"https://p\"\ncredential = \"file:{}\"\n\
             env_key = \"P_KEY\"\nenv_base_url = \"P_URL\"\n",
            key.display()
        );
        let config = Config::parse("x.toml", &text).unwrap();
        std::fs::write(&key, "sk-x\n").unwrap();
        let d = describe_with(&config, Ok(None));
        assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
        assert!(
            d.problems[0].contains("at least 8 bytes"),
            "{:?}",
            d.problems
        );
        std::fs::write(&key, "sk-long-enough-0123\n").unwrap();
        assert!(describe_with(&config, Ok(None)).problems.is_empty());
        std::fs::write(&key, "\n").unwrap();
        let d = describe_with(&config, Ok(None));
        assert!(
            d.problems.is_empty() && d.text.contains("(empty:"),
            "{}",
            d.text
        );
    }

    #[test]
    fn a_wildcard_listener_without_a_public_url_is_pointed_out() {
        let config = Config::parse("x.toml", "[proxy]\nlisten = \"0.0.0.0:18082\"\n").unwrap();
        let text = describe_with(&config, Ok(None)).text;
        assert!(text.contains("an address no agent can reach"), "{text}");
        let config = Config::parse(
            "x.toml",
            "[proxy]\nlisten = \"0.0.0.0:18082\"\npublic_url = \"http://airlock:18082\"\n",
        )
        .unwrap();
        assert!(!describe_with(&config, Ok(None))
            .text
            .contains("no agent can reach"));
    }
}
