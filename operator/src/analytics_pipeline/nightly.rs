//! The pipeline's nightly job: a CronJob running `ballast-worker nightly`
//! on the pipeline's schedule and time zone, one run at a time, each retried
//! a few times (a rerun completes what a failed one left). Pure.

use ballast_crds::analytics_pipeline::NightlySpec;
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The CronJob running `template` (a worker pod template) as the nightly
/// job: the job serves nothing, so its container has no ports or probes.
pub fn cron_job(metadata: ObjectMeta, mut template: PodTemplateSpec, spec: &NightlySpec) -> CronJob {
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("OnFailure".into());
        for container in &mut pod.containers {
            container.ports = None;
            container.readiness_probe = None;
            container.liveness_probe = None;
        }
    }
    CronJob {
        metadata,
        spec: Some(CronJobSpec {
            schedule: spec.schedule.clone(),
            time_zone: Some(spec.time_zone.clone()),
            // One run at a time: a run still going when the next is due is
            // left to finish (a rerun would only redo its work).
            concurrency_policy: Some("Forbid".into()),
            // A run missed by more than an hour waits for the next night.
            starting_deadline_seconds: Some(3600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: None,
                spec: Some(JobSpec {
                    backoff_limit: Some(3),
                    active_deadline_seconds: Some(4 * 3600),
                    template,
                    ..JobSpec::default()
                }),
            },
            ..CronJobSpec::default()
        }),
        ..CronJob::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, Probe};

    #[test]
    fn the_job_runs_on_the_pipelines_schedule_once_at_a_time_without_probes() {
        let template = PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "worker".into(),
                    ports: Some(vec![ContainerPort::default()]),
                    readiness_probe: Some(Probe::default()),
                    liveness_probe: Some(Probe::default()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        };
        let spec = NightlySpec {
            schedule: "15 1 * * *".into(),
            time_zone: "Asia/Shanghai".into(),
            hot_retention_days: 3,
        };
        let job = cron_job(ObjectMeta::default(), template, &spec);
        let s = job.spec.unwrap_or_default();
        assert_eq!(
            (
                s.schedule.as_str(),
                s.time_zone.as_deref(),
                s.concurrency_policy.as_deref()
            ),
            ("15 1 * * *", Some("Asia/Shanghai"), Some("Forbid"))
        );
        let pod = s
            .job_template
            .spec
            .and_then(|j| j.template.spec)
            .unwrap_or_default();
        assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
        let c = &pod.containers[0];
        assert!(c.ports.is_none() && c.readiness_probe.is_none() && c.liveness_probe.is_none());
    }
}
