//! The SQLite audit trail's write path: one OS thread owning one
//! `rusqlite` connection to the store's file, committing each batch of
//! records in one transaction of its own.
//!
//! Going through sqlx costs a round trip to its worker thread for every
//! statement of a batch (BEGIN, the head update, the insert, COMMIT); here a
//! batch costs one hop there and one back, and its statements are prepared
//! once, when the thread starts.
//!
//! The thread ends when the store is closed ([`AuditWriter::close`]) or
//! dropped (its channel then disconnects). A writer that is gone answers
//! every later append with an error, never a panic or a wait.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use airlock_core::audit::AuditRecord;
use rusqlite::{ffi, params, Connection, OpenFlags, Statement};
use sqlx::error::{DatabaseError, ErrorKind};
use tokio::sync::oneshot;

use super::checkpointer::{Checkpointer, WRITER_CHECKPOINT_PAGES};
use super::to_i64;
use crate::audit_rows::RECORD_COLUMNS;
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

/// What the writer thread is asked to do.
enum Job {
    /// Append `records` and move the head to `head`, answering on `reply`.
    Append {
        records: Vec<AuditRecord>,
        head: ChainHead,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Close the connection, answer, and end the thread.
    Close(oneshot::Sender<()>),
}

/// The handle of the writer thread.
pub(super) struct AuditWriter {
    jobs: mpsc::Sender<Job>,
    /// Set by [`AuditWriter::close`]: later appends fail as on a closed pool.
    closed: AtomicBool,
    /// Keeps commits free of checkpoints; stops with the writer.
    _checkpointer: Checkpointer,
}

// === impl AuditWriter ===

impl AuditWriter {
    /// Starts the thread on the database file at `path` (which must exist
    /// and be migrated) and waits until its connection is open and its
    /// statements are prepared.
    pub(super) async fn start(path: PathBuf) -> Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let (ready, opened) = oneshot::channel();
        let checkpointer = Checkpointer::start(path.clone())
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        std::thread::Builder::new()
            .name("airlock-audit-sqlite".to_owned())
            .spawn(move || run(&path, &queue, ready))
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        match opened.await {
            Ok(Ok(())) => Ok(Self {
                jobs,
                closed: AtomicBool::new(false),
                _checkpointer: checkpointer,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Database(sqlx::Error::WorkerCrashed)),
        }
    }

    /// Appends `records` and moves the chain head to `head` in one
    /// transaction; see `Store::audit_append`.
    pub(super) async fn append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Append {
            records: records.to_vec(),
            head: head.clone(),
            reply,
        };
        if self.jobs.send(job).is_err() {
            return Err(self.gone());
        }
        answer.await.unwrap_or_else(|_| Err(self.gone()))
    }

    /// Closes the connection and ends the thread, after the batch in
    /// progress (if any) and those queued before.
    pub(super) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Job::Close(done)).is_ok() {
            // An error only says the thread is gone already.
            let _ = closed.await;
        }
    }

    /// The error for an append the thread did not answer: the store was
    /// closed, or the thread ended unexpectedly.
    fn gone(&self) -> StoreError {
        StoreError::Database(if self.closed.load(Ordering::Acquire) {
            sqlx::Error::PoolClosed
        } else {
            sqlx::Error::WorkerCrashed
        })
    }
}

/// The thread: opens the connection, then serves jobs until closed or
/// disconnected.
fn run(path: &Path, queue: &mpsc::Receiver<Job>, ready: oneshot::Sender<Result<()>>) {
    let conn = match connect(path) {
        Ok(conn) => conn,
        Err(e) => {
            let _ = ready.send(Err(database_error(e)));
            return;
        }
    };
    let closed_by = prepare_and_serve(&conn, queue, ready);
    close(conn);
    if let Some(done) = closed_by {
        let _ = done.send(());
    }
}

/// Prepares the statements, tells `ready`, and serves jobs (see [`serve`]).
fn prepare_and_serve(
    conn: &Connection,
    queue: &mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<()>>,
) -> Option<oneshot::Sender<()>> {
    let mut statements = match Statements::prepare(conn) {
        Ok(statements) => statements,
        Err(e) => {
            let _ = ready.send(Err(database_error(e)));
            return None;
        }
    };
    // An error says whoever started the thread went away: nothing to serve.
    ready.send(Ok(())).ok()?;
    serve(&mut statements, queue)
}

/// Serves jobs until one says to close (returning who to tell when closed)
/// or every sender is gone (the store was dropped without being closed).
fn serve(
    statements: &mut Statements<'_>,
    queue: &mpsc::Receiver<Job>,
) -> Option<oneshot::Sender<()>> {
    while let Ok(job) = queue.recv() {
        match job {
            Job::Append {
                records,
                head,
                reply,
            } => {
                let _ = reply.send(statements.append(&records, &head));
            }
            Job::Close(done) => return Some(done),
        }
    }
    None
}

/// Opens the writer's connection, set up like the pool's.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // The file exists (the pool created and migrated it) and is in WAL
    // mode, a property of the file. The path is a plain file name, never a
    // URI.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoints run on a thread of their own (see `checkpointer`); this
    // is the backstop.
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    Ok(conn)
}

fn close(conn: Connection) {
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the audit writer's SQLite connection");
    }
}

/// The writer's statements, prepared once for the connection's life.
struct Statements<'c> {
    conn: &'c Connection,
    begin: Statement<'c>,
    move_head: Statement<'c>,
    insert: Statement<'c>,
    commit: Statement<'c>,
    rollback: Statement<'c>,
}

// === impl Statements ===

impl<'c> Statements<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            conn,
            begin: conn.prepare(BEGIN)?,
            move_head: conn.prepare(MOVE_HEAD)?,
            insert: conn.prepare(&format!(
                "INSERT INTO audit_records ({RECORD_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ))?,
            commit: conn.prepare(COMMIT)?,
            rollback: conn.prepare(ROLLBACK)?,
        })
    }

    /// One batch, all or nothing.
    fn append(&mut self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        // A transaction whose rollback failed last time is not carried on.
        self.roll_back();
        // IMMEDIATE: take the write lock now (waiting up to the busy
        // timeout), so that nothing later fails for want of it.
        self.begin.execute([]).map_err(database_error)?;
        let result = self.append_in_transaction(first.seq, records, head);
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
        head: &ChainHead,
    ) -> Result<()> {
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
        for r in records {
            self.insert
                .execute(params![
                    i64::from(r.chain),
                    to_i64(r.seq),
                    r.ts_ms,
                    r.session.as_deref(),
                    r.provider.as_deref(),
                    r.method.as_str(),
                    r.path.as_str(),
                    r.decision.as_str(),
                    i64::from(r.status),
                    r.upstream_status.map(i64::from),
                    to_i64(r.duration_us),
                    to_i64(r.bytes_in),
                    to_i64(r.bytes_out),
                    i64::from(r.flags.bits()),
                    r.prev_mac.as_slice(),
                    r.mac.as_slice(),
                ])
                .map_err(database_error)?;
        }
        self.commit.execute([]).map_err(database_error)?;
        Ok(())
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
