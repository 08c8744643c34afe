//! The final statement's rows as merchant results: one per `merchant_id`,
//! every other column a metric rendered as JSON.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, Schema, UInt64Type};
use serde_json::{Number, Value};

use super::{ComputeError, MerchantResult};

/// The metric every stored result carries: the id of the SQL that computed it.
pub const SQL_COLUMN: &str = "_sql";

/// The metric a to-date result (an hour, a day) carries: the end of the span
/// it covers so far, in Unix milliseconds.
pub const THROUGH_COLUMN: &str = "_throughMs";

/// The metric a to-date result carries: where its events came from, `kv`
/// (every event of the span so far, from the KV store) or `memory` (the
/// events the slaves held while the KV store was down). Readers tell an
/// hour computed from memory (its events are in no window result) from one
/// that sums the windows.
pub const FROM_COLUMN: &str = "_from";

/// Columns a pipeline's SQL may not produce: the slave adds them.
const RESERVED: [&str; 3] = [SQL_COLUMN, THROUGH_COLUMN, FROM_COLUMN];

/// The final statement's rows as merchant results.
pub(crate) fn results(schema: &Schema, batches: &[RecordBatch]) -> Result<Vec<MerchantResult>, ComputeError> {
    let Ok(merchant_at) = schema.index_of("merchant_id") else {
        return Err(ComputeError::MissingMerchantId {
            columns: schema.fields().iter().map(|f| f.name().clone()).collect(),
        });
    };
    let mut out = Vec::new();
    for batch in batches {
        let merchants = batch.column(merchant_at);
        if !matches!(
            merchants.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..)
        ) {
            return Err(ComputeError::MerchantIdType {
                data_type: merchants.data_type().to_string(),
            });
        }
        let merchants = json_values("merchant_id", merchants)?;
        let mut metrics = Vec::new();
        for (at, field) in schema.fields().iter().enumerate() {
            if let Some(reserved) = RESERVED.iter().find(|r| **r == field.name()) {
                return Err(ComputeError::ReservedColumn(reserved));
            }
            if at != merchant_at {
                let values = json_values(field.name(), batch.column(at))?;
                metrics.push((field.name(), values.into_iter()));
            }
        }
        for merchant in merchants {
            let Value::String(merchant_id) = merchant else {
                return Err(ComputeError::NullMerchantId);
            };
            let metrics = metrics
                .iter_mut()
                .map(|(name, values)| ((*name).clone(), values.next().unwrap_or(Value::Null)))
                .collect();
            out.push(MerchantResult { merchant_id, metrics });
        }
    }
    out.sort_by(|a, b| a.merchant_id.cmp(&b.merchant_id));
    if let Some(pair) = out.windows(2).find(|p| p[0].merchant_id == p[1].merchant_id) {
        return Err(ComputeError::DuplicateMerchant(pair[0].merchant_id.clone()));
    }
    Ok(out)
}

/// A column as JSON values: integers, floats (non-finite → null), strings,
/// booleans, nulls; anything else Arrow can cast to text (decimals, dates,
/// timestamps) as strings, exactly as Arrow prints them.
fn json_values(name: &str, array: &ArrayRef) -> Result<Vec<Value>, ComputeError> {
    use DataType as T;
    let target = match array.data_type() {
        T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32 => T::Int64,
        T::Float16 | T::Float32 | T::Float64 => T::Float64,
        T::UInt64 => T::UInt64,
        T::Boolean => T::Boolean,
        T::Null => T::Null,
        _ => T::Utf8,
    };
    let unsupported = |_| ComputeError::UnsupportedType {
        column: name.to_owned(),
        data_type: array.data_type().to_string(),
    };
    let array = if array.data_type() == &target {
        array.clone()
    } else {
        cast(array, &target).map_err(unsupported)?
    };
    Ok(match target {
        T::Int64 => array
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        T::UInt64 => array
            .as_primitive::<UInt64Type>()
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        T::Float64 => array
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.and_then(Number::from_f64).map_or(Value::Null, Value::Number))
            .collect(),
        T::Boolean => array
            .as_boolean()
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        T::Null => vec![Value::Null; array.len()],
        _ => array
            .as_string::<i32>()
            .iter()
            .map(|v| v.map_or(Value::Null, |s| Value::String(s.to_owned())))
            .collect(),
    })
}
