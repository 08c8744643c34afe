//! Which data centre's MySQL is the master, decided from its probes and
//! each replica's measured lag: the promotion of a replica when the master
//! is down (within the lag budget, or the one a person names, or none: the
//! policy may leave it to a person), and the planned switch back to the
//! primary once it has been fenced, re-pointed and caught up for the dwell
//! (a change away from an answering master, which is fenced first). Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_crds::member_store::{Failback, MysqlPromotion, MysqlReplica};

use super::promotion::Decision;

/// What the decision is made from.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The data centres, in the spec's order.
    pub order: &'a [String],
    /// The primary data centre.
    pub primary: &'a str,
    /// The master, as published.
    pub master: &'a str,
    /// Whether each data centre's MySQL answers its probes (one not probed
    /// yet is not known to answer, and a master not known to be down).
    pub up: &'a BTreeMap<String, bool>,
    /// Each replica's replication as last measured while the master answered.
    pub replication: &'a [MysqlReplica],
    /// Transactions a promoted replica may lack.
    pub max_lag_transactions: i64,
    /// Seconds behind it may be.
    pub max_lag_seconds: i64,
    /// Whether a replica is promoted without a person.
    pub policy: MysqlPromotion,
    /// Whether the operator has an account to change the topology with.
    pub administered: bool,
    /// Whether this operator holds its Lease now.
    pub leading: bool,
    /// The data centre `ballast.dev/promote-mysql` names.
    pub named: Option<&'a str>,
    /// Whether the switch back is automatic.
    pub failback: Failback,
    /// How long the primary, while a replica, has lacked nothing of the master.
    pub primary_caught_up_for: Option<Duration>,
    /// How long it must have before the switch back.
    pub dwell: Duration,
}

/// Decides which data centre's MySQL is the master. Pure.
pub fn decide(f: &Facts<'_>) -> Decision {
    let master = f.master;
    if f.up.get(master).copied() == Some(false) {
        return promote_from_down(f);
    }
    if master == f.primary {
        return Decision::Stay {
            reason: "Answering",
            message: format!("{master}'s MySQL master answers"),
        };
    }
    let primary = f.primary;
    let stay = |reason, message| Decision::Stay { reason, message };
    if f.up.get(primary).copied() != Some(true) {
        return stay(
            "Promoted",
            format!("{master}'s MySQL is the master; the primary {primary}'s does not answer"),
        );
    }
    let caught_up = f.primary_caught_up_for.is_some_and(|d| d >= f.dwell);
    if !caught_up {
        let state = match f.replication.iter().find(|r| r.data_center == primary) {
            Some(r) if !r.replicating => "is not replicating from it yet".to_owned(),
            Some(r) => format!("lacks {} of its transactions", r.lag_transactions),
            None => "has not been measured".to_owned(),
        };
        return stay(
            "Replaying",
            format!(
                "{master}'s MySQL is the master; the primary {primary}'s answers and {state}: the switch back waits \
                 until it has lacked nothing for {} s",
                f.dwell.as_secs()
            ),
        );
    }
    if f.failback == Failback::Manual && f.named != Some(primary) {
        return stay(
            "FailbackWaits",
            format!(
                "{primary}'s MySQL has caught up; spec.failback is Manual: annotate ballast.dev/promote-mysql={primary} \
                 to switch back"
            ),
        );
    }
    if !f.administered || !f.leading {
        return stay(
            if f.leading { "NoAdminAccount" } else { "NotLeading" },
            format!("{primary}'s MySQL has caught up; this operator cannot switch back now"),
        );
    }
    Decision::Promote {
        to: primary.to_owned(),
        reason: "SwitchedBack",
        message: format!(
            "{primary}'s MySQL has caught up for {} s: switched back from {master}",
            f.dwell.as_secs()
        ),
    }
}

/// The master is down: promote the named or first answering replica, if allowed.
fn promote_from_down(f: &Facts<'_>) -> Decision {
    let master = f.master;
    let wait = |reason, message| Decision::Wait { reason, message };
    let Some((to, named)) = super::promotion::candidate(f.order, master, f.up, f.named) else {
        return wait(
            "NoReplicaAnswers",
            format!("{master}'s MySQL master is down and no other data centre's answers"),
        );
    };
    let hint = format!("`kubectl annotate memberstore <name> ballast.dev/promote-mysql={to}`");
    if !f.administered {
        return wait(
            "NoAdminAccount",
            format!(
                "{master}'s MySQL master is down; spec.mysqlAdmin is not set, so the operator changes no topology: \
                 promote {to} by hand"
            ),
        );
    }
    if !f.leading {
        return wait(
            "NotLeading",
            format!(
                "{master}'s MySQL master is down; this operator does not hold its Lease and promotes nothing \
                 (the API server's quorum is the third vote)"
            ),
        );
    }
    if named {
        return Decision::Promote {
            to: to.to_owned(),
            reason: "PromotedByPerson",
            message: format!(
                "{master}'s MySQL master is down: {to} promoted as ballast.dev/promote-mysql asks, whatever it lacked"
            ),
        };
    }
    if f.policy == MysqlPromotion::Manual {
        return wait(
            "PromotionManual",
            format!(
                "{master}'s MySQL master is down; spec.promotion.mysql is Manual: promote {to} with {hint}"
            ),
        );
    }
    match f.replication.iter().find(|r| r.data_center == to) {
        Some(r)
            if r.replicating
                && r.lag_transactions <= f.max_lag_transactions
                && r.lag_seconds.unwrap_or(0) <= f.max_lag_seconds =>
        {
            Decision::Promote {
                to: to.to_owned(),
                reason: "Promoted",
                message: format!(
                    "{master}'s MySQL master is down: {to} promoted (it lacked {} transaction(s) when last measured)",
                    r.lag_transactions
                ),
            }
        }
        Some(r) if !r.replicating => wait(
            "ReplicaNotReplicating",
            format!(
                "{master}'s MySQL master is down and {to} was not replicating from it when last measured: \
                 it is not promoted; promote it anyway with {hint}"
            ),
        ),
        Some(r) => wait(
            "LagOverBudget",
            format!(
                "{master}'s MySQL master is down and {to} is not promoted: it lacked {} transaction(s) ({} s behind), \
                 over spec.promotion's budget; promote it anyway, losing them, with {hint}",
                r.lag_transactions,
                r.lag_seconds.map_or_else(|| "?".to_owned(), |s| s.to_string())
            ),
        ),
        None => wait(
            "LagUnknown",
            format!(
                "{master}'s MySQL master is down and {to}'s lag was never measured: it is not promoted; promote it \
                 with {hint}"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(dc: &str, replicating: bool, lag: i64, secs: Option<i64>) -> MysqlReplica {
        MysqlReplica {
            data_center: dc.to_owned(),
            replicating,
            lag_transactions: lag,
            lag_seconds: secs,
            measured_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    struct Case {
        what: &'static str,
        master: &'static str,
        up: &'static [(&'static str, bool)],
        replication: Vec<MysqlReplica>,
        policy: MysqlPromotion,
        administered: bool,
        leading: bool,
        named: Option<&'static str>,
        failback: Failback,
        caught_up_secs: Option<u64>,
        want: (&'static str, Option<&'static str>),
    }

    fn case(what: &'static str, master: &'static str) -> Case {
        Case {
            what,
            master,
            up: &[],
            replication: vec![],
            policy: MysqlPromotion::Automatic,
            administered: true,
            leading: true,
            named: None,
            failback: Failback::Automatic,
            caught_up_secs: None,
            want: ("", None),
        }
    }

    #[test]
    fn the_mysql_master_changes_only_when_it_is_safe_and_allowed() {
        let order = vec!["dc-a".to_owned(), "dc-b".to_owned(), "dc-c".to_owned()];
        let down = &[("dc-a", false), ("dc-b", true)];
        let in_sync = || vec![replica("dc-b", true, 0, Some(0))];
        let cases = [
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                want: ("Answering", None),
                ..case("healthy master", "dc-a")
            },
            Case {
                want: ("Answering", None),
                ..case("nothing probed yet", "dc-a")
            },
            Case {
                up: down,
                replication: in_sync(),
                want: ("Promoted", Some("dc-b")),
                ..case("master down, replica in sync", "dc-a")
            },
            Case {
                up: down,
                replication: vec![replica("dc-b", true, 3, Some(1))],
                want: ("Promoted", Some("dc-b")),
                ..case("master down, replica within budget", "dc-a")
            },
            Case {
                up: down,
                replication: vec![replica("dc-b", true, 11, Some(0))],
                want: ("LagOverBudget", None),
                ..case("too many transactions behind", "dc-a")
            },
            Case {
                up: down,
                replication: vec![replica("dc-b", true, 0, Some(31))],
                want: ("LagOverBudget", None),
                ..case("too many seconds behind", "dc-a")
            },
            Case {
                up: down,
                replication: vec![replica("dc-b", false, 0, None)],
                want: ("ReplicaNotReplicating", None),
                ..case("a broken replica", "dc-a")
            },
            Case {
                up: down,
                want: ("LagUnknown", None),
                ..case("never measured", "dc-a")
            },
            Case {
                up: down,
                replication: vec![replica("dc-b", true, 500, None)],
                named: Some("dc-b"),
                want: ("PromotedByPerson", Some("dc-b")),
                ..case("a person forces it", "dc-a")
            },
            Case {
                up: down,
                replication: in_sync(),
                policy: MysqlPromotion::Manual,
                want: ("PromotionManual", None),
                ..case("the policy leaves it to a person", "dc-a")
            },
            Case {
                up: down,
                replication: in_sync(),
                policy: MysqlPromotion::Manual,
                named: Some("dc-b"),
                want: ("PromotedByPerson", Some("dc-b")),
                ..case("the person it is left to", "dc-a")
            },
            Case {
                up: down,
                replication: in_sync(),
                administered: false,
                want: ("NoAdminAccount", None),
                ..case("no account to promote with", "dc-a")
            },
            Case {
                up: down,
                replication: in_sync(),
                leading: false,
                want: ("NotLeading", None),
                ..case("no Lease, no promotion", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", false)],
                want: ("NoReplicaAnswers", None),
                ..case("both down", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", false), ("dc-c", true)],
                replication: vec![replica("dc-c", true, 0, Some(0))],
                want: ("Promoted", Some("dc-c")),
                ..case("the first answering replica", "dc-a")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                named: Some("dc-b"),
                want: ("Answering", None),
                ..case("the annotation never moves an answering master", "dc-a")
            },
            Case {
                up: &[("dc-a", false), ("dc-b", true)],
                want: ("Promoted", None),
                ..case("the old master still down", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                replication: vec![replica("dc-a", false, 0, None)],
                want: ("Replaying", None),
                ..case("the old master back, not re-pointed yet", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                replication: vec![replica("dc-a", true, 0, Some(0))],
                caught_up_secs: Some(5),
                want: ("Replaying", None),
                ..case("caught up, dwelling", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                replication: vec![replica("dc-a", true, 0, Some(0))],
                caught_up_secs: Some(30),
                want: ("SwitchedBack", Some("dc-a")),
                ..case("the dwell passed: switched back", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                caught_up_secs: Some(30),
                failback: Failback::Manual,
                want: ("FailbackWaits", None),
                ..case("a manual switch back waits", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                caught_up_secs: Some(30),
                failback: Failback::Manual,
                named: Some("dc-a"),
                want: ("SwitchedBack", Some("dc-a")),
                ..case("the switch back a person asks for", "dc-b")
            },
            Case {
                up: &[("dc-a", true), ("dc-b", true)],
                caught_up_secs: Some(30),
                leading: false,
                want: ("NotLeading", None),
                ..case("no Lease, no switch back", "dc-b")
            },
        ];
        for c in &cases {
            let up: BTreeMap<String, bool> = c.up.iter().map(|(d, u)| ((*d).to_owned(), *u)).collect();
            let facts = Facts {
                order: &order,
                primary: "dc-a",
                master: c.master,
                up: &up,
                replication: &c.replication,
                max_lag_transactions: 10,
                max_lag_seconds: 30,
                policy: c.policy,
                administered: c.administered,
                leading: c.leading,
                named: c.named,
                failback: c.failback,
                primary_caught_up_for: c.caught_up_secs.map(Duration::from_secs),
                dwell: Duration::from_secs(30),
            };
            let got = match decide(&facts) {
                Decision::Stay { reason, .. } | Decision::Wait { reason, .. } => (reason, None),
                Decision::Promote { to, reason, .. } => (reason, Some(to)),
            };
            assert_eq!((got.0, got.1.as_deref()), c.want, "{}", c.what);
        }
    }
}
