//! The embedded store's audit trail format: the records of one commit kept
//! together, as one encoded value.
//!
//! Storing a batch as one row instead of a row per record is what makes the
//! audit trail cheap to write: a commit inserts one row (and one row per
//! session it names) rather than a record's worth of B-tree work in three
//! trees per record.
//!
//! A batch is a format version byte followed by a [postcard] value: the mac
//! that precedes the batch in its chain, then every record with its own seq
//! and mac. A record's `prev_mac` is not repeated: it is the mac of the
//! record before it (the batch's `prev_mac` for the first). The chain comes
//! from the row that holds the batch. Seqs are stored, not implied, so a
//! batch that was tampered with still decodes to records that the verifier
//! can name.

use std::borrow::Cow;
use std::sync::Arc;

use airlock_core::audit::{AuditRecord, Flags, MacBytes};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

use crate::{ChainHead, StoreError};

/// The first byte of every encoded batch.
const FORMAT_V1: u8 = 1;

/// Why a stored batch could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("empty batch")]
    Empty,
    #[error("unknown batch format {0}")]
    UnknownFormat(u8),
    #[error("undecodable batch: {0}")]
    Undecodable(String),
    #[error("bad flags {0:#x} in record {1}")]
    BadFlags(u32, u64),
}

/// What the row holding a batch indexes it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSummary {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The latest record time in the batch (unix ms).
    pub ts_max: i64,
}

/// Summarises `records`, a batch that moves `head`'s chain on to `head`:
/// refused unless they are consecutive records of that chain ending at
/// the head's seq.
pub fn summarise(records: &[AuditRecord], head: &ChainHead) -> Result<BatchSummary, StoreError> {
    let refuse = |reason: String| Err(StoreError::InvalidBatch(reason));
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return refuse("no records".to_owned());
    };
    let mut expected = first.seq;
    let mut ts_max = first.ts_ms;
    for r in records {
        if r.chain != head.chain || r.seq != expected {
            return refuse(format!(
                "record {} of chain {} where record {expected} of chain {} belongs",
                r.seq, r.chain, head.chain
            ));
        }
        expected = expected.saturating_add(1);
        ts_max = ts_max.max(r.ts_ms);
    }
    if last.seq != head.seq {
        return refuse(format!(
            "the batch ends at record {} but the head is record {}",
            last.seq, head.seq
        ));
    }
    Ok(BatchSummary {
        first_seq: first.seq,
        last_seq: last.seq,
        ts_max,
    })
}

/// Encodes `records` (consecutive records of one chain, in seq order) into
/// `out`, which is cleared first.
pub fn encode_batch(records: &[AuditRecord], out: &mut Vec<u8>) -> Result<(), StoreError> {
    out.clear();
    out.push(FORMAT_V1);
    let prev_mac = records.first().map_or([0; 32], |r| r.prev_mac);
    let batch = BatchOut {
        prev_mac: &prev_mac,
        records: RecordsOut(records),
    };
    let encoded = postcard::to_extend(&batch, std::mem::take(out))
        .map_err(|e| StoreError::InvalidBatch(format!("cannot encode the batch: {e}")))?;
    *out = encoded;
    Ok(())
}

/// Decodes a batch of `chain` and appends its records to `into`.
pub fn decode_batch(
    chain: u32,
    bytes: &[u8],
    into: &mut Vec<AuditRecord>,
) -> Result<(), BatchError> {
    let (&format, body) = bytes.split_first().ok_or(BatchError::Empty)?;
    if format != FORMAT_V1 {
        return Err(BatchError::UnknownFormat(format));
    }
    let (batch, rest): (BatchIn<'_>, _) =
        postcard::take_from_bytes(body).map_err(|e| BatchError::Undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(BatchError::Undecodable(format!(
            "{} bytes after the last record",
            rest.len()
        )));
    }
    into.reserve(batch.records.len());
    let mut prev_mac = batch.prev_mac;
    for r in batch.records {
        let flags = Flags::from_bits(r.flags).ok_or(BatchError::BadFlags(r.flags, r.seq))?;
        into.push(AuditRecord {
            chain,
            seq: r.seq,
            ts_ms: r.ts_ms,
            session: r.session.as_deref().map(Arc::from),
            provider: r.provider.as_deref().map(Arc::from),
            method: Cow::Owned(r.method.into_owned()),
            path: r.path.into_owned(),
            decision: Cow::Owned(r.decision.into_owned()),
            status: r.status,
            upstream_status: r.upstream_status,
            duration_us: r.duration_us,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            flags,
            prev_mac,
            mac: r.mac,
        });
        prev_mac = r.mac;
    }
    Ok(())
}

/// The distinct sessions named in `records`, in first-seen order.
pub fn sessions(records: &[AuditRecord]) -> impl Iterator<Item = &str> {
    records.iter().enumerate().filter_map(move |(i, r)| {
        let session = r.session.as_deref()?;
        // Batches are small and mostly name a handful of sessions.
        let seen = records[..i]
            .iter()
            .any(|earlier| earlier.session.as_deref() == Some(session));
        (!seen).then_some(session)
    })
}

#[derive(Serialize)]
struct BatchOut<'a> {
    prev_mac: &'a MacBytes,
    records: RecordsOut<'a>,
}

/// Serialises the records as a sequence of [`StoredRecord`] without
/// collecting them.
struct RecordsOut<'a>(&'a [AuditRecord]);

impl Serialize for RecordsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for r in self.0 {
            seq.serialize_element(&StoredRecord {
                seq: r.seq,
                ts_ms: r.ts_ms,
                session: r.session.as_deref().map(Cow::Borrowed),
                provider: r.provider.as_deref().map(Cow::Borrowed),
                method: Cow::Borrowed(&r.method),
                path: Cow::Borrowed(&r.path),
                decision: Cow::Borrowed(&r.decision),
                status: r.status,
                upstream_status: r.upstream_status,
                duration_us: r.duration_us,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                flags: r.flags.bits(),
                mac: r.mac,
            })?;
        }
        seq.end()
    }
}

/// One record as stored (field order is the format: append only, never
/// reorder). Written from borrowed fields, read back borrowing the batch's
/// bytes.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    seq: u64,
    ts_ms: i64,
    #[serde(borrow)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow)]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    path: Cow<'a, str>,
    #[serde(borrow)]
    decision: Cow<'a, str>,
    status: u16,
    upstream_status: Option<u16>,
    duration_us: u64,
    bytes_in: u64,
    bytes_out: u64,
    flags: u32,
    mac: MacBytes,
}

#[derive(Deserialize)]
struct BatchIn<'a> {
    prev_mac: MacBytes,
    #[serde(borrow)]
    records: Vec<StoredRecord<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, prev_mac: MacBytes) -> AuditRecord {
        let mut mac = [0; 32];
        mac[0] = u8::try_from(seq % 251).unwrap();
        mac[31] = 0xa5;
        AuditRecord {
            chain: 7,
            seq,
            ts_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap(),
            session: (!seq.is_multiple_of(3)).then(|| format!("ses_{}", seq % 2).into()),
            provider: Some("openai".into()),
            method: "POST".into(),
            path: "/openai/v1/chat/completions".to_owned(),
            decision: if seq.is_multiple_of(2) {
                "allow".into()
            } else {
                "scope_denied".into()
            },
            status: 200,
            upstream_status: seq.is_multiple_of(2).then_some(200),
            duration_us: 1_234 * seq,
            bytes_in: 10,
            bytes_out: u64::MAX - seq,
            flags: Flags::from_bits(u32::try_from(seq % 2).unwrap()).unwrap(),
            prev_mac,
            mac,
        }
    }

    fn chain(first: u64, n: u64) -> Vec<AuditRecord> {
        let mut prev = [9; 32];
        (first..first + n)
            .map(|seq| {
                let r = record(seq, prev);
                prev = r.mac;
                r
            })
            .collect()
    }

    #[test]
    fn a_batch_decodes_to_the_records_it_was_made_of() {
        let records = chain(41, 30);
        let mut bytes = vec![0xff; 3];
        encode_batch(&records, &mut bytes).unwrap();
        let mut decoded = Vec::new();
        decode_batch(7, &bytes, &mut decoded).unwrap();
        assert_eq!(decoded, records);
        let head = ChainHead {
            chain: 7,
            seq: 70,
            mac: [0; 32],
            seal: [0; 32],
        };
        assert_eq!(
            summarise(&records, &head).unwrap(),
            BatchSummary {
                first_seq: 41,
                last_seq: 70,
                ts_max: 1_700_000_000_070
            }
        );
        let mut gap = records.clone();
        gap.remove(3);
        assert!(summarise(&gap, &head).is_err());
        let other_chain = ChainHead {
            chain: 8,
            ..head.clone()
        };
        assert!(summarise(&records, &other_chain).is_err());
        let short = ChainHead { seq: 71, ..head };
        assert!(summarise(&records, &short).is_err());
    }

    #[test]
    fn a_damaged_batch_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        encode_batch(&chain(1, 5), &mut bytes).unwrap();
        for cut in 0..bytes.len() {
            let mut out = Vec::new();
            assert!(
                decode_batch(7, &bytes[..cut], &mut out).is_err(),
                "cut at {cut}"
            );
        }
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(matches!(
            decode_batch(7, &other, &mut Vec::new()),
            Err(BatchError::UnknownFormat(2))
        ));
    }

    #[test]
    fn sessions_are_named_once_each() {
        let records = chain(1, 9);
        let named: Vec<&str> = sessions(&records).collect();
        assert_eq!(named, ["ses_1", "ses_0"]);
    }
}
