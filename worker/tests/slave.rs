//! `ballast-worker slave` as a process against the local stack's API server:
//! it joins the membership, stores routed events (deduplicated) within its
//! memory bound, refuses deliveries not routed over the published slave set,
//! reports its holdings, and leaves the membership on SIGTERM;
//! it refuses to compute a span whose events have partly aged out of memory,
//! and any call without the pipeline's data-plane token (UNAUTHENTICATED).

use std::time::{Duration, Instant};

use ballast_crds::AnalyticsPipeline;
use ballast_e2e::Stack;
use ballast_worker::wire::slave_client::SlaveClient;
use ballast_worker::wire::{ChangeEvent, ComputeTask, DataSource, EventBatch, Granularity, HoldingsRequest};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

fn event(id: &str, merchant: &str, time_ms: i64, columns: Vec<u8>) -> ChangeEvent {
    ChangeEvent::insert(id, merchant, "orders", time_ms, columns)
}

async fn lease(leases: &Api<Lease>, name: &str) -> anyhow::Result<Option<Lease>> {
    Ok(leases.get_opt(name).await?)
}

/// Waits until `name`'s Lease says ready; returns the address it advertises.
async fn joined(leases: &Api<Lease>, name: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = lease(leases, name).await?;
        let annotations = found.and_then(|l| l.metadata.annotations).unwrap_or_default();
        if annotations.get("ballast.dev/ready").map(String::as_str) == Some("true") {
            return Ok(annotations
                .get("ballast.dev/address")
                .cloned()
                .unwrap_or_default());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "slave did not join the membership within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hour-to-date task over slave memory for the hour holding `at_ms`, as the master sends it.
fn hour_from_memory(at_ms: i64, slave: &str) -> ComputeTask {
    let start = at_ms - at_ms.rem_euclid(3_600_000);
    ComputeTask {
        task_id: format!("hour/{start}/{slave}"),
        window_start_ms: start,
        window_end_ms: start + 3_600_000,
        version: 1,
        granularity: Granularity::Hour.into(),
        source: DataSource::Memory.into(),
        partition: 0,
        partitions: 1,
        // The slave's own SQL, as from a master older than SQL-stamped tasks.
        ..ComputeTask::default()
    }
}

/// A slave process on a pipeline fixture of its own, joined.
struct Running {
    client: kube::Client,
    ns: String,
    pipeline: String,
    leases: Api<Lease>,
    slave: ballast_e2e::KillOnDrop,
    address: String,
}

impl Running {
    /// Starts slave `identity` on a fresh pipeline with `policy` and `spec_patch`;
    /// returns once its Lease says ready.
    async fn start(
        prefix: &str,
        policy: serde_json::Value,
        spec_patch: serde_json::Value,
        identity: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let stack = Stack::discover();
        let client = stack.kube_client().await?;
        let (ns, pipeline) = stack
            .pipeline_fixture_with(&client, prefix, policy, spec_patch)
            .await?;
        let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
        let slave = stack.worker_with(worker, &["slave"], &ns, &pipeline, identity, env)?;
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        let address = joined(&leases, identity).await?;
        Ok(Self {
            client,
            ns,
            pipeline,
            leases,
            slave,
            address,
        })
    }

    /// Stops the slave and deletes the fixture's namespace.
    async fn remove(self) -> anyhow::Result<()> {
        drop(self.slave);
        Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client)
            .delete(&self.ns, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn slave_joins_stores_routed_events_and_leaves_on_sigterm() -> anyhow::Result<()> {
    // It joins: a ready Lease naming its address.
    let running = Running::start(
        "slave",
        json!({"kv": {"maxMemoryMiB": 16, "retentionSeconds": 3600}}),
        json!({}),
        "shop-slave-0",
        &[],
    )
    .await?;
    let (leases, address) = (&running.leases, &running.address);
    assert_eq!(
        leases
            .get("shop-slave-0")
            .await?
            .metadata
            .labels
            .unwrap_or_default()["ballast.dev/role"],
        "slave"
    );

    let mut grpc = SlaveClient::new(ballast_worker::auth::channel(
        address,
        ballast_worker::grpc::STORE_DEADLINE,
        &ballast_e2e::DATA_PLANE_TOKEN.parse()?,
    )?);
    let now = Timestamp::now().as_millisecond();
    let batch = vec![
        event("e1", "m1", now, b"{}".to_vec()),
        event("e2", "m2", now, b"{}".to_vec()),
    ];
    let reply = grpc
        .deliver(EventBatch {
            events: batch.clone(),
            epoch: 0,
            generation: 0,
        })
        .await?
        .into_inner();
    assert_eq!((reply.accepted, reply.duplicates), (2, 0));
    // A retried batch is acknowledged but not stored twice.
    let again = grpc
        .deliver(EventBatch {
            events: batch,
            epoch: 0,
            generation: 0,
        })
        .await?
        .into_inner();
    assert_eq!((again.accepted, again.duplicates), (0, 2));

    let holdings = grpc.holdings(HoldingsRequest {}).await?.into_inner();
    assert_eq!(holdings.windows.len(), 1);
    assert_eq!(
        (holdings.windows[0].events, holdings.windows[0].merchants),
        (2, 2)
    );
    assert_eq!(holdings.max_bytes, 16 * 1024 * 1024);

    // Batches of 3 MiB fill the 16 MiB bound: the sixth is refused whole with
    // RESOURCE_EXHAUSTED, and nothing of it is stored.
    let mut refused = None;
    for batch in 0..8 {
        let events: Vec<ChangeEvent> = (0..3)
            .map(|i| event(&format!("big-{batch}-{i}"), "m3", now, vec![b'x'; 1024 * 1024]))
            .collect();
        if let Err(status) = grpc
            .deliver(EventBatch {
                events,
                epoch: 0,
                generation: 0,
            })
            .await
        {
            refused = Some((batch, status));
            break;
        }
    }
    let (batch, status) = refused.expect("the memory bound was never reached");
    assert_eq!(batch, 5, "refused at batch {batch}");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("memory bound"), "{}", status.message());
    let after = grpc.holdings(HoldingsRequest {}).await?.into_inner();
    assert_eq!(after.windows[0].events, 2 + 5 * 3);

    // KV published Degraded with a slave set: only deliveries routed over that
    // set (its epoch and generation) are taken, and only while it names this slave.
    let aps: Api<AnalyticsPipeline> = Api::namespaced(running.client.clone(), &running.ns);
    let publish = async |generation: i64, member: &str| -> anyhow::Result<()> {
        let status = json!({"status": {
            "dependencies": {"kv": {"mode": "Degraded", "since": Timestamp::now().to_string(), "epoch": 2}},
            "slaveSet": {"epoch": 2, "generation": generation, "members": [member]},
        }});
        aps.patch_status(&running.pipeline, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    };
    let stamped = |id: &str, epoch: i64, generation: i64| EventBatch {
        events: vec![event(id, "m4", now, b"{}".to_vec())],
        epoch,
        generation,
    };
    publish(1, "shop-slave-0").await?;
    // The slave follows the published status with a watch: taken once it has seen it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(status) = grpc.deliver(stamped("f1", 2, 1)).await {
        anyhow::ensure!(status.code() == tonic::Code::FailedPrecondition, "{status}");
        anyhow::ensure!(
            Instant::now() < deadline,
            "never took a delivery under the set: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stale = grpc
        .deliver(stamped("f2", 2, 0))
        .await
        .expect_err("a stale generation was taken");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale}");
    publish(2, "shop-slave-1").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = grpc
            .deliver(stamped("f3", 2, 2))
            .await
            .expect_err("taken by a slave not in the set");
        if status.message().contains("not in the published slave set") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never refused as a non-member: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM: the slave drains and leaves the membership.
    running.slave.signal("-TERM")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lease(leases, "shop-slave-0").await?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the slave's Lease was not deleted within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.remove().await
}

#[tokio::test]
async fn a_memory_task_reaching_back_before_the_retention_is_refused_not_computed_partially()
-> anyhow::Result<()> {
    let running = Running::start(
        "slave-aged",
        json!({"kv": {"retentionSeconds": 60, "granularitySeconds": 60}}),
        json!({"compute": {"windowSeconds": 1}}),
        "aged-slave-0",
        &[],
    )
    .await?;
    let mut grpc = SlaveClient::new(ballast_worker::auth::channel(
        &running.address,
        ballast_worker::grpc::STORE_DEADLINE,
        &ballast_e2e::DATA_PLANE_TOKEN.parse()?,
    )?);

    // Events 58 s old: inside the 60 s retention on arrival, outside it seconds later.
    let then = Timestamp::now().as_millisecond() - 58_000;
    let events = vec![event("old-1", "m1", then, b"{}".to_vec())];
    let reply = grpc
        .deliver(EventBatch {
            events,
            epoch: 0,
            generation: 0,
        })
        .await?
        .into_inner();
    assert_eq!(reply.accepted, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !grpc
        .holdings(HoldingsRequest {})
        .await?
        .into_inner()
        .windows
        .is_empty()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the aged window was not dropped within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An hour-to-date task from before the drop would compute over what is
    // left, and replace the result computed while the span was whole.
    let status = grpc
        .compute(hour_from_memory(then, "aged-slave-0"))
        .await
        .expect_err("a span partly aged out must not be computed");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{}", status.message());
    assert!(
        status.message().contains("expired from memory"),
        "{}",
        status.message()
    );
    running.remove().await
}

#[tokio::test]
async fn a_window_heavier_than_the_compute_budget_fails_as_a_task_and_the_slave_keeps_its_events()
-> anyhow::Result<()> {
    // A 64 KiB budget for the SQL's operators, as half of a tiny pod's limit would give.
    let running = Running::start(
        "slave-heavy",
        json!({"kv": {"retentionSeconds": 3600}}),
        json!({}),
        "heavy-slave-0",
        &[("BALLAST_COMPUTE_MEMORY_BYTES", "65536")],
    )
    .await?;
    let mut grpc = SlaveClient::new(ballast_worker::auth::channel(
        &running.address,
        ballast_worker::grpc::STORE_DEADLINE,
        &ballast_e2e::DATA_PLANE_TOKEN.parse()?,
    )?);
    let now = Timestamp::now().as_millisecond();
    for chunk in 0..10 {
        let events: Vec<ChangeEvent> = (0..1_000)
            .map(|i| {
                let n = chunk * 1_000 + i;
                let order = json!({"id": n, "merchant_id": format!("m{}", n % 3_000), "amount": 10,
                    "user_id": format!("u{n}"), "item": format!("item{}", n % 97), "status": "paid"});
                event(
                    &format!("h{n}"),
                    &format!("m{}", n % 3_000),
                    now,
                    serde_json::to_vec(&order).unwrap_or_default(),
                )
            })
            .collect();
        grpc.deliver(EventBatch {
            events,
            epoch: 0,
            generation: 0,
        })
        .await?;
    }
    let status = grpc
        .compute(hour_from_memory(now, "heavy-slave-0"))
        .await
        .expect_err("a window over the budget must fail");
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(status.message().contains("memory budget"), "{}", status.message());
    // The process lives on with everything it held: the master retries elsewhere.
    let holdings = grpc.holdings(HoldingsRequest {}).await?.into_inner();
    assert_eq!(holdings.windows.iter().map(|w| w.events).sum::<u64>(), 10_000);
    running.remove().await
}

#[tokio::test]
async fn a_call_without_the_pipelines_token_is_refused_unauthenticated_and_counted() -> anyhow::Result<()> {
    let port = ballast_e2e::scenario::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let running = Running::start(
        "slaveauth",
        json!({}),
        json!({}),
        "shop-slave-0",
        &[("BALLAST_METRICS_ADDR", metrics.as_str())],
    )
    .await?;
    let deadline = ballast_worker::grpc::STORE_DEADLINE;
    let batch = || EventBatch {
        events: vec![event(
            "e1",
            "m1",
            Timestamp::now().as_millisecond(),
            b"{}".to_vec(),
        )],
        epoch: 0,
        generation: 0,
    };
    // No token, then another pipeline's token: refused before the handler runs.
    let mut bare = SlaveClient::new(ballast_worker::grpc::channel(&running.address, deadline)?);
    let other: ballast_worker::auth::Token = "another-pipelines-token".parse()?;
    let mut wrong = SlaveClient::new(ballast_worker::auth::channel(&running.address, deadline, &other)?);
    for (who, refused) in [
        ("no token", bare.deliver(batch()).await),
        ("a wrong token", wrong.deliver(batch()).await),
    ] {
        let status = refused.err().ok_or_else(|| anyhow::anyhow!("{who}: served"))?;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{who}: {status:?}");
        assert!(status.message().contains("data-plane token"), "{who}: {status:?}");
    }
    let counted =
        ballast_e2e::scenario::metric(port, "ballast_data_plane_unauthenticated_calls_total").await?;
    assert_eq!(counted, Some(2.0));
    // The pipeline's token: served (whatever the slave then says of the batch).
    let token: ballast_worker::auth::Token = ballast_e2e::DATA_PLANE_TOKEN.parse()?;
    let mut authed = SlaveClient::new(ballast_worker::auth::channel(&running.address, deadline, &token)?);
    let answered = authed.deliver(batch()).await;
    assert!(
        answered
            .as_ref()
            .err()
            .is_none_or(|s| s.code() != tonic::Code::Unauthenticated),
        "{answered:?}"
    );
    running.remove().await
}
