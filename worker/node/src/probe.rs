//! Health checks of the dependencies, each with the client the data plane uses.
//!
//! A [`Prober`] keeps its client between checks, as a long-lived prober should
//! (a new Kafka client per probe would cost threads and a bootstrap each time);
//! after a failed check the client is dropped, so the next check reconnects.

use std::sync::Arc;
use std::time::Duration;

use elasticsearch::http::transport::Transport;
use mysql_async::prelude::Queryable;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The kinds of server a worker depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    /// Apache Kafka: a metadata request.
    Kafka,
    /// Redis: PING.
    Redis,
    /// MySQL/MariaDB: `SELECT VERSION()`.
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

/// A connected client, kept between checks.
enum Client {
    Kafka(Arc<BaseConsumer>),
    Redis(redis::aio::MultiplexedConnection),
    Mysql(mysql_async::Conn),
    Elasticsearch(elasticsearch::Elasticsearch),
}

/// Probes one server again and again with one client.
pub struct Prober {
    kind: Kind,
    url: String,
    client: Option<Client>,
}

impl Prober {
    /// A prober of `kind` for `url` (`host:port[,…]` for Kafka, a URL otherwise); connects on first check.
    pub fn new(kind: Kind, url: impl Into<String>) -> Self {
        Self {
            kind,
            url: url.into(),
            client: None,
        }
    }

    /// One check within `timeout`; returns a short description of the answer.
    pub async fn check(&mut self, timeout: Duration) -> Result<String, ProbeError> {
        let result = tokio::time::timeout(timeout, self.check_inner(timeout))
            .await
            .unwrap_or(Err(ProbeError::Timeout(timeout)));
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn connect(&self) -> Result<Client, ProbeError> {
        Ok(match self.kind {
            Kind::Kafka => {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &self.url)
                    // Fail a dead broker fast instead of retrying in the background.
                    .set("socket.connection.setup.timeout.ms", "1000")
                    .set("reconnect.backoff.max.ms", "1000")
                    .create()
                    .map_err(failed)?;
                Client::Kafka(Arc::new(consumer))
            }
            Kind::Redis => {
                let client = redis::Client::open(self.url.as_str()).map_err(failed)?;
                Client::Redis(client.get_multiplexed_async_connection().await.map_err(failed)?)
            }
            Kind::Mysql => {
                let opts = mysql_async::Opts::from_url(&self.url).map_err(failed)?;
                Client::Mysql(mysql_async::Conn::new(opts).await.map_err(failed)?)
            }
            Kind::Elasticsearch => Client::Elasticsearch(elasticsearch::Elasticsearch::new(
                Transport::single_node(&self.url).map_err(failed)?,
            )),
        })
    }

    async fn check_inner(&mut self, timeout: Duration) -> Result<String, ProbeError> {
        let client = match self.client.take() {
            Some(client) => client,
            None => self.connect().await?,
        };
        let client = self.client.insert(client);
        match client {
            Client::Kafka(consumer) => {
                let consumer = Arc::clone(consumer);
                // librdkafka's metadata call blocks; keep it off the async threads.
                tokio::task::spawn_blocking(move || {
                    let metadata =
                        consumer
                            .fetch_metadata(None, timeout)
                            .map_err(|e| match e.rdkafka_error_code() {
                                Some(rdkafka::types::RDKafkaErrorCode::OperationTimedOut) => {
                                    ProbeError::Timeout(timeout)
                                }
                                _ => failed(e),
                            })?;
                    Ok(format!("{} broker(s)", metadata.brokers().len()))
                })
                .await
                .map_err(failed)?
            }
            // The client's own response timeout is a timeout too, not a failure of another kind.
            Client::Redis(conn) => redis::cmd("PING").query_async::<String>(conn).await.map_err(|e| {
                if e.is_timeout() {
                    ProbeError::Timeout(timeout)
                } else {
                    failed(e)
                }
            }),
            Client::Mysql(conn) => {
                let version: Option<String> = conn.query_first("SELECT VERSION()").await.map_err(failed)?;
                Ok(version.unwrap_or_default())
            }
            Client::Elasticsearch(es) => {
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
        }
    }
}

/// Runs one probe of `kind` against `url`.
pub async fn once(kind: Kind, url: &str, timeout: Duration) -> Result<String, ProbeError> {
    Prober::new(kind, url).check(timeout).await
}
