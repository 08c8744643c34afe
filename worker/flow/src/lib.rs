//! Flow control for Ballast's services: the limits and circuit breakers a
//! request meets before it does any work (seed 004's 流控 and 降级).
//!
//! - Rate limits (GCRA, governor): per caller account, per hot key (a member
//!   id), global; a concurrency limit. Checked most specific first, so one
//!   flooding caller or one hot key cannot use up everyone's global budget.
//! - Circuit breakers per dependency on slow calls, average response time,
//!   error ratio and error count ([`breaker`]).
//! - Rules come from the custom resources ([`Rules`]); a reload keeps the
//!   state of every rule whose parameters did not change, and a rule in
//!   shadow mode counts what it would refuse and refuses nothing.
//! - A refusal is decided at once, never waits, and maps to HTTP 429/503 or
//!   gRPC RESOURCE_EXHAUSTED/UNAVAILABLE with a retry-after ([`Refusal`]).
#![forbid(unsafe_code)]

pub mod breaker;
mod follow;
mod limit;
mod metrics;
mod refusal;
mod rules;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
pub use ballast_crds::member_store::GuardedDependency;
use governor::clock::{Clock, DefaultClock, Reference};
use prometheus_client::registry::Registry;

use breaker::{Call, Machine, State, Ticket, Transition};
pub use follow::follow;
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
    #[error("{} did not answer within {} ms", dependency.as_str(), deadline.as_millis())]
    TimedOut {
        /// The dependency called.
        dependency: GuardedDependency,
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

/// A circuit breaker's state behind its lock.
struct BreakerCell {
    dependency: GuardedDependency,
    machine: Mutex<Machine>,
    // Mirrors `machine.state() == Closed`, so that a call to a healthy
    // dependency takes the lock once (to record), not twice.
    closed: AtomicBool,
}

/// The rules in force, built from a [`Rules`].
struct Active<C: Clock> {
    rules: Rules,
    global: Option<Rule<Direct<C>>>,
    hot_key: Option<Rule<Keyed<C>>>,
    unlisted: Option<Rule<Keyed<C>>>,
    callers: HashMap<String, Rule<Direct<C>>, foldhash::fast::RandomState>,
    concurrency: Option<Rule<u32>>,
    breakers: BTreeMap<GuardedDependency, Rule<BreakerCell>>,
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

/// A call to a dependency let through its breaker: [`Guarded::finish`] it
/// with its outcome. Dropped unfinished, it is forgotten (a trial slot is
/// given back).
#[must_use = "finish the guarded call with its outcome"]
pub struct Guarded<'a, C: Clock> {
    flow: &'a Flow<C>,
    started: Duration,
    ticket: Option<(Arc<BreakerCell>, Ticket)>,
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

    /// Whether a call to `dependency` may be made now (its breaker is not
    /// open). Never waits.
    pub fn guard(&self, dependency: GuardedDependency) -> Result<Guarded<'_, C>, Refusal> {
        let started = self.now();
        let active = self.active.load();
        let Some(rule) = active.breakers.get(&dependency) else {
            return Ok(Guarded {
                flow: self,
                started,
                ticket: None,
            });
        };
        let acquired = if rule.limiter.closed.load(Ordering::Acquire) {
            // Closed admits without changing anything; a transition racing
            // this read makes the call's record stale, which the machine ignores.
            Ok((Ticket::Measured, None))
        } else {
            rule.limiter.acquire(started)
        };
        let (ticket, transition, check) = match acquired {
            Ok((ticket, transition)) => (Some(ticket), transition, Ok(())),
            Err(wait) => (None, None, Err(wait)),
        };
        if let Some(transition) = transition {
            self.transitioned(&rule.limiter, transition);
        }
        decide(rule, check, || Refused::Breaker(dependency))?;
        Ok(Guarded {
            flow: self,
            started,
            ticket: ticket.map(|t| (Arc::clone(&rule.limiter), t)),
        })
    }

    /// Makes the call `call` to `dependency` through its breaker, within
    /// `deadline`: a refusal, a missed deadline or an error is a [`CallError`],
    /// and the last two count against the breaker.
    pub async fn call<T, E, F>(
        &self,
        dependency: GuardedDependency,
        deadline: Duration,
        call: F,
    ) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let guard = self.guard(dependency).map_err(CallError::Refused)?;
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(value)) => {
                guard.finish(false);
                Ok(value)
            }
            Ok(Err(error)) => {
                guard.finish(true);
                Err(CallError::Failed(error))
            }
            Err(_) => {
                guard.finish(true);
                Err(CallError::TimedOut { dependency, deadline })
            }
        }
    }

    /// Where `dependency`'s breaker is, if it has one.
    pub fn breaker_state(&self, dependency: GuardedDependency) -> Option<State> {
        let active = self.active.load();
        active
            .breakers
            .get(&dependency)
            .map(|rule| rule.limiter.lock().state())
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn now(&self) -> Duration {
        Duration::from(self.clock.now().duration_since(self.origin))
    }

    /// Logs and counts a transition (outside the breaker's lock).
    fn transitioned(&self, cell: &BreakerCell, transition: Transition) {
        let dependency = cell.dependency.as_str();
        let state = cell.lock().state();
        self.metrics.breaker_state(dependency, state.code());
        match transition {
            Transition::Opened(reason) => {
                tracing::warn!(
                    dependency,
                    reason = reason.as_str(),
                    "circuit breaker opened: calls fail at once"
                );
                self.metrics.transition(dependency, "open", reason.as_str());
            }
            Transition::HalfOpened => {
                tracing::info!(
                    dependency,
                    "circuit breaker half-open: letting trial calls through"
                );
                self.metrics
                    .transition(dependency, "half_open", "open_period_over");
            }
            Transition::Closed => {
                tracing::info!(dependency, "circuit breaker closed: every trial call succeeded");
                self.metrics.transition(dependency, "closed", "trials_succeeded");
            }
        }
    }
}

impl<C: Clock + Clone> Guarded<'_, C> {
    /// Records how the call went (`failed`: an error or a missed deadline);
    /// its response time is taken from the flow's clock.
    pub fn finish(mut self, failed: bool) {
        let Some((cell, ticket)) = self.ticket.take() else {
            return;
        };
        let now = self.flow.now();
        let call = Call {
            failed,
            elapsed: now.saturating_sub(self.started),
        };
        let transition = cell.record(now, ticket, call);
        if let Some(transition) = transition {
            self.flow.transitioned(&cell, transition);
        }
    }
}

impl<C: Clock> Drop for Guarded<'_, C> {
    fn drop(&mut self) {
        if let Some((cell, ticket)) = self.ticket.take() {
            cell.lock().abandon(ticket);
        }
    }
}

impl BreakerCell {
    fn new(dependency: GuardedDependency, machine: Machine) -> Self {
        Self {
            dependency,
            closed: AtomicBool::new(machine.state() == State::Closed),
            machine: Mutex::new(machine),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        // The machine has no invariant a panicking holder could break halfway.
        self.machine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn acquire(&self, now: Duration) -> Result<(Ticket, Option<Transition>), Duration> {
        let mut machine = self.lock();
        let acquired = machine.acquire(now);
        self.closed
            .store(machine.state() == State::Closed, Ordering::Release);
        acquired
    }

    fn record(&self, now: Duration, ticket: Ticket, call: Call) -> Option<Transition> {
        let mut machine = self.lock();
        let transition = machine.record(now, ticket, call);
        if transition.is_some() {
            self.closed
                .store(machine.state() == State::Closed, Ordering::Release);
        }
        transition
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
                let limiter = keep(before.map(|(rule, _)| rule), same, || {
                    BreakerCell::new(*dependency, Machine::new(b.config))
                });
                metrics.breaker_state(dependency.as_str(), limiter.lock().state().code());
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
