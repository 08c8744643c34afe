//! The objects a pipeline owns, as pure functions of its spec and what fetch found.
//!
//! Each object is plain JSON with its kind, applied by server-side apply; a
//! golden YAML snapshot test pins the whole set.

use ballast_crds::AnalyticsPipeline;
use ballast_crds::analytics_pipeline::RoleSpec;
use ballast_crds::refs::SecretKeyRef;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

/// Port of the backup intake (gRPC) on intake pods.
pub const INTAKE_PORT: i32 = 7070;
/// Port slaves receive tasks and routed events on (gRPC).
pub const SLAVE_PORT: i32 = 7071;
/// Port of every worker's `/metrics`, `/healthz`, `/readyz`.
pub const METRICS_PORT: i32 = 9090;

/// One object to apply: its API group/version/kind, name and full body.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObject {
    /// `apps/v1`, `v1`, ...
    pub api_version: &'static str,
    /// `Deployment`, `Service`, ...
    pub kind: &'static str,
    /// Plural resource name for the API path.
    pub plural: &'static str,
    /// Object name.
    pub name: String,
    /// The full object, including `apiVersion`, `kind` and metadata.
    pub body: Value,
}

/// The roles that run as Deployments (the slave is a StatefulSet). Only roles
/// `ballast-worker` has: `spec.roles.query` gets its workload with the query
/// role; until then a Deployment for it would crash-loop in a real cluster.
const DEPLOYMENT_ROLES: [&str; 3] = ["collector", "intake", "master"];

/// What the builders need besides the pipeline itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// Slave replicas to run: the base, or base × scale factor while the KV store is down.
    pub slave_replicas: i32,
    /// Changes when a referenced Secret or ConfigMap changes, so pods restart with it.
    pub config_hash: String,
}

/// Names of a pipeline's objects.
pub fn object_name(pipeline: &str, role: &str) -> String {
    format!("{pipeline}-{role}")
}

/// Every object the pipeline owns.
pub fn objects(ap: &AnalyticsPipeline, owner: &OwnerReference, inputs: &Inputs) -> Vec<DesiredObject> {
    let name = ap.metadata.name.clone().unwrap_or_default();
    let b = Builder {
        ap,
        name: &name,
        owner,
        inputs,
    };
    let mut out = vec![b.service_account(), b.role(), b.role_binding()];
    for role in DEPLOYMENT_ROLES {
        out.push(b.deployment(role));
    }
    out.push(b.slave_service());
    out.push(b.slave_statefulset());
    out.push(b.service("intake", INTAKE_PORT, "grpc"));
    out
}

struct Builder<'a> {
    ap: &'a AnalyticsPipeline,
    name: &'a str,
    owner: &'a OwnerReference,
    inputs: &'a Inputs,
}

impl Builder<'_> {
    fn labels(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": "ballast",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "ballast-operator",
        })
    }

    fn selector(&self, component: &str) -> Value {
        json!({ "app.kubernetes.io/instance": self.name, "app.kubernetes.io/component": component })
    }

    fn metadata(&self, name: &str, component: &str) -> Value {
        json!({
            "name": name,
            "namespace": self.ap.metadata.namespace,
            "labels": self.labels(component),
            "ownerReferences": [self.owner],
        })
    }

    fn object(
        &self,
        api_version: &'static str,
        kind: &'static str,
        plural: &'static str,
        name: String,
        rest: Value,
        component: &str,
    ) -> DesiredObject {
        let mut body =
            json!({ "apiVersion": api_version, "kind": kind, "metadata": self.metadata(&name, component) });
        if let (Some(body), Value::Object(rest)) = (body.as_object_mut(), rest) {
            body.extend(rest);
        }
        DesiredObject {
            api_version,
            kind,
            plural,
            name,
            body,
        }
    }

    fn worker_account(&self) -> String {
        object_name(self.name, "worker")
    }

    fn service_account(&self) -> DesiredObject {
        self.object(
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            self.worker_account(),
            json!({}),
            "worker",
        )
    }

    /// Least privilege: read this pipeline and its policy (modes are in status),
    /// keep membership Leases, read the SQL ConfigMap, keep the master's state
    /// ConfigMap (create cannot be narrowed by name in RBAC). Nothing else.
    fn role(&self) -> DesiredObject {
        let pipeline = [self.name];
        let policy = [self.ap.spec.policy_ref.name.as_str()];
        let mut rules = vec![
            json!({"apiGroups": ["ballast.dev"], "resources": ["analyticspipelines", "analyticspipelines/status"], "resourceNames": pipeline, "verbs": ["get", "list", "watch"]}),
            json!({"apiGroups": ["ballast.dev"], "resources": ["degradationpolicies"], "resourceNames": policy, "verbs": ["get", "list", "watch"]}),
            json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}),
            json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [format!("{}-master-state", self.name)], "verbs": ["get", "update"]}),
            json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}),
        ];
        if let Some(cm) = &self.ap.spec.compute.sql_config_map_ref {
            rules.push(json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [cm.name], "verbs": ["get", "watch"]}));
        }
        self.object(
            "rbac.authorization.k8s.io/v1",
            "Role",
            "roles",
            self.worker_account(),
            json!({ "rules": rules }),
            "worker",
        )
    }

    fn role_binding(&self) -> DesiredObject {
        let account = self.worker_account();
        let rest = json!({
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": self.ap.metadata.namespace}],
        });
        self.object(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "rolebindings",
            account.clone(),
            rest,
            "worker",
        )
    }

    fn role_spec(&self, role: &str) -> &RoleSpec {
        let roles = &self.ap.spec.roles;
        match role {
            "collector" => &roles.collector,
            "intake" => &roles.intake,
            "master" => &roles.master,
            _ => &roles.slave,
        }
    }

    /// Credentials reach pods as env vars from Secrets, never through the spec.
    fn secret_env(&self) -> Vec<Value> {
        let spec = &self.ap.spec;
        let refs: [(&str, Option<&SecretKeyRef>); 4] = [
            (
                "BALLAST_SOURCE_MYSQL_PASSWORD",
                spec.source.mysql.password_secret_ref.as_ref(),
            ),
            (
                "BALLAST_HOT_MYSQL_PASSWORD",
                spec.hot_store.password_secret_ref.as_ref(),
            ),
            ("BALLAST_KV_PASSWORD", spec.kv.password_secret_ref.as_ref()),
            ("BALLAST_CACHE_PASSWORD", spec.cache.password_secret_ref.as_ref()),
        ];
        refs.into_iter()
            .filter_map(|(var, r)| {
                r.map(|r| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": r.name, "key": r.key}}}))
            })
            .collect()
    }

    fn pod_template(&self, role: &str, port: Option<(i32, &str)>) -> Value {
        let spec = self.role_spec(role);
        let mut env = vec![
            json!({"name": "BALLAST_PIPELINE", "value": self.name}),
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
            json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        ];
        env.extend(self.secret_env());
        let mut ports = vec![json!({"name": "metrics", "containerPort": METRICS_PORT})];
        if let Some((number, name)) = port {
            ports.push(json!({"name": name, "containerPort": number}));
        }
        let mut container = json!({
            "name": "worker",
            "image": self.ap.spec.image,
            "args": [role],
            "env": env,
            "ports": ports,
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 2},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
        });
        if let Some(resources) = &spec.resources {
            container["resources"] = json!(resources);
        }
        let mut pod = json!({
            "serviceAccountName": self.worker_account(),
            "terminationGracePeriodSeconds": 30,
            "containers": [container],
        });
        if let (Some(cm), "master" | "slave") = (&self.ap.spec.compute.sql_config_map_ref, role) {
            pod["volumes"] = json!([{"name": "sql", "configMap": {"name": cm.name, "items": [{"key": cm.key, "path": "compute.sql"}]}}]);
            pod["containers"][0]["volumeMounts"] =
                json!([{"name": "sql", "mountPath": "/etc/ballast/sql", "readOnly": true}]);
        }
        let mut labels = self.labels(role);
        labels["ballast.dev/role"] = json!(role);
        json!({
            "metadata": {"labels": labels, "annotations": {"ballast.dev/config-hash": self.inputs.config_hash}},
            "spec": pod,
        })
    }

    fn deployment(&self, role: &str) -> DesiredObject {
        let port = match role {
            "intake" => Some((INTAKE_PORT, "grpc")),
            _ => None,
        };
        let mut spec = json!({
            "replicas": self.role_spec(role).replicas,
            "selector": {"matchLabels": self.selector(role)},
            "template": self.pod_template(role, port),
        });
        if role == "master" {
            // Two masters never run the same version side by side: the Lease
            // decides the active one, and a rollout replaces them one by one.
            spec["strategy"] =
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}});
        }
        self.object(
            "apps/v1",
            "Deployment",
            "deployments",
            object_name(self.name, role),
            json!({ "spec": spec }),
            role,
        )
    }

    fn slave_service(&self) -> DesiredObject {
        let rest = json!({"spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": self.selector("slave"),
            "ports": [{"name": "grpc", "port": SLAVE_PORT, "targetPort": SLAVE_PORT}],
        }});
        self.object(
            "v1",
            "Service",
            "services",
            object_name(self.name, "slave"),
            rest,
            "slave",
        )
    }

    fn slave_statefulset(&self) -> DesiredObject {
        let rest = json!({"spec": {
            "serviceName": object_name(self.name, "slave"),
            "replicas": self.inputs.slave_replicas,
            // Slaves hold no shared state at start-up: scale out all at once.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": self.selector("slave")},
            "template": self.pod_template("slave", Some((SLAVE_PORT, "grpc"))),
        }});
        self.object(
            "apps/v1",
            "StatefulSet",
            "statefulsets",
            object_name(self.name, "slave"),
            rest,
            "slave",
        )
    }

    fn service(&self, role: &str, port: i32, port_name: &str) -> DesiredObject {
        let rest = json!({"spec": {
            "selector": self.selector(role),
            "ports": [{"name": port_name, "port": port, "targetPort": port}],
        }});
        self.object(
            "v1",
            "Service",
            "services",
            object_name(self.name, role),
            rest,
            role,
        )
    }
}

/// Renders objects as one multi-document YAML, for the golden snapshot.
#[cfg(test)]
fn to_yaml(objects: &[DesiredObject]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(&o.body).unwrap_or_else(|e| format!("# {}/{}: {e}\n", o.kind, o.name)))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fixture() -> AnalyticsPipeline {
        let text = include_str!("../../../manifests/samples/analyticspipeline.yaml");
        let mut ap: AnalyticsPipeline = serde_yaml::from_str(text).expect("sample parses");
        ap.metadata.namespace = Some("shop".into());
        ap.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
        ap
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "ballast.dev/v1alpha1".into(),
            kind: "AnalyticsPipeline".into(),
            name: "merchant-analytics".into(),
            uid: "00000000-0000-0000-0000-000000000001".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn objects_match_the_golden_snapshot() {
        let inputs = Inputs {
            slave_replicas: 4,
            config_hash: "abc123".into(),
        };
        let yaml = to_yaml(&objects(&fixture(), &owner(), &inputs));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/analytics_pipeline/golden/objects.yaml"
        );
        if std::env::var_os("BALLAST_BLESS").is_some() {
            // Blessing passes by construction: never where the result counts.
            assert!(
                std::env::var_os("CI").is_none(),
                "BALLAST_BLESS is refused under CI"
            );
            std::fs::write(path, &yaml).expect("write golden");
        }
        let golden = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            yaml == golden,
            "desired objects differ from {path}; if the change is intended, rerun with BALLAST_BLESS=1 and review the diff"
        );
    }

    #[test]
    fn every_workload_runs_a_role_the_worker_binary_has() {
        let inputs = Inputs {
            slave_replicas: 2,
            config_hash: "abc123".into(),
        };
        let objects = objects(&fixture(), &owner(), &inputs);
        let workloads: Vec<&DesiredObject> = objects
            .iter()
            .filter(|o| matches!(o.kind, "Deployment" | "StatefulSet"))
            .collect();
        assert_eq!(
            workloads.len(),
            4,
            "collector, intake and master Deployments and the slave StatefulSet"
        );
        for object in workloads {
            let args = &object.body["spec"]["template"]["spec"]["containers"][0]["args"];
            let role = args[0].as_str().unwrap_or_default();
            assert!(
                ballast_worker::roles::NAMES.contains(&role),
                "{} {} runs `ballast-worker {role}`, which does not exist",
                object.kind,
                object.name
            );
        }
    }

    #[test]
    fn every_object_is_owned_by_the_pipeline_as_controller() {
        let inputs = Inputs {
            slave_replicas: 2,
            config_hash: String::new(),
        };
        for o in objects(&fixture(), &owner(), &inputs) {
            let refs = &o.body["metadata"]["ownerReferences"];
            assert_eq!(
                refs[0]["uid"], "00000000-0000-0000-0000-000000000001",
                "{}",
                o.name
            );
            assert_eq!(refs[0]["controller"], true, "{}", o.name);
        }
    }

    #[test]
    fn slave_replicas_follow_inputs_and_secrets_become_env_refs() {
        let inputs = Inputs {
            slave_replicas: 12,
            config_hash: String::new(),
        };
        let objs = objects(&fixture(), &owner(), &inputs);
        let sts = objs
            .iter()
            .find(|o| o.kind == "StatefulSet")
            .expect("statefulset");
        assert_eq!(sts.body["spec"]["replicas"], 12);
        let env = &sts.body["spec"]["template"]["spec"]["containers"][0]["env"];
        let hot = env
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "BALLAST_HOT_MYSQL_PASSWORD");
        assert_eq!(
            hot.map(|e| &e["valueFrom"]["secretKeyRef"]["name"]),
            Some(&json!("results-db"))
        );
    }

    #[test]
    fn role_grants_only_this_pipeline_and_its_policy() {
        let inputs = Inputs {
            slave_replicas: 2,
            config_hash: String::new(),
        };
        let objs = objects(&fixture(), &owner(), &inputs);
        let role = objs.iter().find(|o| o.kind == "Role").expect("role");
        let rules = role.body["rules"].as_array().expect("rules");
        assert_eq!(rules[0]["resourceNames"], json!(["merchant-analytics"]));
        assert_eq!(rules[1]["resourceNames"], json!(["merchant-analytics"]));
        assert!(
            rules
                .iter()
                .all(|r| r["verbs"].as_array().is_some_and(|v| !v.contains(&json!("*"))))
        );
    }
}
