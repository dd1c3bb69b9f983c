//! The embedded SQLite store: one file, WAL mode, migrations at open.
//!
//! Everything goes through a sqlx pool except the audit trail's appends,
//! which a thread of their own commits (`sqlite/audit_writer.rs`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use airlock_core::audit::{AuditRecord, GENESIS_MAC};
use airlock_core::{SessionId, TokenHash};
use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _, Row, SqlitePool};

use self::audit_batches::{append_through_pool, read_records};
use self::audit_writer::{AuditWriter, BUSY_TIMEOUT};
use crate::audit_rows::decode_head;
use crate::{
    decode_json, encode_json, to_i64, to_u64, AuditQuery, ChainFloor, ChainHead, FloorSeal,
    GenesisSeal, Pruned, Result, SessionPage, SessionRow, Store, StoreError, StoredCredential,
};

mod audit_batches;
mod audit_writer;
mod checkpointer;
mod journal;

/// A store in one SQLite file.
pub struct SqliteStore {
    pool: SqlitePool,
    /// Commits audit appends; `None` for a database that is not one plain
    /// file opened for writing (in memory, read-only, another VFS), whose
    /// appends go through the pool.
    audit: Option<AuditWriter>,
}

const COLUMNS: &str =
    "id, token_hash, created_at, expires_at, revoked_at, scope, limits, labels, allowed, denied";

/// The SQLite schema's migrations: version, description, SQL.
const MIGRATIONS: [(i64, &str, &str); 8] = [
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "audit",
        include_str!("../migrations/sqlite/0002_audit.sql"),
    ),
    (
        3,
        "credentials",
        include_str!("../migrations/sqlite/0003_credentials.sql"),
    ),
    (
        4,
        "audit batches",
        include_str!("../migrations/sqlite/0004_audit_batches.sql"),
    ),
    (
        5,
        "audit batches clustered",
        include_str!("../migrations/sqlite/0005_audit_batches_clustered.sql"),
    ),
    (
        6,
        "session leases",
        include_str!("../migrations/sqlite/0006_session_leases.sql"),
    ),
    (
        7,
        "sessions by creation",
        include_str!("../migrations/sqlite/0007_sessions_by_creation.sql"),
    ),
    (
        8,
        "audit floors",
        include_str!("../migrations/sqlite/0008_audit_floors.sql"),
    ),
];

fn migrator() -> Migrator {
    migrator_up_to(i64::MAX)
}

/// The SQLite migrations up to `version`: the schema an older airlock
/// left (for tests of what opening such a database does).
#[doc(hidden)]
pub fn migrator_up_to(version: i64) -> Migrator {
    crate::migrator_of(&MIGRATIONS, version)
}

/// The page size of a database file this store creates (a file that
/// exists keeps the one it has: SQLite changes it only by rewriting the
/// whole file).
///
/// A commit appends every page it changed to the write-ahead log as a whole
/// frame, and an audit commit changes at least three pages (the chain head,
/// the batch, the session index; now and then a B-tree's interior page too)
/// to add a record of about 150 bytes. Measured at concurrency 1: 15.9 KiB
/// written per call with 4 KiB pages (about four frames), 5.5 KiB with 1 KiB
/// pages (about five smaller ones, as smaller pages split more often).
/// Side by side with wrk on one VM: 3.1–3.4k → 3.6–4.2k calls/s and p99
/// 6.7–7.7 → 2.6–3.2 ms at concurrency 1, 9.9–11.6k → 12.2–13.0k calls/s at
/// 16, a few percent more at 64 (BENCHMARKS.md). SQLite's limit on a file
/// stays far off (2^32 pages, 4 TiB). The audit writer's checkpoint
/// backstop is counted in pages (`checkpointer::WRITER_CHECKPOINT_PAGES`),
/// so with 1 KiB pages it bounds the log at 16 MiB instead of 64.
pub const PAGE_SIZE: u32 = 1024;

/// Size (bytes) the write-ahead log file is cut back to once it has been
/// checkpointed and starts over (`journal_size_limit`). While a long read
/// (an export, a verify) holds a snapshot, checkpoints cannot reset the log
/// and it grows with every commit; without a limit SQLite keeps the file
/// at its largest until the store is closed (a soak left 194 MB).
pub const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`) and migrates it.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, true).await
    }

    /// Opens the database at `url` only if it exists ([`StoreError::Missing`]
    /// otherwise), for commands that read what `serve` stored.
    pub async fn open_existing(url: &str) -> Result<Self> {
        Self::open_with(url, false).await
    }

    async fn open_with(url: &str, create: bool) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .page_size(PAGE_SIZE)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
        if create {
            create_private(url, options.get_filename());
        } else if !is_in_memory(url) {
            let file = options.get_filename();
            let absolute = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
            if !file.exists() {
                return Err(StoreError::Missing(absolute));
            }
            // A file, but airlock's? (An empty one, or another program's
            // database, would be given airlock's tables and reported on as
            // an empty trail.) Looked at read-only, before anything is
            // written to it.
            if !has_schema(file).await? {
                return Err(StoreError::NoStore(absolute.display().to_string()));
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let migrated = match migrator().run(&pool).await {
            Ok(()) => audit_batches::convert_legacy(&pool).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = migrated {
            pool.close().await;
            return Err(e);
        }
        // The audit writer opens its connection after the migrations.
        let audit = match writer_file(&pool, url).await {
            Ok(Some(path)) => AuditWriter::start(path).await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match audit {
            Ok(audit) => Ok(Self { pool, audit }),
            Err(e) => {
                pool.close().await;
                Err(e)
            }
        }
    }

    /// Fails once the database file was deleted or replaced under the
    /// store: a write (a revocation, a session) would go into a file nobody
    /// will open again, and a read could come from the empty one a new
    /// connection creates at the path (see `checkpointer::FileWatch`).
    fn file_present(&self) -> Result<()> {
        match &self.audit {
            Some(writer) => writer.file_present(),
            None => Ok(()),
        }
    }

    /// Moves the audit journal into the database, so that a read sees
    /// every record appended before it.
    async fn flush_journal(&self) -> Result<()> {
        match &self.audit {
            Some(writer) => writer.flush().await,
            None => Ok(()),
        }
    }

    fn decode(row: &SqliteRow) -> Result<SessionRow> {
        let id: String = row.try_get("id")?;
        let corrupt = |reason: &str| StoreError::Corrupt {
            what: format!("session {id}"),
            reason: reason.to_owned(),
        };
        let hash: String = row.try_get("token_hash")?;
        Ok(SessionRow {
            id: SessionId::parse(&id).ok_or_else(|| corrupt("bad id"))?,
            token_hash: TokenHash::from_hex(&hash).ok_or_else(|| corrupt("bad token hash"))?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
            scope: decode_json(&id, "scope", row.try_get("scope")?)?,
            limits: decode_json(&id, "limits", row.try_get("limits")?)?,
            labels: decode_json(&id, "labels", row.try_get("labels")?)?,
            allowed: u64::try_from(row.try_get::<i64, _>("allowed")?).unwrap_or(0),
            denied: u64::try_from(row.try_get::<i64, _>("denied")?).unwrap_or(0),
        })
    }
}

/// Whether the database file at `path` holds airlock's schema (sqlx's
/// record of the migrations and the audit chains), read on a read-only
/// connection of its own.
async fn has_schema(path: &Path) -> Result<bool> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT)
        .connect()
        .await?;
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master \
         WHERE type = 'table' AND name IN ('_sqlx_migrations', 'audit_chains')",
    )
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(found == 2)
}

/// The file `url` names, unless it is in memory or not a `sqlite:` URL.
pub(crate) fn file_of(url: &str) -> Option<PathBuf> {
    if !url.starts_with("sqlite:") || is_in_memory(url) {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    let named = !path.as_os_str().is_empty() && !path.to_string_lossy().starts_with("file:");
    named.then(|| path.to_path_buf())
}

/// Whether `url` names an in-memory database (no file).
fn is_in_memory(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    query.split('&').any(|pair| pair == "mode=memory") || url.contains(":memory:")
}

/// Creates the database file readable and writable by its owner only, when
/// it does not exist yet: it holds the audit trail, token hashes and sealed
/// credentials. SQLite gives its log and shared-memory files the same
/// permissions. Best effort: what fails here, SQLite reports as it opens.
fn create_private(url: &str, path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;

    // Only a database kept in a file of its own that SQLite may create: not
    // an in-memory one (sqlx names those `file:sqlx-in-memory-N`), nor one
    // opened read-only (a missing file must stay an error).
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let not_a_new_file = query.split('&').any(|pair| pair == "mode=ro")
        || is_in_memory(url)
        || path.as_os_str().is_empty()
        || path.to_string_lossy().starts_with("file:");
    if not_a_new_file {
        return;
    }
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// The file the audit writer is to open: the pool's main database, when it
/// is a plain file opened for writing with the default VFS.
async fn writer_file(pool: &SqlitePool, url: &str) -> Result<Option<PathBuf>> {
    let params = url.split_once('?').map_or("", |(_, params)| params);
    let special = params.split('&').any(|param| {
        matches!(
            param.split_once('='),
            Some(("mode", "ro" | "memory") | ("vfs" | "immutable", _))
        )
    });
    if special {
        return Ok(None);
    }
    // The name SQLite resolved (absolute); empty for an in-memory or
    // temporary database.
    let file: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(pool)
            .await?;
    Ok((!file.is_empty()).then(|| PathBuf::from(file)))
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_session(&self, s: &SessionRow) -> Result<()> {
        self.file_present()?;
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, created_at, expires_at, revoked_at, scope, limits, labels, allowed, denied) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.as_str())
        .bind(s.token_hash.to_hex())
        .bind(s.created_at)
        .bind(s.expires_at)
        .bind(s.revoked_at)
        .bind(encode_json(&s.scope))
        .bind(encode_json(&s.limits))
        .bind(encode_json(&s.labels))
        .bind(to_i64(s.allowed))
        .bind(to_i64(s.denied))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_by_token(&self, hash: &TokenHash) -> Result<Option<SessionRow>> {
        self.file_present()?;
        let sql = format!("SELECT {COLUMNS} FROM sessions WHERE token_hash = ?");
        let row = sqlx::query(&sql)
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::decode).transpose()
    }

    async fn session_by_id(&self, id: &SessionId) -> Result<Option<SessionRow>> {
        self.file_present()?;
        let sql = format!("SELECT {COLUMNS} FROM sessions WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::decode).transpose()
    }

    async fn list_sessions(&self, include_ended: bool, now_ms: i64) -> Result<Vec<SessionRow>> {
        self.file_present()?;
        let sql = if include_ended {
            format!("SELECT {COLUMNS} FROM sessions ORDER BY created_at DESC, id DESC")
        } else {
            format!(
                "SELECT {COLUMNS} FROM sessions WHERE revoked_at IS NULL AND expires_at > ? \
                 ORDER BY created_at DESC, id DESC"
            )
        };
        let rows = sqlx::query(&sql).bind(now_ms).fetch_all(&self.pool).await?;
        rows.iter().map(Self::decode).collect()
    }

    async fn list_sessions_page(&self, page: &SessionPage) -> Result<Vec<SessionRow>> {
        self.file_present()?;
        // Row values walk the index on (created_at, id) backwards from the
        // key (migration 7); `id` compares bytewise (BINARY), as
        // `SessionKey` does.
        let mut conditions = Vec::new();
        if !page.include_ended {
            conditions.push("revoked_at IS NULL AND expires_at > ?");
        }
        if page.after.is_some() {
            conditions.push("(created_at, id) < (?, ?)");
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM sessions {filter} ORDER BY created_at DESC, id DESC LIMIT ?"
        );
        let mut query = sqlx::query(&sql);
        if !page.include_ended {
            query = query.bind(page.now_ms);
        }
        if let Some(after) = &page.after {
            query = query.bind(after.created_at).bind(after.id.as_str());
        }
        let rows = query
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::decode).collect()
    }

    async fn revoke_session(&self, id: &SessionId, at_ms: i64) -> Result<bool> {
        self.file_present()?;
        // An expired session stays expired: revoking it changes nothing.
        sqlx::query(
            "UPDATE sessions SET revoked_at = ?1 \
             WHERE id = ?2 AND revoked_at IS NULL AND expires_at > ?1",
        )
        .bind(at_ms)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        let exists = sqlx::query("SELECT 1 FROM sessions WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(exists.is_some())
    }

    async fn add_call_counts(&self, id: &SessionId, allowed: u64, denied: u64) -> Result<()> {
        self.file_present()?;
        sqlx::query("UPDATE sessions SET allowed = allowed + ?, denied = denied + ? WHERE id = ?")
            .bind(to_i64(allowed))
            .bind(to_i64(denied))
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        self.file_present()?;
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(self.setting(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    async fn remove_setting_if(&self, key: &str, value: &str) -> Result<bool> {
        self.file_present()?;
        let done = sqlx::query("DELETE FROM settings WHERE key = ? AND value = ?")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn credential(&self, provider: &str) -> Result<Option<StoredCredential>> {
        self.file_present()?;
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT sealed, updated_at FROM credentials WHERE provider = ?")
                .bind(provider)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(sealed, updated_at)| StoredCredential { sealed, updated_at }))
    }

    async fn set_credential(&self, provider: &str, sealed: &[u8], at_ms: i64) -> Result<()> {
        self.file_present()?;
        sqlx::query(
            "INSERT INTO credentials (provider, sealed, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (provider) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
        )
        .bind(provider)
        .bind(sealed)
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_credential(&self, provider: &str) -> Result<bool> {
        self.file_present()?;
        let done = sqlx::query("DELETE FROM credentials WHERE provider = ?")
            .bind(provider)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn audit_claim_chain(&self, genesis: GenesisSeal<'_>) -> Result<ChainHead> {
        // One SQLite file has one server, so it has one chain: resume it.
        const CHAIN: u32 = 1;
        // The head is read once the journal's batches are in the database.
        self.flush_journal().await?;
        // A new chain only where none was: records (or a floor) without a
        // head mean the head was deleted, and a chain started again at
        // seq 1 would collide with them — refused below instead.
        sqlx::query(
            "INSERT INTO audit_chains (id, head_seq, head_mac, head_seal, created_at) \
             SELECT ?1, 0, ?2, ?3, ?4 \
             WHERE NOT EXISTS (SELECT 1 FROM audit_batches WHERE chain = ?1) \
             AND NOT EXISTS (SELECT 1 FROM audit_floors WHERE chain = ?1) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(i64::from(CHAIN))
        .bind(GENESIS_MAC.as_slice())
        .bind(genesis(CHAIN).as_slice())
        .bind(crate::unix_ms())
        .execute(&self.pool)
        .await?;
        let row =
            sqlx::query("SELECT id, head_seq, head_mac, head_seal FROM audit_chains WHERE id = ?")
                .bind(i64::from(CHAIN))
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(row) => decode_head(&row),
            None => Err(StoreError::Corrupt {
                what: format!("audit chain {CHAIN}"),
                reason: "its records are stored but its sealed head is gone (deleted), so the \
                         trail cannot be continued; `airlock audit verify` names it. Restore \
                         the database from a backup"
                    .to_owned(),
            }),
        }
    }

    async fn audit_use_journal(&self) -> Result<bool> {
        match &self.audit {
            Some(writer) => writer.use_journal().await,
            None => Ok(false),
        }
    }

    async fn audit_append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        match &self.audit {
            Some(writer) => writer.append(records, head).await,
            None => append_through_pool(&self.pool, records, head).await,
        }
    }

    fn audit_appends_inline(&self) -> bool {
        self.audit.is_some()
    }

    fn leases_requests(&self) -> bool {
        true
    }

    async fn reserve_requests(&self, id: &SessionId, want: u64) -> Result<u64> {
        self.file_present()?;
        // Compare and set: a grant is added only to the reservation it was
        // computed from, so concurrent grants never add up past the limit.
        // Each lost round means another grant was made: this ends when one
        // of ours lands or nothing is left.
        loop {
            let row: Option<(i64, Option<i64>)> = sqlx::query_as(
                "SELECT reserved, json_extract(limits, '$.max_requests') FROM sessions WHERE id = ?",
            )
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
            let Some((reserved, Some(max))) = row else {
                return Ok(0);
            };
            let grant = crate::lease_grant(to_u64(max), to_u64(reserved), want);
            if grant == 0 {
                return Ok(0);
            }
            let moved =
                sqlx::query("UPDATE sessions SET reserved = ? WHERE id = ? AND reserved = ?")
                    .bind(to_i64(to_u64(reserved) + grant))
                    .bind(id.as_str())
                    .bind(reserved)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            if moved == 1 {
                return Ok(grant);
            }
        }
    }

    async fn release_requests(&self, id: &SessionId, count: u64) -> Result<()> {
        self.file_present()?;
        if count == 0 {
            return Ok(());
        }
        sqlx::query("UPDATE sessions SET reserved = MAX(reserved - ?, 0) WHERE id = ?")
            .bind(to_i64(count))
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn audit_append_blocking(
        &self,
        records: &[AuditRecord],
        head: &ChainHead,
    ) -> Option<Result<()>> {
        let writer = self.audit.as_ref()?;
        Some(if records.is_empty() {
            Ok(())
        } else {
            writer.append_blocking(records, head)
        })
    }

    async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        self.file_present()?;
        self.flush_journal().await?;
        read_records(&self.pool, q).await
    }

    async fn audit_floors(&self) -> Result<Vec<ChainFloor>> {
        self.file_present()?;
        self.flush_journal().await?;
        let mut conn = self.pool.acquire().await?;
        crate::batch_trail::floors(&mut *conn).await
    }

    async fn audit_headless_chains(&self) -> Result<Vec<(u32, u64)>> {
        self.file_present()?;
        self.flush_journal().await?;
        let mut conn = self.pool.acquire().await?;
        crate::batch_trail::headless_chains(&mut *conn).await
    }

    async fn audit_prune(
        &self,
        before_ms: i64,
        seal: FloorSeal<'_>,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<Pruned>> {
        self.file_present()?;
        self.flush_journal().await?;
        let mut pruned = Vec::new();
        loop {
            // IMMEDIATE: the write lock from the start of each step, so
            // that the step never fails to upgrade a read; each step is
            // short, so the audit writer's commits wait for it briefly.
            let begin = if dry_run { "BEGIN" } else { "BEGIN IMMEDIATE" };
            let mut tx = self.pool.begin_with(begin).await?;
            let step =
                crate::batch_trail::prune_step(&mut *tx, before_ms, seal, now_ms, dry_run).await?;
            tx.commit().await?;
            let done = dry_run || step.is_empty();
            crate::batch_trail::merge_pruned(&mut pruned, step);
            if done {
                return Ok(pruned);
            }
        }
    }

    async fn audit_heads(&self) -> Result<Vec<ChainHead>> {
        self.file_present()?;
        self.flush_journal().await?;
        let rows =
            sqlx::query("SELECT id, head_seq, head_mac, head_seal FROM audit_chains ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(decode_head).collect()
    }

    async fn audit_probe(&self) -> Result<()> {
        if let Some(writer) = &self.audit {
            writer.file_present()?;
            // A journal refusing appends takes them again once it is in.
            writer.flush().await?;
        }
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ('audit_probe', ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(crate::unix_ms().to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn close(&self) {
        if let Some(writer) = &self.audit {
            writer.close().await;
        }
        crate::close_pool(&self.pool).await;
    }
}
