//! The whole pipeline run by the operator (workloads through the e2e stand-in
//! kubelet) while a store fails, with results equal to MariaDB's expectation
//! over the raw rows of each period: while the KV store is down, hourly
//! results from the slaves' memory (whole although slaves join and leave
//! meanwhile, and a slave's crash reported by the master with what it held,
//! also when the active master crashes with it);
//! while the hot MySQL is down, results in
//! the cache only; window results in MySQL again after each.

use std::collections::{BTreeMap, BTreeSet};

use ballast_crds::{Dependency, Mode};
use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::running::{self, Launch, RunningPipeline};
use ballast_e2e::scenario;
use ballast_e2e::{Stack, stack_script};
use ballast_worker::results::cache::ResultCache;
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot, Stored};
use ballast_worker::wire::HoldingsRequest;
use ballast_worker::wire::slave_client::SlaveClient;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use mysql_async::prelude::Queryable;
use serde_json::json;

const WINDOW_MS: i64 = 2_000;
const HOUR_MS: i64 = 3_600_000;

/// The highest order id now: rows after it are the next period's.
async fn last_id(db: &mut mysql_async::Conn) -> anyhow::Result<i64> {
    Ok(db
        .query_first("SELECT COALESCE(MAX(id), 0) FROM orders")
        .await?
        .unwrap_or(0))
}

/// Polls `check` until it yields a value or `secs` pass: `scenario::eventually`
/// for checks that fail with any error (`anyhow`).
async fn eventually<T, F, Fut>(what: &str, secs: u64, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    Ok(scenario::eventually(what, secs, check).await?)
}

/// Where results are read from.
#[derive(Clone)]
enum Store {
    Hot(HotStore),
    Cache(ResultCache),
}

impl Store {
    async fn read(&self, slot: &Slot) -> anyhow::Result<BTreeMap<String, Stored>> {
        Ok(match self {
            Self::Hot(hot) => hot.read(slot).await?,
            Self::Cache(cache) => cache.clone().read(slot).await?,
        })
    }
}

/// Waits until every (period, merchant) of `want` is in `store` at `granularity`, equal.
async fn until_equal(
    store: &Store,
    pipeline: &str,
    granularity: Granularity,
    want: &BTreeMap<(i64, String), Metrics>,
    secs: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(!want.is_empty(), "nothing expected");
    let periods: BTreeSet<i64> = want.keys().map(|(p, _)| *p).collect();
    eventually(
        &format!("{} {:?} results", want.len(), granularity),
        secs,
        || async {
            let mut mismatches = Vec::new();
            for period in &periods {
                let slot = Slot {
                    pipeline: pipeline.to_owned(),
                    granularity,
                    window_start_ms: *period,
                };
                let got = store.read(&slot).await?;
                for ((_, merchant), expected) in
                    want.range((*period, String::new())..(*period + 1, String::new()))
                {
                    let metrics = got.get(merchant).and_then(|s| Metrics::from_json(&s.metrics));
                    if !metrics.as_ref().is_some_and(|m| m.matches(expected)) {
                        mismatches.push(format!("{period} {merchant}: {metrics:?} != {expected:?}"));
                    }
                }
            }
            match mismatches.first() {
                Some(first) => anyhow::bail!("{} mismatches, first: {first}", mismatches.len()),
                None => Ok(Some(())),
            }
        },
    )
    .await
}

/// The tests here stop servers and each runs an operator (which watches every namespace): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A pipeline on the stack with its operator and workers running.
struct Running {
    run: RunningPipeline,
    leases: Api<Lease>,
    /// The master's saved task state lives in a ConfigMap.
    config_maps: Api<ConfigMap>,
    hot: Store,
    cache: Store,
}

impl Running {
    async fn start(prefix: &str) -> anyhow::Result<Self> {
        let stack = Stack::discover();
        let run = RunningPipeline::start(Launch {
            prefix,
            policy: running::fast_policy(json!({
                "kv": {"slaveScaleFactor": 2, "retentionSeconds": 3600, "readinessTimeoutSeconds": 120},
            })),
            spec_patch: json!({"compute": {"windowSeconds": WINDOW_MS / 1000}, "roles": {"master": {"replicas": 2}}}),
            roles: &["collector", "intake", "master", "slave"],
            env: &[("BALLAST_WINDOW_GRACE", "1s"), ("BALLAST_LEASE", "5s")],
        })
        .await?;
        let hot = HotStore::new(
            mysql_async::Pool::new(mysql_async::Opts::from_url(&stack.get("BALLAST_MYSQL_HOT_URL")?)?),
            "ballast",
            2,
            4,
        );
        let cache = redis::Client::open(stack.get("BALLAST_REDIS_CACHE_URL")?.as_str())?
            .get_connection_manager()
            .await?;
        Ok(Self {
            config_maps: Api::namespaced(run.client.clone(), &run.namespace),
            leases: Api::namespaced(run.client.clone(), &run.namespace),
            run,
            hot: Store::Hot(hot),
            cache: Store::Cache(ResultCache::new(cache)),
        })
    }

    async fn until_mode(&self, dependency: Dependency, mode: Mode) -> anyhow::Result<()> {
        Ok(self.run.until_mode(dependency, mode).await?)
    }

    /// Sets the slaves' base replicas to `base` (the operator runs `base` ×
    /// the scale factor of 2 while the KV store is down) and waits for them.
    async fn scale_slaves(&self, base: usize) -> anyhow::Result<()> {
        let patch = json!({"spec": {"roles": {"slave": {"replicas": base}}}});
        self.run
            .aps
            .patch(&self.run.pipeline, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.until_slaves(2 * base).await
    }

    /// Waits until `n` slaves hold ready Leases.
    async fn until_slaves(&self, n: usize) -> anyhow::Result<()> {
        let selector = ballast_worker::membership::selector(&self.run.pipeline, "slave");
        eventually(&format!("{n} ready slaves"), 120, || async {
            let list = self.leases.list(&ListParams::default().labels(&selector)).await?;
            let ready = ballast_worker::membership::ready_members(&list.items, Timestamp::now());
            Ok((ready.len() == n).then_some(()))
        })
        .await
    }

    /// The ready slaves (identity → address).
    async fn ready_slaves(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let selector = ballast_worker::membership::selector(&self.run.pipeline, "slave");
        let list = self.leases.list(&ListParams::default().labels(&selector)).await?;
        Ok(ballast_worker::membership::ready_members(
            &list.items,
            Timestamp::now(),
        ))
    }

    /// The events the slave at `address` holds in memory.
    async fn holdings(address: &str) -> anyhow::Result<u64> {
        let mut client = SlaveClient::new(ballast_worker::auth::channel(
            address,
            ballast_worker::grpc::STORE_DEADLINE,
            &ballast_e2e::DATA_PLANE_TOKEN.parse()?,
        )?);
        let windows = client.holdings(HoldingsRequest {}).await?.into_inner().windows;
        Ok(windows.iter().map(|w| w.events).sum())
    }

    /// The events ready slave `slave` holds in memory.
    async fn held_by(&self, slave: &str) -> anyhow::Result<u64> {
        let slaves = self.ready_slaves().await?;
        let address = slaves
            .get(slave)
            .ok_or_else(|| anyhow::anyhow!("{slave} is not a ready slave"))?;
        Self::holdings(address).await
    }

    /// The ready slave holding the most events in memory, and how many.
    async fn fullest_slave(&self) -> anyhow::Result<(String, u64)> {
        let mut fullest = (String::new(), 0);
        for (slave, address) in self.ready_slaves().await? {
            let events = Self::holdings(&address).await?;
            if events > fullest.1 {
                fullest = (slave, events);
            }
        }
        Ok(fullest)
    }

    /// Waits until the master's saved state records `slave` holding `events`:
    /// what a master taking over resumes from.
    async fn until_state_records(&self, slave: &str, events: u64) -> anyhow::Result<()> {
        let name = format!("{}-master-state", self.run.pipeline);
        eventually(
            &format!("the master state recording {slave} holding {events}"),
            30,
            || async {
                let state = self.config_maps.get(&name).await?;
                let json = state
                    .data
                    .and_then(|d| d.get("state.json").cloned())
                    .unwrap_or_default();
                let saved: serde_json::Value = serde_json::from_str(&json)?;
                let recorded = saved["losses"]["last"][slave]["events"].as_u64();
                Ok((recorded == Some(events)).then_some(()))
            },
        )
        .await
    }

    /// The pod holding the master Lease.
    async fn active_master(&self) -> anyhow::Result<String> {
        let lease = self.leases.get(&format!("{}-master", self.run.pipeline)).await?;
        lease
            .spec
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| anyhow::anyhow!("no master holds the lease"))
    }

    /// The master's report, from its state ConfigMap.
    async fn report(&self) -> anyhow::Result<ballast_node::master_report::MasterReport> {
        let state = self
            .config_maps
            .get(&format!("{}-master-state", self.run.pipeline))
            .await?;
        let json = state
            .data
            .and_then(|mut d| d.remove(ballast_node::master_report::KEY))
            .unwrap_or_else(|| "{}".into());
        Ok(serde_json::from_str(&json)?)
    }

    /// Waits until the master's report (in its state ConfigMap) records that
    /// `slave` went holding `events`, seen at or after `after_ms`.
    async fn until_loss_reported(
        &self,
        slave: &str,
        events: u64,
        after_ms: i64,
        secs: u64,
    ) -> anyhow::Result<()> {
        eventually(
            &format!("the master reporting {slave} gone holding {events}"),
            secs,
            || async {
                let reported = self
                    .report()
                    .await?
                    .losses
                    .iter()
                    .any(|l| l.slave == slave && l.events == events && l.at_ms >= after_ms);
                Ok(reported.then_some(()))
            },
        )
        .await
    }

    /// Inserts a few batches of orders over ~2 s; returns the SQL condition selecting them.
    async fn feed(&mut self, orders: &mut Orders) -> anyhow::Result<String> {
        let before = last_id(&mut self.run.db).await?;
        self.run.feed(orders).await?;
        Ok(format!("id > {before}"))
    }

    async fn expect(
        &mut self,
        period_ms: i64,
        rows: &str,
    ) -> anyhow::Result<BTreeMap<(i64, String), Metrics>> {
        Ok(orders::expected(&mut self.run.db, &self.run.pipeline, period_ms, rows).await?)
    }
}

#[tokio::test]
async fn kv_failure_keeps_hourly_results_from_slave_memory_and_windows_resume_after() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut p = Running::start("kd").await?;
    let _restore = scenario::RestoreStack;
    let mut stream = Orders::new(&p.run.pipeline.clone(), 20, 3);

    // Normal: window results.
    let rows = p.feed(&mut stream).await?;
    let want = p.expect(WINDOW_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Window, &want, 90).await?;

    // The KV store fails: the operator scales the slaves out, then switches;
    // events go to the slaves' memory and the master computes hour-to-date there.
    stack_script(&["stop", "redis-kv"])?;
    p.until_mode(Dependency::Kv, Mode::Degraded).await?;
    let rows = p.feed(&mut stream).await?;
    let want = p.expect(HOUR_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Hour, &want, 90).await?;

    // The SQL changes mid-period, before new slave processes start (which read
    // the new one): every task carries the SQL in force at its period's start,
    // so all of a period's hour-to-date rows name one SQL, whichever slave.
    let changed = format!(
        "{}\n-- changed while the KV store is down\n",
        ballast_e2e::SAMPLE_SQL
    );
    let changed_id = ballast_crds::sql::id(&changed);
    p.run
        .aps
        .patch(
            &p.run.pipeline,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"compute": {"sql": changed}}})),
        )
        .await?;
    eventually("the changed SQL published", 30, || async {
        let ap = p.run.aps.get(&p.run.pipeline).await?;
        Ok(ap
            .status
            .and_then(|s| s.sql)
            .filter(|s| s.id == changed_id)
            .map(|_| ()))
    })
    .await?;

    // Two more slaves join while it is down (the base grows from 2 to 3, times
    // the scale factor): the merchants the ring now gives them are handed over
    // with the events already held, so each hour-to-date still covers all of
    // its merchant's events, not just those routed after the join.
    p.scale_slaves(3).await?;
    // Orders fed once the new slaves are in the published set reach them too.
    eventually("the slave set naming the new slaves", 60, || async {
        let ap = p.run.aps.get(&p.run.pipeline).await?;
        Ok(ap
            .status
            .and_then(|s| s.slave_set)
            .filter(|s| s.members.len() == 6)
            .map(|_| ()))
    })
    .await?;
    p.feed(&mut stream).await?;
    let want = p.expect(HOUR_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Hour, &want, 90).await?;
    // The new slaves computed part of the period themselves. Until then the
    // wait's error says what they hold and did, so a timeout names its cause.
    eventually("a task done on a slave started after the change", 90, || async {
        let mut seen = Vec::new();
        for slave in ["slave-4", "slave-5"] {
            let pod = format!("{}-{slave}", p.run.pipeline);
            let Some(port) = p.run.kubelet.metrics_port(&pod) else {
                seen.push(format!("{slave} not running"));
                continue;
            };
            let tasks = |result: &str| format!(r#"ballast_slave_tasks_total{{result="{result}"}}"#);
            let done = scenario::metric(port, &tasks("done")).await?.unwrap_or(0.0);
            if done > 0.0 {
                return Ok(Some(()));
            }
            let failed = scenario::metric(port, &tasks("failed")).await?.unwrap_or(0.0);
            let held = p.held_by(&pod).await?;
            seen.push(format!("{slave} holds {held} events, failed {failed} tasks"));
        }
        let report = p.report().await?;
        anyhow::bail!(
            "no task done yet: {}; the master's failing tasks: {:?}",
            seen.join("; "),
            report.failing
        )
    })
    .await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Hour, &want, 90).await?;
    for period in want.keys().map(|(period, _)| *period).collect::<BTreeSet<_>>() {
        let slot = Slot {
            pipeline: p.run.pipeline.clone(),
            granularity: Granularity::Hour,
            window_start_ms: period,
        };
        let sqls: BTreeSet<String> = p
            .hot
            .read(&slot)
            .await?
            .values()
            .filter_map(|stored| {
                stored
                    .metrics
                    .get("_sql")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .collect();
        anyhow::ensure!(sqls.len() == 1, "period {period} computed with SQLs {sqls:?}");
    }

    // The base shrinks back (3 to 2, times the scale factor): the two slaves
    // stopped hand what they hold to the others before they go, so nothing
    // is lost (the master says so) and every hour-to-date stays whole.
    let scaled_in = Timestamp::now().as_millisecond();
    p.scale_slaves(2).await?;
    for stopped in ["slave-4", "slave-5"] {
        p.until_loss_reported(&format!("{}-{stopped}", p.run.pipeline), 0, scaled_in, 60)
            .await?;
    }
    p.feed(&mut stream).await?;
    let want = p.expect(HOUR_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Hour, &want, 90).await?;

    // A slave crashes (killed outright; the kubelet starts it again as a new
    // process): what it held is gone, and the master says exactly how much,
    // from what that slave last reported holding.
    let (victim, held) = p.fullest_slave().await?;
    anyhow::ensure!(held > 0, "no slave holds events");
    let crashed = Timestamp::now().as_millisecond();
    anyhow::ensure!(p.run.kubelet.crash(&victim)?, "{victim} was not running");
    p.until_loss_reported(&victim, held, crashed, 60).await?;

    // The active master and a slave crash together: whichever master takes
    // over resumes the memory account the active one saved with its task
    // state, and reports that slave's loss although it never saw that slave
    // process itself.
    let (victim, held) = p.fullest_slave().await?;
    anyhow::ensure!(held > 0, "no slave holds events");
    p.until_state_records(&victim, held).await?;
    let active = p.active_master().await?;
    let crashed = Timestamp::now().as_millisecond();
    anyhow::ensure!(p.run.kubelet.crash(&active)?, "{active} was not running");
    anyhow::ensure!(p.run.kubelet.crash(&victim)?, "{victim} was not running");
    p.until_loss_reported(&victim, held, crashed, 90).await?;

    // Back: windows from the KV store again.
    stack_script(&["up"])?;
    p.until_mode(Dependency::Kv, Mode::Normal).await?;
    let rows = p.feed(&mut stream).await?;
    let want = p.expect(WINDOW_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Window, &want, 90).await?;
    Ok(())
}

#[tokio::test]
async fn mysql_failure_writes_results_to_the_cache_only_until_it_returns() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut p = Running::start("md").await?;
    let _restore = scenario::RestoreStack;
    let mut stream = Orders::new(&p.run.pipeline.clone(), 20, 4);

    let rows = p.feed(&mut stream).await?;
    let want = p.expect(WINDOW_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Window, &want, 90).await?;

    // The hot MySQL fails: slaves keep computing and write the cache only.
    stack_script(&["stop", "mysql-hot"])?;
    p.until_mode(Dependency::Mysql, Mode::Degraded).await?;
    let rows = p.feed(&mut stream).await?;
    let during = p.expect(WINDOW_MS, &rows).await?;
    until_equal(&p.cache, &p.run.pipeline, Granularity::Window, &during, 90).await?;

    // Back: results in MySQL again, and the windows it missed computed again for it.
    stack_script(&["up"])?;
    p.until_mode(Dependency::Mysql, Mode::Normal).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Window, &during, 90).await?;
    let rows = p.feed(&mut stream).await?;
    let want = p.expect(WINDOW_MS, &rows).await?;
    until_equal(&p.hot, &p.run.pipeline, Granularity::Window, &want, 90).await?;
    Ok(())
}
