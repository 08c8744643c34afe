//! The operator binary against the local stack's real API server and servers:
//! workloads with owner references, waiting on a missing policy, KV failure
//! (scale out, then publish once slave Leases are ready; recover, scale in after
//! the scale-in delay), Kafka failure (mode rewire), a forced mode, and garbage collection on delete.
//!
//! The slaves are real `ballast-worker slave` processes, run by the e2e
//! stand-in kubelet from the StatefulSet the operator scales; they join the
//! membership with their Leases, as slave pods do.

mod common;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy, Mode};
use ballast_e2e::kubelet::{Kubelet, Settings};
use ballast_e2e::scenario;
use ballast_e2e::{KillOnDrop, Stack, stack_script};
use common::eventually;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

async fn start_operator(ns: &str) -> anyhow::Result<KillOnDrop> {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    Ok(Stack::discover().operator(binary, ns).await?)
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
            "kv": {"probe": probe, "slaveScaleFactor": 3, "scaleInDelaySeconds": 10, "readinessTimeoutSeconds": 120},
            "mysql": {"probe": probe}, "cache": {"probe": probe}, "cold": {"probe": probe},
        }
    })
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
    let _restore = scenario::RestoreStack;

    let ns = ballast_e2e::pipeline_namespace(&client, "failover").await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _operator = start_operator(&ns).await?;

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
    let ready_condition = || async {
        let ap = aps.get("shop").await?;
        let ready = ap
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == "Ready")
            .cloned();
        Ok::<_, anyhow::Error>(ready)
    };
    eventually("Ready=False PolicyNotFound", 30, || async {
        Ok(ready_condition()
            .await?
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
        // Collector, intake, master and query (none of its pods in the fixture), and the slaves.
        Ok((names.len() == 4 && sts_owned).then_some(()))
    })
    .await?;
    assert_eq!(slave_replicas(&sets).await?, Some(2));
    // Applied is not Ready: no pod runs yet, and Ready says which workloads lack what.
    eventually(
        "kv Normal, Ready=False naming every unavailable workload",
        30,
        || async {
            let waiting = ready_condition().await?.is_some_and(|c| {
                c.status == "False"
                    && c.reason == "WorkloadsProgressing"
                    && [
                        "Deployment shop-collector",
                        "Deployment shop-master",
                        "StatefulSet shop-slave: 0/2",
                    ]
                    .iter()
                    .all(|w| c.message.contains(w))
            });
            Ok((waiting && kv_mode(&aps).await? == Some((Mode::Normal, 0))).then_some(()))
        },
    )
    .await?;
    let kubelet = Kubelet::start(
        client.clone(),
        Settings {
            namespace: ns.clone(),
            worker: ballast_e2e::worker_binary()?,
            kubeconfig: kubeconfig.clone(),
            roles: vec!["slave".into()],
            logs: std::env::temp_dir().join(format!("ballast-{ns}")),
            env: Vec::new(),
        },
    );
    let ready_slaves = || async {
        let list = leases
            .list(&ListParams::default().labels("ballast.dev/pipeline=shop,ballast.dev/role=slave"))
            .await?;
        let ready = list.items.iter().filter(|l| {
            l.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("ballast.dev/ready"))
                .is_some_and(|v| v == "true")
        });
        Ok::<_, anyhow::Error>(ready.cloned().collect::<Vec<Lease>>())
    };
    eventually("2 slave processes in the membership", 60, || async {
        Ok((ready_slaves().await?.len() == 2).then_some(()))
    })
    .await?;
    // Those pods were admitted in a namespace enforcing the restricted Pod
    // Security Standard; the master pair and the intakes have disruption budgets.
    let namespace = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get(&ns)
        .await?;
    assert_eq!(
        namespace
            .labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    // ...which is enforced: a pod without those settings is refused there.
    let bare: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "unhardened"},
        "spec": {"containers": [{"name": "c", "image": "ballast-worker"}]},
    }))?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    match pods
        .create(
            &kube::api::PostParams {
                dry_run: true,
                ..Default::default()
            },
            &bare,
        )
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("PodSecurity") => {}
        other => anyhow::bail!("an unhardened pod in a restricted namespace: {other:?}"),
    }
    let budgets: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(client.clone(), &ns);
    for role in ["master", "intake"] {
        let budget = budgets.get(&format!("shop-{role}")).await?;
        let max = budget.spec.and_then(|s| s.max_unavailable);
        assert_eq!(
            max,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
            "{role}"
        );
    }
    // The slaves' pods report ready through the stand-in kubelet: the StatefulSet
    // is available and leaves Ready's message; the Deployments (not run here) stay.
    eventually("Ready names the Deployments only", 60, || async {
        let named = ready_condition().await?.is_some_and(|c| {
            c.status == "False"
                && c.message.contains("Deployment shop-intake")
                && !c.message.contains("StatefulSet")
        });
        Ok(named.then_some(()))
    })
    .await?;

    // 3. KV store down: slaves are scaled out first; the mode waits for them.
    stack_script(&["stop", "redis-kv"])?;
    eventually("slave StatefulSet scaled to 6", 30, || async {
        Ok((slave_replicas(&sets).await? == Some(6)).then_some(()))
    })
    .await?;
    eventually("kv Degraded (epoch 1) once 6 slaves are ready", 30, || async {
        Ok((kv_mode(&aps).await? == Some((Mode::Degraded, 1))).then_some(()))
    })
    .await?;
    // The degraded mode was published only once all 6 slaves had joined.
    let joined = ready_slaves().await?;
    assert_eq!(
        joined.len(),
        6,
        "slaves in the membership: {:?}",
        kubelet.running()
    );
    let last_join = joined
        .iter()
        .filter_map(|l| l.metadata.creation_timestamp.clone())
        .map(|t| t.0)
        .max();
    let published = aps
        .get("shop")
        .await?
        .status
        .and_then(|s| s.dependencies.kv)
        .map(|kv| kv.since.0);
    assert!(
        published >= last_join,
        "kv Degraded published at {published:?}, before the last slave joined at {last_join:?}"
    );
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

    // 4. KV store back: Normal is published first, slaves scale in after the scale-in delay.
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
        "scaled in before the scale-in delay"
    );
    eventually("slaves scaled back to 2 after the scale-in delay", 60, || async {
        Ok((slave_replicas(&sets).await? == Some(2)).then_some(()))
    })
    .await?;
    eventually("drained slaves left the membership", 30, || async {
        Ok((ready_slaves().await?.len() == 2).then_some(()))
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

    // 6. An on-call override forces the cold store's mode, visibly; lifting it
    //    hands the decision back to the probes, which find Elasticsearch healthy.
    let cold = || async {
        let ap = aps.get("shop").await?;
        Ok::<_, anyhow::Error>(
            ap.status
                .and_then(|s| s.dependencies.cold)
                .map(|c| (c.mode, c.forced)),
        )
    };
    let mut forced = stack.pipeline("shop", "fast")?;
    forced["spec"]["override"] = json!({"forceModes": {"cold": "Degraded"}});
    aps.patch("shop", &ssa, &Patch::Apply(&forced)).await?;
    eventually("cold forced Degraded", 30, || async {
        Ok((cold().await? == Some((Mode::Degraded, true))).then_some(()))
    })
    .await?;
    aps.patch("shop", &ssa, &Patch::Apply(&stack.pipeline("shop", "fast")?))
        .await?;
    eventually("cold back to Normal, unforced", 60, || async {
        Ok((cold().await? == Some((Mode::Normal, false))).then_some(()))
    })
    .await?;

    // 7. Deleting the pipeline removes what it owns (garbage collection).
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
