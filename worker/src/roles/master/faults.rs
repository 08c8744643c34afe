//! The master's fault rules (seed 001): retry a failed task, then reassign it,
//! then park it in the delay queue; call a task hung when it runs far beyond
//! its estimate. Pure.

use std::collections::{BTreeMap, BTreeSet};

/// How persistent the master is with a failing task.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPolicy {
    /// Retries on the same slave before moving the task elsewhere.
    pub retries_per_slave: u32,
    /// Distinct slaves a task may fail on before it goes to the delay queue
    /// (fewer if fewer slaves are live).
    pub slaves_before_delay: usize,
    /// First delay-queue back-off; doubles each round.
    pub delay_base_ms: i64,
    /// Longest delay-queue back-off.
    pub delay_max_ms: i64,
    /// A task running longer than this many times its estimate is hung...
    pub hung_factor: f64,
    /// ...but never before this long.
    pub hung_floor_ms: i64,
    /// A slave that could not be reached gets no new task for this long
    /// (its Lease may take longer to lapse).
    pub quarantine_ms: i64,
}

impl Default for FaultPolicy {
    fn default() -> Self {
        Self {
            retries_per_slave: 1,
            slaves_before_delay: 2,
            delay_base_ms: 5_000,
            delay_max_ms: 300_000,
            hung_factor: 10.0,
            hung_floor_ms: 5_000,
            quarantine_ms: 5_000,
        }
    }
}

/// Why an attempt failed, as far as the master's choice goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The slave could not be reached: nothing ran there; go elsewhere at once.
    Unreachable,
    /// The slave ran the task and it failed (a store, the SQL, the data).
    Failed,
    /// The task's data is no longer whole (events aged out of a slave's
    /// memory): no attempt anywhere can succeed, and a partial result would
    /// replace the one computed while it was whole.
    Expired,
}

/// What to do with a failed task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run it again on the same slave.
    Retry,
    /// Run it on another slave, none of these.
    Reassign {
        /// Slaves it has exhausted.
        exclude: BTreeSet<String>,
    },
    /// Park it until `until_ms`, then start over.
    Delay {
        /// When it is tried again.
        until_ms: i64,
    },
    /// Give it up: its last stored result stands.
    Drop,
}

/// A failed attempt and what the master knows of the task's history.
#[derive(Clone, Debug)]
pub struct Failed<'a> {
    /// Failed attempts per slave, including this one.
    pub failures: &'a BTreeMap<String, u32>,
    /// The slave that failed it.
    pub slave: &'a str,
    /// How it failed.
    pub failure: Failure,
    /// The task's data is in this slave's memory only: it can never move.
    pub pinned: bool,
    /// Slaves live now.
    pub live_slaves: usize,
    /// How often the task was delayed already.
    pub rounds: u32,
}

/// The decision after a failed attempt.
pub fn on_failure(policy: &FaultPolicy, failed: &Failed<'_>, now_ms: i64) -> Action {
    let Failed {
        failures,
        slave,
        failure,
        pinned,
        live_slaves,
        rounds,
    } = *failed;
    if failure == Failure::Expired {
        return Action::Drop;
    }
    let exhausted: BTreeSet<String> = failures
        .iter()
        .filter(|(name, n)| {
            **n > policy.retries_per_slave || (name.as_str() == slave && failure == Failure::Unreachable)
        })
        .map(|(name, _)| name.clone())
        .collect();
    let delay = Action::Delay {
        until_ms: now_ms + backoff(policy, rounds),
    };
    if pinned {
        return if exhausted.is_empty() {
            Action::Retry
        } else {
            delay
        };
    }
    if !exhausted.contains(slave) {
        return Action::Retry;
    }
    let limit = policy.slaves_before_delay.min(live_slaves).max(1);
    if exhausted.len() >= limit {
        delay
    } else {
        Action::Reassign { exclude: exhausted }
    }
}

/// Delay-queue back-off for the `rounds`-th delay: doubling, capped.
pub fn backoff(policy: &FaultPolicy, rounds: u32) -> i64 {
    let factor = 1_i64.checked_shl(rounds.min(20)).unwrap_or(i64::MAX);
    policy
        .delay_base_ms
        .saturating_mul(factor)
        .min(policy.delay_max_ms)
}

/// Whether a task started at `started_ms` with an estimate of `estimate_ms` is hung at `now_ms`.
pub fn is_hung(policy: &FaultPolicy, started_ms: i64, estimate_ms: f64, now_ms: i64) -> bool {
    let limit = (estimate_ms * policy.hung_factor).max(policy.hung_floor_ms as f64);
    (now_ms - started_ms) as f64 > limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_failed_task_is_retried_then_reassigned_then_delayed() {
        let p = FaultPolicy::default();
        let cases = [
            // (failures so far, failing slave, kind, pinned, live, want)
            (
                failures(&[("a", 1)]),
                "a",
                Failure::Failed,
                false,
                3,
                Action::Retry,
            ),
            (
                failures(&[("a", 2)]),
                "a",
                Failure::Failed,
                false,
                3,
                Action::Reassign { exclude: set(&["a"]) },
            ),
            (
                failures(&[("a", 2), ("b", 2)]),
                "b",
                Failure::Failed,
                false,
                3,
                Action::Delay {
                    until_ms: 1_000 + 5_000,
                },
            ),
            // With a single live slave, failing there twice is "several slaves".
            (
                failures(&[("a", 2)]),
                "a",
                Failure::Failed,
                false,
                1,
                Action::Delay {
                    until_ms: 1_000 + 5_000,
                },
            ),
            // An unreachable slave is left at once.
            (
                failures(&[("a", 1)]),
                "a",
                Failure::Unreachable,
                false,
                3,
                Action::Reassign { exclude: set(&["a"]) },
            ),
            // A task pinned to one slave's memory retries there, then waits.
            (
                failures(&[("a", 1)]),
                "a",
                Failure::Failed,
                true,
                3,
                Action::Retry,
            ),
            (
                failures(&[("a", 2)]),
                "a",
                Failure::Failed,
                true,
                3,
                Action::Delay {
                    until_ms: 1_000 + 5_000,
                },
            ),
            // Data aged out of memory is given up at the first attempt, pinned or not.
            (
                failures(&[("a", 1)]),
                "a",
                Failure::Expired,
                true,
                3,
                Action::Drop,
            ),
            (
                failures(&[("a", 1)]),
                "a",
                Failure::Expired,
                false,
                3,
                Action::Drop,
            ),
        ];
        for (i, (failures, slave, failure, pinned, live_slaves, want)) in cases.into_iter().enumerate() {
            let failed = Failed {
                failures: &failures,
                slave,
                failure,
                pinned,
                live_slaves,
                rounds: 0,
            };
            assert_eq!(on_failure(&p, &failed, 1_000), want, "case {i}");
        }
    }

    #[test]
    fn delay_backoff_doubles_up_to_its_cap() {
        let p = FaultPolicy::default();
        let got: Vec<i64> = [0, 1, 2, 10, 40].iter().map(|r| backoff(&p, *r)).collect();
        assert_eq!(got, [5_000, 10_000, 20_000, 300_000, 300_000]);
    }

    #[test]
    fn a_task_is_hung_far_beyond_its_estimate_but_not_before_the_floor() {
        let p = FaultPolicy::default();
        let cases = [
            (100.0, 4_999, false),
            (100.0, 5_001, true),
            (1_000.0, 9_999, false),
            (1_000.0, 10_001, true),
        ];
        for (estimate, elapsed, want) in cases {
            assert_eq!(
                is_hung(&p, 0, estimate, elapsed),
                want,
                "{estimate} ms est, {elapsed} ms run"
            );
        }
    }
}
