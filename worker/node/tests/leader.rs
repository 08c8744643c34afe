//! Leader election against the stack's real API server: a writer whose clock
//! is skewed does not lose its Lease while it renews, a lapsed one is taken
//! after its duration as seen locally, the term comes from the write, and a
//! Lease its holder gives up is taken at once.

use std::time::Duration;

use ballast_e2e::Stack;
use ballast_node::leader::Election;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn election(ns: &str, identity: &str) -> Election {
    Election {
        namespace: ns.to_owned(),
        name: "leader".into(),
        identity: identity.into(),
        duration: Duration::from_secs(3),
        labels: Default::default(),
        owner: None,
    }
}

/// Renews the Lease as `holder` every 500 ms, stamping renewTime an hour in
/// the past, as a writer whose clock is an hour slow does.
async fn skewed_holder(leases: Api<Lease>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    while !stop.is_cancelled() {
        interval.tick().await;
        let slow = Timestamp::now() - SignedDuration::from_hours(1);
        let patch = json!({"spec": {"holderIdentity": "skewed", "leaseDurationSeconds": 3,
                                    "renewTime": MicroTime(slow), "leaseTransitions": 4}});
        leases
            .patch("leader", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_renewing_holder_keeps_its_lease_whatever_its_clock_says_and_loses_it_once_it_stops()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "leader").await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first = election(&ns, "first")
        .acquire(&client, &CancellationToken::new())
        .await
        .ok_or_else(|| anyhow::anyhow!("no lease"))?;
    assert_eq!(first.term, 0, "a new Lease starts at term 0");

    let stop = CancellationToken::new();
    let holder = tokio::spawn(skewed_holder(leases.clone(), stop.clone()));
    // Three durations of a renewing holder whose renewTime is an hour old:
    // judged by the writer's clock it would be taken at once.
    let contender = election(&ns, "contender");
    let shutdown = CancellationToken::new();
    let taken = tokio::time::timeout(Duration::from_secs(9), contender.acquire(&client, &shutdown)).await;
    assert!(taken.is_err(), "took a Lease its holder kept renewing: {taken:?}");

    // The holder stops: the record stops changing, and after one duration it is taken.
    stop.cancel();
    holder.await??;
    let held = tokio::time::timeout(Duration::from_secs(10), contender.acquire(&client, &shutdown))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no lease"))?;
    // The term is what the taking write stored: one more than the holder's.
    assert_eq!(held.term, 5);
    let stored = leases.get("leader").await?.spec.and_then(|s| s.lease_transitions);
    assert_eq!(stored, Some(5));
    Ok(())
}

#[tokio::test]
async fn a_holder_that_gives_its_lease_up_lets_a_waiting_standby_take_it_before_the_duration()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "release").await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    // A duration far longer than the wait below: only a release explains a take in time.
    let long = |identity: &str| Election {
        duration: Duration::from_secs(40),
        ..election(&ns, identity)
    };
    let holder = long("holder");
    holder
        .acquire(&client, &CancellationToken::new())
        .await
        .ok_or_else(|| anyhow::anyhow!("no lease"))?;
    let shutdown = CancellationToken::new();
    let standby = tokio::spawn({
        let (client, standby) = (client.clone(), long("standby"));
        let shutdown = shutdown.clone();
        async move { standby.acquire(&client, &shutdown).await }
    });

    // Only the holder may give it up.
    assert!(
        !long("standby").release(&client).await?,
        "a standby gave up the holder's Lease"
    );
    let holder_now = leases.get("leader").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder_now.as_deref(), Some("holder"));
    assert!(
        holder.release(&client).await?,
        "the holder did not give its Lease up"
    );

    let taken = tokio::time::timeout(Duration::from_secs(20), standby).await;
    shutdown.cancel();
    let held = taken??.ok_or_else(|| anyhow::anyhow!("the standby stopped without the lease"))?;
    assert_eq!(held.term, 1, "the term goes on: one more than the holder's");
    let holder_now = leases.get("leader").await?.spec.and_then(|s| s.holder_identity);
    assert_eq!(holder_now.as_deref(), Some("standby"));
    // Released again by a replica that no longer holds it: nothing happens.
    assert!(!holder.release(&client).await?);
    Ok(())
}
