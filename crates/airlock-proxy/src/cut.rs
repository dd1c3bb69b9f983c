//! The end of shutdown's drain as the calls still in flight see it:
//! [`Cut`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::in_flight::{Entered, InFlightCount};

/// Shared by every worker's [`crate::handler::Proxy`]. When the drain ends
/// with calls still in flight, [`Cut::start`] marks them cut by airlock
/// (their records say `incomplete`, not `client_aborted`) and wakes the
/// calls waiting for their provider's answer, which answer 503
/// `shutting_down` instead of being dropped unanswered, and the streams of
/// unknown length ([`CutWatch`]), which event streams end with an `error`
/// event saying so; the drain then gives those answers a moment
/// ([`Cut::answered`]) before it closes the connections.
#[derive(Debug, Default)]
pub(crate) struct Cut {
    started: AtomicBool,
    notice: Arc<Notify>,
    /// Calls in a long wait for their provider's answer, or answering the
    /// cut: what [`Cut::answered`] waits for.
    waiting: Arc<InFlightCount>,
}

impl Cut {
    /// Cuts the calls in flight.
    pub(crate) fn start(&self) {
        self.started.store(true, Ordering::Release);
        self.notice.notify_waiters();
    }

    /// Whether the calls in flight have been cut.
    pub(crate) fn has_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Resolves once the calls in flight are cut.
    pub(crate) async fn started(&self) {
        let notified = self.notice.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.has_started() {
            notified.await;
        }
    }

    /// Counts a call waiting for its provider's answer until the returned
    /// guard is dropped (kept by a call answering the cut until its answer
    /// is on its way).
    pub(crate) fn waiting(&self) -> Waiting {
        Entered::enter(&self.waiting)
    }

    /// Resolves once no call counted by [`Cut::waiting`] is left.
    pub(crate) async fn answered(&self) {
        self.waiting.none_left().await;
    }

    /// A stream's watch on the cut (see [`CutWatch`]).
    pub(crate) fn watch(self: &Arc<Self>) -> CutWatch {
        let mut notice = Box::pin(Arc::clone(&self.notice).notified_owned());
        notice.as_mut().enable();
        CutWatch {
            notice,
            cut: Arc::clone(self),
            _answering: self.waiting(),
        }
    }
}

/// Held by a stream of unknown length: wakes it when the cut starts, and
/// counts it among the answers the drain waits for until it is dropped
/// (the stream's end, its `error` event written).
pub(crate) struct CutWatch {
    notice: Pin<Box<OwnedNotified>>,
    cut: Arc<Cut>,
    _answering: Waiting,
}

impl CutWatch {
    /// `Ready` once the cut has started; otherwise `Pending`, with `cx`
    /// woken when it does.
    pub(crate) fn poll_started(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Enabled from the start: a cut before this poll is in the flag,
        // one after it wakes the notice.
        if self.cut.has_started() {
            return Poll::Ready(());
        }
        self.notice.as_mut().poll(cx)
    }
}

/// A call counted by [`Cut::waiting`].
pub(crate) type Waiting = Entered;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_cut_wakes_its_waiters_and_waits_for_their_answers() {
        let cut = Arc::new(Cut::default());
        let waiting = cut.waiting();
        let waiter = {
            let cut = Arc::clone(&cut);
            tokio::spawn(async move {
                cut.started().await;
                // The answer goes out; then the guard goes.
                drop(waiting);
            })
        };
        tokio::task::yield_now().await;
        assert!(!cut.has_started());
        cut.start();
        assert!(cut.has_started());
        cut.answered().await;
        waiter.await.unwrap();
        // Started once, started for good: a later wait returns at once.
        cut.started().await;
    }

    #[tokio::test]
    async fn answered_returns_at_once_with_nobody_waiting() {
        let cut = Arc::new(Cut::default());
        drop(cut.waiting());
        cut.answered().await;
    }
}
