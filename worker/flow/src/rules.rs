//! The flow-control rules as plain values, and how they are read from the
//! custom resources (`MemberStore.spec.flowControl` and `.circuitBreakers`,
//! `DegradationPolicy.spec.cache.queryRatePerSecond`).

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use ballast_crds::MemberStore;
use ballast_crds::degradation_policy::CachePolicy;
use ballast_crds::member_store::{CircuitBreaker, FlowControl, FlowLimit, GuardedDependency};

use crate::breaker::BreakerConfig;

/// Every limit and breaker a [`Flow`](crate::Flow) applies. Two rule sets that
/// compare equal behave the same; a reload keeps the state of each rule whose
/// parameters did not change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Requests per second across all callers.
    pub global: Option<Limit>,
    /// Requests per second for any one key (a member id).
    pub hot_key: Option<Limit>,
    /// Requests per second of each caller account not in `callers`.
    pub unlisted_callers: Option<Limit>,
    /// Requests per second of each listed caller account.
    pub callers: BTreeMap<String, Limit>,
    /// Requests in progress at once.
    pub concurrency: Option<Concurrency>,
    /// Circuit breakers by dependency.
    pub breakers: BTreeMap<GuardedDependency, Breaker>,
}

/// A rate limit: GCRA at `per_second`, with a burst of a tenth of a second's
/// worth, so that over any second at most 1.1 × the rate gets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Admitted requests per second.
    pub per_second: NonZeroU32,
    /// Count what it would refuse, refuse nothing.
    pub shadow: bool,
}

/// A limit on requests in progress at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    /// Requests in progress at most.
    pub max: NonZeroU32,
    /// Count what it would refuse, refuse nothing.
    pub shadow: bool,
}

/// A circuit breaker's thresholds and whether it only counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    /// When it opens and for how long.
    pub config: BreakerConfig,
    /// Count what it would refuse, refuse nothing.
    pub shadow: bool,
}

impl Limit {
    /// An enforced limit of `per_second` (at least 1).
    pub fn per_second(per_second: u32) -> Self {
        Self {
            per_second: NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN),
            shadow: false,
        }
    }

    /// This limit, only counting.
    pub fn shadowed(self) -> Self {
        Self { shadow: true, ..self }
    }

    /// The GCRA quota: `per_second`, burst of a tenth of that (at least 1).
    pub(crate) fn quota(self) -> governor::Quota {
        let burst = NonZeroU32::new(self.per_second.get() / 10).unwrap_or(NonZeroU32::MIN);
        governor::Quota::per_second(self.per_second).allow_burst(burst)
    }
}

/// A CRD integer (validated `>= 1` by the API server) as a positive count;
/// anything else reads as 1 rather than panicking.
fn positive(value: i32) -> NonZeroU32 {
    u32::try_from(value)
        .ok()
        .and_then(NonZeroU32::new)
        .unwrap_or(NonZeroU32::MIN)
}

fn millis(value: Option<i32>) -> Option<Duration> {
    value.map(|v| Duration::from_millis(u64::from(positive(v).get())))
}

fn percent(value: Option<i32>) -> Option<u32> {
    value.map(|v| positive(v).get().min(100))
}

impl Rules {
    /// The member service's rules, from its `MemberStore` spec.
    pub fn members(flow: &FlowControl, breakers: &[CircuitBreaker]) -> Self {
        let shadow = |limit| flow.shadow.contains(&limit);
        let limit = |value, kind| Limit {
            per_second: positive(value),
            shadow: shadow(kind),
        };
        Self {
            global: Some(limit(flow.global_rate_per_second, FlowLimit::Global)),
            hot_key: Some(limit(flow.hot_key_rate_per_second, FlowLimit::HotKey)),
            unlisted_callers: flow
                .unlisted_caller_rate_per_second
                .map(|v| limit(v, FlowLimit::UnlistedCallers)),
            callers: flow
                .callers
                .iter()
                .map(|c| {
                    let limit = Limit {
                        per_second: positive(c.rate_per_second),
                        shadow: c.shadow,
                    };
                    (c.caller.clone(), limit)
                })
                .collect(),
            concurrency: flow.max_concurrent_requests.map(|max| Concurrency {
                max: positive(max),
                shadow: shadow(FlowLimit::Concurrency),
            }),
            breakers: breakers
                .iter()
                .map(|b| (b.dependency, Breaker::from(b)))
                .collect(),
        }
    }

    /// The rules of a `MemberStore` object (for [`follow`](crate::follow)).
    pub fn of_member_store(store: &MemberStore) -> Self {
        Self::members(&store.spec.flow_control, &store.spec.circuit_breakers)
    }

    /// The query service's rule while the result cache is down: a global
    /// rate in front of its in-process cache.
    pub fn queries_without_cache(cache: &CachePolicy) -> Self {
        Self {
            global: Some(Limit {
                per_second: positive(cache.query_rate_per_second),
                shadow: false,
            }),
            ..Self::default()
        }
    }
}

impl From<&CircuitBreaker> for Breaker {
    fn from(b: &CircuitBreaker) -> Self {
        let seconds = |v: i32| Duration::from_secs(u64::from(positive(v).get()));
        Self {
            config: BreakerConfig {
                max_average: millis(b.max_average_response_millis),
                slow_call: millis(b.slow_call_millis),
                max_slow_percent: percent(b.max_slow_call_percent),
                max_error_percent: percent(b.max_error_percent),
                max_errors: b.max_errors.map(|v| positive(v).get()),
                minimum_calls: positive(b.minimum_calls).get(),
                window: seconds(b.window_seconds),
                open: seconds(b.open_seconds),
                half_open_calls: positive(b.half_open_calls).get(),
            },
            shadow: b.shadow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_crds::member_store::CallerLimit;

    #[test]
    fn a_burst_is_a_tenth_of_a_second_of_the_rate_and_at_least_one() {
        for (rate, burst) in [(1, 1), (9, 1), (10, 1), (50, 5), (20_000, 2_000)] {
            let quota = Limit::per_second(rate).quota();
            assert_eq!(quota.burst_size().get(), burst, "rate {rate}");
            assert_eq!(
                quota.replenish_interval(),
                Duration::from_secs(1) / rate,
                "rate {rate}"
            );
        }
    }

    #[test]
    fn member_store_rules_carry_every_limit_and_its_shadow_flag() {
        let flow = FlowControl {
            global_rate_per_second: 100,
            hot_key_rate_per_second: 5,
            unlisted_caller_rate_per_second: Some(7),
            max_concurrent_requests: Some(3),
            callers: vec![
                CallerLimit {
                    caller: "orders".into(),
                    rate_per_second: 40,
                    shadow: false,
                },
                CallerLimit {
                    caller: "new".into(),
                    rate_per_second: 2,
                    shadow: true,
                },
            ],
            shadow: vec![FlowLimit::HotKey, FlowLimit::Concurrency],
        };
        let rules = Rules::members(&flow, &[]);
        assert_eq!(rules.global, Some(Limit::per_second(100)));
        assert_eq!(rules.hot_key, Some(Limit::per_second(5).shadowed()));
        assert_eq!(rules.unlisted_callers, Some(Limit::per_second(7)));
        assert_eq!(rules.callers["orders"], Limit::per_second(40));
        assert_eq!(rules.callers["new"], Limit::per_second(2).shadowed());
        assert_eq!(
            rules.concurrency,
            Some(Concurrency {
                max: positive(3),
                shadow: true
            })
        );
        assert!(rules.breakers.is_empty());
    }

    #[test]
    fn out_of_range_integers_read_as_the_nearest_valid_value_instead_of_panicking() {
        for (value, expected) in [(-5, 1), (0, 1), (1, 1), (250, 250)] {
            assert_eq!(positive(value).get(), expected, "{value}");
        }
        assert_eq!(percent(Some(400)), Some(100));
        assert_eq!(millis(Some(0)), Some(Duration::from_millis(1)));
    }

    #[test]
    fn a_breaker_spec_becomes_its_thresholds() {
        let spec: CircuitBreaker = serde_json::from_value(serde_json::json!({
            "dependency": "Elasticsearch", "slowCallMillis": 200, "maxSlowCallPercent": 50,
            "maxErrors": 10, "windowSeconds": 5, "openSeconds": 2, "shadow": true
        }))
        .expect("a valid breaker");
        let breaker = Breaker::from(&spec);
        assert!(breaker.shadow);
        assert_eq!(
            breaker.config,
            BreakerConfig {
                max_average: None,
                slow_call: Some(Duration::from_millis(200)),
                max_slow_percent: Some(50),
                max_error_percent: None,
                max_errors: Some(10),
                minimum_calls: 5,
                window: Duration::from_secs(5),
                open: Duration::from_secs(2),
                half_open_calls: 3,
            }
        );
    }
}
