//! Whether a day can be rolled into the cold store, and its rollups: one per
//! merchant, from the day's own result (the pipeline's SQL over the whole
//! day, exact for every column) or, on a day the KV store was down, from its
//! hours and windows added up (and marked hourly only: the columns that do
//! not add up may be off). Pure.

use std::collections::{BTreeMap, BTreeSet};

use ballast_crds::analytics_pipeline::FailingWindow;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::cold::{Day, Rollup};
use crate::compute::output::FROM_COLUMN;
use crate::results::Granularity;
use crate::results::cache::DAY_MS;
use crate::results::days::DayResult;

/// Why a day was not rolled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "reason")]
pub enum NotRolled {
    /// Late events may still change it: it ends within the lateness.
    NotClosed,
    /// A window (or hour, or the day) of it keeps failing to compute.
    Failing {
        /// `window`, `hour` or `day`.
        kind: String,
        /// Its start, in ms.
        start_ms: i64,
        /// The last attempt's error.
        error: String,
    },
    /// The KV store holds events of a window that has no result.
    MissingWindow {
        /// The window's start, in ms.
        start_ms: i64,
        /// Events the KV store holds for it.
        events: u64,
    },
}

/// Whether `day` can be rolled now: closed past the lateness, and no span
/// of it failing. Pure.
pub fn rollable(day: Day, now_ms: i64, lateness_ms: i64, failing: &[FailingWindow]) -> Result<(), NotRolled> {
    let (start, end) = (day.start_ms(), day.start_ms() + DAY_MS);
    if end + lateness_ms > now_ms {
        return Err(NotRolled::NotClosed);
    }
    match failing.iter().find(|f| f.start_ms < end && f.end_ms > start) {
        Some(f) => Err(NotRolled::Failing {
            kind: f.kind.clone(),
            start_ms: f.start_ms,
            error: f.error.clone(),
        }),
        None => Ok(()),
    }
}

/// The first window the KV store holds events of (`counts`: window start
/// and events) that has no result, outside the hours computed from the
/// slaves' memory (their windows' events went there, not to a window task). Pure.
pub fn missing_window(results: &[DayResult], counts: &[(i64, u64)], period_ms: i64) -> Option<NotRolled> {
    let windows: BTreeSet<i64> = results
        .iter()
        .filter(|r| r.granularity == Granularity::Window)
        .map(|r| r.start_ms)
        .collect();
    let memory_hours: BTreeSet<i64> = results
        .iter()
        .filter(|r| r.granularity == Granularity::Hour && from_memory(&r.stored.metrics))
        .map(|r| r.start_ms)
        .collect();
    counts
        .iter()
        .filter(|(start, events)| *events > 0 && !windows.contains(start))
        .find(|(start, _)| !memory_hours.contains(&(start - start.rem_euclid(period_ms))))
        .map(|(start, events)| NotRolled::MissingWindow {
            start_ms: *start,
            events: *events,
        })
}

fn from_memory(metrics: &Map<String, Value>) -> bool {
    metrics.get(FROM_COLUMN).and_then(Value::as_str) == Some("memory")
}

/// The rollups of a day's results, one per merchant; `shed` says whether
/// the backup intake shed a merchant that day. Pure.
pub fn rollups(day: Day, results: &[DayResult], period_ms: i64, shed: impl Fn(&str) -> bool) -> Vec<Rollup> {
    let mut by_merchant: BTreeMap<&str, Vec<&DayResult>> = BTreeMap::new();
    for r in results {
        by_merchant.entry(&r.merchant).or_default().push(r);
    }
    by_merchant
        .into_iter()
        .map(|(merchant, results)| {
            let whole = results
                .iter()
                .find(|r| r.granularity == Granularity::Day && r.start_ms == day.start_ms());
            let memory = results
                .iter()
                .any(|r| r.granularity == Granularity::Hour && from_memory(&r.stored.metrics));
            let (metrics, hourly_only) = match whole {
                Some(whole) if !memory => (whole.stored.metrics.clone(), false),
                _ => (added_up(&results, period_ms), true),
            };
            Rollup {
                merchant: merchant.to_owned(),
                day,
                shed: shed(merchant),
                hourly_only,
                metrics,
            }
        })
        .collect()
}

/// A day's metrics added up from its periods: each period's own result
/// (exact) where it has one from the KV store; where it was computed from
/// the slaves' memory, that result plus its windows (their events were in
/// the KV store); where it has none, its windows. Numbers add; any other
/// value is the latest period's.
fn added_up(results: &[&DayResult], period_ms: i64) -> Map<String, Value> {
    let mut periods: BTreeMap<i64, (Option<&DayResult>, Vec<&DayResult>)> = BTreeMap::new();
    for r in results {
        let period = r.start_ms - r.start_ms.rem_euclid(period_ms);
        match r.granularity {
            Granularity::Hour => periods.entry(r.start_ms).or_default().0 = Some(r),
            Granularity::Window => periods.entry(period).or_default().1.push(r),
            Granularity::Day => {}
        }
    }
    let mut out = Map::new();
    for (hour, windows) in periods.values() {
        let parts: Vec<&DayResult> = match hour {
            Some(h) if from_memory(&h.stored.metrics) => {
                std::iter::once(*h).chain(windows.iter().copied()).collect()
            }
            Some(h) => vec![*h],
            None => windows.clone(),
        };
        for part in parts {
            add(&mut out, &part.stored.metrics);
        }
    }
    out
}

fn add(into: &mut Map<String, Value>, metrics: &Map<String, Value>) {
    for (k, v) in metrics {
        let sum = match (into.get(k), v) {
            (Some(Value::Number(a)), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
                (Some(a), Some(b)) => a.checked_add(b).map(Value::from),
                _ => None,
            }
            .or_else(|| {
                let f = a.as_f64()? + b.as_f64()?;
                serde_json::Number::from_f64(f).map(Value::Number)
            }),
            _ => None,
        };
        into.insert(k.clone(), sum.unwrap_or_else(|| v.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Stored;
    use serde_json::json;

    const H: i64 = 3_600_000;

    fn day() -> Day {
        Day::parse("2026-11-28").unwrap_or(Day(0))
    }

    fn result(merchant: &str, granularity: Granularity, offset_ms: i64, metrics: Value) -> DayResult {
        DayResult {
            merchant: merchant.into(),
            granularity,
            start_ms: day().start_ms() + offset_ms,
            stored: Stored {
                version: 1,
                metrics: metrics.as_object().cloned().unwrap_or_default(),
            },
        }
    }

    fn failing(start_ms: i64, end_ms: i64) -> FailingWindow {
        FailingWindow {
            kind: "window".into(),
            start_ms,
            end_ms,
            attempts: 3,
            since_ms: 0,
            error: "undecodable event".into(),
        }
    }

    #[test]
    fn a_day_is_rolled_once_closed_past_the_lateness_and_nothing_of_it_fails() {
        let end = day().start_ms() + DAY_MS;
        let lateness = 120_000;
        let within = failing(end - 60_000, end);
        let next_day = failing(end, end + 60_000);
        let cases: [(i64, Vec<FailingWindow>, Result<(), NotRolled>); 4] = [
            (end + lateness, vec![next_day.clone()], Ok(())),
            (end + lateness - 1, vec![], Err(NotRolled::NotClosed)),
            (
                end + lateness,
                vec![within.clone()],
                Err(NotRolled::Failing {
                    kind: "window".into(),
                    start_ms: within.start_ms,
                    error: "undecodable event".into(),
                }),
            ),
            (end + 10 * lateness, vec![next_day], Ok(())),
        ];
        for (now, failing, want) in cases {
            assert_eq!(rollable(day(), now, lateness, &failing), want, "now {now}");
        }
    }

    #[test]
    fn a_window_with_events_and_no_result_is_missing_unless_its_hour_came_from_memory() {
        let w = |offset| day().start_ms() + offset;
        let results = vec![
            result("m1", Granularity::Window, 0, json!({"orders": 1})),
            result(
                "m1",
                Granularity::Hour,
                2 * H,
                json!({"orders": 4, "_from": "memory"}),
            ),
        ];
        // (KV counts, missing)
        let cases = [
            (vec![(w(0), 3)], None),
            // Events went to memory in hour 2: no window result expected.
            (vec![(w(0), 3), (w(2 * H + 60_000), 5)], None),
            (vec![(w(60_000), 0)], None),
            (
                vec![(w(0), 3), (w(H + 60_000), 7)],
                Some(NotRolled::MissingWindow {
                    start_ms: w(H + 60_000),
                    events: 7,
                }),
            ),
        ];
        for (counts, want) in cases {
            assert_eq!(missing_window(&results, &counts, H), want, "{counts:?}");
        }
    }

    #[test]
    fn a_day_rolls_from_its_own_result_or_adds_up_its_periods_when_the_kv_store_was_down() {
        let results = vec![
            // m1: the day's own result, exact.
            result(
                "m1",
                Granularity::Day,
                0,
                json!({"orders": 9, "users": 4, "_sql": "a"}),
            ),
            result("m1", Granularity::Window, 0, json!({"orders": 9, "users": 4})),
            // m2: hour 0 from the KV store; hour 1 from memory plus a window of it.
            result("m2", Granularity::Day, 0, json!({"orders": 3, "users": 2})),
            result(
                "m2",
                Granularity::Hour,
                0,
                json!({"orders": 3, "users": 2, "top": "a"}),
            ),
            result(
                "m2",
                Granularity::Window,
                60_000,
                json!({"orders": 3, "users": 2}),
            ),
            result(
                "m2",
                Granularity::Hour,
                H,
                json!({"orders": 5, "users": 1.5, "top": "b", "_from": "memory"}),
            ),
            result("m2", Granularity::Window, H, json!({"orders": 2, "users": 1})),
        ];
        let rolled = rollups(day(), &results, H, |m| m == "m2");
        assert_eq!(rolled.len(), 2);
        assert_eq!((rolled[0].shed, rolled[0].hourly_only), (false, false));
        assert_eq!(rolled[0].metrics["orders"], 9);
        assert_eq!((rolled[1].shed, rolled[1].hourly_only), (true, true));
        assert_eq!(
            rolled[1].metrics["orders"], 10,
            "3 from hour 0, 5 + 2 from hour 1"
        );
        assert_eq!(
            rolled[1].metrics["users"], 4.5,
            "2 + 1.5 + 1: added up, whatever they mean"
        );
        assert_eq!(rolled[1].metrics["top"], "b", "a keyword is the latest period's");
    }
}
