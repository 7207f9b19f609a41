//! The gradient of the loss with respect to the logits in the f64 CPU reference
//! (`cpu::cross_entropy_grad`), the z-loss and logit soft-capping:
//! - against PyTorch's gradients in tests/golden/ (mean; sum and none through the scaling
//!   identities);
//! - against central finite differences of the CPU loss itself, for every reduction and option;
//! - the z-loss against its direct formula, and its mean over the rows not ignored;
//! - stability (±1e4 logits, an offset of 2^20, −inf masks) and the error cases.

mod common;

use common::{GoldenCase, GoldenInputs, golden_cases, max_abs_per_row, ulp_f32};
use xent::{CrossEntropy, Logits, LossOutput, Reduction, Targets, Upstream, XentError, cpu};

const EPS: f64 = f64::EPSILON;
const REDUCTIONS: [Reduction; 3] = [Reduction::None, Reduction::Sum, Reduction::Mean];

/// Inputs of one problem, owned.
#[derive(Clone)]
struct Case {
    rows: usize,
    classes: usize,
    logits: Vec<f32>,
    labels: Vec<i64>,
    probabilities: Vec<f32>,
    soft: bool,
    spec: CrossEntropy,
}

impl Case {
    fn golden(case: &GoldenCase) -> Self {
        let inputs = GoldenInputs::load(case);
        Self {
            rows: case.rows(),
            classes: case.classes(),
            logits: inputs.logits,
            labels: inputs.classes_idx,
            probabilities: inputs.probabilities,
            soft: inputs.soft,
            spec: inputs.spec,
        }
    }

    fn logits(&self) -> Logits<'_> {
        Logits::new(&self.logits, self.rows, self.classes).unwrap()
    }

    fn targets(&self) -> Targets<'_> {
        if self.soft {
            Targets::probabilities(&self.probabilities)
        } else {
            Targets::ClassIndices(&self.labels)
        }
    }

    fn spec(&self, reduction: Reduction) -> CrossEntropy {
        self.spec.clone().with_reduction(reduction)
    }

    fn grad(&self, reduction: Reduction, upstream: Upstream<'_>) -> (LossOutput, Vec<f64>) {
        cpu::cross_entropy_grad(
            &self.spec(reduction),
            self.logits(),
            self.targets(),
            upstream,
        )
        .unwrap()
    }

    fn loss(&self, reduction: Reduction) -> LossOutput {
        cpu::cross_entropy(&self.spec(reduction), self.logits(), self.targets()).unwrap()
    }

    fn ignored(&self, i: usize) -> bool {
        !self.soft && self.spec.is_ignored(self.labels[i])
    }

    /// The effective target weights a_k of row i (all 0 for an ignored row), from DESIGN.md.
    fn a(&self, i: usize) -> Vec<f64> {
        let c = self.classes;
        let eps = self.spec.label_smoothing();
        let w = |k: usize| self.spec.weights().map_or(1.0, |w| w[k] as f64);
        if self.soft {
            let p = &self.probabilities[i * c..(i + 1) * c];
            return (0..c)
                .map(|k| w(k) * ((1.0 - eps) * p[k] as f64 + eps / c as f64))
                .collect();
        }
        if self.ignored(i) {
            return vec![0.0; c];
        }
        let y = self.labels[i] as usize;
        (0..c)
            .map(|k| (1.0 - eps) * w(y) * (k == y) as u8 as f64 + eps / c as f64 * w(k))
            .collect()
    }

    /// B of row i: the total effective target weight (0 for an ignored row).
    fn mass(&self, i: usize) -> f64 {
        self.a(i).iter().sum()
    }

    /// B of every row.
    fn masses(&self) -> Vec<f64> {
        (0..self.rows).map(|i| self.mass(i)).collect()
    }
}

/// Random problem whose logits are multiples of 2^-8 below 2^6 in magnitude, so that every
/// z ± 2^-11 used by the finite differences is exactly an f32 (≤ 17 significant bits).
fn dyadic_case(seed: u64, rows: usize, classes: usize, scale: f32, soft: bool) -> Case {
    assert!(scale < 64.0);
    let mut r = common::Inputs::new(seed);
    let logits = r
        .logits(rows * classes, scale, 0.0)
        .into_iter()
        .map(|v| (v * 256.0).round() / 256.0)
        .collect();
    Case {
        rows,
        classes,
        logits,
        labels: r.classes(rows, classes),
        probabilities: r.probabilities(rows, classes),
        soft,
        spec: CrossEntropy::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// PyTorch golden gradients
// ---------------------------------------------------------------------------------------------

/// The tolerance of our f64 gradient element against PyTorch's, stored as f32.
///
/// PyTorch computed in f64 and the file holds that value rounded to f32: half an f32 ulp of the
/// value (of the larger of the two, which covers a binade boundary; 2^-150 below f32's normal
/// range). Both f64 computations differ only in rounding: q_k = exp(z_k − lse) carries the
/// absolute error of lse, a few f64 ulps of the largest |z| (which is what matters at ±1e4 and
/// at an offset of 1e6), so `|Δq| ≲ 16·eps·(1 + max|z|)·q`, and B·q − a adds a few more
/// roundings: `16·eps·(1 + max|z|)·(1 + B)`, times the reduction's scale.
fn golden_tolerance(got: f64, want: f64, scale: f64, max_abs: f64, mass: f64) -> f64 {
    0.5 * ulp_f32(got.abs().max(want.abs())) + scale * 16.0 * EPS * (1.0 + max_abs) * (1.0 + mass)
}

fn assert_grad_matches(label: &str, case: &Case, got: &[f64], want: &[f64], scale: f64) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let max_abs = max_abs_per_row(&case.logits, case.classes);
    let mass = case.masses();
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let i = j / case.classes;
        let tol = golden_tolerance(g, w, scale, max_abs[i], mass[i]);
        assert!(
            common::close(g, w, tol),
            "{label}: row {i} class {}: {g:e} vs {w:e} (tolerance {tol:e})",
            j % case.classes
        );
    }
}

#[test]
fn mean_gradient_reproduces_pytorch() {
    let cases = golden_cases("cross_entropy");
    assert!(cases.len() >= 20, "golden cases missing");
    for golden in &cases {
        let case = Case::golden(golden);
        let want: Vec<f64> = golden
            .f32s("grad_mean.npy")
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (out, got) = case.grad(Reduction::Mean, Upstream::Scalar(1.0));
        let scale = 1.0 / out.mean_denominator;
        if out.mean_denominator == 0.0 {
            // hard_all_ignored: PyTorch's loss is NaN and its gradient all zeros; ours too, and
            // exactly (+0.0, bit for bit).
            assert!(out.loss.unwrap().is_nan(), "{}", golden.name);
            assert!(want.iter().all(|v| v.to_bits() == 0), "{}", golden.name);
            assert!(got.iter().all(|v| v.to_bits() == 0), "{}", golden.name);
            continue;
        }
        assert_grad_matches(&format!("{} mean", golden.name), &case, &got, &want, scale);
    }
}

#[test]
fn all_ignored_gradient_is_zero_for_every_reduction() {
    let golden = golden_cases("cross_entropy")
        .into_iter()
        .find(|c| c.name == "hard_all_ignored")
        .expect("hard_all_ignored");
    let case = Case::golden(&golden);
    let g = vec![1.5; case.rows];
    for (reduction, upstream) in [
        (Reduction::None, Upstream::PerRow(&g)),
        (Reduction::Sum, Upstream::Scalar(1.0)),
        (Reduction::Mean, Upstream::Scalar(1.0)),
    ] {
        for lambda in [0.0, 0.1] {
            let case = Case {
                spec: case.spec.clone().with_z_loss(lambda),
                ..case.clone()
            };
            let (out, grad) = case.grad(reduction, upstream);
            assert!(
                grad.iter().all(|v| v.to_bits() == 0),
                "{reduction:?} λ={lambda}"
            );
            assert_eq!(out.counted_rows(), 0);
        }
    }
}

/// grad_sum = grad_mean · denominator, against PyTorch's mean gradient and ours; and a scalar
/// upstream g scales the gradient by g.
#[test]
fn sum_gradient_is_the_mean_gradient_times_the_denominator() {
    for golden in golden_cases("cross_entropy") {
        let case = Case::golden(&golden);
        let want: Vec<f64> = golden
            .f32s("grad_mean.npy")
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (out, sum) = case.grad(Reduction::Sum, Upstream::Scalar(1.0));
        let (_, mean) = case.grad(Reduction::Mean, Upstream::Scalar(1.0));
        let den = out.mean_denominator;
        let label = format!("{} sum", golden.name);
        if den == 0.0 {
            assert!(sum.iter().all(|v| v.to_bits() == 0), "{label}");
            continue;
        }
        let scaled: Vec<f64> = want.iter().map(|w| w * den).collect();
        let max_abs = max_abs_per_row(&case.logits, case.classes);
        let mass = case.masses();
        for (j, (&g, &w)) in sum.iter().zip(&scaled).enumerate() {
            let i = j / case.classes;
            // The golden's f32 rounding scales with den; PyTorch's f64 error is at scale 1.
            let tol = den * 0.5 * ulp_f32(w.abs().max(g.abs()) / den)
                + 16.0 * EPS * (1.0 + max_abs[i]) * (1.0 + mass[i]);
            assert!(
                common::close(g, w, tol),
                "{label}: element {j}: {g:e} vs {w:e}"
            );
        }
        // Ours: (g/den)·x·den against g·x: three roundings.
        for (j, (&s, &m)) in sum.iter().zip(&mean).enumerate() {
            let tol = 4.0 * EPS * s.abs() + f64::MIN_POSITIVE;
            assert!(
                common::close(m * den, s, tol),
                "{label}: element {j}: {} vs {s}",
                m * den
            );
        }
        let g = -2.5;
        let (_, scaled) = case.grad(Reduction::Sum, Upstream::Scalar(g));
        for (j, (&s, &x)) in scaled.iter().zip(&sum).enumerate() {
            assert!(
                common::close(s, g * x, 2.0 * EPS * s.abs()),
                "{label}: upstream {g}, element {j}"
            );
        }
    }
}

/// Reduction none with per-row upstream g_i: row i is g_i × the gradient of l_i alone (the
/// row run by itself under sum); with g_i = 1/denominator it is PyTorch's mean gradient.
#[test]
fn none_gradient_is_the_per_row_gradient_times_the_upstream() {
    for golden in golden_cases("cross_entropy") {
        let case = Case::golden(&golden);
        let label = format!("{} none", golden.name);
        let mut r = common::Inputs::new(7);
        let g: Vec<f64> = (0..case.rows)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => -1.25,
                _ => r.logits(1, 3.0, 0.0)[0] as f64,
            })
            .collect();
        let (out, grad) = case.grad(Reduction::None, Upstream::PerRow(&g));
        assert_eq!(out.loss, None);
        let c = case.classes;
        for i in 0..case.rows {
            let row = Case {
                rows: 1,
                logits: case.logits[i * c..(i + 1) * c].to_vec(),
                labels: case.labels.get(i..i + 1).unwrap_or_default().to_vec(),
                probabilities: case
                    .probabilities
                    .get(i * c..(i + 1) * c)
                    .unwrap_or_default()
                    .to_vec(),
                ..case.clone()
            };
            let (_, alone) = row.grad(Reduction::Sum, Upstream::Scalar(1.0));
            for k in 0..c {
                let (got, want) = (grad[i * c + k], g[i] * alone[k]);
                if case.ignored(i) {
                    assert_eq!(got.to_bits(), 0, "{label}: ignored row {i} class {k}");
                }
                // Same computation, then one multiplication by g_i: one rounding.
                assert!(
                    common::close(got, want, EPS * want.abs()),
                    "{label}: row {i} class {k}: {got:e} vs {want:e}"
                );
            }
        }
        if out.mean_denominator == 0.0 {
            continue;
        }
        let want: Vec<f64> = golden
            .f32s("grad_mean.npy")
            .iter()
            .map(|&v| v as f64)
            .collect();
        let g = vec![1.0 / out.mean_denominator; case.rows];
        let (_, grad) = case.grad(Reduction::None, Upstream::PerRow(&g));
        assert_grad_matches(&label, &case, &grad, &want, g[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Finite differences of the CPU loss
// ---------------------------------------------------------------------------------------------

/// The objective the gradient is of: `g·loss` for sum and mean, `Σ_i g_i·l_i` for none.
fn objective(case: &Case, reduction: Reduction, g: &[f64]) -> f64 {
    let out = case.loss(reduction);
    match reduction {
        Reduction::None => out.per_row.iter().zip(g).map(|(l, g)| l * g).sum(),
        _ => g[0] * out.loss.unwrap(),
    }
}

/// Step of the central differences: 2^-10, and 2^-11 for the Richardson step; both exact in
/// f32 around the dyadic logits of `dyadic_case`.
const H: f64 = 1.0 / 1024.0;

/// Checks `cross_entropy_grad` against Richardson-extrapolated central differences of the CPU
/// loss, element by element.
///
/// `R = (4·D(h/2) − D(h))/3` with `D(h) = (L(z+h) − L(z−h))/(2h)` has truncation error
/// `h⁴·|L⁽⁵⁾|/480`; L's fifth derivative along one logit is a polynomial in q (and in 1/cap and
/// λ·lse) bounded here by 32·(B + 2λ(1 + |lse|)) times the scale, so below 1e-13: negligible.
/// The rounding error of one evaluation of L is `δ ≤ 32·eps·S`, S the sum of the magnitudes of
/// the terms L adds up (scaled per-row losses and their B·(1 + |lse| + max|z|) parts); R
/// amplifies it by at most 3/h. So the tolerance is `3·δ/h + 1e-12·|scale|·(B + 2λ(1 + |lse|))`.
/// A wrong scale (say the weighted instead of the unweighted count for the z-loss mean) or a
/// missing chain-rule factor is off by 1e-3 or more.
fn check_against_finite_differences(label: &str, case: &Case) {
    let lambda = case.spec.z_loss();
    for reduction in REDUCTIONS {
        let g: Vec<f64> = match reduction {
            Reduction::None => (0..case.rows).map(|i| 0.75 - 0.5 * i as f64).collect(),
            Reduction::Sum => vec![1.25],
            Reduction::Mean => vec![0.7],
        };
        let upstream = match reduction {
            Reduction::None => Upstream::PerRow(&g),
            _ => Upstream::Scalar(g[0]),
        };
        let (out, grad) = case.grad(reduction, upstream);
        let row_scale = |i: usize| match reduction {
            Reduction::None => g[i].abs(),
            Reduction::Sum => g[0].abs(),
            // The larger of the two means' scales.
            Reduction::Mean => g[0].abs() / out.mean_denominator.min(out.counted_rows() as f64),
        };
        let max_abs = max_abs_per_row(&case.logits, case.classes);
        let magnitude: f64 = (0..case.rows)
            .map(|i| {
                row_scale(i)
                    * (out.per_row[i].abs()
                        + (case.mass(i) + lambda * out.log_sum_exp[i].abs())
                            * (1.0 + out.log_sum_exp[i].abs() + max_abs[i]))
            })
            .sum();
        let delta = 32.0 * EPS * magnitude;
        let mut worst: f64 = 0.0;
        for (j, &got) in grad.iter().enumerate() {
            let i = j / case.classes;
            let at = |h: f64| {
                let mut moved = case.clone();
                let z = case.logits[j] as f64 + h;
                assert_eq!(z as f32 as f64, z, "step not exact in f32");
                moved.logits[j] = z as f32;
                objective(&moved, reduction, &g)
            };
            let d = |h: f64| (at(h) - at(-h)) / (2.0 * h);
            let fd = (4.0 * d(H / 2.0) - d(H)) / 3.0;
            let lse = out.log_sum_exp[i].abs();
            let tol = 3.0 * delta / H
                + 1e-12 * row_scale(i) * (case.mass(i) + 2.0 * lambda * (1.0 + lse));
            worst = worst.max((got - fd).abs() / tol);
            assert!(
                (got - fd).abs() <= tol,
                "{label} {reduction:?}: row {i} class {}: gradient {got:e} vs finite differences {fd:e} (tolerance {tol:e})",
                j % case.classes,
            );
            if case.ignored(i) {
                assert_eq!(got.to_bits(), 0, "{label}: ignored row {i}");
            }
        }
        eprintln!("{label} {reduction:?}: worst error / tolerance {worst:.2e}");
    }
}

/// The option sets the finite differences run: z-loss only, soft-cap only, both (and neither,
/// to anchor the method on the plain loss).
fn training_options() -> Vec<(&'static str, f64, Option<f64>)> {
    vec![
        ("plain", 0.0, None),
        ("z-loss", 0.1, None),
        ("softcap", 0.0, Some(5.0)),
        ("z-loss+softcap", 0.1, Some(5.0)),
        ("z-loss+softcap30", 0.02, Some(30.0)),
    ]
}

fn with_options(spec: CrossEntropy, lambda: f64, cap: Option<f64>) -> CrossEntropy {
    let spec = spec.with_z_loss(lambda);
    match cap {
        Some(cap) => spec.with_softcap(cap),
        None => spec,
    }
}

#[test]
fn class_index_gradient_matches_finite_differences() {
    let weights: Vec<f32> = vec![2.0, 0.25, 1.0, 3.5, 0.5, 1.5, 0.75];
    let specs = [
        ("plain", CrossEntropy::new()),
        ("weights", CrossEntropy::new().with_weights(weights.clone())),
        ("ignore", CrossEntropy::new().with_ignore_index(-100)),
        ("smoothing", CrossEntropy::new().with_label_smoothing(0.2)),
        (
            "weights+ignore+smoothing",
            CrossEntropy::new()
                .with_weights(weights.clone())
                .with_ignore_index(-100)
                .with_label_smoothing(0.1),
        ),
    ];
    for (seed, (name, spec)) in specs.into_iter().enumerate() {
        // Logits up to ±16 against caps of 5 and 30: both the saturated and the linear part.
        let mut case = dyadic_case(seed as u64, 5, 7, 16.0, false);
        if spec.ignore_index().is_some() {
            case.labels[1] = -100;
            case.labels[3] = -100;
        }
        for (option, lambda, cap) in training_options() {
            let case = Case {
                spec: with_options(spec.clone(), lambda, cap),
                ..case.clone()
            };
            check_against_finite_differences(&format!("indices {name} {option}"), &case);
        }
    }
}

#[test]
fn probability_gradient_matches_finite_differences() {
    let weights: Vec<f32> = vec![2.0, 0.25, 1.0, 3.5, 0.5, 1.5];
    let specs = [
        ("plain", CrossEntropy::new()),
        ("smoothing", CrossEntropy::new().with_label_smoothing(0.15)),
        (
            "weights+smoothing",
            CrossEntropy::new()
                .with_weights(weights)
                .with_label_smoothing(0.05),
        ),
    ];
    for (seed, (name, spec)) in specs.into_iter().enumerate() {
        let case = dyadic_case(100 + seed as u64, 4, 6, 16.0, true);
        for (option, lambda, cap) in training_options() {
            let case = Case {
                spec: with_options(spec.clone(), lambda, cap),
                ..case.clone()
            };
            check_against_finite_differences(&format!("probabilities {name} {option}"), &case);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The z-loss and the soft-cap in the loss
// ---------------------------------------------------------------------------------------------

/// `ln Σ exp z'` of a row, written here independently: the naive sum of exp(z' − max).
fn direct_lse(row: &[f32], cap: Option<f64>) -> f64 {
    let z: Vec<f64> = row
        .iter()
        .map(|&v| match cap {
            Some(c) => c * (v as f64 / c).tanh(),
            None => v as f64,
        })
        .collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

#[test]
fn z_loss_is_lambda_lse_squared_and_its_mean_is_over_rows_not_ignored() {
    // Weights far from 1, so Σ w_y (the CE denominator) and the count of rows not ignored differ.
    let weights: Vec<f32> = vec![4.0, 0.25, 3.0, 0.5, 2.5];
    let lambda = 0.03;
    for cap in [None, Some(4.0)] {
        let mut case = dyadic_case(11, 8, 5, 6.0, false);
        case.labels[2] = -1;
        case.labels[5] = -1;
        let base = CrossEntropy::new()
            .with_weights(weights.clone())
            .with_ignore_index(-1)
            .with_label_smoothing(0.1);
        let base = with_options(base, 0.0, cap);
        let plain = Case {
            spec: base.clone(),
            ..case.clone()
        };
        let with_z = Case {
            spec: base.with_z_loss(lambda),
            ..case.clone()
        };
        for reduction in REDUCTIONS {
            let out = with_z.loss(reduction);
            let without = plain.loss(reduction);
            assert!(without.z_loss.is_none() && without.z_loss_sum.is_none());
            let z = out.z_loss.as_ref().expect("z-loss reported");
            let mut want_sum = 0.0;
            for (i, &z_i) in z.iter().enumerate() {
                let lse = direct_lse(&case.logits[i * 5..(i + 1) * 5], cap);
                let want = if with_z.ignored(i) {
                    0.0
                } else {
                    lambda * lse * lse
                };
                want_sum += want;
                // lse to a few ulps (different summation), squared: relative 1e-14.
                let tol = 1e-14 * lambda * (1.0 + lse * lse);
                assert!(common::close(z_i, want, tol), "row {i}: {z_i} vs {want}");
                let tol = 1e-14 * lse.abs().max(1.0);
                assert!(common::close(out.log_sum_exp[i], lse, tol), "row {i}");
                // per_row includes it.
                let added = out.per_row[i] - without.per_row[i];
                assert!(
                    common::close(added, want, 1e-13 * out.per_row[i].abs()),
                    "row {i}"
                );
            }
            let z_sum = out.z_loss_sum.unwrap();
            assert!(common::close(z_sum, want_sum, 1e-14 * want_sum));
            assert_eq!(out.counted_rows(), case.rows - 2);
            let counted = (case.rows - 2) as f64;
            match reduction {
                Reduction::None => {
                    assert_eq!(out.loss, None);
                    assert_eq!(out.reduced_z_loss(), None);
                }
                Reduction::Sum => {
                    assert_eq!(out.reduced_z_loss(), Some(z_sum));
                    let want = without.loss.unwrap() + want_sum;
                    assert!(common::close(out.loss.unwrap(), want, 1e-13 * want));
                }
                Reduction::Mean => {
                    assert_eq!(out.reduced_z_loss(), Some(z_sum / counted));
                    let den = out.mean_denominator;
                    assert_eq!(den, without.mean_denominator);
                    let want = without.loss.unwrap() + want_sum / counted;
                    let weighted = without.loss.unwrap() + want_sum / den;
                    // The two candidates differ by far more than the tolerance.
                    assert!(
                        (want - weighted).abs() > 1e-3 * want,
                        "weights do not tell apart"
                    );
                    let got = out.loss.unwrap();
                    assert!(common::close(got, want, 1e-13 * want), "{got} vs {want}");
                    assert_eq!(out.mean(), got);
                }
            }
        }
    }
}

#[test]
fn z_loss_counts_every_row_with_probability_targets() {
    let case = dyadic_case(12, 6, 4, 5.0, true);
    let lambda = 0.5;
    let with_z = Case {
        spec: CrossEntropy::new().with_z_loss(lambda),
        ..case.clone()
    };
    let out = with_z.loss(Reduction::Mean);
    let without = case.loss(Reduction::Mean);
    let want_sum: f64 = (0..6)
        .map(|i| lambda * direct_lse(&case.logits[i * 4..(i + 1) * 4], None).powi(2))
        .sum();
    assert_eq!(out.counted_rows(), 6);
    let want = without.loss.unwrap() + want_sum / 6.0;
    assert!(common::close(out.loss.unwrap(), want, 1e-13 * want));
    // The KL divergence leaves the z-loss out.
    let (kl, kl_plain) = (
        out.kl_divergence().unwrap(),
        without.kl_divergence().unwrap(),
    );
    for i in 0..6 {
        assert!(common::close(kl[i], kl_plain[i], 1e-12 * out.per_row[i]));
    }
}

#[test]
fn softcap_caps_the_logits_and_keeps_minus_infinity_finite() {
    let cap = 30.0;
    let logits = [
        100.0_f32,
        -100.0,
        f32::NEG_INFINITY,
        0.5, // row 0
        3.0,
        -2.0,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY, // row 1
    ];
    let labels = [0_i64, 1];
    let spec = CrossEntropy::new()
        .with_softcap(cap)
        .with_reduction(Reduction::None);
    let out = cpu::cross_entropy(
        &spec,
        Logits::new(&logits, 2, 4).unwrap(),
        Targets::ClassIndices(&labels),
    )
    .unwrap();
    for i in 0..2 {
        let row = &logits[i * 4..(i + 1) * 4];
        let lse = direct_lse(row, Some(cap));
        assert!(lse.is_finite());
        // −inf became −cap: exp(−cap − lse) is in the sum.
        assert!(
            common::close(out.log_sum_exp[i], lse, 1e-14 * lse.abs()),
            "row {i}"
        );
        let y = labels[i] as usize;
        let want = lse - cap * (row[y] as f64 / cap).tanh();
        assert!(
            common::close(out.per_row[i], want, 1e-13 * want.abs().max(1.0)),
            "row {i}"
        );
    }
    // Row 0's capped logits: 30·tanh(10/3) ≈ 29.93, so the loss is finite and below 2·cap.
    assert!(out.per_row.iter().all(|l| l.is_finite() && *l < 2.0 * cap));
}

// ---------------------------------------------------------------------------------------------
// Stability
// ---------------------------------------------------------------------------------------------

/// Logits uniform in ±1e4 (one class dominates by hundreds): the gradient is finite and is
/// `s·(B·[k = argmax] − a_k) + s_z·2λ·lse·[k = argmax]` up to exp(−hundreds) and rounding.
#[test]
fn gradient_at_plus_minus_1e4() {
    let (rows, classes) = (6, 50);
    let mut r = common::Inputs::new(21);
    let base = Case {
        rows,
        classes,
        logits: r.logits(rows * classes, 1e4, 0.0),
        labels: r.classes(rows, classes),
        probabilities: r.probabilities(rows, classes),
        soft: false,
        spec: CrossEntropy::new(),
    };
    for soft in [false, true] {
        for lambda in [0.0, 1e-4] {
            let case = Case {
                soft,
                spec: CrossEntropy::new()
                    .with_weights(r.weights(classes))
                    .with_label_smoothing(0.1)
                    .with_z_loss(lambda),
                ..base.clone()
            };
            let (out, grad) = case.grad(Reduction::Mean, Upstream::Scalar(1.0));
            let (s, s_z) = (1.0 / out.mean_denominator, 1.0 / out.counted_rows() as f64);
            for i in 0..rows {
                let row = &case.logits[i * classes..(i + 1) * classes];
                let mut order: Vec<usize> = (0..classes).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let top = order[0];
                // The premise: every other q is below exp(−40) < eps/1e2.
                assert!(
                    row[top] - row[order[1]] > 40.0,
                    "row {i}: top two too close"
                );
                let (a, b, lse) = (case.a(i), case.mass(i), out.log_sum_exp[i]);
                assert!(common::close(lse, row[top] as f64, 1e-12 * lse.abs()));
                for k in 0..classes {
                    let hot = (k == top) as u8 as f64;
                    let want = s * (b * hot - a[k]) + s_z * 2.0 * lambda * lse * hot;
                    let got = grad[i * classes + k];
                    assert!(got.is_finite(), "soft={soft} λ={lambda} row {i} class {k}");
                    // Rounding of the few terms, relative to their size.
                    let tol = 8.0 * EPS * (s * (b + a[k]) + s_z * 2.0 * lambda * lse.abs());
                    assert!(
                        common::close(got, want, tol),
                        "soft={soft} λ={lambda} row {i} class {k}: {got:e} vs {want:e}"
                    );
                }
            }
        }
    }
}

/// An offset of 2^20 (≈ 1e6) on every logit leaves the cross-entropy gradient unchanged up to
/// f64 rounding: the logits are multiples of 1/8 (f32's ulp at 2^20) so z + 2^20 is exact in f32; z − max is then
/// exact in f64 and Σ exp is the same, so only lse = max + ln Σ rounds differently (half an
/// f64 ulp of 2^20, 2^-33), and z − lse once more: q is off by at most 2·2^-32 relative, and
/// B·q − a by `B·q·2^-31 + 4·eps·(1 + B)`, times the scale. (No z-loss or soft-cap here: neither
/// is shift-invariant.)
#[test]
fn gradient_is_invariant_under_an_offset_of_2_pow_20() {
    let offset = (1u32 << 20) as f32;
    for soft in [false, true] {
        let mut case = dyadic_case(31, 7, 300, 8.0, soft);
        for v in case.logits.iter_mut() {
            *v = (*v * 8.0).round() / 8.0;
        }
        case.labels[4] = -100;
        let specs = [
            CrossEntropy::new(),
            CrossEntropy::new()
                .with_weights(common::Inputs::new(3).weights(300))
                .with_label_smoothing(0.1),
        ];
        for spec in specs {
            let spec = if soft {
                spec
            } else {
                spec.with_ignore_index(-100)
            };
            let case = Case {
                spec,
                ..case.clone()
            };
            let shifted = Case {
                logits: case.logits.iter().map(|v| v + offset).collect(),
                ..case.clone()
            };
            assert!(
                shifted
                    .logits
                    .iter()
                    .zip(&case.logits)
                    .all(|(s, z)| (s - offset) == *z),
                "offset not exact"
            );
            let g: Vec<f64> = (0..case.rows).map(|i| 1.0 + i as f64).collect();
            for reduction in REDUCTIONS {
                let upstream = match reduction {
                    Reduction::None => Upstream::PerRow(&g),
                    _ => Upstream::Scalar(1.0),
                };
                let (out, want) = case.grad(reduction, upstream);
                let (_, got) = shifted.grad(reduction, upstream);
                let c = case.classes;
                for (j, (&x, &y)) in got.iter().zip(&want).enumerate() {
                    let i = j / c;
                    let s = match reduction {
                        Reduction::None => g[i],
                        Reduction::Sum => 1.0,
                        Reduction::Mean => 1.0 / out.mean_denominator,
                    };
                    let (b, a) = (case.mass(i), case.a(i)[j % c]);
                    let q = (y / s + a) / b.max(f64::MIN_POSITIVE);
                    let tol = s * (b * q.abs() * 2f64.powi(-31) + 4.0 * EPS * (1.0 + b));
                    assert!(
                        common::close(x, y, tol),
                        "soft={soft} {reduction:?} row {i} class {}: {x:e} vs {y:e}",
                        j % c
                    );
                }
            }
        }
    }
}

/// A −inf logit (a masked class): without a soft-cap its gradient is exactly 0 (q = 0, a = 0),
/// z-loss or not, for every reduction; with a soft-cap too (dz'/dz = 0 at −inf), even with
/// smoothing mass on the masked class.
#[test]
fn masked_classes_get_exactly_zero_gradient() {
    let (rows, classes) = (5, 9);
    let mut case = dyadic_case(41, rows, classes, 6.0, false);
    for i in 0..rows {
        for k in (0..classes).step_by(3) {
            case.logits[i * classes + k] = f32::NEG_INFINITY;
        }
        case.labels[i] = [1, 2, 4, 5, 7][i];
    }
    let masked = |j: usize| (j % classes).is_multiple_of(3);
    let g: Vec<f64> = vec![0.5, -1.0, 2.0, 1.0, 3.0];
    let weights = common::Inputs::new(5).weights(classes);
    for (name, spec) in [
        ("plain", CrossEntropy::new()),
        ("weights", CrossEntropy::new().with_weights(weights.clone())),
        ("z-loss", CrossEntropy::new().with_z_loss(0.1)),
        (
            "softcap+smoothing",
            CrossEntropy::new()
                .with_softcap(3.0)
                .with_label_smoothing(0.2),
        ),
        (
            "softcap+z-loss+smoothing+weights",
            CrossEntropy::new()
                .with_softcap(30.0)
                .with_z_loss(0.1)
                .with_label_smoothing(0.2)
                .with_weights(weights.clone()),
        ),
    ] {
        let case = Case {
            spec,
            ..case.clone()
        };
        for reduction in REDUCTIONS {
            let upstream = match reduction {
                Reduction::None => Upstream::PerRow(&g),
                _ => Upstream::Scalar(1.0),
            };
            let (out, grad) = case.grad(reduction, upstream);
            assert!(
                out.per_row.iter().all(|l| l.is_finite()),
                "{name}: loss finite"
            );
            for (j, &d) in grad.iter().enumerate() {
                if masked(j) {
                    assert_eq!(d, 0.0, "{name} {reduction:?}: masked element {j}");
                } else {
                    assert!(
                        d.is_finite() && d != 0.0,
                        "{name} {reduction:?}: element {j} = {d}"
                    );
                }
            }
        }
    }
    // Smoothing without a soft-cap puts mass a_k = ε/C on −inf: the loss is +inf (as PyTorch),
    // and the gradient there is what the formula gives, B·0 − a_k = −s·ε/C.
    let smoothing = Case {
        spec: CrossEntropy::new().with_label_smoothing(0.2),
        ..case.clone()
    };
    let (out, grad) = smoothing.grad(Reduction::Sum, Upstream::Scalar(1.0));
    assert!(out.per_row.iter().all(|l| *l == f64::INFINITY));
    for (j, &d) in grad.iter().enumerate() {
        if masked(j) {
            assert_eq!(d, -0.2 / classes as f64, "element {j}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

const LOGITS: [f32; 12] = [0.5, -1.0, 2.0, 0.0, 0.1, 0.2, 3.0, 1.0, -2.0, 0.7, 0.7, 0.7];
const LABELS: [i64; 4] = [2, 0, 1, 1];

fn err(spec: CrossEntropy, upstream: Upstream<'_>) -> XentError {
    let logits = Logits::new(&LOGITS, 4, 3).unwrap();
    cpu::cross_entropy_grad(&spec, logits, Targets::ClassIndices(&LABELS), upstream)
        .expect_err("accepted bad input")
}

#[test]
fn bad_z_loss_is_an_error() {
    for lambda in [-0.1, f64::NAN, f64::INFINITY, -0.0 - 1e-300] {
        let spec = CrossEntropy::new().with_z_loss(lambda);
        let e = err(spec.clone(), Upstream::Scalar(1.0));
        assert!(
            matches!(e, XentError::ZLoss(v) if v.to_bits() == lambda.to_bits()),
            "{e}"
        );
        assert!(e.to_string().contains("z-loss"), "{e}");
        let logits = Logits::new(&LOGITS, 4, 3).unwrap();
        let e = cpu::cross_entropy(&spec, logits, Targets::ClassIndices(&LABELS)).unwrap_err();
        assert!(matches!(e, XentError::ZLoss(_)), "{e}");
    }
    // 0 is "off", and valid.
    let logits = Logits::new(&LOGITS, 4, 3).unwrap();
    let out = cpu::cross_entropy(
        &CrossEntropy::new().with_z_loss(0.0),
        logits,
        Targets::ClassIndices(&LABELS),
    );
    assert!(out.unwrap().z_loss.is_none());
}

#[test]
fn bad_softcap_is_an_error() {
    for cap in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = err(CrossEntropy::new().with_softcap(cap), Upstream::Scalar(1.0));
        assert!(
            matches!(e, XentError::Softcap(v) if v.to_bits() == cap.to_bits()),
            "{e}"
        );
        assert!(e.to_string().contains("soft-cap"), "{e}");
    }
}

#[test]
fn upstream_of_the_wrong_kind_or_length_is_an_error() {
    let g3 = [1.0; 3];
    let g4 = [1.0; 4];
    let e = err(
        CrossEntropy::new().with_reduction(Reduction::None),
        Upstream::Scalar(1.0),
    );
    assert!(
        matches!(
            e,
            XentError::UpstreamKind {
                reduction: "none",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("one value per row"), "{e}");
    for reduction in [Reduction::Sum, Reduction::Mean] {
        let e = err(
            CrossEntropy::new().with_reduction(reduction),
            Upstream::PerRow(&g4),
        );
        assert!(matches!(e, XentError::UpstreamKind { .. }), "{e}");
        assert!(e.to_string().contains("takes a scalar"), "{e}");
    }
    let e = err(
        CrossEntropy::new().with_reduction(Reduction::None),
        Upstream::PerRow(&g3),
    );
    assert!(
        matches!(
            e,
            XentError::UpstreamLength {
                expected: 4,
                got: 3
            }
        ),
        "{e}"
    );
    // Bad inputs are reported before the upstream.
    let logits = Logits::new(&LOGITS, 4, 3).unwrap();
    let e = cpu::cross_entropy_grad(
        &CrossEntropy::new(),
        logits,
        Targets::ClassIndices(&[2, 0, 7, 1]),
        Upstream::PerRow(&g3),
    )
    .unwrap_err();
    assert!(
        matches!(e, XentError::ClassIndexOutOfRange { row: 2, .. }),
        "{e}"
    );
    // And the right kinds work.
    let logits = Logits::new(&LOGITS, 4, 3).unwrap();
    let spec = CrossEntropy::new().with_reduction(Reduction::None);
    let (out, grad) = cpu::cross_entropy_grad(
        &spec,
        logits,
        Targets::ClassIndices(&LABELS),
        Upstream::PerRow(&g4),
    )
    .unwrap();
    assert_eq!((out.rows, grad.len()), (4, 12));
}

#[test]
fn empty_batch_has_an_empty_gradient() {
    let logits = Logits::new::<f32>(&[], 0, 3).unwrap();
    for (reduction, upstream) in [
        (Reduction::None, Upstream::PerRow(&[])),
        (Reduction::Sum, Upstream::Scalar(1.0)),
        (Reduction::Mean, Upstream::Scalar(1.0)),
    ] {
        let spec = CrossEntropy::new()
            .with_reduction(reduction)
            .with_z_loss(0.1);
        let (out, grad) =
            cpu::cross_entropy_grad(&spec, logits, Targets::ClassIndices(&[]), upstream).unwrap();
        assert!(grad.is_empty());
        assert_eq!(out.z_loss_sum, Some(0.0));
        if reduction == Reduction::Mean {
            assert!(out.loss.unwrap().is_nan());
        }
    }
}

/// Rows far from 0: each log-probability is (z − m) − ln s, which keeps every digit, where
/// z − (m + ln s) would lose those the max's ulp takes (0.125 at 1e15, 256 at 2^60). A row of
/// C equal logits has log-softmax −ln C, loss ln C with any smoothing and gradient
/// 1/C − ((1 − ε)·[k = y] + ε/C), wherever it sits.
#[test]
fn rows_far_from_zero_keep_their_digits() {
    let classes = 5;
    let eps = 0.1;
    let spec = CrossEntropy::new()
        .with_reduction(Reduction::None)
        .with_label_smoothing(eps);
    let c = classes as f64;
    for offset in [1e15_f32, -1e15, 1e18, 2f32.powi(60), 3.0] {
        let logits = vec![offset; 2 * classes];
        let labels = [1_i64, 4];
        let z = Logits::new(&logits, 2, classes).unwrap();
        let (out, grad) = cpu::cross_entropy_grad(
            &spec,
            z,
            Targets::ClassIndices(&labels),
            Upstream::PerRow(&[1.0, 1.0]),
        )
        .unwrap();
        for (i, &loss) in out.per_row.iter().enumerate() {
            assert!(
                (loss - c.ln()).abs() <= 4.0 * EPS,
                "{offset:e} row {i}: {loss}"
            );
        }
        for (j, &lp) in cpu::log_softmax(z).iter().enumerate() {
            assert!(
                (lp + c.ln()).abs() <= 4.0 * EPS,
                "{offset:e} element {j}: {lp}"
            );
        }
        for (j, &g) in grad.iter().enumerate() {
            let hot = (j % classes) as i64 == labels[j / classes];
            let want = 1.0 / c - ((1.0 - eps) * hot as u8 as f64 + eps / c);
            assert!(
                (g - want).abs() <= 4.0 * EPS,
                "{offset:e} gradient {j}: {g} vs {want}"
            );
        }
    }
}
