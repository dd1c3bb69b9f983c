//! Test support (feature `testing`): what an attacker with write access to
//! the database can do to the audit trail, for tests that check that
//! verifying names it. The server must not be running.

use std::path::Path;

use airlock_core::audit::AuditRecord;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, Database, Executor, PgConnection, SqliteConnection};

use crate::audit_batch::decode_batch;
use crate::batch_trail::{insert_legacy_batch, BatchRows, TrailWrites};
use crate::{Result, StoreError};

/// Rewrites the stored records of `chain` in the SQLite database at `path`
/// as `edit` leaves them (editing, dropping, inserting or reordering
/// records), as one batch, without touching the chain's sealed head.
pub async fn rewrite_sqlite_chain(
    path: &Path,
    chain: u32,
    edit: impl FnOnce(&mut Vec<AuditRecord>),
) -> Result<()> {
    // One connection, closed before returning: a pool may close its last
    // connection (and checkpoint the file) after `close` returns.
    rewrite_chain(connect(path).await?, chain, edit).await
}

/// [`rewrite_sqlite_chain`] on the PostgreSQL database at `url`.
pub async fn rewrite_postgres_chain(
    url: &str,
    chain: u32,
    edit: impl FnOnce(&mut Vec<AuditRecord>),
) -> Result<()> {
    rewrite_chain(PgConnection::connect(url).await?, chain, edit).await
}

/// Rewrites `chain` on `conn` as one batch, then closes it.
async fn rewrite_chain<C>(
    mut conn: C,
    chain: u32,
    edit: impl FnOnce(&mut Vec<AuditRecord>),
) -> Result<()>
where
    C: Connection + BatchRows + TrailWrites,
    C::Database: Database<Connection = C>,
    for<'c> &'c mut C: Executor<'c, Database = C::Database>,
{
    let records = edited(&mut conn, chain, edit).await?;
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(&delete_chain(chain))
        .execute(&mut *tx)
        .await?;
    insert_legacy_batch(&mut *tx, &records, chain, i64::MIN).await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

/// The records of `chain`, as `edit` leaves them.
async fn edited<C: BatchRows>(
    conn: &mut C,
    chain: u32,
    edit: impl FnOnce(&mut Vec<AuditRecord>),
) -> Result<Vec<AuditRecord>> {
    let mut records = Vec::new();
    for batch in conn
        .batches_from(i64::from(chain), 0, None, i64::MAX)
        .await?
    {
        decode_batch(
            chain,
            batch.records.as_deref().unwrap_or_default(),
            &mut records,
        )
        .map_err(|e| StoreError::Corrupt {
            what: format!("audit chain {chain}"),
            reason: e.to_string(),
        })?;
    }
    edit(&mut records);
    Ok(records)
}

/// Deletes every batch of `chain` and its session index rows.
fn delete_chain(chain: u32) -> String {
    format!(
        "DELETE FROM audit_batches WHERE chain = {chain}; \
         DELETE FROM audit_batch_sessions WHERE chain = {chain};"
    )
}

/// Overwrites the bytes of the stored batch of `chain` that holds record
/// `seq` with `bytes`.
pub async fn garble_sqlite_batch(path: &Path, chain: u32, seq: u64, bytes: &[u8]) -> Result<()> {
    let mut conn = connect(path).await?;
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE audit_batches SET records = ? WHERE chain = ? AND first_seq <= ? AND last_seq >= ?",
    )
    .bind(bytes)
    .bind(i64::from(chain))
    .bind(seq)
    .bind(seq)
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}

async fn connect(path: &Path) -> Result<SqliteConnection> {
    Ok(SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path)).await?)
}

/// Runs `sql` (any statements) on the SQLite database at `path`: for
/// tampering with the rows around the records themselves.
pub async fn execute_sqlite(path: &Path, sql: &str) -> Result<()> {
    let mut conn = connect(path).await?;
    sqlx::raw_sql(sql).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}
