//! Applying the member change stream to an Elasticsearch cluster that does
//! not take writes itself (the standby data centre's, the marketing one):
//! every record's member stored unless the cluster holds a newer version, in
//! the stream's order, each offset stored only once its record is applied,
//! so that the group's committed offset is exactly what the cluster holds
//! (what is already fetched goes in one bulk request).
//! A cluster that was away replays from there what it missed, and nothing
//! else. A record is retried, never skipped. The active cluster is followed
//! too, for the records written elsewhere before it became active (a
//! failback's in flight); what the services wrote it is passed over.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Timestamp;
use tokio_util::sync::CancellationToken;

use super::consume::{commit, next, pause};
use super::model::Member;
use super::search::MemberIndex;
use super::stream::Record;

/// Whether a record of epoch `record_epoch` must be applied to a cluster the
/// services have written every record of epoch `written_since` or later
/// (its active one), or every record (`None`: a kept cluster). Pure.
pub fn needed(record_epoch: i64, written_since: Option<i64>) -> bool {
    written_since.is_none_or(|since| record_epoch < since)
}

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
    written_since: Option<i64>,
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
        let members: Vec<(&Member, i64)> = records
            .iter()
            .flatten()
            .filter(|r| needed(r.epoch, written_since))
            .map(|r| (&r.member, r.epoch))
            .collect();
        while !members.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_active_cluster_takes_only_what_was_written_before_it_became_active() {
        // (record's epoch, the cluster written since) → applied
        let cases = [
            (0, None, true),
            (5, None, true),
            (0, Some(1), true),
            (1, Some(1), false),
            (2, Some(1), false),
            (1, Some(2), true),
        ];
        for (epoch, since, want) in cases {
            assert_eq!(
                needed(epoch, since),
                want,
                "epoch {epoch}, written since {since:?}"
            );
        }
    }
}
