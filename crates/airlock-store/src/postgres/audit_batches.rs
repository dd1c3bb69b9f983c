//! The PostgreSQL audit trail (`batch_trail.rs` holds the logic and SQL
//! both stores share): the append (one statement), and moving rows of the
//! old one-row-per-record table into batches when a store opens.

use airlock_core::audit::AuditRecord;
use sqlx::{Connection, PgConnection};

use super::chain::CHAIN_LOCK_CLASS;
use crate::audit_batch::{encode_batch, sessions, summarise};
use crate::batch_trail::{self, TrailWrites};
use crate::{to_i64, ChainHead, Result, StoreError};

/// The second key of the transaction-level advisory lock held while moving
/// old rows into batches (chain ids, the second key of the chain locks,
/// start at 1).
const CONVERSION_LOCK: i32 = 0;

/// Appends `records`, which end at `head`, in one statement (so one round
/// trip, atomic without a transaction of its own): the guarded head
/// update, the batch row and its session rows, the inserts conditional on
/// the update. A writer that is not at the head inserts nothing and gets
/// [`StoreError::ChainConflict`]; the row lock serialises writers of one
/// chain. The batch's `ts_max` is the running maximum along the chain,
/// taken from the batch before it.
pub(super) async fn append(
    conn: &mut PgConnection,
    records: &[AuditRecord],
    head: &ChainHead,
) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let summary = summarise(records, head)?;
    let mut encoded = Vec::new();
    encode_batch(records, &mut encoded)?;
    let named: Vec<&str> = sessions(records).collect();
    let moved: i64 = sqlx::query_scalar(
        "WITH moved AS ( \
             UPDATE audit_chains SET head_seq = $1, head_mac = $2, head_seal = $3 \
             WHERE id = $4 AND head_seq = $5 RETURNING id), \
         batch AS ( \
             INSERT INTO audit_batches (chain, first_seq, last_seq, ts_max, records) \
             SELECT id, $6, $1, GREATEST($7, (SELECT ts_max FROM audit_batches \
                 WHERE chain = $4 ORDER BY first_seq DESC LIMIT 1)), $8 FROM moved), \
         named AS ( \
             INSERT INTO audit_batch_sessions (session, chain, first_seq) \
             SELECT s, id, $6 FROM moved, UNNEST($9::text[]) AS s) \
         SELECT count(*) FROM moved",
    )
    .bind(to_i64(head.seq))
    .bind(head.mac.as_slice())
    .bind(head.seal.as_slice())
    .bind(i64::from(head.chain))
    .bind(to_i64(summary.first_seq.saturating_sub(1)))
    .bind(to_i64(summary.first_seq))
    .bind(summary.ts_max)
    .bind(&encoded)
    .bind(&named)
    .fetch_one(conn)
    .await?;
    if moved != 1 {
        return Err(StoreError::ChainConflict(head.chain));
    }
    Ok(())
}

/// Moves a trail of the old format into batches (see
/// [`batch_trail::convert_legacy`]), in one transaction under an advisory
/// lock, so that replicas starting at once convert it once. The old table
/// is locked against writes first: an older airlock still running cannot
/// add a row that would be dropped unread (its appends fail from then on,
/// and it refuses calls, until it is upgraded too).
pub(super) async fn convert_legacy(conn: &mut PgConnection) -> Result<()> {
    if !conn.legacy_exists().await? {
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(CHAIN_LOCK_CLASS)
        .bind(CONVERSION_LOCK)
        .execute(&mut *tx)
        .await?;
    // Looked for again under the lock: another replica may have been first.
    if !tx.legacy_exists().await? {
        return Ok(());
    }
    sqlx::query("LOCK TABLE audit_records IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let done = batch_trail::convert_legacy(&mut *tx).await?;
    tx.commit().await?;
    batch_trail::log_conversion(done);
    Ok(())
}

batch_trail::impl_batch_trail!(
    PgConnection,
    // A scan of the catalog under the statement's snapshot, not a cache
    // lookup (`to_regclass`): after waiting for the conversion lock, it
    // sees the table another replica just dropped as gone.
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables \
     WHERE schemaname = current_schema() AND tablename = 'audit_records')"
);
