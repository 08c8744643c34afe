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
        apply_object(client, namespace, object)
            .await
            .map_err(|source| Error::Apply {
                kind: object.kind(),
                name: object.name().to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Server-side applies one object into `namespace` (what a MemberStore's
/// workloads, spread over several namespaces, are applied with too).
pub async fn apply_object(client: &kube::Client, namespace: &str, object: &Owned) -> Result<(), kube::Error> {
    match object {
        Owned::ServiceAccount(o) => one(client, namespace, o).await,
        Owned::Role(o) => one(client, namespace, o).await,
        Owned::RoleBinding(o) => one(client, namespace, o).await,
        Owned::Deployment(o) => one(client, namespace, o).await,
        Owned::StatefulSet(o) => one(client, namespace, o).await,
        Owned::Service(o) => one(client, namespace, o).await,
        Owned::PodDisruptionBudget(o) => one(client, namespace, o).await,
        Owned::CronJob(o) => one(client, namespace, o.as_ref()).await,
        Owned::NetworkPolicy(o) => one(client, namespace, o).await,
    }
}

async fn one<K>(client: &kube::Client, namespace: &str, object: &K) -> Result<(), kube::Error>
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
    api.patch(&name, &params, &Patch::Apply(object)).await?;
    Ok(())
}

/// Creates the pipeline's data-plane Secret with a new token; never replaces
/// one (a team's own, or the one the pods run with). A Secret created
/// meanwhile by another replica is read back.
pub async fn data_plane_secret(
    client: &kube::Client,
    namespace: &str,
    pipeline: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<k8s_openapi::api::core::v1::Secret, Error> {
    use k8s_openapi::api::core::v1::Secret;
    let name = super::data_plane::secret_name(pipeline);
    let apply_error = |source| Error::Apply {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    let token = super::data_plane::new_token().map_err(Error::Random)?;
    let secret = super::data_plane::secret(pipeline, namespace, owner, &token);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.map_err(apply_error),
        Err(source) => Err(apply_error(source)),
    }
}
