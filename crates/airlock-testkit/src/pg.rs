//! Fresh PostgreSQL databases for tests: each test gets its own, so runs
//! never see each other's rows.
//!
//! The server is `postgres://postgres@127.0.0.1:5432` (trust auth) unless
//! `AIRLOCK_TEST_POSTGRES` names another (`postgres://USER[:PASS]@HOST:PORT`,
//! no database). When it cannot be reached, [`fresh_database`] panics if
//! `CI=true` (CI must run these tests for real) and otherwise returns `None`
//! after a loud message, so the test can skip.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection, PgConnection};

/// Environment variable naming the server to use.
pub const SERVER_ENV: &str = "AIRLOCK_TEST_POSTGRES";
/// The server used when [`SERVER_ENV`] is not set.
pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";
/// Prefix of every database this module creates.
pub const PREFIX: &str = "airlock_t_";

/// How long connecting to the server may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Test databases older than this were left behind by a killed run: the
/// first [`fresh_database`] of a process drops them.
const LEFTOVER_AGE: Duration = Duration::from_secs(6 * 3600);

/// A database created for one test, dropped (with any connection still on
/// it) when this is dropped.
#[derive(Debug)]
pub struct FreshDb {
    server: String,
    name: String,
    url: String,
}

/// Creates a new, empty database `airlock_t_<unix seconds>_<random>`.
/// `None` (after a loud message on stderr) when PostgreSQL is unreachable
/// outside CI.
///
/// # Panics
/// When PostgreSQL is unreachable and `CI=true`, or when it is reachable but
/// refuses to create the database.
pub async fn fresh_database() -> Option<FreshDb> {
    let server = server();
    let mut admin = match maintenance(&server).await {
        Ok(conn) => conn,
        Err(err) => {
            let message = format!(
                "PostgreSQL is unreachable at {server} ({err:#}); set {SERVER_ENV} or start it"
            );
            if in_ci() {
                panic!("CI=true and {message}: the PostgreSQL tests must run in CI");
            }
            // Straight to stderr, past the test harness's capture, so a
            // skip is seen even when the test "passes".
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPING a PostgreSQL test: {message} !!!!!!!!\n"
            );
            return None;
        }
    };
    drop_leftovers(&mut admin).await;
    let name = format!(
        "{PREFIX}{}_{:012x}",
        unix_seconds(),
        rand::random::<u64>() >> 16
    );
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("creating database {name} on {server}: {e}"));
    let _ = admin.close().await;
    let url = format!("{server}/{name}");
    Some(FreshDb { server, name, url })
}

/// Whether this run is CI (`CI=true` or `CI=1`): PostgreSQL tests fail
/// instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drops test databases left behind by killed runs (once per process).
async fn drop_leftovers(admin: &mut PgConnection) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'airlock\\_t\\_%'",
        )
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
        let cutoff = unix_seconds().saturating_sub(LEFTOVER_AGE.as_secs());
        for name in names {
            let created = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('_').next())
                .and_then(|secs| secs.parse::<u64>().ok());
            if created.is_some_and(|at| at < cutoff) {
                let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut *admin)
                    .await;
            }
        }
    })
    .await;
}

fn server() -> String {
    std::env::var(SERVER_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// A connection to the server's `postgres` maintenance database.
async fn maintenance(server: &str) -> anyhow::Result<PgConnection> {
    let url = format!("{server}/postgres");
    tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect(&url))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_LIMIT:?}"))?
        .with_context(|| format!("connecting to {url}"))
}

impl FreshDb {
    /// `postgres://…/airlock_t_…`, for `[store] url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> PgConnection {
        tokio::time::timeout(CONNECT_LIMIT, PgConnection::connect(&self.url))
            .await
            .unwrap_or_else(|_| panic!("connecting to {}: timed out", self.name))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    /// Runs `sql` (one or more statements) on this database.
    pub async fn execute(&self, sql: &str) {
        let mut conn = self.connect().await;
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
    }

    /// The first column of the first row of `sql`, as a number (`COUNT(*)`
    /// and the like).
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let mut conn = self.connect().await;
        let value = sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
        value
    }

    /// Ends every connection to this database (`pg_terminate_backend`), as
    /// a database restart or a network cut would. Returns how many there
    /// were.
    pub async fn terminate_connections(&self) -> i64 {
        let mut admin = maintenance(&self.server).await.unwrap();
        let ended: i64 = sqlx::query_scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let _ = admin.close().await;
        ended
    }

    /// Takes the advisory lock `(class, key)` from whoever holds it, as a
    /// process that is quicker after a connection loss would: every other
    /// connection ends while new ones are refused, then the lock is taken
    /// on a connection of the test's own (retried until the server has let
    /// the old holder's go). New connections stay refused until
    /// [`FreshDb::allow_connections`]. Returns the connection holding the
    /// lock.
    pub async fn seize_advisory_lock(&self, class: i32, key: i32) -> PgConnection {
        let mut holder = self.connect().await;
        self.allow_connections(false).await;
        sqlx::raw_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&mut holder)
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(class)
                .bind(key)
                .fetch_one(&mut holder)
                .await
                .unwrap();
            if locked {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lock ({class}, {key}) was not released"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        holder
    }

    /// Whether new connections to this database are accepted (`ALTER
    /// DATABASE … ALLOW_CONNECTIONS`; superusers included). With
    /// [`FreshDb::terminate_connections`], makes the database unreachable
    /// for its clients until allowed again.
    pub async fn allow_connections(&self, allow: bool) {
        let mut admin = maintenance(&self.server).await.unwrap();
        sqlx::raw_sql(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}",
            self.name
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let _ = admin.close().await;
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        // Drop may run inside a runtime, which must not block on itself:
        // drop the database from a thread with a runtime of its own.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = maintenance(&server).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                let _ = admin.close().await;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}
