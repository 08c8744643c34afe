//! The active master's planning: which windows have closed and what they
//! hold (from the KV store), the period and day to date over them, the
//! hour-to-date tasks on the slaves' memory in KV-degraded mode, the windows
//! to compute again when the hot MySQL returns, and recent windows that
//! gained late events.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_crds::Mode;

use super::dispatch::Slaves;
use super::tasks::{self, Table};
use super::{Active, plan};
use crate::kv::{BUCKET_TTL_SECONDS, KvError, KvStore, Layout};
use crate::roles::startup;

impl Active<'_> {
    /// Plans what has closed: windows from the KV store, or in KV-degraded
    /// mode hour-to-date tasks on the slaves holding the data.
    pub(super) async fn plan(
        &self,
        table: &mut Table,
        kv: &mut Option<KvStore>,
        slaves: &Slaves,
        live: &BTreeMap<String, String>,
        kv_mode: Mode,
        now: i64,
    ) {
        let grace = i64::try_from(self.config.grace.as_millis()).unwrap_or(i64::MAX);
        let closed = plan::closed_windows(table.next_window_ms(), now, self.window_ms, grace, 16);
        if closed.is_empty() {
            return;
        }
        if kv_mode == Mode::Degraded {
            // The window's events went to the slaves: computed hourly from their memory.
            let last_end = closed[closed.len() - 1] + self.window_ms;
            table.skip_window(last_end);
            let hour = plan::period_of(last_end - 1, self.degraded_period_ms);
            let end = (hour + self.degraded_period_ms).min(last_end);
            // For the lateness after a period closed, what the slaves hold for
            // it is still watched: late events, and merchants handed between
            // slaves after its last task, get it computed again.
            let previous = hour - self.degraded_period_ms;
            let lateness = i64::try_from(self.config.lateness.as_millis()).unwrap_or(i64::MAX);
            let watch_previous = last_end - hour <= lateness;
            table.forget_hours_before(previous);
            for (slave, windows) in slaves.holdings(Duration::from_secs(1)).await {
                // A departed slave still polled (draining) gets no task.
                if !live.contains_key(&slave) {
                    continue;
                }
                let held = |from: i64, to: i64| -> u64 {
                    windows
                        .iter()
                        .filter(|w| w.window_start_ms >= from && w.window_start_ms < to)
                        .map(|w| w.events)
                        .sum()
                };
                let events = held(hour, end);
                if events > 0 {
                    table.plan_hour(hour, end, &slave, events);
                }
                if watch_previous && table.recount_hour(previous, hour, &slave, held(previous, hour)) {
                    tracing::info!(
                        %slave, period = previous,
                        "what a slave holds for a closed degraded period changed: computing it again"
                    );
                }
            }
            return;
        }
        let mut planned = Vec::new();
        for start in closed {
            if !table.has_room() {
                // Loud in the report (planFull) and the window lag; the state stays storable.
                break;
            }
            let store = match kv {
                Some(store) => store,
                None => match connect(&self.kv, self.layout.clone()).await {
                    Ok(store) => kv.insert(store),
                    Err(error) => {
                        tracing::warn!(%error, "KV store unreachable; planning waits");
                        return;
                    }
                },
            };
            match self.count(store, start).await {
                Ok((events, partitions)) => {
                    table.plan_window(start, start + self.window_ms, events, partitions);
                    planned.push((start, events));
                }
                Err(error) => {
                    tracing::warn!(%error, window = start, "counting the window's events failed; planning waits");
                    *kv = None;
                    break;
                }
            }
        }
        self.plan_to_date(table, &planned, false);
    }

    /// Plans the period and the day to date over what `windows` added
    /// (`late`: events that arrived after they were planned).
    fn plan_to_date(&self, table: &mut Table, windows: &[(i64, u64)], late: bool) {
        if windows.is_empty() {
            return;
        }
        let cadence = tasks::Cadence {
            period_ms: self.degraded_period_ms,
            every_ms: i64::try_from(self.config.to_date_every.as_millis()).unwrap_or(i64::MAX),
        };
        table.plan_to_date(
            windows,
            self.window_ms,
            cadence,
            late,
            self.config.events_per_task,
        );
    }

    /// The events window `start` holds now, and the tasks it is cut into.
    async fn count(&self, store: &mut KvStore, start: i64) -> Result<(u64, u32), KvError> {
        let events = store.count(start).await?;
        let most = u32::try_from(tasks::MAX_TASKS_PER_WINDOW).unwrap_or(u32::MAX);
        Ok((
            events,
            plan::partitions(events, self.config.events_per_task, most),
        ))
    }

    /// After a MySQL outage: plans again the windows whose results reached the
    /// cache only, so that the hot MySQL gets them too (the KV store still has
    /// their events).
    pub(super) async fn fill_hot_gap(&self, table: &mut Table, kv: &mut Option<KvStore>) {
        let Some((from, to)) = table.hot_gap_closes() else {
            return;
        };
        let Some(store) = kv.as_mut() else {
            // No KV connection yet: try again on the next pass.
            table.hot_gap_opens_at(from);
            return;
        };
        tracing::info!(
            from,
            to,
            "the hot MySQL is back: computing the windows it missed again"
        );
        let mut start = from;
        let mut again = Vec::new();
        while start < to {
            match self.count(store, start).await {
                Ok((events, partitions)) => {
                    table.plan_window(start, start + self.window_ms, events, partitions);
                    again.push((start, 0));
                }
                Err(error) => {
                    tracing::warn!(%error, "recounting the windows MySQL missed failed; retrying");
                    table.hot_gap_opens_at(start);
                    *kv = None;
                    break;
                }
            }
            start += self.window_ms;
        }
        // The period and day to date reached the cache only too.
        self.plan_to_date(table, &again, true);
    }

    /// Counts the recently closed windows again: late events (a collector
    /// that caught up, a redelivery) get the window computed again.
    pub(super) async fn recheck(&self, table: &mut Table, kv: &mut Option<KvStore>, now: i64) {
        let lateness = i64::try_from(self.config.lateness.as_millis()).unwrap_or(i64::MAX);
        table.forget_before(now.saturating_sub(lateness + self.window_ms));
        let Some(store) = kv.as_mut() else { return };
        let mut late = Vec::new();
        for start in table.recent_windows() {
            match self.count(store, start).await {
                Ok((events, partitions)) => {
                    if let Some(gained) = table.recheck(start, start + self.window_ms, events, partitions) {
                        late.push((start, gained));
                        tracing::info!(
                            window = start,
                            events,
                            "late events arrived: computing the window again"
                        );
                        self.metrics
                            .tasks
                            .get_or_create(&[("outcome", "recomputed")])
                            .inc();
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "recounting recent windows failed");
                    *kv = None;
                    break;
                }
            }
        }
        self.plan_to_date(table, &late, true);
    }
}

async fn connect(info: &redis::ConnectionInfo, layout: Layout) -> Result<KvStore, redis::RedisError> {
    let conn = startup::redis_connection(info).await?;
    Ok(KvStore::new(conn, layout, BUCKET_TTL_SECONDS))
}
