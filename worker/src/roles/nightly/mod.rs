//! The nightly job (`ballast-worker nightly`, run by the pipeline's CronJob):
//! rolls each closed, whole day of the hot MySQL into the cold store (one
//! document per merchant and day, idempotent), deletes from the hot MySQL
//! the days already rolled and older than the retention, learns each
//! merchant's frequent cold queries from the query log, and precomputes
//! their answers for the day ahead into the hot MySQL, where the query
//! service reads them (into memory) while the cold store is down. It prints
//! what it did as one JSON report on stdout and exits.

pub mod learn;
pub mod rollup;

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_flow::{Flow, Rules};
use elasticsearch::params::Refresh;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::rollup::NotRolled;
use super::Deps;
use super::query::history::{self, Cold};
use super::startup::{self, StartupError};
use crate::cold::{ColdStore, Day, EsError};
use crate::kv::{KvStore, Layout};
use crate::modes::Modes;
use crate::results::ResultsError;
use crate::results::days::Precomputed;
use crate::results::hot::HotStore;
use crate::secret::Secret;
use crate::shedding;

/// Settings of a nightly run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// How long after closing a window late events may still change it.
    pub lateness: Duration,
    /// Deadline of each cold store call.
    pub deadline: Duration,
    /// Password of the hot MySQL user.
    pub hot_password: Option<Secret>,
    /// Password of the KV store.
    pub kv_password: Option<Secret>,
    /// User and password of the cold store.
    pub cold_credentials: Option<(String, Secret)>,
    /// Now, in ms (the clock, unless a test sets it).
    pub now_ms: i64,
}

/// Why a nightly run failed (it is run again by its Job).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The hot MySQL failed.
    #[error(transparent)]
    Hot(#[from] ResultsError),
    /// The cold store failed.
    #[error(transparent)]
    Cold(#[from] EsError),
    /// Stopped before the end.
    #[error("stopped before the end; a rerun completes the work")]
    Stopped,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Days rolled, with the merchants in each.
    pub rolled: BTreeMap<String, usize>,
    /// Days not rolled, and why.
    pub not_rolled: BTreeMap<String, NotRolled>,
    /// Days deleted from the hot MySQL, with the rows deleted.
    pub deleted: BTreeMap<String, u64>,
    /// Frequent queries precomputed, for the day ahead.
    pub precomputed: usize,
    /// Query log keys that could not be read back as a request: skipped.
    pub malformed_log_entries: u64,
    /// Frequent queries whose precomputation failed: skipped.
    pub failed_precomputations: u64,
}

/// Rows per delete statement: a short lock each.
const DELETE_BATCH: u32 = 2_000;

/// Runs once; the report of what it did.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<Report, Error> {
    let (ap, dp) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let hot = HotStore::new(
        mysql_async::Pool::new(crate::connect::mysql(
            &ap.spec.hot_store,
            config.hot_password.as_ref(),
        )),
        &ap.spec.hot_store.database,
        HotStore::DEFAULT_DATABASES,
        HotStore::DEFAULT_TABLES,
    );
    let es = crate::connect::elasticsearch(
        &ap.spec.cold_store.elasticsearch.url,
        config.cold_credentials.clone(),
    )
    .map_err(StartupError::ColdOptions)?;
    let store = ColdStore::new(es, &ap.spec.cold_store.index_prefix, config.deadline);
    store.install_template().await?;
    store.install_log_template().await?;
    let status = ap.status.clone().unwrap_or_default();
    let window_ms = i64::from(ap.spec.compute.window_seconds) * 1000;
    let period_ms = (i64::from(dp.spec.kv.granularity_seconds) * 1000).max(window_ms);
    let lateness_ms = i64::try_from(config.lateness.as_millis()).unwrap_or(i64::MAX);
    let today = Day::of_ms(config.now_ms);
    let layout = Layout::new(config.pipeline.clone(), window_ms);
    let mut kv = kv_store(&ap, config.kv_password.as_ref(), layout).await;
    let mut report = Report::default();

    // Rollups: every closed, whole day still in the hot MySQL.
    let mut rolled = Vec::new();
    for day_start in hot.days(&config.pipeline).await? {
        if shutdown.is_cancelled() {
            return Err(Error::Stopped);
        }
        let day = Day::of_ms(day_start);
        if let Err(why) = rollup::rollable(day, config.now_ms, lateness_ms, &status.failing_windows) {
            report.not_rolled.insert(day.to_string(), why);
            continue;
        }
        let results = hot.read_day(&config.pipeline, day_start).await?;
        if let Some(kv) = kv.as_mut() {
            let counts = window_counts(kv, day, window_ms, &results).await;
            if let Some(why) = rollup::missing_window(&results, &counts, period_ms) {
                tracing::warn!(%day, ?why, "not rolled: a window has events and no result");
                report.not_rolled.insert(day.to_string(), why);
                continue;
            }
        }
        let shed_that_day = status.last_shed_day.as_ref().filter(|d| d.day == day.to_string());
        let shed = |merchant: &str| {
            shed_that_day
                .is_some_and(|d| shedding::is_shed(merchant, u32::try_from(d.max_level).unwrap_or(0)))
        };
        let rollups = rollup::rollups(day, &results, period_ms, shed);
        for chunk in rollups.chunks(2_000) {
            store.write_all(chunk, Refresh::False).await?;
        }
        report.rolled.insert(day.to_string(), rollups.len());
        tracing::info!(%day, merchants = rollups.len(), "day rolled into the cold store");
        rolled.push(day);
    }

    // The small hot store: days rolled (this run: every closed day still
    // there is rolled again, idempotently) and older than the retention.
    let retention = ap.spec.nightly.hot_retention_days;
    for day in rolled.iter().filter(|d| d.0 < today.0 - retention) {
        let deleted = hot
            .delete_day(&config.pipeline, day.start_ms(), DELETE_BATCH)
            .await?;
        report.deleted.insert(day.to_string(), deleted);
    }

    // The frequent cold queries of the lookback, precomputed for today.
    let lookback = dp.spec.cold.lookback_days.max(1);
    let asked = store.frequencies(Day(today.0 - lookback), today).await?;
    let picked = learn::pick(
        asked
            .into_iter()
            .map(|f| learn::Asked {
                merchant: f.merchant,
                key: f.key,
                count: f.count,
                took_ms: f.took_ms,
            })
            .collect(),
        usize::try_from(dp.spec.cold.precomputed_queries_per_user).unwrap_or(0),
    );
    let mut registry = Registry::default();
    let flow = Flow::new(Rules::default(), &mut registry);
    let cold = Cold::new(store.clone());
    let modes = Modes::default();
    let mut answers = Vec::new();
    for (merchant, keys) in picked {
        for key in keys {
            if shutdown.is_cancelled() {
                return Err(Error::Stopped);
            }
            let Some(pairs) = crate::cold::log::resolve(&key, today) else {
                report.malformed_log_entries += 1;
                continue;
            };
            let request = history::Request {
                merchant: &merchant,
                pairs: &pairs,
                today,
                modes: &modes,
            };
            match history::answer(&cold, &flow, request).await {
                Ok(answer) => answers.push(Precomputed {
                    merchant: merchant.clone(),
                    key,
                    answer: serde_json::to_string(&answer).unwrap_or_default(),
                }),
                Err(history::HistoryError::Bad(_)) => report.malformed_log_entries += 1,
                Err(error) => {
                    tracing::warn!(%merchant, %key, %error, "a frequent query could not be precomputed");
                    report.failed_precomputations += 1;
                }
            }
        }
    }
    hot.ensure_precomputed().await?;
    hot.replace_precomputed(&config.pipeline, today.start_ms(), &answers)
        .await?;
    report.precomputed = answers.len();
    Ok(report)
}

/// The KV store, when reachable: without it, missing windows are not
/// checked (the master's failing windows still are).
async fn kv_store(
    ap: &ballast_crds::AnalyticsPipeline,
    password: Option<&Secret>,
    layout: Layout,
) -> Option<KvStore> {
    let info = startup::redis_info(&ap.spec.kv, password, "KV store").ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(5), startup::redis_connection(&info))
        .await
        .ok()?
        .ok()?;
    // Only counted: the TTL is that of the intake's writes, never applied here.
    Some(KvStore::new(conn, layout, crate::kv::BUCKET_TTL_SECONDS))
}

/// Events the KV store holds for each window of `day` from its first
/// result's window to its last (a window outside holds none: no task ran).
async fn window_counts(
    kv: &mut KvStore,
    day: Day,
    window_ms: i64,
    results: &[crate::results::days::DayResult],
) -> Vec<(i64, u64)> {
    let starts = results.iter().map(|r| r.start_ms);
    let (Some(first), Some(last)) = (starts.clone().min(), starts.max()) else {
        return Vec::new();
    };
    let first = first.max(day.start_ms());
    let mut counts = Vec::new();
    let mut start = first - first.rem_euclid(window_ms);
    while start <= last {
        if let Ok(events) = kv.count(start).await {
            counts.push((start, events));
        }
        start += window_ms;
    }
    counts
}
