//! `make bench`: the cost of one flow-control decision for each rule kind
//! (global, a listed caller, unlisted callers keyed, hot key keyed, a closed
//! breaker's acquire and record for one server of two), each beside a bare governor check in the
//! same run (direct for the global rule, keyed by `String` for the per-caller
//! and hot-key ones, which governor keys). A breaker is no rate limit: beside
//! bare governor it also has its own floor, the least any breaker that times
//! its calls does: two clock reads and one update under an uncontended lock.
//! Each figure is the median of 11 runs of 1,000,000 decisions on one thread,
//! in nanoseconds per decision; the limits are set high so every request is
//! admitted (the path every admitted request takes).

use std::hint::black_box;
use std::time::{Duration, Instant};

use ballast_flow::breaker::BreakerConfig;
use ballast_flow::{Breaker, Flow, GuardedDependency, Limit, Rules, Target};
use governor::{Quota, RateLimiter};
use prometheus_client::registry::Registry;

const N: u64 = 1_000_000;
const RUNS: usize = 11;
const KEYS: usize = 10_000;
const HIGH: u32 = 1_000_000_000;

fn median_ns(mut f: impl FnMut(u64)) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            for i in 0..N {
                f(i);
            }
            started.elapsed().as_nanos() as f64 / N as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn flow(rules: Rules) -> Flow {
    Flow::new(rules, &mut Registry::default())
}

fn main() {
    let high = Limit::per_second(HIGH);
    let quota = high.per_second;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("member-{i}")).collect();

    let bare_direct = RateLimiter::direct(Quota::per_second(quota));
    let bare = median_ns(|_| {
        black_box(bare_direct.check()).ok();
    });
    let bare_keyed_limiter = RateLimiter::<String, _, _>::dashmap(Quota::per_second(quota));
    let bare_keyed = median_ns(|i| {
        black_box(bare_keyed_limiter.check_key(&keys[i as usize % KEYS])).ok();
    });

    let clock = governor::clock::DefaultClock::default();
    let floor_state = std::sync::Mutex::new(0u64);
    let floor = median_ns(|_| {
        use governor::clock::{Clock, Reference};
        let started = clock.now();
        let elapsed = black_box(clock.now()).duration_since(started);
        *floor_state.lock().expect("uncontended") += elapsed.as_u64();
    });

    let global = flow(Rules {
        global: Some(high),
        ..Rules::default()
    });
    let global_ns = median_ns(|_| {
        black_box(global.admit("orders", None)).ok();
    });
    let caller = flow(Rules {
        callers: [("orders".to_owned(), high)].into(),
        ..Rules::default()
    });
    let caller_ns = median_ns(|_| {
        black_box(caller.admit("orders", None)).ok();
    });
    let unlisted = flow(Rules {
        unlisted_callers: Some(high),
        ..Rules::default()
    });
    let unlisted_ns = median_ns(|i| {
        black_box(unlisted.admit(&keys[i as usize % KEYS], None)).ok();
    });
    let hot = flow(Rules {
        hot_key: Some(high),
        ..Rules::default()
    });
    let hot_ns = median_ns(|i| {
        black_box(hot.admit("orders", Some(&keys[i as usize % KEYS]))).ok();
    });
    let config = BreakerConfig {
        max_average: Some(Duration::from_secs(1)),
        slow_call: Some(Duration::from_secs(1)),
        max_slow_percent: Some(50),
        max_error_percent: Some(50),
        max_errors: Some(1_000),
        minimum_calls: 10,
        window: Duration::from_secs(10),
        open: Duration::from_secs(30),
        half_open_calls: 3,
    };
    let breaker = flow(Rules {
        breakers: [(
            GuardedDependency::Mysql,
            Breaker {
                config,
                shadow: false,
            },
        )]
        .into(),
        ..Rules::default()
    });
    // One server of two (the member service's: each data centre's MySQL).
    let dc_a = Target::new(GuardedDependency::Mysql, "dc-a");
    let dc_b = Target::new(GuardedDependency::Mysql, "dc-b");
    if let Ok(call) = breaker.guard(dc_b) {
        call.finish(false);
    }
    let breaker_ns = median_ns(|_| {
        if let Ok(call) = black_box(breaker.guard(dc_a)) {
            call.finish(false);
        }
    });

    println!("flow-control decision cost, ns per decision, median of {RUNS} runs of {N}:");
    println!("{:<34} {:>8} {:>22} {:>8}", "rule", "ours", "baseline", "ratio");
    let row = |name: &str, ours: f64, base_name: &str, base: f64| {
        println!(
            "{name:<34} {ours:>8.1} {base_name:>14} {base:>7.1} {:>8.2}",
            base / ours
        );
    };
    row("global", global_ns, "bare direct", bare);
    row("listed caller", caller_ns, "bare direct", bare);
    row("listed caller", caller_ns, "bare keyed", bare_keyed);
    row("unlisted callers (keyed)", unlisted_ns, "bare keyed", bare_keyed);
    row("hot key (keyed, 10k keys)", hot_ns, "bare keyed", bare_keyed);
    row(
        "breaker closed (one server of two)",
        breaker_ns,
        "bare direct",
        bare,
    );
    row(
        "breaker closed (one server of two)",
        breaker_ns,
        "breaker floor",
        floor,
    );
    println!("targets: under 100 ns each; ratio (baseline / ours) at least 0.5");
}
