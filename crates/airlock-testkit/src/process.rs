//! The real `airlock` binary as a child process.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long `start` waits for the listening lines.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long `terminate` waits for a graceful exit.
const TERMINATE_LIMIT: Duration = Duration::from_secs(30);
/// How long an exit already under way may take to be recorded, when the
/// process could not be signalled because it was gone.
const REAPED_LIMIT: Duration = Duration::from_secs(5);
/// How long we wait for a SIGKILLed process or for its output to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Bound on one admin API call.
const ADMIN_LIMIT: Duration = Duration::from_secs(30);

const PROXY_READY: &str = "airlock proxy listening on ";
const ADMIN_READY: &str = "airlock admin listening on ";

/// Configures and starts an [`Airlock`].
#[derive(Debug, Clone)]
pub struct AirlockBuilder {
    bin: PathBuf,
    providers: String,
    extra: String,
    proxy_options: String,
    store_options: String,
    env: Vec<(String, String)>,
    store_url: Option<String>,
    /// `admin.listen`; `127.0.0.1:0` unless set.
    admin_listen: Option<String>,
    dir: Option<PathBuf>,
    open_files: Option<u64>,
}

impl AirlockBuilder {
    /// `bin` is the path of the airlock binary (tests pass
    /// `env!("CARGO_BIN_EXE_airlock")`).
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        AirlockBuilder {
            bin: bin.into(),
            providers: String::new(),
            extra: String::new(),
            proxy_options: String::new(),
            store_options: String::new(),
            env: Vec::new(),
            store_url: None,
            admin_listen: None,
            dir: None,
            open_files: None,
        }
    }

    /// Extra TOML appended to the generated config (after the provider
    /// tables). It must not repeat the `[proxy]`, `[admin]` or `[store]`
    /// tables, which the builder writes itself.
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        if !toml.ends_with('\n') {
            self.extra.push('\n');
        }
        self
    }

    /// A `key = value` line added to the generated `[proxy]` table, e.g.
    /// `upstream_timeout = "1s"`.
    pub fn proxy_option(mut self, line: &str) -> Self {
        self.proxy_options.push_str(line);
        self.proxy_options.push('\n');
        self
    }

    /// A `key = value` line added to the generated `[store]` table, e.g.
    /// `max_staleness = "2s"`.
    pub fn store_option(mut self, line: &str) -> Self {
        self.store_options.push_str(line);
        self.store_options.push('\n');
        self
    }

    /// Adds `[providers.NAME]` whose credential comes from the child's env
    /// var `AIRLOCK_TEST_CRED_<NAME>` (set to `credential`), with
    /// `env_key = "<NAME>_API_KEY"` and `env_base_url = "<NAME>_BASE_URL"`.
    /// `<NAME>` is `name` upper-cased with every non-alphanumeric character
    /// replaced by `_`.
    pub fn provider(
        mut self,
        name: &str,
        upstream: &str,
        auth: &str,
        credential: &str,
        base_path: &str,
    ) -> Self {
        let upper = env_name(name);
        let cred_var = format!("AIRLOCK_TEST_CRED_{upper}");
        let _ = write!(
            self.providers,
            "[providers.{key}]\nupstream = {upstream}\nauth = {auth}\ncredential = {credential}\n\
             env_key = {env_key}\nenv_base_url = {env_base_url}\nbase_path = {base_path}\n\n",
            key = toml_key(name),
            upstream = toml_str(upstream),
            auth = toml_str(auth),
            credential = toml_str(&format!("env:{cred_var}")),
            env_key = toml_str(&format!("{upper}_API_KEY")),
            env_base_url = toml_str(&format!("{upper}_BASE_URL")),
            base_path = toml_str(base_path),
        );
        self.env.push((cred_var, credential.to_owned()));
        self
    }

    /// A `key = value` line added to the table of the provider added last
    /// (with [`AirlockBuilder::provider`]), e.g. `keepalive_timeout = "1s"`.
    pub fn provider_option(mut self, line: &str) -> Self {
        self.providers.push_str(line);
        self.providers.push_str("\n\n");
        self
    }

    /// Sets an environment variable on the child (later calls win).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Store URL; default `sqlite://{dir}/airlock.db`.
    pub fn store_url(mut self, url: &str) -> Self {
        self.store_url = Some(url.to_owned());
        self
    }

    /// Uses `dir` as the data directory (created if missing, not removed
    /// afterwards), e.g. to restart on the same database. Default: a fresh
    /// temporary directory removed when the [`Airlock`] is dropped.
    pub fn dir(mut self, dir: PathBuf) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Runs the process with both its soft and hard limits on open files
    /// set to `limit` (through `sh -c 'ulimit -n LIMIT; exec airlock ...'`,
    /// so that `serve` cannot raise it).
    pub fn open_files_limit(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    /// `admin.listen` (default `127.0.0.1:0`), e.g. `0.0.0.0:0`.
    pub fn admin_listen(mut self, addr: &str) -> Self {
        self.admin_listen = Some(addr.to_owned());
        self
    }

    /// Writes `{dir}/airlock.toml`, spawns `airlock serve` and waits (up to
    /// 30 s) until it prints both listening lines. On failure the error
    /// holds everything the process printed.
    pub async fn start(self) -> anyhow::Result<Airlock> {
        let (tempdir, dir) = match self.dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating data dir {}", dir.display()))?;
                (None, dir)
            }
            None => {
                let tempdir = tempfile::Builder::new()
                    .prefix("airlock-test-")
                    .tempdir()
                    .context("creating temporary data dir")?;
                let dir = tempdir.path().to_path_buf();
                (Some(tempdir), dir)
            }
        };
        let store_url = self
            .store_url
            .unwrap_or_else(|| format!("sqlite://{}/airlock.db", dir.display()));
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_options}\n[admin]\nlisten = {admin}\n\n\
             [store]\nurl = {store}\n{store_options}\n{providers}{extra}",
            store = toml_str(&store_url),
            admin = toml_str(self.admin_listen.as_deref().unwrap_or("127.0.0.1:0")),
            store_options = self.store_options,
            proxy_options = self.proxy_options,
            providers = self.providers,
            extra = self.extra,
        );
        let config_path = dir.join("airlock.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let admin_token = self
            .env
            .iter()
            .rev()
            .find(|(key, _)| key == "AIRLOCK_ADMIN_TOKEN")
            .map_or_else(new_admin_token, |(_, value)| value.clone());

        let mut command = match self.open_files {
            None => Command::new(&self.bin),
            Some(limit) => {
                // `exec` keeps the pid: signals reach airlock itself.
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&self.bin);
                shell
            }
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("AIRLOCK_ADMIN_TOKEN", &admin_token);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {} serve", self.bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();

        let exit = Arc::new(ExitState::new());
        let waiter = {
            let exit = exit.clone();
            std::thread::Builder::new()
                .name(format!("airlock-{pid}-wait"))
                .spawn(move || wait_child(child, &exit))
        };
        // The child is owned by the waiter thread from here on. If the
        // thread could not start, nobody can reap it: kill it by pid.
        if let Err(err) = waiter {
            let _ = send_signal(pid, "KILL");
            return Err(anyhow!(err).context("starting the airlock waiter thread"));
        }

        let output = Arc::new(Mutex::new(String::new()));
        let mut airlock = Airlock {
            bin: self.bin,
            dir,
            _tempdir: tempdir,
            proxy_url: String::new(),
            admin_url: String::new(),
            admin_token,
            pid,
            exit,
            output: output.clone(),
        };
        // From here on, returning an error drops `airlock`, which kills
        // the child.
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        for (pipe, stream) in [
            (
                stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
                "stdout",
            ),
            (
                stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
                "stderr",
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            spawn_reader(pipe, output.clone(), ready_tx.clone())
                .with_context(|| format!("starting the airlock {stream} reader"))?;
        }
        drop(ready_tx);

        let deadline = Instant::now() + START_LIMIT;
        let mut exit_rx = airlock.exit.watch.subscribe();
        while airlock.proxy_url.is_empty() || airlock.admin_url.is_empty() {
            tokio::select! {
                ready = ready_rx.recv() => match ready {
                    Some(Ready::Proxy(url)) => airlock.proxy_url = url,
                    Some(Ready::Admin(url)) => airlock.admin_url = url,
                    None => {
                        // Both pipes closed: the process is exiting.
                        let mut exit_rx = airlock.exit.watch.subscribe();
                        let status = tokio::time::timeout(DRAIN_LIMIT, async {
                            exit_rx.wait_for(Option::is_some).await.ok().map(|s| s.clone())
                        })
                        .await;
                        let status = match status {
                            Ok(Some(status)) => describe_exit(status.as_ref()),
                            _ => "closed its output".to_owned(),
                        };
                        bail!(
                            "airlock exited before it was ready ({status}); output:\n{}",
                            airlock.output()
                        );
                    }
                },
                status = exit_rx.wait_for(Option::is_some) => {
                    let status = status.map_or_else(
                        |_| "exited".to_owned(),
                        |status| describe_exit(status.as_ref()),
                    );
                    // Let the readers drain what is left in the pipes.
                    let _ = tokio::time::timeout(DRAIN_LIMIT, async {
                        while ready_rx.recv().await.is_some() {}
                    })
                    .await;
                    bail!(
                        "airlock exited before it was ready ({status}); output:\n{}",
                        airlock.output()
                    );
                }
                () = tokio::time::sleep_until(deadline) => {
                    bail!(
                        "airlock did not print both listening lines within {START_LIMIT:?}; \
                         output:\n{}",
                        airlock.output()
                    );
                }
            }
        }
        Ok(airlock)
    }
}

/// A running `airlock serve` child process. Dropping it kills the process
/// (SIGKILL) and waits for it; a temporary data dir is removed afterwards.
pub struct Airlock {
    bin: PathBuf,
    dir: PathBuf,
    proxy_url: String,
    admin_url: String,
    admin_token: String,
    pid: u32,
    exit: Arc<ExitState>,
    output: Arc<Mutex<String>>,
    // Declared last: removed after the process is gone.
    _tempdir: Option<tempfile::TempDir>,
}

impl Airlock {
    /// Proxy base URL as the process printed it, `http://127.0.0.1:PORT`.
    pub fn proxy_url(&self) -> String {
        self.proxy_url.clone()
    }

    /// Admin API base URL as the process printed it.
    pub fn admin_url(&self) -> String {
        self.admin_url.clone()
    }

    /// The admin token given to the process.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Data directory (holds the config file and the default database).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the default SQLite store's write lock from a connection of its
    /// own, as another process would (`BEGIN IMMEDIATE`, or `BEGIN
    /// EXCLUSIVE` with `exclusive`), until [`StoreLock::release`]: airlock's
    /// writes wait for it (and fail after their busy timeout).
    pub async fn lock_store(&self, exclusive: bool) -> StoreLock {
        use sqlx::Connection as _;

        let db = self.dir.join("airlock.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .expect("opening the store to lock it");
        let begin = if exclusive {
            "BEGIN EXCLUSIVE"
        } else {
            "BEGIN IMMEDIATE"
        };
        sqlx::query(begin)
            .execute(&mut conn)
            .await
            .expect("locking the store");
        StoreLock { conn }
    }

    /// Path of the generated config file, `{dir}/airlock.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("airlock.toml")
    }

    /// Path of the airlock binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Sends SIGTERM (unless it already exited) and waits (up to 30 s) for
    /// the process to exit. On
    /// timeout the process is killed and an error returned.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        // A process that already exited (its own SIGTERM drain ended) and
        // was reaped before its exit was recorded cannot be signalled: that
        // is no error, the wait below finds its status.
        let signalled = match self.exit.get() {
            Some(_) => Ok(()),
            None => send_signal(self.pid, "TERM"),
        };
        if let Err(e) = signalled {
            let mut exit_rx = self.exit.watch.subscribe();
            let exited =
                tokio::time::timeout(REAPED_LIMIT, exit_rx.wait_for(Option::is_some)).await;
            if !matches!(exited, Ok(Ok(_))) {
                return Err(e.context("sending SIGTERM to airlock"));
            }
        }
        self.wait_exit().await
    }

    /// Waits (up to 30 s) for the process to exit by itself, sending
    /// nothing: after a SIGTERM of the test's own, when a second one would
    /// end the drain early. On timeout the process is killed and an error
    /// returned.
    pub async fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let mut exit_rx = self.exit.watch.subscribe();
        let waited = tokio::time::timeout(TERMINATE_LIMIT, async {
            exit_rx
                .wait_for(Option::is_some)
                .await
                .map(|status| status.clone())
        })
        .await;
        match waited {
            Ok(Ok(Some(Ok(status)))) => Ok(status),
            Ok(Ok(Some(Err(err)))) => Err(anyhow!("waiting for airlock: {err}")),
            Ok(_) => Err(anyhow!("airlock exit state lost")),
            Err(_) => {
                self.kill();
                bail!(
                    "airlock did not exit within {TERMINATE_LIMIT:?}; killed it. output:\n{}",
                    self.output()
                )
            }
        }
    }

    /// Sends signal `name` (`"HUP"`, `"TERM"`, ...) and returns at once.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        send_signal(self.pid, name)
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self) {
        if self.exit.get().is_none() {
            let _ = send_signal(self.pid, "KILL");
        }
        self.exit.wait_blocking(DRAIN_LIMIT);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Peak resident memory of the process so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:")
    }

    /// Current resident memory of the process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// All stdout+stderr lines the process printed so far.
    pub fn output(&self) -> String {
        self.output.lock().clone()
    }

    /// Waits until the output holds `needle` more than `seen` times (log
    /// lines are written by a thread of their own, so this polls) and
    /// returns the last line holding it. Panics after 15 s, with the output.
    pub async fn wait_for_output(&self, needle: &str, seen: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let output = self.output();
            if output.matches(needle).count() > seen {
                return output
                    .lines()
                    .rfind(|line| line.contains(needle))
                    .unwrap_or_default()
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no new {needle:?} in the output within 15 s:\n{output}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls the admin API with the admin token. A JSON `body` is sent with
    /// `content-type: application/json`. The answer is parsed as JSON; an
    /// empty body gives `null` and a non-JSON body a JSON string.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut request = http::Request::builder()
            .method(http::Method::from_bytes(method.as_bytes())?)
            .uri(format!("{}{path}", self.admin_url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.admin_token),
            );
        let body = match body {
            Some(value) => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&value)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body))?;
        let call = async {
            let response = client.request(request).await?;
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(ADMIN_LIMIT, call)
            .await
            .map_err(|_| anyhow!("admin {method} {path}: no answer within {ADMIN_LIMIT:?}"))?
            .with_context(|| format!("admin {method} {path}"))?;
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        Ok((status, value))
    }

    /// `POST /v1/sessions`; an error unless the answer is 201.
    pub async fn create_session(
        &self,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, value) = self.admin("POST", "/v1/sessions", Some(body)).await?;
        if status != 201 {
            bail!("POST /v1/sessions answered {status}: {value}");
        }
        Ok(value)
    }
}

impl Drop for Airlock {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Airlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Airlock")
            .field("pid", &self.pid)
            .field("proxy_url", &self.proxy_url)
            .field("admin_url", &self.admin_url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// How the child ended, or why waiting for it failed.
type Exit = Result<ExitStatus, String>;

/// Exit status published by the waiter thread, for sync and async waiters.
struct ExitState {
    status: Mutex<Option<Exit>>,
    changed: Condvar,
    watch: watch::Sender<Option<Exit>>,
}

impl ExitState {
    fn new() -> Self {
        ExitState {
            status: Mutex::new(None),
            changed: Condvar::new(),
            watch: watch::channel(None).0,
        }
    }

    fn get(&self) -> Option<Exit> {
        self.status.lock().clone()
    }

    fn set(&self, exit: Exit) {
        let mut status = self.status.lock();
        *status = Some(exit.clone());
        self.changed.notify_all();
        drop(status);
        self.watch.send_replace(Some(exit));
    }

    /// Blocks until the child is reaped or `limit` passed.
    fn wait_blocking(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut status = self.status.lock();
        while status.is_none() {
            if self.changed.wait_until(&mut status, deadline).timed_out() {
                break;
            }
        }
    }
}

fn wait_child(mut child: Child, exit: &ExitState) {
    let result = child.wait().map_err(|err| err.to_string());
    exit.set(result);
}

fn describe_exit(exit: Option<&Exit>) -> String {
    match exit {
        Some(Ok(status)) => status.to_string(),
        Some(Err(err)) => format!("wait failed: {err}"),
        None => "still running".to_owned(),
    }
}

/// Sends `signal` (e.g. `TERM`, `KILL`) to `pid` with the `kill` utility;
/// the workspace forbids `unsafe`, so there is no direct `kill(2)` call.
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// A listening line seen in the output.
enum Ready {
    Proxy(String),
    Admin(String),
}

/// Reads `pipe` line by line into `output`, echoing each line to stderr
/// and reporting the listening lines on `ready`.
fn spawn_reader(
    pipe: Box<dyn Read + Send>,
    output: Arc<Mutex<String>>,
    ready: mpsc::UnboundedSender<Ready>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("airlock-output".to_owned())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                eprintln!("[airlock] {line}");
                {
                    let mut output = output.lock();
                    output.push_str(line);
                    output.push('\n');
                }
                if let Some(url) = url_after(line, PROXY_READY) {
                    let _ = ready.send(Ready::Proxy(url));
                } else if let Some(url) = url_after(line, ADMIN_READY) {
                    let _ = ready.send(Ready::Admin(url));
                }
            }
        })
        .map(drop)
}

/// The URL following `prefix` in `line`, if the line announces one.
fn url_after(line: &str, prefix: &str) -> Option<String> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let url = rest.split_whitespace().next()?;
    url.starts_with("http").then(|| url.to_owned())
}

/// A per-instance admin token, `adm_test_<16 hex>`.
fn new_admin_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed = (u64::from(std::process::id()) << 32) ^ count ^ nanos.rotate_left(17);
    format!("adm_test_{:016x}", splitmix64(seed))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `name` upper-cased, with non-alphanumeric characters replaced by `_`.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `key` as a TOML key: bare if possible, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        toml_str(key)
    }
}

/// `value` as a TOML basic string.
fn toml_str(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The SQLite store's write lock, held by [`Airlock::lock_store`].
pub struct StoreLock {
    conn: sqlx::SqliteConnection,
}

impl StoreLock {
    /// Gives the lock back (rolls back the empty transaction).
    pub async fn release(mut self) {
        use sqlx::Connection as _;

        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .expect("unlocking the store");
        self.conn
            .close()
            .await
            .expect("closing the locking connection");
    }
}

impl std::fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLock").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_quoting() {
        assert_eq!(toml_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(toml_key("open-ai_2"), "open-ai_2");
        assert_eq!(toml_key("a.b"), "\"a.b\"");
        assert_eq!(env_name("open-ai"), "OPEN_AI");
    }

    #[test]
    fn listening_lines() {
        assert_eq!(
            url_after(
                "airlock proxy listening on http://127.0.0.1:4321",
                PROXY_READY
            )
            .as_deref(),
            Some("http://127.0.0.1:4321")
        );
        assert_eq!(url_after("airlock admin listening on ", ADMIN_READY), None);
        assert_eq!(url_after("something else", PROXY_READY), None);
    }

    #[test]
    fn admin_tokens_differ() {
        let a = new_admin_token();
        let b = new_admin_token();
        assert_ne!(a, b);
        assert!(a.starts_with("adm_test_") && a.len() == "adm_test_".len() + 16);
    }

    #[test]
    fn provider_table() {
        let builder = AirlockBuilder::new("/bin/false").provider(
            "openai",
            "http://127.0.0.1:1",
            "bearer",
            "sk-real",
            "/v1",
        );
        assert!(builder.providers.contains("[providers.openai]\n"));
        assert!(builder
            .providers
            .contains("credential = \"env:AIRLOCK_TEST_CRED_OPENAI\"\n"));
        assert!(builder.providers.contains("env_key = \"OPENAI_API_KEY\"\n"));
        assert!(builder
            .providers
            .contains("env_base_url = \"OPENAI_BASE_URL\"\n"));
        assert!(builder.providers.contains("base_path = \"/v1\"\n"));
        assert_eq!(
            builder.env,
            vec![("AIRLOCK_TEST_CRED_OPENAI".to_owned(), "sk-real".to_owned())]
        );
    }

    /// A builder running `/bin/sh` on a data dir holding `script` as the
    /// file `serve`: `sh serve --config FILE` runs it with `$1 = --config`.
    /// (Reading a script with sh avoids exec'ing a just-written file, which
    /// can fail with ETXTBSY while other tests fork.)
    fn fake(script: &str) -> (tempfile::TempDir, AirlockBuilder) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("serve"), script).unwrap();
        let builder = AirlockBuilder::new("/bin/sh").dir(dir.path().to_path_buf());
        (dir, builder)
    }

    #[tokio::test]
    async fn start_reports_early_exit_with_output() {
        let (_dir, builder) = fake("echo boom-out\necho boom-err >&2\nexit 3\n");
        let err = builder.start().await.unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("boom-out"), "{text}");
        assert!(text.contains("boom-err"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
    }

    #[tokio::test]
    async fn start_waits_for_both_lines_then_terminates() {
        let (_dir, builder) = fake(
            "test \"$1\" = --config || exit 9\n\
             test -f \"$2\" || exit 8\n\
             tail -f /dev/null &\n\
             trap 'kill $!; echo bye; exit 0' TERM\n\
             echo \"token=$AIRLOCK_ADMIN_TOKEN cred=$AIRLOCK_TEST_CRED_MOCK\"\n\
             echo 'airlock proxy listening on http://127.0.0.1:1111'\n\
             echo 'airlock admin listening on http://127.0.0.1:2222'\n\
             wait\n",
        );
        let mut airlock = builder
            .provider("mock", "http://127.0.0.1:9", "bearer", "real-cred", "")
            .config("[audit]\nfail_closed = true")
            .start()
            .await
            .unwrap();
        assert_eq!(airlock.proxy_url(), "http://127.0.0.1:1111");
        assert_eq!(airlock.admin_url(), "http://127.0.0.1:2222");
        let output = airlock.output();
        assert!(
            output.contains(&format!("token={}", airlock.admin_token())),
            "{output}"
        );
        assert!(output.contains("cred=real-cred"), "{output}");
        let config = std::fs::read_to_string(airlock.config_path()).unwrap();
        assert!(
            config.starts_with("[proxy]\nlisten = \"127.0.0.1:0\"\n"),
            "{config}"
        );
        assert!(config.contains("[providers.mock]\n"), "{config}");
        assert!(
            config.ends_with("[audit]\nfail_closed = true\n"),
            "{config}"
        );
        let status = airlock.terminate().await.unwrap();
        assert_eq!(status.code(), Some(0));
    }

    #[tokio::test]
    async fn drop_kills_the_process() {
        let (_dir, builder) = fake(
            "echo 'airlock proxy listening on http://127.0.0.1:1111'\n\
             echo 'airlock admin listening on http://127.0.0.1:2222'\n\
             exec tail -f /dev/null\n",
        );
        let airlock = builder.start().await.unwrap();
        let exit = airlock.exit.clone();
        drop(airlock);
        assert!(exit.get().is_some(), "process still running after drop");
    }
}
