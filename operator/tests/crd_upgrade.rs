//! The leader upgrades the installed Ballast CRDs to its own version when it
//! starts (`--upgrade-crds`, which the chart and the manifests set: `helm
//! upgrade` never upgrades a chart's CRDs), under the shipped RBAC against
//! the real API server; and it keeps a CRD that a newer version wrote.

mod common;

use ballast_e2e::{OPERATOR_USER, Stack, scenario};
use common::eventually;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

const OLDER: &str = "degradationpolicies.ballast.dev";
const NEWER: &str = "memberstores.ballast.dev";
const MANAGER: &str = "crd-upgrade-test";

/// This build's CRD `name`, as JSON.
fn ours(name: &str) -> anyhow::Result<Value> {
    let (_, crd) = ballast_crds::all()
        .into_iter()
        .find(|(_, c)| c.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| anyhow::anyhow!("no CRD {name}"))?;
    Ok(serde_json::to_value(crd)?)
}

/// The description of a CRD's schema, the field the test changes.
fn description(crd: &mut Value) -> &mut Value {
    &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"]
}

/// CRD `name` as another version of Ballast wrote it: `written_by` in the
/// annotation, and a schema description of its own.
fn as_written_by(name: &str, written_by: &str) -> anyhow::Result<Value> {
    let mut crd = ours(name)?;
    crd["metadata"]["annotations"] = json!({ "ballast.dev/version": written_by });
    *description(&mut crd) = json!(format!("as {written_by} wrote it"));
    Ok(crd)
}

/// The CRD's schema description and the version that wrote it.
async fn installed(
    crds: &Api<CustomResourceDefinition>,
    name: &str,
) -> anyhow::Result<(Option<String>, Option<String>)> {
    let mut crd = serde_json::to_value(crds.get(name).await?)?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Ok((
        text(description(&mut crd)),
        text(&crd["metadata"]["annotations"]["ballast.dev/version"]),
    ))
}

#[tokio::test]
async fn the_leader_upgrades_an_older_crd_to_its_version_and_keeps_a_newer_one() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let admin = stack.kube_client().await?;
    ballast_e2e::install_crds(&admin).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let apply = PatchParams::apply(MANAGER).force();
    for (name, version) in [(OLDER, "0.0.1"), (NEWER, "99.0.0")] {
        crds.patch(name, &apply, &Patch::Apply(as_written_by(name, version)?))
            .await?;
    }
    let ns = ballast_e2e::pipeline_namespace(&admin, "crd-upgrade").await?;
    ballast_e2e::install_operator_rbac(&admin, &ns).await?;
    let port = scenario::free_port()?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator_with(
        binary,
        &ns,
        &format!("127.0.0.1:{port}"),
        OPERATOR_USER,
        &["--upgrade-crds"],
    )?;

    let version = env!("CARGO_PKG_VERSION").to_owned();
    let want = (
        description(&mut ours(OLDER)?).as_str().map(str::to_owned),
        Some(version.clone()),
    );
    eventually(&format!("{OLDER} at version {version}"), 60, || async {
        Ok((installed(&crds, OLDER).await? == want).then_some(()))
    })
    .await?;
    let kept = format!("ballast_operator_crd_upgrades_total{{crd=\"{NEWER}\",outcome=\"kept_newer\"}}");
    eventually("the newer CRD reported kept", 30, || async {
        Ok((scenario::metric(port, &kept).await? == Some(1.0)).then_some(()))
    })
    .await?;
    assert_eq!(
        installed(&crds, NEWER).await?,
        (Some("as 99.0.0 wrote it".to_owned()), Some("99.0.0".to_owned())),
        "a newer version's CRD is left as it is"
    );

    // This test's fields given back: the CRDs as this build has them.
    for name in [OLDER, NEWER] {
        let mut crd = ours(name)?;
        crd["metadata"]["annotations"] = json!({});
        crds.patch(name, &apply, &Patch::Apply(crd)).await?;
    }
    ballast_e2e::install_crds(&admin).await?;
    anyhow::ensure!(
        installed(&crds, NEWER).await?.1.is_none(),
        "the test's version annotation is gone"
    );
    Ok(())
}
