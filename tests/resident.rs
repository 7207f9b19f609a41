//! The device path: a prepared loss on the caller's buffers, against the host path (bit for
//! bit, where the rows have the same alignment) and the CPU reference; errors found on the
//! device; inputs refused before anything is recorded; no allocation per call; the bound of
//! the device-side reduction; the resident example.

mod common;

#[path = "../examples/resident.rs"]
mod resident_example;

use common::{Inputs, Problem, assert_outputs_match, buffer_with, gpu, max_abs_per_row};
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, GpuContext, IndexType, Logits, LossShape, Reduction,
    Strategy, TargetLayout, Targets, XentError,
};

/// Targets of one kind, as host targets and as device bytes.
enum Kind {
    I32,
    I64,
    Probabilities,
}

/// Scores `inputs` through a prepared loss on device buffers placed at the given byte
/// offsets, with `strategy`.
fn resident(
    gpu: &GpuContext,
    spec: &CrossEntropy,
    inputs: &Problem,
    kind: &Kind,
    offsets: (usize, usize),
    strategy: Strategy,
) -> xent::Result<xent::LossOutput> {
    let (rows, classes) = (inputs.rows, inputs.classes);
    let logits = buffer_with(gpu, offsets.0, bytemuck::cast_slice(&inputs.logits));
    let i32s: Vec<i32> = inputs.labels.iter().map(|&v| v as i32).collect();
    let (bytes, layout): (&[u8], TargetLayout) = match kind {
        Kind::I32 => (
            bytemuck::cast_slice(&i32s),
            TargetLayout::ClassIndices(IndexType::I32),
        ),
        Kind::I64 => (
            bytemuck::cast_slice(&inputs.labels[..]),
            TargetLayout::ClassIndices(IndexType::I64),
        ),
        Kind::Probabilities => (
            bytemuck::cast_slice(&inputs.probabilities),
            TargetLayout::PROBABILITIES,
        ),
    };
    let targets = buffer_with(gpu, offsets.1, bytes);
    let mut loss = gpu.prepare_with(spec, LossShape::new(rows, classes, layout), strategy)?;
    let view = DeviceLogits::new(&logits, offsets.0 as u64, rows, classes);
    let targets = DeviceTargets::of_layout(&targets, offsets.1 as u64, layout);
    loss.run(view, targets)?;
    loss.read()
}

fn host_targets<'a>(inputs: &'a Problem, kind: &Kind) -> Targets<'a> {
    match kind {
        Kind::Probabilities => Targets::probabilities(&inputs.probabilities),
        _ => Targets::ClassIndices(&inputs.labels),
    }
}

fn specs(classes: usize, probabilities: bool) -> Vec<CrossEntropy> {
    let mut out = Vec::new();
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let base = CrossEntropy::new().with_reduction(reduction);
        out.push(base.clone());
        out.push(base.clone().with_label_smoothing(0.2));
        out.push(
            base.clone()
                .with_weights(Inputs::new(7).weights(classes))
                .with_label_smoothing(0.05),
        );
        out.push(base.clone().with_z_loss(1e-3).with_softcap(6.0));
        if !probabilities {
            out.push(base.clone().with_ignore_index(-100));
            out.push(
                base.with_ignore_index(2)
                    .with_weights(Inputs::new(8).weights(classes)),
            );
        }
    }
    out
}

#[test]
fn resident_is_bit_identical_to_the_host_path() {
    let Some(gpu) = gpu() else { return };
    for (seed, (rows, classes)) in [(1, 1), (7, 3), (300, 5), (40, 1000), (9, 4099)]
        .into_iter()
        .enumerate()
    {
        let plain = Problem::random(seed as u64, rows, classes, 5.0, 0.0);
        let mut ignoring = Problem::random(seed as u64, rows, classes, 5.0, 0.0);
        for label in ignoring.labels.iter_mut().step_by(5) {
            *label = -100;
        }
        let strategies = [
            gpu.plan(rows, classes),
            Strategy::NAIVE,
            Strategy {
                workgroup_size: 64,
                lanes_per_row: 64,
                split: 4,
                vec4: true,
                subgroups: false,
                f16_builtin: false,
            },
        ];
        for kind in [Kind::I32, Kind::I64, Kind::Probabilities] {
            let probabilities = matches!(kind, Kind::Probabilities);
            for spec in specs(classes, probabilities) {
                let inputs = if spec.ignore_index() == Some(-100) {
                    &ignoring
                } else {
                    &plain
                };
                for strategy in strategies {
                    let host = gpu
                        .cross_entropy_with(
                            &spec,
                            inputs.logits(),
                            host_targets(inputs, &kind),
                            strategy,
                        )
                        .unwrap();
                    // Offsets that keep the rows' alignment (a multiple of 16 bytes).
                    for offsets in [(0, 0), (256, 48), (272, 16)] {
                        let device =
                            resident(gpu, &spec, inputs, &kind, offsets, strategy).unwrap();
                        // Debug text: every f64 in shortest round-trip form (so equal text is
                        // equal bits), and NaN equal to NaN.
                        assert_eq!(
                            format!("{device:?}"),
                            format!("{host:?}"),
                            "{rows}x{classes} {spec:?} {strategy:?} offsets {offsets:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn misaligned_offsets_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes) in [(5, 1), (6, 3), (33, 1001), (4, 4099)] {
        let inputs = Problem::random(11, rows, classes, 5.0, 0.0);
        for kind in [Kind::I32, Kind::I64, Kind::Probabilities] {
            let probabilities = matches!(kind, Kind::Probabilities);
            let spec = CrossEntropy::new().with_label_smoothing(0.1);
            let reference =
                xent::cpu::cross_entropy(&spec, inputs.logits(), host_targets(&inputs, &kind))
                    .unwrap();
            let mass = inputs.mass(&spec, probabilities);
            let max_abs = max_abs_per_row(&inputs.logits, classes);
            for offsets in [(4, 8), (8, 4), (12, 0), (260, 12)] {
                let strategy = gpu.plan(rows, classes);
                let device = resident(gpu, &spec, &inputs, &kind, offsets, strategy).unwrap();
                let label = format!("{rows}x{classes} offsets {offsets:?}");
                assert_outputs_match(&label, &device, &reference, &max_abs, &mass);
            }
        }
    }
}

#[test]
fn class_indices_out_of_range_on_the_device_name_row_and_value() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (6, 5);
    let inputs = Problem::random(3, rows, classes, 5.0, 0.0);
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.logits));
    let spec = CrossEntropy::new().with_ignore_index(-100);
    let cases: [(IndexType, Vec<i64>, usize, i64); 4] = [
        (IndexType::I32, vec![0, 1, 2, 7, 4, 9], 3, 7),
        (IndexType::I32, vec![0, -5, 2, 3, -100, 1], 1, -5),
        (IndexType::I64, vec![0, 1, 1 << 33, 3, 4, 0], 2, 1 << 33),
        (
            IndexType::I64,
            vec![0, 1, 2, 3, 4, -(1 << 40)],
            5,
            -(1 << 40),
        ),
    ];
    for (index_type, targets, row, value) in cases {
        let bytes: Vec<u8> = match index_type {
            IndexType::I32 => targets
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
            IndexType::I64 => targets.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        };
        let buffer = buffer_with(gpu, 0, &bytes);
        let mut loss = gpu
            .prepare(&spec, LossShape::class_indices(rows, classes, index_type))
            .unwrap();
        loss.run(
            DeviceLogits::new(&logits, 0, rows, classes),
            DeviceTargets::class_indices(&buffer, 0, index_type),
        )
        .unwrap();
        match loss.read_totals() {
            Err(XentError::ClassIndexOutOfRange {
                row: r,
                value: v,
                classes: c,
                ignore_index,
            }) => {
                assert_eq!((r, v, c, ignore_index), (row, value, classes, Some(-100)));
            }
            other => {
                panic!("{index_type:?} {targets:?}: expected an out-of-range error, got {other:?}")
            }
        }
        // The same prepared loss, and the context, work afterwards.
        let good: Vec<u8> = match index_type {
            IndexType::I32 => inputs
                .labels
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
            IndexType::I64 => inputs
                .labels
                .iter()
                .flat_map(|&v| v.to_le_bytes())
                .collect(),
        };
        let good = buffer_with(gpu, 0, &good);
        loss.run(
            DeviceLogits::new(&logits, 0, rows, classes),
            DeviceTargets::class_indices(&good, 0, index_type),
        )
        .unwrap();
        let reference = xent::cpu::cross_entropy(
            &spec,
            inputs.logits(),
            Targets::ClassIndices(&inputs.labels),
        )
        .unwrap();
        let got = loss.read().unwrap();
        assert!((got.loss.unwrap() - reference.loss.unwrap()).abs() < 1e-5);
        gpu.cross_entropy(
            &spec,
            inputs.logits(),
            Targets::ClassIndices(&inputs.labels),
        )
        .unwrap();
    }
}

#[test]
fn bad_device_inputs_are_refused_before_recording() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (4, 10);
    let inputs = Problem::random(5, rows, classes, 5.0, 0.0);
    let spec = CrossEntropy::new();
    let shape = LossShape::class_indices(rows, classes, IndexType::I64);
    let mut loss = gpu.prepare(&spec, shape).unwrap();
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.logits));
    let targets = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.labels[..]));
    let t = DeviceTargets::class_indices(&targets, 0, IndexType::I64);
    let expect = |result: xent::Result<()>, what: &str, needle: &str| match result {
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(needle), "{what}: {message}");
        }
        Ok(()) => panic!("{what}: accepted"),
    };
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    // Too small: 4 rows at an offset that leaves room for fewer.
    let small = buffer_with(gpu, 0, &[0u8; 16]);
    expect(
        loss.record(&mut encoder, DeviceLogits::new(&small, 0, rows, classes), t),
        "too small",
        "do not fit",
    );
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&logits, 2, rows, classes),
            t,
        ),
        "misaligned",
        "multiple of 4",
    );
    let no_storage = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&no_storage, 0, rows, classes),
            t,
        ),
        "no STORAGE",
        "STORAGE",
    );
    let other = GpuContext::new().unwrap();
    let foreign = buffer_with(&other, 0, bytemuck::cast_slice(&inputs.logits));
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&foreign, 0, rows, classes),
            t,
        ),
        "another device",
        "binding the inputs",
    );
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&logits, 0, rows + 1, classes),
            t,
        ),
        "too many rows",
        "at most 4 rows",
    );
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&logits, 0, rows, classes - 1),
            t,
        ),
        "other classes",
        "10 classes",
    );
    expect(
        loss.record(
            &mut encoder,
            DeviceLogits::new(&logits, 0, rows, classes),
            DeviceTargets::probabilities(&logits, 0),
        ),
        "other targets",
        "targets",
    );
    // The same checks on the targets' view and on the gradient's output.
    let view = DeviceLogits::new(&logits, 0, rows, classes);
    let foreign_targets = buffer_with(&other, 0, bytemuck::cast_slice(&inputs.labels[..]));
    let tiny = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    for (targets, what, needle) in [
        (&tiny, "small targets", "do not fit"),
        (&no_storage, "targets without STORAGE", "STORAGE"),
        (
            &foreign_targets,
            "targets of another device",
            "binding the inputs",
        ),
    ] {
        let t = DeviceTargets::class_indices(targets, 0, IndexType::I64);
        expect(loss.record(&mut encoder, view, t), what, needle);
    }
    expect(
        loss.record(
            &mut encoder,
            view,
            DeviceTargets::class_indices(&targets, 2, IndexType::I64),
        ),
        "misaligned targets",
        "multiple of 4",
    );
    let grad = buffer_with(gpu, 0, &vec![0u8; rows * classes * 4]);
    let foreign_grad = buffer_with(&other, 0, &vec![0u8; rows * classes * 4]);
    for (buffer, offset, what, needle) in [
        (&small, 0, "small gradient", "do not fit"),
        (&grad, 2, "misaligned gradient", "multiple of 4"),
        (&no_storage, 0, "gradient without STORAGE", "STORAGE"),
        (
            &foreign_grad,
            0,
            "gradient of another device",
            "binding the inputs",
        ),
    ] {
        let out = xent::GradientOutput::Buffer { buffer, offset };
        let up = xent::Upstream::Scalar(1.0);
        expect(
            loss.record_gradient(&mut encoder, view, t, out, up),
            what,
            needle,
        );
    }
    // Nothing was recorded: the encoder still finishes, and the loss still works.
    gpu.queue().submit([encoder.finish()]);
    loss.run(DeviceLogits::new(&logits, 0, rows, classes), t)
        .unwrap();
    let reference = xent::cpu::cross_entropy(
        &spec,
        inputs.logits(),
        Targets::ClassIndices(&inputs.labels),
    )
    .unwrap();
    assert!((loss.read_totals().unwrap().loss.unwrap() - reference.loss.unwrap()).abs() < 1e-5);
}

/// A prepared loss binds its per-row results whole: more rows than the device binds them for
/// (16 bytes a row at least, and top-k targets keep their entries too) are refused with an
/// error that names the rows and the bytes, before anything is allocated; the context stays
/// usable.
#[test]
fn more_rows_than_the_device_binds_results_for_are_refused() {
    let Some(gpu) = gpu() else { return };
    let limits = gpu.device().limits();
    let most = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    let k = xent::gpu::MAX_SPARSE_K;
    // Each row needs at least its results, its gradient statistics and its sorted entries.
    let rows = (most / (32 + 4 * k as u64) + 1).min(u32::MAX as u64) as usize;
    let shape = LossShape::new(rows, 200, TargetLayout::TopK { k: k as u32 });
    match gpu.prepare(&CrossEntropy::new(), shape) {
        Err(XentError::NotPrepared(why)) => {
            assert!(
                why.contains(&format!("{rows} rows")) && why.contains("bytes"),
                "{why}"
            )
        }
        other => panic!("{rows} rows: {:?}", other.map(|_| ())),
    }
    let inputs = Problem::random(6, 3, 10, 5.0, 0.0);
    gpu.cross_entropy(
        &CrossEntropy::new(),
        inputs.logits(),
        Targets::ClassIndices(&inputs.labels),
    )
    .unwrap();
}

#[test]
fn repeated_calls_allocate_nothing() {
    if gpu().is_none() {
        return;
    }
    // A context of its own: other tests allocate on the shared one concurrently.
    let gpu = &GpuContext::new().unwrap();
    let (rows, classes) = (64, 100);
    let inputs = Problem::random(9, rows, classes, 5.0, 0.0);
    let spec = CrossEntropy::new().with_label_smoothing(0.1);
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.logits));
    let targets = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.labels[..]));
    let mut loss = gpu
        .prepare(
            &spec,
            LossShape::class_indices(rows, classes, IndexType::I64),
        )
        .unwrap();
    let view = DeviceLogits::new(&logits, 0, rows, classes);
    let device_targets = DeviceTargets::class_indices(&targets, 0, IndexType::I64);
    // Bound once, recorded a thousand times.
    let bound = loss.bind(view, device_targets).unwrap();
    let call = |loss: &mut xent::PreparedLoss| {
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        loss.record_bound(&mut encoder, &bound).unwrap();
        gpu.queue().submit([encoder.finish()]);
        loss.read_totals().unwrap()
    };
    let first = call(&mut loss);
    let before = gpu.buffers_created();
    for _ in 0..1000 {
        assert_eq!(call(&mut loss), first);
    }
    assert_eq!(
        gpu.buffers_created(),
        before,
        "buffers created by 1000 calls"
    );
    // Recording with fresh bind groups each time gives the same, and makes no buffer either.
    loss.run(view, device_targets).unwrap();
    assert_eq!(loss.read_totals().unwrap(), first);
    assert_eq!(gpu.buffers_created(), before);
    // Inputs bound by one prepared loss are refused by another.
    let mut other = gpu
        .prepare(
            &spec,
            LossShape::class_indices(rows, classes, IndexType::I64),
        )
        .unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let refused = other.record_bound(&mut encoder, &bound).unwrap_err();
    assert!(
        refused.to_string().contains("another prepared loss"),
        "{refused}"
    );
    // The host path reuses its prepared loss too.
    let host = |_| {
        gpu.cross_entropy(
            &spec,
            inputs.logits(),
            Targets::ClassIndices(&inputs.labels),
        )
        .unwrap()
    };
    let first = host(0);
    let before = gpu.buffers_created();
    for i in 0..50 {
        assert_eq!(host(i), first);
    }
    assert_eq!(
        gpu.buffers_created(),
        before,
        "buffers created by 50 host calls"
    );
}

/// The device's totals against the f64 sum of the per-row f32 losses it wrote: within the
/// bound stated in `reduce_totals.wgsl` plus the f32 workgroup sums (≤ 8 roundings per term
/// for ≤ 256 rows a workgroup): `(8 + 2)·2⁻²⁴·Σ|l_i|`.
#[test]
fn device_totals_stay_within_the_stated_bound() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes) in [(20_000, 3), (3000, 257)] {
        let inputs = Problem::random(21, rows, classes, 30.0, 0.0);
        let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
        let out = gpu
            .cross_entropy(
                &spec,
                inputs.logits(),
                Targets::ClassIndices(&inputs.labels),
            )
            .unwrap();
        let exact: f64 = out.per_row.iter().sum();
        let magnitude: f64 = out.per_row.iter().map(|l| l.abs()).sum();
        let bound = 10.0 * 2f64.powi(-24) * magnitude;
        assert!(
            (out.sum - exact).abs() <= bound,
            "{rows}x{classes}: device sum {} vs {exact} (bound {bound:e})",
            out.sum
        );
        assert_eq!(out.mean_denominator, rows as f64);
    }
}

/// The compensated reduction against its stated bound where plain f32 summation misses it:
/// one row per workgroup (so the workgroup sums are the per-row losses the device reports,
/// exactly), class weights ±1e6 whose terms cancel. The device's sum and mean denominator stay
/// within 2·2⁻²⁴·|Σ| + n·2⁻⁴⁸·Σ|x| of the f64 sums of the same n values; a left-to-right f32
/// sum of them does not (asserted too, so that the data keep the test able to fail).
#[test]
fn the_compensated_reduction_survives_cancellation() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (4000, 4);
    let inputs = Problem::random(23, rows, classes, 4.0, 0.0);
    let weights = vec![1e6_f32, -1e6, 1.0, 0.5];
    let spec = CrossEntropy::new()
        .with_reduction(Reduction::Sum)
        .with_weights(weights.clone());
    let out = gpu
        .cross_entropy_with(
            &spec,
            inputs.logits(),
            Targets::ClassIndices(&inputs.labels),
            Strategy::NAIVE,
        )
        .unwrap();
    let n = rows as f64;
    let check = |what: &str, got: f64, x: &[f64]| {
        let exact: f64 = x.iter().sum();
        let magnitude: f64 = x.iter().map(|v| v.abs()).sum();
        let bound = 2.0 * 2f64.powi(-24) * exact.abs() + n * 2f64.powi(-48) * magnitude;
        assert!(
            (got - exact).abs() <= bound,
            "{what}: device {got} vs {exact} (bound {bound:e})"
        );
        let plain = x.iter().fold(0.0_f32, |acc, &v| acc + v as f32) as f64;
        assert!(
            (plain - exact).abs() > bound,
            "{what}: the data must defeat plain f32 summation ({plain} vs {exact}, bound {bound:e})"
        );
    };
    check("sum", out.sum, &out.per_row);
    let w_y: Vec<f64> = inputs
        .labels
        .iter()
        .map(|&y| weights[y as usize] as f64)
        .collect();
    check("mean denominator", out.mean_denominator, &w_y);
}

#[test]
fn the_resident_example_scores_what_the_cpu_scores() {
    if gpu().is_none() {
        return;
    }
    let problem = resident_example::Problem::new();
    let losses = resident_example::run(&problem).unwrap();
    assert_eq!(losses.len(), resident_example::STEPS);
    // Every step scores the same logits: the same bits each time.
    assert!(
        losses.iter().all(|l| l.to_bits() == losses[0].to_bits()),
        "{losses:?}"
    );
    let loss = losses[0];
    let (rows, classes) = resident_example::Problem::shape();
    // The shader's f32 matmul may round differently from the host's (fused multiply-adds):
    // compare the losses at the f32 level of the logits (|z| ≲ 10, 64 terms).
    let z = problem.logits();
    let reference = xent::cpu::cross_entropy(
        &resident_example::Problem::spec(),
        Logits::new(&z, rows, classes).unwrap(),
        Targets::ClassIndices(&problem.targets),
    )
    .unwrap();
    let want = reference.loss.unwrap();
    assert!((loss - want).abs() <= 1e-4 * want.abs(), "{loss} vs {want}");
}

/// A call of no rows gives PyTorch's empty values; a gradient buffer that is also an input is
/// refused before anything is recorded.
#[test]
fn empty_calls_and_a_gradient_over_an_input() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (5, 7);
    let inputs = Problem::random(12, rows, classes, 5.0, 0.0);
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.logits));
    // Room for a gradient after the indices too, so that only the aliasing is wrong below.
    let mut target_bytes = bytemuck::cast_slice::<i64, u8>(&inputs.labels).to_vec();
    target_bytes.resize(rows * classes * 4, 0);
    let targets = buffer_with(gpu, 0, &target_bytes);
    let spec = CrossEntropy::new();
    let mut loss = gpu
        .prepare(
            &spec,
            LossShape::class_indices(rows, classes, IndexType::I64),
        )
        .unwrap();
    let t = DeviceTargets::class_indices(&targets, 0, IndexType::I64);
    loss.run(DeviceLogits::new(&logits, 0, 0, classes), t)
        .unwrap();
    let empty = loss.read().unwrap();
    assert_eq!(empty.rows, 0);
    assert_eq!(empty.sum, 0.0);
    assert!(empty.loss.unwrap().is_nan());
    let view = DeviceLogits::new(&logits, 0, rows, classes);
    for buffer in [&logits, &targets] {
        let out = xent::GradientOutput::Buffer { buffer, offset: 0 };
        let err = loss
            .run_gradient(view, t, out, xent::Upstream::Scalar(1.0))
            .unwrap_err();
        assert!(err.to_string().contains("also an input"), "{err}");
    }
    // In place, the targets may not share the logits' buffer.
    let shared = DeviceTargets::class_indices(&logits, 0, IndexType::I64);
    let err = loss
        .run_gradient(
            view,
            shared,
            xent::GradientOutput::InPlace,
            xent::Upstream::Scalar(1.0),
        )
        .unwrap_err();
    assert!(err.to_string().contains("another buffer"), "{err}");
    loss.run(view, t).unwrap();
    let want = xent::cpu::cross_entropy(&spec, inputs.logits(), inputs.targets(false)).unwrap();
    assert!((loss.read_totals().unwrap().loss.unwrap() - want.loss.unwrap()).abs() < 1e-5);
}

/// Pipelined reads (`read_later`): with two calls in flight behind the one read, each call's
/// totals are bit-identical to a blocking read of the same inputs; an error the device finds
/// in one call is that call's read's alone; a dropped read frees its buffer; the read-back
/// buffers stop growing once the loop's depth is reached.
#[test]
fn pipelined_reads_give_each_call_its_own_totals() {
    if gpu().is_none() {
        return;
    }
    // A context of its own: the buffer count is per context.
    let gpu = &GpuContext::new().unwrap();
    let (rows, classes) = (40, 300);
    let spec = CrossEntropy::new()
        .with_ignore_index(3)
        .with_label_smoothing(0.05)
        .with_z_loss(1e-3);
    let sets: Vec<(wgpu::Buffer, wgpu::Buffer)> = (0..4u64)
        .map(|seed| {
            let inputs = Problem::random(20 + seed, rows, classes, 4.0, 0.0);
            let mut labels = inputs.labels.clone();
            if seed == 2 {
                labels[17] = classes as i64 + 5;
            }
            (
                buffer_with(gpu, 0, bytemuck::cast_slice(&inputs.logits)),
                buffer_with(gpu, 0, bytemuck::cast_slice(&labels)),
            )
        })
        .collect();
    let shape = LossShape::class_indices(rows, classes, IndexType::I64);
    let mut loss = gpu.prepare(&spec, shape).unwrap();
    let bound: Vec<_> = sets
        .iter()
        .map(|(z, y)| {
            loss.bind(
                DeviceLogits::new(z, 0, rows, classes),
                DeviceTargets::class_indices(y, 0, IndexType::I64),
            )
            .unwrap()
        })
        .collect();
    let record = |loss: &mut xent::PreparedLoss, set: usize| {
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        loss.record_bound(&mut encoder, &bound[set]).unwrap();
        gpu.queue().submit([encoder.finish()]);
    };
    // Each set's totals by a blocking read.
    let blocking: Vec<_> = (0..sets.len())
        .map(|set| {
            record(&mut loss, set);
            loss.read_totals()
        })
        .collect();
    assert!(matches!(
        blocking[2],
        Err(XentError::ClassIndexOutOfRange { row: 17, .. })
    ));
    let check = |set: usize, got: xent::Result<xent::LossTotals>| match (&blocking[set], got) {
        (Ok(want), Ok(got)) => assert_eq!(&got, want, "set {set}"),
        (Err(want), Err(got)) => assert_eq!(got.to_string(), want.to_string(), "set {set}"),
        (want, got) => panic!("set {set}: expected {want:?}, got {got:?}"),
    };
    let mut pending = std::collections::VecDeque::new();
    let before = gpu.buffers_created();
    for call in 0..60 {
        let set = call % sets.len();
        record(&mut loss, set);
        pending.push_back((set, loss.read_later().unwrap()));
        if pending.len() > 2 {
            let (set, read) = pending.pop_front().unwrap();
            check(set, read.wait());
        }
    }
    // Two reads pending while a third call records: at most two read-back buffers beyond the
    // first, however the calls and reads interleave.
    let made = gpu.buffers_created() - before;
    assert!(made <= 2, "{made} buffers made by 60 pipelined calls");
    // Reads may be waited for out of order, and dropped.
    let (a, first) = pending.pop_front().unwrap();
    let (b, second) = pending.pop_front().unwrap();
    check(b, second.wait());
    check(a, first.wait());
    record(&mut loss, 1);
    let dropped = loss.read_later().unwrap();
    // While the read is pending a blocking read of the same call is refused; once it has
    // been read (a call already done when read_later began is read there and then) the
    // blocking read gives the same totals: never stale ones.
    match loss.read_totals() {
        Err(refused) => assert!(refused.to_string().contains("PendingTotals"), "{refused}"),
        Ok(totals) => assert_eq!(&totals, blocking[1].as_ref().unwrap()),
    }
    drop(dropped);
    record(&mut loss, 3);
    let ready = loss.read_later().unwrap();
    while !ready.is_ready() {
        std::thread::yield_now();
    }
    check(3, ready.wait());
    // Blocking reads after pipelined ones, and the whole output.
    record(&mut loss, 0);
    check(0, loss.read_totals());
    assert_eq!(
        &loss.read().unwrap().totals(),
        blocking[0].as_ref().unwrap()
    );
}

/// One call's inputs and gradient buffer, as `record_micro_batches` made them.
struct MicroBatch {
    p: Problem,
    upstream: Vec<f64>,
    _logits: wgpu::Buffer,
    _labels: wgpu::Buffer,
    grad: wgpu::Buffer,
}

/// Bytes a gradient buffer holds before a call writes it.
const SENTINEL: u8 = 0xa5;

/// Records one gradient call per entry of `rows` (random logits, classes and a per-row
/// upstream gradient of its own, seeded from `seed`) into `encoder`, each into a gradient
/// buffer filled with `SENTINEL`.
fn record_micro_batches(
    gpu: &xent::GpuContext,
    loss: &mut xent::PreparedLoss,
    encoder: &mut wgpu::CommandEncoder,
    classes: usize,
    rows: &[usize],
    seed: u64,
) -> Vec<MicroBatch> {
    let mut made = Vec::new();
    for (c, &rows) in rows.iter().enumerate() {
        let p = Problem::random(seed * 100 + c as u64, rows, classes, 5.0, 0.0);
        let upstream: Vec<f64> = (0..rows).map(|i| 0.25 + (c * 7 + i) as f64).collect();
        let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
        let labels = buffer_with(gpu, 0, bytemuck::cast_slice(&p.labels));
        let grad = buffer_with(gpu, 0, &vec![SENTINEL; rows * classes * 4]);
        loss.record_gradient(
            encoder,
            DeviceLogits::new(&logits, 0, rows, classes),
            DeviceTargets::class_indices(&labels, 0, IndexType::I64),
            xent::GradientOutput::Buffer {
                buffer: &grad,
                offset: 0,
            },
            xent::Upstream::PerRow(&upstream),
        )
        .unwrap();
        made.push(MicroBatch {
            p,
            upstream,
            _logits: logits,
            _labels: labels,
            grad,
        });
    }
    made
}

/// Asserts that every call of `made` left the gradient the host path gives for its inputs
/// under `spec`, within `eps` relative (0: bit for bit), but the first `overran`, which wrote
/// nothing (their buffers still hold `SENTINEL`).
fn assert_micro_batches(
    gpu: &xent::GpuContext,
    spec: &CrossEntropy,
    classes: usize,
    made: &[MicroBatch],
    overran: usize,
    eps: f32,
) {
    for (c, batch) in made.iter().enumerate() {
        let MicroBatch {
            p, upstream, grad, ..
        } = batch;
        let got = common::read_f32(gpu, grad, 0, p.rows * classes);
        let calls = made.len();
        if c < overran {
            let untouched = u32::from_ne_bytes([SENTINEL; 4]);
            assert!(
                got.iter().all(|g| g.to_bits() == untouched),
                "call {c} of {calls}: overran, yet wrote its gradient"
            );
            continue;
        }
        let up = xent::Upstream::PerRow(upstream);
        let (_, want) = gpu
            .cross_entropy_grad(spec, p.logits(), p.targets(false), up)
            .unwrap();
        for (k, (&g, &w)) in got.iter().zip(&want.to_f32()).enumerate() {
            assert!(
                (g - w).abs() <= eps * w.abs(),
                "call {c} of {calls}, element {k}: {g} vs {w}"
            );
        }
    }
}

/// Several calls recorded into one encoder before one submission (micro-batches of different
/// sizes, each with its own per-row upstream gradient) each run with their own parameters,
/// and give the gradients the host path gives them one by one.
#[test]
fn calls_recorded_before_one_submission_keep_their_own_parameters() {
    let Some(gpu) = gpu() else { return };
    let classes = 37;
    let spec = CrossEntropy::new()
        .with_reduction(Reduction::None)
        .with_z_loss(0.01);
    let sizes = [9usize, 4, 7];
    let mut loss = gpu
        .prepare(&spec, LossShape::class_indices(9, classes, IndexType::I64))
        .unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let calls = record_micro_batches(gpu, &mut loss, &mut encoder, classes, &sizes, 70);
    gpu.queue().submit([encoder.finish()]);
    // The totals are the last call's.
    let last = loss.read().unwrap();
    assert_eq!(last.per_row.len(), sizes[2]);
    assert_micro_batches(gpu, &spec, classes, &calls, 0, 2.0 * f32::EPSILON);
    let MicroBatch { p, upstream, .. } = &calls[2];
    let up = xent::Upstream::PerRow(upstream);
    let (want, _) = gpu
        .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
        .unwrap();
    assert_eq!(last.per_row, want.per_row);
}

/// The loss the parameter-slot tests record their calls on: up to 6 rows of 13 classes,
/// reduction none (each call's per-row upstream gradient in its own slot). Returns the
/// classes, the spec and the loss.
fn slot_test_loss(gpu: &xent::GpuContext) -> (usize, CrossEntropy, xent::PreparedLoss) {
    let classes = 13;
    let spec = CrossEntropy::new().with_reduction(Reduction::None);
    let loss = gpu
        .prepare(&spec, LossShape::class_indices(6, classes, IndexType::I64))
        .unwrap();
    (classes, spec, loss)
}

/// More calls recorded before one submission than a prepared loss has parameter slots (8):
/// the earliest find a later call's parameters in their slot when they run. They write
/// nothing (their gradient buffers keep what they held) instead of a gradient of the wrong
/// rows or scale, the calls after them are right, and the first read after it, even one of a
/// later submission, is `XentError::CallsOverran` (not a read refused before the submission,
/// nor a pending read begun before it or of a call before the overrun); the loss stays usable.
/// Eight calls are fine.
#[test]
fn more_calls_than_slots_before_one_submission_are_an_error_not_a_wrong_gradient() {
    let Some(gpu) = gpu() else { return };
    let (classes, spec, mut loss) = slot_test_loss(gpu);
    // `calls` calls of 1 to 6 rows into one encoder.
    let record = |loss: &mut xent::PreparedLoss,
                  encoder: &mut wgpu::CommandEncoder,
                  seed: u64,
                  calls: usize| {
        let rows: Vec<usize> = (0..calls)
            .map(|c| 1 + (c * 5 + seed as usize) % 6)
            .collect();
        record_micro_batches(gpu, loss, encoder, classes, &rows, seed)
    };
    let check = |made: &[MicroBatch], overran: usize| {
        assert_micro_batches(gpu, &spec, classes, made, overran, 0.0);
    };
    // As many calls as slots: each its own.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let made = record(&mut loss, &mut encoder, 1, 8);
    gpu.queue().submit([encoder.finish()]);
    loss.read().unwrap();
    check(&made, 0);
    // Three more: the first three ran into calls 9 to 11's parameters.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let made = record(&mut loss, &mut encoder, 2, 11);
    gpu.queue().submit([encoder.finish()]);
    let e = loss.read().unwrap_err();
    assert!(matches!(e, XentError::CallsOverran { slots: 8 }), "{e}");
    assert!(e.to_string().contains("more than 8 calls"), "{e}");
    check(&made, 3);
    // Reported once, and the loss goes on.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let made = record(&mut loss, &mut encoder, 3, 2);
    gpu.queue().submit([encoder.finish()]);
    let last = loss.read().unwrap();
    assert_eq!(last.per_row.len(), made[1].p.rows);
    check(&made, 0);
    // Reported by the first read after it, even of a later submission.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let overrun = record(&mut loss, &mut encoder, 4, 9);
    gpu.queue().submit([encoder.finish()]);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let after = record(&mut loss, &mut encoder, 5, 1);
    gpu.queue().submit([encoder.finish()]);
    assert!(matches!(loss.read(), Err(XentError::CallsOverran { .. })));
    check(&overrun, 1);
    check(&after, 0);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    record(&mut loss, &mut encoder, 6, 1);
    gpu.queue().submit([encoder.finish()]);
    loss.read().unwrap();
    // A read refused before the submission reports nothing, so clears nothing.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let overrun = record(&mut loss, &mut encoder, 7, 9);
    assert!(matches!(loss.read(), Err(XentError::NotSubmitted)));
    let after = record(&mut loss, &mut encoder, 8, 1);
    gpu.queue().submit([encoder.finish()]);
    assert!(matches!(loss.read(), Err(XentError::CallsOverran { .. })));
    check(&overrun, 2);
    check(&after, 0);
    // A pending read of an earlier call reports only what ran before that call: an overrun
    // recorded while it waits is the next read's.
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    record(&mut loss, &mut encoder, 9, 1);
    gpu.queue().submit([encoder.finish()]);
    let pending = loss.read_later().unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let overrun = record(&mut loss, &mut encoder, 10, 10);
    gpu.queue().submit([encoder.finish()]);
    pending.wait().unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    record(&mut loss, &mut encoder, 11, 1);
    gpu.queue().submit([encoder.finish()]);
    assert!(matches!(loss.read(), Err(XentError::CallsOverran { .. })));
    check(&overrun, 2);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    record(&mut loss, &mut encoder, 12, 1);
    gpu.queue().submit([encoder.finish()]);
    loss.read().unwrap();
    // Nor a pending read begun before the submission (it finds an earlier call's status).
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let overrun = record(&mut loss, &mut encoder, 13, 11);
    let early = loss.read_later().unwrap();
    assert!(early.is_ready(), "an idle read-back buffer maps at once");
    gpu.queue().submit([encoder.finish()]);
    assert!(matches!(early.wait(), Err(XentError::NotSubmitted)));
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    record(&mut loss, &mut encoder, 14, 1);
    gpu.queue().submit([encoder.finish()]);
    assert!(matches!(loss.read(), Err(XentError::CallsOverran { .. })));
    check(&overrun, 3);
}

/// A call refused as it is recorded (a per-row upstream gradient of the wrong length) takes
/// no parameter slot: with it, 8 calls recorded before one submission are still each right.
#[test]
fn a_refused_call_takes_no_parameter_slot() {
    let Some(gpu) = gpu() else { return };
    let (classes, spec, mut loss) = slot_test_loss(gpu);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    let mut made = record_micro_batches(gpu, &mut loss, &mut encoder, classes, &[3, 5, 1, 6], 21);
    let p = Problem::random(2100, 4, classes, 5.0, 0.0);
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
    let labels = buffer_with(gpu, 0, bytemuck::cast_slice(&p.labels));
    let grad = buffer_with(gpu, 0, &vec![SENTINEL; 4 * classes * 4]);
    let refused = loss.record_gradient(
        &mut encoder,
        DeviceLogits::new(&logits, 0, 4, classes),
        DeviceTargets::class_indices(&labels, 0, IndexType::I64),
        xent::GradientOutput::Buffer {
            buffer: &grad,
            offset: 0,
        },
        xent::Upstream::PerRow(&[1.0; 3]),
    );
    assert!(matches!(refused, Err(XentError::UpstreamLength { .. })));
    made.extend(record_micro_batches(
        gpu,
        &mut loss,
        &mut encoder,
        classes,
        &[2, 4, 6, 1],
        22,
    ));
    gpu.queue().submit([encoder.finish()]);
    loss.read().unwrap();
    assert_micro_batches(gpu, &spec, classes, &made, 0, 0.0);
}

/// Reading before the encoder holding the last call is submitted is an error, not the
/// outputs of the call before it; after the submission the read gives that call's.
#[test]
fn a_read_before_the_submission_is_refused() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes) = (6, 11);
    let spec = CrossEntropy::new();
    let p = Problem::random(80, rows, classes, 5.0, 0.0);
    let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&p.logits));
    let labels = buffer_with(gpu, 0, bytemuck::cast_slice(&p.labels));
    let view = DeviceLogits::new(&logits, 0, rows, classes);
    let targets = DeviceTargets::class_indices(&labels, 0, IndexType::I64);
    let mut loss = gpu
        .prepare(
            &spec,
            LossShape::class_indices(rows, classes, IndexType::I64),
        )
        .unwrap();
    loss.run(view, targets).unwrap();
    let first = loss.read().unwrap();
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    loss.record(&mut encoder, view, targets).unwrap();
    assert!(matches!(loss.read(), Err(XentError::NotSubmitted)));
    gpu.queue().submit([encoder.finish()]);
    assert_eq!(loss.read().unwrap(), first);
}
