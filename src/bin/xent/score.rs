//! `xent score`: a .npy batch of any size, streamed through the GPU (or the CPU reference) in
//! batches of rows that fit one binding, combined into one result. Memory is O(batch): only
//! running sums are kept across batches, and per-row losses stream to `--per-row`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use xent::{
    CpuReference, CrossEntropy, GpuContext, Logits, LossOutput, Reduction, Scorer, Targets,
    XentError,
};

use crate::npy::{Elem, NpyInput, PerRowWriter, same_file};
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
}

fn open_inputs(args: &ScoreArgs) -> Result<(Inputs, Option<Vec<f32>>), CliError> {
    if let Some(out) = &args.per_row {
        let inputs = [
            ("--logits", Some(&args.logits)),
            ("--targets", Some(&args.targets)),
        ];
        let weights = ("--weights", args.weights.as_ref());
        for (flag, input) in inputs.into_iter().chain([weights]) {
            if input.is_some_and(|input| same_file(out, input)) {
                return Err(CliError::input(format!(
                    "--per-row {}: is the {flag} file; xent does not write over its inputs",
                    out.display()
                )));
            }
        }
    }
    let logits = NpyInput::open("logits", &args.logits)?;
    if !logits.elem.is_float() {
        return Err(logits.error(format!(
            "expected float32 or float64 logits, found {}",
            logits.elem.name()
        )));
    }
    let &[rows, classes] = logits.shape.as_slice() else {
        return Err(logits.error(format!(
            "expected a 2-D array [N, C], found shape {:?}",
            logits.shape
        )));
    };
    if classes == 0 {
        return Err(logits.error("has 0 classes (shape [N, 0]); cross-entropy needs at least one"));
    }
    let targets = NpyInput::open("targets", &args.targets)?;
    let soft = targets.elem.is_float();
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
    Ok((
        Inputs {
            logits,
            targets,
            weights_label,
            rows,
            classes,
            soft,
        },
        weights,
    ))
}

/// Turns a library error into a CLI error naming the file or argument at fault; `row_offset`
/// makes row numbers count from the start of the file, not of the batch.
fn blame(e: XentError, inputs: &Inputs, row_offset: usize) -> CliError {
    match e {
        XentError::ClassIndexOutOfRange {
            row,
            value,
            classes,
            ignore_index,
        } => {
            let e = XentError::ClassIndexOutOfRange {
                row: row + row_offset,
                value,
                classes,
                ignore_index,
            };
            CliError::input(format!(
                "{}: {}",
                inputs.targets.label(),
                strip_role(&e, "targets")
            ))
        }
        XentError::TargetsShape { .. } => CliError::input(format!(
            "{}: {}",
            inputs.targets.label(),
            strip_role(&e, "targets")
        )),
        XentError::LogitsShape { .. } | XentError::NoClasses | XentError::RowTooLarge { .. } => {
            CliError::input(format!(
                "{}: {}",
                inputs.logits.label(),
                strip_role(&e, "logits")
            ))
        }
        XentError::WeightsLength { .. } | XentError::WeightNotFinite { .. } => {
            CliError::input(format!(
                "{}: {}",
                inputs.weights_label,
                strip_role(&e, "class weights")
            ))
        }
        XentError::LabelSmoothing(_) => CliError::input(format!("--label-smoothing: {e}")),
        XentError::IgnoreIndexWithProbabilities => CliError::input(format!(
            "--ignore-index: {e}; {} holds probabilities",
            inputs.targets.label()
        )),
        other => CliError::runtime(other.to_string()),
    }
}

fn strip_role(e: &XentError, role: &str) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("{role}: "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// `--batch-rows` as given, checked: at least 1.
fn requested_batch_rows(args: &ScoreArgs) -> Result<Option<usize>, CliError> {
    match args.batch_rows {
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
fn batch_rows(
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

/// What is kept across batches: running sums only, whatever the number of rows.
#[derive(Clone, Debug, PartialEq)]
struct Totals {
    reduction: Reduction,
    rows: usize,
    classes: usize,
    sum: f64,
    mean_denominator: f64,
    ignored_rows: usize,
    /// `Σ H(p̃_i)`, for probability targets without class weights.
    entropy_sum: Option<f64>,
    /// Why CE = H + KL is not shown although the entropy is known: the first target row that
    /// is not a probability distribution.
    not_distribution: Option<String>,
}

impl Totals {
    fn new(reduction: Reduction, classes: usize, with_entropy: bool) -> Self {
        Self {
            reduction,
            rows: 0,
            classes,
            sum: 0.0,
            mean_denominator: 0.0,
            ignored_rows: 0,
            entropy_sum: with_entropy.then_some(0.0),
            not_distribution: None,
        }
    }

    /// Adds one batch's output (its per-row values are not kept).
    fn add(&mut self, out: &LossOutput) {
        self.rows += out.rows;
        self.sum += out.sum;
        self.mean_denominator += out.mean_denominator;
        self.ignored_rows += out.ignored_rows;
        if let (Some(h), Some(more)) = (self.entropy_sum.as_mut(), out.entropy_sum) {
            *h += more;
        }
    }

    /// The reduced loss; `None` for reduction none.
    fn loss(&self) -> Option<f64> {
        self.reduction.apply(self.sum, self.mean_denominator)
    }

    /// PyTorch's mean, whatever the reduction.
    fn mean(&self) -> f64 {
        self.sum / self.mean_denominator
    }

    /// The entropy reduced like the loss, when every target row is a distribution.
    fn entropy(&self) -> Option<f64> {
        if self.not_distribution.is_some() {
            return None;
        }
        self.reduction
            .apply(self.entropy_sum?, self.mean_denominator)
    }

    /// `loss − entropy`, when the entropy is shown.
    fn kl_divergence(&self) -> Option<f64> {
        Some(self.loss()? - self.entropy()?)
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

pub fn run(args: &ScoreArgs) -> Result<(), CliError> {
    let requested = requested_batch_rows(args)?;
    let (mut inputs, weights) = open_inputs(args)?;
    let mut spec = CrossEntropy::new()
        .with_reduction(args.reduction)
        .with_label_smoothing(args.label_smoothing);
    if let Some(i) = args.ignore_index {
        spec = spec.with_ignore_index(i);
    }
    if let Some(w) = weights {
        spec = spec.with_weights(w);
    }
    // Check the options before any GPU work, against an empty batch of the right width.
    let (rows, classes, soft) = (inputs.rows, inputs.classes, inputs.soft);
    let none = Logits::new(&[], 0, classes).map_err(|e| blame(e, &inputs, 0))?;
    let empty_targets = if soft {
        Targets::Probabilities(&[])
    } else {
        Targets::ClassIndices(&[])
    };
    spec.validate(&none, &empty_targets)
        .map_err(|e| blame(e, &inputs, 0))?;

    let gpu;
    let (scorer, binding): (&dyn Scorer, Option<u64>) = if args.cpu {
        (&CpuReference, None)
    } else {
        gpu = GpuContext::new()?;
        let binding = gpu.facts().max_binding_bytes;
        (&gpu, Some(binding))
    };
    let batch_rows = batch_rows(classes, requested, binding).map_err(|e| blame(e, &inputs, 0))?;

    let mut per_row = match &args.per_row {
        Some(path) => Some(PerRowWriter::create(
            path,
            rows,
            inputs.logits.elem == Elem::F64,
        )?),
        None => None,
    };
    let start = Instant::now();
    let mut total = Totals::new(args.reduction, classes, soft && spec.weights().is_none());
    let mut progress: Option<ProgressBar> = None;
    let mut done = 0;
    while done < rows {
        let n = batch_rows.min(rows - done);
        let z = inputs.logits.read_f32(n * classes)?;
        let (labels, probabilities) = if soft {
            (Vec::new(), inputs.targets.read_f32(n * classes)?)
        } else {
            (inputs.targets.read_i64(n)?, Vec::new())
        };
        let targets = if soft {
            if total.entropy_sum.is_some() && total.not_distribution.is_none() {
                total.not_distribution = not_a_distribution(&probabilities, classes, done);
            }
            Targets::Probabilities(&probabilities)
        } else {
            Targets::ClassIndices(&labels)
        };
        let logits = Logits::new(&z, n, classes).map_err(|e| blame(e, &inputs, done))?;
        let out = scorer
            .cross_entropy(&spec, logits, targets)
            .map_err(|e| blame(e, &inputs, done))?;
        if let Some(writer) = per_row.as_mut() {
            writer.write(&out.per_row)?;
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
    if let Some(writer) = per_row {
        writer.finish()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    report(args, &total, &scorer.describe(), seconds)
}

/// A progress bar on stderr, only for a terminal and only once the job has run a second.
fn update_progress(
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

fn report(args: &ScoreArgs, total: &Totals, device: &str, seconds: f64) -> Result<(), CliError> {
    let reduction = match args.reduction {
        Reduction::None => "none",
        Reduction::Sum => "sum",
        Reduction::Mean => "mean",
    };
    let mut out = Out::lock();
    if args.json {
        let value = serde_json::json!({
            "loss": json_opt(total.loss()),
            "reduction": reduction,
            "sum": json_f64(total.sum),
            "mean": json_f64(total.mean()),
            "rows": total.rows,
            "classes": total.classes,
            "ignored_rows": total.ignored_rows,
            "entropy": json_opt(total.entropy()),
            "kl_divergence": json_opt(total.kl_divergence()),
            "decomposition_note": total.not_distribution,
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
            total.rows,
            if args.per_row.is_some() {
                " written"
            } else {
                "; --per-row OUT.npy writes them"
            },
            total.sum,
            total.mean()
        )?,
    }
    if let (Some(h), Some(kl)) = (total.entropy(), total.kl_divergence()) {
        outln!(out, "  = H(p) {h:.9} + KL(p‖q) {kl:.9}")?;
    }
    if let Some(why) = &total.not_distribution {
        outln!(
            out,
            "  H(p) and KL not shown: {why} (the targets are not probability distributions)"
        )?;
    }
    outln!(
        out,
        "rows: {}, classes: {}, ignored rows: {}",
        total.rows,
        total.classes,
        total.ignored_rows
    )?;
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
                        Targets::Probabilities(&p[from * classes..to * classes]),
                    )
                    .unwrap()
            };
            let whole = score(0, rows);
            let mut total = Totals::new(reduction, classes, true);
            for (from, to) in [(0, 3), (3, 6), (6, 7)] {
                total.add(&score(from, to));
            }
            assert_eq!(total.rows, rows);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(close(total.sum, whole.sum));
            assert!(close(total.mean(), whole.mean()));
            assert_eq!(total.loss().is_none(), whole.loss.is_none());
            assert!(close(
                total.entropy().unwrap_or(0.0),
                whole.reduced_entropy().unwrap_or(0.0)
            ));
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
        let mut totals = Totals::new(Reduction::Mean, 2, true);
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
