//! A small client of the admin API, used by the CLI commands.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Where the admin API is, when nothing says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:8081";

/// Talks to a running `airlock serve`.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client for `AIRLOCK_ADMIN_URL` (or `default_url`) with `AIRLOCK_ADMIN_TOKEN`.
    pub fn from_env(default_url: String) -> Self {
        let base = std::env::var("AIRLOCK_ADMIN_URL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or(default_url);
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: std::env::var("AIRLOCK_ADMIN_TOKEN")
                .ok()
                .filter(|v| !v.is_empty()),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request; returns the JSON answer of a 2xx, or an error with
    /// the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        if !self.base.starts_with("http://") {
            anyhow::bail!(
                "AIRLOCK_ADMIN_URL {:?} must start with http:// (the admin listener speaks plain \
                 HTTP; reach a remote one through a tunnel or a TLS-terminating proxy)",
                self.base
            );
        }
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let payload = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .with_context(|| format!("invalid admin URL {:?} (AIRLOCK_ADMIN_URL)", self.base))?;
        let response = self.http.request(req).await.map_err(|e| {
            anyhow!(
                "cannot reach the airlock admin API at {}: {} (is `airlock serve` running? set AIRLOCK_ADMIN_URL)",
                self.base,
                root_cause(&e)
            )
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading the admin API's answer")?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("no error message");
        if status == StatusCode::UNAUTHORIZED {
            bail!("{message} (set AIRLOCK_ADMIN_TOKEN)");
        }
        bail!("{message} (HTTP {})", status.as_u16())
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
