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
mod delivery;
pub mod rows;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::health::counter;
use crate::secret::Secret;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::checkpoint::{Checkpoints, Position};
use self::delivery::{Path, Sender, Txn, backup_chunk, deliver};
use self::rows::{DeadLetter, RowPosition};
use super::Deps;
use super::startup::{self, StartupError};
use crate::wire::{ChangeEvent, Operation};

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
    pub source_password: Option<Secret>,
    /// Bytes of a transaction's events held before they are delivered ahead
    /// of its commit ([`PART_BYTES`] unless set).
    pub part_bytes: usize,
    /// The pipeline's data-plane token, carried by and required of every gRPC call.
    pub token: crate::auth::Token,
}

/// The most bytes of one transaction's events the collector holds: a larger
/// transaction is delivered in parts of this size as it is read.
pub const PART_BYTES: usize = 1 << 20;

/// Memory an event takes beyond its JSON and id (fields, allocation).
const EVENT_OVERHEAD: usize = 96;

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
    dead_letters_pending: prometheus_client::metrics::gauge::Gauge,
    parts: Counter,
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
            dead_letters: counter(
                r,
                "dead_letters",
                "Rows that could not become events, written to the dead-letter topic",
            ),
            dead_letters_pending: crate::health::gauge(
                r,
                "dead_letters_pending",
                "Dead letters not yet written (Kafka down or refusing): the checkpoint waits before them",
            ),
            parts: counter(
                r,
                "transaction_parts",
                "Parts of transactions too large to hold whole, delivered before their commit was read",
            ),
            switches: counter(r, "path_switches", "Switches between Kafka and the backup intake"),
        }
    }
}

/// Transactions read ahead of the delivered ones: the binlog is parsed while
/// the previous group waits for its acknowledgement.
const READ_AHEAD: usize = 64;

/// How long a stopping collector keeps delivering what it had read.
const DRAIN: Duration = Duration::from_secs(10);

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

/// The tracked tables' column names as last read from the source database,
/// and how to read them again.
struct Schema<'a> {
    columns: &'a mut HashMap<String, Vec<String>>,
    opts: &'a Opts,
}

/// How long re-reading the source schema may take.
const SCHEMA_DEADLINE: Duration = Duration::from_secs(10);

impl Schema<'_> {
    /// The column names of a rows event of `table` with `count` columns:
    /// from the binlog's own table metadata when the server writes it
    /// (`binlog_row_metadata=FULL`), else from the schema read, read again
    /// when the count no longer matches (the table was altered). Names that
    /// still do not match are empty: the rows become dead letters, never
    /// values shifted into the wrong columns.
    async fn names(
        &mut self,
        database: &str,
        tables: &[String],
        table: &str,
        tme: &mysql_async::binlog::events::TableMapEvent<'_>,
        count: usize,
    ) -> Result<Vec<String>, Error> {
        let from_binlog = rows::binlog_names(tme);
        match rows::names(from_binlog, self.columns.get(table).map(Vec::as_slice), count) {
            rows::Names::Binlog(names) => return Ok(names),
            rows::Names::Read(names) => return Ok(names.to_vec()),
            rows::Names::Reread => {}
        }
        tracing::info!(
            table,
            count,
            "the table's columns changed: reading the source schema again"
        );
        let reread = async {
            let mut conn = Conn::new(self.opts.clone()).await?;
            let read = columns(&mut conn, database, tables).await;
            let _ = conn.disconnect().await;
            read
        };
        *self.columns = tokio::time::timeout(SCHEMA_DEADLINE, reread)
            .await
            .map_err(|_| std::io::Error::other("re-reading the source schema passed its deadline"))??;
        Ok(
            match rows::names(None, self.columns.get(table).map(Vec::as_slice), count) {
                rows::Names::Read(names) => names.to_vec(),
                _ => Vec::new(),
            },
        )
    }
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

    let opts = crate::connect::mysql(&source.mysql, config.source_password.as_ref());
    let mut conn = Conn::new(opts.clone()).await?;
    let mut schema = columns(&mut conn, &source.mysql.database, &source.tables).await?;

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
        token: config.token.clone(),
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

    // Unique per pod across the cluster: two replicas with one server id
    // would disconnect each other from the source.
    let replica = format!("{}/{}", config.namespace, config.identity);
    let server_id =
        100_000 + u32::try_from(crate::routing::stable_hash(replica.as_bytes()) % 1_000_000).unwrap_or(0);
    let request = BinlogStreamRequest::new(server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.pos);
    let mut stream = Conn::new(opts.clone()).await?.get_binlog_stream(request).await?;
    let (txns, queued) = mpsc::channel(READ_AHEAD);
    // Its own token: at shutdown what was read is still delivered, until the drain deadline.
    let delivering = CancellationToken::new();
    let mut delivery = tokio::spawn(deliver(
        sender,
        queued,
        checkpoints,
        start.clone(),
        delivering.clone(),
    ));
    let _ = ready_tx.send(true);

    let part_bytes = config.part_bytes.max(1);
    let read = read(
        &mut stream,
        source,
        Schema {
            columns: &mut schema,
            opts: &opts,
        },
        start.file.clone(),
        &txns,
        (part_bytes, &metrics.parts),
        &shutdown,
    )
    .await;
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
    mut schema: Schema<'_>,
    mut file: String,
    txns: &mpsc::Sender<Txn>,
    (part_bytes, parts): (usize, &Counter),
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut pending: Vec<ChangeEvent> = Vec::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut pending_bytes = 0_usize;
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
                let count = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                let names = schema
                    .names(&source.mysql.database, &source.tables, &table, tme, count)
                    .await?;
                let names = names.as_slice();
                let time_ms = i64::from(header.timestamp()) * 1000;
                for (index, row) in rows.rows(tme).enumerate() {
                    let (before, after) = row?;
                    let raw = if op == Operation::Delete { before } else { after };
                    let image = raw.map(|r| rows::image(r.unwrap())).unwrap_or_default();
                    let at = RowPosition {
                        file: &file,
                        pos: u64::from(header.log_pos()),
                        index,
                    };
                    let event = match rows::conversion_error(&table, names, &image) {
                        Some(error) => Err(error),
                        None => rows::event(
                            &table,
                            names,
                            &image.values,
                            &source.merchant_column,
                            op,
                            time_ms,
                            &at,
                        ),
                    };
                    match event {
                        Ok(event) => {
                            pending_bytes += event.columns.len() + event.event_id.len() + EVENT_OVERHEAD;
                            pending.push(event);
                        }
                        Err(error) => {
                            let letter = DeadLetter::of(&table, names, &image, op, &at, &error);
                            pending_bytes += letter.bytes();
                            dead.push(letter);
                        }
                    }
                }
                // A transaction too large to hold whole (a bulk UPDATE) is
                // streamed in parts; the checkpoint moves only at its commit.
                if pending_bytes >= part_bytes {
                    let part = Txn {
                        events: std::mem::take(&mut pending),
                        dead: std::mem::take(&mut dead),
                        end: None,
                    };
                    pending_bytes = 0;
                    parts.inc();
                    if txns.send(part).await.is_err() {
                        break; // delivery stopped (shutdown)
                    }
                }
            }
            Some(EventData::XidEvent(_)) => {
                let txn = Txn {
                    events: std::mem::take(&mut pending),
                    dead: std::mem::take(&mut dead),
                    end: Some(Position {
                        file: file.clone(),
                        pos: u64::from(header.log_pos()),
                    }),
                };
                pending_bytes = 0;
                if txns.send(txn).await.is_err() {
                    break; // delivery stopped (shutdown)
                }
            }
            _ => {}
        }
    }
    Ok(())
}
