//! `xent score --teacher`: a distillation loss between the logits (the student's) and a
//! teacher's, streamed in batches like the cross-entropy: per row p = softmax(teacher / T),
//! q = softmax(logits / T). Only running sums are kept; per-row losses and the gradient
//! stream to their files.

use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use xent::scoring::{self, Distillation, DistillationOutput, DistillationTerms, Divergence};
use xent::{ElementVec, Logits, XentError};

use crate::npy::NpyInput;
use crate::out::{Out, json_f64, json_opt, outln};
use crate::score::{check_outputs, checked_batch_rows, open_logits, update_progress};
use crate::stream::{self, Outputs};
use crate::{CliError, ScoreArgs};

/// `--divergence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DivergenceChoice {
    /// The cross-entropy H(p) + KL(p‖q).
    Kl,
    /// KL(q‖p).
    ReverseKl,
    /// The generalised Jensen–Shannon divergence with --beta.
    Jsd,
}

/// The running sums across batches.
#[derive(Default)]
struct Sums {
    loss: f64,
    entropy: f64,
    kl: f64,
    rows: usize,
}

impl Sums {
    fn add(&mut self, out: &DistillationOutput) {
        self.loss += out.sum;
        if let DistillationTerms::CrossEntropy { entropy, kl } = &out.terms {
            self.entropy += entropy.iter().sum::<f64>();
            self.kl += kl.iter().sum::<f64>();
        }
        self.rows += out.rows;
    }
}

/// A spec error, naming the argument at fault.
fn blame(e: XentError, teacher: &NpyInput, student: &NpyInput, first_row: usize) -> CliError {
    match e.with_row_offset(first_row) {
        e @ XentError::Temperature(_) => CliError::input(format!("--temperature: {e}")),
        e @ XentError::JsdBeta(_) => CliError::input(format!("--beta: {e}")),
        e @ XentError::TargetsShape { .. } => teacher.error(e.to_string()),
        XentError::LogitOutOfRange { row } => CliError::input(format!(
            "{} or {}: row {row}: a finite logit beyond ±2^64",
            student.label(),
            teacher.label(),
        )),
        other => CliError::from(other),
    }
}

pub fn run(args: &ScoreArgs, teacher_path: &Path) -> Result<(), CliError> {
    check_outputs(args)?;
    let requested = checked_batch_rows(args.batch_rows)?;
    let mut student = open_logits(&args.logits, args.logits_dtype)?;
    let (rows, classes) = (student.rows, student.classes);
    let mut teacher = NpyInput::open("teacher", teacher_path)?;
    if !teacher.elem.is_float() || teacher.shape != [rows, classes] {
        return Err(teacher.error(format!(
            "expected float teacher logits shaped like {}, [{rows}, {classes}]; found {} of shape {:?}",
            student.file.label(),
            teacher.elem.name(),
            teacher.shape
        )));
    }
    let divergence = match args.divergence.unwrap_or(DivergenceChoice::Kl) {
        DivergenceChoice::Kl => Divergence::ForwardKl,
        DivergenceChoice::ReverseKl => Divergence::ReverseKl,
        DivergenceChoice::Jsd => Divergence::Jsd {
            beta: args.beta.unwrap_or(0.5),
        },
    };
    if args.beta.is_some() && !matches!(divergence, Divergence::Jsd { .. }) {
        return Err(CliError::input(
            "--beta: is the weight of --divergence jsd only",
        ));
    }
    let spec = Distillation::new()
        .with_temperature(args.temperature.unwrap_or(1.0))
        .with_divergence(divergence)
        .with_t2_scale(args.t2_scale)
        .with_reduction(args.reduction);
    let none = Logits::new::<f32>(&[], 0, classes)?;
    spec.validate(&none, &[])
        .map_err(|e| blame(e, &teacher, &student.file, 0))?;
    let (gpu, batch) = stream::engine(args.cpu, &student, requested)?;
    let mut outputs = Outputs::create(args, &student, batch)?;
    let start = Instant::now();
    let mut sums = Sums::default();
    let mut progress: Option<ProgressBar> = None;
    while sums.rows < rows {
        let first = sums.rows;
        let n = batch.min(rows - first);
        let z = student.file.read_values(n * classes, student.bits_as)?;
        let t = teacher.read_f32(n * classes)?;
        let logits = Logits::from_elements(z.as_elements(), n, classes)?;
        let result = match (&gpu, outputs.upstream(n)) {
            (Some(gpu), None) => gpu.distillation(&spec, logits, &t).map(|o| (o, None)),
            (Some(gpu), Some(up)) => gpu
                .distillation_grad(&spec, logits, &t, up)
                .map(|(o, g)| (o, Some(g))),
            (None, None) => scoring::distillation(&spec, logits, &t).map(|o| (o, None)),
            (None, Some(up)) => scoring::distillation_grad(&spec, logits, &t, up)
                .map(|(o, g)| (o, Some(ElementVec::rounded(logits.dtype(), g)))),
        };
        let (out, gradient) = result.map_err(|e| blame(e, &teacher, &student.file, first))?;
        outputs.write(&out.per_row, gradient)?;
        sums.add(&out);
        progress = update_progress(progress, start.elapsed(), sums.rows, rows);
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    student.file.finish()?;
    teacher.finish()?;
    outputs.finish()?;
    let device = stream::describe(gpu.as_ref());
    report(
        args,
        &spec,
        &sums,
        classes,
        &device,
        start.elapsed().as_secs_f64(),
    )
}

fn report(
    args: &ScoreArgs,
    spec: &Distillation,
    sums: &Sums,
    classes: usize,
    device: &str,
    seconds: f64,
) -> Result<(), CliError> {
    let reduction = spec.reduction();
    let n = sums.rows as f64;
    let forward = spec.divergence() == Divergence::ForwardKl;
    let loss = reduction.apply(sums.loss, n);
    let (entropy, kl) = if forward {
        (
            reduction.apply(sums.entropy, n),
            reduction.apply(sums.kl, n),
        )
    } else {
        (None, None)
    };
    let divergence = match spec.divergence() {
        Divergence::ForwardKl => "kl".to_string(),
        Divergence::ReverseKl => "reverse-kl".to_string(),
        Divergence::Jsd { beta } => format!("jsd (beta {beta})"),
    };
    let mut out = Out::lock();
    if args.json {
        let value = serde_json::json!({
            "loss": json_opt(loss),
            "reduction": reduction.name(),
            "sum": json_f64(sums.loss),
            "mean": json_f64(sums.loss / n),
            "kl_divergence": json_opt(kl),
            "entropy": json_opt(entropy),
            "divergence": divergence,
            "temperature": json_f64(spec.temperature()),
            "t2_scale": spec.t2_scale(),
            "rows": sums.rows,
            "classes": classes,
            "device": device,
            "seconds": json_f64(seconds),
        });
        outln!(out, "{value}")?;
        return out.finish();
    }
    match loss {
        Some(l) => outln!(
            out,
            "distillation loss ({}, {divergence}): {l:.9}",
            reduction.name()
        )?,
        None => outln!(
            out,
            "distillation loss (none, {divergence}): {} per-row losses (sum {:.9}, mean {:.9})",
            sums.rows,
            sums.loss,
            sums.loss / n
        )?,
    }
    if let (Some(h), Some(kl)) = (entropy, kl) {
        outln!(out, "  = H(p) {h:.9} + KL(p‖q) {kl:.9}")?;
    }
    outln!(
        out,
        "temperature {}{}, rows: {}, classes: {classes}",
        spec.temperature(),
        if spec.t2_scale() {
            " (scaled by T²)"
        } else {
            ""
        },
        sums.rows
    )?;
    if let Some(path) = &args.grad {
        outln!(out, "gradient written to {}", path.display())?;
    }
    outln!(out, "device: {device}")?;
    outln!(out, "time: {seconds:.3} s")?;
    out.finish()
}
