//! Library calls end to end (upload, compute, read back) at three sizes, with criterion.
//! `cargo bench` runs it; `xent bench` is the GPU-time instrument with the roofline.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::{CrossEntropy, GpuContext, Logits, Targets};

fn end_to_end(c: &mut Criterion) {
    let gpu = match GpuContext::new() {
        Ok(gpu) => gpu,
        Err(e) => panic!("no GPU adapter for the benchmark: {e}"),
    };
    let mut rng = StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group(format!("cross_entropy on {}", gpu.adapter_info().name));
    group.sample_size(10);
    for (rows, classes) in [(1024, 1000), (256, 32000), (64, 128256)] {
        let logits: Vec<f32> = (0..rows * classes)
            .map(|_| rng.random_range(-10.0..10.0))
            .collect();
        let labels: Vec<i64> = (0..rows)
            .map(|_| rng.random_range(0..classes as i64))
            .collect();
        let z = Logits::new(&logits, rows, classes).expect("shape");
        let spec = CrossEntropy::new();
        group.throughput(Throughput::Bytes((rows * classes * 4) as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{rows}x{classes}")),
            &z,
            |b, &z| {
                b.iter(|| {
                    gpu.cross_entropy(&spec, z, Targets::ClassIndices(&labels))
                        .expect("loss")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
