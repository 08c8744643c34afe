//! Where a task's results go: the hot MySQL ([`hot`], sharded by merchant across
//! databases and tables) and the Redis cache ([`cache`], written as well so the
//! query service reads today's data from it), both fenced by the task's version:
//! a write with a lower version than the stored one never replaces it.

pub mod cache;
pub mod days;
pub mod hot;

pub use cache::ResultCache;
pub use hot::HotStore;

use crate::routing::stable_hash;

/// The time granularity of a set of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    /// One window (the master's compute task).
    Window,
    /// One period (an hour by default) to date: computed over its events,
    /// not rolled up from windows.
    Hour,
    /// One UTC day to date, computed over its events.
    Day,
}

impl Granularity {
    /// The name stored in keys and rows: `window`, `hour` or `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Window => "window",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    /// The granularity named `name` (as [`Self::as_str`] gives it).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "window" => Some(Granularity::Window),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }
}

/// What a set of results is for: a pipeline's window (or hour) starting at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The AnalyticsPipeline's name.
    pub pipeline: String,
    /// Window or hour.
    pub granularity: Granularity,
    /// Start of the window or hour, in milliseconds since the Unix epoch.
    pub window_start_ms: i64,
}

/// What a fenced write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// Rows stored (new, or replacing a row of a lower or the same version).
    pub written: u64,
    /// Rows left alone because the stored version was higher (a stale task).
    pub refused: u64,
}

impl std::ops::AddAssign for Fenced {
    fn add_assign(&mut self, other: Fenced) {
        self.written += other.written;
        self.refused += other.refused;
    }
}

/// One merchant's stored result.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The version of the task that wrote it.
    pub version: u64,
    /// The metrics, as the compute produced them.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// One merchant's stored result with its metrics as the stored JSON text
/// (checked to be a JSON object), for readers that pass it on unparsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredText {
    /// The version of the task that wrote it.
    pub version: u64,
    /// The metrics object, as JSON text.
    pub metrics: String,
    /// Its keys (the result columns), in order.
    pub columns: Vec<String>,
}

impl StoredText {
    /// `metrics` if it is a JSON object (checked without building its values). Pure.
    pub fn checked(version: u64, metrics: String) -> Result<Self, String> {
        let columns = object_keys(&metrics).map_err(|e| format!("metrics: {e}"))?;
        Ok(Self {
            version,
            metrics,
            columns,
        })
    }
}

/// The keys of the JSON object `text`, read without building its values;
/// an error if `text` is not one JSON object. Pure.
pub fn object_keys(text: &str) -> Result<Vec<String>, serde_json::Error> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(key);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let keys = (&mut de).deserialize_map(Keys)?;
    de.end()?;
    Ok(keys)
}

impl From<&Stored> for StoredText {
    fn from(stored: &Stored) -> Self {
        Self {
            version: stored.version,
            metrics: serde_json::Value::Object(stored.metrics.clone()).to_string(),
            columns: stored.metrics.keys().cloned().collect(),
        }
    }
}

/// Errors of the result stores.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// MySQL failed or is unreachable (connection or statement): the caller retries.
    #[error("hot MySQL: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// Redis failed or is unreachable: the caller retries.
    #[error("Redis cache: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored value cannot be parsed: something else wrote there.
    #[error("stored result at {location} is unreadable: {reason}")]
    Corrupt {
        /// Where (table and merchant, or key).
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// The same merchant appears twice in one write (the compute guarantees it does not).
    #[error("merchant {0:?} appears twice in one result write")]
    DuplicateMerchant(String),
    /// The hot pool enables `client_found_rows`, which makes refused rows
    /// indistinguishable from inserted ones: remove it from the MySQL URL.
    #[error(
        "the hot MySQL pool must not set client_found_rows: the version fence counts rows by affected rows"
    )]
    FoundRows,
    /// MySQL's reply to a write does not add up (unexpected server behaviour).
    #[error("hot MySQL reply to a write of {rows} rows does not add up: {detail}")]
    Reply {
        /// Rows sent.
        rows: u64,
        /// Affected rows and info string.
        detail: String,
    },
}

/// The shard of a merchant: (database index, table index), from the stable
/// hash of its id, so every writer and reader agrees without coordination.
pub fn shard(merchant: &str, databases: u32, tables: u32) -> (u32, u32) {
    let databases = u64::from(databases.max(1));
    let tables = u64::from(tables.max(1));
    let h = stable_hash(merchant.as_bytes());
    // Different bits pick the database and the table, so the two are independent.
    let database = h % databases;
    let table = (h / databases) % tables;
    (database as u32, table as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn granularities_have_stable_names() {
        assert_eq!(Granularity::Window.as_str(), "window");
        assert_eq!(Granularity::Hour.as_str(), "hour");
        assert_eq!(Granularity::Day.as_str(), "day");
        for g in [Granularity::Window, Granularity::Hour, Granularity::Day] {
            assert_eq!(Granularity::parse(g.as_str()), Some(g));
        }
        assert_eq!(Granularity::parse("week"), None);
    }

    #[test]
    fn only_a_json_object_passes_as_stored_metrics_text() {
        let cases = [
            (r#"{"gmv":5,"top":"a,b"}"#, true),
            ("{}", true),
            (r#"{"a":{"b":[1,2]}}"#, true),
            ("[1]", false),
            ("5", false),
            ("{not json", false),
            (r#"{"a":1} trailing"#, false),
            ("", false),
        ];
        for (text, ok) in cases {
            assert_eq!(StoredText::checked(1, text.into()).is_ok(), ok, "{text:?}");
        }
        assert_eq!(
            object_keys(r#"{"gmv":5,"a\"b":{"x":1},"t":"s"}"#).ok(),
            Some(vec!["gmv".to_owned(), "a\"b".to_owned(), "t".to_owned()])
        );
    }

    #[test]
    fn a_merchant_always_lands_on_the_same_shard() {
        for (merchant, databases, tables) in [("m1", 2, 4), ("shop-42", 3, 5), ("", 1, 1), ("é", 2, 4)] {
            let first = shard(merchant, databases, tables);
            assert_eq!(shard(merchant, databases, tables), first);
            assert!(first.0 < databases && first.1 < tables, "{merchant}: {first:?}");
        }
        assert_eq!(shard("m1", 0, 0), (0, 0), "zero shards means one");
    }

    #[test]
    fn ten_thousand_merchants_spread_over_every_shard() {
        for (databases, tables) in [(2, 4), (3, 5), (1, 8), (4, 1)] {
            let mut counts: BTreeMap<(u32, u32), u32> = BTreeMap::new();
            for i in 0..10_000 {
                *counts
                    .entry(shard(&format!("m{i}"), databases, tables))
                    .or_default() += 1;
            }
            let shards = databases * tables;
            assert_eq!(counts.len() as u32, shards, "{databases}x{tables}");
            let fair = 10_000 / shards;
            // Within 20% of an even split.
            assert!(
                counts.values().all(|&n| n > fair * 8 / 10 && n < fair * 12 / 10),
                "{counts:?}"
            );
        }
    }
}
