//! How a member process uses each data centre's cache, from the mode the
//! operator publishes for it (`status.caches`): one pure rule, table-tested.
//!
//! A cache that does not answer would otherwise fail every write (each write
//! invalidates every data centre's cache, or fails). Published `Degraded`,
//! it is left out: writes go to the other data centres' caches alone, and
//! its own data centre reads around it. It then holds entries that missed
//! the outage's invalidations, so once it answers again (`Recovering`)
//! writes invalidate it again, whether it takes them or not, but nothing
//! reads it until the operator has emptied it and published it `Normal`.

use ballast_crds::Mode;

/// What a write does with one data centre's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// Invalidated, or the write fails naming it (no half-success).
    Required,
    /// Invalidated if it answers; a failure is counted and the write goes on.
    BestEffort,
    /// Not called at all: it does not answer, and waiting for its deadline
    /// on every write would slow them all.
    Skipped,
}

/// How one data centre's cache is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    /// Whether its own data centre reads (and fills) it.
    pub read: bool,
    /// What a write does with it.
    pub invalidation: Invalidation,
}

/// How a cache published in `mode` is used. Pure.
pub fn use_of(mode: Mode) -> Use {
    match mode {
        Mode::Normal => Use {
            read: true,
            invalidation: Invalidation::Required,
        },
        Mode::Degraded => Use {
            read: false,
            invalidation: Invalidation::Skipped,
        },
        Mode::Recovering => Use {
            read: false,
            invalidation: Invalidation::BestEffort,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_normal_cache_is_read_and_only_a_degraded_one_is_left_out_of_writes() {
        let table = [
            (Mode::Normal, true, Invalidation::Required),
            (Mode::Degraded, false, Invalidation::Skipped),
            (Mode::Recovering, false, Invalidation::BestEffort),
        ];
        for (mode, read, invalidation) in table {
            assert_eq!(use_of(mode), Use { read, invalidation }, "{mode:?}");
        }
    }
}
