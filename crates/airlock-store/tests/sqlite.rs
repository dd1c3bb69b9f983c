//! The Store contract, run against SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use airlock_core::token::generate_token;
use airlock_core::{Limits, SessionId, TokenHash};
use airlock_store::{open, SessionRow};

fn session(created_at: i64, expires_at: i64) -> (String, SessionRow) {
    let token = generate_token();
    let row = SessionRow {
        id: SessionId::generate(),
        token_hash: TokenHash::of(token.expose()),
        created_at,
        expires_at,
        revoked_at: None,
        scope: serde_json::from_str(
            r#"[{"provider":"openai","methods":["POST"],"paths":["/v1/chat/completions"]}]"#,
        )
        .unwrap(),
        limits: Limits {
            max_denied: Some(3),
            ..Limits::default()
        },
        labels: BTreeMap::from([("agent".to_owned(), "a1".to_owned())]),
        allowed: 0,
        denied: 0,
    };
    (token.expose().to_owned(), row)
}

#[tokio::test]
async fn sessions_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/a.db", dir.path().display());
    let store = open(&url).await.unwrap();
    let (token, a) = session(1_000, 10_000);
    let (_, b) = session(2_000, 3_000);
    store.insert_session(&a).await.unwrap();
    store.insert_session(&b).await.unwrap();

    let found = store
        .session_by_token(&TokenHash::of(&token))
        .await
        .unwrap();
    assert_eq!(found.as_ref(), Some(&a));
    assert_eq!(store.session_by_id(&a.id).await.unwrap().as_ref(), Some(&a));
    assert!(store
        .session_by_token(&TokenHash::of("sess_nope"))
        .await
        .unwrap()
        .is_none());

    // At t=5000, b has expired: only a is active.
    let active = store.list_sessions(false, 5_000).await.unwrap();
    assert_eq!(
        active.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&a.id]
    );
    let all = store.list_sessions(true, 5_000).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].id, b.id, "newest first");

    store.add_call_counts(&a.id, 5, 2).await.unwrap();
    assert!(store.revoke_session(&a.id, 6_000).await.unwrap());
    assert!(
        store.revoke_session(&a.id, 7_000).await.unwrap(),
        "idempotent"
    );
    assert!(!store
        .revoke_session(&SessionId::generate(), 7_000)
        .await
        .unwrap());
    store.close().await;

    let store = open(&url).await.unwrap();
    let a2 = store.session_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!((a2.allowed, a2.denied), (5, 2));
    assert_eq!(a2.revoked_at, Some(6_000), "first revocation time is kept");
    assert!(store.list_sessions(false, 5_000).await.unwrap().is_empty());
}

#[tokio::test]
async fn settings_are_set_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&format!("sqlite://{}/s.db", dir.path().display()))
        .await
        .unwrap();
    assert_eq!(store.setting("k").await.unwrap(), None);
    assert_eq!(store.set_setting_if_absent("k", "v1").await.unwrap(), "v1");
    assert_eq!(store.set_setting_if_absent("k", "v2").await.unwrap(), "v1");
    assert_eq!(store.setting("k").await.unwrap().as_deref(), Some("v1"));
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    let err = open("mysql://x").await.err().unwrap().to_string();
    assert!(err.contains("unsupported store url"), "{err}");
}
