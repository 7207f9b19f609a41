//! Top-k sparse targets on the GPU (issue 11): the golden case `sparse_top8` (loss per row,
//! the gradient of the sum), random rows on every strategy corner and half logits against the
//! f64 reference, the device path's packed layout, and an index out of range or repeated,
//! named by row, found on the host and on the device.

mod common;

use common::{
    assert_gradient, buffer_with, corner_strategies, golden_case, gpu, row_tolerance, ulp_f32,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::planner::MAX_ELEMENTS_PER_LANE;
use xent::scoring::{self, SparseTargets};
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, Dtype, ElementVec, Logits, LossShape, Reduction,
    Strategy, TargetLayout, Upstream, XentError,
};

fn max_abs(row: &[f32]) -> f64 {
    row.iter()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, |m, &v| m.max((v as f64).abs()))
}

#[test]
fn golden_sparse_case_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let case = golden_case("sparse_top8");
    let (rows, classes) = (case.rows(), case.classes());
    let k = case.number("k") as usize;
    let z = case.f32s("logits.npy");
    let idx = case.i64s("topk_idx.npy");
    let p = case.f32s("topk_prob.npy");
    let logits = Logits::new(&z, rows, classes).unwrap();
    let targets = SparseTargets::new(&idx, &p, k);
    let (out, grad) = gpu
        .sparse_cross_entropy_grad(
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            logits,
            targets,
            Upstream::Scalar(1.0),
        )
        .unwrap();
    let want = case.f64s("loss_none.npy");
    let m = |i: usize| max_abs(&z[i * classes..(i + 1) * classes]);
    for (i, (got, want)) in out.per_row.iter().zip(&want).enumerate() {
        let tol = row_tolerance(*want, m(i), 1.0);
        assert!((got - want).abs() <= tol, "row {i}: {got} vs {want}");
    }
    let sum_tol: f64 = (0..rows).map(|i| row_tolerance(want[i], m(i), 1.0)).sum();
    assert!((out.loss.unwrap() - case.number("sum")).abs() <= sum_tol);
    let mean = gpu
        .sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::Mean),
            logits,
            targets,
        )
        .unwrap();
    assert!((mean.loss.unwrap() - case.number("mean")).abs() <= sum_tol / rows as f64);
    let want = case.f32s("grad_sum.npy");
    for (j, (&g, &w)) in grad.to_f32().iter().zip(&want).enumerate() {
        let i = j / classes;
        let tol = common::element_tolerance(1.0, 1.0, m(i)) + 0.5 * ulp_f32(w as f64);
        assert!(
            (g - w).abs() as f64 <= tol,
            "gradient row {i} class {}: {g} vs {w}",
            j % classes
        );
    }
}

/// Per-row losses against the reference within `row_tolerance` (rows' largest |logit| and
/// target mass).
fn assert_rows(label: &str, got: &[f64], want: &[f64], max: &[f64], mass: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = row_tolerance(*w, max[i], mass[i]);
        assert!((g - w).abs() <= tol, "{label} row {i}: {g} vs {w}");
    }
}

/// Random logits and k distinct indices per row with random probabilities (not normalised:
/// B = Σ p is used as given).
fn random_sparse(
    seed: u64,
    rows: usize,
    classes: usize,
    k: usize,
) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let z: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-8.0..8.0))
        .collect();
    let mut idx = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < k {
            let c = rng.random_range(0..classes as i64);
            if !row.contains(&c) {
                row.push(c);
            }
        }
        idx.extend(row);
    }
    let mut z: Vec<f32> = z;
    let mut p: Vec<f32> = (0..rows * k).map(|_| rng.random_range(0.0..0.4)).collect();
    // Every third row's last entry: p = 0 on a masked class, which adds nothing.
    for i in (1..rows).step_by(3).filter(|_| k >= 2) {
        p[i * k + k - 1] = 0.0;
        z[i * classes + idx[i * k + k - 1] as usize] = f32::NEG_INFINITY;
    }
    (z, idx, p)
}

#[test]
fn sparse_targets_on_every_strategy_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, classes, k)) in [
        (7, 1, 1),
        (5, 3, 2),
        (9, 37, 5),
        (4, 1000, 8),
        (3, 50257, 16),
        // More entries than the compilers unroll a loop over, and the most the GPU takes.
        (3, 77, 33),
        (2, 300, xent::gpu::MAX_SPARSE_K),
    ]
    .into_iter()
    .enumerate()
    {
        let (z, idx, p) = random_sparse(seed as u64, rows, classes, k);
        let logits = Logits::new(&z, rows, classes).unwrap();
        let targets = SparseTargets::new(&idx, &p, k);
        let g: Vec<f64> = (0..rows).map(|i| 1.0 - 0.25 * i as f64).collect();
        let up = Upstream::PerRow(&g);
        let (want, want_grad) = scoring::sparse_cross_entropy_grad(
            &CrossEntropy::new().with_reduction(Reduction::None),
            logits,
            targets,
            up,
        )
        .unwrap();
        let mass: Vec<f64> = (0..rows)
            .map(|i| p[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum())
            .collect();
        let max: Vec<f64> = (0..rows)
            .map(|i| max_abs(&z[i * classes..(i + 1) * classes]))
            .collect();
        let fits = |s: &Strategy| s.elements_per_lane(classes) <= MAX_ELEMENTS_PER_LANE;
        for strategy in corner_strategies(gpu).into_iter().filter(fits) {
            let label = format!("{rows}x{classes} k={k} {}", strategy.name());
            let (out, grad) = gpu
                .sparse_cross_entropy_grad_with(
                    &CrossEntropy::new().with_reduction(Reduction::None),
                    logits,
                    targets,
                    up,
                    strategy,
                )
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_rows(&label, &out.per_row, &want.per_row, &max, &mass);
            assert_gradient(
                &label,
                &grad.to_f32(),
                &want_grad,
                classes,
                &|i| g[i],
                &mass,
                &max,
                Dtype::F32,
            );
        }
    }
}

/// The GPU's loss and gradient (upstream 1) of `rounded` logits against top-k targets on
/// `strategy`, against the f64 reference on the same values; returns the gradient.
fn assert_top_k_rows(
    gpu: &xent::GpuContext,
    spec: &CrossEntropy,
    rounded: &ElementVec,
    classes: usize,
    (idx, p, k): (&[i64], &[f32], usize),
    strategy: Strategy,
) -> ElementVec {
    let rows = rounded.len() / classes;
    let dtype = rounded.dtype();
    let wide = rounded.to_f32();
    let targets = SparseTargets::new(idx, p, k);
    let up = Upstream::Scalar(1.0);
    let reference = Logits::new(&wide, rows, classes).unwrap();
    let (want, want_grad) =
        scoring::sparse_cross_entropy_grad(spec, reference, targets, up).unwrap();
    let label = format!("{rows}x{classes} {dtype} k={k} {}", strategy.name());
    let logits = Logits::from_elements(rounded.as_elements(), rows, classes).unwrap();
    let (out, grad) = gpu
        .sparse_cross_entropy_grad_with(spec, logits, targets, up, strategy)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let max: Vec<f64> = (0..rows)
        .map(|i| max_abs(&wide[i * classes..(i + 1) * classes]))
        .collect();
    let mass: Vec<f64> = (0..rows)
        .map(|i| p[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum())
        .collect();
    assert_rows(&label, &out.per_row, &want.per_row, &max, &mass);
    let scale = match spec.reduction() {
        Reduction::Mean => 1.0 / rows as f64,
        _ => 1.0,
    };
    assert_gradient(
        &label,
        &grad.to_f32(),
        &want_grad,
        classes,
        &|_| scale,
        &mass,
        &max,
        dtype,
    );
    grad
}

/// The most entries the GPU takes on long rows, one lane a row (all entries that lane's, and
/// on llvmpipe eight rows to one SIMD batch, whose loops share one budget of 65,535
/// iterations: past it llvmpipe ends them silently) and on the planner's strategy, in f32 and
/// the half types. (Each class used to be compared with all k entries beyond 32 of them, and
/// from about class 65,536 / k of a lane on the gradient came out 0; then a search of the
/// entries per entry met, and a loop in the per-class code, which llvmpipe enters for every
/// class, overran it too.) One entry more is refused, on the host path and on device buffers;
/// the f64 reference takes any k.
#[test]
fn many_entries_on_long_rows_keep_their_gradient() {
    let Some(gpu) = gpu() else { return };
    let one_lane = Some(common::plain_strategy(256, 1, 1, true));
    // Scalar loads: a lane's loop over its row takes one iteration a class.
    let scalar = Some(common::plain_strategy(256, 1, 1, false));
    let k = xent::gpu::MAX_SPARSE_K;
    for (seed, (rows, classes, strategy, dtype)) in [
        (1, 32768, one_lane, Dtype::F32),
        (9, 32768, scalar, Dtype::F32),
        (8, 1000, one_lane, Dtype::F32),
        (4, 16384, one_lane, Dtype::F16),
        (1, 32768, None, Dtype::F16),
        (2, 32769, None, Dtype::Bf16),
    ]
    .into_iter()
    .enumerate()
    {
        let (z, idx, p) = random_sparse(60 + seed as u64, rows, classes, k);
        let rounded = ElementVec::rounded(dtype, z.iter().map(|&v| v as f64));
        let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
        let strategy = strategy.unwrap_or_else(|| gpu.plan(rows, classes));
        assert_top_k_rows(gpu, &spec, &rounded, classes, (&idx, &p, k), strategy);
    }
    // One entry more than the GPU takes.
    let (rows, classes, k) = (2, 300, k + 1);
    let (z, idx, p) = random_sparse(70, rows, classes, k);
    let spec = CrossEntropy::new();
    let logits = Logits::new(&z, rows, classes).unwrap();
    let e = gpu
        .sparse_cross_entropy(&spec, logits, SparseTargets::new(&idx, &p, k))
        .unwrap_err();
    let most = xent::gpu::MAX_SPARSE_K;
    assert!(
        matches!(e, XentError::SparseK { k: kk, max } if kk == most + 1 && max == most),
        "{e}"
    );
    let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
    assert!(matches!(
        gpu.prepare(&spec, shape),
        Err(XentError::SparseK { .. })
    ));
    // The reference takes any k.
    scoring::sparse_cross_entropy(&spec, logits, SparseTargets::new(&idx, &p, k)).unwrap();
}

/// Every entry of a row on one lane of the gradient (classes a lane count apart; for halves,
/// a word count), in decreasing class order, on strategies of 8, 256 and 3 × 256 lanes a row
/// (a split row's entries sorted by the lanes of all its workgroups) and f32, bf16 and f16: the lane walks
/// them all, and the other lanes none. Into a buffer and in place on the device path too,
/// byte for byte the host path's.
#[test]
fn entries_crowded_onto_one_lane_keep_their_gradient() {
    let Some(gpu) = gpu() else { return };
    let s = common::plain_strategy;
    let (rows, classes) = (3, 32769);
    for (strategy, dtype) in [
        (s(256, 8, 1, true), Dtype::F32),
        (s(256, 8, 1, true), Dtype::F16),
        (s(256, 256, 1, true), Dtype::Bf16),
        (s(256, 256, 3, true), Dtype::F32),
        (s(256, 256, 3, false), Dtype::Bf16),
    ] {
        let lanes = (strategy.lanes_per_row * strategy.split) as usize;
        let stride = if dtype == Dtype::F32 {
            lanes
        } else {
            2 * lanes
        };
        let k = xent::gpu::MAX_SPARSE_K.min((classes - 2) / stride);
        let (z, _, p) = random_sparse(80, rows, classes, k);
        // Row i's entries: classes 2i + 1 + stride·(k − 1 − j), the last entry's first.
        let idx: Vec<i64> = (0..rows)
            .flat_map(|i| (0..k).map(move |j| (2 * i + 1 + stride * (k - 1 - j)) as i64))
            .collect();
        let rounded = ElementVec::rounded(dtype, z.iter().map(|&v| v as f64));
        let spec = CrossEntropy::new().with_reduction(Reduction::Mean);
        let up = Upstream::Scalar(1.0);
        let label = format!("{rows}x{classes} {dtype} k={k} {}", strategy.name());
        let grad = assert_top_k_rows(gpu, &spec, &rounded, classes, (&idx, &p, k), strategy);
        // The device path: into a buffer, then in place.
        let shape =
            LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 }).with_dtype(dtype);
        let mut loss = gpu.prepare_with(&spec, shape, strategy).unwrap();
        let bytes = rounded.bytes();
        let z_buffer = buffer_with(gpu, 0, bytes);
        let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(&idx, &p, k)));
        let g_buffer = buffer_with(gpu, 0, &vec![0xa5; bytes.len()]);
        let view = DeviceLogits::new(&z_buffer, 0, rows, classes).with_dtype(dtype);
        let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
        let read = |buffer: &wgpu::Buffer, at: usize| {
            let words = common::read_f32(gpu, buffer, 0, (at + bytes.len()).div_ceil(4));
            bytemuck::cast_slice::<f32, u8>(&words)[at..at + bytes.len()].to_vec()
        };
        let into = xent::GradientOutput::Buffer {
            buffer: &g_buffer,
            offset: 0,
        };
        loss.run_gradient(view, t, into, up).unwrap();
        assert_eq!(read(&g_buffer, 0), grad.bytes(), "{label}: into a buffer");
        // One element further on (halves: the output words of a row are not the logits'):
        // the lanes that write each class are the statistics pass's sort's too.
        let at = dtype.bytes();
        let shifted = buffer_with(gpu, at, &vec![0xa5; bytes.len()]);
        let into = xent::GradientOutput::Buffer {
            buffer: &shifted,
            offset: at as u64,
        };
        loss.run_gradient(view, t, into, up).unwrap();
        assert_eq!(read(&shifted, at), grad.bytes(), "{label}: shifted");
        loss.run_gradient(view, t, xent::GradientOutput::InPlace, up)
            .unwrap();
        assert_eq!(read(&z_buffer, 0), grad.bytes(), "{label}: in place");
    }
}

/// A gradient call whose top-k entries the device finds in error (a class out of range, a
/// repeated class; the host path refuses them before they reach the device): the read names
/// the row, that row's gradient is NaN, every other row's is the host path's, bit for bit and
/// again on a rerun, and the next call is right.
#[test]
fn entries_in_error_in_a_gradient_call() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (20, 513, 40);
    let (z, idx, p) = random_sparse(24, rows, classes, k);
    let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
    let up = Upstream::Scalar(1.0);
    let logits = Logits::new(&z, rows, classes).unwrap();
    let (_, host) = gpu
        .sparse_cross_entropy_grad(&spec, logits, SparseTargets::new(&idx, &p, k), up)
        .unwrap();
    let host = host.bytes().to_vec();
    let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
    let mut loss = gpu.prepare(&spec, shape).unwrap();
    let z_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&z));
    let g_buffer = buffer_with(gpu, 0, &vec![0; z.len() * 4]);
    let view = DeviceLogits::new(&z_buffer, 0, rows, classes);
    let mut run = |idx: &[i64]| {
        let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(idx, &p, k)));
        let into = xent::GradientOutput::Buffer {
            buffer: &g_buffer,
            offset: 0,
        };
        let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
        loss.run_gradient(view, t, into, up).unwrap();
        let read = loss.read_totals();
        (read, common::read_f32(gpu, &g_buffer, 0, z.len()))
    };
    let mut out_of_range = idx.clone();
    out_of_range[7 * k + 30] = classes as i64 + 3;
    let mut repeated = idx.clone();
    repeated[11 * k + 35] = repeated[11 * k + 2];
    for (bad, row) in [(&out_of_range, 7), (&repeated, 11)] {
        let (read, grad) = run(bad);
        match read {
            Err(XentError::SparseIndexOutOfRange { row: r, .. }) if bad == &out_of_range => {
                assert_eq!(r, row)
            }
            Err(XentError::SparseDuplicateIndex { row: r, .. }) if bad == &repeated => {
                assert_eq!(r, row)
            }
            other => panic!("row {row}: {other:?}"),
        }
        let bytes: &[u8] = bytemuck::cast_slice(&grad);
        let row_bytes = classes * 4;
        for i in 0..rows {
            let (got, want) = (
                &bytes[i * row_bytes..(i + 1) * row_bytes],
                &host[i * row_bytes..(i + 1) * row_bytes],
            );
            if i == row {
                let values = &grad[i * classes..(i + 1) * classes];
                assert!(values.iter().all(|v| v.is_nan()), "row {row}");
            } else {
                assert_eq!(got, want, "row {i} beside row {row} in error");
            }
        }
        let again = run(bad).1;
        assert_eq!(
            bytemuck::cast_slice::<f32, u8>(&again),
            bytes,
            "row {row}: a rerun"
        );
    }
    let (read, grad) = run(&idx);
    read.unwrap();
    assert_eq!(bytemuck::cast_slice::<f32, u8>(&grad), &host[..]);
}

/// The gradient in a half dtype with an odd C (rows share output words) on every strategy
/// corner, top-k entries on each row's first and last class among them: each class is
/// checked against the entries that fall to the lane writing it.
#[test]
fn half_gradients_of_top_k_targets() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (7, 37, 5);
    let (z, mut idx, p) = random_sparse(23, rows, classes, k);
    for i in 0..rows {
        // Row i's first and last class among its entries (distinct from the others).
        let row = &mut idx[i * k..(i + 1) * k];
        for (slot, class) in [(i % k, 0), ((i + 2) % k, classes as i64 - 1)] {
            if let Some(j) = row.iter().position(|&c| c == class) {
                row.swap(j, slot);
            } else {
                row[slot] = class;
            }
        }
    }
    let targets = SparseTargets::new(&idx, &p, k);
    let mass: Vec<f64> = (0..rows)
        .map(|i| p[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum())
        .collect();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let half = ElementVec::rounded(dtype, z.iter().map(|&v| v as f64));
        let wide = half.to_f32();
        let (_, want) = scoring::sparse_cross_entropy_grad(
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            Logits::new(&wide, rows, classes).unwrap(),
            targets,
            Upstream::Scalar(1.0),
        )
        .unwrap();
        let max: Vec<f64> = (0..rows)
            .map(|i| max_abs(&wide[i * classes..(i + 1) * classes]))
            .collect();
        let logits = Logits::from_elements(half.as_elements(), rows, classes).unwrap();
        for strategy in corner_strategies(gpu) {
            let label = format!("{dtype} {}", strategy.name());
            let (_, grad) = gpu
                .sparse_cross_entropy_grad_with(
                    &CrossEntropy::new().with_reduction(Reduction::Sum),
                    logits,
                    targets,
                    Upstream::Scalar(1.0),
                    strategy,
                )
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(grad.dtype(), dtype);
            assert_gradient(
                &label,
                &grad.to_f32(),
                &want,
                classes,
                &|_| 1.0,
                &mass,
                &max,
                dtype,
            );
        }
    }
}

#[test]
fn half_logits_and_errors_naming_the_row() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (5, 300, 4);
    let (z, idx, p) = random_sparse(17, rows, classes, k);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let half = ElementVec::rounded(dtype, z.iter().map(|&v| v as f64));
        let wide = half.to_f32();
        let targets = SparseTargets::new(&idx, &p, k);
        let want = scoring::sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::None),
            Logits::new(&wide, rows, classes).unwrap(),
            targets,
        )
        .unwrap();
        let logits = Logits::from_elements(half.as_elements(), rows, classes).unwrap();
        let got = gpu
            .sparse_cross_entropy(
                &CrossEntropy::new().with_reduction(Reduction::None),
                logits,
                targets,
            )
            .unwrap();
        for i in 0..rows {
            let tol = row_tolerance(want.per_row[i], 8.0, 2.0);
            assert!(
                (got.per_row[i] - want.per_row[i]).abs() <= tol,
                "{dtype} row {i}"
            );
        }
    }
    let logits = Logits::new(&z, rows, classes).unwrap();
    let mut bad = idx.clone();
    bad[2 * k + 1] = classes as i64;
    assert!(matches!(
        gpu.sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            logits,
            SparseTargets::new(&bad, &p, k)
        ),
        Err(XentError::SparseIndexOutOfRange { row: 2, .. })
    ));
    let mut dup = idx.clone();
    dup[3 * k + 2] = dup[3 * k];
    assert!(matches!(
        gpu.sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::Sum),
            logits,
            SparseTargets::new(&dup, &p, k)
        ),
        Err(XentError::SparseDuplicateIndex { row: 3, .. })
    ));
}

/// The device's check of a row's entries, shared by the lanes (and split workgroups) of every
/// strategy: entries in error on any lane, in loss and in gradient calls, are found and the
/// first of the first row in error (in entry order) named exactly, as the host path names it,
/// also at the longest loops; the prepared loss then scores clean targets (loss, gradient) as
/// the host path does.
#[test]
fn entries_in_error_on_every_strategy_name_the_first() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (4, 300, 40);
    let (z, idx, p) = random_sparse(31, rows, classes, k);
    let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
    let logits = Logits::new(&z, rows, classes).unwrap();
    let z_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&z));
    let g_buffer = buffer_with(gpu, 0, &vec![0; z.len() * 4]);
    let view = DeviceLogits::new(&z_buffer, 0, rows, classes);
    // The targets with entry j of a row given another index (an earlier entry's: a repeat).
    let with = |changes: &[(usize, usize, i64)]| {
        let mut bad = idx.clone();
        for &(row, j, index) in changes {
            bad[row * k + j] = index;
        }
        bad
    };
    let cases = [
        (
            with(&[(1, k - 1, classes as i64 + 5)]),
            XentError::SparseIndexOutOfRange {
                row: 1,
                value: classes as i64 + 5,
                classes,
            },
        ),
        (
            with(&[(2, 37, idx[2 * k + 1])]),
            XentError::SparseDuplicateIndex {
                row: 2,
                class: idx[2 * k + 1],
            },
        ),
        // Two in one row: the repeat at entry 20 comes before the negative index at 33.
        (
            with(&[(3, 33, -7), (3, 20, idx[3 * k + 19])]),
            XentError::SparseDuplicateIndex {
                row: 3,
                class: idx[3 * k + 19],
            },
        ),
        (
            with(&[(0, 5, -7)]),
            XentError::SparseIndexOutOfRange {
                row: 0,
                value: -7,
                classes,
            },
        ),
        // Two rows in error: the first is named.
        (
            with(&[(3, 39, classes as i64), (2, 38, idx[2 * k + 36])]),
            XentError::SparseDuplicateIndex {
                row: 2,
                class: idx[2 * k + 36],
            },
        ),
    ];
    let named = |read: xent::Result<xent::LossTotals>, want: &XentError, what: &str| {
        assert_eq!(read.unwrap_err().to_string(), want.to_string(), "{what}");
    };
    // The host path (which checks on the host) names the same entry.
    for (bad, want) in &cases {
        let read = gpu
            .sparse_cross_entropy(&spec, logits, SparseTargets::new(bad, &p, k))
            .map(|out| out.totals());
        named(read, want, "host path");
    }
    let up = Upstream::Scalar(1.0);
    let into = || xent::GradientOutput::Buffer {
        buffer: &g_buffer,
        offset: 0,
    };
    let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
    // Beside the corners, a row split over three workgroups of 32 lanes: entries 32 to 39 fall
    // to the second.
    let split = common::plain_strategy(32, 32, 3, true);
    for strategy in corner_strategies(gpu).into_iter().chain([split]) {
        let name = strategy.name();
        let mut loss = gpu.prepare_with(&spec, shape, strategy).unwrap();
        for (bad, want) in &cases {
            let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(bad, &p, k)));
            let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
            loss.run(view, t).unwrap();
            named(loss.read_totals(), want, &format!("{name}: loss"));
            loss.run_gradient(view, t, into(), up).unwrap();
            named(loss.read_totals(), want, &format!("{name}: gradient"));
        }
        let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(&idx, &p, k)));
        let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
        loss.run(view, t).unwrap();
        let targets = SparseTargets::new(&idx, &p, k);
        let host = gpu
            .sparse_cross_entropy_with(&spec, logits, targets, strategy)
            .unwrap();
        assert_eq!(loss.read_totals().unwrap().sum, host.sum, "{name}: clean");
        loss.run_gradient(view, t, into(), up).unwrap();
        let (host, grad) = gpu
            .sparse_cross_entropy_grad_with(&spec, logits, targets, up, strategy)
            .unwrap();
        assert_eq!(loss.read_totals().unwrap().sum, host.sum, "{name}: clean");
        let got = common::read_f32(gpu, &g_buffer, 0, z.len());
        assert_eq!(
            bytemuck::cast_slice::<f32, u8>(&got),
            grad.bytes(),
            "{name}: clean gradient"
        );
    }
    // The longest loops (llvmpipe ends them all after 65,535 iterations): one lane a row of
    // 32,768 classes with scalar loads and the most entries, the last repeating the one before
    // it (found after all the others are checked).
    let (rows, classes, k) = (1, 32768, xent::gpu::MAX_SPARSE_K);
    let (z, mut idx, p) = random_sparse(32, rows, classes, k);
    idx[k - 1] = idx[k - 2];
    let want = XentError::SparseDuplicateIndex {
        row: 0,
        class: idx[k - 2],
    };
    let z_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&z));
    let g_buffer = buffer_with(gpu, 0, &vec![0; z.len() * 4]);
    let view = DeviceLogits::new(&z_buffer, 0, rows, classes);
    let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(&idx, &p, k)));
    let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
    let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
    let scalar = common::plain_strategy(256, 1, 1, false);
    let mut loss = gpu.prepare_with(&spec, shape, scalar).unwrap();
    loss.run(view, t).unwrap();
    named(loss.read_totals(), &want, "one lane: loss");
    let into = xent::GradientOutput::Buffer {
        buffer: &g_buffer,
        offset: 0,
    };
    loss.run_gradient(view, t, into, up).unwrap();
    named(loss.read_totals(), &want, "one lane: gradient");
}

/// Packs top-k targets as `TargetLayout::TopK` lays them out.
fn packed(idx: &[i64], p: &[f32], k: usize) -> Vec<u32> {
    idx.chunks(k)
        .zip(p.chunks(k))
        .flat_map(|(i, p)| {
            i.iter()
                .map(|&c| c as i32 as u32)
                .chain(p.iter().map(|v| v.to_bits()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn device_buffers_of_packed_top_k_targets() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (20, 513, 3);
    let (z, idx, p) = random_sparse(23, rows, classes, k);
    let host = gpu
        .sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::Mean),
            Logits::new(&z, rows, classes).unwrap(),
            SparseTargets::new(&idx, &p, k),
        )
        .unwrap();
    let logits = buffer_with(gpu, 16, bytemuck::cast_slice(&z));
    let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
    let spec = CrossEntropy::new().with_reduction(Reduction::Mean);
    let mut loss = gpu.prepare(&spec, shape).unwrap();
    let view = DeviceLogits::new(&logits, 16, rows, classes);
    let run = |loss: &mut xent::PreparedLoss, words: &[u32]| {
        let targets = buffer_with(gpu, 4, bytemuck::cast_slice(words));
        loss.run(view, DeviceTargets::top_k(&targets, 4, k as u32))
            .unwrap();
        loss.read()
    };
    let out = run(&mut loss, &packed(&idx, &p, k)).unwrap();
    assert_eq!(out.per_row, host.per_row, "the same loads, the same bits");
    assert_eq!(out.loss, host.loss);
    let mut bad = idx.clone();
    bad[7 * k + 2] = -5;
    assert!(matches!(
        run(&mut loss, &packed(&bad, &p, k)),
        Err(XentError::SparseIndexOutOfRange {
            row: 7,
            value: -5,
            ..
        })
    ));
    let mut dup = idx.clone();
    dup[11 * k + 1] = dup[11 * k + 2];
    let class = dup[11 * k + 2];
    match run(&mut loss, &packed(&dup, &p, k)) {
        Err(XentError::SparseDuplicateIndex { row: 11, class: c }) => assert_eq!(c, class),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        run(&mut loss, &packed(&idx, &p, k)).unwrap().per_row,
        host.per_row
    );
    // Options the top-k targets do not take, on the device and host paths alike.
    let smoothing = spec.clone().with_label_smoothing(0.1);
    assert!(matches!(
        gpu.prepare(&smoothing, shape),
        Err(XentError::SparseOption("label smoothing"))
    ));
    assert!(matches!(
        gpu.sparse_cross_entropy(
            &spec.clone().with_weights(vec![1.0; classes]),
            Logits::new(&z, rows, classes).unwrap(),
            SparseTargets::new(&idx, &p, k),
        ),
        Err(XentError::SparseOption("class weights"))
    ));
}

/// Soft-capping and the z-loss with top-k targets, as with dense ones: loss, z-loss and
/// gradient against the f64 reference on every reduction and strategy corner (masked classes
/// with p = 0 among the entries, capped to −cap); the device path's outputs are the host
/// path's, bit for bit.
#[test]
fn top_k_with_softcap_and_z_loss_matches_the_reference() {
    let Some(gpu) = gpu() else { return };
    let options = [(0.05, None), (0.0, Some(4.0)), (0.02, Some(30.0))];
    for (seed, (rows, classes, k)) in [(5, 37, 5), (2, 4099, 3)].into_iter().enumerate() {
        let (z, idx, p) = random_sparse(40 + seed as u64, rows, classes, k);
        let logits = Logits::new(&z, rows, classes).unwrap();
        let targets = SparseTargets::new(&idx, &p, k);
        let g: Vec<f64> = (0..rows).map(|i| 1.0 - 0.3 * i as f64).collect();
        let max: Vec<f64> = (0..rows)
            .map(|i| max_abs(&z[i * classes..(i + 1) * classes]))
            .collect();
        for (lambda, cap) in options {
            for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                let mut spec = CrossEntropy::new()
                    .with_reduction(reduction)
                    .with_z_loss(lambda);
                if let Some(cap) = cap {
                    spec = spec.with_softcap(cap);
                }
                let up = match reduction {
                    Reduction::None => Upstream::PerRow(&g),
                    _ => Upstream::Scalar(0.75),
                };
                let (want, want_grad) =
                    scoring::sparse_cross_entropy_grad(&spec, logits, targets, up).unwrap();
                // B plus the z-loss's 2λ·(1 + |lse|), the weight of lse's error in a row.
                let mass: Vec<f64> = (0..rows)
                    .map(|i| {
                        let b: f64 = p[i * k..(i + 1) * k].iter().map(|&v| v as f64).sum();
                        b + 2.0 * lambda * (1.0 + want.log_sum_exp[i].abs())
                    })
                    .collect();
                let scale = |i: usize| match reduction {
                    Reduction::None => g[i],
                    Reduction::Sum => 0.75,
                    Reduction::Mean => 0.75 / rows as f64,
                };
                // Every corner for both options together (the kernels' variants are costly
                // to compile on a software device); the planner's strategy for each alone.
                let strategies = match (lambda > 0.0, cap) {
                    (true, Some(_)) => corner_strategies(gpu),
                    _ => vec![gpu.plan(rows, classes)],
                };
                let fits = |s: &Strategy| s.elements_per_lane(classes) <= MAX_ELEMENTS_PER_LANE;
                for strategy in strategies.into_iter().filter(fits) {
                    let label = format!(
                        "{rows}x{classes} k={k} λ {lambda} cap {cap:?} {reduction:?} {}",
                        strategy.name()
                    );
                    let (out, grad) = gpu
                        .sparse_cross_entropy_grad_with(&spec, logits, targets, up, strategy)
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_rows(&label, &out.per_row, &want.per_row, &max, &mass);
                    assert_eq!(out.z_loss.is_some(), lambda > 0.0, "{label}");
                    if let (Some(got), Some(w)) = (out.z_loss_sum, want.z_loss_sum) {
                        assert!(
                            (got - w).abs() <= 1e-5 * w.abs() + 1e-6,
                            "{label}: z-loss {got} vs {w}"
                        );
                    }
                    if let (Some(got), Some(w)) = (out.loss, want.loss) {
                        assert!(
                            (got - w).abs() <= 1e-5 * w.abs() + 1e-5,
                            "{label}: loss {got} vs {w}"
                        );
                    }
                    assert_gradient(
                        &label,
                        &grad.to_f32(),
                        &want_grad,
                        classes,
                        &scale,
                        &mass,
                        &max,
                        Dtype::F32,
                    );
                }
                // The device path: the same prepared loss the host path runs.
                let (host, host_grad) = gpu
                    .sparse_cross_entropy_grad(&spec, logits, targets, up)
                    .unwrap();
                let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 });
                let mut loss = gpu.prepare(&spec, shape).unwrap();
                let z_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&z));
                let t_buffer = buffer_with(gpu, 0, bytemuck::cast_slice(&packed(&idx, &p, k)));
                let g_buffer = buffer_with(gpu, 0, &vec![0; z.len() * 4]);
                let view = DeviceLogits::new(&z_buffer, 0, rows, classes);
                let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
                let into = xent::GradientOutput::Buffer {
                    buffer: &g_buffer,
                    offset: 0,
                };
                loss.run_gradient(view, t, into, up).unwrap();
                let out = loss.read().unwrap();
                let label = format!("device {rows}x{classes} λ {lambda} cap {cap:?} {reduction:?}");
                assert_eq!(out.per_row, host.per_row, "{label}");
                assert_eq!(out.z_loss, host.z_loss, "{label}");
                assert_eq!(out.loss, host.loss, "{label}");
                let got = common::read_f32(gpu, &g_buffer, 0, z.len());
                assert_eq!(got, host_grad.to_f32(), "{label}: gradient");
            }
        }
    }
}

/// Top-k gradients of half logits on device buffers cut into chunks whose first row starts
/// inside a word (a 2 KiB binding, an odd C, the logits 6 bytes into their buffer), entries on
/// each row's first and last class: into a buffer and in place, byte for byte the host path's.
#[test]
fn top_k_half_gradients_across_chunks_that_start_inside_a_word() {
    let Some(gpu) = gpu() else { return };
    let Some(capped) = common::gpu_with_binding_cap(2048) else {
        return;
    };
    let (rows, classes, k) = (205, 7, 3);
    let (z, mut idx, p) = random_sparse(5, rows, classes, k);
    for i in 0..rows {
        let row = &mut idx[i * k..(i + 1) * k];
        for (slot, class) in [(i % k, 0), ((i + 1) % k, classes as i64 - 1)] {
            if let Some(j) = row.iter().position(|&c| c == class) {
                row.swap(j, slot);
            } else {
                row[slot] = class;
            }
        }
    }
    let targets = SparseTargets::new(&idx, &p, k);
    let half = ElementVec::rounded(Dtype::Bf16, z.iter().map(|&v| v as f64));
    let logits = Logits::from_elements(half.as_elements(), rows, classes).unwrap();
    let up = Upstream::Scalar(1.0);
    let pad = 6;
    let bytes = half.bytes().len();
    let read = |ctx: &xent::GpuContext, buffer: &wgpu::Buffer| {
        let words = common::read_f32(ctx, buffer, 0, (pad + bytes + 2).div_ceil(4));
        bytemuck::cast_slice::<f32, u8>(&words)[pad..pad + bytes].to_vec()
    };
    for strategy in corner_strategies(gpu) {
        let (_, host) = gpu
            .sparse_cross_entropy_grad_with(
                &CrossEntropy::new().with_reduction(Reduction::Sum),
                logits,
                targets,
                up,
                strategy,
            )
            .unwrap();
        let shape = LossShape::new(rows, classes, TargetLayout::TopK { k: k as u32 })
            .with_dtype(Dtype::Bf16);
        let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
        let mut loss = capped.prepare_with(&spec, shape, strategy).unwrap();
        // 2870 bytes of logits in 2 KiB bindings: at least two chunks.
        let label = strategy.name();
        let z_buffer = buffer_with(&capped, pad, half.bytes());
        let t_buffer = buffer_with(&capped, 0, bytemuck::cast_slice(&packed(&idx, &p, k)));
        let g_buffer = buffer_with(&capped, pad, &vec![0xa5; bytes]);
        let view = DeviceLogits::new(&z_buffer, pad as u64, rows, classes).with_dtype(Dtype::Bf16);
        let t = DeviceTargets::top_k(&t_buffer, 0, k as u32);
        let out = xent::GradientOutput::Buffer {
            buffer: &g_buffer,
            offset: pad as u64,
        };
        loss.run_gradient(view, t, out, up).unwrap();
        assert_eq!(
            read(&capped, &g_buffer),
            host.bytes(),
            "{label}: into a buffer"
        );
        loss.run_gradient(view, t, xent::GradientOutput::InPlace, up)
            .unwrap();
        assert_eq!(read(&capped, &z_buffer), host.bytes(), "{label}: in place");
    }
}

/// A row without a softmax (+inf, NaN, or only −inf logits) is NaN on the GPU and in the f64
/// reference alike, even when its only entry has p = 0 (the reference dropped such entries
/// before it saw the row).
#[test]
fn rows_without_a_softmax_are_nan_whatever_their_entries() {
    let Some(gpu) = gpu() else { return };
    let ninf = f32::NEG_INFINITY;
    let rows = [
        [f32::INFINITY, -2.0, 1.0],
        [f32::NAN, -2.0, 1.0],
        [ninf, ninf, ninf],
        [0.5, -2.0, 1.0],
    ];
    let z: Vec<f32> = rows.concat();
    let idx = [0_i64, 1, 2, 0];
    let p = [0.0_f32, 0.0, 0.0, 0.0];
    let logits = Logits::new(&z, 4, 3).unwrap();
    let targets = SparseTargets::new(&idx, &p, 1);
    let want = scoring::sparse_cross_entropy(
        &CrossEntropy::new().with_reduction(Reduction::None),
        logits,
        targets,
    )
    .unwrap();
    let got = gpu
        .sparse_cross_entropy(
            &CrossEntropy::new().with_reduction(Reduction::None),
            logits,
            targets,
        )
        .unwrap();
    for i in 0..3 {
        assert!(
            want.per_row[i].is_nan() && got.per_row[i].is_nan(),
            "row {i}"
        );
    }
    assert_eq!((want.per_row[3], got.per_row[3]), (0.0, 0.0));
}

/// More rows than one host-path call of top-k gradients holds (64 MiB of sorted entries:
/// 131,072 rows at k = 128): the rows go through two calls, summed in f64, and the gradient
/// of the mean keeps the whole batch's scale.
#[test]
fn top_k_gradients_past_one_host_call() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, k) = (131_072 + 3, 129, xent::gpu::MAX_SPARSE_K);
    let mut rng = StdRng::seed_from_u64(90);
    let z: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    // Every class but one a row.
    let idx: Vec<i64> = (0..rows)
        .flat_map(|i| (0..classes as i64).filter(move |&c| c != (i % classes) as i64))
        .collect();
    let p: Vec<f32> = (0..rows * k).map(|_| rng.random_range(0.0..0.01)).collect();
    let spec = CrossEntropy::new().with_reduction(Reduction::Mean);
    let up = Upstream::Scalar(1.0);
    let logits = Logits::new(&z, rows, classes).unwrap();
    let targets = SparseTargets::new(&idx, &p, k);
    let (want, want_grad) = scoring::sparse_cross_entropy_grad(&spec, logits, targets, up).unwrap();
    let (out, grad) = gpu
        .sparse_cross_entropy_grad(&spec, logits, targets, up)
        .unwrap();
    let (got, expected) = (out.loss.unwrap(), want.loss.unwrap());
    assert!(
        (got - expected).abs() <= 1e-5 * expected.abs(),
        "{got} vs {expected}"
    );
    // Each element is (B·q − p) / N with B ≤ 1.28: an absolute 1e-5 · 3 / N covers f32.
    let tol = 3e-5 / rows as f64;
    for (i, (&g, &w)) in grad.to_f32().iter().zip(&want_grad).enumerate() {
        assert!((g as f64 - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}
