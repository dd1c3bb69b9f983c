//! A provider: where calls go (the upstream), how its real credential is
//! presented (the auth style), and the HTTP client that reaches it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use airlock_core::Secret;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::Uri;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::metrics::ProviderMetrics;

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
    /// `None` when no credential is configured yet: calls are then refused with 503.
    pub credential: Option<Secret>,
}

/// The HTTP client used to reach upstreams.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// A configured provider, ready for the request path.
pub struct Provider {
    name: String,
    scheme: Scheme,
    authority: Authority,
    /// Upstream path prefix without trailing slash (often empty).
    path_prefix: String,
    auth: AuthStyle,
    injected: Option<Injected>,
    client: UpstreamClient,
    pub(crate) metrics: ProviderMetrics,
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
    #[error("could not load the system's root certificates: {0}")]
    Roots(std::io::Error),
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
    /// Builds a provider and its client.
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
        let path_prefix = uri.path().trim_end_matches('/').to_owned();
        airlock_core::path::validate(if path_prefix.is_empty() {
            "/"
        } else {
            &path_prefix
        })
        .map_err(|_| bad_upstream())?;

        let injected = spec
            .credential
            .as_ref()
            .map(|credential| prepare_credential(&spec.auth, credential))
            .transpose()?;

        let client = build_client(scheme == Scheme::HTTPS, connect_timeout)?;
        Ok(Self {
            name: spec.name,
            scheme,
            authority,
            path_prefix,
            auth: spec.auth,
            injected,
            client,
            metrics,
        })
    }

    /// The provider's name (the first path segment agents use).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the provider authenticates.
    pub fn auth(&self) -> &AuthStyle {
        &self.auth
    }

    /// The upstream URI for `path` (already validated) and the query to send.
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
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// Whether a real credential is configured.
    pub fn has_credential(&self) -> bool {
        self.injected.is_some()
    }

    /// The header to insert, for header-based styles.
    pub(crate) fn credential_header(&self) -> Option<(&HeaderName, &HeaderValue)> {
        match &self.injected {
            Some(Injected::Header(name, value)) => Some((name, value)),
            _ => None,
        }
    }

    /// The `NAME=VALUE` query pair to append, for the query style.
    pub(crate) fn credential_query_pair(&self) -> Option<&str> {
        match &self.injected {
            Some(Injected::Query(pair)) => Some(pair.expose()),
            _ => None,
        }
    }

    /// The client that reaches this provider.
    pub(crate) fn client(&self) -> &UpstreamClient {
        &self.client
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

/// The credential in the form the request path inserts.
fn prepare_credential(auth: &AuthStyle, credential: &Secret) -> Result<Injected, ProviderError> {
    if credential.is_empty() {
        return Err(ProviderError::CredentialEmpty);
    }
    Ok(match auth {
        AuthStyle::Bearer => Injected::Header(
            http::header::AUTHORIZATION,
            sensitive_header(&format!("Bearer {}", credential.expose()))?,
        ),
        AuthStyle::Header(name) => {
            Injected::Header(name.clone(), sensitive_header(credential.expose())?)
        }
        AuthStyle::Query(name) => Injected::Query(Secret::new(format!(
            "{name}={}",
            utf8_percent_encode(credential.expose(), NON_ALPHANUMERIC)
        ))),
    })
}

fn sensitive_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut value =
        HeaderValue::from_str(value).map_err(|_| ProviderError::CredentialNotHeaderSafe)?;
    value.set_sensitive(true);
    Ok(value)
}

fn build_client(https: bool, connect_timeout: Duration) -> Result<UpstreamClient, ProviderError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = HttpsConnectorBuilder::new();
    let builder = if https {
        builder.with_native_roots().map_err(ProviderError::Roots)?
    } else {
        builder.with_tls_config(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    };
    let connector = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector))
}
