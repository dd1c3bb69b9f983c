//! The strict path validator and the scope matcher, together.
//!
//! Input: `pattern \n path`. Checks, beyond "no panic":
//! - `validate` returns the path unchanged when it accepts it;
//! - an accepted path has no empty, `.` or `..` segment, and percent-decoding
//!   it (once or twice) changes neither its segment count nor introduces a
//!   dot segment or a `/` / `\` / `%` / control byte;
//! - a pattern that parses and matches an accepted path also matches it
//!   segment for segment once both are decoded: decoding cannot move a call
//!   out of the scope it was checked against.
#![no_main]

use airlock_core::path::validate;
use airlock_core::PathPattern;
use libfuzzer_sys::fuzz_target;

fn decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn segments(path: &str) -> Vec<&str> {
    path.strip_prefix('/').unwrap_or(path).split('/').collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, path) = text.split_once('\n').unwrap_or(("/**", text));
    let Ok(accepted) = validate(path) else {
        return;
    };
    assert_eq!(accepted.as_str(), path);
    let raw = segments(path);
    let last = raw.len() - 1;
    for (i, segment) in raw.iter().enumerate() {
        assert!(
            !segment.is_empty() || i == last,
            "empty segment in {path:?}"
        );
        assert!(
            *segment != "." && *segment != "..",
            "dot segment in {path:?}"
        );
        let once = decode(segment);
        assert!(
            !once
                .iter()
                .any(|b| matches!(b, b'/' | b'\\' | b'%') || *b < 0x20 || *b == 0x7f),
            "{segment:?} decodes to a separator or control byte"
        );
        let once = String::from_utf8(once).expect("accepted segments decode to UTF-8");
        assert!(
            once != "." && once != "..",
            "{segment:?} decodes to a dot segment"
        );
        let twice = String::from_utf8_lossy(&decode(&once)).into_owned();
        assert_eq!(once, twice, "{segment:?} decodes differently twice");
    }
    let Ok(pattern) = pattern.parse::<PathPattern>() else {
        return;
    };
    if !pattern.matches(path) {
        return;
    }
    // Match again on the decoded path with the decoded pattern.
    let decoded_path: Vec<String> = raw
        .iter()
        .map(|s| String::from_utf8_lossy(&decode(s)).into_owned())
        .collect();
    let source = pattern.as_str();
    let (body, any_rest) = match source.strip_suffix("**") {
        Some(body) => (body.trim_end_matches('/'), true),
        None => (source, false),
    };
    let wanted: Vec<&str> = match body.strip_prefix('/').unwrap_or(body) {
        "" => Vec::new(),
        s => s.split('/').collect(),
    };
    let seen: Vec<&String> = if path == "/" {
        Vec::new()
    } else {
        decoded_path.iter().collect()
    };
    assert!(seen.len() >= wanted.len());
    assert!(any_rest || seen.len() == wanted.len());
    for (want, got) in wanted.iter().zip(seen) {
        if *want != "*" {
            assert_eq!(String::from_utf8_lossy(&decode(want)), got.as_str());
        }
    }
});
