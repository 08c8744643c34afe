//! A window's tables given the source schema's types: each inferred table is
//! cast to the types the operator published for its columns (a value that is
//! not of its column's type is an error naming the column, never a NULL), a
//! column without values in the window is a typed column of nulls, and a
//! tracked table without events is an empty table of the right columns, so
//! SQL over it plans and runs. Columns the schema does not know yet (read
//! before a change to the table was published) keep their inferred types.

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_crds::{ColumnType, SourceColumn, SourceSchema};
use datafusion::arrow::array::{ArrayRef, new_null_array};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use super::frame::{FrameError, META_COLUMNS};

/// The Arrow type of a source column type.
pub fn data_type(column: ColumnType) -> DataType {
    match column {
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Utf8 => DataType::Utf8,
    }
}

fn meta_fields() -> Vec<Field> {
    vec![
        Field::new(META_COLUMNS[0], DataType::Utf8, false),
        Field::new(META_COLUMNS[1], DataType::Utf8, false),
        Field::new(META_COLUMNS[2], DataType::Int64, false),
    ]
}

/// The schema of `table`: the meta columns, the source columns with their
/// types, then `extra` (inferred columns the source schema lacks).
fn schema_of(columns: &[SourceColumn], extra: &[Field]) -> SchemaRef {
    let mut fields = meta_fields();
    fields.extend(
        columns
            .iter()
            .map(|c| Field::new(&c.name, data_type(c.type_), true)),
    );
    fields.extend(extra.iter().cloned());
    Arc::new(Schema::new(fields))
}

/// Gives every tracked table of `schema` its source types: `tables` (built by
/// inference) are cast, and tables without events are added empty.
pub fn conform(
    mut tables: BTreeMap<String, Vec<RecordBatch>>,
    schema: &SourceSchema,
) -> Result<BTreeMap<String, Vec<RecordBatch>>, FrameError> {
    for (table, columns) in schema {
        let conformed = match tables.remove(table) {
            Some(batches) => conform_table(table, &batches, columns)?,
            None => vec![RecordBatch::new_empty(schema_of(columns, &[]))],
        };
        tables.insert(table.clone(), conformed);
    }
    Ok(tables)
}

/// One inferred table cast to its source columns' types.
fn conform_table(
    table: &str,
    batches: &[RecordBatch],
    columns: &[SourceColumn],
) -> Result<Vec<RecordBatch>, FrameError> {
    let Some(first) = batches.first() else {
        return Ok(vec![RecordBatch::new_empty(schema_of(columns, &[]))]);
    };
    let known = |name: &str| META_COLUMNS.contains(&name) || columns.iter().any(|c| c.name == name);
    let extra: Vec<Field> = first
        .schema()
        .fields()
        .iter()
        .filter(|f| !known(f.name()))
        .map(|f| f.as_ref().clone())
        .collect();
    let target = schema_of(columns, &extra);
    // Strict: a value that is not of its column's type fails the window.
    let strict = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let arrow = |column: &str, source| FrameError::Typed {
        table: table.to_owned(),
        column: column.to_owned(),
        source,
    };
    batches
        .iter()
        .map(|batch| {
            let arrays = target
                .fields()
                .iter()
                .map(|field| match batch.column_by_name(field.name()) {
                    Some(array) if array.data_type() == field.data_type() => Ok(array.clone()),
                    Some(array) => cast_with_options(array, field.data_type(), &strict)
                        .map_err(|e| arrow(field.name(), e)),
                    None => Ok(new_null_array(field.data_type(), batch.num_rows())),
                })
                .collect::<Result<Vec<ArrayRef>, FrameError>>()?;
            RecordBatch::try_new(target.clone(), arrays).map_err(|e| arrow("*", e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::engine::testing::event;
    use crate::compute::frame::partitioned;
    use crate::wire::Operation::Insert;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    use serde_json::json;

    fn column(name: &str, type_: ColumnType) -> SourceColumn {
        SourceColumn {
            name: name.into(),
            type_,
        }
    }

    fn schema() -> SourceSchema {
        [
            (
                "orders".to_owned(),
                vec![
                    column("merchant_id", ColumnType::Utf8),
                    column("amount", ColumnType::Int64),
                    column("coupon", ColumnType::Int64),
                ],
            ),
            ("refunds".to_owned(), vec![column("order_id", ColumnType::Int64)]),
        ]
        .into()
    }

    #[test]
    fn a_table_without_events_is_an_empty_table_of_the_source_types() -> Result<(), FrameError> {
        let events = [event(
            "e1",
            "orders",
            Insert,
            json!({"merchant_id": "m1", "amount": 5}),
        )];
        let tables = partitioned(&events, 1, Some(&schema()))?;
        let refunds = &tables["refunds"];
        assert_eq!(refunds.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
        let fields: Vec<(String, DataType)> = refunds[0]
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        assert_eq!(
            fields,
            [
                ("_event_id".into(), DataType::Utf8),
                ("_op".into(), DataType::Utf8),
                ("_event_time_ms".into(), DataType::Int64),
                ("order_id".into(), DataType::Int64)
            ]
        );
        Ok(())
    }

    #[test]
    fn columns_take_the_source_types_whatever_the_window_held() -> Result<(), FrameError> {
        // `coupon` is null in every row of this window: inferred, it would be text.
        let events = [
            event(
                "e1",
                "orders",
                Insert,
                json!({"merchant_id": "m1", "amount": 5, "coupon": null}),
            ),
            event(
                "e2",
                "orders",
                Insert,
                json!({"merchant_id": "m2", "amount": 7, "coupon": null, "note": "x"}),
            ),
        ];
        let tables = partitioned(&events, 1, Some(&schema()))?;
        let orders = &tables["orders"][0];
        let types: Vec<(String, DataType)> = orders
            .schema()
            .fields()
            .iter()
            .skip(3)
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        assert_eq!(
            types,
            [
                ("merchant_id".into(), DataType::Utf8),
                ("amount".into(), DataType::Int64),
                ("coupon".into(), DataType::Int64),
                // Not in the schema yet: kept, as inferred.
                ("note".into(), DataType::Utf8)
            ]
        );
        let amounts = orders
            .column_by_name("amount")
            .map(|a| a.as_primitive::<Int64Type>().values().to_vec());
        assert_eq!(amounts, Some(vec![5, 7]));
        Ok(())
    }

    #[tokio::test]
    async fn sql_reading_a_table_without_events_runs_given_the_source_schema()
    -> Result<(), crate::compute::ComputeError> {
        let sql = crate::compute::Sql::parse(
            "SELECT o.merchant_id, COUNT(*) AS orders, COUNT(r.order_id) AS refunds \
             FROM orders o LEFT JOIN refunds r ON r.order_id = o.amount GROUP BY o.merchant_id",
        )?;
        let events = [event(
            "e1",
            "orders",
            Insert,
            json!({"merchant_id": "m1", "amount": 5}),
        )];
        let results = crate::compute::run(&sql, &events, Some(&schema()), None).await?;
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].metrics["refunds"], 0);
        // Without it, the table is unknown: the window cannot be computed.
        let error = crate::compute::run(&sql, &events, None, None)
            .await
            .expect_err("no refunds table");
        assert!(error.to_string().contains("refunds"), "{error}");
        Ok(())
    }

    #[test]
    fn a_value_not_of_its_column_type_fails_naming_the_column() {
        let events = [event(
            "e1",
            "orders",
            Insert,
            json!({"merchant_id": "m1", "amount": "lots"}),
        )];
        let error = partitioned(&events, 1, Some(&schema())).expect_err("text in an integer column");
        assert!(
            matches!(&error, FrameError::Typed { table, column, .. } if table == "orders" && column == "amount"),
            "{error}"
        );
    }
}
