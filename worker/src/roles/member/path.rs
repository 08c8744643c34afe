//! Which store a member service reads and writes through. Pure.
//!
//! - `Mysql`: normally.
//! - `Elasticsearch`: while MySQL is published Degraded or Recovering, or
//!   its breaker here is open; writes are journaled for the replay.
//! - `Catchup`: MySQL is usable again, the journal not yet replayed. Writes
//!   go to MySQL, each first bringing its member's row up to Elasticsearch's
//!   version (so that a replayed older record cannot overwrite it, nor it a
//!   newer record); reads stay on Elasticsearch. The journal's end is taken
//!   as the barrier once no write on the Elasticsearch path is in flight
//!   here, and the path is MySQL again once the replay has passed it and
//!   the sweep (every member Elasticsearch changed since the path left MySQL,
//!   brought into MySQL if newer there: what the journal may lack) is done.

use ballast_crds::Mode;

/// The path in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// MySQL, then Elasticsearch.
    Mysql,
    /// MySQL with read repair from Elasticsearch, until the replay passes `barrier`.
    Catchup {
        /// The journal offset the replay must pass (unset until taken).
        barrier: Option<i64>,
    },
    /// Elasticsearch alone, writes journaled.
    Elasticsearch,
}

impl Path {
    /// Lower-case name, as logs and metrics give it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mysql => "mysql",
            Self::Catchup { .. } => "catchup",
            Self::Elasticsearch => "elasticsearch",
        }
    }

    /// The gauge's value: 0 MySQL, 1 catch-up, 2 Elasticsearch.
    pub fn code(self) -> i64 {
        match self {
            Self::Mysql => 0,
            Self::Catchup { .. } => 1,
            Self::Elasticsearch => 2,
        }
    }

    /// Whether members are read from Elasticsearch.
    pub fn reads_elasticsearch(self) -> bool {
        !matches!(self, Self::Mysql)
    }
}

/// What the path depends on, as this process sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// The MySQL mode the operator published (Normal if none).
    pub published: Mode,
    /// This process's MySQL breaker is not closed.
    pub breaker_open: bool,
    /// Writes on the Elasticsearch path in flight in this process.
    pub es_writes_in_flight: u32,
    /// The journal's end (the offset the next record gets), if known.
    pub end: Option<i64>,
    /// The replay's committed offset (the next record it will apply), if known.
    pub committed: Option<i64>,
    /// The sweep of this catch-up is done.
    pub swept: bool,
}

/// The path after `current`, given `inputs`.
pub fn next(current: Path, inputs: Inputs) -> Path {
    let down = inputs.published != Mode::Normal || inputs.breaker_open;
    if down {
        return match current {
            // Catch-up writes went to MySQL only after a repair from
            // Elasticsearch, so falling back from catch-up loses nothing.
            Path::Mysql | Path::Catchup { .. } | Path::Elasticsearch => Path::Elasticsearch,
        };
    }
    match current {
        Path::Mysql => Path::Mysql,
        Path::Elasticsearch => Path::Catchup { barrier: None },
        Path::Catchup { barrier: None } if inputs.es_writes_in_flight == 0 => {
            Path::Catchup { barrier: inputs.end }
        }
        Path::Catchup { barrier: Some(end) }
            if inputs.swept && inputs.committed.is_some_and(|c| c >= end) =>
        {
            Path::Mysql
        }
        catchup @ Path::Catchup { .. } => catchup,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_leaves_mysql_on_failure_and_returns_once_the_replay_passes_the_barrier() {
        use Mode::*;
        let none = Path::Catchup { barrier: None };
        let at = |b| Path::Catchup { barrier: Some(b) };
        #[rustfmt::skip]
        let table = [
            // current, published, breaker open, ES writes in flight, end, committed, swept, next
            (Path::Mysql, Normal, false, 0, Some(9), Some(0), true, Path::Mysql),
            (Path::Mysql, Degraded, false, 0, None, None, true, Path::Elasticsearch),
            (Path::Mysql, Recovering, false, 0, None, None, true, Path::Elasticsearch),
            (Path::Mysql, Normal, true, 0, None, None, true, Path::Elasticsearch),
            (Path::Elasticsearch, Degraded, false, 0, None, None, true, Path::Elasticsearch),
            (Path::Elasticsearch, Normal, true, 0, None, None, true, Path::Elasticsearch),
            (Path::Elasticsearch, Normal, false, 3, Some(9), Some(2), true, none),
            (none, Normal, false, 3, Some(9), Some(2), true, none),
            (none, Normal, false, 0, None, Some(2), true, none),
            (none, Normal, false, 0, Some(9), Some(2), true, at(9)),
            (at(9), Normal, false, 0, Some(12), Some(8), true, at(9)),
            (at(9), Normal, false, 0, Some(12), None, true, at(9)),
            (at(9), Normal, false, 0, Some(12), Some(9), true, Path::Mysql),
            (at(9), Normal, false, 0, Some(12), Some(9), false, at(9)),
            (at(9), Normal, true, 0, Some(12), Some(9), true, Path::Elasticsearch),
            (none, Degraded, false, 0, Some(9), Some(9), true, Path::Elasticsearch),
        ];
        for (current, published, breaker_open, es_writes_in_flight, end, committed, swept, expected) in table
        {
            let inputs = Inputs {
                published,
                breaker_open,
                es_writes_in_flight,
                end,
                committed,
                swept,
            };
            assert_eq!(next(current, inputs), expected, "{current:?} {inputs:?}");
        }
    }
}
