//! Persistence for airlock.
//!
//! [`Store`] is what the rest of airlock needs from a database; [`open`]
//! picks the implementation from the store URL and applies migrations before
//! returning. The store is never on the request path of a call whose token is
//! already cached.

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_core::{Limits, Scope, SessionId, TokenHash};
use async_trait::async_trait;

mod sqlite;

pub use sqlite::SqliteStore;

/// A session as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: SessionId,
    pub token_hash: TokenHash,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub expires_at: i64,
    /// Unix milliseconds, when revoked.
    pub revoked_at: Option<i64>,
    pub scope: Scope,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    /// Calls forwarded, as last flushed.
    pub allowed: u64,
    /// Calls denied, as last flushed.
    pub denied: u64,
}

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store url {0:?}: use sqlite://PATH")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row for {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What airlock keeps in its database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new session.
    async fn insert_session(&self, session: &SessionRow) -> Result<()>;
    /// The session whose token hashes to `hash`, in any state.
    async fn session_by_token(&self, hash: &TokenHash) -> Result<Option<SessionRow>>;
    /// The session with this id, in any state.
    async fn session_by_id(&self, id: &SessionId) -> Result<Option<SessionRow>>;
    /// Sessions, newest first: active ones only unless `include_ended`.
    async fn list_sessions(&self, include_ended: bool, now_ms: i64) -> Result<Vec<SessionRow>>;
    /// Marks a session revoked at `at_ms` unless it already was. Returns
    /// whether the session exists.
    async fn revoke_session(&self, id: &SessionId, at_ms: i64) -> Result<bool>;
    /// Adds call counts accumulated in memory.
    async fn add_call_counts(&self, id: &SessionId, allowed: u64, denied: u64) -> Result<()>;
    /// A server setting.
    async fn setting(&self, key: &str) -> Result<Option<String>>;
    /// Stores a server setting unless one exists; returns the value in force.
    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String>;
    /// Flushes and closes connections.
    async fn close(&self);
}

/// Opens the store named by `url` and brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_owned()))
}

/// Decodes the JSON columns of a session row.
fn decode_json<T: serde::de::DeserializeOwned>(id: &str, column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what: format!("session {id} column {column}"),
        reason: e.to_string(),
    })
}

/// Encodes a JSON column.
fn encode_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising these plain data types cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}
