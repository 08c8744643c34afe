//! `ballast-worker intake` against the local stack's real Kafka, KV Redis and
//! API server: every event lands exactly once in the KV buckets, across an
//! intake crash; a message that is not an event goes to the dead-letter topic
//! with its reason; with the KV mode published Degraded, events go to the slaves,
//! and a slave that hangs delays its share by a deadline, not forever.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_crds::AnalyticsPipeline;
use ballast_e2e::Stack;
use ballast_worker::kv::{KvStore, Layout};
use ballast_worker::routing::Ring;
use ballast_worker::wire::slave_client::SlaveClient;
use ballast_worker::wire::{ChangeEvent, HoldingsRequest};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::json;

const WINDOW_MS: i64 = 60_000;

async fn produce(producer: &FutureProducer, topic: &str, events: &[ChangeEvent]) -> anyhow::Result<()> {
    for event in events {
        let payload = event.encode_to_vec();
        let record = FutureRecord::to(topic).key(&event.merchant_id).payload(&payload);
        producer
            .send(record, Duration::from_secs(20))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

async fn kv_count(kv: &mut KvStore, windows: &[i64]) -> anyhow::Result<usize> {
    let mut n = 0;
    for w in windows {
        n += kv.window(*w).await?.len();
    }
    Ok(n)
}

async fn until(
    what: &str,
    secs: u64,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done().await? {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn intake_stores_each_event_once_dead_letters_garbage_and_follows_the_kv_mode() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "in", json!({})).await?;
    let topic = format!("{pipeline}-events");
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
    let spawn = |role: &str, pod: &str| stack.worker(worker, role, &ns, &pipeline, pod);

    let bootstrap = stack.get("BALLAST_KAFKA_BOOTSTRAP")?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for created in admin
        .create_topics([&NewTopic::new(&topic, 3, TopicReplication::Fixed(1))], &opts)
        .await?
    {
        created.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;

    let now = Timestamp::now().as_millisecond() / WINDOW_MS * WINDOW_MS;
    let windows = [now - WINDOW_MS, now];
    let events: Vec<ChangeEvent> = (0..400)
        .map(|i| {
            ChangeEvent::insert(
                format!("ev-{i}"),
                format!("m{}", i % 37),
                "orders",
                windows[i % 2] + i as i64,
                b"{}".to_vec(),
            )
        })
        .collect();
    let (first, second) = events.split_at(200);
    produce(&producer, &topic, first).await?;
    producer
        .send(
            FutureRecord::to(&topic)
                .key("junk")
                .payload(&b"\xff\xfenot an event"[..]),
            Duration::from_secs(20),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;

    let kv_url = stack.get("BALLAST_REDIS_KV_URL")?;
    let conn = redis::Client::open(kv_url.as_str())?
        .get_connection_manager()
        .await?;
    let mut kv = KvStore::new(conn, Layout::new(&pipeline, WINDOW_MS), 300);

    // The first half lands; the intake then crashes (SIGKILL, nothing drained).
    let intake = spawn("intake", "intake-0")?;
    until("first 200 events in the KV store", 60, async || {
        Ok(kv_count(&mut kv, &windows).await? == 200)
    })
    .await?;
    drop(intake);

    // Redelivering what was in flight and adding the second half: exactly 400.
    produce(&producer, &topic, second).await?;
    produce(&producer, &topic, &first[..50]).await?; // a collector's retry after an unacknowledged send
    let _intake = spawn("intake", "intake-0")?;
    until("all 400 events in the KV store", 60, async || {
        Ok(kv_count(&mut kv, &windows).await? >= 400)
    })
    .await?;
    // Everything produced is consumed and committed (the redelivered 50
    // included): only then can a duplicate no longer appear.
    let group: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("ballast-intake-{pipeline}"))
        .create()?;
    until("the intake committed every message", 60, async || {
        let mut list = rdkafka::TopicPartitionList::new();
        let mut ends = Vec::new();
        for partition in 0..3 {
            list.add_partition(&topic, partition);
            ends.push(
                group
                    .fetch_watermarks(&topic, partition, Duration::from_secs(5))?
                    .1,
            );
        }
        let committed = group.committed_offsets(list, Duration::from_secs(5))?;
        let offsets: Vec<i64> = committed
            .elements()
            .iter()
            .map(|e| e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(0))
            .collect();
        Ok(offsets == ends)
    })
    .await?;
    assert_eq!(kv_count(&mut kv, &windows).await?, 400, "no loss, no duplicate");
    assert_eq!(
        kv.merchant(windows[1], "m1")
            .await?
            .iter()
            .filter(|e| e.event_id == "ev-1")
            .count(),
        1
    );

    // The message that was not an event is in the dead-letter topic, with its reason.
    let dlq: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("{pipeline}-dlq-check"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    dlq.subscribe(&[&format!("{topic}.dead-letter")])?;
    let message = tokio::time::timeout(Duration::from_secs(30), dlq.recv()).await??;
    assert_eq!(message.payload(), Some(&b"\xff\xfenot an event"[..]));
    let reason = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "ballast-reason"))
        .and_then(|h| h.value);
    assert!(
        reason.is_some_and(|r| r.starts_with(b"not a ChangeEvent")),
        "{reason:?}"
    );

    // KV published Degraded (as the operator would): events go to the live slaves,
    // each to exactly the slave the ring names for its merchant.
    let mut slaves = vec![
        spawn("slave", "s-0")?,
        spawn("slave", "s-1")?,
        spawn("slave", "s-2")?,
    ];
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let members = async || -> anyhow::Result<BTreeMap<String, String>> {
        let list = leases
            .list(&ListParams::default().labels("ballast.dev/role=slave"))
            .await?;
        Ok(ballast_worker::membership::ready_members(
            &list.items,
            Timestamp::now(),
        ))
    };
    until("3 slaves joined", 30, async || Ok(members().await?.len() == 3)).await?;
    // As the operator publishes them: the mode, with the slave set each
    // generation routes over. Intakes and slaves follow both with a watch.
    let publish = async |generation: i64, set: &[&str]| -> anyhow::Result<()> {
        let status = json!({"status": {
            "dependencies": {"kv": {"mode": "Degraded", "since": Timestamp::now().to_string(), "epoch": 1}},
            "slaveSet": {"epoch": 1, "generation": generation, "members": set},
        }});
        aps.patch_status(&pipeline, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    };
    publish(1, &["s-0", "s-1", "s-2"]).await?;

    let held = async |addresses: &BTreeMap<String, String>| -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (slave, address) in addresses {
            let mut client = SlaveClient::new(ballast_worker::auth::channel(
                address,
                ballast_worker::grpc::STORE_DEADLINE,
                &ballast_e2e::DATA_PLANE_TOKEN.parse()?,
            )?);
            let windows = client.holdings(HoldingsRequest {}).await?.into_inner().windows;
            out.insert(slave.clone(), windows.iter().map(|w| w.events).sum::<u64>());
        }
        Ok(out)
    };
    let expected = |ring: &Ring| {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for m in 0..100 {
            *out.entry(ring.owner(&format!("m{m}")).unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        out
    };
    let batch = |tag: &str| -> Vec<ChangeEvent> {
        let now = Timestamp::now().as_millisecond();
        (0..100)
            .map(|i| {
                ChangeEvent::insert(
                    format!("{tag}-{i}"),
                    format!("m{i}"),
                    "orders",
                    now,
                    b"{}".to_vec(),
                )
            })
            .collect()
    };
    let three = Ring::new(["s-0", "s-1", "s-2"]);
    produce(&producer, &topic, &batch("deg")).await?;
    let addresses = members().await?;
    let want = expected(&three);
    until("each slave holds exactly its merchants' events", 60, async || {
        Ok(held(&addresses).await? == want)
    })
    .await?;

    // A fourth slave joins: about a quarter of the merchants move, all to it,
    // with the events the others held for them (handed off, so each
    // merchant's events stay on one slave and its hour-to-date is whole).
    slaves.push(spawn("slave", "s-3")?);
    until("4 slaves joined", 30, async || Ok(members().await?.len() == 4)).await?;
    publish(2, &["s-0", "s-1", "s-2", "s-3"]).await?;
    let four = Ring::new(["s-0", "s-1", "s-2", "s-3"]);
    let moved = (0..100)
        .filter(|m| three.owner(&format!("m{m}")) != four.owner(&format!("m{m}")))
        .count();
    assert!((12..=40).contains(&moved), "{moved} of 100 merchants moved");
    assert!((0..100).all(|m| {
        let m = format!("m{m}");
        three.owner(&m) == four.owner(&m) || four.owner(&m) == Some("s-3")
    }));
    produce(&producer, &topic, &batch("deg4")).await?;
    let addresses = members().await?;
    let want: BTreeMap<String, u64> = expected(&four).into_iter().map(|(s, n)| (s, 2 * n)).collect();
    until("placement after the fourth slave joined", 60, async || {
        Ok(held(&addresses).await? == want)
    })
    .await?;
    // A slave is stopped mid-stream (SIGTERM): it leaves the ring, so its
    // merchants go to the others, and hands them what it held before it goes;
    // every other merchant stays where it was. (A crash loses what the slave
    // held; the master reports that: see the degraded scenario.)
    slaves[0].signal("-TERM")?;
    until("s-0 left", 30, async || Ok(!members().await?.contains_key("s-0"))).await?;
    publish(3, &["s-1", "s-2", "s-3"]).await?;
    produce(&producer, &topic, &batch("after-leave")).await?;
    let remaining = Ring::new(["s-1", "s-2", "s-3"]);
    let want: BTreeMap<String, u64> = expected(&remaining)
        .into_iter()
        .map(|(s, n)| (s, 3 * n))
        .collect();
    let addresses = members().await?;
    until("placement after s-0 left", 60, async || {
        Ok(held(&addresses).await? == want)
    })
    .await?;

    // A slave hangs (SIGSTOP: its port accepts connections, nothing answers).
    // Each delivery to it fails at its deadline instead of hanging the intake;
    // once its Lease lapses and a set without it is published, its merchants
    // go to the two others, and every event of the next batch is stored there.
    slaves[1].signal("-STOP")?;
    let live: BTreeMap<String, String> = addresses.into_iter().filter(|(s, _)| s != "s-1").collect();
    let before = held(&live).await?;
    produce(&producer, &topic, &batch("after-hang")).await?;
    until("s-1's Lease lapsed", 60, async || {
        Ok(!members().await?.contains_key("s-1"))
    })
    .await?;
    publish(4, &["s-2", "s-3"]).await?;
    let two = Ring::new(["s-2", "s-3"]);
    let want: BTreeMap<String, u64> = expected(&two)
        .into_iter()
        .map(|(s, n)| (s.clone(), before.get(&s).copied().unwrap_or(0) + n))
        .collect();
    until("placement after s-1 hung", 90, async || {
        Ok(held(&live).await? == want)
    })
    .await?;
    slaves[1].signal("-CONT")?;
    assert_eq!(
        kv_count(&mut kv, &windows).await?,
        400,
        "nothing went to the KV store while it was Degraded"
    );
    Ok(())
}

/// A dead letter Kafka refuses is a store failure: the intake retries it and
/// commits nothing past it, so that the message is redelivered to the next
/// intake rather than lost.
#[tokio::test]
async fn a_dead_letter_kafka_refuses_is_retried_and_not_committed_past() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "dl", json!({})).await?;
    let topic = format!("{pipeline}-events");
    let dead_letters = format!("{topic}.dead-letter");
    let bootstrap = stack.get("BALLAST_KAFKA_BOOTSTRAP")?;
    ballast_e2e::kafka::create(&bootstrap, &[&topic], None).await?;
    // The dead-letter topic refuses any message over 16 bytes, as a broker
    // refuses writes it cannot take.
    let refusing = ballast_e2e::kafka::Refusing::create(&bootstrap, &dead_letters).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let garbage = b"\xff\xfenot an event, and longer than sixteen bytes".to_vec();
    producer
        .send(
            FutureRecord::to(&topic).key("junk").payload(&garbage),
            Duration::from_secs(20),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;

    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
    let port = ballast_e2e::scenario::free_port()?;
    let metrics_addr = format!("127.0.0.1:{port}");
    let env = [("BALLAST_METRICS_ADDR", metrics_addr.as_str())];
    let intake = stack.worker_with(worker, &["intake"], &ns, &pipeline, "intake-0", &env)?;
    until("the refused dead letter retried", 60, async || {
        let failures = ballast_e2e::scenario::metric(port, "ballast_intake_write_failures_total").await;
        Ok(failures.ok().flatten().is_some_and(|n| n >= 2.0))
    })
    .await?;
    // Killed outright while the dead letter is refused; then the topic takes it.
    drop(intake);
    refusing.accept().await?;
    // The next intake gets the message again (its offset was never committed) and stores it.
    let _intake = stack.worker(worker, "intake", &ns, &pipeline, "intake-1")?;
    let dlq = refusing.consumer(&format!("{pipeline}-dlq-check"))?;
    let message = tokio::time::timeout(Duration::from_secs(60), dlq.recv()).await??;
    assert_eq!(message.payload(), Some(garbage.as_slice()));
    Ok(())
}
