//! A future that is polled only after its own waker fired.
//!
//! A connection's task is woken several times per call (the socket, the
//! upstream's answer, the audit commit), and `tokio::select!` polls every
//! branch on every wake-up. The connection's watchers — shutdown and the
//! idle timer — are ready a few times in its life, yet polling them cost
//! about 1,000 instructions per call (callgrind; BENCHMARKS.md). Wrapped in
//! [`Dormant`], a watcher is polled once at first, to register its wakers,
//! and after that only when one of them fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `future`, polled only when it asked to be (see the module docs).
pub(crate) struct Dormant<F> {
    future: F,
    signal: Arc<Signal>,
    /// The waker `future` is polled with: it raises `signal`.
    waker: Waker,
}

/// Raised when the wrapped future's waker fires; passes the wake-up on to
/// the task polling the [`Dormant`].
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl<F: Future + Unpin> Dormant<F> {
    /// Wraps `future`; the first poll polls it.
    pub(crate) fn new(future: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&signal));
        Self {
            future,
            signal,
            waker,
        }
    }
}

impl<F: Future + Unpin> Future for Dormant<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake-up after the read
        // still reaches this task.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&this.waker))
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Waker;

    use super::*;

    /// Counts its polls; ready once `open` is set, after a wake-up.
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A task waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_inner_future_is_polled_first_and_then_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let mut dormant = Dormant::new(Gate {
            polls: Arc::clone(&polls),
            open: Arc::clone(&open),
            waker: Arc::clone(&inner_waker),
        });
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let task_waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&task_waker);

        assert!(Pin::new(&mut dormant).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once at first");
        for _ in 0..10 {
            assert!(Pin::new(&mut dormant).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled unwoken");

        // A spurious wake-up of the inner future: polled again, still pending.
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(Pin::new(&mut dormant).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);

        open.store(true, Ordering::SeqCst);
        assert!(
            Pin::new(&mut dormant).poll(&mut cx).is_pending(),
            "ready only once it says so through its waker"
        );
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
        assert!(Pin::new(&mut dormant).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_timer_inside_fires_through_the_task() {
        let started = std::time::Instant::now();
        let wait = std::time::Duration::from_millis(20);
        let slept = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            Dormant::new(Box::pin(tokio::time::sleep(wait))),
        )
        .await;
        assert!(slept.is_ok());
        // Had the wake-up been lost, only the outer timeout's own wake-up
        // (after 5 s) would have polled the sleep again.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "the timer's wake-up never reached the task"
        );
        assert!(started.elapsed() >= wait);
    }
}
