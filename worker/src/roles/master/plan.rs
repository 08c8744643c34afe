//! What the master plans: which windows have closed, how many tasks a window
//! is cut into, and which degraded-mode period (hour) a window belongs to. Pure.

/// Windows (by start) that have closed at `now_ms`, from `next_window_ms` on,
/// at most `max` of them. A window `[s, s + window)` is closed once `grace_ms`
/// past its end, so that events still in flight through Kafka land first.
pub fn closed_windows(
    next_window_ms: i64,
    now_ms: i64,
    window_ms: i64,
    grace_ms: i64,
    max: usize,
) -> Vec<i64> {
    let window_ms = window_ms.max(1);
    let mut out = Vec::new();
    let mut start = next_window_ms;
    while out.len() < max && start + window_ms + grace_ms <= now_ms {
        out.push(start);
        start += window_ms;
    }
    out
}

/// Tasks a window of `events` is cut into: one per `events_per_task` started,
/// at least one, at most `max`. Large windows split by merchant partition.
pub fn partitions(events: u64, events_per_task: u64, max: u32) -> u32 {
    let n = events.div_ceil(events_per_task.max(1)).max(1);
    u32::try_from(n).unwrap_or(u32::MAX).clamp(1, max.max(1))
}

/// Start of the period of `period_ms` (e.g. the hour) holding `time_ms`.
pub fn period_of(time_ms: i64, period_ms: i64) -> i64 {
    let period_ms = period_ms.max(1);
    time_ms.div_euclid(period_ms) * period_ms
}

/// Where a fresh master starts when no state was persisted: the window
/// before the current one, so that the first closed window is computed.
pub fn first_window(now_ms: i64, window_ms: i64) -> i64 {
    let window_ms = window_ms.max(1);
    now_ms.div_euclid(window_ms) * window_ms - window_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 3_600_000;

    #[test]
    fn a_window_closes_only_after_its_grace() {
        let cases = [
            // (next, now, window, grace, max, want)
            (0, 59_999, 60_000, 0, 10, vec![]),
            (0, 60_000, 60_000, 0, 10, vec![0]),
            (0, 61_999, 60_000, 2_000, 10, vec![]),
            (0, 62_000, 60_000, 2_000, 10, vec![0]),
            (0, 185_000, 60_000, 2_000, 10, vec![0, 60_000, 120_000]),
            (0, 185_000, 60_000, 2_000, 2, vec![0, 60_000]),
            (120_000, 185_000, 60_000, 2_000, 10, vec![120_000]),
        ];
        for (next, now, window, grace, max, want) in cases {
            assert_eq!(
                closed_windows(next, now, window, grace, max),
                want,
                "next {next} now {now}"
            );
        }
    }

    #[test]
    fn large_windows_split_into_bounded_partitions() {
        let cases = [
            (0, 1),
            (1, 1),
            (100_000, 1),
            (100_001, 2),
            (1_000_000, 10),
            (u64::MAX, 64),
        ];
        for (events, want) in cases {
            assert_eq!(partitions(events, 100_000, 64), want, "{events} events");
        }
    }

    #[test]
    fn hours_and_first_windows_round_down() {
        assert_eq!(period_of(HOUR_MS + 5, HOUR_MS), HOUR_MS);
        assert_eq!(period_of(-1, HOUR_MS), -HOUR_MS);
        assert_eq!(period_of(901_000, 900_000), 900_000);
        assert_eq!(first_window(125_000, 60_000), 60_000);
    }
}
