//! The intake role: consumes the pipeline's Kafka topic and stores each event in
//! the KV store's window buckets — or, while the operator publishes the KV store
//! as Degraded, hash-distributes it to the live slaves. Offsets are committed
//! only after the write is acknowledged; writes are idempotent on the event id,
//! so a redelivery after a crash duplicates nothing. Messages that are not
//! events go to the dead-letter topic with the reason.

pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{AnalyticsPipeline, Mode};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::route::{Route, Slaves};
use crate::kv::{KvStore, Layout};
use crate::membership::{ready_members, selector};
use crate::wire::slave_client::SlaveClient;
use crate::wire::{ChangeEvent, EventBatch};

/// Settings of an intake process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub metrics: SocketAddr,
    /// Most events written per batch.
    pub batch: usize,
    /// Longest wait to fill a batch.
    pub linger: Duration,
    /// Password of the KV Redis, if it has one.
    pub kv_password: Option<String>,
}

/// What an intake talks to.
#[derive(Clone)]
pub struct Deps {
    /// The Kubernetes API: pipeline, its mode, the slaves' membership.
    pub client: kube::Client,
}

/// Errors that stop an intake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read.
    #[error("reading AnalyticsPipeline {name}: {source}")]
    Pipeline {
        /// Its name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A Kafka client could not be created or subscribed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The KV Redis client could not be created.
    #[error("KV store: {0}")]
    Redis(#[from] redis::RedisError),
    /// The health endpoint could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The intake's metrics (`ballast_intake_*`).
struct Metrics {
    to_kv: Counter,
    to_slaves: Counter,
    duplicates: Counter,
    dead_letters: Counter,
    write_failures: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            to_kv: Counter::default(),
            to_slaves: Counter::default(),
            duplicates: Counter::default(),
            dead_letters: Counter::default(),
            write_failures: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("intake");
        r.register("events_to_kv", "Events stored in the KV store", m.to_kv.clone());
        r.register(
            "events_to_slaves",
            "Events delivered to slaves while the KV store is down",
            m.to_slaves.clone(),
        );
        r.register(
            "events_duplicate",
            "Redelivered events already stored",
            m.duplicates.clone(),
        );
        r.register(
            "dead_letters",
            "Messages sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        r.register(
            "write_failures",
            "Batch writes that failed and were retried",
            m.write_failures.clone(),
        );
        m
    }
}

/// The published KV mode of the pipeline, followed with a watch (not a
/// mounted ConfigMap): an unreachable API server keeps the last known mode.
fn follow_mode(
    client: kube::Client,
    config: &Config,
    shutdown: CancellationToken,
) -> watch::Receiver<(Mode, i64)> {
    let (tx, rx) = watch::channel((Mode::Normal, 0));
    let api: Api<AnalyticsPipeline> = Api::namespaced(client, &config.namespace);
    let selector = watcher::Config::default().fields(&format!("metadata.name={}", config.pipeline));
    tokio::spawn(async move {
        let mut updates = watcher(api, selector).default_backoff().applied_objects().boxed();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.try_next() => match next {
                    Ok(Some(ap)) => {
                        let kv = ap.status.and_then(|s| s.dependencies.kv);
                        tx.send_replace(kv.map_or((Mode::Normal, 0), |kv| (kv.mode, kv.epoch)));
                    }
                    Ok(None) => return,
                    Err(error) => tracing::warn!(%error, "watching the pipeline's mode failed; keeping the last one"),
                }
            }
        }
    });
    rx
}

/// The ready slaves, refreshed every second from their Leases.
fn follow_slaves(
    client: kube::Client,
    config: &Config,
    shutdown: CancellationToken,
) -> watch::Receiver<Slaves> {
    let (tx, rx) = watch::channel(Slaves::new());
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let selector = ListParams::default().labels(&selector(&config.pipeline, "slave"));
    tokio::spawn(async move {
        loop {
            match api.list(&selector).await {
                Ok(list) => {
                    let members = ready_members(&list.items, Timestamp::now());
                    tx.send_if_modified(|current| std::mem::replace(current, members.clone()) != members);
                }
                Err(error) => {
                    tracing::warn!(%error, "listing slave leases failed; keeping the last membership")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    rx
}

/// One decoded batch, with the offsets to commit once it is stored.
#[derive(Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    dead: Vec<(Vec<u8>, String)>,
    offsets: BTreeMap<(String, i32), i64>,
}

/// Runs the intake until `shutdown`; the batch in hand is stored and committed before it returns.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let aps: Api<AnalyticsPipeline> = Api::namespaced(deps.client.clone(), &config.namespace);
    let ap = aps
        .get(&config.pipeline)
        .await
        .map_err(|source| Error::Pipeline {
            name: config.pipeline.clone(),
            source,
        })?;
    let spec = &ap.spec;
    let topic = spec.kafka.topic.clone();
    let dead_letter_topic = spec
        .kafka
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{topic}.dead-letter"));

    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let (ready_tx, ready) = watch::channel(false);
    let (_, health) = crate::health::serve(config.metrics, Arc::new(registry), ready, shutdown.clone())
        .await
        .map_err(|source| Error::Bind {
            addr: config.metrics,
            source,
        })?;

    let auth = config
        .kv_password
        .as_deref()
        .map(|p| format!(":{p}@"))
        .unwrap_or_default();
    let kv_url = format!("redis://{auth}{}/{}", spec.kv.address, spec.kv.database);
    let conn = redis::Client::open(kv_url.as_str())?
        .get_connection_manager()
        .await?;
    // Buckets outlive a day of windows: the compute side reads them after the window closes.
    let mut kv = KvStore::new(
        conn,
        Layout::new(&config.pipeline, i64::from(spec.compute.window_seconds) * 1000),
        2 * 86_400,
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &spec.kafka.bootstrap_servers)
        .set("group.id", format!("ballast-intake-{}", config.pipeline))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A crashed intake's partitions move to the others within 10 s, not Kafka's default 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &spec.kafka.bootstrap_servers)
        .set("enable.idempotence", "true")
        .create()?;

    let mode = follow_mode(deps.client.clone(), &config, shutdown.clone());
    let slaves = follow_slaves(deps.client.clone(), &config, shutdown.clone());
    let mut clients: HashMap<String, SlaveClient<tonic::transport::Channel>> = HashMap::new();
    let _ = ready_tx.send(true);

    while !shutdown.is_cancelled() {
        let batch = collect(&consumer, &config, &shutdown).await;
        if batch.offsets.is_empty() {
            continue;
        }
        // Store, retrying until it is acknowledged: the offsets wait for it.
        loop {
            let (kv_mode, epoch) = *mode.borrow();
            let current = route::route(kv_mode, epoch, &slaves.borrow());
            let stored = match &current {
                Route::Kv => kv
                    .write(&batch.events)
                    .await
                    .map(|w| {
                        metrics.to_kv.inc_by(w.new);
                        metrics.duplicates.inc_by(w.duplicates);
                    })
                    .map_err(|e| e.to_string()),
                Route::Slaves {
                    ring,
                    addresses,
                    epoch,
                } => deliver(&batch.events, ring, addresses, *epoch, &mut clients)
                    .await
                    .map(|n| {
                        metrics.to_slaves.inc_by(n);
                    }),
            };
            match stored {
                Ok(()) => break,
                Err(error) => {
                    metrics.write_failures.inc();
                    tracing::warn!(%error, route = ?std::mem::discriminant(&current), "storing a batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for (payload, reason) in &batch.dead {
            let headers = OwnedHeaders::new().insert(Header {
                key: "ballast-reason",
                value: Some(reason.as_str()),
            });
            let record = FutureRecord::<(), _>::to(&dead_letter_topic)
                .payload(payload)
                .headers(headers);
            if let Err((error, _)) = producer.send(record, Duration::from_secs(30)).await {
                tracing::error!(%error, "dead-letter write failed; the message will be redelivered");
                continue;
            }
            metrics.dead_letters.inc();
        }
        let mut commit = TopicPartitionList::new();
        for ((t, partition), offset) in &batch.offsets {
            commit.add_partition_offset(t, *partition, Offset::Offset(offset + 1))?;
        }
        consumer.commit(&commit, CommitMode::Sync)?;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), health).await;
    Ok(())
}

/// Reads up to `config.batch` messages, waiting at most `config.linger` after the first.
async fn collect(consumer: &StreamConsumer, config: &Config, shutdown: &CancellationToken) -> Batch {
    let mut batch = Batch::default();
    let deadline = tokio::time::sleep(config.linger);
    tokio::pin!(deadline);
    let mut started = false;
    while batch.events.len() + batch.dead.len() < config.batch {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut deadline, if started => break,
            next = consumer.recv() => next,
        };
        let message = match next {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "consuming failed");
                break;
            }
        };
        if !started {
            started = true;
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + config.linger);
        }
        batch.offsets.insert(
            (message.topic().to_owned(), message.partition()),
            message.offset(),
        );
        let payload = message.payload().unwrap_or_default();
        match ChangeEvent::decode(payload) {
            Ok(event) if !event.event_id.is_empty() && !event.merchant_id.is_empty() => {
                batch.events.push(event)
            }
            Ok(_) => batch
                .dead
                .push((payload.to_vec(), "event without event_id or merchant_id".into())),
            Err(error) => batch
                .dead
                .push((payload.to_vec(), format!("not a ChangeEvent: {error}"))),
        }
    }
    batch
}

/// Sends each event to the slave owning its merchant; returns how many were accepted.
async fn deliver(
    events: &[ChangeEvent],
    ring: &crate::routing::Ring,
    addresses: &Slaves,
    epoch: i64,
    clients: &mut HashMap<String, SlaveClient<tonic::transport::Channel>>,
) -> Result<u64, String> {
    let mut by_slave: BTreeMap<&str, Vec<ChangeEvent>> = BTreeMap::new();
    for event in events {
        let owner = ring
            .owner(&event.merchant_id)
            .ok_or("no live slave to route to")?;
        by_slave.entry(owner).or_default().push(event.clone());
    }
    let mut accepted = 0;
    for (slave, events) in by_slave {
        let address = addresses
            .get(slave)
            .ok_or_else(|| format!("no address for slave {slave}"))?;
        if !clients.contains_key(address) {
            let client = SlaveClient::connect(format!("http://{address}"))
                .await
                .map_err(|e| format!("{slave}: {e}"))?;
            clients.insert(address.clone(), client);
        }
        let client = clients.get_mut(address).ok_or("client vanished")?;
        match client.deliver(EventBatch { events, epoch }).await {
            Ok(reply) => accepted += u64::from(reply.into_inner().accepted),
            Err(status) => {
                // A slave that went away is dropped; the retry re-routes over the new membership.
                clients.remove(address);
                return Err(format!("{slave}: {status}"));
            }
        }
    }
    Ok(accepted)
}
