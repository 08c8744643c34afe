//! `promtool check metrics` over the live `/metrics` of the operator and of
//! each worker role, as a scraper that does not ask for OpenMetrics reads them:
//! every family is well named, typed and documented.

mod common;

use std::time::Duration;

use ballast_e2e::{KillOnDrop, Stack, promtool};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", ballast_e2e::scenario::free_port()?))
}

/// `GET /metrics` over plain HTTP/1.0, as curl or promtool would ask: the body of a 200.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{addr}: {head}"
    );
    Ok(body.to_owned())
}

/// Scrapes `addr` until its exposition contains `family`, for at most a minute.
async fn scrape_when(addr: &str, family: &str) -> anyhow::Result<String> {
    common::eventually(&format!("{addr} exposing {family}"), 60, || async {
        let body = scrape(addr).await?;
        Ok(body.contains(family).then_some(body))
    })
    .await
}

#[tokio::test]
async fn the_operator_and_every_worker_role_expose_metrics_that_pass_promtool() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "metrics", json!({})).await?;
    let operator_addr = free_addr()?;
    let operator = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-operator"));
    let _operator = stack.operator_on(operator, &ns, &operator_addr).await?;
    let worker = ballast_e2e::worker_binary()?;

    // (role, a family only that role registers)
    let roles = [
        ("collector", "ballast_collector_"),
        ("intake", "ballast_intake_"),
        ("master", "ballast_master_"),
        ("slave", "ballast_slave_"),
    ];
    let mut running: Vec<(KillOnDrop, &str, String, &str)> = Vec::new();
    for (role, family) in roles {
        let addr = free_addr()?;
        let pod = format!("{pipeline}-{role}-0");
        let child = stack.worker_with(
            &worker,
            &[role],
            &ns,
            &pipeline,
            &pod,
            &[("BALLAST_METRICS_ADDR", &addr)],
        )?;
        running.push((child, role, addr, family));
    }

    // The pipeline's gauges appear once the operator reconciled it.
    let body = scrape_when(&operator_addr, "ballast_operator_pipeline_ready").await?;
    for family in [
        "ballast_operator_dependency_mode",
        "ballast_operator_dependency_epoch",
        "ballast_operator_reconcile_duration_seconds",
    ] {
        assert!(body.contains(family), "the operator exposes {family}");
    }
    promtool(&["check", "metrics"], Some(&body)).map_err(|e| anyhow::anyhow!("operator: {e}"))?;
    for (_child, role, addr, family) in &running {
        let body = scrape_when(addr, family).await?;
        promtool(&["check", "metrics"], Some(&body)).map_err(|e| anyhow::anyhow!("{role}: {e}"))?;
    }
    Ok(())
}
