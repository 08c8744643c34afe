//! The compute path against the local stack's real servers: binlog → Kafka →
//! intake → KV → active master → slaves (DataFusion) → hot MySQL + cache, with
//! results compared to the golden expectation MariaDB computes over the raw
//! rows — through a master failover, a hung slave that wakes and writes late,
//! a slave killed mid-task, and a task that fails on every slave until its data is fixed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::scenario::{self, eventually, free_port};
use ballast_e2e::{KillOnDrop, Stack};
use ballast_worker::results::cache::ResultCache;
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::json;

const WINDOW_MS: i64 = 2_000;

/// The tests here share the source table and the servers' CPU: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running pipeline: its worker processes by pod name, with their metrics ports.
struct Running {
    stack: Stack,
    client: kube::Client,
    ns: String,
    pipeline: String,
    workers: BTreeMap<String, (KillOnDrop, u16)>,
}

impl Running {
    async fn start(prefix: &str) -> anyhow::Result<Self> {
        let stack = Stack::discover();
        let client = stack.kube_client().await?;
        let patch = json!({"compute": {"windowSeconds": WINDOW_MS / 1000}});
        let (ns, pipeline) = stack
            .pipeline_fixture_with(&client, prefix, json!({}), patch)
            .await?;
        // The table (and its columns) before the collector reads its schema.
        drop(stack.source_orders().await?);
        let mut running = Self {
            stack,
            client,
            ns,
            pipeline,
            workers: BTreeMap::new(),
        };
        for (pod, role) in [
            ("slave-0", "slave"),
            ("slave-1", "slave"),
            ("intake-0", "intake"),
            ("master-0", "master"),
            ("master-1", "master"),
            ("collector-0", "collector"),
        ] {
            running.spawn(pod, role)?;
        }
        scenario::until_ready(running.port("collector-0")?, 60).await?;
        eventually("both slaves in the membership", 30, || running.slaves_ready()).await?;
        Ok(running)
    }

    /// The metrics port of `pod`.
    fn port(&self, pod: &str) -> anyhow::Result<u16> {
        self.workers
            .get(pod)
            .map(|(_, p)| *p)
            .ok_or_else(|| anyhow::anyhow!("no {pod}"))
    }

    fn spawn(&mut self, pod: &str, role: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{port}");
        let env = [
            ("BALLAST_METRICS_ADDR", metrics.as_str()),
            ("BALLAST_LEASE", if role == "master" { "3s" } else { "15s" }),
            ("BALLAST_WINDOW_GRACE", "1s"),
            ("BALLAST_HUNG_AFTER", "2s"),
            ("BALLAST_DELAY_BASE", "2s"),
            ("RUST_LOG", "info"),
        ];
        let worker = Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
        let child = self
            .stack
            .worker_with(worker, &[role], &self.ns, &self.pipeline, pod, &env)?;
        self.workers.insert(pod.to_owned(), (child, port));
        Ok(())
    }

    fn signal(&self, pod: &str, signal: &str) -> anyhow::Result<()> {
        let (child, _) = self.workers.get(pod).ok_or_else(|| anyhow::anyhow!("no {pod}"))?;
        child.signal(signal)?;
        Ok(())
    }

    async fn metric(&self, pod: &str, series: &str) -> anyhow::Result<f64> {
        Ok(scenario::metric(self.port(pod)?, series).await?.unwrap_or(0.0))
    }

    async fn slaves_ready(&self) -> anyhow::Result<Option<()>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        let selector = ballast_worker::membership::selector(&self.pipeline, "slave");
        let list = leases
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?;
        let ready =
            ballast_worker::membership::ready_members(&list.items, k8s_openapi::jiff::Timestamp::now());
        Ok((ready.len() == 2).then_some(()))
    }

    /// What the active master reports in its state ConfigMap.
    async fn master_report(&self) -> anyhow::Result<ballast_worker::master_report::MasterReport> {
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let state = maps.get_opt(&format!("{}-master-state", self.pipeline)).await?;
        let json = state
            .and_then(|cm| cm.data)
            .and_then(|mut d| d.remove(ballast_worker::master_report::KEY));
        Ok(match json {
            Some(json) => serde_json::from_str(&json)?,
            None => Default::default(),
        })
    }

    async fn active_master(&self) -> anyhow::Result<Option<String>> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        let lease = leases.get_opt(&format!("{}-master", self.pipeline)).await?;
        Ok(lease.and_then(|l| l.spec?.holder_identity))
    }

    /// Waits until the hot MySQL and the cache hold exactly the golden
    /// expectation for every (window, merchant) of `prefix`.
    async fn until_golden(&self, prefix: &str, secs: u64) -> anyhow::Result<usize> {
        let mut source = self.stack.source_orders().await?;
        let want = orders::expected(&mut source, prefix, WINDOW_MS, "TRUE").await?;
        anyhow::ensure!(!want.is_empty(), "no orders of {prefix} in the source");
        let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(
            &self.stack.get("BALLAST_MYSQL_HOT_URL")?,
        )?);
        let hot = HotStore::new(pool, "ballast", 2, 4);
        let conn = redis::Client::open(self.stack.get("BALLAST_REDIS_CACHE_URL")?.as_str())?
            .get_connection_manager()
            .await?;
        let cache = ResultCache::new(conn);
        let windows: Vec<i64> = want
            .keys()
            .map(|(w, _)| *w)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        eventually(&format!("golden results of {prefix}"), secs, || {
            let (hot, mut cache, want, windows) = (&hot, cache.clone(), &want, &windows);
            async move {
                let mut mismatches = Vec::new();
                for w in windows {
                    let slot = Slot {
                        pipeline: self.pipeline.clone(),
                        granularity: Granularity::Window,
                        window_start_ms: *w,
                    };
                    let in_hot = hot.read(&slot).await?;
                    let in_cache = cache.read(&slot).await?;
                    for ((_, merchant), expected) in want.range((*w, String::new())..(*w + 1, String::new()))
                    {
                        for (store, got) in
                            [("mysql", in_hot.get(merchant)), ("cache", in_cache.get(merchant))]
                        {
                            let got = got.and_then(|s| Metrics::from_json(&s.metrics));
                            if !got.as_ref().is_some_and(|g| g.matches(expected)) {
                                mismatches.push(format!("{store} {w} {merchant}: {got:?} != {expected:?}"));
                            }
                        }
                    }
                }
                if let Some(first) = mismatches.first() {
                    anyhow::bail!("{} mismatches, first: {first}", mismatches.len());
                }
                Ok(Some(want.len()))
            }
        })
        .await
        .map_err(Into::into)
    }
}

/// Feeds `batches` batches of orders, one every `every`.
async fn feed(stack: &Stack, orders: &mut Orders, batches: usize, every: Duration) -> anyhow::Result<()> {
    let mut db = stack.source_orders().await?;
    for _ in 0..batches {
        orders::insert(&mut db, &orders.batch(40)).await?;
        tokio::time::sleep(every).await;
    }
    Ok(())
}

#[tokio::test]
async fn results_equal_the_golden_expectation_across_a_master_failover() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut running = Running::start("gm").await?;
    let prefix = running.pipeline.clone();
    let mut orders = Orders::new(&prefix, 25, 1);
    let active = eventually("an active master", 30, || running.active_master()).await?;

    feed(&running.stack, &mut orders, 8, Duration::from_millis(500)).await?;
    // The active master dies mid-stream: the standby takes over within the lease (3 s).
    running.workers.remove(&active);
    let standby = if active == "master-0" {
        "master-1"
    } else {
        "master-0"
    };
    feed(&running.stack, &mut orders, 8, Duration::from_millis(500)).await?;
    let taken = eventually("the standby holding the lease", 10, || async {
        Ok::<_, anyhow::Error>(running.active_master().await?.filter(|h| h == standby))
    })
    .await?;
    assert_eq!(taken, standby);

    let pairs = running.until_golden(&prefix, 60).await?;
    assert!(pairs >= 25, "only {pairs} merchant windows computed");
    assert_eq!(running.metric(standby, "ballast_master_active").await?, 1.0);

    // The task state belongs to the pipeline: deleting the pipeline deletes it,
    // so a pipeline made again under the name does not resume this one's windows.
    running.workers.clear();
    let pipelines: Api<ballast_crds::AnalyticsPipeline> =
        Api::namespaced(running.client.clone(), &running.ns);
    let uid = pipelines.get(&running.pipeline).await?.metadata.uid;
    let states: Api<ConfigMap> = Api::namespaced(running.client.clone(), &running.ns);
    let state = ballast_worker::roles::master::state::name(&running.pipeline);
    let owners = states
        .get(&state)
        .await?
        .metadata
        .owner_references
        .unwrap_or_default();
    assert_eq!(
        owners.iter().map(|o| Some(&o.uid)).collect::<Vec<_>>(),
        [uid.as_ref()],
        "the state ConfigMap is owned by its pipeline"
    );
    pipelines
        .delete(&running.pipeline, &kube::api::DeleteParams::default())
        .await?;
    eventually("the master state deleted with the pipeline", 60, || async {
        Ok::<_, anyhow::Error>(states.get_opt(&state).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn results_stay_golden_through_a_hung_slave_a_killed_slave_and_a_twice_failing_task()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let running = Running::start("gf").await?;
    let prefix = running.pipeline.clone();
    let mut orders = Orders::new(&prefix, 25, 2);
    eventually("an active master", 30, || running.active_master()).await?;

    // A task that fails wherever it runs: an undecodable event in a window
    // that has not closed yet. It goes round the slaves, then to the delay queue.
    let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let poisoned = (now / WINDOW_MS + 2) * WINDOW_MS;
    let layout = ballast_worker::kv::Layout::new(&running.pipeline, WINDOW_MS);
    let merchant = format!("{prefix}-poison");
    let poison = ballast_e2e::poison::PoisonedWindow::put(
        &running.stack.get("BALLAST_REDIS_KV_URL")?,
        layout.merchant_key(poisoned, &merchant),
        layout.window_key(poisoned),
        &merchant,
    )
    .await?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;
    let failures = |pod: &'static str| {
        let running = &running;
        async move {
            let failed = running
                .metric(pod, "ballast_slave_tasks_total{result=\"failed\"}")
                .await?;
            Ok::<_, anyhow::Error>(failed)
        }
    };
    eventually("the poisoned task failing at least twice", 30, || async {
        let n = failures("slave-0").await? + failures("slave-1").await?;
        Ok::<_, anyhow::Error>((n >= 2.0).then_some(()))
    })
    .await?;
    // Round the slaves and into the delay queue: the master reports the
    // window as failing, with the error, where the operator reads it.
    let failing = eventually("the poisoned window reported as failing", 60, || async {
        let report = running.master_report().await?;
        Ok::<_, anyhow::Error>(report.failing.into_iter().find(|w| w.start_ms == poisoned))
    })
    .await?;
    assert!(
        failing.kind == "window"
            && failing.attempts >= 2
            && !failing.error.is_empty()
            && failing.error != "no error recorded",
        "{failing:?}"
    );
    let master = running.active_master().await?.unwrap_or_default();
    let gauge = running.metric(&master, "ballast_master_windows_failing").await?;
    assert!(gauge >= 1.0, "ballast_master_windows_failing is {gauge}");
    // The data is repaired: a later attempt (after the delay) succeeds.
    poison.repair().await?;

    // A slave hangs (stopped) while tasks are sent to it: they are called hung
    // (after 2 s, or ten times their estimate) and recomputed elsewhere under
    // new versions...
    let hung = || async {
        let master = running.active_master().await?.unwrap_or_default();
        running
            .metric(&master, "ballast_master_tasks_total{outcome=\"hung\"}")
            .await
    };
    running.signal("slave-0", "-STOP")?;
    feed(&running.stack, &mut orders, 8, Duration::from_millis(500)).await?;
    eventually("a task on the stopped slave called hung", 30, || async {
        Ok::<_, anyhow::Error>((hung().await? >= 1.0).then_some(()))
    })
    .await?;
    // ...and once the new versions are written, whatever it held is stale: when
    // it wakes, its late writes are refused by the version fence. (Waking it
    // before then would let its old version write first, and nothing be refused.)
    running.until_golden(&prefix, 60).await?;
    running.signal("slave-0", "-CONT")?;
    eventually("slave-0's late results refused", 30, || async {
        let refused = running
            .metric("slave-0", "ballast_slave_results_refused_total{store=\"mysql\"}")
            .await?;
        Ok::<_, anyhow::Error>((refused > 0.0).then_some(refused))
    })
    .await?;

    // A slave dies with a task in flight: it is reassigned.
    running.signal("slave-0", "-STOP")?;
    feed(&running.stack, &mut orders, 3, Duration::from_millis(500)).await?;
    running.signal("slave-0", "-KILL")?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;

    running.until_golden(&prefix, 90).await?;
    // The repaired window computed after its delay: nothing reported failing.
    eventually("no window reported failing", 60, || async {
        let report = running.master_report().await?;
        Ok::<_, anyhow::Error>((report.failing_total == 0).then_some(()))
    })
    .await?;
    Ok(())
}

/// The KV store restarts without its data mid-stream (the stack's runs without
/// persistence): the intake finds its marker gone and refills the windows
/// still needed from Kafka, so every result stays golden.
#[tokio::test]
async fn results_stay_golden_when_the_kv_store_restarts_empty_mid_stream() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _restore = scenario::RestoreStack;
    let running = Running::start("kr").await?;
    let prefix = running.pipeline.clone();
    let mut orders = Orders::new(&prefix, 25, 2);
    eventually("an active master", 30, || running.active_master()).await?;
    let refills = || running.metric("intake-0", "ballast_intake_kv_refills_total");
    // The intake's first look finds no marker and sets one: no refill.
    let before = refills().await?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;
    // Stopped right after the last orders: their windows are not computed yet.
    ballast_e2e::stack_script(&["stop", "redis-kv"])?;
    ballast_e2e::stack_script(&["up"])?;
    eventually("the intake refilling the emptied KV store", 60, || async {
        Ok::<_, anyhow::Error>((refills().await? > before).then_some(()))
    })
    .await?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;
    running.until_golden(&prefix, 120).await?;
    Ok(())
}

/// A SQL changed mid-stream applies from one window on, for every slave: the
/// master reports the boundary; every row before it names the old SQL, every
/// row from it on names the new one and has its extra column, and both stay
/// golden. A published SQL that does not plan against the source tables is
/// refused (reported) and the SQL in force keeps computing.
#[tokio::test]
async fn a_changed_sql_applies_from_one_window_on_and_every_row_names_its_sql() -> anyhow::Result<()> {
    use ballast_worker::compute::SAMPLE_SQL;
    use kube::api::{Patch, PatchParams};

    let _serial = SERIAL.lock().await;
    let running = Running::start("sq").await?;
    let prefix = running.pipeline.clone();
    let mut orders = Orders::new(&prefix, 25, 2);
    eventually("an active master", 30, || running.active_master()).await?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;
    // Computed with the first SQL before the change.
    running.until_golden(&prefix, 60).await?;

    // The operator's part, played here: the source types and a new SQL in status.
    let old_id = ballast_crds::sql::id(SAMPLE_SQL);
    let new_sql = SAMPLE_SQL.replace(
        "COALESCE(ti.top_items, '') AS top_items\n",
        "COALESCE(ti.top_items, '') AS top_items,\n       t.orders * 10 AS orders_x10\n",
    );
    anyhow::ensure!(
        new_sql != SAMPLE_SQL,
        "the sample SQL changed shape: update this test"
    );
    let new_id = ballast_crds::sql::id(&new_sql);
    let column = |name: &str, type_: &str| json!({"name": name, "type": type_});
    let schema = json!({"orders": [
        column("id", "Int64"), column("merchant_id", "Utf8"), column("amount", "Int64"),
        column("user_id", "Utf8"), column("item", "Utf8"), column("status", "Utf8"), column("created_at", "Utf8"),
    ]});
    let aps: Api<ballast_crds::AnalyticsPipeline> = Api::namespaced(running.client.clone(), &running.ns);
    let publish = |id: String, text: String| {
        let status =
            json!({"status": {"sourceSchema": schema, "sql": {"id": id, "text": text, "generation": 2}}});
        let aps = aps.clone();
        let name = running.pipeline.clone();
        async move {
            aps.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    publish(new_id.clone(), new_sql.clone()).await?;
    let boundary = eventually("the master adopting the new SQL", 30, || async {
        let report = running.master_report().await?;
        Ok::<_, anyhow::Error>(report.sql.iter().find(|v| v.id == new_id).map(|v| v.from_ms))
    })
    .await?;
    feed(&running.stack, &mut orders, 4, Duration::from_millis(500)).await?;
    running.until_golden(&prefix, 90).await?;

    // Every row names its SQL, on the right side of the boundary.
    let hot = HotStore::new(
        mysql_async::Pool::new(mysql_async::Opts::from_url(
            &running.stack.get("BALLAST_MYSQL_HOT_URL")?,
        )?),
        "ballast",
        2,
        4,
    );
    let mut source = running.stack.source_orders().await?;
    let want = orders::expected(&mut source, &prefix, WINDOW_MS, "TRUE").await?;
    let windows: std::collections::BTreeSet<i64> = want.keys().map(|(w, _)| *w).collect();
    let (mut before, mut after) = (0, 0);
    for w in windows {
        let slot = Slot {
            pipeline: running.pipeline.clone(),
            granularity: Granularity::Window,
            window_start_ms: w,
        };
        for (merchant, stored) in hot.read(&slot).await? {
            let sql = stored
                .metrics
                .get("_sql")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let x10 = stored
                .metrics
                .get("orders_x10")
                .and_then(serde_json::Value::as_i64);
            let orders = stored.metrics.get("orders").and_then(serde_json::Value::as_i64);
            if w < boundary {
                before += 1;
                anyhow::ensure!(
                    sql == old_id && x10.is_none(),
                    "{w} {merchant}: {sql} {x10:?}, before {boundary}"
                );
            } else {
                after += 1;
                anyhow::ensure!(
                    sql == new_id && x10 == orders.map(|n| n * 10),
                    "{w} {merchant}: {sql} {x10:?} for {orders:?} orders, from {boundary}"
                );
            }
        }
    }
    anyhow::ensure!(
        before > 0 && after > 0,
        "{before} rows before the boundary, {after} after"
    );

    // A SQL naming a column the source does not have: refused, the new SQL stays.
    let broken = new_sql.replace("t.orders * 10", "t.no_such_column * 10");
    let broken_id = ballast_crds::sql::id(&broken);
    publish(broken_id.clone(), broken).await?;
    let refused = eventually("the master refusing a SQL that does not plan", 30, || async {
        let report = running.master_report().await?;
        Ok::<_, anyhow::Error>(report.sql_refused.filter(|r| r.id == broken_id))
    })
    .await?;
    assert!(refused.error.contains("no_such_column"), "{refused:?}");
    feed(&running.stack, &mut orders, 2, Duration::from_millis(500)).await?;
    running.until_golden(&prefix, 90).await?;
    let report = running.master_report().await?;
    assert_eq!(report.sql.last().map(|v| v.id.clone()), Some(new_id));
    Ok(())
}
