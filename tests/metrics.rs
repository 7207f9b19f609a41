//! Token metrics and sequence scores on the GPU (issue 11), from the loss's own pass over the
//! logits, against the f64 reference `xent::scoring`: argmax with ties (lowest class), ranks,
//! top-k hits, −inf masks, NaN, ignored rows, every strategy corner, half logits; sequences
//! across chunk boundaries; the device path; the loss unchanged by asking for metrics.

mod common;

#[path = "../examples/evaluate.rs"]
mod evaluate_example;

use common::{buffer_with, corner_strategies, gpu, gpu_with_binding_cap, row_tolerance, ulp_f32};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::planner::MAX_ELEMENTS_PER_LANE;
use xent::scoring::{self, TokenMetrics};
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, Dtype, ElementVec, IndexType, Logits, LossShape,
    Reduction, Strategy, TargetLayout, XentError,
};

const IGNORE: i64 = -100;
const TOP_K: usize = 3;

/// Rows of `classes` logits on a coarse grid (ties are common), with −inf masks, a few
/// rows of only −inf or with NaN when `specials`, and class indices of which about one in
/// five is ignored (targets never fall on a NaN-free row's masked class, nor do they need to).
fn tied_rows(seed: u64, rows: usize, classes: usize, specials: bool) -> (Vec<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut z: Vec<f32> = (0..rows * classes)
        .map(|_| match rng.random_range(0..10) {
            0 => f32::NEG_INFINITY,
            _ => rng.random_range(-6..6) as f32 * 0.75,
        })
        .collect();
    if specials && rows >= 3 {
        z[..classes].fill(f32::NEG_INFINITY);
        z[classes + classes / 2] = f32::NAN;
        z[2 * classes..3 * classes].fill(1.5);
    }
    let y = (0..rows)
        .map(|_| {
            if rng.random_range(0..5) == 0 {
                IGNORE
            } else {
                rng.random_range(0..classes as i64)
            }
        })
        .collect();
    (z, y)
}

/// The largest finite |z| of a row.
fn max_abs(row: &[f32]) -> f64 {
    row.iter()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, |m, &v| m.max((v as f64).abs()))
}

/// `got` against the f64 reference: integers exactly, log-probabilities within the loss's
/// row tolerance, entropies within the same bound plus the weighted mean of z − m (an
/// absolute error of a few ulps of the largest |z|).
fn assert_metrics(label: &str, got: &TokenMetrics, want: &TokenMetrics, z: &[f32], classes: usize) {
    assert_eq!(got.rows.len(), want.rows.len(), "{label}: rows");
    for (i, (g, w)) in got.rows.iter().zip(&want.rows).enumerate() {
        let m = max_abs(&z[i * classes..(i + 1) * classes]);
        let close =
            |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol;
        assert_eq!(g.argmax, w.argmax, "{label}: row {i} argmax");
        let tol = row_tolerance(w.entropy, m, 1.0) + 8.0 * ulp_f32(m);
        assert!(
            close(g.entropy, w.entropy, tol),
            "{label}: row {i} entropy {} vs {}",
            g.entropy,
            w.entropy
        );
        match (g.target, w.target) {
            (None, None) => {}
            (Some(gt), Some(wt)) => {
                assert_eq!(
                    (gt.class, gt.rank, gt.correct, gt.in_top_k),
                    (wt.class, wt.rank, wt.correct, wt.in_top_k),
                    "{label}: row {i} class, rank, correct, top-k"
                );
                let tol = row_tolerance(wt.log_prob, m, 1.0);
                assert!(
                    close(gt.log_prob, wt.log_prob, tol),
                    "{label}: row {i} log q {} vs {}",
                    gt.log_prob,
                    wt.log_prob
                );
            }
            (g, w) => panic!("{label}: row {i} target {g:?} vs {w:?}"),
        }
    }
    let (g, w) = (got.summary, want.summary);
    assert_eq!(
        (
            g.top_k,
            g.counted_rows,
            g.ignored_rows,
            g.correct,
            g.in_top_k
        ),
        (
            w.top_k,
            w.counted_rows,
            w.ignored_rows,
            w.correct,
            w.in_top_k
        ),
        "{label}: summary counts"
    );
}

#[test]
fn metrics_match_the_reference_on_every_strategy() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, classes)) in [(9, 1), (11, 3), (13, 5), (8, 64), (5, 4099), (3, 50257)]
        .into_iter()
        .enumerate()
    {
        let (z, y) = tied_rows(seed as u64, rows, classes, true);
        let logits = Logits::new(&z, rows, classes).unwrap();
        let want = scoring::token_metrics(logits, &y, Some(IGNORE), TOP_K).unwrap();
        let spec = CrossEntropy::new().with_ignore_index(IGNORE);
        let fits = |s: &Strategy| s.elements_per_lane(classes) <= MAX_ELEMENTS_PER_LANE;
        for strategy in corner_strategies(gpu).into_iter().filter(fits) {
            let label = format!("{rows}x{classes} {}", strategy.name());
            let (_, got) = gpu
                .cross_entropy_metrics_with(&spec, logits, &y, TOP_K, strategy)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_metrics(&label, &got, &want, &z, classes);
        }
        let planned = gpu.token_metrics(logits, &y, Some(IGNORE), TOP_K).unwrap();
        assert_metrics("planned", &planned, &want, &z, classes);
    }
}

#[test]
fn half_logits_give_the_metrics_of_their_values() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (6, 37);
    let (z, y) = tied_rows(21, rows, classes, false);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let half = ElementVec::rounded(dtype, z.iter().map(|&v| v as f64));
        let wide = half.to_f32();
        let want = scoring::token_metrics(
            Logits::new(&wide, rows, classes).unwrap(),
            &y,
            Some(IGNORE),
            TOP_K,
        )
        .unwrap();
        let logits = Logits::from_elements(half.as_elements(), rows, classes).unwrap();
        let got = gpu.token_metrics(logits, &y, Some(IGNORE), TOP_K).unwrap();
        assert_metrics(&format!("{dtype}"), &got, &want, &wide, classes);
    }
}

#[test]
fn asking_for_metrics_leaves_the_loss_bit_identical_and_reruns_agree() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (300, 1000);
    let mut rng = StdRng::seed_from_u64(4);
    let z: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-9.0..9.0))
        .collect();
    let y: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 7 == 0 {
                IGNORE
            } else {
                rng.random_range(0..classes as i64)
            }
        })
        .collect();
    let logits = Logits::new(&z, rows, classes).unwrap();
    for spec in [
        CrossEntropy::new().with_ignore_index(IGNORE),
        CrossEntropy::new()
            .with_ignore_index(IGNORE)
            .with_label_smoothing(0.1)
            .with_z_loss(1e-4)
            .with_reduction(Reduction::Sum),
    ] {
        let plain = gpu
            .cross_entropy(&spec, logits, xent::Targets::ClassIndices(&y))
            .unwrap();
        let (out, metrics) = gpu.cross_entropy_metrics(&spec, logits, &y, 5).unwrap();
        assert_eq!(out, plain, "{spec:?}: the loss with metrics");
        let (again, metrics_again) = gpu.cross_entropy_metrics(&spec, logits, &y, 5).unwrap();
        assert_eq!((again, &metrics_again), (out, &metrics), "rerun");
        let want = scoring::token_metrics(logits, &y, Some(IGNORE), 5).unwrap();
        assert_metrics("random", &metrics, &want, &z, classes);
        let (g, w) = (metrics.summary, want.summary);
        let tol = 1e-5 * w.nll_sum.abs() + rows as f64 * row_tolerance(0.0, 9.0, 1.0);
        assert!(
            (g.nll_sum - w.nll_sum).abs() <= tol,
            "{} vs {}",
            g.nll_sum,
            w.nll_sum
        );
        assert!((g.perplexity() / w.perplexity() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn sequences_across_chunk_boundaries() {
    // Bindings of 4 KiB hold 16 rows of 64 classes: the sequences below cross chunks.
    let Some(gpu) = gpu_with_binding_cap(4096) else {
        return;
    };
    let (rows, classes) = (100, 64);
    let (z, y) = tied_rows(31, rows, classes, false);
    let y: Vec<i64> = y.iter().map(|&v| v.max(0)).collect();
    let offsets = [0, 5, 5, 23, 40, 41, 77, 100];
    let logits = Logits::new(&z, rows, classes).unwrap();
    let want = scoring::sequence_scores(logits, &y, &offsets).unwrap();
    let got = gpu.sequence_scores(logits, &y, &offsets).unwrap();
    assert_eq!(got.len(), want.len());
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            (g.tokens, g.is_greedy),
            (w.tokens, w.is_greedy),
            "sequence {s}"
        );
        let tol = w.tokens as f64 * row_tolerance(w.loglikelihood, 4.5, 1.0);
        let same =
            g.loglikelihood == w.loglikelihood || (g.loglikelihood - w.loglikelihood).abs() <= tol;
        assert!(
            same,
            "sequence {s}: {} vs {}",
            g.loglikelihood, w.loglikelihood
        );
    }
    // The same errors as the reference.
    for bad in [&[0usize, 50][..], &[1, 100], &[0, 60, 50, 100], &[]] {
        assert!(matches!(
            gpu.sequence_scores(logits, &y, bad),
            Err(XentError::SequenceOffsets(_))
        ));
    }
    let mut wrong = y.clone();
    wrong[42] = classes as i64;
    assert!(matches!(
        gpu.sequence_scores(logits, &wrong, &offsets),
        Err(XentError::ClassIndexOutOfRange { row: 42, .. })
    ));
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn device_buffers_with_metrics_match_the_host_path() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (40, 257);
    let (z, y) = tied_rows(41, rows, classes, true);
    let spec = CrossEntropy::new().with_ignore_index(IGNORE);
    // At a 16-byte boundary, as the host path stages rows: the same loads, the same bits.
    let logits = buffer_with(gpu, 16, bytemuck::cast_slice(&z));
    let targets = buffer_with(gpu, 8, bytemuck::cast_slice(&y));
    let shape = LossShape::new(rows, classes, TargetLayout::ClassIndices(IndexType::I64));
    let view = DeviceLogits::new(&logits, 16, rows, classes);
    let labels = DeviceTargets::class_indices(&targets, 8, IndexType::I64);

    let mut loss = gpu.prepare(&spec, shape).unwrap();
    loss.run(view, labels).unwrap();
    assert!(matches!(
        loss.read_with_metrics(TOP_K),
        Err(XentError::NotPrepared(_))
    ));
    let mut loss = loss.with_metrics().unwrap();
    let host = gpu
        .cross_entropy_metrics(&spec, Logits::new(&z, rows, classes).unwrap(), &y, TOP_K)
        .unwrap();
    for _ in 0..2 {
        loss.run(view, labels).unwrap();
        let (out, metrics) = loss.read_with_metrics(TOP_K).unwrap();
        assert_eq!(bits(&out.log_sum_exp), bits(&host.0.log_sum_exp));
        // Debug formatting compares NaN (rows of only −inf, with NaN) as equal.
        assert_eq!(format!("{metrics:?}"), format!("{:?}", host.1));
    }
    // A class out of range is the device's error, and the loss stays usable.
    let mut bad = y.clone();
    bad[17] = classes as i64 + 3;
    let bad_targets = buffer_with(gpu, 8, bytemuck::cast_slice(&bad));
    loss.run(
        view,
        DeviceTargets::class_indices(&bad_targets, 8, IndexType::I64),
    )
    .unwrap();
    assert!(matches!(
        loss.read_with_metrics(TOP_K),
        Err(XentError::ClassIndexOutOfRange { row: 17, .. })
    ));
    loss.run(view, labels).unwrap();
    let again = loss.read_with_metrics(TOP_K).unwrap().1;
    assert_eq!(format!("{again:?}"), format!("{:?}", host.1));

    // Metrics need class indices.
    let soft = LossShape::new(rows, classes, TargetLayout::PROBABILITIES);
    assert!(matches!(
        gpu.prepare(&CrossEntropy::new(), soft)
            .unwrap()
            .with_metrics(),
        Err(XentError::NotPrepared(_))
    ));
}

#[test]
fn the_evaluate_example_agrees_with_the_reference() {
    let Some(gpu) = gpu() else { return };
    let Some(second) = common::fresh_gpu() else {
        return;
    };
    let r = evaluate_example::run(gpu, second).unwrap();
    // The example's model favours the gold continuation: both harness metrics are right.
    assert_eq!((r.gpu.acc(), r.gpu.acc_norm()), (1.0, 1.0));
    assert_eq!(r.gpu, r.reference);
    assert_eq!(r.accuracy.0, r.accuracy.1);
    let close = |(a, b): (f64, f64)| (a - b).abs() <= 1e-5 * b.abs();
    assert!(close(r.perplexity), "{:?}", r.perplexity);
    assert!(close(r.distillation), "{:?}", r.distillation);
    assert!(close(r.sharded), "{:?}", r.sharded);
}

#[test]
fn metrics_of_soft_capped_logits_are_those_of_the_capped_values() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (9, 130);
    let (z, y) = tied_rows(51, rows, classes, false);
    let cap = 3.0;
    let spec = CrossEntropy::new()
        .with_ignore_index(IGNORE)
        .with_softcap(cap);
    let (_, got) = gpu
        .cross_entropy_metrics(&spec, Logits::new(&z, rows, classes).unwrap(), &y, TOP_K)
        .unwrap();
    // The reference on the capped logits, rounded to f32 as the GPU holds them: ties stay ties
    // (the grid's values cap to distinct f32s, equal ones to equal ones).
    let capped: Vec<f32> = z
        .iter()
        .map(|&v| (cap * (v as f64 / cap).tanh()) as f32)
        .collect();
    let want = scoring::token_metrics(
        Logits::new(&capped, rows, classes).unwrap(),
        &y,
        Some(IGNORE),
        TOP_K,
    )
    .unwrap();
    assert_metrics("soft-capped", &got, &want, &capped, classes);
}
