//! The KV store's layout of events per time window, and its reader and writer.
//!
//! - `ballast:{pipeline}:w:{window_start_ms}:m:{merchant}` — a hash of
//!   event id → protobuf-encoded `ChangeEvent`: one merchant's events of one
//!   window. Keyed by event id, a redelivered Kafka message or a retried batch
//!   never duplicates an event (it rewrites the same bytes).
//! - `ballast:{pipeline}:w:{window_start_ms}` — the set of merchants with
//!   events in the window, so "all events of window W" is one `SMEMBERS` and a
//!   pipelined `HGETALL` per merchant.
//!
//! Every key expires after the retention, renewed by the writes. A writer
//! skips renewing a key it renewed lately over the same connection; after a
//! reconnect (the store may have restarted and lost every key and TTL) it
//! renews each key again at its next write.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;
use redis::aio::ConnectionManager;

use crate::wire::ChangeEvent;

/// How long the roles keep window buckets after their last write: long past a
/// day of windows, since the compute side reads them after a window closes
/// (and again after a MySQL outage).
pub const BUCKET_TTL_SECONDS: i64 = 2 * 86_400;

/// Errors of the KV store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Redis failed or is unreachable: the caller retries, the data plane may switch modes.
    #[error("KV store: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored value is not a valid event.
    #[error("KV store holds an undecodable event under {key}: {source}")]
    Corrupt {
        /// The hash key.
        key: String,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },
}

/// What a write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Events stored for the first time.
    pub new: u64,
    /// Events already stored (same id): left as they were.
    pub duplicates: u64,
}

/// The key layout of one pipeline. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pipeline: String,
    window_ms: i64,
}

impl Layout {
    /// Layout for `pipeline` with windows of `window_ms`.
    pub fn new(pipeline: impl Into<String>, window_ms: i64) -> Self {
        Self {
            pipeline: pipeline.into(),
            window_ms: window_ms.max(1),
        }
    }

    /// Start of the window holding `time_ms`.
    pub fn window_of(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.window_ms) * self.window_ms
    }

    /// Starts of the windows that start in `[start_ms, end_ms)`.
    pub fn windows_in(&self, start_ms: i64, end_ms: i64) -> Vec<i64> {
        let mut starts = Vec::new();
        let mut start = self.window_of(start_ms);
        if start < start_ms {
            start += self.window_ms;
        }
        while start < end_ms {
            starts.push(start);
            start += self.window_ms;
        }
        starts
    }

    /// The key whose presence says the store still holds what was written:
    /// it has no expiry, so only a store that lost its data lacks it.
    pub fn marker_key(&self) -> String {
        format!("ballast:{}:marker", self.pipeline)
    }

    /// The set of merchants of a window.
    pub fn window_key(&self, window_start_ms: i64) -> String {
        format!("ballast:{}:w:{window_start_ms}", self.pipeline)
    }

    /// The hash of one merchant's events in a window.
    pub fn merchant_key(&self, window_start_ms: i64, merchant: &str) -> String {
        format!("ballast:{}:w:{window_start_ms}:m:{merchant}", self.pipeline)
    }
}

/// Merchant hashes whose TTL this process renewed lately, when (seconds) and
/// over which connection, by window. Renewing one again within half the TTL
/// only costs the KV store work: an EXPIRE per merchant per batch was as much
/// as the writes themselves. Looked up by window, then merchant, before any
/// key is built: this runs for every merchant of every batch.
///
/// A connection is named by its Redis client id. A renewal made over another
/// connection than the current one proves nothing: the store may have
/// restarted in between, without persistence, and recreated the key bare.
#[derive(Clone, Debug, Default)]
pub struct Renewals {
    at: HashMap<i64, HashMap<String, Renewed>>,
    len: usize,
    /// The client id of the connection the last write went over.
    connection: i64,
}

/// When a key's TTL was renewed, and over which connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Renewed {
    at_s: i64,
    connection: i64,
}

/// Keys remembered before old ones are forgotten.
const RENEWALS_KEPT: usize = 200_000;

impl Renewals {
    /// Whether the hash of `merchant` in `window` needs its TTL renewed at
    /// `now_s`, over the connection last written over; if so it counts as
    /// renewed. Pure.
    pub fn due(&mut self, window: i64, merchant: &str, now_s: i64, ttl_seconds: i64) -> bool {
        let fresh = ttl_seconds / 2;
        if let Some(r) = self.at.get(&window).and_then(|m| m.get(merchant))
            && now_s - r.at_s < fresh
            && r.connection == self.connection
        {
            return false;
        }
        if self.len >= RENEWALS_KEPT {
            for merchants in self.at.values_mut() {
                merchants.retain(|_, r| now_s - r.at_s < fresh);
            }
            self.at.retain(|_, merchants| !merchants.is_empty());
            self.len = self.at.values().map(HashMap::len).sum();
        }
        let renewed = Renewed {
            at_s: now_s,
            connection: self.connection,
        };
        let merchants = self.at.entry(window).or_default();
        if merchants.insert(merchant.to_owned(), renewed).is_none() {
            self.len += 1;
        }
        true
    }

    /// The connection (a Redis client id) writes are known to go over.
    pub fn connection(&self) -> i64 {
        self.connection
    }

    /// Records that a write went over `connection`. Whether it differs from
    /// `known`, the one the write's skipped renewals were judged by: then
    /// they prove nothing and must be made after all. Pure.
    pub fn went_over(&mut self, connection: i64, known: i64) -> bool {
        self.connection = connection;
        connection != known
    }
}

/// Reads and writes events in the KV store.
#[derive(Clone)]
pub struct KvStore {
    layout: Layout,
    ttl_seconds: i64,
    conn: ConnectionManager,
    renewals: Arc<Mutex<Renewals>>,
}

impl KvStore {
    /// A store over `conn`; keys live `ttl_seconds` after their last write.
    pub fn new(conn: ConnectionManager, layout: Layout, ttl_seconds: i64) -> Self {
        Self {
            layout,
            ttl_seconds: ttl_seconds.max(1),
            conn,
            renewals: Arc::default(),
        }
    }

    /// The store's marker (see `roles::intake::refill`), if it has one.
    pub async fn marker(&mut self) -> Result<Option<String>, KvError> {
        Ok(redis::cmd("GET")
            .arg(self.layout.marker_key())
            .query_async(&mut self.conn)
            .await?)
    }

    /// Sets the marker to `value` unless one is set; returns the one set now.
    pub async fn mark(&mut self, value: &str) -> Result<String, KvError> {
        let (current,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(self.layout.marker_key())
            .arg(value)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(self.layout.marker_key())
            .query_async(&mut self.conn)
            .await?;
        Ok(current)
    }

    /// Writes a batch in one round trip; idempotent on event ids.
    pub async fn write(&mut self, events: &[ChangeEvent]) -> Result<Written, KvError> {
        if events.is_empty() {
            return Ok(Written::default());
        }
        // One HSET per merchant hash and one SADD per window: HSET counts the
        // fields it added, so redelivered ids (same content) count as duplicates.
        let mut hashes: BTreeMap<(i64, &str), Vec<&ChangeEvent>> = BTreeMap::new();
        for event in events {
            hashes
                .entry((self.layout.window_of(event.event_time_ms), &event.merchant_id))
                .or_default()
                .push(event);
        }
        let mut windows: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        // Keys whose renewal was skipped as made lately over the `known` connection.
        let mut skipped: Vec<(i64, &str)> = Vec::new();
        let known;
        let mut pipe = redis::pipe();
        // Which connection this write goes over: answered in order with the writes.
        pipe.cmd("CLIENT").arg("ID");
        let now_s = k8s_openapi::jiff::Timestamp::now().as_second();
        {
            let mut renewals = self.renewals.lock().unwrap_or_else(PoisonError::into_inner);
            known = renewals.connection();
            for ((window, merchant), group) in &hashes {
                let hash = self.layout.merchant_key(*window, merchant);
                let hset = pipe.cmd("HSET").arg(&hash);
                for event in group {
                    hset.arg(&event.event_id).arg(event.encode_to_vec());
                }
                if renewals.due(*window, merchant, now_s, self.ttl_seconds) {
                    pipe.cmd("EXPIRE").arg(&hash).arg(self.ttl_seconds).ignore();
                } else {
                    skipped.push((*window, merchant));
                }
                windows.entry(*window).or_default().push(merchant);
            }
        }
        for (window, merchants) in &windows {
            let set = self.layout.window_key(*window);
            pipe.cmd("SADD").arg(&set).arg(merchants).ignore();
            pipe.cmd("EXPIRE").arg(&set).arg(self.ttl_seconds).ignore();
        }
        let replies: Vec<i64> = pipe.query_async(&mut self.conn).await?;
        let (connection, added) = replies.split_first().map_or((0, &[][..]), |(c, a)| (*c, a));
        self.renew_skipped_after_reconnect(connection, known, &skipped, now_s)
            .await?;
        let new = added.iter().map(|n| n.unsigned_abs()).sum::<u64>();
        Ok(Written {
            new,
            duplicates: events.len() as u64 - new,
        })
    }

    /// Renews the TTL of the keys `write` skipped as renewed lately over the
    /// `known` connection, if the write went over another: the store may have
    /// restarted in between and lost them.
    async fn renew_skipped_after_reconnect(
        &mut self,
        connection: i64,
        known: i64,
        skipped: &[(i64, &str)],
        now_s: i64,
    ) -> Result<(), KvError> {
        let mut pipe = redis::pipe();
        {
            let mut renewals = self.renewals.lock().unwrap_or_else(PoisonError::into_inner);
            if !renewals.went_over(connection, known) || skipped.is_empty() {
                return Ok(());
            }
            for (window, merchant) in skipped {
                // Made over an earlier connection, the renewal is due now.
                renewals.due(*window, merchant, now_s, self.ttl_seconds);
                pipe.cmd("EXPIRE")
                    .arg(self.layout.merchant_key(*window, merchant))
                    .arg(self.ttl_seconds)
                    .ignore();
            }
        }
        tracing::info!(
            stale = skipped.len(),
            "renewing TTLs last renewed over an earlier KV connection"
        );
        pipe.query_async::<()>(&mut self.conn).await?;
        Ok(())
    }

    /// One merchant's events of one window, in event-id order.
    pub async fn merchant(
        &mut self,
        window_start_ms: i64,
        merchant: &str,
    ) -> Result<Vec<ChangeEvent>, KvError> {
        let key = self.layout.merchant_key(window_start_ms, merchant);
        let values: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut self.conn)
            .await?;
        decode(&key, values)
    }

    /// How many events one window holds (without reading them).
    pub async fn count(&mut self, window_start_ms: i64) -> Result<u64, KvError> {
        let merchants: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.layout.window_key(window_start_ms))
            .query_async(&mut self.conn)
            .await?;
        if merchants.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for m in &merchants {
            pipe.cmd("HLEN").arg(self.layout.merchant_key(window_start_ms, m));
        }
        let lens: Vec<u64> = pipe.query_async(&mut self.conn).await?;
        Ok(lens.iter().sum())
    }

    /// All events of one window.
    pub async fn window(&mut self, window_start_ms: i64) -> Result<Vec<ChangeEvent>, KvError> {
        self.partition(window_start_ms, 0, 1).await
    }

    /// The events of one window of the merchants in `partition` of `partitions`
    /// (by `stable_hash(merchant) % partitions`): one task's share of a large window.
    pub async fn partition(
        &mut self,
        window_start_ms: i64,
        partition: u32,
        partitions: u32,
    ) -> Result<Vec<ChangeEvent>, KvError> {
        let end_ms = window_start_ms + self.layout.window_ms;
        self.span(window_start_ms, end_ms, partition, partitions).await
    }

    /// The events of every window starting in `[start_ms, end_ms)` of the
    /// merchants in `partition` of `partitions`: a to-date task (an hour, a
    /// day) reads its span's windows. Every window's merchants in one round
    /// trip, then their hashes in bounded round trips.
    pub async fn span(
        &mut self,
        start_ms: i64,
        end_ms: i64,
        partition: u32,
        partitions: u32,
    ) -> Result<Vec<ChangeEvent>, KvError> {
        let starts = self.layout.windows_in(start_ms, end_ms);
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for start in &starts {
            pipe.cmd("SMEMBERS").arg(self.layout.window_key(*start));
        }
        let sets: Vec<Vec<String>> = pipe.query_async(&mut self.conn).await?;
        let keys: Vec<String> = starts
            .iter()
            .zip(&sets)
            .flat_map(|(start, merchants)| {
                merchants
                    .iter()
                    .filter(|m| in_partition(m, partition, partitions))
                    .map(|m| self.layout.merchant_key(*start, m))
            })
            .collect();
        let mut events = Vec::new();
        // Bounded replies: a day of windows may name many hashes.
        for chunk in keys.chunks(HASHES_PER_ROUND_TRIP) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("HGETALL").arg(key);
            }
            let hashes: Vec<Vec<(String, Vec<u8>)>> = pipe.query_async(&mut self.conn).await?;
            for (key, values) in chunk.iter().zip(hashes) {
                events.extend(decode(key, values)?);
            }
        }
        Ok(events)
    }
}

/// Merchant hashes read per round trip by [`KvStore::span`].
const HASHES_PER_ROUND_TRIP: usize = 1_000;

/// Whether `merchant` belongs to `partition` of `partitions`. Pure.
pub fn in_partition(merchant: &str, partition: u32, partitions: u32) -> bool {
    partitions <= 1
        || crate::routing::stable_hash(merchant.as_bytes()) % u64::from(partitions) == u64::from(partition)
}

fn decode(key: &str, mut values: Vec<(String, Vec<u8>)>) -> Result<Vec<ChangeEvent>, KvError> {
    values.sort_by(|a, b| a.0.cmp(&b.0));
    values
        .into_iter()
        .map(|(_, bytes)| {
            ChangeEvent::decode(bytes.as_slice()).map_err(|source| KvError::Corrupt {
                key: key.to_owned(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_an_event_in_its_window_and_merchant_hash() {
        let layout = Layout::new("shop", 60_000);
        assert_eq!(layout.window_of(125_000), 120_000);
        assert_eq!(
            layout.window_of(-1),
            -60_000,
            "windows before the epoch round down too"
        );
        assert_eq!(layout.window_key(120_000), "ballast:shop:w:120000");
        assert_eq!(layout.merchant_key(120_000, "m-7"), "ballast:shop:w:120000:m:m-7");
    }

    #[test]
    fn a_span_reads_the_windows_that_start_within_it() {
        let layout = Layout::new("shop", 60_000);
        let cases: [(i64, i64, Vec<i64>); 5] = [
            (0, 60_000, vec![0]),
            (0, 180_000, vec![0, 60_000, 120_000]),
            (0, 0, vec![]),
            // A span not on a window boundary: the windows starting inside it.
            (30_000, 150_000, vec![60_000, 120_000]),
            (-60_000, 1, vec![-60_000, 0]),
        ];
        for (start, end, want) in cases {
            assert_eq!(layout.windows_in(start, end), want, "[{start}, {end})");
        }
    }

    #[test]
    fn a_ttl_is_renewed_once_per_half_ttl_per_key() {
        let mut r = Renewals::default();
        let cases = [
            (0, "a", 0, true),
            (0, "a", 10, false),
            (0, "b", 10, true),
            (60, "a", 10, true),
            (0, "a", 49, false),
            (0, "a", 50, true),
            (0, "a", 60, false),
            (60, "a", 59, false),
        ];
        for (window, merchant, now, want) in cases {
            assert_eq!(
                r.due(window, merchant, now, 100),
                want,
                "{merchant} of {window} at {now}"
            );
        }
    }

    #[test]
    fn a_renewal_over_an_earlier_connection_is_renewed_again() {
        let mut r = Renewals::default();
        assert!(
            r.went_over(7, 0),
            "the first write learns its connection (it skipped nothing)"
        );
        assert!(r.due(0, "a", 0, 100));
        assert!(!r.due(0, "a", 1, 100));
        assert_eq!(r.connection(), 7, "skipped as renewed over 7");
        // The next write went over connection 8 (a reconnect, maybe to a
        // restarted store): what it skipped is stale and renewed...
        assert!(r.went_over(8, 7));
        assert!(r.due(0, "a", 2, 100));
        // ...and skipped again only over the same connection.
        assert!(!r.due(0, "a", 3, 100));
        assert_eq!(r.connection(), 8, "skipped as renewed over 8");
        assert!(!r.went_over(8, 8));
    }

    #[test]
    fn a_full_renewal_memory_forgets_only_what_is_due_again() {
        let mut r = Renewals::default();
        for m in 0..RENEWALS_KEPT {
            assert!(r.due(0, &format!("m{m}"), 0, 100));
        }
        assert!(r.due(60, "late", 60, 100), "new key at the bound");
        assert_eq!(
            r.len, 1,
            "everything renewed at 0 is due again at 60 and forgotten"
        );
        assert!(!r.due(60, "late", 61, 100), "kept");
        assert!(r.due(0, "m0", 61, 100), "forgotten, so due");
    }

    #[test]
    fn partitions_cover_every_merchant_exactly_once() {
        for partitions in [1, 2, 7] {
            for m in 0..500 {
                let merchant = format!("m-{m}");
                let owners = (0..partitions)
                    .filter(|p| in_partition(&merchant, *p, partitions))
                    .count();
                assert_eq!(owners, 1, "{merchant} in {partitions} partitions");
            }
        }
    }
}
