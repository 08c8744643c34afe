//! Health checks of the dependencies, each with the client the data plane uses.
//!
//! A [`Prober`] keeps its client between checks, as a long-lived prober should
//! (a new Kafka client per probe would cost threads and a bootstrap each time);
//! after a failed check the client is dropped, so the next check reconnects.

use std::sync::Arc;
use std::time::Duration;

use ballast_crds::refs::{MysqlRef, RedisRef};
use mysql_async::prelude::Queryable;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::connect;
use crate::secret::Secret;

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

/// Where a prober connects. Address and credentials are typed fields, never
/// a formatted URL: any character of a password reaches the server as
/// written, and printing an endpoint never prints a credential.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Kafka's comma-separated `host:port` bootstrap brokers.
    Kafka(String),
    /// A Redis server (`host:port`), its database and password.
    Redis {
        /// `host:port`.
        address: String,
        /// Logical database number.
        database: i32,
        /// `AUTH` password, if the server has one.
        password: Option<Secret>,
    },
    /// A MySQL server (`host:port`), user, database and password.
    Mysql {
        /// `host:port`.
        address: String,
        /// User to connect as.
        user: String,
        /// Database (schema) name.
        database: String,
        /// The user's password, if it has one.
        password: Option<Secret>,
    },
    /// An Elasticsearch cluster's URL, and user and password when it is secured.
    Elasticsearch {
        /// HTTP endpoint, e.g. `http://es:9200`.
        url: String,
        /// User and password, sent as HTTP basic authentication.
        credentials: Option<(String, Secret)>,
    },
}

impl Endpoint {
    /// The kind of server this is.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Kafka(_) => Kind::Kafka,
            Self::Redis { .. } => Kind::Redis,
            Self::Mysql { .. } => Kind::Mysql,
            Self::Elasticsearch { .. } => Kind::Elasticsearch,
        }
    }

    /// The endpoint of the MySQL server `server` names.
    pub fn mysql(server: &MysqlRef, password: Option<Secret>) -> Self {
        Self::Mysql {
            address: server.address.clone(),
            user: server.user.clone(),
            database: server.database.clone(),
            password,
        }
    }

    /// The endpoint of the Redis server `server` names.
    pub fn redis(server: &RedisRef, password: Option<Secret>) -> Self {
        Self::Redis {
            address: server.address.clone(),
            database: server.database,
            password,
        }
    }

    /// The password this endpoint carries, if any.
    fn password(&self) -> Option<&Secret> {
        match self {
            Self::Kafka(_) => None,
            Self::Redis { password, .. } | Self::Mysql { password, .. } => password.as_ref(),
            Self::Elasticsearch { credentials, .. } => credentials.as_ref().map(|(_, p)| p),
        }
    }
}

/// What may be printed or logged: the address, never a password.
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kafka(bootstrap) => f.write_str(bootstrap),
            Self::Redis {
                address, database, ..
            } => write!(f, "{address}/{database}"),
            Self::Mysql {
                address,
                user,
                database,
                ..
            } => write!(f, "{user}@{address}/{database}"),
            Self::Elasticsearch { url, credentials } => match credentials {
                Some((user, _)) => write!(f, "{} as {user}", redacted(url)),
                None => f.write_str(&redacted(url)),
            },
        }
    }
}

/// As displayed, so that a password written into an Elasticsearch URL
/// (against the CRD's advice) is hidden from `{:?}` too.
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({self})", self.kind())
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

/// Whether a failed Kafka metadata request is a timeout. librdkafka answers
/// "broker transport failure" when no broker connection became usable within
/// the timeout, which is what a hung broker looks like while a connection is
/// still being set up: having waited the whole timeout makes it a timeout.
fn kafka_timed_out(
    code: Option<rdkafka::types::RDKafkaErrorCode>,
    waited: Duration,
    timeout: Duration,
) -> bool {
    code == Some(rdkafka::types::RDKafkaErrorCode::OperationTimedOut) || waited >= timeout
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
    endpoint: Endpoint,
    client: Option<Client>,
}

impl Prober {
    /// A prober of `endpoint`; connects on first check.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
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
        // A client's error may quote what it was given: never the password.
        result.map_err(|error| match error {
            ProbeError::Failed(text) => ProbeError::Failed(scrub(&text, self.endpoint.password())),
            other => other,
        })
    }

    async fn connect(&self) -> Result<Client, ProbeError> {
        Ok(match &self.endpoint {
            Endpoint::Kafka(bootstrap) => {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    // Fail a dead broker fast instead of retrying in the background.
                    .set("socket.connection.setup.timeout.ms", "1000")
                    .set("reconnect.backoff.max.ms", "1000")
                    .create()
                    .map_err(failed)?;
                Client::Kafka(Arc::new(consumer))
            }
            Endpoint::Redis {
                address,
                database,
                password,
            } => {
                let server = RedisRef {
                    address: address.clone(),
                    database: *database,
                    password_secret_ref: None,
                };
                let info = connect::redis(&server, password.as_ref()).map_err(failed)?;
                let client = redis::Client::open(info).map_err(failed)?;
                Client::Redis(client.get_multiplexed_async_connection().await.map_err(failed)?)
            }
            Endpoint::Mysql {
                address,
                user,
                database,
                password,
            } => {
                let server = MysqlRef {
                    address: address.clone(),
                    database: database.clone(),
                    user: user.clone(),
                    password_secret_ref: None,
                };
                let opts = connect::mysql(&server, password.as_ref());
                Client::Mysql(mysql_async::Conn::new(opts).await.map_err(failed)?)
            }
            Endpoint::Elasticsearch { url, credentials } => {
                Client::Elasticsearch(connect::elasticsearch(url, credentials.clone()).map_err(failed)?)
            }
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
                    let started = std::time::Instant::now();
                    let metadata = consumer.fetch_metadata(None, timeout).map_err(|e| {
                        if kafka_timed_out(e.rdkafka_error_code(), started.elapsed(), timeout) {
                            ProbeError::Timeout(timeout)
                        } else {
                            failed(e)
                        }
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

/// `url` with the password of its user info, if any, replaced by `***`:
/// what may be printed or logged. Pure.
pub fn redacted(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_owned(),
    }
}

/// Where the password of `url`'s user info is (`scheme://user:password@host`).
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority = url.find("://")? + 3;
    let end = url[authority..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority + i);
    let at = authority + url[authority..end].rfind('@')?;
    let colon = authority + url[authority..at].find(':')?;
    (colon + 1 < at).then_some((colon + 1, at))
}

/// `text` with `password`, wherever it is quoted, replaced by `***`. Pure.
pub fn scrub(text: &str, password: Option<&Secret>) -> String {
    match password.map(Secret::expose).filter(|p| !p.is_empty()) {
        Some(password) => text.replace(password, "***"),
        None => text.to_owned(),
    }
}

/// Runs one probe of `endpoint`.
pub async fn once(endpoint: Endpoint, timeout: Duration) -> Result<String, ProbeError> {
    Prober::new(endpoint).check(timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_error_after_the_whole_timeout_is_a_timeout() {
        use rdkafka::types::RDKafkaErrorCode::{BrokerTransportFailure, OperationTimedOut};
        let timeout = Duration::from_millis(800);
        let ms = Duration::from_millis;
        // (code, waited, timed out)
        let cases = [
            (Some(OperationTimedOut), ms(800), true),
            (Some(OperationTimedOut), ms(10), true),
            (Some(BrokerTransportFailure), ms(800), true),
            (Some(BrokerTransportFailure), ms(900), true),
            (Some(BrokerTransportFailure), ms(5), false),
            (None, ms(799), false),
            (None, ms(800), true),
        ];
        for (code, waited, expected) in cases {
            assert_eq!(
                kafka_timed_out(code, waited, timeout),
                expected,
                "{code:?} after {waited:?}"
            );
        }
    }

    #[test]
    fn an_endpoint_prints_its_address_and_never_its_password() {
        let pw = || Some(Secret::from("s3cret"));
        // (endpoint, as printed)
        let cases = [
            (Endpoint::Kafka("k1:9092,k2:9092".into()), "k1:9092,k2:9092"),
            (
                Endpoint::Redis {
                    address: "kv:6379".into(),
                    database: 2,
                    password: pw(),
                },
                "kv:6379/2",
            ),
            (
                Endpoint::Mysql {
                    address: "db:3306".into(),
                    user: "ballast".into(),
                    database: "orders".into(),
                    password: pw(),
                },
                "ballast@db:3306/orders",
            ),
            (
                Endpoint::Elasticsearch {
                    url: "https://es:9200".into(),
                    credentials: Some(("elastic".into(), Secret::from("s3cret"))),
                },
                "https://es:9200 as elastic",
            ),
            // A password written into the URL against the CRD's advice is still hidden.
            (
                Endpoint::Elasticsearch {
                    url: "http://elastic:s3cret@es:9200".into(),
                    credentials: None,
                },
                "http://elastic:***@es:9200",
            ),
        ];
        for (endpoint, printed) in cases {
            assert_eq!(endpoint.to_string(), printed);
            assert!(!format!("{endpoint:?}").contains("s3cret"), "{endpoint:?}");
        }
    }

    #[test]
    fn passwords_never_leave_a_url_or_an_error() {
        // (URL, as printed)
        let cases = [
            ("http://elastic:s3cret@es:9200", "http://elastic:***@es:9200"),
            ("http://elastic@es:9200", "http://elastic@es:9200"),
            ("https://u:p%40ss%2Fw@es/x", "https://u:***@es/x"),
            ("http://es:9200/path@x", "http://es:9200/path@x"),
        ];
        for (url, printed) in cases {
            assert_eq!(redacted(url), printed, "{url}");
        }
        let password = Secret::from("p@ss/w");
        assert_eq!(
            scrub("access denied for u with p@ss/w", Some(&password)),
            "access denied for u with ***"
        );
        assert_eq!(scrub("no password here", None), "no password here");
        assert_eq!(scrub("empty stays", Some(&Secret::from(""))), "empty stays");
    }
}
