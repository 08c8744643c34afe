//! What to publish: the modes workers follow and the slave count, from the
//! detected modes, the previous status and the live slaves. Pure.
//!
//! The KV switch is gated: while the KV store is down the slaves are scaled
//! out first, and the degraded mode is published only once that many slaves
//! report ready (or the policy's readiness timeout passed), so the intake never
//! hashes events to slaves that are not there. After recovery Normal is
//! published at once and the slaves are scaled in only after the policy's
//! scale-in delay.

use std::collections::BTreeMap;

use ballast_crds::SlaveSet;
use ballast_crds::conditions::{self, Desired};
use ballast_crds::{DegradationPolicySpec, Dependency, DependencyModes, DependencyStatus, Mode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::mode::Machine;

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Publication {
    /// Modes to write to status.
    pub modes: DependencyModes,
    /// Replicas of the slave StatefulSet.
    pub slave_replicas: i32,
    /// One `<Dependency>Available` condition per dependency.
    pub conditions: Vec<Desired>,
    /// Whether a switch is under way (slaves scaling, waiting for readiness).
    pub progressing: Option<String>,
    /// Published transitions, for Events and logs.
    pub changes: Vec<Change>,
    /// The slaves a Degraded KV epoch routes over (see [`SlaveSet::next`]).
    pub slave_set: Option<SlaveSet>,
}

/// One published mode change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The dependency.
    pub dependency: Dependency,
    /// Mode before.
    pub from: Mode,
    /// Mode after.
    pub to: Mode,
    /// Epoch after.
    pub epoch: i64,
    /// Why, CamelCase.
    pub reason: String,
}

/// Decides what to publish. `detected` holds each dependency's machine, `reasons`
/// the reason of its last transition, `ready_slaves` the slaves whose Leases say ready.
pub fn decide(
    base_slaves: i32,
    policy: &DegradationPolicySpec,
    detected: &BTreeMap<Dependency, Machine>,
    reasons: &BTreeMap<Dependency, String>,
    previous: &DependencyModes,
    ready_slaves: i32,
    now: Timestamp,
) -> Publication {
    let scaled = base_slaves.saturating_mul(policy.kv.slave_scale_factor.max(1));
    let mut modes = previous.clone();
    let mut out = Publication {
        modes: DependencyModes::default(),
        slave_replicas: base_slaves,
        conditions: Vec::new(),
        progressing: None,
        changes: Vec::new(),
        slave_set: None,
    };

    for dependency in Dependency::ALL {
        let Some(machine) = detected.get(&dependency) else {
            continue;
        };
        let before = previous.get(dependency).map_or(Mode::Normal, |s| s.mode);
        let reason = reasons
            .get(&dependency)
            .cloned()
            .unwrap_or_else(|| "Probed".to_owned());
        let mut publish = machine.mode;
        let mut message = None;

        if dependency == Dependency::Kv {
            match machine.mode {
                Mode::Degraded | Mode::Recovering => out.slave_replicas = scaled,
                Mode::Normal => {
                    // Just switched back, or Normal for less than the scale-in delay.
                    let draining = before != Mode::Normal
                        || previous.kv.as_ref().is_some_and(|s| {
                            s.epoch > 0 && elapsed(&s.since, now) < secs(policy.kv.scale_in_delay_seconds)
                        });
                    if draining {
                        out.slave_replicas = scaled;
                        out.progressing = Some(format!(
                            "keeping {scaled} slaves for the scale-in delay of {}s after the KV store recovered",
                            policy.kv.scale_in_delay_seconds
                        ));
                    }
                }
            }
            if machine.mode == Mode::Degraded && before == Mode::Normal {
                let waited = elapsed(&Time(machine.since), now);
                let timeout = secs(policy.kv.readiness_timeout_seconds);
                if ready_slaves < scaled && waited < timeout {
                    publish = Mode::Normal;
                    out.progressing = Some(format!(
                        "KV store down: scaling slaves to {scaled}, {ready_slaves} ready"
                    ));
                } else if ready_slaves < scaled {
                    message = Some(format!(
                        "published after the readiness timeout of {}s with only {ready_slaves} of {scaled} slaves ready",
                        policy.kv.readiness_timeout_seconds
                    ));
                }
            }
        }

        let status = if publish == before && previous.get(dependency).is_some() {
            previous.get(dependency).cloned()
        } else {
            None
        };
        let status = status.unwrap_or_else(|| DependencyStatus {
            mode: publish,
            since: Time(now),
            epoch: if publish == machine.mode {
                machine.epoch
            } else {
                previous_epoch(previous, dependency)
            },
            forced: machine.forced,
            reason: Some(reason.clone()),
            message: message.clone(),
        });
        if publish != before {
            out.changes.push(Change {
                dependency,
                from: before,
                to: publish,
                epoch: status.epoch,
                reason: reason.clone(),
            });
        }
        out.conditions.push(available_condition(
            dependency,
            machine.mode,
            publish,
            &reason,
            message.as_deref(),
        ));
        modes.set(
            dependency,
            DependencyStatus {
                forced: machine.forced,
                ..status
            },
        );
    }
    out.modes = modes;
    out
}

fn previous_epoch(previous: &DependencyModes, dependency: Dependency) -> i64 {
    previous.get(dependency).map_or(0, |s| s.epoch)
}

fn available_condition(
    dependency: Dependency,
    detected: Mode,
    published: Mode,
    reason: &str,
    message: Option<&str>,
) -> Desired {
    let type_ = conditions::dependency_condition(dependency);
    let name = dependency.as_str();
    match (detected, published) {
        (Mode::Normal, _) => Desired::holds(type_, "Healthy", format!("{name} answers probes")),
        (Mode::Degraded, Mode::Normal) => Desired::fails(
            type_,
            "SwitchPending",
            format!("{name} is down; preparing its degraded mode"),
        ),
        (Mode::Degraded, _) => Desired::fails(
            type_,
            reason,
            message.map_or_else(
                || format!("{name} is down; its degraded mode is published"),
                str::to_owned,
            ),
        ),
        (Mode::Recovering, _) => Desired::fails(
            type_,
            "Recovering",
            format!("{name} answers again; moving consumers back"),
        ),
    }
}

fn elapsed(since: &Time, now: Timestamp) -> SignedDuration {
    now.duration_since(since.0)
}

fn secs(s: i32) -> SignedDuration {
    SignedDuration::from_secs(i64::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    fn machine(mode: Mode, epoch: i64, since: i64) -> Machine {
        Machine {
            mode,
            epoch,
            since: at(since),
            forced: false,
            failures: 0,
            successes: 0,
        }
    }

    fn policy() -> DegradationPolicySpec {
        serde_json::from_value(serde_json::json!({
            "kv": {"slaveScaleFactor": 3, "scaleInDelaySeconds": 600, "readinessTimeoutSeconds": 60}
        }))
        .expect("policy")
    }

    fn kv_only(m: Machine) -> BTreeMap<Dependency, Machine> {
        [(Dependency::Kv, m)].into()
    }

    /// One decision for a pipeline of 2 base slaves whose only dependency is the KV store.
    fn kv_step(kv: Machine, previous: &DependencyModes, ready: i32, now: i64) -> Publication {
        decide(
            2,
            &policy(),
            &kv_only(kv),
            &BTreeMap::new(),
            previous,
            ready,
            at(now),
        )
    }

    fn published(mode: Mode, epoch: i64, since: i64) -> DependencyModes {
        let mut modes = DependencyModes::default();
        modes.set(
            Dependency::Kv,
            DependencyStatus {
                mode,
                since: Time(at(since)),
                epoch,
                forced: false,
                reason: None,
                message: None,
            },
        );
        modes
    }

    #[test]
    fn kv_failure_scales_slaves_before_switching() {
        let p = kv_step(
            machine(Mode::Degraded, 1, 100),
            &published(Mode::Normal, 0, 0),
            2,
            110,
        );
        assert_eq!(p.slave_replicas, 6);
        assert_eq!(
            p.modes.kv.as_ref().map(|s| s.mode),
            Some(Mode::Normal),
            "not published before slaves are ready"
        );
        assert!(p.changes.is_empty());
        assert!(p.progressing.as_deref().is_some_and(|m| m.contains("2 ready")));
    }

    #[test]
    fn kv_degraded_is_published_once_all_scaled_slaves_are_ready() {
        let p = kv_step(
            machine(Mode::Degraded, 1, 100),
            &published(Mode::Normal, 0, 0),
            6,
            110,
        );
        let kv = p.modes.kv.expect("kv");
        assert_eq!((kv.mode, kv.epoch, kv.since), (Mode::Degraded, 1, Time(at(110))));
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            (p.changes[0].from, p.changes[0].to),
            (Mode::Normal, Mode::Degraded)
        );
    }

    #[test]
    fn kv_degraded_is_published_after_readiness_timeout_with_a_message() {
        let p = kv_step(
            machine(Mode::Degraded, 1, 100),
            &published(Mode::Normal, 0, 0),
            3,
            161,
        );
        let kv = p.modes.kv.expect("kv");
        assert_eq!(kv.mode, Mode::Degraded);
        assert!(
            kv.message.as_deref().is_some_and(|m| m.contains("3 of 6")),
            "{kv:?}"
        );
    }

    #[test]
    fn kv_recovery_publishes_normal_at_once_and_scales_in_after_the_delay() {
        // Normal detected again (epoch 3), previously published Recovering.
        let p = kv_step(
            machine(Mode::Normal, 3, 200),
            &published(Mode::Recovering, 2, 190),
            6,
            200,
        );
        assert_eq!(
            p.modes.kv.as_ref().map(|s| (s.mode, s.epoch)),
            Some((Mode::Normal, 3))
        );
        assert_eq!(p.slave_replicas, 6, "no scale-in at the switch back");
        // Right after Normal, slaves are kept for the scale-in delay...
        let after = p.modes.clone();
        let p = kv_step(machine(Mode::Normal, 3, 200), &after, 6, 700);
        assert_eq!(p.slave_replicas, 6);
        // ...and scaled in once it has passed.
        let p = kv_step(machine(Mode::Normal, 3, 200), &after, 6, 801);
        assert_eq!(p.slave_replicas, 2);
    }

    #[test]
    fn a_pipeline_that_never_failed_runs_base_slaves() {
        let p = kv_step(machine(Mode::Normal, 0, 0), &DependencyModes::default(), 0, 5);
        assert_eq!(p.slave_replicas, 2);
        assert_eq!(p.modes.kv.as_ref().map(|s| s.mode), Some(Mode::Normal));
    }

    #[test]
    fn mq_degraded_is_published_without_gate() {
        let detected: BTreeMap<_, _> = [(Dependency::Mq, machine(Mode::Degraded, 1, 10))].into();
        let p = decide(
            2,
            &policy(),
            &detected,
            &BTreeMap::new(),
            &DependencyModes::default(),
            0,
            at(11),
        );
        assert_eq!(p.modes.mq.as_ref().map(|s| s.mode), Some(Mode::Degraded));
        assert_eq!(p.slave_replicas, 2);
    }
}
