//! A window made to fail wherever it is computed: an undecodable event put
//! straight into the KV store, under the keys the caller names (the layout is
//! the data plane's, which this crate does not link). Removed on `repair`.

/// An undecodable event in one merchant's hash of a window.
pub struct PoisonedWindow {
    hash: String,
    kv: redis::aio::MultiplexedConnection,
}

/// The field the undecodable event is stored under.
const FIELD: &str = "bad";

impl PoisonedWindow {
    /// Writes the event into `hash` and names `merchant` in the window's
    /// `window_key` set, on the KV Redis at `kv_url`; the hash expires in 10 minutes.
    pub async fn put(
        kv_url: &str,
        hash: String,
        window_key: String,
        merchant: &str,
    ) -> Result<Self, redis::RedisError> {
        let mut kv = redis::Client::open(kv_url)?
            .get_multiplexed_async_connection()
            .await?;
        redis::pipe()
            .cmd("HSET")
            .arg(&hash)
            .arg(FIELD)
            .arg(&[0xff_u8, 0xff][..])
            .ignore()
            .cmd("SADD")
            .arg(window_key)
            .arg(merchant)
            .ignore()
            .cmd("EXPIRE")
            .arg(&hash)
            .arg(600)
            .ignore()
            .exec_async(&mut kv)
            .await?;
        Ok(Self { hash, kv })
    }

    /// Removes the undecodable event: the next retry computes the window.
    pub async fn repair(mut self) -> Result<(), redis::RedisError> {
        redis::cmd("HDEL")
            .arg(&self.hash)
            .arg(FIELD)
            .exec_async(&mut self.kv)
            .await
    }
}
