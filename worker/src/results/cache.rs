//! The results in the Redis cache, written beside the hot MySQL so the query
//! service serves today's data from memory:
//!
//! - `ballast:{pipeline}:d:{day_start_ms}:{merchant}` — one hash per merchant
//!   and UTC day, so one read gives a merchant's whole day: field
//!   `{granularity}:{window_start_ms}` holds `{version} {metrics JSON}`, and
//!   field `_epoch` the cache epoch in which the query service last checked
//!   the hash against the hot MySQL (see [`ResultCache::fill`]);
//! - `ballast:{pipeline}:r:{granularity}:{window_start_ms}` — the set of the
//!   slot's merchants the slaves wrote, for readers of a whole slot.
//!
//! The version fence runs inside one Lua script per chunk, so a check and its
//! write are atomic: a field whose stored version is higher than the write's
//! is left alone and counted as refused. Every key expires after the TTL,
//! renewed by each accepted write.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;

use super::{Fenced, Granularity, ResultsError, Slot, Stored, StoredText};
use crate::compute::MerchantResult;

/// Merchants per script call: bounds the time the script holds Redis.
const CHUNK_MERCHANTS: usize = 500;

/// Milliseconds in a UTC day: the span of one merchant hash.
pub const DAY_MS: i64 = 86_400_000;

/// The field of a day hash holding the epoch it was last checked against MySQL in.
pub const EPOCH_FIELD: &str = "_epoch";

/// Compares decimal version strings (exact for any u64; Lua numbers are doubles).
const HIGHER: &str = r"
local function higher(stored, version)
  if #stored ~= #version then return #stored > #version end
  return stored > version
end
local function stored_version(key, field)
  local stored = redis.call('HGET', key, field)
  return stored and string.match(stored, '^(%d+) ')
end
";

/// KEYS[1]: the slot's merchant set; KEYS[2..]: the merchants' day hashes.
/// ARGV[1]: version (decimal), ARGV[2]: TTL seconds, ARGV[3]: the slot's
/// field, then (merchant, metrics) for each hash in order. Returns how many
/// were refused.
const FENCED_WRITE: &str = r"
local version = ARGV[1]
local ttl = ARGV[2]
local field = ARGV[3]
local refused = 0
local members = {}
for i = 2, #KEYS do
  members[#members + 1] = ARGV[2 * i]
  local stored = stored_version(KEYS[i], field)
  if stored and higher(stored, version) then
    refused = refused + 1
  else
    redis.call('HSET', KEYS[i], field, version .. ' ' .. ARGV[2 * i + 1])
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
if #members > 0 then
  redis.call('SADD', KEYS[1], unpack(members))
  redis.call('EXPIRE', KEYS[1], ttl)
end
return refused
";

/// KEYS[1]: one merchant's day hash. ARGV[1]: TTL seconds, ARGV[2]: the epoch
/// to record, then (field, version, metrics) triples. Returns how many fields
/// were refused for a higher stored version.
const FENCED_FILL: &str = r"
local ttl = ARGV[1]
local refused = 0
for i = 3, #ARGV, 3 do
  local field, version = ARGV[i], ARGV[i + 1]
  local stored = stored_version(KEYS[1], field)
  if stored and higher(stored, version) then
    refused = refused + 1
  else
    redis.call('HSET', KEYS[1], field, version .. ' ' .. ARGV[i + 2])
  end
end
redis.call('HSET', KEYS[1], '_epoch', ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
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

/// Start of the UTC day holding `time_ms`.
pub fn day_of(time_ms: i64) -> i64 {
    time_ms.div_euclid(DAY_MS) * DAY_MS
}

/// The hash of one merchant's results on the UTC day starting at `day_start_ms`.
pub fn day_key(pipeline: &str, day_start_ms: i64, merchant: &str) -> String {
    format!("ballast:{pipeline}:d:{day_start_ms}:{merchant}")
}

/// The hash holding one merchant's result in a slot.
pub fn merchant_key(slot: &Slot, merchant: &str) -> String {
    day_key(&slot.pipeline, day_of(slot.window_start_ms), merchant)
}

/// The field of a slot in its merchants' day hashes.
pub fn slot_field(granularity: Granularity, window_start_ms: i64) -> String {
    format!("{}:{window_start_ms}", granularity.as_str())
}

/// One merchant's day as the cache holds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedDay {
    /// Results by (granularity, start), their metrics as stored (checked JSON objects).
    pub results: BTreeMap<(Granularity, i64), StoredText>,
    /// The cache epoch the hash was last checked against MySQL in, if ever.
    pub checked_epoch: Option<i64>,
}

impl CachedDay {
    /// Whether the hash exists at all.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty() && self.checked_epoch.is_none()
    }
}

/// `{version} {metrics JSON}` as stored in a field: the version, and the
/// metrics text. Pure.
fn split_entry(text: &str) -> Result<(u64, &str), String> {
    let (version, metrics) = text
        .split_once(' ')
        .ok_or_else(|| "expected `<version> <metrics>`".to_owned())?;
    let version = version
        .parse::<u64>()
        .map_err(|e| format!("version {version:?}: {e}"))?;
    Ok((version, metrics))
}

/// A field's result, the metrics checked but left as text. Pure.
fn parse_text(text: &str, location: impl Fn() -> String) -> Result<StoredText, ResultsError> {
    let corrupt = |reason: String| ResultsError::Corrupt {
        location: location(),
        reason,
    };
    let (version, metrics) = split_entry(text).map_err(corrupt)?;
    StoredText::checked(version, metrics.to_owned()).map_err(corrupt)
}

/// A field's result, the metrics parsed. Pure.
fn parse_entry(text: &str, location: impl Fn() -> String) -> Result<Stored, ResultsError> {
    let corrupt = |reason: String| ResultsError::Corrupt {
        location: location(),
        reason,
    };
    let (version, metrics) = split_entry(text).map_err(corrupt)?;
    let metrics = serde_json::from_str(metrics).map_err(|e| corrupt(format!("metrics: {e}")))?;
    Ok(Stored { version, metrics })
}

/// A day hash's fields as a [`CachedDay`]; unknown fields are skipped (a
/// newer writer may add some). Pure.
pub fn parse_day(fields: Vec<(String, String)>, key: &str) -> Result<CachedDay, ResultsError> {
    let mut day = CachedDay::default();
    for (field, value) in fields {
        let location = || format!("{key} field {field}");
        if field == EPOCH_FIELD {
            day.checked_epoch = Some(value.parse().map_err(|e| ResultsError::Corrupt {
                location: location(),
                reason: format!("epoch {value:?}: {e}"),
            })?);
            continue;
        }
        let Some((granularity, start)) = field.split_once(':') else {
            continue;
        };
        let (Some(granularity), Ok(start)) = (Granularity::parse(granularity), start.parse::<i64>()) else {
            continue;
        };
        day.results
            .insert((granularity, start), parse_text(&value, location)?);
    }
    Ok(day)
}

/// Reads and writes results in the Redis cache.
#[derive(Clone)]
pub struct ResultCache {
    conn: ConnectionManager,
    ttl_seconds: i64,
    write: redis::Script,
    fill: redis::Script,
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
            write: redis::Script::new(&format!("{HIGHER}{FENCED_WRITE}")),
            fill: redis::Script::new(&format!("{HIGHER}{FENCED_FILL}")),
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
        let field = slot_field(slot.granularity, slot.window_start_ms);
        let version_text = version.to_string();
        let mut total = Fenced::default();
        for chunk in results.chunks(CHUNK_MERCHANTS) {
            let mut invocation = self.write.prepare_invoke();
            invocation
                .key(&set)
                .arg(&version_text)
                .arg(self.ttl_seconds)
                .arg(&field);
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
        let field = slot_field(slot.granularity, slot.window_start_ms);
        let mut out = BTreeMap::new();
        for chunk in merchants.chunks(CHUNK_MERCHANTS) {
            let mut pipe = redis::pipe();
            for merchant in chunk {
                pipe.hget(merchant_key(slot, merchant), &field);
            }
            let values: Vec<Option<String>> = pipe.query_async(&mut self.conn).await?;
            for (merchant, value) in chunk.iter().zip(values) {
                let Some(value) = value else { continue };
                let location = || format!("{} field {field}", merchant_key(slot, merchant));
                out.insert(merchant.clone(), parse_entry(&value, location)?);
            }
        }
        Ok(out)
    }

    /// One merchant's day: every result the cache holds for it on the UTC day
    /// starting at `day_start_ms`, in one round trip.
    pub async fn read_day(
        &mut self,
        pipeline: &str,
        day_start_ms: i64,
        merchant: &str,
    ) -> Result<CachedDay, ResultsError> {
        let key = day_key(pipeline, day_start_ms, merchant);
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn)
            .await?;
        parse_day(fields, &key)
    }

    /// Fills one merchant's day hash with `results` read from the hot MySQL,
    /// each fenced by its own version (a newer result a slave wrote meanwhile
    /// stays), and records `epoch` as the cache epoch it was checked in.
    pub async fn fill(
        &mut self,
        pipeline: &str,
        day_start_ms: i64,
        merchant: &str,
        results: &BTreeMap<(Granularity, i64), StoredText>,
        epoch: i64,
    ) -> Result<Fenced, ResultsError> {
        let mut invocation = self.fill.prepare_invoke();
        invocation
            .key(day_key(pipeline, day_start_ms, merchant))
            .arg(self.ttl_seconds)
            .arg(epoch);
        for ((granularity, start), stored) in results {
            invocation
                .arg(slot_field(*granularity, *start))
                .arg(stored.version)
                .arg(&stored.metrics);
        }
        let refused: u64 = invocation.invoke_async(&mut self.conn).await?;
        let refused = refused.min(results.len() as u64);
        Ok(Fenced {
            written: results.len() as u64 - refused,
            refused,
        })
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
                "ballast:shop:d:0:m-7",
            ),
            (
                slot(Granularity::Hour),
                "x",
                "ballast:shop:r:hour:120000",
                "ballast:shop:d:0:x",
            ),
        ];
        for (slot, merchant, set, hash) in cases {
            assert_eq!(slot_key(&slot), set);
            assert_eq!(merchant_key(&slot, merchant), hash);
        }
        assert_eq!(slot_field(Granularity::Hour, 3_600_000), "hour:3600000");
        assert_eq!(day_of(DAY_MS + 5), DAY_MS);
        assert_eq!(day_of(-1), -DAY_MS, "before 1970 still floors");
    }

    #[test]
    fn a_day_hash_parses_into_results_and_its_checked_epoch() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(f, v)| ((*f).to_owned(), (*v).to_owned()))
                .collect()
        };
        let day = parse_day(
            fields(&[
                ("window:60000", r#"3 {"gmv":5}"#),
                ("hour:0", r#"4 {"gmv":9}"#),
                ("_epoch", "7"),
                ("future:1", "anything"),
            ]),
            "k",
        );
        let day = day.ok().unwrap_or_default();
        assert_eq!(day.checked_epoch, Some(7));
        assert_eq!(day.results.len(), 2);
        assert_eq!(day.results[&(Granularity::Window, 60_000)].version, 3);
        assert_eq!(day.results[&(Granularity::Hour, 0)].metrics, r#"{"gmv":9}"#);
        for bad in [
            ("window:1", "3"),
            ("window:1", "x {}"),
            ("window:1", "3 {not json"),
            ("_epoch", "seven"),
        ] {
            assert!(
                matches!(parse_day(fields(&[bad]), "k"), Err(ResultsError::Corrupt { .. })),
                "{bad:?}"
            );
        }
        assert!(parse_day(Vec::new(), "k").is_ok_and(|d| d.is_empty()));
    }
}
