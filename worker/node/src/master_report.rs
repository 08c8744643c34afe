//! What the active master reports about its pipeline's computation, for the
//! operator (a condition, an Event) and for the people and services reading
//! results: windows that keep failing, and slave memory lost. The master
//! writes it beside its task state, under [`KEY`]; it is bounded, so the
//! object stays small whatever happens.

use serde::{Deserialize, Serialize};

/// The key of the master state ConfigMap holding the report.
pub const KEY: &str = "report.json";

/// Most windows named, and most losses kept.
pub const MAX_ENTRIES: usize = 20;

/// Longest error text kept per window: enough to act on, small enough for an object.
pub const MAX_ERROR_CHARS: usize = 300;

/// The master's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MasterReport {
    /// Windows failing now, oldest first (at most [`MAX_ENTRIES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<FailingWindow>,
    /// How many windows fail in all (the list may name fewer).
    #[serde(default)]
    pub failing_total: u64,
    /// Slave memory lost lately, oldest first (at most [`MAX_ENTRIES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub losses: Vec<MemoryLoss>,
    /// The master holds as many open tasks as its state may: it plans no
    /// new window until failing ones finish (results stop advancing).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plan_full: bool,
    /// The SQLs windows are computed with, each from its first window on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sql: Vec<SqlInUse>,
    /// The SQL last published that the master refused to adopt (it does
    /// not plan against the source tables), with why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_refused: Option<SqlRefused>,
}

/// A SQL the master computes windows with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlInUse {
    /// Its identity.
    pub id: String,
    /// Start of the first window it computes, Unix milliseconds.
    pub from_ms: i64,
}

/// A published SQL the master refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqlRefused {
    /// Its identity.
    pub id: String,
    /// Why (the planner's error, at most [`MAX_ERROR_CHARS`]).
    pub error: String,
}

/// A window that keeps failing: the same type the pipeline's status names them by.
pub use ballast_crds::FailingWindow;

/// A slave process gone with events it held in memory (KV store down).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryLoss {
    /// The slave.
    pub slave: String,
    /// `left` (out of the membership past the grace) or `restarted`.
    pub cause: String,
    /// Events it held, now lost (0: it held nothing, or handed all over).
    pub events: u64,
    /// Start of the oldest window among them, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
    /// When the master saw it go, Unix milliseconds.
    pub at_ms: i64,
}

impl MasterReport {
    /// Records a loss, forgetting the oldest past [`MAX_ENTRIES`].
    pub fn record_loss(&mut self, loss: MemoryLoss) {
        self.losses.push(loss);
        let over = self.losses.len().saturating_sub(MAX_ENTRIES);
        self.losses.drain(..over);
    }

    /// Sets the failing windows from all of them (any order).
    pub fn set_failing(&mut self, mut all: Vec<FailingWindow>) {
        all.sort_by_key(|w| (w.start_ms, w.kind.clone()));
        self.failing_total = all.len() as u64;
        all.truncate(MAX_ENTRIES);
        self.failing = all;
    }

    /// A sentence naming the failing windows (at most three) and their
    /// errors, or `None` when none fails.
    pub fn failing_summary(&self) -> Option<String> {
        if self.failing_total == 0 && !self.plan_full {
            return None;
        }
        let named: Vec<String> = self
            .failing
            .iter()
            .take(3)
            .map(|w| {
                format!(
                    "{} {}..{} ({} attempts since {}): {}",
                    w.kind,
                    timestamp(w.start_ms),
                    timestamp(w.end_ms),
                    w.attempts,
                    timestamp(w.since_ms),
                    w.error
                )
            })
            .collect();
        let more = self.failing_total.saturating_sub(named.len() as u64);
        let tail = if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        };
        let full = if self.plan_full {
            "; the plan is full, so no new window is planned until these finish"
        } else {
            ""
        };
        Some(format!(
            "{} failing: {}{tail}{full}",
            plural(self.failing_total, "window"),
            named.join("; ")
        ))
    }
}

/// `error` cut to [`MAX_ERROR_CHARS`] characters.
pub fn short_error(error: &str) -> String {
    match error.char_indices().nth(MAX_ERROR_CHARS) {
        Some((at, _)) => format!("{}...", &error[..at]),
        None => error.to_owned(),
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn timestamp(ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(start_ms: i64) -> FailingWindow {
        FailingWindow {
            kind: "window".into(),
            start_ms,
            end_ms: start_ms + 60_000,
            attempts: 4,
            since_ms: start_ms + 70_000,
            error: "decoding: bad".into(),
        }
    }

    #[test]
    fn the_summary_names_the_oldest_windows_and_counts_the_rest() {
        let mut report = MasterReport::default();
        assert_eq!(report.failing_summary(), None);
        report.set_failing(vec![failing(120_000), failing(0)]);
        assert_eq!(
            report.failing_summary().as_deref(),
            Some(
                "2 windows failing: window 1970-01-01T00:00:00Z..1970-01-01T00:01:00Z (4 attempts since 1970-01-01T00:01:10Z): decoding: bad; \
                 window 1970-01-01T00:02:00Z..1970-01-01T00:03:00Z (4 attempts since 1970-01-01T00:03:10Z): decoding: bad"
            )
        );
        report.set_failing((0..30).map(|i| failing(i * 60_000)).collect());
        assert_eq!((report.failing.len(), report.failing_total), (MAX_ENTRIES, 30));
        assert!(
            report
                .failing_summary()
                .is_some_and(|s| s.starts_with("30 windows failing") && s.ends_with("and 27 more"))
        );
    }

    #[test]
    fn losses_and_errors_stay_bounded() {
        let mut report = MasterReport::default();
        for i in 0..25 {
            report.record_loss(MemoryLoss {
                slave: format!("s-{i}"),
                cause: "left".into(),
                events: i,
                since_ms: None,
                at_ms: 0,
            });
        }
        assert_eq!(report.losses.len(), MAX_ENTRIES);
        assert_eq!(report.losses[0].slave, "s-5");
        let long = "é".repeat(500);
        assert_eq!(short_error(&long).chars().count(), MAX_ERROR_CHARS + 3);
        assert_eq!(short_error("short"), "short");
    }
}
