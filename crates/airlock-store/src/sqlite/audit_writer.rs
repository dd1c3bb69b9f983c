//! The SQLite audit trail's write path: one `rusqlite` connection to the
//! store's file, on which each batch of records becomes one row (see
//! `audit_batch`). Once the audit writer asked for the journal
//! ([`AuditWriter::use_journal`], see `journal`), an append goes to the
//! journal and the thread `airlock-audit-journal` commits the batches it
//! holds, many to a transaction; until then, and in a process that cannot
//! have the journal, each batch is committed in a transaction of its own.
//!
//! Going through sqlx costs a round trip to its worker thread for every
//! statement of a batch (BEGIN, the head update, the insert, COMMIT); here
//! a batch is one call on one connection, with statements prepared once.
//! The audit writer, which runs on a thread of its own, appends with
//! [`AuditWriter::append_blocking`] — no hand-off to another thread at all;
//! other callers use [`AuditWriter::append`], which runs the same on
//! tokio's blocking pool.
//!
//! Once the store is closed ([`AuditWriter::close`]) the connection is gone
//! and every later append fails with an error, never a panic or a wait.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use airlock_core::audit::{AuditRecord, MacBytes};
use parking_lot::{Mutex, RwLock};
use rusqlite::{ffi, params, CachedStatement, Connection, OpenFlags, OptionalExtension};
use sqlx::error::{DatabaseError, ErrorKind};

use super::audit_batches::LAST_TS_MAX;
use super::checkpointer::{Checkpointer, Commits, FileWatch, WRITER_CHECKPOINT_PAGES};
use super::journal::{Frame, Journal, INGEST_EVERY};
use crate::audit_batch::{encode_batch, sessions, summarise};
use crate::batch_trail::{INSERT_BATCH, INSERT_SESSION};
use crate::to_i64;
use crate::{ChainHead, Result, StoreError};

/// What the pool's connections wait for a lock held elsewhere; the writer
/// waits as long, then fails (which is what turns a fail-closed auditor's
/// gate).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const BEGIN: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";
/// Moves the head only from where the batch starts: a writer that is not
/// at the head learns it before inserting anything.
const MOVE_HEAD: &str = "UPDATE audit_chains SET head_seq = ?1, head_mac = ?2, head_seal = ?3 \
     WHERE id = ?4 AND head_seq = ?5";

/// The audit trail's connection and the buffer batches are encoded into;
/// `None` once closed.
type Slot = Arc<Mutex<Option<Open>>>;

struct Open {
    conn: Connection,
    encoded: Vec<u8>,
    /// The last batch this connection committed, which spares the next
    /// append a look-up of its `ts_max`.
    last: Option<LastBatch>,
    /// Commits made, for the checkpoint thread's cadence.
    commits: Commits,
}

/// What the next append needs of the batch before it.
#[derive(Clone, Copy, Debug)]
struct LastBatch {
    chain: i64,
    last_seq: u64,
    ts_max: i64,
}

/// The audit write path of one SQLite store.
pub(super) struct AuditWriter {
    conn: Slot,
    /// The database file (the journal is named after it).
    database: PathBuf,
    /// Takes the appends once the audit writer asked for it
    /// ([`AuditWriter::use_journal`]) and this process holds the journal's
    /// lock (see `journal`); unset, appends commit directly.
    journal: RwLock<Option<Arc<Journal>>>,
    /// Moves the journal into the database; stops with the writer.
    ingester: Mutex<Option<Ingester>>,
    /// Whether the file opened is still at its path.
    watch: Arc<FileWatch>,
    /// Keeps commits free of checkpoints; stops when the writer is closed
    /// (or dropped).
    checkpointer: Mutex<Option<Checkpointer>>,
}

// === impl AuditWriter ===

impl AuditWriter {
    /// Opens the connection to the database file at `path` (which must
    /// exist and be migrated) and prepares its statements.
    pub(super) async fn start(path: PathBuf) -> Result<Self> {
        // The journal is named after the file itself, whatever link led
        // to it, so that every process finds the same one.
        let database = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let watch = Arc::new(FileWatch::of(&path).map_err(io_error)?);
        let checkpoint_watch = Arc::clone(&watch);
        let commits = Commits::default();
        let checkpoint_commits = Arc::clone(&commits);
        // Both block: starting the checkpoint thread waits for it to run.
        let (checkpointer, opened) = tokio::task::spawn_blocking(move || {
            let checkpointer =
                Checkpointer::start(path.clone(), checkpoint_watch, checkpoint_commits);
            (checkpointer, connect(&path))
        })
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::WorkerCrashed))?;
        let checkpointer = checkpointer.map_err(io_error)?;
        let conn = opened.map_err(database_error)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(Some(Open {
                conn,
                encoded: Vec::new(),
                last: None,
                commits,
            }))),
            database,
            journal: RwLock::new(None),
            ingester: Mutex::new(None),
            watch,
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Makes this process the journal's owner, once: takes its lock,
    /// moves in what it holds (a dead server's batches), and starts the
    /// thread that moves appends in from then on. `false` once the store
    /// is closed; [`StoreError::JournalHeld`] when another holder keeps the
    /// lock past `LOCK_PATIENCE` (committing beside it could take seqs it
    /// acknowledged).
    pub(super) async fn use_journal(&self) -> Result<bool> {
        if self.journal.read().is_some() {
            return Ok(true);
        }
        if self.conn.lock().is_none() {
            return Ok(false);
        }
        let database = self.database.clone();
        let conn = Arc::clone(&self.conn);
        let journal = tokio::task::spawn_blocking(move || {
            let Some(journal) = open_patiently(&database)? else {
                return Err(StoreError::JournalHeld(database));
            };
            let moved = replay(&journal, &conn)?;
            if moved > 0 {
                tracing::info!(
                    records = moved,
                    "audit records from the journal moved into the database"
                );
            }
            Ok(Arc::new(journal))
        })
        .await
        .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed)))?;
        let ingester = Ingester::start(
            Arc::downgrade(&journal),
            Arc::clone(&self.conn),
            Arc::clone(&self.watch),
        )
        .map_err(io_error)?;
        *self.ingester.lock() = Some(ingester);
        *self.journal.write() = Some(journal);
        Ok(true)
    }

    /// Moves every batch the journal holds into the database (the read
    /// barrier: after it, the database holds every record appended before).
    pub(super) async fn flush(&self) -> Result<()> {
        let Some(journal) = self.journal.read().clone() else {
            return Ok(());
        };
        let conn = Arc::clone(&self.conn);
        let watch = Arc::clone(&self.watch);
        tokio::task::spawn_blocking(move || ingest(&journal, &conn, &watch))
            .await
            .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed)))
    }

    /// Appends `records` and moves the chain head to `head` in one
    /// transaction, on tokio's blocking pool; see `Store::audit_append`.
    pub(super) async fn append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        self.file_present()?;
        let conn = Arc::clone(&self.conn);
        let journal = self.journal.read().clone();
        let watch = Arc::clone(&self.watch);
        let records = records.to_vec();
        let head = head.clone();
        tokio::task::spawn_blocking(move || match journal {
            Some(journal) => journal_append(&journal, &conn, &watch, &records, &head),
            None => append_on(&conn, &records, &head),
        })
        .await
        .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed)))
    }

    /// The same as [`AuditWriter::append`], on the calling thread (which
    /// it blocks for the journal's write or the commit); see
    /// `Store::audit_append_blocking`.
    pub(super) fn append_blocking(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        self.file_present()?;
        match &*self.journal.read() {
            Some(journal) => journal_append(journal, &self.conn, &self.watch, records, head),
            None => append_on(&self.conn, records, head),
        }
    }

    /// Fails once the database file was deleted or replaced: what is
    /// written from then on would be lost with the file (see [`FileWatch`]).
    pub(super) fn file_present(&self) -> Result<()> {
        match self.watch.gone() {
            Some(path) => Err(StoreError::FileGone(path.to_path_buf())),
            None => Ok(()),
        }
    }

    /// Closes the connection, after the batch in progress (if any), and
    /// stops the checkpoints.
    pub(super) async fn close(&self) {
        let conn = Arc::clone(&self.conn);
        let checkpointer = self.checkpointer.lock().take();
        let journal = self.journal.write().take();
        let ingester = self.ingester.lock().take();
        let watch = Arc::clone(&self.watch);
        let closing = tokio::task::spawn_blocking(move || {
            if let Some(journal) = journal {
                journal.close();
                if let Some(ingester) = ingester {
                    ingester.stop();
                }
                if let Err(e) = ingest(&journal, &conn, &watch) {
                    tracing::error!(
                        error = %e,
                        journal = %journal.path().display(),
                        "audit records stay in the journal; the next server on the store \
                         moves them into the database before it starts"
                    );
                }
            }
            if let Some(open) = conn.lock().take() {
                close(open.conn);
            }
            if let Some(checkpointer) = checkpointer {
                checkpointer.stop();
            }
        });
        // An error only says the closing task panicked: nothing left to do.
        let _ = closing.await;
    }
}

/// How long `use_journal` waits for the journal's lock: a store of this
/// process dropped a moment ago lets go of it once its thread's ingest
/// under way ends.
const LOCK_PATIENCE: Duration = Duration::from_secs(1);

/// The journal of `database` with its lock, waiting up to
/// [`LOCK_PATIENCE`] for another holder to let go; `None` if it does not.
fn open_patiently(database: &Path) -> Result<Option<Journal>> {
    const LOOK_EVERY: Duration = Duration::from_millis(10);
    let until = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        if let Some(journal) = Journal::open(database).map_err(io_error)? {
            return Ok(Some(journal));
        }
        if std::time::Instant::now() >= until {
            return Ok(None);
        }
        // Another holder's lock: nothing to wait on but time.
        std::thread::sleep(LOOK_EVERY);
    }
}

/// Appends one batch to the journal; when the journal is past its bound
/// (the ingest thread behind), moves it into the database first.
fn journal_append(
    journal: &Journal,
    slot: &Slot,
    watch: &FileWatch,
    records: &[AuditRecord],
    head: &ChainHead,
) -> Result<()> {
    if journal.overfull() {
        ingest(journal, slot, watch)?;
    }
    journal.append(records, head, &mut |chain| stored_head(slot, chain))
}

/// `chain`'s head in the database (seq and mac), on the connection in
/// `slot`.
fn stored_head(slot: &Slot, chain: u32) -> Result<Option<(u64, MacBytes)>> {
    let guard = slot.lock();
    let Some(open) = guard.as_ref() else {
        return Err(StoreError::Database(sqlx::Error::PoolClosed));
    };
    let head: Option<(i64, Vec<u8>)> = open
        .conn
        .query_row(
            "SELECT head_seq, head_mac FROM audit_chains WHERE id = ?1",
            [i64::from(chain)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(database_error)?;
    let Some((seq, mac)) = head else {
        return Ok(None);
    };
    let mac = MacBytes::try_from(mac.as_slice()).map_err(|_| StoreError::Corrupt {
        what: format!("audit chain {chain}"),
        reason: "its head mac is not 32 bytes".to_owned(),
    })?;
    Ok(Some((crate::to_u64(seq), mac)))
}

/// Moves the journal's batches into the database on the connection in
/// `slot`; refused once the database file is gone (they would be lost with
/// it).
fn ingest(journal: &Journal, slot: &Slot, watch: &FileWatch) -> Result<()> {
    journal.ingest(&mut |chain| stored_head(slot, chain), &mut |frames| {
        if let Some(path) = watch.gone() {
            return Err(StoreError::FileGone(path.to_path_buf()));
        }
        append_frames_on(slot, frames)
    })
}

/// Moves what `journal`'s files hold into the database on the connection
/// in `slot`; returns the records moved.
fn replay(journal: &Journal, slot: &Slot) -> Result<usize> {
    journal.replay(&mut |chain| stored_head(slot, chain), &mut |frames| {
        append_frames_on(slot, frames)
    })
}

/// The thread that moves the journal into the database every
/// `journal::INGEST_EVERY` (sooner when the journal asks).
struct Ingester {
    wake: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Ingester {
    /// Holds the journal weakly: a store dropped without being closed
    /// drops it (and its files), and the thread ends.
    fn start(journal: Weak<Journal>, slot: Slot, watch: Arc<FileWatch>) -> std::io::Result<Self> {
        let (wake, woken) = mpsc::sync_channel(1);
        if let Some(journal) = journal.upgrade() {
            journal.set_wake(wake.clone());
        }
        let thread = std::thread::Builder::new()
            .name("airlock-audit-journal".to_owned())
            .spawn(move || ingest_every(&journal, &slot, &watch, &woken))?;
        Ok(Self { wake, thread })
    }
    /// Stops the thread (the journal must have dropped its sender:
    /// `Journal::close`) and waits for it.
    fn stop(self) {
        drop(self.wake);
        // An error only says the thread panicked: it is gone either way.
        let _ = self.thread.join();
    }
}

/// The ingest thread's loop: moves the journal in every `INGEST_EVERY`,
/// or when woken, until the journal or the wake-up's sender is gone.
fn ingest_every(
    journal: &Weak<Journal>,
    slot: &Slot,
    watch: &FileWatch,
    woken: &mpsc::Receiver<()>,
) {
    loop {
        match woken.recv_timeout(INGEST_EVERY) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let Some(journal) = journal.upgrade() else {
            return;
        };
        // A failure refuses appends (logged there); the audit writer's
        // probes, and this thread, try again.
        let _ = ingest(&journal, slot, watch);
    }
}

/// One batch on the connection in `slot`, all or nothing.
fn append_on(slot: &Slot, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
    commit_on(slot, |statements, encoded, last| {
        encode_batch(records, encoded)?;
        statements.append(records, encoded, head, last)
    })
}

/// The journal's `frames` on the connection in `slot`, in one transaction.
fn append_frames_on(slot: &Slot, frames: &[Frame]) -> Result<()> {
    commit_on(slot, |statements, _, last| {
        statements.append_frames(frames, last)
    })
}

/// One transaction on the connection in `slot`, made by `commit` (given
/// the statements, the encoding buffer and the batch committed last),
/// counted for the checkpoints.
fn commit_on(
    slot: &Slot,
    commit: impl FnOnce(
        &mut Statements<'_>,
        &mut Vec<u8>,
        Option<LastBatch>,
    ) -> Result<Option<LastBatch>>,
) -> Result<()> {
    let mut guard = slot.lock();
    let Some(open) = guard.as_mut() else {
        return Err(StoreError::Database(sqlx::Error::PoolClosed));
    };
    // Forgotten until this commit succeeds: after a failure the store is
    // asked again.
    let last = open.last.take();
    let mut statements = Statements::prepare(&open.conn).map_err(database_error)?;
    open.last = commit(&mut statements, &mut open.encoded, last)?;
    open.commits.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Opens the writer's connection and prepares its statements once (they
/// stay in the connection's cache).
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = open_rusqlite(path)?;
    // Checkpoints run on a thread of their own (see `checkpointer`); this
    // is the backstop.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    Statements::prepare(&conn)?;
    Ok(conn)
}

/// A rusqlite connection to the store's file, set up like the pool's.
pub(super) fn open_rusqlite(path: &Path) -> rusqlite::Result<Connection> {
    // The file exists (the pool created and migrated it) and is in WAL
    // mode, a property of the file. The path is a plain file name, never a
    // URI.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "journal_size_limit", super::WAL_SIZE_LIMIT)?;
    Ok(conn)
}

fn close(conn: Connection) {
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the audit writer's SQLite connection");
    }
}

/// The writer's statements, from the connection's statement cache.
struct Statements<'c> {
    conn: &'c Connection,
    begin: CachedStatement<'c>,
    move_head: CachedStatement<'c>,
    last_ts_max: CachedStatement<'c>,
    insert_batch: CachedStatement<'c>,
    insert_session: CachedStatement<'c>,
    commit: CachedStatement<'c>,
    rollback: CachedStatement<'c>,
}

// === impl Statements ===

impl<'c> Statements<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            conn,
            begin: conn.prepare_cached(BEGIN)?,
            move_head: conn.prepare_cached(MOVE_HEAD)?,
            last_ts_max: conn.prepare_cached(LAST_TS_MAX)?,
            insert_batch: conn.prepare_cached(INSERT_BATCH)?,
            insert_session: conn.prepare_cached(INSERT_SESSION)?,
            commit: conn.prepare_cached(COMMIT)?,
            rollback: conn.prepare_cached(ROLLBACK)?,
        })
    }

    /// One batch, all or nothing; returns what the next append needs to
    /// know of the chain's last batch. `last` is the batch this connection
    /// committed before, if known.
    fn append(
        &mut self,
        records: &[AuditRecord],
        encoded: &[u8],
        head: &ChainHead,
        last: Option<LastBatch>,
    ) -> Result<Option<LastBatch>> {
        if records.is_empty() {
            return Ok(last);
        }
        self.append_all([(records, encoded, head)], last)
    }

    /// The journal's `frames` in one transaction, all or nothing; each
    /// stays a batch (a row) of its own, as the writer grouped it.
    fn append_frames(
        &mut self,
        frames: &[Frame],
        last: Option<LastBatch>,
    ) -> Result<Option<LastBatch>> {
        let batches = frames
            .iter()
            .map(|f| (f.records.as_slice(), f.encoded.as_slice(), &f.head));
        self.append_all(batches, last)
    }

    /// `batches` (records, encoded, the head they move the chain to) in
    /// one transaction, all or nothing.
    fn append_all<'b>(
        &mut self,
        batches: impl IntoIterator<Item = (&'b [AuditRecord], &'b [u8], &'b ChainHead)>,
        mut last: Option<LastBatch>,
    ) -> Result<Option<LastBatch>> {
        // A transaction whose rollback failed last time is not carried on.
        self.roll_back();
        // IMMEDIATE: take the write lock now (waiting up to the busy
        // timeout), so that nothing later fails for want of it.
        self.begin.execute([]).map_err(database_error)?;
        let in_transaction = || {
            for (records, encoded, head) in batches {
                if let Some(first) = records.first() {
                    let batch =
                        self.append_in_transaction(first.seq, records, encoded, head, last)?;
                    last = Some(batch);
                }
            }
            self.commit.execute([]).map_err(database_error)?;
            Ok(last)
        };
        let result = in_transaction();
        if result.is_err() {
            self.roll_back();
        }
        result
    }

    /// Rolls back the transaction in progress, if any (SQLite ends some
    /// on its own when a statement fails).
    fn roll_back(&mut self) {
        if self.conn.is_autocommit() {
            return;
        }
        if let Err(e) = self.rollback.execute([]) {
            tracing::warn!(error = %e, "rolling back a failed audit append");
        }
    }

    fn append_in_transaction(
        &mut self,
        first_seq: u64,
        records: &[AuditRecord],
        encoded: &[u8],
        head: &ChainHead,
        last: Option<LastBatch>,
    ) -> Result<LastBatch> {
        // Move the head first: a writer that is not at the head learns it
        // before inserting anything (and never trips over existing seqs).
        let moved = self
            .move_head
            .execute(params![
                to_i64(head.seq),
                head.mac.as_slice(),
                head.seal.as_slice(),
                i64::from(head.chain),
                to_i64(first_seq.saturating_sub(1)),
            ])
            .map_err(database_error)?;
        if moved != 1 {
            return Err(StoreError::ChainConflict(head.chain));
        }
        let summary = summarise(records, head)?;
        let chain = i64::from(head.chain);
        let first = to_i64(summary.first_seq);
        // The head stood just before this batch (it moved from there), so
        // when this connection wrote the batch ending there, that batch is
        // the chain's last and its `ts_max` is known. The look-up would
        // otherwise compare the key with whole rows, blob and all.
        let before = match last {
            Some(last)
                if last.chain == chain && last.last_seq.checked_add(1) == Some(first_seq) =>
            {
                Some(last.ts_max)
            }
            _ => self
                .last_ts_max
                .query_row(params![chain], |row| row.get(0))
                .optional()
                .map_err(database_error)?,
        };
        let ts_max = before.map_or(summary.ts_max, |before| before.max(summary.ts_max));
        self.insert_batch
            .execute(params![
                chain,
                first,
                to_i64(summary.last_seq),
                ts_max,
                encoded,
            ])
            .map_err(database_error)?;
        for session in sessions(records) {
            self.insert_session
                .execute(params![session, chain, first])
                .map_err(database_error)?;
        }
        Ok(LastBatch {
            chain,
            last_seq: summary.last_seq,
            ts_max,
        })
    }
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Database(sqlx::Error::Io(e))
}

/// A `rusqlite` error as the store's database error (the same variant the
/// pool's errors take).
fn database_error(e: rusqlite::Error) -> StoreError {
    let error = match e {
        rusqlite::Error::SqliteFailure(failure, message) => WriteError {
            message: message.unwrap_or_else(|| failure.to_string()),
            code: Some(failure.extended_code),
        },
        other => WriteError {
            message: other.to_string(),
            code: None,
        },
    };
    StoreError::Database(sqlx::Error::Database(Box::new(error)))
}

/// An error from the writer's connection.
#[derive(Debug)]
struct WriteError {
    message: String,
    /// SQLite's extended result code, when SQLite gave one.
    code: Option<i32>,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            // As sqlx shows SQLite's errors.
            Some(code) => write!(f, "(code: {code}) {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for WriteError {}

impl DatabaseError for WriteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        self.code.map(|code| Cow::Owned(code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        match self.code {
            Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                ErrorKind::UniqueViolation
            }
            Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => ErrorKind::ForeignKeyViolation,
            Some(ffi::SQLITE_CONSTRAINT_NOTNULL) => ErrorKind::NotNullViolation,
            Some(ffi::SQLITE_CONSTRAINT_CHECK) => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}
