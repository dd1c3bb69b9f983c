//! The embedded SQLite store: one file, WAL mode, migrations at open.

use std::borrow::Cow;
use std::str::FromStr;

use airlock_core::{SessionId, TokenHash};
use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::{decode_json, encode_json, Result, SessionRow, Store, StoreError};

/// A store in one SQLite file.
pub struct SqliteStore {
    pool: SqlitePool,
}

const COLUMNS: &str =
    "id, token_hash, created_at, expires_at, revoked_at, scope, limits, labels, allowed, denied";

fn migrator() -> Migrator {
    let migrations = vec![Migration::new(
        1,
        Cow::Borrowed("init"),
        MigrationType::Simple,
        Cow::Borrowed(include_str!("../migrations/sqlite/0001_init.sql")),
        false,
    )];
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

// === impl SqliteStore ===

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`) and migrates it.
    pub async fn open(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        Ok(Self { pool })
    }

    fn decode(row: &SqliteRow) -> Result<SessionRow> {
        let id: String = row.try_get("id")?;
        let corrupt = |reason: &str| StoreError::Corrupt {
            what: format!("session {id}"),
            reason: reason.to_owned(),
        };
        let hash: String = row.try_get("token_hash")?;
        Ok(SessionRow {
            id: SessionId::parse(&id).ok_or_else(|| corrupt("bad id"))?,
            token_hash: TokenHash::from_hex(&hash).ok_or_else(|| corrupt("bad token hash"))?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
            scope: decode_json(&id, "scope", row.try_get("scope")?)?,
            limits: decode_json(&id, "limits", row.try_get("limits")?)?,
            labels: decode_json(&id, "labels", row.try_get("labels")?)?,
            allowed: u64::try_from(row.try_get::<i64, _>("allowed")?).unwrap_or(0),
            denied: u64::try_from(row.try_get::<i64, _>("denied")?).unwrap_or(0),
        })
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_session(&self, s: &SessionRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, created_at, expires_at, revoked_at, scope, limits, labels, allowed, denied) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.as_str())
        .bind(s.token_hash.to_hex())
        .bind(s.created_at)
        .bind(s.expires_at)
        .bind(s.revoked_at)
        .bind(encode_json(&s.scope))
        .bind(encode_json(&s.limits))
        .bind(encode_json(&s.labels))
        .bind(to_i64(s.allowed))
        .bind(to_i64(s.denied))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_by_token(&self, hash: &TokenHash) -> Result<Option<SessionRow>> {
        let sql = format!("SELECT {COLUMNS} FROM sessions WHERE token_hash = ?");
        let row = sqlx::query(&sql)
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::decode).transpose()
    }

    async fn session_by_id(&self, id: &SessionId) -> Result<Option<SessionRow>> {
        let sql = format!("SELECT {COLUMNS} FROM sessions WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::decode).transpose()
    }

    async fn list_sessions(&self, include_ended: bool, now_ms: i64) -> Result<Vec<SessionRow>> {
        let sql = if include_ended {
            format!("SELECT {COLUMNS} FROM sessions ORDER BY created_at DESC, id")
        } else {
            format!(
                "SELECT {COLUMNS} FROM sessions WHERE revoked_at IS NULL AND expires_at > ? \
                 ORDER BY created_at DESC, id"
            )
        };
        let rows = sqlx::query(&sql).bind(now_ms).fetch_all(&self.pool).await?;
        rows.iter().map(Self::decode).collect()
    }

    async fn revoke_session(&self, id: &SessionId, at_ms: i64) -> Result<bool> {
        sqlx::query("UPDATE sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(at_ms)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        let exists = sqlx::query("SELECT 1 FROM sessions WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(exists.is_some())
    }

    async fn add_call_counts(&self, id: &SessionId, allowed: u64, denied: u64) -> Result<()> {
        sqlx::query("UPDATE sessions SET allowed = allowed + ?, denied = denied + ? WHERE id = ?")
            .bind(to_i64(allowed))
            .bind(to_i64(denied))
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    async fn set_setting_if_absent(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(self.setting(key).await?.unwrap_or_else(|| value.to_owned()))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
