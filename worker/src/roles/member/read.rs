//! The read path: this data centre's cache first; on a miss the store (a
//! member by id from the local MySQL, or Elasticsearch while MySQL is down;
//! an identity from Elasticsearch, the marketing cluster for marketing
//! callers), then a fill under the miss's lease, which the cache refuses if
//! a write came in between. A cache that fails, or that the operator
//! publishes as not to be read, is read around, never a reason to fail a read.

use super::caller::Class;
use super::service::{Failure, Members, within};
use crate::members::cache::{Fill, Key, Lease, Lookup};
use crate::members::model::{Identity, Invalid, Member};
use crate::members::sql::valid_gtid;

/// What the cache had.
enum Cached {
    Hit(Option<Member>),
    Miss(Lease),
    /// Unreachable or unreadable: read the store, do not fill.
    Unusable,
}

impl Members {
    /// Member `id`, if it exists. With `read_after` (from a write's reply),
    /// the read shows that write: the cache is skipped, and a replica that
    /// has not applied the write within the wait is read around (the primary
    /// answers).
    pub async fn get(&self, id: u64, read_after: Option<&str>) -> Result<Option<Member>, Failure> {
        if let Some(token) = read_after.filter(|t| !valid_gtid(t)) {
            return Err(Invalid::ReadAfter(token.chars().take(40).collect()).into());
        }
        let name = self.stores.keys.entry(&Key::Member(id));
        let lease = match read_after {
            Some(_) => None,
            None => match self.cached(&name).await {
                Cached::Hit(member) => return Ok(member),
                Cached::Miss(lease) => Some(lease),
                Cached::Unusable => None,
            },
        };
        let member = if self.path().reads_elasticsearch() {
            let search = self.stores.search();
            self.call(search.target(), search.index.get(id)).await?
        } else {
            self.read_mysql(id, read_after).await?
        };
        if let Some(lease) = lease {
            self.fill(&name, &lease, member.as_ref()).await;
        }
        Ok(member)
    }

    async fn read_mysql(&self, id: u64, read_after: Option<&str>) -> Result<Option<Member>, Failure> {
        let stores = &self.stores;
        let Some(token) = read_after.filter(|_| !stores.local_is_primary()) else {
            return self.call(stores.local_target(), stores.local.get(id)).await;
        };
        let wait = self.timing.read_after_wait;
        let caught_up = self
            .call(stores.local_target(), stores.local.caught_up(token, wait))
            .await
            .unwrap_or(false);
        if caught_up {
            self.call(stores.local_target(), stores.local.get(id)).await
        } else {
            let primary = stores.primary();
            self.call(primary.target(), primary.db.get(id)).await
        }
    }

    /// The members `identities` are bound to, in order. Order-flow callers'
    /// misses are read from the active cluster and filled; marketing callers'
    /// from the marketing cluster (when there is one), never the active one,
    /// and not filled: that cluster is fed from the change stream and may
    /// lag behind the lock.
    pub async fn lookup(
        &self,
        identities: &[Identity],
        class: Class,
    ) -> Result<Vec<Option<Member>>, Failure> {
        let names: Vec<String> = identities
            .iter()
            .map(|i| self.stores.keys.entry(&Key::Identity(i.clone())))
            .collect();
        let cached = futures::future::join_all(names.iter().map(|n| self.cached(n))).await;
        let mut answers: Vec<Option<Member>> = vec![None; identities.len()];
        let mut misses: Vec<(usize, Option<Lease>)> = Vec::new();
        for (at, found) in cached.into_iter().enumerate() {
            match found {
                Cached::Hit(member) => answers[at] = member,
                Cached::Miss(lease) => misses.push((at, Some(lease))),
                Cached::Unusable => misses.push((at, None)),
            }
        }
        if misses.is_empty() {
            return Ok(answers);
        }
        let asked: Vec<Identity> = misses.iter().map(|(at, _)| identities[*at].clone()).collect();
        let search = self.stores.search();
        let (index, cluster, fill) = match (&self.stores.marketing, class) {
            (Some(marketing), Class::Marketing) => (marketing, "marketing", false),
            _ => (&search.index, "primary", true),
        };
        // The marketing cluster is outside the Elasticsearch breaker, which
        // guards the order flow's cluster: its failures must not open it.
        let found = if fill {
            self.call(search.target(), index.lookup(&asked)).await?
        } else {
            within(
                self.timing.deadline,
                "elasticsearch marketing",
                index.lookup(&asked),
            )
            .await?
        };
        self.metrics.searches.get_or_create(&[("cluster", cluster)]).inc();
        for ((at, lease), member) in misses.into_iter().zip(found) {
            if let (true, Some(lease)) = (fill, lease) {
                self.fill(&names[at], &lease, member.as_ref()).await;
            }
            answers[at] = member;
        }
        Ok(answers)
    }

    async fn cached(&self, name: &str) -> Cached {
        let cache = self.local_cache();
        let label = |result| [("result", result)];
        if !self.cache_use(&cache.name).read {
            // Published down, or back but not yet emptied of what it missed.
            self.metrics.cache.get_or_create(&label("bypassed")).inc();
            return Cached::Unusable;
        }
        match self.call(cache.target(), cache.read(name)).await {
            Ok(Lookup::Hit(entry)) => match Self::decode(&entry) {
                Some(member) => {
                    self.metrics.cache.get_or_create(&label("hit")).inc();
                    Cached::Hit(member)
                }
                None => {
                    self.metrics.cache.get_or_create(&label("unreadable")).inc();
                    Cached::Unusable
                }
            },
            Ok(Lookup::Miss(lease)) => {
                self.metrics.cache.get_or_create(&label("miss")).inc();
                Cached::Miss(lease)
            }
            Err(_) => {
                self.metrics.cache.get_or_create(&label("unavailable")).inc();
                Cached::Unusable
            }
        }
    }

    async fn fill(&self, name: &str, lease: &Lease, member: Option<&Member>) {
        let cache = self.local_cache();
        let entry = Self::encode(member);
        let filled = self
            .call(
                cache.target(),
                cache.fill(name, lease, &entry, member.map_or(0, |m| m.version)),
            )
            .await;
        let result = match filled {
            Ok(Fill::Filled) => "filled",
            Ok(Fill::Refused) => "refused",
            Ok(Fill::Skipped) => "skipped",
            Err(_) => "unavailable",
        };
        self.metrics.cache.get_or_create(&[("result", result)]).inc();
    }
}
