//! Scope rules in both forms: the CLI form `PROVIDER:METHODS:PATH` and the
//! JSON form. Beyond "no panic": a rule that parses survives a JSON round
//! trip unchanged, and a parsed rule never allows a path that `validate`
//! refuses (the proxy validates first, but a rule alone must not rely on
//! it for `..`).
#![no_main]

use airlock_core::path::validate;
use airlock_core::{Method, Rule, Scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (rule_text, probe) = text.split_once('\n').unwrap_or((text, "/v1/x"));
    if let Ok(rule) = rule_text.parse::<Rule>() {
        let json = serde_json::to_string(&rule).expect("a rule serializes");
        let back: Rule = serde_json::from_str(&json).expect("a serialized rule parses");
        assert_eq!(rule, back);
        for method in Method::ALL {
            if rule.allows(rule.provider(), method, probe) {
                assert!(
                    !probe.split('/').any(|s| s == ".." || s == "."),
                    "{rule_text:?} allows the dot path {probe:?}"
                );
            }
        }
        let _ = validate(probe);
    }
    // The JSON form, as the admin API receives it.
    if let Ok(scope) = serde_json::from_str::<Scope>(text) {
        let json = serde_json::to_string(&scope).expect("a scope serializes");
        let back: Scope = serde_json::from_str(&json).expect("a serialized scope parses");
        assert_eq!(scope, back);
    }
});
