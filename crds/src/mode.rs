//! Dependencies, their modes, and how a mode is published in status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A dependency of the analytics pipeline whose failure has a declared degraded mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Dependency {
    /// The message queue (Kafka) between collectors and intake.
    #[serde(rename = "mq")]
    Mq,
    /// The KV store (Redis) holding events per time window.
    #[serde(rename = "kv")]
    Kv,
    /// The hot-results MySQL.
    #[serde(rename = "mysql")]
    Mysql,
    /// The Redis result cache.
    #[serde(rename = "cache")]
    Cache,
    /// The cold store (Elasticsearch).
    #[serde(rename = "cold")]
    Cold,
}

impl Dependency {
    /// Every dependency, in a fixed order.
    pub const ALL: [Dependency; 5] = [Self::Mq, Self::Kv, Self::Mysql, Self::Cache, Self::Cold];

    /// The name used in specs, status and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mq => "mq",
            Self::Kv => "kv",
            Self::Mysql => "mysql",
            Self::Cache => "cache",
            Self::Cold => "cold",
        }
    }
}

/// The mode a dependency's consumers are told to run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// The dependency is healthy and used normally.
    #[default]
    Normal,
    /// The dependency failed; its consumers run the declared degraded mode.
    Degraded,
    /// The dependency answers again; consumers are being moved back and the
    /// degraded mode's leftovers are drained before Normal.
    Recovering,
}

/// A mode an on-call operator can force, overriding the probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ForcedMode {
    /// Use the dependency normally whatever the probes say.
    Normal,
    /// Run the degraded mode whatever the probes say.
    Degraded,
}

/// The published mode of one dependency: what workers follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DependencyStatus {
    /// The current mode.
    pub mode: Mode,
    /// When this mode was entered.
    pub since: Time,
    /// Increases by one on every transition; workers and results carry it so
    /// that an action taken under an older epoch can be recognised and fenced.
    pub epoch: i64,
    /// Whether the mode is forced by `spec.override` rather than decided by probes.
    #[serde(default)]
    pub forced: bool,
    /// Machine-readable cause of the last transition, in CamelCase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What a person needs to know about the current mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The published mode of every dependency of a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DependencyModes {
    /// Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mq: Option<DependencyStatus>,
    /// The KV store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<DependencyStatus>,
    /// The hot-results MySQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<DependencyStatus>,
    /// The result cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<DependencyStatus>,
    /// The cold store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<DependencyStatus>,
}

impl DependencyModes {
    /// The status of `dependency`, if one was published.
    pub fn get(&self, dependency: Dependency) -> Option<&DependencyStatus> {
        match dependency {
            Dependency::Mq => self.mq.as_ref(),
            Dependency::Kv => self.kv.as_ref(),
            Dependency::Mysql => self.mysql.as_ref(),
            Dependency::Cache => self.cache.as_ref(),
            Dependency::Cold => self.cold.as_ref(),
        }
    }

    /// Replaces the status of `dependency`.
    pub fn set(&mut self, dependency: Dependency, status: DependencyStatus) {
        let slot = match dependency {
            Dependency::Mq => &mut self.mq,
            Dependency::Kv => &mut self.kv,
            Dependency::Mysql => &mut self.mysql,
            Dependency::Cache => &mut self.cache,
            Dependency::Cold => &mut self.cold,
        };
        *slot = Some(status);
    }

    /// One word for `kubectl get`: `Normal`, or the dependencies not in Normal,
    /// e.g. `Degraded(kv,mq)`.
    pub fn summary(&self) -> String {
        let away: Vec<&str> = Dependency::ALL
            .into_iter()
            .filter(|d| self.get(*d).is_some_and(|s| s.mode != Mode::Normal))
            .map(Dependency::as_str)
            .collect();
        if away.is_empty() {
            "Normal".to_owned()
        } else {
            format!("Degraded({})", away.join(","))
        }
    }
}

/// Modes forced by an operator on call, per dependency.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForcedModes {
    /// Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mq: Option<ForcedMode>,
    /// The KV store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<ForcedMode>,
    /// The hot-results MySQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<ForcedMode>,
    /// The result cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ForcedMode>,
    /// The cold store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<ForcedMode>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn status(mode: Mode) -> DependencyStatus {
        DependencyStatus {
            mode,
            since: Time(Timestamp::UNIX_EPOCH),
            epoch: 1,
            forced: false,
            reason: None,
            message: None,
        }
    }

    #[test]
    fn summary_lists_dependencies_away_from_normal_in_fixed_order() {
        let cases = [
            (vec![], "Normal"),
            (vec![(Dependency::Kv, Mode::Normal)], "Normal"),
            (vec![(Dependency::Kv, Mode::Degraded)], "Degraded(kv)"),
            (
                vec![
                    (Dependency::Kv, Mode::Recovering),
                    (Dependency::Mq, Mode::Degraded),
                ],
                "Degraded(mq,kv)",
            ),
        ];
        for (set, want) in cases {
            let mut modes = DependencyModes::default();
            for (dependency, mode) in set {
                modes.set(dependency, status(mode));
            }
            assert_eq!(modes.summary(), want);
        }
    }
}
