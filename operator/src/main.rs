//! `ballast-operator`: the controller binary. Serves health and metrics while its
//! controllers (one module per CRD) run against the Kubernetes API.
#![forbid(unsafe_code)]

mod context;
mod http;
mod telemetry;

use std::net::SocketAddr;

use clap::Parser;
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);

    let client = kube::Client::try_default().await?;
    let ctx = context::Context::new(client);
    let shutdown = CancellationToken::new();

    let server = tokio::spawn(http::serve(args.metrics_addr, ctx.clone(), shutdown.clone()));
    ctx.check_api_server().await;
    tracing::info!(addr = %args.metrics_addr, "ballast-operator started");

    telemetry::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    server.await??;
    Ok(())
}
