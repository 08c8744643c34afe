//! The whole pipeline run by the operator (workloads through the e2e stand-in
//! kubelet) while the KV store fails: window results before, hourly results
//! from the slaves' memory while it is down, window results again after —
//! each equal to MariaDB's expectation over the raw rows of its period.

use std::collections::BTreeSet;
use std::path::Path;

use ballast_crds::{AnalyticsPipeline, Mode};
use ballast_e2e::kubelet::{Kubelet, Settings};
use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::scenario;
use ballast_e2e::{Stack, stack_script};
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use kube::api::Api;
use mysql_async::prelude::Queryable;
use serde_json::json;

const WINDOW_MS: i64 = 2_000;
const HOUR_MS: i64 = 3_600_000;

/// Restores the stack's servers a failed assertion may have left stopped.
struct RestoreStack;

impl Drop for RestoreStack {
    fn drop(&mut self) {
        let _ = stack_script(&["up"]);
    }
}

async fn eventually<T, F, Fut>(what: &str, secs: u64, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    Ok(scenario::eventually(what, secs, check).await?)
}

async fn kv_mode(aps: &Api<AnalyticsPipeline>, name: &str) -> anyhow::Result<Mode> {
    let ap = aps.get(name).await?;
    Ok(ap
        .status
        .and_then(|s| s.dependencies.kv)
        .map_or(Mode::Normal, |kv| kv.mode))
}

/// The highest order id now: rows after it are the next period's.
async fn last_id(db: &mut mysql_async::Conn) -> anyhow::Result<i64> {
    Ok(db
        .query_first("SELECT COALESCE(MAX(id), 0) FROM orders")
        .await?
        .unwrap_or(0))
}

/// Waits until every (period, merchant) of `want` is in the hot MySQL at `granularity`, equal.
async fn until_equal(
    hot: &HotStore,
    pipeline: &str,
    granularity: Granularity,
    want: &std::collections::BTreeMap<(i64, String), Metrics>,
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
                let got = hot.read(&slot).await?;
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

#[tokio::test]
async fn kv_failure_keeps_hourly_results_from_slave_memory_and_windows_resume_after() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let probe =
        json!({"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2});
    let policy = json!({
        "mq": {"probe": probe},
        "kv": {"probe": probe, "slaveScaleFactor": 2, "retentionSeconds": 30, "readinessTimeoutSeconds": 120},
        "mysql": {"probe": probe}, "cache": {"probe": probe}, "cold": {"probe": probe},
    });
    let patch = json!({"compute": {"windowSeconds": WINDOW_MS / 1000}, "roles": {"master": {"replicas": 2}}});
    let (ns, pipeline) = stack.pipeline_fixture_with(&client, "kd", policy, patch).await?;
    let _restore = RestoreStack;
    let mut db = stack.source_orders().await?;
    let operator = Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator(operator, &ns)?;
    let logs = std::env::temp_dir().join(format!("ballast-{ns}"));
    let env = [("BALLAST_WINDOW_GRACE", "1s"), ("BALLAST_LEASE", "5s")];
    let _kubelet = Kubelet::start(
        client.clone(),
        Settings {
            namespace: ns.clone(),
            worker: ballast_e2e::worker_binary()?,
            kubeconfig: stack.get("KUBECONFIG")?,
            roles: ["collector", "intake", "master", "slave"]
                .map(String::from)
                .to_vec(),
            logs: logs.clone(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        },
    );
    let collector_log = logs.join(format!("{pipeline}-collector-0.log"));
    scenario::until_logged(&collector_log, "tailing the binlog", 90).await?;
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let hot = HotStore::new(
        mysql_async::Pool::new(mysql_async::Opts::from_url(&stack.get("BALLAST_MYSQL_HOT_URL")?)?),
        "ballast",
        2,
        4,
    );
    let prefix = pipeline.clone();
    let mut stream = Orders::new(&prefix, 20, 3);

    // Normal: window results.
    let before = last_id(&mut db).await?;
    for _ in 0..4 {
        orders::insert(&mut db, &stream.batch(30)).await?;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let want = orders::expected(&mut db, &prefix, WINDOW_MS, &format!("id > {before}")).await?;
    until_equal(&hot, &pipeline, Granularity::Window, &want, 90).await?;

    // The KV store fails: the operator scales the slaves out, then switches;
    // events go to the slaves' memory and the master computes hour-to-date there.
    stack_script(&["stop", "redis-kv"])?;
    eventually("kv Degraded", 120, || async {
        Ok((kv_mode(&aps, &pipeline).await? == Mode::Degraded).then_some(()))
    })
    .await?;
    let degraded_from = last_id(&mut db).await?;
    for _ in 0..4 {
        orders::insert(&mut db, &stream.batch(30)).await?;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let want = orders::expected(&mut db, &prefix, HOUR_MS, &format!("id > {degraded_from}")).await?;
    until_equal(&hot, &pipeline, Granularity::Hour, &want, 90).await?;

    // Back: windows from the KV store again.
    stack_script(&["up"])?;
    eventually("kv Normal", 120, || async {
        Ok((kv_mode(&aps, &pipeline).await? == Mode::Normal).then_some(()))
    })
    .await?;
    let after = last_id(&mut db).await?;
    for _ in 0..4 {
        orders::insert(&mut db, &stream.batch(30)).await?;
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let want = orders::expected(&mut db, &prefix, WINDOW_MS, &format!("id > {after}")).await?;
    until_equal(&hot, &pipeline, Granularity::Window, &want, 90).await?;
    Ok(())
}
