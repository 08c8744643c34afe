//! History from the cold store, through the query service the operator runs:
//! daily rollups (written as the nightly job writes them, from MariaDB's own
//! computation over raw orders of past days) answer filtered, grouped,
//! aggregated, sorted and limited requests exactly as MariaDB computes them
//! over the raw rows; shed and hourly-only days are named on the answers;
//! bad input is a 400 naming the problem, counted; and while Elasticsearch
//! is stopped every history request is a 503 within its deadline while the
//! today answers go on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_e2e::browser::Browser;
use ballast_e2e::orders::{self, Metrics, Orders};
use ballast_e2e::running::{self, Launch, RunningPipeline};
use ballast_e2e::scenario::{self, HttpResponse};
use ballast_e2e::{Stack, stack_script};
use ballast_worker::cold::{ColdStore, Day, Rollup};
use ballast_worker::results::cache::DAY_MS;
use elasticsearch::params::Refresh;
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};

/// Days of past orders.
const DAYS: i32 = 40;
/// Deadline of each cold store call, as the query pods get it.
const COLD_DEADLINE: Duration = Duration::from_secs(1);

struct History {
    run: RunningPipeline,
    /// The table of past orders.
    table: String,
    from: Day,
    to: Day,
}

impl History {
    async fn get(&self, path: &str) -> anyhow::Result<HttpResponse> {
        Ok(scenario::http_get_full(self.run.query_port().await?, path).await?)
    }

    /// A history answer for `merchant` over the whole range, with `query` appended.
    async fn history(&self, merchant: &str, query: &str) -> anyhow::Result<(u16, Value)> {
        // As a browser sends them: `<` and `>` are not allowed in a request line.
        let query = query.replace('<', "%3C").replace('>', "%3E");
        let response = self
            .get(&format!(
                "/v1/merchants/{merchant}/history?from={}&to={}{query}",
                self.from, self.to
            ))
            .await?;
        Ok((response.code, serde_json::from_str(&response.body)?))
    }

    /// MariaDB over the raw rows: `select` grouped by `group` over each day's
    /// metrics of `merchant` (a derived table `days` with columns d, gmv,
    /// orders, paying_users, aov), as JSON rows.
    async fn mariadb(&mut self, merchant: &str, select: &str, rest: &str) -> anyhow::Result<Vec<Vec<Value>>> {
        let sql = format!(
            "SELECT {select} FROM (SELECT DATE(created_at) d, \
               CAST(SUM(IF(status = 'paid', amount, 0)) AS SIGNED) gmv, COUNT(*) orders, \
               COUNT(DISTINCT IF(status = 'paid', user_id, NULL)) paying_users, \
               SUM(IF(status = 'paid', amount, 0)) * 1e0 / NULLIF(SUM(status = 'paid'), 0) aov \
             FROM {} WHERE merchant_id = ? GROUP BY d) days {rest}",
            self.table
        );
        let rows: Vec<mysql_async::Row> = self.run.db.exec(sql, (merchant,)).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.unwrap()
                    .into_iter()
                    .map(|v| match v {
                        mysql_async::Value::Int(i) => json!(i),
                        mysql_async::Value::UInt(u) => json!(u),
                        mysql_async::Value::Float(f) => json!(f),
                        mysql_async::Value::Double(f) => json!(f),
                        mysql_async::Value::Bytes(b) => {
                            let text = String::from_utf8_lossy(&b).into_owned();
                            text.parse::<i64>()
                                .map(Value::from)
                                .or_else(|_| text.parse::<f64>().map(Value::from))
                                .unwrap_or(Value::String(text))
                        }
                        mysql_async::Value::Date(y, m, d, ..) => json!(format!("{y:04}-{m:02}-{d:02}")),
                        other => json!(format!("{other:?}")),
                    })
                    .collect()
            })
            .collect())
    }
}

/// The answer's rows as `[key, values...]` in the order of `columns`.
fn answered(answer: &Value, columns: &[&str]) -> Vec<Vec<Value>> {
    answer["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            std::iter::once(row["key"].clone())
                .chain(columns.iter().map(|c| row["values"][*c].clone()))
                .collect()
        })
        .collect()
}

/// Equal, numbers within a relative 1e-9 (engines round averages differently).
fn same(got: &[Vec<Value>], want: &[Vec<Value>]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.len() == w.len()
                && g.iter().zip(w).all(|(a, b)| match (a.as_f64(), b.as_f64()) {
                    (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                    _ => a == b,
                })
        })
}

async fn start() -> anyhow::Result<History> {
    let run = RunningPipeline::start(Launch {
        prefix: "hist",
        policy: running::fast_policy(json!({})),
        spec_patch: json!({"roles": {"query": {"replicas": 1}}}),
        roles: &["collector", "intake", "master", "slave", "query"],
        env: &[("BALLAST_COLD_DEADLINE", "1s")],
    })
    .await?;
    let today = Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond());
    Ok(History {
        table: format!("past_{}", run.pipeline.replace('-', "_")),
        from: Day(today.0 - DAYS),
        to: Day(today.0 - 1),
        run,
    })
}

/// Orders of the past days in their own table (the pipeline does not read
/// it), their daily metrics by MariaDB written as rollups, as the nightly
/// job writes them: `shed` days for the first merchant, one hourly-only day.
async fn past_days(h: &mut History, shed: &[Day], hourly_only: Day) -> anyhow::Result<Vec<String>> {
    let table = h.table.clone();
    let batch: Vec<(orders::Order, String)> = Orders::new(&h.run.pipeline, 3, 41)
        .batch(1_500)
        .into_iter()
        .enumerate()
        // Every third day of the first merchant has no orders: no rollup, no row.
        .filter(|(i, o)| !(o.merchant.ends_with("-m0") && (i % DAYS as usize) % 3 == 2))
        .map(|(i, o)| (o, Day(h.from.0 + (i % DAYS as usize) as i32).to_string()))
        .collect();
    orders::insert_past(&mut h.run.db, &table, &batch).await?;
    let daily: BTreeMap<(i64, String), Metrics> =
        orders::expected_in(&mut h.run.db, &table, &h.run.pipeline, DAY_MS, "TRUE").await?;
    let stack = Stack::discover();
    let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_COLD_URL")?, None)?;
    let store = ColdStore::new(es, &format!("{}-daily", h.run.pipeline), Duration::from_secs(10));
    store.install_template().await?;
    let first = format!("{}-m0", h.run.pipeline);
    let rollups: Vec<Rollup> = daily
        .iter()
        .map(|((start_ms, merchant), metrics)| {
            let day = Day::of_ms(*start_ms);
            Rollup {
                merchant: merchant.clone(),
                day,
                shed: *merchant == first && shed.contains(&day),
                hourly_only: day == hourly_only,
                metrics: metrics.to_json(),
            }
        })
        .collect();
    // One bulk request, visible to searches before the first request.
    store.write_all(&rollups, Refresh::WaitFor).await?;
    Ok((0..3).map(|m| format!("{}-m{m}", h.run.pipeline)).collect())
}

#[tokio::test]
async fn history_equals_mariadb_over_the_raw_rows_names_partial_days_and_refuses_within_its_deadline_while_es_is_down()
-> anyhow::Result<()> {
    let mut h = start().await?;
    let shed = [Day(h.from.0 + 3), Day(h.from.0 + 4), Day(h.from.0 + 9)];
    let hourly_only = Day(h.from.0 + 20);
    let merchants = past_days(&mut h, &shed, hourly_only).await?;
    let (first, second) = (&merchants[0], &merchants[1]);

    // Each day's row as the rollup holds it: MariaDB's metrics of that day.
    let (code, days) = h.history(second, "&limit=1000").await?;
    anyhow::ensure!(code == 200, "HTTP {code}: {days}");
    assert_eq!(days["source"], "elasticsearch");
    assert_eq!(
        days["asOfMs"],
        json!(Day(h.to.0 + 1).start_ms()),
        "the newest day included"
    );
    let table = h.table.clone();
    let daily: BTreeMap<(i64, String), Metrics> =
        orders::expected_in(&mut h.run.db, &table, &h.run.pipeline, DAY_MS, "TRUE")
            .await?
            .into_iter()
            .filter(|((_, merchant), _)| merchant == second)
            .collect();
    let got: Vec<(i64, Option<Metrics>)> = days["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let day = r["key"].as_str().and_then(Day::parse).map_or(0, Day::start_ms);
            (day, r["values"].as_object().and_then(Metrics::from_json))
        })
        .collect();
    assert_eq!(got.len(), daily.len(), "one row per day with orders");
    for ((day, metrics), ((want_day, _), want)) in got.iter().zip(&daily) {
        assert_eq!(day, want_day);
        assert!(
            metrics.as_ref().is_some_and(|m| m.matches(want)),
            "{day}: {metrics:?} != {want:?}"
        );
    }

    // By week: sums, a count and the greatest daily distinct users.
    let (code, weeks) = h
        .history(
            first,
            "&groupBy=week&aggregate=sum:gmv&aggregate=sum:orders&aggregate=count&aggregate=max:paying_users",
        )
        .await?;
    anyhow::ensure!(code == 200, "HTTP {code}: {weeks}");
    let want = h
        .mariadb(
            first,
            "DATE_SUB(d, INTERVAL WEEKDAY(d) DAY) w, SUM(gmv), SUM(orders), COUNT(*), MAX(paying_users)",
            "GROUP BY w ORDER BY w",
        )
        .await?;
    let got = answered(&weeks, &["sum_gmv", "sum_orders", "count", "max_paying_users"]);
    assert!(same(&got, &want), "weeks:\n got {got:?}\nwant {want:?}");

    // Filtered in the cold store, by month, greatest first, limited.
    let (code, months) = h
        .history(
            second,
            "&where=gmv>=150000&where=orders<20&groupBy=month&aggregate=sum:gmv&aggregate=avg:avg_order_value\
             &sort=sum_gmv:desc&limit=1",
        )
        .await?;
    anyhow::ensure!(code == 200, "HTTP {code}: {months}");
    let want = h
        .mariadb(
            second,
            "DATE_FORMAT(d, '%Y-%m') mo, SUM(gmv) s, AVG(aov)",
            "WHERE gmv >= 150000 AND orders < 20 GROUP BY mo ORDER BY s DESC, mo LIMIT 1",
        )
        .await?;
    let got = answered(&months, &["sum_gmv", "avg_avg_order_value"]);
    assert!(!want.is_empty(), "the filter keeps some days");
    assert!(same(&got, &want), "months:\n got {got:?}\nwant {want:?}");

    // Shed and hourly-only days are named, each run of days as one range;
    // a merchant never shed is complete but for the hourly-only day.
    let reasons = |answer: &Value| -> Vec<(String, String, String)> {
        answer["completeness"]["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let day = |ms: &Value| ms.as_i64().map(Day::of_ms).unwrap_or(Day(0));
                (
                    r["code"].as_str().unwrap_or_default().to_owned(),
                    day(&r["fromMs"]).to_string(),
                    Day(day(&r["toMs"]).0 - 1).to_string(),
                )
            })
            .collect()
    };
    let first_days: std::collections::BTreeSet<Day> = h
        .mariadb(first, "d", "")
        .await?
        .into_iter()
        .filter_map(|r| r[0].as_str().and_then(Day::parse))
        .collect();
    let shed_days: Vec<Day> = shed.iter().copied().filter(|d| first_days.contains(d)).collect();
    anyhow::ensure!(shed_days.len() >= 2, "the shed days have orders: {shed_days:?}");
    assert_eq!(weeks["completeness"]["status"], "partial");
    let named = reasons(&weeks);
    for day in &shed_days {
        assert!(
            named.iter().any(|(code, from, to)| code == "merchantShed"
                && Day::parse(from).is_some_and(|f| f <= *day)
                && Day::parse(to).is_some_and(|t| t >= *day)),
            "shed day {day} not named in {named:?}"
        );
    }
    let (_, third) = h.history(&merchants[2], "&where=gmv>0").await?;
    assert_eq!(
        reasons(&third),
        vec![(
            "hourlyOnly".to_owned(),
            hourly_only.to_string(),
            hourly_only.to_string()
        )],
        "only the hourly-only day: {third}"
    );
    let (_, five) = h.history(&merchants[2], "&where=gmv>0&limit=5").await?;
    assert_eq!(
        five["rows"].as_array().map(Vec::len),
        Some(5),
        "limited to five rows"
    );

    // Bad input: a 400 naming the problem, counted by reason.
    let bad = [
        (
            format!("/v1/merchants/{first}/history?from={}&to={}", h.to, h.from),
            "reversedRange",
        ),
        (
            format!(
                "/v1/merchants/{first}/history?from={}&to={}",
                h.from,
                Day(h.to.0 + 1)
            ),
            "rangeNotClosed",
        ),
        (
            format!("/v1/merchants/{first}/history?from=2024-01-01&to={}", h.to),
            "rangeTooLong",
        ),
        (
            format!(
                "/v1/merchants/{first}/history?from={}&to={}&where=nope%3E1",
                h.from, h.to
            ),
            "unknownColumn",
        ),
        (
            format!(
                "/v1/merchants/{first}/history?from={}&to={}&where=gmv%3E1%7D%7D,%7B%22match_all%22:%7B%7D%7D",
                h.from, h.to
            ),
            "notANumber",
        ),
        (
            format!(
                "/v1/merchants/{first}/history?from={}&to={}&aggregate=sum:top_items",
                h.from, h.to
            ),
            "notNumeric",
        ),
        (
            format!("/v1/merchants/{first}/history?from=yesterday&to={}", h.to),
            "malformedDate",
        ),
        (
            format!(
                "/v1/merchants/m%27%20OR%201=1/history?from={}&to={}",
                h.from, h.to
            ),
            "merchantCharacter",
        ),
    ];
    for (path, code) in &bad {
        let response = h.get(path).await?;
        let body: Value = serde_json::from_str(&response.body)?;
        assert_eq!(
            (response.code, body["error"].as_str()),
            (400, Some(*code)),
            "{path}: {body}"
        );
    }
    let metrics = h.get("/metrics").await?.body;
    assert!(
        metrics.contains(r#"ballast_query_bad_requests_total{reason="notANumber"} 1"#),
        "bad input counted by reason:\n{metrics}"
    );

    // The merchant page, in a real browser, shows the last 30 days (the
    // newest is yesterday) and says the history is partial, and why.
    let browser = Browser::start().await?;
    browser
        .goto(&format!(
            "http://127.0.0.1:{}/?merchant={second}",
            h.run.query_port().await?
        ))
        .await?;
    let yesterday = daily
        .values()
        .next_back()
        .ok_or_else(|| anyhow::anyhow!("no day expected"))?
        .gmv
        .to_string();
    scenario::eventually(
        "the page showing yesterday's gmv and the hourly-only day",
        20,
        || async {
            let gmv = browser
                .text("#history tr[data-column='gmv'] td:last-child")
                .await?;
            let day = browser
                .text("#history tr[data-column='day'] td:last-child")
                .await?;
            let reason = browser.text("#history-banner li[data-code='hourlyOnly']").await?;
            Ok::<_, anyhow::Error>(
                (gmv.as_deref() == Some(yesterday.as_str())
                    && day.as_deref() == Some(h.to.to_string().as_str())
                    && reason.is_some())
                .then_some(()),
            )
        },
    )
    .await?;

    // Elasticsearch stopped: every history request is a 503 within its
    // deadline (before the operator publishes the mode, and after), and the
    // today answers go on.
    stack_script(&["stop", "es-cold"])?;
    let stopped = Instant::now();
    let mut published = false;
    while stopped.elapsed() < Duration::from_secs(60) && !published {
        let asked = Instant::now();
        let (code, body) = h.history(second, "&groupBy=month&aggregate=sum:gmv").await?;
        let took = asked.elapsed();
        assert_eq!(code, 503, "{body}");
        assert!(
            took < COLD_DEADLINE * 2 + Duration::from_millis(500),
            "answered after {took:?}"
        );
        assert!(
            body["covered"].as_str().is_some_and(|c| c.contains("today")),
            "{body}"
        );
        published = body["error"] == "coldUnavailable";
        let today = h.get(&format!("/v1/merchants/{second}/today")).await?;
        assert_eq!(today.code, 200, "today is answered while the cold store is down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        published,
        "the operator published the cold store Degraded within a minute"
    );
    stack_script(&["up"])?;
    let mut answered_again = false;
    let back = Instant::now();
    while !answered_again && back.elapsed() < Duration::from_secs(180) {
        answered_again = h.history(second, "&groupBy=month&aggregate=sum:gmv").await?.0 == 200;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        answered_again,
        "history answered again within 3 minutes of Elasticsearch's return"
    );
    Ok(())
}
