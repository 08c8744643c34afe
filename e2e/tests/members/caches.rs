//! A data centre's cache through an outage, with the operator deciding: DC
//! A's Redis freezes (it keeps its entries, as a hung or partitioned server
//! does); the operator publishes it Degraded, and writes go on through both
//! data centres without it while DC A reads around it. Once it answers again
//! it still holds the entry the outage's write made stale; the operator
//! empties it before publishing it Normal, so no read in DC A ever returns
//! the stale member.

use std::time::{Duration, Instant};

use anyhow::ensure;
use ballast_crds::{MemberStore, Mode};
use ballast_e2e::scenario::{Thaw, eventually, metric};
use ballast_e2e::stack_script;
use kube::api::Api;

use crate::ONE_AT_A_TIME;
use crate::support::{Fixture, card, id_of};

/// The mode published for `dc`'s cache, if any is.
async fn cache_mode(api: &Api<MemberStore>, name: &str, dc: &str) -> anyhow::Result<Option<Mode>> {
    let ms = api.get(name).await?;
    Ok(ms
        .status
        .iter()
        .flat_map(|s| &s.caches)
        .find(|c| c.data_center == dc)
        .map(|c| c.mode))
}

#[tokio::test]
async fn a_frozen_cache_is_left_out_of_writes_and_emptied_before_its_data_centre_reads_it_again()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-cache").await?;
    let client = f.stack.kube_client().await?;
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &f.namespace);
    let _operator = f.operate().await?;
    eventually("both caches published Normal", 60, || async {
        let a = cache_mode(&api, &f.name, "dc-a").await?;
        let b = cache_mode(&api, &f.name, "dc-b").await?;
        Ok::<_, anyhow::Error>((a == Some(Mode::Normal) && b == Some(Mode::Normal)).then_some(()))
    })
    .await?;

    // DC A caches the member as registered.
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let id = id_of(&a.register("辛", vec![card(8)]).await?);
    let key = f.member_key(&id);
    let dc_a = redis::Client::open(f.stack.get("BALLAST_REDIS_MEMBER_DC_A_URL")?)?
        .get_multiplexed_async_connection()
        .await?;
    let cached = |mut conn: redis::aio::MultiplexedConnection, key: String| async move {
        let entry: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        Ok::<_, anyhow::Error>(match entry {
            Some(e) => Some(serde_json::from_str::<serde_json::Value>(&e)?),
            None => None,
        })
    };
    eventually("DC A to cache the registered member", 10, || async {
        let read = a.get(&id, "").await?;
        let entry = cached(dc_a.clone(), key.clone()).await?;
        Ok::<_, anyhow::Error>(entry.filter(|e| e["level"] == "silver" && read.level == "silver"))
    })
    .await?;

    // Frozen: published Degraded, and writes go on in both data centres.
    let frozen = Instant::now();
    stack_script(&["pause", "redis-member-dc-a"])?;
    let _thaw = Thaw("redis-member-dc-a");
    eventually("DC A's cache published Degraded", 30, || async {
        Ok::<_, anyhow::Error>(
            (cache_mode(&api, &f.name, "dc-a").await? == Some(Mode::Degraded)).then_some(()),
        )
    })
    .await?;
    let published = frozen.elapsed();
    let gold = eventually("a write through DC B without DC A's cache", 10, || async {
        Ok::<_, tonic::Status>(b.level(&id, "gold").await.ok())
    })
    .await?;
    let version = gold.member.map(|m| m.version).unwrap_or_default();
    let written = frozen.elapsed();
    let other = id_of(&a.register("壬", vec![card(9)]).await?);
    // DC A reads around its cache, and sees the write.
    let read = a.get(&id, "").await?;
    assert_eq!((read.level.as_str(), read.version), ("gold", version));
    let bypassed = metric(f.a.metrics, "ballast_member_cache_total{result=\"bypassed\"}")
        .await?
        .unwrap_or(0.0);
    ensure!(bypassed >= 1.0, "DC A's reads did not read around its cache");
    let missed = metric(
        f.b.metrics,
        "ballast_member_invalidations_missed_total{dc=\"dc-a\"}",
    )
    .await?
    .unwrap_or(0.0);
    ensure!(
        missed >= 1.0,
        "DC B's write did not count DC A's missed invalidation"
    );

    // Thawed, it still holds what the write made stale...
    stack_script(&["resume", "redis-member-dc-a"])?;
    let thawed = Instant::now();
    let stale = cached(dc_a.clone(), key.clone()).await?;
    assert_eq!(
        stale.as_ref().map(|e| e["level"].clone()),
        Some(serde_json::json!("silver")),
        "the thawed cache should still hold the entry from before the outage"
    );
    // ...and no read in DC A returns it, before, while or after it is emptied.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = a.get(&id, "").await?;
        assert_eq!(
            (read.level.as_str(), read.version),
            ("gold", version),
            "DC A read a stale member"
        );
        if cache_mode(&api, &f.name, "dc-a").await? == Some(Mode::Normal) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "DC A's cache not published Normal within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restored = thawed.elapsed();
    let emptied = cached(dc_a.clone(), key.clone()).await?;
    ensure!(
        emptied.as_ref().is_none_or(|e| e["level"] == "gold"),
        "the stale entry survived: {emptied:?}"
    );
    // Read again: DC A fills its cache with the current member.
    eventually("DC A to cache the current member", 10, || async {
        let read = a.get(&id, "").await?;
        let entry = cached(dc_a.clone(), key.clone()).await?;
        Ok::<_, anyhow::Error>(entry.filter(|e| e["level"] == "gold" && read.level == "gold"))
    })
    .await?;
    assert_eq!(b.get(&other, "").await?.name, "壬");
    let ms = api.get(&f.name).await?;
    let reason = ms
        .status
        .iter()
        .flat_map(|s| &s.caches)
        .find(|c| c.data_center == "dc-a")
        .and_then(|c| c.reason.clone());
    assert_eq!(reason.as_deref(), Some("SwitchedBack"));
    println!(
        "DC A's cache published Degraded {published:.1?} after it froze, written around {written:.1?}, \
         published Normal (emptied) {restored:.1?} after it thawed"
    );
    Ok(())
}
