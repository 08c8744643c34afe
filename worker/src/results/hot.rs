//! The hot results in MySQL: one row per (pipeline, granularity, window,
//! merchant), sharded by merchant over databases `<base>_r<i>` and tables
//! `results_<j>`, written with the task version fence inside the statement.
//!
//! The fence: `INSERT ... ON DUPLICATE KEY UPDATE` whose assignments replace
//! the stored row only when `VALUES(version) >= version` (the same version is a
//! retry of the same task: accepted, idempotent). MySQL evaluates assignments
//! left to right, each seeing the columns already assigned, so `version` comes
//! last: the earlier conditions compare against the stored version. An accepted
//! write always moves `written_at` forward, so it always counts as a changed row
//! and the server's counts tell refused rows apart exactly (see [`count`]).

use std::collections::{BTreeMap, HashSet};

use mysql_async::prelude::Queryable;
use mysql_async::{Pool, Value};

use super::{Fenced, Granularity, ResultsError, Slot, Stored, StoredText, shard};
use crate::compute::MerchantResult;

/// Rows per `INSERT` statement: large enough to amortise round trips, small
/// enough for the server's packet size with typical metrics.
const CHUNK_ROWS: usize = 1000;

/// The hot result store over a MySQL pool.
#[derive(Clone, Debug)]
pub struct HotStore {
    pub(super) pool: Pool,
    pub(super) base: String,
    databases: u32,
    tables: u32,
}

impl HotStore {
    /// Databases results are spread over unless configured otherwise.
    pub const DEFAULT_DATABASES: u32 = 2;
    /// Tables per database unless configured otherwise.
    pub const DEFAULT_TABLES: u32 = 4;

    /// A store over `pool` with shards `<base_database>_r0..databases`, each with
    /// tables `results_0..tables` (zero counts mean one). The pool must not set
    /// `client_found_rows` (see [`ResultsError::FoundRows`]).
    pub fn new(pool: Pool, base_database: &str, databases: u32, tables: u32) -> Self {
        Self {
            pool,
            base: base_database.to_owned(),
            databases: databases.max(1),
            tables: tables.max(1),
        }
    }

    /// The quoted name of a shard table: `` `<base>_r<database>`.`results_<table>` ``.
    pub fn table_name(&self, database: u32, table: u32) -> String {
        format!("{}.`results_{table}`", database_name(&self.base, database))
    }

    pub(super) fn shards(&self) -> impl Iterator<Item = (u32, u32)> + use<> {
        let tables = self.tables;
        (0..self.databases).flat_map(move |d| (0..tables).map(move |t| (d, t)))
    }

    /// Creates the shard databases and tables that do not exist yet.
    pub async fn ensure_schema(&self) -> Result<(), ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        for database in 0..self.databases {
            let name = database_name(&self.base, database);
            conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS {name}"))
                .await?;
        }
        for (database, table) in self.shards() {
            // utf8mb4_bin: merchant ids and pipeline names compare exactly
            // (`M1` and `m1` are different merchants).
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} (
                   pipeline VARCHAR(253) NOT NULL,
                   granularity VARCHAR(8) NOT NULL,
                   window_start_ms BIGINT NOT NULL,
                   merchant_id VARCHAR(191) NOT NULL,
                   metrics LONGTEXT NOT NULL,
                   version BIGINT UNSIGNED NOT NULL,
                   written_at DATETIME(6) NOT NULL,
                   PRIMARY KEY (pipeline, granularity, window_start_ms, merchant_id),
                   KEY by_merchant (pipeline, merchant_id, window_start_ms)
                 ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
                self.table_name(database, table)
            );
            conn.query_drop(ddl).await?;
        }
        Ok(())
    }

    /// Writes `results` for `slot` at `version`: one statement per shard table
    /// and chunk, each atomic. Rows whose stored version is higher are refused
    /// and counted, never overwritten.
    pub async fn write(
        &self,
        slot: &Slot,
        version: u64,
        results: &[MerchantResult],
    ) -> Result<Fenced, ResultsError> {
        let mut seen = HashSet::with_capacity(results.len());
        let mut groups: BTreeMap<(u32, u32), Vec<&MerchantResult>> = BTreeMap::new();
        for result in results {
            if !seen.insert(result.merchant_id.as_str()) {
                return Err(ResultsError::DuplicateMerchant(result.merchant_id.clone()));
            }
            groups
                .entry(shard(&result.merchant_id, self.databases, self.tables))
                .or_default()
                .push(result);
        }
        if groups.is_empty() {
            return Ok(Fenced::default());
        }
        let mut conn = self.pool.get_conn().await?;
        if conn.opts().client_found_rows() {
            return Err(ResultsError::FoundRows);
        }
        let mut total = Fenced::default();
        for ((database, table), mut rows) in groups {
            // Primary-key order (merchant ids compare bytewise, like the
            // utf8mb4_bin column): concurrent attempts at the same slot lock
            // rows in the same order and do not deadlock each other.
            rows.sort_unstable_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
            let table = self.table_name(database, table);
            for chunk in rows.chunks(CHUNK_ROWS) {
                let mut params: Vec<Value> = Vec::with_capacity(chunk.len() * 6);
                for result in chunk {
                    let metrics = serde_json::Value::Object(result.metrics.clone()).to_string();
                    params.extend([
                        Value::from(slot.pipeline.as_str()),
                        Value::from(slot.granularity.as_str()),
                        Value::from(slot.window_start_ms),
                        Value::from(result.merchant_id.as_str()),
                        Value::from(metrics),
                        Value::from(version),
                    ]);
                }
                conn.exec_drop(insert_statement(&table, chunk.len()), params)
                    .await?;
                total += count(chunk.len() as u64, conn.affected_rows(), &conn.info())?;
            }
        }
        Ok(total)
    }

    /// Every merchant's stored result for `slot`, across all shards.
    pub async fn read(&self, slot: &Slot) -> Result<BTreeMap<String, Stored>, ResultsError> {
        let mut conn = self.pool.get_conn().await?;
        let mut out = BTreeMap::new();
        for (database, table) in self.shards() {
            let table = self.table_name(database, table);
            let rows: Vec<(String, String, u64)> = conn
                .exec(
                    format!(
                        "SELECT merchant_id, metrics, version FROM {table}
                         WHERE pipeline = ? AND granularity = ? AND window_start_ms = ?"
                    ),
                    (
                        slot.pipeline.as_str(),
                        slot.granularity.as_str(),
                        slot.window_start_ms,
                    ),
                )
                .await?;
            for (merchant, metrics, version) in rows {
                let metrics = parse_metrics(&metrics, &table, &merchant)?;
                out.insert(merchant, Stored { version, metrics });
            }
        }
        Ok(out)
    }

    /// One merchant's stored result for `slot`, if any.
    pub async fn read_merchant(&self, slot: &Slot, merchant: &str) -> Result<Option<Stored>, ResultsError> {
        let (database, table) = shard(merchant, self.databases, self.tables);
        let table = self.table_name(database, table);
        let mut conn = self.pool.get_conn().await?;
        let row: Option<(String, u64)> = conn
            .exec_first(
                format!(
                    "SELECT metrics, version FROM {table}
                     WHERE pipeline = ? AND granularity = ? AND window_start_ms = ? AND merchant_id = ?"
                ),
                (
                    slot.pipeline.as_str(),
                    slot.granularity.as_str(),
                    slot.window_start_ms,
                    merchant,
                ),
            )
            .await?;
        row.map(|(metrics, version)| {
            Ok(Stored {
                version,
                metrics: parse_metrics(&metrics, &table, merchant)?,
            })
        })
        .transpose()
    }
}

impl HotStore {
    /// Every result of one merchant with a start in `[from_ms, to_ms)`, every
    /// granularity, from its shard (the `by_merchant` index).
    pub async fn read_merchant_range(
        &self,
        pipeline: &str,
        merchant: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<BTreeMap<(Granularity, i64), StoredText>, ResultsError> {
        let (database, table) = shard(merchant, self.databases, self.tables);
        let table = self.table_name(database, table);
        let mut conn = self.pool.get_conn().await?;
        let rows: Vec<(String, i64, String, u64)> = conn
            .exec(
                format!(
                    "SELECT granularity, window_start_ms, metrics, version FROM {table}
                     WHERE pipeline = ? AND merchant_id = ? AND window_start_ms >= ? AND window_start_ms < ?"
                ),
                (pipeline, merchant, from_ms, to_ms),
            )
            .await?;
        let mut out = BTreeMap::new();
        for (granularity, start, metrics, version) in rows {
            // A granularity this version does not know (a newer writer's) is skipped.
            let Some(granularity) = Granularity::parse(&granularity) else {
                continue;
            };
            let stored = StoredText::checked(version, metrics).map_err(|reason| ResultsError::Corrupt {
                location: format!("{table} merchant {merchant:?}"),
                reason,
            })?;
            out.insert((granularity, start), stored);
        }
        Ok(out)
    }
}

/// The quoted name of shard database `database`; backticks are doubled inside a quoted identifier.
pub(super) fn database_name(base: &str, database: u32) -> String {
    format!("`{}_r{database}`", base.replace('`', "``"))
}

pub(super) fn parse_metrics(
    text: &str,
    table: &str,
    merchant: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ResultsError> {
    serde_json::from_str(text).map_err(|e| ResultsError::Corrupt {
        location: format!("{table} merchant {merchant:?}"),
        reason: e.to_string(),
    })
}

/// The fenced multi-row upsert of `rows` rows into `table`.
fn insert_statement(table: &str, rows: usize) -> String {
    let mut sql = format!(
        "INSERT INTO {table} (pipeline, granularity, window_start_ms, merchant_id, metrics, version, written_at) VALUES "
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, NOW(6))");
    }
    // `version` last: the conditions before it must see the stored version.
    sql.push_str(
        " ON DUPLICATE KEY UPDATE \
         metrics = IF(VALUES(version) >= version, VALUES(metrics), metrics), \
         written_at = IF(VALUES(version) >= version, \
                         GREATEST(NOW(6), written_at + INTERVAL 1 MICROSECOND), written_at), \
         version = IF(VALUES(version) >= version, VALUES(version), version)",
    );
    sql
}

/// `Records: N  Duplicates: D  Warnings: W` → (N, D).
fn parse_info(info: &str) -> Option<(u64, u64)> {
    let mut words = info.split_whitespace();
    let mut field = |name: &str| {
        (words.next()? == name)
            .then(|| words.next()?.parse::<u64>().ok())
            .flatten()
    };
    let records = field("Records:")?;
    let duplicates = field("Duplicates:")?;
    Some((records, duplicates))
}

/// What one fenced upsert of `rows` rows did, from the server's counts.
///
/// Without `CLIENT_FOUND_ROWS`, a row counts 1 affected when inserted, 2 when
/// an existing row was changed (an accepted write: `written_at` always moves)
/// and 0 when left as it was (refused). The info string's `Duplicates` counts
/// the changed rows only (MariaDB and MySQL alike), so
/// inserted = affected − 2·D, and refused = rows − inserted − D. A single-row
/// statement gets no info string: its affected count alone says which.
fn count(rows: u64, affected: u64, info: &str) -> Result<Fenced, ResultsError> {
    let bad = |why: &str| ResultsError::Reply {
        rows,
        detail: format!("{why}: affected {affected}, info {info:?}"),
    };
    let updated = match parse_info(info) {
        Some((records, _)) if records != rows => return Err(bad("records differ from rows sent")),
        Some((_, duplicates)) => duplicates,
        None if rows == 1 => u64::from(affected == 2),
        None => return Err(bad("no info string for a multi-row statement")),
    };
    let inserted = affected
        .checked_sub(2 * updated)
        .ok_or_else(|| bad("fewer affected rows than updates"))?;
    let refused = rows
        .checked_sub(inserted + updated)
        .ok_or_else(|| bad("more rows written than sent"))?;
    Ok(Fenced {
        written: inserted + updated,
        refused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (rows sent, affected rows, info string, expected (written, refused)).
    type Case = (u64, u64, &'static str, Option<(u64, u64)>);

    #[test]
    fn server_counts_give_written_and_refused_rows() {
        let cases: &[Case] = &[
            // Observed on MariaDB 10.11: 2 inserted, 2 replaced, 1 refused.
            (5, 6, "Records: 5  Duplicates: 2  Warnings: 0", Some((4, 1))),
            (3, 3, "Records: 3  Duplicates: 0  Warnings: 0", Some((3, 0))),
            (3, 0, "Records: 3  Duplicates: 0  Warnings: 0", Some((0, 3))),
            (3, 6, "Records: 3  Duplicates: 3  Warnings: 0", Some((3, 0))),
            (4, 2, "Records: 4  Duplicates: 1  Warnings: 0", Some((1, 3))),
            (1, 1, "", Some((1, 0))),
            (1, 2, "", Some((1, 0))),
            (1, 0, "", Some((0, 1))),
            (2, 2, "", None),
            (3, 3, "Records: 2  Duplicates: 0  Warnings: 0", None),
            (3, 1, "Records: 3  Duplicates: 1  Warnings: 0", None),
            (2, 3, "Records: 2  Duplicates: 0  Warnings: 0", None),
        ];
        for &(rows, affected, info, expected) in cases {
            let got = count(rows, affected, info).ok().map(|f| (f.written, f.refused));
            assert_eq!(got, expected, "{rows} rows, {affected} affected, {info:?}");
        }
    }

    #[test]
    fn info_strings_parse_or_are_absent() {
        let cases = [
            ("Records: 5  Duplicates: 2  Warnings: 0", Some((5, 2))),
            ("Records: 10  Duplicates: 0  Warnings: 3", Some((10, 0))),
            ("", None),
            ("Rows matched: 1  Changed: 1  Warnings: 0", None),
            ("Records: x  Duplicates: 2", None),
        ];
        for (info, expected) in cases {
            assert_eq!(parse_info(info), expected, "{info:?}");
        }
    }

    #[test]
    fn the_upsert_assigns_version_last_and_quotes_names() {
        assert_eq!(database_name("ball`ast", 1), "`ball``ast_r1`");
        let sql = insert_statement("`b_r0`.`results_0`", 2);
        assert_eq!(sql.matches("(?, ?, ?, ?, ?, ?, NOW(6))").count(), 2);
        let update = sql.split("ON DUPLICATE KEY UPDATE").nth(1).unwrap_or_default();
        let order: Vec<usize> = ["metrics =", "written_at =", "version ="]
            .iter()
            .filter_map(|a| update.find(a))
            .collect();
        assert_eq!(order.len(), 3);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{update}");
    }
}
