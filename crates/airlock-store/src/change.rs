//! What a store tells the processes sharing it: changes made by any of them.
//!
//! A store shared by several `airlock serve` processes (PostgreSQL) pushes a
//! [`Change`] to every process when a session is revoked, its expiry changes
//! or a provider's credential changes, so caches can be corrected at once.
//! Pushes can be lost while a connection is down; the feed then sends
//! [`Change::Resync`] once it is back, and callers re-read what they cache.

use airlock_core::SessionId;

/// A change to shared state, made by this or another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A session was revoked or its expiry changed; the values are the new
    /// ones.
    Session {
        id: SessionId,
        /// Unix ms, when revoked.
        revoked_at: Option<i64>,
        /// Unix ms.
        expires_at: i64,
    },
    /// The stored total of a session's denied calls, announced just before
    /// its revocation (PostgreSQL migration 8 on): a process told of the
    /// revocation then knows whether `max_denied` ended the session, and
    /// says so from its first refusal. A process of an older version logs
    /// it as malformed and ignores it.
    Denied { id: SessionId, denied: u64 },
    /// A provider's credential was set or changed.
    Credential { provider: String },
    /// Changes may have been missed (the feed was down, or this receiver
    /// fell behind): re-read everything cached.
    Resync,
}

/// The state of a session that other processes may change, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    pub id: SessionId,
    /// Unix ms, when revoked.
    pub revoked_at: Option<i64>,
    /// Unix ms.
    pub expires_at: i64,
    /// Calls forwarded, by every process, as flushed.
    pub allowed: u64,
    /// Calls denied, by every process, as flushed.
    pub denied: u64,
}

/// Where a reader of a shared store's session changes has got to: the
/// next [`crate::Store::session_changes`] returns every change made since.
/// Opaque; on PostgreSQL, the oldest transaction that was still running
/// when the last read looked (a transaction id, never a wall clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeCursor(pub(crate) i64);

/// What [`crate::Store::session_changes`] read, all in one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// The sessions changed since the cursor given (any process's changes
    /// of revocation, expiry or call totals; some may be repeated from the
    /// previous read), and the ones asked for by id (missing ones are left
    /// out), in no particular order.
    pub statuses: Vec<SessionStatus>,
    /// The cursor of the next read.
    pub next: Option<ChangeCursor>,
    /// False when more sessions changed than one read returns: the reader
    /// must read what it caches some other way (and start from `next`).
    pub complete: bool,
}

/// The notification channel on PostgreSQL.
pub(crate) const CHANNEL: &str = "airlock_changes";

// === impl Change ===

impl Change {
    /// Parses a notification payload:
    /// `session ID REVOKED_AT|- EXPIRES_AT`, `denied ID N` or
    /// `credential PROVIDER`.
    pub(crate) fn parse(payload: &str) -> Option<Self> {
        let mut words = payload.split(' ');
        match words.next()? {
            "session" => {
                let id = SessionId::parse(words.next()?)?;
                let revoked_at = match words.next()? {
                    "-" => None,
                    at => Some(at.parse().ok()?),
                };
                let expires_at = words.next()?.parse().ok()?;
                words.next().is_none().then_some(Change::Session {
                    id,
                    revoked_at,
                    expires_at,
                })
            }
            "denied" => {
                let id = SessionId::parse(words.next()?)?;
                let denied = words.next()?.parse().ok()?;
                words
                    .next()
                    .is_none()
                    .then_some(Change::Denied { id, denied })
            }
            "credential" => {
                let provider = words.next()?;
                (!provider.is_empty() && words.next().is_none()).then(|| Change::Credential {
                    provider: provider.to_owned(),
                })
            }
            _ => None,
        }
    }

    /// The payload [`Change::parse`] reads (used by tests and by code that
    /// sends a notification itself).
    pub fn payload(&self) -> Option<String> {
        match self {
            Change::Session {
                id,
                revoked_at,
                expires_at,
            } => Some(format!(
                "session {id} {} {expires_at}",
                revoked_at.map_or_else(|| "-".to_owned(), |at| at.to_string())
            )),
            Change::Denied { id, denied } => Some(format!("denied {id} {denied}")),
            Change::Credential { provider } => Some(format!("credential {provider}")),
            Change::Resync => None,
        }
    }
}

#[cfg(test)]
mod tests;
