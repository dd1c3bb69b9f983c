//! The writer task: seals queued records onto this process's chain and
//! commits them in batches.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::audit::{head_seal, AuditKey, AuditRecord, Flags, GENESIS_MAC};
use airlock_store::{ChainHead, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::{Answer, AuditError, Msg, Route, Shared, Waiter};

/// While the store stays unwritable, one probe failure in this many is
/// logged (with probes every quarter second, about every 25 s).
const PROBE_LOG_EVERY: u64 = 100;

/// After a batch of at most this many records (light load), a writer on a
/// thread of its own watches its queue for [`IDLE_WATCH`] before it
/// sleeps.
pub(crate) const WATCH_AFTER_BATCH: usize = 2;

/// How long the writer watches its queue after a small batch, giving up
/// its CPU between looks (`sched_yield`): the next call's record then
/// needs no cross-thread wake-up (a system call by the proxy worker and, on
/// a VM, an inter-processor interrupt to a halted vCPU: tens of µs on a
/// call's latency at concurrency 1). It watches only while records come
/// that close together (a fast provider, calls back to back): a watch that
/// caught nothing stops the watching until a record again comes within
/// this long of a commit's end, so calls that take their
/// provider milliseconds cost no watching. Under heavier load the batches
/// are larger and the writer sleeps at once, leaving the CPU to the proxy
/// workers.
pub(crate) const IDLE_WATCH: Duration = Duration::from_micros(250);

/// State of the writer task.
pub(crate) struct Writer {
    store: Arc<dyn Store>,
    key: Arc<AuditKey>,
    head: ChainHead,
    shared: Arc<Shared>,
    records: Vec<AuditRecord>,
    waiters: Vec<(Waiter, Option<Route>)>,
    /// Records of batches that failed without landing, flagged
    /// `written_late` (their callers were answered with the failure): they
    /// go first into the next batch, so that a call the provider saw while
    /// the store was failing still gets its record. At most
    /// `queue_capacity`; beyond that they are counted as failed and lost.
    unwritten: Vec<AuditRecord>,
    /// Commit with [`Store::audit_append_blocking`]: the writer has a
    /// thread of its own.
    inline: bool,
    /// Watch the queue after a small batch (see [`IDLE_WATCH`]): only on a
    /// thread of its own and with more than one CPU, where the proxy
    /// workers have another to run on.
    watches: bool,
    /// Probes failed since the store last took a write (logged at the
    /// first and then every [`PROBE_LOG_EVERY`]th, not every probe).
    probes_failed: u64,
    /// Records in the last batch committed.
    pub(crate) last_batch: usize,
    /// The last watch caught a record, or the record that last woke the
    /// writer came within [`IDLE_WATCH`] of its commit's end: watching is
    /// likely to catch the next one.
    pub(crate) watch_pays: bool,
    /// When the last commit ended.
    committed: Instant,
}

// === impl Writer ===

impl Writer {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        key: Arc<AuditKey>,
        head: ChainHead,
        shared: Arc<Shared>,
        inline: bool,
        watches: bool,
    ) -> Self {
        let max_batch = shared.settings.max_batch.max(1);
        Self {
            store,
            key,
            head,
            shared,
            records: Vec::with_capacity(max_batch),
            waiters: Vec::with_capacity(max_batch),
            unwritten: Vec::new(),
            inline,
            watches: inline && watches,
            probes_failed: 0,
            last_batch: 0,
            watch_pays: false,
            committed: Instant::now(),
        }
    }

    /// Runs until shut down or every sender is gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let msg = if self.shared.health.healthy.load(Ordering::Acquire) {
                match self.watch_queue(&mut rx) {
                    Some(msg) => Some(msg),
                    None => {
                        let msg = rx.recv().await;
                        self.woke(self.committed.elapsed());
                        msg
                    }
                }
            } else {
                tokio::select! {
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep(self.shared.settings.probe_interval) => {
                        self.probe().await;
                        continue;
                    }
                }
            };
            let Some(msg) = msg else {
                return;
            };
            let mut shutdown = self.take(msg);
            // Group commit: everything that queued meanwhile joins this batch.
            // On its own thread, with calls coming in concurrently (the batch
            // already holds several), the writer gives up its CPU at most
            // twice before committing, so that calls finishing on busy
            // workers join this transaction: at concurrency 64 batches grow
            // from about 6 records to about 25 and a record costs the writer
            // a third less (see BENCHMARKS.md). With spare CPUs the yield
            // returns at once; a lone call (concurrency 1) never waits.
            let mut yields = 0;
            while shutdown.is_none() && self.records.len() < self.shared.settings.max_batch {
                match rx.try_recv() {
                    Ok(msg) => shutdown = self.take(msg),
                    Err(_) if self.inline && self.records.len() >= 2 && yields < 2 => {
                        yields += 1;
                        std::thread::yield_now();
                    }
                    Err(_) => break,
                }
            }
            self.last_batch = self.records.len();
            self.commit().await;
            self.committed = Instant::now();
            if let Some(done) = shutdown {
                // Nothing is queued before the shutdown message that has not
                // been committed; take what raced in after it, then stop.
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let Some(other) = self.take(msg) {
                        let _ = other.send(());
                    }
                }
                self.commit().await;
                self.write_held_back().await;
                if !self.unwritten.is_empty() {
                    self.shared.stats.lost.inc_by(self.unwritten.len() as u64);
                    tracing::error!(
                        records = self.unwritten.len(),
                        "audit records lost: the store did not take them before shutdown"
                    );
                }
                let _ = done.send(());
                tracing::info!(
                    chain = self.head.chain,
                    seq = self.head.seq,
                    "audit writer stopped"
                );
                return;
            }
        }
    }

    /// The next message if one comes within [`IDLE_WATCH`] after a small
    /// batch while watching pays; `None` at once under load, when watching
    /// caught nothing lately, when the writer shares a runtime (it must not
    /// hold that runtime's thread) or the machine has one CPU, or when the
    /// queue closed.
    pub(crate) fn watch_queue(&mut self, rx: &mut mpsc::Receiver<Msg>) -> Option<Msg> {
        if !self.watches || !self.watch_pays || self.last_batch > WATCH_AFTER_BATCH {
            return None;
        }
        let until = Instant::now() + IDLE_WATCH;
        loop {
            match rx.try_recv() {
                Ok(msg) => return Some(msg),
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                    std::thread::yield_now();
                }
                Err(_) => {
                    self.watch_pays = false;
                    return None;
                }
            }
        }
    }

    /// Notes that the record that woke the writer came `gap` after the
    /// last commit ended (a watch included): one that came within
    /// [`IDLE_WATCH`] would have been caught by a watch.
    pub(crate) fn woke(&mut self, gap: Duration) {
        self.watch_pays = gap < IDLE_WATCH;
    }

    fn take(&mut self, msg: Msg) -> Option<oneshot::Sender<()>> {
        match msg {
            Msg::Record(record, waiter, route) => {
                self.records.push(record);
                self.waiters.push((waiter, route));
                None
            }
            Msg::Shutdown(done) => Some(done),
        }
    }

    /// Seals and appends the pending batch, after the records earlier
    /// batches could not write; answers every waiter.
    async fn commit(&mut self) {
        let late = self
            .unwritten
            .len()
            .min(self.shared.settings.max_batch.max(1));
        if late > 0 {
            self.records.splice(0..0, self.unwritten.drain(..late));
        }
        if self.records.is_empty() {
            return;
        }
        let stats = Arc::clone(&self.shared.stats);
        let count = self.records.len() as u64;
        let mut moved_chain = false;
        loop {
            let head = self.seal_batch();
            let health = &self.shared.health;
            health.commit_began();
            let started = Instant::now();
            let inline = self
                .inline
                .then(|| self.store.audit_append_blocking(&self.records, &head))
                .flatten();
            let result = match inline {
                Some(result) => result,
                None => {
                    let limit = self.shared.settings.store_call_limit;
                    bounded(limit, self.store.audit_append(&self.records, &head)).await
                }
            };
            stats
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => None,
                Err(e) => {
                    // A commit given up on may have landed, and a chain
                    // another writer moved on is left for another: read
                    // the head again.
                    let reread =
                        matches!(e, StoreError::ChainConflict(_) | StoreError::TimedOut(_))
                            && self.reclaim().await;
                    if reread && self.head.chain == head.chain && self.head.seq == head.seq {
                        None
                    } else if reread
                        && !moved_chain
                        && matches!(e, StoreError::ChainConflict(_))
                        && self.head.chain != head.chain
                    {
                        // On a chain of its own now: the batch goes there,
                        // once, before anyone is told it failed.
                        tracing::warn!(
                            from = head.chain,
                            to = self.head.chain,
                            "audit chain taken over; writing on another"
                        );
                        moved_chain = true;
                        continue;
                    } else {
                        Some(e)
                    }
                }
            };
            match error {
                None => {
                    self.records.clear();
                    self.head = head;
                    self.shared.health.commit_ended(true);
                    stats.written.inc_by(count);
                    stats.batches.inc();
                    self.answer(|| Ok(()));
                }
                Some(e) => {
                    self.shared.health.commit_ended(false);
                    stats.failed.inc_by(count);
                    tracing::error!(error = %e, records = count, "audit write failed");
                    let reason = e.to_string();
                    self.answer(|| Err(AuditError::Write(reason.clone())));
                    // Kept for later only when they surely were not written:
                    // SQLite rolls a failed commit back, a conflict is
                    // decided before anything is written, and a store that
                    // could not be reached was sent nothing. Another store's
                    // error may come after its commit (a lost answer): sent
                    // again, they could be there twice.
                    let not_written = (self.inline
                        || matches!(e, StoreError::ChainConflict(_) | StoreError::Unreachable(_)))
                        && !matches!(e, StoreError::InvalidBatch(_));
                    if not_written {
                        self.keep_unwritten(late);
                    } else {
                        self.lose_batch("the store failed without telling whether it wrote them");
                    }
                }
            }
            return;
        }
    }

    /// Seals the pending batch onto the chain after the current head;
    /// returns the head it moves the chain to.
    fn seal_batch(&mut self) -> ChainHead {
        let chain = self.head.chain;
        let mut seq = self.head.seq;
        let mut prev = self.head.mac;
        for record in &mut self.records {
            seq += 1;
            record.seal(&self.key, chain, seq, prev);
            prev = record.mac;
        }
        ChainHead {
            chain,
            seq,
            mac: prev,
            seal: head_seal(&self.key, chain, seq, &prev),
        }
    }

    /// Gives up the records of the batch in hand (logged, counted as lost).
    fn lose_batch(&mut self, why: &str) {
        let lost = self.records.len() as u64;
        self.records.clear();
        self.shared.stats.lost.inc_by(lost);
        tracing::error!(records = lost, "audit records lost: {why}");
    }

    /// Writes the records held back by failed batches, a batch at a time,
    /// while the store takes them.
    async fn write_held_back(&mut self) {
        while !self.unwritten.is_empty() {
            let before = self.unwritten.len();
            self.commit().await;
            let healthy = self.shared.health.healthy.load(Ordering::Acquire);
            if !healthy || self.unwritten.len() >= before {
                return;
            }
        }
    }

    /// Keeps the records of a batch that did not land for the next one,
    /// flagged `written_late`, up to `queue_capacity` (the rest are lost,
    /// and counted as failed). The batch began with `late` records kept
    /// from before; all stay in the order they ended in.
    fn keep_unwritten(&mut self, late: usize) {
        let room = self
            .shared
            .settings
            .queue_capacity
            .saturating_sub(self.unwritten.len());
        let lost = self.records.len().saturating_sub(room);
        if lost > 0 {
            tracing::error!(
                records = lost,
                "audit records lost: too many could not be written"
            );
            self.shared.stats.lost.inc_by(lost as u64);
            self.records.truncate(room);
        }
        for record in &mut self.records {
            record.flags.insert(Flags::WRITTEN_LATE);
        }
        let late = late.min(self.records.len());
        let mut kept: Vec<AuditRecord> = self.records.drain(..late).collect();
        kept.append(&mut self.unwritten);
        kept.append(&mut self.records);
        self.unwritten = kept;
    }

    /// Answers every waiter of the batch: through its worker's delivery,
    /// one hand-off per worker, or directly.
    fn answer(&mut self, answer: impl Fn() -> Result<(), AuditError>) {
        let mut routed: Vec<(Route, Vec<Answer>)> = Vec::new();
        for (waiter, route) in self.waiters.drain(..) {
            let Some(route) = route else {
                let _ = waiter.send(answer());
                continue;
            };
            match routed.iter_mut().find(|(r, _)| r.same_channel(&route)) {
                Some((_, batch)) => batch.push((waiter, answer())),
                None => routed.push((route, vec![(waiter, answer())])),
            }
        }
        for (route, batch) in routed {
            if let Err(undelivered) = route.send(batch) {
                // The worker's delivery is gone: answer directly.
                for (waiter, answer) in undelivered.0 {
                    let _ = waiter.send(answer);
                }
            }
        }
    }

    /// After a failure: checks that the store takes writes again and picks
    /// up the chain head as stored (a commit whose answer was lost may have
    /// landed after all).
    async fn probe(&mut self) {
        let limit = self.shared.settings.store_call_limit;
        let probe = bounded(limit, self.store.audit_probe()).await;
        match probe {
            Ok(()) if self.reclaim().await => {
                self.probes_failed = 0;
                tracing::info!(chain = self.head.chain, "audit store writable again");
                self.shared.health.commit_ended(true);
                if !self.unwritten.is_empty() {
                    tracing::info!(
                        records = self.unwritten.len(),
                        "writing the audit records held back"
                    );
                    self.write_held_back().await;
                }
            }
            Ok(()) => {}
            Err(e) => {
                if self.probes_failed.is_multiple_of(PROBE_LOG_EVERY) {
                    tracing::warn!(
                        error = %e,
                        failed_probes = self.probes_failed + 1,
                        "audit store still not writable"
                    );
                }
                self.probes_failed += 1;
            }
        }
    }

    async fn reclaim(&mut self) -> bool {
        let key = self.key.as_ref();
        let limit = self.shared.settings.store_call_limit;
        let claimed = bounded(
            limit,
            self.store
                .audit_claim_chain(&|chain| head_seal(key, chain, 0, &GENESIS_MAC)),
        )
        .await;
        match claimed {
            Ok(head) => {
                self.head = head;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not re-read the audit chain head");
                false
            }
        }
    }
}

/// `call`, or [`StoreError::TimedOut`] once `limit` has passed. The call is
/// dropped; its pooled connection is checked (pinged) before the pool lends
/// it again, which on a silent connection holds that one slot until TCP
/// gives up, not the writer.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(StoreError::TimedOut(limit)))
}
