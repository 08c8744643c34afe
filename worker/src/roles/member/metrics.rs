//! The member service's metrics (`ballast_member_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of one family: fixed names, values from a closed set.
type Labels<const N: usize> = [(&'static str, &'static str); N];

/// What the member service counts.
pub struct Metrics {
    /// Answers by method and gRPC code.
    pub requests: Family<Labels<2>, Counter>,
    /// Requests refused as bad input or an unknown caller, by reason.
    pub invalid: Family<Labels<1>, Counter>,
    /// Cache reads and fills by outcome (`hit`, `miss`, `filled`, `refused`,
    /// `skipped`, `unavailable`, `bypassed`).
    pub cache: Family<Labels<1>, Counter>,
    /// Writes made, by the store that took them (`mysql`, `elasticsearch`).
    pub writes: Family<Labels<1>, Counter>,
    /// Store calls that failed or missed their deadline, by dependency.
    pub store_failures: Family<Labels<1>, Counter>,
    /// Invalidations that failed after a write was made, by data centre
    /// (its entries expire, or are purged when it returns).
    pub late_invalidations_failed: Family<Vec<(String, String)>, Counter>,
    /// Invalidations a data centre's cache missed while it may (published
    /// Degraded: not sent; Recovering: failed), by data centre; the operator
    /// empties it before it is read again.
    pub invalidations_missed: Family<Vec<(String, String)>, Counter>,
    /// Lookups by the cluster that answered (`primary`, `marketing`).
    pub searches: Family<Labels<1>, Counter>,
    /// Journal records replayed into MySQL by outcome (`applied`, `current`, `unreadable`).
    pub replayed: Family<Labels<1>, Counter>,
    /// Journal records not yet replayed (all records, for this store's group).
    pub replay_pending: Gauge,
    /// The path in use: 0 MySQL, 1 Elasticsearch.
    pub path: Gauge,
    /// Time to answer, whatever the answer.
    pub duration: Histogram,
}

impl Metrics {
    /// Registers the metrics under `ballast_member_`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("member");
        let m = Self {
            requests: Family::default(),
            invalid: Family::default(),
            cache: Family::default(),
            writes: Family::default(),
            store_failures: Family::default(),
            late_invalidations_failed: Family::default(),
            invalidations_missed: Family::default(),
            searches: Family::default(),
            replayed: Family::default(),
            replay_pending: Gauge::default(),
            path: Gauge::default(),
            // 50 µs to about 0.8 s.
            duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 15,
            )),
        };
        r.register("requests", "Answers by method and gRPC code", m.requests.clone());
        r.register(
            "invalid",
            "Requests refused as bad input or an unknown caller, by reason",
            m.invalid.clone(),
        );
        r.register("cache", "Cache reads and fills by outcome", m.cache.clone());
        r.register(
            "writes",
            "Writes made, by the store that took them",
            m.writes.clone(),
        );
        r.register(
            "store_failures",
            "Store calls that failed or missed their deadline, by dependency",
            m.store_failures.clone(),
        );
        r.register(
            "late_invalidations_failed",
            "Invalidations that failed after a write was made, by data centre",
            m.late_invalidations_failed.clone(),
        );
        r.register(
            "invalidations_missed",
            "Invalidations a cache published Degraded or Recovering missed, by data centre",
            m.invalidations_missed.clone(),
        );
        r.register(
            "searches",
            "Lookups by the cluster that answered",
            m.searches.clone(),
        );
        r.register(
            "replayed",
            "Journal records replayed into MySQL, by outcome",
            m.replayed.clone(),
        );
        r.register(
            "replay_pending",
            "Journal records not yet replayed into MySQL",
            m.replay_pending.clone(),
        );
        r.register(
            "path",
            "The store path in use: 0 MySQL, 1 Elasticsearch",
            m.path.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time to answer a request",
            prometheus_client::registry::Unit::Seconds,
            m.duration.clone(),
        );
        m
    }
}
