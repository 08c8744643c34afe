//! The hot read of one merchant's day: the Redis cache first, the hot MySQL
//! on a miss (filling the cache through one flight per key, fenced by each
//! result's version), this pod's in-process cache behind a rate limit while
//! the cache is down. Every store call has a deadline and goes through the
//! store's breaker, so a hanging store is skipped at once after a few calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_crds::Dependency;
use ballast_flow::{CallError, Flow, GuardedDependency, Refusal};
use tokio::sync::{OnceCell, watch};

use super::contract::Source;
use super::metrics::Metrics;
use super::path::{self, Path};
use crate::modes::Modes;
use crate::results::cache::{CachedDay, ResultCache, day_key};
use crate::results::hot::HotStore;
use crate::results::{Granularity, ResultsError, StoredText};

/// One merchant's results of a day, by (granularity, start), their metrics
/// as stored: an answer passes them on without parsing them.
pub type Day = BTreeMap<(Granularity, i64), StoredText>;

/// One read of a key that every request asking meanwhile waits on.
type Flight = OnceCell<Result<Found, Unavailable>>;

/// What a read found.
#[derive(Clone, Debug)]
pub struct Found {
    /// The results.
    pub day: Arc<Day>,
    /// Which store answered.
    pub source: Source,
    /// A cached day served before it was checked against the hot MySQL:
    /// the checks were over their rate while the cache re-warms after an outage.
    pub unchecked: bool,
}

/// Why a hot answer cannot be given.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Unavailable {
    /// Over the rate limit in front of the hot MySQL (the cache is down).
    #[error(transparent)]
    Limited(Refusal),
    /// The hot MySQL is down and the merchant's results are not in the cache.
    #[error("the hot MySQL is unavailable and this merchant's results are not in the result cache")]
    NotCached,
    /// Both stores are down and this pod has no copy of the merchant's results.
    #[error(
        "the hot MySQL and the result cache are unavailable and this server holds no copy of this merchant's results"
    )]
    NoStore,
    /// The hot MySQL failed or missed its deadline on this request.
    #[error("the hot MySQL did not answer: {0}")]
    Mysql(String),
}

impl Unavailable {
    /// Machine-readable reason, as the 503 body and the metric label name it.
    pub fn code(&self) -> &'static str {
        match self {
            Unavailable::Limited(_) => "rateLimited",
            Unavailable::NotCached => "notCached",
            Unavailable::NoStore => "noStore",
            Unavailable::Mysql(_) => "mysqlFailed",
        }
    }

    /// What is still served instead, for the 503 body.
    pub fn covered(&self) -> &'static str {
        match self {
            Unavailable::Limited(_) => "answers already in this server's in-process cache",
            Unavailable::NotCached => "merchants whose results are in the result cache",
            Unavailable::NoStore => "merchants answered by this server within its in-process cache TTL",
            Unavailable::Mysql(_) => "merchants whose results are in the result cache",
        }
    }
}

/// The stores and the state of the hot read path.
pub struct Reader {
    pipeline: String,
    /// The cache client once connected (the connection is made in the background).
    cache: watch::Receiver<Option<ResultCache>>,
    hot: HotStore,
    flow: Flow,
    deadline: Duration,
    local: quick_cache::sync::Cache<String, (Instant, Arc<Day>)>,
    local_ttl: Duration,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    metrics: Arc<Metrics>,
}

/// The settings of a [`Reader`].
pub struct ReaderConfig {
    /// The pipeline.
    pub pipeline: String,
    /// Deadline of each store call.
    pub deadline: Duration,
    /// Entries of the in-process cache.
    pub local_entries: usize,
    /// How long an in-process entry is served.
    pub local_ttl: Duration,
}

impl Reader {
    /// A reader over `cache` (when connected) and `hot`, guarded by `flow`.
    pub fn new(
        config: ReaderConfig,
        cache: watch::Receiver<Option<ResultCache>>,
        hot: HotStore,
        flow: Flow,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pipeline: config.pipeline,
            cache,
            hot,
            flow,
            deadline: config.deadline,
            local: quick_cache::sync::Cache::new(config.local_entries.max(1)),
            local_ttl: config.local_ttl,
            flights: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The flow control (its rules follow the cache's mode).
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// One merchant's results on the UTC day starting at `day_start_ms`,
    /// from the stores the modes and breakers allow.
    pub async fn day(&self, modes: &Modes, merchant: &str, day_start_ms: i64) -> Result<Found, Unavailable> {
        let cache_usable = path::usable(modes.get(Dependency::Cache).0) && self.cache.borrow().is_some();
        let mysql_usable = path::usable(modes.get(Dependency::Mysql).0);
        let mut route = path::path(cache_usable, mysql_usable);
        let key = day_key(&self.pipeline, day_start_ms, merchant);
        if matches!(route, Path::CacheThenMysql | Path::CacheOnly) {
            match self.read_cache(merchant, day_start_ms).await {
                Ok(cached) => {
                    let cache_epoch = modes.get(Dependency::Cache).1;
                    if path::trusted(cached.checked_epoch, cache_epoch) {
                        return Ok(self.found(cached.results, Source::Cache));
                    }
                    if route == Path::CacheOnly {
                        if cached.results.is_empty() {
                            return Err(Unavailable::NotCached);
                        }
                        return Ok(self.found(cached.results, Source::Cache));
                    }
                    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                    let cache = modes.get(Dependency::Cache);
                    let paced = path::pace_checks(cache, modes.since_ms(Dependency::Cache), now_ms);
                    return self
                        .single_flight(
                            &key,
                            self.paced_check(merchant, day_start_ms, cached, cache_epoch, paced),
                        )
                        .await;
                }
                Err(error) => {
                    self.metrics.store_failed("cache");
                    tracing::debug!(%error, "cache read failed: reading without it");
                    route = path::without_cache(route);
                }
            }
        }
        if let Some((at, day)) = self.local.get(&key)
            && at.elapsed() < self.local_ttl
        {
            return Ok(Found {
                day,
                source: Source::LocalCache,
                unchecked: false,
            });
        }
        if route == Path::LocalOnly {
            return Err(if mysql_usable {
                Unavailable::NotCached
            } else {
                Unavailable::NoStore
            });
        }
        // In front of the hot MySQL while the cache cannot shield it.
        let admission = self.flow.admit("query", None).map_err(Unavailable::Limited)?;
        let found = self
            .single_flight(&key, async {
                let day = self
                    .read_mysql(merchant, day_start_ms)
                    .await
                    .map_err(Unavailable::Mysql)?;
                Ok(self.found(day, Source::Mysql))
            })
            .await?;
        drop(admission);
        self.local.insert(key, (Instant::now(), Arc::clone(&found.day)));
        Ok(found)
    }

    fn found(&self, day: Day, source: Source) -> Found {
        Found {
            day: Arc::new(day),
            source,
            unchecked: false,
        }
    }

    /// A check of a cached day, when `paced` by the rate in front of the hot
    /// MySQL (one admission per flight, not per request waiting on it): after
    /// a cache outage every merchant's day is unchecked, and checking them all
    /// at once would send the whole read load to MySQL. Over the rate, the
    /// cached day is the answer, marked unchecked; an empty one is a 429.
    async fn paced_check(
        &self,
        merchant: &str,
        day_start_ms: i64,
        cached: CachedDay,
        epoch: i64,
        paced: bool,
    ) -> Result<Found, Unavailable> {
        let admission = match paced.then(|| self.flow.admit("query", None)) {
            None => None,
            Some(Ok(admission)) => Some(admission),
            Some(Err(_)) if !cached.results.is_empty() => {
                self.metrics.unchecked.inc();
                return Ok(Found {
                    unchecked: true,
                    ..self.found(cached.results, Source::Cache)
                });
            }
            Some(Err(refusal)) => return Err(Unavailable::Limited(refusal)),
        };
        let found = self
            .check(merchant, day_start_ms, cached, epoch)
            .await
            .map_err(Unavailable::Mysql);
        drop(admission);
        found
    }

    async fn read_cache(&self, merchant: &str, day_start_ms: i64) -> Result<CachedDay, String> {
        let Some(mut cache) = self.cache.borrow().clone() else {
            return Err("the result cache is not connected".into());
        };
        self.flow
            .call(GuardedDependency::Redis, self.deadline, async {
                cache.read_day(&self.pipeline, day_start_ms, merchant).await
            })
            .await
            .map_err(describe)
    }

    async fn read_mysql(&self, merchant: &str, day_start_ms: i64) -> Result<Day, String> {
        let to = day_start_ms + crate::results::cache::DAY_MS;
        self.flow
            .call(GuardedDependency::Mysql, self.deadline, async {
                self.hot
                    .read_merchant_range(&self.pipeline, merchant, day_start_ms, to)
                    .await
            })
            .await
            .map_err(|e| {
                self.metrics.store_failed("mysql");
                describe(e)
            })
    }

    /// Checks a cached day against the hot MySQL: the union of both (the
    /// higher version of each result), written back to the cache as checked
    /// in `epoch`. A failed write-back only costs the next request a check.
    /// When MySQL fails before its mode is published, what the cache holds
    /// beats nothing: it is the answer, from the cache.
    async fn check(
        &self,
        merchant: &str,
        day_start_ms: i64,
        cached: CachedDay,
        epoch: i64,
    ) -> Result<Found, String> {
        let from_mysql = match self.read_mysql(merchant, day_start_ms).await {
            Ok(rows) => rows,
            Err(_) if !cached.results.is_empty() => return Ok(self.found(cached.results, Source::Cache)),
            Err(error) => return Err(error),
        };
        let day = merge(cached.results, from_mysql);
        let cache = self.cache.borrow().clone();
        if let Some(mut cache) = cache {
            let filled = self
                .flow
                .call(GuardedDependency::Redis, self.deadline, async {
                    cache
                        .fill(&self.pipeline, day_start_ms, merchant, &day, epoch)
                        .await
                })
                .await;
            match filled {
                Ok(_) => {
                    self.metrics.fills.inc();
                }
                Err(error) => tracing::debug!(error = %describe(error), "filling the cache failed"),
            }
        }
        Ok(self.found(day, Source::Mysql))
    }

    /// Runs `read` once for `key` however many requests ask at the same time.
    async fn single_flight<F>(&self, key: &str, read: F) -> Result<Found, Unavailable>
    where
        F: Future<Output = Result<Found, Unavailable>>,
    {
        let cell = {
            let mut flights = self
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(flights.entry(key.to_owned()).or_default())
        };
        let result = cell.get_or_init(|| read).await.clone();
        {
            let mut flights = self
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Only the flight this request joined: a newer one may have started.
            if flights.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                flights.remove(key);
            }
        }
        result
    }
}

/// A store error as the 503 body and the logs say it.
fn describe(error: CallError<ResultsError>) -> String {
    error.to_string()
}

/// The union of a cached day and the hot MySQL's rows: for each result the
/// higher version (the cache may hold newer results, written while MySQL was
/// down; MySQL may hold results written while the cache was down). Pure.
pub fn merge(cached: Day, mysql: Day) -> Day {
    let mut out = cached;
    for (slot, stored) in mysql {
        match out.get(&slot) {
            Some(have) if have.version >= stored.version => {}
            _ => {
                out.insert(slot, stored);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(version: u64, gmv: i64) -> StoredText {
        StoredText {
            version,
            metrics: json!({ "gmv": gmv }).to_string(),
            columns: vec!["gmv".into()],
        }
    }

    #[test]
    fn merging_keeps_the_higher_version_of_each_result_and_every_result_of_either() {
        let w = |s| (Granularity::Window, s);
        let cached: Day = [
            (w(0), stored(3, 30)),
            (w(60), stored(5, 50)),
            (w(120), stored(1, 1)),
        ]
        .into();
        let mysql: Day = [
            (w(0), stored(4, 40)),
            (w(60), stored(2, 20)),
            (w(180), stored(1, 9)),
        ]
        .into();
        let merged = merge(cached, mysql);
        let got: Vec<(i64, u64)> = merged.iter().map(|((_, s), v)| (*s, v.version)).collect();
        assert_eq!(got, vec![(0, 4), (60, 5), (120, 1), (180, 1)]);
        let equal = merge([(w(0), stored(2, 1))].into(), [(w(0), stored(2, 2))].into());
        assert_eq!(
            equal[&w(0)].metrics,
            r#"{"gmv":1}"#,
            "the same version: the cached one stays"
        );
    }
}
