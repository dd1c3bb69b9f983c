//! The audit key: from `AIRLOCK_AUDIT_KEY`, or the key file named by
//! `[audit] key_file` (created with mode 0600 on first start).

use airlock_core::audit::AuditKey;
use airlock_core::seal::{check_key, load_or_create_key, KeyOrigin, KeyPurpose};
use anyhow::Context;

use crate::config::AuditConfig;
use crate::key_check::NewKeyFile;

/// The environment variable that may hold the audit key (64 hex characters).
pub const AUDIT_KEY_ENV: &str = "AIRLOCK_AUDIT_KEY";

const PURPOSE: KeyPurpose = KeyPurpose {
    name: "audit key",
    env_var: AUDIT_KEY_ENV,
};

/// Loads the key, creating the key file if there is neither it nor the
/// variable (server start). On a shared store every replica must hold the
/// same key, so there it must come from the variable or a configured file.
pub fn load_or_create(
    config: &AuditConfig,
    store_url: &str,
) -> anyhow::Result<(AuditKey, NewKeyFile)> {
    let env = env_value(config, store_url)?;
    let (key, origin) = load_or_create_key(env.as_deref(), &config.key_file, PURPOSE)
        .context("loading the audit key")?;
    if origin == KeyOrigin::Created {
        tracing::info!(
            file = %crate::paths::absolute(&config.key_file).display(),
            "audit key created (mode 0600)"
        );
    }
    let created = NewKeyFile::new(origin == KeyOrigin::Created, &config.key_file);
    Ok((AuditKey::new(key.expose()), created))
}

/// What [`load_or_create`] would do, short of creating the key file
/// (`config check`): the same errors, word for word; `Ok(None)` when the
/// file would be created.
pub fn check(config: &AuditConfig, store_url: &str) -> anyhow::Result<Option<KeyOrigin>> {
    let env = env_value(config, store_url)?;
    check_key(env.as_deref(), &config.key_file, PURPOSE).context("loading the audit key")
}

/// Where the key comes from, for logs and `config check`: the variable,
/// or the key file's absolute path. Never the key.
pub fn source(config: &AuditConfig) -> String {
    crate::paths::key_source(AUDIT_KEY_ENV, &config.key_file)
}

/// `AIRLOCK_AUDIT_KEY` if set; refuses a shared store without a shared key.
fn env_value(config: &AuditConfig, store_url: &str) -> anyhow::Result<Option<String>> {
    if let Some(problem) = missing_shared_key(config, store_url) {
        anyhow::bail!(problem);
    }
    Ok(std::env::var(AUDIT_KEY_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty()))
}

/// Why `serve` would refuse to start for want of an audit key, if it would:
/// on a shared store every replica must hold the same key, so it must come
/// from the variable or a configured file, never one made on first start.
pub fn missing_shared_key(config: &AuditConfig, store_url: &str) -> Option<String> {
    let env_set = std::env::var(AUDIT_KEY_ENV).is_ok_and(|v| !v.trim().is_empty());
    (!env_set && !config.key_file_explicit && airlock_store::is_postgres_url(store_url)).then(
        || {
            format!(
            "with a PostgreSQL store every replica needs the same audit key: set {AUDIT_KEY_ENV} \
             (64 hex characters) or [audit] key_file"
        )
        },
    )
}

/// Loads an existing key; never creates one (verification).
pub fn load_existing(config: &AuditConfig, store_url: &str) -> anyhow::Result<AuditKey> {
    let env = std::env::var(AUDIT_KEY_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty());
    if env.is_none() && !config.key_file_explicit && airlock_store::is_postgres_url(store_url) {
        // No default key file applies: serve never makes one for a shared
        // store.
        anyhow::bail!(
            "no audit key: set {AUDIT_KEY_ENV} or [audit] key_file to the key the servers on \
             this PostgreSQL store run with"
        );
    }
    if env.is_none() && !config.key_file.exists() {
        let relative = if config.key_file.is_relative() {
            "; a relative key_file is relative to the working directory, not to the config file"
        } else {
            ""
        };
        anyhow::bail!(
            "no audit key: set {AUDIT_KEY_ENV} or point [audit] key_file at the server's key ({} \
             does not exist{relative})",
            crate::paths::absolute(&config.key_file).display()
        );
    }
    // It exists: nothing is created (a file that appeared meanwhile is
    // kept all the same).
    let (key, created) = load_or_create(config, store_url)?;
    created.keep();
    Ok(key)
}
