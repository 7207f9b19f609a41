//! What the logits are scored against.

use std::borrow::Cow;

use crate::dtype::{Element, Elements};
use crate::logits::Logits;

/// Targets, following PyTorch's rule: one integer per row is a class index; values shaped
/// like the logits are probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Targets<'a> {
    /// One class index per row, `[N]`; a value equal to the spec's ignore index skips the row.
    ClassIndices(&'a [i64]),
    /// A probability (or any non-negative weight) per logit, `[N, C]` row-major, in f32 or
    /// in the logits' dtype ([`Targets::probabilities`]).
    Probabilities(Elements<'a>),
}

impl<'a> Targets<'a> {
    /// Probabilities of any [`Element`] type (f32, or the logits' half type).
    pub fn probabilities<T: Element>(values: &'a [T]) -> Self {
        Targets::Probabilities(T::elements(values))
    }

    /// The targets of rows `range` (of logits with `classes` columns).
    pub fn slice_rows(&self, range: std::ops::Range<usize>, classes: usize) -> Targets<'a> {
        match *self {
            Targets::ClassIndices(y) => Targets::ClassIndices(&y[range]),
            Targets::Probabilities(p) => {
                Targets::Probabilities(p.slice(range.start * classes..range.end * classes))
            }
        }
    }

    /// Row `i` of probability targets for `logits` (widened exactly to f32), if these are
    /// probabilities.
    pub fn probabilities_row(&self, logits: &Logits<'_>, i: usize) -> Option<Cow<'a, [f32]>> {
        match *self {
            Targets::Probabilities(p) => {
                Some(p.to_f32(i * logits.classes()..(i + 1) * logits.classes()))
            }
            Targets::ClassIndices(_) => None,
        }
    }

    /// Whether these are probability targets.
    pub fn is_probabilities(&self) -> bool {
        matches!(self, Targets::Probabilities(_))
    }
}
