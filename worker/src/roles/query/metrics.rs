//! The query service's metrics (`ballast_query_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Labels of one family: fixed names, values from a closed set.
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// What the query service counts.
pub struct Metrics {
    /// Answers by endpoint and HTTP status.
    pub requests: Family<Labels<2>, Counter>,
    /// Answers given, by source and completeness.
    pub answers: Family<Labels<2>, Counter>,
    /// Requests refused as bad input, by reason.
    pub bad_requests: Family<Labels<1>, Counter>,
    /// Answers refused as unavailable (503) or over the rate (429), by reason.
    pub unavailable: Family<Labels<1>, Counter>,
    /// Store calls that failed or missed their deadline, by store.
    pub store_failures: Family<Labels<1>, Counter>,
    /// Cache hashes checked against the hot MySQL and written back.
    pub fills: Counter,
    /// Cached days served unchecked: their check was over the rate.
    pub unchecked: Counter,
    /// Cold query log entries, by outcome (`written`, `dropped`, `failed`).
    pub query_log: Family<Labels<1>, Counter>,
    /// Time to answer, whatever the answer.
    pub duration: Histogram,
}

impl Metrics {
    /// Registers the metrics under `ballast_query_`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("query");
        let metrics = Self {
            requests: Family::default(),
            answers: Family::default(),
            bad_requests: Family::default(),
            unavailable: Family::default(),
            store_failures: Family::default(),
            fills: Counter::default(),
            unchecked: Counter::default(),
            query_log: Family::default(),
            // 100 µs to about 1.6 s.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 15,
            )),
        };
        r.register(
            "requests",
            "Requests by endpoint and HTTP status",
            metrics.requests.clone(),
        );
        r.register(
            "answers",
            "Answers by source and completeness",
            metrics.answers.clone(),
        );
        r.register(
            "bad_requests",
            "Requests refused as bad input, by reason",
            metrics.bad_requests.clone(),
        );
        r.register(
            "unavailable",
            "Requests refused as unavailable or over the rate limit, by reason",
            metrics.unavailable.clone(),
        );
        r.register(
            "store_failures",
            "Store calls that failed or missed their deadline, by store",
            metrics.store_failures.clone(),
        );
        r.register(
            "cache_fills",
            "Cached days checked against the hot MySQL and written back",
            metrics.fills.clone(),
        );
        r.register(
            "unchecked_answers",
            "Cached days served before their check against the hot MySQL, which was over its rate",
            metrics.unchecked.clone(),
        );
        r.register(
            "log_entries",
            "Cold query log entries, by outcome: written, dropped (queue full), failed (the cold store refused)",
            metrics.query_log.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time to answer a request",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        metrics
    }

    /// Counts `n` query log entries with `outcome`.
    pub fn logged(&self, outcome: &'static str, n: u64) {
        self.query_log.get_or_create(&[("outcome", outcome)]).inc_by(n);
    }

    /// Counts a failed call to `store`.
    pub fn store_failed(&self, store: &'static str) {
        self.store_failures.get_or_create(&[("store", store)]).inc();
    }
}
