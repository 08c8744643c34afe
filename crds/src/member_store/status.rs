//! What a `MemberStore` publishes: the active data centre and its epoch,
//! each data centre's cache as the member services must use it, the
//! standbys' replication, and the conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::mode::{DependencyStatus, Mode};

/// Observed state of a `MemberStore`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStoreStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, and failover conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The data centre whose Elasticsearch and Redis serve now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_data_center: Option<String>,
    /// Increases on every failover and failback; writes carrying an older epoch
    /// are refused, which fences the side that lost.
    #[serde(default)]
    pub epoch: i64,
    /// When the active data centre last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Writes accepted by Elasticsearch while MySQL was down, not yet replayed to it.
    #[serde(default)]
    pub pending_replay: i64,
    /// The published mode of the member MySQL (the primary's): while it is
    /// Degraded or Recovering, members are read from and written to
    /// Elasticsearch, and the writes journaled for the replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<DependencyStatus>,
    /// The data centre whose MySQL is the master now (the primary until the
    /// operator first promotes a replica). A change raises `epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_master: Option<String>,
    /// The data centre whose MySQL lost the master role and has not yet been
    /// fenced (`read_only`) and re-pointed as a replica of the new master:
    /// the operator does both as soon as it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_demoted: Option<String>,
    /// Each replica data centre's MySQL replication, as last measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["dataCenter".into()]))]
    pub mysql_replication: Vec<super::MysqlReplica>,
    /// How far behind the change stream each kept cluster is, as the
    /// operator last measured it from its replicator's consumer group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["cluster".into()]))]
    pub replication: Vec<Replica>,
    /// Each data centre's member cache (Redis) as the member services must
    /// use it: `Normal`, read and invalidated by every write; `Degraded`
    /// (it does not answer), neither read nor written, writes go to the
    /// other data centres' alone; `Recovering` (it answers again), invalidated
    /// by every write that can but not read, until the operator has emptied
    /// it of what it may hold stale (it missed the outage's invalidations).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["dataCenter".into()]))]
    pub caches: Vec<CacheStatus>,
}

/// One data centre's member cache, as the operator publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// The data centre's name.
    pub data_center: String,
    /// How the member services use it (see `MemberStoreStatus::caches`).
    pub mode: Mode,
    /// When this mode was entered.
    pub since: Time,
    /// Machine-readable cause of the last transition, in CamelCase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One kept cluster's replication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replica {
    /// The data centre's name, or `marketing`.
    pub cluster: String,
    /// Change records the cluster has applied (its group's committed offset).
    pub applied: i64,
    /// Change records it lacks.
    pub lag_events: i64,
    /// Age, in seconds, of the oldest record it lacks (0 when none).
    pub lag_seconds: f64,
    /// When this was measured.
    pub measured_at: Time,
}
