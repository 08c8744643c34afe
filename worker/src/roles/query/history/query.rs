//! What a history request asks, read from its query string in two steps:
//! the syntax first (so malformed input is a 400 even while the cold store
//! is down), then the columns it names against the rollups' columns and
//! their types. Pure.

use super::engine::Value;
use crate::cold::{ColumnType, Columns, Day};
use crate::roles::query::input::BadInput;

/// Days a history range may span at most.
pub const MAX_DAYS: i32 = 366;
/// Rows an answer holds at most.
pub const MAX_LIMIT: usize = 1_000;
/// Rows an answer holds unless the request says.
pub const DEFAULT_LIMIT: usize = 100;
/// Conditions or aggregates a request may name at most.
pub const MAX_TERMS: usize = 16;
/// Bytes of a condition's value at most.
pub const MAX_VALUE_BYTES: usize = 256;

/// A comparison of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    /// Its symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// A condition on a result column: `where=<column><op><value>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// The column.
    pub column: String,
    /// The comparison.
    pub op: Op,
    /// The value, typed by the column.
    pub value: Value,
}

/// How rows are grouped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// One group per day (the default).
    Day,
    /// One group per ISO week (from Monday).
    Week,
    /// One group per calendar month.
    Month,
    /// One group per value of a rollup column.
    Column(String),
}

/// An aggregate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Function {
    /// Sum of the values (numbers only).
    Sum,
    /// Mean of the values (numbers only).
    Avg,
    /// Least value.
    Min,
    /// Greatest value.
    Max,
    /// Rows (without a column) or values present (with one).
    Count,
}

impl Function {
    /// Its name in requests and output columns.
    pub fn name(self) -> &'static str {
        match self {
            Function::Sum => "sum",
            Function::Avg => "avg",
            Function::Min => "min",
            Function::Max => "max",
            Function::Count => "count",
        }
    }
}

/// One aggregate: `aggregate=<fn>:<column>` or `aggregate=count`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// The function.
    pub function: Function,
    /// The column; none for a count of rows.
    pub column: Option<String>,
}

impl Aggregate {
    /// The output column's name: `<fn>_<column>`, or `count`.
    pub fn output(&self) -> String {
        match &self.column {
            Some(column) => format!("{}_{column}", self.function.name()),
            None => self.function.name().to_owned(),
        }
    }
}

/// The order of the rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sort {
    /// `key`, or an output column.
    pub by: String,
    /// Greatest first.
    pub descending: bool,
}

/// A history request, read and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// First day, included.
    pub from: Day,
    /// Last day, included.
    pub to: Day,
    /// Conditions every row meets.
    pub filters: Vec<Filter>,
    /// How rows are grouped.
    pub group: GroupBy,
    /// The aggregates of each group; none: each day's row as it is (by day only).
    pub aggregates: Vec<Aggregate>,
    /// The order (by key, ascending, unless said).
    pub sort: Sort,
    /// Rows at most.
    pub limit: usize,
}

/// A request whose column names are not yet checked against the rollups.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    query: Query,
    /// Each condition's value as written, to be typed by its column.
    raw_values: Vec<String>,
}

/// Reads the query string's pairs; `today` is the first day not closed. Pure.
pub fn parse(pairs: &[(String, String)], today: Day) -> Result<Parsed, BadInput> {
    let mut from = None;
    let mut to = None;
    let mut filters = Vec::new();
    let mut raw_values = Vec::new();
    let mut group = GroupBy::Day;
    let mut aggregates = Vec::new();
    let mut sort = None;
    let mut limit = DEFAULT_LIMIT;
    for (name, value) in pairs {
        match name.as_str() {
            "from" => from = Some(date(value)?),
            "to" => to = Some(date(value)?),
            "where" => {
                let (column, op, raw) = condition(value)?;
                filters.push(Filter {
                    column,
                    op,
                    value: Value::Text(String::new()),
                });
                raw_values.push(raw);
            }
            "groupBy" => {
                group = match value.as_str() {
                    "day" => GroupBy::Day,
                    "week" => GroupBy::Week,
                    "month" => GroupBy::Month,
                    column => GroupBy::Column(identifier(column)?),
                }
            }
            "aggregate" => aggregates.push(aggregate(value)?),
            "sort" => {
                let (by, descending) = match value.split_once(':') {
                    None => (value.as_str(), false),
                    Some((by, "asc")) => (by, false),
                    Some((by, "desc")) => (by, true),
                    Some(_) => return Err(BadInput::Sort(value.clone())),
                };
                sort = Some(Sort {
                    by: identifier(by)?,
                    descending,
                });
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| BadInput::Limit(value.clone()))?;
            }
            _ => return Err(BadInput::UnknownParameter(name.clone())),
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return Err(BadInput::MissingRange);
    };
    if from > to {
        return Err(BadInput::ReversedRange(from.to_string(), to.to_string()));
    }
    if to >= today {
        return Err(BadInput::RangeNotClosed(to.to_string()));
    }
    if to.0 - from.0 + 1 > MAX_DAYS {
        return Err(BadInput::RangeTooLong(to.0 - from.0 + 1));
    }
    if filters.len() > MAX_TERMS || aggregates.len() > MAX_TERMS {
        return Err(BadInput::TooManyTerms);
    }
    if aggregates.is_empty() && group != GroupBy::Day {
        aggregates.push(Aggregate {
            function: Function::Count,
            column: None,
        });
    }
    let sort = sort.unwrap_or(Sort {
        by: "key".into(),
        descending: false,
    });
    Ok(Parsed {
        query: Query {
            from,
            to,
            filters,
            group,
            aggregates,
            sort,
            limit,
        },
        raw_values,
    })
}

impl Parsed {
    /// Checks the columns named against the rollups' `columns` and types
    /// each condition's value by its column. Pure.
    pub fn resolve(self, columns: &Columns) -> Result<Query, BadInput> {
        let Parsed {
            mut query,
            raw_values,
        } = self;
        let known = |name: &str| {
            columns
                .get(name)
                .copied()
                .ok_or_else(|| BadInput::UnknownColumn(name.to_owned()))
        };
        for (filter, raw) in query.filters.iter_mut().zip(raw_values) {
            filter.value = match known(&filter.column)? {
                ColumnType::Number => number(&raw).ok_or_else(|| BadInput::NotANumber {
                    column: filter.column.clone(),
                    value: raw.clone(),
                })?,
                ColumnType::Keyword => Value::Text(raw),
            };
        }
        if let GroupBy::Column(column) = &query.group {
            known(column)?;
        }
        for aggregate in &query.aggregates {
            if let Some(column) = &aggregate.column {
                let numeric = matches!(aggregate.function, Function::Sum | Function::Avg);
                if numeric && known(column)? != ColumnType::Number {
                    return Err(BadInput::NotNumeric {
                        function: aggregate.function.name(),
                        column: column.clone(),
                    });
                }
                known(column)?;
            }
        }
        let sortable = query.sort.by == "key"
            || if query.aggregates.is_empty() {
                columns.contains_key(&query.sort.by)
            } else {
                query.aggregates.iter().any(|a| a.output() == query.sort.by)
            };
        if !sortable {
            return Err(BadInput::SortColumn(query.sort.by.clone()));
        }
        Ok(query)
    }
}

fn date(text: &str) -> Result<Day, BadInput> {
    Day::parse(text).ok_or_else(|| BadInput::Date(text.to_owned()))
}

/// A column name: a letter or `_`, then letters, digits or `_` (64 bytes at
/// most), so that it can reach neither an ES field path nor SQL as syntax.
fn identifier(name: &str) -> Result<String, BadInput> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first || name.len() > 64 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(BadInput::ColumnName(name.to_owned()));
    }
    Ok(name.to_owned())
}

fn condition(text: &str) -> Result<(String, Op, String), BadInput> {
    let at = text
        .find(['=', '!', '<', '>'])
        .ok_or_else(|| BadInput::Condition(text.to_owned()))?;
    let (column, rest) = text.split_at(at);
    let (op, value) = [
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("=", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
    ]
    .into_iter()
    .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|v| (op, v)))
    .ok_or_else(|| BadInput::Condition(text.to_owned()))?;
    if value.len() > MAX_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(BadInput::ConditionValue(column.to_owned()));
    }
    Ok((identifier(column)?, op, value.to_owned()))
}

fn aggregate(text: &str) -> Result<Aggregate, BadInput> {
    let (function, column) = match text.split_once(':') {
        Some((f, c)) => (f, Some(identifier(c)?)),
        None => (text, None),
    };
    let function = match function {
        "sum" => Function::Sum,
        "avg" => Function::Avg,
        "min" => Function::Min,
        "max" => Function::Max,
        "count" => Function::Count,
        _ => return Err(BadInput::Aggregate(text.to_owned())),
    };
    if column.is_none() && function != Function::Count {
        return Err(BadInput::Aggregate(text.to_owned()));
    }
    Ok(Aggregate { function, column })
}

/// A finite number: an integer when it is one.
fn number(text: &str) -> Option<Value> {
    if let Ok(int) = text.parse::<i64>() {
        return Some(Value::Int(int));
    }
    text.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Value::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn columns() -> Columns {
        [
            ("gmv".to_owned(), ColumnType::Number),
            ("avg_order_value".to_owned(), ColumnType::Number),
            ("top_items".to_owned(), ColumnType::Keyword),
        ]
        .into()
    }

    fn read(query: &str) -> Result<Query, BadInput> {
        let today = Day::parse("2026-11-30").unwrap_or(Day(0));
        parse(&pairs(query), today)?.resolve(&columns())
    }

    #[test]
    fn a_full_request_reads_into_its_query() {
        let q = read(
            "from=2026-11-01&to=2026-11-29&where=gmv>=100&where=top_items!=item-1,item-2\
             &groupBy=week&aggregate=sum:gmv&aggregate=count&sort=sum_gmv:desc&limit=5",
        );
        let want = Query {
            from: Day::parse("2026-11-01").unwrap_or(Day(0)),
            to: Day::parse("2026-11-29").unwrap_or(Day(0)),
            filters: vec![
                Filter {
                    column: "gmv".into(),
                    op: Op::Ge,
                    value: Value::Int(100),
                },
                Filter {
                    column: "top_items".into(),
                    op: Op::Ne,
                    value: Value::Text("item-1,item-2".into()),
                },
            ],
            group: GroupBy::Week,
            aggregates: vec![
                Aggregate {
                    function: Function::Sum,
                    column: Some("gmv".into()),
                },
                Aggregate {
                    function: Function::Count,
                    column: None,
                },
            ],
            sort: Sort {
                by: "sum_gmv".into(),
                descending: true,
            },
            limit: 5,
        };
        assert_eq!(q, Ok(want));
        let plain = read("from=2026-11-01&to=2026-11-01");
        assert!(
            plain
                .as_ref()
                .is_ok_and(|q| q.aggregates.is_empty() && q.limit == DEFAULT_LIMIT),
            "{plain:?}"
        );
        let counted = read("from=2026-11-01&to=2026-11-02&groupBy=top_items");
        assert!(
            counted.is_ok_and(|q| q.aggregates.len() == 1 && q.aggregates[0].output() == "count"),
            "a group other than day counts its rows by default"
        );
        assert!(
            read("from=2026-11-01&to=2026-11-02&where=gmv<1.5e3")
                .is_ok_and(|q| q.filters[0].value == Value::Float(1500.0))
        );
    }

    #[test]
    fn bad_requests_are_refused_with_their_reason() {
        let cases = [
            ("to=2026-11-02", "missingRange"),
            ("from=2026-11-01&to=2026-11-31", "malformedDate"),
            ("from=2026-11-05&to=2026-11-01", "reversedRange"),
            ("from=2026-11-01&to=2026-11-30", "rangeNotClosed"),
            ("from=2025-01-01&to=2026-11-01", "rangeTooLong"),
            ("from=2026-11-01&to=2026-11-02&where=nope>1", "unknownColumn"),
            (
                "from=2026-11-01&to=2026-11-02&where=gmv>1}},{\"match_all\":{}}",
                "notANumber",
            ),
            ("from=2026-11-01&to=2026-11-02&where=gmv>NaN", "notANumber"),
            ("from=2026-11-01&to=2026-11-02&where=gmv>inf", "notANumber"),
            ("from=2026-11-01&to=2026-11-02&where=gmv~1", "malformedCondition"),
            ("from=2026-11-01&to=2026-11-02&where=g.mv>1", "malformedColumn"),
            (
                "from=2026-11-01&to=2026-11-02&where=gmv' OR 1=1",
                "malformedColumn",
            ),
            (
                "from=2026-11-01&to=2026-11-02&where=top_items=a\u{0}b",
                "malformedConditionValue",
            ),
            (
                "from=2026-11-01&to=2026-11-02&aggregate=sum:top_items",
                "notNumeric",
            ),
            (
                "from=2026-11-01&to=2026-11-02&aggregate=median:gmv",
                "malformedAggregate",
            ),
            (
                "from=2026-11-01&to=2026-11-02&aggregate=sum",
                "malformedAggregate",
            ),
            ("from=2026-11-01&to=2026-11-02&groupBy=nope", "unknownColumn"),
            (
                "from=2026-11-01&to=2026-11-02&groupBy=week&sort=gmv",
                "unsortable",
            ),
            ("from=2026-11-01&to=2026-11-02&sort=gmv:up", "malformedSort"),
            ("from=2026-11-01&to=2026-11-02&limit=0", "malformedLimit"),
            ("from=2026-11-01&to=2026-11-02&limit=1001", "malformedLimit"),
            ("from=2026-11-01&to=2026-11-02&limit=-1", "malformedLimit"),
            ("from=2026-11-01&to=2026-11-02&size=10", "unknownParameter"),
        ];
        for (query, code) in cases {
            match read(query) {
                Ok(q) => panic!("{query}: accepted as {q:?}"),
                Err(bad) => assert_eq!(bad.code(), code, "{query}: {bad}"),
            }
        }
        let terms: String = (0..17).map(|_| "&aggregate=count").collect();
        let many = read(&format!("from=2026-11-01&to=2026-11-02{terms}"));
        assert_eq!(many.map_err(|b| b.code()), Err("tooManyTerms"));
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        let value = read(&format!("from=2026-11-01&to=2026-11-02&where=top_items={long}"));
        assert_eq!(value.map_err(|b| b.code()), Err("malformedConditionValue"));
    }
}
