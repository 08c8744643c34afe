//! The query service run by the operator (through the e2e stand-in kubelet)
//! over the whole pipeline: each merchant's "today" equals MariaDB's own
//! computation over the raw rows, and keeps being answered, golden, with the
//! reason on the answer, while the hot MySQL is down (from the cache) and
//! while the cache is down (from MySQL behind the rate limit, which answers
//! 429 at once over it); bad input is a 400 naming the problem; the merchant
//! page, in headless Chromium, shows the numbers and the degraded banner; a
//! window whose computation keeps failing is named on the answers until it
//! computes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_crds::{Dependency, Mode};
use ballast_e2e::browser::Browser;
use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::poison::PoisonedWindow;
use ballast_e2e::running::{self, Launch, RunningPipeline};
use ballast_e2e::scenario::{self, HttpResponse};
use ballast_e2e::stack_script;
use ballast_worker::results::cache::DAY_MS;
use serde_json::{Value, json};

const WINDOW_MS: i64 = 2_000;
/// The policy's period (its default granularity).
const HOUR_MS: i64 = 3_600_000;
/// Queries per second a query pod answers from MySQL while the cache is down.
const RATE: u32 = 5;

/// Polls `check` until it yields a value or `secs` pass (errors as `anyhow`).
async fn eventually<T, F, Fut>(what: &str, secs: u64, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    Ok(scenario::eventually(what, secs, check).await?)
}

/// A pipeline with one query pod, its operator and its workers.
struct Running {
    run: RunningPipeline,
}

impl Running {
    async fn start(prefix: &str) -> anyhow::Result<Self> {
        let run = RunningPipeline::start(Launch {
            prefix,
            policy: running::fast_policy(json!({
                "cache": {"queryRatePerSecond": RATE, "localCacheTtlSeconds": 30},
            })),
            spec_patch: json!({"compute": {"windowSeconds": WINDOW_MS / 1000}, "roles": {"query": {"replicas": 1}}}),
            roles: &["collector", "intake", "master", "slave", "query"],
            // A short lateness: answers become complete soon after the last window.
            env: &[
                ("BALLAST_WINDOW_GRACE", "1s"),
                ("BALLAST_LEASE", "5s"),
                ("BALLAST_LATENESS", "4s"),
                // The hour and the day to date after every window, not every minute.
                ("BALLAST_TO_DATE_EVERY", "2s"),
            ],
        })
        .await?;
        Ok(Self { run })
    }

    /// The port the running query pod serves on.
    async fn query_port(&self) -> anyhow::Result<u16> {
        Ok(self.run.query_port().await?)
    }

    async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        Ok(scenario::http_get_full(self.query_port().await?, path).await?)
    }

    async fn today(&self, merchant: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.get(&format!("/v1/merchants/{merchant}/today")).await?;
        Ok((response.code, serde_json::from_str(&response.body)?))
    }

    /// What every merchant's windows must hold: MariaDB over the raw rows.
    async fn expected(&mut self) -> anyhow::Result<BTreeMap<String, BTreeMap<i64, Metrics>>> {
        Ok(by_merchant(
            orders::expected(&mut self.run.db, &self.run.pipeline, WINDOW_MS, "TRUE").await?,
        ))
    }

    /// Waits until every merchant's answer holds exactly its expected windows;
    /// returns the answers.
    async fn until_golden(
        &self,
        want: &BTreeMap<String, BTreeMap<i64, Metrics>>,
        secs: u64,
    ) -> anyhow::Result<BTreeMap<String, Value>> {
        eventually("every merchant's today equal to MariaDB's", secs, || async {
            let mut answers = BTreeMap::new();
            for (merchant, windows) in want {
                let (code, answer) = self.today(merchant).await?;
                anyhow::ensure!(code == 200, "{merchant}: HTTP {code}: {answer}");
                let got = windows_of(&answer);
                if got.len() != windows.len()
                    || windows
                        .iter()
                        .any(|(w, m)| !got.get(w).is_some_and(|g| g.matches(m)))
                {
                    anyhow::bail!(
                        "{merchant}: {} windows answered, {} expected",
                        got.len(),
                        windows.len()
                    );
                }
                answers.insert(merchant.clone(), answer);
            }
            Ok(Some(answers))
        })
        .await
    }
}

impl Running {
    /// Puts an undecodable event in a window that has not closed yet: its
    /// task fails on every slave, and the master reports it as failing.
    async fn poison_next_window(&self) -> anyhow::Result<(i64, PoisonedWindow)> {
        let stack = ballast_e2e::Stack::discover();
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let start_ms = (now / WINDOW_MS + 2) * WINDOW_MS;
        let layout = ballast_worker::kv::Layout::new(&self.run.pipeline, WINDOW_MS);
        let merchant = format!("{}-poison", self.run.pipeline);
        let poisoned = PoisonedWindow::put(
            &stack.get("BALLAST_REDIS_KV_URL")?,
            layout.merchant_key(start_ms, &merchant),
            layout.window_key(start_ms),
            &merchant,
        )
        .await?;
        Ok((start_ms, poisoned))
    }
}

/// An answer's window series as (start, metrics).
fn windows_of(answer: &Value) -> BTreeMap<i64, Metrics> {
    points_of(&answer["windows"])
}

/// A series of points as (start, metrics).
fn points_of(series: &Value) -> BTreeMap<i64, Metrics> {
    series
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let metrics = Metrics::from_json(p["metrics"].as_object()?)?;
            Some((p["startMs"].as_i64()?, metrics))
        })
        .collect()
}

/// MariaDB's results by merchant, then span start.
fn by_merchant(all: BTreeMap<(i64, String), Metrics>) -> BTreeMap<String, BTreeMap<i64, Metrics>> {
    let mut out: BTreeMap<String, BTreeMap<i64, Metrics>> = BTreeMap::new();
    for ((start, merchant), metrics) in all {
        out.entry(merchant).or_default().insert(start, metrics);
    }
    out
}

/// The reason codes an answer gives.
fn reasons(answer: &Value) -> Vec<String> {
    answer["completeness"]["reasons"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["code"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn today_equals_mariadb_and_stays_golden_with_its_reason_through_store_failures() -> anyhow::Result<()>
{
    let mut p = Running::start("qs").await?;
    let _restore = scenario::RestoreStack;
    let mut stream = Orders::new(&p.run.pipeline.clone(), 12, 7);

    // Normal: every merchant's windows equal MariaDB's; the first read fills
    // the cache from MySQL, the next is served from the cache.
    // Two feeds, the second once the first's windows are answered: each
    // merchant's orders span windows, as the exact totals below need.
    p.run.feed(&mut stream).await?;
    let first_feed = p.expected().await?;
    p.until_golden(&first_feed, 90).await?;
    p.run.feed(&mut stream).await?;
    let want = p.expected().await?;
    let answers = p.until_golden(&want, 60).await?;
    let (merchant, first) = answers
        .iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no merchant"))?;
    let columns: Vec<&str> = first["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for column in ["gmv", "paying_users", "top_items", "_sql"] {
        anyhow::ensure!(columns.contains(&column), "{column} missing from {columns:?}");
    }
    let (_, again) = p.today(merchant).await?;
    anyhow::ensure!(again["source"] == "cache", "a second read: {}", again["source"]);
    // Complete once the newest window is past the lateness.
    eventually("a complete answer", 30, || async {
        let (_, answer) = p.today(merchant).await?;
        Ok((answer["completeness"]["status"] == "complete").then_some(()))
    })
    .await?;

    // Exact to date: each merchant's hours and day equal MariaDB's own
    // computation over all of their orders, for every column, the ones that
    // do not add up across windows too (distinct paying users, averages, top
    // items); the data makes sure summing windows would be wrong.
    let hours_want = by_merchant(orders::expected(&mut p.run.db, &p.run.pipeline, HOUR_MS, "TRUE").await?);
    let days_want = by_merchant(orders::expected(&mut p.run.db, &p.run.pipeline, DAY_MS, "TRUE").await?);
    // A merchant with paid orders in two windows: the sum of its windows'
    // average order values is not its day's average.
    let summed_avg = |m: &String| -> f64 { want[m].values().filter_map(|w| w.avg_order_value).sum() };
    anyhow::ensure!(
        days_want.iter().any(|(m, days)| days.values().any(|d| d
            .avg_order_value
            .is_some_and(|avg| (avg - summed_avg(m)).abs() > 1e-6))),
        "no merchant has paid orders in two windows: the check below would not tell sums from totals"
    );
    eventually(
        "every merchant's hours and day to date equal MariaDB's",
        60,
        || async {
            for merchant in want.keys() {
                let (_, answer) = p.today(merchant).await?;
                let hours = points_of(&answer["hours"]);
                let day = points_of(&Value::Array(vec![answer["day"].clone()]));
                for (got, want, what) in [(&hours, &hours_want, "hours"), (&day, &days_want, "day")] {
                    let want = want.get(merchant).cloned().unwrap_or_default();
                    anyhow::ensure!(
                        got.len() == want.len()
                            && want.iter().all(|(s, m)| got.get(s).is_some_and(|g| g.matches(m))),
                        "{merchant}: {what} {got:?}, MariaDB says {want:?}"
                    );
                }
            }
            Ok(Some(()))
        },
    )
    .await?;

    // The merchant page, in a real browser, shows the newest window's numbers.
    let port = p.query_port().await?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://127.0.0.1:{port}/?merchant={merchant}"))
        .await?;
    let newest = want
        .get(merchant)
        .and_then(|w| w.values().next_back())
        .ok_or_else(|| anyhow::anyhow!("{merchant}: no window expected"))?;
    let shown = |column: &'static str| {
        let browser = &browser;
        async move {
            browser
                .text(&format!("#latest tr[data-column='{column}'] td"))
                .await
        }
    };
    eventually("the page showing the newest window's numbers", 20, || async {
        let gmv = shown("gmv").await?;
        let users = shown("paying_users").await?;
        let want = (
            Some(newest.gmv.to_string()),
            Some(newest.paying_users.to_string()),
        );
        anyhow::ensure!(
            (&gmv, &users) == (&want.0, &want.1),
            "shown {gmv:?} {users:?}, expected {want:?}; the page reads {:?}",
            browser.text("body").await?
        );
        Ok(Some(()))
    })
    .await?;

    // Bad input: a 400 naming the problem, counted.
    let bad = p.get("/v1/merchants/m1'%20OR%20'1'='1/today").await?;
    anyhow::ensure!(bad.code == 400, "HTTP {}: {}", bad.code, bad.body);
    let body: Value = serde_json::from_str(&bad.body)?;
    anyhow::ensure!(body["error"] == "merchantCharacter", "{body}");
    let counted = scenario::metric(
        port,
        "ballast_query_bad_requests_total{reason=\"merchantCharacter\"}",
    )
    .await?;
    anyhow::ensure!(counted >= Some(1.0), "bad requests counted: {counted:?}");
    let openapi = p.get("/openapi.json").await?;
    let doc: Value = serde_json::from_str(&openapi.body)?;
    anyhow::ensure!(
        doc["paths"]["/v1/merchants/{merchant}/today"].is_object(),
        "OpenAPI document"
    );

    // A window whose computation keeps failing (an undecodable event in the
    // KV store): answers name it until a retry computes it.
    let (poisoned_ms, poisoned) = p.poison_next_window().await?;
    let failing = |merchant: String| {
        let p = &p;
        async move {
            let (_, answer) = p.today(&merchant).await?;
            Ok::<_, anyhow::Error>(
                answer["completeness"]["reasons"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["code"] == "windowFailing" && r["fromMs"] == poisoned_ms),
            )
        }
    };
    eventually("answers naming the failing window", 120, || async {
        Ok(failing(merchant.clone()).await?.then_some(()))
    })
    .await?;
    poisoned.repair().await?;
    eventually("answers no longer naming it once it computed", 120, || async {
        Ok((!failing(merchant.clone()).await?).then_some(()))
    })
    .await?;

    // The hot MySQL stops: answers come from the cache, golden, saying so; a
    // merchant the cache does not hold gets the 503 with the reason.
    stack_script(&["stop", "mysql-hot"])?;
    p.run.until_mode(Dependency::Mysql, Mode::Degraded).await?;
    let answers = p.until_golden(&want, 30).await?;
    for (merchant, answer) in &answers {
        anyhow::ensure!(answer["source"] == "cache", "{merchant}: {}", answer["source"]);
        anyhow::ensure!(
            reasons(answer).contains(&"cacheOnly".to_owned()),
            "{merchant}: {answer}"
        );
    }
    eventually(
        "the page's banner saying the answer is from the cache alone",
        20,
        || async {
            let reason = browser.text("#banner li[data-code='cacheOnly']").await?;
            Ok(reason.is_some_and(|r| r.contains("hot MySQL")).then_some(()))
        },
    )
    .await?;
    let (code, unknown) = p.today(&format!("{}-nobody", p.run.pipeline)).await?;
    anyhow::ensure!(
        code == 503 && unknown["error"] == "notCached" && unknown["covered"].is_string(),
        "{code} {unknown}"
    );
    stack_script(&["up"])?;
    p.run.until_mode(Dependency::Mysql, Mode::Normal).await?;

    // The cache stops: answers from MySQL and the in-process cache, golden;
    // over the rate, 429 at once with Retry-After; nothing waits past its deadline.
    stack_script(&["stop", "redis-cache"])?;
    p.run.until_mode(Dependency::Cache, Mode::Degraded).await?;
    let answers = p.until_golden(&want, 30).await?;
    for (merchant, answer) in &answers {
        let source = answer["source"].as_str().unwrap_or_default();
        anyhow::ensure!(matches!(source, "mysql" | "local-cache"), "{merchant}: {source}");
    }
    let burst: Vec<_> = (0..4 * RATE)
        .map(|i| {
            let path = format!("/v1/merchants/{}-m{i}-burst/today", p.run.pipeline);
            async move {
                let started = Instant::now();
                let response = scenario::http_get_full(port, &path).await;
                (response, started.elapsed())
            }
        })
        .collect();
    let mut limited = 0;
    for (response, took) in futures::future::join_all(burst).await {
        let response = response?;
        anyhow::ensure!(took < Duration::from_secs(2), "a request took {took:?}");
        match response.code {
            200 => {}
            429 => {
                limited += 1;
                anyhow::ensure!(
                    response.header("retry-after").is_some(),
                    "429 without Retry-After"
                );
            }
            other => anyhow::bail!("HTTP {other}: {}", response.body),
        }
    }
    anyhow::ensure!(
        limited > 0,
        "{} requests at once, none over a rate of {RATE}/s",
        4 * RATE
    );

    // The cache returns (empty: it keeps nothing across a restart). Every
    // merchant's first read now checks MySQL, paced at the rate: a burst of
    // every merchant at once reaches MySQL at most at that rate, the others
    // are answered from the cache unchecked or refused with Retry-After, and
    // every answer is golden again once the checks caught up.
    stack_script(&["up"])?;
    p.run.until_mode(Dependency::Cache, Mode::Normal).await?;
    let fills = "ballast_query_cache_fills_total";
    let before = scenario::metric(port, fills).await?.unwrap_or_default();
    let started = Instant::now();
    let burst: Vec<_> = want
        .keys()
        .map(|merchant| {
            let path = format!("/v1/merchants/{merchant}/today");
            async move { scenario::http_get_full(port, &path).await }
        })
        .collect();
    for response in futures::future::join_all(burst).await {
        let response = response?;
        anyhow::ensure!(
            response.code == 200 || (response.code == 429 && response.header("retry-after").is_some()),
            "HTTP {}: {}",
            response.code,
            response.body
        );
    }
    let checks = scenario::metric(port, fills).await?.unwrap_or_default() - before;
    // The limiter's burst is a tenth of a second's worth, at least one.
    let allowed = 1.0 + f64::from(RATE) * started.elapsed().as_secs_f64().ceil();
    anyhow::ensure!(
        checks <= allowed,
        "{checks} checks of MySQL for {} merchants at once; the rate allows {allowed}",
        want.len()
    );
    p.until_golden(&want, 60).await?;
    Ok(())
}
