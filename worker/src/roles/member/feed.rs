//! Feeding the marketing cluster from the change stream: every record's
//! member stored in the marketing index (a newer version there is kept), in
//! the stream's order, its offset stored only once applied. Order-flow
//! traffic never waits on it; marketing callers read what it has applied.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::journal::{commit, next, pause};
use super::service::{Members, within};
use crate::members::search::MemberIndex;
use crate::members::stream::Record;

/// The consumer group that feeds MemberStore `name` in `namespace`'s marketing cluster.
pub fn group(namespace: &str, name: &str) -> String {
    format!("ballast-members-{namespace}.{name}-marketing")
}

/// Feeds `marketing` until `shutdown`; what was applied is committed before it returns.
pub async fn run(
    members: Arc<Members>,
    consumer: StreamConsumer,
    marketing: MemberIndex,
    shutdown: CancellationToken,
) {
    while let Some(message) = next(&consumer, &shutdown).await {
        if let Some(Ok(record)) = message.payload().map(Record::decode) {
            // Not through the Elasticsearch breaker, which guards the
            // order flow's cluster: a failing marketing cluster must not open
            // it. A record is retried, never skipped.
            let deadline = members.timing.deadline;
            while let Err(failure) =
                within(deadline, "elasticsearch marketing", marketing.put(&record.member)).await
            {
                tracing::debug!(%failure, "the marketing feed waits for its cluster");
                if pause(&shutdown, Duration::from_millis(500)).await {
                    commit(&consumer);
                    return;
                }
            }
            members.metrics.fed.inc();
        }
        if let Err(error) = consumer.store_offset_from_message(&message) {
            tracing::warn!(%error, "storing a fed offset failed");
        }
    }
    commit(&consumer);
}
