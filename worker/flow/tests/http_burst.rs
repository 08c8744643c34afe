//! A burst through a real HTTP server (axum on loopback, a tower buffer in
//! front of the limited handler, as a service might have) at ten times the
//! limit is admitted at the limit, not beyond it (the axum #2634 pitfall: a
//! limit decided in `poll_ready` behind a buffer lets bursts through).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ballast_flow::{Flow, Limit, Rules};
use prometheus_client::registry::Registry;
use tower::ServiceBuilder;
use tower::buffer::BufferLayer;

const LIMIT: u32 = 100;
const OFFERED_PER_SECOND: u64 = 1_000;
const SECONDS: u64 = 3;

async fn admit(State(flow): State<Arc<Flow>>, request: Request, next: Next) -> Response {
    let caller = request
        .headers()
        .get("x-ballast-caller")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let key = request.uri().path().rsplit('/').next().map(str::to_owned);
    match flow.admit(&caller, key.as_deref()) {
        Ok(_in_progress) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_ten_times_the_limit_through_a_real_http_server_is_admitted_at_the_limit()
-> anyhow::Result<()> {
    let rules = Rules {
        global: Some(Limit::per_second(LIMIT)),
        ..Rules::default()
    };
    let flow = Arc::new(Flow::new(rules, &mut Registry::default()));
    let app = Router::new()
        .route("/members/{id}", get(|| async { "member" }))
        .layer(middleware::from_fn_with_state(flow, admit))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|e: tower::BoxError| async move {
                    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                }))
                .layer(BufferLayer::new(1024)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut ticks = tokio::time::interval(Duration::from_nanos(1_000_000_000 / OFFERED_PER_SECOND));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..OFFERED_PER_SECOND * SECONDS {
        ticks.tick().await;
        let request = client
            .get(format!("{url}/members/m{}", i % 50))
            .header("x-ballast-caller", "orders");
        calls.push(tokio::spawn(async move {
            let response = request.send().await?;
            let retry_after = response.headers().get("retry-after").is_some();
            anyhow::Ok((response.status().as_u16(), retry_after))
        }));
    }
    let sent_over = started.elapsed();
    let (mut admitted, mut refused) = (0u64, 0u64);
    for call in calls {
        match call.await?? {
            (200, _) => admitted += 1,
            (429, true) => refused += 1,
            (status, retry_after) => anyhow::bail!("unexpected answer {status} (Retry-After: {retry_after})"),
        }
    }
    let answered_over = started.elapsed();
    server.abort();

    // At most a tenth of a second's burst plus the rate over the whole time
    // any request could have arrived; at least most of the rate over the time
    // requests were being sent.
    let burst = u64::from(LIMIT / 10);
    let most = burst + (f64::from(LIMIT) * answered_over.as_secs_f64()).ceil() as u64;
    let least = (0.8 * f64::from(LIMIT) * sent_over.as_secs_f64()) as u64;
    assert!(
        (least..=most).contains(&admitted),
        "admitted {admitted} (refused {refused}) of {} offered over {sent_over:?} (answered over {answered_over:?}): expected {least}..={most}",
        admitted + refused
    );
    println!("admitted {admitted}, refused {refused}, sent over {sent_over:?}, bound {least}..={most}");
    assert!(
        refused >= 5 * admitted,
        "ten times the limit was offered: refused {refused}, admitted {admitted}"
    );
    Ok(())
}
