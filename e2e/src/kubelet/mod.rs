//! A stand-in kubelet for e2e: runs the Pods the controller manager creates
//! for the operator's Deployments and StatefulSets in one namespace as local
//! processes of the real worker binary. It binds them to its Node (there is no
//! scheduler), starts the container's arguments and environment, restarts a
//! process that exits, probes `/readyz` and reports the pod's readiness in its
//! status (so Deployments and StatefulSets report availability, as on a real
//! node), and on deletion sends SIGTERM, waits for the worker to drain within
//! the grace period, and removes the pod.

mod lifecycle;
mod node;
mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use lifecycle::{Bound, PodFacts, ProcFacts, Reported, Step};

/// What the harness runs and where.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace whose pods are run.
    pub namespace: String,
    /// The `ballast-worker` binary.
    pub worker: PathBuf,
    /// Kubeconfig the workers use.
    pub kubeconfig: String,
    /// Roles (the pod's `ballast.dev/role` label) to run; other pods stay Pending.
    pub roles: Vec<String>,
    /// Directory for one log file per pod.
    pub logs: PathBuf,
    /// Extra environment for every process (e.g. shorter leases in tests).
    pub env: Vec<(String, String)>,
}

/// The running harness; stops every process when dropped.
pub struct Kubelet {
    procs: Arc<Mutex<BTreeMap<String, Proc>>>,
    token: CancellationToken,
    logs: PathBuf,
}

/// A pod's process.
struct Proc {
    uid: String,
    child: Child,
    metrics_port: u16,
    image: String,
    terminated_at: Option<Instant>,
    /// What the pod's status last said, so that it is written only on change.
    reported: Option<Reported>,
    restarts: i32,
}

impl Kubelet {
    /// Starts running the namespace's pods.
    pub fn start(client: kube::Client, settings: Settings) -> Self {
        let procs = Arc::new(Mutex::new(BTreeMap::new()));
        let token = CancellationToken::new();
        let logs = settings.logs.clone();
        tokio::spawn(run(client, settings, procs.clone(), token.clone()));
        Self { procs, token, logs }
    }

    /// Names of the pods whose processes run now.
    pub fn running(&self) -> Vec<String> {
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        procs
            .iter_mut()
            .filter_map(|(name, p)| (!process::exited(&mut p.child)).then(|| name.clone()))
            .collect()
    }

    /// The loopback port `pod`'s `/metrics` listens on, while it runs.
    pub fn metrics_port(&self, pod: &str) -> Option<u16> {
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        let p = procs.get_mut(pod)?;
        (!process::exited(&mut p.child)).then_some(p.metrics_port)
    }

    /// The `/metrics` port of a running pod of `role` (the query role serves
    /// its API there too), among the pods `pods` lists; none while none runs.
    pub async fn role_port(&self, pods: &Api<Pod>, role: &str) -> Result<Option<u16>, kube::Error> {
        Ok(self.role_ports(pods, role).await?.first().copied())
    }

    /// The `/metrics` ports of every running pod of `role` among the pods `pods` lists.
    pub async fn role_ports(&self, pods: &Api<Pod>, role: &str) -> Result<Vec<u16>, kube::Error> {
        let selector = ListParams::default().labels(&format!("ballast.dev/role={role}"));
        let list = pods.list(&selector).await?;
        Ok(list
            .items
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .filter_map(|name| self.metrics_port(name))
            .collect())
    }

    /// Kills `pod`'s process outright (SIGKILL: a crash, no draining); it is
    /// started again like any exited container. `false` if it was not running.
    pub fn crash(&self, pod: &str) -> std::io::Result<bool> {
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = procs.get_mut(pod) else {
            return Ok(false);
        };
        if process::exited(&mut p.child) {
            return Ok(false);
        }
        p.child.kill()?;
        p.child.wait()?;
        Ok(true)
    }

    /// Everything logged so far by the pods of `workload` (a Deployment's or
    /// StatefulSet's name: its pods' names start with it), whatever their names.
    pub fn logs(&self, workload: &str) -> String {
        let prefix = format!("{workload}-");
        let Ok(dir) = std::fs::read_dir(&self.logs) else {
            return String::new();
        };
        let mut files: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".log"))
            })
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.token.cancel();
        let mut procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, mut p) in std::mem::take(&mut *procs) {
            process::kill(&mut p.child);
        }
    }
}

/// How often the node reports Ready (the lifecycle controller's grace is 40 s or more).
const HEARTBEAT: Duration = Duration::from_secs(5);

async fn run(
    client: kube::Client,
    settings: Settings,
    procs: Arc<Mutex<BTreeMap<String, Proc>>>,
    token: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let owned = ListParams::default().labels("app.kubernetes.io/managed-by=ballast-operator");
    let mut last_heartbeat: Option<Instant> = None;
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
            match node::heartbeat(&nodes).await {
                Ok(()) => last_heartbeat = Some(Instant::now()),
                Err(error) => eprintln!("kubelet: node heartbeat: {error}"),
            }
        }
        // An unreachable API server leaves the processes as they are, as a kubelet does.
        let Ok(list) = pods.list(&owned).await else {
            continue;
        };
        let listed: BTreeMap<String, Pod> = list
            .items
            .into_iter()
            .filter(|p| role(p).is_some_and(|r| settings.roles.contains(&r)))
            .filter_map(|p| Some((p.metadata.name.clone()?, p)))
            .collect();
        let steps = plan(&procs, &listed);

        // API calls and Secret reads happen outside the lock.
        let mut starting = BTreeMap::new();
        for (name, step) in &steps {
            match step {
                Step::Bind => {
                    if let Err(error) = bind(&pods, name).await {
                        eprintln!("kubelet: binding {name}: {error}");
                    }
                }
                Step::Remove => {
                    let now = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    };
                    if let Err(error) = pods.delete(name, &now).await {
                        eprintln!("kubelet: removing {name}: {error}");
                    }
                }
                Step::Start => {
                    let spec = listed.get(name).and_then(|p| p.spec.as_ref());
                    starting.insert(name.clone(), process::secret_env(&secrets, spec).await);
                }
                Step::Succeed | Step::Fail => {
                    let (image, code) = {
                        let mut running = procs.lock().unwrap_or_else(PoisonError::into_inner);
                        running.get_mut(name).map_or((String::new(), None), |p| {
                            (p.image.clone(), process::exit_code(&mut p.child).flatten())
                        })
                    };
                    let patch = lifecycle::finished_patch(&image, code);
                    if let Err(error) = pods
                        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        eprintln!("kubelet: completing {name}: {error}");
                    }
                }
                _ => {}
            }
        }
        {
            let mut running = procs.lock().unwrap_or_else(PoisonError::into_inner);
            // Dropping the harness cancels, then kills under this lock: nothing may start after.
            if token.is_cancelled() {
                return;
            }
            for (name, step) in &steps {
                act(&settings, &mut running, &listed, name, *step, &starting);
            }
        }
        report(&pods, &procs, &listed).await;
    }
}

/// Each pod's next step, from the list and the processes.
fn plan(procs: &Mutex<BTreeMap<String, Proc>>, listed: &BTreeMap<String, Pod>) -> Vec<(String, Step)> {
    let mut running = procs.lock().unwrap_or_else(PoisonError::into_inner);
    let mut names: Vec<String> = listed.keys().cloned().collect();
    names.extend(running.keys().filter(|n| !listed.contains_key(*n)).cloned());
    names
        .into_iter()
        .map(|name| {
            let pod = listed.get(&name).map(facts);
            let proc = running.get_mut(&name).map(|p| {
                let exit_code = process::exit_code(&mut p.child);
                ProcFacts {
                    uid: p.uid.clone(),
                    exited: exit_code.is_some(),
                    exit_code: exit_code.flatten(),
                    terminating_for: p.terminated_at.map(|at| at.elapsed()),
                }
            });
            let step = lifecycle::step(pod.as_ref(), proc.as_ref());
            (name, step)
        })
        .collect()
}

fn facts(pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        bound: match spec.and_then(|s| s.node_name.as_deref()) {
            None => Bound::Nowhere,
            Some(node::NAME) => Bound::Here,
            Some(_) => Bound::Elsewhere,
        },
        deleting: pod.metadata.deletion_timestamp.is_some(),
        grace: Duration::from_secs(
            spec.and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0)
                .unsigned_abs(),
        ),
        restart: lifecycle::Restart::of(spec.and_then(|s| s.restart_policy.as_deref())),
        finished: pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| matches!(phase, "Succeeded" | "Failed")),
    }
}

/// Carries out the process side of `step` (the API side is done by the caller).
fn act(
    settings: &Settings,
    running: &mut BTreeMap<String, Proc>,
    listed: &BTreeMap<String, Pod>,
    name: &str,
    step: Step,
    starting: &BTreeMap<String, Vec<(String, String)>>,
) {
    match step {
        Step::Terminate => {
            if let Some(p) = running.get_mut(name) {
                let _ = crate::signal(p.child.id(), "-TERM");
                p.terminated_at = Some(Instant::now());
            }
        }
        Step::Kill => {
            if let Some(mut p) = running.remove(name) {
                process::kill(&mut p.child);
            }
        }
        Step::Forget | Step::Remove => {
            running.remove(name);
        }
        Step::Start => {
            let (Some(pod), Some(secret_env)) = (listed.get(name), starting.get(name)) else {
                return;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            // A restart of the same pod counts; a new pod by the same name starts at 0.
            let restarts = running
                .get(name)
                .filter(|p| p.uid == uid)
                .map_or(0, |p| p.restarts + 1);
            let spec = pod.spec.as_ref();
            let started = crate::scenario::free_port().and_then(|metrics_port| {
                let launch = process::Launch {
                    pod: name,
                    metrics_port,
                    secret_env,
                };
                Ok((metrics_port, process::spawn(settings, spec, &launch)?))
            });
            match started {
                Ok((metrics_port, child)) => {
                    let image = process::container(spec)
                        .and_then(|c| c.image.clone())
                        .unwrap_or_default();
                    running.insert(
                        name.to_owned(),
                        Proc {
                            uid,
                            child,
                            metrics_port,
                            image,
                            terminated_at: None,
                            reported: None,
                            restarts,
                        },
                    );
                }
                Err(error) => eprintln!("kubelet: starting {name}: {error}"),
            }
        }
        Step::Wait | Step::Bind | Step::Succeed | Step::Fail => {}
    }
}

/// Schedules the pod here, as the scheduler would.
async fn bind(pods: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node::NAME},
    });
    pods.create_subresource::<_, serde_json::Value>("binding", name, &PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// Probes each running pod's `/readyz` and writes its status where it changed.
async fn report(pods: &Api<Pod>, procs: &Mutex<BTreeMap<String, Proc>>, listed: &BTreeMap<String, Pod>) {
    let probes: Vec<(String, u16)> = {
        let mut running = procs.lock().unwrap_or_else(PoisonError::into_inner);
        running
            .iter_mut()
            .filter(|(name, p)| {
                p.terminated_at.is_none()
                    && listed
                        .get(*name)
                        .is_some_and(|pod| pod.metadata.uid.as_deref() == Some(p.uid.as_str()))
            })
            .filter_map(|(name, p)| (!process::exited(&mut p.child)).then(|| (name.clone(), p.metrics_port)))
            .collect()
    };
    for (name, port) in probes {
        let ready = matches!(
            tokio::time::timeout(Duration::from_secs(1), crate::scenario::http_get(port, "/readyz")).await,
            Ok(Ok((200, _)))
        );
        let patch = {
            let mut running = procs.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(p) = running.get_mut(&name) else { continue };
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let previous = p.reported.clone().filter(|r| r.restarts == p.restarts);
            let next = Reported {
                ready,
                restarts: p.restarts,
                started: previous
                    .as_ref()
                    .map_or_else(|| now.clone(), |r| r.started.clone()),
                ready_since: match &previous {
                    Some(r) if r.ready == ready => r.ready_since.clone(),
                    _ => now,
                },
            };
            if p.reported.as_ref() == Some(&next) {
                continue;
            }
            let patch = lifecycle::status_patch(&p.image, &next);
            p.reported = Some(next);
            patch
        };
        if let Err(error) = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            eprintln!("kubelet: status of {name}: {error}");
            // Written again on the next pass.
            if let Some(p) = procs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&name)
            {
                p.reported = None;
            }
        }
    }
}

fn role(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref()?.get("ballast.dev/role").cloned()
}
