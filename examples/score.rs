//! Scores a small seeded batch on the GPU and on the CPU reference and prints both.
//!
//! cargo run --release --example score

use xent::{CpuReference, CrossEntropy, GpuContext, Logits, Reduction, Scorer, Targets};

fn main() -> Result<(), xent::XentError> {
    env_logger::init();
    let (rows, classes) = (1000, 50);
    // A small deterministic generator keeps the example free of extra dependencies.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let logits: Vec<f32> = (0..rows * classes)
        .map(|_| (next() * 20.0 - 10.0) as f32)
        .collect();
    let labels: Vec<i64> = (0..rows)
        .map(|_| (next() * classes as f64) as i64)
        .collect();
    let soft: Vec<f32> = {
        let raw: Vec<f64> = (0..rows * classes).map(|_| next().powi(3)).collect();
        raw.chunks(classes)
            .flat_map(|r| {
                let s: f64 = r.iter().sum();
                r.iter().map(move |v| (v / s) as f32)
            })
            .collect()
    };
    let z = Logits::new(&logits, rows, classes)?;

    let gpu = GpuContext::new()?;
    println!("GPU: {}", gpu.describe());
    let hard = CrossEntropy::new().with_label_smoothing(0.1);
    let soft_spec = CrossEntropy::new().with_reduction(Reduction::Mean);
    for (name, spec, targets) in [
        (
            "class indices, ε = 0.1",
            &hard,
            Targets::ClassIndices(&labels),
        ),
        ("probabilities", &soft_spec, Targets::probabilities(&soft)),
    ] {
        let g = gpu.cross_entropy(spec, z, targets)?;
        let c = CpuReference.cross_entropy(spec, z, targets)?;
        println!(
            "{name:24} GPU {:.9}  CPU {:.9}  rel. diff {:.2e}",
            g.loss.unwrap_or(f64::NAN),
            c.loss.unwrap_or(f64::NAN),
            (g.sum - c.sum).abs() / c.sum.abs()
        );
        if let (Some(h), Some(kl)) = (g.reduced_entropy(), g.reduced_kl_divergence()) {
            println!("{:24} = H(p) {h:.6} + KL(p‖q) {kl:.6}", "");
        }
    }
    Ok(())
}
