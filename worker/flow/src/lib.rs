//! Flow control for Ballast's services: the limits and circuit breakers a
//! request meets before it does any work (seed 004's 流控 and 降级).
//!
//! - Rate limits (GCRA, governor): per caller account, per hot key (a member
//!   id), global; a concurrency limit. Checked most specific first, so one
//!   flooding caller or one hot key cannot use up everyone's global budget.
//! - Circuit breakers on slow calls, average response time, error ratio and
//!   error count ([`breaker`]): a rule per dependency, a state per server of
//!   it ([`Target`]: each data centre's Redis apart).
//! - Rules come from the custom resources ([`Rules`]); a reload keeps the
//!   state of every rule whose parameters did not change, and a rule in
//!   shadow mode counts what it would refuse and refuses nothing.
//! - A refusal is decided at once, never waits, and maps to HTTP 429/503 or
//!   gRPC RESOURCE_EXHAUSTED/UNAVAILABLE with a retry-after ([`Refusal`]).
#![forbid(unsafe_code)]

pub mod breaker;
mod follow;
mod guarded;
mod limit;
mod metrics;
mod refusal;
mod rules;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
pub use ballast_crds::member_store::GuardedDependency;
use governor::clock::{Clock, DefaultClock, Reference};
use prometheus_client::registry::Registry;

pub use follow::follow;
use guarded::Servers;
pub use guarded::{Guarded, Target};
use limit::{Direct, Keyed, KeyedCheck};
pub use limit::{Verdict, due_to_prune, verdict};
use metrics::{Counters, Metrics};
pub use refusal::{Refusal, Refused};
pub use rules::{Breaker, Concurrency, Limit, Rules};

/// Keys a keyed limit holds state for at most (plus up to one look's worth):
/// about 4 MiB (see the memory test).
pub const KEY_CAPACITY: usize = 100_000;

/// How long a caller refused by the concurrency limit should wait.
const CONCURRENCY_RETRY: Duration = Duration::from_millis(100);

/// Why a guarded call did not return its value.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// Its dependency's breaker is open: the call was not made.
    #[error(transparent)]
    Refused(Refusal),
    /// It did not answer within its deadline (counted as a failure).
    #[error("{target} did not answer within {} ms", deadline.as_millis())]
    TimedOut {
        /// The server called ([`Target`]'s display: `redis dc-b`).
        target: String,
        /// The deadline it missed.
        deadline: Duration,
    },
    /// It answered with an error (counted as a failure).
    #[error(transparent)]
    Failed(E),
}

/// The flow control of one service process: consult [`Flow::admit`] for each
/// request and [`Flow::call`] (or [`Flow::guard`]) for each dependency call.
pub struct Flow<C: Clock = DefaultClock> {
    clock: C,
    origin: C::Instant,
    // Seeded per process: keys (member ids, caller accounts) come from callers.
    hasher: foldhash::fast::RandomState,
    active: ArcSwap<Active<C>>,
    // Outside the rules, so a reload never forgets requests in progress.
    in_flight: AtomicU32,
    metrics: Metrics,
    key_capacity: usize,
    reloading: Mutex<()>,
}

/// One rule: its shared limiter (kept across reloads while its parameters
/// stay), its shadow flag, its counters.
struct Rule<L> {
    limiter: Arc<L>,
    shadow: bool,
    counters: Counters,
}

/// The rules in force, built from a [`Rules`].
struct Active<C: Clock> {
    rules: Rules,
    global: Option<Rule<Direct<C>>>,
    hot_key: Option<Rule<Keyed<C>>>,
    unlisted: Option<Rule<Keyed<C>>>,
    callers: HashMap<String, Rule<Direct<C>>, foldhash::fast::RandomState>,
    concurrency: Option<Rule<u32>>,
    breakers: BTreeMap<GuardedDependency, Rule<Servers>>,
}

/// A request let in; it counts as in progress until dropped.
#[must_use = "the request counts as in progress until the admission is dropped"]
pub struct Admission<'a> {
    in_flight: Option<&'a AtomicU32>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight {
            in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Flow<DefaultClock> {
    /// Flow control under `rules`, on the monotonic clock, its metrics in `registry`.
    pub fn new(rules: Rules, registry: &mut Registry) -> Self {
        Self::with_clock(rules, DefaultClock::default(), KEY_CAPACITY, registry)
    }
}

impl<C: Clock + Clone> Flow<C> {
    /// Flow control on `clock` (a fake one in tests), holding at most
    /// `key_capacity` keys per keyed limit.
    pub fn with_clock(rules: Rules, clock: C, key_capacity: usize, registry: &mut Registry) -> Self {
        let metrics = Metrics::register(registry);
        let active = Active::build(rules, None, &clock, key_capacity, &metrics);
        Self {
            origin: clock.now(),
            clock,
            hasher: foldhash::fast::RandomState::default(),
            active: ArcSwap::from_pointee(active),
            in_flight: AtomicU32::new(0),
            metrics,
            key_capacity,
            reloading: Mutex::new(()),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Rules {
        self.active.load().rules.clone()
    }

    /// Puts `rules` in force; every rule whose parameters are unchanged keeps
    /// its state (tokens spent, breaker open). Returns whether anything changed.
    pub fn reload(&self, rules: Rules) -> bool {
        // Serialises reloads only; requests never take this lock.
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = self.active.load_full();
        if old.rules == rules {
            return false;
        }
        let new = Active::build(rules, Some(&old), &self.clock, self.key_capacity, &self.metrics);
        self.active.store(Arc::new(new));
        true
    }

    /// Whether a request of `caller` about `key` (a member id, if it names
    /// one) may go ahead now. Never waits.
    pub fn admit(&self, caller: &str, key: Option<&str>) -> Result<Admission<'_>, Refusal> {
        let active = self.active.load();
        let admission = self.enter(active.concurrency.as_ref())?;
        // An empty map is not hashed into.
        let listed = if active.callers.is_empty() {
            None
        } else {
            active.callers.get(caller)
        };
        if let Some(rule) = listed {
            decide(rule, rule.limiter.check(), || Refused::Caller(caller.to_owned()))?;
        } else if let Some(rule) = &active.unlisted {
            let check = rule.limiter.check(self.hasher.hash_one(caller));
            decide_keyed(rule, check, || Refused::UnlistedCaller(caller.to_owned()))?;
        }
        if let (Some(rule), Some(key)) = (&active.hot_key, key) {
            decide_keyed(rule, rule.limiter.check(self.hasher.hash_one(key)), || {
                Refused::HotKey
            })?;
        }
        if let Some(rule) = &active.global {
            decide(rule, rule.limiter.check(), || Refused::Global)?;
        }
        Ok(admission)
    }

    fn enter(&self, rule: Option<&Rule<u32>>) -> Result<Admission<'_>, Refusal> {
        let Some(rule) = rule else {
            return Ok(Admission { in_flight: None });
        };
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let admission = Admission {
            in_flight: Some(&self.in_flight),
        };
        let check = if before < *rule.limiter {
            Ok(())
        } else {
            Err(CONCURRENCY_RETRY)
        };
        // A refusal drops the admission, which leaves the count as it was.
        decide(rule, check, || Refused::Concurrency)?;
        Ok(admission)
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn now(&self) -> Duration {
        Duration::from(self.clock.now().duration_since(self.origin))
    }
}

/// Counts `check`'s verdict under `rule`; a refusal becomes a [`Refusal`].
#[inline]
fn decide<L>(
    rule: &Rule<L>,
    check: Result<(), Duration>,
    refused: impl FnOnce() -> Refused,
) -> Result<(), Refusal> {
    match verdict(check, rule.shadow) {
        Verdict::Admit => {
            rule.counters.admitted.inc();
            Ok(())
        }
        Verdict::Shadow => {
            rule.counters.shadow_refused.inc();
            Ok(())
        }
        Verdict::Refuse(retry_after) => {
            rule.counters.refused.inc();
            Err(Refusal {
                refused: refused(),
                retry_after,
            })
        }
    }
}

#[inline]
fn decide_keyed<L>(
    rule: &Rule<L>,
    check: KeyedCheck,
    refused: impl FnOnce() -> Refused,
) -> Result<(), Refusal> {
    match check {
        KeyedCheck::Checked(check) => decide(rule, check, refused),
        KeyedCheck::Untracked => {
            rule.counters.untracked.inc();
            Ok(())
        }
    }
}

impl<C: Clock + Clone> Active<C> {
    /// The rules in force for `rules`, reusing from `old` the state of every
    /// rule whose parameters are the same.
    fn build(rules: Rules, old: Option<&Self>, clock: &C, capacity: usize, metrics: &Metrics) -> Self {
        fn keep<L>(old: Option<&Rule<L>>, same: bool, new: impl FnOnce() -> L) -> Arc<L> {
            match old {
                Some(rule) if same => Arc::clone(&rule.limiter),
                _ => Arc::new(new()),
            }
        }
        let same_rate =
            |a: Option<Limit>, b: Option<Limit>| a.map(|l| l.per_second) == b.map(|l| l.per_second);
        let direct =
            |limit: Limit, old: Option<&Rule<Direct<C>>>, same: bool, rule: &'static str, subject: &str| {
                Rule {
                    limiter: keep(old, same, || Direct::new(limit.quota(), clock)),
                    shadow: limit.shadow,
                    counters: metrics.counters(rule, subject),
                }
            };
        let keyed = |limit: Limit, old: Option<&Rule<Keyed<C>>>, same: bool, rule: &'static str| Rule {
            limiter: keep(old, same, || {
                Keyed::new(limit.quota(), clock, capacity, metrics.tracked_keys(rule))
            }),
            shadow: limit.shadow,
            counters: metrics.counters(rule, ""),
        };
        let old_rules = old.map(|o| &o.rules);
        let global = rules.global.map(|l| {
            let same = same_rate(old_rules.and_then(|r| r.global), Some(l));
            direct(l, old.and_then(|o| o.global.as_ref()), same, "global", "")
        });
        let hot_key = rules.hot_key.map(|l| {
            let same = same_rate(old_rules.and_then(|r| r.hot_key), Some(l));
            keyed(l, old.and_then(|o| o.hot_key.as_ref()), same, "hot_key")
        });
        let unlisted = rules.unlisted_callers.map(|l| {
            let same = same_rate(old_rules.and_then(|r| r.unlisted_callers), Some(l));
            keyed(l, old.and_then(|o| o.unlisted.as_ref()), same, "unlisted_caller")
        });
        let callers = rules
            .callers
            .iter()
            .map(|(name, l)| {
                let same = same_rate(old_rules.and_then(|r| r.callers.get(name).copied()), Some(*l));
                let rule = direct(*l, old.and_then(|o| o.callers.get(name)), same, "caller", name);
                (name.clone(), rule)
            })
            .collect();
        let concurrency = rules.concurrency.map(|c| Rule {
            limiter: Arc::new(c.max.get()),
            shadow: c.shadow,
            counters: metrics.counters("concurrency", ""),
        });
        let breakers = rules
            .breakers
            .iter()
            .map(|(dependency, b)| {
                let before =
                    old.and_then(|o| Some((o.breakers.get(dependency)?, o.rules.breakers.get(dependency)?)));
                let same = before.is_some_and(|(_, was)| was.config == b.config);
                let was = before.map(|(rule, _)| rule);
                let limiter = keep(was, same, || {
                    Servers::new(*dependency, b.config, metrics.clone(), was.map(|r| &*r.limiter))
                });
                let rule = Rule {
                    limiter,
                    shadow: b.shadow,
                    counters: metrics.counters("breaker", dependency.as_str()),
                };
                (*dependency, rule)
            })
            .collect();
        Self {
            rules,
            global,
            hot_key,
            unlisted,
            callers,
            concurrency,
            breakers,
        }
    }
}

#[cfg(test)]
mod tests;
