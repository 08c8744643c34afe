//! `AnalyticsPipeline`: the real-time merchant analytics platform, from binlog to query API.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::mode::{DependencyModes, ForcedModes};
use crate::placement::Placement;
use crate::refs::{ConfigMapKeyRef, ElasticsearchRef, KafkaRef, LocalObjectRef, MysqlRef, RedisRef};

/// A real-time analytics pipeline: collectors tail the business database's
/// binlog into Kafka, the intake stores events per time window in the KV
/// store, the master dispatches one compute task per window to the slaves,
/// results land in the hot MySQL and the cache, and the query service serves them.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "AnalyticsPipeline",
    namespaced,
    shortname = "ap",
    category = "ballast",
    status = "AnalyticsPipelineStatus",
    doc = "A real-time merchant analytics pipeline and the degraded modes that keep it available.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".status.summary",
        description = "Normal, or the dependencies in a degraded mode"
    ),
    printcolumn(
        name = "Slaves",
        type_ = "string",
        json_path = ".status.slaves",
        description = "Ready/desired slaves"
    ),
    printcolumn(
        name = "Shed",
        type_ = "integer",
        json_path = ".status.shedMerchants",
        description = "Merchants whose events the backup intake is shedding"
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.policyRef.name",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsPipelineSpec {
    /// Container image of `ballast-worker`, which every role runs. Defaults to
    /// the worker image the operator was given (`BALLAST_WORKER_IMAGE`, which
    /// the chart and kustomize set to the worker of the operator's own version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// The `DegradationPolicy` (same namespace) that says how failures are
    /// detected and what each degraded mode does.
    pub policy_ref: LocalObjectRef,
    /// The business database whose row binlog the collectors tail.
    pub source: SourceSpec,
    /// Kafka, between collectors and intake.
    pub kafka: KafkaRef,
    /// The KV store (Redis) holding events per time window.
    pub kv: RedisRef,
    /// The result cache (Redis), written together with the hot MySQL.
    pub cache: RedisRef,
    /// The hot-results MySQL: today's results, read/write split.
    pub hot_store: MysqlRef,
    /// The cold store (Elasticsearch): daily and offline rollups for history.
    pub cold_store: ColdStoreSpec,
    /// How events are cut into windows and computed.
    pub compute: ComputeSpec,
    /// Replicas and resources of each role.
    #[serde(default)]
    pub roles: RolesSpec,
    /// Where every pod of the pipeline runs (node selector, tolerations,
    /// scheduler, priority); unset, where the default scheduler puts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The nightly job: rollups into the cold store, the hot store's
    /// retention, and the precomputed frequent cold queries.
    #[serde(default)]
    pub nightly: NightlySpec,
    /// Manual control for operators on call.
    #[serde(default, rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_: Option<OverrideSpec>,
}

/// The business database the collectors read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// The database; binlog must be on, in ROW format, and the user needs
    /// `REPLICATION SLAVE` and `REPLICATION CLIENT`.
    pub mysql: MysqlRef,
    /// Tables whose row changes become events.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub tables: Vec<TableName>,
    /// Column that holds the merchant id in every table: events are keyed,
    /// routed and shed by it.
    #[serde(default = "default_merchant_column")]
    #[schemars(length(min = 1, max = 64))]
    pub merchant_column: String,
}

/// A table name (without the database).
pub type TableName = String;

fn default_merchant_column() -> String {
    "merchant_id".to_owned()
}

/// The cold store and the index holding the pipeline's rollups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColdStoreSpec {
    /// The Elasticsearch cluster.
    pub elasticsearch: ElasticsearchRef,
    /// Prefix of the rollup indices: one document per merchant and day, in
    /// monthly indices `<prefix>-YYYY.MM` made from the index template `<prefix>`.
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[a-z0-9][a-z0-9._-]*$"))]
    pub index_prefix: String,
}

/// How events are cut into windows and what is computed on each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.sql) != has(self.sqlConfigMapRef)").message("compute needs exactly one of sql and sqlConfigMapRef"))]
pub struct ComputeSpec {
    /// Length of a window in seconds; one window is one compute task. Must divide
    /// an hour so that windows align with hours. Immutable: stored buckets use it.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600 && 3600 % self == 0").message("windowSeconds must divide an hour (e.g. 60, 300, 600, 3600)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("windowSeconds is immutable: windows already stored use the old size"))]
    pub window_seconds: i32,
    /// The SQL run over each window's events, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262_144))]
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("compute.sql must not be empty"))]
    pub sql: Option<String>,
    /// The SQL, from a ConfigMap key (for the hundreds of lines real pipelines run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_config_map_ref: Option<ConfigMapKeyRef>,
}

/// Replicas and resources of one role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Number of pods of the role.
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// CPU and memory requests and limits of each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl RoleSpec {
    fn with_replicas(replicas: i32) -> Self {
        Self {
            replicas,
            resources: None,
        }
    }
}

/// When the nightly job runs and what it keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NightlySpec {
    /// Cron schedule of the job (the CronJob's `schedule`): after midnight,
    /// so that yesterday is closed past the lateness.
    #[serde(default = "default_schedule")]
    #[schemars(length(min = 9, max = 100))]
    pub schedule: String,
    /// IANA time zone of the schedule (the CronJob's `timeZone`).
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][A-Za-z0-9_+/-]*$"))]
    pub time_zone: String,
    /// Days of results the hot MySQL keeps once they are in the cold store
    /// (today counts as day 0): older days are deleted after their rollup.
    #[serde(default = "default_hot_retention_days")]
    #[schemars(range(min = 1, max = 366))]
    pub hot_retention_days: i32,
}

fn default_schedule() -> String {
    "30 0 * * *".to_owned()
}
fn default_time_zone() -> String {
    "Etc/UTC".to_owned()
}
fn default_hot_retention_days() -> i32 {
    2
}

impl Default for NightlySpec {
    fn default() -> Self {
        Self {
            schedule: default_schedule(),
            time_zone: default_time_zone(),
            hot_retention_days: default_hot_retention_days(),
        }
    }
}

/// Replicas and resources of every role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolesSpec {
    /// Binlog collectors.
    #[serde(default = "one_replica")]
    pub collector: RoleSpec,
    /// Kafka consumers and backup intake.
    #[serde(default = "two_replicas")]
    pub intake: RoleSpec,
    /// Window schedulers: one active, the others standby.
    #[serde(default = "two_replicas")]
    #[x_kube(validation = Rule::new("self.replicas >= 1 && self.replicas <= 3").message("roles.master.replicas must be 1 to 3: one active master, the rest standby"))]
    pub master: RoleSpec,
    /// Compute slaves (a StatefulSet); the base that KV failure scales out.
    #[serde(default = "two_replicas")]
    #[x_kube(validation = Rule::new("self.replicas >= 1").message("roles.slave.replicas must be at least 1"))]
    pub slave: RoleSpec,
    /// Merchant-facing query API.
    #[serde(default = "two_replicas")]
    pub query: RoleSpec,
}

fn one_replica() -> RoleSpec {
    RoleSpec::with_replicas(1)
}
fn two_replicas() -> RoleSpec {
    RoleSpec::with_replicas(2)
}

impl Default for RolesSpec {
    fn default() -> Self {
        Self {
            collector: one_replica(),
            intake: two_replicas(),
            master: two_replicas(),
            slave: two_replicas(),
            query: two_replicas(),
        }
    }
}

/// Manual control of the mode switch, for operators on call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverrideSpec {
    /// Stop automatic mode switches: probes still run and report, but every
    /// dependency keeps its current mode until this is false again.
    #[serde(default)]
    pub pause_failover: bool,
    /// Force the mode of some dependencies, whatever the probes say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_modes: Option<ForcedModes>,
}

/// Observed state of an `AnalyticsPipeline`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalyticsPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, and one `<Dependency>Available` per dependency.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The published mode and epoch of each dependency: what workers follow.
    #[serde(default)]
    pub dependencies: DependencyModes,
    /// `Normal`, or the dependencies away from Normal, e.g. `Degraded(kv)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Ready and desired slaves, e.g. `4/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slaves: Option<String>,
    /// While the KV store is Degraded: the slaves events are routed over, with
    /// the epoch and a generation that rises on each change. Intakes route
    /// only over it; slaves refuse deliveries stamped with another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slave_set: Option<crate::SlaveSet>,
    /// Merchants whose events the backup intake is shedding now; their "today"
    /// is incomplete and the query service marks it so.
    #[serde(default)]
    pub shed_merchants: i64,
    /// Share of merchants the backup intake sheds now, in basis points
    /// (10000 = all): the shed ones are those whose hash rank is below it.
    #[serde(default)]
    pub shed_level: i32,
    /// The last day the backup intake shed merchants, and the most it shed
    /// that day: it outlives the shedding, so the query service can still mark
    /// that day incomplete for them afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_shed_day: Option<ShedDay>,
    /// Events sent to the dead-letter topic since the pipeline was created.
    #[serde(default)]
    pub dead_lettered_events: i64,
    /// The tracked tables' columns and types, as last read from the source
    /// database: workers type each window's tables by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_schema: Option<crate::SourceSchema>,
    /// The last SQL the operator accepted: the master applies it from one
    /// window on, for every slave; a refused SQL never replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<PublishedSql>,
    /// Windows whose computation keeps failing now, oldest first (at most
    /// 20), as the active master reports them: their results are missing,
    /// and the query service says so on every answer covering them. Always
    /// written, so that an empty list clears the last one.
    #[serde(default)]
    pub failing_windows: Vec<FailingWindow>,
}

/// A window (or a KV-degraded hour task) whose computation keeps failing:
/// it went round the slaves and into the delay queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailingWindow {
    /// `window` or `hour`.
    pub kind: String,
    /// Start of the span, Unix milliseconds.
    pub start_ms: i64,
    /// End of the span (exclusive), Unix milliseconds.
    pub end_ms: i64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it first failed, Unix milliseconds.
    pub since_ms: i64,
    /// The last attempt's error (at most 300 characters).
    pub error: String,
}

/// A pipeline SQL the operator accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishedSql {
    /// Its identity ([`crate::sql::id`]): results record it.
    pub id: String,
    /// Its text.
    pub text: String,
    /// The pipeline generation it was accepted at.
    pub generation: i64,
}

/// The most merchants the backup intake shed on one day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShedDay {
    /// The day, in UTC, as `YYYY-MM-DD`.
    pub day: String,
    /// The highest shed level of the day, in basis points: merchants whose hash
    /// rank is below it may miss events of that day.
    pub max_level: i32,
}

impl ShedDay {
    /// Two records as one: the later day wins, and the same day keeps the
    /// higher level. Pure.
    pub fn merge(a: Option<ShedDay>, b: Option<ShedDay>) -> Option<ShedDay> {
        match (a, b) {
            (Some(a), Some(b)) => Some(match a.day.cmp(&b.day) {
                std::cmp::Ordering::Less => b,
                std::cmp::Ordering::Greater => a,
                std::cmp::Ordering::Equal => ShedDay {
                    max_level: a.max_level.max(b.max_level),
                    ..a
                },
            }),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(day: &str, max_level: i32) -> Option<ShedDay> {
        Some(ShedDay {
            day: day.into(),
            max_level,
        })
    }

    #[test]
    fn shed_days_merge_to_the_later_day_and_the_higher_level() {
        let cases = [
            (None, None, None),
            (day("2026-11-20", 900), None, day("2026-11-20", 900)),
            (None, day("2026-11-21", 100), day("2026-11-21", 100)),
            (
                day("2026-11-20", 900),
                day("2026-11-21", 100),
                day("2026-11-21", 100),
            ),
            (
                day("2026-11-21", 100),
                day("2026-11-20", 900),
                day("2026-11-21", 100),
            ),
            (
                day("2026-11-21", 100),
                day("2026-11-21", 6_667),
                day("2026-11-21", 6_667),
            ),
        ];
        for (i, (a, b, want)) in cases.into_iter().enumerate() {
            assert_eq!(ShedDay::merge(a, b), want, "case {i}");
        }
    }
}
