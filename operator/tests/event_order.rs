//! A mode transition is published in status only once its Event is: the
//! operator, run as a user the API server refuses Events to, keeps the new mode
//! out of the status (the reconcile fails and is retried), and publishes both
//! once Events are allowed. Were the status written first, the retry would see
//! no transition left to announce and the Event would be lost.

mod common;

use ballast_crds::{AnalyticsPipeline, Mode};
use ballast_e2e::Stack;
use ballast_e2e::scenario;
use common::eventually;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

/// Deletes the cluster-scoped RBAC the test made, whatever its outcome.
struct ClusterRbac {
    client: kube::Client,
    name: String,
}

impl Drop for ClusterRbac {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        // Drop cannot await: best effort on the test's runtime.
        tokio::spawn(async move {
            let _ = Api::<ClusterRoleBinding>::all(client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<ClusterRole>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

#[tokio::test]
async fn a_mode_is_not_published_before_its_event() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "evorder", json!({})).await?;
    ballast_e2e::install_operator_rbac(&client, &ns).await?;

    // The shipped operator ClusterRole without its Events rule, for a user of its own.
    let name = format!("ballast-e2e-no-events-{ns}");
    let user = format!("system:serviceaccount:{ns}:operator-without-events");
    let ssa = PatchParams::apply("event-order-test").force();
    let shipped = Api::<ClusterRole>::all(client.clone())
        .get("ballast-operator")
        .await?;
    let rules: Vec<_> = shipped
        .rules
        .unwrap_or_default()
        .into_iter()
        .filter(|r| !r.resources.iter().flatten().any(|res| res == "events"))
        .collect();
    let _cleanup = ClusterRbac {
        client: client.clone(),
        name: name.clone(),
    };
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &name,
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": name}, "rules": rules}),
            ),
        )
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            &name,
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "User", "name": user}]}),
            ),
        )
        .await?;

    ballast_e2e::grant_election(&client, &ns, &user).await?;
    let port = scenario::free_port()?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator_as(binary, &ns, &format!("127.0.0.1:{port}"), &user)?;
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let cold_mode = || async {
        let ap = aps.get(&pipeline).await?;
        Ok::<_, anyhow::Error>(ap.status.and_then(|s| s.dependencies.cold).map(|c| c.mode))
    };
    // Without a transition there is no Event to publish: the status is written.
    eventually("cold Normal in status", 60, || async {
        Ok((cold_mode().await? == Some(Mode::Normal)).then_some(()))
    })
    .await?;

    // An on-call override forces the cold store Degraded: a transition, whose Event is refused.
    let mut forced = stack.pipeline(&pipeline, "p")?;
    forced["spec"]["override"] = json!({"forceModes": {"cold": "Degraded"}});
    aps.patch(
        &pipeline,
        &PatchParams::apply("ballast-e2e").force(),
        &Patch::Apply(&forced),
    )
    .await?;
    let refused = r#"ballast_operator_reconcile_errors_total{kind="AnalyticsPipeline",error="event"}"#;
    eventually("two reconciles failed on the refused Event", 60, || async {
        Ok(scenario::metric(port, refused)
            .await?
            .filter(|n| *n >= 2.0)
            .map(|_| ()))
    })
    .await?;
    assert_eq!(
        cold_mode().await?,
        Some(Mode::Normal),
        "the forced mode reached the status although its Event was refused"
    );

    // Events allowed in the namespace: the retry publishes the Event, then the mode.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "operator-events"},
        "rules": [{"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}]});
    Api::<Role>::namespaced(client.clone(), &ns)
        .patch("operator-events", &ssa, &Patch::Apply(role))
        .await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "operator-events"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator-events"},
        "subjects": [{"kind": "User", "name": user}]});
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .patch("operator-events", &ssa, &Patch::Apply(binding))
        .await?;
    eventually("cold Degraded in status", 120, || async {
        Ok((cold_mode().await? == Some(Mode::Degraded)).then_some(()))
    })
    .await?;
    let events: Api<Event> = Api::namespaced(client, &ns);
    let announced = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .any(|e| {
            e.reason.as_deref() == Some("ModeChanged")
                && e.involved_object.name.as_deref() == Some(pipeline.as_str())
                && e.message.as_deref().is_some_and(|m| m.contains("cold"))
        });
    assert!(
        announced,
        "cold's transition is in the status but no ModeChanged Event announces it"
    );
    Ok(())
}
