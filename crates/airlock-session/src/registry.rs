//! The registry: cache of live sessions over the store.
//!
//! On a store shared by replicas (PostgreSQL), [`Registry::run_sync`] keeps
//! the cache true to the store: it applies the store's change feed
//! (revocations and expiry changes of any replica, within milliseconds) and
//! reads the sessions that changed since its last look each
//! `recheck_every` as a safety net (one query, however many are cached). When that re-check has not succeeded for `max_staleness`, cached
//! sessions are refused ([`AuthError::StoreUnavailable`]) until it does
//! again: a replica cut off from the database fails closed after a bounded
//! time. Limits across replicas: see [`LiveSession::admit`] and
//! [`Registry::flush`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::token::{generate_token, is_well_formed};
use airlock_core::{Limits, Scope, Secret, SessionId, TokenHash};
use airlock_store::{Change, ChangeCursor, SessionRow, SessionStatus, Store, StoreError};
use parking_lot::{Mutex, RwLock};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, Notify};

use crate::live::{Admission, Lease, LiveSession, SessionState};
use crate::now_ms;

pub(crate) mod sync;

pub use sync::SyncSettings;

/// How long an ended session stays cached so late calls get a fast 401.
const ENDED_RETENTION_MS: i64 = 10 * 60 * 1000;
/// How long an active session nobody calls with stays cached. Its next
/// call looks it up in the store again, as a first call does; the cache
/// then holds the sessions in use, not every session ever created.
const IDLE_RETENTION_MS: i64 = 10 * 60 * 1000;
/// A map whose capacity is this many times its length, and above
/// [`SHRINK_ABOVE`], is shrunk after an eviction: a hash map never gives
/// memory back by itself.
const SHRINK_RATIO: usize = 4;
const SHRINK_ABOVE: usize = 1024;
/// Largest lease of `max_requests` asked for at once (the store also caps
/// it at an eighth of what is left).
const MAX_LEASE: u64 = 100;
/// After the store said a quota is spent, ask again no sooner than this
/// (other replicas may give leases back).
const SPENT_RETRY_MS: i64 = 1_000;
/// A lease unused this long is given back for other replicas to use.
const LEASE_IDLE_MS: i64 = 5_000;
/// A quota held by other replicas' leases with no call made for this long
/// is taken as spent: a live replica would have used the calls or given
/// them back idle (after [`LEASE_IDLE_MS`], at its next flush); a replica
/// killed with its lease never does.
const HELD_IN_VAIN_MS: i64 = LEASE_IDLE_MS + 3_000;
/// At shutdown, how long revocations the store has not taken are retried.
const FINAL_REVOCATION_WAIT: Duration = Duration::from_secs(5);
/// How often they are retried then.
const FINAL_REVOCATION_RETRY: Duration = Duration::from_millis(250);
/// Least time between two flushes woken by denials.
const EARLY_FLUSH_GAP: Duration = Duration::from_millis(20);
/// The longest a call waits for the store (a token lookup or a lease)
/// before it is refused.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// Sessions by token hash, cached in memory over the store.
pub struct Registry {
    store: Arc<dyn Store>,
    by_token: RwLock<HashMap<TokenHash, Arc<LiveSession>>>,
    by_id: RwLock<HashMap<SessionId, TokenHash>>,
    /// Wakes the flusher early: a denial is written at once (on a shared
    /// store it counts towards every replica's `max_denied`; alone, a
    /// process that dies forgets few denials).
    flush_soon: Arc<Notify>,
    /// Whether `max_requests` is spent from leases (`Store::leases_requests`).
    leases: bool,
    freshness: Arc<sync::Freshness>,
    /// Revocations this process has written to the store. A token looked up
    /// while one was written is looked up again: the row it read may be
    /// older than the revocation, which found nothing cached to mark.
    revocations: AtomicU64,
    /// Revocations in force here that the store has not taken yet (it
    /// failed when they were made), with their times: written again by
    /// every flush until the store has them, and applied to a session
    /// this process loads from the store meanwhile.
    unpersisted: Arc<Mutex<HashMap<SessionId, i64>>>,
    /// The runtime the registry was made on (the control plane's), where
    /// the request path's store calls run: see [`Registry::on_home`].
    home: Option<Handle>,
    /// On a shared store: what the next re-check must read besides the
    /// changes since its cursor (see [`Registry::recheck`]).
    pending: Mutex<Pending>,
    /// Where the last re-check's read of the store's changes got to.
    cursor: Mutex<Option<ChangeCursor>>,
}

/// Sessions the next re-check reads by id, besides the store's changes.
#[derive(Default)]
struct Pending {
    /// Sessions cached since the last re-check: the row they were cached
    /// from may predate a change the last re-check read while they were
    /// not cached yet.
    cached: Vec<SessionId>,
    /// Read every cached session (a resync, no cursor yet, or too many
    /// sessions cached at once to list).
    everything: bool,
}

/// Sessions cached between two re-checks beyond which the next one reads
/// every cached session instead of a list of them.
const PENDING_MAX: usize = 50_000;

/// What a flush writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlushKind {
    /// The periodic one: pending revocations, every session's counts,
    /// idle leases given back, ended sessions evicted.
    Tick,
    /// Woken by denials: the counts of sessions with denials to write.
    Denials,
    /// At shutdown: a tick that gives back every lease.
    Final,
}

/// What a new session grants.
#[derive(Clone, Debug)]
pub struct NewSession {
    pub scope: Scope,
    pub limits: Limits,
    pub labels: BTreeMap<String, String>,
    pub ttl: Duration,
}

/// Why a token was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no session token was presented")]
    Missing,
    #[error("the session token is not valid")]
    Unknown,
    #[error("the session has expired")]
    Expired,
    #[error("the session has been revoked")]
    Revoked,
    #[error(
        "the session has been revoked: it reached its max_denied limit of refused calls \
         (out of scope, malformed or rate limited)"
    )]
    RevokedMaxDenied,
    #[error("the session store is unavailable")]
    StoreUnavailable,
}

/// `Ok` while `session` is active at `now_ms`; otherwise why its token is
/// refused. Checked when a call is authenticated and again after anything
/// the call waited for (a lease refill is a store round trip, during which
/// the session may be revoked or expire).
pub(crate) fn still_active(session: &LiveSession, now_ms: i64) -> Result<(), AuthError> {
    match session.state(now_ms) {
        SessionState::Active => Ok(()),
        SessionState::Expired => Err(AuthError::Expired),
        SessionState::Revoked if session.reached_max_denied() => Err(AuthError::RevokedMaxDenied),
        SessionState::Revoked => Err(AuthError::Revoked),
    }
}

/// Errors from registry operations that touch the store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The revocation is in force in this process, but the store could not
    /// be written; it is written again until the store takes it.
    #[error(
        "revoked in this process, but the store could not be written ({0}); \
         airlock keeps writing it until the store takes it"
    )]
    RevocationPending(StoreError),
}

// === impl Registry ===

impl Registry {
    /// An empty registry over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        let leases = store.leases_requests();
        Self {
            store,
            by_token: RwLock::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            flush_soon: Arc::new(Notify::new()),
            leases,
            freshness: Arc::new(sync::Freshness::new()),
            revocations: AtomicU64::new(0),
            unpersisted: Arc::new(Mutex::new(HashMap::new())),
            home: Handle::try_current().ok(),
            pending: Mutex::new(Pending {
                cached: Vec::new(),
                everything: true,
            }),
            cursor: Mutex::new(None),
        }
    }

    /// Runs a store call from the request path on the registry's home
    /// runtime, whichever runtime the call comes from. Data-plane workers
    /// run runtimes of their own; a store connection opened from one of
    /// them (a PostgreSQL socket) would belong to it and fail once it
    /// stops, even for the control plane's audit flush that follows.
    async fn on_home<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        match &self.home {
            Some(home) => home
                .spawn(call)
                .await
                .unwrap_or(Err(StoreError::RuntimeGone)),
            None => call.await,
        }
    }

    /// Starts a store call from the request path on the home runtime
    /// without waiting for it (see [`Registry::on_home`]).
    fn spawn_home(&self, task: impl Future<Output = ()> + Send + 'static) {
        drop(self.spawn_home_joined(task));
    }

    /// [`Registry::spawn_home`], with the task's handle (dropping it does
    /// not stop the task).
    fn spawn_home_joined(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        match &self.home {
            Some(home) => home.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates a session, persists it and caches it. Returns it with its token;
    /// the token is not kept anywhere.
    pub async fn create(
        &self,
        new: NewSession,
    ) -> Result<(Arc<LiveSession>, Secret), RegistryError> {
        let token = generate_token();
        let hash = TokenHash::of(token.expose());
        let created_at = now_ms();
        let ttl_ms = i64::try_from(new.ttl.as_millis()).unwrap_or(i64::MAX);
        let row = SessionRow {
            id: SessionId::generate(),
            token_hash: hash,
            created_at,
            expires_at: created_at.saturating_add(ttl_ms),
            revoked_at: None,
            scope: new.scope,
            limits: new.limits,
            labels: new.labels,
            allowed: 0,
            denied: 0,
        };
        self.store.insert_session(&row).await?;
        Ok((self.cache(hash, row), token))
    }

    fn cache(&self, hash: TokenHash, row: SessionRow) -> Arc<LiveSession> {
        let id = row.id.clone();
        let mut by_token = self.by_token.write();
        let mut added = false;
        let live = by_token
            .entry(hash)
            .or_insert_with(|| {
                added = true;
                Arc::new(LiveSession::from_row(
                    row,
                    Some(&self.flush_soon),
                    self.leases,
                    Arc::clone(&self.freshness),
                ))
            })
            .clone();
        drop(by_token);
        if added && self.store.is_shared() {
            // The next re-check reads it: a change the last one read (and
            // found nothing cached to apply to) may be newer than its row.
            let mut pending = self.pending.lock();
            if pending.cached.len() < PENDING_MAX {
                pending.cached.push(id.clone());
            } else {
                pending.cached = Vec::new();
                pending.everything = true;
            }
        }
        self.by_id.write().insert(id, hash);
        // After the id is findable: a revocation kept from now on finds the
        // session through `cached`, one kept before is applied here.
        self.apply_unpersisted(&live);
        live
    }

    /// Marks `live` revoked if a revocation of it is waiting for the store.
    fn apply_unpersisted(&self, live: &LiveSession) {
        if let Some(at) = self.unpersisted.lock().get(live.id()) {
            live.mark_revoked(*at);
        }
    }

    /// Finds the session for a presented token and checks it is active at
    /// `now_ms`. A cached token never touches the store; an unknown one is
    /// looked up once and cached if found (never cached when not found, so a
    /// session created on another replica works at once).
    ///
    /// On a shared store, a cached session is refused with
    /// [`AuthError::StoreUnavailable`] while the cache may be stale (see
    /// [`Registry::run_sync`]). Never waits for a `max_requests` lease: a
    /// call refused for its path or scope costs the store nothing (the
    /// lease is [`Registry::admit`]'s).
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        now_ms: i64,
    ) -> Result<Arc<LiveSession>, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if !is_well_formed(token) {
            return Err(AuthError::Unknown);
        }
        let hash = TokenHash::of(token);
        let cached = self.by_token.read().get(&hash).cloned();
        let session = match cached {
            Some(session) => {
                session.seen(now_ms);
                // Revoked and expired are final; only a session that looks
                // active may be stale.
                if session.state(now_ms) == SessionState::Active && self.freshness.is_stale() {
                    return Err(AuthError::StoreUnavailable);
                }
                session
            }
            None => {
                let revocations = self.revocations.load(Ordering::SeqCst);
                let row = self.look_up(hash).await?.ok_or(AuthError::Unknown)?;
                let session = self.cache(hash, row);
                if self.revocations.load(Ordering::SeqCst) != revocations {
                    match self.look_up(hash).await {
                        Ok(row) => {
                            if let Some(at) = row.and_then(|r| r.revoked_at) {
                                session.mark_revoked(at);
                            }
                            self.apply_unpersisted(&session);
                        }
                        Err(e) => {
                            // Unconfirmed: not kept, so the next call asks again.
                            self.by_token.write().remove(&hash);
                            self.by_id.write().remove(session.id());
                            return Err(e);
                        }
                    }
                }
                session
            }
        };
        still_active(&session, now_ms)?;
        Ok(session)
    }

    /// Whether the cached sessions can be vouched for: false once a shared
    /// store has been out of reach for longer than `max_staleness` (cached
    /// sessions are refused then, see [`LiveSession::unvouched`]).
    pub fn can_vouch(&self) -> bool {
        !self.freshness.is_stale()
    }

    /// Asks `session`'s limits to admit a call (see [`LiveSession::admit`]).
    ///
    /// On a store that leases `max_requests`, an empty lease is refilled
    /// first: the call waits for the store (once per lease, not per call)
    /// and then reads the session's state again, so that a session revoked
    /// or expired meanwhile is refused (its [`AuthError`]) and spends
    /// nothing. A lease running low is refilled in the background. A call
    /// is refused only when the store has nothing left to lease (each round
    /// either gets a grant, which the quota bounds, or finds the store
    /// spent): `QuotaExhausted`, or `QuotaHeldElsewhere` while other
    /// processes' leases may still hold unused calls.
    pub async fn admit(&self, session: &Arc<LiveSession>) -> Result<Admission, AuthError> {
        loop {
            let admission = session.admit();
            let Some(lease) = session.lease() else {
                return Ok(admission);
            };
            if admission != Admission::QuotaExhausted {
                self.refill_when_low(session, lease);
                return Ok(admission);
            }
            if lease.recently_spent(now_ms(), SPENT_RETRY_MS) {
                return Ok(if lease.held_elsewhere() {
                    Admission::QuotaHeldElsewhere
                } else {
                    admission
                });
            }
            if self.refill_empty(session, lease).await? {
                // The wait was a store round trip: the session may have ended.
                still_active(session, now_ms())?;
            }
        }
    }

    /// Starts a background refill of a lease of at least four running
    /// below a quarter, unless one is under way.
    fn refill_when_low(&self, session: &Arc<LiveSession>, lease: &Lease) {
        if !lease.running_low() {
            return;
        }
        let store = Arc::clone(&self.store);
        let session = Arc::clone(session);
        self.spawn_home(async move {
            if let Some(lease) = session.lease() {
                if let Ok(_refilling) = lease.refill.try_lock() {
                    if lease.running_low() {
                        let _ = refill(store.as_ref(), &session).await;
                    }
                }
            }
        });
    }

    /// Refills `session`'s empty lease from the store, one refill at a
    /// time (calls that find one under way wait for it). Leaves the lease
    /// empty when the store has nothing left. Returns whether it waited
    /// (for the refill lock or the store), after which the session's state
    /// must be read again.
    async fn refill_empty(
        &self,
        session: &Arc<LiveSession>,
        lease: &Lease,
    ) -> Result<bool, AuthError> {
        if lease.left() > 0 {
            return Ok(false);
        }
        let _refilling = lease.refill.lock().await;
        if lease.left() > 0 || lease.recently_spent(now_ms(), SPENT_RETRY_MS) {
            return Ok(true);
        }
        let store = Arc::clone(&self.store);
        let leased = Arc::clone(session);
        let refilled = self.on_home(async move { refill(store.as_ref(), &leased).await });
        match tokio::time::timeout(STORE_WAIT, refilled).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => {
                tracing::error!(session = %session.id(), error = %e, "could not lease max_requests");
                Err(AuthError::StoreUnavailable)
            }
            Err(_) => {
                tracing::error!(session = %session.id(), "leasing max_requests timed out");
                Err(AuthError::StoreUnavailable)
            }
        }
    }

    /// The stored row of the token hashed `hash`, read on the home runtime.
    async fn look_up(&self, hash: TokenHash) -> Result<Option<SessionRow>, AuthError> {
        let store = Arc::clone(&self.store);
        let lookup = self.on_home(async move { store.session_by_token(&hash).await });
        match tokio::time::timeout(STORE_WAIT, lookup).await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "session lookup failed");
                Err(AuthError::StoreUnavailable)
            }
            Err(_) => {
                tracing::error!("session lookup timed out");
                Err(AuthError::StoreUnavailable)
            }
        }
    }

    /// The session `token` names, if this process holds it, whatever its
    /// state: a call refused for an ended session still names it in its
    /// record.
    pub fn cached_by_token(&self, token: &str) -> Option<Arc<LiveSession>> {
        if !is_well_formed(token) {
            return None;
        }
        self.by_token.read().get(&TokenHash::of(token)).cloned()
    }

    /// The cached session with this id, if this process has it.
    pub fn cached(&self, id: &SessionId) -> Option<Arc<LiveSession>> {
        let hash = *self.by_id.read().get(id)?;
        self.by_token.read().get(&hash).cloned()
    }

    /// Revokes a session everywhere this process can see: in memory at once,
    /// then in the store. Returns whether the session exists. When the store
    /// cannot be written, the revocation stays in force here and every
    /// flush writes it again until the store has it; the error says so.
    pub async fn revoke(&self, id: &SessionId) -> Result<bool, RegistryError> {
        let at = now_ms();
        if let Some(live) = self.cached(id) {
            live.mark_revoked(at);
        }
        let existed = match self.store.revoke_session(id, at).await {
            Ok(existed) => existed,
            Err(e) => {
                self.keep_unpersisted(id, at);
                return Err(RegistryError::RevocationPending(e));
            }
        };
        // A lookup that read the row before this write and cached it since
        // is marked here, or sees the count move and looks again.
        self.revocations.fetch_add(1, Ordering::SeqCst);
        if let Some(live) = self.cached(id) {
            live.mark_revoked(at);
        }
        Ok(existed)
    }

    /// Revokes a session by its token.
    pub async fn revoke_by_token(&self, token: &str) -> Result<Option<SessionId>, RegistryError> {
        let hash = TokenHash::of(token);
        let id = self
            .by_token
            .read()
            .get(&hash)
            .map(|live| live.id().clone());
        let id = match id {
            Some(id) => Some(id),
            None => self.store.session_by_token(&hash).await?.map(|r| r.id),
        };
        if let Some(id) = &id {
            self.revoke(id).await?;
        }
        Ok(id)
    }

    /// Revokes a session because it reached `max_denied`: in memory now, in the
    /// store from a background task so the request path does not wait.
    pub fn revoke_in_background(self: &Arc<Self>, session: &Arc<LiveSession>) {
        let at = now_ms();
        session.mark_revoked(at);
        tracing::warn!(session = %session.id(), "session revoked: max_denied reached");
        let registry = Arc::clone(self);
        let session = Arc::clone(session);
        self.spawn_home(async move {
            let id = session.id();
            // The denials first: other replicas, told of the revocation,
            // read the session's totals then, which must hold the denial
            // that reached `max_denied` for their refusals to say so
            // (round 37: the revocation arrived first, and they said only
            // "revoked" until their next re-check). Meanwhile the
            // revocation is one the store has not taken: should the write
            // stall, the flusher persists it all the same.
            if registry.store.is_shared() {
                registry.unpersisted.lock().entry(id.clone()).or_insert(at);
                if let Err(e) = registry.write_counts(&session, now_ms()).await {
                    tracing::warn!(session = %id, error = %e, "could not flush call counts");
                }
            }
            match registry.store.revoke_session(id, at).await {
                Ok(_) => {
                    registry.unpersisted.lock().remove(id);
                }
                Err(e) => {
                    tracing::error!(session = %id, error = %e, "could not persist revocation; retrying");
                    registry.unpersisted.lock().entry(id.clone()).or_insert(at);
                }
            }
        });
    }

    /// On a shared store, writes `session`'s denials (with its other
    /// counts) now, for the refusal to be answered once the store has
    /// them: `max_denied` then applies to the denials of every replica as
    /// they happen (the store revokes in the same statement and tells the
    /// others; this replica takes the revocation in from its answer), not
    /// at the next flush. Only for sessions with `max_denied`; each denial
    /// costs one write at most, and at most `max_denied` of them are
    /// answered before the session is revoked. A write that fails leaves
    /// the counts to the flusher, as before.
    ///
    /// One write of a session's counts at a time (`write_counts`, the
    /// flusher's too): denials that come while one is under way go
    /// together in the next (a hostile agent's burst of refusals costs a
    /// write per round trip to the store, not per refusal), and a denial
    /// the flusher took is stored by the time the wait for its write ends.
    /// The write runs in a task of its own on the registry's runtime, so
    /// that a refused call dropped meanwhile (its agent gone) does not take
    /// the counts it took with it.
    pub async fn write_denials(self: &Arc<Self>, session: &Arc<LiveSession>) {
        if !self.store.is_shared() || session.limits().max_denied.is_none() {
            return;
        }
        let registry = Arc::clone(self);
        let session = Arc::clone(session);
        let write = self.spawn_home_joined(async move {
            if let Err(e) = registry.write_counts(&session, now_ms()).await {
                tracing::warn!(session = %session.id(), error = %e, "could not flush call counts");
            }
        });
        // Err only if the runtime is shutting down: the flusher's last
        // flush then writes what is left.
        let _ = write.await;
    }

    /// Remembers a revocation the store did not take, for the flusher.
    fn keep_unpersisted(&self, id: &SessionId, at: i64) {
        self.unpersisted.lock().entry(id.clone()).or_insert(at);
        // A lookup racing this one may have cached the row before it.
        self.revocations.fetch_add(1, Ordering::SeqCst);
        if let Some(live) = self.cached(id) {
            live.mark_revoked(at);
        }
    }

    /// Revocations in force here that the store has not taken yet.
    pub fn unpersisted_revocations(&self) -> usize {
        self.unpersisted.lock().len()
    }

    /// Writes the revocations the store did not take when they were made.
    async fn persist_revocations(&self) {
        let pending: Vec<(SessionId, i64)> = self
            .unpersisted
            .lock()
            .iter()
            .map(|(id, at)| (id.clone(), *at))
            .collect();
        for (id, at) in pending {
            match self.store.revoke_session(&id, at).await {
                Ok(_) => {
                    if let Some(live) = self.cached(&id) {
                        live.mark_revoked(at);
                    }
                    self.unpersisted.lock().remove(&id);
                    tracing::info!(session = %id, "revocation written to the store");
                }
                // Tried again at the next flush; the first failure was logged.
                Err(e) => {
                    tracing::debug!(session = %id, error = %e, "revocation still not written");
                }
            }
        }
    }

    /// Writes counter increments to the store and drops ended sessions from
    /// the cache once they are long over.
    ///
    /// On a shared store, the write also applies `max_denied` to the totals
    /// of every replica (the store revokes the session in the same
    /// statement and tells the others), and the totals it returns are taken
    /// in. Leases of `max_requests` unused for a while are given back.
    pub async fn flush(&self) {
        self.flush_inner(FlushKind::Tick).await;
    }

    async fn flush_inner(&self, kind: FlushKind) {
        let now = now_ms();
        if kind == FlushKind::Denials {
            // Woken by denials: only the sessions that have some to write
            // (a full flush per denial would let an agent multiply the
            // store's writes).
            let denied: Vec<Arc<LiveSession>> = self
                .by_token
                .read()
                .values()
                .filter(|s| s.has_unflushed_denials())
                .cloned()
                .collect();
            let mut failed = Failures::default();
            for session in &denied {
                failed.note(self.write_counts(session, now).await);
            }
            failed.warn();
            return;
        }
        self.persist_revocations().await;
        let sessions: Vec<Arc<LiveSession>> = self.by_token.read().values().cloned().collect();
        let mut failed = Failures::default();
        for session in &sessions {
            self.release_lease(session, now, kind == FlushKind::Final)
                .await;
            failed.note(self.write_counts(session, now).await);
        }
        // One line for them all: with the store out of reach, a line per
        // session each second grew with the sessions cached (round 40).
        failed.warn();
        // Held here, every session would look in use.
        drop(sessions);
        self.evict(now);
    }

    /// Writes `session`'s counter increments (and takes in the stored state
    /// a shared store answers with). A failed write leaves them for the
    /// next flush and is returned for the caller to say.
    async fn write_counts(&self, session: &LiveSession, now: i64) -> Result<(), StoreError> {
        // One write of a session's counts at a time (see the field).
        let _writing = session.count_writes().lock().await;
        let (allowed, denied) = session.take_unflushed();
        if allowed == 0 && denied == 0 {
            return Ok(());
        }
        match self
            .store
            .record_calls(session.id(), allowed, denied, now)
            .await
        {
            Ok(Some(status)) => {
                if status.revoked_at.is_some() && session.revoked_at().is_none() {
                    // Revoked elsewhere: by `max_denied` over every
                    // replica's denials, or by a revocation this replica's
                    // feed has not brought yet.
                    let over = session
                        .limits()
                        .max_denied
                        .is_some_and(|max| status.denied >= max);
                    if over {
                        tracing::warn!(session = %session.id(), "session revoked: max_denied reached across replicas");
                    } else {
                        tracing::info!(session = %session.id(), "session revoked by another replica");
                    }
                }
                session.apply_status(&status);
            }
            Ok(None) => {}
            Err(e) => {
                session.restore_unflushed(allowed, denied);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drops from the cache the sessions that ended long ago and the
    /// active ones nobody has called with for a while, and shrinks the
    /// maps that emptied. An active session stays while anything else
    /// holds it (a stream, a tunnel, a call), while it has counts or a
    /// lease the store has not taken back, or a revocation the store lacks
    /// (that lives only here): its next call reads the row the store has,
    /// which then says all there is to know about it.
    fn evict(&self, now: i64) {
        let ended_before = now - ENDED_RETENTION_MS;
        let idle_before = now - IDLE_RETENTION_MS;
        let unpersisted = self.unpersisted.lock();
        let mut by_token = self.by_token.write();
        let mut by_id = self.by_id.write();
        by_token.retain(|_, s| {
            let keep = if unpersisted.contains_key(s.id()) {
                true
            } else if s.state(now) == SessionState::Active {
                s.last_seen() > idle_before || Arc::strong_count(s) > 1 || !s.settled()
            } else {
                let ended_at = s.revoked_at().unwrap_or(s.expires_at()).min(s.expires_at());
                ended_at > ended_before
            };
            if !keep {
                by_id.remove(s.id());
            }
            keep
        });
        shrink(&mut by_token);
        shrink(&mut by_id);
    }

    /// Gives a session's unused lease back to the store when the session
    /// ended, went idle, or `all` (shutting down).
    async fn release_lease(&self, session: &LiveSession, now: i64, all: bool) {
        let Some(lease) = session.lease() else {
            return;
        };
        if lease.left() == 0 {
            return;
        }
        let ended = session.state(now) != SessionState::Active;
        if ended {
            // Nobody can spend it any more; nothing to give back either.
            return;
        }
        if !all && now - lease.last_used() < LEASE_IDLE_MS {
            return;
        }
        let Ok(_refilling) = lease.refill.try_lock() else {
            return;
        };
        let left = lease.take_all();
        if let Err(e) = self.store.release_requests(session.id(), left).await {
            tracing::warn!(session = %session.id(), error = %e, "could not give back a lease");
            lease.add(left);
        }
    }

    /// Runs [`Registry::flush`] every `every` (and at once when a denial on
    /// a shared store must count for every replica) until `shutdown`
    /// resolves, then once more, giving back every lease.
    pub async fn run_flusher(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let soon = Arc::clone(&self.flush_soon);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.flush().await,
                () = soon.notified() => {
                    self.flush_inner(FlushKind::Denials).await;
                    // A stream of denials flushes at most this often.
                    tokio::time::sleep(EARLY_FLUSH_GAP).await;
                }
                () = &mut shutdown => break,
            }
        }
        self.flush_inner(FlushKind::Final).await;
        // A revocation the store has not taken yet lives only here: give
        // the store a few more chances before the process goes.
        let deadline = tokio::time::Instant::now() + FINAL_REVOCATION_WAIT;
        while self.unpersisted_revocations() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(FINAL_REVOCATION_RETRY).await;
            self.persist_revocations().await;
        }
        let lost: Vec<String> = self
            .unpersisted
            .lock()
            .keys()
            .map(ToString::to_string)
            .collect();
        if !lost.is_empty() {
            tracing::error!(
                sessions = %lost.join(","),
                "revocations the store never took are lost with this process: revoke them again"
            );
        }
    }

    /// Applies a change announced by the store. Returns whether the
    /// session's totals should be read now: a session with `max_denied`
    /// that another replica revoked may have reached it there, which its
    /// refusals here should say (they read the denials this replica knows
    /// of), not only at the next re-check.
    fn apply_change(&self, change: &Change) -> bool {
        if let Change::Denied { id, denied } = change {
            // Just before the revocation it came with: the refusals that
            // follow say whether `max_denied` ended the session.
            if let Some(live) = self.cached(id) {
                live.note_stored_denied(*denied);
            }
            return false;
        }
        let Change::Session {
            id,
            revoked_at,
            expires_at,
        } = change
        else {
            return false;
        };
        let Some(live) = self.cached(id) else {
            return false;
        };
        let mut read_totals = false;
        if let Some(at) = revoked_at {
            if live.revoked_at().is_none() {
                tracing::info!(session = %id, "session revoked by another replica");
                read_totals = live.limits().max_denied.is_some();
            }
            live.mark_revoked(*at);
        }
        live.set_expires_at(*expires_at);
        read_totals
    }

    /// Brings the cached sessions that have not ended up to date with the
    /// store (ended ones stay cached a while to answer their tokens, but
    /// nothing the store says can bring them back: no route moves an
    /// expiry). Sessions gone from the store are treated as revoked.
    ///
    /// Where the store records changes ([`Store::session_changes`]), this
    /// reads only the sessions changed since the last re-check plus those
    /// cached since, in one query: an idle replica costs one small query
    /// however many sessions it caches. Every cached session is read (in
    /// queries of 5,000) only at the first re-check, after a resync, when
    /// more than [`PENDING_MAX`] sessions were cached in between, or on a
    /// store without that record.
    async fn recheck(&self) -> Result<(), StoreError> {
        self.recheck_at(now_ms()).await
    }

    /// Asks the next re-check to read every cached session (the change
    /// feed may have missed something).
    fn recheck_everything(&self) {
        let mut pending = self.pending.lock();
        pending.cached = Vec::new();
        pending.everything = true;
    }

    /// [`Registry::recheck`] at the time `now` (unix ms).
    async fn recheck_at(&self, now: i64) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock());
        let since = *self.cursor.lock();
        let read = match since {
            Some(since) if !pending.everything => {
                self.read_changes(since, &pending.cached, now).await
            }
            _ => self.read_everything(now).await,
        };
        match read {
            Ok(next) => {
                *self.cursor.lock() = next;
                Ok(())
            }
            Err(e) => {
                // Read again next time, with what was cached meanwhile.
                let mut again = self.pending.lock();
                again.everything |= pending.everything;
                if !again.everything {
                    again.cached.extend(pending.cached);
                }
                Err(e)
            }
        }
    }

    /// Reads the sessions changed since `since` and the cached ones named
    /// in `ids`; returns the next cursor.
    async fn read_changes(
        &self,
        since: ChangeCursor,
        ids: &[SessionId],
        now: i64,
    ) -> Result<Option<ChangeCursor>, StoreError> {
        const CHUNK: usize = 5_000;
        let mut next = None;
        let mut first = true;
        for chunk in ids
            .chunks(CHUNK)
            .map(Some)
            .chain(ids.is_empty().then_some(None))
        {
            let chunk = chunk.unwrap_or(&[]);
            // The first query's cursor is the oldest: the next re-check
            // starts from it, whatever the later ones saw.
            let from = first.then_some(since);
            let changes = match self.store.session_changes(from, chunk).await? {
                Some(changes) if changes.complete || !first => changes,
                // More changed than one read returns (or no record of
                // changes): read every cached session instead.
                _ => return self.read_everything(now).await,
            };
            if first {
                next = changes.next;
                first = false;
            }
            let read: HashMap<&SessionId, &SessionStatus> =
                changes.statuses.iter().map(|s| (&s.id, s)).collect();
            for status in &changes.statuses {
                if let Some(session) = self.cached(&status.id) {
                    session.apply_status(status);
                }
            }
            for id in chunk {
                if !read.contains_key(id) {
                    self.gone(id);
                }
            }
        }
        Ok(next)
    }

    /// Reads every cached session that has not ended (and those revoked
    /// short of their `max_denied`, which another replica may have reached:
    /// their refusals say so once the totals are read); returns the cursor
    /// to read changes from next (`None` on a store without one).
    async fn read_everything(&self, now: i64) -> Result<Option<ChangeCursor>, StoreError> {
        const CHUNK: usize = 5_000;
        let sessions: Vec<Arc<LiveSession>> = self
            .by_token
            .read()
            .values()
            .filter(|s| {
                let active = s.revoked_at().is_none() && s.expires_at() > now;
                let reason_unread = s.revoked_at().is_some()
                    && s.limits().max_denied.is_some_and(|max| s.denied() < max);
                active || reason_unread
            })
            .cloned()
            .collect();
        let mut next = None;
        let mut first = true;
        let chunks = sessions
            .chunks(CHUNK)
            .map(Some)
            .chain(sessions.is_empty().then_some(None));
        for chunk in chunks {
            let chunk = chunk.unwrap_or(&[]);
            let ids: Vec<SessionId> = chunk.iter().map(|s| s.id().clone()).collect();
            // A store that records changes reads them with the same
            // snapshot; the first query's cursor is the oldest.
            let statuses = match self.store.session_changes(None, &ids).await? {
                Some(changes) => {
                    if first {
                        next = changes.next;
                    }
                    changes.statuses
                }
                None if ids.is_empty() => Vec::new(),
                None => self.store.session_statuses(&ids).await?,
            };
            first = false;
            let by_id: HashMap<&SessionId, &SessionStatus> =
                statuses.iter().map(|s| (&s.id, s)).collect();
            for session in chunk {
                match by_id.get(session.id()) {
                    Some(status) => session.apply_status(status),
                    None => self.gone(session.id()),
                }
            }
        }
        Ok(next)
    }

    /// A cached session the store no longer has: refused from now on.
    fn gone(&self, id: &SessionId) {
        if let Some(session) = self.cached(id) {
            if session.revoked_at().is_none() {
                tracing::warn!(session = %id, "session gone from the store; refusing it");
            }
            session.mark_revoked(now_ms());
        }
    }
}

/// Gives an oversized map's memory back (see [`SHRINK_RATIO`]).
fn shrink<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SHRINK_ABOVE && map.len().saturating_mul(SHRINK_RATIO) < map.capacity() {
        map.shrink_to(map.len().saturating_mul(2));
    }
}

/// Asks the store for a new lease and adds it to the session's.
async fn refill(store: &dyn Store, session: &LiveSession) -> Result<(), StoreError> {
    let Some(lease) = session.lease() else {
        return Ok(());
    };
    match store.reserve_requests(session.id(), MAX_LEASE).await? {
        0 => {
            // Every call of the quota is reserved; whether all were made is
            // in the stored totals (as flushed: calls other processes made
            // since count as unused, and a retry finds them later).
            // (Only a shared store has an elsewhere: on SQLite, calls
            // reserved and never made are those of a process that died.)
            let held_elsewhere = match session.limits().max_requests {
                Some(max) if store.is_shared() => {
                    let statuses = store
                        .session_statuses(std::slice::from_ref(session.id()))
                        .await?;
                    let now = now_ms();
                    statuses.first().is_some_and(|status| {
                        let total = status.allowed.saturating_add(session.unflushed_allowed());
                        total < max && !lease.held_in_vain(now, total, HELD_IN_VAIN_MS)
                    })
                }
                _ => false,
            };
            // Timed after the store's answers: the wait before asking again
            // starts now, however long they took.
            lease.mark_spent(now_ms(), held_elsewhere);
        }
        granted => lease.add(granted),
    }
    Ok(())
}

/// The count writes of one flush that failed, said in one line.
#[derive(Default)]
struct Failures {
    sessions: usize,
    first: Option<StoreError>,
}

impl Failures {
    /// Takes in one session's write.
    fn note(&mut self, written: Result<(), StoreError>) {
        if let Err(e) = written {
            self.sessions += 1;
            self.first.get_or_insert(e);
        }
    }

    /// Warns once, naming how many sessions' counts wait for the next flush.
    fn warn(self) {
        if let Some(e) = self.first {
            tracing::warn!(
                sessions = self.sessions,
                error = %e,
                "could not flush the call counts of {} sessions; they are kept for the next flush",
                self.sessions
            );
        }
    }
}

/// Receives the next change; a receiver that fell behind is told to resync.
async fn next_change(feed: &mut broadcast::Receiver<Change>) -> Option<Change> {
    match feed.recv().await {
        Ok(change) => Some(change),
        Err(broadcast::error::RecvError::Lagged(missed)) => {
            tracing::warn!(missed, "change feed fell behind; re-checking every session");
            Some(Change::Resync)
        }
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

#[cfg(test)]
mod tests;
