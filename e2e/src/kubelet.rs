//! A stand-in kubelet for e2e: for each StatefulSet and Deployment the operator
//! owns in a namespace, keeps `replicas` local processes of the real worker
//! binary running, named like pods (`<statefulset>-<ordinal>`), with the pod
//! template's arguments and environment. Scale-in stops the highest ordinals
//! with SIGTERM, so workers drain as they would in a cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Secret};
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;

/// What the harness runs and where.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace whose workloads are run.
    pub namespace: String,
    /// The `ballast-worker` binary.
    pub worker: PathBuf,
    /// Kubeconfig the workers use.
    pub kubeconfig: String,
    /// Roles (the workload's `app.kubernetes.io/component`) to run; others are left alone.
    pub roles: Vec<String>,
    /// Directory for one log file per process.
    pub logs: PathBuf,
    /// Extra environment for every process (e.g. shorter leases in tests).
    pub env: Vec<(String, String)>,
}

/// The running harness; stops every process when dropped.
pub struct Kubelet {
    pods: Arc<Mutex<BTreeMap<String, Child>>>,
    token: CancellationToken,
}

/// A workload as the harness sees it: pod names and the template.
struct Workload {
    pods: Vec<String>,
    template: PodTemplateSpec,
}

impl Kubelet {
    /// Starts reconciling local processes against the namespace's workloads.
    pub fn start(client: kube::Client, settings: Settings) -> Self {
        let pods = Arc::new(Mutex::new(BTreeMap::new()));
        let token = CancellationToken::new();
        tokio::spawn(run(client, settings, pods.clone(), token.clone()));
        Self { pods, token }
    }

    /// Names of the processes running now.
    pub fn running(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Kills `pod`'s process outright (SIGKILL: a crash, no draining); it is
    /// started again like any exited container. `false` if it was not running.
    pub fn crash(&self, pod: &str) -> std::io::Result<bool> {
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        match pods.get_mut(pod) {
            Some(child) => {
                child.kill()?;
                child.wait()?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.token.cancel();
        let mut pods = self.pods.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, mut child) in std::mem::take(&mut *pods) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn run(
    client: kube::Client,
    settings: Settings,
    pods: Arc<Mutex<BTreeMap<String, Child>>>,
    token: CancellationToken,
) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &settings.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let deployments: Api<Deployment> = Api::namespaced(client, &settings.namespace);
    let owned = ListParams::default().labels("app.kubernetes.io/managed-by=ballast-operator");
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        // An unreachable API server leaves the processes as they are, as a kubelet does.
        let (Ok(sets), Ok(deployments)) = (sets.list(&owned).await, deployments.list(&owned).await) else {
            continue;
        };
        let mut wanted = BTreeMap::new();
        let workloads = sets
            .items
            .into_iter()
            .map(|s| (s.metadata.name, s.spec.map(|s| (s.replicas, s.template))))
            .chain(
                deployments
                    .items
                    .into_iter()
                    .map(|d| (d.metadata.name, d.spec.map(|s| (s.replicas, s.template)))),
            );
        for (name, spec) in workloads {
            let (Some(name), Some((replicas, template))) = (name, spec) else {
                continue;
            };
            let pods = (0..replicas.unwrap_or(1).max(0))
                .map(|i| format!("{name}-{i}"))
                .collect();
            wanted.insert(name, Workload { pods, template });
        }
        let wanted: Vec<(String, PodTemplateSpec)> = wanted
            .into_values()
            .filter(|w| role(&w.template).is_some_and(|r| settings.roles.contains(&r)))
            .flat_map(|w| w.pods.into_iter().map(move |pod| (pod, w.template.clone())))
            .collect();
        // Secret values as the kubelet injects them (`valueFrom.secretKeyRef`),
        // read only for the pods about to start, not on every pass.
        let starting: Vec<String> = {
            let mut running = pods.lock().unwrap_or_else(PoisonError::into_inner);
            reap(&mut running);
            wanted
                .iter()
                .filter(|(pod, _)| !running.contains_key(pod))
                .map(|(pod, _)| pod.clone())
                .collect()
        };
        let mut secret_envs = BTreeMap::new();
        for (pod, template) in wanted.iter().filter(|(pod, _)| starting.contains(pod)) {
            secret_envs.insert(pod.clone(), secret_env(&secrets, template).await);
        }
        let mut running = pods.lock().unwrap_or_else(PoisonError::into_inner);
        // Dropping the harness cancels, then kills under this lock: nothing may start after.
        if token.is_cancelled() {
            return;
        }
        reap(&mut running);
        let stale: Vec<String> = running
            .keys()
            .filter(|p| !wanted.iter().any(|(w, _)| w == *p))
            .cloned()
            .collect();
        for pod in stale {
            if let Some(child) = running.remove(&pod) {
                terminate(child);
            }
        }
        for (pod, template) in wanted {
            // A pod that exited since the check above starts on the next pass.
            let (false, Some(secret_env)) = (running.contains_key(&pod), secret_envs.get(&pod)) else {
                continue;
            };
            match spawn(&settings, &pod, &template, secret_env) {
                Ok(child) => {
                    running.insert(pod, child);
                }
                Err(error) => eprintln!("kubelet: starting {pod}: {error}"),
            }
        }
    }
}

fn role(template: &PodTemplateSpec) -> Option<String> {
    template
        .metadata
        .as_ref()?
        .labels
        .as_ref()?
        .get("ballast.dev/role")
        .cloned()
}

/// Forgets processes that exited, so that they are started again (restart policy Always).
fn reap(running: &mut BTreeMap<String, Child>) {
    running.retain(|_, child| matches!(child.try_wait(), Ok(None)));
}

/// SIGTERM, as the kubelet sends, so that the worker drains; reaped in the background.
fn terminate(mut child: Child) {
    let _ = crate::signal(child.id(), "-TERM");
    std::thread::spawn(move || {
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    });
}

/// The container's env vars that come from Secrets, resolved; a missing Secret or key is left out.
async fn secret_env(secrets: &Api<Secret>, template: &PodTemplateSpec) -> Vec<(String, String)> {
    let container = template.spec.as_ref().and_then(|s| s.containers.first());
    let mut out = Vec::new();
    for env in container.and_then(|c| c.env.clone()).unwrap_or_default() {
        let Some(r) = env.value_from.and_then(|v| v.secret_key_ref) else {
            continue;
        };
        let Ok(secret) = secrets.get(&r.name).await else {
            continue;
        };
        let value = secret.data.and_then(|d| d.get(&r.key).cloned());
        if let Some(value) = value.and_then(|v| String::from_utf8(v.0).ok()) {
            out.push((env.name, value));
        }
    }
    out
}

fn spawn(
    settings: &Settings,
    pod: &str,
    template: &PodTemplateSpec,
    secret_env: &[(String, String)],
) -> std::io::Result<Child> {
    let container = template.spec.as_ref().and_then(|s| s.containers.first());
    let args = container.and_then(|c| c.args.clone()).unwrap_or_default();
    let mut command = Command::new(&settings.worker);
    command.args(&args);
    // Plain values from the template; the downward API as the kubelet would fill it.
    for env in container.and_then(|c| c.env.clone()).unwrap_or_default() {
        if let Some(value) = env.value {
            command.env(&env.name, value);
        }
    }
    command
        .env("POD_NAME", pod)
        .env("POD_NAMESPACE", &settings.namespace)
        .env("POD_IP", "127.0.0.1")
        .env("KUBECONFIG", &settings.kubeconfig)
        // Every "pod" shares loopback: each picks free ports and advertises them.
        .env("BALLAST_METRICS_ADDR", "127.0.0.1:0")
        .env("BALLAST_LISTEN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(secret_env.iter().map(|(k, v)| (k, v)))
        .envs(settings.env.iter().map(|(k, v)| (k, v)));
    // The pod's identity, as its mounted token would give it: the workers then
    // have exactly the Role the operator granted their ServiceAccount.
    if let Some(account) = template
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_ref())
    {
        let user = format!("system:serviceaccount:{}:{account}", settings.namespace);
        command.env("KUBE_RS_DEBUG_IMPERSONATE_USER", user);
    }
    std::fs::create_dir_all(&settings.logs)?;
    // Appended, as a kubelet keeps a restarted container's previous log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(settings.logs.join(format!("{pod}.log")))?;
    command
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .stdin(Stdio::null());
    command.spawn()
}
