//! `xent eval`: lm-evaluation-harness's `loglikelihood` requests scored from logits already
//! computed. The tokens of one continuation are consecutive rows; per sequence come the sum of
//! its tokens' log-probabilities, whether greedy decoding gives it (`is_greedy`), its token
//! count and perplexity; over all sequences, the harness's `perplexity` (exp of minus the mean
//! log-likelihood), the per-token perplexity and the fraction greedy; with questions, multiple
//! choice `acc` and `acc_norm`. The logits stream through the GPU (or the f64 reference) in
//! batches, one pass each; sequences may span batches.

use std::path::Path;
use std::time::Instant;

use xent::scoring::{self, MultipleChoiceOutput, SequenceScore, TokenRow};
use xent::{Logits, XentError};

use crate::npy::NpyInput;
use crate::out::{Out, json_f64, json_opt, outln};
use crate::score::{checked_batch_rows, logits_error, open_logits};
use crate::stream;
use crate::{CliError, EvalArgs};

/// Reads a 1-D file of `what` (integers at least `min`: 0 or 1) of `expected` values, or of
/// any length; returns them and the file's label for later errors.
fn read_counts(
    role: &'static str,
    path: &Path,
    expected: Option<usize>,
    what: &str,
    min: usize,
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
            usize::try_from(v)
                .ok()
                .filter(|&n| n >= min)
                .ok_or_else(|| file.error(format!("value {i} is {v}; {what} are ≥ {min}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((counts, file.label()))
}

pub fn run(args: &EvalArgs) -> Result<(), CliError> {
    let requested = checked_batch_rows(args.batch_rows)?;
    let mut logits = open_logits(&args.logits, None)?;
    let (rows, classes) = (logits.rows, logits.classes);
    let mut targets = NpyInput::open("targets", &args.targets)?;
    if !targets.elem.is_int() || targets.shape != [rows] {
        return Err(targets.error(format!(
            "expected one token (int64 or int32) per row of {}, shape [{rows}]; found {} of shape {:?}",
            logits.file.label(),
            targets.elem.name(),
            targets.shape
        )));
    }
    let (offsets, offsets_label) = read_counts("offsets", &args.offsets, None, "row offsets", 0)?;
    // A continuation has at least one token: an empty one would score 0, above every other.
    if let Some(s) = offsets.windows(2).position(|w| w[0] == w[1]) {
        return Err(CliError::input(format!(
            "{offsets_label}: sequence {s} has no tokens (offsets {s} and {} are both {}); every sequence needs at least one row",
            s + 1,
            offsets[s]
        )));
    }
    let sequences = offsets.len().saturating_sub(1);
    let questions = match (&args.choices, &args.lengths, &args.gold) {
        (Some(q), Some(l), Some(g)) => {
            let question = read_counts("choices", q, Some(sequences), "question ids", 0)?.0;
            // acc_norm divides by the lengths.
            let lengths = read_counts("lengths", l, Some(sequences), "lengths", 1)?.0;
            let gold = read_counts("gold", g, None, "gold choices", 0)?.0;
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
            e @ XentError::LogitOutOfRange { .. } => logits_error(&logits.file, &e),
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

/// The sequences' aggregates, as lm-evaluation-harness reduces `loglikelihood` requests.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Aggregates {
    /// The harness's `perplexity`: exp(−mean over sequences of the log-likelihood).
    perplexity: f64,
    /// exp(−Σ log-likelihood / Σ tokens): the perplexity per token over all sequences.
    token_perplexity: f64,
    /// The mean of `is_greedy` (the harness's `acc` of such tasks, as LAMBADA's).
    greedy_fraction: f64,
}

impl Aggregates {
    /// `None` for no sequences (there is nothing to average).
    fn of(scores: &[SequenceScore]) -> Option<Self> {
        if scores.is_empty() {
            return None;
        }
        let n = scores.len() as f64;
        let ll: f64 = scores.iter().map(|s| s.loglikelihood).sum();
        let tokens: usize = scores.iter().map(|s| s.tokens).sum();
        let greedy = scores.iter().filter(|s| s.is_greedy).count();
        Some(Self {
            perplexity: (-ll / n).exp(),
            token_perplexity: (-ll / tokens as f64).exp(),
            greedy_fraction: greedy as f64 / n,
        })
    }
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
    let aggregates = Aggregates::of(scores);
    if args.json {
        let line = serde_json::json!({
            "sequences": scores.len(),
            "questions": choice.map(|c| c.questions.len()),
            "acc": acc.map(json_f64),
            "acc_norm": acc_norm.map(json_f64),
            "perplexity": json_opt(aggregates.map(|a| a.perplexity)),
            "token_perplexity": json_opt(aggregates.map(|a| a.token_perplexity)),
            "greedy_fraction": json_opt(aggregates.map(|a| a.greedy_fraction)),
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
        if let Some(a) = aggregates {
            outln!(
                out,
                "perplexity {:.6} (exp of minus the mean loglikelihood), token perplexity {:.6}, greedy fraction {:.6} over {} sequences",
                a.perplexity,
                a.token_perplexity,
                a.greedy_fraction,
                scores.len()
            )?;
        }
        outln!(out, "sequences: {}", scores.len())?;
        outln!(out, "device: {device}")?;
        outln!(out, "time: {seconds:.3} s")?;
    }
    out.finish()
}
