//! What the master persists of its task table, for a standby to resume:
//! the open tasks (what each covers, its version, its failure history) and
//! the planning position. Plain data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Which granularity a task computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One window, from the KV store.
    Window,
    /// A period (an hour by default) to date: from one slave's memory in
    /// KV-degraded mode (pinned to it), from the KV store otherwise.
    Hour,
    /// A UTC day to date, from the KV store.
    Day,
}

impl Kind {
    /// The name task ids and reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Window => "window",
            Kind::Hour => "hour",
            Kind::Day => "day",
        }
    }

    /// The kind named `name` (as [`Self::as_str`] gives it).
    pub fn parse(name: &str) -> Option<Self> {
        [Kind::Window, Kind::Hour, Kind::Day]
            .into_iter()
            .find(|k| k.as_str() == name)
    }
}

/// Identifies a task across attempts and masters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskKey {
    /// Granularity.
    pub kind: Kind,
    /// Start of the window or hour.
    pub start_ms: i64,
    /// Merchant partition (window tasks).
    pub partition: u32,
    /// The slave whose memory holds the data (hour tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

impl TaskKey {
    /// `<kind>/<start>/<partition or slave>`.
    pub fn id(&self) -> String {
        let kind = self.kind.as_str();
        match &self.pinned {
            Some(slave) => format!("{kind}/{}/{slave}", self.start_ms),
            None => format!("{kind}/{}/{}", self.start_ms, self.partition),
        }
    }
}

/// A planned task: what it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Planned {
    /// The task.
    pub key: TaskKey,
    /// End of the span (exclusive).
    pub end_ms: i64,
    /// Partitions of its window.
    pub partitions: u32,
    /// Events in the span when planned (of the whole window): for the estimate.
    pub events: u64,
}

/// An open task as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenTask {
    /// What it covers.
    #[serde(flatten)]
    pub planned: Planned,
    /// Its latest version.
    pub version: u64,
    /// The slave running it, if any (for people and tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_on: Option<String>,
    /// Failed attempts so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Times it went to the delay queue: a task delayed once keeps failing.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rounds: u32,
    /// When it first failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<i64>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the master persists: enough for a standby to resume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// First window not yet planned: every earlier one is planned (and done unless open).
    pub next_window_ms: Option<i64>,
    /// The highest version handed out.
    pub last_version: u64,
    /// Tasks planned and not finished.
    pub open: Vec<OpenTask>,
    /// Windows closed lately and the events they held when planned: a window
    /// that gains late events within the lateness horizon is computed again.
    #[serde(default)]
    pub recent: BTreeMap<i64, u64>,
    /// While the hot MySQL is down results reach the cache only: windows from
    /// this one on are computed again when it returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_gap_from_ms: Option<i64>,
    /// The slave memory account, as last saved (the table leaves it empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub losses: Option<super::losses::Ledger>,
    /// What the master reports (failing windows, memory lost): stored under
    /// its own key beside the snapshot, for the operator to read alone.
    #[serde(skip)]
    pub report: ballast_node::master_report::MasterReport,
    /// The SQLs windows are computed with, each from its first window on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sql: Vec<super::sql::SqlVersion>,
    /// The period and day computed to date, and what the KV store missed.
    #[serde(default)]
    pub to_date: super::tasks::ToDate,
}
