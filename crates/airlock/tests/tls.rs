//! TLS and HTTP/2 end to end: airlock's listener with a generated
//! certificate (`[proxy] tls_cert` / `tls_key`), a TLS mock provider
//! trusted through `ca_file`, ALPN on both sides, h2c on plain TCP, and
//! certificate reloads that leave open connections alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use airlock_testkit::client::{raw, raw_status};
use airlock_testkit::tls::{
    https_request, try_https_request, Leaf, Offer, TestCa, TlsConnection, TlsMockProvider,
};
use airlock_testkit::{Airlock, AirlockBuilder, MockProvider};
use bytes::Bytes;
use http::Version;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::time::Instant;

const KEY: &str = "sk-real-tls-0123456789";
const KEY_ENV: &str = "AIRLOCK_TEST_TLS_KEY";
/// How long a poll waits for what it expects.
const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// A `[providers.NAME]` table whose credential is `env:KEY_ENV`, with an
/// optional `ca_file`.
fn provider_table(name: &str, upstream: &str, ca_file: Option<&Path>) -> String {
    let mut table = format!(
        "[providers.{name}]\nupstream = \"{upstream}\"\nauth = \"bearer\"\n\
         credential = \"env:{KEY_ENV}\"\nenv_key = \"{upper}_API_KEY\"\n\
         env_base_url = \"{upper}_BASE_URL\"\nbase_path = \"\"\n",
        upper = name.to_ascii_uppercase(),
    );
    if let Some(path) = ca_file {
        table.push_str(&format!("ca_file = \"{}\"\n", path.display()));
    }
    table.push('\n');
    table
}

/// The listener's certificate files in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(leaf: &Leaf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("airlock.crt");
        let key = dir.path().join("airlock.key");
        leaf.write(&cert, &key);
        Files { dir, cert, key }
    }

    fn builder(&self) -> AirlockBuilder {
        AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
            .proxy_option(&format!("tls_cert = \"{}\"", self.cert.display()))
            .proxy_option(&format!("tls_key = \"{}\"", self.key.display()))
            .env(KEY_ENV, KEY)
    }
}

/// A session allowed everything on `providers`; returns its token.
async fn token(airlock: &Airlock, providers: &[&str]) -> String {
    let scope: Vec<_> = providers
        .iter()
        .map(|p| json!({"provider": p, "methods": ["GET", "POST"], "paths": ["/**"]}))
        .collect();
    let session = airlock
        .create_session(json!({"scope": scope, "ttl_seconds": 300}))
        .await
        .unwrap();
    session["token"].as_str().unwrap().to_owned()
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Polls new handshakes until the listener presents `want` (DER).
async fn wait_for_certificate(url: &str, ca: &TestCa, want: &[u8], what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = TlsConnection::open(url, ca.cert_pem()).await.unwrap();
        if seen.certificate() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new handshakes still see the old certificate {DEADLINE:?} after {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn https_listener_and_tls_upstream_with_ca_file() {
    let ca = TestCa::new("airlock test CA");
    let mock = TlsMockProvider::start(&ca.leaf("mock provider")).await;
    let files = Files::new(&ca.leaf("airlock.internal"));
    let ca_file = files.dir.path().join("ca.pem");
    ca.write_cert(&ca_file);

    let airlock = files
        .builder()
        // One worker: every call below shares one connection pool.
        .proxy_option("workers = 1")
        .config(&provider_table("secure", &mock.url(), Some(&ca_file)))
        .config(&provider_table("untrusted", &mock.url(), None))
        .start()
        .await
        .unwrap();
    let url = airlock.proxy_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let token = token(&airlock, &["secure", "untrusted"]).await;
    let auth = format!("Bearer {token}");
    let chat = r#"{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}"#;

    // HTTP/2 to airlock through ALPN; the session base URL is https too.
    let (reply, version) = https_request(
        ca.cert_pem(),
        Offer::Both,
        "POST",
        &format!("{url}/secure/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        chat,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Hello from mock"
    );

    // The real credential reached the provider, over TLS and HTTP/2.
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization").unwrap(),
        format!("Bearer {KEY}")
    );
    assert!(!seen[0].contains(&token));
    assert_eq!(mock.versions(), vec![Version::HTTP_2]);
    // Over HTTP/2 the upstream is named by `:authority` alone: some front
    // ends (Google's) reset a stream that also carries `Host`.
    assert_eq!(seen[0].header("host"), None);

    // HTTP/1.1 to airlock works too, and so does h2 alone.
    for (offer, want) in [
        (Offer::Http1, Version::HTTP_11),
        (Offer::Http2, Version::HTTP_2),
    ] {
        let (reply, version) = https_request(
            ca.cert_pem(),
            offer,
            "GET",
            &format!("{url}/secure/v1/models"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(reply.status, 200, "{offer:?}: {}", reply.text());
        assert_eq!(version, want, "{offer:?}");
    }
    assert_eq!(mock.request_count(), 3);
    // The three calls shared one HTTP/2 connection to the provider.
    assert_eq!(mock.connections(), 1);

    // Without ca_file the provider's certificate is not trusted: 502, and
    // the provider sees nothing (the handshake fails before any request).
    let (reply, _) = https_request(
        ca.cert_pem(),
        Offer::Both,
        "GET",
        &format!("{url}/untrusted/v1/models"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(mock.request_count(), 3);

    // Plaintext HTTP on the TLS port gets no HTTP answer.
    let answer = raw(
        &url.replace("https://", "http://"),
        b"GET /secure/v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(!answer.starts_with("HTTP/"), "{answer}");
    assert_eq!(mock.request_count(), 3);

    // The admin API hands agents an https base URL.
    let session = airlock
        .create_session(json!({
            "scope": [{"provider": "secure", "methods": ["GET"], "paths": ["/**"]}],
            "ttl_seconds": 60,
        }))
        .await
        .unwrap();
    assert_eq!(session["env"]["SECURE_BASE_URL"], format!("{url}/secure"));
}

/// Trailers after a chunked body are header fields no check has seen: a
/// token, an override. hyper's HTTP/2 client would send them on; airlock
/// drops them and forwards the body alone.
#[tokio::test]
async fn request_trailers_never_reach_an_http2_provider() {
    let ca = TestCa::new("airlock test CA");
    let mock = TlsMockProvider::start(&ca.leaf("mock provider")).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    ca.write_cert(&ca_file);
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .env(KEY_ENV, KEY)
        .config(&provider_table("secure", &mock.url(), Some(&ca_file)))
        .start()
        .await
        .unwrap();
    let token = token(&airlock, &["secure"]).await;
    let body = r#"{"model":"gpt-mock","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /secure/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\nx-api-key: {token}\r\n\
         x-http-method-override: DELETE\r\n\r\n",
        body.len()
    );
    let answer = raw(&airlock.proxy_url(), request.as_bytes()).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");

    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(mock.versions(), vec![Version::HTTP_2]);
    assert_eq!(&seen[0].body[..], body.as_bytes());
    assert_eq!(seen[0].trailers, Vec::new());
    assert!(!seen[0].contains(&token));
}

#[tokio::test]
async fn http2_with_prior_knowledge_on_plain_tcp() {
    let mock = MockProvider::start().await;
    let airlock = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("mock", &mock.url(), "bearer", KEY, "")
        .start()
        .await
        .unwrap();
    let token = token(&airlock, &["mock"]).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for path in ["/v1/models", "/sse?events=3"] {
        let request = http::Request::get(format!("{}/mock{path}", airlock.proxy_url()))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(DEADLINE, client.request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        if path.starts_with("/sse") {
            assert!(body.contains(r#"data: {"n":2}"#), "{body}");
        } else {
            assert!(body.contains("gpt-mock"), "{body}");
        }
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.header("authorization").as_deref() == Some(&format!("Bearer {KEY}"))));
}

/// A client speaking TLS to the plain port, or plain HTTP to the TLS port,
/// gets nothing it can use; the log tells the operator which mix-up it
/// was, once a minute at most, and the listener goes on serving.
#[tokio::test]
async fn a_client_speaking_the_wrong_protocol_is_named_in_the_log() {
    const TLS_ON_PLAIN: &str = "a client opened a TLS handshake on the plain-HTTP proxy listener";
    const PLAIN_ON_TLS: &str = "a client spoke plain HTTP (or something else than TLS)";
    let ca = TestCa::new("airlock test CA");
    let mock = MockProvider::start().await;

    let plain = AirlockBuilder::new(env!("CARGO_BIN_EXE_airlock"))
        .provider("mock", &mock.url(), "bearer", KEY, "")
        .start()
        .await
        .unwrap();
    let https_url = plain.proxy_url().replace("http://", "https://");
    for _ in 0..2 {
        let tried = try_https_request(
            ca.cert_pem(),
            Offer::Both,
            "GET",
            &format!("{https_url}/mock/v1/models"),
            &[],
            Bytes::new(),
        )
        .await;
        assert!(
            tried.is_err(),
            "a TLS client got an answer from the plain port"
        );
    }
    plain.wait_for_output(TLS_ON_PLAIN, 0).await;
    let token = token(&plain, &["mock"]).await;
    let answer = raw(
        &plain.proxy_url(),
        format!(
            "GET /mock/v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let output = plain.output();
    assert_eq!(output.matches(TLS_ON_PLAIN).count(), 1, "{output}");
    assert!(!output.contains(PLAIN_ON_TLS), "{output}");
    let line = output.lines().find(|l| l.contains(TLS_ON_PLAIN)).unwrap();
    assert!(
        line.contains("WARN") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );

    let files = Files::new(&ca.leaf("airlock.internal"));
    let tls = files
        .builder()
        .provider("mock", &mock.url(), "bearer", KEY, "")
        .start()
        .await
        .unwrap();
    let plain_url = tls.proxy_url().replace("https://", "http://");
    let answer = raw(
        &plain_url,
        b"GET /mock/v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 0, "{answer}");
    tls.wait_for_output(PLAIN_ON_TLS, 0).await;
    assert!(!tls.output().contains(TLS_ON_PLAIN), "{}", tls.output());
    // Only the plain call on the plain port reached the provider.
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn certificate_reloads_keep_open_connections() {
    let ca = TestCa::new("airlock reload CA");
    let mock = MockProvider::start().await;
    let first = ca.leaf("airlock-first");
    let files = Files::new(&first);
    let airlock = files
        .builder()
        .provider("mock", &mock.url(), "bearer", KEY, "")
        .start()
        .await
        .unwrap();
    let url = airlock.proxy_url();
    let token = token(&airlock, &["mock"]).await;
    let auth = format!("Bearer {token}");

    let mut open = TlsConnection::open(&url, ca.cert_pem()).await.unwrap();
    assert_eq!(open.certificate(), first.cert_der());
    let reply = open
        .request("GET", "/mock/v1/models", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    // SIGHUP: new handshakes get the new certificate...
    let second = ca.leaf("airlock-second");
    second.write(&files.cert, &files.key);
    send_signal(airlock.pid(), "HUP");
    wait_for_certificate(&url, &ca, &second.cert_der(), "SIGHUP").await;
    airlock.wait_for_output("SIGHUP", 0).await;
    // ...while the connection opened before goes on with the old one.
    let reply = open
        .request("GET", "/mock/v1/models", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A change of the files alone is picked up too.
    let third = ca.leaf("airlock-third");
    third.write(&files.cert, &files.key);
    wait_for_certificate(&url, &ca, &third.cert_der(), "the files changed").await;

    // A broken key is refused (logged) and the last good pair stays.
    let refused = airlock.output().matches("keeping the old one").count();
    std::fs::write(&files.key, "not a key\n").unwrap();
    send_signal(airlock.pid(), "HUP");
    airlock
        .wait_for_output("keeping the old one", refused)
        .await;
    let again = TlsConnection::open(&url, ca.cert_pem()).await.unwrap();
    assert_eq!(again.certificate(), third.cert_der());
    let reply = open
        .request("GET", "/mock/v1/models", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(mock.request_count(), 3);
}

/// `airlock config check` on a config holding `proxy`: exit code and stderr.
fn config_check(dir: &Path, proxy: &str) -> (Option<i32>, String, String) {
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy}\n[store]\nurl = \"sqlite://{}/a.db\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_settings_are_checked_at_start() {
    let ca = TestCa::new("config CA");
    let files = Files::new(&ca.leaf("airlock"));
    let dir = files.dir.path();
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();

    let (code, stdout, stderr) = config_check(
        dir,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("https://127.0.0.1:0"), "{stdout}");

    let (code, _, stderr) = config_check(dir, &format!("tls_cert = \"{cert}\"\n"));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("airlock.toml: proxy.tls_key: missing"),
        "{stderr}"
    );

    let (code, _, stderr) = config_check(
        dir,
        &format!(
            "tls_cert = \"{cert}\"\ntls_key = \"{}/nope.key\"\n",
            dir.display()
        ),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("proxy.tls_key: "), "{stderr}");
    assert!(stderr.contains("nope.key: cannot read"), "{stderr}");

    // A key that belongs to another certificate.
    let other = ca.leaf("other");
    let other_key = dir.join("other.key");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let (code, _, stderr) = config_check(
        dir,
        &format!(
            "tls_cert = \"{cert}\"\ntls_key = \"{}\"\n",
            other_key.display()
        ),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("proxy.tls_key: "), "{stderr}");
    assert!(stderr.contains("does not match"), "{stderr}");

    // `serve` refuses the same way, before binding anything.
    std::fs::write(&files.cert, "garbage\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--config"])
        .arg(dir.join("airlock.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("proxy.tls_cert: "), "{stderr}");
}
