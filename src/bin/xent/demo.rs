//! `xent demo`: the main job on a seeded synthetic batch, for a first run.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::{
    CpuReference, CrossEntropy, GpuContext, Logits, LossOutput, Reduction, Scorer, Targets,
};

use crate::CliError;
use crate::out::{Out, outln};

const SEED: u64 = 20261127;

pub fn run() -> Result<(), CliError> {
    let mut out = Out::lock();
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(SEED);
    let gpu = GpuContext::new()?;
    outln!(out, "device: {}", gpu.describe())?;

    // Class indices: 4096 rows of 1000 classes, every 16th row ignored, smoothing 0.1.
    let (rows, classes) = (4096, 1000);
    let logits: Vec<f32> = (0..rows * classes)
        .map(|_| rng.random_range(-10.0..10.0))
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 16 == 0 {
                -100
            } else {
                rng.random_range(0..classes as i64)
            }
        })
        .collect();
    let spec = CrossEntropy::new()
        .with_ignore_index(-100)
        .with_label_smoothing(0.1);
    let z = Logits::new(&logits, rows, classes)?;
    outln!(
        out,
        "\nclass indices: {rows} x {classes}, ignore_index -100, label smoothing 0.1, mean"
    )?;
    compare(&mut out, &gpu, &spec, z, Targets::ClassIndices(&labels))?;

    // Probabilities: peaked soft labels, where CE = H(p) + KL(p‖q).
    let rows = 1024;
    let z = Logits::new(&logits[..rows * classes], rows, classes)?;
    let mut probabilities = Vec::with_capacity(rows * classes);
    for _ in 0..rows {
        let raw: Vec<f64> = (0..classes).map(|_| rng.random::<f64>().powi(8)).collect();
        let total: f64 = raw.iter().sum();
        probabilities.extend(raw.iter().map(|v| (v / total) as f32));
    }
    let spec = CrossEntropy::new().with_reduction(Reduction::Mean);
    outln!(out, "\nprobabilities: {rows} x {classes}, mean")?;
    let probs = compare(
        &mut out,
        &gpu,
        &spec,
        z,
        Targets::probabilities(&probabilities),
    )?;
    if let (Some(ce), Some(h), Some(kl)) = (
        probs.loss,
        probs.reduced_entropy(),
        probs.reduced_kl_divergence(),
    ) {
        outln!(out, "  CE(p, q) {ce:.6} = H(p) {h:.6} + KL(p‖q) {kl:.6}")?;
        outln!(
            out,
            "  H(p) is fixed by the labels; training can only lower the KL part."
        )?;
    }
    outln!(out, "\ndone in {:.2} s", start.elapsed().as_secs_f64())?;
    out.finish()
}

/// Runs `spec` on both paths and prints the values and their agreement.
fn compare(
    out: &mut Out,
    gpu: &GpuContext,
    spec: &CrossEntropy,
    z: Logits<'_>,
    t: Targets<'_>,
) -> Result<LossOutput, CliError> {
    let clock = Instant::now();
    let g = gpu.cross_entropy(spec, z, t)?;
    let gpu_ms = clock.elapsed().as_secs_f64() * 1e3;
    let clock = Instant::now();
    let c = CpuReference.cross_entropy(spec, z, t)?;
    let cpu_ms = clock.elapsed().as_secs_f64() * 1e3;
    let worst = g
        .per_row
        .iter()
        .zip(&c.per_row)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max);
    let (gl, cl) = (g.loss.unwrap_or(f64::NAN), c.loss.unwrap_or(f64::NAN));
    outln!(
        out,
        "  GPU loss {gl:.9}  ({gpu_ms:.1} ms, upload and read-back included)"
    )?;
    outln!(out, "  CPU loss {cl:.9}  ({cpu_ms:.1} ms, f64 reference)")?;
    outln!(
        out,
        "  agreement: |GPU - CPU| / |CPU| = {:.1e} reduced, {worst:.1e} worst row; {} ignored rows",
        (gl - cl).abs() / cl.abs(),
        g.ignored_rows
    )?;
    Ok(g)
}
