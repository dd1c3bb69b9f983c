//! TLS on the proxy listener: the certificate and key from `[proxy]
//! tls_cert` / `tls_key`, reloaded without dropping connections.
//!
//! [`ServerTls`] keeps the current [`rustls::ServerConfig`] in an
//! [`ArcSwap`]: every handshake takes the config in force when it starts, so
//! a reload applies to new connections while open ones keep the session
//! they negotiated. A reload that fails (a missing file, a key that does
//! not match the certificate, a half-written file) keeps the old
//! certificate and logs an error; [`ServerTls::watch`] tries again whenever
//! the files change once more.
//!
//! ALPN offers `h2` and `http/1.1`; the listener serves whichever the
//! client speaks. Only rustls's `ring` provider is used.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Largest certificate or key file read (a chain of a few certificates is
/// a few KiB; this keeps a config naming `/dev/zero` from eating memory).
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// How often [`ServerTls::watch`] looks at the files, by default.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Where the listener's certificate chain and private key are (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `[proxy] tls_cert`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `[proxy] tls_key`: the leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("{path}: {reason}")]
    Cert {
        /// The file, as configured.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file is missing, unreadable, holds no key, or the key does
    /// not match the certificate.
    #[error("{path}: {reason}")]
    Key {
        /// The file, as configured.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl TlsError {
    /// The config key naming the file at fault: `proxy.tls_cert` or
    /// `proxy.tls_key`.
    pub fn config_key(&self) -> &'static str {
        match self {
            Self::Cert { .. } => "proxy.tls_cert",
            Self::Key { .. } => "proxy.tls_key",
        }
    }
}

/// Reads both files and builds the server config (ALPN `h2`, `http/1.1`).
pub fn load_server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.display().to_string(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: files.key.display().to_string(),
        reason,
    };
    let certs = read_certs(&files.cert).map_err(cert_error)?;
    let key = read_key(&files.key).map_err(key_error)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                key_error("the key does not match the certificate in tls_cert".into())
            }
            other => key_error(other.to_string()),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A regular file of at most [`MAX_PEM_FILE`] bytes, read whole.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err("larger than 1 MiB: not a PEM file".into());
    }
    Ok(bytes)
}

/// The certificates in a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_pem_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {}", pem_error(&e)))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in the file".into());
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_pem_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) in the file"
                .to_owned()
        }
        other => format!("not a PEM private key file: {}", pem_error(&other)),
    })
}

/// A PEM parse error in words: the parser's own text shows the lines it
/// quotes as lists of byte values.
fn pem_error(error: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "a section has no \"-----END {}-----\" line (the file is cut short?)",
            text(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed section start line {:?}", text(line))
        }
        other => other.to_string(),
    }
}

/// What the files looked like when they were last loaded (or tried).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64, u64)>,
    key: Option<(SystemTime, u64, u64)>,
}

impl Stamp {
    fn of(files: &TlsFiles) -> Self {
        let one = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        };
        Self {
            cert: one(&files.cert),
            key: one(&files.key),
        }
    }
}

/// The listener's TLS: the current config, swapped on reload.
pub struct ServerTls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    /// The files as last seen by a load, successful or not.
    seen: Mutex<Stamp>,
}

impl ServerTls {
    /// Loads the certificate and key; an error names the file at fault.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = Stamp::of(&files);
        let config = load_server_config(&files)?;
        Ok(Self {
            files,
            current: ArcSwap::from_pointee(config),
            seen: Mutex::new(seen),
        })
    }

    /// The files this reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the config in force now. A handshake started with
    /// it keeps that config, whatever is reloaded meanwhile.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reads the files again and, if they load, uses them for every new
    /// handshake. On error the old certificate stays in force; `why` (e.g.
    /// `"SIGHUP"`) is logged either way.
    pub fn reload(&self, why: &str) -> Result<(), TlsError> {
        let stamp = Stamp::of(&self.files);
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        match load_server_config(&self.files) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                tracing::info!(
                    cert = %self.files.cert.display(),
                    reason = why,
                    "reloaded the proxy's TLS certificate"
                );
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    reason = why,
                    "could not reload the proxy's TLS certificate; keeping the old one"
                );
                Err(error)
            }
        }
    }

    /// Reloads if either file changed (modification time, size or inode) since
    /// the last load or attempt. Returns whether it tried.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = Stamp::of(&self.files);
        {
            let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == stamp {
                return false;
            }
        }
        // The error is logged; the old certificate stays.
        let _ = self.reload("file changed");
        true
    }

    /// Checks the files every `every` and reloads when they change, until
    /// the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
