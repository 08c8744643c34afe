//! The circuit breaker as a pure state machine over a caller-supplied clock:
//! closed → open (on slow calls, average response time, error ratio or error
//! count over a sliding window with a minimum volume) → half-open trial calls →
//! closed, or open again.

use std::time::Duration;

/// When a breaker opens and how it recovers. Every threshold is optional; a
/// breaker with none never opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Opens when the average response time over the window exceeds this.
    pub max_average: Option<Duration>,
    /// A call slower than this is slow.
    pub slow_call: Option<Duration>,
    /// Opens when at least this percentage of the window's calls are slow.
    pub max_slow_percent: Option<u32>,
    /// Opens when at least this percentage of the window's calls failed.
    pub max_error_percent: Option<u32>,
    /// Opens when at least this many of the window's calls failed.
    pub max_errors: Option<u32>,
    /// Fewer calls in the window never open it.
    pub minimum_calls: u32,
    /// The sliding window the figures are taken over.
    pub window: Duration,
    /// How long it stays open before trial calls.
    pub open: Duration,
    /// Trial calls let through when half-open; all must succeed to close.
    pub half_open_calls: u32,
}

impl BreakerConfig {
    /// A trial call slower than this counts as failed: the slow-call
    /// threshold, else the average one.
    fn too_slow(&self) -> Option<Duration> {
        self.slow_call.or(self.max_average)
    }
}

/// Why a breaker opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Too many slow calls.
    SlowCalls,
    /// The average response time was over its limit.
    AverageResponseTime,
    /// Too large a share of calls failed.
    ErrorRatio,
    /// Too many calls failed.
    ErrorCount,
    /// A trial call failed or was slow.
    TrialFailed,
}

impl Reason {
    /// Lower-case name, as in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowCalls => "slow_calls",
            Self::AverageResponseTime => "average_response_time",
            Self::ErrorRatio => "error_ratio",
            Self::ErrorCount => "error_count",
            Self::TrialFailed => "trial_failed",
        }
    }
}

/// Where a breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls go through and are measured.
    Closed,
    /// Calls are refused until `until`.
    Open {
        /// When trial calls may start.
        until: Duration,
    },
    /// Up to `half_open_calls` trial calls go through.
    HalfOpen {
        /// Trial calls let through so far.
        admitted: u32,
        /// Trial calls that succeeded in time.
        succeeded: u32,
    },
}

impl State {
    /// 0 closed, 1 open, 2 half-open: the state gauge's value.
    pub fn code(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open { .. } => 1,
            Self::HalfOpen { .. } => 2,
        }
    }
}

/// What a breaker let through, to be handed back with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ticket {
    /// A call while closed: measured in the window.
    Measured,
    /// A trial call while half-open.
    Trial,
}

/// A change of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Closed or half-open → open.
    Opened(Reason),
    /// Open → half-open: trial calls start.
    HalfOpened,
    /// Half-open → closed: every trial call succeeded.
    Closed,
}

/// How a call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// It failed (an error or its deadline passed).
    pub failed: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// Figures over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls.
    pub calls: u32,
    /// Calls that failed.
    pub failures: u32,
    /// Calls slower than the slow-call threshold.
    pub slow: u32,
    /// Sum of response times, in microseconds.
    pub elapsed_micros: u64,
}

/// Whether `stats` open a breaker configured by `config`, and why.
pub fn tripped(stats: &Stats, config: &BreakerConfig) -> Option<Reason> {
    if stats.calls == 0 || stats.calls < config.minimum_calls {
        return None;
    }
    let calls = u64::from(stats.calls);
    let share = |part: u32, percent: u32| u64::from(part) * 100 >= u64::from(percent) * calls;
    if config.max_errors.is_some_and(|max| stats.failures >= max) {
        return Some(Reason::ErrorCount);
    }
    if config.max_error_percent.is_some_and(|p| share(stats.failures, p)) {
        return Some(Reason::ErrorRatio);
    }
    if config.slow_call.is_some() && config.max_slow_percent.is_some_and(|p| share(stats.slow, p)) {
        return Some(Reason::SlowCalls);
    }
    let average = Duration::from_micros(stats.elapsed_micros / calls);
    if config.max_average.is_some_and(|max| average > max) {
        return Some(Reason::AverageResponseTime);
    }
    None
}

const BUCKETS: usize = 10;

/// The sliding window: `BUCKETS` buckets of a tenth of the window each.
#[derive(Clone, Debug, Default)]
struct Window {
    buckets: [(u64, Stats); BUCKETS],
}

impl Window {
    /// The bucket `now` falls in (u64 arithmetic: this runs on every call).
    fn index(now: Duration, window: Duration) -> u64 {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        nanos(now) / (nanos(window) / BUCKETS as u64).max(1)
    }

    fn add(&mut self, now: Duration, window: Duration, call: Call, slow: bool) {
        let index = Self::index(now, window);
        let (at, stats) = &mut self.buckets[index as usize % BUCKETS];
        if *at != index {
            *at = index;
            *stats = Stats::default();
        }
        stats.calls += 1;
        stats.failures += u32::from(call.failed);
        stats.slow += u32::from(slow);
        stats.elapsed_micros += u64::try_from(call.elapsed.as_micros()).unwrap_or(u64::MAX / 2);
    }

    fn stats(&self, now: Duration, window: Duration) -> Stats {
        let index = Self::index(now, window);
        let oldest = index.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|(at, _)| (oldest..=index).contains(at))
            .fold(Stats::default(), |sum, (_, s)| Stats {
                calls: sum.calls + s.calls,
                failures: sum.failures + s.failures,
                slow: sum.slow + s.slow,
                elapsed_micros: sum.elapsed_micros + s.elapsed_micros,
            })
    }
}

/// One breaker's state and window. Time is whatever the caller passes as
/// `now` (monotonic, from any origin), so tests drive it with a fake clock.
#[derive(Clone, Debug)]
pub struct Machine {
    config: BreakerConfig,
    state: State,
    window: Window,
}

impl Machine {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            window: Window::default(),
        }
    }

    /// Where it is.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a call may go now: its ticket (and the transition letting it
    /// through made), or how long until one may.
    pub fn acquire(&mut self, now: Duration) -> Result<(Ticket, Option<Transition>), Duration> {
        match self.state {
            State::Closed => Ok((Ticket::Measured, None)),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                self.state = State::HalfOpen {
                    admitted: 1,
                    succeeded: 0,
                };
                Ok((Ticket::Trial, Some(Transition::HalfOpened)))
            }
            State::HalfOpen { admitted, succeeded } if admitted < self.config.half_open_calls => {
                self.state = State::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
                };
                Ok((Ticket::Trial, None))
            }
            // Every trial slot is taken: ask again about when one should be done.
            State::HalfOpen { .. } => Err(self.config.too_slow().unwrap_or(Duration::from_millis(100))),
        }
    }

    /// Records how a call let through with `ticket` went.
    pub fn record(&mut self, now: Duration, ticket: Ticket, call: Call) -> Option<Transition> {
        let slow = self.config.too_slow().is_some_and(|t| call.elapsed > t);
        match (ticket, self.state) {
            (Ticket::Measured, State::Closed) => {
                let slow_call = self.config.slow_call.is_some_and(|t| call.elapsed > t);
                self.window.add(now, self.config.window, call, slow_call);
                // A call that neither failed nor was slow cannot push any
                // figure over its threshold: skip the sum.
                if !call.failed && !slow {
                    return None;
                }
                let reason = tripped(&self.window.stats(now, self.config.window), &self.config)?;
                Some(self.open(now, reason))
            }
            (Ticket::Trial, State::HalfOpen { .. }) if call.failed || slow => {
                Some(self.open(now, Reason::TrialFailed))
            }
            (Ticket::Trial, State::HalfOpen { admitted, succeeded }) => {
                if succeeded + 1 >= self.config.half_open_calls {
                    self.state = State::Closed;
                    self.window = Window::default();
                    Some(Transition::Closed)
                } else {
                    self.state = State::HalfOpen {
                        admitted,
                        succeeded: succeeded + 1,
                    };
                    None
                }
            }
            // A call from before the last transition: its state is gone.
            _ => None,
        }
    }

    /// A call let through with `ticket` that never finished (its caller gave
    /// up): a trial slot is given back, nothing is measured.
    pub fn abandon(&mut self, ticket: Ticket) {
        if let (Ticket::Trial, State::HalfOpen { admitted, succeeded }) = (ticket, self.state) {
            self.state = State::HalfOpen {
                admitted: admitted.saturating_sub(1).max(succeeded),
                succeeded,
            };
        }
    }

    fn open(&mut self, now: Duration, reason: Reason) -> Transition {
        self.state = State::Open {
            until: now + self.config.open,
        };
        Transition::Opened(reason)
    }
}

#[cfg(test)]
mod tests;
