//! The MemberStore controller: measures how far each kept Elasticsearch
//! cluster (every standby data centre's and the marketing cluster) is behind
//! the change stream, from its replicator's consumer group, and publishes it
//! with whether every standby is within the promotion's lag budget. Measure
//! (I/O, [`lag`]) → status (pure, [`status`]) → write. The member-service
//! and replicator workloads and the promotion itself come next (#16).

pub mod lag;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::member_store::replica_group;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// How often the lag is measured again: the status is at most this old.
const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// Deadline of each Kafka call of a measurement.
const KAFKA_DEADLINE: Duration = Duration::from_secs(2);

/// Errors of a MemberStore reconcile; all transient.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MemberStore has no namespace (it is namespaced; the API server always sets one).
    #[error("MemberStore has no namespace")]
    MissingNamespace,
    /// Writing status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
}

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(ctx: Context, shutdown: CancellationToken) {
    Controller::new(ctx.api::<MemberStore>(), watcher::Config::default())
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|_| async {})
        .await;
}

#[tracing::instrument(skip_all, fields(store = %ms.name_any(), namespace = ms.namespace().unwrap_or_default()))]
async fn reconcile(ms: Arc<MemberStore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let kind = vec![("kind", "MemberStore".to_owned())];
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    let started = std::time::Instant::now();
    let ns = ms.namespace().ok_or(Error::MissingNamespace)?;
    let name = ms.name_any();
    let mut measured = Vec::new();
    for cluster in ms.kept_clusters() {
        let group = replica_group(&ns, &name, &cluster.name);
        let m = lag::measure(&ms.spec.change_stream, &group, KAFKA_DEADLINE)
            .await
            .map_err(|e| e.to_string());
        if let Err(error) = &m {
            tracing::warn!(cluster = %cluster.name, %error, "measuring a replica's lag failed");
        }
        measured.push((cluster, m));
    }
    let computed = status::compute(&ms, &measured, Timestamp::now());
    if ms.status.as_ref() != Some(&computed) {
        for (before, after) in ms
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .zip(&computed.conditions)
            .filter(|(b, a)| b.type_ == a.type_ && b.status != a.status)
        {
            tracing::info!(condition = %after.type_, from = %before.status, to = %after.status, reason = %after.reason, message = %after.message, "condition changed");
        }
        let api: Api<MemberStore> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {
            "observedGeneration": computed.observed_generation,
            "conditions": computed.conditions,
            "replication": computed.replication,
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::Status)?;
    }
    ctx.metrics
        .reconcile_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(MEASURE_EVERY))
}

fn error_policy(ms: Arc<MemberStore>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(store = %ms.name_any(), %error, "MemberStore reconcile failed; retrying");
    let label = match error {
        Error::MissingNamespace => "missing_namespace",
        Error::Status(_) => "status",
    };
    ctx.metrics
        .reconcile_errors
        .get_or_create(&vec![
            ("kind", "MemberStore".to_owned()),
            ("error", label.to_owned()),
        ])
        .inc();
    Action::requeue(MEASURE_EVERY)
}
