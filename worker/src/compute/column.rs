//! A column of a table being built from JSON values: typed by its first
//! non-null value, widened in place (Int64 → Float64) when a float follows
//! integers, and marked mixed on a conflict of kinds (the frame then rebuilds
//! it as text from the source).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use datafusion::arrow::datatypes::DataType;

use super::json::Val;

/// A column's kind: what its values so far make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Empty,
    Int,
    Float,
    Bool,
    Text,
    Mixed,
}

impl Kind {
    pub(crate) fn unify(self, other: Kind) -> Kind {
        match (self, other) {
            (Kind::Empty, k) | (k, Kind::Empty) => k,
            (a, b) if a == b => a,
            (Kind::Int, Kind::Float) | (Kind::Float, Kind::Int) => Kind::Float,
            _ => Kind::Mixed,
        }
    }

    pub(crate) fn data_type(self) -> DataType {
        match self {
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Bool => DataType::Boolean,
            Kind::Empty | Kind::Text | Kind::Mixed => DataType::Utf8,
        }
    }
}

enum Values {
    Empty,
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Text(StringBuilder),
    Mixed,
}

/// One JSON column of a chunk being built; `len` counts rows filled, nulls included.
pub(crate) struct Column {
    pub(crate) name: String,
    /// Whether the name can be matched on raw JSON bytes ([`super::json::plain`]).
    plain: bool,
    values: Values,
    len: usize,
}

impl Column {
    /// An empty column named `name`.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            plain: super::json::plain(name),
            values: Values::Empty,
            len: 0,
        }
    }

    /// The name, as a hint for [`super::json::Scanner::member`], when it is plain.
    pub(crate) fn hint(&self) -> Option<&str> {
        self.plain.then_some(self.name.as_str())
    }

    /// Rows filled so far, nulls included.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn kind(&self) -> Kind {
        match self.values {
            Values::Empty => Kind::Empty,
            Values::Int(_) => Kind::Int,
            Values::Float(_) => Kind::Float,
            Values::Bool(_) => Kind::Bool,
            Values::Text(_) => Kind::Text,
            Values::Mixed => Kind::Mixed,
        }
    }

    /// Nulls up to (not including) `row`.
    pub(crate) fn pad(&mut self, row: usize) {
        let missing = row.saturating_sub(self.len);
        if missing == 0 {
            return;
        }
        match &mut self.values {
            Values::Empty | Values::Mixed => {}
            Values::Int(b) => b.append_nulls(missing),
            Values::Float(b) => b.append_nulls(missing),
            Values::Bool(b) => b.append_nulls(missing),
            Values::Text(b) => b.append_nulls(missing),
        }
        self.len = row;
    }

    /// Appends the next row's value (`rows` sizes new builders).
    pub(crate) fn push(&mut self, value: Val<'_>, rows: usize) {
        let len = self.len;
        self.len += 1;
        match (&mut self.values, value) {
            (Values::Mixed, _) => {}
            (Values::Empty, Val::Null) => {}
            (Values::Int(b), Val::Null) => b.append_null(),
            (Values::Float(b), Val::Null) => b.append_null(),
            (Values::Bool(b), Val::Null) => b.append_null(),
            (Values::Text(b), Val::Null) => b.append_null(),
            (Values::Int(b), Val::Int(v, _)) => b.append_value(v),
            (Values::Float(b), Val::Int(v, _)) => b.append_value(v as f64),
            (Values::Float(b), Val::Float(v, _)) => b.append_value(v),
            (Values::Bool(b), Val::Bool(v)) => b.append_value(v),
            (Values::Text(b), Val::Str(s) | Val::Nested(s)) => b.append_value(s),
            (Values::Int(ints), Val::Float(v, _)) => {
                // Widen: every integer so far becomes a float.
                let mut floats = Float64Builder::with_capacity(rows);
                floats.extend(ints.finish().iter().map(|i| i.map(|i| i as f64)));
                floats.append_value(v);
                self.values = Values::Float(floats);
            }
            (Values::Empty, Val::Int(v, _)) => {
                let mut b = Int64Builder::with_capacity(rows);
                b.append_nulls(len);
                b.append_value(v);
                self.values = Values::Int(b);
            }
            (Values::Empty, Val::Float(v, _)) => {
                let mut b = Float64Builder::with_capacity(rows);
                b.append_nulls(len);
                b.append_value(v);
                self.values = Values::Float(b);
            }
            (Values::Empty, Val::Bool(v)) => {
                let mut b = BooleanBuilder::with_capacity(rows);
                b.append_nulls(len);
                b.append_value(v);
                self.values = Values::Bool(b);
            }
            (Values::Empty, Val::Str(s) | Val::Nested(s)) => {
                // The first value's length sizes the buffer: one table's values are alike.
                let mut b = StringBuilder::with_capacity(rows, rows * s.len().clamp(4, 64));
                b.append_nulls(len);
                b.append_value(s);
                self.values = Values::Text(b);
            }
            // Conflicting kinds, or an integer beyond Int64: rebuilt as text at the end.
            _ => self.values = Values::Mixed,
        }
    }

    pub(crate) fn finish(mut self, rows: usize) -> Option<ArrayRef> {
        self.pad(rows);
        match self.values {
            Values::Empty | Values::Mixed => None,
            Values::Int(mut b) => Some(Arc::new(b.finish())),
            Values::Float(mut b) => Some(Arc::new(b.finish())),
            Values::Bool(mut b) => Some(Arc::new(b.finish())),
            Values::Text(mut b) => Some(Arc::new(b.finish())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};

    #[test]
    fn kinds_unify_to_the_widest_or_mixed() {
        use Kind::*;
        let cases = [
            (Empty, Int, Int),
            (Int, Empty, Int),
            (Int, Int, Int),
            (Int, Float, Float),
            (Float, Int, Float),
            (Text, Text, Text),
            (Bool, Bool, Bool),
            (Int, Text, Mixed),
            (Bool, Float, Mixed),
            (Mixed, Empty, Mixed),
            (Text, Mixed, Mixed),
        ];
        for (a, b, want) in cases {
            assert_eq!(a.unify(b), want, "{a:?} + {b:?}");
        }
    }

    #[test]
    fn integers_widen_to_floats_keeping_nulls_and_padding() {
        let mut column = Column::new("x");
        column.pad(1);
        column.push(Val::Int(2, "2"), 5);
        column.push(Val::Null, 5);
        assert_eq!(column.kind(), Kind::Int);
        column.push(Val::Float(0.5, "0.5"), 5);
        assert_eq!(column.kind(), Kind::Float);
        let array = column.finish(5).expect("a float column");
        let floats = array.as_primitive::<Float64Type>();
        let got: Vec<Option<f64>> = floats.iter().collect();
        assert_eq!(got, [None, Some(2.0), None, Some(0.5), None]);
    }

    #[test]
    fn a_conflict_marks_the_column_mixed() {
        let mut column = Column::new("x");
        column.push(Val::Int(1, "1"), 2);
        column.push(Val::Str("a"), 2);
        assert_eq!(column.kind(), Kind::Mixed);
        assert!(column.finish(2).is_none());
        let mut nulls = Column::new("y");
        nulls.push(Val::Null, 3);
        assert_eq!(nulls.kind(), Kind::Empty);
        let mut ints = Column::new("z");
        ints.push(Val::Int(7, "7"), 1);
        let array = ints.finish(1).expect("an int column");
        assert_eq!(array.as_primitive::<Int64Type>().value(0), 7);
        assert_eq!(array.len(), 1);
    }
}
