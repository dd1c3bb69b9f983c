use proptest::prelude::*;

use super::*;

fn pattern(s: &str) -> PathPattern {
    s.parse().unwrap()
}

#[test]
fn parses_cli_rules() {
    let rule: Rule = "openai:POST:/v1/chat/completions".parse().unwrap();
    assert!(rule.allows("openai", Method::Post, "/v1/chat/completions"));
    assert!(!rule.allows("openai", Method::Get, "/v1/chat/completions"));
    assert!(!rule.allows("anthropic", Method::Post, "/v1/chat/completions"));

    let rule: Rule = "github:GET,HEAD:/repos/acme/**".parse().unwrap();
    assert!(rule.allows("github", Method::Head, "/repos/acme/x"));
    assert!(!rule.allows("github", Method::Post, "/repos/acme/x"));

    let rule: Rule = "openai:*:/v1/files/a:b".parse().unwrap();
    assert!(rule.allows("openai", Method::Delete, "/v1/files/a:b"));
}

#[test]
fn websocket_is_granted_by_name_or_star_never_by_get() {
    let get: Rule = "openai:GET:/v1/**".parse().unwrap();
    assert!(!get.allows("openai", Method::WebSocket, "/v1/realtime"));
    let ws: Rule = "openai:WEBSOCKET:/v1/realtime".parse().unwrap();
    assert!(ws.allows("openai", Method::WebSocket, "/v1/realtime"));
    assert!(!ws.allows("openai", Method::Get, "/v1/realtime"));
    assert!(!ws.allows("openai", Method::WebSocket, "/v1/other"));
    let star: Rule = "openai:*:/v1/**".parse().unwrap();
    assert!(star.allows("openai", Method::WebSocket, "/v1/realtime"));
    assert_eq!(MethodSet::all().names(), vec!["*"]);
    assert_eq!(
        MethodSet::parse(["GET", "WEBSOCKET"]).unwrap().names(),
        vec!["GET", "WEBSOCKET"]
    );
    // A rule names it; no request's own method is it.
    assert_eq!(Method::parse("WEBSOCKET"), Some(Method::WebSocket));
    assert_eq!(Method::of_request("WEBSOCKET"), None);
    assert_eq!(Method::of_request("GET"), Some(Method::Get));
}

#[test]
fn refuses_bad_rules() {
    for (input, want) in [
        ("openai", "not PROVIDER:METHODS:PATH"),
        ("openai:POST", "not PROVIDER:METHODS:PATH"),
        ("openai::/v1", "not PROVIDER:METHODS:PATH"),
        ("openai:POST:", "not PROVIDER:METHODS:PATH"),
        ("OpenAI:POST:/v1", "provider name"),
        (":POST:/v1", "provider name"),
        ("openai:post:/v1", "method \"post\""),
        ("openai:websocket:/v1", "method \"websocket\""),
        ("openai:CONNECT:/v1", "method \"CONNECT\""),
        ("openai:GET,:/v1", "method \"\""),
        ("openai:POST:v1/chat", "must start with '/'"),
        ("openai:POST:/v1/**/x", "'*' must be a whole segment"),
        ("openai:POST:/v1/a*", "'*' must be a whole segment"),
        ("openai:POST:/v1//x", "empty segment"),
        ("openai:POST:/v1/../x", "'.' or '..'"),
        ("openai:POST:/v1/%2e%2e", "contains an encoded '.' (%2E)"),
        ("openai:POST:/v1/a;b", "path contains ';'"),
        (
            "openai:POST:/v1/sess_0123456789abcdefghijABCDEFGHIJ0123456789abc",
            "path pattern \"/v1/sess_[withheld]\": holds a session token",
        ),
    ] {
        let err = input.parse::<Rule>().unwrap_err().to_string();
        assert!(err.contains(want), "{input}: {err}");
        assert!(!err.contains("0123456789abcdefghij"), "{input}: {err}");
    }
}

/// Whitespace is refused wherever it is in a rule, naming it; before,
/// spaces around a method were dropped and a space in the path was a
/// "forbidden byte 0x20".
#[test]
fn refuses_whitespace_anywhere_in_a_rule() {
    for (input, what) in [
        ("openai: POST:/v1/x", "a space"),
        ("openai:POST :/v1/x", "a space"),
        ("openai:GET, HEAD:/v1/x", "a space"),
        ("openai:POST:/v1/x ", "a space"),
        ("openai:POST:/v1/a b", "a space"),
        (" openai:POST:/v1/x", "a space"),
        ("openai:POST:/v1/x\t", "a tab"),
        ("openai:POST:/v1/x\n", "a newline"),
        ("openai:POST:/v1/\u{a0}x", "a no-break space (U+00A0)"),
    ] {
        let err = input.parse::<Rule>().unwrap_err();
        assert_eq!(
            err,
            RuleError::Whitespace {
                rule: input.to_owned(),
                what: what.to_owned()
            },
            "{input:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("contains {what}")), "{text}");
        assert!(!text.contains("0x20"), "{text}");
    }
}

/// A method in another case is refused (methods are compared exactly) with
/// the one it would be.
#[test]
fn a_method_in_lower_case_is_refused_with_its_upper_case() {
    let err = "openai:post:/v1/x".parse::<Rule>().unwrap_err().to_string();
    assert!(
        err.ends_with("; methods are upper case: did you mean POST?"),
        "{err}"
    );
    let err = "openai:GET,WebSocket:/v1/x"
        .parse::<Rule>()
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("did you mean WEBSOCKET?"), "{err}");
    let err = "openai:CONNECT:/v1/x"
        .parse::<Rule>()
        .unwrap_err()
        .to_string();
    assert!(!err.contains("did you mean"), "{err}");
}

#[test]
fn star_matches_exactly_one_segment() {
    let p = pattern("/v1/models/*");
    assert!(p.matches("/v1/models/gpt-4o"));
    assert!(!p.matches("/v1/models"));
    assert!(!p.matches("/v1/models/"));
    assert!(!p.matches("/v1/models/a/b"));
    assert!(!p.matches("/v1/models/a/"));
    let p = pattern("/v1/*/messages");
    assert!(p.matches("/v1/threads/messages"));
    assert!(!p.matches("/v1/messages"));
}

#[test]
fn double_star_matches_any_rest_including_none() {
    let p = pattern("/repos/acme/**");
    assert!(p.matches("/repos/acme"));
    assert!(p.matches("/repos/acme/"));
    assert!(p.matches("/repos/acme/widget"));
    assert!(p.matches("/repos/acme/widget/issues/1"));
    assert!(!p.matches("/repos/acmex"));
    assert!(!p.matches("/repos/acmex/widget"));
    assert!(!p.matches("/repos"));
    assert!(!p.matches("/"));
    let all = pattern("/**");
    assert!(all.matches("/"));
    assert!(all.matches("/anything/at/all"));
}

#[test]
fn literals_are_exact() {
    let p = pattern("/v1/chat/completions");
    assert!(p.matches("/v1/chat/completions"));
    assert!(!p.matches("/v1/chat/completions/"));
    assert!(!p.matches("/v1/chat/completions/x"));
    assert!(!p.matches("/v1/chat"));
    assert!(!p.matches("/V1/chat/completions"));
    assert!(!p.matches("/v1/chat/%63ompletions"));
    let root = pattern("/");
    assert!(root.matches("/"));
    assert!(!root.matches("/x"));
}

#[test]
fn a_validated_path_gets_the_same_answer() {
    let json = r#"[{"provider":"openai","methods":["POST"],"paths":["/v1/chat/completions","/v1/models/*"]},{"provider":"github","methods":["*"],"paths":["/repos/**"]}]"#;
    let scope: Scope = serde_json::from_str(json).unwrap();
    let calls = [
        ("openai", Method::Post, "/v1/chat/completions", true),
        ("openai", Method::Get, "/v1/chat/completions", false),
        ("openai", Method::Post, "/v1/models/x", true),
        ("openai", Method::Post, "/v1/models/x/y", false),
        ("github", Method::Delete, "/repos/a/b", true),
        ("github", Method::Get, "/repos", true),
        ("anthropic", Method::Post, "/v1/chat/completions", false),
    ];
    for (provider, method, path, allowed) in calls {
        let valid = path::validate(path).unwrap();
        assert_eq!(
            scope.allows_valid(provider, method, valid),
            allowed,
            "{provider} {path}"
        );
        assert_eq!(
            scope.allows(provider, method, path),
            allowed,
            "{provider} {path}"
        );
    }
    // What the validator refuses, `allows` refuses too.
    for path in ["/repos/a/../b", "/repos//a", "/repos/%2e%2e/x"] {
        assert!(path::validate(path).is_err(), "{path}");
        assert!(!scope.allows("github", Method::Get, path), "{path}");
    }
}

#[test]
fn json_round_trip() {
    let json = r#"[{"provider":"openai","methods":["POST","GET"],"paths":["/v1/chat/completions","/v1/models/*"]},{"provider":"github","methods":["*"],"paths":["/repos/**"]}]"#;
    let scope: Scope = serde_json::from_str(json).unwrap();
    assert!(scope.allows("openai", Method::Get, "/v1/models/x"));
    assert!(scope.allows("github", Method::Delete, "/repos/a/b"));
    assert_eq!(scope.providers(), vec!["openai", "github"]);
    let back = serde_json::to_string(&scope).unwrap();
    assert_eq!(
        back,
        r#"[{"provider":"openai","methods":["GET","POST"],"paths":["/v1/chat/completions","/v1/models/*"]},{"provider":"github","methods":["*"],"paths":["/repos/**"]}]"#
    );
    let err = serde_json::from_str::<Scope>(
        r#"[{"provider":"openai","methods":["FETCH"],"paths":["/x"]}]"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("FETCH"), "{err}");
    assert!(serde_json::from_str::<Scope>(
        r#"[{"provider":"openai","methods":["GET"],"paths":["/x"],"extra":1}]"#
    )
    .is_err());
    assert!(Scope::new(vec![]).is_err());
}

proptest! {
    #[test]
    fn rule_parser_never_panics(s in "\\PC{0,60}") {
        let _ = s.parse::<Rule>();
    }

    #[test]
    fn literal_pattern_matches_only_itself(
        a in "/[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,4}",
        b in "/[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,4}",
    ) {
        let p = pattern(&a);
        prop_assert!(p.matches(&a));
        prop_assert_eq!(p.matches(&b), a == b);
    }

    #[test]
    fn double_star_matches_exactly_its_prefix(
        prefix in "(/[a-z]{1,4}){1,3}",
        path in "(/[a-z]{1,4}){0,5}",
    ) {
        let p = pattern(&format!("{prefix}/**"));
        let full = format!("{prefix}{path}");
        prop_assert!(p.matches(&full));
        let starts = path.starts_with(&prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/');
        prop_assert_eq!(p.matches(&path), starts);
    }

    #[test]
    fn star_segments_match_same_arity(
        n in 1usize..5,
        segs in proptest::collection::vec("[a-z]{1,4}", 0..7),
    ) {
        let p = pattern(&"/*".repeat(n));
        let path = if segs.is_empty() { "/".to_owned() } else { format!("/{}", segs.join("/")) };
        prop_assert_eq!(p.matches(&path), segs.len() == n);
    }
}
