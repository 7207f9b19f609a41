//! `xent score`: a .npy batch of any size, streamed through the GPU (or the CPU reference) in
//! batches of rows that fit one binding, combined into one result.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use xent::{
    CpuReference, CrossEntropy, GpuContext, Logits, LossOutput, Reduction, Scorer, Targets,
    XentError,
};

use crate::npy::NpyInput;
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

pub fn run(args: &ScoreArgs) -> Result<(), CliError> {
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
    let (scorer, binding): (&dyn Scorer, u64) = if args.cpu {
        (&CpuReference, MAX_BATCH_BYTES)
    } else {
        gpu = GpuContext::new()?;
        let binding = gpu.facts().max_binding_bytes;
        (&gpu, binding)
    };
    let row_bytes = classes as u64 * 4;
    let fits = (binding.min(MAX_BATCH_BYTES) / row_bytes) as usize;
    let batch_rows = args.batch_rows.map_or(fits, |b| (b as usize).min(fits));
    if batch_rows == 0 {
        let e = XentError::RowTooLarge {
            classes,
            row_bytes,
            limit: binding,
        };
        return Err(blame(e, &inputs, 0));
    }

    let start = Instant::now();
    let mut total = LossOutput::empty(args.reduction, classes, soft && spec.weights().is_none());
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
            Targets::Probabilities(&probabilities)
        } else {
            Targets::ClassIndices(&labels)
        };
        let logits = Logits::new(&z, n, classes).map_err(|e| blame(e, &inputs, done))?;
        let out = scorer
            .cross_entropy(&spec, logits, targets)
            .map_err(|e| blame(e, &inputs, done))?;
        total.append(out);
        done += n;
        progress = update_progress(progress, start.elapsed(), done, rows);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let seconds = start.elapsed().as_secs_f64();

    if let Some(path) = &args.per_row {
        crate::npy::write_per_row(
            path,
            &total.per_row,
            inputs.logits.elem == crate::npy::Elem::F64,
        )?;
    }
    report(args, &total, &scorer.describe(), seconds);
    Ok(())
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

fn report(args: &ScoreArgs, out: &LossOutput, device: &str, seconds: f64) {
    let reduction = match args.reduction {
        Reduction::None => "none",
        Reduction::Sum => "sum",
        Reduction::Mean => "mean",
    };
    if args.json {
        let value = serde_json::json!({
            "loss": out.loss,
            "reduction": reduction,
            "sum": out.sum,
            "mean": out.mean(),
            "rows": out.rows,
            "classes": out.classes,
            "ignored_rows": out.ignored_rows,
            "entropy": out.reduced_entropy(),
            "kl_divergence": out.reduced_kl_divergence(),
            "device": device,
            "seconds": seconds,
        });
        println!("{value}");
        return;
    }
    match out.loss {
        Some(loss) => println!("loss ({reduction}): {loss:.9}"),
        None => println!(
            "loss (none): {} per-row losses{} (sum {:.9}, mean {:.9})",
            out.rows,
            if args.per_row.is_some() {
                " written"
            } else {
                "; --per-row OUT.npy writes them"
            },
            out.sum,
            out.mean()
        ),
    }
    if let (Some(h), Some(kl)) = (out.reduced_entropy(), out.reduced_kl_divergence()) {
        println!("  = H(p) {h:.9} + KL(p‖q) {kl:.9}");
    }
    println!(
        "rows: {}, classes: {}, ignored rows: {}",
        out.rows, out.classes, out.ignored_rows
    );
    println!("device: {device}");
    println!("time: {:.3} s", seconds);
}
