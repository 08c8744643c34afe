//! A promotion moves the member services: with the operator deciding and a
//! replicator keeping DC B's cluster, DC A's Elasticsearch stops; the
//! operator promotes DC B, and both data centres' member processes write and
//! read there within seconds, without a restart. What was written before
//! is there too (the replicator had applied it).

use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_e2e::scenario::{self, eventually};
use ballast_worker::members::search::MemberIndex;
use kube::api::Api;

use crate::ONE_AT_A_TIME;
use crate::support::{Fixture, card, id_of};

#[tokio::test]
async fn a_promotion_moves_both_data_centres_writes_and_reads_to_the_standby_within_seconds()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-promote").await?;
    let client = f.stack.kube_client().await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &f.namespace);
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

    // DC A's cluster stops: DC B is promoted, and both processes write there.
    // Timed from the stop's start: Elasticsearch stops answering during its shutdown.
    let lost = std::time::Instant::now();
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
    println!(
        "DC B published {promoted:.1?} and written through by both data centres {moved:.1?} after DC A's Elasticsearch stopped"
    );
    shutdown.cancel();
    replicating.await??;
    Ok(())
}
