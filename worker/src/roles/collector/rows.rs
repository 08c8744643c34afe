//! Turning binlog row images into change events. Pure.

use mysql_async::Value;
use serde_json::Value as Json;

use crate::wire::{ChangeEvent, Operation};

/// Why a row could not become an event (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The row has fewer values than the table has columns.
    #[error("row of {table} has {values} values for {columns} columns")]
    Shape {
        /// The table.
        table: String,
        /// Values in the row image.
        values: usize,
        /// Columns known for the table.
        columns: usize,
    },
    /// The merchant column is missing or NULL.
    #[error("row of {table} has no {column} (merchant id)")]
    NoMerchant {
        /// The table.
        table: String,
        /// The merchant column.
        column: String,
    },
}

/// A MySQL value as JSON: numbers stay numbers, text and decimals become strings.
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::NULL => Json::Null,
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::Float(f) => Json::from(f64::from(*f)),
        Value::Double(d) => Json::from(*d),
        Value::Bytes(bytes) => Json::String(String::from_utf8_lossy(bytes).into_owned()),
        Value::Date(y, mo, d, h, mi, s, us) => {
            Json::String(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"))
        }
        Value::Time(neg, days, h, mi, s, us) => {
            let sign = if *neg { "-" } else { "" };
            Json::String(format!(
                "{sign}{}:{mi:02}:{s:02}.{us:06}",
                u64::from(*days) * 24 + u64::from(*h)
            ))
        }
    }
}

/// The binlog file name of a rotate event. The server's first (artificial)
/// rotate event can carry its checksum after the name, so only
/// `<base>.<digits>` is kept.
pub fn binlog_file_name(raw: &str) -> String {
    let Some(dot) = raw.rfind('.') else {
        return raw.to_owned();
    };
    let digits = raw[dot + 1..].chars().take_while(char::is_ascii_digit).count();
    raw[..dot + 1 + digits].to_owned()
}

/// Where in the binlog a row sits: it makes the event id stable across re-reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPosition<'a> {
    /// Binlog file name.
    pub file: &'a str,
    /// End position of the rows event in that file.
    pub pos: u64,
    /// Index of the row within the event.
    pub index: usize,
}

/// One MySQL value written as JSON exactly as [`to_json`] renders it, without
/// building the intermediate tree: the collector does this for every column of
/// every row.
struct Cell<'a>(&'a Value);

impl serde::Serialize for Cell<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::NULL => s.serialize_unit(),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => s.serialize_f64(f64::from(*f)),
            Value::Double(d) => s.serialize_f64(*d),
            Value::Bytes(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => s.serialize_str(text),
                Err(_) => s.serialize_str(&String::from_utf8_lossy(bytes)),
            },
            other => to_json(other).serialize(s),
        }
    }
}

/// The merchant id in a value: non-empty text or a number.
fn merchant_of(value: &Value) -> Option<String> {
    match to_json(value) {
        Json::String(s) if !s.is_empty() => Some(s),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One row image of `table` as a change event.
pub fn event(
    table: &str,
    columns: &[String],
    values: &[Value],
    merchant_column: &str,
    op: Operation,
    time_ms: i64,
    at: &RowPosition<'_>,
) -> Result<ChangeEvent, RowError> {
    use serde::ser::{SerializeMap, Serializer as _};

    if values.len() < columns.len() {
        return Err(RowError::Shape {
            table: table.to_owned(),
            values: values.len(),
            columns: columns.len(),
        });
    }
    let merchant = columns
        .iter()
        .position(|c| c == merchant_column)
        .and_then(|i| merchant_of(&values[i]))
        .ok_or_else(|| RowError::NoMerchant {
            table: table.to_owned(),
            column: merchant_column.to_owned(),
        })?;
    let mut json = Vec::with_capacity(16 * columns.len());
    let mut serializer = serde_json::Serializer::new(&mut json);
    // Writing into a Vec cannot fail, and every key is a string.
    if let Ok(mut map) = serializer.serialize_map(Some(columns.len())) {
        for (name, value) in columns.iter().zip(values) {
            let _ = map.serialize_entry(name, &Cell(value));
        }
        let _ = map.end();
    }
    Ok(ChangeEvent {
        event_id: format!("{}:{}:{}", at.file, at.pos, at.index),
        merchant_id: merchant,
        table: table.to_owned(),
        op: op.into(),
        event_time_ms: time_ms,
        columns: json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<String> {
        ["id", "merchant_id", "amount", "note"].map(String::from).to_vec()
    }

    fn at() -> RowPosition<'static> {
        RowPosition {
            file: "binlog.000003",
            pos: 1234,
            index: 1,
        }
    }

    #[test]
    fn a_row_becomes_an_event_keyed_by_merchant_with_a_stable_id() {
        let values = [
            Value::Int(7),
            Value::UInt(42),
            Value::Bytes(b"19.90".to_vec()),
            Value::NULL,
        ];
        let e = event(
            "orders",
            &cols(),
            &values,
            "merchant_id",
            Operation::Insert,
            5_000,
            &at(),
        )
        .expect("event");
        assert_eq!(
            (e.event_id.as_str(), e.merchant_id.as_str(), e.event_time_ms),
            ("binlog.000003:1234:1", "42", 5_000)
        );
        let columns: Json = serde_json::from_slice(&e.columns).expect("json");
        assert_eq!(
            columns,
            serde_json::json!({"id": 7, "merchant_id": 42, "amount": "19.90", "note": null})
        );
    }

    #[test]
    fn rows_without_a_merchant_or_with_missing_values_are_refused_with_the_reason() {
        let no_merchant = [Value::Int(7), Value::NULL, Value::Int(1), Value::NULL];
        let err = event(
            "orders",
            &cols(),
            &no_merchant,
            "merchant_id",
            Operation::Insert,
            0,
            &at(),
        )
        .expect_err("no merchant");
        assert_eq!(err.to_string(), "row of orders has no merchant_id (merchant id)");
        let short = [Value::Int(7)];
        let err = event(
            "orders",
            &cols(),
            &short,
            "merchant_id",
            Operation::Insert,
            0,
            &at(),
        )
        .expect_err("short");
        assert!(matches!(
            err,
            RowError::Shape {
                values: 1,
                columns: 4,
                ..
            }
        ));
    }

    #[test]
    fn every_kind_of_value_is_written_as_to_json_renders_it() {
        let names: Vec<String> = ["i", "u", "f", "d", "m", "lossy", "null", "date", "time"]
            .map(String::from)
            .to_vec();
        let values = [
            Value::Int(-3),
            Value::UInt(u64::MAX),
            Value::Float(1.5),
            Value::Double(f64::NAN),
            Value::Bytes(b"m \"quoted\"".to_vec()),
            Value::Bytes(vec![0xff, b'a']),
            Value::NULL,
            Value::Date(2026, 11, 21, 9, 5, 0, 7),
            Value::Time(false, 0, 1, 2, 3, 0),
        ];
        let e = event("t", &names, &values, "m", Operation::Update, 0, &at()).expect("event");
        let written: Json = serde_json::from_slice(&e.columns).expect("valid JSON");
        let expected: serde_json::Map<String, Json> =
            names.iter().cloned().zip(values.iter().map(to_json)).collect();
        assert_eq!(written, Json::Object(expected));
        assert_eq!(e.merchant_id, "m \"quoted\"");
    }

    #[test]
    fn rotate_names_lose_trailing_checksum_bytes() {
        assert_eq!(
            binlog_file_name("binlog.000004\u{1}\u{2}z\u{7f}"),
            "binlog.000004"
        );
        assert_eq!(binlog_file_name("binlog.000004"), "binlog.000004");
        assert_eq!(binlog_file_name("mysql-bin.123456"), "mysql-bin.123456");
    }

    #[test]
    fn dates_and_times_render_as_text() {
        assert_eq!(
            to_json(&Value::Date(2026, 11, 21, 9, 5, 0, 0)),
            "2026-11-21 09:05:00.000000"
        );
        assert_eq!(to_json(&Value::Time(true, 1, 2, 3, 4, 5)), "-26:03:04.000005");
    }
}
