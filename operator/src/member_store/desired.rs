//! The workloads a MemberStore runs, as pure functions of its spec: in each
//! data centre's namespace the member service (ServiceAccount, Deployment,
//! Service), and in the store's own namespace the replicator
//! (ServiceAccount, Deployment) and the Role that lets both read the store,
//! by name and nothing else, with its RoleBinding. The objects in the store's
//! namespace are owned by it; owner references cannot cross namespaces, so
//! those in the data centres' carry the store in an annotation and the
//! store's finalizer deletes them ([`super::workloads`]).

use std::collections::BTreeMap;

use ballast_crds::MemberStore;
use ballast_crds::member_store::DataCenter;
use ballast_crds::refs::LocalObjectRef;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, SecretKeySelector, Service,
    ServiceAccount, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use crate::analytics_pipeline::desired::{
    METRICS_PORT, field_env, http_probe, labels, rule, selector, service_port,
};
use crate::analytics_pipeline::owned::Owned;
use crate::analytics_pipeline::pods;

/// Port of the member service's gRPC API (`ballast.v1.Members`).
pub const MEMBER_PORT: i32 = 7072;

/// The finalizer with which the operator deletes what it created in the
/// data centres' namespaces before the store goes.
pub const FINALIZER: &str = "ballast.dev/member-workloads";

/// The annotation naming the store (`<namespace>/<name>`) an object in a
/// data centre's namespace was made for: only such objects are deleted.
pub const STORE_ANNOTATION: &str = "ballast.dev/member-store";

/// An object and the namespace it goes in.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    /// Its namespace.
    pub namespace: String,
    /// The object.
    pub object: Owned,
}

/// The name of the member service's objects in each data centre.
pub fn member_name(store: &str) -> String {
    format!("{store}-member")
}

/// The name of the replicator's objects.
pub fn replicator_name(store: &str) -> String {
    format!("{store}-replicator")
}

/// Every object `ms` runs, in its namespace `ns`; `owner` owns those in it,
/// and the pods run `image`. Pure.
pub fn objects(ms: &MemberStore, ns: &str, owner: &OwnerReference, image: &str) -> Vec<Placed> {
    let name = ms.metadata.name.clone().unwrap_or_default();
    let b = Builder {
        ms,
        ns,
        name: &name,
        owner,
        image,
    };
    let mut out = Vec::new();
    for dc in &ms.spec.data_centers {
        let at = |object| Placed {
            namespace: dc.namespace.clone(),
            object,
        };
        out.push(at(Owned::ServiceAccount(ServiceAccount {
            metadata: b.metadata(&dc.namespace, member_name(&name), "member"),
            ..ServiceAccount::default()
        })));
        out.push(at(Owned::Deployment(b.member(dc))));
        out.push(at(Owned::Service(b.member_service(dc))));
    }
    let here = |object| Placed {
        namespace: ns.to_owned(),
        object,
    };
    out.push(here(Owned::ServiceAccount(ServiceAccount {
        metadata: b.metadata(ns, replicator_name(&name), "replicator"),
        ..ServiceAccount::default()
    })));
    out.push(here(Owned::Deployment(b.replicator())));
    out.push(here(Owned::Role(b.reader())));
    out.push(here(Owned::RoleBinding(b.reader_binding())));
    out
}

struct Builder<'a> {
    ms: &'a MemberStore,
    ns: &'a str,
    name: &'a str,
    owner: &'a OwnerReference,
    image: &'a str,
}

/// An env var from a key of a Secret in the pod's namespace.
fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                ..SecretKeySelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The Elasticsearch user and password from the Secret `credentials` names (its
/// `username` and `password` keys, as basic auth needs both).
fn es_env(credentials: Option<&LocalObjectRef>) -> Vec<EnvVar> {
    credentials
        .map(|r| {
            vec![
                secret_env("BALLAST_MEMBER_ES_USERNAME", &r.name, "username"),
                secret_env("BALLAST_MEMBER_ES_PASSWORD", &r.name, "password"),
            ]
        })
        .unwrap_or_default()
}

impl Builder<'_> {
    fn labels(&self, component: &str) -> BTreeMap<String, String> {
        labels("ballast-members", self.name, component)
    }

    fn selector(&self, component: &str) -> BTreeMap<String, String> {
        selector(self.name, component)
    }

    /// Owned by the store in its own namespace; elsewhere, annotated with it.
    fn metadata(&self, namespace: &str, name: String, component: &str) -> ObjectMeta {
        let own = namespace == self.ns;
        ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(self.labels(component)),
            annotations: (!own)
                .then(|| [(STORE_ANNOTATION.to_owned(), format!("{}/{}", self.ns, self.name))].into()),
            owner_references: own.then(|| vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn pod(&self, component: &str, account: String, env: Vec<EnvVar>, grpc: bool) -> PodTemplateSpec {
        let mut ports = vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            ..ContainerPort::default()
        }];
        if grpc {
            ports.push(ContainerPort {
                name: Some("grpc".into()),
                container_port: MEMBER_PORT,
                ..ContainerPort::default()
            });
        }
        let mut env = env;
        env.extend([
            plain_env("BALLAST_MEMBER_STORE", self.name),
            plain_env("BALLAST_MEMBER_STORE_NAMESPACE", self.ns),
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]);
        let mut pod = PodSpec {
            service_account_name: Some(account),
            termination_grace_period_seconds: Some(30),
            containers: vec![Container {
                name: "worker".into(),
                image: Some(self.image.to_owned()),
                args: Some(vec![component.to_owned()]),
                env: Some(env),
                ports: Some(ports),
                readiness_probe: Some(http_probe("/readyz", 2)),
                liveness_probe: Some(http_probe("/healthz", 10)),
                resources: Some(pods::default_resources(component, 0)),
                ..Container::default()
            }],
            ..PodSpec::default()
        };
        pods::restrict(&mut pod);
        let mut labels = self.labels(component);
        labels.insert("ballast.dev/role".into(), component.to_owned());
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..ObjectMeta::default()
            }),
            spec: Some(pod),
        }
    }

    fn deployment(
        &self,
        metadata: ObjectMeta,
        component: &str,
        replicas: i32,
        template: PodTemplateSpec,
    ) -> Deployment {
        Deployment {
            metadata,
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some(self.selector(component)),
                    ..LabelSelector::default()
                },
                template,
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    /// Data centre `dc`'s member service: the passwords of its own servers,
    /// from the Secrets of the same names in its namespace.
    fn member(&self, dc: &DataCenter) -> Deployment {
        let mut env = vec![plain_env("BALLAST_DATA_CENTER", &dc.name)];
        if let Some(r) = &dc.mysql.password_secret_ref {
            env.push(secret_env("BALLAST_MEMBER_MYSQL_PASSWORD", &r.name, &r.key));
        }
        if let Some(r) = &dc.redis.password_secret_ref {
            env.push(secret_env("BALLAST_MEMBER_REDIS_PASSWORD", &r.name, &r.key));
        }
        env.extend(es_env(dc.elasticsearch.credentials_secret_ref.as_ref()));
        let name = member_name(self.name);
        let template = self.pod("member", name.clone(), env, true);
        self.deployment(
            self.metadata(&dc.namespace, name, "member"),
            "member",
            self.ms.spec.replicas_per_data_center,
            template,
        )
    }

    fn member_service(&self, dc: &DataCenter) -> Service {
        Service {
            metadata: self.metadata(&dc.namespace, member_name(self.name), "member"),
            spec: Some(ServiceSpec {
                selector: Some(self.selector("member")),
                ports: Some(vec![service_port("grpc", MEMBER_PORT)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// One replicator: two would only share the stream's one partition.
    fn replicator(&self) -> Deployment {
        let primary = self
            .ms
            .spec
            .data_centers
            .iter()
            .find(|dc| dc.name == self.ms.spec.primary);
        let env = es_env(primary.and_then(|dc| dc.elasticsearch.credentials_secret_ref.as_ref()));
        let name = replicator_name(self.name);
        let template = self.pod("replicator", name.clone(), env, false);
        self.deployment(
            self.metadata(self.ns, name, "replicator"),
            "replicator",
            1,
            template,
        )
    }

    /// What the member services and the replicator read: this store, by name.
    fn reader(&self) -> Role {
        Role {
            metadata: self.metadata(self.ns, member_name(self.name), "member"),
            rules: Some(vec![rule(
                "ballast.dev",
                &["memberstores"],
                Some(vec![self.name.to_owned()]),
                &["get", "list", "watch"],
            )]),
        }
    }

    fn reader_binding(&self) -> RoleBinding {
        let account = |name: String, namespace: &str| Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        };
        let mut subjects: Vec<Subject> = self
            .ms
            .spec
            .data_centers
            .iter()
            .map(|dc| account(member_name(self.name), &dc.namespace))
            .collect();
        subjects.push(account(replicator_name(self.name), self.ns));
        RoleBinding {
            metadata: self.metadata(self.ns, member_name(self.name), "member"),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: member_name(self.name),
            },
            subjects: Some(subjects),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemberStore {
        let mut ms: MemberStore =
            serde_yaml::from_str(include_str!("../../../manifests/samples/memberstore.yaml"))
                .unwrap_or_else(|e| panic!("sample MemberStore: {e}"));
        ms.metadata.namespace = Some("members".into());
        ms
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "ballast.dev/v1alpha1".into(),
            kind: "MemberStore".into(),
            name: "members".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }
    }

    fn env_of(d: &Deployment) -> Vec<EnvVar> {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
    }

    #[test]
    fn each_data_centre_gets_a_member_service_and_the_store_s_namespace_the_replicator() {
        let ms = store();
        let objects = objects(&ms, "members", &owner(), "ghcr.io/ballast-dev/worker:1");
        let placed: Vec<(String, &str, String)> = objects
            .iter()
            .map(|p| (p.namespace.clone(), p.object.kind(), p.object.name().to_owned()))
            .collect();
        let want = [
            ("members-dc-a", "ServiceAccount", "members-member"),
            ("members-dc-a", "Deployment", "members-member"),
            ("members-dc-a", "Service", "members-member"),
            ("members-dc-b", "ServiceAccount", "members-member"),
            ("members-dc-b", "Deployment", "members-member"),
            ("members-dc-b", "Service", "members-member"),
            ("members", "ServiceAccount", "members-replicator"),
            ("members", "Deployment", "members-replicator"),
            ("members", "Role", "members-member"),
            ("members", "RoleBinding", "members-member"),
        ];
        let want: Vec<(String, &str, String)> = want
            .iter()
            .map(|(n, k, o)| ((*n).to_owned(), *k, (*o).to_owned()))
            .collect();
        assert_eq!(placed, want);
        for p in &objects {
            let meta = p.object.metadata();
            assert_eq!(meta.namespace.as_deref(), Some(p.namespace.as_str()));
            let own = p.namespace == "members";
            // Owner references never cross namespaces: the finalizer cleans up the rest.
            assert_eq!(meta.owner_references.is_some(), own, "{}", p.object.name());
            let annotated = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(STORE_ANNOTATION))
                .cloned();
            assert_eq!(annotated, (!own).then(|| "members/members".to_owned()));
        }
    }

    #[test]
    fn member_pods_serve_their_own_data_centre_with_its_passwords_from_secrets() {
        let ms = store();
        let objects = objects(&ms, "members", &owner(), "img");
        let deployments: Vec<(&str, &Deployment)> = objects
            .iter()
            .filter_map(|p| match &p.object {
                Owned::Deployment(d) => Some((p.namespace.as_str(), d)),
                _ => None,
            })
            .collect();
        for (namespace, d) in &deployments {
            let env = env_of(d);
            let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
            assert_eq!(value("BALLAST_MEMBER_STORE").as_deref(), Some("members"));
            assert_eq!(
                value("BALLAST_MEMBER_STORE_NAMESPACE").as_deref(),
                Some("members")
            );
            // No credential is ever a plain value.
            assert!(
                env.iter()
                    .filter(|e| e.name.ends_with("PASSWORD"))
                    .all(|e| e.value.is_none() && e.value_from.is_some()),
                "{namespace}"
            );
            if *namespace == "members" {
                assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1));
                continue;
            }
            let dc = &ms.spec.data_centers.iter().find(|dc| dc.namespace == *namespace);
            let dc = dc.unwrap_or_else(|| panic!("{namespace}"));
            assert_eq!(value("BALLAST_DATA_CENTER").as_deref(), Some(dc.name.as_str()));
            assert_eq!(
                d.spec.as_ref().and_then(|s| s.replicas),
                Some(ms.spec.replicas_per_data_center)
            );
            let mysql = env.iter().find(|e| e.name == "BALLAST_MEMBER_MYSQL_PASSWORD");
            let secret = mysql
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|s| (s.name.as_str(), s.key.as_str()));
            assert_eq!(secret, Some(("members-db", "password")));
        }
    }

    #[test]
    fn the_workloads_read_only_their_store_by_name() {
        let ms = store();
        let objects = objects(&ms, "members", &owner(), "img");
        let role = objects.iter().find_map(|p| match &p.object {
            Owned::Role(r) => Some(r),
            _ => None,
        });
        let rules = role.and_then(|r| r.rules.clone()).unwrap_or_default();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].resource_names, Some(vec!["members".to_owned()]));
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        let binding = objects.iter().find_map(|p| match &p.object {
            Owned::RoleBinding(b) => Some(b),
            _ => None,
        });
        let subjects: Vec<(String, Option<String>)> = binding
            .and_then(|b| b.subjects.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.name, s.namespace))
            .collect();
        assert_eq!(
            subjects,
            [
                ("members-member".to_owned(), Some("members-dc-a".to_owned())),
                ("members-member".to_owned(), Some("members-dc-b".to_owned())),
                ("members-replicator".to_owned(), Some("members".to_owned())),
            ]
        );
    }
}
