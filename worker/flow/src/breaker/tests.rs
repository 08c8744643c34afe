//! The breaker's transitions, table by table, on a fake clock (milliseconds).

use super::*;

const fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn config() -> BreakerConfig {
    BreakerConfig {
        max_average: None,
        slow_call: None,
        max_slow_percent: None,
        max_error_percent: None,
        max_errors: None,
        minimum_calls: 1,
        window: ms(10_000),
        open: ms(2_000),
        half_open_calls: 2,
    }
}

/// One call at `at`: acquired, then finished after `took` with `failed`.
#[derive(Clone, Copy)]
struct Step {
    at: u64,
    took: u64,
    failed: bool,
}

const fn ok(at: u64, took: u64) -> Step {
    Step {
        at,
        took,
        failed: false,
    }
}
const fn fail(at: u64) -> Step {
    Step {
        at,
        took: 1,
        failed: true,
    }
}

/// Runs `steps` and returns, per step, the refusal's retry-after or the
/// transitions the call made (on acquire, then on record).
fn run(config: BreakerConfig, steps: &[Step]) -> (Vec<Result<Vec<Transition>, Duration>>, State) {
    let mut machine = Machine::new(config);
    let out = steps
        .iter()
        .map(|s| {
            let (ticket, on_acquire) = machine.acquire(ms(s.at))?;
            let call = Call {
                failed: s.failed,
                elapsed: ms(s.took),
            };
            let on_record = machine.record(ms(s.at + s.took), ticket, call);
            Ok(on_acquire.into_iter().chain(on_record).collect())
        })
        .collect();
    (out, machine.state())
}

/// The transition of the last step, after every earlier step made none.
fn last_only(config: BreakerConfig, steps: &[Step]) -> Option<Transition> {
    let (out, _) = run(config, steps);
    let (last, earlier) = out.split_last().expect("steps");
    for (i, e) in earlier.iter().enumerate() {
        assert_eq!(e, &Ok(vec![]), "step {i} of {} steps", steps.len());
    }
    last.clone().expect("admitted").first().copied()
}

#[test]
fn each_strategy_opens_a_closed_breaker_at_its_threshold_and_not_before() {
    let errors = BreakerConfig {
        max_errors: Some(3),
        ..config()
    };
    let ratio = BreakerConfig {
        max_error_percent: Some(50),
        minimum_calls: 4,
        ..config()
    };
    let slow = BreakerConfig {
        slow_call: Some(ms(100)),
        max_slow_percent: Some(50),
        minimum_calls: 2,
        ..config()
    };
    let average = BreakerConfig {
        max_average: Some(ms(100)),
        minimum_calls: 3,
        ..config()
    };
    let opened = |r| Some(Transition::Opened(r));
    #[rustfmt::skip]
    let table: &[(&str, BreakerConfig, &[Step], Option<Transition>)] = &[
        ("error count reached", errors, &[fail(0), fail(1), fail(2)], opened(Reason::ErrorCount)),
        ("error count one short", errors, &[fail(0), fail(1), ok(2, 1)], None),
        ("error ratio reached at the minimum volume", ratio, &[ok(0, 1), fail(5), ok(10, 1), fail(15)], opened(Reason::ErrorRatio)),
        ("error ratio under the minimum volume", ratio, &[fail(0), fail(5), fail(10)], None),
        ("error ratio below the share", ratio, &[ok(0, 1), ok(5, 1), ok(10, 1), fail(15)], None),
        ("slow-call ratio reached", slow, &[ok(0, 10), ok(20, 150)], opened(Reason::SlowCalls)),
        ("slow-call ratio: at the threshold is not slow", slow, &[ok(0, 10), ok(20, 100)], None),
        ("average response time over", average, &[ok(0, 50), ok(100, 50), ok(200, 300)], opened(Reason::AverageResponseTime)),
        ("average response time under", average, &[ok(0, 50), ok(100, 50), ok(200, 190)], None),
        ("no threshold never opens", config(), &[fail(0), fail(1), fail(2), fail(3)], None),
    ];
    for (name, config, steps, expected) in table {
        assert_eq!(last_only(*config, steps), *expected, "{name}");
    }
}

#[test]
fn failures_older_than_the_window_no_longer_count() {
    let errors = BreakerConfig {
        max_errors: Some(3),
        ..config()
    };
    #[rustfmt::skip]
    let table: &[(&str, &[Step], Option<Transition>)] = &[
        ("all three within 10 s", &[fail(0), fail(5_000), fail(9_000)], Some(Transition::Opened(Reason::ErrorCount))),
        ("the first slid out", &[fail(0), fail(5_000), fail(11_000)], None),
    ];
    for (name, steps, expected) in table {
        assert_eq!(last_only(errors, steps), *expected, "{name}");
    }
}

#[test]
fn an_open_breaker_refuses_until_its_open_period_then_lets_trial_calls_through() {
    let errors = BreakerConfig {
        max_errors: Some(1),
        ..config()
    };
    let (out, state) = run(errors, &[fail(0), ok(1_000, 1), ok(1_999, 1), ok(2_001, 1)]);
    assert_eq!(out[0], Ok(vec![Transition::Opened(Reason::ErrorCount)]));
    // Opened at 1 ms (the failure's end): refused until 2,001 ms.
    assert_eq!(out[1], Err(ms(1_001)));
    assert_eq!(out[2], Err(ms(2)));
    assert_eq!(out[3], Ok(vec![Transition::HalfOpened]));
    assert_eq!(
        state,
        State::HalfOpen {
            admitted: 1,
            succeeded: 1
        }
    );
}

#[test]
fn half_open_trials_close_the_breaker_when_all_succeed_and_reopen_it_on_any_failure_or_slow_one() {
    let base = BreakerConfig {
        max_errors: Some(1),
        slow_call: Some(ms(100)),
        ..config()
    };
    let closed = [Transition::Closed];
    #[rustfmt::skip]
    let table: &[(&str, &[Step], Vec<Transition>, State)] = &[
        ("two good trials close it", &[fail(0), ok(3_000, 10), ok(3_100, 10)], closed.to_vec(), State::Closed),
        ("a failed trial reopens it", &[fail(0), ok(3_000, 10), fail(3_100)],
            vec![Transition::Opened(Reason::TrialFailed)], State::Open { until: ms(5_101) }),
        ("a slow trial reopens it", &[fail(0), ok(3_000, 10), ok(3_100, 150)],
            vec![Transition::Opened(Reason::TrialFailed)], State::Open { until: ms(5_250) }),
    ];
    for (name, steps, expected, state) in table {
        let (out, end) = run(base, steps);
        assert_eq!(out.last(), Some(&Ok(expected.clone())), "{name}");
        assert_eq!(end, *state, "{name}");
    }
}

#[test]
fn a_closed_breaker_starts_with_an_empty_window() {
    let errors = BreakerConfig {
        max_errors: Some(2),
        half_open_calls: 1,
        ..config()
    };
    // Two failures open it; a good trial closes it; one more failure is not two.
    let (out, state) = run(errors, &[fail(0), fail(1), ok(3_000, 1), fail(3_010)]);
    assert_eq!(out[2], Ok(vec![Transition::HalfOpened, Transition::Closed]));
    assert_eq!(out[3], Ok(vec![]));
    assert_eq!(state, State::Closed);
}

#[test]
fn half_open_admits_only_its_trial_calls_and_an_abandoned_one_gives_its_slot_back() {
    let mut machine = Machine::new(BreakerConfig {
        max_errors: Some(1),
        ..config()
    });
    let (ticket, _) = machine.acquire(ms(0)).expect("closed");
    machine.record(
        ms(1),
        ticket,
        Call {
            failed: true,
            elapsed: ms(1),
        },
    );
    let first = machine.acquire(ms(3_000)).expect("first trial");
    let second = machine.acquire(ms(3_000)).expect("second trial");
    assert_eq!((first.0, second.0), (Ticket::Trial, Ticket::Trial));
    assert!(
        machine.acquire(ms(3_000)).is_err(),
        "a third trial while two are out"
    );
    machine.abandon(second.0);
    assert!(machine.acquire(ms(3_001)).is_ok(), "the abandoned trial's slot");
}

#[test]
fn a_call_recorded_after_the_state_it_started_in_changes_nothing() {
    let mut machine = Machine::new(BreakerConfig {
        max_errors: Some(1),
        ..config()
    });
    let (early, _) = machine.acquire(ms(0)).expect("closed");
    let (late, _) = machine.acquire(ms(0)).expect("closed");
    assert!(matches!(
        machine.record(
            ms(1),
            early,
            Call {
                failed: true,
                elapsed: ms(1)
            }
        ),
        Some(Transition::Opened(_))
    ));
    // The second call was let through while closed; it ends while open.
    assert_eq!(
        machine.record(
            ms(2),
            late,
            Call {
                failed: true,
                elapsed: ms(2)
            }
        ),
        None
    );
    assert_eq!(machine.state(), State::Open { until: ms(2_001) });
}

#[test]
fn tripped_needs_the_minimum_volume_whatever_the_figures() {
    let all = BreakerConfig {
        max_errors: Some(1),
        max_error_percent: Some(1),
        slow_call: Some(ms(1)),
        max_slow_percent: Some(1),
        max_average: Some(ms(1)),
        minimum_calls: 10,
        ..config()
    };
    let bad = Stats {
        calls: 9,
        failures: 9,
        slow: 9,
        elapsed_micros: 9_000_000,
    };
    assert_eq!(tripped(&bad, &all), None);
    assert_eq!(
        tripped(&Stats { calls: 10, ..bad }, &all),
        Some(Reason::ErrorCount)
    );
    assert_eq!(
        tripped(
            &Stats::default(),
            &BreakerConfig {
                minimum_calls: 0,
                ..all
            }
        ),
        None
    );
}
