//! The query role: the merchant-facing HTTP API over the hot results (the
//! Redis cache, then the hot MySQL), following the published modes: cache
//! alone while MySQL is down, an in-process cache behind a rate limit while
//! the cache is down, and on every answer the response contract (source,
//! as-of, modes, completeness with reasons). The API, the OpenAPI document,
//! `/metrics`, `/healthz` and `/readyz` share one port.

pub mod api;
pub mod contract;
pub mod history;
pub mod input;
pub mod metrics;
pub mod path;
pub mod read;
pub mod today;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_crds::degradation_policy::CachePolicy;
use ballast_flow::breaker::BreakerConfig;
use ballast_flow::{Breaker, Flow, GuardedDependency, Rules};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Deps;
use super::startup::{self, StartupError};
use crate::results::cache::ResultCache;
use crate::results::hot::HotStore;
use crate::secret::Secret;

/// Settings of a query process.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the pipeline.
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Where the API, `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// Deadline of each call to a store.
    pub store_deadline: Duration,
    /// How long after closing a window late events may still change it (the master's lateness).
    pub lateness: Duration,
    /// How long draining may take on shutdown.
    pub drain: Duration,
    /// Password of the cache Redis.
    pub cache_password: Option<Secret>,
    /// Password of the hot MySQL user.
    pub hot_password: Option<Secret>,
    /// User and password of the cold store (Elasticsearch), if it has security on.
    pub cold_credentials: Option<(String, Secret)>,
    /// Deadline of each call to the cold store (a search reads up to a year of days).
    pub cold_deadline: Duration,
    /// How often today's precomputed cold answers are loaded from the hot MySQL.
    pub precomputed_every: Duration,
}

/// Errors that stop a query process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline could not be read or the port bound.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// The query service's flow rules: a breaker per store, so that a store
/// whose calls fail or hang is skipped at once (before the operator publishes
/// its mode), and the rate in front of the hot MySQL, which only its reads
/// consult: while the cache is down, and the checks of cached days (paced
/// after a cache outage, so that they do not all reach MySQL at once).
pub fn rules(cache: &CachePolicy, deadline: Duration) -> Rules {
    let breaker = Breaker {
        config: BreakerConfig {
            max_average: None,
            slow_call: Some(deadline),
            max_slow_percent: Some(50),
            max_error_percent: Some(50),
            max_errors: None,
            minimum_calls: 5,
            window: Duration::from_secs(10),
            open: Duration::from_secs(2),
            half_open_calls: 3,
        },
        shadow: false,
    };
    let mut rules = Rules::queries_without_cache(cache);
    rules.breakers = [
        GuardedDependency::Redis,
        GuardedDependency::Mysql,
        GuardedDependency::Elasticsearch,
    ]
    .into_iter()
    .map(|d| (d, breaker))
    .collect();
    rules
}

/// Runs the query service until `shutdown`, then drains its requests within the drain time.
#[tracing::instrument(skip_all, fields(pipeline = %config.pipeline))]
pub async fn run(config: Config, deps: Deps, shutdown: CancellationToken) -> Result<(), Error> {
    let (ap, dp) = startup::pipeline(&deps.client, &config.namespace, &config.pipeline).await?;
    let mut registry = Registry::with_prefix("ballast");
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    let hot = HotStore::new(
        mysql_async::Pool::new(crate::connect::mysql(
            &ap.spec.hot_store,
            config.hot_password.as_ref(),
        )),
        &ap.spec.hot_store.database,
        HotStore::DEFAULT_DATABASES,
        HotStore::DEFAULT_TABLES,
    );
    let cache_info = startup::redis_info(&ap.spec.cache, config.cache_password.as_ref(), "cache")?;
    let stopped = CancellationToken::new();
    let _stopped_guard = stopped.clone().drop_guard();
    let (cache_tx, cache_rx) = watch::channel(None);
    tokio::spawn(connect_cache(
        cache_info,
        cache_tx,
        config.store_deadline,
        stopped.clone(),
    ));
    let modes = crate::modes::follow(
        deps.client.clone(),
        &config.namespace,
        &config.pipeline,
        stopped.clone(),
    );
    let policy = dp.spec.cache.clone();
    let flow = Flow::new(rules(&policy, config.store_deadline), &mut registry);
    let reader = read::Reader::new(
        read::ReaderConfig {
            pipeline: config.pipeline.clone(),
            deadline: config.store_deadline,
            local_entries: usize::try_from(policy.local_cache_entries).unwrap_or(1),
            local_ttl: Duration::from_secs(u64::try_from(policy.local_cache_ttl_seconds).unwrap_or(1)),
        },
        cache_rx,
        hot.clone(),
        flow,
        Arc::clone(&metrics),
    );
    let es = crate::connect::elasticsearch(
        &ap.spec.cold_store.elasticsearch.url,
        config.cold_credentials.clone(),
    )
    .map_err(StartupError::ColdOptions)?;
    let cold_store = crate::cold::ColdStore::new(es, &ap.spec.cold_store.index_prefix, config.cold_deadline);
    let (log, log_writer) = history::logger::QueryLog::start(
        cold_store.clone(),
        Duration::from_secs(1),
        Arc::clone(&metrics),
        stopped.clone(),
    );
    let precomputed = Arc::new(history::precomputed::Precomputed::default());
    tokio::spawn(history::precomputed::refresh(
        Arc::clone(&precomputed),
        hot.clone(),
        config.pipeline.clone(),
        (config.precomputed_every, config.store_deadline * 4),
        stopped.clone(),
    ));
    let cold = history::Cold::new(cold_store);
    let window_ms = i64::from(ap.spec.compute.window_seconds) * 1000;
    let app = Arc::new(api::App {
        reader,
        cold,
        log,
        precomputed,
        modes: modes.clone(),
        window_ms,
        // As the master cuts them.
        period_ms: (i64::from(dp.spec.kv.granularity_seconds) * 1000).max(window_ms),
        lateness: config.lateness,
        metrics,
    });
    let (ready_tx, ready) = watch::channel(false);
    let routes = crate::health::router(Arc::new(registry), ready).merge(api::router(Arc::clone(&app)));
    // The server stops on its own token, after the drain below.
    let serving = CancellationToken::new();
    let (bound, server) = crate::health::serve_app(config.listen, routes, serving.clone())
        .await
        .map_err(startup::bind_error(config.listen))?;
    tracing::info!(%bound, "query service listening");
    let _ = ready_tx.send(true);
    shutdown.cancelled().await;
    // Not ready first, so that the Service stops sending before the server stops.
    let _ = ready_tx.send(false);
    serving.cancel();
    let served = tokio::time::timeout(config.drain, server).await;
    // The query log's last entries, within the drain.
    stopped.cancel();
    if tokio::time::timeout(config.drain, log_writer).await.is_err() {
        tracing::warn!("the query log's last entries were not written within the drain");
    }
    match served {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(Error::Serve(error)),
        Ok(Err(join)) => Err(Error::Serve(std::io::Error::other(join))),
        Err(_) => {
            tracing::warn!(drain = ?config.drain, "requests still open at the drain deadline");
            Ok(())
        }
    }
}

/// Connects to the cache in the background, retrying each second, so that a
/// cache down at start-up delays nothing; the connection then reconnects itself.
async fn connect_cache(
    info: redis::ConnectionInfo,
    tx: watch::Sender<Option<ResultCache>>,
    deadline: Duration,
    stopped: CancellationToken,
) {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(deadline))
        .set_response_timeout(Some(deadline));
    loop {
        let connected = match redis::Client::open(info.clone()) {
            Ok(client) => {
                tokio::time::timeout(
                    deadline * 4,
                    redis::aio::ConnectionManager::new_with_config(client, config.clone()),
                )
                .await
            }
            Err(error) => {
                tracing::error!(%error, "the cache's connection options are invalid");
                return;
            }
        };
        match connected {
            Ok(Ok(conn)) => {
                let _ = tx.send(Some(ResultCache::new(conn)));
                return;
            }
            Ok(Err(error)) => tracing::warn!(%error, "connecting to the result cache failed; retrying"),
            Err(_) => tracing::warn!("connecting to the result cache timed out; retrying"),
        }
        tokio::select! {
            () = stopped.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
