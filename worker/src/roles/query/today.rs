//! The "today" answer for one merchant: the window series, the hourly
//! series and the day to date of every column the pipeline's SQL produces,
//! as stored, with the response contract. The series pass the stored metrics JSON through
//! unparsed (checked, and its keys read, when it was read from the store):
//! parsing and re-serialising every window's metrics was most of an answer's cost.

use std::fmt::Write as _;

use serde::Serialize;

use super::contract::{Completeness, ModeOf, Source};
use super::read::Day;
use crate::compute::output::THROUGH_COLUMN;
use crate::results::Granularity;

/// Everything a "today" answer says besides its series.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TodayHead {
    /// The merchant.
    pub merchant: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Which store answered.
    pub source: Source,
    /// End of the newest window or hour included (ms), if any.
    pub as_of_ms: Option<i64>,
    /// The published mode of every dependency when this was answered.
    pub modes: Vec<ModeOf>,
    /// Complete, or partial with each reason and the range it covers.
    pub completeness: Completeness,
    /// Length of a window, in seconds.
    pub window_seconds: i64,
    /// Every result column present in the series, sorted.
    pub columns: Vec<String>,
}

/// One point of a series: `{startMs, endMs, metrics}`, the metrics as stored
/// (every column the SQL produced; `_sql` names the SQL version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point<'a> {
    /// Start of the window or hour, in ms since the Unix epoch.
    pub start_ms: i64,
    /// End (exclusive).
    pub end_ms: i64,
    /// The metrics object, as JSON text.
    pub metrics: &'a str,
}

/// The series of a day's stored results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series<'a> {
    /// One point per window with results, oldest first.
    pub windows: Vec<Point<'a>>,
    /// One point per hour (the policy's period) to date, oldest first: the
    /// SQL over all of its events, exact for every column.
    pub hours: Vec<Point<'a>>,
    /// The day to date: the SQL over all of its events so far, if computed.
    pub day: Option<Point<'a>>,
    /// Sorted union of the columns.
    pub columns: Vec<String>,
    /// End of the newest point.
    pub as_of_ms: Option<i64>,
}

/// Cuts a day's results into its window and hour series; `period_ms` is
/// the length of a degraded-mode period (the policy's `granularitySeconds`,
/// an hour by default). Pure.
pub fn series(day: &Day, window_ms: i64, period_ms: i64) -> Series<'_> {
    let mut windows = Vec::new();
    let mut hours = Vec::new();
    let mut whole_day = None;
    let mut columns = std::collections::BTreeSet::new();
    for ((granularity, start), stored) in day {
        columns.extend(stored.columns.iter().map(String::as_str));
        let point = |length: i64| Point {
            start_ms: *start,
            end_ms: start + length,
            metrics: &stored.metrics,
        };
        match granularity {
            Granularity::Window => windows.push(point(window_ms)),
            Granularity::Hour => hours.push(to_date(point(period_ms), stored)),
            Granularity::Day => {
                whole_day = Some(to_date(point(crate::results::cache::DAY_MS), stored));
            }
        }
    }
    let as_of_ms = windows
        .iter()
        .chain(&hours)
        .chain(&whole_day)
        .map(|p| p.end_ms)
        .max();
    Series {
        windows,
        hours,
        day: whole_day,
        columns: columns.into_iter().map(str::to_owned).collect(),
        as_of_ms,
    }
}

/// A to-date point ends where its result says it reaches (`_throughMs`),
/// within its span; a result without it (computed before it was recorded)
/// covers the whole span. Only the to-date points are parsed for it: a day
/// has a few dozen of them at most.
fn to_date<'a>(mut point: Point<'a>, stored: &crate::results::StoredText) -> Point<'a> {
    if stored.columns.iter().any(|c| c == THROUGH_COLUMN)
        && let Ok(metrics) =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&stored.metrics)
        && let Some(through) = metrics.get(THROUGH_COLUMN).and_then(serde_json::Value::as_i64)
    {
        point.end_ms = through.clamp(point.start_ms, point.end_ms);
    }
    point
}

/// The answer's JSON: the head as serde writes it, then `windows`, `hours`
/// and `day` with each point's stored metrics spliced in as they are. Pure.
pub fn render(head: &TodayHead, series: &Series<'_>) -> Result<String, serde_json::Error> {
    let mut out = serde_json::to_string(head)?;
    // The head is a non-empty object: its closing brace moves past the series.
    out.pop();
    out.push_str(",\"windows\":");
    points(&mut out, &series.windows);
    out.push_str(",\"hours\":");
    points(&mut out, &series.hours);
    out.push_str(",\"day\":");
    match &series.day {
        Some(p) => point(&mut out, p),
        None => out.push_str("null"),
    }
    out.push('}');
    Ok(out)
}

fn points(out: &mut String, points: &[Point<'_>]) {
    out.push('[');
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        point(out, p);
    }
    out.push(']');
}

fn point(out: &mut String, p: &Point<'_>) {
    let _ = write!(
        out,
        "{{\"startMs\":{},\"endMs\":{},\"metrics\":{}}}",
        p.start_ms, p.end_ms, p.metrics
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::StoredText;
    use serde_json::{Value, json};

    fn stored(metrics: Value) -> StoredText {
        StoredText::checked(1, metrics.to_string()).unwrap_or_else(|e| StoredText {
            version: 0,
            metrics: e,
            columns: Vec::new(),
        })
    }

    fn day() -> Day {
        [
            (
                (Granularity::Window, 120_000),
                stored(json!({"gmv": 2, "top": "a,\"b\""})),
            ),
            ((Granularity::Window, 60_000), stored(json!({"gmv": 1}))),
            (
                (Granularity::Hour, 3_600_000),
                stored(json!({"gmv": 9, "users": 3})),
            ),
            (
                (Granularity::Hour, 0),
                stored(json!({"gmv": 3, "users": 2, "_throughMs": 180_000})),
            ),
            (
                (Granularity::Day, 0),
                stored(json!({"gmv": 12, "users": 4, "_throughMs": 4_000_000})),
            ),
        ]
        .into()
    }

    #[test]
    fn a_day_splits_into_sorted_window_and_hour_series_with_every_column() {
        let day = day();
        let s = series(&day, 60_000, 3_600_000);
        let starts: Vec<i64> = s.windows.iter().map(|p| p.start_ms).collect();
        assert_eq!(starts, vec![60_000, 120_000]);
        assert_eq!(s.windows[1].end_ms, 180_000);
        let hours: Vec<(i64, i64)> = s.hours.iter().map(|p| (p.start_ms, p.end_ms)).collect();
        // A to-date hour ends where it reaches; one that does not say, at the period's end.
        assert_eq!(hours, vec![(0, 180_000), (3_600_000, 7_200_000)]);
        assert_eq!(
            s.day.as_ref().map(|p| (p.start_ms, p.end_ms)),
            Some((0, 4_000_000))
        );
        assert_eq!(s.columns, vec!["_throughMs", "gmv", "top", "users"]);
        assert_eq!(s.as_of_ms, Some(7_200_000));
        let half_hours = series(&day, 60_000, 1_800_000);
        assert_eq!(
            half_hours.hours[1].end_ms, 5_400_000,
            "the policy's period, not an hour"
        );
        let empty = Day::new();
        let empty = series(&empty, 60_000, 3_600_000);
        assert!(empty.windows.is_empty() && empty.as_of_ms.is_none());
    }

    #[test]
    fn the_rendered_answer_is_the_json_serde_would_write() {
        let day = day();
        let s = series(&day, 60_000, 3_600_000);
        let head = TodayHead {
            merchant: "m\"1".into(),
            day: "2024-10-04".into(),
            source: Source::Cache,
            as_of_ms: s.as_of_ms,
            modes: Vec::new(),
            completeness: Completeness::of(Vec::new()),
            window_seconds: 60,
            columns: s.columns.clone(),
        };
        let point = |p: &Point<'_>| {
            json!({"startMs": p.start_ms, "endMs": p.end_ms,
                   "metrics": serde_json::from_str::<Value>(p.metrics).unwrap_or_default()})
        };
        let mut want = serde_json::to_value(&head).unwrap_or_default();
        want["windows"] = Value::Array(s.windows.iter().map(point).collect());
        want["hours"] = Value::Array(s.hours.iter().map(point).collect());
        want["day"] = s.day.as_ref().map(point).unwrap_or_default();
        let got: Value = render(&head, &s)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        assert_eq!(got, want);
        let none = Day::new();
        let none = render(&head, &series(&none, 60_000, 3_600_000)).unwrap_or_default();
        assert!(
            none.ends_with(r#","windows":[],"hours":[],"day":null}"#),
            "{none}"
        );
    }
}
