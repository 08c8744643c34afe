//! Apply: server-side apply of the desired objects with one field manager.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;
use super::desired::Owned;

/// The field manager of everything the operator writes.
pub const MANAGER: &str = "ballast-operator";

/// Applies every object; forcing takes over fields another manager changed, which corrects drift.
pub async fn apply(client: &kube::Client, namespace: &str, objects: &[Owned]) -> Result<(), Error> {
    for object in objects {
        match object {
            Owned::ServiceAccount(o) => one(client, namespace, o).await?,
            Owned::Role(o) => one(client, namespace, o).await?,
            Owned::RoleBinding(o) => one(client, namespace, o).await?,
            Owned::Deployment(o) => one(client, namespace, o).await?,
            Owned::StatefulSet(o) => one(client, namespace, o).await?,
            Owned::Service(o) => one(client, namespace, o).await?,
            Owned::PodDisruptionBudget(o) => one(client, namespace, o).await?,
            Owned::CronJob(o) => one(client, namespace, o.as_ref()).await?,
        }
    }
    Ok(())
}

async fn one<K>(client: &kube::Client, namespace: &str, object: &K) -> Result<(), Error>
where
    K: k8s_openapi::Resource<Scope = NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let params = PatchParams::apply(MANAGER).force();
    let name = kube::Resource::meta(object).name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind: K::KIND,
            name,
            source,
        })?;
    Ok(())
}
