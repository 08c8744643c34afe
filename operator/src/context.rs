//! The operator's one `Context`: its Kubernetes client, readiness and metrics, passed explicitly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Shared state of the operator, cheap to clone.
#[derive(Clone)]
pub struct Context {
    /// Client of the Kubernetes API server.
    pub client: kube::Client,
    /// Metrics and the registry that exposes them.
    pub metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// The operator's Prometheus metrics (`ballast_operator_*`).
pub struct Metrics {
    /// The registry rendered on `/metrics`.
    pub registry: Registry,
    /// API server reachability checks that failed.
    pub api_check_failures: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ballast_operator");
        let api_check_failures = Counter::default();
        registry.register(
            "api_check_failures",
            "Checks of the Kubernetes API server that failed",
            api_check_failures.clone(),
        );
        Self {
            registry,
            api_check_failures,
        }
    }
}

impl Context {
    /// A context around `client`, not yet ready.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the API server has answered since start-up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Asks the API server for its version; ready once it answers.
    #[tracing::instrument(skip(self))]
    pub async fn check_api_server(&self) {
        match self.client.apiserver_version().await {
            Ok(info) => {
                tracing::info!(version = %info.git_version, "API server reachable");
                self.ready.store(true, Ordering::Relaxed);
            }
            Err(error) => {
                self.metrics.api_check_failures.inc();
                tracing::warn!(%error, "API server unreachable");
            }
        }
    }
}
