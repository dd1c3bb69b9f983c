use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::Limits;

use airlock_store::{SessionRow, Store};

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
    for _ in 0..3 {
        assert_eq!(live.admit(), Admission::Admitted);
    }
    assert_eq!(live.admit(), Admission::QuotaExhausted);
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
    assert_eq!(live.admit(), Admission::RateLimited);
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

/// A store that counts token lookups, to prove the request path does not
/// touch the database for a cached token.
struct CountingStore {
    inner: Arc<dyn Store>,
    token_lookups: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn insert_session(&self, s: &SessionRow) -> airlock_store::Result<()> {
        self.inner.insert_session(s).await
    }
    async fn session_by_token(&self, h: &TokenHash) -> airlock_store::Result<Option<SessionRow>> {
        self.token_lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.session_by_token(h).await
    }
    async fn session_by_id(&self, id: &SessionId) -> airlock_store::Result<Option<SessionRow>> {
        self.inner.session_by_id(id).await
    }
    async fn list_sessions(&self, all: bool, now: i64) -> airlock_store::Result<Vec<SessionRow>> {
        self.inner.list_sessions(all, now).await
    }
    async fn revoke_session(&self, id: &SessionId, at: i64) -> airlock_store::Result<bool> {
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
    async fn close(&self) {
        self.inner.close().await;
    }
}

#[tokio::test]
async fn known_tokens_never_touch_the_store() {
    let (_dir, reg) = registry().await;
    let (_, token) = reg
        .create(new_session(Limits::default(), Duration::from_secs(60)))
        .await
        .unwrap();
    let counting = Arc::new(CountingStore {
        inner: Arc::clone(reg.store()),
        token_lookups: Default::default(),
    });
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
