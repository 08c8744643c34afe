//! The results in the Redis cache, written beside the hot MySQL so the query
//! service serves today's data from memory:
//!
//! - `ballast:{pipeline}:r:{granularity}:{window_start_ms}:{merchant}` — a hash
//!   `{v: version, m: metrics JSON}`;
//! - `ballast:{pipeline}:r:{granularity}:{window_start_ms}` — the set of the
//!   slot's merchants, for readers of a whole slot.
//!
//! The version fence runs inside one Lua script per chunk, so a check and its
//! write are atomic: a key whose stored `v` is higher than the write's version
//! is left alone and counted as refused. Every key expires after the TTL,
//! renewed by each accepted write.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;

use super::{Fenced, ResultsError, Slot, Stored};
use crate::compute::MerchantResult;

/// Merchants per script call: bounds the time the script holds Redis.
const CHUNK_MERCHANTS: usize = 500;

/// KEYS[1]: the slot's merchant set; KEYS[2..]: the merchants' hashes.
/// ARGV[1]: version (decimal), ARGV[2]: TTL seconds, then (merchant, metrics)
/// for each hash in order. Returns how many hashes were refused.
const FENCED_WRITE: &str = r"
local version = ARGV[1]
local ttl = ARGV[2]
-- Versions are compared as decimal strings (exact for any u64; Lua numbers are doubles).
local function higher(stored)
  if #stored ~= #version then return #stored > #version end
  return stored > version
end
local refused = 0
local members = {}
for i = 2, #KEYS do
  local merchant = ARGV[2 * i - 1]
  members[#members + 1] = merchant
  local stored = redis.call('HGET', KEYS[i], 'v')
  if stored and higher(stored) then
    refused = refused + 1
  else
    redis.call('HSET', KEYS[i], 'v', version, 'm', ARGV[2 * i])
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
if #members > 0 then
  redis.call('SADD', KEYS[1], unpack(members))
  redis.call('EXPIRE', KEYS[1], ttl)
end
return refused
";

/// The merchant set of a slot.
pub fn slot_key(slot: &Slot) -> String {
    format!(
        "ballast:{}:r:{}:{}",
        slot.pipeline,
        slot.granularity.as_str(),
        slot.window_start_ms
    )
}

/// The hash of one merchant's result in a slot.
pub fn merchant_key(slot: &Slot, merchant: &str) -> String {
    format!("{}:{merchant}", slot_key(slot))
}

/// Reads and writes results in the Redis cache.
#[derive(Clone)]
pub struct ResultCache {
    conn: ConnectionManager,
    ttl_seconds: i64,
    script: redis::Script,
}

impl ResultCache {
    /// How long results stay cached unless configured otherwise: two days, so
    /// yesterday's results are still served while today's accumulate.
    pub const DEFAULT_TTL_SECONDS: i64 = 2 * 24 * 3600;

    /// A cache over `conn`; keys live [`Self::DEFAULT_TTL_SECONDS`] after their last write.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            ttl_seconds: Self::DEFAULT_TTL_SECONDS,
            script: redis::Script::new(FENCED_WRITE),
        }
    }

    /// The same cache with keys living `ttl_seconds` (at least 1) after their last write.
    pub fn with_ttl(mut self, ttl_seconds: i64) -> Self {
        self.ttl_seconds = ttl_seconds.max(1);
        self
    }

    /// Writes `results` for `slot` at `version`; keys with a higher stored
    /// version are refused and counted, never overwritten.
    pub async fn write(
        &mut self,
        slot: &Slot,
        version: u64,
        results: &[MerchantResult],
    ) -> Result<Fenced, ResultsError> {
        let set = slot_key(slot);
        let version_text = version.to_string();
        let mut total = Fenced::default();
        for chunk in results.chunks(CHUNK_MERCHANTS) {
            let mut invocation = self.script.prepare_invoke();
            invocation.key(&set).arg(&version_text).arg(self.ttl_seconds);
            for result in chunk {
                invocation
                    .key(merchant_key(slot, &result.merchant_id))
                    .arg(&result.merchant_id)
                    .arg(serde_json::Value::Object(result.metrics.clone()).to_string());
            }
            let refused: u64 = invocation.invoke_async(&mut self.conn).await?;
            let refused = refused.min(chunk.len() as u64);
            total += Fenced {
                written: chunk.len() as u64 - refused,
                refused,
            };
        }
        Ok(total)
    }

    /// Every cached merchant result of `slot` (merchants whose hash expired
    /// before the set are skipped).
    pub async fn read(&mut self, slot: &Slot) -> Result<BTreeMap<String, Stored>, ResultsError> {
        let merchants: Vec<String> = redis::cmd("SMEMBERS")
            .arg(slot_key(slot))
            .query_async(&mut self.conn)
            .await?;
        let mut out = BTreeMap::new();
        for chunk in merchants.chunks(CHUNK_MERCHANTS) {
            let mut pipe = redis::pipe();
            for merchant in chunk {
                pipe.cmd("HMGET")
                    .arg(merchant_key(slot, merchant))
                    .arg("v")
                    .arg("m");
            }
            let rows: Vec<(Option<String>, Option<String>)> = pipe.query_async(&mut self.conn).await?;
            for (merchant, row) in chunk.iter().zip(rows) {
                let location = || merchant_key(slot, merchant);
                let (version, metrics) = match row {
                    (None, None) => continue,
                    (Some(v), Some(m)) => (v, m),
                    _ => {
                        return Err(ResultsError::Corrupt {
                            location: location(),
                            reason: "the hash lacks `v` or `m`".into(),
                        });
                    }
                };
                let version = version.parse::<u64>().map_err(|e| ResultsError::Corrupt {
                    location: location(),
                    reason: format!("version {version:?}: {e}"),
                })?;
                let metrics = serde_json::from_str(&metrics).map_err(|e| ResultsError::Corrupt {
                    location: location(),
                    reason: format!("metrics: {e}"),
                })?;
                out.insert(merchant.clone(), Stored { version, metrics });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Granularity;

    #[test]
    fn keys_follow_the_documented_layout() {
        let slot = |granularity| Slot {
            pipeline: "shop".into(),
            granularity,
            window_start_ms: 120_000,
        };
        let cases = [
            (
                slot(Granularity::Window),
                "m-7",
                "ballast:shop:r:window:120000",
                "ballast:shop:r:window:120000:m-7",
            ),
            (
                slot(Granularity::Hour),
                "x",
                "ballast:shop:r:hour:120000",
                "ballast:shop:r:hour:120000:x",
            ),
        ];
        for (slot, merchant, set, hash) in cases {
            assert_eq!(slot_key(&slot), set);
            assert_eq!(merchant_key(&slot, merchant), hash);
        }
    }
}
