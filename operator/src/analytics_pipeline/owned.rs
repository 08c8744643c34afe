//! The kinds of object a pipeline owns, as one typed enum: what apply
//! dispatches on and what the rollout judges.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One object the pipeline owns, typed by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Owned {
    /// The workers' identity.
    ServiceAccount(ServiceAccount),
    /// What the workers may do.
    Role(Role),
    /// Grants the Role to the ServiceAccount.
    RoleBinding(RoleBinding),
    /// The collector, intake and master.
    Deployment(Deployment),
    /// The slaves.
    StatefulSet(StatefulSet),
    /// The slaves' headless Service and the intake's.
    Service(Service),
    /// One pod at a time of the master pair, and of the intakes, in a drain.
    PodDisruptionBudget(PodDisruptionBudget),
    /// The nightly job (boxed: the largest kind by far).
    CronJob(Box<CronJob>),
    /// Ingress to the pipeline's pods: its gRPC ports for its own pods only.
    NetworkPolicy(NetworkPolicy),
}

impl Owned {
    /// The object's kind, as the API spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ServiceAccount(_) => "ServiceAccount",
            Self::Role(_) => "Role",
            Self::RoleBinding(_) => "RoleBinding",
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
            Self::Service(_) => "Service",
            Self::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Self::CronJob(_) => "CronJob",
            Self::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::ServiceAccount(o) => &o.metadata,
            Self::Role(o) => &o.metadata,
            Self::RoleBinding(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::StatefulSet(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::PodDisruptionBudget(o) => &o.metadata,
            Self::CronJob(o) => &o.metadata,
            Self::NetworkPolicy(o) => &o.metadata,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// The full object as JSON, with `apiVersion` and `kind`.
    #[cfg(test)]
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Self::ServiceAccount(o) => serde_json::to_value(o),
            Self::Role(o) => serde_json::to_value(o),
            Self::RoleBinding(o) => serde_json::to_value(o),
            Self::Deployment(o) => serde_json::to_value(o),
            Self::StatefulSet(o) => serde_json::to_value(o),
            Self::Service(o) => serde_json::to_value(o),
            Self::PodDisruptionBudget(o) => serde_json::to_value(o),
            Self::CronJob(o) => serde_json::to_value(o),
            Self::NetworkPolicy(o) => serde_json::to_value(o),
        }
    }
}

/// The workloads among `objects` (kind and name), whose rollout makes the pipeline Ready.
pub fn workloads(objects: &[Owned]) -> Vec<(&'static str, String)> {
    objects
        .iter()
        .filter(|o| matches!(o, Owned::Deployment(_) | Owned::StatefulSet(_)))
        .map(|o| (o.kind(), o.name().to_owned()))
        .collect()
}
