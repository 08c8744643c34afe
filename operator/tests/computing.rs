//! What the workers depend on that the operator reads and publishes, against
//! the real API server and source database: the source tables' types, from
//! the source's `information_schema`; the pipeline's SQL, published only when
//! allowed (a refused one keeps the last); and windows that keep failing, from the
//! master's report (in its state ConfigMap), as the `Computing` condition
//! naming the windows and the error, with a Warning Event, and back to
//! `Computing=True` with a Normal Event once none fails; `status.failingWindows`
//! names them meanwhile.

mod common;

use ballast_crds::{AnalyticsPipeline, ColumnType};
use ballast_e2e::Stack;
use ballast_node::master_report::{self, FailingWindow, MasterReport};
use common::eventually;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

async fn condition(
    aps: &Api<AnalyticsPipeline>,
    name: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let ap = aps.get(name).await?;
    Ok(ap
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_))
        .map(|c| (c.status, c.reason, c.message)))
}

async fn computing(
    aps: &Api<AnalyticsPipeline>,
    name: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    condition(aps, name, "Computing").await
}

async fn announced(events: &Api<Event>, pipeline: &str, reason: &str) -> anyhow::Result<Option<String>> {
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some(reason) && e.involved_object.name.as_deref() == Some(pipeline))
        .and_then(|e| e.message))
}

#[tokio::test]
async fn the_operator_publishes_types_and_sql_and_reports_failing_windows() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "computing", json!({})).await?;
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator(binary, &ns).await?;
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);

    eventually("Computing=True before any report", 60, || async {
        Ok(computing(&aps, &pipeline).await?.filter(|(s, _, _)| s == "True"))
    })
    .await?;

    // The source tables' types, read from the real source database.
    let orders = eventually("the source schema published", 90, || async {
        let ap = aps.get(&pipeline).await?;
        Ok(ap
            .status
            .and_then(|s| s.source_schema)
            .and_then(|mut s| s.remove("orders")))
    })
    .await?;
    let typed: Vec<(String, ColumnType)> = orders.into_iter().map(|c| (c.name, c.type_)).collect();
    for (column, want) in [
        ("id", ColumnType::Int64),
        ("merchant_id", ColumnType::Utf8),
        ("amount", ColumnType::Int64),
    ] {
        assert!(
            typed.contains(&(column.to_owned(), want)),
            "{column} is not {want:?} in {typed:?}"
        );
    }

    // The fixture's SQL is accepted and published for the workers.
    let published = eventually("the SQL published", 60, || async {
        Ok(aps.get(&pipeline).await?.status.and_then(|s| s.sql))
    })
    .await?;
    assert_eq!(published.id, ballast_crds::sql::id(&published.text));
    // A SQL that reads a file: refused with the statement and why, announced,
    // and the published SQL stays what the workers run.
    let mut refused = stack.pipeline(&pipeline, "p")?;
    refused["spec"]["compute"]["sql"] = json!(
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/var/run/secrets/kubernetes.io/serviceaccount/token'; SELECT * FROM t"
    );
    aps.patch(
        &pipeline,
        &PatchParams::apply("ballast-e2e").force(),
        &Patch::Apply(&refused),
    )
    .await?;
    let (_, reason, message) = eventually("SqlValid=False", 60, || async {
        Ok(condition(&aps, &pipeline, "SqlValid")
            .await?
            .filter(|(s, _, _)| s == "False"))
    })
    .await?;
    assert_eq!(reason, "SqlRefused");
    assert!(
        message.contains("statement 1 (CreateExternalTable) is not allowed"),
        "{message}"
    );
    eventually("a SqlRefused Event", 30, || {
        announced(&events, &pipeline, "SqlRefused")
    })
    .await?;
    let still = aps.get(&pipeline).await?.status.and_then(|s| s.sql).map(|s| s.id);
    assert_eq!(still, Some(published.id.clone()));

    // The master's state ConfigMap, as the active master writes it.
    let mut report = MasterReport::default();
    report.set_failing(vec![FailingWindow {
        kind: "window".into(),
        start_ms: 1_764_000_000_000,
        end_ms: 1_764_000_060_000,
        attempts: 5,
        since_ms: 1_764_000_070_000,
        error: "event e-1 of window 1764000000000 cannot be decoded".into(),
    }]);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let write = |report: MasterReport| {
        let maps = maps.clone();
        let name = format!("{pipeline}-master-state");
        async move {
            let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                "data": {master_report::KEY: serde_json::to_string(&report)?}});
            maps.patch(
                &name,
                &PatchParams::apply("computing-test").force(),
                &Patch::Apply(cm),
            )
            .await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    write(report.clone()).await?;
    // Read on the next reconcile (at most the 30 s resync of a quiet pipeline).
    let (_, reason, message) = eventually("Computing=False naming the window", 90, || async {
        Ok(computing(&aps, &pipeline).await?.filter(|(s, _, _)| s == "False"))
    })
    .await?;
    assert_eq!(reason, "WindowsFailing");
    assert!(
        message.contains("2025-11-24T16:00:00Z")
            && message.contains("5 attempts")
            && message.contains("cannot be decoded"),
        "{message}"
    );
    let warning = eventually("a WindowsFailing Event", 30, || {
        announced(&events, &pipeline, "WindowsFailing")
    })
    .await?;
    assert!(warning.contains("cannot be decoded"), "{warning}");
    // The status names them too: the query service marks answers by it.
    let named = aps.get(&pipeline).await?.status.map(|s| s.failing_windows);
    assert_eq!(named, Some(report.failing.clone()));

    // The window computed: the master's report is empty again.
    write(MasterReport::default()).await?;
    eventually("Computing=True again", 60, || async {
        Ok(computing(&aps, &pipeline).await?.filter(|(s, _, _)| s == "True"))
    })
    .await?;
    eventually("a WindowsComputing Event", 30, || {
        announced(&events, &pipeline, "WindowsComputing")
    })
    .await?;
    let named = aps.get(&pipeline).await?.status.map(|s| s.failing_windows);
    assert_eq!(named, Some(Vec::new()), "failing windows left in status");
    Ok(())
}
