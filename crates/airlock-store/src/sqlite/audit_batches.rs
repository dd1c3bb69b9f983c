//! The SQLite audit trail through the pool (`batch_trail.rs` holds the
//! logic and SQL both stores share): reading, appending where the audit
//! writer does not (in-memory databases), and moving rows of the old
//! one-row-per-record table into batches when the store opens.

use airlock_core::audit::AuditRecord;
use sqlx::{SqliteConnection, SqlitePool};

use crate::audit_batch::summarise;
use crate::batch_trail::{self, TrailWrites};
use crate::{to_i64, AuditQuery, ChainHead, Result, StoreError};

/// The chain's running maximum of `ts` so far: the last batch's `ts_max`.
pub(super) const LAST_TS_MAX: &str =
    "SELECT ts_max FROM audit_batches WHERE chain = ?1 ORDER BY first_seq DESC LIMIT 1";

/// [`crate::Store::audit_records`] on SQLite, on one pooled connection.
pub(super) async fn read_records(pool: &SqlitePool, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    let mut conn = pool.acquire().await?;
    batch_trail::read_records(&mut *conn, q).await
}

batch_trail::impl_batch_trail!(
    SqliteConnection,
    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'"
);

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
        // Outside a transaction, so another process opening the file at
        // the same moment may have dropped it first.
        sqlx::query("DROP TABLE IF EXISTS audit_records")
            .execute(&mut *conn)
            .await?;
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
