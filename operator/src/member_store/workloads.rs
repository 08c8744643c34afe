//! The MemberStore's workloads at the edge: applies [`super::desired`]'s
//! objects each into its namespace (server-side apply, one field manager),
//! judges whether they run (`Ready`), and on deletion removes what it made
//! in the data centres' namespaces (the store's own namespace is cleaned by
//! owner references). A failure here is a condition, never a failed
//! reconcile: the failover must go on whatever the workloads do.

use std::fmt::Debug;
use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::conditions::{self, Desired};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::desired::{self, Placed, STORE_ANNOTATION, member_name, replicator_name};
use crate::analytics_pipeline::apply::apply_object;

/// Deadline of all the calls of one step (apply, judge, clean up).
const DEADLINE: Duration = Duration::from_secs(10);

/// Why the workloads could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The API server refused an object.
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Api {
        /// `applying` or `deleting`.
        action: &'static str,
        /// The object's kind.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("no answer from the API server within {} s", DEADLINE.as_secs())]
    TimedOut,
}

/// A namespaced kind the operator deletes.
trait Kind:
    k8s_openapi::Resource<Scope = NamespaceResourceScope>
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
    + Clone
    + Debug
{
}
impl<K> Kind for K where
    K: k8s_openapi::Resource<Scope = NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug
{
}

async fn apply_all(client: &kube::Client, placed: &[Placed]) -> Result<(), WorkloadError> {
    for p in placed {
        apply_object(client, &p.namespace, &p.object)
            .await
            .map_err(|source| WorkloadError::Api {
                action: "applying",
                kind: p.object.kind(),
                namespace: p.namespace.clone(),
                name: p.object.name().to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Applies `placed` and judges whether the workloads run: the `Ready`
/// condition, which says what failed or is not available yet.
pub async fn ensure(client: &kube::Client, ms: &MemberStore, ns: &str, placed: &[Placed]) -> Desired {
    let applied = tokio::time::timeout(DEADLINE, apply_all(client, placed))
        .await
        .unwrap_or(Err(WorkloadError::TimedOut));
    if let Err(error) = applied {
        tracing::warn!(%error, "applying the member workloads failed");
        return Desired::fails(
            conditions::READY,
            "WorkloadsNotApplied",
            format!("{error}; each data centre's namespace must exist and the operator may write there"),
        );
    }
    match tokio::time::timeout(DEADLINE, unavailable(client, ms, ns)).await {
        Ok(Ok(missing)) if missing.is_empty() => Desired::holds(
            conditions::READY,
            "WorkloadsAvailable",
            "every data centre's member service and the replicator have available pods",
        ),
        Ok(Ok(missing)) => Desired::fails(
            conditions::READY,
            "WorkloadsStarting",
            format!("no available pod yet: {}", missing.join(", ")),
        ),
        Ok(Err(error)) => Desired::fails(conditions::READY, "WorkloadsUnknown", error.to_string()),
        Err(_) => Desired::fails(
            conditions::READY,
            "WorkloadsUnknown",
            WorkloadError::TimedOut.to_string(),
        ),
    }
}

/// The Deployments (`namespace/name`) without an available pod.
async fn unavailable(client: &kube::Client, ms: &MemberStore, ns: &str) -> Result<Vec<String>, kube::Error> {
    let store = ms.metadata.name.as_deref().unwrap_or_default();
    let mut wanted: Vec<(String, String)> = ms
        .spec
        .data_centers
        .iter()
        .map(|dc| (dc.namespace.clone(), member_name(store)))
        .collect();
    wanted.push((ns.to_owned(), replicator_name(store)));
    let mut missing = Vec::new();
    for (namespace, name) in wanted {
        let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
        let available = api
            .get_opt(&name)
            .await?
            .and_then(|d| d.status)
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if available < 1 {
            missing.push(format!("{namespace}/{name}"));
        }
    }
    Ok(missing)
}

async fn delete_one<K: Kind>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    owner: &str,
) -> Result<(), WorkloadError> {
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let failed = |source| WorkloadError::Api {
        action: "deleting",
        kind: K::KIND,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let Some(found) = api.get_opt(name).await.map_err(failed)? else {
        return Ok(());
    };
    // Only what was made for this store: a namesake someone else made stays.
    let made_for = kube::Resource::meta(&found)
        .annotations
        .as_ref()
        .and_then(|a| a.get(STORE_ANNOTATION));
    if made_for.map(String::as_str) != Some(owner) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(failed(source)),
    }
}

/// Deletes what `ms` (in `ns`) made in its data centres' namespaces.
pub async fn clean_up(client: &kube::Client, ms: &MemberStore, ns: &str) -> Result<(), WorkloadError> {
    let store = ms.metadata.name.as_deref().unwrap_or_default();
    let owner = format!("{ns}/{store}");
    let name = desired::member_name(store);
    let all = async {
        for dc in &ms.spec.data_centers {
            let at = dc.namespace.as_str();
            delete_one::<Deployment>(client, at, &name, &owner).await?;
            delete_one::<Service>(client, at, &name, &owner).await?;
            delete_one::<ServiceAccount>(client, at, &name, &owner).await?;
        }
        Ok(())
    };
    tokio::time::timeout(DEADLINE, all)
        .await
        .unwrap_or(Err(WorkloadError::TimedOut))
}
