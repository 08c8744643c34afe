//! The MemberStore controller: probes each data centre's Elasticsearch
//! through the shared probers (the pure mode machine finds it down), measures
//! how far each kept cluster is behind the change stream from its
//! replicator's consumer group ([`lag`]), decides which data centre is active
//! ([`promotion`]: promotion within the lag budget or when a person names
//! one, failback after the catch-up and the dwell, only while this operator
//! holds its Lease), and publishes it under a new epoch with the replication
//! and the conditions ([`status`]), an Event and a log line per promotion.
//! The member-service and replicator workloads come next (#16).

pub mod lag;
pub mod promotion;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::degradation_policy::ProbeSpec;
use ballast_crds::member_store::{PROMOTE_ANNOTATION, replica_group};
use ballast_crds::{MemberStore, Mode};
use ballast_node::probe::Endpoint;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::mode::{self, Input, Observation, Thresholds};
use crate::probe::{self, Feed};
use promotion::{Decision, Facts, Lag};

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
    /// Publishing an Event failed.
    #[error("publishing an event: {0}")]
    Event(#[source] kube::Error),
}

/// What the probers and the reconciles of one MemberStore share.
#[derive(Debug, Default)]
pub struct StoreState {
    /// The detected health of each data centre's Elasticsearch.
    pub machines: BTreeMap<String, mode::Machine>,
    /// What the store is subscribed to probe: (data centre, endpoint, probe).
    targets: Option<Vec<(String, Endpoint, ProbeSpec)>>,
    /// Since when the primary, while kept, has lacked no record (this
    /// operator's clock: a new leader starts the dwell again).
    primary_caught_up_since: Option<tokio::time::Instant>,
    /// The reason of the last `ActiveAvailable` decision, so that a wait is
    /// announced once.
    last_reason: Option<&'static str>,
}

impl StoreState {
    /// Steps data centre `dc`'s machine; true when its mode changed.
    pub fn step(
        &mut self,
        dc: &str,
        observation: Option<Observation>,
        thresholds: Thresholds,
        now: Timestamp,
    ) -> bool {
        let machine = self
            .machines
            .entry(dc.to_owned())
            .or_insert_with(|| mode::Machine::new(now));
        let input = Input {
            observation,
            // Nothing switches back: an answering cluster is usable at once.
            switched_back: true,
            forced: None,
            paused: false,
        };
        let step = mode::machine::step(machine, input, thresholds, now);
        *machine = step.machine;
        step.transition.is_some()
    }

    /// Whether each probed data centre's Elasticsearch answers.
    fn up(&self) -> BTreeMap<String, bool> {
        self.machines
            .iter()
            .map(|(dc, m)| (dc.clone(), m.mode != Mode::Degraded))
            .collect()
    }
}

/// The controller's context: the operator's, and the token that is
/// cancelled when it stops holding its Lease.
struct Ctl {
    ctx: Context,
    leading: CancellationToken,
}

/// Runs the controller until `shutdown` (the loss of the Lease) is cancelled.
pub async fn run(
    ctx: Context,
    triggers: mpsc::UnboundedReceiver<ObjectRef<MemberStore>>,
    shutdown: CancellationToken,
) {
    let triggers = futures::stream::unfold(
        triggers,
        |mut rx| async move { rx.recv().await.map(|key| (key, rx)) },
    );
    let stop = shutdown.clone();
    let ctl = Arc::new(Ctl {
        ctx: ctx.clone(),
        leading: shutdown,
    });
    Controller::new(ctx.api::<MemberStore>(), watcher::Config::default())
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctl)
        .for_each(|_| async {})
        .await;
    // The probers of every store stop with the controller.
    probe::detach(&ctx, |feed| matches!(feed, Feed::Store(..)));
    ctx.stores().clear();
}

/// The probes of each data centre's Elasticsearch.
fn targets(ms: &MemberStore) -> Vec<(String, Endpoint, ProbeSpec)> {
    ms.spec
        .data_centers
        .iter()
        .map(|dc| {
            let endpoint = Endpoint::Elasticsearch {
                url: dc.elasticsearch.url.clone(),
                credentials: None,
            };
            (dc.name.clone(), endpoint, ms.spec.promotion.probe.clone())
        })
        .collect()
}

/// Brings the store's subscriptions in line with its spec and steps each
/// machine once without a probe; the state's copy for the decision.
fn sync(ctx: &Context, key: &ObjectRef<MemberStore>, ms: &MemberStore) -> BTreeMap<String, bool> {
    let want = targets(ms);
    let thresholds = probe::thresholds(&ms.spec.promotion.probe);
    let changed = ctx.stores().get(key).and_then(|s| s.targets.as_ref()) != Some(&want);
    if changed {
        // Subscribing takes the probers' lock: never while holding the stores'.
        probe::detach(ctx, |feed| matches!(feed, Feed::Store(k, _) if k == key));
        for (dc, endpoint, spec) in &want {
            probe::attach(ctx, Feed::Store(key.clone(), dc.clone()), endpoint, spec);
        }
    }
    let mut stores = ctx.stores();
    let state = stores.entry(key.clone()).or_default();
    state.targets = Some(want);
    let now = Timestamp::now();
    for dc in &ms.spec.data_centers {
        state.step(&dc.name, None, thresholds, now);
    }
    state.up()
}

#[tracing::instrument(skip_all, fields(store = %ms.name_any(), namespace = ms.namespace().unwrap_or_default()))]
async fn reconcile(ms: Arc<MemberStore>, ctl: Arc<Ctl>) -> Result<Action, Error> {
    let ctx = &ctl.ctx;
    let kind = vec![("kind", "MemberStore".to_owned())];
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    let started = std::time::Instant::now();
    let ns = ms.namespace().ok_or(Error::MissingNamespace)?;
    let name = ms.name_any();
    let key = ObjectRef::from_obj(ms.as_ref());
    let up = sync(ctx, &key, &ms);

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
    let now = Timestamp::now();
    let replication = status::replication(&ms, &measured, now);
    let lags = status::verdicts(&ms, &measured, &replication);

    let active = ms.active_data_center().to_owned();
    let primary = ms.spec.primary.clone();
    let caught_up_for = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        let caught_up = active != primary && matches!(lags.get(&primary), Some(Lag::Within(0)));
        if caught_up {
            let since = *state
                .primary_caught_up_since
                .get_or_insert_with(tokio::time::Instant::now);
            Some(since.elapsed())
        } else {
            state.primary_caught_up_since = None;
            None
        }
    };
    let order: Vec<String> = ms.spec.data_centers.iter().map(|dc| dc.name.clone()).collect();
    let named = ms.annotations().get(PROMOTE_ANNOTATION).map(String::as_str);
    let facts = Facts {
        order: &order,
        primary: &primary,
        active: &active,
        up: &up,
        lag: &lags,
        // Judged now, on this replica's clock: the Lease's holder renews it
        // or cancels this token before it lapses.
        leading: !ctl.leading.is_cancelled(),
        named,
        failback: ms.spec.failback,
        primary_caught_up_for: caught_up_for,
        dwell: Duration::from_secs(u64::try_from(ms.spec.promotion.failback_dwell_seconds).unwrap_or(0)),
    };
    let decision = promotion::decide(&facts);
    let condition = match &decision {
        Decision::Stay { reason, message } | Decision::Promote { reason, message, .. } => {
            ballast_crds::conditions::Desired::holds(
                ballast_crds::conditions::ACTIVE_AVAILABLE,
                *reason,
                message.clone(),
            )
        }
        Decision::Wait { reason, message } => ballast_crds::conditions::Desired::fails(
            ballast_crds::conditions::ACTIVE_AVAILABLE,
            *reason,
            message.clone(),
        ),
    };
    let previous_epoch = ms.status.as_ref().map_or(0, |s| s.epoch);
    let desired = [status::in_sync(&ms, &measured, &lags), condition];
    let mut computed = status::compute(&ms, replication, &desired, now);

    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = ms.object_ref(&());
    if let Decision::Promote { to, reason, message } = &decision {
        computed.active_data_center = Some(to.clone());
        computed.epoch = previous_epoch + 1;
        computed.since = Some(Time(now));
        tracing::warn!(from = %active, to = %to, epoch = computed.epoch, reason, %message, "active data centre changed");
        ctx.metrics
            .member_promotions
            .get_or_create(&vec![("reason", (*reason).to_owned())])
            .inc();
        publish(
            &recorder,
            &reference,
            EventType::Warning,
            reason,
            format!("epoch {}: {message}", computed.epoch),
        )
        .await?;
    }
    let reason = match &decision {
        Decision::Stay { reason, .. } | Decision::Wait { reason, .. } | Decision::Promote { reason, .. } => {
            *reason
        }
    };
    let announce = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        let changed = state.last_reason != Some(reason);
        state.last_reason = Some(reason);
        changed
    };
    if let (true, Decision::Wait { reason, message }) = (announce, &decision) {
        tracing::warn!(reason, %message, "the active data centre is down and is not replaced");
        publish(&recorder, &reference, EventType::Warning, reason, message.clone()).await?;
    }

    if ms.status.as_ref() != Some(&computed) {
        let api: Api<MemberStore> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"status": {
            "observedGeneration": computed.observed_generation,
            "conditions": computed.conditions,
            "replication": computed.replication,
            "activeDataCenter": computed.active_data_center,
            "epoch": computed.epoch,
            "since": computed.since,
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::Status)?;
    }
    ctx.metrics
        .reconcile_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    let period =
        Duration::from_secs(u64::try_from(ms.spec.promotion.probe.period_seconds.max(1)).unwrap_or(1));
    Ok(Action::requeue(MEASURE_EVERY.min(period * 2)))
}

async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) -> Result<(), Error> {
    recorder
        .publish(
            &Event {
                type_,
                reason: reason.to_owned(),
                note: Some(note),
                action: "Failover".into(),
                secondary: None,
            },
            reference,
        )
        .await
        .map_err(Error::Event)
}

fn error_policy(ms: Arc<MemberStore>, error: &Error, ctl: Arc<Ctl>) -> Action {
    tracing::warn!(store = %ms.name_any(), %error, "MemberStore reconcile failed; retrying");
    let label = match error {
        Error::MissingNamespace => "missing_namespace",
        Error::Status(_) => "status",
        Error::Event(_) => "event",
    };
    ctl.ctx
        .metrics
        .reconcile_errors
        .get_or_create(&vec![
            ("kind", "MemberStore".to_owned()),
            ("error", label.to_owned()),
        ])
        .inc();
    Action::requeue(Duration::from_secs(1))
}
