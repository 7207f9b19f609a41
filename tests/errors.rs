//! Every input error: its kind, its message, and that the context still works afterwards.

mod common;

use common::gpu;
use xent::{
    CpuReference, CrossEntropy, GpuContext, Logits, Scorer, Strategy, Targets, XentError, cpu,
};

const ROWS: usize = 4;
const CLASSES: usize = 3;
const LOGITS: [f32; ROWS * CLASSES] =
    [0.5, -1.0, 2.0, 0.0, 0.1, 0.2, 3.0, 1.0, -2.0, 0.7, 0.7, 0.7];
const LABELS: [i64; ROWS] = [2, 0, 1, 1];

fn logits() -> Logits<'static> {
    Logits::new(&LOGITS, ROWS, CLASSES).unwrap()
}

/// After an error, a valid call on the same context must still give the right answer.
fn assert_still_works(gpu: &GpuContext) {
    let spec = CrossEntropy::new();
    let got = gpu
        .cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS))
        .unwrap();
    let want = cpu::cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS)).unwrap();
    assert!(
        (got.loss.unwrap() - want.loss.unwrap()).abs() < 1e-5,
        "context broken after an error"
    );
}

/// Runs `call` on both paths; both must fail with the same error, then the GPU must work.
fn on_both(call: impl Fn(&dyn Scorer) -> xent::Result<xent::LossOutput>) -> XentError {
    let cpu_err = call(&CpuReference).expect_err("the CPU reference accepted bad input");
    if let Some(gpu) = gpu() {
        let gpu_err = call(gpu).expect_err("the GPU accepted bad input");
        assert_eq!(gpu_err.to_string(), cpu_err.to_string());
        assert_still_works(gpu);
    }
    cpu_err
}

#[test]
fn logits_of_the_wrong_length() {
    let err = Logits::new(&LOGITS[..11], ROWS, CLASSES).unwrap_err();
    assert!(
        matches!(
            err,
            XentError::LogitsShape {
                len: 11,
                rows: 4,
                classes: 3
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[4, 3]"), "{err}");
    // rows × classes overflowing usize is a shape error too, not a panic.
    assert!(matches!(
        Logits::new(&LOGITS, usize::MAX, 2),
        Err(XentError::LogitsShape { .. })
    ));
}

#[test]
fn zero_classes() {
    let err = Logits::new::<f32>(&[], 4, 0).unwrap_err();
    assert!(matches!(err, XentError::NoClasses), "{err}");
}

#[test]
fn targets_of_the_wrong_shape() {
    let err = on_both(|s| {
        s.cross_entropy(
            &CrossEntropy::new(),
            logits(),
            Targets::ClassIndices(&LABELS[..3]),
        )
    });
    assert!(
        matches!(
            err,
            XentError::TargetsShape {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    let err = on_both(|s| {
        s.cross_entropy(
            &CrossEntropy::new(),
            logits(),
            Targets::probabilities(&[0.25; 8]),
        )
    });
    assert!(
        matches!(
            err,
            XentError::TargetsShape {
                expected: 12,
                got: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[4, 3]"), "{err}");
}

#[test]
fn class_index_out_of_range_names_row_and_value() {
    let labels = [0, 1, 3, 0];
    let err = on_both(|s| {
        s.cross_entropy(
            &CrossEntropy::new(),
            logits(),
            Targets::ClassIndices(&labels),
        )
    });
    assert!(
        matches!(
            err,
            XentError::ClassIndexOutOfRange {
                row: 2,
                value: 3,
                classes: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("row 2") && err.to_string().contains("3"),
        "{err}"
    );

    // Negative, and not the ignore index.
    let labels = [0, -5, 1, -100];
    let spec = CrossEntropy::new().with_ignore_index(-100);
    let err = on_both(|s| s.cross_entropy(&spec, logits(), Targets::ClassIndices(&labels)));
    assert!(
        matches!(
            err,
            XentError::ClassIndexOutOfRange {
                row: 1,
                value: -5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ignore_index (-100)"), "{err}");

    // Without -5 the same targets are valid: -100 is ignored.
    let labels = [0, 2, 1, -100];
    let out = CpuReference
        .cross_entropy(&spec, logits(), Targets::ClassIndices(&labels))
        .unwrap();
    assert_eq!(out.ignored_rows, 1);
}

#[test]
fn ignore_index_with_probabilities() {
    let p = [1.0 / 3.0; 12];
    let spec = CrossEntropy::new().with_ignore_index(-100);
    let err = on_both(|s| s.cross_entropy(&spec, logits(), Targets::probabilities(&p)));
    assert!(
        matches!(err, XentError::IgnoreIndexWithProbabilities),
        "{err}"
    );
}

#[test]
fn bad_class_weights() {
    let spec = CrossEntropy::new().with_weights(vec![1.0, 2.0]);
    let err = on_both(|s| s.cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS)));
    assert!(
        matches!(
            err,
            XentError::WeightsLength {
                expected: 3,
                got: 2
            }
        ),
        "{err}"
    );
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let spec = CrossEntropy::new().with_weights(vec![1.0, bad, 2.0]);
        let err = on_both(|s| s.cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS)));
        assert!(
            matches!(err, XentError::WeightNotFinite { index: 1, .. }),
            "{err}"
        );
    }
}

#[test]
fn label_smoothing_outside_unit_interval() {
    for eps in [-0.1, 1.0001, f64::NAN, f64::INFINITY] {
        let spec = CrossEntropy::new().with_label_smoothing(eps);
        let err = on_both(|s| s.cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS)));
        assert!(matches!(err, XentError::LabelSmoothing(_)), "{err}");
    }
    // Both ends are allowed, as in PyTorch.
    for eps in [0.0, 1.0] {
        let spec = CrossEntropy::new().with_label_smoothing(eps);
        CpuReference
            .cross_entropy(&spec, logits(), Targets::ClassIndices(&LABELS))
            .unwrap();
    }
}

#[test]
fn invalid_forced_strategy() {
    let Some(gpu) = gpu() else { return };
    let spec = CrossEntropy::new();
    for s in [
        Strategy {
            lanes_per_row: 3,
            ..Strategy::NAIVE
        },
        Strategy {
            workgroup_size: 1 << 20,
            lanes_per_row: 1,
            ..Strategy::NAIVE
        },
        Strategy {
            lanes_per_row: 4,
            split: 2,
            ..Strategy::NAIVE
        },
        Strategy {
            split: 0,
            ..Strategy::NAIVE
        },
    ] {
        let err = gpu
            .cross_entropy_with(&spec, logits(), Targets::ClassIndices(&LABELS), s)
            .unwrap_err();
        assert!(matches!(err, XentError::InvalidStrategy { .. }), "{err}");
        assert_still_works(gpu);
    }
}

/// A call on a destroyed device must fail with an error: DeviceLost once wgpu has reported the
/// loss (its callback runs only when the queue drains), wgpu's own validation error before.
fn assert_dead(ctx: &GpuContext) {
    let err = ctx
        .cross_entropy(
            &CrossEntropy::new(),
            logits(),
            Targets::ClassIndices(&LABELS),
        )
        .unwrap_err();
    assert!(
        matches!(err, XentError::DeviceLost(_) | XentError::Gpu { .. }),
        "{err}"
    );
}

#[test]
fn a_lost_device_is_an_error_not_a_panic() {
    let Some(_) = gpu() else { return };
    let ctx = GpuContext::new().unwrap();
    ctx.device().destroy();
    assert_dead(&ctx);
    assert_dead(&ctx);

    // On a caller's device xent leaves the lost callback alone; wgpu's own errors still come
    // back as errors.
    let adapter = xent::gpu::select_adapter().unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    let ctx = GpuContext::from_device(&device, &queue, Default::default()).unwrap();
    device.destroy();
    assert_dead(&ctx);
}
