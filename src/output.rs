//! What a loss call returns, the same on the GPU and the CPU.

use crate::spec::Reduction;

/// Per-row outputs gathered row by row in f64 (the CPU reference, the merge of shards' partials):
/// each row's loss, log-sum-exp, target entropy where asked for, and z-loss `λ·lse²` for rows not
/// ignored, added to its loss.
pub(crate) struct RowOutputs {
    per_row: Vec<f64>,
    lse: Vec<f64>,
    entropy: Option<Vec<f64>>,
    z_loss: Option<Vec<f64>>,
    lambda: f64,
    ignored: usize,
}

impl RowOutputs {
    /// For `rows` rows, keeping the target entropy if `with_entropy`, the z-loss of `lambda` if
    /// positive.
    pub(crate) fn new(rows: usize, with_entropy: bool, lambda: f64) -> Self {
        Self {
            per_row: Vec::with_capacity(rows),
            lse: Vec::with_capacity(rows),
            entropy: with_entropy.then(|| Vec::with_capacity(rows)),
            z_loss: (lambda > 0.0).then(|| Vec::with_capacity(rows)),
            lambda,
            ignored: 0,
        }
    }

    /// The next row: its cross-entropy (0 for an ignored row), log-sum-exp, whether it is
    /// counted (not ignored), and its target entropy (kept when asked for).
    pub(crate) fn push(&mut self, loss: f64, lse: f64, counted: bool, entropy: f64) {
        self.lse.push(lse);
        self.ignored += usize::from(!counted);
        if let Some(h) = self.entropy.as_mut() {
            h.push(entropy);
        }
        match self.z_loss.as_mut() {
            Some(zl) => {
                let z = if counted {
                    self.lambda * lse * lse
                } else {
                    0.0
                };
                zl.push(z);
                self.per_row.push(loss + z);
            }
            None => self.per_row.push(loss),
        }
    }

    /// The output, reduced by `reduction` over `mean_denominator`.
    pub(crate) fn finish(
        self,
        reduction: Reduction,
        classes: usize,
        mean_denominator: f64,
    ) -> LossOutput {
        LossOutput::from_parts(
            reduction,
            classes,
            mean_denominator,
            self.per_row,
            self.lse,
            self.entropy,
            self.z_loss,
            self.ignored,
        )
    }
}

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
    /// `Σ_{i not ignored} λ·lse_i²`, when the spec has a z-loss (λ > 0); included in `sum`.
    pub z_loss_sum: Option<f64>,
    /// Rows whose class index was the ignore index.
    pub ignored_rows: usize,
    /// N.
    pub rows: usize,
    /// C.
    pub classes: usize,
}

impl LossTotals {
    /// The totals of no rows: sum 0, mean NaN; the entropy and z-loss sums present (0) when
    /// asked for.
    pub fn empty(
        reduction: Reduction,
        classes: usize,
        with_entropy: bool,
        with_z_loss: bool,
    ) -> Self {
        let mut totals = Self {
            reduction,
            loss: None,
            sum: 0.0,
            mean_denominator: 0.0,
            entropy_sum: with_entropy.then_some(0.0),
            z_loss_sum: with_z_loss.then_some(0.0),
            ignored_rows: 0,
            rows: 0,
            classes,
        };
        totals.loss = totals.reduced_loss();
        totals
    }

    /// Adds the totals of the rows that follow (a later batch of the same stream).
    pub fn add(&mut self, next: &LossTotals) {
        self.sum += next.sum;
        self.mean_denominator += next.mean_denominator;
        if let (Some(h), Some(more)) = (self.entropy_sum.as_mut(), next.entropy_sum) {
            *h += more;
        }
        if let (Some(z), Some(more)) = (self.z_loss_sum.as_mut(), next.z_loss_sum) {
            *z += more;
        }
        self.ignored_rows += next.ignored_rows;
        self.rows += next.rows;
        self.loss = self.reduced_loss();
    }

    /// The rows not ignored, `rows − ignored_rows` (all rows for probability targets): the
    /// z-loss mean's denominator.
    pub fn counted_rows(&self) -> usize {
        self.rows - self.ignored_rows
    }

    /// The reduced loss from these totals ([`Reduction::apply_with_z_loss`]): the one place
    /// every output gets `loss` from.
    pub fn reduced_loss(&self) -> Option<f64> {
        self.reduction.apply_with_z_loss(
            self.sum,
            self.mean_denominator,
            self.z_loss_sum,
            self.counted_rows(),
        )
    }

    /// PyTorch's mean, whatever the requested reduction (with a z-loss, the z-loss part
    /// averaged over the counted rows).
    pub fn mean(&self) -> f64 {
        Reduction::Mean
            .apply_with_z_loss(
                self.sum,
                self.mean_denominator,
                self.z_loss_sum,
                self.counted_rows(),
            )
            .unwrap_or(f64::NAN)
    }

    /// The z-loss reduced like the loss: `z_loss_sum` for `sum`, `z_loss_sum / counted_rows`
    /// for `mean`, `None` for `none` or without z-loss.
    pub fn reduced_z_loss(&self) -> Option<f64> {
        match self.reduction {
            Reduction::None => None,
            Reduction::Sum => self.z_loss_sum,
            Reduction::Mean => Some(self.z_loss_sum? / self.counted_rows() as f64),
        }
    }

    /// The entropy reduced like the loss (`None` without entropy or for `Reduction::None`).
    pub fn reduced_entropy(&self) -> Option<f64> {
        self.reduction
            .apply(self.entropy_sum?, self.mean_denominator)
    }

    /// The KL divergence reduced like the loss: `loss − entropy` (less the reduced z-loss, if
    /// any).
    pub fn reduced_kl_divergence(&self) -> Option<f64> {
        let z = self.reduced_z_loss().unwrap_or(0.0);
        Some(self.reduced_loss()? - z - self.reduced_entropy()?)
    }
}

/// The outputs of one cross-entropy call.
///
/// With probability targets (and no class weights) the per-row entropy `H(p̃)` of the
/// (smoothed) target is reported too, which makes `CE(p̃, q) = H(p̃) + KL(p̃ ‖ q)` visible:
/// [`LossOutput::kl_divergence`] is the part of the loss the model can reduce.
///
/// With a z-loss (λ > 0, [`crate::CrossEntropy::with_z_loss`]) `per_row`, `sum` and `loss`
/// include it, and `z_loss` / `z_loss_sum` report it separately.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// The reduction the spec asked for.
    pub reduction: Reduction,
    /// The reduced loss: `Some(sum)` or `Some(mean)`; `None` for [`Reduction::None`]. With a
    /// z-loss the mean is `(sum − z_loss_sum) / mean_denominator + z_loss_sum / counted_rows`
    /// ([`Reduction::apply_with_z_loss`]).
    pub loss: Option<f64>,
    /// `Σ_i l_i` over all rows (ignored rows count 0), z-loss included.
    pub sum: f64,
    /// The mean's denominator: `Σ_{i not ignored} w_{y_i}` for class indices, `N` for probabilities.
    pub mean_denominator: f64,
    /// `l_i`, one per row, z-loss included.
    pub per_row: Vec<f64>,
    /// `lse_i = log Σ_k exp z_ik`, one per row (ignored rows included); of the soft-capped
    /// logits `z'` when the spec soft-caps.
    pub log_sum_exp: Vec<f64>,
    /// `H(p̃_i)` per row, for probability targets without class weights.
    pub entropy: Option<Vec<f64>>,
    /// `Σ_i H(p̃_i)`, when `entropy` is present.
    pub entropy_sum: Option<f64>,
    /// `λ·lse_i²` per row (0 for an ignored row), when the spec has a z-loss (λ > 0).
    pub z_loss: Option<Vec<f64>>,
    /// `Σ_i λ·lse_i²`, when `z_loss` is present.
    pub z_loss_sum: Option<f64>,
    /// Rows whose class index was the ignore index.
    pub ignored_rows: usize,
    /// N.
    pub rows: usize,
    /// C.
    pub classes: usize,
}

impl LossOutput {
    /// The output of an empty batch (N = 0): sum 0, mean NaN, no rows, as in PyTorch; an
    /// (empty) entropy and z-loss when asked for (the spec's λ > 0).
    pub(crate) fn empty_with_z_loss(
        reduction: Reduction,
        classes: usize,
        with_entropy: bool,
        with_z_loss: bool,
    ) -> Self {
        Self::from_parts(
            reduction,
            classes,
            0.0,
            Vec::new(),
            Vec::new(),
            with_entropy.then(Vec::new),
            with_z_loss.then(Vec::new),
            0,
        )
    }

    /// Assembles an output from per-row values (z-loss included in `per_row`) and the
    /// host-side sums.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        reduction: Reduction,
        classes: usize,
        mean_denominator: f64,
        per_row: Vec<f64>,
        log_sum_exp: Vec<f64>,
        entropy: Option<Vec<f64>>,
        z_loss: Option<Vec<f64>>,
        ignored_rows: usize,
    ) -> Self {
        // Folds from +0.0: `Iterator::sum` of no f64 is −0.0, which would print as "-0".
        let total = |v: &Vec<f64>| v.iter().fold(0.0, |a, b| a + b);
        let mut totals = LossTotals {
            reduction,
            loss: None,
            sum: total(&per_row),
            mean_denominator,
            entropy_sum: entropy.as_ref().map(total),
            z_loss_sum: z_loss.as_ref().map(total),
            ignored_rows,
            rows: per_row.len(),
            classes,
        };
        totals.loss = totals.reduced_loss();
        Self::from_totals_with_z_loss(totals, per_row, log_sum_exp, entropy, z_loss)
    }

    /// These rows' totals.
    pub fn totals(&self) -> LossTotals {
        LossTotals {
            reduction: self.reduction,
            loss: self.loss,
            sum: self.sum,
            mean_denominator: self.mean_denominator,
            entropy_sum: self.entropy_sum,
            z_loss_sum: self.z_loss_sum,
            ignored_rows: self.ignored_rows,
            rows: self.rows,
            classes: self.classes,
        }
    }

    /// The totals with the per-row values of the same call, the per-row z-loss included.
    pub(crate) fn from_totals_with_z_loss(
        totals: LossTotals,
        per_row: Vec<f64>,
        log_sum_exp: Vec<f64>,
        entropy: Option<Vec<f64>>,
        z_loss: Option<Vec<f64>>,
    ) -> Self {
        Self {
            reduction: totals.reduction,
            loss: totals.reduced_loss(),
            sum: totals.sum,
            mean_denominator: totals.mean_denominator,
            rows: per_row.len(),
            per_row,
            log_sum_exp,
            entropy,
            entropy_sum: totals.entropy_sum,
            z_loss,
            z_loss_sum: totals.z_loss_sum,
            ignored_rows: totals.ignored_rows,
            classes: totals.classes,
        }
    }

    /// Appends the output of the rows that follow (a later batch of the same stream), so a
    /// file larger than memory can be scored batch by batch into one result.
    pub fn append(&mut self, next: LossOutput) {
        let mut totals = self.totals();
        totals.add(&next.totals());
        self.per_row.extend(next.per_row);
        self.log_sum_exp.extend(next.log_sum_exp);
        if let (Some(h), Some(more)) = (self.entropy.as_mut(), next.entropy) {
            h.extend(more);
        }
        if let (Some(z), Some(more)) = (self.z_loss.as_mut(), next.z_loss) {
            z.extend(more);
        }
        self.sum = totals.sum;
        self.mean_denominator = totals.mean_denominator;
        self.entropy_sum = totals.entropy_sum;
        self.z_loss_sum = totals.z_loss_sum;
        self.ignored_rows = totals.ignored_rows;
        self.rows = totals.rows;
        self.loss = totals.loss;
    }

    /// The rows not ignored, `rows − ignored_rows` (all rows for probability targets): the
    /// z-loss mean's denominator.
    pub fn counted_rows(&self) -> usize {
        self.totals().counted_rows()
    }

    /// PyTorch's mean, whatever the requested reduction (with a z-loss, the z-loss part
    /// averaged over [`LossOutput::counted_rows`]).
    pub fn mean(&self) -> f64 {
        self.totals().mean()
    }

    /// The z-loss reduced like the loss: `z_loss_sum` for `sum`, `z_loss_sum / counted_rows`
    /// for `mean`; `None` for `none` or without z-loss.
    pub fn reduced_z_loss(&self) -> Option<f64> {
        self.totals().reduced_z_loss()
    }

    /// `KL(p̃_i ‖ q_i) = l_i − H(p̃_i)` per row (less the row's z-loss, if any), when the
    /// entropy is known.
    pub fn kl_divergence(&self) -> Option<Vec<f64>> {
        let h = self.entropy.as_ref()?;
        let z = |i: usize| self.z_loss.as_ref().map_or(0.0, |z| z[i]);
        Some(
            self.per_row
                .iter()
                .zip(h)
                .enumerate()
                .map(|(i, (l, h))| l - z(i) - h)
                .collect(),
        )
    }

    /// The entropy reduced like the loss (`None` without entropy or for `Reduction::None`).
    pub fn reduced_entropy(&self) -> Option<f64> {
        self.totals().reduced_entropy()
    }

    /// The KL divergence reduced like the loss: `loss − entropy` (less the reduced z-loss, if
    /// any).
    pub fn reduced_kl_divergence(&self) -> Option<f64> {
        self.totals().reduced_kl_divergence()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// N = 0 sums to +0.0, not −0.0.
    #[test]
    fn empty_sums_are_positive_zero() {
        let out = LossOutput::empty_with_z_loss(Reduction::Sum, 3, true, false);
        for value in [out.sum, out.loss.unwrap(), out.entropy_sum.unwrap()] {
            assert!(value == 0.0 && value.is_sign_positive(), "{value}");
        }
        let out = LossOutput::empty_with_z_loss(Reduction::Sum, 3, false, true);
        let z = out.z_loss_sum.unwrap();
        assert!(z == 0.0 && z.is_sign_positive(), "{z}");
        assert_eq!(out.z_loss, Some(Vec::new()));
        assert!(
            LossOutput::empty_with_z_loss(Reduction::Sum, 3, false, false)
                .z_loss
                .is_none()
        );
    }

    /// Three rows, the middle one ignored; the class weights make the denominator 5 while two
    /// rows count, so the two means differ.
    fn with_z_loss(reduction: Reduction) -> LossOutput {
        LossOutput::from_parts(
            reduction,
            4,
            5.0,
            vec![2.0 + 0.5, 0.0, 7.0 + 1.5],
            vec![1.0, 2.0, 3.0],
            None,
            Some(vec![0.5, 0.0, 1.5]),
            1,
        )
    }

    #[test]
    fn the_mean_averages_the_z_loss_over_counted_rows() {
        let mean = with_z_loss(Reduction::Mean);
        assert_eq!(mean.counted_rows(), 2);
        assert_eq!(mean.sum, 11.0);
        assert_eq!(mean.z_loss_sum, Some(2.0));
        // (11 − 2)/5 + 2/2, not 11/5.
        assert_eq!(mean.loss, Some(9.0 / 5.0 + 1.0));
        assert_eq!(mean.mean(), 9.0 / 5.0 + 1.0);
        assert_eq!(mean.reduced_z_loss(), Some(1.0));
        let sum = with_z_loss(Reduction::Sum);
        assert_eq!((sum.loss, sum.reduced_z_loss()), (Some(11.0), Some(2.0)));
        assert_eq!(sum.mean(), mean.mean());
        let none = with_z_loss(Reduction::None);
        assert_eq!((none.loss, none.reduced_z_loss()), (None, None));
    }

    #[test]
    fn without_z_loss_the_mean_is_unchanged() {
        assert_eq!(
            Reduction::Mean.apply_with_z_loss(7.0, 3.0, None, 2),
            Some(7.0 / 3.0)
        );
        assert_eq!(
            Reduction::Sum.apply_with_z_loss(7.0, 3.0, Some(1.0), 2),
            Some(7.0)
        );
        assert_eq!(
            Reduction::None.apply_with_z_loss(7.0, 3.0, Some(1.0), 2),
            None
        );
        // Every row ignored: NaN, as PyTorch's mean.
        let all_ignored = Reduction::Mean.apply_with_z_loss(0.0, 0.0, Some(0.0), 0);
        assert!(all_ignored.unwrap().is_nan());
    }

    #[test]
    fn appending_batches_gives_the_whole() {
        let whole = with_z_loss(Reduction::Mean);
        let mut first = LossOutput::from_parts(
            Reduction::Mean,
            4,
            2.0,
            vec![2.5, 0.0],
            vec![1.0, 2.0],
            None,
            Some(vec![0.5, 0.0]),
            1,
        );
        let second = LossOutput::from_parts(
            Reduction::Mean,
            4,
            3.0,
            vec![8.5],
            vec![3.0],
            None,
            Some(vec![1.5]),
            0,
        );
        first.append(second);
        assert_eq!(first, whole);
    }

    #[test]
    fn totals_reduce_like_outputs() {
        let out = with_z_loss(Reduction::Mean);
        let totals = LossTotals {
            reduction: out.reduction,
            loss: None,
            sum: out.sum,
            mean_denominator: out.mean_denominator,
            entropy_sum: None,
            z_loss_sum: out.z_loss_sum,
            ignored_rows: out.ignored_rows,
            rows: out.rows,
            classes: out.classes,
        };
        assert_eq!(totals.counted_rows(), 2);
        assert_eq!(totals.reduced_loss(), out.loss);
        assert_eq!(totals.reduced_z_loss(), out.reduced_z_loss());
        let back = LossOutput::from_totals_with_z_loss(
            totals,
            out.per_row.clone(),
            out.log_sum_exp.clone(),
            None,
            out.z_loss.clone(),
        );
        assert_eq!(back, out);
    }

    #[test]
    fn kl_divergence_leaves_out_the_z_loss() {
        let out = LossOutput::from_parts(
            Reduction::Mean,
            2,
            2.0,
            vec![3.0, 5.0],
            vec![1.0, 2.0],
            Some(vec![0.25, 0.5]),
            Some(vec![1.0, 2.0]),
            0,
        );
        assert_eq!(out.kl_divergence(), Some(vec![1.75, 2.5]));
        assert_eq!(out.reduced_kl_divergence(), Some(4.0 - 1.5 - 0.375));
    }
}
