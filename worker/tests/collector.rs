//! `ballast-worker collector` with an intake, against the local stack's real
//! MariaDB binlog, Kafka, KV Redis and API server: N inserted orders become
//! exactly N events in the KV store, across a collector crash, and across a
//! Kafka outage (the collector switches to the backup intake, paces its calls
//! under the intake's rate budget, and goes back).

use std::time::{Duration, Instant};

use ballast_e2e::scenario;
use ballast_e2e::{KillOnDrop, Stack, stack_script};
use ballast_worker::kv::{KvStore, Layout};
use k8s_openapi::jiff::Timestamp;
use mysql_async::prelude::Queryable;
use serde_json::json;

const WINDOW_MS: i64 = 60_000;

/// One at a time: a test here stops Kafka, which the others need.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// A table of this test's own, shaped like `orders`: tests run in parallel,
/// and each collector sees every insert into the tables it tracks.
async fn own_table(db: &mut mysql_async::Conn, prefix: &str) -> anyhow::Result<String> {
    let table = format!("{prefix}{}", ballast_e2e::run_id());
    db.query_drop(format!("DROP TABLE IF EXISTS `{table}`")).await?;
    db.query_drop(format!("CREATE TABLE `{table}` LIKE orders"))
        .await?;
    Ok(table)
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

/// A pipeline's intake and KV store, and how to (re)start its collector on a
/// fixed metrics port (ready once its binlog stream is open).
struct Fixture {
    stack: Stack,
    ns: String,
    pipeline: String,
    kv: KvStore,
    /// When the test began: its events fall in the windows around it.
    now: i64,
    port: u16,
    env: Vec<(&'static str, String)>,
    _intake: KillOnDrop,
}

impl Fixture {
    /// Starts the intake of `pipeline`; collectors get `env` besides their metrics address.
    async fn start(ns: String, pipeline: String, env: &[(&'static str, &str)]) -> anyhow::Result<Self> {
        let stack = Stack::discover();
        let conn = redis::Client::open(stack.get("BALLAST_REDIS_KV_URL")?.as_str())?
            .get_connection_manager()
            .await?;
        let kv = KvStore::new(conn, Layout::new(&pipeline, WINDOW_MS), 300);
        let intake = stack.worker(worker(), "intake", &ns, &pipeline, "intake-0")?;
        let port = scenario::free_port()?;
        let mut all = vec![("BALLAST_METRICS_ADDR", format!("127.0.0.1:{port}"))];
        all.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Ok(Self {
            stack,
            ns,
            pipeline,
            kv,
            now: Timestamp::now().as_millisecond(),
            port,
            env: all,
            _intake: intake,
        })
    }

    /// Starts the collector and waits until it is ready.
    async fn collector(&self) -> anyhow::Result<KillOnDrop> {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let collector = self.stack.worker_with(
            worker(),
            &["collector"],
            &self.ns,
            &self.pipeline,
            "collector-0",
            &env,
        )?;
        scenario::until_ready(self.port, 30).await?;
        Ok(collector)
    }

    /// Waits until exactly `want` events are stored around the test's start.
    async fn until_stored(&mut self, want: usize, secs: u64) -> anyhow::Result<()> {
        until_stored(&mut self.kv, self.now, want, secs).await
    }
}

fn worker() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"))
}

#[tokio::test]
async fn orders_reach_the_kv_store_exactly_once_across_a_crash_and_a_kafka_outage() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
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
    let mut f = Fixture::start(ns, pipeline, &[]).await?;
    let collector = f.collector().await?;

    insert(&mut db, "orders", 0, 100).await?;
    f.until_stored(100, 60).await?;

    // A crash: the collector resumes from its checkpoint, nothing lost or doubled.
    drop(collector);
    insert(&mut db, "orders", 100, 100).await?;
    let _collector = f.collector().await?;
    f.until_stored(200, 60).await?;

    // Kafka down: after the policy's retries the collector goes to the backup intake.
    stack_script(&["stop", "kafka"])?;
    insert(&mut db, "orders", 200, 50).await?;
    f.until_stored(250, 90).await?;
    let switches = scenario::metric(f.port, "ballast_collector_path_switches_total").await?;
    assert!(
        switches.is_some_and(|n| n >= 1.0),
        "no path switch counted: {switches:?}"
    );

    // Kafka back: the collector returns to it, with no gap and no duplicate.
    stack_script(&["up"])?;
    insert(&mut db, "orders", 250, 50).await?;
    f.until_stored(300, 90).await?;
    Ok(())
}

/// A row that cannot become an event (no merchant) is a dead letter carrying
/// the row. While the dead-letter topic refuses it, events flow on but the
/// checkpoint stays before it; a crash then re-reads it from the binlog, and
/// once the topic takes it, it is there with its data.
#[tokio::test]
async fn a_dead_letter_survives_a_refusing_kafka_and_a_crash_and_carries_its_row() -> anyhow::Result<()> {
    use rdkafka::Message;

    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let mut db = stack.source_orders().await?;
    let table = own_table(&mut db, "dead").await?;
    let patch = json!({"source": {"tables": [table]}});
    let (ns, pipeline) = stack
        .pipeline_fixture_with(&client, "cd", json!({}), patch)
        .await?;
    let dead_letters = format!("{pipeline}-events.dead-letter");
    let bootstrap = stack.get("BALLAST_KAFKA_BOOTSTRAP")?;
    // The dead-letter topic refuses any message over 16 bytes, as a broker
    // refuses writes it cannot take; the events topic works.
    let refusing = ballast_e2e::kafka::Refusing::create(&bootstrap, &dead_letters).await?;

    let mut f = Fixture::start(ns, pipeline.clone(), &[]).await?;
    let collector = f.collector().await?;

    // An empty merchant id: the row cannot be keyed, so it is a dead letter.
    let amount = 700_000 + u64::from(ballast_e2e::run_id() % 100_000);
    insert(&mut db, &table, 0, 20).await?;
    db.exec_drop(
        format!("INSERT INTO `{table}` (merchant_id, amount) VALUES ('', ?)"),
        (amount,),
    )
    .await?;
    insert(&mut db, &table, 20, 20).await?;
    // The events behind it are not held up by the refused dead letter.
    f.until_stored(40, 60).await?;
    scenario::eventually("the refused dead letter waiting", 30, || async {
        let pending = scenario::metric(f.port, "ballast_collector_dead_letters_pending").await?;
        Ok::<_, anyhow::Error>(pending.filter(|n| *n >= 1.0))
    })
    .await?;

    // Killed while it waits; the topic then takes messages again.
    drop(collector);
    refusing.accept().await?;
    let _collector = f.collector().await?;

    let dlq = refusing.consumer(&format!("{pipeline}-dlq-check"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let letter = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "the dead letter never reached {dead_letters}");
        let message = tokio::time::timeout(left, dlq.recv()).await??;
        let letter: serde_json::Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        if letter["row"]["amount"] == json!(amount) {
            break letter;
        }
    };
    assert_eq!(letter["table"], json!(table));
    assert_eq!(letter["op"], "INSERT");
    assert_eq!(letter["row"]["merchant_id"], "");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("merchant_id")),
        "{letter}"
    );
    // The re-read events were not stored twice.
    insert(&mut db, &table, 40, 10).await?;
    f.until_stored(50, 60).await?;
    db.query_drop(format!("DROP TABLE `{table}`")).await?;
    Ok(())
}

/// A transaction too large to hold whole is delivered in parts as it is read,
/// every row exactly once.
#[tokio::test]
async fn a_bulk_transaction_streams_in_parts_and_arrives_exactly_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let mut db = stack.source_orders().await?;
    let table = own_table(&mut db, "bulk").await?;
    let patch = json!({"source": {"tables": [table]}});
    let (ns, pipeline) = stack
        .pipeline_fixture_with(&client, "cb", json!({}), patch)
        .await?;
    // Parts of 16 KiB: a few dozen rows each.
    let mut f = Fixture::start(ns, pipeline, &[("BALLAST_COLLECTOR_PART_BYTES", "16384")]).await?;
    let _collector = f.collector().await?;

    let rows = 3_000;
    let values: Vec<String> = (0..rows).map(|i| format!("('m{}', {i})", i % 13)).collect();
    let mut tx = db.start_transaction(Default::default()).await?;
    tx.query_drop(format!(
        "INSERT INTO `{table}` (merchant_id, amount) VALUES {}",
        values.join(",")
    ))
    .await?;
    tx.commit().await?;
    f.until_stored(rows, 90).await?;
    let parts = scenario::metric(f.port, "ballast_collector_transaction_parts_total").await?;
    assert!(
        parts.is_some_and(|n| n >= 10.0),
        "a {rows}-row transaction in parts of 16 KiB: {parts:?} parts"
    );
    db.query_drop(format!("DROP TABLE `{table}`")).await?;
    Ok(())
}

/// A column added in the middle of a tracked table while the collector runs:
/// later rows keep every value under its own column name (the names come from
/// the binlog's table metadata), earlier rows keep theirs.
#[tokio::test]
async fn a_column_added_to_the_source_table_never_shifts_values_into_the_wrong_column() -> anyhow::Result<()>
{
    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let table = format!("altered{}", ballast_e2e::run_id());
    let patch = json!({"source": {"tables": [table]}});
    let (ns, pipeline) = stack
        .pipeline_fixture_with(&client, "ca", json!({}), patch)
        .await?;
    let mut db = stack.source_orders().await?;
    db.query_drop(format!("DROP TABLE IF EXISTS `{table}`")).await?;
    db.query_drop(format!(
        "CREATE TABLE `{table}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, merchant_id VARCHAR(32) NOT NULL, amount BIGINT NOT NULL)"
    ))
    .await?;
    let mut f = Fixture::start(ns, pipeline, &[]).await?;
    let _collector = f.collector().await?;

    db.exec_drop(
        format!("INSERT INTO `{table}` (merchant_id, amount) VALUES ('m-before', 11)"),
        (),
    )
    .await?;
    db.query_drop(format!(
        "ALTER TABLE `{table}` ADD COLUMN channel VARCHAR(16) NOT NULL DEFAULT 'app' AFTER id"
    ))
    .await?;
    db.exec_drop(
        format!("INSERT INTO `{table}` (merchant_id, amount, channel) VALUES ('m-after', 22, 'web')"),
        (),
    )
    .await?;
    f.until_stored(2, 60).await?;
    let mut rows = Vec::new();
    for w in [f.now - WINDOW_MS, f.now, f.now + WINDOW_MS] {
        for event in f.kv.window(w / WINDOW_MS * WINDOW_MS).await? {
            rows.push((
                event.merchant_id.clone(),
                serde_json::from_slice::<serde_json::Value>(&event.columns)?,
            ));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let [(after, after_row), (before, before_row)] = rows.as_slice() else {
        anyhow::bail!("want two events, got {rows:?}");
    };
    assert_eq!((after.as_str(), before.as_str()), ("m-after", "m-before"));
    assert_eq!(after_row["merchant_id"], "m-after", "{after_row}");
    assert_eq!(after_row["amount"], 22, "{after_row}");
    assert_eq!(after_row["channel"], "web", "{after_row}");
    assert_eq!(before_row["amount"], 11, "{before_row}");
    assert!(before_row.get("channel").is_none(), "{before_row}");
    db.query_drop(format!("DROP TABLE `{table}`")).await?;
    Ok(())
}
