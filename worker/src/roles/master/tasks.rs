//! The master's task table: every planned, unfinished task with its attempts
//! and version, and the decisions on completions, failures, departed slaves
//! and hangs. Pure: the loop in `mod.rs` tells it what happened and carries
//! out what it returns. Finished tasks leave the table; the persisted
//! snapshot is the open tasks plus the first window not yet planned.

use std::collections::{BTreeMap, BTreeSet};

use super::faults::{self, Action, Failed, Failure, FaultPolicy};
pub use super::outcome::{Dispatch, Outcome};
use super::schedule::{self, Estimator, SlaveView};
pub use super::snapshot::{Kind, OpenTask, Planned, Snapshot, TaskKey};
use ballast_node::master_report::{FailingWindow, MasterReport, short_error};

mod to_date;
pub use to_date::{Cadence, ToDate, Track};

/// Most open tasks: at about 250 bytes each persisted, the state stays near
/// half a MiB, well inside a ConfigMap's 1 MiB. Reached only when windows keep
/// failing; planning then waits (the report says so) rather than growing the
/// state until the API server refuses it.
pub const MAX_OPEN_TASKS: usize = 2_000;

/// Most tasks one window is cut into.
pub const MAX_TASKS_PER_WINDOW: usize = 64;

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// Waiting for a slave: `only` one (a retry), or any but `exclude`.
    Pending {
        only: Option<String>,
        exclude: BTreeSet<String>,
    },
    Running {
        slave: String,
        started_ms: i64,
        estimate_ms: f64,
        /// The end of the span it was sent with: a task widened meanwhile runs again.
        end_ms: i64,
    },
    Delayed {
        until_ms: i64,
    },
}

#[derive(Clone, Debug)]
struct Task {
    planned: Planned,
    version: u64,
    phase: Phase,
    failures: BTreeMap<String, u32>,
    rounds: u32,
    /// Failed attempts in all, when the first was, and the last one's error.
    attempts: u32,
    failing_since_ms: Option<i64>,
    last_error: Option<String>,
}

impl Task {
    fn new(planned: Planned) -> Self {
        Self {
            planned,
            version: 0,
            phase: Phase::Pending {
                only: None,
                exclude: BTreeSet::new(),
            },
            failures: BTreeMap::new(),
            rounds: 0,
            attempts: 0,
            failing_since_ms: None,
            last_error: None,
        }
    }

    /// Whether it keeps failing: it went round the slaves into the delay queue.
    fn failing(&self) -> bool {
        self.rounds > 0 || matches!(self.phase, Phase::Delayed { .. })
    }

    fn events(&self) -> u64 {
        self.planned.events / u64::from(self.planned.partitions.max(1))
    }
}

/// The task table of the active master.
#[derive(Clone, Debug)]
pub struct Table {
    tasks: BTreeMap<TaskKey, Task>,
    term: u64,
    counter: u64,
    last_version: u64,
    next_window_ms: i64,
    recent: BTreeMap<i64, u64>,
    /// Events each slave held for a degraded period when its task was last
    /// planned, by (period start, slave): a count that changes after the
    /// period's last window (late events, events handed between slaves) plans
    /// it again. Not persisted: a new master re-plans the previous period once.
    hours: BTreeMap<(i64, String), u64>,
    hot_gap_from_ms: Option<i64>,
    /// Slaves that could not be reached, and until when they get no new task.
    quarantine: BTreeMap<String, i64>,
    policy: FaultPolicy,
    /// The to-date spans tracked.
    to_date: ToDate,
}

impl Table {
    /// The table of a master in `term` (the leader Lease's term), resuming
    /// `snapshot`; open tasks wait for a slave again and get versions above
    /// anything an earlier master handed out.
    pub fn restore(snapshot: Snapshot, term: u64, first_window_ms: i64, policy: FaultPolicy) -> Self {
        // The last errors are in the previous master's report.
        let errors: BTreeMap<(Kind, i64), String> = snapshot
            .report
            .failing
            .iter()
            .filter_map(|w| Some(((Kind::parse(&w.kind)?, w.start_ms), w.error.clone())))
            .collect();
        let tasks = snapshot
            .open
            .into_iter()
            .map(|open| {
                let mut task = Task::new(open.planned);
                task.attempts = open.attempts;
                task.rounds = open.rounds;
                task.failing_since_ms = open.failing_since_ms;
                task.last_error = errors
                    .get(&(task.planned.key.kind, task.planned.key.start_ms))
                    .cloned();
                (task.planned.key.clone(), task)
            })
            .collect();
        Self {
            tasks,
            term,
            counter: 0,
            last_version: snapshot.last_version,
            next_window_ms: snapshot.next_window_ms.unwrap_or(first_window_ms),
            recent: snapshot.recent,
            hot_gap_from_ms: snapshot.hot_gap_from_ms,
            quarantine: BTreeMap::new(),
            hours: BTreeMap::new(),
            policy,
            to_date: snapshot.to_date,
        }
    }

    /// What a standby needs to resume.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            next_window_ms: Some(self.next_window_ms),
            last_version: self.last_version,
            open: self
                .tasks
                .values()
                .map(|t| OpenTask {
                    planned: t.planned.clone(),
                    version: t.version,
                    running_on: match &t.phase {
                        Phase::Running { slave, .. } => Some(slave.clone()),
                        _ => None,
                    },
                    attempts: t.attempts,
                    rounds: t.rounds,
                    failing_since_ms: t.failing_since_ms,
                })
                .collect(),
            recent: self.recent.clone(),
            hot_gap_from_ms: self.hot_gap_from_ms,
            losses: None,
            report: MasterReport::default(),
            sql: Vec::new(),
            to_date: self.to_date.clone(),
        }
    }

    /// First window not yet planned.
    pub fn next_window_ms(&self) -> i64 {
        self.next_window_ms
    }

    /// Plans window `[start, end)` holding `events` as `partitions` tasks (none when empty).
    pub fn plan_window(&mut self, start_ms: i64, end_ms: i64, events: u64, partitions: u32) {
        self.recent.insert(start_ms, events);
        if events > 0 {
            for partition in 0..partitions.max(1) {
                let planned = Planned {
                    key: TaskKey {
                        kind: Kind::Window,
                        start_ms,
                        partition,
                        pinned: None,
                    },
                    end_ms,
                    partitions: partitions.max(1),
                    events,
                };
                self.tasks.insert(planned.key.clone(), Task::new(planned));
            }
        }
        self.next_window_ms = self.next_window_ms.max(end_ms);
    }

    /// Windows closed lately, whose late events are still watched for.
    pub fn recent_windows(&self) -> Vec<i64> {
        self.recent.keys().copied().collect()
    }

    /// A recent window now holds `events`: if it gained late events since it
    /// was planned, it is planned again (its tasks recompute and overwrite the
    /// results under new versions). The events it gained, when it was.
    pub fn recheck(&mut self, start_ms: i64, end_ms: i64, events: u64, partitions: u32) -> Option<u64> {
        match self.recent.get(&start_ms) {
            Some(planned) if events > *planned => {
                let gained = events - planned;
                self.plan_window(start_ms, end_ms, events, partitions);
                Some(gained)
            }
            _ => None,
        }
    }

    /// Stops watching windows that started before `horizon_ms`.
    pub fn forget_before(&mut self, horizon_ms: i64) {
        self.recent = self.recent.split_off(&horizon_ms);
    }

    /// The hot MySQL is down: remembers the oldest window whose results may
    /// now reach the cache only (kept if already set).
    pub fn hot_gap_opens(&mut self) {
        if self.hot_gap_from_ms.is_none() {
            self.hot_gap_from_ms = Some(self.oldest_open_ms());
        }
    }

    /// Reopens the gap from `from_ms` (handing it back failed half way).
    pub fn hot_gap_opens_at(&mut self, from_ms: i64) {
        self.hot_gap_from_ms = Some(self.hot_gap_from_ms.map_or(from_ms, |f| f.min(from_ms)));
    }

    /// The hot MySQL is back: the windows `[from, to)` whose results reached
    /// the cache only, to plan again so that MySQL gets them too.
    pub fn hot_gap_closes(&mut self) -> Option<(i64, i64)> {
        let from = self.hot_gap_from_ms.take()?;
        Some((from, self.next_window_ms))
    }

    /// Passes window `[start, end)` without a task: its events went to the
    /// slaves' memory (KV-degraded) and are computed hourly.
    pub fn skip_window(&mut self, end_ms: i64) {
        self.next_window_ms = self.next_window_ms.max(end_ms);
        self.to_date.degraded(end_ms);
    }

    /// A closed degraded period `[hour, end)` in which `slave` now holds
    /// `events`: planned again when that differs from what its last task was
    /// planned with (late events arrived, or merchants were handed to or from
    /// it), so the period's results cover what is held now. True when planned.
    pub fn recount_hour(&mut self, hour_ms: i64, end_ms: i64, slave: &str, events: u64) -> bool {
        let key = (hour_ms, slave.to_owned());
        if self.hours.get(&key).copied().unwrap_or(0) == events {
            return false;
        }
        if events == 0 {
            // All handed away: the slave that holds them now writes those merchants' rows.
            self.hours.insert(key, 0);
            return false;
        }
        self.plan_hour(hour_ms, end_ms, slave, events);
        true
    }

    /// Stops watching degraded periods that started before `horizon_ms`.
    pub fn forget_hours_before(&mut self, horizon_ms: i64) {
        self.hours.retain(|(start, _), _| *start >= horizon_ms);
    }

    /// Plans (or widens) the hour-to-date task of `slave` for hour `[hour, end)`.
    /// An open one is widened, not duplicated: the next attempt covers more.
    pub fn plan_hour(&mut self, hour_ms: i64, end_ms: i64, slave: &str, events: u64) {
        self.hours.insert((hour_ms, slave.to_owned()), events);
        let key = TaskKey {
            kind: Kind::Hour,
            start_ms: hour_ms,
            partition: 0,
            pinned: Some(slave.to_owned()),
        };
        match self.tasks.get_mut(&key) {
            Some(task) => {
                task.planned.end_ms = task.planned.end_ms.max(end_ms);
                task.planned.events = events;
            }
            None => {
                let planned = Planned {
                    key: key.clone(),
                    end_ms,
                    partitions: 1,
                    events,
                };
                self.tasks.insert(key, Task::new(planned));
            }
        }
    }

    fn next_version(&mut self) -> u64 {
        self.counter += 1;
        let version =
            ((self.term & 0xFFFF_FFFF) << 32 | (self.counter & 0xFFFF_FFFF)).max(self.last_version + 1);
        self.last_version = version;
        version
    }

    /// Sends pending tasks (oldest first) to the slaves of `loads` (the live
    /// ones), each to the one with the earliest expected finish, until
    /// `max_in_flight` tasks run; delayed tasks whose time came are pending again.
    pub fn dispatch(
        &mut self,
        now_ms: i64,
        loads: &BTreeMap<String, SlaveView>,
        estimator: &Estimator,
        sql: u64,
        max_in_flight: usize,
    ) -> Vec<Dispatch> {
        // One pass: delayed tasks whose time came are pending again; this
        // master's outstanding work per slave; the oldest pending tasks, a few
        // more than may be sent now (some may wait for a particular slave).
        self.quarantine.retain(|_, until| *until > now_ms);
        let mut views = loads.clone();
        views.retain(|slave, _| !self.quarantine.contains_key(slave));
        let mut in_flight = 0;
        let mut pending: Vec<TaskKey> = Vec::new();
        for (key, task) in &mut self.tasks {
            if let Phase::Delayed { until_ms } = task.phase
                && until_ms <= now_ms
            {
                task.failures.clear();
                task.rounds += 1;
                task.phase = Phase::Pending {
                    only: None,
                    exclude: BTreeSet::new(),
                };
            }
            match &task.phase {
                Phase::Running {
                    slave, estimate_ms, ..
                } => {
                    in_flight += 1;
                    if let Some(view) = views.get_mut(slave) {
                        view.outstanding_ms += estimate_ms;
                        view.outstanding += 1;
                    }
                }
                Phase::Pending { .. } if pending.len() < max_in_flight + 64 => pending.push(key.clone()),
                _ => {}
            }
        }
        let typical = estimator.estimate(sql, 0).max(1.0);
        let mut out = Vec::new();
        for key in pending {
            if in_flight >= max_in_flight {
                break;
            }
            let Some(task) = self.tasks.get(&key) else {
                continue;
            };
            let estimate_ms = estimator.estimate(sql, task.events());
            let Phase::Pending { only, exclude } = &task.phase else {
                continue;
            };
            let target = match only.as_ref().or(key.pinned.as_ref()) {
                Some(slave) => views.contains_key(slave).then(|| slave.clone()),
                None => schedule::choose(&views, estimate_ms, typical, exclude).map(str::to_owned),
            };
            let Some(slave) = target else { continue };
            let version = self.next_version();
            let Some(task) = self.tasks.get_mut(&key) else {
                continue;
            };
            task.version = version;
            task.phase = Phase::Running {
                slave: slave.clone(),
                started_ms: now_ms,
                estimate_ms,
                end_ms: task.planned.end_ms,
            };
            if let Some(view) = views.get_mut(&slave) {
                view.outstanding_ms += estimate_ms;
                view.outstanding += 1;
            }
            in_flight += 1;
            out.push(Dispatch {
                planned: task.planned.clone(),
                version,
                slave,
                estimate_ms,
            });
        }
        out
    }

    /// Records the end of attempt `version` of `key` on `slave`.
    pub fn completed(
        &mut self,
        key: &TaskKey,
        version: u64,
        result: Result<(), Failure>,
        live_slaves: usize,
        now_ms: i64,
    ) -> Outcome {
        let Some(task) = self.tasks.get_mut(key) else {
            return Outcome::Stale;
        };
        let (slave, sent_end_ms) = match &task.phase {
            Phase::Running { slave, end_ms, .. } if task.version == version => (slave.clone(), *end_ms),
            _ => return Outcome::Stale,
        };
        let failure = match result {
            // Widened while it ran: what it computed is already short.
            Ok(()) if task.planned.end_ms > sent_end_ms => {
                task.phase = Phase::Pending {
                    only: None,
                    exclude: BTreeSet::new(),
                };
                return Outcome::Done;
            }
            Ok(()) => {
                self.tasks.remove(key);
                return Outcome::Done;
            }
            Err(failure) => failure,
        };
        *task.failures.entry(slave.clone()).or_default() += 1;
        task.attempts += 1;
        task.failing_since_ms.get_or_insert(now_ms);
        if failure == Failure::Unreachable {
            self.quarantine
                .insert(slave.clone(), now_ms + self.policy.quarantine_ms);
        }
        let failed = Failed {
            failures: &task.failures,
            slave: &slave,
            failure,
            pinned: key.pinned.is_some(),
            live_slaves,
            rounds: task.rounds,
        };
        let (phase, outcome) = match faults::on_failure(&self.policy, &failed, now_ms) {
            Action::Drop => {
                self.tasks.remove(key);
                return Outcome::Expired;
            }
            Action::Retry => (
                Phase::Pending {
                    only: Some(slave),
                    exclude: BTreeSet::new(),
                },
                Outcome::Retried,
            ),
            Action::Reassign { exclude } => (Phase::Pending { only: None, exclude }, Outcome::Reassigned),
            Action::Delay { until_ms } => (Phase::Delayed { until_ms }, Outcome::Delayed),
        };
        task.phase = phase;
        outcome
    }

    /// Moves tasks off slaves that left `live`, and off slaves where they hang;
    /// each will run elsewhere under a new version, so a late write from the
    /// old attempt is refused by the fence.
    pub fn watchdog(&mut self, now_ms: i64, live: &BTreeSet<String>) -> Vec<(TaskKey, Outcome)> {
        let mut out = Vec::new();
        for (key, task) in &mut self.tasks {
            let Phase::Running {
                slave,
                started_ms,
                estimate_ms,
                ..
            } = &task.phase
            else {
                continue;
            };
            let outcome = if !live.contains(slave) {
                Outcome::SlaveGone
            } else if faults::is_hung(&self.policy, *started_ms, *estimate_ms, now_ms) {
                Outcome::Hung
            } else {
                continue;
            };
            // A pinned task's data is only on its slave: it waits for it to return.
            let exclude = if key.pinned.is_some() {
                BTreeSet::new()
            } else {
                BTreeSet::from([slave.clone()])
            };
            task.phase = Phase::Pending { only: None, exclude };
            out.push((key.clone(), outcome));
        }
        out
    }

    /// Keeps the error of a failed attempt of `key`, for the report.
    pub fn note_error(&mut self, key: &TaskKey, error: &str) {
        if let Some(task) = self.tasks.get_mut(key) {
            task.last_error = Some(short_error(error));
        }
    }

    /// Windows (and hour tasks) that keep failing, one entry per span (its
    /// partitions together), for the master's report.
    pub fn failing(&self) -> Vec<FailingWindow> {
        let mut spans: BTreeMap<(Kind, i64), FailingWindow> = BTreeMap::new();
        for task in self.tasks.values().filter(|t| t.failing()) {
            let key = &task.planned.key;
            let since = task.failing_since_ms.unwrap_or_default();
            let entry = spans
                .entry((key.kind, key.start_ms))
                .or_insert_with(|| FailingWindow {
                    kind: key.kind.as_str().into(),
                    start_ms: key.start_ms,
                    end_ms: task.planned.end_ms,
                    attempts: 0,
                    since_ms: since,
                    error: String::new(),
                });
            entry.attempts += task.attempts;
            entry.since_ms = entry.since_ms.min(since);
            entry.end_ms = entry.end_ms.max(task.planned.end_ms);
            if entry.error.is_empty() {
                entry.error = task
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no error recorded".into());
            }
        }
        spans.into_values().collect()
    }

    /// Whether another window may be planned: the open tasks are bounded so
    /// that the persisted state always fits in its ConfigMap (see [`MAX_OPEN_TASKS`]).
    pub fn has_room(&self) -> bool {
        self.tasks.len() + MAX_TASKS_PER_WINDOW <= MAX_OPEN_TASKS
    }

    /// Tasks running now.
    pub fn in_flight(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t.phase, Phase::Running { .. }))
            .count()
    }

    /// Tasks planned and not finished.
    pub fn open(&self) -> usize {
        self.tasks.len()
    }

    /// Tasks in the delay queue.
    pub fn delayed(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t.phase, Phase::Delayed { .. }))
            .count()
    }

    /// Start of the oldest unfinished window (or the next to plan): how far behind the master is.
    pub fn oldest_open_ms(&self) -> i64 {
        self.tasks
            .keys()
            .filter(|k| k.kind == Kind::Window)
            .map(|k| k.start_ms)
            .min()
            .unwrap_or(self.next_window_ms)
    }

    /// Start of the oldest span the master may still compute: an open task
    /// (window or hour), a window watched for late events, or the next to plan.
    pub fn oldest_needed_ms(&self) -> i64 {
        let open = self.tasks.keys().map(|k| k.start_ms);
        let recent = self.recent.keys().copied();
        open.chain(recent).fold(self.next_window_ms, i64::min)
    }

    /// Hour tasks of `slave` still open.
    pub fn hour_open(&self, hour_ms: i64, slave: &str) -> bool {
        self.tasks
            .keys()
            .any(|k| k.kind == Kind::Hour && k.start_ms == hour_ms && k.pinned.as_deref() == Some(slave))
    }
}

#[cfg(test)]
mod tests;
