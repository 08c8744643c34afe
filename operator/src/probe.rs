//! Health probers: one task per probed server, shared by every pipeline
//! dependency and MemberStore data centre that probes it, probing with the
//! data plane's own clients and feeding the pure mode machine.
//!
//! Probing is I/O at the edge; the decision is `mode::machine::step`. A
//! transition triggers a reconcile of the pipeline, which publishes it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_crds::degradation_policy::ProbeSpec;
use ballast_crds::{AnalyticsPipeline, DegradationPolicySpec, Dependency, ForcedMode, MemberStore, Mode};
use ballast_node::probe::{Endpoint, Prober};
use ballast_node::secret::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::member_store::Watched;
use crate::mode::{self, Input, Observation, Thresholds};

/// What one prober probes and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The dependency.
    pub dependency: Dependency,
    /// Where the server is, with its credentials as typed fields.
    pub endpoint: Endpoint,
    /// Period, timeout and thresholds.
    pub probe: ProbeSpec,
}

/// The probe targets of a pipeline, from its spec, policy and Secrets.
/// `password(secret_ref)` resolves a Secret key fetched earlier;
/// `cold_credentials` are the cold store's user and password, if secured.
pub fn targets(
    ap: &AnalyticsPipeline,
    policy: &DegradationPolicySpec,
    password: impl Fn(&ballast_crds::refs::SecretKeyRef) -> Option<Secret>,
    cold_credentials: Option<(String, Secret)>,
) -> Vec<Target> {
    let spec = &ap.spec;
    let redis = |r: &ballast_crds::refs::RedisRef| {
        Endpoint::redis(r, r.password_secret_ref.as_ref().and_then(&password))
    };
    let m = &spec.hot_store;
    vec![
        Target {
            dependency: Dependency::Mq,
            endpoint: Endpoint::Kafka(spec.kafka.bootstrap_servers.clone()),
            probe: policy.mq.probe.clone(),
        },
        Target {
            dependency: Dependency::Kv,
            endpoint: redis(&spec.kv),
            probe: policy.kv.probe.clone(),
        },
        Target {
            dependency: Dependency::Mysql,
            endpoint: Endpoint::mysql(m, m.password_secret_ref.as_ref().and_then(&password)),
            probe: policy.mysql.probe.clone(),
        },
        Target {
            dependency: Dependency::Cache,
            endpoint: redis(&spec.cache),
            probe: policy.cache.probe.clone(),
        },
        Target {
            dependency: Dependency::Cold,
            endpoint: Endpoint::Elasticsearch {
                url: spec.cold_store.elasticsearch.url.clone(),
                credentials: cold_credentials,
            },
            probe: policy.cold.probe.clone(),
        },
    ]
}

/// The thresholds of a probe spec, as the machine takes them.
pub fn thresholds(probe: &ProbeSpec) -> Thresholds {
    Thresholds {
        failure: u32::try_from(probe.failure_threshold).unwrap_or(1),
        success: u32::try_from(probe.success_threshold).unwrap_or(1),
    }
}

/// The override of one dependency, as the machine takes it.
pub fn forced(ap: &AnalyticsPipeline, dependency: Dependency) -> Option<ForcedMode> {
    let modes = ap.spec.override_.as_ref()?.force_modes.as_ref()?;
    match dependency {
        Dependency::Mq => modes.mq,
        Dependency::Kv => modes.kv,
        Dependency::Mysql => modes.mysql,
        Dependency::Cache => modes.cache,
        Dependency::Cold => modes.cold,
    }
}

/// What makes two probes the same: one task probes it for every pipeline
/// that depends on it (many pipelines share one Kafka, one Redis, ...), so the
/// operator holds one client per server, not one per pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    endpoint: Endpoint,
    period_seconds: i32,
    timeout_seconds: i32,
}

impl TargetKey {
    fn new(endpoint: &Endpoint, probe: &ProbeSpec) -> Self {
        Self {
            endpoint: endpoint.clone(),
            period_seconds: probe.period_seconds,
            timeout_seconds: probe.timeout_seconds,
        }
    }
}

/// Whose machine a shared prober's results feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feed {
    /// One dependency of a pipeline.
    Pipeline(ObjectRef<AnalyticsPipeline>, Dependency),
    /// One data centre's Elasticsearch or cache of a MemberStore.
    Store(ObjectRef<MemberStore>, Watched, String),
}

/// A machine that a shared prober feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscriber {
    feed: Feed,
    thresholds: Thresholds,
}

/// One shared prober: its subscribers and the token that stops it.
#[derive(Debug)]
pub struct Shared {
    subscribers: Vec<Subscriber>,
    token: CancellationToken,
}

/// Subscribes `key`'s dependencies to the shared probers of `targets`, starting those not yet running.
pub fn subscribe(ctx: &Context, key: &ObjectRef<AnalyticsPipeline>, targets: &[Target]) {
    for target in targets {
        let feed = Feed::Pipeline(key.clone(), target.dependency);
        attach(ctx, feed, &target.endpoint, &target.probe);
    }
}

/// Feeds `feed` from the shared prober of `endpoint` probed as `probe`, starting it if need be.
pub fn attach(ctx: &Context, feed: Feed, endpoint: &Endpoint, probe: &ProbeSpec) {
    let mut probers = ctx.probers();
    let key = TargetKey::new(endpoint, probe);
    let shared = probers.entry(key.clone()).or_insert_with(|| {
        let token = CancellationToken::new();
        tokio::spawn(run(ctx.clone(), key, token.clone()));
        Shared {
            subscribers: Vec::new(),
            token,
        }
    });
    shared.subscribers.push(Subscriber {
        feed,
        thresholds: thresholds(probe),
    });
}

/// Removes every subscription of `key`; probers left without subscribers stop.
pub fn unsubscribe(ctx: &Context, key: &ObjectRef<AnalyticsPipeline>) {
    detach(ctx, |feed| matches!(feed, Feed::Pipeline(k, _) if k == key));
}

/// Removes every subscription whose feed `matches`; probers left without subscribers stop.
pub fn detach(ctx: &Context, matches: impl Fn(&Feed) -> bool) {
    ctx.probers().retain(|_, shared| {
        shared.subscribers.retain(|s| !matches(&s.feed));
        let keep = !shared.subscribers.is_empty();
        if !keep {
            shared.token.cancel();
        }
        keep
    });
}

#[tracing::instrument(skip_all, fields(kind = %target.endpoint.kind(), endpoint = %target.endpoint))]
async fn run(ctx: Context, target: TargetKey, token: CancellationToken) {
    let period = Duration::from_secs(u64::try_from(target.period_seconds.max(1)).unwrap_or(1));
    let timeout = Duration::from_secs(u64::try_from(target.timeout_seconds.max(1)).unwrap_or(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prober = Prober::new(target.endpoint.clone());
    let kind = target.endpoint.kind().to_string();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = prober.check(timeout).await;
        ctx.metrics
            .probe_duration(&kind)
            .observe(started.elapsed().as_secs_f64());
        let observation = match &result {
            Ok(_) => Observation::Up,
            Err(error) => {
                ctx.metrics.probe_failures(&kind).inc();
                tracing::debug!(%error, "probe failed");
                Observation::Down
            }
        };
        let subscribers = ctx
            .probers()
            .get(&target)
            .map(|s| s.subscribers.clone())
            .unwrap_or_default();
        for s in subscribers {
            match s.feed {
                Feed::Pipeline(key, dependency) => {
                    if ctx.observe(&key, dependency, Some(observation), s.thresholds) {
                        ctx.trigger(key);
                    }
                }
                Feed::Store(key, watched, dc) => {
                    if ctx.observe_store(&key, watched, &dc, observation, s.thresholds) {
                        ctx.trigger_store(key);
                    }
                }
            }
        }
    }
}

/// The per-pipeline state the probers and the reconciler share.
#[derive(Debug, Default)]
pub struct PipelineState {
    /// Detected mode of each dependency.
    pub machines: BTreeMap<Dependency, mode::Machine>,
    /// Reason of each dependency's last transition.
    pub reasons: BTreeMap<Dependency, String>,
    /// Published mode of each dependency (from the last status written).
    pub published: BTreeMap<Dependency, Mode>,
    /// Overrides from the spec.
    pub forced: BTreeMap<Dependency, ForcedMode>,
    /// Whether automatic switches are paused.
    pub paused: bool,
    /// What the pipeline is subscribed to probe.
    pub targets: Option<Vec<Target>>,
    /// Reconciles failed in a row, for backoff.
    pub failed_attempts: u32,
    /// The slaves' Leases as this operator saw them, judged on its own clock.
    pub slaves: ballast_node::membership::Roster,
    /// When the source schema was last asked for, and what was read.
    pub source_schema: SchemaRead,
}

/// A pipeline's source schema reads: run off the reconcile, so that a slow
/// source database never delays a mode switch.
#[derive(Debug, Default)]
pub struct SchemaRead {
    /// When the last read started.
    pub started: Option<tokio::time::Instant>,
    /// The last schema read, until a reconcile publishes it.
    pub read: Option<ballast_crds::SourceSchema>,
}

impl PipelineState {
    /// Steps one dependency's machine; true when its mode changed.
    pub fn step(
        &mut self,
        dependency: Dependency,
        observation: Option<Observation>,
        thresholds: Thresholds,
        now: Timestamp,
    ) -> bool {
        let machine = self
            .machines
            .entry(dependency)
            .or_insert_with(|| mode::Machine::new(now));
        let input = Input {
            observation,
            switched_back: self.published.get(&dependency) == Some(&Mode::Recovering),
            forced: self.forced.get(&dependency).copied(),
            paused: self.paused,
        };
        let step = mode::machine::step(machine, input, thresholds, now);
        *machine = step.machine;
        match step.transition {
            Some(transition) => {
                self.reasons.insert(dependency, transition.reason().to_owned());
                true
            }
            None => false,
        }
    }
}
