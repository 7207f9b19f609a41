//! `xent score --topk-indices I.npy --topk-probs P.npy`: cross-entropy against top-k sparse
//! targets (a teacher stored sparsely), streamed in batches like the dense loss.

use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use xent::scoring::{self, SparseTargets};
use xent::{ElementVec, GpuContext, Logits, Reduction, Scorer, Upstream, XentError};

use crate::npy::{Elem, NpyInput, NpyWriter};
use crate::out::{Out, json_f64, json_opt, outln};
use crate::score::{batch_rows, check_outputs, checked_batch_rows, open_logits, update_progress};
use crate::{CliError, ScoreArgs};

/// An error of the targets, naming the file at fault and the row within the whole file.
fn blame(e: XentError, indices: &NpyInput, first_row: usize) -> CliError {
    match e {
        XentError::SparseIndexOutOfRange {
            row,
            value,
            classes,
        } => indices.error(format!(
            "row {} has class index {value}, outside [0, {classes})",
            first_row + row
        )),
        XentError::SparseDuplicateIndex { row, class } => indices.error(format!(
            "row {} names class {class} more than once",
            first_row + row
        )),
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
        &[n, k] if n == rows && !indices.elem.is_float() => k,
        _ => {
            return Err(indices.error(format!(
                "expected integer class indices [N, k] with N = {rows} (the rows of {}); found {} of shape {:?}",
                logits.file.label(),
                indices.elem.name(),
                indices.shape
            )));
        }
    };
    let mut probabilities = NpyInput::open("top-k probabilities", probs_path)?;
    if !probabilities.elem.is_float() || probabilities.shape != [rows, k] {
        return Err(probabilities.error(format!(
            "expected float probabilities shaped like {}, [{rows}, {k}]; found {} of shape {:?}",
            indices.label(),
            probabilities.elem.name(),
            probabilities.shape
        )));
    }
    let grad_output = match args.grad_output {
        Some(g) if !g.is_finite() => {
            return Err(CliError::input(format!(
                "--grad-output {g}: must be finite"
            )));
        }
        g => g.unwrap_or(1.0),
    };
    let gpu = if args.cpu {
        None
    } else {
        Some(GpuContext::new()?)
    };
    let binding = gpu.as_ref().map(|g| g.facts().max_binding_bytes);
    let batch =
        batch_rows(classes, requested, binding).map_err(|e| logits.file.error(e.to_string()))?;
    let mut per_row = match &args.per_row {
        Some(path) => Some(NpyWriter::create(
            "--per-row",
            path,
            &[rows],
            logits.file.elem == Elem::F64,
        )?),
        None => None,
    };
    let mut grad = match &args.grad {
        Some(path) => Some(NpyWriter::create_as(
            "--grad",
            path,
            &[rows, classes],
            logits.dtype,
        )?),
        None => None,
    };
    let per_row_upstream = vec![grad_output; batch.min(rows)];
    let upstream = |n: usize| match args.reduction {
        Reduction::None => Upstream::PerRow(&per_row_upstream[..n]),
        Reduction::Sum => Upstream::Scalar(grad_output),
        Reduction::Mean => Upstream::MeanOver {
            grad: grad_output,
            denominator: rows as f64,
            counted_rows: rows as f64,
        },
    };
    let start = Instant::now();
    let (mut sum, mut done) = (0.0, 0);
    let mut progress: Option<ProgressBar> = None;
    while done < rows {
        let n = batch.min(rows - done);
        let z = logits.file.read_values(n * classes, logits.bits_as)?;
        let idx = indices.read_i64(n * k)?;
        let p = probabilities.read_f32(n * k)?;
        let z = Logits::from_elements(z.as_elements(), n, classes)?;
        let targets = SparseTargets::new(&idx, &p, k);
        let result = match (&gpu, grad.is_some()) {
            (Some(gpu), false) => gpu
                .sparse_cross_entropy(args.reduction, z, targets)
                .map(|o| (o, None)),
            (Some(gpu), true) => gpu
                .sparse_cross_entropy_grad(args.reduction, z, targets, upstream(n))
                .map(|(o, g)| (o, Some(g))),
            (None, false) => {
                scoring::sparse_cross_entropy(args.reduction, z, targets).map(|o| (o, None))
            }
            (None, true) => {
                scoring::sparse_cross_entropy_grad(args.reduction, z, targets, upstream(n))
                    .map(|(o, g)| (o, Some(ElementVec::rounded(z.dtype(), g))))
            }
        };
        let (out, gradient) = result.map_err(|e| blame(e, &indices, done))?;
        if let Some(writer) = per_row.as_mut() {
            writer.write(&out.per_row)?;
        }
        if let (Some(writer), Some(g)) = (grad.as_mut(), gradient) {
            writer.write_values(&g)?;
        }
        sum += out.sum;
        done += n;
        progress = update_progress(progress, start.elapsed(), done, rows);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    logits.file.finish()?;
    indices.finish()?;
    probabilities.finish()?;
    if let Some(writer) = per_row {
        writer.finish()?;
    }
    if let Some(writer) = grad {
        writer.finish()?;
    }
    let device = match &gpu {
        Some(gpu) => gpu.describe(),
        None => xent::CpuReference.describe(),
    };
    let seconds = start.elapsed().as_secs_f64();
    let loss = args.reduction.apply(sum, rows as f64);
    let mut out = Out::lock();
    if args.json {
        let value = serde_json::json!({
            "loss": json_opt(loss),
            "reduction": args.reduction.name(),
            "sum": json_f64(sum),
            "mean": json_f64(sum / rows as f64),
            "rows": rows,
            "classes": classes,
            "k": k,
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
            "top-{k} loss (none): {rows} per-row losses (sum {sum:.9}, mean {:.9})",
            sum / rows as f64
        )?,
    }
    outln!(out, "rows: {rows}, classes: {classes}, k: {k}")?;
    if let Some(path) = &args.grad {
        outln!(out, "gradient written to {}", path.display())?;
    }
    outln!(out, "device: {device}")?;
    outln!(out, "time: {seconds:.3} s")?;
    out.finish()
}
