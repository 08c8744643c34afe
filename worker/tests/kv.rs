//! The KV layout against the local stack's real KV Redis: windows and merchants
//! are cheap to read back, and writes are idempotent on the event id.

use ballast_e2e::Stack;
use ballast_worker::kv::{KvStore, Layout, Written};
use ballast_worker::wire::ChangeEvent;

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
    let url = Stack::discover().get("BALLAST_REDIS_KV_URL")?;
    let conn = redis::Client::open(url.as_str())?
        .get_connection_manager()
        .await?;
    let pipeline = format!("kvtest-{}", std::process::id());
    let mut kv = KvStore::new(conn, Layout::new(&pipeline, 60_000), 300);

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
