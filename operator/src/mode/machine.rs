//! The per-dependency mode state machine: Normal → Degraded → Recovering → Normal.
//!
//! A pure function of (state, input, thresholds, time). Hysteresis comes from
//! the thresholds: `failure` consecutive lost probes leave Normal, `success`
//! consecutive answers leave Degraded, and any lost probe while Recovering goes
//! back to Degraded, so a flapping dependency stays Degraded rather than
//! making the pipeline flap. Every transition raises the epoch by one.

use ballast_crds::{ForcedMode, Mode};
use k8s_openapi::jiff::Timestamp;

/// The outcome of one probe. A timeout is a `Down`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The dependency answered in time.
    Up,
    /// It did not, or answered with an error.
    Down,
}

/// Consecutive probe counts that switch modes (from the DegradationPolicy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Lost probes in a row that leave Normal.
    pub failure: u32,
    /// Answers in a row that leave Degraded.
    pub success: u32,
}

/// The state of one dependency's machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Published mode.
    pub mode: Mode,
    /// Raised on every transition.
    pub epoch: i64,
    /// When `mode` was entered.
    pub since: Timestamp,
    /// Whether `mode` is forced by the override.
    pub forced: bool,
    /// Consecutive lost probes.
    pub failures: u32,
    /// Consecutive answered probes.
    pub successes: u32,
}

impl Machine {
    /// A machine in Normal at epoch 0, as for a new pipeline.
    pub fn new(now: Timestamp) -> Self {
        Self {
            mode: Mode::Normal,
            epoch: 0,
            since: now,
            forced: false,
            failures: 0,
            successes: 0,
        }
    }
}

/// Everything one step looks at besides the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    /// A new probe result, if one arrived.
    pub observation: Option<Observation>,
    /// While Recovering: the switch back is done (consumers moved back), so
    /// Normal can be published.
    pub switched_back: bool,
    /// The override's forced mode for this dependency.
    pub forced: Option<ForcedMode>,
    /// The override pauses automatic switches.
    pub paused: bool,
}

/// Why a transition happened, for conditions, Events and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `failure` probes in a row were lost.
    FailureThresholdReached,
    /// `success` probes in a row answered.
    SuccessThresholdReached,
    /// A probe was lost while Recovering.
    FailedWhileRecovering,
    /// Consumers are back on the dependency.
    SwitchedBack,
    /// The override forced the mode.
    Forced,
    /// The override was lifted; probes decide again from the forced mode.
    ForceLifted,
}

impl Transition {
    /// The CamelCase reason used in status and Events.
    pub fn reason(self) -> &'static str {
        match self {
            Self::FailureThresholdReached => "ProbeFailureThresholdReached",
            Self::SuccessThresholdReached => "ProbeSuccessThresholdReached",
            Self::FailedWhileRecovering => "ProbeFailedWhileRecovering",
            Self::SwitchedBack => "SwitchedBack",
            Self::Forced => "ForcedByOverride",
            Self::ForceLifted => "OverrideLifted",
        }
    }
}

/// The result of one step: the next state, and the transition if the mode changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The state after the step.
    pub machine: Machine,
    /// Set when the mode (or its forced flag) changed.
    pub transition: Option<Transition>,
}

/// Advances `state` by one input. Thresholds below 1 count as 1.
pub fn step(state: &Machine, input: Input, thresholds: Thresholds, now: Timestamp) -> Step {
    let mut next = state.clone();
    match input.observation {
        Some(Observation::Up) => {
            next.successes = next.successes.saturating_add(1);
            next.failures = 0;
        }
        Some(Observation::Down) => {
            next.failures = next.failures.saturating_add(1);
            next.successes = 0;
        }
        None => {}
    }

    let target = match input.forced {
        Some(forced) => Some((forced_mode(forced), Transition::Forced)),
        None if state.forced => Some((state.mode, Transition::ForceLifted)),
        None if input.paused => None,
        None => automatic(&next, input, thresholds),
    };
    let Some((mode, transition)) = target else {
        return Step {
            machine: next,
            transition: None,
        };
    };
    let forced = input.forced.is_some();
    if mode == state.mode && forced == state.forced {
        return Step {
            machine: next,
            transition: None,
        };
    }
    if mode != state.mode {
        next.epoch += 1;
        next.since = now;
    }
    next.mode = mode;
    next.forced = forced;
    // A new mode starts counting afresh, so that its own threshold is met by
    // probes taken in it.
    next.failures = 0;
    next.successes = 0;
    Step {
        machine: next,
        transition: Some(transition),
    }
}

fn forced_mode(forced: ForcedMode) -> Mode {
    match forced {
        ForcedMode::Normal => Mode::Normal,
        ForcedMode::Degraded => Mode::Degraded,
    }
}

fn automatic(next: &Machine, input: Input, thresholds: Thresholds) -> Option<(Mode, Transition)> {
    let failure = thresholds.failure.max(1);
    let success = thresholds.success.max(1);
    match next.mode {
        Mode::Normal if next.failures >= failure => {
            Some((Mode::Degraded, Transition::FailureThresholdReached))
        }
        Mode::Degraded if next.successes >= success => {
            Some((Mode::Recovering, Transition::SuccessThresholdReached))
        }
        Mode::Recovering if input.observation == Some(Observation::Down) => {
            Some((Mode::Degraded, Transition::FailedWhileRecovering))
        }
        Mode::Recovering if input.switched_back => Some((Mode::Normal, Transition::SwitchedBack)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::{Down, Up};

    const T: Thresholds = Thresholds {
        failure: 3,
        success: 2,
    };

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("valid")
    }

    fn probe(o: Observation) -> Input {
        Input {
            observation: Some(o),
            switched_back: false,
            forced: None,
            paused: false,
        }
    }

    /// Runs `inputs` from a fresh machine, one second apart; returns the modes after each.
    fn run(inputs: &[Input], thresholds: Thresholds) -> (Vec<Mode>, Machine) {
        let mut m = Machine::new(at(0));
        let mut modes = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            m = step(&m, *input, thresholds, at(i as i64 + 1)).machine;
            modes.push(m.mode);
        }
        (modes, m)
    }

    #[test]
    fn failures_below_threshold_never_leave_normal() {
        let (modes, m) = run(
            &[probe(Down), probe(Down), probe(Up), probe(Down), probe(Down)],
            T,
        );
        assert!(modes.iter().all(|m| *m == Mode::Normal), "{modes:?}");
        assert_eq!(m.epoch, 0);
    }

    #[test]
    fn table_of_sequences() {
        use Mode::{Degraded as D, Normal as N, Recovering as R};
        let back = Input {
            observation: None,
            switched_back: true,
            forced: None,
            paused: false,
        };
        let cases: Vec<(&str, Vec<Input>, Vec<Mode>, i64)> = vec![
            (
                "threshold of failures degrades",
                vec![probe(Down); 3],
                vec![N, N, D],
                1,
            ),
            (
                "answers after degrade recover, switch-back completes",
                vec![probe(Down), probe(Down), probe(Down), probe(Up), probe(Up), back],
                vec![N, N, D, D, R, N],
                3,
            ),
            (
                "lost probe while recovering degrades again",
                vec![
                    probe(Down),
                    probe(Down),
                    probe(Down),
                    probe(Up),
                    probe(Up),
                    probe(Down),
                ],
                vec![N, N, D, D, R, D],
                3,
            ),
            (
                "flapping dependency stays degraded",
                vec![
                    probe(Down),
                    probe(Down),
                    probe(Down),
                    probe(Up),
                    probe(Down),
                    probe(Up),
                    probe(Down),
                    probe(Up),
                    probe(Down),
                ],
                vec![N, N, D, D, D, D, D, D, D],
                1,
            ),
            (
                "switched-back flag alone does nothing in Normal",
                vec![back, back],
                vec![N, N],
                0,
            ),
            (
                "inputs without a probe keep counting state",
                vec![
                    probe(Down),
                    probe(Down),
                    Input {
                        observation: None,
                        ..probe(Up)
                    },
                    probe(Down),
                ],
                vec![N, N, N, D],
                1,
            ),
        ];
        for (name, inputs, want, epoch) in cases {
            let (modes, m) = run(&inputs, T);
            assert_eq!(modes, want, "{name}");
            assert_eq!(m.epoch, epoch, "{name}: epoch");
        }
    }

    #[test]
    fn transition_sets_since_and_raises_epoch_once() {
        let m = Machine::new(at(0));
        let m = step(&m, probe(Down), T, at(1)).machine;
        let m = step(&m, probe(Down), T, at(2)).machine;
        let s = step(&m, probe(Down), T, at(3));
        assert_eq!(s.transition, Some(Transition::FailureThresholdReached));
        assert_eq!(
            (s.machine.mode, s.machine.epoch, s.machine.since),
            (Mode::Degraded, 1, at(3))
        );
        let s = step(&s.machine, probe(Down), T, at(4));
        assert_eq!(s.transition, None);
        assert_eq!((s.machine.epoch, s.machine.since), (1, at(3)));
    }

    #[test]
    fn policy_changed_mid_failure_applies_new_thresholds_at_once() {
        let m = Machine::new(at(0));
        let m = step(&m, probe(Down), T, at(1)).machine;
        let m = step(&m, probe(Down), T, at(2)).machine;
        // The policy is lowered to 2 failures: the failures already seen count.
        let lowered = Thresholds {
            failure: 2,
            success: 2,
        };
        let s = step(
            &m,
            Input {
                observation: None,
                ..probe(Up)
            },
            lowered,
            at(3),
        );
        assert_eq!(s.machine.mode, Mode::Degraded);
        // Raised success threshold mid-failure: two answers are no longer enough.
        let raised = Thresholds {
            failure: 2,
            success: 4,
        };
        let mut m = s.machine;
        for t in 4..6 {
            m = step(&m, probe(Up), raised, at(t)).machine;
        }
        assert_eq!(m.mode, Mode::Degraded);
        for t in 6..8 {
            m = step(&m, probe(Up), raised, at(t)).machine;
        }
        assert_eq!(m.mode, Mode::Recovering);
    }

    #[test]
    fn pause_holds_the_mode_while_probes_keep_counting() {
        let paused = |o| Input {
            observation: Some(o),
            switched_back: false,
            forced: None,
            paused: true,
        };
        let (modes, m) = run(&[paused(Down), paused(Down), paused(Down), paused(Down)], T);
        assert!(modes.iter().all(|m| *m == Mode::Normal));
        assert_eq!(m.failures, 4);
        // Unpaused, the next step acts on the count at once.
        let s = step(
            &m,
            Input {
                observation: None,
                ..probe(Up)
            },
            T,
            at(9),
        );
        assert_eq!(s.machine.mode, Mode::Degraded);
    }

    #[test]
    fn forced_mode_wins_over_probes_and_lifting_it_resumes_from_there() {
        let force = |o, f| Input {
            observation: Some(o),
            switched_back: false,
            forced: Some(f),
            paused: false,
        };
        let m = Machine::new(at(0));
        let s = step(&m, force(Up, ForcedMode::Degraded), T, at(1));
        assert_eq!(s.transition, Some(Transition::Forced));
        assert_eq!(
            (s.machine.mode, s.machine.forced, s.machine.epoch),
            (Mode::Degraded, true, 1)
        );
        // Probes answering do not move a forced mode.
        let s = step(&s.machine, force(Up, ForcedMode::Degraded), T, at(2));
        assert_eq!((s.machine.mode, s.transition), (Mode::Degraded, None));
        // Lifting the force keeps the mode, unflagged, with no new epoch.
        let s = step(&s.machine, probe(Up), T, at(3));
        assert_eq!(s.transition, Some(Transition::ForceLifted));
        assert_eq!(
            (s.machine.mode, s.machine.forced, s.machine.epoch),
            (Mode::Degraded, false, 1)
        );
        // Then probes decide: two answers start the recovery.
        let s = step(&s.machine, probe(Up), T, at(4));
        let s = step(&s.machine, probe(Up), T, at(5));
        assert_eq!(s.machine.mode, Mode::Recovering);
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let zero = Thresholds {
            failure: 0,
            success: 0,
        };
        let (modes, _) = run(&[probe(Down)], zero);
        assert_eq!(modes, [Mode::Degraded]);
    }
}
