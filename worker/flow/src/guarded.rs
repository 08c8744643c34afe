//! Calls to dependencies through their circuit breakers. A breaker's rule is
//! per kind of dependency (the custom resource's `circuitBreakers`), but its
//! state is per server: each data centre's Redis, MySQL and Elasticsearch
//! has a breaker of its own, so that one server failing never refuses calls
//! to another of the same kind (a lost Redis in one data centre must not
//! close the other's cache to the writes that survive it).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;

use crate::breaker::{BreakerConfig, Call, Machine, State, Ticket, Transition};
use crate::metrics::Metrics;
use crate::{CallError, Flow, GuardedDependency, Refusal, Refused, decide};

/// What a guarded call goes to: a kind of dependency, and which server of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target<'a> {
    /// The kind: whose rule the breaker follows.
    pub dependency: GuardedDependency,
    /// Which server of that kind (a data centre's name); empty when the
    /// process calls only one. Each server has a breaker of its own.
    pub server: &'a str,
}

impl<'a> Target<'a> {
    /// Server `server` of `dependency`.
    pub fn new(dependency: GuardedDependency, server: &'a str) -> Self {
        Self { dependency, server }
    }
}

/// The only server of its kind that a process calls.
impl From<GuardedDependency> for Target<'static> {
    fn from(dependency: GuardedDependency) -> Self {
        Self::new(dependency, "")
    }
}

/// `redis`, or `redis dc-b` for one server of several.
impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dependency.as_str())?;
        if !self.server.is_empty() {
            write!(f, " {}", self.server)?;
        }
        Ok(())
    }
}

/// One server's breaker: its state machine behind its lock.
pub(crate) struct BreakerCell {
    dependency: GuardedDependency,
    server: Box<str>,
    machine: Mutex<Machine>,
    // Mirrors `machine.state() == Closed`, so that a call to a healthy
    // server takes the lock once (to record), not twice.
    closed: AtomicBool,
}

impl BreakerCell {
    fn new(dependency: GuardedDependency, server: &str, machine: Machine) -> Self {
        Self {
            dependency,
            server: server.into(),
            closed: AtomicBool::new(machine.state() == State::Closed),
            machine: Mutex::new(machine),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // The machine has no invariant a panicking holder could break halfway.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
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

/// The breakers of one kind of dependency under one rule, a cell per server,
/// each made at the server's first call. A reload that keeps the rule's
/// thresholds keeps this whole (every server's state); a new rule starts afresh.
pub(crate) struct Servers {
    dependency: GuardedDependency,
    config: BreakerConfig,
    metrics: Metrics,
    // Read on every call without a lock; a server's first call copies the map.
    cells: ArcSwap<BTreeMap<Box<str>, Arc<BreakerCell>>>,
    adding: Mutex<()>,
}

impl Servers {
    /// No server called yet; `was`, the servers of the rule this one
    /// replaces, start closed under it at once (so their state gauges say so).
    pub(crate) fn new(
        dependency: GuardedDependency,
        config: BreakerConfig,
        metrics: Metrics,
        was: Option<&Self>,
    ) -> Self {
        let servers = Self {
            dependency,
            config,
            metrics,
            cells: ArcSwap::default(),
            adding: Mutex::new(()),
        };
        for server in was.map(|w| w.cells.load_full()).iter().flat_map(|c| c.keys()) {
            servers.cell(server);
        }
        servers
    }

    /// `server`'s breaker, made closed at its first call.
    fn cell(&self, server: &str) -> Arc<BreakerCell> {
        if let Some(cell) = self.cells.load().get(server) {
            return Arc::clone(cell);
        }
        let _one_at_a_time = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let cells = self.cells.load_full();
        if let Some(cell) = cells.get(server) {
            return Arc::clone(cell);
        }
        let cell = Arc::new(BreakerCell::new(
            self.dependency,
            server,
            Machine::new(self.config),
        ));
        let mut more = BTreeMap::clone(&cells);
        more.insert(server.into(), Arc::clone(&cell));
        self.cells.store(Arc::new(more));
        self.metrics
            .breaker_state(self.dependency.as_str(), server, State::Closed.code());
        cell
    }

    /// `server`'s state; closed for a server not called yet.
    fn state(&self, server: &str) -> State {
        self.cells
            .load()
            .get(server)
            .map_or(State::Closed, |cell| cell.lock().state())
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

impl<C: Clock + Clone> Flow<C> {
    /// Whether a call to `target` may be made now (its server's breaker is
    /// not open). Never waits.
    pub fn guard<'t>(&self, target: impl Into<Target<'t>>) -> Result<Guarded<'_, C>, Refusal> {
        let target = target.into();
        let started = self.now();
        let active = self.active.load();
        let Some(rule) = active.breakers.get(&target.dependency) else {
            return Ok(Guarded {
                flow: self,
                started,
                ticket: None,
            });
        };
        let cell = rule.limiter.cell(target.server);
        let acquired = if cell.closed.load(Ordering::Acquire) {
            // Closed admits without changing anything; a transition racing
            // this read makes the call's record stale, which the machine ignores.
            Ok((Ticket::Measured, None))
        } else {
            cell.acquire(started)
        };
        let (ticket, transition, check) = match acquired {
            Ok((ticket, transition)) => (Some(ticket), transition, Ok(())),
            Err(wait) => (None, None, Err(wait)),
        };
        if let Some(transition) = transition {
            self.transitioned(&cell, transition);
        }
        decide(rule, check, || {
            Refused::Breaker(target.dependency, target.server.to_owned())
        })?;
        Ok(Guarded {
            flow: self,
            started,
            ticket: ticket.map(|t| (cell, t)),
        })
    }

    /// Makes the call `call` to `target` through its breaker, within
    /// `deadline`: a refusal, a missed deadline or an error is a [`CallError`],
    /// and the last two count against the breaker.
    pub async fn call<'t, T, E, F>(
        &self,
        target: impl Into<Target<'t>>,
        deadline: Duration,
        call: F,
    ) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let target = target.into();
        let guard = self.guard(target).map_err(CallError::Refused)?;
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
                Err(CallError::TimedOut {
                    target: target.to_string(),
                    deadline,
                })
            }
        }
    }

    /// Where `target`'s breaker is, if its kind has one (closed for a server
    /// not called yet).
    pub fn breaker_state<'t>(&self, target: impl Into<Target<'t>>) -> Option<State> {
        let target = target.into();
        let active = self.active.load();
        active
            .breakers
            .get(&target.dependency)
            .map(|rule| rule.limiter.state(target.server))
    }

    /// Logs and counts a transition (outside the breaker's lock).
    fn transitioned(&self, cell: &BreakerCell, transition: Transition) {
        let dependency = cell.dependency.as_str();
        let server = &*cell.server;
        let state = cell.lock().state();
        self.metrics.breaker_state(dependency, server, state.code());
        let (to, reason) = match transition {
            Transition::Opened(reason) => {
                tracing::warn!(
                    dependency,
                    server,
                    reason = reason.as_str(),
                    "circuit breaker opened: calls fail at once"
                );
                ("open", reason.as_str())
            }
            Transition::HalfOpened => {
                tracing::info!(
                    dependency,
                    server,
                    "circuit breaker half-open: letting trial calls through"
                );
                ("half_open", "open_period_over")
            }
            Transition::Closed => {
                tracing::info!(
                    dependency,
                    server,
                    "circuit breaker closed: every trial call succeeded"
                );
                ("closed", "trials_succeeded")
            }
        };
        self.metrics.transition(dependency, server, to, reason);
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
