//! The journal's consuming side: the replay of the writes Elasticsearch took
//! while MySQL was down, in the stream's order, each applied to MySQL only if
//! newer than its row (so a replay repeated after a crash changes nothing),
//! its offset stored only once applied; and the path task, which measures the
//! replay's progress, probes a MySQL whose breaker is open, sweeps once per
//! catch-up, and decides the path ([`super::path::next`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use super::path::{self, Path};
use super::service::Members;
use super::write::now_ms;
use crate::members::consume::{commit, next, offsets, pause};
use crate::members::stream::{self, Record};

/// How often the path is decided again.
pub const STEER_EVERY: Duration = Duration::from_millis(200);

/// The consumer group of MemberStore `name` in `namespace`'s replay: one
/// member of it holds the partition and replays; every process reads the
/// group's committed offset to know how far the replay is.
pub fn group(namespace: &str, name: &str) -> String {
    format!("ballast-members-{namespace}.{name}-replay")
}

/// Replays until `shutdown`; what was applied is committed before it returns.
pub async fn replay(members: Arc<Members>, consumer: Arc<StreamConsumer>, shutdown: CancellationToken) {
    let metrics = Arc::clone(&members.metrics);
    while let Some(message) = next(&consumer, &shutdown).await {
        match message.payload().map(Record::decode) {
            Some(Ok(record)) if record.path == stream::Path::Elasticsearch => {
                let member = &record.member;
                // Applied or not, nothing past this record is stored until it is.
                loop {
                    let applied = members.put_state(member).await;
                    match applied {
                        Ok(true) => {
                            metrics.replayed.get_or_create(&[("result", "applied")]).inc();
                            break;
                        }
                        Ok(false) => {
                            metrics.replayed.get_or_create(&[("result", "current")]).inc();
                            break;
                        }
                        Err(failure) => {
                            tracing::debug!(member = member.id, %failure, "replay waits for MySQL");
                            if pause(&shutdown, Duration::from_millis(500)).await {
                                commit(&consumer);
                                return;
                            }
                        }
                    }
                }
            }
            // A MySQL-path record is in MySQL already.
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                tracing::error!(
                    offset = message.offset(),
                    "an unreadable member journal record was skipped"
                );
                metrics.replayed.get_or_create(&[("result", "unreadable")]).inc();
            }
        }
        if let Err(error) = consumer.store_offset_from_message(&message) {
            tracing::warn!(%error, "storing a replayed offset failed");
        }
    }
    commit(&consumer);
}

/// How far before the path left MySQL a sweep starts: writers' clocks may
/// disagree by this much.
const SWEEP_MARGIN_MS: i64 = 60_000;

/// Members read per page of a sweep.
const SWEEP_PAGE: usize = 500;

/// Brings into MySQL every member Elasticsearch changed since `since_ms`
/// that MySQL holds an older version of (what the journal may lack: a write
/// Elasticsearch took whose record Kafka did not); how many it brought.
async fn sweep(members: &Members, since_ms: i64) -> Result<u64, super::service::Failure> {
    let stores = &members.stores;
    // A search sees the index as of its last refresh: a write made just
    // before the catch-up would be missed.
    let search = stores.search();
    members.call(search.target(), search.index.refresh()).await?;
    let mut after = None;
    let mut brought = 0;
    loop {
        let page = members
            .call(
                search.target(),
                search.index.changed_since(since_ms, after, SWEEP_PAGE),
            )
            .await?;
        for member in &page {
            if members.put_state(member).await? {
                brought += 1;
                members
                    .metrics
                    .replayed
                    .get_or_create(&[("result", "swept")])
                    .inc();
            }
        }
        match page.last() {
            Some(last) if page.len() == SWEEP_PAGE => after = Some((last.updated_ms, last.id)),
            _ => return Ok(brought),
        }
    }
}

/// Decides the path every [`STEER_EVERY`] until `shutdown`; sweeps once per
/// catch-up.
pub async fn steer(
    members: Arc<Members>,
    consumer: Arc<StreamConsumer>,
    topic: String,
    shutdown: CancellationToken,
) {
    let mut current = Path::Mysql;
    // When the path last left MySQL, and whether this catch-up has swept.
    let mut left_mysql_ms = None;
    let mut swept = false;
    let deadline = members.timing.deadline;
    loop {
        let (end, committed) = offsets(&consumer, &topic, deadline).await;
        if let (Some(end), Some(committed)) = (end, committed) {
            members.metrics.replay_pending.set((end - committed).max(0));
        }
        if members.path_inputs(end, committed, swept).breaker_open {
            // An open breaker closes only after trial calls, which nothing
            // else makes while the path avoids MySQL.
            let primary = members.stores.primary();
            let _ = members.call(primary.target(), primary.db.ping()).await;
        }
        if let (Path::Catchup { .. }, false, Some(since)) = (current, swept, left_mysql_ms) {
            match sweep(&members, since - SWEEP_MARGIN_MS).await {
                Ok(brought) => {
                    tracing::info!(brought, "swept the members changed while MySQL was away");
                    swept = true;
                }
                Err(failure) => tracing::warn!(%failure, "the catch-up's sweep failed; retrying"),
            }
        }
        let inputs = members.path_inputs(end, committed, swept);
        let next = path::next(current, inputs);
        match (current, next) {
            (Path::Mysql, Path::Elasticsearch) => {
                left_mysql_ms = Some(now_ms());
                swept = false;
            }
            // Back on Elasticsearch mid-catch-up: sweep again from the same start.
            (Path::Catchup { .. }, Path::Elasticsearch) => swept = false,
            (_, Path::Mysql) => left_mysql_ms = None,
            _ => {}
        }
        current = next;
        members.set_path(current, &inputs);
        if pause(&shutdown, STEER_EVERY).await {
            return;
        }
    }
}
