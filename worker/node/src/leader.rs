//! Leader election on a `coordination.k8s.io/v1` Lease: of the operator's
//! replicas, or a pipeline's masters, only the holder acts; the others wait to take over.
//!
//! Time is judged locally and monotonically, as client-go does: a candidate
//! takes a Lease only once it has seen the same record, unchanged, for the
//! Lease's duration (the writer's clock never decides), and a holder stops
//! acting when its own deadline passes, counted from when it *sent* its last
//! successful renewal, whatever the API server is doing with the next one.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Errors of the election that a caller acts on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a Lease request.
    #[error("lease {name}: {source}")]
    Api {
        /// Name of the Lease.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Where the Lease is and who competes for it.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a holder keeps the Lease without renewing.
    pub duration: Duration,
    /// Labels the Lease is created with (a pipeline's names its pipeline:
    /// the admission policy lets a pipeline's workers write only its own).
    pub labels: std::collections::BTreeMap<String, String>,
    /// What owns the Lease (the operator's Deployment), so that the garbage
    /// collector removes it with its owner: an uninstall leaves none.
    pub owner: Option<OwnerReference>,
}

/// The parts of a Lease that change when its holder renews or hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration_seconds: Option<i32>,
}

impl Record {
    /// The record of `lease`.
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions,
            duration_seconds: spec.lease_duration_seconds,
        }
    }
}

/// Whether `lease` names `identity` as its holder: what a replica renews
/// rather than takes, and may give up. Pure.
pub fn held_by(lease: &Lease, identity: &str) -> bool {
    lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(identity)
}

/// `refs` with `owner` among them (added once, by uid). Pure.
pub fn with_owner(
    refs: Option<Vec<OwnerReference>>,
    owner: Option<&OwnerReference>,
) -> Option<Vec<OwnerReference>> {
    let Some(owner) = owner else { return refs };
    let mut refs = refs.unwrap_or_default();
    if !refs.iter().any(|r| r.uid == owner.uid) {
        refs.push(owner.clone());
    }
    Some(refs)
}

/// `spec` given up by its holder: no holder, so that anyone may take it at
/// once; the term (transitions) kept, so the next holder counts one more. Pure.
pub fn released(spec: LeaseSpec) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        acquire_time: None,
        ..spec
    }
}

/// A record as last seen, and since when (local monotonic time) it is unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    record: Record,
    since: Instant,
}

impl Sighting {
    /// What is known after reading `record` at `now`: the same record keeps
    /// the time it was first seen; any change restarts the count. Pure.
    pub fn observe(previous: Option<Sighting>, record: Record, now: Instant) -> Sighting {
        match previous {
            Some(seen) if seen.record == record => seen,
            _ => Sighting { record, since: now },
        }
    }

    /// Whether `identity` may take the Lease at `now`: free, ours, or unchanged
    /// for its whole duration as seen from here. Pure.
    pub fn may_take(&self, identity: &str, now: Instant) -> bool {
        match (&self.record.holder, self.record.duration_seconds) {
            (None, _) | (_, None) => true,
            (Some(holder), _) if holder == identity => true,
            (Some(_), Some(seconds)) => {
                now.saturating_duration_since(self.since)
                    >= Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
            }
        }
    }
}

/// The Lease held: its term, and when the request that took or renewed it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// How many times the Lease changed hands, as the successful write left it.
    /// Each new holder counts one more, so a term fences everything an older holder stamped.
    pub term: i64,
    /// When the successful request was sent: the holder's deadline counts from here.
    pub sent: Instant,
}

/// How one renewal attempt of a holder ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed; the request was sent at this instant.
    Renewed(Instant),
    /// Another replica holds the Lease now.
    Taken,
    /// The API call failed (or is still pending) and may be retried.
    Failed,
}

/// What a holder does after a renewal attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep acting until this new deadline.
    Until(Instant),
    /// Stop acting: the Lease is another's.
    Taken,
    /// Stop acting: the deadline passed without a renewal.
    Lapsed,
    /// Keep acting until the same deadline, and try again soon.
    Retry,
}

/// The holder's decision after `renewal`, with its deadline `deadline` and
/// the Lease's duration, at `now`. Pure.
pub fn after(renewal: Renewal, deadline: Instant, duration: Duration, now: Instant) -> Next {
    match renewal {
        Renewal::Renewed(sent) => Next::Until(sent + duration),
        Renewal::Taken => Next::Taken,
        Renewal::Failed if now >= deadline => Next::Lapsed,
        Renewal::Failed => Next::Retry,
    }
}

fn term_of(lease: &Lease) -> i64 {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .map_or(0, i64::from)
}

impl Election {
    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        }
    }

    /// Tries once to take or renew the Lease; `Some` when this replica holds
    /// it. `seen` carries what this replica saw of the Lease between calls.
    pub async fn try_acquire(
        &self,
        client: &kube::Client,
        seen: &mut Option<Sighting>,
    ) -> Result<Option<Held>, Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let err = |source| Error::Api {
            name: self.name.clone(),
            source,
        };
        let sent = Instant::now();
        let Some(mut lease) = api.get_opt(&self.name).await.map_err(err)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                    owner_references: with_owner(None, self.owner.as_ref()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(Timestamp::now(), None, Some(0))),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(Some(Held {
                    term: term_of(&created),
                    sent,
                })),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(None), // another replica created it first
                Err(e) => Err(err(e)),
            };
        };
        let sighting = Sighting::observe(seen.take(), Record::of(&lease), Instant::now());
        let may_take = sighting.may_take(&self.identity, Instant::now());
        *seen = Some(sighting);
        if !may_take {
            return Ok(None);
        }
        let ours = held_by(&lease, &self.identity);
        let previous = lease.spec.clone().unwrap_or_default();
        let (acquired, transitions) = if ours {
            (previous.acquire_time, previous.lease_transitions)
        } else {
            (None, Some(previous.lease_transitions.unwrap_or(0) + 1))
        };
        lease.spec = Some(self.spec(Timestamp::now(), acquired, transitions));
        // A Lease made before its owner was known (an earlier version) gets it now.
        lease.metadata.owner_references =
            with_owner(lease.metadata.owner_references.take(), self.owner.as_ref());
        // The resourceVersion in `lease` makes this a compare-and-swap: a
        // concurrent taker gets 409 Conflict and stays a follower. The term is
        // taken from what the write stored, not from a later read.
        match api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(stored) => Ok(Some(Held {
                term: term_of(&stored),
                sent,
            })),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Gives the Lease up on a clean exit, as client-go's `ReleaseOnCancel`
    /// does: if this replica holds it, the holder is cleared (the term and
    /// the object stay), on condition that it is the version just read (a
    /// standby that took it meanwhile keeps it). A standby then takes it at
    /// once rather than after the duration. Whether it was given up.
    pub async fn release(&self, client: &kube::Client) -> Result<bool, Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let err = |source| Error::Api {
            name: self.name.clone(),
            source,
        };
        let Some(mut lease) = api.get_opt(&self.name).await.map_err(err)? else {
            return Ok(false);
        };
        if !held_by(&lease, &self.identity) {
            return Ok(false);
        }
        lease.spec = lease.spec.map(released);
        // The resourceVersion read makes this a compare-and-swap.
        match api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Waits until this replica holds the Lease; `None` once `shutdown` is
    /// cancelled. API errors are retried with backoff: a standby that exits on
    /// a transient error would crash-loop exactly when it is needed.
    pub async fn acquire(&self, client: &kube::Client, shutdown: &CancellationToken) -> Option<Held> {
        let mut seen = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            // Each attempt is bounded: an attempt stuck on a slow API server must not outlive its usefulness.
            let attempt = tokio::time::timeout(self.duration, self.try_acquire(client, &mut seen));
            let pause = tokio::select! {
                () = shutdown.cancelled() => return None,
                result = attempt => match result {
                    Ok(Ok(Some(held))) => return Some(held),
                    Ok(Ok(None)) => {
                        backoff = Duration::from_millis(200);
                        self.duration / 4
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, retry_in = ?backoff, "taking the lease failed; retrying");
                        let pause = backoff;
                        backoff = (backoff * 2).min(self.duration / 2);
                        pause
                    }
                    Err(_) => {
                        tracing::warn!(lease = %self.name, "taking the lease timed out; retrying");
                        Duration::ZERO
                    }
                },
            };
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Renews the Lease taken as `held` until `shutdown`; cancels `lost` when
    /// another replica took it, or at this replica's own deadline (the
    /// duration after the last successful renewal was sent), even while a
    /// renewal is still in flight.
    pub async fn hold(
        self,
        client: kube::Client,
        held: Held,
        shutdown: CancellationToken,
        lost: CancellationToken,
    ) {
        let mut deadline = held.sent + self.duration;
        let mut seen = None;
        let mut pause = self.duration / 3;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::error!(lease = %self.name, "leader lease not renewed within its duration");
                    lost.cancel();
                    return;
                }
                () = tokio::time::sleep(pause) => {}
            }
            let renewal = tokio::select! {
                () = shutdown.cancelled() => return,
                result = tokio::time::timeout_at(deadline, self.try_acquire(&client, &mut seen)) => match result {
                    Ok(Ok(Some(held))) => Renewal::Renewed(held.sent),
                    Ok(Ok(None)) => Renewal::Taken,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "renewing the leader lease failed");
                        Renewal::Failed
                    }
                    Err(_) => Renewal::Failed,
                },
            };
            match after(renewal, deadline, self.duration, Instant::now()) {
                Next::Until(next) => {
                    deadline = next;
                    pause = self.duration / 3;
                }
                Next::Retry => pause = self.duration / 10,
                Next::Taken => {
                    tracing::error!(lease = %self.name, "leadership taken by another replica");
                    lost.cancel();
                    return;
                }
                Next::Lapsed => {
                    tracing::error!(lease = %self.name, "leader lease not renewed within its duration");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, renewed: i64, seconds: Option<i32>) -> Record {
        Record {
            holder: holder.map(str::to_owned),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("valid"))),
            transitions: Some(1),
            duration_seconds: seconds,
        }
    }

    #[test]
    fn a_lease_may_be_taken_once_seen_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // The writer's renewTime is a year old (a skewed clock): only local sightings count.
        let held = record(Some("other"), 1, Some(15));
        let renewed = record(Some("other"), 2, Some(15));
        // (previously seen, read now, at, may take)
        let cases = [
            (None, record(None, 1, None), s(0), true, "free"),
            (None, record(Some("me"), 1, Some(15)), s(0), true, "ours"),
            (
                None,
                held.clone(),
                s(0),
                false,
                "first sighting, however old its renewTime",
            ),
            (
                Some((held.clone(), s(0))),
                held.clone(),
                s(14),
                false,
                "unchanged for less than its duration",
            ),
            (
                Some((held.clone(), s(0))),
                held.clone(),
                s(15),
                true,
                "unchanged for its duration",
            ),
            (
                Some((held.clone(), s(0))),
                renewed.clone(),
                s(20),
                false,
                "renewed: the count restarts",
            ),
            (
                Some((held.clone(), s(0))),
                record(Some("other"), 1, None),
                s(1),
                true,
                "no duration",
            ),
        ];
        for (previous, read, now, want, case) in cases {
            let previous = previous.map(|(record, since)| Sighting { record, since });
            let sighting = Sighting::observe(previous, read, now);
            assert_eq!(sighting.may_take("me", now), want, "{case}");
        }
    }

    #[test]
    fn only_the_holder_named_in_the_lease_may_give_it_up() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        let cases = [
            (lease(Some("me")), true),
            (lease(Some("other")), false),
            (lease(None), false),
            (Lease::default(), false),
        ];
        for (lease, want) in cases {
            assert_eq!(held_by(&lease, "me"), want, "{:?}", lease.spec);
        }
    }

    #[test]
    fn a_lease_given_up_may_be_taken_at_once_and_keeps_its_term() {
        let held = LeaseSpec {
            holder_identity: Some("me".into()),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(4),
            renew_time: Some(MicroTime(Timestamp::from_second(1).expect("valid"))),
            ..LeaseSpec::default()
        };
        let given_up = released(held);
        assert_eq!(given_up.holder_identity, None);
        assert_eq!(given_up.lease_transitions, Some(4));
        let lease = Lease {
            spec: Some(given_up),
            ..Lease::default()
        };
        let now = Instant::now();
        let seen = Sighting::observe(None, Record::of(&lease), now);
        assert!(seen.may_take("standby", now), "taken only after the duration");
        assert!(!held_by(&lease, "me"));
    }

    #[test]
    fn the_owner_is_added_once_and_only_when_known() {
        let owner = |uid: &str| OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "ballast-operator".into(),
            uid: uid.into(),
            ..OwnerReference::default()
        };
        let cases = [
            (None, None, None),
            (Some(vec![owner("a")]), None, Some(vec![owner("a")])),
            (None, Some(owner("a")), Some(vec![owner("a")])),
            (Some(vec![owner("a")]), Some(owner("a")), Some(vec![owner("a")])),
            // Recreated under a new uid: the new one is added.
            (
                Some(vec![owner("a")]),
                Some(owner("b")),
                Some(vec![owner("a"), owner("b")]),
            ),
        ];
        for (refs, add, want) in cases {
            assert_eq!(with_owner(refs.clone(), add.as_ref()), want, "{refs:?} + {add:?}");
        }
    }

    #[test]
    fn a_renewed_record_is_counted_from_when_it_was_seen() {
        let t0 = Instant::now();
        let first = Sighting::observe(None, record(Some("other"), 1, Some(15)), t0);
        let later = t0 + Duration::from_secs(10);
        let second = Sighting::observe(Some(first.clone()), record(Some("other"), 2, Some(15)), later);
        assert_eq!(second.since, later);
        let same = Sighting::observe(Some(first.clone()), record(Some("other"), 1, Some(15)), later);
        assert_eq!(same.since, t0);
    }

    #[test]
    fn a_holder_acts_until_its_own_deadline_and_not_after() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let duration = Duration::from_secs(15);
        let deadline = s(15);
        // (renewal, now, next)
        let cases = [
            (Renewal::Renewed(s(5)), s(6), Next::Until(s(20))),
            // Renewed, but the request was sent long ago: the deadline counts from then.
            (Renewal::Renewed(s(5)), s(14), Next::Until(s(20))),
            (Renewal::Taken, s(6), Next::Taken),
            (Renewal::Failed, s(6), Next::Retry),
            (Renewal::Failed, s(15), Next::Lapsed),
            (Renewal::Failed, s(30), Next::Lapsed),
        ];
        for (renewal, now, want) in cases {
            assert_eq!(
                after(renewal, deadline, duration, now),
                want,
                "{renewal:?} at +{:?}",
                now - t0
            );
        }
    }
}
