//! Waiting for a session to end, for streams that outlive many checks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use crate::{now_ms, LiveSession, SessionState};

/// Longest an [`EndWatch`] goes without looking at its session. Expiry is
/// measured on the wall clock and the watch's timer on a monotonic one;
/// this bounds the delay when the wall clock jumps ahead.
pub const END_WATCH_RECHECK: Duration = Duration::from_secs(10);

/// Tells when a session has ended: at once when it is revoked or its
/// expiry is moved into the past (the session's change notification), and
/// at its expiry (a timer). In between it looks at the session only every
/// [`END_WATCH_RECHECK`].
pub struct EndWatch {
    session: Arc<LiveSession>,
    changes: Pin<Box<OwnedNotified>>,
    deadline: Pin<Box<Sleep>>,
    /// Whether a poll has looked at the session yet: the first one does,
    /// for an end (or a lost store) that came before the watch began.
    looked: bool,
}

// === impl EndWatch ===

impl EndWatch {
    /// Watches `session` from now on.
    pub fn new(session: &Arc<LiveSession>) -> Self {
        let mut changes = Box::pin(session.changes());
        changes.as_mut().enable();
        Self {
            session: Arc::clone(session),
            changes,
            deadline: Box::pin(tokio::time::sleep_until(next_look(session))),
            looked: false,
        }
    }

    /// `Ready` once the session is no longer active, or this process can
    /// no longer vouch for it, saying which; otherwise `Pending`, with `cx`
    /// woken at its next change or its expiry.
    pub fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<WatchEnd> {
        loop {
            let changed = self.changes.as_mut().poll(cx).is_ready() || !self.looked;
            self.looked = true;
            if !changed && self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Listen again before reading the state: a change from here on
            // wakes the next poll.
            self.changes.set(self.session.changes());
            self.changes.as_mut().enable();
            if let Some(end) = WatchEnd::of(&self.session) {
                return Poll::Ready(end);
            }
            self.deadline.as_mut().reset(next_look(&self.session));
        }
    }
}

/// Why an [`EndWatch`] fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The session was revoked or expired.
    Ended,
    /// The session still looks active, but this process can no longer
    /// vouch for it ([`LiveSession::unvouched`]: its shared store has been
    /// out of reach for longer than `max_staleness`).
    Unvouched,
}

impl WatchEnd {
    /// Why `session`'s calls in flight must end now, if they must.
    pub fn of(session: &LiveSession) -> Option<Self> {
        if session.state(now_ms()) != SessionState::Active {
            Some(Self::Ended)
        } else if session.unvouched() {
            Some(Self::Unvouched)
        } else {
            None
        }
    }
}

/// When to look at `session` next: just past its expiry, or after
/// [`END_WATCH_RECHECK`] if that is sooner.
fn next_look(session: &LiveSession) -> Instant {
    let left = u64::try_from(session.expires_at().saturating_sub(now_ms())).unwrap_or(0);
    // One millisecond past the expiry: the state flips at it, not before.
    Instant::now() + Duration::from_millis(left.saturating_add(1)).min(END_WATCH_RECHECK)
}
