//! The request head an agent may send, and the headers that never go
//! upstream.
//!
//! Two jobs:
//!
//! - [`strip_hop_by_hop`]: headers meaningful for one connection only are
//!   never forwarded (nor any header the `Connection` header names).
//! - [`check_head`]: refuses heads that a lenient server behind airlock
//!   could read differently from how airlock checked them — method and path
//!   override headers, spoofed client-address headers, `Connection` naming a
//!   header airlock relies on, header names that normalise to such a header,
//!   ambiguous framing, absolute-form targets and foreign `Host`s. Each
//!   refusal is a 400 (413 for a body over the limit) naming the problem.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName};
use http::uri::Authority;
use http::{Method, Uri, Version};

use crate::error::{Denial, ErrorCode};
use crate::provider::AuthStyle;

/// Headers that are hop-by-hop by definition (RFC 9110 §7.6.1) or that airlock
/// owns on the upstream leg.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    // The settings of an `Upgrade: h2c` request (RFC 7540 §3.2.1), which
    // belong to that connection only.
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that ask a server to act as if the request had another method.
const METHOD_OVERRIDE: [&str; 6] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-http-verb",
    "x-method",
    "x-original-method",
];

/// Query parameters that frameworks read as a method override.
const METHOD_OVERRIDE_PARAMS: [&str; 4] = [
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers that some servers and frameworks use to route to another path or
/// host than the request line's.
const TARGET_OVERRIDE: [&str; 12] = [
    "x-original-url",
    "x-original-uri",
    "x-original-path",
    "x-original-host",
    "x-rewrite-url",
    "x-override-url",
    "x-host",
    "x-http-host-override",
    "x-real-host",
    "x-backend-host",
    "x-envoy-original-path",
    "x-envoy-original-host",
];

/// Default [`RequestPolicy::max_request_body`]: 2 GiB.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 2 * 1024 * 1024 * 1024;

/// What to do with `Forwarded`, `X-Forwarded-*` and similar client-address
/// headers an agent sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedPolicy {
    /// Refuse the call with 400 (the default: an agent talking to airlock
    /// directly has no reason to send them).
    #[default]
    Refuse,
    /// Remove them and forward the call (for airlock behind a load balancer
    /// that adds them).
    Strip,
}

/// Checks on the request head beyond the scope, set from `[proxy]`.
#[derive(Clone, Debug)]
pub struct RequestPolicy {
    /// Client-address headers: refuse or strip.
    pub forwarded: ForwardedPolicy,
    /// Host names (optionally `host:port`) the `Host` header (or HTTP/2
    /// `:authority`) may name, lower-case. Empty: any well-formed host
    /// (it is never used for routing and never forwarded).
    pub allowed_hosts: Vec<String>,
    /// Largest request body accepted, in bytes: a larger `Content-Length`
    /// is refused with 413 before anything is sent upstream.
    pub max_request_body: u64,
}

/// Set by the listener on a request whose raw head (or the start of its
/// body) held something the HTTP parser normalised away: a bare LF line
/// ending, `Content-Length` together with `Transfer-Encoding`, a repeated
/// `Content-Length`, a fragment in the target, broken chunked framing.
/// The call is refused and the connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramingAnomaly(pub &'static str);

impl FramingAnomaly {
    /// A head line longer than `proxy.max_header_size`, after which the
    /// listener cannot follow the connection: refused with 431, as hyper
    /// refuses such a head on a connection's first request.
    pub const HEAD_TOO_LARGE: Self = Self("the request head is larger than proxy.max_header_size");
}

// === impl ForwardedPolicy ===

impl std::str::FromStr for ForwardedPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "strip" => Ok(Self::Strip),
            other => Err(format!("{other:?} must be \"refuse\" or \"strip\"")),
        }
    }
}

// === impl RequestPolicy ===

impl Default for RequestPolicy {
    fn default() -> Self {
        Self {
            forwarded: ForwardedPolicy::Refuse,
            allowed_hosts: Vec::new(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
        }
    }
}

/// Removes hop-by-hop headers, including every header the `Connection`
/// header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads carry none of them (nor `Connection`, which names the
    // rest): one pass over the names a head has is cheaper than a lookup
    // for every hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The coding of a provider's answer that the leak guard cannot see
/// through: a `Content-Encoding` other than `identity` (`gzip`, `br`, …),
/// or a `Transfer-Encoding` other than `chunked` (hyper undoes chunked
/// framing only). `None` for a body sent as it is. airlock asks every
/// provider for `Accept-Encoding: identity`; an answer encoded all the same
/// is refused, as the credential could pass through it unseen.
pub fn opaque_coding(headers: &HeaderMap) -> Option<&'static str> {
    // One pass over the few headers of an answer: cheaper than two hashed
    // lookups for headers that are nearly always absent.
    let values = headers
        .iter()
        .filter(|(name, _)| {
            **name == header::CONTENT_ENCODING || **name == header::TRANSFER_ENCODING
        })
        .map(|(_, value)| value);
    for value in values {
        let Ok(text) = value.to_str() else {
            return Some("unreadable");
        };
        for coding in text.split(',').map(str::trim) {
            if coding.is_empty()
                || coding.eq_ignore_ascii_case("identity")
                || coding.eq_ignore_ascii_case("chunked")
            {
                continue;
            }
            // Named from a fixed list: the provider's text is not echoed.
            return Some(
                ["gzip", "x-gzip", "deflate", "br", "zstd", "compress"]
                    .into_iter()
                    .find(|known| coding.eq_ignore_ascii_case(known))
                    .unwrap_or("unknown"),
            );
        }
    }
    None
}

/// Removes client-address headers (`Forwarded`, `X-Forwarded-*`, ...) and
/// target-override headers (`X-Original-URL`, `X-Envoy-Original-Path`,
/// ...): with `forwarded_headers = "strip"` a load balancer in front may
/// add either (Envoy's path rewrites, Azure Application Gateway's host
/// override); otherwise [`check_head`] refused them.
pub fn strip_forwarded(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_forwarding(name.as_str()) || TARGET_OVERRIDE.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Whether `name` (lower-case) is a client-address / forwarding header.
fn is_forwarding(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "forwarded-for"
            | "x-forwarded"
            | "x-original-forwarded-for"
            | "x-real-ip"
            | "x-client-ip"
            | "client-ip"
            | "true-client-ip"
            | "x-cluster-client-ip"
            | "x-originating-ip"
            | "x-remote-ip"
            | "x-remote-addr"
            | "x-proxyuser-ip"
            | "x-azure-clientip"
            | "x-azure-socketip"
            | "x-appengine-user-ip"
            | "cf-connecting-ip"
            | "cf-connecting-ipv6"
            | "fastly-client-ip"
            | "x-envoy-external-address"
            | "x-envoy-internal"
    ) || name.starts_with("x-forwarded-")
}

/// Whether a header that airlock relies on is named `name` (lower-case):
/// those may not be listed in `Connection`, nor sent under a name that a
/// lenient server would normalise to them.
fn is_protected(name: &str, auth: &AuthStyle) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "host"
            | "content-length"
            | "transfer-encoding"
            | "cookie"
    ) || is_forwarding(name)
        || METHOD_OVERRIDE.contains(&name)
        || TARGET_OVERRIDE.contains(&name)
        || matches!(auth, AuthStyle::Header(h) if h.as_str() == name)
}

/// Most header lines in a request: hyper refuses more over HTTP/1.1 (431),
/// [`check_head`] over HTTP/2, which bounds only the head's size.
pub const MAX_HEADER_LINES: usize = 100;

/// Checks a request head before anything about it is forwarded. `auth` is
/// the provider's auth style.
pub fn check_head(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    anomaly: Option<&FramingAnomaly>,
    auth: &AuthStyle,
    policy: &RequestPolicy,
) -> Result<(), Denial> {
    if let Some(&FramingAnomaly::HEAD_TOO_LARGE) = anomaly {
        return Err(Denial::new(
            ErrorCode::HeadersTooLarge,
            FramingAnomaly::HEAD_TOO_LARGE.0,
        ));
    }
    if let Some(FramingAnomaly(what)) = anomaly {
        return Err(Denial::bad_request(format!(
            "ambiguous request framing: {what}"
        )));
    }
    if headers.len() > MAX_HEADER_LINES {
        return Err(Denial::new(
            ErrorCode::HeadersTooLarge,
            format!("the request has more than {MAX_HEADER_LINES} header lines"),
        ));
    }
    if *method == Method::CONNECT || *method == Method::TRACE {
        return Err(Denial::bad_request(format!(
            "method {method} is not supported"
        )));
    }
    check_target(uri, version, headers, policy)?;
    check_overrides(headers, uri.query(), policy)?;
    check_names(headers, auth, policy)?;
    check_connection(headers, auth)?;
    check_framing(headers, policy)
}

/// Origin-form only (HTTP/1), and a well-formed `Host` naming airlock.
fn check_target(
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    policy: &RequestPolicy,
) -> Result<(), Denial> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Denial::bad_request("more than one Host header"));
    }
    let host = host
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .filter(|a| !a.as_str().as_bytes().contains(&b'@'))
                .ok_or_else(|| Denial::bad_request("the Host header is not a valid host[:port]"))
        })
        .transpose()?;
    let named = if version == Version::HTTP_2 || version == Version::HTTP_3 {
        // `:authority` arrives as the URI's authority; a Host header, if
        // any, must agree with it.
        match (uri.authority(), &host) {
            (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h.as_str()) => {
                return Err(Denial::bad_request(
                    "the Host header and :authority name different hosts",
                ));
            }
            (Some(a), _) => Some(a.clone()),
            (None, h) => h.clone(),
        }
    } else {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(Denial::bad_request(
                "absolute-form request targets are not accepted; send the path only",
            ));
        }
        if host.is_none() && version == Version::HTTP_11 {
            return Err(Denial::bad_request(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        host
    };
    if policy.allowed_hosts.is_empty() {
        return Ok(());
    }
    let allowed = named.as_ref().is_some_and(|a| {
        let full = a.as_str().to_ascii_lowercase();
        let bare = a.host().trim_end_matches('.').to_ascii_lowercase();
        policy
            .allowed_hosts
            .iter()
            .any(|h| *h == full || *h == bare)
    });
    if allowed {
        Ok(())
    } else {
        Err(Denial::bad_request(
            "the Host header does not name this proxy (proxy.allowed_hosts)",
        ))
    }
}

/// Method and target override headers (the latter stripped instead with
/// [`ForwardedPolicy::Strip`]) and query parameters; a query with a byte
/// outside visible ASCII.
fn check_overrides(
    headers: &HeaderMap,
    query: Option<&str>,
    policy: &RequestPolicy,
) -> Result<(), Denial> {
    // HTTP/1.1's parser refuses such a target; an HTTP/2 `:path` may carry
    // one (round 41: raw UTF-8 in the query went upstream as it came),
    // which servers then decode each their own way.
    if let Some(byte) = query.and_then(|q| q.bytes().find(|b| !b.is_ascii_graphic())) {
        return Err(Denial::bad_request(format!(
            "the query holds a byte outside visible ASCII ({byte:#04x}); percent-encode it"
        )));
    }
    // One pass over the names the head has: cheaper than a lookup for each
    // listed name, which parses and hashes that name every time.
    for name in headers.keys() {
        let name = name.as_str();
        if METHOD_OVERRIDE.contains(&name) {
            return Err(Denial::bad_request(format!(
                "method override headers are not accepted ({name}); send the method itself"
            )));
        }
        if policy.forwarded == ForwardedPolicy::Refuse && TARGET_OVERRIDE.contains(&name) {
            return Err(Denial::bad_request(format!(
                "target override headers are not accepted ({name})"
            )));
        }
    }
    for key in loose_query_keys(query) {
        let read = loosely_read(key);
        if let Some(param) = METHOD_OVERRIDE_PARAMS.iter().find(|p| same_name(&read, p)) {
            return Err(Denial::bad_request(format!(
                "method override parameters are not accepted ({param})"
            )));
        }
    }
    Ok(())
}

/// Whether `read` (a name as [`loosely_read`] gives it) is `name` in any
/// case, Unicode's included: a server comparing names without regard to
/// case may upper-case the dotless `ı` to `I` or the long `ſ` to `S`.
pub(crate) fn same_name(read: &str, name: &str) -> bool {
    if read.is_ascii() {
        return read.eq_ignore_ascii_case(name);
    }
    let upper = |s: &str| s.chars().flat_map(char::to_uppercase).collect::<String>();
    let lower = |s: &str| s.chars().flat_map(char::to_lowercase).collect::<String>();
    upper(read) == upper(name) || lower(read) == lower(name)
}

/// The query's parameter names as lenient servers split it: at `&` and at
/// `;` (older frameworks take both as separators), as sent.
pub(crate) fn loose_query_keys(query: Option<&str>) -> impl Iterator<Item = &str> {
    query
        .unwrap_or("")
        .split(['&', ';'])
        .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
}

/// The parameter name `key` (as sent) as a lenient server may read it:
/// `+` as a space, percent-decoded, Unicode normalised (NFKC: a
/// fullwidth `＿ｍｅｔｈｏｄ` reads as `_method`), without surrounding
/// whitespace or control characters, and without what follows a `[`
/// (`key[]`, `key[0]`, `key[a][b]`: PHP, Rails and Node's `qs` read each
/// as a parameter `key`); compared with a name in any case. Borrowed when
/// there is nothing to undo.
pub(crate) fn loosely_read(key: &str) -> Cow<'_, str> {
    if !key.contains(['+', '%', '[', ' ', '\t']) {
        return Cow::Borrowed(key);
    }
    let spaced = key.replace('+', " ");
    let mut decoded = percent_encoding::percent_decode_str(&spaced).decode_utf8_lossy();
    if !decoded.is_ascii() {
        decoded =
            Cow::Owned(unicode_normalization::UnicodeNormalization::nfkc(&*decoded).collect());
    }
    // Whitespace and control characters (`_method%00`) around it too.
    let ignored = |c: char| c.is_whitespace() || c.is_control();
    let trimmed = decoded.trim_matches(ignored);
    let bare = match trimmed.find('[') {
        Some(at) if at > 0 => trimmed[..at].trim_matches(ignored),
        _ => trimmed,
    };
    Cow::Owned(bare.to_owned())
}

/// Client-address headers (per policy) and names that a lenient server
/// would normalise into a header airlock relies on (`X_Forwarded_For`,
/// `x_api_key`).
fn check_names(
    headers: &HeaderMap,
    auth: &AuthStyle,
    policy: &RequestPolicy,
) -> Result<(), Denial> {
    for name in headers.keys() {
        let name = name.as_str();
        if policy.forwarded == ForwardedPolicy::Refuse && is_forwarding(name) {
            return Err(Denial::bad_request(format!(
                "client-address headers are not accepted from agents ({name})"
            )));
        }
        if name.as_bytes().contains(&b'_') && is_protected(&name.replace('_', "-"), auth) {
            return Err(Denial::bad_request(format!(
                "header name {name} is ambiguous: servers may read it as {}",
                name.replace('_', "-")
            )));
        }
    }
    Ok(())
}

/// `Connection` may only list `close`, `keep-alive` and headers airlock
/// does not rely on.
fn check_connection(headers: &HeaderMap, auth: &AuthStyle) -> Result<(), Denial> {
    for value in headers.get_all(header::CONNECTION) {
        let value = value
            .to_str()
            .map_err(|_| Denial::bad_request("the Connection header is not visible ASCII"))?;
        for token in value.split(',') {
            let token = token.trim().to_ascii_lowercase();
            if is_protected(&token, auth) {
                return Err(Denial::bad_request(format!(
                    "the Connection header must not name {token}"
                )));
            }
        }
    }
    Ok(())
}

/// One `Transfer-Encoding: chunked` at most, one valid `Content-Length` at
/// most, and never both; the length within the limit.
fn check_framing(headers: &HeaderMap, policy: &RequestPolicy) -> Result<(), Denial> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(value) = te.next() {
        let chunked = value
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || te.next().is_some() {
            return Err(Denial::bad_request(
                "Transfer-Encoding must be exactly \"chunked\"",
            ));
        }
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(Denial::bad_request(
                "Content-Length and Transfer-Encoding must not both be sent",
            ));
        }
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(value) = lengths.next() else {
        return Ok(());
    };
    if lengths.next().is_some() {
        return Err(Denial::bad_request("more than one Content-Length header"));
    }
    let digits = value.as_bytes();
    let length =
        (!digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| Denial::bad_request("Content-Length is not a number"))?;
    if length > policy.max_request_body {
        return Err(Denial::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body ({length} bytes) is larger than proxy.max_request_body ({} bytes)",
                policy.max_request_body
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
