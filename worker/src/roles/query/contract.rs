//! The response contract every answer of the query service carries, whatever
//! served it: where it came from, how recent it is, the modes that shaped it,
//! and how complete it is (with each reason and the time range it covers).
//! The completeness is decided here, by one pure function.

use ballast_crds::{Dependency, Mode};
use serde::Serialize;

use crate::modes::Modes;
use crate::shedding;

/// Which store answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The Redis result cache.
    Cache,
    /// The hot MySQL (and the cache filled from it).
    Mysql,
    /// This pod's in-process cache (the Redis cache is down).
    LocalCache,
    /// The cold store.
    Elasticsearch,
    /// A cold answer the daily job computed ahead.
    Precomputed,
}

impl Source {
    /// The name answers and metric labels use.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Mysql => "mysql",
            Source::LocalCache => "local-cache",
            Source::Elasticsearch => "elasticsearch",
            Source::Precomputed => "precomputed",
        }
    }
}

/// Whether an answer holds everything it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing is missing.
    Complete,
    /// Something is missing or may still change: see the reasons.
    Partial,
}

impl Status {
    /// The name answers and metric labels use.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Partial => "partial",
        }
    }
}

/// Why an answer is partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReasonCode {
    /// The backup intake shed this merchant's events on that day (Kafka was
    /// down and the intake over its budget): its numbers miss events.
    MerchantShed,
    /// The KV store is degraded: results are computed hourly only, and the
    /// day's totals are unavailable.
    HourlyOnly,
    /// The hot MySQL is degraded: answered from the cache alone.
    CacheOnly,
    /// The Redis cache is degraded: answered from this pod's in-process
    /// cache, which may be up to its TTL old.
    LocalCache,
    /// Windows still inside the lateness: late events may still change them.
    LateDataPossible,
    /// The computation of a window (or of an hour or the day to date) keeps
    /// failing: its results are missing until a retry succeeds.
    WindowFailing,
    /// Served from the cache before it was checked against the hot MySQL
    /// (the checks are paced): results computed while the cache was down may
    /// be missing until it is.
    CacheUnchecked,
}

/// One reason an answer is partial, and the time it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// Machine-readable reason.
    pub code: ReasonCode,
    /// What a person reads.
    pub message: String,
    /// Start of the range it covers, in milliseconds since the Unix epoch.
    pub from_ms: i64,
    /// End of the range it covers (exclusive).
    pub to_ms: i64,
}

/// How complete an answer is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Completeness {
    /// Complete or partial.
    pub status: Status,
    /// Each reason it is partial; empty when complete.
    pub reasons: Vec<Reason>,
}

impl Completeness {
    /// Complete when there is no reason, partial otherwise.
    pub fn of(mut reasons: Vec<Reason>) -> Self {
        reasons.sort_by_key(|r| r.code);
        let status = if reasons.is_empty() {
            Status::Complete
        } else {
            Status::Partial
        };
        Self { status, reasons }
    }
}

/// The published mode of each dependency, as an answer names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModeOf {
    /// The dependency (`mq`, `kv`, `mysql`, `cache`, `cold`).
    pub dependency: &'static str,
    /// Its mode.
    pub mode: Mode,
}

/// Every dependency's published mode.
pub fn modes_of(modes: &Modes) -> Vec<ModeOf> {
    Dependency::ALL
        .into_iter()
        .map(|d| ModeOf {
            dependency: d.as_str(),
            mode: modes.get(d).0,
        })
        .collect()
}

/// What the completeness of a "today" answer depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TodayFacts<'a> {
    /// The merchant asked about.
    pub merchant: &'a str,
    /// Start of the UTC day asked about, in ms.
    pub day_start_ms: i64,
    /// The day as `YYYY-MM-DD` (as `lastShedDay` names it).
    pub day: &'a str,
    /// Now, in ms.
    pub now_ms: i64,
    /// End of the newest window included, if any.
    pub as_of_ms: Option<i64>,
    /// How long after closing a window may still change.
    pub lateness_ms: i64,
    /// Which store answered.
    pub source: Source,
    /// The cached day was served before its check against the hot MySQL.
    pub unchecked: bool,
}

/// Every reason a "today" answer is partial, from the published modes and
/// the answer's facts. Pure.
pub fn today_reasons(modes: &Modes, facts: &TodayFacts<'_>) -> Vec<Reason> {
    let day_end = facts.day_start_ms + crate::results::cache::DAY_MS;
    let until = facts.now_ms.min(day_end);
    let mut reasons = Vec::new();
    let shed = modes.shedding();
    let shed_now = shedding::is_shed(facts.merchant, u32::try_from(shed.level).unwrap_or(0));
    let shed_that_day = shed.last_day.as_ref().is_some_and(|d| {
        d.day == facts.day && shedding::is_shed(facts.merchant, u32::try_from(d.max_level).unwrap_or(0))
    });
    // Shed now counts for today only: `lastShedDay` says which day it was.
    let today = facts.now_ms >= facts.day_start_ms && facts.now_ms < day_end;
    if shed_that_day || (shed_now && today) {
        reasons.push(Reason {
            code: ReasonCode::MerchantShed,
            message: "the backup intake shed this merchant's events on this day (Kafka was down and \
                      the intake over its budget): its numbers miss those events"
                .into(),
            from_ms: facts.day_start_ms,
            to_ms: until,
        });
    }
    let since = |d: Dependency| {
        modes
            .since_ms(d)
            .unwrap_or(facts.day_start_ms)
            .max(facts.day_start_ms)
    };
    if modes.get(Dependency::Kv).0 == Mode::Degraded && today {
        reasons.push(Reason {
            code: ReasonCode::HourlyOnly,
            message: "the KV store is degraded: results are computed hourly from the slaves' memory, \
                      and this day's totals cannot be computed"
                .into(),
            from_ms: since(Dependency::Kv),
            to_ms: until,
        });
    }
    match facts.source {
        Source::Cache if modes.get(Dependency::Mysql).0 == Mode::Degraded => reasons.push(Reason {
            code: ReasonCode::CacheOnly,
            message: "the hot MySQL is degraded: answered from the result cache alone".into(),
            from_ms: since(Dependency::Mysql),
            to_ms: until,
        }),
        Source::LocalCache => reasons.push(Reason {
            code: ReasonCode::LocalCache,
            message: "the result cache is degraded: answered from this server's in-process cache, \
                      which may lag the newest windows by its TTL"
                .into(),
            from_ms: since(Dependency::Cache),
            to_ms: until,
        }),
        _ => {}
    }
    if facts.unchecked {
        reasons.push(Reason {
            code: ReasonCode::CacheUnchecked,
            message: "answered from the result cache before it was checked against the hot MySQL \
                      (checks are paced after a cache outage): results computed while the cache was \
                      down may be missing"
                .into(),
            from_ms: facts.day_start_ms,
            to_ms: until,
        });
    }
    for failing in modes.failing_windows() {
        let (from_ms, to_ms) = (
            failing.start_ms.max(facts.day_start_ms),
            failing.end_ms.min(day_end),
        );
        if from_ms < to_ms {
            // The error stays in the pipeline's status: it speaks of events
            // and slaves, not of what a merchant reads.
            reasons.push(Reason {
                code: ReasonCode::WindowFailing,
                message: format!(
                    "computing this {} keeps failing ({} attempts so far): its results are missing \
                     until a retry succeeds",
                    match failing.kind.as_str() {
                        kind @ ("hour" | "day") => kind,
                        _ => "window",
                    },
                    failing.attempts
                ),
                from_ms,
                to_ms,
            });
        }
    }
    if let Some(as_of) = facts.as_of_ms {
        // Windows that closed within the lateness may still be computed again.
        let open_from = facts.now_ms - facts.lateness_ms;
        if as_of > open_from {
            reasons.push(Reason {
                code: ReasonCode::LateDataPossible,
                message: "the newest windows are within the lateness: late events may still change them"
                    .into(),
                from_ms: open_from.max(facts.day_start_ms),
                to_ms: as_of,
            });
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_crds::analytics_pipeline::ShedDay;

    use crate::modes::Shedding;

    const DAY: i64 = 20_000 * crate::results::cache::DAY_MS;
    const HOUR: i64 = 3_600_000;

    /// A merchant the shedding order puts first (rank below 100 basis points) and one it puts last.
    fn ranked() -> (String, String) {
        let names: Vec<String> = (0..20_000).map(|i| format!("m{i}")).collect();
        let low = names
            .iter()
            .find(|m| shedding::rank(m) < 100)
            .cloned()
            .unwrap_or_default();
        let high = names
            .iter()
            .find(|m| shedding::rank(m) > 9_900)
            .cloned()
            .unwrap_or_default();
        (low, high)
    }

    fn facts<'a>(merchant: &'a str, source: Source, as_of_ms: Option<i64>) -> TodayFacts<'a> {
        TodayFacts {
            merchant,
            day_start_ms: DAY,
            day: "2024-10-04",
            now_ms: DAY + 10 * HOUR,
            as_of_ms,
            lateness_ms: 120_000,
            source,
            unchecked: false,
        }
    }

    fn codes(reasons: &[Reason]) -> Vec<ReasonCode> {
        let mut codes: Vec<ReasonCode> = reasons.iter().map(|r| r.code).collect();
        codes.sort();
        codes
    }

    #[test]
    fn each_degraded_mode_and_shedding_gives_its_reason() {
        use ReasonCode::*;
        let (shed, kept) = ranked();
        let normal = Modes::default();
        let shed_today = |level| {
            Modes::default().with_shedding(Shedding {
                level,
                last_day: Some(ShedDay {
                    day: "2024-10-04".into(),
                    max_level: 500,
                }),
            })
        };
        let shed_yesterday = Modes::default().with_shedding(Shedding {
            level: 0,
            last_day: Some(ShedDay {
                day: "2024-10-03".into(),
                max_level: 10_000,
            }),
        });
        let old = Some(DAY + 9 * HOUR);
        let fresh = Some(DAY + 10 * HOUR - 60_000);
        // (modes, merchant, source, as of, reasons)
        type Case<'a> = (Modes, &'a str, Source, Option<i64>, Vec<ReasonCode>);
        let cases: Vec<Case<'_>> = vec![
            (normal.clone(), &shed, Source::Cache, old, vec![]),
            (normal.clone(), &shed, Source::Mysql, None, vec![]),
            (
                normal.clone(),
                &kept,
                Source::Cache,
                fresh,
                vec![LateDataPossible],
            ),
            // Shed today, still shedding or not any more: partial all day.
            (shed_today(300), &shed, Source::Cache, old, vec![MerchantShed]),
            (shed_today(0), &shed, Source::Cache, old, vec![MerchantShed]),
            (shed_today(300), &kept, Source::Cache, old, vec![]),
            // Shed on another day: today is complete.
            (shed_yesterday, &shed, Source::Cache, old, vec![]),
            (
                Modes::default().with(Dependency::Kv, Mode::Degraded, 1),
                &kept,
                Source::Cache,
                old,
                vec![HourlyOnly],
            ),
            (
                Modes::default().with(Dependency::Kv, Mode::Recovering, 2),
                &kept,
                Source::Cache,
                old,
                vec![],
            ),
            (
                Modes::default().with(Dependency::Mysql, Mode::Degraded, 1),
                &kept,
                Source::Cache,
                old,
                vec![CacheOnly],
            ),
            (
                Modes::default().with(Dependency::Cache, Mode::Degraded, 1),
                &kept,
                Source::LocalCache,
                fresh,
                vec![LocalCache, LateDataPossible],
            ),
            (
                Modes::default().with(Dependency::Cache, Mode::Degraded, 1),
                &kept,
                Source::Mysql,
                old,
                vec![],
            ),
        ];
        for (i, (modes, merchant, source, as_of, want)) in cases.into_iter().enumerate() {
            let got = today_reasons(&modes, &facts(merchant, source, as_of));
            assert_eq!(codes(&got), want, "case {i}: {modes} {merchant} {source:?}");
            assert!(got.iter().all(|r| r.from_ms <= r.to_ms), "case {i}: {got:?}");
        }
    }

    #[test]
    fn a_failing_window_of_the_day_is_named_with_its_span_and_others_are_not() {
        let failing = |kind: &str, start_ms: i64, end_ms: i64| ballast_crds::FailingWindow {
            kind: kind.into(),
            start_ms,
            end_ms,
            attempts: 4,
            since_ms: end_ms,
            error: "event e-1 cannot be decoded".into(),
        };
        // (failing windows, the spans named)
        type Case = (Vec<ballast_crds::FailingWindow>, Vec<(i64, i64)>);
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (
                vec![failing("window", DAY + HOUR, DAY + HOUR + 60_000)],
                vec![(DAY + HOUR, DAY + HOUR + 60_000)],
            ),
            // Yesterday's window: not this day's answer.
            (vec![failing("window", DAY - HOUR, DAY - HOUR + 60_000)], vec![]),
            // An hour across midnight: the part within the day.
            (
                vec![failing("hour", DAY - 1_800_000, DAY + 1_800_000)],
                vec![(DAY, DAY + 1_800_000)],
            ),
            (
                vec![
                    failing("window", DAY + HOUR, DAY + HOUR + 60_000),
                    failing("hour", DAY + 2 * HOUR, DAY + 3 * HOUR),
                ],
                vec![
                    (DAY + HOUR, DAY + HOUR + 60_000),
                    (DAY + 2 * HOUR, DAY + 3 * HOUR),
                ],
            ),
        ];
        for (i, (windows, want)) in cases.into_iter().enumerate() {
            let modes = Modes::default().with_failing(windows);
            let got = today_reasons(&modes, &facts("m", Source::Cache, Some(DAY + 9 * HOUR)));
            let spans: Vec<(i64, i64)> = got
                .iter()
                .filter(|r| r.code == ReasonCode::WindowFailing)
                .map(|r| (r.from_ms, r.to_ms))
                .collect();
            assert_eq!(spans, want, "case {i}");
            assert!(
                got.iter().all(|r| !r.message.contains("decoded")),
                "case {i}: the error reached the answer: {got:?}"
            );
        }
    }

    #[test]
    fn an_unchecked_cached_day_says_so_for_the_whole_day() {
        let facts = TodayFacts {
            unchecked: true,
            ..facts("m", Source::Cache, Some(DAY + 9 * HOUR))
        };
        let got = today_reasons(&Modes::default(), &facts);
        assert_eq!(codes(&got), vec![ReasonCode::CacheUnchecked]);
        assert_eq!((got[0].from_ms, got[0].to_ms), (DAY, DAY + 10 * HOUR));
    }

    #[test]
    fn a_reason_covers_the_day_from_when_it_began_until_now() {
        let modes = Modes::default().with(Dependency::Mysql, Mode::Degraded, 1);
        let got = today_reasons(&modes, &facts("m", Source::Cache, None));
        // No published `since`: the whole day so far.
        assert_eq!((got[0].from_ms, got[0].to_ms), (DAY, DAY + 10 * HOUR));
        let late = today_reasons(
            &Modes::default(),
            &facts("m", Source::Cache, Some(DAY + 10 * HOUR - 30_000)),
        );
        assert_eq!(
            (late[0].from_ms, late[0].to_ms),
            (DAY + 10 * HOUR - 120_000, DAY + 10 * HOUR - 30_000)
        );
    }

    #[test]
    fn an_answer_is_complete_only_without_reasons() {
        assert_eq!(Completeness::of(Vec::new()).status, Status::Complete);
        let reason = Reason {
            code: ReasonCode::CacheOnly,
            message: String::new(),
            from_ms: 0,
            to_ms: 1,
        };
        assert_eq!(Completeness::of(vec![reason]).status, Status::Partial);
    }
}
