//! JSON in place of hyper's automatic answers to unparseable requests.
//!
//! When an HTTP/1 request head cannot be parsed (a malformed request line
//! or header, a head over the size limit, a target too long), hyper answers
//! by itself — `400`, `431` or `414` with an empty body — and closes the
//! connection; no call reaches the proxy. Agents and SDKs expect airlock's
//! JSON error shape for every refusal, so the connection's writer swaps
//! that answer for a JSON one with the same status.
//!
//! The swap is made only where it is unambiguous: on a connection that has
//! not dispatched a call yet, hyper writes nothing but its automatic answer
//! (an HTTP/2 connection writes frames, which never start with a status
//! line). After a call, the answer to a later unparseable head may share a
//! write with the end of the previous response, so it is left as hyper
//! wrote it: the status is right, the body empty.

use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Activity;
use crate::error::ErrorCode;

/// What the connection's writer does with hyper's writes.
pub(super) enum Automatic {
    /// No write yet on a connection without calls: the next one decides.
    Watching(Arc<Activity>),
    /// Sending the JSON answer (`sent` bytes of it so far) in place of
    /// hyper's; hyper's bytes are reported written and dropped.
    Replacing { answer: Vec<u8>, sent: usize },
    /// The JSON answer is out. hyper closes the connection after its
    /// automatic answer; a write after it fails rather than vanish.
    Answered,
    /// Hyper's writes pass through untouched.
    Passing,
}

impl Automatic {
    /// Watches the connection of `activity` until its first write.
    pub(super) fn watch(activity: &Arc<Activity>) -> Self {
        Self::Watching(Arc::clone(activity))
    }

    /// Whether writes pass through (the common case, checked first).
    pub(super) fn is_passing(&self) -> bool {
        matches!(self, Self::Passing)
    }

    /// Decides, at a write of `first` (the start of what hyper writes),
    /// whether that write is hyper's automatic answer.
    pub(super) fn decide(&mut self, first: &[u8]) {
        if let Self::Watching(activity) = self {
            *self = match answer_for(first) {
                Some((answer, code)) if !activity.served.load(Ordering::Acquire) => {
                    // Counted once the connection ends (it is no call).
                    let _ = activity.unparsed.set(code);
                    Self::Replacing { answer, sent: 0 }
                }
                _ => Self::Passing,
            };
        }
    }
}

/// The start of the first non-empty buffer of a vectored write.
pub(super) fn first_slice<'a>(bufs: &'a [IoSlice<'a>]) -> &'a [u8] {
    bufs.iter()
        .map(|b| &**b)
        .find(|b| !b.is_empty())
        .unwrap_or(&[])
}

/// airlock's answer for hyper's automatic `head` (a status line) and its
/// code, or `None` when `head` is not one.
fn answer_for(head: &[u8]) -> Option<(Vec<u8>, ErrorCode)> {
    let status = head.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let (status_line, code, message) = match status {
        b"400" => (
            "400 Bad Request",
            ErrorCode::BadRequest,
            "the request is not valid HTTP/1.1 (its request line or a header is malformed)",
        ),
        b"431" => (
            "431 Request Header Fields Too Large",
            ErrorCode::HeadersTooLarge,
            "the request head is larger than proxy.max_header_size or has more than 100 header lines",
        ),
        b"414" => (
            "414 URI Too Long",
            ErrorCode::UriTooLong,
            "the request target is too long",
        ),
        _ => return None,
    };
    let body = serde_json::json!({
        "error": { "type": "invalid_request_error", "code": code.as_str(), "message": message }
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    Some((answer, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(head: &[u8]) -> Option<(String, serde_json::Value)> {
        let (bytes, code) = answer_for(head)?;
        let text = String::from_utf8(bytes).unwrap();
        let status = format!("HTTP/1.1 {}", code.status().as_u16());
        assert!(head.starts_with(status.as_bytes()));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        Some((head.to_owned(), serde_json::from_str(body).unwrap()))
    }

    #[test]
    fn hyper_s_parse_error_answers_become_json_with_the_same_status() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let (head, body) = answer(hyper).unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains("connection: close"));
        assert_eq!(body["error"]["code"], "headers_too_large");
        assert_eq!(body["error"]["type"], "invalid_request_error");

        let (head, body) = answer(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "));
        assert_eq!(body["error"]["code"], "bad_request");
        let (head, body) = answer(b"HTTP/1.1 414 URI Too Long\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 "));
        assert_eq!(body["error"]["code"], "uri_too_long");
    }

    #[test]
    fn anything_else_is_not_an_automatic_answer() {
        assert!(answer_for(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(answer_for(b"HTTP/1.1 404 Not Found\r\n").is_none());
        assert!(answer_for(b"HTTP/1.0 400 Bad Request\r\n").is_none());
        assert!(answer_for(b"HTTP/1.1 4").is_none());
        // An HTTP/2 SETTINGS frame.
        assert!(answer_for(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]).is_none());
        assert!(answer_for(b"").is_none());
    }

    #[test]
    fn a_connection_that_served_a_call_passes_every_write() {
        let activity = Arc::new(Activity::new());
        activity.served.store(true, Ordering::Release);
        let mut automatic = Automatic::watch(&activity);
        automatic.decide(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        assert!(automatic.is_passing());
    }

    #[test]
    fn the_first_write_decides_once() {
        let activity = Arc::new(Activity::new());
        let mut automatic = Automatic::watch(&activity);
        automatic.decide(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n");
        assert!(matches!(automatic, Automatic::Replacing { sent: 0, .. }));

        let mut automatic = Automatic::watch(&activity);
        automatic.decide(&[0, 0, 6, 4, 0]);
        assert!(automatic.is_passing());
        automatic.decide(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert!(automatic.is_passing(), "decided at the first write");
    }
}
