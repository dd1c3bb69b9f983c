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
//! The thread checkpoints every [`CHECKPOINT_IDLE`], and sooner once the
//! audit writer has made [`CHECKPOINT_COMMITS`] commits since the last
//! checkpoint (it counts them in [`Commits`]; the thread looks every
//! [`CHECKPOINT_BUSY`] while commits come, backing off to
//! [`CHECKPOINT_IDLE`] when none do, so that an idle server wakes it ten
//! times a second). Under load each sync then writes a few milliseconds'
//! worth of log instead of a tenth of a second's, and the kernel's
//! write-back, which competes with the proxy for the CPUs, comes in small
//! pieces rather than bursts (at concurrency 1 flat out the calls' p99
//! fell by about a third on a VM's ext4, see BENCHMARKS.md). At a moderate
//! rate checkpoints stay a tenth of a second apart: a complete checkpoint
//! makes the next commit start the log over, which syncs the log's header
//! inside that commit, so checkpointing every few commits would put a sync
//! into most of them (checkpoints every 5 ms whatever the rate doubled the
//! p99 at 180 calls a second).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::audit_writer::open_rusqlite;

/// How often the thread looks at the commits while they come.
pub(super) const CHECKPOINT_BUSY: Duration = Duration::from_millis(5);
/// How often the log is checkpointed at least, and the thread's longest
/// wait.
pub(super) const CHECKPOINT_IDLE: Duration = Duration::from_millis(100);
/// Audit commits after which the log is checkpointed without waiting for
/// [`CHECKPOINT_IDLE`] to pass.
pub(super) const CHECKPOINT_COMMITS: u64 = 32;

/// The audit writer's commits so far: it adds one per commit, the
/// checkpoint thread reads it.
pub(super) type Commits = Arc<AtomicU64>;
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
    pub(super) fn start(
        path: PathBuf,
        watch: Arc<FileWatch>,
        commits: Commits,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let (started, ready) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("airlock-sqlite-checkpoint".to_owned())
            .spawn(move || {
                run_in_background();
                // The receiver waits for this; gone only if `start` is.
                let _ = started.send(());
                run(&path, &watch, &commits, &stopped);
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

fn run(path: &Path, watch: &FileWatch, commits: &AtomicU64, stopped: &mpsc::Receiver<()>) {
    let conn = match open_rusqlite(path) {
        Ok(conn) => Some(conn),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the SQLite checkpoint connection; SQLite checkpoints by itself");
            None
        }
    };
    let mut cadence = Cadence::new(Instant::now());
    // Ends when the sender is dropped (or sends, which it never does).
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(cadence.wait) {
        watch.check();
        let due = cadence.look(commits.load(Ordering::Relaxed), Instant::now());
        let Some(conn) = conn.as_ref().filter(|_| due) else {
            continue;
        };
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "background WAL checkpoint failed");
        }
    }
}

/// When the thread looks next, and whether a look checkpoints.
#[derive(Debug)]
struct Cadence {
    /// The wait before the next look.
    wait: Duration,
    /// The commits counted at the last look.
    seen: u64,
    /// The commits counted at the last checkpoint.
    checkpointed: u64,
    /// When the last checkpoint was.
    checkpointed_at: Instant,
}

impl Cadence {
    fn new(now: Instant) -> Self {
        Self {
            wait: CHECKPOINT_BUSY,
            seen: 0,
            checkpointed: 0,
            checkpointed_at: now,
        }
    }

    /// Takes the commits counted so far at `now`; whether to checkpoint.
    /// Sets the next wait: [`CHECKPOINT_BUSY`] after commits came, else
    /// twice the last, up to [`CHECKPOINT_IDLE`].
    fn look(&mut self, commits: u64, now: Instant) -> bool {
        self.wait = if commits == self.seen {
            (self.wait * 2).min(CHECKPOINT_IDLE)
        } else {
            CHECKPOINT_BUSY
        };
        self.seen = commits;
        let due = commits.wrapping_sub(self.checkpointed) >= CHECKPOINT_COMMITS
            || now.duration_since(self.checkpointed_at) >= CHECKPOINT_IDLE;
        if due {
            self.checkpointed = commits;
            self.checkpointed_at = now;
        }
        due
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
    fn checkpoints_come_every_32_commits_or_a_tenth_of_a_second_and_looks_back_off_when_idle() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut cadence = Cadence::new(start);
        assert_eq!(cadence.wait, CHECKPOINT_BUSY);

        // Commits at a moderate rate: looked at every 5 ms, checkpointed
        // only once a tenth of a second has passed.
        let mut checkpoints = Vec::new();
        for tick in 1..=40 {
            let ms = tick * 5;
            if cadence.look(tick, at(ms)) {
                checkpoints.push(ms);
            }
            assert_eq!(cadence.wait, CHECKPOINT_BUSY, "commits came");
        }
        assert_eq!(checkpoints, [100, 200]);

        // Many commits: every look that finds 32 more checkpoints.
        assert!(!cadence.look(40 + 31, at(205)));
        assert!(cadence.look(40 + 32 + 40, at(210)));
        assert!(cadence.look(40 + 32 + 40 + 50, at(215)));

        // None: the looks back off, and still checkpoint a tenth of a
        // second after the last.
        let idle: Vec<_> = [220, 230, 250, 290, 370, 470]
            .into_iter()
            .map(|ms| (cadence.look(162, at(ms)), cadence.wait.as_millis()))
            .collect();
        assert_eq!(
            idle,
            [
                (false, 10),
                (false, 20),
                (false, 40),
                (false, 80),
                (true, 100),
                (true, 100)
            ]
        );
        // A commit brings the looks back to every 5 ms.
        assert!(!cadence.look(163, at(475)));
        assert_eq!(cadence.wait, CHECKPOINT_BUSY);
    }

    #[test]
    fn the_checkpoint_thread_gives_way_to_every_other_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let watch = Arc::new(FileWatch::of(&path).unwrap());

        let checkpointer = Checkpointer::start(path, watch, Commits::default()).unwrap();
        let (policy, _) = thread_schedule_policy_param(checkpointer.thread.as_pthread_t()).unwrap();
        checkpointer.stop();

        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)
        );
    }
}
