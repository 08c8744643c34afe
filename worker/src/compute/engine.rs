//! The pipeline's SQL, parsed once, run with Apache DataFusion over one window's
//! tables; the final statement's rows are the merchants' results.
//!
//! Tables are registered under their source table names exactly as the events
//! carry them, and JSON keys become column names as written: SQL folds unquoted
//! identifiers to lower case, so a mixed-case name must be double-quoted.
//! Given the source schema the operator publishes, every tracked table has its
//! source column types, and one with no event in the window is registered
//! empty; without it (before the operator first read the source), types are
//! inferred and a table with no event is not registered.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;

use super::output::results;
use super::{ComputeError, MerchantResult, frame};
use crate::routing::stable_hash;
use crate::wire::ChangeEvent;
use ballast_crds::SourceSchema;

/// Rows per batch, in the tables and as DataFusion's batch size. Measured with
/// the sample SQL over a million rows on two cores: 64 Ki rows ran the SQL
/// about 1.4x as fast as DataFusion's default of 8 Ki (fewer, larger batches
/// through aggregation and repartitioning); 128-256 Ki were no faster.
pub const BATCH_ROWS: usize = 65_536;

/// A pipeline's SQL: statements separated by `;`, run in order; the last one's
/// output is the result (earlier ones are typically `CREATE VIEW ... AS`).
#[derive(Debug, Clone)]
pub struct Sql {
    id: u64,
    identity: String,
    statements: Vec<Statement>,
}

impl Sql {
    /// Parses `text` (DataFusion's dialect; `--` and `/* */` comments allowed)
    /// and refuses any statement but queries and views over them
    /// ([`ballast_crds::sql::allowed`]): a slave runs only what an analytics
    /// statement needs, whatever reached it.
    pub fn parse(text: &str) -> Result<Self, ComputeError> {
        let statements = DFParser::parse_sql_with_dialect(text, &GenericDialect {})
            .map_err(|e| ComputeError::Parse(e.to_string()))?;
        if statements.is_empty() {
            return Err(ComputeError::NoStatement);
        }
        for (i, statement) in statements.iter().enumerate() {
            let refused = |kind: String, why: String| ComputeError::Refused {
                number: i + 1,
                kind,
                why,
            };
            match statement {
                Statement::Statement(inner) => ballast_crds::sql::allowed(inner)
                    .map_err(|why| refused(ballast_crds::sql::kind(inner), why))?,
                other => {
                    let kind: String = format!("{other:?}")
                        .chars()
                        .take_while(char::is_ascii_alphanumeric)
                        .collect();
                    return Err(refused(
                        kind,
                        "reads or writes outside the window's tables".into(),
                    ));
                }
            }
        }
        Ok(Self {
            id: stable_hash(text.as_bytes()),
            identity: ballast_crds::sql::id(text),
            statements: statements.into(),
        })
    }

    /// A stable hash of the text: the master keeps duration history per SQL by it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The identity results record (`ballast_crds::sql::id` of the text).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How many statements the SQL has.
    pub fn statements(&self) -> usize {
        self.statements.len()
    }
}

/// Runs `sql` over a window's `events`: one result per merchant, sorted by
/// merchant. No events → no results, without running the SQL. Its operators
/// (aggregations, sorts, joins) may hold `memory_limit` bytes between them;
/// past that the statement fails with [`ComputeError::OutOfMemory`] (there is
/// no disk to spill to).
///
/// CPU-bound throughout: the tables are built on scoped threads while the
/// calling task's thread waits, then DataFusion runs with one partition per
/// CPU. A slave runs it on its [`Engine`](super::runtime::Engine).
pub async fn run(
    sql: &Sql,
    events: &[ChangeEvent],
    schema: Option<&SourceSchema>,
    memory_limit: Option<usize>,
) -> Result<Vec<MerchantResult>, ComputeError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let threads = frame::parallelism();
    let tables = frame::partitioned(events, threads, schema)?;
    let config = SessionConfig::new()
        .with_target_partitions(threads)
        .with_batch_size(BATCH_ROWS)
        .with_information_schema(false);
    let engine = |e: DataFusionError| ComputeError::Engine(e.to_string());
    let mut runtime = RuntimeEnvBuilder::new()
        .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled));
    if let Some(limit) = memory_limit {
        runtime = runtime.with_memory_limit(limit, 1.0);
    }
    let ctx = SessionContext::new_with_config_rt(config, runtime.build_arc().map_err(engine)?);
    for (name, batches) in tables {
        let Some(schema) = batches.first().map(RecordBatch::schema) else {
            continue;
        };
        let table = MemTable::try_new(schema, spread(&batches, threads)).map_err(engine)?;
        ctx.register_table(TableReference::bare(name), Arc::new(table))
            .map_err(engine)?;
    }

    let total = sql.statements.len();
    let mut output = (Arc::new(Schema::empty()), Vec::new());
    for (i, statement) in sql.statements.iter().enumerate() {
        let failed = |e: DataFusionError| {
            let message = e.to_string();
            match e.find_root() {
                DataFusionError::ResourcesExhausted(_) => ComputeError::OutOfMemory {
                    number: i + 1,
                    total,
                    message,
                },
                _ => ComputeError::Statement {
                    number: i + 1,
                    total,
                    message,
                },
            }
        };
        let plan = ctx
            .state()
            .statement_to_plan(statement.clone())
            .await
            .map_err(failed)?;
        let frame = ctx.execute_logical_plan(plan).await.map_err(failed)?;
        let schema = Arc::new(frame.schema().as_arrow().clone());
        output = (schema, frame.collect().await.map_err(failed)?);
    }
    results(&output.0, &output.1)
}

/// Whether `text` is allowed and each statement plans over the source tables
/// of `schema` (empty tables of their types): what the master checks before
/// it adopts a published SQL. Nothing runs but view definitions. Without a
/// schema (not read yet), only the allowlist is checked.
pub async fn check_plans(text: &str, schema: Option<&SourceSchema>) -> Result<(), ComputeError> {
    let sql = Sql::parse(text)?;
    let Some(schema) = schema else {
        return Ok(());
    };
    let engine = |e: DataFusionError| ComputeError::Engine(e.to_string());
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(false));
    for (name, batches) in super::typed::conform(std::collections::BTreeMap::new(), schema)? {
        let Some(table_schema) = batches.first().map(RecordBatch::schema) else {
            continue;
        };
        let table = MemTable::try_new(table_schema, vec![batches]).map_err(engine)?;
        ctx.register_table(TableReference::bare(name), Arc::new(table))
            .map_err(engine)?;
    }
    let total = sql.statements.len();
    for (i, statement) in sql.statements.iter().enumerate() {
        let failed = |e: DataFusionError| ComputeError::Statement {
            number: i + 1,
            total,
            message: e.to_string(),
        };
        let plan = ctx
            .state()
            .statement_to_plan(statement.clone())
            .await
            .map_err(failed)?;
        // A query only becomes a DataFrame; a view is registered for the next statements.
        ctx.execute_logical_plan(plan).await.map_err(failed)?;
    }
    Ok(())
}

/// Slices batches into [`BATCH_ROWS`]-row pieces dealt round-robin over
/// `partitions`: DataFusion scans each partition on its own thread, and a
/// single huge batch would keep all the work on one.
fn spread(batches: &[RecordBatch], partitions: usize) -> Vec<Vec<RecordBatch>> {
    let partitions = partitions.max(1);
    let mut out = vec![Vec::new(); partitions];
    let mut next = 0;
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = BATCH_ROWS.min(batch.num_rows() - offset);
            out[next % partitions].push(batch.slice(offset, len));
            next += 1;
            offset += len;
        }
    }
    out
}

/// Helpers shared by the unit tests of the compute module.
#[cfg(test)]
pub(crate) mod testing {
    use crate::wire::{ChangeEvent, Operation};

    /// An event of `table` with `op` and JSON `columns`.
    pub(crate) fn event(id: &str, table: &str, op: Operation, columns: serde_json::Value) -> ChangeEvent {
        ChangeEvent {
            event_id: id.to_owned(),
            merchant_id: String::new(),
            table: table.to_owned(),
            op: op.into(),
            event_time_ms: 60_000,
            columns: columns.to_string().into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::event;
    use super::*;
    use crate::compute::SAMPLE_SQL;
    use crate::wire::Operation::{Delete, Insert, Update};
    use datafusion::arrow::array::ArrayRef;
    use serde_json::json;
    use serde_json::{Map, Value};

    fn metrics(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn sql_parses_once_with_comments_and_counts_statements() {
        let cases: &[(&str, Result<usize, &str>)] = &[
            ("SELECT 1", Ok(1)),
            (
                "-- header\nCREATE VIEW v AS SELECT 1 AS a; /* block */ SELECT a FROM v;",
                Ok(2),
            ),
            ("SELECT 1;;SELECT 2;", Ok(2)),
            (SAMPLE_SQL, Ok(6)),
            ("", Err("no statement")),
            ("-- only a comment", Err("no statement")),
            ("SELEC 1", Err("does not parse")),
            ("SELECT (1", Err("does not parse")),
        ];
        for (text, expected) in cases {
            match (Sql::parse(text), expected) {
                (Ok(sql), Ok(n)) => assert_eq!(sql.statements(), *n, "{text}"),
                (Err(e), Err(part)) => assert!(e.to_string().contains(part), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn sql_id_is_a_stable_hash_of_the_text() {
        let a = Sql::parse("SELECT 1").map(|s| s.id()).ok();
        assert_eq!(a, Sql::parse("SELECT 1").map(|s| s.id()).ok());
        assert_eq!(a, Some(stable_hash(b"SELECT 1")));
        assert_ne!(a, Sql::parse("SELECT 1 ").map(|s| s.id()).ok());
    }

    fn order(id: i64, merchant: &str, amount: i64, user: &str, item: &str, status: &str) -> Value {
        json!({"id": id, "merchant_id": merchant, "amount": amount, "user_id": user, "item": item,
               "status": status, "created_at": "2026-05-01 10:00:00"})
    }

    /// Hand-built orders of five merchants; every expectation below is worked out by hand.
    fn sample_events() -> Vec<ChangeEvent> {
        let orders = [
            // m1: apple and banana tie at 2 paid (apple first by name), then
            // cherry and date tie at 1 (cherry first); one refund.
            (1, "m1", 1000, "u1", "apple", "paid"),
            (2, "m1", 2000, "u2", "banana", "paid"),
            (3, "m1", 500, "u1", "apple", "paid"),
            (4, "m1", 300, "u3", "cherry", "paid"),
            (5, "m1", 700, "u3", "banana", "paid"),
            (6, "m1", 100, "u4", "date", "paid"),
            (7, "m1", 900, "u2", "elder", "refunded"),
            // m2: refunds only.
            (8, "m2", 400, "u5", "fig", "refunded"),
            (9, "m2", 600, "u6", "fig", "refunded"),
            // m4: four items of one paid order each, inserted out of name order.
            (10, "m4", 10, "u7", "b", "paid"),
            (11, "m4", 20, "u7", "a", "paid"),
            (12, "m4", 30, "u7", "d", "paid"),
            (13, "m4", 40, "u7", "c", "paid"),
            // m5: rank by paid count, not by insertion or name: y (3), x (2), z (1).
            (14, "m5", 1, "u8", "z", "paid"),
            (15, "m5", 1, "u8", "y", "paid"),
            (16, "m5", 1, "u9", "x", "paid"),
            (17, "m5", 1, "u8", "y", "paid"),
            (18, "m5", 1, "u9", "x", "paid"),
            (19, "m5", 1, "u8", "y", "paid"),
            (20, "m5", 5, "u8", "w", "refunded"),
        ];
        let mut events: Vec<ChangeEvent> = orders
            .iter()
            .map(|&(id, m, amount, user, item, status)| {
                event(
                    &format!("e{id}"),
                    "orders",
                    Insert,
                    order(id, m, amount, user, item, status),
                )
            })
            .collect();
        // Ignored: a later update of order 7, a deletion of order 1, and m3's
        // update of an order placed in an earlier window.
        events.push(event(
            "e21",
            "orders",
            Update,
            order(7, "m1", 99_999, "u2", "elder", "paid"),
        ));
        events.push(event(
            "e22",
            "orders",
            Delete,
            order(1, "m1", 1000, "u1", "apple", "paid"),
        ));
        events.push(event(
            "e23",
            "orders",
            Update,
            order(0, "m3", 50, "u1", "apple", "paid"),
        ));
        events
    }

    #[tokio::test]
    async fn the_sample_sql_computes_the_hand_worked_metrics() -> Result<(), ComputeError> {
        let sql = Sql::parse(SAMPLE_SQL)?;
        let results = run(&sql, &sample_events(), None, None).await?;
        let expected = [
            (
                "m1",
                json!({"gmv": 4600, "orders": 7, "paid_orders": 6, "paying_users": 4,
                "avg_order_value": 4600.0 / 6.0, "refunds": 1, "refund_amount": 900,
                "top_items": "apple,banana,cherry"}),
            ),
            (
                "m2",
                json!({"gmv": 0, "orders": 2, "paid_orders": 0, "paying_users": 0,
                "avg_order_value": null, "refunds": 2, "refund_amount": 1000, "top_items": ""}),
            ),
            (
                "m4",
                json!({"gmv": 100, "orders": 4, "paid_orders": 4, "paying_users": 1,
                "avg_order_value": 25.0, "refunds": 0, "refund_amount": 0, "top_items": "a,b,c"}),
            ),
            (
                "m5",
                json!({"gmv": 6, "orders": 7, "paid_orders": 6, "paying_users": 2,
                "avg_order_value": 1.0, "refunds": 1, "refund_amount": 5, "top_items": "y,x,z"}),
            ),
        ];
        let expected: Vec<MerchantResult> = expected
            .into_iter()
            .map(|(m, v)| MerchantResult {
                merchant_id: m.to_owned(),
                metrics: metrics(v),
            })
            .collect();
        assert_eq!(results, expected);
        Ok(())
    }

    #[tokio::test]
    async fn no_events_means_no_results_without_running_the_sql() -> Result<(), ComputeError> {
        let sql = Sql::parse("SELECT * FROM nowhere")?;
        assert_eq!(run(&sql, &[], None, None).await?, vec![]);
        Ok(())
    }

    #[tokio::test]
    async fn output_columns_become_json_metrics_by_type() -> Result<(), ComputeError> {
        let sql = Sql::parse(
            "SELECT merchant_id, CAST(n AS INT) AS small, n * 2 AS big, n / 4.0 AS ratio,
                    CAST('NaN' AS DOUBLE) AS nan, n > 1 AS many, NULL AS nothing, label,
                    CAST(n AS DECIMAL(10, 2)) AS exact, CAST(n AS BIGINT UNSIGNED) AS unsigned
             FROM t",
        )?;
        let events = [event(
            "e1",
            "t",
            Insert,
            json!({"merchant_id": "m", "n": 3, "label": "x"}),
        )];
        let results = run(&sql, &events, None, None).await?;
        let want = json!({"small": 3, "big": 6, "ratio": 0.75, "nan": null, "many": true,
            "nothing": null, "label": "x", "exact": "3.00", "unsigned": 3});
        assert_eq!(results.len(), 1);
        assert_eq!(Value::Object(results[0].metrics.clone()), want);
        Ok(())
    }

    #[tokio::test]
    async fn bad_output_and_failing_statements_are_named_errors() {
        let events = [
            event("e1", "t", Insert, json!({"merchant_id": "m", "n": 1})),
            event("e2", "t", Insert, json!({"merchant_id": "m", "n": 2})),
            event("e3", "t", Insert, json!({"merchant_id": null, "n": 3})),
        ];
        let cases = [
            ("SELECT n FROM t", "must output a `merchant_id` column"),
            (
                "SELECT merchant_id FROM t WHERE n < 3",
                "merchant \"m\" more than once",
            ),
            ("SELECT merchant_id FROM t WHERE n = 3", "merchant_id is NULL"),
            ("SELECT n AS merchant_id FROM t", "is Int64, not a string"),
            (
                "CREATE VIEW v AS SELECT 1 AS a; SELECT * FROM orders",
                "statement 2 of 2 failed",
            ),
            ("SELECT merchant_id, nope FROM t", "statement 1 of 1 failed"),
            (
                "CREATE VIEW v AS SELECT * FROM t",
                "must output a `merchant_id` column",
            ),
        ];
        for (text, want) in cases {
            let got = match Sql::parse(text) {
                Ok(sql) => run(&sql, &events, None, None).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match got {
                Err(e) => assert!(e.to_string().contains(want), "{text}: {e}"),
                Ok(()) => panic!("{text}: expected an error containing {want:?}"),
            }
        }
    }

    #[tokio::test]
    async fn unknown_tables_are_named_in_the_error() -> Result<(), ComputeError> {
        let sql = Sql::parse("SELECT merchant_id FROM refunds")?;
        let events = [event("e1", "orders", Insert, json!({"merchant_id": "m"}))];
        match run(&sql, &events, None, None).await {
            Err(e @ ComputeError::Statement { .. }) => assert!(e.to_string().contains("refunds"), "{e}"),
            other => panic!("expected a statement error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn spreading_slices_batches_round_robin_without_losing_rows() {
        use datafusion::arrow::array::Int64Array;
        let batch = |n: i64| {
            RecordBatch::try_from_iter([("a", Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef)])
        };
        let cases = [
            (vec![0], 2),
            (vec![10], 2),
            (vec![20_000, 5], 2),
            (vec![BATCH_ROWS as i64 * 3], 1),
        ];
        for (sizes, partitions) in cases {
            let batches: Vec<RecordBatch> = sizes.iter().filter_map(|&n| batch(n).ok()).collect();
            let spread = spread(&batches, partitions);
            assert_eq!(spread.len(), partitions);
            let rows: usize = spread.iter().flatten().map(RecordBatch::num_rows).sum();
            assert_eq!(rows as i64, sizes.iter().sum::<i64>());
            assert!(spread.iter().flatten().all(|b| b.num_rows() <= BATCH_ROWS));
        }
    }

    #[tokio::test]
    async fn a_window_heavier_than_the_budget_fails_as_out_of_memory_on_the_engine()
    -> Result<(), ComputeError> {
        // Thousands of merchants grouped with distinct counts and item lists:
        // far more than 64 KiB of aggregation state, and no disk to spill to.
        let events: Vec<ChangeEvent> = (0..20_000)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    "orders",
                    Insert,
                    order(
                        i,
                        &format!("m{}", i % 5_000),
                        10,
                        &format!("u{i}"),
                        &format!("item{}", i % 97),
                        "paid",
                    ),
                )
            })
            .collect();
        use crate::compute::runtime::Engine;
        let engine = Engine::new(2, Sql::parse(SAMPLE_SQL)?, Some(64 * 1024))
            .map_err(|e| ComputeError::Engine(e.to_string()))?;
        match engine.run(None, events.clone(), None).await {
            Err(ComputeError::OutOfMemory { number, total, .. }) => assert_eq!(number, total),
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        // The same window within an ample budget computes.
        let ample = Engine::new(2, Sql::parse(SAMPLE_SQL)?, Some(1 << 30))
            .map_err(|e| ComputeError::Engine(e.to_string()))?;
        assert_eq!(ample.run(None, events, None).await?.len(), 5_000);
        Ok(())
    }
}
