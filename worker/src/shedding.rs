//! Merchant shedding for the backup intake: over its rate budget it drops
//! *all* events of a stable, hash-selected subset of merchants rather than
//! random events, so every other merchant stays exact and the shed ones are
//! known. The subset only grows as far as the overload needs, up to the
//! policy's maximum, and shrinks slowly once the load falls.

use crate::routing::stable_hash;

/// Shed levels are in basis points of merchants (10 000 = all).
pub const ALL: u32 = 10_000;

/// A merchant's fixed place in the shedding order, `0..ALL`: merchants below
/// the level are shed. Raising the level only adds merchants (nested subsets).
pub fn rank(merchant: &str) -> u32 {
    u32::try_from(stable_hash(merchant.as_bytes()) % u64::from(ALL)).unwrap_or(0)
}

/// Whether `merchant` is shed at `level`.
pub fn is_shed(merchant: &str, level: u32) -> bool {
    // Most of the time nothing is shed: no hashing on that path.
    level > 0 && rank(merchant) < level
}

/// What one measurement interval saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Events offered by merchants not shed at the current level.
    pub admitted: u64,
    /// Events the interval's budget allows.
    pub budget: u64,
}

/// The next shed level after an interval. Over budget, it sheds the share of
/// the still-admitted merchants that the excess represents (assuming their
/// volume is spread like their number; the next interval corrects the rest).
/// Under 80 % of budget, it gives back a tenth of the level per interval, so a
/// load hovering at the budget does not make the subset flap. Never above `max`.
pub fn next_level(level: u32, load: Load, max: u32) -> u32 {
    let max = max.min(ALL);
    let level = level.min(max);
    if load.admitted > load.budget && load.admitted > 0 {
        let excess = load.admitted - load.budget;
        let remaining = u64::from(ALL - level);
        let more = (excess * remaining).div_ceil(load.admitted);
        let raised = u64::from(level) + more;
        u32::try_from(raised).unwrap_or(ALL).min(max)
    } else if load.admitted * 10 < load.budget * 8 {
        level - level.div_ceil(10)
    } else {
        level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merchants() -> Vec<String> {
        (0..20_000).map(|i| format!("m{i}")).collect()
    }

    fn shed_share(level: u32) -> f64 {
        let ms = merchants();
        ms.iter().filter(|m| is_shed(m, level)).count() as f64 / ms.len() as f64
    }

    #[test]
    fn shed_subsets_are_nested_as_the_level_grows() {
        for m in merchants().iter().take(2_000) {
            let mut shed_before = false;
            for level in (0..=ALL).step_by(250) {
                let shed = is_shed(m, level);
                assert!(
                    shed || !shed_before,
                    "{m} left the shed set when the level rose to {level}"
                );
                shed_before = shed;
            }
        }
    }

    #[test]
    fn the_level_sheds_its_share_of_merchants() {
        for (level, want) in [(0, 0.0), (1_000, 0.10), (5_000, 0.50), (ALL, 1.0)] {
            assert!(
                (shed_share(level) - want).abs() < 0.01,
                "level {level}: {}",
                shed_share(level)
            );
        }
    }

    #[test]
    fn table_of_level_changes() {
        let cases = [
            // (level, admitted, budget, max, next, why)
            (0, 1_000, 1_000, 2_000, 0, "at budget: nothing shed"),
            (
                0,
                3_000,
                1_000,
                10_000,
                6_667,
                "3x the budget: two thirds of merchants",
            ),
            (0, 3_000, 1_000, 2_000, 2_000, "capped at the policy's maximum"),
            (
                1_000,
                1_100,
                1_000,
                10_000,
                1_819,
                "still over: shed part of the rest",
            ),
            (1_000, 900, 1_000, 10_000, 1_000, "between 80% and 100%: hold"),
            (1_000, 500, 1_000, 10_000, 900, "well under: give back a tenth"),
            (5, 0, 1_000, 10_000, 4, "idle: shrinks to nothing"),
            (
                3_000,
                5_000,
                1_000,
                2_000,
                2_000,
                "policy lowered mid-overload: clamp",
            ),
        ];
        for (level, admitted, budget, max, want, why) in cases {
            assert_eq!(next_level(level, Load { admitted, budget }, max), want, "{why}");
        }
    }

    #[test]
    fn repeated_overload_converges_and_never_passes_max() {
        let mut level = 0;
        for _ in 0..20 {
            // Admitted volume falls with the shed share of a uniform 3x overload.
            let admitted = (3_000.0 * (1.0 - f64::from(level) / f64::from(ALL))) as u64;
            level = next_level(
                level,
                Load {
                    admitted,
                    budget: 1_000,
                },
                8_000,
            );
            assert!(level <= 8_000);
        }
        assert!((6_600..=6_700).contains(&level), "converged at {level}");
    }
}
