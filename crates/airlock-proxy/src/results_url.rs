//! [`ResultsUrl`]: the one place airlock changes a provider's answer
//! beyond the leak guard's masks. Anthropic's Message Batches API answers
//! a batch with `results_url`, an absolute URL at the provider, which the
//! official SDKs fetch as it is (`messages.batches.results()`): past
//! airlock, with the session token as the key. In a JSON answer to a
//! batches call, a `results_url` that points at the provider's upstream is
//! pointed at airlock's URL for the provider instead, so that the results
//! are fetched through airlock, checked against the scope and recorded.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use memchr::memmem;

/// The field whose value is rewritten.
const FIELD: &[u8] = b"\"results_url\"";

/// Rewrites `results_url` values from the provider's upstream to airlock.
#[derive(Clone, Debug)]
pub struct ResultsUrl {
    /// The upstream as the provider spells its own URLs:
    /// `https://api.anthropic.com` (no default port, upstream path kept).
    upstream: Arc<str>,
    /// What agents use instead: `{public_url}/{provider}`.
    agents: Arc<str>,
}

impl ResultsUrl {
    /// Rewrites URLs under `upstream` to URLs under `agents`.
    pub fn new(upstream: &str, agents: &str) -> Self {
        Self {
            upstream: Arc::from(upstream),
            agents: Arc::from(agents),
        }
    }

    /// Whether a call to `path` (the provider's own path) is one whose
    /// answer may hold a `results_url`: a batches call. (A cheap test, made
    /// for every call.)
    pub fn applies_to(path: &str) -> bool {
        // Built once: `memmem::find` would set up a searcher every call.
        static BATCHES: LazyLock<memmem::Finder<'static>> =
            LazyLock::new(|| memmem::Finder::new(b"/batches"));
        BATCHES.find(path.as_bytes()).is_some()
    }

    /// `json` with each `"results_url": "{upstream}/…"` made
    /// `"results_url": "{agents}/…"`; `None` when there is none.
    pub fn rewrite(&self, json: &[u8]) -> Option<Bytes> {
        let upstream = self.upstream.as_bytes();
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for field in memmem::find_iter(json, FIELD) {
            let Some(value) = string_value_after(json, field + FIELD.len()) else {
                continue;
            };
            let rest = &json[value..];
            // The upstream, then a path (not `https://api.example.com.evil`).
            let at_upstream = rest.starts_with(upstream)
                && matches!(rest.get(upstream.len()), Some(b'/' | b'"' | b'?'));
            if !at_upstream {
                continue;
            }
            let buffer = out.get_or_insert_with(|| Vec::with_capacity(json.len() + 64));
            buffer.extend_from_slice(&json[copied..value]);
            buffer.extend_from_slice(self.agents.as_bytes());
            copied = value + upstream.len();
        }
        let mut buffer = out?;
        buffer.extend_from_slice(&json[copied..]);
        Some(Bytes::from(buffer))
    }
}

/// Where the string value starts (after its opening quote) when `json`
/// from `at` on is `: "…` (JSON whitespace allowed around the colon).
fn string_value_after(json: &[u8], at: usize) -> Option<usize> {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut i = at + json.get(at..)?.iter().take_while(|b| is_space(b)).count();
    if json.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    i += json.get(i..)?.iter().take_while(|b| is_space(b)).count();
    (json.get(i) == Some(&b'"')).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rewriter() -> ResultsUrl {
        ResultsUrl::new("https://api.anthropic.com", "http://airlock:8080/anthropic")
    }

    #[test]
    fn results_urls_at_the_upstream_point_at_airlock() {
        let json = br#"{"data":[{"id":"b1","results_url":"https://api.anthropic.com/v1/messages/batches/b1/results"},{"id":"b2","results_url" : "https://api.anthropic.com/v1/messages/batches/b2/results"}]}"#;
        let out = rewriter().rewrite(json).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"data":[{"id":"b1","results_url":"http://airlock:8080/anthropic/v1/messages/batches/b1/results"},{"id":"b2","results_url" : "http://airlock:8080/anthropic/v1/messages/batches/b2/results"}]}"#
        );
    }

    #[test]
    fn anything_else_is_left_alone() {
        for json in [
            br#"{"results_url":null}"#.as_slice(),
            br#"{"results_url":"https://api.anthropic.com.evil/x"}"#,
            br#"{"results_url":"https://elsewhere.example/v1/x"}"#,
            br#"{"text":"https://api.anthropic.com/v1/x","results_url_x":"https://api.anthropic.com/v1"}"#,
            br#"{"note":"\"results_url\""}"#,
            b"",
        ] {
            assert_eq!(rewriter().rewrite(json), None, "{json:?}");
        }
    }

    #[test]
    fn only_batches_calls_are_looked_at() {
        assert!(ResultsUrl::applies_to("/v1/messages/batches"));
        assert!(ResultsUrl::applies_to("/v1/messages/batches/b1"));
        assert!(!ResultsUrl::applies_to("/v1/messages"));
        assert!(!ResultsUrl::applies_to("/v1/chat/completions"));
    }
}
