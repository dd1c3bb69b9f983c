#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair};

use super::*;

/// A self-signed certificate for `localhost` with CN `cn`: (cert PEM, key PEM).
fn self_signed(cn: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, (cert, key): &(String, String)) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    // Through a rename, as deployment tools do: readers never see half a file.
    for (path, text) in [(&files.cert, cert), (&files.key, key)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    files
}

/// The certificate `tls` presents in a handshake now, and the ALPN
/// protocol chosen, for a client trusting `trusted` (PEM) that offers `alpn`.
async fn handshake(tls: &ServerTls, trusted: &str, alpn: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trusted.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tls.acceptor();
    let server = tokio::spawn(async move { acceptor.accept(server_io).await.map(drop) });
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, client_io).await.unwrap();
    server.await.unwrap().unwrap();
    let (_, session) = stream.get_ref();
    let cert = session.peer_certificates().unwrap()[0].to_vec();
    (cert, session.alpn_protocol().map(<[u8]>::to_vec))
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn loads_a_pair_and_offers_h2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &self_signed("one"));
    let config = load_server_config(&files).unwrap();
    assert_eq!(
        config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
}

#[tokio::test]
async fn handshakes_negotiate_h2_or_http1() {
    let dir = tempfile::tempdir().unwrap();
    let pair = self_signed("one");
    let tls = ServerTls::load(write(dir.path(), &pair)).unwrap();
    let (cert, alpn) = handshake(&tls, &pair.0, &[b"h2", b"http/1.1"]).await;
    assert_eq!(cert, der(&pair.0));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (_, alpn) = handshake(&tls, &pair.0, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (_, alpn) = handshake(&tls, &pair.0, &[]).await;
    assert_eq!(alpn, None);
}

#[tokio::test]
async fn new_handshakes_see_a_reloaded_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let one = self_signed("one");
    let tls = ServerTls::load(write(dir.path(), &one)).unwrap();
    // An acceptor taken before the reload keeps the old certificate.
    let before = tls.acceptor();
    let two = self_signed("two");
    write(dir.path(), &two);
    tls.reload("SIGHUP").unwrap();
    let (cert, _) = handshake(&tls, &two.0, &[]).await;
    assert_eq!(cert, der(&two.0));
    assert!(!Arc::ptr_eq(before.config(), &tls.config()));
}

#[test]
fn a_missing_or_empty_file_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &self_signed("one"));

    let missing = TlsFiles {
        cert: dir.path().join("nope.pem"),
        key: files.key.clone(),
    };
    let err = load_server_config(&missing).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_cert");
    assert!(err.to_string().contains("nope.pem: cannot read"), "{err}");

    std::fs::write(dir.path().join("empty.pem"), "hello\n").unwrap();
    let empty_cert = TlsFiles {
        cert: dir.path().join("empty.pem"),
        key: files.key.clone(),
    };
    let err = load_server_config(&empty_cert).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_cert");
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    let empty_key = TlsFiles {
        cert: files.cert.clone(),
        key: dir.path().join("empty.pem"),
    };
    let err = load_server_config(&empty_key).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_key");
    assert!(err.to_string().contains("no PEM private key"), "{err}");

    // Not a regular file: refused without reading it.
    let device = TlsFiles {
        cert: "/dev/zero".into(),
        key: files.key.clone(),
    };
    let err = load_server_config(&device).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let dir_as_key = TlsFiles {
        cert: files.cert.clone(),
        key: dir.path().to_path_buf(),
    };
    let err = load_server_config(&dir_as_key).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_key");

    // A certificate given as the key is not a key.
    let swapped = TlsFiles {
        cert: files.cert.clone(),
        key: files.cert.clone(),
    };
    let err = load_server_config(&swapped).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_key");
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed("one");
    let (_, other_key) = self_signed("two");
    let files = write(dir.path(), &(cert, other_key));
    let err = load_server_config(&files).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_key");
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn reload_swaps_the_config_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &self_signed("one"));
    let tls = ServerTls::load(files.clone()).unwrap();
    let first = tls.config();

    // Nothing changed: nothing to do.
    assert!(!tls.reload_if_changed());
    assert!(Arc::ptr_eq(&first, &tls.config()));

    // A new pair is picked up.
    write(dir.path(), &self_signed("two"));
    assert!(tls.reload_if_changed());
    let second = tls.config();
    assert!(!Arc::ptr_eq(&first, &second));

    // A broken key keeps the config in force, and is tried once only.
    std::fs::write(&files.key, "garbage").unwrap();
    assert!(tls.reload_if_changed());
    assert!(Arc::ptr_eq(&second, &tls.config()));
    assert!(!tls.reload_if_changed());
    assert!(tls.reload("SIGHUP").is_err());
    assert!(Arc::ptr_eq(&second, &tls.config()));

    // Fixed again: a reload applies.
    write(dir.path(), &self_signed("three"));
    tls.reload("SIGHUP").unwrap();
    assert!(!Arc::ptr_eq(&second, &tls.config()));
}

#[test]
fn a_missing_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let err = ServerTls::load(files).unwrap_err();
    assert_eq!(err.config_key(), "proxy.tls_cert");
}

#[test]
fn a_file_cut_short_is_named_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed("one");
    let files = write(dir.path(), &(cert[..200].to_owned(), key.clone()));
    let err = load_server_config(&files).unwrap_err().to_string();
    assert!(
        err.contains(
            "not a PEM certificate file: a section has no \"-----END CERTIFICATE-----\" line"
        ),
        "{err}"
    );
    let files = write(dir.path(), &(cert, key[..100].to_owned()));
    let err = load_server_config(&files).unwrap_err().to_string();
    assert!(
        err.contains("not a PEM private key file: a section has no \"-----END PRIVATE KEY-----\""),
        "{err}"
    );
}
