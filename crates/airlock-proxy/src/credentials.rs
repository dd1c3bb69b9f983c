//! The token an agent presents, and the real credential that replaces it.
//!
//! Agents put their session token where their SDK puts an API key:
//! `Authorization: Bearer`, or the header / query parameter the provider's
//! auth style names. All of those places are read; if they disagree the call
//! is refused. Before forwarding, every one of them is emptied and the real
//! credential is put where the provider expects it.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::Request;
use percent_encoding::percent_decode_str;

use crate::error::Denial;
use crate::headers::{
    check_head, loose_query_keys, loosely_read, same_name, FramingAnomaly, RequestPolicy,
};
use crate::provider::{AuthStyle, PreparedCredential, Provider};

/// Finds the session token in the request. `Ok(None)` when none was given.
pub fn find_token<'a>(
    auth: &AuthStyle,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, Denial> {
    let mut found: Option<&'a str> = None;
    let mut offer = |candidate: &'a str| match found {
        Some(previous) if previous != candidate => Err(two_credentials()),
        _ => {
            found = Some(candidate);
            Ok(())
        }
    };

    if let Some(value) = single_header(headers, &header::AUTHORIZATION)? {
        if let Some(token) = strip_bearer(value) {
            offer(token)?;
        }
    }
    match auth {
        AuthStyle::Bearer => {}
        AuthStyle::Header(name) => {
            if let Some(value) = single_header(headers, name)? {
                offer(value.trim())?;
            }
        }
        AuthStyle::Query(name) => {
            for (key, value) in query_pairs(query) {
                if key == name {
                    offer(value)?;
                }
            }
        }
    }
    Ok(found)
}

/// Finds the session token of a call under no configured provider: in
/// `Authorization: Bearer` and in every place one of `styles` reads a
/// token from, taken in the order given (so that of two problems the same
/// one is named every time). Two different tokens are refused as under a
/// provider.
pub fn find_token_in_any<'a, 's>(
    styles: impl IntoIterator<Item = &'s AuthStyle>,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, Denial> {
    let mut found = find_token(&AuthStyle::Bearer, headers, query)?;
    for style in styles {
        match (found, find_token(style, headers, query)?) {
            (Some(previous), Some(token)) if previous != token => return Err(two_credentials()),
            (None, token) => found = token,
            _ => {}
        }
    }
    Ok(found)
}

fn two_credentials() -> Denial {
    Denial::bad_request("the request carries two different credentials")
}

/// Every well-formed session token anywhere in `req`'s head (header values,
/// query values): for a call refused before its token was found or known,
/// whose record must not hold any of them.
pub fn presented_tokens<B>(req: &Request<B>) -> Vec<&str> {
    let words = req
        .headers()
        .values()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split([' ', '\t', ',', ';', '=']));
    let query = query_pairs(req.uri().query()).map(|(_, value)| value);
    words
        .chain(query)
        .filter(|word| airlock_core::token::is_well_formed(word))
        .collect()
}

/// The value of a header that may appear at most once.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, Denial> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Denial::bad_request(format!("more than one {name} header")));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| Denial::bad_request(format!("the {name} header is not visible ASCII")))
}

/// The token of an `Authorization: Bearer` credential, or of GitHub's
/// `Authorization: token` (what its clients send). Header values reach here
/// through `HeaderValue::to_str` (visible ASCII, spaces and tabs), so ASCII
/// whitespace is all there is to trim.
fn strip_bearer(value: &str) -> Option<&str> {
    let value = value.trim_ascii();
    let space = value.bytes().position(|b| b == b' ')?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then(|| token.trim_ascii())
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// The agent's query as it sent it, byte for byte, with `pair` (the real
/// credential) where the parameter `name` (its token) first was and any
/// repeat of it left out; at the end when the token came in a header.
fn query_with_credential(query: Option<&str>, name: &str, pair: &str) -> String {
    let mut rebuilt = String::with_capacity(query.map_or(0, str::len) + pair.len() + 1);
    let mut placed = false;
    let mut first = true;
    let segments = query
        .filter(|q| !q.is_empty())
        .into_iter()
        .flat_map(|q| q.split('&'));
    for segment in segments {
        let key = segment.split_once('=').map_or(segment, |(key, _)| key);
        let kept = if key != name {
            segment
        } else if !placed {
            placed = true;
            pair
        } else {
            continue;
        };
        // Empty segments (`a&&b`) are kept as sent, too.
        if !first {
            rebuilt.push('&');
        }
        first = false;
        rebuilt.push_str(kept);
    }
    if !placed {
        if !first {
            rebuilt.push('&');
        }
        rebuilt.push_str(pair);
    }
    rebuilt
}

/// What [`screen`] checks of a call under no configured provider (nothing
/// of it is forwarded): the head as under a provider that takes its token
/// in `Authorization: Bearer`.
pub fn screen_unrouted<B>(req: &Request<B>, policy: &RequestPolicy) -> Result<(), Denial> {
    check_request_head(req, &AuthStyle::Bearer, policy)
}

fn check_request_head<B>(
    req: &Request<B>,
    auth: &AuthStyle,
    policy: &RequestPolicy,
) -> Result<(), Denial> {
    check_head(
        req.method(),
        req.uri(),
        req.version(),
        req.headers(),
        req.extensions().get::<FramingAnomaly>(),
        auth,
        policy,
    )
}

/// Everything about an authenticated call's head that is checked before its
/// path and scope: the head itself ([`check_head`]: framing, overrides,
/// client-address headers, `Connection`, `Host`, body size) and that the
/// session token appears nowhere but where it is read as the credential
/// (another header, the path, the query string), where it would be
/// forwarded to the provider. `token` is what [`find_token`] found in this
/// request (the proxy looks once, before authenticating).
pub fn screen<B>(
    req: &Request<B>,
    provider: &Provider,
    policy: &RequestPolicy,
    token: Option<&str>,
) -> Result<(), Denial> {
    let auth = provider.auth();
    check_request_head(req, auth, policy)?;
    check_query_auth(auth, req.uri().query())?;
    if let Some(token) = token {
        check_token_not_elsewhere(
            token,
            auth,
            req.headers(),
            req.uri().path(),
            req.uri().query(),
        )?;
    }
    Ok(())
}

/// With a query-style provider, a parameter that a lenient server could
/// read as the credential parameter but that is not exactly it (`k%65y=`,
/// `KEY=`, `key[]=`, or `key=` after a `;`) would reach the provider next
/// to the real credential: refused. (The exact name, `&`-separated, is where
/// the token is read from and what the credential replaces.)
fn check_query_auth(auth: &AuthStyle, query: Option<&str>) -> Result<(), Denial> {
    let AuthStyle::Query(name) = auth else {
        return Ok(());
    };
    let exact = query_pairs(query).filter(|(key, _)| key == name).count();
    let loose = loose_query_keys(query)
        .filter(|key| same_name(&loosely_read(key), name))
        .count();
    if loose != exact {
        return Err(Denial::bad_request(format!(
            "the query parameter {name} is spelled ambiguously"
        )));
    }
    Ok(())
}

/// Texts shorter than this are searched for the token with Rabin-Karp,
/// whose worst case grows with text × needle (memchr's own cut-off).
const SHORT_TEXT: usize = 64;

/// Refuses the call when the session token (or its random part) appears
/// anywhere it would be forwarded: a header other than the one it was read
/// from, the path, or a query parameter other than the credential's.
fn check_token_not_elsewhere(
    token: &str,
    auth: &AuthStyle,
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Result<(), Denial> {
    // The random part is what makes a token; `sess_` alone is no secret.
    let needle = token
        .strip_prefix("sess_")
        .filter(|rest| rest.len() >= 16)
        .unwrap_or(token);
    if needle.len() < 8 {
        return Ok(());
    }
    // Short texts (most headers) are searched with one Rabin-Karp finder
    // made once per call, as `memmem::find` would make one per text;
    // longer ones with `memmem::find`, whose searcher is linear in the text
    // (Rabin-Karp's worst case is text × needle) but costs ~5,000
    // instructions to set up (callgrind), too much to make for every call.
    let short = memchr::arch::all::rabinkarp::Finder::new(needle.as_bytes());
    let holds = |text: &[u8]| {
        if text.len() < SHORT_TEXT {
            short.find(text, needle.as_bytes()).is_some()
        } else {
            memchr::memmem::find(text, needle.as_bytes()).is_some()
        }
    };
    // Without a `%`, the decoded text is the text itself.
    let decoded_holds = |text: &str| {
        holds(text.as_bytes())
            || (text.as_bytes().contains(&b'%')
                && holds(&percent_decode_str(text).collect::<Vec<u8>>()))
    };
    let leak = |place: String| {
        Err(Denial::bad_request(format!(
            "the session token may only be sent as the credential; it was also found in {place}"
        )))
    };
    for (name, value) in headers {
        let is_credential = match auth {
            AuthStyle::Header(auth_name) if name == auth_name => {
                value.to_str().is_ok_and(|v| v.trim() == token)
            }
            _ if name == header::AUTHORIZATION => value
                .to_str()
                .ok()
                .and_then(strip_bearer)
                .is_some_and(|t| t == token),
            _ => false,
        };
        if !is_credential && holds(value.as_bytes()) {
            return leak(format!("the {name} header"));
        }
    }
    if decoded_holds(path) {
        return leak("the path".to_owned());
    }
    for (key, value) in query_pairs(query) {
        let is_credential = matches!(auth, AuthStyle::Query(name) if key == name && value == token);
        if !is_credential && (decoded_holds(key) || decoded_holds(value)) {
            return leak("the query string".to_owned());
        }
    }
    Ok(())
}

/// Turns the agent's request head into the upstream request head: hop-by-hop
/// headers and every place a token could be are emptied (`Host` too: the
/// connection pool names the upstream on HTTP/1), and the real credential is put
/// where the provider expects it. The upstream path is the request path from
/// byte `path_start` on (the part after `/{provider}`, already validated).
pub fn prepare_upstream(
    parts: &mut Parts,
    provider: &Provider,
    credential: &PreparedCredential,
    path_start: usize,
) -> Result<(), Denial> {
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    crate::headers::strip_forwarded(&mut parts.headers);
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::EXPECT);
    // The leak guard reads bodies as they are: no compression upstream.
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let AuthStyle::Header(name) = provider.auth() {
        parts.headers.remove(name);
    }
    join_cookie_crumbs(&mut parts.headers);
    for (name, value) in provider.extra_headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    if let Some((name, value)) = credential.header() {
        parts.headers.insert(name.clone(), value.clone());
    }

    let query: Option<Cow<'_, str>> = match (provider.auth(), credential.query_pair()) {
        (AuthStyle::Query(name), Some(pair)) => Some(Cow::Owned(query_with_credential(
            parts.uri.query(),
            name,
            pair,
        ))),
        _ => parts.uri.query().map(Cow::Borrowed),
    };
    let path = crate::handler::upstream_path(parts.uri.path(), path_start);
    let uri = provider
        .upstream_uri(path, query.as_deref())
        .map_err(|_| Denial::bad_request("the request target cannot be forwarded"))?;
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Ok(())
}

/// Joins the `Cookie` fields of a request into one, `; ` between them:
/// HTTP/2 sends a cookie as many fields ("crumbs"), which must be joined
/// before they go on over HTTP/1.1 (RFC 9113 §8.2.3; round 41 saw five
/// `Cookie` lines reach a provider). One field is left as it is.
fn join_cookie_crumbs(headers: &mut http::HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    let mut sensitive = false;
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
        sensitive |= crumb.is_sensitive();
    }
    // Each crumb was a valid value, and so is the join.
    if let Ok(mut value) = HeaderValue::from_bytes(&joined) {
        value.set_sensitive(sensitive);
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests;
