//! Audit records and their HMAC chain.
//!
//! Every call produces one [`AuditRecord`]. Records are written by *chains*:
//! each writer (one `airlock serve` process) appends to its own chain with a
//! gap-free `seq` starting at 1. A record's `mac` is
//! `HMAC-SHA256(key, canonical(record) || prev_mac)` where `prev_mac` is the
//! previous record's mac in the same chain (all zeroes for `seq` 1), so
//! editing, deleting, inserting or reordering a record breaks the chain at
//! a seq that [`ChainVerifier`] names.
//!
//! Each chain's head (last seq and mac) is also kept *sealed*
//! ([`head_seal`]), so cutting records off the end of a chain is detected
//! as long as the store holds the current head.
//!
//! Records never hold tokens, credentials, query strings or bodies.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

#[doc(no_inline)]
pub use crate::token::TOKEN_RUN_MIN;
use crate::token::{TOKEN_PREFIX, WITHHELD};

type HmacSha256 = Hmac<Sha256>;

/// Length of a MAC in bytes.
pub const MAC_LEN: usize = 32;

/// A MAC (HMAC-SHA256 output).
pub type MacBytes = [u8; MAC_LEN];

/// The `prev_mac` of the first record of every chain.
pub const GENESIS_MAC: MacBytes = [0; MAC_LEN];

/// Longest path kept in a record; longer paths are cut and marked.
pub const MAX_PATH_LEN: usize = 1024;

/// Domain separation for record MACs.
const RECORD_DOMAIN: &[u8] = b"airlock-audit-record-v1\0";
/// Domain separation for chain head seals.
const HEAD_DOMAIN: &[u8] = b"airlock-audit-head-v1\0";
/// Domain of [`AuditKey::check_value`].
const KEY_CHECK_DOMAIN: &[u8] = b"airlock-audit-key-check-v1\0";
/// Domain of a chain floor's seal (see [`floor_seal`]).
const FLOOR_DOMAIN: &[u8] = b"airlock-audit-floor-v1\0";

/// The key that MACs the audit trail. Only the server holds it.
///
/// Holds the HMAC state keyed once, so each record costs no key schedule.
pub struct AuditKey {
    keyed: HmacSha256,
}

/// Flags on a record (a bit set; rendered as names in JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u32);

/// One audited call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// The writer's chain.
    pub chain: u32,
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the call ended, unix milliseconds.
    pub ts_ms: i64,
    /// Session id (`ses_…`), when the token named one. Shared with the
    /// live session, so that recording it costs no allocation.
    pub session: Option<Arc<str>>,
    /// Provider name, when the path named a configured one (shared with
    /// the provider's configuration).
    pub provider: Option<Arc<str>>,
    /// HTTP method as received (borrowed for the standard ones).
    pub method: Cow<'static, str>,
    /// Request path without the query string (cut at [`MAX_PATH_LEN`]).
    pub path: String,
    /// `allow`, or the error code airlock answered with.
    pub decision: Cow<'static, str>,
    /// Status sent to the agent (0 when none was sent).
    pub status: u16,
    /// Status the provider answered with, when it was reached.
    pub upstream_status: Option<u16>,
    /// Time from receiving the request to the end of the response.
    pub duration_us: u64,
    /// Request body bytes forwarded to the provider.
    pub bytes_in: u64,
    /// Response body bytes sent to the agent.
    pub bytes_out: u64,
    /// Notable facts about the call.
    pub flags: Flags,
    /// The previous record's mac in this chain.
    pub prev_mac: MacBytes,
    /// This record's mac.
    pub mac: MacBytes,
}

/// Why a trail does not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakReason {
    /// The record's mac does not match its contents (edited or forged).
    BadMac,
    /// A record is missing before this one.
    Gap { expected: u64 },
    /// This record is not where its seq says it belongs.
    OutOfOrder { expected: u64 },
    /// The record does not link to the one before it.
    BrokenLink,
    /// This record and any after it up to the sealed head were removed
    /// (the chain ends before its head).
    Truncated { head_seq: u64 },
    /// The chain head's seal is not valid.
    BadHead,
    /// The chain's floor (where records before it were pruned) has no
    /// valid seal: records may have been removed from its start.
    BadFloor,
    /// The store holds records of this chain but not its sealed head (its
    /// head was deleted): nothing says where the chain ends.
    NoHead,
    /// The record could not be read.
    Malformed(String),
}

/// The first place where a trail does not verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    pub chain: u32,
    /// Seq of the first bad record (for `Truncated`, the first missing one;
    /// for `BadHead`, the chain's last record).
    pub seq: u64,
    pub reason: BreakReason,
}

/// Checks records of any number of chains, in the order they are given.
///
/// Within a chain, each record must follow the previous one. With
/// [`ChainVerifier::from_start`], every chain must start at seq 1 (the whole
/// trail); otherwise a chain may start anywhere (an export `--since`). With
/// [`ChainVerifier::allow_gaps`], seqs may jump (an export of one session):
/// each record's mac is still checked, and links where seqs are adjacent.
pub struct ChainVerifier<'k> {
    key: &'k AuditKey,
    from_start: bool,
    allow_gaps: bool,
    chains: HashMap<u32, (u64, MacBytes)>,
    records: u64,
}

/// The fields of a record's JSON form, in the order `to_json` writes them
/// ([`WireRecord`]'s).
pub const RECORD_FIELDS: [&str; 16] = [
    "chain",
    "seq",
    "ts",
    "session",
    "provider",
    "method",
    "path",
    "decision",
    "status",
    "upstream_status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "flags",
    "prev_mac",
    "mac",
];

/// Whether `value` is an object with every field of a record, `null` ones
/// included: serde would also read a record from an array of its values,
/// and take a missing `null` field for one (neither is what airlock
/// writes, nor what a reader of the file may take it for).
fn has_every_field(value: &serde_json::Value) -> Result<(), String> {
    match value.as_object() {
        Some(fields) if fields.len() == RECORD_FIELDS.len() => Ok(()),
        Some(_) => Err(format!(
            "not a record: a record has exactly {} fields, null ones included",
            RECORD_FIELDS.len()
        )),
        None => Err("not a record: not a JSON object".to_owned()),
    }
}

/// JSON form of a record (what the API and `audit export` print).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRecord {
    chain: u32,
    seq: u64,
    ts: String,
    session: Option<String>,
    provider: Option<String>,
    method: String,
    path: String,
    decision: String,
    status: u16,
    upstream_status: Option<u16>,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    flags: Vec<String>,
    prev_mac: String,
    mac: String,
}

// === impl AuditKey ===

impl AuditKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: &[u8; 32]) -> Self {
        // HMAC pads a key shorter than the block with zeroes (RFC 2104), so
        // padding it here keys the same function, infallibly.
        // SHA-256's block is 64 bytes.
        let mut padded = Zeroizing::new([0u8; 64]);
        padded[..bytes.len()].copy_from_slice(bytes);
        let key = hmac::digest::Key::<HmacSha256>::from_slice(padded.as_slice());
        Self {
            keyed: <HmacSha256 as KeyInit>::new(key),
        }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    /// A value that tells this key from another without revealing it (an
    /// HMAC of a constant): stored beside a trail, it lets a server refuse
    /// to start with a key other than the one the trail was written with.
    pub fn check_value(&self) -> MacBytes {
        let mut m = self.mac();
        m.update(KEY_CHECK_DOMAIN);
        m.finalize().into_bytes().into()
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

// === impl Flags ===

impl Flags {
    /// The agent went away before the response was complete.
    pub const CLIENT_ABORTED: Flags = Flags(1);
    /// The provider echoed the credential; airlock redacted it.
    pub const CREDENTIAL_REDACTED: Flags = Flags(1 << 1);
    /// The response ended early (upstream error mid-body, or a stream cut
    /// short by airlock).
    pub const INCOMPLETE: Flags = Flags(1 << 2);
    /// airlock ended the response because the session was revoked or expired.
    pub const SESSION_ENDED: Flags = Flags(1 << 3);
    /// The record could not be stored when the call ended (the store
    /// failed) and was stored later. With `fail_closed`, the agent got a
    /// 503 `audit_unavailable`, or an answer cut short, rather than what
    /// the record says the provider answered.
    pub const WRITTEN_LATE: Flags = Flags(1 << 4);

    const NAMES: [(Flags, &'static str); 5] = [
        (Flags::CLIENT_ABORTED, "client_aborted"),
        (Flags::CREDENTIAL_REDACTED, "credential_redacted"),
        (Flags::INCOMPLETE, "incomplete"),
        (Flags::SESSION_ENDED, "session_ended"),
        (Flags::WRITTEN_LATE, "written_late"),
    ];

    /// No flags.
    pub const fn empty() -> Self {
        Flags(0)
    }

    /// The bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from bits; unknown bits are refused.
    pub fn from_bits(bits: u32) -> Option<Self> {
        let known = Self::NAMES.iter().fold(0, |acc, (f, _)| acc | f.0);
        (bits & !known == 0).then_some(Flags(bits))
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the flags of `other`.
    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    /// Both sets of flags.
    pub const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    fn names(self) -> Vec<String> {
        Self::NAMES
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| (*n).to_owned())
            .collect()
    }

    fn from_names(names: &[String]) -> Result<Self, String> {
        let mut flags = Flags::empty();
        for name in names {
            let (flag, _) = Self::NAMES
                .iter()
                .find(|(_, n)| n == name)
                .ok_or_else(|| format!("unknown flag {name:?}"))?;
            flags.insert(*flag);
        }
        Ok(flags)
    }
}

// === impl AuditRecord ===

impl AuditRecord {
    /// The record's MAC under `key`, over every field but `mac`.
    pub fn compute_mac(&self, key: &AuditKey) -> MacBytes {
        let mut mac = key.mac();
        mac.update(RECORD_DOMAIN);
        mac.update(&self.chain.to_be_bytes());
        mac.update(&self.seq.to_be_bytes());
        mac.update(&self.ts_ms.to_be_bytes());
        update_opt_str(&mut mac, self.session.as_deref());
        update_opt_str(&mut mac, self.provider.as_deref());
        update_str(&mut mac, &self.method);
        update_str(&mut mac, &self.path);
        update_str(&mut mac, &self.decision);
        mac.update(&self.status.to_be_bytes());
        match self.upstream_status {
            Some(s) => {
                mac.update(&[1]);
                mac.update(&s.to_be_bytes());
            }
            None => mac.update(&[0]),
        }
        mac.update(&self.duration_us.to_be_bytes());
        mac.update(&self.bytes_in.to_be_bytes());
        mac.update(&self.bytes_out.to_be_bytes());
        mac.update(&self.flags.0.to_be_bytes());
        mac.update(&self.prev_mac);
        mac.finalize().into_bytes().into()
    }

    /// Links the record after `prev_mac` at `seq` and computes its mac.
    pub fn seal(&mut self, key: &AuditKey, chain: u32, seq: u64, prev_mac: MacBytes) {
        self.chain = chain;
        self.seq = seq;
        self.prev_mac = prev_mac;
        self.mac = self.compute_mac(key);
    }

    /// One JSON line (no trailing newline).
    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serialises.
        serde_json::to_string(&self.to_wire()).unwrap_or_default()
    }

    /// The JSON value of the record.
    pub fn to_json_value(&self) -> serde_json::Value {
        serde_json::to_value(self.to_wire()).unwrap_or_default()
    }

    /// Parses one JSON line. Every field must hold exactly the value
    /// [`Self::to_json`] prints for the record it describes, so that no edit
    /// can hide in a field's spelling (`1.2360001` ms read as the 1236 µs the
    /// mac covers, a timestamp with extra digits); how the line is laid out
    /// (spaces, key order, `\u` escapes, as another JSON tool writes it back)
    /// is not part of the record.
    pub fn from_json(line: &str) -> Result<Self, String> {
        // Straight into the struct: a key given twice is refused (a reader
        // keeping its first value would see another record than one keeping
        // the last), as is a key the record does not have.
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        has_every_field(&value)?;
        let wire: WireRecord =
            serde_json::from_str(line).map_err(|e| format!("not a record: {e}"))?;
        let record = Self::from_wire(wire.clone())?;
        if record.to_wire() != wire {
            return Err("fields are not in canonical form".to_owned());
        }
        Ok(record)
    }

    /// The record a JSON value describes, as the admin API lists records
    /// (`GET /v1/audit`). A value has no key order or spelling to check, so
    /// unlike [`Self::from_json`] this takes any order of the fields; what
    /// they hold is still the record's, which its mac covers.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, String> {
        has_every_field(&value)?;
        let wire: WireRecord =
            serde_json::from_value(value).map_err(|e| format!("not a record: {e}"))?;
        Self::from_wire(wire)
    }

    fn to_wire(&self) -> WireRecord {
        WireRecord {
            chain: self.chain,
            seq: self.seq,
            ts: format_ts(self.ts_ms),
            session: self.session.as_deref().map(str::to_owned),
            provider: self.provider.as_deref().map(str::to_owned),
            method: self.method.to_string(),
            path: self.path.clone(),
            decision: self.decision.to_string(),
            status: self.status,
            upstream_status: self.upstream_status,
            duration_ms: self.duration_us as f64 / 1000.0,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            flags: self.flags.names(),
            prev_mac: hex::encode(self.prev_mac),
            mac: hex::encode(self.mac),
        }
    }

    fn from_wire(w: WireRecord) -> Result<Self, String> {
        let ts = OffsetDateTime::parse(&w.ts, &Rfc3339).map_err(|e| format!("ts: {e}"))?;
        let ts_ms = i64::try_from(ts.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| "ts out of range".to_owned())?;
        if !(w.duration_ms.is_finite() && w.duration_ms >= 0.0) {
            return Err("duration_ms must be a non-negative number".to_owned());
        }
        Ok(Self {
            chain: w.chain,
            seq: w.seq,
            ts_ms,
            session: w.session.map(Arc::from),
            provider: w.provider.map(Arc::from),
            method: Cow::Owned(w.method),
            path: w.path,
            decision: Cow::Owned(w.decision),
            status: w.status,
            upstream_status: w.upstream_status,
            // Rounding back is exact for every value `to_wire` produces; the
            // check in `from_json` refuses any other.
            duration_us: (w.duration_ms * 1000.0).round() as u64,
            bytes_in: w.bytes_in,
            bytes_out: w.bytes_out,
            flags: Flags::from_names(&w.flags)?,
            prev_mac: decode_mac("prev_mac", &w.prev_mac)?,
            mac: decode_mac("mac", &w.mac)?,
        })
    }
}

/// Cuts a request path to what a record keeps: no query, no session token,
/// at most [`MAX_PATH_LEN`] bytes (on a char boundary, marked with `…`).
///
/// An agent may put a token in the path, by mistake or to smuggle it (the
/// call is then refused). Whatever has a token's shape — `sess_` and at
/// least [`crate::token::TOKEN_RUN_MIN`] letters, digits or `_`, spelled plainly or in
/// escapes — is withheld: `sess_[withheld]`. A path that held one is
/// recorded decoded, as it could not be cut out of the escapes.
///
/// A recorded path is visible ASCII (but for the `…` of a cut): any other
/// byte (an HTTP/2 `:path` may carry UTF-8, such as U+2028, a line break
/// to many log viewers) is written as its escape, so that no log line or
/// record can be split or dressed up by the agent. (`%` itself is kept, so
/// a path that spelled such an escape reads the same.)
pub fn record_path(path: &str) -> String {
    cut(escape_invisible(withhold_tokens(path)))
}

/// [`record_path`] of `path` with `secrets` withheld as well, for a call
/// whose own token's random part (without its `sess_`), or another token it
/// presents, appears in its path: `None` when none does.
pub fn record_path_withholding(path: &str, secrets: &[&str]) -> Option<String> {
    let decoded = decode(path);
    let mut present = secrets
        .iter()
        .filter(|secret| !secret.is_empty() && decoded.contains(**secret))
        .peekable();
    present.peek()?;
    let mut without = decoded.to_string();
    for secret in present {
        without = without.replace(*secret, WITHHELD);
    }
    Some(cut(escape_invisible(withhold_tokens(&without))))
}

/// `path` with every byte outside visible ASCII written as `%XX` (one pass
/// to look, none to copy for the paths HTTP/1.1 lets through).
fn escape_invisible(path: Cow<'_, str>) -> Cow<'_, str> {
    if path.bytes().all(|b| b.is_ascii_graphic()) {
        return path;
    }
    let mut out = String::with_capacity(path.len() * 3);
    for b in path.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    Cow::Owned(out)
}

/// `path` with every token shape withheld (decoded if it held one).
fn withhold_tokens(path: &str) -> Cow<'_, str> {
    if !may_hold_token(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    match crate::token::withhold_runs(&decode(path)) {
        Some(withheld) => Cow::Owned(withheld),
        None => Cow::Borrowed(path),
    }
}

/// Whether `path` has an escape or a `sess_` (one pass, no searcher to
/// set up: this runs for every call).
fn may_hold_token(path: &[u8]) -> bool {
    let prefix = TOKEN_PREFIX.as_bytes();
    memchr::memchr2_iter(b'%', b'_', path).any(|i| path[i] == b'%' || path[..=i].ends_with(prefix))
}

/// `path` with the escapes of visible ASCII characters decoded (what a
/// token can be spelled with); every other escape stays as it is, so that
/// a recorded path never holds a control character (a line break in the
/// log) or anything outside visible ASCII.
fn decode(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let visible = (bytes[i] == b'%')
            .then(|| crate::path::decode_escape(bytes.get(i + 1..i + 3)))
            .flatten()
            .filter(u8::is_ascii_graphic);
        match visible {
            Some(b) => {
                out.push(char::from(b));
                i += 3;
            }
            None => {
                out.push(char::from(bytes[i]));
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// `path` cut at [`MAX_PATH_LEN`] bytes.
fn cut(path: Cow<'_, str>) -> String {
    if path.len() <= MAX_PATH_LEN {
        return path.into_owned();
    }
    let mut end = MAX_PATH_LEN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// The seal of a chain head: proves `(chain, seq, mac)` was a head the
/// server wrote.
pub fn head_seal(key: &AuditKey, chain: u32, seq: u64, mac: &MacBytes) -> MacBytes {
    position_seal(key, HEAD_DOMAIN, chain, seq, mac)
}

/// The seal of a chain floor: proves that `(chain, seq, mac)` — the last
/// record removed when the chain's older records were pruned — was written
/// by someone holding the key, so that the chain may start after `seq`.
pub fn floor_seal(key: &AuditKey, chain: u32, seq: u64, mac: &MacBytes) -> MacBytes {
    position_seal(key, FLOOR_DOMAIN, chain, seq, mac)
}

/// The HMAC of a position in a chain, `(chain, seq, mac)`, for one use
/// (`domain`: a head, a floor), so that a seal of one use is never valid
/// for another.
fn position_seal(key: &AuditKey, domain: &[u8], chain: u32, seq: u64, mac: &MacBytes) -> MacBytes {
    let mut m = key.mac();
    m.update(domain);
    m.update(&chain.to_be_bytes());
    m.update(&seq.to_be_bytes());
    m.update(mac);
    m.finalize().into_bytes().into()
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub fn format_ts(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let ts = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (y, mo, d) = (ts.year(), u8::from(ts.month()), ts.day());
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        ts.hour(),
        ts.minute(),
        ts.second(),
        ts.millisecond()
    )
}

fn decode_mac(field: &str, text: &str) -> Result<MacBytes, String> {
    let bytes = hex::decode(text).map_err(|e| format!("{field}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{field}: expected {MAC_LEN} bytes"))
}

fn update_str(mac: &mut HmacSha256, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(s.as_bytes());
}

fn update_opt_str(mac: &mut HmacSha256, s: Option<&str>) {
    match s {
        Some(s) => {
            mac.update(&[1]);
            update_str(mac, s);
        }
        None => mac.update(&[0]),
    }
}

// === impl BreakReason ===

impl fmt::Display for BreakReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMac => f.write_str("bad mac: the record was altered or forged"),
            Self::Gap { expected } => write!(f, "gap: record {expected} is missing"),
            Self::OutOfOrder { expected } => {
                write!(f, "out of order: expected record {expected} here")
            }
            Self::BrokenLink => {
                f.write_str("broken link: prev_mac does not match the previous record")
            }
            Self::Truncated { head_seq } => {
                write!(
                    f,
                    "truncated: missing (the chain ends before its sealed head, record {head_seq})"
                )
            }
            Self::BadHead => f.write_str("bad head: the chain head's seal is not valid"),
            Self::NoHead => f.write_str(
                "no head: the chain's records are stored but its sealed head is gone \
                 (deleted), so records may have been cut off its end or altered",
            ),
            Self::BadFloor => f.write_str(
                "bad floor: the seal of the point the chain was pruned to is not valid, so \
                 records may have been removed from its start",
            ),
            Self::Malformed(why) => write!(f, "malformed record: {why}"),
        }
    }
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chain {} seq {}: {}", self.chain, self.seq, self.reason)
    }
}

// === impl ChainVerifier ===

impl<'k> ChainVerifier<'k> {
    /// A verifier for whole chains: each must start at seq 1.
    pub fn from_start(key: &'k AuditKey) -> Self {
        Self::new(key, true, false)
    }

    /// A verifier for an export: chains may start at any seq.
    pub fn partial(key: &'k AuditKey) -> Self {
        Self::new(key, false, false)
    }

    /// A verifier for an export filtered by session: seqs may jump.
    pub fn allow_gaps(key: &'k AuditKey) -> Self {
        Self::new(key, false, true)
    }

    fn new(key: &'k AuditKey, from_start: bool, allow_gaps: bool) -> Self {
        Self {
            key,
            from_start,
            allow_gaps,
            chains: HashMap::new(),
            records: 0,
        }
    }

    /// Records checked so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Chains seen so far.
    pub fn chains(&self) -> usize {
        self.chains.len()
    }

    /// Starts `chain` after its floor: the records up to `seq` were pruned
    /// and the last of them had `mac`, so the next record must be `seq + 1`
    /// and link to `mac`. Checks the floor's `seal` first: a floor without
    /// a valid one breaks the chain at `seq + 1` (and starts nothing).
    pub fn start_after(
        &mut self,
        chain: u32,
        seq: u64,
        mac: &MacBytes,
        seal: &MacBytes,
    ) -> Result<(), Break> {
        if floor_seal(self.key, chain, seq, mac) != *seal {
            return Err(Break {
                chain,
                seq: seq.saturating_add(1),
                reason: BreakReason::BadFloor,
            });
        }
        self.chains.insert(chain, (seq, *mac));
        Ok(())
    }

    /// The last (seq, mac) seen on `chain`.
    pub fn last(&self, chain: u32) -> Option<(u64, MacBytes)> {
        self.chains.get(&chain).copied()
    }

    /// Checks the next record. `next` is the record after it, if known: it
    /// tells a swap (out of order) from a deletion (gap).
    pub fn check(&mut self, record: &AuditRecord, next: Option<&AuditRecord>) -> Result<(), Break> {
        let fail = |reason| Break {
            chain: record.chain,
            seq: record.seq,
            reason,
        };
        let expected = match self.chains.get(&record.chain) {
            Some((last_seq, _)) => Some(last_seq + 1),
            None if self.from_start => Some(1),
            None => None,
        };
        if let Some(expected) = expected {
            if record.seq < expected {
                return Err(fail(BreakReason::OutOfOrder { expected }));
            }
            if record.seq > expected && !self.allow_gaps {
                let swapped = next.is_some_and(|n| n.chain == record.chain && n.seq == expected);
                return Err(fail(if swapped {
                    BreakReason::OutOfOrder { expected }
                } else {
                    BreakReason::Gap { expected }
                }));
            }
        }
        if record.compute_mac(self.key) != record.mac {
            return Err(fail(BreakReason::BadMac));
        }
        let linked = match self.chains.get(&record.chain) {
            Some((last_seq, last_mac)) if *last_seq + 1 == record.seq => {
                record.prev_mac == *last_mac
            }
            Some(_) => true,
            None if record.seq == 1 => record.prev_mac == GENESIS_MAC,
            None => true,
        };
        if !linked {
            return Err(fail(BreakReason::BrokenLink));
        }
        self.chains.insert(record.chain, (record.seq, record.mac));
        self.records += 1;
        Ok(())
    }

    /// Checks that `chain` ends at the sealed head `(head_seq, head_mac,
    /// seal)`: nothing was cut off its end.
    pub fn check_head(
        &self,
        chain: u32,
        head_seq: u64,
        head_mac: &MacBytes,
        seal: &MacBytes,
    ) -> Result<(), Break> {
        let (last_seq, last_mac) = self.last(chain).unwrap_or((0, GENESIS_MAC));
        let fail = |reason| Break {
            chain,
            seq: last_seq,
            reason,
        };
        if head_seal(self.key, chain, head_seq, head_mac) != *seal {
            return Err(fail(BreakReason::BadHead));
        }
        if head_seq > last_seq {
            return Err(Break {
                chain,
                seq: last_seq + 1,
                reason: BreakReason::Truncated { head_seq },
            });
        }
        if head_seq == last_seq && *head_mac != last_mac {
            return Err(fail(BreakReason::BadHead));
        }
        // A head behind the last record means records were appended after
        // the head was written; those records verified on their own.
        Ok(())
    }
}

#[cfg(test)]
mod tests;
