//! `make bench`: the query service's hot path through its HTTP API on
//! loopback, each beside a raw baseline measured in the same run:
//! (a) "today" answers from the Redis cache at a fixed concurrency, against
//!     the same keys read straight from the cache Redis (HGETALL of the
//!     merchant's day hash: one round trip, as the service makes) by the
//!     same client at the same concurrency; answers per second, p50, p99;
//! (b) cache-down mode: answers from the in-process cache (hits), and the
//!     429 answer over the rate limit (p99; target under 1 ms);
//! (c) the cache back after an outage: MySQL reads paced and unpaced;
//! (d) history from the cold store: a filtered, grouped, sorted answer over
//!     90 days through the API, against the raw Elasticsearch search with the
//!     same filter and routing by the same client at the same concurrency.
//! Each figure is the median of 3 runs.

use std::sync::Arc;
use std::time::Duration;

use ballast_crds::{Dependency, Mode};
use ballast_e2e::Stack;
use ballast_worker::cold::{ColdStore, Day, Rollup};
use ballast_worker::compute::MerchantResult;
use ballast_worker::modes::Modes;
use ballast_worker::results::cache::{ResultCache, day_key, day_of};
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use ballast_worker::roles::query::{self, api, history, metrics, read};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

mod support;

use support::{Run, medians};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PIPELINE: &str = "bench-query";
const MERCHANTS: usize = 1_000;
const WINDOWS: i64 = 60;
const WINDOW_MS: i64 = 60_000;
const CONCURRENCY: usize = 16;
const RUN: Duration = Duration::from_secs(3);
const RUNS: usize = 3;

/// `CONCURRENCY` tasks each calling `one(task, i)` back to back for `RUN`.
async fn load<F, Fut>(one: F) -> anyhow::Result<Run>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    support::load(CONCURRENCY, RUN, one).await
}

/// A keep-alive HTTP/1.1 connection issuing GETs; returns each status.
struct Http {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        self.stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
            .await?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = self.stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if self.buf.len() >= end + 4 + length {
                let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok(status);
            }
        }
    }
}

/// `load` through the API: one keep-alive connection per task, GET `path(i)`,
/// each answer's status checked by `ok`.
async fn api_load<P>(port: u16, path: P, ok: fn(u16) -> bool) -> anyhow::Result<Run>
where
    P: Fn(usize) -> String + Clone + Send + Sync + 'static,
{
    let connections: Vec<_> =
        futures::future::try_join_all((0..CONCURRENCY).map(|_| Http::connect(port))).await?;
    let connections: Arc<Vec<tokio::sync::Mutex<Http>>> =
        Arc::new(connections.into_iter().map(tokio::sync::Mutex::new).collect());
    load(move |task, i| {
        let connections = Arc::clone(&connections);
        let path = path(i);
        async move {
            let status = connections[task].lock().await.get(&path).await?;
            anyhow::ensure!(ok(status), "HTTP {status} for {path}");
            Ok(())
        }
    })
    .await
}

fn merchant(i: usize) -> String {
    format!("bench-m{}", i % MERCHANTS)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let redis_info = stack.get("BALLAST_REDIS_CACHE_URL")?;
    let conn = redis::Client::open(redis_info.as_str())?
        .get_connection_manager()
        .await?;
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&stack.get("BALLAST_MYSQL_HOT_URL")?)?);
    let hot = HotStore::new(pool, "ballast_bench_query", 2, 4);
    hot.ensure_schema().await?;

    // One day of 60 windows for each merchant, in both stores, as slaves write them.
    let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let day = day_of(now);
    let mut cache = ResultCache::new(conn.clone()).with_ttl(3600);
    for w in 0..WINDOWS {
        let slot = Slot {
            pipeline: PIPELINE.into(),
            granularity: Granularity::Window,
            window_start_ms: day + w * WINDOW_MS,
        };
        let results: Vec<MerchantResult> = (0..MERCHANTS)
            .map(|m| MerchantResult {
                merchant_id: merchant(m),
                metrics: json!({
                    "gmv": 100 * m as i64 + w, "orders": 7, "paid_orders": 5, "paying_users": 4,
                    "avg_order_value": 1234.5, "refunds": 1, "refund_amount": 99,
                    "top_items": "item-1,item-2,item-3", "_sql": "0123456789abcdef",
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            })
            .collect();
        cache.write(&slot, 1, &results).await?;
        hot.write(&slot, 1, &results).await?;
    }

    // The service's read path and API, as the query role assembles them.
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    let deadline = Duration::from_millis(250);
    let policy = ballast_crds::degradation_policy::CachePolicy {
        query_rate_per_second: 50,
        local_cache_ttl_seconds: 600,
        ..Default::default()
    };
    // Warming checks every merchant's day at once: no pacing for it.
    let unpaced = ballast_crds::degradation_policy::CachePolicy {
        query_rate_per_second: 1_000_000,
        ..policy.clone()
    };
    let flow = ballast_flow::Flow::new(query::rules(&unpaced, deadline), &mut registry);
    let (_cache_tx, cache_rx) = watch::channel(Some(ResultCache::new(conn.clone())));
    let reader = read::Reader::new(
        read::ReaderConfig {
            pipeline: PIPELINE.into(),
            deadline,
            local_entries: 10_000,
            local_ttl: Duration::from_secs(600),
        },
        cache_rx,
        hot,
        flow,
        Arc::clone(&metrics),
    );
    let (modes_tx, modes) = watch::channel(Modes::default());
    let cold = cold_rollups(&stack, now).await?;
    // The history requests are logged as in a query pod.
    let (log, _writer) = history::logger::QueryLog::start(
        cold.clone(),
        Duration::from_secs(1),
        Arc::clone(&metrics),
        tokio_util::sync::CancellationToken::new(),
    );
    let app = Arc::new(api::App {
        reader,
        // The service's deadline on the cold store, as a query pod's default.
        cold: history::Cold::new(ColdStore::new(
            ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_COLD_URL")?, None)?,
            "bench-query-daily",
            Duration::from_secs(1),
        )),
        log,
        precomputed: Arc::default(),
        modes,
        window_ms: WINDOW_MS,
        period_ms: 3_600_000,
        lateness: Duration::from_secs(120),
        metrics,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let router = api::router(Arc::clone(&app));
    tokio::spawn(async move { axum::serve(listener, router).await });

    // Every merchant read once: the cache's hashes checked against MySQL (as a first read does).
    let mut http = Http::connect(port).await?;
    for m in 0..MERCHANTS {
        let status = http.get(&format!("/v1/merchants/{}/today", merchant(m))).await?;
        anyhow::ensure!(status == 200, "warming {}: HTTP {status}", merchant(m));
    }

    // (a) Hot answers from the cache, beside raw HGETALLs of the same keys.
    let (mut api_runs, mut raw_runs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let today = |i| format!("/v1/merchants/{}/today", merchant(i));
        api_runs.push(api_load(port, today, |status| status == 200).await?);
        let raw = conn.clone();
        raw_runs.push(
            load(move |_, i| {
                let mut raw = raw.clone();
                async move {
                    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
                        .arg(day_key(PIPELINE, day, &merchant(i)))
                        .query_async(&mut raw)
                        .await?;
                    anyhow::ensure!(fields.len() as i64 > WINDOWS, "{} fields", fields.len());
                    Ok(())
                }
            })
            .await?,
        );
    }
    let (api_hot, raw) = (medians(&api_runs), medians(&raw_runs));

    // (c) The cache back after an outage (a new cache epoch): every day is
    // unchecked, and each first read would check it against MySQL. Paced at
    // the policy's rate, beside the same load unpaced; MySQL reads counted
    // by the checks written back.
    let mut epoch = 1;
    let mut rewarm = |rate_policy: &ballast_crds::degradation_policy::CachePolicy| {
        epoch += 1;
        app.reader.flow().reload(query::rules(rate_policy, deadline));
        // Normal again just now: the checks are paced for the re-warm.
        let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let _ = modes_tx.send(
            Modes::default()
                .with(Dependency::Cache, Mode::Normal, epoch)
                .with_since(Dependency::Cache, now_ms),
        );
    };
    let (mut paced_runs, mut unpaced_runs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        for (rate_policy, runs) in [(&policy, &mut paced_runs), (&unpaced, &mut unpaced_runs)] {
            rewarm(rate_policy);
            let before = app.metrics.fills.get();
            let today = |i| format!("/v1/merchants/{}/today", merchant(i));
            let run = api_load(port, today, |status| status == 200).await?;
            let reads = app.metrics.fills.get() - before;
            runs.push((run, reads));
        }
    }
    let reads = |runs: &[(Run, u64)]| {
        let mut r: Vec<u64> = runs.iter().map(|(_, n)| *n).collect();
        r.sort_unstable();
        r[r.len() / 2]
    };
    let (paced_reads, unpaced_reads) = (reads(&paced_runs), reads(&unpaced_runs));
    let loads = |runs: &[(Run, u64)]| runs.iter().map(|(l, _)| *l).collect::<Vec<_>>();
    let (paced, unpaced_load) = (medians(&loads(&paced_runs)), medians(&loads(&unpaced_runs)));

    // (b) Cache down: the in-process cache's hits, and the 429 over the rate.
    let _ = modes_tx.send(Modes::default().with(Dependency::Cache, Mode::Degraded, 1));
    // Warming the in-process cache from MySQL: not paced.
    app.reader.flow().reload(query::rules(&unpaced, deadline));
    let hits = 100;
    for m in 0..hits {
        let status = http.get(&format!("/v1/merchants/{}/today", merchant(m))).await?;
        anyhow::ensure!(status == 200, "warming the in-process cache: HTTP {status}");
    }
    // One answer a second from MySQL: nearly every request meets the 429.
    let refusing = ballast_crds::degradation_policy::CachePolicy {
        query_rate_per_second: 1,
        ..policy.clone()
    };
    app.reader.flow().reload(query::rules(&refusing, deadline));
    let (mut local_runs, mut refused_runs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let hit = move |i| format!("/v1/merchants/{}/today", merchant(i % hits));
        local_runs.push(api_load(port, hit, |status| status == 200).await?);
        // Never cached: each goes to the rate limit in front of MySQL.
        let new = move |i| format!("/v1/merchants/bench-new-{run}-{i}/today");
        refused_runs.push(api_load(port, new, |status| matches!(status, 200 | 429)).await?);
    }
    let (local, refused) = (medians(&local_runs), medians(&refused_runs));

    // (d) History over 90 days, beside the raw search with the same filter.
    let today = Day::of_ms(now);
    let (from, to) = (Day(today.0 - 90), Day(today.0 - 1));
    let history = move |i| {
        format!(
            "/v1/merchants/{}/history?from={from}&to={to}&where=gmv%3E=5000&groupBy=week\
             &aggregate=sum:gmv&aggregate=avg:avg_order_value&aggregate=count&sort=sum_gmv:desc&limit=10",
            cold_merchant(i)
        )
    };
    let (mut history_runs, mut search_runs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        history_runs.push(api_load(port, history, |status| status == 200).await?);
        let store = cold.clone();
        search_runs.push(
            load(move |_, i| {
                let store = store.clone();
                async move {
                    let filter = vec![json!({"range": {"m.gmv": {"gte": 5000}}})];
                    let found = store
                        .search(&cold_merchant(i), (from, to), filter, Vec::new())
                        .await?;
                    anyhow::ensure!(!found.is_empty(), "no rollups found");
                    Ok(())
                }
            })
            .await?,
        );
    }
    let (history_api, search) = (medians(&history_runs), medians(&search_runs));

    println!(
        "query bench ({MERCHANTS} merchants x {WINDOWS} windows, concurrency {CONCURRENCY}, medians of {RUNS} runs of {RUN:?})"
    );
    println!(
        "{:<44} {:>12} {:>9} {:>9}",
        "path", "answers/s", "p50 ms", "p99 ms"
    );
    for (name, r) in [
        ("raw Redis HGETALL (baseline)", raw),
        ("API today from the cache", api_hot),
        ("API today from the in-process cache", local),
        ("API refused over the rate (429 mostly)", refused),
        ("API after a cache outage, checks paced", paced),
        ("API after a cache outage, unpaced", unpaced_load),
        ("raw ES search, 90 days (baseline)", search),
        ("API history, 90 days by week", history_api),
    ] {
        println!(
            "{name:<44} {:>12.0} {:>9.3} {:>9.3}",
            r.per_second, r.p50_ms, r.p99_ms
        );
    }
    println!(
        "hot API / raw Redis: {:.2} (target >= 0.5); hot p99 {:.2} ms (target < 5); 429 p99 {:.3} ms (target < 1)",
        api_hot.per_second / raw.per_second,
        api_hot.p99_ms,
        refused.p99_ms
    );
    println!(
        "after a cache outage, MySQL reads in a {RUN:?} run over {MERCHANTS} merchants: paced at {}/s {paced_reads} ({:.0}/s), unpaced {unpaced_reads} ({:.0}/s)",
        policy.query_rate_per_second,
        paced_reads as f64 / RUN.as_secs_f64(),
        unpaced_reads as f64 / RUN.as_secs_f64(),
    );
    println!(
        "history API / raw ES search: {:.2} answers/s; p99 {:.2} ms vs {:.2} ms ({:.2}x)",
        history_api.per_second / search.per_second,
        history_api.p99_ms,
        search.p99_ms,
        history_api.p99_ms / search.p99_ms
    );
    Ok(())
}

/// Merchants with a year of rollups in the cold store.
const COLD_MERCHANTS: usize = 100;

fn cold_merchant(i: usize) -> String {
    format!("bench-cold-m{}", i % COLD_MERCHANTS)
}

/// A year of daily rollups for each of [`COLD_MERCHANTS`] in the stack's cold
/// Elasticsearch (ids are merchant and day: a rerun rewrites the same documents).
async fn cold_rollups(stack: &Stack, now_ms: i64) -> anyhow::Result<ColdStore> {
    let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_COLD_URL")?, None)?;
    let store = ColdStore::new(es, "bench-query-daily", Duration::from_secs(30));
    store.install_template().await?;
    let today = Day::of_ms(now_ms);
    for m in 0..COLD_MERCHANTS {
        let rollups: Vec<Rollup> = (1..=365)
            .map(|back| {
                let day = Day(today.0 - back);
                Rollup {
                    merchant: cold_merchant(m),
                    day,
                    shed: false,
                    hourly_only: false,
                    metrics: json!({
                        "gmv": (day.0 as i64 * 7919 + m as i64 * 104_729) % 20_000, "orders": 30 + back % 7,
                        "paying_users": 20, "avg_order_value": 123.5 + f64::from(back),
                        "top_items": format!("item-{},item-2", back % 5),
                    })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                }
            })
            .collect();
        // The last write makes them all visible to searches.
        let refresh = if m + 1 == COLD_MERCHANTS {
            elasticsearch::params::Refresh::WaitFor
        } else {
            elasticsearch::params::Refresh::False
        };
        store.write_all(&rollups, refresh).await?;
    }
    Ok(store)
}
