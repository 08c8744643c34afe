//! How far behind the stream a kept cluster is, in records and in seconds. Pure.

/// A cluster's lag behind the change stream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// Records in the stream the cluster has not applied.
    pub events: i64,
    /// An upper bound on the age of the oldest of them, in seconds (0 when
    /// none): what a promotion of this cluster would lose at most, in time.
    pub seconds: f64,
}

/// The lag of a cluster whose group has committed `committed`, with the
/// stream ending at `end`, at `now_ms`. The oldest unapplied record came
/// after the last one applied (`last_applied_ms`, when Kafka took it) and
/// after the cluster was last seen caught up (`caught_up_ms`): its age is at
/// most the time since the later of the two. `None` while Kafka does not say
/// where the stream or the group is.
pub fn of(
    end: Option<i64>,
    committed: Option<i64>,
    last_applied_ms: Option<i64>,
    caught_up_ms: i64,
    now_ms: i64,
) -> Option<Lag> {
    let events = (end? - committed?).max(0);
    let since = last_applied_ms.map_or(caught_up_ms, |ms| ms.max(caught_up_ms));
    let seconds = if events == 0 {
        0.0
    } else {
        // Milliseconds to seconds: exact for any lag this side of 2^53 ms.
        #[allow(clippy::cast_precision_loss)]
        let s = (now_ms - since).max(0) as f64 / 1000.0;
        s
    };
    Some(Lag { events, seconds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_the_records_not_applied_and_bounds_their_age() {
        // (end, committed, last applied at, caught up at, now) → lag
        let cases = [
            ((Some(10), Some(10), Some(5_000), 1_000, 9_000), Some((0, 0.0))),
            ((Some(15), Some(10), Some(5_000), 1_000, 9_000), Some((5, 4.0))),
            // Caught up after the last record applied: records since are younger.
            ((Some(15), Some(10), Some(5_000), 8_000, 9_000), Some((5, 1.0))),
            // Nothing applied yet: since the cluster was last caught up (or started).
            ((Some(3), Some(0), None, 2_000, 9_000), Some((3, 7.0))),
            // A committed offset past the end seen (read at another moment) is no lag.
            ((Some(10), Some(12), None, 0, 9_000), Some((0, 0.0))),
            // A clock that went back gives no negative age.
            ((Some(11), Some(10), Some(9_500), 0, 9_000), Some((1, 0.0))),
            ((None, Some(10), None, 0, 9_000), None),
            ((Some(10), None, None, 0, 9_000), None),
        ];
        for ((end, committed, last, caught_up, now), want) in cases {
            let got = of(end, committed, last, caught_up, now).map(|l| (l.events, l.seconds));
            assert_eq!(got, want, "end {end:?} committed {committed:?} last {last:?}");
        }
    }
}
