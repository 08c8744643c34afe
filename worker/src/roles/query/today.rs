//! The "today" answer for one merchant: the window series and the hourly
//! series of every column the pipeline's SQL produces, as stored, with the
//! response contract. Built by a pure function from what the stores held.

use serde::Serialize;
use serde_json::{Map, Value};

use super::contract::{Completeness, ModeOf, Source};
use super::read::Day;
use crate::results::Granularity;

/// One point of a series.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Start of the window or hour, in ms since the Unix epoch.
    pub start_ms: i64,
    /// End (exclusive).
    pub end_ms: i64,
    /// Every column the SQL produced for this merchant, as stored (`_sql`
    /// names the SQL version that computed it).
    pub metrics: Map<String, Value>,
}

/// A merchant's day so far.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Today {
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
    /// One point per window with results, oldest first.
    pub windows: Vec<Point>,
    /// One point per hour computed as a whole (while the KV store was
    /// degraded, results are hourly), oldest first.
    pub hours: Vec<Point>,
}

/// The series of a day's stored results. Pure.
pub struct Series {
    /// Window points.
    pub windows: Vec<Point>,
    /// Hour points.
    pub hours: Vec<Point>,
    /// Sorted union of the columns.
    pub columns: Vec<String>,
    /// End of the newest point.
    pub as_of_ms: Option<i64>,
}

/// Cuts a day's results into its window and hour series. Pure.
pub fn series(day: &Day, window_ms: i64) -> Series {
    let mut windows = Vec::new();
    let mut hours = Vec::new();
    let mut columns = std::collections::BTreeSet::new();
    for ((granularity, start), stored) in day {
        let (length, into) = match granularity {
            Granularity::Window => (window_ms, &mut windows),
            Granularity::Hour => (3_600_000, &mut hours),
        };
        columns.extend(stored.metrics.keys().cloned());
        into.push(Point {
            start_ms: *start,
            end_ms: start + length,
            metrics: stored.metrics.clone(),
        });
    }
    let as_of_ms = windows.iter().chain(&hours).map(|p| p.end_ms).max();
    Series {
        windows,
        hours,
        columns: columns.into_iter().collect(),
        as_of_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Stored;
    use serde_json::json;

    fn stored(metrics: Value) -> Stored {
        Stored {
            version: 1,
            metrics: metrics.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn a_day_splits_into_sorted_window_and_hour_series_with_every_column() {
        let day: Day = [
            (
                (Granularity::Window, 120_000),
                stored(json!({"gmv": 2, "top": "a"})),
            ),
            ((Granularity::Window, 60_000), stored(json!({"gmv": 1}))),
            (
                (Granularity::Hour, 3_600_000),
                stored(json!({"gmv": 9, "users": 3})),
            ),
        ]
        .into();
        let s = series(&day, 60_000);
        let starts: Vec<i64> = s.windows.iter().map(|p| p.start_ms).collect();
        assert_eq!(starts, vec![60_000, 120_000]);
        assert_eq!(s.windows[1].end_ms, 180_000);
        assert_eq!(s.hours.len(), 1);
        assert_eq!(s.hours[0].end_ms, 7_200_000);
        assert_eq!(s.columns, vec!["gmv", "top", "users"]);
        assert_eq!(s.as_of_ms, Some(7_200_000));
        let empty = series(&Day::new(), 60_000);
        assert!(empty.windows.is_empty() && empty.as_of_ms.is_none());
    }
}
