//! The flow as a whole on a fake clock: accuracy, independence of the rules,
//! shadow mode, reloads, concurrency, breakers through `guard`.

use super::*;
use crate::breaker::State;
use governor::clock::FakeRelativeClock;
use prometheus_client::encoding::text::encode;

fn flow(rules: Rules) -> (Flow<FakeRelativeClock>, FakeRelativeClock, Registry) {
    let clock = FakeRelativeClock::default();
    let mut registry = Registry::with_prefix("ballast");
    let flow = Flow::with_clock(rules, clock.clone(), KEY_CAPACITY, &mut registry);
    (flow, clock, registry)
}

/// Offers `per_second` requests a second, evenly spaced, for `seconds`, each
/// from `who(i)`; returns how many were admitted.
fn offer(
    flow: &Flow<FakeRelativeClock>,
    clock: &FakeRelativeClock,
    per_second: u64,
    seconds: u64,
    who: impl Fn(u64) -> (String, Option<String>),
) -> u64 {
    let step = Duration::from_nanos(1_000_000_000 / per_second);
    let mut admitted = 0;
    for i in 0..per_second * seconds {
        let (caller, key) = who(i);
        admitted += u64::from(flow.admit(&caller, key.as_deref()).is_ok());
        clock.advance(step);
    }
    admitted
}

fn metric(registry: &Registry, line_start: &str) -> f64 {
    let mut text = String::new();
    encode(&mut text, registry).expect("encode");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn over_ten_simulated_seconds_each_rate_admits_within_five_percent_of_itself() {
    for rate in [10, 1_000, 20_000] {
        let rules = Rules {
            global: Some(Limit::per_second(rate)),
            ..Rules::default()
        };
        let (flow, clock, _) = flow(rules);
        // Ten times the rate is offered.
        let admitted = offer(&flow, &clock, u64::from(rate) * 10, 10, |_| ("c".into(), None));
        let ratio = admitted as f64 / (f64::from(rate) * 10.0);
        assert!(
            (0.95..=1.05).contains(&ratio),
            "rate {rate}: admitted {admitted}, {ratio:.3} of the rate"
        );
    }
}

#[test]
fn per_caller_and_per_key_limits_are_independent_and_the_global_limit_caps_their_sum() {
    let rules = Rules {
        global: Some(Limit::per_second(1_000)),
        hot_key: Some(Limit::per_second(50)),
        callers: [
            ("a".to_owned(), Limit::per_second(100)),
            ("b".to_owned(), Limit::per_second(400)),
        ]
        .into(),
        ..Rules::default()
    };
    let (first, clock, _) = flow(rules.clone());
    // Caller a over many keys is held by its own 100/s; caller b on one key
    // by the key's 50/s, whatever a does. Interleaved, 2,000/s each.
    let mut admitted = [0u64; 2];
    let step = Duration::from_micros(250);
    for i in 0..40_000u64 {
        let (slot, caller, key) = if i % 2 == 0 {
            (0, "a", format!("m{i}"))
        } else {
            (1, "b", "hot".into())
        };
        admitted[slot] += u64::from(first.admit(caller, Some(&key)).is_ok());
        clock.advance(step);
    }
    let (a, b) = (admitted[0] as f64 / 1_000.0, admitted[1] as f64 / 500.0);
    assert!(
        (0.95..=1.05).contains(&a),
        "caller a: {} in 10 s of 100/s",
        admitted[0]
    );
    assert!(
        (0.95..=1.05).contains(&b),
        "the hot key: {} in 10 s of 50/s",
        admitted[1]
    );

    // Twenty unlisted callers on distinct keys, 2,000/s each: only the global 1,000/s holds them.
    let (sum, clock, _) = flow(rules);
    let admitted = offer(&sum, &clock, 40_000, 10, |i| {
        (format!("c{}", i % 20), Some(format!("k{i}")))
    });
    let ratio = admitted as f64 / 10_000.0;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "sum of twenty callers: {admitted} in 10 s of 1,000/s"
    );
}

#[test]
fn unlisted_callers_each_get_their_own_rate() {
    let rules = Rules {
        unlisted_callers: Some(Limit::per_second(10)),
        ..Rules::default()
    };
    let (flow, clock, _) = flow(rules);
    // Three unlisted callers at 1,000/s each: each admitted about 10/s.
    let admitted = offer(&flow, &clock, 3_000, 10, |i| (format!("c{}", i % 3), None));
    assert!(
        (285..=315).contains(&admitted),
        "three callers × 10/s × 10 s: {admitted}"
    );
}

#[test]
fn a_rule_in_shadow_mode_counts_what_it_would_refuse_and_refuses_nothing() {
    let rules = Rules {
        global: Some(Limit::per_second(10).shadowed()),
        ..Rules::default()
    };
    let (flow, clock, registry) = flow(rules);
    let admitted = offer(&flow, &clock, 100, 10, |_| ("c".into(), None));
    assert_eq!(admitted, 1_000, "shadow mode refuses nothing");
    let would = metric(
        &registry,
        "ballast_flow_decisions_total{rule=\"global\",subject=\"\",outcome=\"shadow_refused\"}",
    );
    assert!((890.0..=900.0).contains(&would), "would have refused {would}");
}

#[test]
fn a_refusal_names_its_rule_and_says_when_to_retry() {
    let rules = Rules {
        hot_key: Some(Limit::per_second(10)),
        callers: [("orders".to_owned(), Limit::per_second(10))].into(),
        ..Rules::default()
    };
    let (flow, _clock, registry) = flow(rules);
    assert!(flow.admit("orders", None).is_ok());
    let refusal = flow.admit("orders", None).err().expect("over the burst of 1");
    assert_eq!(refusal.refused, Refused::Caller("orders".into()));
    assert_eq!(refusal.retry_after, Duration::from_millis(100));
    assert!(flow.admit("other", Some("m1")).is_ok());
    let refusal = flow.admit("other", Some("m1")).err().expect("m1 twice at once");
    assert_eq!(refusal.refused, Refused::HotKey);
    let refused = "ballast_flow_decisions_total{rule=\"caller\",subject=\"orders\",outcome=\"refused\"}";
    assert_eq!(metric(&registry, refused), 1.0);
}

#[test]
fn a_reload_keeps_the_state_of_unchanged_rules_and_starts_changed_ones_afresh() {
    let before = Rules {
        global: Some(Limit::per_second(10)),
        hot_key: Some(Limit::per_second(10)),
        ..Rules::default()
    };
    let (flow, _clock, _) = flow(before.clone());
    assert!(flow.admit("c", Some("k")).is_ok());
    assert!(!flow.reload(before.clone()), "the same rules change nothing");
    // The global limit is unchanged: its spent token stays spent. The hot
    // key's rate changed: its state starts afresh.
    let after = Rules {
        hot_key: Some(Limit::per_second(20)),
        ..before
    };
    assert!(flow.reload(after.clone()));
    assert_eq!(flow.rules(), after);
    let refusal = flow
        .admit("c", None)
        .err()
        .expect("the global token was spent before the reload");
    assert_eq!(refusal.refused, Refused::Global);
    let shadowed = Rules {
        global: Some(Limit::per_second(10).shadowed()),
        ..after
    };
    assert!(flow.reload(shadowed));
    assert!(
        flow.admit("c", Some("k")).is_ok(),
        "shadow mode lets it through; the hot key is fresh"
    );
}

#[test]
fn the_concurrency_limit_counts_requests_until_their_admission_is_dropped() {
    let rules = Rules {
        concurrency: Some(Concurrency {
            max: std::num::NonZeroU32::new(2).expect("2"),
            shadow: false,
        }),
        ..Rules::default()
    };
    let (flow, _clock, _) = flow(rules.clone());
    let first = flow.admit("c", None).expect("1 of 2");
    let _second = flow.admit("c", None).expect("2 of 2");
    let refusal = flow.admit("c", None).err().expect("a third at once");
    assert_eq!(refusal.refused, Refused::Concurrency);
    assert_eq!(flow.in_flight(), 2, "a refused request is not in progress");
    drop(first);
    let _third = flow.admit("c", None).expect("a slot freed");
    // A reload does not forget the requests in progress.
    let mut shadowed = rules;
    shadowed.concurrency = shadowed.concurrency.map(|c| Concurrency { shadow: true, ..c });
    flow.reload(shadowed);
    assert_eq!(flow.in_flight(), 2);
    let _over = flow.admit("c", None).expect("shadow mode");
    assert_eq!(flow.in_flight(), 3);
}

fn breaker_rules(shadow: bool) -> Rules {
    let config = breaker::BreakerConfig {
        max_average: None,
        slow_call: Some(Duration::from_millis(100)),
        max_slow_percent: None,
        max_error_percent: None,
        max_errors: Some(3),
        minimum_calls: 3,
        window: Duration::from_secs(10),
        open: Duration::from_secs(2),
        half_open_calls: 1,
    };
    Rules {
        breakers: [(GuardedDependency::Mysql, Breaker { config, shadow })].into(),
        ..Rules::default()
    }
}

#[test]
fn an_open_breaker_refuses_at_once_naming_its_dependency_and_closes_after_a_good_trial() {
    let (flow, clock, registry) = flow(breaker_rules(false));
    for _ in 0..3 {
        flow.guard(GuardedDependency::Mysql).expect("closed").finish(true);
    }
    assert!(matches!(
        flow.breaker_state(GuardedDependency::Mysql),
        Some(State::Open { .. })
    ));
    let refusal = flow.guard(GuardedDependency::Mysql).err().expect("open");
    assert_eq!(
        refusal.refused,
        Refused::Breaker(GuardedDependency::Mysql, String::new())
    );
    assert_eq!(refusal.retry_after, Duration::from_secs(2));
    assert!(
        flow.guard(GuardedDependency::Redis).is_ok(),
        "no breaker on redis"
    );
    assert_eq!(
        metric(
            &registry,
            "ballast_flow_breaker_state{dependency=\"mysql\",server=\"\"}"
        ),
        1.0
    );
    clock.advance(Duration::from_secs(2));
    let trial = flow.guard(GuardedDependency::Mysql).expect("half-open");
    clock.advance(Duration::from_millis(10));
    trial.finish(false);
    assert_eq!(flow.breaker_state(GuardedDependency::Mysql), Some(State::Closed));
    let opened = "ballast_flow_breaker_transitions_total{dependency=\"mysql\",server=\"\",to=\"open\",reason=\"error_count\"}";
    assert_eq!(metric(&registry, opened), 1.0);
}

#[test]
fn each_server_of_a_dependency_has_its_own_breaker_under_the_one_rule() {
    let (flow, clock, registry) = flow(breaker_rules(false));
    let dc_a = Target::new(GuardedDependency::Mysql, "dc-a");
    let dc_b = Target::new(GuardedDependency::Mysql, "dc-b");
    flow.guard(dc_a).expect("closed").finish(false);
    for _ in 0..3 {
        flow.guard(dc_b).expect("closed").finish(true);
    }
    assert!(matches!(flow.breaker_state(dc_b), Some(State::Open { .. })));
    let refusal = flow.guard(dc_b).err().expect("dc-b's breaker is open");
    assert_eq!(
        refusal.refused,
        Refused::Breaker(GuardedDependency::Mysql, "dc-b".into())
    );
    assert!(
        refusal.to_string().starts_with("mysql dc-b is unavailable"),
        "{refusal}"
    );
    // dc-a's calls go on, and its breaker counts only its own failures.
    for _ in 0..2 {
        flow.guard(dc_a).expect("dc-a is closed").finish(true);
    }
    assert_eq!(flow.breaker_state(dc_a), Some(State::Closed));
    assert_eq!(
        flow.breaker_state(GuardedDependency::Mysql),
        Some(State::Closed),
        "a server not called yet is closed"
    );
    let state = |server: &str| {
        metric(
            &registry,
            &format!("ballast_flow_breaker_state{{dependency=\"mysql\",server=\"{server}\"}}"),
        )
    };
    assert_eq!((state("dc-a"), state("dc-b")), (0.0, 1.0));
    // A reload with new thresholds closes every server's breaker, and says so.
    let mut changed = breaker_rules(false);
    if let Some(b) = changed.breakers.get_mut(&GuardedDependency::Mysql) {
        b.config.max_errors = Some(5);
    }
    flow.reload(changed);
    assert_eq!(flow.breaker_state(dc_b), Some(State::Closed));
    assert_eq!(state("dc-b"), 0.0);
    clock.advance(Duration::from_millis(1));
    flow.guard(dc_b).expect("closed under the new rule").finish(false);
}

#[test]
fn a_breaker_in_shadow_mode_lets_calls_through_while_open_and_counts_them() {
    let (flow, _clock, registry) = flow(breaker_rules(true));
    for _ in 0..3 {
        flow.guard(GuardedDependency::Mysql).expect("closed").finish(true);
    }
    assert!(matches!(
        flow.breaker_state(GuardedDependency::Mysql),
        Some(State::Open { .. })
    ));
    flow.guard(GuardedDependency::Mysql)
        .expect("shadow mode")
        .finish(true);
    let shadow =
        "ballast_flow_decisions_total{rule=\"breaker\",subject=\"mysql\",outcome=\"shadow_refused\"}";
    assert_eq!(metric(&registry, shadow), 1.0);
}

#[test]
fn a_reload_keeps_an_open_breaker_open_unless_its_thresholds_changed() {
    let (flow, _clock, _) = flow(breaker_rules(false));
    for _ in 0..3 {
        flow.guard(GuardedDependency::Mysql).expect("closed").finish(true);
    }
    let mut shadowed = breaker_rules(true);
    flow.reload(shadowed.clone());
    assert!(
        matches!(
            flow.breaker_state(GuardedDependency::Mysql),
            Some(State::Open { .. })
        ),
        "same thresholds"
    );
    if let Some(b) = shadowed.breakers.get_mut(&GuardedDependency::Mysql) {
        b.config.max_errors = Some(5);
    }
    flow.reload(shadowed);
    assert_eq!(
        flow.breaker_state(GuardedDependency::Mysql),
        Some(State::Closed),
        "new thresholds"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_past_its_deadline_is_a_failure_and_the_breaker_then_fails_calls_without_making_them() {
    let (flow, _clock, _) = flow(breaker_rules(false));
    for _ in 0..3 {
        let hang = std::future::pending::<Result<(), std::io::Error>>();
        let result = flow
            .call(GuardedDependency::Mysql, Duration::from_millis(50), hang)
            .await;
        assert!(matches!(result, Err(CallError::TimedOut { .. })), "{result:?}");
    }
    let mut made = false;
    let result = flow
        .call(GuardedDependency::Mysql, Duration::from_millis(50), async {
            made = true;
            Ok::<_, std::io::Error>(())
        })
        .await;
    assert!(matches!(result, Err(CallError::Refused(_))), "{result:?}");
    assert!(!made, "an open breaker does not make the call");
}
