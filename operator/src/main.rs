//! `ballast-operator`: the controller binary. Elects a leader among its
//! replicas, then reconciles AnalyticsPipelines, probes their dependencies and
//! publishes degraded modes; serves health and metrics throughout.
#![forbid(unsafe_code)]

mod analytics_pipeline;
mod context;
mod crds;
mod degradation_policy;
mod member_store;
mod mode;
mod probe;

#[cfg(test)]
mod argocd;

use std::net::SocketAddr;
use std::time::Duration;

use ballast_node::{health, leader, telemetry};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use tokio_util::sync::CancellationToken;

/// Command-line settings of the operator.
#[derive(Debug, Parser)]
#[command(name = "ballast-operator", version, about)]
struct Args {
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "BALLAST_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "BALLAST_LOG_FORMAT", default_value = "text")]
    log_format: telemetry::LogFormat,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "BALLAST_LEASE_NAME", default_value = "ballast-operator")]
    lease_name: String,
    /// This replica's identity in the election and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch one namespace only (a namespaced install, with a Role instead of
    /// the ClusterRole); the whole cluster when unset.
    #[arg(long, env = "BALLAST_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The `ballast-worker` image pipelines run unless their spec names one
    /// (the chart sets it to the worker of the operator's own version).
    #[arg(long, env = "BALLAST_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// The kind of the workers' shipped write role `ballast-worker`: the
    /// ClusterRole, or a Role in each watched namespace (namespaced install).
    #[arg(
        long,
        env = "BALLAST_WORKER_WRITES_ROLE",
        value_enum,
        default_value = "cluster-role"
    )]
    worker_writes_role: analytics_pipeline::desired::WritesRole,
    /// The operator's own Deployment (in the Lease's namespace): it owns the
    /// leader Lease, so that the Lease goes with it and an uninstall leaves
    /// none. Unset, or unreadable at start, the Lease has no owner.
    #[arg(long, env = "BALLAST_OPERATOR_DEPLOYMENT")]
    owner_deployment: Option<String>,
    /// Upgrade the installed Ballast CRDs to this operator's version when it
    /// starts leading (Helm never upgrades a chart's CRDs); see `crds`.
    #[arg(long, env = "BALLAST_UPGRADE_CRDS")]
    upgrade_crds: bool,
    /// Seconds a leader keeps the Lease without renewing it.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("ballast-operator-{}", std::process::id()));

    let client = kube::Client::try_default().await?;
    let (ctx, triggers) = context::Context::new(
        client.clone(),
        identity.clone(),
        args.watch_namespace.clone(),
        args.worker_image.clone(),
        args.worker_writes_role,
    );
    let shutdown = CancellationToken::new();
    let (addr, server) = health::serve(
        args.metrics_addr,
        ctx.registry.clone(),
        ctx.readiness(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
    ctx.check_api_server().await;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            telemetry::shutdown_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });

    let owner = match &args.owner_deployment {
        Some(name) => lease_owner(&client, &args.lease_namespace, name).await,
        None => None,
    };
    let election = leader::Election {
        namespace: args.lease_namespace,
        name: args.lease_name,
        identity,
        duration: Duration::from_secs(args.lease_seconds.max(3)),
        labels: Default::default(),
        owner,
    };
    tracing::info!(identity = %election.identity, lease = %election.name, "waiting for leadership");
    let Some(held) = election.acquire(&client, &shutdown).await else {
        // A take in flight when the signal came may have landed.
        release(&election, &client).await;
        server.await??;
        return Ok(());
    };
    tracing::info!(term = held.term, "leading: reconciling");
    let lost = shutdown.child_token();
    tokio::spawn(
        election
            .clone()
            .hold(client.clone(), held, shutdown.clone(), lost.clone()),
    );
    // Renewed by `hold` meanwhile: a slow API server cannot cost the Lease.
    if args.upgrade_crds {
        let version = env!("CARGO_PKG_VERSION");
        for (crd, outcome) in crds::upgrade(&client, version, Duration::from_secs(5)).await {
            ctx.metrics
                .crd_upgrades
                .get_or_create(&vec![("crd", crd), ("outcome", outcome.as_str().to_owned())])
                .inc();
        }
    }
    let controllers = async {
        tokio::join!(
            analytics_pipeline::run(ctx.clone(), triggers.pipelines, lost.clone()),
            degradation_policy::run(ctx.clone(), lost.clone()),
            member_store::run(ctx, triggers.stores, lost.clone()),
        )
    };
    // Reconciles in flight get a deadline to finish after SIGTERM: a slow API
    // server must not keep a terminating replica alive past its grace period.
    let drain_deadline = async {
        lost.cancelled().await;
        tokio::time::sleep(Duration::from_secs(20)).await;
    };
    tokio::select! {
        _ = controllers => {}
        () = drain_deadline => tracing::warn!("reconciles still running after the 20 s drain deadline; exiting"),
    }

    let lost_leadership = !shutdown.is_cancelled();
    shutdown.cancel();
    if !lost_leadership {
        // Reconciles are over: a standby may lead now, without waiting out the Lease.
        release(&election, &client).await;
    }
    // Open keep-alive connections (a scraper) must not hold the exit either.
    if let Ok(joined) = tokio::time::timeout(Duration::from_secs(5), server).await {
        joined??;
    }
    // A replica that lost the Lease exits so that it restarts as a follower.
    anyhow::ensure!(!lost_leadership, "lost leadership");
    Ok(())
}

/// Gives the leader Lease up if this replica holds it, within a deadline: a
/// hung API server must not hold the exit (the Lease then lapses as usual).
async fn release(election: &leader::Election, client: &kube::Client) {
    match tokio::time::timeout(Duration::from_secs(3), election.release(client)).await {
        Ok(Ok(true)) => tracing::info!(lease = %election.name, "leader lease given up"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "giving the leader lease up failed; it lapses instead"),
        Err(_) => {
            tracing::warn!(lease = %election.name, "giving the leader lease up timed out; it lapses instead")
        }
    }
}

/// An owner reference to Deployment `name` in `namespace`, read within a
/// deadline; `None`, logged, when it cannot be read (the Lease then has no
/// owner, as before: leading must not wait on it).
async fn lease_owner(client: &kube::Client, namespace: &str, name: &str) -> Option<OwnerReference> {
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(Duration::from_secs(5), deployments.get(name)).await {
        Ok(Ok(deployment)) => deployment.owner_ref(&()),
        Ok(Err(error)) => {
            tracing::warn!(%error, deployment = name, "the leader Lease's owner is unreadable; the Lease has none");
            None
        }
        Err(_) => {
            tracing::warn!(
                deployment = name,
                "reading the leader Lease's owner timed out; the Lease has none"
            );
            None
        }
    }
}
