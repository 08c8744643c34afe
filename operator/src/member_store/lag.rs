//! Measuring a kept cluster's replication lag from outside its replicator:
//! its consumer group's committed offset against the change stream's end,
//! and the time Kafka took the oldest record past it. I/O at the edge; the
//! judgement is [`super::status`].

use std::time::Duration;

use ballast_crds::refs::KafkaRef;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A kept cluster's position in the change stream (one partition).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measured {
    /// Records the cluster holds: its group's committed offset (the
    /// stream's start when nothing is committed).
    pub applied: i64,
    /// The stream's end.
    pub end: i64,
    /// When Kafka took the oldest record the cluster lacks, in milliseconds
    /// since the Unix epoch (none when it lacks none, or Kafka did not say).
    pub oldest_missing_ms: Option<i64>,
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// Kafka refused or did not answer within the deadline.
    #[error("{0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The blocking read did not finish in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The blocking read stopped before it finished.
    #[error("the measurement stopped: {0}")]
    Stopped(String),
}

/// Measures group `group`'s position in `kafka`'s stream within `deadline`,
/// without joining the group (its members keep their partition) or
/// committing anything.
pub async fn measure(kafka: &KafkaRef, group: &str, deadline: Duration) -> Result<Measured, LagError> {
    let (kafka, group) = (kafka.clone(), group.to_owned());
    blocking(deadline, move || measure_blocking(&kafka, &group, deadline)).await
}

/// Runs `call` (librdkafka's calls block) off the runtime's threads, within
/// four times `deadline` (it makes up to four calls of its own).
async fn blocking<T: Send + 'static>(
    deadline: Duration,
    call: impl FnOnce() -> Result<T, LagError> + Send + 'static,
) -> Result<T, LagError> {
    match tokio::time::timeout(deadline * 4, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(join)) => Err(LagError::Stopped(join.to_string())),
        Err(_) => Err(LagError::Timeout(deadline * 4)),
    }
}

/// A client of group `group` that neither joins it nor commits by itself.
fn consumer(kafka: &KafkaRef, group: &str) -> Result<BaseConsumer, LagError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?)
}

fn measure_blocking(kafka: &KafkaRef, group: &str, deadline: Duration) -> Result<Measured, LagError> {
    let consumer = consumer(kafka, group)?;
    let topic = kafka.topic.as_str();
    let (start, end) = consumer.fetch_watermarks(topic, 0, deadline)?;
    let mut partition = TopicPartitionList::new();
    partition.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(partition, deadline)?
        .find_partition(topic, 0)
        .and_then(|p| match p.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        });
    let applied = committed.unwrap_or(start).max(start);
    let oldest_missing_ms = if applied < end {
        // Read the first record the cluster lacks, by assignment (no group join).
        let mut at = TopicPartitionList::new();
        at.add_partition_offset(topic, 0, Offset::Offset(applied))?;
        consumer.assign(&at)?;
        match consumer.poll(deadline) {
            Some(Ok(message)) => match message.timestamp() {
                Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => Some(ms),
                Timestamp::NotAvailable => None,
            },
            Some(Err(error)) => return Err(error.into()),
            None => None,
        }
    } else {
        None
    };
    Ok(Measured {
        applied,
        end,
        oldest_missing_ms,
    })
}
