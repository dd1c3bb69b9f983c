//! The token an agent presents, and the real credential that replaces it.
//!
//! Agents put their session token where their SDK puts an API key:
//! `Authorization: Bearer`, or the header / query parameter the provider's
//! auth style names. All of those places are read; if they disagree the call
//! is refused. Before forwarding, every one of them is emptied and the real
//! credential is put where the provider expects it.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;

use crate::error::Denial;
use crate::provider::{AuthStyle, Provider};

/// Finds the session token in the request. `Ok(None)` when none was given.
pub fn find_token<'a>(
    auth: &AuthStyle,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, Denial> {
    let mut found: Option<&'a str> = None;
    let mut offer = |candidate: &'a str| match found {
        Some(previous) if previous != candidate => Err(Denial::bad_request(
            "the request carries two different credentials",
        )),
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

fn strip_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Turns the agent's request head into the upstream request head: hop-by-hop
/// headers and every place a token could be are emptied, `Host` is left for
/// the client to set from the upstream URI, and the real credential is put
/// where the provider expects it. The upstream path is the request path from
/// byte `path_start` on (the part after `/{provider}`, already validated).
pub fn prepare_upstream(
    parts: &mut Parts,
    provider: &Provider,
    path_start: usize,
) -> Result<(), Denial> {
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::EXPECT);
    if let AuthStyle::Header(name) = provider.auth() {
        parts.headers.remove(name);
    }
    if let Some((name, value)) = provider.credential_header() {
        parts.headers.insert(name.clone(), value.clone());
    }

    let query: Option<Cow<'_, str>> = match (provider.auth(), provider.credential_query_pair()) {
        (AuthStyle::Query(name), Some(pair)) => {
            let mut rebuilt = String::new();
            for (key, value) in query_pairs(parts.uri.query()).filter(|(k, _)| k != name) {
                rebuilt.push_str(key);
                rebuilt.push('=');
                rebuilt.push_str(value);
                rebuilt.push('&');
            }
            rebuilt.push_str(pair);
            Some(Cow::Owned(rebuilt))
        }
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

#[cfg(test)]
mod tests;
