//! Which data centre's Elasticsearch is active: the promotion when the
//! active one is down (to the first answering standby within the lag
//! budget, or to the one a person names), and the failback to the primary
//! once it answers and has caught up for the dwell time. Only an operator
//! holding its Lease promotes: two data centres cannot outvote each other,
//! the API server's quorum is the third vote. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_crds::member_store::Failback;

/// How long a kept primary may apply nothing while it lacks records before
/// its replay is called stalled: far beyond a replicator's retry of a
/// refused write, well within a person's patience.
pub const STALL: Duration = Duration::from_secs(30);

/// The reason of a replay that applies nothing: a person must act.
pub const REPLAY_STALLED: &str = "ReplayStalled";

/// A standby's replication, as [`super::status::in_sync`] judged it.
#[derive(Clone, Debug, PartialEq)]
pub enum Lag {
    /// Within the budget: it lacks this many records.
    Within(i64),
    /// Over the budget, and what it lacks.
    Over(String),
    /// Not measured.
    Unknown,
}

/// What the decision is made from.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The data centres, in the spec's order.
    pub order: &'a [String],
    /// The primary data centre.
    pub primary: &'a str,
    /// The active one, as published.
    pub active: &'a str,
    /// Whether each data centre's Elasticsearch answers; one not probed yet is
    /// not known to answer (and the active one not known to be down).
    pub up: &'a BTreeMap<String, bool>,
    /// Each kept data centre's lag.
    pub lag: &'a BTreeMap<String, Lag>,
    /// Whether this operator holds its Lease now.
    pub leading: bool,
    /// The data centre the `ballast.dev/promote` annotation names.
    pub named: Option<&'a str>,
    /// Whether the failback is automatic.
    pub failback: Failback,
    /// How long the primary, while kept, has been caught up ([`super::status::caught_up`]).
    pub primary_caught_up_for: Option<Duration>,
    /// How long the primary, while kept and lacking records, has applied none.
    pub primary_stalled_for: Option<Duration>,
    /// How long it must have before the failback.
    pub dwell: Duration,
}

/// The decision, with the reason and message its condition publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The active data centre stays, and answers.
    Stay {
        /// CamelCase cause.
        reason: &'static str,
        /// What a person needs to know.
        message: String,
    },
    /// Publish `to` as active under the next epoch.
    Promote {
        /// The data centre promoted.
        to: String,
        /// CamelCase cause.
        reason: &'static str,
        /// What a person needs to know.
        message: String,
    },
    /// The active one is down and stays active: no promotion may be made.
    Wait {
        /// CamelCase cause.
        reason: &'static str,
        /// What a person needs to know, and can do.
        message: String,
    },
}

impl Decision {
    /// The CamelCase cause.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Stay { reason, .. } | Self::Wait { reason, .. } | Self::Promote { reason, .. } => reason,
        }
    }

    /// The reason and message of a decision a person must act on (announced
    /// as a Warning Event when it starts): no promotion possible, or a
    /// replay that applies nothing.
    pub fn warning(&self) -> Option<(&'static str, &str)> {
        match self {
            Self::Wait { reason, message } => Some((reason, message)),
            Self::Stay { reason, message } if *reason == REPLAY_STALLED => Some((reason, message)),
            Self::Stay { .. } | Self::Promote { .. } => None,
        }
    }
}

/// Decides which data centre is active. Pure.
pub fn decide(f: &Facts<'_>) -> Decision {
    let active = f.active;
    let answers = |dc: &str| f.up.get(dc).copied() == Some(true);
    if f.up.get(active).copied() == Some(false) {
        return promote_from_down(f);
    }
    if active == f.primary {
        return Decision::Stay {
            reason: "Answering",
            message: format!("{active}'s Elasticsearch answers"),
        };
    }
    let primary = f.primary;
    if !answers(primary) {
        return Decision::Stay {
            reason: "Promoted",
            message: format!("{active} is active; the primary {primary}'s Elasticsearch does not answer"),
        };
    }
    let caught_up = f.primary_caught_up_for.is_some_and(|d| d >= f.dwell);
    if !caught_up {
        let lag = match f.lag.get(primary) {
            Some(Lag::Within(n)) => format!("it lacks {n} change record(s)"),
            Some(Lag::Over(m)) => m.clone(),
            Some(Lag::Unknown) | None => "its lag is not measured".to_owned(),
        };
        if let Some(stalled) = f.primary_stalled_for.filter(|d| *d >= STALL) {
            return Decision::Stay {
                reason: REPLAY_STALLED,
                message: format!(
                    "{primary} answers again but its replay has applied nothing for {} s ({lag}): \
                     its Elasticsearch refuses the replicator's writes (a write block, the shard limit, \
                     a full disk; the replicator's log and ballast_replicator_apply_failures_total say which); \
                     {active} stays active",
                    stalled.as_secs()
                ),
            };
        }
        return Decision::Stay {
            reason: "Replaying",
            message: format!(
                "{primary} answers again and replays what it missed ({lag}); {active} stays active until it has been caught up for {} s",
                f.dwell.as_secs()
            ),
        };
    }
    let asked = f.named == Some(primary);
    if f.failback == Failback::Manual && !asked {
        return Decision::Stay {
            reason: "FailbackWaits",
            message: format!(
                "{primary} has caught up; spec.failback is Manual: annotate ballast.dev/promote={primary} to fail back"
            ),
        };
    }
    if !f.leading {
        return Decision::Stay {
            reason: "NotLeading",
            message: format!(
                "{primary} has caught up; this operator does not hold its Lease and fails back nothing"
            ),
        };
    }
    Decision::Promote {
        to: primary.to_owned(),
        reason: "FailedBack",
        message: format!(
            "{primary} answers and has caught up for {} s: failed back from {active}",
            f.dwell.as_secs()
        ),
    }
}

/// The data centre to promote in place of `down`: the one a person `named`
/// if it answers, else the first answering one in `order`; and whether it
/// was named. Pure.
pub fn candidate<'a>(
    order: &'a [String],
    down: &str,
    up: &BTreeMap<String, bool>,
    named: Option<&'a str>,
) -> Option<(&'a str, bool)> {
    let answers = |dc: &str| dc != down && up.get(dc).copied() == Some(true);
    match named.filter(|n| answers(n)) {
        Some(named) => Some((named, true)),
        None => order
            .iter()
            .map(String::as_str)
            .find(|dc| answers(dc))
            .map(|dc| (dc, false)),
    }
}

/// The active data centre is down: promote the named or first answering
/// standby, if allowed.
fn promote_from_down(f: &Facts<'_>) -> Decision {
    let active = f.active;
    let Some((to, named)) = candidate(f.order, active, f.up, f.named) else {
        return Decision::Wait {
            reason: "NoStandbyAnswers",
            message: format!("{active}'s Elasticsearch is down and no other data centre's answers"),
        };
    };
    if !f.leading {
        return Decision::Wait {
            reason: "NotLeading",
            message: format!(
                "{active}'s Elasticsearch is down; this operator does not hold its Lease and promotes nothing \
                 (the API server's quorum is the third vote)"
            ),
        };
    }
    if named {
        return Decision::Promote {
            to: to.to_owned(),
            reason: "PromotedByPerson",
            message: format!(
                "{active}'s Elasticsearch is down: {to} promoted as ballast.dev/promote asks, whatever it lacked"
            ),
        };
    }
    match f.lag.get(to) {
        Some(Lag::Within(n)) => Decision::Promote {
            to: to.to_owned(),
            reason: "Promoted",
            message: format!(
                "{active}'s Elasticsearch is down: {to} promoted (it lacked {n} change record(s))"
            ),
        },
        Some(Lag::Over(lacks)) => Decision::Wait {
            reason: "LagOverBudget",
            message: format!(
                "{active}'s Elasticsearch is down and {to} is not promoted: {lacks}, over spec.promotion's budget; \
                 it is promoted once it has \
                 caught up, or now with `kubectl annotate memberstore <name> ballast.dev/promote={to}`, losing them"
            ),
        },
        Some(Lag::Unknown) | None => Decision::Wait {
            reason: "LagUnknown",
            message: format!(
                "{active}'s Elasticsearch is down and {to}'s lag is not measured: it is not promoted until it is, \
                 or now with `kubectl annotate memberstore <name> ballast.dev/promote={to}`"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        what: &'static str,
        active: &'static str,
        up: &'static [(&'static str, bool)],
        lag: &'static [(&'static str, Lag)],
        leading: bool,
        named: Option<&'static str>,
        failback: Failback,
        caught_up_secs: Option<u64>,
        stalled_secs: Option<u64>,
        want: (&'static str, Option<&'static str>),
    }

    const fn case(what: &'static str, active: &'static str) -> Case {
        Case {
            what,
            active,
            up: &[],
            lag: &[],
            leading: true,
            named: None,
            failback: Failback::Automatic,
            caught_up_secs: None,
            stalled_secs: None,
            want: ("", None),
        }
    }

    #[test]
    fn the_active_data_centre_changes_only_when_it_is_safe_and_allowed() {
        let order = vec!["dc-a".to_owned(), "dc-b".to_owned(), "dc-c".to_owned()];
        let over = || Lag::Over("dc-b lacks 50".into());
        let cases = [
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                want: ("Answering", None),
                ..case("healthy primary", "dc-a")
            },
            Case {
                up: &[],
                want: ("Answering", None),
                ..case("nothing probed yet", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                lag: &[("dc-b", Lag::Within(3))],
                want: ("Promoted", Some("dc-b")),
                ..case("primary down, standby within budget", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                lag: &[("dc-b", Lag::Unknown)],
                want: ("LagUnknown", None),
                ..case("lag not measured", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                lag: &[("dc-b", Lag::Within(0))],
                leading: false,
                want: ("NotLeading", None),
                ..case("no Lease, no promotion", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", false)],
                want: ("NoStandbyAnswers", None),
                ..case("both down", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", false), ("dc-c", true)],
                lag: &[("dc-c", Lag::Within(0))],
                want: ("Promoted", Some("dc-c")),
                ..case("the first answering standby", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true), ("dc-c", true)],
                lag: &[("dc-b", Lag::Within(0)), ("dc-c", Lag::Unknown)],
                named: Some("dc-c"),
                want: ("PromotedByPerson", Some("dc-c")),
                ..case("a person names one", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                named: Some("dc-c"),
                lag: &[("dc-b", Lag::Within(0))],
                want: ("Promoted", Some("dc-b")),
                ..case("a named one that does not answer is ignored", "dc-a")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                named: Some("dc-b"),
                want: ("Answering", None),
                ..case("the annotation never moves a healthy active one", "dc-a")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(4))],
                caught_up_secs: None,
                want: ("Replaying", None),
                ..case("primary back, replaying", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(4))],
                stalled_secs: Some(29),
                want: ("Replaying", None),
                ..case("primary back, nothing applied for a while", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(4))],
                stalled_secs: Some(30),
                want: (REPLAY_STALLED, None),
                ..case("primary back, nothing applied for the stall limit", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(0))],
                caught_up_secs: Some(5),
                want: ("Replaying", None),
                ..case("caught up, dwelling", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(0))],
                caught_up_secs: Some(60),
                want: ("FailedBack", Some("dc-a")),
                ..case("dwell passed: automatic failback", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(0))],
                caught_up_secs: Some(60),
                failback: Failback::Manual,
                want: ("FailbackWaits", None),
                ..case("manual failback waits", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                lag: &[("dc-a", Lag::Within(0))],
                caught_up_secs: Some(60),
                failback: Failback::Manual,
                named: Some("dc-a"),
                want: ("FailedBack", Some("dc-a")),
                ..case("manual failback asked for", "dc-b")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                want: ("Promoted", None),
                ..case("primary still down after promotion", "dc-b")
            },
        ];
        for c in &cases {
            let up: BTreeMap<String, bool> = c.up.iter().map(|(d, u)| ((*d).to_owned(), *u)).collect();
            let lag: BTreeMap<String, Lag> =
                c.lag.iter().map(|(d, l)| ((*d).to_owned(), l.clone())).collect();
            let facts = Facts {
                order: &order,
                primary: "dc-a",
                active: c.active,
                up: &up,
                lag: &lag,
                leading: c.leading,
                named: c.named,
                failback: c.failback,
                primary_caught_up_for: c.caught_up_secs.map(Duration::from_secs),
                primary_stalled_for: c.stalled_secs.map(Duration::from_secs),
                dwell: Duration::from_secs(30),
            };
            let got = match decide(&facts) {
                Decision::Stay { reason, .. } | Decision::Wait { reason, .. } => (reason, None),
                Decision::Promote { to, reason, .. } => (reason, Some(to)),
            };
            assert_eq!((got.0, got.1.as_deref()), c.want, "{}", c.what);
        }
        // A standby over the budget is not promoted, and the message says how to force it.
        let up: BTreeMap<String, bool> = [("dc-a".to_owned(), false), ("dc-b".to_owned(), true)].into();
        let lag: BTreeMap<String, Lag> = [("dc-b".to_owned(), over())].into();
        let facts = Facts {
            order: &order,
            primary: "dc-a",
            active: "dc-a",
            up: &up,
            lag: &lag,
            leading: true,
            named: None,
            failback: Failback::Automatic,
            primary_caught_up_for: None,
            primary_stalled_for: None,
            dwell: Duration::from_secs(30),
        };
        let Decision::Wait { reason, message } = decide(&facts) else {
            panic!("promoted over the budget");
        };
        assert_eq!(reason, "LagOverBudget");
        assert!(
            message.contains("ballast.dev/promote=dc-b") && message.contains("lacks 50"),
            "{message}"
        );
        // A replay that applies nothing is a warning naming what to look at.
        let up: BTreeMap<String, bool> = [("dc-a".to_owned(), true), ("dc-b".to_owned(), true)].into();
        let lag: BTreeMap<String, Lag> = [("dc-a".to_owned(), Lag::Within(7))].into();
        let stalled = decide(&Facts {
            active: "dc-b",
            up: &up,
            lag: &lag,
            primary_stalled_for: Some(Duration::from_secs(45)),
            ..facts.clone()
        });
        let (reason, message) = stalled.warning().expect("a stalled replay warns");
        assert_eq!(reason, REPLAY_STALLED);
        assert!(
            message.contains("applied nothing for 45 s (it lacks 7 change record(s))")
                && message.contains("ballast_replicator_apply_failures_total"),
            "{message}"
        );
    }
}
