//! The HTTP endpoints every Ballast process serves: `/healthz`, `/readyz`
//! (from a readiness flag) and Prometheus `/metrics` (OpenMetrics, or the
//! classic text format for a client that does not ask for OpenMetrics).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`;
/// returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    serve_app(addr, router(registry, ready), shutdown).await
}

/// `/healthz`, `/readyz` and `/metrics`, for a process that serves more on
/// the same port (merge its routes, then [`serve_app`]).
pub fn router(registry: Arc<Registry>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Shared { registry, ready })
}

/// Binds `addr` and serves `app` until `shutdown`; returns the bound address
/// and the server task.
pub async fn serve_app(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((bound, task))
}

async fn readyz(State(shared): State<Shared>) -> impl IntoResponse {
    if *shared.ready.borrow() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(shared): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &shared.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {error}"),
        );
    }
    // Prometheus asks for OpenMetrics; curl, promtool and older scrapers do not.
    let accepts_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if accepts_openmetrics {
        (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body)
    } else {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT)],
            classic_text(&body),
        )
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a
/// counter's family is named with its `_total` suffix, as its samples are;
/// `# UNIT` and `# EOF` lines, which that format does not have, are dropped. Pure.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let name = rest.split(' ').next()?;
            counters.contains(name).then(|| (p, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Registers a new counter under `name` (the `_total` suffix is added) and returns it.
pub fn counter(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> prometheus_client::metrics::counter::Counter {
    let counter = prometheus_client::metrics::counter::Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

/// Registers a new gauge under `name` and returns it.
pub fn gauge(registry: &mut Registry, name: &str, help: &str) -> prometheus_client::metrics::gauge::Gauge {
    let gauge = prometheus_client::metrics::gauge::Gauge::default();
    registry.register(name, help, gauge.clone());
    gauge
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_text_names_counter_families_with_their_samples_and_drops_unit_and_eof() {
        let openmetrics = "# HELP a_events Events.\n# TYPE a_events counter\n# UNIT a_events events\na_events_total{k=\"v\"} 3\n\
            # HELP b_lag_seconds Lag.\n# TYPE b_lag_seconds gauge\nb_lag_seconds 1.5\n# EOF\n";
        let expected = "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total{k=\"v\"} 3\n\
            # HELP b_lag_seconds Lag.\n# TYPE b_lag_seconds gauge\nb_lag_seconds 1.5\n";
        assert_eq!(classic_text(openmetrics), expected);
    }

    #[test]
    fn a_gauge_whose_name_ends_like_a_counter_is_left_as_it_is() {
        let text = "# HELP c_total_bytes Bytes.\n# TYPE c_total_bytes gauge\nc_total_bytes 2\n";
        assert_eq!(classic_text(text), text);
    }
}
