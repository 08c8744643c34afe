//! The DegradationPolicy controller: accepts a policy and reports how many
//! pipelines use it. The policy's content is acted on by the pipeline controller.

use std::sync::Arc;
use std::time::Duration;

use ballast_crds::conditions::{self, Desired};
use ballast_crds::{AnalyticsPipeline, DegradationPolicy, DegradationPolicyStatus};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// Errors of a policy reconcile; all transient.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the pipelines failed.
    #[error("listing pipelines: {0}")]
    List(#[source] kube::Error),
    /// Writing status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
}

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(ctx: Context, shutdown: CancellationToken) {
    Controller::new(ctx.api::<DegradationPolicy>(), watcher::Config::default())
        .watches(ctx.api::<AnalyticsPipeline>(), watcher::Config::default(), |ap| {
            ap.namespace()
                .map(|ns| ObjectRef::new(&ap.spec.policy_ref.name).within(&ns))
        })
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|_| async {})
        .await;
}

/// The status of a policy used by `pipelines` pipelines. Pure.
pub fn compute(dp: &DegradationPolicy, pipelines: i32, now: Timestamp) -> DegradationPolicyStatus {
    let previous = dp.status.clone().unwrap_or_default();
    let ready = Desired::holds(
        conditions::READY,
        "Accepted",
        format!("used by {pipelines} pipeline(s)"),
    );
    DegradationPolicyStatus {
        observed_generation: dp.metadata.generation,
        conditions: conditions::compute(&previous.conditions, &[ready], dp.metadata.generation, &Time(now)),
        pipelines,
    }
}

#[tracing::instrument(skip_all, fields(policy = %dp.name_any(), namespace = dp.namespace().unwrap_or_default()))]
async fn reconcile(dp: Arc<DegradationPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&vec![("kind", "DegradationPolicy".to_owned())])
        .inc();
    let ns = dp.namespace().unwrap_or_default();
    let pipelines: Api<AnalyticsPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let users = pipelines
        .list(&ListParams::default())
        .await
        .map_err(Error::List)?;
    let count = users
        .items
        .iter()
        .filter(|ap| ap.spec.policy_ref.name == dp.name_any())
        .count();
    let status = compute(&dp, i32::try_from(count).unwrap_or(i32::MAX), Timestamp::now());
    if dp.status.as_ref() != Some(&status) {
        let api: Api<DegradationPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &dp.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(Error::Status)?;
    }
    Ok(Action::await_change())
}

fn error_policy(dp: Arc<DegradationPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(policy = %dp.name_any(), %error, "policy reconcile failed; retrying");
    let label = match error {
        Error::List(_) => "list",
        Error::Status(_) => "status",
    };
    ctx.metrics
        .reconcile_errors
        .get_or_create(&vec![
            ("kind", "DegradationPolicy".to_owned()),
            ("error", label.to_owned()),
        ])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_pipelines_and_keeps_transition_time() {
        let mut dp: DegradationPolicy =
            serde_yaml::from_str(include_str!("../../../manifests/samples/degradationpolicy.yaml"))
                .expect("sample");
        dp.metadata.generation = Some(2);
        let first = compute(&dp, 1, Timestamp::from_second(10).expect("valid"));
        assert_eq!((first.pipelines, first.observed_generation), (1, Some(2)));
        dp.status = Some(first.clone());
        let second = compute(&dp, 3, Timestamp::from_second(20).expect("valid"));
        assert_eq!(second.pipelines, 3);
        assert_eq!(
            second.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
    }
}
