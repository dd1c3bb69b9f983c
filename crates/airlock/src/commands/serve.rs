//! `airlock serve`: wires the store, the registry, the proxy and the admin
//! API together, runs them until SIGINT/SIGTERM, then drains.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use airlock_admin::{AdminMetrics, AdminState, AuditAccess, ProviderEnv};
use airlock_audit::{AuditSettings, Auditor};
use airlock_core::audit::AuditKey;
use airlock_core::token::generate_secret;
use airlock_core::TokenHash;
use airlock_proxy::{Provider, ProviderSpec, Proxy, ProxyMetrics, ProxySettings, ServerSettings};
use airlock_session::{Registry, SyncSettings};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit_key;
use crate::config::{Config, ProxyLimits};
use crate::credentials::Credentials;

/// Store setting holding the SHA-256 (hex) of a generated admin token.
const ADMIN_TOKEN_HASH: &str = "admin_token_hash";
/// How often call counters are written to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Shortest admin token `serve` accepts from `AIRLOCK_ADMIN_TOKEN`: the
/// token grants everything (sessions, credentials, the audit trail).
const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Runs the server until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let (started, started_at_ms) = (std::time::Instant::now(), airlock_session::now_ms());
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let open_files = raise_open_files_limit();
    // Ports first: a serve that cannot listen stops before it writes
    // anything (an admin token shown once, a new audit chain).
    let proxy_listener = TcpListener::bind(config.proxy.listen)
        .await
        .with_context(|| format!("binding proxy.listen {}", config.proxy.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin_listen))?;
    // Credentials serve would refuse, before a new database is created.
    Credentials::check_before_start(&config)?;
    // A SQLite file whose directory cannot hold it is refused here, naming
    // the setting and the path (the lock below would fail more obscurely).
    let database = crate::paths::sqlite_location(&config.store_url)
        .map_err(|reason| anyhow::anyhow!("store.url: {reason}"))?;
    // One serve per SQLite file: a second would migrate under the first,
    // claim the same audit chain and refuse every call. Taken before the
    // store is opened; held (declared before the store, so dropped after
    // it) until the process exits.
    let _sole_server = lock_sqlite_store(&config.store_url)?;
    let store = airlock_store::open(&config.store_url)
        .await
        .with_context(|| {
            format!(
                "opening store {}",
                airlock_store::url_for_display(&config.store_url)
            )
        })
        .map_err(
            |e| match database.as_deref().and_then(crate::paths::full_disk_hint) {
                Some(hint) => e.context(hint),
                None => e,
            },
        )?;
    // Credentials first: one serve refuses (too short, not header-safe)
    // stops it before anything is printed or written (an admin token, a
    // new audit chain).
    let credentials = Arc::new(Credentials::load(&config, Arc::clone(&store)).await?);
    // The audit key next, for the same reason: a key that does not load,
    // or is not the one the trail was written with, stops serve here.
    let audit_key = load_audit_key(&config, store.as_ref()).await?;
    credentials.warn_missing();
    let admin_token_hash = admin_token_hash(store.as_ref()).await?;
    let registry = Arc::new(Registry::new(Arc::clone(&store)));
    let (auditor, audit_writer, audit_access) = start_audit(&config, &store, audit_key).await?;

    let mut metrics_registry = prometheus_client::registry::Registry::default();
    let proxy_metrics = ProxyMetrics::new(&mut metrics_registry);
    let admin_metrics = AdminMetrics::register(&mut metrics_registry);
    let audit_stats = auditor.stats();
    if let Some(stats) = &audit_stats {
        stats.register(&mut metrics_registry);
    }

    let mut providers = Vec::new();
    let mut provider_envs = BTreeMap::new();
    for (name, p) in &config.providers {
        let cell = credentials
            .cell(name)
            .with_context(|| format!("providers.{name}: no credential cell"))?;
        let spec = ProviderSpec {
            name: name.clone(),
            upstream: p.upstream.clone(),
            auth: p.auth.clone(),
            headers: p.headers.clone(),
            ca_file: p.ca_file.clone(),
            keepalive_timeout: p.keepalive_timeout,
            credential: cell,
        };
        let provider = Provider::new(
            spec,
            config.proxy.connect_timeout,
            proxy_metrics.for_provider(name),
        )
        .with_context(|| format!("providers.{name}"))?;
        providers.push(provider);
        provider_envs.insert(
            name.clone(),
            ProviderEnv {
                env_key: p.env_key.clone(),
                env_base_url: p.env_base_url.clone(),
                base_path: p.base_path.clone(),
            },
        );
    }

    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(
            admin = %admin_addr,
            "admin.listen is not a loopback address and the admin API speaks plain HTTP: the \
             admin token crosses the network in clear; listen on 127.0.0.1, or reach it only \
             through a private network or a TLS-terminating proxy"
        );
    }
    // Loaded again (the config check loaded it too): the files may have
    // changed since.
    let tls = config
        .proxy
        .tls
        .clone()
        .map(airlock_proxy::tls::ServerTls::load)
        .transpose()
        .with_context(|| "proxy.tls_cert / proxy.tls_key")?
        .map(Arc::new);
    let proxy_scheme = if tls.is_some() { "https" } else { "http" };
    let public_url = config
        .proxy
        .public_url
        .clone()
        .unwrap_or_else(|| format!("{proxy_scheme}://{proxy_addr}"));
    if config.proxy.public_url.is_none() && proxy_addr.ip().is_unspecified() {
        tracing::warn!(
            %public_url,
            "proxy.listen is a wildcard address and proxy.public_url is not set: \
             sessions hand agents a base URL they cannot reach"
        );
    }

    let max_connections =
        max_connections_in_force(&config.proxy.limits, open_files, config.proxy.workers);
    let max_calls_in_flight = max_calls_in_flight_in_force(&config, max_connections);
    // Each proxy connection is counted with one upstream connection's
    // descriptor: HTTP/2 streams, which need one each, get no more.
    airlock_proxy::descriptors::limit_upstream_calls(max_connections);
    let gate = auditor.clone();
    let proxy = Arc::new(Proxy::new(
        providers,
        Arc::clone(&registry),
        auditor,
        ProxySettings {
            upstream_timeout: config.proxy.upstream_timeout,
            request: airlock_proxy::headers::RequestPolicy {
                forwarded: config.proxy.limits.forwarded_headers,
                allowed_hosts: config.proxy.limits.allowed_hosts.clone(),
                max_request_body: config.proxy.limits.max_request_body,
            },
            public_url: Some(public_url.clone()),
            path_prefix: config.proxy.public_path().map(str::to_owned),
            max_calls_in_flight,
        },
        proxy_metrics.for_provider("_unknown"),
    ));
    let admin_state = Arc::new(AdminState {
        server: airlock_admin::ServerInfo {
            version: env!("CARGO_PKG_VERSION"),
            started_at_ms,
            started,
            store: if airlock_store::is_postgres_url(&config.store_url) {
                "postgres"
            } else {
                "sqlite"
            },
            audit_fail_closed: config.audit.fail_closed,
            max_calls_in_flight,
        },
        registry: Arc::clone(&registry),
        providers: provider_envs,
        public_url,
        admin_token_hash,
        max_ttl: config.max_ttl,
        credentials: Arc::clone(&credentials) as Arc<dyn airlock_admin::CredentialAdmin>,
        audit: audit_access,
        metrics_registry,
        metrics: admin_metrics,
        ready: std::sync::atomic::AtomicBool::new(false),
        calls_admitted: Box::new(move || gate.admits_calls()),
    });
    let readiness = Arc::clone(&admin_state);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server_settings = ServerSettings {
        header_read_timeout: config.proxy.header_read_timeout,
        drain_timeout: config.proxy.drain_timeout,
        idle_timeout: config.proxy.limits.idle_timeout,
        max_connections,
        max_header_size: config.proxy.limits.max_header_size,
        tls: tls.clone(),
        workers: config.proxy.workers,
    };
    // The certificate is reloaded on SIGHUP and when its files change; a
    // bad pair keeps the old one (logged). Without TLS, SIGHUP (sent by
    // `systemctl reload` and log rotation) is logged and ignored: its
    // default action would end the process without a drain.
    let mut tls_reload = Vec::new();
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        if let Some(tls) = &tls {
            tls_reload.push(tokio::spawn(
                Arc::clone(tls).watch(airlock_proxy::tls::WATCH_EVERY),
            ));
        }
        tls_reload.push(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match &tls {
                    // A failure is logged; the old certificate stays.
                    Some(tls) => drop(tls.reload("SIGHUP")),
                    None => tracing::info!("SIGHUP: nothing to reload (no TLS certificate)"),
                }
            }
        }));
    }
    let mut proxy_server =
        airlock_proxy::ProxyServer::start(proxy_listener, &proxy, &server_settings)
            .context("starting the proxy's worker threads")?;
    // "listening" is printed once every worker accepts.
    proxy_server
        .accepting()
        .await
        .context("starting the proxy's worker threads")?;
    drop(proxy);
    // The admin API outlives the proxy's drain, so that /readyz can say
    // "draining" (503) to load balancers meanwhile.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let credential_feed = tokio::spawn(Arc::clone(&credentials).follow_changes());
    let admin_task = tokio::spawn({
        let shutdown = stopped(admin_stop_rx);
        let settings = airlock_admin::ServeSettings {
            header_read_timeout: config.proxy.header_read_timeout,
            drain_timeout: config.proxy.drain_timeout,
            ..airlock_admin::ServeSettings::default()
        };
        airlock_admin::serve(admin_listener, admin_state, settings, shutdown)
    });
    // On a store shared by replicas: other replicas' changes, and failing
    // closed when the database is out of reach (returns at once otherwise).
    let sync = tokio::spawn(Arc::clone(&registry).run_sync(
        SyncSettings::with_max_staleness(config.store_max_staleness),
        stopped(shutdown_rx.clone()),
    ));
    let flusher =
        tokio::spawn(Arc::clone(&registry).run_flusher(FLUSH_EVERY, stopped(shutdown_rx)));

    // Until now SIGTERM and SIGINT end the process at once (a start stuck
    // on a database can be interrupted); from now on the first drains, a
    // second ends the drain.
    let mut signals = Signals::install()?;
    readiness
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let store_shown = match &database {
        Some(file) => format!(
            "{} ({})",
            airlock_store::url_for_display(&config.store_url),
            file.display()
        ),
        None => airlock_store::url_for_display(&config.store_url).into_owned(),
    };
    tracing::info!(
        config = %config.source,
        proxy = %format!("{proxy_scheme}://{proxy_addr}"),
        admin = %format!("http://{admin_addr}"),
        store = %store_shown,
        audit_key = %if config.audit.enabled {
            audit_key::source(&config.audit)
        } else {
            "none (audit disabled)".to_owned()
        },
        "airlock started"
    );
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "airlock proxy listening on {proxy_scheme}://{proxy_addr}"
        )?;
        writeln!(out, "airlock admin listening on http://{admin_addr}")?;
        out.flush()?;
    }

    let signal = signals.next().await;
    let drain = proxy_server.drain_control();
    let in_flight = drain.in_flight();
    tracing::info!(
        signal,
        calls = in_flight.calls,
        connections = in_flight.connections,
        drain_timeout = %airlock_core::duration::format(config.proxy.drain_timeout),
        "shutting down: draining in-flight calls (another SIGTERM or SIGINT cuts them at once)"
    );
    readiness
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let first_signal = tokio::time::Instant::now();
    let shutdown = proxy_server.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            again = signals.next() => {
                if first_signal.elapsed() < REPEATED_SIGNAL {
                    // A wrapper and systemd may both pass one stop request
                    // on: a repeat this soon is the same request.
                    tracing::info!(
                        signal = again,
                        "signal within a second of the first: taken as the same stop request, \
                         the drain goes on (signal again to cut it)"
                    );
                    continue;
                }
                let in_flight = drain.in_flight();
                tracing::warn!(
                    signal = again,
                    calls = in_flight.calls,
                    connections = in_flight.connections,
                    "second signal: ending the drain now, cutting what still runs \
                     (their audit records are still written)"
                );
                drain.cut_now();
                shutdown.await;
                break;
            }
        }
    }
    // Only now: calls draining still need other replicas' revocations (the
    // sync) and their counts written (the flusher's last flush, which also
    // gives back what is left of the leases).
    let _ = shutdown_tx.send(true);
    let _ = admin_stop_tx.send(true);
    if let Ok(Err(e)) = admin_task.await {
        tracing::warn!(error = %e, "admin server ended with an error");
    }
    let _ = flusher.await;
    let _ = sync.await;
    let lost_before = audit_stats.as_ref().map_or(0, |s| s.lost.get());
    if let Some(writer) = audit_writer {
        writer.shutdown().await;
    }
    let lost = audit_stats.as_ref().map_or(0, |s| s.lost.get()) - lost_before;
    credential_feed.abort();
    for task in tls_reload {
        task.abort();
    }
    store.close().await;
    tracing::info!("stopped");
    if lost > 0 {
        // A supervisor (systemd, Kubernetes) sees the exit status, not the
        // log: a stop that lost records is no clean stop.
        anyhow::bail!(
            "{lost} audit record{} could not be written before the exit (see the log above)",
            if lost == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Takes an exclusive lock (`flock`) on `DATABASE.lock` next to the SQLite
/// database file, so that a second `serve` on the file stops at once with a
/// clear error. (A file of its own: closing a descriptor of the database
/// file itself would drop SQLite's own locks on it.) Other commands
/// (`audit`, `credential`) use the database alongside; they do not lock.
/// `None` for PostgreSQL and in-memory databases.
fn lock_sqlite_store(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;

    use std::os::unix::fs::MetadataExt;

    let Some(named) = airlock_store::sqlite_file(url) else {
        return Ok(None);
    };
    // The lock is next to the file itself, whatever name reaches it: a
    // symlink resolves to it, and a file with other hard links is refused
    // (another server could reach it by a name this one cannot know).
    let database = match std::fs::metadata(&named) {
        Ok(meta) if meta.is_dir() => anyhow::bail!(
            "the store {} is a directory: store.url names the database file \
             (sqlite://DIRECTORY/airlock.db)",
            named.display()
        ),
        Ok(meta) if meta.nlink() > 1 => anyhow::bail!(
            "the store {} has {} hard links: another `airlock serve` could use it under \
             another name; keep the database in a file with one name",
            named.display(),
            meta.nlink()
        ),
        Ok(meta) => {
            if meta.mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %named.display(),
                    mode = format_args!("{:04o}", meta.mode() & 0o7777),
                    "the SQLite store can be read or written by other users: it holds the \
                     session token hashes, sealed credentials and the audit trail; \
                     `chmod 600` it (airlock creates it so)"
                );
            }
            std::fs::canonicalize(&named)
                .with_context(|| format!("resolving {}", named.display()))?
        }
        Err(_) => {
            let parent = named
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let parent = std::fs::canonicalize(parent)
                .with_context(|| format!("resolving {}", parent.display()))?;
            parent.join(named.file_name().unwrap_or_default())
        }
    };
    let mut name = database.clone().into_os_string();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {} to lock the store", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the store {} is in use by another `airlock serve`: one server per SQLite file \
             (several servers share a PostgreSQL store)",
            database.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Raises the soft limit on open files to the hard one: every connection,
/// HTTP/2 stream in flight and upstream connection holds a descriptor, and
/// a soft limit of 1024 (or 256) is a few hundred calls. Logged either way.
/// Returns the limit in force (`None`: unlimited).
fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    let limit = getrlimit(Resource::Nofile);
    let wanted = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if limit.current == limit.maximum {
        return limit.current;
    }
    match setrlimit(Resource::Nofile, wanted) {
        Ok(()) => {
            tracing::info!(
                from = ?limit.current,
                to = ?limit.maximum,
                "raised the open files limit"
            );
            limit.maximum
        }
        Err(e) => {
            tracing::warn!(
                limit = ?limit.current,
                error = %e,
                "could not raise the open files limit"
            );
            limit.current
        }
    }
}

/// `proxy.max_connections`, lowered to what the open files limit can hold
/// ([`airlock_proxy::descriptors::connection_capacity`]): a proxy holding
/// more connections than it has descriptors for would leave every listener,
/// the admin API's too, failing to accept. Connections over the lowered
/// limit get the usual 503 `overloaded`. Logged as a warning when the
/// config file set the limit, as information when it is the default.
fn max_connections_in_force(
    limits: &ProxyLimits,
    open_files: Option<u64>,
    workers: usize,
) -> usize {
    let configured = limits.max_connections;
    let capacity = airlock_proxy::descriptors::connection_capacity(open_files, workers);
    let Some(limit) = open_files.filter(|_| capacity < configured) else {
        return configured;
    };
    let reserved = airlock_proxy::descriptors::reserved(workers);
    let origin = if limits.max_connections_set {
        ""
    } else {
        " (the default)"
    };
    let message = max_connections_message(configured, origin, limit, capacity, reserved);
    if limits.max_connections_set {
        tracing::warn!("{message}");
    } else {
        tracing::info!("{message}");
    }
    capacity
}

/// `sessions.max_calls_in_flight`: the default lowered to a quarter of the
/// `max_connections` this process can hold, so that one session cannot
/// hold them all (logged as information); a value the file sets is kept,
/// with a warning when it is not below them.
fn max_calls_in_flight_in_force(config: &Config, max_connections: usize) -> u32 {
    let configured = config.max_calls_in_flight;
    let connections = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if config.max_calls_in_flight_set {
        if configured >= connections {
            tracing::warn!(
                "sessions.max_calls_in_flight = {configured} is not below the {max_connections} \
                 connections this process can hold (proxy.max_connections, open files): one \
                 session can hold them all"
            );
        }
        return configured;
    }
    let quarter = (connections / 4).max(1);
    if configured <= quarter {
        return configured;
    }
    tracing::info!(
        "sessions.max_calls_in_flight = {quarter}: the default {configured} lowered to a quarter \
         of the {max_connections} connections this process can hold, so that one session \
         cannot hold them all (set it to choose)"
    );
    quarter
}

/// Why `max_connections_in_force` lowered the limit, with the arithmetic:
/// each connection may hold two descriptors (its own and its upstream
/// connection's) and `reserved` are kept for the rest.
fn max_connections_message(
    configured: usize,
    origin: &str,
    limit: u64,
    capacity: usize,
    reserved: u64,
) -> String {
    let per_connection = airlock_proxy::descriptors::DESCRIPTORS_PER_CONNECTION;
    let needed = u64::try_from(configured)
        .unwrap_or(u64::MAX)
        .saturating_mul(per_connection)
        .saturating_add(reserved);
    format!(
        "proxy.max_connections = {configured}{origin} needs up to {needed} open files \
         ({per_connection} per connection, its own and its upstream connection's, plus \
         {reserved} for the store, the admin API and files), more than the open files limit \
         of {limit}: using {capacity} connections; raise the limit (ulimit -n, systemd \
         LimitNOFILE=) to allow more"
    )
}

/// Longest the audit writer waits for one store call before it gives up on
/// it (and on its connection): well above a slow commit under load (tens of
/// ms; 244 µs on average for PostgreSQL at concurrency 1), well below the
/// minutes a connection left silent by a failover would hold it.
const AUDIT_STORE_CALL_LIMIT: Duration = Duration::from_secs(15);

/// The audit key (`None` with audit off), checked against the one the
/// store's trail was written with.
async fn load_audit_key(
    config: &Config,
    store: &dyn airlock_store::Store,
) -> anyhow::Result<Option<Arc<AuditKey>>> {
    if !config.audit.enabled {
        return Ok(None);
    }
    let (key, created) = audit_key::load_or_create(&config.audit, &config.store_url)?;
    crate::key_check::audit_key(store, &key, &created).await?;
    created.keep();
    Ok(Some(Arc::new(key)))
}

/// Starts the audit writer on this process's chain, with `key` (`None`:
/// audit off).
async fn start_audit(
    config: &Config,
    store: &Arc<dyn airlock_store::Store>,
    key: Option<Arc<AuditKey>>,
) -> anyhow::Result<(
    Auditor,
    Option<airlock_audit::WriterHandle>,
    Option<AuditAccess>,
)> {
    let Some(key) = key else {
        tracing::warn!("[audit] enabled = false: calls are not recorded");
        return Ok((Auditor::disabled(), None, None));
    };
    let settings = AuditSettings {
        fail_closed: config.audit.fail_closed,
        max_batch: 1024,
        queue_capacity: 65_536,
        stall_timeout: config.audit.stall_timeout,
        probe_interval: Duration::from_millis(250),
        store_call_limit: AUDIT_STORE_CALL_LIMIT,
    };
    let (auditor, writer) = Auditor::start(Arc::clone(store), Arc::clone(&key), settings)
        .await
        .context("starting the audit writer")?;
    let access = AuditAccess {
        store: Arc::clone(store),
        key,
    };
    Ok((auditor, Some(writer), Some(access)))
}

/// The admin token `AIRLOCK_ADMIN_TOKEN` sets (`None`: unset or empty),
/// refused when no client could send it or it is too short to be secret.
/// `config check` asks the same.
pub(crate) fn admin_token_from_env() -> anyhow::Result<Option<String>> {
    let token = match std::env::var("AIRLOCK_ADMIN_TOKEN") {
        Ok(token) => Some(token).filter(|t| !t.is_empty()),
        Err(std::env::VarError::NotPresent) => None,
        // Not to be taken for unset: the token generated on first start
        // would stay in force (round 34).
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!(
            "AIRLOCK_ADMIN_TOKEN is not valid UTF-8 (a byte outside printable ASCII): clients \
             send the admin token in an Authorization header, which cannot carry it, so no \
             client could use the admin API; use printable ASCII only (e.g. `openssl rand -hex \
             24`)"
        ),
    };
    let Some(token) = token else {
        return Ok(None);
    };
    // A token no client can send as it is (a trailing newline from a
    // secret file, a space) would lock every client out of the admin
    // API, with nothing said.
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        let what = match c {
            '\n' | '\r' => "a line break (a trailing newline from a secret file?)".to_owned(),
            ' ' => "a space".to_owned(),
            c if c.is_control() => format!("a control character ({:?})", c),
            c => format!("{c:?}, which is not printable ASCII"),
        };
        anyhow::bail!(
            "AIRLOCK_ADMIN_TOKEN contains {what}: clients send the admin token in an \
             Authorization header, which cannot carry it as it is, so no client could use \
             the admin API; use printable ASCII only (e.g. `openssl rand -hex 24`)"
        );
    }
    let length = token.chars().count();
    if length < MIN_ADMIN_TOKEN_CHARS {
        anyhow::bail!(
            "AIRLOCK_ADMIN_TOKEN has only {length} characters: the admin API's token needs \
             at least {MIN_ADMIN_TOKEN_CHARS} random ones (e.g. `openssl rand -hex 24`), or \
             leave it unset and serve makes one"
        );
    }
    Ok(Some(token))
}

/// The admin token's hash: from `AIRLOCK_ADMIN_TOKEN`, or generated on first
/// start (printed once, only its hash stored).
async fn admin_token_hash(store: &dyn airlock_store::Store) -> anyhow::Result<TokenHash> {
    if let Some(token) = admin_token_from_env()? {
        let stored = store.setting(ADMIN_TOKEN_HASH).await?;
        let hash = TokenHash::of(&token);
        if stored.is_some_and(|hex| hex != hash.to_hex()) {
            tracing::info!(
                "admin token: the one in AIRLOCK_ADMIN_TOKEN; the token generated on first start \
                 (its hash is stored) is not accepted while the variable is set, and is again \
                 when it is unset"
            );
        } else {
            tracing::info!("admin token: the one in AIRLOCK_ADMIN_TOKEN");
        }
        return Ok(hash);
    }
    if let Some(hex) = store.setting(ADMIN_TOKEN_HASH).await? {
        tracing::info!(
            "admin token: the one generated on first start (only its hash is stored; set \
             AIRLOCK_ADMIN_TOKEN to use another)"
        );
        return TokenHash::from_hex(&hex).context("stored admin token hash is corrupt");
    }
    let token = generate_secret("adm_");
    let hash = TokenHash::of(token.expose());
    let stored = store
        .set_setting_if_absent(ADMIN_TOKEN_HASH, &hash.to_hex())
        .await?;
    if stored != hash.to_hex() {
        // Another process won the race; its token is in force.
        tracing::info!(
            "admin token: the one another server generated on its first start (only its hash \
             is stored)"
        );
        return TokenHash::from_hex(&stored).context("stored admin token hash is corrupt");
    }
    let printed = {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "airlock admin token (shown once; only its hash is stored):"
        )
        .and_then(|()| writeln!(out, "  export AIRLOCK_ADMIN_TOKEN={}", token.expose()))
        .and_then(|()| out.flush())
    };
    if let Err(e) = printed {
        // Nobody saw it: its hash goes, so that the next start makes and
        // prints another (round 47: a closed stdout left a token no one
        // could ever use).
        store
            .remove_setting_if(ADMIN_TOKEN_HASH, &hash.to_hex())
            .await
            .context("removing the hash of an admin token that could not be printed")?;
        anyhow::bail!(
            "could not print the generated admin token on stdout ({e}); nothing was kept: start \
             again with stdout open (not closed or piped into a command that exits early), or \
             set AIRLOCK_ADMIN_TOKEN"
        );
    }
    tracing::info!("admin token: generated now, printed once on stdout (only its hash is stored)");
    Ok(hash)
}

/// How soon after the first a stop signal counts as a repeat of it, not
/// as a second request (which ends the drain).
const REPEATED_SIGNAL: Duration = Duration::from_secs(1);

/// SIGTERM and SIGINT, listened to from start to exit: the first starts
/// the drain, a second one (after [`REPEATED_SIGNAL`]) ends it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// The next SIGTERM or SIGINT, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_default_calls_in_flight_leave_room_for_other_sessions() {
        let default = Config::parse("x.toml", "").unwrap();
        assert_eq!(max_calls_in_flight_in_force(&default, 10_000), 512);
        assert_eq!(max_calls_in_flight_in_force(&default, 460), 115);
        assert_eq!(max_calls_in_flight_in_force(&default, 2), 1);
        // A value the file sets is kept (warned about when it is not
        // below the connections).
        let set = Config::parse("x.toml", "[sessions]\nmax_calls_in_flight = 600\n").unwrap();
        assert_eq!(max_calls_in_flight_in_force(&set, 460), 600);
        assert_eq!(max_calls_in_flight_in_force(&set, 10_000), 600);
    }
}
