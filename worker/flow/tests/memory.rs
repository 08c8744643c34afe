//! The memory a keyed limit holds stays bounded however many distinct keys
//! arrive: 100,000 hot keys, at one instant and spread over time, measured
//! with a counting allocator.

use std::alloc::System;
use std::time::Duration;

use ballast_flow::{Flow, KEY_CAPACITY, Limit, Rules};
use governor::clock::FakeRelativeClock;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The stated bound: what one keyed limit may hold, whatever the keys.
const BOUND_BYTES: isize = 8 << 20;

fn held_bytes(region: &Region<'_, System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated
}

fn tracked(registry: &Registry) -> f64 {
    let mut text = String::new();
    encode(&mut text, registry).expect("encode");
    text.lines()
        .find(|l| l.starts_with("ballast_flow_tracked_keys{rule=\"hot_key\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

// One test: the allocator's counts are process-wide.
#[test]
fn a_hundred_thousand_distinct_hot_keys_stay_under_the_stated_bound_and_idle_ones_are_freed() {
    let clock = FakeRelativeClock::default();
    let mut registry = Registry::with_prefix("ballast");
    let rules = Rules {
        hot_key: Some(Limit::per_second(50)),
        ..Rules::default()
    };
    let flow = Flow::with_clock(rules, clock.clone(), KEY_CAPACITY, &mut registry);
    let keys: Vec<String> = (0..200_000).map(|i| format!("member-{i}")).collect();
    let region = Region::new(GLOBAL);

    // Twice the capacity at one instant: nothing is idle, so the state fills
    // to its capacity and further keys go untracked.
    for key in &keys {
        drop(flow.admit("c", Some(key)));
    }
    let at_once = held_bytes(&region);
    assert!(at_once < BOUND_BYTES, "200,000 keys at once hold {at_once} bytes");
    assert!(
        tracked(&registry) <= (KEY_CAPACITY + 1024) as f64,
        "tracked {}",
        tracked(&registry)
    );

    // 100,000 keys over ten seconds (10,000 a second): idle keys are pruned
    // each second, so about a second's keys are held.
    clock.advance(Duration::from_secs(2));
    for key in &keys[..100_000] {
        drop(flow.admit("c", Some(key)));
        clock.advance(Duration::from_micros(100));
    }
    let spread = held_bytes(&region);
    assert!(spread < BOUND_BYTES, "100,000 keys over 10 s hold {spread} bytes");
    assert!(
        tracked(&registry) <= 25_000.0,
        "tracked {} keys of the last second or two",
        tracked(&registry)
    );

    // Two idle seconds on, the next look frees them.
    clock.advance(Duration::from_secs(2));
    for _ in 0..2_048 {
        drop(flow.admit("c", Some("one-key")));
    }
    let idle = held_bytes(&region);
    assert!(
        tracked(&registry) <= 1.0,
        "tracked {} after the keys went idle",
        tracked(&registry)
    );
    assert!(idle < 256 << 10, "idle keys still hold {idle} bytes");
    println!("held bytes: {at_once} at once (200,000 keys), {spread} spread over 10 s, {idle} once idle");
}
