//! What the load benches share: a fixed number of tasks calling back to back
//! for a fixed time, and each run summed up as rate, p50 and p99, with the
//! median over runs (this machine is noisy; one run proves little).

use std::time::{Duration, Instant};

/// The median of `values` (NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    /// Calls completed per second.
    pub per_second: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// The run of calls that took `latencies`, over `elapsed`.
pub fn summarize(mut latencies: Vec<Duration>, elapsed: Duration) -> Run {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Run {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// Each figure's median over `runs`.
pub fn medians(runs: &[Run]) -> Run {
    let of = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Run {
        per_second: of(|r| r.per_second),
        p50_ms: of(|r| r.p50_ms),
        p99_ms: of(|r| r.p99_ms),
    }
}

/// `concurrency` tasks each calling `one(task, i)` back to back for `run`
/// (`i` counts up by `concurrency` from `task`, so no two calls share one).
pub async fn load<F, Fut>(concurrency: usize, run: Duration, one: F) -> anyhow::Result<Run>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = task;
                while started.elapsed() < run {
                    let t = Instant::now();
                    one(task, i).await?;
                    latencies.push(t.elapsed());
                    i += concurrency;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(summarize(all, started.elapsed()))
}
