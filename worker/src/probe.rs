//! One-shot health checks of the dependencies, each with the client the data plane uses.

use std::time::Duration;

use elasticsearch::http::transport::Transport;
use mysql_async::prelude::Queryable;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The kinds of server a worker depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Apache Kafka: a metadata request.
    Kafka,
    /// Redis: PING.
    Redis,
    /// MySQL/MariaDB: `SELECT 1`.
    Mysql,
    /// Elasticsearch: cluster health, red counts as unhealthy.
    Elasticsearch,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        // Every variant has a value name: none is skipped.
        let name = self
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error, or the client could not be built.
    #[error("{0}")]
    Failed(String),
    /// Elasticsearch answered, but its cluster is red.
    #[error("cluster health is {0}")]
    Unhealthy(String),
}

fn failed(error: impl std::fmt::Display) -> ProbeError {
    ProbeError::Failed(error.to_string())
}

/// Runs one probe of `kind` against `url`; returns a short description of the answer.
pub async fn once(kind: Kind, url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let check = async {
        match kind {
            Kind::Kafka => kafka(url, timeout).await,
            Kind::Redis => redis(url).await,
            Kind::Mysql => mysql(url).await,
            Kind::Elasticsearch => elasticsearch(url).await,
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn kafka(bootstrap: &str, timeout: Duration) -> Result<String, ProbeError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(failed)?;
    // librdkafka's metadata call blocks; keep it off the async threads.
    tokio::task::spawn_blocking(move || {
        let metadata = consumer.fetch_metadata(None, timeout).map_err(failed)?;
        Ok(format!("{} broker(s)", metadata.brokers().len()))
    })
    .await
    .map_err(failed)?
}

async fn redis(url: &str) -> Result<String, ProbeError> {
    let client = redis::Client::open(url).map_err(failed)?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(failed)?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.map_err(failed)?;
    Ok(pong)
}

async fn mysql(url: &str) -> Result<String, ProbeError> {
    let opts = mysql_async::Opts::from_url(url).map_err(failed)?;
    let mut conn = mysql_async::Conn::new(opts).await.map_err(failed)?;
    let version: Option<String> = conn.query_first("SELECT VERSION()").await.map_err(failed)?;
    conn.disconnect().await.map_err(failed)?;
    Ok(version.unwrap_or_default())
}

async fn elasticsearch(url: &str) -> Result<String, ProbeError> {
    let es = elasticsearch::Elasticsearch::new(Transport::single_node(url).map_err(failed)?);
    let health: serde_json::Value = es
        .cluster()
        .health(elasticsearch::cluster::ClusterHealthParts::None)
        .send()
        .await
        .map_err(failed)?
        .error_for_status_code()
        .map_err(failed)?
        .json()
        .await
        .map_err(failed)?;
    let status = health["status"].as_str().unwrap_or("unknown").to_owned();
    match status.as_str() {
        "green" | "yellow" => Ok(format!("cluster {} is {status}", health["cluster_name"])),
        _ => Err(ProbeError::Unhealthy(status)),
    }
}
