//! The member MySQL's failover: how the operator may change its topology
//! (promote a replica, fence and re-point the old master, switch back), with
//! which account, and what it publishes of the replicas' lag.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::refs::SecretKeyRef;

/// The annotation with which a person promotes the data centre it names to
/// MySQL master whatever its lag (losing what it lacks) while the master is
/// down, or asks for the switch back to the primary when `spec.failback` is
/// Manual.
pub const PROMOTE_MYSQL_ANNOTATION: &str = "ballast.dev/promote-mysql";

/// The MySQL account the operator changes the topology with, the same in
/// every data centre. It needs `READ_ONLY ADMIN` (to fence a server and to
/// open a promoted one), `REPLICATION SLAVE ADMIN` and `SLAVE MONITOR` (to
/// stop, re-point and read a replica), `BINLOG MONITOR` (to read a master's
/// position) and `REPLICATION SLAVE` (replicas connect to the master with
/// it). The member service's own user must not hold `READ_ONLY ADMIN`: the
/// fence is `read_only`, which that privilege passes through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlAdmin {
    /// User to connect as.
    #[schemars(length(min = 1, max = 80))]
    pub user: String,
    /// Secret key holding the user's password; omit for a user without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// Whether the operator promotes a MySQL replica by itself when the master
/// is down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MysqlPromotion {
    /// The first answering replica within the lag budget
    /// (`maxLagEvents` transactions and `maxLagSeconds`, as last measured
    /// while the master answered), once it has applied what it received.
    #[default]
    Automatic,
    /// Only the replica a person names with `ballast.dev/promote-mysql`.
    Manual,
}

/// One replica data centre's MySQL replication, as the operator last
/// measured it while the master answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlReplica {
    /// The data centre's name.
    pub data_center: String,
    /// Whether it replicates from the master now (both threads running, its
    /// source the master's address).
    pub replicating: bool,
    /// Transactions of the master it has not applied (by GTID).
    pub lag_transactions: i64,
    /// Its `Seconds_Behind_Master` (none while a thread is stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// When this was measured.
    pub measured_at: Time,
}
