//! The API as a calling service sees it: bindings and their uniqueness, bad
//! input, the caches of both data centres, reading one's own write from the
//! replica's data centre, and marketing traffic kept off the primary cluster.

use anyhow::ensure;
use ballast_e2e::scenario::{eventually, metric};
use ballast_worker::wire::{Identity, LookupManyRequest};
use tonic::Code;

use crate::ONE_AT_A_TIME;
use crate::support::{Fixture, card, id_of, phone, searches};

#[tokio::test]
async fn an_identity_bound_to_one_member_cannot_be_bound_to_another_and_the_refusal_names_its_owner()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-bind").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let first = id_of(&a.register("甲", vec![phone(1)]).await?);
    let second = id_of(&b.register("乙", vec![card(1)]).await?);

    let refused = b.bind(&second, phone(1)).await.err();
    let refused = refused.ok_or_else(|| anyhow::anyhow!("a second bind of one phone was accepted"))?;
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert!(refused.message().contains(&first), "{}", refused.message());

    // The phone finds the first member from either data centre.
    for caller in [&a, &b] {
        let found = eventually("the phone to find its member", 10, || async {
            Ok::<_, tonic::Status>(caller.lookup(phone(1)).await?.filter(|m| m.member_id == first))
        })
        .await?;
        assert_eq!(found.name, "甲");
    }
    // Moved: unbound from the first, bound to the second.
    a.unbind(&first, phone(1)).await?;
    let moved = b.bind(&second, phone(1)).await?;
    let identities = moved.member.map(|m| m.identities).unwrap_or_default();
    assert_eq!(identities.len(), 2, "{identities:?}");
    for caller in [&a, &b] {
        eventually("the phone to find the second member", 10, || async {
            Ok::<_, tonic::Status>(caller.lookup(phone(1)).await?.filter(|m| m.member_id == second))
        })
        .await?;
    }
    let bindings = a
        .client
        .clone()
        .bindings(a.request(ballast_worker::wire::GetRequest {
            member_id: first.clone(),
            read_after: String::new(),
        }))
        .await?
        .into_inner();
    assert!(bindings.identities.is_empty(), "{bindings:?}");
    Ok(())
}

#[tokio::test]
async fn bad_input_and_a_caller_over_its_rate_are_refused_with_a_status_naming_the_problem_and_counted()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-bad").await?;
    let orders = f.caller('a', "orders", "order-flow").await?;
    let member = id_of(&orders.register("丙", vec![card(2)]).await?);
    let stranger = f.caller('a', "stranger", "order-flow").await?;
    let nameless = f.caller('a', "", "order-flow").await?;
    let classless = f.caller('a', "orders", "vip").await?;
    let short = Identity {
        value: "1381234".into(),
        ..phone(0)
    };
    let many = LookupManyRequest {
        identities: (0..101).map(card).collect(),
    };
    #[rustfmt::skip]
    let table: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = vec![
        ("malformed phone", orders.bind(&member, short.clone()).await.map(drop), Code::InvalidArgument, "not a mainland mobile number"),
        ("unknown caller", stranger.lookup(card(2)).await.map(drop), Code::PermissionDenied, "stranger is not registered"),
        ("no caller", nameless.lookup(card(2)).await.map(drop), Code::Unauthenticated, "x-ballast-caller"),
        ("unknown class", classless.lookup(card(2)).await.map(drop), Code::InvalidArgument, "vip"),
        ("oversized batch", orders.client.clone().lookup_many(orders.request(many)).await.map(drop), Code::InvalidArgument, "101 given, at most 100"),
        ("garbage member id", orders.get("12ab", "").await.map(drop), Code::InvalidArgument, "not a member id"),
        ("unknown member", orders.get("1", "").await.map(drop), Code::NotFound, "member 1 does not exist"),
        ("forged read_after", orders.get(&member, "0-1-2'--").await.map(drop), Code::InvalidArgument, "read_after"),
    ];
    for (what, outcome, code, says) in table {
        let status = outcome.err().ok_or_else(|| anyhow::anyhow!("{what}: accepted"))?;
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().contains(says), "{what}: {}", status.message());
    }
    // A caller over its own rate is refused at once, told when to come back.
    let trickle = f.caller('a', "trickle", "order-flow").await?;
    let mut refused = None;
    for _ in 0..5 {
        if let Err(status) = trickle.lookup(card(2)).await {
            refused = Some(status);
            break;
        }
    }
    let refused =
        refused.ok_or_else(|| anyhow::anyhow!("five calls at once passed a rate of one a second"))?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{}", refused.message());
    assert!(
        refused.message().contains("caller account trickle"),
        "{}",
        refused.message()
    );
    assert!(
        refused.metadata().get("retry-after-ms").is_some(),
        "a refusal says when to retry"
    );
    for (reason, at_least) in [
        ("phone", 1.0),
        ("caller_unknown", 1.0),
        ("too_many", 1.0),
        ("read_after", 1.0),
    ] {
        let series = format!("ballast_member_invalid_total{{reason=\"{reason}\"}}");
        let counted = metric(f.a.metrics, &series).await?.unwrap_or(0.0);
        ensure!(counted >= at_least, "{series} is {counted}");
    }
    Ok(())
}

#[tokio::test]
async fn after_a_write_both_data_centres_cache_the_same_member() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-dcs").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let id = id_of(&a.register("丁", vec![card(3)]).await?);
    let written = a.level(&id, "gold").await?;
    let version = written.member.map(|m| m.version).unwrap_or_default();
    // Each data centre fills its own cache on a read (once the write's lock is gone).
    let key = f.member_key(&id);
    let mut entries = Vec::new();
    for (caller, url) in [
        (&a, "BALLAST_REDIS_MEMBER_DC_A_URL"),
        (&b, "BALLAST_REDIS_MEMBER_DC_B_URL"),
    ] {
        let conn = redis::Client::open(f.stack.get(url)?)?
            .get_multiplexed_async_connection()
            .await?;
        let entry = eventually("a read to cache the written version", 10, || {
            let (mut conn, key, id) = (conn.clone(), key.clone(), id.clone());
            async move {
                let read = caller.get(&id, "").await?;
                let entry: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                Ok::<_, anyhow::Error>(entry.filter(|_| read.version == version))
            }
        })
        .await?;
        entries.push(serde_json::from_str::<serde_json::Value>(&entry)?);
    }
    assert_eq!(entries[0], entries[1], "both data centres hold the same member");
    assert_eq!(entries[0]["level"], "gold");
    assert_eq!(entries[0]["version"], version);
    Ok(())
}

#[tokio::test]
async fn dc_b_reads_its_replica_and_a_caller_still_reads_its_own_write() -> anyhow::Result<()> {
    use mysql_async::prelude::Queryable;
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-ryw").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let replica_url = f.stack.get(ballast_e2e::members::REPLICA_MYSQL)?;
    let mut replica = mysql_async::Conn::new(mysql_async::Opts::from_url(&replica_url)?).await?;
    // The replica stops applying: DC B's data falls behind.
    replica.query_drop("STOP SLAVE SQL_THREAD").await?;
    let _resume = ResumeReplica(replica_url.clone());
    let written = a.register("戊", vec![card(4)]).await?;
    let id = id_of(&written);
    ensure!(!written.read_after.is_empty(), "a write gives a read_after token");
    let plain = b.get(&id, "").await;
    assert_eq!(
        plain.as_ref().map_err(tonic::Status::code).err(),
        Some(Code::NotFound),
        "DC B reads its own replica, which lacks the write: {plain:?}"
    );
    let own = b.get(&id, &written.read_after).await?;
    assert_eq!(own.member_id, id, "with read_after the write is read");
    replica.query_drop("START SLAVE SQL_THREAD").await?;
    // The miss above was not cached: the replica's member shows once applied.
    eventually("DC B to read the member from its replica", 20, || async {
        Ok::<_, tonic::Status>(b.get(&id, "").await.ok())
    })
    .await?;
    let again = a.level(&id, "gold").await?;
    let fresh = b.get(&id, &again.read_after).await?;
    assert_eq!(fresh.level, "gold");
    Ok(())
}

/// Restarts the replica's SQL thread when dropped, whatever the test did.
struct ResumeReplica(String);

impl Drop for ResumeReplica {
    fn drop(&mut self) {
        let url = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    use mysql_async::prelude::Queryable;
                    if let Ok(opts) = mysql_async::Opts::from_url(&url)
                        && let Ok(mut conn) = mysql_async::Conn::new(opts).await
                    {
                        let _ = conn.query_drop("START SLAVE").await;
                    }
                });
            }
        })
        .join();
    }
}

#[tokio::test]
async fn marketing_lookups_never_reach_the_primary_cluster() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-mkt").await?;
    let orders = f.caller('a', "orders", "order-flow").await?;
    let campaign = f.caller('b', "campaign", "marketing").await?;
    let (stop, replicating) = f.replicate().await?;
    let id = id_of(&orders.register("己", vec![phone(5)]).await?);
    // The replicator feeds the marketing cluster from the change stream.
    eventually("the marketing cluster to find the member", 30, || async {
        Ok::<_, tonic::Status>(campaign.lookup(phone(5)).await?.filter(|m| m.member_id == id))
    })
    .await?;
    let index = format!("ballast-members-{}.{}", f.namespace, f.name);
    let primary_url = f.stack.get("BALLAST_ES_DC_A_URL")?;
    let marketing_url = f.stack.get("BALLAST_ES_COLD_URL")?;
    let (primary_before, marketing_before) = (
        searches(&primary_url, &index).await?,
        searches(&marketing_url, &index).await?,
    );
    for n in 0..50 {
        // Unknown phones: misses every time, never cached.
        campaign.lookup(phone(1_000 + n)).await?;
    }
    let (primary_after, marketing_after) = (
        searches(&primary_url, &index).await?,
        searches(&marketing_url, &index).await?,
    );
    assert_eq!(
        primary_after, primary_before,
        "marketing lookups reached the primary cluster"
    );
    ensure!(
        marketing_after >= marketing_before + 50,
        "the marketing cluster answered {} searches, not 50",
        marketing_after - marketing_before
    );
    // The count moves for order-flow lookups: the comparison above could fail.
    orders.lookup(phone(2_000)).await?;
    ensure!(
        searches(&primary_url, &index).await? > primary_after,
        "order-flow lookups search the primary"
    );
    stop.cancel();
    replicating.await??;
    Ok(())
}
