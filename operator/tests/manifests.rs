//! The shipped deployment manifests against the local stack's real API server:
//! the operator's Namespace, Deployment, disruption budget and RBAC, and the
//! workers' Lease admission policy, as plain manifests and as
//! the Helm chart renders them, are accepted as written (a server-side dry run
//! checks the schema, field names and values, and stores nothing).

use ballast_e2e::{Stack, apply_manifest};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ballast");

#[tokio::test]
async fn the_shipped_operator_manifests_pass_a_server_side_dry_run() -> anyhow::Result<()> {
    let client = Stack::discover().kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let manifests = [
        (
            "manifests/operator/deployment.yaml",
            include_str!("../../manifests/operator/deployment.yaml"),
        ),
        ballast_e2e::manifests::OPERATOR_RBAC,
        ballast_e2e::manifests::WORKER_LEASE_POLICY,
    ];
    for (path, text) in manifests {
        apply_manifest(&client, path, text, true).await?;
    }
    Ok(())
}

/// Runs the stack's helm with `args`; its stdout, or an error with its output.
fn helm(stack: &Stack, args: &[&str]) -> anyhow::Result<String> {
    Ok(stack.helm(args)?)
}

#[tokio::test]
async fn the_chart_lints_and_renders_objects_the_api_server_accepts() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    helm(&stack, &["lint", "--strict", CHART])?;
    let rendered = helm(
        &stack,
        &[
            "template",
            "ballast",
            CHART,
            "--namespace",
            "ballast-system",
            "--include-crds",
        ],
    )?;
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        anyhow::ensure!(
            rendered.contains(&format!("kind: {kind}\n")),
            "the chart renders no {kind}"
        );
    }
    apply_manifest(&client, "charts/ballast (helm template)", &rendered, true).await?;
    Ok(())
}

/// The chart ships the admission policy as the plain manifests do, byte for byte.
#[test]
fn the_charts_lease_policy_is_the_shipped_manifest() {
    assert_eq!(
        include_str!("../../charts/ballast/files/worker-leases.yaml"),
        ballast_e2e::manifests::WORKER_LEASE_POLICY.1
    );
}
