//! The rate limits over governor's GCRA: direct (global, one listed caller)
//! and keyed (each unlisted caller, each hot key) with bounded memory, and the
//! pure verdict that turns a check into admit, refuse or shadow-refuse.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;

/// What a rule says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Admit,
    /// Refuse it; a retry may succeed after this long.
    Refuse(Duration),
    /// The rule would refuse it but runs in shadow mode: counted, let through.
    Shadow,
}

/// The verdict of a rule whose check gave `check` (`Err` carries the wait).
pub fn verdict(check: Result<(), Duration>, shadow: bool) -> Verdict {
    match (check, shadow) {
        (Ok(()), _) => Verdict::Admit,
        (Err(_), true) => Verdict::Shadow,
        (Err(wait), false) => Verdict::Refuse(wait),
    }
}

/// One GCRA limiter for everything it is asked about.
pub(crate) struct Direct<C: Clock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl<C: Clock + Clone> Direct<C> {
    pub(crate) fn new(quota: Quota, clock: &C) -> Self {
        Self {
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock: clock.clone(),
        }
    }

    /// Takes one cell, or says how long until one is free.
    #[inline]
    pub(crate) fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// A hasher that passes a `u64` through: keyed state is keyed by a hash
/// already taken with the flow's own random state, not hashed twice.
#[derive(Clone, Copy, Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used for u64 keys; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = Self;
    fn build_hasher(&self) -> Self {
        Self(0)
    }
}

/// Decisions between two looks at the keyed state's size.
const LOOK_EVERY: u64 = 1024;
/// Idle keys are pruned at least this often while any are held.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// A full keyed state is pruned at most this often (pruning walks every key).
const PRUNE_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// One GCRA state per key, with bounded memory. governor keeps a key's state
/// until it is pruned (governor #171), so every `LOOK_EVERY` decisions this
/// looks at the size: idle keys (state no different from a fresh one) are
/// pruned each `PRUNE_EVERY`, and when `capacity` keys are still held
/// (more distinct keys within a second than it holds: a scan, not a hot key),
/// requests go through untracked (and counted) until pruning makes room,
/// at most `PRUNE_AT_MOST_EVERY` later. The global limit still caps them.
pub(crate) struct Keyed<C: Clock> {
    limiter: RateLimiter<u64, DashMapStateStore<u64, PassThrough>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    origin: C::Instant,
    capacity: usize,
    decisions: AtomicU64,
    last_prune_nanos: AtomicU64,
    full: AtomicBool,
    tracked: Gauge,
}

/// What a keyed check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyedCheck {
    /// The key's own limit says this.
    Checked(Result<(), Duration>),
    /// The state is full: the key was not tracked, the request goes on.
    Untracked,
}

impl<C: Clock + Clone> Keyed<C> {
    pub(crate) fn new(quota: Quota, clock: &C, capacity: usize, tracked: Gauge) -> Self {
        Self {
            limiter: RateLimiter::dashmap_with_clock_and_hasher(quota, clock.clone(), PassThrough(0)),
            origin: clock.now(),
            clock: clock.clone(),
            capacity,
            decisions: AtomicU64::new(0),
            last_prune_nanos: AtomicU64::new(0),
            full: AtomicBool::new(false),
            tracked,
        }
    }

    /// Keys held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.limiter.len()
    }

    #[inline]
    pub(crate) fn check(&self, key: u64) -> KeyedCheck {
        if self.decisions.fetch_add(1, Ordering::Relaxed) % LOOK_EVERY == LOOK_EVERY - 1 {
            self.upkeep();
        }
        if self.full.load(Ordering::Relaxed) {
            return KeyedCheck::Untracked;
        }
        KeyedCheck::Checked(
            self.limiter
                .check_key(&key)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
        )
    }

    /// Prunes idle keys when due, and records whether the state is full.
    #[cold]
    fn upkeep(&self) {
        let now = u64::try_from(Duration::from(self.clock.now().duration_since(self.origin)).as_nanos())
            .unwrap_or(u64::MAX);
        let since = Duration::from_nanos(now.saturating_sub(self.last_prune_nanos.load(Ordering::Relaxed)));
        let len = self.limiter.len();
        let due = due_to_prune(len, self.capacity, since);
        if due {
            self.last_prune_nanos.store(now, Ordering::Relaxed);
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        let len = if due { self.limiter.len() } else { len };
        self.full.store(len >= self.capacity, Ordering::Relaxed);
        self.tracked.set(i64::try_from(len).unwrap_or(i64::MAX));
    }
}

/// Whether a keyed state holding `len` of `capacity` keys, last pruned
/// `since` ago, is pruned now.
pub fn due_to_prune(len: usize, capacity: usize, since: Duration) -> bool {
    len > 0 && (since >= PRUNE_EVERY || (len >= capacity && since >= PRUNE_AT_MOST_EVERY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;

    #[test]
    fn a_failed_check_refuses_unless_the_rule_is_in_shadow_mode() {
        let wait = Duration::from_millis(20);
        #[rustfmt::skip]
        let table = [
            (Ok(()), false, Verdict::Admit),
            (Ok(()), true, Verdict::Admit),
            (Err(wait), false, Verdict::Refuse(wait)),
            (Err(wait), true, Verdict::Shadow),
        ];
        for (check, shadow, expected) in table {
            assert_eq!(verdict(check, shadow), expected, "{check:?} shadow={shadow}");
        }
    }

    #[test]
    fn idle_keys_are_pruned_each_second_and_a_full_state_at_most_each_tenth() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        #[rustfmt::skip]
        let table = [
            ("empty", 0, 10, s(5), false),
            ("a second since the last prune", 3, 10, s(1), true),
            ("not yet a second", 3, 10, ms(999), false),
            ("full, a tenth since", 10, 10, ms(100), true),
            ("full, just pruned", 10, 10, ms(99), false),
            ("over full", 25, 10, ms(150), true),
        ];
        for (name, len, capacity, since, expected) in table {
            assert_eq!(due_to_prune(len, capacity, since), expected, "{name}");
        }
    }

    #[test]
    fn a_full_keyed_state_lets_requests_through_untracked_until_pruning_makes_room() {
        let clock = FakeRelativeClock::default();
        let quota = Quota::per_second(NonZeroU32::MIN);
        let keyed = Keyed::new(quota, &clock, 100, Gauge::default());
        // 1,023 keys at one instant: none is idle, so the look at the next
        // decision prunes none and finds the state full.
        for key in 0..LOOK_EVERY - 1 {
            assert_eq!(keyed.check(key), KeyedCheck::Checked(Ok(())));
        }
        assert_eq!(keyed.check(1_000_000), KeyedCheck::Untracked);
        assert!(
            keyed.full.load(Ordering::Relaxed),
            "1,023 keys held, capacity 100"
        );
        assert_eq!(keyed.check(7), KeyedCheck::Untracked);
        // Two seconds on, every key is idle: the next look prunes them all.
        clock.advance(Duration::from_secs(2));
        for key in 0..LOOK_EVERY {
            keyed.check(2_000_000 + key % 50);
        }
        assert!(keyed.len() <= 50, "held {} keys after pruning", keyed.len());
        assert!(!keyed.full.load(Ordering::Relaxed));
        assert_eq!(keyed.check(2_000_007), KeyedCheck::Checked(Ok(())));
        assert!(
            matches!(keyed.check(2_000_007), KeyedCheck::Checked(Err(_))),
            "tracked again"
        );
    }
}
