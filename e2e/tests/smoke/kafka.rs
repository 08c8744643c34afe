//! Kafka: a batch produced through rdkafka is consumed back, complete and in order.

use std::time::Duration;

use ballast_e2e::Stack;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};

const BATCH: usize = 200;

#[tokio::test]
async fn kafka_produces_and_consumes_a_batch() -> anyhow::Result<()> {
    let bootstrap = Stack::discover().get("BALLAST_KAFKA_BOOTSTRAP")?;
    let topic = super::unique("smoke");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let created = admin
        .create_topics(
            [&NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await?;
    for result in created {
        result.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "20000")
        .create()?;
    for i in 0..BATCH {
        let payload = format!("event-{i}");
        let key = format!("merchant-{}", i % 7);
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(20),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing event {i}: {e}"))?;
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", super::unique("smoke-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen = Vec::with_capacity(BATCH);
    while seen.len() < BATCH {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no message within 30 s after {} of {BATCH}", seen.len()))??;
        let payload = message.payload_view::<str>().transpose()?.unwrap_or_default();
        seen.push(payload.to_owned());
    }
    let expected: Vec<String> = (0..BATCH).map(|i| format!("event-{i}")).collect();
    assert_eq!(seen, expected, "one partition keeps the produced order");
    Ok(())
}
