//! Rollout: whether the pipeline's Deployments and StatefulSet run what was
//! applied with every replica available, judged from their status alone. Pure:
//! `Ready` is reported from this, not from the apply having succeeded.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};

/// Where the workloads stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Every workload's controller saw the current spec, and every replica runs it and is available.
    Available,
    /// Some are still starting or updating; one line per such workload.
    Progressing(Vec<String>),
    /// A Deployment exceeded its progress deadline (a crash loop, an image that
    /// cannot be pulled, a quota): waiting will not fix it.
    Failed(Vec<String>),
}

/// One workload's replica counts, as its controller reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Counts {
    kind: &'static str,
    name: String,
    observed: bool,
    wanted: i32,
    updated: i32,
    available: i32,
    deadline_exceeded: bool,
}

impl Counts {
    fn of_deployment(d: &Deployment) -> Self {
        let status = d.status.clone().unwrap_or_default();
        let deadline_exceeded = status.conditions.iter().flatten().any(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        Self {
            kind: "Deployment",
            name: d.metadata.name.clone().unwrap_or_default(),
            observed: status.observed_generation >= d.metadata.generation,
            wanted: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated: status.updated_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
            deadline_exceeded,
        }
    }

    fn of_statefulset(s: &StatefulSet) -> Self {
        let status = s.status.clone().unwrap_or_default();
        // Without a rollout under way the controller may leave `updatedReplicas` unset.
        let updated = if status.update_revision.is_some() && status.update_revision == status.current_revision
        {
            status
                .current_replicas
                .unwrap_or(0)
                .max(status.updated_replicas.unwrap_or(0))
        } else {
            status.updated_replicas.unwrap_or(0)
        };
        Self {
            kind: "StatefulSet",
            name: s.metadata.name.clone().unwrap_or_default(),
            observed: status.observed_generation >= s.metadata.generation,
            wanted: s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated,
            available: status.available_replicas.unwrap_or(0),
            deadline_exceeded: false,
        }
    }

    /// Why it is not rolled out, if it is not.
    fn pending(&self) -> Option<String> {
        let Self {
            kind, name, wanted, ..
        } = self;
        if !self.observed {
            Some(format!(
                "{kind} {name}: its controller has not seen the current spec yet"
            ))
        } else if self.updated < *wanted {
            Some(format!(
                "{kind} {name}: {}/{wanted} replicas updated",
                self.updated
            ))
        } else if self.available < *wanted {
            Some(format!(
                "{kind} {name}: {}/{wanted} replicas available",
                self.available
            ))
        } else {
            None
        }
    }
}

/// The rollout of `expected` workloads (kind and name) from those found. A
/// workload not found yet is progressing: it was just applied.
pub fn judge(
    expected: &[(&'static str, String)],
    deployments: &[Deployment],
    statefulsets: &[StatefulSet],
) -> Rollout {
    let found: Vec<Counts> = deployments
        .iter()
        .map(Counts::of_deployment)
        .chain(statefulsets.iter().map(Counts::of_statefulset))
        .collect();
    let mut progressing = Vec::new();
    let mut failed = Vec::new();
    for (kind, name) in expected {
        match found.iter().find(|c| c.kind == *kind && c.name == *name) {
            None => progressing.push(format!("{kind} {name}: not created yet")),
            Some(counts) => match counts.pending() {
                Some(why) if counts.deadline_exceeded => {
                    failed.push(format!("{why}; progress deadline exceeded"));
                }
                Some(why) => progressing.push(why),
                None => {}
            },
        }
    }
    if !failed.is_empty() {
        Rollout::Failed(failed)
    } else if !progressing.is_empty() {
        Rollout::Progressing(progressing)
    } else {
        Rollout::Available
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{
        DeploymentCondition, DeploymentSpec, DeploymentStatus, StatefulSetSpec, StatefulSetStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn meta(name: &str, generation: i64) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            generation: Some(generation),
            ..ObjectMeta::default()
        }
    }

    /// A Deployment of 2 at generation 2; `status` is (observed generation, updated, available).
    fn deployment(status: Option<(i64, i32, i32)>, deadline_exceeded: bool) -> Deployment {
        let conditions = deadline_exceeded.then(|| {
            vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                ..DeploymentCondition::default()
            }]
        });
        Deployment {
            metadata: meta("p-intake", 2),
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..DeploymentSpec::default()
            }),
            status: status.map(|(observed, updated, available)| DeploymentStatus {
                observed_generation: Some(observed),
                updated_replicas: Some(updated),
                available_replicas: Some(available),
                conditions,
                ..DeploymentStatus::default()
            }),
        }
    }

    /// A StatefulSet of 4 at generation 1; `status` is (observed, current, updated, available, rolling).
    fn statefulset(
        observed: i64,
        current: i32,
        updated: Option<i32>,
        available: i32,
        rolling: bool,
    ) -> StatefulSet {
        StatefulSet {
            metadata: meta("p-slave", 1),
            spec: Some(StatefulSetSpec {
                replicas: Some(4),
                ..StatefulSetSpec::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                current_replicas: Some(current),
                updated_replicas: updated,
                available_replicas: Some(available),
                current_revision: Some("r1".into()),
                update_revision: Some(if rolling { "r2" } else { "r1" }.into()),
                replicas: 4,
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn expected() -> Vec<(&'static str, String)> {
        vec![
            ("Deployment", "p-intake".into()),
            ("StatefulSet", "p-slave".into()),
        ]
    }

    fn kind(rollout: &Rollout) -> &'static str {
        match rollout {
            Rollout::Available => "available",
            Rollout::Progressing(_) => "progressing",
            Rollout::Failed(_) => "failed",
        }
    }

    #[test]
    fn rollout_follows_each_workloads_status() {
        let settled = statefulset(1, 4, None, 4, false);
        let cases: [(&str, Vec<Deployment>, Vec<StatefulSet>, &str); 10] = [
            (
                "all available",
                vec![deployment(Some((2, 2, 2)), false)],
                vec![settled.clone()],
                "available",
            ),
            (
                "deployment not created",
                vec![],
                vec![settled.clone()],
                "progressing",
            ),
            (
                "deployment without status",
                vec![deployment(None, false)],
                vec![settled.clone()],
                "progressing",
            ),
            (
                "spec not observed",
                vec![deployment(Some((1, 2, 2)), false)],
                vec![settled.clone()],
                "progressing",
            ),
            (
                "one replica still old",
                vec![deployment(Some((2, 1, 2)), false)],
                vec![settled.clone()],
                "progressing",
            ),
            (
                "one replica unavailable",
                vec![deployment(Some((2, 2, 1)), false)],
                vec![settled.clone()],
                "progressing",
            ),
            (
                "crash loop past the deadline",
                vec![deployment(Some((2, 2, 1)), true)],
                vec![settled.clone()],
                "failed",
            ),
            (
                "slaves scaled out, two not ready",
                vec![deployment(Some((2, 2, 2)), false)],
                vec![statefulset(1, 4, None, 2, false)],
                "progressing",
            ),
            (
                "slaves updating",
                vec![deployment(Some((2, 2, 2)), false)],
                vec![statefulset(1, 2, Some(2), 4, true)],
                "progressing",
            ),
            (
                "slaves updated",
                vec![deployment(Some((2, 2, 2)), false)],
                vec![statefulset(1, 4, Some(4), 4, false)],
                "available",
            ),
        ];
        for (case, deployments, sets, want) in cases {
            let got = judge(&expected(), &deployments, &sets);
            assert_eq!(kind(&got), want, "{case}: {got:?}");
        }
    }

    #[test]
    fn each_pending_workload_is_named_with_its_counts() {
        let got = judge(
            &expected(),
            &[deployment(Some((2, 2, 1)), false)],
            &[statefulset(1, 4, None, 3, false)],
        );
        assert_eq!(
            got,
            Rollout::Progressing(vec![
                "Deployment p-intake: 1/2 replicas available".into(),
                "StatefulSet p-slave: 3/4 replicas available".into(),
            ])
        );
    }

    #[test]
    fn a_deadline_exceeded_on_an_available_deployment_is_not_a_failure() {
        // The condition outlives the problem until the next rollout: the counts decide.
        let got = judge(
            &expected(),
            &[deployment(Some((2, 2, 2)), true)],
            &[statefulset(1, 4, None, 4, false)],
        );
        assert_eq!(got, Rollout::Available);
    }
}
