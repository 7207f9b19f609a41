//! Batched scoring with xent on the GPU, each beside its f64 reference: a small "model" scores
//! two multiple-choice questions (lm-evaluation-harness's loglikelihood, acc and acc_norm),
//! the token metrics of the same rows, a distillation of the student against a teacher, and
//! the same loss over two GPU contexts split by vocabulary.
//!
//! ```text
//! cargo run --release --example evaluate
//! ```

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::scoring::{self, Distillation, Divergence, MultipleChoiceOutput};
use xent::{CrossEntropy, GpuContext, Logits, ShardMode, ShardedScorer, Targets};

/// Vocabulary size.
pub const CLASSES: usize = 503;

/// The example's batch: 2 questions × 3 choices; choice c of question q is a continuation of
/// 2 + c tokens, each a row of logits.
pub struct Batch {
    /// `[rows, CLASSES]`.
    pub logits: Vec<f32>,
    /// A teacher's logits, the student's plus noise.
    pub teacher: Vec<f32>,
    /// Each row's token.
    pub tokens: Vec<i64>,
    /// Sequence boundaries (rows).
    pub offsets: Vec<usize>,
    /// The question of each sequence.
    pub question: Vec<usize>,
    /// Each continuation's length in characters.
    pub lengths: Vec<usize>,
    /// Each question's correct choice.
    pub gold: Vec<usize>,
}

impl Batch {
    /// A fixed batch in which the "model" favours each gold continuation's tokens.
    pub fn new() -> Self {
        let mut rng = StdRng::seed_from_u64(11);
        let gold = vec![1, 2];
        let (mut logits, mut teacher, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
        let (mut offsets, mut question, mut lengths) = (vec![0], Vec::new(), Vec::new());
        for (q, &g) in gold.iter().enumerate() {
            for c in 0..3 {
                let len = 2 + c;
                for _ in 0..len {
                    let token = rng.random_range(0..CLASSES as i64);
                    let row: Vec<f32> = (0..CLASSES).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let boost = if c == g { 5.0 } else { 1.0 };
                    for (k, &z) in row.iter().enumerate() {
                        let z = if k as i64 == token { z + boost } else { z };
                        logits.push(z);
                        teacher.push(z + rng.random_range(-0.5..0.5));
                    }
                    tokens.push(token);
                }
                offsets.push(tokens.len());
                question.push(q);
                lengths.push(4 * len + c);
            }
        }
        Batch {
            logits,
            teacher,
            tokens,
            offsets,
            question,
            lengths,
            gold,
        }
    }

    /// Rows (tokens).
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// The logits as xent takes them.
    pub fn student(&self) -> Logits<'_> {
        Logits::new(&self.logits, self.rows(), CLASSES).expect("a whole number of rows")
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// What the example computes on the GPU, and the f64 reference's multiple choice.
pub struct Report {
    /// acc and acc_norm from the GPU's sequence scores.
    pub gpu: MultipleChoiceOutput,
    /// The same from the f64 reference.
    pub reference: MultipleChoiceOutput,
    /// Token accuracy and perplexity on the GPU, and the reference's.
    pub accuracy: (f64, f64),
    pub perplexity: (f64, f64),
    /// Distillation loss (T = 2, forward: H + KL) on the GPU, and the reference's.
    pub distillation: (f64, f64),
    /// The cross-entropy over two contexts split by vocabulary, and on one.
    pub sharded: (f64, f64),
}

/// Runs every step on `gpu` (and a second context for the sharded loss).
pub fn run(gpu: &GpuContext, second: GpuContext) -> xent::Result<Report> {
    let batch = Batch::new();
    let z = batch.student();
    let (tokens, offsets) = (&batch.tokens, &batch.offsets);

    let scores = gpu.sequence_scores(z, tokens, offsets)?;
    let reference = scoring::sequence_scores(z, tokens, offsets)?;
    let mc = |s: &[scoring::SequenceScore]| {
        scoring::multiple_choice(s, &batch.question, &batch.lengths, &batch.gold)
    };

    let metrics = gpu.token_metrics(z, tokens, None, 5)?;
    let metrics_ref = scoring::token_metrics(z, tokens, None, 5)?;

    let spec = Distillation::new()
        .with_temperature(2.0)
        .with_divergence(Divergence::ForwardKl);
    let distilled = gpu.distillation(&spec, z, &batch.teacher)?;
    let distilled_ref = scoring::distillation(&spec, z, &batch.teacher)?;

    let ce = CrossEntropy::new();
    let contexts = [second, GpuContext::new()?];
    let sharded = ShardedScorer::new(&contexts, ShardMode::Vocabulary).cross_entropy(
        &ce,
        z,
        Targets::ClassIndices(tokens),
    )?;
    let whole = gpu.cross_entropy(&ce, z, Targets::ClassIndices(tokens))?;

    let nan = f64::NAN;
    Ok(Report {
        gpu: mc(&scores)?,
        reference: mc(&reference)?,
        accuracy: (metrics.summary.accuracy(), metrics_ref.summary.accuracy()),
        perplexity: (
            metrics.summary.perplexity(),
            metrics_ref.summary.perplexity(),
        ),
        distillation: (
            distilled.loss.unwrap_or(nan),
            distilled_ref.loss.unwrap_or(nan),
        ),
        sharded: (sharded.loss.unwrap_or(nan), whole.loss.unwrap_or(nan)),
    })
}

#[allow(dead_code)]
fn main() -> xent::Result<()> {
    let gpu = GpuContext::new()?;
    let report = run(&gpu, GpuContext::new()?)?;
    println!(
        "adapter: {}",
        xent::gpu::describe_adapter(gpu.adapter_info())
    );
    for (q, o) in report.gpu.questions.iter().enumerate() {
        println!(
            "question {q}: choice {} by log-likelihood, {} per character, gold {}",
            o.predicted, o.predicted_norm, o.gold
        );
    }
    println!(
        "acc {:.3}, acc_norm {:.3} (f64 reference: {:.3}, {:.3})",
        report.gpu.acc(),
        report.gpu.acc_norm(),
        report.reference.acc(),
        report.reference.acc_norm()
    );
    println!(
        "token accuracy {:.4}, perplexity {:.4} (reference {:.4}, {:.4})",
        report.accuracy.0, report.perplexity.0, report.accuracy.1, report.perplexity.1
    );
    println!(
        "distillation at T = 2 (H + KL): {:.6} (reference {:.6})",
        report.distillation.0, report.distillation.1
    );
    println!(
        "cross-entropy over two contexts by vocabulary: {:.6} (one context {:.6})",
        report.sharded.0, report.sharded.1
    );
    Ok(())
}
