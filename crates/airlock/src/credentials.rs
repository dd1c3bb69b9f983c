//! The providers' real credentials, kept current from their sources:
//!
//! - `env:VAR`: read once at start;
//! - `file:PATH`: re-read whenever the file changes (inotify plus a periodic
//!   check), so a rotated secret file applies to the next call;
//! - `store`: sealed in the store with the master key; set through the admin
//!   API (`airlock credential set`), applied at once here and, through the
//!   store's change feed, on every replica.
//!
//! Each provider's credential lives in a [`CredentialCell`] the request path
//! reads with one atomic load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_admin::{CredentialAdmin, CredentialAdminError, CredentialStatus};
use airlock_core::seal::{self, credential_aad, load_or_create_key, KeyOrigin, KeyPurpose};
use airlock_core::{MasterKey, Secret};
use airlock_proxy::credential_source::{read_credential_file, CredentialCell, FileWatcher};
use airlock_proxy::{CredentialFormat, PreparedCredential, ProviderError};
use airlock_session::now_ms;
use airlock_store::{Change, Store, StoredCredential};
use anyhow::Context;
use async_trait::async_trait;

use crate::config::{Config, CredentialSource};
use crate::key_check::NewKeyFile;

/// One provider's credential: where it comes from and what is in force.
struct ProviderCredential {
    source: CredentialSource,
    format: CredentialFormat,
    cell: Arc<CredentialCell<PreparedCredential>>,
    /// For a `store` credential, the row the cell was last given from
    /// (`None`: no row). Held by whatever changes the credential here
    /// (`set`, `remove`, `reload`, the re-check), from its store read or
    /// write to its cell update, so that a reload that read the row before
    /// a removal cannot put the key back after it (review of round 43). A
    /// reload that finds this same row changes nothing (round 44: the
    /// replica that set a key reloaded it when it heard of its own change,
    /// and the key then replaced itself rather than the one before, which
    /// went unmasked); the re-check compares its `updated_at`.
    applied: tokio::sync::Mutex<Option<StoredCredential>>,
}

/// How often a replica compares its stored credentials with the store,
/// besides hearing of changes: a removal or a new value whose announcement
/// was lost without the feed noticing (a half-open connection, say)
/// applies within this long.
const RECHECK_EVERY: Duration = Duration::from_secs(10);

/// Every provider's credential, and what keeps them current.
pub struct Credentials {
    providers: BTreeMap<String, ProviderCredential>,
    store: Arc<dyn Store>,
    /// Present when some provider's credential is in the store.
    master_key: Option<MasterKey>,
    /// Dropping these stops watching the files.
    _watchers: Vec<FileWatcher>,
}

// === impl Credentials ===

impl Credentials {
    /// Refuses a credential in the environment or a file that `load` would
    /// refuse (too short to be guarded, not sendable in a header), before
    /// `serve` opens or writes anything: a refused start leaves no new
    /// database behind (config is never half-applied). A file is read as
    /// its watcher reads it (whitespace trimmed, empty: not set yet); one
    /// that cannot be read is left to `load`, which says why.
    pub fn check_before_start(config: &Config) -> anyhow::Result<()> {
        for (name, p) in &config.providers {
            let secret = match &p.credential {
                CredentialSource::Store => continue,
                CredentialSource::Env(_) => p.credential.read().ok().flatten(),
                CredentialSource::File(path) => read_credential_file(path).ok().flatten(),
            };
            let Some(secret) = secret else {
                continue;
            };
            CredentialFormat::new(p.auth.clone(), p.auth_format.as_deref())
                .with_context(|| format!("providers.{name}.auth_format"))?
                .prepare(&secret)
                .with_context(|| format!("providers.{name}.credential"))?;
        }
        Ok(())
    }

    /// Loads every provider's credential. A missing one is not an error
    /// (its calls get 503 until it is set); an unreadable file, a bad value
    /// or a sealed value that does not open is.
    pub async fn load(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let (master_key, created) = if uses_master_key(config) {
            let (key, created) = load_master_key(config)?;
            (Some(key), Some(created))
        } else {
            (None, None)
        };
        let mut credentials = Self {
            providers: BTreeMap::new(),
            store,
            master_key,
            _watchers: Vec::new(),
        };
        for (name, p) in &config.providers {
            let format = CredentialFormat::new(p.auth.clone(), p.auth_format.as_deref())
                .with_context(|| format!("providers.{name}.auth_format"))?;
            let cell = Arc::new(CredentialCell::new());
            match &p.credential {
                CredentialSource::Env(_) => {
                    let secret = p
                        .credential
                        .read()
                        .map_err(|e| anyhow::anyhow!("providers.{name}.credential: {e}"))?;
                    if let Some(secret) = secret {
                        let prepared = format
                            .prepare(&secret)
                            .with_context(|| format!("providers.{name}.credential"))?;
                        cell.store(Some(prepared));
                    }
                }
                CredentialSource::File(path) => {
                    let format = format.clone();
                    let current = Arc::clone(&cell);
                    let watcher = FileWatcher::start(path.clone(), Arc::clone(&cell), move |s| {
                        rotated(format.prepare(&s)?, &current)
                    })
                    .with_context(|| format!("providers.{name}.credential"))?;
                    credentials._watchers.push(watcher);
                }
                CredentialSource::Store => {}
            }
            credentials.providers.insert(
                name.clone(),
                ProviderCredential {
                    source: p.credential.clone(),
                    format,
                    cell,
                    applied: tokio::sync::Mutex::new(None),
                },
            );
        }
        if let (Some(key), Some(made)) = (&credentials.master_key, &created) {
            crate::key_check::master_key_known_other(credentials.store.as_ref(), key, made).await?;
        }
        for (name, p) in &config.providers {
            if p.credential == CredentialSource::Store {
                credentials.reload(name).await?;
            }
        }
        // The sealed credentials opened: the key is theirs. One the store
        // remembers another key for is refused.
        if let (Some(key), Some(made)) = (&credentials.master_key, &created) {
            crate::key_check::master_key(credentials.store.as_ref(), key, made).await?;
        }
        if let Some(created) = created {
            created.keep();
        }
        Ok(credentials)
    }

    /// Warns of each provider without a credential (its calls get 503):
    /// once `serve` knows it will start, so that a refusal is all it says.
    pub fn warn_missing(&self) {
        for (name, p) in &self.providers {
            if p.cell.load().is_none() {
                let until = match p.source {
                    // Read once, at start.
                    CredentialSource::Env(_) => "until airlock is restarted with it set",
                    CredentialSource::File(_) => "until the file can be read",
                    CredentialSource::Store => "until one is set (airlock credential set)",
                };
                tracing::warn!(provider = %name, source = %describe(&p.source), "no credential available; calls to this provider get 503 {until}");
            }
        }
    }

    /// The live credential of `provider`, for the proxy.
    pub fn cell(&self, provider: &str) -> Option<Arc<CredentialCell<PreparedCredential>>> {
        self.providers.get(provider).map(|p| Arc::clone(&p.cell))
    }

    /// Re-reads a `store` credential (after a change on any replica).
    pub async fn reload(&self, provider: &str) -> anyhow::Result<()> {
        let Some(p) = self.providers.get(provider) else {
            return Ok(());
        };
        let Some(key) = self
            .master_key
            .as_ref()
            .filter(|_| p.source == CredentialSource::Store)
        else {
            return Ok(());
        };
        let mut applied = p.applied.lock().await;
        let Some(stored) = self.store.credential(provider).await? else {
            p.cell.store(None);
            *applied = None;
            return Ok(());
        };
        if applied.as_ref().is_some_and(|a| a.sealed == stored.sealed) {
            return Ok(());
        }
        let stored = &*applied.insert(stored);
        let secret = seal::open(key, &credential_aad(provider), &stored.sealed)
            .and_then(|bytes| bytes.into_secret())
            .with_context(|| {
                format!(
                    "the stored credential of {provider} does not open with this master key \
                     (AIRLOCK_MASTER_KEY or [store] master_key_file): every replica must use the \
                     key the credentials were sealed with"
                )
            })?;
        let prepared = match p
            .format
            .prepare(&secret)
            .and_then(|prepared| rotated(prepared, &p.cell))
        {
            Ok(prepared) => prepared,
            // A value stored before airlock refused its kind (a padded one,
            // round 43): the provider goes without a credential until one
            // is set or it is removed, rather than the server not starting
            // and so offering no way to replace it.
            Err(e) => {
                p.cell.store(None);
                tracing::error!(
                    %provider,
                    "the stored credential of {provider} is refused ({e}): calls to it get 503 \
                     until a new one is set (airlock credential set {provider})"
                );
                return Ok(());
            }
        };
        p.cell.store(Some(prepared));
        tracing::info!(%provider, "credential loaded from the store");
        Ok(())
    }

    /// Applies credential changes announced by other replicas until the
    /// feed ends.
    pub async fn follow_changes(self: Arc<Self>) {
        let Some(mut changes) = self.store.changes() else {
            return;
        };
        // A change between loading and subscribing was announced to no one.
        self.reload_stored().await;
        let mut recheck =
            tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = recheck.tick() => {
                    self.recheck_stored().await;
                    continue;
                }
            };
            match change {
                Ok(Change::Credential { provider }) => {
                    if let Err(e) = self.reload(&provider).await {
                        tracing::error!(%provider, error = %format!("{e:#}"), "could not reload a changed credential");
                    }
                }
                // Announcements were lost (the feed's connection dropped, or
                // this receiver fell behind): any credential may have changed.
                Ok(Change::Resync) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.reload_stored().await;
                }
                Ok(Change::Session { .. } | Change::Denied { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Compares each stored credential's row with the one last read, and
    /// reloads those that changed or went (review of round 43: a removal
    /// whose announcement was lost left the key in use until some other
    /// change). One small query per provider; a store out of reach is
    /// asked again at the next round.
    async fn recheck_stored(&self) {
        let stored = self
            .providers
            .iter()
            .filter(|(_, p)| p.source == CredentialSource::Store);
        for (provider, p) in stored {
            let applied = p.applied.lock().await;
            let changed = match self.store.credential(provider).await {
                Ok(row) => row.map(|r| r.updated_at) != applied.as_ref().map(|a| a.updated_at),
                Err(e) => {
                    tracing::debug!(%provider, error = %e, "could not re-check a stored credential");
                    false
                }
            };
            drop(applied);
            if !changed {
                continue;
            }
            tracing::warn!(
                %provider,
                "the stored credential changed without this replica hearing of it; reloading"
            );
            if let Err(e) = self.reload(provider).await {
                tracing::error!(%provider, error = %format!("{e:#}"), "could not reload a changed credential");
            }
        }
    }

    /// Reloads every credential kept in the store.
    async fn reload_stored(&self) {
        let stored = self
            .providers
            .iter()
            .filter(|(_, p)| p.source == CredentialSource::Store)
            .map(|(name, _)| name);
        for provider in stored {
            if let Err(e) = self.reload(provider).await {
                tracing::error!(%provider, error = %format!("{e:#}"), "could not reload a credential");
            }
        }
    }
}

/// `new`, guarding as well against the key it replaces in `cell`, if any:
/// the one in force, else the one last removed (round 43 review: a leaked
/// key removed, then its successor set, went unguarded).
fn rotated(
    new: PreparedCredential,
    cell: &CredentialCell<PreparedCredential>,
) -> Result<PreparedCredential, ProviderError> {
    match cell.last() {
        Some(previous) => new.also_guarding(&previous.value),
        None => Ok(new),
    }
}

#[async_trait]
impl CredentialAdmin for Credentials {
    async fn set(&self, provider: &str, value: Secret) -> Result<(), CredentialAdminError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| CredentialAdminError::UnknownProvider(provider.to_owned()))?;
        let key = match (&p.source, &self.master_key) {
            (CredentialSource::Store, Some(key)) => key,
            (source, _) => {
                return Err(CredentialAdminError::NotStored {
                    provider: provider.to_owned(),
                    origin: describe(source),
                })
            }
        };
        let mut applied = p.applied.lock().await;
        let prepared = p
            .format
            .prepare(&value)
            // Guarding the key it replaces, as a rotation heard of from
            // another replica does (round 35: this replica stopped).
            .and_then(|prepared| rotated(prepared, &p.cell))
            .map_err(|e| CredentialAdminError::Invalid(format!("value: {e}")))?;
        let sealed = seal::seal(key, &credential_aad(provider), value.expose().as_bytes())
            .map_err(|e| CredentialAdminError::Internal(e.to_string()))?;
        let at = now_ms();
        self.store.set_credential(provider, &sealed, at).await?;
        p.cell.store(Some(prepared));
        *applied = Some(StoredCredential {
            sealed,
            updated_at: at,
        });
        Ok(())
    }

    async fn remove(&self, provider: &str) -> Result<bool, CredentialAdminError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| CredentialAdminError::UnknownProvider(provider.to_owned()))?;
        let how = match &p.source {
            CredentialSource::Store => None,
            CredentialSource::Env(_) => {
                Some("unset the variable and restart airlock (or set another key in it)")
            }
            CredentialSource::File(_) => {
                Some("empty the file (the next call then gets 503) or write another key to it")
            }
        };
        if let Some(how) = how {
            return Err(CredentialAdminError::NotRemovable {
                provider: provider.to_owned(),
                origin: describe(&p.source),
                how,
            });
        }
        let mut applied = p.applied.lock().await;
        let removed = self.store.remove_credential(provider).await?;
        *applied = None;
        // Whether or not the row was there: this replica stops using the
        // key now, the others when they hear of the change.
        p.cell.store(None);
        Ok(removed)
    }

    async fn status(&self, provider: &str) -> Result<CredentialStatus, CredentialAdminError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| CredentialAdminError::UnknownProvider(provider.to_owned()))?;
        let updated_at = if p.source == CredentialSource::Store {
            self.store.credential(provider).await?.map(|c| c.updated_at)
        } else {
            None
        };
        Ok(CredentialStatus {
            source: describe(&p.source),
            set: p.cell.load().is_some(),
            updated_at,
        })
    }
}

/// The source as written in the config.
fn describe(source: &CredentialSource) -> String {
    match source {
        CredentialSource::Env(var) => format!("env:{var}"),
        CredentialSource::File(path) => format!("file:{}", path.display()),
        CredentialSource::Store => "store".to_owned(),
    }
}

/// Why `serve` would refuse to start for want of a master key, if it
/// would: with credentials in a shared store, every replica must hold the
/// same key (from the variable or a configured file).
pub fn missing_shared_master_key(config: &Config) -> Option<String> {
    let uses_store = uses_master_key(config);
    let env_set = std::env::var(seal::MASTER_KEY_ENV).is_ok_and(|v| !v.trim().is_empty());
    let missing = uses_store
        && !env_set
        && !config.master_key_file_explicit
        && airlock_store::is_postgres_url(&config.store_url);
    missing.then(|| {
        format!(
            "with a PostgreSQL store every replica needs the same master key: set {} \
             (64 hex characters) or [store] master_key_file",
            seal::MASTER_KEY_ENV
        )
    })
}

fn load_master_key(config: &Config) -> anyhow::Result<(MasterKey, NewKeyFile)> {
    let env = master_key_env(config)?;
    let (key, origin) =
        load_or_create_key(env.as_deref(), &config.master_key_file, KeyPurpose::MASTER)
            .context("loading the master key")?;
    if origin == KeyOrigin::Created {
        tracing::info!(
            file = %crate::paths::absolute(&config.master_key_file).display(),
            "master key created (mode 0600)"
        );
    }
    let created = NewKeyFile::new(origin == KeyOrigin::Created, &config.master_key_file);
    Ok((MasterKey::new(key), created))
}

/// Whether some provider's credential is sealed in the store (and so
/// `serve` needs the master key).
pub fn uses_master_key(config: &Config) -> bool {
    config
        .providers
        .values()
        .any(|p| p.credential == CredentialSource::Store)
}

/// What `serve` would do loading the master key, short of creating its
/// file (`config check`): the same errors, word for word; `Ok(None)` when
/// the file would be created.
pub fn check_master_key(config: &Config) -> anyhow::Result<Option<KeyOrigin>> {
    let env = master_key_env(config)?;
    seal::check_key(env.as_deref(), &config.master_key_file, KeyPurpose::MASTER)
        .context("loading the master key")
}

/// Where the master key comes from: the variable, or the key file's
/// absolute path. Never the key.
pub fn master_key_source(config: &Config) -> String {
    crate::paths::key_source(seal::MASTER_KEY_ENV, &config.master_key_file)
}

/// `AIRLOCK_MASTER_KEY` if set; refuses a shared store without a shared key.
fn master_key_env(config: &Config) -> anyhow::Result<Option<String>> {
    if let Some(problem) = missing_shared_master_key(config) {
        anyhow::bail!(problem);
    }
    Ok(std::env::var(seal::MASTER_KEY_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A replica hears of its own change through the change feed and
    /// reloads: the key it set must still mask the key it replaced (round
    /// 44: it reloaded the same row, and the key then replaced itself).
    #[tokio::test]
    async fn reloading_the_row_in_force_keeps_the_replaced_key_masked() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/airlock.db", dir.path().display());
        let config = Config::parse(
            "test.toml",
            &format!(
                "[store]\nurl = \"{url}\"\n\n[providers.p]\nupstream = \"http://127.0.0.1:9\"\n\
                 auth = \"bearer\"\ncredential = \"store\"\nenv_key = \"P_KEY\"\n\
                 env_base_url = \"P_BASE_URL\"\n"
            ),
        )
        .unwrap();
        let store = airlock_store::open(&url).await.unwrap();
        let credentials = Credentials::load(&config, Arc::clone(&store))
            .await
            .unwrap();
        let (first, second) = ("first-key-0000000001", "second-key-000000002");
        for key in [first, second] {
            credentials
                .set("p", Secret::new(key.to_owned()))
                .await
                .unwrap();
        }
        credentials.reload("p").await.unwrap();
        let current = credentials.cell("p").unwrap().load().unwrap();
        let guard = current.value.redactor();
        assert!(guard.contains_secret(second.as_bytes()));
        assert!(
            guard.contains_secret(first.as_bytes()),
            "the replaced key went unmasked"
        );
        store.close().await;
    }
}
