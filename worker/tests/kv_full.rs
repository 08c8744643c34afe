//! A full KV store refuses, it does not evict: against the stack's real KV
//! Redis (run with `noeviction`), a write past its memory limit fails as an
//! error the intake treats as a store failure (nothing acknowledged), and
//! every event written before is still there. One test in its own binary: it
//! lowers the server's limit for a moment.

use ballast_e2e::Stack;
use ballast_worker::kv::{KvStore, Layout};
use ballast_worker::wire::ChangeEvent;
use k8s_openapi::jiff::Timestamp;

const WINDOW_MS: i64 = 60_000;

/// Restores the KV store's memory limit whatever the test's outcome.
struct Restore {
    url: String,
    limit: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(self.url.as_str())
            && let Ok(mut conn) = client.get_connection()
        {
            let _: Result<(), _> = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(&self.limit)
                .query(&mut conn);
        }
    }
}

#[tokio::test]
async fn a_full_kv_store_refuses_writes_and_keeps_every_event_it_took() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let url = stack.get("BALLAST_REDIS_KV_URL")?;
    let client = redis::Client::open(url.as_str())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut admin)
        .await?;
    assert_eq!(
        policy.get(1).map(String::as_str),
        Some("noeviction"),
        "{policy:?}"
    );
    let limit: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query_async(&mut admin)
        .await?;
    let _restore = Restore {
        url: url.clone(),
        limit: limit.get(1).cloned().unwrap_or_else(|| "0".into()),
    };
    // Room for about 4 MiB more than is used now.
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut admin).await?;
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no used_memory in INFO"))?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 4 * 1024 * 1024)
        .query_async(&mut admin)
        .await?;

    let pipeline = format!("full{}", ballast_e2e::run_id());
    let mut kv = KvStore::new(
        client.get_connection_manager().await?,
        Layout::new(&pipeline, WINDOW_MS),
        120,
    );
    let window = Timestamp::now().as_millisecond() / WINDOW_MS * WINDOW_MS;
    let mut written = 0_usize;
    let refused = loop {
        let batch: Vec<ChangeEvent> = (0..100)
            .map(|i| {
                ChangeEvent::insert(
                    format!("e{}", written + i),
                    format!("m{}", (written + i) % 50),
                    "orders",
                    window + 1,
                    vec![b'x'; 4096],
                )
            })
            .collect();
        match kv.write(&batch).await {
            Ok(_) => written += batch.len(),
            Err(error) => break error,
        }
        anyhow::ensure!(
            written < 100_000,
            "64 MiB written past a 4 MiB limit and never refused"
        );
    };
    assert!(refused.to_string().contains("OOM"), "{refused}");
    // Nothing was evicted to make room: every event acknowledged is still there.
    let held = kv.window(window).await?.len();
    assert!(held >= written, "{held} events held, {written} acknowledged");
    Ok(())
}
