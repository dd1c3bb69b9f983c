//! An audit trail stored as batches (the format of `audit_batch.rs`):
//! reading records out of them, inserting them, and moving a trail of the
//! older one-row-per-record format into them. Both SQL stores keep their
//! trail this way and share this logic, written against [`BatchRows`] and
//! [`TrailWrites`], and the SQL of those too: [`impl_batch_trail!`]
//! implements them on a store's connection type.
//!
//! The tables: `audit_batches (chain, first_seq, last_seq, ts_max,
//! records)`, keyed by `(chain, first_seq)`, and `audit_batch_sessions
//! (session, chain, first_seq)`, one row per session and batch.
//!
//! A batch's `ts_max` is the running maximum of `ts` along its chain up to
//! and including the batch (a record's `ts` is when its call ended, so it
//! may step back a little from one record to the next, or a lot if the
//! clock was set back). The batches that may hold records from a given
//! time on are therefore a suffix of the chain, found by a binary search
//! over its primary key; a chain's records come back in seq order, which is
//! time order wherever the clock did not step back. (It steps back by a
//! millisecond or two now and then even when it did not: a record's `ts`
//! is when its call ended, its seq is given at commit.)

use airlock_core::audit::{format_ts, AuditRecord};
use sqlx::{ColumnIndex, Database, Decode, Encode, QueryBuilder, Row, Type};

use crate::audit_batch::{decode_batch, encode_batch, sessions, BatchSummary};
use crate::{to_i64, AuditQuery, ChainFloor, FloorSeal, Pruned, Result, StoreError};

/// Batches read per query while collecting records.
const PAGE: i64 = 64;
/// Batches read per query while looking for the first record at or after
/// a time (normally the first batch read holds it).
const SEEK_PAGE: i64 = 4;
/// Old rows moved per batch when converting.
const LEGACY_BATCH: i64 = 512;
/// Most (session, batch) pairs looked up in one query.
const INDEX_CHECK_CHUNK: usize = 300;

mod sql;
pub(crate) use sql::{impl_batch_trail, INSERT_BATCH, INSERT_SESSION};

/// The queries a batch trail is read with, in a store's SQL.
pub(crate) trait BatchRows: Send {
    /// Every chain's id, in order.
    async fn chains(&mut self) -> Result<Vec<i64>>;
    /// `(first_seq, ts_max)` of the chain's last batch starting at or
    /// before `seq`.
    async fn batch_at(&mut self, chain: i64, seq: i64) -> Result<Option<(i64, i64)>>;
    /// The chain's last batch starting before `first_seq`, without its
    /// records.
    async fn batch_before(&mut self, chain: i64, first_seq: i64) -> Result<Option<Stored>>;
    /// Up to `limit` batches of the chain from `from` on, in order: all of
    /// them, or those the session index names under `session` (a LEFT
    /// JOIN, so that an index row naming no batch is seen, and refused,
    /// rather than silently shortening the page).
    async fn batches_from(
        &mut self,
        chain: i64,
        from: i64,
        session: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Stored>>;
    /// Those of `pairs` (session, first seq) that the session index holds
    /// for `chain`, as (first seq, session).
    async fn indexed(&mut self, chain: i64, pairs: &[(&str, i64)]) -> Result<Vec<(i64, String)>>;
    /// Every row of `audit_floors` (chain, seq, mac, seal, pruned_at), by
    /// chain.
    async fn floor_rows(&mut self) -> Result<Vec<FloorRow>>;
    /// Chains with batches or a floor but no row in `audit_chains`, and the
    /// first seq each holds (after its floor, if it has no batch), by
    /// chain.
    async fn headless_chains(&mut self) -> Result<Vec<(i64, i64)>>;
}

/// A row of `audit_floors`: chain, seq, mac, seal, pruned_at (unix ms).
pub(crate) type FloorRow = (i64, i64, Vec<u8>, Vec<u8>, i64);

/// The writes of a batch trail, and of moving the old format into it, in
/// a store's SQL.
pub(crate) trait TrailWrites: Send {
    /// Inserts a batch row and its session index rows.
    async fn insert_batch(
        &mut self,
        chain: i64,
        summary: &BatchSummary,
        encoded: &[u8],
        sessions: &[&str],
    ) -> Result<()>;
    /// Whether the old one-row-per-record table is still there.
    async fn legacy_exists(&mut self) -> Result<bool>;
    /// Up to `limit` old rows after `(chain, seq)`, in that order: each
    /// row's key and its record, or the error reading it.
    async fn legacy_rows(
        &mut self,
        after: (i64, i64),
        limit: i64,
    ) -> Result<Vec<((i64, i64), Result<AuditRecord>)>>;
    /// Copies the old row `key` into `audit_records_unreadable`.
    async fn keep_aside(&mut self, key: (i64, i64)) -> Result<()>;
    /// Drops the old table.
    async fn drop_legacy(&mut self) -> Result<()>;
    /// Deletes the chain's batches that start before `first_seq`, and
    /// their session index rows (under `sessions`, the sessions they name:
    /// found by the index's key instead of a scan of it).
    async fn delete_batches_before(
        &mut self,
        chain: i64,
        first_seq: i64,
        sessions: &[String],
    ) -> Result<()>;
    /// Stores `floor` as its chain's floor, unless the chain has one
    /// further on already (a prune that ran meanwhile).
    async fn set_floor(&mut self, floor: &ChainFloor) -> Result<()>;
}

/// A row of `audit_batches` as read (`last_seq`, `ts_max` and `records`
/// are missing when a session index row names no batch, and `records`
/// when it was not asked for).
pub(crate) struct Stored {
    pub(crate) first_seq: i64,
    pub(crate) last_seq: Option<i64>,
    pub(crate) ts_max: Option<i64>,
    pub(crate) records: Option<Vec<u8>>,
}

impl<'r, R> sqlx::FromRow<'r, R> for Stored
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database>,
    Vec<u8>: Type<R::Database>,
{
    fn from_row(row: &'r R) -> std::result::Result<Self, sqlx::Error> {
        Ok(Self {
            first_seq: row.try_get("first_seq")?,
            last_seq: row.try_get("last_seq")?,
            ts_max: row.try_get("ts_max")?,
            records: row.try_get("records")?,
        })
    }
}

/// [`crate::Store::audit_records`] over a batch trail.
pub(crate) async fn read_records<C: BatchRows>(
    conn: &mut C,
    q: &AuditQuery,
) -> Result<Vec<AuditRecord>> {
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
    let mut found = Vec::new();
    if limit == 0 {
        return Ok(found);
    }
    let chains: Vec<u32> = match q.chain {
        Some(chain) => vec![chain],
        None => conn
            .chains()
            .await?
            .into_iter()
            .filter_map(|id| u32::try_from(id).ok())
            .collect(),
    };
    if q.chain.is_some() || chains.len() <= 1 {
        for &chain in &chains {
            read_chain(conn, chain, q, limit, &mut found).await?;
        }
        return Ok(found);
    }
    // Each chain's records come in seq order; interleave the chains by
    // time, each staying in seq order (so that each chain's part is a
    // contiguous run that verifies on its own).
    let mut per_chain = Vec::with_capacity(chains.len());
    for &chain in &chains {
        let mut records = Vec::new();
        read_chain(conn, chain, q, limit, &mut records).await?;
        per_chain.push(std::collections::VecDeque::from(records));
    }
    Ok(crate::take_oldest_first(&mut per_chain, limit))
}

/// [`crate::Store::audit_floors`] over a batch trail.
pub(crate) async fn floors<C: BatchRows>(conn: &mut C) -> Result<Vec<ChainFloor>> {
    let corrupt = |chain: i64, reason: &str| StoreError::Corrupt {
        what: format!("the audit floor of chain {chain}"),
        reason: reason.to_owned(),
    };
    conn.floor_rows()
        .await?
        .into_iter()
        .map(|(chain, seq, mac, seal, pruned_at_ms)| {
            Ok(ChainFloor {
                chain: u32::try_from(chain).map_err(|_| corrupt(chain, "chain out of range"))?,
                seq: u64::try_from(seq).map_err(|_| corrupt(chain, "negative seq"))?,
                mac: mac
                    .try_into()
                    .map_err(|_| corrupt(chain, "mac is not 32 bytes"))?,
                seal: seal
                    .try_into()
                    .map_err(|_| corrupt(chain, "seal is not 32 bytes"))?,
                pruned_at_ms,
            })
        })
        .collect()
}

/// [`crate::Store::audit_headless_chains`] over a batch trail.
pub(crate) async fn headless_chains<C: BatchRows>(conn: &mut C) -> Result<Vec<(u32, u64)>> {
    Ok(conn
        .headless_chains()
        .await?
        .into_iter()
        .map(|(chain, seq)| {
            (
                u32::try_from(chain).unwrap_or(u32::MAX),
                u64::try_from(seq).unwrap_or(0),
            )
        })
        .collect())
}

/// Batches removed from a chain per transaction while pruning: each step
/// holds the store's write lock briefly (SQLite: the audit writer's
/// commits wait for it), however much a prune removes in all.
pub(crate) const PRUNE_STEP: i64 = 256;

/// One step of [`crate::Store::audit_prune`] over a batch trail, inside the
/// caller's transaction; the store repeats steps until one removes nothing
/// (see [`merge_pruned`]). Per chain, the cut is before the first batch
/// whose `ts_max` reaches `before_ms` (the batches before it hold only
/// records that ended earlier: `ts_max` never decreases along a chain),
/// and never after the chain's last batch; a step removes up to
/// [`PRUNE_STEP`] batches of those, and the last record it removes becomes
/// the chain's floor. A dry run removes nothing and answers the whole cut
/// at once.
pub(crate) async fn prune_step<C: BatchRows + TrailWrites>(
    conn: &mut C,
    before_ms: i64,
    seal: FloorSeal<'_>,
    now_ms: i64,
    dry_run: bool,
) -> Result<Vec<Pruned>> {
    let mut pruned = Vec::new();
    for chain_id in conn.chains().await? {
        let Ok(chain) = u32::try_from(chain_id) else {
            continue;
        };
        let Some((last_batch, _)) = conn.batch_at(chain_id, i64::MAX).await? else {
            continue;
        };
        let cut = first_batch_since(conn, chain_id, 0, before_ms)
            .await?
            .unwrap_or(last_batch)
            .min(last_batch);
        let Some(first) = conn.batches_from(chain_id, 0, None, 1).await?.pop() else {
            continue;
        };
        if first.first_seq >= cut {
            continue;
        }
        // The batches this step removes, whole: the sessions they name
        // (their index rows go with them) and their last record, the floor.
        let step: Vec<Stored> = if dry_run {
            // Only the last batch before the cut is needed.
            let Some(before) = conn.batch_before(chain_id, cut).await? else {
                continue;
            };
            conn.batches_from(chain_id, before.first_seq, None, 1)
                .await?
        } else {
            conn.batches_from(chain_id, first.first_seq, None, PRUNE_STEP)
                .await?
        };
        let mut records = Vec::new();
        let mut sessions: Vec<String> = Vec::new();
        let mut previous: Option<&Stored> = None;
        for row in step.iter().filter(|row| row.first_seq < cut) {
            // Seqs run on from batch to batch (decoding checks overlaps):
            // a gap is a damaged trail, which pruning would hide.
            if let Some(before) = previous.and_then(|p| p.last_seq) {
                if row.first_seq != before + 1 {
                    return Err(StoreError::UnreadableAudit {
                        chain,
                        seq: u64::try_from(before + 1).unwrap_or(0),
                        reason: "a batch is missing here, where pruning would remove".to_owned(),
                    });
                }
            }
            let start = records.len();
            row.decode_into(chain, previous, &mut records)?;
            for session in crate::audit_batch::sessions(&records[start..]) {
                if !sessions.iter().any(|s| s == session) {
                    sessions.push(session.to_owned());
                }
            }
            previous = Some(row);
        }
        let Some(last) = records.last() else {
            continue;
        };
        let step_cut = to_i64(last.seq) + 1;
        // Seqs run on from batch to batch: anything else is a damaged
        // trail, which pruning would hide.
        let next = conn.batch_at(chain_id, step_cut).await?;
        if next.map(|(first_seq, _)| first_seq) != Some(step_cut) {
            return Err(StoreError::UnreadableAudit {
                chain,
                seq: u64::try_from(step_cut).unwrap_or(0),
                reason: format!(
                    "no batch starts right after record {}, where pruning would cut",
                    last.seq
                ),
            });
        }
        let floor = ChainFloor {
            chain,
            seq: last.seq,
            mac: last.mac,
            seal: seal(chain, last.seq, &last.mac),
            pruned_at_ms: now_ms,
        };
        if !dry_run {
            conn.delete_batches_before(chain_id, step_cut, &sessions)
                .await?;
            conn.set_floor(&floor).await?;
        }
        pruned.push(Pruned {
            chain,
            first_seq: u64::try_from(first.first_seq).unwrap_or(0),
            records: u64::try_from(step_cut - first.first_seq).unwrap_or(0),
            floor,
        });
    }
    Ok(pruned)
}

/// Adds one step's `step` to the prune's `total` (per chain: records
/// summed, the first step's first seq, the last step's floor).
pub(crate) fn merge_pruned(total: &mut Vec<Pruned>, step: Vec<Pruned>) {
    for chain in step {
        match total.iter_mut().find(|t| t.chain == chain.chain) {
            Some(t) => {
                t.records += chain.records;
                t.floor = chain.floor;
            }
            None => total.push(chain),
        }
    }
}

/// The first seq of the chain's first batch, from `from` on, whose `ts_max`
/// is at least `since`; `None` when there is none. `ts_max` never decreases
/// along a chain, so this is a binary search over seqs, each step one
/// primary-key seek to the batch holding the middle seq.
async fn first_batch_since<C: BatchRows>(
    conn: &mut C,
    chain: i64,
    from: i64,
    since: i64,
) -> Result<Option<i64>> {
    // `hi` is always the first seq of a batch that qualifies.
    let mut hi = match conn.batch_at(chain, i64::MAX).await? {
        Some((last, ts_max)) if ts_max >= since => last,
        _ => return Ok(None),
    };
    // Seqs start at 1: a negative `from` (only a tampered row gives one)
    // must not make `hi - lo` overflow.
    let mut lo = from.max(0);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match conn.batch_at(chain, mid).await? {
            // That batch and every one before it end before `since`.
            Some((_, ts_max)) if ts_max < since => lo = mid + 1,
            Some((first, _)) => hi = first.min(hi),
            // Nothing at or before `mid`: the chain starts after it.
            None => lo = mid + 1,
        }
    }
    Ok(Some(hi))
}

/// The first seq of the batch holding the chain's first record, in seq
/// order from the batch at `from` on, whose `ts` is at least `since`, and
/// that record's seq; `None` when there is none. (The batch at `from` is
/// the first whose `ts_max` reaches `since`, so it is normally the one.)
async fn first_seq_since<C: BatchRows>(
    conn: &mut C,
    chain: u32,
    mut from: i64,
    since: i64,
) -> Result<Option<(i64, u64)>> {
    let chain_id = i64::from(chain);
    let mut before = conn.batch_before(chain_id, from).await?;
    let mut decoded = Vec::new();
    loop {
        let page = conn.batches_from(chain_id, from, None, SEEK_PAGE).await?;
        let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= SEEK_PAGE;
        for row in page {
            decoded.clear();
            row.decode_into(chain, before.as_ref(), &mut decoded)?;
            if let Some(record) = decoded.iter().find(|r| r.ts_ms >= since) {
                return Ok(Some((row.first_seq, record.seq)));
            }
            from = row.first_seq.saturating_add(1);
            before = Some(row);
        }
        if !full {
            return Ok(None);
        }
    }
}

/// Appends up to `limit` records of `chain` that `q` selects to `found`,
/// in seq order.
async fn read_chain<C: BatchRows>(
    conn: &mut C,
    chain: u32,
    q: &AuditQuery,
    limit: usize,
    found: &mut Vec<AuditRecord>,
) -> Result<()> {
    let chain_id = i64::from(chain);
    let after_seq = if q.chain.is_some() { q.after_seq } else { 0 };
    // The batch holding the first seq wanted ...
    let mut from = conn
        .batch_at(chain_id, to_i64(after_seq.saturating_add(1)))
        .await?
        .map_or(0, |(first, _)| first);
    // ... or, if later, the batch holding the chain's first record (in
    // seq order) at or after `since`: from there on, every record is
    // wanted, whatever its `ts` (see `AuditQuery::since_ms`).
    let mut cut = 0;
    if let Some(since) = q.since_ms {
        let Some(first) = first_batch_since(conn, chain_id, 0, since).await? else {
            return Ok(());
        };
        let Some((batch, seq)) = first_seq_since(conn, chain, first, since).await? else {
            return Ok(());
        };
        from = from.max(batch);
        cut = seq;
    }
    let wanted = |r: &AuditRecord| {
        r.seq > after_seq
            && r.seq >= cut
            && q.session
                .as_deref()
                .is_none_or(|session| r.session.as_deref() == Some(session))
    };
    let target = found.len().saturating_add(limit);
    // The batch before the first one read, to check the first against.
    let mut before = conn.batch_before(chain_id, from).await?;
    let mut decoded = Vec::new();
    loop {
        let page = conn
            .batches_from(chain_id, from, q.session.as_deref(), PAGE)
            .await?;
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
            check_session_index(conn, chain, &page, &ends, &decoded).await?;
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

/// Checks that the session index names every session of every batch of
/// `page` (whose records, decoded, are `decoded`, the batch at `i` ending
/// at `ends[i]`): a missing index row would hide the batch from that
/// session's queries, so reading the chain refuses it there. (An index row
/// too many changes no answer: session queries filter the records.)
async fn check_session_index<C: BatchRows>(
    conn: &mut C,
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
        let present = conn.indexed(i64::from(chain), chunk).await?;
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

/// The query of [`BatchRows::indexed`], in any SQL dialect: a join from
/// the pairs, so that each is one primary-key lookup (an `IN (VALUES …)`
/// would scan the table).
pub(crate) fn indexed_query<'q, DB>(chain: i64, pairs: &[(&'q str, i64)]) -> QueryBuilder<'q, DB>
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
{
    let mut sql = QueryBuilder::<DB>::new("WITH wanted (session, first_seq) AS (VALUES ");
    let mut values = sql.separated(", ");
    for (session, first_seq) in pairs {
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
    sql.push_bind(chain);
    sql.push(" AND s.first_seq = w.first_seq");
    sql
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
                "the batch from this record on is indexed as ending at {} but holds a record of {}",
                format_ts(ts_max),
                format_ts(newest)
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

/// Inserts `records` of `chain` as one batch indexed by `summary`.
pub(crate) async fn write_batch<C: TrailWrites>(
    conn: &mut C,
    chain: u32,
    summary: &BatchSummary,
    records: &[AuditRecord],
) -> Result<()> {
    let mut encoded = Vec::new();
    encode_batch(records, &mut encoded)?;
    let named: Vec<&str> = sessions(records).collect();
    conn.insert_batch(i64::from(chain), summary, &encoded, &named)
        .await
}

/// Inserts records of `chain` as one batch, as they are (old rows being
/// moved, or a trail a test rewrites): their `ts` may step back now and
/// then, so the batch's `ts_max` is at least `floor`, the `ts_max` of the
/// batch before it, so that `ts_max` never decreases along a chain and the
/// time seek stays exact. Returns the batch's `ts_max`.
pub(crate) async fn insert_legacy_batch<C: TrailWrites>(
    conn: &mut C,
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
    write_batch(conn, chain, &summary, records).await?;
    Ok(summary.ts_max)
}

/// Moves the rows of `audit_records` (the trail's format before batches)
/// into batches and drops the table, inside the caller's transaction;
/// nothing to do once it is gone. Rows that cannot be read (a damaged or
/// tampered column) are kept aside in `audit_records_unreadable` rather
/// than stopping the store from opening: verifying then names the gap they
/// leave. Returns the rows moved and the rows kept aside, for
/// [`log_conversion`].
pub(crate) async fn convert_legacy<C: TrailWrites>(conn: &mut C) -> Result<(u64, u64)> {
    if !conn.legacy_exists().await? {
        return Ok((0, 0));
    }
    let mut moved = 0_u64;
    let mut unreadable = 0_u64;
    let mut after = (0_i64, 0_i64);
    let mut floor = i64::MIN;
    let mut current_chain = 0;
    loop {
        let rows = conn.legacy_rows(after, LEGACY_BATCH).await?;
        if rows.is_empty() {
            break;
        }
        let mut records = Vec::with_capacity(rows.len());
        for (key, row) in rows {
            after = key;
            match row {
                Ok(record) => records.push(record),
                Err(_) => {
                    conn.keep_aside(key).await?;
                    unreadable += 1;
                }
            }
        }
        // A batch stores one `prev_mac`, the others being the mac of the
        // record before: a batch ends wherever the next row does not
        // follow on (another chain, a gap, a row kept aside, a `prev_mac`
        // that is not the mac before it), so that every row's own columns
        // come back as they were, tampered or not.
        let follows = |a: &AuditRecord, b: &AuditRecord| {
            a.chain == b.chain && b.seq == a.seq.saturating_add(1) && b.prev_mac == a.mac
        };
        for batch in records.chunk_by(follows) {
            if let Some(first) = batch.first() {
                if first.chain != current_chain {
                    (current_chain, floor) = (first.chain, i64::MIN);
                }
                // Old rows are moved as they are, gaps and all: verifying
                // is what judges them.
                floor = insert_legacy_batch(conn, batch, first.chain, floor).await?;
            }
        }
        moved += records.len() as u64;
    }
    conn.drop_legacy().await?;
    Ok((moved, unreadable))
}

/// Logs what [`convert_legacy`] did, once its transaction committed.
pub(crate) fn log_conversion((moved, unreadable): (u64, u64)) {
    if unreadable > 0 {
        tracing::warn!(
            records = unreadable,
            "audit records of the old format could not be read; kept in audit_records_unreadable"
        );
    }
    if moved > 0 {
        tracing::info!(records = moved, "audit records moved into batches");
    }
}
