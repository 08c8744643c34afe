//! The master's scheduler (seed 001): estimates a task's duration from the
//! history of its SQL and data size, and picks the slave with the lowest
//! expected finish time given what is queued there. Pure.

use std::collections::{BTreeMap, BTreeSet};

/// A linear cost model of one SQL: a fixed overhead plus a cost per event,
/// each an exponentially weighted mean of what finished tasks measured.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fit {
    overhead_ms: f64,
    per_event_ms: f64,
    samples: u64,
}

/// Below this many events a task's duration is mostly overhead.
const SMALL_TASK_EVENTS: u64 = 1_000;
/// Weight of the newest sample.
const ALPHA: f64 = 0.2;

/// Task duration history per SQL.
#[derive(Clone, Debug)]
pub struct Estimator {
    fits: BTreeMap<u64, Fit>,
    prior: Fit,
}

impl Default for Estimator {
    fn default() -> Self {
        // Before any history: 20 ms overhead, 500k events/s.
        Self {
            fits: BTreeMap::new(),
            prior: Fit {
                overhead_ms: 20.0,
                per_event_ms: 0.002,
                samples: 0,
            },
        }
    }
}

impl Estimator {
    /// Expected duration of a task running `sql` over `events` events.
    pub fn estimate(&self, sql: u64, events: u64) -> f64 {
        let fit = self.fits.get(&sql).unwrap_or(&self.prior);
        fit.overhead_ms + fit.per_event_ms * events as f64
    }

    /// Records a finished task.
    pub fn observe(&mut self, sql: u64, events: u64, duration_ms: f64) {
        let fit = self.fits.entry(sql).or_insert(self.prior);
        fit.samples += 1;
        if events < SMALL_TASK_EVENTS {
            fit.overhead_ms += ALPHA * (duration_ms - fit.overhead_ms);
        } else {
            let per_event = ((duration_ms - fit.overhead_ms).max(0.0)) / events as f64;
            fit.per_event_ms += ALPHA * (per_event - fit.per_event_ms);
        }
    }

    /// Finished tasks observed for `sql`.
    pub fn samples(&self, sql: u64) -> u64 {
        self.fits.get(&sql).map_or(0, |f| f.samples)
    }
}

/// One slave as the scheduler sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlaveView {
    /// Tasks it reported waiting for a slot.
    pub queued: u32,
    /// Tasks it reported computing.
    pub running: u32,
    /// Tasks it computes at once.
    pub slots: u32,
    /// CPU it used lately, in cores (from its reported CPU time).
    pub cpu_cores: f64,
    /// Sum of the estimates of the tasks this master has outstanding there.
    pub outstanding_ms: f64,
    /// Tasks this master has outstanding there.
    pub outstanding: u32,
}

impl SlaveView {
    /// When a task of `estimate_ms` sent now would finish there, in ms from now.
    pub fn expected_finish(&self, estimate_ms: f64, typical_ms: f64) -> f64 {
        // The slave's own report covers work this master does not know of
        // (a previous master's tasks); the larger view of the backlog wins.
        let reported = f64::from(self.queued + self.running) * typical_ms;
        let backlog = self.outstanding_ms.max(reported);
        let slots = f64::from(self.slots.max(1));
        // A slave already burning its cores runs everything slower.
        let pressure = 1.0 + (self.cpu_cores / slots).clamp(0.0, 1.0) * 0.5;
        (backlog / slots + estimate_ms) * pressure
    }
}

/// The slave with the lowest expected finish for a task of `estimate_ms`,
/// skipping `exclude`; ties go to the fewest outstanding tasks, then the name.
pub fn choose<'a>(
    slaves: &'a BTreeMap<String, SlaveView>,
    estimate_ms: f64,
    typical_ms: f64,
    exclude: &BTreeSet<String>,
) -> Option<&'a str> {
    slaves
        .iter()
        .filter(|(name, _)| !exclude.contains(*name))
        .map(|(name, view)| {
            (
                view.expected_finish(estimate_ms, typical_ms),
                view.outstanding,
                name,
            )
        })
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)))
        .map(|(_, _, name)| name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(outstanding_ms: f64, queued: u32, cpu_cores: f64) -> SlaveView {
        SlaveView {
            queued,
            running: 0,
            slots: 1,
            cpu_cores,
            outstanding_ms,
            outstanding: u32::from(outstanding_ms > 0.0),
        }
    }

    fn slaves(views: &[(&str, SlaveView)]) -> BTreeMap<String, SlaveView> {
        views.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect()
    }

    #[test]
    fn the_estimate_learns_overhead_and_cost_per_event() {
        let mut e = Estimator::default();
        for _ in 0..60 {
            e.observe(7, 10, 5.0);
            e.observe(7, 1_000_000, 1_005.0);
        }
        let small = e.estimate(7, 10);
        let large = e.estimate(7, 2_000_000);
        assert!((small - 5.0).abs() < 0.5, "overhead {small}");
        assert!((large - 2_005.0).abs() < 50.0, "2M events {large}");
        assert_eq!(e.estimate(8, 0), 20.0, "another SQL keeps the prior");
        assert_eq!(e.samples(7), 120);
    }

    #[test]
    fn the_slave_with_the_earliest_finish_wins() {
        let none = BTreeSet::new();
        let cases = [
            // (slaves, want)
            (
                vec![("a", view(0.0, 0, 0.0)), ("b", view(0.0, 0, 0.0))],
                Some("a"),
            ),
            (
                vec![("a", view(500.0, 0, 0.0)), ("b", view(0.0, 0, 0.0))],
                Some("b"),
            ),
            // Its own report of a backlog counts even if this master sent nothing.
            (
                vec![("a", view(0.0, 5, 0.0)), ("b", view(200.0, 0, 0.0))],
                Some("b"),
            ),
            // A busy CPU slows everything there.
            (
                vec![("a", view(0.0, 0, 1.0)), ("b", view(0.0, 0, 0.0))],
                Some("b"),
            ),
            (vec![], None),
        ];
        for (i, (views, want)) in cases.into_iter().enumerate() {
            assert_eq!(choose(&slaves(&views), 100.0, 100.0, &none), want, "case {i}");
        }
    }

    #[test]
    fn excluded_slaves_are_never_chosen() {
        let s = slaves(&[("a", view(0.0, 0, 0.0)), ("b", view(900.0, 0, 0.0))]);
        let exclude: BTreeSet<String> = ["a".to_owned()].into();
        assert_eq!(choose(&s, 10.0, 10.0, &exclude), Some("b"));
        let all: BTreeSet<String> = ["a".to_owned(), "b".to_owned()].into();
        assert_eq!(choose(&s, 10.0, 10.0, &all), None);
    }
}
