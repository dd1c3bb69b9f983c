//! The Store contract, one suite run against SQLite and PostgreSQL, plus
//! what only a shared (PostgreSQL) store does: migrations under concurrent
//! starts, the change feed, limits across processes, one audit chain per
//! writer.
//!
//! Each PostgreSQL test gets its own fresh database (`airlock_testkit::pg`);
//! without a reachable server they skip loudly, or fail when `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_core::audit::{
    floor_seal, head_seal, AuditKey, AuditRecord, ChainVerifier, Flags, MacBytes, GENESIS_MAC,
};
use airlock_core::token::generate_token;
use airlock_core::{Limits, SessionId, TokenHash};
use airlock_store::{
    open, AuditQuery, ChainHead, Change, SessionKey, SessionPage, SessionRow, Store, StoreError,
};
use airlock_testkit::pg::{self, FreshDb};
use sqlx::Connection;

/// A database to open stores on, and what keeps it alive.
struct Backend {
    url: String,
    pg: Option<FreshDb>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn sqlite() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        Some(Self {
            url: format!("sqlite://{}/store.db", dir.path().display()),
            pg: None,
            _dir: Some(dir),
        })
    }

    async fn postgres() -> Option<Self> {
        let db = pg::fresh_database().await?;
        Some(Self {
            url: db.url().to_owned(),
            pg: Some(db),
            _dir: None,
        })
    }

    async fn open(&self) -> Arc<dyn Store> {
        open(&self.url).await.unwrap()
    }

    /// Whether another connection reaches the same database (not so for
    /// an in-memory SQLite database).
    fn shared_with_other_connections(&self) -> bool {
        !self.url.contains(":memory:")
    }

    /// Runs `sql` (one or more statements) on the database.
    async fn execute(&self, sql: &str) {
        match &self.pg {
            Some(db) => db.execute(sql).await,
            None => {
                let mut conn = self.sqlite_connection().await;
                sqlx::raw_sql(sql)
                    .execute(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                conn.close().await.unwrap();
            }
        }
    }

    /// The first column of the first row of `sql`, as a number.
    async fn scalar(&self, sql: &str) -> i64 {
        match &self.pg {
            Some(db) => db.scalar_i64(sql).await,
            None => {
                let mut conn = self.sqlite_connection().await;
                let value = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
                conn.close().await.unwrap();
                value
            }
        }
    }

    /// Whether the database has a table called `name`.
    async fn has_table(&self, name: &str) -> bool {
        let sql = if self.pg.is_some() {
            format!("SELECT count(*) FROM pg_tables WHERE tablename = '{name}'")
        } else {
            format!("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{name}'")
        };
        self.scalar(&sql).await > 0
    }

    /// Brings the schema up to migration `version` only, as an older
    /// airlock left it.
    async fn migrate_to(&self, version: i64) {
        match &self.pg {
            Some(db) => {
                let mut conn = db.connect().await;
                airlock_store::postgres_migrator_up_to(version)
                    .run_direct(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
            }
            None => {
                let mut conn = self.sqlite_connection().await;
                airlock_store::sqlite_migrator_up_to(version)
                    .run_direct(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
            }
        }
    }

    async fn sqlite_connection(&self) -> sqlx::SqliteConnection {
        sqlx::SqliteConnection::connect(&format!("{}?mode=rwc", self.url))
            .await
            .unwrap()
    }

    /// A blob literal in the database's SQL.
    fn blob(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if self.pg.is_some() {
            format!("decode('{hex}', 'hex')")
        } else {
            format!("X'{hex}'")
        }
    }
}

/// Instantiates every case for both backends.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let backend = crate::Backend::sqlite().await.unwrap();
                    crate::cases::$case(&backend).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(backend) = crate::Backend::postgres().await {
                        crate::cases::$case(&backend).await;
                    }
                }
            )*
        }
    };
}

suite!(
    sessions_round_trip_and_survive_reopen,
    settings_are_set_once,
    call_counts_add_up,
    session_statuses_read_many,
    audit_records_read_back_by_chain_time_and_session,
    audit_queries_cross_batches,
    audit_append_refuses_a_moved_head,
    audit_ts_max_never_steps_back,
    audit_since_is_a_contiguous_run_of_seqs,
    audit_append_is_all_or_nothing,
    audit_append_fails_once_closed,
    audit_claim_resumes_the_chain,
    audit_probe_writes,
    a_trail_of_the_old_format_is_moved_into_batches,
    an_unreadable_old_row_is_kept_aside,
    sessions_are_listed_a_page_at_a_time,
    active_sessions_are_listed_a_page_at_a_time,
    session_pages_walk_the_creation_index,
    audit_prune_removes_in_steps_and_seals_the_floor,
    audit_prune_stops_at_a_missing_batch,
);

#[tokio::test]
async fn unsupported_urls_are_refused() {
    for url in ["mysql://x", "postgre://x", "x"] {
        let err = open(url).await.err().unwrap().to_string();
        assert!(err.contains("unsupported store url"), "{err}");
    }
}

fn session(created_at: i64, expires_at: i64, limits: Limits) -> (String, SessionRow) {
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
        limits,
        labels: BTreeMap::from([("agent".to_owned(), "a1".to_owned())]),
        allowed: 0,
        denied: 0,
    };
    (token.expose().to_owned(), row)
}

fn max_denied(n: u64) -> Limits {
    Limits {
        max_denied: Some(n),
        ..Limits::default()
    }
}

fn key() -> AuditKey {
    AuditKey::new(&[7; 32])
}

fn genesis(chain: u32) -> [u8; 32] {
    head_seal(&key(), chain, 0, &GENESIS_MAC)
}

/// `n` records sealed after `head`, and the head after them.
fn records_after(
    head: &ChainHead,
    n: u64,
    ts_ms: i64,
    session: &str,
) -> (Vec<AuditRecord>, ChainHead) {
    let times: Vec<i64> = (1..=n).map(|i| ts_ms + i64::try_from(i).unwrap()).collect();
    records_at(head, &times, session)
}

/// Records sealed after `head` with the times `times` (odd ones of the
/// batch naming `session`), and the head after them.
fn records_at(head: &ChainHead, times: &[i64], session: &str) -> (Vec<AuditRecord>, ChainHead) {
    let key = key();
    let mut prev = head.mac;
    let mut out = Vec::new();
    let n = times.len() as u64;
    for (i, &ts_ms) in (1..=n).zip(times) {
        let mut record = AuditRecord {
            chain: 0,
            seq: 0,
            ts_ms,
            session: (i % 2 == 1).then(|| session.into()),
            provider: Some("openai".into()),
            method: "POST".into(),
            path: "/openai/v1/chat/completions".to_owned(),
            decision: if i % 3 == 0 { "out_of_scope" } else { "allow" }.into(),
            status: 200,
            upstream_status: (i % 3 != 0).then_some(200),
            duration_us: 1_000 * i,
            bytes_in: 10 * i,
            bytes_out: 100 * i,
            flags: if i == 2 {
                Flags::CLIENT_ABORTED
            } else {
                Flags::empty()
            },
            prev_mac: GENESIS_MAC,
            mac: GENESIS_MAC,
        };
        record.seal(&key, head.chain, head.seq + i, prev);
        prev = record.mac;
        out.push(record);
    }
    let seq = head.seq + n;
    let new_head = ChainHead {
        chain: head.chain,
        seq,
        mac: prev,
        seal: head_seal(&key, head.chain, seq, &prev),
    };
    (out, new_head)
}

/// The head of chain `chain` before its first record.
fn empty_chain(chain: u32) -> ChainHead {
    ChainHead {
        chain,
        seq: 0,
        mac: GENESIS_MAC,
        seal: genesis(chain),
    }
}

/// Checks that `records` verify as a whole chain, from its start, ending
/// at the sealed `head`.
fn assert_verifies(records: &[AuditRecord], head: &ChainHead) {
    let key = key();
    let mut verifier = ChainVerifier::from_start(&key);
    for (i, record) in records.iter().enumerate() {
        verifier.check(record, records.get(i + 1)).unwrap();
    }
    verifier
        .check_head(head.chain, head.seq, &head.mac, &head.seal)
        .unwrap();
}

fn by_chain(chain: u32, after_seq: u64) -> AuditQuery {
    AuditQuery {
        chain: Some(chain),
        after_seq,
        limit: 1_000,
        ..AuditQuery::default()
    }
}

/// Appends `good` (moving `head1` on to `head2`) while a session index row
/// is in the way, so that the database refuses the batch after its head
/// update: the head stays, nothing of the batch is written.
async fn refused_after_the_head_moved(
    backend: &Backend,
    store: &dyn Store,
    head1: &ChainHead,
    good: &[AuditRecord],
    head2: &ChainHead,
    first: &[AuditRecord],
) {
    let in_the_way = format!(
        "INSERT INTO audit_batch_sessions (session, chain, first_seq) VALUES ('ses_b', {}, {})",
        head1.chain,
        head1.seq + 1
    );
    backend.execute(&in_the_way).await;
    let err = store.audit_append(good, head2).await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err}");
    assert_eq!(store.audit_heads().await.unwrap(), vec![head1.clone()]);
    assert_eq!(
        store
            .audit_records(&by_chain(head1.chain, 0))
            .await
            .unwrap(),
        first
    );
    assert_eq!(
        backend.scalar("SELECT count(*) FROM audit_batches").await,
        1
    );
    backend
        .execute("DELETE FROM audit_batch_sessions WHERE session = 'ses_b'")
        .await;
}

/// Leaves `backend`'s database in the format before batches (migrations 1
/// to 3), holding each chain's records and head, as the old airlock wrote
/// them.
async fn old_format_trail(backend: &Backend, chains: &[(&[AuditRecord], &ChainHead)]) {
    backend.migrate_to(3).await;
    let text = |value: Option<&str>| value.map_or("NULL".to_owned(), |v| format!("'{v}'"));
    let mut sql = String::new();
    for (records, head) in chains {
        let rows: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "({}, {}, {}, {}, {}, '{}', '{}', '{}', {}, {}, {}, {}, {}, {}, {}, {})",
                    r.chain,
                    r.seq,
                    r.ts_ms,
                    text(r.session.as_deref()),
                    text(r.provider.as_deref()),
                    r.method,
                    r.path,
                    r.decision,
                    r.status,
                    r.upstream_status
                        .map_or("NULL".to_owned(), |s| s.to_string()),
                    r.duration_us,
                    r.bytes_in,
                    r.bytes_out,
                    r.flags.bits(),
                    backend.blob(&r.prev_mac),
                    backend.blob(&r.mac),
                )
            })
            .collect();
        sql.push_str(&format!(
            "INSERT INTO audit_chains (id, head_seq, head_mac, head_seal, created_at) \
             VALUES ({}, {}, {}, {}, 0); \
             INSERT INTO audit_records (chain, seq, ts, session, provider, method, path, \
             decision, status, upstream_status, duration_us, bytes_in, bytes_out, flags, \
             prev_mac, mac) VALUES {};",
            head.chain,
            head.seq,
            backend.blob(&head.mac),
            backend.blob(&head.seal),
            rows.join(", ")
        ));
    }
    backend.execute(&sql).await;
}

/// Waits (up to `limit`) for a change matching `want`, skipping others.
async fn next_change(
    rx: &mut tokio::sync::broadcast::Receiver<Change>,
    limit: Duration,
    want: impl Fn(&Change) -> bool,
) -> Option<Change> {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(change) if want(&change) => return Some(change),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The listing order: newest first, then by id, bytewise, descending.
fn listing_order(rows: &mut [SessionRow]) {
    rows.sort_by(|a, b| (b.created_at, b.id.as_str()).cmp(&(a.created_at, a.id.as_str())));
}

fn ids(rows: &[SessionRow]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

/// Every page of `limit` rows, from `after` on, until an empty one.
async fn all_pages(
    store: &dyn Store,
    include_ended: bool,
    now_ms: i64,
    limit: u32,
) -> Vec<Vec<SessionRow>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_sessions_page(&SessionPage {
                include_ended,
                now_ms,
                after: after.clone(),
                limit,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else {
            return pages;
        };
        assert!(
            page.len() <= limit as usize,
            "{} rows for {limit}",
            page.len()
        );
        // Every row comes after the cursor: a page never repeats one.
        if let Some(after) = &after {
            for row in &page {
                assert!(
                    SessionKey::of(row).comes_after(after),
                    "{row:?} after {after:?}"
                );
            }
        }
        assert!(pages.len() < 100, "no end of pages");
        after = Some(SessionKey::of(last));
        pages.push(page);
    }
}

/// The cases both backends must pass.
mod cases {
    use super::*;

    /// Pruning removes, in steps, every batch before the first whose
    /// `ts_max` reaches the cut (their session index rows too: a session's
    /// records still read back), seals the last record removed as the
    /// chain's floor, and never removes the chain's last batch; a dry run
    /// says the same and changes nothing.
    pub async fn audit_prune_removes_in_steps_and_seals_the_floor(backend: &Backend) {
        let store = backend.open().await;
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let chain = head.chain;
        let mut all = Vec::new();
        // 600 batches of two records 10 ms apart, each batch's first one
        // naming a session: more batches than two steps remove.
        for batch in 0..600_i64 {
            let session = if batch % 2 == 0 {
                "ses_even"
            } else {
                "ses_odd"
            };
            let (records, next) = records_after(&head, 2, 1_000 + batch * 10, session);
            store.audit_append(&records, &next).await.unwrap();
            all.extend(records);
            head = next;
        }
        let key = key();
        let seal = |chain: u32, seq: u64, mac: &MacBytes| floor_seal(&key, chain, seq, mac);
        // Batches 0 to 549 end before this (records 1 to 1,100).
        let before = 1_000 + 550 * 10;
        let floor = airlock_store::ChainFloor {
            chain,
            seq: 1_100,
            mac: all[1_099].mac,
            seal: floor_seal(&key, chain, 1_100, &all[1_099].mac),
            pruned_at_ms: 42,
        };
        let expected = vec![airlock_store::Pruned {
            chain,
            first_seq: 1,
            records: 1_100,
            floor: floor.clone(),
        }];
        assert_eq!(
            store.audit_prune(before, &seal, 42, true).await.unwrap(),
            expected
        );
        assert!(store.audit_floors().await.unwrap().is_empty());
        assert_eq!(
            store
                .audit_records(&by_chain(chain, 0))
                .await
                .unwrap()
                .len(),
            1_000
        );

        assert_eq!(
            store.audit_prune(before, &seal, 42, false).await.unwrap(),
            expected
        );
        assert_eq!(store.audit_floors().await.unwrap(), vec![floor.clone()]);
        let left = store.audit_records(&by_chain(chain, 0)).await.unwrap();
        assert_eq!(left.len(), 100);
        assert_eq!(left[0].seq, 1_101);
        let mut verifier = ChainVerifier::from_start(&key);
        verifier
            .start_after(chain, floor.seq, &floor.mac, &floor.seal)
            .unwrap();
        for (i, record) in left.iter().enumerate() {
            verifier.check(record, left.get(i + 1)).unwrap();
        }
        verifier
            .check_head(chain, head.seq, &head.mac, &head.seal)
            .unwrap();
        let even = store
            .audit_records(&AuditQuery {
                session: Some("ses_even".to_owned()),
                ..by_chain(chain, 0)
            })
            .await
            .unwrap();
        assert_eq!(even.len(), 25);
        assert!(store.audit_headless_chains().await.unwrap().is_empty());

        // Nothing more ended before that time; everything else but the
        // last batch (records 1,199 and 1,200) ended before the end of time.
        assert!(store
            .audit_prune(before, &seal, 43, false)
            .await
            .unwrap()
            .is_empty());
        let rest = store.audit_prune(i64::MAX, &seal, 44, false).await.unwrap();
        assert_eq!(
            (rest[0].first_seq, rest[0].records, rest[0].floor.seq),
            (1_101, 98, 1_198)
        );
        let left = store.audit_records(&by_chain(chain, 0)).await.unwrap();
        assert_eq!(
            left.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1_199, 1_200]
        );
        let odd = store
            .audit_records(&AuditQuery {
                session: Some("ses_odd".to_owned()),
                ..by_chain(chain, 0)
            })
            .await
            .unwrap();
        assert_eq!(odd.iter().map(|r| r.seq).collect::<Vec<_>>(), [1_199]);
        store.close().await;
    }

    /// A batch missing in the middle of what a prune would remove (the
    /// trail damaged after it verified) stops the prune before it removes
    /// anything: pruning would hide the gap.
    pub async fn audit_prune_stops_at_a_missing_batch(backend: &Backend) {
        let store = backend.open().await;
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let chain = head.chain;
        for batch in 0..10_i64 {
            let (records, next) = records_after(&head, 1, 1_000 + batch * 10, "ses_a");
            store.audit_append(&records, &next).await.unwrap();
            head = next;
        }
        backend
            .execute(&format!(
                "DELETE FROM audit_batches WHERE chain = {chain} AND first_seq = 5"
            ))
            .await;
        let key = key();
        let seal = |chain: u32, seq: u64, mac: &MacBytes| floor_seal(&key, chain, seq, mac);
        let err = store
            .audit_prune(i64::MAX, &seal, 1, false)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnreadableAudit { seq: 5, .. }),
            "{err:?}"
        );
        assert!(store.audit_floors().await.unwrap().is_empty());
        assert_eq!(
            backend.scalar("SELECT COUNT(*) FROM audit_batches").await,
            9
        );
        store.close().await;
    }

    pub async fn sessions_round_trip_and_survive_reopen(backend: &Backend) {
        let store = backend.open().await;
        let (token, a) = session(1_000, 10_000, max_denied(3));
        let (_, b) = session(2_000, 3_000, Limits::default());
        store.insert_session(&a).await.unwrap();
        store.insert_session(&b).await.unwrap();
        assert!(
            store.insert_session(&a).await.is_err(),
            "ids and token hashes are unique"
        );

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
        assert!(store
            .session_by_id(&SessionId::generate())
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
        assert!(
            store.revoke_session(&b.id, 6_000).await.unwrap(),
            "b exists"
        );
        store.close().await;

        let store = backend.open().await;
        let b2 = store.session_by_id(&b.id).await.unwrap().unwrap();
        assert_eq!(b2.revoked_at, None, "an expired session stays expired");
        let a2 = store.session_by_id(&a.id).await.unwrap().unwrap();
        assert_eq!((a2.allowed, a2.denied), (5, 2));
        assert_eq!(a2.revoked_at, Some(6_000), "first revocation time is kept");
        assert_eq!(a2.limits, a.limits);
        assert!(store.list_sessions(false, 5_000).await.unwrap().is_empty());
        store.close().await;
    }

    pub async fn settings_are_set_once(backend: &Backend) {
        let store = backend.open().await;
        assert_eq!(store.setting("k").await.unwrap(), None);
        assert_eq!(store.set_setting_if_absent("k", "v1").await.unwrap(), "v1");
        assert_eq!(store.set_setting_if_absent("k", "v2").await.unwrap(), "v1");
        assert_eq!(store.setting("k").await.unwrap().as_deref(), Some("v1"));
        // Removed only while it still has the value given.
        assert!(!store.remove_setting_if("k", "v2").await.unwrap());
        assert_eq!(store.setting("k").await.unwrap().as_deref(), Some("v1"));
        assert!(store.remove_setting_if("k", "v1").await.unwrap());
        assert_eq!(store.setting("k").await.unwrap(), None);
        assert_eq!(store.set_setting_if_absent("k", "v3").await.unwrap(), "v3");
        store.close().await;
    }

    pub async fn call_counts_add_up(backend: &Backend) {
        let store = backend.open().await;
        let (_, a) = session(1_000, i64::MAX, Limits::default());
        store.insert_session(&a).await.unwrap();
        store.add_call_counts(&a.id, 1, 1).await.unwrap();
        let totals = store.record_calls(&a.id, 2, 3, 5_000).await.unwrap();
        if let Some(totals) = totals {
            assert_eq!((totals.allowed, totals.denied), (3, 4));
            assert_eq!(totals.revoked_at, None, "no max_denied: never revoked");
        }
        let row = store.session_by_id(&a.id).await.unwrap().unwrap();
        assert_eq!((row.allowed, row.denied), (3, 4));
        assert_eq!(row.revoked_at, None);
        // Counting calls of a session that does not exist is harmless.
        store
            .record_calls(&SessionId::generate(), 1, 1, 5_000)
            .await
            .unwrap();
        store.close().await;
    }

    pub async fn session_statuses_read_many(backend: &Backend) {
        let store = backend.open().await;
        let (_, a) = session(1_000, 50_000, Limits::default());
        let (_, b) = session(1_000, 60_000, Limits::default());
        store.insert_session(&a).await.unwrap();
        store.insert_session(&b).await.unwrap();
        store.add_call_counts(&b.id, 4, 1).await.unwrap();
        store.revoke_session(&a.id, 2_000).await.unwrap();
        let missing = SessionId::generate();
        let mut statuses = store
            .session_statuses(&[a.id.clone(), missing, b.id.clone()])
            .await
            .unwrap();
        statuses.sort_by_key(|x| x.expires_at);
        assert_eq!(statuses.len(), 2, "missing sessions are left out");
        assert_eq!(
            (
                &statuses[0].id,
                statuses[0].revoked_at,
                statuses[0].expires_at
            ),
            (&a.id, Some(2_000), 50_000)
        );
        assert_eq!(
            (
                &statuses[1].id,
                statuses[1].revoked_at,
                statuses[1].allowed,
                statuses[1].denied
            ),
            (&b.id, None, 4, 1)
        );
        assert!(store.session_statuses(&[]).await.unwrap().is_empty());
        store.close().await;
    }

    pub async fn audit_records_read_back_by_chain_time_and_session(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!((head.seq, head.mac), (0, GENESIS_MAC));
        assert_eq!(head.seal, genesis(head.chain));
        let chain = head.chain;

        let (first, head1) = records_after(&head, 3, 10_000, "ses_one");
        store.audit_append(&first, &head1).await.unwrap();
        let (second, head2) = records_after(&head1, 600, 20_000, "ses_two");
        store.audit_append(&second, &head2).await.unwrap();
        store.audit_append(&[], &head2).await.unwrap();
        assert_eq!(store.audit_heads().await.unwrap(), vec![head2.clone()]);

        // By chain: everything, in order, byte for byte; it verifies.
        let all = store.audit_records(&by_chain(chain, 0)).await.unwrap();
        let expected: Vec<_> = first.iter().chain(&second).cloned().collect();
        assert_eq!(all, expected);
        assert_verifies(&all, &head2);
        // Paging by seq.
        let page = store
            .audit_records(&AuditQuery {
                limit: 2,
                ..by_chain(chain, 3)
            })
            .await
            .unwrap();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        // By time, oldest first.
        let since = store
            .audit_records(&AuditQuery {
                since_ms: Some(20_599),
                limit: 10,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(
            since.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
            vec![20_599, 20_600]
        );
        // By session.
        let one = store
            .audit_records(&AuditQuery {
                session: Some("ses_one".into()),
                limit: 100,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(one.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3]);
        store.close().await;
    }

    /// Many small batches (as a lightly loaded server commits them): every
    /// query answers exactly what filtering the whole trail would, with
    /// starts and ends in the middle of batches and more batches than one
    /// page of reading.
    pub async fn audit_queries_cross_batches(backend: &Backend) {
        let store = backend.open().await;
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let chain = head.chain;
        let mut all = Vec::new();
        for batch in 0..150_i64 {
            let session = if batch % 5 == 0 {
                "ses_rare"
            } else {
                "ses_busy"
            };
            // Batches three records long, each starting 10 ms after the last.
            let (records, next) = records_after(&head, 3, 1_000 + batch * 10, session);
            store.audit_append(&records, &next).await.unwrap();
            all.extend(records);
            head = next;
        }
        let expect = |q: &AuditQuery| -> Vec<u64> {
            all.iter()
                .filter(|r| q.chain.is_none() || r.seq > q.after_seq)
                .filter(|r| q.since_ms.is_none_or(|since| r.ts_ms >= since))
                .filter(|r| q.session.is_none() || r.session.as_deref() == q.session.as_deref())
                .take(q.limit as usize)
                .map(|r| r.seq)
                .collect()
        };
        let mut queries = Vec::new();
        for limit in [1, 2, 7, 100, 1_000] {
            for after_seq in [0, 1, 2, 3, 200, 448, 450] {
                queries.push(AuditQuery {
                    limit,
                    ..by_chain(chain, after_seq)
                });
            }
            // 1_012 is the second record of a batch.
            for since_ms in [
                None,
                Some(0),
                Some(1_012),
                Some(1_013),
                Some(1_500),
                // The first batch, the last batch, and past the end.
                Some(1_001),
                Some(1_003),
                Some(1_004),
                Some(2_491),
                Some(2_493),
                Some(2_494),
                Some(9_999),
            ] {
                for session in [None, Some("ses_rare"), Some("ses_busy"), Some("ses_none")] {
                    queries.push(AuditQuery {
                        session: session.map(str::to_owned),
                        since_ms,
                        limit,
                        ..AuditQuery::default()
                    });
                }
                for after_seq in [0, 2, 200, 449] {
                    queries.push(AuditQuery {
                        since_ms,
                        limit,
                        ..by_chain(chain, after_seq)
                    });
                }
            }
        }
        for q in &queries {
            let got: Vec<u64> = store
                .audit_records(q)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect();
            assert_eq!(got, expect(q), "{q:?}");
        }
        // Read back whole, the records are the ones appended.
        let mut paged = Vec::new();
        let mut after_seq = 0;
        loop {
            let page = store
                .audit_records(&AuditQuery {
                    limit: 64,
                    ..by_chain(chain, after_seq)
                })
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after_seq = last.seq;
            paged.extend(page);
        }
        assert_eq!(paged, all);
        store.close().await;
    }

    pub async fn audit_append_refuses_a_moved_head(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        store.audit_append(&first, &head1).await.unwrap();
        // A writer still at the old head: its records and head are refused,
        // all or nothing.
        let (stale, stale_head) = records_after(&head, 3, 2_000, "ses_b");
        let err = store.audit_append(&stale, &stale_head).await.unwrap_err();
        assert!(
            matches!(err, StoreError::ChainConflict(c) if c == head.chain),
            "{err}"
        );
        // A batch starting past the head (a gap) is refused the same way.
        let (_, further) = records_after(&head1, 1, 3_000, "ses_c");
        let (gap, gap_head) = records_after(&further, 1, 3_000, "ses_c");
        assert!(matches!(
            store.audit_append(&gap, &gap_head).await,
            Err(StoreError::ChainConflict(_))
        ));
        let all = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(all, first);
        assert_eq!(store.audit_heads().await.unwrap(), vec![head1]);
        // Nor did the refused batches leave session index rows (a row
        // naming no batch would make these queries fail).
        for session in ["ses_b", "ses_c"] {
            let named = store
                .audit_records(&AuditQuery {
                    session: Some(session.into()),
                    limit: 10,
                    ..AuditQuery::default()
                })
                .await
                .unwrap();
            assert!(named.is_empty(), "{session}");
        }
        if backend.shared_with_other_connections() {
            assert_eq!(
                backend
                    .scalar("SELECT count(*) FROM audit_batch_sessions WHERE session <> 'ses_a'")
                    .await,
                0
            );
        }
        store.close().await;
    }

    /// A batch's `ts_max` is the latest time in its chain up to it, also
    /// when the clock steps back between batches and when the batch before
    /// was refused (time queries binary-search it).
    pub async fn audit_ts_max_never_steps_back(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let mut appended = Vec::new();
        let mut append = async |head: &ChainHead, ts_ms: i64| {
            let (records, next) = records_after(head, 3, ts_ms, "ses_a");
            store.audit_append(&records, &next).await.unwrap();
            appended.extend(records);
            next
        };
        let head1 = append(&head, 5_000).await;
        // The clock stepped back by four seconds, then moved on slowly.
        let head2 = append(&head1, 1_000).await;
        let head3 = append(&head2, 2_000).await;
        // A writer that is not at the head is refused in between.
        let (stale, stale_head) = records_after(&head2, 1, 9_000, "ses_a");
        assert!(matches!(
            store.audit_append(&stale, &stale_head).await,
            Err(StoreError::ChainConflict(_))
        ));
        let head4 = append(&head3, 3_000).await;
        let head5 = append(&head4, 6_000).await;
        if backend.shared_with_other_connections() {
            let mut ts_max = Vec::new();
            for first_seq in [1, 4, 7, 10, 13] {
                ts_max.push(
                    backend
                        .scalar(&format!(
                            "SELECT ts_max FROM audit_batches \
                             WHERE chain = {} AND first_seq = {first_seq}",
                            head.chain
                        ))
                        .await,
                );
            }
            assert_eq!(ts_max, [5_003, 5_003, 5_003, 5_003, 6_003]);
        }
        let since = |since_ms: i64| AuditQuery {
            since_ms: Some(since_ms),
            limit: 100,
            ..AuditQuery::default()
        };
        let seqs = |records: Vec<AuditRecord>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(store.audit_records(&since(0)).await.unwrap()),
            seqs(appended)
        );
        assert_eq!(
            seqs(store.audit_records(&since(6_001)).await.unwrap()),
            [13, 14, 15]
        );
        assert_eq!(store.audit_heads().await.unwrap(), vec![head5]);
        store.close().await;
    }

    /// A record's `ts` is when its call ended, its seq is given at commit:
    /// `ts` steps back a millisecond or two along a chain, within a batch
    /// and across batches. A time query takes, per chain, the records from
    /// the first one (in seq order) at or after the time on, so that what
    /// it answers is a contiguous run of seqs that verifies on its own.
    pub async fn audit_since_is_a_contiguous_run_of_seqs(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let chain = head.chain;
        // Seqs 1-5, then 6-8; seq 4 ended before seq 3, seq 6 before seq 5.
        let (first, head1) = records_at(&head, &[1_000, 1_001, 1_003, 1_002, 1_004], "ses_s");
        store.audit_append(&first, &head1).await.unwrap();
        let (second, head2) = records_at(&head1, &[1_003, 1_006, 1_005], "ses_s");
        store.audit_append(&second, &head2).await.unwrap();
        let key = key();
        let read = async |q: AuditQuery| {
            let records = store.audit_records(&q).await.unwrap();
            let mut verifier = if q.session.is_some() {
                ChainVerifier::allow_gaps(&key)
            } else {
                ChainVerifier::partial(&key)
            };
            for (i, record) in records.iter().enumerate() {
                verifier.check(record, records.get(i + 1)).unwrap();
            }
            records.iter().map(|r| r.seq).collect::<Vec<_>>()
        };
        let since = |since_ms: i64| AuditQuery {
            since_ms: Some(since_ms),
            limit: 100,
            ..AuditQuery::default()
        };
        // Seq 4 (1_002) follows seq 3 (1_003): it is taken.
        assert_eq!(read(since(1_003)).await, [3, 4, 5, 6, 7, 8]);
        // Across batches: seq 6 (1_003) follows seq 5 (1_004).
        assert_eq!(read(since(1_004)).await, [5, 6, 7, 8]);
        // Within the second batch: seq 8 (1_005) follows seq 7 (1_006).
        assert_eq!(read(since(1_006)).await, [7, 8]);
        assert_eq!(read(since(1_005)).await, [7, 8]);
        assert_eq!(read(since(1_007)).await, Vec::<u64>::new());
        assert_eq!(read(since(0)).await, [1, 2, 3, 4, 5, 6, 7, 8]);
        // By chain, after a seq: the same run, from after that seq.
        assert_eq!(
            read(AuditQuery {
                since_ms: Some(1_004),
                ..by_chain(chain, 5)
            })
            .await,
            [6, 7, 8]
        );
        assert_eq!(
            read(AuditQuery {
                since_ms: Some(1_003),
                limit: 2,
                ..by_chain(chain, 0)
            })
            .await,
            [3, 4]
        );
        // With a session: that session's records of the same run (odd
        // ones of each batch: seqs 1, 3, 5, 6, 8).
        let session = |since_ms: i64| AuditQuery {
            session: Some("ses_s".into()),
            ..since(since_ms)
        };
        assert_eq!(read(session(1_004)).await, [5, 6, 8]);
        assert_eq!(read(session(1_006)).await, [8]);
        store.close().await;
    }

    pub async fn audit_append_is_all_or_nothing(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        store.audit_append(&first, &head1).await.unwrap();
        // The head moves (the batch starts right after it) but the last
        // record repeats a stored seq: nothing of the batch stays.
        let (mut bad, bad_head) = records_after(&head1, 3, 2_000, "ses_b");
        bad[2] = first[0].clone();
        let err = store.audit_append(&bad, &bad_head).await.unwrap_err();
        // Both stores check the batch before writing it.
        assert!(matches!(err, StoreError::InvalidBatch(_)), "{err}");
        assert_eq!(store.audit_heads().await.unwrap(), vec![head1.clone()]);
        assert_eq!(
            store.audit_records(&by_chain(head.chain, 0)).await.unwrap(),
            first
        );
        let (good, head2) = records_after(&head1, 3, 2_000, "ses_b");
        // The database refuses the batch after the head moved (a session
        // index row is in the way): the head stays, nothing is written.
        if backend.shared_with_other_connections() {
            refused_after_the_head_moved(backend, store.as_ref(), &head1, &good, &head2, &first)
                .await;
        }
        // The store takes the good batch afterwards.
        store.audit_append(&good, &head2).await.unwrap();
        assert_eq!(store.audit_heads().await.unwrap(), vec![head2]);
        let all = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(all.len(), 5);
        store.close().await;
    }

    pub async fn audit_append_fails_once_closed(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (records, head1) = records_after(&head, 1, 1_000, "ses_a");
        store.close().await;
        let appended = tokio::time::timeout(
            Duration::from_secs(10),
            store.audit_append(&records, &head1),
        )
        .await
        .expect("an append on a closed store answers at once");
        // PostgreSQL: no connection could be had, so nothing was sent.
        assert!(
            matches!(
                appended,
                Err(StoreError::Database(_) | StoreError::Unreachable(_))
            ),
            "{appended:?}"
        );
    }

    pub async fn audit_claim_resumes_the_chain(backend: &Backend) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (records, head1) = records_after(&head, 5, 1_000, "ses_a");
        store.audit_append(&records, &head1).await.unwrap();
        store.close().await;
        drop(store);

        let store = backend.open().await;
        let resumed = store.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!(
            resumed, head1,
            "a restarted writer resumes its chain at the head"
        );
        let (more, head2) = records_after(&resumed, 2, 2_000, "ses_a");
        store.audit_append(&more, &head2).await.unwrap();
        assert_eq!(store.audit_heads().await.unwrap(), vec![head2]);
        store.close().await;
    }

    pub async fn audit_probe_writes(backend: &Backend) {
        let store = backend.open().await;
        store.audit_probe().await.unwrap();
        store.audit_probe().await.unwrap();
        store.close().await;
    }

    /// A database written before batches: its one-row-per-record trail is
    /// moved into batches when the store opens, and reads back, verifies
    /// and carries on as before.
    pub async fn a_trail_of_the_old_format_is_moved_into_batches(backend: &Backend) {
        let empty = empty_chain(1);
        let (mut records, _) = records_after(&empty, 700, 5_000, "ses_old");
        // The old writer did not keep ts from stepping back: record 351
        // is 200 ms older than record 350, and every record from 513 on
        // (the second page of the conversion) is older than record 512,
        // so the second page's batch must carry the first one's ts_max.
        records[350].ts_ms -= 200;
        for record in &mut records[512..] {
            record.ts_ms -= 300;
        }
        let key = key();
        let mut prev = GENESIS_MAC;
        for record in &mut records {
            record.seal(&key, 1, record.seq, prev);
            prev = record.mac;
        }
        let head = ChainHead {
            chain: 1,
            seq: 700,
            mac: prev,
            seal: head_seal(&key, 1, 700, &prev),
        };
        // A second chain, older than the first one's records: its batches'
        // ts_max starts afresh.
        let (other, other_head) = records_after(&empty_chain(2), 5, 1_000, "ses_two");
        old_format_trail(backend, &[(&records, &head), (&other, &other_head)]).await;

        let store = backend.open().await;
        let all = store.audit_records(&by_chain(1, 0)).await.unwrap();
        assert_eq!(all, records);
        assert_eq!(store.audit_records(&by_chain(2, 0)).await.unwrap(), other);
        assert_eq!(
            backend
                .scalar("SELECT max(ts_max) FROM audit_batches WHERE chain = 2")
                .await,
            1_005
        );
        assert_verifies(&all, &head);
        // The seqs read back for `session` (any, if `None`) from `since`
        // on, and the seqs of the records written that they should be.
        let seqs_since = async |session: Option<&str>, since: i64| {
            let read = store
                .audit_records(&AuditQuery {
                    session: session.map(Into::into),
                    since_ms: Some(since),
                    limit: 1_000,
                    ..AuditQuery::default()
                })
                .await
                .unwrap();
            // Each chain from its first record at or after `since` (in seq
            // order) to its end, the chains interleaved oldest first.
            let run = |chain: &[AuditRecord]| -> std::collections::VecDeque<AuditRecord> {
                let start = chain
                    .iter()
                    .position(|r| r.ts_ms >= since)
                    .unwrap_or(chain.len());
                chain[start..]
                    .iter()
                    .filter(|r| session.is_none() || r.session.as_deref() == session)
                    .cloned()
                    .collect()
            };
            let written =
                airlock_store::take_oldest_first(&mut [run(&records), run(&other)], 1_000);
            let seqs = |rs: &[AuditRecord]| rs.iter().map(|r| (r.chain, r.seq)).collect::<Vec<_>>();
            (seqs(&read), seqs(&written))
        };
        let (read, written) = seqs_since(Some("ses_old"), 5_450).await;
        assert!(!read.is_empty());
        assert_eq!(read, written);
        // Around the steps back, time queries still find every record.
        for since in [
            0, 1_003, 5_150, 5_151, 5_152, 5_349, 5_350, 5_351, 5_352, 5_401, 5_512,
        ] {
            let (read, written) = seqs_since(None, since).await;
            assert_eq!(read, written, "since {since}");
        }
        // The chain carries on where it was.
        let resumed = store.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!(resumed, head);
        let (next, head2) = records_after(&head, 2, 9_000, "ses_new");
        store.audit_append(&next, &head2).await.unwrap();
        assert_eq!(
            store.audit_records(&by_chain(1, 0)).await.unwrap().len(),
            702
        );
        store.close().await;

        // The old table is gone, and opening again has nothing to move.
        assert!(!backend.has_table("audit_records").await);
        let store = backend.open().await;
        assert_eq!(
            store.audit_records(&by_chain(1, 0)).await.unwrap().len(),
            702
        );
        store.close().await;
    }

    /// An old row that cannot be read does not keep the store from opening:
    /// it is kept aside, and the gap it leaves is what verifying names.
    pub async fn an_unreadable_old_row_is_kept_aside(backend: &Backend) {
        let empty = empty_chain(1);
        let (records, head) = records_after(&empty, 5, 5_000, "ses_old");
        old_format_trail(backend, &[(&records, &head)]).await;
        backend
            .execute("UPDATE audit_records SET flags = 4096 WHERE seq = 3")
            .await;
        let forged = [9_u8; 32];
        backend
            .execute(&format!(
                "UPDATE audit_records SET prev_mac = {} WHERE seq = 5",
                backend.blob(&forged)
            ))
            .await;

        let store = backend.open().await;
        let all = store.audit_records(&by_chain(1, 0)).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 4, 5]
        );
        let key = key();
        let mut verifier = ChainVerifier::from_start(&key);
        verifier.check(&all[0], Some(&all[1])).unwrap();
        let broken = verifier
            .check(&all[1], Some(&all[2]))
            .and_then(|()| verifier.check(&all[2], Some(&all[3])));
        assert_eq!(broken.unwrap_err().seq, 4);
        // Every row comes back with its own prev_mac: record 4's names the
        // record kept aside, record 5's is the forged one.
        assert_eq!(all[2].prev_mac, records[3].prev_mac);
        assert_eq!(all[3].prev_mac, forged);
        store.close().await;
        assert_eq!(
            backend
                .scalar("SELECT count(*) FROM audit_records_unreadable WHERE seq = 3")
                .await,
            1
        );
        assert_eq!(
            backend
                .scalar("SELECT count(*) FROM audit_records_unreadable")
                .await,
            1
        );
    }

    /// Pages of every size cover the list exactly once, in order, however
    /// the pages fall across sessions created in the same millisecond;
    /// a cursor resumes from its key whether or not a session has it.
    pub async fn sessions_are_listed_a_page_at_a_time(backend: &Backend) {
        let store = backend.open().await;
        // Ties: three sessions at 200, two at 300.
        let mut rows: Vec<SessionRow> = [100, 200, 200, 200, 300, 300, 400]
            .into_iter()
            .map(|at| session(at, 10_000, Limits::default()).1)
            .collect();
        for row in &rows {
            store.insert_session(row).await.unwrap();
        }
        // Ended sessions are listed with include_ended.
        store.revoke_session(&rows[2].id, 500).await.unwrap();
        rows[2].revoked_at = Some(500);
        listing_order(&mut rows);

        let everything = store.list_sessions(true, 20_000).await.unwrap();
        assert_eq!(
            ids(&everything),
            ids(&rows),
            "the unbounded list, same order"
        );
        for limit in [1, 2, 3, 4, 6, 7, 8, 10_000] {
            let pages = all_pages(store.as_ref(), true, 20_000, limit).await;
            let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
            let want: Vec<usize> = rows.chunks(limit as usize).map(<[_]>::len).collect();
            assert_eq!(sizes, want, "limit {limit}");
            assert_eq!(ids(&pages.concat()), ids(&rows), "limit {limit}");
            assert_eq!(pages.concat(), rows, "whole rows, limit {limit}");
        }

        let page = |after: SessionKey, limit: u32| {
            let store = Arc::clone(&store);
            async move {
                store
                    .list_sessions_page(&SessionPage {
                        include_ended: true,
                        now_ms: 20_000,
                        after: Some(after),
                        limit,
                    })
                    .await
                    .unwrap()
            }
        };
        // Past the end: after the oldest session, or before any.
        let oldest = SessionKey::of(rows.last().unwrap());
        assert!(page(oldest, 10).await.is_empty());
        let before_all = SessionKey {
            created_at: 0,
            id: SessionId::parse("ses_0").unwrap(),
        };
        assert!(page(before_all, 10).await.is_empty());
        // A key no session has: its place in the order.
        let between = SessionKey {
            created_at: 250,
            id: SessionId::generate(),
        };
        assert_eq!(ids(&page(between, 10).await), ids(&rows[3..]));
        // Within the tie at 200: ids compare bytewise ('Z' < 'a').
        let highest = SessionKey {
            created_at: 200,
            id: SessionId::parse("ses_zzzz").unwrap(),
        };
        assert_eq!(ids(&page(highest, 10).await), ids(&rows[3..]));
        let lowest = SessionKey {
            created_at: 200,
            id: SessionId::parse("ses_0000").unwrap(),
        };
        assert_eq!(ids(&page(lowest, 10).await), ids(&rows[6..]));
        let middle = SessionKey::of(&rows[4]);
        assert_eq!(ids(&page(middle, 1).await), ids(&rows[5..6]));
        store.close().await;
    }

    /// Without include_ended, pages hold only sessions active at `now_ms`,
    /// and a cursor still resumes after a session that ended since.
    pub async fn active_sessions_are_listed_a_page_at_a_time(backend: &Backend) {
        let store = backend.open().await;
        // (created_at, expires_at, revoked): ties at 200 across all states.
        let specs = [
            (100, 10_000, false),
            (200, 10_000, false),
            (200, 3_000, false),
            (200, 10_000, true),
            (200, 10_000, false),
            (300, 4_000, false),
            (300, 10_000, false),
            (400, 10_000, true),
            (500, 10_000, false),
        ];
        let mut rows = Vec::new();
        for (created_at, expires_at, revoked) in specs {
            let (_, row) = session(created_at, expires_at, Limits::default());
            store.insert_session(&row).await.unwrap();
            if revoked {
                store.revoke_session(&row.id, 1_000).await.unwrap();
            }
            rows.push((row, revoked));
        }
        let now = 5_000;
        let mut active: Vec<SessionRow> = rows
            .iter()
            .filter(|(row, revoked)| !revoked && row.expires_at > now)
            .map(|(row, _)| row.clone())
            .collect();
        listing_order(&mut active);
        assert_eq!(active.len(), 5);
        assert_eq!(
            ids(&store.list_sessions(false, now).await.unwrap()),
            ids(&active)
        );
        for limit in [1, 2, 3, 5, 6] {
            let pages = all_pages(store.as_ref(), false, now, limit).await;
            assert!(pages.iter().all(|p| !p.is_empty()));
            assert_eq!(ids(&pages.concat()), ids(&active), "limit {limit}");
        }

        // The first page; then the session after it is revoked: the next
        // page goes on after the cursor, without it and without repeats.
        let first = store
            .list_sessions_page(&SessionPage {
                include_ended: false,
                now_ms: now,
                after: None,
                limit: 2,
            })
            .await
            .unwrap();
        assert_eq!(ids(&first), ids(&active[..2]));
        store.revoke_session(&active[2].id, now).await.unwrap();
        store.revoke_session(&active[1].id, now).await.unwrap();
        let rest = store
            .list_sessions_page(&SessionPage {
                include_ended: false,
                now_ms: now,
                after: Some(SessionKey::of(&first[1])),
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(ids(&rest), ids(&active[3..]));
        // Later, when everything has expired, nothing is active.
        assert!(all_pages(store.as_ref(), false, 20_000, 2).await.is_empty());
        store.close().await;
    }

    /// A page is read through the index on (created_at, id), walked
    /// backwards from the cursor: no sort of the whole table, no offset.
    pub async fn session_pages_walk_the_creation_index(backend: &Backend) {
        let store = backend.open().await;
        for at in 0..50 {
            store
                .insert_session(&session(at, 10_000, Limits::default()).1)
                .await
                .unwrap();
        }
        let plan = if let Some(db) = &backend.pg {
            assert_eq!(
                db.scalar_i64(
                    "SELECT count(*) FROM pg_indexes WHERE indexname = 'sessions_created_at'"
                )
                .await,
                0,
                "the index of the old order is gone"
            );
            let mut conn = db.connect().await;
            sqlx::query("SET enable_seqscan = off")
                .execute(&mut conn)
                .await
                .unwrap();
            let plan: Vec<String> = sqlx::query_scalar(
                "EXPLAIN SELECT id FROM sessions WHERE (created_at, id COLLATE \"C\") < (30, 'ses_x') \
                 ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT 10",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            plan.join("\n")
        } else {
            let mut conn = backend.sqlite_connection().await;
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
                "EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE (created_at, id) < (30, 'ses_x') \
                 ORDER BY created_at DESC, id DESC LIMIT 10",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            plan.into_iter()
                .map(|(_, _, _, detail)| detail)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(plan.contains("sessions_created_at_id"), "{plan}");
        assert!(
            !plan.contains("TEMP B-TREE") && !plan.contains("Sort"),
            "{plan}"
        );
        store.close().await;
    }
}

/// What only SQLite does: the audit writer's own connection, and the
/// databases it leaves to the pool.
mod sqlite_only {
    use sqlx::Connection;

    use super::*;

    /// With the journal, appends are acknowledged before they are in the
    /// database: every read of the store sees them all the same, a second
    /// store on the file commits directly, and a store dropped without
    /// closing (a crash) leaves them for the next one, which moves them in
    /// before it claims the chain.
    #[tokio::test]
    async fn journaled_appends_are_read_at_once_and_outlive_the_store() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        assert!(store.audit_use_journal().await.unwrap());
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let mut appended = Vec::new();
        for batch in 0..5_i64 {
            let (records, next) = records_after(&head, 2, 1_000 + batch * 10, "ses_j");
            store.audit_append(&records, &next).await.unwrap();
            appended.extend(records);
            head = next;
            // Every append is readable at once, in the database's order.
            let read = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
            assert_eq!(read, appended);
            assert_eq!(store.audit_heads().await.unwrap(), vec![head.clone()]);
        }
        // The journal is this store's: another one on the file cannot
        // have it (a CLI reading the file never asks), and is told so
        // rather than committing beside it.
        let other = backend.open().await;
        let held = other.audit_use_journal().await;
        assert!(matches!(held, Err(StoreError::JournalHeld(_))), "{held:?}");
        other.close().await;

        let (records, last) = records_after(&head, 3, 2_000, "ses_j");
        store.audit_append(&records, &last).await.unwrap();
        appended.extend(records);
        drop(store);
        let store = backend.open().await;
        assert!(store.audit_use_journal().await.unwrap());
        assert_eq!(store.audit_claim_chain(&genesis).await.unwrap(), last);
        let read = store.audit_records(&by_chain(last.chain, 0)).await.unwrap();
        assert_eq!(read, appended);
        store.close().await;
    }

    /// While the journal cannot be moved into the database (another
    /// process holds its write lock past the busy timeout), appends are
    /// refused, not piled up; once it can, they are taken again and every
    /// acknowledged record is there, once.
    #[tokio::test]
    async fn a_journal_the_database_refuses_refuses_appends_until_it_is_in() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        assert!(store.audit_use_journal().await.unwrap());
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let mut locker = sqlx::SqliteConnection::connect(&backend.url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut locker)
            .await
            .unwrap();
        // Acknowledged without the database.
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        tokio::time::timeout(Duration::from_secs(1), store.audit_append(&first, &head1))
            .await
            .expect("a journaled append does not wait for the database")
            .unwrap();
        // A read has to wait for the journal to get in, and fails.
        assert!(store.audit_heads().await.is_err());
        let (next, head2) = records_after(&head1, 2, 2_000, "ses_a");
        let refused = store.audit_append(&next, &head2).await;
        assert!(
            matches!(refused, Err(StoreError::JournalStuck(_))),
            "{refused:?}"
        );
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        locker.close().await.unwrap();

        store.audit_probe().await.unwrap();
        assert_eq!(store.audit_heads().await.unwrap(), vec![head1]);
        store.audit_append(&next, &head2).await.unwrap();
        let all = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        store.close().await;
    }

    /// A database file deleted under a running store: SQLite would go on
    /// writing into the unlinked file, losing every record; appends and the
    /// audit probe fail instead (a fail-closed auditor then refuses calls).
    #[tokio::test]
    async fn appends_fail_once_the_database_file_is_deleted() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        let (_, s) = session(1_000, i64::MAX, Limits::default());
        store.insert_session(&s).await.unwrap();
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        store.audit_append(&first, &head1).await.unwrap();
        store.audit_probe().await.unwrap();

        let file = backend.url.strip_prefix("sqlite://").unwrap().to_owned();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{file}{suffix}"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut at = head1;
        let err = loop {
            let (next, after) = records_after(&at, 2, 2_000, "ses_a");
            match store.audit_append(&next, &after).await {
                Err(e) => break e,
                // Noticed within a checkpoint round (100 ms); an append
                // before that lands in the deleted file.
                Ok(()) => {
                    assert!(Instant::now() < deadline, "appends went on");
                    at = after;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert!(matches!(err, StoreError::FileGone(_)), "{err}");
        assert!(err.to_string().contains("deleted or replaced"), "{err}");
        assert!(matches!(
            store.audit_probe().await,
            Err(StoreError::FileGone(_))
        ));
        // Nor do other writes go into the lost file: a revocation must
        // fail (and be kept by the registry), not seem to succeed.
        assert!(matches!(
            store.revoke_session(&s.id, 5_000).await,
            Err(StoreError::FileGone(_))
        ));
        let (_, other) = session(1_000, i64::MAX, Limits::default());
        assert!(matches!(
            store.insert_session(&other).await,
            Err(StoreError::FileGone(_))
        ));
        // Nor do reads answer from whatever file is at the path now.
        assert!(matches!(
            store.list_sessions(true, 0).await,
            Err(StoreError::FileGone(_))
        ));
        store.close().await;
    }

    /// Leases of `max_requests` (one process, but calls from many tasks):
    /// grants are capped at an eighth of what is left and never add up to
    /// more than the limit, however they interleave.
    #[tokio::test]
    async fn leases_never_add_up_to_more_than_max_requests() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        assert!(store.leases_requests());
        let (_, s) = session(
            1_000,
            i64::MAX,
            Limits {
                max_requests: Some(1_000),
                ..Limits::default()
            },
        );
        store.insert_session(&s).await.unwrap();
        assert_eq!(store.reserve_requests(&s.id, 500).await.unwrap(), 125);
        let tasks = (0..4).map(|_| {
            let store = Arc::clone(&store);
            let id = s.id.clone();
            tokio::spawn(async move {
                let mut got = 0;
                loop {
                    match store.reserve_requests(&id, 50).await.unwrap() {
                        0 => return got,
                        n => got += n,
                    }
                }
            })
        });
        let mut granted: u64 = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .sum();
        // A grant overtaken too often gives up; what is left is still there.
        loop {
            match store.reserve_requests(&s.id, 100).await.unwrap() {
                0 => break,
                n => granted += n,
            }
        }
        assert_eq!(125 + granted, 1_000, "every call handed out exactly once");
        store.release_requests(&s.id, 7).await.unwrap();
        assert_eq!(store.reserve_requests(&s.id, 100).await.unwrap(), 1);
        let (_, free) = session(1_000, i64::MAX, Limits::default());
        store.insert_session(&free).await.unwrap();
        assert_eq!(store.reserve_requests(&free.id, 5).await.unwrap(), 0);
        store.close().await;
    }

    /// A database from before leases counts what its sessions used as
    /// reserved, so a quota carries on where it was.
    #[tokio::test]
    async fn sessions_of_an_older_database_carry_their_use_into_leases() {
        let backend = Backend::sqlite().await.unwrap();
        backend.migrate_to(5).await;
        let mut conn = backend.sqlite_connection().await;
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, created_at, expires_at, scope, limits, labels, \
             allowed, denied) VALUES ('ses_old', 'aa', 1, 9223372036854775807, '[]', \
             '{\"max_requests\": 10}', '{}', 9, 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        let store = backend.open().await;
        let id = SessionId::parse("ses_old").unwrap();
        assert_eq!(store.reserve_requests(&id, 100).await.unwrap(), 1);
        assert_eq!(store.reserve_requests(&id, 100).await.unwrap(), 0);
        store.close().await;
    }

    #[tokio::test]
    async fn an_append_waits_for_a_lock_held_elsewhere_then_fails_and_recovers() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        store.audit_append(&first, &head1).await.unwrap();

        // Another process holds the write lock: the append waits the busy
        // timeout (5 s), then fails, writing nothing.
        let mut locker = sqlx::SqliteConnection::connect(&backend.url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut locker)
            .await
            .unwrap();
        let (next, head2) = records_after(&head1, 2, 2_000, "ses_a");
        let started = Instant::now();
        let appended =
            tokio::time::timeout(Duration::from_secs(30), store.audit_append(&next, &head2))
                .await
                .expect("the append fails in the end");
        assert!(matches!(appended, Err(StoreError::Database(_))));
        assert!(started.elapsed() >= Duration::from_secs(4), "did not wait");
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        locker.close().await.unwrap();

        assert_eq!(store.audit_heads().await.unwrap(), vec![head1]);
        store.audit_append(&next, &head2).await.unwrap();
        let all = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(all.len(), 4);
        store.close().await;
    }

    /// A closed SQLite store at `path` holding `batches` batches of three
    /// records, 10 ms apart from 1,000 ms on; its records and head.
    async fn sqlite_trail(path: &std::path::Path, batches: i64) -> (Vec<AuditRecord>, ChainHead) {
        let store = open(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let mut all = Vec::new();
        for batch in 0..batches {
            let (records, next) = records_after(&head, 3, 1_000 + batch * 10, "ses_a");
            store.audit_append(&records, &next).await.unwrap();
            all.extend(records);
            head = next;
        }
        store.close().await;
        (all, head)
    }

    /// The page size of the SQLite file at `path`, read on a connection of
    /// its own.
    async fn page_size(path: &std::path::Path) -> i64 {
        let url = format!("sqlite://{}", path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let size = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        size
    }

    /// A file the store creates has its small pages (a commit writes
    /// whole pages to the log: see `SQLITE_PAGE_SIZE`).
    #[tokio::test]
    async fn a_new_database_file_has_small_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let (all, head) = sqlite_trail(&path, 3).await;
        // Not SQLite's default of 4096: the store applied its own.
        assert_eq!(page_size(&path).await, 1024);
        assert_eq!(airlock_store::SQLITE_PAGE_SIZE, 1024);
        let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
        let read = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(read, all);
        store.close().await;
    }

    /// A read held open for long (an export, a verify) keeps the log from
    /// starting over, so it grows; once the read is over and the log has
    /// been checkpointed, its file is cut back to the limit rather than
    /// left at its largest until the store closes.
    #[tokio::test]
    async fn the_log_file_shrinks_back_after_a_long_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
        let wal = dir.path().join("wal.db-wal");
        let limit = u64::try_from(airlock_store::SQLITE_WAL_SIZE_LIMIT).unwrap();
        let log_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        let mut ts = 1_000;
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM audit_chains;")
            .unwrap();
        while log_size() < limit + limit / 4 {
            let (records, next) = records_after(&head, 256, ts, "ses_long");
            store.audit_append(&records, &next).await.unwrap();
            head = next;
            ts += 1_000;
        }
        reader.execute_batch("COMMIT").unwrap();
        drop(reader);
        // Appends go on as a server's would; the checkpoint thread
        // catches up and the next commit after the log restarts cuts it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while log_size() > limit {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the log stayed at {} bytes (limit {limit})",
                log_size()
            );
            let (records, next) = records_after(&head, 1, ts, "ses_long");
            store.audit_append(&records, &next).await.unwrap();
            head = next;
            ts += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store.close().await;
    }

    /// A file the store creates, and its log, are its owner's alone: they
    /// hold the audit trail, token hashes and sealed credentials.
    #[tokio::test]
    async fn a_new_database_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (records, next) = records_after(&head, 3, 1_000, "ses_a");
        store.audit_append(&records, &next).await.unwrap();
        let wal = dir.path().join("new.db-wal");
        for file in [&path, &wal] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", file.display());
        }
        store.close().await;
    }

    /// An in-memory database leaves no file behind (sqlx names it
    /// `file:sqlx-in-memory-N`, which is no file to create).
    #[tokio::test]
    async fn an_in_memory_database_creates_no_file() {
        let store = open("sqlite::memory:").await.unwrap();
        store.close().await;
        let strays: Vec<_> = std::fs::read_dir(".")
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("file:"))
            .collect();
        assert!(strays.is_empty(), "{strays:?}");
    }

    /// A file made with SQLite's default 4 KiB pages (as every earlier
    /// version made them) keeps them: the store opens it, migrates it,
    /// appends and reads as before, and does not rewrite it.
    #[tokio::test]
    async fn a_database_file_with_other_pages_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .page_size(4096)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE made_before (x INTEGER)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        assert_eq!(page_size(&path).await, 4096);

        let (all, head) = sqlite_trail(&path, 40).await;
        assert_eq!(page_size(&path).await, 4096);
        let store = open(&format!("sqlite://{}", path.display())).await.unwrap();
        let (more, last) = records_after(&head, 3, 5_000, "ses_b");
        store.audit_append(&more, &last).await.unwrap();
        let read = store.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(read, [all, more].concat());
        assert_verifies(&read, &last);
        store.close().await;
        assert_eq!(page_size(&path).await, 4096);
    }

    /// A trail written with the time index (migration 4) moves into the
    /// clustered table without it, and reads back the same, by seq and by
    /// time.
    #[tokio::test]
    async fn batches_from_before_the_clustered_table_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (all, head) = sqlite_trail(&dir.path().join("written.db"), 40).await;

        let url = format!("sqlite://{}/old.db?mode=rwc", dir.path().display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        airlock_store::sqlite_migrator_up_to(4)
            .run(&pool)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(&format!(
            "ATTACH DATABASE '{}/written.db' AS w",
            dir.path().display()
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
        for copy in [
            "INSERT INTO audit_chains SELECT * FROM w.audit_chains",
            "INSERT INTO audit_batches SELECT chain, first_seq, last_seq, ts_max, records FROM w.audit_batches",
            "INSERT INTO audit_batch_sessions SELECT * FROM w.audit_batch_sessions",
        ] {
            sqlx::query(copy).execute(&mut *conn).await.unwrap();
        }
        drop(conn);
        pool.close().await;

        let store = open(&url).await.unwrap();
        assert_eq!(
            store.audit_records(&by_chain(head.chain, 0)).await.unwrap(),
            all
        );
        let since: Vec<u64> = store
            .audit_records(&AuditQuery {
                since_ms: Some(1_203),
                limit: 1_000,
                ..AuditQuery::default()
            })
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        let expected: Vec<u64> = all
            .iter()
            .filter(|r| r.ts_ms >= 1_203)
            .map(|r| r.seq)
            .collect();
        assert_eq!(since, expected);
        assert_eq!(store.audit_heads().await.unwrap(), vec![head]);
        store.close().await;

        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let schema: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_batches' AND sql IS NOT NULL",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(schema.len(), 1, "no index beside the table: {schema:?}");
        assert!(schema[0].contains("WITHOUT ROWID"), "{schema:?}");
        pool.close().await;
    }

    /// A time query over batches whose keys or times were edited ends, and
    /// refuses what it reads wrong, instead of searching forever.
    #[tokio::test]
    async fn a_time_query_over_edited_batches_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (_, head) = sqlite_trail(&dir.path().join("edited.db"), 20).await;
        let url = format!("sqlite://{}/edited.db?mode=rwc", dir.path().display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        for edit in [
            "UPDATE audit_batches SET first_seq = -9223372036854775807 WHERE first_seq = 1",
            "UPDATE audit_batches SET ts_max = 0 WHERE first_seq = 31",
        ] {
            sqlx::query(edit).execute(&pool).await.unwrap();
        }
        pool.close().await;

        let store = open(&url).await.unwrap();
        for (since, after_seq) in [(0, 0), (1_100, 0), (1_150, 10), (1_195, 0), (5_000, 0)] {
            let query = AuditQuery {
                since_ms: Some(since),
                limit: 1_000,
                ..by_chain(head.chain, after_seq)
            };
            let answered =
                tokio::time::timeout(Duration::from_secs(10), store.audit_records(&query)).await;
            let Ok(read) = answered else {
                panic!("a time query from {since} did not end");
            };
            if since == 0 {
                assert!(read.is_err(), "the edited first batch is refused");
            }
        }
        store.close().await;
    }

    /// A session index row that names no batch is refused, not taken for
    /// the end of that session's records.
    #[tokio::test]
    async fn a_session_index_row_without_its_batch_is_refused() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        let mut head = store.audit_claim_chain(&genesis).await.unwrap();
        for n in 0..3 {
            let (records, next) = records_after(&head, 1, 1_000 + n, "ses_x");
            store.audit_append(&records, &next).await.unwrap();
            head = next;
        }
        let path = backend._dir.as_ref().unwrap().path().join("store.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_batches WHERE first_seq = 2")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let err = store
            .audit_records(&AuditQuery {
                session: Some("ses_x".into()),
                limit: 10,
                ..AuditQuery::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::UnreadableAudit { seq: 2, .. }),
            "{err}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn an_in_memory_store_appends_through_its_pool() {
        let backend = Backend {
            url: "sqlite::memory:".to_owned(),
            pg: None,
            _dir: None,
        };
        cases::audit_records_read_back_by_chain_time_and_session(&backend).await;
        cases::audit_append_refuses_a_moved_head(&backend).await;
        cases::audit_append_is_all_or_nothing(&backend).await;
    }

    /// The files under `dir` this process holds open (from `/proc/self/fd`).
    fn files_open_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .collect()
    }

    /// A SQLite store with three records appended, its chain head and the
    /// directory of its file (which it holds open).
    async fn store_in_use(backend: &Backend) -> (Arc<dyn Store>, ChainHead, std::path::PathBuf) {
        let store = backend.open().await;
        let head = store.audit_claim_chain(&genesis).await.unwrap();
        let (records, head1) = records_after(&head, 3, 1_000, "ses_a");
        store.audit_append(&records, &head1).await.unwrap();
        let dir = backend._dir.as_ref().unwrap().path().to_owned();
        assert!(
            !files_open_under(&dir).is_empty(),
            "the store holds its file"
        );
        (store, head1, dir)
    }

    #[tokio::test]
    async fn a_closed_store_holds_no_file_open() {
        let backend = Backend::sqlite().await.unwrap();
        let (store, _, dir) = store_in_use(&backend).await;
        // The pool, the audit writer and the checkpoint thread: all closed
        // by the time close returns.
        store.close().await;
        assert_eq!(files_open_under(&dir), Vec::<std::path::PathBuf>::new());
    }

    #[tokio::test]
    async fn a_dropped_store_ends_its_writer_and_the_file_stays_usable() {
        let backend = Backend::sqlite().await.unwrap();
        let (store, head1, dir) = store_in_use(&backend).await;
        // Dropped without close: every connection closes by itself. (Not
        // judged by the WAL file: the last connection to close removes it
        // only when no other is closing at the same moment.)
        drop(store);
        let started = Instant::now();
        loop {
            let open = files_open_under(&dir);
            if open.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "connections stayed open: {open:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ...and the next store on the file takes over.
        let store = backend.open().await;
        let resumed = store.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!(resumed, head1);
        let (more, head2) = records_after(&resumed, 2, 2_000, "ses_a");
        store.audit_append(&more, &head2).await.unwrap();
        assert_eq!(store.audit_heads().await.unwrap(), vec![head2]);
        store.close().await;
    }
}

/// What only a store shared by several processes does.
mod shared {
    use super::*;

    async fn backend() -> Option<Backend> {
        Backend::postgres().await
    }

    #[tokio::test]
    async fn sqlite_is_not_shared() {
        let backend = Backend::sqlite().await.unwrap();
        let store = backend.open().await;
        assert!(!store.is_shared());
        assert!(store.changes().is_none());
    }

    /// `session_changes` reads what changed since its cursor and nothing
    /// else, and never misses a change whose transaction was still open
    /// when the previous read looked (it commits after that read, with a
    /// transaction id below what that read saw committed).
    #[tokio::test]
    async fn session_changes_never_miss_a_change() {
        let Some(backend) = backend().await else {
            return;
        };
        let sqlite = Backend::sqlite().await.unwrap().open().await;
        assert!(sqlite.session_changes(None, &[]).await.unwrap().is_none());
        let store = backend.open().await;
        let db = backend.pg.as_ref().unwrap();
        let rows: Vec<SessionRow> = (0..3)
            .map(|_| session(1_000, i64::MAX / 2, Limits::default()).1)
            .collect();
        for row in &rows {
            store.insert_session(row).await.unwrap();
        }
        let ids = |changes: &airlock_store::SessionChanges| {
            let mut ids: Vec<SessionId> = changes.statuses.iter().map(|s| s.id.clone()).collect();
            ids.sort();
            ids
        };
        // Without a cursor: only the sessions asked for, and a cursor.
        let first = store
            .session_changes(None, &[rows[0].id.clone()])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&first), vec![rows[0].id.clone()]);
        let mut cursor = first.next.unwrap();
        // Nothing changed: nothing read.
        let idle = store
            .session_changes(Some(cursor), &[])
            .await
            .unwrap()
            .unwrap();
        assert!(idle.statuses.is_empty(), "{idle:?}");
        cursor = idle.next.unwrap();

        // A transaction changes rows[1] and stays open; another changes
        // rows[2] and commits; a read looks; then the first commits.
        let mut slow = db.connect().await;
        sqlx::raw_sql(&format!(
            "BEGIN; UPDATE sessions SET revoked_at = 5000 WHERE id = '{}'",
            rows[1].id
        ))
        .execute(&mut slow)
        .await
        .unwrap();
        store.add_call_counts(&rows[2].id, 3, 1).await.unwrap();
        let seen = store
            .session_changes(Some(cursor), &[])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&seen), vec![rows[2].id.clone()]);
        assert_eq!((seen.statuses[0].allowed, seen.statuses[0].denied), (3, 1));
        sqlx::raw_sql("COMMIT").execute(&mut slow).await.unwrap();
        let late = store
            .session_changes(seen.next, &[])
            .await
            .unwrap()
            .unwrap();
        let revoked: Vec<_> = late
            .statuses
            .iter()
            .filter(|s| s.id == rows[1].id)
            .collect();
        assert_eq!(revoked.len(), 1, "{late:?}");
        assert_eq!(revoked[0].revoked_at, Some(5_000));
        // A lease (`reserved`) is no change anyone needs to read. (Rows
        // read before may come again while some transaction of the server
        // older than them is still running.)
        store.reserve_requests(&rows[0].id, 5).await.unwrap();
        let after = store
            .session_changes(late.next, &[])
            .await
            .unwrap()
            .unwrap();
        assert!(!ids(&after).contains(&rows[0].id), "{after:?}");
        store.close().await;
        sqlite.close().await;
    }

    #[tokio::test]
    async fn replicas_starting_at_once_migrate_once() {
        let Some(backend) = backend().await else {
            return;
        };
        let opens = (0..6).map(|_| {
            let url = backend.url.clone();
            tokio::spawn(async move { open(&url).await })
        });
        let mut stores = Vec::new();
        for store in futures_util::future::join_all(opens).await {
            stores.push(store.unwrap().expect("every replica starts"));
        }
        assert!(stores.iter().all(|s| s.is_shared()));
        let db = backend.pg.as_ref().unwrap();
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
            .unwrap()
            .count();
        assert_eq!(
            db.scalar_i64("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .await,
            i64::try_from(files).unwrap(),
            "every migration applied, once"
        );
        for store in stores {
            store.close().await;
        }
    }

    /// Replicas of this version starting at once on a trail of the old
    /// format: one moves it into batches, the others wait for it, and
    /// every record is there once.
    #[tokio::test]
    async fn replicas_starting_at_once_convert_the_old_trail_once() {
        let Some(backend) = backend().await else {
            return;
        };
        let (records, head) = records_after(&empty_chain(1), 900, 5_000, "ses_old");
        old_format_trail(&backend, &[(&records, &head)]).await;
        let opens = (0..4).map(|_| {
            let url = backend.url.clone();
            tokio::spawn(async move { open(&url).await })
        });
        let mut stores = Vec::new();
        for store in futures_util::future::join_all(opens).await {
            stores.push(store.unwrap().expect("every replica starts"));
        }
        for store in &stores {
            let read = store.audit_records(&by_chain(1, 0)).await.unwrap();
            assert!(read == records, "{} records read back", read.len());
        }
        assert!(!backend.has_table("audit_records").await);
        assert_eq!(
            backend
                .scalar(
                    "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0)::int8 FROM audit_batches"
                )
                .await,
            900
        );
        for store in stores {
            store.close().await;
        }
    }

    /// Two stores appending at the same head at the same moment: exactly
    /// one batch lands, the other store is told of the conflict, and
    /// nothing of its batch is left behind.
    #[tokio::test]
    async fn appends_racing_at_one_head_land_once() {
        let Some(backend) = backend().await else {
            return;
        };
        let a = backend.open().await;
        let b = backend.open().await;
        let head = a.audit_claim_chain(&genesis).await.unwrap();
        for round in 0..20_i64 {
            let head = a.audit_heads().await.unwrap()[0].clone();
            let (mine, my_head) = records_after(&head, 2, 1_000 + round * 10, "ses_a");
            let (theirs, their_head) = records_after(&head, 3, 1_000 + round * 10, "ses_b");
            let (x, y) = tokio::join!(
                a.audit_append(&mine, &my_head),
                b.audit_append(&theirs, &their_head)
            );
            assert!(
                x.is_ok() != y.is_ok(),
                "round {round}: exactly one lands ({x:?}, {y:?})"
            );
            let lost = if x.is_ok() { y } else { x };
            assert!(
                matches!(lost, Err(StoreError::ChainConflict(_))),
                "{lost:?}"
            );
        }
        // Every batch that landed is whole and indexed: the chain reads back
        // and verifies as one, and no session row names a batch that is
        // not there.
        let all = a
            .audit_records(&AuditQuery {
                chain: Some(head.chain),
                limit: 1_000,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_verifies(&all, &a.audit_heads().await.unwrap()[0]);
        assert_eq!(
            backend
                .scalar(
                    "SELECT count(*) FROM audit_batch_sessions s LEFT JOIN audit_batches b \
                     ON b.chain = s.chain AND b.first_seq = s.first_seq WHERE b.chain IS NULL"
                )
                .await,
            0
        );
        assert_eq!(
            backend.scalar("SELECT count(*) FROM audit_batches").await,
            20
        );
        a.close().await;
        b.close().await;
    }

    /// An older airlock still appending while this version converts its
    /// trail: the conversion waits for the insert in progress and moves its
    /// row too; once the old table is gone, old appends fail.
    #[tokio::test]
    async fn an_old_writers_insert_in_progress_is_converted_too() {
        let Some(backend) = backend().await else {
            return;
        };
        let (records, head) = records_after(&empty_chain(1), 4, 5_000, "ses_old");
        old_format_trail(&backend, &[(&records[..3], &head)]).await;
        let db = backend.pg.as_ref().unwrap();
        // The old writer's transaction: record 4, not committed yet.
        let mut old_writer = db.connect().await;
        sqlx::query("BEGIN").execute(&mut old_writer).await.unwrap();
        let r = &records[3];
        sqlx::query(&format!(
            "INSERT INTO audit_records (chain, seq, ts, session, provider, method, path, \
             decision, status, upstream_status, duration_us, bytes_in, bytes_out, flags, \
             prev_mac, mac) VALUES (1, 4, {}, NULL, 'openai', 'POST', '{}', '{}', {}, {}, {}, {}, \
             {}, {}, {}, {})",
            r.ts_ms,
            r.path,
            r.decision,
            r.status,
            r.upstream_status
                .map_or("NULL".to_owned(), |s| s.to_string()),
            r.duration_us,
            r.bytes_in,
            r.bytes_out,
            r.flags.bits(),
            backend.blob(&r.prev_mac),
            backend.blob(&r.mac),
        ))
        .execute(&mut old_writer)
        .await
        .unwrap();
        let url = backend.url.clone();
        let opening = tokio::spawn(async move { open(&url).await });
        // Wait until the conversion waits for the old writer's lock.
        let deadline = Instant::now() + Duration::from_secs(20);
        while db
            .scalar_i64(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'audit_records' AND NOT l.granted",
            )
            .await
            == 0
        {
            assert!(Instant::now() < deadline, "the conversion never waited");
            assert!(!opening.is_finished(), "opened without waiting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sqlx::query("COMMIT")
            .execute(&mut old_writer)
            .await
            .unwrap();
        let store = opening.await.unwrap().unwrap();
        let all = store.audit_records(&by_chain(1, 0)).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(all[3].mac, records[3].mac);
        // The old writer's next insert finds no table.
        assert!(sqlx::query("INSERT INTO audit_records (chain) VALUES (1)")
            .execute(&mut old_writer)
            .await
            .is_err());
        old_writer.close().await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn revocations_reach_every_replica_within_a_second() {
        let Some(backend) = backend().await else {
            return;
        };
        let a = backend.open().await;
        let b = backend.open().await;
        let mut feed = b.changes().unwrap();
        // The feed announces itself (connected: resync) before anything else.
        next_change(&mut feed, Duration::from_secs(10), |c| *c == Change::Resync)
            .await
            .expect("the feed connects");
        let (_, s) = session(1_000, 99_000, Limits::default());
        a.insert_session(&s).await.unwrap();

        let started = Instant::now();
        a.revoke_session(&s.id, 4_242).await.unwrap();
        let change = next_change(&mut feed, Duration::from_secs(5), |c| {
            matches!(c, Change::Session { .. })
        })
        .await
        .expect("B hears of the revocation");
        let took = started.elapsed();
        assert_eq!(
            change,
            Change::Session {
                id: s.id.clone(),
                revoked_at: Some(4_242),
                expires_at: 99_000
            }
        );
        assert!(took < Duration::from_secs(1), "took {took:?}");
        eprintln!("revocation pushed to the other store in {took:?}");

        // A revocation done by hand in SQL is announced too (the trigger),
        // and a second revocation changes nothing and says nothing.
        let db = backend.pg.as_ref().unwrap();
        let (_, t) = session(1_000, 77_000, Limits::default());
        a.insert_session(&t).await.unwrap();
        a.revoke_session(&s.id, 5_000).await.unwrap();
        db.execute(&format!(
            "UPDATE sessions SET expires_at = 88000 WHERE id = '{}'",
            t.id
        ))
        .await;
        let change = next_change(&mut feed, Duration::from_secs(5), |c| {
            matches!(c, Change::Session { .. })
        })
        .await
        .unwrap();
        assert_eq!(
            change,
            Change::Session {
                id: t.id.clone(),
                revoked_at: None,
                expires_at: 88_000
            }
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn credential_changes_are_announced() {
        let Some(backend) = backend().await else {
            return;
        };
        let store = backend.open().await;
        let mut feed = store.changes().unwrap();
        next_change(&mut feed, Duration::from_secs(10), |c| *c == Change::Resync)
            .await
            .unwrap();
        // What a credential write does in its transaction (the payload
        // format is Change::payload's).
        let payload = Change::Credential {
            provider: "openai".to_owned(),
        }
        .payload()
        .unwrap();
        let db = backend.pg.as_ref().unwrap();
        db.execute(&format!("SELECT pg_notify('airlock_changes', '{payload}')"))
            .await;
        let change = next_change(&mut feed, Duration::from_secs(5), |c| {
            matches!(c, Change::Credential { .. })
        })
        .await
        .unwrap();
        assert_eq!(
            change,
            Change::Credential {
                provider: "openai".to_owned()
            }
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_feed_reconnects_by_itself_and_asks_for_a_resync() {
        let Some(backend) = backend().await else {
            return;
        };
        let db = backend.pg.as_ref().unwrap();
        let a = backend.open().await;
        let b = backend.open().await;
        let mut feed = b.changes().unwrap();
        next_change(&mut feed, Duration::from_secs(10), |c| *c == Change::Resync)
            .await
            .unwrap();
        assert!(db.terminate_connections().await > 0);
        next_change(&mut feed, Duration::from_secs(10), |c| *c == Change::Resync)
            .await
            .expect("after reconnecting, the feed asks for a resync");
        // Both stores work again by themselves, and changes flow again.
        let (_, s) = session(1_000, 99_000, Limits::default());
        a.insert_session(&s).await.unwrap();
        a.revoke_session(&s.id, 5).await.unwrap();
        let change = next_change(&mut feed, Duration::from_secs(5), |c| {
            matches!(c, Change::Session { .. })
        })
        .await
        .unwrap();
        assert!(matches!(
            change,
            Change::Session {
                revoked_at: Some(5),
                ..
            }
        ));
        assert!(b.session_by_id(&s.id).await.unwrap().is_some());
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn reaching_max_denied_revokes_in_the_counting_statement() {
        let Some(backend) = backend().await else {
            return;
        };
        let a = backend.open().await;
        let b = backend.open().await;
        let mut feed = b.changes().unwrap();
        // B listens before anything is changed (a notification sent before
        // its LISTEN would be lost, and this test would wait for it).
        next_change(&mut feed, Duration::from_secs(10), |c| *c == Change::Resync)
            .await
            .unwrap();
        let (_, s) = session(1_000, i64::MAX, max_denied(3));
        a.insert_session(&s).await.unwrap();
        // Two replicas each saw fewer than three denials...
        let after_a = a.record_calls(&s.id, 1, 2, 10).await.unwrap().unwrap();
        assert_eq!((after_a.denied, after_a.revoked_at), (2, None));
        // ...the one whose count brings the total to three revokes for all.
        let after_b = b.record_calls(&s.id, 0, 1, 20).await.unwrap().unwrap();
        assert_eq!((after_b.denied, after_b.revoked_at), (3, Some(20)));
        let change = next_change(&mut feed, Duration::from_secs(5), |c| {
            matches!(c, Change::Session { .. })
        })
        .await
        .unwrap();
        assert!(matches!(change, Change::Session { id, revoked_at: Some(20), .. } if id == s.id));
        // Later counts keep the first revocation time.
        let later = a.record_calls(&s.id, 0, 1, 30).await.unwrap().unwrap();
        assert_eq!((later.denied, later.revoked_at), (4, Some(20)));
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn leases_never_add_up_to_more_than_max_requests() {
        let Some(backend) = backend().await else {
            return;
        };
        let stores = [
            backend.open().await,
            backend.open().await,
            backend.open().await,
        ];
        let (_, s) = session(
            1_000,
            i64::MAX,
            Limits {
                max_requests: Some(1_000),
                ..Limits::default()
            },
        );
        stores[0].insert_session(&s).await.unwrap();
        // The first lease is capped at an eighth of what is left.
        assert_eq!(stores[0].reserve_requests(&s.id, 500).await.unwrap(), 125);
        let tasks = stores.iter().map(|store| {
            let store = Arc::clone(store);
            let id = s.id.clone();
            tokio::spawn(async move {
                let mut got = 0;
                loop {
                    match store.reserve_requests(&id, 50).await.unwrap() {
                        0 => return got,
                        n => got += n,
                    }
                }
            })
        });
        let granted: u64 = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .sum();
        assert_eq!(125 + granted, 1_000, "every call handed out exactly once");
        assert_eq!(stores[1].reserve_requests(&s.id, 1).await.unwrap(), 0);
        // Given back, it can be handed out again.
        stores[2].release_requests(&s.id, 7).await.unwrap();
        assert_eq!(stores[1].reserve_requests(&s.id, 100).await.unwrap(), 1);
        let mut rest = 0;
        loop {
            match stores[0].reserve_requests(&s.id, 100).await.unwrap() {
                0 => break,
                n => rest += n,
            }
        }
        assert_eq!(rest, 6);
        // Sessions without max_requests have nothing to lease.
        let (_, free) = session(1_000, i64::MAX, Limits::default());
        stores[0].insert_session(&free).await.unwrap();
        assert_eq!(stores[0].reserve_requests(&free.id, 5).await.unwrap(), 0);
        for store in stores {
            store.close().await;
        }
    }

    #[tokio::test]
    async fn each_writer_owns_a_chain_and_a_dead_writers_chain_is_resumed() {
        let Some(backend) = backend().await else {
            return;
        };
        let a = backend.open().await;
        let b = backend.open().await;
        let head_a = a.audit_claim_chain(&genesis).await.unwrap();
        let head_b = b.audit_claim_chain(&genesis).await.unwrap();
        assert_ne!(head_a.chain, head_b.chain, "two live writers, two chains");
        let (ra, ha) = records_after(&head_a, 4, 1_000, "ses_a");
        let (rb, hb) = records_after(&head_b, 3, 1_000, "ses_b");
        a.audit_append(&ra, &ha).await.unwrap();
        b.audit_append(&rb, &hb).await.unwrap();
        let mut heads = a.audit_heads().await.unwrap();
        heads.sort_by_key(|h| h.chain);
        let mut expected = vec![ha.clone(), hb.clone()];
        expected.sort_by_key(|h| h.chain);
        assert_eq!(heads, expected);

        // A's process ends: the next writer resumes A's chain at its head,
        // not B's (still held), and starts no new one.
        a.close().await;
        drop(a);
        let c = backend.open().await;
        let head_c = c.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!(head_c, ha);
        // A fourth writer while B and C live gets a new chain.
        let d = backend.open().await;
        let head_d = d.audit_claim_chain(&genesis).await.unwrap();
        assert!(head_d.chain != ha.chain && head_d.chain != hb.chain);
        assert_eq!((head_d.seq, head_d.seal), (0, genesis(head_d.chain)));
        for store in [b, c, d] {
            store.close().await;
        }
    }

    /// Rows of `pg_locks` showing chain `chain`'s lock held (in this
    /// database).
    async fn chain_lock_holders(db: &FreshDb, chain: u32) -> i64 {
        db.scalar_i64(&format!(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = 1096107092 AND objid = {chain} AND objsubid = 2 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ))
        .await
    }

    #[tokio::test]
    async fn a_writer_takes_its_chain_lock_again_after_losing_its_connection() {
        let Some(backend) = backend().await else {
            return;
        };
        let db = backend.pg.as_ref().unwrap();
        let a = backend.open().await;
        let head = a.audit_claim_chain(&genesis).await.unwrap();
        assert_eq!(chain_lock_holders(db, head.chain).await, 1);
        db.terminate_connections().await;
        let started = Instant::now();
        loop {
            if chain_lock_holders(db, head.chain).await == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "lock not taken again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // So a writer starting now gets a chain of its own...
        let b = backend.open().await;
        let head_b = b.audit_claim_chain(&genesis).await.unwrap();
        assert_ne!(head_b.chain, head.chain);
        // ...and A goes on where it was.
        let (records, head1) = records_after(&head, 2, 1_000, "ses_a");
        a.audit_append(&records, &head1).await.unwrap();
        // Claiming again while holding a chain keeps it.
        assert_eq!(a.audit_claim_chain(&genesis).await.unwrap(), head1);
        a.close().await;
        b.close().await;
    }

    /// A writer whose chain lock another process took (its connection died
    /// and someone was quicker) stops appending to that chain, rather than
    /// writing on without the lock until a writer that claims the chain
    /// later conflicts with it on every batch; claiming again gives it
    /// another chain.
    #[tokio::test]
    async fn a_writer_whose_chain_lock_was_taken_appends_no_more() {
        let Some(backend) = backend().await else {
            return;
        };
        let db = backend.pg.as_ref().unwrap();
        let a = backend.open().await;
        let head = a.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        a.audit_append(&first, &head1).await.unwrap();

        let other = db
            .seize_advisory_lock(1_096_107_092, i32::try_from(head.chain).unwrap())
            .await;
        db.allow_connections(true).await;

        // A's keeper finds the lock taken (within a second or so); until
        // then A's appends still land (the head check keeps them safe).
        let started = Instant::now();
        let mut at = head1;
        let refused = loop {
            let (next, after) = records_after(&at, 1, 2_000, "ses_a");
            match a.audit_append(&next, &after).await {
                Ok(()) => at = after,
                Err(e) => break e,
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "A went on appending to a chain another process holds"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            matches!(refused, StoreError::ChainConflict(c) if c == head.chain),
            "{refused}"
        );
        let again = a.audit_claim_chain(&genesis).await.unwrap();
        assert_ne!(again.chain, head.chain);
        a.close().await;
        other.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_writer_that_lost_its_chain_cannot_fork_it() {
        let Some(backend) = backend().await else {
            return;
        };
        let db = backend.pg.as_ref().unwrap();
        let a = backend.open().await;
        let head = a.audit_claim_chain(&genesis).await.unwrap();
        let (first, head1) = records_after(&head, 2, 1_000, "ses_a");
        a.audit_append(&first, &head1).await.unwrap();

        // Another writer (this connection) takes A's chain while A is cut
        // off, and moves its head on.
        let mut other = db
            .seize_advisory_lock(1_096_107_092, i32::try_from(head.chain).unwrap())
            .await;
        let (by_other, head_other) = records_after(&head1, 1, 2_000, "ses_b");
        sqlx::query("UPDATE audit_chains SET head_seq = $1 WHERE id = $2")
            .bind(i64::try_from(head_other.seq).unwrap())
            .bind(i64::from(head.chain))
            .execute(&mut other)
            .await
            .unwrap();
        db.allow_connections(true).await;

        // A, unaware, appends where it thinks the head is: refused, nothing
        // written.
        let (by_a, head_a) = records_after(&head1, 1, 2_000, "ses_a");
        assert_eq!(by_a[0].seq, by_other[0].seq);
        assert!(matches!(
            a.audit_append(&by_a, &head_a).await,
            Err(StoreError::ChainConflict(c)) if c == head.chain
        ));
        // A claims again and gets a chain of its own.
        let again = a.audit_claim_chain(&genesis).await.unwrap();
        assert_ne!(again.chain, head.chain);
        assert_eq!((again.seq, again.seal), (0, genesis(again.chain)));
        let all = a.audit_records(&by_chain(head.chain, 0)).await.unwrap();
        assert_eq!(all, first);
        a.close().await;
    }
}
