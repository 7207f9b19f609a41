//! The upstream gradient a loss's backward pass is scaled by.

use crate::error::{Result, XentError};
use crate::spec::{CrossEntropy, Reduction};

/// The gradient of the final objective with respect to the loss, as autograd passes it to a
/// loss's backward (`grad_output`): one scalar for `sum` and `mean`, one value per row for
/// `none`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Upstream<'a> {
    /// `∂objective/∂loss` for a reduced loss (`sum` or `mean`); 1.0 for the loss itself.
    Scalar(f64),
    /// `∂objective/∂l_i`, one per row, for [`Reduction::None`].
    PerRow(&'a [f64]),
    /// For [`Reduction::Mean`] over a larger batch of which this call is one part (gradient
    /// accumulation over micro-batches, a file scored in pieces): `grad` times the gradient of
    /// that batch's mean, whose cross-entropy part is divided by `denominator` (the whole
    /// batch's Σ w_y, or its row count for probabilities) and whose z-loss part by
    /// `counted_rows` (the whole batch's rows not ignored).
    MeanOver {
        /// `∂objective/∂loss`.
        grad: f64,
        /// The whole batch's mean denominator.
        denominator: f64,
        /// The whole batch's counted rows.
        counted_rows: f64,
    },
}

impl Upstream<'_> {
    /// Checks that this upstream fits `reduction` over `rows` rows: a scalar for `sum` and
    /// `mean`, exactly `rows` values for `none`.
    pub fn check(&self, reduction: Reduction, rows: usize) -> Result<()> {
        match (reduction, self) {
            (Reduction::None, Upstream::PerRow(g)) if g.len() != rows => {
                Err(XentError::UpstreamLength {
                    expected: rows,
                    got: g.len(),
                })
            }
            (Reduction::None, Upstream::PerRow(_))
            | (Reduction::Sum | Reduction::Mean, Upstream::Scalar(_))
            | (Reduction::Mean, Upstream::MeanOver { .. }) => Ok(()),
            (_, Upstream::MeanOver { .. }) => Err(XentError::UpstreamKind {
                reduction: reduction.name(),
                expected: if reduction == Reduction::None {
                    "one value per row (Upstream::PerRow)"
                } else {
                    "a scalar (Upstream::Scalar)"
                },
                got: "the mean over a larger batch (Upstream::MeanOver)",
            }),
            (Reduction::None, Upstream::Scalar(_)) => Err(XentError::UpstreamKind {
                reduction: reduction.name(),
                expected: "one value per row (Upstream::PerRow)",
                got: "a scalar (Upstream::Scalar)",
            }),
            (Reduction::Sum | Reduction::Mean, Upstream::PerRow(_)) => {
                Err(XentError::UpstreamKind {
                    reduction: reduction.name(),
                    expected: "a scalar (Upstream::Scalar)",
                    got: "one value per row (Upstream::PerRow)",
                })
            }
        }
    }

    /// The upstream value for row `i` (the scalar for every row). Call [`Upstream::check`]
    /// first.
    pub fn at(&self, i: usize) -> f64 {
        match *self {
            Upstream::Scalar(g) | Upstream::MeanOver { grad: g, .. } => g,
            Upstream::PerRow(g) => g[i],
        }
    }

    /// Row `i`'s scales of the cross-entropy part and of the z-loss part under `reduction`:
    /// `g_i` for `none`, `g` for `sum`; for `mean`, `g / denominator` and `g / counted_rows`,
    /// the whole batch's from [`Upstream::MeanOver`] where given, else this call's `own`
    /// (denominator, counted rows). Call [`Upstream::check`] first.
    pub(crate) fn scales(&self, reduction: Reduction, i: usize, own: (f64, f64)) -> (f64, f64) {
        let g = self.at(i);
        match reduction {
            Reduction::None | Reduction::Sum => (g, g),
            Reduction::Mean => {
                let (denominator, counted) = self.mean_over().unwrap_or(own);
                (g / denominator, g / counted)
            }
        }
    }

    /// The mean's (denominator, counted rows) when they are given rather than this call's own.
    pub(crate) fn mean_over(&self) -> Option<(f64, f64)> {
        match *self {
            Upstream::MeanOver {
                denominator,
                counted_rows,
                ..
            } => Some((denominator, counted_rows)),
            _ => None,
        }
    }
}

/// A mean's normalisers over a batch scored in parts, gathered part by part in row order: the
/// `denominator` and `counted_rows` of [`Upstream::MeanOver`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MeanNormalisers {
    /// `Σ_{i not ignored} w_{y_i}` for class indices; the row count for probabilities.
    pub denominator: f64,
    /// Rows not ignored.
    pub counted_rows: usize,
}

impl MeanNormalisers {
    /// Adds the class indices of rows `first_row..` (of `classes` classes) under `spec`. An
    /// index outside `[0, classes)` that is not the ignore index is an error naming its row.
    ///
    /// Errors: those of [`CrossEntropy::validate_options`] (class weights must number
    /// `classes`); [`XentError::ClassIndexOutOfRange`].
    pub fn add_class_indices(
        &mut self,
        spec: &CrossEntropy,
        classes: usize,
        first_row: usize,
        labels: &[i64],
    ) -> Result<()> {
        spec.validate_options(classes, false)?;
        for (i, &y) in labels.iter().enumerate() {
            if spec.is_ignored(y) {
                continue;
            }
            if !(0..classes as i64).contains(&y) {
                return Err(XentError::ClassIndexOutOfRange {
                    row: first_row + i,
                    value: y,
                    classes,
                    ignore_index: spec.ignore_index(),
                });
            }
            self.denominator += spec.weights().map_or(1.0, |w| w[y as usize] as f64);
            self.counted_rows += 1;
        }
        Ok(())
    }

    /// Adds `rows` rows of probability targets (each counts 1).
    pub fn add_rows(&mut self, rows: usize) {
        self.denominator += rows as f64;
        self.counted_rows += rows;
    }

    /// `grad` times the gradient of the whole batch's mean.
    pub fn upstream(&self, grad: f64) -> Upstream<'static> {
        Upstream::MeanOver {
            grad,
            denominator: self.denominator,
            counted_rows: self.counted_rows as f64,
        }
    }
}
