//! Status conditions: their types, and the one pure function that computes them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The resource does what its spec asks.
pub const READY: &str = "Ready";
/// The operator is moving the resource towards its spec (rollout, scale, mode switch).
pub const PROGRESSING: &str = "Progressing";
/// At least one dependency is in a degraded mode: the platform runs, partially.
pub const DEGRADED: &str = "Degraded";
/// Every window computes: none keeps failing (the master's report).
pub const COMPUTING: &str = "Computing";
/// The pipeline's SQL is allowed and published (a refused one leaves the last valid one running).
pub const SQL_VALID: &str = "SqlValid";
/// Every standby data centre of a MemberStore is within the promotion's lag budget.
pub const STANDBY_IN_SYNC: &str = "StandbyInSync";
/// A MemberStore's active data centre's Elasticsearch answers (after a promotion if need be).
pub const ACTIVE_AVAILABLE: &str = "ActiveAvailable";
/// A MemberStore's MySQL master answers (after a promotion if need be).
pub const MYSQL_MASTER_AVAILABLE: &str = "MysqlMasterAvailable";

/// The condition type that reports one dependency's health, e.g. `KvAvailable`.
pub fn dependency_condition(dependency: crate::Dependency) -> &'static str {
    match dependency {
        crate::Dependency::Mq => "MqAvailable",
        crate::Dependency::Kv => "KvAvailable",
        crate::Dependency::Mysql => "MysqlAvailable",
        crate::Dependency::Cache => "CacheAvailable",
        crate::Dependency::Cold => "ColdAvailable",
    }
}

/// A condition as a reconcile decides it, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Condition type, e.g. [`READY`].
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// Machine-readable cause, CamelCase.
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
}

impl Desired {
    /// A condition of `type_` that holds (`status: "True"`).
    pub fn holds(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A condition of `type_` that does not hold (`status: "False"`).
    pub fn fails(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Computes the conditions to publish: one per desired type, in the desired
/// order. `lastTransitionTime` is kept from `current` when the status did not
/// change, and set to `now` when it did or the condition is new, so that the
/// time says when the state last changed, not when it was last computed.
pub fn compute(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let last_transition_time = current
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: d.type_.to_owned(),
                status: status.to_owned(),
                reason: d.reason.clone(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged_and_reset_on_change() {
        let first = compute(&[], &[Desired::holds(READY, "AllReady", "ok")], Some(1), &at(10));
        assert_eq!(first[0].last_transition_time, at(10));

        // Same status, new reason and generation: the transition time stays.
        let same = compute(
            &first,
            &[Desired::holds(READY, "StillReady", "ok")],
            Some(2),
            &at(20),
        );
        assert_eq!(same[0].last_transition_time, at(10));
        assert_eq!(same[0].reason, "StillReady");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = compute(
            &same,
            &[Desired::fails(READY, "KvDown", "kv unreachable")],
            Some(2),
            &at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped[0].status, "False");
    }

    #[test]
    fn conditions_not_desired_any_more_are_dropped_and_order_follows_desired() {
        let current = compute(
            &[],
            &[Desired::holds(READY, "A", ""), Desired::holds(DEGRADED, "B", "")],
            None,
            &at(1),
        );
        let next = compute(
            &current,
            &[
                Desired::fails(PROGRESSING, "Idle", ""),
                Desired::holds(READY, "A", ""),
            ],
            None,
            &at(2),
        );
        let types: Vec<&str> = next.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [PROGRESSING, READY]);
        assert_eq!(next[1].last_transition_time, at(1));
    }
}
