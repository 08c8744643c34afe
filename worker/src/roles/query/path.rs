//! Which stores a hot answer is read from, by the published modes (a store
//! whose calls fail before the operator publishes its mode is skipped by its
//! breaker: the call is refused at once and the read falls back, see
//! [`without_cache`]), and how a cache hash is trusted. Pure.

use ballast_crds::Mode;

/// The stores a hot answer is read from, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The Redis cache; on a miss the hot MySQL, filling the cache.
    CacheThenMysql,
    /// The Redis cache alone (the hot MySQL is down): a merchant not in it is unavailable.
    CacheOnly,
    /// This pod's in-process cache, then the hot MySQL behind the rate limit
    /// (the Redis cache is down).
    LocalThenMysql,
    /// This pod's in-process cache alone (both stores are down).
    LocalOnly,
}

/// Whether a store can be read: not published Degraded.
pub fn usable(mode: Mode) -> bool {
    mode != Mode::Degraded
}

/// The path for a hot read from whether each store is usable.
pub fn path(cache: bool, mysql: bool) -> Path {
    match (cache, mysql) {
        (true, true) => Path::CacheThenMysql,
        (true, false) => Path::CacheOnly,
        (false, true) => Path::LocalThenMysql,
        (false, false) => Path::LocalOnly,
    }
}

/// The path after the cache failed on this request: the same reads without it.
pub fn without_cache(path: Path) -> Path {
    match path {
        Path::CacheThenMysql | Path::LocalThenMysql => Path::LocalThenMysql,
        Path::CacheOnly | Path::LocalOnly => Path::LocalOnly,
    }
}

/// Whether a merchant's cached day can be served as it is: it was checked
/// against the hot MySQL in the current cache epoch (every result written
/// since reached the cache too). An unchecked one may miss results written
/// while the cache was down; it is checked against MySQL first.
pub fn trusted(checked_epoch: Option<i64>, cache_epoch: i64) -> bool {
    checked_epoch == Some(cache_epoch)
}

/// How long after the cache came back checks of cached days are paced.
pub const REWARM_MS: i64 = 5 * 60 * 1000;

/// Whether checks of cached days against the hot MySQL are paced now: while
/// the cache recovers, and for [`REWARM_MS`] after it is published Normal
/// again (`since_ms`, at an epoch past 0: it was away), when every merchant's
/// day is unchecked at once. Any other time a check is one merchant's first
/// read of its day, and goes to MySQL unpaced as a miss does. Pure.
pub fn pace_checks(cache: (Mode, i64), since_ms: Option<i64>, now_ms: i64) -> bool {
    match cache {
        (Mode::Recovering, _) => true,
        (Mode::Normal, epoch) if epoch > 0 => since_ms.is_some_and(|since| now_ms - since < REWARM_MS),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_paced_only_while_the_cache_rewarms() {
        let now = 1_000_000_000;
        // (cache mode and epoch, since, paced)
        let cases = [
            ((Mode::Recovering, 2), Some(now - 1), true),
            ((Mode::Normal, 3), Some(now - 1_000), true),
            ((Mode::Normal, 3), Some(now - REWARM_MS + 1), true),
            ((Mode::Normal, 3), Some(now - REWARM_MS), false),
            ((Mode::Normal, 3), None, false),
            // Normal since the pipeline began: never away, nothing to re-warm.
            ((Mode::Normal, 0), Some(now - 1_000), false),
            // The cache is not read at all.
            ((Mode::Degraded, 1), Some(now), false),
        ];
        for (mode, since, want) in cases {
            assert_eq!(pace_checks(mode, since, now), want, "{mode:?} since {since:?}");
        }
    }

    #[test]
    fn each_store_outage_has_its_path() {
        // (cache mode, mysql mode, path)
        let cases = [
            (Mode::Normal, Mode::Normal, Path::CacheThenMysql),
            (Mode::Recovering, Mode::Recovering, Path::CacheThenMysql),
            (Mode::Normal, Mode::Degraded, Path::CacheOnly),
            (Mode::Recovering, Mode::Degraded, Path::CacheOnly),
            (Mode::Degraded, Mode::Normal, Path::LocalThenMysql),
            (Mode::Degraded, Mode::Recovering, Path::LocalThenMysql),
            (Mode::Degraded, Mode::Degraded, Path::LocalOnly),
        ];
        for (cache, mysql, want) in cases {
            assert_eq!(
                path(usable(cache), usable(mysql)),
                want,
                "cache {cache:?}, mysql {mysql:?}"
            );
        }
    }

    #[test]
    fn a_failed_cache_read_falls_back_to_the_local_cache() {
        let cases = [
            (Path::CacheThenMysql, Path::LocalThenMysql),
            (Path::CacheOnly, Path::LocalOnly),
            (Path::LocalThenMysql, Path::LocalThenMysql),
            (Path::LocalOnly, Path::LocalOnly),
        ];
        for (before, after) in cases {
            assert_eq!(without_cache(before), after, "{before:?}");
        }
    }

    #[test]
    fn only_a_hash_checked_in_this_cache_epoch_is_trusted() {
        let cases = [
            (Some(4), 4, true),
            (Some(2), 4, false),
            (None, 0, false),
            (Some(0), 0, true),
        ];
        for (checked, epoch, want) in cases {
            assert_eq!(trusted(checked, epoch), want, "{checked:?} in {epoch}");
        }
    }
}
