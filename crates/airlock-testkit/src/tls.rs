//! TLS for tests: a throwaway certificate authority ([`TestCa`]) issuing
//! leaf certificates, a recording mock provider served over TLS
//! ([`TlsMockProvider`], the same routes as [`MockProvider`]), a
//! TLS-terminating front for a plain listener ([`TlsFront`]), and HTTPS
//! clients that trust the test CA.
//!
//! Everything uses rustls's `ring` provider.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::client::Reply;
use crate::MockProvider;

/// How long any one call of these helpers may take.
const LIMIT: Duration = Duration::from_secs(30);

/// The ring crypto provider, named explicitly so nothing depends on a
/// process-wide default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made up for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A leaf certificate and its key, issued by a [`TestCa`].
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl TestCa {
    /// A new CA whose certificate has common name `name`.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("test CA: key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("test CA: certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    /// The CA certificate, PEM (what a client or `ca_file` trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) {
        std::fs::write(path, &self.cert_pem).expect("test CA: write certificate");
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1` with
    /// common name `common_name` (and a fresh key, so a fresh serial).
    pub fn leaf(&self, common_name: &str) -> Leaf {
        let key = KeyPair::generate().expect("test leaf: key");
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .expect("test leaf: names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("test leaf: certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl Leaf {
    /// The certificate, DER (what a TLS peer presents).
    pub fn cert_der(&self) -> Vec<u8> {
        pem_cert_der(&self.cert_pem)
    }

    /// Writes the certificate and key to `cert` and `key`, each through a
    /// rename so a reader never sees half a file.
    pub fn write(&self, cert: &Path, key: &Path) {
        for (path, text) in [(cert, &self.cert_pem), (key, &self.key_pem)] {
            let tmp = path.with_extension("tmp-write");
            std::fs::write(&tmp, text).expect("test leaf: write");
            std::fs::rename(&tmp, path).expect("test leaf: rename");
        }
    }

    /// A rustls server config for this leaf offering ALPN `h2` and
    /// `http/1.1`.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let certs = vec![CertificateDer::from(self.cert_der())];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("test leaf: key");
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("rustls: protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("rustls: server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

/// A TLS-terminating proxy on `127.0.0.1:<random port>` in front of a
/// plain TCP listener (as a load balancer in front of airlock's admin
/// API): each connection's bytes are relayed both ways once its handshake
/// is done. Stops when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Starts relaying to `backend` with `leaf` as the server certificate
    /// (ALPN `http/1.1` only: the bytes are not looked at).
    pub async fn start(leaf: &Leaf, backend: SocketAddr) -> TlsFront {
        let mut config = leaf.server_config();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("front: bind");
        let addr = listener.local_addr().expect("front: address");
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        TlsFront { addr, task }
    }

    /// `https://127.0.0.1:PORT` (the leaf names `127.0.0.1`).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The DER of the first certificate in `pem`.
fn pem_cert_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

/// A recording mock provider served over TLS on `127.0.0.1:<random port>`
/// with ALPN `h2` and `http/1.1`: the routes and recording of
/// [`MockProvider`] (reachable through `Deref`), plus the HTTP version of
/// every request.
pub struct TlsMockProvider {
    mock: MockProvider,
    versions: Arc<Mutex<Vec<Version>>>,
}

impl TlsMockProvider {
    /// Starts serving with `leaf` as the server certificate.
    pub async fn start(leaf: &Leaf) -> TlsMockProvider {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(leaf.server_config()));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&versions);
        let mock = MockProvider::start_with(move |listener, shared| {
            tokio::spawn(serve_tls(listener, acceptor, shared, seen))
        })
        .await;
        TlsMockProvider { mock, versions }
    }

    /// Base URL, `https://127.0.0.1:PORT` (the leaf names `127.0.0.1`).
    pub fn url(&self) -> String {
        format!("https://{}", self.mock.addr())
    }

    /// The HTTP version of every request so far, in arrival order.
    pub fn versions(&self) -> Vec<Version> {
        self.versions.lock().clone()
    }
}

impl Deref for TlsMockProvider {
    type Target = MockProvider;

    fn deref(&self) -> &MockProvider {
        &self.mock
    }
}

impl std::fmt::Debug for TlsMockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMockProvider")
            .field("mock", &self.mock)
            .field("versions", &self.versions())
            .finish()
    }
}

/// The TLS mock's accept loop: handshakes, then HTTP/1.1 or HTTP/2 as the
/// client speaks. Aborting the task aborts every connection.
async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<crate::mock::Shared>,
    versions: Arc<Mutex<Vec<Version>>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                shared.count_connection();
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let shared = Arc::clone(&shared);
                let versions = Arc::clone(&versions);
                connections.spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let recording = Arc::clone(&shared);
                        let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                            versions.lock().push(req.version());
                            // HTTP/2 requests carry scheme and authority in
                            // their URI; the mock records and routes the
                            // origin form, as HTTP/1.1 sends it.
                            if let Some(origin) = req.uri().path_and_query().cloned() {
                                *req.uri_mut() = origin.into();
                            }
                            crate::mock::handle(Arc::clone(&recording), req)
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                    shared.count_ended();
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The HTTP versions a client offers (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// `http/1.1` only.
    Http1,
    /// `h2` only.
    Http2,
    /// `h2` and `http/1.1`.
    Both,
}

/// A rustls client config trusting only `ca_pem`.
pub fn client_config(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("PEM certificate"))
            .expect("trusted certificate");
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("rustls: protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Sends one request over HTTPS, trusting only `ca_pem` and offering
/// `offer`, and reads the whole answer; also returns the response's HTTP
/// version. Panics when the call fails (e.g. the handshake).
pub async fn https_request(
    ca_pem: &str,
    offer: Offer,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (Reply, Version) {
    try_https_request(ca_pem, offer, method, url, headers, body)
        .await
        .expect("HTTPS request failed")
}

/// Like [`https_request`], but a failure (refused connection, handshake,
/// timeout) is an error instead of a panic.
pub async fn try_https_request(
    ca_pem: &str,
    offer: Offer,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> anyhow::Result<(Reply, Version)> {
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca_pem))
        .https_only();
    let connector = match offer {
        Offer::Http1 => builder.enable_http1().build(),
        Offer::Http2 => builder.enable_http2().build(),
        Offer::Both => builder.enable_http1().enable_http2().build(),
    };
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let mut request = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes())?)
        .uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into()))?;
    let call = async {
        let response = client.request(request).await?;
        let version = response.version();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((
            Reply {
                status,
                headers,
                body,
            },
            version,
        ))
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .map_err(|_| anyhow::anyhow!("{method} {url}: no answer within {LIMIT:?}"))?
}

/// The `host:port` of an `https://` URL (no path).
fn authority(url: &str) -> String {
    url.trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The server name to check a certificate against: the URL's host.
fn server_name(url: &str) -> ServerName<'static> {
    let authority = authority(url);
    let host = match authority.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => authority.as_str(),
    };
    ServerName::try_from(host.to_owned()).expect("server name")
}

/// One HTTP/1.1 connection over TLS, kept open across requests.
pub struct TlsConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    peer: SocketAddr,
    certificate: Vec<u8>,
    host: String,
}

impl TlsConnection {
    /// Connects to `url`'s host and port and completes a handshake,
    /// trusting only `ca_pem` (ALPN `http/1.1`).
    pub async fn open(url: &str, ca_pem: &str) -> anyhow::Result<TlsConnection> {
        let host = authority(url);
        let mut config = client_config(ca_pem);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connect = async {
            let tcp = TcpStream::connect(&host).await?;
            let peer = tcp.peer_addr()?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name(url), tcp)
                .await?;
            let certificate = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.to_vec())
                .ok_or_else(|| anyhow::anyhow!("no peer certificate"))?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(connection);
            anyhow::Ok(TlsConnection {
                sender,
                peer,
                certificate,
                host: host.clone(),
            })
        };
        tokio::time::timeout(LIMIT, connect)
            .await
            .map_err(|_| anyhow::anyhow!("TLS connect to {host}: no answer within {LIMIT:?}"))?
    }

    /// The leaf certificate (DER) the server presented in this handshake.
    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends one request (`path` is origin-form) on this connection and
    /// reads the whole answer.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut request = http::Request::builder()
            .method(http::Method::from_bytes(method.as_bytes())?)
            .uri(path)
            .header(http::header::HOST, &self.host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::new()))?;
        let call = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(LIMIT, call)
            .await
            .map_err(|_| anyhow::anyhow!("{method} {path}: no answer within {LIMIT:?}"))?
    }
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
