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
        // Non-ASCII that no normalisation reads as a delimiter.
        "/v1/%E2%82%AC/%E3%81%82/%C3%BCber",
        "/v1/%EF%BD%81",
        // Look-alikes of `.` in a segment that does not read as `.` or
        // `..` (a macOS ellipsis, a fullwidth dot inside a name).
        "/v1/notes%E2%80%A6",
        "/v1/%E2%80%A6",
        "/v1/a%EF%BC%8Eb",
        "/v1/a%EF%BC%8E%EF%BC%8E",
    ] {
        assert_eq!(validate(p).map(ValidPath::as_str), Ok(p), "{p}");
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
        ("/v1/files/f%3F/content", PathError::ForbiddenEscape(b'?')),
        ("/v1/files/f%3f/content", PathError::ForbiddenEscape(b'?')),
        ("/v1/files/f%23/content", PathError::ForbiddenEscape(b'#')),
        ("/v1/files/f%3B/content", PathError::ForbiddenEscape(b';')),
        ("/v1\\admin", PathError::ForbiddenByte(b'\\')),
        ("/v1/models;x=1", PathError::ForbiddenByte(b';')),
        ("/v1/a b", PathError::ForbiddenByte(b' ')),
        ("/v1/caf\u{e9}", PathError::ForbiddenByte(0xc3)),
        ("/v1/a%", PathError::BadEscape),
        ("/v1/a%2", PathError::BadEscape),
        ("/v1/a%zz", PathError::BadEscape),
        ("/v1/%c0%ae%c0%ae", PathError::NotUtf8),
        ("/v1/%ff", PathError::NotUtf8),
        // Round 45: fullwidth `．．／` and the two-dot leader `‥／` went
        // upstream, which NFKC and dot resolution turn into `../`.
        (
            "/v1/a/%EF%BC%8E%EF%BC%8E%EF%BC%8Fok",
            PathError::Lookalike('\u{ff0f}', b'/'),
        ),
        ("/v1/a/%EF%BC%8E%EF%BC%8E/ok", PathError::ReadsAsDotOrEmpty),
        ("/v1/a/.%EF%BC%8E/ok", PathError::ReadsAsDotOrEmpty),
        ("/v1/a/%E2%80%A5", PathError::ReadsAsDotOrEmpty),
        ("/v1/%EF%B9%92/a", PathError::ReadsAsDotOrEmpty),
        // Round 47: spaces around, or invisible characters in, a dot
        // segment.
        ("/v1/..%20/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/%20../a", PathError::ReadsAsDotOrEmpty),
        ("/v1/..%C2%A0/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/..%E3%80%80/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/.%C2%AD./a", PathError::ReadsAsDotOrEmpty),
        ("/v1/..%E2%80%8B/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/.%EF%B8%8F./a", PathError::ReadsAsDotOrEmpty),
        // Nothing but what such a server drops or trims: an empty segment.
        ("/v1/%C2%AD/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/%20/a", PathError::ReadsAsDotOrEmpty),
        ("/v1/a/%EF%B8%8F", PathError::ReadsAsDotOrEmpty),
        // The Arabic percent sign: `%` to a best-fit code page.
        (
            "/v1/files/%D9%AA2e%D9%AA2e",
            PathError::Lookalike('\u{66a}', b'%'),
        ),
        ("/v1/a%EF%BC%8Fb", PathError::Lookalike('\u{ff0f}', b'/')),
        ("/v1/a%ef%bc%bcb", PathError::Lookalike('\u{ff3c}', b'\\')),
        // Japanese and Korean code pages' backslash.
        ("/v1/a%C2%A5b", PathError::Lookalike('\u{a5}', b'\\')),
        ("/v1/a%E2%82%A9b", PathError::Lookalike('\u{20a9}', b'\\')),
        ("/v1/a%EF%BF%A5b", PathError::Lookalike('\u{ffe5}', b'\\')),
        // NFKC, then best-fit: `1⁄`.
        ("/v1/x%E2%85%9Fy", PathError::Lookalike('\u{215f}', b'/')),
        ("/v1/a%CD%BE", PathError::Lookalike('\u{37e}', b';')),
        ("/v1/a%EF%BC%9F", PathError::Lookalike('\u{ff1f}', b'?')),
        ("/v1/a%EF%BC%83", PathError::Lookalike('\u{ff03}', b'#')),
        ("/v1/a%EF%BC%85", PathError::Lookalike('\u{ff05}', b'%')),
        ("/v1/a%E2%88%95b", PathError::Lookalike('\u{2215}', b'/')),
        ("/v1/a%E2%81%84b", PathError::Lookalike('\u{2044}', b'/')),
        ("/v1/a%E2%88%96b", PathError::Lookalike('\u{2216}', b'\\')),
    ];
    for (path, expected) in cases {
        assert_eq!(
            validate(path).map(ValidPath::as_str),
            Err(*expected),
            "{path:?}"
        );
    }
}

/// What a lenient upstream might do to a path: percent-decode it (once or
/// twice), normalise Unicode (NFKC, or a best-fit mapping of slash
/// look-alikes), turn backslashes into slashes, and resolve dot segments.
fn lenient_interpretations(path: &str) -> Vec<String> {
    use unicode_normalization::UnicodeNormalization;
    let once = String::from_utf8_lossy(&percent_decode(path.as_bytes())).into_owned();
    let twice = String::from_utf8_lossy(&percent_decode(once.as_bytes())).into_owned();
    let normalised = once.nfkc().collect::<String>();
    let best_fit = normalised.chars().map(best_fit_char).collect::<String>();
    // Invisible characters dropped and each segment's spaces trimmed.
    let folded = once.split('/').map(folded).collect::<Vec<_>>().join("/");
    let mut out = Vec::new();
    for p in [path.to_owned(), once, twice, normalised, best_fit, folded] {
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
        path in "(/([a-zA-Z0-9._~-]|%[0-9a-fA-F]{2}|[\\\\;:@%/.]|%EF%BC%8[EF]|%E2%80%A[45]|%E2%88%9[56]|%EF%B9%92|%C3%A9|%20|%C2%AD|%E2%80%8B|%D9%AA){0,8}){1,6}"
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

    /// No accepted path decodes to one holding `?`, `#` or `;`: a server
    /// that decodes before it splits off the query, the fragment or
    /// parameters would see a shorter path than the scope matched.
    #[test]
    fn accepted_paths_decode_to_no_query_fragment_or_parameters(
        path in "(/([a-zA-Z0-9._~-]|%[0-9a-fA-F]{2}|%3[fFbB]|%23|%25|[;:@%/.?#]){0,8}){1,6}"
    ) {
        if validate(&path).is_ok() {
            for seen in lenient_interpretations(&path) {
                prop_assert!(!seen.contains(['?', '#', ';']), "{} became {}", path, seen);
            }
        }
    }
}

/// Segments a path pattern is made of, and a request path built to match it
/// (or nearly), from a small alphabet full of lookalikes: escapes of
/// letters, of dots and slashes, backslashes, `;`, `..`.
fn tricky_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1".to_owned()),
        Just("models".to_owned()),
        Just("%6dodels".to_owned()),
        Just("%41".to_owned()),
        Just("A".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("%2E.".to_owned()),
        Just("a%2fb".to_owned()),
        Just("a%5cb".to_owned()),
        Just("a\\b".to_owned()),
        Just("x;y".to_owned()),
        Just("%252e".to_owned()),
        Just("caf%C3%A9".to_owned()),
        Just("%c0%ae".to_owned()),
        Just(String::new()),
        "[a-z0-9._~-]{1,4}",
        "(%[0-9a-fA-F]{2}){1,2}",
    ]
}

/// A pattern segment: a literal, or `*`.
fn pattern_segment() -> impl Strategy<Value = String> {
    prop_oneof![3 => tricky_segment(), 1 => Just("*".to_owned())]
}

/// A segment as it finally reads: percent-decoded until nothing changes.
fn fully_decoded(segment: &str) -> String {
    let mut text = segment.to_owned();
    for _ in 0..3 {
        let next = String::from_utf8_lossy(&percent_decode(text.as_bytes())).into_owned();
        if next == text {
            break;
        }
        text = next;
    }
    text
}

/// Matches `path` (as a provider may see it) against `pattern`, comparing
/// what each segment finally reads as.
/// `segment` as a server normalising Unicode reads it: NFKC, best-fit,
/// invisible characters dropped, spaces trimmed.
fn folded(segment: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    segment
        .nfkc()
        .map(best_fit_char)
        .filter(|&c| !is_ignorable(c))
        .collect::<String>()
        .trim()
        .to_owned()
}

/// What a best-fit code page makes of `c` (the look-alikes it turns into a
/// delimiter).
fn best_fit_char(c: char) -> char {
    match c {
        '\u{2044}' | '\u{2215}' | '\u{29f8}' => '/',
        '\u{a5}' | '\u{20a9}' | '\u{2216}' | '\u{29f9}' => '\\',
        '\u{66a}' => '%',
        c => c,
    }
}

fn decoded_match(pattern: &str, path: &str) -> bool {
    let (body, any_rest) = match pattern.strip_suffix("/**") {
        Some(body) => (body, true),
        None if pattern == "/**" => ("", true),
        None => (pattern, false),
    };
    // Pattern segments are never empty (the parser refuses `//`).
    let wanted: Vec<&str> = match body.strip_prefix('/').unwrap_or(body) {
        "" => Vec::new(),
        segments => segments.split('/').collect(),
    };
    let rest = path.strip_prefix('/').unwrap_or(path);
    let seen: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').collect()
    };
    if seen.len() < wanted.len() || (!any_rest && seen.len() != wanted.len()) {
        return false;
    }
    wanted.iter().zip(&seen).all(|(want, got)| {
        if *want == "*" {
            !got.is_empty()
        } else {
            // A provider reads the pattern's segment as it reads the
            // path's: compared as both read once normalised.
            folded(&fully_decoded(want)) == folded(&fully_decoded(got))
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// No path that passes `validate` and matches a scope pattern can, under
    /// any decoding a provider might apply (percent-decoding once or twice,
    /// backslashes as slashes, dot segments resolved), name a path outside
    /// that pattern: what the provider serves is what the scope granted.
    #[test]
    fn accepted_paths_cannot_leave_their_scope_after_decoding(
        pattern_segments in proptest::collection::vec(pattern_segment(), 0..4),
        any_rest in any::<bool>(),
        fill in proptest::collection::vec(tricky_segment(), 0..4),
        tail in proptest::collection::vec(tricky_segment(), 0..3),
        mutate in proptest::option::of((0usize..4, tricky_segment())),
    ) {
        let mut pattern = format!("/{}", pattern_segments.join("/"));
        if any_rest {
            pattern = if pattern == "/" { "/**".to_owned() } else { format!("{pattern}/**") };
        }
        let Ok(parsed) = pattern.parse::<crate::rule::PathPattern>() else {
            return Ok(());
        };
        // A path built to match the pattern, then possibly spoiled.
        let mut fill = fill.into_iter();
        let mut segments: Vec<String> = pattern_segments
            .iter()
            .map(|s| if s == "*" { fill.next().unwrap_or_else(|| "x".to_owned()) } else { s.clone() })
            .collect();
        if any_rest {
            segments.extend(tail);
        }
        if let Some((at, segment)) = mutate {
            if at < segments.len() {
                segments[at] = segment;
            }
        }
        let path = format!("/{}", segments.join("/"));
        if validate(&path).is_ok() && parsed.matches(&path) {
            for seen in lenient_interpretations(&path) {
                prop_assert!(
                    decoded_match(&pattern, &seen),
                    "{} matched {} but a provider may read it as {}", path, pattern, seen
                );
            }
        }
    }
}

/// Errors name the character as a person reads it, not as a byte value.
#[test]
fn errors_name_the_character() {
    for (path, want) in [
        ("/v1/a b", "path contains a space"),
        ("/v1/a\tb", "path contains a tab"),
        ("/v1/a;b", "path contains ';'"),
        (
            "/v1/a?b",
            "path contains '?' (a query string is no part of a path)",
        ),
        (
            "/v1/caf\u{e9}",
            "path contains a non-ASCII byte (0xc3; percent-encode it)",
        ),
        ("/v1/a\u{1}", "path contains a control character (0x01)"),
        ("/v1%2fadmin", "path contains an encoded '/' (%2F)"),
        (
            "/a/%EF%BC%8E%EF%BC%8E",
            "path contains a segment that servers normalising Unicode or trimming spaces read \
             as '.', '..' or an empty segment",
        ),
        (
            "/a/%EF%BC%8F",
            "path contains an encoded '\u{ff0f}' (U+FF0F), which servers that normalise \
             Unicode read as '/'",
        ),
        (
            "/v1/a%0a",
            "path contains an encoded control character (%0A)",
        ),
    ] {
        let err = validate(path).unwrap_err().to_string();
        assert_eq!(err, want, "{path:?}");
    }
    assert_eq!(describe_char('\u{a0}'), "a no-break space (U+00A0)");
    assert_eq!(describe_char('\u{2003}'), "a whitespace character (U+2003)");
}

/// Every character, against what NFKC followed by a best-fit conversion of
/// slash look-alikes makes of it: `lookalike` names exactly those in which
/// such a server reads a character the path check refuses.
#[test]
fn lookalikes_are_exactly_what_nfkc_and_best_fit_read_as_delimiters() {
    use unicode_normalization::UnicodeNormalization;
    let best_fit = best_fit_char;
    let refused = |c: char| {
        u8::try_from(c).is_ok_and(|b| {
            matches!(b, b'/' | b'\\' | b'.' | b'%' | b'?' | b'#' | b';') || b < 0x20 || b == 0x7f
        })
    };
    let mut found = 0;
    for c in ('\u{80}'..=char::MAX).filter(|c| !c.is_ascii()) {
        let read: Vec<char> = std::iter::once(c)
            .nfkc()
            .map(best_fit)
            .filter(|&d| refused(d))
            .collect();
        let expected = read
            .iter()
            .find(|&&d| d != '.')
            .or(read.first())
            .map(|&d| (c, u8::try_from(d).unwrap()));
        assert_eq!(lookalike(c), expected, "U+{:04X}", u32::from(c));
        found += usize::from(expected.is_some());
    }
    // The fullwidth forms, the leaders, the yen sign, ...
    assert!(found > 50, "{found}");
}
