//! The MemberStore's status from what a reconcile measured: each kept
//! cluster's replication, each standby's lag as the promotion weighs it, and
//! whether every standby data centre is within the promotion's lag budget
//! (`StandbyInSync`), which a promotion to it must be. Pure.

use std::collections::BTreeMap;

use ballast_crds::conditions::{self, Desired};
use ballast_crds::member_store::{KeptCluster, MARKETING, Promotion, Replica};
use ballast_crds::{MemberStore, MemberStoreStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::lag::Measured;
use super::promotion::Lag;

/// A kept cluster's measurement, or why there is none.
pub type Measurement = (KeptCluster, Result<Measured, String>);

/// The replication of a cluster as measured at `now`. Pure.
pub fn replica(cluster: &str, measured: &Measured, now: Timestamp) -> Replica {
    let age_ms = measured
        .oldest_missing_ms
        .map_or(0, |ms| (now.as_millisecond() - ms).max(0));
    Replica {
        cluster: cluster.to_owned(),
        applied: measured.applied,
        lag_events: (measured.end - measured.applied).max(0),
        // Milliseconds to seconds: exact for any lag this side of 2^53 ms.
        #[allow(clippy::cast_precision_loss)]
        lag_seconds: age_ms as f64 / 1000.0,
        measured_at: Time(now),
    }
}

/// How old the oldest record a cluster lacks may be for it to count as
/// caught up: under a steady stream of writes a kept cluster always lacks
/// the few records in flight, so "lacks none" would never hold for long.
/// What it lacks at a failback is still applied to it afterwards (the
/// replicator follows the active cluster for older epochs' records).
pub const CAUGHT_UP_SECONDS: f64 = 1.0;

/// Whether `replica` has caught up: it lacks nothing, or only records
/// younger than [`CAUGHT_UP_SECONDS`]. Pure.
pub fn caught_up(replica: &Replica) -> bool {
    replica.lag_events == 0 || replica.lag_seconds <= CAUGHT_UP_SECONDS
}

/// Whether `replica` lacks more than `budget` allows, by count or by age. Pure.
pub fn over_budget(replica: &Replica, budget: &Promotion) -> bool {
    replica.lag_events > budget.max_lag_events || replica.lag_seconds > f64::from(budget.max_lag_seconds)
}

/// The replication to publish: each measured cluster's, and for a cluster
/// that could not be measured its last entry, with its time. Pure.
pub fn replication(store: &MemberStore, measured: &[Measurement], now: Timestamp) -> Vec<Replica> {
    let previous = store
        .status
        .as_ref()
        .map(|s| s.replication.as_slice())
        .unwrap_or_default();
    measured
        .iter()
        .filter_map(|(cluster, m)| match m {
            Ok(m) => Some(replica(&cluster.name, m, now)),
            Err(_) => previous.iter().find(|r| r.cluster == cluster.name).cloned(),
        })
        .collect()
}

/// Each standby data centre's lag as the promotion weighs it (the marketing
/// cluster is never promoted). Pure.
pub fn verdicts(
    store: &MemberStore,
    measured: &[Measurement],
    replication: &[Replica],
) -> BTreeMap<String, Lag> {
    let budget = &store.spec.promotion;
    measured
        .iter()
        .filter(|(cluster, _)| cluster.name != MARKETING)
        .map(|(cluster, m)| {
            let replica = replication.iter().find(|r| r.cluster == cluster.name);
            let lag = match (m, replica) {
                (Ok(_), Some(r)) if over_budget(r, budget) => Lag::Over(format!(
                    "{} lacks {} change record(s), the oldest {:.1} s old",
                    r.cluster, r.lag_events, r.lag_seconds
                )),
                (Ok(_), Some(r)) => Lag::Within(r.lag_events),
                _ => Lag::Unknown,
            };
            (cluster.name.clone(), lag)
        })
        .collect()
}

/// Whether every standby data centre is within `store`'s budget, from its
/// measurements (what failed, and why) and their `verdicts`. Pure.
pub fn in_sync(store: &MemberStore, measured: &[Measurement], verdicts: &BTreeMap<String, Lag>) -> Desired {
    let budget = &store.spec.promotion;
    let unknown: Vec<String> = measured
        .iter()
        .filter(|(c, _)| c.name != MARKETING)
        .filter_map(|(c, m)| m.as_ref().err().map(|e| format!("{} ({e})", c.name)))
        .collect();
    if !unknown.is_empty() {
        return Desired::fails(
            conditions::STANDBY_IN_SYNC,
            "LagUnknown",
            format!(
                "the replication lag of {} could not be measured from Kafka: a promotion would wait until it is",
                unknown.join(", ")
            ),
        );
    }
    let over: Vec<&str> = verdicts
        .values()
        .filter_map(|lag| match lag {
            Lag::Over(lacks) => Some(lacks.as_str()),
            Lag::Within(_) | Lag::Unknown => None,
        })
        .collect();
    if over.is_empty() {
        Desired::holds(
            conditions::STANDBY_IN_SYNC,
            "WithinBudget",
            format!(
                "every standby lacks at most {} change record(s) and {} s of the stream",
                budget.max_lag_events, budget.max_lag_seconds
            ),
        )
    } else {
        Desired::fails(
            conditions::STANDBY_IN_SYNC,
            "LagOverBudget",
            format!(
                "{}; over the budget of {} record(s) and {} s (spec.promotion): a promotion to it now would lose them, \
                 so it would wait; check that the replicator runs and its clusters answer",
                over.join("; "),
                budget.max_lag_events,
                budget.max_lag_seconds
            ),
        )
    }
}

/// The status to publish: `replication`, the `desired` conditions, the
/// generation; everything else as it was. Pure.
pub fn compute(
    store: &MemberStore,
    replication: Vec<Replica>,
    desired: &[Desired],
    now: Timestamp,
) -> MemberStoreStatus {
    let previous = store.status.clone().unwrap_or_default();
    MemberStoreStatus {
        observed_generation: store.metadata.generation,
        conditions: conditions::compute(
            &previous.conditions,
            desired,
            store.metadata.generation,
            &Time(now),
        ),
        replication,
        ..previous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemberStore {
        let mut store: MemberStore =
            serde_yaml::from_str(include_str!("../../../manifests/samples/memberstore.yaml"))
                .unwrap_or_else(|e| panic!("sample MemberStore: {e}"));
        store.spec.promotion.max_lag_events = 10;
        store.spec.promotion.max_lag_seconds = 30;
        store
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The status a reconcile would publish from `measured` (the standby condition only).
    fn status_of(s: &MemberStore, measured: &[Measurement], now: Timestamp) -> MemberStoreStatus {
        let replication = replication(s, measured, now);
        let condition = in_sync(s, measured, &verdicts(s, measured, &replication));
        compute(s, replication, &[condition], now)
    }

    fn measured(applied: i64, end: i64, oldest_missing_ms: Option<i64>) -> Result<Measured, String> {
        Ok(Measured {
            applied,
            end,
            oldest_missing_ms,
        })
    }

    #[test]
    fn a_replica_counts_what_its_cluster_lacks_and_how_old_the_oldest_is() {
        // (applied, end, oldest missing at, now) → (lag events, lag seconds)
        let cases = [
            ((50, 50, None, 90_000), (0, 0.0)),
            ((40, 50, Some(80_000), 90_000), (10, 10.0)),
            // A producer clock ahead of the operator's is no negative age.
            ((40, 50, Some(95_000), 90_000), (10, 0.0)),
            // Kafka said nothing of the record: the count stands alone.
            ((40, 50, None, 90_000), (10, 0.0)),
        ];
        for ((applied, end, oldest, now), want) in cases {
            let m = Measured {
                applied,
                end,
                oldest_missing_ms: oldest,
            };
            let r = replica("dc-b", &m, at(now));
            assert_eq!((r.lag_events, r.lag_seconds), want, "{m:?}");
        }
    }

    #[test]
    fn a_replica_has_caught_up_when_it_lacks_nothing_or_only_what_is_in_flight() {
        // (lag events, lag seconds) → caught up
        let cases = [
            ((0, 0.0), true),
            ((6, 0.3), true),
            ((6, 1.0), true),
            ((6, 1.5), false),
            ((1, 40.0), false),
        ];
        for ((events, seconds), want) in cases {
            let r = Replica {
                cluster: "dc-a".into(),
                applied: 10,
                lag_events: events,
                lag_seconds: seconds,
                measured_at: Time(at(0)),
            };
            assert_eq!(caught_up(&r), want, "{events} records, {seconds} s");
        }
    }

    #[test]
    fn a_standby_is_in_sync_only_within_both_budgets_and_marketing_never_counts() {
        let s = store();
        let dc_b = s
            .kept_clusters()
            .into_iter()
            .find(|c| c.name != MARKETING)
            .unwrap_or_else(|| panic!("a standby"));
        let marketing = KeptCluster {
            name: MARKETING.into(),
            url: "http://m".into(),
        };
        let now = 100_000;
        // (the standby's measurement, marketing's) → (status, reason)
        let cases = [
            (
                (measured(5, 5, None), measured(5, 5, None)),
                (true, "WithinBudget"),
            ),
            (
                (measured(0, 10, Some(now - 5_000)), measured(5, 5, None)),
                (true, "WithinBudget"),
            ),
            (
                (measured(0, 11, Some(now - 5_000)), measured(5, 5, None)),
                (false, "LagOverBudget"),
            ),
            (
                (measured(9, 10, Some(now - 31_000)), measured(5, 5, None)),
                (false, "LagOverBudget"),
            ),
            (
                (measured(5, 5, None), measured(0, 500, Some(0))),
                (true, "WithinBudget"),
            ),
            (
                (Err("timed out".to_owned()), measured(5, 5, None)),
                (false, "LagUnknown"),
            ),
            (
                (measured(5, 5, None), Err("timed out".to_owned())),
                (true, "WithinBudget"),
            ),
        ];
        for ((standby, market), (holds, reason)) in cases {
            let measured = [(dc_b.clone(), standby), (marketing.clone(), market)];
            let status = status_of(&s, &measured, at(now));
            let c = &status.conditions[0];
            assert_eq!(
                (c.status == "True", c.reason.as_str()),
                (holds, reason),
                "{measured:?}: {}",
                c.message
            );
        }
    }

    #[test]
    fn an_unmeasured_cluster_keeps_its_last_replication_and_the_rest_stays() {
        let mut s = store();
        let dc_b = s.kept_clusters().into_iter().find(|c| c.name != MARKETING);
        let dc_b = dc_b.unwrap_or_else(|| panic!("a standby"));
        let first = status_of(&s, &[(dc_b.clone(), measured(3, 7, Some(1_000)))], at(2_000));
        s.status = Some(MemberStoreStatus {
            epoch: 4,
            ..first.clone()
        });
        let second = status_of(&s, &[(dc_b, Err("down".into()))], at(9_000));
        assert_eq!(second.replication, first.replication);
        assert_eq!(second.epoch, 4, "what the reconcile does not decide stays");
        assert_eq!(second.conditions[0].reason, "LagUnknown");
    }
}
