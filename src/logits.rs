//! A checked view of a logits matrix.

use crate::error::{Result, XentError};

/// Logits `[rows, classes]`, row-major f32.
#[derive(Clone, Copy, Debug)]
pub struct Logits<'a> {
    values: &'a [f32],
    rows: usize,
    classes: usize,
}

impl<'a> Logits<'a> {
    /// Views `values` as `[rows, classes]`; errors unless `values.len() == rows × classes`
    /// and `classes ≥ 1`.
    pub fn new(values: &'a [f32], rows: usize, classes: usize) -> Result<Self> {
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
    pub fn values(&self) -> &'a [f32] {
        self.values
    }

    /// N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.values[i * self.classes..(i + 1) * self.classes]
    }

    /// Rows `range` as logits of their own.
    pub fn slice_rows(&self, range: std::ops::Range<usize>) -> Logits<'a> {
        Logits {
            values: &self.values[range.start * self.classes..range.end * self.classes],
            rows: range.len(),
            classes: self.classes,
        }
    }
}
