//! Past one device (issue 13): vocabulary-shard partials and their merge.
//! - The f64 partials of every shard layout (one class, uneven splits, targets on every shard),
//!   merged, equal the unsharded f64 reference to rounding: class indices with ignored rows,
//!   weights, smoothing, z-loss and soft-capping; probabilities with smoothing (H and KL);
//!   −inf masks covering a whole shard of a row.
//! - The GPU's partials, merged, match the f64 reference within the f32 tolerance.
//! - A sharded scorer over two contexts, by vocabulary and by rows, matches one context and
//!   repeats itself bit for bit.

mod common;

use common::{Problem, assert_gradient, assert_outputs_match, fresh_gpu, gpu, max_abs_per_row};
use xent::shard::{MergeTargets, RowPartial, VocabShard, cpu_partials, merge_partials, merge_rows};
use xent::{
    CrossEntropy, Dtype, GpuContext, Logits, LossOutput, Reduction, ShardMode, ShardedScorer,
    Targets, Upstream, XentError, cpu,
};

/// The columns `range` of a row-major `[rows, classes]` matrix.
fn columns(v: &[f32], classes: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    v.chunks(classes)
        .flat_map(|r| r[range.clone()].iter().copied())
        .collect()
}

fn specs(classes: usize) -> Vec<CrossEntropy> {
    let weights: Vec<f32> = (0..classes).map(|k| 0.25 + (k % 7) as f32 * 0.5).collect();
    vec![
        CrossEntropy::new(),
        CrossEntropy::new()
            .with_ignore_index(-100)
            .with_label_smoothing(0.1)
            .with_weights(weights.clone())
            .with_reduction(Reduction::Mean),
        CrossEntropy::new()
            .with_z_loss(1e-3)
            .with_softcap(5.0)
            .with_reduction(Reduction::Sum),
        CrossEntropy::new()
            .with_weights(weights)
            .with_reduction(Reduction::None),
    ]
}

/// Runs `check` on every spec of [`specs`] with its problem, for class indices and (where the
/// spec has no ignore index) probabilities.
fn each_case(
    rows: usize,
    classes: usize,
    masked: std::ops::Range<usize>,
    mut check: impl FnMut(&CrossEntropy, &Problem, bool),
) {
    for spec in specs(classes) {
        let p = problem(rows, classes, masked.clone(), &spec);
        for soft in [false, true] {
            if !(soft && spec.ignore_index().is_some()) {
                check(&spec, &p, soft);
            }
        }
    }
}

/// A problem with −inf over the whole of shard 1's columns in row 0, targets spread over every
/// class (so every shard owns some), and some rows ignored under a spec with an ignore index.
fn problem(
    rows: usize,
    classes: usize,
    masked: std::ops::Range<usize>,
    spec: &CrossEntropy,
) -> Problem {
    let mut p = Problem::random(5, rows, classes, 4.0, 0.5);
    for k in masked {
        p.logits[k] = f32::NEG_INFINITY;
    }
    for (i, y) in p.labels.iter_mut().enumerate() {
        *y = if i % 9 == 4 && spec.ignore_index().is_some() {
            -100
        } else {
            ((i * 7) % classes) as i64
        };
    }
    // Row 0's target must not be a masked class (an infinite loss, also right, but not useful).
    p.labels[0] = 0;
    p
}

/// A shard's partials: the GPU's or the f64 reference's.
type Partial =
    dyn Fn(&CrossEntropy, Logits<'_>, Targets<'_>, VocabShard) -> xent::Result<Vec<RowPartial>>;

/// Scores `p` shard by shard with `partial` and merges.
fn sharded(
    spec: &CrossEntropy,
    p: &Problem,
    soft: bool,
    k: usize,
    partial: &Partial,
) -> LossOutput {
    let parts: Vec<Vec<RowPartial>> = VocabShard::split(p.classes, k)
        .into_iter()
        .map(|(shard, range)| {
            let z = columns(&p.logits, p.classes, range.clone());
            let q = columns(&p.probabilities, p.classes, range.clone());
            let logits = Logits::new(&z, p.rows, range.len()).unwrap();
            let targets = if soft {
                Targets::probabilities(&q)
            } else {
                Targets::ClassIndices(&p.labels)
            };
            partial(spec, logits, targets, shard).unwrap()
        })
        .collect();
    let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
    let targets = if soft {
        MergeTargets::Probabilities
    } else {
        MergeTargets::ClassIndices(&p.labels)
    };
    merge_partials(spec, p.classes, &views, targets).unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol
}

#[test]
fn f64_partials_merge_to_the_unsharded_reference() {
    for classes in [1usize, 2, 7, 64] {
        let rows = 23;
        for k in [1, 2, 3, 5, classes] {
            let shards = VocabShard::split(classes, k);
            // Mask the whole of the second shard (or the only one) in row 0.
            let masked = shards.get(1).map_or(0..0, |s| s.1.clone());
            each_case(rows, classes, masked.clone(), |spec, p, soft| {
                let label = format!("C={classes} k={k} soft={soft} {spec:?}");
                let want = cpu::cross_entropy(spec, p.logits(), p.targets(soft)).unwrap();
                let got = sharded(spec, p, soft, k, &|s, z, t, sh| cpu_partials(s, z, t, sh));
                assert_eq!(got.ignored_rows, want.ignored_rows, "{label}");
                let rel = 1e-12;
                for i in 0..rows {
                    let scale = 1.0 + want.per_row[i].abs() + want.log_sum_exp[i].abs();
                    assert!(
                        close(got.per_row[i], want.per_row[i], rel * scale),
                        "{label}: row {i} loss {} vs {}",
                        got.per_row[i],
                        want.per_row[i]
                    );
                    assert!(close(got.log_sum_exp[i], want.log_sum_exp[i], rel * scale));
                }
                assert!(close(got.mean_denominator, want.mean_denominator, 1e-12));
                match (got.loss, want.loss) {
                    (Some(g), Some(w)) => {
                        assert!(close(g, w, rel * (1.0 + w.abs())), "{label}")
                    }
                    (g, w) => assert_eq!(g.is_some(), w.is_some()),
                }
                match (&got.entropy, &want.entropy) {
                    (Some(g), Some(w)) => {
                        for (a, b) in g.iter().zip(w) {
                            assert!(close(*a, *b, rel * (1.0 + b.abs())), "{label}: entropy");
                        }
                    }
                    (g, w) => assert_eq!(g.is_some(), w.is_some(), "{label}: entropy"),
                }
            });
        }
    }
}

#[test]
fn gpu_partials_merge_within_the_f32_tolerance() {
    let Some(gpu) = gpu() else { return };
    for (classes, k) in [(1usize, 1usize), (5, 5), (300, 3), (4099, 4)] {
        let rows = 37;
        let shards = VocabShard::split(classes, k);
        let masked = shards.get(1).map_or(0..0, |s| s.1.clone());
        each_case(rows, classes, masked.clone(), |spec, p, soft| {
            let label = format!("C={classes} k={k} soft={soft} {spec:?}");
            let want = cpu::cross_entropy(spec, p.logits(), p.targets(soft)).unwrap();
            let got = sharded(spec, p, soft, k, &|s, z, t, sh| gpu.partials(s, z, t, sh));
            assert_outputs_match(
                &label,
                &got,
                &want,
                &max_abs_per_row(&p.logits, classes),
                &p.mass(spec, soft),
            );
        });
    }
}

#[test]
fn partial_errors() {
    let Some(gpu) = gpu() else { return };
    let z = [0.5_f32; 12];
    let logits = Logits::new(&z, 3, 4).unwrap();
    let spec = CrossEntropy::new();
    // Class 9 is within a vocabulary of 10 (another shard's), class 10 is not.
    let ok = gpu.partials(
        &spec,
        logits,
        Targets::ClassIndices(&[0, 9, 5]),
        VocabShard::new(4, 10),
    );
    assert_eq!(ok.unwrap().len(), 3);
    for partial in [
        gpu.partials(
            &spec,
            logits,
            Targets::ClassIndices(&[0, 10, 5]),
            VocabShard::new(4, 10),
        ),
        cpu_partials(
            &spec,
            logits,
            Targets::ClassIndices(&[0, 10, 5]),
            VocabShard::new(4, 10),
        ),
    ] {
        assert!(matches!(
            partial,
            Err(XentError::ClassIndexOutOfRange {
                row: 1,
                value: 10,
                classes: 10,
                ..
            })
        ));
    }
    assert!(matches!(
        gpu.partials(
            &spec,
            logits,
            Targets::ClassIndices(&[0, 1, 2]),
            VocabShard::new(7, 10)
        ),
        Err(XentError::Shard(_))
    ));
    let one = [RowPartial::EMPTY];
    assert!(matches!(
        merge_partials(&spec, 4, &[&one, &[]], MergeTargets::Probabilities),
        Err(XentError::Shard(_))
    ));
}

fn two_contexts() -> Option<Vec<GpuContext>> {
    Some(vec![fresh_gpu()?, fresh_gpu()?])
}

#[test]
fn sharded_scorer_over_two_contexts_matches_one() {
    let Some(contexts) = two_contexts() else {
        return;
    };
    let single = &contexts[0];
    for (rows, classes) in [(1usize, 3usize), (50, 1000), (9, 4099)] {
        each_case(rows, classes, 0..0, |spec, p, soft| {
            let want = cpu::cross_entropy(spec, p.logits(), p.targets(soft)).unwrap();
            let one = single
                .cross_entropy(spec, p.logits(), p.targets(soft))
                .unwrap();
            for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
                let label = format!("{rows}x{classes} {mode:?} soft={soft} {spec:?}");
                let scorer = ShardedScorer::new(&contexts, mode);
                let got = scorer
                    .cross_entropy(spec, p.logits(), p.targets(soft))
                    .unwrap();
                let max = max_abs_per_row(&p.logits, classes);
                assert_outputs_match(&label, &got, &want, &max, &p.mass(spec, soft));
                if mode == ShardMode::Rows && classes % 4 == 0 {
                    // Rows that keep their 16-byte alignment score exactly as one context
                    // scores them.
                    assert_eq!(got.per_row, one.per_row, "{label}");
                }
                let again = scorer
                    .cross_entropy(spec, p.logits(), p.targets(soft))
                    .unwrap();
                assert_eq!(format!("{again:?}"), format!("{got:?}"), "{label}: rerun");
            }
        });
    }
    // A bad class index names its row in the whole batch, in either mode.
    let p = problem(40, 10, 0..0, &CrossEntropy::new());
    let mut y = p.labels.clone();
    y[33] = 10;
    for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
        let scorer = ShardedScorer::new(&contexts, mode);
        assert!(matches!(
            scorer.cross_entropy(&CrossEntropy::new(), p.logits(), Targets::ClassIndices(&y)),
            Err(XentError::ClassIndexOutOfRange { row: 33, .. })
        ));
    }
}

/// The upstream gradient for a spec's reduction, and each row's gradient scale under it.
fn upstream_for(
    spec: &CrossEntropy,
    rows: usize,
    denominator: f64,
) -> (Vec<f64>, Box<dyn Fn(usize) -> f64>) {
    let g: Vec<f64> = (0..rows).map(|i| 0.5 + (i % 5) as f64 * 0.25).collect();
    let scale: Box<dyn Fn(usize) -> f64> = match spec.reduction() {
        Reduction::None => {
            let g = g.clone();
            Box::new(move |i| g[i])
        }
        Reduction::Sum => Box::new(|_| 1.5),
        Reduction::Mean => Box::new(move |_| 1.5 / denominator),
    };
    (g, scale)
}

fn upstream<'a>(spec: &CrossEntropy, g: &'a [f64]) -> Upstream<'a> {
    match spec.reduction() {
        Reduction::None => Upstream::PerRow(g),
        _ => Upstream::Scalar(1.5),
    }
}

#[test]
fn shard_gradients_are_the_columns_of_the_whole_gradient() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes, k) in [(13usize, 7usize, 3usize), (21, 1000, 4), (5, 4099, 2)] {
        let shards = VocabShard::split(classes, k);
        let masked = shards[1].1.clone();
        each_case(rows, classes, masked.clone(), |spec, p, soft| {
            let label = format!("C={classes} k={k} soft={soft} {spec:?}");
            let want_out = cpu::cross_entropy(spec, p.logits(), p.targets(soft)).unwrap();
            let (g, scale) = upstream_for(spec, rows, want_out.mean_denominator);
            let up = upstream(spec, &g);
            let (_, want) = cpu::cross_entropy_grad(spec, p.logits(), p.targets(soft), up).unwrap();
            // The partials of every shard, merged, then each shard's columns.
            let blocks: Vec<(Vec<f32>, Vec<f32>)> = shards
                .iter()
                .map(|(_, r)| {
                    (
                        columns(&p.logits, classes, r.clone()),
                        columns(&p.probabilities, classes, r.clone()),
                    )
                })
                .collect();
            let targets = |q: &[f32]| -> Vec<f32> { q.to_vec() };
            let parts: Vec<Vec<RowPartial>> = shards
                .iter()
                .zip(&blocks)
                .map(|((shard, r), (z, q))| {
                    let z = Logits::new(z, rows, r.len()).unwrap();
                    let q = targets(q);
                    let t = if soft {
                        Targets::probabilities(&q)
                    } else {
                        Targets::ClassIndices(&p.labels)
                    };
                    gpu.partials(spec, z, t, *shard).unwrap()
                })
                .collect();
            let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
            let merged = merge_rows(&views).unwrap();
            let max = max_abs_per_row(&p.logits, classes);
            let mass = p.mass(spec, soft);
            for ((shard, r), (z, q)) in shards.iter().zip(&blocks) {
                let z = Logits::new(z, rows, r.len()).unwrap();
                let t = if soft {
                    Targets::probabilities(q)
                } else {
                    Targets::ClassIndices(&p.labels)
                };
                let got = gpu
                    .partial_gradient(spec, z, t, *shard, &merged, up)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                let want_cols: Vec<f64> = want
                    .chunks(classes)
                    .flat_map(|row| row[r.clone()].iter().copied())
                    .collect();
                assert_gradient(
                    &format!("{label} shard {r:?}"),
                    &got.to_f32(),
                    &want_cols,
                    r.len(),
                    &*scale,
                    &mass,
                    &max,
                    Dtype::F32,
                );
            }
        });
    }
}

#[test]
fn sharded_gradients_over_two_contexts() {
    let Some(contexts) = two_contexts() else {
        return;
    };
    for (rows, classes) in [(30usize, 1000usize), (7, 4099)] {
        each_case(rows, classes, 0..0, |spec, p, soft| {
            let want_out = cpu::cross_entropy(spec, p.logits(), p.targets(soft)).unwrap();
            let (g, scale) = upstream_for(spec, rows, want_out.mean_denominator);
            let up = upstream(spec, &g);
            let (_, want) = cpu::cross_entropy_grad(spec, p.logits(), p.targets(soft), up).unwrap();
            for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
                let label = format!("{rows}x{classes} {mode:?} soft={soft} {spec:?}");
                let scorer = ShardedScorer::new(&contexts, mode);
                let (out, grad) = scorer
                    .cross_entropy_grad(spec, p.logits(), p.targets(soft), up)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                let max = max_abs_per_row(&p.logits, classes);
                let mass = p.mass(spec, soft);
                assert_outputs_match(&label, &out, &want_out, &max, &mass);
                assert_gradient(
                    &label,
                    &grad.to_f32(),
                    &want,
                    classes,
                    &*scale,
                    &mass,
                    &max,
                    Dtype::F32,
                );
            }
        });
    }
}

/// One context per backend of the same machine, as Mesa gives them on Linux (lavapipe's Vulkan
/// and llvmpipe's GL): a batch sharded over both, by vocabulary and by rows. It runs where
/// the Vulkan backend is chosen (CI's Vulkan leg, or no WGPU_BACKEND), where no other test of
/// the binary uses GL: a GL device made here beside the other tests' GL devices would make EGL
/// contexts current on two threads at once, which EGL refuses.
#[cfg(target_os = "linux")]
#[test]
fn a_vulkan_and_a_gl_context_share_one_batch() {
    if gpu().is_none() {
        return;
    }
    if std::env::var("WGPU_BACKEND").is_ok_and(|b| !b.eq_ignore_ascii_case("vulkan")) {
        eprintln!("Vulkan + GL shards: run in the Vulkan leg (WGPU_BACKEND=vulkan) only");
        return;
    }
    // Each on an instance of its own backend, whatever WGPU_BACKEND says (each context only
    // ever touches its own buffers).
    let open = |backends: wgpu::Backends| {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        descriptor.backends = backends;
        let instance = wgpu::Instance::new(descriptor);
        let adapter = pollster::block_on(instance.request_adapter(&Default::default()))
            .unwrap_or_else(|e| panic!("no {backends:?} adapter (Mesa gives both on Linux): {e}"));
        let descriptor = wgpu::DeviceDescriptor {
            required_features: adapter.features() & xent::gpu::WANTED_FEATURES,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&descriptor)).unwrap();
        GpuContext::from_device(&device, &queue, Default::default()).unwrap()
    };
    let contexts = vec![open(wgpu::Backends::VULKAN), open(wgpu::Backends::GL)];
    let backends: Vec<_> = contexts.iter().map(|c| c.adapter_info().backend).collect();
    assert_eq!(backends, [wgpu::Backend::Vulkan, wgpu::Backend::Gl]);
    let (rows, classes) = (40, 1001);
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_label_smoothing(0.05)
        .with_z_loss(1e-4);
    let p = problem(rows, classes, 0..0, &spec);
    let want = cpu::cross_entropy(&spec, p.logits(), p.targets(false)).unwrap();
    let (g, scale) = upstream_for(&spec, rows, want.mean_denominator);
    let up = upstream(&spec, &g);
    let (_, want_grad) = cpu::cross_entropy_grad(&spec, p.logits(), p.targets(false), up).unwrap();
    let max = max_abs_per_row(&p.logits, classes);
    let mass = p.mass(&spec, false);
    for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
        let scorer = ShardedScorer::new(&contexts, mode);
        let label = format!("Vulkan + GL, {mode:?}");
        let (out, grad) = scorer
            .cross_entropy_grad(&spec, p.logits(), p.targets(false), up)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_outputs_match(&label, &out, &want, &max, &mass);
        assert_gradient(
            &label,
            &grad.to_f32(),
            &want_grad,
            classes,
            &*scale,
            &mass,
            &max,
            Dtype::F32,
        );
    }
}

#[test]
fn partials_on_device_buffers_match_the_host_path() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, total, offset) = (30usize, 700usize, 2000usize, 600usize);
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_label_smoothing(0.1)
        .with_weights((0..total).map(|k| 1.0 + (k % 3) as f32).collect::<Vec<_>>());
    let p = problem(rows, total, 0..0, &spec);
    let block = columns(&p.logits, total, offset..offset + classes);
    let shard = VocabShard::new(offset, total);
    let z = Logits::new(&block, rows, classes).unwrap();
    let host = gpu
        .partials(&spec, z, Targets::ClassIndices(&p.labels), shard)
        .unwrap();
    let logits = common::buffer_with(gpu, 16, bytemuck::cast_slice(&block));
    let labels = common::buffer_with(gpu, 0, bytemuck::cast_slice(&p.labels));
    let shape = xent::LossShape::class_indices(rows, classes, xent::IndexType::I64);
    let mut loss = gpu.prepare_partials(&spec, shape, shard).unwrap();
    let view = xent::DeviceLogits::new(&logits, 16, rows, classes);
    let targets = xent::DeviceTargets::class_indices(&labels, 0, xent::IndexType::I64);
    loss.run(view, targets).unwrap();
    assert_eq!(loss.read_partials().unwrap(), host);
    // A shard's calls have no totals of their own.
    for refused in [loss.read_totals().err(), loss.read().err()] {
        assert!(
            matches!(&refused, Some(XentError::NotPrepared(why)) if why.contains("read_partials")),
            "{refused:?}"
        );
    }
    let mut plain = gpu.prepare(&CrossEntropy::new(), shape).unwrap();
    plain.run(view, targets).unwrap();
    assert!(matches!(
        plain.read_partials(),
        Err(XentError::NotPrepared(_))
    ));
    assert!(matches!(
        gpu.prepare_partials(&spec, shape, VocabShard::new(1500, total)),
        Err(XentError::Shard(_))
    ));
}

#[test]
fn sharded_scorer_edges_no_rows_and_more_contexts_than_classes() {
    let Some(a) = fresh_gpu() else { return };
    let Some(b) = fresh_gpu() else { return };
    let Some(c) = fresh_gpu() else { return };
    let contexts = [a, b, c];
    let spec = CrossEntropy::new().with_reduction(Reduction::Sum);
    for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
        let scorer = ShardedScorer::new(&contexts, mode);
        // No rows: sum 0, nothing per row, an empty gradient.
        let none = Logits::new::<f32>(&[], 0, 5).unwrap();
        let (out, grad) = scorer
            .cross_entropy_grad(
                &spec,
                none,
                Targets::ClassIndices(&[]),
                Upstream::Scalar(1.0),
            )
            .unwrap();
        assert_eq!((out.rows, out.sum, grad.len()), (0, 0.0, 0), "{mode:?}");
        // Two classes over three contexts (one shard each, the third idle), one row over three.
        let z = [0.5_f32, -1.0, 2.0, 0.25];
        let logits = Logits::new(&z, 2, 2).unwrap();
        let y = [1_i64, 0];
        let want = cpu::cross_entropy(&spec, logits, Targets::ClassIndices(&y)).unwrap();
        let (out, _) = scorer
            .cross_entropy_grad(
                &spec,
                logits,
                Targets::ClassIndices(&y),
                Upstream::Scalar(1.0),
            )
            .unwrap();
        assert!(
            (out.sum - want.sum).abs() < 1e-5,
            "{mode:?}: {} vs {}",
            out.sum,
            want.sum
        );
        let one = Logits::new(&z[..2], 1, 2).unwrap();
        let got = scorer
            .cross_entropy(&spec, one, Targets::ClassIndices(&y[..1]))
            .unwrap();
        assert_eq!(got.rows, 1, "{mode:?}");
    }
    assert!(matches!(
        ShardedScorer::new(&[], ShardMode::Rows).cross_entropy(
            &spec,
            Logits::new(&[0.0_f32], 1, 1).unwrap(),
            Targets::ClassIndices(&[0])
        ),
        Err(XentError::Shard(_))
    ));
}

/// A class index out of range in a shard's device buffer is found on the device, as the
/// unsharded loss finds it: its row and its value (the host path checks on the host first).
#[test]
fn a_shard_on_device_buffers_names_a_bad_class_index() {
    let Some(gpu) = gpu() else { return };
    let (rows, classes, total, offset) = (30usize, 700usize, 2000usize, 600usize);
    let spec = CrossEntropy::new();
    let p = problem(rows, total, 0..0, &spec);
    let block = columns(&p.logits, total, offset..offset + classes);
    let mut y = p.labels.clone();
    y[7] = 5000;
    let logits = common::buffer_with(gpu, 16, bytemuck::cast_slice(&block));
    let labels = common::buffer_with(gpu, 0, bytemuck::cast_slice(&y));
    let shape = xent::LossShape::class_indices(rows, classes, xent::IndexType::I64);
    let mut loss = gpu
        .prepare_partials(&spec, shape, VocabShard::new(offset, total))
        .unwrap();
    let view = xent::DeviceLogits::new(&logits, 16, rows, classes);
    let targets = xent::DeviceTargets::class_indices(&labels, 0, xent::IndexType::I64);
    loss.run(view, targets).unwrap();
    match loss.read_partials() {
        Err(XentError::ClassIndexOutOfRange {
            row: 7,
            value: 5000,
            classes: 2000,
            ..
        }) => {}
        other => panic!("expected row 7's class 5000 out of range of 2000, got {other:?}"),
    }
}
