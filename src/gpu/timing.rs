//! Timing on the device, for the benchmark: the loss kernels on inputs already uploaded, and
//! the read roofline measured by a plain read kernel in the same session.
//!
//! Each timed run is one compute pass with timestamp queries at its start and end, so launch
//! gaps between runs are not counted. Adapters without `TIMESTAMP_QUERY` fall back to the wall
//! clock around submit and wait, and say so.

use std::time::{Duration, Instant};

/// The least time of back-to-back warm-up work before timed runs. An H200 that idled for the
/// host's data generation came back to full clocks in steps: two 20 ms batches could agree
/// while still slow (the first shape measured up to 3x slow after 250 ms), so at least a
/// second.
const WARMUP_TIME: Duration = Duration::from_millis(1000);
/// The most warm-up before timing anyway.
const MAX_WARMUP_TIME: Duration = Duration::from_secs(3);
/// Warm-up batches are grown to at least this much work, so their times mean something.
const WARMUP_BATCH_TIME: Duration = Duration::from_millis(20);

use crate::error::{Result, XentError};
use crate::logits::Logits;
use crate::spec::CrossEntropy;
use crate::targets::Targets;

use super::context::Gpu;
use super::planner::{Strategy, grid};
use super::prepared::{
    BoundInputs, GradientOutput, Output, PARAM_SLOTS, Setup, ShardSetup, Teacher,
};
use super::{
    DeviceLogits, DeviceTargets, GpuContext, IndexType, LossShape, PreparedLoss, TargetLayout,
};
use crate::dtype::ElementVec;
use crate::grad::Upstream;
use crate::shard::{VocabShard, check_shard_targets};

/// How a time was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// GPU timestamp queries around the compute pass.
    Timestamp,
    /// Host wall clock around submit and wait (no timestamp support).
    Wall,
}

impl Timer {
    /// `"timestamp"` or `"wall"`.
    pub fn name(self) -> &'static str {
        match self {
            Timer::Timestamp => "timestamp",
            Timer::Wall => "wall",
        }
    }
}

/// Timed runs of one workload.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Milliseconds per run, in run order.
    pub samples_ms: Vec<f64>,
    /// How they were taken.
    pub timer: Timer,
}

impl Timing {
    /// The median run.
    pub fn median_ms(&self) -> f64 {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }
}

/// The measured read bandwidth.
#[derive(Clone, Debug)]
pub struct ReadBandwidth {
    /// Bytes moved per run (read, and for the read-and-write kernel written).
    pub bytes: u64,
    /// The runs.
    pub timing: Timing,
}

impl ReadBandwidth {
    /// Bytes per second at the median run.
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / (self.timing.median_ms() * 1e-3)
    }
}

impl GpuContext {
    /// Whether runs are timed with timestamp queries.
    pub fn timer(&self) -> Timer {
        if self
            .gpu
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            Timer::Timestamp
        } else {
            Timer::Wall
        }
    }

    /// Times the cross-entropy passes with `strategy` on device-resident inputs: every input
    /// set is uploaded once, then `warmup` untimed and `runs` timed calls of one prepared
    /// loss cycle through the sets (several sets keep repeated runs from just re-reading a
    /// cache). All sets have one shape.
    pub fn time_cross_entropy(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        strategy: Strategy,
        warmup: usize,
        runs: usize,
    ) -> Result<Timing> {
        self.time_task(spec, sets, strategy, Task::Loss, warmup, runs)
    }

    /// Times the passes of `task` with `strategy` on device-resident inputs, as
    /// [`GpuContext::time_cross_entropy`]. The gradient tasks use an upstream gradient of 1
    /// (the spec's reduction must be sum or mean); in place, later runs read the gradient the
    /// earlier ones wrote, which costs the same.
    pub fn time_task(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        strategy: Strategy,
        task: Task,
        warmup: usize,
        runs: usize,
    ) -> Result<Timing> {
        let mut resident = self.resident_sets(spec, sets, strategy, task, None)?;
        let timing = time_passes(&self.gpu, warmup, runs, |encoder, run, timestamps| {
            resident.record(encoder, run, timestamps)
        })?;
        // Every timed call did its work (none ran into another's parameters).
        resident.loss.check_last_call()?;
        Ok(timing)
    }

    /// Wall-clock time per call of whole resident calls on device-resident inputs (after
    /// `warmup` calls): each call recorded and submitted, then, with `in_flight` 0, its totals
    /// read at once (a blocking read); else read with
    /// [`PreparedLoss::read_later`](crate::PreparedLoss::read_later) and the totals of the call
    /// `in_flight` calls back waited for, so that many calls run while the host waits (a
    /// pipelined loop; in steady state its time per call).
    pub fn time_resident_calls(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        in_flight: usize,
        warmup: usize,
        runs: usize,
    ) -> Result<Timing> {
        let (rows, classes) = sets.first().map_or((0, 1), |s| (s.0.rows(), s.0.classes()));
        let mut resident =
            self.resident_sets(spec, sets, self.plan(rows, classes), Task::Loss, None)?;
        let mut pending = std::collections::VecDeque::new();
        let mut call = |run: usize| -> Result<()> {
            let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
            resident.record(&mut encoder, run, None)?;
            self.gpu.queue.submit([encoder.finish()]);
            if in_flight == 0 {
                return resident.loss.read_totals().map(|_| ());
            }
            pending.push_back(resident.loss.read_later()?);
            if pending.len() > in_flight {
                pending.pop_front().map(|p| p.wait()).transpose()?;
            }
            Ok(())
        };
        wall_clock(warmup, runs, &mut call)
    }

    /// Wall-clock time of the device round trip a blocking read costs whatever the loss: an
    /// encoder that copies 16 bytes into a read-back buffer, submitted, mapped and read.
    pub fn time_round_trip(&self, warmup: usize, runs: usize) -> Result<Timing> {
        let gpu = &self.gpu;
        let source = gpu.storage_buffer("xent round trip", 16, wgpu::BufferUsages::COPY_SRC);
        let back = gpu.readback_buffer("xent round trip read-back", 16);
        let mut call = |_| {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(&source, 0, &back, 0, 16);
            gpu.queue.submit([encoder.finish()]);
            gpu.fetch(&[(&back, 16)]).map(|_| ())
        };
        wall_clock(warmup, runs, &mut call)
    }

    /// Wall-clock time of whole host calls ([`GpuContext::cross_entropy`]: upload, passes,
    /// read-back of the results).
    pub fn time_host_calls(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        warmup: usize,
        runs: usize,
    ) -> Result<Timing> {
        let mut call = |run: usize| -> Result<()> {
            let (logits, targets) = sets[run % sets.len()];
            self.cross_entropy(spec, logits, targets).map(|_| ())
        };
        wall_clock(warmup, runs, &mut call)
    }

    /// Host-to-device copy bandwidth: `Queue::write_buffer` of `bytes` from host memory into a
    /// device buffer, submitted and waited for, wall clock.
    pub fn measure_copy_bandwidth(
        &self,
        bytes: u64,
        warmup: usize,
        runs: usize,
    ) -> Result<ReadBandwidth> {
        let gpu = &self.gpu;
        let bytes = bytes.min(gpu.facts.max_binding_bytes) & !15;
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let target = gpu.storage_buffer("xent copy target", bytes, wgpu::BufferUsages::COPY_DST);
        let mut copy = |_| {
            gpu.scoped("timing a copy", || {
                gpu.queue.write_buffer(&target, 0, &data);
                gpu.queue.submit([]);
                gpu.wait()
            })
        };
        let timing = wall_clock(warmup, runs, &mut copy)?;
        Ok(ReadBandwidth { bytes, timing })
    }

    /// Uploads `sets` into device buffers and prepares one loss for them.
    /// Times the partials of a batch split into `shards` vocabulary shards on this one GPU
    /// (class-index sets): each shard's columns uploaded as its own buffer and prepared as its
    /// own loss, the shards' passes recorded one after another and timed from the first's start
    /// to the last's end. The merge of their partials happens on the host (time it apart).
    pub fn time_vocab_shards(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        shards: usize,
        warmup: usize,
        runs: usize,
    ) -> Result<Timing> {
        let Some(&(first, _)) = sets.first() else {
            return Err(XentError::NotPrepared("no input sets to time".into()));
        };
        let (rows, classes) = (first.rows(), first.classes());
        let mut residents = Vec::new();
        for (shard, range) in VocabShard::split(classes, shards) {
            let blocks: Vec<ElementVec> = sets
                .iter()
                .map(|(z, _)| z.values().columns(classes, range.clone()))
                .collect();
            let shard_sets = blocks
                .iter()
                .zip(sets)
                .map(|(b, &(_, t))| {
                    Ok((
                        Logits::from_elements(b.as_elements(), rows, range.len())?,
                        t,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let setup = super::shard::shard_setup(shard)?;
            let strategy = self.plan(rows, range.len());
            residents.push(self.resident_sets(
                spec,
                &shard_sets,
                strategy,
                Task::Loss,
                Some(setup),
            )?);
        }
        let last = residents.len() - 1;
        let timing = time_passes(&self.gpu, warmup, runs, |encoder, run, timestamps| {
            for (i, resident) in residents.iter_mut().enumerate() {
                // The first shard's pass starts the clock and the last's stops it.
                let writes = timestamps
                    .as_ref()
                    .filter(|_| i == 0 || i == last)
                    .map(|t| wgpu::ComputePassTimestampWrites {
                        query_set: t.query_set,
                        beginning_of_pass_write_index: t
                            .beginning_of_pass_write_index
                            .filter(|_| i == 0),
                        end_of_pass_write_index: t.end_of_pass_write_index.filter(|_| i == last),
                    });
                resident.record(encoder, run, writes)?;
            }
            Ok(())
        })?;
        for resident in &residents {
            resident.loss.check_last_call()?;
        }
        Ok(timing)
    }

    fn resident_sets(
        &self,
        spec: &CrossEntropy,
        sets: &[(Logits<'_>, Targets<'_>)],
        strategy: Strategy,
        task: Task,
        shard: Option<ShardSetup>,
    ) -> Result<ResidentSets> {
        let gpu = &self.gpu;
        let Some(&(first, first_targets)) = sets.first() else {
            return Err(XentError::NotPrepared("no input sets to time".into()));
        };
        let (rows, classes) = (first.rows(), first.classes());
        let top_k = task.sparse_k().unwrap_or(0).min(classes);
        let layout = match (first_targets, task) {
            (Targets::ClassIndices(_), Task::Sparse { .. } | Task::SparseGradient { .. }) => {
                TargetLayout::TopK { k: top_k as u32 }
            }
            (Targets::ClassIndices(_), _) => TargetLayout::ClassIndices(IndexType::I64),
            (Targets::Probabilities(p), _) => TargetLayout::Probabilities(p.dtype()),
        };
        let dtype = first.dtype();
        let shape = LossShape::new(rows, classes, layout).with_dtype(dtype);
        let setup = Setup {
            metrics: task == Task::Metrics,
            shard,
            teacher: (task == Task::Distill).then_some(Teacher {
                inv_temperature: 0.5f32.to_bits(),
                divergence: 0,
                beta: 0,
                grad_factor: 0.5f64.to_bits(),
            }),
            ..Setup::new(strategy, Some(layout), Output::Loss)
        };
        if task == Task::Distill && !layout.is_probabilities() {
            return Err(XentError::NotPrepared(
                "distillation times soft-target sets (the teacher's stand-in)".into(),
            ));
        }
        let mut loss = PreparedLoss::new(self.gpu.clone(), spec, shape, setup)?;
        if loss.rows_per_chunk() < rows {
            return Err(XentError::NotPrepared(format!(
                "{rows} rows do not fit one binding ({} rows do)",
                loss.rows_per_chunk()
            )));
        }
        let mut bound = Vec::with_capacity(sets.len());
        for &(logits, targets) in sets {
            match shard {
                Some(s) => {
                    let whole = VocabShard::new(s.offset as usize, s.total as usize);
                    check_shard_targets(spec, &logits, &targets, whole)?;
                }
                None => spec.validate(&logits, &targets)?,
            }
            if (logits.rows(), logits.classes(), logits.dtype()) != (rows, classes, dtype) {
                return Err(XentError::NotPrepared(
                    "input sets of different shapes".into(),
                ));
            }
            let top_k_words: Vec<u32>;
            let target_bytes: &[u8] = match (targets, layout) {
                (Targets::ClassIndices(y), TargetLayout::TopK { .. }) => {
                    top_k_words = top_k_targets(y, classes, top_k);
                    bytemuck::cast_slice(&top_k_words)
                }
                (Targets::ClassIndices(y), _) => bytemuck::cast_slice(y),
                (Targets::Probabilities(p), _) => p.bytes(),
            };
            let logit_bytes: &[u8] = logits.values().bytes();
            let buffers = gpu.scoped("uploading benchmark inputs", || {
                let upload = |label, bytes: &[u8]| {
                    let size = (bytes.len() as u64).next_multiple_of(4);
                    let b = gpu.storage_buffer(label, size, wgpu::BufferUsages::COPY_DST);
                    super::host::write_words(&gpu.queue, &b, 0, bytes);
                    b
                };
                let gradient = task.separate_gradient().then(|| {
                    gpu.storage_buffer(
                        "xent bench gradient",
                        (logit_bytes.len() as u64).next_multiple_of(4),
                        wgpu::BufferUsages::empty(),
                    )
                });
                Ok((
                    upload("xent bench logits", logit_bytes),
                    upload("xent bench targets", target_bytes),
                    gradient,
                ))
            })?;
            let view = DeviceLogits::new(&buffers.0, 0, rows, classes).with_dtype(dtype);
            let targets = DeviceTargets::of_layout(&buffers.1, 0, layout);
            bound.push(match (task, &buffers.2) {
                (Task::Loss | Task::Metrics | Task::Distill | Task::Sparse { .. }, _) => {
                    loss.bind(view, targets)?
                }
                (Task::GradientInPlace, _) => {
                    loss.bind_gradient(view, targets, GradientOutput::InPlace)?
                }
                (Task::Gradient | Task::SparseGradient { .. }, gradient) => {
                    let buffer = gradient.as_ref().expect("made for this task");
                    let out = GradientOutput::Buffer { buffer, offset: 0 };
                    loss.bind_gradient(view, targets, out)?
                }
            });
        }
        Ok(ResidentSets {
            loss,
            bound,
            gradient: task.separate_gradient() || task == Task::GradientInPlace,
        })
    }
    /// Measures the read bandwidth with `read_bandwidth.wgsl` over a buffer of about `bytes`
    /// (capped at one binding) filled with non-zero data.
    pub fn measure_read_bandwidth(
        &self,
        bytes: u64,
        warmup: usize,
        runs: usize,
    ) -> Result<ReadBandwidth> {
        self.measure_bandwidth(Bandwidth::Read, bytes, warmup, runs)
    }

    /// Measures the read-and-write bandwidth with `read_bandwidth.wgsl` (`COPY`): a copy of about
    /// `bytes / 2` into a second buffer as large, `bytes` moved a run (the rate of the
    /// gradient pass's traffic: it reads and writes the logits' bytes alike).
    pub fn measure_read_write_bandwidth(
        &self,
        bytes: u64,
        warmup: usize,
        runs: usize,
    ) -> Result<ReadBandwidth> {
        self.measure_bandwidth(Bandwidth::ReadWrite, bytes, warmup, runs)
    }

    fn measure_bandwidth(
        &self,
        kind: Bandwidth,
        bytes: u64,
        warmup: usize,
        runs: usize,
    ) -> Result<ReadBandwidth> {
        let gpu = &self.gpu;
        let buffer = match kind {
            Bandwidth::Read => bytes,
            Bandwidth::ReadWrite => bytes / 2,
        };
        let buffer = buffer.min(gpu.facts.max_binding_bytes) & !15;
        let (pipeline, bind_group) = gpu.scoped("preparing the bandwidth kernel", || {
            Ok(bandwidth_pipeline(gpu, kind, buffer))
        })?;
        let workgroups = (buffer / 16).div_ceil(256 * 8).clamp(1, 65_535) as u32;
        let timing = time_passes(gpu, warmup, runs, |encoder, _, timestamps| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("xent bandwidth"),
                timestamp_writes: timestamps,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            let (x, y) = grid(workgroups, gpu.facts.max_groups_per_dimension);
            pass.dispatch_workgroups(x, y, 1);
            Ok(())
        })?;
        let bytes = match kind {
            Bandwidth::Read => buffer,
            Bandwidth::ReadWrite => 2 * buffer,
        };
        Ok(ReadBandwidth { bytes, timing })
    }
}

/// What a bandwidth kernel measures.
#[derive(Clone, Copy)]
enum Bandwidth {
    /// `read_bandwidth.wgsl`: reads only.
    Read,
    /// `read_bandwidth.wgsl` with `COPY`: as many bytes written as read.
    ReadWrite,
}

fn bandwidth_pipeline(
    gpu: &Gpu,
    kind: Bandwidth,
    bytes: u64,
) -> (wgpu::ComputePipeline, wgpu::BindGroup) {
    let device = &gpu.device;
    let (copy, sink_bytes) = match kind {
        Bandwidth::Read => (0.0, 16),
        Bandwidth::ReadWrite => (1.0, bytes),
    };
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("read_bandwidth.wgsl"),
        source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/read_bandwidth.wgsl").into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("read_bandwidth.wgsl"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &[("COPY", copy)],
            ..Default::default()
        },
        cache: None,
    });
    let data = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("xent bandwidth data"),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    // Non-zero data, written in pieces so the host never holds the whole buffer.
    let piece: Vec<f32> = (0..(1 << 22))
        .map(|i| 1.0 + (i % 1021) as f32 * 1e-3)
        .collect();
    let piece = bytemuck::cast_slice::<f32, u8>(&piece);
    let mut offset = 0;
    while offset < bytes {
        let n = (piece.len() as u64).min(bytes - offset) as usize;
        gpu.queue.write_buffer(&data, offset, &piece[..n]);
        offset += n as u64;
    }
    let sink = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("xent bandwidth sink"),
        size: sink_bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("xent bandwidth"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: data.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: sink.as_entire_binding(),
            },
        ],
    });
    (pipeline, bind_group)
}

/// Packed top-k targets (`TargetLayout::TopK`) from class indices: per row the k classes
/// y, y + s, y + 2s, … (mod C, s = C / k: distinct) with probability 1/k each.
fn top_k_targets(labels: &[i64], classes: usize, k: usize) -> Vec<u32> {
    let stride = (classes / k).max(1);
    let p = (1.0 / k as f32).to_bits();
    labels
        .iter()
        .flat_map(|&y| {
            let indices = (0..k).map(move |j| ((y as usize + j * stride) % classes) as u32);
            indices.chain(std::iter::repeat_n(p, k))
        })
        .collect()
}

/// What a benchmark times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The loss: one read of the logits.
    Loss,
    /// The loss and its gradient into a separate buffer: two reads and one write.
    Gradient,
    /// The loss and its gradient over the logits.
    GradientInPlace,
    /// The loss and the token metrics in the same read of the logits (class indices).
    Metrics,
    /// Forward distillation at T = 2 against a teacher's logits of the logits' shape and
    /// dtype (the soft targets' arrays stand in for them): one read of each.
    Distill,
    /// Cross-entropy against top-k sparse targets made from the class indices (min(k, C)
    /// distinct classes a row, the target's among them, probability 1/k each).
    Sparse {
        /// Entries a row (at most [`crate::gpu::MAX_SPARSE_K`]).
        k: usize,
    },
    /// The same and its gradient into a separate buffer.
    SparseGradient {
        /// Entries a row (at most [`crate::gpu::MAX_SPARSE_K`]).
        k: usize,
    },
}

impl Task {
    /// `loss`, `grad` or `grad-inplace`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Loss => "loss",
            Task::Gradient => "grad",
            Task::GradientInPlace => "grad-inplace",
            Task::Metrics => "metrics",
            Task::Distill => "distill",
            Task::Sparse { .. } => "sparse",
            Task::SparseGradient { .. } => "sparse-grad",
        }
    }

    /// The top-k entries a row of a sparse task.
    pub fn sparse_k(self) -> Option<usize> {
        match self {
            Task::Sparse { k } | Task::SparseGradient { k } => Some(k),
            _ => None,
        }
    }

    /// The task writes its gradient into a buffer of its own.
    fn separate_gradient(self) -> bool {
        matches!(self, Task::Gradient | Task::SparseGradient { .. })
    }

    /// Times the targets are read: once by the loss, again by the gradient pass; never for
    /// distillation, whose teacher is its second logits matrix ([`Task::logit_passes`]).
    pub fn target_passes(self) -> u64 {
        match self {
            Task::Loss | Task::Metrics | Task::Sparse { .. } => 1,
            Task::Distill => 0,
            Task::Gradient | Task::GradientInPlace | Task::SparseGradient { .. } => 2,
        }
    }

    /// Bytes of logits read and written in the gradient pass, of the `logit_passes` (the rest
    /// is read once by the statistics pass): 2 with the gradient, else 0.
    pub fn read_write_passes(self) -> u64 {
        match self {
            Task::Gradient | Task::GradientInPlace | Task::SparseGradient { .. } => 2,
            _ => 0,
        }
    }

    /// Times the logits are read or written: 1 for the loss, 2 for distillation (the
    /// student's and the teacher's), 3 with the gradient.
    pub fn logit_passes(self) -> u64 {
        match self {
            Task::Loss | Task::Metrics | Task::Sparse { .. } => 1,
            Task::Distill => 2,
            Task::Gradient | Task::GradientInPlace | Task::SparseGradient { .. } => 3,
        }
    }
}

/// Device-resident input sets and the prepared loss that scores them (each set bound once).
struct ResidentSets {
    loss: PreparedLoss,
    bound: Vec<BoundInputs>,
    gradient: bool,
}

impl ResidentSets {
    /// Records the call of run `run` (on set `run % sets`).
    fn record(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        run: usize,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let inputs = &self.bound[run % self.bound.len()];
        let upstream = self.gradient.then_some(Upstream::Scalar(1.0));
        self.loss
            .record_bound_timed(encoder, inputs, upstream, timestamps)
    }
}

/// Wall-clock milliseconds of `runs` calls after `warmup` (and at least [`WARMUP_TIME`]).
fn wall_clock(
    warmup: usize,
    runs: usize,
    call: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    let start = Instant::now();
    let mut done = 0;
    while done < warmup || start.elapsed() < WARMUP_TIME {
        call(done)?;
        done += 1;
    }
    let mut samples_ms = Vec::with_capacity(runs);
    for run in 0..runs {
        let start = Instant::now();
        call(done + run)?;
        samples_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing {
        samples_ms,
        timer: Timer::Wall,
    })
}

/// Records `runs` with `record` and submits them [`PARAM_SLOTS`] at a time: a prepared loss
/// keeps the parameters of at most that many calls per submission.
fn submit_runs(
    gpu: &Gpu,
    runs: std::ops::Range<usize>,
    mut record: impl FnMut(&mut wgpu::CommandEncoder, usize) -> Result<()>,
) -> Result<()> {
    for first in runs.clone().step_by(PARAM_SLOTS) {
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        for run in first..(first + PARAM_SLOTS).min(runs.end) {
            record(&mut encoder, run)?;
        }
        gpu.queue.submit([encoder.finish()]);
    }
    Ok(())
}

/// Runs `record` at least `warmup` times (and for at least [`WARMUP_TIME`]), then `runs` more
/// times, each run one compute pass, and times those; runs are submitted as [`submit_runs`]
/// does.
fn time_passes(
    gpu: &Gpu,
    warmup: usize,
    runs: usize,
    mut record: impl FnMut(
        &mut wgpu::CommandEncoder,
        usize,
        Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()>,
) -> Result<Timing> {
    gpu.scoped("timing GPU work", || {
        // Warm up with back-to-back work for at least WARMUP_TIME and until the time per run
        // settles (two batches of at least WARMUP_BATCH_TIME within 3 %): a GPU that idled
        // during the host's work has lowered its clocks.
        let start = Instant::now();
        let mut done = 0;
        let mut batch = warmup.max(1);
        let mut last: Option<f64> = None;
        loop {
            let clock = Instant::now();
            submit_runs(gpu, done..done + batch, |encoder, run| {
                record(encoder, run, None)
            })?;
            gpu.wait()?;
            done += batch;
            let took = clock.elapsed();
            let per_run = took.as_secs_f64() / batch as f64;
            let settled =
                took >= WARMUP_BATCH_TIME && last.is_some_and(|l| (per_run - l).abs() <= 0.03 * l);
            if took < WARMUP_BATCH_TIME && batch < 1 << 14 {
                batch *= 2;
                last = None;
            } else {
                last = Some(per_run);
            }
            let elapsed = start.elapsed();
            if done >= warmup && elapsed >= WARMUP_TIME && (settled || elapsed >= MAX_WARMUP_TIME) {
                break;
            }
        }
        let warmup = done;
        if !gpu
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            let mut samples_ms = Vec::with_capacity(runs);
            for run in 0..runs {
                let start = Instant::now();
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                record(&mut encoder, warmup + run, None)?;
                gpu.queue.submit([encoder.finish()]);
                gpu.wait()?;
                samples_ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
            return Ok(Timing {
                samples_ms,
                timer: Timer::Wall,
            });
        }
        let count = 2 * runs as u32;
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("xent timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let bytes = count as u64 * 8;
        let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent timestamps read-back"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        submit_runs(gpu, 0..runs, |encoder, run| {
            let writes = wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(2 * run as u32),
                end_of_pass_write_index: Some(2 * run as u32 + 1),
            };
            record(encoder, warmup + run, Some(writes))
        })?;
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
        encoder.copy_buffer_to_buffer(&resolved, 0, &readback, 0, bytes);
        gpu.queue.submit([encoder.finish()]);
        let data = gpu.read_back(&[(&readback, bytes)])?;
        let ticks: &[u64] = bytemuck::cast_slice(&data[0]);
        let period_ns = gpu.queue.get_timestamp_period() as f64;
        let samples_ms = ticks
            .chunks(2)
            .map(|t| t[1].wrapping_sub(t[0]) as f64 * period_ns * 1e-6)
            .collect();
        Ok(Timing {
            samples_ms,
            timer: Timer::Timestamp,
        })
    })
}
