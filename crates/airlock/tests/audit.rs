//! End-to-end tests of the audit trail: the real binary, a recording mock
//! provider, the CLI, and a database edited behind airlock's back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::audit::{AuditRecord, RECORD_FIELDS};
use airlock_store::testing::{execute_sqlite, garble_sqlite_batch, rewrite_sqlite_chain};
use airlock_testkit::client::request;
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sqlx::Connection;

const OPENAI_KEY: &str = "sk-real-openai-audit-0123456789";
const ADMIN_TOKEN: &str = "adm_audit_test_token_0123456789";

fn builder(mock: &MockProvider) -> AirlockBuilder {
    AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .provider(
            "dead",
            "http://127.0.0.1:1",
            "bearer",
            "sk-dead-000000000",
            "",
        )
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
}

async fn session(airlock: &Airlock, limits: Value) -> (String, String) {
    let s = airlock
        .create_session(json!({
            "scope": [
                {"provider": "openai", "methods": ["GET"], "paths": ["/v1/calls/*"]},
                {"provider": "dead", "methods": ["GET"], "paths": ["/**"]},
            ],
            "ttl_seconds": 600,
            "limits": limits,
        }))
        .await
        .unwrap();
    (
        s["id"].as_str().unwrap().to_owned(),
        s["token"].as_str().unwrap().to_owned(),
    )
}

async fn get(airlock: &Airlock, path: &str, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    let url = format!("{}{path}", airlock.proxy_url());
    request("GET", &url, &[("authorization", &auth)], Bytes::new())
        .await
        .status
}

/// Runs `airlock --config CONFIG ARGS...`.
fn cli(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("AIRLOCK_AUDIT_KEY")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn audit_records(airlock: &Airlock, query: &str) -> Vec<Value> {
    let (status, body) = airlock
        .admin("GET", &format!("/v1/audit{query}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["records"].as_array().unwrap().clone()
}

/// Every file under `dir` except the audit key file, concatenated.
fn data_files(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && !path.to_string_lossy().ends_with(".audit-key") {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn every_call_gets_one_record_and_none_holds_a_secret() {
    let mock = MockProvider::start().await;
    let mut airlock = builder(&mock)
        .env("RUST_LOG", "trace")
        .start()
        .await
        .unwrap();
    let (id, token) = session(&airlock, json!({"max_requests": 2})).await;
    let (other_id, other_token) = session(&airlock, json!({})).await;

    // (path, token, status, decision)
    let calls: Vec<(String, String, u16, &str)> = vec![
        (
            "/openai/v1/calls/1?key=querysecret".into(),
            token.clone(),
            200,
            "allow",
        ),
        (
            "/openai/v1/models".into(),
            token.clone(),
            403,
            "out_of_scope",
        ),
        (
            "/openai/v1/calls/2".into(),
            "sess_unknownunknownunknownunknownunknown123".into(),
            401,
            "invalid_token",
        ),
        (
            "/openai/v1/calls/%2e%2e".into(),
            token.clone(),
            400,
            "bad_request",
        ),
        (
            "/nobody/v1/calls/3".into(),
            token.clone(),
            403,
            "out_of_scope",
        ),
        (
            "/dead/anything".into(),
            token.clone(),
            502,
            "upstream_error",
        ),
        (
            "/openai/v1/calls/4".into(),
            token.clone(),
            429,
            "rate_limited",
        ),
        (
            "/openai/v1/calls/5".into(),
            other_token.clone(),
            200,
            "allow",
        ),
    ];
    for (path, token, status, _) in &calls {
        assert_eq!(get(&airlock, path, token).await, *status, "{path}");
    }
    assert_eq!(
        mock.request_count(),
        2,
        "only the allowed calls reach the provider"
    );

    let records = audit_records(&airlock, "").await;
    assert_eq!(records.len(), calls.len(), "{records:#?}");
    for (record, (path, _, status, decision)) in records.iter().zip(&calls) {
        assert_eq!(record["decision"], *decision, "{record}");
        assert_eq!(record["status"], *status, "{record}");
        assert_eq!(record["method"], "GET");
        assert_eq!(record["path"], path.split('?').next().unwrap());
        assert_eq!(record["chain"], 1);
    }
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=calls.len() as u64).collect::<Vec<_>>());
    assert_eq!(records[0]["session"], id.as_str());
    assert_eq!(records[0]["provider"], "openai");
    assert_eq!(records[0]["upstream_status"], 200);
    assert!(records[0]["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(
        records[2]["session"],
        Value::Null,
        "unknown token names no session"
    );
    assert_eq!(records[4]["provider"], Value::Null);
    assert_eq!(records[7]["session"], other_id.as_str());

    // Filters.
    assert_eq!(
        audit_records(&airlock, &format!("?session={other_id}"))
            .await
            .len(),
        1
    );
    assert_eq!(audit_records(&airlock, "?limit=3").await.len(), 3);
    // Pages: `next` while records remain, passed back as `after` (with the
    // filters again, or alone); the pages together are the whole listing.
    let whole = audit_records(&airlock, "?limit=100").await;
    for (first, then) in [
        ("?limit=3".to_owned(), "?limit=3&after=".to_owned()),
        (format!("?limit=2&session={id}"), "?limit=2&after=".into()),
        (
            format!("?limit=1&session={id}&since=2000-01-01T00:00:00Z"),
            format!("?limit=1&session={id}&since=2000-01-01T00:00:00Z&after="),
        ),
    ] {
        let (status, mut body) = airlock
            .admin("GET", &format!("/v1/audit{first}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let mut paged = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            paged.extend(body["records"].as_array().unwrap().clone());
            let Some(next) = body["next"].as_str() else {
                break;
            };
            (_, body) = airlock
                .admin("GET", &format!("/v1/audit{then}{next}"), None)
                .await
                .unwrap();
        }
        let expected: Vec<&Value> = whole
            .iter()
            .filter(|r| !first.contains("session") || r["session"] == id.as_str())
            .collect();
        assert_eq!(paged.iter().collect::<Vec<_>>(), expected, "{first}");
        let per_page: usize = first[7..8].parse().unwrap();
        assert_eq!(pages, expected.len().div_ceil(per_page).max(1), "{first}");
    }
    let (_, body) = airlock
        .admin("GET", "/v1/audit?limit=2", None)
        .await
        .unwrap();
    let next = body["next"].as_str().unwrap().to_owned();
    for query in [
        format!("?after={next}x"),
        "?after=bm9wZQ".to_owned(),
        format!("?after={next}&session={other_id}"),
        format!("?after={next}&since=2000-01-01T00:00:00Z"),
    ] {
        let (status, body) = airlock
            .admin("GET", &format!("/v1/audit{query}"), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("after: "),
            "{body}"
        );
    }
    let (_, body) = airlock
        .admin("GET", "/v1/audit?limit=100", None)
        .await
        .unwrap();
    assert!(body.get("next").is_none(), "nothing left: no next: {body}");
    // `resume` is where the page ended: passed back later, it answers
    // only what was committed since (nothing yet, then the new call's),
    // with the filters it was given (a session's).
    let resume = body["resume"].as_str().unwrap().to_owned();
    let after = |cursor: String| {
        let airlock = &airlock;
        async move {
            let (status, body) = airlock
                .admin("GET", &format!("/v1/audit?after={cursor}"), None)
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let nothing = after(resume.clone()).await;
    assert_eq!(nothing["records"], json!([]), "{nothing}");
    assert_eq!(nothing["resume"], resume.as_str(), "{nothing}");
    let (_, body) = airlock
        .admin("GET", &format!("/v1/audit?session={id}&limit=100"), None)
        .await
        .unwrap();
    let resume_mine = body["resume"].as_str().unwrap().to_owned();
    // `from=end`: no records, and a `resume` where the trail ends now.
    let (status, end) = airlock
        .admin("GET", "/v1/audit?from=end", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{end}");
    assert_eq!(end["records"], json!([]), "{end}");
    assert!(end.get("next").is_none(), "{end}");
    let from_end = end["resume"].as_str().unwrap().to_owned();
    for query in [
        "?from=start",
        "?from=end&since=2000-01-01T00:00:00Z",
        "?from=end&after=x",
    ] {
        let (status, body) = airlock
            .admin("GET", &format!("/v1/audit{query}"), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
    }
    assert_eq!(get(&airlock, "/openai/v1/calls/6", &other_token).await, 200);
    // (Its max_requests is spent: refused, and recorded as its.)
    assert_eq!(get(&airlock, "/openai/v1/calls/7", &token).await, 429);
    let since = after(resume).await;
    let paths: Vec<&str> = since["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/openai/v1/calls/6", "/openai/v1/calls/7"],
        "{since}"
    );
    assert_eq!(after(from_end).await["records"], since["records"]);
    let mine = after(resume_mine).await;
    assert_eq!(mine["records"].as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine["records"][0]["path"], "/openai/v1/calls/7", "{mine}");
    assert!(audit_records(&airlock, "?since=2999-01-01T00:00:00Z")
        .await
        .is_empty());
    let (status, body) = airlock
        .admin("GET", "/v1/audit?since=yesterday", None)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, _) = airlock
        .admin("GET", "/v1/audit?limit=0", None)
        .await
        .unwrap();
    assert_eq!(status, 400);
    // Something that is no session id is refused, as on /v1/sessions/{id},
    // not answered with an empty list; a bad parameter is named without
    // the framework's wording.
    for (query, want) in [
        ("?session=foo", "\"foo\" is not a session id (ses_...)"),
        (
            &format!("?session=ses_{}", "a".repeat(5_000)),
            &format!("\"ses_{}\"… is not a session id", "a".repeat(60)),
        ),
        ("?limit=many", "invalid query string: limit: invalid digit"),
        (
            "?sesion=ses_x",
            "unknown field `sesion`, expected one of `session`",
        ),
    ] {
        let (status, body) = airlock
            .admin("GET", &format!("/v1/audit{query}"), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{query}: {message}");
        assert!(!message.contains("Failed to deserialize"), "{message}");
        assert!(message.len() < 300, "a long value is not said back whole");
    }

    let (status, verdict) = airlock
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(verdict["ok"], true, "{verdict}");
    // (Two calls more: those of the `resume` check.)
    assert_eq!(verdict["records"], calls.len() + 2);

    // The key: a 0600 file next to the store, never shown.
    let key_file = airlock.dir().join("airlock.db.audit-key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();

    airlock.terminate().await.unwrap();
    let out = cli(&airlock.config_path(), &["audit", "verify"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out).trim(),
        "audit trail intact: 10 records in 1 chain"
    );
    // Another key: the store knows the trail's, so that is a
    // misconfiguration (exit 2), not a forged first record (exit 1).
    let other_key = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(airlock.config_path())
        .args(["audit", "verify"])
        .env("AIRLOCK_AUDIT_KEY", "cd".repeat(32))
        .output()
        .unwrap();
    assert_eq!(other_key.status.code(), Some(2), "{other_key:?}");
    let said = String::from_utf8_lossy(&other_key.stderr);
    assert!(said.contains("so nothing was verified"), "{said}");

    // No secret anywhere: records, store files, logs at trace level.
    let exported = stdout(&cli(&airlock.config_path(), &["audit", "export"]));
    let files = data_files(airlock.dir());
    let logs = airlock.output();
    for secret in [
        token.as_str(),
        other_token.as_str(),
        OPENAI_KEY,
        "querysecret",
        key.as_str(),
    ] {
        assert!(!exported.contains(secret), "export holds {secret}");
        assert!(!serde_json::to_string(&records).unwrap().contains(secret));
        assert!(!contains(&files, secret), "store files hold {secret}");
        assert!(!logs.contains(secret), "logs hold {secret}");
    }
}

/// Copies of the store's files, to restore between tamperings.
struct Backup {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl Backup {
    fn take(db: &Path) -> Self {
        let files = ["", "-wal", "-shm"]
            .iter()
            .map(|suffix| {
                let path = PathBuf::from(format!("{}{suffix}", db.display()));
                let bytes = std::fs::read(&path).ok();
                (path, bytes)
            })
            .collect();
        Self { files }
    }

    fn restore(&self) {
        for (path, bytes) in &self.files {
            match bytes {
                Some(bytes) => std::fs::write(path, bytes).unwrap(),
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

#[tokio::test]
async fn tampering_in_the_store_is_named() {
    let mock = MockProvider::start().await;
    let mut airlock = builder(&mock).start().await.unwrap();
    let (_, token) = session(&airlock, json!({})).await;
    for n in 1..=10 {
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), &token).await,
            200
        );
    }
    airlock.terminate().await.unwrap();
    let db = airlock.dir().join("airlock.db");
    let config = airlock.config_path();
    let backup = Backup::take(&db);
    assert!(cli(&config, &["audit", "verify"]).status.success());
    // The verdict as JSON, as the admin API answers it.
    let out = cli(&config, &["audit", "verify", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict, json!({"ok": true, "records": 10, "chains": 1}));

    type Edit = Box<dyn FnOnce(&mut Vec<AuditRecord>)>;
    let at = |seq: u64| usize::try_from(seq - 1).unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "edit",
            Box::new(move |r| r[at(5)].status = 201),
            "first bad record is seq 5 of chain 1: bad mac",
        ),
        (
            "edit the path",
            Box::new(move |r| r[at(2)].path = "/openai/v1/calls/x".into()),
            "seq 2 of chain 1: bad mac",
        ),
        (
            "delete",
            Box::new(move |r| {
                r.remove(at(4));
            }),
            "seq 5 of chain 1: gap: record 4 is missing",
        ),
        (
            "delete the first",
            Box::new(|r| {
                r.remove(0);
            }),
            "seq 2 of chain 1: gap: record 1 is missing",
        ),
        (
            "swap two records' contents",
            Box::new(move |r| {
                let (six, seven) = (r[at(6)].clone(), r[at(7)].clone());
                r[at(6)] = AuditRecord { seq: 6, ..seven };
                r[at(7)] = AuditRecord { seq: 7, ..six };
            }),
            "seq 6 of chain 1: bad mac",
        ),
        (
            "insert a copy",
            Box::new(move |r| {
                let copy = AuditRecord {
                    seq: 11,
                    ..r[at(10)].clone()
                };
                r.push(copy);
            }),
            "seq 11 of chain 1: bad mac",
        ),
        (
            "cut the tail",
            Box::new(|r| r.retain(|r| r.seq < 9)),
            "seq 9 of chain 1: truncated: missing (the chain ends before its sealed head, record 10)",
        ),
    ];
    for (name, edit, expected) in cases {
        backup.restore();
        rewrite_sqlite_chain(&db, 1, edit).await.unwrap();
        let out = cli(&config, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert!(stdout(&out).contains(expected), "{name}: {}", stdout(&out));
    }

    backup.restore();
    rewrite_sqlite_chain(&db, 1, |r| r[4].status = 201)
        .await
        .unwrap();
    let out = cli(&config, &["audit", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert_eq!(verdict["first_bad"], 5, "{verdict}");
    assert_eq!(verdict["chain"], 1, "{verdict}");
    assert_eq!(
        verdict["reason"], "bad mac: the record was altered or forged",
        "{verdict}"
    );

    // A batch that no longer decodes fails verification, naming where.
    backup.restore();
    garble_sqlite_batch(&db, 1, 5, b"\x01garbage")
        .await
        .unwrap();
    let out = cli(&config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "garbled: {out:?}");
    assert!(
        stdout(&out).contains("seq 5 of chain 1: malformed record"),
        "garbled: {}",
        stdout(&out)
    );
    // Its count says why the intact records before it are not in it.
    assert!(
        stdout(&out).contains("less any read in one page with a record that does not decode"),
        "garbled: {}",
        stdout(&out)
    );

    // The rows around the records are checked against them too: a batch
    // copied under another seq, one indexed as older than it is, or one
    // left out of its session's index (either would hide it from filtered
    // queries) breaks verification.
    let row_cases = [
        (
            "copy a batch",
            "INSERT INTO audit_batches (chain, first_seq, last_seq, ts_max, records) \
             SELECT chain, 1000, 1000, ts_max, records FROM audit_batches WHERE first_seq = 1",
            "seq 1000 of chain 1: malformed record",
        ),
        (
            "index a batch as older",
            "UPDATE audit_batches SET ts_max = 0 WHERE first_seq = 5",
            // Times in RFC 3339, not Unix milliseconds.
            "seq 5 of chain 1: malformed record: the batch from this record on is indexed as \
             ending at 1970-01-01T00:00:00.000Z but holds a record of 20",
        ),
        (
            "hide a batch from its session's queries",
            "DELETE FROM audit_batch_sessions WHERE first_seq = 7",
            "seq 7 of chain 1: malformed record",
        ),
        (
            // Not "first bad record is seq 10": all ten verified (round 28).
            "forge the head's seal",
            "UPDATE audit_chains SET head_seal = zeroblob(32) WHERE id = 1",
            "audit trail broken: the sealed head of chain 1 (at seq 10) does not match its \
             records: bad head",
        ),
    ];
    for (name, sql, expected) in row_cases {
        backup.restore();
        execute_sqlite(&db, sql).await.unwrap();
        let out = cli(&config, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert!(stdout(&out).contains(expected), "{name}: {}", stdout(&out));
    }

    // The admin API reports the same break.
    backup.restore();
    rewrite_sqlite_chain(&db, 1, |r| r[2].bytes_out = 0)
        .await
        .unwrap();
    let airlock = builder(&mock)
        .dir(airlock.dir().to_path_buf())
        .start()
        .await
        .unwrap();
    let (_, verdict) = airlock
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(verdict["ok"], false);
    assert_eq!(verdict["first_bad"], 3);
    assert!(
        verdict["reason"].as_str().unwrap().starts_with("bad mac"),
        "{verdict}"
    );
    // Every broken chain's first break (one chain here); `records` counts
    // those that verified, before the break.
    assert_eq!(verdict["broken_chains"].as_array().unwrap().len(), 1);
    assert_eq!(verdict["broken_chains"][0]["chain"], 1);
    assert_eq!(verdict["broken_chains"][0]["first_bad"], 3);
    assert_eq!(verdict["broken_chains"][0]["reason"], verdict["reason"]);
    assert_eq!(verdict["records"], 2);
    // And so does `audit verify --remote`, from where neither the store
    // nor the key is.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = remote_cli(&airlock, elsewhere.path(), &["audit", "verify", "--remote"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!(
            "audit trail broken: first bad record is seq 3 of chain 1: {} (verified by the \
             server at {})\n(2 records in 1 chain verified: in a broken chain, those before its \
             first bad record)\n",
            verdict["reason"].as_str().unwrap(),
            airlock.admin_url()
        )
    );
    let out = remote_cli(
        &airlock,
        elsewhere.path(),
        &["audit", "verify", "--remote", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap(),
        verdict
    );
}

/// Runs `airlock ARGS...` in `dir` (no config, no store, no audit key
/// there) against `airlock`'s admin API.
fn remote_cli(airlock: &Airlock, dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .current_dir(dir)
        .env_remove("AIRLOCK_AUDIT_KEY")
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap()
}

/// `audit export --remote` and `audit verify --remote` read the trail
/// through the admin API: the same records, byte for byte, as the export
/// from the store, page after page; nothing needed where they run.
#[tokio::test]
async fn remote_export_and_verify_go_through_the_admin_api() {
    let mock = MockProvider::start().await;
    let airlock = builder(&mock).start().await.unwrap();
    let (a, token_a) = session(&airlock, json!({})).await;
    let (_, token_b) = session(&airlock, json!({})).await;
    for n in 1..=7 {
        let token = if n % 2 == 1 { &token_a } else { &token_b };
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), token).await,
            200
        );
    }
    assert_eq!(get(&airlock, "/openai/v1/models", &token_b).await, 403);
    // Committed before the answers completed: all there.
    assert_eq!(audit_records(&airlock, "?limit=100").await.len(), 8);
    let config = airlock.config_path();
    let elsewhere = tempfile::tempdir().unwrap();
    let remote = |args: &[&str]| {
        let out = remote_cli(&airlock, elsewhere.path(), args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        stdout(&out)
    };

    let local = stdout(&cli(&config, &["audit", "export"]));
    assert_eq!(local.lines().count(), 8);
    // Pages of 3 records: the cursor is followed to the end.
    let exported = remote(&["audit", "export", "--remote", "--page-size", "3"]);
    assert_eq!(exported, local);
    assert_eq!(remote(&["audit", "export", "--remote"]), local);
    // The file it wrote verifies with the key, as a local export does.
    let file = airlock.dir().join("remote.jsonl");
    std::fs::write(&file, &exported).unwrap();
    let out = cli(
        &config,
        &["audit", "verify", "--from", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");

    // Filters as the local export has them.
    let only_a = remote(&[
        "audit",
        "export",
        "--remote",
        "--session",
        &a,
        "--page-size",
        "2",
    ]);
    assert_eq!(only_a.lines().count(), 4);
    assert_eq!(
        only_a,
        stdout(&cli(&config, &["audit", "export", "--session", &a]))
    );
    assert_eq!(
        remote(&["audit", "export", "--remote", "--since", "1h"]),
        local
    );
    // Before year 0: everything, as from the store.
    assert_eq!(
        remote(&["audit", "export", "--remote", "--since", "20000000h"]),
        local
    );
    assert_eq!(
        stdout(&cli(&config, &["audit", "export", "--since", "20000000h"])),
        local
    );
    assert!(remote(&[
        "audit",
        "export",
        "--remote",
        "--since",
        "2999-01-01T00:00:00Z"
    ])
    .is_empty());
    let unknown = "ses_0000000000000000000000";
    let out = remote_cli(
        &airlock,
        elsewhere.path(),
        &["audit", "export", "--remote", "--session", unknown],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("--session: the server has no session {unknown}")),
        "{out:?}"
    );

    assert_eq!(
        remote(&["audit", "verify", "--remote"]),
        format!(
            "audit trail intact: 8 records in 1 chain (verified by the server at {})\n",
            airlock.admin_url()
        )
    );
    let verdict: Value =
        serde_json::from_str(&remote(&["audit", "verify", "--remote", "--json"])).unwrap();
    assert_eq!(verdict, json!({"ok": true, "records": 8, "chains": 1}));

    // --session is for a file's verification, not the store's either.
    let out = cli(&config, &["audit", "verify", "--json", "--session", &a]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // --session is for a file's verification, not the server's.
    let out = remote_cli(
        &airlock,
        elsewhere.path(),
        &["audit", "verify", "--remote", "--session", &a],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // A local config is not read (as for the session commands), even a
    // broken one.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("airlock.toml"), "[proxy\n").unwrap();
    let out = remote_cli(&airlock, broken.path(), &["audit", "verify", "--remote"]);
    assert!(out.status.success(), "{out:?}");

    // Without the admin token nothing was verified: exit 2, not 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "verify", "--remote"])
        .current_dir(elsewhere.path())
        .env("AIRLOCK_ADMIN_URL", airlock.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", "adm_wrong_token_0123456789")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused the admin token"),
        "{out:?}"
    );
    // Nothing was created where the commands ran (no store, no key file).
    let left: Vec<_> = std::fs::read_dir(elsewhere.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn exports_verify_on_their_own_and_tampering_is_named() {
    let mock = MockProvider::start().await;
    let mut airlock = builder(&mock).start().await.unwrap();
    let (a, token_a) = session(&airlock, json!({})).await;
    let (_, token_b) = session(&airlock, json!({})).await;
    for n in 1..=8 {
        let token = if n % 2 == 1 { &token_a } else { &token_b };
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), token).await,
            200
        );
    }
    airlock.terminate().await.unwrap();
    let config = airlock.config_path();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let file_str = file.to_str().unwrap();

    let exported = stdout(&cli(&config, &["audit", "export"]));
    let lines: Vec<String> = exported.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 8);
    write_lines(&file, &lines);
    let out = cli(&config, &["audit", "verify", "--from", file_str]);
    assert!(out.status.success(), "{out:?}");
    let summary = stdout(&out);
    assert!(
        summary.starts_with("audit file intact: 8 records in 1 chain\n  chain 1: seq 1 to 8\n"),
        "{summary}"
    );
    assert!(summary.contains("only the store can tell"), "{summary}");
    // An empty input verifies nothing: not "intact" (round 28: a pipe whose
    // export failed passed, exit 0).
    for empty in ["", "\n\n"] {
        std::fs::write(&file, empty).unwrap();
        let out = cli(&config, &["audit", "verify", "--from", file_str]);
        // 2: not verified (1 is "broken").
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("holds no audit records"),
            "{out:?}"
        );
    }
    // A byte order mark (as some Windows editors write) is no record.
    let mut with_bom = lines.clone();
    with_bom[0] = format!("\u{feff}{}", with_bom[0]);
    write_lines(&file, &with_bom);
    let out = cli(&config, &["audit", "verify", "--from", file_str]);
    assert!(out.status.success(), "{out:?}");
    // A file cut at its start still verifies, and its summary shows where
    // it starts.
    write_lines(&file, &lines[2..]);
    let out = cli(&config, &["audit", "verify", "--from", file_str]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("chain 1: seq 3 to 8"),
        "{}",
        stdout(&out)
    );

    let broken = |edit: &dyn Fn(&mut Vec<String>)| {
        let mut copy = lines.clone();
        edit(&mut copy);
        write_lines(&file, &copy);
        let out = cli(&config, &["audit", "verify", "--from", file_str]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        // Worded as the summary of an intact file ("audit file intact").
        assert!(stdout(&out).starts_with("audit file broken: "), "{out:?}");
        stdout(&out)
    };
    let edited = broken(&|l| l[2] = l[2].replace("\"status\":200", "\"status\":201"));
    assert!(
        edited.contains("seq 3 of chain 1 (line 3): bad mac"),
        "{edited}"
    );
    // The same verdict as JSON (round 37: --json was refused with --from).
    let out = cli(&config, &["audit", "verify", "--from", file_str, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap(),
        json!({
            "ok": false, "first_bad": 3, "chain": 1, "line": 3,
            "reason": "bad mac: the record was altered or forged", "records": 2
        })
    );
    write_lines(&file, &lines);
    let out = cli(&config, &["audit", "verify", "--from", file_str, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out)).unwrap(),
        json!({
            "ok": true, "records": 8, "chains": 1,
            "ranges": [{"chain": 1, "first_seq": 1, "last_seq": 8}]
        })
    );
    // A line that names no record: no seq or chain to give.
    let mut garbled = lines.clone();
    garbled[5] = "not json".into();
    write_lines(&file, &garbled);
    let out = cli(&config, &["audit", "verify", "--from", file_str, "--json"]);
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (&verdict["first_bad"], &verdict["chain"], &verdict["line"]),
        (&Value::Null, &Value::Null, &json!(6)),
        "{verdict}"
    );
    write_lines(&file, &lines);
    let missing = dir.path().join("missing.jsonl");
    let out = cli(
        &config,
        &[
            "audit",
            "verify",
            "--from",
            missing.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert!(
        verdict["error"]
            .as_str()
            .unwrap()
            .contains("cannot open the file"),
        "{verdict}"
    );
    // Every line written back by another JSON tool (Python's `json.dumps`
    // layout: a space after each separator) with record 3 edited: the edit
    // is named, not line 1's layout.
    let relaid = broken(&|l| {
        for line in l.iter_mut() {
            *line = line.replace("\",\"", "\", \"").replace("\":", "\": ");
        }
        l[2] = l[2].replace("\"status\": 200", "\"status\": 201");
    });
    assert!(
        relaid.contains("seq 3 of chain 1 (line 3): bad mac"),
        "{relaid}"
    );
    // A record's values without their names: not a record.
    let as_array = broken(&|l| {
        let record: Value = serde_json::from_str(&l[1]).unwrap();
        let in_order: Vec<&Value> = RECORD_FIELDS.iter().map(|k| &record[*k]).collect();
        l[1] = serde_json::to_string(&in_order).unwrap();
    });
    assert!(
        as_array.contains("(line 2): malformed record"),
        "{as_array}"
    );
    let dropped = broken(&|l| {
        l.remove(3);
    });
    assert!(
        dropped.contains("seq 5 of chain 1 (line 4): gap: record 4 is missing"),
        "{dropped}"
    );
    let swapped = broken(&|l| l.swap(4, 5));
    assert!(
        swapped.contains("seq 6 of chain 1 (line 5): out of order: expected record 5"),
        "{swapped}"
    );
    let inserted = broken(&|l| {
        let copy = l[1].clone();
        l.insert(4, copy);
    });
    assert!(
        inserted.contains("seq 2 of chain 1 (line 5): out of order"),
        "{inserted}"
    );
    let respelled = broken(&|l| {
        l[0] = l[0]
            .replacen('{', "{ ", 1)
            .replace("\"status\":200", "\"status\":200.0")
    });
    assert!(
        respelled.contains("seq 1 of chain 1 (line 1): malformed record"),
        "{respelled}"
    );
    let garbage = broken(&|l| l[6] = "not json".into());
    assert!(
        garbage.contains("first bad record is an unreadable line (line 7): malformed record"),
        "{garbage}"
    );
    // A first line that is no record, with records after it: broken.
    let first_garbage = broken(&|l| l[0] = "not json".into());
    assert!(
        first_garbage.contains("(line 1): malformed"),
        "{first_garbage}"
    );
    // Every line altered, each still naming its record: broken, not the
    // wrong file.
    let all_altered = broken(&|l| {
        for line in l.iter_mut() {
            *line = line.replace("\"mac\":", "\"max\":");
        }
    });
    assert!(
        all_altered.contains("seq 1 of chain 1 (line 1): malformed"),
        "{all_altered}"
    );
    // A file of which no line is a record is the wrong file, not a
    // tampered one: exit 2, as for a file that is not there.
    write_lines(&file, &["[proxy]".to_owned(), "listen = \"x\"".to_owned()]);
    let out = cli(&config, &["audit", "verify", "--from", file_str]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an audit export"),
        "{out:?}"
    );
    // A gap before a line that is no record: the gap is the first problem
    // (the look-ahead used to report the later line first).
    let gap_then_garbage = broken(&|l| {
        l.remove(1);
        l[2] = "not json".into();
    });
    assert!(
        gap_then_garbage.contains("seq 3 of chain 1 (line 2): gap: record 2 is missing"),
        "{gap_then_garbage}"
    );

    // One session's export: seqs jump, so it verifies as a session export.
    let only_a = stdout(&cli(&config, &["audit", "export", "--session", &a]));
    let a_lines: Vec<String> = only_a.lines().map(str::to_owned).collect();
    assert_eq!(a_lines.len(), 4);
    write_lines(&file, &a_lines);
    let out = cli(
        &config,
        &["audit", "verify", "--from", file_str, "--session", &a],
    );
    assert!(out.status.success(), "{out:?}");
    let out = cli(&config, &["audit", "verify", "--from", file_str]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "gaps are refused unless --session says why"
    );
    assert!(
        stdout(&out).contains(&format!(
            "(every record up to it names session {a}: if the file is that session's export"
        )),
        "{}",
        stdout(&out)
    );
    let mut tampered = a_lines.clone();
    tampered[1] = tampered[1].replace("/v1/calls/3", "/v1/calls/9");
    write_lines(&file, &tampered);
    let out = cli(
        &config,
        &["audit", "verify", "--from", file_str, "--session", &a],
    );
    assert!(
        stdout(&out).contains("seq 3 of chain 1 (line 2): bad mac"),
        "{out:?}"
    );

    // A session id the store never had (a typo) is a usage error, not an
    // empty export that verifies, nor a tail that waits forever.
    let unknown = "ses_0000000000000000000000";
    for args in [
        &["audit", "export", "--session", unknown][..],
        &["audit", "tail", "--session", unknown],
    ] {
        let out = cli(&config, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains(&format!("--session: no session {unknown} in the store")),
            "{out:?}"
        );
        assert!(out.stdout.is_empty(), "{out:?}");
    }

    // --since: a contiguous tail.
    let since = stdout(&cli(&config, &["audit", "export", "--since", "1h"]));
    assert_eq!(since.lines().count(), 8);
    let none = stdout(&cli(
        &config,
        &["audit", "export", "--since", "2999-01-01T00:00:00Z"],
    ));
    assert!(none.is_empty());
    let out = cli(&config, &["audit", "export", "--since", "last tuesday"]);
    assert!(!out.status.success());
}

/// `audit verify --from FILE` with a file that is not there says so, before
/// anything about the audit key (which is missing here too). A trail
/// `audit verify` cannot check at all exits 2, never the 1 of a trail that
/// does not verify; `audit export` without its key exits 1.
#[test]
fn verify_from_a_missing_file_names_the_file_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "verify", "--from", "nonexist.jsonl"])
        .current_dir(dir.path())
        .env_remove("AIRLOCK_AUDIT_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("airlock: --from nonexist.jsonl: cannot open the file: "),
        "{err}"
    );
    assert!(!err.contains("key"), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    for (args, code) in [(&["audit", "verify"][..], 2), (&["audit", "export"], 1)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("AIRLOCK_AUDIT_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One GET through a fresh connection: the status and whole body, or why not.
async fn try_get(url: &str, token: &str) -> Result<(u16, Bytes), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let call = async {
        let response = client.request(req).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .map_err(|_| "timed out".to_owned())?
}

#[tokio::test]
async fn kill_dash_nine_under_load_loses_no_answered_call() {
    let mock = MockProvider::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut answered: Vec<String> = Vec::new();
    // Several rounds: each kill lands at a different moment of the load.
    for round in 0..3 {
        let mut airlock = builder(&mock)
            .dir(data.path().to_path_buf())
            .start()
            .await
            .unwrap();
        let (_, token) = session(&airlock, json!({})).await;
        let completed = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for worker in 0..8 {
            let (base, token) = (airlock.proxy_url(), token.clone());
            let (completed, count) = (Arc::clone(&completed), Arc::clone(&count));
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let path = format!("/openai/v1/calls/r{round}-w{worker}-{i}");
                    match try_get(&format!("{base}{path}"), &token).await {
                        Ok((200, body)) if body.starts_with(b"{") => {
                            completed.lock().push(path);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => return,
                    }
                }
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while count.load(Ordering::SeqCst) < 200 + round * 50 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "load did not get going"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        airlock.kill();
        for worker in workers {
            worker.await.unwrap();
        }
        answered.extend(completed.lock().iter().cloned());
    }

    let airlock = builder(&mock)
        .dir(data.path().to_path_buf())
        .start()
        .await
        .unwrap();
    let (_, verdict) = airlock
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(
        verdict["chains"], 1,
        "every restart continues the one chain"
    );
    let recorded: BTreeSet<String> = audit_records(&airlock, "?limit=10000")
        .await
        .iter()
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&String> = answered.iter().filter(|p| !recorded.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "answered calls without a record: {missing:?}"
    );
}

/// Limits hold across a crash: `max_requests` is spent from leases
/// reserved in the database, so a process killed with `kill -9` loses at
/// most its lease's unused calls and never allows more than the limit (it
/// counted in memory and wrote the count once a second: a crash forgot the
/// last second's calls and allowed them again); denials are written at
/// once, so `max_denied` still counts the ones made before the crash.
#[tokio::test]
async fn limits_hold_across_kill_dash_nine() {
    let mock = MockProvider::start().await;
    let data = tempfile::tempdir().unwrap();
    let start = || builder(&mock).dir(data.path().to_path_buf()).start();
    let mut airlock = start().await.unwrap();
    let (quota_id, quota) = session(&airlock, json!({"max_requests": 300})).await;
    let (denied_id, denied) = session(&airlock, json!({"max_denied": 5})).await;
    for _ in 0..4 {
        assert_eq!(get(&airlock, "/openai/v1/other", &denied).await, 403);
    }
    // The denials reach the database at once (polled there, not slept on).
    let db = data.path().join("airlock.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let stored = async |conn: &mut sqlx::SqliteConnection, column: &str, id: &str| -> i64 {
        sqlx::query_scalar(&format!("SELECT {column} FROM sessions WHERE id = ?"))
            .bind(id)
            .fetch_one(conn)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored(&mut conn, "denied", &denied_id).await != 4 {
        assert!(tokio::time::Instant::now() < deadline, "denials not stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut allowed = 0;
    for i in 0..120 {
        if get(&airlock, &format!("/openai/v1/calls/{i}"), &quota).await == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 120);
    // A listing without `limit` holds them all (1000 by default): a client
    // that does not page sees a small trail whole.
    let listed = audit_records(&airlock, "").await;
    assert!(listed.len() > 120, "{} records listed", listed.len());
    // Every call let through is covered by a reservation in the database.
    let reserved = stored(&mut conn, "reserved", &quota_id).await;
    assert!((120..=300).contains(&reserved), "reserved {reserved}");
    conn.close().await.unwrap();
    airlock.kill();

    let airlock = start().await.unwrap();
    loop {
        match get(
            &airlock,
            &format!("/openai/v1/calls/after-{allowed}"),
            &quota,
        )
        .await
        {
            200 => allowed += 1,
            429 => break,
            other => panic!("unexpected {other}"),
        }
        assert!(allowed <= 300, "more calls than max_requests allowed");
    }
    // What the killed process had leased and not used is lost, never more
    // than an eighth of what was left at each grant.
    assert!(allowed > 250, "{allowed} of 300");
    let (_, shown) = airlock
        .admin("GET", &format!("/v1/sessions/{quota_id}"), None)
        .await
        .unwrap();
    assert_eq!(shown["state"], "active", "{shown}");

    assert_eq!(get(&airlock, "/openai/v1/other", &denied).await, 403);
    assert_eq!(
        get(&airlock, "/openai/v1/calls/x", &denied).await,
        401,
        "the fifth denial, the first after the restart, reaches max_denied"
    );
}

#[tokio::test]
async fn fail_closed_refuses_calls_while_the_store_cannot_be_written() {
    let mock = MockProvider::start().await;
    let airlock = builder(&mock)
        .config("[audit]\nfail_closed = true\nstall_timeout = \"300ms\"\n")
        .config("[sessions]\nmax_calls_in_flight = 64\n")
        .start()
        .await
        .unwrap();
    let (id, token) = session(&airlock, json!({})).await;
    let url = |n: &str| format!("{}/openai/v1/calls/{n}", airlock.proxy_url());
    assert_eq!(try_get(&url("before"), &token).await.unwrap().0, 200);

    // Another process takes the database's write lock and keeps it.
    let locker = airlock.lock_store(true).await;

    // The call in flight when the store stopped taking writes is answered:
    // its record is in the audit journal, which moves into the database
    // once it can. The journal takes records only while a move into the
    // database has run for less than 2 s; from then on calls are
    // refused and the provider sees nothing.
    let (status, body) = try_get(&url("in-flight"), &token).await.unwrap();
    assert_eq!(status, 200, "{body:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = try_get(&url("probe"), &token).await.unwrap();
        if status == 503 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "gate never closed");
    }
    let seen = mock.request_count();
    for n in 0..5 {
        let (status, body) = try_get(&url(&format!("refused-{n}")), &token)
            .await
            .unwrap();
        assert_eq!(status, 503);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "audit_unavailable");
    }
    assert_eq!(
        mock.request_count(),
        seen,
        "refused calls reached the provider"
    );
    // Refusals at the gate are counted under the provider the path names;
    // only a path naming none is `_unknown`.
    let unknown = request(
        "GET",
        &format!("{}/nope/v1/x", airlock.proxy_url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(unknown.status, 503, "{}", unknown.text());
    // Refused at the gate, it still carries its id for the SDKs.
    let call_id = unknown.headers["x-request-id"].to_str().unwrap();
    assert!(call_id.starts_with("airlock_"), "{call_id}");
    assert_eq!(unknown.headers["request-id"], call_id);
    let (_, metrics) = airlock.admin("GET", "/metrics", None).await.unwrap();
    let metrics = metrics.as_str().unwrap();
    let count = |provider: &str| {
        let series = format!(
            "airlock_proxy_calls_total{{provider=\"{provider}\",decision=\"audit_unavailable\"}} "
        );
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str())?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The probes until the gate closed (one at least) and the five.
    assert!(count("openai") >= 6, "{metrics}");
    assert_eq!(count("_unknown"), 1, "{metrics}");
    // Readiness says so, for a load balancer to send calls elsewhere.
    let readyz_url = format!("{}/readyz", airlock.admin_url());
    let readyz = || request("GET", &readyz_url, &[], "");
    let not_ready = readyz().await;
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["status"], "audit_unavailable");
    // And so does `airlock status`, exit 1.
    let elsewhere = tempfile::tempdir().unwrap();
    let status = remote_cli(&airlock, elsewhere.path(), &["status"]);
    assert_eq!(status.status.code(), Some(1), "{status:?}");
    let shown = stdout(&status);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "server:     {}: not ready: the audit trail cannot be written, so every call is \
             refused (fail_closed)",
            airlock.admin_url()
        ),
        "{shown}"
    );
    // The process: its version, uptime, store and audit settings.
    let process = format!("            airlock {}, up ", env!("CARGO_PKG_VERSION"));
    assert!(lines[1].starts_with(&process), "{shown}");
    assert!(
        lines[1].ends_with(", store sqlite, audit on (fail closed), 64 calls in flight a session"),
        "{shown}"
    );
    assert_eq!(
        lines[2..].join("\n"),
        "providers:  2\n  dead    env:AIRLOCK_TEST_CRED_DEAD, available\n  openai  \
         env:AIRLOCK_TEST_CRED_OPENAI, available\nsessions:   1 active session",
        "{shown}"
    );

    // The lock goes away: airlock recovers by itself.
    locker.release().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = try_get(&url("after"), &token).await.unwrap();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
    }
    assert_eq!(readyz().await.status, 200);
    let status = remote_cli(&airlock, elsewhere.path(), &["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let shown: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(shown["ready"], true, "{shown}");
    assert_eq!(shown["status"], "ready", "{shown}");
    assert_eq!(shown["active_sessions"], 1, "{shown}");
    assert_eq!(shown["providers"][1]["name"], "openai", "{shown}");
    assert_eq!(shown["providers"][1]["set"], true, "{shown}");
    assert_eq!(shown["server"]["store"], "sqlite", "{shown}");
    assert_eq!(shown["server"]["audit"]["fail_closed"], true, "{shown}");
    assert_eq!(
        shown["server"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{shown}"
    );
    let (_, verdict) = airlock
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    // Every refused call has its record, written once the store took
    // writes again (flagged `written_late` when a commit of it failed
    // first; the record says what the agent got either way).
    // (The calls until the gate closed, two seconds of them, come first.)
    let records = audit_records(&airlock, "?limit=10000").await;
    let in_flight = records
        .iter()
        .find(|r| r["path"] == "/openai/v1/calls/in-flight")
        .unwrap_or_else(|| panic!("no record of the call in flight: {records:?}"));
    assert_eq!(in_flight["status"], 200, "{in_flight}");
    for n in 0..5 {
        let path = format!("/openai/v1/calls/refused-{n}");
        let record = records
            .iter()
            .find(|r| r["path"] == path.as_str())
            .unwrap_or_else(|| panic!("no record of {path}: {records:?}"));
        assert_eq!(record["decision"], "audit_unavailable", "{record}");
        assert_eq!(record["status"], 503, "{record}");
        assert_eq!(record["provider"], "openai", "{record}");
        // The token is one this process knows: the record names its session.
        assert_eq!(record["session"], id.as_str(), "{record}");
    }
}

/// Opens a streamed GET and returns the response with its body unread.
async fn open_stream(url: &str, token: &str) -> http::Response<hyper::body::Incoming> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(req).await.unwrap()
}

/// Polls `/v1/audit` until a record for `path` shows up.
async fn record_for(airlock: &Airlock, path: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit_records(airlock, "?limit=10000").await;
        if let Some(r) = records.into_iter().find(|r| r["path"] == path) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no record for {path}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn streams_end_when_the_session_does_and_aborts_are_recorded() {
    let mock = MockProvider::start().await;
    let airlock = builder(&mock).start().await.unwrap();
    let scope =
        json!([{"provider": "openai", "methods": ["GET"], "paths": ["/gated-sse", "/sse"]}]);
    let created = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 600}))
        .await
        .unwrap();
    let (id, token) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    // The mock's base path is /v1 for agents; this provider maps /openai/X to /X.
    let url = format!("{}/openai/gated-sse", airlock.proxy_url());

    // Revoked mid-stream: the stream ends within the documented bound.
    let mut body = open_stream(&url, token).await.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    let (status, _) = airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let revoked_at = std::time::Instant::now();
    // airlock's closing error event, then the cut.
    let event = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    let took = revoked_at.elapsed();
    let event = event.unwrap().unwrap().into_data().unwrap();
    assert!(event.starts_with(b"event: error\n"), "{event:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(
        !matches!(end, Some(Ok(ref f)) if f.is_data()),
        "stream went on: {end:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "stream outlived its session by {took:?}"
    );
    let record = record_for(&airlock, "/openai/gated-sse").await;
    assert_eq!(record["decision"], "allow");
    assert_eq!(
        record["flags"],
        json!(["incomplete", "session_ended"]),
        "{record}"
    );

    // The agent goes away mid-stream: recorded as client_aborted.
    let created = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 600}))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    let before = mock.request_count();
    let mut body = open_stream(&url, token).await.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let aborted = loop {
        let records = audit_records(&airlock, "?limit=10000").await;
        let found = records
            .into_iter()
            .filter(|r| r["session"] == created["id"])
            .find(|r| {
                r["flags"]
                    .as_array()
                    .is_some_and(|f| f.contains(&json!("client_aborted")))
            });
        if let Some(r) = found {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no client_aborted record"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(aborted["status"], 200);
    assert_eq!(mock.request_count(), before + 1);
}

#[tokio::test]
async fn an_answer_whose_session_ends_before_it_goes_out_gets_a_clean_401() {
    let mock = MockProvider::start().await;
    let airlock = builder(&mock).start().await.unwrap();
    let scope = json!([{"provider": "openai", "methods": ["GET"], "paths": ["/gated-json"]}]);
    let created = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 600}))
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let url = format!("{}/openai/gated-json", airlock.proxy_url());

    // The provider sends a head of known length and holds its body back.
    let call = tokio::spawn(async move { try_get(&url, &token).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mock.request_count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Revoked before the body comes: nothing has gone out to the agent yet,
    // so it gets airlock's own 401 rather than a head and a cut body.
    let (status, _) = airlock
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    mock.open_gate();
    let (status, body) = call.await.unwrap().unwrap();
    assert_eq!(status, 401, "{body:?}");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_token");
    let record = record_for(&airlock, "/openai/gated-json").await;
    assert_eq!(
        record["flags"],
        json!(["incomplete", "session_ended"]),
        "{record}"
    );
    // The record says what the agent got, and what the provider answered.
    assert_eq!(record["decision"], "invalid_token", "{record}");
    assert_eq!(record["status"], 401, "{record}");
    assert_eq!(record["upstream_status"], 200, "{record}");
}

/// Runs `airlock ARGS...` in `dir` (its default store, `airlock.db`) with
/// `key` as the audit key.
fn cli_in(dir: &Path, key: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .current_dir(dir)
        .env("AIRLOCK_AUDIT_KEY", key)
        .output()
        .unwrap()
}

/// A record's `ts` is when its call ended, its seq is given at commit, so
/// `ts` steps back a millisecond now and then along a chain. `export
/// --since T` takes each chain from its first record at or after T on, so
/// that the file verifies on its own (it used to leave out a record of
/// T - 1 ms between two of T: "gap: record 4 is missing"); a session's
/// export, verified without `--session`, gets a hint.
#[tokio::test]
async fn an_export_since_a_time_verifies_when_ts_steps_back() {
    use airlock_core::audit::{head_seal, AuditKey, Flags, GENESIS_MAC};
    use airlock_store::ChainHead;

    let dir = tempfile::tempdir().unwrap();
    let key_hex = "cd".repeat(32);
    let key = AuditKey::new(&[0xcd; 32]);
    let store = airlock_store::open(&format!("sqlite://{}/airlock.db", dir.path().display()))
        .await
        .unwrap();
    let genesis = |chain| head_seal(&key, chain, 0, &GENESIS_MAC);
    let mut head = store.audit_claim_chain(&genesis).await.unwrap();
    let base = 1_767_225_600_000_i64; // 2026-01-01T00:00:00Z
                                      // Two batches; seq 4 ended 1 ms before seq 3, seq 6 before seq 5.
    for times in [&[0, 1, 3, 2, 4][..], &[3, 6, 5]] {
        let mut records = Vec::new();
        let mut prev = head.mac;
        for (i, t) in times.iter().enumerate() {
            let seq = head.seq + 1 + i as u64;
            let mut record = AuditRecord {
                chain: 0,
                seq: 0,
                ts_ms: base + t,
                session: Some(if seq % 2 == 1 { "ses_odd" } else { "ses_even" }.into()),
                provider: Some("openai".into()),
                method: "GET".into(),
                path: format!("/openai/v1/calls/{seq}"),
                decision: "allow".into(),
                status: 200,
                upstream_status: Some(200),
                duration_us: 1_000,
                bytes_in: 0,
                bytes_out: 10,
                flags: Flags::empty(),
                prev_mac: GENESIS_MAC,
                mac: GENESIS_MAC,
            };
            record.seal(&key, head.chain, seq, prev);
            prev = record.mac;
            records.push(record);
        }
        let seq = head.seq + times.len() as u64;
        let next = ChainHead {
            chain: head.chain,
            seq,
            mac: prev,
            seal: head_seal(&key, head.chain, seq, &prev),
        };
        store.audit_append(&records, &next).await.unwrap();
        head = next;
    }
    store.close().await;

    let file = dir.path().join("since.jsonl");
    let file_str = file.to_str().unwrap();
    let export = |args: &[&str]| {
        let out = cli_in(dir.path(), &key_hex, args);
        assert!(out.status.success(), "{out:?}");
        std::fs::write(&file, &out.stdout).unwrap();
        stdout(&out)
            .lines()
            .map(|l| AuditRecord::from_json(l).unwrap().seq)
            .collect::<Vec<_>>()
    };
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", "--from", file_str];
        args.extend_from_slice(extra);
        let out = cli_in(dir.path(), &key_hex, &args);
        (out.status.code(), stdout(&out))
    };
    for (since, seqs) in [
        ("2026-01-01T00:00:00.003Z", &[3, 4, 5, 6, 7, 8][..]),
        ("2026-01-01T00:00:00.004Z", &[5, 6, 7, 8]),
        ("2026-01-01T00:00:00.006Z", &[7, 8]),
    ] {
        assert_eq!(
            export(&["audit", "export", "--since", since]),
            seqs,
            "{since}"
        );
        let (code, summary) = verify(&[]);
        assert_eq!(code, Some(0), "--since {since}: {summary}");
    }
    // A session with --since: its records of the same run.
    assert_eq!(
        export(&[
            "audit",
            "export",
            "--session",
            "ses_odd",
            "--since",
            "2026-01-01T00:00:00.004Z"
        ]),
        [5, 7]
    );
    assert_eq!(verify(&["--session", "ses_odd"]).0, Some(0));
    let (code, said) = verify(&[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("gap: record 6 is missing"), "{said}");
    assert!(
        said.contains(
            "if the file is that session's export, whose seqs jump, verify it with --session \
             ses_odd"
        ),
        "{said}"
    );
    // A whole export of several sessions with a record cut out: no hint.
    let out = cli_in(dir.path(), &key_hex, &["audit", "export"]);
    let lines: Vec<String> = stdout(&out)
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| l.to_owned())
        .collect();
    write_lines(&file, &lines);
    let (code, said) = verify(&[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(!said.contains("--session"), "{said}");
}

/// The store remembers the audit key its trail was written with: a
/// restart with another key is refused before it writes or prints
/// anything (its records would never verify with the trail's), and the
/// right key starts again. A first start that fails on its audit key
/// leaves no admin token behind: the next start prints one.
#[tokio::test]
async fn serve_refuses_an_audit_key_other_than_the_trails() {
    let dir = tempfile::tempdir().unwrap();
    // A provider without its credential: a start that goes on warns of it.
    let start = |key: String| {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .env("AIRLOCK_AUDIT_KEY", &key)
            .env("AIRLOCK_ADMIN_TOKEN", "")
            .config(
                "[providers.nokey]\nupstream = \"http://127.0.0.1:9\"\n\
                 credential = \"env:AIRLOCK_TEST_UNSET_KEY\"\nenv_key = \"NOKEY_API_KEY\"\n\
                 env_base_url = \"NOKEY_BASE_URL\"\n",
            )
            .dir(dir.path().to_path_buf())
            .start()
    };
    let malformed = start("bad".to_owned()).await.unwrap_err().to_string();
    assert!(malformed.contains("loading the audit key"), "{malformed}");
    assert!(!malformed.contains("AIRLOCK_ADMIN_TOKEN="), "{malformed}");

    let mut first = start("ab".repeat(32)).await.unwrap();
    assert!(
        first.output().contains("AIRLOCK_ADMIN_TOKEN="),
        "the start that succeeds prints the token: {}",
        first.output()
    );
    assert!(
        first.output().contains("no credential available"),
        "{}",
        first.output()
    );
    first.terminate().await.unwrap();

    let refused = start("cd".repeat(32)).await.unwrap_err().to_string();
    assert!(
        refused.contains(
            "the audit key (AIRLOCK_AUDIT_KEY or [audit] key_file) is not the one this \
             store's audit trail was written with"
        ),
        "{refused}"
    );
    assert!(!refused.contains("no credential available"), "{refused}");
    // A start with the right key does not mention a missing file.
    assert!(!refused.contains("did not exist"), "{refused}");
    let mut again = start("ab".repeat(32)).await.unwrap();
    again.terminate().await.unwrap();
    let verify = |key: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["audit", "verify"])
            .current_dir(dir.path())
            .env("AIRLOCK_AUDIT_KEY", key)
            .output()
            .unwrap()
    };
    let verified = verify("ab".repeat(32));
    assert!(verified.status.success(), "{verified:?}");
    // With another key every record would look forged: the store knows
    // the trail's key, so that is a misconfiguration (exit 2), not
    // tampering (exit 1).
    let wrong = verify("cd".repeat(32));
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    assert!(
        said.contains(
            "the audit key (AIRLOCK_AUDIT_KEY or [audit] key_file) is not the one this store's \
             audit trail was written with, so nothing was verified"
        ),
        "{said}"
    );
    assert!(wrong.stdout.is_empty(), "{wrong:?}");
    // The check value sits in the store verify distrusts: altered, the
    // chain's head (sealed with the right key) tells, and the trail is
    // reported broken (exit 1), not the key wrong.
    execute_sqlite(
        &dir.path().join("airlock.db"),
        &format!(
            "UPDATE settings SET value = '{}' WHERE key = 'audit_key_check'",
            "00".repeat(32)
        ),
    )
    .await
    .unwrap();
    let altered = verify("ab".repeat(32));
    assert_eq!(altered.status.code(), Some(1), "{altered:?}");
    assert!(
        String::from_utf8_lossy(&altered.stdout)
            .contains("the store's audit key check value was altered"),
        "{altered:?}"
    );
    // Another key still seals no head: exit 2.
    assert_eq!(verify("cd".repeat(32)).status.code(), Some(2));
}

/// Unix ms now.
fn unix_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A time strictly after every record written so far: the wall clock's
/// next millisecond, waited for (records carry milliseconds).
fn next_ms_after_now() -> i64 {
    let t = unix_ms() + 1;
    while unix_ms() < t {
        std::hint::spin_loop();
    }
    t
}

/// `airlock audit prune --before T` removes the records that ended before
/// T while the server runs and keeps the rest verifiable, through the CLI,
/// the admin API and an export; removing anything else, or moving or
/// dropping the sealed floor, still breaks the trail; a trail that does
/// not verify is not pruned.
#[tokio::test]
async fn pruning_keeps_the_rest_verifiable_and_tampering_still_shows() {
    let mock = MockProvider::start().await;
    let mut airlock = builder(&mock).start().await.unwrap();
    let (_, token) = session(&airlock, json!({})).await;
    for n in 1..=5 {
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), &token).await,
            200
        );
    }
    let before = next_ms_after_now();
    for n in 6..=8 {
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), &token).await,
            200
        );
    }
    let config = airlock.config_path();
    let before_arg = airlock_core::audit::format_ts(before);

    // A cut in the future (a mistyped year) is refused, even for a dry
    // run, and changes nothing.
    let future = airlock_core::audit::format_ts(unix_ms() + 3_600_000);
    for args in [
        &["audit", "prune", "--before", &future][..],
        &["audit", "prune", "--before", &future, "--dry-run"],
    ] {
        let out = cli(&config, args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is in the future"), "{err}");
    }
    assert_eq!(audit_records(&airlock, "?limit=100").await.len(), 8);

    // A dry run changes nothing.
    let out = cli(
        &config,
        &["audit", "prune", "--before", &before_arg, "--dry-run"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!(
            "chain 1: would remove records 1–5 (5 records); it would start at record 6\n\
             would remove 5 records that ended before {before_arg} (dry run: nothing changed)\n"
        )
    );
    assert_eq!(audit_records(&airlock, "?limit=100").await.len(), 8);

    // A follower that read records 1 and 2 before the prune.
    let (_, first_page) = airlock
        .admin("GET", "/v1/audit?limit=2", None)
        .await
        .unwrap();
    let behind = first_page["next"].as_str().unwrap().to_owned();

    // While the server runs.
    let out = cli(
        &config,
        &["audit", "prune", "--before", &before_arg, "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let pruned: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        pruned,
        json!({"before": before_arg, "dry_run": false, "records": 5,
               "chains": [{"chain": 1, "first_seq": 1, "last_seq": 5, "records": 5}]})
    );
    let seqs: Vec<u64> = audit_records(&airlock, "?limit=100")
        .await
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [6, 7, 8]);
    // Coming back, the follower is told what it missed, and goes on.
    let (_, page) = airlock
        .admin("GET", &format!("/v1/audit?after={behind}"), None)
        .await
        .unwrap();
    assert_eq!(
        page["pruned"],
        json!([{"chain": 1, "missed_from": 3, "first_seq": 6}]),
        "{page}"
    );
    assert_eq!(page["records"][0]["seq"], 6, "{page}");
    let resume = page["resume"].as_str().unwrap().to_owned();
    let (_, page) = airlock
        .admin("GET", &format!("/v1/audit?after={resume}"), None)
        .await
        .unwrap();
    assert!(page.get("pruned").is_none(), "{page}");
    // The server goes on appending to the pruned chain.
    assert_eq!(get(&airlock, "/openai/v1/calls/9", &token).await, 200);
    let (_, verdict) = airlock
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(
        verdict,
        json!({"ok": true, "records": 4, "chains": 1,
               "pruned": [{"chain": 1, "first_seq": 6}]})
    );
    // Nothing older left: a second prune removes nothing.
    let out = cli(&config, &["audit", "prune", "--before", &before_arg]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("nothing to prune"), "{out:?}");
    // An export of the pruned trail verifies on its own.
    let exported = stdout(&cli(&config, &["audit", "export"]));
    let file = airlock.dir().join("pruned.jsonl");
    std::fs::write(&file, &exported).unwrap();
    let out = cli(
        &config,
        &["audit", "verify", "--from", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");

    airlock.terminate().await.unwrap();
    let out = cli(&config, &["audit", "verify"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "audit trail intact: 4 records in 1 chain (older records pruned: chain 1 from record 6)\n"
    );

    let db = airlock.dir().join("airlock.db");
    let backup = Backup::take(&db);
    let cases = [
        (
            "the floor dropped",
            "DELETE FROM audit_floors",
            "first bad record is seq 6 of chain 1: gap: record 1 is missing",
        ),
        (
            "the floor moved on, its seal kept",
            "UPDATE audit_floors SET seq = 6",
            "first bad record is seq 7 of chain 1: bad floor",
        ),
        (
            "the floor's seal replaced",
            "UPDATE audit_floors SET seal = mac",
            "first bad record is seq 6 of chain 1: bad floor",
        ),
        (
            "the first record after the floor removed too",
            "DELETE FROM audit_batches WHERE first_seq = 6",
            "first bad record is seq 7 of chain 1: gap: record 6 is missing",
        ),
    ];
    for (what, sql, named) in cases {
        execute_sqlite(&db, sql).await.unwrap();
        let out = cli(&config, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        assert!(stdout(&out).contains(named), "{what}: {out:?}");
        backup.restore();
    }
    // A chain started from its sealed floor and broken later is still
    // listed as pruned.
    execute_sqlite(&db, "DELETE FROM audit_batches WHERE first_seq = 7")
        .await
        .unwrap();
    let out = cli(&config, &["audit", "verify", "--json"]);
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (&verdict["ok"], &verdict["pruned"]),
        (&json!(false), &json!([{"chain": 1, "first_seq": 6}])),
        "{verdict}"
    );
    backup.restore();

    // A trail that does not verify is left as it is.
    execute_sqlite(&db, "DELETE FROM audit_batches WHERE first_seq = 7")
        .await
        .unwrap();
    let out = cli(&config, &["audit", "prune", "--before", "0s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("seq 8 of chain 1: gap: record 7 is missing")
            && stderr.contains("nothing was pruned"),
        "{stderr}"
    );
    let out = cli(&config, &["audit", "export"]);
    assert_eq!(stdout(&out).lines().count(), 3, "{out:?}");
}

/// Deleting a chain's sealed head does not hide the chain: `audit verify`
/// names it (its records could otherwise be edited unseen), and `serve`
/// refuses to start on it rather than start the chain again at seq 1 and
/// refuse every call (round 33).
#[tokio::test]
async fn a_chain_whose_head_was_deleted_is_named_and_not_resumed() {
    let mock = MockProvider::start().await;
    let mut airlock = builder(&mock).start().await.unwrap();
    let (_, token) = session(&airlock, json!({})).await;
    for n in 1..=3 {
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), &token).await,
            200
        );
    }
    airlock.terminate().await.unwrap();
    let config = airlock.config_path();
    let db = airlock.dir().join("airlock.db");
    execute_sqlite(&db, "DELETE FROM audit_chains")
        .await
        .unwrap();

    let out = cli(&config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout(&out).starts_with(
            "audit trail broken: first bad record is seq 1 of chain 1: no head: the chain's \
             records are stored but its sealed head is gone"
        ),
        "{out:?}"
    );
    let out = cli(&config, &["audit", "verify", "--json"]);
    let verdict: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (&verdict["ok"], &verdict["chain"], &verdict["first_bad"]),
        (&json!(false), &json!(1), &json!(1))
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("audit chain 1") && stderr.contains("its sealed head is gone"),
        "{stderr}"
    );
}

/// A local `audit tail` that fell behind a prune (here: stopped while the
/// records it had not read were pruned) says on stderr what it missed, and
/// follows on from the floor.
#[tokio::test]
async fn a_local_tail_behind_a_prune_is_told() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mock = MockProvider::start().await;
    let airlock = builder(&mock).start().await.unwrap();
    let (_, token) = session(&airlock, json!({})).await;
    assert_eq!(get(&airlock, "/openai/v1/calls/1", &token).await, 200);
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(airlock.config_path())
        .args(["audit", "tail", "-n", "1"])
        .env_remove("AIRLOCK_AUDIT_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(tail.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("\"seq\":1,"), "{line}");
    // It has read up to record 1: stopped there, it falls behind.
    let pid = tail.id().unwrap().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    for n in 2..=4 {
        assert_eq!(
            get(&airlock, &format!("/openai/v1/calls/{n}"), &token).await,
            200
        );
    }
    let out_of_prune = cli(
        &airlock.config_path(),
        &["audit", "prune", "--before", "0s"],
    );
    assert!(out_of_prune.status.success(), "{out_of_prune:?}");
    signal("-CONT");

    let told = tokio::time::timeout(Duration::from_secs(10), err.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        told,
        "airlock: chain 1: records 2–3 were pruned (`airlock audit prune`) before they were \
         read; following on from record 4"
    );
    let line = tokio::time::timeout(Duration::from_secs(10), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("\"seq\":4,"), "{line}");
}
