//! References from a spec to the servers and Kubernetes objects it depends on.
//!
//! Credentials are only ever Secret references: a spec lives in Git, a
//! password never does.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A key of a Secret in the resource's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret whose value is used.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A key of a ConfigMap in the resource's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap whose value is used.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The name of another object of a known kind in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A MySQL (or MariaDB) database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlRef {
    /// Server address as `host:port`.
    #[schemars(length(min = 3, max = 263), regex(pattern = r"^[^:/\s]+:[0-9]{1,5}$"))]
    pub address: String,
    /// Database (schema) name.
    #[schemars(length(min = 1, max = 64))]
    pub database: String,
    /// User to connect as.
    #[schemars(length(min = 1, max = 80))]
    pub user: String,
    /// Secret key holding the user's password; omit for a user without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// A Redis server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisRef {
    /// Server address as `host:port`.
    #[schemars(length(min = 3, max = 263), regex(pattern = r"^[^:/\s]+:[0-9]{1,5}$"))]
    pub address: String,
    /// Logical database number.
    #[serde(default)]
    #[schemars(range(min = 0, max = 15))]
    pub database: i32,
    /// Secret key holding the password (`AUTH`); omit for a server without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

/// An Elasticsearch cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchRef {
    /// HTTP endpoint of the cluster, e.g. `http://es-dc-a:9200`.
    #[schemars(length(min = 8, max = 512), regex(pattern = r"^https?://\S+$"))]
    pub url: String,
    /// Secret with `username` and `password` keys; omit for a cluster without security.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<LocalObjectRef>,
}

/// An Apache Kafka cluster and the topic Ballast uses on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaRef {
    /// Comma-separated `host:port` list of bootstrap brokers.
    #[schemars(length(min = 3, max = 2048))]
    pub bootstrap_servers: String,
    /// Topic the collectors produce change events to. Immutable: moving topics
    /// would strand the events already in the old one.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("kafka.topic is immutable: events already queued in the old topic would be stranded"))]
    pub topic: String,
    /// Topic that receives events which cannot be processed, with the reason.
    /// Defaults to `<topic>.dead-letter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub dead_letter_topic: Option<String>,
}
