//! The PostgreSQL store: one database shared by any number of `airlock
//! serve` processes (replicas).
//!
//! - Migrations run at open on a dedicated connection under sqlx's
//!   migrator, which holds `pg_advisory_lock` for the database while it
//!   works, so replicas starting at once apply each migration exactly once.
//!   The connection is closed afterwards, releasing the lock even when a
//!   migration failed.
//! - Changes to sessions are announced by a trigger (`pg_notify` on the
//!   `airlock_changes` channel, sent when the transaction commits), whatever
//!   statement made them; [`feed`] LISTENs and turns them into [`Change`]s.
//! - `max_denied` is applied to the stored totals by the statement that adds
//!   the counts ([`Store::record_calls`]); `max_requests` is handed out in
//!   leases ([`Store::reserve_requests`]) that never add up to more than the
//!   limit.
//! - Audit: each process owns one chain while it holds a session-level
//!   advisory lock on it, see [`PgStore::audit_claim_chain`].

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::AuditRecord;
use airlock_core::{SessionId, TokenHash};
use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::Connection;
use tokio::sync::broadcast;

use crate::audit_rows::decode_head;
use crate::batch_trail;
use crate::session_rows::{decode_session, decode_status, SESSION_COLUMNS, STATUS_COLUMNS};
use crate::{
    encode_json, to_i64, to_u64, AuditQuery, ChainFloor, ChainHead, Change, ChangeCursor,
    FloorSeal, GenesisSeal, Pruned, Result, SessionChanges, SessionPage, SessionRow, SessionStatus,
    Store, StoredCredential,
};
use chain::ChainOwner;

mod audit_batches;
mod chain;
mod feed;

/// Connections of the main pool, per process.
const MAX_CONNECTIONS: u32 = 8;
/// How long a statement may wait for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle pooled connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Changes buffered per receiver before it is told to resync.
const FEED_CAPACITY: usize = 4096;
/// Changed sessions one [`Store::session_changes`] reads at most; more, and
/// it says it is incomplete (the reader then reads everything it caches).
const CHANGES_MAX: i64 = 10_000;
/// A lease never exceeds this many calls, nor an eighth of what is left
/// (but is at least one call).
const LEASE_DIVISOR: i64 = 8;

/// A store in one PostgreSQL database, shared by every replica.
pub struct PgStore {
    pool: PgPool,
    changes: broadcast::Sender<Change>,
    feed: tokio::task::AbortHandle,
    /// This process's audit chain.
    chain: Arc<ChainOwner>,
    /// Keeps the chain's lock held across lost connections.
    keeper: tokio::task::AbortHandle,
}

/// The advisory lock (one-key space, as sqlx's migrator's) that steps of
/// `audit prune` take for their transaction.
const PRUNE_LOCK: i64 = 0x4149_524c_5052_554e; // "AIRLPRUN"

/// The PostgreSQL schema's migrations: version, description, SQL.
const MIGRATIONS: [(i64, &str, &str); 9] = [
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "audit",
        include_str!("../migrations/postgres/0002_audit.sql"),
    ),
    (
        3,
        "credentials",
        include_str!("../migrations/postgres/0003_credentials.sql"),
    ),
    (
        4,
        "audit batches",
        include_str!("../migrations/postgres/0004_audit_batches.sql"),
    ),
    (
        5,
        "sessions by creation",
        include_str!("../migrations/postgres/0005_sessions_by_creation.sql"),
    ),
    (
        6,
        "session changes",
        include_str!("../migrations/postgres/0006_session_changes.sql"),
    ),
    (
        7,
        "audit floors",
        include_str!("../migrations/postgres/0007_audit_floors.sql"),
    ),
    (
        8,
        "session change denied",
        include_str!("../migrations/postgres/0008_session_change_denied.sql"),
    ),
    (
        9,
        "credential removed",
        include_str!("../migrations/postgres/0009_credential_removed.sql"),
    ),
];

fn migrator() -> Migrator {
    migrator_up_to(i64::MAX)
}

/// The PostgreSQL migrations up to `version`: the schema an older airlock
/// left (for tests of what opening such a database does).
#[doc(hidden)]
pub fn migrator_up_to(version: i64) -> Migrator {
    // sqlx's migrator takes pg_advisory_lock for the database while
    // migrating.
    crate::migrator_of(&MIGRATIONS, version)
}

// === impl PgStore ===

impl PgStore {
    /// Connects to the database at `url` (`postgres://…` or
    /// `postgresql://…`), brings its schema up to date and starts listening
    /// for changes. Must be called inside a Tokio runtime.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, true).await
    }

    /// Opens the database at `url` only if airlock's schema is there
    /// ([`StoreError::NoStore`] otherwise, and nothing is created), for
    /// commands that read what `serve` stored: an empty database must not
    /// be given airlock's tables and then reported on as an empty trail.
    pub async fn open_existing(url: &str) -> Result<Self> {
        Self::open_with(url, false).await
    }

    async fn open_with(url: &str, create: bool) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)?.application_name("airlock");
        {
            // A connection of its own: closing it releases the migration
            // lock whatever happened.
            let mut conn = PgConnection::connect_with(&options).await?;
            if !create && !has_schema(&mut conn).await? {
                let _ = conn.close().await;
                return Err(crate::StoreError::NoStore(
                    crate::url_for_display(url).into_owned(),
                ));
            }
            let migrated = match migrator().run_direct(&mut conn).await {
                Ok(()) => audit_batches::convert_legacy(&mut conn).await,
                Err(e) => Err(e.into()),
            };
            let _ = conn.close().await;
            migrated?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(IDLE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let (changes, _) = broadcast::channel(FEED_CAPACITY);
        let feed = tokio::spawn(feed::run(options.clone(), changes.clone())).abort_handle();
        let chain = Arc::new(ChainOwner::new(options));
        let keeper = tokio::spawn({
            let chain = Arc::clone(&chain);
            async move { chain.keep().await }
        })
        .abort_handle();
        Ok(Self {
            pool,
            changes,
            feed,
            chain,
            keeper,
        })
    }
}

/// Whether the database holds airlock's schema where the migrations would
/// run (the first schema of the search path that exists): sqlx's record of
/// the migrations and the audit chains. Another program's
/// `_sqlx_migrations`, or one later in the search path, is not airlock's.
async fn has_schema(conn: &mut PgConnection) -> Result<bool> {
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema() \
         AND tablename IN ('_sqlx_migrations', 'audit_chains')",
    )
    .fetch_one(conn)
    .await?;
    Ok(found == 2)
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.feed.abort();
        self.keeper.abort();
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert_session(&self, s: &SessionRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, created_at, expires_at, revoked_at, scope, \
             limits, labels, allowed, denied, max_requests, max_denied) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
        .bind(s.limits.max_requests.map(to_i64))
        .bind(s.limits.max_denied.map(to_i64))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_by_token(&self, hash: &TokenHash) -> Result<Option<SessionRow>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE token_hash = $1");
        let row = sqlx::query(&sql)
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_session).transpose()
    }

    async fn session_by_id(&self, id: &SessionId) -> Result<Option<SessionRow>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_session).transpose()
    }

    async fn list_sessions(&self, include_ended: bool, now_ms: i64) -> Result<Vec<SessionRow>> {
        let rows = if include_ended {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions \
                 ORDER BY created_at DESC, id COLLATE \"C\" DESC"
            );
            sqlx::query(&sql).fetch_all(&self.pool).await?
        } else {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE revoked_at IS NULL AND expires_at > $1 \
                 ORDER BY created_at DESC, id COLLATE \"C\" DESC"
            );
            sqlx::query(&sql).bind(now_ms).fetch_all(&self.pool).await?
        };
        rows.iter().map(decode_session).collect()
    }

    async fn list_sessions_page(&self, page: &SessionPage) -> Result<Vec<SessionRow>> {
        // The row comparison walks the index on (created_at, id COLLATE "C")
        // backwards from the key (migration 5). `id` compares bytewise
        // whatever the database's collation, as `SessionKey` does.
        let mut conditions = Vec::new();
        let mut arg = 0;
        let mut next_arg = || {
            arg += 1;
            arg
        };
        if !page.include_ended {
            conditions.push(format!(
                "revoked_at IS NULL AND expires_at > ${}",
                next_arg()
            ));
        }
        if page.after.is_some() {
            let (at, id) = (next_arg(), next_arg());
            conditions.push(format!("(created_at, id COLLATE \"C\") < (${at}, ${id})"));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions {filter} \
             ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT ${}",
            next_arg()
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
        rows.iter().map(decode_session).collect()
    }

    async fn revoke_session(&self, id: &SessionId, at_ms: i64) -> Result<bool> {
        // The trigger on `sessions` tells every replica when this commits.
        let exists: bool = sqlx::query_scalar(
            "WITH revoked AS ( \
                 UPDATE sessions SET revoked_at = $2 \
                 WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2 \
                 RETURNING 1 \
             ) SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)",
        )
        .bind(id.as_str())
        .bind(at_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(exists)
    }

    async fn add_call_counts(&self, id: &SessionId, allowed: u64, denied: u64) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET allowed = allowed + $2, denied = denied + $3 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(to_i64(allowed))
        .bind(to_i64(denied))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(self.setting(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    async fn remove_setting_if(&self, key: &str, value: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM settings WHERE key = $1 AND value = $2")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn credential(&self, provider: &str) -> Result<Option<StoredCredential>> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT sealed, updated_at FROM credentials WHERE provider = $1")
                .bind(provider)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(sealed, updated_at)| StoredCredential { sealed, updated_at }))
    }

    async fn set_credential(&self, provider: &str, sealed: &[u8], at_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO credentials (provider, sealed, updated_at) VALUES ($1, $2, $3) \
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
        let done = sqlx::query("DELETE FROM credentials WHERE provider = $1")
            .bind(provider)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Several processes share the database, so each owns a chain of its
    /// own: the one it held before if it still can, else the
    /// lowest-numbered chain whose advisory lock nobody holds (resumed at
    /// its head), else a new one (id from a sequence). The lock is
    /// session-level, held on a connection kept open for the process's
    /// lifetime; PostgreSQL releases it when that connection ends, however
    /// it ends, so a crashed replica's chain is resumed by the next one. A
    /// keeper takes the lock again when that connection dies.
    ///
    /// Meanwhile another process may take the chain over.
    /// [`Store::audit_append`] moves the head only from the seq it expects
    /// (`WHERE head_seq = previous`), so two writers can never interleave
    /// records: the one behind gets [`crate::StoreError::ChainConflict`] and must
    /// claim again.
    async fn audit_claim_chain(&self, genesis: GenesisSeal<'_>) -> Result<ChainHead> {
        self.chain.claim(genesis).await
    }

    /// One statement: the guarded head update, the batch and its session
    /// index rows (see `postgres/audit_batches.rs`).
    async fn audit_append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        if !self.chain.may_append(head.chain) {
            return Err(crate::StoreError::ChainConflict(head.chain));
        }
        // Failing here, nothing was sent: the writer may send it again.
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(crate::StoreError::Unreachable)?;
        audit_batches::append(&mut conn, records, head).await
    }

    async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut conn = self.pool.acquire().await?;
        batch_trail::read_records(&mut *conn, q).await
    }

    async fn audit_floors(&self) -> Result<Vec<ChainFloor>> {
        let mut conn = self.pool.acquire().await?;
        batch_trail::floors(&mut *conn).await
    }

    async fn audit_headless_chains(&self) -> Result<Vec<(u32, u64)>> {
        let mut conn = self.pool.acquire().await?;
        batch_trail::headless_chains(&mut *conn).await
    }

    async fn audit_prune(
        &self,
        before_ms: i64,
        seal: FloorSeal<'_>,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<Pruned>> {
        let mut pruned = Vec::new();
        loop {
            // A step at a time, each its own short transaction; the steps
            // of prunes running at once take turns (as SQLite's write lock
            // makes them), so that each step reads what the last one left.
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PRUNE_LOCK)
                .execute(&mut *tx)
                .await?;
            let step = batch_trail::prune_step(&mut *tx, before_ms, seal, now_ms, dry_run).await?;
            tx.commit().await?;
            let done = dry_run || step.is_empty();
            batch_trail::merge_pruned(&mut pruned, step);
            if done {
                return Ok(pruned);
            }
        }
    }

    async fn audit_heads(&self) -> Result<Vec<ChainHead>> {
        let rows =
            sqlx::query("SELECT id, head_seq, head_mac, head_seal FROM audit_chains ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(decode_head).collect()
    }

    async fn audit_probe(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ('audit_probe', $1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(crate::unix_ms().to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn close(&self) {
        self.feed.abort();
        self.keeper.abort();
        self.chain.release().await;
        crate::close_pool(&self.pool).await;
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    async fn record_calls(
        &self,
        id: &SessionId,
        allowed: u64,
        denied: u64,
        now_ms: i64,
    ) -> Result<Option<SessionStatus>> {
        // `denied + $3` is the new total: the right-hand sides see the row
        // as it was. Crossing max_denied revokes in this very statement, and
        // the trigger announces it to every replica.
        let sql = format!(
            "UPDATE sessions SET allowed = allowed + $2, denied = denied + $3, \
             revoked_at = CASE \
                 WHEN revoked_at IS NULL AND max_denied IS NOT NULL AND denied + $3 >= max_denied \
                 THEN $4 ELSE revoked_at END \
             WHERE id = $1 RETURNING {STATUS_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(to_i64(allowed))
            .bind(to_i64(denied))
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_status).transpose()
    }

    async fn reserve_requests(&self, id: &SessionId, want: u64) -> Result<u64> {
        // The row lock taken by UPDATE serialises replicas; the CHECK on
        // the table backs the arithmetic.
        let granted: Option<i64> = sqlx::query_scalar(
            "WITH grant_size AS ( \
                 SELECT id, LEAST($2, GREATEST(1, (max_requests - reserved) / $3), \
                                  max_requests - reserved) AS n \
                 FROM sessions \
                 WHERE id = $1 AND max_requests IS NOT NULL AND reserved < max_requests \
                 FOR UPDATE \
             ) \
             UPDATE sessions s SET reserved = s.reserved + g.n FROM grant_size g \
             WHERE s.id = g.id RETURNING g.n",
        )
        .bind(id.as_str())
        .bind(to_i64(want.max(1)))
        .bind(LEASE_DIVISOR)
        .fetch_optional(&self.pool)
        .await?;
        Ok(granted.map_or(0, to_u64))
    }

    async fn release_requests(&self, id: &SessionId, count: u64) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        sqlx::query("UPDATE sessions SET reserved = GREATEST(reserved - $2, 0) WHERE id = $1")
            .bind(id.as_str())
            .bind(to_i64(count))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn session_statuses(&self, ids: &[SessionId]) -> Result<Vec<SessionStatus>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT {STATUS_COLUMNS} FROM sessions WHERE id = ANY($1)");
        let rows = sqlx::query(&sql)
            .bind(ids.iter().map(SessionId::as_str).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_status).collect()
    }

    /// One statement, so one snapshot: its horizon (the oldest transaction
    /// still running, `txid_snapshot_xmin`) and the rows whose `change_xid`
    /// (set by a trigger, migration 6) is at or above the previous
    /// horizon, found on the partial index `sessions_change_xid`, or whose
    /// id was asked for. A transaction this snapshot does not see is at or
    /// above its horizon, so the next read finds what it changed.
    async fn session_changes(
        &self,
        since: Option<ChangeCursor>,
        ids: &[SessionId],
    ) -> Result<Option<SessionChanges>> {
        // Each branch on its index: the changed rows in `change_xid` order
        // (the order and the limit make the index the plan whatever the
        // statistics say), the ones asked for by primary key.
        let sql = format!(
            "SELECT h.horizon, s.changed, s.id, s.revoked_at, s.expires_at, s.allowed, s.denied \
             FROM (SELECT txid_snapshot_xmin(txid_current_snapshot()) AS horizon) h \
             LEFT JOIN ( \
                 (SELECT TRUE AS changed, {STATUS_COLUMNS} FROM sessions \
                  WHERE change_xid >= $1 ORDER BY change_xid LIMIT $3) \
                 UNION ALL \
                 (SELECT FALSE AS changed, {STATUS_COLUMNS} FROM sessions WHERE id = ANY($2)) \
             ) s ON TRUE"
        );
        // Without statistics on `change_xid` (a table never analysed) the
        // planner guesses a third of the table changed and scans all of it;
        // in this transaction only, it must use the indexes.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(&sql)
            .bind(since.map(|c| c.0))
            .bind(ids.iter().map(SessionId::as_str).collect::<Vec<_>>())
            .bind(CHANGES_MAX)
            // Planned for its cursor each time (an unnamed statement).
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut changes = SessionChanges {
            complete: true,
            ..SessionChanges::default()
        };
        let mut changed = 0;
        for row in &rows {
            let horizon: i64 = sqlx::Row::try_get(row, "horizon")?;
            changes.next = Some(ChangeCursor(horizon));
            let id: Option<String> = sqlx::Row::try_get(row, "id")?;
            if id.is_some() {
                if sqlx::Row::try_get::<bool, _>(row, "changed")? {
                    changed += 1;
                }
                changes.statuses.push(decode_status(row)?);
            }
        }
        changes.complete = changed < CHANGES_MAX;
        Ok(Some(changes))
    }
}
