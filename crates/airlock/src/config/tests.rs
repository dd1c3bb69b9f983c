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
    assert_eq!(c.providers.len(), 2);
    assert_eq!(c.providers["google"].auth, AuthStyle::Query("key".into()));
    assert_eq!(
        c.providers["google"].credential,
        CredentialSource::File("/run/secrets/google".into())
    );
}

fn error_of(text: &str) -> String {
    Config::parse("bad.toml", text).unwrap_err().to_string()
}

#[test]
fn bad_configs_name_file_key_and_reason() {
    let cases = [
        ("[proxy]\nlisten = \"nope\"", "bad.toml: proxy.listen: \"nope\" is not HOST:PORT"),
        ("[proxy]\nlistn = \"x\"", "bad.toml: line 2: unknown field `listn`"),
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
        ("[proxy\n", "bad.toml: line 1:"),
    ];
    for (text, want) in cases {
        let got = error_of(text);
        assert!(got.starts_with(want), "{text:?}\n got: {got}\nwant: {want}");
    }
}
