//! The intake role: consumes the pipeline's Kafka topic and stores each event in
//! the KV store's window buckets — or, while the operator publishes the KV store
//! as Degraded, hash-distributes it to the live slaves. Offsets are committed
//! only after the write is acknowledged; writes are idempotent on the event id,
//! so a redelivery after a crash duplicates nothing. Messages that are not
//! events go to the dead-letter topic with the reason. It also serves the
//! backup intake (gRPC) that collectors use while Kafka is down, and keeps a
//! membership Lease naming that address. A KV store that lost its data is
//! refilled from Kafka (`refill`).

pub mod admission;
pub mod backup;
pub mod message;
pub mod refill;
pub mod route;
pub mod sink;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_crds::ShedDay;
use k8s_openapi::jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::health::{counter, gauge};
use crate::secret::Secret;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::admission::Admission;
use self::backup::Backup;
use self::sink::{Sink, Stored};
use super::Deps;
use super::startup::{self, StartupError};
use crate::kv::{BUCKET_TTL_SECONDS, KvStore, Layout};
use crate::membership::{self, Member};
use crate::roles::master::state::StateStore;
use crate::wire::ChangeEvent;
use crate::wire::intake_server::IntakeServer;

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
    pub kv_password: Option<Secret>,
    /// Pod name: the membership Lease's name.
    pub identity: String,
    /// Where the backup intake (gRPC) listens (port 0 picks one).
    pub listen: SocketAddr,
    /// Host collectors reach this pod at.
    pub advertise_host: String,
    /// Duration of the membership Lease.
    pub lease: Duration,
    /// The pipeline's data-plane token, carried by and required of every gRPC call.
    pub token: crate::auth::Token,
}

/// Errors that stop an intake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read or a listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// A Kafka client could not be created or subscribed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The KV Redis client could not be created.
    #[error("KV store: {0}")]
    Redis(#[from] redis::RedisError),
    /// A batch write stopped without storing (a panic, or the intake stopping
    /// while the store is down): nothing after it is committed, so Kafka
    /// redelivers from there.
    #[error("a batch write did not finish: {0}")]
    Write(#[from] tokio::task::JoinError),
    /// A batch was not stored before the intake stopped; it is redelivered.
    #[error("a batch was not stored before the intake stopped; it will be redelivered")]
    Unstored,
    /// The backup intake's gRPC server failed.
    #[error("backup intake server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The intake's metrics (`ballast_intake_*`).
struct Metrics {
    to_kv: Counter,
    to_slaves: Counter,
    duplicates: Counter,
    dead_letters: Counter,
    write_failures: Counter,
    kv_refills: Counter,
    refill_gaps: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("intake");
        Self {
            to_kv: counter(r, "events_to_kv", "Events stored in the KV store"),
            to_slaves: counter(
                r,
                "events_to_slaves",
                "Events delivered to slaves while the KV store is down",
            ),
            duplicates: counter(r, "events_duplicate", "Redelivered events already stored"),
            dead_letters: counter(r, "dead_letters", "Messages sent to the dead-letter topic"),
            write_failures: counter(r, "write_failures", "Batch writes that failed and were retried"),
            kv_refills: counter(
                r,
                "kv_refills",
                "Times the KV store was found without its data and refilled from Kafka",
            ),
            refill_gaps: counter(
                r,
                "refill_gaps",
                "Partitions whose refill may miss events Kafka no longer holds (each logged with its window)",
            ),
        }
    }

    fn register_backup(registry: &mut Registry) -> backup::Metrics {
        let r = registry.sub_registry_with_prefix("backup_intake");
        backup::Metrics {
            accepted: counter(r, "events_accepted", "Events stored through the backup intake"),
            shed_events: counter(r, "events_shed", "Events dropped because their merchant is shed"),
            shed_merchants: gauge(r, "shed_merchants", "Merchants shed in the current second"),
            refused: counter(
                r,
                "calls_refused",
                "Calls refused over the budget at the maximum shed share",
            ),
        }
    }
}

/// Publishes the backup intake's shedding on its Lease every second while it
/// changes, so that the operator can report it in the pipeline's status: what
/// it sheds now, and the last day it shed with that day's highest level.
async fn report_shedding(
    client: kube::Client,
    member: Member,
    admission: Arc<Mutex<Admission>>,
    stop: CancellationToken,
) {
    let mut last = None;
    let mut day: Option<ShedDay> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let (merchants, level) = {
            let admission = admission
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (admission.shed_merchants().len() as u64, admission.level())
        };
        if level > 0 {
            let today = ShedDay {
                day: Timestamp::now().strftime("%Y-%m-%d").to_string(),
                max_level: i32::try_from(level).unwrap_or(i32::MAX),
            };
            day = ShedDay::merge(day, Some(today));
        }
        let now = (merchants, level, day.clone());
        if last.as_ref() != Some(&now) {
            match membership::report_shedding(&client, &member, merchants, level, day.as_ref()).await {
                Ok(()) => last = Some(now),
                Err(error) => tracing::warn!(%error, "reporting shedding failed; retrying"),
            }
        }
    }
}

/// The last offset consumed per topic partition.
type Offsets = BTreeMap<(String, i32), i64>;

/// One decoded batch, with the offsets to commit once it is stored.
#[derive(Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    dead: Vec<(Vec<u8>, String)>,
    offsets: Offsets,
}

/// Batches being stored while the next is consumed.
const WRITES_IN_FLIGHT: usize = 3;

/// How long an idle consumer waits before the loop looks at finished writes again.
const IDLE: Duration = Duration::from_millis(100);

/// Stores a batch, retrying until it is acknowledged (its offsets wait for
/// this) or the intake stops, then writes its dead letters the same way: a
/// dead letter is stored data too, and its offset is committed only once
/// Kafka has it. Whether everything was stored.
async fn store(
    sink: Arc<tokio::sync::Mutex<Sink>>,
    producer: FutureProducer,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
    events: Vec<ChangeEvent>,
    dead: Vec<(Vec<u8>, String)>,
    shutdown: CancellationToken,
) -> bool {
    loop {
        match Sink::store_shared(&sink, &events).await {
            Ok(Stored::Kv { new, duplicates }) => {
                metrics.to_kv.inc_by(new);
                metrics.duplicates.inc_by(duplicates);
                break;
            }
            Ok(Stored::Slaves { accepted }) => {
                metrics.to_slaves.inc_by(accepted);
                break;
            }
            Err(error) => {
                metrics.write_failures.inc();
                if shutdown.is_cancelled() {
                    tracing::warn!(%error, "storing a batch failed while stopping; it will be redelivered");
                    return false;
                }
                tracing::warn!(%error, "storing a batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let mut pending = dead.as_slice();
    while let Some(((payload, reason), rest)) = pending.split_first() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "ballast-reason",
            value: Some(reason.as_str()),
        });
        let record = FutureRecord::<(), _>::to(&dead_letter_topic)
            .payload(payload)
            .headers(headers);
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                metrics.dead_letters.inc();
                pending = rest;
            }
            Err((error, _)) => {
                metrics.write_failures.inc();
                if shutdown.is_cancelled() {
                    tracing::error!(%error, "dead-letter write failed while stopping; the message will be redelivered");
                    return false;
                }
                tracing::error!(%error, topic = %dead_letter_topic, "dead-letter write failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    true
}

/// Commits `offsets` once `write` has stored its batch. A batch that was not
/// stored stops the commits: committing a later offset would skip it.
async fn commit(consumer: &StreamConsumer, write: JoinHandle<bool>, offsets: &Offsets) -> Result<(), Error> {
    if !write.await? {
        return Err(Error::Unstored);
    }
    let mut commit = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(error) = commit.add_partition_offset(topic, *partition, Offset::Offset(offset + 1)) {
            tracing::warn!(%error, topic, partition, "cannot commit this offset");
        }
    }
    // Asynchronous: these offsets are of stored events only, so a commit that
    // is lost (Kafka down, a rebalance) means a redelivery the event ids make
    // harmless; waiting for each commit would halve the throughput.
    if let Err(error) = consumer.commit(&commit, CommitMode::Async) {
        tracing::warn!(%error, "committing offsets failed; the stored events may be redelivered");
    }
    Ok(())
}

/// Runs the intake until `shutdown`; the batch in hand is stored and committed before it returns.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let (ap, policy) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let spec = &ap.spec;
    let topic = spec.kafka.topic.clone();
    let dead_letter_topic = spec
        .kafka
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{topic}.dead-letter"));

    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let backup_metrics = Metrics::register_backup(&mut registry);
    let guard = crate::auth::Guard::register(config.token.clone(), &mut registry);
    let (ready_tx, ready) = watch::channel(false);
    let (_, health) = crate::health::serve(
        config.metrics,
        Arc::new(registry),
        ready.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(startup::bind_error(config.metrics))?;

    let kv_info = startup::redis_info(&spec.kv, config.kv_password.as_ref(), "KV store")?;
    let conn = startup::redis_connection(&kv_info).await?;
    let layout = Layout::new(&config.pipeline, i64::from(spec.compute.window_seconds) * 1000);
    let (refills_tx, mut refills) = watch::channel(0_u64);
    tokio::spawn(refill::watch(
        KvStore::new(conn.clone(), layout.clone(), BUCKET_TTL_SECONDS),
        refills_tx,
        shutdown.clone(),
    ));
    let kv = KvStore::new(conn, layout, BUCKET_TTL_SECONDS);
    let mode = crate::modes::follow(
        deps.client.clone(),
        &config.namespace,
        &config.pipeline,
        shutdown.clone(),
    );
    let modes = mode.clone();
    let slaves = membership::follow(
        deps.client.clone(),
        &config.namespace,
        &config.pipeline,
        "slave",
        shutdown.clone(),
    );
    let sink = Arc::new(tokio::sync::Mutex::new(Sink::new(
        kv,
        mode,
        slaves,
        config.token.clone(),
    )));

    // The backup intake, and the membership Lease that tells collectors where it is.
    let (listener, port) = startup::bind(config.listen).await?;
    let mq = &policy.spec.mq;
    let admission = Admission::new(
        u64::try_from(mq.backup_intake_rate_per_second).unwrap_or(1),
        u32::try_from(mq.max_shed_percent).unwrap_or(0),
        Timestamp::now().as_millisecond(),
    );
    let admission = Arc::new(Mutex::new(admission));
    let backup = Backup {
        admission: admission.clone(),
        sink: sink.clone(),
        metrics: backup_metrics,
    };
    let server = tokio::spawn(
        crate::grpc::server()
            .add_service(IntakeServer::with_interceptor(backup, guard))
            .serve_with_incoming_shutdown(
                crate::grpc::incoming(listener),
                shutdown.clone().cancelled_owned(),
            ),
    );
    let member = Member {
        namespace: config.namespace.clone(),
        pipeline: config.pipeline.clone(),
        role: "intake".into(),
        identity: config.identity.clone(),
        address: format!("{}:{port}", config.advertise_host),
        duration: config.lease,
    };
    let leaving = CancellationToken::new();
    tokio::spawn(report_shedding(
        deps.client.clone(),
        member.clone(),
        admission.clone(),
        leaving.clone(),
    ));
    let membership = tokio::spawn(membership::run(
        deps.client.clone(),
        member,
        ready,
        leaving.clone(),
    ));

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
    let consumer = Arc::new(consumer);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &spec.kafka.bootstrap_servers)
        .set("enable.idempotence", "true")
        .create()?;
    let _ = ready_tx.send(true);

    // Batches are stored while the next ones are consumed; offsets are
    // committed in consumption order, each once its own batch is stored.
    let mut writes: VecDeque<(JoinHandle<bool>, Offsets)> = VecDeque::new();
    let mut outcome = Ok(());
    let mut refill_due = false;
    // A failed refill is tried again at most each second, not on every batch.
    let mut refill_at = tokio::time::Instant::now();
    'consume: while !shutdown.is_cancelled() {
        if refills.has_changed().unwrap_or(false) {
            refills.borrow_and_update();
            refill_due = true;
        }
        // A refill re-reads into the KV store: not while the KV store is
        // Degraded, when events go to the slaves, which would count the
        // re-read ones into their hour again. It waits for the store's return.
        let kv_degraded = modes.borrow().get(ballast_crds::Dependency::Kv).0 == ballast_crds::Mode::Degraded;
        if refill_due && !kv_degraded && tokio::time::Instant::now() >= refill_at {
            // Everything in flight is stored and committed first: commits then
            // move on from the refill point, never back past what it re-reads.
            while let Some((write, offsets)) = writes.pop_front() {
                outcome = commit(&consumer, write, &offsets).await;
                if outcome.is_err() {
                    break 'consume;
                }
            }
            let state = StateStore::new(deps.client.clone(), &config.namespace, &config.pipeline, None);
            refill_due = !refilled(refill::refill(&consumer, state).await, &metrics);
            refill_at = tokio::time::Instant::now() + Duration::from_secs(1);
        }
        let batch = collect(&consumer, &config, &ap.spec.source.tables, &shutdown).await;
        if !batch.offsets.is_empty() {
            let write = tokio::spawn(store(
                sink.clone(),
                producer.clone(),
                dead_letter_topic.clone(),
                metrics.clone(),
                batch.events,
                batch.dead,
                shutdown.clone(),
            ));
            writes.push_back((write, batch.offsets));
        }
        while let Some((write, _)) = writes.front() {
            if writes.len() < WRITES_IN_FLIGHT && !write.is_finished() {
                break;
            }
            if let Some((write, offsets)) = writes.pop_front() {
                outcome = commit(&consumer, write, &offsets).await;
                if outcome.is_err() {
                    break 'consume;
                }
            }
        }
    }
    for (write, offsets) in writes {
        if outcome.is_ok() {
            outcome = commit(&consumer, write, &offsets).await;
        } else {
            write.abort();
        }
    }
    // Drain: not ready, leave the membership, let the servers finish.
    let _ = ready_tx.send(false);
    leaving.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), membership).await;
    let served = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), health).await;
    outcome?;
    match served {
        Ok(Ok(result)) => result.map_err(Error::from),
        _ => Ok(()),
    }
}

/// Reports a refill; false when it must be tried again.
fn refilled(
    result: Result<Option<(i64, Vec<refill::Sought>)>, refill::RefillError>,
    metrics: &Metrics,
) -> bool {
    match result {
        Ok(None) => {
            tracing::info!("the KV store has no marker yet and no master state exists: nothing to refill");
            true
        }
        Ok(Some((from_ms, sought))) => {
            metrics.kv_refills.inc();
            let from =
                Timestamp::from_millisecond(from_ms).map_or_else(|_| from_ms.to_string(), |t| t.to_string());
            for s in &sought {
                if s.maybe_lost {
                    metrics.refill_gaps.inc();
                    tracing::error!(
                        partition = s.partition, window = %from,
                        "Kafka no longer holds the oldest messages needed: the windows from this one may miss events of this partition"
                    );
                }
            }
            tracing::warn!(window = %from, partitions = sought.len(), "refilling the KV store from Kafka");
            true
        }
        Err(refill::RefillError::NotAssigned) => false,
        Err(error) => {
            tracing::warn!(%error, "refilling the KV store failed; retrying");
            false
        }
    }
}

/// Reads up to `config.batch` messages, waiting at most `config.linger` after the first.
async fn collect(
    consumer: &StreamConsumer,
    config: &Config,
    tables: &[String],
    shutdown: &CancellationToken,
) -> Batch {
    let mut batch = Batch::default();
    let deadline = tokio::time::sleep(config.linger);
    tokio::pin!(deadline);
    let mut started = false;
    while batch.events.len() + batch.dead.len() < config.batch {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut deadline, if started => break,
            // Nothing consumed yet: leaving now loses nothing, and lets the
            // caller commit writes that finished meanwhile.
            () = tokio::time::sleep(IDLE), if !started => break,
            next = consumer.recv() => next,
        };
        let record = match next {
            Ok(record) => record,
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
        batch
            .offsets
            .insert((record.topic().to_owned(), record.partition()), record.offset());
        let payload = record.payload().unwrap_or_default();
        match message::accept(payload, tables) {
            Ok(event) => batch.events.push(event),
            Err(reason) => batch.dead.push((payload.to_vec(), reason)),
        }
    }
    batch
}
