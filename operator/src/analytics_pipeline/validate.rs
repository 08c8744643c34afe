//! Validate: whether a pipeline can be reconciled with what fetch found. Pure.

use ballast_crds::refs::SecretKeyRef;
use ballast_crds::{AnalyticsPipeline, DegradationPolicySpec};
use ballast_node::secret::Secret;
use k8s_openapi::ByteString;

use super::fetch::{COLD_CREDENTIAL_KEYS, Fetched, secret_uses};

/// Why a pipeline waits: a condition reason and message for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason.
    pub reason: &'static str,
    /// What is missing and how to fix it.
    pub message: String,
}

/// A pipeline whose references all resolve.
#[derive(Debug)]
pub struct Valid<'a> {
    /// The policy's spec.
    pub policy: &'a DegradationPolicySpec,
    fetched: &'a Fetched,
}

impl Valid<'_> {
    /// The pipeline's SQL text: inline, or from its ConfigMap.
    pub fn sql_text(&self, ap: &AnalyticsPipeline) -> Option<String> {
        let compute = &ap.spec.compute;
        if let Some(sql) = &compute.sql {
            return Some(sql.clone());
        }
        let r = compute.sql_config_map_ref.as_ref()?;
        self.fetched
            .sql_config_map
            .as_ref()?
            .data
            .as_ref()?
            .get(&r.key)
            .cloned()
    }

    /// The value of a referenced Secret key (validated to exist).
    pub fn secret(&self, r: &SecretKeyRef) -> Option<Secret> {
        self.value(&r.name, &r.key).map(Secret::from)
    }

    /// The cold store's user and password, when its cluster is secured.
    pub fn cold_credentials(&self, ap: &AnalyticsPipeline) -> Option<(String, Secret)> {
        let name = &ap
            .spec
            .cold_store
            .elasticsearch
            .credentials_secret_ref
            .as_ref()?
            .name;
        let [user, password] = COLD_CREDENTIAL_KEYS.map(|key| self.value(name, key));
        Some((user?, Secret::from(password?)))
    }

    fn value(&self, name: &str, key: &str) -> Option<String> {
        let data = self.fetched.secrets.get(name)?.data.as_ref()?;
        data.get(key)
            .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).into_owned())
    }
}

/// The worker image a pipeline's pods run: its own, or the operator's
/// default; a pipeline naming none under an operator given none waits. Pure.
pub fn worker_image(ap: &AnalyticsPipeline, default: Option<&str>) -> Result<String, Invalid> {
    ap.spec
        .image
        .as_deref()
        .or(default)
        .map(str::to_owned)
        .ok_or_else(|| Invalid {
            reason: "NoWorkerImage",
            message: "spec.image is not set and the operator was given no worker image \
                      (BALLAST_WORKER_IMAGE, set by the chart's workerImage values)"
                .into(),
        })
}

/// Checks that the policy, every Secret key and the SQL ConfigMap key exist.
pub fn validate<'a>(ap: &AnalyticsPipeline, fetched: &'a Fetched) -> Result<Valid<'a>, Invalid> {
    let policy = fetched.policy.as_ref().ok_or_else(|| Invalid {
        reason: "PolicyNotFound",
        message: format!(
            "DegradationPolicy {:?} does not exist in this namespace",
            ap.spec.policy_ref.name
        ),
    })?;
    for used in secret_uses(ap) {
        let Some(secret) = fetched.secrets.get(&used.name) else {
            return Err(Invalid {
                reason: "SecretNotFound",
                message: format!(
                    "Secret {:?} named by spec.{} does not exist",
                    used.name, used.field
                ),
            });
        };
        if !secret.data.as_ref().is_some_and(|d| d.contains_key(&used.key)) {
            return Err(Invalid {
                reason: "SecretKeyNotFound",
                message: format!(
                    "Secret {:?} has no key {:?} (spec.{})",
                    used.name, used.key, used.field
                ),
            });
        }
    }
    let s = &ap.spec;
    if let Some(cm) = &s.compute.sql_config_map_ref {
        let has_key = fetched
            .sql_config_map
            .as_ref()
            .is_some_and(|c| c.data.as_ref().is_some_and(|d| d.contains_key(&cm.key)));
        if !has_key {
            return Err(Invalid {
                reason: "SqlNotFound",
                message: format!(
                    "ConfigMap {:?} with key {:?} (spec.compute.sqlConfigMapRef) does not exist",
                    cm.name, cm.key
                ),
            });
        }
    }
    Ok(Valid {
        policy: &policy.spec,
        fetched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_crds::DegradationPolicy;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret as Secret8s};

    fn pipeline() -> AnalyticsPipeline {
        serde_yaml::from_str(include_str!("../../../manifests/samples/analyticspipeline.yaml"))
            .expect("sample")
    }

    fn complete() -> Fetched {
        let policy: DegradationPolicy =
            serde_yaml::from_str(include_str!("../../../manifests/samples/degradationpolicy.yaml"))
                .expect("sample");
        let secret = |name: &str| -> Secret8s {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name}, "data": {"password": "cHc="}}),
            )
            .expect("secret")
        };
        let cm: ConfigMap = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "merchant-analytics-sql"}, "data": {"windows.sql": "SELECT 1"}}),
        )
        .expect("cm");
        Fetched {
            policy: Some(policy),
            secrets: ["orders-db", "results-db", "cache-redis"]
                .map(|n| (n.to_owned(), secret(n)))
                .into(),
            sql_config_map: Some(cm),
            ..Fetched::default()
        }
    }

    #[test]
    fn complete_references_validate_and_expose_secret_values() {
        let fetched = complete();
        let ap = pipeline();
        let valid = validate(&ap, &fetched).expect("valid");
        let r = ap.spec.hot_store.password_secret_ref.as_ref().expect("ref");
        assert_eq!(valid.secret(r).as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(valid.cold_credentials(&ap), None);
    }

    #[test]
    fn the_cold_stores_secret_needs_a_user_and_a_password() {
        let mut ap = pipeline();
        ap.spec.cold_store.elasticsearch.credentials_secret_ref = Some(ballast_crds::refs::LocalObjectRef {
            name: "es-cold".into(),
        });
        let with = |data: serde_json::Value| {
            let mut fetched = complete();
            let secret: Secret8s =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "es-cold"}, "data": data}))
                    .expect("secret");
            fetched.secrets.insert("es-cold".into(), secret);
            fetched
        };
        // Missing Secret, missing key: each named.
        let err = validate(&ap, &complete()).expect_err("no Secret");
        assert_eq!(err.reason, "SecretNotFound");
        assert!(
            err.message
                .contains("spec.coldStore.elasticsearch.credentialsSecretRef"),
            "{}",
            err.message
        );
        let fetched = with(serde_json::json!({"username": "ZWxhc3RpYw=="}));
        let err = validate(&ap, &fetched).expect_err("no password");
        assert_eq!(err.reason, "SecretKeyNotFound");
        assert!(err.message.contains("\"password\""), "{}", err.message);
        // Both keys: the prober's credentials.
        let fetched = with(serde_json::json!({"username": "ZWxhc3RpYw==", "password": "cHc="}));
        let valid = validate(&ap, &fetched).expect("valid");
        let (user, password) = valid.cold_credentials(&ap).expect("credentials");
        assert_eq!((user.as_str(), password.expose()), ("elastic", "pw"));
    }

    #[test]
    fn the_pipelines_image_wins_over_the_operators_and_one_is_needed() {
        let mut ap = pipeline();
        let own = String::from("ghcr.io/team/ballast-worker:pinned");
        // (pipeline's image, operator's default, image run or the reason it waits)
        let cases = [
            (Some(own.as_str()), Some("ghcr.io/x/w:2"), Ok(own.as_str())),
            (Some(own.as_str()), None, Ok(own.as_str())),
            (None, Some("ghcr.io/x/w:2"), Ok("ghcr.io/x/w:2")),
            (None, None, Err("NoWorkerImage")),
        ];
        for (image, default, want) in cases {
            ap.spec.image = image.map(str::to_owned);
            let got = worker_image(&ap, default);
            assert_eq!(
                got.as_deref().map_err(|e| e.reason),
                want,
                "{image:?} {default:?}"
            );
        }
    }

    #[test]
    fn each_missing_reference_names_itself() {
        type Breaker = fn(&mut Fetched);
        let cases: Vec<(&str, Breaker, &str)> = vec![
            ("PolicyNotFound", |f| f.policy = None, "merchant-analytics"),
            (
                "SecretNotFound",
                |f| {
                    f.secrets.remove("results-db");
                },
                "spec.hotStore.passwordSecretRef",
            ),
            (
                "SecretKeyNotFound",
                |f| {
                    if let Some(s) = f.secrets.get_mut("orders-db") {
                        s.data = Some(Default::default());
                    }
                },
                "has no key \"password\"",
            ),
            (
                "SqlNotFound",
                |f| f.sql_config_map = None,
                "merchant-analytics-sql",
            ),
        ];
        for (reason, break_it, words) in cases {
            let mut fetched = complete();
            break_it(&mut fetched);
            let err = validate(&pipeline(), &fetched).expect_err(reason);
            assert_eq!(err.reason, reason);
            assert!(err.message.contains(words), "{reason}: {}", err.message);
        }
    }
}
