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
        let label = format!("{} mean", case.name);
        assert_gradient(
            &label,
            &got,
            &want,
            classes,
            &|_| 1.0 / denominator,
            &mass,
            &max_abs,
            Dtype::F32,
        );
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
