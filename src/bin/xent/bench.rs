//! `xent bench`: GPU time of the loss kernels (timestamp queries, median of the timed runs,
//! fresh random data), next to the device's read roofline measured in the same run.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::gpu::{ReadBandwidth, Strategy, Task};
use xent::shard::{RowPartial, merge_rows};
use xent::{
    CpuReference, CrossEntropy, Dtype, ElementVec, GpuContext, Logits, Scorer, Targets, XentError,
};

use crate::out::{Out, json_f64, json_opt, outln};
use crate::{BenchArgs, CliError};

const DEFAULT_SHAPES: [(usize, usize); 4] =
    [(8192, 1000), (4096, 32000), (1024, 128256), (65536, 10)];
const QUICK_SHAPES: [(usize, usize); 4] = [(1024, 1000), (256, 32000), (64, 128256), (16384, 10)];
const WARMUP: usize = 5;
/// The largest workgroup a `--kernel` may name (the device may allow less).
const MAX_WORKGROUP: u32 = 1024;
/// The most workgroups a `--kernel` may split a row across.
const MAX_SPLIT: u32 = 64;

/// What a benchmark row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathChoice {
    /// The passes alone, on device-resident inputs (timestamps).
    Kernel,
    /// Whole prepared calls on device-resident inputs, the totals read back (wall clock).
    Resident,
    /// Resident calls in a loop that reads each call's totals while the next two run
    /// (`PreparedLoss::read_later`; wall clock per call).
    Pipelined,
    /// Whole calls from host slices, upload included (wall clock).
    Host,
}

impl PathChoice {
    fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Resident => "resident",
            Self::Pipelined => "pipelined",
            Self::Host => "host",
        }
    }
}

/// Which task a kernel-path row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskChoice {
    /// The loss.
    Loss,
    /// Loss and gradient into a separate buffer.
    Grad,
    /// Loss and gradient over the logits.
    GradInplace,
    /// Loss and token metrics in one read (class indices only: no soft-target row).
    Metrics,
    /// Forward distillation at T = 2, the soft targets' arrays standing in for the teacher's
    /// logits (soft rows only).
    Distill,
    /// Top-k sparse targets made from the class indices, k from `--sparse-k` (hard rows only).
    Sparse,
    /// The same and its gradient into a separate buffer (hard rows only).
    SparseGrad,
}

impl TaskChoice {
    fn task(self, sparse_k: usize) -> Task {
        match self {
            Self::Loss => Task::Loss,
            Self::Grad => Task::Gradient,
            Self::GradInplace => Task::GradientInPlace,
            Self::Metrics => Task::Metrics,
            Self::Distill => Task::Distill,
            Self::Sparse => Task::Sparse { k: sparse_k },
            Self::SparseGrad => Task::SparseGradient { k: sparse_k },
        }
    }
}

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
    /// `auto`, `naive` or `WG/LANES/SPLIT/vec4|scalar[/sg]`, with every number in range.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(Self::Auto),
            "naive" => return Ok(Self::Naive),
            _ => {}
        }
        let parts: Vec<&str> = s.split('/').collect();
        // A trailing f16int: f16 widened by integer operations rather than unpack2x16float.
        let (parts, f16_builtin) = match parts.split_last() {
            Some((&"f16int", rest)) => (rest, false),
            _ => (&parts[..], true),
        };
        let (wg, lanes, split, loads, subgroups) = match parts {
            [wg, lanes, split, loads] => (wg, lanes, split, loads, false),
            [wg, lanes, split, loads, "sg"] => (wg, lanes, split, loads, true),
            _ => {
                return Err(format!(
                    "{s:?}: expected auto, naive or WG/LANES/SPLIT/vec4|scalar[/sg][/f16int] (e.g. 256/4/1/vec4/sg)"
                ));
            }
        };
        let number = |text: &str, what: &str, rule: &str, ok: &dyn Fn(u32) -> bool| {
            text.parse::<u32>()
                .ok()
                .filter(|&n| ok(n))
                .ok_or_else(|| format!("{s:?}: {what} {text} is not {rule}"))
        };
        let power_of_two = |limit: u32| move |n: u32| n.is_power_of_two() && n <= limit;
        let wg = number(
            wg,
            "workgroup size",
            "a power of two up to 1024",
            &power_of_two(MAX_WORKGROUP),
        )?;
        let lanes = number(
            lanes,
            "lanes per row",
            "a power of two up to the workgroup size",
            &power_of_two(wg),
        )?;
        let split = number(split, "split", "in 1..=64", &|n| {
            (1..=MAX_SPLIT).contains(&n)
        })?;
        if split > 1 && lanes != wg {
            return Err(format!(
                "{s:?}: a row split across workgroups (SPLIT > 1) needs LANES = WG"
            ));
        }
        let vec4 = match *loads {
            "vec4" => true,
            "scalar" => false,
            other => return Err(format!("{s:?}: loads {other:?} are not vec4 or scalar")),
        };
        Ok(Self::Fixed(Strategy {
            workgroup_size: wg,
            lanes_per_row: lanes,
            split,
            vec4,
            subgroups,
            f16_builtin,
        }))
    }
}

impl KernelChoice {
    fn strategy(self, gpu: &GpuContext, rows: usize, classes: usize) -> Strategy {
        match self {
            Self::Auto => gpu.plan(rows, classes),
            Self::Naive => Strategy::NAIVE,
            // Without the builtin, f16 is widened by integer operations whatever was asked.
            Self::Fixed(s) => Strategy {
                f16_builtin: s.f16_builtin && gpu.facts().f16_builtin,
                ..s
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Naive => "naive",
            Self::Fixed(_) => "fixed",
        }
    }

    /// Refuses a strategy this device cannot run, naming it as `--kernel` spells it.
    fn check(self, gpu: &GpuContext) -> Result<(), CliError> {
        let (text, strategy) = match self {
            Self::Auto => return Ok(()),
            Self::Naive => ("naive".to_string(), Strategy::NAIVE),
            Self::Fixed(s) => (spelling(&s), self.strategy(gpu, 1, 1)),
        };
        strategy.check(gpu.facts()).map_err(|e| match e {
            XentError::InvalidStrategy { why, .. } => {
                CliError::input(format!("--kernel {text}: {why}"))
            }
            other => other.into(),
        })
    }
}

/// A strategy as `--kernel` spells it: `WG/LANES/SPLIT/vec4|scalar[/sg][/f16int]`.
fn spelling(s: &Strategy) -> String {
    format!(
        "{}/{}/{}/{}{}{}",
        s.workgroup_size,
        s.lanes_per_row,
        s.split,
        if s.vec4 { "vec4" } else { "scalar" },
        if s.subgroups { "/sg" } else { "" },
        if s.f16_builtin { "" } else { "/f16int" }
    )
}

/// Checks before any timing that `path` can be written, so a long benchmark never ends in a
/// lost result: an existing file is opened for writing (not truncated); otherwise its
/// directory must exist and take a probe file, removed at once.
fn check_writable(path: &Path) -> Result<(), CliError> {
    let fail =
        |problem: String| CliError::input(format!("--json-out {}: {problem}", path.display()));
    if path.exists() {
        return OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| fail(format!("cannot write: {e}")));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(fail(format!("directory {} does not exist", dir.display())));
    }
    let probe = dir.join(format!(".xent-json-out-probe-{}", std::process::id()));
    File::create_new(&probe)
        .map_err(|e| fail(format!("cannot write in {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A zeroed vector of `n` values, or an error naming the shape when memory runs out
/// (instead of the abort a plain allocation gives).
fn allocate<T: Clone + Default>(n: usize, rows: usize, classes: usize) -> Result<Vec<T>, CliError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        CliError::input(format!(
            "--shapes {rows}x{classes}: cannot allocate {:.1} GiB of host memory for the inputs",
            (n * size_of::<T>()) as f64 / (1u64 << 30) as f64
        ))
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// One row of the table.
struct Row {
    rows: usize,
    classes: usize,
    dtype: Dtype,
    target: &'static str,
    task: String,
    path: &'static str,
    kernel: &'static str,
    strategy: String,
    ms: f64,
    gbps: f64,
    roofline_fraction: f64,
    /// For a gradient: its floor (reads at the read roofline, the gradient pass's reads and
    /// writes at the read-and-write roofline) over its time.
    rw_fraction: Option<f64>,
    cpu_ms: Option<f64>,
    /// For vocabulary shards: the host's merge of their partials.
    merge_ms: Option<f64>,
}

/// Random inputs for one shape: `sets` independent copies, so repeated runs read memory
/// rather than a cache that holds one copy.
struct Data {
    rows: usize,
    classes: usize,
    sets: usize,
    logits: ElementVec,
    labels: Vec<i64>,
    probabilities: ElementVec,
}

/// `values` as `dtype` (rounded to nearest even; f32 kept as it is).
fn convert(values: Vec<f32>, dtype: Dtype) -> ElementVec {
    match dtype {
        Dtype::F32 => ElementVec::F32(values),
        half => ElementVec::rounded(half, values.iter().map(|&v| v as f64)),
    }
}

impl Data {
    fn new(
        rng: &mut StdRng,
        (rows, classes): (usize, usize),
        sets: usize,
        dtype: Dtype,
    ) -> Result<Self, CliError> {
        let n = rows * classes * sets;
        // Uniform in [-10, 10), as the peers were measured.
        let mut logits = allocate::<f32>(n, rows, classes)?;
        logits
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-10.0f32..10.0));
        let labels = (0..rows * sets)
            .map(|_| rng.random_range(0..classes as i64))
            .collect();
        let mut probabilities = allocate::<f32>(n, rows, classes)?;
        for row in probabilities.chunks_exact_mut(classes) {
            row.iter_mut().for_each(|v| *v = rng.random::<f32>());
            let total: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= total);
        }
        Ok(Self {
            rows,
            classes,
            sets,
            logits: convert(logits, dtype),
            labels,
            probabilities: convert(probabilities, dtype),
        })
    }

    fn set(&self, i: usize, soft: bool) -> (Logits<'_>, Targets<'_>) {
        let (r, c) = (self.rows, self.classes);
        let range = i * r * c..(i + 1) * r * c;
        let z = self.logits.as_elements().slice(range.clone());
        let t = if soft {
            Targets::Probabilities(self.probabilities.as_elements().slice(range))
        } else {
            Targets::ClassIndices(&self.labels[i * r..(i + 1) * r])
        };
        (Logits::from_elements(z, r, c).expect("shape"), t)
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

/// The loss every row times, with `--z-loss` and `--softcap` checked; and `--shards` checked
/// against every shape.
fn check_arguments(args: &BenchArgs, shapes: &[(usize, usize)]) -> Result<CrossEntropy, CliError> {
    let mut spec = CrossEntropy::new();
    if let Some(lambda) = args.z_loss {
        spec = spec.with_z_loss(lambda);
    }
    if let Some(cap) = args.softcap {
        spec = spec.with_softcap(cap);
    }
    let none = Logits::new::<f32>(&[], 0, 1)?;
    let gpu_limits = match (args.z_loss, args.softcap) {
        // The GPU takes both as f32: a positive λ and the cap must be normal f32s (the
        // library checks this at the first call, which would come after the roofline).
        (Some(lambda), _) if lambda > 0.0 && !(lambda as f32).is_normal() => {
            Err(XentError::ZLoss(lambda))
        }
        (_, Some(cap)) if cap.is_finite() && !(cap as f32).is_normal() => {
            Err(XentError::Softcap(cap))
        }
        _ => Ok(()),
    };
    spec.validate(&none, &Targets::ClassIndices(&[]))
        .and(gpu_limits)
        .map_err(|e| match e {
            XentError::ZLoss(_) => CliError::input(format!("--z-loss: {e}")),
            XentError::Softcap(_) => CliError::input(format!("--softcap: {e}")),
            other => other.into(),
        })?;
    if !(1..=xent::gpu::MAX_SPARSE_K).contains(&args.sparse_k) {
        return Err(CliError::input(format!(
            "--sparse-k {}: the GPU takes 1 to {} entries a row",
            args.sparse_k,
            xent::gpu::MAX_SPARSE_K
        )));
    }
    for &k in &args.shards {
        if k == 0 {
            return Err(CliError::input("--shards 0: must be at least 1"));
        }
        if let Some(&(rows, classes)) = shapes.iter().find(|&&(_, classes)| k > classes) {
            return Err(CliError::input(format!(
                "--shards {k}: more shards than the {classes} classes of shape {rows}x{classes}; every shard needs at least one class"
            )));
        }
    }
    Ok(spec)
}

pub fn run(args: &BenchArgs) -> Result<(), CliError> {
    // Every argument is checked before any work or output, so a mistake costs no measuring.
    let shapes: Vec<(usize, usize)> = if !args.shapes.is_empty() {
        args.shapes.clone()
    } else if args.quick {
        QUICK_SHAPES.to_vec()
    } else {
        DEFAULT_SHAPES.to_vec()
    };
    let spec = check_arguments(args, &shapes)?;
    if let Some(path) = &args.json_out {
        check_writable(path)?;
    }
    let gpu = GpuContext::new()?;
    for kernel in &args.kernel {
        kernel.check(&gpu)?;
    }
    let mut out = Out::lock();
    let device = gpu.describe();
    let timer = gpu.timer();
    let roofline_bytes = if args.quick { 64 << 20 } else { 1 << 30 };
    let roofline: ReadBandwidth =
        gpu.measure_read_bandwidth(roofline_bytes, WARMUP, args.runs as usize)?;
    let roof_gbps = roofline.bytes_per_second() / 1e9;
    // The read-and-write rate, for the gradient's floor: its statistics pass reads, its
    // gradient pass reads and writes.
    let rw_gbps = if args
        .task
        .iter()
        .any(|t| t.task(args.sparse_k).read_write_passes() > 0)
    {
        let rw = gpu.measure_read_write_bandwidth(roofline_bytes, WARMUP, args.runs as usize)?;
        Some(rw.bytes_per_second() / 1e9)
    } else {
        None
    };
    let copy_gbps = if args.path.contains(&PathChoice::Host) {
        let copy = gpu.measure_copy_bandwidth(roofline_bytes.min(256 << 20), WARMUP, 20)?;
        Some(copy.bytes_per_second() / 1e9)
    } else {
        None
    };
    let round_trip_ms = if args.path.contains(&PathChoice::Resident) {
        Some(gpu.time_round_trip(WARMUP, 50)?.median_ms())
    } else {
        None
    };
    if !args.json {
        outln!(out, "device: {device}")?;
        outln!(
            out,
            "read roofline: {roof_gbps:.1} GB/s (plain vec4 read of {} MiB, median of {}, {} timer)",
            roofline.bytes >> 20,
            roofline.timing.samples_ms.len(),
            timer.name()
        )?;
        if let Some(rw) = rw_gbps {
            outln!(
                out,
                "read-and-write roofline: {rw:.1} GB/s (vec4 copy of {} MiB into another buffer, bytes read + written)",
                roofline.bytes >> 21
            )?;
        }
        if let Some(copy) = copy_gbps {
            outln!(
                out,
                "host-to-device copy: {copy:.1} GB/s (write_buffer, submit and wait, wall clock)"
            )?;
        }
        if let Some(ms) = round_trip_ms {
            outln!(
                out,
                "device round trip: {ms:.4} ms (a 16-byte copy submitted, mapped and read: what every blocking read waits for)"
            )?;
        }
        if timer.name() == "wall" {
            outln!(
                out,
                "note: this adapter has no timestamp queries; times are wall clock around submit and wait"
            )?;
        }
    }

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut table = Vec::new();
    for (&(rows, classes), &dtype) in shapes
        .iter()
        .flat_map(|s| args.dtype.iter().map(move |d| (s, d)))
    {
        let set_bytes = (rows * classes * dtype.bytes()) as u64;
        let data = Data::new(
            &mut rng,
            (rows, classes),
            copies(set_bytes, args.quick),
            dtype,
        )?;
        for (target, soft) in [("hard", false), ("soft", true)] {
            // Bytes that must move: the logits (once for the loss; read twice and written once
            // with the gradient), and the targets as the device reads them.
            let target_bytes = if soft { set_bytes } else { rows as u64 * 8 };
            // Top-k targets: k indices and k probabilities a row, 4 bytes each.
            let sparse_bytes = |k: usize| rows as u64 * 8 * k.min(classes) as u64;
            let first = table.len();
            let sets = data.sets(soft);
            let runs = args.runs as usize;
            let mut shard_rows = Vec::new();
            let mut push =
                |task: Task, path: PathChoice, kernel: KernelChoice, ms: f64, note: &str| {
                    let targets = task.sparse_k().map_or(target_bytes, sparse_bytes);
                    let bytes = task.logit_passes() * set_bytes + task.target_passes() * targets;
                    let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                    // The floor of a gradient: the statistics pass's reads at the read rate, the
                    // gradient pass's reads and writes at the read-and-write rate.
                    let rw_bytes = task.read_write_passes() * set_bytes + targets;
                    let rw_fraction = rw_gbps.filter(|_| task.read_write_passes() > 0).map(|rw| {
                        let floor_s = (bytes - rw_bytes) as f64 / (roof_gbps * 1e9)
                            + rw_bytes as f64 / (rw * 1e9);
                        floor_s / (ms * 1e-3)
                    });
                    let task_name = match task.sparse_k() {
                        Some(k) => format!("{}/top-{}", task.name(), k.min(classes)),
                        None => task.name().to_string(),
                    };
                    table.push(Row {
                        rows,
                        classes,
                        dtype,
                        target,
                        task: task_name,
                        path: path.name(),
                        kernel: kernel.name(),
                        strategy: kernel.strategy(&gpu, rows, classes).name() + note,
                        merge_ms: None,
                        ms,
                        gbps,
                        roofline_fraction: gbps / roof_gbps,
                        rw_fraction,
                        cpu_ms: None,
                    });
                };
            for &path in &args.path {
                match path {
                    PathChoice::Kernel => {
                        for &task in &args.task {
                            let needs_soft = task == TaskChoice::Distill;
                            let needs_hard = matches!(
                                task,
                                TaskChoice::Metrics | TaskChoice::Sparse | TaskChoice::SparseGrad
                            );
                            if (soft && needs_hard) || (!soft && needs_soft) {
                                continue;
                            }
                            let task = task.task(args.sparse_k);
                            for &kernel in &args.kernel {
                                let strategy = kernel.strategy(&gpu, rows, classes);
                                let timing =
                                    gpu.time_task(&spec, &sets, strategy, task, WARMUP, runs)?;
                                push(task, path, kernel, timing.median_ms(), "");
                            }
                        }
                        if !soft {
                            for &k in &args.shards {
                                let timing =
                                    gpu.time_vocab_shards(&spec, &sets, k, WARMUP, runs)?;
                                let merge = merge_ms(rows, k);
                                let ms = timing.median_ms();
                                let bytes = set_bytes + target_bytes;
                                let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                                shard_rows.push(Row {
                                    rows,
                                    classes,
                                    dtype,
                                    target,
                                    task: format!("loss/{k} shards"),
                                    path: path.name(),
                                    kernel: "auto",
                                    strategy: format!("{k}x +merge {merge:.3}ms"),
                                    ms,
                                    gbps,
                                    roofline_fraction: gbps / roof_gbps,
                                    rw_fraction: None,
                                    cpu_ms: None,
                                    merge_ms: Some(merge),
                                });
                            }
                        }
                    }
                    PathChoice::Resident => {
                        let timing = gpu.time_resident_calls(&spec, &sets, 0, WARMUP, runs)?;
                        push(Task::Loss, path, KernelChoice::Auto, timing.median_ms(), "");
                    }
                    PathChoice::Pipelined => {
                        for &depth in &args.in_flight {
                            let timing = gpu.time_resident_calls(
                                &spec,
                                &sets,
                                depth as usize,
                                WARMUP,
                                runs,
                            )?;
                            let note = format!(" +{depth}");
                            push(
                                Task::Loss,
                                path,
                                KernelChoice::Auto,
                                timing.median_ms(),
                                &note,
                            );
                        }
                    }
                    PathChoice::Host => {
                        let timing = gpu.time_host_calls(&spec, &sets, WARMUP, runs)?;
                        push(Task::Loss, path, KernelChoice::Auto, timing.median_ms(), "");
                    }
                }
            }
            table.extend(shard_rows);
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
    let json = to_json(
        &table,
        &device,
        timer.name(),
        roof_gbps,
        rw_gbps,
        copy_gbps,
        round_trip_ms,
    )
    .to_string();
    // The results go to stdout first: if the file cannot be written after all, they are not lost.
    if args.json {
        outln!(out, "{json}")?;
    } else {
        print_table(&mut out, &table)?;
    }
    out.finish()?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).map_err(|e| {
            CliError::runtime(format!("--json-out {}: cannot write: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// Wall-clock milliseconds of the host's merge of `k` shards' partials of `rows` rows
/// (median of 21), on partials of the shape a real call gives.
fn merge_ms(rows: usize, k: usize) -> f64 {
    let parts: Vec<Vec<RowPartial>> = (0..k)
        .map(|s| {
            (0..rows)
                .map(|i| RowPartial {
                    m: (i % 7) as f64 + s as f64,
                    s: 1.5 + s as f64,
                    a: -0.25 * s as f64,
                    b: 0.5,
                    h: 0.0,
                })
                .collect()
        })
        .collect();
    let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
    let mut samples: Vec<f64> = (0..21)
        .map(|_| {
            let clock = Instant::now();
            std::hint::black_box(merge_rows(std::hint::black_box(&views)).ok());
            clock.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn print_table(out: &mut Out, table: &[Row]) -> Result<(), CliError> {
    outln!(
        out,
        "{:>14} {:>5} {:>6} {:>19} {:>8} {:>6} {:>22} {:>10} {:>9} {:>9} {:>8} {:>10} {:>9}",
        "N x C",
        "dtype",
        "target",
        "task",
        "path",
        "kernel",
        "strategy",
        "ms",
        "GB/s",
        "roofline",
        "r+w roof",
        "CPU ms",
        "vs naive"
    )?;
    for r in table {
        let naive = table.iter().find(|n| {
            n.kernel == "naive"
                && n.path == r.path
                && n.task == r.task
                && n.rows == r.rows
                && n.classes == r.classes
                && n.dtype == r.dtype
                && n.target == r.target
        });
        let speedup = naive.map_or(String::from("-"), |n| format!("{:.2}x", n.ms / r.ms));
        outln!(
            out,
            "{:>14} {:>5} {:>6} {:>19} {:>8} {:>6} {:>22} {:>10.4} {:>9.1} {:>9.3} {:>8} {:>10} {:>9}",
            format!("{}x{}", r.rows, r.classes),
            r.dtype.name(),
            r.target,
            r.task,
            r.path,
            r.kernel,
            r.strategy,
            r.ms,
            r.gbps,
            r.roofline_fraction,
            r.rw_fraction
                .map_or(String::from("-"), |f| format!("{f:.3}")),
            r.cpu_ms.map_or(String::from("-"), |c| format!("{c:.1}")),
            speedup
        )?;
    }
    Ok(())
}

fn to_json(
    table: &[Row],
    device: &str,
    timer: &str,
    roof_gbps: f64,
    rw_gbps: Option<f64>,
    copy_gbps: Option<f64>,
    round_trip_ms: Option<f64>,
) -> serde_json::Value {
    let rows: Vec<_> = table
        .iter()
        .map(|r| {
            serde_json::json!({
                "rows": r.rows,
                "classes": r.classes,
                "dtype": r.dtype.name(),
                "target": r.target,
                "task": r.task,
                "path": r.path,
                "kernel": r.kernel,
                "strategy": r.strategy,
                "ms": json_f64(r.ms),
                "gbps": json_f64(r.gbps),
                "roofline_fraction": json_f64(r.roofline_fraction),
                "roofline_gbps": json_f64(roof_gbps),
                "rw_roofline_fraction": json_opt(r.rw_fraction),
                "rw_roofline_gbps": json_opt(rw_gbps),
                "cpu_ms": json_opt(r.cpu_ms),
                "merge_ms": json_opt(r.merge_ms),
                "copy_gbps": json_opt(copy_gbps),
                "copy_fraction": json_opt(copy_gbps.filter(|_| r.path == "host").map(|c| r.gbps / c)),
                "round_trip_ms": json_opt(round_trip_ms),
                "device": device,
                "timer": if r.path == "kernel" { timer } else { "wall" },
            })
        })
        .collect();
    serde_json::Value::Array(rows)
}
