//! The audit writer.
//!
//! The request path hands each finished call's [`AuditRecord`] to an
//! [`Auditor`]; one writer task per process seals records onto this
//! process's chain (seq, prev mac, mac) and appends them to the store in
//! batches: everything that queued while the previous batch was being
//! committed goes into the next transaction (group commit). A caller that
//! must not answer before its record is durable awaits [`Auditor::submit`].
//!
//! Answers go back in one hand-off per batch and worker: an auditor made
//! with [`Auditor::for_worker`] has its callers answered by a [`Delivery`]
//! task on that worker's runtime, which the writer wakes once per batch
//! (waking every caller from the writer's thread would cost a cross-thread
//! wake-up, a system call, per record).
//!
//! Fail closed: with `fail_closed`, [`Auditor::admits_calls`] turns false as
//! soon as a commit fails, a commit takes longer than `stall_timeout`, or
//! the queue is full, and stays false until a probe write succeeds again.
//!
//! [`verify_store`] checks the whole stored trail.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::audit::{head_seal, AuditKey, AuditRecord};
use airlock_store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, Notify};

mod verify;
mod writer;

pub use verify::{verify_store, Verified};

/// Tunables of the audit writer.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// Refuse calls (503 `audit_unavailable`) when records cannot be written.
    pub fail_closed: bool,
    /// Most records in one transaction.
    pub max_batch: usize,
    /// Records that may wait for the writer; a full queue counts as stuck.
    pub queue_capacity: usize,
    /// A commit running longer than this counts as stuck; also the longest a
    /// caller waits for its record.
    pub stall_timeout: Duration,
    /// How often a failed writer probes the store for recovery.
    pub probe_interval: Duration,
    /// Longest the writer waits for one store call (a commit, a probe): a
    /// connection left silent by a database failover would otherwise hold
    /// it, and every call behind it, for as long as TCP retries (minutes).
    /// A commit given up on may still have landed; the writer then finds
    /// the chain moved and reads its head again.
    pub store_call_limit: Duration,
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    // The store's error is in the message, not also its source: `{:#}`
    // printed it twice.
    #[error("the audit store refused the write: {0}")]
    Store(StoreError),
    #[error("the audit store refused the batch: {0}")]
    Write(String),
    #[error("the audit writer did not commit in time")]
    Stalled,
    #[error("the audit writer is not running")]
    Closed,
    #[error("the audit queue is full")]
    QueueFull,
}

impl From<StoreError> for AuditError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Metrics of the writer (Prometheus, registered by the caller).
#[derive(Debug)]
pub struct AuditStats {
    /// Records committed.
    pub written: Counter,
    /// Records whose commit failed (each attempt; a record held back and
    /// written later counts here and in `written`).
    pub failed: Counter,
    /// Records given up on: never written.
    pub lost: Counter,
    /// Transactions committed.
    pub batches: Counter,
    /// How long the store took over each batch, failed ones included.
    pub commit_seconds: Histogram,
}

impl Default for AuditStats {
    fn default() -> Self {
        Self {
            written: Counter::default(),
            failed: Counter::default(),
            lost: Counter::default(),
            batches: Counter::default(),
            // 10 µs to about 5 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
        }
    }
}

impl AuditStats {
    /// Registers the counters as `airlock_audit_*`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "airlock_audit_records_written",
            "Audit records committed to the store",
            self.written.clone(),
        );
        registry.register(
            "airlock_audit_records_failed",
            "Audit records whose commit failed (each attempt; records held back are written later)",
            self.failed.clone(),
        );
        registry.register(
            "airlock_audit_records_lost",
            "Audit records given up on and never written",
            self.lost.clone(),
        );
        registry.register(
            "airlock_audit_batches",
            "Audit transactions committed (records / batches = group commit size)",
            self.batches.clone(),
        );
        registry.register(
            "airlock_audit_commit_seconds",
            "Time the store took to commit one batch of audit records (failed attempts included)",
            self.commit_seconds.clone(),
        );
    }
}

/// Hands records to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    shared: Option<Arc<Shared>>,
    /// Where this auditor's callers are answered (see [`Auditor::for_worker`]).
    route: Option<Route>,
    /// Wakes this worker's waiting callers to check how long they have
    /// waited (see [`Delivery::run`]).
    watch: Option<Arc<Watch>>,
}

/// A caller waiting for its record, and the answer it gets.
type Waiter = oneshot::Sender<Result<(), AuditError>>;
type Answer = (Waiter, Result<(), AuditError>);

/// The way to a worker's [`Delivery`]: answers for its callers, a batch at a time.
type Route = mpsc::UnboundedSender<Vec<Answer>>;

/// Answers the callers of one worker's auditor (see [`Auditor::for_worker`]);
/// runs on that worker's runtime until the auditor and its clones are gone.
pub struct Delivery {
    batches: mpsc::UnboundedReceiver<Vec<Answer>>,
    watch: Arc<Watch>,
    /// How often waiting callers check their wait against `stall_timeout`.
    tick: Duration,
}

/// The running writer.
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    /// Closed when the writer ends (dropped unsent if it panicked).
    done: oneshot::Receiver<()>,
}

struct Shared {
    tx: mpsc::Sender<Msg>,
    health: Health,
    settings: AuditSettings,
    stats: Arc<AuditStats>,
}

/// Messages to the writer task.
// `Shutdown` is sent once; records are the traffic, and unboxed on purpose.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// Sent by value, so that the call's box is freed on its worker's
    /// thread rather than the writer's (freeing on another thread is what
    /// a malloc arena handles worst); session and provider are shared, so
    /// the writer mostly frees only the path.
    Record(AuditRecord, Waiter, Option<Route>),
    Shutdown(oneshot::Sender<()>),
}

/// Whether the writer can write, as the request path sees it.
struct Health {
    healthy: AtomicBool,
    /// Milliseconds since `base` when the running commit began; 0 when idle.
    commit_started: AtomicU64,
    base: Instant,
}

// === impl Auditor ===

impl Auditor {
    /// Claims this process's chain in `store` and starts the writer.
    pub async fn start(
        store: Arc<dyn Store>,
        key: Arc<AuditKey>,
        settings: AuditSettings,
    ) -> Result<(Self, WriterHandle), AuditError> {
        // A store with a journal acknowledges a batch once it is there:
        // one write instead of a commit (see airlock-store's
        // `sqlite/journal.rs`).
        let journal = store.audit_use_journal().await?;
        let head = store
            .audit_claim_chain(&|chain| {
                head_seal(&key, chain, 0, &airlock_core::audit::GENESIS_MAC)
            })
            .await?;
        tracing::info!(
            chain = head.chain,
            seq = head.seq,
            journal,
            "audit chain claimed"
        );
        let (shared, rx) = Shared::new(settings);
        let tx = shared.tx.clone();
        let inline = store.audit_appends_inline();
        let several_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
        let writer =
            writer::Writer::new(store, key, head, Arc::clone(&shared), inline, several_cpus);
        let (finished, done) = oneshot::channel();
        if inline {
            // The store commits on the caller's thread: the writer gets a
            // thread (and a runtime) of its own, so that a commit blocks
            // nothing else and a batch needs no hand-off to another thread.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AuditError::Write(format!("cannot start the writer: {e}")))?;
            std::thread::Builder::new()
                .name("airlock-audit".to_owned())
                .spawn(move || {
                    runtime.block_on(writer.run(rx));
                    let _ = finished.send(());
                })
                .map_err(|e| AuditError::Write(format!("cannot start the writer: {e}")))?;
        } else {
            tokio::spawn(async move {
                writer.run(rx).await;
                let _ = finished.send(());
            });
        }
        Ok((
            Self {
                shared: Some(shared),
                route: None,
                watch: None,
            },
            WriterHandle { tx, done },
        ))
    }

    /// An auditor that records nothing (`[audit] enabled = false`).
    pub fn disabled() -> Self {
        Self {
            shared: None,
            route: None,
            watch: None,
        }
    }

    /// The same audit trail for one worker runtime: its callers are
    /// answered by the returned [`Delivery`], which the worker spawns on its
    /// runtime; the writer then wakes that runtime once per batch rather
    /// than once per record. Answers wait for the delivery to run; once it
    /// is dropped (or its runtime is gone), callers are answered directly.
    /// The delivery also bounds its callers' waits, with one timer for all
    /// of them instead of one per call. No delivery when audit is disabled.
    pub fn for_worker(&self) -> (Self, Option<Delivery>) {
        let Some(shared) = &self.shared else {
            return (self.clone(), None);
        };
        let (route, batches) = mpsc::unbounded_channel();
        let watch = Arc::new(Watch {
            ticks: Notify::new(),
            gone: AtomicBool::new(false),
        });
        let auditor = Self {
            shared: self.shared.clone(),
            route: Some(route),
            watch: Some(Arc::clone(&watch)),
        };
        let tick = (shared.settings.stall_timeout / 4).clamp(MIN_TICK, MAX_TICK);
        (
            auditor,
            Some(Delivery {
                batches,
                watch,
                tick,
            }),
        )
    }

    /// Whether records are written at all.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// The writer's counters (none when disabled).
    pub fn stats(&self) -> Option<Arc<AuditStats>> {
        self.shared.as_ref().map(|s| Arc::clone(&s.stats))
    }

    /// Whether a call may go ahead: false only when audit is fail-closed and
    /// the writer cannot write right now.
    pub fn admits_calls(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => !shared.settings.fail_closed || shared.writable(),
        }
    }

    /// Whether a failed write must fail the call.
    pub fn fail_closed(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.settings.fail_closed)
    }

    /// Queues `record`; the returned future resolves once it is durable, or
    /// with the reason it is not (after at most `stall_timeout`; for a
    /// worker's auditor, checked every quarter of it). Dropping the future
    /// does not withdraw the record.
    pub fn submit(
        &self,
        record: Box<AuditRecord>,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 'static {
        let queued = self.shared.as_ref().map(|shared| {
            let (done, wait) = oneshot::channel();
            let sent = shared
                .tx
                .try_send(Msg::Record(*record, done, self.route.clone()));
            let wait_for_it = shared.settings.fail_closed || shared.writable();
            (
                sent,
                wait,
                wait_for_it,
                shared.settings.stall_timeout,
                Arc::clone(&shared.stats),
            )
        });
        let watch = self.watch.clone();
        async move {
            let Some((sent, wait, wait_for_it, timeout, stats)) = queued else {
                return Ok(());
            };
            if let Err(e) = sent {
                stats.failed.inc();
                return Err(match e {
                    mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => AuditError::Closed,
                });
            }
            if !wait_for_it {
                // Fail-open and the writer is failing: do not hold the call.
                return Ok(());
            }
            let answered = match watch {
                Some(watch) => watched(wait, &watch, timeout).await,
                None => tokio::time::timeout(timeout, wait)
                    .await
                    .map_err(|_| Stalled),
            };
            match answered {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(AuditError::Closed),
                Err(_) => Err(AuditError::Stalled),
            }
        }
    }
}

/// Shortest and longest interval between a worker's checks of its
/// callers' waits.
const MIN_TICK: Duration = Duration::from_millis(1);
const MAX_TICK: Duration = Duration::from_millis(500);

/// A worker's wait bound: its [`Delivery`] ticks, and says when it is gone.
struct Watch {
    ticks: Notify,
    /// Set (and waiters woken) when the delivery is dropped: from then on
    /// nothing ticks, and waiters time themselves.
    gone: AtomicBool,
}

/// Waits for `wait`, or until a tick of `watch` finds that `timeout` has
/// passed since the call began waiting. No timer of its own while the
/// worker's delivery runs: a timer per call costs a timer-wheel entry and,
/// often, a wake-up of the runtime's driver (a system call).
async fn watched<T>(
    wait: oneshot::Receiver<T>,
    watch: &Watch,
    timeout: Duration,
) -> Result<Result<T, oneshot::error::RecvError>, Stalled> {
    let began = Instant::now();
    tokio::pin!(wait);
    loop {
        let tick = watch.ticks.notified();
        tokio::pin!(tick);
        // Registered before `gone` is read: a delivery dropped after the
        // read still wakes this waiter.
        tick.as_mut().enable();
        if watch.gone.load(Ordering::Acquire) {
            let left = timeout.saturating_sub(began.elapsed());
            return tokio::time::timeout(left, wait).await.map_err(|_| Stalled);
        }
        tokio::select! {
            biased;
            answer = &mut wait => return Ok(answer),
            () = tick => {
                if began.elapsed() >= timeout {
                    return Err(Stalled);
                }
            }
        }
    }
}

/// A caller's wait ran out.
struct Stalled;

// === impl Delivery ===

impl Drop for Delivery {
    fn drop(&mut self) {
        self.watch.gone.store(true, Ordering::Release);
        self.watch.ticks.notify_waiters();
    }
}

impl Delivery {
    /// Answers callers as batches come, until every sender is gone; every
    /// tick, has waiting callers check how long they have waited.
    pub async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = self.batches.recv() => {
                    let Some(batch) = batch else {
                        return;
                    };
                    for (waiter, answer) in batch {
                        // A caller that stopped waiting does not mind.
                        let _ = waiter.send(answer);
                    }
                }
                _ = ticks.tick() => self.watch.ticks.notify_waiters(),
            }
        }
    }
}

// === impl Shared ===

impl Shared {
    /// A healthy writer's shared state, and the receiving end of its queue.
    fn new(settings: AuditSettings) -> (Arc<Self>, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            tx,
            health: Health {
                healthy: AtomicBool::new(true),
                commit_started: AtomicU64::new(0),
                base: Instant::now(),
            },
            settings,
            stats: Arc::new(AuditStats::default()),
        });
        (shared, rx)
    }

    /// Healthy, not stuck in a commit, and room in the queue.
    fn writable(&self) -> bool {
        self.health.healthy.load(Ordering::Acquire)
            && !self.health.stalled(self.settings.stall_timeout)
            && self.tx.capacity() > 0
    }
}

// === impl Health ===

impl Health {
    fn now(&self) -> u64 {
        // +1 so that 0 keeps meaning "idle".
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn commit_began(&self) {
        self.commit_started.store(self.now(), Ordering::Release);
    }

    fn commit_ended(&self, ok: bool) {
        self.commit_started.store(0, Ordering::Release);
        self.healthy.store(ok, Ordering::Release);
    }

    fn stalled(&self, limit: Duration) -> bool {
        let started = self.commit_started.load(Ordering::Acquire);
        started != 0
            && self.now().saturating_sub(started) > u64::try_from(limit.as_millis()).unwrap_or(0)
    }
}

// === impl WriterHandle ===

impl WriterHandle {
    /// Writes everything queued so far, then stops the writer.
    pub async fn shutdown(self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        if self.done.await.is_err() {
            tracing::error!("audit writer ended abnormally");
        }
    }
}

#[cfg(test)]
mod tests;
