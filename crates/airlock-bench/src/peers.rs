//! Starting the servers under test: the mock provider, nginx doing only the
//! header swap, and airlock (audit on and off).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::client;
use crate::procs::Proc;

/// How long a server may take to come up.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The real provider key. Only the mock, nginx's config and airlock see it.
pub const REAL_KEY: &str = "sk-bench-real-key-0123456789abcdefghijklmnopqrstuvwxyz";

/// Where the load tool and the clients send calls for one peer.
#[derive(Clone, Debug)]
pub struct Target {
    /// Peer name in the results (`direct`, `nginx`, `airlock`, ...).
    pub name: String,
    /// Address of the listener.
    pub addr: SocketAddr,
    /// Path prefix before the provider path (`/mock` for airlock).
    pub prefix: String,
    /// The `Authorization` value a client sends.
    pub authorization: String,
}

impl Target {
    /// `http://ADDR{prefix}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, self.target(path))
    }

    /// `{prefix}{path}`: the request target to send.
    pub fn target(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// The mock provider process.
pub struct Mock {
    /// The process.
    pub proc: Proc,
    /// Its listener.
    pub addr: SocketAddr,
}

/// Starts `bench-mock`, expecting the real key from every caller.
pub fn start_mock(bin: &Path, threads: Option<usize>) -> anyhow::Result<Mock> {
    let mut command = Command::new(bin);
    command
        .args(["--listen", "127.0.0.1:0", "--expect-auth"])
        .arg(format!("Bearer {REAL_KEY}"));
    if let Some(threads) = threads {
        command.arg("--threads").arg(threads.to_string());
    }
    let mut proc = Proc::spawn("bench-mock", command)?;
    let urls = proc.wait_for_urls(&["listening on "], START_LIMIT)?;
    let addr = client::addr_of(first(&urls)?)?;
    Ok(Mock { proc, addr })
}

/// nginx running the generated config.
pub struct Nginx {
    /// The master process (the worker is its child).
    pub proc: Proc,
    /// Its listener.
    pub addr: SocketAddr,
}

/// Writes an nginx config into `dir` and starts nginx on a free port, in
/// the foreground, with one worker.
pub fn start_nginx(bin: &Path, dir: &Path, upstream: SocketAddr) -> anyhow::Result<Nginx> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let config = nginx_config(dir, addr, upstream, is_root());
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut command = Command::new(bin);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut proc = Proc::spawn("nginx", command)?;
    proc.ignore_output();
    wait_for_port(&mut proc, addr)?;
    Ok(Nginx { proc, addr })
}

/// The nginx config: one worker, a keep-alive upstream pool, the
/// `Authorization` header replaced, no buffering, no logs.
pub fn nginx_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, as_root: bool) -> String {
    let dir = dir.display();
    // As root the worker would switch to `nobody`, which cannot use the
    // temporary directories: keep it on the current user.
    let user = if as_root { "user root;\n" } else { "" };
    format!(
        "{user}worker_processes 1;\n\
         daemon off;\n\
         master_process on;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log crit;\n\
         events {{\n  worker_connections 4096;\n}}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {dir}/client_body;\n\
         \x20 proxy_temp_path {dir}/proxy;\n\
         \x20 fastcgi_temp_path {dir}/fastcgi;\n\
         \x20 uwsgi_temp_path {dir}/uwsgi;\n\
         \x20 scgi_temp_path {dir}/scgi;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 keepalive_timeout 75s;\n\
         \x20 client_max_body_size 0;\n\
         \x20 upstream mock {{\n\
         \x20   server {upstream};\n\
         \x20   keepalive 64;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20 }}\n\
         \x20 server {{\n\
         \x20   listen {listen};\n\
         \x20   location / {{\n\
         \x20     proxy_pass http://mock;\n\
         \x20     proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Authorization \"Bearer {REAL_KEY}\";\n\
         \x20     proxy_buffering off;\n\
         \x20     proxy_request_buffering off;\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n"
    )
}

/// An airlock process with one session.
pub struct Airlock {
    /// The process.
    pub proc: Proc,
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The admin token it was given.
    pub admin_token: String,
    /// Config file (reused by the first-use measurement's second process).
    pub config_path: PathBuf,
    /// `[audit] enabled = false` was asked for but this build refused the
    /// key, so the process runs with its default audit setting.
    pub audit_key_refused: bool,
}

/// How to start airlock.
#[derive(Clone, Debug)]
pub struct AirlockSpec {
    /// The release `airlock` binary.
    pub bin: PathBuf,
    /// Where the mock listens.
    pub upstream: SocketAddr,
    /// Ask for `[audit] enabled = false`.
    pub audit_off: bool,
    /// A PostgreSQL store instead of SQLite in the data directory.
    pub store_url: Option<String>,
}

/// Writes `{dir}/airlock.toml` and starts `airlock serve`. A build that
/// refuses a key (an older one, measured with `--airlock-bin`) is started
/// again without it: `sessions.max_calls_in_flight` (a build without it
/// has no cap), then the audit-off key.
pub fn start_airlock(spec: &AirlockSpec, dir: &Path) -> anyhow::Result<Airlock> {
    let config_path = dir.join("airlock.toml");
    let admin_token = admin_token();
    let mut keys = ConfigKeys {
        audit_off: spec.audit_off,
        calls_cap: true,
    };
    let (proc, urls) = loop {
        match write_and_start(spec, dir, &config_path, &admin_token, keys) {
            Ok(started) => break started,
            Err(err) if keys.calls_cap && refuses_key(&err, "max_calls_in_flight") => {
                keys.calls_cap = false;
            }
            Err(err) if keys.audit_off && refuses_audit_key(&err) => keys.audit_off = false,
            Err(err) => return Err(err),
        }
    };
    let audit_key_refused = spec.audit_off && !keys.audit_off;
    Ok(Airlock {
        proc,
        proxy: client::addr_of(first_of(&urls, 0)?)?,
        admin: client::addr_of(first_of(&urls, 1)?)?,
        admin_token,
        config_path,
        audit_key_refused,
    })
}

/// The optional keys of the benchmark's config.
#[derive(Clone, Copy)]
struct ConfigKeys {
    /// `[audit] enabled = false`.
    audit_off: bool,
    /// `[sessions] max_calls_in_flight` above the workloads' concurrency.
    calls_cap: bool,
}

/// Whether airlock refused the config because of the audit switch (e.g.
/// "line 19: unknown field `enabled`, expected `fail_closed`").
fn refuses_audit_key(err: &anyhow::Error) -> bool {
    refuses_key(err, "`enabled`") || refuses_key(err, "audit")
}

/// Whether airlock refused the config naming `key`.
fn refuses_key(err: &anyhow::Error, key: &str) -> bool {
    let text = format!("{err:#}");
    text.contains("invalid config") && text.contains(key)
}

fn write_and_start(
    spec: &AirlockSpec,
    dir: &Path,
    config_path: &Path,
    admin_token: &str,
    keys: ConfigKeys,
) -> anyhow::Result<(Proc, Vec<String>)> {
    let store_url = spec
        .store_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/airlock.db", dir.display()));
    let mut config = airlock_config(&store_url, spec.upstream, keys.audit_off);
    if keys.calls_cap {
        config.push_str(&format!(
            "\n[sessions]\nmax_calls_in_flight = {BENCH_CALLS_IN_FLIGHT}\n"
        ));
    }
    std::fs::write(config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    spawn_airlock(&spec.bin, config_path, admin_token)
}

/// Starts `airlock serve --config FILE` and waits for both listening lines.
///
/// The per-call `airlock::call` log line is off (`RUST_LOG=warn`), as
/// nginx runs with `access_log off`: both peers compare the proxying alone.
/// Set `BENCH_AIRLOCK_LOG` (e.g. `info`) to measure with it.
pub fn spawn_airlock(
    bin: &Path,
    config: &Path,
    admin_token: &str,
) -> anyhow::Result<(Proc, Vec<String>)> {
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("BENCH_KEY", REAL_KEY)
        .env("AIRLOCK_ADMIN_TOKEN", admin_token)
        // Replicas share the audit key; a PostgreSQL store requires it.
        .env("AIRLOCK_AUDIT_KEY", BENCH_AUDIT_KEY)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_AIRLOCK_LOG").unwrap_or_else(|_| "warn".to_owned()),
        );
    if let Some(dir) = config.parent() {
        command.current_dir(dir);
    }
    let mut proc = Proc::spawn("airlock", command)?;
    let urls = proc.wait_for_urls(
        &["airlock proxy listening on ", "airlock admin listening on "],
        START_LIMIT,
    )?;
    Ok((proc, urls))
}

/// The airlock config of the benchmark.
pub fn airlock_config(store_url: &str, upstream: SocketAddr, audit_off: bool) -> String {
    let mut config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [store]\nurl = \"{store_url}\"\n\n\
         [providers.mock]\n\
         upstream = \"http://{upstream}\"\n\
         auth = \"bearer\"\n\
         credential = \"env:BENCH_KEY\"\n\
         env_key = \"MOCK_API_KEY\"\n\
         env_base_url = \"MOCK_BASE_URL\"\n\
         base_path = \"\"\n"
    );
    if audit_off {
        config.push_str("\n[audit]\nenabled = false\n");
    }
    config
}

/// The benchmark's one session runs up to 256 calls at once: above the
/// default cap, which a low open files limit lowers further.
const BENCH_CALLS_IN_FLIGHT: u32 = 1024;

/// The audit key every benchmarked airlock uses (not a secret: a benchmark).
const BENCH_AUDIT_KEY: &str = "42a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f";

/// The scope every benchmark session gets: anything on the mock.
pub const SESSION_BODY: &str =
    r#"{"scope":[{"provider":"mock","methods":["*"],"paths":["/**"]}],"ttl_seconds":3600}"#;

/// Creates a session through the admin API at `admin`; returns its token.
pub async fn create_session(admin: SocketAddr, admin_token: &str) -> anyhow::Result<String> {
    let body = client::expect(
        admin,
        Method::POST,
        "/v1/sessions",
        Some(&format!("Bearer {admin_token}")),
        Some(Bytes::from_static(SESSION_BODY.as_bytes())),
        StatusCode::CREATED,
    )
    .await
    .context("creating a session")?;
    session_token(&body)
}

/// Creates `n` sessions over one admin connection.
pub async fn create_sessions(
    admin: SocketAddr,
    admin_token: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut conn = client::Conn::open(admin).await?;
    let auth = format!("Bearer {admin_token}");
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, body) = conn
            .call(
                Method::POST,
                "/v1/sessions",
                Some(&auth),
                Some(Bytes::from_static(SESSION_BODY.as_bytes())),
            )
            .await?;
        if status != StatusCode::CREATED {
            bail!(
                "POST /v1/sessions answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        tokens.push(session_token(&body)?);
    }
    Ok(tokens)
}

fn session_token(body: &[u8]) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_json::from_slice(body).context("session JSON")?;
    value
        .get("token")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no token in {value}"))
}

fn admin_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = String::from("adm_bench_");
    let _ = write!(out, "{:016x}{:08x}", nanos as u64, std::process::id());
    out
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn wait_for_port(proc: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {addr} after {START_LIMIT:?}:\n{}",
                proc.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|s| s.trim() == "0")
}

fn first(urls: &[String]) -> anyhow::Result<&str> {
    first_of(urls, 0)
}

fn first_of(urls: &[String], i: usize) -> anyhow::Result<&str> {
    urls.get(i)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("missing listening URL {i}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_hold_the_swap_and_the_audit_switch() {
        let dir = Path::new("/tmp/x");
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let nginx = nginx_config(dir, "127.0.0.1:8".parse().unwrap(), up, true);
        assert!(nginx.starts_with("user root;\n"));
        assert!(nginx.contains(&format!(
            "proxy_set_header Authorization \"Bearer {REAL_KEY}\";"
        )));
        assert!(nginx.contains("keepalive 64;"));
        let on = airlock_config("sqlite:///tmp/x/airlock.db", up, false);
        assert!(on.contains("url = \"sqlite:///tmp/x/airlock.db\""));
        assert!(on.contains("upstream = \"http://127.0.0.1:9\""));
        assert!(!on.contains("[audit]"));
        assert!(
            airlock_config("postgres://p@h/d", up, true).ends_with("[audit]\nenabled = false\n")
        );
    }
}
