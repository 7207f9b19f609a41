//! The CPU reference: plain f64 loops written from the formulas (DESIGN.md), not from the
//! shaders, so that a mistake in one cannot hide in the other. It is the specification the GPU
//! is tested against, and a complete scorer for machines without a GPU.

use crate::Scorer;
use crate::error::Result;
use crate::logits::Logits;
use crate::output::LossOutput;
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
    let m = z
        .iter()
        .map(|&v| v as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// Per-row log-sum-exp.
pub fn log_sum_exp(logits: Logits<'_>) -> Vec<f64> {
    (0..logits.rows())
        .map(|i| log_sum_exp_row(logits.row(i)))
        .collect()
}

/// `log_softmax(z)_k = z_k − lse(z)`, row-major like the logits.
pub fn log_softmax(logits: Logits<'_>) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.values().len());
    for i in 0..logits.rows() {
        let z = logits.row(i);
        let lse = log_sum_exp_row(z);
        out.extend(z.iter().map(|&v| v as f64 - lse));
    }
    out
}

/// `torch.nn.functional.cross_entropy` in f64.
///
/// Class index `y`, weights `w` (default 1), smoothing ε, ignored rows contributing 0:
/// `l = (1−ε)·w_y·(lse − z_y) + (ε/C)·Σ_k w_k·(lse − z_k)`, mean over `Σ w_y`.
/// Probabilities `p`: `l = −Σ_k w_k·((1−ε)·p_k + ε/C)·(z_k − lse)`, mean over `N`.
pub fn cross_entropy(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: Targets<'_>,
) -> Result<LossOutput> {
    spec.validate(&logits, &targets)?;
    let classes = logits.classes();
    let eps = spec.label_smoothing();
    let per_class = eps / classes as f64;
    let weight = |k: usize| spec.weights().map_or(1.0, |w| w[k] as f64);

    let lse = log_sum_exp(logits);
    let mut per_row = Vec::with_capacity(logits.rows());
    let mut denominator = 0.0;
    let mut ignored = 0;
    let mut entropy = match targets {
        Targets::Probabilities(_) if spec.weights().is_none() => Some(Vec::new()),
        _ => None,
    };

    for (i, &lse_i) in lse.iter().enumerate() {
        let z = logits.row(i);
        let loss = match targets {
            Targets::ClassIndices(y) if spec.is_ignored(y[i]) => {
                ignored += 1;
                0.0
            }
            Targets::ClassIndices(y) => {
                let yi = y[i] as usize;
                denominator += weight(yi);
                let nll = weight(yi) * (lse_i - z[yi] as f64);
                // PyTorch adds the smoothing term only when ε > 0 (so 0·inf never arises).
                let smooth: f64 = if eps > 0.0 {
                    (0..classes)
                        .map(|k| weight(k) * (lse_i - z[k] as f64))
                        .sum()
                } else {
                    0.0
                };
                (1.0 - eps) * nll + per_class * smooth
            }
            Targets::Probabilities(_) => {
                denominator += 1.0;
                let p = targets.probabilities_row(&logits, i).unwrap_or_default();
                let smoothed = |k: usize| (1.0 - eps) * p[k] as f64 + per_class;
                if let Some(h) = entropy.as_mut() {
                    h.push(
                        -(0..classes)
                            .map(smoothed)
                            .filter(|&t| t > 0.0 || t.is_nan())
                            .map(|t| t * t.ln())
                            .sum::<f64>(),
                    );
                }
                -(0..classes)
                    .map(|k| weight(k) * smoothed(k) * (z[k] as f64 - lse_i))
                    .sum::<f64>()
            }
        };
        per_row.push(loss);
    }
    Ok(LossOutput::from_parts(
        spec.reduction(),
        classes,
        denominator,
        per_row,
        lse,
        entropy,
        ignored,
    ))
}
