//! Row decoding shared by the SQL stores' audit tables: chain heads, and
//! rows of the one-row-per-record table (the trail's format before
//! batches, read only to move them into batches).

use airlock_core::audit::{AuditRecord, Flags, MacBytes};
use sqlx::{ColumnIndex, Decode, Row, Type};
use std::borrow::Cow;
use std::sync::Arc;

use crate::{ChainHead, Result, StoreError};

/// The columns of `audit_records`, in insert order.
pub(crate) const RECORD_COLUMNS: &str = "chain, seq, ts, session, provider, method, path, \
     decision, status, upstream_status, duration_us, bytes_in, bytes_out, flags, prev_mac, mac";

/// A record from an `audit_records` row.
pub(crate) fn decode_record<R>(row: &R) -> Result<AuditRecord>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let chain = chain_id(row.try_get("chain")?)?;
    let seq = unsigned(row.try_get("seq")?, chain, "seq")?;
    let corrupt = |reason: &str| corrupt(chain, seq, reason);
    let status: i64 = row.try_get("status")?;
    let upstream_status: Option<i64> = row.try_get("upstream_status")?;
    let flags: i64 = row.try_get("flags")?;
    Ok(AuditRecord {
        chain,
        seq,
        ts_ms: row.try_get("ts")?,
        session: row.try_get::<Option<String>, _>("session")?.map(Arc::from),
        provider: row.try_get::<Option<String>, _>("provider")?.map(Arc::from),
        method: Cow::Owned(row.try_get("method")?),
        path: row.try_get("path")?,
        decision: Cow::Owned(row.try_get("decision")?),
        status: u16::try_from(status).map_err(|_| corrupt("status"))?,
        upstream_status: upstream_status
            .map(u16::try_from)
            .transpose()
            .map_err(|_| corrupt("upstream_status"))?,
        duration_us: unsigned(row.try_get("duration_us")?, chain, "duration_us")?,
        bytes_in: unsigned(row.try_get("bytes_in")?, chain, "bytes_in")?,
        bytes_out: unsigned(row.try_get("bytes_out")?, chain, "bytes_out")?,
        flags: u32::try_from(flags)
            .ok()
            .and_then(Flags::from_bits)
            .ok_or_else(|| corrupt("flags"))?,
        prev_mac: mac(row.try_get("prev_mac")?).ok_or_else(|| corrupt("prev_mac"))?,
        mac: mac(row.try_get("mac")?).ok_or_else(|| corrupt("mac"))?,
    })
}

/// A chain head from an `audit_chains` row.
pub(crate) fn decode_head<R>(row: &R) -> Result<ChainHead>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let chain = chain_id(row.try_get("id")?)?;
    let seq = unsigned(row.try_get("head_seq")?, chain, "head_seq")?;
    Ok(ChainHead {
        chain,
        seq,
        mac: mac(row.try_get("head_mac")?).ok_or_else(|| corrupt(chain, seq, "head_mac"))?,
        seal: mac(row.try_get("head_seal")?).ok_or_else(|| corrupt(chain, seq, "head_seal"))?,
    })
}

fn chain_id(value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt {
        what: "audit chain".to_owned(),
        reason: format!("bad chain id {value}"),
    })
}

fn unsigned(value: i64, chain: u32, column: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(chain, 0, column))
}

fn mac(bytes: Vec<u8>) -> Option<MacBytes> {
    bytes.try_into().ok()
}

fn corrupt(chain: u32, seq: u64, column: &str) -> StoreError {
    StoreError::UnreadableAudit {
        chain,
        seq,
        reason: format!("bad {column}"),
    }
}
