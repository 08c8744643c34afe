//! Membership: every worker keeps a Lease of its own — identity, role, address,
//! readiness — as its heartbeat and its entry in the membership that the master,
//! the intake and the operator read.
//!
//! An unreachable API server does not stop the worker: renewals are retried
//! and the data plane carries on. Followers watch the Leases and judge each by
//! how long it has gone unchanged on their own monotonic clock.

mod follow;

pub use follow::{Roster, follow};

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_crds::ShedDay;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Label naming the pipeline a worker belongs to.
pub const PIPELINE_LABEL: &str = "ballast.dev/pipeline";
/// Label naming a worker's role.
pub const ROLE_LABEL: &str = "ballast.dev/role";
/// Annotation with the address peers reach the worker at.
pub const ADDRESS_ANNOTATION: &str = "ballast.dev/address";
/// Annotation saying whether the worker is ready to receive data.
pub const READY_ANNOTATION: &str = "ballast.dev/ready";
/// Annotation of a backup intake: merchants it shed in the last second.
pub const SHED_MERCHANTS_ANNOTATION: &str = "ballast.dev/shed-merchants";
/// Annotation of a backup intake: its shed level, in basis points.
pub const SHED_LEVEL_ANNOTATION: &str = "ballast.dev/shed-level";
/// Annotation of a backup intake: the last day it shed and its highest level
/// that day, as `YYYY-MM-DD=level`.
pub const SHED_DAY_ANNOTATION: &str = "ballast.dev/shed-day";

/// Shedding reported by a pipeline's backup intakes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shedding {
    /// Merchants shed in the last second, summed over the intakes.
    pub merchants: i64,
    /// The highest shed level now, in basis points.
    pub level: i32,
    /// The latest day any intake shed, with the highest level of that day.
    pub day: Option<ShedDay>,
}

/// `YYYY-MM-DD=level`, as an intake reports its shed day. Pure.
pub fn shed_day_annotation(day: &ShedDay) -> String {
    format!("{}={}", day.day, day.max_level)
}

fn parse_shed_day(value: &str) -> Option<ShedDay> {
    let (day, level) = value.split_once('=')?;
    Some(ShedDay {
        day: day.to_owned(),
        max_level: level.parse().ok()?,
    })
}

/// Shedding reported by a pipeline's backup intakes, from their Leases. Pure.
pub fn shedding(leases: &[Lease]) -> Shedding {
    let annotation = |lease: &Lease, key: &str| -> Option<String> {
        lease.metadata.annotations.as_ref()?.get(key).cloned()
    };
    let value = |lease: &Lease, key: &str| -> i64 {
        annotation(lease, key).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let merchants = leases.iter().map(|l| value(l, SHED_MERCHANTS_ANNOTATION)).sum();
    let level = leases
        .iter()
        .map(|l| value(l, SHED_LEVEL_ANNOTATION))
        .max()
        .unwrap_or(0);
    let day = leases
        .iter()
        .filter_map(|l| annotation(l, SHED_DAY_ANNOTATION).and_then(|v| parse_shed_day(&v)))
        .fold(None, |merged, day| ShedDay::merge(merged, Some(day)));
    Shedding {
        merchants,
        level: i32::try_from(level).unwrap_or(i32::MAX),
        day,
    }
}

/// Publishes shedding figures on the member's Lease, under a field manager of
/// their own so that the heartbeat's apply leaves them in place.
pub async fn report_shedding(
    client: &kube::Client,
    member: &Member,
    merchants: u64,
    level: u32,
    day: Option<&ShedDay>,
) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &member.namespace);
    let mut annotations = serde_json::Map::new();
    annotations.insert(SHED_MERCHANTS_ANNOTATION.into(), merchants.to_string().into());
    annotations.insert(SHED_LEVEL_ANNOTATION.into(), level.to_string().into());
    if let Some(day) = day {
        annotations.insert(SHED_DAY_ANNOTATION.into(), shed_day_annotation(day).into());
    }
    let patch = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": member.identity, "annotations": annotations},
    });
    leases
        .patch(
            &member.identity,
            &PatchParams::apply("ballast-worker-shedding").force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Who a worker is, for its Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Namespace of the pipeline (and of the Lease).
    pub namespace: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Role name, e.g. `slave`.
    pub role: String,
    /// Pod name: the Lease's name and holder.
    pub identity: String,
    /// `host:port` peers reach it at.
    pub address: String,
    /// How long the Lease stays live without renewal.
    pub duration: Duration,
}

impl Member {
    /// The Lease object for this member at `now`. Pure.
    pub fn lease(&self, ready: bool, now: Timestamp) -> serde_json::Value {
        let labels: BTreeMap<&str, &str> = [
            (PIPELINE_LABEL, self.pipeline.as_str()),
            (ROLE_LABEL, self.role.as_str()),
        ]
        .into();
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.identity,
                "labels": labels,
                "annotations": {ADDRESS_ANNOTATION: self.address, READY_ANNOTATION: ready.to_string()},
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration.as_secs().max(1),
                "renewTime": MicroTime(now),
            },
        })
    }
}

/// The live, ready members of one role: identity → address.
pub type Members = BTreeMap<String, String>;

/// The label selector of a pipeline's members of one role.
pub fn selector(pipeline: &str, role: &str) -> String {
    format!("{PIPELINE_LABEL}={pipeline},{ROLE_LABEL}={role}")
}

/// The ready members among `leases` at `now` by the *writers'* clocks:
/// identity → address. For one-off readers on the writers' machine (tests,
/// benches); whatever follows membership over time judges liveness by its own
/// monotonic clock with a [`Roster`]. Pure.
pub fn ready_members(leases: &[Lease], now: Timestamp) -> Members {
    leases
        .iter()
        .filter_map(|lease| {
            let spec = lease.spec.as_ref()?;
            let renewed = spec.renew_time.as_ref()?;
            let live = now.duration_since(renewed.0).as_secs_f64() < f64::from(spec.lease_duration_seconds?);
            let annotations = lease.metadata.annotations.as_ref()?;
            let ready = annotations.get(READY_ANNOTATION).is_some_and(|v| v == "true");
            let address = annotations.get(ADDRESS_ANNOTATION)?.clone();
            let identity = spec.holder_identity.clone()?;
            (live && ready).then_some((identity, address))
        })
        .collect()
}

/// Keeps the member's Lease renewed (and its readiness current) until
/// `shutdown`, then deletes it so that peers see the member leave at once.
pub async fn run(
    client: kube::Client,
    member: Member,
    mut ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client, &member.namespace);
    let params = PatchParams::apply("ballast-worker").force();
    let period = member.duration / 3;
    loop {
        let lease = member.lease(*ready.borrow_and_update(), Timestamp::now());
        if let Err(error) = leases
            .patch(&member.identity, &params, &Patch::Apply(&lease))
            .await
        {
            tracing::warn!(%error, lease = %member.identity, "renewing membership lease failed; retrying");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(period) => {}
            // A readiness change is published at once, not at the next renewal.
            changed = ready.changed() => if changed.is_err() { break },
        }
    }
    if let Err(error) = leases.delete(&member.identity, &DeleteParams::default()).await {
        tracing::warn!(%error, lease = %member.identity, "deleting membership lease failed; it will lapse");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_at(member: &Member, ready: bool, renewed: i64) -> Lease {
        serde_json::from_value(member.lease(ready, Timestamp::from_second(renewed).expect("valid")))
            .expect("lease")
    }

    #[test]
    fn shedding_sums_merchants_and_takes_the_highest_level() {
        let lease = |merchants: &str, level: &str| -> Lease {
            serde_json::from_value(json!({"metadata": {"annotations": {
                SHED_MERCHANTS_ANNOTATION: merchants, SHED_LEVEL_ANNOTATION: level}}}))
            .expect("lease")
        };
        let none: Lease = serde_json::from_value(json!({"metadata": {}})).expect("lease");
        let with_day = |day: &str| -> Lease {
            serde_json::from_value(json!({"metadata": {"annotations": {SHED_DAY_ANNOTATION: day}}}))
                .expect("lease")
        };
        let reported = shedding(&[
            lease("12", "400"),
            lease("30", "900"),
            none,
            with_day("2026-11-20=9000"),
            with_day("2026-11-21=300"),
            with_day("2026-11-21=700"),
            with_day("garbage"),
        ]);
        assert_eq!((reported.merchants, reported.level), (42, 900));
        assert_eq!(
            reported.day,
            Some(ShedDay {
                day: "2026-11-21".into(),
                max_level: 700
            }),
            "the latest day, at its highest level"
        );
        assert_eq!(shedding(&[]), Shedding::default());
    }

    /// Slave `i` of pipeline `orders`, with a 15 s Lease.
    pub(super) fn member(i: usize) -> Member {
        Member {
            namespace: "shop".into(),
            pipeline: "orders".into(),
            role: "slave".into(),
            identity: format!("orders-slave-{i}"),
            address: format!("10.0.0.{i}:7071"),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn ready_members_are_live_and_ready() {
        let leases = [
            lease_at(&member(0), true, 95),
            lease_at(&member(1), false, 95),
            lease_at(&member(2), true, 80),
        ];
        let ready = ready_members(&leases, Timestamp::from_second(100).expect("valid"));
        assert_eq!(
            ready.into_iter().collect::<Vec<_>>(),
            [("orders-slave-0".to_owned(), "10.0.0.0:7071".to_owned())]
        );
    }

    #[test]
    fn lease_carries_identity_role_address_and_readiness() {
        let member = Member {
            namespace: "shop".into(),
            pipeline: "orders".into(),
            role: "slave".into(),
            identity: "orders-slave-3".into(),
            address: "10.0.0.7:7071".into(),
            duration: Duration::from_secs(15),
        };
        let lease = member.lease(true, Timestamp::from_second(100).expect("valid"));
        assert_eq!(lease["metadata"]["labels"][ROLE_LABEL], "slave");
        assert_eq!(lease["metadata"]["labels"][PIPELINE_LABEL], "orders");
        assert_eq!(lease["metadata"]["annotations"][READY_ANNOTATION], "true");
        assert_eq!(
            lease["metadata"]["annotations"][ADDRESS_ANNOTATION],
            "10.0.0.7:7071"
        );
        assert_eq!(lease["spec"]["holderIdentity"], "orders-slave-3");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    }
}
