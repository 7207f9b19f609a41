//! What the streamed scoring commands share beyond the dense cross-entropy's own loop: the
//! engine and its batch size, `--grad-output`, and the per-row and gradient files of the
//! distillation and top-k losses, whose mean is N's ("batchmean").

use xent::{ElementVec, GpuContext, Reduction, Scorer, Upstream};

use crate::npy::{Elem, NpyWriter};
use crate::score::{OpenLogits, batch_rows};
use crate::{CliError, ScoreArgs};

/// `--grad-output`, checked: finite, 1 by default.
pub fn grad_output(given: Option<f64>) -> Result<f64, CliError> {
    match given {
        Some(g) if !g.is_finite() => Err(CliError::input(format!(
            "--grad-output {g}: must be finite"
        ))),
        g => Ok(g.unwrap_or(1.0)),
    }
}

/// The GPU (none with `cpu`) and the rows per batch for logits of `logits.classes`.
pub fn engine(
    cpu: bool,
    logits: &OpenLogits,
    requested: Option<usize>,
) -> Result<(Option<GpuContext>, usize), CliError> {
    let gpu = if cpu { None } else { Some(GpuContext::new()?) };
    let binding = gpu.as_ref().map(|g| g.facts().max_binding_bytes);
    let batch = batch_rows(logits.classes, requested, binding)
        .map_err(|e| logits.file.error(e.to_string()))?;
    Ok((gpu, batch))
}

/// What computes, in words.
pub fn describe(gpu: Option<&GpuContext>) -> String {
    match gpu {
        Some(gpu) => gpu.describe(),
        None => xent::CpuReference.describe(),
    }
}

/// The per-row losses and gradient files of a loss whose mean divides by N, and the upstream
/// gradient of each batch.
pub struct Outputs {
    per_row: Option<NpyWriter>,
    grad: Option<NpyWriter>,
    reduction: Reduction,
    grad_output: f64,
    rows: usize,
    ones: Vec<f64>,
}

impl Outputs {
    /// Creates the files `--per-row` and `--grad` name, for `logits` scored in batches of
    /// `batch` rows.
    pub fn create(args: &ScoreArgs, logits: &OpenLogits, batch: usize) -> Result<Self, CliError> {
        let (rows, classes) = (logits.rows, logits.classes);
        let per_row = match &args.per_row {
            Some(path) => Some(NpyWriter::create(
                "--per-row",
                path,
                &[rows],
                logits.file.elem == Elem::F64,
            )?),
            None => None,
        };
        let grad = match &args.grad {
            Some(path) => Some(NpyWriter::create_as(
                "--grad",
                path,
                &[rows, classes],
                logits.dtype,
            )?),
            None => None,
        };
        let grad_output = grad_output(args.grad_output)?;
        Ok(Self {
            per_row,
            grad,
            reduction: args.reduction,
            grad_output,
            rows,
            ones: vec![grad_output; batch.min(rows)],
        })
    }

    /// The upstream gradient of a batch of `n` rows, when a gradient is asked for: the mean
    /// is over the whole file, whatever the batch.
    pub fn upstream(&self, n: usize) -> Option<Upstream<'_>> {
        self.grad.as_ref()?;
        let g = self.grad_output;
        Some(match self.reduction {
            Reduction::None => Upstream::PerRow(&self.ones[..n]),
            Reduction::Sum => Upstream::Scalar(g),
            Reduction::Mean => Upstream::MeanOver {
                grad: g,
                denominator: self.rows as f64,
                counted_rows: self.rows as f64,
            },
        })
    }

    /// Writes one batch's per-row losses and gradient.
    pub fn write(&mut self, per_row: &[f64], grad: Option<ElementVec>) -> Result<(), CliError> {
        if let Some(writer) = self.per_row.as_mut() {
            writer.write(per_row)?;
        }
        if let (Some(writer), Some(g)) = (self.grad.as_mut(), grad) {
            writer.write_values(&g)?;
        }
        Ok(())
    }

    /// Completes both files (each replaces its destination only now).
    pub fn finish(self) -> Result<(), CliError> {
        NpyWriter::finish_all(self.per_row.into_iter().chain(self.grad))
    }
}
