//! A promotion moves the member services and the failback brings them back:
//! with the operator deciding, a replicator keeping the other clusters, and
//! writes and lookups running through both data centres' member processes,
//! DC A's Elasticsearch stops; the operator promotes DC B, and both
//! processes write and read there within seconds, without a restart. What
//! was written before is there too (the replicator had applied it). Started
//! again, DC A's cluster replays what it missed and is active again after
//! the dwell, and every acknowledged write is on both sides, identical.

use std::time::{Duration, Instant};

use anyhow::ensure;

use ballast_crds::MemberStore;
use ballast_e2e::scenario::{self, eventually};
use ballast_worker::members::search::MemberIndex;
use kube::api::{Api, Patch, PatchParams};

use crate::ONE_AT_A_TIME;
use crate::support::{Fixture, card, id_of};
use crate::traffic::Running;

#[tokio::test]
async fn a_promotion_moves_both_data_centres_to_the_standby_and_the_failback_brings_them_back_losing_nothing()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-promote").await?;
    let client = f.stack.kube_client().await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &f.namespace);
    let dwell = serde_json::json!({"spec": {"promotion": {"failbackDwellSeconds": 3}}});
    api.patch(&f.name, &PatchParams::default(), &Patch::Merge(&dwell))
        .await?;
    let _operator = f.operate().await?;
    let (shutdown, replicating) = f.replicate().await?;
    let _restore = scenario::RestoreStack;

    // Before: written through DC A, replicated to DC B.
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let before = id_of(&a.register("甲", vec![card(101)]).await?);
    let es = |var: &str| -> anyhow::Result<MemberIndex> {
        let es = ballast_worker::connect::elasticsearch(&f.stack.get(var)?, None)?;
        Ok(MemberIndex::new(
            es,
            &f.namespace,
            &f.name,
            Duration::from_secs(2),
        ))
    };
    let standby = es("BALLAST_ES_DC_B_URL")?;
    let id: u64 = before.parse()?;
    eventually("the first member replicated to DC B", 60, || async {
        Ok::<_, ballast_worker::es::EsError>(standby.get(id).await?.map(|_| ()))
    })
    .await?;

    // Writes and lookups run through both data centres from here on.
    let traffic = Running::start(a.clone(), b.clone());
    traffic
        .until_acked("writes under way", Instant::now(), 20, 30)
        .await?;
    let epoch = api.get(&f.name).await?.epoch();

    // DC A's cluster stops: DC B is promoted, and both processes write there.
    // Timed from the stop's start: Elasticsearch stops answering during its shutdown.
    let lost = Instant::now();
    ballast_e2e::stack_script(&["stop", "es-dc-a"])?;
    eventually("DC B active", 60, || async {
        let ms = api.get(&f.name).await?;
        Ok::<_, kube::Error>((ms.active_data_center() == "dc-b").then_some(()))
    })
    .await?;
    let promoted = lost.elapsed();
    let mut written = Vec::new();
    for (n, caller) in [(102, &a), (103, &b)] {
        let reply = eventually("a write through the promoted cluster", 30, || async {
            Ok::<_, tonic::Status>(caller.register("乙", vec![card(n)]).await.ok())
        })
        .await?;
        written.push(id_of(&reply).parse::<u64>()?);
    }
    let moved = lost.elapsed();
    for id in written.iter().chain([&id]) {
        assert!(
            standby.get(*id).await?.is_some(),
            "member {id} is not in DC B's cluster"
        );
    }
    // Reads are answered from there too, in both data centres (a lookup is a
    // search: it sees a write once the cluster has refreshed, within a second).
    assert_eq!(
        a.lookup(card(101)).await?.map(|m| m.member_id),
        Some(before.clone())
    );
    let want = written[1].to_string();
    eventually("DC B's write found by a lookup in DC B", 10, || async {
        let found = b.lookup(card(103)).await?.map(|m| m.member_id);
        Ok::<_, tonic::Status>((found.as_deref() == Some(want.as_str())).then_some(()))
    })
    .await?;
    let promoted_at = Instant::now();
    traffic
        .until_acked("writes acknowledged through DC B", promoted_at, 20, 30)
        .await?;
    let returned = Instant::now();
    let reads = traffic.so_far().read_between(lost, returned);
    ensure!(reads > 0, "no lookup answered while DC A's cluster was down");

    // DC A's cluster returns: it replays what it missed, and is active again after the dwell.
    ballast_e2e::stack_script(&["up"])?;
    let back = eventually("DC A active again", 120, || async {
        let ms = api.get(&f.name).await?;
        Ok::<_, kube::Error>((ms.active_data_center() == "dc-a").then_some(ms))
    })
    .await?;
    ensure!(back.epoch() == epoch + 2, "epoch {} after {epoch}", back.epoch());
    let failed_back = Instant::now();
    traffic
        .until_acked("writes acknowledged through DC A again", failed_back, 20, 60)
        .await?;
    let traffic = traffic.finish().await?;

    // Both sides hold every acknowledged write, identically.
    eventually("DC B caught up with what DC A took last", 60, || async {
        let status = api.get(&f.name).await?.status.unwrap_or_default();
        let caught_up = status
            .replication
            .iter()
            .any(|r| r.cluster == "dc-b" && r.lag_events == 0);
        Ok::<_, kube::Error>(caught_up.then_some(()))
    })
    .await?;
    let primary = es("BALLAST_ES_DC_A_URL")?;
    let acknowledged = &traffic.acknowledged;
    // Side A is DC A's cluster, side B DC B's.
    let differ = traffic
        .differences(|n| {
            let (primary, standby) = (&primary, &standby);
            async move { Ok((primary.get(n).await?, standby.get(n).await?)) }
        })
        .await?;
    assert!(
        differ.is_empty(),
        "{} differences:\n{}",
        differ.len(),
        differ.join("\n")
    );
    ensure!(
        acknowledged.len() >= 30,
        "{} members acknowledged",
        acknowledged.len()
    );
    println!(
        "DC B published {promoted:.1?} and written through by both data centres {moved:.1?} after DC A's Elasticsearch stopped; \
         {} members acknowledged through the promotion and the failback, {reads} lookups answered in the outage, \
         {} writes unanswered within the client's 10 s",
        acknowledged.len(),
        traffic.unanswered
    );
    shutdown.cancel();
    replicating.await??;
    Ok(())
}
