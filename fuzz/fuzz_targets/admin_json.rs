//! `POST /v1/sessions` bodies, as the admin API parses and checks them.
//! Any input gives a session request or a 400 naming the problem; an
//! accepted request respects the limits it was checked against.
#![no_main]

use std::collections::BTreeMap;
use std::time::Duration;

use airlock_admin::{CreateSession, ProviderEnv};
use libfuzzer_sys::fuzz_target;

fn providers() -> BTreeMap<String, ProviderEnv> {
    ["openai", "anthropic"]
        .into_iter()
        .map(|name| {
            (
                name.to_owned(),
                ProviderEnv {
                    env_key: format!("{}_API_KEY", name.to_uppercase()),
                    env_base_url: format!("{}_BASE_URL", name.to_uppercase()),
                    base_path: String::new(),
                },
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let max_ttl = Duration::from_secs(86_400);
    if let Ok(session) = CreateSession::parse_with(data, &providers(), max_ttl) {
        assert!(!session.ttl.is_zero() && session.ttl <= max_ttl);
        assert!(!session.scope.rules().is_empty());
        for provider in session.scope.providers() {
            assert!(provider == "openai" || provider == "anthropic");
        }
        assert!(session.labels.len() <= 32);
    }
});
