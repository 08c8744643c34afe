//! The operator's shipped RBAC against the real API server. Cluster-wide, it
//! is allowed what it needs and refused what it held before without needing
//! it: writing any Lease or ConfigMap of the cluster (kube-system's among
//! them), granting more than the workers' role (the API server's own
//! SubjectAccessReview). Namespaced (the chart's `scope: namespace`), an
//! operator bound only to Roles of its namespace reconciles a pipeline there
//! and is refused everywhere else. The operator creates no Secret but a
//! pipeline's data-plane token (the shipped admission policy).

mod common;

use ballast_e2e::{OPERATOR_USER, Stack, apply_manifest};
use common::{eventually, rbac_allows};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::Api;
use serde_json::json;

const LEASES: (&str, &str) = ("coordination.k8s.io", "leases");
const CONFIGMAPS: (&str, &str) = ("", "configmaps");
const RBAC: &str = "rbac.authorization.k8s.io";
const CRDS: (&str, &str) = ("apiextensions.k8s.io", "customresourcedefinitions");

#[tokio::test]
async fn the_operators_cluster_rbac_allows_what_it_needs_and_refuses_the_rest() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let admin = stack.kube_client().await?;
    ballast_e2e::install_operator_rbac(&admin, "ballast-system").await?;
    let on = |(group, resource): (&'static str, &'static str), verb: &'static str| (verb, group, resource);
    // (namespace, (verb, group, resource), name, allowed)
    let cases = [
        // Leases: read anywhere (the slaves'), its own election Lease only written.
        ("kube-system", on(LEASES, "list"), None, true),
        (
            "kube-system",
            on(LEASES, "update"),
            Some("kube-controller-manager"),
            false,
        ),
        ("kube-system", on(LEASES, "delete"), Some("kube-scheduler"), false),
        ("kube-system", on(LEASES, "create"), None, false),
        ("shop", on(LEASES, "delete"), Some("shop-master"), false),
        ("ballast-system", on(LEASES, "create"), None, true),
        (
            "ballast-system",
            on(LEASES, "update"),
            Some("ballast-operator"),
            true,
        ),
        (
            "ballast-system",
            on(LEASES, "update"),
            Some("someone-else"),
            false,
        ),
        (
            "ballast-system",
            on(LEASES, "delete"),
            Some("ballast-operator"),
            false,
        ),
        // ConfigMaps: read (the pipelines' SQL), never written.
        ("shop", on(CONFIGMAPS, "watch"), None, true),
        ("kube-system", on(CONFIGMAPS, "update"), Some("coredns"), false),
        ("shop", on(CONFIGMAPS, "create"), None, false),
        // Granting: the workers' shipped role by name, nothing more.
        (
            "shop",
            ("bind", RBAC, "clusterroles"),
            Some("ballast-worker"),
            true,
        ),
        (
            "shop",
            ("bind", RBAC, "clusterroles"),
            Some("cluster-admin"),
            false,
        ),
        ("shop", ("escalate", RBAC, "roles"), None, false),
        // Secrets: by name only.
        ("shop", ("get", "", "secrets"), Some("mysql"), true),
        ("shop", ("list", "", "secrets"), None, false),
        // CRDs: its own three upgraded by name; none created, deleted or other.
        ("", on(CRDS, "patch"), Some("memberstores.ballast.dev"), true),
        ("", on(CRDS, "get"), Some("analyticspipelines.ballast.dev"), true),
        ("", on(CRDS, "patch"), Some("certificates.cert-manager.io"), false),
        ("", on(CRDS, "create"), None, false),
        ("", on(CRDS, "delete"), Some("memberstores.ballast.dev"), false),
        ("", on(CRDS, "list"), None, false),
    ];
    for (namespace, action, name, allowed) in cases {
        let got = rbac_allows(&admin, OPERATOR_USER, namespace, action, name).await?;
        assert_eq!(got, allowed, "{action:?} {namespace}/{name:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_namespaced_operator_reconciles_its_namespace_and_nothing_else() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let admin = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&admin, "nsinstall", json!({})).await?;
    // The chart's namespaced RBAC, rendered for this namespace.
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ballast");
    let rbac = stack.helm(&[
        "template",
        "ballast",
        chart,
        "--namespace",
        &ns,
        "--set",
        "scope=namespace",
        "--show-only",
        "templates/rbac.yaml",
    ])?;
    apply_manifest(&admin, "charts/ballast scope=namespace rbac", &rbac, false).await?;
    let user = format!("system:serviceaccount:{ns}:ballast-operator");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator_with(
        binary,
        &ns,
        "127.0.0.1:0",
        &user,
        &["--worker-writes-role", "role"],
    )?;

    // It creates the pipeline's workloads and binds the workers to the Role ballast-worker here.
    let writes = format!("{pipeline}-worker-writes");
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
    let binding = eventually(&format!("the operator binding {writes}"), 60, || async {
        Ok(bindings.get_opt(&writes).await?)
    })
    .await?;
    assert_eq!(
        (binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
        ("Role", "ballast-worker")
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    eventually("the pipeline's collector Deployment", 60, || async {
        Ok(deployments.get_opt(&format!("{pipeline}-collector")).await?)
    })
    .await?;
    // Its workers may write Leases here, by that binding.
    let worker = format!("system:serviceaccount:{ns}:{pipeline}-worker");
    assert!(rbac_allows(&admin, &worker, &ns, ("create", LEASES.0, LEASES.1), None).await?);

    // Nothing outside its namespace.
    for (namespace, action) in [
        ("default", ("list", "apps", "deployments")),
        ("default", ("create", "apps", "deployments")),
        ("kube-system", ("get", "", "secrets")),
        ("kube-system", ("list", LEASES.0, LEASES.1)),
        ("default", ("list", "ballast.dev", "analyticspipelines")),
    ] {
        assert!(
            !rbac_allows(&admin, &user, namespace, action, None).await?,
            "{action:?} in {namespace}"
        );
    }
    Ok(())
}

/// RBAC cannot narrow `create` by name: the shipped admission policy keeps the
/// operator's Secret creates to data-plane tokens, so it cannot mint a
/// ServiceAccount token Secret and read it back.
#[tokio::test]
async fn the_operator_may_create_only_data_plane_token_secrets() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::PostParams;
    let stack = Stack::discover();
    let admin = stack.kube_client().await?;
    ballast_e2e::install_crds(&admin).await?;
    ballast_e2e::install_operator_rbac(&admin, "ballast-system").await?;
    let ns = ballast_e2e::pipeline_namespace(&admin, "opsecrets").await?;
    let secrets: Api<Secret> = Api::namespaced(stack.kube_client_as(OPERATOR_USER).await?, &ns);
    let secret = |value: serde_json::Value| -> anyhow::Result<Secret> { Ok(serde_json::from_value(value)?) };
    let minted = secret(json!({
        "metadata": {"name": "shop-data-plane-sa", "annotations": {"kubernetes.io/service-account.name": "default"}},
        "type": "kubernetes.io/service-account-token",
    }))?;
    let other = secret(json!({"metadata": {"name": "mysql-admin"}, "stringData": {"password": "x"}}))?;
    for (what, object) in [("a ServiceAccount token", &minted), ("another Secret", &other)] {
        // The policy may still be on its way to the API server's cache.
        let message = eventually(&format!("{what} refused"), 30, || async {
            match secrets.create(&PostParams::default(), object).await {
                Err(kube::Error::Api(e)) if e.code == 403 => Ok(Some(e.message)),
                Ok(created) => anyhow::bail!("{what} was created: {:?}", created.metadata.name),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        assert!(message.contains("creates only Opaque Secrets"), "{message}");
    }
    let token = secret(json!({"metadata": {"name": "shop-data-plane"}, "stringData": {"token": "t"}}))?;
    secrets.create(&PostParams::default(), &token).await?;
    Ok(())
}
