//! Batched scoring in f64 (the CPU reference of issue 11): knowledge distillation, top-k sparse
//! targets, token metrics, and sequence log-likelihoods with multiple choice as
//! lm-evaluation-harness computes them.
//!
//! Like [`crate::cpu`], these are plain f64 loops written from the formulas (DESIGN.md, "One
//! pass, one statistic"), not from any shader: they define the right answer.
//!
//! Conventions shared by every function here:
//! - a row's log-softmax is `z_k − lse(z)` with the maximum subtracted inside `lse`, so ±1e4
//!   logits and constant offsets are exact to a few ulps of the largest |z|;
//! - a term `p·log(…)` with `p = 0` contributes exactly 0 (so a masked, −inf class that carries
//!   no target mass costs nothing), while NaN anywhere in a row makes that row's results NaN;
//! - `mean` is `sum / N` over all rows ("batchmean"), NaN for an empty batch, and `sum` of no
//!   rows is +0.

use crate::cpu::{RowLse, effective_row, push_row_gradient};
use crate::error::{Result, XentError};
use crate::grad::Upstream;
use crate::logits::Logits;
use crate::output::{LossOutput, RowOutputs};
use crate::spec::{CrossEntropy, Reduction};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// `log_softmax(z / t)` of one row, in f64.
fn log_softmax_scaled(z: &[f32], t: f64) -> Vec<f64> {
    let s: Vec<f64> = z.iter().map(|&v| v as f64 / t).collect();
    let lse = RowLse::of(s.iter().copied());
    s.iter().map(|&v| lse.log_prob(v)).collect()
}

/// `ln(exp a + exp b)`, exact for −inf operands, NaN if either is NaN.
fn log_add_exp(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        return f64::NAN;
    }
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// Folds from +0.0 (`Iterator::sum` of nothing is −0.0).
fn total(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, b| a + b)
}

/// Whether `a` ranks strictly above `b` in the order of `torch.argmax` / `numpy.argmax`: the
/// usual order, with NaN above everything (and all NaNs equal).
fn ranks_above(a: f64, b: f64) -> bool {
    if b.is_nan() {
        false
    } else if a.is_nan() {
        true
    } else {
        a > b
    }
}

/// The first index of the maximum in the order of [`ranks_above`] (`numpy.argmax`); 0 for an
/// empty slice.
fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (k, x) in v.enumerate() {
        if k == 0 || ranks_above(x, best.1) {
            best = (k, x);
        }
    }
    best.0
}

// ---------------------------------------------------------------------------------------------
// Distillation
// ---------------------------------------------------------------------------------------------

/// Which divergence between the teacher's `p = softmax(t/T)` and the student's
/// `q = softmax(z/T)` a [`Distillation`] minimises, per row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Divergence {
    /// `CE(p, q) = −Σ_k p_k log q_k = H(p) + KL(p ‖ q)`: the usual (Hinton) distillation loss;
    /// the outputs also give `H(p)` and `KL(p ‖ q)` per row. Its gradient is that of
    /// `KL(p ‖ q)`, since `H(p)` does not depend on the student.
    #[default]
    ForwardKl,
    /// `KL(q ‖ p) = Σ_k q_k (log q_k − log p_k)`: mode-seeking.
    ReverseKl,
    /// The generalised Jensen–Shannon divergence with weight β in `[0, 1]`, as Liger's
    /// `LigerJSD` (and TRL's `generalized_jsd_loss`, the GKD paper) define it:
    /// `JSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m)` with the mixture `m = β·p + (1−β)·q`.
    ///
    /// The ends are defined as those implementations define them: **β = 0 is the forward
    /// `KL(p ‖ q)`** (teacher first) and **β = 1 is the reverse `KL(q ‖ p)`** (student first).
    /// Note that the formula itself tends to 0 at both ends (`JSD_β ≈ β·KL(p‖q)` as β → 0 and
    /// `≈ (1−β)·KL(q‖p)` as β → 1): the ends are the limits of `JSD_β/β` and `JSD_β/(1−β)`,
    /// so the loss jumps there. β = 0 gives `KL(p ‖ q)` only, not the forward cross-entropy
    /// (which adds `H(p)`); its gradient equals [`Divergence::ForwardKl`]'s.
    Jsd {
        /// The weight β of the teacher's side, in `[0, 1]`.
        beta: f64,
    },
}

/// A knowledge-distillation loss between a student's and a teacher's logits, as a builder in
/// the style of [`crate::CrossEntropy`].
///
/// ```
/// use xent::{Reduction, scoring::{Distillation, Divergence}};
/// let spec = Distillation::new()
///     .with_temperature(2.0)
///     .with_divergence(Divergence::Jsd { beta: 0.5 })
///     .with_t2_scale(true)
///     .with_reduction(Reduction::Sum);
/// # let _ = spec;
/// ```
///
/// Per row, `p = softmax(t/T)` (teacher) and `q = softmax(z/T)` (student); the loss is the
/// [`Divergence`] between them, times `T²` when [`Distillation::with_t2_scale`] asks for it
/// (Hinton et al.; Hugging Face's distillation examples), which keeps the gradient's size
/// independent of T. The gradient is with respect to the student's raw logits `z`, so it
/// carries the chain-rule factor `1/T`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    temperature: f64,
    divergence: Divergence,
    t2_scale: bool,
    reduction: Reduction,
}

impl Default for Distillation {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            divergence: Divergence::ForwardKl,
            t2_scale: false,
            reduction: Reduction::Mean,
        }
    }
}

impl Distillation {
    /// Temperature 1, forward KL (the cross-entropy), no T² scaling, mean ("batchmean")
    /// reduction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the temperature T (finite, > 0); both logits are divided by it.
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets the divergence.
    pub fn with_divergence(mut self, divergence: Divergence) -> Self {
        self.divergence = divergence;
        self
    }

    /// Multiplies the loss (every reported per-row term, and so the gradient) by `T²`.
    pub fn with_t2_scale(mut self, t2_scale: bool) -> Self {
        self.t2_scale = t2_scale;
        self
    }

    /// Sets the reduction; `mean` is `Σ_i l_i / N` (PyTorch's `kl_div(reduction="batchmean")`).
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// The temperature T.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The divergence.
    pub fn divergence(&self) -> Divergence {
        self.divergence
    }

    /// Whether the loss is multiplied by `T²`.
    pub fn t2_scale(&self) -> bool {
        self.t2_scale
    }

    /// The reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// The factor every per-row term is multiplied by: `T²` with T² scaling, else 1.
    pub fn loss_scale(&self) -> f64 {
        if self.t2_scale {
            self.temperature * self.temperature
        } else {
            1.0
        }
    }

    /// Checks the options and that the teacher's logits have the student's shape.
    ///
    /// Errors: [`XentError::Temperature`] unless T is finite and > 0, [`XentError::JsdBeta`]
    /// unless β is in `[0, 1]`, [`XentError::TargetsShape`] when the teacher does not hold
    /// `N × C` values.
    pub fn validate(&self, student: &Logits<'_>, teacher: &[f32]) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(XentError::Temperature(t));
        }
        if let Divergence::Jsd { beta } = self.divergence {
            if !(0.0..=1.0).contains(&beta) {
                return Err(XentError::JsdBeta(beta));
            }
        }
        if teacher.len() != student.values().len() {
            return Err(XentError::TargetsShape {
                expected: student.values().len(),
                got: teacher.len(),
                what: format!(
                    "teacher logits shaped like the student's, [{}, {}]",
                    student.rows(),
                    student.classes()
                ),
            });
        }
        Ok(())
    }
}

/// What a distillation loss reports per row besides the loss.
#[derive(Clone, Debug, PartialEq)]
pub enum DistillationTerms {
    /// [`Divergence::ForwardKl`]: the loss is `entropy + kl` per row (each times `T²` with T²
    /// scaling, so the identity holds either way).
    CrossEntropy {
        /// `H(p_i) = −Σ_k p_k log p_k`, the teacher's entropy at temperature T.
        entropy: Vec<f64>,
        /// `KL(p_i ‖ q_i) = Σ_k p_k (log p_k − log q_k)`.
        kl: Vec<f64>,
    },
    /// [`Divergence::ReverseKl`] and [`Divergence::Jsd`]: the loss is the divergence itself.
    DivergenceOnly,
}

/// The outputs of one distillation call.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillationOutput {
    /// The reduction the spec asked for.
    pub reduction: Reduction,
    /// The reduced loss: `Some(sum)` or `Some(sum / N)`; `None` for [`Reduction::None`].
    pub loss: Option<f64>,
    /// `Σ_i l_i`.
    pub sum: f64,
    /// `l_i`, one per row.
    pub per_row: Vec<f64>,
    /// The entropy and KL parts of the forward loss, per row.
    pub terms: DistillationTerms,
    /// N.
    pub rows: usize,
    /// C.
    pub classes: usize,
}

impl DistillationOutput {
    /// The forward loss's `KL(p ‖ q)` reduced like the loss; `None` for the other divergences
    /// or for [`Reduction::None`].
    pub fn reduced_kl(&self) -> Option<f64> {
        match &self.terms {
            DistillationTerms::CrossEntropy { kl, .. } => {
                self.reduction.apply(total(kl), self.rows as f64)
            }
            DistillationTerms::DivergenceOnly => None,
        }
    }

    /// The forward loss's teacher entropy `H(p)` reduced like the loss; `None` for the other
    /// divergences or for [`Reduction::None`].
    pub fn reduced_entropy(&self) -> Option<f64> {
        match &self.terms {
            DistillationTerms::CrossEntropy { entropy, .. } => {
                self.reduction.apply(total(entropy), self.rows as f64)
            }
            DistillationTerms::DivergenceOnly => None,
        }
    }
}

/// One row of a distillation loss: the (unscaled) loss, the forward loss's (entropy, kl), and
/// `∂loss/∂(z/T)` when asked for.
struct DistillRow {
    loss: f64,
    forward: Option<(f64, f64)>,
    grad: Option<Vec<f64>>,
}

/// `Σ_k p_k·f_k` over the classes a distribution does not mask (`log p_k ≠ −inf`): a class is
/// out of a softmax only where its logit is −inf, so a `p_k` that underflows f64 is still
/// positive, and where `f_k` is infinite (`q_k = 0` under it) the sum is that infinity, as on
/// the device (whose f32 underflows far sooner: DESIGN.md, distillation keyed on −inf). Any
/// other term of an underflowed `p_k` adds 0; NaN propagates.
fn weighted_unmasked(lp: &[f64], p: &[f64], f: impl Fn(usize) -> f64) -> f64 {
    (0..p.len())
        .filter(|&k| lp[k] != f64::NEG_INFINITY)
        .map(|k| match (p[k], f(k)) {
            (0.0, v) if v.is_infinite() => v,
            (0.0, _) => 0.0,
            (pk, v) => pk * v,
        })
        .sum()
}

/// `Σ_k p_k·f_k` over the classes with `p_k ≠ 0` (0·anything = 0; NaN p propagates).
fn weighted(p: &[f64], f: impl Fn(usize) -> f64) -> f64 {
    (0..p.len())
        .filter(|&k| p[k] != 0.0)
        .map(|k| p[k] * f(k))
        .sum()
}

/// `∂/∂s_j` of a loss whose derivative with respect to q (as free variables) is `d_k`, through
/// `q = softmax(s)`: `q_j·(d_j − Σ_k q_k d_k)`, exactly 0 where `q_j = 0`.
fn through_softmax(q: &[f64], d: &[f64]) -> Vec<f64> {
    let mean = weighted(q, |k| d[k]);
    (0..q.len())
        .map(|j| {
            if q[j] == 0.0 {
                0.0
            } else {
                q[j] * (d[j] - mean)
            }
        })
        .collect()
}

fn distill_row(divergence: Divergence, lp: &[f64], lq: &[f64], with_grad: bool) -> DistillRow {
    let p: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
    let q: Vec<f64> = lq.iter().map(|v| v.exp()).collect();
    // d(KL(p‖q))/ds = (Σp)·q − p (B·q − a with a = p, DESIGN.md).
    let forward_grad = || {
        let b: f64 = p.iter().sum();
        (0..q.len()).map(|k| b * q[k] - p[k]).collect::<Vec<f64>>()
    };
    let forward_kl = || weighted_unmasked(lp, &p, |k| lp[k] - lq[k]);
    let reverse = || {
        let d: Vec<f64> = (0..q.len()).map(|k| lq[k] - lp[k]).collect();
        let kl = weighted_unmasked(lq, &q, |k| d[k]);
        (kl, with_grad.then(|| through_softmax(&q, &d)))
    };
    match divergence {
        Divergence::ForwardKl => {
            let entropy = -weighted_unmasked(lp, &p, |k| lp[k]);
            let ce = -weighted_unmasked(lp, &p, |k| lq[k]);
            DistillRow {
                loss: ce,
                forward: Some((entropy, forward_kl())),
                grad: with_grad.then(forward_grad),
            }
        }
        Divergence::Jsd { beta: 0.0 } => DistillRow {
            loss: forward_kl(),
            forward: None,
            grad: with_grad.then(forward_grad),
        },
        Divergence::Jsd { beta: 1.0 } => {
            let (loss, grad) = reverse();
            DistillRow {
                loss,
                forward: None,
                grad,
            }
        }
        Divergence::ReverseKl => {
            let (loss, grad) = reverse();
            DistillRow {
                loss,
                forward: None,
                grad,
            }
        }
        Divergence::Jsd { beta } => {
            let (lb, lb1) = (beta.ln(), (1.0 - beta).ln());
            let lm: Vec<f64> = (0..p.len())
                .map(|k| log_add_exp(lb + lp[k], lb1 + lq[k]))
                .collect();
            let kl_pm = weighted(&p, |k| lp[k] - lm[k]);
            let kl_qm = weighted(&q, |k| lq[k] - lm[k]);
            // ∂JSD/∂q_k = (1−β)·(log q_k − log m_k) (the β·p/m and (1−β)·q/m terms cancel).
            let grad = with_grad.then(|| {
                let d: Vec<f64> = (0..q.len())
                    .map(|k| (1.0 - beta) * (lq[k] - lm[k]))
                    .collect();
                through_softmax(&q, &d)
            });
            DistillRow {
                loss: beta * kl_pm + (1.0 - beta) * kl_qm,
                forward: None,
                grad,
            }
        }
    }
}

fn distill_impl(
    spec: &Distillation,
    student: Logits<'_>,
    teacher: &[f32],
    upstream: Option<&Upstream<'_>>,
) -> Result<(DistillationOutput, Vec<f64>)> {
    spec.validate(&student, teacher)?;
    let (rows, classes) = (student.rows(), student.classes());
    if let Some(u) = upstream {
        u.check(spec.reduction, rows)?;
    }
    let t = spec.temperature;
    let scale = spec.loss_scale();
    let forward = spec.divergence == Divergence::ForwardKl;
    let mut per_row = Vec::with_capacity(rows);
    let (mut entropy, mut kl) = (Vec::new(), Vec::new());
    let mut grad = Vec::new();
    for i in 0..rows {
        let lp = log_softmax_scaled(&teacher[i * classes..(i + 1) * classes], t);
        let lq = log_softmax_scaled(&student.row(i), t);
        let row = distill_row(spec.divergence, &lp, &lq, upstream.is_some());
        per_row.push(scale * row.loss);
        if let Some((h, d)) = row.forward {
            entropy.push(scale * h);
            kl.push(scale * d);
        }
        if let (Some(u), Some(g)) = (upstream, row.grad) {
            // d/dz = d/ds · 1/T, times the loss scale and the reduction's scale (the mean
            // divides by the row count: "batchmean"; there is no z-loss part).
            let own = (rows as f64, rows as f64);
            let s = u.scales(spec.reduction, i, own).0 * scale / t;
            grad.extend(g.into_iter().map(|v| s * v));
        }
    }
    let sum = total(&per_row);
    let out = DistillationOutput {
        reduction: spec.reduction,
        loss: spec.reduction.apply(sum, rows as f64),
        sum,
        per_row,
        terms: if forward {
            DistillationTerms::CrossEntropy { entropy, kl }
        } else {
            DistillationTerms::DivergenceOnly
        },
        rows,
        classes,
    };
    Ok((out, grad))
}

/// A distillation loss of the `student` logits `[N, C]` against the `teacher` logits (same
/// shape, row-major), in f64.
///
/// Per row, with `p = softmax(t/T)`, `q = softmax(z/T)` and `s` the loss scale (`T²` with T²
/// scaling, else 1):
/// - forward: `l = s·CE(p, q) = s·(H(p) + KL(p ‖ q))`, with `H` and `KL` reported per row;
/// - reverse: `l = s·KL(q ‖ p)`;
/// - JSD: `l = s·(β·KL(p ‖ m) + (1−β)·KL(q ‖ m))`, `m = β·p + (1−β)·q`; β = 0 is `KL(p ‖ q)`
///   and β = 1 is `KL(q ‖ p)` ([`Divergence::Jsd`]).
///
/// Terms with zero probability contribute 0; a class the teacher masks (−inf) but the student
/// does not makes the reverse KL +inf. An empty batch gives sum 0, mean NaN.
///
/// Errors: those of [`Distillation::validate`].
pub fn distillation(
    spec: &Distillation,
    student: Logits<'_>,
    teacher: &[f32],
) -> Result<DistillationOutput> {
    Ok(distill_impl(spec, student, teacher, None)?.0)
}

/// The distillation loss ([`distillation`]) and its gradient with respect to the student's raw
/// logits `z`, row-major like them, scaled by `upstream` as autograd passes it.
///
/// With `s = z/T`, `q = softmax(s)`, the loss scale `σ` (`T²` or 1) and the reduction's scale
/// `g_i` (none), `g` (sum), `g/N` (mean; `grad/denominator` for [`Upstream::MeanOver`], whose
/// denominator is the whole batch's row count):
///
/// `∂l_i/∂z_j = (g_i·σ/T)·∂L/∂s_j`, where `∂L/∂s_j = (Σ_k p_k)·q_j − p_j` for the forward loss
/// (and JSD β = 0), and `q_j·(d_j − Σ_k q_k d_k)` otherwise, with `d_k = log q_k − log p_k`
/// (reverse, JSD β = 1) or `d_k = (1−β)·(log q_k − log m_k)` (JSD), the derivatives of the
/// loss with respect to `q_k`. A class with `q_j = 0` (a −inf student logit) gets exactly 0.
///
/// Errors: those of [`distillation`]; [`XentError::UpstreamKind`] and
/// [`XentError::UpstreamLength`] as [`crate::cpu::cross_entropy_grad`].
pub fn distillation_grad(
    spec: &Distillation,
    student: Logits<'_>,
    teacher: &[f32],
    upstream: Upstream<'_>,
) -> Result<(DistillationOutput, Vec<f64>)> {
    distill_impl(spec, student, teacher, Some(&upstream))
}

// ---------------------------------------------------------------------------------------------
// Top-k sparse targets
// ---------------------------------------------------------------------------------------------

/// Top-k sparse targets: per row, `k` class indices and `k` probabilities (both `[N, k]`,
/// row-major), as a teacher's top-k distribution is stored.
///
/// The probabilities are used as given, not renormalised (as the golden cases, which PyTorch
/// computed as `−Σ_j p_j·log_softmax(z)[idx_j]`): a row whose mass is not 1 has `B = Σ_j p_j`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseTargets<'a> {
    indices: &'a [i64],
    probabilities: &'a [f32],
    k: usize,
}

impl<'a> SparseTargets<'a> {
    /// `k` (index, probability) pairs per row; the shapes are checked against the logits when
    /// used.
    pub fn new(indices: &'a [i64], probabilities: &'a [f32], k: usize) -> Self {
        Self {
            indices,
            probabilities,
            k,
        }
    }

    /// k.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `i`'s class indices.
    pub fn indices_row(&self, i: usize) -> &'a [i64] {
        &self.indices[i * self.k..(i + 1) * self.k]
    }

    /// Row `i`'s probabilities.
    pub fn probabilities_row(&self, i: usize) -> &'a [f32] {
        &self.probabilities[i * self.k..(i + 1) * self.k]
    }

    /// Checks the shapes (`N × k` indices and probabilities) and every index: in `[0, C)` and
    /// not repeated within its row.
    ///
    /// Errors: [`XentError::TargetsShape`], [`XentError::SparseIndexOutOfRange`],
    /// [`XentError::SparseDuplicateIndex`]: the first offending row, and in it the first entry
    /// in error in the row's order (an index out of range, or one an earlier entry already
    /// has), as the GPU reports device buffers.
    pub fn validate(&self, logits: &Logits<'_>) -> Result<()> {
        let (rows, classes) = (logits.rows(), logits.classes());
        let expected = rows * self.k;
        for (len, what) in [
            (self.indices.len(), "class indices"),
            (self.probabilities.len(), "probabilities"),
        ] {
            if len != expected {
                return Err(XentError::TargetsShape {
                    expected,
                    got: len,
                    what: format!("top-{} {what}, [{rows}, {}]", self.k, self.k),
                });
            }
        }
        let mut sorted = Vec::with_capacity(self.k);
        for row in 0..rows {
            if let Some(e) = row_error(row, self.indices_row(row), classes, &mut sorted) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The error of the first entry of top-k row `row`, in the row's order, whose index is out of
/// `[0, C)` or repeats an earlier entry's; `None` for a row without one. `sorted` is scratch.
fn row_error(row: usize, idx: &[i64], classes: usize, sorted: &mut Vec<i64>) -> Option<XentError> {
    // Most rows are clean: sorted, their ends are in range and no neighbours are equal.
    sorted.clear();
    sorted.extend_from_slice(idx);
    sorted.sort_unstable();
    let in_range =
        sorted.first().is_none_or(|&v| v >= 0) && sorted.last().is_none_or(|&v| v < classes as i64);
    if in_range && sorted.windows(2).all(|w| w[0] != w[1]) {
        return None;
    }
    let mut seen = std::collections::HashSet::with_capacity(idx.len());
    idx.iter().find_map(|&value| {
        if !(0..classes as i64).contains(&value) {
            Some(XentError::SparseIndexOutOfRange {
                row,
                value,
                classes,
            })
        } else if !seen.insert(value) {
            Some(XentError::SparseDuplicateIndex { row, class: value })
        } else {
            None
        }
    })
}

fn sparse_impl(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: SparseTargets<'_>,
    upstream: Option<&Upstream<'_>>,
) -> Result<(LossOutput, Vec<f64>)> {
    spec.validate_sparse_options(logits.classes())?;
    targets.validate(&logits)?;
    let (rows, classes) = (logits.rows(), logits.classes());
    if let Some(u) = upstream {
        u.check(spec.reduction(), rows)?;
    }
    let mut out = RowOutputs::new(rows, false, spec.z_loss());
    let mut grad = Vec::new();
    for i in 0..rows {
        let raw = logits.row(i);
        let z = effective_row(spec, &raw);
        let parts = RowLse::of(z.iter().copied());
        let idx = targets.indices_row(i);
        let p = targets.probabilities_row(i);
        // A row without a softmax (NaN, +inf, or only −inf) is NaN whatever its entries.
        let loss = if parts.value().is_finite() {
            -(0..targets.k)
                .filter(|&j| p[j] != 0.0)
                .map(|j| p[j] as f64 * parts.log_prob(z[idx[j] as usize]))
                .sum::<f64>()
        } else {
            f64::NAN
        };
        out.push(loss, parts.value(), true, 0.0);
        if let Some(u) = upstream {
            // The row's probabilities scattered onto its indices (distinct, checked above).
            let mut a = vec![0.0; classes];
            for j in 0..targets.k {
                a[idx[j] as usize] = p[j] as f64;
            }
            let scales = u.scales(spec.reduction(), i, (rows as f64, rows as f64));
            push_row_gradient(&mut grad, spec, (&raw, &z), parts, &a, scales);
        }
    }
    Ok((out.finish(spec.reduction(), classes, rows as f64), grad))
}

/// Cross-entropy against top-k sparse targets with the student's full-vocabulary log-sum-exp,
/// in f64: `l_i = Σ_j p_ij·(lse_i − z_{i,idx_ij})` (the probabilities as given, see
/// [`SparseTargets`]); `mean` is `Σ_i l_i / N`. A pair with `p = 0` contributes 0 even on a
/// masked class; a row with no softmax (a NaN or +inf logit, or only −inf) is NaN. The
/// output's `log_sum_exp` is each row's `lse`; it has no entropy.
///
/// The spec's reduction, soft-cap and z-loss apply as for dense targets ([`crate::cpu::cross_entropy`]:
/// `z` is `cap·tanh(z/cap)` throughout, and every row adds `λ·lse_i²`, every row being
/// counted); top-k targets take no class weights, ignore index or label smoothing.
///
/// Errors: those of [`CrossEntropy::validate_sparse_options`] and [`SparseTargets::validate`].
pub fn sparse_cross_entropy(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: SparseTargets<'_>,
) -> Result<LossOutput> {
    Ok(sparse_impl(spec, logits, targets, None)?.0)
}

/// [`sparse_cross_entropy`] and its gradient with respect to the logits, scaled by
/// `upstream`, as [`crate::cpu::cross_entropy_grad`] with the target weights `a` the scatter of
/// the row's probabilities onto its indices (`B_i = Σ_j p_ij`): without soft-cap or z-loss
/// `∂l_i/∂z_k = s_i·(B_i·softmax(z_i)_k − a_ik)`, `s_i` being `g_i` (none), `g` (sum), `g/N`
/// (mean; `grad/denominator` for [`Upstream::MeanOver`]).
///
/// Errors: those of [`sparse_cross_entropy`]; [`XentError::UpstreamKind`] and
/// [`XentError::UpstreamLength`].
pub fn sparse_cross_entropy_grad(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: SparseTargets<'_>,
    upstream: Upstream<'_>,
) -> Result<(LossOutput, Vec<f64>)> {
    sparse_impl(spec, logits, targets, Some(&upstream))
}

// ---------------------------------------------------------------------------------------------
// Token metrics
// ---------------------------------------------------------------------------------------------

/// How one row's target class scored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetScore {
    /// The target class.
    pub class: usize,
    /// `log softmax(z)_y = z_y − lse(z)`.
    pub log_prob: f64,
    /// How many classes score strictly higher than the target (NaN above everything).
    pub rank: usize,
    /// Whether the target is the row's argmax (the lowest index among tied maxima), as
    /// `argmax(z) == y` in PyTorch.
    pub correct: bool,
    /// Whether `rank < k`: no more than k − 1 classes score strictly higher (a tie at the
    /// boundary counts as a hit, as `torch.topk` may return either).
    pub in_top_k: bool,
}

impl TargetScore {
    /// The score of target `class`, with `rank` classes strictly above it, in a row whose
    /// argmax is `argmax`: correct when they agree, a top-`top_k` hit when `rank < top_k`.
    pub(crate) fn new(
        class: usize,
        log_prob: f64,
        rank: usize,
        argmax: usize,
        top_k: usize,
    ) -> Self {
        TargetScore {
            class,
            log_prob,
            rank,
            correct: argmax == class,
            in_top_k: rank < top_k,
        }
    }
}

/// One row's token metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenRow {
    /// The predicted class: the lowest index of the maximum (as `torch.argmax`); −inf classes
    /// lose to any finite one; a row of only −inf gives 0; in a row with NaN, the first NaN
    /// (NaN ranks above everything, as in `torch.argmax` and `numpy.argmax`).
    pub argmax: usize,
    /// The entropy of the prediction, `−Σ_k q_k log q_k` with `0·log 0 = 0`; NaN for a row of
    /// only −inf or with NaN.
    pub entropy: f64,
    /// `lse(z)`.
    pub log_sum_exp: f64,
    /// How the target scored; `None` for an ignored row.
    pub target: Option<TargetScore>,
}

/// Token metrics reduced over the rows not ignored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricsSummary {
    /// The k of the top-k hits.
    pub top_k: usize,
    /// Rows not ignored.
    pub counted_rows: usize,
    /// Rows ignored.
    pub ignored_rows: usize,
    /// Counted rows whose target is the argmax.
    pub correct: usize,
    /// Counted rows whose target is in the top k.
    pub in_top_k: usize,
    /// `Σ −log_prob` over the counted rows.
    pub nll_sum: f64,
}

impl MetricsSummary {
    /// The summary of no rows, counting top-`top_k` hits.
    pub fn empty(top_k: usize) -> Self {
        MetricsSummary {
            top_k,
            counted_rows: 0,
            ignored_rows: 0,
            correct: 0,
            in_top_k: 0,
            nll_sum: 0.0,
        }
    }

    /// Adds the summary of more rows (a later batch; the same `top_k`).
    pub fn add(&mut self, more: &MetricsSummary) {
        self.counted_rows += more.counted_rows;
        self.ignored_rows += more.ignored_rows;
        self.correct += more.correct;
        self.in_top_k += more.in_top_k;
        self.nll_sum += more.nll_sum;
    }

    /// `correct / counted_rows`; NaN when no row counts.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.counted_rows as f64
    }

    /// `in_top_k / counted_rows`; NaN when no row counts.
    pub fn top_k_accuracy(&self) -> f64 {
        self.in_top_k as f64 / self.counted_rows as f64
    }

    /// The mean negative log-likelihood over the counted rows; NaN when no row counts.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.counted_rows as f64
    }

    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Per-row token metrics and their summary.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenMetrics {
    /// One per row.
    pub rows: Vec<TokenRow>,
    /// Reduced over the rows not ignored.
    pub summary: MetricsSummary,
}

impl TokenMetrics {
    /// The summary of per-row metrics whose top-k hits count `top_k`.
    pub(crate) fn from_rows(rows: Vec<TokenRow>, top_k: usize) -> Self {
        let mut summary = MetricsSummary::empty(top_k);
        for row in &rows {
            match row.target {
                Some(t) => {
                    summary.counted_rows += 1;
                    summary.correct += t.correct as usize;
                    summary.in_top_k += t.in_top_k as usize;
                    summary.nll_sum -= t.log_prob;
                }
                None => summary.ignored_rows += 1,
            }
        }
        TokenMetrics { rows, summary }
    }
}

/// One row's metrics against class `y` (checked to be in range).
fn token_row(z: &[f32], y: Option<usize>, top_k: usize) -> TokenRow {
    let zf: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    let parts = RowLse::of(zf.iter().copied());
    let lse = parts.value();
    let best = argmax(zf.iter().copied());
    // Folded from +0.0 by subtraction, so a one-hot prediction has entropy +0.
    let entropy = zf
        .iter()
        .map(|&v| parts.log_prob(v))
        .filter(|&lq| lq.exp() != 0.0)
        .fold(0.0, |h, lq| h - lq.exp() * lq);
    let target = y.map(|class| {
        let rank = zf.iter().filter(|&&v| ranks_above(v, zf[class])).count();
        TargetScore::new(class, parts.log_prob(zf[class]), rank, best, top_k)
    });
    TokenRow {
        argmax: best,
        entropy,
        log_sum_exp: lse,
        target,
    }
}

/// Checks one class index per row, each in `[0, C)` unless it is `ignore_index`.
fn check_targets(logits: &Logits<'_>, targets: &[i64], ignore_index: Option<i64>) -> Result<()> {
    let (rows, classes) = (logits.rows(), logits.classes());
    if targets.len() != rows {
        return Err(XentError::TargetsShape {
            expected: rows,
            got: targets.len(),
            what: format!("one class index per row, [{rows}]"),
        });
    }
    let bad = targets
        .iter()
        .enumerate()
        .find(|&(_, &v)| ignore_index != Some(v) && !(0..classes as i64).contains(&v));
    if let Some((row, &value)) = bad {
        return Err(XentError::ClassIndexOutOfRange {
            row,
            value,
            classes,
            ignore_index,
        });
    }
    Ok(())
}

/// Token metrics of class-index `targets` under `logits`: per row the argmax, the target's
/// log-probability, rank, correctness and top-`top_k` hit, and the prediction's entropy;
/// reduced over the rows whose target is not `ignore_index`: accuracy, top-k accuracy, mean
/// NLL and perplexity `exp(mean NLL)`.
///
/// A target on a −inf class has log-probability −inf (NLL and perplexity +inf). `top_k = 0`
/// counts no hits.
///
/// Errors: [`XentError::TargetsShape`] unless there is one target per row,
/// [`XentError::ClassIndexOutOfRange`] for a target outside `[0, C)` that is not ignored.
pub fn token_metrics(
    logits: Logits<'_>,
    targets: &[i64],
    ignore_index: Option<i64>,
    top_k: usize,
) -> Result<TokenMetrics> {
    check_targets(&logits, targets, ignore_index)?;
    let rows = (0..logits.rows())
        .map(|i| {
            let y = (ignore_index != Some(targets[i])).then_some(targets[i] as usize);
            token_row(&logits.row(i), y, top_k)
        })
        .collect();
    Ok(TokenMetrics::from_rows(rows, top_k))
}

// ---------------------------------------------------------------------------------------------
// Sequences and multiple choice (lm-evaluation-harness)
// ---------------------------------------------------------------------------------------------

/// One continuation's score, as lm-evaluation-harness's `loglikelihood` request returns it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SequenceScore {
    /// `Σ_t log softmax(z_t)_{y_t}` over the sequence's tokens (0 for no tokens).
    pub loglikelihood: f64,
    /// Whether every token is its row's argmax (lowest index on ties), so greedy decoding
    /// would produce the continuation; true for no tokens.
    pub is_greedy: bool,
    /// The number of tokens (rows).
    pub tokens: usize,
}

impl SequenceScore {
    /// `exp(−loglikelihood / tokens)`; NaN for a sequence of no tokens.
    pub fn perplexity(&self) -> f64 {
        (-self.loglikelihood / self.tokens as f64).exp()
    }
}

/// Scores sequences whose tokens are consecutive rows: sequence `s` is rows
/// `offsets[s]..offsets[s + 1]` of `logits`, each row scored against its `targets` entry (every
/// token counts; there is no ignore index here).
///
/// Errors: [`XentError::SequenceOffsets`] unless `offsets` starts at 0, never decreases and
/// ends at N (so `[0]` is no sequences only when N = 0); [`XentError::TargetsShape`] and
/// [`XentError::ClassIndexOutOfRange`] as [`token_metrics`].
pub fn sequence_scores(
    logits: Logits<'_>,
    targets: &[i64],
    offsets: &[usize],
) -> Result<Vec<SequenceScore>> {
    check_offsets(offsets, logits.rows())?;
    check_targets(&logits, targets, None)?;
    let rows: Vec<TokenRow> = (0..logits.rows())
        .map(|i| token_row(&logits.row(i), Some(targets[i] as usize), 1))
        .collect();
    Ok(sequences_of(&rows, offsets))
}

/// Checks sequence offsets into `rows` rows ([`sequence_scores`]' errors).
pub(crate) fn check_offsets(offsets: &[usize], rows: usize) -> Result<()> {
    match (offsets.first(), offsets.last()) {
        (Some(0), Some(&last)) if last == rows => {}
        (None, _) => {
            return Err(XentError::SequenceOffsets(format!(
                "no offsets given; expected [0, …, {rows}]"
            )));
        }
        (Some(&first), Some(&last)) => {
            return Err(XentError::SequenceOffsets(format!(
                "offsets run from {first} to {last}; they must start at 0 and end at the number of rows, {rows}"
            )));
        }
        (Some(_), None) => unreachable!("a slice with a first element has a last"),
    }
    if let Some(s) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(XentError::SequenceOffsets(format!(
            "offset {} ({}) is below offset {s} ({}); offsets must not decrease",
            s + 1,
            offsets[s + 1],
            offsets[s]
        )));
    }
    Ok(())
}

/// Sequence scores from token metrics computed elsewhere (on the GPU, or in batches): sequence
/// `s` is `rows[offsets[s]..offsets[s + 1]]`. The sums run in row order, so they do not depend
/// on how the rows were cut.
///
/// Errors: [`XentError::SequenceOffsets`] as [`sequence_scores`], and for a row without a
/// target (scored with an ignore index).
pub fn sequences_from_tokens(rows: &[TokenRow], offsets: &[usize]) -> Result<Vec<SequenceScore>> {
    check_offsets(offsets, rows.len())?;
    if let Some(i) = rows.iter().position(|r| r.target.is_none()) {
        return Err(XentError::SequenceOffsets(format!(
            "row {i} has no target (it was ignored); every token of a sequence needs one"
        )));
    }
    Ok(sequences_of(rows, offsets))
}

/// The sequences `offsets[s]..offsets[s + 1]` (checked) of per-token metrics, every row with a
/// target.
pub(crate) fn sequences_of(rows: &[TokenRow], offsets: &[usize]) -> Vec<SequenceScore> {
    offsets
        .windows(2)
        .map(|w| {
            let mut score = SequenceScore {
                loglikelihood: 0.0,
                is_greedy: true,
                tokens: w[1] - w[0],
            };
            for row in &rows[w[0]..w[1]] {
                // A row without a target (none here) leaves the sequence unchanged.
                if let Some(t) = row.target {
                    score.loglikelihood += t.log_prob;
                    score.is_greedy &= t.correct;
                }
            }
            score
        })
        .collect()
}

/// One multiple-choice question's outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuestionOutcome {
    /// The number of choices.
    pub choices: usize,
    /// The gold choice (index among this question's choices, in the order they were given).
    pub gold: usize,
    /// `argmax_c loglikelihood_c` (first on ties, as `numpy.argmax`).
    pub predicted: usize,
    /// `argmax_c loglikelihood_c / length_c` (first on ties; NaN ranks above everything, as
    /// `numpy.argmax`).
    pub predicted_norm: usize,
    /// `predicted == gold`: the harness's `acc`.
    pub acc: bool,
    /// `predicted_norm == gold`: the harness's `acc_norm`.
    pub acc_norm: bool,
}

/// Multiple-choice outcomes per question.
#[derive(Clone, Debug, PartialEq)]
pub struct MultipleChoiceOutput {
    /// One per question, by question id.
    pub questions: Vec<QuestionOutcome>,
}

impl MultipleChoiceOutput {
    /// The mean of `acc` over the questions; NaN for none.
    pub fn acc(&self) -> f64 {
        self.fraction(|q| q.acc)
    }

    /// The mean of `acc_norm` over the questions; NaN for none.
    pub fn acc_norm(&self) -> f64 {
        self.fraction(|q| q.acc_norm)
    }

    fn fraction(&self, hit: impl Fn(&QuestionOutcome) -> bool) -> f64 {
        self.questions.iter().filter(|q| hit(q)).count() as f64 / self.questions.len() as f64
    }
}

/// Multiple choice as lm-evaluation-harness scores it: sequence `s` (a [`SequenceScore`]) is a
/// choice of question `question[s]` (ids `0..gold.len()`; a question's choices are its
/// sequences in the order given) whose continuation is `lengths[s]` characters long; `gold[q]`
/// is question q's correct choice. Per question, `acc` is `argmax loglikelihood == gold` and
/// `acc_norm` is `argmax (loglikelihood / length) == gold`, the argmax taking the first of tied
/// choices (`numpy.argmax`). A length of 0 divides as f64 does (−inf, or NaN for a
/// loglikelihood of 0, which then wins as in numpy).
///
/// Errors: [`XentError::MultipleChoice`] when `question` or `lengths` is not one per sequence,
/// a question id is not below `gold.len()`, a question has no choices, or a gold index is not
/// below its question's number of choices.
pub fn multiple_choice(
    scores: &[SequenceScore],
    question: &[usize],
    lengths: &[usize],
    gold: &[usize],
) -> Result<MultipleChoiceOutput> {
    let n = scores.len();
    for (what, len) in [("question ids", question.len()), ("lengths", lengths.len())] {
        if len != n {
            return Err(XentError::MultipleChoice(format!(
                "{len} {what} for {n} sequences; give one per sequence"
            )));
        }
    }
    let mut choices: Vec<Vec<usize>> = vec![Vec::new(); gold.len()];
    for (s, &q) in question.iter().enumerate() {
        match choices.get_mut(q) {
            Some(c) => c.push(s),
            None => {
                return Err(XentError::MultipleChoice(format!(
                    "sequence {s} belongs to question {q}, but there are {} questions (one gold index each)",
                    gold.len()
                )));
            }
        }
    }
    let questions = choices
        .iter()
        .zip(gold)
        .enumerate()
        .map(|(q, (seqs, &gold))| {
            if seqs.is_empty() {
                return Err(XentError::MultipleChoice(format!(
                    "question {q} has no choices"
                )));
            }
            if gold >= seqs.len() {
                return Err(XentError::MultipleChoice(format!(
                    "question {q}'s gold choice is {gold}, but it has {} choices",
                    seqs.len()
                )));
            }
            let predicted = argmax(seqs.iter().map(|&s| scores[s].loglikelihood));
            let predicted_norm = argmax(
                seqs.iter()
                    .map(|&s| scores[s].loglikelihood / lengths[s] as f64),
            );
            Ok(QuestionOutcome {
                choices: seqs.len(),
                gold,
                predicted,
                predicted_norm,
                acc: predicted == gold,
                acc_norm: predicted_norm == gold,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MultipleChoiceOutput { questions })
}
