//! `make bench`: detection-to-publish time of the operator against a raw probe
//! loop measured in the same run, and the operator's memory with 200 pipelines.
//!
//! Detection-to-publish is the time from the moment the cache Redis stops
//! answering to its degraded mode in the pipeline's status, minus the policy's
//! detection window (period × failure threshold). The raw baseline is a bare
//! PING loop with the same period and threshold, started at the same moment.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ballast_crds::{AnalyticsPipeline, Mode};
use ballast_e2e::{KillOnDrop, Stack, stack_script};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const RUNS: usize = 20;
const PERIOD: Duration = Duration::from_secs(1);
const FAILURES: u32 = 2;
const PIPELINES: usize = 200;

fn policy(name: &str, period: u64) -> serde_json::Value {
    let probe = json!({"periodSeconds": period, "timeoutSeconds": 1, "failureThreshold": FAILURES, "successThreshold": 2});
    json!({"apiVersion": "ballast.dev/v1alpha1", "kind": "DegradationPolicy", "metadata": {"name": name},
           "spec": {"mq": {"probe": probe}, "kv": {"probe": probe}, "mysql": {"probe": probe}, "cache": {"probe": probe}, "cold": {"probe": probe}}})
}

async fn cache_mode(aps: &Api<AnalyticsPipeline>, name: &str) -> Option<Mode> {
    aps.get(name)
        .await
        .ok()?
        .status?
        .dependencies
        .cache
        .map(|c| c.mode)
}

async fn wait_cache(
    aps: &Api<AnalyticsPipeline>,
    name: &str,
    mode: Mode,
    secs: u64,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cache_mode(aps, name).await == Some(mode) {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("cache of {name} not {mode:?} within {secs} s")
}

/// The baseline: PING every period; returns when `FAILURES` in a row failed.
async fn raw_detection(url: String) -> Instant {
    let mut ticker = tokio::time::interval(PERIOD);
    let mut failures = 0;
    let mut conn = None;
    loop {
        ticker.tick().await;
        let ok = async {
            if conn.is_none() {
                conn = redis::Client::open(url.as_str())
                    .ok()?
                    .get_multiplexed_async_connection()
                    .await
                    .ok();
            }
            let c = conn.as_mut()?;
            redis::cmd("PING").query_async::<String>(c).await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(1), ok).await {
            Ok(Some(_)) => failures = 0,
            _ => {
                conn = None;
                failures += 1;
                if failures >= FAILURES {
                    return Instant::now();
                }
            }
        }
    }
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib / 1024.0)
}

fn summary(label: &str, mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    let worst = samples[samples.len() - 1];
    println!(
        "{label:<34} median {median:>+7.3} s   worst {worst:>+7.3} s   ({} runs)",
        samples.len()
    );
    median
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    ballast_e2e::install_crds(&client).await?;
    let ns = ballast_e2e::pipeline_namespace(&client, "bench").await?;
    ballast_e2e::install_operator_rbac(&client, &ns).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply("bench").force();
    let dps: Api<ballast_crds::DegradationPolicy> = Api::namespaced(client.clone(), &ns);
    dps.patch("fast", &ssa, &Patch::Apply(&policy("fast", PERIOD.as_secs())))
        .await?;
    dps.patch("slow", &ssa, &Patch::Apply(&policy("slow", 10)))
        .await?;

    let operator = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_ballast-operator"))
            .args(["--metrics-addr", "127.0.0.1:0", "--lease-namespace", &ns])
            .env("KUBECONFIG", stack.get("KUBECONFIG")?)
            .env("KUBE_RS_DEBUG_IMPERSONATE_USER", ballast_e2e::OPERATOR_USER)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    aps.patch("detect", &ssa, &Patch::Apply(&stack.pipeline("detect", "fast")?))
        .await?;
    wait_cache(&aps, "detect", Mode::Normal, 60).await?;
    let window = PERIOD * FAILURES;
    let cache_url = stack.get("BALLAST_REDIS_CACHE_URL")?;

    // Per run: seconds from the stop to the operator's published mode and to
    // the bare loop's detection, each minus the detection window (negative when
    // the first lost probe came right after the stop), and their difference:
    // what the operator adds to detection (state machine, reconcile, status write).
    let (mut operator_times, mut raw_times, mut overheads) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let raw = tokio::spawn(raw_detection(cache_url.clone()));
        // Let the baseline connect and settle before the failure.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The server stops answering as soon as the stop begins (it closes its
        // listener on SIGTERM, then takes a while to exit): time from there.
        let stopped = Instant::now();
        stack_script(&["stop", "redis-cache"])?;
        let published = wait_cache(&aps, "detect", Mode::Degraded, 60).await?;
        let raw_detected = raw.await?;
        let seconds = |t: Instant| t.duration_since(stopped).as_secs_f64() - window.as_secs_f64();
        let overhead = seconds(published) - seconds(raw_detected);
        operator_times.push(seconds(published));
        raw_times.push(seconds(raw_detected));
        overheads.push(overhead);
        eprintln!(
            "run {run:>2}: operator {:+.3} s, raw {:+.3} s, operator - raw {overhead:+.3} s",
            seconds(published),
            seconds(raw_detected)
        );
        stack_script(&["up"])?;
        wait_cache(&aps, "detect", Mode::Normal, 60).await?;
    }
    println!("detection-to-publish, seconds after the stop minus the {window:?} detection window:");
    let op = summary("  operator (status published)", operator_times);
    let raw = summary("  raw PING loop (baseline)", raw_times);
    summary("  operator - raw, per run", overheads);
    println!("  medians: operator {op:+.3} s, raw {raw:+.3} s");

    aps.delete("detect", &DeleteParams::default()).await?;
    let before = rss_mib(operator.0.id())?;
    for i in 0..PIPELINES {
        aps.patch(
            &format!("p-{i:03}"),
            &ssa,
            &Patch::Apply(&stack.pipeline(&format!("p-{i:03}"), "slow")?),
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = aps.list(&Default::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|ap| {
                ap.status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation.is_some() && s.dependencies.cache.is_some())
            })
            .count();
        if done == PIPELINES {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {PIPELINES} pipelines reconciled in 10 min"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Let every prober run at least once more before sampling.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = rss_mib(operator.0.id())?;
    println!("operator resident memory: {before:.1} MiB idle, {after:.1} MiB with {PIPELINES} pipelines");
    drop(operator);
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    Ok(())
}
