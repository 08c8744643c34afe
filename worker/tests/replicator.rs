//! The replicator against the real Kafka and Elasticsearch: the standby data
//! centre's cluster and the marketing cluster get every change record; a
//! replicator stopped and started again applies exactly what it missed; a
//! cluster that stops answering falls behind, its lag counted in records and
//! seconds while the other stays current, and catches up when it answers again.

use std::time::Duration;

use anyhow::Context;
use ballast_crds::MemberStore;
use ballast_e2e::scenario::{self, eventually, metric};
use ballast_e2e::{Stack, stack_script};
use ballast_worker::members::model::Member;
use ballast_worker::members::search::MemberIndex;
use ballast_worker::members::stream::{ChangeStream, Path, Record};
use ballast_worker::roles::{Deps, replicator};
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(2);

/// A running replicator: its metrics port, stopped (and drained) on `stop`.
struct Running {
    port: u16,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), replicator::Error>>,
}

impl Running {
    async fn start(client: &kube::Client, namespace: &str, store: &str) -> anyhow::Result<Self> {
        let port = scenario::free_port()?;
        let config = replicator::Config {
            namespace: namespace.to_owned(),
            store: store.to_owned(),
            metrics: format!("127.0.0.1:{port}").parse()?,
            deadline: DEADLINE,
            drain: Duration::from_secs(5),
            es_credentials: None,
        };
        let shutdown = CancellationToken::new();
        let deps = Deps {
            client: client.clone(),
        };
        let task = tokio::spawn(replicator::run(config, deps, shutdown.clone()));
        scenario::until_ready(port, 30).await?;
        Ok(Self { port, shutdown, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }

    async fn series(&self, name: &str, target: &str) -> anyhow::Result<f64> {
        let series = format!("ballast_replicator_{name}{{target=\"{target}\"}}");
        Ok(metric(self.port, &series).await?.unwrap_or(0.0))
    }
}

fn member(id: u64, version: u64) -> Member {
    Member {
        id,
        name: format!("member {id}"),
        level: format!("level {version}"),
        identities: Default::default(),
        version,
        updated_ms: 1_700_000_000_000 + i64::try_from(version).unwrap_or(0),
    }
}

async fn publish(stream: &ChangeStream, members: impl IntoIterator<Item = Member>) -> anyhow::Result<()> {
    for member in members {
        stream
            .publish(&Record {
                path: Path::Mysql,
                member,
                epoch: 0,
            })
            .await?;
    }
    Ok(())
}

/// Waits until `index` holds every member of `want` at its version.
async fn holds(index: &MemberIndex, want: &[Member], secs: u64) -> anyhow::Result<()> {
    eventually(
        &format!("{} holds {} members", index.index(), want.len()),
        secs,
        || async {
            for m in want {
                if index.get(m.id).await?.as_ref() != Some(m) {
                    return Ok::<_, ballast_worker::es::EsError>(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_replicator_keeps_the_standby_and_marketing_clusters_and_replays_only_what_they_missed()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let namespace = ballast_e2e::pipeline_namespace(&client, "replicator").await?;
    let name = format!("replicated-{}", ballast_e2e::run_id());
    let store: MemberStore = serde_json::from_value(stack.member_store(&name, "unused")?)?;
    Api::<MemberStore>::namespaced(client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::apply("replicator-test").force(),
            &Patch::Apply(&store),
        )
        .await?;
    let _restore = scenario::RestoreStack;

    // The clusters it keeps: dc-b (dc-a, the primary, is active) and marketing.
    let index = |var: &str| -> anyhow::Result<MemberIndex> {
        let es = ballast_worker::connect::elasticsearch(&stack.get(var)?, None)?;
        Ok(MemberIndex::new(es, &namespace, &name, DEADLINE))
    };
    let standby = index("BALLAST_ES_DC_B_URL")?;
    let marketing = index("BALLAST_ES_COLD_URL")?;
    let active = index("BALLAST_ES_DC_A_URL")?;
    ChangeStream::ensure_topic(&store.spec.change_stream, DEADLINE * 5).await?;
    let stream = ChangeStream::new(&store.spec.change_stream, DEADLINE)?;

    // 1. Every record reaches both kept clusters, and nothing reaches the active one.
    let first: Vec<Member> = (1..=100).map(|id| member(id, 1)).collect();
    publish(&stream, first.clone()).await?;
    let running = Running::start(&client, &namespace, &name).await?;
    holds(&standby, &first, 60).await?;
    holds(&marketing, &first, 60).await?;
    assert_eq!(
        active.get(1).await.ok().flatten(),
        None,
        "the active cluster is written by the services"
    );
    for target in ["dc-b", "marketing"] {
        assert_eq!(running.series("applied_total", target).await?, 100.0, "{target}");
    }
    running.stop().await?;

    // 2. Stopped, it misses 50 updates and 20 new members; started again, it
    // applies those 70 and nothing it had applied before.
    let second: Vec<Member> = (51..=100)
        .map(|id| member(id, 2))
        .chain((101..=120).map(|id| member(id, 1)))
        .collect();
    publish(&stream, second.clone()).await?;
    let running = Running::start(&client, &namespace, &name).await?;
    let mut now: Vec<Member> = first[..50].to_vec();
    now.extend(second.iter().cloned());
    holds(&standby, &now, 60).await?;
    holds(&marketing, &now, 60).await?;
    for target in ["dc-b", "marketing"] {
        eventually(&format!("{target} caught up"), 30, || async {
            let lag = running.series("lag_events", target).await?;
            Ok::<_, anyhow::Error>((lag == 0.0).then_some(()))
        })
        .await?;
        assert_eq!(
            running.series("applied_total", target).await?,
            70.0,
            "{target} replays exactly what it missed"
        );
    }

    // 3. The standby's cluster stops answering: it falls behind, counted in
    // records and seconds; marketing stays current. Back, it catches up.
    stack_script(&["pause", "es-dc-b"])?;
    let third: Vec<Member> = (121..=150).map(|id| member(id, 1)).collect();
    publish(&stream, third.clone()).await?;
    holds(&marketing, &third, 60).await?;
    eventually(
        "dc-b behind by the 30 records (or 29 with one in flight) for over 2 s, its attempts failing",
        30,
        || async {
            let events = running.series("lag_events", "dc-b").await?;
            let seconds = running.series("lag_seconds", "dc-b").await?;
            let failed = running.series("apply_failures_total", "dc-b").await?;
            Ok::<_, anyhow::Error>((events >= 29.0 && seconds >= 2.0 && failed >= 1.0).then_some(()))
        },
    )
    .await?;
    assert_eq!(running.series("lag_events", "marketing").await?, 0.0);
    stack_script(&["resume", "es-dc-b"])?;
    holds(&standby, &third, 60).await?;
    eventually("dc-b caught up", 30, || async {
        let events = running.series("lag_events", "dc-b").await?;
        let seconds = running.series("lag_seconds", "dc-b").await?;
        Ok::<_, anyhow::Error>((events == 0.0 && seconds == 0.0).then_some(()))
    })
    .await?;
    running.stop().await.context("stopping the replicator")?;
    Ok(())
}
