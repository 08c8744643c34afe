//! What a request may ask: each bad input gets a 400 naming the problem, and
//! a reason label for the metric. Pure.

/// Why a request was refused as bad input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// The merchant id is empty.
    #[error("the merchant id is empty")]
    EmptyMerchant,
    /// The merchant id is longer than the stores hold.
    #[error("the merchant id is {0} bytes long; at most {MAX_MERCHANT_BYTES} are allowed")]
    LongMerchant(usize),
    /// The merchant id holds a character outside the allowed set.
    #[error("the merchant id holds {0:?}; only letters, digits and - _ . : @ are allowed")]
    MerchantCharacter(char),
    /// The path could not be read (not UTF-8, or missing parts).
    #[error("the request path is malformed: {0}")]
    Path(String),
    /// The query string could not be read.
    #[error("the query string is malformed: {0}")]
    Query(String),
    /// A parameter this endpoint does not take.
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    /// `from` or `to` is missing.
    #[error("a history request needs both from and to (YYYY-MM-DD, inclusive)")]
    MissingRange,
    /// A date is not a `YYYY-MM-DD` day of 1970 to 9999.
    #[error("{0:?} is not a day written YYYY-MM-DD")]
    Date(String),
    /// `from` is after `to`.
    #[error("the range is reversed: from {0} is after to {1}")]
    ReversedRange(String, String),
    /// The range reaches today or later: history holds closed days only.
    #[error(
        "history holds closed days only, and to ({0}) is today or later: today's results are at /v1/merchants/{{merchant}}/today"
    )]
    RangeNotClosed(String),
    /// The range spans more days than allowed.
    #[error("the range spans {0} days; at most {max} are allowed", max = crate::roles::query::history::query::MAX_DAYS)]
    RangeTooLong(i32),
    /// More conditions or aggregates than allowed.
    #[error("at most {max} conditions and {max} aggregates are allowed", max = crate::roles::query::history::query::MAX_TERMS)]
    TooManyTerms,
    /// A column name holds characters outside letters, digits and `_`.
    #[error("{0:?} is not a column name (a letter or _, then letters, digits or _; 64 bytes at most)")]
    ColumnName(String),
    /// No rollup holds this column.
    #[error("no rollup of this pipeline holds a column {0:?}")]
    UnknownColumn(String),
    /// A condition is not `<column><op><value>`.
    #[error("{0:?} is not a condition: write <column><op><value> with op one of = != < <= > >=")]
    Condition(String),
    /// A condition's value is too long or holds control characters.
    #[error("the value compared with {0:?} is over 256 bytes or holds control characters")]
    ConditionValue(String),
    /// A numeric column compared with something that is not a finite number.
    #[error("column {column:?} holds numbers, and {value:?} is not a finite number")]
    NotANumber {
        /// The column.
        column: String,
        /// The value given.
        value: String,
    },
    /// An aggregate is not `<fn>:<column>` or `count`.
    #[error("{0:?} is not an aggregate: write sum|avg|min|max|count:<column>, or count")]
    Aggregate(String),
    /// Sum or average of a column that does not hold numbers.
    #[error("{function} needs a numeric column, and {column:?} holds keywords")]
    NotNumeric {
        /// The function.
        function: &'static str,
        /// The column.
        column: String,
    },
    /// `sort` is not `<name>[:asc|:desc]`.
    #[error("{0:?} is not a sort: write <name>, <name>:asc or <name>:desc")]
    Sort(String),
    /// The sort names neither `key` nor an output column.
    #[error("cannot sort by {0:?}: sort by key or by an output column of the answer")]
    SortColumn(String),
    /// `limit` is not a number of rows from 1 to the maximum.
    #[error("limit {0:?} is not a number from 1 to {max}", max = crate::roles::query::history::query::MAX_LIMIT)]
    Limit(String),
}

impl BadInput {
    /// Machine-readable reason, as the 400 body and the metric label name it.
    pub fn code(&self) -> &'static str {
        match self {
            BadInput::EmptyMerchant => "emptyMerchant",
            BadInput::LongMerchant(_) => "longMerchant",
            BadInput::MerchantCharacter(_) => "merchantCharacter",
            BadInput::Path(_) => "malformedPath",
            BadInput::Query(_) => "malformedQuery",
            BadInput::UnknownParameter(_) => "unknownParameter",
            BadInput::MissingRange => "missingRange",
            BadInput::Date(_) => "malformedDate",
            BadInput::ReversedRange(..) => "reversedRange",
            BadInput::RangeNotClosed(_) => "rangeNotClosed",
            BadInput::RangeTooLong(_) => "rangeTooLong",
            BadInput::TooManyTerms => "tooManyTerms",
            BadInput::ColumnName(_) => "malformedColumn",
            BadInput::UnknownColumn(_) => "unknownColumn",
            BadInput::Condition(_) => "malformedCondition",
            BadInput::ConditionValue(_) => "malformedConditionValue",
            BadInput::NotANumber { .. } => "notANumber",
            BadInput::Aggregate(_) => "malformedAggregate",
            BadInput::NotNumeric { .. } => "notNumeric",
            BadInput::Sort(_) => "malformedSort",
            BadInput::SortColumn(_) => "unsortable",
            BadInput::Limit(_) => "malformedLimit",
        }
    }
}

/// Bytes of a merchant id at most: the hot MySQL's key column holds 191.
pub const MAX_MERCHANT_BYTES: usize = 191;

/// A merchant id as the stores key it: 1 to 191 bytes of letters, digits and
/// `-_.:@` (nothing that could reach a key, a statement or a query as syntax).
pub fn merchant(id: &str) -> Result<&str, BadInput> {
    if id.is_empty() {
        return Err(BadInput::EmptyMerchant);
    }
    if id.len() > MAX_MERCHANT_BYTES {
        return Err(BadInput::LongMerchant(id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(BadInput::MerchantCharacter(c));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_ids_are_checked_before_any_store_sees_them() {
        let long = "m".repeat(192);
        let longest = "m".repeat(191);
        let cases: Vec<(&str, Result<(), BadInput>)> = vec![
            ("shop-m1", Ok(())),
            ("a.b_c:d@e-9", Ok(())),
            (&longest, Ok(())),
            ("", Err(BadInput::EmptyMerchant)),
            (&long, Err(BadInput::LongMerchant(192))),
            ("m1' OR '1'='1", Err(BadInput::MerchantCharacter('\''))),
            ("m1\"}}", Err(BadInput::MerchantCharacter('"'))),
            ("m 1", Err(BadInput::MerchantCharacter(' '))),
            ("m*", Err(BadInput::MerchantCharacter('*'))),
            ("mé", Err(BadInput::MerchantCharacter('é'))),
            ("m\n1", Err(BadInput::MerchantCharacter('\n'))),
        ];
        for (id, want) in cases {
            assert_eq!(merchant(id).map(|_| ()), want, "{id:?}");
        }
    }
}
