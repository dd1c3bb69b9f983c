//! What the store keeps of the audit trail: records and chain heads.

use airlock_core::audit::MacBytes;

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

/// Which audit records to read.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Only this session's records.
    pub session: Option<String>,
    /// Only records at or after this time (unix ms).
    pub since_ms: Option<i64>,
    /// Only this chain, in seq order, after `after_seq`. Without a chain,
    /// records come oldest first by time (then chain and seq).
    pub chain: Option<u32>,
    /// With `chain`: only records with a greater seq.
    pub after_seq: u64,
    /// At most this many records.
    pub limit: u32,
}

/// Computes the seal of a new, empty chain's head (the store does not hold
/// the audit key).
pub type GenesisSeal<'a> = &'a (dyn Fn(u32) -> MacBytes + Send + Sync);
