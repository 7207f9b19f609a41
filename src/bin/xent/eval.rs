//! `xent eval`: lm-evaluation-harness's `loglikelihood` requests scored from logits already
//! computed. The tokens of one continuation are consecutive rows; per sequence come the sum of
//! its tokens' log-probabilities, whether greedy decoding gives it (`is_greedy`), its token
//! count and perplexity; with questions, multiple choice `acc` and `acc_norm`. The logits
//! stream through the GPU (or the f64 reference) in batches, one pass each; sequences may
//! span batches.

use std::path::Path;
use std::time::Instant;

use xent::scoring::{self, MultipleChoiceOutput, SequenceScore, TokenRow};
use xent::{Logits, XentError};

use crate::npy::NpyInput;
use crate::out::{Out, json_f64, outln};
use crate::score::{checked_batch_rows, open_logits};
use crate::stream;
use crate::{CliError, EvalArgs};

/// Reads a 1-D file of `what` (non-negative integers) of `expected` values, or of any length;
/// returns them and the file's label for later errors.
fn read_counts(
    role: &'static str,
    path: &Path,
    expected: Option<usize>,
    what: &str,
) -> Result<(Vec<usize>, String), CliError> {
    let mut file = NpyInput::open(role, path)?;
    let &[n] = file.shape.as_slice() else {
        return Err(file.error(format!(
            "expected a 1-D array of {what}, found shape {:?}",
            file.shape
        )));
    };
    if let Some(want) = expected.filter(|&want| want != n) {
        return Err(file.error(format!("expected {want} {what}, found {n}")));
    }
    let values = file.read_i64(n)?;
    file.finish()?;
    let counts = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            usize::try_from(v).map_err(|_| file.error(format!("value {i} is {v}; {what} are ≥ 0")))
        })
        .collect::<Result<_, _>>()?;
    Ok((counts, file.label()))
}

pub fn run(args: &EvalArgs) -> Result<(), CliError> {
    let requested = checked_batch_rows(args.batch_rows)?;
    let mut logits = open_logits(&args.logits, None)?;
    let (rows, classes) = (logits.rows, logits.classes);
    let mut targets = NpyInput::open("targets", &args.targets)?;
    if targets.elem.is_float() || targets.shape != [rows] {
        return Err(targets.error(format!(
            "expected one integer token per row of {}, shape [{rows}]; found {} of shape {:?}",
            logits.file.label(),
            targets.elem.name(),
            targets.shape
        )));
    }
    let (offsets, offsets_label) = read_counts("offsets", &args.offsets, None, "row offsets")?;
    let sequences = offsets.len().saturating_sub(1);
    let questions = match (&args.choices, &args.lengths, &args.gold) {
        (Some(q), Some(l), Some(g)) => {
            let question = read_counts("choices", q, Some(sequences), "question ids")?.0;
            let lengths = read_counts("lengths", l, Some(sequences), "lengths")?.0;
            let gold = read_counts("gold", g, None, "gold choices")?.0;
            Some((question, lengths, gold))
        }
        _ => None,
    };

    let (gpu, batch) = stream::engine(args.cpu, &logits, requested)?;
    let start = Instant::now();
    let mut tokens: Vec<TokenRow> = Vec::with_capacity(rows);
    while tokens.len() < rows {
        let first = tokens.len();
        let n = batch.min(rows - first);
        let z = logits.file.read_values(n * classes, logits.bits_as)?;
        let y = targets.read_i64(n)?;
        let z = Logits::from_elements(z.as_elements(), n, classes)?;
        let metrics = match &gpu {
            Some(gpu) => gpu.token_metrics(z, &y, None, 1),
            None => scoring::token_metrics(z, &y, None, 1),
        };
        let metrics = metrics.map_err(|e| match e.with_row_offset(first) {
            XentError::ClassIndexOutOfRange { row, value, .. } => targets.error(format!(
                "row {row} has token {value}, outside [0, {classes})"
            )),
            other => CliError::from(other),
        })?;
        tokens.extend(metrics.rows);
    }
    logits.file.finish()?;
    targets.finish()?;
    let scores = scoring::sequences_from_tokens(&tokens, &offsets)
        .map_err(|e| CliError::input(format!("{offsets_label}: {e}")))?;
    let choice = match &questions {
        Some((question, lengths, gold)) => Some(
            scoring::multiple_choice(&scores, question, lengths, gold)
                .map_err(|e| CliError::input(format!("--choices, --lengths, --gold: {e}")))?,
        ),
        None => None,
    };
    let device = stream::describe(gpu.as_ref());
    report(
        args,
        &scores,
        choice.as_ref(),
        &device,
        start.elapsed().as_secs_f64(),
    )
}

fn report(
    args: &EvalArgs,
    scores: &[SequenceScore],
    choice: Option<&MultipleChoiceOutput>,
    device: &str,
    seconds: f64,
) -> Result<(), CliError> {
    let mut out = Out::lock();
    for (s, score) in scores.iter().enumerate() {
        if args.json {
            let line = serde_json::json!({
                "sequence": s,
                "loglikelihood": json_f64(score.loglikelihood),
                "is_greedy": score.is_greedy,
                "tokens": score.tokens,
                "perplexity": json_f64(score.perplexity()),
            });
            outln!(out, "{line}")?;
        } else {
            outln!(
                out,
                "sequence {s}: loglikelihood {:.9}, is_greedy {}, tokens {}, perplexity {:.6}",
                score.loglikelihood,
                score.is_greedy,
                score.tokens,
                score.perplexity()
            )?;
        }
    }
    if let Some(choice) = choice {
        for (q, o) in choice.questions.iter().enumerate() {
            if args.json {
                let line = serde_json::json!({
                    "question": q,
                    "acc": o.acc,
                    "acc_norm": o.acc_norm,
                    "predicted": o.predicted,
                    "predicted_norm": o.predicted_norm,
                    "gold": o.gold,
                    "choices": o.choices,
                });
                outln!(out, "{line}")?;
            } else {
                outln!(
                    out,
                    "question {q}: acc {}, acc_norm {} (choice {} by loglikelihood, {} per character; gold {} of {})",
                    o.acc as u8,
                    o.acc_norm as u8,
                    o.predicted,
                    o.predicted_norm,
                    o.gold,
                    o.choices
                )?;
            }
        }
    }
    let (acc, acc_norm) = choice.map_or((None, None), |c| (Some(c.acc()), Some(c.acc_norm())));
    if args.json {
        let line = serde_json::json!({
            "sequences": scores.len(),
            "questions": choice.map(|c| c.questions.len()),
            "acc": acc.map(json_f64),
            "acc_norm": acc_norm.map(json_f64),
            "device": device,
            "seconds": json_f64(seconds),
        });
        outln!(out, "{line}")?;
    } else {
        if let (Some(acc), Some(acc_norm), Some(c)) = (acc, acc_norm, choice) {
            outln!(
                out,
                "acc {acc:.6}, acc_norm {acc_norm:.6} over {} questions",
                c.questions.len()
            )?;
        }
        outln!(out, "sequences: {}", scores.len())?;
        outln!(out, "device: {device}")?;
        outln!(out, "time: {seconds:.3} s")?;
    }
    out.finish()
}
