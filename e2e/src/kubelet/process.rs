//! One pod's container as a local process of the worker binary: its
//! arguments and environment as a kubelet would give them.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::{Container, PodSpec, Secret};
use kube::api::Api;

use super::Settings;

/// The pod's first container (Ballast's pods have one).
pub fn container(spec: Option<&PodSpec>) -> Option<&Container> {
    spec.and_then(|s| s.containers.first())
}

/// The container's env vars that come from Secrets, resolved; a missing Secret or key is left out.
pub async fn secret_env(secrets: &Api<Secret>, spec: Option<&PodSpec>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for env in container(spec).and_then(|c| c.env.clone()).unwrap_or_default() {
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

/// What a process is started with besides the pod spec.
pub struct Launch<'a> {
    /// The pod's name (`POD_NAME`, and the log file's name).
    pub pod: &'a str,
    /// The loopback port its `/metrics`, `/healthz` and `/readyz` listen on.
    pub metrics_port: u16,
    /// Env vars resolved from Secrets.
    pub secret_env: &'a [(String, String)],
}

/// Starts the pod's container; its output is appended to `<logs>/<pod>.log`.
pub fn spawn(settings: &Settings, spec: Option<&PodSpec>, launch: &Launch<'_>) -> std::io::Result<Child> {
    let container = container(spec);
    let args = container.and_then(|c| c.args.clone()).unwrap_or_default();
    let mut command = Command::new(&settings.worker);
    crate::in_own_group(&mut command).args(&args);
    // Plain values from the spec; the downward API as the kubelet would fill it.
    for env in container.and_then(|c| c.env.clone()).unwrap_or_default() {
        if let Some(value) = env.value {
            command.env(&env.name, value);
        }
    }
    command
        .env("POD_NAME", launch.pod)
        .env("POD_NAMESPACE", &settings.namespace)
        .env("POD_IP", "127.0.0.1")
        .env("KUBECONFIG", &settings.kubeconfig)
        // Every "pod" shares loopback: the probe port is chosen here, other
        // ports by the worker, which advertises them.
        .env(
            "BALLAST_METRICS_ADDR",
            format!("127.0.0.1:{}", launch.metrics_port),
        )
        .env("BALLAST_LISTEN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .envs(launch.secret_env.iter().map(|(k, v)| (k, v)))
        .envs(settings.env.iter().map(|(k, v)| (k, v)));
    // The pod's identity, as its mounted token would give it: the workers then
    // have exactly the Role the operator granted their ServiceAccount.
    if let Some(account) = spec.and_then(|s| s.service_account_name.as_ref()) {
        let user = format!("system:serviceaccount:{}:{account}", settings.namespace);
        command.env("KUBE_RS_DEBUG_IMPERSONATE_USER", user);
    }
    std::fs::create_dir_all(&settings.logs)?;
    // Appended, as a kubelet keeps a restarted container's previous log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&settings.logs, launch.pod))?;
    command
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .stdin(Stdio::null());
    command.spawn()
}

/// Where a pod's log goes.
pub fn log_path(logs: &Path, pod: &str) -> std::path::PathBuf {
    logs.join(format!("{pod}.log"))
}

/// Whether the process has exited (and is reaped).
pub fn exited(child: &mut Child) -> bool {
    !matches!(child.try_wait(), Ok(None))
}

/// How the process ended, once it has: `Some(code)`, the code none when a signal ended it.
pub fn exit_code(child: &mut Child) -> Option<Option<i32>> {
    match child.try_wait() {
        Ok(Some(status)) => Some(status.code()),
        Ok(None) => None,
        // Not waitable: as good as gone.
        Err(_) => Some(None),
    }
}

/// Kills outright (with anything it started) and reaps.
pub fn kill(child: &mut Child) {
    let _ = crate::signal_group(child.id(), "-KILL");
    let _ = child.kill();
    let _ = child.wait();
}
