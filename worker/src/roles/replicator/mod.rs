//! The replicator role (seed 004): keeps every member Elasticsearch cluster
//! that takes no writes itself (the standby data centres' and the marketing
//! cluster) in step with the member change stream, through one consumer
//! group per cluster, so that each cluster's applied offset is its group's
//! committed offset: a cluster that was away replays exactly what it missed.
//! It follows the active cluster too, applying only what was written
//! elsewhere before it became active: after a failback, the records still
//! in flight to it.
//! It publishes how far behind each is (`ballast_replicator_lag_events`,
//! `ballast_replicator_lag_seconds`), what a promotion would lose, and follows
//! the MemberStore: when the active data centre changes, so do the clusters
//! it keeps.

pub mod lag;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::member_store::{Replicated as Target, replica_group};
use ballast_crds::refs::KafkaRef;
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Deps;
use super::startup::{self, StartupError};
use crate::members::consume;
use crate::members::replica;
use crate::members::search::MemberIndex;
use crate::members::stream::{ChangeStream, StreamError};
use crate::secret::Secret;

/// How often each cluster's lag is measured.
const MEASURE_EVERY: Duration = Duration::from_secs(1);

/// Settings of a replicator process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the MemberStore.
    pub namespace: String,
    /// The MemberStore's name.
    pub store: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics: SocketAddr,
    /// Deadline of each call to a cluster or to Kafka.
    pub deadline: Duration,
    /// How long draining may take on shutdown.
    pub drain: Duration,
    /// User and password of the Elasticsearch clusters, if security is on.
    pub es_credentials: Option<(String, Secret)>,
}

/// Errors that stop a replicator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MemberStore could not be read or the metrics listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The change stream's topic could not be prepared.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A Kafka consumer could not be made.
    #[error("member change stream consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Labels of a per-cluster series.
type ByTarget = Vec<(String, String)>;

/// What the replicator counts (`ballast_replicator_*`), by kept cluster.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Records applied.
    pub applied: Family<ByTarget, Counter>,
    /// Attempts the cluster refused or did not answer in time (each is retried).
    pub apply_failures: Family<ByTarget, Counter>,
    /// Records in the stream not yet applied.
    pub lag_events: Family<ByTarget, Gauge>,
    /// An upper bound on the age of the oldest record not yet applied.
    pub lag_seconds: Family<ByTarget, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Metrics {
    /// Registers the metrics under `ballast_replicator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("replicator");
        r.register(
            "applied",
            "Change records applied, by kept cluster",
            m.applied.clone(),
        );
        r.register(
            "apply_failures",
            "Attempts a kept cluster refused or did not answer in time (each retried)",
            m.apply_failures.clone(),
        );
        r.register(
            "lag_events",
            "Change records not yet applied, by kept cluster",
            m.lag_events.clone(),
        );
        r.register(
            "lag_seconds",
            "Upper bound on the age of the oldest change record not yet applied, by kept cluster",
            m.lag_seconds.clone(),
        );
        m
    }

    fn forget(&self, target: &str) {
        let labels = by(target);
        self.lag_events.remove(&labels);
        self.lag_seconds.remove(&labels);
    }
}

fn by(target: &str) -> ByTarget {
    vec![("target".to_owned(), target.to_owned())]
}

/// The clusters being kept, each by its own task.
struct Keeping {
    targets: Vec<Target>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Keeping {
    /// Stops every task, waiting for each to commit what it applied within `drain`.
    async fn stop(self, drain: Duration, metrics: &Metrics) {
        self.stop.cancel();
        for task in self.tasks {
            if tokio::time::timeout(drain, task).await.is_err() {
                tracing::warn!("a replica did not stop within the drain");
            }
        }
        for target in &self.targets {
            metrics.forget(&target.name);
        }
    }
}

/// What every task of one replicator shares.
struct Shared {
    config: Config,
    kafka: KafkaRef,
    metrics: Metrics,
}

/// Starts one task per cluster of `targets`.
async fn keep(shared: &Arc<Shared>, targets: Vec<Target>) -> Result<Keeping, Error> {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for target in &targets {
        let config = &shared.config;
        let es = crate::connect::elasticsearch(&target.url, config.es_credentials.clone())
            .map_err(StartupError::ColdOptions)?;
        let index = MemberIndex::new(es, &config.namespace, &config.store, config.deadline);
        let group = replica_group(&config.namespace, &config.store, &target.name);
        let consumer = Arc::new(consume::consumer(&shared.kafka, &group)?);
        tracing::info!(target = %target.name, index = index.index(), %group, "keeping a replica");
        tasks.push(tokio::spawn(replicate(
            Arc::clone(shared),
            target.clone(),
            index,
            consumer,
            stop.clone(),
        )));
    }
    Ok(Keeping { targets, stop, tasks })
}

/// Applies the stream to one cluster and measures its lag, until `stop`.
async fn replicate(
    shared: Arc<Shared>,
    cluster: Target,
    index: MemberIndex,
    consumer: Arc<rdkafka::consumer::StreamConsumer>,
    stop: CancellationToken,
) {
    let target = cluster.name.clone();
    // A kept cluster may be down (that is why it is kept): its template is
    // installed once it answers, before anything is applied to it.
    while let Err(error) = index.install().await {
        tracing::warn!(%target, %error, "a kept cluster does not take its template yet; retrying");
        shared.metrics.apply_failures.get_or_create(&by(&target)).inc();
        if consume::pause(&stop, Duration::from_secs(1)).await {
            return;
        }
    }
    let labels = by(&target);
    let last_applied_ms = Arc::new(AtomicI64::new(i64::MIN));
    let measure = tokio::spawn(measure(
        Arc::clone(&shared),
        labels.clone(),
        Arc::clone(&consumer),
        Arc::clone(&last_applied_ms),
        stop.clone(),
    ));
    let applied = shared.metrics.applied.get_or_create(&labels).clone();
    let failures = shared.metrics.apply_failures.get_or_create(&labels).clone();
    replica::apply(
        &consumer,
        &index,
        cluster.written_since,
        shared.config.deadline,
        &stop,
        |done| {
            applied.inc();
            if let Some(ms) = done.produced_ms {
                last_applied_ms.fetch_max(ms, Ordering::Relaxed);
            }
        },
        || {
            failures.inc();
        },
    )
    .await;
    let _ = measure.await;
}

/// Publishes one cluster's lag every [`MEASURE_EVERY`] until `stop`.
async fn measure(
    shared: Arc<Shared>,
    labels: ByTarget,
    consumer: Arc<rdkafka::consumer::StreamConsumer>,
    last_applied_ms: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    let now_ms = || k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let mut caught_up_ms = now_ms();
    let mut ticker = tokio::time::interval(MEASURE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let (end, committed) = consume::offsets(&consumer, &shared.kafka.topic, shared.config.deadline).await;
        let last = Some(last_applied_ms.load(Ordering::Relaxed)).filter(|ms| *ms != i64::MIN);
        let now = now_ms();
        match lag::of(end, committed, last, caught_up_ms, now) {
            Some(lag) => {
                if lag.events == 0 {
                    caught_up_ms = now;
                }
                shared.metrics.lag_events.get_or_create(&labels).set(lag.events);
                shared.metrics.lag_seconds.get_or_create(&labels).set(lag.seconds);
            }
            None => tracing::debug!("Kafka did not say where the stream or the group is; lag not measured"),
        }
    }
}

/// Runs the replicator until `shutdown`, then lets every replica commit
/// what it applied within the drain time.
#[tracing::instrument(skip_all, fields(store = %config.store))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let api: Api<MemberStore> = Api::namespaced(deps.client.clone(), &config.namespace);
    let store = startup::member_store(&deps.client, &config.namespace, &config.store).await?;
    let kafka = store.spec.change_stream.clone();
    ChangeStream::ensure_topic(&kafka, config.deadline * 5).await?;
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Metrics::register(&mut registry);
    let (ready_tx, ready) = watch::channel(false);
    let stopped = CancellationToken::new();
    let _stopped_guard = stopped.clone().drop_guard();
    let (bound, health) = crate::health::serve(config.metrics, Arc::new(registry), ready, stopped.clone())
        .await
        .map_err(startup::bind_error(config.metrics))?;
    tracing::info!(metrics = %bound, "replicator serving its metrics");
    let drain = config.drain;
    let shared = Arc::new(Shared {
        config,
        kafka,
        metrics,
    });

    let mut keeping = Some(keep(&shared, store.replicated_clusters()).await?);
    let _ = ready_tx.send(true);
    let selector = watcher::Config::default().fields(&format!("metadata.name={}", shared.config.store));
    let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = updates.try_next() => match next {
                Ok(Some(store)) => {
                    let want = store.replicated_clusters();
                    let kept = keeping.as_ref().map(|k| k.targets.clone()).unwrap_or_default();
                    if want != kept {
                        let names = |t: &[Target]| t.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
                        tracing::warn!(from = ?names(&kept), to = ?names(&want), "the kept clusters changed");
                        if let Some(old) = keeping.take() {
                            old.stop(drain, &shared.metrics).await;
                        }
                        match keep(&shared, want).await {
                            Ok(k) => keeping = Some(k),
                            Err(error) => break Err(error),
                        }
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => tracing::warn!(%error, "watching the MemberStore failed; keeping the same clusters"),
            }
        }
    };
    let _ = ready_tx.send(false);
    if let Some(keeping) = keeping {
        keeping.stop(drain, &shared.metrics).await;
    }
    stopped.cancel();
    drop(health);
    outcome
}
