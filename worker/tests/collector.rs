//! `ballast-worker collector` with an intake, against the local stack's real
//! MariaDB binlog, Kafka, KV Redis and API server: N inserted orders become
//! exactly N events in the KV store, across a collector crash, and across a
//! Kafka outage (the collector switches to the backup intake, paces its calls
//! under the intake's rate budget, and goes back).

use std::time::{Duration, Instant};

use ballast_e2e::scenario;
use ballast_e2e::{Stack, stack_script};
use ballast_worker::kv::{KvStore, Layout};
use k8s_openapi::jiff::Timestamp;
use mysql_async::prelude::Queryable;
use serde_json::json;

const WINDOW_MS: i64 = 60_000;

async fn insert(conn: &mut mysql_async::Conn, table: &str, from: usize, n: usize) -> anyhow::Result<()> {
    // Ten rows per transaction: the collector checkpoints at each commit.
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(10) {
        let mut tx = conn.start_transaction(Default::default()).await?;
        for i in chunk {
            tx.exec_drop(
                format!("INSERT INTO `{table}` (merchant_id, amount) VALUES (?, ?)"),
                (format!("m{}", i % 13), *i as u64),
            )
            .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

async fn stored(kv: &mut KvStore, around: i64) -> anyhow::Result<usize> {
    let mut n = 0;
    for w in [around - WINDOW_MS, around, around + WINDOW_MS] {
        n += kv.window(w / WINDOW_MS * WINDOW_MS).await?.len();
    }
    Ok(n)
}

async fn until_stored(kv: &mut KvStore, around: i64, want: usize, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = stored(kv, around).await?;
        if n >= want {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let settled = stored(kv, around).await?;
            anyhow::ensure!(settled == want, "{settled} events stored, want exactly {want}");
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} of {want} events stored after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn orders_reach_the_kv_store_exactly_once_across_a_crash_and_a_kafka_outage() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    // A backup budget below what queues up during the outage: the collector
    // must pace its calls under it, not retry one oversized call for ever.
    // No shedding, so every order must arrive.
    let policy = json!({"mq": {"produceRetries": 1, "backupIntakeRatePerSecond": 20, "maxShedPercent": 0}});
    let (ns, pipeline) = stack.pipeline_fixture(&client, "co", policy).await?;
    let _restore = scenario::RestoreStack;

    // The fixture pipeline tracks table `orders` of database `ballast`.
    let mut db = stack.source_orders().await?;
    let conn = redis::Client::open(stack.get("BALLAST_REDIS_KV_URL")?.as_str())?
        .get_connection_manager()
        .await?;
    let mut kv = KvStore::new(conn, Layout::new(&pipeline, WINDOW_MS), 300);
    let now = Timestamp::now().as_millisecond();

    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
    let _intake = stack.worker(worker, "intake", &ns, &pipeline, "intake-0")?;
    // Ready once its binlog stream is open.
    let port = scenario::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let env = [("BALLAST_METRICS_ADDR", metrics.as_str())];
    let collector = stack.worker_with(worker, &["collector"], &ns, &pipeline, "collector-0", &env)?;
    scenario::until_ready(port, 30).await?;

    insert(&mut db, "orders", 0, 100).await?;
    until_stored(&mut kv, now, 100, 60).await?;

    // A crash: the collector resumes from its checkpoint, nothing lost or doubled.
    drop(collector);
    insert(&mut db, "orders", 100, 100).await?;
    let _collector = stack.worker_with(worker, &["collector"], &ns, &pipeline, "collector-0", &env)?;
    scenario::until_ready(port, 30).await?;
    until_stored(&mut kv, now, 200, 60).await?;

    // Kafka down: after the policy's retries the collector goes to the backup intake.
    stack_script(&["stop", "kafka"])?;
    insert(&mut db, "orders", 200, 50).await?;
    until_stored(&mut kv, now, 250, 90).await?;
    let switches = scenario::metric(port, "ballast_collector_path_switches_total").await?;
    assert!(
        switches.is_some_and(|n| n >= 1.0),
        "no path switch counted: {switches:?}"
    );

    // Kafka back: the collector returns to it, with no gap and no duplicate.
    stack_script(&["up"])?;
    insert(&mut db, "orders", 250, 50).await?;
    until_stored(&mut kv, now, 300, 90).await?;
    Ok(())
}
