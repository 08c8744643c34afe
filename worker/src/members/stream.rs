//! The member change stream: every accepted write, as the member's state
//! after it, on one Kafka partition (so that the order of writes across
//! members is kept). It feeds the marketing cluster; while MySQL is down, the
//! records of writes Elasticsearch took are the journal replayed into MySQL
//! when it returns. A record is published, and acknowledged by Kafka, before
//! the write is acknowledged to its caller.

use std::time::Duration;

use ballast_crds::refs::KafkaRef;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use super::model::Member;

/// Which store took a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Path {
    /// MySQL, then Elasticsearch: the normal path.
    Mysql,
    /// Elasticsearch alone, MySQL being down: to be replayed into MySQL.
    Elasticsearch,
}

impl Path {
    /// Lower-case name, as metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Elasticsearch => "elasticsearch",
        }
    }
}

/// One record of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The store that took the write.
    pub path: Path,
    /// The member after the write.
    pub member: Member,
    /// The epoch the writing process followed (`status.epoch`): its
    /// Elasticsearch documents are versioned under it, so a replica given a
    /// record from before a promotion keeps what the promoted side wrote
    /// since. Absent in records from before epochs were written: 0.
    #[serde(default)]
    pub epoch: i64,
}

impl Record {
    /// The record's bytes (JSON). Pure.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A record from its bytes. Pure.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Why the stream did not take a record.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Kafka refused or did not acknowledge it in time.
    #[error("member change stream: {0}")]
    Kafka(#[from] KafkaError),
}

/// The producer side of the stream.
#[derive(Clone)]
pub struct ChangeStream {
    producer: FutureProducer,
    topic: String,
    deadline: Duration,
}

/// Client settings of the stream's brokers.
pub fn client_config(kafka: &KafkaRef) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    config
}

impl ChangeStream {
    /// A producer of `kafka.topic` whose every record is acknowledged by all
    /// in-sync replicas within `deadline`, or fails.
    pub fn new(kafka: &KafkaRef, deadline: Duration) -> Result<Self, StreamError> {
        let producer = client_config(kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                u64::try_from(deadline.as_millis())
                    .unwrap_or(5_000)
                    .max(1)
                    .to_string(),
            )
            .create()?;
        Ok(Self {
            producer,
            topic: kafka.topic.clone(),
            deadline,
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the topic with one partition if it does not exist. Idempotent.
    pub async fn ensure_topic(kafka: &KafkaRef, deadline: Duration) -> Result<(), StreamError> {
        let admin: AdminClient<DefaultClientContext> = client_config(kafka).create()?;
        let options = AdminOptions::new().operation_timeout(Some(deadline));
        // The broker's default replication factor.
        let topic = NewTopic::new(&kafka.topic, 1, TopicReplication::Fixed(-1));
        let results = tokio::time::timeout(deadline, admin.create_topics([&topic], &options))
            .await
            .map_err(|_| KafkaError::AdminOp(RDKafkaErrorCode::RequestTimedOut))??;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
            }
        }
        Ok(())
    }

    /// Publishes `record` keyed by member id; its offset once acknowledged.
    pub async fn publish(&self, record: &Record) -> Result<i64, StreamError> {
        let key = record.member.id.to_string();
        let payload = record.encode();
        let delivered = self
            .producer
            .send(
                FutureRecord::to(&self.topic).key(&key).payload(&payload),
                // A full queue is waited on no longer than delivery is.
                self.deadline,
            )
            .await;
        match delivered {
            Ok(delivery) => Ok(delivery.offset),
            Err((error, _)) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_bytes() -> Result<(), serde_json::Error> {
        let record = Record {
            path: Path::Elasticsearch,
            member: Member {
                id: 9,
                name: "名".into(),
                level: "gold".into(),
                identities: Default::default(),
                version: 4,
                updated_ms: 77,
            },
            epoch: 2,
        };
        let bytes = record.encode();
        assert!(String::from_utf8_lossy(&bytes).contains("\"path\":\"elasticsearch\""));
        assert_eq!(Record::decode(&bytes)?, record);
        let before_epochs = br#"{"path":"mysql","member":{"id":9,"name":"n","level":"l","identities":[],"version":1,"updatedMs":1}}"#;
        assert_eq!(
            Record::decode(before_epochs)?.epoch,
            0,
            "a record from before epochs is epoch 0"
        );
        assert!(Record::decode(b"{").is_err());
        Ok(())
    }
}
