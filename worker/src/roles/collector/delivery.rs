//! Delivery of what the collector read: transactions grouped and sent, in
//! binlog order, to Kafka or — while the MQ is down — synchronously to the
//! backup intake, with the position after each acknowledged group checkpointed.
//!
//! Dead letters go to Kafka's dead-letter topic only. While Kafka cannot take
//! them the events flow on, but the checkpoint stays before the oldest dead
//! letter not yet written: a crash re-reads it from the binlog, so a dead
//! letter survives an outage without a store of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{Dependency, Mode};
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Metrics;
use super::checkpoint::{Checkpoints, Position};
use super::rows::DeadLetter;
use crate::modes::Modes;
use crate::wire::intake_client::IntakeClient;
use crate::wire::{ChangeEvent, EventBatch};

/// Where batches go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Kafka,
    Backup,
}

/// Sends acknowledged batches to Kafka or the backup intake.
pub(super) struct Sender {
    pub(super) path: Path,
    pub(super) producer: FutureProducer,
    pub(super) topic: String,
    pub(super) dead_letter_topic: String,
    pub(super) retries: u32,
    pub(super) modes: watch::Receiver<Modes>,
    pub(super) intakes: watch::Receiver<BTreeMap<String, String>>,
    /// The data-plane token every backup ingest carries.
    pub(super) token: crate::auth::Token,
    pub(super) clients: HashMap<String, IntakeClient<crate::auth::Authed>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) last_kafka_check: tokio::time::Instant,
    /// Most events per backup intake call: a tenth of its rate budget, so
    /// that a call always fits a second's budget and a large group is paced
    /// over several seconds instead of refused whole, again and again.
    pub(super) backup_chunk: usize,
}

/// A failed delivery: events of the group acknowledged before it, why, and
/// the wait the backup intake asked for.
type Refused = (usize, String, Option<Duration>);

/// Wait before retrying the backup intake when it named none.
const BACKUP_RETRY: Duration = Duration::from_millis(200);
/// Bounds on the wait a refusal asks for.
const MIN_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// How often a collector on the backup intake checks whether Kafka answers again.
const KAFKA_RECHECK: Duration = Duration::from_secs(3);

/// What the collector just learned about its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// Before an attempt: the published MQ mode, and whether Kafka answered
    /// a check, if one was made.
    Mode { mq: Mode, kafka_answers: Option<bool> },
    /// Kafka refused a batch for the `failures`-th time in a row; the policy allows `retries`.
    KafkaFailed { failures: u32, retries: u32 },
}

/// The path to take after seeing `seen` on `path`, and why, when it changes.
/// To the backup intake when the operator publishes the MQ as Degraded, or
/// at once when Kafka refused a batch more often than the policy's retries
/// (a collector does not wait for the operator to see what it sees); back to
/// Kafka only once the MQ is Normal *and* Kafka answered this collector.
/// Pure.
pub(super) fn switch(path: Path, seen: Seen) -> Option<(Path, &'static str)> {
    match (path, seen) {
        (
            Path::Kafka,
            Seen::Mode {
                mq: Mode::Degraded, ..
            },
        ) => Some((Path::Backup, "the operator published the MQ as Degraded")),
        (Path::Kafka, Seen::KafkaFailed { failures, retries }) if failures > retries => {
            Some((Path::Backup, "Kafka refused the batch after the policy's retries"))
        }
        (
            Path::Backup,
            Seen::Mode {
                mq: Mode::Normal,
                kafka_answers: Some(true),
            },
        ) => Some((Path::Kafka, "the MQ is Normal and Kafka answers again")),
        _ => None,
    }
}

impl Sender {
    /// Delivers `events`; returns once all are acknowledged.
    async fn send(&mut self, events: &[ChangeEvent], shutdown: &CancellationToken) -> bool {
        // Events of the group acknowledged so far: a retry resumes after them.
        let mut sent = 0;
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            self.follow_mode().await;
            let rest = &events[sent..];
            let result = match self.path {
                Path::Kafka => self.produce(rest).await.map_err(|error| (0, error, None)),
                Path::Backup => self.ingest(rest).await,
            };
            match result {
                Ok(()) => return true,
                Err((acknowledged, error, _)) if self.path == Path::Kafka => {
                    sent += acknowledged;
                    failures += 1;
                    tracing::warn!(%error, failures, "producing to Kafka failed");
                    let retries = self.retries;
                    self.apply(switch(self.path, Seen::KafkaFailed { failures, retries }));
                }
                Err((acknowledged, error, retry_after)) => {
                    sent += acknowledged;
                    tracing::warn!(%error, "backup intake refused the batch; retrying");
                    let wait = retry_after.unwrap_or(BACKUP_RETRY).clamp(MIN_RETRY, MAX_RETRY);
                    tokio::time::sleep(wait).await;
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
        let check = self.path == Path::Backup
            && mq == Mode::Normal
            && self.last_kafka_check.elapsed() >= KAFKA_RECHECK;
        let kafka_answers = if check {
            self.last_kafka_check = tokio::time::Instant::now();
            Some(self.kafka_answers().await)
        } else {
            None
        };
        self.apply(switch(self.path, Seen::Mode { mq, kafka_answers }));
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

    fn apply(&mut self, switch: Option<(Path, &str)>) {
        let Some((to, why)) = switch else { return };
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
    /// events, in order. On a refusal: how many were acknowledged before it,
    /// why, and how long the intake asked to wait.
    async fn ingest(&mut self, events: &[ChangeEvent]) -> Result<(), Refused> {
        let mut acknowledged = 0;
        for chunk in events.chunks(self.backup_chunk) {
            self.ingest_call(chunk)
                .await
                .map_err(|(error, retry_after)| (acknowledged, error, retry_after))?;
            acknowledged += chunk.len();
        }
        Ok(())
    }

    async fn ingest_call(&mut self, events: &[ChangeEvent]) -> Result<(), (String, Option<Duration>)> {
        let intakes = self.intakes.borrow().clone();
        let (_, address) = intakes
            .iter()
            .next()
            .ok_or(("no backup intake in the membership".to_owned(), None))?;
        if !self.clients.contains_key(address) {
            let channel = crate::auth::channel(address, crate::grpc::STORE_DEADLINE, &self.token)
                .map_err(|e| (e.to_string(), None))?;
            let client = IntakeClient::new(channel);
            self.clients.insert(address.clone(), client);
        }
        let client = self
            .clients
            .get_mut(address)
            .ok_or(("client vanished".to_owned(), None))?;
        match client
            .ingest(EventBatch {
                events: events.to_vec(),
                epoch: 0,
                generation: 0,
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
                Err((status.to_string(), crate::grpc::retry_after(&status)))
            }
        }
    }

    /// Writes `letters` to the dead-letter topic, in order, each awaited
    /// (within the producer's message timeout); returns how many were written
    /// before the first refusal. Only on the Kafka path: while the collector
    /// is on the backup intake, Kafka is not asked.
    async fn dead_letters(&self, letters: &[DeadLetter]) -> usize {
        if self.path != Path::Kafka {
            return 0;
        }
        for (written, letter) in letters.iter().enumerate() {
            let payload = match serde_json::to_vec(letter) {
                Ok(payload) => payload,
                Err(error) => {
                    // Unreachable for these types; never a reason to lose the row silently.
                    tracing::error!(%error, at = %letter.at, "dead letter could not be encoded");
                    return written;
                }
            };
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "ballast-reason",
                value: Some(letter.reason.as_str()),
            });
            let record = FutureRecord::to(&self.dead_letter_topic)
                .key(&letter.at)
                .payload(&payload)
                .headers(headers);
            if let Err((error, _)) = self.producer.send(record, Duration::from_secs(0)).await {
                tracing::warn!(%error, at = %letter.at, table = %letter.table, "dead letter not written; kept, and retried before the next group");
                return written;
            }
            self.metrics.dead_letters.inc();
        }
        letters.len()
    }
}

/// Most events per backup intake call for a budget of `rate` events/s. Pure.
pub(super) fn backup_chunk(rate: i32) -> usize {
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

/// One source transaction of the binlog (or a part of one too large to hold
/// whole): its events, its rows that could not become events, and — once its
/// commit was read — the binlog position just after it.
pub(super) struct Txn {
    pub(super) events: Vec<ChangeEvent>,
    pub(super) dead: Vec<DeadLetter>,
    pub(super) end: Option<Position>,
}

/// Most events delivered as one group. Transactions that queued up while a
/// group was being acknowledged are sent together, so one-row transactions
/// cost one round trip per group, not one each.
const GROUP_EVENTS: usize = 10_000;

/// Most dead letters held unwritten: past it, delivery waits for Kafka to
/// take them instead of reading on (memory stays bounded).
const MAX_PENDING_DEAD: usize = 10_000;

/// How long delivery waits between attempts while too many dead letters wait.
const DEAD_RETRY: Duration = Duration::from_secs(1);

/// The position to checkpoint: the last acknowledged one, but never past the
/// start of the oldest group whose dead letters are not written yet. Pure.
pub(super) fn checkpoint(acked: Option<Position>, held: Option<&Position>) -> Option<Position> {
    match held {
        Some(held) => Some(held.clone()),
        None => acked,
    }
}

/// Dead letters not yet written, and the position before the oldest of them.
#[derive(Default)]
struct Unwritten {
    letters: Vec<DeadLetter>,
    held: Option<Position>,
}

impl Unwritten {
    /// Tries the waiting dead letters; forgets those written.
    async fn flush(&mut self, sender: &Sender) {
        if self.letters.is_empty() {
            return;
        }
        let written = sender.dead_letters(&self.letters).await;
        self.letters.drain(..written);
        if self.letters.is_empty() {
            self.held = None;
        }
        sender
            .metrics
            .dead_letters_pending
            .set(i64::try_from(self.letters.len()).unwrap_or(i64::MAX));
    }
}

/// Delivers transactions in binlog order, in groups, and checkpoints the
/// position after the last one acknowledged (see [`checkpoint`]). Returns
/// at shutdown or when the reader is gone; what was not acknowledged is
/// re-read after a restart from `start`, the checkpoint it began at.
pub(super) async fn deliver(
    mut sender: Sender,
    mut txns: mpsc::Receiver<Txn>,
    checkpoints: Checkpoints,
    start: Position,
    shutdown: CancellationToken,
) {
    let mut acked: Option<Position> = None;
    // The end of the last whole transaction acknowledged: where a group starts.
    let mut complete = start;
    let mut unwritten = Unwritten::default();
    let mut last_save = tokio::time::Instant::now();
    while let Some(mut group) = txns.recv().await {
        while group.events.len() < GROUP_EVENTS {
            let Ok(next) = txns.try_recv() else { break };
            group.events.extend(next.events);
            group.dead.extend(next.dead);
            if next.end.is_some() {
                group.end = next.end;
            }
        }
        unwritten.flush(&sender).await;
        while unwritten.letters.len() >= MAX_PENDING_DEAD && !shutdown.is_cancelled() {
            tokio::time::sleep(DEAD_RETRY).await;
            sender.follow_mode().await;
            unwritten.flush(&sender).await;
        }
        if !group.events.is_empty() && !sender.send(&group.events, &shutdown).await {
            break; // shutting down: the group is re-read from the checkpoint
        }
        if !group.dead.is_empty() {
            unwritten.held.get_or_insert_with(|| complete.clone());
            unwritten.letters.extend(group.dead);
            unwritten.flush(&sender).await;
        }
        if let Some(end) = group.end {
            complete = end.clone();
            acked = Some(end);
        }
        // At most a couple of saves a second: a restart re-reads the rest,
        // and the event ids make that harmless.
        if last_save.elapsed() >= CHECKPOINT_EVERY {
            save(&checkpoints, checkpoint(acked.take(), unwritten.held.as_ref())).await;
            last_save = tokio::time::Instant::now();
        }
    }
    save(&checkpoints, checkpoint(acked, unwritten.held.as_ref())).await;
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

    #[test]
    fn the_checkpoint_never_passes_an_unwritten_dead_letter() {
        let at = |pos| Position {
            file: "binlog.000001".into(),
            pos,
        };
        // (acknowledged, held before an unwritten dead letter, saved)
        let cases = [
            (None, None, None),
            (Some(at(900)), None, Some(at(900))),
            (Some(at(900)), Some(at(300)), Some(at(300))),
            // Nothing newly acknowledged, yet a dead letter waits: still saved held.
            (None, Some(at(300)), Some(at(300))),
        ];
        for (acked, held, want) in cases {
            assert_eq!(
                checkpoint(acked.clone(), held.as_ref()),
                want,
                "{acked:?} held {held:?}"
            );
        }
    }

    #[test]
    fn the_collector_switches_paths_on_what_it_sees_and_only_then() {
        use Mode::{Degraded, Normal, Recovering};
        let mode = |mq, kafka_answers| Seen::Mode { mq, kafka_answers };
        let failed = |failures| Seen::KafkaFailed { failures, retries: 3 };
        // (path, seen, next path or none)
        let cases = [
            (Path::Kafka, mode(Normal, None), None),
            (Path::Kafka, mode(Degraded, None), Some(Path::Backup)),
            (Path::Kafka, mode(Recovering, None), None),
            (Path::Kafka, failed(3), None),
            (Path::Kafka, failed(4), Some(Path::Backup)),
            (Path::Backup, failed(9), None),
            (Path::Backup, mode(Degraded, None), None),
            (Path::Backup, mode(Recovering, Some(true)), None),
            // Normal alone is not enough: this collector must reach Kafka itself.
            (Path::Backup, mode(Normal, None), None),
            (Path::Backup, mode(Normal, Some(false)), None),
            (Path::Backup, mode(Normal, Some(true)), Some(Path::Kafka)),
        ];
        for (path, seen, want) in cases {
            assert_eq!(
                switch(path, seen).map(|(to, _)| to),
                want,
                "{path:?} seeing {seen:?}"
            );
        }
    }
}
