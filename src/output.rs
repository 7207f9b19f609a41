//! What a loss call returns, the same on the GPU and the CPU.

use crate::spec::Reduction;

/// The reduced outputs of one call, as a prepared loss reads them from its small result
/// buffer (no per-row values).
#[derive(Clone, Debug, PartialEq)]
pub struct LossTotals {
    /// The reduction the spec asked for.
    pub reduction: Reduction,
    /// The reduced loss: `Some(sum)` or `Some(mean)`; `None` for [`Reduction::None`].
    pub loss: Option<f64>,
    /// `Σ_i l_i` over all rows (ignored rows count 0).
    pub sum: f64,
    /// The mean's denominator: `Σ_{i not ignored} w_{y_i}` for class indices, `N` for probabilities.
    pub mean_denominator: f64,
    /// `Σ_i H(p̃_i)`, for probability targets without class weights.
    pub entropy_sum: Option<f64>,
    /// Rows whose class index was the ignore index.
    pub ignored_rows: usize,
    /// N.
    pub rows: usize,
    /// C.
    pub classes: usize,
}

/// The outputs of one cross-entropy call.
///
/// With probability targets (and no class weights) the per-row entropy `H(p̃)` of the
/// (smoothed) target is reported too, which makes `CE(p̃, q) = H(p̃) + KL(p̃ ‖ q)` visible:
/// [`LossOutput::kl_divergence`] is the part of the loss the model can reduce.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// The reduction the spec asked for.
    pub reduction: Reduction,
    /// The reduced loss: `Some(sum)` or `Some(mean)`; `None` for [`Reduction::None`].
    pub loss: Option<f64>,
    /// `Σ_i l_i` over all rows (ignored rows count 0).
    pub sum: f64,
    /// The mean's denominator: `Σ_{i not ignored} w_{y_i}` for class indices, `N` for probabilities.
    pub mean_denominator: f64,
    /// `l_i`, one per row.
    pub per_row: Vec<f64>,
    /// `lse_i = log Σ_k exp z_ik`, one per row (ignored rows included).
    pub log_sum_exp: Vec<f64>,
    /// `H(p̃_i)` per row, for probability targets without class weights.
    pub entropy: Option<Vec<f64>>,
    /// `Σ_i H(p̃_i)`, when `entropy` is present.
    pub entropy_sum: Option<f64>,
    /// Rows whose class index was the ignore index.
    pub ignored_rows: usize,
    /// N.
    pub rows: usize,
    /// C.
    pub classes: usize,
}

impl LossOutput {
    /// The output of an empty batch (N = 0): sum 0, mean NaN, no rows, as in PyTorch.
    pub fn empty(reduction: Reduction, classes: usize, with_entropy: bool) -> Self {
        Self::from_parts(
            reduction,
            classes,
            0.0,
            Vec::new(),
            Vec::new(),
            with_entropy.then(Vec::new),
            0,
        )
    }

    /// Assembles an output from per-row values and the host-side sums.
    pub(crate) fn from_parts(
        reduction: Reduction,
        classes: usize,
        mean_denominator: f64,
        per_row: Vec<f64>,
        log_sum_exp: Vec<f64>,
        entropy: Option<Vec<f64>>,
        ignored_rows: usize,
    ) -> Self {
        // Folds from +0.0: `Iterator::sum` of no f64 is −0.0, which would print as "-0".
        let sum = per_row.iter().fold(0.0, |a, b| a + b);
        let entropy_sum = entropy.as_ref().map(|h| h.iter().fold(0.0, |a, b| a + b));
        Self::with_sums(
            reduction,
            classes,
            sum,
            mean_denominator,
            per_row,
            log_sum_exp,
            entropy,
            entropy_sum,
            ignored_rows,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_sums(
        reduction: Reduction,
        classes: usize,
        sum: f64,
        mean_denominator: f64,
        per_row: Vec<f64>,
        log_sum_exp: Vec<f64>,
        entropy: Option<Vec<f64>>,
        entropy_sum: Option<f64>,
        ignored_rows: usize,
    ) -> Self {
        Self {
            reduction,
            loss: reduction.apply(sum, mean_denominator),
            sum,
            mean_denominator,
            rows: per_row.len(),
            per_row,
            log_sum_exp,
            entropy,
            entropy_sum,
            ignored_rows,
            classes,
        }
    }

    /// The totals with the per-row values of the same call.
    pub(crate) fn from_totals(
        totals: LossTotals,
        per_row: Vec<f64>,
        log_sum_exp: Vec<f64>,
        entropy: Option<Vec<f64>>,
    ) -> Self {
        Self::with_sums(
            totals.reduction,
            totals.classes,
            totals.sum,
            totals.mean_denominator,
            per_row,
            log_sum_exp,
            entropy,
            totals.entropy_sum,
            totals.ignored_rows,
        )
    }

    /// Appends the output of the rows that follow (a later batch of the same stream), so a
    /// file larger than memory can be scored batch by batch into one result.
    pub fn append(&mut self, next: LossOutput) {
        self.sum += next.sum;
        self.mean_denominator += next.mean_denominator;
        self.per_row.extend(next.per_row);
        self.log_sum_exp.extend(next.log_sum_exp);
        if let (Some(h), Some(more)) = (self.entropy.as_mut(), next.entropy) {
            h.extend(more);
        }
        if let (Some(h), Some(more)) = (self.entropy_sum.as_mut(), next.entropy_sum) {
            *h += more;
        }
        self.ignored_rows += next.ignored_rows;
        self.rows += next.rows;
        self.loss = self.reduction.apply(self.sum, self.mean_denominator);
    }

    /// PyTorch's mean, whatever the requested reduction.
    pub fn mean(&self) -> f64 {
        self.sum / self.mean_denominator
    }

    /// `KL(p̃_i ‖ q_i) = l_i − H(p̃_i)` per row, when the entropy is known.
    pub fn kl_divergence(&self) -> Option<Vec<f64>> {
        let h = self.entropy.as_ref()?;
        Some(self.per_row.iter().zip(h).map(|(l, h)| l - h).collect())
    }

    /// The entropy reduced like the loss (`None` without entropy or for `Reduction::None`).
    pub fn reduced_entropy(&self) -> Option<f64> {
        self.reduction
            .apply(self.entropy_sum?, self.mean_denominator)
    }

    /// The KL divergence reduced like the loss: `loss − entropy`.
    pub fn reduced_kl_divergence(&self) -> Option<f64> {
        Some(self.loss? - self.reduced_entropy()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// N = 0 sums to +0.0, not −0.0.
    #[test]
    fn empty_sums_are_positive_zero() {
        let out = LossOutput::empty(Reduction::Sum, 3, true);
        for value in [out.sum, out.loss.unwrap(), out.entropy_sum.unwrap()] {
            assert!(value == 0.0 && value.is_sign_positive(), "{value}");
        }
    }
}
