//! The master's account of slave memory lost while the KV store is down: the
//! events a slave last reported holding, gone when it left the membership for
//! good or came back as a new process. One reporter (the active master), from
//! what the slaves themselves hold, so events handed between slaves are
//! neither counted twice nor missed. Pure: time comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What one slave process reported holding in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Identifies the process: a restarted slave reports another one.
    pub incarnation: u64,
    /// Events held.
    pub events: u64,
    /// Start of the oldest window held, if any.
    pub oldest_window_ms: Option<i64>,
}

/// How a slave's memory went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// It left the membership and did not come back within the grace.
    Left,
    /// It came back as a new process, its memory empty.
    Restarted,
}

impl Cause {
    /// `left` or `restarted`, as reported.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Restarted => "restarted",
        }
    }
}

/// A slave process gone, with what it last reported holding: lost, unless
/// it is 0 (nothing held, or all handed to the others before it went).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gone {
    /// The slave.
    pub slave: String,
    /// Events it last reported holding: lost with it.
    pub lost: u64,
    /// Start of the oldest window among them: the loss window runs from here.
    pub since_ms: Option<i64>,
    /// How the memory went.
    pub cause: Cause,
}

/// The last memory each slave reported, and the slaves that left lately.
///
/// It is part of the master's persisted state, so that a standby taking over
/// still knows which process each slave was and what it held: a slave that
/// crashed during the failover is then a loss the new master reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    last: BTreeMap<String, Memory>,
    /// Slaves gone from the membership, since when. They are still polled
    /// through the grace: one draining hands its events over and reports what
    /// is left, and a Lease that lapsed for a moment (an API server hiccup)
    /// with the same process behind it is no loss.
    departed: BTreeMap<String, (Memory, i64)>,
}

impl Ledger {
    /// This ledger as a new master resumes it at `now_ms`: the departures it
    /// holds are timed from now on its own clock, not the previous master's.
    pub fn resumed(mut self, now_ms: i64) -> Self {
        for (_, since) in self.departed.values_mut() {
            *since = now_ms;
        }
        self
    }

    /// Whether `other` knows other slave processes than this ledger (one
    /// joined, left, restarted or was reported gone), not just other counts:
    /// such a change is saved at once, so that a new master neither misses
    /// nor repeats a loss. Pure.
    pub fn processes_differ(&self, other: &Ledger) -> bool {
        let processes = |l: &Ledger| -> Vec<(String, u64, bool)> {
            let mut all: Vec<(String, u64, bool)> = l
                .last
                .iter()
                .map(|(s, m)| (s.clone(), m.incarnation, false))
                .chain(
                    l.departed
                        .iter()
                        .map(|(s, (m, _))| (s.clone(), m.incarnation, true)),
                )
                .collect();
            all.sort();
            all
        };
        processes(self) != processes(other)
    }

    /// Takes one round of reports (`reported`: the slaves that answered,
    /// members or lately departed) with the `live` membership at `now_ms`;
    /// returns the slave processes it finds gone. A slave is gone once it has
    /// been out of the membership for `grace_ms`, or as soon as another process
    /// answers in its name.
    pub fn observe(
        &mut self,
        reported: &BTreeMap<String, Memory>,
        live: &BTreeSet<String>,
        now_ms: i64,
        grace_ms: i64,
    ) -> Vec<Gone> {
        let mut gone = Vec::new();
        let left: Vec<String> = self.last.keys().filter(|s| !live.contains(*s)).cloned().collect();
        for slave in left {
            if let Some(memory) = self.last.remove(&slave) {
                self.departed.insert(slave, (memory, now_ms));
            }
        }
        for (slave, now) in reported {
            if live.contains(slave) {
                let before = self
                    .last
                    .remove(slave)
                    .or_else(|| self.departed.remove(slave).map(|(memory, _)| memory));
                if let Some(before) = before
                    && before.incarnation != now.incarnation
                {
                    gone.push(went(slave, &before, Cause::Restarted));
                }
                self.last.insert(slave.clone(), *now);
            } else if let Some((memory, _)) = self.departed.get_mut(slave) {
                if memory.incarnation == now.incarnation {
                    *memory = *now;
                } else {
                    gone.push(went(slave, memory, Cause::Restarted));
                    self.departed.remove(slave);
                }
            }
        }
        let expired: Vec<String> = self
            .departed
            .iter()
            .filter(|(_, (_, since))| now_ms - since >= grace_ms)
            .map(|(slave, _)| slave.clone())
            .collect();
        for slave in expired {
            if let Some((memory, _)) = self.departed.remove(&slave) {
                gone.push(went(&slave, &memory, Cause::Left));
            }
        }
        gone
    }
}

/// Which slaves the master polls: the members, and departed ones (at their
/// last address) through the grace and a little more, so that one draining
/// is seen to report what is left. Recomputed only when something changed:
/// the master's loop runs once per finished task. Pure.
#[derive(Clone, Debug, Default)]
pub struct Polled {
    known: BTreeMap<String, String>,
    lingering: BTreeMap<String, (String, i64)>,
    polled: BTreeMap<String, String>,
}

impl Polled {
    /// Slack past the grace, so that the ledger sees a last report in time.
    const SLACK_MS: i64 = 2_000;

    /// The slaves to poll given the `live` members at `now_ms`.
    pub fn update(
        &mut self,
        live: &BTreeMap<String, String>,
        now_ms: i64,
        grace_ms: i64,
    ) -> &BTreeMap<String, String> {
        let stale = |since: i64| now_ms - since > grace_ms + Self::SLACK_MS;
        if self.known != *live || self.lingering.values().any(|(_, since)| stale(*since)) {
            for (id, address) in &self.known {
                if !live.contains_key(id) {
                    self.lingering
                        .entry(id.clone())
                        .or_insert((address.clone(), now_ms));
                }
            }
            self.lingering
                .retain(|id, (_, since)| !live.contains_key(id) && !stale(*since));
            self.known.clone_from(live);
            self.polled.clone_from(live);
            self.polled.extend(
                self.lingering
                    .iter()
                    .map(|(id, (address, _))| (id.clone(), address.clone())),
            );
        }
        &self.polled
    }
}

fn went(slave: &str, memory: &Memory, cause: Cause) -> Gone {
    Gone {
        slave: slave.to_owned(),
        lost: memory.events,
        since_ms: memory.oldest_window_ms,
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: i64 = 5_000;

    fn held(incarnation: u64, events: u64) -> Memory {
        Memory {
            incarnation,
            events,
            oldest_window_ms: (events > 0).then_some(60_000),
        }
    }

    type Reports = BTreeMap<String, Memory>;

    fn reports(pairs: &[(&str, Memory)]) -> Reports {
        pairs.iter().map(|(s, m)| ((*s).to_owned(), *m)).collect()
    }

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn gone(slave: &str, lost: u64, cause: Cause) -> Gone {
        Gone {
            slave: slave.to_owned(),
            lost,
            since_ms: (lost > 0).then_some(60_000),
            cause,
        }
    }

    #[test]
    fn memory_is_lost_with_a_restart_or_a_departure_past_the_grace_and_only_then() {
        // (round: reports, live, now) → losses, played in order on one ledger.
        let rounds: Vec<(Reports, BTreeSet<String>, i64, Vec<Gone>)> = vec![
            (
                reports(&[("a", held(1, 10)), ("b", held(2, 5))]),
                live(&["a", "b"]),
                0,
                vec![],
            ),
            // Handed off: a holds less, b more. Moving is not losing.
            (
                reports(&[("a", held(1, 4)), ("b", held(2, 11))]),
                live(&["a", "b"]),
                1_000,
                vec![],
            ),
            // b restarts: a new process, its memory empty.
            (
                reports(&[("a", held(1, 4)), ("b", held(3, 0))]),
                live(&["a", "b"]),
                2_000,
                vec![gone("b", 11, Cause::Restarted)],
            ),
            // a's Lease lapses: not yet a loss...
            (reports(&[("b", held(3, 2))]), live(&["b"]), 3_000, vec![]),
            // ...and the same process returns within the grace: its memory is intact.
            (
                reports(&[("a", held(1, 4)), ("b", held(3, 2))]),
                live(&["a", "b"]),
                4_000,
                vec![],
            ),
            // b leaves for good: lost once the grace has passed, once.
            (reports(&[("a", held(1, 4))]), live(&["a"]), 5_000, vec![]),
            (reports(&[("a", held(1, 4))]), live(&["a"]), 9_999, vec![]),
            (
                reports(&[("a", held(1, 4))]),
                live(&["a"]),
                10_000,
                vec![gone("b", 2, Cause::Left)],
            ),
            (reports(&[("a", held(1, 4))]), live(&["a"]), 11_000, vec![]),
            // A slave holding nothing goes without a loss.
            (reports(&[("a", held(1, 0))]), live(&["a"]), 12_000, vec![]),
            (reports(&[]), live(&[]), 20_000, vec![]),
            (reports(&[]), live(&[]), 25_000, vec![gone("a", 0, Cause::Left)]),
        ];
        let mut ledger = Ledger::default();
        for (i, (reported, live, now, want)) in rounds.into_iter().enumerate() {
            assert_eq!(ledger.observe(&reported, &live, now, GRACE), want, "round {i}");
        }
    }

    #[test]
    fn a_slave_that_returns_as_a_new_process_after_leaving_lost_its_memory_once() {
        let mut ledger = Ledger::default();
        ledger.observe(&reports(&[("a", held(1, 7))]), &live(&["a"]), 0, GRACE);
        assert_eq!(ledger.observe(&reports(&[]), &live(&[]), 1_000, GRACE), vec![]);
        assert_eq!(
            ledger.observe(&reports(&[("a", held(2, 0))]), &live(&["a"]), 2_000, GRACE),
            vec![gone("a", 7, Cause::Restarted)]
        );
        assert_eq!(
            ledger.observe(&reports(&[("a", held(2, 0))]), &live(&["a"]), 9_000, GRACE),
            vec![]
        );
    }

    #[test]
    fn a_departed_slave_that_drains_before_the_grace_ends_lost_nothing() {
        let mut ledger = Ledger::default();
        ledger.observe(
            &reports(&[("a", held(1, 7)), ("b", held(2, 1))]),
            &live(&["a", "b"]),
            0,
            GRACE,
        );
        // a leaves the ring (SIGTERM) and hands its events to b, still answering polls.
        assert_eq!(
            ledger.observe(
                &reports(&[("a", held(1, 3)), ("b", held(2, 5))]),
                &live(&["b"]),
                1_000,
                GRACE
            ),
            vec![]
        );
        assert_eq!(
            ledger.observe(
                &reports(&[("a", held(1, 0)), ("b", held(2, 8))]),
                &live(&["b"]),
                2_000,
                GRACE
            ),
            vec![]
        );
        // Then it is gone for good: with nothing held, nothing is lost.
        assert_eq!(
            ledger.observe(&reports(&[("b", held(2, 8))]), &live(&["b"]), 6_000, GRACE),
            vec![gone("a", 0, Cause::Left)]
        );
    }

    #[test]
    fn a_departed_slave_stays_polled_at_its_last_address_through_the_grace() {
        let addresses = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(s, a)| ((*s).to_owned(), (*a).to_owned()))
                .collect()
        };
        let mut polled = Polled::default();
        let both = addresses(&[("a", "1"), ("b", "2")]);
        assert_eq!(polled.update(&both, 0, GRACE), &both);
        let only_b = addresses(&[("b", "2")]);
        assert_eq!(polled.update(&only_b, 1_000, GRACE), &both, "a lingers");
        assert_eq!(
            polled.update(&only_b, 8_000, GRACE),
            &both,
            "through grace and slack"
        );
        assert_eq!(
            polled.update(&only_b, 8_001, GRACE),
            &only_b,
            "then it is dropped"
        );
        // Back in the membership (at a new address): polled there, not lingering.
        let back = addresses(&[("a", "3"), ("b", "2")]);
        assert_eq!(polled.update(&back, 9_000, GRACE), &back);
    }

    #[test]
    fn an_unanswered_poll_keeps_the_last_report() {
        let mut ledger = Ledger::default();
        ledger.observe(&reports(&[("a", held(1, 7))]), &live(&["a"]), 0, GRACE);
        // Live but silent this round (busy, or a timeout): nothing is concluded.
        assert_eq!(ledger.observe(&reports(&[]), &live(&["a"]), 1_000, GRACE), vec![]);
        assert_eq!(
            ledger.observe(&reports(&[("a", held(2, 0))]), &live(&["a"]), 2_000, GRACE),
            vec![gone("a", 7, Cause::Restarted)]
        );
    }

    #[test]
    fn a_resumed_ledger_reports_a_slave_that_restarted_during_the_failover() {
        let mut active = Ledger::default();
        active.observe(
            &reports(&[("s-0", held(1, 40)), ("s-1", held(2, 7))]),
            &live(&["s-0", "s-1"]),
            0,
            GRACE,
        );
        // Persisted, then resumed by the standby: s-0 answers as a new process.
        let saved = serde_json::to_string(&active).expect("ledger as JSON");
        let mut standby = serde_json::from_str::<Ledger>(&saved)
            .expect("ledger from JSON")
            .resumed(10_000);
        let lost = standby.observe(
            &reports(&[("s-0", held(9, 0)), ("s-1", held(2, 7))]),
            &live(&["s-0", "s-1"]),
            10_500,
            GRACE,
        );
        assert_eq!(lost, vec![gone("s-0", 40, Cause::Restarted)]);
        // A fresh ledger (nothing persisted) would have seen nothing to report.
        let mut fresh = Ledger::default();
        let lost = fresh.observe(&reports(&[("s-0", held(9, 0))]), &live(&["s-0"]), 10_500, GRACE);
        assert!(lost.is_empty());
    }

    #[test]
    fn only_a_change_of_processes_not_of_counts_is_saved_at_once() {
        let mut a = Ledger::default();
        a.observe(&reports(&[("s-0", held(1, 40))]), &live(&["s-0"]), 0, GRACE);
        let mut counts = a.clone();
        counts.observe(&reports(&[("s-0", held(1, 41))]), &live(&["s-0"]), 500, GRACE);
        assert!(!a.processes_differ(&counts));
        let mut restarted = a.clone();
        restarted.observe(&reports(&[("s-0", held(2, 0))]), &live(&["s-0"]), 500, GRACE);
        assert!(a.processes_differ(&restarted));
        let mut left = a.clone();
        left.observe(&reports(&[]), &live(&[]), 500, GRACE);
        assert!(a.processes_differ(&left));
    }
}
