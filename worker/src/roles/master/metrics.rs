//! The master's metrics (`ballast_master_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::tasks::Outcome;
use crate::health::{counter, gauge};

/// The master's metrics (`ballast_master_*`).
pub(super) struct Metrics {
    pub(super) active: Gauge,
    pub(super) term: Gauge,
    pub(super) tasks: Family<[(&'static str, &'static str); 1], Counter>,
    pub(super) in_flight: Gauge,
    pub(super) delayed: Gauge,
    pub(super) windows_failing: Gauge,
    pub(super) lag_seconds: Gauge,
    pub(super) stale_refused: Counter,
    pub(super) slave_events_lost: Counter,
}

impl Metrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("master");
        let tasks = Family::default();
        r.register(
            "tasks",
            "Task events by outcome: dispatched, done, stale, retried, reassigned, delayed, slave_gone, hung, expired, recomputed",
            tasks.clone(),
        );
        Self {
            active: gauge(r, "active", "1 while this master holds the lease"),
            term: gauge(r, "term", "The leader Lease term this master acts in"),
            tasks,
            in_flight: gauge(r, "tasks_in_flight", "Tasks running on slaves"),
            delayed: gauge(r, "tasks_delayed", "Tasks in the delay queue"),
            windows_failing: gauge(
                r,
                "windows_failing",
                "Windows (and hour tasks) whose computation keeps failing: round the slaves and into the delay queue",
            ),
            lag_seconds: gauge(
                r,
                "window_lag_seconds",
                "Age of the oldest window not yet computed",
            ),
            stale_refused: counter(
                r,
                "stale_results_refused",
                "Result rows of superseded attempts refused by the version fence",
            ),
            slave_events_lost: counter(
                r,
                "slave_events_lost",
                "Events held in a slave's memory (KV store down) lost when it left or restarted",
            ),
        }
    }

    pub(super) fn outcome(&self, outcome: &Outcome) {
        let label = match outcome {
            Outcome::Done => "done",
            Outcome::Stale => "stale",
            Outcome::Retried => "retried",
            Outcome::Reassigned => "reassigned",
            Outcome::Delayed => "delayed",
            Outcome::SlaveGone => "slave_gone",
            Outcome::Hung => "hung",
            Outcome::Expired => "expired",
        };
        self.tasks.get_or_create(&[("outcome", label)]).inc();
    }
}
