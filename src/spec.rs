//! The loss specification: `torch.nn.functional.cross_entropy`'s options, as a builder.

use crate::dtype::Dtype;
use crate::error::{Result, XentError};
use crate::logits::Logits;
use crate::targets::Targets;

/// How per-row losses combine into one value, as PyTorch's `reduction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// No reduction: the per-row losses are the result.
    None,
    /// `Σ_i l_i`.
    Sum,
    /// PyTorch's mean: `Σ_i l_i / Σ_{i not ignored} w_{y_i}` for class indices,
    /// `Σ_i l_i / N` for probabilities. NaN when nothing is left to average.
    #[default]
    Mean,
}

impl Reduction {
    /// The reduced value from the loss sum and the mean's denominator; `None` for
    /// [`Reduction::None`].
    pub fn apply(self, sum: f64, mean_denominator: f64) -> Option<f64> {
        match self {
            Reduction::None => None,
            Reduction::Sum => Some(sum),
            Reduction::Mean => Some(sum / mean_denominator),
        }
    }

    /// The reduced value when the per-row losses include a z-loss `λ·lse_i²`: the one formula
    /// every output (CPU, GPU, appended batches) uses.
    ///
    /// `sum` is `Σ_i l_i` with the z-loss included, `z_loss_sum` is `Σ_{i not ignored} λ·lse_i²`
    /// (`None` without z-loss), `counted_rows` is the number of rows not ignored. The mean is
    /// `(sum − z_loss_sum) / mean_denominator + z_loss_sum / counted_rows`: the cross-entropy
    /// part over PyTorch's (weighted) denominator, the z-loss averaged over the rows not ignored,
    /// unweighted even with class weights (as Liger's `lse_square_scale`). Without z-loss this is
    /// exactly [`Reduction::apply`]. NaN when every row is ignored.
    pub fn apply_with_z_loss(
        self,
        sum: f64,
        mean_denominator: f64,
        z_loss_sum: Option<f64>,
        counted_rows: usize,
    ) -> Option<f64> {
        match (self, z_loss_sum) {
            (Reduction::Mean, Some(z)) => {
                Some((sum - z) / mean_denominator + z / counted_rows as f64)
            }
            _ => self.apply(sum, mean_denominator),
        }
    }

    /// The name PyTorch gives it: `none`, `sum` or `mean`.
    pub fn name(self) -> &'static str {
        match self {
            Reduction::None => "none",
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
        }
    }
}

impl std::fmt::Display for Reduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Reduction {
    type Err = XentError;
    /// `none`, `sum` or `mean`; anything else is [`XentError::UnknownName`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Reduction::None),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            _ => Err(XentError::UnknownName {
                what: "reduction",
                value: s.into(),
                expected: "none, sum or mean",
            }),
        }
    }
}

/// Probability targets are f32 or of the logits' dtype: [`XentError::TargetsDtype`] otherwise.
pub(crate) fn check_targets_dtype(logits: Dtype, targets: Dtype) -> Result<()> {
    if targets != Dtype::F32 && targets != logits {
        return Err(XentError::TargetsDtype { logits, targets });
    }
    Ok(())
}

/// A cross-entropy loss with PyTorch's options and normalisation.
///
/// ```
/// use xent::{CrossEntropy, Reduction};
/// let spec = CrossEntropy::new()
///     .with_reduction(Reduction::Sum)
///     .with_ignore_index(-100)
///     .with_label_smoothing(0.1);
/// # let _ = spec;
/// ```
///
/// Per row, with effective target weights `a_k`, the loss is `B·lse − A` where
/// `A = Σ a_k z_k`, `B = Σ a_k` (see `DESIGN.md` in the repository):
///
/// | targets | `a_k` |
/// |---|---|
/// | class index `y` | `(1−ε)·w_y·[k=y] + (ε/C)·w_k` |
/// | probabilities `p` | `w_k·((1−ε)·p_k + ε/C)` |
///
/// Two training options extend it: a z-loss `λ·lse²` per row ([`CrossEntropy::with_z_loss`])
/// and logit soft-capping `z' = cap·tanh(z/cap)` ([`CrossEntropy::with_softcap`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CrossEntropy {
    reduction: Reduction,
    weights: Option<Vec<f32>>,
    ignore_index: Option<i64>,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
}

impl CrossEntropy {
    /// Mean reduction, no class weights, no ignore index, no smoothing: PyTorch's defaults
    /// (except that PyTorch's default ignore index, −100, must be asked for).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the reduction.
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Sets one weight per class (PyTorch's `weight`).
    pub fn with_weights(mut self, weights: impl Into<Vec<f32>>) -> Self {
        self.weights = Some(weights.into());
        self
    }

    /// Rows whose class index equals `index` contribute nothing (PyTorch's `ignore_index`).
    pub fn with_ignore_index(mut self, index: i64) -> Self {
        self.ignore_index = Some(index);
        self
    }

    /// Label smoothing ε in `[0, 1]`.
    pub fn with_label_smoothing(mut self, epsilon: f64) -> Self {
        self.label_smoothing = epsilon;
        self
    }

    /// Adds the z-loss `λ·lse_i²` to every row not ignored (PaLM, OLMo; Liger's
    /// `lse_square_scale`); `lse_i` is the row's log-sum-exp (after soft-capping). It is summed
    /// under `sum` and, under `mean`, averaged over the rows not ignored (an unweighted count,
    /// even with class weights), while the cross-entropy keeps PyTorch's denominator:
    /// `loss = Σ_i CE_i / Σ_{i not ignored} w_{y_i} + λ·Σ_{i not ignored} lse_i² / n_not_ignored`.
    /// Every row counts as not ignored with probability targets. `λ = 0` (the default) turns it
    /// off; λ must be finite and ≥ 0. The outputs report it separately
    /// ([`crate::LossOutput::z_loss`]) and include it in the loss.
    pub fn with_z_loss(mut self, lambda: f64) -> Self {
        self.z_loss = lambda;
        self
    }

    /// Soft-caps every logit before anything else: `z' = cap·tanh(z/cap)` (Gemma 2 uses 30).
    /// The loss, the log-sum-exp and the z-loss are those of `z'`; the gradient carries the
    /// chain rule `dz'/dz = 1 − tanh²(z/cap)`. `cap` must be finite and > 0.
    ///
    /// Note that a −inf logit (a masked class) becomes `−cap`, a finite logit: the class is no
    /// longer masked (its probability is `exp(−cap − lse) > 0`), which is what `cap·tanh(z/cap)`
    /// gives (and what PyTorch gives for the same expression); its gradient is exactly 0
    /// because `tanh' (−inf) = 0`. Mask after capping if a mask must stay a mask.
    pub fn with_softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// The z-loss coefficient λ (0 when off).
    pub fn z_loss(&self) -> f64 {
        self.z_loss
    }

    /// The soft-capping bound, if any.
    pub fn softcap(&self) -> Option<f64> {
        self.softcap
    }

    /// A logit as the loss sees it, in f64: `cap·tanh(z / cap)` with a soft-cap, else `z`.
    pub fn capped(&self, z: f64) -> f64 {
        match self.softcap {
            Some(cap) => cap * (z / cap).tanh(),
            None => z,
        }
    }

    /// The reduction in force.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// The class weights, if any.
    pub fn weights(&self) -> Option<&[f32]> {
        self.weights.as_deref()
    }

    /// The ignore index, if any.
    pub fn ignore_index(&self) -> Option<i64> {
        self.ignore_index
    }

    /// The label smoothing ε.
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }

    /// Whether a class index is the ignore index.
    pub fn is_ignored(&self, class: i64) -> bool {
        self.ignore_index == Some(class)
    }

    /// Checks the options against the logits and the targets; every path calls this before
    /// computing anything, so errors are the same on the GPU and the CPU.
    pub fn validate(&self, logits: &Logits<'_>, targets: &Targets<'_>) -> Result<()> {
        let (rows, classes) = (logits.rows(), logits.classes());
        self.validate_options(classes, targets.is_probabilities())?;
        match targets {
            Targets::ClassIndices(y) => {
                if y.len() != rows {
                    return Err(XentError::TargetsShape {
                        expected: rows,
                        got: y.len(),
                        what: format!("one class index per row, [{rows}]"),
                    });
                }
                let bad = y
                    .iter()
                    .enumerate()
                    .find(|&(_, &v)| !self.is_ignored(v) && !(0..classes as i64).contains(&v));
                if let Some((row, &value)) = bad {
                    return Err(XentError::ClassIndexOutOfRange {
                        row,
                        value,
                        classes,
                        ignore_index: self.ignore_index,
                    });
                }
            }
            Targets::Probabilities(p) => {
                check_targets_dtype(logits.dtype(), p.dtype())?;
                if p.len() != logits.len() {
                    return Err(XentError::TargetsShape {
                        expected: logits.len(),
                        got: p.len(),
                        what: format!("probabilities shaped like the logits, [{rows}, {classes}]"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks the options for top-k sparse targets ([`crate::SparseTargets`]): those of
    /// [`CrossEntropy::validate_options`], and no class weights, ignore index or label
    /// smoothing ([`XentError::SparseOption`] names the first one set).
    pub fn validate_sparse_options(&self, classes: usize) -> Result<()> {
        self.validate_options(classes, false)?;
        let refused = [
            ("class weights", self.weights.is_some()),
            ("ignore index", self.ignore_index.is_some()),
            ("label smoothing", self.label_smoothing > 0.0),
        ];
        match refused.into_iter().find(|(_, set)| *set) {
            Some((option, _)) => Err(XentError::SparseOption(option)),
            None => Ok(()),
        }
    }

    /// Checks the options that do not depend on the data: smoothing in `[0, 1]`, one finite
    /// weight per class, no ignore index with probability targets, a finite z-loss λ ≥ 0, a
    /// finite soft-cap > 0.
    pub fn validate_options(&self, classes: usize, probabilities: bool) -> Result<()> {
        if classes == 0 {
            return Err(XentError::NoClasses);
        }
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            return Err(XentError::LabelSmoothing(eps));
        }
        let lambda = self.z_loss;
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(XentError::ZLoss(lambda));
        }
        if let Some(cap) = self.softcap.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(XentError::Softcap(cap));
        }
        if let Some(w) = &self.weights {
            if w.len() != classes {
                return Err(XentError::WeightsLength {
                    expected: classes,
                    got: w.len(),
                });
            }
            if let Some((index, &value)) = w.iter().enumerate().find(|(_, w)| !w.is_finite()) {
                return Err(XentError::WeightNotFinite { index, value });
            }
        }
        if probabilities && self.ignore_index.is_some() {
            return Err(XentError::IgnoreIndexWithProbabilities);
        }
        Ok(())
    }
}
