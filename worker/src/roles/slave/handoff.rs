//! Hands the events of merchants this slave no longer owns to the slave that
//! does. When a slave joins while the KV store is down, the intake routes a
//! quarter of the merchants to it from then on; without the hand-off each of
//! those merchants' hour-to-date would be computed twice, over two halves of
//! its events, and the later write would silently replace the other half.
//! A slave that is stopped hands everything it holds to the others the same
//! way before it goes.

use crate::auth::{Authed, Token};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast_crds::Dependency;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::lock;
use super::store::Store;
use crate::membership::Members;
use crate::modes::Modes;
use crate::routing::Ring;
use crate::wire::EventBatch;
use crate::wire::slave_client::SlaveClient;

/// How often the held merchants are checked against the membership.
const EVERY: Duration = Duration::from_secs(1);

/// Events per `Deliver` call: the intake's batch size, well inside the gRPC window.
const BATCH: usize = 1_000;

/// How long a leaving slave must have held nothing before it goes: it refuses
/// new deliveries, but one already past that check may still land.
const SETTLE: Duration = Duration::from_millis(500);

/// Which held merchants another live slave owns now: owner → merchants. Pure.
///
/// Nothing moves while this slave is missing from `members` (not ready yet,
/// or leaving): a ring without it would give every merchant away.
pub fn misplaced<'a>(
    held: impl IntoIterator<Item = &'a str>,
    members: &Members,
    me: &str,
) -> BTreeMap<String, BTreeSet<String>> {
    if !members.contains_key(me) {
        return BTreeMap::new();
    }
    owners_elsewhere(held, &Ring::new(members.keys().cloned()), me)
}

/// Where every held merchant goes when this slave leaves: its owner among the
/// other members. Pure; empty when there is no other member.
pub fn evacuate<'a>(
    held: impl IntoIterator<Item = &'a str>,
    members: &Members,
    me: &str,
) -> BTreeMap<String, BTreeSet<String>> {
    owners_elsewhere(held, &Ring::new(members.keys().filter(|m| *m != me).cloned()), me)
}

fn owners_elsewhere<'a>(
    held: impl IntoIterator<Item = &'a str>,
    ring: &Ring,
    me: &str,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for merchant in held {
        match ring.owner(merchant) {
            Some(owner) if owner != me => {
                out.entry(owner.to_owned())
                    .or_default()
                    .insert(merchant.to_owned());
            }
            _ => {}
        }
    }
    out
}

/// The hand-off's counters (`ballast_slave_*`).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Events the new owner acknowledged, then dropped here.
    pub handed_off: Counter,
    /// `Deliver` calls to a new owner that failed (the events stay here and are offered again).
    pub failures: Counter,
}

/// What the hand-off works with.
pub struct Handoff {
    /// This slave's identity.
    me: String,
    /// Its memory.
    store: Arc<Mutex<Store>>,
    /// The live slaves.
    members: watch::Receiver<Members>,
    /// The published modes (the KV epoch goes with delivered batches).
    modes: watch::Receiver<Modes>,
    metrics: Metrics,
    token: Token,
    clients: HashMap<String, SlaveClient<Authed>>,
}

impl Handoff {
    /// A hand-off for slave `me`.
    pub fn new(
        me: String,
        store: Arc<Mutex<Store>>,
        members: watch::Receiver<Members>,
        modes: watch::Receiver<Modes>,
        metrics: Metrics,
        token: Token,
    ) -> Self {
        Self {
            me,
            store,
            members,
            modes,
            metrics,
            token,
            clients: HashMap::new(),
        }
    }

    /// Every second until `shutdown`: the events of merchants that the
    /// membership gives to another slave are delivered to it and, once it
    /// acknowledged them, dropped here. A failed delivery keeps them for the
    /// next round, so nothing is lost in between (at worst both slaves hold
    /// them for a while).
    #[tracing::instrument(skip_all, fields(identity = %self.me))]
    pub async fn run(&mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(EVERY);
        while tokio::select! { () = shutdown.cancelled() => false, _ = ticker.tick() => true } {
            let view = self.owners();
            let plan = misplaced(lock(&self.store).merchants(), &view, &self.me);
            self.hand_over(plan, &view).await;
        }
    }

    /// When this slave leaves: hands everything it holds to the other
    /// members, round after round, until it has held nothing for `SETTLE`
    /// or `deadline` passes. (Another slave leaving at the same time refuses
    /// them: they stay here for the next round, over a fresher view.)
    /// What is still held then is lost, and the master counts it from this
    /// slave's last report.
    #[tracing::instrument(skip_all, fields(identity = %self.me))]
    pub async fn drain(&mut self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        let mut empty_since = None;
        loop {
            let view = self.owners();
            let plan = evacuate(lock(&self.store).merchants(), &view, &self.me);
            if plan.is_empty() {
                let now = tokio::time::Instant::now();
                if now.duration_since(*empty_since.get_or_insert(now)) >= SETTLE {
                    break;
                }
            } else {
                empty_since = None;
                self.hand_over(plan, &view).await;
            }
            if tokio::time::Instant::now() >= until {
                break;
            }
            tokio::time::sleep(EVERY / 5).await;
        }
        let left = lock(&self.store).events();
        if left > 0 {
            tracing::error!(
                events = left,
                "leaving with events no other slave took: they are lost"
            );
        } else {
            tracing::info!("drained: every event held was handed to the other slaves");
        }
    }

    /// The slaves merchants belong to now: while a slave set is published with
    /// a Degraded KV epoch, its members (the intakes route over exactly them;
    /// a member whose address is not known yet has an empty one), otherwise
    /// the live membership.
    fn owners(&self) -> Members {
        let view = self.members.borrow().clone();
        match self.modes.borrow().slave_set() {
            Some(set) => set
                .members
                .iter()
                .map(|m| (m.clone(), view.get(m).cloned().unwrap_or_default()))
                .collect(),
            None => view,
        }
    }

    /// Delivers the events of each planned owner's merchants to it, dropping
    /// them here once acknowledged.
    async fn hand_over(&mut self, plan: BTreeMap<String, BTreeSet<String>>, view: &Members) {
        let stamp = {
            let modes = self.modes.borrow();
            let epoch = modes.get(Dependency::Kv).1;
            (epoch, modes.slave_set().map_or(0, |s| s.generation))
        };
        for (owner, merchants) in plan {
            // An owner whose address is not known yet gets its merchants next round.
            let Some(address) = view.get(&owner).filter(|a| !a.is_empty()) else {
                continue;
            };
            let events = lock(&self.store).events_of(&merchants);
            let mut moved = 0;
            for chunk in events.chunks(BATCH) {
                match deliver(&mut self.clients, &self.token, address, chunk, stamp).await {
                    Ok(()) => moved += lock(&self.store).remove(chunk),
                    Err(error) => {
                        self.metrics.failures.inc();
                        self.clients.remove(address);
                        tracing::warn!(to = %owner, %error, "handing off events failed; they stay here until the next round");
                        break;
                    }
                }
            }
            if moved > 0 {
                self.metrics.handed_off.inc_by(moved);
                tracing::info!(
                    to = %owner, merchants = merchants.len(), events = moved,
                    "handed off the events of merchants the ring gives to another slave"
                );
            }
        }
    }
}

/// Delivers one chunk to the slave at `address`, connecting on first use.
async fn deliver(
    clients: &mut HashMap<String, SlaveClient<Authed>>,
    token: &Token,
    address: &str,
    events: &[crate::wire::ChangeEvent],
    (epoch, generation): (i64, i64),
) -> Result<(), String> {
    if !clients.contains_key(address) {
        let channel =
            crate::auth::channel(address, crate::grpc::STORE_DEADLINE, token).map_err(|e| e.to_string())?;
        let client = SlaveClient::new(channel);
        clients.insert(address.to_owned(), client);
    }
    let client = clients.get_mut(address).ok_or("client vanished")?;
    client
        .deliver(EventBatch {
            events: events.to_vec(),
            epoch,
            generation,
        })
        .await
        .map(drop)
        .map_err(|status| format!("{}: {}", status.code(), status.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Members {
        names
            .iter()
            .map(|n| ((*n).to_owned(), format!("{n}:1")))
            .collect()
    }

    #[test]
    fn only_merchants_another_live_slave_owns_move_and_only_to_it() {
        let held: Vec<String> = (0..200).map(|m| format!("m{m}")).collect();
        let three = members(&["s-0", "s-1", "s-2"]);
        let four = members(&["s-0", "s-1", "s-2", "s-3"]);
        let without_me = members(&["s-1", "s-2", "s-3"]);
        let ring3 = Ring::new(three.keys().cloned());
        let ring4 = Ring::new(four.keys().cloned());
        // s-0 holds the merchants the three-slave ring gave it.
        let mine: Vec<&str> = held
            .iter()
            .map(String::as_str)
            .filter(|m| ring3.owner(m) == Some("s-0"))
            .collect();
        // (members, me, expected owners → merchant count)
        let cases: Vec<(&Members, &str, BTreeMap<String, usize>)> = vec![
            // Same membership: everything is where it belongs.
            (&three, "s-0", BTreeMap::new()),
            // s-3 joined: exactly the merchants the new ring gives it move, all to it.
            (
                &four,
                "s-0",
                BTreeMap::from([(
                    "s-3".to_owned(),
                    mine.iter().filter(|m| ring4.owner(m) == Some("s-3")).count(),
                )]),
            ),
            // This slave is not in its own view (not ready, or leaving): nothing moves.
            (&without_me, "s-0", BTreeMap::new()),
        ];
        for (i, (view, me, want)) in cases.into_iter().enumerate() {
            let got: BTreeMap<String, usize> = misplaced(mine.iter().copied(), view, me)
                .into_iter()
                .map(|(owner, merchants)| (owner, merchants.len()))
                .collect();
            assert_eq!(got, want, "case {i}");
        }
        let moving = misplaced(mine.iter().copied(), &four, "s-0");
        assert!(moving.values().flatten().all(|m| ring4.owner(m) == Some("s-3")));
        assert!(!moving.is_empty(), "200 merchants and a fourth slave: some move");
    }

    #[test]
    fn a_leaving_slave_gives_each_merchant_to_its_owner_among_the_others() {
        let ring = Ring::new(["s-1", "s-2"]);
        let held: Vec<String> = (0..50).map(|m| format!("m{m}")).collect();
        let plan = evacuate(
            held.iter().map(String::as_str),
            &members(&["s-0", "s-1", "s-2"]),
            "s-0",
        );
        let placed: usize = plan.values().map(BTreeSet::len).sum();
        assert_eq!(placed, 50, "everything goes");
        for (owner, merchants) in &plan {
            assert!(merchants.iter().all(|m| ring.owner(m) == Some(owner.as_str())));
        }
        // Whether or not it is still in its own view.
        assert_eq!(
            evacuate(held.iter().map(String::as_str), &members(&["s-1", "s-2"]), "s-0"),
            plan
        );
        // The last slave has no one to give to.
        assert!(evacuate(held.iter().map(String::as_str), &members(&["s-0"]), "s-0").is_empty());
    }

    #[test]
    fn a_slave_that_left_takes_nothing_and_its_merchants_stay_put_elsewhere() {
        // s-1 holds its own merchants; s-0 leaves the view: s-1 still owns them all.
        let ring = Ring::new(["s-0", "s-1", "s-2"]);
        let held: Vec<String> = (0..200)
            .map(|m| format!("m{m}"))
            .filter(|m| ring.owner(m) == Some("s-1"))
            .collect();
        let plan = misplaced(held.iter().map(String::as_str), &members(&["s-1", "s-2"]), "s-1");
        assert!(plan.is_empty(), "{plan:?}");
    }
}
