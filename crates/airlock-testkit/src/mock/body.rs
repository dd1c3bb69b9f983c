//! Response bodies used by the mock.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, SizeHint};

/// The response body type of every mock route.
pub(crate) type MockBody = UnsyncBoxBody<Bytes, Infallible>;

/// A body sent in one piece.
pub(crate) fn full(data: impl Into<Bytes>) -> MockBody {
    Full::new(data.into()).boxed_unsync()
}

/// A body whose every stream item becomes its own data frame.
pub(crate) fn frames<S>(stream: S) -> MockBody
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    StreamBody::new(stream.map(|data| Ok(Frame::data(data)))).boxed_unsync()
}

/// Size of one `/bytes` frame.
const CHUNK_LEN: usize = 64 * 1024;

/// One frame's worth of `a`s, shared by every `/bytes` response.
static CHUNK: [u8; CHUNK_LEN] = [b'a'; CHUNK_LEN];

/// `remaining` bytes of `a`, generated frame by frame with an exact length.
pub(crate) struct RepeatBody {
    remaining: u64,
}

impl RepeatBody {
    /// A body of `len` bytes.
    pub(crate) fn new(len: u64) -> Self {
        RepeatBody { remaining: len }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(CHUNK_LEN, |r| r.min(CHUNK_LEN));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
