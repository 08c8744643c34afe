//! The slave role, storage side: joins the pipeline's membership with its Lease,
//! receives the events the intake routes to it while the KV store is down
//! (gRPC `Deliver`), holds them in memory for the policy's retention under a
//! hard memory bound, and reports what it holds (`Holdings`) for the master.

pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::health::{counter, gauge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use self::store::{Store, StoreError};
use super::Deps;
use super::startup::{self, StartupError};
use crate::membership::{self, Member};
use crate::wire::slave_server::{Slave, SlaveServer};
use crate::wire::{DeliverReply, EventBatch, HoldingsReply, HoldingsRequest, WindowHolding};

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
}

/// The slave's metrics (`ballast_slave_*`).
struct Metrics {
    accepted: Counter,
    duplicates: Counter,
    expired: Counter,
    refused: Counter,
    held_bytes: Gauge,
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
            held_bytes: gauge(r, "held_bytes", "Estimated bytes of events held in memory"),
        }
    }
}

struct Service {
    store: Arc<Mutex<Store>>,
    metrics: Arc<Metrics>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // The store is plain data, consistent between statements: a panic elsewhere leaves it usable.
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

#[tonic::async_trait]
impl Slave for Service {
    async fn deliver(&self, request: Request<EventBatch>) -> Result<Response<DeliverReply>, Status> {
        let batch = request.into_inner();
        let mut store = lock(&self.store);
        match store.insert(batch.events, now_ms()) {
            Ok(stored) => {
                self.metrics.accepted.inc_by(u64::from(stored.accepted));
                self.metrics.duplicates.inc_by(u64::from(stored.duplicates));
                self.metrics.expired.inc_by(u64::from(stored.expired));
                self.metrics
                    .held_bytes
                    .set(i64::try_from(store.bytes()).unwrap_or(i64::MAX));
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
}

/// Reads the window size, retention and memory bound from the pipeline and its policy.
async fn sizing(client: &kube::Client, config: &Config) -> Result<Store, Error> {
    let (ap, dp) = startup::pipeline(client, &config.namespace, &config.pipeline).await?;
    let kv = &dp.spec.kv;
    Ok(Store::new(
        i64::from(ap.spec.compute.window_seconds) * 1000,
        i64::from(kv.retention_seconds) * 1000,
        u64::try_from(kv.max_memory_mib).unwrap_or(0) * 1024 * 1024,
    ))
}

/// Runs the slave until `shutdown`, then drains: stops taking events, leaves the membership.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline, identity = %config.identity))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let store = Arc::new(Mutex::new(sizing(&deps.client, &config).await?));
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
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

    let expiry = {
        let (store, metrics, shutdown) = (store.clone(), metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            while tokio::select! { () = shutdown.cancelled() => false, _ = ticker.tick() => true } {
                let mut store = lock(&store);
                metrics.expired.inc_by(store.expire(now_ms()));
                metrics
                    .held_bytes
                    .set(i64::try_from(store.bytes()).unwrap_or(i64::MAX));
            }
        })
    };

    let service = Service { store, metrics };
    let incoming = crate::grpc::incoming(listener);
    // Ready once the server accepts connections.
    let _ = ready_tx.send(true);
    let served = tonic::transport::Server::builder()
        .add_service(SlaveServer::new(service))
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        });
    let result = served.await;

    // Drain: not ready, leave the membership so the intake re-hashes at once.
    let _ = ready_tx.send(false);
    leaving.cancel();
    let _ = tokio::time::timeout(config.drain, membership).await;
    expiry.abort();
    let _ = tokio::time::timeout(config.drain, health).await;
    result.map_err(Error::from)
}
