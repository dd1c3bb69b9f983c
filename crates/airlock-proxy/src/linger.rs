//! What is left of a refused call's request body: read and thrown away for
//! a while, so that the agent gets to read its refusal.
//!
//! airlock refuses a call on its head, before reading its body. A client
//! that writes its whole body before it reads the answer (Node's `fetch`,
//! so both Node SDKs) found the connection reset under its upload when the
//! connection closed with the body unread, and never saw the refusal: the
//! SDK reported a connection error and retried, each retry counting toward
//! the session's `max_denied` (round 46: one upload out of scope revoked its
//! session). As nginx's lingering close does, the rest of the body is read
//! and discarded, for at most [`LINGER_TIME`] and [`LINGER_BYTES`]; then
//! the connection closes (over HTTP/1.1 the refusal said
//! `Connection: close`) or the stream ends (HTTP/2). Shutdown's cut ends
//! it at once.

use std::sync::Arc;
use std::time::Duration;

use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::cut::Cut;

/// How long the rest of a refused call's body is read at most.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(10);
/// How much of it is read at most.
pub(crate) const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// Reads and discards what is left of `body` in a task of its own, within
/// [`LINGER_TIME`] and [`LINGER_BYTES`], or until `cut` starts; nothing to
/// do for a body already at its end.
pub(crate) fn linger(body: Incoming, cut: &Arc<Cut>) {
    if body.is_end_stream() {
        return;
    }
    let cut = Arc::clone(cut);
    tokio::spawn(async move {
        let discard = async move {
            let mut body = body;
            let mut read: u64 = 0;
            while let Some(Ok(frame)) = body.frame().await {
                let len = frame.data_ref().map_or(0, |data| data.len());
                read = read.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
                if read > LINGER_BYTES {
                    return;
                }
            }
        };
        tokio::select! {
            () = discard => {}
            () = tokio::time::sleep(LINGER_TIME) => {}
            () = cut.started() => {}
        }
    });
}
