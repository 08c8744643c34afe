//! The operator's MemberStore controller against the real API server, Kafka
//! and Elasticsearch. It publishes how far each kept cluster is behind the
//! change stream, measured from the replicator's consumer groups, and whether
//! the standby is within the promotion's lag budget: in sync with nothing to
//! replicate, over budget (by count and by age) while no replicator runs, in
//! sync again once one has caught up. And it decides the active data centre:
//! no promotion over the budget, a promotion when a person names the standby,
//! a returning DC A whose replay applies nothing called stalled,
//! the failback once DC A has replayed what it missed and the dwell passed,
//! and a promotion by itself when the standby is in step; with two replicas,
//! a leader killed while the promotion is under way, and the other one
//! making it, once.

use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::member_store::Replica;
use ballast_e2e::Stack;
use ballast_e2e::scenario::{self, eventually};
use ballast_worker::members::search;
use ballast_worker::members::stream::ChangeStream;
use ballast_worker::roles::{Deps, replicator};
use elasticsearch::Elasticsearch;
use elasticsearch::http::transport::Transport;
use elasticsearch::indices::{IndicesCreateParts, IndicesPutSettingsParts};
use kube::api::{Api, ListParams, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

#[path = "shared/changes.rs"]
mod changes;
use changes::publish;

const DEADLINE: Duration = Duration::from_secs(2);

/// The scenarios stop the stack's DC A Elasticsearch, which every operator
/// under test probes: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

type Replicating = tokio::task::JoinHandle<Result<(), replicator::Error>>;

/// Runs a replicator of MemberStore `name` in `ns` until the returned token is cancelled.
fn start_replicator(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<(CancellationToken, Replicating)> {
    let port = scenario::free_port()?;
    let shutdown = CancellationToken::new();
    let config = replicator::Config {
        namespace: ns.to_owned(),
        store: name.to_owned(),
        metrics: format!("127.0.0.1:{port}").parse()?,
        deadline: DEADLINE,
        drain: Duration::from_secs(5),
        es_credentials: None,
    };
    let deps = Deps {
        client: client.clone(),
    };
    Ok((
        shutdown.clone(),
        tokio::spawn(replicator::run(config, deps, shutdown)),
    ))
}

/// A MemberStore `<prefix>-<pid>` over the stack's member servers with `promotion`,
/// in a fresh namespace, with its change stream's topic made; (namespace, name, store).
async fn fixture(
    stack: &Stack,
    client: &kube::Client,
    prefix: &str,
    promotion: serde_json::Value,
) -> anyhow::Result<(String, String, MemberStore)> {
    ballast_e2e::install_crds(client).await?;
    let ns = ballast_e2e::pipeline_namespace(client, prefix).await?;
    let name = format!("{prefix}-{}", ballast_e2e::run_id());
    let home = format!("m_{}", name.replace('-', "_"));
    stack.member_home(&home).await?;
    let mut store = stack.member_store(&name, &home)?;
    store["spec"]["promotion"] = promotion;
    Api::<MemberStore>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::apply("member-store-test").force(),
            &Patch::Apply(&store),
        )
        .await?;
    let store: MemberStore = serde_json::from_value(store)?;
    ChangeStream::ensure_topic(&store.spec.change_stream, DEADLINE * 5).await?;
    Ok((ns, name, store))
}

#[tokio::test]
async fn the_operator_publishes_each_standby_s_lag_and_whether_a_promotion_would_lose_writes()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let budget = serde_json::json!({"maxLagEvents": 10, "maxLagSeconds": 3});
    let (ns, name, store) = fixture(&stack, &client, "member-lag", budget).await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &ns);
    let _operator = stack
        .operator(&ballast_e2e::binary("ballast-operator")?, &ns)
        .await?;

    // 1. Nothing to replicate: both kept clusters at lag 0, the standby in sync.
    until_in_sync(&api, &name, "dc-b and marketing at lag 0, StandbyInSync").await?;

    // 2. 20 records and no replicator: both lag 20, and growing older; over the
    // budget of 10 records, then of 3 s too. Marketing's lag is published but
    // never makes the standby out of sync.
    let stream = ChangeStream::new(&store.spec.change_stream, DEADLINE)?;
    publish(&stream, 20).await?;
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
    let (shutdown, running) = start_replicator(&client, &ns, &name)?;
    until_in_sync(&api, &name, "dc-b and marketing caught up, StandbyInSync again").await?;
    shutdown.cancel();
    running.await??;
    Ok(())
}

/// The active data centre, the epoch and the `ActiveAvailable` reason, as published.
async fn active(api: &Api<MemberStore>, name: &str) -> kube::Result<(String, i64, String)> {
    let ms = api.get(name).await?;
    let status = ms.status.clone().unwrap_or_default();
    let reason = status
        .conditions
        .iter()
        .find(|c| c.type_ == ballast_crds::conditions::ACTIVE_AVAILABLE)
        .map(|c| c.reason.clone())
        .unwrap_or_default();
    Ok((ms.active_data_center().to_owned(), status.epoch, reason))
}

/// Waits until `want.0` is active at epoch `want.1` and an Event of the store
/// has reason `want.2` (a promotion's reason is an Event; the condition says
/// what holds after it).
async fn until_active(
    client: &kube::Client,
    api: &Api<MemberStore>,
    name: &str,
    want: (&str, i64, &str),
    secs: u64,
) -> anyhow::Result<()> {
    let what = format!("{} active at epoch {} ({})", want.0, want.1, want.2);
    let ns = api.get(name).await?.metadata.namespace.unwrap_or_default();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually(&what, secs, || async {
        let (dc, epoch, _) = active(api, name).await?;
        let told =
            events.list(&ListParams::default()).await?.items.iter().any(|e| {
                e.reason.as_deref() == Some(want.2) && e.involved_object.name.as_deref() == Some(name)
            });
        Ok::<_, kube::Error>((dc == want.0 && epoch == want.1 && told).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_operator_promotes_the_standby_only_within_the_lag_budget_or_when_named_and_fails_back()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let promotion = serde_json::json!({
        "maxLagEvents": 10, "maxLagSeconds": 600, "failbackDwellSeconds": 3,
        "probe": {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2},
    });
    let (ns, name, store) = fixture(&stack, &client, "member-promote", promotion).await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &ns);
    let _operator = stack
        .operator(&ballast_e2e::binary("ballast-operator")?, &ns)
        .await?;
    let _restore = scenario::RestoreStack;
    eventually("dc-a active and answering", 60, || async {
        let now = active(&api, &name).await?;
        Ok::<_, kube::Error>((now == ("dc-a".into(), 0, "Answering".into())).then_some(()))
    })
    .await?;

    // 1. 20 records the standby lacks (no replicator), then DC A's cluster stops:
    // no promotion; the condition and an Event say why and how to force it.
    let stream = ChangeStream::new(&store.spec.change_stream, DEADLINE)?;
    publish(&stream, 20).await?;
    ballast_e2e::stack_script(&["stop", "es-dc-a"])?;
    until_active(&client, &api, &name, ("dc-a", 0, "LagOverBudget"), 60).await?;

    // 2. A person names DC B: promoted whatever it lacks, epoch 1.
    let named = serde_json::json!({"metadata": {"annotations": {"ballast.dev/promote": "dc-b"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&named))
        .await?;
    until_active(&client, &api, &name, ("dc-b", 1, "PromotedByPerson"), 30).await?;
    let unnamed = serde_json::json!({"metadata": {"annotations": {"ballast.dev/promote": null}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&unnamed))
        .await?;
    // Demoted, DC A is measured as a kept cluster: no replicator has applied
    // anything to it (the 20 went straight onto the stream), so it lacks them all.
    eventually("dc-a measured lacking the 20 records", 30, || async {
        let (_, replication) = published(&api, &name).await?;
        let dc_a = replication.iter().find(|r| r.cluster == "dc-a");
        Ok::<_, kube::Error>(dc_a.filter(|r| r.lag_events == 20).map(|_| ()))
    })
    .await?;

    // 3. DC A returns with its member index refusing writes: the replicator,
    // which now keeps it, applies nothing, and once that has lasted the stall
    // limit the condition and an Event say so and what to look at.
    ballast_e2e::stack_script(&["up"])?;
    let dc_a = Elasticsearch::new(Transport::single_node(&stack.get("BALLAST_ES_DC_A_URL")?)?);
    let index = search::index_name(&ns, &name);
    let mut body = search::template()["template"].clone();
    body["settings"]["index.blocks.write"] = true.into();
    let created = dc_a
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(
        created.status_code().is_success(),
        "creating {index} on dc-a: {}",
        created.text().await?
    );
    let (shutdown, running) = start_replicator(&client, &ns, &name)?;
    until_active(&client, &api, &name, ("dc-b", 1, "ReplayStalled"), 120).await?;

    // 4. The block lifted, it replays what it missed; after the dwell it is
    // active again, epoch 2.
    let lifted = dc_a
        .indices()
        .put_settings(IndicesPutSettingsParts::Index(&[&index]))
        .body(serde_json::json!({"index.blocks.write": null}))
        .send()
        .await?;
    anyhow::ensure!(
        lifted.status_code().is_success(),
        "lifting the block: {}",
        lifted.text().await?
    );
    until_active(&client, &api, &name, ("dc-a", 2, "FailedBack"), 120).await?;

    // 5. With the standby in step, losing DC A promotes DC B by itself.
    until_in_sync(&api, &name, "dc-b and marketing caught up").await?;
    let lost = std::time::Instant::now();
    ballast_e2e::stack_script(&["stop", "es-dc-a"])?;
    until_active(&client, &api, &name, ("dc-b", 3, "Promoted"), 60).await?;
    println!(
        "promoted {:.1?} after DC A's Elasticsearch stopped",
        lost.elapsed()
    );
    shutdown.cancel();
    running.await??;
    Ok(())
}

#[tokio::test]
async fn a_promotion_whose_leader_is_killed_midway_is_made_once_by_the_other_replica() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    // Four lost probes (4 s) find DC A down: the leader is killed before that.
    let promotion = serde_json::json!({
        "probe": {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 4, "successThreshold": 2},
    });
    let (ns, name, _store) = fixture(&stack, &client, "member-kill", promotion).await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &ns);
    let binary = ballast_e2e::binary("ballast-operator")?;
    let mut replicas = [
        stack.operator(&binary, &ns).await?,
        stack.operator_as(&binary, &ns, "127.0.0.1:0", ballast_e2e::OPERATOR_USER)?,
    ];
    let _restore = scenario::RestoreStack;
    eventually("dc-a active and answering", 60, || async {
        let now = active(&api, &name).await?;
        Ok::<_, kube::Error>((now == ("dc-a".into(), 0, "Answering".into())).then_some(()))
    })
    .await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        let lease = leases.get("ballast-operator").await?;
        Ok::<_, kube::Error>(lease.spec.and_then(|s| s.holder_identity).unwrap_or_default())
    };
    let leader = holder().await?;
    let at = replicas
        .iter()
        .position(|r| leader == format!("ballast-operator-{}", r.0.id()))
        .ok_or_else(|| anyhow::anyhow!("the Lease is held by {leader:?}, neither replica"))?;

    // Every epoch and active data centre published from here on, in order.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, String)>::new()));
    let watching = {
        let (api, name, seen) = (api.clone(), name.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(ms) = api.get(&name).await {
                    let now = (ms.epoch(), ms.active_data_center().to_owned());
                    let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // DC A's cluster stops; the leader, probing it, is killed before it can
    // have found it down.
    ballast_e2e::stack_script(&["stop", "es-dc-a"])?;
    let before = active(&api, &name).await?;
    replicas[at].0.kill()?;
    replicas[at].0.wait()?;
    anyhow::ensure!(
        before.1 == 0,
        "the leader promoted before it was killed: {before:?}"
    );
    let killed = std::time::Instant::now();

    // The other replica takes the Lease once it lapses and makes the promotion, once.
    until_active(&client, &api, &name, ("dc-b", 1, "Promoted"), 60).await?;
    let survivor = format!("ballast-operator-{}", replicas[1 - at].0.id());
    assert_eq!(
        holder().await?,
        survivor,
        "the promotion was made by the other replica"
    );
    println!(
        "promoted by the other replica {:.1?} after the leader was killed",
        killed.elapsed()
    );
    // It stays made: a later reconcile (it measured the lag again since) published no other epoch.
    eventually("a reconcile after the promotion", 30, || async {
        let status = api.get(&name).await?.status.unwrap_or_default();
        let since = status.since.map(|t| t.0);
        let later = status.replication.iter().any(|r| Some(r.measured_at.0) > since);
        Ok::<_, kube::Error>(later.then_some(()))
    })
    .await?;
    watching.abort();
    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(
        seen,
        vec![(0, "dc-a".to_owned()), (1, "dc-b".to_owned())],
        "the epochs published, in order"
    );
    Ok(())
}
