//! `make bench`: the cost of one history query in the query service's
//! in-memory engine, against DataFusion on the same rows and query, in the
//! same run: (i) DataFusion as a request would use it (the rows into a
//! record batch, a session, the SQL planned and run); (ii) DataFusion with
//! the table registered once (planning and running only). A year of one
//! merchant's daily rows; three query shapes; medians of 5 runs.

use std::collections::BTreeMap;
use std::time::Instant;

use ballast_worker::cold::Day;
use ballast_worker::roles::query::history::engine::{self, Row, Value};
use ballast_worker::roles::query::history::{arrow, query};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DAYS: i32 = 365;
const RUNS: usize = 5;
const PER_RUN: usize = 200;

fn rows(today: Day) -> Vec<Row> {
    (1..=DAYS)
        .map(|back| {
            let day = Day(today.0 - back);
            let values: BTreeMap<String, Value> = [
                ("gmv", Value::Int((i64::from(day.0) * 7919) % 20_000)),
                ("orders", Value::Int(30 + i64::from(back % 7))),
                ("avg_order_value", Value::Float(123.5 + f64::from(back))),
                ("top_items", Value::Text(format!("item-{},item-2", back % 5))),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            Row { day, values }
        })
        .collect()
}

fn batch(rows: &[Row]) -> anyhow::Result<RecordBatch> {
    let columns = [
        ("gmv", DataType::Int64),
        ("orders", DataType::Int64),
        ("avg_order_value", DataType::Float64),
        ("top_items", DataType::Utf8),
    ];
    Ok(arrow::record_batch(rows, &columns)?)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Microseconds per call of `f`, the median of [`RUNS`] runs of [`PER_RUN`] calls.
async fn per_call<F, Fut>(mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        for _ in 0..PER_RUN {
            std::hint::black_box(f().await?);
        }
        runs.push(started.elapsed().as_secs_f64() * 1e6 / PER_RUN as f64);
    }
    Ok(median(runs))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let today = Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond());
    let rows = rows(today);
    let (from, to) = (Day(today.0 - DAYS), Day(today.0 - 1));
    let shapes = [
        (
            "days with gmv >= 5000, by gmv desc, 30",
            format!("from={from}&to={to}&where=gmv>=5000&sort=gmv:desc&limit=30"),
            format!(
                "SELECT d, gmv, orders, avg_order_value, top_items FROM t WHERE d BETWEEN {} AND {} AND gmv >= 5000 \
                 ORDER BY gmv DESC NULLS LAST, d LIMIT 30",
                from.0, to.0
            ),
        ),
        (
            "by week: sum, avg, count, top 10 by sum",
            format!(
                "from={from}&to={to}&groupBy=week&aggregate=sum:gmv&aggregate=avg:avg_order_value\
                 &aggregate=count&sort=sum_gmv:desc&limit=10"
            ),
            format!(
                "SELECT d - ((d + 3) % 7) AS key, SUM(gmv) AS sum_gmv, AVG(avg_order_value), COUNT(*) FROM t \
                 WHERE d BETWEEN {} AND {} GROUP BY d - ((d + 3) % 7) ORDER BY sum_gmv DESC NULLS LAST, key LIMIT 10",
                from.0, to.0
            ),
        ),
        (
            "by a keyword column: count, max",
            format!("from={from}&to={to}&groupBy=top_items&aggregate=count&aggregate=max:orders"),
            format!(
                "SELECT top_items AS key, COUNT(*), MAX(orders) FROM t WHERE d BETWEEN {} AND {} \
                 GROUP BY top_items ORDER BY key NULLS LAST LIMIT 100",
                from.0, to.0
            ),
        ),
    ];
    let columns: ballast_worker::cold::Columns = [
        ("gmv", ballast_worker::cold::ColumnType::Number),
        ("orders", ballast_worker::cold::ColumnType::Number),
        ("avg_order_value", ballast_worker::cold::ColumnType::Number),
        ("top_items", ballast_worker::cold::ColumnType::Keyword),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let registered = SessionContext::new();
    registered.register_batch("t", batch(&rows)?)?;
    println!("history engine bench ({DAYS} daily rows, medians of {RUNS} runs of {PER_RUN} queries)");
    println!(
        "{:<42} {:>12} {:>16} {:>16} {:>8} {:>8}",
        "query", "engine µs", "DataFusion µs", "DF planned µs", "ratio", "ratio"
    );
    for (name, request, sql) in &shapes {
        let pairs: Vec<(String, String)> = request
            .split('&')
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let q = query::parse(&pairs, today)
            .and_then(|p| p.resolve(&columns))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let ours = per_call(|| {
            let groups = engine::evaluate(&q, &rows);
            async move { Ok(groups.len()) }
        })
        .await?;
        let ours_rows = engine::evaluate(&q, &rows).len();
        let full = per_call(|| async {
            let ctx = SessionContext::new();
            ctx.register_batch("t", batch(&rows)?)?;
            let out = ctx.sql(sql).await?.collect().await?;
            Ok(out.iter().map(RecordBatch::num_rows).sum())
        })
        .await?;
        let planned = per_call(|| async {
            let out = registered.sql(sql).await?.collect().await?;
            Ok(out.iter().map(RecordBatch::num_rows).sum::<usize>())
        })
        .await?;
        let theirs_rows: usize = registered
            .sql(sql)
            .await?
            .collect()
            .await?
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        anyhow::ensure!(
            ours_rows == theirs_rows,
            "{name}: {ours_rows} rows, DataFusion {theirs_rows}"
        );
        println!(
            "{name:<42} {ours:>12.1} {full:>16.1} {planned:>16.1} {:>7.1}x {:>7.1}x",
            full / ours,
            planned / ours
        );
    }
    Ok(())
}
