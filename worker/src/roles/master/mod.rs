//! The master role (seed 001): of a pipeline's two masters one is active,
//! elected on a Lease; it cuts time into windows, plans one compute task per
//! window (per merchant partition when the window is large), schedules each
//! on the slave with the earliest expected finish, and handles failures,
//! departed slaves and hangs with versions that fence stale results. Its task
//! state is persisted so that the standby resumes where it stopped.

pub mod dispatch;
pub mod faults;
pub mod losses;
mod metrics;
mod outcome;
pub mod plan;
mod planning;
pub mod schedule;
mod snapshot;
pub mod sql;
pub mod state;
pub mod tasks;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{Dependency, Mode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource as _;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::dispatch::Slaves;
use self::faults::FaultPolicy;
use self::losses::{Gone, Memory, Polled};
use self::metrics::Metrics;
use self::schedule::{Estimator, SlaveView};
use self::state::{StateError, StateStore};
use self::tasks::{Dispatch, Outcome, Table, TaskKey};
use super::Deps;
use super::startup::{self, StartupError};
use crate::kv::{KvStore, Layout};
use crate::leader::Election;
use crate::routing::stable_hash;
use crate::secret::Secret;
use crate::wire::TaskReport;
use ballast_node::master_report::{MasterReport, MemoryLoss, SqlInUse, SqlRefused, short_error};

/// Settings of a master process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pod name: the identity in the leader Lease.
    pub identity: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub metrics: SocketAddr,
    /// Duration of the leader Lease: how long a dead master blocks the standby.
    pub lease: Duration,
    /// How long after its end a window is computed: late events land first.
    pub grace: Duration,
    /// Window events per task: larger windows are split by merchant partition.
    pub events_per_task: u64,
    /// Least window time between two computations of a period or day to date.
    pub to_date_every: Duration,
    /// Tasks in flight per slave.
    pub in_flight_per_slave: usize,
    /// How long after closing a window's late events still trigger a recomputation.
    pub lateness: Duration,
    /// Fault handling.
    pub faults: FaultPolicy,
    /// Password of the KV Redis.
    pub kv_password: Option<Secret>,
    /// The pipeline's data-plane token, carried by and required of every gRPC call.
    pub token: crate::auth::Token,
}

/// Errors that stop a master.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read or a listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The task state could not be read, or another master wrote it.
    #[error(transparent)]
    State(#[from] StateError),
    /// Leadership was lost: the process exits and comes back as a standby.
    #[error("lost the master lease")]
    LostLeadership,
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

/// A finished attempt, as the dispatching task reports it to the loop.
struct Finished {
    key: TaskKey,
    version: u64,
    slave: String,
    events_hint: u64,
    result: Result<TaskReport, tonic::Status>,
}

/// How often, at most, the slave memory account's counts are saved with the task state.
const LEDGER_SAVE_PERIOD: Duration = Duration::from_secs(1);

/// Runs the master until `shutdown`: waits as a standby until it holds the
/// leader Lease, then acts until it loses it.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline, identity = %config.identity))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let (ap, dp) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let sql = startup::sql(&deps.client, &config.namespace, &ap).await?;
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let (ready_tx, ready) = watch::channel(true);
    let (_, health) = crate::health::serve(config.metrics, Arc::new(registry), ready, shutdown.clone())
        .await
        .map_err(startup::bind_error(config.metrics))?;

    // Unlike the state ConfigMap, the Lease is not owned by the pipeline: its
    // term must keep growing if the pipeline is made again under this name, so
    // that new versions still fence results stored under the old one.
    let election = Election {
        namespace: config.namespace.clone(),
        name: format!("{}-master", config.pipeline),
        identity: config.identity.clone(),
        duration: config.lease,
        labels: [(
            crate::membership::PIPELINE_LABEL.to_owned(),
            config.pipeline.clone(),
        )]
        .into(),
        owner: None,
    };
    tracing::info!(lease = %election.name, "standby: waiting for the master lease");
    let Some(held) = election.acquire(&deps.client, &shutdown).await else {
        let _ = ready_tx.send(false);
        return Ok(());
    };
    let term = held.term;
    let lost = CancellationToken::new();
    let holder = tokio::spawn(election.clone().hold(
        deps.client.clone(),
        held,
        shutdown.clone(),
        lost.clone(),
    ));
    metrics.active.set(1);
    metrics.term.set(term);
    tracing::info!(term, "active: holding the master lease");

    let window_ms = i64::from(ap.spec.compute.window_seconds) * 1000;
    let active = Active {
        owner: ap.owner_ref(&()),
        kv: startup::redis_info(&ap.spec.kv, config.kv_password.as_ref(), "KV store")?,
        layout: Layout::new(&config.pipeline, window_ms),
        window_ms,
        // The granularity of KV-degraded results (an hour unless the policy says otherwise).
        degraded_period_ms: (i64::from(dp.spec.kv.granularity_seconds) * 1000).max(window_ms),
        sql_id: stable_hash(sql.as_bytes()),
        startup_sql: sql.clone(),
        config: &config,
        deps: &deps,
        metrics: metrics.clone(),
    };
    let result = active
        .run(u64::try_from(term).unwrap_or(0), &shutdown, &lost)
        .await;
    metrics.active.set(0);
    let _ = ready_tx.send(false);
    holder.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), health).await;
    match result {
        Ok(()) if lost.is_cancelled() && !shutdown.is_cancelled() => Err(Error::LostLeadership),
        other => other,
    }
}

/// The active master's loop and what it works with.
struct Active<'a> {
    config: &'a Config,
    /// The pipeline, as the owner of the state ConfigMap.
    owner: Option<OwnerReference>,
    deps: &'a Deps,
    metrics: Arc<Metrics>,
    kv: redis::ConnectionInfo,
    layout: Layout,
    window_ms: i64,
    degraded_period_ms: i64,
    sql_id: u64,
    /// The SQL the pipeline named when this master started: the first version
    /// when the state holds none.
    startup_sql: String,
}

impl Active<'_> {
    async fn run(
        &self,
        term: u64,
        shutdown: &CancellationToken,
        lost: &CancellationToken,
    ) -> Result<(), Error> {
        let config = self.config;
        let stop = CancellationToken::new();
        let _stop_guard = stop.clone().drop_guard();
        let mut store = StateStore::new(
            self.deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            self.owner.clone(),
        );
        let mut snapshot = store.load().await?;
        // The previous master's slave memory account: a slave that crashed
        // while leadership changed hands is still a loss reported.
        let mut ledger = snapshot
            .losses
            .take()
            .map(|l| l.resumed(now_ms()))
            .unwrap_or_default();
        let mut saved_ledger = ledger.clone();
        let mut ledger_saved_at = tokio::time::Instant::now();
        let first = plan::first_window(now_ms(), self.window_ms);
        let mut report = snapshot.report.clone();
        let mut versions = std::mem::take(&mut snapshot.sql);
        let mut table = Table::restore(snapshot, term, first, config.faults);
        if versions.is_empty() {
            let text = &self.startup_sql;
            sql::adopt(
                &mut versions,
                &ballast_crds::sql::id(text),
                text,
                table.next_window_ms(),
            );
        }
        tracing::info!(
            next_window = table.next_window_ms(),
            open = table.open(),
            "resuming the persisted task state"
        );
        let mut initial = table.snapshot();
        initial.losses = Some(saved_ledger.clone());
        initial.report = report.clone();
        let (save_tx, save_rx) = watch::channel(initial);
        let mut saver = tokio::spawn(state::persist(store, save_rx, stop.clone()));

        let modes = crate::modes::follow(
            self.deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            stop.clone(),
        );
        let mut members = crate::membership::follow(
            self.deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            "slave",
            stop.clone(),
        );
        let slaves = Slaves::new(config.token.clone());
        let mut loads = dispatch::poll_loads(slaves.clone(), Duration::from_millis(500), stop.clone());
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
        let mut estimator = Estimator::default();
        let mut polled = Polled::default();
        // A slave out of the membership for a Lease duration is gone, not hiccuping.
        let grace_ms = i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX);
        let mut kv: Option<KvStore> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut last_recheck = tokio::time::Instant::now();
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let mut finished = Vec::new();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = lost.cancelled() => break,
                // The saver only stops early on an error: another master wrote the state.
                saved = &mut saver => return Err(match saved {
                    Ok(Err(error)) => error.into(),
                    _ => Error::LostLeadership,
                }),
                Some(f) = done_rx.recv() => finished.push(f),
                _ = tick.tick() => {}
                _ = members.changed() => {}
            }
            while let Ok(f) = done_rx.try_recv() {
                finished.push(f);
            }
            let now = now_ms();
            let live: BTreeMap<String, String> = members.borrow_and_update().clone();
            slaves.update(polled.update(&live, now, grace_ms));
            for f in finished {
                self.finish(&mut table, &mut estimator, f, live.len(), now);
            }

            let kv_mode = modes.borrow().get(Dependency::Kv).0;
            self.plan(&mut table, &mut kv, &slaves, &live, kv_mode, now).await;
            if modes.borrow().get(Dependency::Mysql).0 == Mode::Degraded {
                table.hot_gap_opens();
            } else if kv_mode != Mode::Degraded {
                self.fill_hot_gap(&mut table, &mut kv).await;
            }
            if kv_mode != Mode::Degraded && last_recheck.elapsed() >= Duration::from_secs(1) {
                last_recheck = tokio::time::Instant::now();
                self.recheck(&mut table, &mut kv, now).await;
            }

            let names: BTreeSet<String> = live.keys().cloned().collect();
            for (key, outcome) in table.watchdog(now, &names) {
                tracing::warn!(task = %key.id(), ?outcome, "moving the task to another slave under a new version");
                self.metrics.outcome(&outcome);
            }

            // The ledger learns from each poll round (every 500 ms), not each loop.
            let fresh = loads.has_changed().unwrap_or(false);
            let reported = loads.borrow_and_update().clone();
            if fresh {
                let memory: BTreeMap<String, Memory> =
                    reported.iter().map(|(n, r)| (n.clone(), r.memory)).collect();
                for gone in ledger.observe(&memory, &names, now, grace_ms) {
                    self.report_gone(&gone);
                    report.record_loss(MemoryLoss {
                        slave: gone.slave.clone(),
                        cause: gone.cause.as_str().to_owned(),
                        events: gone.lost,
                        since_ms: gone.since_ms,
                        at_ms: now,
                    });
                }
            }
            let views: BTreeMap<String, SlaveView> = names
                .iter()
                .map(|n| {
                    let view = reported.get(n).map_or(
                        SlaveView {
                            slots: 1,
                            ..SlaveView::default()
                        },
                        |r| r.view.clone(),
                    );
                    (n.clone(), view)
                })
                .collect();
            let limit = views.len() * config.in_flight_per_slave.max(1);
            self.follow_sql(&modes, &mut versions, &mut report, &table).await;
            for d in table.dispatch(now, &views, &estimator, self.sql_id, limit) {
                let sql = sql::for_window(&versions, d.planned.key.start_ms);
                let task = dispatch::task_of(&d, sql);
                self.send(&slaves, d, task, &done_tx);
            }
            sql::prune(&mut versions, table.oldest_needed_ms());
            report.sql = versions
                .iter()
                .map(|v| SqlInUse {
                    id: v.id.clone(),
                    from_ms: v.from_ms,
                })
                .collect();
            self.metrics
                .in_flight
                .set(i64::try_from(table.in_flight()).unwrap_or(i64::MAX));
            self.metrics
                .delayed
                .set(i64::try_from(table.delayed()).unwrap_or(i64::MAX));
            let lag = (now - table.oldest_open_ms() - self.window_ms).max(0) / 1000;
            self.metrics.lag_seconds.set(lag);
            report.set_failing(table.failing());
            report.plan_full = !table.has_room();
            self.metrics
                .windows_failing
                .set(i64::try_from(report.failing_total).unwrap_or(i64::MAX));
            // A change of slave processes is saved at once; counts, which
            // change with every poll, at most every LEDGER_SAVE_PERIOD.
            let due =
                saved_ledger.processes_differ(&ledger) || ledger_saved_at.elapsed() >= LEDGER_SAVE_PERIOD;
            if due && ledger != saved_ledger {
                saved_ledger = ledger.clone();
                ledger_saved_at = tokio::time::Instant::now();
            }
            let mut snapshot = table.snapshot();
            snapshot.losses = Some(saved_ledger.clone());
            snapshot.report = report.clone();
            snapshot.sql.clone_from(&versions);
            save_tx.send_if_modified(|current| {
                let changed = *current != snapshot;
                if changed {
                    *current = snapshot;
                }
                changed
            });
        }
        // A last save, so the standby starts from the freshest state.
        let mut last = table.snapshot();
        last.losses = Some(ledger);
        last.report = report;
        last.sql = versions;
        let _ = save_tx.send(last);
        stop.cancel();
        match saver.await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Ok(()),
        }
    }

    /// Says a slave process is gone, and counts what it still held as lost:
    /// the hour-to-date of the merchants it held misses those events.
    fn report_gone(&self, gone: &Gone) {
        if gone.lost == 0 {
            tracing::info!(slave = %gone.slave, cause = ?gone.cause, "slave gone holding nothing: no events lost");
            return;
        }
        let since = gone
            .since_ms
            .and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok())
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        tracing::error!(
            slave = %gone.slave, events = gone.lost, %since, cause = ?gone.cause,
            "slave memory lost: the events it held while the KV store was down are gone, \
             and the hour-to-date of its merchants misses them"
        );
        self.metrics.slave_events_lost.inc_by(gone.lost);
    }

    fn finish(&self, table: &mut Table, estimator: &mut Estimator, f: Finished, live: usize, now: i64) {
        let result = match &f.result {
            Ok(report) => {
                let refused = u64::from(report.refused_hot + report.refused_cache);
                if refused > 0 {
                    self.metrics.stale_refused.inc_by(refused);
                }
                Ok(())
            }
            Err(status) => Err(dispatch::classify(status)),
        };
        let outcome = table.completed(&f.key, f.version, result, live, now);
        if let Err(status) = &f.result {
            table.note_error(&f.key, status.message());
        }
        match (&f.result, &outcome) {
            (Ok(report), Outcome::Done) => {
                estimator.observe(self.sql_id, report.events, report.duration_ms as f64);
                tracing::debug!(task = %f.key.id(), slave = %f.slave, events = report.events, "task done");
            }
            (Ok(report), Outcome::Stale) => tracing::info!(
                task = %f.key.id(), slave = %f.slave, version = f.version,
                refused = report.refused_hot + report.refused_cache,
                "a superseded attempt finished; its results were fenced"
            ),
            (Err(status), _) => tracing::warn!(
                task = %f.key.id(), slave = %f.slave, version = f.version, code = ?status.code(),
                error = %status.message(), events = f.events_hint, ?outcome, "task failed"
            ),
            _ => {}
        }
        self.metrics.outcome(&outcome);
    }

    /// Adopts the SQL the operator published, from the next window to plan,
    /// once it plans against the source tables; a SQL that does not is
    /// reported (`sqlRefused`) and the one in force keeps computing.
    async fn follow_sql(
        &self,
        modes: &watch::Receiver<crate::modes::Modes>,
        versions: &mut Vec<sql::SqlVersion>,
        report: &mut MasterReport,
        table: &Table,
    ) {
        let (published, schema) = {
            let modes = modes.borrow();
            (modes.sql(), modes.source_schema())
        };
        let Some(published) = published else { return };
        let known = versions.last().is_some_and(|v| v.id == published.id)
            || report.sql_refused.as_ref().is_some_and(|r| r.id == published.id);
        if known {
            return;
        }
        match crate::compute::engine::check_plans(&published.text, schema.as_deref()).await {
            Ok(()) => {
                let from = table.next_window_ms();
                sql::adopt(versions, &published.id, &published.text, from);
                report.sql_refused = None;
                tracing::info!(sql = %published.id, from_window = from, "computing with the published SQL from this window on");
            }
            Err(error) => {
                tracing::warn!(sql = %published.id, %error, "the published SQL does not plan; the SQL in force keeps computing");
                report.sql_refused = Some(SqlRefused {
                    id: published.id.clone(),
                    error: short_error(&error.to_string()),
                });
            }
        }
    }

    fn send(
        &self,
        slaves: &Slaves,
        d: Dispatch,
        task: crate::wire::ComputeTask,
        done: &mpsc::UnboundedSender<Finished>,
    ) {
        let key = d.planned.key.clone();
        let finished = |result| Finished {
            key: key.clone(),
            version: d.version,
            slave: d.slave.clone(),
            events_hint: d.planned.events,
            result,
        };
        self.metrics
            .tasks
            .get_or_create(&[("outcome", "dispatched")])
            .inc();
        let Some(client) = slaves.get(&d.slave) else {
            let _ = done.send(finished(Err(tonic::Status::unavailable(
                "slave left the membership",
            ))));
            return;
        };
        // A hung call is not cancelled: the slave may still finish and write, and
        // the fence decides. It is bounded far beyond the hang detection.
        let timeout = Duration::from_secs(600);
        let done = done.clone();
        let pending = finished(Ok(TaskReport::default()));
        tokio::spawn(async move {
            let result = dispatch::compute(client, task, timeout).await;
            let _ = done.send(Finished { result, ..pending });
        });
    }
}
