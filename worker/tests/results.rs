//! The result stores against the real hot MariaDB and cache Redis of the local
//! stack: the version fence refuses (and counts) stale writes in both, accepts
//! a retry of the same version, and results spread over every shard and read
//! back whole. Each test writes under its own pipeline name.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ballast_e2e::Stack;
use ballast_worker::compute::MerchantResult;
use ballast_worker::results::cache::{merchant_key, slot_field};
use ballast_worker::results::{Fenced, Granularity, HotStore, ResultCache, ResultsError, Slot, Stored};
use mysql_async::prelude::Queryable;
use serde_json::json;

const BASE: &str = "ballast_results_test";

struct Stores {
    pool: mysql_async::Pool,
    hot: HotStore,
    cache: ResultCache,
    redis: redis::aio::ConnectionManager,
}

async fn stores(databases: u32, tables: u32) -> anyhow::Result<Stores> {
    let stack = Stack::discover();
    let url = stack.get("BALLAST_MYSQL_HOT_URL")?;
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&url)?);
    let base = format!("{BASE}_{databases}x{tables}");
    let hot = HotStore::new(pool.clone(), &base, databases, tables);
    hot.ensure_schema().await.context("creating the shard tables")?;
    let redis = redis::Client::open(stack.get("BALLAST_REDIS_CACHE_URL")?)?
        .get_connection_manager()
        .await?;
    let cache = ResultCache::new(redis.clone()).with_ttl(600);
    Ok(Stores {
        pool,
        hot,
        cache,
        redis,
    })
}

/// A slot of a pipeline name no other test (or earlier run) uses.
fn slot(test: &str) -> Slot {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Slot {
        pipeline: format!("{test}-{}-{nanos}", ballast_e2e::run_id()),
        granularity: Granularity::Window,
        window_start_ms: 1_800_000,
    }
}

fn results(merchants: std::ops::Range<usize>, tag: &str) -> Vec<MerchantResult> {
    merchants
        .map(|i| MerchantResult {
            merchant_id: format!("m{i}"),
            metrics: match json!({"gmv": i * 100, "tag": tag, "avg": 1.5, "none": null}) {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
        })
        .collect()
}

fn stored(version: u64, results: &[MerchantResult]) -> BTreeMap<String, Stored> {
    results
        .iter()
        .map(|r| {
            let s = Stored {
                version,
                metrics: r.metrics.clone(),
            };
            (r.merchant_id.clone(), s)
        })
        .collect()
}

/// Writes to both stores, asserting they agree on what the fence did.
async fn write(
    stores: &mut Stores,
    slot: &Slot,
    version: u64,
    rows: &[MerchantResult],
) -> anyhow::Result<Fenced> {
    let hot = stores.hot.write(slot, version, rows).await?;
    let cache = stores.cache.write(slot, version, rows).await?;
    anyhow::ensure!(hot == cache, "MySQL fenced {hot:?} but Redis {cache:?}");
    Ok(hot)
}

#[tokio::test]
async fn a_lower_version_is_refused_and_counted_in_mysql_and_redis() -> anyhow::Result<()> {
    let mut stores = stores(2, 4).await?;
    let slot = slot("lower");
    let v5 = results(0..10, "v5");
    assert_eq!(
        write(&mut stores, &slot, 5, &v5).await?,
        Fenced {
            written: 10,
            refused: 0
        }
    );

    // A stale attempt (version 4) of the same window, with 5 merchants more.
    let v4 = results(0..15, "v4");
    assert_eq!(
        write(&mut stores, &slot, 4, &v4).await?,
        Fenced {
            written: 5,
            refused: 10
        }
    );

    let mut expected = stored(5, &v5);
    expected.extend(stored(4, &v4[10..]));
    assert_eq!(stores.hot.read(&slot).await?, expected);
    assert_eq!(stores.cache.read(&slot).await?, expected);
    assert_eq!(
        stores.hot.read_merchant(&slot, "m3").await?,
        expected.get("m3").cloned()
    );
    assert_eq!(stores.hot.read_merchant(&slot, "nobody").await?, None);
    Ok(())
}

#[tokio::test]
async fn the_same_version_rewrites_idempotently() -> anyhow::Result<()> {
    let mut stores = stores(2, 4).await?;
    let slot = slot("same");
    let first = results(0..20, "first");
    assert_eq!(
        write(&mut stores, &slot, 3, &first).await?,
        Fenced {
            written: 20,
            refused: 0
        }
    );
    // A retry of the same task: accepted, same rows.
    assert_eq!(
        write(&mut stores, &slot, 3, &first).await?,
        Fenced {
            written: 20,
            refused: 0
        }
    );
    assert_eq!(stores.hot.read(&slot).await?, stored(3, &first));
    // The same version with other metrics (a recomputation) replaces them.
    let again = results(0..20, "again");
    assert_eq!(
        write(&mut stores, &slot, 3, &again).await?,
        Fenced {
            written: 20,
            refused: 0
        }
    );
    assert_eq!(stores.hot.read(&slot).await?, stored(3, &again));
    assert_eq!(stores.cache.read(&slot).await?, stored(3, &again));
    // A higher version replaces too.
    let newer = results(0..20, "newer");
    assert_eq!(
        write(&mut stores, &slot, 4, &newer).await?,
        Fenced {
            written: 20,
            refused: 0
        }
    );
    assert_eq!(stores.hot.read(&slot).await?, stored(4, &newer));
    assert_eq!(stores.cache.read(&slot).await?, stored(4, &newer));
    Ok(())
}

#[tokio::test]
async fn results_spread_over_every_shard_and_read_back_whole() -> anyhow::Result<()> {
    let mut stores = stores(2, 4).await?;
    let slot = slot("spread");
    let rows = results(0..3000, "all");
    assert_eq!(
        write(&mut stores, &slot, 1, &rows).await?,
        Fenced {
            written: 3000,
            refused: 0
        }
    );

    let mut conn = stores.pool.get_conn().await?;
    for database in 0..2 {
        for table in 0..4 {
            let name = stores.hot.table_name(database, table);
            let count: Option<u64> = conn
                .exec_first(
                    format!("SELECT COUNT(*) FROM {name} WHERE pipeline = ?"),
                    (&slot.pipeline,),
                )
                .await?;
            let count = count.unwrap_or(0);
            assert!(count > 3000 / 8 / 2, "{name} holds only {count} of 3000 rows");
        }
    }
    let expected = stored(1, &rows);
    assert_eq!(stores.hot.read(&slot).await?, expected);
    assert_eq!(stores.cache.read(&slot).await?, expected);
    // Another granularity of the same window is another slot.
    let hour = Slot {
        granularity: Granularity::Hour,
        ..slot.clone()
    };
    assert!(stores.hot.read(&hour).await?.is_empty());
    assert!(stores.cache.read(&hour).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn writes_larger_than_a_statement_are_chunked_and_counted_exactly() -> anyhow::Result<()> {
    // One shard table: 2,600 rows take three statements in MySQL and six
    // script calls in Redis.
    let mut stores = stores(1, 1).await?;
    let slot = slot("chunks");
    let v2 = results(0..2500, "v2");
    assert_eq!(
        write(&mut stores, &slot, 2, &v2).await?,
        Fenced {
            written: 2500,
            refused: 0
        }
    );
    let v1 = results(0..2600, "v1");
    assert_eq!(
        write(&mut stores, &slot, 1, &v1).await?,
        Fenced {
            written: 100,
            refused: 2500
        }
    );
    let mut expected = stored(2, &v2);
    expected.extend(stored(1, &v1[2500..]));
    assert_eq!(stores.hot.read(&slot).await?, expected);
    assert_eq!(stores.cache.read(&slot).await?, expected);
    Ok(())
}

#[tokio::test]
async fn racing_attempts_leave_the_highest_version_everywhere() -> anyhow::Result<()> {
    let stores = stores(2, 4).await?;
    let slot = slot("race");
    let mut attempts = Vec::new();
    for version in 1..=6_u64 {
        let (hot, mut cache, slot) = (stores.hot.clone(), stores.cache.clone(), slot.clone());
        attempts.push(tokio::spawn(async move {
            let rows = results(0..200, &format!("v{version}"));
            let hot = hot.write(&slot, version, &rows).await?;
            let cache = cache.write(&slot, version, &rows).await?;
            Ok::<_, ResultsError>((hot, cache))
        }));
    }
    for attempt in attempts {
        let (hot, cache) = attempt.await??;
        assert_eq!(hot.written + hot.refused, 200);
        assert_eq!(cache.written + cache.refused, 200);
    }
    let expected = stored(6, &results(0..200, "v6"));
    let mut stores = stores;
    assert_eq!(stores.hot.read(&slot).await?, expected);
    assert_eq!(stores.cache.read(&slot).await?, expected);
    Ok(())
}

#[tokio::test]
async fn an_unreadable_cached_value_is_reported_as_corrupt() -> anyhow::Result<()> {
    let mut stores = stores(2, 4).await?;
    let slot = slot("corrupt");
    write(&mut stores, &slot, 1, &results(0..3, "ok")).await?;
    let _: () = redis::cmd("HSET")
        .arg(merchant_key(&slot, "m1"))
        .arg(slot_field(slot.granularity, slot.window_start_ms))
        .arg("1 {not json")
        .query_async(&mut stores.redis)
        .await?;
    match stores.cache.read(&slot).await {
        Err(ResultsError::Corrupt { location, .. }) => assert!(location.contains(":m1 "), "{location}"),
        other => anyhow::bail!("expected a corrupt-value error, got {other:?}"),
    }
    Ok(())
}
