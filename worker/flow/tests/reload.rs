//! Rules from a real `MemberStore` on the real API server: the flow follows
//! the object, reloads when its flow control changes, and keeps the state of
//! the rules that did not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_crds::MemberStore;
use ballast_e2e::{Stack, install_crds, pipeline_namespace};
use ballast_flow::{Flow, KEY_CAPACITY, Limit, Refused, Rules, follow};
use governor::clock::FakeRelativeClock;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

const SAMPLE: &str = include_str!("../../../manifests/samples/memberstore.yaml");

async fn until(within: Duration, what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_member_store_reloads_the_rules_and_unchanged_rules_keep_their_state() -> anyhow::Result<()>
{
    let client = Stack::discover().kube_client().await?;
    install_crds(&client).await?;
    let ns = pipeline_namespace(&client, "flow-reload").await?;
    let mut store: MemberStore = serde_yaml::from_str(SAMPLE)?;
    store.metadata.namespace = Some(ns.clone());
    store.spec.flow_control.global_rate_per_second = 1;
    let api: Api<MemberStore> = Api::namespaced(client, &ns);
    api.create(&PostParams::default(), &store).await?;

    // A fake clock: no token comes back by itself during the test.
    let clock = FakeRelativeClock::default();
    let flow = Arc::new(Flow::with_clock(
        Rules::default(),
        clock,
        KEY_CAPACITY,
        &mut Registry::default(),
    ));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    follow(
        api.clone(),
        "members",
        Arc::clone(&flow),
        Rules::of_member_store,
        shutdown,
    );
    let expected = Rules::of_member_store(&store);
    until(Duration::from_secs(10), "the rules of the created object", || {
        flow.rules() == expected
    })
    .await?;

    // Spend the global limit's only token (rate 1, burst 1).
    drop(
        flow.admit("order-service", None)
            .map_err(|r| anyhow::anyhow!("{r}"))?,
    );
    let refusal = flow
        .admit("order-service", None)
        .err()
        .expect("the token is spent");
    assert_eq!(refusal.refused, Refused::Global);

    let patch = serde_json::json!({"spec": {"flowControl": {"hotKeyRatePerSecond": 7}}});
    api.patch("members", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    until(Duration::from_secs(10), "the patched hot-key rate", || {
        flow.rules().hot_key == Some(Limit::per_second(7))
    })
    .await?;
    let refusal = flow
        .admit("order-service", None)
        .err()
        .expect("the global limit kept its state");
    assert_eq!(refusal.refused, Refused::Global);
    Ok(())
}
