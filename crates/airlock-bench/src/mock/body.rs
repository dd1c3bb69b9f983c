//! Response bodies of the mock provider, built from static bytes so that a
//! response costs no allocation beyond hyper's own.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Size of one frame of `/bytes` (and the static buffer it is cut from).
pub const CHUNK_SIZE: usize = 64 * 1024;

static CHUNK: [u8; CHUNK_SIZE] = [b'x'; CHUNK_SIZE];

/// One server-sent event, shaped like a chat completion chunk.
pub const SSE_EVENT: &[u8] =
    b"data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\
\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token\"}}]}\n\n";

/// A mock response body.
pub struct MockBody {
    kind: Kind,
}

enum Kind {
    /// One frame (or none once sent).
    Once(Option<Bytes>),
    /// `remaining` bytes in frames of at most [`CHUNK_SIZE`].
    Filler { remaining: u64 },
    /// Event `i` is due at `start + i * interval`; each is its own frame.
    Sse {
        sent: u32,
        events: u32,
        interval: Duration,
        start: Instant,
        timer: Option<Pin<Box<Sleep>>>,
    },
}

// === impl MockBody ===

impl MockBody {
    /// A body of exactly these bytes.
    pub fn once(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Once(Some(bytes)),
        }
    }

    /// `len` filler bytes, streamed in [`CHUNK_SIZE`] frames.
    pub fn filler(len: u64) -> Self {
        Self {
            kind: Kind::Filler { remaining: len },
        }
    }

    /// `events` copies of [`SSE_EVENT`], the first at once and then one every
    /// `interval` on an absolute schedule (a late event does not delay the
    /// ones after it).
    pub fn sse(events: u32, interval: Duration) -> Self {
        Self {
            kind: Kind::Sse {
                sent: 0,
                events,
                interval,
                start: Instant::now(),
                timer: None,
            },
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().kind {
            Kind::Once(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Filler { remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let len = usize::try_from(*remaining).map_or(CHUNK_SIZE, |r| r.min(CHUNK_SIZE));
                *remaining -= len as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..len])))))
            }
            Kind::Sse {
                sent,
                events,
                interval,
                start,
                timer,
            } => {
                if *sent >= *events {
                    return Poll::Ready(None);
                }
                let due = *start + *interval * *sent;
                if Instant::now() < due {
                    let timer =
                        timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                    if timer.deadline() != due {
                        timer.as_mut().reset(due);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                *sent += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(SSE_EVENT)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Once(bytes) => bytes.is_none(),
            Kind::Filler { remaining } => *remaining == 0,
            Kind::Sse { sent, events, .. } => sent >= events,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Once(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Filler { remaining } => SizeHint::with_exact(*remaining),
            Kind::Sse { .. } => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn filler_is_cut_in_chunks() {
        let body = MockBody::filler(CHUNK_SIZE as u64 + 10);
        let mut sizes = Vec::new();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, vec![CHUNK_SIZE, 10]);
    }

    #[tokio::test]
    async fn sse_sends_every_event_as_a_frame() {
        let mut body = MockBody::sse(3, Duration::from_millis(1));
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            assert_eq!(frame.unwrap().into_data().unwrap(), SSE_EVENT);
            frames += 1;
        }
        assert_eq!(frames, 3);
    }
}
