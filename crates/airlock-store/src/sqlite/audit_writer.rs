//! The SQLite audit trail's write path: one `rusqlite` connection to the
//! store's file, committing each batch of records in one transaction of
//! its own, as one row (see `audit_batch`).
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
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::AuditRecord;
use parking_lot::Mutex;
use rusqlite::{ffi, params, CachedStatement, Connection, OpenFlags, OptionalExtension};
use sqlx::error::{DatabaseError, ErrorKind};

use super::audit_batches::LAST_TS_MAX;
use super::checkpointer::{Checkpointer, Commits, FileWatch, WRITER_CHECKPOINT_PAGES};
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
        let io_error = |e| StoreError::Database(sqlx::Error::Io(e));
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
            watch,
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// Appends `records` and moves the chain head to `head` in one
    /// transaction, on tokio's blocking pool; see `Store::audit_append`.
    pub(super) async fn append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        self.file_present()?;
        let conn = Arc::clone(&self.conn);
        let records = records.to_vec();
        let head = head.clone();
        tokio::task::spawn_blocking(move || append_on(&conn, &records, &head))
            .await
            .unwrap_or(Err(StoreError::Database(sqlx::Error::WorkerCrashed)))
    }

    /// The same as [`AuditWriter::append`], on the calling thread (which
    /// it blocks for the commit); see `Store::audit_append_blocking`.
    pub(super) fn append_blocking(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        self.file_present()?;
        append_on(&self.conn, records, head)
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
        let closing = tokio::task::spawn_blocking(move || {
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

/// One batch on the connection in `slot`, all or nothing.
fn append_on(slot: &Slot, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
    let mut guard = slot.lock();
    let Some(open) = guard.as_mut() else {
        return Err(StoreError::Database(sqlx::Error::PoolClosed));
    };
    encode_batch(records, &mut open.encoded)?;
    // Forgotten until this append succeeds: after a failure the store is
    // asked again.
    let last = open.last.take();
    let mut statements = Statements::prepare(&open.conn).map_err(database_error)?;
    open.last = statements.append(records, &open.encoded, head, last)?;
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
        let Some(first) = records.first() else {
            return Ok(last);
        };
        // A transaction whose rollback failed last time is not carried on.
        self.roll_back();
        // IMMEDIATE: take the write lock now (waiting up to the busy
        // timeout), so that nothing later fails for want of it.
        self.begin.execute([]).map_err(database_error)?;
        let result = self.append_in_transaction(first.seq, records, encoded, head, last);
        if result.is_err() {
            self.roll_back();
        }
        result.map(Some)
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
        self.commit.execute([]).map_err(database_error)?;
        Ok(LastBatch {
            chain,
            last_seq: summary.last_seq,
            ts_max,
        })
    }
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
