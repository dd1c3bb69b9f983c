//! The registry: cache of live sessions over the store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::token::{generate_token, is_well_formed};
use airlock_core::{Limits, Scope, Secret, SessionId, TokenHash};
use airlock_store::{SessionRow, Store, StoreError};
use parking_lot::RwLock;

use crate::live::{LiveSession, SessionState};
use crate::now_ms;

/// How long an ended session stays cached so late calls get a fast 401.
const ENDED_RETENTION_MS: i64 = 10 * 60 * 1000;

/// Sessions by token hash, cached in memory over the store.
pub struct Registry {
    store: Arc<dyn Store>,
    by_token: RwLock<HashMap<TokenHash, Arc<LiveSession>>>,
    by_id: RwLock<HashMap<SessionId, TokenHash>>,
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
    #[error("the session store is unavailable")]
    StoreUnavailable,
}

/// Errors from registry operations that touch the store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

// === impl Registry ===

impl Registry {
    /// An empty registry over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            by_token: RwLock::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
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
        let live = by_token
            .entry(hash)
            .or_insert_with(|| Arc::new(LiveSession::from_row(row)))
            .clone();
        drop(by_token);
        self.by_id.write().insert(id, hash);
        live
    }

    /// Finds the session for a presented token and checks it is active at
    /// `now_ms`. A cached token never touches the store; an unknown one is
    /// looked up once and cached if found (never cached when not found, so a
    /// session created on another replica works at once).
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
            Some(session) => session,
            None => {
                let row = self.store.session_by_token(&hash).await.map_err(|e| {
                    tracing::error!(error = %e, "session lookup failed");
                    AuthError::StoreUnavailable
                })?;
                let row = row.ok_or(AuthError::Unknown)?;
                self.cache(hash, row)
            }
        };
        match session.state(now_ms) {
            SessionState::Active => Ok(session),
            SessionState::Expired => Err(AuthError::Expired),
            SessionState::Revoked => Err(AuthError::Revoked),
        }
    }

    /// The cached session with this id, if this process has it.
    pub fn cached(&self, id: &SessionId) -> Option<Arc<LiveSession>> {
        let hash = *self.by_id.read().get(id)?;
        self.by_token.read().get(&hash).cloned()
    }

    /// Revokes a session everywhere this process can see: in memory at once,
    /// then in the store. Returns whether the session exists.
    pub async fn revoke(&self, id: &SessionId) -> Result<bool, RegistryError> {
        let at = now_ms();
        if let Some(live) = self.cached(id) {
            live.mark_revoked(at);
        }
        Ok(self.store.revoke_session(id, at).await?)
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
        let id = session.id().clone();
        tokio::spawn(async move {
            if let Err(e) = registry.store.revoke_session(&id, at).await {
                tracing::error!(session = %id, error = %e, "could not persist revocation");
            }
        });
    }

    /// Writes counter increments to the store and drops ended sessions from
    /// the cache once they are long over.
    pub async fn flush(&self) {
        let sessions: Vec<Arc<LiveSession>> = self.by_token.read().values().cloned().collect();
        for session in &sessions {
            let (allowed, denied) = session.take_unflushed();
            if allowed == 0 && denied == 0 {
                continue;
            }
            if let Err(e) = self
                .store
                .add_call_counts(session.id(), allowed, denied)
                .await
            {
                tracing::warn!(session = %session.id(), error = %e, "could not flush call counts");
                session.restore_unflushed(allowed, denied);
            }
        }
        let now = now_ms();
        let ended_before = now - ENDED_RETENTION_MS;
        let mut by_token = self.by_token.write();
        let mut by_id = self.by_id.write();
        by_token.retain(|_, s| {
            let ended_at = s.revoked_at().unwrap_or(s.expires_at()).min(s.expires_at());
            let keep = ended_at > ended_before;
            if !keep {
                by_id.remove(s.id());
            }
            keep
        });
    }

    /// Runs [`Registry::flush`] every `every` until `shutdown` resolves, then once more.
    pub async fn run_flusher(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.flush().await,
                () = &mut shutdown => break,
            }
        }
        self.flush().await;
    }
}

#[cfg(test)]
mod tests;
