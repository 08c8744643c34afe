//! Refilling a KV store that came back without its data (a restart without
//! persistence, a failover to an empty replica): without it, every event of
//! the windows not yet computed would be silently gone.
//!
//! Detection: the intakes keep a marker key in the KV store. A marker that
//! is gone, or that another intake has recreated since this one last saw it,
//! means the store lost its data. Refill: the intake seeks its partitions
//! back to the first Kafka message produced at or after the start of the
//! oldest window still to be computed (or still watched for late events),
//! as the master's persisted state says. Kafka's time index keeps those
//! offsets durably, whatever happens to the intake, so the intake keeps no
//! offsets of its own. Writes are idempotent on event ids, so what the store
//! still had is not counted twice, and the master recomputes a recent window
//! whose count grows. Where Kafka no longer holds messages that old, the
//! possible loss is reported per partition and window.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kv::KvStore;
use crate::roles::master::state::{StateError, StateStore};
use crate::roles::master::tasks::Snapshot;

/// How often the marker is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Deadline of each marker call, state read and Kafka lookup.
const DEADLINE: Duration = Duration::from_secs(5);

/// What a marker read means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// The store kept its data.
    Same,
    /// First look at a marker that was there already: remember it.
    Adopt,
    /// First look, and no marker: set one. Not a refill: a starting intake
    /// resumes from its committed offsets, and re-reading while the store may
    /// already be failing would hand old events to the slaves' hours.
    Mark,
    /// The store lost its data: refill (and set a marker if there is none).
    Refill,
}

/// The meaning of marker `seen` for an intake that last saw `known`. Pure.
pub fn reset(known: Option<&str>, seen: Option<&str>) -> Reset {
    match (known, seen) {
        (None, None) => Reset::Mark,
        (Some(_), None) => Reset::Refill,
        (None, Some(_)) => Reset::Adopt,
        (Some(known), Some(seen)) if known == seen => Reset::Same,
        (Some(_), Some(_)) => Reset::Refill,
    }
}

/// The start of the oldest window whose events the KV store must hold: the
/// oldest open task read from it, the oldest window still watched for late
/// events, the start of the day and period computed to date, or the next to
/// plan. `None` before a master saved any state. Pure.
pub fn refill_from(snapshot: &Snapshot) -> Option<i64> {
    let next = snapshot.next_window_ms?;
    // A pinned task reads a slave's memory, not the KV store.
    let open = snapshot
        .open
        .iter()
        .filter(|t| t.planned.key.pinned.is_none())
        .map(|t| t.planned.key.start_ms);
    let recent = snapshot.recent.keys().copied();
    let to_date = snapshot.to_date.kv_needed_from();
    open.chain(recent).chain(to_date).chain([next]).min()
}

/// Whether seeking to `target` for a time may have skipped messages Kafka
/// deleted: the lookup ended at the first message Kafka still holds, and
/// earlier ones existed. Pure.
pub fn maybe_lost(target: i64, low_watermark: i64) -> bool {
    target == low_watermark && low_watermark > 0
}

/// A marker no other process makes.
fn new_marker() -> String {
    format!(
        "{}-{}",
        k8s_openapi::jiff::Timestamp::now().as_nanosecond(),
        std::process::id()
    )
}

/// Checks the marker every second; bumps `refills` each time the store is
/// found to have lost its data, once a marker is set again.
pub async fn watch(mut kv: KvStore, refills: watch::Sender<u64>, stop: CancellationToken) {
    let mut known: Option<String> = None;
    loop {
        // Down or slow: the write path retries and reports it; look again later.
        if let Ok(Ok(seen)) = tokio::time::timeout(DEADLINE, kv.marker()).await {
            match reset(known.as_deref(), seen.as_deref()) {
                Reset::Same => {}
                Reset::Adopt => known = seen,
                Reset::Mark => {
                    if let Ok(Ok(current)) = tokio::time::timeout(DEADLINE, kv.mark(&new_marker())).await {
                        known = Some(current);
                    }
                }
                Reset::Refill => {
                    // Another intake may have set it first: its marker is adopted.
                    if let Ok(Ok(current)) = tokio::time::timeout(DEADLINE, kv.mark(&new_marker())).await {
                        tracing::warn!(
                            "the KV store lost its data (marker gone or recreated): refilling from Kafka"
                        );
                        known = Some(current);
                        refills.send_modify(|n| *n += 1);
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// Why a refill could not be done (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum RefillError {
    /// The master's state could not be read.
    #[error("reading the master state: {0}")]
    State(#[from] StateError),
    /// Kafka did not answer a lookup or a seek.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A call passed its deadline.
    #[error("{0} passed its deadline")]
    Deadline(&'static str),
    /// This consumer has no partitions yet (it is joining its group).
    #[error("no partitions assigned yet")]
    NotAssigned,
}

/// A partition sought back, and whether messages it needed may be gone.
#[derive(Debug)]
pub struct Sought {
    /// The partition.
    pub partition: i32,
    /// The offset it re-reads from.
    pub offset: i64,
    /// Kafka may no longer hold some of the messages it needed.
    pub maybe_lost: bool,
}

/// Seeks this consumer's partitions back to the oldest window the KV store
/// must hold, as the master's state in `state` says. Nothing to do (`None`)
/// before a master saved any state.
pub async fn refill(
    consumer: &Arc<StreamConsumer>,
    mut state: StateStore,
) -> Result<Option<(i64, Vec<Sought>)>, RefillError> {
    // A local check first: while the group assigns partitions there is
    // nothing to seek, and the state is not read again and again.
    if consumer.assignment()?.count() == 0 {
        return Err(RefillError::NotAssigned);
    }
    let snapshot = tokio::time::timeout(DEADLINE, state.load())
        .await
        .map_err(|_| RefillError::Deadline("reading the master state"))??;
    let Some(from_ms) = refill_from(&snapshot) else {
        return Ok(None);
    };
    let consumer = consumer.clone();
    // librdkafka's lookups block: off the async threads.
    let sought = tokio::task::spawn_blocking(move || -> Result<Vec<Sought>, KafkaError> {
        let targets = consumer.offsets_for_timestamp(from_ms, DEADLINE)?;
        let mut seek = TopicPartitionList::new();
        let mut out = Vec::new();
        for element in targets.elements() {
            // End: nothing was produced since; that partition has nothing to re-read.
            let Offset::Offset(offset) = element.offset() else {
                continue;
            };
            let (low, _) = consumer.fetch_watermarks(element.topic(), element.partition(), DEADLINE)?;
            seek.add_partition_offset(element.topic(), element.partition(), Offset::Offset(offset))?;
            out.push(Sought {
                partition: element.partition(),
                offset,
                maybe_lost: maybe_lost(offset, low),
            });
        }
        if seek.count() > 0 {
            consumer.seek_partitions(seek, DEADLINE)?;
        }
        Ok(out)
    })
    .await
    .map_err(|_| RefillError::Deadline("seeking back"))??;
    Ok(Some((from_ms, sought)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::master::tasks::{Kind, OpenTask, Planned, TaskKey};

    #[test]
    fn a_marker_gone_or_recreated_means_the_store_lost_its_data() {
        // (last seen, seen now, meaning)
        let cases = [
            (None, Some("a"), Reset::Adopt),
            (None, None, Reset::Mark),
            (Some("a"), Some("a"), Reset::Same),
            (Some("a"), None, Reset::Refill),
            // Another intake saw it gone first and set a new one.
            (Some("a"), Some("b"), Reset::Refill),
        ];
        for (known, seen, want) in cases {
            assert_eq!(reset(known, seen), want, "{known:?} then {seen:?}");
        }
    }

    fn open(kind: Kind, start_ms: i64) -> OpenTask {
        OpenTask {
            planned: Planned {
                key: TaskKey {
                    kind,
                    start_ms,
                    partition: 0,
                    // Hour tasks here are the KV-degraded ones, on a slave's memory.
                    pinned: (kind == Kind::Hour).then(|| "slave-0".to_owned()),
                },
                end_ms: start_ms + 60_000,
                partitions: 1,
                events: 1,
            },
            version: 1,
            running_on: None,
            attempts: 0,
            rounds: 0,
            failing_since_ms: None,
        }
    }

    #[test]
    fn the_refill_starts_at_the_oldest_window_still_needed() {
        let snapshot = |next: Option<i64>, open: Vec<OpenTask>, recent: &[i64]| Snapshot {
            next_window_ms: next,
            open,
            recent: recent.iter().map(|w| (*w, 10)).collect(),
            ..Snapshot::default()
        };
        // (state, refill from)
        let cases = [
            (snapshot(None, vec![], &[]), None),
            (snapshot(Some(600_000), vec![], &[]), Some(600_000)),
            (
                snapshot(Some(600_000), vec![], &[480_000, 540_000]),
                Some(480_000),
            ),
            (
                snapshot(Some(600_000), vec![open(Kind::Window, 120_000)], &[480_000]),
                Some(120_000),
            ),
            // An hour task's data is in a slave's memory, not the KV store.
            (
                snapshot(Some(600_000), vec![open(Kind::Hour, 0)], &[540_000]),
                Some(540_000),
            ),
            // A day computed to date reads every window of the day so far.
            (
                Snapshot {
                    to_date: crate::roles::master::tasks::ToDate {
                        day: Some(crate::roles::master::tasks::Track {
                            start_ms: 60_000,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..snapshot(Some(600_000), vec![], &[540_000])
                },
                Some(60_000),
            ),
        ];
        for (i, (state, want)) in cases.into_iter().enumerate() {
            assert_eq!(refill_from(&state), want, "case {i}");
        }
    }

    #[test]
    fn only_a_lookup_ending_at_a_trimmed_log_start_may_have_lost_messages() {
        // (target offset, low watermark, maybe lost)
        for (target, low, want) in [(0, 0, false), (50, 10, false), (10, 10, true)] {
            assert_eq!(maybe_lost(target, low), want, "{target} with log start {low}");
        }
    }
}
