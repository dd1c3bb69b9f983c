//! Live credentials.
//!
//! - [`CredentialCell`]: the current credential of a provider, read by the
//!   request path with one atomic load (no lock) and replaced by writers.
//! - [`FileWatcher`]: keeps a cell up to date with a `file:PATH` credential:
//!   reads it at start, then again whenever the file changes, so a rotated
//!   secret file applies to the next call. It watches the file's directory
//!   (inotify through `notify`, so atomic-rename rotation and Kubernetes-style
//!   symlink swaps are seen) and re-checks the file every second as a safety
//!   net (modification and change time, length, device and inode). Reads
//!   happen on the watcher's own thread, never on the async runtime or the
//!   request path. A read that fails keeps the last good value and logs a
//!   warning that names the file, never the value.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_core::Secret;
use arc_swap::ArcSwapOption;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use zeroize::Zeroizing;

/// The largest credential file read (anything larger is refused).
pub const MAX_CREDENTIAL_FILE_LEN: u64 = 64 * 1024;

/// A value stored in a [`CredentialCell`], with the version it was stored under.
#[derive(Debug)]
pub struct Loaded<T> {
    /// The prepared credential (e.g. a [`Secret`], or a ready header value).
    pub value: T,
    /// The cell's version when this value was stored (1 for the first store).
    pub version: u64,
}

/// The current credential: `None` when there is none (not configured, or an
/// empty credential file). Readers never lock; writers are serialised.
pub struct CredentialCell<T> {
    current: ArcSwapOption<Loaded<T>>,
    /// The value a removal took out of force, until another is stored:
    /// what that one guards against as the key it replaces (a removed key
    /// may well still be valid at the provider).
    retired: ArcSwapOption<Loaded<T>>,
    /// Bumped after every store, so a reader that sees version `n` also sees
    /// the value stored as `n` (or a later one).
    version: AtomicU64,
    /// Serialises writers so versions and stores happen in the same order.
    writer: Mutex<()>,
}

/// Why a credential file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialFileError {
    /// The file could not be opened or read.
    #[error("credential file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_CREDENTIAL_FILE_LEN`].
    #[error("credential file {} is larger than {MAX_CREDENTIAL_FILE_LEN} bytes", .path.display())]
    TooLarge { path: PathBuf },
    /// The file is not UTF-8 text.
    #[error("credential file {} is not UTF-8 text", .path.display())]
    NotUtf8 { path: PathBuf },
    /// The caller's `prepare` refused the value.
    #[error("credential file {}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The watcher thread could not be started.
    #[error("cannot start watching credential file {}: {source}", .path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How a [`FileWatcher`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// How often the file is re-checked whatever the notifications say.
    pub poll_interval: Duration,
    /// Whether to use file system notifications (inotify) at all.
    pub notify: bool,
    /// After a notification, how long to wait for the burst of events of one
    /// rotation to end before reading.
    pub debounce: Duration,
}

/// Counters of a [`FileWatcher`] since it started (the initial read included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Reads of the file attempted.
    pub reads: u64,
    /// Times a changed value was stored into the cell.
    pub reloads: u64,
    /// Failed checks: unreadable or missing file, or a value `prepare` refused.
    pub failures: u64,
}

/// Watches a `file:PATH` credential and stores each new value into a
/// [`CredentialCell`]. Dropping it stops watching (and waits for the watcher
/// thread to end).
pub struct FileWatcher {
    path: PathBuf,
    stats: Arc<Stats>,
    stop: mpsc::Sender<Msg>,
    worker: Option<JoinHandle<()>>,
    notifier: Option<RecommendedWatcher>,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    reloads: AtomicU64,
    failures: AtomicU64,
}

enum Msg {
    /// Something changed in the file's directory.
    Changed,
    /// The watcher is being dropped.
    Stop,
}

/// What identifies one version of a file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// Permission bits.
    mode: u32,
}

/// The watcher thread's state.
struct Worker<T, F> {
    path: PathBuf,
    cell: Arc<CredentialCell<T>>,
    prepare: F,
    stats: Arc<Stats>,
    /// The file as last read successfully (`None` after a failure, so the
    /// next periodic check reads again).
    fingerprint: Option<Fingerprint>,
    /// The value last stored into the cell.
    current: Option<Secret>,
    /// The error of the last check, if it failed: a warning is logged when
    /// the error changes, not on every periodic re-check.
    failing: Option<String>,
    /// The mode last warned about (see [`warn_if_open`]).
    open_mode: Option<u32>,
}

// === impl CredentialCell ===

impl<T> CredentialCell<T> {
    /// An empty cell (version 0).
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            retired: ArcSwapOption::empty(),
            version: AtomicU64::new(0),
            writer: Mutex::new(()),
        }
    }

    /// A cell holding `value` (version 1).
    pub fn with_value(value: T) -> Self {
        let cell = Self::new();
        cell.store(Some(value));
        cell
    }

    /// The current value: one atomic load and a reference count increment.
    pub fn load(&self) -> Option<Arc<Loaded<T>>> {
        self.current.load_full()
    }

    /// The current value or, when there is none, the one last removed
    /// (see [`CredentialCell::store`]): what a new value replaces.
    pub fn last(&self) -> Option<Arc<Loaded<T>>> {
        self.load().or_else(|| self.retired.load_full())
    }

    /// Replaces the value (`None` removes it, keeping it as the one
    /// [`CredentialCell::last`] gives until another is stored). Returns the
    /// new version.
    pub fn store(&self, value: Option<T>) -> u64 {
        let _guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let version = self.version.load(Ordering::Relaxed) + 1;
        let removing = value.is_none();
        let previous = self
            .current
            .swap(value.map(|value| Arc::new(Loaded { value, version })));
        if !removing {
            self.retired.store(None);
        } else if previous.is_some() {
            self.retired.store(previous);
        }
        self.version.store(version, Ordering::Release);
        version
    }

    /// How many times a value was stored (0 for a cell never written).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

impl<T> Default for CredentialCell<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for CredentialCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCell")
            .field("version", &self.version())
            .field("present", &self.current.load().is_some())
            .finish()
    }
}

// === impl WatchOptions ===

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            notify: true,
            debounce: Duration::from_millis(20),
        }
    }
}

// === impl FileWatcher ===

impl FileWatcher {
    /// Reads `path` now and stores `prepare(value)` into `cell` (surrounding
    /// whitespace trimmed; an empty file stores `None`), then keeps watching
    /// with [`WatchOptions::default`].
    ///
    /// `prepare` turns the value into what the request path needs (e.g. a
    /// header value); it runs on the watcher thread. Its error is logged and
    /// must not contain the value. The first read happens on the calling
    /// thread: call this at startup, not from an async task on the hot path.
    pub fn start<T, F, E>(
        path: impl Into<PathBuf>,
        cell: Arc<CredentialCell<T>>,
        prepare: F,
    ) -> Result<Self, CredentialFileError>
    where
        T: Send + Sync + 'static,
        F: FnMut(Secret) -> Result<T, E> + Send + 'static,
        E: fmt::Display,
    {
        Self::start_with(path, cell, prepare, WatchOptions::default())
    }

    /// [`FileWatcher::start`] with explicit options.
    pub fn start_with<T, F, E>(
        path: impl Into<PathBuf>,
        cell: Arc<CredentialCell<T>>,
        mut prepare: F,
        options: WatchOptions,
    ) -> Result<Self, CredentialFileError>
    where
        T: Send + Sync + 'static,
        F: FnMut(Secret) -> Result<T, E> + Send + 'static,
        E: fmt::Display,
    {
        let path = path.into();
        let stats = Arc::new(Stats::default());
        stats.reads.fetch_add(1, Ordering::Relaxed);
        let (secret, fingerprint) = read_credential(&path)?;
        let value = match secret.clone().map(&mut prepare).transpose() {
            Ok(value) => value,
            Err(err) => {
                return Err(CredentialFileError::Invalid {
                    path,
                    reason: err.to_string(),
                })
            }
        };
        cell.store(value);
        stats.reloads.fetch_add(1, Ordering::Relaxed);
        let mut open_mode = None;
        warn_if_open(&path, fingerprint.mode, &mut open_mode);

        let (tx, rx) = mpsc::channel();
        let notifier = if options.notify {
            watch_directory(&path, tx.clone())
        } else {
            None
        };
        let worker = Worker {
            path: path.clone(),
            cell,
            prepare,
            stats: Arc::clone(&stats),
            fingerprint: Some(fingerprint),
            current: secret,
            failing: None,
            open_mode,
        };
        let handle = std::thread::Builder::new()
            .name("airlock-credential-watch".into())
            .spawn(move || worker.run(&rx, options))
            .map_err(|source| CredentialFileError::Spawn {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            path,
            stats,
            stop: tx,
            worker: Some(handle),
            notifier,
        })
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters since start.
    pub fn stats(&self) -> WatchStats {
        WatchStats {
            reads: self.stats.reads.load(Ordering::Relaxed),
            reloads: self.stats.reloads.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        // Stop notifications first, then the worker, and wait for it so that
        // nothing is stored into the cell after the watcher is gone.
        drop(self.notifier.take());
        let _ = self.stop.send(Msg::Stop);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl fmt::Debug for FileWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWatcher")
            .field("path", &self.path)
            .field("notify", &self.notifier.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Watches the directory of `path`; every relevant event sends `Changed`.
/// `None` (with a warning) when notifications are unavailable: the periodic
/// check still applies.
fn watch_directory(path: &Path, tx: mpsc::Sender<Msg>) -> Option<RecommendedWatcher> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            // Opens and reads (ours included) change nothing.
            Ok(event) => match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            // Lost events (queue overflow): check anyway.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(Msg::Changed);
        }
    };
    let watched = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map(|()| watcher)
    });
    match watched {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(
                path = %path.display(),
                error = %err,
                "cannot watch the credential file's directory; re-checking it periodically only"
            );
            None
        }
    }
}

// === impl Worker ===

impl<T, F, E> Worker<T, F>
where
    F: FnMut(Secret) -> Result<T, E>,
    E: fmt::Display,
{
    fn run(mut self, rx: &mpsc::Receiver<Msg>, options: WatchOptions) {
        loop {
            match rx.recv_timeout(options.poll_interval) {
                Ok(Msg::Changed) => {
                    if !debounce(rx, options.debounce) {
                        return;
                    }
                    // Always read: a same-size rewrite within one timestamp
                    // tick would keep the fingerprint.
                    self.reload();
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = fs::metadata(&self.path).map(|m| Fingerprint::of(&m));
                    match now {
                        Ok(fp) if Some(fp) == self.fingerprint => {}
                        _ => self.reload(),
                    }
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Reads the file and stores its value if it changed.
    fn reload(&mut self) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let (secret, fingerprint) = match read_credential(&self.path) {
            Ok(read) => read,
            Err(err) => {
                self.fingerprint = None;
                self.fail(&err);
                return;
            }
        };
        self.fingerprint = Some(fingerprint);
        warn_if_open(&self.path, fingerprint.mode, &mut self.open_mode);
        if secret == self.current {
            self.recovered();
            return;
        }
        let value = match secret.clone().map(&mut self.prepare).transpose() {
            Ok(value) => value,
            Err(err) => {
                self.fail(&CredentialFileError::Invalid {
                    path: self.path.clone(),
                    reason: err.to_string(),
                });
                return;
            }
        };
        self.recovered();
        let present = value.is_some();
        let version = self.cell.store(value);
        self.current = secret;
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        if present {
            tracing::info!(path = %self.path.display(), version, "credential file reloaded");
        } else {
            tracing::warn!(
                path = %self.path.display(),
                version,
                "credential file is empty: no credential until it is filled"
            );
        }
    }

    fn fail(&mut self, err: &CredentialFileError) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let text = err.to_string();
        if self.failing.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "keeping the last credential");
            self.failing = Some(text);
        }
    }

    fn recovered(&mut self) {
        if self.failing.take().is_some() {
            tracing::info!(path = %self.path.display(), "credential file is readable again");
        }
    }
}

/// Warns when a credential file is open to other users: anyone may read
/// or write it, or its group may write it. Whoever reads it holds the
/// provider key airlock keeps from agents, and an agent on the same
/// machine is such a reader. A group that may only read is not warned
/// about: Kubernetes makes secret files group-readable for a pod's
/// `fsGroup`. Once per mode (`warned` remembers it), again after a
/// change; nothing once the mode is tight.
fn warn_if_open(path: &Path, mode: u32, warned: &mut Option<u32>) {
    if !is_open(mode) {
        *warned = None;
        return;
    }
    if *warned == Some(mode) {
        return;
    }
    *warned = Some(mode);
    tracing::warn!(
        path = %path.display(),
        mode = format_args!("{mode:04o}"),
        "the credential file can be read or written by other users: whoever reads it holds \
         the provider key airlock keeps from agents; `chmod 600` it (in Kubernetes, a secret \
         volume's defaultMode 0400)"
    );
}

/// Whether `mode` lets anyone read or write the file, or its group write it.
fn is_open(mode: u32) -> bool {
    mode & 0o027 != 0
}

/// Waits until no `Changed` arrived for `quiet` (at most 10 × `quiet` in
/// all). `false` when the watcher is stopping.
fn debounce(rx: &mpsc::Receiver<Msg>, quiet: Duration) -> bool {
    let deadline = Instant::now() + quiet * 10;
    loop {
        let wait = quiet.min(deadline.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            return true;
        }
        match rx.recv_timeout(wait) {
            Ok(Msg::Changed) => {}
            Err(RecvTimeoutError::Timeout) => return true,
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

// === reading ===

impl Fingerprint {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Reads a credential file as the watcher does: surrounding whitespace
/// trimmed, `None` when nothing is left (for `airlock config check`).
pub fn read_credential_file(path: &Path) -> Result<Option<Secret>, CredentialFileError> {
    read_credential(path).map(|(secret, _)| secret)
}

/// Reads a credential file: surrounding whitespace trimmed, `None` when
/// nothing is left. Returns the fingerprint of the file actually read.
fn read_credential(path: &Path) -> Result<(Option<Secret>, Fingerprint), CredentialFileError> {
    let read_err = |source| CredentialFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > MAX_CREDENTIAL_FILE_LEN {
        return Err(CredentialFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    // Sized up front so that reading does not reallocate (no stray copies).
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(MAX_CREDENTIAL_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE_LEN {
        return Err(CredentialFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Zeroizing::new(text),
        Err(err) => {
            drop(Zeroizing::new(err.into_bytes()));
            return Err(CredentialFileError::NotUtf8 {
                path: path.to_owned(),
            });
        }
    };
    let trimmed = text.trim();
    let secret = (!trimmed.is_empty()).then(|| Secret::new(trimmed));
    Ok((secret, Fingerprint::of(&meta)))
}

#[cfg(test)]
mod tests;
