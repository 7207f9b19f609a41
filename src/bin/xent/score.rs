//! `xent score`: a .npy batch of any size, streamed through the GPU (or the CPU reference) in
//! batches of rows that fit one binding, combined into one result. Memory is O(batch): only
//! running sums are kept across batches, and per-row losses and the gradient stream to
//! `--per-row` and `--grad`. (The gradient of a mean needs the whole file's denominator before
//! its first batch: for class indices the targets, N integers, are read and held up front.)

use std::borrow::Cow;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use xent::scoring::{self, MetricsSummary};
use xent::{
    CpuReference, CrossEntropy, Dtype, ElementVec, GpuContext, Logits, LossOutput, LossTotals,
    MeanNormalisers, Reduction, Scorer, Targets, Upstream, XentError,
};

use crate::npy::{Elem, NpyInput, NpyWriter, same_file, same_output};
use crate::out::{Out, json_f64, json_opt, outln};
use crate::{CliError, ScoreArgs};

/// Bytes of logits (and as much again of probabilities) read per batch at most.
const MAX_BATCH_BYTES: u64 = 256 << 20;

/// The open inputs, checked against each other.
struct Inputs {
    logits: NpyInput,
    targets: NpyInput,
    weights_label: String,
    rows: usize,
    classes: usize,
    soft: bool,
    /// The logits' dtype (float64 is read as f32), and uint16 bits read as it.
    dtype: Dtype,
    bits_as: Option<Dtype>,
    /// Probabilities are read in the logits' half dtype (else as f32).
    targets_half: bool,
}

/// Refuses outputs that are inputs (under any name), and one file for both outputs.
pub fn check_outputs(args: &ScoreArgs) -> Result<(), CliError> {
    let outputs = [("--per-row", &args.per_row), ("--grad", &args.grad)];
    for (out_flag, out) in outputs {
        let Some(out) = out else { continue };
        let inputs = [
            ("--logits", Some(&args.logits)),
            ("--targets", args.targets.as_ref()),
            ("--weights", args.weights.as_ref()),
            ("--teacher", args.teacher.as_ref()),
            ("--topk-indices", args.topk_indices.as_ref()),
            ("--topk-probs", args.topk_probs.as_ref()),
        ];
        for (flag, input) in inputs {
            if input.is_some_and(|input| same_file(out, input)) {
                return Err(CliError::input(format!(
                    "{out_flag} {}: is the {flag} file; xent does not write over its inputs",
                    out.display()
                )));
            }
        }
    }
    if let (Some(per_row), Some(grad)) = (&args.per_row, &args.grad) {
        if same_output(grad, per_row) {
            return Err(same_output_error(grad));
        }
    }
    Ok(())
}

fn same_output_error(grad: &Path) -> CliError {
    CliError::input(format!(
        "--grad {}: is the --per-row file; the two outputs need two files",
        grad.display()
    ))
}

/// Logits opened for reading: the file, N, C, the dtype scored, and the half type of uint16
/// raw bits.
pub struct OpenLogits {
    pub file: NpyInput,
    pub rows: usize,
    pub classes: usize,
    pub dtype: Dtype,
    pub bits_as: Option<Dtype>,
}

/// Opens a logits file [N, C] (C ≥ 1) of a float dtype, or of uint16 bits of the half type
/// `given`; a `given` dtype must agree with a float file's own.
pub fn open_logits(path: &Path, given: Option<Dtype>) -> Result<OpenLogits, CliError> {
    let logits = NpyInput::open("logits", path)?;
    let (dtype, bits_as) = match (logits.elem, given) {
        (Elem::U16, Some(d)) if d.is_half() => (d, Some(d)),
        (Elem::U16, _) => {
            return Err(logits
                .error("holds uint16: raw bits of a half type need --logits-dtype bf16 or f16"));
        }
        (e, given) => match (e.dtype(), given) {
            (None, _) => {
                return Err(logits.error(format!(
                    "expected float32, float64, float16 or bfloat16 logits, found {}",
                    e.name()
                )));
            }
            (Some(d), Some(g)) if g != d => {
                return Err(logits.error(format!(
                    "holds {}, not {g} (--logits-dtype names the half type of uint16 bits)",
                    e.name()
                )));
            }
            (Some(d), _) => (d, None),
        },
    };
    let &[rows, classes] = logits.shape.as_slice() else {
        return Err(logits.error(format!(
            "expected a 2-D array [N, C], found shape {:?}",
            logits.shape
        )));
    };
    if classes == 0 {
        return Err(logits.error("has 0 classes (shape [N, 0]); cross-entropy needs at least one"));
    }
    Ok(OpenLogits {
        file: logits,
        rows,
        classes,
        dtype,
        bits_as,
    })
}

fn open_inputs(args: &ScoreArgs) -> Result<(Inputs, Option<Vec<f32>>), CliError> {
    check_outputs(args)?;
    let OpenLogits {
        file: logits,
        rows,
        classes,
        dtype,
        bits_as,
    } = open_logits(&args.logits, args.logits_dtype)?;
    let Some(targets_path) = &args.targets else {
        return Err(CliError::input("--targets: required (or --teacher)"));
    };
    let targets = NpyInput::open("targets", targets_path)?;
    let soft = targets.elem.is_float();
    if !soft && !targets.elem.is_int() {
        return Err(targets.error(format!(
            "holds {}, which is neither class indices (int64 or int32, shape [N]) nor probabilities (float32, float64, float16 or bfloat16, shape [N, C]); raw uint16 bits of a half type are read only for --logits, with --logits-dtype",
            targets.elem.name()
        )));
    }
    if soft && targets.shape != [rows, classes] {
        return Err(targets.error(format!(
            "float targets are probabilities and must have the logits' shape [{rows}, {classes}] ({}), found {:?}; class indices must be integers of shape [{rows}]",
            logits.label(),
            targets.shape
        )));
    }
    if !soft && targets.shape != [rows] {
        return Err(targets.error(format!(
            "class indices must have shape [N] = [{rows}] to match {} [{rows}, {classes}], found {:?}",
            logits.label(),
            targets.shape
        )));
    }
    let mut weights_label = String::from("--weights");
    let weights = match &args.weights {
        None => None,
        Some(path) => {
            let mut w = NpyInput::open("weights", path)?;
            weights_label = w.label();
            if !w.elem.is_float() {
                return Err(w.error(format!(
                    "expected float class weights, found {}",
                    w.elem.name()
                )));
            }
            if w.shape != [classes] {
                return Err(w.error(format!(
                    "expected shape [C] = [{classes}] (one weight per class of {}), found {:?}",
                    logits.label(),
                    w.shape
                )));
            }
            Some(w.read_f32(classes)?)
        }
    };
    let targets_half = soft && dtype.is_half() && targets.elem.dtype() == Some(dtype);
    Ok((
        Inputs {
            logits,
            targets,
            weights_label,
            rows,
            classes,
            soft,
            dtype,
            bits_as,
            targets_half,
        },
        weights,
    ))
}

/// Turns a library error into a CLI error naming the file or argument at fault; `row_offset`
/// makes row numbers count from the start of the file, not of the batch.
fn blame(e: XentError, inputs: &Inputs, row_offset: usize) -> CliError {
    let e = e.with_row_offset(row_offset);
    match e {
        XentError::ClassIndexOutOfRange { .. } | XentError::TargetsShape { .. } => CliError::input(
            format!("{}: {}", inputs.targets.label(), strip_role(&e, "targets")),
        ),
        XentError::LogitsShape { .. }
        | XentError::NoClasses
        | XentError::RowTooLarge { .. }
        | XentError::LogitOutOfRange { .. } => logits_error(&inputs.logits, &e),
        XentError::WeightsLength { .. } | XentError::WeightNotFinite { .. } => {
            CliError::input(format!(
                "{}: {}",
                inputs.weights_label,
                strip_role(&e, "class weights")
            ))
        }
        XentError::LabelSmoothing(_) => CliError::input(format!("--label-smoothing: {e}")),
        XentError::ZLoss(_) => CliError::input(format!("--z-loss: {e}")),
        XentError::Softcap(_) => CliError::input(format!("--softcap: {e}")),
        XentError::IgnoreIndexWithProbabilities => CliError::input(format!(
            "--ignore-index: {e}; {} holds probabilities",
            inputs.targets.label()
        )),
        other => CliError::runtime(other.to_string()),
    }
}

/// A library error about the logits (its message starts "logits: "), naming their file.
pub fn logits_error(logits: &NpyInput, e: &XentError) -> CliError {
    logits.error(strip_role(e, "logits"))
}

fn strip_role(e: &XentError, role: &str) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("{role}: "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// `--batch-rows` as given, checked: at least 1.
fn requested_batch_rows(args: &ScoreArgs) -> Result<Option<usize>, CliError> {
    checked_batch_rows(args.batch_rows)
}

/// A `--batch-rows` value, checked: at least 1.
pub fn checked_batch_rows(given: Option<i64>) -> Result<Option<usize>, CliError> {
    match given {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(n) => Err(CliError::input(format!(
            "--batch-rows {n}: must be at least 1"
        ))),
    }
}

/// Rows per batch: as many as fit [`MAX_BATCH_BYTES`] of logits (and on the GPU one binding),
/// at most `requested`, and at least one row. Only the GPU has a hard limit: a row larger
/// than one binding (`gpu_binding`); on the CPU (`None`) one row of any size is a batch.
pub fn batch_rows(
    classes: usize,
    requested: Option<usize>,
    gpu_binding: Option<u64>,
) -> Result<usize, XentError> {
    let row_bytes = classes as u64 * 4;
    let limit = gpu_binding.map_or(MAX_BATCH_BYTES, |b| b.min(MAX_BATCH_BYTES));
    if let Some(binding) = gpu_binding.filter(|&b| row_bytes > b) {
        return Err(XentError::RowTooLarge {
            classes,
            row_bytes,
            limit: binding,
        });
    }
    let fits = usize::try_from(limit / row_bytes)
        .unwrap_or(usize::MAX)
        .max(1);
    Ok(requested.map_or(fits, |r| r.min(fits)))
}

/// What is kept across batches: the library's running totals (no per-row values, whatever
/// the number of rows), and whether the targets seen so far are distributions.
#[derive(Clone, Debug, PartialEq)]
struct Totals {
    totals: LossTotals,
    /// Why CE = H + KL is not shown although the entropy is known: the first target row that
    /// is not a probability distribution.
    not_distribution: Option<String>,
    /// The token metrics so far, with --metrics.
    metrics: Option<MetricsSummary>,
}

impl Totals {
    fn new(reduction: Reduction, classes: usize, with_entropy: bool, with_z_loss: bool) -> Self {
        Self {
            totals: LossTotals::empty(reduction, classes, with_entropy, with_z_loss),
            not_distribution: None,
            metrics: None,
        }
    }

    /// Adds one batch's output (its per-row values are not kept).
    fn add(&mut self, out: &LossOutput) {
        self.totals.add(&out.totals());
    }

    /// The reduced loss; `None` for reduction none.
    fn loss(&self) -> Option<f64> {
        self.totals.reduced_loss()
    }

    /// PyTorch's mean (the z-loss part averaged over the counted rows), whatever the reduction.
    fn mean(&self) -> f64 {
        self.totals.mean()
    }

    /// The z-loss reduced like the loss; `None` for reduction none or without z-loss.
    fn z_loss(&self) -> Option<f64> {
        self.totals.reduced_z_loss()
    }

    /// The z-loss over the counted rows, whatever the reduction.
    fn z_loss_mean(&self) -> Option<f64> {
        Some(self.totals.z_loss_sum? / self.totals.counted_rows() as f64)
    }

    /// The entropy reduced like the loss, when every target row is a distribution.
    fn entropy(&self) -> Option<f64> {
        self.not_distribution
            .is_none()
            .then(|| self.totals.reduced_entropy())
            .flatten()
    }

    /// `loss − entropy` (less the z-loss, if any), when the entropy is shown.
    fn kl_divergence(&self) -> Option<f64> {
        self.entropy()?;
        self.totals.reduced_kl_divergence()
    }
}

/// The first row of `p` (`classes` wide, row numbers from `first_row`) that is not a
/// probability distribution: a NaN or negative value, or a sum further than
/// `1e-4·max(1, C·ε)` from 1 (ε the float32 epsilon; the sum is taken in f64).
fn not_a_distribution(p: &[f32], classes: usize, first_row: usize) -> Option<String> {
    let tolerance = 1e-4 * (classes as f64 * f32::EPSILON as f64).max(1.0);
    for (i, row) in p.chunks_exact(classes).enumerate() {
        let row_number = first_row + i;
        if let Some(k) = row.iter().position(|&v| v.is_nan() || v < 0.0) {
            return Some(format!(
                "row {row_number} has probability {} at class {k}",
                row[k]
            ));
        }
        // Not NaN: NaN and negative values are caught above.
        let sum: f64 = row.iter().map(|&v| v as f64).sum();
        if (sum - 1.0).abs() > tolerance {
            let sum = format!("{sum:.6}");
            let sum = sum.trim_end_matches('0').trim_end_matches('.');
            return Some(format!("row {row_number} sums to {sum}, not 1"));
        }
    }
    None
}

/// What computes: the GPU or the f64 CPU reference.
enum Engine {
    Gpu(Box<GpuContext>),
    Cpu,
}

impl Engine {
    fn scorer(&self) -> &dyn Scorer {
        match self {
            Engine::Gpu(gpu) => gpu.as_ref(),
            Engine::Cpu => &CpuReference,
        }
    }

    /// One batch's loss and its token metrics (class indices), from one pass on the GPU; on
    /// the CPU, the f64 reference's metrics of the logits (capped and rounded to f32 first
    /// when the spec caps them, as the GPU sees them).
    fn score_metrics(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        labels: &[i64],
        top_k: usize,
    ) -> Result<(LossOutput, MetricsSummary), XentError> {
        match self {
            Engine::Gpu(gpu) => {
                let (out, m) = gpu.cross_entropy_metrics(spec, logits, labels, top_k)?;
                Ok((out, m.summary))
            }
            Engine::Cpu => {
                let out = xent::cpu::cross_entropy(spec, logits, Targets::ClassIndices(labels))?;
                let capped: Vec<f32>;
                let seen = match spec.softcap() {
                    Some(_) => {
                        let z = logits.values().to_f32(0..logits.len());
                        capped = z.iter().map(|&v| spec.capped(v as f64) as f32).collect();
                        Logits::new(&capped, logits.rows(), logits.classes())?
                    }
                    None => logits,
                };
                let m = scoring::token_metrics(seen, labels, spec.ignore_index(), top_k)?;
                Ok((out, m.summary))
            }
        }
    }

    /// One batch's loss, and with an upstream gradient its gradient in the logits' dtype (the
    /// CPU's f64 rounded once, to nearest even).
    fn score(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Option<Upstream<'_>>,
    ) -> Result<(LossOutput, Option<ElementVec>), XentError> {
        let Some(upstream) = upstream else {
            return Ok((self.scorer().cross_entropy(spec, logits, targets)?, None));
        };
        let (out, grad) = match self {
            Engine::Gpu(gpu) => gpu.cross_entropy_grad(spec, logits, targets, upstream)?,
            Engine::Cpu => {
                let (out, g) = xent::cpu::cross_entropy_grad(spec, logits, targets, upstream)?;
                (out, ElementVec::rounded(logits.dtype(), g))
            }
        };
        Ok((out, Some(grad)))
    }
}

/// The whole file's mean normalisers (`Σ_{i not ignored} w_{y_i}`, or N for probabilities, and
/// the counted rows), summed in row order as the library sums them: the gradient of the mean
/// over the whole file needs them before its first batch (`Upstream::MeanOver`). For class
/// indices the targets are read here, checked, and returned to be scored from memory (N
/// integers; a pipe cannot be read twice).
fn whole_file_mean(
    spec: &CrossEntropy,
    inputs: &mut Inputs,
) -> Result<(MeanNormalisers, Option<Vec<i64>>), CliError> {
    let mut mean = MeanNormalisers::default();
    if inputs.soft {
        mean.add_rows(inputs.rows);
        return Ok((mean, None));
    }
    const CHUNK: usize = 1 << 20;
    let (rows, classes) = (inputs.rows, inputs.classes);
    let mut labels = Vec::with_capacity(rows);
    while labels.len() < rows {
        let first = labels.len();
        let chunk = inputs.targets.read_i64(CHUNK.min(rows - first))?;
        mean.add_class_indices(spec, classes, first, &chunk)
            .map_err(|e| blame(e, inputs, 0))?;
        labels.extend(chunk);
    }
    Ok((mean, Some(labels)))
}

pub fn run(args: &ScoreArgs) -> Result<(), CliError> {
    if args.topk_probs.is_some() && args.topk_indices.is_none() {
        return Err(CliError::input(
            "--topk-probs: needs --topk-indices, the class indices [N, k] its probabilities belong to",
        ));
    }
    if let Some(teacher) = &args.teacher {
        return crate::distill::run(args, teacher);
    }
    // (clap's `requires` does not see these: --teacher conflicts with --targets.)
    let distillation_only = [
        ("--temperature", args.temperature.is_some()),
        ("--divergence", args.divergence.is_some()),
        ("--beta", args.beta.is_some()),
        ("--t2-scale", args.t2_scale),
    ];
    if let Some((flag, _)) = distillation_only.iter().find(|(_, given)| *given) {
        return Err(CliError::input(format!(
            "{flag}: is an option of distillation, which needs --teacher"
        )));
    }
    if let (Some(indices), Some(probabilities)) = (&args.topk_indices, &args.topk_probs) {
        return crate::topk::run(args, indices, probabilities);
    }
    let requested = requested_batch_rows(args)?;
    if args.top_k == Some(0) {
        return Err(CliError::input(
            "--top-k 0: must be at least 1 (a hit is the target among the K highest classes)",
        ));
    }
    let grad_output = crate::stream::grad_output(args.grad_output)?;
    let (mut inputs, weights) = open_inputs(args)?;
    let mut spec = CrossEntropy::new()
        .with_reduction(args.reduction)
        .with_label_smoothing(args.label_smoothing)
        .with_z_loss(args.z_loss);
    if let Some(cap) = args.softcap {
        spec = spec.with_softcap(cap);
    }
    if let Some(i) = args.ignore_index {
        spec = spec.with_ignore_index(i);
    }
    if let Some(w) = weights {
        spec = spec.with_weights(w);
    }
    // Check the options before any GPU work, against an empty batch of the right width.
    let (rows, classes, soft) = (inputs.rows, inputs.classes, inputs.soft);
    if args.metrics && soft {
        return Err(CliError::input(format!(
            "--metrics: token metrics need class indices; {} holds probabilities",
            inputs.targets.label()
        )));
    }
    let none = Logits::new::<f32>(&[], 0, classes).map_err(|e| blame(e, &inputs, 0))?;
    let empty_targets = if soft {
        Targets::probabilities::<f32>(&[])
    } else {
        Targets::ClassIndices(&[])
    };
    spec.validate(&none, &empty_targets)
        .map_err(|e| blame(e, &inputs, 0))?;

    let engine = if args.cpu {
        Engine::Cpu
    } else {
        Engine::Gpu(Box::new(GpuContext::new()?))
    };
    let binding = match &engine {
        Engine::Gpu(gpu) => Some(gpu.facts().max_binding_bytes),
        Engine::Cpu => None,
    };
    let batch_rows = batch_rows(classes, requested, binding).map_err(|e| blame(e, &inputs, 0))?;

    // The gradient of a mean over the whole file: its denominators, before the first batch.
    let (mean_over, held_labels) = if args.grad.is_some() && args.reduction == Reduction::Mean {
        let (mean, labels) = whole_file_mean(&spec, &mut inputs)?;
        (Some(mean), labels)
    } else {
        (None, None)
    };
    let per_row_upstream = match (&args.grad, args.reduction) {
        (Some(_), Reduction::None) => vec![grad_output; batch_rows.min(rows)],
        _ => Vec::new(),
    };

    let mut per_row = match &args.per_row {
        Some(path) => Some(NpyWriter::create(
            "--per-row",
            path,
            &[rows],
            inputs.logits.elem == Elem::F64,
        )?),
        None => None,
    };
    let mut grad = match &args.grad {
        Some(path) => Some(NpyWriter::create_as(
            "--grad",
            path,
            &[rows, classes],
            inputs.dtype,
        )?),
        None => None,
    };
    let start = Instant::now();
    let with_entropy = soft && spec.weights().is_none();
    let mut total = Totals::new(args.reduction, classes, with_entropy, spec.z_loss() > 0.0);
    let top_k = args.top_k.unwrap_or(5);
    if args.metrics {
        total.metrics = Some(MetricsSummary::empty(top_k));
    }
    let mut progress: Option<ProgressBar> = None;
    let mut done = 0;
    while done < rows {
        let n = batch_rows.min(rows - done);
        let z = inputs.logits.read_values(n * classes, inputs.bits_as)?;
        let no_probabilities = ElementVec::F32(Vec::new());
        let (labels, probabilities): (Cow<[i64]>, ElementVec) = if soft {
            let p = if inputs.targets_half {
                inputs.targets.read_values(n * classes, None)?
            } else {
                ElementVec::F32(inputs.targets.read_f32(n * classes)?)
            };
            (Cow::Borrowed(&[]), p)
        } else if let Some(all) = &held_labels {
            (Cow::Borrowed(&all[done..done + n]), no_probabilities)
        } else {
            (Cow::Owned(inputs.targets.read_i64(n)?), no_probabilities)
        };
        let targets = if soft {
            if total.totals.entropy_sum.is_some() && total.not_distribution.is_none() {
                let p = probabilities.to_f32();
                total.not_distribution = not_a_distribution(&p, classes, done);
            }
            Targets::Probabilities(probabilities.as_elements())
        } else {
            Targets::ClassIndices(&labels)
        };
        let upstream = args
            .grad
            .as_ref()
            .map(|_| match (args.reduction, mean_over) {
                (Reduction::Mean, Some(mean)) => mean.upstream(grad_output),
                (Reduction::None, _) => Upstream::PerRow(&per_row_upstream[..n]),
                _ => Upstream::Scalar(grad_output),
            });
        let logits = Logits::from_elements(z.as_elements(), n, classes)
            .map_err(|e| blame(e, &inputs, done))?;
        let (out, gradient) = match total.metrics.as_mut() {
            Some(summary) => {
                let (out, more) = engine
                    .score_metrics(&spec, logits, &labels, top_k)
                    .map_err(|e| blame(e, &inputs, done))?;
                summary.add(&more);
                (out, None)
            }
            None => engine
                .score(&spec, logits, targets, upstream)
                .map_err(|e| blame(e, &inputs, done))?,
        };
        if let Some(writer) = per_row.as_mut() {
            writer.write(&out.per_row)?;
        }
        if let (Some(writer), Some(gradient)) = (grad.as_mut(), gradient) {
            writer.write_values(&gradient)?;
        }
        total.add(&out);
        done += n;
        progress = update_progress(progress, start.elapsed(), done, rows);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    inputs.logits.finish()?;
    inputs.targets.finish()?;
    NpyWriter::finish_all(per_row.into_iter().chain(grad))?;
    let seconds = start.elapsed().as_secs_f64();
    report(
        args,
        &total,
        inputs.dtype,
        &engine.scorer().describe(),
        seconds,
    )
}

/// A progress bar on stderr, only for a terminal and only once the job has run a second.
pub fn update_progress(
    bar: Option<ProgressBar>,
    elapsed: Duration,
    done: usize,
    rows: usize,
) -> Option<ProgressBar> {
    if bar.is_none()
        && (elapsed < Duration::from_secs(1) || done >= rows || !std::io::stderr().is_terminal())
    {
        return bar;
    }
    let bar = bar.unwrap_or_else(|| {
        let bar = ProgressBar::new(rows as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} eta {eta}")
        {
            bar.set_style(style);
        }
        bar
    });
    bar.set_position(done as u64);
    Some(bar)
}

fn report(
    args: &ScoreArgs,
    total: &Totals,
    grad_dtype: Dtype,
    device: &str,
    seconds: f64,
) -> Result<(), CliError> {
    let reduction = match args.reduction {
        Reduction::None => "none",
        Reduction::Sum => "sum",
        Reduction::Mean => "mean",
    };
    let mut out = Out::lock();
    let metric = |f: fn(&MetricsSummary) -> f64| json_opt(total.metrics.as_ref().map(f));
    if args.json {
        let value = serde_json::json!({
            "loss": json_opt(total.loss()),
            "reduction": reduction,
            "sum": json_f64(total.totals.sum),
            "mean": json_f64(total.mean()),
            "rows": total.totals.rows,
            "classes": total.totals.classes,
            "ignored_rows": total.totals.ignored_rows,
            "z_loss": json_opt(total.z_loss()),
            "z_loss_sum": json_opt(total.totals.z_loss_sum),
            "entropy": json_opt(total.entropy()),
            "kl_divergence": json_opt(total.kl_divergence()),
            "decomposition_note": total.not_distribution,
            "accuracy": metric(MetricsSummary::accuracy),
            "top_k": total.metrics.map(|m| m.top_k),
            "top_k_accuracy": metric(MetricsSummary::top_k_accuracy),
            "nll": metric(MetricsSummary::mean_nll),
            "perplexity": metric(MetricsSummary::perplexity),
            "device": device,
            "seconds": json_f64(seconds),
        });
        outln!(out, "{value}")?;
        return out.finish();
    }
    match total.loss() {
        Some(loss) => outln!(out, "loss ({reduction}): {loss:.9}")?,
        None => outln!(
            out,
            "loss (none): {} per-row losses{} (sum {:.9}, mean {:.9})",
            total.totals.rows,
            if args.per_row.is_some() {
                " written"
            } else {
                "; --per-row OUT.npy writes them"
            },
            total.totals.sum,
            total.mean()
        )?,
    }
    match (total.z_loss(), total.totals.z_loss_sum) {
        (Some(z), _) => outln!(out, "  of which z-loss: {z:.9}")?,
        (None, Some(sum)) => outln!(
            out,
            "  of which z-loss: sum {sum:.9}, mean {:.9}",
            total.z_loss_mean().unwrap_or(f64::NAN)
        )?,
        (None, None) => {}
    }
    if let (Some(h), Some(kl)) = (total.entropy(), total.kl_divergence()) {
        match total.z_loss() {
            Some(z) => outln!(out, "  = H(p) {h:.9} + KL(p‖q) {kl:.9} + z-loss {z:.9}")?,
            None => outln!(out, "  = H(p) {h:.9} + KL(p‖q) {kl:.9}")?,
        }
    }
    if let Some(why) = &total.not_distribution {
        outln!(
            out,
            "  H(p) and KL not shown: {why} (the targets are not probability distributions)"
        )?;
    }
    if let Some(m) = &total.metrics {
        outln!(
            out,
            "metrics over {} rows: accuracy {:.6}, top-{} accuracy {:.6}, NLL {:.9}, perplexity {:.6}",
            m.counted_rows,
            m.accuracy(),
            m.top_k,
            m.top_k_accuracy(),
            m.mean_nll(),
            m.perplexity()
        )?;
    }
    outln!(
        out,
        "rows: {}, classes: {}, ignored rows: {}",
        total.totals.rows,
        total.totals.classes,
        total.totals.ignored_rows
    )?;
    if let Some(path) = &args.grad {
        outln!(
            out,
            "gradient: {} [{}, {}] written to {}",
            match grad_dtype {
                Dtype::F32 => "float32",
                Dtype::F16 => "float16",
                Dtype::Bf16 => "bfloat16",
            },
            total.totals.rows,
            total.totals.classes,
            path.display()
        )?;
    }
    outln!(out, "device: {device}")?;
    outln!(out, "time: {:.3} s", seconds)?;
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use xent::Scorer;

    /// Three batches into the running sums give what one whole batch gives, and the sums hold
    /// no per-row values at all.
    #[test]
    fn totals_of_batches_match_the_whole() {
        let (rows, classes) = (7, 3);
        let z: Vec<f32> = (0..rows * classes).map(|i| (i % 5) as f32 - 2.0).collect();
        let p: Vec<f32> = (0..rows * classes)
            .map(|i| [0.2, 0.3, 0.5][i % 3])
            .collect();
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let spec = CrossEntropy::new()
                .with_reduction(reduction)
                .with_label_smoothing(0.1);
            let score = |from: usize, to: usize| {
                let logits = Logits::new(&z[from * classes..to * classes], to - from, classes);
                CpuReference
                    .cross_entropy(
                        &spec,
                        logits.unwrap(),
                        Targets::probabilities(&p[from * classes..to * classes]),
                    )
                    .unwrap()
            };
            let whole = score(0, rows);
            let mut total = Totals::new(reduction, classes, true, false);
            for (from, to) in [(0, 3), (3, 6), (6, 7)] {
                total.add(&score(from, to));
            }
            assert_eq!(total.totals.rows, rows);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(close(total.totals.sum, whole.sum));
            assert!(close(total.mean(), whole.mean()));
            assert_eq!(total.loss().is_none(), whole.loss.is_none());
            assert!(close(
                total.entropy().unwrap_or(0.0),
                whole.reduced_entropy().unwrap_or(0.0)
            ));
        }
    }

    /// With a z-loss and ignored rows, the running sums give the library's reduced loss, mean
    /// and z-loss for the whole batch (Reduction::apply_with_z_loss), not a mean of batch means.
    #[test]
    fn totals_with_z_loss_match_the_whole() {
        let (rows, classes) = (9, 4);
        let z: Vec<f32> = (0..rows * classes)
            .map(|i| ((i * 7) % 11) as f32 - 4.0)
            .collect();
        let y: Vec<i64> = (0..rows as i64)
            .map(|i| if i % 4 == 1 { -100 } else { i % 4 })
            .collect();
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let spec = CrossEntropy::new()
                .with_reduction(reduction)
                .with_weights(vec![0.5, 2.0, 1.0, 3.0])
                .with_ignore_index(-100)
                .with_z_loss(0.1);
            let score = |from: usize, to: usize| {
                let logits = Logits::new(&z[from * classes..to * classes], to - from, classes);
                CpuReference
                    .cross_entropy(&spec, logits.unwrap(), Targets::ClassIndices(&y[from..to]))
                    .unwrap()
            };
            let whole = score(0, rows);
            let mut total = Totals::new(reduction, classes, false, true);
            for (from, to) in [(0, 2), (2, 7), (7, 9)] {
                total.add(&score(from, to));
            }
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert_eq!(total.totals.counted_rows(), whole.counted_rows());
            assert_eq!(total.loss().is_none(), whole.loss.is_none());
            assert!(close(
                total.loss().unwrap_or(0.0),
                whole.loss.unwrap_or(0.0)
            ));
            assert!(close(total.mean(), whole.mean()), "{reduction:?}");
            assert_eq!(total.z_loss().is_none(), whole.reduced_z_loss().is_none());
            assert!(close(
                total.z_loss().unwrap_or(0.0),
                whole.reduced_z_loss().unwrap_or(0.0)
            ));
            // The batches' own means differ from the whole's: the check above can fail.
            let mean_of_means = [score(0, 2), score(2, 7)].map(|o| o.mean());
            assert!(
                !close(mean_of_means[0], whole.mean()) || !close(mean_of_means[1], whole.mean())
            );
        }
    }

    #[test]
    fn only_distributions_get_the_entropy_split() {
        assert_eq!(not_a_distribution(&[0.25, 0.75, 0.5, 0.5], 2, 0), None);
        assert_eq!(
            not_a_distribution(&[0.25, 0.75, 2.0, 3.0], 2, 10).as_deref(),
            Some("row 11 sums to 5, not 1")
        );
        assert_eq!(
            not_a_distribution(&[1.5, -0.5], 2, 0).as_deref(),
            Some("row 0 has probability -0.5 at class 1")
        );
        assert_eq!(
            not_a_distribution(&[f32::NAN, 1.0], 2, 3).as_deref(),
            Some("row 3 has probability NaN at class 0")
        );
        // Float32 rounding is within the tolerance.
        assert_eq!(not_a_distribution(&[1.0 / 3.0; 3], 3, 0), None);
        let mut totals = Totals::new(Reduction::Mean, 2, true, false);
        totals.not_distribution = Some("row 0 sums to 5, not 1".into());
        assert_eq!((totals.entropy(), totals.kl_divergence()), (None, None));
    }

    /// The CPU has no binding: a row of any size is a batch of its own there.
    #[test]
    fn batches_follow_the_device_limit() {
        let huge = 67_108_865;
        assert_eq!(batch_rows(huge, None, None).unwrap(), 1);
        assert!(matches!(
            batch_rows(huge, None, Some(128 << 20)),
            Err(XentError::RowTooLarge { .. })
        ));
        assert_eq!(batch_rows(huge, None, Some(1 << 30)).unwrap(), 1);
        assert_eq!(batch_rows(1000, None, None).unwrap(), (256 << 20) / 4000);
        assert_eq!(batch_rows(1000, Some(3), Some(1 << 30)).unwrap(), 3);
    }
}
