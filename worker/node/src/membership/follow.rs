//! Following a role's membership: the Leases are watched (one long-lived
//! request per follower, not a listing every second), and each is judged live
//! while it has changed within its duration on the follower's own monotonic
//! clock, never by comparing the writer's `renewTime` with the reader's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ADDRESS_ANNOTATION, Members, READY_ANNOTATION, selector};

/// A member's Lease as last seen, and since when its renewal is unchanged.
#[derive(Clone, Debug)]
struct Seen {
    lease: Lease,
    since: Instant,
}

/// What a follower knows of a role's Leases. Pure: fed what the API server
/// said and when, it answers who is live and ready.
#[derive(Clone, Debug, Default)]
pub struct Roster {
    seen: BTreeMap<String, Seen>,
}

/// The part of a Lease whose change proves its holder alive.
fn heartbeat(
    lease: &Lease,
) -> (
    Option<&str>,
    Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>,
) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.as_deref()),
        spec.and_then(|s| s.renew_time.as_ref()),
    )
}

impl Roster {
    /// Records `lease` as read at `now`: a renewed one counts from now; an
    /// unchanged renewal keeps the time it was first seen (annotations such
    /// as readiness are taken as they are).
    pub fn observe(&mut self, lease: Lease, now: Instant) {
        let Some(name) = lease.metadata.name.clone() else {
            return;
        };
        let since = match self.seen.get(&name) {
            Some(seen) if heartbeat(&seen.lease) == heartbeat(&lease) => seen.since,
            _ => now,
        };
        self.seen.insert(name, Seen { lease, since });
    }

    /// Forgets a deleted Lease: its member left.
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }

    /// Takes a full listing read at `now`: Leases not in it are gone.
    pub fn sync(&mut self, leases: Vec<Lease>, now: Instant) {
        let listed: std::collections::BTreeSet<String> =
            leases.iter().filter_map(|l| l.metadata.name.clone()).collect();
        self.seen.retain(|name, _| listed.contains(name));
        for lease in leases {
            self.observe(lease, now);
        }
    }

    /// The live, ready members at `now`: identity → address.
    pub fn ready(&self, now: Instant) -> Members {
        self.seen
            .values()
            .filter_map(|seen| {
                let spec = seen.lease.spec.as_ref()?;
                let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
                let live = now.saturating_duration_since(seen.since) < duration;
                let annotations = seen.lease.metadata.annotations.as_ref()?;
                let ready = annotations.get(READY_ANNOTATION).is_some_and(|v| v == "true");
                let address = annotations.get(ADDRESS_ANNOTATION)?.clone();
                let identity = spec.holder_identity.clone()?;
                (live && ready).then_some((identity, address))
            })
            .collect()
    }
}

/// How often liveness is re-judged without news from the watch (Leases lapse by time alone).
const TICK: Duration = Duration::from_millis(500);

/// The ready members of one role of a pipeline, kept current from a watch of
/// their Leases until `shutdown`; an unreachable API server keeps the last
/// Leases seen, which lapse on this follower's clock.
pub fn follow(
    client: kube::Client,
    namespace: &str,
    pipeline: &str,
    role: &str,
    shutdown: CancellationToken,
) -> watch::Receiver<Members> {
    let (tx, rx) = watch::channel(BTreeMap::new());
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(&selector(pipeline, role));
    let role = role.to_owned();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        let mut roster = Roster::default();
        // A (re)listing under way: its Leases replace the roster once complete.
        let mut relisting: Option<Vec<Lease>> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(Ok(Event::Apply(lease))) => roster.observe(lease, Instant::now()),
                    Some(Ok(Event::Delete(lease))) => {
                        if let Some(name) = lease.metadata.name.as_deref() {
                            roster.forget(name);
                        }
                    }
                    Some(Ok(Event::Init)) => relisting = Some(Vec::new()),
                    Some(Ok(Event::InitApply(lease))) => relisting.get_or_insert_with(Vec::new).push(lease),
                    Some(Ok(Event::InitDone)) => {
                        roster.sync(relisting.take().unwrap_or_default(), Instant::now());
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, %role, "watching member leases failed; keeping the last membership");
                    }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            let members = roster.ready(Instant::now());
            tx.send_if_modified(|current| {
                let changed = *current != members;
                if changed {
                    let names: Vec<&str> = members.keys().map(String::as_str).collect();
                    tracing::info!(%role, members = %names.join(","), "membership changed");
                    *current = members;
                }
                changed
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::super::tests::member;
    use super::*;

    /// Member `i`'s Lease as renewed at writer time `renewed` (any clock).
    fn lease(i: usize, ready: bool, renewed: i64) -> Lease {
        serde_json::from_value(member(i).lease(ready, Timestamp::from_second(renewed).expect("valid")))
            .expect("lease")
    }

    fn names(members: &Members) -> Vec<&str> {
        members.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_member_is_live_while_its_lease_changes_within_its_duration_on_the_local_clock() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // Writers' clocks a year apart from each other and from the reader's: irrelevant.
        let mut roster = Roster::default();
        roster.observe(lease(0, true, 1), s(0));
        roster.observe(lease(1, true, 40_000_000), s(0));
        roster.observe(lease(2, false, 1), s(0));
        assert_eq!(
            names(&roster.ready(s(14))),
            ["orders-slave-0", "orders-slave-1"],
            "unready left out"
        );
        // Member 0 renews at 10 s; member 1 stops.
        roster.observe(lease(0, true, 2), s(10));
        roster.observe(lease(1, true, 40_000_000), s(10));
        assert_eq!(
            names(&roster.ready(s(15))),
            ["orders-slave-0"],
            "unchanged for its duration: lapsed"
        );
        assert_eq!(names(&roster.ready(s(24))), ["orders-slave-0"]);
        assert!(
            roster.ready(s(25)).is_empty(),
            "member 0 lapsed 15 s after its last renewal was seen"
        );
    }

    #[test]
    fn a_listing_drops_the_leases_it_lacks_and_a_deletion_drops_one() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        roster.observe(lease(0, true, 1), t0);
        roster.observe(lease(1, true, 1), t0);
        roster.sync(vec![lease(1, true, 1), lease(2, true, 1)], t0);
        assert_eq!(names(&roster.ready(t0)), ["orders-slave-1", "orders-slave-2"]);
        roster.forget("orders-slave-1");
        assert_eq!(names(&roster.ready(t0)), ["orders-slave-2"]);
    }

    #[test]
    fn readiness_changes_take_effect_without_a_renewal() {
        let t0 = Instant::now();
        let mut roster = Roster::default();
        roster.observe(lease(0, true, 1), t0);
        roster.observe(lease(0, false, 1), t0 + Duration::from_secs(1));
        assert!(roster.ready(t0 + Duration::from_secs(1)).is_empty());
        // ...and keep the liveness count of the unchanged renewal.
        roster.observe(lease(0, true, 1), t0 + Duration::from_secs(2));
        assert!(roster.ready(t0 + Duration::from_secs(15)).is_empty());
    }
}
