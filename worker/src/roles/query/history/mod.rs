//! History answers for one merchant: a range of closed days from the cold
//! store's daily rollups (filtered there, in filter context, routed by
//! merchant), grouped, aggregated, sorted and limited in memory, with the
//! response contract: each day's completeness as its rollup recorded it.

pub mod arrow;
pub mod engine;
pub mod logger;
pub mod precomputed;
pub mod query;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_crds::{Dependency, Mode};
use ballast_flow::{CallError, Flow, GuardedDependency};
use serde::Serialize;
use serde_json::{Value as Json, json};

use self::engine::{Group, Row, Value};
use self::query::{Filter, GroupBy, Op, Query};
use super::contract::{Completeness, ModeOf, Reason, ReasonCode, Source};
use crate::cold::{ColdStore, Columns, Day, EsError, Rollup};

/// How long the rollups' columns are trusted before they are read again:
/// a new column appears when a pipeline's SQL changes, rarely.
const COLUMNS_TTL: Duration = Duration::from_secs(30);

/// Why a history answer cannot be given.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ColdUnavailable {
    /// The cold store is published Degraded.
    #[error("the cold store (Elasticsearch) is unavailable")]
    Degraded,
    /// The cold store failed or missed its deadline on this request.
    #[error("the cold store (Elasticsearch) did not answer: {0}")]
    Failed(String),
}

impl ColdUnavailable {
    /// Machine-readable reason, as the 503 body and the metric label name it.
    pub fn code(&self) -> &'static str {
        match self {
            ColdUnavailable::Degraded => "coldUnavailable",
            ColdUnavailable::Failed(_) => "coldFailed",
        }
    }
}

/// The cold store and what the query service remembers of it.
pub struct Cold {
    store: ColdStore,
    columns: Mutex<Option<(Instant, Arc<Columns>)>>,
}

impl Cold {
    /// Reads `store`, each call within the store's deadline.
    pub fn new(store: ColdStore) -> Self {
        Self {
            store,
            columns: Mutex::new(None),
        }
    }

    /// The rollups' columns, read at most every [`COLUMNS_TTL`].
    async fn columns(&self, flow: &Flow) -> Result<Arc<Columns>, ColdUnavailable> {
        let cached = self
            .columns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some((at, columns)) = cached
            && at.elapsed() < COLUMNS_TTL
        {
            return Ok(columns);
        }
        let columns = Arc::new(
            flow.call(
                GuardedDependency::Elasticsearch,
                self.store.deadline(),
                self.store.columns(),
            )
            .await
            .map_err(failed)?,
        );
        *self
            .columns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), Arc::clone(&columns)));
        Ok(columns)
    }
}

fn failed(error: CallError<EsError>) -> ColdUnavailable {
    ColdUnavailable::Failed(error.to_string())
}

/// A history answer's contract and rows.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryAnswer {
    /// The merchant.
    pub merchant: String,
    /// First day asked, `YYYY-MM-DD`.
    pub from: String,
    /// Last day asked.
    pub to: String,
    /// Which store answered.
    pub source: Source,
    /// End of the newest day included (ms), if any.
    pub as_of_ms: Option<i64>,
    /// The published mode of every dependency.
    pub modes: Vec<ModeOf>,
    /// Complete, or partial with each reason and the days it covers.
    pub completeness: Completeness,
    /// `day`, `week`, `month` or the column grouped by.
    pub group_by: String,
    /// The output columns of the rows, in order.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Json>,
}

/// The Elasticsearch clauses of the conditions: those every row must meet,
/// and those none may (`!=`, with the column required to be present, as SQL
/// does not match a missing value). Pure.
pub fn clauses(filters: &[Filter]) -> (Vec<Json>, Vec<Json>) {
    let mut must = Vec::new();
    let mut must_not = Vec::new();
    for filter in filters {
        let field = format!("m.{}", filter.column);
        let value = serde_json::to_value(&filter.value).unwrap_or_default();
        let range = |op: &str| json!({ "range": { field.clone(): { op: value.clone() } } });
        match filter.op {
            Op::Eq => must.push(json!({ "term": { field.clone(): value.clone() } })),
            Op::Ne => {
                must.push(json!({ "exists": { "field": field.clone() } }));
                must_not.push(json!({ "term": { field.clone(): value.clone() } }));
            }
            Op::Lt => must.push(range("lt")),
            Op::Le => must.push(range("lte")),
            Op::Gt => must.push(range("gt")),
            Op::Ge => must.push(range("gte")),
        }
    }
    (must, must_not)
}

/// The engine's rows of a merchant's rollups. Pure.
pub fn rows(rollups: &[Rollup]) -> Vec<Row> {
    rollups
        .iter()
        .map(|r| Row {
            day: r.day,
            values: r
                .metrics
                .iter()
                .filter_map(|(k, v)| Value::from_json(v).map(|v| (k.clone(), v)))
                .collect(),
        })
        .collect()
}

/// Every reason a history answer is partial: the days its rollups say were
/// shed or hourly only, each run of consecutive days as one range. Pure.
pub fn reasons(rollups: &[Rollup]) -> Vec<Reason> {
    let mut out = Vec::new();
    /// A reason, which days it concerns, and what it says.
    type Kind = (ReasonCode, fn(&Rollup) -> bool, &'static str);
    let kinds: [Kind; 2] = [
        (
            ReasonCode::MerchantShed,
            |r| r.shed,
            "the backup intake shed this merchant's events on these days (Kafka was down and the \
             intake over its budget): their numbers miss those events",
        ),
        (
            ReasonCode::HourlyOnly,
            |r| r.hourly_only,
            "the KV store was degraded on these days: their totals were made from hourly results, \
             and columns that do not add up across hours (distinct counts, averages, top items) may be off",
        ),
    ];
    for (code, flagged, message) in kinds {
        let mut days: Vec<Day> = rollups.iter().filter(|r| flagged(r)).map(|r| r.day).collect();
        days.sort();
        let mut run: Option<(Day, Day)> = None;
        for day in days.into_iter().map(Some).chain([None]) {
            match (run, day) {
                (Some((first, last)), Some(d)) if d.0 <= last.0 + 1 => run = Some((first, d)),
                (previous, next) => {
                    if let Some((first, last)) = previous {
                        out.push(Reason {
                            code,
                            message: message.into(),
                            from_ms: first.start_ms(),
                            to_ms: last.next().start_ms(),
                        });
                    }
                    run = next.map(|d| (d, d));
                }
            }
        }
    }
    out
}

/// The rows of an answer, as JSON. Pure.
pub fn render_rows(groups: &[Group]) -> Vec<Json> {
    groups
        .iter()
        .map(|g| {
            json!({
                "key": g.key.json(),
                "firstDay": g.first.to_string(),
                "lastDay": g.last.to_string(),
                "days": g.days,
                "values": g.values,
            })
        })
        .collect()
}

/// The output columns of an answer: the aggregates, or every column of the days.
fn output_columns(query: &Query, groups: &[Group]) -> Vec<String> {
    if query.aggregates.is_empty() {
        let mut names: Vec<String> = groups.iter().flat_map(|g| g.values.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    } else {
        query.aggregates.iter().map(query::Aggregate::output).collect()
    }
}

/// What a history request needs of the query service.
pub struct Request<'a> {
    /// The merchant (checked).
    pub merchant: &'a str,
    /// The query string's pairs.
    pub pairs: &'a [(String, String)],
    /// The first day not closed.
    pub today: Day,
    /// The published modes.
    pub modes: &'a crate::modes::Modes,
}

/// Why a history request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The request is malformed.
    #[error(transparent)]
    Bad(#[from] super::input::BadInput),
    /// The cold store cannot answer.
    #[error(transparent)]
    Unavailable(#[from] ColdUnavailable),
}

/// Answers a history request from the cold store.
pub async fn answer(cold: &Cold, flow: &Flow, request: Request<'_>) -> Result<HistoryAnswer, HistoryError> {
    // Malformed input is a 400 whatever the cold store's state.
    let parsed = query::parse(request.pairs, request.today)?;
    if request.modes.get(Dependency::Cold).0 == Mode::Degraded {
        return Err(ColdUnavailable::Degraded.into());
    }
    let columns = cold.columns(flow).await?;
    let query = parsed.resolve(&columns)?;
    let (must, must_not) = clauses(&query.filters);
    let rollups = flow
        .call(
            GuardedDependency::Elasticsearch,
            cold.store.deadline(),
            cold.store
                .search(request.merchant, (query.from, query.to), must, must_not),
        )
        .await
        .map_err(failed)?;
    let groups = engine::evaluate(&query, &rows(&rollups));
    Ok(HistoryAnswer {
        merchant: request.merchant.to_owned(),
        from: query.from.to_string(),
        to: query.to.to_string(),
        source: Source::Elasticsearch,
        as_of_ms: rollups.iter().map(|r| r.day.next().start_ms()).max(),
        modes: super::contract::modes_of(request.modes),
        completeness: Completeness::of(reasons(&rollups)),
        group_by: match &query.group {
            GroupBy::Day => "day".into(),
            GroupBy::Week => "week".into(),
            GroupBy::Month => "month".into(),
            GroupBy::Column(c) => c.clone(),
        },
        columns: output_columns(&query, &groups),
        rows: render_rows(&groups),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollup(day: &str, shed: bool, hourly_only: bool) -> Rollup {
        Rollup {
            merchant: "m1".into(),
            day: Day::parse(day).unwrap_or(Day(0)),
            shed,
            hourly_only,
            metrics: serde_json::Map::new(),
        }
    }

    #[test]
    fn flagged_days_become_one_reason_per_run_of_days() {
        let rollups = [
            rollup("2026-11-01", true, false),
            rollup("2026-11-02", true, true),
            rollup("2026-11-04", true, false),
            rollup("2026-11-05", false, false),
        ];
        let got: Vec<(ReasonCode, String, String)> = reasons(&rollups)
            .into_iter()
            .map(|r| {
                (
                    r.code,
                    Day::of_ms(r.from_ms).to_string(),
                    Day::of_ms(r.to_ms - 1).to_string(),
                )
            })
            .collect();
        let want = [
            (ReasonCode::MerchantShed, "2026-11-01", "2026-11-02"),
            (ReasonCode::MerchantShed, "2026-11-04", "2026-11-04"),
            (ReasonCode::HourlyOnly, "2026-11-02", "2026-11-02"),
        ];
        let want: Vec<(ReasonCode, String, String)> = want
            .iter()
            .map(|(c, f, t)| (*c, (*f).into(), (*t).into()))
            .collect();
        assert_eq!(got, want);
        assert!(reasons(&[rollup("2026-11-05", false, false)]).is_empty());
    }

    #[test]
    fn conditions_become_filter_clauses_and_a_not_equal_requires_the_column() {
        let filter = |column: &str, op, value| Filter {
            column: column.into(),
            op,
            value,
        };
        let (must, must_not) = clauses(&[
            filter("gmv", Op::Ge, Value::Int(100)),
            filter("aov", Op::Lt, Value::Float(2.5)),
            filter("top", Op::Eq, Value::Text("a\"}}".into())),
            filter("top", Op::Ne, Value::Text("b".into())),
        ]);
        assert_eq!(
            must,
            vec![
                json!({"range": {"m.gmv": {"gte": 100}}}),
                json!({"range": {"m.aov": {"lt": 2.5}}}),
                json!({"term": {"m.top": "a\"}}"}}),
                json!({"exists": {"field": "m.top"}}),
            ]
        );
        assert_eq!(must_not, vec![json!({"term": {"m.top": "b"}})]);
    }
}
