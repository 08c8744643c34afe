//! The source tables' columns and their types, as the operator reads them from
//! the source database and publishes them in the pipeline's status: workers
//! build each window's tables with these types (a table without events in a
//! window is an empty table of the right type), and the pipeline's SQL is
//! checked against them.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Each tracked table's columns, in ordinal order, by table name.
pub type SourceSchema = BTreeMap<String, Vec<SourceColumn>>;

/// One column of a source table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceColumn {
    /// The column's name, as the events carry it.
    pub name: String,
    /// The type its values have in a window's table.
    #[serde(rename = "type")]
    pub type_: ColumnType,
}

/// The type of a source column in a window's table: how the collector
/// renders the MySQL value. Integers (and `YEAR`) are 64-bit integers,
/// `FLOAT` and `DOUBLE` are floats, and everything else — `DECIMAL` kept
/// exact as text, strings, dates and times, JSON, binary — is text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ColumnType {
    /// A 64-bit signed integer.
    Int64,
    /// A 64-bit float.
    Float64,
    /// UTF-8 text.
    Utf8,
}

impl ColumnType {
    /// The type of a column whose `information_schema.COLUMNS.DATA_TYPE` is
    /// `data_type`. Pure.
    pub fn of_mysql(data_type: &str) -> Self {
        match data_type.to_ascii_lowercase().as_str() {
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => Self::Int64,
            "float" | "double" | "real" => Self::Float64,
            _ => Self::Utf8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_types_map_to_what_the_collector_renders() {
        let cases = [
            ("bigint", ColumnType::Int64),
            ("TINYINT", ColumnType::Int64),
            ("year", ColumnType::Int64),
            ("double", ColumnType::Float64),
            ("float", ColumnType::Float64),
            // Exact decimals stay text, as the collector writes them.
            ("decimal", ColumnType::Utf8),
            ("varchar", ColumnType::Utf8),
            ("datetime", ColumnType::Utf8),
            ("json", ColumnType::Utf8),
            ("geometry", ColumnType::Utf8),
        ];
        for (data_type, want) in cases {
            assert_eq!(ColumnType::of_mysql(data_type), want, "{data_type}");
        }
    }
}
