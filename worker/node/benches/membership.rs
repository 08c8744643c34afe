//! `make bench`: what following membership costs the API server. 200
//! pipelines, each with two slave Leases, each followed by one membership
//! follower (a pipeline runs about five: collector, intake, master and each
//! slave follow a role), for a 20 s window: the requests on Leases the real
//! API server dispatched (`apiserver_flowcontrol_dispatched_requests_total`, less
//! an idle window's), with today's watch-based
//! follower beside the baseline of one LIST per follower per second, as the
//! followers did before.

use std::time::Duration;

use ballast_e2e::Stack;
use ballast_node::membership::{self, Member};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

const PIPELINES: usize = 200;
const WINDOW: Duration = Duration::from_secs(20);
/// Followers per pipeline in a running pipeline (collector, intake, master, two slaves).
const FOLLOWERS_PER_PIPELINE: f64 = 5.0;

/// Requests the API server has dispatched so far, counted when each starts
/// (a watch is one long-running request: `apiserver_request_total` would count
/// it only when it ends), from every client.
async fn lease_requests(client: &kube::Client) -> anyhow::Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// Requests per second on Leases while `followers` run for [`WINDOW`] (after a settling second).
async fn rate(client: &kube::Client, run: impl FnOnce(CancellationToken)) -> anyhow::Result<f64> {
    let stop = CancellationToken::new();
    run(stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = lease_requests(client).await?;
    tokio::time::sleep(WINDOW).await;
    let after = lease_requests(client).await?;
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((after - before) / WINDOW.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "follow").await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let pipelines: Vec<String> = (0..PIPELINES).map(|i| format!("p{i}")).collect();
    for pipeline in &pipelines {
        for slave in 0..2 {
            let member = Member {
                namespace: ns.clone(),
                pipeline: pipeline.clone(),
                role: "slave".into(),
                identity: format!("{pipeline}-slave-{slave}"),
                address: format!("127.0.0.1:{}", 10_000 + slave),
                duration: Duration::from_secs(3600),
            };
            leases
                .patch(
                    &member.identity,
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(&member.lease(true, Timestamp::now())),
                )
                .await?;
        }
    }

    let idle = rate(&client, |_| {}).await?;
    let watched = rate(&client, |stop| {
        for pipeline in &pipelines {
            drop(membership::follow(
                client.clone(),
                &ns,
                pipeline,
                "slave",
                stop.clone(),
            ));
        }
    })
    .await?;
    let listed = rate(&client, |stop| {
        for pipeline in &pipelines {
            let api = leases.clone();
            let params = ListParams::default().labels(&membership::selector(pipeline, "slave"));
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let _ = api.list(&params).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    })
    .await?;
    let (watched, listed) = ((watched - idle).max(0.0), (listed - idle).max(0.0));
    println!(
        "membership: {PIPELINES} pipelines, one follower each, {}s window",
        WINDOW.as_secs()
    );
    println!("  idle API server (requests/s)              {idle:>10.1}");
    println!("  watch-based follower (requests/s)         {watched:>10.1}");
    println!("  baseline: LIST every second (requests/s)  {listed:>10.1}");
    println!(
        "  at {FOLLOWERS_PER_PIPELINE} followers per pipeline: {:.0} vs {:.0} requests/s",
        watched * FOLLOWERS_PER_PIPELINE,
        listed * FOLLOWERS_PER_PIPELINE
    );
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete(&ns, &Default::default())
        .await?;
    Ok(())
}
