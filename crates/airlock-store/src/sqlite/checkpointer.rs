//! Background WAL checkpoints for the SQLite store.
//!
//! In WAL mode a commit appends pages to the write-ahead log; a checkpoint
//! copies them back into the database file and syncs it. Left to SQLite, the
//! checkpoint runs inside whichever commit finds the log over 1000 pages —
//! with the audit trail, a call's commit, which then waits for the sync
//! (milliseconds, where a commit takes tens of microseconds). Here a thread
//! of its own checkpoints the log every [`CHECKPOINT_EVERY`] (`PASSIVE`:
//! it never blocks the writer, which goes on appending meanwhile), and the
//! audit writer's own automatic checkpoint is moved up to
//! [`WRITER_CHECKPOINT_PAGES`]: a backstop that keeps the log bounded when
//! appends never leave a moment for the log to be reset.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::audit_writer::open_rusqlite;

/// How often the log is checkpointed in the background.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// Log size (pages) at which the audit writer checkpoints by itself: 16 MiB
/// of log in a file airlock creates (1 KiB pages, `super::PAGE_SIZE`),
/// 64 MiB in one with SQLite's default 4 KiB pages.
pub(super) const WRITER_CHECKPOINT_PAGES: u32 = 16_384;

/// The checkpoint thread; it stops when this is dropped (see also
/// [`Checkpointer::stop`]).
pub(super) struct Checkpointer {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database file at `path` (which must exist).
    pub(super) fn start(path: PathBuf) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("airlock-sqlite-checkpoint".to_owned())
            .spawn(move || run(&path, &stopped))?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and waits until its connection is closed (blocks
    /// for at most one checkpoint).
    pub(super) fn stop(self) {
        drop(self.stop);
        // An error only says the thread panicked: it is gone either way.
        let _ = self.thread.join();
    }
}

fn run(path: &Path, stopped: &mpsc::Receiver<()>) {
    let conn = match open_rusqlite(path) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the SQLite checkpoint connection; SQLite checkpoints by itself");
            return;
        }
    };
    // Ends when the sender is dropped (or sends, which it never does).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "background WAL checkpoint failed");
        }
    }
}
