//! The in-memory query engine of history answers: over a merchant's daily
//! rows (at most a year of them, already filtered by the cold store), it
//! filters again with SQL's semantics (a missing value never matches), then
//! groups, aggregates, sorts and limits. A small typed evaluator rather than
//! DataFusion, whose planning alone costs more than a whole answer here; the
//! tests check it against DataFusion on generated rows and queries. Pure.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::Serialize;

use super::query::{Filter, Function, GroupBy, Op, Query};
use crate::cold::Day;

/// A value of a result column.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// A keyword.
    Text(String),
}

impl Value {
    /// The value of a JSON scalar; none for null, booleans, arrays and objects.
    pub fn from_json(json: &serde_json::Value) -> Option<Self> {
        match json {
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Value::Int)
                .or_else(|| n.as_f64().map(Value::Float)),
            serde_json::Value::String(s) => Some(Value::Text(s.clone())),
            _ => None,
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }

    /// Numbers by value (an integer and a float compare as numbers), then
    /// keywords by their bytes; a number and a keyword do not compare.
    fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
            (Value::Text(a), Value::Text(b)) => Some(a.cmp(b)),
            (a, b) => a.number()?.partial_cmp(&b.number()?),
        }
    }

    /// A total order for sorting: numbers before keywords.
    fn total(&self, other: &Value) -> Ordering {
        self.compare(other).unwrap_or_else(|| {
            let rank = |v: &Value| u8::from(matches!(v, Value::Text(_)));
            rank(self).cmp(&rank(other))
        })
    }
}

/// One day of a merchant's rollup.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The day.
    pub day: Day,
    /// Its result columns.
    pub values: BTreeMap<String, Value>,
}

/// What a group is keyed by.
#[derive(Clone, Debug, PartialEq)]
pub enum Key {
    /// A day.
    Day(Day),
    /// A week, by its Monday.
    Week(Day),
    /// A month, by its first day.
    Month(Day),
    /// A column's value; none where the column is missing.
    Value(Option<Value>),
}

impl Key {
    fn of(group: &GroupBy, row: &Row) -> Self {
        match group {
            GroupBy::Day => Key::Day(row.day),
            GroupBy::Week => Key::Week(row.day.week()),
            GroupBy::Month => Key::Month(row.day.month()),
            GroupBy::Column(column) => Key::Value(row.values.get(column).cloned()),
        }
    }

    /// Keys in order (`descending` or not), a missing value last either way.
    fn order(&self, other: &Key, descending: bool) -> Ordering {
        match (self, other) {
            (Key::Day(a), Key::Day(b)) | (Key::Week(a), Key::Week(b)) | (Key::Month(a), Key::Month(b)) => {
                if descending {
                    b.cmp(a)
                } else {
                    a.cmp(b)
                }
            }
            (Key::Value(a), Key::Value(b)) => nulls_last(a.as_ref(), b.as_ref(), descending),
            _ => Ordering::Equal,
        }
    }

    /// As an answer writes it: `YYYY-MM-DD` (a day, a week's Monday), `YYYY-MM`, or the value.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Key::Day(d) | Key::Week(d) => d.to_string().into(),
            Key::Month(d) => d.month_key().into(),
            Key::Value(v) => serde_json::to_value(v).unwrap_or_default(),
        }
    }
}

/// One row of an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// Its key.
    pub key: Key,
    /// First and last day of the rows in it.
    pub first: Day,
    /// Last day.
    pub last: Day,
    /// Days in it.
    pub days: u32,
    /// The aggregates by output name; the day's columns when none were asked.
    pub values: BTreeMap<String, Option<Value>>,
}

/// Whether `row` meets `filter`, as SQL decides: a missing value, or one of
/// another type, never does.
fn meets(row: &Row, filter: &Filter) -> bool {
    let Some(ordering) = row
        .values
        .get(&filter.column)
        .and_then(|v| v.compare(&filter.value))
    else {
        return false;
    };
    match filter.op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Le => ordering != Ordering::Greater,
        Op::Gt => ordering == Ordering::Greater,
        Op::Ge => ordering != Ordering::Less,
    }
}

/// Running state of one aggregate.
#[derive(Clone, Debug, Default)]
struct Accumulator {
    int_sum: i128,
    float_sum: f64,
    floats: bool,
    count: i64,
    least: Option<Value>,
    greatest: Option<Value>,
}

impl Accumulator {
    fn add(&mut self, value: &Value) {
        self.count += 1;
        match value {
            Value::Int(i) => self.int_sum += i128::from(*i),
            Value::Float(f) => {
                self.float_sum += f;
                self.floats = true;
            }
            Value::Text(_) => {}
        }
        if self
            .least
            .as_ref()
            .is_none_or(|l| value.total(l) == Ordering::Less)
        {
            self.least = Some(value.clone());
        }
        if self
            .greatest
            .as_ref()
            .is_none_or(|g| value.total(g) == Ordering::Greater)
        {
            self.greatest = Some(value.clone());
        }
    }

    fn finish(&self, function: Function, rows: i64) -> Option<Value> {
        let sum = || {
            if self.floats {
                Value::Float(self.int_sum as f64 + self.float_sum)
            } else {
                i64::try_from(self.int_sum)
                    .map(Value::Int)
                    .unwrap_or(Value::Float(self.int_sum as f64))
            }
        };
        match function {
            Function::Count => Some(Value::Int(rows)),
            _ if self.count == 0 => None,
            Function::Sum => Some(sum()),
            Function::Avg => sum().number().map(|s| Value::Float(s / self.count as f64)),
            Function::Min => self.least.clone(),
            Function::Max => self.greatest.clone(),
        }
    }
}

/// Evaluates `query` over `rows` (in any order). Pure.
pub fn evaluate(query: &Query, rows: &[Row]) -> Vec<Group> {
    let kept = rows
        .iter()
        .filter(|r| r.day >= query.from && r.day <= query.to)
        .filter(|r| query.filters.iter().all(|f| meets(r, f)));
    // Sorted by key, equal keys side by side: one pass groups them.
    let mut keyed: Vec<(Key, &Row)> = kept.map(|row| (Key::of(&query.group, row), row)).collect();
    keyed.sort_by(|a, b| a.0.order(&b.0, false));
    let mut groups: Vec<(Key, Vec<&Row>)> = Vec::new();
    for (key, row) in keyed {
        match groups.last_mut() {
            Some((last, members)) if last.order(&key, false) == Ordering::Equal => members.push(row),
            _ => groups.push((key, vec![row])),
        }
    }
    let mut out: Vec<Group> = groups
        .into_iter()
        .map(|(key, members)| {
            let values = if query.aggregates.is_empty() {
                // By day without aggregates: the day's row as it is.
                members
                    .iter()
                    .flat_map(|r| r.values.iter())
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect()
            } else {
                query
                    .aggregates
                    .iter()
                    .map(|a| {
                        let mut acc = Accumulator::default();
                        if let Some(column) = &a.column {
                            members
                                .iter()
                                .filter_map(|r| r.values.get(column))
                                .for_each(|v| acc.add(v));
                        }
                        let rows = match &a.column {
                            Some(_) => acc.count,
                            None => members.len() as i64,
                        };
                        (a.output(), acc.finish(a.function, rows))
                    })
                    .collect()
            };
            Group {
                key,
                first: members.iter().map(|r| r.day).min().unwrap_or(query.from),
                last: members.iter().map(|r| r.day).max().unwrap_or(query.from),
                days: u32::try_from(members.len()).unwrap_or(u32::MAX),
                values,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let by_key = a.key.order(&b.key, false);
        let primary = if query.sort.by == "key" {
            a.key.order(&b.key, query.sort.descending)
        } else {
            fn value<'g>(g: &'g Group, by: &str) -> Option<&'g Value> {
                g.values.get(by).and_then(Option::as_ref)
            }
            nulls_last(
                value(a, &query.sort.by),
                value(b, &query.sort.by),
                query.sort.descending,
            )
        };
        // Ties in key order, so that an answer is the same every time.
        primary.then(by_key)
    });
    out.truncate(query.limit);
    out
}

/// Missing values last, whichever the direction.
fn nulls_last(a: Option<&Value>, b: Option<&Value>, descending: bool) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) if descending => b.total(a),
        (Some(a), Some(b)) => a.total(b),
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
