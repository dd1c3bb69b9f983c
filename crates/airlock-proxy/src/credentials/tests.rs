use http::HeaderValue;

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn x_api_key() -> AuthStyle {
    AuthStyle::Header(HeaderName::from_static("x-api-key"))
}

#[test]
fn finds_bearer_and_provider_header() {
    let h = headers(&[("authorization", "Bearer sess_a")]);
    assert_eq!(find_token(&AuthStyle::Bearer, &h, None), Ok(Some("sess_a")));
    assert_eq!(find_token(&x_api_key(), &h, None), Ok(Some("sess_a")));
    let h = headers(&[("x-api-key", "sess_b")]);
    assert_eq!(find_token(&x_api_key(), &h, None), Ok(Some("sess_b")));
    assert_eq!(find_token(&AuthStyle::Bearer, &h, None), Ok(None));
    let h = headers(&[("authorization", "bearer   sess_c ")]);
    assert_eq!(find_token(&AuthStyle::Bearer, &h, None), Ok(Some("sess_c")));
    let h = headers(&[("authorization", "Basic abc")]);
    assert_eq!(find_token(&AuthStyle::Bearer, &h, None), Ok(None));
}

#[test]
fn a_bearer_credential_is_the_scheme_a_space_and_the_token() {
    assert_eq!(strip_bearer("Bearer sess_a"), Some("sess_a"));
    assert_eq!(strip_bearer(" \tBEARER \t sess_a \t"), Some("sess_a"));
    assert_eq!(strip_bearer("Bearer"), None);
    assert_eq!(strip_bearer("Bearer\tsess_a"), None);
    assert_eq!(strip_bearer("Bearers sess_a"), None);
    assert_eq!(strip_bearer("Basic sess_a"), None);
    // GitHub's scheme, as its clients send it.
    assert_eq!(strip_bearer("token sess_a"), Some("sess_a"));
    assert_eq!(strip_bearer("Token  sess_a "), Some("sess_a"));
    assert_eq!(strip_bearer("tokens sess_a"), None);
    assert_eq!(strip_bearer("Bearer "), None);
    assert_eq!(strip_bearer("Bearer  "), None);
}

#[test]
fn finds_query_token() {
    let q = AuthStyle::Query("key".into());
    let h = HeaderMap::new();
    assert_eq!(
        find_token(&q, &h, Some("a=1&key=sess_q")),
        Ok(Some("sess_q"))
    );
    assert_eq!(find_token(&q, &h, Some("a=1&keys=sess_q")), Ok(None));
    assert_eq!(
        find_token(&q, &h, Some("key=sess_q&key=sess_q")),
        Ok(Some("sess_q"))
    );
    assert!(find_token(&q, &h, Some("key=sess_q&key=sess_r")).is_err());
}

#[test]
fn refuses_duplicates_and_conflicts() {
    let h = headers(&[
        ("authorization", "Bearer sess_a"),
        ("authorization", "Bearer sess_a"),
    ]);
    assert!(find_token(&AuthStyle::Bearer, &h, None).is_err());
    let h = headers(&[("authorization", "Bearer sess_a"), ("x-api-key", "sess_b")]);
    assert!(find_token(&x_api_key(), &h, None).is_err());
    let h = headers(&[("authorization", "Bearer sess_a"), ("x-api-key", "sess_a")]);
    assert_eq!(find_token(&x_api_key(), &h, None), Ok(Some("sess_a")));
}

const TOKEN: &str = "sess_0123456789abcdefghijABCDEFGHIJ0123456789abc";

fn token_check(auth: &AuthStyle, pairs: &[(&str, &str)], path: &str, query: Option<&str>) -> bool {
    let h = headers(pairs);
    check_token_not_elsewhere(TOKEN, auth, &h, path, query).is_ok()
}

#[test]
fn the_token_only_where_it_is_the_credential() {
    let bearer = format!("Bearer {TOKEN}");
    let body = &TOKEN["sess_".len()..];
    assert!(token_check(
        &AuthStyle::Bearer,
        &[("authorization", &bearer)],
        "/v1/x",
        Some("a=1")
    ));
    assert!(token_check(
        &x_api_key(),
        &[("x-api-key", TOKEN), ("authorization", &bearer)],
        "/v1/x",
        None
    ));
    let q = AuthStyle::Query("key".into());
    let query = format!("alt=json&key={TOKEN}");
    assert!(token_check(&q, &[], "/v1/x", Some(&query)));
    // Long values without the token pass.
    assert!(token_check(
        &AuthStyle::Bearer,
        &[("authorization", &bearer), ("user-agent", &"a".repeat(300))],
        "/v1/x",
        None
    ));

    type Leak<'a> = (Vec<(&'a str, String)>, String, Option<String>);
    let leaks: Vec<Leak<'_>> = vec![
        (vec![("x-leak", TOKEN.to_owned())], "/v1/x".into(), None),
        (vec![("cookie", format!("s={body}"))], "/v1/x".into(), None),
        (vec![("x-api-key", TOKEN.to_owned())], "/v1/x".into(), None),
        (
            vec![("authorization", format!("Basic {TOKEN}"))],
            "/v1/x".into(),
            None,
        ),
        // Either side of the length where the search changes method.
        (
            vec![("x-pad", format!("{}{TOKEN}", "x".repeat(63 - TOKEN.len())))],
            "/v1/x".into(),
            None,
        ),
        (
            vec![("x-pad", format!("{}{TOKEN}", "x".repeat(64 - TOKEN.len())))],
            "/v1/x".into(),
            None,
        ),
        (
            vec![(
                "user-agent",
                format!("{}{body}{}", "a".repeat(200), "b".repeat(50)),
            )],
            "/v1/x".into(),
            None,
        ),
        (vec![], format!("/v1/files/{TOKEN}"), None),
        (vec![], "/v1/x".into(), Some(format!("t={TOKEN}"))),
        (vec![], "/v1/x".into(), Some(format!("t=sess%5F{body}"))),
        (vec![], "/v1/x".into(), Some(format!("{body}=1"))),
    ];
    for (pairs, path, query) in &leaks {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut all = vec![("authorization", bearer.as_str())];
        all.extend(pairs.iter().copied());
        assert!(
            !token_check(&AuthStyle::Bearer, &all, path, query.as_deref()),
            "{pairs:?} {path} {query:?}"
        );
    }
    // The query-style credential parameter, spelled another way.
    assert!(check_query_auth(&q, Some("k%65y=x&a=1")).is_err());
    for ambiguous in [
        "a=1;key=x&key=y",
        "KEY=x&key=y",
        "key[]=x&key=y",
        "%20key=x&key=y",
        "+key=x&key=y",
        "key%00=x&key=y",
    ] {
        assert!(
            check_query_auth(&q, Some(ambiguous)).is_err(),
            "{ambiguous}"
        );
    }
    assert!(check_query_auth(&q, Some("key=x&a=1")).is_ok());
    assert!(check_query_auth(&q, Some("key=x;a=1&keys=2")).is_ok());
}

#[test]
fn the_credential_query_keeps_every_other_byte_of_the_agent_s_query() {
    let pair = "key=REAL";
    let cases = [
        (None, "key=REAL"),
        (Some(""), "key=REAL"),
        (Some("key=sess_t"), "key=REAL"),
        (Some("alt=sse&key=sess_t"), "alt=sse&key=REAL"),
        // In the token's place: the order of the parameters is the agent's.
        (Some("key=sess_t&alt=sse"), "key=REAL&alt=sse"),
        (Some("a=1&key=sess_t&b=2"), "a=1&key=REAL&b=2"),
        // The same token given twice: once, where it first was.
        (Some("key=sess_t&a=1&key=sess_t"), "key=REAL&a=1"),
        (
            Some("alt=sse&flag&&x=1&key=sess_t"),
            "alt=sse&flag&&x=1&key=REAL",
        ),
        (Some("&key=sess_t&"), "&key=REAL&"),
        // The token in a header: the credential goes last.
        (Some("alt=sse"), "alt=sse&key=REAL"),
        (Some("&a=1"), "&a=1&key=REAL"),
        (Some("a=%20b&keys=1&key"), "a=%20b&keys=1&key=REAL"),
    ];
    for (query, want) in cases {
        assert_eq!(query_with_credential(query, "key", pair), want, "{query:?}");
    }
}
