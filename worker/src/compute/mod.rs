//! Window compute: a window's change events as Arrow tables ([`frame`]), the
//! pipeline's SQL run over them with Apache DataFusion ([`engine`]), one
//! result row per merchant ([`MerchantResult`]).

mod column;
pub mod engine;
pub mod frame;
mod json;
pub mod output;
pub mod runtime;
pub mod typed;

pub use engine::{Sql, run};
pub use frame::{FrameError, tables};

/// The sample pipeline SQL (order analytics over table `orders`): what the
/// demo, the golden test and the compute benchmark run.
pub const SAMPLE_SQL: &str = include_str!("../../sql/orders.sql");

/// One merchant's metrics for one window: a row of the SQL's final statement.
#[derive(Debug, Clone, PartialEq)]
pub struct MerchantResult {
    /// The row's `merchant_id`.
    pub merchant_id: String,
    /// Every other column of the row, by column name, as JSON (integers,
    /// floats, strings, booleans or null).
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// Why a window could not be computed. None of these is fixed by retrying the
/// same task on another slave except [`ComputeError::Engine`] when it is an
/// out-of-memory or I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The SQL text does not parse: fix the pipeline's `spec.compute.sql`.
    #[error("the pipeline SQL does not parse: {0}")]
    Parse(String),
    /// The SQL text holds no statement.
    #[error("the pipeline SQL holds no statement")]
    NoStatement,
    /// The events could not be turned into tables (a malformed event).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A statement failed to plan or run (unknown table or column, type
    /// error, ...): `number` is 1-based, in text order.
    #[error("SQL statement {number} of {total} failed: {message}")]
    Statement {
        /// Which statement (1-based).
        number: usize,
        /// How many statements the SQL has.
        total: usize,
        /// DataFusion's message.
        message: String,
    },
    /// A statement needed more memory than the slave's compute budget: the
    /// window is too heavy for this pod (give it more memory, or the master
    /// retries it elsewhere).
    #[error("SQL statement {number} of {total} ran out of its memory budget: {message}")]
    OutOfMemory {
        /// Which statement (1-based).
        number: usize,
        /// How many statements the SQL has.
        total: usize,
        /// DataFusion's message.
        message: String,
    },
    /// A statement is not allowed (see `ballast_crds::sql`): `number` is 1-based.
    #[error("SQL statement {number} ({kind}) is not allowed: {why}")]
    Refused {
        /// Which statement.
        number: usize,
        /// What kind of statement it is.
        kind: String,
        /// Why not.
        why: String,
    },
    /// An output column has a name results reserve.
    #[error(
        "output column {0:?} is reserved: the slave writes it on every result (the SQL that computed it, or how far a to-date result reaches)"
    )]
    ReservedColumn(&'static str),
    /// DataFusion failed outside any statement (registering a table).
    #[error("DataFusion: {0}")]
    Engine(String),
    /// The final statement's output has no `merchant_id` column.
    #[error("the final SQL statement must output a `merchant_id` column; it outputs {columns:?}")]
    MissingMerchantId {
        /// The columns it does output.
        columns: Vec<String>,
    },
    /// `merchant_id` is not a string column.
    #[error("the final SQL statement's `merchant_id` is {data_type}, not a string")]
    MerchantIdType {
        /// Its Arrow type.
        data_type: String,
    },
    /// A row's `merchant_id` is NULL.
    #[error("the final SQL statement output a row whose merchant_id is NULL")]
    NullMerchantId,
    /// Two output rows have the same merchant: the final statement must group by merchant.
    #[error("the final SQL statement output merchant {0:?} more than once: group by merchant_id")]
    DuplicateMerchant(String),
    /// An output column's type has no JSON rendering.
    #[error("output column {column:?} has type {data_type}, which cannot be rendered as JSON: cast it")]
    UnsupportedType {
        /// The column.
        column: String,
        /// Its Arrow type.
        data_type: String,
    },
}
