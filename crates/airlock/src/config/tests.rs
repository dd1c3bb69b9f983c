use super::*;

#[test]
fn no_file_means_builtin_providers() {
    let c = Config::parse("x.toml", "").unwrap();
    assert_eq!(c.providers.len(), 2);
    let openai = &c.providers["openai"];
    assert_eq!(openai.upstream, "https://api.openai.com");
    assert_eq!(openai.auth, AuthStyle::Bearer);
    assert_eq!(openai.base_path, "/v1");
    assert_eq!(
        openai.credential,
        CredentialSource::Env("OPENAI_API_KEY".into())
    );
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.store_url, "sqlite://airlock.db");
    assert_eq!(c.max_ttl, Duration::from_secs(86_400));
}

#[test]
fn the_spec_example_parses() {
    let text = r#"
[proxy]
listen = "127.0.0.1:8080"
public_url = "http://127.0.0.1:8080/"

[admin]
listen = "127.0.0.1:8081"

[store]
url = "sqlite://airlock.db"

[audit]
fail_closed = true

[providers.openai]
upstream = "https://api.openai.com"
auth = "bearer"
credential = "env:OPENAI_API_KEY"
env_key = "OPENAI_API_KEY"
env_base_url = "OPENAI_BASE_URL"
base_path = "/v1"

[providers.google]
upstream = "https://generativelanguage.googleapis.com"
auth = "query:key"
credential = "file:/run/secrets/google"
env_key = "GOOGLE_API_KEY"
env_base_url = "GOOGLE_BASE_URL"
"#;
    let c = Config::parse("airlock.toml", text).unwrap();
    assert_eq!(c.proxy.public_url.as_deref(), Some("http://127.0.0.1:8080"));
    assert_eq!(c.proxy.public_path(), None);
    for (url, path) in [
        ("https://h/gw/", Some("/gw")),
        ("http://h:1/a/b", Some("/a/b")),
    ] {
        let c = Config::parse("x.toml", &format!("[proxy]\npublic_url = \"{url}\"")).unwrap();
        assert_eq!(c.proxy.public_path(), path, "{url}");
    }
    assert_eq!(c.providers.len(), 2);
    assert_eq!(c.providers["google"].auth, AuthStyle::Query("key".into()));
    assert_eq!(
        c.providers["google"].credential,
        CredentialSource::File("/run/secrets/google".into())
    );
    assert_eq!(
        c.providers["openai"].keepalive_timeout,
        DEFAULT_KEEPALIVE_TIMEOUT
    );
}

#[test]
fn a_providers_keepalive_timeout_parses() {
    let text = "[providers.local]\nupstream = \"http://127.0.0.1:8000\"\ncredential = \"env:X\"\n\
                env_key = \"X\"\nenv_base_url = \"XB\"\nkeepalive_timeout = \"4s\"\n";
    let c = Config::parse("airlock.toml", text).unwrap();
    assert_eq!(
        c.providers["local"].keepalive_timeout,
        Duration::from_secs(4)
    );
    let builtin = Config::parse("airlock.toml", "").unwrap();
    for provider in builtin.providers.values() {
        assert_eq!(provider.keepalive_timeout, Duration::from_secs(90));
        assert_eq!(provider.keepalive_timeout, DEFAULT_KEEPALIVE_TIMEOUT);
    }
}

fn error_of(text: &str) -> String {
    Config::parse("bad.toml", text).unwrap_err().to_string()
}

#[test]
fn bad_configs_name_file_key_and_reason() {
    let cases = [
        (
            "[proxy]\nlisten = \"nope\"",
            "bad.toml: proxy.listen: \"nope\": must be an IP address and port such as 127.0.0.1:8080",
        ),
        ("[proxy]\nlistn = \"x\"", "bad.toml: proxy.listn (line 2): unknown field `listn`"),
        ("[sessions]\nmax_ttl = \"forever\"", "bad.toml: sessions.max_ttl: invalid duration"),
        ("[store]\nurl = \"mysql://x\"", "bad.toml: store.url:"),
        (
            "[providers.x]\nupstream = \"https://x\"\nauth = \"basic\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.auth: auth must be",
        ),
        (
            "[providers.x]\nupstream = \"ftp://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream:",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.credential:",
        ),
        (
            "[providers.X]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.X: provider name",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"1X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.env_key:",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"\nkeepalive_timeout = \"500ms\"",
            "bad.toml: providers.x.keepalive_timeout: must be at least 1s",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"\nkeepalive_timeout = \"soon\"",
            "bad.toml: providers.x.keepalive_timeout: invalid duration",
        ),
        ("[proxy\n", "bad.toml: line 1:"),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"",
            "bad.toml: providers.x.env_base_url (line 1): missing: a provider other than the \
             built-in anthropic and openai must set env_base_url (the variable agents read \
             airlock's base URL from, e.g. \"X_BASE_URL\")",
        ),
        ("[proxy]\nlisten = 8080", "bad.toml: proxy.listen (line 2): invalid type"),
        (
            "[providers.openai]\nupstream = \"http://x\"\nauth = 5",
            "bad.toml: providers.openai.auth (line 3): invalid type",
        ),
        (
            "[providers.openai]\nupstrem = \"http://x\"",
            "bad.toml: providers.openai.upstrem (line 2): unknown field `upstrem`",
        ),
        (
            "[proxy]\nlisten = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"",
            "bad.toml: admin.listen: 127.0.0.1:9000 overlaps proxy.listen",
        ),
        (
            "[proxy]\nlisten = \"0.0.0.0:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"",
            "bad.toml: admin.listen: 127.0.0.1:9000 overlaps proxy.listen",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"K\"\nenv_base_url = \"B\"\n\
             [providers.y]\nupstream = \"https://y\"\ncredential = \"env:Y\"\nenv_key = \"L\"\nenv_base_url = \"B\"",
            "bad.toml: providers.y.env_base_url: B is already providers.x.env_base_url",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"K\"\nenv_base_url = \"XB\"\n\
             [providers.y]\nupstream = \"https://y\"\ncredential = \"env:Y\"\nenv_key = \"XB\"\nenv_base_url = \"YB\"",
            "bad.toml: providers.y.env_key: XB is already providers.x.env_base_url",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"\n\
             [providers.x.headers]\naccept-encoding = \"gzip\"",
            "bad.toml: providers.x.headers.accept-encoding: airlock sets this header itself",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"X\"",
            "bad.toml: providers.x.env_base_url: X is already providers.x.env_key",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\nauth = \"header:host\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.auth: \"header:host\": airlock sets this header itself",
        ),
        (
            "[providers.x]\nupstream = \"https://u:secret@x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream: must not hold a user or password",
        ),
        (
            "[providers.x]\nupstream = \"https://x/v1?a=1\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream: \"https://x/v1?a=1\" must not have a query string",
        ),
        (
            "[providers.x]\nupstream = \"https://x/v1?\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream: \"https://x/v1?\" must not have a query string",
        ),
        (
            "[providers.x]\nupstream = \"https://x/v1#frag\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream: \"https://x/v1#frag\" must not have a fragment (#...)",
        ),
        (
            "[providers.x]\nupstream = \"HTTPS://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.upstream: \"HTTPS://x\" is not an http(s) URL",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"PATH\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.env_key: PATH is read by the system or the shell",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"X\"\nenv_base_url = \"LD_PRELOAD\"",
            "bad.toml: providers.x.env_base_url: LD_PRELOAD is read by the dynamic loader",
        ),
        (
            "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"AIRLOCK_SESSION_ID\"\nenv_base_url = \"XB\"",
            "bad.toml: providers.x.env_key: AIRLOCK_SESSION_ID is reserved for airlock's own",
        ),
        (
            "[proxy]\npublic_url = \"http://h/a?b=x\"",
            "bad.toml: proxy.public_url: \"http://h/a?b=x\" must not have a query string: agents' \
             base URLs are built by appending /PROVIDER/... to it",
        ),
        (
            "[proxy]\npublic_url = \"http://h/?\"",
            "bad.toml: proxy.public_url: \"http://h/?\" must not have a query string",
        ),
        (
            "[proxy]\npublic_url = \"http://h/#f\"",
            "bad.toml: proxy.public_url: \"http://h/#f\" must not have a fragment (#...)",
        ),
        (
            "[proxy]\npublic_url = \"https://h:8443/x#\"",
            "bad.toml: proxy.public_url: \"https://h:8443/x#\" must not have a fragment (#...)",
        ),
        (
            "[proxy]\npublic_url = \"http://h/openai/gw\"",
            "bad.toml: proxy.public_url: its path starts with /openai, a provider's name",
        ),
        (
            "[proxy]\npublic_url = \"http://h/a/../gw\"",
            "bad.toml: proxy.public_url: its path \"/a/../gw\" is not one airlock accepts in a call",
        ),
        (
            "[proxy]\npublic_url = \"http://h/gw%2Fx\"",
            "bad.toml: proxy.public_url: its path \"/gw%2Fx\" is not one airlock accepts in a call: path contains an encoded '/'",
        ),
        (
            "[proxy]\npublic_url = \"http://user:pw@h\"",
            "bad.toml: proxy.public_url: must not hold a user or password: it is handed to every \
             agent in its base URL",
        ),
        ("[proxy]\nupstream_timeout = \"0s\"", "bad.toml: proxy.upstream_timeout: must be at least 1ms"),
        ("[proxy]\nconnect_timeout = \"0ms\"", "bad.toml: proxy.connect_timeout: must be at least 1ms"),
        (
            "[proxy]\nheader_read_timeout = \"0s\"",
            "bad.toml: proxy.header_read_timeout: must be at least 1ms",
        ),
    ];
    for (text, want) in cases {
        let got = error_of(text);
        assert!(got.starts_with(want), "{text:?}\n got: {got}\nwant: {want}");
    }
}

/// `public_url` may have a path (airlock behind a front proxy's prefix);
/// a refused user and password are not said back.
#[test]
fn a_public_url_may_have_a_path_but_no_credentials_shown() {
    let c = Config::parse(
        "x.toml",
        "[proxy]\npublic_url = \"https://h:8443/airlock/\"",
    )
    .unwrap();
    assert_eq!(
        c.proxy.public_url.as_deref(),
        Some("https://h:8443/airlock")
    );
    let refused = error_of("[proxy]\npublic_url = \"http://user:s3cret@h/?q=1\"");
    assert!(!refused.contains("s3cret"), "{refused}");
}

/// A public URL whose host `allowed_hosts` lists, bare or with its port,
/// and an https one in front of a plain-HTTP proxy (TLS ended before it),
/// draw no warning; the wildcard address, an http one in front of TLS, or
/// a host the list lacks do (valid still: a proxy in front may make the
/// last two right).
#[test]
fn a_public_url_agents_may_not_reach_is_warned_about() {
    for (url, hosts) in [
        ("http://airlock.internal:8080", r#"["airlock.internal"]"#),
        (
            "http://airlock.internal:8080",
            r#"["airlock.internal:8080"]"#,
        ),
        ("https://AIRLOCK.example.com", r#"["airlock.example.com"]"#),
        ("https://airlock.example.com", "[]"),
    ] {
        let text = format!("[proxy]\npublic_url = \"{url}\"\nallowed_hosts = {hosts}");
        let config = Config::parse("ok.toml", &text).unwrap();
        assert!(
            config.warnings().is_empty(),
            "{text}: {:?}",
            config.warnings()
        );
    }
    for (text, warning) in [
        (
            "public_url = \"http://0.0.0.0:8080\"",
            "names the wildcard address",
        ),
        (
            "public_url = \"http://[::]:8080\"",
            "names the wildcard address",
        ),
        (
            "public_url = \"http://airlock.internal:8080\"\nallowed_hosts = [\"other.example\"]",
            "names airlock.internal:8080, which proxy.allowed_hosts does not list",
        ),
        (
            "public_url = \"http://airlock:8080\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
            "is http://, but the proxy serves HTTPS",
        ),
    ] {
        let config = Config::parse("ok.toml", &format!("[proxy]\n{text}")).unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{text}: {warnings:?}");
        assert!(
            warnings[0].starts_with("proxy.public_url: ") && warnings[0].contains(warning),
            "{text}: {warnings:?}"
        );
    }
}

/// Two providers may hand agents the same key variable: it holds the
/// session's one token for both.
#[test]
fn providers_may_share_an_env_key() {
    let text = "[providers.x]\nupstream = \"https://x\"\ncredential = \"env:X\"\nenv_key = \"K\"\nenv_base_url = \"XB\"\n\
                [providers.y]\nupstream = \"https://y\"\ncredential = \"env:Y\"\nenv_key = \"K\"\nenv_base_url = \"YB\"";
    let config = Config::parse("ok.toml", text).unwrap();
    assert_eq!(config.providers["y"].env_key, "K");
}

#[test]
fn postgres_stores_and_max_staleness() {
    let c = Config::parse("x.toml", "").unwrap();
    assert_eq!(c.store_max_staleness, Duration::from_secs(5));
    for url in [
        "postgres://airlock@db.internal/airlock",
        "postgresql://u:p@127.0.0.1:5432/airlock?sslmode=require",
    ] {
        let text = format!("[store]\nurl = \"{url}\"\nmax_staleness = \"2s\"");
        let c = Config::parse("x.toml", &text).unwrap();
        assert_eq!(c.store_url, url);
        assert_eq!(c.store_max_staleness, Duration::from_secs(2));
    }
    assert!(error_of("[store]\nmax_staleness = \"soon\"")
        .starts_with("bad.toml: store.max_staleness: invalid duration"));
    assert!(error_of("[store]\nmax_staleness = \"10ms\"")
        .starts_with("bad.toml: store.max_staleness: must be at least 100ms"));
}

#[test]
fn proxy_limits_have_safe_defaults_and_parse() {
    let c = Config::parse("x.toml", "").unwrap();
    let l = &c.proxy.limits;
    assert_eq!(l.idle_timeout, Duration::from_secs(60));
    assert_eq!(l.max_connections, 10_000);
    assert_eq!(l.max_header_size, 64 * 1024);
    assert_eq!(l.max_request_body, 2 << 30);
    assert_eq!(
        l.forwarded_headers,
        airlock_proxy::headers::ForwardedPolicy::Refuse
    );
    assert!(l.allowed_hosts.is_empty());

    let c = Config::parse(
        "x.toml",
        "[proxy]\nidle_timeout = \"5s\"\nmax_connections = 64\nmax_header_size = \"16KiB\"\n\
         max_request_body = \"32MiB\"\nforwarded_headers = \"strip\"\n\
         allowed_hosts = [\"Airlock\", \"127.0.0.1:8080\"]\n",
    )
    .unwrap();
    let l = &c.proxy.limits;
    assert_eq!(l.idle_timeout, Duration::from_secs(5));
    assert_eq!(l.max_connections, 64);
    assert_eq!(l.max_header_size, 16 * 1024);
    assert_eq!(l.max_request_body, 32 << 20);
    assert_eq!(
        l.forwarded_headers,
        airlock_proxy::headers::ForwardedPolicy::Strip
    );
    assert_eq!(l.allowed_hosts, vec!["airlock", "127.0.0.1:8080"]);

    for (text, key) in [
        ("idle_timeout = \"0s\"", "proxy.idle_timeout"),
        ("max_connections = 0", "proxy.max_connections"),
        ("max_header_size = \"1KiB\"", "proxy.max_header_size"),
        ("max_request_body = \"lots\"", "proxy.max_request_body"),
        ("forwarded_headers = \"keep\"", "proxy.forwarded_headers"),
        ("allowed_hosts = [\"a/b\"]", "proxy.allowed_hosts"),
    ] {
        let error = error_of(&format!("[proxy]\n{text}"));
        assert!(error.contains(key), "{text}: {error}");
    }
}

#[test]
fn a_session_s_calls_in_flight_are_bounded() {
    let c = Config::parse("x.toml", "").unwrap();
    assert_eq!(c.max_calls_in_flight, DEFAULT_MAX_CALLS_IN_FLIGHT);
    let c = Config::parse("x.toml", "[sessions]\nmax_calls_in_flight = 16\n").unwrap();
    assert_eq!(c.max_calls_in_flight, 16);
    for value in ["0", "1000001"] {
        assert_eq!(
            error_of(&format!("[sessions]\nmax_calls_in_flight = {value}")),
            format!(
                "bad.toml: sessions.max_calls_in_flight: must be between 1 and 1000000, not \
                 {value}"
            )
        );
    }
    assert!(error_of("[sessions]\nmax_calls_in_flight = -1")
        .starts_with("bad.toml: sessions.max_calls_in_flight"));
}

#[test]
fn byte_sizes() {
    for (text, bytes) in [
        ("0", 0),
        ("1048576", 1 << 20),
        ("512B", 512),
        ("64KiB", 64 << 10),
        ("64kb", 64_000),
        ("32MiB", 32 << 20),
        ("2 GiB", 2 << 30),
        ("1TB", 1_000_000_000_000),
    ] {
        assert_eq!(parse_byte_size(text), Ok(bytes), "{text}");
    }
    for text in ["", "MiB", "-1", "1.5MiB", "1 PiB", "99999999999TiB"] {
        assert!(parse_byte_size(text).is_err(), "{text}");
    }
}

#[test]
fn proxy_workers_default_to_one_per_core_and_are_bounded() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(Config::parse("x.toml", "").unwrap().proxy.workers, cores);
    let c = Config::parse("x.toml", "[proxy]\nworkers = 3\n").unwrap();
    assert_eq!(c.proxy.workers, 3);
    for bad in ["0", "1025"] {
        let error = error_of(&format!("[proxy]\nworkers = {bad}"));
        assert!(
            error.starts_with(&format!(
                "bad.toml: proxy.workers: {bad}: must be between 1 and 1024"
            )),
            "{error}"
        );
    }
    let negative = error_of("[proxy]\nworkers = -1");
    assert!(negative.contains("line 2"), "{negative}");
}

/// A host name where an address goes is refused for what it is (airlock
/// binds addresses, it does not resolve names), not called malformed.
#[test]
fn a_listen_host_name_is_refused_as_not_an_ip_address() {
    for (section, key) in [("proxy", "proxy.listen"), ("admin", "admin.listen")] {
        let got = error_of(&format!("[{section}]\nlisten = \"localhost:8080\""));
        assert_eq!(
            got,
            format!(
                "bad.toml: {key}: \"localhost:8080\": must be an IP address and port such as \
                 127.0.0.1:8080 (or [::1]:8080, 0.0.0.0:8080 for every interface); host names \
                 are not resolved"
            )
        );
    }
}

/// A table or key given twice is named, with its line.
#[test]
fn a_duplicate_table_or_key_is_named() {
    let table = "[providers.openai]\nupstream = \"https://a\"\n\n[providers.openai]\nupstream = \"https://b\"\n";
    assert_eq!(
        error_of(table),
        "bad.toml: line 4: table [providers.openai] is defined twice: a table may appear once, \
         so merge the two into one"
    );
    let key = "[proxy]\nlisten = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n";
    let got = error_of(key);
    assert!(
        got.starts_with("bad.toml: line 3: key `listen` is set twice in the same table"),
        "{got}"
    );
}

/// A built-in provider's table takes the built-in settings for what it
/// leaves out (SPEC §2); a custom one must name them.
#[test]
fn a_builtin_providers_table_takes_the_builtin_defaults() {
    let c = Config::parse(
        "x.toml",
        "[providers.openai]\nupstream = \"http://127.0.0.1:9\"\ncredential = \"env:MY_KEY\"\n\n\
         [providers.anthropic]\nbase_path = \"/api\"\n",
    )
    .unwrap();
    let openai = &c.providers["openai"];
    assert_eq!(openai.upstream, "http://127.0.0.1:9");
    assert_eq!(openai.credential, CredentialSource::Env("MY_KEY".into()));
    assert_eq!(openai.auth, AuthStyle::Bearer);
    assert_eq!(openai.env_key, "OPENAI_API_KEY");
    assert_eq!(openai.env_base_url, "OPENAI_BASE_URL");
    assert_eq!(openai.base_path, "/v1");
    let anthropic = &c.providers["anthropic"];
    assert_eq!(anthropic.upstream, "https://api.anthropic.com");
    assert_eq!(anthropic.auth.to_string(), "header:x-api-key");
    assert_eq!(
        anthropic.credential,
        CredentialSource::Env("ANTHROPIC_API_KEY".into())
    );
    assert_eq!(anthropic.env_key, "ANTHROPIC_API_KEY");
    assert_eq!(anthropic.env_base_url, "ANTHROPIC_BASE_URL");
    assert_eq!(anthropic.base_path, "/api");

    // A table written when every table had to name env_key (and auth and
    // base_path defaulted to bearer and none) means what it meant then.
    let c = Config::parse(
        "x.toml",
        "[providers.openai]\nupstream = \"http://127.0.0.1:9\"\ncredential = \"env:MY_KEY\"\n\
         env_key = \"OPENAI_API_KEY\"\nenv_base_url = \"OPENAI_BASE_URL\"\n\n\
         [providers.anthropic]\nupstream = \"http://127.0.0.1:9\"\ncredential = \"env:K\"\n\
         env_key = \"ANTHROPIC_API_KEY\"\nenv_base_url = \"ANTHROPIC_BASE_URL\"\n",
    )
    .unwrap();
    assert_eq!(c.providers["openai"].base_path, "");
    assert_eq!(c.providers["anthropic"].auth, AuthStyle::Bearer);

    let custom = "\n[providers.acme]\nupstream = \"https://acme\"\ncredential = \"env:A\"\n";
    assert_eq!(
        error_of(custom),
        "bad.toml: providers.acme.env_key (line 2): missing: a provider other than the built-in \
         anthropic and openai must set env_key (the variable agents read their session token \
         from, e.g. \"ACME_API_KEY\")"
    );
}

/// A built-in provider's table that sets `env_key` keeps a custom
/// provider's `auth` and `base_path` (as in earlier versions): said where
/// that differs from the built-in's, silent once the table sets them.
#[test]
fn a_builtin_table_with_env_key_is_warned_of_its_generic_defaults() {
    let c = Config::parse(
        "x.toml",
        "[providers.anthropic]\nenv_key = \"ANTHROPIC_API_KEY\"\n\
         [providers.openai]\nenv_key = \"OPENAI_API_KEY\"\n",
    )
    .unwrap();
    assert_eq!(c.providers["anthropic"].auth, AuthStyle::Bearer);
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("providers.anthropic: sets env_key")
            && warnings[0].contains("auth = \"bearer\" (the built-in's is \"header:x-api-key\")"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("base_path = \"\" (the built-in's is \"/v1\")"),
        "{warnings:?}"
    );
    for quiet in [
        "[providers.anthropic]\nenv_key = \"A\"\nauth = \"header:x-api-key\"\n",
        "[providers.openai]\nenv_key = \"O\"\nbase_path = \"\"\n",
        "[providers.openai]\nupstream = \"https://gw.example\"\n",
    ] {
        let c = Config::parse("x.toml", quiet).unwrap();
        assert!(c.warnings().is_empty(), "{quiet}: {:?}", c.warnings());
    }
}

/// `store.max_staleness` with a SQLite store is named as ignored (it was
/// taken silently); with PostgreSQL, or left out, nothing is said.
#[test]
fn max_staleness_with_sqlite_is_warned_of() {
    let c = Config::parse("x.toml", "[store]\nmax_staleness = \"2s\"\n").unwrap();
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("store.max_staleness applies to a PostgreSQL store"),
        "{warnings:?}"
    );
    for quiet in [
        "[store]\nurl = \"sqlite://a.db\"\n",
        "[store]\nurl = \"postgres://u@h/db\"\nmax_staleness = \"2s\"\n",
    ] {
        let c = Config::parse("x.toml", quiet).unwrap();
        assert!(c.warnings().is_empty(), "{quiet}: {:?}", c.warnings());
        assert_eq!(
            c.store_max_staleness,
            if quiet.contains("2s") {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(5)
            }
        );
    }
}

/// A credential source that is none of env:, file: or store is refused
/// without repeating the value: written there by mistake, it is often the
/// key itself (round 28: the key was echoed to the terminal and logs).
#[test]
fn a_literal_credential_is_refused_without_being_shown() {
    let config = |credential: &str| {
        format!(
            "[providers.p]\nupstream = \"https://p.example.com\"\ncredential = \"{credential}\"\n\
             env_key = \"P_KEY\"\nenv_base_url = \"P_URL\"\n"
        )
    };
    let err = Config::parse("x.toml", &config("sk-live-abc123realkey"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("abc123"), "{err}");
    assert!(err.contains("providers.p.credential"), "{err}");
    assert!(err.contains("use env:VAR, file:PATH or store"), "{err}");
    // A mistyped source names its prefix, nothing after it.
    let err = Config::parse("x.toml", &config("ENV:P_SECRET"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"ENV:\" is not a credential source"), "{err}");
    assert!(!err.contains("P_SECRET"), "{err}");
    // A key pasted after `env:` is no variable name (round 37: `config
    // check` printed it as one).
    for pasted in ["env:sk-proj-AbCdEf0123456789SECRET", "env:9abc", "env:a b"] {
        let err = Config::parse("x.toml", &config(pasted))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs an environment variable name"), "{err}");
        assert!(!err.contains(&pasted[4..]), "{err}");
    }
    for name in ["env:P_KEY", "env:_x1", "env:openai_api_key"] {
        assert!(Config::parse("x.toml", &config(name)).is_ok(), "{name}");
    }
}
