use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::Limits;

use airlock_store::{Change, SessionRow, Store};
use tokio::sync::broadcast;

use super::*;
use crate::Admission;

async fn registry() -> (tempfile::TempDir, Arc<Registry>) {
    let dir = tempfile::tempdir().unwrap();
    let store = airlock_store::open(&format!("sqlite://{}/r.db", dir.path().display()))
        .await
        .unwrap();
    (dir, Arc::new(Registry::new(store)))
}

fn new_session(limits: Limits, ttl: Duration) -> NewSession {
    NewSession {
        scope: serde_json::from_str(
            r#"[{"provider":"openai","methods":["POST"],"paths":["/v1/chat/completions"]}]"#,
        )
        .unwrap(),
        limits,
        labels: BTreeMap::new(),
        ttl,
    }
}

#[tokio::test]
async fn authenticates_known_tokens_and_refuses_others() {
    let (_dir, reg) = registry().await;
    let (live, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let now = crate::now_ms();
    let got = reg.authenticate(Some(token.expose()), now).await.unwrap();
    assert_eq!(got.id(), live.id());
    assert_eq!(
        reg.authenticate(None, now).await.unwrap_err(),
        AuthError::Missing
    );
    assert_eq!(
        reg.authenticate(Some("sk-real"), now).await.unwrap_err(),
        AuthError::Unknown
    );
    let other = airlock_core::token::generate_token();
    assert_eq!(
        reg.authenticate(Some(other.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Unknown
    );
    // Expiry is decided by the clock passed in.
    assert_eq!(
        reg.authenticate(Some(token.expose()), live.expires_at())
            .await
            .unwrap_err(),
        AuthError::Expired
    );
}

#[tokio::test]
async fn a_fresh_registry_finds_sessions_in_the_store() {
    let (_dir, reg) = registry().await;
    let (live, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let other = Registry::new(Arc::clone(reg.store()));
    assert!(other.cached(live.id()).is_none());
    let found = other
        .authenticate(Some(token.expose()), crate::now_ms())
        .await
        .unwrap();
    assert_eq!(found.id(), live.id());
    assert!(other.cached(live.id()).is_some());
}

#[tokio::test]
async fn revocation_is_immediate_and_persisted() {
    let (_dir, reg) = registry().await;
    let (live, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(reg.revoke(live.id()).await.unwrap());
    let now = crate::now_ms();
    assert_eq!(
        reg.authenticate(Some(token.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Revoked
    );
    let other = Registry::new(Arc::clone(reg.store()));
    assert_eq!(
        other
            .authenticate(Some(token.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Revoked
    );
    assert!(!reg.revoke(&SessionId::generate()).await.unwrap());
}

#[tokio::test]
async fn max_requests_and_rate_limits() {
    let (_dir, reg) = registry().await;
    let limits = Limits {
        max_requests: Some(3),
        ..Limits::default()
    };
    let (live, _) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    // Spent from leases reserved in the store, as the request path does.
    for _ in 0..3 {
        assert_eq!(reg.admit(&live).await.unwrap(), Admission::Admitted);
    }
    assert_eq!(reg.admit(&live).await.unwrap(), Admission::QuotaExhausted);
    assert_eq!(live.allowed(), 3);

    let limits = Limits {
        requests_per_minute: Some(2),
        ..Limits::default()
    };
    let (live, _) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(live.admit(), Admission::Admitted);
    assert_eq!(live.admit(), Admission::Admitted);
    let Admission::RateLimited { retry_after } = live.admit() else {
        panic!("the third call in a minute is over requests_per_minute = 2");
    };
    // One call's worth of the minute: 30 s, less what has passed since.
    assert!(retry_after > Duration::from_secs(25), "{retry_after:?}");
    assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}");
    assert_eq!(live.allowed(), 2);
}

#[tokio::test]
async fn max_denied_triggers_once() {
    let (_dir, reg) = registry().await;
    let limits = Limits {
        max_denied: Some(2),
        ..Limits::default()
    };
    let (live, _) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(!live.count_denied());
    assert!(live.count_denied());
    assert!(!live.count_denied());
}

#[tokio::test]
async fn counters_flush_to_the_store() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    live.admit();
    live.admit();
    live.count_denied();
    reg.flush().await;
    reg.flush().await;
    let row = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert_eq!((row.allowed, row.denied), (2, 1));
}

/// A flush woken by denials writes the sessions with denials to write and
/// nothing else (an agent's denials must not multiply the store's writes).
#[tokio::test]
async fn a_flush_woken_by_denials_writes_only_denials() {
    let (_dir, reg) = registry().await;
    let new = || new_session(Limits::default(), Duration::from_secs(60));
    let (calls, _) = reg.create(new()).await.unwrap();
    let (denials, _) = reg.create(new()).await.unwrap();
    calls.admit();
    denials.admit();
    denials.count_denied();
    reg.flush_inner(FlushKind::Denials).await;
    let stored = |id: SessionId| {
        let store = Arc::clone(reg.store());
        async move {
            let row = store.session_by_id(&id).await.unwrap().unwrap();
            (row.allowed, row.denied)
        }
    };
    assert_eq!(stored(calls.id().clone()).await, (0, 0));
    assert_eq!(stored(denials.id().clone()).await, (1, 1));
    reg.flush().await;
    assert_eq!(stored(calls.id().clone()).await, (1, 0));
}

/// A store that counts token lookups, to prove the request path does not
/// touch the database for a cached token; with a `feed`, it has a change
/// feed the test drives, and re-checks fail while `unreachable`. With a
/// `gate`, each token lookup, once it has read its row, says so and waits
/// for a permit before answering.
struct CountingStore {
    inner: Arc<dyn Store>,
    token_lookups: std::sync::atomic::AtomicUsize,
    feed: Option<broadcast::Sender<Change>>,
    unreachable: std::sync::atomic::AtomicBool,
    /// Revocations fail while set (the store cannot be written).
    read_only: std::sync::atomic::AtomicBool,
    /// This many more revocations fail (the store recovering).
    refused_revocations: std::sync::atomic::AtomicUsize,
    gate: Option<LookupGate>,
    /// Holds `max_requests` reservations (lease refills) the same way.
    reserve_gate: Option<LookupGate>,
    /// How many reservations were asked for.
    reserves: std::sync::atomic::AtomicUsize,
    /// The sessions whose statuses were asked for, in order.
    status_reads: std::sync::Mutex<Vec<SessionId>>,
}

/// Holds token lookups between their read and their answer.
struct LookupGate {
    read: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    /// Lookups released while set fail (the store out of reach).
    fail: std::sync::atomic::AtomicBool,
}

impl LookupGate {
    fn new() -> Self {
        Self {
            read: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
            fail: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl CountingStore {
    /// Counts and passes everything through to `inner`.
    fn plain(inner: &Arc<dyn Store>, feed: Option<broadcast::Sender<Change>>) -> Self {
        Self {
            inner: Arc::clone(inner),
            token_lookups: Default::default(),
            feed,
            unreachable: Default::default(),
            read_only: Default::default(),
            refused_revocations: Default::default(),
            gate: None,
            reserve_gate: None,
            reserves: Default::default(),
            status_reads: Default::default(),
        }
    }

    fn over(inner: &Arc<dyn Store>, feed: Option<broadcast::Sender<Change>>) -> Arc<Self> {
        Arc::new(Self::plain(inner, feed))
    }

    /// Holds every token lookup until the test releases it.
    fn gated(inner: &Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            gate: Some(LookupGate::new()),
            ..Self::plain(inner, None)
        })
    }

    /// Holds every `max_requests` reservation until the test releases it.
    fn reserve_gated(inner: &Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            reserve_gate: Some(LookupGate::new()),
            ..Self::plain(inner, None)
        })
    }
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn insert_session(&self, s: &SessionRow) -> airlock_store::Result<()> {
        self.inner.insert_session(s).await
    }
    async fn session_by_token(&self, h: &TokenHash) -> airlock_store::Result<Option<SessionRow>> {
        self.token_lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let row = self.inner.session_by_token(h).await;
        if let Some(gate) = &self.gate {
            gate.read.notify_one();
            gate.release.acquire().await.unwrap().forget();
            if gate.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(airlock_store::StoreError::Corrupt {
                    what: "test".to_owned(),
                    reason: "unreachable".to_owned(),
                });
            }
        }
        row
    }
    async fn session_by_id(&self, id: &SessionId) -> airlock_store::Result<Option<SessionRow>> {
        self.inner.session_by_id(id).await
    }
    async fn list_sessions(&self, all: bool, now: i64) -> airlock_store::Result<Vec<SessionRow>> {
        self.inner.list_sessions(all, now).await
    }
    async fn list_sessions_page(
        &self,
        page: &airlock_store::SessionPage,
    ) -> airlock_store::Result<Vec<SessionRow>> {
        self.inner.list_sessions_page(page).await
    }
    async fn revoke_session(&self, id: &SessionId, at: i64) -> airlock_store::Result<bool> {
        let refused = self
            .refused_revocations
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if refused || self.read_only.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(airlock_store::StoreError::Corrupt {
                what: "test".to_owned(),
                reason: "disk full".to_owned(),
            });
        }
        self.inner.revoke_session(id, at).await
    }
    async fn add_call_counts(&self, id: &SessionId, a: u64, d: u64) -> airlock_store::Result<()> {
        self.inner.add_call_counts(id, a, d).await
    }
    async fn setting(&self, key: &str) -> airlock_store::Result<Option<String>> {
        self.inner.setting(key).await
    }
    async fn set_setting_if_absent(&self, key: &str, value: &str) -> airlock_store::Result<String> {
        self.inner.set_setting_if_absent(key, value).await
    }
    async fn credential(
        &self,
        provider: &str,
    ) -> airlock_store::Result<Option<airlock_store::StoredCredential>> {
        self.inner.credential(provider).await
    }
    async fn set_credential(
        &self,
        provider: &str,
        sealed: &[u8],
        at: i64,
    ) -> airlock_store::Result<()> {
        self.inner.set_credential(provider, sealed, at).await
    }
    async fn remove_credential(&self, provider: &str) -> airlock_store::Result<bool> {
        self.inner.remove_credential(provider).await
    }
    async fn audit_claim_chain(
        &self,
        genesis: airlock_store::GenesisSeal<'_>,
    ) -> airlock_store::Result<airlock_store::ChainHead> {
        self.inner.audit_claim_chain(genesis).await
    }
    async fn audit_append(
        &self,
        records: &[airlock_core::audit::AuditRecord],
        head: &airlock_store::ChainHead,
    ) -> airlock_store::Result<()> {
        self.inner.audit_append(records, head).await
    }
    async fn audit_records(
        &self,
        query: &airlock_store::AuditQuery,
    ) -> airlock_store::Result<Vec<airlock_core::audit::AuditRecord>> {
        self.inner.audit_records(query).await
    }
    async fn audit_heads(&self) -> airlock_store::Result<Vec<airlock_store::ChainHead>> {
        self.inner.audit_heads().await
    }
    async fn audit_probe(&self) -> airlock_store::Result<()> {
        self.inner.audit_probe().await
    }
    async fn audit_floors(&self) -> airlock_store::Result<Vec<airlock_store::ChainFloor>> {
        self.inner.audit_floors().await
    }
    async fn audit_headless_chains(&self) -> airlock_store::Result<Vec<(u32, u64)>> {
        self.inner.audit_headless_chains().await
    }
    async fn audit_prune(
        &self,
        before_ms: i64,
        seal: airlock_store::FloorSeal<'_>,
        now_ms: i64,
        dry_run: bool,
    ) -> airlock_store::Result<Vec<airlock_store::Pruned>> {
        self.inner
            .audit_prune(before_ms, seal, now_ms, dry_run)
            .await
    }
    async fn close(&self) {
        self.inner.close().await;
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    fn leases_requests(&self) -> bool {
        self.inner.leases_requests()
    }
    async fn reserve_requests(&self, id: &SessionId, want: u64) -> airlock_store::Result<u64> {
        self.reserves
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(gate) = &self.reserve_gate {
            gate.read.notify_one();
            gate.release.acquire().await.unwrap().forget();
        }
        self.inner.reserve_requests(id, want).await
    }
    async fn release_requests(&self, id: &SessionId, count: u64) -> airlock_store::Result<()> {
        self.inner.release_requests(id, count).await
    }
    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.feed.as_ref().map(broadcast::Sender::subscribe)
    }
    async fn session_statuses(
        &self,
        ids: &[SessionId],
    ) -> airlock_store::Result<Vec<airlock_store::SessionStatus>> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(airlock_store::StoreError::Corrupt {
                what: "test".to_owned(),
                reason: "unreachable".to_owned(),
            });
        }
        self.status_reads
            .lock()
            .unwrap()
            .extend(ids.iter().cloned());
        self.inner.session_statuses(ids).await
    }
}

/// A revocation the store cannot take stays in force in this process (also
/// for a session it first loads afterwards), and each flush writes it again until the store has it.
#[tokio::test]
async fn a_revocation_the_store_refuses_holds_here_and_is_written_later() {
    let (_dir, reg) = registry().await;
    let (live, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let store = CountingStore::over(reg.store(), None);
    // A registry that has not loaded the session yet.
    let other = Registry::new(store.clone());
    store
        .read_only
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = other.revoke(live.id()).await.unwrap_err();
    assert!(matches!(err, RegistryError::RevocationPending(_)), "{err}");
    assert!(err.to_string().contains("keeps writing it"), "{err}");
    assert_eq!(other.unpersisted_revocations(), 1);
    let now = crate::now_ms();
    assert_eq!(
        other
            .authenticate(Some(token.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Revoked,
        "the row read from the store says active; the pending revocation wins"
    );
    other.flush().await;
    assert_eq!(
        other.unpersisted_revocations(),
        1,
        "the store still refuses"
    );
    let stored = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert!(stored.revoked_at.is_none());

    store
        .read_only
        .store(false, std::sync::atomic::Ordering::SeqCst);
    other.flush().await;
    assert_eq!(other.unpersisted_revocations(), 0);
    let stored = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert!(stored.revoked_at.is_some());
    let fresh = Registry::new(Arc::clone(reg.store()));
    assert_eq!(
        fresh
            .authenticate(Some(token.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Revoked
    );
}

/// At shutdown a revocation the store has not taken yet is tried a few more
/// times before the process goes (it lives only in this process).
#[tokio::test]
async fn shutdown_gives_a_pending_revocation_more_chances() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let store = CountingStore::over(reg.store(), None);
    let other = Arc::new(Registry::new(store.clone()));
    // Refused when made, at the final flush and at the first retry.
    store
        .refused_revocations
        .store(3, std::sync::atomic::Ordering::SeqCst);
    assert!(other.revoke(live.id()).await.is_err());
    Arc::clone(&other)
        .run_flusher(Duration::from_secs(3600), std::future::ready(()))
        .await;
    assert_eq!(other.unpersisted_revocations(), 0);
    let stored = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert!(stored.revoked_at.is_some());
}

/// Revoking a session that has expired leaves it expired, in memory and
/// in the store.
#[tokio::test]
async fn an_expired_session_stays_expired_when_revoked() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_millis(20)))
        .await
        .unwrap();
    // The session's own clock runs out (its expiry, not a synchronisation).
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(30)).await;
    assert_eq!(live.state(crate::now_ms()), SessionState::Expired);
    assert!(reg.revoke(live.id()).await.unwrap());
    assert_eq!(live.state(crate::now_ms()), SessionState::Expired);
    let row = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert_eq!(row.revoked_at, None);
}

/// A revocation written while a token's row is being read (by a process
/// that had not cached it) is not lost when that read row is cached.
#[tokio::test]
async fn a_revocation_during_a_token_lookup_is_not_lost() {
    revocation_during_a_lookup(false).await;
}

/// The same when the lookup that should confirm it fails: the row read is
/// not kept, and the next call asks the store again.
#[tokio::test]
async fn a_revocation_during_a_lookup_is_not_lost_when_the_recheck_fails() {
    revocation_during_a_lookup(true).await;
}

async fn revocation_during_a_lookup(recheck_fails: bool) {
    let (_dir, reg) = registry().await;
    let (live, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let gated = CountingStore::gated(reg.store());
    let fresh = Arc::new(Registry::new(Arc::clone(&gated) as Arc<dyn Store>));
    let gate = gated.gate.as_ref().unwrap();

    let looking = tokio::spawn({
        let fresh = Arc::clone(&fresh);
        let token = token.expose().to_owned();
        async move {
            fresh
                .authenticate(Some(&token), crate::now_ms())
                .await
                .err()
        }
    });
    // The lookup has read the row, still active; the revocation lands now.
    gate.read.notified().await;
    assert!(fresh.revoke(live.id()).await.unwrap());
    if recheck_fails {
        // The first read answers; the recheck reads and fails.
        gate.release.add_permits(1);
        gate.read.notified().await;
        gate.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        gate.release.add_permits(1);
    } else {
        gate.release.add_permits(16);
    }
    // That call ran alongside the revocation: either answer is right.
    let _ = looking.await.unwrap();
    gate.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    gate.release.add_permits(16);
    assert_eq!(
        fresh
            .authenticate(Some(token.expose()), crate::now_ms())
            .await
            .err(),
        Some(AuthError::Revoked)
    );
}

/// A session with `max_requests` (its token), and a registry that has not
/// seen it yet over a store whose reservations wait for the test's gate.
async fn leasing_through_a_gate() -> (tempfile::TempDir, Arc<CountingStore>, Arc<Registry>, Secret)
{
    let (dir, reg) = registry().await;
    let limits = Limits {
        max_requests: Some(10),
        ..Limits::default()
    };
    let (_, token) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    let gated = CountingStore::reserve_gated(reg.store());
    let fresh = Arc::new(Registry::new(Arc::clone(&gated) as Arc<dyn Store>));
    (dir, gated, fresh, token)
}

/// A call that waited for its session's `max_requests` lease (a store
/// round trip) reads the session's state again: revoked meanwhile, it is
/// refused and spends nothing (round 26: such calls went upstream after
/// the revocation).
#[tokio::test]
async fn a_call_that_waited_for_its_lease_is_refused_when_revoked_meanwhile() {
    let (_dir, gated, fresh, token) = leasing_through_a_gate().await;
    let gate = gated.reserve_gate.as_ref().unwrap();
    let live = fresh
        .authenticate(Some(token.expose()), crate::now_ms())
        .await
        .unwrap();

    let admitting = tokio::spawn({
        let fresh = Arc::clone(&fresh);
        let live = Arc::clone(&live);
        async move { fresh.admit(&live).await }
    });
    // The call waits for the store's grant; the revocation lands now.
    gate.read.notified().await;
    assert!(fresh.revoke(live.id()).await.unwrap());
    gate.release.add_permits(1);
    assert_eq!(admitting.await.unwrap(), Err(AuthError::Revoked));
    assert_eq!(live.allowed(), 0);
}

/// `authenticate` never waits for a lease: a call refused for its path or
/// scope costs the store nothing; the lease is refilled by `admit`.
#[tokio::test]
async fn authenticating_leaves_the_lease_to_admit() {
    let (_dir, gated, fresh, token) = leasing_through_a_gate().await;
    let gate = gated.reserve_gate.as_ref().unwrap();
    gate.release.add_permits(16);
    let reserves = || gated.reserves.load(std::sync::atomic::Ordering::SeqCst);

    let live = fresh
        .authenticate(Some(token.expose()), crate::now_ms())
        .await
        .unwrap();
    assert_eq!(reserves(), 0);
    assert_eq!(fresh.admit(&live).await.unwrap(), Admission::Admitted);
    assert_eq!(reserves(), 1);
    assert_eq!(live.allowed(), 1);
}

/// The periodic re-check asks the store only about sessions that have not
/// ended: an expired one stays cached a while to answer its token, but
/// nothing the store says can bring it back (a soak run saw idle replicas
/// re-reading thousands of expired sessions every second).
#[tokio::test]
async fn the_recheck_skips_ended_sessions() {
    let (_dir, reg) = registry().await;
    let (short, short_token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(10)))
        .await
        .unwrap();
    let (long, long_token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let store = CountingStore::over(reg.store(), None);
    let fresh = Registry::new(Arc::clone(&store) as Arc<dyn Store>);
    let now = crate::now_ms();
    for token in [&short_token, &long_token] {
        fresh.authenticate(Some(token.expose()), now).await.unwrap();
    }
    fresh.recheck_at(now).await.unwrap();
    let mut read = std::mem::take(&mut *store.status_reads.lock().unwrap());
    read.sort();
    let mut both = vec![short.id().clone(), long.id().clone()];
    both.sort();
    assert_eq!(read, both);
    // Twenty seconds on, the short one has expired: only the other is read.
    fresh.recheck_at(now + 20_000).await.unwrap();
    assert_eq!(*store.status_reads.lock().unwrap(), vec![long.id().clone()]);
}

#[tokio::test]
async fn known_tokens_never_touch_the_store() {
    let (_dir, reg) = registry().await;
    let (_, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let counting = CountingStore::over(reg.store(), None);
    let lookups = || {
        counting
            .token_lookups
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let fresh = Registry::new(Arc::clone(&counting) as Arc<dyn Store>);
    let now = crate::now_ms();
    fresh.authenticate(Some(token.expose()), now).await.unwrap();
    assert_eq!(lookups(), 1, "first use of a token is looked up once");
    for _ in 0..100 {
        fresh.authenticate(Some(token.expose()), now).await.unwrap();
    }
    assert_eq!(lookups(), 1, "a cached token never touches the store");
    // Unknown tokens are never cached (a session created elsewhere must work at once)...
    let unknown = airlock_core::token::generate_token();
    for _ in 0..2 {
        assert!(fresh
            .authenticate(Some(unknown.expose()), now)
            .await
            .is_err());
    }
    assert_eq!(lookups(), 3);
    // ...but malformed ones are refused before any lookup.
    assert!(fresh.authenticate(Some("sess_short"), now).await.is_err());
    assert!(fresh.authenticate(Some("sk-real-key"), now).await.is_err());
    assert_eq!(lookups(), 3);
}

/// Polls `f` every 10 ms until it is true; panics after `limit`.
async fn eventually(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        if f().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn without_a_change_feed_there_is_nothing_to_sync() {
    let (_dir, reg) = registry().await;
    // SQLite: run_sync returns at once and nothing ever goes stale.
    tokio::time::timeout(
        Duration::from_secs(5),
        Arc::clone(&reg).run_sync(SyncSettings::default(), std::future::pending()),
    )
    .await
    .unwrap();
    assert!(!reg.freshness.is_stale());
}

/// A registry over a store with a change feed (sent by the test), its
/// sync running with re-checks only when asked for.
async fn synced_registry() -> (
    tempfile::TempDir,
    broadcast::Sender<Change>,
    Arc<CountingStore>,
    Arc<Registry>,
    tokio::task::JoinHandle<()>,
) {
    let (dir, base) = registry().await;
    let (feed, _) = broadcast::channel(16);
    let store = CountingStore::over(base.store(), Some(feed.clone()));
    let reg = Arc::new(Registry::new(store.clone() as Arc<dyn Store>));
    let sync = tokio::spawn(Arc::clone(&reg).run_sync(
        SyncSettings {
            max_staleness: Duration::from_secs(60),
            recheck_every: Duration::from_secs(60),
        },
        std::future::pending(),
    ));
    (dir, feed, store, reg, sync)
}

#[tokio::test]
async fn changes_from_the_feed_apply_at_once_and_resync_rereads() {
    let (_dir, feed, store, reg, sync) = synced_registry().await;
    let (a, token_a) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let (b, token_b) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let now = crate::now_ms();
    // The sync task subscribes when it starts; a change sent before that
    // would have nobody to go to.
    eventually(Duration::from_secs(5), "sync subscribed", async || {
        feed.receiver_count() > 0
    })
    .await;

    // Another replica revoked a: the notification carries the new state.
    feed.send(Change::Session {
        id: a.id().clone(),
        revoked_at: Some(now),
        expires_at: a.expires_at(),
    })
    .unwrap();
    eventually(Duration::from_secs(5), "revocation applied", async || {
        reg.authenticate(Some(token_a.expose()), now).await.err() == Some(AuthError::Revoked)
    })
    .await;
    // An expiry change applies too.
    feed.send(Change::Session {
        id: b.id().clone(),
        revoked_at: None,
        expires_at: now - 1,
    })
    .unwrap();
    eventually(Duration::from_secs(5), "expiry applied", async || {
        reg.authenticate(Some(token_b.expose()), now).await.err() == Some(AuthError::Expired)
    })
    .await;

    // A change the feed missed is found by the re-read a resync asks for.
    let (c, token_c) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    store.inner.revoke_session(c.id(), now).await.unwrap();
    assert!(reg.authenticate(Some(token_c.expose()), now).await.is_ok());
    feed.send(Change::Resync).unwrap();
    eventually(Duration::from_secs(5), "resync re-read", async || {
        reg.authenticate(Some(token_c.expose()), now).await.err() == Some(AuthError::Revoked)
    })
    .await;
    sync.abort();
}

#[tokio::test]
async fn an_unreachable_store_fails_cached_sessions_closed_after_the_bound() {
    let (_dir, base) = registry().await;
    let (feed, _) = broadcast::channel(16);
    let store = CountingStore::over(base.store(), Some(feed));
    let reg = Arc::new(Registry::new(store.clone() as Arc<dyn Store>));
    let settings = SyncSettings::with_max_staleness(Duration::from_millis(400));
    assert_eq!(settings.recheck_every, Duration::from_millis(200));
    let sync = tokio::spawn(Arc::clone(&reg).run_sync(settings, std::future::pending()));
    let (_, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let (revoked, revoked_token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    reg.revoke(revoked.id()).await.unwrap();
    let now = crate::now_ms();
    reg.authenticate(Some(token.expose()), now).await.unwrap();

    store
        .unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let cut = tokio::time::Instant::now();
    let took = eventually(Duration::from_secs(5), "fail closed", async || {
        reg.authenticate(Some(token.expose()), now).await.err() == Some(AuthError::StoreUnavailable)
    })
    .await;
    // Served from memory for a bounded time: not before the bound minus
    // one re-check period, not long after the bound.
    assert!(
        took >= Duration::from_millis(150),
        "failed closed after {took:?}"
    );
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
    // A revoked session still gets its definite answer.
    assert_eq!(
        reg.authenticate(Some(revoked_token.expose()), now)
            .await
            .unwrap_err(),
        AuthError::Revoked
    );

    // Back by itself once the store answers again.
    store
        .unreachable
        .store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(Duration::from_secs(5), "recovery", async || {
        reg.authenticate(Some(token.expose()), now).await.is_ok()
    })
    .await;
    sync.abort();
}

#[tokio::test]
async fn max_denied_counts_totals_from_the_store_and_fires_once() {
    let (_dir, reg) = registry().await;
    let limits = Limits {
        max_denied: Some(5),
        ..Limits::default()
    };
    let (live, _) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(!live.count_denied());
    // Other replicas denied three more (as a re-check reads them).
    live.apply_status(&airlock_store::SessionStatus {
        id: live.id().clone(),
        revoked_at: None,
        expires_at: live.expires_at(),
        allowed: 0,
        denied: 3,
    });
    assert_eq!(live.denied(), 4, "3 stored + 1 not yet flushed");
    assert!(live.count_denied(), "the fifth denial anywhere");
    assert!(!live.count_denied());
    reg.flush().await;
    let row = reg.store().session_by_id(live.id()).await.unwrap().unwrap();
    assert_eq!(row.denied, 3, "this process wrote its own three");
}

/// Whether `changes` (enabled) has completed, without waiting.
fn has_fired(changes: &mut std::pin::Pin<&mut tokio::sync::futures::OwnedNotified>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    changes.as_mut().poll(&mut cx).is_ready()
}

#[tokio::test]
async fn a_session_tells_its_watchers_of_a_moved_expiry_and_of_revocation() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let mut expiry = std::pin::pin!(live.changes());
    expiry.as_mut().enable();
    // A re-check that finds the same expiry changes nothing.
    live.set_expires_at(live.expires_at());
    assert!(!has_fired(&mut expiry));
    live.set_expires_at(live.expires_at() + 1_000);
    assert!(has_fired(&mut expiry), "a moved expiry is a change");

    let mut revocation = std::pin::pin!(live.changes());
    revocation.as_mut().enable();
    assert!(!has_fired(&mut revocation));
    assert!(reg.revoke(live.id()).await.unwrap());
    assert!(has_fired(&mut revocation), "revocation is a change");
    // Only the first revocation is.
    let mut again = std::pin::pin!(live.changes());
    again.as_mut().enable();
    live.mark_revoked(now_ms());
    assert!(!has_fired(&mut again));
}

/// Whether `watch` says its session ended, without waiting.
fn has_ended(watch: &mut crate::EndWatch) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    watch.poll_ended(&mut cx).is_ready()
}

#[tokio::test]
async fn an_end_watch_fires_at_revocation_at_once() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let mut watch = crate::EndWatch::new(&live);
    assert!(!has_ended(&mut watch));
    // An expiry moved further out is a change, not an end.
    live.set_expires_at(live.expires_at() + 60_000);
    assert!(!has_ended(&mut watch));
    assert!(reg.revoke(live.id()).await.unwrap());
    assert!(has_ended(&mut watch), "revoked, and no time had to pass");
}

/// A watch begun after the session ended (or after the registry lost its
/// store and woke the watches then) sees it at its first poll, not at its
/// next look (up to `END_WATCH_RECHECK` later).
#[tokio::test]
async fn an_end_watch_begun_after_the_end_fires_at_its_first_poll() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(reg.revoke(live.id()).await.unwrap());
    let mut watch = crate::EndWatch::new(&live);
    assert!(has_ended(&mut watch));
}

#[tokio::test]
async fn an_end_watch_fires_when_the_expiry_is_moved_into_the_past() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let mut watch = crate::EndWatch::new(&live);
    assert!(!has_ended(&mut watch));
    live.set_expires_at(now_ms() - 1);
    assert!(has_ended(&mut watch));
}

#[tokio::test]
async fn an_end_watch_fires_at_the_expiry() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let expiry = now_ms() + 300;
    live.set_expires_at(expiry);
    let mut watch = crate::EndWatch::new(&live);
    assert!(!has_ended(&mut watch));
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| watch.poll_ended(cx)),
    )
    .await;
    assert!(ended.is_ok(), "the watch missed the expiry");
    assert!(now_ms() >= expiry, "the watch fired before the expiry");
    assert_eq!(live.state(now_ms()), crate::SessionState::Expired);
}

fn cached_count(reg: &Registry) -> (usize, usize) {
    (reg.by_token.read().len(), reg.by_id.read().len())
}

/// Ended sessions leave the cache once their retention is over, and the
/// maps give back what they grew to (a soak of 250,000 one-second sessions
/// held on to the memory of all of them).
#[tokio::test]
async fn ended_sessions_leave_the_cache_and_the_maps_shrink() {
    const N: usize = 3_000;
    let (_dir, reg) = registry().await;
    let mut ended = Vec::new();
    for i in 0..N {
        let (live, _) = reg
            .create(new_session(Limits::default(), Duration::from_secs(60)))
            .await
            .unwrap();
        if i % 2 == 0 {
            reg.revoke(live.id()).await.unwrap();
        }
        ended.push(live);
    }
    drop(ended);
    let grown = reg.by_token.read().capacity();
    assert!(grown >= N, "{grown}");
    let now = crate::now_ms();
    reg.evict(now);
    assert_eq!(cached_count(&reg), (N, N), "ended only just: still cached");
    // After the retention, the revoked ones go; the expired ones go with
    // their own expiry plus the retention.
    reg.evict(now + ENDED_RETENTION_MS + 1_000);
    let left = cached_count(&reg);
    assert!(left.0 <= N / 2 && left.0 == left.1, "{left:?}");
    reg.evict(now + 60_000 + ENDED_RETENTION_MS + 1_000);
    assert_eq!(cached_count(&reg), (0, 0));
    let capacity = (reg.by_token.read().capacity(), reg.by_id.read().capacity());
    assert!(
        capacity.0 < grown / 4 && capacity.1 < grown / 4,
        "{capacity:?}"
    );
}

/// An active session nobody calls with leaves the cache after a while,
/// unless something holds it (a stream) or the store lacks its counts;
/// its next call looks it up again, with its counts and limits intact.
#[tokio::test]
async fn idle_active_sessions_leave_the_cache_and_come_back_intact() {
    let (_dir, reg) = registry().await;
    let limits = Limits {
        max_requests: Some(2),
        ..Limits::default()
    };
    let (idle, idle_token) = reg
        .create(new_session(limits, Duration::from_secs(3_600)))
        .await
        .unwrap();
    let (held, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(3_600)))
        .await
        .unwrap();
    let (unflushed, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(3_600)))
        .await
        .unwrap();
    let now = crate::now_ms();
    let session = reg
        .authenticate(Some(idle_token.expose()), now)
        .await
        .unwrap();
    assert_eq!(reg.admit(&session).await, Ok(Admission::Admitted));
    assert_eq!(reg.admit(&session).await, Ok(Admission::Admitted));
    drop(session);
    let idle_id = idle.id().clone();
    drop(idle);
    assert_eq!(unflushed.admit(), Admission::Admitted);
    let unflushed_id = unflushed.id().clone();
    drop(unflushed);
    let later = now + IDLE_RETENTION_MS + 1_000;
    // Counts not yet written keep a session; a flush writes them.
    reg.evict(later);
    assert_eq!(cached_count(&reg), (3, 3));
    reg.flush().await;
    reg.evict(later);
    assert_eq!(cached_count(&reg), (1, 1), "only the one held elsewhere");
    assert!(reg.cached(held.id()).is_some());
    assert!(reg.cached(&idle_id).is_none() && reg.cached(&unflushed_id).is_none());
    // Used again: read from the store, its quota's use intact.
    let session = reg
        .authenticate(Some(idle_token.expose()), later)
        .await
        .unwrap();
    assert_eq!(session.allowed(), 2);
    assert_eq!(reg.admit(&session).await, Ok(Admission::QuotaExhausted));
}

/// Another replica revoked a session at its `max_denied`: once this one
/// learns of the revocation it reads the session's totals (even when the
/// re-check reads everything, which skips ended sessions), and its
/// refusals say why.
#[tokio::test]
async fn a_revocation_at_max_denied_elsewhere_is_told_as_such() {
    let (_dir, feed, store, reg, sync) = synced_registry().await;
    let limits = Limits {
        max_denied: Some(2),
        ..Limits::default()
    };
    let (session, token) = reg
        .create(new_session(limits, Duration::from_secs(60)))
        .await
        .unwrap();
    let now = crate::now_ms();
    reg.authenticate(Some(token.expose()), now).await.unwrap();
    eventually(Duration::from_secs(5), "sync subscribed", async || {
        feed.receiver_count() > 0
    })
    .await;
    // A re-read of everything while the session is active: done before
    // the other replica's writes, it cannot be what brings them.
    feed.send(Change::Resync).unwrap();
    eventually(Duration::from_secs(5), "the session re-read", async || {
        store.status_reads.lock().unwrap().contains(session.id())
    })
    .await;
    // The other replica's two denials and its revocation, in the store.
    store
        .inner
        .add_call_counts(session.id(), 0, 2)
        .await
        .unwrap();
    store.inner.revoke_session(session.id(), now).await.unwrap();
    feed.send(Change::Session {
        id: session.id().clone(),
        revoked_at: Some(now),
        expires_at: session.expires_at(),
    })
    .unwrap();
    eventually(Duration::from_secs(5), "the reason read", async || {
        reg.authenticate(Some(token.expose()), now).await.err() == Some(AuthError::RevokedMaxDenied)
    })
    .await;
    sync.abort();
}

#[tokio::test]
async fn a_session_has_at_most_its_slots_for_calls_in_flight() {
    let (_dir, reg) = registry().await;
    let (live, _) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let first = live.enter_call(2).unwrap();
    let second = live.enter_call(2).unwrap();
    assert_eq!(live.calls_in_flight(), 2);
    assert!(live.enter_call(2).is_none());
    // A refusal takes nothing.
    assert_eq!(live.calls_in_flight(), 2);
    drop(first);
    assert_eq!(live.calls_in_flight(), 1);
    let third = live.enter_call(2).unwrap();
    assert!(live.enter_call(2).is_none());
    drop((second, third));
    assert_eq!(live.calls_in_flight(), 0);

    // Taken from many threads at once, never more than the bound.
    let taken = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..1_000 {
                    if let Some(slot) = live.enter_call(3) {
                        assert!(live.calls_in_flight() <= 3);
                        taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        drop(slot);
                    }
                }
            });
        }
    });
    assert!(taken.into_inner() > 0);
    assert_eq!(live.calls_in_flight(), 0);
}
