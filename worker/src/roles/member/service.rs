//! The member operations, apart from how they arrive: [`Members`] holds the
//! stores, the flow control and the path in use; the writes
//! ([`super::write`]) and reads ([`super::read`]) are its methods. Every store
//! call goes through the dependency's breaker within the deadline.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use ballast_crds::Mode;
use ballast_flow::breaker::State;
use ballast_flow::{CallError, Flow, GuardedDependency, Refusal, Target};
use tokio::sync::watch;

use super::caches::{self, Invalidation};
use super::caller::{Caller, CallerError, Known};
use super::metrics::Metrics;
use super::path::{Inputs, Path};
use crate::members::cache::{DcCache, Key, Keys, Stale};
use crate::members::claims::Claims;
use crate::members::model::{Conflict, Invalid, Member};
use crate::members::search::MemberIndex;
use crate::members::sql::MemberDb;
use crate::members::stream::ChangeStream;

/// Where the members are.
#[derive(Clone)]
pub struct Stores {
    /// The MySQL master: every write. Replaced when the operator promotes
    /// another data centre's MySQL.
    pub primary: Arc<ArcSwap<Primary>>,
    /// This data centre's MySQL (a replica outside the master's DC): reads.
    pub local: MemberDb,
    /// This data centre's name.
    pub local_data_center: String,
    /// The active data centre's Elasticsearch, replaced when the operator
    /// promotes another.
    pub search: Arc<ArcSwap<Search>>,
    /// The marketing cluster's member index, if there is one.
    pub marketing: Option<MemberIndex>,
    /// Every data centre's cache; each write invalidates all of them.
    pub caches: Vec<DcCache>,
    /// Which of `caches` is this data centre's (reads).
    pub local_cache: usize,
    /// The cache's key names.
    pub keys: Keys,
    /// The change stream (and journal).
    pub stream: ChangeStream,
}

/// The active data centre's Elasticsearch: its member index and the
/// identity claims beside it.
#[derive(Clone)]
pub struct Search {
    /// The data centre.
    pub data_center: String,
    /// The epoch under which it is active (`status.epoch`): its writes are
    /// versioned under it, and acknowledged only while it is in force.
    pub epoch: i64,
    /// Its member index.
    pub index: MemberIndex,
    /// Its identity claims.
    pub claims: Claims,
}

/// The MySQL master.
#[derive(Clone)]
pub struct Primary {
    /// Its data centre.
    pub data_center: String,
    /// Its member database.
    pub db: MemberDb,
}

impl Search {
    /// Its breaker's target: this cluster, apart from the other data centre's.
    pub fn target(&self) -> Target<'_> {
        Target::new(GuardedDependency::Elasticsearch, &self.data_center)
    }
}

impl Primary {
    /// Its breaker's target: this master, apart from any replica.
    pub fn target(&self) -> Target<'_> {
        Target::new(GuardedDependency::Mysql, &self.data_center)
    }
}

impl Stores {
    /// This data centre's MySQL's breaker target (the master's, where it is the master).
    pub fn local_target(&self) -> Target<'_> {
        Target::new(GuardedDependency::Mysql, &self.local_data_center)
    }

    /// The active data centre's Elasticsearch, as it is now.
    pub fn search(&self) -> Arc<Search> {
        self.search.load_full()
    }

    /// The MySQL master, as it is now.
    pub fn primary(&self) -> Arc<Primary> {
        self.primary.load_full()
    }

    /// Whether this data centre's MySQL is the master.
    pub fn local_is_primary(&self) -> bool {
        self.primary.load().data_center == self.local_data_center
    }
}

/// Settings of the operations.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Deadline of each store call.
    pub deadline: Duration,
    /// Longest a replica read waits for a write it must see before asking the primary.
    pub read_after_wait: Duration,
}

/// Why an operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The caller is missing, malformed or unknown.
    #[error(transparent)]
    Caller(#[from] CallerError),
    /// The change conflicts with the stored state.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// Flow control refused it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A dependency failed; nothing was acknowledged.
    #[error("{dependency} is unavailable: {detail}")]
    Unavailable {
        /// Which one (`mysql`, `elasticsearch`, `redis dc-b`, `kafka`).
        dependency: String,
        /// What happened.
        detail: String,
    },
    /// The write was made under an epoch the operator has since replaced
    /// (another data centre was promoted meanwhile): not acknowledged.
    #[error("the active data centre changed during the write (epoch {written}, now {now}); retry")]
    Fenced {
        /// The epoch the write was made under.
        written: i64,
        /// The epoch in force.
        now: i64,
    },
    /// Writers kept racing on one member.
    #[error("member {0} is being changed by other writers; retry")]
    Contended(u64),
}

/// The member operations of one process.
pub struct Members {
    pub(super) stores: Stores,
    pub(super) flow: Arc<Flow>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) timing: Timing,
    known: ArcSwap<Known>,
    /// The epoch the operator last published (ahead of `stores.search`
    /// while this process moves to a promoted cluster).
    epoch: AtomicI64,
    /// Each data centre's cache mode, as the operator last published it.
    cache_modes: ArcSwap<BTreeMap<String, Mode>>,
    published: watch::Receiver<Mode>,
    path: AtomicU8,
    es_writes: AtomicU32,
}

/// A write on the Elasticsearch path, in flight until dropped.
pub(super) struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Members {
    /// The operations over `stores`, under `flow`, following the published
    /// MySQL mode; on the MySQL path until the path task says otherwise.
    pub fn new(
        stores: Stores,
        flow: Arc<Flow>,
        metrics: Arc<Metrics>,
        timing: Timing,
        published: watch::Receiver<Mode>,
    ) -> Self {
        Self {
            stores,
            flow,
            metrics,
            timing,
            known: ArcSwap::from_pointee(Known::default()),
            epoch: AtomicI64::new(0),
            cache_modes: ArcSwap::from_pointee(BTreeMap::new()),
            published,
            path: AtomicU8::new(0),
            es_writes: AtomicU32::new(0),
        }
    }

    /// The stores.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The flow control.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Puts `known` in force as the accounts admitted.
    pub fn set_known(&self, known: Known) {
        self.known.store(Arc::new(known));
    }

    /// Puts in force the epoch `store` publishes: from now on no write made
    /// under an older one is acknowledged.
    pub fn set_epoch(&self, store: &ballast_crds::MemberStore) {
        self.epoch.fetch_max(store.epoch(), Ordering::AcqRel);
    }

    /// The epoch in force: the newest this process has seen published.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire).max(self.stores.search().epoch)
    }

    /// Puts in force the cache modes `store` publishes; logged when one changes.
    pub fn set_cache_modes(&self, store: &ballast_crds::MemberStore) {
        let next: BTreeMap<String, Mode> = self
            .stores
            .caches
            .iter()
            .map(|c| (c.name.clone(), store.cache_mode(&c.name)))
            .collect();
        let before = self.cache_modes.swap(Arc::new(next.clone()));
        for (dc, mode) in &next {
            if before.get(dc).copied().unwrap_or_default() != *mode {
                tracing::warn!(%dc, ?mode, "published cache mode changed");
            }
        }
    }

    /// How data centre `dc`'s cache is used now.
    pub(super) fn cache_use(&self, dc: &str) -> caches::Use {
        caches::use_of(self.cache_modes.load().get(dc).copied().unwrap_or_default())
    }

    /// Whether `caller` may call, and whether flow control lets its request
    /// about `key` in now.
    pub fn admit(&self, caller: &Caller, key: Option<&str>) -> Result<ballast_flow::Admission<'_>, Failure> {
        self.known.load().admits(&caller.account)?;
        Ok(self.flow.admit(&caller.account, key)?)
    }

    /// The path in use now (a catch-up's barrier is the path task's business).
    pub fn path(&self) -> Path {
        match self.path.load(Ordering::Acquire) {
            0 => Path::Mysql,
            1 => Path::Catchup { barrier: None },
            _ => Path::Elasticsearch,
        }
    }

    /// Puts `next` in force (the path task's decision), logged and counted when it changes.
    pub fn set_path(&self, next: Path, inputs: &Inputs) {
        let code = u8::try_from(next.code()).unwrap_or(2);
        let before = self.path.swap(code, Ordering::AcqRel);
        if before != code {
            self.metrics.path.set(next.code());
            tracing::warn!(
                to = next.as_str(),
                published = ?inputs.published,
                breaker_open = inputs.breaker_open,
                end = ?inputs.end,
                committed = ?inputs.committed,
                "member store path changed"
            );
        }
    }

    /// What the path depends on now, given the journal's offsets and whether
    /// the catch-up's sweep is done.
    pub fn path_inputs(&self, end: Option<i64>, committed: Option<i64>, swept: bool) -> Inputs {
        Inputs {
            published: *self.published.borrow(),
            breaker_open: !matches!(
                self.flow.breaker_state(self.stores.primary().target()),
                Some(State::Closed) | None
            ),
            es_writes_in_flight: self.es_writes.load(Ordering::Acquire),
            end,
            committed,
            swept,
        }
    }

    /// Counts a write on the Elasticsearch path as in flight until dropped.
    pub(super) fn es_write(&self) -> InFlight<'_> {
        self.es_writes.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.es_writes)
    }

    /// `call` to `target` through its breaker within the deadline; a
    /// failure is [`Failure::Unavailable`] naming the target (`redis dc-b`).
    pub(super) async fn call<T, E: Display>(
        &self,
        target: Target<'_>,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Failure> {
        self.flow
            .call(target, self.timing.deadline, call)
            .await
            .map_err(|e| self.failed(target, e))
    }

    /// A failed call to `target` as a [`Failure`], counted by its kind.
    fn failed<E: Display>(&self, target: Target<'_>, error: CallError<E>) -> Failure {
        let detail = match error {
            CallError::Refused(refusal) => return Failure::Refused(refusal),
            CallError::TimedOut { deadline, .. } => format!("no answer within {} ms", deadline.as_millis()),
            CallError::Failed(e) => e.to_string(),
        };
        self.metrics
            .store_failures
            .get_or_create(&[("dependency", target.dependency.as_str())])
            .inc();
        Failure::Unavailable {
            dependency: target.to_string(),
            detail,
        }
    }

    /// The entries of `keys` to invalidate; `after`, the member a write
    /// leaves, raises its own entry's floor to its version.
    pub(super) fn stale(&self, keys: &[Key], after: Option<&Member>) -> Vec<Stale> {
        keys.iter()
            .map(|k| Stale {
                key: self.stores.keys.entry(k),
                floor: match (k, after) {
                    (Key::Member(id), Some(m)) if *id == m.id => m.version,
                    _ => 0,
                },
            })
            .collect()
    }

    /// Bumps, locks and deletes `keys` in every data centre's cache at once
    /// (raising `after`'s floor); fails, naming the first data centre that
    /// did not accept, unless each that did not may miss it (see [`caches`]).
    pub(super) async fn invalidate(&self, keys: &[Key], after: Option<&Member>) -> Result<(), Failure> {
        for (cache, outcome) in self.invalidate_each(&self.stale(keys, after)).await {
            match (outcome, self.cache_use(&cache.name).invalidation) {
                (Ok(()), _) => {}
                (Err(failure), Invalidation::Required) => return Err(failure),
                (Err(failure), _) => self.missed(cache, &failure),
            }
        }
        Ok(())
    }

    /// `stale` invalidated at once in every data centre's cache a write
    /// calls (not those published Degraded); each one's outcome.
    pub(super) async fn invalidate_each(&self, stale: &[Stale]) -> Vec<(&DcCache, Result<(), Failure>)> {
        let calls = self
            .stores
            .caches
            .iter()
            .filter(|cache| {
                let skipped = self.cache_use(&cache.name).invalidation == Invalidation::Skipped;
                if skipped {
                    self.count_missed(cache);
                }
                !skipped
            })
            .map(|cache| async move {
                let outcome = self.call(cache.target(), cache.invalidate(stale)).await;
                (cache, outcome)
            });
        futures::future::join_all(calls).await
    }

    /// Counts an invalidation `cache` did not take while it may miss it.
    pub(super) fn missed(&self, cache: &DcCache, failure: &Failure) {
        tracing::debug!(dc = %cache.name, %failure, "a recovering cache missed an invalidation");
        self.count_missed(cache);
    }

    fn count_missed(&self, cache: &DcCache) {
        self.metrics
            .invalidations_missed
            .get_or_create(&vec![("dc".to_owned(), cache.name.clone())])
            .inc();
    }

    /// The local data centre's cache.
    pub(super) fn local_cache(&self) -> &DcCache {
        &self.stores.caches[self.stores.local_cache]
    }

    /// The cache entry of `member` (or of its absence). Pure.
    pub(super) fn encode(member: Option<&Member>) -> String {
        serde_json::to_string(&member).unwrap_or_else(|_| "null".into())
    }

    /// A cache entry's member; an unreadable entry reads as a miss.
    pub(super) fn decode(entry: &str) -> Option<Option<Member>> {
        serde_json::from_str(entry).ok()
    }
}

/// A deadline for the change stream, which has no breaker of its own.
pub(super) async fn within<T, E: Display>(
    deadline: Duration,
    name: &str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::Unavailable {
            dependency: name.to_owned(),
            detail: e.to_string(),
        }),
        Err(_) => Err(Failure::Unavailable {
            dependency: name.to_owned(),
            detail: format!("no answer within {} ms", deadline.as_millis()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_answer_round_trips_including_no_member() {
        assert_eq!(Members::decode(&Members::encode(None)), Some(None));
        let member = Member {
            id: 3,
            name: "n".into(),
            level: "l".into(),
            identities: Default::default(),
            version: 1,
            updated_ms: 2,
        };
        assert_eq!(
            Members::decode(&Members::encode(Some(&member))),
            Some(Some(member))
        );
        assert_eq!(Members::decode("{garbage"), None);
    }
}
