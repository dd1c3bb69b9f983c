//! File descriptors: how many proxy connections fit under the process's
//! open-files limit, and what an accept loop does when descriptors (or
//! kernel memory) run out anyway.
//!
//! Every proxy connection holds a descriptor, and so does the upstream
//! connection its call in flight uses; the store, the admin API, the
//! runtimes and the files airlock reads need some too. A proxy allowed to
//! hold more connections than that leaves `accept` failing with `EMFILE`
//! for every listener in the process, the admin API's included. So
//! `serve` lowers `proxy.max_connections` to [`connection_capacity`] (with a
//! warning) and the proxy refuses connections beyond it with its usual 503
//! `overloaded`, while descriptors are still left for everything else; the
//! calls in flight upstream are bounded by the same number
//! ([`UpstreamSlot`]), so that HTTP/2 streams, which each need an upstream
//! connection, cannot take more.
//!
//! Should `accept` fail all the same (descriptors taken by idle pooled
//! upstream connections, another process exhausting the system's table), [`AcceptErrors`] makes the loop pause [`ACCEPT_BACKOFF`] between
//! attempts instead of spinning, and logs the episode once when it begins
//! and once when accepting works again.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use tokio::net::TcpStream;

/// Descriptors kept back from proxy connections whatever the number of
/// workers: standard streams and the log; the store (SQLite: up to six
/// connections of three descriptors each, database, log and shared memory;
/// PostgreSQL: ten sockets); the admin listener and a few dozen admin
/// connections (orchestrators, CLI, metrics scrapes); the control runtime;
/// TLS, CA, key and credential files and their watchers; and the one
/// connection a full proxy accepts to answer 503 `overloaded`.
pub const RESERVED_DESCRIPTORS: u64 = 96;

/// Descriptors kept back per proxy worker: its copy of the listener and
/// its runtime's event queue and waker.
pub const RESERVED_PER_WORKER: u64 = 4;

/// Descriptors one proxy connection may hold: its own, and the upstream
/// connection its call in flight uses (as nginx counts both in
/// `worker_connections`).
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;

/// How long an accept loop pauses after `accept` failed for want of
/// descriptors or memory (or any failure of the listener itself), so that
/// it does not spin while connections close.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How long accepts must have stopped failing before an episode of failures
/// counts as over (and "accepting again" is logged): while descriptors are
/// short, an accept succeeds whenever one is freed and the next fails
/// again; that is one episode, not many.
const RECOVERED_AFTER: Duration = Duration::from_secs(1);

/// Descriptors kept back from proxy connections with `workers` workers.
pub fn reserved(workers: usize) -> u64 {
    let workers = u64::try_from(workers.max(1)).unwrap_or(u64::MAX);
    RESERVED_DESCRIPTORS.saturating_add(RESERVED_PER_WORKER.saturating_mul(workers))
}

/// Most proxy connections the process can hold with an open-files limit of
/// `open_files` (`None`: unlimited) and `workers` workers: what is left
/// after [`reserved`], [`DESCRIPTORS_PER_CONNECTION`] each, and at least
/// one.
pub fn connection_capacity(open_files: Option<u64>, workers: usize) -> usize {
    let Some(open_files) = open_files else {
        return usize::MAX;
    };
    let room = open_files.saturating_sub(reserved(workers)) / DESCRIPTORS_PER_CONNECTION;
    usize::try_from(room).unwrap_or(usize::MAX).max(1)
}

/// Calls in flight upstream now, every worker's and provider's.
static UPSTREAM_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Most calls in flight upstream at once: unbounded until
/// [`limit_upstream_calls`].
static UPSTREAM_MAX: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Bounds the calls the process has in flight upstream at once, every
/// worker's and provider's together, to `max` (what `serve` sets is
/// `proxy.max_connections`: each proxy connection is counted with the
/// descriptor of the upstream connection its call uses). An HTTP/1.1
/// agent has one call in flight per connection, so this binds only
/// HTTP/2 streams, each of which needs an upstream connection of its own:
/// without the bound they took the descriptors kept for the store and the
/// admin API (round 41: the admin listener failed its accepts while an
/// agent held 196 streams on three connections).
pub fn limit_upstream_calls(max: usize) {
    UPSTREAM_MAX.store(max.max(1), Ordering::Release);
}

/// One call's part of the bound set by [`limit_upstream_calls`], held
/// with its upstream answer and given back when dropped.
#[derive(Debug)]
pub struct UpstreamSlot(());

impl UpstreamSlot {
    /// A slot, or `None` when every one is taken.
    pub fn take() -> Option<Self> {
        let max = UPSTREAM_MAX.load(Ordering::Acquire);
        UPSTREAM_IN_FLIGHT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Self(()))
    }
}

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        UPSTREAM_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers a connection over a listener's limit with a 503 whose JSON
/// `body` says so, and leaves it to be closed, without waiting for
/// anything (what does not fit the socket's buffer is not sent).
pub fn refuse_connection(stream: &TcpStream, body: &str) {
    let mut discard = [0u8; 4096];
    // Reading what already arrived makes a clean close (FIN, not RST) likelier.
    let _ = stream.try_read(&mut discard);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// What a failed `accept` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptFailure {
    /// One pending connection failed before it was accepted (reset, aborted,
    /// refused by a firewall rule, a network error Linux passes on): the
    /// next one may be fine, so accept again at once.
    Connection,
    /// Out of descriptors (`EMFILE`, `ENFILE`) or kernel memory (`ENOBUFS`,
    /// `ENOMEM`): retrying before something is freed fails the same way.
    Resources,
    /// Anything else: the listener itself is in trouble; pause as for
    /// [`AcceptFailure::Resources`] rather than spin.
    Listener,
}

impl AcceptFailure {
    /// Classifies an error returned by `accept`.
    pub fn of(error: &io::Error) -> Self {
        use io::ErrorKind;
        if matches!(
            error.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
                | ErrorKind::Interrupted
                | ErrorKind::WouldBlock
        ) {
            return Self::Connection;
        }
        match Errno::from_io_error(error) {
            Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => Self::Resources,
            // accept(2): Linux passes the new connection's pending network
            // errors on, to be treated like EAGAIN; EPERM is a firewall rule.
            Some(
                Errno::PROTO
                | Errno::PERM
                | Errno::NETDOWN
                | Errno::NOPROTOOPT
                | Errno::HOSTDOWN
                | Errno::HOSTUNREACH
                | Errno::OPNOTSUPP
                | Errno::NETUNREACH
                | Errno::TIMEDOUT,
            ) => Self::Connection,
            _ if error.kind() == ErrorKind::OutOfMemory => Self::Resources,
            _ => Self::Listener,
        }
    }
}

/// Whether `error`, or an error it was caused by, is the process or the
/// system running out of descriptors or kernel memory (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`): for an upstream connection that could not be
/// opened, airlock's own shortage (503 `overloaded`), not the provider's
/// failure (502).
pub fn is_resource_shortage(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::cause::<io::Error>(error)
        .is_some_and(|io_error| AcceptFailure::of(io_error) == AcceptFailure::Resources)
}

/// Failed accepts on one listener (shared by the loops accepting from it):
/// decides when to pause and logs each episode of failures once, when it
/// begins (warning) and when accepting works again (info, with the number
/// of failed attempts).
#[derive(Debug)]
pub struct AcceptErrors {
    /// Names the listener in the logs (`"proxy"`, `"admin"`).
    listener: &'static str,
    origin: Instant,
    failing: AtomicBool,
    /// Failed attempts in the current episode.
    failures: AtomicU64,
    /// When the last attempt failed, in ms since `origin`.
    last_failure: AtomicU64,
}

impl AcceptErrors {
    /// Failed accepts of the listener named `listener` in the logs.
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            origin: Instant::now(),
            failing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
        }
    }

    /// Notes a failed `accept`; returns how long to pause before the next
    /// attempt (`None`: accept again at once).
    pub fn failed(&self, error: &io::Error) -> Option<Duration> {
        let failure = AcceptFailure::of(error);
        if failure == AcceptFailure::Connection {
            tracing::debug!(listener = self.listener, error = %error, "a connection failed before it was accepted");
            return None;
        }
        if self.note_failure(self.now()) {
            let why = match failure {
                AcceptFailure::Resources => "out of file descriptors or memory",
                _ => "listener error",
            };
            tracing::warn!(
                listener = self.listener,
                error = %error,
                "accept failed ({why}): pausing {} ms between attempts until it works again \
                 (logged once; see proxy.max_connections and the open files limit)",
                ACCEPT_BACKOFF.as_millis()
            );
        }
        Some(ACCEPT_BACKOFF)
    }

    /// Notes an accepted connection; ends an episode of failures (logged)
    /// once the last failure is [`RECOVERED_AFTER`] ago. One atomic load
    /// when nothing failed.
    pub fn accepted(&self) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        if let Some(failures) = self.note_success(self.now()) {
            tracing::info!(
                listener = self.listener,
                failed_attempts = failures,
                "accepting connections again"
            );
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a failure at `now_ms`; true when it begins an episode.
    fn note_failure(&self, now_ms: u64) -> bool {
        self.last_failure.fetch_max(now_ms, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        !self.failing.swap(true, Ordering::AcqRel)
    }

    /// Counts a success at `now_ms`; the episode's number of failures when
    /// it ends one.
    fn note_success(&self, now_ms: u64) -> Option<u64> {
        let quiet = now_ms.saturating_sub(self.last_failure.load(Ordering::Relaxed));
        let recovered_after = u64::try_from(RECOVERED_AFTER.as_millis()).unwrap_or(u64::MAX);
        if quiet < recovered_after || !self.failing.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(self.failures.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    /// An error that wraps another, as hyper-util's connect error wraps the
    /// socket's `io::Error`.
    #[derive(Debug)]
    struct Wrapped(io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp open error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn resource_shortage_is_found_in_the_source_chain() {
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            assert!(is_resource_shortage(&os(errno)), "{errno:?}");
            assert!(is_resource_shortage(&Wrapped(os(errno))), "{errno:?}");
        }
        for errno in [Errno::CONNREFUSED, Errno::TIMEDOUT, Errno::HOSTUNREACH] {
            assert!(!is_resource_shortage(&Wrapped(os(errno))), "{errno:?}");
        }
    }

    #[test]
    fn capacity_leaves_the_reserve_and_counts_two_descriptors_a_connection() {
        // 1024 - (96 + 4 * 2) = 920, two each.
        assert_eq!(reserved(2), 104);
        assert_eq!(connection_capacity(Some(1024), 2), 460);
        assert_eq!(connection_capacity(Some(256), 1), 78);
        // More workers, more kept back.
        assert_eq!(connection_capacity(Some(1024), 8), 448);
        // Zero workers counts as one (the server starts at least one).
        assert_eq!(
            connection_capacity(Some(1024), 0),
            connection_capacity(Some(1024), 1)
        );
    }

    #[test]
    fn capacity_is_at_least_one_and_unlimited_without_a_limit() {
        assert_eq!(connection_capacity(Some(64), 2), 1);
        assert_eq!(connection_capacity(Some(0), 2), 1);
        assert_eq!(connection_capacity(Some(105), 2), 1);
        assert_eq!(connection_capacity(Some(108), 2), 2);
        assert_eq!(connection_capacity(None, 2), usize::MAX);
        // A reserve that does not fit leaves the one connection.
        assert_eq!(connection_capacity(Some(1 << 20), usize::MAX), 1);
        assert_eq!(
            u64::try_from(connection_capacity(Some(u64::MAX), 2)).unwrap(),
            (u64::MAX - 104) / 2
        );
        // The default 10,000 fits a common hard limit.
        assert!(connection_capacity(Some(1 << 20), 64) > 10_000);
    }

    #[test]
    fn failures_are_classified() {
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            assert_eq!(
                AcceptFailure::of(&os(errno)),
                AcceptFailure::Resources,
                "{errno:?}"
            );
        }
        for errno in [
            Errno::CONNABORTED,
            Errno::PROTO,
            Errno::PERM,
            Errno::INTR,
            Errno::NETUNREACH,
        ] {
            assert_eq!(
                AcceptFailure::of(&os(errno)),
                AcceptFailure::Connection,
                "{errno:?}"
            );
        }
        for errno in [Errno::BADF, Errno::INVAL, Errno::NOTSOCK] {
            assert_eq!(
                AcceptFailure::of(&os(errno)),
                AcceptFailure::Listener,
                "{errno:?}"
            );
        }
        assert_eq!(
            AcceptFailure::of(&io::Error::from(io::ErrorKind::ConnectionReset)),
            AcceptFailure::Connection
        );
    }

    #[test]
    fn only_exhaustion_and_listener_errors_pause() {
        let errors = AcceptErrors::new("test");
        assert_eq!(errors.failed(&os(Errno::CONNABORTED)), None);
        assert!(!errors.failing.load(Ordering::Relaxed));
        assert_eq!(errors.failed(&os(Errno::MFILE)), Some(ACCEPT_BACKOFF));
        assert_eq!(errors.failed(&os(Errno::BADF)), Some(ACCEPT_BACKOFF));
        assert!(errors.failing.load(Ordering::Relaxed));
    }

    #[test]
    fn an_episode_is_reported_once_and_ends_after_a_quiet_second() {
        let errors = AcceptErrors::new("test");
        assert!(
            errors.note_failure(0),
            "the first failure begins an episode"
        );
        for t in (50..2_000).step_by(50) {
            assert!(!errors.note_failure(t), "failure at {t} ms logged again");
            // Descriptors freed now and then: accepts in between succeed
            // without ending the episode.
            assert_eq!(errors.note_success(t + 10), None);
        }
        // 1,950 failures-worth of time: 40 failures in all.
        assert_eq!(
            errors.note_success(2_900),
            None,
            "quiet for less than a second"
        );
        assert_eq!(errors.note_success(2_950), Some(40));
        assert_eq!(errors.note_success(3_000), None, "the episode ended once");
        // The next failure begins a new episode, counted afresh.
        assert!(errors.note_failure(5_000));
        assert_eq!(errors.note_success(6_000), Some(1));
    }
}
