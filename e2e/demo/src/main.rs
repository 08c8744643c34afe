//! `ballast-demo` (`make demo`): the whole platform on the local stack in one
//! terminal. It applies the CRDs and a pipeline with its policy, runs the
//! operator and every worker role (through the e2e stand-in kubelet), feeds
//! synthetic orders for a few thousand merchants into the source database,
//! and refreshes a dashboard of throughput, modes and per-merchant results.
//! Merchants read their numbers through the query service all along. Midway
//! it stops the KV Redis, Kafka, the hot MySQL and the result cache in turn,
//! so the automatic degradation and recovery happen in front of you; then it
//! stops feeding, lets the last windows compute, prints a summary that
//! accounts for every order fed, and stops everything it started.
#![forbid(unsafe_code)]

mod accounting;
mod dashboard;
mod observe;
mod query;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ballast_e2e::kubelet::{Kubelet, Settings};
use ballast_e2e::orders::{self, Orders};
use ballast_e2e::{Stack, scenario, stack_script};
use ballast_worker::results::hot::HotStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::dashboard::{Frame, render};
use self::observe::Observer;

/// Merchants the synthetic orders are spread over.
const MERCHANTS: u64 = 3_000;
/// Orders per insert, and inserts per second.
const BATCH: usize = 100;
const BATCHES_PER_SECOND: u64 = 4;

/// A step of the script: at `at` seconds, do `action` and show `phase`.
struct Step {
    at: u64,
    action: Option<(&'static str, &'static str)>,
    phase: &'static str,
}

fn script(phase_seconds: u64) -> Vec<Step> {
    let p = phase_seconds;
    vec![
        Step {
            at: 0,
            action: None,
            phase: "Normal: binlog -> Kafka -> intake -> KV -> master -> slaves (DataFusion) -> MySQL + cache",
        },
        Step {
            at: p,
            action: Some(("stop", "redis-kv")),
            phase: "KV store stopped: slaves scale out, events go to slave memory, hourly results only",
        },
        Step {
            at: 2 * p,
            action: Some(("start", "redis-kv")),
            phase: "KV store back: windows from the KV store again; slaves scale in after retention",
        },
        Step {
            at: 3 * p,
            action: Some(("stop", "kafka")),
            phase: "Kafka stopped: collectors go straight to the backup intake; over budget it sheds whole merchants",
        },
        Step {
            at: 4 * p,
            action: Some(("start", "kafka")),
            phase: "Kafka back: collectors return to Kafka",
        },
        Step {
            at: 5 * p,
            action: Some(("stop", "mysql-hot")),
            phase: "Hot MySQL stopped: results go to the cache only; queries answer from the cache, saying so",
        },
        Step {
            at: 6 * p,
            action: Some(("start", "mysql-hot")),
            phase: "Hot MySQL back: the windows it missed are computed again into it",
        },
        Step {
            at: 7 * p,
            action: Some(("stop", "redis-cache")),
            phase: "Result cache stopped: queries from MySQL behind a rate limit and each pod's in-process cache",
        },
        Step {
            at: 8 * p,
            action: Some(("start", "redis-cache")),
            phase: "Result cache back: each merchant's cached day is checked against MySQL on its next read",
        },
    ]
}

/// Time spent in each mode, per dependency.
#[derive(Default)]
struct ModeClock(BTreeMap<(&'static str, String), Duration>);

impl ModeClock {
    fn add(&mut self, frame: &Frame, tick: Duration) {
        for d in &frame.dependencies {
            *self.0.entry((d.name, d.mode.clone())).or_default() += tick;
        }
    }
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no directory for the demo binary"))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it with `cargo build -p {name}`",
        path.display()
    );
    Ok(path)
}

/// Inserts orders at a steady rate until stopped; counts them.
fn feed(
    pool: mysql_async::Pool,
    inserted: Arc<AtomicU64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream = Orders::new("demo", MERCHANTS, 42);
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / BATCHES_PER_SECOND));
        while !stop.is_cancelled() {
            tick.tick().await;
            let batch = stream.batch(BATCH);
            // The source database is never stopped by the demo; a failed insert is retried next tick.
            if let Ok(mut conn) = pool.get_conn().await
                && orders::insert(&mut conn, &batch).await.is_ok()
            {
                inserted.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
    })
}

async fn run() -> anyhow::Result<String> {
    let phase_seconds: u64 = std::env::var("BALLAST_DEMO_PHASE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (operator_bin, worker_bin) = (binary("ballast-operator")?, binary("ballast-worker")?);
    let removed = ballast_e2e::delete_fixtures(&client).await?;
    if removed > 0 {
        println!("Deleting {removed} namespaces left by earlier tests and demos...");
    }
    println!("Applying the CRDs, a DegradationPolicy and an AnalyticsPipeline...");
    let probe =
        json!({"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 3});
    let policy = json!({
        "mq": {"probe": probe, "produceRetries": 1, "backupIntakeRatePerSecond": 300, "maxShedPercent": 40},
        "kv": {"probe": probe, "slaveScaleFactor": 2, "scaleInDelaySeconds": 60, "readinessTimeoutSeconds": 120},
        "mysql": {"probe": probe}, "cache": {"probe": probe, "queryRatePerSecond": 10}, "cold": {"probe": probe},
    });
    let spec = json!({"compute": {"windowSeconds": 5},
                      "roles": {"master": {"replicas": 2}, "slave": {"replicas": 2}, "query": {"replicas": 1}}});
    let (ns, pipeline) = stack.pipeline_fixture_with(&client, "demo", policy, spec).await?;
    drop(stack.source_orders().await?);
    let _restore = scenario::RestoreStack;

    println!("Starting the operator and the workers (namespace {ns})...");
    let operator = stack.operator(&operator_bin, &ns).await?;
    let logs = std::env::temp_dir().join(format!("ballast-{ns}"));
    let kubelet = Kubelet::start(
        client.clone(),
        Settings {
            namespace: ns.clone(),
            worker: worker_bin,
            kubeconfig: stack.get("KUBECONFIG")?,
            roles: ["collector", "intake", "master", "slave", "query"]
                .map(String::from)
                .to_vec(),
            logs: logs.clone(),
            env: vec![("BALLAST_WINDOW_GRACE".into(), "1s".into())],
        },
    );
    scenario::until_pipeline_ready(&client, &ns, &pipeline, 180).await?;

    let inserted = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let source = mysql_async::Pool::new(mysql_async::Opts::from_url(
        &stack.get("BALLAST_MYSQL_SOURCE_URL")?,
    )?);
    // The orders fed are those after this id: the source table outlives demos.
    let first_id: u64 = {
        use mysql_async::prelude::Queryable;
        let mut conn = source.get_conn().await?;
        conn.query_first("SELECT COALESCE(MAX(id), 0) FROM orders")
            .await?
            .unwrap_or(0)
    };
    let feeder = feed(source.clone(), inserted.clone(), stop.clone());
    let (query_port_tx, query_port) = tokio::sync::watch::channel(0_u16);
    let follow = "demo-m7".to_owned();
    let load = query::QueryLoad::default();
    load.start(query_port, follow.clone(), MERCHANTS, stop.clone());
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), &ns);
    let mut page = String::new();
    let hot_url = stack.get("BALLAST_MYSQL_HOT_URL")?;
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&hot_url)?);
    let observer = Observer {
        client: client.clone(),
        namespace: ns.clone(),
        pipeline: pipeline.clone(),
        hot: HotStore::new(pool.clone(), "ballast", 2, 4),
        pool,
    };

    let steps = script(phase_seconds);
    let end = steps.len() as u64 * phase_seconds;
    let started = Instant::now();
    let mut next_step = 0;
    let mut phase = "";
    let mut clock = ModeClock::default();
    let mut max_shed = 0;
    let mut last = (Instant::now(), 0_u64, 0_u64);
    let mut frame = Frame::default();
    while started.elapsed().as_secs() < end {
        let elapsed = started.elapsed();
        while next_step < steps.len() && steps[next_step].at <= elapsed.as_secs() {
            let step = &steps[next_step];
            if let Some((verb, server)) = step.action {
                let args = if verb == "stop" {
                    vec!["stop", server]
                } else {
                    vec!["up"]
                };
                stack_script(&args)?;
            }
            phase = step.phase;
            next_step += 1;
        }
        // An unreachable API server keeps the last port.
        let port = match kubelet.role_port(&pods, "query").await {
            Ok(port) => port.unwrap_or(0),
            Err(_) => *query_port_tx.borrow(),
        };
        if port != *query_port_tx.borrow() {
            query_port_tx.send_replace(port);
            if port != 0 {
                page = format!("http://127.0.0.1:{port}/?merchant={follow}");
            }
        }
        let seen = observer.observe(8).await;
        let now = Instant::now();
        let orders_in = inserted.load(Ordering::Relaxed);
        let dt = now.duration_since(last.0).as_secs_f64().max(0.001);
        frame = Frame {
            elapsed,
            phase: phase.to_owned(),
            orders_in,
            orders_rate: (orders_in - last.1) as f64 / dt,
            results_out: seen.results,
            results_rate: seen.results.saturating_sub(last.2) as f64 / dt,
            dependencies: seen.dependencies,
            slaves: seen.slaves,
            shed_merchants: seen.shed_merchants,
            master: seen.master,
            latest: seen.latest,
            merchants: seen.merchants,
            query: load.stats(),
            page: page.clone(),
        };
        clock.add(&frame, now.duration_since(last.0));
        max_shed = max_shed.max(frame.shed_merchants);
        last = (now, orders_in, seen.results);
        // Clear the screen and draw from the top: readable in any terminal.
        print!("\x1b[2J\x1b[H{}", render(&frame));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    stop.cancel();
    let _ = feeder.await;
    // The last windows close and compute: settled once every order fed is
    // counted or shed, or the count has not moved for 10 s, or after a minute.
    let settle = Instant::now();
    let mut moved = (Instant::now(), u64::MAX);
    let account = loop {
        let account = account(&observer, &kubelet, &pods, &source, first_id).await?;
        if account.counted != moved.1 {
            moved = (Instant::now(), account.counted);
        }
        if account.lost() <= 0
            || moved.0.elapsed() > Duration::from_secs(10)
            || settle.elapsed() > Duration::from_secs(60)
        {
            break account;
        }
        print!(
            "\r  letting the last windows compute: {} orders not yet in the results...   ",
            account.lost()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    drop(kubelet);
    drop(operator);
    let mut summary = format!(
        "\nSummary after {} s\n{}  results out:      {} result rows in the hot MySQL (and the cache)\n  shed merchants:   at most {} at once while Kafka was down\n  time in each mode:\n",
        started.elapsed().as_secs(),
        account.lines(),
        frame.results_out,
        max_shed
    );
    for ((dependency, mode), spent) in &clock.0 {
        summary.push_str(&format!(
            "    {dependency:<6} {mode:<11} {:>4} s\n",
            spent.as_secs()
        ));
    }
    summary.push_str(&format!("  merchant page:    {page} (while the demo ran)\n"));
    summary.push_str(&format!("  worker logs:      {}\n", logs.display()));
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let _ = namespaces.delete(&ns, &Default::default()).await;
    Ok(summary)
}

/// Where every order fed went, from the source table, the results, the
/// workers' own counters and the pipeline's status.
async fn account(
    observer: &Observer,
    kubelet: &Kubelet,
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    source: &mysql_async::Pool,
    first_id: u64,
) -> anyhow::Result<accounting::Account> {
    use mysql_async::prelude::Queryable;
    let mut conn = source.get_conn().await?;
    let fed: u64 = conn
        .exec_first(
            "SELECT COUNT(*) FROM orders WHERE id > ? AND merchant_id LIKE 'demo-%'",
            (first_id,),
        )
        .await?
        .unwrap_or(0);
    let counted = accounting::counted(&observer.pool, &observer.hot, &observer.pipeline).await?;
    let shed = metric_sum(kubelet, pods, "intake", "ballast_backup_intake_events_shed_total").await;
    let memory_lost = metric_sum(kubelet, pods, "master", "ballast_master_slave_events_lost_total").await;
    let aps: kube::Api<ballast_crds::AnalyticsPipeline> =
        kube::Api::namespaced(observer.client.clone(), &observer.namespace);
    let dead_lettered = aps
        .get(&observer.pipeline)
        .await
        .ok()
        .and_then(|ap| ap.status)
        .map_or(0, |s| u64::try_from(s.dead_lettered_events).unwrap_or(0));
    Ok(accounting::Account {
        fed,
        counted,
        shed,
        memory_lost,
        dead_lettered,
    })
}

/// The sum of counter `name` over every running pod of `role`.
async fn metric_sum(
    kubelet: &Kubelet,
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    role: &str,
    name: &str,
) -> u64 {
    let mut total = 0;
    for port in kubelet.role_ports(pods, role).await.unwrap_or_default() {
        if let Ok((200, text)) = scenario::http_get(port, "/metrics").await {
            total += accounting::counter(&text, name);
        }
    }
    total
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}
