//! The SQLite audit trail through the pool: reading records out of their
//! batches, appending where the audit writer does not (in-memory
//! databases), and moving rows of the old one-row-per-record table into
//! batches.
//!
//! Reads rely on one property of a chain, which the audit writer keeps: a
//! record's `ts` is never earlier than its predecessor's, so seq order is
//! time order and the batches holding records from a given time on are a
//! suffix of the chain, found through `audit_batches_ts`. (Batches moved
//! from the old format, whose `ts` may step back, store the running
//! maximum as `ts_max`: the seek stays exact, the order is seq order.)

use airlock_core::audit::AuditRecord;
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use super::to_i64;
use crate::audit_batch::{decode_batch, encode_batch, sessions, summarise, BatchSummary};
use crate::audit_rows::{decode_record, RECORD_COLUMNS};
use crate::{AuditQuery, ChainHead, Result, StoreError};

/// Batches read per query while collecting records.
const PAGE: i64 = 64;
/// Old rows moved per batch when converting.
const LEGACY_BATCH: i64 = 512;

/// [`crate::Store::audit_records`] on SQLite.
pub(super) async fn read_records(pool: &SqlitePool, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    let chains: Vec<u32> = match q.chain {
        Some(chain) => vec![chain],
        None => sqlx::query_scalar::<_, i64>("SELECT id FROM audit_chains ORDER BY id")
            .fetch_all(pool)
            .await?
            .into_iter()
            .filter_map(|id| u32::try_from(id).ok())
            .collect(),
    };
    for &chain in &chains {
        read_chain(pool, chain, q, limit, &mut found).await?;
    }
    if q.chain.is_none() && chains.len() > 1 {
        // Each chain's records came in time order; interleave the chains.
        found.sort_by_key(|r| (r.ts_ms, r.chain, r.seq));
        found.truncate(limit);
    }
    Ok(found)
}

/// Appends up to `limit` records of `chain` that `q` selects to `found`,
/// in seq order.
async fn read_chain(
    pool: &SqlitePool,
    chain: u32,
    q: &AuditQuery,
    limit: usize,
    found: &mut Vec<AuditRecord>,
) -> Result<()> {
    let chain_id = i64::from(chain);
    let after_seq = if q.chain.is_some() { q.after_seq } else { 0 };
    // The batch holding the first seq wanted ...
    let mut from: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(first_seq), 0) FROM audit_batches WHERE chain = ? AND first_seq <= ?",
    )
    .bind(chain_id)
    .bind(to_i64(after_seq.saturating_add(1)))
    .fetch_one(pool)
    .await?;
    // ... or, if later, the first batch with a record at or after `since`.
    if let Some(since) = q.since_ms {
        let first: Option<i64> = sqlx::query_scalar(
            "SELECT first_seq FROM audit_batches WHERE chain = ? AND ts_max >= ? \
             ORDER BY ts_max, rowid LIMIT 1",
        )
        .bind(chain_id)
        .bind(since)
        .fetch_optional(pool)
        .await?;
        match first {
            Some(first) => from = from.max(first),
            None => return Ok(()),
        }
    }
    let wanted = |r: &AuditRecord| {
        r.seq > after_seq
            && q.since_ms.is_none_or(|since| r.ts_ms >= since)
            && q.session
                .as_deref()
                .is_none_or(|session| r.session.as_deref() == Some(session))
    };
    let target = found.len().saturating_add(limit);
    let mut decoded = Vec::new();
    loop {
        let page = match &q.session {
            Some(session) => {
                sqlx::query(
                    "SELECT b.first_seq, b.records FROM audit_batch_sessions s \
                     JOIN audit_batches b ON b.chain = s.chain AND b.first_seq = s.first_seq \
                     WHERE s.session = ? AND s.chain = ? AND s.first_seq >= ? \
                     ORDER BY s.first_seq LIMIT ?",
                )
                .bind(session.as_str())
                .bind(chain_id)
                .bind(from)
                .bind(PAGE)
                .fetch_all(pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT first_seq, records FROM audit_batches \
                     WHERE chain = ? AND first_seq >= ? ORDER BY first_seq LIMIT ?",
                )
                .bind(chain_id)
                .bind(from)
                .bind(PAGE)
                .fetch_all(pool)
                .await?
            }
        };
        for row in &page {
            let first_seq: i64 = row.try_get("first_seq")?;
            let bytes: &[u8] = row.try_get("records")?;
            decoded.clear();
            decode_batch(chain, bytes, &mut decoded).map_err(|e| StoreError::UnreadableAudit {
                chain,
                seq: u64::try_from(first_seq).unwrap_or(0),
                reason: format!("the batch from this record on does not decode: {e}"),
            })?;
            for record in decoded.drain(..) {
                if wanted(&record) {
                    found.push(record);
                    if found.len() >= target {
                        return Ok(());
                    }
                }
            }
            from = first_seq.saturating_add(1);
        }
        if i64::try_from(page.len()).unwrap_or(i64::MAX) < PAGE {
            return Ok(());
        }
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
    insert_batch(&mut tx, records, head).await?;
    tx.commit().await?;
    Ok(())
}

/// Inserts `records`, which end at `head`, as one batch.
async fn insert_batch(
    tx: &mut Transaction<'_, Sqlite>,
    records: &[AuditRecord],
    head: &ChainHead,
) -> Result<()> {
    let summary = summarise(records, head)?;
    write_batch(tx, head.chain, &summary, records).await
}

/// Inserts old rows of `chain` as one batch, as they are. Their `ts` may
/// step back now and then (the writer did not always keep it from doing
/// so): the batch's `ts_max` is at least `floor`, the `ts_max` of the
/// batch before it, so that `ts_max` never decreases along a chain and
/// the time seek stays exact. Returns the batch's `ts_max`.
pub(crate) async fn insert_legacy_batch(
    tx: &mut Transaction<'_, Sqlite>,
    records: &[AuditRecord],
    chain: u32,
    floor: i64,
) -> Result<i64> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(floor);
    };
    let summary = BatchSummary {
        first_seq: first.seq,
        last_seq: last.seq,
        ts_max: records.iter().map(|r| r.ts_ms).fold(floor, i64::max),
    };
    write_batch(tx, chain, &summary, records).await?;
    Ok(summary.ts_max)
}

async fn write_batch(
    tx: &mut Transaction<'_, Sqlite>,
    chain: u32,
    summary: &BatchSummary,
    records: &[AuditRecord],
) -> Result<()> {
    let mut encoded = Vec::new();
    encode_batch(records, &mut encoded).map_err(|e| StoreError::Corrupt {
        what: "audit batch".to_owned(),
        reason: e.to_string(),
    })?;
    let first = to_i64(summary.first_seq);
    sqlx::query(
        "INSERT INTO audit_batches (chain, first_seq, last_seq, ts_max, records) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(i64::from(chain))
    .bind(first)
    .bind(to_i64(summary.last_seq))
    .bind(summary.ts_max)
    .bind(encoded)
    .execute(&mut **tx)
    .await?;
    for session in sessions(records) {
        sqlx::query(
            "INSERT INTO audit_batch_sessions (session, chain, first_seq) VALUES (?, ?, ?)",
        )
        .bind(session)
        .bind(i64::from(chain))
        .bind(first)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Moves the rows of `audit_records` (the trail's format before batches)
/// into batches and drops the table, in one transaction; nothing to do
/// once it is gone.
pub(super) async fn convert_legacy(pool: &SqlitePool) -> Result<()> {
    let legacy: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'",
    )
    .fetch_one(pool)
    .await?;
    if legacy == 0 {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let mut moved = 0_u64;
    let mut after = (0_i64, 0_i64);
    let mut floor = i64::MIN;
    let mut current_chain = 0;
    loop {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM audit_records WHERE (chain, seq) > (?, ?) \
             ORDER BY chain, seq LIMIT ?"
        ))
        .bind(after.0)
        .bind(after.1)
        .bind(LEGACY_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let records = rows.iter().map(decode_record).collect::<Result<Vec<_>>>()?;
        let Some(last) = records.last() else {
            break;
        };
        after = (i64::from(last.chain), to_i64(last.seq));
        for batch in records.chunk_by(|a, b| a.chain == b.chain) {
            if let Some(first) = batch.first() {
                if first.chain != current_chain {
                    (current_chain, floor) = (first.chain, i64::MIN);
                }
                // Old rows are moved as they are, gaps and all: verifying
                // is what judges them.
                floor = insert_legacy_batch(&mut tx, batch, first.chain, floor).await?;
            }
        }
        moved += records.len() as u64;
    }
    sqlx::query("DROP TABLE audit_records")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if moved > 0 {
        tracing::info!(records = moved, "audit records moved into batches");
    }
    Ok(())
}
