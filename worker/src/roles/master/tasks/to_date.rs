//! Exact to-date results in Normal mode: the current period (the policy's
//! granularity, an hour by default) and the current UTC day are computed by
//! the pipeline's SQL over all of their events so far, read from the KV
//! store's windows. Summing window rows would be wrong for every column that
//! does not add up (distinct users, averages, top items). Each is computed
//! again once it gained events and at least `every_ms` of windows since it
//! was last computed, always once it is whole, and at once when late events
//! fall in it; windows without events change nothing. A span that had windows while the KV store was down
//! is not computed from the KV store, which lacks those events: what the
//! slaves computed from memory stands. The decisions are pure; the table
//! carries them out.

use serde::{Deserialize, Serialize};

use super::super::plan::{partitions, period_of};
use super::{Kind, MAX_TASKS_PER_WINDOW, Planned, Table, Task, TaskKey};

use crate::results::cache::DAY_MS;

/// How often to-date results are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// Length of a period: the policy's granularity (at least a window).
    pub period_ms: i64,
    /// Least window time between two computations of a span to date (each
    /// reads the whole span so far); the one that completes it always runs.
    pub every_ms: i64,
}

/// One span tracked: where it starts, the events of its windows planned so
/// far, the end of its newest window planned, and how far its last task reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Track {
    /// Start of the span.
    pub start_ms: i64,
    /// Events of its windows planned so far.
    pub events: u64,
    /// End of its newest window planned.
    pub reached_ms: i64,
    /// End of the span its last task covers.
    pub planned_to_ms: i64,
    /// Events of the span when its last task was planned.
    #[serde(default)]
    pub events_planned: u64,
}

/// What the master tracks of to-date spans; persisted with its state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToDate {
    /// The current period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Track>,
    /// The period before it (late events compute it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_period: Option<Track>,
    /// The current day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<Track>,
    /// The day before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_day: Option<Track>,
    /// End of the last window whose events went to the slaves' memory (KV
    /// store down): a span starting before it is not computed from the KV store.
    #[serde(default)]
    pub degraded_until_ms: i64,
}

/// A to-date span to compute from the KV store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// `Hour` (a period) or `Day`.
    pub kind: Kind,
    /// Start of the span.
    pub start_ms: i64,
    /// End of the windows it covers so far.
    pub end_ms: i64,
    /// Events in it, for cutting it into tasks.
    pub events: u64,
}

/// One kind of span: its length, how often it is computed, where it is tracked.
struct Rule<'a> {
    kind: Kind,
    len_ms: i64,
    track: &'a mut Option<Track>,
    closed: &'a mut Option<Track>,
}

impl ToDate {
    /// Windows were planned (start, events; with `late`, the events they
    /// gained since), in time order: the spans to compute now. Pure.
    pub fn planned(
        &mut self,
        windows: &[(i64, u64)],
        window_ms: i64,
        cadence: Cadence,
        late: bool,
    ) -> Vec<Span> {
        let degraded_until = self.degraded_until_ms;
        let mut out = Vec::new();
        let rules = [
            Rule {
                kind: Kind::Hour,
                len_ms: cadence.period_ms.max(window_ms).max(1),
                track: &mut self.period,
                closed: &mut self.closed_period,
            },
            Rule {
                kind: Kind::Day,
                len_ms: DAY_MS,
                track: &mut self.day,
                closed: &mut self.closed_day,
            },
        ];
        for rule in rules {
            advance(
                rule,
                windows,
                window_ms,
                cadence.every_ms,
                late,
                degraded_until,
                &mut out,
            );
        }
        out
    }

    /// Windows up to `end_ms` went to the slaves' memory (the KV store is down).
    pub fn degraded(&mut self, end_ms: i64) {
        self.degraded_until_ms = self.degraded_until_ms.max(end_ms);
    }

    /// Start of the oldest window the KV store must keep for the spans still
    /// to compute (a refill after the store lost its data starts there).
    pub fn kv_needed_from(&self) -> Option<i64> {
        [self.day, self.period]
            .into_iter()
            .flatten()
            .filter(|t| t.start_ms >= self.degraded_until_ms)
            .map(|t| t.start_ms)
            .min()
    }
}

fn advance(
    rule: Rule<'_>,
    windows: &[(i64, u64)],
    window_ms: i64,
    every_ms: i64,
    late: bool,
    degraded_until: i64,
    out: &mut Vec<Span>,
) {
    let exact = |start: i64| start >= degraded_until;
    let mut force = false;
    for &(start, events) in windows {
        let span = period_of(start, rule.len_ms);
        match rule.track {
            Some(t) if span == t.start_ms => {
                t.events += events;
                t.reached_ms = t.reached_ms.max(start + window_ms);
                force |= late;
            }
            Some(t) if span < t.start_ms => {
                // Late events of the span before: computed again, whole.
                if let Some(c) = rule.closed.as_mut().filter(|c| c.start_ms == span) {
                    c.events += events;
                    if exact(span) {
                        out.push(Span {
                            kind: rule.kind,
                            start_ms: span,
                            end_ms: span + rule.len_ms,
                            events: c.events,
                        });
                    }
                }
            }
            _ => {
                // A new span: the one before is completed first, if it was not.
                if let Some(mut t) = rule.track.take() {
                    let end = t.start_ms + rule.len_ms;
                    if t.planned_to_ms < end && exact(t.start_ms) {
                        out.push(Span {
                            kind: rule.kind,
                            start_ms: t.start_ms,
                            end_ms: end,
                            events: t.events,
                        });
                    }
                    t.planned_to_ms = end;
                    *rule.closed = Some(t);
                }
                *rule.track = Some(Track {
                    start_ms: span,
                    events,
                    reached_ms: start + window_ms,
                    planned_to_ms: span,
                    events_planned: 0,
                });
            }
        }
    }
    let Some(t) = rule.track.as_mut() else { return };
    let whole = t.reached_ms >= t.start_ms + rule.len_ms;
    let gained = t.events > t.events_planned && t.reached_ms - t.planned_to_ms >= every_ms;
    let due = t.reached_ms > t.planned_to_ms && (whole || gained);
    if (due || (force && t.reached_ms > t.start_ms)) && exact(t.start_ms) {
        out.push(Span {
            kind: rule.kind,
            start_ms: t.start_ms,
            end_ms: t.reached_ms,
            events: t.events,
        });
        t.planned_to_ms = t.reached_ms;
        t.events_planned = t.events;
    }
}

impl Table {
    /// Plans the to-date spans due now that `windows` were planned (see [`ToDate::planned`]).
    pub fn plan_to_date(
        &mut self,
        windows: &[(i64, u64)],
        window_ms: i64,
        cadence: Cadence,
        late: bool,
        events_per_task: u64,
    ) {
        let most = u32::try_from(MAX_TASKS_PER_WINDOW).unwrap_or(u32::MAX);
        for span in self.to_date.planned(windows, window_ms, cadence, late) {
            self.plan_span(span, partitions(span.events, events_per_task, most));
        }
    }

    /// Plans `span` as `partitions` tasks. Open tasks of the span with the
    /// same cut are widened (one still running runs again once it finishes);
    /// a different cut replaces them (the versions fence what they write).
    fn plan_span(&mut self, span: Span, partitions: u32) {
        let open: Vec<TaskKey> = self
            .tasks
            .keys()
            .filter(|k| k.kind == span.kind && k.start_ms == span.start_ms && k.pinned.is_none())
            .cloned()
            .collect();
        let same_cut = !open.is_empty()
            && open.iter().all(|k| {
                self.tasks
                    .get(k)
                    .is_some_and(|t| t.planned.partitions == partitions)
            });
        if same_cut {
            for key in open {
                if let Some(task) = self.tasks.get_mut(&key) {
                    task.planned.end_ms = task.planned.end_ms.max(span.end_ms);
                    task.planned.events = span.events;
                }
            }
            return;
        }
        for key in open {
            self.tasks.remove(&key);
        }
        for partition in 0..partitions {
            let planned = Planned {
                key: TaskKey {
                    kind: span.kind,
                    start_ms: span.start_ms,
                    partition,
                    pinned: None,
                },
                end_ms: span.end_ms,
                partitions,
                events: span.events,
            };
            self.tasks.insert(planned.key.clone(), Task::new(planned));
        }
    }

    /// Start of the oldest window the KV store must keep for to-date spans.
    pub fn to_date_kv_needed_from(&self) -> Option<i64> {
        self.to_date.kv_needed_from()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 60_000;
    const H: i64 = 3_600_000;
    const CADENCE: Cadence = Cadence {
        period_ms: H,
        every_ms: 5 * W,
    };

    fn spans(t: &mut ToDate, windows: &[(i64, u64)], late: bool) -> Vec<(Kind, i64, i64)> {
        t.planned(windows, W, CADENCE, late)
            .into_iter()
            .map(|s| (s.kind, s.start_ms, s.end_ms))
            .collect()
    }

    /// `n` windows of `events` each from `start` on.
    fn run(start: i64, n: i64, events: u64) -> Vec<(i64, u64)> {
        (0..n).map(|i| (start + i * W, events)).collect()
    }

    #[test]
    fn a_span_is_computed_at_its_cadence_whole_and_at_once_for_late_events() {
        let mut t = ToDate::default();
        // (windows planned, late, spans due)
        type Case = (Vec<(i64, u64)>, bool, Vec<(Kind, i64, i64)>);
        let d = 20_000 * DAY_MS;
        let cases: Vec<Case> = vec![
            // One window: not yet the cadence.
            (run(d, 1, 5), false, vec![]),
            // Five windows since the spans started: both due.
            (
                run(d + W, 4, 5),
                false,
                vec![(Kind::Hour, d, d + 5 * W), (Kind::Day, d, d + 5 * W)],
            ),
            (run(d + 5 * W, 1, 1), false, vec![]),
            // Late events of a window of the current spans: both again at once.
            (
                vec![(d + W, 2)],
                true,
                vec![(Kind::Hour, d, d + 6 * W), (Kind::Day, d, d + 6 * W)],
            ),
            // The next period begins: the first is completed whole.
            (
                run(d + H, 1, 1),
                false,
                vec![(Kind::Hour, d, d + H), (Kind::Day, d, d + H + W)],
            ),
            // Late events of the closed period: it is computed whole again,
            // and the day they are part of.
            (
                vec![(d + 10 * W, 1)],
                true,
                vec![(Kind::Hour, d, d + H), (Kind::Day, d, d + H + W)],
            ),
            // The new period's event, at its cadence (empty windows move it on).
            (
                run(d + H + W, 5, 0),
                false,
                vec![(Kind::Hour, d + H, d + H + 6 * W)],
            ),
            // Windows without events change nothing.
            (run(d + H + 6 * W, 10, 0), false, vec![]),
        ];
        for (i, (windows, late, want)) in cases.into_iter().enumerate() {
            assert_eq!(spans(&mut t, &windows, late), want, "case {i}");
        }
        assert_eq!(t.period.map(|p| p.events), Some(1));
        assert_eq!(t.closed_period.map(|p| p.events), Some(29));
        assert_eq!(t.day.map(|p| p.events), Some(30));
    }

    #[test]
    fn the_last_window_of_a_day_completes_it_and_the_next_day_starts_afresh() {
        let d = 20_000 * DAY_MS;
        let mut t = ToDate::default();
        let last = d + DAY_MS - W;
        assert_eq!(
            spans(&mut t, &[(last - W, 1)], false),
            vec![(Kind::Hour, d + DAY_MS - H, last), (Kind::Day, d, last)]
        );
        // The day's last window makes it whole: computed whatever the cadence.
        assert_eq!(
            spans(&mut t, &[(last, 1)], false),
            vec![
                (Kind::Hour, d + DAY_MS - H, d + DAY_MS),
                (Kind::Day, d, d + DAY_MS)
            ]
        );
        // The next day's first window: not the whole day again.
        assert_eq!(spans(&mut t, &[(d + DAY_MS, 1)], false), vec![]);
        assert_eq!(t.closed_day.map(|c| c.start_ms), Some(d));
        assert_eq!(t.kv_needed_from(), Some(d + DAY_MS));
    }

    #[test]
    fn spans_the_kv_store_missed_while_down_are_not_computed_from_it() {
        let d = 20_000 * DAY_MS;
        let mut t = ToDate::default();
        assert_eq!(spans(&mut t, &run(d, 1, 1), false), vec![]);
        // Windows of this period and day went to the slaves' memory.
        t.degraded(d + 30 * W);
        assert_eq!(spans(&mut t, &run(d + 30 * W, 10, 1), false), vec![]);
        assert_eq!(t.kv_needed_from(), None);
        // The next period is whole in the KV store again; the day is not.
        assert_eq!(
            spans(&mut t, &run(d + H, 5, 1), false),
            vec![(Kind::Hour, d + H, d + H + 5 * W)]
        );
        assert_eq!(t.kv_needed_from(), Some(d + H));
    }

    #[test]
    fn a_span_planned_again_widens_its_open_tasks_or_replaces_a_different_cut() {
        let mut table = Table::restore(
            super::super::Snapshot::default(),
            1,
            0,
            super::super::FaultPolicy::default(),
        );
        let span = |end_ms, events| Span {
            kind: Kind::Day,
            start_ms: 0,
            end_ms,
            events,
        };
        table.plan_span(span(W, 10), 2);
        table.plan_span(span(2 * W, 20), 2);
        let cut = |table: &Table| -> Vec<(u32, u32, i64)> {
            table
                .tasks
                .values()
                .map(|t| (t.planned.key.partition, t.planned.partitions, t.planned.end_ms))
                .collect()
        };
        assert_eq!(cut(&table), vec![(0, 2, 2 * W), (1, 2, 2 * W)]);
        table.plan_span(span(3 * W, 300), 3);
        assert_eq!(cut(&table), vec![(0, 3, 3 * W), (1, 3, 3 * W), (2, 3, 3 * W)]);
    }
}
