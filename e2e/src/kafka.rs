//! Kafka topics the scenarios arrange: created ahead of the workers, and a
//! dead-letter topic that refuses writes until told to take them, as a broker
//! refuses what it cannot store.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};

/// Why arranging a topic failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The client or a call failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker refused one topic's creation or change.
    #[error("topic {topic}: {reason}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's reason.
        reason: String,
    },
}

fn admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    Ok(ClientConfig::new().set("bootstrap.servers", bootstrap).create()?)
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)))
}

/// Creates `topics` with one partition each; `max_message_bytes` caps what
/// each takes, when given.
pub async fn create(
    bootstrap: &str,
    topics: &[&str],
    max_message_bytes: Option<u32>,
) -> Result<(), TopicError> {
    let limit = max_message_bytes.map(|n| n.to_string());
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, 1, TopicReplication::Fixed(1));
            match &limit {
                Some(limit) => topic.set("max.message.bytes", limit),
                None => topic,
            }
        })
        .collect();
    for created in admin(bootstrap)?.create_topics(&new, &options()).await? {
        created.map_err(|(topic, e)| TopicError::Refused {
            topic,
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// A topic that refuses any message over 16 bytes until [`Refusing::accept`].
pub struct Refusing {
    bootstrap: String,
    name: String,
}

impl Refusing {
    /// Creates `name`, refusing.
    pub async fn create(bootstrap: &str, name: &str) -> Result<Self, TopicError> {
        create(bootstrap, &[name], Some(16)).await?;
        Ok(Self {
            bootstrap: bootstrap.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Lets it take messages of up to 1 MiB.
    pub async fn accept(&self) -> Result<(), TopicError> {
        let raise =
            AlterConfig::new(ResourceSpecifier::Topic(&self.name)).set("max.message.bytes", "1048576");
        for altered in admin(&self.bootstrap)?
            .alter_configs([&raise], &options())
            .await?
        {
            altered.map_err(|(_, e)| TopicError::Refused {
                topic: self.name.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// A consumer of it from the start, in a group of its own.
    pub fn consumer(&self, group: &str) -> Result<StreamConsumer, TopicError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&self.name])?;
        Ok(consumer)
    }
}
