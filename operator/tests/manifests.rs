//! The shipped deployment manifests against the local stack's real API server:
//! the operator's Namespace, Deployment, disruption budget and RBAC, and the
//! workers' Lease admission policy, as plain manifests, as kustomize builds
//! them (cluster-wide and namespaced) and as the Helm chart renders them
//! (both scopes), are accepted as written (a server-side dry run checks the
//! schema, field names and values, and stores nothing); the chart's RBAC is
//! the manifests'.

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

/// The chart rendered into `namespace` with `scope`, and `extra` arguments.
fn render(stack: &Stack, namespace: &str, scope: &str, extra: &[&str]) -> anyhow::Result<String> {
    let scope = format!("scope={scope}");
    let mut args = vec![
        "template",
        "ballast",
        CHART,
        "--namespace",
        namespace,
        "--set",
        &scope,
    ];
    args.extend(extra);
    helm(stack, &args)
}

#[tokio::test]
async fn the_chart_lints_and_renders_objects_the_api_server_accepts() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    helm(&stack, &["lint", "--strict", CHART])?;
    let rendered = render(&stack, "ballast-system", "cluster", &["--include-crds"])?;
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
    // In a namespace of its own: its bindings' roleRefs differ from the cluster-wide ones'.
    let namespaced = render(&stack, "ballast-team", "namespace", &[])?;
    apply_manifest(
        &client,
        "charts/ballast scope=namespace (helm template)",
        &namespaced,
        true,
    )
    .await?;
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

/// The objects of a multi-document YAML manifest, comments dropped, by kind
/// and name (helm renders in its own install order).
fn objects(text: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    use serde::Deserialize as _;
    let mut objects = serde_yaml::Deserializer::from_str(text)
        .map(|d| Ok(serde_yaml::Value::deserialize(d)?))
        .filter(|o| !matches!(o, Ok(serde_yaml::Value::Null)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = |o: &serde_yaml::Value| {
        let field = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
        (field(&o["kind"]), field(&o["metadata"]["name"]))
    };
    objects.sort_by_key(key);
    Ok(objects)
}

/// The scenarios run the operator with the manifests' RBAC; the chart must
/// not drift from it, in either scope.
#[test]
fn the_chart_grants_the_operator_exactly_what_the_manifests_grant() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let rbac = |scope: &str| {
        render(
            &stack,
            "ballast-system",
            scope,
            &["--show-only", "templates/rbac.yaml"],
        )
    };
    let manifests = objects(ballast_e2e::manifests::OPERATOR_RBAC.1)?;
    assert_eq!(
        manifests.len(),
        8,
        "ServiceAccount, ClusterRole, binding; CRD upgrade ClusterRole and binding; \
         election ClusterRole and binding; worker ClusterRole"
    );
    assert_eq!(objects(&rbac("cluster")?)?, manifests);
    let namespaced = objects(include_str!("../../manifests/namespaced/rbac.yaml"))?;
    assert_eq!(objects(&rbac("namespace")?)?, namespaced);
    Ok(())
}

/// `target` as a path relative to the directory `from`.
fn relative_to(from: &std::path::Path, target: &str) -> anyhow::Result<String> {
    let target = std::fs::canonicalize(target)?;
    let from = std::fs::canonicalize(from)?;
    let up = from.components().count() - 1;
    let down = target.strip_prefix("/")?;
    Ok(format!("{}{}", "../".repeat(up), down.display()))
}

const CLUSTER_SCOPED: [&str; 5] = [
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "CustomResourceDefinition",
    "ValidatingAdmissionPolicy",
];

#[tokio::test]
async fn both_kustomizations_build_objects_the_api_server_accepts_and_the_namespaced_one_needs_no_cluster_scope()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");
    let cluster = stack.kubectl(&["kustomize", root])?;
    apply_manifest(&client, "manifests (kustomize)", &cluster, true).await?;
    // Built into a namespace of its own (an overlay, as a team would write
    // one): its bindings' roleRefs differ from the cluster-wide install's.
    let overlay = std::env::temp_dir().join(format!("ballast-namespaced-{}", std::process::id()));
    std::fs::create_dir_all(&overlay)?;
    std::fs::write(
        overlay.join("kustomization.yaml"),
        // kustomize takes a base by a relative path only.
        format!(
            "resources: [{}]\nnamespace: ballast-kustomized\n",
            relative_to(&overlay, &format!("{root}/namespaced"))?
        ),
    )?;
    let namespaced = stack.kubectl(&["kustomize", overlay.to_str().unwrap_or_default()])?;
    std::fs::remove_dir_all(&overlay)?;
    for object in objects(&namespaced)? {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        assert!(
            !CLUSTER_SCOPED.contains(&kind.as_str()),
            "the namespaced install has a {kind}"
        );
    }
    for setting in ["BALLAST_WATCH_NAMESPACE", "BALLAST_WORKER_WRITES_ROLE"] {
        assert!(
            namespaced.contains(setting),
            "the namespaced operator lacks {setting}"
        );
    }
    // (apply_manifest creates the namespace first: a team is granted it, not the cluster.)
    apply_manifest(&client, "manifests/namespaced (kustomize)", &namespaced, true).await?;
    Ok(())
}
