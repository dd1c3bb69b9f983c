//! The id airlock gives each call, so that an agent's error can be found in
//! airlock's log: it is in the call's log line (`airlock::call`), and
//! airlock's own answers carry it as `x-request-id` and `request-id`, the
//! headers the OpenAI and Anthropic SDKs read a request id from. Answers
//! the provider gave keep the provider's ids and get none of airlock's.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

/// What every id starts with: an agent's developer sees whose id it is.
const PREFIX: &[u8] = b"airlock_";

/// Hex digits of an id after its prefix.
const DIGITS: usize = 16;

/// The header the OpenAI SDKs read (`request_id` of an error).
const OPENAI_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The header the Anthropic SDKs read.
const ANTHROPIC_HEADER: HeaderName = HeaderName::from_static("request-id");

/// The id a provider gave its answer: `x-request-id` (OpenAI), else
/// `request-id` (Anthropic).
pub(crate) fn provider_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers
        .get(OPENAI_HEADER)
        .or_else(|| headers.get(ANTHROPIC_HEADER))
}

/// One call's id: 64 random bits, shown as `airlock_` and 16 hex digits.
/// Unique enough to find a call's log line; it names nothing and proves
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestId(u64);

// === impl RequestId ===

impl RequestId {
    /// A fresh random id.
    pub(crate) fn new() -> Self {
        Self(rand::random())
    }

    /// The id's text, without an allocation.
    fn to_ascii(self) -> [u8; PREFIX.len() + DIGITS] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; PREFIX.len() + DIGITS];
        let (prefix, digits) = out.split_at_mut(PREFIX.len());
        prefix.copy_from_slice(PREFIX);
        for (i, digit) in digits.iter_mut().enumerate() {
            let shift = 4 * (DIGITS - 1 - i);
            // Masked to four bits: always an index into `HEX`.
            *digit = HEX[((self.0 >> shift) & 0xf) as usize];
        }
        out
    }

    /// Puts the id on airlock's own answer, in both SDKs' headers.
    pub(crate) fn label(self, headers: &mut HeaderMap) {
        // Always visible ASCII, so always a valid header value.
        if let Ok(value) = HeaderValue::from_bytes(&self.to_ascii()) {
            headers.insert(OPENAI_HEADER, value.clone());
            headers.insert(ANTHROPIC_HEADER, value);
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ascii = self.to_ascii();
        f.write_str(std::str::from_utf8(&ascii).map_err(|_| std::fmt::Error)?)
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_id_is_the_prefix_and_sixteen_hex_digits_of_its_bits() {
        let id = RequestId(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "airlock_0123456789abcdef");
        assert_eq!(RequestId(0).to_string(), "airlock_0000000000000000");
        assert_eq!(RequestId(u64::MAX).to_string(), "airlock_ffffffffffffffff");
    }

    #[test]
    fn both_sdks_headers_carry_it() {
        let id = RequestId(0xfeed);
        let mut headers = HeaderMap::new();
        id.label(&mut headers);
        assert_eq!(headers["x-request-id"], "airlock_000000000000feed");
        assert_eq!(headers["request-id"], "airlock_000000000000feed");
    }

    #[test]
    fn fresh_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| RequestId::new().0).collect();
        assert_eq!(ids.len(), 1000);
    }
}
