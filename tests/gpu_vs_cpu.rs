//! The GPU against the f64 CPU reference on random shapes and options, on the shapes that
//! break naive kernels (tiny and odd C, > 65,535 rows, rows > 131,072 classes), on −inf
//! masks and large offsets, across every strategy, chunked, and run twice for determinism.

mod common;

use common::{Inputs, Problem, gpu, gpu_with_binding_cap, max_abs_per_row};
use proptest::prelude::*;
use xent::{
    CpuReference, CrossEntropy, GpuContext, Logits, Reduction, Scorer, Strategy, Targets, cpu,
};

fn spec_from(
    reduction: u8,
    weights: Option<Vec<f32>>,
    ignore: bool,
    smoothing: f64,
) -> CrossEntropy {
    let mut spec = CrossEntropy::new()
        .with_reduction([Reduction::None, Reduction::Sum, Reduction::Mean][reduction as usize % 3])
        .with_label_smoothing(smoothing);
    if let Some(w) = weights {
        spec = spec.with_weights(w);
    }
    if ignore {
        spec = spec.with_ignore_index(-100);
    }
    spec
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_shapes_and_options(
        seed in any::<u64>(),
        rows in 0usize..70,
        classes in prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 8, 31, 100, 1000, 4099]),
        soft in any::<bool>(),
        reduction in 0u8..3,
        weighted in any::<bool>(),
        smoothing in prop::sample::select(vec![0.0, 0.1, 0.5, 1.0]),
        scale in prop::sample::select(vec![1.0f32, 10.0, 1000.0]),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let mut p = Problem::random(seed, rows, classes, scale, 0.0);
        let mut r = Inputs::new(seed ^ 1);
        let ignore = !soft && r.chance(0.5);
        if ignore {
            for y in p.labels.iter_mut() {
                if r.chance(0.2) { *y = -100; }
            }
        }
        let weights = weighted.then(|| r.weights(classes));
        let spec = spec_from(reduction, weights, ignore, smoothing);
        p.check(gpu, &spec, soft, None, "random");
    }
}

#[test]
fn odd_and_large_class_counts() {
    let Some(gpu) = gpu() else { return };
    for (i, &c) in [1usize, 2, 3, 5, 1000, 4099, 50257].iter().enumerate() {
        let p = Problem::random(10 + i as u64, 7, c, 8.0, 0.0);
        for soft in [false, true] {
            p.check(gpu, &CrossEntropy::new(), soft, None, "odd C");
            p.check(
                gpu,
                &CrossEntropy::new().with_label_smoothing(0.2),
                soft,
                Some(Strategy::NAIVE),
                "odd C naive",
            );
        }
    }
}

#[test]
fn more_rows_than_one_grid_dimension() {
    let Some(gpu) = gpu() else { return };
    // One workgroup per row gives 70,000 workgroups: the dispatch must use the y axis.
    let p = Problem::random(3, 70_000, 3, 5.0, 0.0);
    for soft in [false, true] {
        p.check(
            gpu,
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            soft,
            Some(Strategy::NAIVE),
            "70k rows naive",
        );
        p.check(gpu, &CrossEntropy::new(), soft, None, "70k rows planned");
    }
}

#[test]
fn rows_longer_than_131072_classes() {
    let Some(gpu) = gpu() else { return };
    let p = Problem::random(4, 2, 131_073, 10.0, 0.0);
    for soft in [false, true] {
        p.check(gpu, &CrossEntropy::new(), soft, None, "long rows");
        p.check(
            gpu,
            &CrossEntropy::new().with_label_smoothing(0.1),
            soft,
            Some(Strategy::NAIVE),
            "long rows naive",
        );
    }
    let one = Problem::random(5, 1, 300_001, 10.0, 0.0);
    one.check(gpu, &CrossEntropy::new(), false, None, "one long row");
    one.check(gpu, &CrossEntropy::new(), true, None, "one long row");
}

#[test]
fn negative_infinity_masks() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (40, 37);
    let mut p = Problem::random(6, rows, classes, 5.0, 0.0);
    let mut r = Inputs::new(66);
    for i in 0..rows {
        for k in 0..classes {
            // Mask about a third of the classes, never the target class.
            if k as i64 != p.labels[i] && r.chance(0.35) {
                p.logits[i * classes + k] = f32::NEG_INFINITY;
            }
        }
    }
    // Row 0 entirely masked: log-sum-exp −inf, loss NaN (as PyTorch's log_softmax gives).
    p.logits[..classes].fill(f32::NEG_INFINITY);
    let plain = p.check(
        gpu,
        &CrossEntropy::new().with_reduction(Reduction::None),
        false,
        None,
        "masked",
    );
    assert!(plain.per_row[0].is_nan() && plain.log_sum_exp[0] == f64::NEG_INFINITY);
    assert!(plain.per_row[1..].iter().all(|l| l.is_finite()));
    // Smoothing puts mass on masked classes: +inf, as in PyTorch.
    let smooth = p.check(
        gpu,
        &CrossEntropy::new().with_label_smoothing(0.1),
        false,
        None,
        "masked smoothing",
    );
    assert!(smooth.per_row[1..].contains(&f64::INFINITY));
    for s in [
        Strategy::NAIVE,
        Strategy {
            split: 2,
            ..Strategy::NAIVE
        },
    ] {
        p.check(gpu, &CrossEntropy::new(), false, Some(s), "masked forced");
    }
    // Probability mass only on unmasked classes; PyTorch gives NaN where p = 0 meets −inf
    // (0·−inf), and so do both paths here.
    p.check(gpu, &CrossEntropy::new(), true, None, "masked soft");
}

#[test]
fn large_offsets_cost_no_precision() {
    let Some(gpu) = gpu() else { return };
    for offset in [1e4f32, 1e6, -1e6] {
        let p = Problem::random(7, 50, 1000, 5.0, offset);
        for soft in [false, true] {
            let spec = CrossEntropy::new().with_reduction(Reduction::None);
            let got = p.check(gpu, &spec, soft, None, "offset");
            // The GPU keeps A relative to the running max, so z − m is exact and the error
            // is that of Σ exp, not of the offset: far tighter than ulp(1e6) = 0.0625.
            let want = CpuReference
                .cross_entropy(&spec, p.logits(), p.targets(soft))
                .unwrap();
            for (g, w) in got.per_row.iter().zip(&want.per_row) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "offset {offset}: {g} vs {w}"
                );
            }
        }
    }
}

/// Strategies at and around their boundaries, with and without subgroup reductions where the
/// device has them.
fn strategies(gpu: &GpuContext) -> Vec<Strategy> {
    let plain = common::plain_strategy;
    let mut all = vec![Strategy::NAIVE];
    for lanes in [1, 2, 4, 8, 32, 64, 256] {
        for vec4 in [false, true] {
            all.push(plain(256, lanes, 1, vec4));
        }
    }
    all.push(plain(64, 4, 1, true));
    // The largest workgroup whose reductions fit the device's workgroup memory (1024 lanes
    // on lavapipe's Vulkan; 512 on llvmpipe's GL, which has 32 KiB).
    let facts = gpu.facts();
    let largest = [1024, 512, 256]
        .into_iter()
        .map(|wg| plain(wg, wg, 1, true))
        .find(|s| s.check(facts).is_ok())
        .expect("a 256-lane workgroup fits every adapter");
    all.push(largest);
    for split in [2, 3, 8] {
        all.push(plain(256, 256, split, true));
    }
    all.push(plain(128, 128, 4, false));
    if let Some(sg) = gpu.facts().subgroup_lanes {
        let with_sg: Vec<Strategy> = all
            .iter()
            .filter(|s| s.workgroup_size >= sg)
            .map(|s| Strategy {
                subgroups: true,
                ..*s
            })
            .collect();
        all.extend(with_sg);
    }
    all
}

#[test]
fn every_strategy_agrees_with_the_reference() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        (1, 1),
        (257, 3),
        (33, 4),
        (65, 5),
        (9, 8),
        (300, 63),
        (17, 255),
        (5, 256),
        (3, 257),
        (4, 4099),
    ];
    for (i, &(rows, classes)) in shapes.iter().enumerate() {
        let p = Problem::random(100 + i as u64, rows, classes, 6.0, 0.0);
        let weights = Inputs::new(i as u64).weights(classes);
        let specs = [
            CrossEntropy::new(),
            CrossEntropy::new()
                .with_label_smoothing(0.3)
                .with_weights(weights.clone())
                .with_reduction(Reduction::Sum),
        ];
        for s in strategies(gpu) {
            for spec in &specs {
                for soft in [false, true] {
                    p.check(gpu, spec, soft, Some(s), "strategy");
                }
            }
        }
    }
}

#[test]
fn chunked_batches_match_whole_ones() {
    let Some(gpu) = gpu() else { return };
    // 16 KiB per binding: 1000 rows of 100 classes take 25 chunks.
    let Some(small) = gpu_with_binding_cap(16 << 10) else {
        return;
    };
    let p = Problem::random(8, 1000, 100, 5.0, 0.0);
    for soft in [false, true] {
        for s in [
            None,
            Some(Strategy::NAIVE),
            Some(Strategy {
                split: 4,
                ..Strategy::NAIVE
            }),
        ] {
            let spec = CrossEntropy::new().with_label_smoothing(0.05);
            let chunked = p.check(&small, &spec, soft, s, "chunked");
            let whole = p.check(gpu, &spec, soft, s, "whole");
            // Each row's arithmetic does not depend on the chunk it falls in.
            assert_eq!(chunked.per_row, whole.per_row);
            assert_eq!(chunked.log_sum_exp, whole.log_sum_exp);
        }
    }
    // A row larger than the binding is a clear error, and the context still works.
    let wide = Problem::random(9, 2, 8192, 1.0, 0.0);
    let err = small
        .cross_entropy(&CrossEntropy::new(), wide.logits(), wide.targets(false))
        .unwrap_err();
    assert!(
        matches!(err, xent::XentError::RowTooLarge { classes: 8192, .. }),
        "{err}"
    );
    p.check(&small, &CrossEntropy::new(), false, None, "after error");
}

#[test]
fn results_are_bit_identical_across_runs() {
    let Some(gpu) = gpu() else { return };
    let p = Problem::random(11, 3000, 517, 20.0, 0.0);
    for soft in [false, true] {
        let spec = CrossEntropy::new().with_label_smoothing(0.1);
        let first = gpu
            .cross_entropy(&spec, p.logits(), p.targets(soft))
            .unwrap();
        for _ in 0..3 {
            let again = gpu
                .cross_entropy(&spec, p.logits(), p.targets(soft))
                .unwrap();
            assert_eq!(first.sum.to_bits(), again.sum.to_bits());
            assert!(
                first
                    .per_row
                    .iter()
                    .zip(&again.per_row)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert!(
                first
                    .log_sum_exp
                    .iter()
                    .zip(&again.log_sum_exp)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }
}

#[test]
fn log_sum_exp_and_log_softmax_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (i, &(rows, classes)) in [(1, 1), (70, 3), (13, 1001), (3, 131_073)]
        .iter()
        .enumerate()
    {
        let mut p = Problem::random(20 + i as u64, rows, classes, 30.0, 1e5);
        if classes > 2 {
            p.logits[1] = f32::NEG_INFINITY;
        }
        let max_abs = max_abs_per_row(&p.logits, classes);
        let lse = gpu.log_sum_exp(p.logits()).unwrap();
        let want = cpu::log_sum_exp(p.logits());
        for r in 0..rows {
            let tol = common::row_tolerance(want[r], max_abs[r], 0.0);
            assert!(
                (lse[r] - want[r]).abs() <= tol,
                "lse row {r}: {} vs {}",
                lse[r],
                want[r]
            );
        }
        let lsm = gpu.log_softmax(p.logits()).unwrap();
        let want = cpu::log_softmax(p.logits());
        assert_eq!(lsm.len(), want.len());
        for (j, (&g, &w)) in lsm.iter().zip(&want).enumerate() {
            // (z − m) is exact, so only ln s and the f32 result round.
            assert!(
                common::close(g as f64, w, 1e-5 * w.abs().max(1.0)),
                "log_softmax {j}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn empty_batch_gives_pytorch_values() {
    let Some(gpu) = gpu() else { return };
    let logits = Logits::new::<f32>(&[], 0, 5).unwrap();
    for scorer in [gpu as &dyn Scorer, &CpuReference] {
        for (reduction, want) in [(Reduction::Sum, Some(0.0)), (Reduction::None, None)] {
            let out = scorer
                .cross_entropy(
                    &CrossEntropy::new().with_reduction(reduction),
                    logits,
                    Targets::ClassIndices(&[]),
                )
                .unwrap();
            assert_eq!(out.loss, want);
            assert!(out.per_row.is_empty() && out.log_sum_exp.is_empty());
        }
        let mean = scorer
            .cross_entropy(
                &CrossEntropy::new(),
                logits,
                Targets::probabilities::<f32>(&[]),
            )
            .unwrap();
        assert!(mean.loss.unwrap().is_nan());
    }
}

#[test]
fn runs_on_a_device_the_caller_owns() {
    let Some(_) = gpu() else { return };
    let adapter = xent::gpu::select_adapter().unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    // wgpu's default limits: 128 MiB bindings, 8 storage buffers per stage.
    let ctx = GpuContext::from_device(&device, &queue, Default::default()).unwrap();
    let p = Problem::random(12, 500, 300, 4.0, 0.0);
    for soft in [false, true] {
        p.check(
            &ctx,
            &CrossEntropy::new().with_label_smoothing(0.1),
            soft,
            None,
            "caller's device",
        );
    }
}

/// Rows so long that a lane looping over them would pass llvmpipe's limit of 65,535 loop
/// iterations (which ends the loop early, silently): 2 × 4,200,000 wrong on lavapipe and
/// 2 × 1,000,000 on llvmpipe's GL before the planner bounded the work per lane.
#[test]
fn rows_beyond_the_shader_loop_limit() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes, zeros) in [
        (2, 4_200_000, false),
        (2, 4_200_000, true),
        (3, 1_000_003, false),
    ] {
        let mut p = Problem::random(31, rows, classes, 5.0, 0.0);
        if zeros {
            p.logits.fill(0.0);
        }
        let spec = CrossEntropy::new().with_label_smoothing(0.1);
        let strategy = gpu.plan(rows, classes);
        assert!(
            strategy.elements_per_lane(classes) <= xent::gpu::planner::MAX_ELEMENTS_PER_LANE,
            "{strategy:?}"
        );
        p.check(gpu, &spec, false, None, "long rows");
        let lse = gpu.log_sum_exp(p.logits()).unwrap();
        let want = cpu::log_sum_exp(p.logits());
        for (g, w) in lse.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-5, "lse {g} vs {w}");
        }
    }
    // Log-softmax writes every element of a 1 × 1,000,003 row.
    let p = Problem::random(32, 1, 1_000_003, 5.0, 0.0);
    let got = gpu.log_softmax(p.logits()).unwrap();
    let want = cpu::log_softmax(p.logits());
    for k in (0..want.len()).step_by(997).chain([want.len() - 1]) {
        assert!(
            (got[k] as f64 - want[k]).abs() <= 1e-4,
            "log_softmax {k}: {} vs {}",
            got[k],
            want[k]
        );
    }
}

/// Class weights near f32's limits give the CPU's answer (the device scales them by a power
/// of two and the host divides it out); logits whose differences overflow f32 are refused.
#[test]
fn f32_range_gives_the_cpu_answer_or_an_error() {
    let Some(gpu) = gpu() else { return };
    let p = Problem::random(41, 6, 5, 3.0, 0.0);
    for w in [1e38_f32, 3e-39, 1e-45] {
        for smoothing in [0.0, 0.2] {
            let spec = CrossEntropy::new()
                .with_weights(vec![w; 5])
                .with_label_smoothing(smoothing);
            let reference = cpu::cross_entropy(&spec, p.logits(), p.targets(false)).unwrap();
            let got = gpu
                .cross_entropy(&spec, p.logits(), p.targets(false))
                .unwrap();
            let (g, r) = (got.loss.unwrap(), reference.loss.unwrap());
            assert!(
                (g - r).abs() <= 1e-5 * r.abs(),
                "weights {w:e} ε {smoothing}: {g} vs {r}"
            );
            let sum = CrossEntropy::new()
                .with_reduction(Reduction::Sum)
                .with_weights(vec![w; 5]);
            let g = gpu
                .cross_entropy(&sum, p.logits(), p.targets(false))
                .unwrap()
                .loss
                .unwrap();
            let r = cpu::cross_entropy(&sum, p.logits(), p.targets(false))
                .unwrap()
                .loss
                .unwrap();
            assert!(
                (g - r).abs() <= 1e-5 * r.abs(),
                "sum, weights {w:e}: {g} vs {r}"
            );
        }
    }
    let mut wild = p.logits.clone();
    wild[3 * 5 + 1] = 2e38;
    wild[3 * 5 + 2] = -2e38;
    let logits = Logits::new(&wild, 6, 5).unwrap();
    match gpu.cross_entropy(&CrossEntropy::new(), logits, p.targets(false)) {
        Err(xent::XentError::LogitOutOfRange { row: 3 }) => {}
        other => panic!("expected LogitOutOfRange at row 3, got {other:?}"),
    }
    // The CPU reference takes them; the context still works.
    cpu::cross_entropy(&CrossEntropy::new(), logits, p.targets(false)).unwrap();
    p.check(
        gpu,
        &CrossEntropy::new(),
        false,
        None,
        "after a refused call",
    );
}

/// A NaN probability makes the row's entropy NaN on both paths (the CPU reference used to
/// drop the NaN term and report a finite entropy).
#[test]
fn nan_probability_gives_nan_entropy_on_both_paths() {
    let logits = [0.5f32, -1.0, 2.0, 0.0, 0.1, 0.2];
    let probabilities = [0.2f32, f32::NAN, 0.8, 0.0, 0.5, 0.5];
    let z = Logits::new(&logits, 2, 3).unwrap();
    let t = Targets::probabilities(&probabilities);
    let spec = CrossEntropy::new();
    let cpu = CpuReference.cross_entropy(&spec, z, t).unwrap();
    let mut outputs = vec![cpu];
    if let Some(gpu) = gpu() {
        outputs.push(gpu.cross_entropy(&spec, z, t).unwrap());
    }
    for out in outputs {
        let h = out.entropy.unwrap();
        assert!(h[0].is_nan() && out.per_row[0].is_nan(), "{h:?}");
        assert!((h[1] - 2f64.ln()).abs() < 1e-6, "{h:?}");
    }
}

/// More rows than one prepared call of the host path holds (2^20): the rows go through several
/// calls, summed in f64, and the gradient of the mean keeps the whole batch's scale.
#[test]
fn more_rows_than_one_host_call() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = ((1 << 20) + 4099, 2);
    let mut p = Problem::random(61, rows, classes, 4.0, 0.0);
    for y in p.labels.iter_mut().step_by(7) {
        *y = -100;
    }
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_weights(vec![0.5, 2.0])
        .with_z_loss(1e-3);
    p.check(gpu, &spec, false, None, "two host calls");
    let up = xent::Upstream::Scalar(1.0);
    let (out, grad) = gpu
        .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
        .map(|(o, g)| (o, g.to_f32()))
        .unwrap();
    let (want_out, want) =
        cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), up).unwrap();
    assert!(
        (out.loss.unwrap() - want_out.loss.unwrap()).abs() <= 1e-5 * want_out.loss.unwrap().abs()
    );
    // Each element is s·(B·q − a) with s = 1/Σw_y ≈ 1e-6: an absolute 1e-5·s·(1 + B) covers f32.
    let s = 1.0 / want_out.mean_denominator;
    for (k, (&g, &w)) in grad.iter().zip(&want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * s * 3.0,
            "element {k}: {g} vs {w}"
        );
    }
}

/// Edge cases a differential fuzzer found, each against the f64 reference: an infinite row
/// loss makes the reduced loss infinite (not NaN: the device's compensated sum has no error
/// term for an infinite sum); an ignored row of only −inf logits adds no z-loss (not
/// 0·(λ·lse²) = NaN); the mean over probability targets with class weights far from 1 divides
/// by the row count, not by it times the weights' scale.
#[test]
fn infinite_rows_ignored_masked_rows_and_weighted_probabilities() {
    let Some(gpu) = gpu() else { return };
    let inf = f32::INFINITY;
    let agree = |label: &str, got: Option<f64>, want: Option<f64>| {
        let (g, w) = (got.unwrap(), want.unwrap());
        let same = if w.is_finite() {
            (g - w).abs() <= 1e-5 * w.abs() + 1e-6
        } else {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        };
        assert!(same, "{label}: {g} vs {w}");
    };
    let z = [0.0, -inf, 0.0, 0.0];
    for (weights, reduction) in [
        (None, Reduction::Sum),
        (None, Reduction::Mean),
        (Some(vec![1.0, -2.0]), Reduction::Sum),
    ] {
        let mut spec = CrossEntropy::new().with_reduction(reduction);
        if let Some(w) = weights {
            spec = spec.with_weights(w);
        }
        let t = Targets::ClassIndices(&[1, 0]);
        let logits = Logits::new(&z, 2, 2).unwrap();
        let got = gpu.cross_entropy(&spec, logits, t).unwrap();
        let want = cpu::cross_entropy(&spec, logits, t).unwrap();
        assert!(want.loss.unwrap().is_infinite(), "{spec:?}");
        agree(&format!("{spec:?}"), got.loss, want.loss);
    }
    let z = [-inf, -inf, 0.0, 1.0];
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_z_loss(1e-4);
    let t = Targets::ClassIndices(&[-100, 0]);
    let logits = Logits::new(&z, 2, 2).unwrap();
    let got = gpu.cross_entropy(&spec, logits, t).unwrap();
    let want = cpu::cross_entropy(&spec, logits, t).unwrap();
    agree("ignored masked row, loss", got.loss, want.loss);
    agree(
        "ignored masked row, z-loss",
        got.z_loss_sum,
        want.z_loss_sum,
    );
    let z = [0.0, 1.0, 2.0, 0.5];
    let p = [0.25, 0.75, 1.0, 0.0];
    for w in [[1e7_f32, 1.0], [1.0, 1e-30], [1e30, 3.0]] {
        let spec = CrossEntropy::new()
            .with_weights(w.to_vec())
            .with_reduction(Reduction::Mean);
        let logits = Logits::new(&z, 2, 2).unwrap();
        let got = gpu
            .cross_entropy(&spec, logits, Targets::probabilities(&p))
            .unwrap();
        let want = cpu::cross_entropy(&spec, logits, Targets::probabilities(&p)).unwrap();
        assert_eq!(got.mean_denominator, 2.0, "weights {w:?}");
        agree(&format!("weights {w:?}"), got.loss, want.loss);
    }
}
