//! Turning binlog row images into change events, or into dead letters that
//! carry the row and the reason it could not become one. Pure.

use mysql_async::Value;
use mysql_async::binlog::value::BinlogValue;
use serde_json::Value as Json;

use crate::wire::{ChangeEvent, Operation};

/// Why a row could not become an event (it goes to the dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The row's values do not match the table's known columns.
    #[error("row of {table} has {values} values for {columns} known columns")]
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
    /// A binlog value has no MySQL value form (e.g. a partial JSON update):
    /// written as NULL it would silently change the row.
    #[error("row of {table}: column {column} cannot be read: {reason}")]
    Conversion {
        /// The table.
        table: String,
        /// The column (or its ordinal, if the schema does not name it).
        column: String,
        /// The conversion's error.
        reason: String,
    },
}

/// Where a rows event's column names come from.
#[derive(Debug, PartialEq, Eq)]
pub enum Names<'a> {
    /// The binlog's table metadata names them.
    Binlog(Vec<String>),
    /// The schema read from the source database matches the column count.
    Read(&'a [String]),
    /// Neither: the schema must be read again (the table was altered).
    Reread,
}

/// The column names for a rows event of `count` columns. Pure.
pub fn names<'a>(from_binlog: Option<Vec<String>>, read: Option<&'a [String]>, count: usize) -> Names<'a> {
    match (from_binlog, read) {
        (Some(names), _) if names.len() == count => Names::Binlog(names),
        (_, Some(read)) if read.len() == count => Names::Read(read),
        _ => Names::Reread,
    }
}

/// The column names a table map event carries, when the server writes them
/// (`binlog_row_metadata=FULL`).
pub fn binlog_names(tme: &mysql_async::binlog::events::TableMapEvent<'_>) -> Option<Vec<String>> {
    use mysql_async::binlog::events::OptionalMetadataField;
    tme.iter_optional_meta().find_map(|field| match field {
        Ok(OptionalMetadataField::ColumnName(names)) => names
            .iter_names()
            .map(|name| name.map(|n| n.name().into_owned()))
            .collect::<Result<Vec<String>, _>>()
            .ok(),
        _ => None,
    })
}

/// A row image's values, and the columns whose binlog value could not be
/// converted (ordinal, the raw value as debug text, why). Pure.
#[derive(Debug, Default)]
pub struct Image {
    /// The values in column order; an unconverted one is NULL here.
    pub values: Vec<Value>,
    /// Columns that could not be converted: the row must not become an event.
    pub unconverted: Vec<(usize, String, String)>,
}

/// Converts a binlog row image, keeping what could not be converted.
pub fn image(raw: Vec<BinlogValue<'_>>) -> Image {
    let mut out = Image {
        values: Vec::with_capacity(raw.len()),
        unconverted: Vec::new(),
    };
    for (i, value) in raw.into_iter().enumerate() {
        // A plain value is taken as it is, never printed: mysql_common's Debug
        // of a TIME beyond MySQL's range overflows (the fuzz test found it).
        let value = match value {
            BinlogValue::Value(plain) => {
                out.values.push(plain);
                continue;
            }
            other => other,
        };
        let text = format!("{value:?}");
        match Value::try_from(value) {
            Ok(v) => out.values.push(v),
            Err(error) => {
                out.unconverted.push((i, text, error.to_string()));
                out.values.push(Value::NULL);
            }
        }
    }
    out
}

/// A row that could not become an event, with everything needed to repair
/// and replay it: where it is in the binlog, the table, the operation, the
/// reason, and the row itself (column name to value; a column the schema
/// does not name is `#<ordinal>`; an unconvertible value is its raw text).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// `file:position:index`: also the event id the row would have had.
    pub at: String,
    /// The table.
    pub table: String,
    /// insert, update or delete.
    pub op: &'static str,
    /// Why it is a dead letter.
    pub reason: String,
    /// The row's values.
    pub row: serde_json::Map<String, Json>,
}

impl DeadLetter {
    /// The dead letter of `image`, refused for `error`.
    pub fn of(
        table: &str,
        columns: &[String],
        image: &Image,
        op: Operation,
        at: &RowPosition<'_>,
        error: &RowError,
    ) -> Self {
        let mut row: serde_json::Map<String, Json> = image
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (column_name(columns, i), to_json(v)))
            .collect();
        for (i, raw, _) in &image.unconverted {
            row.insert(column_name(columns, *i), Json::String(raw.clone()));
        }
        Self {
            at: format!("{}:{}:{}", at.file, at.pos, at.index),
            table: table.to_owned(),
            op: op.as_str_name(),
            reason: error.to_string(),
            row,
        }
    }

    /// Its approximate size in memory, for the collector's byte bound.
    pub fn bytes(&self) -> usize {
        64 + self.at.len()
            + self.reason.len()
            + self
                .row
                .iter()
                .map(|(k, v)| k.len() + 16 + json_len(v))
                .sum::<usize>()
    }
}

fn json_len(value: &Json) -> usize {
    match value {
        Json::String(s) => s.len(),
        _ => 8,
    }
}

fn column_name(columns: &[String], i: usize) -> String {
    columns.get(i).cloned().unwrap_or_else(|| format!("#{i}"))
}

/// The error of an image with unconverted columns, if it has any.
pub fn conversion_error(table: &str, columns: &[String], image: &Image) -> Option<RowError> {
    image
        .unconverted
        .first()
        .map(|(i, _, reason)| RowError::Conversion {
            table: table.to_owned(),
            column: column_name(columns, *i),
            reason: reason.clone(),
        })
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

    if values.len() != columns.len() {
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
    fn an_unconvertible_value_makes_a_dead_letter_with_the_row_never_a_null() {
        let raw = vec![
            BinlogValue::Value(Value::Int(7)),
            BinlogValue::Value(Value::Bytes(b"m1".to_vec())),
            BinlogValue::JsonDiff(Vec::new()),
        ];
        let image = image(raw);
        assert_eq!(image.unconverted.len(), 1);
        assert_eq!(image.unconverted[0].0, 2);
        let names: Vec<String> = ["id", "merchant_id"].map(String::from).to_vec();
        let error = conversion_error("orders", &names, &image).expect("a conversion error");
        assert!(
            matches!(&error, RowError::Conversion { column, .. } if column == "#2"),
            "{error}"
        );
        let letter = DeadLetter::of("orders", &names, &image, Operation::Update, &at(), &error);
        assert_eq!(letter.at, "binlog.000003:1234:1");
        assert_eq!(letter.op, "UPDATE");
        assert_eq!(letter.row["id"], 7);
        assert_eq!(letter.row["merchant_id"], "m1");
        assert!(
            letter.row["#2"]
                .as_str()
                .is_some_and(|raw| raw.contains("JsonDiff"))
        );
        assert!(
            letter.reason.contains("column #2 cannot be read"),
            "{}",
            letter.reason
        );
        // A clean image converts whole.
        let clean = super::image(vec![BinlogValue::Value(Value::NULL)]);
        assert!(clean.unconverted.is_empty());
        assert_eq!(conversion_error("orders", &names, &clean), None);
    }

    #[test]
    fn a_refused_row_becomes_a_dead_letter_carrying_its_values() {
        let image = Image {
            values: vec![
                Value::Int(7),
                Value::Bytes(Vec::new()),
                Value::Int(990),
                Value::NULL,
            ],
            unconverted: Vec::new(),
        };
        let error = event(
            "orders",
            &cols(),
            &image.values,
            "merchant_id",
            Operation::Insert,
            0,
            &at(),
        )
        .expect_err("empty merchant");
        let letter = DeadLetter::of("orders", &cols(), &image, Operation::Insert, &at(), &error);
        let json = serde_json::to_value(&letter).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "at": "binlog.000003:1234:1", "table": "orders", "op": "INSERT",
                "reason": "row of orders has no merchant_id (merchant id)",
                "row": {"id": 7, "merchant_id": "", "amount": 990, "note": null}
            })
        );
        assert!(letter.bytes() > 0);
    }

    #[test]
    fn column_names_come_from_the_binlog_then_a_matching_schema_else_a_reread() {
        let read = cols();
        let binlog = || Some(["a", "b", "c", "d"].map(String::from).to_vec());
        // (names in the binlog, names read, columns in the event, source)
        let cases = [
            (
                binlog(),
                Some(read.as_slice()),
                4,
                Names::Binlog(binlog().unwrap_or_default()),
            ),
            (None, Some(read.as_slice()), 4, Names::Read(read.as_slice())),
            // A column was added: the schema read at start no longer fits.
            (None, Some(read.as_slice()), 5, Names::Reread),
            (binlog(), Some(read.as_slice()), 5, Names::Reread),
            (None, None, 4, Names::Reread),
        ];
        for (i, (binlog, read, count, want)) in cases.into_iter().enumerate() {
            assert_eq!(names(binlog, read, count), want, "case {i}");
        }
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
