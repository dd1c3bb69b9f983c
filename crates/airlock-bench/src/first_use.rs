//! The cost of a token's first use (a registry cache miss, answered from the
//! store) against a token the process already knows.
//!
//! A session created through a process's own admin API is cached by that
//! process at once, so the sessions are created by a second airlock process
//! on the same database while the measured one is stopped (a SQLite store
//! takes one server at a time); the measured process, started again, then
//! sees each token for the first time.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode};

use crate::client::{self, Conn};
use crate::peers::{self, Target};
use crate::stats::Samples;
use crate::wrk::SMALL_JSON;

/// Latencies of first and second calls, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct FirstUseResult {
    /// First call of each token.
    pub miss: Samples,
    /// Second call of the same token.
    pub hit: Samples,
}

/// Creates `n` sessions with a second `airlock serve` on `config` (same
/// store as the measured process) and returns their tokens.
pub async fn tokens_from_second_process(
    bin: &Path,
    config: &Path,
    admin_token: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let (mut proc, urls) = peers::spawn_airlock(bin, config, admin_token)
        .context("starting the second airlock process")?;
    let admin = client::addr_of(urls.get(1).map_or("", String::as_str))?;
    let tokens = peers::create_sessions(admin, admin_token, n).await;
    proc.stop();
    tokens
}

/// Calls `target` twice with each token, in order, over one connection.
/// `target.authorization` is ignored.
pub async fn measure(target: &Target, tokens: &[String]) -> anyhow::Result<FirstUseResult> {
    let mut conn = Conn::open(target.addr).await?;
    let path = target.target("/v1/chat/completions");
    let mut miss = Vec::with_capacity(tokens.len());
    let mut hit = Vec::with_capacity(tokens.len());
    for token in tokens {
        let auth = format!("Bearer {token}");
        miss.push(timed_call(&mut conn, &path, &auth).await?);
        hit.push(timed_call(&mut conn, &path, &auth).await?);
    }
    Ok(FirstUseResult {
        miss: Samples::new(miss),
        hit: Samples::new(hit),
    })
}

async fn timed_call(conn: &mut Conn, path: &str, auth: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (status, body) = conn
        .call(
            Method::POST,
            path,
            Some(auth),
            Some(Bytes::from_static(SMALL_JSON.as_bytes())),
        )
        .await?;
    let elapsed = started.elapsed().as_secs_f64() * 1e6;
    if status != StatusCode::OK {
        bail!(
            "POST {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(elapsed)
}
