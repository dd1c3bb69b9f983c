//! Persistence for airlock.
//!
//! [`Store`] is what the rest of airlock needs from a database; [`open`]
//! picks the implementation from the store URL and applies migrations before
//! returning. The store is never on the request path of a call whose token is
//! already cached (except, on a store shared by replicas, to refill a
//! session's lease of `max_requests`, once per lease).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use airlock_core::audit::AuditRecord;
use airlock_core::{Limits, Scope, SessionId, TokenHash};
use async_trait::async_trait;

mod audit;
pub mod audit_batch;
mod audit_rows;
mod batch_trail;
mod change;
mod postgres;
mod session_rows;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;

pub use audit::{
    take_oldest_first, take_oldest_first_by, AuditQuery, ChainFloor, ChainHead, FloorSeal,
    GenesisSeal, Pruned,
};
pub use change::{Change, ChangeCursor, SessionChanges, SessionStatus};
pub use postgres::{migrator_up_to as postgres_migrator_up_to, PgStore};
pub use sqlite::{
    migrator_up_to as sqlite_migrator_up_to, SqliteStore, PAGE_SIZE as SQLITE_PAGE_SIZE,
    WAL_SIZE_LIMIT as SQLITE_WAL_SIZE_LIMIT,
};

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

/// Where a session sits in the order sessions are listed in: newest first
/// (`created_at` descending), then by `id` descending (compared byte by
/// byte), a total order since ids are unique. [`Store::list_sessions_page`]
/// continues after one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Unix milliseconds.
    pub created_at: i64,
    pub id: SessionId,
}

impl SessionKey {
    /// The key of a stored session.
    pub fn of(row: &SessionRow) -> Self {
        Self {
            created_at: row.created_at,
            id: row.id.clone(),
        }
    }

    /// Whether a session with this key is listed after one with `other`
    /// (is older, or as old with a smaller id).
    pub fn comes_after(&self, other: &Self) -> bool {
        (self.created_at, self.id.as_str()) < (other.created_at, other.id.as_str())
    }
}

/// One page of sessions to list ([`Store::list_sessions_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPage {
    /// Also sessions that ended (expired or revoked); otherwise only those
    /// active at `now_ms`.
    pub include_ended: bool,
    /// Unix milliseconds: what "active" is judged at.
    pub now_ms: i64,
    /// Start after this session (exclusive); `None` for the first page.
    pub after: Option<SessionKey>,
    /// At most this many rows.
    pub limit: u32,
}

/// A provider credential as stored: sealed, never plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// Ciphertext from `airlock_core::seal::seal`.
    pub sealed: Vec<u8>,
    /// Unix milliseconds.
    pub updated_at: i64,
}

impl std::fmt::Debug for StoredCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCredential")
            .field("sealed_len", &self.sealed.len())
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// Errors from a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store url {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    // The message holds the database's own; not also chained as a source,
    // which printed it three times over in `airlock: …` errors.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// No connection to the database could be had for a write: nothing of
    /// it was sent, so it surely did not land.
    #[error("cannot reach the database: {0}")]
    Unreachable(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("audit chain {0} was moved on by another writer")]
    ChainConflict(u32),
    #[error("audit chain {chain}: record {seq} cannot be read: {reason}")]
    UnreadableAudit {
        chain: u32,
        /// The record (for a batch, its first record) that cannot be read.
        seq: u64,
        reason: String,
    },
    #[error("audit batch refused: {0}")]
    InvalidBatch(String),
    /// The SQLite store's audit journal refuses appends until its batches
    /// are in the database (see `sqlite/journal.rs`).
    #[error("the audit journal could not be moved into the database: {0}")]
    JournalStuck(String),
    /// Another holder has the SQLite store's audit journal: appends that
    /// bypassed it could take seqs it already acknowledged.
    #[error(
        "the audit journal {} is held by another process (a second server on this database?)",
        .0.display()
    )]
    JournalHeld(std::path::PathBuf),
    #[error("corrupt row for {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the store's runtime has shut down")]
    RuntimeGone,
    #[error("the store did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    #[error(
        "no database at {}: nothing has been stored there (is this the config `serve` runs \
         with, from the directory it runs in? a relative store.url is relative to the working \
         directory, not to the config file)",
        .0.display()
    )]
    Missing(std::path::PathBuf),
    #[error(
        "no airlock store in the database {0}: nothing has been stored there (is this the \
         store.url `serve` runs with?); nothing was created in it"
    )]
    NoStore(String),
    #[error(
        "the database file {} was deleted or replaced while airlock had it open; \
         nothing written now would be kept (put it back or restart airlock)",
        .0.display()
    )]
    FileGone(std::path::PathBuf),
}

impl StoreError {
    /// Whether the store is out of reach (no connection, no answer in time,
    /// shutting down) rather than refusing what was asked: worth asking
    /// again later (the admin API answers 503 `store_unavailable`).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::TimedOut(_) | Self::RuntimeGone => true,
            Self::Database(sqlx::Error::Database(e)) => e
                .code()
                .as_deref()
                .is_some_and(|code| refuses_connections(code, e.message())),
            // Not `Tls`: a certificate the client refuses is a
            // misconfiguration, not an outage.
            Self::Database(e) => matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
            ),
            _ => false,
        }
    }
}

/// Whether PostgreSQL's SQLSTATE `code` (with its `message`) says it takes
/// no connections now: class 08 (connection exception), shutting down or
/// starting (57P01–03), too many connections (53300), the database the URL
/// names gone (3D000: dropped, or not yet restored), or the database
/// closed to connections (`ALLOW_CONNECTIONS false`: 55000, a code shared
/// with other states, so told by its message).
fn refuses_connections(code: &str, message: &str) -> bool {
    code.starts_with("08")
        || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "3D000")
        || (code == "55000" && message.contains("not currently accepting connections"))
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
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
    /// Every session, newest first (in [`SessionKey`] order): active ones
    /// only unless `include_ended`. Unbounded: the admin API lists with
    /// [`Store::list_sessions_page`].
    async fn list_sessions(&self, include_ended: bool, now_ms: i64) -> Result<Vec<SessionRow>>;
    /// One page of [`Store::list_sessions`]: up to `page.limit` sessions in
    /// the same order, after `page.after`. The stores read only that page
    /// (keyset on `(created_at, id)` with an index, never an offset). No
    /// default: one built on `list_sessions` would read every session per
    /// page, unnoticed, in any store that forgot to override it.
    async fn list_sessions_page(&self, page: &SessionPage) -> Result<Vec<SessionRow>>;
    /// Marks a session revoked at `at_ms` unless it already was. Returns
    /// whether the session exists.
    async fn revoke_session(&self, id: &SessionId, at_ms: i64) -> Result<bool>;
    /// Adds call counts accumulated in memory.
    async fn add_call_counts(&self, id: &SessionId, allowed: u64, denied: u64) -> Result<()>;
    /// A server setting.
    async fn setting(&self, key: &str) -> Result<Option<String>>;
    /// Stores a server setting unless one exists; returns the value in force.
    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String>;
    /// Removes a server setting if its value is still `value`; returns
    /// whether it did. A store that keeps no settings removes nothing.
    async fn remove_setting_if(&self, key: &str, value: &str) -> Result<bool> {
        let _ = (key, value);
        Ok(false)
    }

    /// The sealed credential of `provider`, if one was set.
    async fn credential(&self, provider: &str) -> Result<Option<StoredCredential>>;
    /// Stores `sealed` as `provider`'s credential, replacing any; processes
    /// sharing the store hear of it through [`Store::changes`].
    async fn set_credential(&self, provider: &str, sealed: &[u8], at_ms: i64) -> Result<()>;
    /// Removes `provider`'s stored credential; whether there was one.
    /// Processes sharing the store hear of it through [`Store::changes`].
    async fn remove_credential(&self, provider: &str) -> Result<bool>;

    /// The audit chain this process appends to, at its head: on a store
    /// with one writer, the one chain (resumed where it ended); where
    /// several writers share the store, a chain no live writer holds, or a
    /// new one whose head is sealed with `genesis`.
    async fn audit_claim_chain(&self, genesis: GenesisSeal<'_>) -> Result<ChainHead>;
    /// Lets this process's audit appends be acknowledged once they are in
    /// a journal of the store's own, which the store moves into the
    /// database behind them; every audit read of this store sees them
    /// (SQLite: see `sqlite/journal.rs`). For the one writer of a store,
    /// before it claims its chain. `false` where the store keeps no
    /// journal (appends then commit); [`StoreError::JournalHeld`] when
    /// another process holds it.
    async fn audit_use_journal(&self) -> Result<bool> {
        Ok(false)
    }
    /// Appends `records` (consecutive, on `head.chain`) and moves the chain
    /// head to `head`, in one transaction: all or nothing. With a journal
    /// ([`Store::audit_use_journal`]) the batch is checked the same way,
    /// and then written to the journal.
    async fn audit_append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()>;
    /// Whether [`Store::audit_append_blocking`] appends on the caller's
    /// thread (SQLite): the audit writer then gets a thread of its own and
    /// commits there, with no hand-off per batch.
    fn audit_appends_inline(&self) -> bool {
        false
    }
    /// [`Store::audit_append`] on the calling thread, blocking it until the
    /// commit; `None` when the store only appends asynchronously. Only for
    /// a thread that runs nothing else (never a runtime's worker).
    fn audit_append_blocking(
        &self,
        _records: &[AuditRecord],
        _head: &ChainHead,
    ) -> Option<Result<()>> {
        None
    }
    /// Audit records matching `query`.
    async fn audit_records(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>>;
    /// Every chain's head.
    async fn audit_heads(&self) -> Result<Vec<ChainHead>>;
    /// A small write proving the audit trail can be written right now.
    async fn audit_probe(&self) -> Result<()>;
    /// Every chain's floor, where older records were pruned, by chain.
    async fn audit_floors(&self) -> Result<Vec<ChainFloor>>;
    /// Chains the store holds records (or a floor) of but no head, each
    /// with the first seq it holds: their head was deleted. (Reads every
    /// batch row: for verification, not for the request path.)
    async fn audit_headless_chains(&self) -> Result<Vec<(u32, u64)>>;
    /// Removes, in every chain, the oldest records: the batches whose
    /// records all ended before `before_ms` (unix ms), never a chain's last
    /// batch (its head stays checkable against a record). Each chain pruned
    /// gets the last record removed as its floor, sealed with `seal`, and
    /// `now_ms` as its time. It removes in steps, each its own transaction
    /// that moves the floor along: an error leaves the steps before it
    /// done. With `dry_run`, nothing changes and the answer says what
    /// would go.
    async fn audit_prune(
        &self,
        before_ms: i64,
        seal: FloorSeal<'_>,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<Pruned>>;

    /// Flushes and closes connections.
    async fn close(&self);

    // --- Sharing the store between processes (replicas). The defaults suit
    // a store with one process (SQLite): no change feed, limits counted in
    // memory.

    /// Whether several airlock processes may use this store at once
    /// (PostgreSQL). Then `max_requests` is handed out in leases
    /// ([`Store::reserve_requests`]) and `max_denied` is applied to the
    /// stored totals ([`Store::record_calls`]).
    fn is_shared(&self) -> bool {
        false
    }
    /// A new receiver of the changes made to sessions and credentials by
    /// any process sharing this store, or `None` when the store has no
    /// other process to hear from. The sender never closes while the store
    /// is open.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }
    /// Adds call counts like [`Store::add_call_counts`]; on a shared store,
    /// also revokes the session at `now_ms`, in the same statement, once its
    /// stored denied total reaches `max_denied`. Returns the stored state
    /// after the update when the store can tell (`None` if the session does
    /// not exist or the store keeps no shared totals).
    async fn record_calls(
        &self,
        id: &SessionId,
        allowed: u64,
        denied: u64,
        now_ms: i64,
    ) -> Result<Option<SessionStatus>> {
        let _ = now_ms;
        self.add_call_counts(id, allowed, denied).await?;
        Ok(None)
    }
    /// Whether `max_requests` is spent from leases ([`Store::reserve_requests`])
    /// rather than counted in memory: a store that keeps leases loses at most
    /// a lease's unused calls when a process dies, never allows more.
    fn leases_requests(&self) -> bool {
        self.is_shared()
    }
    /// Reserves up to `want` calls of a session's `max_requests` for this
    /// process (a lease), never more than remain unreserved, so that the
    /// leases of all processes together never exceed `max_requests`.
    /// Returns how many were granted; 0 when the quota is spent.
    async fn reserve_requests(&self, id: &SessionId, want: u64) -> Result<u64> {
        let _ = id;
        Ok(want)
    }
    /// Gives back `count` reserved calls this process will not use.
    async fn release_requests(&self, id: &SessionId, count: u64) -> Result<()> {
        let _ = (id, count);
        Ok(())
    }
    /// The stored state of these sessions (missing ones are left out), in
    /// one query where the store can.
    async fn session_statuses(&self, ids: &[SessionId]) -> Result<Vec<SessionStatus>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(row) = self.session_by_id(id).await? {
                out.push(SessionStatus {
                    id: row.id,
                    revoked_at: row.revoked_at,
                    expires_at: row.expires_at,
                    allowed: row.allowed,
                    denied: row.denied,
                });
            }
        }
        Ok(out)
    }
    /// On a shared store that tracks changes (PostgreSQL): the status of
    /// every session changed since `since` (none without a cursor: the
    /// first read only finds where to start), plus the status of the
    /// sessions `ids` names, all read in one snapshot, and the cursor to
    /// give next time. Every change the read did not see is found by the
    /// next read from the cursor it returned, whatever order concurrent
    /// transactions commit in. An idle store costs one small query.
    ///
    /// `None` when the store keeps no such record: then a reader must use
    /// [`Store::session_statuses`] on everything it caches.
    async fn session_changes(
        &self,
        since: Option<ChangeCursor>,
        ids: &[SessionId],
    ) -> Result<Option<SessionChanges>> {
        let _ = (since, ids);
        Ok(None)
    }
}

/// Opens the store named by `url` and brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url).await?));
    }
    if is_postgres_url(url) {
        return Ok(Arc::new(PgStore::open(url).await?));
    }
    Err(StoreError::UnsupportedUrl(
        url_for_display(url).into_owned(),
    ))
}

/// The size of a lease of `want` calls of a quota of `max` of which
/// `reserved` are leased already: at most an eighth of what is left (at
/// least one), so that replicas share what remains.
fn lease_grant(max: u64, reserved: u64, want: u64) -> u64 {
    let left = max.saturating_sub(reserved);
    want.max(1).min((left / 8).max(1)).min(left)
}

/// Opens the store at `url` like [`open`], but only if it exists: a SQLite
/// database whose file is there, a PostgreSQL database holding airlock's
/// schema. For commands that read what `serve` stored, which must not
/// create an empty store and report on it.
pub async fn open_existing(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open_existing(url).await?));
    }
    if is_postgres_url(url) {
        return Ok(Arc::new(PgStore::open_existing(url).await?));
    }
    open(url).await
}

/// The database file a `sqlite:` URL names, when it is one plain file
/// (not in memory).
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    sqlite::file_of(url)
}

/// `url` as it may be shown (logs, errors, `config check`): a password in
/// it, in the user info (`postgres://user:PASSWORD@host/db`) or a
/// `password=` query parameter, replaced by `***`.
pub fn url_for_display(url: &str) -> Cow<'_, str> {
    let mut shown = Cow::Borrowed(url);
    let before_query = url.find('?').unwrap_or(url.len());
    if let Some((scheme, rest)) = url[..before_query].split_once("://") {
        // The user info ends at the last `@` before the query: a password
        // may hold a `/` that was not percent-encoded.
        if let Some(at) = rest.rfind('@') {
            if let Some((user, _password)) = rest[..at].split_once(':') {
                shown = Cow::Owned(format!(
                    "{scheme}://{user}:***{}",
                    &url[scheme.len() + 3 + at..]
                ));
            }
        }
    } else if let Some(at) = url[..before_query].rfind('@') {
        // Not a URL airlock reads (`postgres//u:pw@h`): where the user info
        // starts is unclear, so everything from the first `:` to the `@`
        // is withheld.
        if let Some(colon) = url[..at].find(':') {
            shown = Cow::Owned(format!("{}:***{}", &url[..colon], &url[at..]));
        }
    }
    if let Some((base, query)) = shown.split_once('?') {
        if query.split('&').any(|pair| pair.starts_with("password=")) {
            let query: Vec<&str> = query
                .split('&')
                .map(|pair| {
                    if pair.starts_with("password=") {
                        "password=***"
                    } else {
                        pair
                    }
                })
                .collect();
            shown = Cow::Owned(format!("{base}?{}", query.join("&")));
        }
    }
    shown
}

/// `text` with every URL in it shown as [`url_for_display`] shows it (for
/// messages that may quote a configured URL, such as a parse error).
pub fn urls_for_display(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        // The URL runs from the scheme before `://` to the next blank or
        // quote.
        let start = rest[..found]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[found..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .map_or(rest.len(), |i| found + i);
        out.push_str(&rest[..start]);
        out.push_str(&url_for_display(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Now, in unix milliseconds.
/// Seqs and counts are stored as SQL integers (saturating: no seq or count
/// reaches `i64::MAX`).
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A count read back from SQL (negative ones, which no write makes, as 0).
fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The migrations of `list` (version, description, SQL) up to `version`,
/// as sqlx's migrator (which locks the database while it works, where
/// the database has a lock for it).
fn migrator_of(
    list: &'static [(i64, &'static str, &'static str)],
    version: i64,
) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = list
        .iter()
        .filter(|(v, _, _)| *v <= version)
        .map(|&(v, name, sql)| {
            Migration::new(
                v,
                Cow::Borrowed(name),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        locking: true,
        ..Migrator::DEFAULT
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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

/// Closes `pool` and waits until it holds no connection, for at most
/// [`CLOSE_POOL_LIMIT`]. `Pool::close` alone can return while a connection
/// is still on its way back to the pool (its return is a spawned task),
/// and that connection can then land among the idle ones after they were
/// closed, where nothing closes it (sqlx issue #3217; seen here as a
/// SQLite file still open after `close`). Closing again closes whatever
/// has landed since.
async fn close_pool<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) {
    let deadline = std::time::Instant::now() + CLOSE_POOL_LIMIT;
    pool.close().await;
    while pool.size() > 0 && std::time::Instant::now() < deadline {
        // Lets the spawned return run, then closes what it brought back.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        pool.close().await;
    }
}

/// The longest [`close_pool`] waits for connections still on their way back.
const CLOSE_POOL_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_told_from_other_database_errors() {
        for code in ["08006", "57P01", "53300", "3D000"] {
            assert!(refuses_connections(code, ""), "{code}");
        }
        assert!(refuses_connections(
            "55000",
            "database \"x\" is not currently accepting connections"
        ));
        // A missing table is a broken store, not one out of reach.
        for code in ["42P01", "55000", "23505"] {
            assert!(!refuses_connections(code, "other"), "{code}");
        }
    }

    #[test]
    fn passwords_are_withheld_from_displayed_urls() {
        for (url, shown) in [
            ("sqlite://airlock.db", "sqlite://airlock.db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgresql://u:p@ss:w@h", "postgresql://u:***@h"),
            (
                "postgres://u@h/db?sslmode=require&password=pw",
                "postgres://u@h/db?sslmode=require&password=***",
            ),
            ("postgress://u:pw@h/db", "postgress://u:***@h/db"),
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres//u:Secret777@h/db", "postgres//u:***@h/db"),
            ("postgres:/u:Secret777@h/db", "postgres:***@h/db"),
            ("u:Secret777@h/db", "u:***@h/db"),
        ] {
            assert_eq!(url_for_display(url), shown, "{url}");
        }
        assert_eq!(
            urls_for_display(r#"invalid type: string "postgres://u:pw@h/db", expected x"#),
            r#"invalid type: string "postgres://u:***@h/db", expected x"#
        );
        assert_eq!(urls_for_display("no url here"), "no url here");
    }
}
