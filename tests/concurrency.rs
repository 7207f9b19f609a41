//! Concurrent calls — host and device paths, losses, log-sum-exp, log-softmax and gradients —:
//! one context driven from eight threads, and three contexts driven at once from two threads
//! each. Every call must give exactly the bits it gives alone: the plan
//! depends only on the shape and the device, and calls share nothing but the pipelines.
//!
//! On GL this also covers xent's serialisation of device work (`GL_SERIAL`): wgpu-hal's GL
//! context lock panics after six seconds' wait, and llvmpipe holds it through a whole dispatch.

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{Inputs, assert_outputs_match, buffer_with, fresh_gpu, gpu, max_abs_per_row};
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, GpuContext, IndexType, Logits, LossOutput,
    LossShape, Reduction, Strategy, Targets, Upstream, cpu,
};

/// What a call computes.
enum Call {
    /// Cross-entropy with this spec, on probabilities when `soft`.
    Loss { spec: CrossEntropy, soft: bool },
    /// Per-row log-sum-exp.
    LogSumExp,
    /// Log-softmax.
    LogSoftmax,
    /// Cross-entropy through a prepared loss on device buffers made for the call.
    Resident { spec: CrossEntropy, soft: bool },
    /// Loss and gradient of the host path.
    Gradient { spec: CrossEntropy },
}

/// What a call returns.
#[derive(Debug, PartialEq)]
enum Answer {
    Loss(LossOutput),
    LogSumExp(Vec<f64>),
    LogSoftmax(Vec<f32>),
    Gradient(LossOutput, Vec<f32>),
}

/// One call with its inputs.
struct Case {
    rows: usize,
    classes: usize,
    logits: Vec<f32>,
    labels: Vec<i64>,
    probabilities: Vec<f32>,
    call: Call,
}

impl Case {
    fn new(seed: u64, rows: usize, classes: usize, call: Call) -> Self {
        let mut r = Inputs::new(seed);
        let mut labels = r.classes(rows, classes);
        if let Call::Loss { spec, .. } | Call::Resident { spec, .. } | Call::Gradient { spec } =
            &call
            && let Some(ignored) = spec.ignore_index()
        {
            // About one row in five ignored, never all of them (the mean would be NaN, and
            // NaN != NaN).
            for (i, y) in labels.iter_mut().enumerate() {
                if i % 5 == 1 {
                    *y = ignored;
                }
            }
        }
        Self {
            rows,
            classes,
            logits: r.logits(rows * classes, 8.0, 0.0),
            labels,
            probabilities: r.probabilities(rows, classes),
            call,
        }
    }

    fn label(&self) -> String {
        let call = match &self.call {
            Call::Loss { spec, soft } => format!("loss soft={soft} {spec:?}"),
            Call::LogSumExp => "log_sum_exp".into(),
            Call::LogSoftmax => "log_softmax".into(),
            Call::Resident { spec, soft } => format!("resident soft={soft} {spec:?}"),
            Call::Gradient { spec } => format!("gradient {spec:?}"),
        };
        format!("{}x{} {call}", self.rows, self.classes)
    }

    fn logits(&self) -> Logits<'_> {
        Logits::new(&self.logits, self.rows, self.classes).unwrap()
    }

    fn targets(&self, soft: bool) -> Targets<'_> {
        if soft {
            Targets::probabilities(&self.probabilities)
        } else {
            Targets::ClassIndices(&self.labels)
        }
    }

    /// A resident call's inputs in `gpu`'s buffers (`None` for the other calls), made before
    /// any thread runs: on GL a test thread's own device call would wait for the GL context
    /// beside xent's calls without their serialisation, and wgpu-hal gives up after six
    /// seconds (a loaded machine's longest hold can exceed that).
    fn upload(&self, gpu: &GpuContext) -> Option<(wgpu::Buffer, wgpu::Buffer)> {
        let Call::Resident { soft, .. } = &self.call else {
            return None;
        };
        let logits = buffer_with(gpu, 0, bytemuck::cast_slice(&self.logits));
        let targets = if *soft {
            buffer_with(gpu, 0, bytemuck::cast_slice(&self.probabilities))
        } else {
            buffer_with(gpu, 0, bytemuck::cast_slice(&self.labels))
        };
        Some((logits, targets))
    }

    /// The call on `gpu`, a resident one on its `uploaded` inputs.
    fn run(&self, gpu: &GpuContext, uploaded: Option<&(wgpu::Buffer, wgpu::Buffer)>) -> Answer {
        let label = self.label();
        let fail = |e: xent::XentError| -> Answer { panic!("{label}: {e}") };
        match &self.call {
            Call::Loss { spec, soft } => gpu
                .cross_entropy(spec, self.logits(), self.targets(*soft))
                .map_or_else(fail, Answer::Loss),
            Call::LogSumExp => gpu
                .log_sum_exp(self.logits())
                .map_or_else(fail, Answer::LogSumExp),
            Call::LogSoftmax => gpu
                .log_softmax(self.logits())
                .map_or_else(fail, Answer::LogSoftmax),
            Call::Resident { spec, soft } => {
                let (rows, classes) = (self.rows, self.classes);
                let (logits, targets) = uploaded.expect("a resident call's inputs");
                let shape = if *soft {
                    LossShape::probabilities(rows, classes)
                } else {
                    LossShape::class_indices(rows, classes, IndexType::I64)
                };
                let view = DeviceLogits::new(logits, 0, rows, classes);
                let t = DeviceTargets::of_layout(targets, 0, shape.targets());
                let result = gpu.prepare(spec, shape).and_then(|mut loss| {
                    loss.run(view, t)?;
                    loss.read()
                });
                result.map_or_else(fail, Answer::Loss)
            }
            Call::Gradient { spec } => gpu
                .cross_entropy_grad(
                    spec,
                    self.logits(),
                    self.targets(false),
                    Upstream::Scalar(1.0),
                )
                .map(|(o, g)| (o, g.to_f32()))
                .map_or_else(fail, |(out, grad)| Answer::Gradient(out, grad)),
        }
    }

    /// Checks a single-threaded answer against the CPU reference, loosely (the tight
    /// comparisons are gpu_vs_cpu's job): the equality checks below are only worth something
    /// if what they compare with is right.
    fn check_against_cpu(&self, answer: &Answer) {
        let label = self.label();
        let near = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-3,
                "{label}: {what} {got} vs reference {want}"
            );
        };
        match (&self.call, answer) {
            (Call::Gradient { spec }, Answer::Gradient(got, grad)) => {
                let (want, want_grad) = cpu::cross_entropy_grad(
                    spec,
                    self.logits(),
                    self.targets(false),
                    Upstream::Scalar(1.0),
                )
                .unwrap();
                near(got.loss.unwrap(), want.loss.unwrap(), "reduced loss");
                for (&g, &w) in grad.iter().zip(&want_grad) {
                    near(g as f64, w, "gradient");
                }
            }
            (Call::Loss { spec, soft } | Call::Resident { spec, soft }, Answer::Loss(got)) => {
                let want = cpu::cross_entropy(spec, self.logits(), self.targets(*soft)).unwrap();
                assert_eq!(got.rows, want.rows, "{label}: rows");
                assert_eq!(got.ignored_rows, want.ignored_rows, "{label}: ignored rows");
                for (&g, &w) in got.per_row.iter().zip(&want.per_row) {
                    near(g, w, "row loss");
                }
                near(got.sum, want.sum, "sum");
                match (got.loss, want.loss) {
                    (Some(g), Some(w)) => near(g, w, "reduced loss"),
                    (g, w) => assert_eq!(g.is_some(), w.is_some(), "{label}: reduced loss"),
                }
            }
            (Call::LogSumExp, Answer::LogSumExp(got)) => {
                let want = cpu::log_sum_exp(self.logits());
                assert_eq!(got.len(), want.len(), "{label}");
                for (&g, &w) in got.iter().zip(&want) {
                    near(g, w, "log-sum-exp");
                }
            }
            (Call::LogSoftmax, Answer::LogSoftmax(got)) => {
                let want = cpu::log_softmax(self.logits());
                assert_eq!(got.len(), want.len(), "{label}");
                for (&g, &w) in got.iter().zip(&want) {
                    near(g as f64, w, "log-probability");
                }
            }
            _ => unreachable!("{label}: the answer is for another call"),
        }
    }
}

/// Calls of every kind on C = 1, 3, 1000 and 4099: class indices and probabilities, with and
/// without weights, smoothing and an ignore index, under every reduction.
fn cases() -> Vec<Case> {
    let shapes = [(37, 1), (300, 3), (64, 1000), (16, 4099)];
    let mut all = Vec::new();
    for (i, &(rows, classes)) in shapes.iter().enumerate() {
        let seed = 1000 * i as u64;
        let weights = Inputs::new(seed + 1).weights(classes);
        let specs = [
            (CrossEntropy::new(), false),
            (
                CrossEntropy::new()
                    .with_weights(weights.clone())
                    .with_ignore_index(-100)
                    .with_label_smoothing(0.1),
                false,
            ),
            (
                CrossEntropy::new()
                    .with_reduction(Reduction::Sum)
                    .with_ignore_index(0)
                    .with_label_smoothing(0.25),
                false,
            ),
            (CrossEntropy::new().with_reduction(Reduction::None), true),
            (
                CrossEntropy::new()
                    .with_reduction(Reduction::Sum)
                    .with_weights(weights)
                    .with_label_smoothing(0.2),
                true,
            ),
            (CrossEntropy::new().with_label_smoothing(0.05), true),
        ];
        for (j, (spec, soft)) in specs.into_iter().enumerate() {
            all.push(Case::new(
                seed + 10 + j as u64,
                rows,
                classes,
                Call::Loss { spec, soft },
            ));
        }
        all.push(Case::new(seed + 20, rows, classes, Call::LogSumExp));
        all.push(Case::new(seed + 21, rows, classes, Call::LogSoftmax));
        let smoothed = CrossEntropy::new().with_label_smoothing(0.1);
        for (j, soft) in [false, true].into_iter().enumerate() {
            let spec = smoothed.clone();
            all.push(Case::new(
                seed + 30 + j as u64,
                rows,
                classes,
                Call::Resident { spec, soft },
            ));
        }
        let spec = smoothed.with_ignore_index(-100).with_z_loss(1e-3);
        all.push(Case::new(seed + 40, rows, classes, Call::Gradient { spec }));
    }
    all
}

/// Every case run once, alone, on `gpu`, each checked against the CPU.
fn alone(gpu: &GpuContext, cases: &[Case]) -> Vec<Answer> {
    cases
        .iter()
        .map(|case| {
            let answer = case.run(gpu, case.upload(gpu).as_ref());
            case.check_against_cpu(&answer);
            answer
        })
        .collect()
}

/// Runs every case `rounds` times from each of `threads` threads per context, all at once
/// (each thread starting at a different case), and asserts every answer equals `want`.
fn hammer(
    contexts: &[&GpuContext],
    threads: usize,
    rounds: usize,
    cases: &[Case],
    want: &[Answer],
) {
    let start = Barrier::new(contexts.len() * threads);
    let uploads: Vec<Vec<_>> = contexts
        .iter()
        .map(|&gpu| cases.iter().map(|case| case.upload(gpu)).collect())
        .collect();
    std::thread::scope(|scope| {
        for (c, &gpu) in contexts.iter().enumerate() {
            let uploads = &uploads[c];
            for t in 0..threads {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let first = (c * threads + t) * 7;
                    for n in 0..rounds * cases.len() {
                        let i = (first + n) % cases.len();
                        let got = cases[i].run(gpu, uploads[i].as_ref());
                        assert!(
                            got == want[i],
                            "context {c} thread {t}: {} differs from the same call alone",
                            cases[i].label()
                        );
                    }
                });
            }
        }
    });
}

#[test]
fn one_context_from_eight_threads() {
    let Some(gpu) = gpu() else { return };
    let cases = cases();
    let want = alone(gpu, &cases);
    hammer(&[gpu], 8, 2, &cases, &want);
}

#[test]
fn three_contexts_from_two_threads_each() {
    let Some(first) = fresh_gpu() else { return };
    let others: Vec<GpuContext> = (0..2).map(|_| fresh_gpu().unwrap()).collect();
    let cases = cases();
    // Contexts on the same adapter plan and compile alike, so one set of answers serves all.
    let want = alone(&first, &cases);
    let contexts: Vec<&GpuContext> = std::iter::once(&first).chain(&others).collect();
    hammer(&contexts, 2, 2, &cases, &want);
}

/// A 3-class batch with class-index targets, for the long call.
fn three_class_batch(rows: usize) -> (Vec<f32>, Vec<i64>) {
    let mut r = Inputs::new(rows as u64);
    (r.logits(rows * 3, 5.0, 0.0), r.classes(rows, 3))
}

/// One workgroup of 256 lanes per row, one dispatch for the whole batch: about the slowest
/// way to run a batch, and on llvmpipe one uninterrupted hold of the GL context.
fn naive_call(gpu: &GpuContext, logits: &[f32], labels: &[i64]) -> LossOutput {
    let rows = labels.len();
    let logits = Logits::new(logits, rows, 3).unwrap();
    gpu.cross_entropy_with(
        &CrossEntropy::new(),
        logits,
        Targets::ClassIndices(labels),
        Strategy::NAIVE,
    )
    .unwrap()
}

/// Rows for which [`naive_call`] takes about `target` on this adapter (at most 2²⁰ rows, so a
/// fast GPU gets a cheap test), measured by growing the batch until a call takes 0.5 s.
fn rows_taking(gpu: &GpuContext, target: Duration) -> usize {
    const MAX_ROWS: usize = 1 << 20;
    let mut rows = 1024;
    loop {
        let (logits, labels) = three_class_batch(rows);
        naive_call(gpu, &logits, &labels); // compiles the pipeline
        let start = Instant::now();
        naive_call(gpu, &logits, &labels);
        let took = start.elapsed().as_secs_f64();
        if took >= 0.5 || rows >= MAX_ROWS {
            let scaled = rows as f64 * target.as_secs_f64() / took.max(1e-6);
            return (scaled as usize).clamp(rows, MAX_ROWS);
        }
        rows *= 4;
    }
}

#[test]
fn short_calls_wait_out_a_long_dispatch() {
    let Some(gpu) = fresh_gpu() else { return };
    // Longer than wgpu-hal's six-second GL context lock timeout, on a CPU rasteriser.
    let (logits, labels) = three_class_batch(rows_taking(&gpu, Duration::from_secs(7)));
    let cases = &cases()[..8];
    let want = alone(&gpu, cases);
    let start = Barrier::new(4);
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            start.wait();
            naive_call(&gpu, &logits, &labels)
        });
        for t in 0..3 {
            let (start, want, gpu) = (&start, &want, &gpu);
            scope.spawn(move || {
                start.wait();
                // Let the long call reach the device first.
                std::thread::sleep(Duration::from_millis(300));
                for (i, case) in cases.iter().enumerate().skip(t) {
                    assert!(
                        case.run(gpu, None) == want[i],
                        "thread {t}: {} differs from the same call alone",
                        case.label()
                    );
                }
            });
        }
        let got = long.join().unwrap();
        let want = cpu::cross_entropy(
            &CrossEntropy::new(),
            Logits::new(&logits, labels.len(), 3).unwrap(),
            Targets::ClassIndices(&labels),
        )
        .unwrap();
        let mass = vec![1.0; labels.len()];
        assert_outputs_match(
            "long call",
            &got,
            &want,
            &max_abs_per_row(&logits, 3),
            &mass,
        );
    });
}
