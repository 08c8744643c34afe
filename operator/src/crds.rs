//! Keeps the cluster's Ballast CRDs at this operator's version. Helm installs
//! a chart's CRDs once and never upgrades them, so after `helm upgrade` the
//! API server would still prune the fields the new operator writes. The
//! leader applies its own CRDs at start (server-side, forced: Helm's or
//! kubectl's fields become its own), each marked with the version that
//! wrote it, and never replaces a CRD a newer version wrote (a rollback
//! must not take schema away from the objects stored under it). A CRD not
//! installed is left to the installer: the operator only upgrades.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

/// The annotation naming the operator version that wrote a CRD.
pub const VERSION_ANNOTATION: &str = "ballast.dev/version";

/// The field manager of the operator's CRD writes.
const MANAGER: &str = "ballast-operator";

/// What to do with one installed CRD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Apply ours: it was written by this version or an older one (or by
    /// an installer that did not say).
    Apply,
    /// Leave it: written by this newer version.
    Newer(String),
}

/// Whether a CRD written by `installed` (its annotation) is replaced by
/// ours, `ours`. Versions compare by their numeric `major.minor.patch`; one
/// that does not parse is not newer. Pure.
pub fn step(installed: Option<&str>, ours: &str) -> Step {
    match (installed.and_then(numeric), numeric(ours)) {
        (Some(theirs), Some(mine)) if theirs > mine => Step::Newer(installed.unwrap_or_default().to_owned()),
        _ => Step::Apply,
    }
}

/// `major.minor.patch` of a version (a pre-release or build suffix ignored).
fn numeric(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(str::parse::<u64>);
    let version = (parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?);
    parts.next().is_none().then_some(version)
}

/// What happened to one CRD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ours is in force now.
    Applied,
    /// A newer version's is kept.
    KeptNewer,
    /// None is installed: nothing to upgrade.
    NotInstalled,
    /// Reading or writing it failed (logged); the next start tries again.
    Failed,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::KeptNewer => "kept_newer",
            Self::NotInstalled => "not_installed",
            Self::Failed => "failed",
        }
    }
}

/// Upgrades every Ballast CRD installed to this operator's `version`, each
/// call within `deadline`; the outcome per CRD name.
pub async fn upgrade(client: &kube::Client, version: &str, deadline: Duration) -> Vec<(String, Outcome)> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut outcomes = Vec::new();
    for (_, mut crd) in ballast_crds::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let outcome = match one(&api, &mut crd, &name, version, deadline).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(crd = %name, %error, "upgrading a CRD failed; the next start tries again");
                Outcome::Failed
            }
        };
        outcomes.push((name, outcome));
    }
    outcomes
}

/// Why reading or writing a CRD failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, CallError> {
    Ok(tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| CallError::Timeout(deadline))??)
}

async fn one(
    api: &Api<CustomResourceDefinition>,
    crd: &mut CustomResourceDefinition,
    name: &str,
    version: &str,
    deadline: Duration,
) -> Result<Outcome, CallError> {
    let Some(installed) = within(deadline, api.get_opt(name)).await? else {
        tracing::info!(crd = %name, "not installed: the chart or `kubectl apply -f crds/` installs it");
        return Ok(Outcome::NotInstalled);
    };
    let written_by = installed
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VERSION_ANNOTATION))
        .map(String::as_str);
    if let Step::Newer(newer) = step(written_by, version) {
        tracing::warn!(crd = %name, installed = %newer, ours = %version, "a newer operator wrote this CRD: kept");
        return Ok(Outcome::KeptNewer);
    }
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(VERSION_ANNOTATION.to_owned(), version.to_owned());
    let params = PatchParams::apply(MANAGER).force();
    within(deadline, api.patch(name, &params, &Patch::Apply(&*crd))).await?;
    tracing::info!(crd = %name, from = written_by.unwrap_or("unknown"), to = %version, "CRD at this operator's version");
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_crd_written_by_a_newer_version_is_kept() {
        let cases = [
            // (installed, ours, want)
            (None, "0.2.0", Step::Apply),
            (Some("0.1.0"), "0.2.0", Step::Apply),
            (Some("0.2.0"), "0.2.0", Step::Apply),
            (Some("0.10.0"), "0.9.3", Step::Newer("0.10.0".into())),
            (Some("1.0.0-rc.1"), "0.9.0", Step::Newer("1.0.0-rc.1".into())),
            (Some("0.2.1+abc"), "0.2.0", Step::Newer("0.2.1+abc".into())),
            (Some("not a version"), "0.2.0", Step::Apply),
            (Some("1.2"), "0.2.0", Step::Apply),
            (Some("1.2.3.4"), "0.2.0", Step::Apply),
            (Some("9.9.9"), "dev", Step::Apply),
        ];
        for (installed, ours, want) in cases {
            assert_eq!(step(installed, ours), want, "{installed:?} vs {ours}");
        }
    }
}
