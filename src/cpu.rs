//! The CPU reference: plain f64 loops written from the formulas (DESIGN.md), not from the
//! shaders, so that a mistake in one cannot hide in the other. It is the specification the GPU
//! is tested against, and a complete scorer for machines without a GPU.

use crate::Scorer;
use crate::error::Result;
use crate::grad::Upstream;
use crate::logits::Logits;
use crate::output::{LossOutput, RowOutputs};
use crate::spec::CrossEntropy;
use crate::targets::Targets;

/// The CPU reference as a [`Scorer`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuReference;

impl Scorer for CpuReference {
    fn cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        cross_entropy(spec, logits, targets)
    }

    fn log_sum_exp(&self, logits: Logits<'_>) -> Result<Vec<f64>> {
        Ok(log_sum_exp(logits))
    }

    fn describe(&self) -> String {
        "CPU reference (f64)".to_string()
    }
}

/// `log Σ_k exp z_k`, with `max` subtracted first. A row of only −inf gives −inf (as
/// `torch.logsumexp`); NaN or +inf in the row gives NaN.
pub fn log_sum_exp_row(z: &[f32]) -> f64 {
    log_sum_exp_f64(z.iter().map(|&v| v as f64))
}

/// [`log_sum_exp_row`] of values already in f64.
pub(crate) fn log_sum_exp_f64(z: impl Iterator<Item = f64> + Clone) -> f64 {
    RowLse::of(z).value()
}

/// A row's log-sum-exp kept as its two parts, the max `m` and `ln s` with
/// `s = Σ_k exp(z_k − m)`, so that a log-probability is `(z_k − m) − ln s`: exact where
/// `z_k − (m + ln s)` would lose the low bits of a large max (an f64 near 1e15 has an ulp of
/// 0.125, as much as a loss's digits).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowLse {
    m: f64,
    ln_s: f64,
}

impl RowLse {
    /// NaN anywhere gives NaN (`f64::max` alone would skip it, and a row of only NaN would
    /// come out −inf); a row of only −inf has `m = −inf` and `ln s = 0`.
    pub(crate) fn of(z: impl Iterator<Item = f64> + Clone) -> RowLse {
        if z.clone().any(|v| v.is_nan()) {
            return RowLse {
                m: f64::NAN,
                ln_s: f64::NAN,
            };
        }
        let m = z.clone().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return RowLse { m, ln_s: 0.0 };
        }
        RowLse {
            m,
            ln_s: z.map(|v| (v - m).exp()).sum::<f64>().ln(),
        }
    }

    /// The log-sum-exp `m + ln s`.
    pub(crate) fn value(self) -> f64 {
        self.m + self.ln_s
    }

    /// `log softmax(z)` of a value `z` of the row: `(z − m) − ln s`.
    pub(crate) fn log_prob(self, z: f64) -> f64 {
        (z - self.m) - self.ln_s
    }
}

/// Per-row log-sum-exp.
pub fn log_sum_exp(logits: Logits<'_>) -> Vec<f64> {
    (0..logits.rows())
        .map(|i| log_sum_exp_row(&logits.row(i)))
        .collect()
}

/// `log_softmax(z)_k = z_k − lse(z)`, row-major like the logits.
pub fn log_softmax(logits: Logits<'_>) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.values().len());
    for i in 0..logits.rows() {
        let z = logits.row(i);
        let lse = RowLse::of(z.iter().map(|&v| v as f64));
        out.extend(z.iter().map(|&v| lse.log_prob(v as f64)));
    }
    out
}

/// A row of logits as the loss sees it: widened to f64 and, with a soft-cap, mapped through
/// `z' = cap·tanh(z/cap)` (so −inf becomes −cap).
pub(crate) fn effective_row(spec: &CrossEntropy, z: &[f32]) -> Vec<f64> {
    z.iter().map(|&v| spec.capped(v as f64)).collect()
}

/// `dz'/dz = 1 − tanh²(z/cap)`, computed as `1/cosh²(z/cap)`, which does not cancel where
/// `tanh` is near ±1 and is exactly 0 at ±inf.
fn softcap_slope(z: f32, cap: f64) -> f64 {
    let c = (z as f64 / cap).cosh();
    1.0 / (c * c)
}

/// Appends one counted row's gradient (see [`cross_entropy_grad`]):
/// `(s_ce·(B·q_k − a_k) + s_z·2λ·lse·q_k)·dz'_k/dz_k` for the row's raw logits `raw`, its
/// effective logits `z` ([`effective_row`]) and their log-sum-exp `parts`, its target weights
/// `a` (`B = Σ_k a_k`) and the scales `(s_ce, s_z)`.
pub(crate) fn push_row_gradient(
    grad: &mut Vec<f64>,
    spec: &CrossEntropy,
    (raw, z): (&[f32], &[f64]),
    parts: RowLse,
    a: &[f64],
    (ce_scale, z_scale): (f64, f64),
) {
    let lambda = spec.z_loss();
    let lse = parts.value();
    let b: f64 = a.iter().sum();
    for k in 0..z.len() {
        let q = parts.log_prob(z[k]).exp();
        let mut d = ce_scale * (b * q - a[k]);
        if lambda > 0.0 {
            d += z_scale * 2.0 * lambda * lse * q;
        }
        if let Some(cap) = spec.softcap() {
            d *= softcap_slope(raw[k], cap);
        }
        grad.push(d);
    }
}

/// Row `i`'s effective target weights `a_k` (DESIGN.md, "One pass, one statistic"); `None`
/// for an ignored row.
///
/// Class index `y`: `(1−ε)·w_y·[k=y] + (ε/C)·w_k` (the smoothing part only when ε > 0, as
/// PyTorch); probabilities `p`: `w_k·((1−ε)·p_k + ε/C)`.
fn target_weights(
    spec: &CrossEntropy,
    logits: &Logits<'_>,
    targets: &Targets<'_>,
    i: usize,
) -> Option<Vec<f64>> {
    let classes = logits.classes();
    let eps = spec.label_smoothing();
    let per_class = eps / classes as f64;
    let weight = |k: usize| spec.weights().map_or(1.0, |w| w[k] as f64);
    match *targets {
        Targets::ClassIndices(y) if spec.is_ignored(y[i]) => None,
        Targets::ClassIndices(y) => {
            let mut a: Vec<f64> = if eps > 0.0 {
                (0..classes).map(|k| per_class * weight(k)).collect()
            } else {
                vec![0.0; classes]
            };
            let yi = y[i] as usize;
            a[yi] += (1.0 - eps) * weight(yi);
            Some(a)
        }
        Targets::Probabilities(_) => {
            let p = targets.probabilities_row(logits, i).unwrap_or_default();
            Some(
                (0..classes)
                    .map(|k| weight(k) * ((1.0 - eps) * p[k] as f64 + per_class))
                    .collect(),
            )
        }
    }
}

/// `torch.nn.functional.cross_entropy` in f64.
///
/// Class index `y`, weights `w` (default 1), smoothing ε, ignored rows contributing 0:
/// `l = (1−ε)·w_y·(lse − z_y) + (ε/C)·Σ_k w_k·(lse − z_k)`, mean over `Σ w_y`.
/// Probabilities `p`: `l = −Σ_k w_k·((1−ε)·p_k + ε/C)·(z_k − lse)`, mean over `N`.
///
/// With a soft-cap, `z` is `z' = cap·tanh(z/cap)` throughout (the reported log-sum-exp is
/// that of `z'`). With a z-loss λ > 0, every row not ignored adds `λ·lse²` to `l`; under `mean`
/// that part is averaged over the rows not ignored ([`CrossEntropy::with_z_loss`]).
pub fn cross_entropy(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: Targets<'_>,
) -> Result<LossOutput> {
    Ok(cross_entropy_rows(spec, logits, targets)?.0)
}

/// [`cross_entropy`], and each row's log-sum-exp in its two parts (for the gradient).
fn cross_entropy_rows(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: Targets<'_>,
) -> Result<(LossOutput, Vec<RowLse>)> {
    spec.validate(&logits, &targets)?;
    let mut lses = Vec::with_capacity(logits.rows());
    let classes = logits.classes();
    let eps = spec.label_smoothing();
    let per_class = eps / classes as f64;
    let weight = |k: usize| spec.weights().map_or(1.0, |w| w[k] as f64);
    let with_entropy = targets.is_probabilities() && spec.weights().is_none();
    let mut rows = RowOutputs::new(logits.rows(), with_entropy, spec.z_loss());
    let mut denominator = 0.0;

    for i in 0..logits.rows() {
        let z = effective_row(spec, &logits.row(i));
        let lse = RowLse::of(z.iter().copied());
        let lse_i = lse.value();
        let (loss, counted, h) = match targets {
            Targets::ClassIndices(y) if spec.is_ignored(y[i]) => (0.0, false, 0.0),
            Targets::ClassIndices(y) => {
                let yi = y[i] as usize;
                denominator += weight(yi);
                let nll = -weight(yi) * lse.log_prob(z[yi]);
                // PyTorch adds the smoothing term only when ε > 0 (so 0·inf never arises).
                let smooth: f64 = if eps > 0.0 {
                    -(0..classes)
                        .map(|k| weight(k) * lse.log_prob(z[k]))
                        .sum::<f64>()
                } else {
                    0.0
                };
                ((1.0 - eps) * nll + per_class * smooth, true, 0.0)
            }
            Targets::Probabilities(_) => {
                denominator += 1.0;
                let p = targets.probabilities_row(&logits, i).unwrap_or_default();
                let smoothed = |k: usize| (1.0 - eps) * p[k] as f64 + per_class;
                let loss = -(0..classes)
                    .map(|k| weight(k) * smoothed(k) * lse.log_prob(z[k]))
                    .sum::<f64>();
                (loss, true, target_entropy((0..classes).map(smoothed)))
            }
        };
        rows.push(loss, lse_i, counted, h);
        lses.push(lse);
    }
    Ok((rows.finish(spec.reduction(), classes, denominator), lses))
}

/// `−Σ t·ln t` of target probabilities, with `0·ln 0 = 0` (NaN stays NaN).
pub(crate) fn target_entropy(t: impl Iterator<Item = f64>) -> f64 {
    -t.filter(|&t| t > 0.0 || t.is_nan())
        .map(|t| t * t.ln())
        .sum::<f64>()
}

/// The loss ([`cross_entropy`]) and its gradient with respect to the logits, in f64,
/// row-major like the logits, scaled by the `upstream` gradient as autograd passes it
/// (`Upstream::Scalar(1.0)` gives the gradient of the loss itself).
///
/// Per row `i` not ignored, with `z'` the (soft-capped) logits, `q = softmax(z')`, `a_k` the
/// effective target weights and `B = Σ_k a_k` (DESIGN.md):
///
/// `∂l_i/∂z_k = (s_ce·(B·q_k − a_k) + s_z·2λ·lse_i·q_k) · dz'_k/dz_k`
///
/// where `dz'/dz = 1 − tanh²(z/cap)` with a soft-cap (else 1), and the reduction's scales are
/// `s_ce = s_z = g_i` for `none` (`Upstream::PerRow`), `s_ce = s_z = g` for `sum`,
/// `s_ce = g / Σ_{i not ignored} w_{y_i}` (`g / N` for probabilities) and
/// `s_z = g / n_not_ignored` for `mean`. An ignored row's gradient is exactly 0 (so a batch
/// with every row ignored has a zero gradient under `mean`, as in PyTorch, though its loss is
/// NaN).
///
/// A −inf logit without a soft-cap has `q_k = 0`, so its gradient is exactly 0 when its target
/// weight `a_k` is 0. If `a_k > 0` there (the target, or smoothing mass, on a masked class) the
/// loss is +inf and the gradient there is what the formula gives, `−s_ce·a_k`. With a
/// soft-cap a −inf logit becomes `−cap` and its gradient is exactly 0 (`dz'/dz = 0` there).
///
/// Errors: every error of [`cross_entropy`]; [`crate::XentError::UpstreamKind`] when a
/// per-row upstream is given with `sum`/`mean` or a scalar with `none`;
/// [`crate::XentError::UpstreamLength`] when a per-row upstream does not have N values.
pub fn cross_entropy_grad(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: Targets<'_>,
    upstream: Upstream<'_>,
) -> Result<(LossOutput, Vec<f64>)> {
    spec.validate(&logits, &targets)?;
    upstream.check(spec.reduction(), logits.rows())?;
    let (out, lses) = cross_entropy_rows(spec, logits, targets)?;
    let own = (out.mean_denominator, out.counted_rows() as f64);
    let mut grad = Vec::with_capacity(logits.values().len());
    for (i, parts) in lses.into_iter().enumerate() {
        let Some(a) = target_weights(spec, &logits, &targets, i) else {
            grad.extend(std::iter::repeat_n(0.0, logits.classes()));
            continue;
        };
        let scales = upstream.scales(spec.reduction(), i, own);
        let raw = logits.row(i);
        let z = effective_row(spec, &raw);
        push_row_gradient(&mut grad, spec, (&raw, &z), parts, &a, scales);
    }
    Ok((out, grad))
}
