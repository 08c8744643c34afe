//! The MemberStore's workloads, made by the operator and run by the
//! stand-in kubelet (one per namespace) against the real servers: a member
//! service in each data centre's namespace and the replicator in the
//! store's, each pod reading its store under the least-privilege Role the
//! operator bound to its ServiceAccount; `Ready` once every one has an
//! available pod; the replicator at work (the operator measures its group
//! caught up); and, the store deleted, nothing left in any namespace.

use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_e2e::kubelet::{Kubelet, Settings};
use ballast_e2e::scenario::eventually;
use ballast_e2e::{Stack, pipeline_namespace};
use ballast_worker::members::stream::ChangeStream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

#[path = "shared/changes.rs"]
mod changes;

const DEADLINE: Duration = Duration::from_secs(2);

/// Whether the store's `Ready` condition holds, and its reason.
async fn ready(api: &Api<MemberStore>, name: &str) -> kube::Result<Option<(String, String)>> {
    let status = api.get(name).await?.status.unwrap_or_default();
    Ok(status
        .conditions
        .iter()
        .find(|c| c.type_ == ballast_crds::conditions::READY)
        .map(|c| (c.status.clone(), c.reason.clone())))
}

#[tokio::test]
async fn a_member_store_runs_a_service_per_data_centre_and_a_replicator_and_leaves_nothing_once_deleted()
-> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let ns = pipeline_namespace(&client, "msw").await?;
    let dc_a = pipeline_namespace(&client, "msw-a").await?;
    let dc_b = pipeline_namespace(&client, "msw-b").await?;
    let name = format!("msw-{}", ballast_e2e::run_id());
    let home = format!("m_{}", name.replace('-', "_"));
    stack.member_home(&home).await?;
    let mut store = stack.member_store(&name, &home)?;
    store["spec"]["dataCenters"][0]["namespace"] = dc_a.clone().into();
    store["spec"]["dataCenters"][1]["namespace"] = dc_b.clone().into();
    store["spec"]["replicasPerDataCenter"] = 1.into();
    let api: Api<MemberStore> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply("member-workloads-test").force(),
        &Patch::Apply(&store),
    )
    .await?;
    let parsed: MemberStore = serde_json::from_value(store)?;
    ChangeStream::ensure_topic(&parsed.spec.change_stream, DEADLINE * 5).await?;

    let _operator = stack
        .operator(&ballast_e2e::binary("ballast-operator")?, &ns)
        .await?;
    let kubelet = |namespace: &str, role: &str| -> anyhow::Result<Kubelet> {
        Ok(Kubelet::start(
            client.clone(),
            Settings {
                namespace: namespace.to_owned(),
                worker: ballast_e2e::worker_binary()?,
                kubeconfig: stack.get("KUBECONFIG")?,
                roles: vec![role.to_owned()],
                logs: std::env::temp_dir().join(format!("ballast-{namespace}")),
                env: vec![],
            },
        ))
    };
    let _kubelets = [
        kubelet(&dc_a, "member")?,
        kubelet(&dc_b, "member")?,
        kubelet(&ns, "replicator")?,
    ];

    // 1. Every workload has an available pod (each pod read its store under its Role).
    eventually("the store Ready with its workloads available", 180, || async {
        let r = ready(&api, &name).await?;
        Ok::<_, kube::Error>((r == Some(("True".into(), "WorkloadsAvailable".into()))).then_some(()))
    })
    .await?;

    // 2. The replicator at work: what is published reaches DC B, as the operator measures.
    let stream = ChangeStream::new(&parsed.spec.change_stream, DEADLINE)?;
    changes::publish(&stream, 5).await?;
    eventually("dc-b's replica group past the 5 records, lag 0", 60, || async {
        let status = api.get(&name).await?.status.unwrap_or_default();
        let caught_up = status
            .replication
            .iter()
            .any(|r| r.cluster == "dc-b" && r.applied >= 5 && r.lag_events == 0);
        Ok::<_, kube::Error>(caught_up.then_some(()))
    })
    .await?;

    // 3. Deleted: the finalizer removes what was made in the data centres'
    // namespaces, the garbage collector what the store owned in its own.
    api.delete(&name, &DeleteParams::default()).await?;
    let member = format!("{name}-member");
    let replicator = format!("{name}-replicator");
    eventually("nothing left of the store", 90, || async {
        let mut left = Vec::new();
        if api.get_opt(&name).await?.is_some() {
            left.push(format!("MemberStore {ns}/{name}"));
        }
        for at in [&dc_a, &dc_b] {
            if Api::<Deployment>::namespaced(client.clone(), at)
                .get_opt(&member)
                .await?
                .is_some()
            {
                left.push(format!("Deployment {at}/{member}"));
            }
            if Api::<Service>::namespaced(client.clone(), at)
                .get_opt(&member)
                .await?
                .is_some()
            {
                left.push(format!("Service {at}/{member}"));
            }
            if Api::<ServiceAccount>::namespaced(client.clone(), at)
                .get_opt(&member)
                .await?
                .is_some()
            {
                left.push(format!("ServiceAccount {at}/{member}"));
            }
        }
        if Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt(&replicator)
            .await?
            .is_some()
        {
            left.push(format!("Deployment {ns}/{replicator}"));
        }
        // What is left is the wait's last error, should it time out.
        anyhow::ensure!(left.is_empty(), "still there: {}", left.join(", "));
        Ok(Some(()))
    })
    .await?;
    Ok(())
}
