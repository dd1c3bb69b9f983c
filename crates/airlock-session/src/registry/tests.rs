use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::Limits;

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
