//! Strict validation of request paths.
//!
//! The scope check and the upstream request use the same bytes, so a path is
//! accepted only when no decoding a server might apply could turn it into a
//! different path. Anything ambiguous is refused, never normalised:
//!
//! - it must start with `/` and hold only unreserved characters, sub-delims
//!   other than `;`, `:`, `@`, `/` and percent escapes;
//! - no empty segment (`//`) except a single trailing slash, no `.` or `..`
//!   segment;
//! - a percent escape must be two hex digits and must not decode to `/`, `\`,
//!   `.`, `%`, `?`, `#`, `;` (a server that decodes before it splits off the
//!   query, fragment or parameters would cut the path there), NUL or another
//!   control character; the decoded bytes of every segment must be valid
//!   UTF-8 (which rules out overlong encodings), and no character they
//!   decode to may stand for one of those but `.` under Unicode's
//!   compatibility mapping (NFKC: the fullwidth `／` and `？`) or under a
//!   known best-fit mapping to a code page (the division slash `∕`, the yen
//!   sign `¥` of Japanese code pages, the Arabic percent sign), nor may a segment read as `.`
//!   or `..` or nothing under NFKC with invisible characters dropped and
//!   spaces trimmed (`．．`, the leader `‥`, `..%20`, `.%C2%AD.`, `%C2%AD`): a server that
//!   normalises after decoding would read `．．／` as `../`. Other
//!   look-alikes of `.` are left alone (`notes…` reads as `notes...`,
//!   which changes nothing).

use std::fmt;

/// Why a path was refused. The text is safe to show to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A byte outside the allowed set (backslash, `;`, space, non-ASCII, ...).
    ForbiddenByte(u8),
    /// `%` not followed by two hex digits.
    BadEscape,
    /// An escape decoding to `/`, `\`, `.`, `%`, `?`, `#`, `;` or a control
    /// character.
    ForbiddenEscape(u8),
    /// A `.` or `..` segment.
    DotSegment,
    /// An empty segment (`//`).
    EmptySegment,
    /// A segment whose decoded bytes are not UTF-8.
    NotUtf8,
    /// An escape decoding to a character that a server normalising
    /// Unicode may read as a character [`PathError::ForbiddenEscape`]
    /// refuses (the character, and that one).
    Lookalike(char, u8),
    /// A segment with escapes that a server normalising Unicode (or
    /// trimming spaces) reads as `.`, `..` or nothing.
    ReadsAsDotOrEmpty,
}

/// A request path that [`validate`] accepted. Only `validate` makes one, so
/// what takes a `ValidPath` (the scope's check on the request path) needs
/// no second look at it:
///
/// ```compile_fail,E0423
/// // The field is private: a path cannot be declared valid from outside.
/// let forged = airlock_core::path::ValidPath("/a/../b");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidPath<'a>(&'a str);

impl<'a> ValidPath<'a> {
    /// The path, unchanged.
    pub fn as_str(self) -> &'a str {
        self.0
    }
}

/// Checks that `path` (the path part of a request target, without the query)
/// is unambiguous. Returns it, unchanged, when it is.
pub fn validate(path: &str) -> Result<ValidPath<'_>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let body = &path[1..];
    // Byte by byte: `/` is ASCII, so every index found is a char boundary.
    let mut start = 0;
    for (i, b) in body.bytes().enumerate() {
        if b == b'/' {
            validate_segment(&body[start..i], false)?;
            start = i + 1;
        }
    }
    validate_segment(&body[start..], true)?;
    Ok(ValidPath(path))
}

/// Checks one segment (no `/` inside). `is_last` allows the empty trailing
/// segment of a path ending in `/` (and the bare root `/`).
pub(crate) fn validate_segment(segment: &str, is_last: bool) -> Result<(), PathError> {
    if segment.is_empty() {
        return if is_last {
            Ok(())
        } else {
            Err(PathError::EmptySegment)
        };
    }
    if segment == "." || segment == ".." {
        return Err(PathError::DotSegment);
    }
    let bytes = segment.as_bytes();
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let decoded = decode_escape(bytes.get(i + 1..i + 3)).ok_or(PathError::BadEscape)?;
            if is_forbidden_decoded(decoded) {
                return Err(PathError::ForbiddenEscape(decoded));
            }
            escaped = true;
            i += 3;
            continue;
        }
        if !is_allowed_byte(b) {
            return Err(PathError::ForbiddenByte(b));
        }
        i += 1;
    }
    if escaped {
        let decoded = percent_decode(bytes);
        let text = std::str::from_utf8(&decoded).map_err(|_| PathError::NotUtf8)?;
        let mut dots = text.contains('.');
        for (c, read_as) in text.chars().filter_map(lookalike) {
            if read_as != b'.' {
                return Err(PathError::Lookalike(c, read_as));
            }
            dots = true;
        }
        // A look-alike of `.`, an escaped space or an invisible character
        // matters only where the segment reads as a dot segment, or as an
        // empty one.
        if (dots || !text.bytes().all(|b| b.is_ascii_graphic())) && reads_as_dot_or_empty(text) {
            return Err(PathError::ReadsAsDotOrEmpty);
        }
    }
    Ok(())
}

/// Whether a server that normalises `segment` (decoded) — NFKC, invisible
/// characters dropped ([`is_ignorable`]), spaces trimmed from its ends (as
/// Windows trims them) — reads it as `.`, `..` or nothing.
fn reads_as_dot_or_empty(segment: &str) -> bool {
    use unicode_normalization::UnicodeNormalization;
    let read: String = segment.nfkc().filter(|&c| !is_ignorable(c)).collect();
    matches!(read.trim(), "" | "." | "..")
}

/// Unicode's default-ignorable characters, which NFKC with case folding
/// (IDNA, ICU's `nfkc_cf`) removes: format characters (the soft hyphen,
/// zero-width spaces and joiners, tags), variation selectors, the
/// combining grapheme joiner, Hangul fillers, Mongolian selectors.
pub(crate) fn is_ignorable(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.general_category() == GeneralCategory::Format
        || matches!(
            c,
            '\u{34f}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{17b4}'
                | '\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{ffa0}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// Whether `b`, decoded from an escape, would end or split the path for a
/// server that decodes before it parses (or is a control character).
fn is_forbidden_decoded(b: u8) -> bool {
    matches!(b, b'/' | b'\\' | b'.' | b'%' | b'?' | b'#' | b';') || b < 0x20 || b == 0x7f
}

/// Look-alikes that no compatibility mapping touches but that best-fit
/// conversions to a code page (Windows' `WideCharToMultiByte`, which
/// IIS-style servers apply) turn into `/`, `\` or `%`: the yen and won
/// signs are the backslash of Japanese and Korean code pages.
const BEST_FIT: [(char, u8); 8] = [
    ('\u{066a}', b'%'),  // Arabic percent sign
    ('\u{2044}', b'/'),  // fraction slash
    ('\u{2215}', b'/'),  // division slash
    ('\u{29f8}', b'/'),  // big solidus
    ('\u{00a5}', b'\\'), // yen sign
    ('\u{20a9}', b'\\'), // won sign
    ('\u{2216}', b'\\'), // set minus
    ('\u{29f9}', b'\\'), // big reverse solidus
];

/// The ASCII character [`is_forbidden_decoded`] refuses that `d` is, or
/// that a best-fit conversion turns it into.
fn read_as(d: char) -> Option<u8> {
    match u8::try_from(d) {
        Ok(b) if b.is_ascii() => is_forbidden_decoded(b).then_some(b),
        _ => BEST_FIT.iter().find(|(fit, _)| *fit == d).map(|&(_, b)| b),
    }
}

/// `c` and the ASCII character [`is_forbidden_decoded`] refuses that a
/// server normalising Unicode (NFKC, then perhaps a best-fit conversion)
/// may read in it, if any; any other than `.` first (ASCII itself is
/// checked byte by byte).
pub(crate) fn lookalike(c: char) -> Option<(char, u8)> {
    if c.is_ascii() {
        return None;
    }
    let mut found = read_as(c);
    // NFKC composes nothing into these ASCII characters: the compatibility
    // decomposition holds every one NFKC yields.
    unicode_normalization::char::decompose_compatible(c, |d| {
        if let Some(b) = read_as(d) {
            if found.is_none_or(|seen| seen == b'.') {
                found = Some(b);
            }
        }
    });
    found.map(|b| (c, b))
}

/// Unreserved, sub-delims without `;`, `:` and `@`.
fn is_allowed_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// The byte an escape's two hex digits stand for (`None` when they are not
/// two hex digits).
pub(crate) fn decode_escape(hex: Option<&[u8]>) -> Option<u8> {
    let hex = hex?;
    let hi = char::from(hex[0]).to_digit(16)?;
    let lo = char::from(hex[1]).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

/// Decodes the valid escapes of `bytes`; a `%` not followed by two hex
/// digits stays as it is.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = decode_escape(bytes.get(i + 1..i + 3)) {
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

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("path must start with '/'"),
            Self::ForbiddenByte(b) => write!(f, "path contains {}", describe_byte(*b)),
            Self::BadEscape => f.write_str("path contains a malformed percent escape"),
            Self::ForbiddenEscape(b) if b.is_ascii_graphic() => {
                write!(
                    f,
                    "path contains an encoded '{}' (%{b:02X})",
                    char::from(*b)
                )
            }
            Self::ForbiddenEscape(b) => {
                write!(f, "path contains an encoded control character (%{b:02X})")
            }
            Self::DotSegment => f.write_str("path contains a '.' or '..' segment"),
            Self::EmptySegment => f.write_str("path contains an empty segment ('//')"),
            Self::NotUtf8 => f.write_str("path does not decode to UTF-8"),
            Self::ReadsAsDotOrEmpty => f.write_str(
                "path contains a segment that servers normalising Unicode or trimming spaces \
                 read as '.', '..' or an empty segment",
            ),
            Self::Lookalike(c, read_as) => write!(
                f,
                "path contains an encoded {}, which servers that normalise Unicode read as '{}'",
                describe_char(*c),
                char::from(*read_as)
            ),
        }
    }
}

impl std::error::Error for PathError {}

/// A byte named the way a person reads it: `a space`, `a tab`, `'?'`,
/// `a control character (0x01)`, `a non-ASCII byte (0xc3)`.
pub fn describe_byte(b: u8) -> String {
    match b {
        b' ' => "a space".to_owned(),
        b'\t' => "a tab".to_owned(),
        b'\n' => "a newline".to_owned(),
        b'\r' => "a carriage return".to_owned(),
        0..=0x1f | 0x7f => format!("a control character (0x{b:02x})"),
        0x80.. => format!("a non-ASCII byte (0x{b:02x}; percent-encode it)"),
        b'?' => "'?' (a query string is no part of a path)".to_owned(),
        _ => format!("'{}'", char::from(b)),
    }
}

/// A character named the way a person reads it, as [`describe_byte`]
/// names an ASCII one (`a space`, `a no-break space (U+00A0)`).
pub fn describe_char(c: char) -> String {
    match u8::try_from(c) {
        Ok(b) if b.is_ascii() => describe_byte(b),
        _ if c == '\u{a0}' => "a no-break space (U+00A0)".to_owned(),
        _ if c.is_whitespace() => format!("a whitespace character (U+{:04X})", u32::from(c)),
        _ => format!("'{c}' (U+{:04X})", u32::from(c)),
    }
}

#[cfg(test)]
mod tests;
