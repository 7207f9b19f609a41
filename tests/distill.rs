//! Distillation on the GPU (issue 11): the golden cases `distill_T1`, `distill_T2`,
//! `distill_T4` (loss, KL and entropy per row, the gradient of the sum), and the reverse KL,
//! the generalised JSD (β inside and at both ends), T² scaling, masks, half student logits and
//! every strategy corner against the f64 reference `xent::scoring`.

mod common;

use common::{assert_gradient, corner_strategies, golden_cases, gpu, row_tolerance, ulp_f32};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::planner::MAX_ELEMENTS_PER_LANE;
use xent::scoring::{self, Distillation, DistillationOutput, DistillationTerms, Divergence};
use xent::{Dtype, ElementVec, Logits, Reduction, Strategy, Upstream, XentError};

/// The largest finite |value / T| of row i of either matrix.
fn seen_max(student: &[f32], teacher: &[f32], classes: usize, i: usize, t: f64) -> f64 {
    let r = i * classes..(i + 1) * classes;
    student[r.clone()]
        .iter()
        .chain(&teacher[r])
        .filter(|v| v.is_finite())
        .fold(0.0_f64, |m, &v| m.max((v as f64).abs()))
        / t
}

fn terms(out: &DistillationOutput) -> Option<(&[f64], &[f64])> {
    match &out.terms {
        DistillationTerms::CrossEntropy { entropy, kl } => Some((entropy, kl)),
        DistillationTerms::DivergenceOnly => None,
    }
}

/// Per-row values within the f32 row tolerance of the loss (a KL, the difference of two
/// such values, within twice it); equal infinities and NaN agree.
fn assert_rows(label: &str, got: &[f64], want: &[f64], loss: &[f64], m: &dyn Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{label}");
    for i in 0..got.len() {
        let tol = 2.0 * row_tolerance(loss[i], m(i), 1.0);
        assert!(
            common::close(got[i], want[i], tol),
            "{label} row {i}: {} vs {} (tolerance {tol:e})",
            got[i],
            want[i]
        );
    }
}

#[test]
fn golden_distillation_cases_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let cases = golden_cases("distillation");
    assert_eq!(cases.len(), 3, "distill_T1, distill_T2, distill_T4");
    for case in &cases {
        let (rows, classes) = (case.rows(), case.classes());
        let student = case.f32s("logits.npy");
        let teacher = case.f32s("teacher.npy");
        let t = case.number("temperature");
        let spec = Distillation::new()
            .with_temperature(t)
            .with_reduction(Reduction::Sum);
        let z = Logits::new(&student, rows, classes).unwrap();
        let (out, grad) = gpu
            .distillation_grad(&spec, z, &teacher, Upstream::Scalar(1.0))
            .unwrap();
        let m = |i: usize| seen_max(&student, &teacher, classes, i, t);
        let loss = case.f64s("loss_none.npy");
        let (entropy, kl) = terms(&out).unwrap();
        assert_rows(
            &format!("{} loss", case.name),
            &out.per_row,
            &loss,
            &loss,
            &m,
        );
        assert_rows(
            &format!("{} kl", case.name),
            kl,
            &case.f64s("kl_none.npy"),
            &loss,
            &m,
        );
        let h = case.f64s("entropy_none.npy");
        assert_rows(&format!("{} entropy", case.name), entropy, &h, &loss, &m);
        let sum_tol: f64 = (0..rows).map(|i| row_tolerance(loss[i], m(i), 1.0)).sum();
        assert!((out.loss.unwrap() - case.number("sum")).abs() <= sum_tol);
        let mean = gpu
            .distillation(&spec.with_reduction(Reduction::Mean), z, &teacher)
            .unwrap();
        let n = rows as f64;
        assert!((mean.loss.unwrap() - case.number("mean")).abs() <= sum_tol / n);
        assert!((mean.reduced_kl().unwrap() - case.number("kl_mean")).abs() <= 2.0 * sum_tol / n);
        let h_mean = mean.reduced_entropy().unwrap();
        assert!((h_mean - case.number("entropy_mean")).abs() <= 2.0 * sum_tol / n);

        // The gradient of the sum: PyTorch's, stored as f32 (half an ulp), within the f32
        // element tolerance at scale 1/T.
        let want = case.f32s("grad_sum.npy");
        let got = grad.to_f32();
        for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let i = j / classes;
            let tol = common::element_tolerance(1.0 / t, 1.0, m(i)) + 0.5 * ulp_f32(w as f64);
            assert!(
                (g as f64 - w as f64).abs() <= tol,
                "{} gradient row {i} class {}: {g} vs {w}",
                case.name,
                j % classes
            );
        }
    }
}

/// Random student and teacher rows; `masks` puts −inf on a few classes of the student only
/// (the reverse KL stays finite) or of the teacher only (the forward loss does).
fn random_pair(seed: u64, rows: usize, classes: usize, mask_student: bool) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut student: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-7.0..7.0))
        .collect();
    let mut teacher: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-7.0..7.0))
        .collect();
    let masked = if mask_student {
        &mut student
    } else {
        &mut teacher
    };
    for (j, v) in masked.iter_mut().enumerate() {
        // Never a whole row, so both softmaxes exist.
        if j % classes != 0 && rng.random_range(0..8) == 0 {
            *v = f32::NEG_INFINITY;
        }
    }
    (student, teacher)
}

#[test]
fn forward_and_reverse_kl_on_every_strategy_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, classes)) in [(7, 1), (5, 3), (9, 37), (4, 1000), (3, 50257)]
        .into_iter()
        .enumerate()
    {
        for (divergence, mask_student) in [
            (Divergence::ForwardKl, false),
            (Divergence::ReverseKl, true),
            (Divergence::Jsd { beta: 0.3 }, true),
            (Divergence::Jsd { beta: 0.0 }, false),
            (Divergence::Jsd { beta: 1.0 }, true),
        ] {
            let (student, teacher) = random_pair(seed as u64, rows, classes, mask_student);
            let z = Logits::new(&student, rows, classes).unwrap();
            let t = 1.5;
            let spec = Distillation::new()
                .with_temperature(t)
                .with_divergence(divergence)
                .with_t2_scale(true)
                .with_reduction(Reduction::None);
            let upstream: Vec<f64> = (0..rows).map(|i| 0.5 + i as f64).collect();
            let up = Upstream::PerRow(&upstream);
            let (want, want_grad) = scoring::distillation_grad(&spec, z, &teacher, up).unwrap();
            let m = |i: usize| seen_max(&student, &teacher, classes, i, t) * t * t;
            let fits = |s: &Strategy| s.elements_per_lane(classes) <= MAX_ELEMENTS_PER_LANE;
            for strategy in corner_strategies(gpu).into_iter().filter(fits) {
                let label = format!("{rows}x{classes} {divergence:?} {}", strategy.name());
                let (got, grad) = gpu
                    .distillation_grad_with(&spec, z, &teacher, up, strategy)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                // The loss scale T² multiplies the tolerance's absolute part too.
                assert_rows(&label, &got.per_row, &want.per_row, &want.per_row, &m);
                if let (Some((h, kl)), Some((wh, wkl))) = (terms(&got), terms(&want)) {
                    assert_rows(&format!("{label} H"), h, wh, &want.per_row, &m);
                    assert_rows(&format!("{label} KL"), kl, wkl, &want.per_row, &m);
                }
                let scale = |i: usize| upstream[i] * t;
                let max: Vec<f64> = (0..rows)
                    .map(|i| seen_max(&student, &teacher, classes, i, t))
                    .collect();
                assert_gradient(
                    &label,
                    &grad.to_f32(),
                    &want_grad,
                    classes,
                    &scale,
                    &vec![1.0; rows],
                    &max,
                    Dtype::F32,
                );
            }
        }
    }
}

#[test]
fn half_students_reruns_and_refusals() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (6, 301);
    let (student, teacher) = random_pair(12, rows, classes, false);
    let spec = Distillation::new().with_temperature(2.0);
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let half = ElementVec::rounded(dtype, student.iter().map(|&v| v as f64));
        let wide = half.to_f32();
        let z = Logits::from_elements(half.as_elements(), rows, classes).unwrap();
        let want =
            scoring::distillation(&spec, Logits::new(&wide, rows, classes).unwrap(), &teacher)
                .unwrap();
        let got = gpu.distillation(&spec, z, &teacher).unwrap();
        let m = |i: usize| seen_max(&wide, &teacher, classes, i, 2.0);
        assert_rows(
            &format!("{dtype}"),
            &got.per_row,
            &want.per_row,
            &want.per_row,
            &m,
        );
        let (again, grad) = gpu
            .distillation_grad(&spec, z, &teacher, Upstream::Scalar(1.0))
            .unwrap();
        assert_eq!(
            again.per_row, got.per_row,
            "{dtype}: the loss with and without a gradient"
        );
        assert_eq!(grad.dtype(), dtype);
        let (_, grad2) = gpu
            .distillation_grad(&spec, z, &teacher, Upstream::Scalar(1.0))
            .unwrap();
        assert_eq!(
            grad.bytes(),
            grad2.bytes(),
            "{dtype}: reruns are bit-identical"
        );
    }
    let z = Logits::new(&student, rows, classes).unwrap();
    assert!(matches!(
        gpu.distillation(&spec.with_temperature(0.0), z, &teacher),
        Err(XentError::Temperature(_))
    ));
    assert!(matches!(
        gpu.distillation(&spec, z, &teacher[1..]),
        Err(XentError::TargetsShape { .. })
    ));
    let empty = gpu
        .distillation(&spec, Logits::new::<f32>(&[], 0, classes).unwrap(), &[])
        .unwrap();
    assert_eq!(empty.sum, 0.0);
}

#[test]
fn device_buffers_match_the_host_path() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (24, 1003);
    let (student, teacher) = random_pair(31, rows, classes, true);
    // At 16-byte boundaries, as the host path stages rows: the same loads, the same bits.
    let s_buf = common::buffer_with(gpu, 16, bytemuck::cast_slice(&student));
    let t_buf = common::buffer_with(gpu, 32, bytemuck::cast_slice(&teacher));
    let view = xent::DeviceLogits::new(&s_buf, 16, rows, classes);
    let labels = xent::DeviceTargets::probabilities(&t_buf, 32);
    let shape = xent::LossShape::probabilities(rows, classes);
    // Masks where each divergence stays finite (p = 0 only where the loss's log has p: the
    // forward loss and the JSD's β = 0 end, KL(p‖q), with the teacher masked), and one where
    // the forward loss is +inf (the student masked).
    let (student_t, teacher_t) = random_pair(32, rows, classes, false);
    for (divergence, t2, teacher_masked) in [
        (Divergence::ForwardKl, true, true),
        (Divergence::ForwardKl, false, false),
        (Divergence::ReverseKl, false, false),
        (Divergence::Jsd { beta: 0.6 }, false, false),
        (Divergence::Jsd { beta: 0.0 }, true, true),
    ] {
        let (student, teacher) = if teacher_masked {
            (&student_t, &teacher_t)
        } else {
            (&student, &teacher)
        };
        let z = Logits::new(student, rows, classes).unwrap();
        let s_buf = common::buffer_with(gpu, 16, bytemuck::cast_slice(student));
        let t_buf = common::buffer_with(gpu, 32, bytemuck::cast_slice(teacher));
        let view = xent::DeviceLogits::new(&s_buf, 16, rows, classes);
        let labels = xent::DeviceTargets::probabilities(&t_buf, 32);
        let spec = Distillation::new()
            .with_temperature(3.0)
            .with_divergence(divergence)
            .with_t2_scale(t2)
            .with_reduction(Reduction::Mean);
        let host = gpu.distillation(&spec, z, teacher).unwrap();
        let mut loss = gpu.prepare_distillation(&spec, shape).unwrap();
        for _ in 0..2 {
            loss.run(view, labels).unwrap();
            let got = loss.read_distillation().unwrap();
            assert_eq!(got, host, "{divergence:?}");
        }
        // The totals, now and pipelined: the distillation's loss (scaled, the KL alone at
        // β = 0), its entropy and KL for the forward loss, within the sum's tolerance of the
        // per-row output's.
        let totals = loss.read_totals().unwrap();
        let close = |got: f64, want: f64, what: &str| {
            let tol = 1e-5 * (want.abs() + host.per_row.iter().map(|l| l.abs()).sum::<f64>());
            let label = format!("{divergence:?} (T² {t2}) {what}: {got} vs {want}");
            if want.is_finite() {
                assert!((got - want).abs() <= tol, "{label}");
            } else {
                assert_eq!(got, want, "{label}");
            }
        };
        close(totals.sum, host.sum, "sum");
        close(totals.loss.unwrap(), host.loss.unwrap(), "loss");
        assert_eq!(totals.mean_denominator, rows as f64);
        match divergence {
            Divergence::ForwardKl => {
                close(
                    totals.reduced_entropy().unwrap(),
                    host.reduced_entropy().unwrap(),
                    "entropy",
                );
                close(
                    totals.reduced_kl_divergence().unwrap(),
                    host.reduced_kl().unwrap(),
                    "KL",
                );
            }
            _ => assert_eq!(totals.entropy_sum, None),
        }
        loss.run(view, labels).unwrap();
        let pending = loss.read_later().unwrap();
        loss.run(view, labels).unwrap();
        assert_eq!(pending.wait().unwrap(), totals, "{divergence:?}: pipelined");
        // The per-row cross-entropy read would give the unscaled forward loss: refused.
        assert!(matches!(loss.read(), Err(XentError::NotPrepared(_))));
        // The gradient of the mean into a buffer, against the host path's.
        let (_, want) = gpu
            .distillation_grad(&spec, z, teacher, Upstream::Scalar(1.0))
            .unwrap();
        let g_buf = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (rows * classes * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let out = xent::GradientOutput::Buffer {
            buffer: &g_buf,
            offset: 0,
        };
        loss.run_gradient(view, labels, out, Upstream::Scalar(1.0))
            .unwrap();
        let got = common::read_f32(gpu, &g_buf, 0, rows * classes);
        let scale = |_| spec.loss_scale() / (3.0 * rows as f64);
        let max: Vec<f64> = (0..rows)
            .map(|i| seen_max(student, teacher, classes, i, 3.0))
            .collect();
        let want: Vec<f64> = want.to_f32().iter().map(|&v| v as f64).collect();
        assert_gradient(
            &format!("{divergence:?} device gradient"),
            &got,
            &want,
            classes,
            &scale,
            &vec![1.0; rows],
            &max,
            Dtype::F32,
        );
    }
    assert!(matches!(
        gpu.prepare_distillation(
            &Distillation::new(),
            xent::LossShape::class_indices(4, 5, xent::IndexType::I32)
        ),
        Err(XentError::NotPrepared(_))
    ));
    let mut plain = gpu.prepare(&xent::CrossEntropy::new(), shape).unwrap();
    plain.run(view, labels).unwrap();
    assert!(matches!(
        plain.read_distillation(),
        Err(XentError::NotPrepared(_))
    ));
}

/// A row whose teacher (or student) has no finite logit has no softmax: NaN on the GPU as in
/// the reference, for every divergence, while the rows beside it keep their values.
#[test]
fn rows_without_a_finite_logit_are_nan_as_in_the_reference() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (4, 37);
    let (mut student, mut teacher) = random_pair(41, rows, classes, false);
    teacher[classes..2 * classes].fill(f32::NEG_INFINITY);
    student[2 * classes..3 * classes].fill(f32::NEG_INFINITY);
    let z = Logits::new(&student, rows, classes).unwrap();
    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.4 },
    ] {
        let spec = Distillation::new()
            .with_temperature(2.0)
            .with_divergence(divergence)
            .with_reduction(Reduction::None);
        let want = scoring::distillation(&spec, z, &teacher).unwrap();
        assert!(want.per_row[1].is_nan() && want.per_row[2].is_nan());
        let m = |i: usize| seen_max(&student, &teacher, classes, i, 2.0);
        for strategy in corner_strategies(gpu) {
            let label = format!("{divergence:?} {}", strategy.name());
            let got = gpu
                .distillation_with(&spec, z, &teacher, strategy)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_rows(&label, &got.per_row, &want.per_row, &want.per_row, &m);
            // H(p) of the masked student's row exists: each term at its own scale.
            if let (Some((h, kl)), Some((wh, wkl))) = (terms(&got), terms(&want)) {
                assert_rows(&format!("{label} H"), h, wh, wh, &m);
                assert_rows(&format!("{label} KL"), kl, wkl, wkl, &m);
            }
        }
    }
}

/// A teacher class far below the teacher's maximum (a gap of 4000 at T = 2: p = e^-2000, which
/// f64 too rounds to 0) is still a class of the teacher's softmax, as only −inf masks one: on
/// a student's −inf the forward cross-entropy and KL(p‖q) are +inf, on the GPU (whose f32
/// underflows at a gap of ~87·T) and in the f64 reference alike; masked by −inf instead, the
/// same row is finite on both. (The fuzzer found the reference giving the finite value.)
#[test]
fn a_teacher_class_that_underflows_is_still_in_its_softmax() {
    let Some(gpu) = gpu() else { return };
    let classes = 4;
    let student = [
        f32::NEG_INFINITY,
        0.0,
        3.0,
        -1.0,
        f32::NEG_INFINITY,
        0.0,
        3.0,
        -1.0,
    ];
    let teacher = [0.0, 4000.0, 1.0, 2.0, f32::NEG_INFINITY, 4000.0, 1.0, 2.0];
    let z = Logits::new(&student, 2, classes).unwrap();
    let spec = Distillation::new()
        .with_temperature(2.0)
        .with_reduction(Reduction::None);
    let want = scoring::distillation(&spec, z, &teacher).unwrap();
    let got = gpu.distillation(&spec, z, &teacher).unwrap();
    for out in [&want, &got] {
        assert_eq!(out.per_row[0], f64::INFINITY, "{:?}", out.per_row);
        let (_, kl) = terms(out).unwrap();
        assert_eq!(kl[0], f64::INFINITY);
        assert!(out.per_row[1].is_finite(), "{:?}", out.per_row);
    }
    let m = |i: usize| seen_max(&student, &teacher, classes, i, 2.0);
    assert_rows(
        "masked",
        &got.per_row[1..],
        &want.per_row[1..],
        &want.per_row[1..],
        &m,
    );
}

/// Temperatures whose reciprocal is no normal f32 are refused on the GPU (the f32 scale
/// would be 0 or infinite); logits that leave ±2^64 once divided by T are out of range.
#[test]
fn temperatures_beyond_f32_are_refused() {
    let Some(gpu) = gpu() else { return };
    let (mut student, teacher) = random_pair(43, 3, 5, false);
    student[0] = 6.5;
    let z = Logits::new(&student, 3, 5).unwrap();
    for t in [1e-300, 1e-39, 1e39, 1e300] {
        let spec = Distillation::new().with_temperature(t);
        assert!(
            matches!(
                gpu.distillation(&spec, z, &teacher),
                Err(XentError::Temperature(v)) if v == t
            ),
            "T = {t:e}"
        );
    }
    // 6.5 / 1e-19 = 6.5e19 > 2^64: row 0's scaled logits are out of range.
    let spec = Distillation::new().with_temperature(1e-19);
    assert!(matches!(
        gpu.distillation(&spec, z, &teacher),
        Err(XentError::LogitOutOfRange { row: 0 })
    ));
    let fine = gpu
        .distillation(&Distillation::new().with_temperature(1e30), z, &teacher)
        .unwrap();
    assert!(fine.loss.unwrap().is_finite());
}

/// A teacher's probability that underflows f32 is still a probability: on a class the student
/// masks (−inf), the cross-entropy is +inf as in the f64 reference, whatever the order of the
/// classes (it was NaN, 0 or finite by order). And a finite logit that overflows f32 once
/// divided by T < 1 is out of range, not NaN.
#[test]
fn underflowing_teachers_on_masked_classes_and_overflowing_scaled_logits() {
    let Some(gpu) = gpu() else { return };
    let ninf = f32::NEG_INFINITY;
    for (z, t) in [
        (vec![ninf, 0.0], vec![0.0, 110.0]),
        (vec![0.0, ninf], vec![110.0, 0.0]),
        (vec![0.0, 1.0, ninf], vec![110.0, 0.0, 0.0]),
        (vec![1.0, ninf, 0.5], vec![0.0, -30.0, 120.0]),
    ] {
        for divergence in [Divergence::ForwardKl, Divergence::Jsd { beta: 0.0 }] {
            let spec = Distillation::new()
                .with_divergence(divergence)
                .with_reduction(Reduction::None);
            let logits = Logits::new(&z, 1, z.len()).unwrap();
            let want = scoring::distillation(&spec, logits, &t).unwrap();
            let got = gpu.distillation(&spec, logits, &t).unwrap();
            assert_eq!(want.per_row, vec![f64::INFINITY], "{z:?} {t:?}");
            assert_eq!(got.per_row, want.per_row, "{divergence:?} {z:?} {t:?}");
        }
    }
    // The reverse KL's mirror: the student's probability underflows on a class the teacher
    // masks.
    let z = vec![0.0, 110.0];
    let t = vec![ninf, 0.0];
    let spec = Distillation::new()
        .with_divergence(Divergence::ReverseKl)
        .with_reduction(Reduction::None);
    let logits = Logits::new(&z, 1, 2).unwrap();
    let want = scoring::distillation(&spec, logits, &t).unwrap();
    let got = gpu.distillation(&spec, logits, &t).unwrap();
    assert_eq!(want.per_row, vec![f64::INFINITY]);
    assert_eq!(got.per_row, want.per_row);

    let spec = Distillation::new().with_temperature(0.5);
    for (z, t) in [([0.0, 1.0], [0.0, 2e38]), ([0.0, 3e38], [0.0, 1.0])] {
        let logits = Logits::new(&z, 1, 2).unwrap();
        assert!(
            matches!(
                gpu.distillation(&spec, logits, &t),
                Err(XentError::LogitOutOfRange { row: 0 })
            ),
            "{z:?} {t:?}"
        );
    }
}
