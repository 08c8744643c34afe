//! Kubernetes API server: create a namespace, apply a CRD, create and list a resource of it.

use std::time::Duration;

use ballast_e2e::Stack;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A throwaway kind that proves the API server serves CRDs end to end.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(group = "smoke.ballast.dev", version = "v1", kind = "SmokeCheck", namespaced)]
struct SmokeCheckSpec {
    /// Anything: the test reads it back.
    message: String,
}

#[tokio::test]
async fn api_server_creates_namespace_applies_crd_and_lists_it() -> anyhow::Result<()> {
    let client = Stack::discover().kube_client().await?;
    let apply = PatchParams::apply("ballast-smoke").force();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = super::unique("smoke");
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = SmokeCheck::crd();
    crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd)).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &crd.name_any(), conditions::is_crd_established()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("CRD {} not established within 30 s", crd.name_any()))??;

    let checks: Api<SmokeCheck> = Api::namespaced(client.clone(), &ns);
    let check = SmokeCheck::new("hello", SmokeCheckSpec { message: ns.clone() });
    checks.create(&PostParams::default(), &check).await?;
    let listed = checks.list(&ListParams::default()).await?;
    let messages: Vec<&str> = listed.items.iter().map(|c| c.spec.message.as_str()).collect();
    assert_eq!(messages, [ns.as_str()]);

    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}
