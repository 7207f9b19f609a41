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
            | (Reduction::Sum | Reduction::Mean, Upstream::Scalar(_)) => Ok(()),
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
            Upstream::Scalar(g) => g,
            Upstream::PerRow(g) => g[i],
        }
    }
}
