//! Replicas: two or three real `airlock serve` processes on one PostgreSQL
//! database, behind no load balancer but called one after the other, in
//! front of one recording mock provider.
//!
//! Each test has its own fresh database. Without a reachable PostgreSQL
//! server the tests skip loudly, or fail when `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use airlock_testkit::client::{first_frame, request, Reply};
use airlock_testkit::pg::{self, FreshDb};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

const OPENAI_KEY: &str = "sk-real-openai-replicas-0123456789";
const ADMIN_TOKEN: &str = "adm_replicas_test_token_0123456789";
/// Every replica must MAC the audit trail with the same key.
const AUDIT_KEY: &str = "8f1d2c3b4a5968778695a4b3c2d1e0f00112233445566778899aabbccddeeff0";
/// The bound asserted for a revocation to hold on every replica.
const PROPAGATION_BOUND: Duration = Duration::from_secs(1);

/// Replica tests start many processes: a few at a time keeps the machine
/// (and so the timing bounds) honest.
static RUNNING: Semaphore = Semaphore::const_new(3);

/// The mock provider, the database, and the replicas on it.
struct Cluster {
    mock: MockProvider,
    replicas: Vec<Airlock>,
    store_options: Vec<String>,
    extra: String,
    // Dropped last: the database outlives the processes using it.
    db: FreshDb,
    _running: SemaphorePermit<'static>,
}

impl Cluster {
    /// `n` replicas started at once (so they also migrate at once), or
    /// `None` when PostgreSQL is unreachable outside CI.
    async fn start(n: usize, store_options: &[&str]) -> Option<Self> {
        Self::start_with(n, store_options, "").await
    }

    /// Like [`Cluster::start`], with `extra` TOML in every config.
    async fn start_with(n: usize, store_options: &[&str], extra: &str) -> Option<Self> {
        let running = RUNNING.acquire().await.unwrap();
        let db = pg::fresh_database().await?;
        let mock = MockProvider::start().await;
        let store_options: Vec<String> = store_options.iter().map(|s| (*s).to_owned()).collect();
        let starts = (0..n).map(|_| builder(&mock, &db, &store_options, extra).start());
        let replicas = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()
            .unwrap();
        Some(Self {
            mock,
            replicas,
            store_options,
            extra: extra.to_owned(),
            db,
            _running: running,
        })
    }

    /// Replaces replica `i` by a new process on the same database.
    async fn restart(&mut self, i: usize) {
        let replica = builder(&self.mock, &self.db, &self.store_options, &self.extra)
            .start()
            .await
            .unwrap();
        self.replicas[i] = replica;
    }
}

fn builder(
    mock: &MockProvider,
    db: &FreshDb,
    store_options: &[String],
    extra: &str,
) -> AirlockBuilder {
    let mut builder = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .config(extra)
        .provider("openai", &mock.url(), "bearer", OPENAI_KEY, "/v1")
        .store_url(db.url())
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("AIRLOCK_AUDIT_KEY", AUDIT_KEY);
    for option in store_options {
        builder = builder.store_option(option);
    }
    builder
}

/// A provider `vault` on `mock` whose credential is sealed in the store.
fn vault_config(mock: &MockProvider) -> String {
    format!(
        "[providers.vault]\nupstream = \"{}\"\nauth = \"bearer\"\ncredential = \"store\"\n\
         env_key = \"VAULT_API_KEY\"\nenv_base_url = \"VAULT_BASE_URL\"\nbase_path = \"\"\n",
        mock.url()
    )
}

/// The denials the database holds for session `id`.
async fn stored_denials(db: &FreshDb, id: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let denied: i64 = sqlx::query_scalar("SELECT denied FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    denied
}

/// Opens a session through `airlock`; returns (id, token). The scope is
/// `GET /v1/models` on openai.
async fn session(airlock: &Airlock, limits: Value) -> (String, String) {
    let s = airlock
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/v1/models"]}],
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

/// `GET {proxy}/openai/v1/{path}` with the session token.
async fn call(airlock: &Airlock, path: &str, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    let url = format!("{}/openai/v1/{path}", airlock.proxy_url());
    request("GET", &url, &[("authorization", &auth)], Bytes::new()).await
}

/// An allowed call (in scope).
async fn models(airlock: &Airlock, token: &str) -> Reply {
    call(airlock, "models", token).await
}

/// The status of an allowed call made while polling, or `None` when the
/// exchange did not complete: a response airlock cut short because the
/// session ended (or its audit record could not be written) meanwhile.
async fn poll_status(airlock: &Airlock, token: &str) -> Option<u16> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::get(format!("{}/openai/v1/models", airlock.proxy_url()))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .ok()
        .flatten()
}

fn error_code(reply: &Reply) -> String {
    reply
        .error_code()
        .unwrap_or_else(|| panic!("not an airlock error: {}", reply.text()))
}

/// Polls `f` every 5 ms until it is true; panics after `limit`. Returns how
/// long it took.
async fn eventually(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if f().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `airlock --config CONFIG audit verify` with the shared audit key.
fn audit_verify(config: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(config)
        .args(["audit", "verify"])
        .env("AIRLOCK_AUDIT_KEY", AUDIT_KEY)
        .output()
        .unwrap()
}

/// `GET /v1/sessions/{id}` on `airlock`.
async fn show(airlock: &Airlock, id: &str) -> Value {
    let (status, body) = airlock
        .admin("GET", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn sessions_are_shared_and_a_revocation_holds_on_every_replica_within_a_second() {
    let Some(cluster) = Cluster::start(3, &[]).await else {
        return;
    };
    let [a, b, c] = &cluster.replicas[..] else {
        unreachable!()
    };
    let (id, token) = session(a, json!({})).await;
    // Created on A: B and C serve it at once (and cache it).
    for replica in [a, b, c] {
        let reply = models(replica, &token).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(cluster.mock.request_count(), 3);
    for request in cluster.mock.requests() {
        assert_eq!(
            request.header("authorization").unwrap(),
            format!("Bearer {OPENAI_KEY}")
        );
    }
    // Listed by every replica.
    let (_, list) = c.admin("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(list["sessions"][0]["id"], id.as_str());

    // Revoked on B: refused on A and C (which both cached it) within 1 s.
    let started = Instant::now();
    let (status, _) = b
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    for replica in [a, c] {
        eventually(
            PROPAGATION_BOUND * 5,
            "revocation on every replica",
            async || poll_status(replica, &token).await == Some(401),
        )
        .await;
    }
    let took = started.elapsed();
    eprintln!("MEASURED: revocation on B refused on A and C after {took:?}");
    assert!(took < PROPAGATION_BOUND, "revocation took {took:?}");
    // From then on, refused everywhere, and nothing reaches the provider.
    let seen = cluster.mock.request_count();
    for replica in [a, b, c] {
        let reply = models(replica, &token).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert_eq!(error_code(&reply), "invalid_token");
    }
    assert_eq!(
        cluster.mock.request_count(),
        seen,
        "refused calls reach nothing"
    );
    assert_eq!(show(a, &id).await["state"], "revoked");
}

/// A replica whose own count reaches `max_denied` revokes the session at
/// once and writes the denial before the revocation: another replica,
/// told of the revocation, says why from its first refusal (round 37: the
/// revocation could land first, and its refusals said only "revoked" for
/// a second or so). Several rounds: the race lost about one in ten.
#[tokio::test]
async fn a_revocation_by_max_denied_arrives_with_its_reason() {
    let Some(cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let [a, b] = &cluster.replicas[..] else {
        unreachable!()
    };
    for round in 0..12 {
        let (_, token) = session(a, json!({"max_denied": 2})).await;
        // Both replicas hold the session.
        for replica in [a, b] {
            assert_eq!(models(replica, &token).await.status, 200);
        }
        for _ in 0..2 {
            assert_eq!(call(b, "files", &token).await.status, 403);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let first_refusal = loop {
            let reply = models(a, &token).await;
            if reply.status == 401 {
                break reply.text();
            }
            assert!(Instant::now() < deadline, "round {round}: not revoked on A");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert!(
            first_refusal.contains("max_denied"),
            "round {round}: {first_refusal}\nA:\n{}\nB:\n{}",
            a.output(),
            b.output()
        );
    }
}

#[tokio::test]
async fn max_denied_counts_denials_on_every_replica() {
    let Some(cluster) = Cluster::start(3, &[]).await else {
        return;
    };
    let [a, b, c] = &cluster.replicas[..] else {
        unreachable!()
    };
    let (id, token) = session(a, json!({"max_denied": 3})).await;
    for replica in [a, b, c] {
        assert_eq!(models(replica, &token).await.status, 200);
    }
    // Out-of-scope calls, two on A (back to back, quicker than the
    // flusher's pace), one on B: no replica saw three...
    for (n, replica) in [a, a, b].into_iter().enumerate() {
        let reply = call(replica, "files", &token).await;
        assert_eq!(reply.status, 403, "{}", reply.text());
        // Each denial is in the database before its refusal is answered.
        assert_eq!(stored_denials(&cluster.db, &id).await, n as i64 + 1);
    }
    // ...but together they did: the replica that refused the third
    // learned it from its own write, before it answered...
    let reply = models(b, &token).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert!(reply.text().contains("max_denied"), "{}", reply.text());
    // ...and the others as the revocation travels, saying why soon after
    // (they read the session's totals when its revocation arrives, rather
    // than at their next re-check, a second apart).
    let started = Instant::now();
    for replica in [a, b, c] {
        eventually(
            Duration::from_secs(5),
            "max_denied across replicas",
            async || poll_status(replica, &token).await == Some(401),
        )
        .await;
        eventually(
            Duration::from_millis(400),
            "the reason known on every replica",
            async || models(replica, &token).await.text().contains("max_denied"),
        )
        .await;
    }
    eprintln!(
        "MEASURED: max_denied across replicas revoked everywhere {:?} after the third denial",
        started.elapsed()
    );
    assert!(
        started.elapsed() < PROPAGATION_BOUND * 2,
        "{:?}",
        started.elapsed()
    );
    // (calls made while the revocation travelled may have been forwarded)
    let seen = cluster.mock.request_count();
    for replica in [a, b, c] {
        assert_eq!(models(replica, &token).await.status, 401);
    }
    assert_eq!(cluster.mock.request_count(), seen);
    let shown = show(b, &id).await;
    assert_eq!(shown["state"], "revoked");
    eventually(Duration::from_secs(5), "counts shown", async || {
        show(c, &id).await["calls"]["denied"] == 3
    })
    .await;
}

#[tokio::test]
async fn max_requests_counts_calls_on_every_replica() {
    let Some(cluster) = Cluster::start(3, &[]).await else {
        return;
    };
    let replicas = &cluster.replicas;
    let (id, token) = session(&replicas[0], json!({"max_requests": 5})).await;
    let mut statuses = Vec::new();
    for round in 0..5 {
        for replica in replicas {
            let reply = models(replica, &token).await;
            statuses.push(reply.status);
            if reply.status != 200 {
                assert_eq!(reply.status, 429, "round {round}: {}", reply.text());
                assert_eq!(error_code(&reply), "rate_limited");
            }
        }
    }
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(allowed, 5, "{statuses:?}");
    assert_eq!(&statuses[..5], &[200; 5], "calls within the quota all pass");
    assert_eq!(
        cluster.mock.request_count(),
        5,
        "the provider saw exactly max_requests calls"
    );
    eventually(Duration::from_secs(5), "allowed total", async || {
        show(&replicas[2], &id).await["calls"]["allowed"] == 5
    })
    .await;
}

/// A replica whose lease ran dry while another replica's lease still holds
/// unused calls does not answer "max_requests reached" (final, and a
/// denial toward `max_denied`): it answers a retryable 429 that counts as
/// no denial, until the quota is really spent (round 33: sessions lost
/// calls of their quota, and could be revoked, under concurrent load).
#[tokio::test]
async fn a_quota_leased_to_another_replica_is_not_refused_as_spent() {
    let Some(cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    let (id, token) = session(a, json!({"max_requests": 16, "max_denied": 3})).await;
    // A leases two calls (an eighth of 16) and makes one.
    assert_eq!(models(a, &token).await.status, 200);
    // B leases the other fourteen, one at a time, and makes them.
    let mut made = 0;
    let refusal = loop {
        let reply = models(b, &token).await;
        if reply.status != 200 {
            break reply;
        }
        made += 1;
        assert!(made <= 14, "B made more calls than it could lease");
    };
    assert_eq!(made, 14);
    let held = |reply: &Reply| {
        reply.status == 429
            && error_code(reply) == "rate_limited"
            && reply.text().contains("leased to other airlock replicas")
            && reply.headers.get("retry-after").is_some_and(|v| v == "1")
            && reply.headers.get("x-should-retry").is_none()
    };
    assert!(held(&refusal), "{refusal:?}");
    // More than max_denied of them: none counts.
    for _ in 0..4 {
        let reply = models(b, &token).await;
        assert!(held(&reply), "{reply:?}");
    }
    // A makes the last call of the quota from its lease.
    assert_eq!(models(a, &token).await.status, 200);
    // Once the totals are flushed, B finds the quota spent: final.
    eventually(Duration::from_secs(10), "the final refusal", async || {
        let reply = models(b, &token).await;
        if held(&reply) {
            return false;
        }
        assert_eq!(reply.status, 429, "{reply:?}");
        assert!(reply.text().contains("max_requests reached"), "{reply:?}");
        assert_eq!(reply.headers.get("x-should-retry").unwrap(), "false");
        true
    })
    .await;
    assert_eq!(cluster.mock.request_count(), 16);
    eventually(Duration::from_secs(5), "the totals", async || {
        let shown = show(a, &id).await;
        shown["calls"] == json!({"allowed": 16, "denied": 1})
    })
    .await;
    assert_eq!(show(a, &id).await["state"], "active");
}

/// Retryable refusals of a quota held elsewhere are no free pass for a
/// flood: they take from the session's second `requests_per_minute`
/// bucket (as refusals at `max_calls_in_flight` do), and past it the
/// refusals are the rate limit's, which count toward `max_denied`.
#[tokio::test]
async fn a_flood_of_retries_on_a_quota_held_elsewhere_runs_into_the_rate() {
    let Some(cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    let limits = json!({"max_requests": 16, "requests_per_minute": 20, "max_denied": 2});
    let (id, token) = session(a, limits).await;
    assert_eq!(models(a, &token).await.status, 200);
    for _ in 0..14 {
        assert_eq!(models(b, &token).await.status, 200);
    }
    // The second bucket's 20, then the rate's refusals, two of which end
    // the session.
    let mut held = 0;
    let mut rate = 0;
    let ended = loop {
        let reply = models(b, &token).await;
        match reply.status {
            429 if reply.text().contains("leased to other airlock replicas") => held += 1,
            429 if reply.text().contains("requests_per_minute exceeded") => rate += 1,
            _ => break reply,
        }
        assert!(
            held + rate <= 30,
            "{held} held, {rate} rate-limited: no end"
        );
    };
    assert_eq!((held, rate), (20, 2), "{ended:?}");
    assert_eq!(ended.status, 401, "{ended:?}");
    assert_eq!(show(a, &id).await["state"], "revoked");
}

/// The calls a replica killed with `kill -9` held in its lease are lost
/// (README): another replica that finds the rest of the quota held
/// elsewhere answers retryable 429s only while that could change, then the
/// final "max_requests reached" — not retryable refusals for ever.
#[tokio::test]
async fn a_quota_held_by_a_killed_replica_ends_in_the_final_refusal() {
    let Some(mut cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let (_, token) = session(&cluster.replicas[0], json!({"max_requests": 16})).await;
    assert_eq!(models(&cluster.replicas[0], &token).await.status, 200);
    cluster.replicas[0].kill();
    let b = &cluster.replicas[1];
    for _ in 0..14 {
        assert_eq!(models(b, &token).await.status, 200);
    }
    let first = models(b, &token).await;
    assert!(
        first.text().contains("leased to other airlock replicas"),
        "{first:?}"
    );
    let waited = eventually(Duration::from_secs(20), "the final refusal", async || {
        let reply = models(b, &token).await;
        assert_eq!(reply.status, 429, "{reply:?}");
        reply.text().contains("max_requests reached")
    })
    .await;
    eprintln!("final refusal after {waited:?}");
    assert_eq!(
        cluster.mock.request_count(),
        15,
        "the killed replica's call is lost"
    );
}

/// A burst of calls on one replica spends every call of `max_requests`:
/// a lease that another call emptied is refilled, not answered with a 429
/// (which would count toward `max_denied` and revoke the session here).
#[tokio::test]
async fn a_burst_on_one_replica_spends_every_call_of_max_requests() {
    let Some(cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let a = &cluster.replicas[0];
    let (id, token) = session(a, json!({"max_requests": 12, "max_denied": 1})).await;
    let burst: Vec<_> = (0..12).map(|_| models(a, &token)).collect();
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200; 12], "calls within the quota all pass");
    let over = models(a, &token).await;
    assert_eq!(over.status, 429, "{}", over.text());
    assert_eq!(cluster.mock.request_count(), 12);
    eventually(Duration::from_secs(5), "allowed total", async || {
        show(&cluster.replicas[1], &id).await["calls"]["allowed"] == 12
    })
    .await;
}

#[tokio::test]
async fn a_replica_killed_with_sigkill_and_restarted_picks_up_where_it_was() {
    let Some(mut cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let (id_a, token_a) = session(&cluster.replicas[0], json!({})).await;
    for _ in 0..3 {
        assert_eq!(models(&cluster.replicas[0], &token_a).await.status, 200);
    }
    cluster.replicas[0].kill();
    // B serves on alone: A's sessions are B's too.
    let b = &cluster.replicas[1];
    assert_eq!(models(b, &token_a).await.status, 200);
    let (_, token_b) = session(b, json!({})).await;
    let (status, _) = b
        .admin("DELETE", &format!("/v1/sessions/{id_a}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);

    cluster.restart(0).await;
    let [a, b] = &cluster.replicas[..] else {
        unreachable!()
    };
    // The new A knows what happened while it was down.
    assert_eq!(models(a, &token_a).await.status, 401);
    assert_eq!(models(a, &token_b).await.status, 200);
    assert_eq!(models(b, &token_b).await.status, 200);
    // Its revocations reach B like before.
    let (id_c, token_c) = session(a, json!({})).await;
    assert_eq!(models(b, &token_c).await.status, 200);
    let (status, _) = a
        .admin("DELETE", &format!("/v1/sessions/{id_c}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually(
        PROPAGATION_BOUND,
        "revocation from the restarted replica",
        async || poll_status(b, &token_c).await == Some(401),
    )
    .await;
    // The trail of the killed process, resumed by its successor, verifies.
    let (status, verdict) = b.admin("GET", "/v1/audit/verify", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(verdict["ok"], true, "{verdict}");
}

#[tokio::test]
async fn audit_of_every_replica_lands_in_postgres_and_verifies_as_one_trail() {
    let Some(mut cluster) = Cluster::start(3, &[]).await else {
        return;
    };
    let (_, token) = session(&cluster.replicas[0], json!({})).await;
    let mut calls = 0;
    for replica in &cluster.replicas {
        for path in ["models", "models", "files"] {
            call(replica, path, &token).await;
            calls += 1;
        }
    }
    let a = &cluster.replicas[0];
    let records = eventually(
        Duration::from_secs(10),
        "every record written",
        async || {
            let (_, verdict) = a.admin("GET", "/v1/audit/verify", None).await.unwrap();
            verdict["ok"] == true && verdict["records"] == calls
        },
    )
    .await;
    eprintln!("all {calls} records verified after {records:?}");
    assert_eq!(
        cluster
            .db
            .scalar_i64("SELECT COUNT(DISTINCT chain) FROM audit_batches")
            .await,
        3,
        "one chain per replica"
    );
    let (_, listed) = a.admin("GET", "/v1/audit?limit=100", None).await.unwrap();
    assert_eq!(listed["records"].as_array().unwrap().len(), calls);

    // `airlock audit verify` reads the database itself, with the shared key.
    for replica in &mut cluster.replicas {
        replica.terminate().await.unwrap();
    }
    let config = cluster.replicas[0].config_path();
    let out = audit_verify(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the key: named as the servers' key, not a default key file
    // that a PostgreSQL store never has (round 43).
    let keyless = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(&config)
        .args(["audit", "verify"])
        .env_remove("AIRLOCK_AUDIT_KEY")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&keyless.stderr);
    assert_eq!(keyless.status.code(), Some(2), "{said}");
    assert!(
        said.contains(
            "no audit key: set AIRLOCK_AUDIT_KEY or [audit] key_file to the key the servers on \
             this PostgreSQL store run with"
        ),
        "{said}"
    );
    assert_eq!(
        stdout.trim(),
        format!("audit trail intact: {calls} records in 3 chains")
    );

    // Tampering with another replica's record is found too.
    airlock_store::testing::rewrite_postgres_chain(cluster.db.url(), 2, |records| {
        assert_eq!(records[1].seq, 2);
        records[1].status = 299;
    })
    .await
    .unwrap();
    let out = audit_verify(&config);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("seq 2 of chain 2: bad mac"), "{stdout}");
    // A second broken chain is named as well, not only the first.
    airlock_store::testing::rewrite_postgres_chain(cluster.db.url(), 3, |records| {
        records[0].path.push('x');
    })
    .await
    .unwrap();
    let out = audit_verify(&config);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("audit trail broken: first bad record is seq 2 of chain 2: bad mac"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\n  chain 3 is broken too: first bad record is seq 1: bad mac"),
        "{stdout}"
    );
    // Chain 1's 3 records, and chain 2's one before its break.
    assert!(
        stdout.contains(&format!("({} records in 3 chains verified", calls - 5)),
        "{stdout}"
    );
}

/// `airlock audit prune` on PostgreSQL, while two replicas write: each
/// replica's chain loses its records that ended before T and gets a sealed
/// floor; the replicas go on appending, the trail verifies from the
/// floors, and a floor removed behind airlock's back breaks its chain.
#[tokio::test]
async fn pruning_a_shared_trail_keeps_every_chain_verifiable() {
    let Some(mut cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let (_, token) = session(&cluster.replicas[0], json!({})).await;
    for replica in &cluster.replicas {
        for _ in 0..3 {
            assert_eq!(models(replica, &token).await.status, 200);
        }
    }
    // Every record so far ended before T, every later one at or after it.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1;
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        < before
    {
        std::hint::spin_loop();
    }
    for replica in &cluster.replicas {
        for _ in 0..2 {
            assert_eq!(models(replica, &token).await.status, 200);
        }
    }
    let before = airlock_core::audit::format_ts(i64::try_from(before).unwrap());
    let prune = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("--config")
        .arg(cluster.replicas[0].config_path())
        .args(["audit", "prune", "--before", &before, "--json"])
        .env("AIRLOCK_AUDIT_KEY", AUDIT_KEY)
        .output()
        .unwrap();
    assert!(prune.status.success(), "{prune:?}");
    let pruned: Value = serde_json::from_slice(&prune.stdout).unwrap();
    assert_eq!(pruned["records"], 6, "{pruned}");
    for chain in pruned["chains"].as_array().unwrap() {
        assert_eq!(
            (&chain["first_seq"], &chain["last_seq"], &chain["records"]),
            (&json!(1), &json!(3), &json!(3)),
            "{pruned}"
        );
    }
    for replica in &cluster.replicas {
        assert_eq!(models(replica, &token).await.status, 200);
    }
    let (_, verdict) = cluster.replicas[1]
        .admin("GET", "/v1/audit/verify", None)
        .await
        .unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(verdict["records"], 6, "{verdict}");
    assert_eq!(verdict["pruned"].as_array().unwrap().len(), 2, "{verdict}");

    for replica in &mut cluster.replicas {
        replica.terminate().await.unwrap();
    }
    let config = cluster.replicas[0].config_path();
    let out = audit_verify(&config);
    assert!(out.status.success(), "{out:?}");
    cluster
        .db
        .execute("DELETE FROM audit_floors WHERE chain = (SELECT MAX(chain) FROM audit_floors)")
        .await;
    let out = audit_verify(&config);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("seq 4 of chain"), "{stdout}");
    assert!(stdout.contains("gap: record 1 is missing"), "{stdout}");

    // A chain whose head row is deleted is named, not left out (round 33).
    let hidden = cluster
        .db
        .scalar_i64("SELECT MIN(id) FROM audit_chains")
        .await;
    cluster
        .db
        .execute(&format!("DELETE FROM audit_chains WHERE id = {hidden}"))
        .await;
    let out = audit_verify(&config);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "first bad record is seq 4 of chain {hidden}: no head"
        )),
        "{stdout}"
    );
}

/// A replica whose audit chain lock another process took while its
/// connection was down moves to another chain at its next commit, and the
/// call that commit holds is answered (not refused while the writer
/// switches); the trail verifies.
#[tokio::test]
async fn a_replica_whose_chain_lock_was_taken_moves_to_another_chain() {
    let Some(cluster) = Cluster::start(1, &[]).await else {
        return;
    };
    let a = &cluster.replicas[0];
    let (_, token) = session(a, json!({})).await;
    assert_eq!(models(a, &token).await.status, 200);
    let chain: i64 = cluster
        .db
        .scalar_i64("SELECT MAX(id) FROM audit_chains")
        .await;

    // A's connections end and, before A takes its lock again, another
    // process takes it.
    let other = cluster
        .db
        .seize_advisory_lock(1_096_107_092, i32::try_from(chain).unwrap())
        .await;
    cluster.db.allow_connections(true).await;
    eventually(
        Duration::from_secs(15),
        "A to find its lock taken",
        async || {
            a.output()
                .contains("another process holds this process's audit chain")
        },
    )
    .await;

    assert_eq!(models(a, &token).await.status, 200);
    // The call's record is on another chain: claimed when the lock was
    // found taken, or when the commit met the conflict (which of the two
    // comes first is a race; either is right).
    let moved: i64 = cluster
        .db
        .scalar_i64("SELECT MAX(chain) FROM audit_batches")
        .await;
    assert!(
        moved > chain,
        "records still on chain {chain}:\n{}",
        a.output()
    );
    let out = audit_verify(&a.config_path());
    assert!(out.status.success(), "{out:?}");
    other.close().await.unwrap();
}

#[tokio::test]
async fn a_replica_cut_off_from_the_database_fails_closed_and_recovers_by_itself() {
    let Some(cluster) = Cluster::start(2, &["max_staleness = \"2s\""]).await else {
        return;
    };
    let [a, b] = &cluster.replicas[..] else {
        unreachable!()
    };
    let (known_id, known) = session(a, json!({})).await;
    let (_, unknown) = session(a, json!({})).await;
    assert_eq!(models(b, &known).await.status, 200);

    // 1. Every connection ended (a database restart): both replicas
    //    reconnect by themselves; sessions and revocations work again.
    assert!(cluster.db.terminate_connections().await > 0);
    eventually(
        Duration::from_secs(10),
        "serving after the connections ended",
        async || poll_status(b, &known).await == Some(200),
    )
    .await;
    let (id, fresh) = session(a, json!({})).await;
    assert_eq!(models(b, &fresh).await.status, 200);
    let started = Instant::now();
    let (status, _) = a
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually(
        PROPAGATION_BOUND * 5,
        "revocation after reconnecting",
        async || poll_status(b, &fresh).await == Some(401),
    )
    .await;
    eprintln!(
        "MEASURED: revocation after reconnecting held on B after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < PROPAGATION_BOUND,
        "{:?}",
        started.elapsed()
    );

    // 2. The database out of reach: B refuses a session it does not know
    //    at once, and within the staleness bound the ones it knows.
    let seen = cluster.mock.request_count();
    cluster.db.allow_connections(false).await;
    cluster.db.terminate_connections().await;
    let cut = Instant::now();
    let reply = models(b, &unknown).await;
    assert!(reply.status >= 500, "{}: {}", reply.status, reply.text());
    assert!(reply.error_code().is_some(), "{}", reply.text());
    eventually(
        Duration::from_secs(10),
        "known sessions refused",
        async || poll_status(b, &known).await.is_some_and(|s| s >= 500),
    )
    .await;
    eprintln!(
        "MEASURED: known session refused {:?} after the database went away",
        cut.elapsed()
    );
    assert!(
        cut.elapsed() < Duration::from_secs(2) + Duration::from_secs(2),
        "{:?}",
        cut.elapsed()
    );
    // Still refused a while later: failing closed is not a blip.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(models(b, &known).await.status >= 500);
    assert!(models(b, &unknown).await.status >= 500);
    assert_eq!(
        cluster.mock.request_count(),
        seen,
        "nothing reached the provider meanwhile"
    );

    // 3. Back by itself once the database is.
    cluster.db.allow_connections(true).await;
    let took = eventually(Duration::from_secs(20), "recovery", async || {
        poll_status(b, &known).await == Some(200)
    })
    .await;
    eprintln!("MEASURED: B serving again {took:?} after the database came back");
    assert_eq!(models(b, &unknown).await.status, 200);
    let (_, after) = session(b, json!({})).await;
    assert_eq!(models(a, &after).await.status, 200);
    // 4. The calls B refused while the database was gone are in the trail,
    //    written once it came back and flagged so (round 25: they were
    //    counted lost, an error getting a connection taken for one whose
    //    write may have landed).
    eventually(
        Duration::from_secs(10),
        "refusals written late",
        async || {
            let (_, page) = b
                .admin("GET", &format!("/v1/audit?session={known_id}"), None)
                .await
                .unwrap();
            page["records"].as_array().is_some_and(|records| {
                records.iter().any(|r| {
                    r["status"].as_u64().is_some_and(|s| s >= 500)
                        && r["flags"]
                            .as_array()
                            .is_some_and(|f| f.contains(&json!("written_late")))
                })
            })
        },
    )
    .await;
    let (_, verdict) = a.admin("GET", "/v1/audit/verify", None).await.unwrap();
    assert_eq!(verdict["ok"], true, "{verdict}");
}

#[tokio::test]
async fn cached_sessions_are_served_for_max_staleness_at_most_without_the_database() {
    // Audit that does not fail closed, so what is seen is the store's bound.
    let Some(cluster) = Cluster::start_with(
        2,
        &["max_staleness = \"3s\""],
        "[audit]\nfail_closed = false",
    )
    .await
    else {
        return;
    };
    let [a, b] = &cluster.replicas[..] else {
        unreachable!()
    };
    let (_, known) = session(a, json!({})).await;
    // Created on B: A has never seen it.
    let (_, unknown) = session(b, json!({})).await;
    assert_eq!(models(a, &known).await.status, 200);
    // An event stream on A (an event every 50 ms for 50 s), read to its end
    // in the background.
    let streamer = a
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/sse"]}],
            "ttl_seconds": 600,
        }))
        .await
        .unwrap();
    let (first, mut rest) = first_frame(
        &format!("{}/openai/sse?events=1000&delay_ms=50", a.proxy_url()),
        streamer["token"].as_str().unwrap(),
    )
    .await;
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    let stream = tokio::spawn(async move {
        let mut last = String::new();
        while let Some(Ok(frame)) = rest.frame().await {
            if let Some(data) = frame.data_ref() {
                last = String::from_utf8_lossy(data).into_owned();
            }
        }
        (Instant::now(), last)
    });

    cluster.db.allow_connections(false).await;
    cluster.db.terminate_connections().await;
    let cut = Instant::now();
    // The last re-check was at most a second ago: served from memory...
    assert_eq!(models(a, &known).await.status, 200);
    // ...but not a session it has never seen.
    let reply = models(a, &unknown).await;
    assert!(reply.status >= 500, "{}: {}", reply.status, reply.text());
    // Refused once the bound is over, with a JSON error.
    eventually(
        Duration::from_secs(10),
        "known session refused",
        async || poll_status(a, &known).await.is_some_and(|s| s >= 500),
    )
    .await;
    let took = cut.elapsed();
    eprintln!("MEASURED: cached session served for {took:?} without the database (bound 3s)");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(1_500),
        "{took:?}"
    );
    let reply = models(a, &known).await;
    assert!(reply.error_code().is_some(), "{}", reply.text());
    // A load balancer asking A is told (round 25: `/readyz` said ready
    // while every call was refused).
    let ready = request("GET", &format!("{}/readyz", a.admin_url()), &[], "").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.json()["status"], "store_unavailable");
    // The stream ends within the same bound, with an `error` event saying
    // why (round 25: streams and tunnels ran on for as long as the database
    // was gone, though a revocation elsewhere could not reach A).
    let (ended, last) = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .expect("the stream ran on without the database")
        .unwrap();
    let lasted = ended - cut;
    eprintln!("MEASURED: stream cut {lasted:?} after the database went away (bound 3s)");
    assert!(lasted >= Duration::from_secs(2), "{lasted:?}");
    assert!(last.starts_with("event: error"), "{last}");
    assert!(last.contains("\"store_unavailable\""), "{last}");
    // The admin API says the store is out of reach: 503, not 500 (round 25).
    let (status, body) = a.admin("GET", "/v1/sessions", None).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    cluster.db.allow_connections(true).await;
    eventually(Duration::from_secs(20), "recovery", async || {
        poll_status(a, &known).await == Some(200)
    })
    .await;
    assert_eq!(models(a, &unknown).await.status, 200);
    let ready = request("GET", &format!("{}/readyz", a.admin_url()), &[], "").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
}

/// A replica started with another audit key or master key than the one
/// the store was first written with is refused, naming the key: its
/// records would never verify with the others', and a credential it
/// sealed could not be opened by them.
#[tokio::test]
async fn a_replica_with_another_audit_key_or_master_key_is_refused() {
    let Some(db) = pg::fresh_database().await else {
        return;
    };
    let _running = RUNNING.acquire().await.unwrap();
    let mock = MockProvider::start().await;
    let config = vault_config(&mock);
    let start = |audit_key: String, master_key: String| {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&config)
            .store_url(db.url())
            .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AIRLOCK_AUDIT_KEY", &audit_key)
            .env("AIRLOCK_MASTER_KEY", &master_key)
            .start()
    };
    let (audit, master) = (AUDIT_KEY.to_owned(), "1f".repeat(32));
    let mut first = start(audit.clone(), master.clone()).await.unwrap();
    let other_audit = start("cd".repeat(32), master.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        other_audit.contains("is not the one this store's audit trail was written with"),
        "{other_audit}"
    );
    // With a credential sealed in the store, the key is refused as such,
    // before that credential is opened (round 40: "does not open", after
    // another had been logged as loaded).
    let (status, body) = first
        .admin(
            "PUT",
            "/v1/providers/vault/credential",
            Some(json!({"value": "vault-secret-sealed-00001"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let other_master = start(audit.clone(), "2e".repeat(32))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        other_master.contains("is not the one this store's credentials are sealed with")
            && other_master.contains("AIRLOCK_MASTER_KEY"),
        "{other_master}"
    );
    assert!(
        !other_master.contains("credential loaded"),
        "{other_master}"
    );
    assert!(!other_master.contains("does not open"), "{other_master}");
    let mut second = start(audit, master).await.unwrap();
    second.terminate().await.unwrap();
    first.terminate().await.unwrap();
}

#[tokio::test]
async fn a_stored_credential_set_on_one_replica_applies_on_the_others() {
    const MASTER_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let Some(db) = pg::fresh_database().await else {
        return;
    };
    let _running = RUNNING.acquire().await.unwrap();
    let mock = MockProvider::start().await;
    let config = vault_config(&mock);
    let start = || {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .config(&config)
            .store_url(db.url())
            .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AIRLOCK_AUDIT_KEY", AUDIT_KEY)
            .env("AIRLOCK_MASTER_KEY", MASTER_KEY)
            .start()
    };
    let (a, b) = (start().await.unwrap(), start().await.unwrap());
    let created = a
        .create_session(json!({
            "scope": [{"provider": "vault", "methods": ["GET"], "paths": ["/**"]}],
            "ttl_seconds": 600,
        }))
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let get = |airlock: &Airlock| {
        let url = format!("{}/vault/x", airlock.proxy_url());
        let auth = format!("Bearer {token}");
        async move { request("GET", &url, &[("authorization", &auth)], Bytes::new()).await }
    };
    assert_eq!(get(&b).await.status, 503, "no credential anywhere yet");

    for value in ["vault-secret-one-000000", "vault-secret-two-000000"] {
        let (status, body) = a
            .admin(
                "PUT",
                "/v1/providers/vault/credential",
                Some(json!({"value": value})),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let set_at = Instant::now();
        loop {
            mock.clear();
            let reply = get(&b).await;
            let seen = mock
                .requests()
                .first()
                .and_then(|r| r.header("authorization"));
            if reply.status == 200 && seen.as_deref() == Some(&format!("Bearer {value}")) {
                break;
            }
            assert!(
                set_at.elapsed() < PROPAGATION_BOUND,
                "B still uses {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Removed on A (a leaked key, no successor at hand yet): B stops using
    // it once it hears of the removal, and the provider sees nothing more.
    let (status, body) = a
        .admin("DELETE", "/v1/providers/vault/credential", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["removed"], &body["set"]),
        (&json!(true), &json!(false))
    );
    eventually(PROPAGATION_BOUND, "B without the credential", async || {
        mock.clear();
        get(&b).await.status == 503 && mock.requests().is_empty()
    })
    .await;
    let (status, body) = a
        .admin(
            "PUT",
            "/v1/providers/vault/credential",
            Some(json!({"value": "vault-secret-two-000000"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(
        PROPAGATION_BOUND,
        "B with the credential again",
        async || {
            mock.clear();
            get(&b).await.status == 200
        },
    )
    .await;
    // The plaintext is nowhere in the database.
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT sealed FROM credentials")
        .fetch_all(&sqlx::PgPool::connect(db.url()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].0.windows(8).any(|w| w == b"vault-se"));

    // A change B was never told of (written with triggers off, as if the
    // announcement were lost while its feed was down): B reads every stored
    // credential again when its feed comes back.
    let sealed_two = hex_of(&rows[0].0);
    let (status, _) = a
        .admin(
            "PUT",
            "/v1/providers/vault/credential",
            Some(json!({"value": "vault-secret-three-0000"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let uses = |value: &'static str| {
        let (mock, get, b) = (&mock, &get, &b);
        async move {
            mock.clear();
            let reply = get(b).await;
            let seen = mock
                .requests()
                .first()
                .and_then(|r| r.header("authorization"));
            reply.status == 200 && seen.as_deref() == Some(&format!("Bearer {value}"))
        }
    };
    eventually(PROPAGATION_BOUND, "B on the third value", async || {
        uses("vault-secret-three-0000").await
    })
    .await;
    db.execute(&format!(
        "SET session_replication_role = replica; \
         UPDATE credentials SET sealed = '\\x{sealed_two}' WHERE provider = 'vault'"
    ))
    .await;
    assert!(
        uses("vault-secret-three-0000").await,
        "B heard of it after all"
    );
    assert!(db.terminate_connections().await > 0);
    let took = eventually(
        Duration::from_secs(20),
        "B reloading after its feed's resync",
        async || uses("vault-secret-two-000000").await,
    )
    .await;
    eprintln!("MEASURED: B took up the unannounced credential {took:?} after its feed dropped");

    // A removal announced to no one, its feed up all along: B's periodic
    // re-check of the stored credentials (every 10 s) takes the key out of
    // use (review of round 43: it stayed in use until some other change).
    db.execute(
        "SET session_replication_role = replica; DELETE FROM credentials WHERE provider = 'vault'",
    )
    .await;
    let took = eventually(
        Duration::from_secs(25),
        "B without the silently removed credential",
        async || {
            mock.clear();
            get(&b).await.status == 503 && mock.requests().is_empty()
        },
    )
    .await;
    eprintln!("MEASURED: B dropped the unannounced removal after {took:?}");
    b.wait_for_output("changed without this replica hearing of it", 0)
        .await;

    // The database gone longer than max_staleness: `airlock status` still
    // reports, the stored credential's state unknown (round 40: it gave up
    // on the whole report at that credential's 503).
    db.allow_connections(false).await;
    db.terminate_connections().await;
    eventually(Duration::from_secs(20), "B not ready", async || {
        let ready = request("GET", &format!("{}/readyz", b.admin_url()), &[], "").await;
        ready.json()["status"] == "store_unavailable"
    })
    .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("status")
        .env("AIRLOCK_ADMIN_URL", b.admin_url())
        .env("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{shown}{out:?}");
    assert!(shown.contains("not ready: the shared store"), "{shown}");
    assert!(
        shown.contains("\n  vault  unknown (the server could not read its store)\n"),
        "{shown}"
    );
    assert!(shown.contains("sessions:   unknown"), "{shown}");
    db.allow_connections(true).await;
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stream served by one replica ends when its session is revoked on
/// another: the revocation reaches it through the change feed and wakes the
/// idle stream at once, without its next event.
#[tokio::test]
async fn a_session_revoked_on_one_replica_ends_its_idle_stream_on_another() {
    revoked_on_a_ends_a_stream_on_b(false).await;
}

/// The same while B drains after SIGTERM: its stream in flight still learns
/// of the revocation (B keeps following other replicas until it has
/// drained).
#[tokio::test]
async fn a_revocation_reaches_a_stream_on_a_draining_replica() {
    revoked_on_a_ends_a_stream_on_b(true).await;
}

/// Opens a stream through B, revokes its session on A (B draining after
/// SIGTERM when `draining`), and checks that B ends the idle stream at
/// once.
async fn revoked_on_a_ends_a_stream_on_b(draining: bool) {
    let Some(cluster) = Cluster::start(2, &[]).await else {
        return;
    };
    let [a, b] = &cluster.replicas[..] else {
        unreachable!()
    };
    let created = a
        .create_session(json!({
            "scope": [{"provider": "openai", "methods": ["GET"], "paths": ["/gated-sse"]}],
            "ttl_seconds": 600,
        }))
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();

    // Through B: the first event, then nothing (the mock's gate stays shut).
    let url = format!("{}/openai/gated-sse", b.proxy_url());
    let (first, mut body) = first_frame(&url, token).await;
    assert_eq!(&first[..], b"data: first\n\n");

    if draining {
        b.signal("TERM").unwrap();
        let readyz = format!("{}/readyz", b.admin_url());
        eventually(Duration::from_secs(10), "B draining", async || {
            request("GET", &readyz, &[], Bytes::new()).await.status == 503
        })
        .await;
    }
    let started = Instant::now();
    let (status, _) = a
        .admin("DELETE", &format!("/v1/sessions/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let event = tokio::time::timeout(PROPAGATION_BOUND * 5, body.frame())
        .await
        .expect("the stream outlived its session revoked on another replica");
    let took = started.elapsed();
    eprintln!("MEASURED: revocation on A ended the stream on B after {took:?}");
    // airlock's closing error event, then the cut.
    let event = event.unwrap().unwrap().into_data().unwrap();
    assert!(event.starts_with(b"event: error\n"), "{event:?}");
    let next = tokio::time::timeout(PROPAGATION_BOUND * 5, body.frame())
        .await
        .expect("the stream was not cut after airlock's event");
    assert!(
        !matches!(next, Some(Ok(_))),
        "the stream went on after the revocation: {next:?}"
    );
    assert!(took < PROPAGATION_BOUND, "the stream ended {took:?} after");
}
