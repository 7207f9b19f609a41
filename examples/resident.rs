//! xent inside a wgpu program: the logits are made on the GPU (a small WGSL matmul of
//! features by weights, standing in for a model's output layer), scored by xent on the same
//! device and queue, step after step, and only the loss comes back to the host, each step's
//! read while the next step runs.
//!
//! ```text
//! cargo run --release --example resident
//! ```

use wgpu::util::DeviceExt;
use xent::{
    CrossEntropy, DeviceLogits, DeviceTargets, GpuContext, GpuOptions, IndexType, LossShape,
};

/// Rows (tokens), feature width, classes (vocabulary).
const ROWS: usize = 512;
const FEATURES: usize = 64;
const CLASSES: usize = 1000;
/// Steps of the loop.
pub const STEPS: usize = 4;

/// Z = X · W, one invocation per logit.
const MATMUL: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> z: array<f32>;
override ROWS: u32;
override FEATURES: u32;
override CLASSES: u32;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i >= ROWS * CLASSES { return; }
    let row = i / CLASSES;
    let col = i % CLASSES;
    var acc = 0.0;
    for (var f = 0u; f < FEATURES; f++) {
        acc += x[row * FEATURES + f] * w[f * CLASSES + col];
    }
    z[i] = acc;
}
"#;

/// The example's inputs: features, weights and target classes, from a fixed seed.
pub struct Problem {
    /// Features `[ROWS, FEATURES]`.
    pub features: Vec<f32>,
    /// Weights `[FEATURES, CLASSES]`.
    pub weights: Vec<f32>,
    /// One class per row (i64, as PyTorch and burn write them); every 10th row ignored (−100).
    pub targets: Vec<i64>,
}

impl Problem {
    /// Deterministic pseudo-random inputs.
    pub fn new() -> Self {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let features = (0..ROWS * FEATURES).map(|_| next() * 2.0).collect();
        let weights = (0..FEATURES * CLASSES).map(|_| next()).collect();
        let targets = (0..ROWS)
            .map(|i| {
                if i % 10 == 9 {
                    -100
                } else {
                    (i * 7919 % CLASSES) as i64
                }
            })
            .collect();
        Self {
            features,
            weights,
            targets,
        }
    }

    /// The loss spec the example scores with.
    pub fn spec() -> CrossEntropy {
        CrossEntropy::new()
            .with_ignore_index(-100)
            .with_label_smoothing(0.1)
    }

    /// The logits on the host, in f32 as the shader computes them (for checking).
    pub fn logits(&self) -> Vec<f32> {
        let mut z = vec![0.0f32; ROWS * CLASSES];
        for row in 0..ROWS {
            for class in 0..CLASSES {
                let mut acc = 0.0f32;
                for f in 0..FEATURES {
                    acc += self.features[row * FEATURES + f] * self.weights[f * CLASSES + class];
                }
                z[row * CLASSES + class] = acc;
            }
        }
        z
    }

    /// Rows and classes.
    pub fn shape() -> (usize, usize) {
        (ROWS, CLASSES)
    }
}

impl Default for Problem {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens a device as a wgpu program would, makes the logits on it, scores them with xent on
/// the same device and queue, [`STEPS`] times as a training loop would, and returns each
/// step's mean loss (the only values read back).
pub fn run(problem: &Problem) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    // The program's own device (xent's adapter choice, for the environment variables).
    let adapter = xent::gpu::select_adapter()?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("resident example"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;

    // The "model": logits = features · weights, written into a storage buffer.
    let upload = |label, data: &[f32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let x = upload("features", &problem.features);
    let w = upload("weights", &problem.weights);
    let logits = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("logits"),
        size: (ROWS * CLASSES * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let targets = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("targets"),
        contents: bytemuck::cast_slice(&problem.targets),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("matmul"),
        source: wgpu::ShaderSource::Wgsl(MATMUL.into()),
    });
    let constants = [
        ("ROWS", ROWS as f64),
        ("FEATURES", FEATURES as f64),
        ("CLASSES", CLASSES as f64),
    ];
    let matmul = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("matmul"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            ..Default::default()
        },
        cache: None,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("matmul"),
        layout: &matmul.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: x.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: w.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: logits.as_entire_binding(),
            },
        ],
    });

    // xent on the same device and queue, prepared once for this shape.
    let xent = GpuContext::from_device(&device, &queue, GpuOptions::default())?;
    let mut loss = xent.prepare(
        &Problem::spec(),
        LossShape::class_indices(ROWS, CLASSES, IndexType::I64),
    )?;

    // A training loop's shape: each step's encoder holds the model's pass, then the loss's
    // passes; one submission a step. The loss of step i is read while step i + 1 runs
    // (`read_later`), so the device never waits for the host.
    let mut losses = Vec::with_capacity(STEPS);
    let mut pending: Option<xent::PendingTotals> = None;
    for _step in 0..STEPS {
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&matmul);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((ROWS * CLASSES).div_ceil(64) as u32, 1, 1);
        }
        loss.record(
            &mut encoder,
            DeviceLogits::new(&logits, 0, ROWS, CLASSES),
            DeviceTargets::class_indices(&targets, 0, IndexType::I64),
        )?;
        queue.submit([encoder.finish()]);
        // (A real step would also record the gradient and the optimiser's update here.)
        if let Some(previous) = pending.replace(loss.read_later()?) {
            // Only the 96-byte status comes back.
            losses.push(previous.wait()?.loss.expect("mean reduction"));
        }
    }
    if let Some(last) = pending {
        losses.push(last.wait()?.loss.expect("mean reduction"));
    }
    Ok(losses)
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let problem = Problem::new();
    for (step, loss) in run(&problem)?.iter().enumerate() {
        println!(
            "step {step}: mean loss of {ROWS} x {CLASSES} logits made and scored on the GPU: {loss:.9}"
        );
    }
    Ok(())
}
