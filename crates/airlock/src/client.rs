//! A small client of the admin API, used by the CLI commands.

use std::time::Duration;

use airlock_core::duration;
use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A non-2xx answer of the admin API: its status and the server's message.
#[derive(Debug)]
pub struct ApiRefusal {
    /// The answer's status.
    pub status: StatusCode,
    /// The server's `error.message` (for a 5xx without one, a sentence
    /// saying so; other answers without one are not refusals but errors).
    pub message: String,
}

/// The admin API's message for a path it has no route for.
const NO_ROUTE: &str = "no such admin route";

impl ApiRefusal {
    /// The server has no route for the path asked (a server older than the
    /// command, or AIRLOCK_ADMIN_URL with a path that is no prefix of the
    /// admin API's), rather than no such session or provider.
    pub fn no_route(&self) -> bool {
        self.status == StatusCode::NOT_FOUND && self.message.starts_with(NO_ROUTE)
    }
}

impl std::fmt::Display for ApiRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == StatusCode::UNAUTHORIZED {
            // The token was sent (an unset one is refused before any
            // request): the server does not know it.
            f.write_str(
                "the server refused the admin token in AIRLOCK_ADMIN_TOKEN (HTTP 401): set it to \
                 the token the server was started with",
            )
        } else {
            write!(f, "{} (HTTP {})", self.message, self.status.as_u16())
        }
    }
}

impl std::error::Error for ApiRefusal {}

/// An answer that is not one airlock's admin API gives: the admin URL names
/// another server. Not a refusal, and not one that may pass.
#[derive(Debug)]
pub struct NotAirlock(pub(crate) String);

impl std::fmt::Display for NotAirlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAirlock {}

/// The connector: plain HTTP, or, for an `https://` admin URL, TLS trusting
/// the system's roots and those of `ca_file` ([`CA_FILE_ENV`]). Roots are
/// loaded only for `https`: a plain call does not read the system's bundle.
fn connector(
    https: bool,
    ca_file: Option<&std::ffi::OsStr>,
    connect_timeout: Duration,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let roots = if https {
        airlock_proxy::provider::trust_roots(ca_file.map(std::path::Path::new)).map_err(|e| {
            match ca_file {
                Some(_) => format!("{CA_FILE_ENV}: {e}"),
                None => format!("the system's CA certificates for an https:// admin URL: {e}"),
            }
        })?
    } else {
        rustls::RootCertStore::empty()
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// The variable bounding each admin API call (a duration: `60s`, `2m`).
pub const TIMEOUT_ENV: &str = "AIRLOCK_ADMIN_TIMEOUT";
/// How long an admin API call may take, from connecting to the answer's
/// last byte, unless [`TIMEOUT_ENV`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to the admin API may take (at most the call's
/// timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The variable naming a PEM file of CA certificates trusted, besides the
/// system's, for an `https://` admin URL (a TLS-terminating proxy in front
/// of the admin listener with a private CA).
pub const CA_FILE_ENV: &str = "AIRLOCK_ADMIN_CA_FILE";

/// Talks to a running `airlock serve`.
pub struct AdminClient {
    base: String,
    /// `base` as messages show it: user information withheld.
    shown: String,
    /// Whether [`CA_FILE_ENV`] names a file (for the certificate hint).
    ca_file_set: bool,
    token: Option<String>,
    /// `AIRLOCK_ADMIN_TOKEN` is set but not UTF-8 (not taken for unset).
    token_not_utf8: bool,
    /// Bound on one call, or why [`TIMEOUT_ENV`] is refused.
    timeout: Result<Duration, String>,
    /// The client, or why an `https://` URL cannot be trusted.
    http: Result<Client<HttpsConnector<HttpConnector>, Full<Bytes>>, String>,
}

/// The variable naming the admin API's URL.
pub const ADMIN_URL_ENV: &str = "AIRLOCK_ADMIN_URL";

/// The admin API's URL from the config's `admin.listen`: an error for port
/// 0, which names no address (serve picks the port when it starts).
pub fn admin_url_of_listen(listen: std::net::SocketAddr) -> Result<String, String> {
    if listen.port() == 0 {
        return Err(format!(
            "admin.listen is {listen}: serve picks the port when it starts and prints it \
             (\"airlock admin listening on http://…\"); set AIRLOCK_ADMIN_URL to that address"
        ));
    }
    Ok(format!("http://{listen}"))
}

/// `AIRLOCK_ADMIN_URL`, when set and not empty.
pub fn admin_url_from_env() -> Option<String> {
    std::env::var(ADMIN_URL_ENV).ok().filter(|v| !v.is_empty())
}

impl AdminClient {
    /// A client for `AIRLOCK_ADMIN_URL` (or `default_url`) with `AIRLOCK_ADMIN_TOKEN`.
    pub fn from_env(default_url: String) -> Self {
        let base = admin_url_from_env().unwrap_or(default_url);
        let timeout = timeout_from(std::env::var(TIMEOUT_ENV).ok().as_deref());
        let connect_timeout = timeout
            .as_ref()
            .map_or(CONNECT_TIMEOUT, |t| CONNECT_TIMEOUT.min(*t));
        let https = base.starts_with("https://");
        let ca_file = std::env::var_os(CA_FILE_ENV).filter(|v| !v.is_empty());
        let http = connector(https, ca_file.as_deref(), connect_timeout).map(|connector| {
            // No idle connections kept: a CLI call is one request, and an
            // idle connection would hold one of the admin listener's
            // slots until its header read timeout.
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector)
        });
        let base = base.trim_end_matches('/').to_owned();
        Self {
            ca_file_set: ca_file.is_some(),
            shown: without_userinfo(&base),
            base,
            token: std::env::var("AIRLOCK_ADMIN_TOKEN")
                .ok()
                .filter(|v| !v.is_empty()),
            token_not_utf8: matches!(
                std::env::var("AIRLOCK_ADMIN_TOKEN"),
                Err(std::env::VarError::NotUnicode(_))
            ),
            timeout,
            http,
        }
    }

    /// The admin API's URL this client calls, as messages show it (user
    /// information withheld).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The admin token, or why there is none to send: every route the CLI
    /// calls but `/readyz` needs it, and a request bound to be refused is
    /// not sent.
    fn token(&self) -> Result<&str, NoAdminToken> {
        self.token.as_deref().ok_or(NoAdminToken {
            not_utf8: self.token_not_utf8,
        })
    }

    /// The error for an answer (of `status`) that airlock's admin API would
    /// not give, `what` saying what gives it away.
    fn not_airlock(&self, status: StatusCode, what: &str) -> NotAirlock {
        NotAirlock(format!(
            "{} answered HTTP {} but not as airlock's admin API does ({what}): is \
             AIRLOCK_ADMIN_URL the address of airlock's [admin] listen (by default \
             http://127.0.0.1:8081)?",
            self.shown,
            status.as_u16()
        ))
    }

    /// `answer` when it holds each of `fields`, as airlock's answer to the
    /// request does; otherwise the URL names another server ([`NotAirlock`])
    /// — a JSON object of another API must not pass for a session created,
    /// a credential stored or a trail verified.
    pub fn expect_fields(&self, answer: Value, fields: &[&str]) -> anyhow::Result<Value> {
        match fields.iter().find(|field| answer.get(**field).is_none()) {
            None => Ok(answer),
            Some(missing) => Err(self
                .not_airlock(StatusCode::OK, &format!("no \"{missing}\" in its JSON"))
                .into()),
        }
    }

    /// The names of the providers the server configures (`GET /v1/providers`).
    pub async fn provider_names(&self) -> anyhow::Result<Vec<String>> {
        let listed = self.call(Method::GET, "/v1/providers", None).await?;
        Ok(listed
            .get("providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect())
    }

    /// Sends a request; returns the JSON answer of a 2xx, or an error with
    /// the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.exchange(method.clone(), path, body).await?;
        let airlock_message = value.pointer("/error/message").and_then(Value::as_str);
        if status.is_success() && value.is_object() {
            return Ok(value);
        }
        // The proxy's answer to `/v1/...` with the admin token (no session
        // token, so `invalid_token` before anything else; the admin API's
        // code is `unauthorized`): the URL is the proxy's.
        if status == StatusCode::UNAUTHORIZED
            && value.pointer("/error/code").and_then(Value::as_str) == Some("invalid_token")
            && value.pointer("/error/type").and_then(Value::as_str) == Some("authentication_error")
        {
            return Err(NotAirlock(format!(
                "{} answered as airlock's proxy, not its admin API: AIRLOCK_ADMIN_URL points at \
                 proxy.listen; use [admin] listen's address (by default http://127.0.0.1:8081)",
                self.shown
            ))
            .into());
        }
        // The code airlock's admin API gives these statuses (another API's
        // JSON error in the same shape, such as OpenAI's, must not read as
        // an unknown session or provider, or a refused admin token).
        let code = value.pointer("/error/code").and_then(Value::as_str);
        let expected_code = match status {
            StatusCode::NOT_FOUND => Some("not_found"),
            StatusCode::UNAUTHORIZED => Some("unauthorized"),
            StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
            _ => None,
        };
        if let Some(expected) =
            expected_code.filter(|e| airlock_message.is_some() && code != Some(*e))
        {
            let what = format!("error code {:?}, not {expected:?}", code.unwrap_or(""));
            return Err(self.not_airlock(status, &what).into());
        }
        let message = match airlock_message {
            // Which URL had no route: AIRLOCK_ADMIN_URL's path prefix, or
            // an older server without the route.
            Some(NO_ROUTE) if status == StatusCode::NOT_FOUND => {
                // The likeliest such prefix: the API's own `/v1` (round 40).
                let hint = if self.shown.trim_end_matches('/').ends_with("/v1") {
                    " (AIRLOCK_ADMIN_URL ends in /v1, which every route already starts with: \
                     set it to the admin listener's address alone)"
                } else {
                    ""
                };
                format!("{NO_ROUTE}: {method} {}{path}{hint}", self.shown)
            }
            // The CLI uses only the methods a route has: a server that
            // has the route without the method is older than the command.
            Some(message) if status == StatusCode::METHOD_NOT_ALLOWED => format!(
                "{message}: {method} {}{path} (a server older than this command? `airlock \
                 status` shows its version)",
                self.shown
            ),
            Some(message) if !status.is_success() => message.to_owned(),
            // A 5xx may come from a proxy or load balancer in front of a
            // restarting airlock: still a refusal, one that may pass.
            _ if status.is_server_error() => format!(
                "{} answered without airlock's JSON error (a proxy in front of a restarting \
                 airlock? if not, AIRLOCK_ADMIN_URL may name another server)",
                self.shown
            ),
            _ if status.is_success() => {
                return Err(self.not_airlock(status, "no JSON object").into())
            }
            _ => return Err(self.not_airlock(status, "no JSON error").into()),
        };
        Err(ApiRefusal { status, message }.into())
    }

    /// Sends a request; returns the answer's status and JSON (`null` when
    /// it is none), whatever the status. Errors are the server out of
    /// reach, a timeout, or a request that cannot be made.
    pub async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.send(method, path, body, Token::Required).await
    }

    /// `GET /readyz`, which needs no token: sent without one, so that a
    /// server can be asked whether it is ready with AIRLOCK_ADMIN_TOKEN
    /// unset (or one it refuses). Returns the status and the JSON answer.
    pub async fn readiness(&self) -> anyhow::Result<(StatusCode, Value)> {
        self.send(Method::GET, "/readyz", None, Token::Withheld)
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Token,
    ) -> anyhow::Result<(StatusCode, Value)> {
        if !self.base.starts_with("http://") && !self.base.starts_with("https://") {
            anyhow::bail!(
                "AIRLOCK_ADMIN_URL {:?} must start with http:// or https:// (the admin listener \
                 speaks plain HTTP; https:// reaches it through a TLS-terminating proxy)",
                self.shown
            );
        }
        if self.base.contains(['?', '#']) {
            anyhow::bail!(
                "AIRLOCK_ADMIN_URL {:?} has a query or a fragment: give the admin listener's \
                 address (a path prefix is kept), e.g. http://127.0.0.1:8081",
                self.shown
            );
        }
        let http = self.http.as_ref().map_err(|e| anyhow!("{e}"))?;
        self.base.parse::<Uri>().map_err(|e| {
            anyhow!(
                "invalid admin URL {:?} (AIRLOCK_ADMIN_URL): {e}",
                self.shown
            )
        })?;
        // Callers build paths from checked values: a path that does not
        // parse is airlock's own fault, not the URL's.
        let url = format!("{}{path}", self.base);
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow!("invalid admin API path {path:?}: {e}"))?;
        let timeout = self.timeout.clone().map_err(|e| anyhow!(e))?;
        let mut req = Request::builder().method(method).uri(uri);
        if token == Token::Required {
            req = req.header(AUTHORIZATION, bearer(self.token()?)?);
        }
        let payload = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .context("building the admin API request")?;
        let exchange = async {
            let response = http.request(req).await.map_err(|e| {
                let cause = root_cause(&e);
                // A TLS handshake answered with plain HTTP: the admin
                // listener itself, which speaks no TLS.
                let hint = if cause.contains("InvalidContentType") {
                    "the server there does not speak TLS: the admin listener speaks plain HTTP \
                     (use http://, or the address of the TLS proxy in front of it)"
                } else if cause.contains("UnknownIssuer") && !self.ca_file_set {
                    "its certificate is signed by a CA this machine does not trust: \
                     AIRLOCK_ADMIN_CA_FILE names the CA that signed it"
                } else if cause.contains("UnknownIssuer") {
                    "its certificate is signed by none of the CAs of AIRLOCK_ADMIN_CA_FILE or \
                     the system's"
                } else {
                    "is `airlock serve` running? set AIRLOCK_ADMIN_URL"
                };
                anyhow!(
                    "cannot reach the airlock admin API at {}: {cause} ({hint})",
                    self.shown
                )
            })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .context("reading the admin API's answer")?
                .to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                anyhow!(
                    "the airlock admin API at {} did not answer within {} (is it an airlock \
                     admin listener? set AIRLOCK_ADMIN_URL; {TIMEOUT_ENV} sets the wait)",
                    self.shown,
                    duration::format(timeout)
                )
            })??;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

/// Whether a request carries the admin token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// Sent; a request is not made without one.
    Required,
    /// Not sent: the route needs none (`/readyz`).
    Withheld,
}

/// AIRLOCK_ADMIN_TOKEN unset (or not UTF-8): a request that needs the token
/// was not sent.
#[derive(Debug)]
pub struct NoAdminToken {
    not_utf8: bool,
}

impl std::fmt::Display for NoAdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.not_utf8 {
            f.write_str(
                "AIRLOCK_ADMIN_TOKEN is not valid UTF-8: it cannot be sent in a header (the \
                 admin token is printable ASCII)",
            )
        } else {
            f.write_str(
                "AIRLOCK_ADMIN_TOKEN is not set: the admin API needs the admin token (`airlock \
                 serve` prints it once at its first start, unless AIRLOCK_ADMIN_TOKEN was set \
                 for it); export AIRLOCK_ADMIN_TOKEN=...",
            )
        }
    }
}

impl std::error::Error for NoAdminToken {}

/// `url` with the user information of its authority (`user:password@`)
/// withheld, for messages.
fn without_userinfo(url: &str) -> String {
    // Without a scheme (a malformed URL, said back in its error), what
    // comes first is taken as the authority all the same.
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    // Up to the path only: a password may hold a raw '?' or '#' (invalid,
    // but then said back in an error).
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}[withheld]@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The bound on one call: [`DEFAULT_TIMEOUT`], or `value` of
/// [`TIMEOUT_ENV`] (whole seconds, at least 1s), or why `value` is refused.
fn timeout_from(value: Option<&str>) -> Result<Duration, String> {
    let Some(text) = value.filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match duration::parse(text) {
        Ok(t) if t >= Duration::from_secs(1) && t.subsec_nanos() == 0 => Ok(t),
        _ => Err(format!(
            "{TIMEOUT_ENV} {text:?} is not a timeout: use whole seconds, e.g. 30s, 60s or 5m"
        )),
    }
}

/// The `Authorization` value for `token`, or an error naming
/// `AIRLOCK_ADMIN_TOKEN` and what in it cannot go into a header.
fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        let what = if token.chars().any(char::is_control) {
            "a control character (a trailing newline?)"
        } else {
            "a character other than printable ASCII"
        };
        anyhow!("AIRLOCK_ADMIN_TOKEN is not a valid header value: it contains {what}")
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// `segment` percent-encoded for use as one segment of a URL path: every
/// byte but the unreserved ones (RFC 3986: letters, digits, `-._~`).
pub fn path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_withhold_a_url_s_user_information() {
        assert_eq!(
            without_userinfo("http://u:p@127.0.0.1:8081"),
            "http://[withheld]@127.0.0.1:8081"
        );
        assert_eq!(
            without_userinfo("https://a@b:c@host/x?y=z@w"),
            "https://[withheld]@host/x?y=z@w"
        );
        assert_eq!(without_userinfo("http://host:1/p@q"), "http://host:1/p@q");
        assert_eq!(
            without_userinfo("admin:pw@host:8081"),
            "[withheld]@host:8081"
        );
        assert_eq!(without_userinfo("host:1/a@b"), "host:1/a@b");
        // A password holding a raw '?' or '#' (refused, and said back).
        assert_eq!(
            without_userinfo("http://u:pa?ss@host:1"),
            "http://[withheld]@host:1"
        );
        assert_eq!(
            without_userinfo("http://u:p#w@host:1/x"),
            "http://[withheld]@host:1/x"
        );
        assert_eq!(
            without_userinfo("http://u:p@[::1]:8081/x"),
            "http://[withheld]@[::1]:8081/x"
        );
    }

    #[test]
    fn path_segment_encodes_all_but_unreserved_bytes() {
        assert_eq!(path_segment("open-ai_1.x~"), "open-ai_1.x~");
        assert_eq!(path_segment("../a b/é"), "..%2Fa%20b%2F%C3%A9");
    }

    #[test]
    fn the_timeout_is_whole_seconds_from_the_variable_or_60s() {
        assert_eq!(timeout_from(None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from(Some("")), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from(Some("5s")), Ok(Duration::from_secs(5)));
        for bad in ["0s", "1500ms", "soon"] {
            let err = timeout_from(Some(bad)).unwrap_err();
            assert!(err.starts_with("AIRLOCK_ADMIN_TIMEOUT "), "{err}");
        }
    }

    #[test]
    fn bearer_names_the_variable_and_the_problem() {
        let err = bearer("abc\n").unwrap_err().to_string();
        assert!(err.contains("AIRLOCK_ADMIN_TOKEN"), "{err}");
        assert!(err.contains("control character"), "{err}");
        assert!(!err.contains("URL"), "{err}");
        assert!(bearer("abc").unwrap().is_sensitive());
    }
}
