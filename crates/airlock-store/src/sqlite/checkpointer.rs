//! Background WAL checkpoints for the SQLite store.
//!
//! In WAL mode a commit appends pages to the write-ahead log; a checkpoint
//! copies them back into the database file and syncs it. Left to SQLite, the
//! checkpoint runs inside whichever commit finds the log over 1000 pages —
//! with the audit trail, a call's commit, which then waits for the sync
//! (milliseconds, where a commit takes tens of microseconds). Here a thread
//! of its own checkpoints the log (`PASSIVE`: it never blocks the writer,
//! which goes on appending meanwhile), and the audit writer's own automatic
//! checkpoint is moved up to [`WRITER_CHECKPOINT_PAGES`]: a backstop that
//! keeps the log bounded when appends never leave a moment for the log to
//! be reset.
//!
//! While commits come, the thread checkpoints every [`CHECKPOINT_BUSY`]:
//! each sync then writes a few milliseconds' worth of log instead of a
//! tenth of a second's, and the kernel's write-back, which competes with
//! the proxy for the CPUs, comes in small pieces rather than bursts (at
//! concurrency 1 the calls' p99 fell from 1.5–2.4 ms to 0.4–1.2 ms on a VM's
//! ext4, see BENCHMARKS.md). When a round finds nothing new in the log the
//! next one waits twice as long, up to [`CHECKPOINT_IDLE`], so that an idle
//! server wakes the thread ten times a second, not two hundred.
//!
//! On Linux the thread runs as `SCHED_IDLE`: a checkpoint takes up to a
//! millisecond of CPU, and at normal priority a proxy worker woken on the
//! same core waited behind it (one call in a hundred at concurrency 1 took
//! 0.6–1 ms longer, see BENCHMARKS.md). As `SCHED_IDLE` it yields the core
//! to any other thread that wakes, and still gets a small share of a busy
//! machine, which is all it needs; if it falls behind, the log grows until
//! it catches up (the writer's own backstop checkpoints too, when this
//! thread is not in the middle of one).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::audit_writer::open_rusqlite;

/// How often the log is checkpointed while commits come.
pub(super) const CHECKPOINT_BUSY: Duration = Duration::from_millis(5);
/// How often the log is checkpointed at most when no commit came.
pub(super) const CHECKPOINT_IDLE: Duration = Duration::from_millis(100);
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

/// The database file airlock opened, and whether it is still the one at
/// its path. SQLite goes on writing to a file deleted (or replaced) under
/// it without an error, and everything written is lost with it: the
/// checkpoint thread looks at the path on every round and the audit write
/// path fails while the file is gone, so that a fail-closed auditor
/// refuses calls instead of answering them with records nobody will see.
#[derive(Debug)]
pub(super) struct FileWatch {
    path: PathBuf,
    /// Device and inode of the file opened.
    identity: (u64, u64),
    gone: AtomicBool,
}

impl FileWatch {
    /// Notes which file is at `path` now.
    pub(super) fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            gone: AtomicBool::new(false),
        })
    }

    /// The path, if the file opened is no longer at it.
    pub(super) fn gone(&self) -> Option<&Path> {
        self.gone
            .load(Ordering::Acquire)
            .then_some(self.path.as_path())
    }

    /// Looks at the path again; logs when the file goes or comes back.
    fn check(&self) {
        let here = std::fs::metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        let was_gone = self.gone.swap(!here, Ordering::AcqRel);
        if !here && !was_gone {
            tracing::error!(
                path = %self.path.display(),
                "the SQLite database file was deleted or replaced while airlock had it open: \
                 audit records cannot be stored (calls are refused while audit fails closed); \
                 put the file back or restart airlock"
            );
        } else if here && was_gone {
            tracing::info!(path = %self.path.display(), "the SQLite database file is back");
        }
    }
}

impl Checkpointer {
    /// Starts checkpointing the database file at `path` (which must exist),
    /// and watching that it stays there (`watch`).
    /// Returns once the thread has taken its scheduling policy; blocks
    /// for as long as starting a thread takes.
    pub(super) fn start(path: PathBuf, watch: Arc<FileWatch>) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let (started, ready) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("airlock-sqlite-checkpoint".to_owned())
            .spawn(move || {
                run_in_background();
                // The receiver waits for this; gone only if `start` is.
                let _ = started.send(());
                run(&path, &watch, &stopped);
            })?;
        // An error only says the thread ended before sending: it panicked.
        let _ = ready.recv();
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

/// Makes the calling thread run only when no other thread wants its core
/// (`SCHED_IDLE`); where that is refused (a seccomp profile, say), the
/// thread stays as it is and says so in the debug log.
fn run_in_background() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadPriority, ThreadSchedulePolicy,
        };
        // On the thread itself: for a normal policy the crate also sets the
        // calling thread's nice value.
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(e) =
            set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
        {
            tracing::debug!(error = ?e, "the WAL checkpoint thread keeps its normal priority");
        }
    }
}

fn run(path: &Path, watch: &FileWatch, stopped: &mpsc::Receiver<()>) {
    let conn = match open_rusqlite(path) {
        Ok(conn) => Some(conn),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the SQLite checkpoint connection; SQLite checkpoints by itself");
            None
        }
    };
    let mut cadence = Cadence::default();
    // Ends when the sender is dropped (or sends, which it never does).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(cadence.wait) {
        watch.check();
        let Some(conn) = &conn else {
            continue;
        };
        // The log's frames and how many of them are in the database file.
        let checkpoint = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match checkpoint {
            Ok(log) => cadence.after(Some(log)),
            Err(e) => {
                tracing::debug!(error = %e, "background WAL checkpoint failed");
                cadence.after(None);
            }
        }
    }
}

/// When the next checkpoint comes: [`CHECKPOINT_BUSY`] after a round that
/// found the log changed, twice the last wait (up to [`CHECKPOINT_IDLE`])
/// after one that did not.
#[derive(Debug)]
struct Cadence {
    /// The wait before the next round.
    wait: Duration,
    /// The log as the last round left it: its frames, and how many of them
    /// were checkpointed.
    last: Option<(i64, i64)>,
}

impl Default for Cadence {
    fn default() -> Self {
        Self {
            wait: CHECKPOINT_BUSY,
            last: None,
        }
    }
}

impl Cadence {
    /// Takes what a round left (`None`: it failed) and sets the next wait.
    fn after(&mut self, log: Option<(i64, i64)>) {
        let changed = log.is_some() && log != self.last;
        self.last = log;
        self.wait = if changed {
            CHECKPOINT_BUSY
        } else {
            (self.wait * 2).min(CHECKPOINT_IDLE)
        };
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::thread::JoinHandleExt;

    use thread_priority::{
        thread_schedule_policy_param, NormalThreadSchedulePolicy, ThreadSchedulePolicy,
    };

    use super::*;

    #[test]
    fn checkpoints_come_often_while_the_log_changes_and_back_off_when_it_does_not() {
        let mut cadence = Cadence::default();
        assert_eq!(cadence.wait, CHECKPOINT_BUSY);

        cadence.after(Some((40, 40)));
        assert_eq!(cadence.wait, CHECKPOINT_BUSY, "the log had new frames");
        let idle: Vec<_> = (0..8)
            .map(|_| {
                cadence.after(Some((40, 40)));
                cadence.wait.as_millis()
            })
            .collect();
        assert_eq!(idle, [10, 20, 40, 80, 100, 100, 100, 100]);

        // New commits (the log grew, or restarted from its beginning).
        cadence.after(Some((45, 40)));
        assert_eq!(cadence.wait, CHECKPOINT_BUSY);
        cadence.after(Some((3, 3)));
        assert_eq!(cadence.wait, CHECKPOINT_BUSY);

        // A failed round backs off as an idle one does.
        cadence.after(None);
        assert_eq!(cadence.wait, CHECKPOINT_BUSY * 2);
    }

    #[test]
    fn the_checkpoint_thread_gives_way_to_every_other_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let watch = Arc::new(FileWatch::of(&path).unwrap());

        let checkpointer = Checkpointer::start(path, watch).unwrap();
        let (policy, _) = thread_schedule_policy_param(checkpointer.thread.as_pthread_t()).unwrap();
        checkpointer.stop();

        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)
        );
    }
}
