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

/// The slaves a Degraded KV epoch routes events over, published with the mode:
/// the handshake between the operator, the intakes and the slaves. An intake
/// routes only over this set (waiting, not guessing, until it knows every
/// member's address), stamps each delivery with its epoch and generation, and
/// a slave refuses a delivery stamped otherwise than the set it follows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlaveSet {
    /// The KV epoch this set serves.
    pub epoch: i64,
    /// Raised each time the members change within the epoch (a slave joined or lapsed).
    pub generation: i64,
    /// The slaves' identities (pod names), sorted.
    pub members: Vec<String>,
}

/// Why a slave refuses a delivery.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    /// The delivery was routed over another set (or epoch) than this slave follows.
    #[error(
        "delivery for kv epoch {sent_epoch} generation {sent_generation}; this slave follows epoch {epoch} generation {generation}"
    )]
    OtherSet {
        /// The delivery's epoch.
        sent_epoch: i64,
        /// The delivery's generation.
        sent_generation: i64,
        /// The epoch this slave follows.
        epoch: i64,
        /// The generation this slave follows.
        generation: i64,
    },
    /// The set the delivery was routed over does not include this slave.
    #[error("slave {0} is not in the published slave set")]
    NotAMember(String),
}

impl SlaveSet {
    /// Whether slave `me`, following `set` (none: no degraded KV epoch) at KV
    /// epoch `epoch`, takes a delivery stamped `sent_epoch`/`sent_generation`.
    /// Pure.
    pub fn admits(
        set: Option<&SlaveSet>,
        epoch: i64,
        me: &str,
        sent_epoch: i64,
        sent_generation: i64,
    ) -> Result<(), Fenced> {
        let (epoch, generation) = set.map_or((epoch, 0), |s| (s.epoch, s.generation));
        if (sent_epoch, sent_generation) != (epoch, generation) {
            return Err(Fenced::OtherSet {
                sent_epoch,
                sent_generation,
                epoch,
                generation,
            });
        }
        match set {
            Some(set) if !set.members.iter().any(|m| m == me) => Err(Fenced::NotAMember(me.to_owned())),
            _ => Ok(()),
        }
    }

    /// The set to publish while the KV store's published mode is `kv` (mode
    /// and epoch), given the previous set and the slaves ready now. Pure.
    /// Outside a Degraded epoch there is none; within one, the previous set
    /// stands while the ready slaves are the same (or none are: routing over
    /// nobody helps no one), and a change raises the generation.
    pub fn next(previous: Option<&SlaveSet>, kv: (Mode, i64), ready: &[String]) -> Option<SlaveSet> {
        let (mode, epoch) = kv;
        if mode != Mode::Degraded {
            return None;
        }
        let mut members = ready.to_vec();
        members.sort();
        members.dedup();
        match previous {
            Some(p) if p.epoch == epoch && (p.members == members || members.is_empty()) => Some(p.clone()),
            Some(p) if p.epoch == epoch => Some(SlaveSet {
                epoch,
                generation: p.generation + 1,
                members,
            }),
            _ => Some(SlaveSet {
                epoch,
                generation: 1,
                members,
            }),
        }
    }
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

    fn set(epoch: i64, generation: i64, members: &[&str]) -> SlaveSet {
        SlaveSet {
            epoch,
            generation,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn names(members: &[&str]) -> Vec<String> {
        members.iter().map(|m| (*m).to_owned()).collect()
    }

    #[test]
    fn the_slave_set_is_published_in_degraded_epochs_and_raised_on_each_change() {
        let two = set(3, 1, &["s-0", "s-1"]);
        // (previous, published kv mode and epoch, ready, next)
        let cases = [
            (None, (Mode::Normal, 0), names(&["s-0"]), None),
            (Some(two.clone()), (Mode::Recovering, 4), names(&["s-0"]), None),
            (
                None,
                (Mode::Degraded, 3),
                names(&["s-1", "s-0", "s-1"]),
                Some(set(3, 1, &["s-0", "s-1"])),
            ),
            (
                Some(two.clone()),
                (Mode::Degraded, 3),
                names(&["s-1", "s-0"]),
                Some(two.clone()),
            ),
            (
                Some(two.clone()),
                (Mode::Degraded, 3),
                names(&["s-0", "s-1", "s-2"]),
                Some(set(3, 2, &["s-0", "s-1", "s-2"])),
            ),
            (
                Some(two.clone()),
                (Mode::Degraded, 3),
                names(&["s-1"]),
                Some(set(3, 2, &["s-1"])),
            ),
            (
                Some(two.clone()),
                (Mode::Degraded, 3),
                Vec::new(),
                Some(two.clone()),
            ),
            (
                Some(two.clone()),
                (Mode::Degraded, 5),
                names(&["s-0"]),
                Some(set(5, 1, &["s-0"])),
            ),
        ];
        for (previous, kv, ready, want) in cases {
            assert_eq!(
                SlaveSet::next(previous.as_ref(), kv, &ready),
                want,
                "{previous:?} {kv:?} {ready:?}"
            );
        }
    }

    #[test]
    fn a_slave_admits_only_deliveries_routed_over_the_set_it_follows_and_including_it() {
        let followed = set(3, 2, &["s-0", "s-1"]);
        // (followed set, kv epoch followed, slave, sent epoch, sent generation, admitted)
        let cases = [
            (Some(&followed), 3, "s-0", 3, 2, true),
            (Some(&followed), 3, "s-0", 3, 1, false),
            (Some(&followed), 3, "s-0", 2, 2, false),
            (Some(&followed), 3, "s-2", 3, 2, false),
            // No degraded epoch: a hand-off in Recovering stamps the epoch and generation 0.
            (None, 4, "s-2", 4, 0, true),
            (None, 4, "s-2", 3, 2, false),
        ];
        for (set, epoch, me, sent_epoch, sent_generation, want) in cases {
            let got = SlaveSet::admits(set, epoch, me, sent_epoch, sent_generation);
            assert_eq!(got.is_ok(), want, "{me} following {set:?} at {epoch}: {got:?}");
        }
    }
}
