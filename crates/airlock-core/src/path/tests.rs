use proptest::prelude::*;

use super::*;

#[test]
fn plain_paths_pass_unchanged() {
    for p in [
        "/",
        "/v1/chat/completions",
        "/v1/models/gpt-4o",
        "/repos/acme/widget/",
        "/v1/files/file-abc:123@x",
        "/a/%20b/caf%C3%A9",
        "/a/b.json",
        "/a/...x",
    ] {
        assert_eq!(validate(p), Ok(p), "{p}");
    }
}

#[test]
fn ambiguous_paths_are_refused() {
    let cases: &[(&str, PathError)] = &[
        ("", PathError::NotAbsolute),
        ("v1/models", PathError::NotAbsolute),
        ("/v1/../admin", PathError::DotSegment),
        ("/v1/./models", PathError::DotSegment),
        ("/..", PathError::DotSegment),
        ("/v1/models/.", PathError::DotSegment),
        ("/v1//models", PathError::EmptySegment),
        ("//v1", PathError::EmptySegment),
        ("/v1/%2e%2e/admin", PathError::ForbiddenEscape(b'.')),
        ("/v1/%2E%2E/admin", PathError::ForbiddenEscape(b'.')),
        ("/v1/.%2e/admin", PathError::ForbiddenEscape(b'.')),
        ("/v1%2fadmin", PathError::ForbiddenEscape(b'/')),
        ("/v1%2Fadmin", PathError::ForbiddenEscape(b'/')),
        ("/v1%5cadmin", PathError::ForbiddenEscape(b'\\')),
        ("/v1/a%00", PathError::ForbiddenEscape(0)),
        ("/v1/a%0a", PathError::ForbiddenEscape(b'\n')),
        ("/v1/a%252e%252e", PathError::ForbiddenEscape(b'%')),
        ("/v1\\admin", PathError::ForbiddenByte(b'\\')),
        ("/v1/models;x=1", PathError::ForbiddenByte(b';')),
        ("/v1/a b", PathError::ForbiddenByte(b' ')),
        ("/v1/caf\u{e9}", PathError::ForbiddenByte(0xc3)),
        ("/v1/a%", PathError::BadEscape),
        ("/v1/a%2", PathError::BadEscape),
        ("/v1/a%zz", PathError::BadEscape),
        ("/v1/%c0%ae%c0%ae", PathError::NotUtf8),
        ("/v1/%ff", PathError::NotUtf8),
    ];
    for (path, expected) in cases {
        assert_eq!(validate(path), Err(*expected), "{path:?}");
    }
}

/// What a lenient upstream might do to a path: percent-decode it (once or
/// twice), turn backslashes into slashes, and resolve dot segments.
fn lenient_interpretations(path: &str) -> Vec<String> {
    let once = String::from_utf8_lossy(&percent_decode(path.as_bytes())).into_owned();
    let twice = String::from_utf8_lossy(&percent_decode(once.as_bytes())).into_owned();
    let mut out = Vec::new();
    for p in [path.to_owned(), once, twice] {
        let slashed = p.replace('\\', "/");
        out.push(resolve_dots(&slashed));
        out.push(slashed);
    }
    out
}

fn resolve_dots(path: &str) -> String {
    let mut stack: Vec<&str> = Vec::new();
    for seg in path.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    format!("/{}", stack.join("/"))
}

/// Segments as the scope matcher sees them.
fn segments(path: &str) -> Vec<String> {
    path.split('/').skip(1).map(str::to_owned).collect()
}

proptest! {
    #[test]
    fn validator_never_panics(path in "\\PC{0,40}") {
        let _ = validate(&path);
    }

    /// For every accepted path, no lenient decoding changes how many
    /// segments it has or introduces a dot segment: the provider sees the
    /// same segment structure that the scope was matched against.
    #[test]
    fn accepted_paths_keep_their_structure_under_any_decoding(
        path in "(/([a-zA-Z0-9._~-]|%[0-9a-fA-F]{2}|[\\\\;:@%/.]){0,8}){1,6}"
    ) {
        if validate(&path).is_ok() {
            let expected = segments(&path);
            for seen in lenient_interpretations(&path) {
                let got = segments(&seen);
                prop_assert_eq!(got.len(), expected.len(), "{} became {}", path, seen);
                prop_assert!(!got.iter().any(|s| s == "." || s == ".."), "{} became {}", path, seen);
            }
        }
    }
}
