//! `xent score --topk-indices I.npy --topk-probs P.npy`: cross-entropy against top-k sparse
//! targets (a teacher stored sparsely), streamed in batches like the dense loss.

use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use xent::scoring::{self, SparseTargets};
use xent::{CrossEntropy, ElementVec, Logits, LossTotals, XentError};

use crate::npy::NpyInput;
use crate::out::{Out, json_f64, json_opt, outln};
use crate::score::{check_outputs, checked_batch_rows, logits_error, open_logits, update_progress};
use crate::stream::{self, Outputs};
use crate::{CliError, ScoreArgs};

/// An error of the targets or the logits, naming the file at fault and the row within the
/// whole file.
fn blame(e: XentError, logits: &NpyInput, indices: &NpyInput, first_row: usize) -> CliError {
    match e.with_row_offset(first_row) {
        e @ XentError::LogitOutOfRange { .. } => logits_error(logits, &e),
        e @ XentError::ZLoss(_) => CliError::input(format!("--z-loss: {e}")),
        e @ XentError::Softcap(_) => CliError::input(format!("--softcap: {e}")),
        XentError::SparseIndexOutOfRange {
            row,
            value,
            classes,
        } => indices.error(format!(
            "row {row} has class index {value}, outside [0, {classes})"
        )),
        e @ XentError::SparseK { .. } => indices.error(format!("{e}; --cpu scores any k")),
        XentError::SparseDuplicateIndex { row, class } => {
            indices.error(format!("row {row} names class {class} more than once"))
        }
        other => CliError::from(other),
    }
}

pub fn run(args: &ScoreArgs, indices_path: &Path, probs_path: &Path) -> Result<(), CliError> {
    check_outputs(args)?;
    let requested = checked_batch_rows(args.batch_rows)?;
    let mut logits = open_logits(&args.logits, args.logits_dtype)?;
    let (rows, classes) = (logits.rows, logits.classes);
    let mut indices = NpyInput::open("top-k indices", indices_path)?;
    let k = match indices.shape.as_slice() {
        &[n, k] if n == rows && indices.elem.is_int() => k,
        _ => {
            return Err(indices.error(format!(
                "expected class indices (int64 or int32) [N, k] with N = {rows} (the rows of {}); found {} of shape {:?}",
                logits.file.label(),
                indices.elem.name(),
                indices.shape
            )));
        }
    };
    if k == 0 {
        return Err(indices.error(format!(
            "has shape {:?}: k = 0 classes per row; top-k targets need at least one",
            indices.shape
        )));
    }
    let mut probabilities = NpyInput::open("top-k probabilities", probs_path)?;
    if !probabilities.elem.is_float() || probabilities.shape != [rows, k] {
        return Err(probabilities.error(format!(
            "expected float probabilities shaped like {}, [{rows}, {k}]; found {} of shape {:?}",
            indices.label(),
            probabilities.elem.name(),
            probabilities.shape
        )));
    }
    let mut spec = CrossEntropy::new()
        .with_reduction(args.reduction)
        .with_z_loss(args.z_loss);
    if let Some(cap) = args.softcap {
        spec = spec.with_softcap(cap);
    }
    spec.validate_sparse_options(classes)
        .map_err(|e| blame(e, &logits.file, &indices, 0))?;
    let (gpu, batch) = stream::engine(args.cpu, &logits, requested)?;
    let mut outputs = Outputs::create(args, &logits, batch)?;
    let start = Instant::now();
    let mut total = LossTotals::empty(args.reduction, classes, false, spec.z_loss() > 0.0);
    let mut done = 0;
    let mut progress: Option<ProgressBar> = None;
    while done < rows {
        let n = batch.min(rows - done);
        let z = logits.file.read_values(n * classes, logits.bits_as)?;
        let idx = indices.read_i64(n * k)?;
        let p = probabilities.read_f32(n * k)?;
        let z = Logits::from_elements(z.as_elements(), n, classes)?;
        let targets = SparseTargets::new(&idx, &p, k);
        let result = match (&gpu, outputs.upstream(n)) {
            (Some(gpu), None) => gpu
                .sparse_cross_entropy(&spec, z, targets)
                .map(|o| (o, None)),
            (Some(gpu), Some(up)) => gpu
                .sparse_cross_entropy_grad(&spec, z, targets, up)
                .map(|(o, g)| (o, Some(g))),
            (None, None) => scoring::sparse_cross_entropy(&spec, z, targets).map(|o| (o, None)),
            (None, Some(up)) => scoring::sparse_cross_entropy_grad(&spec, z, targets, up)
                .map(|(o, g)| (o, Some(ElementVec::rounded(z.dtype(), g)))),
        };
        let (out, gradient) = result.map_err(|e| blame(e, &logits.file, &indices, done))?;
        outputs.write(&out.per_row, gradient)?;
        total.add(&out.totals());
        done += n;
        progress = update_progress(progress, start.elapsed(), done, rows);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    logits.file.finish()?;
    indices.finish()?;
    probabilities.finish()?;
    outputs.finish()?;
    let device = stream::describe(gpu.as_ref());
    let seconds = start.elapsed().as_secs_f64();
    let (loss, sum, mean) = (total.reduced_loss(), total.sum, total.mean());
    let mut out = Out::lock();
    if args.json {
        let value = serde_json::json!({
            "loss": json_opt(loss),
            "reduction": args.reduction.name(),
            "sum": json_f64(sum),
            "mean": json_f64(mean),
            "rows": rows,
            "classes": classes,
            "k": k,
            "z_loss": json_opt(total.reduced_z_loss()),
            "z_loss_sum": json_opt(total.z_loss_sum),
            "device": device,
            "seconds": json_f64(seconds),
        });
        outln!(out, "{value}")?;
        return out.finish();
    }
    match loss {
        Some(l) => outln!(out, "top-{k} loss ({}): {l:.9}", args.reduction.name())?,
        None => outln!(
            out,
            "top-{k} loss (none): {rows} per-row losses (sum {sum:.9}, mean {mean:.9})"
        )?,
    }
    match (total.reduced_z_loss(), total.z_loss_sum) {
        (Some(z), _) => outln!(out, "  of which z-loss: {z:.9}")?,
        (None, Some(z)) => outln!(
            out,
            "  of which z-loss: sum {z:.9}, mean {:.9}",
            z / rows as f64
        )?,
        (None, None) => {}
    }
    outln!(out, "rows: {rows}, classes: {classes}, k: {k}")?;
    if let Some(path) = &args.grad {
        outln!(out, "gradient written to {}", path.display())?;
    }
    outln!(out, "device: {device}")?;
    outln!(out, "time: {seconds:.3} s")?;
    out.finish()
}
