//! Apply: server-side apply of the desired objects with one field manager.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

use super::Error;
use super::desired::DesiredObject;

/// The field manager of everything the operator writes.
pub const MANAGER: &str = "ballast-operator";

/// Applies every object; forcing takes over fields another manager changed, which corrects drift.
pub async fn apply(client: &kube::Client, namespace: &str, objects: &[DesiredObject]) -> Result<(), Error> {
    let params = PatchParams::apply(MANAGER).force();
    for object in objects {
        let (group, version) = object
            .api_version
            .split_once('/')
            .unwrap_or(("", object.api_version));
        let gvk = GroupVersionKind::gvk(group, version, object.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, object.plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        api.patch(&object.name, &params, &Patch::Apply(&object.body))
            .await
            .map_err(|source| Error::Apply {
                kind: object.kind,
                name: object.name.clone(),
                source,
            })?;
    }
    Ok(())
}
