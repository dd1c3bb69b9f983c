use super::*;

#[test]
fn payloads_round_trip() {
    let id = SessionId::generate();
    for change in [
        Change::Session {
            id: id.clone(),
            revoked_at: Some(1_700_000_000_123),
            expires_at: 1_700_000_900_000,
        },
        Change::Session {
            id: id.clone(),
            revoked_at: None,
            expires_at: 5,
        },
        Change::Denied { id, denied: 3 },
        Change::Credential {
            provider: "openai".to_owned(),
        },
    ] {
        let payload = change.payload().unwrap();
        assert_eq!(Change::parse(&payload), Some(change), "{payload}");
    }
    assert_eq!(Change::Resync.payload(), None);
}

#[test]
fn malformed_payloads_are_ignored() {
    for payload in [
        "",
        "session",
        "session ses_x",
        "session ses_x - ",
        "session not-an-id - 5",
        "session ses_x 12x 5",
        "session ses_x - 5 extra",
        "denied",
        "denied ses_x",
        "denied not-an-id 3",
        "denied ses_x -1",
        "denied ses_x 3 extra",
        "credential",
        "credential ",
        "credential a b",
        "other thing",
    ] {
        assert_eq!(Change::parse(payload), None, "{payload:?}");
    }
}
