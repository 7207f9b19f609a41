//! `xent`: numerically stable cross-entropy on any GPU wgpu reaches, from the command line.

mod bench;
mod demo;
mod info;
mod npy;
mod score;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xent::Reduction;

/// Numerically stable log-softmax and cross-entropy on any GPU that wgpu reaches, with an f64
/// CPU reference. The adapter comes from WGPU_BACKEND, WGPU_ADAPTER_NAME and WGPU_POWER_PREF.
#[derive(Parser)]
#[command(name = "xent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the adapters wgpu sees, the one xent uses, and its limits and features.
    Info,
    /// Score a seeded synthetic batch on the GPU and the CPU reference, and show CE = H + KL.
    Demo,
    /// Cross-entropy of logits in a .npy file against class indices or probabilities.
    Score(ScoreArgs),
    /// Time the loss kernels against the device's read roofline.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Logits [N, C], float32 or float64.
    #[arg(long, value_name = "Z.npy")]
    logits: PathBuf,
    /// Class indices [N] (int64 or int32), or probabilities [N, C] (float, the logits' shape).
    #[arg(long, value_name = "T.npy")]
    targets: PathBuf,
    /// Class weights [C] (float).
    #[arg(long, value_name = "W.npy")]
    weights: Option<PathBuf>,
    /// Rows whose class index is I contribute nothing (class-index targets only).
    #[arg(long, value_name = "I", allow_hyphen_values = true)]
    ignore_index: Option<i64>,
    /// Label smoothing ε in [0, 1].
    #[arg(long, value_name = "E", default_value_t = 0.0)]
    label_smoothing: f64,
    /// none, sum or mean (PyTorch's normalisation).
    #[arg(long, default_value = "mean")]
    reduction: Reduction,
    /// Write the per-row losses here (.npy, float32, or float64 for float64 logits).
    #[arg(long, value_name = "OUT.npy")]
    per_row: Option<PathBuf>,
    /// Use the f64 CPU reference instead of the GPU.
    #[arg(long)]
    cpu: bool,
    /// Rows read and scored per batch (default: as many as fit one GPU binding, at most
    /// 256 MiB of logits). Bounds memory for files of any size.
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    batch_rows: Option<u64>,
    /// Print one JSON object on stdout; its key "loss" holds the reduced value (null for none).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smaller default shapes, for software adapters.
    #[arg(long)]
    quick: bool,
    /// Shapes as ROWSxCLASSES, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Kernels to time, comma-separated: auto (the planner's choice), naive (one 256-lane
    /// workgroup per row, scalar loads), or WG/LANES/SPLIT/vec4|scalar[/sg] (sg: subgroup
    /// reductions).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    kernel: Vec<bench::KernelChoice>,
    /// Timed runs per shape and kernel (after warm-up; at least 20); the median is reported.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(20..))]
    runs: u64,
    /// Skip timing the CPU reference.
    #[arg(long)]
    no_cpu: bool,
    /// Print one JSON array on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the JSON array to this file (the table still goes to stdout).
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
}

fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (r, c) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected ROWSxCLASSES, e.g. 4096x32000"))?;
    let n = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let (rows, classes) = (n(r)?, n(c)?);
    if rows == 0 || classes == 0 {
        return Err(format!("{s:?}: rows and classes must be at least 1"));
    }
    Ok((rows, classes))
}

/// A failure: bad input (exit status 2) or a runtime failure such as no adapter (status 1).
#[derive(Debug)]
pub struct CliError {
    message: String,
    input: bool,
}

impl CliError {
    /// Bad input: a file or an argument; the message names which.
    pub fn input(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            input: true,
        }
    }

    /// Anything else.
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            input: false,
        }
    }
}

impl From<xent::XentError> for CliError {
    fn from(e: xent::XentError) -> Self {
        Self::runtime(e.to_string())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info::run(),
        Command::Demo => demo::run(),
        Command::Score(args) => score::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xent: {}", e.message.replace('\n', " "));
            ExitCode::from(if e.input { 2 } else { 1 })
        }
    }
}
