//! Unit tests of the task table: dispatch, failures, departed slaves, hangs and resumption.

use super::*;

const W: i64 = 60_000;

fn loads(names: &[&str]) -> BTreeMap<String, SlaveView> {
    names
        .iter()
        .map(|n| {
            (
                (*n).to_owned(),
                SlaveView {
                    slots: 1,
                    ..SlaveView::default()
                },
            )
        })
        .collect()
}

fn table(term: u64) -> Table {
    Table::restore(Snapshot::default(), term, 0, FaultPolicy::default())
}

fn window(start_ms: i64) -> TaskKey {
    TaskKey {
        kind: Kind::Window,
        start_ms,
        partition: 0,
        pinned: None,
    }
}

fn live(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn empty_windows_pass_without_a_task_and_the_next_window_advances() {
    let mut t = table(1);
    t.plan_window(0, W, 0, 1);
    assert_eq!(t.open(), 0);
    assert_eq!(t.next_window_ms(), W);
    t.plan_window(W, 2 * W, 250_000, 3);
    assert_eq!(t.open(), 3, "one task per partition");
    assert_eq!(t.oldest_open_ms(), W);
}

#[test]
fn tasks_spread_over_slaves_with_rising_versions_up_to_the_in_flight_limit() {
    let mut t = table(1);
    for w in 0..4 {
        t.plan_window(w * W, (w + 1) * W, 10, 1);
    }
    let sent = t.dispatch(0, &loads(&["a", "b"]), &Estimator::default(), 1, 3);
    let slaves: Vec<&str> = sent.iter().map(|d| d.slave.as_str()).collect();
    assert_eq!(slaves, ["a", "b", "a"], "each to the earliest finish");
    assert!(sent.windows(2).all(|p| p[0].version < p[1].version));
    assert_eq!(t.in_flight(), 3);
    assert!(
        t.dispatch(0, &loads(&["a", "b"]), &Estimator::default(), 1, 3)
            .is_empty()
    );
}

#[test]
fn a_failing_task_is_retried_reassigned_delayed_and_retried_after_the_delay() {
    let mut t = table(1);
    t.plan_window(0, W, 10, 1);
    let est = Estimator::default();
    let slaves = loads(&["a", "b"]);
    let mut trail = Vec::new();
    let mut now = 0;
    for _ in 0..4 {
        let sent = t.dispatch(now, &slaves, &est, 1, 10);
        let d = &sent[0];
        let outcome = t.completed(&d.planned.key, d.version, Err(Failure::Failed), 2, now);
        trail.push((d.slave.clone(), outcome));
        now += 10;
    }
    let want = [
        ("a", Outcome::Retried),
        ("a", Outcome::Reassigned),
        ("b", Outcome::Retried),
        ("b", Outcome::Delayed),
    ];
    let got: Vec<(&str, Outcome)> = trail.iter().map(|(s, o)| (s.as_str(), o.clone())).collect();
    assert_eq!(got, want);
    assert_eq!(t.delayed(), 1);
    assert!(
        t.dispatch(now, &slaves, &est, 1, 10).is_empty(),
        "parked during the back-off"
    );
    let later = t.dispatch(now + 5_000, &slaves, &est, 1, 10);
    assert_eq!(later.len(), 1, "tried again after the back-off");
    let outcome = t.completed(&later[0].planned.key, later[0].version, Ok(()), 2, now + 5_001);
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(t.open(), 0);
}

#[test]
fn a_departed_slaves_task_runs_elsewhere_and_its_late_report_is_stale() {
    let mut t = table(1);
    t.plan_window(0, W, 10, 1);
    let est = Estimator::default();
    let first = t.dispatch(0, &loads(&["a", "b"]), &est, 1, 10).remove(0);
    assert_eq!(first.slave, "a");
    assert_eq!(t.watchdog(100, &live(&["b"])), [(window(0), Outcome::SlaveGone)]);
    let second = t.dispatch(100, &loads(&["b"]), &est, 1, 10).remove(0);
    assert_eq!(second.slave, "b");
    assert!(second.version > first.version);
    assert_eq!(
        t.completed(&window(0), first.version, Ok(()), 1, 200),
        Outcome::Stale
    );
    assert_eq!(
        t.completed(&window(0), second.version, Ok(()), 1, 200),
        Outcome::Done
    );
}

#[test]
fn a_hung_task_gets_a_new_version_on_another_slave() {
    let mut t = table(1);
    t.plan_window(0, W, 10, 1);
    let est = Estimator::default();
    let first = t.dispatch(0, &loads(&["a", "b"]), &est, 1, 10).remove(0);
    assert!(t.watchdog(4_000, &live(&["a", "b"])).is_empty(), "not yet");
    assert_eq!(
        t.watchdog(6_000, &live(&["a", "b"])),
        [(window(0), Outcome::Hung)]
    );
    let second = t.dispatch(6_000, &loads(&["a", "b"]), &est, 1, 10).remove(0);
    assert_eq!(second.slave, "b", "not back to the slave where it hangs");
    assert!(second.version > first.version);
}

#[test]
fn a_standby_resumes_open_tasks_with_versions_above_the_old_masters() {
    let mut old = table(1);
    old.plan_window(0, W, 10, 1);
    old.plan_window(W, 2 * W, 10, 1);
    let sent = old.dispatch(0, &loads(&["a"]), &Estimator::default(), 1, 10);
    old.completed(&sent[0].planned.key, sent[0].version, Ok(()), 1, 1);
    let snapshot = old.snapshot();
    assert_eq!(snapshot.open.len(), 1, "the finished window is not persisted");
    assert_eq!(snapshot.next_window_ms, Some(2 * W));

    let mut new = Table::restore(snapshot, 2, 0, FaultPolicy::default());
    assert_eq!(
        new.next_window_ms(),
        2 * W,
        "no window is planned twice or skipped"
    );
    let resent = new.dispatch(5, &loads(&["a"]), &Estimator::default(), 1, 10);
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].planned.key, window(W));
    assert!(resent[0].version > sent[1].version, "the new term fences the old");
}

#[test]
fn an_hour_task_stays_pinned_to_the_slave_holding_its_data_and_widens() {
    let mut t = table(1);
    t.plan_hour(0, W, "b", 5);
    t.plan_hour(0, 2 * W, "b", 9);
    assert_eq!(t.open(), 1, "widened, not duplicated");
    let sent = t.dispatch(0, &loads(&["a", "b"]), &Estimator::default(), 1, 10);
    assert_eq!(sent[0].slave, "b");
    assert_eq!(sent[0].planned.end_ms, 2 * W);
    assert_eq!(sent[0].planned.key.id(), "hour/0/b");
    assert!(
        t.dispatch(0, &loads(&["a"]), &Estimator::default(), 1, 10)
            .is_empty()
    );
}

#[test]
fn a_closed_hour_is_planned_again_only_when_what_a_slave_holds_for_it_changed() {
    let mut t = table(1);
    t.plan_hour(0, 60 * W, "a", 10);
    let sent = t.dispatch(0, &loads(&["a", "b"]), &Estimator::default(), 1, 10);
    assert_eq!(
        t.completed(&sent[0].planned.key, sent[0].version, Ok(()), 2, 0),
        Outcome::Done
    );
    // (slave, events held now) → planned again?
    let cases = [
        ("a", 10, false), // unchanged
        ("a", 12, true),  // late events arrived after the hour's last task
        ("a", 12, false), // and only once
        ("a", 7, true),   // merchants handed to another slave
        ("b", 5, true),   // which holds them now
        ("c", 0, false),  // a slave that never held any
        ("a", 0, false),  // all handed away: nothing to write here
        ("a", 0, false),
    ];
    for (i, (slave, events, want)) in cases.into_iter().enumerate() {
        assert_eq!(t.recount_hour(0, 60 * W, slave, events), want, "case {i}");
    }
    t.forget_hours_before(60 * W);
    assert!(!t.recount_hour(0, 60 * W, "c", 0), "forgotten, and empty");
}

#[test]
fn an_hour_task_whose_data_aged_out_is_given_up_not_retried() {
    let mut t = table(1);
    t.plan_hour(0, W, "b", 5);
    let sent = t.dispatch(0, &loads(&["a", "b"]), &Estimator::default(), 1, 10);
    let key = sent[0].planned.key.clone();
    let outcome = t.completed(&key, sent[0].version, Err(Failure::Expired), 2, 0);
    assert_eq!(outcome, Outcome::Expired);
    assert_eq!(t.open(), 0, "its last stored result stands");
}

#[test]
fn a_window_that_gains_late_events_is_computed_again_within_the_horizon() {
    let mut t = table(1);
    t.plan_window(0, W, 10, 1);
    let est = Estimator::default();
    let first = t.dispatch(0, &loads(&["a"]), &est, 1, 10).remove(0);
    assert_eq!(
        t.completed(&window(0), first.version, Ok(()), 1, 1),
        Outcome::Done
    );
    assert_eq!(t.recheck(0, W, 10, 1), None, "nothing new");
    assert_eq!(t.recheck(0, W, 15, 1), Some(5), "five late events");
    let again = t.dispatch(2, &loads(&["a"]), &est, 1, 10).remove(0);
    assert!(again.version > first.version, "the recomputation overwrites");
    assert_eq!(t.snapshot().recent.get(&0), Some(&15));
    t.forget_before(W);
    assert!(t.recent_windows().is_empty());
    assert_eq!(t.recheck(0, W, 99, 1), None, "too late: past the horizon");
}

#[test]
fn windows_computed_while_mysql_was_down_are_handed_back_when_it_returns() {
    let mut t = table(1);
    t.plan_window(0, W, 10, 1);
    assert_eq!(t.hot_gap_closes(), None, "no gap without an outage");
    t.hot_gap_opens();
    t.plan_window(W, 2 * W, 10, 1);
    t.hot_gap_opens();
    assert_eq!(
        t.snapshot().hot_gap_from_ms,
        Some(0),
        "from the oldest open window, kept"
    );
    t.plan_window(2 * W, 3 * W, 10, 1);
    assert_eq!(t.hot_gap_closes(), Some((0, 3 * W)));
    assert_eq!(t.hot_gap_closes(), None, "handed back once");
}

#[test]
fn an_unreachable_slave_gets_no_new_task_for_a_while() {
    let mut t = table(1);
    for w in 0..3 {
        t.plan_window(w * W, (w + 1) * W, 10, 1);
    }
    let est = Estimator::default();
    let slaves = loads(&["a", "b"]);
    let first = t.dispatch(0, &slaves, &est, 1, 1).remove(0);
    assert_eq!(first.slave, "a");
    let outcome = t.completed(
        &first.planned.key,
        first.version,
        Err(Failure::Unreachable),
        2,
        10,
    );
    assert_eq!(outcome, Outcome::Reassigned);
    let sent = t.dispatch(20, &slaves, &est, 1, 10);
    assert!(sent.iter().all(|d| d.slave == "b"), "a is quarantined: {sent:?}");
    for d in &sent {
        t.completed(&d.planned.key, d.version, Ok(()), 2, 30);
    }
    t.plan_window(3 * W, 4 * W, 10, 1);
    let later = t.dispatch(5_011, &slaves, &est, 1, 10);
    assert_eq!(later[0].slave, "a", "eligible again after the quarantine");
}
