//! What every role does first: read its pipeline, that pipeline's policy and
//! SQL, find its servers, and bind its listeners (port 0 picks a free one).

use std::net::SocketAddr;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy, MemberStore};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use crate::secret::Secret;

/// Why a role could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The pipeline or its policy could not be read.
    #[error("reading {what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The pipeline's SQL could not be found.
    #[error("compute SQL: {reason}")]
    NoSql {
        /// What is missing.
        reason: String,
    },
    /// A store's connection options are not valid.
    #[error("connection options of the {store}: {source}")]
    Options {
        /// Which store.
        store: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// The cold store's connection options are not valid.
    #[error("connection options of the cold store: {0}")]
    ColdOptions(#[source] elasticsearch::Error),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The pipeline `name` in `namespace` and the DegradationPolicy it names.
pub async fn pipeline(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(AnalyticsPipeline, DegradationPolicy), StartupError> {
    let read = |what: String| move |source| StartupError::Read { what, source };
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), namespace);
    let ap = aps
        .get(name)
        .await
        .map_err(read(format!("AnalyticsPipeline {name}")))?;
    let dps: Api<DegradationPolicy> = Api::namespaced(client.clone(), namespace);
    let policy = &ap.spec.policy_ref.name;
    let dp = dps
        .get(policy)
        .await
        .map_err(read(format!("DegradationPolicy {policy}")))?;
    Ok((ap, dp))
}

/// The MemberStore `name` in `namespace`.
pub async fn member_store(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<MemberStore, StartupError> {
    Api::<MemberStore>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| StartupError::Read {
            what: format!("MemberStore {name}"),
            source,
        })
}

/// The pipeline's compute SQL: inline, or from its ConfigMap (read through the
/// API, so that an edit reaches a restarted worker without a remount).
pub async fn sql(
    client: &kube::Client,
    namespace: &str,
    ap: &AnalyticsPipeline,
) -> Result<String, StartupError> {
    let compute = &ap.spec.compute;
    if let Some(sql) = &compute.sql {
        return Ok(sql.clone());
    }
    let Some(r) = &compute.sql_config_map_ref else {
        return Err(StartupError::NoSql {
            reason: "compute has neither sql nor sqlConfigMapRef".into(),
        });
    };
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = cms.get(&r.name).await.map_err(|source| StartupError::Read {
        what: format!("ConfigMap {}", r.name),
        source,
    })?;
    cm.data
        .and_then(|mut d| d.remove(&r.key))
        .ok_or_else(|| StartupError::NoSql {
            reason: format!("ConfigMap {} has no key {}", r.name, r.key),
        })
}

/// The Redis connection options of `store` (`kv` or `cache`), with its password.
pub fn redis_info(
    redis: &ballast_crds::refs::RedisRef,
    password: Option<&Secret>,
    store: &'static str,
) -> Result<redis::ConnectionInfo, StartupError> {
    crate::connect::redis(redis, password).map_err(|source| StartupError::Options { store, source })
}

/// A self-reconnecting connection to the Redis server `info` names.
pub async fn redis_connection(
    info: &redis::ConnectionInfo,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    redis::Client::open(info.clone())?.get_connection_manager().await
}

/// Binds `addr`; returns the listener and the port it got.
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, u16), StartupError> {
    let bind = |source| StartupError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let port = listener.local_addr().map_err(bind)?.port();
    Ok((listener, port))
}

/// A bind error for `addr`.
pub fn bind_error(addr: SocketAddr) -> impl Fn(std::io::Error) -> StartupError {
    move |source| StartupError::Bind { addr, source }
}
