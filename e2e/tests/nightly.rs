//! The nightly job against the real servers: past days of results in the hot
//! MySQL (written as the slaves write them, from MariaDB's own computation
//! over raw orders of those days) are rolled into Elasticsearch equal to
//! MariaDB's daily computation; the hot MySQL keeps only the retention; a
//! day with a window that has events and no result is not rolled, and the
//! report names the window; a rerun, and a rerun after a SIGKILL midway,
//! change nothing; the query log teaches it a merchant's "last 7 days",
//! which the query service then answers from the precomputed set while
//! Elasticsearch is stopped, while a one-off range gets the 503 listing the
//! covered queries. The job also runs as the cluster runs it: a Job made
//! from the pipeline's CronJob, completed by the stand-in kubelet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::running::{self, Launch, RunningPipeline};
use ballast_e2e::{Stack, scenario, stack_script};
use ballast_worker::cold::log::Entry;
use ballast_worker::cold::{ColdStore, Day};
use ballast_worker::compute::MerchantResult;
use ballast_worker::results::cache::DAY_MS;
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use ballast_worker::wire::ChangeEvent;
use elasticsearch::params::Refresh;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, PostParams};
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};

/// Minutes of a window (the fixture's `windowSeconds` is 60).
const WINDOW_MS: i64 = 60_000;

struct Nightly {
    run: RunningPipeline,
    today: Day,
    hot: HotStore,
    cold: ColdStore,
    table: String,
}

impl Nightly {
    async fn start() -> anyhow::Result<Self> {
        let run = RunningPipeline::start(Launch {
            prefix: "night",
            policy: running::fast_policy(
                json!({"cold": {"precomputedQueriesPerUser": 1, "lookbackDays": 10}}),
            ),
            spec_patch: json!({"nightly": {"hotRetentionDays": 1}, "roles": {"query": {"replicas": 1}}}),
            roles: &["collector", "intake", "master", "slave", "query", "nightly"],
            env: &[
                ("BALLAST_PRECOMPUTED_EVERY", "1s"),
                ("BALLAST_COLD_DEADLINE", "1s"),
            ],
        })
        .await?;
        let stack = Stack::discover();
        let ap = run.aps.get(&run.pipeline).await?;
        let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&stack.get("BALLAST_MYSQL_HOT_URL")?)?);
        let hot = HotStore::new(
            pool,
            &ap.spec.hot_store.database,
            HotStore::DEFAULT_DATABASES,
            HotStore::DEFAULT_TABLES,
        );
        let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_COLD_URL")?, None)?;
        let cold = ColdStore::new(es, &ap.spec.cold_store.index_prefix, Duration::from_secs(10));
        Ok(Self {
            today: Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond()),
            table: format!("past_{}", run.pipeline.replace('-', "_")),
            hot,
            cold,
            run,
        })
    }

    /// Runs `ballast-worker nightly` as a process; its report, or `None` if
    /// `kill_when` said to kill it first.
    async fn job(&self, kill_when: Option<&(dyn Fn(u64) -> bool + Sync)>) -> anyhow::Result<Option<Value>> {
        let stack = Stack::discover();
        let log_path = std::env::temp_dir().join(format!("ballast-{}-nightly.log", self.run.namespace));
        let log = std::fs::File::create(&log_path)?;
        let child = std::process::Command::new(ballast_e2e::worker_binary()?)
            .arg("nightly")
            .env("KUBECONFIG", stack.get("KUBECONFIG")?)
            .env("BALLAST_PIPELINE", &self.run.pipeline)
            .env("POD_NAMESPACE", &self.run.namespace)
            .env("POD_NAME", "nightly-test")
            .env("BALLAST_HOT_MYSQL_PASSWORD", "ballast")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::from(log))
            .spawn()?;
        let mut child = ballast_e2e::KillOnDrop(child);
        let started = Instant::now();
        loop {
            if let Some(status) = child.0.try_wait()? {
                let mut out = String::new();
                if let Some(mut stdout) = child.0.stdout.take() {
                    use std::io::Read;
                    stdout.read_to_string(&mut out)?;
                }
                if !status.success() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    anyhow::bail!("nightly exited {status}: {out} {tail:?}");
                }
                let last = out.lines().last().unwrap_or_default();
                return Ok(Some(serde_json::from_str(last)?));
            }
            if let Some(kill_when) = kill_when
                && kill_when(self.rolled_count().await?)
            {
                child.0.kill()?;
                let _ = child.0.wait();
                return Ok(None);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "nightly ran over 5 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rollup documents of the pipeline in the cold store.
    async fn rolled_count(&self) -> anyhow::Result<u64> {
        let es =
            ballast_worker::connect::elasticsearch(&Stack::discover().get("BALLAST_ES_COLD_URL")?, None)?;
        let index = format!("{}-*", self.prefix());
        let _ = es
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[&index]))
            .send()
            .await?;
        let found: Value = es
            .count(elasticsearch::CountParts::Index(&[&index]))
            .send()
            .await?
            .json()
            .await?;
        Ok(found["count"].as_u64().unwrap_or(0))
    }

    fn prefix(&self) -> String {
        format!("{}-daily", self.run.pipeline)
    }

    /// Every rollup document, by id.
    async fn rolled(&self) -> anyhow::Result<BTreeMap<String, Value>> {
        let es =
            ballast_worker::connect::elasticsearch(&Stack::discover().get("BALLAST_ES_COLD_URL")?, None)?;
        let index = format!("{}-*", self.prefix());
        let found: Value = es
            .search(elasticsearch::SearchParts::Index(&[&index]))
            .body(json!({"size": 10_000, "query": {"match_all": {}}}))
            .send()
            .await?
            .json()
            .await?;
        Ok(found["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h["_id"].as_str().unwrap_or_default().to_owned(),
                    h["_source"].clone(),
                )
            })
            .collect())
    }

    async fn history(&self, merchant: &str, from: Day, to: Day) -> anyhow::Result<(u16, Value)> {
        let port = self.run.query_port().await?;
        let response = scenario::http_get_full(
            port,
            &format!("/v1/merchants/{merchant}/history?from={from}&to={to}&groupBy=day&aggregate=sum:gmv&aggregate=max:paying_users"),
        )
        .await?;
        Ok((response.code, serde_json::from_str(&response.body)?))
    }
}

/// Orders of `days` (days before today) in their own table, and their
/// results written to the hot MySQL as the slaves write them: each window's,
/// each day's (MariaDB's computation over the raw rows). Returns the
/// merchants and MariaDB's daily metrics.
async fn past_results(n: &mut Nightly, days: &[i32]) -> anyhow::Result<BTreeMap<(i64, String), Metrics>> {
    let table = n.table.clone();
    let batch: Vec<(orders::Order, String)> = Orders::new(&n.run.pipeline, 4, 17)
        .batch(400 * days.len())
        .into_iter()
        .enumerate()
        .map(|(i, o)| (o, Day(n.today.0 - days[i % days.len()]).to_string()))
        .collect();
    orders::insert_past(&mut n.run.db, &table, &batch).await?;
    let pipeline = n.run.pipeline.clone();
    for (granularity, length) in [(Granularity::Window, WINDOW_MS), (Granularity::Day, DAY_MS)] {
        let computed = orders::expected_in(&mut n.run.db, &table, &pipeline, length, "TRUE").await?;
        let mut by_start: BTreeMap<i64, Vec<MerchantResult>> = BTreeMap::new();
        for ((start, merchant), metrics) in &computed {
            let mut m = metrics.to_json();
            m.insert("_sql".into(), "test".into());
            by_start.entry(*start).or_default().push(MerchantResult {
                merchant_id: merchant.clone(),
                metrics: m,
            });
        }
        for (start, results) in by_start {
            let slot = Slot {
                pipeline: pipeline.clone(),
                granularity,
                window_start_ms: start,
            };
            n.hot.write(&slot, 1, &results).await?;
        }
    }
    Ok(orders::expected_in(&mut n.run.db, &table, &pipeline, DAY_MS, "TRUE").await?)
}

#[tokio::test]
async fn nightly_rolls_whole_days_trims_the_hot_store_and_precomputes_what_merchants_ask()
-> anyhow::Result<()> {
    let mut n = Nightly::start().await?;
    n.hot.ensure_schema().await?;
    let daily = past_results(&mut n, &[1, 2, 3, 4]).await?;
    let today = n.today;
    let merchant = format!("{}-m1", n.run.pipeline);

    // Day -4 has a window whose events are in the KV store and that has no result.
    let missing_at = Day(today.0 - 4).start_ms() + 3 * 3_600_000 + 30 * WINDOW_MS + 17;
    let stack = Stack::discover();
    let kv = redis::Client::open(stack.get("BALLAST_REDIS_KV_URL")?)?
        .get_connection_manager()
        .await?;
    let layout = ballast_worker::kv::Layout::new(n.run.pipeline.clone(), WINDOW_MS);
    let mut kv = ballast_worker::kv::KvStore::new(kv, layout, 3600);
    let event = ChangeEvent::insert("lost-1", merchant.clone(), "orders", missing_at, b"{}".to_vec());
    kv.write(&[event]).await?;
    let missing_window = missing_at - missing_at.rem_euclid(WINDOW_MS);

    // The query log: "the last 7 days" asked each of the last 7 days, a
    // one-off range twice, and a malformed entry.
    n.cold.install_log_template().await?;
    let last7 = "from=@7&to=@1&groupBy=day&aggregate=sum:gmv&aggregate=max:paying_users";
    let mut entries: Vec<Entry> = (1..=7)
        .map(|back| Entry {
            merchant: merchant.clone(),
            day: Day(today.0 - back).to_string(),
            key: last7.into(),
            took_ms: 5,
        })
        .collect();
    let one_off = "from=@4&to=@3&groupBy=day&aggregate=sum:gmv&aggregate=max:paying_users";
    for _ in 0..2 {
        entries.push(Entry {
            merchant: merchant.clone(),
            day: Day(today.0 - 2).to_string(),
            key: one_off.into(),
            took_ms: 9,
        });
    }
    entries.push(Entry {
        merchant: format!("{}-m2", n.run.pipeline),
        day: Day(today.0 - 1).to_string(),
        key: "from=@x&to".into(),
        took_ms: 1,
    });
    n.cold.log(&entries, Refresh::WaitFor).await?;

    // Killed midway (its rollups written, its deletes held up by a lock on
    // the hot tables): the complete run below leaves no gap and no duplicate.
    let whole = daily
        .keys()
        .filter(|(start, _)| Day::of_ms(*start).0 >= today.0 - 3)
        .count() as u64;
    let hot_url = stack.get("BALLAST_MYSQL_HOT_URL")?;
    let mut lock = mysql_async::Conn::new(mysql_async::Opts::from_url(&hot_url)?).await?;
    let tables: Vec<String> = (0..HotStore::DEFAULT_DATABASES)
        .flat_map(|d| (0..HotStore::DEFAULT_TABLES).map(move |t| (d, t)))
        .map(|(d, t)| format!("{} READ", n.hot.table_name(d, t)))
        .collect();
    lock.query_drop(format!("LOCK TABLES {}", tables.join(", ")))
        .await?;
    let killed = n.job(Some(&|count| count >= whole)).await;
    lock.query_drop("UNLOCK TABLES").await?;
    anyhow::ensure!(killed?.is_none(), "the job finished before it could be killed");

    // The complete run: three whole days rolled, the fourth not (named), the
    // two oldest rolled days deleted from the hot MySQL.
    let report = n.job(None).await?.unwrap_or_default();
    let day = |back: i32| Day(today.0 - back).to_string();
    let rolled: Vec<&String> = report["rolled"]
        .as_object()
        .map(|r| r.keys().collect())
        .unwrap_or_default();
    assert_eq!(rolled, vec![&day(3), &day(2), &day(1)], "{report}");
    assert_eq!(
        report["notRolled"][day(4)],
        json!({"reason": "missingWindow", "startMs": missing_window, "events": 1}),
        "{report}"
    );
    let deleted: Vec<&String> = report["deleted"]
        .as_object()
        .map(|r| r.keys().collect())
        .unwrap_or_default();
    assert_eq!(deleted, vec![&day(3), &day(2)], "{report}");
    assert_eq!(report["malformedLogEntries"], 1, "{report}");
    assert!(report["precomputed"].as_u64().is_some_and(|p| p >= 1), "{report}");
    let kept: Vec<String> = n
        .hot
        .days(&n.run.pipeline)
        .await?
        .into_iter()
        .map(|d| Day::of_ms(d).to_string())
        .filter(|d| *d != today.to_string())
        .collect();
    assert_eq!(
        kept,
        vec![day(4), day(1)],
        "the day not rolled and the retention stay"
    );

    // The rollups equal MariaDB's daily computation over the raw rows.
    let docs = n.rolled().await?;
    let want = daily
        .keys()
        .filter(|(start, _)| Day::of_ms(*start).0 >= today.0 - 3)
        .count();
    assert_eq!(docs.len(), want, "one document per merchant and day, none twice");
    for ((start, m), metrics) in daily.iter().filter(|((s, _), _)| Day::of_ms(*s).0 >= today.0 - 3) {
        let id = ColdStore::id(m, Day::of_ms(*start));
        let doc = docs.get(&id).ok_or_else(|| anyhow::anyhow!("no document {id}"))?;
        let got = doc["m"].as_object().and_then(Metrics::from_json);
        assert!(
            got.as_ref().is_some_and(|g| g.matches(metrics)),
            "{id}: {got:?} != {metrics:?}"
        );
        assert_eq!(
            (doc["shed"].as_bool(), doc["hourlyOnly"].as_bool()),
            (Some(false), Some(false))
        );
    }

    // A rerun changes nothing.
    let again = n.job(None).await?.unwrap_or_default();
    assert_eq!(n.rolled().await?, docs, "the same documents after a rerun");
    assert_eq!(n.rolled_count().await?, docs.len() as u64, "no duplicates");
    assert_eq!(
        again["deleted"],
        json!({}),
        "nothing older is left to delete: {again}"
    );

    // The frequent query, answered with ES up; then with ES stopped, the
    // same numbers from the precomputed set; a one-off range refused with
    // the covered list.
    let (from, to) = (Day(today.0 - 7), Day(today.0 - 1));
    let (code, up) = n.history(&merchant, from, to).await?;
    anyhow::ensure!(code == 200, "HTTP {code}: {up}");
    stack_script(&["stop", "es-cold"])?;
    let down = scenario::eventually("the precomputed answer while ES is down", 60, || async {
        let (code, answer) = n.history(&merchant, from, to).await?;
        Ok::<_, anyhow::Error>((code == 200 && answer["source"] == "precomputed").then_some(answer))
    })
    .await;
    let refused = n.history(&merchant, Day(today.0 - 4), Day(today.0 - 2)).await;
    stack_script(&["up"])?;
    let down = down?;
    assert_eq!(down["rows"], up["rows"], "the same numbers as with ES up");
    assert_eq!(down["asOfMs"], up["asOfMs"]);
    let (code, refused) = refused?;
    assert_eq!(code, 503, "{refused}");
    let covered: Vec<String> = serde_json::from_value(refused["coveredQueries"].clone())?;
    assert_eq!(
        covered,
        vec![format!(
            "from={from}&to={to}&groupBy=day&aggregate=sum:gmv&aggregate=max:paying_users"
        )],
        "{refused}"
    );

    // As the cluster runs it: a Job from the CronJob, completed.
    let cron: Api<CronJob> = Api::namespaced(n.run.client.clone(), &n.run.namespace);
    let jobs: Api<Job> = Api::namespaced(n.run.client.clone(), &n.run.namespace);
    let cj = cron.get(&format!("{}-nightly", n.run.pipeline)).await?;
    let template = cj.spec.map(|s| s.job_template).unwrap_or_default();
    let job = Job {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{}-nightly-manual", n.run.pipeline)),
            labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
            ..Default::default()
        },
        spec: template.spec,
        ..Job::default()
    };
    jobs.create(&PostParams::default(), &job).await?;
    scenario::eventually("the Job from the CronJob complete", 180, || async {
        let job = jobs.get(&format!("{}-nightly-manual", n.run.pipeline)).await?;
        let done = job.status.and_then(|s| s.succeeded).unwrap_or(0) >= 1;
        Ok::<_, kube::Error>(done.then_some(()))
    })
    .await?;
    Ok(())
}
