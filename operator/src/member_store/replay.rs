//! The kept primary's replay, on this operator's clock: since when it has
//! lacked nothing (the failback's dwell starts there), and since when it
//! has applied nothing while it lacks records (a stalled replay: a cluster
//! that refuses the replicator's writes, which only a person can mend, and
//! which the lag alone does not tell apart from a slow one).

use std::time::Duration;

use tokio::time::Instant;

use super::StoreState;

/// Where the kept primary's replay stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// How long it has lacked nothing.
    pub caught_up_for: Option<Duration>,
    /// How long it has applied nothing while it lacks records.
    pub stalled_for: Option<Duration>,
}

/// What one measurement says of the kept primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Its Elasticsearch answers the probes: a replay can only stall once
    /// it does (while it is down, the replicator waits).
    pub answers: bool,
    /// It lacks nothing, within the lag budget ([`super::status::caught_up`]).
    pub caught_up: bool,
    /// Its applied offset and whether it lacks records, if measured.
    pub applied: Option<(i64, bool)>,
}

/// The applied offset and since when it has stood, after `seen` at `now`,
/// given `last`: none while it lacks nothing (or is not kept); kept as it
/// was when not measured; restarted when it moved. Pure.
pub fn standing(
    last: Option<(i64, Instant)>,
    applied: Option<(i64, bool)>,
    now: Instant,
) -> Option<(i64, Instant)> {
    match applied {
        None => last,
        Some((_, false)) => None,
        Some((offset, true)) => match last {
            Some((was, since)) if was == offset => Some((was, since)),
            _ => Some((offset, now)),
        },
    }
}

/// Steps `state`'s view of the kept primary with `seen` (none when the
/// primary is active, so not kept).
pub fn track(state: &mut StoreState, seen: Option<Seen>) -> Replay {
    let now = Instant::now();
    let Some(seen) = seen else {
        state.primary_caught_up_since = None;
        state.primary_applied = None;
        return Replay::default();
    };
    let caught_up_for = if seen.caught_up {
        Some(now - *state.primary_caught_up_since.get_or_insert(now))
    } else {
        state.primary_caught_up_since = None;
        None
    };
    state.primary_applied = if seen.answers {
        standing(state.primary_applied, seen.applied, now)
    } else {
        None
    };
    Replay {
        caught_up_for,
        stalled_for: state.primary_applied.map(|(_, since)| now - since),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_stands_from_when_its_applied_offset_last_moved_while_it_lacks_records() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        let cases = [
            // (last, measured: (applied, lacking), want)
            (None, Some((10, true)), Some((10, t1))),
            (Some((10, t0)), Some((10, true)), Some((10, t0))),
            (Some((10, t0)), Some((12, true)), Some((12, t1))),
            (Some((10, t0)), Some((20, false)), None),
            (Some((10, t0)), None, Some((10, t0))),
            (None, None, None),
        ];
        for (i, (last, applied, want)) in cases.into_iter().enumerate() {
            assert_eq!(standing(last, applied, t1), want, "case {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_kept_primary_is_stalled_while_it_applies_nothing_and_caught_up_once_it_lacks_nothing() {
        let mut state = StoreState::default();
        let lacking = |applied| Seen {
            answers: true,
            caught_up: false,
            applied: Some((applied, true)),
        };
        assert_eq!(
            track(&mut state, Some(lacking(3))).stalled_for,
            Some(Duration::ZERO)
        );
        tokio::time::advance(Duration::from_secs(40)).await;
        let stuck = track(&mut state, Some(lacking(3)));
        assert_eq!(stuck.stalled_for, Some(Duration::from_secs(40)));
        assert_eq!(stuck.caught_up_for, None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            track(&mut state, Some(lacking(4))).stalled_for,
            Some(Duration::ZERO)
        );
        let down = Seen {
            answers: false,
            ..lacking(4)
        };
        assert_eq!(
            track(&mut state, Some(down)).stalled_for,
            None,
            "down: no replay to stall"
        );
        assert_eq!(
            track(&mut state, Some(lacking(4))).stalled_for,
            Some(Duration::ZERO),
            "from its return"
        );
        let done = Seen {
            answers: true,
            caught_up: true,
            applied: Some((9, false)),
        };
        assert_eq!(
            track(&mut state, Some(done)),
            Replay {
                caught_up_for: Some(Duration::ZERO),
                stalled_for: None,
            }
        );
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(
            track(&mut state, Some(done)).caught_up_for,
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            track(&mut state, None),
            Replay::default(),
            "the primary active again"
        );
    }
}
