//! The store remembers which audit key and master key it was written with,
//! as check values (an HMAC of a constant under each key: they tell one
//! key from another and reveal nothing of it), so that a server started
//! with another key refuses to start instead of writing what the others
//! cannot read: a second audit key would write a chain no `audit verify`
//! can check (the trail would stay broken for good), a second master key
//! would seal credentials the other replicas cannot open.
//!
//! The first server that starts with a key stores its check value (a race
//! between two first starts is settled by the store: one value wins, and
//! the loser compares against it). A store written before check values
//! existed is checked against what it holds: the audit chains' head seals
//! (the key must open at least one), the sealed credentials (opened at
//! load, see `credentials.rs`).

use airlock_core::audit::{head_seal, AuditKey};
use airlock_core::MasterKey;
use airlock_store::Store;
use anyhow::Context;
use subtle::ConstantTimeEq;

/// The setting holding the audit key's check value (hex).
const AUDIT_KEY_CHECK: &str = "audit_key_check";
/// The setting holding the master key's check value (hex).
const MASTER_KEY_CHECK: &str = "master_key_check";

/// Refuses an audit key other than the one the store's trail was written
/// with; stores this key's check value if none is there yet. `made` is
/// the key file this start created (the refusal then says the file was
/// missing).
pub async fn audit_key(store: &dyn Store, key: &AuditKey, made: &NewKeyFile) -> anyhow::Result<()> {
    let value = hex(&key.check_value());
    let mismatch = || {
        anyhow::anyhow!(
            "the audit key (AIRLOCK_AUDIT_KEY or [audit] key_file) is not the one this store's \
             audit trail was written with: records sealed with another key would never verify. \
             Every replica, and every restart, must use the same audit key{}",
            made.missing_hint("AIRLOCK_AUDIT_KEY")
        )
    };
    if let Some(stored) = store.setting(AUDIT_KEY_CHECK).await? {
        return if same(&stored, &value) {
            Ok(())
        } else {
            Err(mismatch())
        };
    }
    // A trail from before check values: its chains' heads are sealed with
    // the key that wrote them.
    let heads = store
        .audit_heads()
        .await
        .context("reading the audit chains' heads")?;
    let opened: Vec<u32> = heads
        .iter()
        .filter(|h| head_seal(key, h.chain, h.seq, &h.mac) == h.seal)
        .map(|h| h.chain)
        .collect();
    if !heads.is_empty() && opened.is_empty() {
        return Err(mismatch());
    }
    if opened.len() < heads.len() {
        let others: Vec<u32> = heads
            .iter()
            .map(|h| h.chain)
            .filter(|c| !opened.contains(c))
            .collect();
        tracing::warn!(
            chains = ?others,
            "these audit chains' heads were sealed with another audit key; `airlock audit \
             verify` reports them"
        );
    }
    let stored = store.set_setting_if_absent(AUDIT_KEY_CHECK, &value).await?;
    if same(&stored, &value) {
        Ok(())
    } else {
        // Another server stored its key's value first.
        Err(mismatch())
    }
}

/// Whether `key` is the audit key the store remembers (`None`: it holds no
/// check value, a trail from before them or none at all). Reads only.
pub async fn audit_key_remembered(
    store: &dyn Store,
    key: &AuditKey,
) -> anyhow::Result<Option<bool>> {
    let value = hex(&key.check_value());
    Ok(store
        .setting(AUDIT_KEY_CHECK)
        .await?
        .map(|stored| same(&stored, &value)))
}

/// Whether at least one of the store's audit chains has its head sealed
/// with `key`.
pub async fn seals_a_head(store: &dyn Store, key: &AuditKey) -> anyhow::Result<bool> {
    let heads = store.audit_heads().await?;
    Ok(heads
        .iter()
        .any(|h| head_seal(key, h.chain, h.seq, &h.mac) == h.seal))
}

/// Refuses a master key other than the one the store's credentials are
/// sealed with; stores this key's check value if none is there yet (call
/// it once the sealed credentials opened). `made` as for [`audit_key`].
pub async fn master_key(
    store: &dyn Store,
    key: &MasterKey,
    made: &NewKeyFile,
) -> anyhow::Result<()> {
    let value = hex(&key.check_value());
    let stored = match store.setting(MASTER_KEY_CHECK).await? {
        Some(stored) => stored,
        None => {
            store
                .set_setting_if_absent(MASTER_KEY_CHECK, &value)
                .await?
        }
    };
    if same(&stored, &value) {
        Ok(())
    } else {
        Err(master_key_mismatch(made))
    }
}

/// Refuses a master key the store remembers another key for, without
/// writing anything: what `serve` asks before it opens a sealed
/// credential (round 40: a replica with another key said only that a
/// credential did not open, after logging another as loaded).
pub async fn master_key_known_other(
    store: &dyn Store,
    key: &MasterKey,
    made: &NewKeyFile,
) -> anyhow::Result<()> {
    let value = hex(&key.check_value());
    match store.setting(MASTER_KEY_CHECK).await? {
        Some(stored) if !same(&stored, &value) => Err(master_key_mismatch(made)),
        _ => Ok(()),
    }
}

/// The refusal of a master key that is not the store's.
fn master_key_mismatch(made: &NewKeyFile) -> anyhow::Error {
    anyhow::anyhow!(
        "the master key (AIRLOCK_MASTER_KEY or master_key_file) is not the one this store's \
         credentials are sealed with: a credential set with it could not be opened by the \
         other servers, nor one of theirs by it. Every replica, and every restart, must use \
         the same master key{}",
        made.missing_hint("AIRLOCK_MASTER_KEY")
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two check values in constant time.
fn same(stored: &str, value: &str) -> bool {
    stored.as_bytes().ct_eq(value.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A key file this start did not create.
    fn kept() -> NewKeyFile {
        NewKeyFile::new(false, std::path::Path::new("unused"))
    }

    async fn store() -> (tempfile::TempDir, std::sync::Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let store = airlock_store::open(&url).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn the_first_audit_key_is_remembered_and_another_refused() {
        let (_dir, store) = store().await;
        let key = AuditKey::new(&[7; 32]);
        audit_key(store.as_ref(), &key, &kept()).await.unwrap();
        audit_key(store.as_ref(), &key, &kept()).await.unwrap();
        let other = AuditKey::new(&[8; 32]);
        let refused = audit_key(store.as_ref(), &other, &kept())
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("is not the one this store's audit trail"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_trail_without_a_check_value_is_checked_by_its_head_seals() {
        let (_dir, store) = store().await;
        let key = AuditKey::new(&[7; 32]);
        // A chain claimed before check values existed: its genesis head is
        // sealed with the key.
        let genesis = head_seal(&key, 1, 0, &airlock_core::audit::GENESIS_MAC);
        store
            .audit_claim_chain(&|chain| {
                head_seal(&key, chain, 0, &airlock_core::audit::GENESIS_MAC)
            })
            .await
            .unwrap();
        let heads = store.audit_heads().await.unwrap();
        assert_eq!(heads[0].seal, genesis);
        let other = AuditKey::new(&[8; 32]);
        assert!(audit_key(store.as_ref(), &other, &kept()).await.is_err());
        assert_eq!(store.setting(AUDIT_KEY_CHECK).await.unwrap(), None);
        audit_key(store.as_ref(), &key, &kept()).await.unwrap();
        assert!(audit_key(store.as_ref(), &other, &kept()).await.is_err());
    }

    #[tokio::test]
    async fn the_first_master_key_is_remembered_and_another_refused() {
        let (_dir, store) = store().await;
        let key = MasterKey::new(airlock_core::seal::KeyBytes::from_array([1; 32]));
        master_key(store.as_ref(), &key, &kept()).await.unwrap();
        master_key(store.as_ref(), &key, &kept()).await.unwrap();
        let other = MasterKey::new(airlock_core::seal::KeyBytes::from_array([2; 32]));
        let refused = master_key(store.as_ref(), &other, &kept())
            .await
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("is not the one this store's credentials"),
            "{refused}"
        );
    }
}

/// A key file this start created: removed again when the start fails
/// before the store has taken the key (`keep`). A new key for a store
/// written with another (its file lost) would otherwise stay on disk, and
/// `config check` would then find nothing missing.
#[derive(Debug)]
#[must_use]
pub struct NewKeyFile(Option<std::path::PathBuf>);

impl NewKeyFile {
    /// `file` if this start created it.
    pub fn new(created: bool, file: &std::path::Path) -> Self {
        Self(created.then(|| file.to_path_buf()))
    }

    /// The store took the key: the file stays.
    pub fn keep(mut self) {
        self.0 = None;
    }

    /// For a refused key: that its file was missing and what to do, when
    /// this start created it; empty otherwise.
    fn missing_hint(&self, variable: &str) -> String {
        self.0.as_ref().map_or_else(String::new, |file| {
            format!(
                ". {} did not exist, so this start made a new key (removed again): put back the \
                 key file this store was written with, or set {variable} to that key",
                crate::paths::absolute(file).display()
            )
        })
    }
}

impl Drop for NewKeyFile {
    fn drop(&mut self) {
        if let Some(file) = self.0.take() {
            if std::fs::remove_file(&file).is_ok() {
                tracing::info!(
                    file = %crate::paths::absolute(&file).display(),
                    "removed the key file this start created"
                );
            }
        }
    }
}
