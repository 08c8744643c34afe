//! `make bench`: promotion and failback of the member Elasticsearch, with the
//! operator, a replicator and a member process in each data centre running
//! for real against the stack's servers.
//! - Promotion: DC A's Elasticsearch freezes (a hung cluster: its probes time
//!   out); the time until both member processes have written through DC B,
//!   median and worst of 10, beside the detection window the policy sets
//!   (probe period × lost probes, plus the probe's timeout), which no
//!   promotion can beat. Each round thaws DC A and waits for the failback.
//! - Failback replay: the records DC A missed while frozen, applied by the
//!   replicator once it thaws (records per second), beside a raw bulk of the
//!   same documents into a scratch index of the same cluster.

use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_crds::MemberStore;
use ballast_e2e::scenario::{RestoreStack, Thaw, metric, until_ready};
use ballast_e2e::{Stack, stack_script};
use ballast_worker::members::model::Member;
use ballast_worker::members::search::document;
use ballast_worker::members::stream::{ChangeStream, Path, Record};
use ballast_worker::roles::{Deps, replicator};
use ballast_worker::wire::RegisterRequest;
use ballast_worker::wire::members_client::MembersClient;
use elasticsearch::{BulkOperation, BulkParts};
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const ROUNDS: usize = 10;
/// The policy's probe: a period of 1 s, 2 lost probes, a 1 s timeout.
const PERIOD_S: u64 = 1;
const LOST: u64 = 2;
const TIMEOUT_S: u64 = 1;
/// Records DC A misses while frozen, for the replay.
const MISSED: u64 = 5_000;
const DEADLINE: Duration = Duration::from_secs(2);
/// Longest any step may take before the bench gives up.
const STEP: Duration = Duration::from_secs(120);

fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A caller of one member process.
struct Caller(MembersClient<Channel>);

impl Caller {
    async fn connect(port: u16) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(Self(MembersClient::new(channel)))
    }

    /// One registration; whether it was acknowledged.
    async fn writes(&self) -> bool {
        let mut request = tonic::Request::new(RegisterRequest {
            name: "bench".into(),
            level: "silver".into(),
            identities: Vec::new(),
        });
        let metadata = request.metadata_mut();
        metadata.insert(
            "x-ballast-caller",
            tonic::metadata::MetadataValue::from_static("bench"),
        );
        metadata.insert(
            "x-ballast-caller-class",
            tonic::metadata::MetadataValue::from_static("order-flow"),
        );
        self.0.clone().register(request).await.is_ok()
    }

    /// Retries until a registration is acknowledged.
    async fn until_written(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.writes().await {
            anyhow::ensure!(started.elapsed() < STEP, "no write acknowledged within {STEP:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Polls until `dc` is the published active data centre.
async fn until_active(api: &Api<MemberStore>, name: &str, dc: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if api.get(name).await?.active_data_center() == dc {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < STEP, "{dc} not active within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn member(id: u64) -> Member {
    Member {
        id,
        name: format!("replayed {id}"),
        level: "silver".into(),
        identities: Default::default(),
        version: 1,
        updated_ms: 1_700_000_000_000,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let namespace = ballast_e2e::pipeline_namespace(&client, "bench-promotion").await?;
    let name = format!("promo{}", ballast_e2e::run_id());
    let home = format!("m_{name}");
    stack.member_home(&home).await?;
    let mut store = stack.member_store(&name, &home)?;
    store["spec"]["flowControl"] = serde_json::json!({
        "globalRatePerSecond": 100_000, "hotKeyRatePerSecond": 100_000,
    });
    store["spec"]["promotion"] = serde_json::json!({
        "probe": {"periodSeconds": PERIOD_S, "timeoutSeconds": TIMEOUT_S,
                  "failureThreshold": LOST, "successThreshold": 1},
        "failbackDwellSeconds": 1,
    });
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &namespace);
    api.patch(
        &name,
        &PatchParams::apply("ballast-bench").force(),
        &Patch::Apply(&store),
    )
    .await?;
    let spec: MemberStore = serde_json::from_value(store)?;

    let _restore = RestoreStack;
    let _operator = stack
        .operator(&ballast_e2e::binary("ballast-operator")?, &namespace)
        .await?;
    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
    let a = stack.member(worker, &namespace, &name, "dc-a", &[])?;
    let b = stack.member(worker, &namespace, &name, "dc-b", &[])?;
    until_ready(a.metrics, 120).await?;
    until_ready(b.metrics, 120).await?;
    let metrics_port = ballast_e2e::scenario::free_port()?;
    let shutdown = CancellationToken::new();
    let replicating = tokio::spawn(replicator::run(
        replicator::Config {
            namespace: namespace.clone(),
            store: name.clone(),
            metrics: format!("127.0.0.1:{metrics_port}").parse()?,
            deadline: DEADLINE,
            drain: Duration::from_secs(5),
            es_credentials: None,
        },
        Deps {
            client: client.clone(),
        },
        shutdown.clone(),
    ));
    let callers = [Caller::connect(a.grpc).await?, Caller::connect(b.grpc).await?];

    // Promotion, ROUNDS times.
    let (mut promotions, mut switches) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        until_active(&api, &name, "dc-a").await?;
        for caller in &callers {
            caller.until_written().await?;
        }
        // Timed from pause's return: it sends SIGSTOP after checking the port's
        // holder (about 80 ms of shell) and returns once every thread has
        // stopped (a few ms), so this undercounts by those few ms instead of
        // overcounting by the shell's start.
        stack_script(&["pause", "es-dc-a"])?;
        let frozen = Instant::now();
        let thaw = Thaw("es-dc-a");
        until_active(&api, &name, "dc-b").await?;
        let published = frozen.elapsed();
        let (wrote_a, wrote_b) = tokio::join!(callers[0].until_written(), callers[1].until_written());
        wrote_a.context("DC A's process")?;
        wrote_b.context("DC B's process")?;
        let written = frozen.elapsed();
        println!(
            "  round {round}: published {:.2} s, both writing on DC B {:.2} s after the freeze",
            published.as_secs_f64(),
            written.as_secs_f64()
        );
        promotions.push(written.as_secs_f64());
        switches.push((written - published).as_secs_f64());
        drop(thaw);
    }
    until_active(&api, &name, "dc-a").await?;

    // The failback replay: DC A frozen again, MISSED records published
    // (straight onto the stream, as the services would), then thawed.
    let lag = format!("ballast_replicator_lag_events{{target=\"{}\"}}", "dc-a");
    stack_script(&["pause", "es-dc-a"])?;
    let thaw = Thaw("es-dc-a");
    until_active(&api, &name, "dc-b").await?;
    let stream = ChangeStream::new(&spec.spec.change_stream, DEADLINE)?;
    let base = 1_000_000_000 + u64::from(ballast_e2e::run_id()) * 10_000;
    let members: Vec<Member> = (0..MISSED).map(|i| member(base + i)).collect();
    let epoch = api.get(&name).await?.epoch();
    for m in &members {
        stream
            .publish(&Record {
                path: Path::Mysql,
                member: m.clone(),
                epoch,
            })
            .await?;
    }
    let started = Instant::now();
    loop {
        let behind = metric(metrics_port, &lag).await?.unwrap_or(f64::MAX);
        if behind >= MISSED as f64 * 0.99 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < STEP,
            "the replicator never saw DC A {MISSED} behind (at {behind})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(thaw);
    let thawed = Instant::now();
    loop {
        if metric(metrics_port, &lag).await? == Some(0.0) {
            break;
        }
        anyhow::ensure!(thawed.elapsed() < STEP * 5, "DC A did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replay = thawed.elapsed().as_secs_f64();

    // The raw bulk of the same documents into the same cluster.
    let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_DC_A_URL")?, None)?;
    let scratch = format!("bench-raw-{}", ballast_e2e::run_id());
    let raw_started = Instant::now();
    for chunk in members.chunks(500) {
        let ops: Vec<BulkOperation<serde_json::Value>> = chunk
            .iter()
            .map(|m| BulkOperation::index(document(m)).id(m.id.to_string()).into())
            .collect();
        let response = es.bulk(BulkParts::Index(&scratch)).body(ops).send().await?;
        let answer: serde_json::Value = response.json().await?;
        anyhow::ensure!(answer["errors"] == false, "raw bulk refused");
    }
    let raw = raw_started.elapsed().as_secs_f64();
    let _ = es
        .indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[&scratch]))
        .send()
        .await;

    shutdown.cancel();
    replicating.await??;
    let window = (PERIOD_S * LOST + TIMEOUT_S) as f64;
    let worst = promotions.iter().copied().fold(0.0, f64::max);
    let med = median(&promotions);
    println!(
        "promotion of the member Elasticsearch (freeze of DC A to both DCs writing on DC B), {ROUNDS} rounds:"
    );
    println!("  median {med:.2} s, worst {worst:.2} s");
    println!(
        "  the detection window ends {window:.0} s after the freeze (period {PERIOD_S} s × {LOST} lost, + {TIMEOUT_S} s timeout); beyond it: median {:+.2} s, worst {:+.2} s",
        med - window,
        worst - window
    );
    println!(
        "  from the publication to both writing on DC B: median {:.3} s, worst {:.3} s",
        median(&switches),
        switches.iter().copied().fold(0.0, f64::max)
    );
    let replayed = MISSED as f64 / replay;
    let bulk = MISSED as f64 / raw;
    println!("failback replay of {MISSED} records into DC A:");
    println!("  replicator {replayed:>9.0} records/s ({replay:.2} s)");
    println!("  raw bulk   {bulk:>9.0} documents/s ({raw:.2} s)");
    println!("  ratio {:.2} of raw", replayed / bulk);
    Ok(())
}
