//! The SQLite audit trail through the pool: reading records out of their
//! batches, appending where the audit writer does not (in-memory
//! databases), and moving rows of the old one-row-per-record table into
//! batches.
//!
//! A batch's `ts_max` is the running maximum of `ts` along its chain up to
//! and including the batch (a record's `ts` is when its call ended, so it
//! may step back a little from one record to the next, or a lot if the
//! clock was set back). The batches that may hold records from a given
//! time on are therefore a suffix of the chain, found by a binary search
//! over its primary key; a chain's records come back in seq order, which is
//! time order wherever the clock did not step back.

use airlock_core::audit::AuditRecord;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use super::to_i64;
use crate::audit_batch::{decode_batch, encode_batch, sessions, summarise, BatchSummary};
use crate::audit_rows::{decode_record, RECORD_COLUMNS};
use crate::{AuditQuery, ChainHead, Result, StoreError};

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
        // Each chain's records came in seq order (its time order unless the
        // clock stepped back); interleave the chains by time.
        found.sort_by_key(|r| (r.ts_ms, r.chain, r.seq));
        found.truncate(limit);
    }
    Ok(found)
}

/// The first seq of the chain's first batch, from `from` on, whose `ts_max`
/// is at least `since`; `None` when there is none. `ts_max` never decreases
/// along a chain, so this is a binary search over seqs, each step one
/// primary-key seek to the batch holding the middle seq.
async fn first_batch_since(
    pool: &SqlitePool,
    chain: i64,
    from: i64,
    since: i64,
) -> Result<Option<i64>> {
    // One connection for the whole search.
    let mut conn = pool.acquire().await?;
    let mut holding = async |seq: i64| {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT first_seq, ts_max FROM audit_batches \
             WHERE chain = ? AND first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
        )
        .bind(chain)
        .bind(seq)
        .fetch_optional(&mut *conn)
        .await
    };
    // `hi` is always the first seq of a batch that qualifies.
    let mut hi = match holding(i64::MAX).await? {
        Some((last, ts_max)) if ts_max >= since => last,
        _ => return Ok(None),
    };
    // Seqs start at 1: a negative `from` (only a tampered row gives one)
    // must not make `hi - lo` overflow.
    let mut lo = from.max(0);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match holding(mid).await? {
            // That batch and every one before it end before `since`.
            Some((_, ts_max)) if ts_max < since => lo = mid + 1,
            Some((first, _)) => hi = first.min(hi),
            // Nothing at or before `mid`: the chain starts after it.
            None => lo = mid + 1,
        }
    }
    Ok(Some(hi))
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
        match first_batch_since(pool, chain_id, from, since).await? {
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
    // The batch before the first one read, to check the first against.
    let mut before: Option<Stored> = sqlx::query_as(
        "SELECT first_seq, last_seq, ts_max, NULL AS records FROM audit_batches \
         WHERE chain = ? AND first_seq < ? ORDER BY first_seq DESC LIMIT 1",
    )
    .bind(chain_id)
    .bind(from)
    .fetch_optional(pool)
    .await?;
    let mut decoded = Vec::new();
    loop {
        let page: Vec<Stored> = match &q.session {
            // A LEFT JOIN, so that an index row naming no batch is seen
            // (and refused) rather than silently shortening the page.
            Some(session) => {
                sqlx::query_as(
                    "SELECT s.first_seq, b.last_seq, b.ts_max, b.records \
                     FROM audit_batch_sessions s LEFT JOIN audit_batches b \
                     ON b.chain = s.chain AND b.first_seq = s.first_seq \
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
                sqlx::query_as(
                    "SELECT first_seq, last_seq, ts_max, records FROM audit_batches \
                     WHERE chain = ? AND first_seq >= ? ORDER BY first_seq LIMIT ?",
                )
                .bind(chain_id)
                .bind(from)
                .bind(PAGE)
                .fetch_all(pool)
                .await?
            }
        };
        // Decode and check the whole page before taking records from it.
        decoded.clear();
        let mut ends = Vec::with_capacity(page.len());
        for (i, row) in page.iter().enumerate() {
            let prev = match i.checked_sub(1) {
                Some(j) => page.get(j),
                None => before.as_ref(),
            };
            row.decode_into(chain, prev, &mut decoded)?;
            ends.push(decoded.len());
        }
        if q.session.is_none() {
            check_session_index(pool, chain, &page, &ends, &decoded).await?;
        }
        for record in decoded.drain(..) {
            if wanted(&record) {
                found.push(record);
                if found.len() >= target {
                    return Ok(());
                }
            }
        }
        let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= PAGE;
        if let Some(last) = page.into_iter().last() {
            from = last.first_seq.saturating_add(1);
            before = Some(last);
        }
        if !full {
            return Ok(());
        }
    }
}

/// Most (session, batch) pairs looked up in one query.
const INDEX_CHECK_CHUNK: usize = 300;

/// Checks that the session index names every session of every batch of
/// `page` (whose records, decoded, are `decoded`, the batch at `i` ending
/// at `ends[i]`): a missing index row would hide the batch from that
/// session's queries, so reading the chain refuses it there. (An index row
/// too many changes no answer: session queries filter the records.)
async fn check_session_index(
    pool: &SqlitePool,
    chain: u32,
    page: &[Stored],
    ends: &[usize],
    decoded: &[AuditRecord],
) -> Result<()> {
    let mut pairs: Vec<(&str, i64)> = Vec::new();
    let mut start = 0;
    for (row, &end) in page.iter().zip(ends) {
        let records = decoded.get(start..end).unwrap_or_default();
        pairs.extend(sessions(records).map(|session| (session, row.first_seq)));
        start = end;
    }
    for chunk in pairs.chunks(INDEX_CHECK_CHUNK) {
        // A join from the pairs, so that each is one primary-key lookup
        // (an `IN (VALUES …)` would scan the table).
        let mut sql = QueryBuilder::<Sqlite>::new("WITH wanted (session, first_seq) AS (VALUES ");
        let mut values = sql.separated(", ");
        for (session, first_seq) in chunk {
            values.push("(");
            values.push_bind_unseparated(*session);
            values.push_unseparated(", ");
            values.push_bind_unseparated(*first_seq);
            values.push_unseparated(")");
        }
        sql.push(
            ") SELECT s.first_seq, s.session FROM wanted w JOIN audit_batch_sessions s \
             ON s.session = w.session AND s.chain = ",
        );
        sql.push_bind(i64::from(chain));
        sql.push(" AND s.first_seq = w.first_seq");
        let present: Vec<(i64, String)> = sql.build_query_as().fetch_all(pool).await?;
        if present.len() < chunk.len() {
            let missing = chunk
                .iter()
                .find(|(session, first_seq)| {
                    !present.iter().any(|(f, s)| f == first_seq && s == session)
                })
                .map_or(0, |(_, first_seq)| *first_seq);
            return Err(StoreError::UnreadableAudit {
                chain,
                seq: u64::try_from(missing).unwrap_or(0),
                reason: "the session index does not name the batch from this record on under \
                         every session it holds (its records would be missing from those \
                         sessions' queries)"
                    .to_owned(),
            });
        }
    }
    Ok(())
}

/// A row of `audit_batches` as read (`last_seq`, `ts_max` and `records`
/// are missing when a session index row names no batch).
struct Stored {
    first_seq: i64,
    last_seq: Option<i64>,
    ts_max: Option<i64>,
    records: Option<Vec<u8>>,
}

impl<'r> sqlx::FromRow<'r, SqliteRow> for Stored {
    fn from_row(row: &'r SqliteRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(Self {
            first_seq: row.try_get("first_seq")?,
            last_seq: row.try_get("last_seq")?,
            ts_max: row.try_get("ts_max")?,
            records: row.try_get("records")?,
        })
    }
}

impl Stored {
    /// Decodes the batch onto the end of `into`, refusing it unless it agrees with
    /// its row and follows `before` (the batch read before it): the seq
    /// range the row claims is the one the records hold, in increasing
    /// order, after the batch before; `ts_max` covers the records and
    /// does not decrease. A row that fails is tampered with or damaged:
    /// reading stops there, naming it.
    fn decode_into(
        &self,
        chain: u32,
        before: Option<&Stored>,
        into: &mut Vec<AuditRecord>,
    ) -> Result<()> {
        let refuse = |reason: String| StoreError::UnreadableAudit {
            chain,
            seq: u64::try_from(self.first_seq).unwrap_or(0),
            reason,
        };
        let (Some(last_seq), Some(ts_max), Some(bytes)) =
            (self.last_seq, self.ts_max, self.records.as_deref())
        else {
            return Err(refuse(
                "the session index names a batch from this record on that is not there".to_owned(),
            ));
        };
        let start = into.len();
        decode_batch(chain, bytes, into).map_err(|e| {
            refuse(format!(
                "the batch from this record on does not decode: {e}"
            ))
        })?;
        let mine = into.get(start..).unwrap_or_default();
        let seqs_increase = mine.windows(2).all(|w| w[0].seq < w[1].seq);
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else {
            return Err(refuse("the batch from this record on is empty".to_owned()));
        };
        if to_i64(first.seq) != self.first_seq || to_i64(last.seq) != last_seq || !seqs_increase {
            return Err(refuse(format!(
                "the batch from this record on holds records {} to {} out of order or not \
                 the records {} to {last_seq} its row names",
                first.seq, last.seq, self.first_seq
            )));
        }
        let newest = mine.iter().map(|r| r.ts_ms).max().unwrap_or(ts_max);
        if ts_max < newest {
            return Err(refuse(format!(
                "the batch from this record on is indexed as ending at {ts_max} but holds a record of {newest}"
            )));
        }
        if let Some(before) = before {
            if self.first_seq <= before.last_seq.unwrap_or(i64::MAX) {
                return Err(refuse(
                    "the batch from this record on overlaps the batch before it".to_owned(),
                ));
            }
            if before.ts_max.is_some_and(|earlier| ts_max < earlier) {
                return Err(refuse(
                    "the batch from this record on is indexed as earlier than the batch before it"
                        .to_owned(),
                ));
            }
        }
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
    let mut summary = summarise(records, head)?;
    let before: Option<i64> = sqlx::query_scalar(LAST_TS_MAX)
        .bind(i64::from(head.chain))
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(before) = before {
        summary.ts_max = summary.ts_max.max(before);
    }
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
    encode_batch(records, &mut encoded)?;
    let first = to_i64(summary.first_seq);
    sqlx::query(INSERT_BATCH)
        .bind(i64::from(chain))
        .bind(first)
        .bind(to_i64(summary.last_seq))
        .bind(summary.ts_max)
        .bind(encoded)
        .execute(&mut **tx)
        .await?;
    for session in sessions(records) {
        sqlx::query(INSERT_SESSION)
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
/// once it is gone. Rows that cannot be read (a damaged or tampered
/// column) are kept aside in `audit_records_unreadable` rather than
/// stopping the store from opening: verifying then names the gap they
/// leave.
pub(super) async fn convert_legacy(pool: &SqlitePool) -> Result<()> {
    let legacy: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'",
    )
    .fetch_one(pool)
    .await?;
    if legacy == 0 {
        return Ok(());
    }
    let rows: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM audit_records)")
        .fetch_one(pool)
        .await?;
    if rows == 0 {
        // A new database (migration 2 made the table): nothing to move.
        sqlx::query("DROP TABLE IF EXISTS audit_records")
            .execute(pool)
            .await?;
        return Ok(());
    }
    // IMMEDIATE: another process opening the same file waits for this
    // conversion instead of racing it (which is why the table is looked
    // for again inside it).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let (moved, unreadable) = convert_in_transaction(&mut tx).await?;
    tx.commit().await?;
    if unreadable > 0 {
        tracing::warn!(
            records = unreadable,
            "audit records of the old format could not be read; kept in audit_records_unreadable"
        );
    }
    if moved > 0 {
        tracing::info!(records = moved, "audit records moved into batches");
    }
    Ok(())
}

/// The conversion itself; returns the rows moved and the rows kept aside.
async fn convert_in_transaction(tx: &mut Transaction<'_, Sqlite>) -> Result<(u64, u64)> {
    let legacy: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_records'",
    )
    .fetch_one(&mut **tx)
    .await?;
    if legacy == 0 {
        return Ok((0, 0));
    }
    let mut moved = 0_u64;
    let mut unreadable = 0_u64;
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
        .fetch_all(&mut **tx)
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let key: (i64, i64) = (row.try_get("chain")?, row.try_get("seq")?);
            after = key;
            match decode_record(row) {
                Ok(record) => records.push(record),
                Err(_) => {
                    keep_aside(tx, key).await?;
                    unreadable += 1;
                }
            }
        }
        if rows.is_empty() {
            break;
        }
        for batch in records.chunk_by(|a, b| a.chain == b.chain) {
            if let Some(first) = batch.first() {
                if first.chain != current_chain {
                    (current_chain, floor) = (first.chain, i64::MIN);
                }
                // Old rows are moved as they are, gaps and all: verifying
                // is what judges them.
                floor = insert_legacy_batch(tx, batch, first.chain, floor).await?;
            }
        }
        moved += records.len() as u64;
    }
    sqlx::query("DROP TABLE audit_records")
        .execute(&mut **tx)
        .await?;
    Ok((moved, unreadable))
}

/// Copies the old row `(chain, seq)` into `audit_records_unreadable`.
async fn keep_aside(tx: &mut Transaction<'_, Sqlite>, (chain, seq): (i64, i64)) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS audit_records_unreadable AS \
         SELECT * FROM audit_records WHERE 0",
    )
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO audit_records_unreadable SELECT * FROM audit_records WHERE chain = ? AND seq = ?",
    )
    .bind(chain)
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
