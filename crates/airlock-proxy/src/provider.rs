//! A provider: where calls go (the upstream), how its real credential is
//! presented (the auth style), and the HTTP client that reaches it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use airlock_core::Secret;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::results_url::ResultsUrl;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::credential_source::{CredentialCell, Loaded};
use crate::metrics::ProviderMetrics;
use crate::redact::{Redactor, RedactorError};
use crate::upstream_pool::{PoolSettings, UpstreamPool};

/// How a provider expects its credential, and where agents put their token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// A header of its own, e.g. `x-api-key: KEY`.
    Header(HeaderName),
    /// A query parameter, e.g. `?key=KEY`.
    Query(String),
}

/// What the binary hands over to build a provider.
#[derive(Debug)]
pub struct ProviderSpec {
    pub name: String,
    /// `http://` or `https://` URL, optionally with a path prefix.
    pub upstream: String,
    pub auth: AuthStyle,
    /// Extra headers sent on every call (e.g. `anthropic-version`); they
    /// replace any the agent sent under the same name.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Extra trusted CA certificates (PEM) for an `https://` upstream.
    pub ca_file: Option<PathBuf>,
    /// How long an idle upstream connection is kept for reuse (the
    /// config's `keepalive_timeout`, 90 s unless set; the pool keeps at
    /// least a second).
    pub keepalive_timeout: Duration,
    /// The real credential, kept current by its source. Empty: calls are
    /// refused with 503 until one is set.
    pub credential: Arc<CredentialCell<PreparedCredential>>,
}

/// How the real credential is written into a request: the auth style and,
/// for header styles, a format such as `token {key}` or `Basic {key}`.
#[derive(Clone, Debug)]
pub struct CredentialFormat {
    auth: AuthStyle,
    /// Text around `{key}`: (before, after).
    template: Option<(String, String)>,
}

/// A credential ready for the request path: the header or query pair to
/// insert, and the leak guard that looks for it in responses.
pub struct PreparedCredential {
    injected: Injected,
    /// What the leak guard looks for: this key's forms, and those of the
    /// key it replaced, if any ([`PreparedCredential::also_guarding`]).
    redactor: Redactor,
    /// This key's own forms.
    own: Redactor,
}

/// Most bytes an upstream HTTP/1.1 connection reads ahead (hyper's read
/// buffer limit). It also bounds a provider's response head: a longer one
/// fails the call with 502.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// How upstream connections are opened (TCP, then TLS for https).
pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// A configured provider, ready for the request path.
pub struct Provider {
    /// Shared with every audit record of a call to this provider.
    name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// Upstream path prefix without trailing slash (often empty).
    path_prefix: String,
    auth: AuthStyle,
    headers: Vec<(HeaderName, HeaderValue)>,
    credential: Arc<CredentialCell<PreparedCredential>>,
    pool: UpstreamPool,
    /// Opens the dedicated connections of WebSocket handshakes (ALPN
    /// `http/1.1` only).
    upgrade_connector: UpstreamConnector,
    pub(crate) metrics: ProviderMetrics,
    /// The upstream as the provider spells its own URLs
    /// (`https://api.anthropic.com`).
    own_url: Arc<str>,
    /// Points batch `results_url`s at airlock (set once airlock's public
    /// URL is known: [`Provider::answer_urls_via`]).
    results_url: Option<ResultsUrl>,
}

/// The real credential, prepared once in the form the request path inserts.
enum Injected {
    Header(HeaderName, HeaderValue),
    /// `NAME=VALUE`, percent-encoded.
    Query(Secret),
}

/// Why a provider could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("auth must be \"bearer\", \"header:NAME\" or \"query:NAME\", not {0:?}")]
    Auth(String),
    #[error("upstream {0:?} must be an http:// or https:// URL without query or user info")]
    Upstream(String),
    #[error("the credential contains characters that cannot be sent in a header")]
    CredentialNotHeaderSafe,
    #[error("the credential is empty")]
    CredentialEmpty,
    #[error(
        "the credential begins or ends with white space (a padded copy?): a provider's key holds \
         none there; give the key without it"
    )]
    CredentialPadded,
    #[error("auth_format must contain {{key}} exactly once, not {0:?}")]
    Format(String),
    #[error("auth_format applies to header styles only (bearer or header:NAME)")]
    FormatNeedsHeader,
    #[error(transparent)]
    Guard(#[from] RedactorError),
    #[error("could not load the system's root certificates: {0}")]
    Roots(std::io::Error),
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

// === impl AuthStyle ===

impl FromStr for AuthStyle {
    type Err = ProviderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = || ProviderError::Auth(s.to_owned());
        if s == "bearer" {
            return Ok(Self::Bearer);
        }
        if let Some(name) = s.strip_prefix("header:") {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| fail())?;
            return Ok(if name == http::header::AUTHORIZATION {
                Self::Bearer
            } else {
                Self::Header(name)
            });
        }
        if let Some(name) = s.strip_prefix("query:") {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            return if ok {
                Ok(Self::Query(name.to_owned()))
            } else {
                Err(fail())
            };
        }
        Err(fail())
    }
}

impl fmt::Display for AuthStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bearer => f.write_str("bearer"),
            Self::Header(name) => write!(f, "header:{name}"),
            Self::Query(name) => write!(f, "query:{name}"),
        }
    }
}

// === impl Provider ===

impl Provider {
    /// Builds a provider and its connection pool.
    pub fn new(
        spec: ProviderSpec,
        connect_timeout: Duration,
        metrics: ProviderMetrics,
    ) -> Result<Self, ProviderError> {
        let bad_upstream = || ProviderError::Upstream(spec.upstream.clone());
        let uri: Uri = spec.upstream.parse().map_err(|_| bad_upstream())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad_upstream)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad_upstream());
        }
        let authority = uri.authority().cloned().ok_or_else(bad_upstream)?;
        if authority.as_str().contains('@') || uri.query().is_some() {
            return Err(bad_upstream());
        }
        let host = host_header(&scheme, &authority).ok_or_else(bad_upstream)?;
        let path_prefix = uri.path().trim_end_matches('/').to_owned();
        airlock_core::path::validate(if path_prefix.is_empty() {
            "/"
        } else {
            &path_prefix
        })
        .map_err(|_| bad_upstream())?;

        let roots = roots_for(scheme == Scheme::HTTPS, spec.ca_file.as_deref())?;
        let connector = connector_with(roots.clone(), connect_timeout, true);
        let upgrade_connector = connector_with(roots, connect_timeout, false);
        let pool = new_pool(
            connector,
            &scheme,
            &authority,
            &host,
            spec.keepalive_timeout,
        )
        .map_err(|_| bad_upstream())?;
        let own_url = Arc::from(format!(
            "{scheme}://{}{path_prefix}",
            host.to_str().map_err(|_| bad_upstream())?
        ));
        Ok(Self {
            pool,
            upgrade_connector,
            own_url,
            results_url: None,
            name: Arc::from(spec.name),
            scheme,
            authority,
            path_prefix,
            auth: spec.auth,
            headers: spec.headers,
            credential: spec.credential,
            metrics,
        })
    }

    /// The same provider with a connection pool of its own: each data-plane
    /// worker gets one, so that its upstream connections live on its thread.
    pub fn with_own_pool(&self) -> Self {
        Self {
            name: Arc::clone(&self.name),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            path_prefix: self.path_prefix.clone(),
            auth: self.auth.clone(),
            headers: self.headers.clone(),
            credential: Arc::clone(&self.credential),
            pool: self.pool.empty_like(),
            own_url: Arc::clone(&self.own_url),
            results_url: self.results_url.clone(),
            upgrade_connector: self.upgrade_connector.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The provider's name (the first path segment agents use).
    /// Has batch answers' `results_url`s at this provider's upstream point
    /// at `{public_url}/{name}` (see [`ResultsUrl`]).
    pub fn answer_urls_via(&mut self, public_url: &str) {
        self.results_url = Some(ResultsUrl::new(
            &self.own_url,
            &format!("{}/{}", public_url.trim_end_matches('/'), self.name),
        ));
    }

    /// The rewrite of `results_url`s, for a call to `path` that may get
    /// one back.
    pub(crate) fn results_url_for(&self, path: &str) -> Option<&ResultsUrl> {
        self.results_url
            .as_ref()
            .filter(|_| ResultsUrl::applies_to(path))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as audit records hold it: a clone costs no allocation.
    pub(crate) fn recorded_name(&self) -> &Arc<str> {
        &self.name
    }

    /// How the provider authenticates.
    pub fn auth(&self) -> &AuthStyle {
        &self.auth
    }

    /// The upstream request target (origin form) for `path` (already
    /// validated) and the query to send.
    pub(crate) fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut path_and_query = String::with_capacity(
            self.path_prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        path_and_query.push_str(&self.path_prefix);
        path_and_query.push_str(path);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Ok(Uri::from(PathAndQuery::from_maybe_shared(path_and_query)?))
    }

    /// The credential in force now (one atomic load), or `None` when none
    /// is configured.
    pub fn credential(&self) -> Option<Arc<Loaded<PreparedCredential>>> {
        self.credential.load()
    }

    /// Headers sent on every call.
    pub(crate) fn extra_headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// This worker's connections to the provider.
    pub(crate) fn pool(&self) -> &UpstreamPool {
        &self.pool
    }

    /// What opens a WebSocket handshake's own connection (HTTP/1.1 only).
    pub(crate) fn upgrade_connector(&self) -> &UpstreamConnector {
        &self.upgrade_connector
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field(
                "upstream",
                &format_args!("{}://{}{}", self.scheme, self.authority, self.path_prefix),
            )
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

// === impl CredentialFormat ===

impl CredentialFormat {
    /// `auth` with an optional `format` containing `{key}` once (header
    /// styles only; bearer's default is `Bearer {key}`).
    pub fn new(auth: AuthStyle, format: Option<&str>) -> Result<Self, ProviderError> {
        let template = match format {
            None => None,
            Some(_) if matches!(auth, AuthStyle::Query(_)) => {
                return Err(ProviderError::FormatNeedsHeader)
            }
            Some(f) => match f.split_once("{key}") {
                Some((before, after)) if !after.contains("{key}") => {
                    Some((before.to_owned(), after.to_owned()))
                }
                _ => return Err(ProviderError::Format(f.to_owned())),
            },
        };
        Ok(Self { auth, template })
    }

    /// The auth style.
    pub fn auth(&self) -> &AuthStyle {
        &self.auth
    }

    /// Prepares `credential` for the request path. Refuses an empty
    /// credential, one with white space at either end (blank ones too:
    /// the leak guard would take every run of spaces for the key), one
    /// that cannot be sent in a header, and one too short for the leak
    /// guard.
    pub fn prepare(&self, credential: &Secret) -> Result<PreparedCredential, ProviderError> {
        let key = credential.expose();
        if key.is_empty() {
            return Err(ProviderError::CredentialEmpty);
        }
        if key.starts_with(char::is_whitespace) || key.ends_with(char::is_whitespace) {
            return Err(ProviderError::CredentialPadded);
        }
        let formatted = |default_before: &str| match &self.template {
            Some((before, after)) => format!("{before}{key}{after}"),
            None => format!("{default_before}{key}"),
        };
        let injected = match &self.auth {
            AuthStyle::Bearer => Injected::Header(
                http::header::AUTHORIZATION,
                sensitive_header(&formatted("Bearer "))?,
            ),
            AuthStyle::Header(name) => {
                Injected::Header(name.clone(), sensitive_header(&formatted(""))?)
            }
            AuthStyle::Query(name) => Injected::Query(Secret::new(format!(
                "{name}={}",
                utf8_percent_encode(key, QUERY_VALUE)
            ))),
        };
        // Guard the raw key and, where they differ, the form sent upstream
        // and the forms a provider echoing its URL may give it back in
        // (percent-encoded with upper- or lower-case hex, unreserved
        // characters encoded too or not). Equal forms are guarded once.
        // A key sent in a header is guarded in those spellings too when it
        // holds anything but unreserved characters (`/`, `+`, `=` of a
        // base64 key): a provider may put it in a URL it answers with.
        // Keys of letters, digits and `-._~` (the common ones) read the
        // same in every one, so they cost no searcher per response.
        let mut forms: Vec<Vec<u8>> = vec![key.as_bytes().to_vec()];
        let unreserved = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        let echoes_url = match &injected {
            Injected::Header(_, value) => {
                forms.push(value.as_bytes().to_vec());
                !unreserved
            }
            Injected::Query(_) => true,
        };
        if echoes_url {
            for set in ECHO_ENCODINGS {
                let encoded = utf8_percent_encode(key, set).to_string();
                // Form encoders (Go's `QueryEscape`, Python's
                // `quote_plus`, Java's) write a space as `+`.
                let plus = encoded.contains("%20").then(|| encoded.replace("%20", "+"));
                for spelling in std::iter::once(encoded).chain(plus) {
                    forms.push(lower_case_escapes(&spelling).into_bytes());
                    forms.push(spelling.into_bytes());
                }
            }
        }
        // JSON encoders that escape `/` (PHP's by default) write `\/`;
        // .NET's System.Text.Json (its default encoder) writes `+` as
        // `\u002B` (round 38).
        if key.contains('/') {
            forms.push(key.replace('/', "\\/").into_bytes());
        }
        if key.contains('+') {
            forms.push(key.replace('+', "\\u002B").into_bytes());
        }
        let secrets: Vec<&[u8]> = forms.iter().map(Vec::as_slice).collect();
        let own = Redactor::new(&secrets)?;
        Ok(PreparedCredential {
            injected,
            redactor: own.clone(),
            own,
        })
    }
}

// === impl PreparedCredential ===

impl PreparedCredential {
    /// The header to insert, for header-based styles.
    pub(crate) fn header(&self) -> Option<(&HeaderName, &HeaderValue)> {
        match &self.injected {
            Injected::Header(name, value) => Some((name, value)),
            Injected::Query(_) => None,
        }
    }

    /// The `NAME=VALUE` query pair to append, for the query style.
    pub(crate) fn query_pair(&self) -> Option<&str> {
        match &self.injected {
            Injected::Query(pair) => Some(pair.expose()),
            Injected::Header(..) => None,
        }
    }

    /// The leak guard for this credential (also the keys it replaced).
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// This credential, guarding against the key it replaces as well (that
    /// key's own forms, not what it guarded itself): a key rotated out
    /// usually stays valid at the provider for a while, and answers may
    /// still echo it.
    pub fn also_guarding(mut self, previous: &PreparedCredential) -> Result<Self, ProviderError> {
        self.redactor = self.own.union(&previous.own)?;
        Ok(self)
    }
}

impl fmt::Debug for PreparedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreparedCredential([redacted])")
    }
}

/// What a query-style credential's value is percent-encoded with: all but
/// RFC 3986's unreserved characters, so that the usual key alphabets
/// (letters, digits, `-`, `_`, `.`, `~`) go upstream as they are.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The ways common URL encoders spell a value, for the leak guard of a
/// query-style key a provider may echo: this proxy's own (and Go's
/// `QueryEscape`, Python's `quote(safe='')`), JavaScript's
/// `encodeURIComponent` (`!'()*` left), Python's `quote` (`/` left),
/// Java's `URLEncoder` (`-_.*` left), and everything but letters and
/// digits; each also with a space as `+`. (An encoder that leaves `+`, `/`
/// and `=` as they are, such as `encodeURI`, gives a key of those
/// characters back raw, which is guarded anyway.)
const ECHO_ENCODINGS: [&AsciiSet; 5] = [
    QUERY_VALUE,
    &QUERY_VALUE
        .remove(b'!')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*'),
    &QUERY_VALUE.remove(b'/'),
    &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'*'),
    NON_ALPHANUMERIC,
];

/// `encoded` with the hex digits of its `%XX` escapes in lower case.
fn lower_case_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

fn sensitive_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut value =
        HeaderValue::from_str(value).map_err(|_| ProviderError::CredentialNotHeaderSafe)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The system's root certificates (`SSL_CERT_FILE` and `SSL_CERT_DIR`
/// override where they are read from), plus those in `ca_file` (PEM).
pub fn trust_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, ProviderError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipped a system root certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(ProviderError::Roots(std::io::Error::other(
            "no trusted root certificate: install the system's CA bundle or set ca_file",
        )));
    }
    Ok(roots)
}

/// Checks `ca_file` as a provider would load it: readable, PEM, and every
/// certificate in it usable as a trust root. The number of certificates.
pub fn check_ca_file(ca_file: &Path) -> Result<usize, ProviderError> {
    add_ca_file(&mut rustls::RootCertStore::empty(), ca_file)
}

/// Adds the certificates of `path` (PEM, at least one) to `roots`.
fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, ProviderError> {
    let bad = |reason: String| ProviderError::CaFile {
        path: path.display().to_string(),
        reason,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(added)
}

/// The pooled connections' connector (tests build pools with it).
#[cfg(test)]
pub(crate) fn build_connector(
    https: bool,
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<UpstreamConnector, ProviderError> {
    Ok(connector_with(
        roots_for(https, ca_file)?,
        connect_timeout,
        true,
    ))
}

/// The roots an upstream's certificate must chain to (none for plain HTTP).
fn roots_for(https: bool, ca_file: Option<&Path>) -> Result<rustls::RootCertStore, ProviderError> {
    if https {
        trust_roots(ca_file)
    } else {
        Ok(rustls::RootCertStore::empty())
    }
}

/// A connector trusting `roots`. With `http2` it offers `h2` and
/// `http/1.1` by ALPN; without, `http/1.1` only (a WebSocket handshake's
/// connection: a provider must not pick HTTP/2 for it).
fn connector_with(
    roots: rustls::RootCertStore,
    connect_timeout: Duration,
    http2: bool,
) -> UpstreamConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if http2 {
        return HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
    }
    // The builder offers no ALPN at all for HTTP/1 only; say it.
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    HttpsConnector::from((http, config))
}

/// An empty connection pool; its connections' tasks run on the runtime
/// that opens them.
fn new_pool(
    connector: UpstreamConnector,
    scheme: &Scheme,
    authority: &Authority,
    host: &HeaderValue,
    idle_timeout: Duration,
) -> Result<UpstreamPool, http::Error> {
    UpstreamPool::new(
        connector,
        scheme.clone(),
        authority.clone(),
        host.clone(),
        PoolSettings {
            idle_timeout,
            // A response body is read no further ahead of the agent than
            // this (hyper's default lets a connection buffer ~400 KiB).
            read_buffer: UPSTREAM_READ_BUFFER,
        },
    )
}

/// `Host` for `authority`: the authority as configured, without a port
/// that is the scheme's default (as HTTP clients send it; a front end
/// matching `Host` exactly may not know the other spelling).
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    if authority.port_u16() == Some(default_port) {
        // `host()` keeps an IPv6 address's brackets.
        HeaderValue::from_str(authority.host()).ok()
    } else {
        HeaderValue::from_str(authority.as_str()).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn host(upstream: &str) -> String {
        let uri: Uri = upstream.parse().unwrap();
        let value = host_header(uri.scheme().unwrap(), uri.authority().unwrap()).unwrap();
        value.to_str().unwrap().to_owned()
    }

    #[test]
    fn host_is_the_authority_without_a_default_port() {
        assert_eq!(host("https://api.openai.com"), "api.openai.com");
        assert_eq!(host("https://api.openai.com:443/v1"), "api.openai.com");
        assert_eq!(host("https://api.openai.com:8443"), "api.openai.com:8443");
        assert_eq!(host("https://api.openai.com:80"), "api.openai.com:80");
        assert_eq!(host("http://example.com:80"), "example.com");
        assert_eq!(host("http://[::1]:9100"), "[::1]:9100");
        assert_eq!(host("http://[::1]:80"), "[::1]");
    }

    /// Round 43: a blank credential was stored, and the leak guard then
    /// took every run of spaces in an answer for the key; a padded one was
    /// sent with its spaces, which a header value loses on the way.
    #[test]
    fn a_credential_with_white_space_at_either_end_is_refused() {
        for auth in [AuthStyle::Bearer, AuthStyle::Query("key".to_owned())] {
            let format = CredentialFormat::new(auth, None).unwrap();
            for padded in [
                "            ",
                "\t\t\t\t\t\t\t\t\t\t\t\t",
                "  sk-live-0123456789abcdef",
                "sk-live-0123456789abcdef  ",
                "sk-live-0123456789abcdef\t",
                "\u{a0}sk-live-0123456789abcdef",
            ] {
                let refused = format.prepare(&Secret::new(padded.to_owned()));
                assert!(
                    matches!(refused, Err(ProviderError::CredentialPadded)),
                    "{padded:?}: {refused:?}"
                );
            }
            format
                .prepare(&Secret::new("sk-live-0123456789abcdef".to_owned()))
                .unwrap();
        }
    }

    #[test]
    fn a_query_key_goes_out_minimally_encoded_and_is_guarded_in_the_usual_spellings() {
        let format = CredentialFormat::new(AuthStyle::Query("key".to_owned()), None).unwrap();
        let prepared = format
            .prepare(&Secret::new("AIza-x_y.z~w+/=".to_owned()))
            .unwrap();
        assert_eq!(prepared.query_pair(), Some("key=AIza-x_y.z~w%2B%2F%3D"));
        let guard = prepared.redactor();
        for form in [
            "AIza-x_y.z~w+/=",
            "AIza-x_y.z~w%2B%2F%3D",
            "AIza-x_y.z~w%2b%2f%3d",
            "AIza%2Dx%5Fy%2Ez%7Ew%2B%2F%3D",
            "AIza%2dx%5fy%2ez%7ew%2b%2f%3d",
            // Python's quote: `/` raw.
            "AIza-x_y.z~w%2B/%3D",
            "AIza-x_y.z~w%2b/%3d",
            // Java's URLEncoder: `~` encoded.
            "AIza-x_y.z%7Ew%2B%2F%3D",
        ] {
            assert!(guard.contains_secret(form.as_bytes()), "{form}");
        }
        assert_eq!(lower_case_escapes("A%2BbC%3Dd"), "A%2bbC%3dd");
        // ... and as a JSON encoder that escapes `/` writes it.
        assert!(guard.contains_secret(br"AIza-x_y.z~w+\/="));

        // A key with a space, `!'()*` and a non-ASCII letter.
        let prepared = format
            .prepare(&Secret::new("Ab c*!(x)'y+z/=é".to_owned()))
            .unwrap();
        let guard = prepared.redactor();
        for form in [
            // encodeURIComponent
            "Ab%20c*!(x)'y%2Bz%2F%3D%C3%A9",
            // Go's QueryEscape, Python's quote_plus
            "Ab+c%2A%21%28x%29%27y%2Bz%2F%3D%C3%A9",
            // Java's URLEncoder
            "Ab+c*%21%28x%29%27y%2Bz%2F%3D%C3%A9",
            // ... in lower-case hex
            "Ab+c*%21%28x%29%27y%2bz%2f%3d%c3%a9",
        ] {
            assert!(guard.contains_secret(form.as_bytes()), "{form}");
        }
    }

    /// A base64 key sent in a header is guarded in its URL and JSON
    /// spellings too (round 33: a redirect's `Location` and a JSON body
    /// with `\/` went out unredacted); a key of unreserved characters only
    /// gets no more searchers than its own and the header value.
    #[test]
    fn a_header_key_with_reserved_characters_is_guarded_in_its_echo_spellings() {
        // The key, and the header value where it differs.
        for (style, plain_searchers) in [
            (AuthStyle::Bearer, 2),
            (
                AuthStyle::Header(http::HeaderName::from_static("x-api-key")),
                1,
            ),
        ] {
            let format = CredentialFormat::new(style, None).unwrap();
            let prepared = format
                .prepare(&Secret::new("sk-EVILKEY-0123456789abcdef/+=".to_owned()))
                .unwrap();
            let guard = prepared.redactor();
            for form in [
                "sk-EVILKEY-0123456789abcdef/+=",
                "sk-EVILKEY-0123456789abcdef%2F%2B%3D",
                "sk-EVILKEY-0123456789abcdef%2f%2b%3d",
                r"sk-EVILKEY-0123456789abcdef\/+=",
                r"sk-EVILKEY-0123456789abcdef/\u002B=",
            ] {
                assert!(guard.contains_secret(form.as_bytes()), "{form}");
            }
            let plain = format
                .prepare(&Secret::new("sk-proj-0123456789_abcdef".to_owned()))
                .unwrap();
            assert_eq!(plain.redactor().secret_count(), plain_searchers);
        }
    }
}
