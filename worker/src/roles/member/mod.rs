//! The member role (seed 004): the member-identity service of one data
//! centre, `ballast.v1.Members` over gRPC. MySQL sharded by member id (the
//! primary DC's for writes, the local one for reads), member documents and
//! identity claims in the active Elasticsearch cluster, a cache per data
//! centre kept consistent by leases, the change stream; when MySQL fails,
//! Elasticsearch alone with every write journaled and replayed on return.

pub mod caches;
pub mod caller;
pub mod follow;
pub mod grpc;
pub mod journal;
pub mod metrics;
pub mod path;
mod read;
pub mod service;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use ballast_crds::member_store::{DataCenter, GuardedDependency};
use ballast_crds::{MemberStore, Mode};
use ballast_flow::breaker::BreakerConfig;
use ballast_flow::{Breaker, Flow, Rules};
use kube::api::Api;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Deps;
use super::startup::{self, StartupError};
use crate::members::cache::{DcCache, Keys};
use crate::members::claims::Claims;
use crate::members::consume;
use crate::members::search::MemberIndex;
use crate::members::sql::{DbError, MemberDb};
use crate::members::stream::{ChangeStream, StreamError};
use crate::secret::Secret;
use service::{Members, Primary, Search, Stores, Timing};
pub use write::{Done, new_member_id};

/// Settings of a member process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the MemberStore.
    pub namespace: String,
    /// The MemberStore's name.
    pub store: String,
    /// The data centre this process serves in.
    pub data_center: String,
    /// Where the gRPC API listens (port 0 picks one).
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics: SocketAddr,
    /// Deadline of each store call.
    pub deadline: Duration,
    /// Longest a replica read waits for a write it must show.
    pub read_after_wait: Duration,
    /// How long draining may take on shutdown.
    pub drain: Duration,
    /// Password of the member MySQL user (the same user in every data centre).
    pub mysql_password: Option<Secret>,
    /// Password of the member Redis servers.
    pub redis_password: Option<Secret>,
    /// User and password of the Elasticsearch clusters, if security is on.
    pub es_credentials: Option<(String, Secret)>,
}

/// Errors that stop a member process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MemberStore could not be read or a listener bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The MemberStore names no data centre called so.
    #[error("MemberStore {store} has no data centre {data_center}")]
    NoDataCentre {
        /// The store.
        store: String,
        /// The data centre asked for.
        data_center: String,
    },
    /// MySQL could not be prepared (shard map, tables).
    #[error("member MySQL: {0}")]
    Mysql(#[from] DbError),
    /// Elasticsearch could not be prepared (templates).
    #[error("member Elasticsearch: {0}")]
    Elasticsearch(#[from] crate::es::EsError),
    /// The change stream could not be prepared.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A Kafka client could not be made.
    #[error("member journal consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A server failed.
    #[error("serving: {0}")]
    Serve(String),
}

/// The member service's rules: the MemberStore's limits and breakers, and
/// for each dependency it sets no breaker for, one that opens when half the
/// calls of ten seconds (at least five) fail or take the whole deadline, for
/// two seconds: the local trip that moves the path off a failing MySQL
/// before the operator publishes it.
pub fn rules(store: &MemberStore, deadline: Duration) -> Rules {
    let mut rules = Rules::of_member_store(store);
    let fallback = Breaker {
        config: BreakerConfig {
            max_average: None,
            slow_call: Some(deadline),
            max_slow_percent: Some(50),
            max_error_percent: Some(50),
            max_errors: None,
            minimum_calls: 5,
            window: Duration::from_secs(10),
            open: Duration::from_secs(2),
            half_open_calls: 1,
        },
        shadow: false,
    };
    for dependency in GuardedDependency::ALL {
        rules.breakers.entry(dependency).or_insert(fallback);
    }
    rules
}

fn data_centre<'a>(store: &'a MemberStore, name: &str) -> Option<&'a DataCenter> {
    store.spec.data_centers.iter().find(|dc| dc.name == name)
}

/// Connects to `dc`'s Redis, retrying each second until it answers or `shutdown`.
async fn cache(
    dc: &DataCenter,
    password: Option<&Secret>,
    deadline: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<DcCache>, StartupError> {
    let info = startup::redis_info(&dc.redis, password, "member cache")?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(deadline))
        .set_response_timeout(Some(deadline));
    loop {
        let connected = match redis::Client::open(info.clone()) {
            Ok(client) => tokio::time::timeout(
                deadline * 4,
                redis::aio::ConnectionManager::new_with_config(client, config.clone()),
            )
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|c| c.map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match connected {
            Ok(conn) => return Ok(Some(DcCache::new(&dc.name, conn))),
            Err(error) => {
                tracing::warn!(dc = %dc.name, %error, "connecting to a member cache failed; retrying")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A pool of data centre `dc`'s MySQL, as the member user.
fn pool(config: &Config, dc: &DataCenter) -> mysql_async::Pool {
    mysql_async::Pool::new(crate::connect::mysql(&dc.mysql, config.mysql_password.as_ref()))
}

/// The member database `home` of a replica, once its shard map has arrived
/// by replication (a process starting beside the one that installs it on the
/// master may look first): read again every half second, up to ten deadlines.
async fn replicated(
    pool: mysql_async::Pool,
    home: &str,
    logical: u32,
    deadline: Duration,
) -> Result<MemberDb, DbError> {
    let give_up = tokio::time::Instant::now() + deadline * 10;
    loop {
        let read = tokio::time::timeout_at(give_up, MemberDb::replica(pool.clone(), home, logical)).await;
        match read {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(error)) if tokio::time::Instant::now() < give_up => {
                tracing::info!(%error, "the replica's shard map is not complete yet; reading it again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(DbError::Mysql(mysql_async::Error::Other(
                    "reading the replica's shard map timed out".into(),
                )));
            }
        }
    }
}

/// Data centre `dc`'s MySQL as the master, its shard map read from it.
pub async fn primary_of(config: &Config, store: &MemberStore, dc: &DataCenter) -> Result<Primary, Error> {
    let logical = u32::try_from(store.spec.logical_shards).unwrap_or(1).max(1);
    let db = tokio::time::timeout(
        config.deadline * 10,
        MemberDb::replica(pool(config, dc), &dc.mysql.database, logical),
    )
    .await
    .map_err(|_| {
        DbError::Mysql(mysql_async::Error::Other(
            "reading the master's shard map timed out".into(),
        ))
    })??;
    Ok(Primary {
        data_center: dc.name.clone(),
        db,
    })
}

/// The member index and claims of data centre `dc`'s Elasticsearch, their
/// templates installed.
pub async fn search_of(config: &Config, dc: &DataCenter, epoch: i64) -> Result<Search, Error> {
    let es = crate::connect::elasticsearch(&dc.elasticsearch.url, config.es_credentials.clone())
        .map_err(StartupError::ColdOptions)?;
    let index = MemberIndex::new(es.clone(), &config.namespace, &config.store, config.deadline);
    let claims = Claims::new(es, &config.namespace, &config.store, config.deadline);
    index.install().await?;
    claims.install().await?;
    Ok(Search {
        data_center: dc.name.clone(),
        epoch,
        index,
        claims,
    })
}

/// Connects to everything `store` names for data centre `config.data_center`:
/// prepares MySQL (shard map, tables), the Elasticsearch templates and the
/// change stream's topic, and waits for every data centre's cache to answer
/// (`None` if `shutdown` came first).
pub async fn connect(
    store: &MemberStore,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<Stores>, Error> {
    let deadline = config.deadline;
    let spec = &store.spec;
    let no_dc = |data_center: &str| Error::NoDataCentre {
        store: config.store.clone(),
        data_center: data_center.to_owned(),
    };
    let local = data_centre(store, &config.data_center).ok_or_else(|| no_dc(&config.data_center))?;
    let master = store.mysql_master();
    let primary = data_centre(store, master).ok_or_else(|| no_dc(master))?;
    let active_name = store.active_data_center();
    let active = data_centre(store, active_name).ok_or_else(|| no_dc(active_name))?;
    let logical = u32::try_from(spec.logical_shards).unwrap_or(1).max(1);

    let pool = |dc: &DataCenter| pool(config, dc);
    let primary_db = tokio::time::timeout(
        deadline * 10,
        MemberDb::install(pool(primary), &primary.mysql.database, logical),
    )
    .await
    .map_err(|_| {
        DbError::Mysql(mysql_async::Error::Other(
            "installing the shard map timed out".into(),
        ))
    })??;
    let local_db = if local.name == primary.name {
        primary_db.clone()
    } else {
        replicated(pool(local), &primary.mysql.database, logical, deadline).await?
    };
    let search = search_of(config, active, store.epoch()).await?;
    let es = |url: &str| {
        crate::connect::elasticsearch(url, config.es_credentials.clone()).map_err(StartupError::ColdOptions)
    };
    let marketing = match &spec.marketing_elasticsearch {
        Some(m) => {
            let index = MemberIndex::new(es(&m.url)?, &config.namespace, &config.store, deadline);
            index.install().await?;
            Some(index)
        }
        None => None,
    };
    let mut caches = Vec::new();
    for dc in &spec.data_centers {
        match cache(dc, config.redis_password.as_ref(), deadline, shutdown).await? {
            Some(cache) => caches.push(cache),
            None => return Ok(None),
        }
    }
    let local_cache = spec
        .data_centers
        .iter()
        .position(|dc| dc.name == local.name)
        .unwrap_or(0);
    ChangeStream::ensure_topic(&spec.change_stream, deadline * 5).await?;
    let stream = ChangeStream::new(&spec.change_stream, deadline)?;
    Ok(Some(Stores {
        primary: Arc::new(ArcSwap::from_pointee(Primary {
            data_center: primary.name.clone(),
            db: primary_db,
        })),
        local: local_db,
        local_data_center: local.name.clone(),
        search: Arc::new(ArcSwap::from_pointee(search)),
        marketing,
        caches,
        local_cache,
        keys: Keys::new(&config.namespace, &config.store),
        stream,
    }))
}

/// Runs the member service until `shutdown`, then drains within the drain time.
#[tracing::instrument(skip_all, fields(store = %config.store, dc = %config.data_center))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let api: Api<MemberStore> = Api::namespaced(deps.client.clone(), &config.namespace);
    let store = startup::member_store(&deps.client, &config.namespace, &config.store).await?;
    let spec = &store.spec;
    let Some(stores) = connect(&store, &config, &shutdown).await? else {
        return Ok(());
    };
    let deadline = config.deadline;
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    let flow = Arc::new(Flow::new(rules(&store, deadline), &mut registry));
    let (mode_tx, mode_rx) = watch::channel(Mode::Normal);
    let timing = Timing {
        deadline,
        read_after_wait: config.read_after_wait,
    };
    let members = Arc::new(Members::new(stores, flow, metrics, timing, mode_rx));
    follow::apply(&store, &members, deadline, &mode_tx);
    let stopped = CancellationToken::new();
    let _stopped_guard = stopped.clone().drop_guard();
    follow::follow(
        api,
        config.clone(),
        Arc::clone(&members),
        mode_tx,
        stopped.clone(),
    );

    let consumer = Arc::new(consume::consumer(
        &spec.change_stream,
        &journal::group(&config.namespace, &config.store),
    )?);
    let replay = tokio::spawn(journal::replay(
        Arc::clone(&members),
        Arc::clone(&consumer),
        stopped.clone(),
    ));
    tokio::spawn(journal::steer(
        Arc::clone(&members),
        Arc::clone(&consumer),
        spec.change_stream.topic.clone(),
        stopped.clone(),
    ));

    let (ready_tx, ready) = watch::channel(false);
    let (bound, health) = crate::health::serve(config.metrics, Arc::new(registry), ready, stopped.clone())
        .await
        .map_err(startup::bind_error(config.metrics))?;
    let (listener, port) = startup::bind(config.listen).await?;
    tracing::info!(metrics = %bound, port, "member service listening");
    let serving = CancellationToken::new();
    let server = tokio::spawn(
        crate::grpc::server()
            .add_service(grpc::MemberApi::new(Arc::clone(&members)).service())
            .serve_with_incoming_shutdown(crate::grpc::incoming(listener), serving.clone().cancelled_owned()),
    );
    let _ = ready_tx.send(true);
    shutdown.cancelled().await;
    let _ = ready_tx.send(false);
    serving.cancel();
    let served = tokio::time::timeout(config.drain, server).await;
    stopped.cancel();
    if tokio::time::timeout(config.drain, replay).await.is_err() {
        tracing::warn!("the replay did not stop within the drain");
    }
    drop(health);
    match served {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(Error::Serve(error.to_string())),
        Ok(Err(join)) => Err(Error::Serve(join.to_string())),
        Err(_) => {
            tracing::warn!(drain = ?config.drain, "requests still open at the drain deadline");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dependency_gets_a_breaker_and_the_store_s_own_are_kept() -> Result<(), serde_yaml::Error> {
        let mut store: MemberStore =
            serde_yaml::from_str(include_str!("../../../../manifests/samples/memberstore.yaml"))?;
        let with_spec = rules(&store, Duration::from_secs(1));
        assert_eq!(with_spec.breakers.len(), 3);
        assert_eq!(
            with_spec.breakers[&GuardedDependency::Mysql].config.max_average,
            Some(Duration::from_millis(200)),
            "the store's Mysql breaker is kept"
        );
        assert_eq!(
            with_spec.breakers[&GuardedDependency::Redis].config.slow_call,
            Some(Duration::from_secs(1)),
            "Redis gets the fallback"
        );
        store.spec.circuit_breakers.clear();
        assert_eq!(rules(&store, Duration::from_secs(1)).breakers.len(), 3);
        Ok(())
    }
}
