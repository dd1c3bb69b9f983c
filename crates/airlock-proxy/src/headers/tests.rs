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

fn check(pairs: &[(&str, &str)], policy: &RequestPolicy) -> Result<(), Denial> {
    check_head(
        &Method::POST,
        &"/v1/messages".parse().unwrap(),
        Version::HTTP_11,
        &headers(pairs),
        None,
        &x_api_key(),
        policy,
    )
}

#[test]
fn strips_listed_and_named_headers() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key(header::CONTENT_TYPE));
}

#[test]
fn strips_each_hop_by_hop_header_alone() {
    for name in &HOP_BY_HOP {
        let mut h = headers(&[("content-type", "application/json"), ("x-kept", "1")]);
        h.insert(name.clone(), HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{name} left in {h:?}");
        assert!(!h.contains_key(name));
    }
}

#[test]
fn a_head_without_hop_by_hop_headers_keeps_every_header() {
    let pairs = [
        ("content-type", "application/json"),
        ("content-length", "2"),
        ("x-kept", "1"),
        ("x-kept", "2"),
    ];
    let mut h = headers(&pairs);
    strip_hop_by_hop(&mut h);
    assert_eq!(h, headers(&pairs));
}

#[test]
fn strips_client_address_headers() {
    let mut h = headers(&[
        ("forwarded", "for=1.2.3.4"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-host", "evil"),
        ("x-real-ip", "1.2.3.4"),
        ("cf-connecting-ip", "1.2.3.4"),
        ("x-envoy-original-path", "/gw/v1/models"),
        ("x-original-host", "api.example"),
        ("x-original-url", "/admin"),
        ("x-kept", "1"),
    ]);
    strip_forwarded(&mut h);
    assert_eq!(h.len(), 1);
    assert!(h.contains_key("x-kept"));
}

#[test]
fn ordinary_heads_pass() {
    let policy = RequestPolicy::default();
    let ok = [
        vec![("host", "127.0.0.1:8080")],
        vec![
            ("host", "airlock"),
            ("content-type", "application/json"),
            ("content-length", "42"),
            ("connection", "keep-alive"),
            ("x-stainless-os", "Linux"),
            ("anthropic-version", "2023-06-01"),
        ],
        vec![("host", "airlock"), ("transfer-encoding", "chunked")],
        vec![("host", "airlock"), ("connection", "close, x-private")],
        vec![("host", "[::1]:8080"), ("user_agent", "odd but harmless")],
    ];
    for pairs in ok {
        assert_eq!(check(&pairs, &policy), Ok(()), "{pairs:?}");
    }
}

#[test]
fn hostile_heads_are_refused() {
    let policy = RequestPolicy::default();
    let refused: &[&[(&str, &str)]] = &[
        &[("host", "a"), ("x-http-method-override", "DELETE")],
        &[("host", "a"), ("X-HTTP-Method", "DELETE")],
        &[("host", "a"), ("x-method-override", "DELETE")],
        &[("host", "a"), ("X-HTTP-Verb", "DELETE")],
        &[("host", "a"), ("x-method", "DELETE")],
        &[("host", "a"), ("x-original-url", "/admin")],
        &[("host", "a"), ("x-rewrite-url", "/admin")],
        &[("host", "a"), ("x-original-uri", "/admin")],
        &[("host", "a"), ("x-override-url", "/admin")],
        &[("host", "a"), ("x-host", "evil")],
        &[("host", "a"), ("X-HTTP-Host-Override", "evil")],
        &[
            ("host", "a"),
            ("content-type", "application/json"),
            ("x-original-url", "/admin"),
            ("x-http-method", "DELETE"),
        ],
        &[("host", "a"), ("forwarded", "for=1.2.3.4")],
        &[("host", "a"), ("x-forwarded-for", "1.2.3.4")],
        &[("host", "a"), ("x-forwarded-host", "evil")],
        &[("host", "a"), ("x-real-ip", "1.2.3.4")],
        &[("host", "a"), ("connection", "close, x-api-key")],
        &[("host", "a"), ("connection", "Authorization")],
        &[("host", "a"), ("connection", "content-length")],
        &[("host", "a"), ("connection", "host")],
        &[("host", "a"), ("x_api_key", "k")],
        &[("host", "a"), ("x_forwarded_for", "1.2.3.4")],
        &[("host", "a"), ("content_length", "5")],
        &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
        &[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked"),
        ],
        &[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
        ],
        &[
            ("host", "a"),
            ("content-length", "5"),
            ("content-length", "5"),
        ],
        &[("host", "a"), ("content-length", "+5")],
        &[("host", "a"), ("content-length", "5, 5")],
        &[("host", "a"), ("host", "a")],
        &[("host", "evil.example/path")],
        &[("host", "user@evil.example")],
        &[("host", "")],
        &[],
    ];
    for pairs in refused {
        let denial = check(pairs, &policy).unwrap_err();
        assert_eq!(denial.code(), ErrorCode::BadRequest, "{pairs:?}");
    }
}

#[test]
fn forwarded_headers_may_be_stripped_instead() {
    let policy = RequestPolicy {
        forwarded: ForwardedPolicy::Strip,
        ..RequestPolicy::default()
    };
    assert_eq!(
        check(&[("host", "a"), ("x-forwarded-for", "1.2.3.4")], &policy),
        Ok(())
    );
    // A gateway's path rewrite (Envoy, Istio) or host override (Azure
    // Application Gateway) adds these: stripped too, not refused.
    assert_eq!(
        check(
            &[("host", "a"), ("x-envoy-original-path", "/gw/v1/messages")],
            &policy
        ),
        Ok(())
    );
    // Method overrides stay refused.
    assert!(check(&[("host", "a"), ("x-http-method", "DELETE")], &policy).is_err());
}

#[test]
fn body_limit_is_413() {
    let policy = RequestPolicy {
        max_request_body: 10,
        ..RequestPolicy::default()
    };
    assert_eq!(
        check(&[("host", "a"), ("content-length", "10")], &policy),
        Ok(())
    );
    let denial = check(&[("host", "a"), ("content-length", "11")], &policy).unwrap_err();
    assert_eq!(denial.code(), ErrorCode::PayloadTooLarge);
    assert_eq!(denial.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
}

#[test]
fn targets_and_hosts() {
    let policy = RequestPolicy {
        allowed_hosts: vec!["airlock".into(), "127.0.0.1:8080".into()],
        ..RequestPolicy::default()
    };
    let run = |uri: &str, version: Version, pairs: &[(&str, &str)]| {
        check_head(
            &Method::GET,
            &uri.parse().unwrap(),
            version,
            &headers(pairs),
            None,
            &AuthStyle::Bearer,
            &policy,
        )
    };
    assert_eq!(
        run("/v1/models", Version::HTTP_11, &[("host", "airlock:8080")]),
        Ok(())
    );
    assert_eq!(
        run("/v1/models", Version::HTTP_11, &[("host", "AIRLOCK")]),
        Ok(())
    );
    assert_eq!(
        run(
            "/v1/models",
            Version::HTTP_11,
            &[("host", "127.0.0.1:8080")]
        ),
        Ok(())
    );
    assert!(run("/v1/models", Version::HTTP_11, &[("host", "127.0.0.1:9")]).is_err());
    assert!(run(
        "/v1/models",
        Version::HTTP_11,
        &[("host", "api.openai.com")]
    )
    .is_err());
    assert!(run(
        "http://airlock/v1/models",
        Version::HTTP_11,
        &[("host", "airlock")]
    )
    .is_err());
    assert!(run(
        "http://evil/v1/models",
        Version::HTTP_11,
        &[("host", "airlock")]
    )
    .is_err());
    // HTTP/1.0 may omit Host; HTTP/1.1 may not.
    assert!(run("/v1/models", Version::HTTP_10, &[]).is_err());
    // HTTP/2: :authority is the URI's authority.
    assert_eq!(
        run("http://airlock/v1/models", Version::HTTP_2, &[]),
        Ok(())
    );
    assert!(run("http://evil/v1/models", Version::HTTP_2, &[]).is_err());
    assert!(run(
        "http://airlock/v1/models",
        Version::HTTP_2,
        &[("host", "evil")]
    )
    .is_err());
    // Any host when none is configured.
    let open = RequestPolicy::default();
    let any = check_head(
        &Method::GET,
        &"/v1/models".parse().unwrap(),
        Version::HTTP_11,
        &headers(&[("host", "whatever.example:1234")]),
        None,
        &AuthStyle::Bearer,
        &open,
    );
    assert_eq!(any, Ok(()));
}

#[test]
fn methods_and_anomalies() {
    let policy = RequestPolicy::default();
    let h = headers(&[("host", "a")]);
    let uri: Uri = "/v1/models?_method=DELETE".parse().unwrap();
    let run = |method: &Method, uri: &Uri, anomaly: Option<&FramingAnomaly>| {
        check_head(
            method,
            uri,
            Version::HTTP_11,
            &h,
            anomaly,
            &AuthStyle::Bearer,
            &policy,
        )
    };
    assert!(run(&Method::GET, &uri, None).is_err());
    let uri: Uri = "/v1/models?%5Fmethod=DELETE".parse().unwrap();
    assert!(run(&Method::GET, &uri, None).is_err());
    // Fullwidth, which NFKC reads as `_method` (round 45).
    let uri: Uri = "/v1/models?%EF%BC%BF%EF%BD%8Dethod=DELETE".parse().unwrap();
    assert!(run(&Method::GET, &uri, None).is_err());
    // The dotless i, which upper-cases to `I`: `X-HTTP-METHOD-OVERRIDE`
    // to a server comparing names in any case (review of round 45).
    let uri: Uri = "/v1/models?x-http-method-overr%C4%B1de=DELETE"
        .parse()
        .unwrap();
    assert!(run(&Method::GET, &uri, None).is_err());
    assert!(same_name("_\u{17f}", "_s"));
    assert!(same_name(
        "x-http-method-overr\u{131}de",
        "x-http-method-override"
    ));
    assert!(!same_name("_m\u{e9}thod", "_method"));
    let uri: Uri = "/v1/models".parse().unwrap();
    assert!(run(&Method::TRACE, &uri, None).is_err());
    assert!(run(&Method::CONNECT, &uri, None).is_err());
    let anomaly = FramingAnomaly("a bare LF");
    let denial = run(&Method::GET, &uri, Some(&anomaly)).unwrap_err();
    assert!(denial.message().contains("bare LF"), "{denial}");
}

#[test]
fn opaque_codings_are_named_from_a_fixed_list() {
    let coding = |pairs: &[(&str, &str)]| opaque_coding(&headers(pairs));
    assert_eq!(coding(&[]), None);
    assert_eq!(coding(&[("content-encoding", "identity")]), None);
    assert_eq!(coding(&[("transfer-encoding", "chunked")]), None);
    assert_eq!(coding(&[("content-encoding", "GZIP")]), Some("gzip"));
    assert_eq!(coding(&[("content-encoding", "identity, br")]), Some("br"));
    assert_eq!(
        coding(&[
            ("content-encoding", "identity"),
            ("content-encoding", "zstd")
        ]),
        Some("zstd")
    );
    assert_eq!(
        coding(&[("transfer-encoding", "gzip, chunked")]),
        Some("gzip")
    );
    // The provider's own text is never what the agent is told.
    assert_eq!(
        coding(&[("content-encoding", "sk-real-key-0123456789")]),
        Some("unknown")
    );
}
