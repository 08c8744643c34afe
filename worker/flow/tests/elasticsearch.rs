//! Against a real Elasticsearch: frozen with SIGSTOP it accepts connections
//! and never answers; the slow-call breaker on a real client path opens,
//! calls then fail at once with UNAVAILABLE, the trial calls while it is
//! still frozen reopen it, and after SIGCONT they close it.

use std::time::{Duration, Instant};

use ballast_e2e::{Stack, stack_script};
use ballast_flow::breaker::{BreakerConfig, State};
use ballast_flow::{Breaker, CallError, Flow, GuardedDependency, Refused, Rules};
use elasticsearch::Elasticsearch;
use elasticsearch::cluster::ClusterHealthParts;
use elasticsearch::http::transport::Transport;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

const SERVER: &str = "es-dc-b";
const ES: GuardedDependency = GuardedDependency::Elasticsearch;
const DEADLINE: Duration = Duration::from_millis(500);

/// Thaws the server when dropped, whatever the test's outcome.
struct Paused;

impl Paused {
    fn freeze() -> anyhow::Result<Self> {
        stack_script(&["pause", SERVER])?;
        Ok(Self)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = stack_script(&["resume", SERVER]);
    }
}

async fn health(client: &Elasticsearch, flow: &Flow) -> Result<(), CallError<elasticsearch::Error>> {
    flow.call(ES, DEADLINE, async {
        let response = client.cluster().health(ClusterHealthParts::None).send().await?;
        response.error_for_status_code().map(drop)
    })
    .await
}

fn metric(registry: &Registry, line_start: &str) -> f64 {
    let mut text = String::new();
    encode(&mut text, registry).expect("encode");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Calls every 100 ms until `done` holds, for at most `within`.
async fn call_until(
    client: &Elasticsearch,
    flow: &Flow,
    within: Duration,
    done: impl Fn(&Flow) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done(flow) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not within {within:?}: breaker {:?}",
            flow.breaker_state(ES)
        );
        let _ = health(client, flow).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_elasticsearch_opens_the_slow_call_breaker_and_a_thawed_one_closes_it() -> anyhow::Result<()>
{
    let url = Stack::discover().get("BALLAST_ES_DC_B_URL")?;
    let client = Elasticsearch::new(Transport::single_node(&url)?);
    let config = BreakerConfig {
        max_average: None,
        slow_call: Some(Duration::from_millis(200)),
        max_slow_percent: Some(50),
        max_error_percent: None,
        max_errors: None,
        minimum_calls: 4,
        window: Duration::from_secs(10),
        open: Duration::from_secs(2),
        half_open_calls: 2,
    };
    let rules = Rules {
        breakers: [(
            ES,
            Breaker {
                config,
                shadow: false,
            },
        )]
        .into(),
        ..Rules::default()
    };
    let mut registry = Registry::with_prefix("ballast");
    let flow = Flow::new(rules, &mut registry);

    for _ in 0..4 {
        health(&client, &flow).await?;
    }
    assert_eq!(flow.breaker_state(ES), Some(State::Closed));

    let paused = Paused::freeze()?;
    // Four fast calls and then slow ones: the fourth slow one makes half.
    for i in 1..=4 {
        let result = health(&client, &flow).await;
        assert!(
            matches!(result, Err(CallError::TimedOut { .. })),
            "call {i} to a frozen server: {result:?}"
        );
    }
    assert!(
        matches!(flow.breaker_state(ES), Some(State::Open { .. })),
        "{:?}",
        flow.breaker_state(ES)
    );
    let opened = "ballast_flow_breaker_transitions_total{dependency=\"elasticsearch\",server=\"\",to=\"open\",reason=\"slow_calls\"}";
    assert_eq!(metric(&registry, opened), 1.0);

    // Open: refused without a call, naming the dependency.
    let Err(CallError::Refused(refusal)) = health(&client, &flow).await else {
        anyhow::bail!("an open breaker let a call through");
    };
    assert_eq!(refusal.refused, Refused::Breaker(ES, String::new()));
    let status = tonic::Status::from(refusal);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().starts_with("elasticsearch is unavailable"),
        "{}",
        status.message()
    );

    // Still frozen after the open period: the trial call fails and reopens it.
    let reopened = "ballast_flow_breaker_transitions_total{dependency=\"elasticsearch\",server=\"\",to=\"open\",reason=\"trial_failed\"}";
    call_until(&client, &flow, Duration::from_secs(10), |_| {
        metric(&registry, reopened) >= 1.0
    })
    .await?;

    drop(paused);
    call_until(&client, &flow, Duration::from_secs(30), |f| {
        f.breaker_state(ES) == Some(State::Closed)
    })
    .await?;
    health(&client, &flow).await?;
    Ok(())
}
