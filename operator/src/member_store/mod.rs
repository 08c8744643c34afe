//! The MemberStore controller: probes each data centre's Elasticsearch and
//! member cache through the shared probers (the pure mode machine finds them
//! down), takes a cache that does not answer out of use and empties it when
//! it returns, before it is read again ([`caches`]), measures
//! how far each kept cluster is behind the change stream from its
//! replicator's consumer group ([`lag`]), decides which data centre is active
//! ([`promotion`]: promotion within the lag budget or when a person names
//! one, failback after the catch-up and the dwell, only while this operator
//! holds its Lease), and publishes it under a new epoch with the replication
//! and the conditions ([`status`]), an Event and a log line per promotion.
//! It probes each data centre's MySQL too, publishes the master's mode, and
//! promotes, fences and switches back the MySQL servers ([`mysql`]) under
//! the same epoch. It runs the member services in each data centre's
//! namespace and the replicator ([`desired`], [`workloads`]), and a finalizer
//! removes what it made outside the store's own namespace.

pub mod caches;
pub mod desired;
pub mod fetch;
pub mod lag;
pub mod mysql;
pub mod mysql_failover;
pub mod mysql_topology;
pub mod promotion;
pub mod replay;
pub mod status;
pub mod workloads;

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
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
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
    /// Removing the workloads of a deleted store, or adding or removing its
    /// finalizer, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The workloads of a deleted store could not be removed.
    #[error(transparent)]
    Workloads(#[from] workloads::WorkloadError),
    /// A credential the spec references could not be read: the probes keep
    /// what they had rather than probe without it (and find a secured server down).
    #[error(transparent)]
    Credentials(#[from] fetch::FetchError),
}

/// What a MemberStore's probers watch in each data centre.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Watched {
    /// Its Elasticsearch: down, another data centre is promoted.
    Elasticsearch,
    /// Its member cache (Redis): down, writes leave it out ([`caches`]).
    Cache,
    /// Its MySQL: the master down, the member services write through
    /// Elasticsearch and a replica may be promoted ([`mysql`]).
    Mysql,
}

/// What the probers and the reconciles of one MemberStore share.
#[derive(Debug, Default)]
pub struct StoreState {
    /// The detected health of what is watched in each data centre.
    pub machines: BTreeMap<(Watched, String), mode::Machine>,
    /// What the store is subscribed to probe.
    targets: Option<Vec<Target>>,
    /// Each data centre's cache since it last changed mode.
    caches: BTreeMap<String, caches::Returning>,
    /// Since when the primary, while kept, has lacked no record (this
    /// operator's clock: a new leader starts the dwell again).
    primary_caught_up_since: Option<tokio::time::Instant>,
    /// The primary's applied offset while kept and lacking records, and
    /// since when it has stood there ([`replay`]).
    primary_applied: Option<(i64, tokio::time::Instant)>,
    /// The reason of the last `ActiveAvailable` decision, so that a wait is
    /// announced once.
    last_reason: Option<&'static str>,
    /// The cause of each machine's last transition.
    reasons: BTreeMap<(Watched, String), &'static str>,
    /// Since when the primary's MySQL, while a replica, has lacked nothing
    /// of the master (this operator's clock).
    mysql_primary_caught_up_since: Option<tokio::time::Instant>,
    /// The reason of the last `MysqlMasterAvailable` decision.
    mysql_last_reason: Option<&'static str>,
}

/// One probe of a store: what, in which data centre, where and how.
type Target = (Watched, String, Endpoint, ProbeSpec);

impl StoreState {
    /// Steps the machine of `watched` in data centre `dc`; true when its mode changed.
    pub fn step(
        &mut self,
        watched: Watched,
        dc: &str,
        observation: Option<Observation>,
        thresholds: Thresholds,
        now: Timestamp,
    ) -> bool {
        let machine = self
            .machines
            .entry((watched, dc.to_owned()))
            .or_insert_with(|| mode::Machine::new(now));
        let switched_back = match watched {
            // An answering cluster or server is usable at once (the member
            // services replay into MySQL what they journaled).
            Watched::Elasticsearch | Watched::Mysql => true,
            // A returning cache only once it has been emptied.
            Watched::Cache => self.caches.get(dc).is_some_and(|c| c.emptied),
        };
        let input = Input {
            observation,
            switched_back,
            forced: None,
            paused: false,
        };
        let step = mode::machine::step(machine, input, thresholds, now);
        *machine = step.machine;
        let Some(transition) = step.transition else {
            return false;
        };
        self.reasons.insert((watched, dc.to_owned()), transition.reason());
        if watched == Watched::Cache {
            let mode = machine.mode;
            self.caches.entry(dc.to_owned()).or_default().entered(
                mode,
                transition.reason(),
                tokio::time::Instant::now(),
            );
        }
        true
    }

    /// The mode of what is watched in `dc` (Normal until probed).
    fn mode(&self, watched: Watched, dc: &str) -> Mode {
        self.machines
            .get(&(watched, dc.to_owned()))
            .map_or(Mode::Normal, |m| m.mode)
    }

    /// Whether each probed data centre's Elasticsearch answers.
    fn up(&self) -> BTreeMap<String, bool> {
        self.machines
            .iter()
            .filter(|((watched, _), _)| *watched == Watched::Elasticsearch)
            .map(|((_, dc), m)| (dc.clone(), m.mode != Mode::Degraded))
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
    // The reconcile writes the status every time (the lag is measured anew),
    // so a change of status alone must not trigger one, or it would loop:
    // the spec, an annotation (`ballast.dev/promote`), the finalizers and a
    // deletion do; the probes' triggers and the requeue do the rest. The
    // store still sees every change, status included.
    let (reader, writer) = reflector::store();
    let changes = reflector(
        writer,
        watcher(ctx.api::<MemberStore>(), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::annotations)
            .combine(predicates::finalizers),
        PredicateConfig::default(),
    );
    Controller::for_stream(changes, reader)
        .reconcile_on(triggers)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctl)
        .for_each(|_| async {})
        .await;
    // The probers of every store stop with the controller.
    probe::detach(&ctx, |feed| matches!(feed, Feed::Store(..)));
    ctx.stores().clear();
}

/// The probes of each data centre's Elasticsearch and cache, with their credentials.
fn targets(ms: &MemberStore, credentials: &fetch::Credentials) -> Vec<Target> {
    let probe = &ms.spec.promotion.probe;
    ms.spec
        .data_centers
        .iter()
        .flat_map(|dc| {
            let search = Endpoint::Elasticsearch {
                url: dc.elasticsearch.url.clone(),
                credentials: credentials.elasticsearch.get(&dc.name).cloned(),
            };
            let cache = Endpoint::redis(&dc.redis, credentials.redis.get(&dc.name).cloned());
            let mysql = Endpoint::mysql(&dc.mysql, credentials.mysql.get(&dc.name).cloned());
            [
                (Watched::Elasticsearch, dc.name.clone(), search, probe.clone()),
                (Watched::Cache, dc.name.clone(), cache, probe.clone()),
                (Watched::Mysql, dc.name.clone(), mysql, probe.clone()),
            ]
        })
        .collect()
}

/// Brings the store's subscriptions in line with its spec and steps each
/// machine once without a probe; the state's copy for the decision.
fn sync(
    ctx: &Context,
    key: &ObjectRef<MemberStore>,
    ms: &MemberStore,
    credentials: &fetch::Credentials,
) -> BTreeMap<String, bool> {
    let want = targets(ms, credentials);
    let thresholds = probe::thresholds(&ms.spec.promotion.probe);
    let changed = ctx.stores().get(key).and_then(|s| s.targets.as_ref()) != Some(&want);
    if changed {
        // Subscribing takes the probers' lock: never while holding the stores'.
        probe::detach(ctx, |feed| matches!(feed, Feed::Store(k, ..) if k == key));
        for (watched, dc, endpoint, spec) in &want {
            probe::attach(
                ctx,
                Feed::Store(key.clone(), *watched, dc.clone()),
                endpoint,
                spec,
            );
        }
    }
    let mut stores = ctx.stores();
    let state = stores.entry(key.clone()).or_default();
    state.targets = Some(want);
    let now = Timestamp::now();
    for published in ms.status.iter().flat_map(|s| &s.caches) {
        // A new leader goes on from what was published: a cache published
        // down stays out of use until it has answered and been emptied.
        let since = published.since.0;
        state
            .machines
            .entry((Watched::Cache, published.data_center.clone()))
            .or_insert_with(|| mode::Machine {
                mode: published.mode,
                since,
                ..mode::Machine::new(since)
            });
    }
    for dc in &ms.spec.data_centers {
        for watched in [Watched::Elasticsearch, Watched::Cache, Watched::Mysql] {
            state.step(watched, &dc.name, None, thresholds, now);
        }
    }
    state.up()
}

#[tracing::instrument(skip_all, fields(store = %ms.name_any(), namespace = ms.namespace().unwrap_or_default()))]
async fn reconcile(ms: Arc<MemberStore>, ctl: Arc<Ctl>) -> Result<Action, Error> {
    let ns = ms.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<MemberStore> = Api::namespaced(ctl.ctx.client.clone(), &ns);
    finalizer(&api, desired::FINALIZER, ms, |event| async {
        match event {
            finalizer::Event::Apply(ms) => run_store(ms, &ctl).await,
            finalizer::Event::Cleanup(ms) => retire(ms, &ctl).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The store is being deleted: what it made in the data centres' namespaces
/// goes, and its probers stop.
async fn retire(ms: Arc<MemberStore>, ctl: &Ctl) -> Result<Action, Error> {
    let ctx = &ctl.ctx;
    let ns = ms.namespace().ok_or(Error::MissingNamespace)?;
    workloads::clean_up(&ctx.client, &ms, &ns).await?;
    let key = ObjectRef::from_obj(ms.as_ref());
    probe::detach(ctx, |feed| matches!(feed, Feed::Store(k, ..) if *k == key));
    ctx.stores().remove(&key);
    tracing::info!("the MemberStore's workloads in its data centres' namespaces were deleted");
    Ok(Action::await_change())
}

async fn run_store(ms: Arc<MemberStore>, ctl: &Ctl) -> Result<Action, Error> {
    let ctx = &ctl.ctx;
    let kind = vec![("kind", "MemberStore".to_owned())];
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    let started = std::time::Instant::now();
    let ns = ms.namespace().ok_or(Error::MissingNamespace)?;
    let name = ms.name_any();
    let key = ObjectRef::from_obj(ms.as_ref());
    let credentials = fetch::credentials(&ctx.client, &ns, &ms).await?;
    let up = sync(ctx, &key, &ms, &credentials);
    let grace_left = caches::settle(ctx, &key, &ms, &credentials).await;
    let leading = !ctl.leading.is_cancelled();
    let mysql = mysql::reconcile(ctx, &key, &ms, credentials.mysql_admin.as_ref(), leading).await;

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
    let seen = (active != primary).then(|| replay::Seen {
        answers: up.get(&primary).copied() == Some(true),
        caught_up: matches!(lags.get(&primary), Some(Lag::Within(_)))
            && replication
                .iter()
                .any(|r| r.cluster == primary && status::caught_up(r)),
        applied: measured
            .iter()
            .find(|(cluster, _)| cluster.name == primary)
            .and_then(|(_, m)| m.as_ref().ok())
            .map(|m| (m.applied, m.applied < m.end)),
    });
    let replay = replay::track(ctx.stores().entry(key.clone()).or_default(), seen);
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
        leading,
        named,
        failback: ms.spec.failback,
        primary_caught_up_for: replay.caught_up_for,
        primary_stalled_for: replay.stalled_for,
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
    let ready = match ms.spec.image.as_deref().or(ctx.worker_image.as_deref()) {
        Some(image) => {
            let owner = ms.controller_owner_ref(&()).unwrap_or_default();
            let placed = desired::objects(&ms, &ns, &owner, image);
            workloads::ensure(&ctx.client, &ms, &ns, &placed).await
        }
        None => ballast_crds::conditions::Desired::fails(
            ballast_crds::conditions::READY,
            "NoWorkerImage",
            "spec.image is not set and the operator was given no worker image \
             (BALLAST_WORKER_IMAGE, set by the chart's workerImage values)",
        ),
    };
    let desired = [
        ready,
        status::in_sync(&ms, &measured, &lags),
        condition,
        mysql.condition.clone(),
    ];
    let mut computed = status::compute(&ms, replication, &desired, now);
    computed.caches = ctx
        .stores()
        .get(&key)
        .map(|state| caches::published(&ms, state))
        .unwrap_or_default();
    computed.mysql = mysql.mode.clone();
    computed.mysql_master = Some(mysql.master.clone());
    computed.mysql_demoted = mysql.demoted.clone();
    computed.mysql_replication = mysql.replication.clone();
    if mysql.changed {
        computed.epoch = ms.epoch() + 1;
        ctx.metrics
            .member_promotions
            .get_or_create(&vec![("reason", format!("mysql-{}", mysql.condition.reason))])
            .inc();
    }

    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = ms.object_ref(&());
    if let Decision::Promote { to, reason, message } = &decision {
        // The demoted cluster's replica group resumes where the replicator
        // last committed (it follows the active cluster too, so that is
        // recent): records it already holds are passed over by version, and
        // the promotion waits on no Kafka call.
        computed.active_data_center = Some(to.clone());
        computed.epoch = ms.epoch() + 1;
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
    let reason = decision.reason();
    let announce = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        let changed = state.last_reason != Some(reason);
        state.last_reason = Some(reason);
        changed
    };
    if let (true, Some((reason, message))) = (announce, decision.warning()) {
        tracing::warn!(reason, %message, "the active data centre needs a person");
        publish(
            &recorder,
            &reference,
            EventType::Warning,
            reason,
            message.to_owned(),
        )
        .await?;
    }

    let before = ms
        .status
        .as_ref()
        .map(|s| s.caches.as_slice())
        .unwrap_or_default();
    for (warning, reason, message) in &mysql.events {
        let type_ = if *warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(&recorder, &reference, type_, reason, message.clone()).await?;
    }
    for said in caches::announcements(before, &computed.caches) {
        tracing::warn!(reason = said.reason, message = %said.message, "member cache mode changed");
        let type_ = if said.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(&recorder, &reference, type_, said.reason, said.message).await?;
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
            "caches": computed.caches,
            "mysql": computed.mysql,
            "mysqlMaster": computed.mysql_master,
            "mysqlDemoted": computed.mysql_demoted,
            "mysqlReplication": computed.mysql_replication,
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
    let next = MEASURE_EVERY.min(period * 2);
    // A promoted MySQL master is opened at the next reconcile.
    let next = if mysql.hurry {
        Duration::from_millis(200)
    } else {
        next
    };
    Ok(Action::requeue(grace_left.map_or(next, |left| left.min(next))))
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
        Error::Credentials(_) => "credentials",
        Error::Finalizer(_) => "finalizer",
        Error::Workloads(_) => "workloads",
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
