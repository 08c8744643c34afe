//! `DegradationPolicy`: how each dependency's failure is detected and what its degraded mode is.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// How failure is detected and what each dependency's degraded mode does.
/// An `AnalyticsPipeline` names its policy in `spec.policyRef`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "DegradationPolicy",
    namespaced,
    shortname = "dp",
    category = "ballast",
    status = "DegradationPolicyStatus",
    doc = "How each dependency's failure is detected and what its degraded mode does.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "KV-Scale",
        type_ = "integer",
        json_path = ".spec.kv.slaveScaleFactor",
        description = "Slave scale factor while the KV store is down"
    ),
    printcolumn(
        name = "Backup-Rate",
        type_ = "integer",
        json_path = ".spec.mq.backupIntakeRatePerSecond",
        description = "Backup intake events/s while Kafka is down"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DegradationPolicySpec {
    /// Kafka (MQ) failure: collectors go "async to sync" through the backup intake.
    #[serde(default)]
    pub mq: MqPolicy,
    /// KV store failure: slaves are scaled out and hold recent events in memory.
    #[serde(default)]
    pub kv: KvPolicy,
    /// Hot MySQL failure: results go to the cache only; queries are answered from it.
    #[serde(default)]
    pub mysql: MysqlPolicy,
    /// Result cache failure: queries use an in-process cache behind a rate limit.
    #[serde(default)]
    pub cache: CachePolicy,
    /// Cold store (Elasticsearch) failure: only pre-computed frequent queries are served.
    #[serde(default)]
    pub cold: ColdPolicy,
}

/// How a dependency is probed, and how many results flip its mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.timeoutSeconds <= self.periodSeconds").message("probe timeoutSeconds must not exceed periodSeconds"))]
pub struct ProbeSpec {
    /// Seconds between two probes.
    #[serde(default = "default_period")]
    #[schemars(range(min = 1, max = 300))]
    pub period_seconds: i32,
    /// Seconds a probe may take before it counts as failed.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,
    /// Consecutive failed probes that switch the dependency to its degraded mode.
    /// One lost probe never switches a mode, so at least 2.
    #[serde(default = "default_threshold")]
    #[x_kube(validation = Rule::new("self >= 2 && self <= 100").message("failureThreshold must be between 2 and 100: one lost probe must never switch a mode"))]
    pub failure_threshold: i32,
    /// Consecutive successful probes that start the recovery back to Normal.
    #[serde(default = "default_threshold")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("successThreshold must be between 1 and 100"))]
    pub success_threshold: i32,
}

fn default_period() -> i32 {
    2
}
fn default_timeout() -> i32 {
    1
}
fn default_threshold() -> i32 {
    3
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            period_seconds: default_period(),
            timeout_seconds: default_timeout(),
            failure_threshold: default_threshold(),
            success_threshold: default_threshold(),
        }
    }
}

/// Kafka failure: "async to sync".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqPolicy {
    /// How Kafka is probed.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// Produce attempts a collector makes before it switches to the backup intake on its own.
    #[serde(default = "default_produce_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub produce_retries: i32,
    /// Events per second the backup intake accepts in total; over it, whole merchants are shed.
    #[serde(default = "default_backup_rate")]
    #[x_kube(validation = Rule::new("self >= 1").message("backupIntakeRatePerSecond must be at least 1"))]
    pub backup_intake_rate_per_second: i32,
    /// Largest share of merchants, in percent, whose events the backup intake may shed
    /// (a stable subset chosen by hash of the merchant id). 0 sheds nothing and rejects instead.
    #[serde(default = "default_max_shed")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("maxShedPercent must be between 0 and 100"))]
    pub max_shed_percent: i32,
}

fn default_produce_retries() -> i32 {
    3
}
fn default_backup_rate() -> i32 {
    5000
}
fn default_max_shed() -> i32 {
    10
}

impl Default for MqPolicy {
    fn default() -> Self {
        Self {
            probe: ProbeSpec::default(),
            produce_retries: default_produce_retries(),
            backup_intake_rate_per_second: default_backup_rate(),
            max_shed_percent: default_max_shed(),
        }
    }
}

/// KV store failure: scale slaves out, route events to them, hourly metrics only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.retentionSeconds >= self.granularitySeconds").message("kv.retentionSeconds must be at least kv.granularitySeconds: slaves that forget events before their period closes freeze its results"))]
pub struct KvPolicy {
    /// How the KV store is probed.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// The slave StatefulSet is scaled to its base replicas times this factor
    /// before events are routed to slaves.
    #[serde(default = "default_scale_factor")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10").message("slaveScaleFactor must be between 1 and 10"))]
    pub slave_scale_factor: i32,
    /// Seconds of events each slave keeps in memory while the KV store is
    /// down; at least a whole degraded period (`granularitySeconds`).
    #[serde(default = "default_retention")]
    #[schemars(range(min = 10, max = 86400))]
    pub retention_seconds: i32,
    /// Seconds the scaled-out slaves are kept after the KV store is Normal
    /// again, so that the periods computed from their memory close before
    /// they go (a slave scaled in hands its events to the others first).
    #[serde(default = "default_scale_in_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_in_delay_seconds: i32,
    /// Hard bound, in MiB, on the events a slave holds in memory.
    #[serde(default = "default_slave_memory", rename = "maxMemoryMiB")]
    #[schemars(range(min = 16, max = 65536))]
    pub max_memory_mib: i32,
    /// Granularity, in seconds, of the metrics produced while degraded (3600: hourly only).
    #[serde(default = "default_granularity")]
    #[x_kube(validation = Rule::new("self >= 60 && 86400 % self == 0").message("granularitySeconds must be at least 60 and divide a day"))]
    pub granularity_seconds: i32,
    /// Seconds to wait for the scaled-out slaves to be ready before the switch is
    /// reported as stuck (a condition says so).
    #[serde(default = "default_readiness_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub readiness_timeout_seconds: i32,
}

fn default_scale_factor() -> i32 {
    2
}
fn default_retention() -> i32 {
    3600
}
fn default_scale_in_delay() -> i32 {
    600
}
fn default_slave_memory() -> i32 {
    512
}
fn default_granularity() -> i32 {
    3600
}
fn default_readiness_timeout() -> i32 {
    120
}

impl Default for KvPolicy {
    fn default() -> Self {
        Self {
            probe: ProbeSpec::default(),
            slave_scale_factor: default_scale_factor(),
            retention_seconds: default_retention(),
            scale_in_delay_seconds: default_scale_in_delay(),
            max_memory_mib: default_slave_memory(),
            granularity_seconds: default_granularity(),
            readiness_timeout_seconds: default_readiness_timeout(),
        }
    }
}

/// Hot MySQL failure: write results to the cache only; answer from the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlPolicy {
    /// How the hot MySQL is probed.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// Merchants whose results the cache can hold; beyond it, a merchant gets an
    /// explicit "unavailable" rather than a partial answer.
    #[serde(default = "default_cache_capacity")]
    #[schemars(range(min = 1))]
    pub cache_capacity_merchants: i32,
}

fn default_cache_capacity() -> i32 {
    100_000
}

impl Default for MysqlPolicy {
    fn default() -> Self {
        Self {
            probe: ProbeSpec::default(),
            cache_capacity_merchants: default_cache_capacity(),
        }
    }
}

/// Result cache failure: in-process cache plus a rate limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicy {
    /// How the cache is probed.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// Entries of the in-process cache of each query pod.
    #[serde(default = "default_local_entries")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub local_cache_entries: i32,
    /// Seconds an in-process cache entry lives.
    #[serde(default = "default_local_ttl")]
    #[schemars(range(min = 1, max = 86400))]
    pub local_cache_ttl_seconds: i32,
    /// Reads of the hot MySQL per second each query pod makes where the cache
    /// cannot answer alone: every read while the cache is down, and the checks
    /// of cached days against MySQL for 5 minutes after it came back, when
    /// every day is unchecked. Over it, a read gets an error status at once,
    /// never a hang, and a check serves the cached day marked unchecked.
    #[serde(default = "default_query_rate")]
    #[schemars(range(min = 1))]
    pub query_rate_per_second: i32,
}

fn default_local_entries() -> i32 {
    10_000
}
fn default_local_ttl() -> i32 {
    10
}
fn default_query_rate() -> i32 {
    200
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            probe: ProbeSpec::default(),
            local_cache_entries: default_local_entries(),
            local_cache_ttl_seconds: default_local_ttl(),
            query_rate_per_second: default_query_rate(),
        }
    }
}

/// Cold store failure: serve only the frequent queries pre-computed into the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColdPolicy {
    /// How the cold store is probed.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// Most frequent cold queries per user whose results the daily job pre-computes.
    #[serde(default = "default_top_queries")]
    #[schemars(range(min = 0, max = 1000))]
    pub precomputed_queries_per_user: i32,
    /// Days of query logs the daily job looks back over to find frequent queries.
    #[serde(default = "default_lookback")]
    #[schemars(range(min = 1, max = 366))]
    pub lookback_days: i32,
}

fn default_top_queries() -> i32 {
    20
}
fn default_lookback() -> i32 {
    30
}

impl Default for ColdPolicy {
    fn default() -> Self {
        Self {
            probe: ProbeSpec::default(),
            precomputed_queries_per_user: default_top_queries(),
            lookback_days: default_lookback(),
        }
    }
}

/// Observed state of a `DegradationPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DegradationPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` once the operator has accepted the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of pipelines that use this policy.
    #[serde(default)]
    pub pipelines: i32,
}
