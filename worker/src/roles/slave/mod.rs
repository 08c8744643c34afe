//! The slave role: joins the pipeline's membership with its Lease; runs the
//! compute tasks the master sends (`Compute`, see `compute`) and reports its
//! load (`Load`); and, while the KV store is down, receives the events the
//! intake routes to it (`Deliver`), holds them in memory for the policy's
//! retention under a hard memory bound, and reports what it holds (`Holdings`);
//! when the membership gives some of its merchants to another slave, it hands
//! their events over (`handoff`).

pub mod compute;
pub mod handoff;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ballast_crds::{Dependency, SlaveSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::health::{counter, gauge};
use crate::secret::Secret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use self::compute::{Computer, Stores};
use self::store::{Store, StoreError};
use super::Deps;
use super::startup::{self, StartupError};
use crate::compute::engine::Sql;
use crate::compute::runtime::Engine;
use crate::kv::Layout;
use crate::membership::{self, Member};
use crate::modes::Modes;
use crate::results::hot::HotStore;
use crate::wire::slave_server::{Slave, SlaveServer};
use crate::wire::{
    ComputeTask, DeliverReply, EventBatch, HoldingsReply, HoldingsRequest, LoadRequest, SlaveLoad,
    TaskReport, WindowHolding,
};

/// Settings of a slave process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pod name: the Lease's name.
    pub identity: String,
    /// Where the gRPC server listens (port 0 picks one).
    pub listen: SocketAddr,
    /// Host peers reach this pod at (the pod IP).
    pub advertise_host: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub metrics: SocketAddr,
    /// Duration of the membership Lease.
    pub lease: Duration,
    /// How long draining may take on shutdown.
    pub drain: Duration,
    /// Compute tasks run at once.
    pub slots: u32,
    /// Bytes the SQL's operators may hold between them (`None`: unbounded).
    pub compute_memory: Option<usize>,
    /// Password of the KV Redis.
    pub kv_password: Option<Secret>,
    /// Password of the cache Redis.
    pub cache_password: Option<Secret>,
    /// Password of the hot MySQL user.
    pub hot_password: Option<Secret>,
    /// The pipeline's data-plane token, carried by and required of every gRPC call.
    pub token: crate::auth::Token,
}

/// Errors that stop a slave.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read or a listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The pipeline's SQL does not parse.
    #[error(transparent)]
    Sql(#[from] crate::compute::ComputeError),
    /// The compute runtime's threads could not be started.
    #[error("starting the compute runtime: {0}")]
    ComputeRuntime(std::io::Error),
}

/// The slave's metrics (`ballast_slave_*`).
struct Metrics {
    accepted: Counter,
    duplicates: Counter,
    expired: Counter,
    refused: Counter,
    fenced: Counter,
    held_bytes: Gauge,
    handoff: handoff::Metrics,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("slave");
        Self {
            accepted: counter(r, "events_accepted", "Routed events stored in memory"),
            duplicates: counter(r, "events_duplicate", "Routed events dropped as already held"),
            expired: counter(
                r,
                "events_expired",
                "Events dropped for being older than the retention",
            ),
            refused: counter(r, "batches_refused", "Batches refused at the memory bound"),
            fenced: counter(
                r,
                "batches_fenced",
                "Batches refused for being routed over another slave set than the published one",
            ),
            held_bytes: gauge(r, "held_bytes", "Estimated bytes of events held in memory"),
            handoff: handoff::Metrics {
                handed_off: counter(
                    r,
                    "events_handed_off",
                    "Events handed to the slave that now owns their merchant, then dropped here",
                ),
                failures: counter(
                    r,
                    "handoff_failures",
                    "Hand-off deliveries that failed (the events stay and are offered again)",
                ),
            },
        }
    }

    /// Drops what is past the retention at `now_ms`, counting it and the bytes left.
    fn expire(&self, store: &mut Store, now_ms: i64) {
        self.expired.inc_by(store.expire(now_ms));
        self.held(store);
    }

    /// The bytes `store` holds now.
    fn held(&self, store: &Store) {
        self.held_bytes
            .set(i64::try_from(store.bytes()).unwrap_or(i64::MAX));
    }
}

struct Service {
    store: Arc<Mutex<Store>>,
    metrics: Arc<Metrics>,
    computer: Arc<Computer>,
    /// This process among the slave's restarts (`SlaveLoad.incarnation`).
    incarnation: u64,
    /// Set once the slave is leaving: it takes no more events.
    leaving: Arc<AtomicBool>,
    /// This slave's identity, as the published slave set names it.
    identity: String,
    /// The published modes and slave set deliveries are checked against.
    modes: watch::Receiver<Modes>,
}

/// A value telling this process from the slave's earlier ones: its start
/// time in nanoseconds, mixed with the process id.
fn incarnation() -> u64 {
    let nanos = k8s_openapi::jiff::Timestamp::now().as_nanosecond();
    crate::routing::stable_hash(format!("{nanos}/{}", std::process::id()).as_bytes())
}

pub(crate) fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // The store is plain data, consistent between statements: a panic elsewhere leaves it usable.
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

#[tonic::async_trait]
impl Slave for Service {
    async fn deliver(&self, request: Request<EventBatch>) -> Result<Response<DeliverReply>, Status> {
        if self.leaving.load(Ordering::Relaxed) {
            // The sender keeps the events and routes them over its next view of the ring.
            return Err(Status::unavailable(
                "slave is leaving the membership: it hands its events to the others and takes no more",
            ));
        }
        let batch = request.into_inner();
        // Only what was routed over the set this slave follows: a sender with
        // an older or newer view re-routes once the views agree.
        let fence = {
            let modes = self.modes.borrow();
            let (_, epoch) = modes.get(Dependency::Kv);
            SlaveSet::admits(
                modes.slave_set(),
                epoch,
                &self.identity,
                batch.epoch,
                batch.generation,
            )
        };
        if let Err(fenced) = fence {
            self.metrics.fenced.inc();
            return Err(Status::failed_precondition(fenced.to_string()));
        }
        let mut store = lock(&self.store);
        match store.insert(batch.events, now_ms()) {
            Ok(stored) => {
                self.metrics.accepted.inc_by(u64::from(stored.accepted));
                self.metrics.duplicates.inc_by(u64::from(stored.duplicates));
                self.metrics.expired.inc_by(u64::from(stored.expired));
                self.metrics.held(&store);
                Ok(Response::new(DeliverReply {
                    accepted: stored.accepted,
                    duplicates: stored.duplicates,
                    expired: stored.expired,
                }))
            }
            Err(error @ StoreError::Full { .. }) => {
                self.metrics.refused.inc();
                Err(Status::resource_exhausted(format!(
                    "slave memory bound reached: {error}"
                )))
            }
        }
    }

    async fn holdings(&self, _: Request<HoldingsRequest>) -> Result<Response<HoldingsReply>, Status> {
        let store = lock(&self.store);
        let windows = store
            .holdings()
            .into_iter()
            .map(|h| WindowHolding {
                window_start_ms: h.window_start_ms,
                events: h.events,
                merchants: h.merchants,
            })
            .collect();
        Ok(Response::new(HoldingsReply {
            windows,
            bytes: store.bytes(),
            max_bytes: store.max_bytes(),
        }))
    }

    async fn compute(&self, request: Request<ComputeTask>) -> Result<Response<TaskReport>, Status> {
        // Detached: once started, a task finishes and writes even if the master
        // stops waiting; the version fence decides whether its results count.
        let task = tokio::spawn(self.computer.clone().run(request.into_inner()));
        match task.await {
            Ok(result) => result.map(Response::new),
            Err(error) => Err(Status::internal(format!("compute task aborted: {error}"))),
        }
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<SlaveLoad>, Status> {
        let mut load = self.computer.load();
        let mut store = lock(&self.store);
        // What is past the retention is not held any more (the master counts
        // held events as lost if this slave goes), timer or not.
        self.metrics.expire(&mut store, now_ms());
        load.incarnation = self.incarnation;
        load.held_bytes = store.bytes();
        load.held_events = store.events();
        load.oldest_window_ms = store.oldest_window_ms();
        Ok(Response::new(load))
    }
}

/// The memory store sized by the pipeline (window) and its policy (retention, memory bound).
fn sizing(ap: &ballast_crds::AnalyticsPipeline, dp: &ballast_crds::DegradationPolicy) -> Store {
    let kv = &dp.spec.kv;
    Store::new(
        i64::from(ap.spec.compute.window_seconds) * 1000,
        i64::from(kv.retention_seconds) * 1000,
        u64::try_from(kv.max_memory_mib).unwrap_or(0) * 1024 * 1024,
    )
}

/// Runs the slave until `shutdown`, then drains: leaves the ring, hands what
/// it holds to the other slaves, stops serving, leaves the membership.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline, identity = %config.identity))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let (ap, dp) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let sql = Sql::parse(&startup::sql(&deps.client, &config.namespace, &ap).await?)?;
    let store = Arc::new(Mutex::new(sizing(&ap, &dp)));
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let compute_metrics = Arc::new(compute::Metrics::register(&mut registry));
    let guard = crate::auth::Guard::register(config.token.clone(), &mut registry);
    let hot_opts = crate::connect::mysql(&ap.spec.hot_store, config.hot_password.as_ref());
    let stores = Stores {
        kv: startup::redis_info(&ap.spec.kv, config.kv_password.as_ref(), "KV store")?,
        layout: Layout::new(&config.pipeline, i64::from(ap.spec.compute.window_seconds) * 1000),
        hot: HotStore::new(
            mysql_async::Pool::new(hot_opts),
            &ap.spec.hot_store.database,
            2,
            4,
        ),
        cache: startup::redis_info(&ap.spec.cache, config.cache_password.as_ref(), "cache")?,
    };
    // Its own stop: the drain after `shutdown` still needs the published slave
    // set (a hand-off stamped with a stale generation is refused) and the
    // membership view.
    let stopped = CancellationToken::new();
    let _stopped_guard = stopped.clone().drop_guard();
    let modes = crate::modes::follow(
        deps.client.clone(),
        &config.namespace,
        &config.pipeline,
        stopped.clone(),
    );
    let service_modes = modes.clone();
    if config.compute_memory.is_none() {
        tracing::warn!(
            "no compute memory budget (no pod memory limit): a heavy window can exhaust the pod's memory"
        );
    }
    let engine = Engine::new(crate::compute::frame::parallelism(), sql, config.compute_memory)
        .map_err(Error::ComputeRuntime)?;
    let computer = Arc::new(Computer::new(
        config.pipeline.clone(),
        engine,
        stores,
        store.clone(),
        modes.clone(),
        config.slots,
        compute_metrics,
    ));
    let (ready_tx, ready) = watch::channel(false);

    let (metrics_addr, health) = crate::health::serve(
        config.metrics,
        Arc::new(registry),
        ready.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(startup::bind_error(config.metrics))?;
    let (listener, port) = startup::bind(config.listen).await?;

    let member = Member {
        namespace: config.namespace.clone(),
        pipeline: config.pipeline.clone(),
        role: "slave".into(),
        identity: config.identity.clone(),
        address: format!("{}:{port}", config.advertise_host),
        duration: config.lease,
    };
    tracing::info!(address = %member.address, metrics = %metrics_addr, "slave serving");
    let leaving = CancellationToken::new();
    let membership = tokio::spawn(membership::run(
        deps.client.clone(),
        member,
        ready,
        leaving.clone(),
    ));

    let mut handoff = handoff::Handoff::new(
        config.identity.clone(),
        store.clone(),
        membership::follow(
            deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            "slave",
            stopped.clone(),
        ),
        modes,
        metrics.handoff.clone(),
        config.token.clone(),
    );
    let rounds = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            handoff.run(shutdown).await;
            handoff
        })
    };

    let expiry = {
        let (store, metrics, shutdown) = (store.clone(), metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            while tokio::select! { () = shutdown.cancelled() => false, _ = ticker.tick() => true } {
                metrics.expire(&mut lock(&store), now_ms());
            }
        })
    };

    let leaving_flag = Arc::new(AtomicBool::new(false));
    let service = Service {
        store,
        metrics,
        computer,
        incarnation: incarnation(),
        leaving: leaving_flag.clone(),
        identity: config.identity.clone(),
        modes: service_modes,
    };
    let incoming = crate::grpc::incoming(listener);
    // Ready once the server accepts connections.
    let _ = ready_tx.send(true);
    let serving = CancellationToken::new();
    let served = crate::grpc::server()
        .add_service(SlaveServer::with_interceptor(service, guard))
        .serve_with_incoming_shutdown(incoming, {
            let serving = serving.clone();
            async move { serving.cancelled().await }
        });
    tokio::pin!(served);
    let failed = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut served => Some(result),
    };

    // Leave the ring and refuse new deliveries, so that the intakes route
    // elsewhere; then hand everything held to the other slaves while still
    // serving the master's Load polls, which account for what is left.
    let _ = ready_tx.send(false);
    leaving_flag.store(true, Ordering::Relaxed);
    let result = match failed {
        Some(result) => result,
        None => {
            let drain = async {
                if let Ok(mut handoff) = rounds.await {
                    handoff.drain(config.drain / 2).await;
                }
                serving.cancel();
            };
            tokio::join!(drain, &mut served).1
        }
    };
    leaving.cancel();
    let _ = tokio::time::timeout(config.drain, membership).await;
    expiry.abort();
    let _ = tokio::time::timeout(config.drain, health).await;
    result.map_err(Error::from)
}
