//! The batch trail's SQL, the same on both stores: `$N` parameters, which
//! SQLite reads as numbered ones too.

/// Inserts a batch: chain, first and last seq, `ts_max`, the encoded
/// records. (`$N` parameters: SQLite reads them as numbered ones too.)
pub(crate) const INSERT_BATCH: &str =
    "INSERT INTO audit_batches (chain, first_seq, last_seq, ts_max, records) \
     VALUES ($1, $2, $3, $4, $5)";
/// Names a batch (chain, first seq) under a session it holds.
pub(crate) const INSERT_SESSION: &str =
    "INSERT INTO audit_batch_sessions (session, chain, first_seq) VALUES ($1, $2, $3)";

/// Implements [`BatchRows`] and [`TrailWrites`] for a store's connection
/// type. Their SQL is the same on both stores (`$N` parameters, which
/// SQLite reads as numbered ones too); only the look for the old table,
/// `$legacy_exists` (a query answering one boolean), differs.
macro_rules! impl_batch_trail {
    ($conn:ty, $legacy_exists:expr) => {
        impl $crate::batch_trail::BatchRows for $conn {
            async fn chains(&mut self) -> $crate::Result<Vec<i64>> {
                Ok(
                    sqlx::query_scalar("SELECT id FROM audit_chains ORDER BY id")
                        .fetch_all(self)
                        .await?,
                )
            }

            async fn batch_at(
                &mut self,
                chain: i64,
                seq: i64,
            ) -> $crate::Result<Option<(i64, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT first_seq, ts_max FROM audit_batches \
                     WHERE chain = $1 AND first_seq <= $2 ORDER BY first_seq DESC LIMIT 1",
                )
                .bind(chain)
                .bind(seq)
                .fetch_optional(self)
                .await?)
            }

            async fn batch_before(
                &mut self,
                chain: i64,
                first_seq: i64,
            ) -> $crate::Result<Option<$crate::batch_trail::Stored>> {
                Ok(sqlx::query_as(
                    "SELECT first_seq, last_seq, ts_max, NULL AS records FROM audit_batches \
                     WHERE chain = $1 AND first_seq < $2 ORDER BY first_seq DESC LIMIT 1",
                )
                .bind(chain)
                .bind(first_seq)
                .fetch_optional(self)
                .await?)
            }

            async fn batches_from(
                &mut self,
                chain: i64,
                from: i64,
                session: Option<&str>,
                limit: i64,
            ) -> $crate::Result<Vec<$crate::batch_trail::Stored>> {
                let query = match session {
                    Some(_) => sqlx::query_as(
                        "SELECT s.first_seq, b.last_seq, b.ts_max, b.records \
                         FROM audit_batch_sessions s LEFT JOIN audit_batches b \
                         ON b.chain = s.chain AND b.first_seq = s.first_seq \
                         WHERE s.chain = $1 AND s.first_seq >= $2 AND s.session = $4 \
                         ORDER BY s.first_seq LIMIT $3",
                    ),
                    None => sqlx::query_as(
                        "SELECT first_seq, last_seq, ts_max, records FROM audit_batches \
                         WHERE chain = $1 AND first_seq >= $2 ORDER BY first_seq LIMIT $3",
                    ),
                };
                let query = query.bind(chain).bind(from).bind(limit);
                let query = match session {
                    Some(session) => query.bind(session),
                    None => query,
                };
                Ok(query.fetch_all(self).await?)
            }

            async fn indexed(
                &mut self,
                chain: i64,
                pairs: &[(&str, i64)],
            ) -> $crate::Result<Vec<(i64, String)>> {
                Ok($crate::batch_trail::indexed_query(chain, pairs)
                    .build_query_as()
                    .fetch_all(self)
                    .await?)
            }

            async fn headless_chains(&mut self) -> $crate::Result<Vec<(i64, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT chain, MIN(first_seq) FROM audit_batches \
                     WHERE chain NOT IN (SELECT id FROM audit_chains) GROUP BY chain \
                     UNION ALL \
                     SELECT chain, seq + 1 FROM audit_floors \
                     WHERE chain NOT IN (SELECT id FROM audit_chains) \
                     AND chain NOT IN (SELECT chain FROM audit_batches) \
                     ORDER BY 1",
                )
                .fetch_all(self)
                .await?)
            }

            async fn floor_rows(&mut self) -> $crate::Result<Vec<$crate::batch_trail::FloorRow>> {
                Ok(sqlx::query_as(
                    "SELECT chain, seq, mac, seal, pruned_at FROM audit_floors ORDER BY chain",
                )
                .fetch_all(self)
                .await?)
            }
        }

        impl $crate::batch_trail::TrailWrites for $conn {
            async fn insert_batch(
                &mut self,
                chain: i64,
                summary: &$crate::audit_batch::BatchSummary,
                encoded: &[u8],
                sessions: &[&str],
            ) -> $crate::Result<()> {
                let first = $crate::to_i64(summary.first_seq);
                sqlx::query($crate::batch_trail::INSERT_BATCH)
                    .bind(chain)
                    .bind(first)
                    .bind($crate::to_i64(summary.last_seq))
                    .bind(summary.ts_max)
                    .bind(encoded)
                    .execute(&mut *self)
                    .await?;
                for session in sessions {
                    sqlx::query($crate::batch_trail::INSERT_SESSION)
                        .bind(*session)
                        .bind(chain)
                        .bind(first)
                        .execute(&mut *self)
                        .await?;
                }
                Ok(())
            }

            async fn legacy_exists(&mut self) -> $crate::Result<bool> {
                Ok(sqlx::query_scalar($legacy_exists).fetch_one(self).await?)
            }

            async fn legacy_rows(
                &mut self,
                after: (i64, i64),
                limit: i64,
            ) -> $crate::Result<Vec<((i64, i64), $crate::Result<airlock_core::audit::AuditRecord>)>>
            {
                use sqlx::Row as _;
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM audit_records WHERE (chain, seq) > ($1, $2) \
                     ORDER BY chain, seq LIMIT $3",
                    $crate::audit_rows::RECORD_COLUMNS
                ))
                .bind(after.0)
                .bind(after.1)
                .bind(limit)
                .fetch_all(self)
                .await?;
                rows.iter()
                    .map(|row| {
                        let key = (row.try_get("chain")?, row.try_get("seq")?);
                        Ok((key, $crate::audit_rows::decode_record(row)))
                    })
                    .collect()
            }

            async fn keep_aside(&mut self, (chain, seq): (i64, i64)) -> $crate::Result<()> {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS audit_records_unreadable AS \
                     SELECT * FROM audit_records WHERE FALSE",
                )
                .execute(&mut *self)
                .await?;
                sqlx::query(
                    "INSERT INTO audit_records_unreadable SELECT * FROM audit_records \
                     WHERE chain = $1 AND seq = $2",
                )
                .bind(chain)
                .bind(seq)
                .execute(&mut *self)
                .await?;
                Ok(())
            }

            async fn drop_legacy(&mut self) -> $crate::Result<()> {
                sqlx::query("DROP TABLE audit_records")
                    .execute(self)
                    .await?;
                Ok(())
            }

            async fn delete_batches_before(
                &mut self,
                chain: i64,
                first_seq: i64,
                sessions: &[String],
            ) -> $crate::Result<()> {
                for session in sessions {
                    sqlx::query(
                        "DELETE FROM audit_batch_sessions \
                         WHERE session = $1 AND chain = $2 AND first_seq < $3",
                    )
                    .bind(session)
                    .bind(chain)
                    .bind(first_seq)
                    .execute(&mut *self)
                    .await?;
                }
                sqlx::query("DELETE FROM audit_batches WHERE chain = $1 AND first_seq < $2")
                    .bind(chain)
                    .bind(first_seq)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn set_floor(
                &mut self,
                floor: &$crate::ChainFloor,
            ) -> $crate::Result<()> {
                sqlx::query(
                    "INSERT INTO audit_floors (chain, seq, mac, seal, pruned_at) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, mac = excluded.mac, \
                     seal = excluded.seal, pruned_at = excluded.pruned_at \
                     WHERE audit_floors.seq < excluded.seq",
                )
                .bind(i64::from(floor.chain))
                .bind($crate::to_i64(floor.seq))
                .bind(floor.mac.as_slice())
                .bind(floor.seal.as_slice())
                .bind(floor.pruned_at_ms)
                .execute(self)
                .await?;
                Ok(())
            }
        }
    };
}
pub(crate) use impl_batch_trail;
