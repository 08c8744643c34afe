//! Fetch: everything a pipeline's reconcile reads from the API server, in one place.

use std::collections::BTreeMap;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};

use ballast_node::master_report::{self, MasterReport};

use super::Error;
use super::desired::object_name;

/// What the API server holds that the pipeline depends on.
#[derive(Clone, Debug, Default)]
pub struct Fetched {
    /// The referenced policy, if it exists.
    pub policy: Option<DegradationPolicy>,
    /// Referenced Secrets that exist, by name.
    pub secrets: BTreeMap<String, Secret>,
    /// The SQL ConfigMap, when one is referenced and exists.
    pub sql_config_map: Option<ConfigMap>,
    /// Membership Leases of the pipeline's slaves.
    pub slave_leases: Vec<Lease>,
    /// Membership Leases of the pipeline's intakes (they report shedding).
    pub intake_leases: Vec<Lease>,
    /// The slave StatefulSet, if created.
    pub slaves: Option<StatefulSet>,
    /// The pipeline's Deployments (their status says whether they rolled out).
    pub deployments: Vec<Deployment>,
    /// What the active master reports (failing windows, memory lost); empty
    /// before a master saved its state.
    pub master_report: MasterReport,
}

/// One Secret key a pipeline references, with the spec field that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    /// The field, as a person would find it in the spec.
    pub field: &'static str,
    /// The Secret's name.
    pub name: String,
    /// The key within it.
    pub key: String,
}

/// Every Secret key a pipeline references: the servers' passwords, and the
/// cold store's user and password (both in its one Secret, as basic
/// authentication needs them). Pure.
pub fn secret_uses(ap: &AnalyticsPipeline) -> Vec<SecretUse> {
    let s = &ap.spec;
    let passwords = [
        (
            "source.mysql.passwordSecretRef",
            s.source.mysql.password_secret_ref.as_ref(),
        ),
        (
            "hotStore.passwordSecretRef",
            s.hot_store.password_secret_ref.as_ref(),
        ),
        ("kv.passwordSecretRef", s.kv.password_secret_ref.as_ref()),
        ("cache.passwordSecretRef", s.cache.password_secret_ref.as_ref()),
    ];
    let mut uses: Vec<SecretUse> = passwords
        .into_iter()
        .filter_map(|(field, r)| {
            r.map(|r| SecretUse {
                field,
                name: r.name.clone(),
                key: r.key.clone(),
            })
        })
        .collect();
    if let Some(cold) = &s.cold_store.elasticsearch.credentials_secret_ref {
        for key in COLD_CREDENTIAL_KEYS {
            uses.push(SecretUse {
                field: "coldStore.elasticsearch.credentialsSecretRef",
                name: cold.name.clone(),
                key: key.to_owned(),
            });
        }
    }
    uses
}

/// The keys of the cold store's credentials Secret: user, then password.
pub const COLD_CREDENTIAL_KEYS: [&str; 2] = ["username", "password"];

/// Names of the Secrets a pipeline references, each once, and its data-plane
/// Secret (read to know whether it exists; its version rolls the pods).
pub fn secret_names(ap: &AnalyticsPipeline) -> Vec<String> {
    let own = super::data_plane::secret_name(ap.metadata.name.as_deref().unwrap_or_default());
    let mut names: Vec<String> = secret_uses(ap)
        .into_iter()
        .map(|u| u.name)
        .chain(std::iter::once(own))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Reads the policy, Secrets, ConfigMap, slave Leases, StatefulSet and Deployments of `ap`.
pub async fn fetch(client: &kube::Client, ap: &AnalyticsPipeline) -> Result<Fetched, Error> {
    let ns = ap.metadata.namespace.as_deref().ok_or(Error::MissingNamespace)?;
    let name = ap.metadata.name.as_deref().unwrap_or_default();
    let policies: Api<DegradationPolicy> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);

    let mut fetched = Fetched {
        policy: policies
            .get_opt(&ap.spec.policy_ref.name)
            .await
            .map_err(Error::Fetch)?,
        ..Fetched::default()
    };
    for secret in secret_names(ap) {
        if let Some(found) = secrets.get_opt(&secret).await.map_err(Error::Fetch)? {
            fetched.secrets.insert(secret, found);
        }
    }
    if let Some(cm) = &ap.spec.compute.sql_config_map_ref {
        fetched.sql_config_map = config_maps.get_opt(&cm.name).await.map_err(Error::Fetch)?;
    }
    let selector = ListParams::default().labels(&ballast_node::membership::selector(name, "slave"));
    fetched.slave_leases = leases.list(&selector).await.map_err(Error::Fetch)?.items;
    let intakes = ListParams::default().labels(&ballast_node::membership::selector(name, "intake"));
    fetched.intake_leases = leases.list(&intakes).await.map_err(Error::Fetch)?.items;
    fetched.slaves = sets
        .get_opt(&object_name(name, "slave"))
        .await
        .map_err(Error::Fetch)?;
    let owned = ListParams::default().labels(&format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=ballast-operator"
    ));
    fetched.deployments = deployments.list(&owned).await.map_err(Error::Fetch)?.items;
    let state = config_maps
        .get_opt(&format!("{name}-master-state"))
        .await
        .map_err(Error::Fetch)?;
    fetched.master_report = master_report(state.as_ref());
    Ok(fetched)
}

/// The master's report in its state ConfigMap. One that cannot be read is
/// reported as such rather than taken for "nothing fails". Pure.
pub fn master_report(state: Option<&ConfigMap>) -> MasterReport {
    let Some(json) = state
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get(master_report::KEY))
    else {
        return MasterReport::default();
    };
    serde_json::from_str(json).unwrap_or_else(|error| {
        let mut report = MasterReport::default();
        report.set_failing(vec![master_report::FailingWindow {
            kind: "report".into(),
            start_ms: 0,
            end_ms: 0,
            attempts: 0,
            since_ms: 0,
            error: master_report::short_error(&format!("the master's report is unreadable: {error}")),
        }]);
        report
    })
}
