//! The engine's tables, and its answers checked against DataFusion's on
//! generated rows and queries.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;

use super::*;
use crate::roles::query::history::query::{Aggregate, Sort};

fn day(text: &str) -> Day {
    Day::parse(text).unwrap_or(Day(0))
}

fn row(d: &str, values: &[(&str, Value)]) -> Row {
    Row {
        day: day(d),
        values: values.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    }
}

fn query(group: GroupBy, aggregates: &[(Function, Option<&str>)]) -> Query {
    Query {
        from: day("2026-11-01"),
        to: day("2026-11-30"),
        filters: Vec::new(),
        group,
        aggregates: aggregates
            .iter()
            .map(|(function, column)| Aggregate {
                function: *function,
                column: column.map(str::to_owned),
            })
            .collect(),
        sort: Sort {
            by: "key".into(),
            descending: false,
        },
        limit: 100,
    }
}

fn rows() -> Vec<Row> {
    vec![
        row(
            "2026-11-02",
            &[("gmv", Value::Int(100)), ("top", Value::Text("b".into()))],
        ),
        row(
            "2026-11-03",
            &[("gmv", Value::Int(50)), ("top", Value::Text("a".into()))],
        ),
        row(
            "2026-11-09",
            &[("gmv", Value::Int(10)), ("aov", Value::Float(2.5))],
        ),
        row(
            "2026-12-01",
            &[("gmv", Value::Int(7)), ("top", Value::Text("a".into()))],
        ),
        row(
            "2026-11-10",
            &[("gmv", Value::Int(i64::MAX)), ("aov", Value::Float(1.5))],
        ),
    ]
}

/// A group as compared: key, days, and each output.
type Answered = (serde_json::Value, u32, Vec<(String, Option<Value>)>);

fn answer(groups: &[Group]) -> Vec<Answered> {
    groups
        .iter()
        .map(|g| (g.key.json(), g.days, g.values.clone().into_iter().collect()))
        .collect()
}

#[test]
fn groups_aggregate_sort_and_limit_as_asked() {
    let sum = |v: Value| Some(v);
    // By week: the range leaves December out; a sum past i64 becomes a float.
    let mut q = query(
        GroupBy::Week,
        &[
            (Function::Sum, Some("gmv")),
            (Function::Avg, Some("aov")),
            (Function::Count, None),
        ],
    );
    let weeks = answer(&evaluate(&q, &rows()));
    assert_eq!(
        weeks,
        vec![
            (
                "2026-11-02".into(),
                2,
                vec![
                    ("avg_aov".into(), None),
                    ("count".into(), sum(Value::Int(2))),
                    ("sum_gmv".into(), sum(Value::Int(150)))
                ]
            ),
            (
                "2026-11-09".into(),
                2,
                vec![
                    ("avg_aov".into(), sum(Value::Float(2.0))),
                    ("count".into(), sum(Value::Int(2))),
                    ("sum_gmv".into(), sum(Value::Float(i64::MAX as f64 + 10.0)))
                ]
            ),
        ]
    );
    // By a keyword column, greatest count first; the missing value is a group of its own, last.
    q = query(
        GroupBy::Column("top".into()),
        &[(Function::Count, None), (Function::Min, Some("gmv"))],
    );
    q.to = day("2026-12-31");
    q.sort = Sort {
        by: "count".into(),
        descending: true,
    };
    let tops = answer(&evaluate(&q, &rows()));
    let keys: Vec<serde_json::Value> = tops.iter().map(|t| t.0.clone()).collect();
    assert_eq!(keys, vec!["a".into(), serde_json::Value::Null, "b".into()]);
    assert_eq!(tops[0].2[1], ("min_gmv".into(), Some(Value::Int(7))));
    // By month, limited.
    q = query(GroupBy::Month, &[(Function::Max, Some("top"))]);
    q.to = day("2026-12-31");
    q.limit = 1;
    assert_eq!(
        answer(&evaluate(&q, &rows())),
        vec![(
            "2026-11".into(),
            4,
            vec![("max_top".into(), sum(Value::Text("b".into())))]
        )]
    );
    // By day without aggregates: each day's columns as they are, filtered.
    q = query(GroupBy::Day, &[]);
    q.filters = vec![
        Filter {
            column: "gmv".into(),
            op: Op::Lt,
            value: Value::Float(60.5),
        },
        Filter {
            column: "top".into(),
            op: Op::Ne,
            value: Value::Text("b".into()),
        },
    ];
    assert_eq!(
        answer(&evaluate(&q, &rows())),
        vec![(
            "2026-11-03".into(),
            1,
            vec![
                ("gmv".into(), sum(Value::Int(50))),
                ("top".into(), sum(Value::Text("a".into())))
            ]
        )],
        "the day without `top` does not meet top != b"
    );
}

/// xorshift64*: deterministic cases.
struct Cases(u64);

impl Cases {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    fn rows(&mut self) -> Vec<Row> {
        let start = day("2026-10-20").0;
        let mut days: Vec<i32> = (0..60).map(|i| start + i).collect();
        days.retain(|_| self.next(3) > 0);
        days.into_iter()
            .map(|d| {
                let mut values = BTreeMap::new();
                if self.next(5) > 0 {
                    values.insert("a".to_owned(), Value::Int(self.next(200) as i64 - 50));
                }
                if self.next(5) > 0 {
                    values.insert("f".to_owned(), Value::Float(self.next(10_000) as f64 / 8.0));
                }
                if self.next(5) > 0 {
                    values.insert("k".to_owned(), Value::Text(format!("k{}", self.next(4))));
                }
                Row { day: Day(d), values }
            })
            .collect()
    }

    fn query(&mut self) -> Query {
        let start = day("2026-10-20").0;
        let from = start + self.next(30) as i32;
        let to = from + self.next(40) as i32;
        let column = |c: &mut Cases| ["a", "f", "k"][c.next(3) as usize];
        let filters = (0..self.next(3))
            .map(|_| {
                let column = column(self);
                let value = match column {
                    "a" => Value::Int(self.next(200) as i64 - 50),
                    "f" => Value::Float(self.next(10_000) as f64 / 8.0),
                    _ => Value::Text(format!("k{}", self.next(4))),
                };
                let op = [Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge][self.next(6) as usize];
                Filter {
                    column: column.into(),
                    op,
                    value,
                }
            })
            .collect();
        let group = match self.next(5) {
            0 => GroupBy::Day,
            1 => GroupBy::Week,
            2 => GroupBy::Month,
            3 => GroupBy::Column("k".into()),
            _ => GroupBy::Column("a".into()),
        };
        let mut aggregates: Vec<Aggregate> = (0..=self.next(3))
            .map(|_| {
                let function = [
                    Function::Sum,
                    Function::Avg,
                    Function::Min,
                    Function::Max,
                    Function::Count,
                ][self.next(5) as usize];
                let column = match function {
                    Function::Sum | Function::Avg => Some(["a", "f"][self.next(2) as usize]),
                    Function::Count if self.next(2) == 0 => None,
                    _ => Some(column(self)),
                };
                Aggregate {
                    function,
                    column: column.map(str::to_owned),
                }
            })
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        aggregates.retain(|a| seen.insert(a.output()));
        let outputs: Vec<String> = aggregates.iter().map(Aggregate::output).collect();
        let by = match self.next(outputs.len() as u64 + 1) as usize {
            0 => "key".to_owned(),
            i => outputs[i - 1].clone(),
        };
        Query {
            from: Day(from),
            to: Day(to),
            filters,
            group,
            aggregates,
            sort: Sort {
                by,
                descending: self.next(2) == 0,
            },
            limit: 1 + self.next(40) as usize,
        }
    }
}

fn batch(rows: &[Row]) -> RecordBatch {
    let columns = [
        ("a", DataType::Int64),
        ("f", DataType::Float64),
        ("k", DataType::Utf8),
    ];
    super::super::arrow::record_batch(rows, &columns).unwrap_or_else(|e| panic!("batch: {e}"))
}

fn literal(value: &Value) -> String {
    match value {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Text(t) => format!("'{t}'"),
    }
}

/// The same query in DataFusion's SQL.
fn sql(q: &Query) -> String {
    let key = match &q.group {
        GroupBy::Day => "d".to_owned(),
        GroupBy::Week => "d - ((d + 3) % 7)".to_owned(),
        GroupBy::Month => "CAST(CAST(date_trunc('month', dd) AS DATE) AS INT)".to_owned(),
        GroupBy::Column(c) => c.clone(),
    };
    let aggregates: Vec<String> = q
        .aggregates
        .iter()
        .map(|a| {
            let column = a.column.as_deref().unwrap_or("*");
            format!("{}({column}) AS \"{}\"", a.function.name(), a.output())
        })
        .collect();
    let mut conditions = vec![format!("d BETWEEN {} AND {}", q.from.0, q.to.0)];
    conditions.extend(q.filters.iter().map(|f| {
        format!(
            "{} {} {}",
            f.column,
            f.op.symbol().replace("!=", "<>"),
            literal(&f.value)
        )
    }));
    let direction = if q.sort.descending { "DESC" } else { "ASC" };
    let by = if q.sort.by == "key" {
        "key".to_owned()
    } else {
        format!("\"{}\"", q.sort.by)
    };
    format!(
        "SELECT {key} AS key, COUNT(*) AS days, {} FROM t WHERE {} GROUP BY {key} \
         ORDER BY {by} {direction} NULLS LAST, key ASC NULLS LAST LIMIT {}",
        aggregates.join(", "),
        conditions.join(" AND "),
        q.limit
    )
}

fn scalar(value: ScalarValue) -> Option<Value> {
    match value {
        ScalarValue::Int64(v) => v.map(Value::Int),
        ScalarValue::Int32(v) => v.map(|i| Value::Int(i64::from(i))),
        ScalarValue::Float64(v) => v.map(Value::Float),
        ScalarValue::Utf8(v) | ScalarValue::Utf8View(v) | ScalarValue::LargeUtf8(v) => v.map(Value::Text),
        other => panic!("unexpected {other:?}"),
    }
}

fn close(a: &Option<Value>, b: &Option<Value>) -> bool {
    match (a, b) {
        (Some(Value::Float(x)), Some(Value::Float(y))) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

/// A group's key as DataFusion returns it: the day number for dates.
fn key_value(key: &Key) -> Option<Value> {
    match key {
        Key::Day(d) | Key::Week(d) | Key::Month(d) => Some(Value::Int(i64::from(d.0))),
        Key::Value(v) => v.clone(),
    }
}

#[tokio::test]
async fn the_engine_answers_as_datafusion_does_on_generated_rows_and_queries() {
    let mut cases = Cases(0x5EED_1234);
    let mut answered = 0;
    for case in 0..300 {
        let rows = cases.rows();
        let q = cases.query();
        let ctx = SessionContext::new();
        ctx.register_batch("t", batch(&rows))
            .unwrap_or_else(|e| panic!("register: {e}"));
        let statement = sql(&q);
        let batches = match ctx.sql(&statement).await {
            Ok(frame) => frame.collect().await,
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| panic!("case {case}: {statement}: {e}"));
        let mut want = Vec::new();
        for batch in &batches {
            for i in 0..batch.num_rows() {
                let cell = |c: usize| {
                    scalar(
                        ScalarValue::try_from_array(batch.column(c), i)
                            .unwrap_or_else(|e| panic!("cell: {e}")),
                    )
                };
                let values: Vec<Option<Value>> = (2..batch.num_columns()).map(cell).collect();
                want.push((cell(0), cell(1), values));
            }
        }
        let got = evaluate(&q, &rows);
        assert_eq!(got.len(), want.len(), "case {case}: {statement}");
        answered += usize::from(!got.is_empty());
        for (g, (key, days, values)) in got.iter().zip(&want) {
            let outputs: Vec<Option<Value>> = q
                .aggregates
                .iter()
                .map(|a| g.values.get(&a.output()).cloned().flatten())
                .collect();
            let same = close(&key_value(&g.key), key)
                && close(&Some(Value::Int(i64::from(g.days))), days)
                && outputs.iter().zip(values).all(|(a, b)| close(a, b));
            assert!(
                same,
                "case {case}: {statement}\n got {g:?}\nwant {key:?} {days:?} {values:?}"
            );
        }
    }
    // Most cases must answer something, or the comparison proves little.
    assert!(answered > 200, "only {answered} of 300 cases had rows");
}
