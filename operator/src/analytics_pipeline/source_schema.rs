//! The source tables' columns and types, read from the source database's
//! `information_schema` for the pipeline's status, where workers type each
//! window's tables by them. Read at most every [`REFRESH`] per pipeline, with
//! a deadline; a failed read keeps the schema last published.

use std::time::Duration;

use ballast_crds::refs::MysqlRef;
use ballast_crds::{ColumnType, SourceColumn, SourceSchema};
use mysql_async::prelude::Queryable;

/// How often a pipeline's source schema is read again.
pub const REFRESH: Duration = Duration::from_secs(60);

/// Longest a read may take (connect included).
const DEADLINE: Duration = Duration::from_secs(5);

/// Why the schema could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The source database refused or failed.
    #[error("source database {address}: {source}")]
    Source {
        /// Its address.
        address: String,
        /// The client's error.
        #[source]
        source: mysql_async::Error,
    },
    /// It did not answer in time.
    #[error("source database {address} did not answer within {DEADLINE:?}")]
    Deadline {
        /// Its address.
        address: String,
    },
}

/// The schema of `tables` from `(table, column, data type)` rows in ordinal
/// order; a table without columns (not created yet) is left out. Pure.
pub fn schema_of(rows: Vec<(String, String, String)>, tables: &[String]) -> SourceSchema {
    let mut schema = SourceSchema::new();
    for (table, name, data_type) in rows.into_iter().filter(|(t, _, _)| tables.contains(t)) {
        schema.entry(table).or_default().push(SourceColumn {
            name,
            type_: ColumnType::of_mysql(&data_type),
        });
    }
    schema
}

/// Reads the columns of `tables` in the source database, with typed
/// connection options (the password is never part of a formatted URL).
pub async fn read(
    source: &MysqlRef,
    password: Option<&ballast_node::secret::Secret>,
    tables: &[String],
) -> Result<SourceSchema, SchemaError> {
    let address = source.address.clone();
    let opts = ballast_node::connect::mysql(source, password);
    let failed = |source| SchemaError::Source {
        address: address.clone(),
        source,
    };
    let query = async {
        let mut conn = mysql_async::Conn::new(opts).await?;
        let rows: Vec<(String, String, String)> = conn
            .exec(
                "SELECT TABLE_NAME, COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME, ORDINAL_POSITION",
                (source.database.as_str(),),
            )
            .await?;
        let _ = conn.disconnect().await;
        Ok(rows)
    };
    let rows = tokio::time::timeout(DEADLINE, query)
        .await
        .map_err(|_| SchemaError::Deadline {
            address: address.clone(),
        })?
        .map_err(failed)?;
    Ok(schema_of(rows, tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tracked_tables_are_kept_with_columns_in_order_and_typed() {
        let row = |t: &str, c: &str, d: &str| (t.to_owned(), c.to_owned(), d.to_owned());
        let rows = vec![
            row("orders", "id", "bigint"),
            row("orders", "merchant_id", "varchar"),
            row("orders", "amount", "decimal"),
            row("audit", "note", "text"),
            row("refunds", "ratio", "double"),
        ];
        let schema = schema_of(rows, &["orders".into(), "refunds".into(), "missing".into()]);
        let typed = |t: &str| -> Vec<(String, ColumnType)> {
            schema[t].iter().map(|c| (c.name.clone(), c.type_)).collect()
        };
        assert_eq!(schema.keys().collect::<Vec<_>>(), ["orders", "refunds"]);
        assert_eq!(
            typed("orders"),
            [
                ("id".into(), ColumnType::Int64),
                ("merchant_id".into(), ColumnType::Utf8),
                ("amount".into(), ColumnType::Utf8)
            ]
        );
        assert_eq!(typed("refunds"), [("ratio".into(), ColumnType::Float64)]);
    }
}
