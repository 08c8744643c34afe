//! Flow control's metrics (`ballast_flow_*`): every decision by rule and
//! outcome, each breaker's state and transitions, the keys the keyed limits hold.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Decisions = Family<[(&'static str, String); 3], Counter>;

/// Flow control's metric families; cheap to clone (they share their values).
#[derive(Clone, Default)]
pub(crate) struct Metrics {
    decisions: Decisions,
    breaker_state: Family<[(&'static str, String); 2], Gauge>,
    transitions: Family<[(&'static str, String); 4], Counter>,
    tracked_keys: Family<[(&'static str, &'static str); 1], Gauge>,
}

/// The counters of one rule, looked up once when the rule is built, so that a
/// decision only adds to an atomic.
#[derive(Clone)]
pub(crate) struct Counters {
    pub(crate) admitted: Counter,
    pub(crate) refused: Counter,
    pub(crate) shadow_refused: Counter,
    pub(crate) untracked: Counter,
}

impl Metrics {
    /// Registers the families under `registry`'s prefix plus `flow`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("flow");
        r.register(
            "decisions",
            "Flow-control decisions by rule (global, caller, unlisted_caller, hot_key, concurrency, breaker), subject (caller account or dependency) and outcome (admitted, refused, shadow_refused: refused in shadow mode and let through, untracked: keyed state full)",
            metrics.decisions.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker state by dependency and server (a data centre's; empty for the only one): 0 closed, 1 open, 2 half-open",
            metrics.breaker_state.clone(),
        );
        r.register(
            "breaker_transitions",
            "Circuit breaker transitions by dependency, server, new state and reason",
            metrics.transitions.clone(),
        );
        r.register(
            "tracked_keys",
            "Keys a keyed limit (hot_key, unlisted_caller) holds state for, at its last look",
            metrics.tracked_keys.clone(),
        );
        metrics
    }

    pub(crate) fn counters(&self, rule: &'static str, subject: &str) -> Counters {
        let counter = |outcome: &str| {
            self.decisions
                .get_or_create(&[
                    ("rule", rule.to_owned()),
                    ("subject", subject.to_owned()),
                    ("outcome", outcome.to_owned()),
                ])
                .clone()
        };
        Counters {
            admitted: counter("admitted"),
            refused: counter("refused"),
            shadow_refused: counter("shadow_refused"),
            untracked: counter("untracked"),
        }
    }

    pub(crate) fn tracked_keys(&self, rule: &'static str) -> Gauge {
        self.tracked_keys.get_or_create(&[("rule", rule)]).clone()
    }

    pub(crate) fn breaker_state(&self, dependency: &'static str, server: &str, code: i64) {
        self.breaker_state
            .get_or_create(&[
                ("dependency", dependency.to_owned()),
                ("server", server.to_owned()),
            ])
            .set(code);
    }

    pub(crate) fn transition(
        &self,
        dependency: &'static str,
        server: &str,
        to: &'static str,
        reason: &'static str,
    ) {
        self.transitions
            .get_or_create(&[
                ("dependency", dependency.to_owned()),
                ("server", server.to_owned()),
                ("to", to.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }
}
