//! The demo's merchants reading their numbers: a steady load on the query
//! service's API (one merchant followed, others at random), measured as a
//! newcomer wants to see it: answers per second, p50/p99 latency, which store
//! answered and how complete the answers were, through each failure.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ballast_e2e::scenario;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Requests per second the load sends.
const RATE: u64 = 20;
/// Answers older than this leave the latency figures.
const SPAN: Duration = Duration::from_secs(5);

/// One answer: when, how long, its status, source and reasons.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    took: Duration,
    status: u16,
    source: String,
    reasons: Vec<String>,
}

/// What the last few seconds of answers looked like.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryStats {
    /// Answers per second (any status).
    pub per_second: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// How many answers had each status, e.g. `200 x97, 429 x3`.
    pub statuses: String,
    /// The sources of the 200s, e.g. `cache`.
    pub sources: String,
    /// The reasons partial answers gave, e.g. `cacheOnly`.
    pub reasons: String,
}

/// The answers seen, newest last.
#[derive(Clone, Default)]
pub struct QueryLoad(Arc<Mutex<VecDeque<Seen>>>);

impl QueryLoad {
    /// Sends the load to the port `port` holds (0: no query pod yet) until `stop`.
    pub fn start(&self, port: watch::Receiver<u16>, follow: String, merchants: u64, stop: CancellationToken) {
        let seen = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut i: u64 = 0;
            while !stop.is_cancelled() {
                tick.tick().await;
                let port = *port.borrow();
                if port == 0 {
                    continue;
                }
                // Every other request is the followed merchant's (the page's).
                i += 1;
                let merchant = if i.is_multiple_of(2) {
                    follow.clone()
                } else {
                    format!("demo-m{}", i.wrapping_mul(2_654_435_761) % merchants)
                };
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let path = format!("/v1/merchants/{merchant}/today");
                    let answer =
                        tokio::time::timeout(Duration::from_secs(5), scenario::http_get(port, &path)).await;
                    let (status, body) = match answer {
                        Ok(Ok(answer)) => answer,
                        _ => (0, String::new()),
                    };
                    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let reasons = json["completeness"]["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r["code"].as_str().map(str::to_owned))
                        .collect();
                    let entry = Seen {
                        at: Instant::now(),
                        took: started.elapsed(),
                        status,
                        source: json["source"].as_str().unwrap_or_default().to_owned(),
                        reasons,
                    };
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    seen.push_back(entry);
                    while seen.front().is_some_and(|s| s.at.elapsed() > SPAN) {
                        seen.pop_front();
                    }
                });
            }
        });
    }

    /// The figures over the last few seconds.
    pub fn stats(&self) -> QueryStats {
        let seen: Vec<Seen> = {
            let seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            seen.iter().filter(|s| s.at.elapsed() <= SPAN).cloned().collect()
        };
        stats(&seen, SPAN)
    }
}

/// The figures of `seen` answers over `span`. Pure.
fn stats(seen: &[Seen], span: Duration) -> QueryStats {
    let mut took: Vec<Duration> = seen.iter().map(|s| s.took).collect();
    took.sort();
    let at = |q: f64| {
        took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let tally = |values: Vec<String>| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        counts
            .iter()
            .map(|(v, n)| format!("{v} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    QueryStats {
        per_second: seen.len() as f64 / span.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        statuses: tally(
            seen.iter()
                .map(|s| {
                    if s.status == 0 {
                        "no answer".into()
                    } else {
                        s.status.to_string()
                    }
                })
                .collect(),
        ),
        sources: tally(
            seen.iter()
                .filter(|s| s.status == 200)
                .map(|s| s.source.clone())
                .collect(),
        ),
        reasons: tally(seen.iter().flat_map(|s| s.reasons.clone()).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_figures_count_statuses_sources_and_reasons() {
        let now = Instant::now();
        let seen = |ms: u64, status: u16, source: &str, reasons: &[&str]| Seen {
            at: now,
            took: Duration::from_millis(ms),
            status,
            source: source.into(),
            reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
        };
        let answers = [
            seen(2, 200, "cache", &[]),
            seen(4, 200, "cache", &["cacheOnly"]),
            seen(9, 503, "", &[]),
            seen(1, 0, "", &[]),
        ];
        let s = stats(&answers, Duration::from_secs(2));
        assert_eq!(s.per_second, 2.0);
        assert_eq!(s.statuses, "200 x2, 503 x1, no answer x1");
        assert_eq!(s.sources, "cache x2");
        assert_eq!(s.reasons, "cacheOnly x1");
        assert_eq!(s.p50_ms, 4.0);
        assert_eq!(s.p99_ms, 9.0);
        assert_eq!(stats(&[], Duration::from_secs(1)), QueryStats::default());
    }
}
