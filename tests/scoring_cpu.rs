//! The f64 scoring reference (`xent::scoring`, issue 11):
//! - distillation (forward) and top-k sparse targets against PyTorch's golden cases;
//! - reverse KL and generalised JSD against direct formulas written here, their gradients
//!   against central finite differences, and the β = 0 / β = 1 ends;
//! - token metrics (argmax, rank, top-k, entropy, accuracy, perplexity) on hand-made rows;
//! - sequence log-likelihoods and multiple choice on a hand-computed example;
//! - the error cases.

mod common;

use common::{GoldenCase, golden_cases, ulp_f32};
use xent::scoring::{
    self, Distillation, DistillationOutput, DistillationTerms, Divergence, SequenceScore,
    SparseTargets,
};
use xent::{CrossEntropy, Logits, Reduction, Upstream, XentError};

const EPS: f64 = f64::EPSILON;

thread_local! {
    /// The largest |got − want| / tolerance seen by `assert_close` on this test's thread.
    static WORST: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Reports (with --nocapture) and resets the worst error / tolerance so far.
fn report_worst(label: &str) {
    let w = WORST.with(|w| w.replace(0.0));
    eprintln!("{label}: worst error / tolerance {w:.2e}");
}
const REDUCTIONS: [Reduction; 3] = [Reduction::None, Reduction::Sum, Reduction::Mean];

fn max_abs(v: &[f32]) -> f64 {
    v.iter()
        .filter(|x| x.is_finite())
        .fold(0.0_f64, |m, &x| m.max((x as f64).abs()))
}

/// Our f64 value against PyTorch's f64 value computed from the same f32 inputs: both differ
/// only in rounding. A log-softmax `s_k − lse(s)` is off by a few f64 ulps of the largest
/// |s| (the max subtracted inside lse), so every `log p`, `log q` carries an absolute error
/// ≲ 4·eps·(1 + M), M the largest |s| of the two rows; a sum `Σ p·log(…)` of such terms (Σp = 1)
/// adds that once more plus its own rounding, ≲ C·eps relative to `Σ p·|log(…)|`, which is
/// at most about |loss| + (1 + M). 64·eps·(1 + M)·(1 + |ref|) covers both with room (≈ 6e-12
/// for the golden rows, M ≈ 20, loss ≈ 10: 1e-12-ish relative); a missing entropy, a missing
/// 1/T or a wrong normalisation is off by 1e-3 or more.
fn value_tolerance(reference: f64, m: f64) -> f64 {
    64.0 * EPS * (1.0 + m) * (1.0 + reference.abs())
}

/// An f64 gradient element against PyTorch's f64 gradient stored as f32: half an f32 ulp of
/// the larger of the two (the f32 rounding of the file; 2^-150 below the normal range), plus
/// the f64 difference: `B·q − p` with q carrying the relative error of lse's absolute error,
/// ≲ 16·eps·(1 + M)·(1 + B), times the gradient's scale (1/T here, at most 1).
fn grad_tolerance(got: f64, want: f64, m: f64, mass: f64) -> f64 {
    0.5 * ulp_f32(got.abs().max(want.abs())) + 16.0 * EPS * (1.0 + m) * (1.0 + mass)
}

fn assert_close(label: &str, got: f64, want: f64, tol: f64) {
    if want.is_finite() && tol > 0.0 {
        WORST.with(|w| w.set(w.get().max((got - want).abs() / tol)));
    }
    assert!(
        common::close(got, want, tol),
        "{label}: {got:e} vs {want:e} (difference {:e}, tolerance {tol:e})",
        (got - want).abs()
    );
}

// ---------------------------------------------------------------------------------------------
// Distillation: golden (forward)
// ---------------------------------------------------------------------------------------------

struct Distill {
    rows: usize,
    classes: usize,
    student: Vec<f32>,
    teacher: Vec<f32>,
}

impl Distill {
    fn golden(case: &GoldenCase) -> Self {
        Self {
            rows: case.rows(),
            classes: case.classes(),
            student: case.f32s("logits.npy"),
            teacher: case.f32s("teacher.npy"),
        }
    }

    fn student(&self) -> Logits<'_> {
        Logits::new(&self.student, self.rows, self.classes).unwrap()
    }

    /// The largest |logit / T| of row i, student and teacher.
    fn m(&self, i: usize, t: f64) -> f64 {
        let r = i * self.classes..(i + 1) * self.classes;
        max_abs(&self.student[r.clone()]).max(max_abs(&self.teacher[r])) / t
    }

    fn loss(&self, spec: &Distillation) -> DistillationOutput {
        scoring::distillation(spec, self.student(), &self.teacher).unwrap()
    }

    fn grad(&self, spec: &Distillation, upstream: Upstream<'_>) -> (DistillationOutput, Vec<f64>) {
        scoring::distillation_grad(spec, self.student(), &self.teacher, upstream).unwrap()
    }
}

fn forward_terms(out: &DistillationOutput) -> (&[f64], &[f64]) {
    match &out.terms {
        DistillationTerms::CrossEntropy { entropy, kl } => (entropy, kl),
        DistillationTerms::DivergenceOnly => panic!("forward distillation without its terms"),
    }
}

#[test]
fn distillation_reproduces_pytorch_golden_cases() {
    let cases = golden_cases("distillation");
    assert_eq!(cases.len(), 3, "distill_T1, distill_T2, distill_T4");
    for case in &cases {
        let d = Distill::golden(case);
        let t = case.number("temperature");
        let spec = Distillation::new()
            .with_temperature(t)
            .with_reduction(Reduction::Sum);
        let (out, grad) = d.grad(&spec, Upstream::Scalar(1.0));
        let (entropy, kl) = forward_terms(&out);
        for (name, got, want) in [
            ("loss", &out.per_row[..], case.f64s("loss_none.npy")),
            ("kl", kl, case.f64s("kl_none.npy")),
            ("entropy", entropy, case.f64s("entropy_none.npy")),
        ] {
            assert_eq!(got.len(), d.rows);
            let reference = case.f64s("loss_none.npy");
            for i in 0..d.rows {
                let tol = value_tolerance(reference[i], d.m(i, t));
                assert_close(
                    &format!("{} {name} row {i}", case.name),
                    got[i],
                    want[i],
                    tol,
                );
            }
        }
        // Reduced values: N rows of the row tolerance.
        let n = d.rows as f64;
        let tol = n * value_tolerance(case.number("mean"), 2.0 * max_abs(&d.student) / t);
        assert_close("sum", out.loss.unwrap(), case.number("sum"), tol);
        let mean = d.loss(&spec.with_reduction(Reduction::Mean));
        assert_close("mean", mean.loss.unwrap(), case.number("mean"), tol / n);
        assert_close(
            "kl mean",
            mean.reduced_kl().unwrap(),
            case.number("kl_mean"),
            tol / n,
        );
        assert_close(
            "entropy mean",
            mean.reduced_entropy().unwrap(),
            case.number("entropy_mean"),
            tol / n,
        );

        report_worst(&format!("{} values", case.name));
        let want = case.f32s("grad_sum.npy");
        assert_eq!(grad.len(), want.len());
        for (j, (&g, &w)) in grad.iter().zip(&want).enumerate() {
            let i = j / d.classes;
            let tol = grad_tolerance(g, w as f64, d.m(i, t), 1.0);
            assert_close(
                &format!("{} gradient row {i} class {}", case.name, j % d.classes),
                g,
                w as f64,
                tol,
            );
        }
        report_worst(&format!("{} gradient", case.name));
    }
}

#[test]
fn t2_scale_multiplies_the_loss_its_terms_and_the_gradient_by_t_squared() {
    let case = &golden_cases("distillation")[2];
    let d = Distill::golden(case);
    let t = case.number("temperature");
    assert_eq!(t, 4.0);
    let spec = Distillation::new()
        .with_temperature(t)
        .with_reduction(Reduction::Sum);
    let (plain, g_plain) = d.grad(&spec, Upstream::Scalar(1.0));
    let (scaled, g_scaled) = d.grad(&spec.with_t2_scale(true), Upstream::Scalar(1.0));
    // ×16 is exact in binary, so the scaled values are bit-identical multiples.
    for i in 0..d.rows {
        assert_eq!(scaled.per_row[i], 16.0 * plain.per_row[i]);
        let ((hs, ks), (hp, kp)) = (forward_terms(&scaled), forward_terms(&plain));
        assert_eq!((hs[i], ks[i]), (16.0 * hp[i], 16.0 * kp[i]));
    }
    for (a, b) in g_scaled.iter().zip(&g_plain) {
        assert_eq!(*a, 16.0 * b);
    }
}

// ---------------------------------------------------------------------------------------------
// Top-k sparse targets: golden
// ---------------------------------------------------------------------------------------------

#[test]
fn sparse_targets_reproduce_pytorch_golden_case() {
    let cases = golden_cases("sparse_targets");
    assert_eq!(cases.len(), 1, "sparse_top8");
    let case = &cases[0];
    let (rows, classes) = (case.rows(), case.classes());
    let k = case.number("k") as usize;
    let z = case.f32s("logits.npy");
    let idx = case.i64s("topk_idx.npy");
    let p = case.f32s("topk_prob.npy");
    let logits = Logits::new(&z, rows, classes).unwrap();
    let targets = SparseTargets::new(&idx, &p, k);
    let (out, grad) = scoring::sparse_cross_entropy_grad(
        &CrossEntropy::new().with_reduction(Reduction::Sum),
        logits,
        targets,
        Upstream::Scalar(1.0),
    )
    .unwrap();
    let want = case.f64s("loss_none.npy");
    let m: Vec<f64> = (0..rows)
        .map(|i| max_abs(&z[i * classes..(i + 1) * classes]))
        .collect();
    // The probabilities are used as given: their sums differ from 1 by f32 rounding, ~1e-7,
    // so renormalising would be off by ~1e-6 of the loss, far beyond the tolerance.
    for i in 0..rows {
        let b: f64 = p[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum();
        let tol = value_tolerance(want[i], m[i]) * (1.0 + b);
        assert_close(&format!("sparse row {i}"), out.per_row[i], want[i], tol);
    }
    let tol = rows as f64 * value_tolerance(case.number("mean"), 2.0 * max_abs(&z));
    assert_close("sum", out.loss.unwrap(), case.number("sum"), tol);
    let mean = scoring::sparse_cross_entropy(
        &CrossEntropy::new().with_reduction(Reduction::Mean),
        logits,
        targets,
    )
    .unwrap();
    assert_close(
        "mean",
        mean.loss.unwrap(),
        case.number("mean"),
        tol / rows as f64,
    );

    report_worst("sparse_top8 values");
    let want = case.f32s("grad_sum.npy");
    for (j, (&g, &w)) in grad.iter().zip(&want).enumerate() {
        let i = j / classes;
        let tol = grad_tolerance(g, w as f64, m[i], 1.0);
        assert_close(
            &format!("sparse gradient row {i} class {}", j % classes),
            g,
            w as f64,
            tol,
        );
    }
    report_worst("sparse_top8 gradient");
}

/// Dense probability targets with zeros outside the top k give the same loss, z-loss and
/// gradient through the cross-entropy reference (whose gradient is checked against finite
/// differences with soft-cap and z-loss in `gradient_cpu.rs`), for every reduction, with and
/// without z-loss and soft-cap.
#[test]
fn sparse_targets_equal_dense_probabilities_and_scale_per_reduction() {
    let (rows, classes, k) = (3, 6, 2);
    let z: Vec<f32> = (0..rows * classes)
        .map(|v| (v as f32 * 0.37).sin() * 4.0)
        .collect();
    let idx = [4_i64, 1, 0, 5, 2, 3];
    let p = [0.75_f32, 0.25, 0.5, 0.5, 1.0, 0.125];
    let mut dense = vec![0.0_f32; rows * classes];
    for i in 0..rows {
        for j in 0..k {
            dense[i * classes + idx[i * k + j] as usize] = p[i * k + j];
        }
    }
    let logits = Logits::new(&z, rows, classes).unwrap();
    let g = [0.5, -1.0, 2.0];
    let options = [
        (0.0, None),
        (0.1, None),
        (0.0, Some(2.5)),
        (0.05, Some(3.0)),
    ];
    for (lambda, cap) in options {
        for reduction in REDUCTIONS {
            let upstream = match reduction {
                Reduction::None => Upstream::PerRow(&g),
                _ => Upstream::Scalar(0.75),
            };
            let mut spec = CrossEntropy::new()
                .with_reduction(reduction)
                .with_z_loss(lambda);
            if let Some(cap) = cap {
                spec = spec.with_softcap(cap);
            }
            let label = format!("λ {lambda} cap {cap:?} {reduction:?}");
            let (sparse, gs) = scoring::sparse_cross_entropy_grad(
                &spec,
                logits,
                SparseTargets::new(&idx, &p, k),
                upstream,
            )
            .unwrap();
            let (dense_out, gd) = xent::cpu::cross_entropy_grad(
                &spec,
                logits,
                xent::Targets::probabilities(&dense),
                upstream,
            )
            .unwrap();
            // Same formulas, different summation order: a few eps of |z| ≤ 4.
            let tol = |b: f64| 64.0 * EPS * 5.0 * (1.0 + b.abs());
            let pairs = sparse.per_row.iter().zip(&dense_out.per_row);
            for (a, b) in pairs.chain(sparse.log_sum_exp.iter().zip(&dense_out.log_sum_exp)) {
                assert_close(
                    &format!("{label}: sparse vs dense per row"),
                    *a,
                    *b,
                    tol(*b),
                );
            }
            assert_eq!(sparse.loss.is_some(), reduction != Reduction::None);
            assert_eq!(sparse.z_loss.is_some(), lambda > 0.0, "{label}");
            let reduced = [
                (sparse.loss, dense_out.loss),
                (sparse.reduced_z_loss(), dense_out.reduced_z_loss()),
                (sparse.z_loss_sum, dense_out.z_loss_sum),
            ];
            for (a, b) in reduced {
                assert_eq!(a.is_some(), b.is_some(), "{label}");
                if let (Some(a), Some(b)) = (a, b) {
                    assert_close(&format!("{label}: sparse vs dense reduced"), a, b, tol(b));
                }
            }
            for (a, b) in gs.iter().zip(&gd) {
                let what = format!("{label}: sparse vs dense gradient");
                assert_close(&what, *a, *b, 64.0 * EPS * 5.0);
            }
            // The z-loss of each row is λ·lse², lse of the capped logits.
            if let Some(zl) = &sparse.z_loss {
                for (z, lse) in zl.iter().zip(&sparse.log_sum_exp) {
                    assert_close(&label, *z, lambda * lse * lse, 4.0 * EPS * z.abs());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reverse KL and JSD: direct formulas, finite differences, the ends
// ---------------------------------------------------------------------------------------------

/// Random rows whose logits are multiples of 2^-8 below 2^5, so every z ± 2^-11 is exact in
/// f32; the teacher's last class is masked (−inf) in row 0 for the student too, to keep the
/// divergences finite while exercising the 0·log 0 = 0 convention.
fn dyadic(seed: u64, rows: usize, classes: usize) -> Distill {
    let mut r = common::Inputs::new(seed);
    let mut dy = |n| -> Vec<f32> {
        r.logits(n, 3.0, 0.0)
            .into_iter()
            .map(|v| (v * 256.0).round() / 256.0)
            .collect()
    };
    let mut student = dy(rows * classes);
    let mut teacher = dy(rows * classes);
    student[classes - 1] = f32::NEG_INFINITY;
    teacher[classes - 1] = f32::NEG_INFINITY;
    Distill {
        rows,
        classes,
        student,
        teacher,
    }
}

/// softmax(z/T) by normalising exponentials (not in log space, unlike the library).
fn softmax(z: &[f32], t: f64) -> Vec<f64> {
    let m = z
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    let e: Vec<f64> = z.iter().map(|&v| (v as f64 / t - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `Σ a·ln(a/b)` over a > 0.
fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .filter(|(x, _)| **x > 0.0)
        .map(|(x, y)| x * (x / y).ln())
        .sum()
}

fn direct_divergence(divergence: Divergence, p: &[f64], q: &[f64]) -> f64 {
    match divergence {
        Divergence::ForwardKl => -p
            .iter()
            .zip(q)
            .filter(|(x, _)| **x > 0.0)
            .map(|(x, y)| x * y.ln())
            .sum::<f64>(),
        Divergence::ReverseKl => kl(q, p),
        Divergence::Jsd { beta } => {
            let m: Vec<f64> = p
                .iter()
                .zip(q)
                .map(|(a, b)| beta * a + (1.0 - beta) * b)
                .collect();
            beta * kl(p, &m) + (1.0 - beta) * kl(q, &m)
        }
    }
}

const DIVERGENCES: [Divergence; 5] = [
    Divergence::ForwardKl,
    Divergence::ReverseKl,
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 0.1 },
    Divergence::Jsd { beta: 0.9 },
];

#[test]
fn divergences_match_their_direct_formulas() {
    let d = dyadic(11, 6, 9);
    for t in [1.0, 2.0, 0.5] {
        for divergence in DIVERGENCES {
            let spec = Distillation::new()
                .with_temperature(t)
                .with_divergence(divergence)
                .with_reduction(Reduction::None);
            let out = d.loss(&spec);
            assert!(out.loss.is_none());
            for i in 0..d.rows {
                let r = i * d.classes..(i + 1) * d.classes;
                let p = softmax(&d.teacher[r.clone()], t);
                let q = softmax(&d.student[r], t);
                let want = direct_divergence(divergence, &p, &q);
                // The direct form divides probabilities instead of subtracting logs: each
                // term differs by a few eps relative, plus the log-softmax's absolute error.
                let tol = value_tolerance(want, d.m(i, t));
                assert_close(
                    &format!("{divergence:?} T={t} row {i}"),
                    out.per_row[i],
                    want,
                    tol,
                );
                assert!(want > 0.0 && want.is_finite());
            }
        }
    }
}

#[test]
fn jsd_ends_are_forward_and_reverse_kl_and_its_limits_agree() {
    let d = dyadic(12, 5, 7);
    let spec = Distillation::new()
        .with_temperature(2.0)
        .with_reduction(Reduction::None);
    let forward = d.loss(&spec);
    let reverse = d.loss(&spec.with_divergence(Divergence::ReverseKl));
    let jsd0 = d.loss(&spec.with_divergence(Divergence::Jsd { beta: 0.0 }));
    let jsd1 = d.loss(&spec.with_divergence(Divergence::Jsd { beta: 1.0 }));
    assert_eq!(jsd0.terms, DistillationTerms::DivergenceOnly);
    let (_, forward_kl) = forward_terms(&forward);
    for (i, &forward_kl) in forward_kl.iter().enumerate() {
        let r = i * d.classes..(i + 1) * d.classes;
        let p = softmax(&d.teacher[r.clone()], 2.0);
        let q = softmax(&d.student[r], 2.0);
        let tol = value_tolerance(1.0, d.m(i, 2.0));
        // β = 0: KL(p ‖ q), teacher first; β = 1: KL(q ‖ p), student first.
        assert_close("β=0 is KL(p‖q)", jsd0.per_row[i], kl(&p, &q), tol);
        assert_close("β=0 is the forward KL", jsd0.per_row[i], forward_kl, tol);
        assert_close("β=1 is KL(q‖p)", jsd1.per_row[i], kl(&q, &p), tol);
        assert_close(
            "β=1 is the reverse KL",
            jsd1.per_row[i],
            reverse.per_row[i],
            tol,
        );
    }
    // The ends are the limits of JSD_β/β (β → 0) and JSD_β/(1−β) (β → 1): the next term is
    // O(β), so at β = 2^-20 the quotient is within ~1e-6·C of the KL; 1e-4 relative.
    let small = 1.0 / 1048576.0;
    let near0 = d.loss(&spec.with_divergence(Divergence::Jsd { beta: small }));
    let near1 = d.loss(&spec.with_divergence(Divergence::Jsd { beta: 1.0 - small }));
    for i in 0..d.rows {
        let (a, b) = (jsd0.per_row[i], jsd1.per_row[i]);
        assert_close("JSD_β/β → KL(p‖q)", near0.per_row[i] / small, a, 1e-4 * a);
        assert_close(
            "JSD_β/(1−β) → KL(q‖p)",
            near1.per_row[i] / small,
            b,
            1e-4 * b,
        );
    }
    // The ends' gradients are those of the KLs.
    let up = Upstream::Scalar(1.0);
    let spec = spec.with_reduction(Reduction::Sum);
    let (_, gf) = d.grad(&spec, up);
    let (_, g0) = d.grad(&spec.with_divergence(Divergence::Jsd { beta: 0.0 }), up);
    let (_, gr) = d.grad(&spec.with_divergence(Divergence::ReverseKl), up);
    let (_, g1) = d.grad(&spec.with_divergence(Divergence::Jsd { beta: 1.0 }), up);
    assert_eq!(gf, g0);
    assert_eq!(gr, g1);
}

/// `g·loss` for sum and mean, `Σ_i g_i·l_i` for none.
fn objective(d: &Distill, spec: &Distillation, g: &[f64]) -> f64 {
    let out = d.loss(spec);
    match spec.reduction() {
        Reduction::None => out.per_row.iter().zip(g).map(|(l, g)| l * g).sum(),
        _ => g[0] * out.loss.unwrap(),
    }
}

const H: f64 = 1.0 / 1024.0;

/// Richardson-extrapolated central differences `R = (4·D(h/2) − D(h))/3` of the loss along
/// each student logit, against `distillation_grad`.
///
/// Truncation: `h⁴·|L⁽⁵⁾|/480` with h = 2^-10; the fifth derivative along one logit is
/// `σ/T⁵` times a bounded polynomial in the probabilities and the log-ratios (≲ 1e3 here), so
/// ≲ 2e-12·σ·|g|/T⁵; we allow 1e-9·σ·|g|·max(1, 1/T⁵). Rounding: one evaluation of the
/// objective is off by `δ ≤ 32·eps·S`, S the sum of the magnitudes it adds up (scaled
/// per-row losses and their `1 + M` log-softmax parts), amplified by at most 3/h. A missing
/// 1/T, T² or reduction scale, or a wrong JSD derivative, is off by 1e-3 or more.
fn check_finite_differences(label: &str, d: &Distill, spec: Distillation) {
    let t = spec.temperature();
    let sigma = spec.loss_scale();
    for reduction in REDUCTIONS {
        let spec = spec.with_reduction(reduction);
        let g: Vec<f64> = match reduction {
            Reduction::None => (0..d.rows).map(|i| 0.75 - 0.5 * i as f64).collect(),
            Reduction::Sum => vec![1.25],
            Reduction::Mean => vec![0.7],
        };
        let upstream = match reduction {
            Reduction::None => Upstream::PerRow(&g),
            _ => Upstream::Scalar(g[0]),
        };
        let (out, grad) = d.grad(&spec, upstream);
        let scale = |i: usize| match reduction {
            Reduction::None => g[i].abs(),
            Reduction::Sum => g[0].abs(),
            Reduction::Mean => g[0].abs() / d.rows as f64,
        };
        let magnitude: f64 = (0..d.rows)
            .map(|i| scale(i) * (out.per_row[i].abs() + sigma * 4.0 * (1.0 + d.m(i, t))))
            .sum();
        let delta = 32.0 * EPS * magnitude;
        let mut worst: f64 = 0.0;
        for (j, &got) in grad.iter().enumerate() {
            let i = j / d.classes;
            if d.student[j] == f32::NEG_INFINITY {
                assert_eq!(got.to_bits(), 0, "{label}: masked class, row {i}");
                continue;
            }
            let at = |h: f64| {
                let mut moved = Distill {
                    student: d.student.clone(),
                    teacher: d.teacher.clone(),
                    ..*d
                };
                let z = d.student[j] as f64 + h;
                assert_eq!(z as f32 as f64, z, "step not exact in f32");
                moved.student[j] = z as f32;
                objective(&moved, &spec, &g)
            };
            let dh = |h: f64| (at(h) - at(-h)) / (2.0 * h);
            let fd = (4.0 * dh(H / 2.0) - dh(H)) / 3.0;
            let tol = 3.0 * delta / H + 1e-9 * sigma * scale(i) * (1.0 / t.powi(5)).max(1.0);
            worst = worst.max((got - fd).abs() / tol);
            assert!(
                (got - fd).abs() <= tol,
                "{label} {reduction:?}: row {i} class {}: gradient {got:e} vs finite differences {fd:e} (tolerance {tol:e})",
                j % d.classes
            );
        }
        eprintln!("{label} {reduction:?}: worst error / tolerance {worst:.2e}");
    }
}

#[test]
fn distillation_gradients_match_finite_differences() {
    let d = dyadic(13, 4, 6);
    for divergence in DIVERGENCES
        .into_iter()
        .chain([Divergence::Jsd { beta: 0.0 }, Divergence::Jsd { beta: 1.0 }])
    {
        for (t, t2) in [(1.0, false), (2.0, true), (0.75, false)] {
            let spec = Distillation::new()
                .with_temperature(t)
                .with_divergence(divergence)
                .with_t2_scale(t2);
            check_finite_differences(&format!("{divergence:?} T={t} t2={t2}"), &d, spec);
        }
    }
}

#[test]
fn distillation_mean_over_a_larger_batch_and_empty_batch() {
    let d = dyadic(14, 3, 5);
    let spec = Distillation::new().with_divergence(Divergence::ReverseKl);
    let (_, mean) = d.grad(&spec, Upstream::Scalar(1.0));
    let (_, over) = d.grad(
        &spec,
        Upstream::MeanOver {
            grad: 1.0,
            denominator: 6.0,
            counted_rows: 6.0,
        },
    );
    for (a, b) in mean.iter().zip(&over) {
        assert_close(
            "MeanOver of twice the rows halves the gradient",
            *b,
            a / 2.0,
            1e-15 * a.abs(),
        );
    }
    let empty = scoring::distillation(&spec, Logits::new::<f32>(&[], 0, 5).unwrap(), &[]).unwrap();
    assert!(empty.loss.unwrap().is_nan());
    assert_eq!(empty.sum.to_bits(), 0);
    let sum = scoring::distillation(
        &spec.with_reduction(Reduction::Sum),
        Logits::new::<f32>(&[], 0, 5).unwrap(),
        &[],
    )
    .unwrap();
    assert_eq!(sum.loss, Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// Token metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn all_equal_rows_predict_class_zero_at_rank_zero() {
    let z = [0.5_f32; 12];
    let m = scoring::token_metrics(Logits::new(&z, 3, 4).unwrap(), &[0, 2, 3], None, 1).unwrap();
    for (i, row) in m.rows.iter().enumerate() {
        assert_eq!(row.argmax, 0, "row {i}");
        let t = row.target.unwrap();
        assert_eq!(t.rank, 0);
        assert!(t.in_top_k);
        assert_eq!(t.correct, i == 0);
        assert_close("log q", t.log_prob, -(4.0_f64.ln()), 4.0 * EPS);
        assert_close("entropy", row.entropy, 4.0_f64.ln(), 8.0 * EPS);
    }
    let s = m.summary;
    assert_eq!((s.counted_rows, s.correct, s.in_top_k), (3, 1, 3));
    assert_eq!(s.accuracy(), 1.0 / 3.0);
    assert_eq!(s.top_k_accuracy(), 1.0);
    assert_close("perplexity", s.perplexity(), 4.0, 16.0 * EPS);
}

#[test]
fn duplicated_maxima_masks_and_nan() {
    let ninf = f32::NEG_INFINITY;
    #[rustfmt::skip]
    let z = [
        1.0, 3.0, 3.0, 2.0, // tied maxima at 1 and 2
        1.0, 3.0, 3.0, 2.0,
        1.0, 3.0, 3.0, 2.0,
        ninf, ninf, 0.5, ninf, // masked classes
        ninf, ninf, 0.5, ninf,
        ninf, ninf, ninf, ninf, // all masked
        1.0, f32::NAN, 5.0, f32::NAN, // NaN ranks above everything
    ];
    let y = [2, 3, 0, 2, 0, 0, 2];
    let m = scoring::token_metrics(Logits::new(&z, 7, 4).unwrap(), &y, None, 2).unwrap();
    let argmax: Vec<usize> = m.rows.iter().map(|r| r.argmax).collect();
    assert_eq!(argmax, [1, 1, 1, 2, 2, 0, 1]);
    let t: Vec<_> = m.rows.iter().map(|r| r.target.unwrap()).collect();
    let rank: Vec<usize> = t.iter().map(|t| t.rank).collect();
    assert_eq!(rank, [0, 2, 3, 0, 1, 0, 2]);
    let correct: Vec<bool> = t.iter().map(|t| t.correct).collect();
    assert_eq!(correct, [false, false, false, true, false, true, false]);
    let top2: Vec<bool> = t.iter().map(|t| t.in_top_k).collect();
    assert_eq!(top2, [true, false, false, true, true, true, false]);
    // A tied maximum: the target is one of the two, log q = 3 − lse.
    let lse = (1.0_f64.exp() + 2.0 * 3.0_f64.exp() + 2.0_f64.exp()).ln();
    assert_close("tied", t[0].log_prob, 3.0 - lse, 8.0 * EPS);
    // One finite class: it has all the mass, entropy exactly 0; a masked target is −inf.
    assert_eq!(t[3].log_prob, 0.0);
    assert_eq!(m.rows[3].entropy, 0.0);
    assert_eq!(t[4].log_prob, f64::NEG_INFINITY);
    // A row of only −inf, and a row with NaN: NaN log-probability and entropy.
    for i in [5, 6] {
        assert!(
            t[i].log_prob.is_nan() && m.rows[i].entropy.is_nan(),
            "row {i}"
        );
    }
    assert!(m.summary.mean_nll().is_nan());
}

#[test]
fn ignored_rows_are_excluded_and_a_hand_computed_example() {
    #[rustfmt::skip]
    let z = [
        2.0_f32, 1.0, 0.0,  // y = 1: log q = 1 − ln(e² + e + 1), wrong
        -1.0, 4.0, 0.0,     // y = 1: log q = 4 − ln(e^-1 + e^4 + 1), right
        9.0, -9.0, 0.0,     // ignored
    ];
    let m = scoring::token_metrics(Logits::new(&z, 3, 3).unwrap(), &[1, 1, -100], Some(-100), 1)
        .unwrap();
    // Values from Python's math module.
    let (l0, l1) = (-1.4076059644443801, -0.024744890138822306);
    let t0 = m.rows[0].target.unwrap();
    let t1 = m.rows[1].target.unwrap();
    assert_close("row 0", t0.log_prob, l0, 8.0 * EPS);
    assert_close("row 1", t1.log_prob, l1, 16.0 * EPS);
    assert_eq!(
        (t0.rank, t0.correct, t1.rank, t1.correct),
        (1, false, 0, true)
    );
    assert!(m.rows[2].target.is_none());
    assert_eq!(m.rows[2].argmax, 0);
    let s = m.summary;
    assert_eq!((s.counted_rows, s.ignored_rows, s.correct), (2, 1, 1));
    assert_eq!(s.accuracy(), 0.5);
    let mean = -(l0 + l1) / 2.0;
    assert_close("mean NLL", s.mean_nll(), mean, 8.0 * EPS);
    assert_close(
        "perplexity",
        s.perplexity(),
        mean.exp(),
        16.0 * EPS * mean.exp(),
    );
    // Entropy of row 1 from its probabilities directly.
    let e = [(-1.0_f64).exp(), 4.0_f64.exp(), 1.0];
    let s1: f64 = e.iter().sum();
    let h: f64 = -e.iter().map(|v| v / s1 * (v / s1).ln()).sum::<f64>();
    assert_close("entropy", m.rows[1].entropy, h, 64.0 * EPS);

    let all = scoring::token_metrics(Logits::new(&z[6..], 1, 3).unwrap(), &[-100], Some(-100), 1)
        .unwrap();
    assert!(all.summary.accuracy().is_nan() && all.summary.perplexity().is_nan());
}

// ---------------------------------------------------------------------------------------------
// Sequences and multiple choice
// ---------------------------------------------------------------------------------------------

#[test]
fn multiple_choice_hand_computed() {
    // 2 questions × 3 choices, C = 3, sequences interleaved by question:
    //   s0 Q0c0: 2 zero rows, targets 0 0        ll = 2u     (u = −ln 3), 10 chars
    //   s1 Q1c0: 1 zero row, target 0            ll = u,                   4 chars
    //   s2 Q0c1: 1 zero row, target 0            ll = u,                   3 chars
    //   s3 Q1c1: 1 zero row, target 1            ll = u (not greedy),      4 chars
    //   s4 Q0c2: 3 zero rows, targets 0 0 0      ll = 3u,                 12 chars
    //   s5 Q1c2: [1,0,0]→0, zero row→0           ll = 1 − ln(e+2) + u,     2 chars
    // Q0 (gold 0): acc → argmax(2u, u, 3u) = c1, wrong; acc_norm → argmax(u/5, u/3, u/4) = c0, right.
    // Q1 (gold 1): ll c0 = c1 = u tie → c0 (first), wrong; norm u/4 = u/4 tie → c0, wrong.
    let mut z = vec![0.0_f32; 10 * 3];
    z[8 * 3] = 1.0;
    let targets = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0];
    let offsets = [0, 2, 3, 4, 5, 8, 10];
    let scores =
        scoring::sequence_scores(Logits::new(&z, 10, 3).unwrap(), &targets, &offsets).unwrap();
    let u = -(3.0_f64.ln());
    let l5 = 1.0 - (1.0_f64.exp() + 2.0).ln() + u;
    let want = [2.0 * u, u, u, u, 3.0 * u, l5];
    let tokens = [2, 1, 1, 1, 3, 2];
    let greedy = [true, true, true, false, true, true];
    for s in 0..6 {
        assert_close(
            &format!("ll {s}"),
            scores[s].loglikelihood,
            want[s],
            16.0 * EPS,
        );
        assert_eq!(scores[s].tokens, tokens[s]);
        assert_eq!(scores[s].is_greedy, greedy[s], "sequence {s}");
        if s != 5 {
            assert_close("perplexity", scores[s].perplexity(), 3.0, 16.0 * EPS);
        }
    }
    let mc = scoring::multiple_choice(&scores, &[0, 1, 0, 1, 0, 1], &[10, 4, 3, 4, 12, 2], &[0, 1])
        .unwrap();
    let q = &mc.questions;
    assert_eq!(
        (q[0].choices, q[0].predicted, q[0].predicted_norm),
        (3, 1, 0)
    );
    assert_eq!((q[0].acc, q[0].acc_norm), (false, true));
    assert_eq!((q[1].predicted, q[1].predicted_norm), (0, 0));
    assert_eq!((q[1].acc, q[1].acc_norm), (false, false));
    assert_eq!((mc.acc(), mc.acc_norm()), (0.0, 0.5));
    // Gold 0 for Q1: the first of the tied choices wins, so both are right.
    let mc = scoring::multiple_choice(&scores, &[0, 1, 0, 1, 0, 1], &[10, 4, 3, 4, 12, 2], &[0, 0])
        .unwrap();
    assert_eq!((mc.acc(), mc.acc_norm()), (0.5, 1.0));
}

#[test]
fn one_token_sequences_are_the_token_log_probabilities() {
    let mut r = common::Inputs::new(21);
    let (n, c) = (7, 11);
    let z = r.logits(n * c, 4.0, 0.0);
    let y = r.classes(n, c);
    let logits = Logits::new(&z, n, c).unwrap();
    let offsets: Vec<usize> = (0..=n).collect();
    let scores = scoring::sequence_scores(logits, &y, &offsets).unwrap();
    let metrics = scoring::token_metrics(logits, &y, None, 1).unwrap();
    assert_eq!(scores.len(), n);
    for (score, row) in scores.iter().zip(&metrics.rows) {
        let t = row.target.unwrap();
        assert_eq!(score.loglikelihood, t.log_prob);
        assert_eq!(score.is_greedy, t.correct);
        assert_eq!(score.tokens, 1);
    }
    // A sequence of no tokens: loglikelihood 0, greedy, perplexity NaN.
    let s = scoring::sequence_scores(logits, &y, &[0, 0, 3, 3, n]).unwrap();
    assert_eq!(
        s[0],
        SequenceScore {
            loglikelihood: 0.0,
            is_greedy: true,
            tokens: 0
        }
    );
    assert!(s[0].perplexity().is_nan());
    assert_eq!(s.len(), 4);
    let three: f64 = (0..3)
        .map(|i| metrics.rows[i].target.unwrap().log_prob)
        .sum();
    assert_close(
        "three tokens",
        s[1].loglikelihood,
        three,
        8.0 * EPS * three.abs(),
    );
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn sequence_and_multiple_choice_errors() {
    let z = [0.0_f32; 12];
    let logits = Logits::new(&z, 4, 3).unwrap();
    let y = [0, 1, 2, 0];
    let bad: [&[usize]; 5] = [&[], &[1, 4], &[0, 3], &[0, 3, 2, 4], &[0, 5]];
    for offsets in bad {
        let e = scoring::sequence_scores(logits, &y, offsets).unwrap_err();
        assert!(
            matches!(e, XentError::SequenceOffsets(_)),
            "{offsets:?}: {e}"
        );
    }
    let e = scoring::sequence_scores(logits, &[0, 1, 3, 0], &[0, 4]).unwrap_err();
    assert!(
        matches!(
            e,
            XentError::ClassIndexOutOfRange {
                row: 2,
                value: 3,
                ..
            }
        ),
        "{e}"
    );
    let e = scoring::sequence_scores(logits, &[0, 1], &[0, 4]).unwrap_err();
    assert!(matches!(e, XentError::TargetsShape { .. }), "{e}");

    let s = scoring::sequence_scores(logits, &y, &[0, 1, 2, 4]).unwrap();
    let cases: [(&[usize], &[usize], &[usize]); 5] = [
        (&[0, 0], &[1, 1, 1], &[0]),       // question ids not one per sequence
        (&[0, 0, 0], &[1, 1], &[0]),       // lengths not one per sequence
        (&[0, 0, 2], &[1, 1, 1], &[0, 0]), // question 2 has no gold index
        (&[0, 0, 0], &[1, 1, 1], &[0, 0]), // question 1 has no choices
        (&[0, 0, 1], &[1, 1, 1], &[2, 0]), // gold 2 of 2 choices
    ];
    for (q, l, g) in cases {
        let e = scoring::multiple_choice(&s, q, l, g).unwrap_err();
        assert!(
            matches!(e, XentError::MultipleChoice(_)),
            "{q:?} {l:?} {g:?}: {e}"
        );
    }
}

#[test]
fn sparse_target_errors_name_the_row() {
    let z = [0.0_f32; 12];
    let logits = Logits::new(&z, 3, 4).unwrap();
    let p = [0.5_f32; 6];
    let e = scoring::sparse_cross_entropy(
        &CrossEntropy::new().with_reduction(Reduction::Sum),
        logits,
        SparseTargets::new(&[0, 1, 2, 3, 3, 3], &p, 2),
    )
    .unwrap_err();
    assert!(
        matches!(e, XentError::SparseDuplicateIndex { row: 2, class: 3 }),
        "{e}"
    );
    assert!(e.to_string().contains("row 2"));
    for bad in [4, -1] {
        let e = scoring::sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            logits,
            SparseTargets::new(&[0, 1, bad, 3, 3, 2], &p, 2),
        )
        .unwrap_err();
        assert!(
            matches!(e, XentError::SparseIndexOutOfRange { row: 1, value, classes: 4 } if value == bad),
            "{e}"
        );
    }
    // A row with several entries in error names the first in the row's order, as the GPU does
    // (not, say, every index out of range before any repeat, or the smallest repeated class).
    let z = [0.0_f32; 4];
    let logits1 = Logits::new(&z, 1, 4).unwrap();
    let p4 = [0.25_f32; 4];
    for (idx, want) in [
        (
            [1, 1, 9, 0],
            XentError::SparseDuplicateIndex { row: 0, class: 1 },
        ),
        (
            [2, 2, -1, 0],
            XentError::SparseDuplicateIndex { row: 0, class: 2 },
        ),
        (
            [3, 3, 1, 1],
            XentError::SparseDuplicateIndex { row: 0, class: 3 },
        ),
        (
            [0, 9, 1, 1],
            XentError::SparseIndexOutOfRange {
                row: 0,
                value: 9,
                classes: 4,
            },
        ),
    ] {
        let targets = SparseTargets::new(&idx, &p4, 4);
        let e = targets.validate(&logits1).unwrap_err();
        assert_eq!(e.to_string(), want.to_string(), "{idx:?}");
    }
    let e = scoring::sparse_cross_entropy(
        &CrossEntropy::new().with_reduction(Reduction::Sum),
        logits,
        SparseTargets::new(&[0, 1, 2, 3, 0], &p, 2),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            XentError::TargetsShape {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = scoring::sparse_cross_entropy_grad(
        &CrossEntropy::new().with_reduction(Reduction::None),
        logits,
        SparseTargets::new(&[0, 1, 2, 3, 0, 1], &p, 2),
        Upstream::Scalar(1.0),
    )
    .unwrap_err();
    assert!(matches!(e, XentError::UpstreamKind { .. }), "{e}");
    // A top-k row's k probabilities are its whole target: no weights, ignore index or
    // smoothing; the z-loss and the soft-cap are checked as for dense targets.
    let targets = SparseTargets::new(&[0, 1, 2, 3, 0, 1], &p, 2);
    let refused = [
        (
            CrossEntropy::new().with_weights(vec![1.0; 4]),
            "class weights",
        ),
        (CrossEntropy::new().with_ignore_index(-100), "ignore index"),
        (
            CrossEntropy::new().with_label_smoothing(0.1),
            "label smoothing",
        ),
    ];
    for (spec, option) in refused {
        let e = scoring::sparse_cross_entropy(&spec, logits, targets).unwrap_err();
        assert!(
            matches!(e, XentError::SparseOption(o) if o == option),
            "{e}"
        );
        assert!(e.to_string().contains(option), "{e}");
    }
    let e = scoring::sparse_cross_entropy(&CrossEntropy::new().with_z_loss(-1.0), logits, targets)
        .unwrap_err();
    assert!(matches!(e, XentError::ZLoss(_)), "{e}");
}

#[test]
fn distillation_option_errors() {
    let z = [0.0_f32; 6];
    let logits = Logits::new(&z, 2, 3).unwrap();
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = scoring::distillation(&Distillation::new().with_temperature(t), logits, &z)
            .unwrap_err();
        assert!(matches!(e, XentError::Temperature(_)), "{t}: {e}");
    }
    for beta in [-0.1, 1.5, f64::NAN] {
        let spec = Distillation::new().with_divergence(Divergence::Jsd { beta });
        let e = scoring::distillation(&spec, logits, &z).unwrap_err();
        assert!(matches!(e, XentError::JsdBeta(_)), "{beta}: {e}");
    }
    let e = scoring::distillation(&Distillation::new(), logits, &z[..5]).unwrap_err();
    assert!(
        matches!(
            e,
            XentError::TargetsShape {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{e}"
    );
    let g = [1.0];
    let e = scoring::distillation_grad(
        &Distillation::new().with_reduction(Reduction::None),
        logits,
        &z,
        Upstream::PerRow(&g),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            XentError::UpstreamLength {
                expected: 2,
                got: 1
            }
        ),
        "{e}"
    );
}
