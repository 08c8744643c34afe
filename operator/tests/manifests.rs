//! The shipped deployment manifests against the local stack's real API server:
//! the operator's Namespace, Deployment and RBAC are accepted as written (a server-side dry run checks the schema, field
//! names and values, and stores nothing).

use ballast_e2e::{Stack, apply_manifest};

#[tokio::test]
async fn the_shipped_operator_manifests_pass_a_server_side_dry_run() -> anyhow::Result<()> {
    let client = Stack::discover().kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let manifests = [
        (
            "manifests/operator/deployment.yaml",
            include_str!("../../manifests/operator/deployment.yaml"),
        ),
        (
            "manifests/operator/rbac.yaml",
            include_str!("../../manifests/operator/rbac.yaml"),
        ),
    ];
    for (path, text) in manifests {
        apply_manifest(&client, path, text, true).await?;
    }
    Ok(())
}
