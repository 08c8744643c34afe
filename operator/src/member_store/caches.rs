//! Each data centre's member cache through an outage: the prober's machine
//! finds it down (published `Degraded`: the member services leave it out of
//! writes and read around it), then answering again (`Recovering`: writes
//! invalidate it again, nothing reads it). It missed every invalidation of
//! the outage, so before it is read again the operator empties it of the
//! store's entries, after a grace that lets every member service see
//! `Recovering` first, and only then publishes it `Normal`. The decisions
//! are pure ([`next`], [`published`], [`announcements`]); emptying is the
//! one call to Redis.

use std::time::Duration;

use ballast_crds::member_store::{CACHE_BOOKKEEPING, CacheStatus, cache_prefix};
use ballast_crds::refs::RedisRef;
use ballast_crds::{MemberStore, Mode};
use ballast_node::secret::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::time::Instant;

use super::fetch::Credentials;
use super::{StoreState, Watched};
use crate::context::Context;
use crate::probe;

/// How long a returning cache stays `Recovering` before it is emptied: longer
/// than a status change takes to reach the member services' watches, so that
/// no write still leaves it out once it is emptied (a write that did would
/// leave an entry the emptying cannot have removed).
pub const GRACE: Duration = Duration::from_secs(3);

/// Deadline of each call to a cache while emptying it.
const DEADLINE: Duration = Duration::from_secs(2);

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// One data centre's cache since it last changed mode.
#[derive(Clone, Debug, Default)]
pub struct Returning {
    /// When it entered `Recovering` (this operator's clock), while it is.
    since: Option<Instant>,
    /// Whether it has been emptied since it entered `Recovering`.
    pub emptied: bool,
    /// The cause of its last transition.
    reason: Option<&'static str>,
}

impl Returning {
    /// Records that the cache entered `mode` for `reason` at `now`.
    pub fn entered(&mut self, mode: Mode, reason: &'static str, now: Instant) {
        self.since = (mode == Mode::Recovering).then_some(now);
        self.emptied = false;
        self.reason = Some(reason);
    }
}

/// What to do next with a data centre's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing: it is in use, or down.
    Hold,
    /// Look again in this long: the grace is not over.
    Wait(Duration),
    /// Empty it now.
    Empty,
    /// It is emptied: publish it `Normal`.
    Restore,
}

/// What to do with a cache in `mode`, `Recovering` for `recovering_for`
/// (unknown to a new leader: it starts the grace again), `emptied` or not. Pure.
pub fn next(mode: Mode, recovering_for: Option<Duration>, emptied: bool) -> Next {
    match (mode, emptied) {
        (Mode::Recovering, true) => Next::Restore,
        (Mode::Recovering, false) => match recovering_for {
            Some(waited) if waited >= GRACE => Next::Empty,
            Some(waited) => Next::Wait(GRACE - waited),
            None => Next::Wait(GRACE),
        },
        (Mode::Normal | Mode::Degraded, _) => Next::Hold,
    }
}

/// Why a cache could not be emptied.
#[derive(Debug, thiserror::Error)]
pub enum EmptyError {
    /// The cache refused a connection or a command.
    #[error("redis {address}: {source}")]
    Redis {
        /// The server's `host:port`.
        address: String,
        /// What it answered.
        #[source]
        source: redis::RedisError,
    },
    /// The cache did not answer within the deadline.
    #[error("redis {address}: no answer within {} ms", DEADLINE.as_millis())]
    TimedOut {
        /// The server's `host:port`.
        address: String,
    },
}

/// `call` to the cache at `address` within [`DEADLINE`].
async fn within<T>(
    address: &str,
    call: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, EmptyError> {
    match tokio::time::timeout(DEADLINE, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(source)) => Err(EmptyError::Redis {
            address: address.to_owned(),
            source,
        }),
        Err(_) => Err(EmptyError::TimedOut {
            address: address.to_owned(),
        }),
    }
}

/// Deletes every entry of the store whose keys start with `prefix` from the
/// cache `server` (sparing the entries' bookkeeping); how many it deleted.
pub async fn empty(server: &RedisRef, password: Option<&Secret>, prefix: &str) -> Result<u64, EmptyError> {
    let address = server.address.as_str();
    let refused = |source| EmptyError::Redis {
        address: address.to_owned(),
        source,
    };
    let info = ballast_node::connect::redis(server, password).map_err(refused)?;
    let client = redis::Client::open(info).map_err(refused)?;
    let mut conn = within(address, client.get_multiplexed_async_connection()).await?;
    let pattern = format!("{prefix}*");
    let (mut cursor, mut deleted) = (0_u64, 0_u64);
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys) = within(address, scan.query_async::<(u64, Vec<String>)>(&mut conn)).await?;
        let entries: Vec<&String> = keys
            .iter()
            .filter(|k| !CACHE_BOOKKEEPING.iter().any(|suffix| k.ends_with(suffix)))
            .collect();
        if !entries.is_empty() {
            let mut del = redis::cmd("DEL");
            del.arg(&entries);
            deleted += within(address, del.query_async::<u64>(&mut conn)).await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Empties each returning cache of `ms` whose grace is over and restores
/// each emptied one; how soon to look again, if a grace is running.
pub async fn settle(
    ctx: &Context,
    key: &ObjectRef<MemberStore>,
    ms: &MemberStore,
    credentials: &Credentials,
) -> Option<Duration> {
    let now = Instant::now();
    let plan: Vec<(String, Next)> = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        ms.spec
            .data_centers
            .iter()
            .map(|dc| {
                let returning = state.caches.get(&dc.name).cloned().unwrap_or_default();
                let waited = returning.since.map(|since| now.duration_since(since));
                let mode = state.mode(Watched::Cache, &dc.name);
                (dc.name.clone(), next(mode, waited, returning.emptied))
            })
            .collect()
    };
    let namespace = ms.namespace().unwrap_or_default();
    let prefix = cache_prefix(&namespace, &ms.name_any());
    let thresholds = probe::thresholds(&ms.spec.promotion.probe);
    let mut wait: Option<Duration> = None;
    for (dc, step) in plan {
        match step {
            Next::Hold => {}
            Next::Wait(left) => wait = Some(wait.map_or(left, |w| w.min(left))),
            Next::Empty | Next::Restore => {
                if step == Next::Empty {
                    let Some(server) = ms.spec.data_centers.iter().find(|d| d.name == dc) else {
                        continue;
                    };
                    match empty(&server.redis, credentials.redis.get(&dc), &prefix).await {
                        Ok(deleted) => {
                            tracing::info!(%dc, deleted, "a returning member cache was emptied of what it missed");
                        }
                        Err(error) => {
                            tracing::warn!(%dc, %error, "emptying a returning member cache failed; retrying");
                            wait = Some(Duration::from_secs(1));
                            continue;
                        }
                    }
                }
                let mut stores = ctx.stores();
                let state = stores.entry(key.clone()).or_default();
                // Only if it is still the return it was: a probe lost meanwhile
                // made it Degraded, and it is emptied again after its next return.
                if state.mode(Watched::Cache, &dc) == Mode::Recovering {
                    if let Some(returning) = state.caches.get_mut(&dc) {
                        returning.emptied = true;
                    }
                    state.step(Watched::Cache, &dc, None, thresholds, Timestamp::now());
                }
            }
        }
    }
    wait
}

/// Each data centre's cache as published: its machine's mode, since and
/// reason, in the spec's order. Pure.
pub fn published(ms: &MemberStore, state: &StoreState) -> Vec<CacheStatus> {
    ms.spec
        .data_centers
        .iter()
        .filter_map(|dc| {
            let machine = state.machines.get(&(Watched::Cache, dc.name.clone()))?;
            Some(CacheStatus {
                data_center: dc.name.clone(),
                mode: machine.mode,
                since: Time(machine.since),
                reason: state
                    .caches
                    .get(&dc.name)
                    .and_then(|r| r.reason)
                    .map(str::to_owned),
            })
        })
        .collect()
}

/// One cache's change of mode, to announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Whether it is a warning (the cache is out of use).
    pub warning: bool,
    /// The Event's reason.
    pub reason: &'static str,
    /// What a person reads.
    pub message: String,
}

/// The changes of mode between the caches `before` and `after`. Pure.
pub fn announcements(before: &[CacheStatus], after: &[CacheStatus]) -> Vec<Announcement> {
    after
        .iter()
        .filter(|now| {
            let was = before
                .iter()
                .find(|b| b.data_center == now.data_center)
                .map_or(Mode::Normal, |b| b.mode);
            was != now.mode
        })
        .map(|now| {
            let dc = &now.data_center;
            let (warning, reason, what) = match now.mode {
                Mode::Degraded => (
                    true,
                    "CacheDegraded",
                    "does not answer: writes invalidate the other data centres' caches alone, and its data centre reads around it",
                ),
                Mode::Recovering => (
                    true,
                    "CacheRecovering",
                    "answers again: writes invalidate it, and it is emptied of what it missed before it is read",
                ),
                Mode::Normal => (false, "CacheRestored", "was emptied of what it missed and is read again"),
            };
            Announcement {
                warning,
                reason,
                message: format!("the member cache of {dc} {what}"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returning_cache_is_emptied_after_the_grace_and_restored_only_once_emptied() {
        let s = Duration::from_secs;
        let table = [
            (Mode::Normal, None, false, Next::Hold),
            (Mode::Normal, Some(s(9)), true, Next::Hold),
            (Mode::Degraded, Some(s(9)), false, Next::Hold),
            (Mode::Recovering, Some(s(0)), false, Next::Wait(GRACE)),
            (Mode::Recovering, Some(s(1)), false, Next::Wait(GRACE - s(1))),
            (Mode::Recovering, Some(GRACE), false, Next::Empty),
            (Mode::Recovering, Some(s(60)), false, Next::Empty),
            // A new leader does not know since when: the grace starts again.
            (Mode::Recovering, None, false, Next::Wait(GRACE)),
            (Mode::Recovering, Some(s(0)), true, Next::Restore),
            (Mode::Recovering, None, true, Next::Restore),
        ];
        for (mode, waited, emptied, want) in table {
            assert_eq!(next(mode, waited, emptied), want, "{mode:?} {waited:?} {emptied}");
        }
    }

    #[test]
    fn entering_a_mode_starts_the_grace_only_when_recovering_and_forgets_an_emptying() {
        let now = Instant::now();
        let mut r = Returning {
            emptied: true,
            ..Returning::default()
        };
        r.entered(Mode::Recovering, "ProbeSuccessThresholdReached", now);
        assert_eq!((r.since, r.emptied), (Some(now), false));
        r.emptied = true;
        r.entered(Mode::Degraded, "ProbeFailedWhileRecovering", now);
        assert_eq!(
            (r.since, r.emptied, r.reason),
            (None, false, Some("ProbeFailedWhileRecovering"))
        );
    }

    fn cache(dc: &str, mode: Mode) -> CacheStatus {
        CacheStatus {
            data_center: dc.into(),
            mode,
            since: Time(Timestamp::UNIX_EPOCH),
            reason: None,
        }
    }

    #[test]
    fn each_change_of_a_caches_mode_is_announced_once_and_a_first_normal_is_not() {
        let before = [cache("dc-a", Mode::Normal), cache("dc-b", Mode::Degraded)];
        let after = [
            cache("dc-a", Mode::Degraded),
            cache("dc-b", Mode::Recovering),
            cache("dc-c", Mode::Normal),
        ];
        let said: Vec<(bool, &str)> = announcements(&before, &after)
            .iter()
            .map(|a| (a.warning, a.reason))
            .collect();
        assert_eq!(said, vec![(true, "CacheDegraded"), (true, "CacheRecovering")]);
        assert!(announcements(&after, &after).is_empty());
        let restored = announcements(&[cache("dc-b", Mode::Recovering)], &[cache("dc-b", Mode::Normal)]);
        assert_eq!(restored.len(), 1);
        assert!(!restored[0].warning && restored[0].message.contains("dc-b"));
    }
}
