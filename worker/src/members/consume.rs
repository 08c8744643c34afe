//! Consuming the member change stream: a consumer group whose committed
//! offset is what its reader has applied (offsets are stored only once their
//! record is applied), reading with retries, and the group's position
//! against the stream's end. The replay into MySQL, the marketing feed and
//! the replicator each read with a group of their own.

use std::sync::Arc;
use std::time::Duration;

use ballast_crds::refs::KafkaRef;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::stream;

/// A consumer of the stream in `group`: offsets are stored only once their
/// record is applied, and committed from the store in the background. A
/// group with nothing committed starts at the stream's beginning.
pub fn consumer(kafka: &KafkaRef, group: &str) -> Result<StreamConsumer, KafkaError> {
    let consumer: StreamConsumer = stream::client_config(kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "200")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .create()?;
    consumer.subscribe(&[&kafka.topic])?;
    Ok(consumer)
}

/// The next record of `consumer`, retrying a failed read each second;
/// `None` once `shutdown` comes.
pub async fn next<'c>(
    consumer: &'c StreamConsumer,
    shutdown: &CancellationToken,
) -> Option<rdkafka::message::BorrowedMessage<'c>> {
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match message {
            Ok(m) => return Some(m),
            Err(error) => {
                tracing::warn!(%error, "reading the member change stream failed; retrying");
                if pause(shutdown, Duration::from_secs(1)).await {
                    return None;
                }
            }
        }
    }
}

/// Commits the offsets stored so far, synchronously.
pub fn commit(consumer: &StreamConsumer) {
    // Nothing stored yet is not an error worth a word.
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync)
        && !matches!(
            error,
            KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
        )
    {
        tracing::warn!(%error, "committing applied offsets failed");
    }
}

/// Sleeps `d`; whether `shutdown` came first.
pub async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// The stream's end and the group's committed offset, if Kafka answers
/// within `deadline` (blocking calls, made off the runtime's threads).
pub async fn offsets(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    deadline: Duration,
) -> (Option<i64>, Option<i64>) {
    let consumer = Arc::clone(consumer);
    let topic = topic.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let end = consumer
            .fetch_watermarks(&topic, 0, deadline)
            .ok()
            .map(|(_, high)| high);
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic, 0);
        let committed = consumer
            .committed_offsets(partitions, deadline)
            .ok()
            .and_then(|list| list.find_partition(&topic, 0).map(|p| p.offset()))
            .and_then(|offset| match offset {
                Offset::Offset(o) => Some(o),
                // Nothing committed yet: the group starts at the beginning.
                Offset::Invalid => Some(0),
                _ => None,
            });
        (end, committed)
    });
    tokio::time::timeout(deadline * 2, read)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or((None, None))
}
