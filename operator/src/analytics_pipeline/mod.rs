//! The AnalyticsPipeline controller: fetch → validate → probe state → publish →
//! desired objects → apply → status, one file per step.

pub mod apply;
pub mod desired;
pub mod fetch;
pub mod owned;
pub mod publish;
pub mod rollout;
pub mod slaves;
pub mod status;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy, DegradationPolicySpec, Dependency};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::mode::Machine;
use crate::probe::{self, PipelineState};

/// Errors of a pipeline reconcile; all are transient and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline has no namespace (it is namespaced; the API server always sets one).
    #[error("pipeline has no namespace")]
    MissingNamespace,
    /// Reading a dependency object failed.
    #[error("fetching: {0}")]
    Fetch(#[source] kube::Error),
    /// Applying an owned object failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
    /// Publishing an Event failed.
    #[error("publishing an event: {0}")]
    Event(#[source] kube::Error),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::MissingNamespace => "missing_namespace",
            Self::Fetch(_) => "fetch",
            Self::Apply { .. } => "apply",
            Self::Status(_) => "status",
            Self::Event(_) => "event",
        }
    }
}

/// Reconciles of pipelines run at once.
const RECONCILE_CONCURRENCY: u16 = 8;

/// Runs the controller until `shutdown` is cancelled.
pub async fn run(
    ctx: Context,
    triggers: mpsc::UnboundedReceiver<ObjectRef<AnalyticsPipeline>>,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    let pipelines: Api<AnalyticsPipeline> = Api::all(client.clone());
    let controller = Controller::new(pipelines, watcher::Config::default());
    let store = controller.store();
    tokio::spawn(sweep(ctx.clone(), store.clone(), shutdown.clone()));
    tokio::spawn(slaves::watch(ctx.clone(), shutdown.clone()));

    let by_policy = store.clone();
    let by_secret = store.clone();
    let by_config_map = store.clone();
    let triggers = futures::stream::unfold(
        triggers,
        |mut rx| async move { rx.recv().await.map(|key| (key, rx)) },
    );
    let stop = shutdown.clone();
    controller
        .owns(Api::<Deployment>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<StatefulSet>::all(client.clone()),
            watcher::Config::default(),
        )
        .owns(Api::<Service>::all(client.clone()), watcher::Config::default())
        .watches(
            Api::<DegradationPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |dp| referencing(&by_policy, &dp, |ap| ap.spec.policy_ref.name == dp.name_any()),
        )
        .watches(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default(),
            move |secret| {
                referencing(&by_secret, &secret, |ap| {
                    fetch::secret_names(ap).contains(&secret.name_any())
                })
            },
        )
        .watches(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default(),
            move |cm| {
                referencing(&by_config_map, &cm, |ap| {
                    ap.spec
                        .compute
                        .sql_config_map_ref
                        .as_ref()
                        .is_some_and(|r| r.name == cm.name_any())
                })
            },
        )
        // Bounded: a burst of changes (an operator restart, 200 new pipelines)
        // neither floods the API server nor holds 200 reconciles' data at once.
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, Arc::new(ctx))
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile did not complete");
            }
        })
        .await;
}

/// Pipelines in `object`'s namespace that `uses` it.
fn referencing<K: Resource>(
    store: &Store<AnalyticsPipeline>,
    object: &K,
    uses: impl Fn(&AnalyticsPipeline) -> bool,
) -> Vec<ObjectRef<AnalyticsPipeline>> {
    let ns = object.meta().namespace.clone();
    store
        .state()
        .iter()
        .filter(|ap| ap.metadata.namespace == ns && uses(ap))
        .map(|ap| ObjectRef::from_obj(ap.as_ref()))
        .collect()
}

/// Stops the probers of pipelines that were deleted (their owned objects go by garbage collection).
async fn sweep(ctx: Context, store: Store<AnalyticsPipeline>, shutdown: CancellationToken) {
    // Until the store has listed every pipeline, absence proves nothing.
    if store.wait_until_ready().await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let gone: Vec<_> = ctx
            .pipelines()
            .keys()
            .filter(|key| store.get(key).is_none())
            .cloned()
            .collect();
        for key in gone {
            tracing::info!(pipeline = %key, "pipeline deleted: probers stopped");
            ctx.forget(&key);
        }
    }
}

fn error_policy(ap: Arc<AnalyticsPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %ap.name_any(), %error, "reconcile failed; retrying");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&vec![
            ("kind", "AnalyticsPipeline".to_owned()),
            ("error", error.label().to_owned()),
        ])
        .inc();
    Action::requeue(backoff(&ctx, &ObjectRef::from_obj(ap.as_ref())))
}

/// Exponential backoff per pipeline: 1 s doubling up to 5 min, reset by a success.
fn backoff(ctx: &Context, key: &ObjectRef<AnalyticsPipeline>) -> Duration {
    let mut pipelines = ctx.pipelines();
    let state = pipelines.entry(key.clone()).or_default();
    state.failed_attempts = state.failed_attempts.saturating_add(1);
    retry_delay(state.failed_attempts)
}

/// The delay before retry number `attempt` (1-based). Pure.
pub fn retry_delay(attempt: u32) -> Duration {
    let secs = 1u64
        .checked_shl(attempt.saturating_sub(1).min(16))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs.min(300))
}

fn thresholds_of(policy: &DegradationPolicySpec, dependency: Dependency) -> crate::mode::Thresholds {
    let probe = match dependency {
        Dependency::Mq => &policy.mq.probe,
        Dependency::Kv => &policy.kv.probe,
        Dependency::Mysql => &policy.mysql.probe,
        Dependency::Cache => &policy.cache.probe,
        Dependency::Cold => &policy.cold.probe,
    };
    probe::thresholds(probe)
}

/// A short stable hash (FNV-1a) of what pods must restart for.
fn config_hash(fetched: &fetch::Fetched) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let versions = fetched
        .secrets
        .values()
        .map(|s| s.metadata.resource_version.clone())
        .chain(std::iter::once(
            fetched
                .sql_config_map
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone()),
        ));
    for byte in versions
        .flatten()
        .flat_map(|v| v.into_bytes().into_iter().chain([0]))
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[tracing::instrument(skip_all, fields(pipeline = %ap.name_any(), namespace = ap.namespace().unwrap_or_default()))]
async fn reconcile(ap: Arc<AnalyticsPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let kind = vec![("kind", "AnalyticsPipeline".to_owned())];
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    let started = std::time::Instant::now();
    let result = reconcile_pipeline(&ap, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_pipeline(ap: &Arc<AnalyticsPipeline>, ctx: &Context) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(ap.as_ref());
    let ns = ap.namespace().ok_or(Error::MissingNamespace)?;
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let fetched = fetch::fetch(&ctx.client, ap).await?;
    let now = Timestamp::now();

    let valid = match validate::validate(ap, &fetched) {
        Ok(valid) => valid,
        Err(invalid) => {
            tracing::warn!(reason = invalid.reason, message = %invalid.message, "pipeline waits for its references");
            let outcome = status::Outcome::Invalid(invalid);
            report(ctx, &recorder, ap, &outcome, now).await?;
            return Ok(Action::requeue(backoff(ctx, &key)));
        }
    };

    let targets = probe::targets(ap, valid.policy, |r| valid.secret(r));
    let (detected, reasons) = sync_state(ctx, &key, ap, valid.policy, targets, now);
    let previous = ap.status.clone().unwrap_or_default().dependencies;
    let ready: Vec<String> = {
        let mut pipelines = ctx.pipelines();
        let slaves = &mut pipelines.entry(key.clone()).or_default().slaves;
        let seen = tokio::time::Instant::now();
        slaves.sync(fetched.slave_leases.clone(), seen);
        slaves.ready(seen).into_keys().collect()
    };
    let ready_slaves = i32::try_from(ready.len()).unwrap_or(i32::MAX);
    let mut publication = publish::decide(
        ap.spec.roles.slave.replicas,
        valid.policy,
        &detected,
        &reasons,
        &previous,
        ready_slaves,
        now,
    );
    // Published in the same status write as the mode it serves.
    let kv = publication
        .modes
        .get(Dependency::Kv)
        .map_or((ballast_crds::Mode::Normal, 0), |s| (s.mode, s.epoch));
    let previous_set = ap.status.as_ref().and_then(|s| s.slave_set.as_ref());
    publication.slave_set = ballast_crds::SlaveSet::next(previous_set, kv, &ready);

    let owner = ap.controller_owner_ref(&()).ok_or(Error::MissingNamespace)?;
    let inputs = desired::Inputs {
        slave_replicas: publication.slave_replicas,
        config_hash: config_hash(&fetched),
    };
    let objects = desired::objects(ap, &owner, &inputs);
    apply::apply(&ctx.client, &ns, &objects).await?;
    let rollout = rollout::judge(
        &desired::workloads(&objects),
        &fetched.deployments,
        fetched.slaves.as_slice(),
    );

    for change in &publication.changes {
        tracing::info!(dependency = change.dependency.as_str(), from = ?change.from, to = ?change.to, epoch = change.epoch, reason = %change.reason, "mode published");
        ctx.metrics
            .mode_transitions
            .get_or_create(&vec![
                ("dependency", change.dependency.as_str().to_owned()),
                ("mode", format!("{:?}", change.to)),
            ])
            .inc();
    }
    let requeue = if publication.progressing.is_some() {
        Duration::from_secs(1)
    } else if publication.slave_set.is_some() {
        // A slave that crashed changes nothing in its Lease: it only lapses.
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    let outcome = status::Outcome::Reconciled {
        publication: Box::new(publication),
        ready_slaves,
        shedding: ballast_node::membership::shedding(&fetched.intake_leases),
        rollout,
    };
    report(ctx, &recorder, ap, &outcome, now).await?;
    if let status::Outcome::Reconciled { publication, .. } = &outcome {
        let mut pipelines = ctx.pipelines();
        let state = pipelines.entry(key).or_default();
        state.failed_attempts = 0;
        state.published = Dependency::ALL
            .into_iter()
            .filter_map(|d| publication.modes.get(d).map(|s| (d, s.mode)))
            .collect();
    }
    Ok(Action::requeue(requeue))
}

/// Publishes the outcome's Events, then writes its status and the gauges.
/// Events first: a status already written would not show the transition
/// again, so an Event that failed after it would be lost; an Event that
/// succeeded before a failed status write is published again on the retry
/// (the recorder folds the repeat into a series).
async fn report(
    ctx: &Context,
    recorder: &Recorder,
    ap: &AnalyticsPipeline,
    outcome: &status::Outcome,
    now: Timestamp,
) -> Result<(), Error> {
    status::record(recorder, ap, outcome).await?;
    let computed = status::compute(ap, outcome, now);
    status::write(&ctx.client, ap, &computed).await?;
    let ready = computed
        .conditions
        .iter()
        .any(|c| c.type_ == ballast_crds::conditions::READY && c.status == "True");
    ctx.metrics.pipeline(
        ap.metadata.namespace.as_deref().unwrap_or_default(),
        &ap.name_any(),
        &computed.dependencies,
        ready,
    );
    Ok(())
}

type Detected = (BTreeMap<Dependency, Machine>, BTreeMap<Dependency, String>);

/// Brings the shared state in line with the spec (overrides, probers) and steps
/// each machine once without a probe, so that overrides take effect at once.
fn sync_state(
    ctx: &Context,
    key: &ObjectRef<AnalyticsPipeline>,
    ap: &AnalyticsPipeline,
    policy: &DegradationPolicySpec,
    targets: Vec<probe::Target>,
    now: Timestamp,
) -> Detected {
    let mut pipelines = ctx.pipelines();
    let state = pipelines.entry(key.clone()).or_insert_with(|| resume(ap));
    state.paused = ap.spec.override_.as_ref().is_some_and(|o| o.pause_failover);
    state.forced = Dependency::ALL
        .into_iter()
        .filter_map(|d| probe::forced(ap, d).map(|f| (d, f)))
        .collect();
    let changed = state.targets.as_ref() != Some(&targets);
    if changed {
        // Subscribing takes the probers' lock: release the pipelines' first.
        drop(pipelines);
        probe::unsubscribe(ctx, key);
        probe::subscribe(ctx, key, &targets);
        pipelines = ctx.pipelines();
    }
    let state = pipelines.entry(key.clone()).or_insert_with(|| resume(ap));
    state.targets = Some(targets);
    for dependency in Dependency::ALL {
        state.step(dependency, None, thresholds_of(policy, dependency), now);
    }
    (state.machines.clone(), state.reasons.clone())
}

/// State for a pipeline seen for the first time (or after an operator restart):
/// modes and epochs resume from the published status; probe counts start afresh.
fn resume(ap: &AnalyticsPipeline) -> PipelineState {
    let mut state = PipelineState::default();
    let modes = ap.status.clone().unwrap_or_default().dependencies;
    for dependency in Dependency::ALL {
        if let Some(s) = modes.get(dependency) {
            state.machines.insert(
                dependency,
                Machine {
                    mode: s.mode,
                    epoch: s.epoch,
                    since: s.since.0,
                    forced: s.forced,
                    failures: 0,
                    successes: 0,
                },
            );
            state.published.insert(dependency, s.mode);
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_from_one_second_and_caps_at_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 40].map(|a| retry_delay(a).as_secs()).to_vec();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300]);
    }
}
