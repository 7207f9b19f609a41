//! The gradient on the GPU: against PyTorch's golden gradients, against the f64 CPU
//! reference for every option (z-loss and soft-capping included) and reduction, on the device
//! path into a separate buffer and in place, with exact zeros where the math has them, and
//! bit-identical reruns.

mod common;

use common::{
    GoldenInputs, Problem, assert_gradient, buffer_with, golden_cases, gpu, max_abs_per_row,
    read_f32,
};
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, Dtype, GradientOutput, IndexType, Logits, LossShape,
    Reduction, Strategy, Upstream, cpu,
};

#[test]
fn gpu_gradients_reproduce_pytorch() {
    let Some(gpu) = gpu() else { return };
    let cases = golden_cases("cross_entropy");
    assert!(cases.len() >= 20);
    for case in cases {
        let inputs = GoldenInputs::load(&case);
        let (rows, classes) = (case.rows(), case.classes());
        let logits = Logits::new(&inputs.logits, rows, classes).unwrap();
        // PyTorch's f64 gradient, stored as f32 (half an f32 ulp more, within the tolerance).
        let want: Vec<f64> = case
            .f32s("grad_mean.npy")
            .iter()
            .map(|&g| g as f64)
            .collect();
        let max_abs = max_abs_per_row(&inputs.logits, classes);
        let mass = inputs.target_mass(classes);
        let mean = inputs.spec.clone().with_reduction(Reduction::Mean);
        let (out, got) = gpu
            .cross_entropy_grad(&mean, logits, inputs.targets(), Upstream::Scalar(1.0))
            .map(|(o, g)| (o, g.to_f32()))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let denominator = out.mean_denominator;
        let check_mean = |label: &str, got: &[f32]| {
            if denominator == 0.0 {
                // Every row ignored: PyTorch's gradient is +0 everywhere (its scale 1/0 would
                // make any tolerance infinite).
                assert!(want.iter().all(|&w| w == 0.0), "{label}: golden zeros");
                let bad = got.iter().position(|g| g.to_bits() != 0);
                assert!(bad.is_none(), "{label}: element {bad:?} is not +0");
                return;
            }
            assert_gradient(
                label,
                got,
                &want,
                classes,
                &|_| 1.0 / denominator,
                &mass,
                &max_abs,
                Dtype::F32,
            );
        };
        check_mean(&format!("{} mean", case.name), &got);

        // The device path: logits and targets in buffers (class indices as i64 and i32 in
        // turn), the gradient of the mean into a buffer and over the logits; the mean's scale
        // comes from the device's own totals.
        let n = rows * classes;
        let logits_buf = buffer_with(gpu, 16, bytemuck::cast_slice(&inputs.logits));
        let i32s: Vec<i32> = inputs.classes_idx.iter().map(|&y| y as i32).collect();
        let (shape, targets_buf, view_targets): (LossShape, _, fn(&wgpu::Buffer) -> DeviceTargets) =
            if inputs.soft {
                (
                    LossShape::probabilities(rows, classes),
                    buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.probabilities)),
                    |b| DeviceTargets::probabilities(b, 0),
                )
            } else if case.name.len() % 2 == 0 {
                (
                    LossShape::class_indices(rows, classes, IndexType::I64),
                    buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.classes_idx)),
                    |b| DeviceTargets::class_indices(b, 0, IndexType::I64),
                )
            } else {
                (
                    LossShape::class_indices(rows, classes, IndexType::I32),
                    buffer_with(gpu, 0, bytemuck::cast_slice(&i32s)),
                    |b| DeviceTargets::class_indices(b, 0, IndexType::I32),
                )
            };
        let mut prepared = gpu.prepare(&mean, shape).unwrap();
        let view = DeviceLogits::new(&logits_buf, 16, rows, classes);
        let grad_buf = buffer_with(gpu, 0, &vec![0u8; n * 4]);
        let into = GradientOutput::Buffer {
            buffer: &grad_buf,
            offset: 0,
        };
        prepared
            .run_gradient(
                view,
                view_targets(&targets_buf),
                into,
                Upstream::Scalar(1.0),
            )
            .unwrap();
        let device_out = prepared.read().unwrap();
        assert_eq!(
            device_out.mean_denominator, denominator,
            "{}: device denominator",
            case.name
        );
        let separate = read_f32(gpu, &grad_buf, 0, n);
        check_mean(&format!("{} device mean", case.name), &separate);
        prepared
            .run_gradient(
                view,
                view_targets(&targets_buf),
                GradientOutput::InPlace,
                Upstream::Scalar(1.0),
            )
            .unwrap();
        let in_place = read_f32(gpu, &logits_buf, 16, n);
        check_mean(&format!("{} device mean in place", case.name), &in_place);
        // Sum: the mean's gradient times the denominator; none with per-row upstream g_i: row i
        // of the sum's gradient times g_i.
        let sum = inputs.spec.clone().with_reduction(Reduction::Sum);
        let (_, got) = gpu
            .cross_entropy_grad(&sum, logits, inputs.targets(), Upstream::Scalar(2.5))
            .map(|(o, g)| (o, g.to_f32()))
            .unwrap();
        let want_sum: Vec<f64> = want.iter().map(|g| g * denominator * 2.5).collect();
        assert_gradient(
            &format!("{} sum", case.name),
            &got,
            &want_sum,
            classes,
            &|_| 2.5,
            &mass,
            &max_abs,
            Dtype::F32,
        );
        let upstream: Vec<f64> = (0..rows).map(|i| 0.5 + (i % 7) as f64 * 0.25).collect();
        let none = inputs.spec.clone().with_reduction(Reduction::None);
        let (_, got) = gpu
            .cross_entropy_grad(&none, logits, inputs.targets(), Upstream::PerRow(&upstream))
            .map(|(o, g)| (o, g.to_f32()))
            .unwrap();
        let want_none: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(e, g)| g * denominator * upstream[e / classes])
            .collect();
        assert_gradient(
            &format!("{} none", case.name),
            &got,
            &want_none,
            classes,
            &|i| upstream[i],
            &mass,
            &max_abs,
            Dtype::F32,
        );
    }
}

/// Specs with every option, z-loss and soft-capping included.
fn specs(classes: usize, soft: bool) -> Vec<CrossEntropy> {
    let mut out = Vec::new();
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let base = CrossEntropy::new().with_reduction(reduction);
        out.push(base.clone());
        out.push(base.clone().with_z_loss(1e-4));
        out.push(base.clone().with_softcap(3.0).with_label_smoothing(0.1));
        out.push(
            base.clone()
                .with_z_loss(0.01)
                .with_softcap(30.0)
                .with_weights(common::Inputs::new(3).weights(classes))
                .with_label_smoothing(0.2),
        );
        if !soft {
            out.push(base.clone().with_ignore_index(-100).with_z_loss(0.05));
        }
    }
    out
}

fn upstream_for(spec: &CrossEntropy, rows: usize) -> (Vec<f64>, f64) {
    let per_row = (0..rows).map(|i| 1.0 - (i % 5) as f64 * 0.3).collect();
    (
        per_row,
        if spec.reduction() == Reduction::Sum {
            0.75
        } else {
            1.0
        },
    )
}

fn upstream<'a>(spec: &CrossEntropy, per_row: &'a [f64], scalar: f64) -> Upstream<'a> {
    match spec.reduction() {
        Reduction::None => Upstream::PerRow(per_row),
        _ => Upstream::Scalar(scalar),
    }
}

#[test]
fn gpu_gradients_match_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, classes)) in [(5, 1), (33, 3), (17, 1000), (4, 4099)]
        .into_iter()
        .enumerate()
    {
        let mut p = Problem::random(seed as u64 + 50, rows, classes, 6.0, 0.0);
        p.labels[rows / 2] = -100;
        for soft in [false, true] {
            for spec in specs(classes, soft) {
                if spec.ignore_index().is_none() && p.labels.contains(&-100) && !soft {
                    p.labels[rows / 2] = 0;
                }
                let (per_row, scalar) = upstream_for(&spec, rows);
                let up = upstream(&spec, &per_row, scalar);
                let (want_out, want) =
                    cpu::cross_entropy_grad(&spec, p.logits(), p.targets(soft), up).unwrap();
                for strategy in [gpu.plan(rows, classes), Strategy::NAIVE] {
                    let (out, got) = gpu
                        .cross_entropy_grad_with(&spec, p.logits(), p.targets(soft), up, strategy)
                        .map(|(o, g)| (o, g.to_f32()))
                        .unwrap();
                    let label = format!("{rows}x{classes} soft={soft} {spec:?} {strategy:?}");
                    let mass = p.mass(&spec, soft);
                    let max_abs = max_abs_per_row(&p.logits, classes);
                    let scale = |i: usize| match spec.reduction() {
                        Reduction::None => per_row[i],
                        Reduction::Sum => scalar,
                        // The z-loss part is scaled by 1 / counted rows, never more than the
                        // CE part's 1 / Σw_y by much here (weights ≥ 0.1).
                        Reduction::Mean => 10.0 / want_out.mean_denominator.min(rows as f64),
                    };
                    assert_gradient(
                        &label,
                        &got,
                        &want,
                        classes,
                        &scale,
                        &mass,
                        &max_abs,
                        Dtype::F32,
                    );
                    let (g, w) = (out.loss, want_out.loss);
                    if let (Some(g), Some(w)) = (g, w) {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs() + 1e-5,
                            "{label}: loss {g} vs {w}"
                        );
                    }
                    if spec.z_loss() > 0.0 {
                        let (gz, wz) = (out.z_loss_sum.unwrap(), want_out.z_loss_sum.unwrap());
                        assert!(
                            (gz - wz).abs() <= 1e-5 * wz.abs() + 1e-6,
                            "{label}: z-loss {gz} vs {wz}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn zeros_where_the_math_has_zeros_and_stable_offsets() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (6, 7);
    let mut p = Problem::random(77, rows, classes, 4.0, 0.0);
    p.labels[2] = -100;
    p.logits[3 * classes + 4] = f32::NEG_INFINITY;
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_z_loss(0.01);
    let (_, g) = gpu
        .cross_entropy_grad(&spec, p.logits(), p.targets(false), Upstream::Scalar(1.0))
        .map(|(o, g)| (o, g.to_f32()))
        .unwrap();
    assert!(
        g[2 * classes..3 * classes].iter().all(|&v| v == 0.0),
        "ignored row: {:?}",
        &g[2 * classes..3 * classes]
    );
    assert_eq!(g[3 * classes + 4], 0.0, "masked class");
    // Offsets of 1e6: the same gradient as without, up to the f32 rounding of the offset
    // logits themselves (an ulp of 1e6 is 0.0625, so the inputs differ by up to 0.03).
    let offset: Vec<f32> = p.logits.iter().map(|z| z + 1e6).collect();
    let shifted = Logits::new(&offset, rows, classes).unwrap();
    let (_, g_off) = gpu
        .cross_entropy_grad(&spec, shifted, p.targets(false), Upstream::Scalar(1.0))
        .map(|(o, g)| (o, g.to_f32()))
        .unwrap();
    let (_, want) =
        cpu::cross_entropy_grad(&spec, shifted, p.targets(false), Upstream::Scalar(1.0)).unwrap();
    for (k, (&g, &w)) in g_off.iter().zip(&want).enumerate() {
        // The z-loss term grows with lse ≈ 1e6: 2λ·lse·q, relative f32 error in lse.
        let tol = 1e-5 + 2.0 * 0.01 * 1e6 * 4.0 * f32::EPSILON as f64;
        assert!(
            (g as f64 - w).abs() <= tol,
            "offset 1e6, element {k}: {g} vs {w}"
        );
    }
    // Bit-identical reruns.
    let again = gpu
        .cross_entropy_grad(&spec, p.logits(), p.targets(false), Upstream::Scalar(1.0))
        .map(|(o, g)| (o, g.to_f32()))
        .unwrap()
        .1;
    assert_eq!(
        g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn device_gradient_into_a_buffer_and_in_place() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes) in [(9, 5), (40, 1000)] {
        let p = Problem::random(88, rows, classes, 5.0, 0.0);
        for spec in [
            CrossEntropy::new()
                .with_z_loss(0.02)
                .with_label_smoothing(0.1),
            CrossEntropy::new()
                .with_reduction(Reduction::Sum)
                .with_softcap(4.0),
            CrossEntropy::new().with_reduction(Reduction::None),
        ] {
            let (per_row, scalar) = upstream_for(&spec, rows);
            let up = upstream(&spec, &per_row, scalar);
            let (host_out, host) = gpu
                .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
                .map(|(o, g)| (o, g.to_f32()))
                .unwrap();
            let logits_bytes: &[u8] = bytemuck::cast_slice(&p.logits);
            let logits = buffer_with(gpu, 0, logits_bytes);
            let targets = buffer_with(gpu, 0, bytemuck::cast_slice(&p.labels));
            let grad = buffer_with(gpu, 0, &vec![0u8; logits_bytes.len() + 256]);
            let mut loss = gpu
                .prepare(
                    &spec,
                    LossShape::class_indices(rows, classes, IndexType::I64),
                )
                .unwrap();
            let view = DeviceLogits::new(&logits, 0, rows, classes);
            let t = DeviceTargets::class_indices(&targets, 0, IndexType::I64);
            let out = GradientOutput::Buffer {
                buffer: &grad,
                offset: 256,
            };
            loss.run_gradient(view, t, out, up).unwrap();
            let device_out = loss.read().unwrap();
            let separate = read_f32(gpu, &grad, 256, rows * classes);
            let label = format!("{rows}x{classes} {spec:?}");
            assert_eq!(
                format!("{device_out:?}"),
                format!("{host_out:?}"),
                "{label}: loss"
            );
            for (k, (&d, &h)) in separate.iter().zip(&host).enumerate() {
                // The mean's scales: the device divides by its own totals, the host path by
                // the host's exact sums; the rest is the same arithmetic.
                assert!(
                    (d - h).abs() <= 2.0 * f32::EPSILON * h.abs(),
                    "{label}: element {k}: device {d} vs host {h}"
                );
            }
            // In place: the logits buffer ends up holding the same gradient.
            loss.run_gradient(view, t, GradientOutput::InPlace, up)
                .unwrap();
            let in_place = read_f32(gpu, &logits, 0, rows * classes);
            assert_eq!(
                in_place.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                separate.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{label}: in place"
            );
        }
    }
}

/// A mean over a batch scored in two parts (`Upstream::MeanOver`, as in gradient accumulation)
/// gives the whole batch's gradient, on the CPU reference and on the GPU.
#[test]
fn mean_over_parts_equals_the_mean_of_the_whole() {
    let (rows, classes) = (40, 33);
    let mut p = Problem::random(99, rows, classes, 4.0, 0.0);
    p.labels[3] = -100;
    p.labels[30] = -100;
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_weights(common::Inputs::new(4).weights(classes))
        .with_z_loss(0.01);
    let (whole_out, whole) =
        cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), Upstream::Scalar(1.5))
            .unwrap();
    let over = Upstream::MeanOver {
        grad: 1.5,
        denominator: whole_out.mean_denominator,
        counted_rows: whole_out.counted_rows() as f64,
    };
    let parts = [0..17, 17..rows];
    // The normalisers gathered part by part are the whole batch's.
    let mut gathered = xent::MeanNormalisers::default();
    for range in parts.clone() {
        gathered
            .add_class_indices(&spec, classes, range.start, &p.labels[range])
            .unwrap();
    }
    assert_eq!(gathered.upstream(1.5), over);
    let mut cpu_parts = Vec::new();
    let mut gpu_parts = Vec::new();
    for range in parts {
        let logits = p.logits().slice_rows(range.clone());
        let targets = xent::Targets::ClassIndices(&p.labels[range]);
        cpu_parts.extend(
            cpu::cross_entropy_grad(&spec, logits, targets, over)
                .unwrap()
                .1,
        );
        if let Some(gpu) = gpu() {
            gpu_parts.extend(
                gpu.cross_entropy_grad(&spec, logits, targets, over)
                    .map(|(o, g)| (o, g.to_f32()))
                    .unwrap()
                    .1,
            );
        }
    }
    for (k, (&a, &b)) in cpu_parts.iter().zip(&whole).enumerate() {
        assert!(
            (a - b).abs() <= 1e-15 * (1.0 + b.abs()),
            "CPU element {k}: {a} vs {b}"
        );
    }
    let scale = 1.5 * 10.0 / whole_out.mean_denominator;
    let mass = p.mass(&spec, false);
    let max_abs = max_abs_per_row(&p.logits, classes);
    if !gpu_parts.is_empty() {
        assert_gradient(
            "mean over parts",
            &gpu_parts,
            &whole,
            classes,
            &|_| scale,
            &mass,
            &max_abs,
            Dtype::F32,
        );
    }
    // MeanOver belongs to the mean alone.
    let sum = spec.clone().with_reduction(Reduction::Sum);
    assert!(cpu::cross_entropy_grad(&sum, p.logits(), p.targets(false), over).is_err());
}

/// An empty batch: PyTorch's values, an empty gradient, and an (empty) z-loss on both paths.
#[test]
fn empty_batches_agree() {
    let spec = CrossEntropy::new().with_z_loss(0.1);
    let logits = Logits::new::<f32>(&[], 0, 4).unwrap();
    let targets = xent::Targets::ClassIndices(&[]);
    let (cpu_out, cpu_grad) =
        cpu::cross_entropy_grad(&spec, logits, targets, Upstream::Scalar(1.0)).unwrap();
    assert!(cpu_grad.is_empty());
    assert_eq!(cpu_out.z_loss_sum, Some(0.0));
    if let Some(gpu) = gpu() {
        let (out, grad) = gpu
            .cross_entropy_grad(&spec, logits, targets, Upstream::Scalar(1.0))
            .map(|(o, g)| (o, g.to_f32()))
            .unwrap();
        assert!(grad.is_empty());
        assert_eq!(format!("{out:?}"), format!("{cpu_out:?}"));
    }
}

/// A NaN logit makes its row's loss and gradient NaN, soft-capped or not, as in the f64
/// reference (a clamp before tanh must not turn it into a bound); the other rows keep their
/// values.
#[test]
fn a_nan_logit_gives_its_row_nan_soft_capped_too() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (3, 5);
    let mut p = Problem::random(91, rows, classes, 4.0, 0.0);
    p.logits[classes + 2] = f32::NAN;
    for spec in [
        CrossEntropy::new().with_reduction(Reduction::Sum),
        CrossEntropy::new()
            .with_reduction(Reduction::Sum)
            .with_softcap(5.0),
    ] {
        let up = Upstream::Scalar(1.0);
        let (want_out, want) =
            cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), up).unwrap();
        let (out, got) = gpu
            .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
            .unwrap();
        let got = got.to_f32();
        assert!(
            want_out.per_row[1].is_nan() && out.per_row[1].is_nan(),
            "{spec:?}"
        );
        for i in [0, 2] {
            let (g, w) = (out.per_row[i], want_out.per_row[i]);
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + 1e-6,
                "{spec:?} row {i}: {g} vs {w}"
            );
        }
        let row = classes..2 * classes;
        assert!(want[row.clone()].iter().all(|g| g.is_nan()));
        assert!(
            got[row].iter().all(|g| g.is_nan()),
            "{spec:?}: gradient row 1"
        );
    }
}

/// On the device path a row whose class index is out of range gets a NaN gradient (its loss
/// is NaN and the read names it), not values from an earlier call's row statistics.
#[test]
fn an_out_of_range_class_on_the_device_gives_its_row_a_nan_gradient() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (3, 5);
    let p = Problem::random(92, rows, classes, 4.0, 0.0);
    let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
    let good: Vec<i32> = p.labels.iter().map(|&y| y as i32).collect();
    let mut bad = good.clone();
    bad[2] = 7;
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
    let good_buf = buffer_with(gpu, 0, bytemuck::cast_slice(&good));
    let bad_buf = buffer_with(gpu, 0, bytemuck::cast_slice(&bad));
    let grad = buffer_with(gpu, 0, &vec![0u8; rows * classes * 4]);
    let mut loss = gpu
        .prepare(
            &spec,
            LossShape::class_indices(rows, classes, IndexType::I32),
        )
        .unwrap();
    let view = DeviceLogits::new(&logits, 0, rows, classes);
    let out = GradientOutput::Buffer {
        buffer: &grad,
        offset: 0,
    };
    let up = Upstream::Scalar(1.0);
    let targets = |b| DeviceTargets::class_indices(b, 0, IndexType::I32);
    loss.run_gradient(view, targets(&good_buf), out, up)
        .unwrap();
    loss.read().unwrap();
    let before = read_f32(gpu, &grad, 0, rows * classes);
    loss.run_gradient(view, targets(&bad_buf), out, up).unwrap();
    assert!(matches!(
        loss.read(),
        Err(xent::XentError::ClassIndexOutOfRange { row: 2, .. })
    ));
    let after = read_f32(gpu, &grad, 0, rows * classes);
    assert_eq!(after[..2 * classes], before[..2 * classes], "rows 0 and 1");
    assert!(after[2 * classes..].iter().all(|g| g.is_nan()), "{after:?}");
}

/// Large soft-caps keep the f32 accuracy of the uncapped loss (tanh near 0 by its series, not
/// the builtin, whose absolute error the cap would scale); caps and z-loss coefficients that
/// are no normal f32 are refused on the GPU.
#[test]
fn large_soft_caps_keep_their_accuracy_and_f32_options_are_checked() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (4, 300);
    let p = Problem::random(93, rows, classes, 6.0, 0.0);
    let max_abs = max_abs_per_row(&p.logits, classes);
    for cap in [0.5, 7.0, 1e3, 1e5, 1e7, 1e20] {
        let spec = CrossEntropy::new()
            .with_reduction(Reduction::Sum)
            .with_softcap(cap);
        let up = Upstream::Scalar(1.0);
        let (want_out, want) =
            cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), up).unwrap();
        let (out, got) = gpu
            .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
            .unwrap();
        for (i, &m) in max_abs.iter().enumerate() {
            let (g, w) = (out.per_row[i], want_out.per_row[i]);
            let tol = common::row_tolerance(w, m, 1.0);
            assert!(
                (g - w).abs() <= tol,
                "cap {cap:e} row {i}: {g} vs {w} ({tol:e})"
            );
        }
        assert_gradient(
            &format!("cap {cap:e}"),
            &got.to_f32(),
            &want,
            classes,
            &|_| 1.0,
            &vec![1.0; rows],
            &max_abs,
            Dtype::F32,
        );
    }
    for cap in [1e-39, 1e39, 1e300] {
        let spec = CrossEntropy::new().with_softcap(cap);
        assert!(matches!(
            gpu.cross_entropy(&spec, p.logits(), p.targets(false)),
            Err(xent::XentError::Softcap(c)) if c == cap
        ));
        // The f64 reference takes them.
        cpu::cross_entropy(&spec, p.logits(), p.targets(false)).unwrap();
    }
    for lambda in [1e-39, 1e39] {
        let spec = CrossEntropy::new().with_z_loss(lambda);
        assert!(matches!(
            gpu.cross_entropy(&spec, p.logits(), p.targets(false)),
            Err(xent::XentError::ZLoss(l)) if l == lambda
        ));
    }
}

/// Where class weights far from 1 (scaled by a power of two on the device: 3e38 by 2^-125)
/// meet a large upstream gradient, the kernel's f32 scale would overflow although the
/// gradient is finite: refused, not inf. A weight of 1 beside 3e38 stays a normal f32 on the
/// device (scaled by 2^-127 it was subnormal, and an H200 flushed it to zero), and a large
/// weight times a large loss (1e20 · 3.6e19) stays within f32 there, its smallest weight (1e-20)
/// normal. The mean of probability targets with such weights on the device path (its scale
/// from the device's own totals) matches the reference.
#[test]
fn gradient_scales_beyond_f32_are_refused_and_weighted_means_hold() {
    let Some(gpu) = gpu() else { return };
    let z = [1.8e19_f32, -1.8e19, 0.0];
    let spec = CrossEntropy::new()
        .with_weights(vec![1e-20, 1e20, 1.0])
        .with_reduction(Reduction::Sum);
    let t = xent::Targets::ClassIndices(&[1]);
    let logits = Logits::new(&z, 1, 3).unwrap();
    let (got, _) = gpu
        .cross_entropy_grad(&spec, logits, t, Upstream::Scalar(1.0))
        .unwrap();
    let (want, _) = cpu::cross_entropy_grad(&spec, logits, t, Upstream::Scalar(1.0)).unwrap();
    let (g, w) = (got.loss.unwrap(), want.loss.unwrap());
    assert!(w > 1e39 && (g - w).abs() <= 1e-6 * w, "{g} vs {w}");

    let z = [0.0_f32, 0.0];
    let logits = Logits::new(&z, 1, 2).unwrap();
    let spec = CrossEntropy::new()
        .with_weights(vec![1.0, 3e38])
        .with_reduction(Reduction::Sum);
    let t = xent::Targets::ClassIndices(&[0]);
    assert!(matches!(
        gpu.cross_entropy_grad(&spec, logits, t, Upstream::Scalar(1e20)),
        Err(xent::XentError::GradientScale(_))
    ));
    // A scale that fits: the reference's gradient.
    let (_, got) = gpu
        .cross_entropy_grad(&spec, logits, t, Upstream::Scalar(1.0))
        .unwrap();
    let (_, want) = cpu::cross_entropy_grad(&spec, logits, t, Upstream::Scalar(1.0)).unwrap();
    for (g, w) in got.to_f32().iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
    }

    let (rows, classes) = (3, 4);
    let p = Problem::random(94, rows, classes, 3.0, 0.0);
    let spec = CrossEntropy::new()
        .with_weights(vec![1e7, 1.0, 0.5, 2e7])
        .with_reduction(Reduction::Mean);
    let (want_out, want) =
        cpu::cross_entropy_grad(&spec, p.logits(), p.targets(true), Upstream::Scalar(1.0)).unwrap();
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
    let probs = buffer_with(gpu, 0, bytemuck::cast_slice(&p.probabilities));
    let grad = buffer_with(gpu, 0, &vec![0u8; rows * classes * 4]);
    let mut loss = gpu
        .prepare(&spec, LossShape::probabilities(rows, classes))
        .unwrap();
    loss.run_gradient(
        DeviceLogits::new(&logits, 0, rows, classes),
        DeviceTargets::probabilities(&probs, 0),
        GradientOutput::Buffer {
            buffer: &grad,
            offset: 0,
        },
        Upstream::Scalar(1.0),
    )
    .unwrap();
    let out = loss.read().unwrap();
    assert_eq!(out.mean_denominator, rows as f64);
    let (g, w) = (out.loss.unwrap(), want_out.loss.unwrap());
    assert!((g - w).abs() <= 1e-5 * w.abs(), "mean {g} vs {w}");
    let got = read_f32(gpu, &grad, 0, rows * classes);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-6 * 2e7 / 3.0,
            "element {k}: {g} vs {w}"
        );
    }
}

/// A mean's gradient on the device path divides by the device's own Σ w_y, which the host
/// does not know when it records the call: with a large upstream gradient and every target on
/// a small weight, g / Σ w_y is beyond f32 and the gradient comes out ±inf or NaN. The read of
/// that call says so (`GradientScale`), as the host path refuses the call; the loss stays
/// usable, and a call of the same loss with other targets is right. A subnormal weight (1e-45)
/// is scaled into f32's normal range on the device, so that a GPU that flushes subnormals to
/// zero (an H200 does) computes the same mean as the reference on both paths.
#[test]
fn a_device_mean_whose_scale_overflows_is_reported_by_its_read() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (10, 13);
    let p = Problem::random(95, rows, classes, 2.0, 0.0);
    let smallest = vec![3_i64; rows];
    let t = xent::Targets::ClassIndices(&smallest);
    let mut weights = vec![1.0_f32; classes];
    weights[3] = 1e-45;
    let subnormal = CrossEntropy::new()
        .with_weights(weights.clone())
        .with_reduction(Reduction::Mean);
    let one = Upstream::Scalar(1.0);
    let (got_out, got) = gpu
        .cross_entropy_grad(&subnormal, p.logits(), t, one)
        .unwrap();
    let (want_out, want) = cpu::cross_entropy_grad(&subnormal, p.logits(), t, one).unwrap();
    let (g, w) = (got_out.loss.unwrap(), want_out.loss.unwrap());
    assert!((g - w).abs() <= 1e-5 * w.abs(), "mean {g} vs {w}");
    for (k, (g, w)) in got.to_f32().iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "element {k}: {g} vs {w}"
        );
    }

    weights[3] = 2f32.powi(-60);
    let spec = CrossEntropy::new()
        .with_weights(weights)
        .with_reduction(Reduction::Mean);
    let up = Upstream::Scalar(1e30);
    assert!(matches!(
        gpu.cross_entropy_grad(&spec, p.logits(), t, up),
        Err(xent::XentError::GradientScale(_))
    ));
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
    let grad = buffer_with(gpu, 0, &vec![0u8; rows * classes * 4]);
    let shape = LossShape::class_indices(rows, classes, IndexType::I64);
    let mut loss = gpu.prepare(&spec, shape).unwrap();
    let mut run = |labels: &[i64]| {
        let targets = buffer_with(gpu, 0, bytemuck::cast_slice(labels));
        loss.run_gradient(
            DeviceLogits::new(&logits, 0, rows, classes),
            DeviceTargets::class_indices(&targets, 0, IndexType::I64),
            GradientOutput::Buffer {
                buffer: &grad,
                offset: 0,
            },
            up,
        )
        .unwrap();
        loss.read_totals()
    };
    assert!(matches!(
        run(&smallest),
        Err(xent::XentError::GradientScale(_))
    ));
    run(&p.labels).unwrap();
    let (_, want) = cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), up).unwrap();
    let got = read_f32(gpu, &grad, 0, rows * classes);
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "element {k}: {g} vs {w}"
        );
    }
}
