//! Status: the pipeline's conditions computed in one pure function, written in
//! one patch, with an Event for every published transition.

use ballast_crds::conditions::{self, Desired};
use ballast_crds::{AnalyticsPipeline, AnalyticsPipelineStatus, Mode, ShedDay};
use ballast_node::master_report::MasterReport;
use ballast_node::membership::Shedding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Error;
use super::publish::Publication;
use super::rollout::Rollout;
use super::validate::Invalid;

/// How the reconcile ended, for status.
#[derive(Debug)]
pub enum Outcome {
    /// A reference is missing; the pipeline waits for it.
    Invalid(Invalid),
    /// Workloads applied and modes decided.
    Reconciled {
        /// What was published.
        publication: Box<Publication>,
        /// Slaves whose Leases say ready.
        ready_slaves: i32,
        /// What the backup intakes shed now, and the last day they shed.
        shedding: Shedding,
        /// Whether the workloads run what was applied, available.
        rollout: Rollout,
        /// What the active master reports.
        master: Box<MasterReport>,
        /// The source schema read since the last reconcile, if any.
        source_schema: Option<ballast_crds::SourceSchema>,
        /// The SQL to publish and its condition.
        sql: Box<super::sql::SqlDecision>,
    },
}

/// Whether the previous status said every window computes (or said nothing).
fn was_computing(ap: &AnalyticsPipeline) -> bool {
    ap.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::COMPUTING))
        .is_none_or(|c| c.status == "True")
}

/// The message of the previous `SqlValid` condition, when it did not hold.
fn refused_sql_message(ap: &AnalyticsPipeline) -> Option<&str> {
    ap.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::SQL_VALID && c.status == "False")
        .map(|c| c.message.as_str())
}

/// The Computing condition from the master's report. Pure.
fn computing(master: &MasterReport) -> Desired {
    match master.failing_summary() {
        Some(summary) => Desired::fails(conditions::COMPUTING, "WindowsFailing", summary),
        None => Desired::holds(
            conditions::COMPUTING,
            "AllWindowsComputing",
            "no window keeps failing",
        ),
    }
}

/// The status to write, from the previous one and the outcome. Pure.
pub fn compute(ap: &AnalyticsPipeline, outcome: &Outcome, now: Timestamp) -> AnalyticsPipelineStatus {
    let previous = ap.status.clone().unwrap_or_default();
    let mut status = AnalyticsPipelineStatus {
        observed_generation: ap.metadata.generation,
        ..previous.clone()
    };
    let desired = match outcome {
        Outcome::Invalid(invalid) => vec![
            Desired::fails(conditions::READY, invalid.reason, invalid.message.clone()),
            Desired::fails(
                conditions::PROGRESSING,
                "WaitingForReferences",
                "retried with backoff until the references resolve",
            ),
        ],
        Outcome::Reconciled {
            publication,
            ready_slaves,
            shedding,
            rollout,
            master,
            source_schema,
            sql,
        } => {
            status.sql.clone_from(&sql.published);
            status.failing_windows.clone_from(&master.failing);
            if let Some(schema) = source_schema {
                status.source_schema = Some(schema.clone());
            }
            (status.shed_merchants, status.shed_level) = (shedding.merchants, shedding.level);
            // A restarted intake forgets its day: the status keeps it.
            status.last_shed_day = ShedDay::merge(previous.last_shed_day.clone(), shedding.day.clone());
            status.dependencies = publication.modes.clone();
            status.slave_set = publication.slave_set.clone();
            status.summary = Some(publication.modes.summary());
            status.slaves = Some(format!("{ready_slaves}/{}", publication.slave_replicas));
            let away: Vec<String> = ballast_crds::Dependency::ALL
                .into_iter()
                .filter_map(|d| {
                    publication
                        .modes
                        .get(d)
                        .filter(|s| s.mode != Mode::Normal)
                        .map(|s| format!("{} is {:?} (epoch {})", d.as_str(), s.mode, s.epoch))
                })
                .collect();
            let (ready, rolling) = match rollout {
                Rollout::Available => (
                    Desired::holds(
                        conditions::READY,
                        "Reconciled",
                        "every workload is available and every mode is published",
                    ),
                    None,
                ),
                Rollout::Progressing(pending) => (
                    Desired::fails(conditions::READY, "WorkloadsProgressing", pending.join("; ")),
                    Some(pending.join("; ")),
                ),
                Rollout::Failed(failed) => (
                    Desired::fails(conditions::READY, "WorkloadsFailed", failed.join("; ")),
                    None,
                ),
            };
            let mut desired = vec![
                ready,
                // A mode switch says more than a rollout (it often causes one: slaves scale out).
                match (&publication.progressing, rolling) {
                    (Some(message), _) => {
                        Desired::holds(conditions::PROGRESSING, "SwitchingMode", message.clone())
                    }
                    (None, Some(pending)) => Desired::holds(conditions::PROGRESSING, "RollingOut", pending),
                    (None, None) => Desired::fails(conditions::PROGRESSING, "Stable", "no switch under way"),
                },
                if away.is_empty() {
                    Desired::fails(
                        conditions::DEGRADED,
                        "AllNormal",
                        "every dependency is in Normal mode",
                    )
                } else {
                    Desired::holds(conditions::DEGRADED, "DependencyDegraded", away.join("; "))
                },
            ];
            desired.push(computing(master));
            desired.push(sql.condition.clone());
            desired.extend(publication.conditions.iter().cloned());
            desired
        }
    };
    status.conditions =
        conditions::compute(&previous.conditions, &desired, ap.metadata.generation, &Time(now));
    status
}

/// Writes `status` in one merge patch of the status subresource.
pub async fn write(
    client: &kube::Client,
    ap: &AnalyticsPipeline,
    status: &AnalyticsPipelineStatus,
) -> Result<(), Error> {
    let ns = ap.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let mut patch = json!({ "status": status });
    // A merge patch keeps what it does not name: a slave set that is no
    // longer published must be removed by name.
    if status.slave_set.is_none() {
        patch["status"]["slaveSet"] = serde_json::Value::Null;
    }
    let patch = Patch::Merge(patch);
    match api
        .patch_status(&ap.name_any(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => Ok(()),
        // Deleted while reconciling: nothing left to report on.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Status(e)),
    }
}

/// The Event when windows start failing, or all compute again. Pure.
fn computing_event(was_computing: bool, master: &MasterReport) -> Option<Event> {
    match (was_computing, master.failing_summary()) {
        (true, Some(summary)) => Some(Event {
            type_: EventType::Warning,
            reason: "WindowsFailing".into(),
            note: Some(summary),
            action: "Compute".into(),
            secondary: None,
        }),
        (false, None) => Some(Event {
            type_: EventType::Normal,
            reason: "WindowsComputing".into(),
            note: Some("no window keeps failing".into()),
            action: "Compute".into(),
            secondary: None,
        }),
        _ => None,
    }
}

/// One Event per published transition (modes, failing windows), plus one when the pipeline starts waiting.
pub async fn record(recorder: &Recorder, ap: &AnalyticsPipeline, outcome: &Outcome) -> Result<(), Error> {
    let reference = ap.object_ref(&());
    let events: Vec<Event> = match outcome {
        Outcome::Invalid(invalid) => {
            let previous_reason = ap
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::READY))
                .map(|c| c.reason.as_str());
            if previous_reason == Some(invalid.reason) {
                Vec::new()
            } else {
                vec![Event {
                    type_: EventType::Warning,
                    reason: invalid.reason.to_owned(),
                    note: Some(invalid.message.clone()),
                    action: "Validate".into(),
                    secondary: None,
                }]
            }
        }
        Outcome::Reconciled {
            publication,
            master,
            sql,
            ..
        } => publication
            .changes
            .iter()
            .map(|c| Event {
                type_: if c.to == Mode::Normal {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: "ModeChanged".into(),
                note: Some(format!(
                    "{}: {:?} -> {:?} (epoch {}): {}",
                    c.dependency.as_str(),
                    c.from,
                    c.to,
                    c.epoch,
                    c.reason
                )),
                action: "SwitchMode".into(),
                secondary: None,
            })
            .chain(computing_event(was_computing(ap), master))
            .chain(super::sql::event(
                sql,
                ap.status.as_ref().and_then(|s| s.sql.as_ref()),
                refused_sql_message(ap),
            ))
            .collect(),
    };
    for event in events {
        recorder.publish(&event, &reference).await.map_err(Error::Event)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_crds::{Dependency, DependencyModes, DependencyStatus};

    /// The SQL part of an outcome these tests do not look at.
    fn no_sql() -> Box<crate::analytics_pipeline::sql::SqlDecision> {
        Box::new(crate::analytics_pipeline::sql::decide(
            None,
            0,
            None,
            &Default::default(),
        ))
    }

    fn pipeline() -> AnalyticsPipeline {
        let mut ap: AnalyticsPipeline =
            serde_yaml::from_str(include_str!("../../../manifests/samples/analyticspipeline.yaml"))
                .expect("sample");
        ap.metadata.generation = Some(3);
        ap
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    #[test]
    fn invalid_reference_sets_ready_false_with_the_reason() {
        let outcome = Outcome::Invalid(Invalid {
            reason: "PolicyNotFound",
            message: "no policy".into(),
        });
        let status = compute(&pipeline(), &outcome, at(1));
        assert_eq!(status.observed_generation, Some(3));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "PolicyNotFound")
        );
    }

    #[test]
    fn computing_follows_the_masters_report_with_an_event_on_each_change() {
        let failing = {
            let mut report = MasterReport::default();
            report.set_failing(vec![ballast_node::master_report::FailingWindow {
                kind: "window".into(),
                start_ms: 0,
                end_ms: 60_000,
                attempts: 4,
                since_ms: 70_000,
                error: "decoding failed".into(),
            }]);
            report
        };
        let full = MasterReport {
            plan_full: true,
            ..failing.clone()
        };
        // (report, was computing, condition holds, reason, event reason)
        let cases = [
            (MasterReport::default(), true, true, "AllWindowsComputing", None),
            (
                MasterReport::default(),
                false,
                true,
                "AllWindowsComputing",
                Some("WindowsComputing"),
            ),
            (
                failing.clone(),
                true,
                false,
                "WindowsFailing",
                Some("WindowsFailing"),
            ),
            (failing.clone(), false, false, "WindowsFailing", None),
            (
                full.clone(),
                true,
                false,
                "WindowsFailing",
                Some("WindowsFailing"),
            ),
        ];
        for (i, (report, was, holds, reason, event)) in cases.into_iter().enumerate() {
            let condition = computing(&report);
            assert_eq!(
                (condition.status, condition.reason.as_str()),
                (holds, reason),
                "case {i}"
            );
            assert_eq!(
                computing_event(was, &report).map(|e| e.reason),
                event.map(str::to_owned),
                "case {i}"
            );
        }
        let message = computing(&failing).message;
        assert!(
            message.contains("decoding failed") && message.starts_with("1 window failing"),
            "{message}"
        );
        assert!(computing(&full).message.contains("the plan is full"));
    }

    #[test]
    fn the_last_shed_day_outlives_the_shedding_and_an_intake_restart() {
        let day = |day: &str, max_level: i32| {
            Some(ShedDay {
                day: day.into(),
                max_level,
            })
        };
        let reconciled = |day: Option<ShedDay>| Outcome::Reconciled {
            publication: Box::new(Publication {
                modes: DependencyModes::default(),
                slave_replicas: 2,
                conditions: vec![],
                progressing: None,
                changes: vec![],
                slave_set: None,
            }),
            ready_slaves: 2,
            shedding: Shedding {
                merchants: 0,
                level: 0,
                day,
            },
            rollout: Rollout::Available,
            master: Box::default(),
            source_schema: None,
            sql: no_sql(),
        };
        // (stored, reported by the intakes, stored after)
        let cases = [
            (None, day("2026-11-21", 300), day("2026-11-21", 300)),
            (
                day("2026-11-21", 6_667),
                day("2026-11-21", 300),
                day("2026-11-21", 6_667),
            ),
            (day("2026-11-21", 6_667), None, day("2026-11-21", 6_667)),
            (
                day("2026-11-20", 9_000),
                day("2026-11-21", 300),
                day("2026-11-21", 300),
            ),
        ];
        for (i, (stored, reported, want)) in cases.into_iter().enumerate() {
            let mut ap = pipeline();
            ap.status = Some(AnalyticsPipelineStatus {
                last_shed_day: stored,
                ..AnalyticsPipelineStatus::default()
            });
            let status = compute(&ap, &reconciled(reported), at(5));
            assert_eq!(status.last_shed_day, want, "case {i}");
        }
    }

    #[test]
    fn degraded_dependency_shows_in_summary_and_condition() {
        let mut modes = DependencyModes::default();
        modes.set(
            Dependency::Kv,
            DependencyStatus {
                mode: Mode::Degraded,
                since: Time(at(1)),
                epoch: 1,
                forced: false,
                reason: None,
                message: None,
            },
        );
        let publication = Publication {
            modes,
            slave_replicas: 6,
            conditions: vec![],
            progressing: None,
            changes: vec![],
            slave_set: None,
        };
        let status = compute(
            &pipeline(),
            &Outcome::Reconciled {
                publication: Box::new(publication),
                ready_slaves: 6,
                shedding: Shedding {
                    merchants: 12,
                    level: 900,
                    day: None,
                },
                rollout: Rollout::Available,
                master: Box::default(),
                source_schema: None,
                sql: no_sql(),
            },
            at(2),
        );
        assert_eq!(status.summary.as_deref(), Some("Degraded(kv)"));
        assert_eq!(status.slaves.as_deref(), Some("6/6"));
        assert_eq!((status.shed_merchants, status.shed_level), (12, 900));
        assert_eq!(status.last_shed_day, None);
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .expect("degraded");
        assert_eq!(degraded.status, "True");
        assert!(degraded.message.contains("kv is Degraded (epoch 1)"));
    }

    #[test]
    fn ready_follows_the_rollout_and_a_rollout_shows_as_progressing() {
        let outcome = |rollout: Rollout, switching: Option<&str>| Outcome::Reconciled {
            publication: Box::new(Publication {
                modes: DependencyModes::default(),
                slave_replicas: 2,
                conditions: vec![],
                progressing: switching.map(str::to_owned),
                changes: vec![],
                slave_set: None,
            }),
            ready_slaves: 2,
            shedding: Shedding::default(),
            rollout,
            master: Box::default(),
            source_schema: None,
            sql: no_sql(),
        };
        let pending = || vec!["Deployment p-intake: 0/1 replicas available".to_owned()];
        // (rollout, mode switch under way, Ready, its reason, Progressing, its reason)
        let cases = [
            (Rollout::Available, None, "True", "Reconciled", "False", "Stable"),
            (
                Rollout::Progressing(pending()),
                None,
                "False",
                "WorkloadsProgressing",
                "True",
                "RollingOut",
            ),
            (
                Rollout::Failed(pending()),
                None,
                "False",
                "WorkloadsFailed",
                "False",
                "Stable",
            ),
            (
                Rollout::Progressing(pending()),
                Some("scaling slaves"),
                "False",
                "WorkloadsProgressing",
                "True",
                "SwitchingMode",
            ),
        ];
        for (rollout, switching, ready, ready_reason, progressing, progressing_reason) in cases {
            let case = format!("{rollout:?}, switching {switching:?}");
            let status = compute(&pipeline(), &outcome(rollout, switching), at(2));
            let find = |t: &str| {
                status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == t)
                    .cloned()
                    .expect("condition")
            };
            let (r, p) = (find("Ready"), find("Progressing"));
            assert_eq!(
                (r.status.as_str(), r.reason.as_str()),
                (ready, ready_reason),
                "{case}"
            );
            assert_eq!(
                (p.status.as_str(), p.reason.as_str()),
                (progressing, progressing_reason),
                "{case}"
            );
        }
        let status = compute(
            &pipeline(),
            &outcome(Rollout::Progressing(pending()), None),
            at(2),
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.message, "Deployment p-intake: 0/1 replicas available");
    }
}
