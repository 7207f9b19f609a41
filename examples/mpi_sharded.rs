//! Cross-entropy across MPI processes, each on its own GPU context, in two ways:
//!
//! - vocabulary-parallel (Megatron's): each rank holds a contiguous block of the classes of
//!   every row (with more ranks than classes, one class each and the rest none, which send
//!   the partials of no classes), computes its per-row partials (`GpuContext::partials`),
//!   and one all-gather of five f32 per row per rank gives every rank every partial; each
//!   merges them in rank order (the same bits on every rank) into the loss, and writes its own
//!   columns of the gradient from the merged statistics (`GpuContext::partial_gradient`),
//!   moving nothing more;
//! - batch-parallel: each rank holds a block of rows, and one sum-reduce of four numbers (Σ
//!   loss, Σ z-loss, the mean's denominator, the rows counted) gives the loss.
//!
//! Both are checked against the loss and gradient of one process on the whole batch; the exit
//! status is 1 if they differ beyond the f32 tolerance. Rank 0 prints the results and the time
//! of the collective beside the time of the kernels.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_sharded
//! mpirun -n 3 target/release/examples/mpi_sharded [ROWS [CLASSES]]
//! ```
//!
//! ROWS (64 by default) and CLASSES (1001) must be at least 1.
//!
//! (As root in a container, OpenMPI wants `--allow-run-as-root`; more ranks than cores want
//! `--oversubscribe`.) Every rank makes the same seeded batch here; a real job would hold only
//! its own block.

use std::process::ExitCode;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::traits::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::shard::{MergeTargets, RowPartial, VocabShard, merge_rows, merged_output};
use xent::{CrossEntropy, GpuContext, Logits, Reduction, Targets, Upstream};

/// Floats a rank sends per row in the vocabulary-parallel mode: m, s, a, b, h.
const PARTIAL_FLOATS: usize = 5;

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("mpi_sharded: MPI could not be initialised");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    // Every rank has the same arguments, so every rank refuses them alike (rank 0 says why).
    let (rows, classes) = match sizes() {
        Ok(sizes) => sizes,
        Err(why) => {
            if rank == 0 {
                eprintln!("mpi_sharded: {why}\nusage: mpi_sharded [ROWS [CLASSES]]");
            }
            return ExitCode::FAILURE;
        }
    };
    match run(&world, rank, ranks, rows, classes) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mpi_sharded: rank {rank}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// ROWS and CLASSES from the command line (64 and 1001 by default), each at least 1.
fn sizes() -> Result<(usize, usize), String> {
    let arg = |i: usize, name: &str, default: usize| match std::env::args().nth(i) {
        None => Ok(default),
        Some(a) => match a.parse::<usize>() {
            Ok(0) => Err(format!(
                "{name} is 0: a batch needs at least one row and one class"
            )),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("{name} {a:?} is not a count: {e}")),
        },
    };
    Ok((arg(1, "ROWS", 64)?, arg(2, "CLASSES", 1001)?))
}

/// The same batch on every rank: logits, and class indices with every 11th row ignored.
fn batch(rows: usize, classes: usize) -> (Vec<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(2026);
    let logits = (0..rows * classes)
        .map(|_| rng.random_range(-6.0..6.0))
        .collect();
    let labels = (0..rows)
        .map(|i| {
            if i % 11 == 3 {
                -100
            } else {
                rng.random_range(0..classes as i64)
            }
        })
        .collect();
    (logits, labels)
}

/// Columns `range` of a row-major matrix `classes` wide.
fn columns(v: &[f32], classes: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    v.chunks(classes)
        .flat_map(|row| row[range.clone()].iter().copied())
        .collect()
}

fn run(
    world: &impl Communicator,
    rank: usize,
    ranks: usize,
    rows: usize,
    classes: usize,
) -> xent::Result<bool> {
    let (logits, labels) = batch(rows, classes);
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_label_smoothing(0.1)
        .with_z_loss(1e-4)
        .with_reduction(Reduction::Mean);
    let gpu = GpuContext::new()?;
    let whole = Logits::new(&logits, rows, classes)?;
    let targets = Targets::ClassIndices(&labels);
    // What one process gives, to check against.
    let (want, want_grad) = gpu.cross_entropy_grad(&spec, whole, targets, Upstream::Scalar(1.0))?;
    let want_loss = want.loss.unwrap_or(f64::NAN);

    // Vocabulary-parallel: this rank's block of classes. With more ranks than classes the
    // split has one shard per class, and the ranks past them hold no classes: they send the
    // partials of no classes (the merge's identity) and write no columns of the gradient.
    let mine = VocabShard::split(classes, ranks).get(rank).cloned();
    let values = mine
        .as_ref()
        .map(|(_, range)| columns(&logits, classes, range.clone()))
        .unwrap_or_default();
    let block = match mine {
        Some((shard, range)) => Some((shard, Logits::new(&values, rows, range.len())?, range)),
        None => None,
    };
    let (partials, kernel_s) = match &block {
        Some((shard, z, _)) => {
            // Once to compile the pipelines, then timed.
            gpu.partials(&spec, *z, targets, *shard)?;
            let clock = Instant::now();
            let partials = gpu.partials(&spec, *z, targets, *shard)?;
            (partials, clock.elapsed().as_secs_f64())
        }
        None => (vec![RowPartial::EMPTY; rows], 0.0),
    };
    let send: Vec<f32> = partials
        .iter()
        .flat_map(|p| [p.m, p.s, p.a, p.b, p.h].map(|v| v as f32))
        .collect();
    let mut all = vec![0.0f32; send.len() * ranks];
    // Every rank at the line first, so the time is the collective's, not a wait for the slowest.
    world.barrier();
    let clock = Instant::now();
    world.all_gather_into(&send[..], &mut all[..]);
    let collective_s = clock.elapsed().as_secs_f64();
    let parts: Vec<Vec<RowPartial>> = all
        .chunks(rows * PARTIAL_FLOATS)
        .map(|rank_rows| {
            rank_rows
                .chunks(PARTIAL_FLOATS)
                .map(|v| {
                    let v = v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                    RowPartial {
                        // f64::MIN, the max of no classes (or of only −inf), is −inf in f32.
                        m: if v[0] == f64::NEG_INFINITY {
                            f64::MIN
                        } else {
                            v[0]
                        },
                        s: v[1],
                        a: v[2],
                        b: v[3],
                        h: v[4],
                    }
                })
                .collect()
        })
        .collect();
    let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
    let clock = Instant::now();
    let merged = merge_rows(&views)?;
    let vocab = merged_output(&spec, classes, &merged, MergeTargets::ClassIndices(&labels))?;
    let merge_s = clock.elapsed().as_secs_f64();
    // This rank's columns of the gradient, against those of the one-process gradient (a NaN
    // counts as the largest error).
    let mut grad_err = 0.0f64;
    if let Some((shard, z, range)) = &block {
        let up = Upstream::Scalar(1.0);
        let grad = gpu.partial_gradient(&spec, *z, targets, *shard, &merged, up)?;
        let want_cols = columns(&want_grad.to_f32(), classes, range.clone());
        if grad.len() != want_cols.len() {
            return Err(xent::XentError::Shard(format!(
                "{} gradient elements for {rows} rows of {} columns",
                grad.len(),
                range.len()
            )));
        }
        grad_err = grad.to_f32().iter().zip(&want_cols).fold(0.0, |e, (g, w)| {
            let d = (g - w).abs() as f64;
            if d.is_nan() || d > e { d } else { e }
        });
    }

    // Batch-parallel: this rank's block of rows, and one sum-reduce.
    let per = rows.div_ceil(ranks);
    let mine = (rank * per).min(rows)..((rank + 1) * per).min(rows);
    let part = gpu.cross_entropy(
        &spec,
        whole.slice_rows(mine.clone()),
        Targets::ClassIndices(&labels[mine]),
    )?;
    let t = part.totals();
    let sums = [
        t.sum,
        t.z_loss_sum.unwrap_or(0.0),
        t.mean_denominator,
        t.counted_rows() as f64,
    ];
    let mut total = [0.0f64; 4];
    world.barrier();
    let clock = Instant::now();
    world.all_reduce_into(&sums[..], &mut total[..], SystemOperation::sum());
    let reduce_s = clock.elapsed().as_secs_f64();
    let rows_loss = spec
        .reduction()
        .apply_with_z_loss(total[0], total[2], Some(total[1]), total[3] as usize)
        .unwrap_or(f64::NAN);

    // The f32 tolerance of a mean loss, and of a gradient element of the mean (DESIGN.md,
    // "Numbers"): largest |logit| 6, target mass about 1.
    let max_ulp = 6.0f64.next_up() - 6.0;
    let loss_tol = 1e-5 * want_loss.abs() + 8.0 * max_ulp;
    let grad_tol = 2.0 * (8.0 * max_ulp + 4e-6) / want.mean_denominator;
    let vocab_loss = vocab.loss.unwrap_or(f64::NAN);
    let ok_here = (vocab_loss - want_loss).abs() <= loss_tol
        && (rows_loss - want_loss).abs() <= loss_tol
        && grad_err <= grad_tol;
    // Every rank's verdict, the slowest rank's times and the largest gradient error (a rank
    // without classes has none).
    let mut all_ok = 0i32;
    world.all_reduce_into(&i32::from(ok_here), &mut all_ok, SystemOperation::min());
    let times = [kernel_s, collective_s, merge_s, reduce_s, grad_err];
    let mut slowest = [0.0f64; 5];
    world.all_reduce_into(&times[..], &mut slowest[..], SystemOperation::max());
    if rank == 0 {
        println!(
            "{ranks} ranks, {rows} rows x {classes} classes, on {}",
            gpu.describe_short()
        );
        println!("one process:          loss {want_loss:.9}");
        println!(
            "vocabulary-parallel:  loss {vocab_loss:.9} (|diff| {:.2e}), gradient columns within {:.2e} (tolerance {grad_tol:.2e})",
            (vocab_loss - want_loss).abs(),
            slowest[4]
        );
        println!(
            "  exchanged {} bytes per row per rank ({PARTIAL_FLOATS} f32); all-gather {:.3} ms, merge {:.3} ms, partials kernel call {:.3} ms (slowest rank)",
            PARTIAL_FLOATS * 4,
            slowest[1] * 1e3,
            slowest[2] * 1e3,
            slowest[0] * 1e3
        );
        println!(
            "batch-parallel:       loss {rows_loss:.9} (|diff| {:.2e}); sum-reduce of 4 f64 {:.3} ms",
            (rows_loss - want_loss).abs(),
            slowest[3] * 1e3
        );
        println!("{}", if all_ok == 1 { "agree" } else { "DISAGREE" });
    }
    Ok(all_ok == 1)
}

/// The adapter in a few words.
trait Describe {
    fn describe_short(&self) -> String;
}

impl Describe for GpuContext {
    fn describe_short(&self) -> String {
        let info = self.adapter_info();
        format!("{} ({:?})", info.name, info.backend)
    }
}
