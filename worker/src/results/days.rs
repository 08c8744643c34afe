//! Whole days of the hot MySQL, for the nightly job: which days it holds,
//! every result of a day across the shards, and deleting days already in the
//! cold store in bounded batches (each a short statement: the hot tables
//! keep serving while they shrink); and the precomputed cold answers, kept
//! beside the results (see [`HotStore::replace_precomputed`]).

use mysql_async::prelude::Queryable;

use super::hot::{HotStore, database_name, parse_metrics};
use super::{Granularity, ResultsError, Stored};
use crate::results::cache::DAY_MS;

/// One stored result of a day.
#[derive(Clone, Debug, PartialEq)]
pub struct DayResult {
    /// The merchant.
    pub merchant: String,
    /// Window, hour or day.
    pub granularity: Granularity,
    /// Its start, in ms.
    pub start_ms: i64,
    /// The result.
    pub stored: Stored,
}

/// One precomputed cold answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Precomputed {
    /// The merchant.
    pub merchant: String,
    /// The normalised query it answers.
    pub key: String,
    /// The answer's JSON, as the history endpoint gives it.
    pub answer: String,
}

impl HotStore {
    /// The UTC days (their start, in ms) the pipeline has results in, oldest first.
    pub async fn days(&self, pipeline: &str) -> Result<Vec<i64>, ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        let mut days = std::collections::BTreeSet::new();
        for (database, table) in self.shards() {
            let table = self.table_name(database, table);
            let found: Vec<i64> = conn
                .exec(
                    format!(
                        "SELECT DISTINCT CAST(FLOOR(window_start_ms / {DAY_MS}) * {DAY_MS} AS SIGNED) \
                         FROM {table} WHERE pipeline = ?"
                    ),
                    (pipeline,),
                )
                .await?;
            days.extend(found);
        }
        Ok(days.into_iter().collect())
    }

    /// Every result of the pipeline starting on the day `day_start_ms`, from every shard.
    pub async fn read_day(&self, pipeline: &str, day_start_ms: i64) -> Result<Vec<DayResult>, ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        let mut out = Vec::new();
        for (database, table) in self.shards() {
            let table = self.table_name(database, table);
            let rows: Vec<(String, String, i64, String, u64)> = conn
                .exec(
                    format!(
                        "SELECT merchant_id, granularity, window_start_ms, metrics, version FROM {table} \
                         WHERE pipeline = ? AND window_start_ms >= ? AND window_start_ms < ?"
                    ),
                    (pipeline, day_start_ms, day_start_ms + DAY_MS),
                )
                .await?;
            for (merchant, granularity, start_ms, metrics, version) in rows {
                let Some(granularity) = Granularity::parse(&granularity) else {
                    return Err(ResultsError::Corrupt {
                        location: format!("{table} merchant {merchant:?}"),
                        reason: format!("unknown granularity {granularity:?}"),
                    });
                };
                let metrics = parse_metrics(&metrics, &table, &merchant)?;
                out.push(DayResult {
                    merchant,
                    granularity,
                    start_ms,
                    stored: Stored { version, metrics },
                });
            }
        }
        Ok(out)
    }

    /// Deletes the pipeline's results starting on the day `day_start_ms`, at
    /// most `batch` rows per statement; returns the rows deleted.
    pub async fn delete_day(
        &self,
        pipeline: &str,
        day_start_ms: i64,
        batch: u32,
    ) -> Result<u64, ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        let mut deleted = 0;
        for (database, table) in self.shards() {
            let table = self.table_name(database, table);
            loop {
                conn.exec_drop(
                    format!(
                        "DELETE FROM {table} WHERE pipeline = ? AND window_start_ms >= ? \
                         AND window_start_ms < ? LIMIT {batch}"
                    ),
                    (pipeline, day_start_ms, day_start_ms + DAY_MS),
                )
                .await?;
                let affected = conn.affected_rows();
                deleted += affected;
                if affected < u64::from(batch) {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    fn precomputed_table(&self) -> String {
        format!("{}.`precomputed`", database_name(&self.base, 0))
    }

    /// Creates the precomputed answers' table if it does not exist.
    pub async fn ensure_precomputed(&self) -> Result<(), ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        conn.query_drop(format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            database_name(&self.base, 0)
        ))
        .await?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (
               pipeline VARCHAR(253) NOT NULL,
               day BIGINT NOT NULL,
               merchant_id VARCHAR(191) NOT NULL,
               key_hash BIGINT UNSIGNED NOT NULL,
               query_key VARCHAR(4096) NOT NULL,
               answer LONGTEXT NOT NULL,
               PRIMARY KEY (pipeline, day, merchant_id, key_hash)
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            self.precomputed_table()
        ))
        .await?;
        Ok(())
    }

    /// Replaces the precomputed answers of the pipeline for the day
    /// `day_start_ms` (and drops older days') in one transaction: a reader
    /// sees the old set or the new one, never half of it.
    pub async fn replace_precomputed(
        &self,
        pipeline: &str,
        day_start_ms: i64,
        answers: &[Precomputed],
    ) -> Result<(), ResultsError> {
        let table = self.precomputed_table();
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(mysql_async::TxOpts::default()).await?;
        tx.exec_drop(
            format!("DELETE FROM {table} WHERE pipeline = ? AND day <= ?"),
            (pipeline, day_start_ms),
        )
        .await?;
        tx.exec_batch(
            format!(
                "INSERT INTO {table} (pipeline, day, merchant_id, key_hash, query_key, answer) \
                 VALUES (?, ?, ?, ?, ?, ?)"
            ),
            // The key is too long for an index: its stable hash is the key's part.
            answers.iter().map(|a| {
                (
                    pipeline,
                    day_start_ms,
                    a.merchant.as_str(),
                    crate::routing::stable_hash(a.key.as_bytes()),
                    a.key.as_str(),
                    a.answer.as_str(),
                )
            }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The pipeline's precomputed answers for the day `day_start_ms`.
    pub async fn precomputed(
        &self,
        pipeline: &str,
        day_start_ms: i64,
    ) -> Result<Vec<Precomputed>, ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        let rows: Vec<(String, String, String)> = conn
            .exec(
                format!(
                    "SELECT merchant_id, query_key, answer FROM {} WHERE pipeline = ? AND day = ?",
                    self.precomputed_table()
                ),
                (pipeline, day_start_ms),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|(merchant, key, answer)| Precomputed {
                merchant,
                key,
                answer,
            })
            .collect())
    }
}
