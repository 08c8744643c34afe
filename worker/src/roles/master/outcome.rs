//! What the task table answers the master's loop: the tasks to send, and
//! what a report or a watchdog pass did to a task.

use super::snapshot::Planned;

/// A task sent to a slave.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    /// What it covers.
    pub planned: Planned,
    /// The attempt's version.
    pub version: u64,
    /// Where it goes.
    pub slave: String,
    /// Its expected duration.
    pub estimate_ms: f64,
}

/// What a report or a watchdog pass did to a task (for metrics and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished: it left the table.
    Done,
    /// From an older attempt (or an unknown task): ignored.
    Stale,
    /// Will run again on the same slave.
    Retried,
    /// Will run on another slave.
    Reassigned,
    /// Parked in the delay queue.
    Delayed,
    /// Its slave left the membership: it will run elsewhere under a new version.
    SlaveGone,
    /// Ran far beyond its estimate: it will run elsewhere under a new version.
    Hung,
    /// Its data aged out of memory: given up, its last stored result stands.
    Expired,
}
