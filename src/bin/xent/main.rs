//! `xent`: numerically stable cross-entropy on any GPU wgpu reaches, from the command line.

mod bench;
mod demo;
mod distill;
mod eval;
mod info;
mod npy;
mod out;
mod score;
mod stream;
mod topk;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xent::Reduction;

/// Numerically stable log-softmax and cross-entropy on any GPU that wgpu reaches, with an f64
/// CPU reference. The adapter comes from WGPU_BACKEND, WGPU_ADAPTER_NAME and WGPU_POWER_PREF.
#[derive(Parser)]
#[command(name = "xent", version, about, after_help = EXIT_STATUS)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The exit statuses, for `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0  success (also when stdout is closed early, as by `xent info | head -1`)
  1  no GPU adapter, a device failure, or stdout cannot be written
  2  bad input: a file, an argument or WGPU_BACKEND; one line on stderr names it";

#[derive(Subcommand)]
enum Command {
    /// List the adapters wgpu sees, the one xent uses, and its limits and features.
    Info,
    /// Score a seeded synthetic batch on the GPU and the CPU reference, and show CE = H + KL.
    Demo,
    /// Cross-entropy of logits in a .npy file against class indices or probabilities.
    Score(ScoreArgs),
    /// Sequence log-likelihoods and multiple choice, as lm-evaluation-harness scores them.
    Eval(EvalArgs),
    /// Time the loss kernels against the device's read roofline.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Logits [N, C]: float32, float64 (rounded to float32; a finite value beyond the float32
    /// range is refused), float16, bfloat16 (`'<V2'`, as np.save writes ml_dtypes' bfloat16),
    /// or uint16 raw bits with --logits-dtype.
    #[arg(long, value_name = "Z.npy")]
    logits: PathBuf,
    /// The half type of uint16 logits (raw bits): bf16 or f16. For other files it must agree
    /// with the file's own dtype.
    #[arg(long, value_name = "DTYPE")]
    logits_dtype: Option<xent::Dtype>,
    /// Class indices [N] (int64 or int32), or probabilities [N, C] (float, the logits' shape).
    #[arg(long, value_name = "T.npy", required_unless_present_any = ["teacher", "topk_indices", "topk_probs"])]
    targets: Option<PathBuf>,
    /// Top-k sparse targets: the k class indices of every row [N, k] (integers, distinct in a
    /// row, in [0, C)), with --topk-probs; the loss is −Σ_j p_j·log_softmax(z)[i_j] per row,
    /// with the full-vocabulary log-sum-exp ("mean" divides by N); --z-loss and --softcap
    /// apply as with --targets.
    #[arg(
        long,
        value_name = "I.npy",
        requires = "topk_probs",
        conflicts_with_all = ["targets", "teacher", "weights", "ignore_index", "label_smoothing", "metrics"]
    )]
    topk_indices: Option<PathBuf>,
    /// The probabilities of --topk-indices [N, k] (float), used as given; needs
    /// --topk-indices.
    // (Needs --topk-indices: checked by `score`, which says so in one line.)
    #[arg(long, value_name = "P.npy")]
    topk_probs: Option<PathBuf>,
    /// Distil against a teacher's logits [N, C] (float, the logits' shape) instead of
    /// targets: per row p = softmax(teacher / T), q = softmax(logits / T), and the loss is
    /// the --divergence between them ("mean" divides by N, PyTorch's "batchmean").
    #[arg(
        long,
        value_name = "TEACHER.npy",
        conflicts_with_all = ["targets", "weights", "ignore_index", "label_smoothing", "z_loss", "softcap", "metrics"]
    )]
    teacher: Option<PathBuf>,
    /// The distillation temperature T, finite and > 0 [default: 1].
    #[arg(
        long,
        value_name = "T",
        requires = "teacher",
        allow_negative_numbers = true
    )]
    temperature: Option<f64>,
    /// kl: the cross-entropy CE(p, q) = H(p) + KL(p‖q), with H and KL reported; reverse-kl:
    /// KL(q‖p); jsd: the generalised Jensen–Shannon divergence with --beta (two reads of
    /// both logits).
    /// [default: kl]
    #[arg(long, value_name = "D", requires = "teacher")]
    divergence: Option<distill::DivergenceChoice>,
    /// The JSD's weight β of the teacher, in [0, 1] (0 is KL(p‖q), 1 is KL(q‖p)) [default:
    /// 0.5].
    #[arg(
        long,
        value_name = "B",
        requires = "divergence",
        allow_negative_numbers = true
    )]
    beta: Option<f64>,
    /// Multiply the loss and the gradient by T² (Hinton; Hugging Face's distillation).
    #[arg(long, requires = "teacher")]
    t2_scale: bool,
    /// Class weights [C] (float).
    #[arg(long, value_name = "W.npy")]
    weights: Option<PathBuf>,
    /// Rows whose class index is I contribute nothing (class-index targets only).
    #[arg(long, value_name = "I", allow_hyphen_values = true)]
    ignore_index: Option<i64>,
    /// Label smoothing ε in [0, 1].
    #[arg(
        long,
        value_name = "E",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    label_smoothing: f64,
    /// none, sum or mean (PyTorch's normalisation).
    #[arg(long, default_value = "mean")]
    reduction: Reduction,
    /// Write the per-row losses here (.npy, float32, or float64 for float64 logits), row by
    /// row as batches finish; never one of the input files. A file is written beside OUT.npy
    /// under a temporary name and renamed over it only when the run succeeds: a failed run
    /// leaves an existing OUT.npy as it was (a pipe or device is written directly).
    #[arg(long, value_name = "OUT.npy")]
    per_row: Option<PathBuf>,
    /// Write the gradient of the loss with respect to the logits here: .npy, float32 [N, C]
    /// (float32 also for float64 logits; with --cpu, the f64 reference rounded to float32), row
    /// by row as batches finish, like --per-row (renamed into place on success); never one of
    /// the input files. Under mean it is the gradient of the mean over the whole file, whatever
    /// --batch-rows.
    #[arg(long, value_name = "OUT.npy")]
    grad: Option<PathBuf>,
    /// The upstream gradient ∂objective/∂loss that --grad is scaled by (autograd's
    /// grad_output; with reduction none, G for every row), finite [default: 1].
    #[arg(
        long,
        value_name = "G",
        allow_negative_numbers = true,
        requires = "grad"
    )]
    grad_output: Option<f64>,
    /// Add the z-loss λ·lse² of every row not ignored (PaLM; 1e-4 is typical), λ finite and
    /// ≥ 0 (0: off). Summed under sum; under mean averaged over the rows not ignored
    /// (unweighted), while the cross-entropy keeps its own denominator.
    #[arg(
        long,
        value_name = "λ",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    z_loss: f64,
    /// Soft-cap every logit first, CAP·tanh(z / CAP) (Gemma 2 uses 30), CAP finite and > 0;
    /// the loss, the z-loss and the gradient are those of the capped logits.
    #[arg(long, value_name = "CAP", allow_negative_numbers = true)]
    softcap: Option<f64>,
    /// Token metrics from the loss's own pass over the logits (class indices only): accuracy
    /// (the target is the argmax, the lowest class on ties), top-K accuracy, the mean negative
    /// log-likelihood and perplexity, over the rows not ignored; of the capped logits with
    /// --softcap.
    #[arg(long, conflicts_with = "grad")]
    metrics: bool,
    /// The K of --metrics' top-K accuracy, at least 1: a hit when fewer than K classes score
    /// strictly higher than the target [default: 5].
    #[arg(long, value_name = "K", requires = "metrics")]
    top_k: Option<usize>,
    /// Use the f64 CPU reference instead of the GPU.
    #[arg(long)]
    cpu: bool,
    /// Rows read and scored per batch, at least 1 (default: as many as fit one GPU binding,
    /// at most 256 MiB of logits, and at least one row). Memory stays O(batch) for files of
    /// any size.
    #[arg(long, value_name = "ROWS", allow_negative_numbers = true)]
    batch_rows: Option<i64>,
    /// Print one JSON object on stdout; its key "loss" holds the reduced value (null for
    /// reduction none), "z_loss" the z-loss part of it (reduced like the loss: null for
    /// reduction none or without --z-loss) and "z_loss_sum" Σ λ·lse² (null without --z-loss);
    /// with --metrics, "accuracy", "top_k", "top_k_accuracy", "nll" and "perplexity". Numbers that are not finite are the strings "inf", "-inf" and "nan"; null means absent.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Logits [N, C] of every token of every continuation: float32, float64 (rounded to
    /// float32; a finite value beyond the float32 range is refused), float16 or bfloat16.
    #[arg(long, value_name = "Z.npy")]
    logits: PathBuf,
    /// The continuation's token at each row [N] (int64 or int32), in [0, C).
    #[arg(long, value_name = "Y.npy")]
    targets: PathBuf,
    /// Sequence boundaries [S + 1] (integers): sequence s is rows offsets[s]..offsets[s + 1];
    /// they start at 0, increase (every sequence has at least one token) and end at N.
    #[arg(long, value_name = "O.npy")]
    offsets: PathBuf,
    /// The question each sequence answers [S] (integers 0..Q): a question's choices are its
    /// sequences, in order. Needs --lengths and --gold.
    #[arg(long, value_name = "Q.npy", requires_all = ["lengths", "gold"])]
    choices: Option<PathBuf>,
    /// Each continuation's length in characters [S], at least 1 (acc_norm divides the
    /// log-likelihood by it).
    #[arg(long, value_name = "L.npy", requires = "choices")]
    lengths: Option<PathBuf>,
    /// Each question's correct choice [Q], an index among its choices.
    #[arg(long, value_name = "G.npy", requires = "choices")]
    gold: Option<PathBuf>,
    /// Use the f64 CPU reference instead of the GPU.
    #[arg(long)]
    cpu: bool,
    /// Rows read and scored per batch, at least 1 (default: as for `score`).
    #[arg(long, value_name = "ROWS", allow_negative_numbers = true)]
    batch_rows: Option<i64>,
    /// JSON Lines: one object per sequence (`sequence`, `loglikelihood`, `is_greedy`,
    /// `tokens`, and `perplexity` = exp(−loglikelihood / tokens)), one per question
    /// (`question`, `acc`, `acc_norm`, `predicted`, `predicted_norm`, `gold`, `choices`), then a
    /// summary (`sequences`, `questions`, `acc`, `acc_norm`, `perplexity`, `token_perplexity`,
    /// `greedy_fraction`, `device`, `seconds`). The summary's `perplexity` is
    /// lm-evaluation-harness's aggregate of loglikelihood requests, exp(−(1/S)·Σ_s ll_s) (the
    /// mean over sequences, not tokens); `token_perplexity` is exp(−Σ_s ll_s / Σ_s tokens_s);
    /// `greedy_fraction` is the mean of is_greedy (the harness's `acc` of LAMBADA-style
    /// tasks). The text output prints the same summary; null (JSON) or no line (text) for
    /// no sequences. No bits per byte: xent has no byte counts.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smaller default shapes, for software adapters.
    #[arg(long)]
    quick: bool,
    /// Shapes as ROWSxCLASSES, comma-separated. ROWS and CLASSES are at least 1 and at most
    /// 4294967295 (the kernels index with u32), and ROWS×CLASSES×4 bytes of logits at most
    /// 64 GiB.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Kernels to time, comma-separated: auto (the planner's choice), naive (one 256-lane
    /// workgroup per row, scalar loads), or WG/LANES/SPLIT/vec4|scalar[/sg][/f16int] (sg:
    /// subgroup reductions; f16int: f16 logits widened by integer operations rather than
    /// unpack2x16float): WG and LANES powers of two with LANES ≤ WG ≤ 1024, SPLIT in 1..=64
    /// (above 1 only with LANES = WG). The device's own limits are checked before any timing.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    kernel: Vec<bench::KernelChoice>,
    /// What to time, comma-separated: kernel (the passes on inputs already on the device,
    /// timestamp queries; every --kernel), resident (whole prepared calls on device inputs:
    /// record, submit, read the totals; wall clock; the planner's kernel; with the device's
    /// round trip measured in the same run), pipelined (resident calls in a loop that reads
    /// each call's totals while the next --in-flight run: wall clock per call), host (whole calls
    /// from host slices, upload included; wall clock; with the host-to-device copy bandwidth
    /// measured in the same run).
    #[arg(long, value_delimiter = ',', default_value = "kernel")]
    path: Vec<bench::PathChoice>,
    /// Calls in flight behind the one whose totals the pipelined path waits for, comma-
    /// separated (1 to 6 each: a prepared loss has 8 parameter slots): a row each.
    #[arg(long, value_delimiter = ',', value_name = "N", default_value = "2",
          value_parser = clap::value_parser!(u32).range(1..=6))]
    in_flight: Vec<u32>,
    /// Tasks to time on the kernel path, comma-separated: loss (one read of the logits), grad
    /// (loss and gradient of the mean into a separate buffer: two reads and one write),
    /// grad-inplace (the gradient over the logits), metrics (loss and token metrics in one
    /// read; hard rows), distill (forward distillation at T = 2, one read of the logits and
    /// one of a teacher's; soft rows, whose arrays stand in for the teacher), sparse (top-k
    /// sparse targets, k from --sparse-k; hard rows) or sparse-grad (the same and its
    /// gradient; hard rows).
    #[arg(long, value_delimiter = ',', default_value = "loss")]
    task: Vec<bench::TaskChoice>,
    /// Entries a row of the sparse tasks' top-k targets (1 to the GPU's most, 128; at most C
    /// are used): the row's class index and k − 1 others, probability 1/k each.
    #[arg(long, value_name = "K", default_value_t = 8)]
    sparse_k: usize,
    /// Also time the loss split into K vocabulary shards on this one GPU (comma-separated Ks,
    /// each at least 1 and at most the classes of every shape; hard rows): the shards'
    /// partials passes back to back, and the host's merge of their partials (JSON
    /// `merge_ms`).
    #[arg(long, value_delimiter = ',', value_name = "K")]
    shards: Vec<usize>,
    /// Logits' dtypes, comma-separated: f32, bf16, f16 (soft targets in the same dtype; bytes
    /// are counted in the real dtype).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtype: Vec<xent::Dtype>,
    /// Adds a z-loss λ·lse² to the timed loss (λ finite and ≥ 0, checked before any work).
    #[arg(long, value_name = "λ", allow_negative_numbers = true)]
    z_loss: Option<f64>,
    /// Soft-caps the logits, cap·tanh(z / cap), in the timed loss (CAP finite and > 0,
    /// checked before any work).
    #[arg(long, value_name = "CAP", allow_negative_numbers = true)]
    softcap: Option<f64>,
    /// Timed runs per shape and kernel (after warm-up; at least 20); the median is reported.
    #[arg(
        long,
        default_value_t = 30,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u64).range(20..)
    )]
    runs: u64,
    /// Skip timing the CPU reference.
    #[arg(long)]
    no_cpu: bool,
    /// Print one JSON array on stdout (numbers that are not finite as "inf", "-inf", "nan").
    #[arg(long)]
    json: bool,
    /// Also write the JSON array to this file (the table still goes to stdout). Its directory
    /// must exist and be writable; that is checked before any timing.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
}

/// The largest bench shape: bytes of float32 logits.
const MAX_BENCH_BYTES: u64 = 64 << 30;

/// `ROWSxCLASSES`, within the bounds `--shapes` documents.
fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (r, c) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected ROWSxCLASSES, e.g. 4096x32000"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|e| format!("{s:?}: {v:?} is not a count ({e})"))
    };
    let (rows, classes) = (n(r)?, n(c)?);
    if rows == 0 || classes == 0 {
        return Err(format!("{s:?}: rows and classes must be at least 1"));
    }
    let bytes = rows.checked_mul(classes).and_then(|n| n.checked_mul(4));
    if rows > u32::MAX as u64
        || classes > u32::MAX as u64
        || bytes.is_none_or(|b| b > MAX_BENCH_BYTES)
    {
        return Err(format!(
            "{s:?}: shape too large; rows and classes are at most {} and the logits at most {} GiB",
            u32::MAX,
            MAX_BENCH_BYTES >> 30
        ));
    }
    Ok((rows as usize, classes as usize))
}

/// What kind of failure a [`CliError`] is; it decides the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Bad input (status 2).
    Input,
    /// No adapter, a device failure, an unwritable stdout (status 1).
    Runtime,
    /// Whoever reads stdout has closed it: stop quietly (status 0).
    ClosedStdout,
}

/// A failure, with the one line that explains it.
#[derive(Debug)]
pub struct CliError {
    message: String,
    kind: Failure,
}

impl CliError {
    /// Bad input: a file or an argument; the message names which.
    pub fn input(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: Failure::Input,
        }
    }

    /// Anything else.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: Failure::Runtime,
        }
    }

    /// A failed write to stdout: a closed pipe ends the command quietly, anything else is a
    /// runtime failure.
    pub fn stdout(e: std::io::Error) -> Self {
        Self {
            message: format!("cannot write to stdout: {e}"),
            kind: if e.kind() == std::io::ErrorKind::BrokenPipe {
                Failure::ClosedStdout
            } else {
                Failure::Runtime
            },
        }
    }
}

impl From<xent::XentError> for CliError {
    fn from(e: xent::XentError) -> Self {
        match e {
            // (Each command names the file at fault where it can; this is the fallback.)
            xent::XentError::UnknownBackend { .. } | xent::XentError::LogitOutOfRange { .. } => {
                Self::input(e.to_string())
            }
            e => Self::runtime(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info::run(),
        Command::Demo => demo::run(),
        Command::Score(args) => score::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    if e.kind == Failure::ClosedStdout {
        return ExitCode::SUCCESS;
    }
    // Not eprintln!, which panics when stderr is closed too.
    let _ = writeln!(std::io::stderr(), "xent: {}", e.message.replace('\n', " "));
    ExitCode::from(if e.kind == Failure::Input { 2 } else { 1 })
}
