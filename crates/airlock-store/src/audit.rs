//! What the store keeps of the audit trail: records and chain heads.

use std::collections::VecDeque;

use airlock_core::audit::{AuditRecord, MacBytes};

/// An audit chain's head as stored: the last record's seq and mac, and the
/// seal the server computed over them (see `airlock_core::audit::head_seal`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub chain: u32,
    /// 0 for a chain with no record yet.
    pub seq: u64,
    pub mac: MacBytes,
    pub seal: MacBytes,
}

/// Where a chain starts after its older records were pruned
/// (`airlock audit prune`): the last record removed, and the seal over it
/// (see `airlock_core::audit::floor_seal`) that lets verification start
/// the chain after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainFloor {
    pub chain: u32,
    /// The last record removed: the chain's records now start at `seq + 1`.
    pub seq: u64,
    /// That record's mac, which the next record links to.
    pub mac: MacBytes,
    pub seal: MacBytes,
    /// When the records were removed (unix ms).
    pub pruned_at_ms: i64,
}

/// What pruning removed from one chain (or would, on a dry run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruned {
    pub chain: u32,
    /// The first record removed (1, or the seq after the previous floor).
    pub first_seq: u64,
    /// Records removed.
    pub records: u64,
    /// The chain's floor now: its `seq` is the last record removed.
    pub floor: ChainFloor,
}

/// Computes the seal of a chain's floor, `(chain, seq, mac)` (the store
/// does not hold the audit key).
pub type FloorSeal<'a> = &'a (dyn Fn(u32, u64, &MacBytes) -> MacBytes + Send + Sync);

/// Which audit records to read.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Only this session's records.
    pub session: Option<String>,
    /// From this time (unix ms) on: in each chain, the records from the
    /// first one (in seq order) whose `ts` is at or after it to the chain's
    /// end, a contiguous run of seqs. A record's `ts` is when its call
    /// ended and its seq is given at commit, so a chain's `ts` steps back a
    /// millisecond or two now and then: the run may hold a few records
    /// a little older than `since_ms`, right after its first one. (Records
    /// before the first are never taken.) With `session`, that session's
    /// records of the run.
    pub since_ms: Option<i64>,
    /// Only this chain, in seq order, after `after_seq`. Without a chain,
    /// each chain's records in seq order, interleaved oldest first (see
    /// [`take_oldest_first`]).
    pub chain: Option<u32>,
    /// With `chain`: only records with a greater seq.
    pub after_seq: u64,
    /// At most this many records.
    pub limit: u32,
}

/// Computes the seal of a new, empty chain's head (the store does not hold
/// the audit key).
pub type GenesisSeal<'a> = &'a (dyn Fn(u32) -> MacBytes + Send + Sync);

/// Takes up to `limit` records from the fronts of `chains` (each in seq
/// order), always the one with the earliest `ts` (then the lowest chain):
/// the chains interleaved oldest first, each still in seq order. What is
/// not taken stays in `chains`.
pub fn take_oldest_first(chains: &mut [VecDeque<AuditRecord>], limit: usize) -> Vec<AuditRecord> {
    take_oldest_first_by(chains, limit, |r| (r.ts_ms, r.chain))
}

/// [`take_oldest_first`] for anything that knows its record's `(ts,
/// chain)` (`key`): the JSON lines `audit tail` holds, say.
pub fn take_oldest_first_by<T>(
    chains: &mut [VecDeque<T>],
    limit: usize,
    key: impl Fn(&T) -> (i64, u32),
) -> Vec<T> {
    let mut taken = Vec::new();
    while taken.len() < limit {
        let next = chains
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.front().map(|r| (key(r), i)))
            .min()
            .map(|(_, i)| i);
        match next
            .and_then(|i| chains.get_mut(i))
            .and_then(VecDeque::pop_front)
        {
            Some(record) => taken.push(record),
            None => break,
        }
    }
    taken
}
