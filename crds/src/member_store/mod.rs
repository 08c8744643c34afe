//! `MemberStore`: the member-identity service across two or more data-centre namespaces.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mode::Mode;
use crate::refs::{ElasticsearchRef, KafkaRef, MysqlRef, RedisRef};

mod mysql;
mod status;
pub use mysql::{MysqlAdmin, MysqlPromotion, MysqlReplica, PROMOTE_MYSQL_ANNOTATION};
pub use status::{CacheStatus, MemberStoreStatus, Replica};

/// A unified member-identity service: MySQL sharded by member id (master in
/// the primary DC, replicas elsewhere), relations double-written to
/// Elasticsearch, a Redis cluster per DC written to both; the operator
/// promotes the standby DC's Elasticsearch and Redis when the active ones fail.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "MemberStore",
    namespaced,
    shortname = "ms",
    category = "ballast",
    status = "MemberStoreStatus",
    doc = "A member-identity service spanning data-centre namespaces, with automatic failover.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = ".status.activeDataCenter",
        description = "Data centre whose Elasticsearch and Redis serve"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.epoch",
        description = "Fences the side that lost the last failover"
    ),
    printcolumn(name = "Primary", type_ = "string", json_path = ".spec.primary", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.dataCenters.exists(dc, dc.name == self.primary)").message("spec.primary must name one of spec.dataCenters").field_path(".primary"))]
pub struct MemberStoreSpec {
    /// Container image of `ballast-worker`, which the member service runs.
    /// Defaults to the worker image the operator was given (`BALLAST_WORKER_IMAGE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// The data centres, each in its own namespace, with its own servers.
    // The namespace rule maps to strings before comparing: the API server's cost
    // estimate cannot bound two struct fields compared inside nested loops.
    #[schemars(length(min = 2, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[x_kube(validation = Rule::new("self.map(dc, dc.namespace).all(ns, self.map(dc, dc.namespace).exists_one(other, other == ns))").message("every data centre needs its own namespace"))]
    pub data_centers: Vec<DataCenter>,
    /// Name of the data centre that holds the MySQL master and, normally, the
    /// active Elasticsearch and Redis.
    #[schemars(length(min = 1, max = 63))]
    pub primary: String,
    /// Logical MySQL shards, by member id, spread over the physical databases.
    /// Immutable: changing it re-homes every member.
    #[serde(default = "default_shards")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65536").message("logicalShards must be between 1 and 65536"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("logicalShards is immutable: changing it would re-home every member"))]
    pub logical_shards: i32,
    /// Kafka topic of the member changes: every accepted write, in order, as
    /// the member's state after it. It feeds the marketing cluster, and while
    /// MySQL is down it is the journal replayed into MySQL when it returns
    /// (one partition: the replay keeps the order of writes across members).
    pub change_stream: KafkaRef,
    /// Separate Elasticsearch for high-volume marketing callers, so that they
    /// never slow down order-flow lookups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketing_elasticsearch: Option<ElasticsearchRef>,
    /// Member-service pods per data centre.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas_per_data_center: i32,
    /// Rate limits per caller, per hot key and global.
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Circuit breakers on the member service's dependencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["dependency".into()]))]
    pub circuit_breakers: Vec<CircuitBreaker>,
    /// Whether the recovered data centre takes over again by itself (after it has
    /// replayed everything it missed) or waits for a person.
    #[serde(default)]
    pub failback: Failback,
    /// How far behind a standby may be for a promotion to it: what a
    /// failover may lose at most. The `StandbyInSync` condition reports it.
    #[serde(default)]
    pub promotion: Promotion,
    /// The account the operator promotes, fences and re-points the member
    /// MySQL servers with. Unset, the operator publishes the master's mode
    /// but never changes the topology: a lost master waits for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_admin: Option<MysqlAdmin>,
}

/// When the operator promotes another data centre's Elasticsearch: the
/// active one found down by `probe`, a standby within the lag budget (or a
/// person's `ballast.dev/promote` annotation naming it), the operator
/// holding its Lease. And when it fails back (`spec.failback`): the primary
/// answering again and caught up for `failbackDwellSeconds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// How each data centre's Elasticsearch is probed, and how many lost
    /// probes find it down.
    #[serde(default)]
    pub probe: crate::degradation_policy::ProbeSpec,
    /// Seconds the recovered primary must stay caught up (lacking no change
    /// record) before the failback.
    #[serde(default = "default_failback_dwell")]
    #[schemars(range(min = 0, max = 86400))]
    pub failback_dwell_seconds: i32,
    /// Change records a standby may lack.
    #[serde(default = "default_max_lag_events")]
    #[schemars(range(min = 0))]
    pub max_lag_events: i64,
    /// Age, in seconds, of the oldest change record a standby may lack.
    #[serde(default = "default_max_lag_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_lag_seconds: i32,
    /// Whether a MySQL replica is promoted by itself when the master is down
    /// (needs `spec.mysqlAdmin`). The switch back to the primary follows
    /// `spec.failback`, after the old master has been fenced, re-pointed and
    /// caught up for `failbackDwellSeconds`.
    #[serde(default)]
    pub mysql: MysqlPromotion,
}

fn default_failback_dwell() -> i32 {
    60
}
fn default_max_lag_events() -> i64 {
    1000
}
fn default_max_lag_seconds() -> i32 {
    30
}

impl Default for Promotion {
    fn default() -> Self {
        Self {
            probe: crate::degradation_policy::ProbeSpec::default(),
            failback_dwell_seconds: default_failback_dwell(),
            max_lag_events: default_max_lag_events(),
            max_lag_seconds: default_max_lag_seconds(),
            mysql: MysqlPromotion::default(),
        }
    }
}

/// The annotation with which a person promotes the data centre it names
/// whatever its lag (losing what it lacks), when the active one is down; or
/// fails back to the primary when `spec.failback` is Manual.
pub const PROMOTE_ANNOTATION: &str = "ballast.dev/promote";

/// The name the marketing cluster goes by among the kept clusters.
pub const MARKETING: &str = "marketing";

/// An Elasticsearch cluster the replicator keeps in step with the change
/// stream (the services do not write it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeptCluster {
    /// The data centre's name, or [`MARKETING`].
    pub name: String,
    /// The cluster's URL.
    pub url: String,
}

/// A member Elasticsearch cluster the replicator follows the change stream
/// into: every data centre's and the marketing cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Replicated {
    /// The data centre's name, or [`MARKETING`].
    pub name: String,
    /// The cluster's URL.
    pub url: String,
    /// For the active cluster, the epoch it became active at: the member
    /// services wrote it every record of that epoch or a later one, so only
    /// older records (written to the cluster active before, which it may
    /// lack after a failback) are applied to it. `None` for a kept cluster:
    /// every record is applied.
    pub written_since: Option<i64>,
}

impl MemberStore {
    /// The data centre whose Elasticsearch the member services write: the one
    /// the operator published, else the primary.
    pub fn active_data_center(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.active_data_center.as_deref())
            .unwrap_or(&self.spec.primary)
    }

    /// The data centre whose MySQL is the master: the one the operator
    /// published, else the primary.
    pub fn mysql_master(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.mysql_master.as_deref())
            .unwrap_or(&self.spec.primary)
    }

    /// The epoch of the active data centre (0 until the operator first promotes one).
    pub fn epoch(&self) -> i64 {
        self.status.as_ref().map_or(0, |s| s.epoch)
    }

    /// The clusters the replicator keeps: every data centre's but the
    /// active one's, and the marketing cluster; in a stable order.
    pub fn kept_clusters(&self) -> Vec<KeptCluster> {
        let active = self.active_data_center();
        let mut kept: Vec<KeptCluster> = self
            .spec
            .data_centers
            .iter()
            .filter(|dc| dc.name != active)
            .map(|dc| KeptCluster {
                name: dc.name.clone(),
                url: dc.elasticsearch.url.clone(),
            })
            .collect();
        kept.extend(self.spec.marketing_elasticsearch.as_ref().map(|m| KeptCluster {
            name: MARKETING.to_owned(),
            url: m.url.clone(),
        }));
        kept.sort();
        kept
    }

    /// Every cluster the replicator follows the stream into, in a stable
    /// order: the kept ones whole, and the active one for what was written
    /// elsewhere before it became active (a failback's records in flight).
    pub fn replicated_clusters(&self) -> Vec<Replicated> {
        let active = self.active_data_center();
        let epoch = self.epoch();
        let mut all: Vec<Replicated> = self
            .spec
            .data_centers
            .iter()
            .map(|dc| Replicated {
                name: dc.name.clone(),
                url: dc.elasticsearch.url.clone(),
                written_since: (dc.name == active).then_some(epoch),
            })
            .collect();
        all.extend(self.spec.marketing_elasticsearch.as_ref().map(|m| Replicated {
            name: MARKETING.to_owned(),
            url: m.url.clone(),
            written_since: None,
        }));
        all.sort();
        all
    }

    /// How the member services must use data centre `dc`'s cache, as the
    /// operator publishes it (Normal until it publishes one).
    pub fn cache_mode(&self, dc: &str) -> Mode {
        self.status
            .iter()
            .flat_map(|s| &s.caches)
            .find(|c| c.data_center == dc)
            .map_or(Mode::Normal, |c| c.mode)
    }
}

/// The prefix of every key MemberStore `name` in `namespace` has in a data
/// centre's cache: the member services fill and invalidate under it, and the
/// operator empties a returning cache of it.
pub fn cache_prefix(namespace: &str, name: &str) -> String {
    format!("ballast:members:{namespace}/{name}:")
}

/// Suffixes of an entry's bookkeeping keys (its version, lock and floor),
/// which emptying a cache keeps: they only ever refuse a fill, and a reader
/// holding a lease from before must still be refused.
pub const CACHE_BOOKKEEPING: [&str; 3] = ["|v", "|l", "|f"];

/// The consumer group that keeps cluster `kept` of MemberStore `name` in
/// `namespace`: its committed offset is what the cluster holds.
pub fn replica_group(namespace: &str, name: &str, kept: &str) -> String {
    format!("ballast-members-{namespace}.{name}-replica-{kept}")
}

fn default_shards() -> i32 {
    1024
}
fn default_replicas() -> i32 {
    2
}

/// One data centre of the member store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataCenter {
    /// Short name, e.g. `dc-a`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Namespace the data centre's member-service pods run in.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// The data centre's MySQL: the master in the primary DC, a replica
    /// elsewhere (until a failover makes another the master).
    pub mysql: MysqlRef,
    /// The data centre's Elasticsearch cluster.
    pub elasticsearch: ElasticsearchRef,
    /// The data centre's Redis cluster.
    pub redis: RedisRef,
}

/// Rate limits of the member service, checked on every request before any
/// work: the caller's own limit first, then the member id's, then the global
/// one, so that one flooding caller or one hot member cannot use up the budget
/// of everyone else. A refusal is immediate (HTTP 429 or gRPC
/// RESOURCE_EXHAUSTED with a retry-after), never a wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowControl {
    /// Requests per second across all callers, per member-service pod.
    #[serde(default = "default_global_rate")]
    #[schemars(range(min = 1))]
    pub global_rate_per_second: i32,
    /// Requests per second for any single member id (a hot key).
    #[serde(default = "default_hot_key_rate")]
    #[schemars(range(min = 1))]
    pub hot_key_rate_per_second: i32,
    /// Requests per second of each caller account not listed in `callers`;
    /// unset, unlisted callers are held only by the global limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unlisted_caller_rate_per_second: Option<i32>,
    /// Requests in progress at once per pod; unset, no concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: Option<i32>,
    /// Requests per second per caller account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["caller".into()]))]
    pub callers: Vec<CallerLimit>,
    /// Limits that only count what they would refuse and refuse nothing, so a
    /// new limit can be tried on production traffic first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub shadow: Vec<FlowLimit>,
}

fn default_global_rate() -> i32 {
    20_000
}
fn default_hot_key_rate() -> i32 {
    50
}

impl Default for FlowControl {
    fn default() -> Self {
        Self {
            global_rate_per_second: default_global_rate(),
            hot_key_rate_per_second: default_hot_key_rate(),
            unlisted_caller_rate_per_second: None,
            max_concurrent_requests: None,
            callers: Vec::new(),
            shadow: Vec::new(),
        }
    }
}

/// A limit of [`FlowControl`] that can run in shadow mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FlowLimit {
    /// `globalRatePerSecond`.
    Global,
    /// `hotKeyRatePerSecond`.
    HotKey,
    /// `unlistedCallerRatePerSecond`.
    UnlistedCallers,
    /// `maxConcurrentRequests`.
    Concurrency,
}

/// The rate limit of one caller account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallerLimit {
    /// The caller account.
    #[schemars(length(min = 1, max = 128))]
    pub caller: String,
    /// Requests per second it may make.
    #[x_kube(validation = Rule::new("self >= 1").message("a caller's ratePerSecond must be at least 1"))]
    pub rate_per_second: i32,
    /// Count what this limit would refuse, refuse nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// A dependency of the member service that a circuit breaker guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum GuardedDependency {
    /// MySQL and its access layer.
    Mysql,
    /// Elasticsearch.
    Elasticsearch,
    /// Redis.
    Redis,
}

impl GuardedDependency {
    /// Every guarded dependency.
    pub const ALL: [Self; 3] = [Self::Mysql, Self::Elasticsearch, Self::Redis];

    /// Lower-case name, as in metric labels and refusal messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Elasticsearch => "elasticsearch",
            Self::Redis => "redis",
        }
    }
}

/// When calls to a dependency are cut off for a while (Sentinel's three
/// strategies: response time, error ratio, error count). A breaker opens when
/// any threshold it sets is crossed over `windowSeconds` with at least
/// `minimumCalls` calls; while open, calls fail at once (HTTP 503 or gRPC
/// UNAVAILABLE naming the dependency); after `openSeconds` it lets
/// `halfOpenCalls` trial calls through, and closes when all of them succeed in
/// time, or opens again on the first that does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxAverageResponseMillis) || has(self.maxSlowCallPercent) || has(self.maxErrorPercent) || has(self.maxErrors)").message("a circuit breaker needs at least one of maxAverageResponseMillis, maxSlowCallPercent, maxErrorPercent, maxErrors"))]
#[x_kube(validation = Rule::new("!has(self.maxSlowCallPercent) || has(self.slowCallMillis)").message("maxSlowCallPercent needs slowCallMillis, the response time above which a call is slow"))]
pub struct CircuitBreaker {
    /// The guarded dependency.
    pub dependency: GuardedDependency,
    /// Opens when the average response time over the window exceeds this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_average_response_millis: Option<i32>,
    /// A call slower than this counts as slow (for `maxSlowCallPercent`) and a
    /// trial call slower than this reopens the breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub slow_call_millis: Option<i32>,
    /// Opens when this percentage of calls in the window are slow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("maxSlowCallPercent must be between 1 and 100"))]
    pub max_slow_call_percent: Option<i32>,
    /// Opens when this percentage of calls in the window fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("maxErrorPercent must be between 1 and 100"))]
    pub max_error_percent: Option<i32>,
    /// Opens when this many calls in the window fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_errors: Option<i32>,
    /// Fewer calls than this in the window never open the breaker.
    #[serde(default = "default_minimum_calls")]
    #[schemars(range(min = 1, max = 100000))]
    pub minimum_calls: i32,
    /// The window the figures are measured over, in seconds.
    #[serde(default = "default_breaker_window")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: i32,
    /// Seconds the breaker stays open before it lets trial calls through.
    #[serde(default = "default_breaker_open")]
    #[schemars(range(min = 1, max = 3600))]
    pub open_seconds: i32,
    /// Trial calls let through after `openSeconds`; all must succeed to close.
    #[serde(default = "default_half_open_calls")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_calls: i32,
    /// Count what this breaker would refuse, refuse nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

fn default_minimum_calls() -> i32 {
    5
}
fn default_breaker_window() -> i32 {
    10
}
fn default_breaker_open() -> i32 {
    30
}
fn default_half_open_calls() -> i32 {
    3
}

/// How the original primary data centre takes over again after a failover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Failback {
    /// As soon as it has replayed everything it missed.
    #[default]
    Automatic,
    /// Only when a person sets `spec.primary` again (or the annotation asks for it).
    Manual,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MemberStore {
        serde_yaml::from_str(include_str!("../../../manifests/samples/memberstore.yaml"))
            .unwrap_or_else(|e| panic!("sample MemberStore: {e}"))
    }

    fn names(store: &MemberStore) -> Vec<String> {
        store.kept_clusters().into_iter().map(|t| t.name).collect()
    }

    #[test]
    fn the_replicator_keeps_every_cluster_but_the_active_one() {
        let mut store = sample();
        let primary = store.spec.primary.clone();
        let others: Vec<String> = store
            .spec
            .data_centers
            .iter()
            .map(|dc| dc.name.clone())
            .filter(|n| *n != primary)
            .collect();
        let marketing = store.spec.marketing_elasticsearch.is_some();
        // (what the store says, the targets)
        let mut want = others.clone();
        if marketing {
            want.push(MARKETING.to_owned());
        }
        want.sort();
        assert_eq!(names(&store), want, "nothing published: the primary is active");

        let promoted = others[0].clone();
        store.status = Some(MemberStoreStatus {
            active_data_center: Some(promoted.clone()),
            ..MemberStoreStatus::default()
        });
        let kept = names(&store);
        assert!(
            kept.contains(&primary),
            "the old primary is kept once another is active: {kept:?}"
        );
        assert!(
            !kept.contains(&promoted),
            "the promoted one is written, not kept: {kept:?}"
        );

        store.spec.marketing_elasticsearch = None;
        assert!(!names(&store).contains(&MARKETING.to_owned()));
    }

    #[test]
    fn each_cluster_has_a_group_of_its_own() {
        assert_ne!(
            replica_group("ns", "members", "dc-b"),
            replica_group("ns", "members", MARKETING)
        );
        assert_ne!(
            replica_group("ns", "members", "dc-b"),
            replica_group("ns", "other", "dc-b")
        );
    }
}
