//! History rows as an Arrow record batch: what DataFusion is given when the
//! in-memory engine is compared with it (its tests, and `make bench`).

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::error::ArrowError;

use super::engine::{Row, Value};

/// `rows` as a batch: `d` (the day number) and `dd` (the day as a date),
/// then each of `columns` as its type (`Int64`, `Float64` or `Utf8`; a value
/// of another type is null).
pub fn record_batch(rows: &[Row], columns: &[(&str, DataType)]) -> Result<RecordBatch, ArrowError> {
    let days: Vec<i32> = rows.iter().map(|r| r.day.0).collect();
    let mut fields = vec![
        Field::new("d", DataType::Int32, false),
        Field::new("dd", DataType::Date32, false),
    ];
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(days.clone())),
        Arc::new(Date32Array::from(days)),
    ];
    for (name, kind) in columns {
        let values = rows.iter().map(|r| r.values.get(*name));
        let array: ArrayRef = match kind {
            DataType::Int64 => Arc::new(
                values
                    .map(|v| match v {
                        Some(Value::Int(i)) => Some(*i),
                        _ => None,
                    })
                    .collect::<Int64Array>(),
            ),
            DataType::Float64 => Arc::new(
                values
                    .map(|v| match v {
                        Some(Value::Float(f)) => Some(*f),
                        _ => None,
                    })
                    .collect::<Float64Array>(),
            ),
            DataType::Utf8 => Arc::new(
                values
                    .map(|v| match v {
                        Some(Value::Text(t)) => Some(t.as_str()),
                        _ => None,
                    })
                    .collect::<StringArray>(),
            ),
            other => {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "column {name}: {other} is not a history column type"
                )));
            }
        };
        fields.push(Field::new(*name, kind.clone(), true));
        arrays.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
}
