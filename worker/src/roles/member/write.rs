//! The write path. Every write first invalidates the member's cache entries
//! in every data centre: if one does not accept, nothing is written and the
//! write fails naming it (no half-success). Then, on the MySQL path, one
//! transaction (the member's row and its identity claims), the member's
//! document and claims in Elasticsearch, the change stream; on the
//! Elasticsearch path (MySQL down), the claims and the document (whose
//! external version orders racing writers), then the journal record. Last,
//! the entries are invalidated again, so that the lock's two seconds start
//! once the stores hold the write. A write is acknowledged only after all
//! of it.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use super::path::Path;
use super::service::{Failure, Members, Primary, Search, within};
use crate::members::cache::Key;
use crate::members::claims::Claim;
use crate::members::model::{self, Change, Conflict, Identity, Member};
use crate::members::search::Put;
use crate::members::sql::{WriteError, Written};
use crate::members::stream::{self, Record};

/// Attempts at a registration's random id, or at a write racing others on
/// the Elasticsearch path.
const ATTEMPTS: usize = 3;

/// A write's result.
#[derive(Clone, Debug)]
pub struct Done {
    /// The member after it.
    pub member: Member,
    /// What a replica must have applied to show it (`read_after`).
    pub read_after: Option<String>,
}

/// The wall clock in milliseconds since the Unix epoch.
pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new member id: milliseconds since 2020 and 20 random bits, so ids grow
/// with time (their order is roughly registration order) and two processes
/// registering in the same millisecond almost never meet (a meeting is
/// refused by the store, and another id is drawn).
pub fn new_member_id(now_ms: i64, random: u32) -> u64 {
    const EPOCH_2020_MS: i64 = 1_577_836_800_000;
    let since = u64::try_from(now_ms.saturating_sub(EPOCH_2020_MS)).unwrap_or(0);
    ((since << 20) | u64::from(random & 0xF_FFFF)).max(1)
}

/// Whether a write made under `written` must not be acknowledged now that
/// `now` is in force: the operator promoted another data centre meanwhile,
/// and the write landed on the side that lost. Pure.
pub fn fenced(written: i64, now: i64) -> bool {
    written < now
}

/// The identity a change names, if any.
fn named(change: &Change) -> Vec<&Identity> {
    match change {
        Change::Register { identities, .. } => identities.iter().collect(),
        Change::Bind(i) | Change::Unbind(i) => vec![i],
        Change::Update { .. } => Vec::new(),
    }
}

/// The cache entries a change to member `id` makes stale.
fn stale_keys<'a>(id: u64, identities: impl IntoIterator<Item = &'a Identity>) -> Vec<Key> {
    let mut keys: Vec<Key> = identities.into_iter().cloned().map(Key::Identity).collect();
    keys.push(Key::Member(id));
    keys.sort();
    keys.dedup();
    keys
}

impl Members {
    /// The identities of `member` that the active cluster's claims give it
    /// now: what a replayed state may claim in MySQL.
    pub(super) async fn held(&self, search: &Search, member: &Member) -> Result<BTreeSet<Identity>, Failure> {
        let mut held = BTreeSet::new();
        for identity in &member.identities {
            let owner = self.call(search.target(), search.claims.owner(identity)).await?;
            if owner == Some(member.id) {
                held.insert(identity.clone());
            }
        }
        Ok(held)
    }

    /// Brings `member`'s MySQL row to this state (the replay, the sweep),
    /// claiming the identities the active cluster gives it; whether it was
    /// behind.
    pub(super) async fn put_state(&self, member: &Member) -> Result<bool, Failure> {
        let search = self.stores.search();
        let held = self.held(&search, member).await?;
        let primary = self.stores.primary();
        self.call(primary.target(), primary.db.put_state(member, &held))
            .await
    }

    /// Registers a new member.
    pub async fn register(&self, change: Change) -> Result<Done, Failure> {
        for _ in 0..ATTEMPTS {
            let id = new_member_id(now_ms(), fastrand::u32(..));
            match self.write(id, change.clone()).await {
                Err(Failure::Conflict(Conflict::IdTaken(_))) => continue,
                other => return other,
            }
        }
        Err(Failure::Unavailable {
            dependency: "member ids".into(),
            detail: "every id drawn was taken; retry".into(),
        })
    }

    /// Makes `change` to member `id`, on the path in use, in the active
    /// data centre's Elasticsearch under its epoch; acknowledged only if that
    /// epoch is still the one in force once the write is made.
    pub async fn write(&self, id: u64, change: Change) -> Result<Done, Failure> {
        let path = self.path();
        // One cluster, one master and one epoch for the whole write, whatever
        // a promotion does meanwhile.
        let search = self.stores.search();
        let primary = self.stores.primary();
        // Published, but this process has not reached the promoted cluster yet.
        self.in_force(search.epoch)?;
        let done = match path {
            Path::Mysql => self.write_mysql(&search, &primary, id, &change, false).await,
            Path::Catchup { .. } => self.write_mysql(&search, &primary, id, &change, true).await,
            Path::Elasticsearch => {
                let _in_flight = self.es_write();
                self.write_elasticsearch(&search, id, &change).await
            }
        }?;
        self.in_force(search.epoch).inspect_err(|_| {
            tracing::warn!(
                member = id,
                written = search.epoch,
                "a write made under a superseded epoch is not acknowledged"
            );
        })?;
        self.metrics
            .writes
            .get_or_create(&[("path", path.as_str())])
            .inc();
        Ok(done)
    }

    /// The MySQL path; with `repair` (catching up), the member's row is first
    /// brought up to Elasticsearch's version of it.
    async fn write_mysql(
        &self,
        search: &Search,
        primary: &Primary,
        id: u64,
        change: &Change,
        repair: bool,
    ) -> Result<Done, Failure> {
        let registering = matches!(change, Change::Register { .. });
        if repair && !registering {
            let newest = self.call(search.target(), search.index.get(id)).await?;
            if let Some(newest) = newest {
                let held = self.held(search, &newest).await?;
                self.call(primary.target(), primary.db.put_state(&newest, &held))
                    .await?;
            }
        }
        let before = if registering {
            None
        } else {
            self.call(primary.target(), primary.db.get(id)).await?
        };
        let before_ids = before.iter().flat_map(|m| m.identities.iter());
        let mut keys = stale_keys(id, before_ids.chain(named(change)));
        self.invalidate(&keys, None).await?;
        let written = self
            .call(primary.target(), async {
                // A conflict is an answer, not a failure of MySQL.
                match primary.db.write(id, change, now_ms()).await {
                    Ok(written) => Ok(Ok(written)),
                    Err(WriteError::Conflict(conflict)) => Ok(Err(conflict)),
                    Err(WriteError::Db(e)) => Err(e),
                }
            })
            .await??;
        let Written { effect, gtid } = written;
        // Unchanged (a repeated bind), the rest is still written: a retry of
        // a write whose first attempt failed midway completes it.
        let after = &effect.after;
        self.call(search.target(), search.index.put(after, search.epoch))
            .await?;
        for identity in &effect.claimed {
            self.call(search.target(), search.claims.set(identity, id))
                .await?;
        }
        self.release_claims(search, &effect.released, id).await?;
        self.publish(stream::Path::Mysql, after, search.epoch).await?;
        keys.extend(stale_keys(id, effect.touched()));
        self.invalidate_again(&keys, &effect.after).await;
        Ok(Done {
            member: effect.after,
            read_after: gtid,
        })
    }

    async fn write_elasticsearch(&self, search: &Search, id: u64, change: &Change) -> Result<Done, Failure> {
        for _ in 0..ATTEMPTS {
            let before = self.call(search.target(), search.index.get(id)).await?;
            let before_ids = before.iter().flat_map(|m| m.identities.iter());
            let mut keys = stale_keys(id, before_ids.chain(named(change)));
            let effect = model::apply(before.as_ref(), id, change, now_ms())?;
            if !effect.changed() {
                // Journaled again: a retry of a write whose record Kafka did
                // not take completes the journal.
                self.publish(stream::Path::Elasticsearch, &effect.after, search.epoch)
                    .await?;
                return Ok(Done {
                    member: effect.after,
                    read_after: None,
                });
            }
            self.invalidate(&keys, None).await?;
            let mut taken: Vec<&Identity> = Vec::new();
            for identity in &effect.claimed {
                let claim = self
                    .call(search.target(), search.claims.claim(identity, id))
                    .await;
                match claim {
                    Ok(Claim::Held) => taken.push(identity),
                    Ok(Claim::HeldBy(owner)) => {
                        self.release_all(search, &taken, id).await;
                        return Err(Conflict::BoundElsewhere {
                            identity: identity.clone(),
                            owner,
                        }
                        .into());
                    }
                    Err(failure) => {
                        self.release_all(search, &taken, id).await;
                        return Err(failure);
                    }
                }
            }
            let put = self
                .call(
                    search.target(),
                    search.index.put_next(&effect.after, search.epoch),
                )
                .await;
            match put {
                Ok(Put::Stored) => {}
                Ok(Put::Stale) if before.is_none() => {
                    self.release_all(search, &taken, id).await;
                    return Err(Conflict::IdTaken(id).into());
                }
                Ok(Put::Stale) => {
                    // Another writer took this version: start again from its.
                    self.release_all(search, &taken, id).await;
                    continue;
                }
                Err(failure) => {
                    self.release_all(search, &taken, id).await;
                    return Err(failure);
                }
            }
            self.release_claims(search, &effect.released, id).await?;
            // Only after Elasticsearch took it: the journal holds the winners
            // only, in the order Elasticsearch accepted them.
            if let Err(failure) = self
                .publish(stream::Path::Elasticsearch, &effect.after, search.epoch)
                .await
            {
                tracing::error!(member = id, %failure, "a write Elasticsearch took is not in the journal; a retry of it journals it");
                return Err(failure);
            }
            keys.extend(stale_keys(id, effect.touched()));
            self.invalidate_again(&keys, &effect.after).await;
            return Ok(Done {
                member: effect.after,
                read_after: None,
            });
        }
        Err(Failure::Contended(id))
    }

    /// Whether a write under `written` may go on or be acknowledged: not
    /// if the operator has published a newer epoch ([`fenced`]).
    fn in_force(&self, written: i64) -> Result<(), Failure> {
        let now = self.epoch();
        if fenced(written, now) {
            return Err(Failure::Fenced { written, now });
        }
        Ok(())
    }

    /// Releases member `id`'s claims of `released` in Elasticsearch.
    async fn release_claims(&self, search: &Search, released: &[Identity], id: u64) -> Result<(), Failure> {
        for identity in released {
            self.call(search.target(), search.claims.release(identity, id))
                .await?;
        }
        Ok(())
    }

    /// Gives back claims taken for a write that did not happen (best effort:
    /// a claim left behind binds the identity to a member that does not list
    /// it, which a later bind of that member, or the replay, settles).
    async fn release_all(&self, search: &Search, taken: &[&Identity], id: u64) {
        for identity in taken {
            if let Err(failure) = self
                .call(search.target(), search.claims.release(identity, id))
                .await
            {
                tracing::warn!(member = id, %failure, "a claim of a write that did not happen was not given back");
            }
        }
    }

    async fn publish(&self, path: stream::Path, member: &Member, epoch: i64) -> Result<(), Failure> {
        let record = Record {
            path,
            member: member.clone(),
            epoch,
        };
        within(self.timing.deadline, "kafka", self.stores.stream.publish(&record))
            .await
            .map(drop)
    }

    /// The second invalidation, raising the member's floor: the write is
    /// made whatever it does; a data centre that misses it is counted (its
    /// entries were deleted by the first, its lock expires, and a returning
    /// cache is purged).
    async fn invalidate_again(&self, keys: &[Key], after: &Member) {
        for (cache, outcome) in self.invalidate_each(&self.stale(keys, Some(after))).await {
            if let Err(failure) = outcome {
                tracing::warn!(dc = %cache.name, %failure, "the invalidation after a write failed");
                self.metrics
                    .late_invalidations_failed
                    .get_or_create(&vec![("dc".to_owned(), cache.name.clone())])
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::model::IdentityKind;

    #[test]
    fn only_a_write_under_an_epoch_older_than_the_one_in_force_is_fenced() {
        let table = [
            (0, 0, false),
            (3, 3, false),
            (2, 3, true),
            (0, 1, true),
            (4, 3, false),
        ];
        for (written, now, want) in table {
            assert_eq!(fenced(written, now), want, "written {written}, now {now}");
        }
    }

    #[test]
    fn member_ids_grow_with_time_and_keep_twenty_random_bits() {
        let t = 1_800_000_000_000;
        let a = new_member_id(t, 0);
        let b = new_member_id(t, 0xF_FFFF);
        let c = new_member_id(t + 1, 0);
        assert!(a < b && b < c);
        assert_eq!(b - a, 0xF_FFFF);
        assert_eq!(new_member_id(t, 0x1F_FFFF), b, "only twenty bits are random");
        assert_eq!(new_member_id(0, 0), 1, "never zero");
    }

    #[test]
    fn a_change_makes_stale_the_member_and_every_identity_it_names() {
        let phone = Identity {
            kind: IdentityKind::Phone,
            value: "13812345678".into(),
        };
        let keys = stale_keys(7, named(&Change::Bind(phone.clone())).into_iter().chain([&phone]));
        assert_eq!(keys, vec![Key::Member(7), Key::Identity(phone)]);
        let update = Change::Update {
            name: None,
            level: Some("x".into()),
        };
        assert_eq!(stale_keys(7, named(&update)), vec![Key::Member(7)]);
    }
}
