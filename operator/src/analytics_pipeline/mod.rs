//! The AnalyticsPipeline controller: fetch → validate → probe state → publish →
//! desired objects → apply → status, one file per step.

pub mod apply;
pub mod data_plane;
pub mod desired;
pub mod fetch;
pub mod nightly;
pub mod owned;
pub mod pods;
pub mod publish;
pub mod rollout;
pub mod slaves;
pub mod source_schema;
pub mod sql;
pub mod status;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy, DegradationPolicySpec, Dependency};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
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
    /// The system gave no randomness for a new data-plane token.
    #[error("generating a data-plane token: {0}")]
    Random(#[source] getrandom::Error),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::MissingNamespace => "missing_namespace",
            Self::Fetch(_) => "fetch",
            Self::Apply { .. } => "apply",
            Self::Status(_) => "status",
            Self::Event(_) => "event",
            Self::Random(_) => "random",
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
    let pipelines: Api<AnalyticsPipeline> = ctx.api();
    let controller = Controller::new(pipelines, watcher::Config::default());
    let store = controller.store();
    tokio::spawn(sweep(ctx.clone(), store.clone(), shutdown.clone()));
    tokio::spawn(slaves::watch(ctx.clone(), shutdown.clone()));

    // Secrets are not watched: the operator may only get the ones pipelines
    // name (a watch needs list and watch on every Secret the scope holds). A
    // changed Secret is read on the pipeline's next reconcile, at most 30 s
    // later, and rolls the workers through the config hash.
    let by_policy = store.clone();
    let by_config_map = store.clone();
    let triggers = futures::stream::unfold(
        triggers,
        |mut rx| async move { rx.recv().await.map(|key| (key, rx)) },
    );
    let stop = shutdown.clone();
    controller
        .owns(ctx.api::<Deployment>(), watcher::Config::default())
        .owns(ctx.api::<StatefulSet>(), watcher::Config::default())
        .owns(ctx.api::<Service>(), watcher::Config::default())
        .watches(
            ctx.api::<DegradationPolicy>(),
            watcher::Config::default(),
            move |dp| referencing(&by_policy, &dp, |ap| ap.spec.policy_ref.name == dp.name_any()),
        )
        .watches(ctx.api::<ConfigMap>(), watcher::Config::default(), move |cm| {
            referencing(&by_config_map, &cm, |ap| {
                ap.spec
                    .compute
                    .sql_config_map_ref
                    .as_ref()
                    .is_some_and(|r| r.name == cm.name_any())
            })
        })
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

/// What the workers read once, at start: the spec but its SQL (which applies
/// from one window on without a roll: the master stamps it on each task) and
/// what only the operator reads (replicas, overrides), the policy, and the
/// referenced Secrets' versions. Pure.
fn worker_config(ap: &AnalyticsPipeline, fetched: &fetch::Fetched) -> String {
    let mut spec = serde_json::to_value(&ap.spec).unwrap_or_default();
    if let Some(compute) = spec.get_mut("compute").and_then(serde_json::Value::as_object_mut) {
        compute.remove("sql");
        compute.remove("sqlConfigMapRef");
    }
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("roles");
        spec.remove("override");
    }
    let policy = fetched
        .policy
        .as_ref()
        .map(|p| serde_json::to_string(&p.spec).unwrap_or_default());
    let secrets = fetched
        .secrets
        .values()
        .filter_map(|s| s.metadata.resource_version.clone());
    std::iter::once(spec.to_string())
        .chain(policy)
        .chain(secrets)
        .collect::<Vec<_>>()
        .join("\0")
}

/// A short stable hash of [`worker_config`], in the pod template: pods roll when it changes.
fn config_hash(ap: &AnalyticsPipeline, fetched: &fetch::Fetched) -> String {
    ballast_crds::sql::id(&worker_config(ap, fetched))
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
    let owner = ap.controller_owner_ref(&()).ok_or(Error::MissingNamespace)?;
    let mut fetched = fetch::fetch(&ctx.client, ap).await?;
    let name = ap.name_any();
    let token_secret = data_plane::secret_name(&name);
    if let std::collections::btree_map::Entry::Vacant(missing) = fetched.secrets.entry(token_secret) {
        // Before the config hash is taken: the pods start with the token.
        missing.insert(apply::data_plane_secret(&ctx.client, &ns, &name, &owner).await?);
    }
    let now = Timestamp::now();

    let checked = validate::validate(ap, &fetched)
        .and_then(|valid| Ok((validate::worker_image(ap, ctx.worker_image.as_deref())?, valid)));
    let (image, valid) = match checked {
        Ok(checked) => checked,
        Err(invalid) => {
            tracing::warn!(reason = invalid.reason, message = %invalid.message, "pipeline waits for its references");
            let outcome = status::Outcome::Invalid(invalid);
            report(ctx, &recorder, ap, &outcome, now).await?;
            return Ok(Action::requeue(backoff(ctx, &key)));
        }
    };

    let targets = probe::targets(ap, valid.policy, |r| valid.secret(r), valid.cold_credentials(ap));
    let password = ap
        .spec
        .source
        .mysql
        .password_secret_ref
        .as_ref()
        .and_then(|r| valid.secret(r));
    let source_schema = schema(ctx, &key, ap, password);
    let previous_sql = ap.status.as_ref().and_then(|s| s.sql.as_ref());
    let sql = sql::decide(
        valid.sql_text(ap).as_deref(),
        ap.metadata.generation.unwrap_or_default(),
        previous_sql,
        &fetched.master_report,
    );
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

    let inputs = desired::Inputs {
        image,
        writes_role: ctx.writes_role,
        slave_replicas: publication.slave_replicas,
        config_hash: config_hash(ap, &fetched),
        slave_memory_mib: i64::from(valid.policy.kv.max_memory_mib),
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
    } else if publication.slave_set.is_some() || fetched.master_report.failing_total > 0 {
        // A slave that crashed changes nothing in its Lease: it only lapses;
        // a failing window is reported in a ConfigMap that is not watched.
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    let outcome = status::Outcome::Reconciled {
        publication: Box::new(publication),
        ready_slaves,
        shedding: ballast_node::membership::shedding(&fetched.intake_leases),
        rollout,
        master: Box::new(fetched.master_report),
        source_schema,
        sql: Box::new(sql),
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
    let failing = match outcome {
        status::Outcome::Reconciled { master, .. } => master.failing_total,
        status::Outcome::Invalid(_) => 0,
    };
    ctx.metrics.pipeline(
        ap.metadata.namespace.as_deref().unwrap_or_default(),
        &ap.name_any(),
        &computed.dependencies,
        ready,
        failing,
    );
    Ok(())
}

/// The source schema read since the last reconcile, to publish; starts a
/// new read in the background when one is due, which triggers a reconcile
/// when done.
fn schema(
    ctx: &Context,
    key: &ObjectRef<AnalyticsPipeline>,
    ap: &AnalyticsPipeline,
    password: Option<ballast_node::secret::Secret>,
) -> Option<ballast_crds::SourceSchema> {
    let mut pipelines = ctx.pipelines();
    let state = &mut pipelines.entry(key.clone()).or_default().source_schema;
    let due = state
        .started
        .is_none_or(|at| at.elapsed() >= source_schema::REFRESH);
    if due {
        state.started = Some(tokio::time::Instant::now());
        let (ctx, key) = (ctx.clone(), key.clone());
        let source = ap.spec.source.clone();
        tokio::spawn(async move {
            match source_schema::read(&source.mysql, password.as_ref(), &source.tables).await {
                Ok(schema) => {
                    if let Some(state) = ctx.pipelines().get_mut(&key) {
                        state.source_schema.read = Some(schema);
                    }
                    ctx.trigger(key);
                }
                Err(error) => {
                    tracing::warn!(%error, "reading the source schema failed; the last one stays published")
                }
            }
        });
    }
    state.read.take()
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
    fn workers_roll_for_what_they_read_at_start_and_not_for_the_sql() {
        let base: AnalyticsPipeline =
            serde_yaml::from_str(include_str!("../../../manifests/samples/analyticspipeline.yaml"))
                .expect("sample pipeline");
        let fetched = fetch::Fetched::default();
        let hash = |change: &dyn Fn(&mut AnalyticsPipeline)| {
            let mut ap = base.clone();
            change(&mut ap);
            config_hash(&ap, &fetched)
        };
        let same = hash(&|_| {});
        // (what changes, whether the workers roll)
        type Change<'a> = (&'a str, &'a dyn Fn(&mut AnalyticsPipeline), bool);
        let cases: [Change<'_>; 5] = [
            (
                "the SQL",
                &|ap| ap.spec.compute.sql = Some("SELECT 1".into()),
                false,
            ),
            (
                "the slave replicas",
                &|ap| ap.spec.roles.slave.replicas += 1,
                false,
            ),
            (
                "the tracked tables",
                &|ap| ap.spec.source.tables.push("refunds".into()),
                true,
            ),
            (
                "the merchant column",
                &|ap| ap.spec.source.merchant_column = "shop_id".into(),
                true,
            ),
            ("the window", &|ap| ap.spec.compute.window_seconds += 60, true),
        ];
        for (what, change, rolls) in cases {
            assert_eq!(hash(change) != same, rolls, "{what}");
        }
    }

    #[test]
    fn retry_delay_doubles_from_one_second_and_caps_at_five_minutes() {
        let delays: Vec<u64> = [1, 2, 3, 4, 9, 10, 40].map(|a| retry_delay(a).as_secs()).to_vec();
        assert_eq!(delays, [1, 2, 4, 8, 256, 300, 300]);
    }
}
