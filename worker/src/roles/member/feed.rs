//! Feeding the marketing cluster from the change stream, in the member
//! process, as a replica ([`crate::members::replica`]): order-flow traffic
//! never waits on it; marketing callers read what it has applied.

use std::sync::Arc;

use rdkafka::consumer::StreamConsumer;
use tokio_util::sync::CancellationToken;

use super::service::Members;
use crate::members::replica;
use crate::members::search::MemberIndex;

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
    // Not through the Elasticsearch breaker, which guards the order flow's
    // cluster: a failing marketing cluster must not open it.
    let deadline = members.timing.deadline;
    let fed = members.metrics.fed.clone();
    replica::apply(
        &consumer,
        &marketing,
        deadline,
        &shutdown,
        |_| {
            fed.inc();
        },
        || {},
    )
    .await;
}
