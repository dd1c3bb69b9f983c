//! The SQLite audit trail's SQL: the batch trail's queries and writes
//! (`batch_trail.rs` holds the logic both stores share), appending where
//! the audit writer does not (in-memory databases), and moving rows of the
//! old one-row-per-record table into batches when the store opens.

use airlock_core::audit::AuditRecord;
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::audit_batch::{summarise, BatchSummary};
use crate::audit_rows::{decode_record, RECORD_COLUMNS};
use crate::batch_trail::{self, indexed_query, BatchRows, Stored, TrailWrites};
use crate::{to_i64, AuditQuery, ChainHead, Result, StoreError};

/// Inserts a batch: chain, first and last seq, `ts_max`, the encoded records.
pub(super) const INSERT_BATCH: &str =
    "INSERT INTO audit_batches (chain, first_seq, last_seq, ts_max, records) \
     VALUES (?1, ?2, ?3, ?4, ?5)";
/// Names a batch (chain, first seq) under a session it holds.
pub(super) const INSERT_SESSION: &str =
    "INSERT INTO audit_batch_sessions (session, chain, first_seq) VALUES (?1, ?2, ?3)";
/// The chain's running maximum of `ts` so far: the last batch's `ts_max`.
pub(super) const LAST_TS_MAX: &str =
    "SELECT ts_max FROM audit_batches WHERE chain = ?1 ORDER BY first_seq DESC LIMIT 1";

/// [`crate::Store::audit_records`] on SQLite, on one pooled connection.
pub(super) async fn read_records(pool: &SqlitePool, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    let mut conn = pool.acquire().await?;
    batch_trail::read_records(&mut *conn, q).await
}

impl BatchRows for SqliteConnection {
    async fn chains(&mut self) -> Result<Vec<i64>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM audit_chains ORDER BY id")
                .fetch_all(self)
                .await?,
        )
    }

    async fn batch_at(&mut self, chain: i64, seq: i64) -> Result<Option<(i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT first_seq, ts_max FROM audit_batches \
             WHERE chain = ? AND first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
        )
        .bind(chain)
        .bind(seq)
        .fetch_optional(self)
        .await?)
    }

    async fn batch_before(&mut self, chain: i64, first_seq: i64) -> Result<Option<Stored>> {
        Ok(sqlx::query_as(
            "SELECT first_seq, last_seq, ts_max, NULL AS records FROM audit_batches \
             WHERE chain = ? AND first_seq < ? ORDER BY first_seq DESC LIMIT 1",
        )
        .bind(chain)
        .bind(first_seq)
        .fetch_optional(self)
        .await?)
    }

    async fn batches_from(
        &mut self,
        chain: i64,
        from: i64,
        session: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Stored>> {
        let query = match session {
            Some(session) => sqlx::query_as(
                "SELECT s.first_seq, b.last_seq, b.ts_max, b.records \
                 FROM audit_batch_sessions s LEFT JOIN audit_batches b \
                 ON b.chain = s.chain AND b.first_seq = s.first_seq \
                 WHERE s.session = ? AND s.chain = ? AND s.first_seq >= ? \
                 ORDER BY s.first_seq LIMIT ?",
            )
            .bind(session),
            None => sqlx::query_as(
                "SELECT first_seq, last_seq, ts_max, records FROM audit_batches \
                 WHERE chain = ? AND first_seq >= ? ORDER BY first_seq LIMIT ?",
            ),
        };
        Ok(query
            .bind(chain)
            .bind(from)
            .bind(limit)
            .fetch_all(self)
            .await?)
    }

    async fn indexed(&mut self, chain: i64, pairs: &[(&str, i64)]) -> Result<Vec<(i64, String)>> {
        Ok(indexed_query(chain, pairs)
            .build_query_as()
            .fetch_all(self)
            .await?)
    }
}

impl TrailWrites for SqliteConnection {
    async fn insert_batch(
        &mut self,
        chain: i64,
        summary: &BatchSummary,
        encoded: &[u8],
        sessions: &[&str],
    ) -> Result<()> {
        let first = to_i64(summary.first_seq);
        sqlx::query(INSERT_BATCH)
            .bind(chain)
            .bind(first)
            .bind(to_i64(summary.last_seq))
            .bind(summary.ts_max)
            .bind(encoded)
            .execute(&mut *self)
            .await?;
        for session in sessions {
            sqlx::query(INSERT_SESSION)
                .bind(*session)
                .bind(chain)
                .bind(first)
                .execute(&mut *self)
                .await?;
        }
        Ok(())
    }

    async fn legacy_exists(&mut self) -> Result<bool> {
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'",
        )
        .fetch_one(self)
        .await?;
        Ok(tables > 0)
    }

    async fn legacy_rows(
        &mut self,
        after: (i64, i64),
        limit: i64,
    ) -> Result<Vec<((i64, i64), Result<AuditRecord>)>> {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM audit_records WHERE (chain, seq) > (?, ?) \
             ORDER BY chain, seq LIMIT ?"
        ))
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(self)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    (row.try_get("chain")?, row.try_get("seq")?),
                    decode_record(row),
                ))
            })
            .collect()
    }

    async fn keep_aside(&mut self, (chain, seq): (i64, i64)) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS audit_records_unreadable AS \
             SELECT * FROM audit_records WHERE 0",
        )
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO audit_records_unreadable SELECT * FROM audit_records \
             WHERE chain = ? AND seq = ?",
        )
        .bind(chain)
        .bind(seq)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn drop_legacy(&mut self) -> Result<()> {
        sqlx::query("DROP TABLE audit_records")
            .execute(self)
            .await?;
        Ok(())
    }
}

/// Appends `records` and moves the chain head, in one transaction of the
/// pool's: for databases the audit writer does not handle.
pub(super) async fn append_through_pool(
    pool: &SqlitePool,
    records: &[AuditRecord],
    head: &ChainHead,
) -> Result<()> {
    let Some(first) = records.first() else {
        return Ok(());
    };
    let mut summary = summarise(records, head)?;
    let mut tx = pool.begin().await?;
    // Move the head first: a writer that is not at the head learns it
    // before inserting anything (and never trips over existing seqs).
    let moved = sqlx::query(
        "UPDATE audit_chains SET head_seq = ?, head_mac = ?, head_seal = ? \
         WHERE id = ? AND head_seq = ?",
    )
    .bind(to_i64(head.seq))
    .bind(head.mac.as_slice())
    .bind(head.seal.as_slice())
    .bind(i64::from(head.chain))
    .bind(to_i64(first.seq.saturating_sub(1)))
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::ChainConflict(head.chain));
    }
    let before: Option<i64> = sqlx::query_scalar(LAST_TS_MAX)
        .bind(i64::from(head.chain))
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(before) = before {
        summary.ts_max = summary.ts_max.max(before);
    }
    batch_trail::write_batch(&mut *tx, head.chain, &summary, records).await?;
    tx.commit().await?;
    Ok(())
}

/// Moves a trail of the old format into batches (see
/// [`batch_trail::convert_legacy`]), in one transaction.
pub(super) async fn convert_legacy(pool: &SqlitePool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    if !conn.legacy_exists().await? {
        return Ok(());
    }
    let rows: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM audit_records)")
        .fetch_one(&mut *conn)
        .await?;
    if rows == 0 {
        // A new database (migration 2 made the table): nothing to move.
        conn.drop_legacy().await?;
        return Ok(());
    }
    drop(conn);
    // IMMEDIATE: another process opening the same file waits for this
    // conversion instead of racing it (which is why the table is looked
    // for again inside it).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let done = batch_trail::convert_legacy(&mut *tx).await?;
    tx.commit().await?;
    batch_trail::log_conversion(done);
    Ok(())
}
