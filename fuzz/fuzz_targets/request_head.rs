//! The request-head checks the proxy runs before a call's path and scope
//! ([`airlock_proxy::headers::check_head`]) on arbitrary heads: method,
//! target, version and header lines taken from the input. Beyond "no
//! panic": an accepted head names no method override, no client-address
//! header, and at most one well-formed Content-Length within the limit.
#![no_main]

use airlock_proxy::headers::{check_head, RequestPolicy};
use airlock_proxy::AuthStyle;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let Some(first) = lines.next() else {
        return;
    };
    let mut parts = first.splitn(3, |b| *b == b' ');
    let (Some(method), Some(target), version) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let version = match version {
        Some(b"HTTP/2") => Version::HTTP_2,
        Some(b"HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let policy = RequestPolicy {
        max_request_body: 1 << 20,
        ..RequestPolicy::default()
    };
    let auth = AuthStyle::Header(HeaderName::from_static("x-api-key"));
    if check_head(&method, &uri, version, &headers, None, &auth, &policy).is_ok() {
        assert!(!headers.contains_key("x-http-method-override"));
        assert!(!headers.contains_key("x-forwarded-for"));
        assert!(!headers.contains_key("forwarded"));
        assert!(headers.get_all("content-length").iter().count() <= 1);
        if let Some(length) = headers.get("content-length") {
            let length: u64 = length.to_str().unwrap().parse().unwrap();
            assert!(length <= 1 << 20);
        }
        assert!(
            !(headers.contains_key("content-length") && headers.contains_key("transfer-encoding"))
        );
    }
});
