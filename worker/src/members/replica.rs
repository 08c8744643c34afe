//! Applying the member change stream to an Elasticsearch cluster that does
//! not take writes itself (the standby data centre's, the marketing one):
//! every record's member stored unless the cluster holds a newer version, in
//! the stream's order, each offset stored only once its record is applied,
//! so that the group's committed offset is exactly what the cluster holds
//! (what is already fetched goes in one bulk request).
//! A cluster that was away replays from there what it missed, and nothing
//! else. A record is retried, never skipped.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Timestamp;
use tokio_util::sync::CancellationToken;

use super::consume::{commit, next, pause};
use super::model::Member;
use super::search::MemberIndex;
use super::stream::Record;

/// How long to wait before retrying a batch the cluster did not take.
const RETRY: Duration = Duration::from_millis(500);

/// Records applied in one bulk request at most.
pub const BATCH: usize = 500;

/// One record applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its offset in the stream.
    pub offset: i64,
    /// When Kafka took it, in milliseconds since the Unix epoch, if known.
    pub produced_ms: Option<i64>,
}

/// Applies what `consumer` reads to `index` until `shutdown`, calling
/// `applied` after each record the cluster took (an unreadable one is
/// logged and passed) and `failed` for each failed attempt; what was
/// applied is committed before it returns.
///
/// Records already fetched are applied together, up to [`BATCH`] in one
/// bulk request (a cluster catching up replays at the speed of bulk
/// requests, not of round trips); their offsets are stored once the whole
/// batch is applied, so a batch that fails is retried whole.
pub async fn apply(
    consumer: &StreamConsumer,
    index: &MemberIndex,
    deadline: Duration,
    shutdown: &CancellationToken,
    mut applied: impl FnMut(Applied),
    mut failed: impl FnMut(),
) {
    while let Some(first) = next(consumer, shutdown).await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            // Only what is already fetched: a zero timeout polls once.
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(message)) => batch.push(message),
                _ => break,
            }
        }
        let records: Vec<Option<Record>> = batch
            .iter()
            .map(|message| match message.payload().map(Record::decode) {
                Some(Ok(record)) => Some(record),
                // Nothing can apply it: counted and passed, as the replay does.
                Some(Err(_)) | None => {
                    tracing::error!(
                        offset = message.offset(),
                        "an unreadable member change record was skipped"
                    );
                    None
                }
            })
            .collect();
        let members: Vec<(&Member, i64)> = records.iter().flatten().map(|r| (&r.member, r.epoch)).collect();
        loop {
            match tokio::time::timeout(deadline, index.put_all(&members)).await {
                Ok(Ok(())) => break,
                Ok(Err(error)) => {
                    tracing::debug!(index = index.index(), %error, "a replica waits for its cluster");
                }
                Err(_) => tracing::debug!(
                    index = index.index(),
                    "a replica's cluster did not answer in time"
                ),
            }
            failed();
            if pause(shutdown, RETRY).await {
                commit(consumer);
                return;
            }
        }
        for (message, record) in batch.iter().zip(&records) {
            if record.is_some() {
                applied(Applied {
                    offset: message.offset(),
                    produced_ms: match message.timestamp() {
                        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => Some(ms),
                        Timestamp::NotAvailable => None,
                    },
                });
            }
            if let Err(error) = consumer.store_offset_from_message(message) {
                tracing::warn!(%error, "storing an applied offset failed");
            }
        }
    }
    commit(consumer);
}
