#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditKey, AuditRecord, BreakReason, Flags, GENESIS_MAC};
use airlock_core::{SessionId, TokenHash};
use airlock_store::{
    AuditQuery, ChainHead, GenesisSeal, Result, SessionRow, SqliteStore, Store, StoreError,
    StoredCredential,
};
use async_trait::async_trait;
use tokio::sync::Notify;

use super::*;

/// A SQLite store whose audit writes can be made to fail or to hang.
/// `inline`: it commits on the writer's thread, as SQLite does (its failed
/// commits surely wrote nothing); else like a networked store.
struct FaultyStore {
    inner: SqliteStore,
    fail: AtomicBool,
    hang: AtomicBool,
    release: Notify,
    inline: bool,
    /// The next this many reads of audit records each first prune one more
    /// record (of those `record` makes, one a batch): the steps of an
    /// `audit prune` landing in the middle of a verify.
    prune_before_reads: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl Store for FaultyStore {
    async fn audit_use_journal(&self) -> Result<bool> {
        self.inner.audit_use_journal().await
    }
    async fn insert_session(&self, s: &SessionRow) -> Result<()> {
        self.inner.insert_session(s).await
    }
    async fn session_by_token(&self, h: &TokenHash) -> Result<Option<SessionRow>> {
        self.inner.session_by_token(h).await
    }
    async fn session_by_id(&self, id: &SessionId) -> Result<Option<SessionRow>> {
        self.inner.session_by_id(id).await
    }
    async fn list_sessions(&self, all: bool, now: i64) -> Result<Vec<SessionRow>> {
        self.inner.list_sessions(all, now).await
    }
    async fn list_sessions_page(
        &self,
        page: &airlock_store::SessionPage,
    ) -> Result<Vec<SessionRow>> {
        self.inner.list_sessions_page(page).await
    }
    async fn revoke_session(&self, id: &SessionId, at: i64) -> Result<bool> {
        self.inner.revoke_session(id, at).await
    }
    async fn add_call_counts(&self, id: &SessionId, a: u64, d: u64) -> Result<()> {
        self.inner.add_call_counts(id, a, d).await
    }
    async fn setting(&self, key: &str) -> Result<Option<String>> {
        self.inner.setting(key).await
    }
    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        self.inner.set_setting_if_absent(key, value).await
    }
    async fn credential(&self, provider: &str) -> Result<Option<StoredCredential>> {
        self.inner.credential(provider).await
    }
    async fn set_credential(&self, provider: &str, sealed: &[u8], at: i64) -> Result<()> {
        self.inner.set_credential(provider, sealed, at).await
    }
    async fn remove_credential(&self, provider: &str) -> Result<bool> {
        self.inner.remove_credential(provider).await
    }
    async fn audit_claim_chain(&self, genesis: GenesisSeal<'_>) -> Result<ChainHead> {
        self.inner.audit_claim_chain(genesis).await
    }
    fn audit_appends_inline(&self) -> bool {
        self.inline
    }
    fn audit_append_blocking(
        &self,
        records: &[AuditRecord],
        head: &ChainHead,
    ) -> Option<Result<()>> {
        if !self.inline {
            return None;
        }
        Some(self.check().and_then(|()| {
            self.inner
                .audit_append_blocking(records, head)
                .unwrap_or(Ok(()))
        }))
    }
    async fn audit_append(&self, records: &[AuditRecord], head: &ChainHead) -> Result<()> {
        if self.hang.load(Ordering::SeqCst) {
            self.release.notified().await;
        }
        self.check()?;
        self.inner.audit_append(records, head).await
    }
    async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let left = self.prune_before_reads.load(Ordering::Acquire);
        if left > 0 {
            self.prune_before_reads.store(left - 1, Ordering::Release);
            let key = key();
            let seal = |chain, seq, mac: &airlock_core::audit::MacBytes| {
                airlock_core::audit::floor_seal(&key, chain, seq, mac)
            };
            // Records 1 to k end before 1_000 + k + 1 (see `record`).
            let floor = self.inner.audit_floors().await.unwrap();
            let next = floor.first().map_or(1, |f| f.seq + 1);
            let before = 1_000 + i64::try_from(next).unwrap() + 1;
            self.inner
                .audit_prune(before, &seal, 1, false)
                .await
                .unwrap();
        }
        self.inner.audit_records(q).await
    }
    async fn audit_heads(&self) -> Result<Vec<ChainHead>> {
        self.inner.audit_heads().await
    }
    async fn audit_probe(&self) -> Result<()> {
        self.check()?;
        self.inner.audit_probe().await
    }
    async fn audit_floors(&self) -> Result<Vec<airlock_store::ChainFloor>> {
        self.inner.audit_floors().await
    }
    async fn audit_headless_chains(&self) -> Result<Vec<(u32, u64)>> {
        self.inner.audit_headless_chains().await
    }
    async fn audit_prune(
        &self,
        before_ms: i64,
        seal: airlock_store::FloorSeal<'_>,
        now_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<airlock_store::Pruned>> {
        self.check()?;
        self.inner
            .audit_prune(before_ms, seal, now_ms, dry_run)
            .await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

impl FaultyStore {
    fn check(&self) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt {
                what: "test".into(),
                reason: "disk full".into(),
            });
        }
        Ok(())
    }
}

async fn store(dir: &tempfile::TempDir) -> Arc<FaultyStore> {
    faulty_store(dir, false).await
}

/// A store that commits on the writer's thread, as SQLite does.
async fn inline_store(dir: &tempfile::TempDir) -> Arc<FaultyStore> {
    faulty_store(dir, true).await
}

async fn faulty_store(dir: &tempfile::TempDir, inline: bool) -> Arc<FaultyStore> {
    let url = format!("sqlite://{}", dir.path().join("a.db").display());
    Arc::new(FaultyStore {
        inner: SqliteStore::open(&url).await.unwrap(),
        fail: AtomicBool::new(false),
        hang: AtomicBool::new(false),
        release: Notify::new(),
        inline,
        prune_before_reads: std::sync::atomic::AtomicU64::new(0),
    })
}

/// A store holding records 1 to `n`, each committed on its own (one batch
/// each), its writer shut down.
async fn store_with_records(dir: &tempfile::TempDir, n: u64) -> Arc<FaultyStore> {
    let store = store(dir).await;
    let (auditor, writer) = start(&store).await;
    for n in 1..=n {
        auditor.submit(record(n)).await.unwrap();
    }
    writer.shutdown().await;
    // A read moves the SQLite store's journal into the database file, which
    // some tests then edit behind the store's back.
    store.audit_heads().await.unwrap();
    store
}

/// Starts a writer on `store` with the test key and settings.
async fn start(store: &Arc<FaultyStore>) -> (Auditor, WriterHandle) {
    Auditor::start(store.clone(), Arc::new(key()), settings())
        .await
        .unwrap()
}

fn key() -> AuditKey {
    AuditKey::new(&[3; 32])
}

fn settings() -> AuditSettings {
    AuditSettings {
        fail_closed: true,
        max_batch: 256,
        queue_capacity: 4096,
        stall_timeout: Duration::from_millis(200),
        probe_interval: Duration::from_millis(20),
        store_call_limit: Duration::from_millis(600),
    }
}

fn record(n: u64) -> Box<AuditRecord> {
    Box::new(AuditRecord {
        chain: 0,
        seq: 0,
        ts_ms: 1_000 + n as i64,
        session: None,
        provider: Some("openai".into()),
        method: "GET".into(),
        path: format!("/openai/v1/models/{n}"),
        decision: "allow".into(),
        status: 200,
        upstream_status: Some(200),
        duration_us: n,
        bytes_in: 0,
        bytes_out: n,
        flags: Flags::empty(),
        prev_mac: GENESIS_MAC,
        mac: GENESIS_MAC,
    })
}

/// Polls `cond` until it holds or two seconds pass.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_are_group_committed_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    let commits: Vec<_> = (1..=500).map(|n| auditor.submit(record(n))).collect();
    for commit in futures_join(commits).await {
        commit.unwrap();
    }
    let stats = auditor.stats().unwrap();
    assert_eq!(stats.written.get(), 500);
    let batches = stats.batches.get();
    assert!(batches < 500, "expected batching, got {batches} batches");
    writer.shutdown().await;

    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!(verified.first_break, None);
    assert_eq!(verified.records, 500);
    let heads = store.audit_heads().await.unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].seq, 500);
}

async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}

/// The steps of a prune that land while verify reads (after it read the
/// floors) move the chain's start from under it, again and again: the
/// chain is checked again from its new floor each time, not reported
/// broken (review, round 34: a monitoring job's verify raised false alarms
/// during prunes of many steps).
#[tokio::test]
async fn a_prune_during_verify_is_no_break() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_records(&dir, 10).await;
    store.prune_before_reads.store(6, Ordering::Release);

    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!(verified.first_break, None, "{verified:?}");
    assert_eq!((verified.records, verified.pruned), (4, vec![(1, 7)]));
}

#[tokio::test]
async fn the_chain_resumes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    for round in 0..2u64 {
        let (auditor, writer) = start(&store).await;
        for n in 0..3 {
            auditor.submit(record(round * 10 + n)).await.unwrap();
        }
        writer.shutdown().await;
    }
    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!(
        (verified.records, verified.chains, verified.first_break),
        (6, 1, None)
    );
}

#[tokio::test]
async fn shutdown_writes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    // Queued but never awaited.
    let pending: Vec<_> = (0..50).map(|n| auditor.submit(record(n))).collect();
    writer.shutdown().await;
    drop(pending);
    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!((verified.records, verified.first_break), (50, None));
}

#[tokio::test]
async fn failed_writes_close_the_gate_until_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = inline_store(&dir).await;
    let (auditor, writer) = start(&store).await;
    auditor.submit(record(1)).await.unwrap();
    assert!(auditor.admits_calls());

    store.fail.store(true, Ordering::SeqCst);
    let err = auditor.submit(record(2)).await.unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err:?}");
    assert!(!auditor.admits_calls());

    store.fail.store(false, Ordering::SeqCst);
    assert!(
        eventually(|| auditor.admits_calls()).await,
        "gate did not reopen"
    );
    auditor.submit(record(3)).await.unwrap();
    writer.shutdown().await;
    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    // The record whose commit failed is written once the store recovers,
    // flagged: its caller was told the write failed (and, failing closed,
    // refused the call), but the provider may have seen it.
    assert_eq!((verified.records, verified.first_break), (3, None));
    let stored = store
        .audit_records(&AuditQuery {
            chain: Some(1),
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let paths: Vec<(&str, bool)> = stored
        .iter()
        .map(|r| (r.path.as_ref(), r.flags.contains(Flags::WRITTEN_LATE)))
        .collect();
    assert_eq!(
        paths,
        [
            ("/openai/v1/models/1", false),
            ("/openai/v1/models/2", true),
            ("/openai/v1/models/3", false),
        ]
    );
}

/// A writer with `settings` on an inline store whose commits fail while
/// five records are submitted; the store takes writes again afterwards.
async fn five_records_while_failing(
    settings: AuditSettings,
) -> (tempfile::TempDir, Arc<FaultyStore>, Auditor, WriterHandle) {
    let dir = tempfile::tempdir().unwrap();
    let store = inline_store(&dir).await;
    let (auditor, writer) = Auditor::start(store.clone(), Arc::new(key()), settings)
        .await
        .unwrap();
    store.fail.store(true, Ordering::SeqCst);
    for n in 0..5 {
        let _ = auditor.submit(record(n)).await;
    }
    store.fail.store(false, Ordering::SeqCst);
    (dir, store, auditor, writer)
}

/// Records of failed batches are held back only up to `queue_capacity`.
#[tokio::test]
async fn records_held_back_are_bounded() {
    let mut settings = settings();
    settings.queue_capacity = 3;
    let (_dir, store, auditor, writer) = five_records_while_failing(settings).await;
    assert!(
        eventually(|| auditor.admits_calls()).await,
        "gate did not reopen"
    );
    writer.shutdown().await;
    let stored = store
        .audit_records(&AuditQuery {
            chain: Some(1),
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let paths: Vec<&str> = stored.iter().map(|r| r.path.as_ref()).collect();
    assert_eq!(
        paths,
        [
            "/openai/v1/models/0",
            "/openai/v1/models/1",
            "/openai/v1/models/2"
        ]
    );
    assert!(stored.iter().all(|r| r.flags.contains(Flags::WRITTEN_LATE)));
}

/// Makes the store's commits hang; the first record's caller is timed out
/// (`Stalled`) and the gate closes.
async fn stall(store: &FaultyStore, auditor: &Auditor) {
    store.hang.store(true, Ordering::SeqCst);
    let err = auditor.submit(record(1)).await.unwrap_err();
    assert!(matches!(err, AuditError::Stalled), "{err:?}");
    assert!(
        eventually(|| !auditor.admits_calls()).await,
        "gate stayed open"
    );
}

#[tokio::test]
async fn a_stuck_writer_closes_the_gate_and_times_callers_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    stall(&store, &auditor).await;
    store.hang.store(false, Ordering::SeqCst);
    store.release.notify_waiters();
    assert!(
        eventually(|| auditor.admits_calls()).await,
        "gate did not reopen"
    );
    writer.shutdown().await;
}

/// A commit that never answers (a connection left silent by a failover) is
/// given up on after `store_call_limit`: the writer recovers without it.
#[tokio::test]
async fn a_commit_that_never_answers_is_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    stall(&store, &auditor).await;
    // The hung commit is never released: only its limit frees the writer.
    store.hang.store(false, Ordering::SeqCst);
    assert!(
        eventually(|| auditor.admits_calls()).await,
        "the writer stayed stuck on its hung commit"
    );
    auditor.submit(record(2)).await.unwrap();
    writer.shutdown().await;
}

#[tokio::test]
async fn a_workers_callers_are_timed_out_by_its_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    let (worker, delivery) = auditor.for_worker();
    let delivery = tokio::spawn(delivery.unwrap().run());
    store.hang.store(true, Ordering::SeqCst);
    let began = Instant::now();
    let err = worker.submit(record(1)).await.unwrap_err();
    assert!(matches!(err, AuditError::Stalled), "{err:?}");
    // Not before its time, and within a tick or two of it.
    let waited = began.elapsed();
    let limit = settings().stall_timeout;
    assert!(waited >= limit, "timed out after {waited:?}");
    assert!(waited < limit * 5, "timed out only after {waited:?}");
    store.hang.store(false, Ordering::SeqCst);
    store.release.notify_waiters();
    drop(worker);
    writer.shutdown().await;
    delivery.await.unwrap();
}

#[tokio::test]
async fn without_its_delivery_a_workers_callers_still_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    let (worker, delivery) = auditor.for_worker();
    store.hang.store(true, Ordering::SeqCst);
    // One call waits while the delivery is there, one starts after it is gone.
    let waiting = tokio::spawn(worker.submit(record(1)));
    tokio::task::yield_now().await;
    drop(delivery);
    let began = Instant::now();
    let late = worker.submit(record(2)).await.unwrap_err();
    assert!(matches!(late, AuditError::Stalled), "{late:?}");
    let early = waiting.await.unwrap().unwrap_err();
    assert!(matches!(early, AuditError::Stalled), "{early:?}");
    let limit = settings().stall_timeout;
    assert!(
        began.elapsed() < limit * 5,
        "timed out only after {:?}",
        began.elapsed()
    );
    store.hang.store(false, Ordering::SeqCst);
    store.release.notify_waiters();
    drop(worker);
    writer.shutdown().await;
}

#[tokio::test]
async fn fail_open_does_not_hold_calls_or_close_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let mut settings = settings();
    settings.fail_closed = false;
    let (auditor, writer) = Auditor::start(store.clone(), Arc::new(key()), settings)
        .await
        .unwrap();
    store.fail.store(true, Ordering::SeqCst);
    assert!(auditor.submit(record(1)).await.is_err());
    assert!(auditor.admits_calls());
    // Once the writer is known to fail, calls are not held at all.
    auditor.submit(record(2)).await.unwrap();
    writer.shutdown().await;
}

#[tokio::test]
async fn disabled_auditor_admits_and_records_nothing() {
    let auditor = Auditor::disabled();
    assert!(auditor.admits_calls() && !auditor.is_enabled());
    auditor.submit(record(1)).await.unwrap();
}

#[tokio::test]
async fn tampering_in_the_store_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_records(&dir, 10).await;
    let path = dir.path().join("a.db");
    airlock_store::testing::rewrite_sqlite_chain(&path, 1, |records| {
        records[3].status = 500;
    })
    .await
    .unwrap();
    let v = verify_store(store.as_ref(), &key()).await.unwrap();
    let b = v.first_break.unwrap();
    assert_eq!((b.seq, b.reason), (4, BreakReason::BadMac));
    assert_eq!(v.records, 3);
}

#[tokio::test]
async fn a_workers_callers_are_answered_through_its_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    let (worker, delivery) = auditor.for_worker();
    let delivery = delivery.expect("an enabled auditor has a delivery");
    let mut commits: Vec<_> = (1..=20)
        .map(|n| Box::pin(worker.submit(record(n))))
        .collect();
    // Committed, but the answers wait for the worker's delivery to run.
    let stats = auditor.stats().unwrap();
    assert!(eventually(|| stats.written.get() == 20).await);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for commit in &mut commits {
        assert!(
            commit.as_mut().poll(&mut cx).is_pending(),
            "answered without the delivery"
        );
    }
    let running = tokio::spawn(delivery.run());
    for commit in commits {
        commit.await.unwrap();
    }
    // The delivery ends with the last auditor that routes to it.
    drop(worker);
    writer.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the delivery outlived its auditor")
        .unwrap();
}

#[tokio::test]
async fn without_its_delivery_a_worker_is_answered_directly() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    let (worker, delivery) = auditor.for_worker();
    drop(delivery);
    for n in 1..=5 {
        worker.submit(record(n)).await.unwrap();
    }
    assert!(Auditor::disabled().for_worker().1.is_none());
    writer.shutdown().await;
}

/// Held-back records are all written once the store recovers, a batch at
/// a time, without waiting for new calls.
#[tokio::test]
async fn held_back_records_are_all_written_on_recovery() {
    let mut settings = settings();
    settings.max_batch = 2;
    let (_dir, store, auditor, writer) = five_records_while_failing(settings).await;
    let stats = auditor.stats().unwrap();
    assert!(
        eventually(|| stats.written.get() == 5).await,
        "written: {}",
        stats.written.get()
    );
    writer.shutdown().await;
    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!((verified.records, verified.first_break), (5, None));
    assert_eq!(stats.lost.get(), 0);
}

/// A networked store's failure may come after its commit landed (a lost
/// answer): that batch is not sent again (it could be there twice); it is
/// counted as lost.
#[tokio::test]
async fn a_networked_store_s_failed_batch_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let (auditor, writer) = start(&store).await;
    store.fail.store(true, Ordering::SeqCst);
    assert!(auditor.submit(record(1)).await.is_err());
    store.fail.store(false, Ordering::SeqCst);
    assert!(
        eventually(|| auditor.admits_calls()).await,
        "gate did not reopen"
    );
    auditor.submit(record(2)).await.unwrap();
    writer.shutdown().await;
    let verified = verify_store(store.as_ref(), &key()).await.unwrap();
    assert_eq!((verified.records, verified.first_break), (1, None));
    assert_eq!(auditor.stats().unwrap().lost.get(), 1);
}

/// A writer of `store` (not running) and its queue's two ends, as
/// `Auditor::start` makes them on a machine with several CPUs.
async fn idle_writer(
    store: &Arc<FaultyStore>,
) -> (writer::Writer, mpsc::Sender<Msg>, mpsc::Receiver<Msg>) {
    idle_writer_on(store, true).await
}

async fn idle_writer_on(
    store: &Arc<FaultyStore>,
    several_cpus: bool,
) -> (writer::Writer, mpsc::Sender<Msg>, mpsc::Receiver<Msg>) {
    let key = key();
    let head = store
        .audit_claim_chain(&|chain| head_seal(&key, chain, 0, &GENESIS_MAC))
        .await
        .unwrap();
    let (shared, rx) = Shared::new(settings());
    let tx = shared.tx.clone();
    let inline = store.audit_appends_inline();
    let writer = writer::Writer::new(
        store.clone(),
        Arc::new(key),
        head,
        shared,
        inline,
        several_cpus,
    );
    (writer, tx, rx)
}

fn queued_record(n: u64) -> Msg {
    Msg::Record(*record(n), oneshot::channel().0, None)
}

/// At light load the writer on a thread of its own takes the next record
/// from its queue while watching it (no wake-up needed); after a larger
/// batch, or sharing a runtime (a networked store), it does not watch and
/// leaves the record to the queue's `recv`.
#[tokio::test]
async fn the_writer_watches_its_queue_only_after_a_small_batch_on_its_own_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (mut watching, tx, mut rx) = idle_writer(&inline_store(&dir).await).await;
    watching.watch_pays = true;
    for small in 0..=writer::WATCH_AFTER_BATCH {
        watching.last_batch = small;
        tx.try_send(queued_record(1)).unwrap();
        assert!(watching.watch_queue(&mut rx).is_some(), "after {small}");
    }
    watching.last_batch = writer::WATCH_AFTER_BATCH + 1;
    tx.try_send(queued_record(2)).unwrap();
    assert!(watching.watch_queue(&mut rx).is_none());
    assert!(rx.try_recv().is_ok(), "the record stays queued");

    let dir = tempfile::tempdir().unwrap();
    let (mut shared_runtime, tx, mut rx) = idle_writer(&store(&dir).await).await;
    shared_runtime.watch_pays = true;
    tx.try_send(queued_record(3)).unwrap();
    assert!(shared_runtime.watch_queue(&mut rx).is_none());
    assert!(rx.try_recv().is_ok(), "the record stays queued");

    // One CPU: the proxy workers need the one the writer would watch on.
    let dir = tempfile::tempdir().unwrap();
    let (mut one_cpu, tx, mut rx) = idle_writer_on(&inline_store(&dir).await, false).await;
    one_cpu.watch_pays = true;
    tx.try_send(queued_record(4)).unwrap();
    assert!(one_cpu.watch_queue(&mut rx).is_none());
    assert!(rx.try_recv().is_ok(), "the record stays queued");
}

/// An empty queue is watched for IDLE_WATCH, then left to `recv` (the
/// writer sleeps); after a watch that caught nothing the writer does not
/// watch again until a record comes within IDLE_WATCH of a commit's end
/// (calls spaced out by a slow provider cost no watching).
#[tokio::test]
async fn a_watch_that_catches_nothing_stops_the_watching_until_records_come_close() {
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, tx, mut rx) = idle_writer(&inline_store(&dir).await).await;
    writer.watch_pays = true;
    let began = std::time::Instant::now();
    assert!(writer.watch_queue(&mut rx).is_none());
    assert!(began.elapsed() >= writer::IDLE_WATCH);
    assert!(!writer.watch_pays);
    tx.try_send(queued_record(1)).unwrap();
    assert!(writer.watch_queue(&mut rx).is_none(), "not watched");
    assert!(rx.try_recv().is_ok(), "the record stays queued");

    writer.woke(4 * writer::IDLE_WATCH);
    assert!(!writer.watch_pays, "a record long after the commit");
    writer.woke(writer::IDLE_WATCH / 2);
    assert!(writer.watch_pays, "a record soon after the commit");
    tx.try_send(queued_record(2)).unwrap();
    assert!(writer.watch_queue(&mut rx).is_some());
}
