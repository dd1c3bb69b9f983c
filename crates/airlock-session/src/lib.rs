//! The live session registry.
//!
//! [`Registry`] keeps the sessions this process used or created in the last
//! ten minutes in memory (and ended ones for ten minutes), keyed by token
//! hash, so that a call with a known token never touches the database. Counters and limits live on the cached
//! [`LiveSession`] as atomics; a background task flushes the counters to the
//! store. Nothing here holds a lock across I/O.
//!
//! On a store shared by replicas (PostgreSQL), [`Registry::run_sync`] keeps
//! the cache in step with the other replicas and fails closed when the
//! store has been out of reach for longer than a bound.

mod end_watch;
mod live;
mod registry;

pub use end_watch::{EndWatch, WatchEnd, END_WATCH_RECHECK};
pub use live::{Admission, CallSlot, LiveSession, SessionState};
pub use registry::{AuthError, NewSession, Registry, RegistryError, SyncSettings};

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
