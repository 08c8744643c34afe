//! The objects a pipeline owns, as pure functions of its spec and what fetch
//! found: typed k8s-openapi structs ([`Owned`]), applied by server-side
//! apply; a golden YAML snapshot test pins the whole set.

use std::collections::BTreeMap;

use ballast_crds::AnalyticsPipeline;
use ballast_crds::analytics_pipeline::RoleSpec;
use ballast_crds::refs::SecretKeyRef;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceFieldSelector, SecretKeySelector, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use super::owned::{Owned, workloads};
use super::{data_plane, pods};

/// Port of the backup intake (gRPC) on intake pods.
pub const INTAKE_PORT: i32 = 7070;
/// Port slaves receive tasks and routed events on (gRPC).
pub const SLAVE_PORT: i32 = 7071;
/// Port of every worker's `/metrics`, `/healthz`, `/readyz`.
pub const METRICS_PORT: i32 = 9090;

/// The roles that run as Deployments (the slave is a StatefulSet).
const DEPLOYMENT_ROLES: [&str; 4] = ["collector", "intake", "master", "query"];

/// Port of the query Service: the merchant API, served by the query pods on their metrics port.
pub const QUERY_PORT: i32 = 80;

/// The shipped role of the workers' writes (manifests/operator/rbac.yaml).
pub const WORKER_WRITES_ROLE: &str = "ballast-worker";

/// The kind of the shipped role of the workers' writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WritesRole {
    /// A ClusterRole (the cluster-wide install).
    #[default]
    ClusterRole,
    /// A Role in each watched namespace (the namespaced install).
    Role,
}

impl WritesRole {
    fn kind(self) -> &'static str {
        match self {
            Self::ClusterRole => "ClusterRole",
            Self::Role => "Role",
        }
    }
}

/// What the builders need besides the pipeline itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// Where the workers' shipped write role is: the ClusterRole
    /// `ballast-worker`, or (a namespaced install) a Role of that name in the
    /// pipeline's namespace.
    pub writes_role: WritesRole,
    /// The `ballast-worker` image every role runs (the spec's, or the operator's default).
    pub image: String,
    /// Slave replicas to run: the base, or base × scale factor while the KV store is down.
    pub slave_replicas: i32,
    /// Changes when a referenced Secret or ConfigMap changes, so pods restart with it.
    pub config_hash: String,
    /// The policy's bound on the events a slave holds, in MiB: its memory limit follows.
    pub slave_memory_mib: i64,
}

/// Names of a pipeline's objects.
pub fn object_name(pipeline: &str, role: &str) -> String {
    format!("{pipeline}-{role}")
}

/// Every object the pipeline owns.
pub fn objects(ap: &AnalyticsPipeline, owner: &OwnerReference, inputs: &Inputs) -> Vec<Owned> {
    let name = ap.metadata.name.clone().unwrap_or_default();
    let b = Builder {
        ap,
        name: &name,
        owner,
        inputs,
    };
    let mut out = vec![
        Owned::ServiceAccount(b.service_account()),
        Owned::Role(b.role()),
        Owned::RoleBinding(b.role_binding()),
        Owned::RoleBinding(b.writes_binding()),
    ];
    for role in DEPLOYMENT_ROLES {
        out.push(Owned::Deployment(b.deployment(role)));
    }
    for role in pods::BUDGETED_ROLES {
        out.push(Owned::PodDisruptionBudget(pods::disruption_budget(
            b.metadata(object_name(&name, role), role),
            b.selector(role),
        )));
    }
    out.push(Owned::Service(b.slave_service()));
    out.push(Owned::StatefulSet(b.slave_statefulset()));
    out.push(Owned::Service(b.service("intake", INTAKE_PORT, "grpc")));
    out.push(Owned::Service(b.query_service()));
    out.push(Owned::NetworkPolicy(data_plane::network_policy(
        b.metadata(data_plane::secret_name(&name), "data-plane"),
        &name,
        METRICS_PORT,
    )));
    out.push(Owned::CronJob(Box::new(super::nightly::cron_job(
        b.metadata(object_name(&name, "nightly"), "nightly"),
        b.pod_template("nightly", None),
        &ap.spec.nightly,
    ))));
    out
}

struct Builder<'a> {
    ap: &'a AnalyticsPipeline,
    name: &'a str,
    owner: &'a OwnerReference,
    inputs: &'a Inputs,
}

/// A rule of the workers' Role; `names` narrows it to those objects.
pub(crate) fn rule(
    group: &str,
    resources: &[&str],
    names: Option<Vec<String>>,
    verbs: &[&str],
) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        resource_names: names,
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// An env var from the pod's own fields (the downward API).
pub(crate) fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// A probe of the worker's `metrics` port at `path`, every `period` seconds.
pub(crate) fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// A Service port `name` forwarding `port` to the same port.
pub(crate) fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        ..ServicePort::default()
    }
}

/// The labels of a component of application `app` (`ballast`, or
/// `ballast-members`) instance `instance`, made by the operator.
pub(crate) fn labels(app: &str, instance: &str, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector(instance, component);
    labels.insert("app.kubernetes.io/name".into(), app.into());
    labels.insert("app.kubernetes.io/managed-by".into(), "ballast-operator".into());
    labels
}

/// The labels that select a component's pods of instance `instance`.
pub(crate) fn selector(instance: &str, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/instance", instance),
        ("app.kubernetes.io/component", component),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

impl Builder<'_> {
    fn labels(&self, component: &str) -> BTreeMap<String, String> {
        labels("ballast", self.name, component)
    }

    fn selector(&self, component: &str) -> BTreeMap<String, String> {
        selector(self.name, component)
    }

    fn metadata(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: self.ap.metadata.namespace.clone(),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn worker_account(&self) -> String {
        object_name(self.name, "worker")
    }

    fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.metadata(self.worker_account(), "worker"),
            ..ServiceAccount::default()
        }
    }

    /// Least privilege, what the workers read: this pipeline and its policy
    /// (modes are in status), the master's state ConfigMap and the SQL
    /// ConfigMap, by name. What they write is the shipped ClusterRole
    /// `ballast-worker`, bound by [`Self::writes_binding`].
    fn role(&self) -> Role {
        let mut rules = vec![
            rule(
                "ballast.dev",
                &["analyticspipelines", "analyticspipelines/status"],
                Some(vec![self.name.to_owned()]),
                &["get", "list", "watch"],
            ),
            rule(
                "ballast.dev",
                &["degradationpolicies"],
                Some(vec![self.ap.spec.policy_ref.name.clone()]),
                &["get", "list", "watch"],
            ),
            rule(
                "",
                &["configmaps"],
                Some(vec![format!("{}-master-state", self.name)]),
                &["get"],
            ),
        ];
        if let Some(cm) = &self.ap.spec.compute.sql_config_map_ref {
            rules.push(rule(
                "",
                &["configmaps"],
                Some(vec![cm.name.clone()]),
                &["get", "watch"],
            ));
        }
        Role {
            metadata: self.metadata(self.worker_account(), "worker"),
            rules: Some(rules),
        }
    }

    /// The workers' Role, bound to their ServiceAccount.
    fn role_binding(&self) -> RoleBinding {
        self.binding(self.worker_account(), "Role", self.worker_account())
    }

    /// The shipped role `ballast-worker` (Lease and state writes, which RBAC
    /// cannot narrow by pipeline; the shipped admission policy does), bound
    /// in this namespace only. The operator holds `bind` on it instead of the
    /// writes themselves.
    fn writes_binding(&self) -> RoleBinding {
        let name = format!("{}-writes", self.worker_account());
        let kind = self.inputs.writes_role.kind();
        self.binding(name, kind, WORKER_WRITES_ROLE.to_owned())
    }

    fn binding(&self, name: String, kind: &str, role: String) -> RoleBinding {
        RoleBinding {
            metadata: self.metadata(name, "worker"),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: kind.into(),
                name: role,
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: self.worker_account(),
                namespace: self.ap.metadata.namespace.clone(),
                ..Subject::default()
            }]),
        }
    }

    fn role_spec(&self, role: &str) -> &RoleSpec {
        let roles = &self.ap.spec.roles;
        match role {
            "collector" => &roles.collector,
            "intake" => &roles.intake,
            "master" => &roles.master,
            "query" => &roles.query,
            _ => &roles.slave,
        }
    }

    /// Credentials reach pods as env vars from Secrets, never through the
    /// spec; each role gets only the passwords of the servers it talks to.
    fn secret_env(&self, role: &str) -> Vec<EnvVar> {
        let spec = &self.ap.spec;
        let key = |r: Option<&SecretKeyRef>| r.map(|r| (r.name.clone(), r.key.clone()));
        let source = (
            "BALLAST_SOURCE_MYSQL_PASSWORD",
            key(spec.source.mysql.password_secret_ref.as_ref()),
        );
        let hot = (
            "BALLAST_HOT_MYSQL_PASSWORD",
            key(spec.hot_store.password_secret_ref.as_ref()),
        );
        let kv = ("BALLAST_KV_PASSWORD", key(spec.kv.password_secret_ref.as_ref()));
        let cache = (
            "BALLAST_CACHE_PASSWORD",
            key(spec.cache.password_secret_ref.as_ref()),
        );
        // The cold store's Secret holds both keys, as Elasticsearch's basic auth needs them.
        let cold = spec.cold_store.elasticsearch.credentials_secret_ref.as_ref();
        let cold_user = (
            "BALLAST_COLD_USERNAME",
            cold.map(|s| (s.name.clone(), "username".to_owned())),
        );
        let cold_password = (
            "BALLAST_COLD_PASSWORD",
            cold.map(|s| (s.name.clone(), "password".to_owned())),
        );
        let token = (
            data_plane::TOKEN_ENV,
            Some((
                data_plane::secret_name(self.name),
                data_plane::TOKEN_KEY.to_owned(),
            )),
        );
        let mut refs: Vec<(&str, Option<(String, String)>)> = match role {
            "collector" => vec![source],
            "intake" | "master" => vec![kv],
            "query" => vec![hot, cache, cold_user, cold_password],
            "nightly" => vec![hot, kv, cold_user, cold_password],
            _ => vec![hot, kv, cache],
        };
        if data_plane::TOKEN_ROLES.contains(&role) {
            refs.push(token);
        }
        refs.into_iter()
            .filter_map(|(var, r)| {
                r.map(|(name, key)| EnvVar {
                    name: var.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name,
                            key,
                            ..SecretKeySelector::default()
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                })
            })
            .collect()
    }

    fn pod_template(&self, role: &str, port: Option<(i32, &str)>) -> PodTemplateSpec {
        let spec = self.role_spec(role);
        let mut env = vec![
            EnvVar {
                name: "BALLAST_PIPELINE".into(),
                value: Some(self.name.to_owned()),
                ..EnvVar::default()
            },
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
        ];
        if role == "slave" {
            // The slave bounds its SQL's memory by half of this (none set: the node's allocatable).
            env.push(EnvVar {
                name: "BALLAST_MEMORY_LIMIT_BYTES".into(),
                value_from: Some(EnvVarSource {
                    resource_field_ref: Some(ResourceFieldSelector {
                        container_name: Some("worker".into()),
                        resource: "limits.memory".into(),
                        ..ResourceFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
        env.extend(self.secret_env(role));
        let mut ports = vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            ..ContainerPort::default()
        }];
        if let Some((number, name)) = port {
            ports.push(ContainerPort {
                name: Some(name.into()),
                container_port: number,
                ..ContainerPort::default()
            });
        }
        let mut container = Container {
            name: "worker".into(),
            image: Some(self.inputs.image.clone()),
            args: Some(vec![role.to_owned()]),
            env: Some(env),
            ports: Some(ports),
            readiness_probe: Some(http_probe("/readyz", 2)),
            liveness_probe: Some(http_probe("/healthz", 10)),
            // The nightly job has no role spec of its own: its defaults.
            resources: Some(
                spec.resources
                    .clone()
                    .filter(|_| role != "nightly")
                    .unwrap_or_else(|| pods::default_resources(role, self.inputs.slave_memory_mib)),
            ),
            ..Container::default()
        };
        let mut pod = PodSpec {
            service_account_name: Some(self.worker_account()),
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        };
        if let (Some(cm), "master" | "slave") = (&self.ap.spec.compute.sql_config_map_ref, role) {
            pod.volumes = Some(vec![Volume {
                name: "sql".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: cm.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: cm.key.clone(),
                        path: "compute.sql".into(),
                        ..KeyToPath::default()
                    }]),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]);
            container.volume_mounts = Some(vec![VolumeMount {
                name: "sql".into(),
                mount_path: "/etc/ballast/sql".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]);
        }
        pod.containers = vec![container];
        pods::restrict(&mut pod);
        if let Some(placement) = &self.ap.spec.placement {
            placement.apply_to(&mut pod);
        }
        let mut labels = self.labels(role);
        labels.insert("ballast.dev/role".into(), role.to_owned());
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                annotations: Some(
                    [(
                        "ballast.dev/config-hash".to_owned(),
                        self.inputs.config_hash.clone(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            }),
            spec: Some(pod),
        }
    }

    fn deployment(&self, role: &str) -> Deployment {
        let port = match role {
            "intake" => Some((INTAKE_PORT, "grpc")),
            _ => None,
        };
        // Two masters never run the same version side by side: the Lease
        // decides the active one, and a rollout replaces them one by one.
        let strategy = (role == "master").then(|| DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(0)),
                max_unavailable: Some(IntOrString::Int(1)),
            }),
        });
        Deployment {
            metadata: self.metadata(object_name(self.name, role), role),
            spec: Some(DeploymentSpec {
                replicas: Some(self.role_spec(role).replicas),
                selector: LabelSelector {
                    match_labels: Some(self.selector(role)),
                    ..LabelSelector::default()
                },
                template: self.pod_template(role, port),
                strategy,
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    fn slave_service(&self) -> Service {
        Service {
            metadata: self.metadata(object_name(self.name, "slave"), "slave"),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(self.selector("slave")),
                ports: Some(vec![service_port("grpc", SLAVE_PORT)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn slave_statefulset(&self) -> StatefulSet {
        StatefulSet {
            metadata: self.metadata(object_name(self.name, "slave"), "slave"),
            spec: Some(StatefulSetSpec {
                service_name: Some(object_name(self.name, "slave")),
                replicas: Some(self.inputs.slave_replicas),
                // Slaves hold no shared state at start-up: scale out all at once.
                pod_management_policy: Some("Parallel".into()),
                selector: LabelSelector {
                    match_labels: Some(self.selector("slave")),
                    ..LabelSelector::default()
                },
                template: self.pod_template("slave", Some((SLAVE_PORT, "grpc"))),
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    /// The merchant API: port 80 to the query pods' one HTTP port (API,
    /// OpenAPI document and page beside `/metrics`, `/healthz`, `/readyz`).
    fn query_service(&self) -> Service {
        Service {
            metadata: self.metadata(object_name(self.name, "query"), "query"),
            spec: Some(ServiceSpec {
                selector: Some(self.selector("query")),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: QUERY_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn service(&self, role: &str, port: i32, port_name: &str) -> Service {
        Service {
            metadata: self.metadata(object_name(self.name, role), role),
            spec: Some(ServiceSpec {
                selector: Some(self.selector(role)),
                ports: Some(vec![service_port(port_name, port)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }
}

/// Renders objects as one multi-document YAML (keys sorted), for the golden snapshot.
#[cfg(test)]
fn to_yaml(objects: &[Owned]) -> String {
    objects
        .iter()
        .map(|o| {
            o.to_json()
                .and_then(|v| serde_yaml::to_string(&v).map_err(serde::ser::Error::custom))
                .unwrap_or_else(|e| format!("# {}/{}: {e}\n", o.kind(), o.name()))
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
