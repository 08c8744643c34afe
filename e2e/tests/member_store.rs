//! The operator's MemberStore controller against the real API server, Kafka
//! and Elasticsearch: it publishes how far each kept cluster is behind the
//! change stream, measured from the replicator's consumer groups, and whether
//! the standby is within the promotion's lag budget: in sync with nothing to
//! replicate, over budget (by count and by age) while no replicator runs,
//! in sync again once one has caught up.

use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::member_store::Replica;
use ballast_e2e::Stack;
use ballast_e2e::scenario::{self, eventually};
use ballast_worker::members::model::Member;
use ballast_worker::members::stream::{ChangeStream, Path, Record};
use ballast_worker::roles::{Deps, replicator};
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(2);

/// The `StandbyInSync` condition's status and reason, and the replication, as published.
async fn published(
    api: &Api<MemberStore>,
    name: &str,
) -> kube::Result<(Option<(String, String)>, Vec<Replica>)> {
    let status = api.get(name).await?.status.unwrap_or_default();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == ballast_crds::conditions::STANDBY_IN_SYNC)
        .map(|c| (c.status.clone(), c.reason.clone()));
    Ok((condition, status.replication))
}

fn lag_of(replication: &[Replica], cluster: &str) -> Option<(i64, f64)> {
    replication
        .iter()
        .find(|r| r.cluster == cluster)
        .map(|r| (r.lag_events, r.lag_seconds))
}

/// Waits until both kept clusters are published at lag 0 and the standby in sync.
async fn until_in_sync(api: &Api<MemberStore>, name: &str, what: &str) -> anyhow::Result<()> {
    eventually(what, 60, || async {
        let (condition, replication) = published(api, name).await?;
        let zero = ["dc-b", "marketing"]
            .iter()
            .all(|c| lag_of(&replication, c) == Some((0, 0.0)));
        let in_sync = condition == Some(("True".into(), "WithinBudget".into()));
        Ok::<_, kube::Error>((zero && in_sync).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_operator_publishes_each_standby_s_lag_and_whether_a_promotion_would_lose_writes()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "member-lag").await?;
    let name = format!("lagging-{}", std::process::id());
    let mut store = stack.member_store(&name, "unused")?;
    store["spec"]["promotion"] = serde_json::json!({"maxLagEvents": 10, "maxLagSeconds": 3});
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply("member-lag-test").force(),
        &Patch::Apply(&store),
    )
    .await?;
    let spec: MemberStore = serde_json::from_value(store)?;
    ChangeStream::ensure_topic(&spec.spec.change_stream, DEADLINE * 5).await?;
    let _operator = stack
        .operator(&ballast_e2e::binary("ballast-operator")?, &ns)
        .await?;

    // 1. Nothing to replicate: both kept clusters at lag 0, the standby in sync.
    until_in_sync(&api, &name, "dc-b and marketing at lag 0, StandbyInSync").await?;

    // 2. 20 records and no replicator: both lag 20, and growing older; over the
    // budget of 10 records, then of 3 s too. Marketing's lag is published but
    // never makes the standby out of sync.
    let stream = ChangeStream::new(&spec.spec.change_stream, DEADLINE)?;
    for id in 1..=20 {
        let member = Member {
            id,
            name: format!("member {id}"),
            level: "gold".into(),
            identities: Default::default(),
            version: 1,
            updated_ms: 1_700_000_000_000,
        };
        stream
            .publish(&Record {
                path: Path::Mysql,
                member,
            })
            .await?;
    }
    eventually(
        "dc-b 20 records and over 3 s behind, LagOverBudget",
        60,
        || async {
            let (condition, replication) = published(&api, &name).await?;
            let behind =
                lag_of(&replication, "dc-b").is_some_and(|(events, secs)| events == 20 && secs > 3.0);
            let marketing = lag_of(&replication, "marketing").is_some_and(|(events, _)| events == 20);
            let over = condition == Some(("False".into(), "LagOverBudget".into()));
            Ok::<_, kube::Error>((behind && marketing && over).then_some(()))
        },
    )
    .await?;

    // 3. A replicator catches both up: in sync again.
    let port = scenario::free_port()?;
    let shutdown = CancellationToken::new();
    let config = replicator::Config {
        namespace: ns.clone(),
        store: name.clone(),
        metrics: format!("127.0.0.1:{port}").parse()?,
        deadline: DEADLINE,
        drain: Duration::from_secs(5),
        es_credentials: None,
    };
    let running = tokio::spawn(replicator::run(
        config,
        Deps {
            client: client.clone(),
        },
        shutdown.clone(),
    ));
    until_in_sync(&api, &name, "dc-b and marketing caught up, StandbyInSync again").await?;
    shutdown.cancel();
    running.await??;
    Ok(())
}
