//! Admission to the backup intake: the rate budget, and merchant shedding when
//! over it. Pure: time comes in as an argument.

use std::collections::BTreeSet;

use crate::shedding::{self, Load};
use crate::wire::ChangeEvent;

/// Length of one budget interval.
const INTERVAL_MS: i64 = 1000;

/// Why a batch was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "backup intake over its budget of {budget} events/s at the maximum shed share of {max_level} bp of merchants; retry after {retry_after_ms} ms"
)]
pub struct OverBudget {
    /// Events per second the intake accepts.
    pub budget: u64,
    /// Largest shed share, in basis points.
    pub max_level: u32,
    /// When the next interval starts.
    pub retry_after_ms: i64,
}

/// What admission decided for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Events to store.
    pub keep: Vec<ChangeEvent>,
    /// Events dropped because their merchant is shed.
    pub shed: u32,
}

/// The state of admission: the shed level and this interval's counts.
#[derive(Debug, Clone)]
pub struct Admission {
    budget: u64,
    max_level: u32,
    level: u32,
    interval_start_ms: i64,
    offered: u64,
    accepted: u64,
    shed_merchants: BTreeSet<String>,
}

impl Admission {
    /// `rate` events per second, shedding at most `max_percent` % of merchants.
    pub fn new(rate: u64, max_percent: u32, now_ms: i64) -> Self {
        Self {
            budget: rate.max(1),
            max_level: max_percent.min(100) * 100,
            level: 0,
            interval_start_ms: now_ms,
            offered: 0,
            accepted: 0,
            shed_merchants: BTreeSet::new(),
        }
    }

    /// The shed level now, in basis points.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Merchants shed in the current interval.
    pub fn shed_merchants(&self) -> &BTreeSet<String> {
        &self.shed_merchants
    }

    fn roll(&mut self, now_ms: i64) {
        if now_ms - self.interval_start_ms < INTERVAL_MS {
            return;
        }
        self.level = shedding::next_level(
            self.level,
            Load {
                admitted: self.offered,
                budget: self.budget,
            },
            self.max_level,
        );
        self.interval_start_ms = now_ms;
        self.offered = 0;
        self.accepted = 0;
        self.shed_merchants.clear();
    }

    /// Admits a batch: events of shed merchants are dropped; the rest is admitted
    /// whole if it fits this interval's budget, or refused whole.
    pub fn admit(&mut self, events: Vec<ChangeEvent>, now_ms: i64) -> Result<Admitted, OverBudget> {
        self.roll(now_ms);
        let (shed, keep): (Vec<ChangeEvent>, Vec<ChangeEvent>) = events
            .into_iter()
            .partition(|e| shedding::is_shed(&e.merchant_id, self.level));
        self.shed_merchants
            .extend(shed.iter().map(|e| e.merchant_id.clone()));
        let n = keep.len() as u64;
        self.offered += n;
        if self.accepted + n > self.budget {
            return Err(OverBudget {
                budget: self.budget,
                max_level: self.max_level,
                retry_after_ms: (self.interval_start_ms + INTERVAL_MS - now_ms).max(0),
            });
        }
        self.accepted += n;
        Ok(Admitted {
            keep,
            shed: u32::try_from(shed.len()).unwrap_or(u32::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(merchants: std::ops::Range<usize>, second: i64) -> Vec<ChangeEvent> {
        merchants
            .map(|m| ChangeEvent::insert(format!("{second}-{m}"), format!("m{m}"), "orders", 0, Vec::new()))
            .collect()
    }

    #[test]
    fn under_budget_everything_is_admitted() {
        let mut a = Admission::new(100, 10, 0);
        let admitted = a.admit(batch(0..100, 0), 10).expect("fits");
        assert_eq!((admitted.keep.len(), admitted.shed), (100, 0));
        assert!(
            a.admit(batch(0..1, 0), 20).is_err(),
            "the 101st event of the second is over budget"
        );
    }

    #[test]
    fn three_times_the_budget_sheds_a_stable_subset_just_large_enough() {
        // 3000 merchants, one event each per 10 batches a second: 3x a budget of 1000/s.
        let mut a = Admission::new(1000, 100, 0);
        let mut kept_per_second = Vec::new();
        let mut shed_sets = Vec::new();
        for second in 0..8 {
            let mut kept = 0;
            for slice in 0..10 {
                let now = second * 1000 + slice * 100;
                let events = batch(slice as usize * 300..(slice as usize + 1) * 300, second);
                if let Ok(admitted) = a.admit(events, now) {
                    kept += admitted.keep.len();
                }
            }
            kept_per_second.push(kept);
            shed_sets.push(a.shed_merchants().clone());
        }
        let level = a.level();
        assert!(
            (6_500..=6_800).contains(&level),
            "level {level}: about two thirds of merchants"
        );
        // Once settled, the shed set is the same every second, and what is kept fits the budget.
        assert_eq!(shed_sets[6], shed_sets[7]);
        assert!(
            kept_per_second[7] <= 1000 && kept_per_second[7] >= 900,
            "{kept_per_second:?}"
        );
        // Exactly the merchants ranked below the level are shed.
        for m in 0..3000 {
            let merchant = format!("m{m}");
            assert_eq!(
                shed_sets[7].contains(&merchant),
                shedding::is_shed(&merchant, level),
                "{merchant}"
            );
        }
    }

    #[test]
    fn at_the_maximum_shed_share_the_excess_is_refused_with_a_retry_hint() {
        let mut a = Admission::new(100, 10, 0);
        for second in 0..5 {
            let _ = a.admit(batch(0..300, second), second * 1000);
        }
        assert_eq!(a.level(), 1000, "capped at 10%");
        let first = a.admit(batch(0..300, 9), 5_000).expect_err("still over");
        assert_eq!(
            first.retry_after_ms, 1000,
            "a new interval started with this call"
        );
        let err = a.admit(batch(0..300, 10), 5_250).expect_err("still over");
        assert_eq!(err.retry_after_ms, 750);
        assert!(err.to_string().contains("over its budget of 100 events/s"));
    }
}
