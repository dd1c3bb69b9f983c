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
