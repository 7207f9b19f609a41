//! Running one job on the device: buffers sized for the largest chunk, then for each chunk
//! of rows an upload, the passes, and a read-back of per-row results and workgroup sums.

use bytemuck::{Pod, Zeroable};
use std::ops::Range;

use crate::error::{Result, XentError};
use crate::logits::Logits;

use super::context::Gpu;
use super::pipelines::{Kernel, LossVariant, PipelineKey, slot};
use super::planner::{ChunkPlan, Strategy, grid};

/// `Params` in `rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    classes: u32,
    smoothing: f32,
    smoothing_per_class: f32,
}

/// Bytes of one `RowStats` in `row_stats.wgsl`.
const ROW_STATS_BYTES: u64 = 20;
/// Bytes of one row's results, `vec4<f32>`.
const ROW_RESULT_BYTES: u64 = 16;
/// Bytes of one workgroup sum, `vec2<f32>`.
const GROUP_SUM_BYTES: u64 = 8;

/// Targets as the device reads them.
pub(crate) enum JobTargets<'a> {
    /// Log-sum-exp or log-softmax only.
    None,
    /// One class index per row, −1 for an ignored row.
    ClassIndices(Vec<i32>),
    /// Probabilities shaped like the logits.
    Probabilities(&'a [f32]),
}

/// One kernel run over a batch of rows.
pub(crate) struct Job<'a> {
    pub kernel: Kernel,
    pub logits: Logits<'a>,
    pub targets: JobTargets<'a>,
    pub weights: Option<&'a [f32]>,
    pub smoothing: f64,
    pub strategy: Strategy,
    pub variant: LossVariant,
}

/// What comes back from a job.
pub(crate) struct JobOutput {
    /// Per row: (loss, log-sum-exp, entropy, 0).
    pub rows: Vec<[f32; 4]>,
    /// Σ over workgroup sums, in f64.
    pub loss_sum: f64,
    pub entropy_sum: f64,
    /// Log-probabilities, row-major, for [`Kernel::LogSoftmax`].
    pub log_probs: Vec<f32>,
}

/// The device buffers of a job, sized for its largest chunk, and their bind group.
pub(crate) struct Resources {
    params: wgpu::Buffer,
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    row_results: wgpu::Buffer,
    group_sums: wgpu::Buffer,
    log_probs: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    main: std::sync::Arc<wgpu::ComputePipeline>,
    merge: Option<std::sync::Arc<wgpu::ComputePipeline>>,
}

fn storage(gpu: &Gpu, label: &str, bytes: u64, extra: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        // Bindings of vec4 arrays need whole vec4s, and an unused binding still needs room
        // for one element of its array (a RowStats is 20 bytes).
        size: bytes.max(32).next_multiple_of(16),
        usage: wgpu::BufferUsages::STORAGE | extra,
        mapped_at_creation: false,
    })
}

fn readback(gpu: &Gpu, label: &str, bytes: u64) -> wgpu::Buffer {
    gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(16).next_multiple_of(16),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

impl Resources {
    /// Allocates for chunks of up to `max_rows` rows and uploads what all chunks share.
    pub(crate) fn new(gpu: &Gpu, job: &Job<'_>, max_rows: usize) -> Self {
        let classes = job.logits.classes() as u64;
        let rows = max_rows as u64;
        let copy_dst = wgpu::BufferUsages::COPY_DST;
        let copy_src = wgpu::BufferUsages::COPY_SRC;
        let logits_bytes = rows * classes * 4;
        let targets_bytes = match job.targets {
            JobTargets::None => 0,
            JobTargets::ClassIndices(_) => rows * 4,
            JobTargets::Probabilities(_) => logits_bytes,
        };
        let s = &job.strategy;
        let groups = Self::final_groups(s, max_rows, gpu.facts.max_groups_per_dimension);
        let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent params"),
            size: std::mem::size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | copy_dst,
            mapped_at_creation: false,
        });
        let logits = storage(gpu, "xent logits", logits_bytes, copy_dst);
        let targets = storage(gpu, "xent targets", targets_bytes, copy_dst);
        let weights = storage(gpu, "xent class weights", classes * 4, copy_dst);
        if let Some(w) = job.weights {
            gpu.queue.write_buffer(&weights, 0, bytemuck::cast_slice(w));
        }
        let row_results = storage(gpu, "xent row results", rows * ROW_RESULT_BYTES, copy_src);
        let group_sums = storage(gpu, "xent group sums", groups * GROUP_SUM_BYTES, copy_src);
        let split_bytes = if s.split > 1 {
            rows * s.split as u64 * ROW_STATS_BYTES
        } else {
            0
        };
        let split_stats = storage(
            gpu,
            "xent split stats",
            split_bytes,
            wgpu::BufferUsages::empty(),
        );
        let log_probs_bytes = if job.kernel == Kernel::LogSoftmax {
            logits_bytes
        } else {
            0
        };
        let log_probs = storage(gpu, "xent log-probs", log_probs_bytes, copy_src);

        let buffers = [
            (slot::PARAMS, &params),
            (slot::LOGITS, &logits),
            (slot::TARGETS, &targets),
            (slot::WEIGHTS, &weights),
            (slot::ROW_RESULTS, &row_results),
            (slot::GROUP_SUMS, &group_sums),
            (slot::SPLIT_STATS, &split_stats),
            (slot::LOG_PROBS, &log_probs),
        ];
        let entries: Vec<_> = buffers
            .iter()
            .map(|(binding, buffer)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent rows"),
            layout: &gpu.pipelines.bind_group_layout,
            entries: &entries,
        });
        let key = |kernel| PipelineKey {
            kernel,
            strategy: job.strategy,
            variant: job.variant,
        };
        let main = gpu.pipelines.get(&gpu.device, key(job.kernel));
        let merge =
            (s.split > 1).then(|| gpu.pipelines.get(&gpu.device, key(Kernel::MergeSplitRows)));
        Self {
            params,
            logits,
            targets,
            row_results,
            group_sums,
            log_probs,
            bind_group,
            main,
            merge,
        }
    }

    /// Workgroups of the main pass for `rows` rows.
    fn main_groups(s: &Strategy, rows: usize) -> u32 {
        (rows as u32).div_ceil(s.rows_per_group()) * s.split
    }

    /// Workgroup sums written for `rows` rows: the whole 2-D grid of the last pass, dead
    /// groups included. Grows with `rows`, so the largest chunk sizes the buffers.
    fn final_groups(s: &Strategy, rows: usize, max_per_dimension: u32) -> u64 {
        let groups = if s.split > 1 {
            (rows as u32).div_ceil(s.workgroup_size)
        } else {
            Self::main_groups(s, rows)
        };
        let (x, y) = grid(groups, max_per_dimension);
        x as u64 * y as u64
    }

    /// Uploads rows `range` of the job and returns the chunk's row count.
    pub(crate) fn upload(&self, gpu: &Gpu, job: &Job<'_>, range: Range<usize>) -> usize {
        let classes = job.logits.classes();
        let params = Params {
            rows: range.len() as u32,
            classes: classes as u32,
            smoothing: job.smoothing as f32,
            smoothing_per_class: (job.smoothing / classes as f64) as f32,
        };
        gpu.queue
            .write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
        let logits = job.logits.slice_rows(range.clone());
        gpu.queue
            .write_buffer(&self.logits, 0, bytemuck::cast_slice(logits.values()));
        match &job.targets {
            JobTargets::None => {}
            JobTargets::ClassIndices(y) => {
                gpu.queue
                    .write_buffer(&self.targets, 0, bytemuck::cast_slice(&y[range.clone()]));
            }
            JobTargets::Probabilities(p) => {
                let p = &p[range.start * classes..range.end * classes];
                gpu.queue
                    .write_buffer(&self.targets, 0, bytemuck::cast_slice(p));
            }
        }
        range.len()
    }

    /// Records the job's passes for a chunk of `rows` rows, in one compute pass; returns how
    /// many workgroup sums the last pass wrote.
    pub(crate) fn encode(
        &self,
        gpu: &Gpu,
        s: &Strategy,
        rows: usize,
        encoder: &mut wgpu::CommandEncoder,
        timestamp_writes: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> u32 {
        let max_dim = gpu.facts.max_groups_per_dimension;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("xent"),
            timestamp_writes,
        });
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.set_pipeline(&self.main);
        let (x, y) = grid(Self::main_groups(s, rows), max_dim);
        pass.dispatch_workgroups(x, y, 1);
        let mut written = x * y;
        if let Some(merge) = &self.merge {
            pass.set_pipeline(merge);
            let (x, y) = grid((rows as u32).div_ceil(s.workgroup_size), max_dim);
            pass.dispatch_workgroups(x, y, 1);
            written = x * y;
        }
        written
    }
}

/// Maps `buffers` (each with the byte count wanted), waits, and copies their contents out.
pub(crate) fn read_back(gpu: &Gpu, buffers: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>> {
    let receivers: Vec<_> = buffers
        .iter()
        .map(|(buffer, bytes)| {
            let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
            buffer
                .slice(..*bytes)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
            rx
        })
        .collect();
    gpu.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| XentError::Gpu {
            context: "waiting for the device".into(),
            detail: e.to_string(),
        })?;
    let mut out = Vec::with_capacity(buffers.len());
    for ((buffer, bytes), rx) in buffers.iter().zip(receivers) {
        match pollster::block_on(rx.receive()) {
            Some(Ok(())) => {}
            other => {
                return Err(XentError::Gpu {
                    context: "reading results back".into(),
                    detail: format!("buffer map failed: {other:?}"),
                });
            }
        }
        let view = buffer
            .slice(..*bytes)
            .get_mapped_range()
            .map_err(|e| XentError::Gpu {
                context: "reading results back".into(),
                detail: e.to_string(),
            })?;
        out.push(view.to_vec());
        drop(view);
        buffer.unmap();
    }
    Ok(out)
}

/// Runs `job` chunk by chunk.
pub(crate) fn run(gpu: &Gpu, job: &Job<'_>) -> Result<JobOutput> {
    let rows = job.logits.rows();
    let classes = job.logits.classes();
    let plan = ChunkPlan::new(rows, classes, &job.strategy, &gpu.facts)?;
    gpu.scoped("running the loss kernels", || {
        let res = Resources::new(gpu, job, plan.rows_per_chunk);
        let row_bytes = plan.rows_per_chunk as u64 * ROW_RESULT_BYTES;
        let rows_back = readback(gpu, "xent row results read-back", row_bytes);
        let groups = Resources::final_groups(
            &job.strategy,
            plan.rows_per_chunk,
            gpu.facts.max_groups_per_dimension,
        );
        let sums_back = readback(gpu, "xent group sums read-back", groups * GROUP_SUM_BYTES);
        let wants_log_probs = job.kernel == Kernel::LogSoftmax;
        let chunk_elements = (plan.rows_per_chunk * classes) as u64;
        let log_probs_back = readback(
            gpu,
            "xent log-probs read-back",
            if wants_log_probs {
                chunk_elements * 4
            } else {
                0
            },
        );
        let mut out = JobOutput {
            rows: Vec::with_capacity(rows),
            loss_sum: 0.0,
            entropy_sum: 0.0,
            log_probs: Vec::with_capacity(if wants_log_probs { rows * classes } else { 0 }),
        };
        for range in plan.chunks() {
            let n = res.upload(gpu, job, range);
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            let sums = res.encode(gpu, &job.strategy, n, &mut encoder, None) as u64;
            let bytes = [
                n as u64 * ROW_RESULT_BYTES,
                sums * GROUP_SUM_BYTES,
                (n * classes) as u64 * 4,
            ];
            encoder.copy_buffer_to_buffer(&res.row_results, 0, &rows_back, 0, bytes[0]);
            encoder.copy_buffer_to_buffer(&res.group_sums, 0, &sums_back, 0, bytes[1]);
            let mut wanted = vec![(&rows_back, bytes[0]), (&sums_back, bytes[1])];
            if wants_log_probs {
                encoder.copy_buffer_to_buffer(&res.log_probs, 0, &log_probs_back, 0, bytes[2]);
                wanted.push((&log_probs_back, bytes[2]));
            }
            gpu.queue.submit([encoder.finish()]);
            let data = read_back(gpu, &wanted)?;
            out.rows.extend_from_slice(bytemuck::cast_slice(&data[0]));
            for s in bytemuck::cast_slice::<u8, [f32; 2]>(&data[1]) {
                out.loss_sum += s[0] as f64;
                out.entropy_sum += s[1] as f64;
            }
            if wants_log_probs {
                out.log_probs
                    .extend_from_slice(bytemuck::cast_slice(&data[2]));
            }
        }
        Ok(out)
    })
}
