//! `cargo bench --bench compute`: window compute throughput — rows per second
//! for the sample SQL (`worker/sql/orders.sql`) over a one-minute window of
//! 1,000,000 synthetic order events, encoded as the collector encodes them.
//!
//! Ours is the slave's whole compute path from decoded events:
//! `engine::run` = events → Arrow tables → DataFusion → merchant results.
//! The reference, measured in the same run over the same rows, is DataFusion's
//! own engine reading them from a CSV file the way its CLI would (register the
//! file, run the same statements), and, when the Python packages can be
//! installed (`compute_reference.py`), DataFusion-python and DuckDB over the
//! same file. Every figure is the median of 5 runs; every engine's output is
//! checked against ours (rows, total GMV, total orders).
//!
//! The frame race: the same events into a typed `orders` table by ours
//! (`frame::partitioned` with the source schema: inference, then the source
//! types) and by arrow-json's decoder given the schema, both on one thread
//! and ours also on every CPU; the tables are checked equal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_crds::{ColumnType, SourceColumn, SourceSchema};
use ballast_worker::compute::{SAMPLE_SQL, Sql, engine, frame, typed};
use ballast_worker::wire::{ChangeEvent, Operation};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::datasource::MemTable;
use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
use serde_json::{Map, Value};

const EVENTS: usize = 1_000_000;
const MERCHANTS: u64 = 3_000;
const USERS: u64 = 50_000;
const ITEMS: u64 = 200;
const WINDOW_START_MS: i64 = 1_777_600_800_000;
const RUNS: usize = 5;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One order row: the CSV line and the change event of the same row.
struct Order {
    event_id: String,
    op: &'static str,
    time_ms: i64,
    id: i64,
    merchant: String,
    amount: i64,
    user: String,
    item: String,
    status: &'static str,
    created_at: String,
}

fn orders() -> Vec<Order> {
    let mut rng = Rng(42);
    (0..EVENTS)
        .map(|i| {
            let offset_ms = (i as i64 * 60_000) / EVENTS as i64;
            // 97% new orders; the rest are updates of orders placed earlier.
            let op = if rng.below(100) < 97 { "INSERT" } else { "UPDATE" };
            let (seconds, micros) = (offset_ms / 1000, (offset_ms % 1000) * 1000);
            Order {
                event_id: format!("mysql-bin.000042:{}:0", 4 + i * 310),
                op,
                time_ms: WINDOW_START_MS + offset_ms,
                id: 10_000_000 + i as i64,
                merchant: format!("m{}", rng.below(MERCHANTS)),
                amount: 100 + rng.below(20_000) as i64,
                user: format!("u{}", rng.below(USERS)),
                item: format!("item-{:03}", rng.below(ITEMS)),
                status: if rng.below(100) < 5 { "refunded" } else { "paid" },
                created_at: format!("2026-05-01 02:00:{seconds:02}.{micros:06}"),
            }
        })
        .collect()
}

/// The rows as change events, columns encoded like the collector's
/// (`roles::collector::rows::event`: a serde_json map, keys sorted).
fn events(orders: &[Order]) -> Vec<ChangeEvent> {
    orders
        .iter()
        .map(|o| {
            let mut columns = Map::new();
            columns.insert("id".into(), Value::from(o.id));
            columns.insert("merchant_id".into(), Value::from(o.merchant.as_str()));
            columns.insert("amount".into(), Value::from(o.amount));
            columns.insert("user_id".into(), Value::from(o.user.as_str()));
            columns.insert("item".into(), Value::from(o.item.as_str()));
            columns.insert("status".into(), Value::from(o.status));
            columns.insert("created_at".into(), Value::from(o.created_at.as_str()));
            ChangeEvent {
                event_id: o.event_id.clone(),
                merchant_id: o.merchant.clone(),
                table: "orders".into(),
                op: if o.op == "INSERT" {
                    Operation::Insert
                } else {
                    Operation::Update
                }
                .into(),
                event_time_ms: o.time_ms,
                columns: serde_json::to_vec(&columns).unwrap_or_default(),
            }
        })
        .collect()
}

fn write_csv(orders: &[Order], path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        out,
        "_event_id,_op,_event_time_ms,amount,created_at,id,item,merchant_id,status,user_id"
    )?;
    for o in orders {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            o.event_id, o.op, o.time_ms, o.amount, o.created_at, o.id, o.item, o.merchant, o.status, o.user
        )?;
    }
    out.flush()?;
    Ok(())
}

/// What an engine computed, to check every engine computed the same.
#[derive(Debug, PartialEq, Eq)]
struct Check {
    merchants: usize,
    gmv: i64,
    orders: i64,
}

fn check_batches(batches: &[RecordBatch]) -> anyhow::Result<Check> {
    let mut check = Check {
        merchants: 0,
        gmv: 0,
        orders: 0,
    };
    for batch in batches {
        check.merchants += batch.num_rows();
        let sum = |name: &str| -> anyhow::Result<i64> {
            let column = batch
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("no column {name}"))?;
            Ok(column.as_primitive::<Int64Type>().iter().flatten().sum())
        };
        check.gmv += sum("gmv")?;
        check.orders += sum("orders")?;
    }
    Ok(check)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn config() -> SessionConfig {
    SessionConfig::new().with_target_partitions(frame::parallelism())
}

/// Runs every statement of the sample SQL on `ctx`; the last one's batches.
async fn statements(ctx: &SessionContext) -> anyhow::Result<Vec<RecordBatch>> {
    let parsed = datafusion::sql::parser::DFParser::parse_sql(SAMPLE_SQL)?;
    let mut last = Vec::new();
    for statement in parsed {
        let plan = ctx.state().statement_to_plan(statement).await?;
        last = ctx.execute_logical_plan(plan).await?.collect().await?;
    }
    Ok(last)
}

/// The same SQL by DataFusion over the CSV file, timed from the registered
/// file: with its defaults (as its CLI runs), or with ours (`tuned`).
async fn reference_csv(csv: &Path, tuned: bool) -> anyhow::Result<(Duration, Check)> {
    let config = if tuned {
        config().with_batch_size(engine::BATCH_ROWS)
    } else {
        config()
    };
    let ctx = SessionContext::new_with_config(config);
    let path = csv.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    ctx.register_csv("orders", path, CsvReadOptions::new().has_header(true))
        .await?;
    let start = Instant::now();
    let batches = statements(&ctx).await?;
    Ok((start.elapsed(), check_batches(&batches)?))
}

/// The same SQL by DataFusion over the already-built Arrow table: the SQL's
/// share of ours (informative).
async fn sql_only(batch: &RecordBatch) -> anyhow::Result<Duration> {
    let ctx = SessionContext::new_with_config(config().with_batch_size(engine::BATCH_ROWS));
    let parts = frame::parallelism();
    let mut slices: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts];
    let mut offset = 0;
    while offset < batch.num_rows() {
        let len = engine::BATCH_ROWS.min(batch.num_rows() - offset);
        slices[(offset / engine::BATCH_ROWS) % parts].push(batch.slice(offset, len));
        offset += len;
    }
    ctx.register_table(
        "orders",
        std::sync::Arc::new(MemTable::try_new(batch.schema(), slices)?),
    )?;
    let start = Instant::now();
    statements(&ctx).await?;
    Ok(start.elapsed())
}

/// `compute_reference.py` over the CSV: (engine, median seconds, check) per engine.
fn python_references(csv: &Path) -> anyhow::Result<Vec<(String, Duration, Check)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/compute_reference.py");
    let sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/orders.sql");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(csv)
        .arg(&sql)
        .arg(RUNS.to_string())
        .arg(frame::parallelism().to_string())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let field = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(-1);
        found.push((
            v.get("engine").and_then(Value::as_str).unwrap_or("?").to_owned(),
            Duration::from_secs_f64(v.get("median_s").and_then(Value::as_f64).unwrap_or(f64::NAN)),
            Check {
                merchants: usize::try_from(field("merchants")).unwrap_or(0),
                gmv: field("gmv"),
                orders: field("orders"),
            },
        ));
    }
    Ok(found)
}

/// The source schema of the bench's `orders` rows.
fn source_schema() -> SourceSchema {
    let column = |name: &str, type_| SourceColumn {
        name: name.into(),
        type_,
    };
    let columns = vec![
        column("id", ColumnType::Int64),
        column("merchant_id", ColumnType::Utf8),
        column("amount", ColumnType::Int64),
        column("user_id", ColumnType::Utf8),
        column("item", ColumnType::Utf8),
        column("status", ColumnType::Utf8),
        column("created_at", ColumnType::Utf8),
    ];
    [("orders".to_owned(), columns)].into()
}

/// The typed `orders` table by arrow-json's decoder: the JSON columns decoded
/// against the schema, the meta columns built beside them.
fn arrow_json_table(events: &[ChangeEvent], schema: &SourceSchema) -> anyhow::Result<RecordBatch> {
    use datafusion::arrow::array::{ArrayRef, Int64Builder, StringBuilder};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::json::ReaderBuilder;
    use std::sync::Arc;

    let columns = &schema["orders"];
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| Field::new(&c.name, typed::data_type(c.type_), true))
        .collect();
    let mut decoder = ReaderBuilder::new(Arc::new(Schema::new(fields.clone())))
        .with_batch_size(events.len().max(1))
        .build_decoder()?;
    let mut ids = StringBuilder::new();
    let mut ops = StringBuilder::new();
    let mut times = Int64Builder::new();
    for event in events {
        decoder.decode(&event.columns)?;
        ids.append_value(&event.event_id);
        ops.append_value(if event.op == Operation::Insert as i32 {
            "INSERT"
        } else {
            "UPDATE"
        });
        times.append_value(event.event_time_ms);
    }
    let decoded = decoder
        .flush()?
        .ok_or_else(|| anyhow::anyhow!("arrow-json decoded nothing"))?;
    let mut all = vec![
        Field::new(frame::META_COLUMNS[0], DataType::Utf8, false),
        Field::new(frame::META_COLUMNS[1], DataType::Utf8, false),
        Field::new(frame::META_COLUMNS[2], DataType::Int64, false),
    ];
    all.extend(fields);
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(ops.finish()),
        Arc::new(times.finish()),
    ];
    arrays.extend(decoded.columns().iter().cloned());
    Ok(RecordBatch::try_new(Arc::new(Schema::new(all)), arrays)?)
}

/// Ours against arrow-json's decoder, building the same typed table.
fn frame_race(events: &[ChangeEvent]) -> anyhow::Result<()> {
    use datafusion::arrow::compute::concat_batches;

    let schema = source_schema();
    let ours = |threads: usize| -> anyhow::Result<RecordBatch> {
        let mut tables = frame::partitioned(events, threads, Some(&schema))?;
        let parts = tables
            .remove("orders")
            .ok_or_else(|| anyhow::anyhow!("no orders table"))?;
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("no batch"))?;
        Ok(concat_batches(&first.schema(), &parts)?)
    };
    let (mut single, mut parallel, mut decoder) = (Vec::new(), Vec::new(), Vec::new());
    let (mut a, mut b) = (None, None);
    for _ in 0..RUNS {
        let start = Instant::now();
        a = Some(ours(1)?);
        single.push(start.elapsed());
        let start = Instant::now();
        ours(frame::parallelism())?;
        parallel.push(start.elapsed());
        let start = Instant::now();
        b = Some(arrow_json_table(events, &schema)?);
        decoder.push(start.elapsed());
    }
    anyhow::ensure!(a == b, "ours and arrow-json built different tables");
    let baseline = median(decoder);
    println!("frame race: {EVENTS} events into a typed orders table, median of {RUNS}");
    for (name, elapsed) in [
        ("arrow-json decoder with the schema (1 thread)", baseline),
        ("ours: inference + source types (1 thread)", median(single)),
        ("ours: inference + source types (all threads)", median(parallel)),
    ] {
        println!(
            "  {name:<46} {:>9.3} s {:>12.0} rows/s {:>6.2} x arrow-json",
            elapsed.as_secs_f64(),
            rate(elapsed),
            rate(elapsed) / rate(baseline)
        );
    }
    Ok(())
}

fn rate(elapsed: Duration) -> f64 {
    EVENTS as f64 / elapsed.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let orders = orders();
    let events = events(&orders);
    let csv: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compute-orders.csv");
    write_csv(&orders, &csv)?;
    drop(orders);
    let sql = Sql::parse(SAMPLE_SQL)?;
    let mut ours = Vec::new();
    let mut results = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        results = engine::run(&sql, &events, None, None).await?;
        ours.push(start.elapsed());
    }
    let metric = |r: &ballast_worker::compute::MerchantResult, k: &str| {
        r.metrics.get(k).and_then(Value::as_i64).unwrap_or(0)
    };
    let our_check = Check {
        merchants: results.len(),
        gmv: results.iter().map(|r| metric(r, "gmv")).sum(),
        orders: results.iter().map(|r| metric(r, "orders")).sum(),
    };

    let mut frames = Vec::new();
    let mut table = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        table = frame::tables(&events)?.remove("orders");
        frames.push(start.elapsed());
    }
    let table = table.ok_or_else(|| anyhow::anyhow!("no orders table"))?;
    let mut sql_times = Vec::new();
    for _ in 0..RUNS {
        sql_times.push(sql_only(&table).await?);
    }
    drop(table);

    let mut reference = Vec::new();
    let mut tuned = Vec::new();
    for _ in 0..RUNS {
        for (is_tuned, times) in [(false, &mut reference), (true, &mut tuned)] {
            let (elapsed, check) = reference_csv(&csv, is_tuned).await?;
            anyhow::ensure!(
                check == our_check,
                "DataFusion over CSV computed {check:?}, ours {our_check:?}"
            );
            times.push(elapsed);
        }
    }
    let (ours, reference) = (median(ours), median(reference));

    println!(
        "window compute: sample SQL over {EVENTS} order events, {MERCHANTS} merchants, {} threads, median of {RUNS}",
        frame::parallelism()
    );
    println!(
        "{:<48} {:>9} {:>12} {:>14}",
        "engine", "seconds", "rows/s", "ours/engine"
    );
    let line = |name: &str, elapsed: Duration| {
        println!(
            "{name:<48} {:>9.3} {:>12.0} {:>14.2}",
            elapsed.as_secs_f64(),
            rate(elapsed),
            rate(ours) / rate(elapsed)
        );
    };
    line("ours: engine::run (events -> Arrow -> SQL)", ours);
    line("reference: DataFusion 55.2 over CSV (in process)", reference);
    line("  same, with our batch size", median(tuned));
    match python_references(&csv) {
        Ok(found) => {
            for (engine, elapsed, check) in found {
                let agrees = if check == our_check {
                    ""
                } else {
                    "  (DIFFERENT RESULT!)"
                };
                line(&format!("reference: {engine} over CSV{agrees}"), elapsed);
            }
        }
        Err(e) => println!("python references skipped: {e}"),
    }
    line("  (part) frame::tables: events -> Arrow", median(frames));
    frame_race(&events)?;
    line("  (part) DataFusion 55.2 SQL over built Arrow", median(sql_times));
    println!(
        "ours = {:.2} x the in-process reference (target >= 0.70); output {our_check:?}",
        rate(ours) / rate(reference)
    );
    Ok(())
}
