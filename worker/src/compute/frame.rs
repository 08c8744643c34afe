//! A window's change events as Arrow tables: one table per source table, the
//! row's JSON columns expanded into typed columns inferred over all of that
//! table's events, after the meta columns `_event_id`, `_op` and `_event_time_ms`.
//!
//! Types: JSON integers → Int64; integers mixed with floats → Float64; strings
//! (and nested arrays/objects, as JSON text) → Utf8; booleans → Boolean; a column
//! whose values are of conflicting kinds (number and string, or an integer beyond
//! Int64) → Utf8 holding each value's source text; a column of nulls only → Utf8.
//! A key missing from a row is null there. JSON keys come in first-seen order.
//!
//! Columns are built in one pass, typed by the first non-null value and widened
//! in place (Int64 → Float64) as needed; a conflicting column is marked and
//! rebuilt from the source at the end (rare, and exact). Large tables are built
//! in contiguous chunks on several threads, then given one schema.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Builder, StringBuilder, new_null_array};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use super::column::{Column, Kind};
use super::json::{Key, Scanner, plain};
use crate::wire::{ChangeEvent, Operation};

/// The meta columns every table starts with, in order.
pub const META_COLUMNS: [&str; 3] = ["_event_id", "_op", "_event_time_ms"];

/// The fewest rows a chunk built on a thread of its own gets: below that, the
/// thread costs more than it saves.
const MIN_PARALLEL_ROWS: usize = 50_000;

/// Why events could not be turned into tables.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// An event's columns are not a well-formed JSON object: the collector
    /// (or whatever wrote the event) is broken; the event is named to find it.
    #[error("event {event_id} (table {table}): columns are not a valid JSON object: {reason}")]
    Columns {
        /// The event.
        event_id: String,
        /// Its table.
        table: String,
        /// What is wrong, with the byte offset.
        reason: String,
    },
    /// An event's operation is not insert, update or delete.
    #[error("event {event_id} (table {table}): unknown operation {op}")]
    Operation {
        /// The event.
        event_id: String,
        /// Its table.
        table: String,
        /// The operation number on the wire.
        op: i32,
    },
    /// A column's values are not of the type the source schema gives it.
    #[error("table {table}, column {column}: a value is not of the column's source type: {source}")]
    Typed {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Arrow's cast error.
        #[source]
        source: ArrowError,
    },
    /// Arrow refused to assemble a table (a bug here, not bad input).
    #[error("building table {table}: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// Arrow's error.
        #[source]
        source: ArrowError,
    },
}

/// One Arrow table per source table name, all rows in one batch.
pub fn tables(events: &[ChangeEvent]) -> Result<BTreeMap<String, RecordBatch>, FrameError> {
    let mut out = BTreeMap::new();
    for (name, parts) in partitioned(events, parallelism(), None)? {
        let schema = parts
            .first()
            .map(RecordBatch::schema)
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        let batch = concat_batches(&schema, &parts).map_err(|source| FrameError::Arrow {
            table: name.clone(),
            source,
        })?;
        out.insert(name, batch);
    }
    Ok(out)
}

/// One Arrow table per source table name, as batches of one schema built on up
/// to `threads` threads (contiguous runs of the table's events, in order).
/// Skips the copy [`tables`] makes to put each table in one batch. With the
/// source `schema`, every tracked table has its source types, events or not
/// ([`super::typed`]).
pub fn partitioned(
    events: &[ChangeEvent],
    threads: usize,
    schema: Option<&ballast_crds::SourceSchema>,
) -> Result<BTreeMap<String, Vec<RecordBatch>>, FrameError> {
    let mut by_table: BTreeMap<&str, Vec<&ChangeEvent>> = BTreeMap::new();
    for event in events {
        by_table.entry(&event.table).or_default().push(event);
    }
    let mut out = BTreeMap::new();
    for (name, rows) in by_table {
        let chunks = threads.clamp(1, (rows.len() / MIN_PARALLEL_ROWS).max(1));
        out.insert(name.to_owned(), build(name, &rows, chunks)?);
    }
    match schema {
        Some(schema) => super::typed::conform(out, schema),
        None => Ok(out),
    }
}

/// The threads a table is built on by [`tables`]: the machine's CPUs.
pub fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A chunk's meta columns and JSON columns (`None` for empty and mixed ones).
struct Chunk {
    meta: [ArrayRef; 3],
    columns: Vec<(String, Kind, Option<ArrayRef>)>,
}

fn columns_error(event: &ChangeEvent, reason: String) -> FrameError {
    FrameError::Columns {
        event_id: event.event_id.clone(),
        table: event.table.clone(),
        reason,
    }
}

fn op_name(event: &ChangeEvent) -> Result<&'static str, FrameError> {
    match Operation::try_from(event.op) {
        Ok(Operation::Insert) => Ok("INSERT"),
        Ok(Operation::Update) => Ok("UPDATE"),
        Ok(Operation::Delete) => Ok("DELETE"),
        _ => Err(FrameError::Operation {
            event_id: event.event_id.clone(),
            table: event.table.clone(),
            op: event.op,
        }),
    }
}

/// Builds one chunk of a table: a single pass over its events.
fn build_chunk(events: &[&ChangeEvent]) -> Result<Chunk, FrameError> {
    let rows = events.len();
    let id_bytes = events.iter().map(|e| e.event_id.len()).sum();
    let mut ids = StringBuilder::with_capacity(rows, id_bytes);
    let mut ops = StringBuilder::with_capacity(rows, rows * 6);
    let mut times = Int64Builder::with_capacity(rows);
    let mut columns: Vec<Column> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut scanner = Scanner::default();
    for (row, event) in events.iter().enumerate() {
        ids.append_value(&event.event_id);
        ops.append_value(op_name(event)?);
        times.append_value(event.event_time_ms);
        scanner
            .start(&event.columns)
            .map_err(|e| columns_error(event, e))?;
        let mut position = 0;
        loop {
            // Rows of one table nearly always list the same keys in the same
            // order: the column at this position is the likely next one, and
            // when its name matches the raw bytes the key is neither scanned
            // nor hashed.
            let hint = columns.get(position).and_then(Column::hint);
            let Some((key, value)) = scanner.member(hint).map_err(|e| columns_error(event, e))? else {
                break;
            };
            let at = match key {
                Key::Hint => position,
                Key::Name(key) => column_at(&mut columns, &mut index, key, event)?,
            };
            let Some(column) = columns.get_mut(at) else {
                return Err(columns_error(event, format!("column {at} lost its builder")));
            };
            if column.len() > row {
                let reason = format!("column `{}` appears twice", column.name);
                return Err(columns_error(event, reason));
            }
            column.pad(row);
            column.push(value, rows);
            position = at + 1;
        }
    }
    let columns = columns
        .into_iter()
        .map(|c| (c.name.clone(), c.kind(), c.finish(rows)))
        .collect();
    Ok(Chunk {
        meta: [
            Arc::new(ids.finish()),
            Arc::new(ops.finish()),
            Arc::new(times.finish()),
        ],
        columns,
    })
}

/// The index of the column named `key`, added (in first-seen order) when new.
fn column_at(
    columns: &mut Vec<Column>,
    index: &mut HashMap<String, usize>,
    key: &str,
    event: &ChangeEvent,
) -> Result<usize, FrameError> {
    if let Some(&at) = index.get(key) {
        return Ok(at);
    }
    if META_COLUMNS.contains(&key) {
        let reason = format!("column `{key}` is reserved for the meta columns");
        return Err(columns_error(event, reason));
    }
    index.insert(key.to_owned(), columns.len());
    columns.push(Column::new(key));
    Ok(columns.len() - 1)
}

/// One column of `events` as text: each value's source text (mixed columns).
fn text_column(events: &[&ChangeEvent], name: &str) -> Result<ArrayRef, FrameError> {
    let mut out = StringBuilder::with_capacity(events.len(), events.len() * 8);
    let mut scanner = Scanner::default();
    for event in events {
        scanner
            .start(&event.columns)
            .map_err(|e| columns_error(event, e))?;
        // The first pass validated every event: stop at the member sought.
        let mut found = false;
        let hint = Some(name).filter(|n| plain(n));
        while let Some((key, value)) = scanner.member(hint).map_err(|e| columns_error(event, e))? {
            if key == Key::Hint || key == Key::Name(name) {
                out.append_option(value.as_text());
                found = true;
                break;
            }
        }
        if !found {
            out.append_null();
        }
    }
    Ok(Arc::new(out.finish()))
}

/// Builds a table from its events in `chunks` contiguous chunks (one thread
/// each), then gives every chunk the unified schema.
fn build(table: &str, events: &[&ChangeEvent], chunks: usize) -> Result<Vec<RecordBatch>, FrameError> {
    let size = events.len().div_ceil(chunks.max(1)).max(1);
    let slices: Vec<&[&ChangeEvent]> = events.chunks(size).collect();
    let built: Vec<Result<Chunk, FrameError>> = if slices.len() <= 1 {
        slices.iter().map(|s| build_chunk(s)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = slices
                .iter()
                .map(|s| scope.spawn(move || build_chunk(s)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(FrameError::Arrow {
                            table: table.to_owned(),
                            source: ArrowError::ComputeError("a frame builder thread panicked".into()),
                        })
                    })
                })
                .collect()
        })
    };
    let built = built.into_iter().collect::<Result<Vec<Chunk>, _>>()?;

    // The union of the chunks' columns, in first-seen order, with unified kinds.
    let mut order: Vec<(String, Kind)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for chunk in &built {
        for (name, kind, _) in &chunk.columns {
            match index.get(name.as_str()) {
                Some(&at) => order[at].1 = order[at].1.unify(*kind),
                None => {
                    index.insert(name, order.len());
                    order.push((name.clone(), *kind));
                }
            }
        }
    }
    let arrow = |source| FrameError::Arrow {
        table: table.to_owned(),
        source,
    };
    let mut fields = vec![
        Field::new(META_COLUMNS[0], DataType::Utf8, false),
        Field::new(META_COLUMNS[1], DataType::Utf8, false),
        Field::new(META_COLUMNS[2], DataType::Int64, false),
    ];
    fields.extend(
        order
            .iter()
            .map(|(name, kind)| Field::new(name, kind.data_type(), true)),
    );
    let schema: SchemaRef = Arc::new(Schema::new(fields));

    let mut batches = Vec::with_capacity(built.len());
    for (chunk, rows) in built.into_iter().zip(&slices) {
        let mut own: HashMap<String, Option<ArrayRef>> = chunk
            .columns
            .into_iter()
            .map(|(name, _, array)| (name, array))
            .collect();
        let mut arrays: Vec<ArrayRef> = chunk.meta.to_vec();
        for (name, kind) in &order {
            let data_type = kind.data_type();
            let array = match own.remove(name).flatten() {
                _ if *kind == Kind::Mixed => text_column(rows, name)?,
                Some(array) if array.data_type() == &data_type => array,
                Some(array) => cast(&array, &data_type).map_err(arrow)?,
                None => new_null_array(&data_type, rows.len()),
            };
            arrays.push(array);
        }
        batches.push(RecordBatch::try_new(schema.clone(), arrays).map_err(arrow)?);
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::engine::testing::event;
    use crate::wire::Operation::{Delete, Insert, Update};
    use datafusion::arrow::array::{AsArray, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};
    use serde_json::{Value, json};

    /// Column `x` of table `t` built from these values (one event each), as
    /// (type, values rendered as JSON).
    fn column_x(values: &[Value], chunks: usize) -> (DataType, Vec<Value>) {
        let events: Vec<ChangeEvent> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                event(
                    &format!("e{i}"),
                    "t",
                    Insert,
                    if v == &json!("<missing>") {
                        json!({})
                    } else {
                        json!({ "x": v })
                    },
                )
            })
            .collect();
        let refs: Vec<&ChangeEvent> = events.iter().collect();
        let batches = build("t", &refs, chunks).expect("builds");
        let schema = batches[0].schema();
        let at = schema.index_of("x").expect("has x");
        let data_type = schema.field(at).data_type().clone();
        let mut out = Vec::new();
        for batch in &batches {
            let array = batch.column(at);
            for row in 0..array.len() {
                out.push(if array.is_null(row) {
                    Value::Null
                } else {
                    match &data_type {
                        DataType::Int64 => json!(array.as_primitive::<Int64Type>().value(row)),
                        DataType::Float64 => json!(array.as_primitive::<Float64Type>().value(row)),
                        DataType::Boolean => json!(array.as_boolean().value(row)),
                        _ => json!(array.as_string::<i32>().value(row)),
                    }
                });
            }
        }
        (data_type, out)
    }

    #[test]
    fn column_types_are_inferred_over_all_rows() {
        let m = json!("<missing>");
        let cases: Vec<(Vec<Value>, DataType, Vec<Value>)> = vec![
            (
                vec![json!(1), json!(-2)],
                DataType::Int64,
                vec![json!(1), json!(-2)],
            ),
            (
                vec![json!(1), json!(2.5)],
                DataType::Float64,
                vec![json!(1.0), json!(2.5)],
            ),
            (
                vec![json!(1.5), json!(2)],
                DataType::Float64,
                vec![json!(1.5), json!(2.0)],
            ),
            (
                vec![json!(null), json!(1), json!(2.5)],
                DataType::Float64,
                vec![json!(null), json!(1.0), json!(2.5)],
            ),
            (
                vec![json!("a"), json!("b")],
                DataType::Utf8,
                vec![json!("a"), json!("b")],
            ),
            (
                vec![json!(true), json!(null)],
                DataType::Boolean,
                vec![json!(true), json!(null)],
            ),
            (
                vec![json!(null), json!(null)],
                DataType::Utf8,
                vec![json!(null), json!(null)],
            ),
            (
                vec![m.clone(), json!(7), m.clone()],
                DataType::Int64,
                vec![json!(null), json!(7), json!(null)],
            ),
            (
                vec![json!(1), json!("a"), json!(2.5)],
                DataType::Utf8,
                vec![json!("1"), json!("a"), json!("2.5")],
            ),
            (
                vec![json!("a"), json!(1)],
                DataType::Utf8,
                vec![json!("a"), json!("1")],
            ),
            (
                vec![json!(1), json!(true)],
                DataType::Utf8,
                vec![json!("1"), json!("true")],
            ),
            (
                vec![json!(1), json!(u64::MAX)],
                DataType::Utf8,
                vec![json!("1"), json!("18446744073709551615")],
            ),
            (
                vec![json!([1, 2]), json!({"a": 1})],
                DataType::Utf8,
                vec![json!("[1,2]"), json!("{\"a\":1}")],
            ),
            (
                vec![json!("s"), json!([1])],
                DataType::Utf8,
                vec![json!("s"), json!("[1]")],
            ),
            (
                vec![json!(1), json!(null), json!("x"), m],
                DataType::Utf8,
                vec![json!("1"), json!(null), json!("x"), json!(null)],
            ),
        ];
        for (values, data_type, expected) in cases {
            for chunks in [1, 2, 3] {
                assert_eq!(
                    column_x(&values, chunks),
                    (data_type.clone(), expected.clone()),
                    "{values:?} in {chunks} chunks"
                );
            }
        }
    }

    #[test]
    fn meta_columns_come_first_then_keys_in_first_seen_order() -> Result<(), FrameError> {
        // Raw text, not `json!`: serde_json's maps sort their keys.
        let raw = |id: &str, table: &str, op: crate::wire::Operation, columns: &str| ChangeEvent {
            columns: columns.as_bytes().to_vec(),
            ..event(id, table, op, json!({}))
        };
        let events = vec![
            raw("a", "orders", Insert, r#"{"id": 1, "amount": 5}"#),
            raw("b", "refunds", Update, r#"{"id": 9}"#),
            raw("c", "orders", Delete, r#"{"status": "x", "id": 2}"#),
        ];
        let tables = tables(&events)?;
        assert_eq!(tables.keys().collect::<Vec<_>>(), ["orders", "refunds"]);
        let orders = &tables["orders"];
        let schema = orders.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            ["_event_id", "_op", "_event_time_ms", "id", "amount", "status"]
        );
        let text = |i: usize| orders.column(i).as_any().downcast_ref::<StringArray>().cloned();
        assert_eq!(text(0), Some(StringArray::from(vec!["a", "c"])));
        assert_eq!(text(1), Some(StringArray::from(vec!["INSERT", "DELETE"])));
        assert_eq!(text(5), Some(StringArray::from(vec![None, Some("x")])));
        let ints = |i: usize| orders.column(i).as_any().downcast_ref::<Int64Array>().cloned();
        assert_eq!(ints(2), Some(Int64Array::from(vec![60_000, 60_000])));
        assert_eq!(ints(4), Some(Int64Array::from(vec![Some(5), None])));
        assert_eq!(tables["refunds"].num_rows(), 1);
        Ok(())
    }

    #[test]
    fn malformed_events_are_errors_naming_the_event() {
        let bad = |columns: &[u8], op: i32| ChangeEvent {
            event_id: "bad-1".into(),
            table: "t".into(),
            op,
            columns: columns.to_vec(),
            ..ChangeEvent::default()
        };
        let good = event("ok", "t", Insert, json!({"a": 1}));
        let cases: [(ChangeEvent, &str); 7] = [
            (bad(b"[1,2]", 1), "expected a JSON object"),
            (bad(b"{\"a\":", 1), "expected a value"),
            (bad(b"", 1), "expected a JSON object"),
            (bad(b"{\"a\":1,\"a\":2}", 1), "column `a` appears twice"),
            (bad(b"{\"_op\":1}", 1), "reserved"),
            (bad(b"{\"a\":1}", 0), "unknown operation 0"),
            (bad(b"{\"a\":1}", 9), "unknown operation 9"),
        ];
        for (event, want) in cases {
            for threads in [1, 2] {
                let events = vec![good.clone(), event.clone()];
                match partitioned(&events, threads, None) {
                    Err(e) => {
                        let text = e.to_string();
                        assert!(text.contains("bad-1") && text.contains(want), "{text}");
                    }
                    Ok(_) => panic!("{want}: expected an error"),
                }
            }
        }
    }

    #[test]
    fn chunked_builds_equal_the_single_pass() -> Result<(), FrameError> {
        // Keys appear late and in different orders; `v` widens from Int to Float in a later chunk.
        let events: Vec<ChangeEvent> = (0..200)
            .map(|i| {
                let columns = match i % 7 {
                    0 => json!({"k": i, "v": i}),
                    1 => json!({"v": i, "k": i, "s": format!("s{i}")}),
                    _ if i > 150 => json!({"k": i, "v": f64::from(i) + 0.5, "late": true}),
                    _ => json!({"k": i}),
                };
                event(&format!("e{i}"), "t", Insert, columns)
            })
            .collect();
        let refs: Vec<&ChangeEvent> = events.iter().collect();
        let single = build("t", &refs, 1)?;
        for chunks in [2, 3, 7] {
            let parts = build("t", &refs, chunks)?;
            assert_eq!(parts.len(), chunks);
            let schema = parts[0].schema();
            assert_eq!(schema, single[0].schema());
            let whole = concat_batches(&schema, &parts).map_err(|source| FrameError::Arrow {
                table: "t".into(),
                source,
            })?;
            assert_eq!(whole, single[0], "{chunks} chunks");
        }
        Ok(())
    }
}
