//! Ballast's end-to-end support: where the local stack's servers are (the
//! endpoints `e2e/stack/stack.sh` publishes), fixtures on them, and a stand-in
//! kubelet ([`kubelet`]) that runs the operator's workloads as local processes,
//! and the real node ([`node`]) that runs them as pods.
//!
//! `stack.sh up` writes `stack.env` (KEY=VALUE lines) into its state directory.
//! Tests read the endpoints from the process environment first (the Makefile
//! exports them) and otherwise from that file, so a bare `cargo test` works
//! against a running stack too. A missing endpoint is an error that says how
//! to start the stack: a test that needs a server never skips silently.
#![forbid(unsafe_code)]

pub mod browser;
mod command;
pub mod kafka;
pub mod kubelet;
pub mod manifests;
pub mod members;
pub mod node;
pub mod orders;
pub mod poison;
mod process;
pub mod running;
pub mod scenario;

pub use command::{promtool, stack_script};
pub use manifests::{OPERATOR_USER, apply_manifest, grant_election, install_crds, install_operator_rbac};
pub use process::{KillOnDrop, binary, in_own_group, signal, signal_group, worker_binary};

use std::collections::HashMap;
use std::path::PathBuf;

/// A number naming this test process's fixtures (Kafka topics, tables,
/// namespaces, member identities), unique within and across runs of one stack.
///
/// The process id alone is not: with `pid_max` at 32768 a full `make test`
/// reuses ids, and the stack's servers keep what earlier runs left (a fresh
/// CI machine also hands out the same ids in the same order), so a test
/// found an earlier test's topic or claim under its own name. The id is
/// combined with the clock's seconds modulo 36^3 (13 h): two processes
/// collide only with the same id in the same second of that cycle.
pub fn run_id() -> u32 {
    static ID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cycle = u32::try_from(secs % 46_656).unwrap_or(0);
        std::process::id().wrapping_mul(46_656).wrapping_add(cycle)
    })
}

/// Why the stack's endpoints could not be found.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The kubeconfig named by `KUBECONFIG` cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Path of the kubeconfig.
        path: String,
        /// What went wrong.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built from the kubeconfig.
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// A CRD was not established in time.
    #[error("CRD {0} not established within 30 s")]
    CrdNotEstablished(String),
    /// A shipped manifest cannot be read as Kubernetes objects.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// The manifest's path in the repository.
        path: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The stack script failed.
    #[error("e2e/stack/stack.sh {command}: {message}")]
    Script {
        /// The sub-command run.
        command: String,
        /// What went wrong.
        message: String,
    },
    /// The key is neither in the environment nor in the stack's env file.
    #[error(
        "{key} is not set and not in {file}: start the local stack with `make stack-up` (or run `make test`)"
    )]
    Missing {
        /// The environment key that was looked up.
        key: String,
        /// The env file that was consulted.
        file: String,
    },
}

/// Endpoints of the running local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    file: PathBuf,
    values: HashMap<String, String>,
}

impl Stack {
    /// Loads `stack.env` from `$BALLAST_STACK_ENV`, else from the default state
    /// directory (`$BALLAST_STATE_DIR` or `~/.cache/ballast/stack`). An absent
    /// file is not an error here: each lookup then falls back to the environment
    /// and fails with [`StackError::Missing`] when the key is not there either.
    pub fn discover() -> Self {
        let file = std::env::var_os("BALLAST_STACK_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir().join("stack.env"));
        let values = std::fs::read_to_string(&file)
            .map(|text| parse_env(&text))
            .unwrap_or_default();
        Self { file, values }
    }

    /// The value of `key`: the environment wins over the stack's file.
    pub fn get(&self, key: &str) -> Result<String, StackError> {
        std::env::var(key)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| self.values.get(key).cloned())
            .ok_or_else(|| StackError::Missing {
                key: key.to_owned(),
                file: self.file.display().to_string(),
            })
    }
}

impl Stack {
    /// A client of the stack's API server, from the `KUBECONFIG` it publishes.
    pub async fn kube_client(&self) -> Result<kube::Client, StackError> {
        Ok(kube::Client::try_from(self.kube_config().await?)?)
    }

    /// A client acting as `user` (impersonated), e.g. a pod's ServiceAccount
    /// `system:serviceaccount:<namespace>:<name>`: what its RBAC allows, and no more.
    pub async fn kube_client_as(&self, user: &str) -> Result<kube::Client, StackError> {
        let mut config = self.kube_config().await?;
        config.auth_info.impersonate = Some(user.to_owned());
        Ok(kube::Client::try_from(config)?)
    }

    async fn kube_config(&self) -> Result<kube::Config, StackError> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let path = self.get("KUBECONFIG")?;
        let kubeconfig = |source| StackError::Kubeconfig {
            path: path.clone(),
            source,
        };
        let config = Kubeconfig::read_from(&path).map_err(kubeconfig)?;
        kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .map_err(kubeconfig)
    }
}

/// `host:port` of a server URL such as `mysql://user:pass@host:port/db`.
pub fn host_port(url: &str) -> &str {
    let rest = url.rsplit("//").next().unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest)
}

/// The worker's sample order-analytics SQL, which the fixtures' pipelines run.
pub const SAMPLE_SQL: &str = include_str!("../../worker/sql/orders.sql");

/// `patch` merged into `target`: objects key by key, anything else replaced.
pub fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl Stack {
    /// An AnalyticsPipeline whose every dependency is a server of this stack;
    /// its MySQL password comes from the Secret `mysql` (key `password`).
    pub fn pipeline(&self, name: &str, policy: &str) -> Result<serde_json::Value, StackError> {
        let mysql = |var: &str| -> Result<serde_json::Value, StackError> {
            Ok(
                serde_json::json!({"address": host_port(&self.get(var)?), "database": "ballast", "user": "ballast",
                                  "passwordSecretRef": {"name": "mysql", "key": "password"}}),
            )
        };
        Ok(serde_json::json!({
            "apiVersion": "ballast.dev/v1alpha1", "kind": "AnalyticsPipeline",
            "metadata": {"name": name},
            "spec": {
                "image": "ballast/worker:test", "policyRef": {"name": policy},
                "source": {"mysql": mysql("BALLAST_MYSQL_SOURCE_URL")?, "tables": ["orders"]},
                "kafka": {"bootstrapServers": self.get("BALLAST_KAFKA_BOOTSTRAP")?, "topic": format!("{name}-events")},
                "kv": {"address": host_port(&self.get("BALLAST_REDIS_KV_URL")?)},
                "cache": {"address": host_port(&self.get("BALLAST_REDIS_CACHE_URL")?)},
                "hotStore": mysql("BALLAST_MYSQL_HOT_URL")?,
                "coldStore": {"elasticsearch": {"url": self.get("BALLAST_ES_COLD_URL")?}, "indexPrefix": format!("{name}-daily")},
                "compute": {"windowSeconds": 60, "sql": SAMPLE_SQL},
                // No query pods unless a test runs them (a Pending pod keeps the pipeline not Ready).
                "roles": {"slave": {"replicas": 2}, "query": {"replicas": 0}},
            }
        }))
    }
}

/// The data-plane token of every fixture's pipeline (its Secret
/// `<pipeline>-data-plane`, which the operator then keeps) and of every
/// worker a test starts.
pub const DATA_PLANE_TOKEN: &str = "ballast-e2e-data-plane-token";

/// Label of the namespaces fixtures create, so that leftovers can be found.
pub const FIXTURE_LABEL: &str = "ballast.dev/fixture";

/// Deletes every namespace a fixture created (tests leave theirs for
/// post-mortems); an operator started afterwards has only new work.
pub async fn delete_fixtures(client: &kube::Client) -> Result<usize, StackError> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, DeleteParams, ListParams};
    let api = Api::<Namespace>::all(client.clone());
    let old = api.list(&ListParams::default().labels(FIXTURE_LABEL)).await?;
    let mut deleted = 0;
    for ns in &old.items {
        let terminating = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
        let Some(name) = ns.metadata.name.as_ref().filter(|_| !terminating) else {
            continue;
        };
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => deleted += 1,
            // Gone meanwhile: what we wanted.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

/// Creates a namespace for one test, enforcing the `restricted` Pod
/// Security Standard and holding the Secret `mysql` that
/// [`Stack::pipeline`] references; returns its name.
pub async fn pipeline_namespace(client: &kube::Client, prefix: &str) -> Result<String, StackError> {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::{Api, PostParams};
    let name = format!("{prefix}-{}", run_id());
    let ns: Namespace = serde_json::from_value(
        // Every scenario's pods are admitted under the restricted Pod Security
        // Standard, as a hardened cluster would enforce it.
        serde_json::json!({"metadata": {"name": name, "labels": {
            FIXTURE_LABEL: "true",
            "pod-security.kubernetes.io/enforce": "restricted",
        }}}),
    )
    .map_err(|e| StackError::Script {
        command: "namespace".into(),
        message: e.to_string(),
    })?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let secret: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "mysql"}, "stringData": {
            "password": "ballast",
            // The member servers' failover account (a MemberStore's spec.mysqlAdmin).
            "admin-password": "ballast-admin",
        }}))
        .map_err(|e| StackError::Script {
            command: "secret".into(),
            message: e.to_string(),
        })?;
    Api::<Secret>::namespaced(client.clone(), &name)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(name)
}

impl Stack {
    /// A fresh namespace holding DegradationPolicy `p` (with `policy_spec`) and
    /// pipeline `<prefix><pid>` on this stack that uses it; returns (namespace, pipeline).
    pub async fn pipeline_fixture(
        &self,
        client: &kube::Client,
        prefix: &str,
        policy_spec: serde_json::Value,
    ) -> Result<(String, String), StackError> {
        self.pipeline_fixture_with(client, prefix, policy_spec, serde_json::json!({}))
            .await
    }

    /// [`Stack::pipeline_fixture`] with `spec_patch` merged into the pipeline's spec.
    pub async fn pipeline_fixture_with(
        &self,
        client: &kube::Client,
        prefix: &str,
        policy_spec: serde_json::Value,
        spec_patch: serde_json::Value,
    ) -> Result<(String, String), StackError> {
        use kube::api::{Api, Patch, PatchParams};
        install_crds(client).await?;
        let ns = pipeline_namespace(client, prefix).await?;
        let pipeline = format!("{prefix}{}", run_id());
        let ssa = PatchParams::apply("ballast-e2e").force();
        let policy = serde_json::json!({"apiVersion": "ballast.dev/v1alpha1", "kind": "DegradationPolicy",
                                        "metadata": {"name": "p"}, "spec": policy_spec});
        Api::<ballast_crds::DegradationPolicy>::namespaced(client.clone(), &ns)
            .patch("p", &ssa, &Patch::Apply(&policy))
            .await?;
        let mut ap = self.pipeline(&pipeline, "p")?;
        merge(&mut ap["spec"], &spec_patch);
        // Its data-plane token, as a team may provide it (the operator keeps an existing one).
        let token_secret = format!("{pipeline}-data-plane");
        let token = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": token_secret},
            "stringData": {"token": DATA_PLANE_TOKEN}});
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
            .patch(&token_secret, &ssa, &Patch::Apply(&token))
            .await?;
        Api::<ballast_crds::AnalyticsPipeline>::namespaced(client.clone(), &ns)
            .patch(&pipeline, &ssa, &Patch::Apply(&ap))
            .await?;
        Ok((ns, pipeline))
    }

    /// A connection to the source database, with the `orders` table that
    /// [`Stack::pipeline`] tracks created if missing (columns as the sample SQL reads them).
    pub async fn source_orders(&self) -> Result<mysql_async::Conn, StackError> {
        let failed = |e: mysql_async::Error| StackError::Script {
            command: "source orders table".into(),
            message: e.to_string(),
        };
        let opts = mysql_async::Opts::from_url(&self.get("BALLAST_MYSQL_SOURCE_URL")?)
            .map_err(|e| failed(mysql_async::Error::from(e)))?;
        let mut conn = mysql_async::Conn::new(opts).await.map_err(failed)?;
        use mysql_async::prelude::Queryable;
        conn.query_drop(
            "CREATE TABLE IF NOT EXISTS orders (id BIGINT AUTO_INCREMENT PRIMARY KEY, \
             merchant_id VARCHAR(32) NOT NULL, amount BIGINT NOT NULL)",
        )
        .await
        .map_err(failed)?;
        // Columns added later; a table made by an earlier version of this fixture gains them.
        conn.query_drop(
            "ALTER TABLE orders \
             ADD COLUMN IF NOT EXISTS user_id VARCHAR(32) NOT NULL DEFAULT 'u-0', \
             ADD COLUMN IF NOT EXISTS item VARCHAR(64) NOT NULL DEFAULT 'item-0', \
             ADD COLUMN IF NOT EXISTS status VARCHAR(16) NOT NULL DEFAULT 'paid', \
             ADD COLUMN IF NOT EXISTS created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)",
        )
        .await
        .map_err(failed)?;
        Ok(conn)
    }

    /// Runs `ballast-worker <role>` as pod `pod` of `pipeline`, as the kubelet
    /// would, on free loopback ports; its log goes to the temp directory.
    pub fn worker(
        &self,
        binary: &std::path::Path,
        role: &str,
        ns: &str,
        pipeline: &str,
        pod: &str,
    ) -> Result<KillOnDrop, StackError> {
        self.worker_with(binary, &[role], ns, pipeline, pod, &[])
    }

    /// [`Stack::worker`] with more arguments after the role and extra environment.
    pub fn worker_with(
        &self,
        binary: &std::path::Path,
        args: &[&str],
        ns: &str,
        pipeline: &str,
        pod: &str,
        env: &[(&str, &str)],
    ) -> Result<KillOnDrop, StackError> {
        let role = args.first().copied().unwrap_or_default();
        let failed = |e: std::io::Error| StackError::Script {
            command: format!("ballast-worker {role}"),
            message: e.to_string(),
        };
        let log = std::fs::File::create(std::env::temp_dir().join(format!("ballast-{ns}-{pod}.log")))
            .map_err(failed)?;
        let child = in_own_group(&mut std::process::Command::new(binary))
            .args(args)
            .env("KUBECONFIG", self.get("KUBECONFIG")?)
            .env("BALLAST_PIPELINE", pipeline)
            .env("POD_NAMESPACE", ns)
            .env("POD_NAME", pod)
            .env("POD_IP", "127.0.0.1")
            .env("BALLAST_LISTEN_ADDR", "127.0.0.1:0")
            .env("BALLAST_METRICS_ADDR", "127.0.0.1:0")
            // What the kubelet would read from the Secret `mysql` the fixtures create.
            .env("BALLAST_SOURCE_MYSQL_PASSWORD", "ballast")
            .env("BALLAST_HOT_MYSQL_PASSWORD", "ballast")
            .env("BALLAST_DATA_PLANE_TOKEN", DATA_PLANE_TOKEN)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::from(log.try_clone().map_err(failed)?))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .map_err(failed)?;
        Ok(KillOnDrop(child))
    }
}

impl Stack {
    /// Runs the `ballast-operator` at `binary` against this stack, its leader
    /// Lease in `ns`, watching `ns` only, on a free metrics port; its log goes to the temp directory.
    /// It runs as its ServiceAccount ([`OPERATOR_USER`]) with the shipped RBAC.
    pub async fn operator(&self, binary: &std::path::Path, ns: &str) -> Result<KillOnDrop, StackError> {
        self.operator_on(binary, ns, "127.0.0.1:0").await
    }

    /// [`Stack::operator`] serving `/metrics` on `metrics_addr`.
    pub async fn operator_on(
        &self,
        binary: &std::path::Path,
        ns: &str,
        metrics_addr: &str,
    ) -> Result<KillOnDrop, StackError> {
        install_operator_rbac(&self.kube_client().await?, ns).await?;
        self.operator_as(binary, ns, metrics_addr, OPERATOR_USER)
    }

    /// [`Stack::operator_on`] acting as `user`, with whatever RBAC the caller gave it.
    pub fn operator_as(
        &self,
        binary: &std::path::Path,
        ns: &str,
        metrics_addr: &str,
        user: &str,
    ) -> Result<KillOnDrop, StackError> {
        self.operator_with(binary, ns, metrics_addr, user, &[])
    }

    /// [`Stack::operator_as`] with `extra` command-line arguments.
    pub fn operator_with(
        &self,
        binary: &std::path::Path,
        ns: &str,
        metrics_addr: &str,
        user: &str,
        extra: &[&str],
    ) -> Result<KillOnDrop, StackError> {
        let failed = |e: std::io::Error| StackError::Script {
            command: "ballast-operator".into(),
            message: e.to_string(),
        };
        let log = std::fs::File::create(std::env::temp_dir().join(format!("ballast-operator-{ns}.log")))
            .map_err(failed)?;
        let child = in_own_group(&mut std::process::Command::new(binary))
            .args([
                "--metrics-addr",
                metrics_addr,
                "--lease-namespace",
                ns,
                // Its own namespace only: pipelines other tests left behind
                // (or run beside it) are neither probed nor reconciled twice.
                "--watch-namespace",
                ns,
                "--lease-seconds",
                "10",
            ])
            .args(extra)
            .env("KUBECONFIG", self.get("KUBECONFIG")?)
            // kube-rs honours this in `Client::try_default`: the admin
            // kubeconfig then acts as the operator's ServiceAccount.
            .env("KUBE_RS_DEBUG_IMPERSONATE_USER", user)
            .env("RUST_LOG", "info,ballast_operator=debug")
            .stdout(std::process::Stdio::from(log.try_clone().map_err(failed)?))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .map_err(failed)?;
        Ok(KillOnDrop(child))
    }
}

fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BALLAST_STATE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/ballast/stack")
}

/// Parses `KEY=VALUE` lines; blank lines and `#` comments are ignored.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v.trim().trim_matches('"');
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_strips_scheme_credentials_and_path() {
        assert_eq!(
            host_port("mysql://u:p@127.0.0.1:27306/ballast"),
            "127.0.0.1:27306"
        );
        assert_eq!(host_port("redis://127.0.0.1:27401"), "127.0.0.1:27401");
        assert_eq!(host_port("127.0.0.1:27092"), "127.0.0.1:27092");
    }

    #[test]
    fn parse_env_skips_comments_and_blank_lines() {
        let parsed = parse_env("# ports\n\nA=1\n B = \"two\" \nnot a pair\n");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed["A"], "1");
        assert_eq!(parsed["B"], "two");
    }

    #[test]
    fn missing_key_names_the_key_and_how_to_start_the_stack() {
        let stack = Stack {
            file: PathBuf::from("/nowhere/stack.env"),
            values: HashMap::new(),
        };
        let err = stack
            .get("BALLAST_TEST_SURELY_UNSET_KEY")
            .unwrap_err()
            .to_string();
        assert!(err.contains("BALLAST_TEST_SURELY_UNSET_KEY"), "{err}");
        assert!(err.contains("make stack-up"), "{err}");
    }
}
