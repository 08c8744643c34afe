//! The slave role, compute side: runs a task the master sends — loads the
//! window's events (from the KV store, or from its own memory while the KV
//! store is down), runs the pipeline's SQL over them with DataFusion, and
//! writes the results, fenced by the task's version, to the hot MySQL and the
//! cache (the cache only while MySQL is degraded). It reports its queue depth
//! and CPU use for the master's scheduler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ballast_crds::{Dependency, Mode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, watch};
use tonic::Status;

use super::lock;
use super::store::{SpanExpired, Store};
use crate::compute::output::{FROM_COLUMN, SQL_COLUMN, THROUGH_COLUMN};
use crate::compute::runtime::Engine;
use crate::compute::{ComputeError, MerchantResult, Sql};
use crate::health::counter;
use crate::kv::{BUCKET_TTL_SECONDS, KvError, KvStore, Layout};
use crate::modes::Modes;
use crate::results::cache::ResultCache;
use crate::results::hot::HotStore;
use crate::results::{Fenced, Granularity, ResultsError, Slot};
use crate::roles::startup;
use crate::wire::{ComputeTask, DataSource, SlaveLoad, TaskReport};

/// The compute side's metrics (`ballast_slave_*`).
pub struct Metrics {
    tasks: Family<[(&'static str, &'static str); 1], Counter>,
    events: Counter,
    refused: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Metrics {
    /// Registers the compute metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("slave");
        let tasks = Family::default();
        r.register("tasks", "Compute tasks by result: done, failed", tasks.clone());
        let refused = Family::default();
        r.register(
            "results_refused",
            "Result rows refused by the version fence (a newer attempt wrote first), by store",
            refused.clone(),
        );
        Self {
            tasks,
            events: counter(r, "compute_events", "Events computed over"),
            refused,
        }
    }
}

/// Connections to the stores a task reads and writes; reconnected after a failure.
pub struct Stores {
    /// Connection options of the KV Redis.
    pub kv: redis::ConnectionInfo,
    /// Key layout of the KV store.
    pub layout: Layout,
    /// The hot MySQL.
    pub hot: HotStore,
    /// Connection options of the cache Redis.
    pub cache: redis::ConnectionInfo,
}

/// Runs compute tasks with a bounded number at once.
pub struct Computer {
    pipeline: String,
    engine: Engine,
    stores: Stores,
    kv: tokio::sync::Mutex<Option<KvStore>>,
    cache: tokio::sync::Mutex<Option<ResultCache>>,
    schema_ready: tokio::sync::OnceCell<()>,
    memory: Arc<Mutex<Store>>,
    modes: watch::Receiver<Modes>,
    slots: Arc<Semaphore>,
    slot_count: u32,
    /// The SQLs tasks named lately, compiled, by identity.
    sqls: Mutex<HashMap<String, Sql>>,
    queued: AtomicU32,
    running: AtomicU32,
    metrics: Arc<Metrics>,
}

/// Why a task failed, mapped to the gRPC status the master classifies.
#[derive(Debug, thiserror::Error)]
enum TaskError {
    #[error("reading the window from the KV store: {0}")]
    Kv(#[from] KvError),
    #[error("KV store unreachable: {0}")]
    KvConnect(redis::RedisError),
    #[error("computing the window: {0}")]
    Compute(#[from] ComputeError),
    #[error("writing results: {0}")]
    Results(#[from] ResultsError),
    #[error("cache unreachable: {0}")]
    CacheConnect(redis::RedisError),
    #[error("task {0} has no valid granularity or source")]
    Malformed(String),
    #[error("task {task} names SQL {named} but carries SQL {actual}")]
    SqlMismatch {
        task: String,
        named: String,
        actual: String,
    },
    #[error(transparent)]
    Expired(#[from] SpanExpired),
}

impl From<TaskError> for Status {
    fn from(error: TaskError) -> Self {
        let message = error.to_string();
        match error {
            // The engine itself failing (e.g. out of memory) may pass on a retry.
            TaskError::Compute(ComputeError::Engine(_)) => Status::unavailable(message),
            // Too heavy for this pod's budget: retried, then moved elsewhere.
            TaskError::Compute(ComputeError::OutOfMemory { .. }) => Status::resource_exhausted(message),
            TaskError::Compute(_) => Status::invalid_argument(message),
            TaskError::Malformed(_) | TaskError::SqlMismatch { .. } => Status::invalid_argument(message),
            TaskError::Kv(KvError::Corrupt { .. }) => Status::data_loss(message),
            // Not retryable: the data will never be whole again here.
            TaskError::Expired(_) => Status::out_of_range(message),
            _ => Status::unavailable(message),
        }
    }
}

impl Computer {
    /// A computer running its engine's SQL with `slots` tasks at once.
    pub fn new(
        pipeline: String,
        engine: Engine,
        stores: Stores,
        memory: Arc<Mutex<Store>>,
        modes: watch::Receiver<Modes>,
        slots: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pipeline,
            engine,
            stores,
            kv: tokio::sync::Mutex::new(None),
            cache: tokio::sync::Mutex::new(None),
            schema_ready: tokio::sync::OnceCell::new(),
            memory,
            modes,
            slots: Arc::new(Semaphore::new(slots.max(1) as usize)),
            slot_count: slots.max(1),
            sqls: Mutex::default(),
            queued: AtomicU32::new(0),
            running: AtomicU32::new(0),
            metrics,
        }
    }

    /// Queue depth and CPU use now (what memory holds is the store's to fill in).
    pub fn load(&self) -> SlaveLoad {
        SlaveLoad {
            queued: self.queued.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            slots: self.slot_count,
            cpu_seconds: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|stat| cpu_seconds(&stat))
                .unwrap_or(0.0),
            ..SlaveLoad::default()
        }
    }

    /// Runs `task` to completion: waits for a slot, loads, computes, writes.
    #[tracing::instrument(skip_all, fields(task = %task.task_id, version = task.version))]
    pub async fn run(self: Arc<Self>, task: ComputeTask) -> Result<TaskReport, Status> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let permit = self.slots.clone().acquire_owned().await;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        let Ok(_permit) = permit else {
            return Err(Status::unavailable("slave is shutting down"));
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.execute(&task).await;
        self.running.fetch_sub(1, Ordering::Relaxed);
        let outcome = if result.is_ok() { "done" } else { "failed" };
        self.metrics.tasks.get_or_create(&[("result", outcome)]).inc();
        match result {
            Ok(mut report) => {
                report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                if report.refused_hot + report.refused_cache > 0 {
                    tracing::warn!(
                        refused_hot = report.refused_hot,
                        refused_cache = report.refused_cache,
                        "results refused: a newer attempt of this task already wrote"
                    );
                }
                Ok(report)
            }
            Err(error) => {
                tracing::warn!(%error, "task failed");
                Err(error.into())
            }
        }
    }

    async fn execute(&self, task: &ComputeTask) -> Result<TaskReport, TaskError> {
        let malformed = || TaskError::Malformed(task.task_id.clone());
        let granularity = match crate::wire::Granularity::try_from(task.granularity) {
            Ok(crate::wire::Granularity::Window) => Granularity::Window,
            Ok(crate::wire::Granularity::Hour) => Granularity::Hour,
            Ok(crate::wire::Granularity::Day) => Granularity::Day,
            _ => return Err(malformed()),
        };
        let (events, from) = match DataSource::try_from(task.source) {
            Ok(DataSource::Kv) => (self.read_kv(task).await?, "kv"),
            Ok(DataSource::Memory) => (
                lock(&self.memory).span(task.window_start_ms, task.window_end_ms)?,
                "memory",
            ),
            _ => return Err(malformed()),
        };
        self.metrics.events.inc_by(events.len() as u64);
        let count = events.len();
        // The types the operator published for the source tables, as of now.
        let schema = self.modes.borrow().source_schema();
        let (sql_id, sql) = self.sql_of(task)?;
        let mut results = self.engine.run(sql, events, schema).await?;
        // A to-date result says how far it reaches: its task may be widened.
        let through = (granularity != Granularity::Window).then_some(task.window_end_ms);
        for result in &mut results {
            result
                .metrics
                .insert(SQL_COLUMN.to_owned(), serde_json::Value::String(sql_id.clone()));
            if let Some(through) = through {
                result
                    .metrics
                    .insert(THROUGH_COLUMN.to_owned(), serde_json::Value::from(through));
                result
                    .metrics
                    .insert(FROM_COLUMN.to_owned(), serde_json::Value::from(from));
            }
        }
        let slot = Slot {
            pipeline: self.pipeline.clone(),
            granularity,
            window_start_ms: task.window_start_ms,
        };
        let (hot, hot_skipped) = self.write_hot(&slot, task.version, &results).await?;
        let cache = self.write_cache(&slot, task.version, &results).await?;
        Ok(TaskReport {
            events: count as u64,
            merchants: u32::try_from(results.len()).unwrap_or(u32::MAX),
            duration_ms: 0,
            refused_hot: u32::try_from(hot.refused).unwrap_or(u32::MAX),
            refused_cache: u32::try_from(cache.refused).unwrap_or(u32::MAX),
            hot_skipped,
        })
    }

    /// The SQL a task names, compiled once per identity (and refused, like
    /// any SQL, unless allowed); the slave's own SQL for a task that names
    /// none (from a master older than SQL-stamped tasks).
    fn sql_of(&self, task: &ComputeTask) -> Result<(String, Option<Sql>), TaskError> {
        if task.sql.is_empty() {
            return Ok((self.engine.sql().identity().to_owned(), None));
        }
        let sqls = || self.sqls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sql) = sqls().get(&task.sql_id) {
            return Ok((task.sql_id.clone(), Some(sql.clone())));
        }
        let sql = Sql::parse(&task.sql)?;
        if sql.identity() != task.sql_id {
            return Err(TaskError::SqlMismatch {
                task: task.task_id.clone(),
                named: task.sql_id.clone(),
                actual: sql.identity().to_owned(),
            });
        }
        let mut sqls = sqls();
        // A few SQLs are in use at once (a change, a recomputation): start afresh past that.
        if sqls.len() >= 8 {
            sqls.clear();
        }
        sqls.insert(task.sql_id.clone(), sql.clone());
        Ok((task.sql_id.clone(), Some(sql)))
    }

    async fn read_kv(&self, task: &ComputeTask) -> Result<Vec<crate::wire::ChangeEvent>, TaskError> {
        let layout = &self.stores.layout;
        let mut store = connected(&self.kv, &self.stores.kv, |conn| {
            KvStore::new(conn, layout.clone(), BUCKET_TTL_SECONDS)
        })
        .await
        .map_err(TaskError::KvConnect)?;
        Ok(store
            .span(
                task.window_start_ms,
                task.window_end_ms,
                task.partition,
                task.partitions,
            )
            .await?)
    }

    async fn write_hot(
        &self,
        slot: &Slot,
        version: u64,
        results: &[MerchantResult],
    ) -> Result<(Fenced, bool), TaskError> {
        if self.modes.borrow().get(Dependency::Mysql).0 == Mode::Degraded {
            return Ok((Fenced::default(), true));
        }
        let hot = &self.stores.hot;
        self.schema_ready.get_or_try_init(|| hot.ensure_schema()).await?;
        let fenced = hot.write(slot, version, results).await?;
        if fenced.refused > 0 {
            self.metrics
                .refused
                .get_or_create(&[("store", "mysql")])
                .inc_by(fenced.refused);
        }
        Ok((fenced, false))
    }

    async fn write_cache(
        &self,
        slot: &Slot,
        version: u64,
        results: &[MerchantResult],
    ) -> Result<Fenced, TaskError> {
        if self.modes.borrow().get(Dependency::Cache).0 == Mode::Degraded {
            return Ok(Fenced::default());
        }
        let mut cache = connected(&self.cache, &self.stores.cache, ResultCache::new)
            .await
            .map_err(TaskError::CacheConnect)?;
        let fenced = cache.write(slot, version, results).await?;
        if fenced.refused > 0 {
            self.metrics
                .refused
                .get_or_create(&[("store", "cache")])
                .inc_by(fenced.refused);
        }
        Ok(fenced)
    }
}

/// The client kept in `slot`, connected to `info` on first use. A clone is
/// handed out, so concurrent tasks do not queue behind the lock.
async fn connected<T: Clone>(
    slot: &tokio::sync::Mutex<Option<T>>,
    info: &redis::ConnectionInfo,
    make: impl FnOnce(redis::aio::ConnectionManager) -> T,
) -> Result<T, redis::RedisError> {
    let mut slot = slot.lock().await;
    if let Some(client) = slot.as_ref() {
        return Ok(client.clone());
    }
    let client = make(startup::redis_connection(info).await?);
    *slot = Some(client.clone());
    Ok(client)
}

/// CPU seconds (user + system) from the text of `/proc/self/stat`. Pure.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks are 100 per second on Linux unless the kernel says otherwise.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "4242 (ballast (x) w) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
        assert_eq!(cpu_seconds("1 (x) S 1 2"), None);
    }
}
