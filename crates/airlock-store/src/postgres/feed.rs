//! The change feed: LISTEN on `airlock_changes`, reconnecting by itself.
//!
//! Notifications sent while no connection listens are lost, so every time
//! the listener (re)connects it sends [`Change::Resync`] first: whoever
//! caches sessions re-reads them. The periodic re-check in the session
//! registry covers a connection that dies without the feed noticing.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::broadcast;

use crate::change::CHANNEL;
use crate::Change;

/// First wait before reconnecting; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Listens until the task is aborted.
pub(super) async fn run(options: PgConnectOptions, changes: broadcast::Sender<Change>) {
    // A pool of one connection of its own, so a connection that has run
    // LISTEN never serves ordinary statements.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        match listen(&pool).await {
            Ok(mut listener) => {
                if failures > 0 {
                    tracing::info!("change feed reconnected");
                }
                backoff = MIN_BACKOFF;
                failures = 0;
                let _ = changes.send(Change::Resync);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(note)) => match Change::parse(note.payload()) {
                            Some(change) => {
                                let _ = changes.send(change);
                            }
                            None => tracing::warn!(
                                payload = note.payload(),
                                "ignoring a malformed change notification"
                            ),
                        },
                        Ok(None) => {
                            tracing::warn!("change feed: connection lost; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "change feed: connection failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %e, "change feed: cannot listen; retrying");
                } else {
                    tracing::debug!(error = %e, failures, "change feed: cannot listen; retrying");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnect here, where the loss is seen and a resync sent.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
