//! Redis: every instance of the stack answers SET/GET through the `redis` crate.

use ballast_e2e::Stack;
use redis::AsyncCommands;

const INSTANCES: [&str; 4] = [
    "BALLAST_REDIS_KV_URL",
    "BALLAST_REDIS_CACHE_URL",
    "BALLAST_REDIS_MEMBER_DC_A_URL",
    "BALLAST_REDIS_MEMBER_DC_B_URL",
];

#[tokio::test]
async fn every_redis_instance_sets_and_gets() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let key = super::unique("smoke");
    for var in INSTANCES {
        let url = stack.get(var)?;
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: () = conn.set_ex(&key, var, 60).await?;
        let read: String = conn.get(&key).await?;
        assert_eq!(read, var, "{var} ({url}) returned another value");
    }
    Ok(())
}

#[tokio::test]
async fn redis_instances_are_independent() -> anyhow::Result<()> {
    // Writing to one instance must not be visible in another: the KV store and
    // the cache fail independently in the degraded-mode scenarios.
    let stack = Stack::discover();
    let key = super::unique("isolation");
    let kv = redis::Client::open(stack.get(INSTANCES[0])?.as_str())?;
    let cache = redis::Client::open(stack.get(INSTANCES[1])?.as_str())?;
    let mut kv = kv.get_multiplexed_async_connection().await?;
    let mut cache = cache.get_multiplexed_async_connection().await?;
    let _: () = kv.set_ex(&key, "kv", 60).await?;
    let other: Option<String> = cache.get(&key).await?;
    assert_eq!(other, None);
    Ok(())
}
