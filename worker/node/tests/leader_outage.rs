//! Leader election while the stack's real API server hangs, then is down: the
//! holder stops acting at its own deadline although its renewal never returns,
//! and a standby neither exits nor gives up, and takes over once the API
//! server is back. One test in its own binary: it freezes the API server
//! every other test needs.

use std::time::Duration;

use ballast_e2e::scenario::{RestoreStack, eventually};
use ballast_e2e::{Stack, stack_script};
use ballast_node::leader::Election;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(3);

fn election(ns: &str, identity: &str) -> Election {
    Election {
        namespace: ns.to_owned(),
        name: "leader".into(),
        identity: identity.into(),
        duration: LEASE,
        labels: Default::default(),
        owner: None,
    }
}

#[tokio::test]
async fn a_holder_stops_at_its_deadline_on_a_hung_api_server_and_a_standby_outlives_the_outage()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "outage").await?;
    let _restore = RestoreStack;
    let shutdown = CancellationToken::new();
    let holder = election(&ns, "holder");
    let held = holder
        .acquire(&client, &shutdown)
        .await
        .ok_or_else(|| anyhow::anyhow!("no lease"))?;
    let lost = CancellationToken::new();
    let holding = tokio::spawn(holder.hold(client.clone(), held, shutdown.clone(), lost.clone()));
    let standby = tokio::spawn({
        let (client, shutdown, ns) = (client.clone(), shutdown.clone(), ns.clone());
        async move { election(&ns, "standby").acquire(&client, &shutdown).await }
    });
    // Renewals go through: the record changes.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let renewed =
        || async { Ok::<_, kube::Error>(leases.get("leader").await?.spec.and_then(|s| s.renew_time)) };
    let first = renewed().await?;
    eventually("a renewal", 10, || async {
        Ok::<_, kube::Error>((renewed().await? != first).then_some(()))
    })
    .await?;
    assert!(
        !lost.is_cancelled(),
        "lost the lease while the API server answered"
    );

    // Frozen: requests are accepted and never answered.
    stack_script(&["pause", "kube-apiserver"])?;
    let frozen = Instant::now();
    // The last renewal was sent before the freeze: the holder must stop
    // within one duration of it, not when its hung request gives up.
    let stopped = tokio::time::timeout(LEASE + Duration::from_millis(500), lost.cancelled()).await;
    let after = frozen.elapsed();
    stack_script(&["resume", "kube-apiserver"])?;
    assert!(
        stopped.is_ok(),
        "still acting {after:?} after the API server froze"
    );
    holding.await?;

    // Down (connections refused while it restarts): the standby keeps trying
    // instead of exiting, and takes the Lease the holder no longer renews.
    stack_script(&["stop", "kube-apiserver"])?;
    stack_script(&["up"])?;
    let taken = tokio::time::timeout(Duration::from_secs(60), standby).await??;
    let taken = taken.ok_or_else(|| anyhow::anyhow!("the standby stopped without the lease"))?;
    assert_eq!(taken.term, 1, "the standby's term follows the holder's");
    Ok(())
}
