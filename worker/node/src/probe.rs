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
        // A client's error may quote what it was given: never the password.
        result.map_err(|error| match error {
            ProbeError::Failed(text) => ProbeError::Failed(scrub(&text, &self.url)),
            other => other,
        })
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

/// `text` with the password of `url` (as written, and percent-decoded) replaced by `***`.
pub fn scrub(text: &str, url: &str) -> String {
    let Some((start, end)) = password_span(url) else {
        return text.to_owned();
    };
    let raw = &url[start..end];
    let decoded = percent_decode(raw);
    let mut out = text.replace(raw, "***");
    if !decoded.is_empty() && decoded != raw {
        out = out.replace(decoded.as_str(), "***");
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs one probe of `kind` against `url`.
pub async fn once(kind: Kind, url: &str, timeout: Duration) -> Result<String, ProbeError> {
    Prober::new(kind, url).check(timeout).await
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
    fn passwords_never_leave_a_url_or_an_error() {
        // (URL, as printed)
        let cases = [
            (
                "mysql://ballast:s3cret@db:3306/ballast",
                "mysql://ballast:***@db:3306/ballast",
            ),
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("http://elastic@es:9200", "http://elastic@es:9200"),
            ("mysql://u:p%40ss%2Fw@db/x", "mysql://u:***@db/x"),
            ("http://es:9200/path@x", "http://es:9200/path@x"),
            ("127.0.0.1:9092", "127.0.0.1:9092"),
        ];
        for (url, printed) in cases {
            assert_eq!(redacted(url), printed, "{url}");
        }
        let url = "mysql://u:p%40ss%2Fw@db/x";
        assert_eq!(
            scrub("access denied for u with p@ss/w and p%40ss%2Fw", url),
            "access denied for u with *** and ***"
        );
        assert_eq!(scrub("no password here", "redis://db:6379"), "no password here");
    }
}
