//! The operator's one `Context`: clients, shared pipeline state, metrics and
//! the Event reporter, passed explicitly to every reconcile and prober.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ballast_crds::{AnalyticsPipeline, Dependency, DependencyModes, MemberStore, Mode};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

use crate::member_store::{StoreState, Watched};
use crate::mode::{Observation, Thresholds};
use crate::probe::{PipelineState, Shared, TargetKey};

type Labels = Vec<(&'static str, String)>;

/// Shared state of the operator, cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// Client of the Kubernetes API server.
    pub client: kube::Client,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The registry rendered on `/metrics`.
    pub registry: Arc<Registry>,
    /// Who the operator says it is in Events.
    pub reporter: Reporter,
    pipelines: Arc<Mutex<HashMap<ObjectRef<AnalyticsPipeline>, PipelineState>>>,
    stores: Arc<Mutex<HashMap<ObjectRef<MemberStore>, StoreState>>>,
    probers: Arc<Mutex<HashMap<TargetKey, Shared>>>,
    triggers: mpsc::UnboundedSender<ObjectRef<AnalyticsPipeline>>,
    store_triggers: mpsc::UnboundedSender<ObjectRef<MemberStore>>,
    ready: Arc<watch::Sender<bool>>,
    /// The one namespace watched, or `None` for the whole cluster.
    scope: Option<String>,
    /// The `ballast-worker` image of pipelines that name none.
    pub worker_image: Option<String>,
    /// The kind of the workers' shipped write role.
    pub writes_role: crate::analytics_pipeline::desired::WritesRole,
}

/// Where the probers ask for reconciles: one receiver per controller.
pub struct Triggers {
    /// Pipelines whose dependency's mode changed.
    pub pipelines: mpsc::UnboundedReceiver<ObjectRef<AnalyticsPipeline>>,
    /// MemberStores one of whose data centres' Elasticsearch changed.
    pub stores: mpsc::UnboundedReceiver<ObjectRef<MemberStore>>,
}

/// The operator's Prometheus metrics (`ballast_operator_*`).
pub struct Metrics {
    /// Checks of the API server that failed.
    pub api_check_failures: Counter,
    /// Reconciles run, by kind.
    pub reconciles: Family<Labels, Counter>,
    /// Reconciles that failed, by kind and error.
    pub reconcile_errors: Family<Labels, Counter>,
    /// Published mode changes, by dependency and new mode.
    pub mode_transitions: Family<Labels, Counter>,
    /// MemberStore active data centre changes, by reason (`Promoted`,
    /// `PromotedByPerson`, `FailedBack`).
    pub member_promotions: Family<Labels, Counter>,
    /// The leader's CRD upgrades at start, by CRD and outcome ([`crate::crds`]).
    pub crd_upgrades: Family<Labels, Counter>,
    /// Time a reconcile took, by kind.
    pub reconcile_duration: Family<Labels, Histogram>,
    probe_failures: Family<Labels, Counter>,
    probe_durations: Family<Labels, Histogram>,
    dependency_mode: Family<Labels, Gauge>,
    dependency_epoch: Family<Labels, Gauge>,
    pipeline_ready: Family<Labels, Gauge>,
    windows_failing: Family<Labels, Gauge>,
}

/// Every mode, in the order the state-set gauge lists them.
const MODES: [Mode; 3] = [Mode::Normal, Mode::Degraded, Mode::Recovering];

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

fn probe_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let api_check_failures = Counter::default();
        registry.register(
            "api_check_failures",
            "Checks of the Kubernetes API server that failed",
            api_check_failures.clone(),
        );
        let reconciles = Family::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        let mode_transitions = Family::default();
        registry.register(
            "mode_transitions",
            "Published dependency mode changes",
            mode_transitions.clone(),
        );
        let member_promotions = Family::default();
        registry.register(
            "member_promotions",
            "Changes of a MemberStore's active data centre, by reason",
            member_promotions.clone(),
        );
        let crd_upgrades = Family::default();
        registry.register(
            "crd_upgrades",
            "The leader's upgrades of the Ballast CRDs at start, by CRD and outcome (applied, kept_newer, not_installed, failed)",
            crd_upgrades.clone(),
        );
        let probe_failures = Family::default();
        registry.register(
            "probe_failures",
            "Dependency probes that failed or timed out",
            probe_failures.clone(),
        );
        let probe_durations = Family::new_with_constructor(probe_histogram as fn() -> Histogram);
        registry.register(
            "probe_duration_seconds",
            "Time a dependency probe took",
            probe_durations.clone(),
        );
        let reconcile_duration = Family::new_with_constructor(reconcile_histogram as fn() -> Histogram);
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took, failed or not",
            reconcile_duration.clone(),
        );
        let dependency_mode = Family::default();
        registry.register(
            "dependency_mode",
            "Published mode of each pipeline's dependency: 1 for the mode it is in, 0 for the others",
            dependency_mode.clone(),
        );
        let dependency_epoch = Family::default();
        registry.register(
            "dependency_epoch",
            "Published epoch of each pipeline's dependency (raised on every mode change)",
            dependency_epoch.clone(),
        );
        let pipeline_ready = Family::default();
        registry.register(
            "pipeline_ready",
            "1 while the pipeline's Ready condition is True",
            pipeline_ready.clone(),
        );
        let windows_failing = Family::default();
        registry.register(
            "pipeline_windows_failing",
            "Windows whose computation keeps failing, as the pipeline's active master reports them",
            windows_failing.clone(),
        );
        Self {
            api_check_failures,
            reconciles,
            reconcile_errors,
            mode_transitions,
            member_promotions,
            crd_upgrades,
            reconcile_duration,
            probe_failures,
            probe_durations,
            dependency_mode,
            dependency_epoch,
            pipeline_ready,
            windows_failing,
        }
    }

    /// Sets the mode, epoch and readiness gauges of the pipeline `name` in
    /// `namespace` to what its status now says.
    pub fn pipeline(&self, namespace: &str, name: &str, modes: &DependencyModes, ready: bool, failing: u64) {
        let of = |dependency: Dependency| -> Labels {
            vec![
                ("namespace", namespace.to_owned()),
                ("pipeline", name.to_owned()),
                ("dependency", dependency.as_str().to_owned()),
            ]
        };
        for dependency in Dependency::ALL {
            let (mode, epoch) = modes
                .get(dependency)
                .map_or((Mode::Normal, 0), |s| (s.mode, s.epoch));
            for m in MODES {
                let mut labels = of(dependency);
                labels.push(("mode", format!("{m:?}")));
                self.dependency_mode
                    .get_or_create(&labels)
                    .set(i64::from(m == mode));
            }
            self.dependency_epoch.get_or_create(&of(dependency)).set(epoch);
        }
        let pipeline = vec![("namespace", namespace.to_owned()), ("pipeline", name.to_owned())];
        self.pipeline_ready.get_or_create(&pipeline).set(i64::from(ready));
        self.windows_failing
            .get_or_create(&pipeline)
            .set(i64::try_from(failing).unwrap_or(i64::MAX));
    }

    /// Removes the gauges of a deleted pipeline, so that no alert fires for it.
    pub fn forget_pipeline(&self, namespace: &str, name: &str) {
        for dependency in Dependency::ALL {
            let of = vec![
                ("namespace", namespace.to_owned()),
                ("pipeline", name.to_owned()),
                ("dependency", dependency.as_str().to_owned()),
            ];
            for m in MODES {
                let mut labels = of.clone();
                labels.push(("mode", format!("{m:?}")));
                self.dependency_mode.remove(&labels);
            }
            self.dependency_epoch.remove(&of);
        }
        let pipeline = vec![("namespace", namespace.to_owned()), ("pipeline", name.to_owned())];
        self.pipeline_ready.remove(&pipeline);
        self.windows_failing.remove(&pipeline);
    }

    /// Failed probes of one kind of server (never the URL: it may hold credentials).
    pub fn probe_failures(&self, kind: &str) -> Counter {
        self.probe_failures
            .get_or_create(&vec![("kind", kind.to_owned())])
            .clone()
    }

    /// Probe durations of one kind of server.
    pub fn probe_duration(&self, kind: &str) -> Histogram {
        self.probe_durations
            .get_or_create(&vec![("kind", kind.to_owned())])
            .clone()
    }
}

impl Context {
    /// A context around `client`; reconciles requested by probers arrive on the returned receiver.
    pub fn new(
        client: kube::Client,
        instance: String,
        scope: Option<String>,
        worker_image: Option<String>,
        writes_role: crate::analytics_pipeline::desired::WritesRole,
    ) -> (Self, Triggers) {
        let (triggers, receiver) = mpsc::unbounded_channel();
        let (store_triggers, stores) = mpsc::unbounded_channel();
        let mut registry = Registry::with_prefix("ballast_operator");
        let metrics = Arc::new(Metrics::register(&mut registry));
        let ctx = Self {
            client,
            metrics,
            registry: Arc::new(registry),
            reporter: Reporter {
                controller: "ballast-operator".into(),
                instance: Some(instance),
            },
            pipelines: Arc::default(),
            stores: Arc::default(),
            probers: Arc::default(),
            triggers,
            store_triggers,
            ready: Arc::new(watch::channel(false).0),
            scope,
            worker_image,
            writes_role,
        };
        (
            ctx,
            Triggers {
                pipelines: receiver,
                stores,
            },
        )
    }

    /// The API of `K` where the operator watches: one namespace, or all.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match &self.scope {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        }
    }

    /// Readiness for `/readyz`: true once the API server has answered.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Asks the API server for its version; ready once it answers.
    #[tracing::instrument(skip(self))]
    pub async fn check_api_server(&self) {
        match self.client.apiserver_version().await {
            Ok(info) => {
                tracing::info!(version = %info.git_version, "API server reachable");
                self.ready.send_replace(true);
            }
            Err(error) => {
                self.metrics.api_check_failures.inc();
                tracing::warn!(%error, "API server unreachable");
            }
        }
    }

    /// The shared state of every pipeline. A poisoned lock is recovered: the
    /// state is plain data, valid after any panic in another holder.
    pub fn pipelines(&self) -> MutexGuard<'_, HashMap<ObjectRef<AnalyticsPipeline>, PipelineState>> {
        self.pipelines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared state of every MemberStore (as [`Context::pipelines`]).
    pub fn stores(&self) -> MutexGuard<'_, HashMap<ObjectRef<MemberStore>, StoreState>> {
        self.stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds one probe of what a store watches in data centre `dc` to its
    /// machine; true when its mode changed.
    pub fn observe_store(
        &self,
        key: &ObjectRef<MemberStore>,
        watched: Watched,
        dc: &str,
        observation: Observation,
        thresholds: Thresholds,
    ) -> bool {
        self.stores()
            .get_mut(key)
            .is_some_and(|state| state.step(watched, dc, Some(observation), thresholds, Timestamp::now()))
    }

    /// Asks for a reconcile of MemberStore `key` soon.
    pub fn trigger_store(&self, key: ObjectRef<MemberStore>) {
        let _ = self.store_triggers.send(key);
    }

    /// The shared probers, by target.
    pub fn probers(&self) -> MutexGuard<'_, HashMap<TargetKey, Shared>> {
        self.probers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Feeds one observation to a pipeline's machine; true when its mode changed.
    pub fn observe(
        &self,
        key: &ObjectRef<AnalyticsPipeline>,
        dependency: Dependency,
        observation: Option<Observation>,
        thresholds: Thresholds,
    ) -> bool {
        let mut pipelines = self.pipelines();
        pipelines
            .get_mut(key)
            .is_some_and(|state| state.step(dependency, observation, thresholds, Timestamp::now()))
    }

    /// Asks for a reconcile of `key` soon.
    pub fn trigger(&self, key: ObjectRef<AnalyticsPipeline>) {
        // The receiver lives as long as the controller; after shutdown nobody listens.
        let _ = self.triggers.send(key);
    }

    /// Unsubscribes a deleted pipeline from its probers and forgets its state.
    pub fn forget(&self, key: &ObjectRef<AnalyticsPipeline>) {
        crate::probe::unsubscribe(self, key);
        self.pipelines().remove(key);
        self.metrics
            .forget_pipeline(key.namespace.as_deref().unwrap_or_default(), &key.name);
    }
}
