//! The KV layout against the local stack's real KV Redis: windows and merchants
//! are cheap to read back, writes are idempotent on the event id, and keys a
//! restart wiped out come back with their TTL.

use ballast_e2e::scenario::{self, eventually};
use ballast_e2e::{Stack, stack_script};
use ballast_worker::kv::{KvStore, Layout, Written};
use ballast_worker::wire::ChangeEvent;

/// One test restarts the KV Redis under the others: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn store(pipeline: &str) -> anyhow::Result<(KvStore, redis::aio::ConnectionManager)> {
    let url = Stack::discover().get("BALLAST_REDIS_KV_URL")?;
    let conn = redis::Client::open(url.as_str())?
        .get_connection_manager()
        .await?;
    let kv = KvStore::new(conn.clone(), Layout::new(pipeline, 60_000), 300);
    Ok((kv, conn))
}

fn event(id: &str, merchant: &str, time_ms: i64) -> ChangeEvent {
    ChangeEvent::insert(
        id,
        merchant,
        "orders",
        time_ms,
        format!(r#"{{"id":"{id}"}}"#).into_bytes(),
    )
}

#[tokio::test]
async fn kv_buckets_read_back_by_window_and_merchant_without_duplicates() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let pipeline = format!("kvtest-{}", ballast_e2e::run_id());
    let (mut kv, _) = store(&pipeline).await?;

    let batch = vec![
        event("a", "m1", 60_001),
        event("b", "m1", 60_002),
        event("c", "m2", 60_003),
        event("d", "m1", 120_000),
    ];
    assert_eq!(
        kv.write(&batch).await?,
        Written {
            new: 4,
            duplicates: 0
        }
    );
    // A redelivery (Kafka at-least-once, a retried batch) stores nothing twice.
    let again = kv
        .write(&[event("a", "m1", 60_001), event("e", "m2", 60_004)])
        .await?;
    assert_eq!(
        again,
        Written {
            new: 1,
            duplicates: 1
        }
    );

    let ids = |events: Vec<ChangeEvent>| {
        let mut ids: Vec<String> = events.into_iter().map(|e| e.event_id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(kv.window(60_000).await?), ["a", "b", "c", "e"]);
    assert_eq!(ids(kv.merchant(60_000, "m1").await?), ["a", "b"]);
    assert_eq!(ids(kv.window(120_000).await?), ["d"]);
    assert_eq!(
        (
            kv.count(60_000).await?,
            kv.count(120_000).await?,
            kv.count(180_000).await?
        ),
        (4, 1, 0)
    );
    assert!(kv.window(180_000).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_key_recreated_after_a_kv_restart_gets_its_ttl_at_the_next_write() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let _restore = scenario::RestoreStack;
    let pipeline = format!("kvttl-{}", ballast_e2e::run_id());
    let (mut kv, mut conn) = store(&pipeline).await?;
    let key = Layout::new(&pipeline, 60_000).merchant_key(60_000, "m1");
    let ttl = |mut conn: redis::aio::ConnectionManager| {
        let key = key.clone();
        async move { redis::cmd("TTL").arg(&key).query_async::<i64>(&mut conn).await }
    };

    // Two writes a moment apart: the second skips the renewal of m1's hash.
    kv.write(&[event("a", "m1", 60_001)]).await?;
    kv.write(&[event("b", "m1", 60_002)]).await?;
    assert!(ttl(conn.clone()).await? > 0, "the first write sets a TTL");

    // The store restarts without persistence: every key and TTL is gone.
    stack_script(&["stop", "redis-kv"])?;
    stack_script(&["up"])?;
    let written = eventually("a write after the restart", 30, || {
        let mut kv = kv.clone();
        async move { kv.write(&[event("c", "m1", 60_003)]).await.map(Some) }
    })
    .await?;
    assert_eq!(written.new, 1, "the store came back empty");
    let left = ttl(conn.clone()).await?;
    assert!(
        left > 0,
        "m1's hash was recreated without a TTL ({left}): it would outlive its retention"
    );
    redis::cmd("DEL").arg(&key).exec_async(&mut conn).await?;
    Ok(())
}
