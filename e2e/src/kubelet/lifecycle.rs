//! What the stand-in kubelet does next for one pod, from what the API server
//! says of the pod and what it knows of the pod's process (pure), and the
//! status it reports for a running pod.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

/// Where the API server says a pod is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Not yet scheduled.
    Nowhere,
    /// To this kubelet's node.
    Here,
    /// To another node: not ours to run.
    Elsewhere,
}

/// The pod as the API server has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// Its uid: a StatefulSet's replacement pod has the old name and a new uid.
    pub uid: String,
    /// Its binding.
    pub bound: Bound,
    /// Deletion requested (the kubelet must stop it, then remove it).
    pub deleting: bool,
    /// `terminationGracePeriodSeconds`.
    pub grace: Duration,
    /// `restartPolicy`.
    pub restart: Restart,
    /// Its phase is Succeeded or Failed: it runs no more.
    pub finished: bool,
}

/// A pod's `restartPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Every exit restarts the container (the default; Deployments, StatefulSets).
    Always,
    /// Only a failure restarts it; a success completes the pod (Jobs).
    OnFailure,
    /// No exit restarts it.
    Never,
}

impl Restart {
    /// The policy a pod spec names.
    pub fn of(policy: Option<&str>) -> Self {
        match policy {
            Some("OnFailure") => Restart::OnFailure,
            Some("Never") => Restart::Never,
            _ => Restart::Always,
        }
    }
}

/// The pod's process as the kubelet has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcFacts {
    /// Uid of the pod it was started for.
    pub uid: String,
    /// The process has exited.
    pub exited: bool,
    /// Its exit code, once exited (none when a signal ended it).
    pub exit_code: Option<i32>,
    /// How long ago SIGTERM was sent, if it was.
    pub terminating_for: Option<Duration>,
}

/// The kubelet's next step for one pod name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do now.
    Wait,
    /// Bind the pod to this node (there is no scheduler).
    Bind,
    /// Start the container (first start, or after it exited: restart policy Always).
    Start,
    /// SIGTERM, so that the worker drains.
    Terminate,
    /// SIGKILL: the grace period is over, or the pod is gone.
    Kill,
    /// The process is gone and the pod is being deleted: remove the pod object.
    Remove,
    /// The process is gone and so is the pod: forget it.
    Forget,
    /// The container exited 0 and the pod does not restart on success: report it Succeeded.
    Succeed,
    /// The container failed and the pod does not restart: report it Failed.
    Fail,
}

/// The next step. Pure.
pub fn step(pod: Option<&PodFacts>, proc: Option<&ProcFacts>) -> Step {
    let running = proc.filter(|p| !p.exited);
    let Some(pod) = pod else {
        return match running {
            Some(_) => Step::Kill,
            None if proc.is_some() => Step::Forget,
            None => Step::Wait,
        };
    };
    match pod.bound {
        Bound::Elsewhere => return Step::Wait,
        Bound::Nowhere => return if pod.deleting { Step::Wait } else { Step::Bind },
        Bound::Here => {}
    }
    // A process of an earlier pod by this name goes before the new one starts.
    if let Some(old) = running.filter(|p| p.uid != pod.uid) {
        return stop(old, pod.grace);
    }
    match (pod.deleting, running) {
        (true, Some(process)) => stop(process, pod.grace),
        (true, None) => Step::Remove,
        (false, Some(_)) => Step::Wait,
        (false, None) if pod.finished => Step::Wait,
        (false, None) => {
            // How this pod's own process ended, if it ran.
            let ended = proc.filter(|p| p.uid == pod.uid && p.exited).map(|p| p.exit_code);
            match (ended, pod.restart) {
                (Some(Some(0)), Restart::OnFailure | Restart::Never) => Step::Succeed,
                (Some(_), Restart::Never) => Step::Fail,
                _ => Step::Start,
            }
        }
    }
}

fn stop(process: &ProcFacts, grace: Duration) -> Step {
    match process.terminating_for {
        None => Step::Terminate,
        Some(since) if since >= grace => Step::Kill,
        Some(_) => Step::Wait,
    }
}

/// What the status of a running pod reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Reported {
    /// The readiness probe passed last time.
    pub ready: bool,
    /// Starts after the first.
    pub restarts: i32,
    /// When the current process started.
    pub started: Time,
    /// When readiness last changed.
    pub ready_since: Time,
}

/// The status of a pod whose container ended for good: Succeeded (exit 0)
/// or Failed, with the container's exit code.
pub fn finished_patch(image: &str, exit_code: Option<i32>) -> Value {
    let code = exit_code.unwrap_or(137);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"},
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"},
        ],
        "containerStatuses": [{
            "name": "worker",
            "image": image,
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 0,
            "state": {"terminated": {
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "finishedAt": now,
            }},
        }],
    }})
}

/// The pod's status, as a merge patch of the status subresource. No pod IP:
/// loopback addresses are not valid endpoints, and workers advertise
/// their own addresses in their Leases.
pub fn status_patch(image: &str, reported: &Reported) -> Value {
    let ready = if reported.ready { "True" } else { "False" };
    let condition = |type_: &str, status: &str, at: &Time| json!({"type": type_, "status": status, "lastTransitionTime": at});
    json!({"status": {
        "phase": "Running",
        "startTime": reported.started,
        "conditions": [
            condition("PodScheduled", "True", &reported.started),
            condition("Initialized", "True", &reported.started),
            condition("ContainersReady", ready, &reported.ready_since),
            condition("Ready", ready, &reported.ready_since),
        ],
        "containerStatuses": [{
            "name": "worker",
            "image": image,
            "imageID": "",
            "ready": reported.ready,
            "started": true,
            "restartCount": reported.restarts,
            "state": {"running": {"startedAt": reported.started}},
        }],
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    fn pod(bound: Bound, deleting: bool) -> PodFacts {
        PodFacts {
            uid: "new".into(),
            bound,
            deleting,
            grace: GRACE,
            restart: Restart::Always,
            finished: false,
        }
    }

    fn proc(uid: &str, exited: bool, terminating_for: Option<u64>) -> ProcFacts {
        ProcFacts {
            uid: uid.into(),
            exited,
            exit_code: exited.then_some(1),
            terminating_for: terminating_for.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_job_pod_completes_on_success_and_restarts_or_fails_by_its_policy() {
        let job = |restart, finished| PodFacts {
            restart,
            finished,
            ..pod(Bound::Here, false)
        };
        let ended = |code| ProcFacts {
            exit_code: code,
            ..proc("new", true, None)
        };
        let cases = [
            (
                job(Restart::OnFailure, false),
                Some(ended(Some(0))),
                Step::Succeed,
            ),
            (job(Restart::OnFailure, false), Some(ended(Some(1))), Step::Start),
            (job(Restart::OnFailure, false), Some(ended(None)), Step::Start),
            (job(Restart::Never, false), Some(ended(Some(0))), Step::Succeed),
            (job(Restart::Never, false), Some(ended(Some(2))), Step::Fail),
            (job(Restart::Never, false), Some(ended(None)), Step::Fail),
            (job(Restart::Always, false), Some(ended(Some(0))), Step::Start),
            (job(Restart::OnFailure, false), None, Step::Start),
            (job(Restart::OnFailure, true), Some(ended(Some(0))), Step::Wait),
            (job(Restart::OnFailure, true), None, Step::Wait),
        ];
        for (pod, process, want) in cases {
            assert_eq!(step(Some(&pod), process.as_ref()), want, "{pod:?} {process:?}");
        }
        let done = finished_patch("w", Some(0));
        assert_eq!(done["status"]["phase"], "Succeeded");
        assert_eq!(finished_patch("w", None)["status"]["phase"], "Failed");
    }

    #[test]
    fn each_pod_and_process_state_has_one_next_step() {
        use Bound::{Elsewhere, Here, Nowhere};
        let cases: [(Option<PodFacts>, Option<ProcFacts>, Step); 16] = [
            (None, None, Step::Wait),
            (None, Some(proc("new", false, None)), Step::Kill),
            (None, Some(proc("new", true, None)), Step::Forget),
            (Some(pod(Nowhere, false)), None, Step::Bind),
            (Some(pod(Nowhere, true)), None, Step::Wait),
            (Some(pod(Elsewhere, false)), None, Step::Wait),
            (Some(pod(Here, false)), None, Step::Start),
            (Some(pod(Here, false)), Some(proc("new", false, None)), Step::Wait),
            // Exited: restarted, as with restartPolicy Always.
            (Some(pod(Here, false)), Some(proc("new", true, None)), Step::Start),
            (
                Some(pod(Here, true)),
                Some(proc("new", false, None)),
                Step::Terminate,
            ),
            (
                Some(pod(Here, true)),
                Some(proc("new", false, Some(5))),
                Step::Wait,
            ),
            (
                Some(pod(Here, true)),
                Some(proc("new", false, Some(30))),
                Step::Kill,
            ),
            (
                Some(pod(Here, true)),
                Some(proc("new", true, Some(5))),
                Step::Remove,
            ),
            (Some(pod(Here, true)), None, Step::Remove),
            // A replacement pod waits for its predecessor's process to stop.
            (
                Some(pod(Here, false)),
                Some(proc("old", false, None)),
                Step::Terminate,
            ),
            (Some(pod(Here, false)), Some(proc("old", true, None)), Step::Start),
        ];
        for (pod, process, want) in cases {
            assert_eq!(
                step(pod.as_ref(), process.as_ref()),
                want,
                "pod {pod:?}, process {process:?}"
            );
        }
    }

    #[test]
    fn status_reports_readiness_in_the_conditions_and_the_container() {
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let reported = Reported {
            ready: false,
            restarts: 2,
            started: at.clone(),
            ready_since: at,
        };
        let patch = status_patch("ballast-worker:dev", &reported);
        let conditions = patch["status"]["conditions"].as_array().expect("conditions");
        let ready = conditions.iter().find(|c| c["type"] == "Ready").expect("Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(patch["status"]["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(patch["status"]["containerStatuses"][0]["ready"], false);
    }
}
