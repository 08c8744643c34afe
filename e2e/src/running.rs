//! A pipeline run end to end for a scenario: its namespace, policy and
//! pipeline, its operator, and its workloads as local processes through the
//! stand-in kubelet; with the waits and the order feed scenarios share.

use std::time::Duration;

use ballast_crds::{AnalyticsPipeline, Dependency, Mode};
use kube::api::Api;
use serde_json::{Value, json};

use crate::kubelet::{Kubelet, Settings};
use crate::orders::{self, Orders};
use crate::scenario::{self, WaitError};
use crate::{KillOnDrop, Stack, StackError};

/// Why a pipeline could not be run or awaited.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The stack, the operator or a binary could not be found or started.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The API server refused a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A wait ran out.
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// The source database refused a statement.
    #[error("source database: {0}")]
    Source(#[from] mysql_async::Error),
    /// No pod of the role runs.
    #[error("no {0} pod runs")]
    NotRunning(&'static str),
}

/// What to run.
pub struct Launch<'a> {
    /// Prefix of the namespace and pipeline names.
    pub prefix: &'a str,
    /// The DegradationPolicy's spec.
    pub policy: Value,
    /// Merged into the pipeline's spec.
    pub spec_patch: Value,
    /// The roles whose pods the kubelet runs.
    pub roles: &'a [&'a str],
    /// Extra environment of every worker.
    pub env: &'a [(&'a str, &'a str)],
}

/// A policy probing every dependency each second (two failures to degrade,
/// two successes to recover), with `extra` merged into each section.
pub fn fast_policy(extra: Value) -> Value {
    let probe =
        json!({"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2});
    let mut policy = json!({
        "mq": {"probe": probe}, "kv": {"probe": probe}, "mysql": {"probe": probe},
        "cache": {"probe": probe}, "cold": {"probe": probe},
    });
    crate::merge(&mut policy, &extra);
    policy
}

/// A pipeline with its operator and workloads running; both stop when dropped.
pub struct RunningPipeline {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// The fixture's namespace.
    pub namespace: String,
    /// The pipeline's name (also its merchants' prefix in [`Orders`]).
    pub pipeline: String,
    /// The pipelines of the namespace.
    pub aps: Api<AnalyticsPipeline>,
    /// The source database, with the `orders` table.
    pub db: mysql_async::Conn,
    /// The stand-in kubelet running the workloads.
    pub kubelet: Kubelet,
    _operator: KillOnDrop,
}

impl RunningPipeline {
    /// Creates the fixture, starts the operator and the kubelet, and waits
    /// until the pipeline is Ready.
    pub async fn start(launch: Launch<'_>) -> Result<Self, RunError> {
        let stack = Stack::discover();
        let client = stack.kube_client().await?;
        let (namespace, pipeline) = stack
            .pipeline_fixture_with(&client, launch.prefix, launch.policy, launch.spec_patch)
            .await?;
        let db = stack.source_orders().await?;
        let operator = crate::binary("ballast-operator")?;
        let operator = stack.operator(&operator, &namespace).await?;
        let kubelet = Kubelet::start(
            client.clone(),
            Settings {
                namespace: namespace.clone(),
                worker: crate::worker_binary()?,
                kubeconfig: stack.get("KUBECONFIG")?,
                roles: launch.roles.iter().map(|r| (*r).to_owned()).collect(),
                logs: std::env::temp_dir().join(format!("ballast-{namespace}")),
                env: launch
                    .env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
        );
        scenario::until_pipeline_ready(&client, &namespace, &pipeline, 120).await?;
        Ok(Self {
            aps: Api::namespaced(client.clone(), &namespace),
            client,
            namespace,
            pipeline,
            db,
            kubelet,
            _operator: operator,
        })
    }

    /// Waits until the operator publishes `mode` for `dependency`.
    pub async fn until_mode(&self, dependency: Dependency, mode: Mode) -> Result<(), RunError> {
        scenario::eventually(&format!("{dependency:?} {mode:?}"), 120, || async {
            let ap = self.aps.get(&self.pipeline).await?;
            let now = ap
                .status
                .and_then(|s| s.dependencies.get(dependency).map(|d| d.mode))
                .unwrap_or(Mode::Normal);
            Ok::<_, kube::Error>((now == mode).then_some(()))
        })
        .await?;
        Ok(())
    }

    /// The loopback port the running query pod serves on.
    pub async fn query_port(&self) -> Result<u16, RunError> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &self.namespace);
        self.kubelet
            .role_port(&pods, "query")
            .await?
            .ok_or(RunError::NotRunning("query"))
    }

    /// Inserts four batches of 30 orders over about 2 s.
    pub async fn feed(&mut self, orders: &mut Orders) -> Result<(), RunError> {
        for _ in 0..4 {
            orders::insert(&mut self.db, &orders.batch(30)).await?;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        Ok(())
    }
}
