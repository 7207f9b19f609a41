//! Past one device (issue 13): vocabulary-shard partials and their merge.
//! - The f64 partials of every shard layout (one class, uneven splits, targets on every shard),
//!   merged, equal the unsharded f64 reference to rounding: class indices with ignored rows,
//!   weights, smoothing, z-loss and soft-capping; probabilities with smoothing, with and
//!   without class weights (H and KL); −inf masks covering a whole shard of a row.
//! - The GPU's partials, merged, match the f64 reference within the f32 tolerance; so do bf16
//!   and f16 logits (with f32 probabilities or probabilities of the logits' dtype) against
//!   the f64 reference on the rounded values, for the partials, the shard gradients (one
//!   rounding to the half type) and the sharded scorer.
//! - A sharded scorer over two contexts, by vocabulary and by rows, matches one context and
//!   repeats itself bit for bit.
//! - Partials on device buffers (class indices and probabilities, whose entropy term is read
//!   back; f32 and half logits) are the host path's and the f64 reference's.
//! - A shard whose end overflows, or probabilities of a third dtype, are refused as the
//!   unsharded loss refuses them.

mod common;

use common::{
    Problem, assert_gradient, assert_outputs_match, fresh_gpu, gpu, max_abs_per_row, row_tolerance,
};
use xent::shard::{MergeTargets, RowPartial, VocabShard, cpu_partials, merge_partials, merge_rows};
use xent::{
    CrossEntropy, Dtype, ElementVec, GpuContext, Logits, LossOutput, Reduction, ShardMode,
    ShardedScorer, TargetLayout, Targets, Upstream, XentError, cpu,
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
            .with_weights(weights.clone())
            .with_reduction(Reduction::None),
        // Smoothing without an ignore index, so that probabilities run with it too.
        CrossEntropy::new().with_label_smoothing(0.2),
        CrossEntropy::new()
            .with_label_smoothing(0.15)
            .with_weights(weights)
            .with_reduction(Reduction::Sum),
    ]
}

/// The specs of [`specs`] the half-precision tests run (fewer, to keep CI short): class weights
/// with smoothing and ignored rows, z-loss with soft-capping, smoothing with class weights and
/// no ignore index (probabilities).
fn half_specs(classes: usize) -> Vec<CrossEntropy> {
    let all = specs(classes);
    vec![all[1].clone(), all[2].clone(), all[5].clone()]
}

/// The element types of a case: the logits', and the probabilities' (f32 or the logits').
#[derive(Clone, Copy, Debug, PartialEq)]
struct Types {
    logits: Dtype,
    probabilities: Dtype,
}

const F32: Types = Types {
    logits: Dtype::F32,
    probabilities: Dtype::F32,
};

/// Half logits with probabilities in f32 and in the logits' dtype (`all`), or only with f32
/// probabilities for bf16 and half probabilities for f16; one of each half type for class
/// indices (which have no probabilities).
fn half_types(soft: bool, all: bool) -> Vec<Types> {
    let t = |logits, probabilities| Types {
        logits,
        probabilities,
    };
    match (soft, all) {
        (false, _) => vec![t(Dtype::Bf16, Dtype::F32), t(Dtype::F16, Dtype::F32)],
        (true, true) => vec![
            t(Dtype::Bf16, Dtype::F32),
            t(Dtype::Bf16, Dtype::Bf16),
            t(Dtype::F16, Dtype::F32),
            t(Dtype::F16, Dtype::F16),
        ],
        (true, false) => vec![t(Dtype::Bf16, Dtype::F32), t(Dtype::F16, Dtype::F16)],
    }
}

/// `values` rounded to `dtype`, to nearest even (exact for values it already holds).
fn rounded(dtype: Dtype, values: &[f32]) -> ElementVec {
    ElementVec::rounded(dtype, values.iter().map(|&v| v as f64))
}

/// `p` with its logits and probabilities rounded to `types` and widened back to f32: the
/// values the f64 reference scores (the rounding is the input, not an error).
fn rounded_problem(p: &Problem, types: Types) -> Problem {
    Problem {
        rows: p.rows,
        classes: p.classes,
        logits: rounded(types.logits, &p.logits).to_f32(),
        labels: p.labels.clone(),
        probabilities: rounded(types.probabilities, &p.probabilities).to_f32(),
    }
}

/// The half-precision cases of `specs` on a `rows` × `classes` problem whose `masked` classes
/// are −inf (see [`problem`]): class indices, and probabilities where the spec has no ignore
/// index, each in the element types [`half_types`] gives (`all` of them or not), the problem
/// rounded to them.
fn half_cases<'s>(
    specs: &[&'s CrossEntropy],
    rows: usize,
    classes: usize,
    masked: std::ops::Range<usize>,
    all: bool,
) -> Vec<(&'s CrossEntropy, bool, Types, Problem)> {
    let mut cases = Vec::new();
    for &spec in specs {
        let raw = problem(rows, classes, masked.clone(), spec);
        for soft in [false, true] {
            if soft && spec.ignore_index().is_some() {
                continue;
            }
            for types in half_types(soft, all) {
                cases.push((spec, soft, types, rounded_problem(&raw, types)));
            }
        }
    }
    cases
}

/// A problem's (or a shard's) logits and probabilities in the element types of a case.
struct Typed {
    rows: usize,
    classes: usize,
    logits: ElementVec,
    probabilities: ElementVec,
}

impl Typed {
    /// Logits and probabilities `[rows, classes]` (already of `types`, so exactly) in `types`.
    fn new(rows: usize, classes: usize, z: &[f32], p: &[f32], types: Types) -> Self {
        Self {
            rows,
            classes,
            logits: rounded(types.logits, z),
            probabilities: rounded(types.probabilities, p),
        }
    }

    /// The columns `range` of `p` (rounded to `types`).
    fn columns(p: &Problem, range: std::ops::Range<usize>, types: Types) -> Self {
        let z = columns(&p.logits, p.classes, range.clone());
        let q = columns(&p.probabilities, p.classes, range.clone());
        Self::new(p.rows, range.len(), &z, &q, types)
    }

    /// The whole of `p` (rounded to `types`).
    fn whole(p: &Problem, types: Types) -> Self {
        Self::columns(p, 0..p.classes, types)
    }

    fn logits(&self) -> Logits<'_> {
        Logits::from_elements(self.logits.as_elements(), self.rows, self.classes).unwrap()
    }

    fn targets<'a>(&'a self, labels: &'a [i64], soft: bool) -> Targets<'a> {
        if soft {
            Targets::Probabilities(self.probabilities.as_elements())
        } else {
            Targets::ClassIndices(labels)
        }
    }
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

/// Scores `p` shard by shard with `partial` and merges, the shards' values in `types` (`p`'s
/// values already of them).
fn sharded(
    spec: &CrossEntropy,
    p: &Problem,
    soft: bool,
    k: usize,
    types: Types,
    partial: &Partial,
) -> LossOutput {
    let parts: Vec<Vec<RowPartial>> = VocabShard::split(p.classes, k)
        .into_iter()
        .map(|(shard, range)| {
            let block = Typed::columns(p, range, types);
            let targets = block.targets(&p.labels, soft);
            partial(spec, block.logits(), targets, shard)
                .unwrap_or_else(|e| panic!("{types:?} shard {shard:?}: {e}"))
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
                let got = sharded(spec, p, soft, k, F32, &|s, z, t, sh| {
                    cpu_partials(s, z, t, sh)
                });
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

/// A target weight of 0 on a −inf logit: 0·(−inf) is NaN in the unsharded reference (as in
/// PyTorch), and so in the merged partials, f64 and GPU alike; a positive weight there gives
/// +inf; a class index without smoothing never touches the other classes.
#[test]
fn zero_target_weight_on_a_masked_class() {
    let (rows, classes) = (3usize, 4usize);
    let inf = f32::INFINITY;
    let z = [
        0.5, -inf, 1.0, 2.0, //
        0.5, -inf, 1.0, 2.0, //
        0.5, -1.0, 1.0, 2.0,
    ];
    let probabilities = [
        0.5, 0.0, 0.25, 0.25, // 0 on the masked class
        0.25, 0.5, 0.25, 0.0, // 0.5 on it
        0.25, 0.25, 0.25, 0.25,
    ];
    let y = [0_i64, 1, 2];
    let zero_weight = vec![1.0_f32, 0.0, 1.0, 1.0];
    // Each case's rows as the reference has them: NaN, +inf, or finite (written 1.0).
    let nan = f64::NAN;
    let cases = [
        (CrossEntropy::new(), true, [nan, f64::INFINITY, 1.0]),
        (
            CrossEntropy::new()
                .with_weights(zero_weight.clone())
                .with_label_smoothing(0.1),
            false,
            [nan, nan, 1.0],
        ),
        (
            CrossEntropy::new().with_weights(zero_weight),
            false,
            [1.0, nan, 1.0],
        ),
    ];
    let logits = Logits::new(&z, rows, classes).unwrap();
    let gpu = gpu();
    for (spec, soft, kinds) in cases {
        let p = Problem {
            rows,
            classes,
            logits: z.to_vec(),
            labels: y.to_vec(),
            probabilities: probabilities.to_vec(),
        };
        let want = cpu::cross_entropy(&spec, logits, p.targets(soft)).unwrap();
        for (i, &kind) in kinds.iter().enumerate() {
            let r = want.per_row[i];
            let ok = match kind {
                k if k.is_nan() => r.is_nan(),
                f64::INFINITY => r == f64::INFINITY,
                _ => r.is_finite(),
            };
            assert!(ok, "{spec:?} soft={soft}: reference row {i} {r}");
        }
        for k in [1, 2, 4] {
            let label = format!("k={k} soft={soft} {spec:?}");
            let f64_partials: &Partial = &|s, z, t, sh| cpu_partials(s, z, t, sh);
            let mut outs = vec![("f64", sharded(&spec, &p, soft, k, F32, f64_partials))];
            if let Some(gpu) = gpu {
                let gpu_partials: &Partial = &|s, z, t, sh| gpu.partials(s, z, t, sh);
                outs.push(("GPU", sharded(&spec, &p, soft, k, F32, gpu_partials)));
            }
            for (what, got) in outs {
                for i in 0..rows {
                    let (g, w) = (got.per_row[i], want.per_row[i]);
                    assert!(
                        close(g, w, 1e-5 * (1.0 + w.abs())),
                        "{label} {what}: row {i} loss {g} vs reference {w}"
                    );
                }
            }
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
            let got = sharded(spec, p, soft, k, F32, &|s, z, t, sh| {
                gpu.partials(s, z, t, sh)
            });
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
fn half_partials_merge_to_the_reference_on_the_rounded_values() {
    let Some(gpu) = gpu() else { return };
    for (rows, classes, k) in [(9usize, 5usize, 5usize), (11, 1001, 3)] {
        let shards = VocabShard::split(classes, k);
        let specs = half_specs(classes);
        let specs: Vec<_> = specs.iter().collect();
        for (spec, soft, types, p) in half_cases(&specs, rows, classes, shards[1].1.clone(), true) {
            let label = format!("C={classes} k={k} {types:?} soft={soft} {spec:?}");
            let whole = Typed::whole(&p, types);
            let targets = whole.targets(&p.labels, soft);
            let want = cpu::cross_entropy(spec, whole.logits(), targets).unwrap();
            let max = max_abs_per_row(&p.logits, classes);
            let mass = p.mass(spec, soft);
            let gpu_partials: &Partial = &|s, z, t, sh| gpu.partials(s, z, t, sh);
            let got = sharded(spec, &p, soft, k, types, gpu_partials);
            assert_outputs_match(&label, &got, &want, &max, &mass);
            // The f64 partials of the same half values merge to it too.
            let f64_partials: &Partial = &|s, z, t, sh| cpu_partials(s, z, t, sh);
            let got = sharded(spec, &p, soft, k, types, f64_partials);
            assert_outputs_match(&format!("{label} f64"), &got, &want, &max, &mass);
        }
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

/// The f64 reference on the whole of `p` in `types`: its output and its gradient under the
/// spec's upstream, with each row's gradient scale.
#[allow(clippy::type_complexity)]
fn reference_grad(
    spec: &CrossEntropy,
    p: &Problem,
    soft: bool,
    types: Types,
) -> (LossOutput, Vec<f64>, Vec<f64>, Box<dyn Fn(usize) -> f64>) {
    let whole = Typed::whole(p, types);
    let targets = whole.targets(&p.labels, soft);
    let out = cpu::cross_entropy(spec, whole.logits(), targets).unwrap();
    let (g, scale) = upstream_for(spec, p.rows, out.mean_denominator);
    let (_, grad) =
        cpu::cross_entropy_grad(spec, whole.logits(), targets, upstream(spec, &g)).unwrap();
    (out, grad, g, scale)
}

/// Every shard's gradient from the GPU's partials of every shard, merged, against its columns
/// of the f64 reference's whole gradient: of the logits' dtype, within the f32 tolerance plus
/// one unit in the last place of a half type. `p`'s values are already of `types`.
fn check_shard_gradients(
    gpu: &GpuContext,
    spec: &CrossEntropy,
    p: &Problem,
    soft: bool,
    shards: &[(VocabShard, std::ops::Range<usize>)],
    types: Types,
    label: &str,
) {
    let (rows, classes) = (p.rows, p.classes);
    let (_, want, g, scale) = reference_grad(spec, p, soft, types);
    let up = upstream(spec, &g);
    let blocks: Vec<Typed> = shards
        .iter()
        .map(|(_, r)| Typed::columns(p, r.clone(), types))
        .collect();
    let parts: Vec<Vec<RowPartial>> = shards
        .iter()
        .zip(&blocks)
        .map(|((shard, _), block)| {
            let t = block.targets(&p.labels, soft);
            gpu.partials(spec, block.logits(), t, *shard)
                .unwrap_or_else(|e| panic!("{label}: {e}"))
        })
        .collect();
    let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
    let merged = merge_rows(&views).unwrap();
    let max = max_abs_per_row(&p.logits, classes);
    let mass = p.mass(spec, soft);
    for ((shard, r), block) in shards.iter().zip(&blocks) {
        let t = block.targets(&p.labels, soft);
        let got = gpu
            .partial_gradient(spec, block.logits(), t, *shard, &merged, up)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(got.dtype(), types.logits, "{label}: gradient dtype");
        assert_eq!(got.len(), rows * r.len(), "{label}: gradient length");
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
            types.logits,
        );
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
            check_shard_gradients(gpu, spec, p, soft, &shards, F32, &label);
        });
    }
}

#[test]
fn half_shard_gradients_are_the_columns_of_the_whole_gradient() {
    let Some(gpu) = gpu() else { return };
    // Odd C: shards that start and end inside a 4-byte word of halves.
    let (rows, classes, k) = (9usize, 1001usize, 3usize);
    let shards = VocabShard::split(classes, k);
    let specs = half_specs(classes);
    let specs: Vec<_> = specs.iter().collect();
    for (spec, soft, types, p) in half_cases(&specs, rows, classes, shards[1].1.clone(), false) {
        let label = format!("C={classes} k={k} {types:?} soft={soft} {spec:?}");
        check_shard_gradients(gpu, spec, &p, soft, &shards, types, &label);
    }
}

/// A sharded scorer's loss and gradient, by vocabulary and by rows, against the f64 reference
/// on the whole of `p` (its values already of `types`).
fn check_scorer_gradients(
    contexts: &[GpuContext],
    spec: &CrossEntropy,
    p: &Problem,
    soft: bool,
    types: Types,
    label: &str,
) {
    let (want_out, want, g, scale) = reference_grad(spec, p, soft, types);
    let up = upstream(spec, &g);
    let whole = Typed::whole(p, types);
    let max = max_abs_per_row(&p.logits, p.classes);
    let mass = p.mass(spec, soft);
    for mode in [ShardMode::Vocabulary, ShardMode::Rows] {
        let label = format!("{label} {mode:?}");
        let scorer = ShardedScorer::new(contexts, mode);
        let (out, grad) = scorer
            .cross_entropy_grad(spec, whole.logits(), whole.targets(&p.labels, soft), up)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_outputs_match(&label, &out, &want_out, &max, &mass);
        assert_eq!(grad.dtype(), types.logits, "{label}: gradient dtype");
        assert_gradient(
            &label,
            &grad.to_f32(),
            &want,
            p.classes,
            &*scale,
            &mass,
            &max,
            types.logits,
        );
    }
}

#[test]
fn sharded_gradients_over_two_contexts() {
    let Some(contexts) = two_contexts() else {
        return;
    };
    for (rows, classes) in [(30usize, 1000usize), (7, 4099)] {
        each_case(rows, classes, 0..0, |spec, p, soft| {
            let label = format!("{rows}x{classes} soft={soft} {spec:?}");
            check_scorer_gradients(&contexts, spec, p, soft, F32, &label);
        });
    }
}

#[test]
fn half_logits_over_two_contexts() {
    let Some(contexts) = two_contexts() else {
        return;
    };
    // Odd C: the vocabulary's two shards split a 4-byte word of halves. Two specs only (two
    // fresh contexts compile every variant again): weights, smoothing and ignored rows for
    // class indices, weights and smoothing for probabilities.
    let (rows, classes) = (7usize, 1001usize);
    let specs = half_specs(classes);
    for (spec, soft, types, p) in half_cases(&[&specs[0], &specs[2]], rows, classes, 0..0, false) {
        let label = format!("{rows}x{classes} {types:?} soft={soft} {spec:?}");
        check_scorer_gradients(&contexts, spec, &p, soft, types, &label);
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
        // NVIDIA's GL under wgpu (3.3 there, 2026-11-28 on an H200) refuses a device with
        // these limits (Device(Lost)): this test needs Mesa's GL, which CI has.
        let name = adapter.get_info().name;
        let (device, queue) = match pollster::block_on(adapter.request_device(&descriptor)) {
            Ok(opened) => opened,
            Err(e) if backends == wgpu::Backends::GL && !name.contains("llvmpipe") => {
                eprintln!("Vulkan + GL shards: {name} gives no GL device ({e}); Mesa's does");
                return None;
            }
            Err(e) => panic!("{name}: {e}"),
        };
        Some(GpuContext::from_device(&device, &queue, Default::default()).unwrap())
    };
    let Some(contexts) = [wgpu::Backends::VULKAN, wgpu::Backends::GL]
        .into_iter()
        .map(open)
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
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
    // The shard's own statistics are not the whole row's: its gradient comes from
    // partial_gradient with the merged ones, never from this loss alone.
    let grad = common::buffer_with(gpu, 0, &vec![0u8; rows * classes * 4]);
    for out in [
        xent::GradientOutput::Buffer {
            buffer: &grad,
            offset: 0,
        },
        xent::GradientOutput::InPlace,
    ] {
        assert!(matches!(
            loss.run_gradient(view, targets, out, xent::Upstream::Scalar(1.0)),
            Err(XentError::NotPrepared(_))
        ));
    }
    // Top-k entries are not split by vocabulary.
    let top_k = xent::LossShape::new(rows, classes, xent::TargetLayout::TopK { k: 4 });
    assert!(matches!(
        gpu.prepare_partials(&spec, top_k, VocabShard::new(offset, total)),
        Err(XentError::NotPrepared(_))
    ));
}

/// Asserts a shard's GPU partials against the f64 reference's, field by field, within the f32
/// tolerance: s, b and h are sums of terms of one sign (so relative), and a's terms are off by
/// a few ulps of the row's largest |z| times their weight.
fn assert_partials(label: &str, got: &[RowPartial], want: &[RowPartial], max_abs: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let fields = [
            ("m", g.m, w.m, row_tolerance(w.m, max_abs[i], 0.0)),
            ("s", g.s, w.s, row_tolerance(w.s, max_abs[i], 0.0)),
            ("a", g.a, w.a, row_tolerance(w.a, max_abs[i], w.b)),
            ("b", g.b, w.b, 1e-5 * w.b.abs()),
            ("h", g.h, w.h, 1e-5 * w.h.abs() + 1e-5),
        ];
        for (name, g, w, tol) in fields {
            assert!(
                common::close(g, w, tol),
                "{label}: row {i} {name} {g} vs reference {w} (tolerance {tol:e})"
            );
        }
    }
}

/// Probability targets (whose entropy term h comes back with the partials) and bf16 and f16
/// logits (`LossShape::with_dtype`) on device buffers: the partials are the host path's, bit
/// for bit, and the f64 reference's within the f32 tolerance.
#[test]
fn probabilities_and_half_logits_on_device_buffers() {
    let Some(gpu) = gpu() else { return };
    // An odd offset and width: half rows that start and end inside a 4-byte word.
    let (rows, classes, total, offset) = (12usize, 301usize, 1000usize, 401usize);
    let weights: Vec<f32> = (0..total).map(|k| 1.0 + (k % 3) as f32).collect();
    // h is the targets' entropy without class weights (0 with them, as the outputs report
    // none then).
    let smoothed = CrossEntropy::new().with_label_smoothing(0.1);
    let weighted = smoothed.clone().with_weights(weights);
    let shard = VocabShard::new(offset, total);
    let mut cases = vec![(F32, false), (F32, true)];
    for soft in [false, true] {
        cases.extend(half_types(soft, true).into_iter().map(|t| (t, soft)));
    }
    for spec in [&smoothed, &weighted] {
        let raw = problem(rows, total, 0..0, spec);
        for &(types, soft) in &cases {
            if !soft && spec == &smoothed {
                continue;
            }
            let label = format!("{types:?} soft={soft} {spec:?}")
                .chars()
                .take(200)
                .collect::<String>();
            let p = rounded_problem(&raw, types);
            let block = Typed::columns(&p, offset..offset + classes, types);
            let targets = block.targets(&p.labels, soft);
            let want = cpu_partials(spec, block.logits(), targets, shard).unwrap();
            let host = gpu
                .partials(spec, block.logits(), targets, shard)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let layout = if soft {
                TargetLayout::Probabilities(types.probabilities)
            } else {
                TargetLayout::ClassIndices(xent::IndexType::I64)
            };
            let target_bytes = if soft {
                block.probabilities.bytes()
            } else {
                bytemuck::cast_slice(&p.labels)
            };
            let logits = common::buffer_with(gpu, 16, block.logits.bytes());
            let target_buffer = common::buffer_with(gpu, 0, target_bytes);
            let shape = xent::LossShape::new(rows, classes, layout).with_dtype(types.logits);
            let mut loss = gpu
                .prepare_partials(spec, shape, shard)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let view = xent::DeviceLogits::new(&logits, 16, rows, classes).with_dtype(types.logits);
            let device_targets = xent::DeviceTargets::of_layout(&target_buffer, 0, layout);
            loss.run(view, device_targets)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = loss.read_partials().unwrap();
            assert_eq!(got, host, "{label}: device buffers vs the host path");
            let max = max_abs_per_row(&block.logits.to_f32(), classes);
            assert_partials(&label, &got, &want, &max);
            if soft && spec.weights().is_none() {
                // The entropy term came back (every smoothed probability is > 0).
                assert!(got.iter().all(|r| r.h > 0.0), "{label}: h {got:?}");
            }
        }
    }
}

/// A shard whose last class would lie past `usize::MAX` is refused, not wrapped round (which
/// indexed the class weights out of bounds, or dropped the target's term).
#[test]
fn a_shard_whose_end_overflows_is_refused() {
    let z = [0.5_f32; 12];
    let logits = Logits::new(&z, 3, 4).unwrap();
    let y = [0_i64, 9, 5];
    let plain = CrossEntropy::new();
    let weighted = CrossEntropy::new().with_weights(vec![1.0_f32; 10]);
    let cases = [
        (VocabShard::new(usize::MAX, 10), [&plain, &weighted]),
        (VocabShard::new(usize::MAX - 1, 10), [&plain, &weighted]),
        (
            VocabShard::new(usize::MAX - 2, usize::MAX),
            [&plain, &plain],
        ),
    ];
    let refused = |e: Option<&XentError>| matches!(e, Some(XentError::Shard(why)) if why.contains("do not fit a vocabulary"));
    for (shard, specs) in cases {
        assert!(refused(shard.check(4).as_ref().err()), "{shard:?}");
        assert_eq!(
            shard.range(4).end,
            usize::MAX,
            "{shard:?}: a saturated range"
        );
        for spec in specs {
            let r = cpu_partials(spec, logits, Targets::ClassIndices(&y), shard);
            assert!(refused(r.as_ref().err()), "{shard:?} {spec:?}: {r:?}");
        }
    }
    // The last classes of the largest vocabulary fit.
    assert!(VocabShard::new(usize::MAX - 4, usize::MAX).check(4).is_ok());
    let Some(gpu) = gpu() else { return };
    let merged = [RowPartial::EMPTY; 3];
    for (shard, specs) in cases {
        for spec in specs {
            let t = Targets::ClassIndices(&y);
            let label = format!("{shard:?} {spec:?}");
            let r = gpu.partials(spec, logits, t, shard);
            assert!(refused(r.as_ref().err()), "{label}: {r:?}");
            let up = Upstream::Scalar(1.0);
            let r = gpu.partial_gradient(spec, logits, t, shard, &merged, up);
            assert!(refused(r.as_ref().err()), "{label}: {r:?}");
            let shape = xent::LossShape::class_indices(3, 4, xent::IndexType::I64);
            let r = gpu.prepare_partials(spec, shape, shard).map(|_| ());
            assert!(refused(r.as_ref().err()), "{label}: {r:?}");
        }
    }
}

/// Probabilities are f32 or of the logits' dtype on a shard as on the whole vocabulary: the
/// same error as the unsharded loss, from the f64 reference, the GPU and a prepared shard.
#[test]
fn shard_probabilities_are_f32_or_the_logits_dtype() {
    let (rows, classes) = (3usize, 4usize);
    let shard = VocabShard::new(2, 10);
    let spec = CrossEntropy::new().with_label_smoothing(0.1);
    let z = [0.5_f32, -1.0, 2.0, 0.25].repeat(rows);
    let q = [0.25_f32; 12];
    let check = |logits_dtype: Dtype, targets_dtype: Dtype, gpu: Option<&GpuContext>| {
        let label = format!("{logits_dtype} logits, {targets_dtype} probabilities");
        let (zv, qv) = (rounded(logits_dtype, &z), rounded(targets_dtype, &q));
        let logits = Logits::from_elements(zv.as_elements(), rows, classes).unwrap();
        let t = Targets::Probabilities(qv.as_elements());
        let ok = targets_dtype == Dtype::F32 || targets_dtype == logits_dtype;
        let refused = |e: Option<&XentError>| {
            matches!(e, Some(XentError::TargetsDtype { logits, targets })
                if *logits == logits_dtype && *targets == targets_dtype)
        };
        // The unsharded rule, which the shard's must be.
        let whole = cpu::cross_entropy(&spec, logits, t).map(|_| ());
        assert_eq!(whole.is_ok(), ok, "{label}: {whole:?}");
        assert!(ok || refused(whole.as_ref().err()), "{label}: {whole:?}");
        let r = cpu_partials(&spec, logits, t, shard);
        if ok {
            assert_eq!(r.map(|p| p.len()).ok(), Some(rows), "{label}");
        } else {
            assert!(refused(r.as_ref().err()), "{label}: f64 partials {r:?}");
        }
        let Some(gpu) = gpu else { return };
        let r = gpu.partials(&spec, logits, t, shard);
        if ok {
            assert_eq!(r.map(|p| p.len()).ok(), Some(rows), "{label}");
        } else {
            assert!(refused(r.as_ref().err()), "{label}: GPU partials {r:?}");
            let merged = [RowPartial::EMPTY; 3];
            let up = Upstream::Scalar(1.0);
            let r = gpu.partial_gradient(&spec, logits, t, shard, &merged, up);
            assert!(refused(r.as_ref().err()), "{label}: partial gradient {r:?}");
        }
        let layout = TargetLayout::Probabilities(targets_dtype);
        let shape = xent::LossShape::new(rows, classes, layout).with_dtype(logits_dtype);
        let r = gpu.prepare_partials(&spec, shape, shard).map(|_| ());
        assert!(
            if ok {
                r.is_ok()
            } else {
                refused(r.as_ref().err())
            },
            "{label}: prepared {r:?}"
        );
    };
    let all = [Dtype::F32, Dtype::Bf16, Dtype::F16];
    for logits_dtype in all {
        for targets_dtype in all {
            check(logits_dtype, targets_dtype, None);
        }
    }
    let Some(gpu) = gpu() else { return };
    for logits_dtype in all {
        for targets_dtype in all {
            check(logits_dtype, targets_dtype, Some(gpu));
        }
    }
}

/// A shard's gradient with class weights far from 1 on the target's shard: the merged B goes
/// to the device in the shard's own weight scale, applied in f64 (in f32 a scale beyond f32's
/// range made B inf). Against the whole f64 gradient.
#[test]
fn shard_gradients_with_weights_far_from_one() {
    let Some(gpu) = gpu() else { return };
    let z = [0.0_f32, 1.0, 2.0, 3.0];
    let y = [0_i64];
    for (weights, reduction) in [
        (vec![1e-30_f32, 1e-31, 1e-31, 1e-25], Reduction::Sum),
        (vec![1e-30, 1e-31, 1e-31, 1e-25], Reduction::Mean),
        // A weight scale of 2^133, beyond f32 (it was applied in f32: B came out inf).
        (vec![1e-40, 1e-45, 1e-45, 1e-30], Reduction::Mean),
        (vec![1e20, 1.0, 1.0, 1.0], Reduction::Sum),
        (vec![1e7, 1.0, 1.0, 1.0], Reduction::Mean),
    ] {
        let spec = CrossEntropy::new()
            .with_weights(weights.clone())
            .with_reduction(reduction);
        let whole = Logits::new(&z, 1, 4).unwrap();
        let up = Upstream::Scalar(1.0);
        let (_, want) =
            cpu::cross_entropy_grad(&spec, whole, Targets::ClassIndices(&y), up).unwrap();
        let shards = [VocabShard::new(0, 4), VocabShard::new(2, 4)];
        let ranges = [0..2, 2..4];
        let mut parts = Vec::new();
        for (shard, r) in shards.iter().zip(&ranges) {
            let block = Logits::new(&z[r.clone()], 1, 2).unwrap();
            let p = gpu
                .partials(&spec, block, Targets::ClassIndices(&y), *shard)
                .unwrap();
            parts.push(p);
        }
        let refs: Vec<&[RowPartial]> = parts.iter().map(|p| p.as_slice()).collect();
        let merged = merge_rows(&refs).unwrap();
        let mut got = Vec::new();
        for (shard, r) in shards.iter().zip(&ranges) {
            let block = Logits::new(&z[r.clone()], 1, 2).unwrap();
            let g = gpu
                .partial_gradient(&spec, block, Targets::ClassIndices(&y), *shard, &merged, up)
                .unwrap();
            got.extend(g.to_f32());
        }
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * w.abs() + 1e-45,
                "{weights:?} {reduction:?} class {k}: {g} vs {w} (all: {got:?} vs {want:?})"
            );
        }
    }
}
