//! bf16 and f16 logits on the GPU: the golden cases rounded to each half type against the
//! f64 CPU reference on the rounded values (the rounding is the input, not an error); rows of
//! every alignment on every strategy, both f16 paths and every target kind; the gradient in
//! the logits' dtype (host path, device path into a buffer and in place, views starting on a
//! 2-byte boundary, calls cut into chunks); and the one rounding of the gradient to nearest
//! even, bit for bit against the `half` crate.

mod common;

use common::{
    GoldenInputs, assert_gradient, assert_outputs_match, buffer_with, corner_strategies,
    golden_cases, gpu, gpu_with_binding_cap,
};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::planner::MAX_ELEMENTS_PER_LANE;
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, Dtype, ElementVec, Elements, GpuContext,
    GradientOutput, IndexType, Logits, LossShape, Reduction, Strategy, Targets, Upstream, cpu,
};

/// `values` rounded to `dtype`, to nearest even (f32 stays as it is).
fn round_to(dtype: Dtype, values: &[f32]) -> ElementVec {
    ElementVec::rounded(dtype, values.iter().map(|&v| v as f64))
}

/// Largest finite |z| of each row.
fn max_abs(values: &[f32], classes: usize) -> Vec<f64> {
    values
        .chunks(classes)
        .map(|row| {
            row.iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        })
        .collect()
}

/// The strategies a half test runs from `planned`: for f16 both widenings (integer, and
/// `unpack2x16float` where the device has it).
fn f16_paths(gpu: &GpuContext, dtype: Dtype, planned: Strategy) -> Vec<Strategy> {
    let mut all = vec![Strategy {
        f16_builtin: false,
        ..planned
    }];
    if dtype == Dtype::F16 && gpu.facts().f16_builtin {
        all.push(Strategy {
            f16_builtin: true,
            ..planned
        });
    }
    all
}

/// Asserts a half gradient against the f64 reference: of the logits' dtype, and within one
/// unit in the last place of it (the one rounding) plus the f32 tolerance.
#[allow(clippy::too_many_arguments)]
fn assert_half_gradient(
    label: &str,
    dtype: Dtype,
    got: &ElementVec,
    want: &[f64],
    classes: usize,
    scale: f64,
    mass: &[f64],
    max_abs: &[f64],
) {
    assert_eq!(got.dtype(), dtype, "{label}: dtype");
    let got = got.to_f32();
    assert_gradient(label, &got, want, classes, &|_| scale, mass, max_abs, dtype);
}

#[test]
fn golden_cases_rounded_to_half_precision() {
    let Some(gpu) = gpu() else { return };
    let cases = golden_cases("cross_entropy");
    assert!(cases.len() >= 20);
    for case in cases {
        let inputs = GoldenInputs::load(&case);
        let (rows, classes) = (case.rows(), case.classes());
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let logits = round_to(dtype, &inputs.logits);
            let wide = logits.to_f32();
            // Finite logits beyond f16's range become ±inf: not a value f16 can hold.
            let overflows = inputs
                .logits
                .iter()
                .zip(&wide)
                .any(|(a, b)| a.is_finite() && !b.is_finite());
            if overflows {
                assert_eq!(
                    dtype,
                    Dtype::F16,
                    "{}: bf16 holds every f32 range",
                    case.name
                );
                continue;
            }
            let z = Logits::from_elements(logits.as_elements(), rows, classes).unwrap();
            // Probabilities in f32 and in the logits' dtype.
            let half_probabilities = round_to(dtype, &inputs.probabilities);
            let target_sets: Vec<Targets<'_>> = if inputs.soft {
                vec![
                    inputs.targets(),
                    Targets::Probabilities(half_probabilities.as_elements()),
                ]
            } else {
                vec![inputs.targets()]
            };
            let spec = inputs.spec.clone().with_reduction(Reduction::Mean);
            for targets in target_sets {
                let mass: Vec<f64> = match targets {
                    Targets::Probabilities(p) => {
                        inputs.probability_mass(&p.to_f32(0..p.len()), classes)
                    }
                    _ => inputs.target_mass(classes),
                };
                let want = cpu::cross_entropy(&spec, z, targets).unwrap();
                let (_, want_grad) =
                    cpu::cross_entropy_grad(&spec, z, targets, Upstream::Scalar(1.0)).unwrap();
                for strategy in f16_paths(gpu, dtype, gpu.plan(rows, classes)) {
                    let label = format!(
                        "{} {dtype} {} targets, {}",
                        case.name,
                        match targets {
                            Targets::Probabilities(p) => p.dtype().name(),
                            _ => "index",
                        },
                        strategy.name()
                    );
                    let (got, grad) = gpu
                        .cross_entropy_grad_with(&spec, z, targets, Upstream::Scalar(1.0), strategy)
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    let max = max_abs(&wide, classes);
                    assert_outputs_match(&label, &got, &want, &max, &mass);
                    let scale = 1.0 / want.mean_denominator;
                    assert_half_gradient(
                        &label, dtype, &grad, &want_grad, classes, scale, &mass, &max,
                    );
                }
            }
        }
    }
}

#[test]
fn rows_of_every_alignment_on_every_strategy_and_target_kind() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(10);
    for classes in [1usize, 2, 3, 5, 4099, 50257] {
        let rows = if classes > 4000 { 3 } else { 7 };
        let n = rows * classes;
        let raw: Vec<f32> = (0..n).map(|_| rng.random_range(-8.0..8.0)).collect();
        let labels: Vec<i64> = (0..rows)
            .map(|_| rng.random_range(0..classes as i64))
            .collect();
        let probabilities: Vec<f32> = (0..rows)
            .flat_map(|_| {
                let w: Vec<f32> = (0..classes).map(|_| rng.random::<f32>()).collect();
                let total: f32 = w.iter().sum();
                w.into_iter().map(move |v| v / total)
            })
            .collect();
        let spec = CrossEntropy::new().with_label_smoothing(0.05);
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let logits = round_to(dtype, &raw);
            let wide = logits.to_f32();
            let max = max_abs(&wide, classes);
            let z = Logits::from_elements(logits.as_elements(), rows, classes).unwrap();
            let half_p = round_to(dtype, &probabilities);
            let kinds = [
                Targets::ClassIndices(&labels),
                Targets::probabilities(&probabilities),
                Targets::Probabilities(half_p.as_elements()),
            ];
            for targets in kinds {
                let mass: Vec<f64> = match targets {
                    Targets::ClassIndices(_) => vec![1.0; rows],
                    Targets::Probabilities(p) => p
                        .to_f32(0..p.len())
                        .chunks(classes)
                        .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() * 0.95 + 0.05)
                        .collect(),
                };
                let want = cpu::cross_entropy(&spec, z, targets).unwrap();
                let up = Upstream::Scalar(1.0);
                let (_, want_grad) = cpu::cross_entropy_grad(&spec, z, targets, up).unwrap();
                let fits = |s: &Strategy| s.elements_per_lane(classes) <= MAX_ELEMENTS_PER_LANE;
                for base in corner_strategies(gpu).into_iter().filter(fits) {
                    for strategy in f16_paths(gpu, dtype, base) {
                        let label =
                            format!("{rows}x{classes} {dtype} {targets:?} {}", strategy.name())
                                .chars()
                                .take(160)
                                .collect::<String>();
                        let (got, grad) = gpu
                            .cross_entropy_grad_with(&spec, z, targets, up, strategy)
                            .unwrap_or_else(|e| panic!("{label}: {e}"));
                        assert_outputs_match(&label, &got, &want, &max, &mass);
                        let scale = 1.0 / want.mean_denominator;
                        assert_half_gradient(
                            &label, dtype, &grad, &want_grad, classes, scale, &mass, &max,
                        );
                    }
                }
            }
        }
    }
}

/// Half logits in a device buffer from an odd half offset (2 bytes past a word), odd C, the
/// gradient into a buffer that also starts off a word and in place; with bindings capped so
/// the call is cut into chunks whose boundaries fall inside words. Everything against the
/// host path, bit for bit, and the words around the views untouched.
#[test]
fn device_views_off_word_boundaries_and_across_chunks() {
    let Some(gpu) = gpu() else { return };
    // 2 KiB bindings: 205 rows of 5 bf16 are about five chunks.
    let Some(capped) = gpu_with_binding_cap(2048) else {
        return;
    };
    let (rows, classes) = (205usize, 5usize);
    let mut rng = StdRng::seed_from_u64(11);
    let raw: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|_| rng.random_range(0..classes as i64))
        .collect();
    let spec = CrossEntropy::new().with_z_loss(1e-3);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let logits = round_to(dtype, &raw);
        let z = Logits::from_elements(logits.as_elements(), rows, classes).unwrap();
        let targets = Targets::ClassIndices(&labels);
        let up = Upstream::Scalar(1.0);
        let (host_out, host_grad) = gpu.cross_entropy_grad(&spec, z, targets, up).unwrap();
        for ctx in [gpu, &capped] {
            // 6 bytes of padding: the view starts 2 bytes past a word.
            let pad = 6;
            let logits_buffer = buffer_with(ctx, pad, logits.bytes());
            let labels_buffer = buffer_with(ctx, 0, bytemuck::cast_slice(&labels));
            let grad_buffer = buffer_with(ctx, pad, &vec![0xa5u8; logits.bytes().len()]);
            let shape = LossShape::class_indices(rows, classes, IndexType::I64).with_dtype(dtype);
            let mut loss = ctx.prepare(&spec, shape).unwrap();
            let view =
                DeviceLogits::new(&logits_buffer, pad as u64, rows, classes).with_dtype(dtype);
            let t = DeviceTargets::class_indices(&labels_buffer, 0, IndexType::I64);
            let out = GradientOutput::Buffer {
                buffer: &grad_buffer,
                offset: pad as u64,
            };
            loss.run_gradient(view, t, out, up).unwrap();
            let totals = loss.read_totals().unwrap();
            let label = format!("{dtype} device, chunks of {} rows", loss_rows(&loss));
            assert!(
                (totals.sum - host_out.sum).abs() <= 1e-5 * host_out.sum.abs(),
                "{label}: sum {} vs host {}",
                totals.sum,
                host_out.sum
            );
            let separate = read_bytes(ctx, &grad_buffer, pad + logits.bytes().len() + 2);
            assert_eq!(&separate[..pad], &[0u8; 6][..], "{label}: before the view");
            assert_eq!(
                &separate[pad..pad + logits.bytes().len()],
                host_grad.bytes(),
                "{label}: gradient into a buffer vs the host path"
            );
            assert_eq!(
                &separate[pad + logits.bytes().len()..],
                &[0, 0],
                "{label}: after the view"
            );
            loss.run_gradient(view, t, GradientOutput::InPlace, up)
                .unwrap();
            let in_place = read_bytes(ctx, &logits_buffer, pad + logits.bytes().len() + 2);
            assert_eq!(&in_place[..pad], &[0u8; 6][..], "{label}: before the view");
            assert_eq!(
                &in_place[pad..pad + logits.bytes().len()],
                host_grad.bytes(),
                "{label}: in place vs the host path"
            );
            assert_eq!(
                &in_place[pad + logits.bytes().len()..],
                &[0, 0],
                "{label}: after the view"
            );
        }
    }
}

fn loss_rows(loss: &xent::PreparedLoss) -> String {
    format!("{}", loss.shape().max_rows())
}

/// `count` bytes of `buffer` from its start.
fn read_bytes(gpu: &GpuContext, buffer: &wgpu::Buffer, count: usize) -> Vec<u8> {
    let words = common::read_f32(gpu, buffer, 0, count.div_ceil(4));
    bytemuck::cast_slice::<f32, u8>(&words)[..count].to_vec()
}

/// The gradient's one rounding, bit for bit: with one class, a z-loss of λ = ½ and a logit of
/// 1, a row's gradient is exactly its upstream value g (s·2λ·lse·q = g·1·1·1, the
/// cross-entropy term 0), so the GPU writes round(g) for any normal f32 g below 2^127 (2g must
/// not overflow): ties, half subnormals, values that overflow a half to infinity.
#[test]
fn the_gradient_is_rounded_once_to_nearest_even() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let mut g: Vec<f64> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e30,
        1.5e38,
        -1.7e38,
        // f16: 2^-24 (smallest subnormal), 2^-25 (a tie to 0), 1.5·2^-25, 3·2^-25 (a tie to
        // 2·2^-24), 2^-14 (smallest normal), just below it.
        5.960464477539063e-8,
        2.9802322387695312e-8,
        4.470348358154297e-8,
        8.940696716430664e-8,
        6.103515625e-5,
        6.1e-5,
        // bf16 ties: 1 + 2^-8 (to 1), 1 + 3·2^-8 (to 1 + 2^-6... even), and neighbours.
        1.00390625,
        1.01171875,
        1.0039063,
        1.0117187,
    ];
    for _ in 0..2000 {
        let bits: u32 = rng.random();
        let v = f32::from_bits(bits);
        if v.is_normal() && v.abs() < 1.7e38 {
            g.push(v as f64);
        }
    }
    // f32 ties of both halves at many exponents.
    for e in -30..30 {
        let base = 2f32.powi(e);
        g.push((base * (1.0 + 1.0 / 256.0 + 1.0 / 128.0)) as f64);
        g.push((base * (1.0 + 1.0 / 2048.0)) as f64);
        g.push((base * (1.0 + 3.0 / 2048.0)) as f64);
    }
    let rows = g.len();
    let spec = CrossEntropy::new()
        .with_reduction(Reduction::None)
        .with_z_loss(0.5);
    let labels = vec![0i64; rows];
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let logits = round_to(dtype, &vec![1.0; rows]);
        let z = Logits::from_elements(logits.as_elements(), rows, 1).unwrap();
        for strategy in f16_paths(gpu, dtype, gpu.plan(rows, 1)) {
            let (_, grad) = gpu
                .cross_entropy_grad_with(
                    &spec,
                    z,
                    Targets::ClassIndices(&labels),
                    Upstream::PerRow(&g),
                    strategy,
                )
                .unwrap();
            let want = round_to(dtype, &g.iter().map(|&v| v as f32).collect::<Vec<_>>());
            let got = grad.bytes();
            for (i, (a, b)) in got.chunks(2).zip(want.bytes().chunks(2)).enumerate() {
                assert_eq!(
                    a,
                    b,
                    "{dtype} {}: row {i}: g = {:e} ({:#010x})",
                    strategy.name(),
                    g[i] as f32,
                    (g[i] as f32).to_bits()
                );
            }
        }
    }
}

#[test]
fn half_inputs_are_checked() {
    let logits = [bf16::ONE; 6];
    let p = [f16::ONE; 6];
    let z = Logits::new(&logits, 2, 3).unwrap();
    assert_eq!(z.dtype(), Dtype::Bf16);
    let err = cpu::cross_entropy(&CrossEntropy::new(), z, Targets::probabilities(&p)).unwrap_err();
    assert!(matches!(err, xent::XentError::TargetsDtype { .. }), "{err}");
    assert_eq!(Elements::new(&p).dtype(), Dtype::F16);
    let Some(gpu) = gpu() else { return };
    let err = gpu
        .cross_entropy(&CrossEntropy::new(), z, Targets::probabilities(&p))
        .unwrap_err();
    assert!(err.to_string().contains("f16"), "{err}");
    // An unpack2x16float strategy where the device has none is refused, not run.
    if !gpu.facts().f16_builtin {
        let s = Strategy {
            f16_builtin: true,
            ..Strategy::NAIVE
        };
        assert!(s.check(gpu.facts()).is_err());
    }
}
