//! The member cache: one Redis per data centre, read locally, invalidated in
//! every data centre by each write, which succeeds only when all of them
//! accept (seed 004's 双中心多集群).
//!
//! Consistency against Elasticsearch's one-second refresh (and a replica's
//! lag) is a lease, as memcache's: each key has a version and a lock. A
//! write, in one script per key set, bumps each key's version, takes its
//! lock for [`LOCK`] (longer than a refresh) and deletes it: once before the
//! stores are written and once after. A reader that misses gets the
//! version with its miss, reads the store, and may fill only through a
//! script that checks, atomically with the fill, that no lock is held and
//! the version is the one it got. The seed's race (a reader stalled between
//! its check and its fill while a writer locks and deletes) therefore ends
//! with the fill refused: the writer changed the version.
//!
//! A member's entry also keeps a floor: the member's version after the last
//! write. A fill of an older member (or of none) is refused whenever it
//! comes, so a replica lagging longer than the lock cannot cache the past.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::model::Identity;

/// How long a write's lock keeps readers from filling: longer than
/// Elasticsearch's refresh interval (1 s) and a replica's usual lag, as the
/// seed's 2 s.
pub const LOCK: Duration = Duration::from_secs(2);

/// How long a filled entry lives: a missed invalidation heals by then.
pub const TTL: Duration = Duration::from_secs(600);

/// How long a key's version is kept after its last write: longer than any
/// reader may take between its miss and its fill ([`MAX_FILL_DELAY`]).
const VERSION_TTL: Duration = Duration::from_secs(86_400);

/// A reader that took longer than this between its miss and its fill does
/// not fill (its version may have expired and come back as the same value).
pub const MAX_FILL_DELAY: Duration = Duration::from_secs(60);

/// What a cache entry answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A member by id.
    Member(u64),
    /// The member an identity is bound to.
    Identity(Identity),
}

/// The key names of one store's cache, under a prefix of its own.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of MemberStore `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            prefix: ballast_crds::member_store::cache_prefix(namespace, name),
        }
    }

    /// The entry's Redis key. Pure.
    pub fn entry(&self, key: &Key) -> String {
        match key {
            Key::Member(id) => format!("{}m:{id}", self.prefix),
            Key::Identity(i) => format!("{}i:{}:{}", self.prefix, i.kind.as_str(), i.value),
        }
    }
}

/// A miss: the token a fill must present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The key's version when the miss was seen.
    pub version: i64,
    /// A write held the key's lock: do not fill at all.
    pub locked: bool,
    /// When the miss was seen.
    pub at: std::time::Instant,
}

/// What a read of the cache found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The cached answer.
    Hit(String),
    /// Nothing cached; fill with this lease.
    Miss(Lease),
}

/// Whether a fill was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The entry is cached.
    Filled,
    /// A write held the lock or changed the version since the miss: the
    /// answer read may be stale, and is not cached.
    Refused,
    /// The miss saw a lock, or is too old: no fill was tried.
    Skipped,
}

/// KEYS: the entry. Returns {entry or false, version or false, lock exists}.
const READ: &str = r"
local value = redis.call('GET', KEYS[1])
local version = redis.call('GET', KEYS[1] .. '|v')
local locked = redis.call('EXISTS', KEYS[1] .. '|l')
return {value, version, locked}
";

/// KEYS: the entry. ARGV: the lease's version, the value, TTL ms, the
/// value's member version (0: no member). Fills only if no lock is held,
/// the version is unchanged and the value is not below the floor: 1 filled,
/// 0 refused.
const FILL: &str = r"
if redis.call('EXISTS', KEYS[1] .. '|l') == 1 then return 0 end
local version = tonumber(redis.call('GET', KEYS[1] .. '|v') or '0')
if version ~= tonumber(ARGV[1]) then return 0 end
local floor = tonumber(redis.call('GET', KEYS[1] .. '|f') or '0')
if tonumber(ARGV[4]) < floor then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// KEYS: entries. ARGV: lock ms, version TTL ms, then one floor per entry
/// (0: none). Bumps each version, raises each floor, locks and deletes each
/// entry.
const INVALIDATE: &str = r"
for i, key in ipairs(KEYS) do
  redis.call('INCR', key .. '|v')
  redis.call('PEXPIRE', key .. '|v', ARGV[2])
  local floor = tonumber(ARGV[2 + i])
  if floor > tonumber(redis.call('GET', key .. '|f') or '0') then
    redis.call('SET', key .. '|f', floor, 'PX', ARGV[2])
  end
  redis.call('SET', key .. '|l', '1', 'PX', ARGV[1])
  redis.call('DEL', key)
end
return #KEYS
";

/// An entry to invalidate, with the floor its fills must reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    /// The entry's Redis key.
    pub key: String,
    /// The least member version a fill may cache (0: any, or none).
    pub floor: u64,
}

/// One data centre's member cache.
#[derive(Clone)]
pub struct DcCache {
    /// The data centre's name.
    pub name: String,
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
}

/// The scripts, with their digests (`EVALSHA` first, `EVAL` when the server lacks them).
struct Scripts {
    read: Script,
    fill: Script,
    invalidate: Script,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl DcCache {
    /// Its breaker's target: this data centre's Redis, apart from the others'.
    pub fn target(&self) -> ballast_flow::Target<'_> {
        ballast_flow::Target::new(ballast_flow::GuardedDependency::Redis, &self.name)
    }

    /// The cache of data centre `name` on `conn` (whose response timeout is
    /// the deadline of each call).
    pub fn new(name: &str, conn: ConnectionManager) -> Self {
        Self {
            name: name.to_owned(),
            conn,
            scripts: Arc::new(Scripts {
                read: Script::new(READ),
                fill: Script::new(FILL),
                invalidate: Script::new(INVALIDATE),
            }),
        }
    }

    /// The entry `key`, or a lease to fill it.
    pub async fn read(&self, key: &str) -> Result<Lookup, redis::RedisError> {
        let mut conn = self.conn.clone();
        // A hit, most reads, is one plain GET; only a miss runs the script
        // that reads its lease (and the entry again, should it have been filled).
        let hit: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        if let Some(value) = hit {
            return Ok(Lookup::Hit(value));
        }
        let (value, version, locked): (Option<String>, Option<i64>, i64) =
            self.scripts.read.key(key).invoke_async(&mut conn).await?;
        Ok(match value {
            Some(v) => Lookup::Hit(v),
            None => Lookup::Miss(Lease {
                version: version.unwrap_or(0),
                locked: locked == 1,
                at: std::time::Instant::now(),
            }),
        })
    }

    /// Caches `value` (of a member at `version`, 0 for none) under `key` if
    /// `lease` still holds and the key's floor allows it.
    pub async fn fill(
        &self,
        key: &str,
        lease: &Lease,
        value: &str,
        version: u64,
    ) -> Result<Fill, redis::RedisError> {
        if lease.locked || lease.at.elapsed() > MAX_FILL_DELAY {
            return Ok(Fill::Skipped);
        }
        let mut conn = self.conn.clone();
        let filled: i64 = self
            .scripts
            .fill
            .key(key)
            .arg(lease.version)
            .arg(value)
            .arg(millis(TTL))
            .arg(version)
            .invoke_async(&mut conn)
            .await?;
        Ok(if filled == 1 { Fill::Filled } else { Fill::Refused })
    }

    /// Bumps, raises the floor of, locks and deletes every entry of `stale`, in one script.
    pub async fn invalidate(&self, stale: &[Stale]) -> Result<(), redis::RedisError> {
        if stale.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.invalidate.prepare_invoke();
        for entry in stale {
            invocation.key(&entry.key);
        }
        invocation.arg(millis(LOCK)).arg(millis(VERSION_TTL));
        for entry in stale {
            invocation.arg(entry.floor);
        }
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::model::IdentityKind;

    #[test]
    fn the_scripts_keep_their_bookkeeping_under_the_suffixes_a_purge_spares() {
        for suffix in ballast_crds::member_store::CACHE_BOOKKEEPING {
            let quoted = format!("'{suffix}'");
            assert!(
                READ.contains(&quoted) || FILL.contains(&quoted) || INVALIDATE.contains(&quoted),
                "no script uses {suffix}"
            );
        }
        for script in [READ, FILL, INVALIDATE] {
            for used in script
                .split('\'')
                .skip(1)
                .step_by(2)
                .filter(|s| s.starts_with('|'))
            {
                assert!(
                    ballast_crds::member_store::CACHE_BOOKKEEPING.contains(&used),
                    "{used} is not spared by a purge"
                );
            }
        }
    }

    #[test]
    fn every_answer_has_its_own_key_under_the_store_prefix() {
        let keys = Keys::new("ns", "ms");
        let phone = Identity {
            kind: IdentityKind::Phone,
            value: "13812345678".into(),
        };
        assert_eq!(keys.entry(&Key::Member(7)), "ballast:members:ns/ms:m:7");
        assert_eq!(
            keys.entry(&Key::Identity(phone)),
            "ballast:members:ns/ms:i:phone:13812345678"
        );
        assert!(
            keys.entry(&Key::Member(7))
                .starts_with(&ballast_crds::member_store::cache_prefix("ns", "ms")),
            "the operator empties a returning cache by this prefix"
        );
    }

    #[test]
    fn the_lock_outlasts_an_elasticsearch_refresh() {
        assert!(LOCK > Duration::from_secs(1));
        assert!(VERSION_TTL > MAX_FILL_DELAY * 10);
    }
}
