//! Owning an audit chain on a database shared by several writers.
//!
//! A process owns chain `c` while it holds the session-level advisory lock
//! `(CHAIN_LOCK_CLASS, c)` on a connection of its own. PostgreSQL releases
//! the lock when that connection ends, however it ends. A keeper checks the
//! connection every second and, when it died, takes the same chain's lock
//! again on a new one, so a database restart does not make replicas swap
//! chains. Whatever happens to the lock, appends stay safe: the head moves
//! only from the seq the writer expects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use airlock_core::audit::GENESIS_MAC;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use tokio::sync::Mutex;

use crate::audit_rows::decode_head;
use crate::{ChainHead, GenesisSeal, Result, StoreError};

/// First key of the advisory locks that own audit chains (the second is the
/// chain id). The two-key lock space does not overlap the one-key space
/// sqlx's migrator locks in.
pub(super) const CHAIN_LOCK_CLASS: i32 = 0x4155_4454; // "AUDT"
/// How often the lock's connection is checked.
const KEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a check or a reconnection may take.
const KEEP_LIMIT: Duration = Duration::from_secs(5);

/// This process's audit chain, if it holds one.
pub(super) struct ChainOwner {
    options: PgConnectOptions,
    held: Mutex<Option<Held>>,
    /// The chain this process found another process holding (its id + 1;
    /// 0: none): appends to it are refused until the writer claims a chain
    /// again, so that two writers never take turns on one chain.
    disowned: AtomicU64,
}

/// A held chain: the lock lives as long as `conn`.
struct Held {
    chain: u32,
    conn: PgConnection,
    /// The connection was lost and the lock could not be taken again yet.
    lost: bool,
}

// === impl ChainOwner ===

impl ChainOwner {
    pub(super) fn new(options: PgConnectOptions) -> Self {
        Self {
            options,
            held: Mutex::new(None),
            disowned: AtomicU64::new(0),
        }
    }

    /// Whether this process may append to `chain`: not once another process
    /// was found holding its lock (the append then fails as a conflict and
    /// the writer claims a chain again).
    pub(super) fn may_append(&self, chain: u32) -> bool {
        self.disowned.load(Ordering::Acquire) != u64::from(chain) + 1
    }

    /// Claims a chain, at its stored head: the one this process held
    /// before if it still can (its lock's connection is alive, or nobody
    /// took the lock since), else the lowest-numbered chain nobody holds,
    /// else a new one (id from a sequence, head sealed by `genesis`).
    pub(super) async fn claim(&self, genesis: GenesisSeal<'_>) -> Result<ChainHead> {
        let mut held = self.held.lock().await;
        self.disowned.store(0, Ordering::Release);
        let (mut conn, previous) = match held.take() {
            Some(mut old) => {
                let alive = !old.lost
                    && matches!(
                        tokio::time::timeout(KEEP_LIMIT, old.conn.ping()).await,
                        Ok(Ok(()))
                    );
                if alive {
                    // Still holding its lock: advisory locks are re-entrant,
                    // so the old chain is taken again below.
                    (old.conn, Some(old.chain))
                } else {
                    let _ = tokio::time::timeout(Duration::from_secs(1), old.conn.close()).await;
                    let conn = PgConnection::connect_with(&self.options).await?;
                    (conn, Some(old.chain))
                }
            }
            None => (PgConnection::connect_with(&self.options).await?, None),
        };
        let mut ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM audit_chains ORDER BY id")
            .fetch_all(&mut conn)
            .await?;
        if let Some(previous) = previous.map(i64::from) {
            if let Some(at) = ids.iter().position(|id| *id == previous) {
                ids.remove(at);
                ids.insert(0, previous);
            }
        }
        for id in ids {
            let chain = chain_id(id)?;
            if try_lock(&mut conn, chain).await? {
                let head = head(&mut conn, chain).await?;
                if let Some(previous) = previous.filter(|p| *p != chain) {
                    tracing::info!(chain = previous, "gave up audit chain");
                }
                tracing::info!(chain, seq = head.seq, "resuming audit chain");
                *held = Some(Held {
                    chain,
                    conn,
                    lost: false,
                });
                return Ok(head);
            }
        }
        let id: i64 = sqlx::query_scalar("SELECT nextval('audit_chain_ids')")
            .fetch_one(&mut conn)
            .await?;
        let chain = chain_id(id)?;
        if !try_lock(&mut conn, chain).await? {
            // Nobody can hold a lock on an id the sequence just handed out,
            // unless something else uses the same lock keys.
            return Err(StoreError::ChainConflict(chain));
        }
        sqlx::query(
            "INSERT INTO audit_chains (id, head_seq, head_mac, head_seal, created_at) \
             VALUES ($1, 0, $2, $3, $4)",
        )
        .bind(id)
        .bind(GENESIS_MAC.as_slice())
        .bind(genesis(chain).as_slice())
        .bind(crate::unix_ms())
        .execute(&mut conn)
        .await?;
        let head = head(&mut conn, chain).await?;
        if let Some(previous) = previous {
            tracing::info!(chain = previous, "gave up audit chain");
        }
        tracing::info!(chain, "started audit chain");
        *held = Some(Held {
            chain,
            conn,
            lost: false,
        });
        Ok(head)
    }

    /// Checks the lock's connection every second and takes the lock again
    /// on a new connection when it died. Runs until aborted.
    pub(super) async fn keep(&self) {
        loop {
            tokio::time::sleep(KEEP_EVERY).await;
            let mut held = self.held.lock().await;
            let Some(current) = held.as_mut() else {
                continue;
            };
            if !current.lost {
                let ping = tokio::time::timeout(KEEP_LIMIT, current.conn.ping()).await;
                if matches!(ping, Ok(Ok(()))) {
                    continue;
                }
                tracing::warn!(
                    chain = current.chain,
                    "lost the audit chain lock's connection"
                );
                current.lost = true;
            }
            let chain = current.chain;
            let retaken = tokio::time::timeout(KEEP_LIMIT, async {
                let mut conn = PgConnection::connect_with(&self.options).await?;
                let locked = try_lock(&mut conn, chain).await?;
                Ok::<_, StoreError>((conn, locked))
            })
            .await;
            match retaken {
                Ok(Ok((conn, true))) => {
                    tracing::info!(chain, "holding the audit chain lock again");
                    // The old connection is dead: dropping it is enough.
                    drop(std::mem::replace(&mut current.conn, conn));
                    current.lost = false;
                }
                Ok(Ok((conn, false))) => {
                    // Someone else took the chain over. Our next append
                    // conflicts (or theirs does), and the writer claims
                    // again.
                    tracing::warn!(
                        chain,
                        "another process holds this process's audit chain: moving to another"
                    );
                    self.disowned.store(u64::from(chain) + 1, Ordering::Release);
                    drop(conn);
                    *held = None;
                }
                Ok(Err(e)) => {
                    tracing::debug!(chain, error = %e, "cannot take the audit chain lock again yet");
                }
                Err(_) => {
                    tracing::debug!(chain, "taking the audit chain lock again timed out");
                }
            }
        }
    }

    /// Gives the chain up (closing the lock's connection).
    pub(super) async fn release(&self) {
        if let Some(held) = self.held.lock().await.take() {
            let _ = held.conn.close().await;
        }
    }
}

/// Tries to take the lock owning `chain` on `conn`.
async fn try_lock(conn: &mut PgConnection, chain: u32) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(CHAIN_LOCK_CLASS)
        .bind(i32::from_ne_bytes(chain.to_ne_bytes()))
        .fetch_one(&mut *conn)
        .await?)
}

async fn head(conn: &mut PgConnection, chain: u32) -> Result<ChainHead> {
    let row =
        sqlx::query("SELECT id, head_seq, head_mac, head_seal FROM audit_chains WHERE id = $1")
            .bind(i64::from(chain))
            .fetch_one(&mut *conn)
            .await?;
    decode_head(&row)
}

fn chain_id(id: i64) -> Result<u32> {
    u32::try_from(id).map_err(|_| StoreError::Corrupt {
        what: "audit chain".to_owned(),
        reason: format!("bad chain id {id}"),
    })
}
