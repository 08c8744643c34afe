//! The operator reads only the Secrets pipelines name, against the real API
//! server: its shipped ClusterRole may get a Secret by name but not list or
//! watch them (before, it streamed every Secret in the cluster), and a
//! password a pipeline references that changes still rolls its workers, on
//! the pipeline's next reconcile.

mod common;

use ballast_e2e::{OPERATOR_USER, Stack};
use common::eventually;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The config hash of the pipeline's collector pods.
async fn config_hash(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(deployments.get_opt(name).await?.and_then(|d| {
        d.spec?
            .template
            .metadata?
            .annotations?
            .get("ballast.dev/config-hash")
            .cloned()
    }))
}

#[tokio::test]
async fn the_operator_gets_named_secrets_only_and_a_changed_one_rolls_the_workers() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "secrets", json!({})).await?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator(binary, &ns).await?;

    for (verb, allowed) in [("get", true), ("list", false), ("watch", false)] {
        let may = common::rbac_allows(&client, OPERATOR_USER, &ns, (verb, "", "secrets"), None).await?;
        assert_eq!(may, allowed, "{verb} secrets");
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let collector = format!("{pipeline}-collector");
    let before = eventually("the collector's config hash", 60, || {
        config_hash(&deployments, &collector)
    })
    .await?;
    // The referenced password changes: read on the next reconcile, it rolls the pods.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "mysql",
            &PatchParams::apply("secrets-test").force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mysql"},
                                 "stringData": {"password": "rotated"}}),
            ),
        )
        .await?;
    eventually("a new config hash after the password changed", 75, || async {
        Ok(config_hash(&deployments, &collector)
            .await?
            .filter(|hash| *hash != before))
    })
    .await?;
    Ok(())
}
