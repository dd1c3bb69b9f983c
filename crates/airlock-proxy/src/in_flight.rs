//! [`InFlightCount`]: a count of what is in flight (calls, tunnels, calls
//! answering shutdown's cut) that can be waited on until none is left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// An atomic count, and a notification when it drops to zero.
#[derive(Debug, Default)]
pub(crate) struct InFlightCount {
    count: AtomicUsize,
    none_left: Notify,
}

impl InFlightCount {
    pub(crate) fn enter(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.none_left.notify_waiters();
        }
    }

    /// How many are in flight now.
    pub(crate) fn now(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once nothing is in flight.
    pub(crate) async fn none_left(&self) {
        loop {
            let notified = self.none_left.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counted in an [`InFlightCount`] while it lives.
#[derive(Debug)]
pub(crate) struct Entered(Arc<InFlightCount>);

impl Entered {
    pub(crate) fn enter(count: &Arc<InFlightCount>) -> Self {
        count.enter();
        Self(Arc::clone(count))
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Counted in a borrowed [`InFlightCount`] while it lives: for a count
/// that outlives the guard without an `Arc` (no shared reference count to
/// touch).
#[derive(Debug)]
pub(crate) struct EnteredHere<'a>(&'a InFlightCount);

impl<'a> EnteredHere<'a> {
    pub(crate) fn enter(count: &'a InFlightCount) -> Self {
        count.enter();
        Self(count)
    }
}

impl Drop for EnteredHere<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}
