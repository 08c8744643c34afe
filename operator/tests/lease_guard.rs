//! One pipeline's workers cannot touch another pipeline's Leases, against the
//! real API server: two pipelines share a namespace, the operator grants each
//! its workers' Role, and the workers act as their ServiceAccounts. RBAC lets
//! a worker write Leases in its namespace (it must create its own, named
//! after pods not known in advance); the shipped admission policy refuses
//! every write to a Lease of another pipeline: deleting its master Lease or
//! collector checkpoint, taking them over, or creating one in its name; and
//! every write to a ConfigMap but its own master's state; and it leaves alone
//! another application's account that merely ends in `-worker`.

mod common;

use ballast_e2e::Stack;
use common::eventually;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn lease(name: &str, pipeline: &str) -> anyhow::Result<Lease> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"ballast.dev/pipeline": pipeline}},
        "spec": {"holderIdentity": format!("{name}-holder")},
    }))?)
}

/// The message of a refusal, or an error if the call was not refused.
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> anyhow::Result<String> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(e.message),
        other => anyhow::bail!("{what}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pipelines_workers_cannot_write_another_pipelines_leases() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let admin = stack.kube_client().await?;
    let (ns, mine) = stack.pipeline_fixture(&admin, "leaseguard", json!({})).await?;
    // A second pipeline in the same namespace.
    let theirs = format!("{mine}x");
    let aps: Api<ballast_crds::AnalyticsPipeline> = Api::namespaced(admin.clone(), &ns);
    aps.patch(
        &theirs,
        &PatchParams::apply("ballast-e2e").force(),
        &Patch::Apply(&stack.pipeline(&theirs, "p")?),
    )
    .await?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator(binary, &ns).await?;
    let roles: Api<Role> = Api::namespaced(admin.clone(), &ns);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
    for pipeline in [&mine, &theirs] {
        let role = format!("{pipeline}-worker");
        eventually(&format!("the operator granting Role {role}"), 60, || async {
            Ok(roles.get_opt(&role).await?)
        })
        .await?;
        // Bound without the operator holding what ballast-worker grants (`bind` on it).
        let writes = format!("{pipeline}-worker-writes");
        eventually(&format!("the operator binding {writes}"), 60, || async {
            Ok(bindings.get_opt(&writes).await?)
        })
        .await?;
    }
    // Theirs came without a data-plane token: the operator made one, owned by the pipeline.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), &ns);
    let made = secrets.get(&format!("{theirs}-data-plane")).await?;
    let token = made
        .data
        .unwrap_or_default()
        .remove("token")
        .map(|t| t.0)
        .unwrap_or_default();
    assert!(
        token.len() == 64 && token.iter().all(u8::is_ascii_hexdigit),
        "{} bytes",
        token.len()
    );
    let owners = made.metadata.owner_references.unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "AnalyticsPipeline" && o.name == theirs)
    );

    let user = |pipeline: &str| format!("system:serviceaccount:{ns}:{pipeline}-worker");
    let my_leases: Api<Lease> = Api::namespaced(stack.kube_client_as(&user(&mine)).await?, &ns);
    let their_leases: Api<Lease> = Api::namespaced(stack.kube_client_as(&user(&theirs)).await?, &ns);

    // Their workers hold their master Lease and collector checkpoint.
    let their_master = format!("{theirs}-master");
    let their_checkpoint = format!("{theirs}-collector-checkpoint");
    for name in [&their_master, &their_checkpoint] {
        eventually(&format!("{theirs}'s workers creating {name}"), 30, || async {
            match their_leases
                .create(&PostParams::default(), &lease(name, &theirs)?)
                .await
            {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(())),
                // The Role may still be on its way to the authorizer's cache.
                Err(e) => Err(e.into()),
            }
        })
        .await?;
    }

    // RBAC alone would let my workers delete them: the refusal below is the policy's.
    let allowed = common::rbac_allows(
        &admin,
        &user(&mine),
        &ns,
        ("delete", "coordination.k8s.io", "leases"),
        Some(&their_master),
    )
    .await?;
    assert!(allowed, "RBAC refuses it already");

    // Each forbidden write, refused naming the rule.
    for name in [&their_master, &their_checkpoint] {
        let message = refused(
            &format!("deleting {name}"),
            my_leases.delete(name, &DeleteParams::default()).await,
        )?;
        assert!(message.contains("may write only its own Leases"), "{message}");
        let mut taken = their_leases.get(name).await?;
        taken.spec.get_or_insert_with(Default::default).holder_identity = Some(format!("{mine}-master-0"));
        refused(
            &format!("taking over {name}"),
            my_leases.replace(name, &PostParams::default(), &taken).await,
        )?;
    }
    // Creating a Lease in their name, or one of mine labelled theirs.
    refused(
        "creating a Lease named after their pipeline",
        my_leases
            .create(
                &PostParams::default(),
                &lease(&format!("{theirs}-slave-9"), &mine)?,
            )
            .await,
    )?;
    refused(
        "creating a Lease labelled with their pipeline",
        my_leases
            .create(
                &PostParams::default(),
                &lease(&format!("{mine}-slave-9"), &theirs)?,
            )
            .await,
    )?;

    // ConfigMaps: their master's state and any other ConfigMap are refused;
    // my master's state is mine to write.
    let configmap = |name: &str| -> anyhow::Result<ConfigMap> {
        Ok(serde_json::from_value(
            json!({"metadata": {"name": name}, "data": {"k": "v"}}),
        )?)
    };
    let admin_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let my_maps: Api<ConfigMap> = Api::namespaced(stack.kube_client_as(&user(&mine)).await?, &ns);
    for name in [format!("{theirs}-master-state"), format!("{mine}-sql")] {
        let existing = match admin_maps
            .create(&PostParams::default(), &configmap(&name)?)
            .await
        {
            Ok(created) => created,
            Err(kube::Error::Api(e)) if e.code == 409 => admin_maps.get(&name).await?,
            Err(e) => return Err(e.into()),
        };
        let message = refused(
            &format!("rewriting ConfigMap {name}"),
            my_maps.replace(&name, &PostParams::default(), &existing).await,
        )?;
        assert!(
            message.contains("may write only its master state ConfigMap"),
            "{message}"
        );
    }
    refused(
        "creating a ConfigMap other than its master state",
        my_maps
            .create(&PostParams::default(), &configmap(&format!("{mine}-other"))?)
            .await,
    )?;
    let mine_state = format!("{mine}-master-state");
    eventually("my workers creating their master state", 30, || async {
        match my_maps
            .create(&PostParams::default(), &configmap(&mine_state)?)
            .await
        {
            Ok(_) => Ok(Some(())),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(())),
            Err(e) => Err(e.into()),
        }
    })
    .await?;

    // My workers' own Leases are theirs to write.
    let mine_master = format!("{mine}-master");
    my_leases
        .create(&PostParams::default(), &lease(&mine_master, &mine)?)
        .await?;
    my_leases.delete(&mine_master, &DeleteParams::default()).await?;
    // Theirs are untouched.
    for name in [&their_master, &their_checkpoint] {
        let held = their_leases.get(name).await?.spec.and_then(|s| s.holder_identity);
        assert_eq!(held, Some(format!("{name}-holder")));
    }

    // Another application's account whose name ends in -worker, allowed the
    // same writes by its own Role, is none of the policy's business.
    let other = "queue-worker";
    let rules = json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "update", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "update"]},
    ]);
    let ssa = PatchParams::apply("ballast-e2e").force();
    roles
        .patch(
            other,
            &ssa,
            &Patch::Apply(json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role", "metadata": {"name": other}, "rules": rules})),
        )
        .await?;
    bindings
        .patch(
            other,
            &ssa,
            &Patch::Apply(json!({"apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding", "metadata": {"name": other},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": other},
            "subjects": [{"kind": "ServiceAccount", "name": other, "namespace": ns}]})),
        )
        .await?;
    let other_client = stack
        .kube_client_as(&format!("system:serviceaccount:{ns}:{other}"))
        .await?;
    let other_leases: Api<Lease> = Api::namespaced(other_client.clone(), &ns);
    let other_maps: Api<ConfigMap> = Api::namespaced(other_client, &ns);
    let unlabelled: Lease = serde_json::from_value(json!({"metadata": {"name": "leader-election"}}))?;
    eventually(
        "another application's -worker account writing its own Lease",
        30,
        || async {
            match other_leases.create(&PostParams::default(), &unlabelled).await {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(())),
                // Its Role may still be on its way to the authorizer's cache; a
                // refusal by the policy fails below.
                Err(kube::Error::Api(e)) if e.code == 403 && !e.message.contains("may write only") => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        },
    )
    .await?;
    other_maps
        .create(&PostParams::default(), &configmap("settings")?)
        .await?;
    Ok(())
}
