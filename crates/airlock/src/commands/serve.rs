//! `airlock serve`: wires the store, the registry, the proxy and the admin
//! API together, runs them until SIGINT/SIGTERM, then drains.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use airlock_admin::{AdminMetrics, AdminState, ProviderEnv};
use airlock_core::token::generate_secret;
use airlock_core::TokenHash;
use airlock_proxy::{Provider, ProviderSpec, Proxy, ProxyMetrics, ProxySettings, ServerSettings};
use airlock_session::Registry;
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;

/// Store setting holding the SHA-256 (hex) of a generated admin token.
const ADMIN_TOKEN_HASH: &str = "admin_token_hash";
/// How often call counters are written to the store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs the server until a shutdown signal.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let store = airlock_store::open(&config.store_url)
        .await
        .with_context(|| format!("opening store {}", config.store_url))?;
    let admin_token_hash = admin_token_hash(store.as_ref()).await?;
    let registry = Arc::new(Registry::new(Arc::clone(&store)));

    let mut metrics_registry = prometheus_client::registry::Registry::default();
    let proxy_metrics = ProxyMetrics::new(&mut metrics_registry);
    let admin_metrics = AdminMetrics::register(&mut metrics_registry);

    let mut providers = Vec::new();
    let mut provider_envs = BTreeMap::new();
    for (name, p) in &config.providers {
        let credential = p
            .credential
            .read()
            .map_err(|e| anyhow::anyhow!("providers.{name}.credential: {e}"))?;
        if credential.is_none() {
            tracing::warn!(provider = %name, "no credential available; calls to this provider get 503 until one is configured");
        }
        let spec = ProviderSpec {
            name: name.clone(),
            upstream: p.upstream.clone(),
            auth: p.auth.clone(),
            credential,
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

    let proxy_listener = TcpListener::bind(config.proxy.listen)
        .await
        .with_context(|| format!("binding proxy.listen {}", config.proxy.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin_listen))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let public_url = config
        .proxy
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{proxy_addr}"));

    let proxy = Arc::new(Proxy::new(
        providers,
        Arc::clone(&registry),
        ProxySettings {
            upstream_timeout: config.proxy.upstream_timeout,
        },
        proxy_metrics.for_provider("_unknown"),
    ));
    let admin_state = Arc::new(AdminState {
        registry: Arc::clone(&registry),
        providers: provider_envs,
        public_url,
        admin_token_hash,
        max_ttl: config.max_ttl,
        metrics_registry,
        metrics: admin_metrics,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server_settings = ServerSettings {
        header_read_timeout: config.proxy.header_read_timeout,
        drain_timeout: config.proxy.drain_timeout,
    };
    let proxy_task = tokio::spawn(airlock_proxy::serve(
        proxy_listener,
        proxy,
        server_settings,
        stopped(shutdown_rx.clone()),
    ));
    let admin_task = tokio::spawn({
        let shutdown = stopped(shutdown_rx.clone());
        async move {
            axum::serve(admin_listener, airlock_admin::router(admin_state))
                .with_graceful_shutdown(shutdown)
                .await
        }
    });
    let flusher =
        tokio::spawn(Arc::clone(&registry).run_flusher(FLUSH_EVERY, stopped(shutdown_rx)));

    tracing::info!(config = %config.source, store = %config.store_url, "airlock started");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "airlock proxy listening on http://{proxy_addr}")?;
        writeln!(out, "airlock admin listening on http://{admin_addr}")?;
        out.flush()?;
    }

    wait_for_signal().await?;
    tracing::info!("shutting down: draining in-flight calls");
    let _ = shutdown_tx.send(true);
    let _ = proxy_task.await;
    if let Ok(Err(e)) = admin_task.await {
        tracing::warn!(error = %e, "admin server ended with an error");
    }
    let _ = flusher.await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The admin token's hash: from `AIRLOCK_ADMIN_TOKEN`, or generated on first
/// start (printed once, only its hash stored).
async fn admin_token_hash(store: &dyn airlock_store::Store) -> anyhow::Result<TokenHash> {
    if let Some(token) = std::env::var("AIRLOCK_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Ok(TokenHash::of(&token));
    }
    if let Some(hex) = store.setting(ADMIN_TOKEN_HASH).await? {
        return TokenHash::from_hex(&hex).context("stored admin token hash is corrupt");
    }
    let token = generate_secret("adm_");
    let hash = TokenHash::of(token.expose());
    let stored = store
        .set_setting_if_absent(ADMIN_TOKEN_HASH, &hash.to_hex())
        .await?;
    if stored != hash.to_hex() {
        // Another process won the race; its token is in force.
        return TokenHash::from_hex(&stored).context("stored admin token hash is corrupt");
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "airlock admin token (shown once; only its hash is stored):"
    )?;
    writeln!(out, "  export AIRLOCK_ADMIN_TOKEN={}", token.expose())?;
    out.flush()?;
    Ok(hash)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
