//! A checked view of a logits matrix.

use std::borrow::Cow;

use crate::dtype::{Dtype, Element, Elements};
use crate::error::{Result, XentError};

/// Logits `[rows, classes]`, row-major, of f32, bf16 or f16 ([`Element`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Logits<'a> {
    values: Elements<'a>,
    rows: usize,
    classes: usize,
}

impl<'a> Logits<'a> {
    /// Views `values` (`f32`, `half::bf16` or `half::f16`) as `[rows, classes]`; errors
    /// unless `values.len() == rows × classes` and `classes ≥ 1`.
    pub fn new<T: Element>(values: &'a [T], rows: usize, classes: usize) -> Result<Self> {
        Self::from_elements(T::elements(values), rows, classes)
    }

    /// [`Logits::new`] for values whose type is known at run time.
    pub fn from_elements(values: Elements<'a>, rows: usize, classes: usize) -> Result<Self> {
        if classes == 0 {
            return Err(XentError::NoClasses);
        }
        if rows.checked_mul(classes) != Some(values.len()) {
            return Err(XentError::LogitsShape {
                len: values.len(),
                rows,
                classes,
            });
        }
        Ok(Self {
            values,
            rows,
            classes,
        })
    }

    /// All values, row-major.
    pub fn values(&self) -> Elements<'a> {
        self.values
    }

    /// The values' type.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// N × C.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Row `i`, widened exactly to f32 (borrowed for f32 logits).
    pub fn row(&self, i: usize) -> Cow<'a, [f32]> {
        self.values.to_f32(i * self.classes..(i + 1) * self.classes)
    }

    /// Rows `range` as logits of their own.
    ///
    /// # Panics
    ///
    /// When `range` does not lie within `0..rows()` (as slicing does).
    pub fn slice_rows(&self, range: std::ops::Range<usize>) -> Logits<'a> {
        Logits {
            values: self
                .values
                .slice(range.start * self.classes..range.end * self.classes),
            rows: range.len(),
            classes: self.classes,
        }
    }
}
