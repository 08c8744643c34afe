//! The operator binary against the local stack's real API server and servers:
//! workloads with owner references, waiting on a missing policy, KV failure
//! (scale out, then publish once slave Leases are ready; recover, scale in after
//! retention), Kafka failure (mode rewire), and garbage collection on delete.
//!
//! The test plays the data plane's part by keeping slave Leases itself, through
//! the real API server, as the slave pods do.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ballast_crds::{AnalyticsPipeline, DegradationPolicy, Mode};
use ballast_e2e::{KillOnDrop, Stack, stack_script};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Restores the stack's servers a failed assertion may have left stopped.
struct RestoreStack;

impl Drop for RestoreStack {
    fn drop(&mut self) {
        let _ = stack_script(&["up"]);
    }
}

fn start_operator(ns: &str, kubeconfig: &str) -> anyhow::Result<KillOnDrop> {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("ballast-operator-{ns}.log")))?;
    let child = Command::new(env!("CARGO_BIN_EXE_ballast-operator"))
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-namespace",
            ns,
            "--lease-seconds",
            "10",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,ballast_operator=debug")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    Ok(KillOnDrop(child))
}

/// Polls `check` every 250 ms until it yields a value or `secs` pass.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last_error = None;
    while Instant::now() < deadline {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("{what}: not within {secs} s (last error: {last_error:?})")
}

fn policy() -> serde_json::Value {
    let probe =
        json!({"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2});
    json!({
        "apiVersion": "ballast.dev/v1alpha1",
        "kind": "DegradationPolicy",
        "metadata": {"name": "fast"},
        "spec": {
            "mq": {"probe": probe},
            "kv": {"probe": probe, "slaveScaleFactor": 3, "retentionSeconds": 10, "readinessTimeoutSeconds": 120},
            "mysql": {"probe": probe}, "cache": {"probe": probe}, "cold": {"probe": probe},
        }
    })
}

/// Keeps a slave's Lease as a slave pod does: live and ready.
async fn heartbeat(leases: &Api<Lease>, ordinal: usize) -> anyhow::Result<()> {
    let name = format!("shop-slave-{ordinal}");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "labels": {"ballast.dev/pipeline": "shop", "ballast.dev/role": "slave"},
                     "annotations": {"ballast.dev/ready": "true", "ballast.dev/address": format!("127.0.0.1:{}", 17000 + ordinal)}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 60, "renewTime": MicroTime(Timestamp::now())},
    });
    leases
        .patch(&name, &PatchParams::apply("slave").force(), &Patch::Apply(&lease))
        .await?;
    Ok(())
}

async fn kv_mode(aps: &Api<AnalyticsPipeline>) -> anyhow::Result<Option<(Mode, i64)>> {
    let ap = aps.get("shop").await?;
    Ok(ap
        .status
        .and_then(|s| s.dependencies.kv)
        .map(|kv| (kv.mode, kv.epoch)))
}

async fn slave_replicas(sets: &Api<StatefulSet>) -> anyhow::Result<Option<i32>> {
    Ok(sets
        .get_opt("shop-slave")
        .await?
        .and_then(|s| s.spec)
        .and_then(|s| s.replicas))
}

#[tokio::test]
async fn operator_reconciles_and_switches_modes_against_real_servers() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let kubeconfig = stack.get("KUBECONFIG")?;
    let client: Client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let _restore = RestoreStack;

    let ns = ballast_e2e::pipeline_namespace(&client, "failover").await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _operator = start_operator(&ns, &kubeconfig)?;

    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let dps: Api<DegradationPolicy> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply("failover-test").force();

    // 1. A pipeline whose policy does not exist yet waits with a condition.
    aps.patch("shop", &ssa, &Patch::Apply(&stack.pipeline("shop", "fast")?))
        .await?;
    eventually("Ready=False PolicyNotFound", 30, || async {
        let ap = aps.get("shop").await?;
        let ready = ap
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == "Ready")
            .cloned();
        Ok(ready
            .filter(|c| c.status == "False" && c.reason == "PolicyNotFound")
            .map(|_| ()))
    })
    .await?;

    // 2. The policy appears: workloads are created, owned by the pipeline.
    dps.patch("fast", &ssa, &Patch::Apply(&policy())).await?;
    let uid = aps.get("shop").await?.uid().unwrap_or_default();
    eventually("workloads owned by the pipeline", 30, || async {
        let owned = |refs: Option<&Vec<_>>| {
            refs.is_some_and(
                |r: &Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>| {
                    r.iter().any(|o| o.uid == uid && o.controller == Some(true))
                },
            )
        };
        let deps = deployments.list(&ListParams::default()).await?.items;
        let names: Vec<String> = deps
            .iter()
            .filter(|d| owned(d.metadata.owner_references.as_ref()))
            .map(|d| d.name_any())
            .collect();
        let sts = sets.get_opt("shop-slave").await?;
        let sts_owned = sts
            .as_ref()
            .is_some_and(|s| owned(s.metadata.owner_references.as_ref()));
        Ok((names.len() == 4 && sts_owned).then_some(()))
    })
    .await?;
    assert_eq!(slave_replicas(&sets).await?, Some(2));
    eventually("kv Normal with Ready=True", 30, || async {
        let ap = aps.get("shop").await?;
        let ready = ap.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok((ready && kv_mode(&aps).await? == Some((Mode::Normal, 0))).then_some(()))
    })
    .await?;
    for ordinal in 0..2 {
        heartbeat(&leases, ordinal).await?;
    }

    // 3. KV store down: slaves are scaled out first; the mode waits for them.
    stack_script(&["stop", "redis-kv"])?;
    eventually("slave StatefulSet scaled to 6", 30, || async {
        Ok((slave_replicas(&sets).await? == Some(6)).then_some(()))
    })
    .await?;
    assert_eq!(
        kv_mode(&aps).await?.map(|m| m.0),
        Some(Mode::Normal),
        "KV degraded published before slaves were ready"
    );
    for ordinal in 2..6 {
        heartbeat(&leases, ordinal).await?;
    }
    eventually("kv Degraded (epoch 1) once 6 slaves are ready", 30, || async {
        Ok((kv_mode(&aps).await? == Some((Mode::Degraded, 1))).then_some(()))
    })
    .await?;
    eventually("ModeChanged Event for kv", 30, || async {
        let list = events.list(&ListParams::default()).await?.items;
        Ok(list
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ModeChanged")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("kv: Normal -> Degraded"))
            })
            .then_some(()))
    })
    .await?;

    // 4. KV store back: Normal is published first, slaves scale in after retention.
    stack_script(&["up"])?;
    eventually("kv Normal again", 60, || async {
        Ok(kv_mode(&aps)
            .await?
            .filter(|(mode, epoch)| *mode == Mode::Normal && *epoch >= 3)
            .map(|_| ()))
    })
    .await?;
    assert_eq!(
        slave_replicas(&sets).await?,
        Some(6),
        "scaled in before the retention drained"
    );
    eventually("slaves scaled back to 2 after retention", 60, || async {
        Ok((slave_replicas(&sets).await? == Some(2)).then_some(()))
    })
    .await?;

    // 5. Kafka down: the MQ mode rewires collectors; back up: Normal again.
    let mq_mode = || async {
        let ap = aps.get("shop").await?;
        Ok::<_, anyhow::Error>(ap.status.and_then(|s| s.dependencies.mq).map(|m| m.mode))
    };
    stack_script(&["stop", "kafka"])?;
    eventually("mq Degraded", 60, || async {
        Ok((mq_mode().await? == Some(Mode::Degraded)).then_some(()))
    })
    .await?;
    stack_script(&["up"])?;
    eventually("mq Normal", 90, || async {
        Ok((mq_mode().await? == Some(Mode::Normal)).then_some(()))
    })
    .await?;

    // 6. Deleting the pipeline removes what it owns (garbage collection).
    aps.delete("shop", &DeleteParams::foreground()).await?;
    eventually("owned workloads deleted", 60, || async {
        let left = deployments.list(&ListParams::default()).await?.items.len()
            + usize::from(sets.get_opt("shop-slave").await?.is_some());
        Ok((left == 0).then_some(()))
    })
    .await?;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}
