//! The audit journal: where the SQLite store's audit writer puts each batch
//! first, so that a call waits for one `write` to an append-only file
//! rather than for a SQLite commit.
//!
//! A commit at concurrency 1 holds one record, and SQLite writes whole
//! pages: about 5.6 KiB reached the disk per call, and the kernel's
//! write-back of it, competing with the proxy for the CPUs, was the tail of
//! the calls' latency (see BENCHMARKS.md). A batch in the journal is its
//! encoded records and the head it moves the chain to (about 200 bytes a
//! record); a thread of its own moves what the journal holds into the database every [`INGEST_EVERY`], many
//! batches to a commit (each still a row of its own), and then empties the
//! file, whose pages mostly never reach the disk at all.
//!
//! **Durability.** An appended batch is in the kernel's page cache, as a
//! commit at `synchronous = NORMAL` is in SQLite's log: it survives the
//! process (a crash, `kill -9`) and may be lost with the machine. The next
//! server on the store moves a dead server's journal into the database
//! before it claims the chain ([`Journal::replay`]); the batches the
//! database already holds (a crash between an ingest's commit and the
//! file's truncation) are skipped by seq, checked against the head's mac.
//! A batch cut short by a crash in its `write` was not acknowledged (a
//! failed write is cut off the file before the error is returned), so a
//! torn end is dropped (logged).
//!
//! **Readers.** Within the process every audit read first moves the
//! journal into the database ([`Journal::ingest`], the read barrier), so the
//! admin API and `audit prune` see every acknowledged record. Another
//! process (`airlock audit verify`/`tail` on the file) sees a consistent
//! trail that lags by up to [`INGEST_EVERY`].
//!
//! **Ownership.** The journal is two files next to the database,
//! `DATABASE-auditlog-a` and `-b`: one takes appends while the other's
//! batches are being committed, then is emptied. Only the audit writer of
//! a server takes the journal (`Store::audit_use_journal`), holding an
//! exclusive `flock` on `-a` for as long as it runs; one that cannot take
//! it (another holds it) is refused (`StoreError::JournalHeld`): committing
//! beside it could take seqs the holder acknowledged. Other processes
//! (`airlock audit ...`) never touch it.
//!
//! **Failure.** When an ingest fails (the database locked past the busy
//! timeout, the disk full), appends are refused until one succeeds — the
//! audit writer then fails closed and probes, and a probe is an ingest —
//! and so they are while an ingest has run longer than [`INGEST_STALL`]:
//! the journal holds at most a few seconds' worth of batches the
//! database did not take.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use airlock_core::audit::{AuditRecord, MacBytes, MAC_LEN};
use parking_lot::Mutex;

use crate::audit_batch::{decode_batch, encode_batch, summarise};
use crate::{ChainHead, Result, StoreError};

/// How often the journal's batches are moved into the database. Each move
/// takes the CPU for a moment (at concurrency 1 flat out, about 35 records
/// every 5 ms); every 20 ms, or every 100 ms, the calls' p99 was higher
/// (see BENCHMARKS.md).
pub(super) const INGEST_EVERY: Duration = Duration::from_millis(5);

/// Journal bytes at which an append wakes the ingest thread at once.
const INGEST_SOON_BYTES: usize = 1 << 20;

/// Journal bytes at which an append moves the journal into the database
/// itself before it returns: should the ingest thread fall behind, this
/// bounds the memory the pending batches take (and makes the calls wait,
/// as before the journal).
const INGEST_NOW_BYTES: usize = 8 << 20;

/// How long an ingest may run before appends are refused: the journal
/// then holds what the database could not take for that long, and the
/// audit writer fails closed (the database locked by another process, a
/// disk that stopped answering) rather than piling up records.
const INGEST_STALL: Duration = Duration::from_secs(2);

/// Records at most in one transaction of an ingest.
const INGEST_GROUP: usize = 4096;

/// Longest frame a journal may hold (a batch of the largest records the
/// writer groups is far below it): anything longer is a torn length.
const MAX_FRAME: usize = 64 << 20;

/// Bytes of a frame's header: payload length and CRC-32, both u32 LE.
const FRAME_HEADER: usize = 8;

/// Bytes of the head at the start of a frame's payload.
const HEAD_LEN: usize = 4 + 8 + MAC_LEN + MAC_LEN;

/// A chain's head in the database, seq and mac (`None`: no such chain).
pub(super) type StoredHead<'a> = dyn FnMut(u32) -> Result<Option<(u64, MacBytes)>> + 'a;

/// Commits frames into the database in one transaction, each a batch of
/// its own.
pub(super) type CommitFn<'a> = dyn FnMut(&[Frame]) -> Result<()> + 'a;

/// The journal of one database file, held by this process.
pub(super) struct Journal {
    paths: [PathBuf; 2],
    /// `files[0]` carries the `flock`.
    files: [File; 2],
    appending: Mutex<Appending>,
    ingesting: Mutex<Ingesting>,
    /// Wakes the ingest thread early (see [`INGEST_SOON_BYTES`]).
    wake: Mutex<Option<mpsc::SyncSender<()>>>,
}

/// The file taking appends and what it holds.
struct Appending {
    active: usize,
    /// The frames appended to the active file since it became active
    /// (the file's content unless `dirty`, kept to spare the ingest a
    /// read).
    pending: Vec<u8>,
    /// Why appends are refused: the last ingest failed, or a failed write
    /// could not be cut off (`dirty`).
    refused: Option<String>,
    /// The batch being appended, encoded.
    encoded: Vec<u8>,
    /// When the ingest under way began.
    ingest_began: Option<Instant>,
    /// The active file holds what `pending` does not (a failed write that
    /// could not be cut off): the next ingest swaps files even with
    /// nothing pending, and empties it.
    dirty: bool,
    /// Each chain's head seq as the batches appended leave it (looked up
    /// in the database before a chain's first batch).
    heads: Vec<(u32, u64)>,
    closed: bool,
}

/// State kept between ingests.
struct Ingesting {
    /// An empty buffer, swapped in for the pending frames.
    spare: Vec<u8>,
    /// Frames a failed ingest left, and the file that holds them: committed
    /// before anything newer.
    stuck: Option<(usize, Vec<u8>)>,
}

/// One batch as the journal holds it.
pub(super) struct Frame {
    pub(super) head: ChainHead,
    pub(super) records: Vec<AuditRecord>,
    /// The records as `audit_batch` encodes them (what the row stores).
    pub(super) encoded: Vec<u8>,
}

// === impl Journal ===

impl Journal {
    /// Opens (creating) the journal of the database at `database` and takes
    /// its lock; `None` while another holder has it.
    pub(super) fn open(database: &Path) -> std::io::Result<Option<Self>> {
        let paths = paths_of(database);
        let first = open_file(&paths[0])?;
        match first.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let second = open_file(&paths[1])?;
        Ok(Some(Self {
            paths,
            files: [first, second],
            appending: Mutex::new(Appending {
                active: 0,
                pending: Vec::new(),
                refused: None,
                encoded: Vec::new(),
                ingest_began: None,
                dirty: false,
                heads: Vec::new(),
                closed: false,
            }),
            ingesting: Mutex::new(Ingesting {
                spare: Vec::new(),
                stuck: None,
            }),
            wake: Mutex::new(None),
        }))
    }

    /// Whether the files hold nothing (or do not exist).
    #[cfg(test)]
    fn is_empty_at(database: &Path) -> bool {
        paths_of(database)
            .iter()
            .all(|p| std::fs::metadata(p).map_or(true, |m| m.len() == 0))
    }

    /// Registers the ingest thread's wake-up.
    pub(super) fn set_wake(&self, wake: mpsc::SyncSender<()>) {
        *self.wake.lock() = Some(wake);
    }

    /// Moves what the files hold (a dead server's batches, or this one's
    /// before a restart) into the database: the batches after the chain's
    /// head there (`stored`), through `commit`; then empties both files.
    /// Returns the records moved. A journal that does not continue the
    /// database's chain is refused ([`StoreError::Corrupt`]).
    pub(super) fn replay(
        &self,
        stored: &mut StoredHead<'_>,
        commit: &mut CommitFn<'_>,
    ) -> Result<usize> {
        let mut frames = Vec::new();
        for (path, file) in self.paths.iter().zip(&self.files) {
            let mut bytes = Vec::new();
            // From the start whatever read before (appends go to the end
            // regardless).
            (&*file).seek(SeekFrom::Start(0)).map_err(io_error)?;
            (&*file).read_to_end(&mut bytes).map_err(io_error)?;
            let (mut read, _, torn) = decode_frames(&bytes);
            if torn > 0 {
                tracing::warn!(
                    path = %path.display(),
                    bytes = torn,
                    "the audit journal ends in a batch cut short (a crash while it was \
                     written, before it was acknowledged); dropped"
                );
            }
            frames.append(&mut read);
        }
        // The file that took appends last may be either: order by seq.
        frames.sort_by_key(|f| (f.head.chain, f.head.seq));
        let skip = self.leading_stored(&frames, stored)?;
        let fresh = frames.get(skip..).unwrap_or_default();
        commit_groups(fresh, commit).map_err(|(_, e)| e)?;
        for file in &self.files {
            file.set_len(0).map_err(io_error)?;
        }
        Ok(fresh.iter().map(|f| f.records.len()).sum())
    }

    /// How many of `frames` (in seq order) the database already holds: a
    /// crash or a failed answer came after their commit. Checked against
    /// the chain's head there: the frame ending at it must end with its
    /// mac, and the next must start right after it; otherwise the journal
    /// and the database went separate ways, which is refused.
    fn leading_stored(&self, frames: &[Frame], stored: &mut StoredHead<'_>) -> Result<usize> {
        let Some(first) = frames.first() else {
            return Ok(0);
        };
        let chain = first.head.chain;
        let diverged = |why: String| StoreError::Corrupt {
            what: format!("audit chain {chain}"),
            reason: format!(
                "the audit journal ({}) does not continue the chain the database holds ({why}); \
                 move the journal files away to start (their records will be missing from \
                 the trail)",
                self.paths[0].display()
            ),
        };
        let Some((seq, mac)) = stored(chain)? else {
            return Err(diverged("the database has no such chain".to_owned()));
        };
        let mut skip = 0;
        for frame in frames {
            if frame.head.chain != chain {
                return Err(diverged(format!(
                    "it also holds records of chain {}",
                    frame.head.chain
                )));
            }
            if frame.head.seq > seq {
                let starts = frame.records.first().map(|r| r.seq);
                if starts != seq.checked_add(1) {
                    return Err(diverged(format!(
                        "its next batch starts at record {} where the database's chain ends \
                         at record {seq}",
                        starts.unwrap_or(0)
                    )));
                }
                break;
            }
            if frame.head.seq == seq && frame.head.mac != mac {
                return Err(diverged(format!("record {seq} differs")));
            }
            skip += 1;
        }
        // All in the database: the last must end at its head (a database
        // that went on past the journal went its own way).
        if skip == frames.len() && frames.last().is_some_and(|f| f.head.seq != seq) {
            return Err(diverged(format!(
                "the database's chain goes on to record {seq}, past the journal's end"
            )));
        }
        Ok(skip)
    }

    /// Appends one batch: `records` moving their chain to `head`. Refused
    /// while the last ingest failed, while a failed write is left in the
    /// file, while the ingest under way has run longer than
    /// [`INGEST_STALL`], and once closed.
    ///
    /// The batch is checked as the database would check it, since it is
    /// acknowledged before it gets there: consecutive records ending at
    /// `head` ([`StoreError::InvalidBatch`]), starting right after the
    /// chain's head ([`StoreError::ChainConflict`]) — the head of the last
    /// batch appended, or before the first, the database's (`stored`).
    pub(super) fn append(
        &self,
        records: &[AuditRecord],
        head: &ChainHead,
        stored: &mut StoredHead<'_>,
    ) -> Result<()> {
        let mut guard = self.appending.lock();
        let appending = &mut *guard;
        if appending.closed {
            return Err(StoreError::Database(sqlx::Error::PoolClosed));
        }
        if let Some(reason) = &appending.refused {
            return Err(StoreError::JournalStuck(reason.clone()));
        }
        if appending
            .ingest_began
            .is_some_and(|began| began.elapsed() > INGEST_STALL)
        {
            return Err(StoreError::JournalStuck(format!(
                "moving it in has taken over {INGEST_STALL:?}"
            )));
        }
        let summary = summarise(records, head)?;
        let at = match appending.heads.iter_mut().find(|(c, _)| *c == head.chain) {
            Some((_, seq)) => seq,
            None => {
                let seq = stored(head.chain)?.map_or(0, |(seq, _)| seq);
                appending.heads.push((head.chain, seq));
                let last = appending.heads.len() - 1;
                &mut appending.heads[last].1
            }
        };
        if at.checked_add(1) != Some(summary.first_seq) {
            return Err(StoreError::ChainConflict(head.chain));
        }
        encode_batch(records, &mut appending.encoded)?;
        if appending.encoded.len() + HEAD_LEN > MAX_FRAME {
            return Err(StoreError::InvalidBatch(format!(
                "{} bytes encoded, more than a journal frame holds",
                appending.encoded.len()
            )));
        }
        let start = appending.pending.len();
        push_frame(&mut appending.pending, head, &appending.encoded);
        let active = appending.active;
        if let Err(e) = (&self.files[active]).write_all(&appending.pending[start..]) {
            // Nothing of a failed write may stay: a later frame would
            // follow garbage, which a replay stops at. Where the file
            // cannot be cut back, appends wait for an ingest to empty it.
            appending.pending.truncate(start);
            if let Err(cut) = self.files[active].set_len(start as u64) {
                appending.dirty = true;
                appending.refused =
                    Some(format!("a failed write left part of a batch in it ({cut})"));
            }
            return Err(io_error(e));
        }
        if let Some((_, seq)) = appending.heads.iter_mut().find(|(c, _)| *c == head.chain) {
            *seq = head.seq;
        }
        let size = appending.pending.len();
        drop(guard);
        if size >= INGEST_SOON_BYTES && start < INGEST_SOON_BYTES {
            if let Some(wake) = self.wake.lock().as_ref() {
                let _ = wake.try_send(());
            }
        }
        Ok(())
    }

    /// Whether the pending frames are past [`INGEST_NOW_BYTES`]: the
    /// appender then ingests itself.
    pub(super) fn overfull(&self) -> bool {
        self.appending.lock().pending.len() >= INGEST_NOW_BYTES
    }

    /// Moves every batch appended so far into the database through
    /// `commit`: first what a failed ingest left (less what the database
    /// turns out to hold already, see `stored`), then the active file's
    /// frames (appends go on into the other file meanwhile), which is
    /// emptied once they are in. A failure refuses appends until an ingest
    /// succeeds.
    pub(super) fn ingest(
        &self,
        stored: &mut StoredHead<'_>,
        commit: &mut CommitFn<'_>,
    ) -> Result<()> {
        let mut ingesting = self.ingesting.lock();
        self.appending.lock().ingest_began = Some(Instant::now());
        let result = self.ingest_locked(&mut ingesting, stored, commit);
        let mut appending = self.appending.lock();
        appending.ingest_began = None;
        // A failed write left in the file is cleared only by the ingest
        // that empties that file (`dirty` is unset then).
        if result.is_ok() && !appending.dirty {
            appending.refused = None;
        }
        result
    }

    fn ingest_locked(
        &self,
        ingesting: &mut Ingesting,
        stored: &mut StoredHead<'_>,
        commit: &mut CommitFn<'_>,
    ) -> Result<()> {
        if let Some((file, bytes)) = ingesting.stuck.take() {
            // The commit that failed may have landed all the same.
            self.move_in(ingesting, file, &bytes, Some(stored), commit)?;
        }
        let mut frames = std::mem::take(&mut ingesting.spare);
        let old = {
            let mut appending = self.appending.lock();
            if appending.pending.is_empty() && !appending.dirty {
                ingesting.spare = frames;
                return Ok(());
            }
            appending.dirty = false;
            std::mem::swap(&mut frames, &mut appending.pending);
            let old = appending.active;
            appending.active = 1 - old;
            old
        };
        let moved = self.move_in(ingesting, old, &frames, None, commit);
        frames.clear();
        ingesting.spare = frames;
        moved
    }

    /// Commits the frames in `bytes`, which `file` holds — less those the
    /// database already holds, when `stored` is given — then empties
    /// `file`. On failure what is left becomes `stuck`, for the next
    /// ingest, and appends are refused.
    fn move_in(
        &self,
        ingesting: &mut Ingesting,
        file: usize,
        bytes: &[u8],
        stored: Option<&mut StoredHead<'_>>,
        commit: &mut CommitFn<'_>,
    ) -> Result<()> {
        let (frames, starts, undecodable) = decode_frames(bytes);
        if undecodable > 0 {
            // This process wrote them: only a bug gets here.
            tracing::error!(
                bytes = undecodable,
                "audit journal frames that do not decode were left out"
            );
        }
        let skip = match stored.map(|stored| self.leading_stored(&frames, stored)) {
            None => 0,
            Some(Ok(skip)) => skip,
            Some(Err(e)) => {
                ingesting.stuck = Some((file, bytes.to_vec()));
                return Err(self.refuse(e));
            }
        };
        let rest = frames.get(skip..).unwrap_or_default();
        if let Err((failed, e)) = commit_groups(rest, commit) {
            let at = starts.get(skip + failed).copied().unwrap_or(0);
            ingesting.stuck = Some((file, bytes[at..].to_vec()));
            return Err(self.refuse(e));
        }
        if let Err(e) = self.files[file].set_len(0) {
            ingesting.stuck = Some((file, Vec::new()));
            return Err(self.refuse(io_error(e)));
        }
        Ok(())
    }

    /// Refuses appends from now on (until an ingest succeeds), for `e`.
    fn refuse(&self, e: StoreError) -> StoreError {
        let mut appending = self.appending.lock();
        if appending.refused.is_none() {
            tracing::error!(
                error = %e,
                "moving the audit journal into the database failed: audit writes are \
                 refused until it succeeds"
            );
        }
        appending.refused = Some(e.to_string());
        e
    }

    /// Stops appends: everything appended from now on fails.
    pub(super) fn close(&self) {
        self.appending.lock().closed = true;
        self.wake.lock().take();
    }

    /// Where the journal's first file is (for messages).
    pub(super) fn path(&self) -> &Path {
        &self.paths[0]
    }
}

/// The two files of the journal of `database`.
fn paths_of(database: &Path) -> [PathBuf; 2] {
    ["-auditlog-a", "-auditlog-b"].map(|suffix| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// Opens a journal file for reading and appending, readable by its owner
/// only (it holds audit records, as the database does).
fn open_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;

    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Database(sqlx::Error::Io(e))
}

/// Appends a frame to `out`: payload length, CRC-32 of the payload, then
/// the payload (the head, then the encoded batch).
fn push_frame(out: &mut Vec<u8>, head: &ChainHead, batch: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.extend_from_slice(&head.chain.to_le_bytes());
    out.extend_from_slice(&head.seq.to_le_bytes());
    out.extend_from_slice(&head.mac);
    out.extend_from_slice(&head.seal);
    out.extend_from_slice(batch);
    let payload = &out[start + FRAME_HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The frames of `bytes` up to the first that is cut short or does not
/// check, each with its offset, and how many bytes are left from there
/// (0: none).
fn decode_frames(bytes: &[u8]) -> (Vec<Frame>, Vec<usize>, usize) {
    let mut frames = Vec::new();
    let mut starts = Vec::new();
    let mut at = 0;
    while let Some((frame, used)) = bytes.get(at..).and_then(decode_frame) {
        frames.push(frame);
        starts.push(at);
        at += used;
    }
    (frames, starts, bytes.len() - at)
}

/// The frame at the start of `bytes` and its length, if whole and sound.
fn decode_frame(bytes: &[u8]) -> Option<(Frame, usize)> {
    let header = bytes.get(..FRAME_HEADER)?;
    let len = usize::try_from(u32::from_le_bytes(header[..4].try_into().ok()?)).ok()?;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if !(HEAD_LEN..=MAX_FRAME).contains(&len) {
        return None;
    }
    let payload = bytes.get(FRAME_HEADER..FRAME_HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let (head, batch) = payload.split_at(HEAD_LEN);
    let chain = u32::from_le_bytes(head[..4].try_into().ok()?);
    let seq = u64::from_le_bytes(head[4..12].try_into().ok()?);
    let mac: MacBytes = head[12..12 + MAC_LEN].try_into().ok()?;
    let seal: MacBytes = head[12 + MAC_LEN..].try_into().ok()?;
    let mut records = Vec::new();
    decode_batch(chain, batch, &mut records).ok()?;
    let head = ChainHead {
        chain,
        seq,
        mac,
        seal,
    };
    let encoded = batch.to_vec();
    Some((
        Frame {
            head,
            records,
            encoded,
        },
        FRAME_HEADER + len,
    ))
}

/// Commits `frames` in order, as many together as hold up to
/// [`INGEST_GROUP`] records; stops at the first failure, with the index of
/// the first frame not committed.
fn commit_groups(
    frames: &[Frame],
    commit: &mut CommitFn<'_>,
) -> std::result::Result<(), (usize, StoreError)> {
    let mut start = 0;
    while start < frames.len() {
        let mut count = 0;
        let end = start
            + frames[start..]
                .iter()
                .take_while(|f| {
                    count += f.records.len();
                    count <= INGEST_GROUP
                })
                .count()
                .max(1);
        commit(&frames[start..end]).map_err(|e| (start, e))?;
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use airlock_core::audit::{head_seal, AuditKey, Flags, GENESIS_MAC};

    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(&[7; 32])
    }

    /// `n` records sealed after `head`, and the head after them.
    fn batch_after(head: &ChainHead, n: u64) -> (Vec<AuditRecord>, ChainHead) {
        let key = key();
        let mut prev = head.mac;
        let mut records = Vec::new();
        for seq in head.seq + 1..=head.seq + n {
            let mut record = AuditRecord {
                chain: 0,
                seq: 0,
                ts_ms: 1_000 + i64::try_from(seq).unwrap(),
                session: Some("ses_j".into()),
                provider: Some("openai".into()),
                method: Cow::Borrowed("POST"),
                path: format!("/openai/v1/call/{seq}"),
                decision: Cow::Borrowed("allow"),
                status: 200,
                upstream_status: Some(200),
                duration_us: 10,
                bytes_in: 1,
                bytes_out: 2,
                flags: Flags::default(),
                prev_mac: GENESIS_MAC,
                mac: GENESIS_MAC,
            };
            record.seal(&key, head.chain, seq, prev);
            prev = record.mac;
            records.push(record);
        }
        let seq = head.seq + n;
        let next = ChainHead {
            chain: head.chain,
            seq,
            mac: prev,
            seal: head_seal(&key, head.chain, seq, &prev),
        };
        (records, next)
    }

    fn genesis() -> ChainHead {
        ChainHead {
            chain: 1,
            seq: 0,
            mac: GENESIS_MAC,
            seal: head_seal(&key(), 1, 0, &GENESIS_MAC),
        }
    }

    /// What a database would hold: the seqs committed, in commit order.
    #[derive(Default)]
    struct Committed {
        seqs: Vec<u64>,
        head: u64,
        /// Commits still to fail.
        failures: usize,
    }

    impl Committed {
        fn commit(&mut self, frames: &[Frame]) -> Result<()> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(StoreError::TimedOut(Duration::from_secs(5)));
            }
            for frame in frames {
                assert_eq!(frame.records[0].seq, self.head + 1, "out of order");
                self.seqs.extend(frame.records.iter().map(|r| r.seq));
                self.head = frame.head.seq;
            }
            Ok(())
        }
    }

    fn no_head(_: u32) -> Result<Option<(u64, MacBytes)>> {
        Ok(Some((0, GENESIS_MAC)))
    }

    /// Appends batches of `sizes` records after `head`; returns the head.
    fn append_batches(journal: &Journal, mut head: ChainHead, sizes: &[u64]) -> ChainHead {
        for &n in sizes {
            let (records, next) = batch_after(&head, n);
            journal.append(&records, &next, &mut no_head).unwrap();
            head = next;
        }
        head
    }

    #[test]
    fn a_dead_writer_s_batches_are_replayed_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let journal = Journal::open(&db).unwrap().unwrap();
        // A second process finds the journal held.
        assert!(Journal::open(&db).unwrap().is_none());
        // Four batches, then the process dies. The first two reached the
        // database (records 1 to 3) but the file still holds them: a crash
        // between an ingest's commit and the file's truncation.
        let third = append_batches(&journal, genesis(), &[1, 2]);
        let last = append_batches(&journal, third.clone(), &[3, 1]);
        drop(journal);
        let journal = Journal::open(&db).unwrap().unwrap();
        // A database whose record 3 is another one, or whose chain went
        // on past the journal's end: refused, kept.
        let err = journal.replay(&mut |_| Ok(Some((3, [9; 32]))), &mut |_| Ok(()));
        assert!(matches!(err, Err(StoreError::Corrupt { .. })), "{err:?}");
        let err = journal.replay(&mut |_| Ok(Some((9, last.mac))), &mut |_| Ok(()));
        assert!(matches!(err, Err(StoreError::Corrupt { .. })), "{err:?}");
        let mut stored = |_| Ok(Some((3, third.mac)));
        let mut replayed = Committed {
            head: 3,
            ..Committed::default()
        };
        let moved = journal
            .replay(&mut stored, &mut |f| replayed.commit(f))
            .unwrap();
        assert_eq!(moved, 4);
        assert_eq!(replayed.seqs, [4, 5, 6, 7]);
        // Nothing is left to replay.
        let mut again = Committed::default();
        assert_eq!(
            journal
                .replay(&mut |_| Ok(Some((7, last.mac))), &mut |f| again.commit(f))
                .unwrap(),
            0
        );
        assert!(Journal::is_empty_at(&db));
    }

    #[test]
    fn a_batch_cut_short_is_dropped_and_the_rest_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let journal = Journal::open(&db).unwrap().unwrap();
        append_batches(&journal, genesis(), &[2, 2, 2]);
        let path = journal.path().to_path_buf();
        drop(journal);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let journal = Journal::open(&db).unwrap().unwrap();
        let mut replayed = Committed::default();
        let moved = journal
            .replay(&mut no_head, &mut |f| replayed.commit(f))
            .unwrap();
        assert_eq!((moved, replayed.seqs), (4, vec![1, 2, 3, 4]));
    }

    #[test]
    fn a_failed_ingest_refuses_appends_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("a.db")).unwrap().unwrap();
        let mut committed = Committed {
            failures: 2,
            ..Committed::default()
        };
        let head = append_batches(&journal, genesis(), &[1, 1]);
        assert!(journal
            .ingest(&mut no_head, &mut |f| committed.commit(f))
            .is_err());
        let (records, next) = batch_after(&head, 1);
        let refused = journal.append(&records, &next, &mut no_head);
        assert!(
            matches!(refused, Err(StoreError::JournalStuck(_))),
            "{refused:?}"
        );
        assert!(journal
            .ingest(&mut no_head, &mut |f| committed.commit(f))
            .is_err());
        journal
            .ingest(&mut no_head, &mut |f| committed.commit(f))
            .unwrap();
        // Taken again, after the batches that waited.
        journal.append(&records, &next, &mut no_head).unwrap();
        journal
            .ingest(&mut no_head, &mut |f| committed.commit(f))
            .unwrap();
        assert_eq!(committed.seqs, [1, 2, 3]);
        assert!(Journal::is_empty_at(&dir.path().join("a.db")));
    }

    /// A commit reported failed that landed all the same: the retry skips
    /// what the database holds, so nothing is there twice.
    #[test]
    fn a_failed_commit_that_landed_is_not_committed_twice() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("a.db")).unwrap().unwrap();
        let head = append_batches(&journal, genesis(), &[1, 2]);
        let database = std::cell::RefCell::new(Committed::default());
        let mut landed_but_failed = |frames: &[Frame]| {
            database.borrow_mut().commit(frames)?;
            Err(StoreError::TimedOut(Duration::from_secs(5)))
        };
        assert!(journal
            .ingest(&mut no_head, &mut landed_but_failed)
            .is_err());
        // (A commit of them again would trip `Committed`'s order check.)
        let mut stored = |_| Ok(Some((database.borrow().head, head.mac)));
        journal
            .ingest(&mut stored, &mut |f| database.borrow_mut().commit(f))
            .unwrap();
        append_batches(&journal, head, &[1]);
        journal
            .ingest(&mut no_head, &mut |f| database.borrow_mut().commit(f))
            .unwrap();
        assert_eq!(database.borrow().seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn batches_the_database_would_refuse_are_refused_before_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("a.db")).unwrap().unwrap();
        let head = append_batches(&journal, genesis(), &[2]);
        // A stale writer, then one leaving a gap.
        let (stale, stale_head) = batch_after(&genesis(), 1);
        let err = journal.append(&stale, &stale_head, &mut no_head);
        assert!(matches!(err, Err(StoreError::ChainConflict(1))), "{err:?}");
        let (_, further) = batch_after(&head, 1);
        let (gap, gap_head) = batch_after(&further, 1);
        let err = journal.append(&gap, &gap_head, &mut no_head);
        assert!(matches!(err, Err(StoreError::ChainConflict(1))), "{err:?}");
        // Records that do not end at the head they claim.
        let (records, mut next) = batch_after(&head, 2);
        next.seq += 1;
        let err = journal.append(&records, &next, &mut no_head);
        assert!(matches!(err, Err(StoreError::InvalidBatch(_))), "{err:?}");
        // The chain's head in the database is where a new journal starts.
        drop(journal);
        let journal = Journal::open(&dir.path().join("a.db")).unwrap().unwrap();
        let (records, next) = batch_after(&genesis(), 1);
        let err = journal.append(&records, &next, &mut |_| Ok(Some((2, [0; 32]))));
        assert!(matches!(err, Err(StoreError::ChainConflict(1))), "{err:?}");
    }
}
