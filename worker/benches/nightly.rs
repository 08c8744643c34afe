//! `make bench`: the nightly job.
//! (a) Rollup throughput in merchant-days per second: days of day results
//!     read from the hot MySQL, rolled and bulk-written to Elasticsearch by
//!     the job's own path, against a raw bulk index of the same documents
//!     (built beforehand) by the same client, in the same run; medians of 3.
//! (b) The precomputed hit rate on a held-out day of a synthetic query log:
//!     1,000 merchants over 30 days; 70 % of them ask one relative range
//!     ("the last 7 days", or "the last 30 days by week") on 80 % of days,
//!     every merchant also asks one-off fixed ranges on 30 % of days; the
//!     job learns from days 1-29 (3 queries per merchant), day 30 is asked.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_e2e::Stack;
use ballast_worker::cold::{ColdStore, Day, log};
use ballast_worker::compute::MerchantResult;
use ballast_worker::results::hot::HotStore;
use ballast_worker::results::{Granularity, Slot};
use ballast_worker::roles::nightly::{learn, rollup};
use elasticsearch::BulkParts;
use elasticsearch::http::request::JsonBody;
use elasticsearch::params::Refresh;
use serde_json::{Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PIPELINE: &str = "bench-nightly";
const MERCHANTS: usize = 2_000;
const DAYS: i32 = 5;
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// xorshift64*: a deterministic synthetic log.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

fn pairs(from: Day, to: Day, rest: &str) -> Vec<(String, String)> {
    let mut out = vec![
        ("from".to_owned(), from.to_string()),
        ("to".to_owned(), to.to_string()),
    ];
    out.extend(
        rest.split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    out
}

/// One day's requests of the synthetic log: (merchant, normalised key).
fn asked_on(rng: &mut Rng, today: Day) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in 0..1_000u64 {
        let merchant = format!("m{m}");
        let repeats = m % 10 < 7;
        if repeats && rng.next(10) < 8 {
            let request = if m % 2 == 0 {
                pairs(Day(today.0 - 7), Day(today.0 - 1), "groupBy=day")
            } else {
                pairs(
                    Day(today.0 - 30),
                    Day(today.0 - 1),
                    "groupBy=week&aggregate=sum:gmv",
                )
            };
            out.extend(log::normalize(&request, today).map(|k| (merchant.clone(), k)));
        }
        if rng.next(10) < 3 {
            // A fixed range somewhere in the last year.
            let start = Day(today.0 - 30 - i32::try_from(rng.next(300)).unwrap_or(0));
            let request = pairs(start, Day(start.0 + 6), "groupBy=day");
            out.extend(log::normalize(&request, today).map(|k| (merchant.clone(), k)));
        }
    }
    out
}

fn hit_rate() -> (f64, usize) {
    let mut rng = Rng(0x0BA1_1A57);
    let last = Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond());
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for back in (1..30).rev() {
        for asked in asked_on(&mut rng, Day(last.0 - back)) {
            *counts.entry(asked).or_default() += 1;
        }
    }
    let picked = learn::pick(
        counts
            .into_iter()
            .map(|((merchant, key), count)| learn::Asked {
                merchant,
                key,
                count,
                took_ms: 1.0,
            })
            .collect(),
        3,
    );
    let held_out = asked_on(&mut rng, last);
    let hits = held_out
        .iter()
        .filter(|(m, k)| picked.get(m).is_some_and(|keys| keys.contains(k)))
        .count();
    (hits as f64 / held_out.len() as f64, held_out.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&stack.get("BALLAST_MYSQL_HOT_URL")?)?);
    let hot = HotStore::new(pool, "ballast_bench_nightly", 2, 4);
    hot.ensure_schema().await?;
    let today = Day::of_ms(k8s_openapi::jiff::Timestamp::now().as_millisecond());
    let days: Vec<Day> = (1..=DAYS).map(|back| Day(today.0 - back)).collect();
    for day in &days {
        let results: Vec<MerchantResult> = (0..MERCHANTS)
            .map(|m| MerchantResult {
                merchant_id: format!("bench-m{m}"),
                metrics: json!({"gmv": 100 * m + day.0 as usize % 97, "orders": 7, "paying_users": 4,
                                "avg_order_value": 1234.5, "top_items": "item-1,item-2", "_sql": "s"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            })
            .collect();
        let slot = Slot {
            pipeline: PIPELINE.into(),
            granularity: Granularity::Day,
            window_start_ms: day.start_ms(),
        };
        hot.write(&slot, 1, &results).await?;
    }
    let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_COLD_URL")?, None)?;
    let store = ColdStore::new(es.clone(), "bench-nightly-daily", Duration::from_secs(60));
    store.install_template().await?;

    // The raw baseline's documents, built before it is timed.
    let mut raw_bodies: Vec<Vec<Value>> = Vec::new();
    for day in &days {
        let results = hot.read_day(PIPELINE, day.start_ms()).await?;
        let rollups = rollup::rollups(*day, &results, 3_600_000, |_| false);
        for chunk in rollups.chunks(2_000) {
            raw_bodies.push(
                chunk
                    .iter()
                    .flat_map(|r| {
                        let action = json!({"index": {"_index": store.index_of(r.day),
                            "_id": ColdStore::id(&r.merchant, r.day), "routing": r.merchant}});
                        [action, ColdStore::document(r)]
                    })
                    .collect(),
            );
        }
    }
    let merchant_days = (MERCHANTS * days.len()) as f64;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let started = Instant::now();
        for day in &days {
            let results = hot.read_day(PIPELINE, day.start_ms()).await?;
            let rollups = rollup::rollups(*day, &results, 3_600_000, |_| false);
            for chunk in rollups.chunks(2_000) {
                store.write_all(chunk, Refresh::False).await?;
            }
        }
        ours.push(merchant_days / started.elapsed().as_secs_f64());
        let started = Instant::now();
        for body in &raw_bodies {
            let body: Vec<JsonBody<Value>> = body.iter().cloned().map(JsonBody::new).collect();
            let response = es.bulk(BulkParts::None).body(body).send().await?;
            anyhow::ensure!(response.status_code().is_success(), "raw bulk failed");
        }
        raw.push(merchant_days / started.elapsed().as_secs_f64());
    }
    let (ours, raw) = (median(ours), median(raw));
    let (rate, asked) = hit_rate();
    println!("nightly bench ({MERCHANTS} merchants x {DAYS} days, medians of {RUNS} runs)");
    println!("rollup (hot MySQL read + rollup + bulk): {ours:>10.0} merchant-days/s");
    println!("raw ES bulk of the same documents:       {raw:>10.0} merchant-days/s");
    println!("rollup / raw bulk: {:.2}", ours / raw);
    println!(
        "precomputed hit rate on a held-out day: {:.1} % of {asked} cold requests \
         (70 % of merchants repeat one relative range on 80 % of days; every merchant asks \
         a one-off fixed range on 30 % of days; 3 queries precomputed per merchant)",
        rate * 100.0
    );
    Ok(())
}
