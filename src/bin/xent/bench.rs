//! `xent bench`: GPU time of the loss kernels (timestamp queries, median of the timed runs,
//! fresh random data), next to the device's read roofline measured in the same run.

use std::str::FromStr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::{ReadBandwidth, Strategy};
use xent::{CpuReference, CrossEntropy, GpuContext, Logits, Scorer, Targets};

use crate::{BenchArgs, CliError};

const DEFAULT_SHAPES: [(usize, usize); 4] =
    [(8192, 1000), (4096, 32000), (1024, 128256), (65536, 10)];
const QUICK_SHAPES: [(usize, usize); 4] = [(1024, 1000), (256, 32000), (64, 128256), (16384, 10)];
const WARMUP: usize = 5;

/// Which kernel a benchmark row times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelChoice {
    /// The planner's strategy for the shape.
    Auto,
    /// One 256-lane workgroup per row, scalar loads: the baseline.
    Naive,
    /// A strategy given on the command line.
    Fixed(Strategy),
}

impl FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(Self::Auto),
            "naive" => return Ok(Self::Naive),
            _ => {}
        }
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || {
            format!(
                "{s:?}: expected auto, naive or WG/LANES/SPLIT/vec4|scalar[/sg] (e.g. 256/4/1/vec4/sg)"
            )
        };
        let (wg, lanes, split, loads, subgroups) = match parts.as_slice() {
            [wg, lanes, split, loads] => (wg, lanes, split, loads, false),
            [wg, lanes, split, loads, sg] if *sg == "sg" => (wg, lanes, split, loads, true),
            _ => return Err(bad()),
        };
        let n = |v: &str| v.parse::<u32>().map_err(|_| bad());
        Ok(Self::Fixed(Strategy {
            workgroup_size: n(wg)?,
            lanes_per_row: n(lanes)?,
            split: n(split)?,
            vec4: match *loads {
                "vec4" => true,
                "scalar" => false,
                _ => return Err(bad()),
            },
            subgroups,
        }))
    }
}

impl KernelChoice {
    fn strategy(self, gpu: &GpuContext, rows: usize, classes: usize) -> Strategy {
        match self {
            Self::Auto => gpu.plan(rows, classes),
            Self::Naive => Strategy::NAIVE,
            Self::Fixed(s) => s,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Naive => "naive",
            Self::Fixed(_) => "fixed",
        }
    }
}

/// One row of the table.
struct Row {
    rows: usize,
    classes: usize,
    target: &'static str,
    kernel: &'static str,
    strategy: String,
    ms: f64,
    gbps: f64,
    roofline_fraction: f64,
    cpu_ms: Option<f64>,
}

/// Random inputs for one shape: `sets` independent copies, so repeated runs read memory
/// rather than a cache that holds one copy.
struct Data {
    rows: usize,
    classes: usize,
    sets: usize,
    logits: Vec<f32>,
    labels: Vec<i64>,
    probabilities: Vec<f32>,
}

impl Data {
    fn new(rng: &mut StdRng, rows: usize, classes: usize, sets: usize) -> Self {
        let n = rows * classes * sets;
        // Uniform in [-10, 10), as the peers were measured.
        let logits = (0..n).map(|_| rng.random_range(-10.0f32..10.0)).collect();
        let labels = (0..rows * sets)
            .map(|_| rng.random_range(0..classes as i64))
            .collect();
        let mut probabilities = Vec::with_capacity(n);
        for _ in 0..rows * sets {
            let raw: Vec<f32> = (0..classes).map(|_| rng.random::<f32>()).collect();
            let total: f32 = raw.iter().sum();
            probabilities.extend(raw.iter().map(|v| v / total));
        }
        Self {
            rows,
            classes,
            sets,
            logits,
            labels,
            probabilities,
        }
    }

    fn set(&self, i: usize, soft: bool) -> (Logits<'_>, Targets<'_>) {
        let (r, c) = (self.rows, self.classes);
        let z = &self.logits[i * r * c..(i + 1) * r * c];
        let t = if soft {
            Targets::Probabilities(&self.probabilities[i * r * c..(i + 1) * r * c])
        } else {
            Targets::ClassIndices(&self.labels[i * r..(i + 1) * r])
        };
        (Logits::new(z, r, c).expect("shape"), t)
    }

    fn sets(&self, soft: bool) -> Vec<(Logits<'_>, Targets<'_>)> {
        (0..self.sets).map(|i| self.set(i, soft)).collect()
    }
}

/// How many copies keep a set of `bytes` from fitting a large last-level cache (≥ 256 MiB in all).
fn copies(bytes: u64, quick: bool) -> usize {
    if quick {
        return 1;
    }
    ((256u64 << 20).div_ceil(bytes.max(1)) as usize).clamp(1, 32)
}

pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    let gpu = GpuContext::new()?;
    let device = gpu.describe();
    let timer = gpu.timer();
    let shapes: Vec<(usize, usize)> = if !args.shapes.is_empty() {
        args.shapes.clone()
    } else if args.quick {
        QUICK_SHAPES.to_vec()
    } else {
        DEFAULT_SHAPES.to_vec()
    };
    let roofline_bytes = if args.quick { 64 << 20 } else { 1 << 30 };
    let roofline: ReadBandwidth =
        gpu.measure_read_bandwidth(roofline_bytes, WARMUP, args.runs as usize)?;
    let roof_gbps = roofline.bytes_per_second() / 1e9;
    if !args.json {
        println!("device: {device}");
        println!(
            "read roofline: {roof_gbps:.1} GB/s (plain vec4 read of {} MiB, median of {}, {} timer)",
            roofline.bytes >> 20,
            roofline.timing.samples_ms.len(),
            timer.name()
        );
        if timer.name() == "wall" {
            println!(
                "note: this adapter has no timestamp queries; times are wall clock around submit and wait"
            );
        }
    }

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut table = Vec::new();
    for &(rows, classes) in &shapes {
        let set_bytes = (rows * classes * 4) as u64;
        let data = Data::new(&mut rng, rows, classes, copies(set_bytes, args.quick));
        for (target, soft) in [("hard", false), ("soft", true)] {
            let spec = CrossEntropy::new();
            // Bytes that must move: the logits, and the targets as the device reads them.
            let bytes = set_bytes + if soft { set_bytes } else { rows as u64 * 4 };
            let first = table.len();
            for &kernel in &args.kernel {
                let strategy = kernel.strategy(&gpu, rows, classes);
                let timing = gpu.time_cross_entropy(
                    &spec,
                    &data.sets(soft),
                    strategy,
                    WARMUP,
                    args.runs as usize,
                )?;
                let ms = timing.median_ms();
                let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                table.push(Row {
                    rows,
                    classes,
                    target,
                    kernel: kernel.name(),
                    strategy: strategy.name(),
                    ms,
                    gbps,
                    roofline_fraction: gbps / roof_gbps,
                    cpu_ms: None,
                });
            }
            // The CPU reference last, so the GPU never idles between upload and timing.
            if !args.no_cpu {
                let (z, t) = data.set(0, soft);
                let clock = Instant::now();
                CpuReference.cross_entropy(&spec, z, t)?;
                let cpu_ms = clock.elapsed().as_secs_f64() * 1e3;
                table[first..]
                    .iter_mut()
                    .for_each(|r| r.cpu_ms = Some(cpu_ms));
            }
        }
    }
    let json = to_json(&table, &device, timer.name(), roof_gbps).to_string();
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).map_err(|e| {
            CliError::input(format!("--json-out {}: cannot write: {e}", path.display()))
        })?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_table(&table);
    }
    Ok(())
}

fn print_table(table: &[Row]) {
    println!(
        "{:>14} {:>6} {:>6} {:>22} {:>10} {:>9} {:>9} {:>10} {:>9}",
        "N x C", "target", "kernel", "strategy", "ms", "GB/s", "roofline", "CPU ms", "vs naive"
    );
    for r in table {
        let naive = table.iter().find(|n| {
            n.kernel == "naive"
                && n.rows == r.rows
                && n.classes == r.classes
                && n.target == r.target
        });
        let speedup = naive.map_or(String::from("-"), |n| format!("{:.2}x", n.ms / r.ms));
        println!(
            "{:>14} {:>6} {:>6} {:>22} {:>10.4} {:>9.1} {:>9.3} {:>10} {:>9}",
            format!("{}x{}", r.rows, r.classes),
            r.target,
            r.kernel,
            r.strategy,
            r.ms,
            r.gbps,
            r.roofline_fraction,
            r.cpu_ms.map_or(String::from("-"), |c| format!("{c:.1}")),
            speedup
        );
    }
}

fn to_json(table: &[Row], device: &str, timer: &str, roof_gbps: f64) -> serde_json::Value {
    let rows: Vec<_> = table
        .iter()
        .map(|r| {
            serde_json::json!({
                "rows": r.rows,
                "classes": r.classes,
                "target": r.target,
                "task": "loss",
                "kernel": r.kernel,
                "strategy": r.strategy,
                "ms": r.ms,
                "gbps": r.gbps,
                "roofline_fraction": r.roofline_fraction,
                "roofline_gbps": roof_gbps,
                "cpu_ms": r.cpu_ms,
                "device": device,
                "timer": timer,
            })
        })
        .collect();
    serde_json::Value::Array(rows)
}
