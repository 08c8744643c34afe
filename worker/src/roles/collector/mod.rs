//! The collector role: tails the business database's row binlog, turns each
//! row change of the pipeline's tables into a change event keyed by merchant,
//! and produces it to Kafka. The binlog position is checkpointed only after
//! Kafka (or the backup intake) acknowledged everything before it, so a
//! restart resumes there: nothing is lost, and re-read rows carry the same
//! event ids, which the intake drops as duplicates.
//!
//! When Kafka cannot take a batch after the policy's retries — or the operator
//! publishes the MQ as Degraded — the collector sends synchronously to the
//! backup intake instead ("async to sync"), and goes back to Kafka once the MQ
//! mode is Normal again and Kafka accepts the batch.

pub mod checkpoint;
pub mod rows;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{Dependency, Mode};
use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::health::counter;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::checkpoint::{Checkpoints, Position};
use self::rows::RowPosition;
use super::Deps;
use super::startup::{self, StartupError};
use crate::modes::Modes;
use crate::wire::intake_client::IntakeClient;
use crate::wire::{ChangeEvent, EventBatch, Operation};

/// Settings of a collector process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pod name, for the binlog replica's server id.
    pub identity: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub metrics: SocketAddr,
    /// Password of the source database user, if it has one.
    pub source_password: Option<String>,
}

/// Errors that stop a collector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read or a listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The source database failed: connection, schema or binlog stream.
    #[error("source database: {0}")]
    Source(#[from] mysql_async::Error),
    /// The source database's binlog is not readable as rows.
    #[error("source binlog: {0}")]
    Binlog(#[from] std::io::Error),
    /// The Kafka producer could not be created.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The checkpoint could not be read.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] kube::Error),
}

/// The collector's metrics (`ballast_collector_*`).
struct Metrics {
    to_kafka: Counter,
    to_backup: Counter,
    shed: Counter,
    dead_letters: Counter,
    switches: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("collector");
        Self {
            to_kafka: counter(r, "events_to_kafka", "Change events acknowledged by Kafka"),
            to_backup: counter(
                r,
                "events_to_backup_intake",
                "Change events acknowledged by the backup intake",
            ),
            shed: counter(
                r,
                "events_shed",
                "Change events the backup intake shed (whole merchants)",
            ),
            dead_letters: counter(r, "dead_letters", "Rows that could not become events"),
            switches: counter(r, "path_switches", "Switches between Kafka and the backup intake"),
        }
    }
}

/// Where batches go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Kafka,
    Backup,
}

/// Sends acknowledged batches to Kafka or the backup intake.
struct Sender {
    path: Path,
    producer: FutureProducer,
    topic: String,
    dead_letter_topic: String,
    retries: u32,
    modes: watch::Receiver<Modes>,
    intakes: watch::Receiver<BTreeMap<String, String>>,
    clients: HashMap<String, IntakeClient<tonic::transport::Channel>>,
    metrics: Arc<Metrics>,
    last_kafka_check: tokio::time::Instant,
    /// Most events per backup intake call: a tenth of its rate budget, so
    /// that a call always fits a second's budget and a large group is paced
    /// over several seconds instead of refused whole, again and again.
    backup_chunk: usize,
}

/// How often a collector on the backup intake checks whether Kafka answers again.
const KAFKA_RECHECK: Duration = Duration::from_secs(3);

impl Sender {
    /// Delivers `events` (and dead letters); returns once all are acknowledged.
    async fn send(
        &mut self,
        events: &[ChangeEvent],
        dead: &[(String, String)],
        shutdown: &CancellationToken,
    ) -> bool {
        // Events of the group acknowledged so far: a retry resumes after them.
        let mut sent = 0;
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            self.follow_mode().await;
            let rest = &events[sent..];
            let result = match self.path {
                Path::Kafka => self.produce(rest).await.map_err(|error| (0, error)),
                Path::Backup => self.ingest(rest).await,
            };
            match result {
                Ok(()) => {
                    self.dead_letters(dead).await;
                    return true;
                }
                Err((acknowledged, error)) if self.path == Path::Kafka => {
                    sent += acknowledged;
                    failures += 1;
                    tracing::warn!(%error, failures, "producing to Kafka failed");
                    if failures > self.retries {
                        self.switch(Path::Backup, "Kafka refused the batch after the policy's retries");
                    }
                }
                Err((acknowledged, error)) => {
                    sent += acknowledged;
                    tracing::warn!(%error, "backup intake refused the batch; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        false
    }

    /// Switches path as the published MQ mode says: to the backup intake when
    /// it is Degraded; back to Kafka once it is Normal and Kafka answers again
    /// (checked at most every few seconds, so a local trip does not bounce on
    /// every batch). Checked before every attempt, so a collector waiting on a
    /// refusing backup intake still goes back to Kafka when it returns.
    async fn follow_mode(&mut self) {
        let mq = self.modes.borrow().get(Dependency::Mq).0;
        match (self.path, mq) {
            (Path::Kafka, Mode::Degraded) => {
                self.switch(Path::Backup, "the operator published the MQ as Degraded")
            }
            (Path::Backup, Mode::Normal) if self.last_kafka_check.elapsed() >= KAFKA_RECHECK => {
                self.last_kafka_check = tokio::time::Instant::now();
                if self.kafka_answers().await {
                    self.switch(Path::Kafka, "the MQ is Normal and Kafka answers again");
                }
            }
            _ => {}
        }
    }

    /// Whether a Kafka broker answers a metadata request for the topic.
    async fn kafka_answers(&self) -> bool {
        use rdkafka::producer::Producer;
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        // librdkafka's metadata call blocks; keep it off the async threads.
        let check = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(1))
                .is_ok()
        });
        check.await.unwrap_or(false)
    }

    fn switch(&mut self, to: Path, why: &str) {
        tracing::warn!(from = ?self.path, to = ?to, reason = why, "collector switches path");
        self.metrics.switches.inc();
        self.path = to;
    }

    async fn produce(&self, events: &[ChangeEvent]) -> Result<(), String> {
        // Everything is queued first and awaited after: librdkafka batches what
        // is queued together, and the group is acknowledged as a whole.
        let mut deliveries = Vec::with_capacity(events.len());
        for event in events {
            let payload = event.encode_to_vec();
            let record = FutureRecord::to(&self.topic)
                .key(&event.merchant_id)
                .payload(&payload);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(error, _)| error.to_string())?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(error.to_string()),
                Err(_) => return Err("the producer dropped a delivery report".into()),
            }
        }
        self.metrics.to_kafka.inc_by(events.len() as u64);
        Ok(())
    }

    /// Sends `events` to the backup intake in calls of at most `backup_chunk`
    /// events, in order. On a refusal, how many were acknowledged before it.
    async fn ingest(&mut self, events: &[ChangeEvent]) -> Result<(), (usize, String)> {
        let mut acknowledged = 0;
        for chunk in events.chunks(self.backup_chunk) {
            self.ingest_call(chunk)
                .await
                .map_err(|error| (acknowledged, error))?;
            acknowledged += chunk.len();
        }
        Ok(())
    }

    async fn ingest_call(&mut self, events: &[ChangeEvent]) -> Result<(), String> {
        let intakes = self.intakes.borrow().clone();
        let (_, address) = intakes
            .iter()
            .next()
            .ok_or("no backup intake in the membership")?;
        if !self.clients.contains_key(address) {
            let client = IntakeClient::connect(format!("http://{address}"))
                .await
                .map_err(|e| e.to_string())?;
            self.clients.insert(address.clone(), client);
        }
        let client = self.clients.get_mut(address).ok_or("client vanished")?;
        match client
            .ingest(EventBatch {
                events: events.to_vec(),
                epoch: 0,
            })
            .await
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                self.metrics
                    .to_backup
                    .inc_by(u64::from(reply.accepted) + u64::from(reply.duplicates));
                self.metrics.shed.inc_by(u64::from(reply.shed));
                Ok(())
            }
            Err(status) => {
                if status.code() != tonic::Code::ResourceExhausted {
                    self.clients.remove(address);
                }
                Err(status.to_string())
            }
        }
    }

    /// Dead letters go to Kafka when it is reachable; otherwise they are counted and logged.
    async fn dead_letters(&self, dead: &[(String, String)]) {
        for (row, reason) in dead {
            self.metrics.dead_letters.inc();
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "ballast-reason",
                value: Some(reason.as_str()),
            });
            let record = FutureRecord::<(), _>::to(&self.dead_letter_topic)
                .payload(row)
                .headers(headers);
            if let Err((error, _)) = self.producer.send(record, Duration::from_secs(0)).await {
                tracing::error!(%error, %reason, row, "dead letter could not be written");
            }
        }
    }
}

/// Most events per backup intake call for a budget of `rate` events/s. Pure.
fn backup_chunk(rate: i32) -> usize {
    usize::try_from(rate / 10).unwrap_or(1).clamp(1, 1000)
}

/// How often the acknowledged position is saved.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

async fn save(checkpoints: &Checkpoints, position: Option<Position>) {
    let Some(position) = position else { return };
    if let Err(error) = checkpoints.save(&position).await {
        tracing::warn!(%error, "saving the checkpoint failed; a restart re-reads a little more");
    }
}

/// One source transaction of the binlog: its events, its rows that could not
/// become events, and the binlog position just after it.
struct Txn {
    events: Vec<ChangeEvent>,
    dead: Vec<(String, String)>,
    end: Position,
}

/// Most events delivered as one group. Transactions that queued up while a
/// group was being acknowledged are sent together, so one-row transactions
/// cost one round trip per group, not one each.
const GROUP_EVENTS: usize = 10_000;

/// Transactions read ahead of the delivered ones: the binlog is parsed while
/// the previous group waits for its acknowledgement.
const READ_AHEAD: usize = 64;

/// How long a stopping collector keeps delivering what it had read.
const DRAIN: Duration = Duration::from_secs(10);

/// Delivers transactions in binlog order, in groups, and checkpoints the
/// position after the last one acknowledged. Returns at shutdown or when the
/// reader is gone; what was not acknowledged is re-read after a restart.
async fn deliver(
    mut sender: Sender,
    mut txns: mpsc::Receiver<Txn>,
    checkpoints: Checkpoints,
    shutdown: CancellationToken,
) {
    let mut acked: Option<Position> = None;
    let mut last_save = tokio::time::Instant::now();
    while let Some(mut group) = txns.recv().await {
        while group.events.len() < GROUP_EVENTS {
            let Ok(next) = txns.try_recv() else { break };
            group.events.extend(next.events);
            group.dead.extend(next.dead);
            group.end = next.end;
        }
        let nothing = group.events.is_empty() && group.dead.is_empty();
        if !nothing && !sender.send(&group.events, &group.dead, &shutdown).await {
            break; // shutting down: the group is re-read from the checkpoint
        }
        acked = Some(group.end);
        // At most a couple of saves a second: a restart re-reads the rest,
        // and the event ids make that harmless.
        if last_save.elapsed() >= CHECKPOINT_EVERY {
            save(&checkpoints, acked.take()).await;
            last_save = tokio::time::Instant::now();
        }
    }
    save(&checkpoints, acked).await;
}

/// Column names of the tracked tables, in ordinal order.
async fn columns(
    conn: &mut Conn,
    database: &str,
    tables: &[String],
) -> Result<HashMap<String, Vec<String>>, Error> {
    let rows: Vec<(String, String)> = conn
        .exec(
            "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION",
            (database,),
        )
        .await?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (table, column) in rows.into_iter().filter(|(t, _)| tables.contains(t)) {
        out.entry(table).or_default().push(column);
    }
    Ok(out)
}

/// Runs the collector until `shutdown`.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let (ap, policy) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let source = &ap.spec.source;

    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(Metrics::register(&mut registry));
    let (ready_tx, ready) = watch::channel(false);
    let (_, health) = crate::health::serve(config.metrics, Arc::new(registry), ready, shutdown.clone())
        .await
        .map_err(startup::bind_error(config.metrics))?;

    let url = startup::mysql_url(&source.mysql, config.source_password.as_deref());
    let opts = Opts::from_url(&url).map_err(mysql_async::Error::from)?;
    let mut conn = Conn::new(opts.clone()).await?;
    let schema = columns(&mut conn, &source.mysql.database, &source.tables).await?;

    let checkpoints = Checkpoints::new(deps.client.clone(), &config.namespace, &config.pipeline);
    let start = match checkpoints.load().await.map_err(Error::Checkpoint)? {
        Some(position) => position,
        None => {
            let row: Option<mysql_async::Row> = conn.query_first("SHOW MASTER STATUS").await?;
            let row = row.ok_or_else(|| {
                std::io::Error::other("binlog is off on the source database (SHOW MASTER STATUS is empty)")
            })?;
            Position {
                file: row.get(0).unwrap_or_default(),
                pos: row.get(1).unwrap_or(4),
            }
        }
    };
    // Saved at once: a collector that crashes before its first periodic save
    // must resume here, not at the end of a binlog that has moved on.
    checkpoints.save(&start).await.map_err(Error::Checkpoint)?;
    tracing::info!(file = %start.file, pos = start.pos, "tailing the binlog");
    conn.disconnect().await?;

    let topic = ap.spec.kafka.topic.clone();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &ap.spec.kafka.bootstrap_servers)
        .set("enable.idempotence", "true")
        // A dead Kafka fails a batch within seconds, so the switch to the backup intake is quick.
        .set("message.timeout.ms", "3000")
        // A transaction's events are queued at once and awaited together: waiting
        // longer for more only delays the acknowledgement the next one waits on.
        .set("linger.ms", "1")
        .create()?;
    let sender = Sender {
        path: Path::Kafka,
        producer,
        dead_letter_topic: ap
            .spec
            .kafka
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dead-letter")),
        topic,
        retries: u32::try_from(policy.spec.mq.produce_retries).unwrap_or(0),
        modes: crate::modes::follow(
            deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            shutdown.clone(),
        ),
        intakes: crate::membership::follow(
            deps.client.clone(),
            &config.namespace,
            &config.pipeline,
            "intake",
            shutdown.clone(),
        ),
        clients: HashMap::new(),
        metrics: metrics.clone(),
        last_kafka_check: tokio::time::Instant::now(),
        backup_chunk: backup_chunk(policy.spec.mq.backup_intake_rate_per_second),
    };

    let server_id = 100_000
        + u32::try_from(crate::routing::stable_hash(config.identity.as_bytes()) % 1_000_000).unwrap_or(0);
    let request = BinlogStreamRequest::new(server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.pos);
    let mut stream = Conn::new(opts).await?.get_binlog_stream(request).await?;
    let (txns, queued) = mpsc::channel(READ_AHEAD);
    // Its own token: at shutdown what was read is still delivered, until the drain deadline.
    let delivering = CancellationToken::new();
    let mut delivery = tokio::spawn(deliver(sender, queued, checkpoints, delivering.clone()));
    let _ = ready_tx.send(true);

    let read = read(&mut stream, source, &schema, start.file.clone(), &txns, &shutdown).await;
    // Whatever stopped the reading, what was read is delivered or left for
    // the checkpoint before returning.
    drop(txns);
    if tokio::time::timeout(DRAIN, &mut delivery).await.is_err() {
        delivering.cancel();
        let _ = delivery.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), health).await;
    read
}

/// Reads the binlog from `stream` until `shutdown`, the end of the stream or an
/// error, queueing each transaction of the tracked tables on `txns`.
async fn read(
    stream: &mut mysql_async::BinlogStream,
    source: &ballast_crds::analytics_pipeline::SourceSpec,
    schema: &HashMap<String, Vec<String>>,
    mut file: String,
    txns: &mpsc::Sender<Txn>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut pending: Vec<ChangeEvent> = Vec::new();
    let mut dead: Vec<(String, String)> = Vec::new();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = stream.next() => next,
        };
        let Some(event) = next else { break };
        let event = event?;
        let header = event.header();
        match event.read_data()? {
            Some(EventData::RotateEvent(rotate)) => file = rows::binlog_file_name(&rotate.name()),
            Some(EventData::RowsEvent(rows)) => {
                let Some(tme) = stream.get_tme(rows.table_id()) else {
                    continue;
                };
                let table = tme.table_name().into_owned();
                if tme.database_name() != source.mysql.database || !source.tables.contains(&table) {
                    continue;
                }
                let op = match rows {
                    RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => {
                        Operation::Insert
                    }
                    RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => {
                        Operation::Delete
                    }
                    _ => Operation::Update,
                };
                let names = schema.get(&table).map(Vec::as_slice).unwrap_or_default();
                let time_ms = i64::from(header.timestamp()) * 1000;
                for (index, row) in rows.rows(tme).enumerate() {
                    let (before, after) = row?;
                    let image = if op == Operation::Delete { before } else { after };
                    let values: Vec<mysql_async::Value> = image
                        .map(|r| {
                            r.unwrap()
                                .into_iter()
                                .map(|v| mysql_async::Value::try_from(v).unwrap_or(mysql_async::Value::NULL))
                                .collect()
                        })
                        .unwrap_or_default();
                    let at = RowPosition {
                        file: &file,
                        pos: u64::from(header.log_pos()),
                        index,
                    };
                    match rows::event(&table, names, &values, &source.merchant_column, op, time_ms, &at) {
                        Ok(event) => pending.push(event),
                        Err(error) => dead.push((
                            format!("{table} at {}:{}:{index}", at.file, at.pos),
                            error.to_string(),
                        )),
                    }
                }
            }
            Some(EventData::XidEvent(_)) => {
                let txn = Txn {
                    events: std::mem::take(&mut pending),
                    dead: std::mem::take(&mut dead),
                    end: Position {
                        file: file.clone(),
                        pos: u64::from(header.log_pos()),
                    },
                };
                if txns.send(txn).await.is_err() {
                    break; // delivery stopped (shutdown)
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_call_is_a_tenth_of_the_budget_within_bounds() {
        for (rate, chunk) in [
            (300, 30),
            (5, 1),
            (0, 1),
            (-3, 1),
            (100_000, 1000),
            (10_000, 1000),
        ] {
            assert_eq!(backup_chunk(rate), chunk, "rate {rate}");
        }
    }
}
