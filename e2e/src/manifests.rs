//! What the tests apply to the API server: Ballast's CRDs and the workers'
//! Lease admission policy, the operator's shipped RBAC, and any shipped
//! multi-document manifest.

use crate::StackError;

/// Applies Ballast's CRDs (as generated from the Rust types), waits until
/// the API server serves them, and applies the shipped admission policy
/// that keeps each pipeline's workers to their own Leases.
pub async fn install_crds(client: &kube::Client) -> Result<(), StackError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("ballast-e2e").force();
    for (_, crd) in ballast_crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd)).await?;
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(std::time::Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            _ => return Err(StackError::CrdNotEstablished(name)),
        }
    }
    // As an installed Ballast has it: every scenario's workers run under it.
    let (path, text) = WORKER_LEASE_POLICY;
    apply_manifest(client, path, text, false).await
}

/// The admission policy that lets each pipeline's workers write only their
/// own pipeline's Leases, as shipped (path, text).
pub const WORKER_LEASE_POLICY: (&str, &str) = (
    "manifests/admission/worker-leases.yaml",
    include_str!("../../manifests/admission/worker-leases.yaml"),
);

/// The operator's RBAC as shipped (path, text): what a deployment grants it.
pub const OPERATOR_RBAC: (&str, &str) = (
    "manifests/operator/rbac.yaml",
    include_str!("../../manifests/operator/rbac.yaml"),
);

/// The user the scenarios run the operator as: the shipped ServiceAccount, so
/// that a permission missing from its RBAC fails them as it would a deployment.
pub const OPERATOR_USER: &str = "system:serviceaccount:ballast-system:ballast-operator";

/// Applies the operator's shipped RBAC (server-side, with its namespace), as
/// a deployment would, and lets it keep its election Lease in
/// `election_namespace` (where the scenario runs it) as the shipped binding
/// does in `ballast-system`.
pub async fn install_operator_rbac(
    client: &kube::Client,
    election_namespace: &str,
) -> Result<(), StackError> {
    let (path, text) = OPERATOR_RBAC;
    apply_manifest(client, path, text, false).await?;
    grant_election(client, election_namespace, OPERATOR_USER).await
}

/// Binds the shipped ClusterRole `ballast-operator-election` to `user` in
/// `namespace`: an operator's leader Lease there, and no other Lease.
pub async fn grant_election(client: &kube::Client, namespace: &str, user: &str) -> Result<(), StackError> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kube::api::{Api, Patch, PatchParams};
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "ballast-operator-election", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ballast-operator-election"},
        "subjects": [{"kind": "User", "name": user}],
    });
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch(
            "ballast-operator-election",
            &PatchParams::apply("ballast-e2e").force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

/// Server-side applies every object of the multi-document YAML manifest `text`
/// (read from `path`), creating the namespaces its namespaced objects name.
/// With `dry_run` the API server validates each object and stores none.
pub async fn apply_manifest(
    client: &kube::Client,
    path: &'static str,
    text: &str,
    dry_run: bool,
) -> Result<(), StackError> {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    use serde::Deserialize as _;
    let invalid = |message: String| StackError::Manifest { path, message };
    let params = PatchParams::apply("ballast-e2e").force();
    let object_params = if dry_run {
        params.clone().dry_run()
    } else {
        params.clone()
    };
    for document in serde_yaml::Deserializer::from_str(text) {
        let object = DynamicObject::deserialize(document).map_err(|e| invalid(e.to_string()))?;
        let types = object
            .types
            .clone()
            .ok_or_else(|| invalid("an object without apiVersion and kind".into()))?;
        let gvk = GroupVersionKind::try_from(&types).map_err(|e| invalid(e.to_string()))?;
        let resource = ApiResource::from_gvk(&gvk);
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match &object.metadata.namespace {
            Some(ns) => {
                let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
                let namespace =
                    serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                namespaces.patch(ns, &params, &Patch::Apply(&namespace)).await?;
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &object_params, &Patch::Apply(&object)).await?;
    }
    Ok(())
}
