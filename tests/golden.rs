//! The PyTorch golden cases (tests/golden/, made by make_golden.py with PyTorch in float64
//! from the float32 inputs) through the CPU reference and the GPU, for every reduction.

mod common;

use common::{
    GoldenCase, GoldenInputs, assert_outputs_match, close, golden_cases, gpu, max_abs_per_row,
};
use xent::{CpuReference, Logits, LossOutput, Reduction, Scorer};

fn run(
    scorer: &dyn Scorer,
    case: &GoldenCase,
    inputs: &GoldenInputs,
    reduction: Reduction,
) -> LossOutput {
    let logits = Logits::new(&inputs.logits, case.rows(), case.classes()).unwrap();
    let spec = inputs.spec.clone().with_reduction(reduction);
    scorer
        .cross_entropy(&spec, logits, inputs.targets())
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// Checks an output against PyTorch: per row with `row_tol(reference)`, and the reductions.
fn assert_matches_pytorch(
    label: &str,
    case: &GoldenCase,
    out: &LossOutput,
    row_tol: impl Fn(usize, f64) -> f64,
) {
    let want = case.f64s("loss_none.npy");
    assert_eq!(out.per_row.len(), want.len(), "{label}: rows");
    let mut budget = 0.0;
    for (i, (&got, &w)) in out.per_row.iter().zip(&want).enumerate() {
        let tol = row_tol(i, w);
        budget += tol;
        assert!(
            close(got, w, tol),
            "{label}: row {i}: {got} vs PyTorch {w} (tolerance {tol:e})"
        );
    }
    let (sum, mean) = (case.number("sum"), case.number("mean"));
    assert!(
        close(out.sum, sum, budget + 1e-5 * sum.abs()),
        "{label}: sum {} vs PyTorch {sum}",
        out.sum
    );
    let mean_tol = (budget + 1e-5 * sum.abs()) / out.mean_denominator.abs();
    assert!(
        close(out.mean(), mean, mean_tol),
        "{label}: mean {} vs PyTorch {mean}",
        out.mean()
    );
}

#[test]
fn golden_cases_are_present() {
    // make_golden.py writes 20 cross-entropy cases; a missing directory must not pass quietly.
    assert!(golden_cases("cross_entropy").len() >= 20);
}

#[test]
fn cpu_reference_reproduces_pytorch() {
    for case in golden_cases("cross_entropy") {
        let inputs = GoldenInputs::load(&case);
        let max_abs = max_abs_per_row(&inputs.logits, case.classes());
        let mass = inputs.target_mass(case.classes());
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let out = run(&CpuReference, &case, &inputs, reduction);
            // Both sides are f64 over the same f32 inputs and differ only in summation order:
            // relative 1e-12 covers Σ exp over up to 50k terms, and 16 f64 ulps of the largest
            // |z| (times the target mass) cover m + ln s when the logits are offset by 1e6.
            let label = format!("{} CPU {reduction:?}", case.name);
            let tol = |i: usize, want: f64| {
                1e-12 * want.abs().max(1.0) + 16.0 * f64::EPSILON * max_abs[i] * (1.0 + mass[i])
            };
            assert_matches_pytorch(&label, &case, &out, tol);
            let expected = match reduction {
                Reduction::None => None,
                Reduction::Sum => Some(case.number("sum")),
                Reduction::Mean => Some(case.number("mean")),
            };
            assert_eq!(out.loss.is_some(), expected.is_some(), "{label}");
            if let (Some(got), Some(want)) = (out.loss, expected) {
                assert!(
                    close(got, want, 1e-9 * want.abs().max(1.0)),
                    "{label}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gpu_reproduces_pytorch() {
    let Some(gpu) = gpu() else { return };
    for case in golden_cases("cross_entropy") {
        let inputs = GoldenInputs::load(&case);
        let max_abs = max_abs_per_row(&inputs.logits, case.classes());
        let mass = inputs.target_mass(case.classes());
        for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            let out = run(gpu, &case, &inputs, reduction);
            let label = format!("{} GPU {reduction:?}", case.name);
            // common::row_tolerance explains the bound.
            assert_matches_pytorch(&label, &case, &out, |i, want| {
                common::row_tolerance(want, max_abs[i], mass[i])
            });
            let reference = run(&CpuReference, &case, &inputs, reduction);
            assert_outputs_match(&label, &out, &reference, &max_abs, &mass);
        }
    }
}
