//! The upstream gradient a loss's backward pass is scaled by.

use crate::error::{Result, XentError};
use crate::spec::Reduction;

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
