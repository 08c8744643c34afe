//! The platform team's path, on the stack's real node (containerd, runc, the
//! kubelet, kube-scheduler): `helm install` the chart with images built here,
//! the samples applied with the stack's servers, the operator and every role
//! running as real pods (the kubelet's probes decide readiness), the KV store
//! lost and recovered with real slave pods scaling out and in, and then
//! `helm uninstall` leaving nothing behind, not even the leader's Lease.
//!
//! The images are built by `image/build.sh` from the debug binaries this test
//! run compiled (`make image` builds the release ones), so that the scenario
//! runs what the commit says.

use std::time::Instant;

use ballast_crds::{AnalyticsPipeline, Mode};
use ballast_e2e::node::Node;
use ballast_e2e::scenario::{self, eventually};
use ballast_e2e::{Stack, merge, stack_script};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ballast");
const SAMPLES: &str = include_str!("../../manifests/samples/analyticspipeline.yaml");
const POLICY_SAMPLE: &str = include_str!("../../manifests/samples/degradationpolicy.yaml");
/// The images' tag: the debug build of this checkout.
const TAG: &str = "0.1.0-e2e";
const RELEASE: &str = "ballast";
const PIPELINE: &str = "merchant-analytics";

/// The sample of `kind` from a multi-document manifest.
fn sample(text: &str, kind: &str) -> anyhow::Result<Value> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if value["kind"] == kind {
            return Ok(value);
        }
    }
    anyhow::bail!("no {kind} in the samples")
}

/// The sample pipeline, its servers replaced by the stack's (as the node's pods
/// reach them), sized for a two-core node, and placed on the real node.
fn pipeline(stack: &Stack, node: &Node) -> anyhow::Result<Value> {
    let mut ap = sample(SAMPLES, "AnalyticsPipeline")?;
    let at =
        |var: &str| -> anyhow::Result<String> { Ok(node.reach(ballast_e2e::host_port(&stack.get(var)?))) };
    let mysql = |var: &str, secret: &str| -> anyhow::Result<Value> {
        Ok(
            json!({"address": at(var)?, "database": "ballast", "user": "ballast",
                  "passwordSecretRef": {"name": secret, "key": "password"}}),
        )
    };
    merge(
        &mut ap["spec"],
        &json!({
            "source": {"mysql": mysql("BALLAST_MYSQL_SOURCE_URL", "orders-db")?, "tables": ["orders"]},
            "kafka": {"bootstrapServers": node.kafka_bootstrap},
            "kv": {"address": at("BALLAST_REDIS_KV_URL")?},
            "cache": {"address": at("BALLAST_REDIS_CACHE_URL")?},
            "hotStore": mysql("BALLAST_MYSQL_HOT_URL", "results-db")?,
            "coldStore": {"elasticsearch": {"url": format!("http://{}", at("BALLAST_ES_COLD_URL")?)}},
            "roles": {
                "intake": {"replicas": 1},
                "slave": {"replicas": 2, "resources": {
                    "requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}},
                "query": {"replicas": 1},
            },
            "placement": {"schedulerName": node.scheduler,
                          "nodeSelector": {"ballast.dev/real-node": "true"}},
        }),
    );
    // The stack's cache Redis has no password.
    if let Some(cache) = ap["spec"]["cache"].as_object_mut() {
        cache.remove("passwordSecretRef");
    }
    Ok(ap)
}

/// The sample policy, with probes and the scale-in delay short enough for a test.
fn policy() -> anyhow::Result<Value> {
    let mut dp = sample(POLICY_SAMPLE, "DegradationPolicy")?;
    let probe =
        json!({"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2});
    merge(
        &mut dp["spec"],
        &json!({
            "mq": {"probe": probe}, "mysql": {"probe": probe}, "cache": {"probe": probe},
            "kv": {"probe": probe, "scaleInDelaySeconds": 10, "maxMemoryMiB": 128},
        }),
    );
    Ok(dp)
}

/// The pods of `namespace` that run on the node, ready by the kubelet's probes.
async fn ready_pods(pods: &Api<Pod>, node: &Node, selector: &str) -> anyhow::Result<Vec<Pod>> {
    let listed = pods.list(&ListParams::default().labels(selector)).await?.items;
    Ok(listed
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name.as_str()))
        .filter(|p| {
            p.status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .collect())
}

async fn slave_replicas(sets: &Api<StatefulSet>) -> anyhow::Result<Option<i32>> {
    let name = format!("{PIPELINE}-slave");
    Ok(sets
        .get_opt(&name)
        .await?
        .and_then(|s| s.spec)
        .and_then(|s| s.replicas))
}

/// Waits until the pipeline publishes the KV store's mode as `mode`.
async fn until_kv_mode(aps: &Api<AnalyticsPipeline>, mode: Mode, secs: u64) -> anyhow::Result<()> {
    eventually(&format!("kv {mode:?}"), secs, || async {
        let ap = aps.get(PIPELINE).await?;
        let now = ap.status.and_then(|s| s.dependencies.kv).map(|kv| kv.mode);
        Ok::<_, kube::Error>((now == Some(mode)).then_some(()))
    })
    .await?;
    Ok(())
}

/// Deletes what another scenario left of the chart's cluster-wide objects (the
/// shipped RBAC and admission policies the operator tests apply), so that the
/// install is a first install, as on a fresh cluster.
fn clear_cluster_objects(stack: &Stack, rendered: &str) -> anyhow::Result<()> {
    stack.kubectl_with(
        &["delete", "--ignore-not-found", "--wait", "-f", "-"],
        Some(rendered),
    )?;
    Ok(())
}

#[tokio::test]
async fn the_chart_runs_the_platform_as_real_pods_through_a_kv_failure() -> anyhow::Result<()> {
    let started = Instant::now();
    let stack = Stack::discover();
    let node = Node::of(&stack)?;
    let client: Client = stack.kube_client().await?;
    // An operator watching every namespace must find only this scenario's pipeline.
    ballast_e2e::delete_fixtures(&client).await?;
    // helm installs the chart's CRDs only where there are none, and other
    // scenarios installed older ones: this checkout's, as `make crds` writes
    // them into the chart too.
    ballast_e2e::install_crds(&client).await?;
    let _restore = scenario::RestoreStack;

    // 1. Images of this checkout, in the node's containerd.
    let binaries = ballast_e2e::binary("ballast-operator")?
        .parent()
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let out = binaries.join("real-node-images");
    std::fs::create_dir_all(&out)?;
    let archives = node.build_and_import_images(&binaries, TAG, &out)?;
    assert_eq!(archives.len(), 2, "operator and worker archives: {archives:?}");
    let images_at = started.elapsed();

    // 2. helm install, as a platform team does, with the node's scheduler.
    let operator_ns = ballast_e2e::pipeline_namespace(&client, "real-node-system").await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "real-node").await?;
    let values = [
        format!("image.tag={TAG}"),
        format!("workerImage.tag={TAG}"),
        format!("schedulerName={}", node.scheduler),
        // A label's value is a string, not helm's `true`.
        "nodeSelector.ballast\\.dev/real-node=true".to_owned(),
    ];
    let mut set = Vec::new();
    for value in &values {
        set.extend(["--set-string", value.as_str()]);
    }
    let mut template = vec!["template", RELEASE, CHART, "--namespace", &operator_ns];
    template.extend(&set);
    clear_cluster_objects(&stack, &stack.helm(&template)?)?;
    let mut install = vec![
        "install",
        RELEASE,
        CHART,
        "--namespace",
        &operator_ns,
        "--wait",
        "--timeout",
        "5m",
    ];
    install.extend(&set);
    stack.helm(&install)?;
    let manifest = stack.helm(&["get", "manifest", RELEASE, "--namespace", &operator_ns])?;

    // The operator runs as real pods on the node, and one of them leads.
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), &operator_ns);
    let leaders: Api<Lease> = Api::namespaced(client.clone(), &operator_ns);
    let running = ready_pods(&operator_pods, &node, "app.kubernetes.io/name=ballast-operator").await?;
    assert_eq!(running.len(), 2, "both operator replicas ready on {}", node.name);
    let names: Vec<String> = running.iter().map(ResourceExt::name_any).collect();
    eventually("an operator pod holds the Lease ballast-operator", 60, || async {
        let holder = leaders
            .get_opt("ballast-operator")
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        Ok::<_, kube::Error>(holder.filter(|h| names.contains(h)))
    })
    .await?;
    let operator_at = started.elapsed();

    // 3. The samples, with the stack's servers.
    let ssa = PatchParams::apply("real-node-test").force();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for name in ["orders-db", "results-db"] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                            "stringData": {"password": "ballast"}});
        secrets.patch(name, &ssa, &Patch::Apply(&secret)).await?;
    }
    let sql = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "merchant-analytics-sql"},
                     "data": {"windows.sql": ballast_e2e::SAMPLE_SQL}});
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch("merchant-analytics-sql", &ssa, &Patch::Apply(&sql))
        .await?;
    stack.source_orders().await?;
    Api::<ballast_crds::DegradationPolicy>::namespaced(client.clone(), &ns)
        .patch(PIPELINE, &ssa, &Patch::Apply(&policy()?))
        .await?;
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    aps.patch(PIPELINE, &ssa, &Patch::Apply(&pipeline(&stack, &node)?))
        .await?;

    // Every role runs as real pods; the pipeline is Ready once their probes pass.
    scenario::until_pipeline_ready(&client, &ns, PIPELINE, 300).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for role in ["collector", "intake", "master", "slave", "query"] {
        let selector = format!("ballast.dev/role={role}");
        assert!(
            !ready_pods(&pods, &node, &selector).await?.is_empty(),
            "no ready {role} pod on {}",
            node.name
        );
    }
    let containers = node.containers_of(&ns)?;
    assert!(
        !containers.is_empty(),
        "no container of {ns} in the node's containerd"
    );
    let pipeline_at = started.elapsed();

    // 4. The KV store is lost: the slaves scale out as real pods, and the
    // degraded mode is published only once they are ready.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    assert_eq!(slave_replicas(&sets).await?, Some(2));
    stack_script(&["stop", "redis-kv"])?;
    eventually("slave StatefulSet scaled to 6", 60, || async {
        Ok::<_, anyhow::Error>((slave_replicas(&sets).await? == Some(6)).then_some(()))
    })
    .await?;
    until_kv_mode(&aps, Mode::Degraded, 240).await?;
    // The operator publishes the mode once 6 slaves report ready on their
    // Leases, with the set the epoch routes over; the kubelet's view of the
    // same readiness follows at its probe's next period (it lagged by two
    // pods once on a loaded machine), so it is awaited, not raced.
    let members = aps
        .get(PIPELINE)
        .await?
        .status
        .and_then(|s| s.slave_set)
        .map(|set| set.members.len());
    assert_eq!(
        members,
        Some(6),
        "slaves the Degraded epoch routes over when it was published"
    );
    eventually("the 6 slaves Ready pods on the node", 60, || async {
        let ready = ready_pods(&pods, &node, "ballast.dev/role=slave").await?;
        Ok::<_, anyhow::Error>((ready.len() == 6).then_some(()))
    })
    .await?;
    let degraded_at = started.elapsed();

    // 5. Back: Normal, then the slaves scale in after the delay; their pods go.
    stack_script(&["up"])?;
    until_kv_mode(&aps, Mode::Normal, 120).await?;
    eventually("2 slave pods after the scale-in delay", 120, || async {
        let all = pods
            .list(&ListParams::default().labels("ballast.dev/role=slave"))
            .await?
            .items;
        Ok::<_, anyhow::Error>((slave_replicas(&sets).await? == Some(2) && all.len() == 2).then_some(()))
    })
    .await?;
    let recovered_at = started.elapsed();

    // 6. The pipeline deleted, then the release: nothing is left.
    aps.delete(PIPELINE, &DeleteParams::default()).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("the pipeline's pods and workloads gone", 120, || async {
        let left = pods.list(&ListParams::default()).await?.items.len()
            + deployments.list(&ListParams::default()).await?.items.len()
            + sets.list(&ListParams::default()).await?.items.len();
        Ok::<_, anyhow::Error>((left == 0).then_some(()))
    })
    .await?;
    stack.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        &operator_ns,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let left = stack.kubectl_with(
        &["get", "--ignore-not-found", "-o", "name", "-f", "-"],
        Some(&manifest),
    )?;
    assert_eq!(
        left.trim(),
        "",
        "objects of the release left after helm uninstall"
    );
    // The leader gave its Lease up as it stopped (no chart object: it is the operator's own).
    eventually("no pod, container or leader Lease left", 120, || async {
        let pods_left = operator_pods.list(&ListParams::default()).await?.items.len()
            + pods.list(&ListParams::default()).await?.items.len();
        let containers_left = node.containers_of(&operator_ns)?.len() + node.containers_of(&ns)?.len();
        let lease_left = usize::from(leaders.get_opt("ballast-operator").await?.is_some());
        Ok::<_, anyhow::Error>((pods_left + containers_left + lease_left == 0).then_some(()))
    })
    .await?;

    println!(
        "real node scenario: images {:.0?}, operator leading {:.0?}, pipeline ready {:.0?}, \
         kv degraded {:.0?}, recovered {:.0?}, uninstalled {:.0?}",
        images_at,
        operator_at,
        pipeline_at,
        degraded_at,
        recovered_at,
        started.elapsed()
    );
    Ok(())
}
