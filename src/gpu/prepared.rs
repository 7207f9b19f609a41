//! The prepared loss: every buffer, bind group and pipeline of one loss spec and shape, made
//! once. A call records its passes into a command encoder and allocates nothing on the device;
//! its outputs stay on the device until an explicit read.
//!
//! The host-slice API is a client of this (src/gpu/host.rs): it uploads into buffers of its
//! own and records the same passes.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Result, XentError};
use crate::output::{LossOutput, LossTotals};
use crate::spec::{CrossEntropy, Reduction};

use super::context::Gpu;
use super::pipelines::{Kernel, LossVariant, PipelineKey, TargetKind, slot};
use super::planner::{ChunkPlan, Strategy, grid};
use super::views::{DeviceLogits, DeviceTargets, IndexType, LossShape, TargetLayout, check_view};

/// `Params` in `rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub(crate) struct Params {
    rows: u32,
    classes: u32,
    first_row: u32,
    logits_offset: u32,
    targets_offset: u32,
    group_base: u32,
    groups: u32,
    groups_at: u32,
    split_at: u32,
    ignore_lo: u32,
    ignore_hi: u32,
    smoothing: f32,
    smoothing_per_class: f32,
    _pad: [u32; 3],
}

/// Bytes of `Status` in `rows.wgsl`.
const STATUS_BYTES: u64 = 48;
/// Bytes of one row's results, `vec4<f32>` (and of one workgroup sum).
const ROW_RESULT_BYTES: u64 = 16;
/// `vec4`s of one `RowStats` of a split row.
const ROW_STATS_VEC4S: u64 = 2;

/// What the passes compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Output {
    /// Loss, per-row results and totals.
    Loss,
    /// Row statistics, then log-probabilities into the outputs buffer (chunk by chunk).
    LogSoftmax,
}

/// How a prepared loss is set up, beyond the spec and the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Setup {
    pub strategy: Strategy,
    /// `None`: statistics only (log-sum-exp, log-softmax).
    pub targets: Option<TargetLayout>,
    pub output: Output,
    /// Caps the rows of a chunk (the host path pipelines uploads in smaller chunks).
    pub chunk_cap: Option<usize>,
}

/// One chunk of a call: its parameters and its input bindings.
struct Chunk {
    rows: usize,
    params: Params,
    inputs: wgpu::BindGroup,
    /// Probability targets at the logits' alignment.
    aligned: bool,
}

/// Inputs bound for calls of one prepared loss: the bind groups and parameters of a call on
/// one set of input buffers, made once by [`PreparedLoss::bind`] and recorded as often as
/// wanted by [`PreparedLoss::record_bound`] (the buffers are held until it is dropped).
pub struct BoundInputs {
    /// The prepared loss these belong to.
    owner: u64,
    rows: usize,
    chunks: Vec<Chunk>,
}

impl BoundInputs {
    /// Rows of the call.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Tells prepared losses apart, so inputs bound for one are not recorded by another.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Where one chunk's inputs lie: a buffer and the byte offset of the chunk's first row.
#[derive(Clone, Copy)]
pub(crate) struct ChunkSource<'a> {
    pub logits: (&'a wgpu::Buffer, u64),
    pub targets: Option<(&'a wgpu::Buffer, u64)>,
}

/// The pipelines of one alignment of the targets.
#[derive(Clone)]
struct Pipes {
    main: Arc<wgpu::ComputePipeline>,
    merge: Option<Arc<wgpu::ComputePipeline>>,
    reduce: Arc<wgpu::ComputePipeline>,
    map: Option<Arc<wgpu::ComputePipeline>>,
}

/// A loss made ready for one spec and shape on one GPU context: see
/// [`GpuContext::prepare`](crate::GpuContext::prepare).
///
/// It owns every intermediate buffer, bind group and pipeline: calling it again allocates
/// nothing on the device. [`PreparedLoss::record`] binds the input buffers anew on each call
/// (a bind group, no buffer); a loop over the same buffers can bind them once with
/// [`PreparedLoss::bind`] and record with [`PreparedLoss::record_bound`]. Its outputs stay on
/// the device: per-row results in [`PreparedLoss::row_results`],
/// the totals and any error found on the device in a small status buffer that
/// [`PreparedLoss::read_totals`] maps.
///
/// Record at most one call per queue submission: a call's parameters are written with
/// `Queue::write_buffer`, which takes effect at the next submission, and its outputs are
/// those of the last call submitted. Submit the encoder before reading.
pub struct PreparedLoss {
    id: u64,
    gpu: Arc<Gpu>,
    reduction: Reduction,
    ignore_index: Option<i64>,
    shape: LossShape,
    setup: Setup,
    variant: LossVariant,
    smoothing: f64,
    weight_scale: f64,
    /// Rows per chunk at `shape.max_rows()`; calls use the same cut.
    rows_per_chunk: usize,
    /// Where the workgroup sums and the split-row stats start in the results buffer.
    groups_at: u32,
    split_at: u32,
    params_stride: u64,
    params: wgpu::Buffer,
    written: Vec<Option<Params>>,
    row_results: wgpu::Buffer,
    status: wgpu::Buffer,
    outputs: wgpu::Buffer,
    /// A 16-byte stand-in for a vec4 view that covers no whole vec4.
    empty: wgpu::Buffer,
    totals_back: wgpu::Buffer,
    rows_back: Option<wgpu::Buffer>,
    /// The last call's per-row results were copied to `rows_back` with its totals.
    rows_copied: bool,
    outputs_back: Option<wgpu::Buffer>,
    owned: wgpu::BindGroup,
    pipes: [Option<Pipes>; 2],
    /// Rows of the last call recorded.
    last_rows: usize,
}

/// Multiplies class weights by a power of two that brings the largest near 1, when it lies
/// far from 1: f32 sums of weights near 1e38 overflow, and subnormal weights flush to zero on
/// most GPUs. The host divides the scale out again in f64, exactly.
fn weight_scale(weights: Option<&[f32]>) -> f64 {
    let max = weights
        .unwrap_or_default()
        .iter()
        .fold(0.0_f64, |m, &w| m.max((w as f64).abs()));
    if max == 0.0 || (2f64.powi(-20)..=2f64.powi(20)).contains(&max) {
        1.0
    } else {
        2f64.powi(-(max.log2().floor() as i32))
    }
}

impl PreparedLoss {
    /// Makes every buffer and pipeline for `spec` on `shape` (whose targets are ignored when
    /// `setup.targets` is `None`).
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        spec: &CrossEntropy,
        shape: LossShape,
        setup: Setup,
    ) -> Result<Self> {
        let classes = shape.classes();
        spec.validate_options(classes, setup.targets == Some(TargetLayout::Probabilities))?;
        setup.strategy.check(&gpu.facts)?;
        let max_rows = shape.max_rows().max(1);
        let plan = ChunkPlan::new(
            max_rows,
            classes,
            &setup.strategy,
            &gpu.facts,
            &row_bytes(classes, &setup),
            setup.chunk_cap,
        )?;
        let probabilities = setup.targets == Some(TargetLayout::Probabilities);
        let variant = LossVariant {
            target: match setup.targets {
                None => TargetKind::None,
                Some(TargetLayout::ClassIndices(_)) => TargetKind::ClassIndex,
                Some(TargetLayout::Probabilities) => TargetKind::Probabilities,
            },
            index_i64: setup.targets == Some(TargetLayout::ClassIndices(IndexType::I64)),
            ignore: spec.ignore_index().is_some() && !probabilities && setup.targets.is_some(),
            targets_aligned: true,
            weights: spec.weights().is_some() && setup.targets.is_some(),
            smoothing: spec.label_smoothing() > 0.0 && setup.targets.is_some(),
            entropy: probabilities && spec.weights().is_none(),
        };
        let scale = weight_scale(spec.weights());
        let chunks = max_rows.div_ceil(plan.rows_per_chunk);
        let groups = plan.final_groups(&setup.strategy) as u64;
        let params_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(gpu.device.limits().min_uniform_buffer_offset_alignment as u64);
        let s = &setup.strategy;
        gpu.scoped("preparing a loss", || {
            let storage = |label, bytes: u64, extra| gpu.storage_buffer(label, bytes, extra);
            let copy_src = wgpu::BufferUsages::COPY_SRC;
            let none = wgpu::BufferUsages::empty();
            let params = gpu.buffer(
                "xent params",
                chunks as u64 * params_stride,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            );
            let weights = storage(
                "xent class weights",
                classes as u64 * 4,
                wgpu::BufferUsages::COPY_DST,
            );
            if let Some(w) = spec.weights().filter(|_| variant.weights) {
                let scaled: Vec<f32> = w.iter().map(|&v| (v as f64 * scale) as f32).collect();
                gpu.queue
                    .write_buffer(&weights, 0, bytemuck::cast_slice(&scaled));
            }
            let split_vec4s = if s.split > 1 {
                plan.rows_per_chunk as u64 * s.split as u64 * ROW_STATS_VEC4S
            } else {
                0
            };
            let row_results = storage(
                "xent results",
                (max_rows as u64 + groups + split_vec4s) * ROW_RESULT_BYTES,
                copy_src,
            );
            let status = storage(
                "xent status",
                STATUS_BYTES,
                copy_src | wgpu::BufferUsages::COPY_DST,
            );
            let outputs_bytes = match setup.output {
                Output::LogSoftmax => plan.rows_per_chunk as u64 * classes as u64 * 4,
                Output::Loss => 0,
            };
            let outputs = storage("xent outputs", outputs_bytes, copy_src);
            let empty = storage("xent empty view", 16, none);
            let totals_back = gpu.buffer(
                "xent totals read-back",
                STATUS_BYTES,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let params_size = wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64);
            let owned_buffers = [
                (slot::WEIGHTS, &weights),
                (slot::RESULTS, &row_results),
                (slot::STATUS, &status),
                (slot::OUTPUTS, &outputs),
            ];
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: slot::PARAMS,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params,
                    offset: 0,
                    size: params_size,
                }),
            }];
            entries.extend(
                owned_buffers
                    .iter()
                    .map(|(binding, buffer)| wgpu::BindGroupEntry {
                        binding: *binding,
                        resource: buffer.as_entire_binding(),
                    }),
            );
            let owned = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("xent owned"),
                layout: &gpu.pipelines.owned_layout,
                entries: &entries,
            });
            let mut loss = Self {
                id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                gpu: gpu.clone(),
                reduction: spec.reduction(),
                ignore_index: spec.ignore_index().filter(|_| variant.ignore),
                shape: LossShape::new(max_rows, classes, shape.targets()),
                setup,
                variant,
                smoothing: if variant.smoothing {
                    spec.label_smoothing()
                } else {
                    0.0
                },
                weight_scale: scale,
                rows_per_chunk: plan.rows_per_chunk,
                groups_at: max_rows as u32,
                split_at: (max_rows as u64 + groups) as u32,
                params_stride,
                params,
                written: vec![None; chunks],
                row_results,
                status,
                outputs,
                empty,
                totals_back,
                rows_back: None,
                rows_copied: false,
                outputs_back: None,
                owned,
                pipes: [None, None],
                last_rows: 0,
            };
            loss.pipes(true);
            Ok(loss)
        })
    }

    /// The pipelines for targets at (`aligned`) or off the logits' alignment, compiled on
    /// first use.
    fn pipes(&mut self, aligned: bool) -> Pipes {
        let index = aligned as usize;
        if let Some(p) = &self.pipes[index] {
            return p.clone();
        }
        let gpu = &self.gpu;
        let variant = LossVariant {
            targets_aligned: aligned,
            ..self.variant
        };
        let key = |kernel| PipelineKey {
            kernel,
            strategy: self.setup.strategy,
            variant,
        };
        let get = |kernel| gpu.pipelines.get(&gpu.device, key(kernel));
        let pipes = Pipes {
            main: get(Kernel::CrossEntropy),
            merge: (self.setup.strategy.split > 1).then(|| get(Kernel::MergeSplitRows)),
            reduce: get(Kernel::ReduceTotals),
            map: (self.setup.output == Output::LogSoftmax).then(|| get(Kernel::LogSoftmax)),
        };
        self.pipes[index] = Some(pipes.clone());
        pipes
    }

    /// The shape it was prepared for.
    pub fn shape(&self) -> LossShape {
        self.shape
    }

    /// The strategy its passes use.
    pub fn strategy(&self) -> Strategy {
        self.setup.strategy
    }

    /// The power of two the class weights were multiplied by on the device (1 unless the
    /// largest weight is beyond 2^±20): per-row losses in [`PreparedLoss::row_results`] carry
    /// it; every value read back through xent has it divided out.
    pub fn weight_scale(&self) -> f64 {
        self.weight_scale
    }

    /// Per-row results of the last call, one `vec4<f32>` per row: (loss × weight scale,
    /// log-sum-exp, entropy of the target or 0, 0). A caller may copy or bind it.
    pub fn row_results(&self) -> &wgpu::Buffer {
        &self.row_results
    }

    /// Records one call on the caller's device buffers into `encoder`: clears the status,
    /// then the row passes chunk by chunk, the reduction, and a copy of the 48-byte status to
    /// the read-back buffer. Every input is checked first; nothing is recorded on an error.
    pub fn record(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
    ) -> Result<()> {
        self.record_timed(encoder, logits, targets, None)
    }

    /// [`PreparedLoss::record`] with timestamps around the compute pass (benchmarks).
    pub(crate) fn record_timed(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let bound = self.bind(logits, targets)?;
        self.record_bound_timed(encoder, &bound, timestamps)
    }

    /// Records one call on inputs bound earlier by [`PreparedLoss::bind`]: as
    /// [`PreparedLoss::record`], without making bind groups.
    pub fn record_bound(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &BoundInputs,
    ) -> Result<()> {
        self.record_bound_timed(encoder, inputs, None)
    }

    pub(crate) fn record_bound_timed(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &BoundInputs,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        if inputs.owner != self.id {
            return Err(XentError::NotPrepared(
                "these inputs were bound by another prepared loss".into(),
            ));
        }
        self.record_call(
            encoder,
            inputs,
            0..inputs.chunks.len(),
            true,
            true,
            timestamps,
        );
        Ok(())
    }

    /// Checks device inputs and binds them for calls of this loss: the bind groups are made
    /// once, inside an error scope (a buffer of another device is an error here).
    pub fn bind(
        &mut self,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
    ) -> Result<BoundInputs> {
        self.bind_device(&logits, Some(&targets))
    }

    /// Records and submits one call on its own encoder (for callers that prefer that).
    pub fn run(&mut self, logits: DeviceLogits<'_>, targets: DeviceTargets<'_>) -> Result<()> {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        self.record(&mut encoder, logits, targets)?;
        let gpu = self.gpu.clone();
        gpu.scoped("submitting a loss", || {
            gpu.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    /// Checks a call's shape against the prepared one.
    fn check_shape(
        &self,
        rows: usize,
        classes: usize,
        targets: Option<TargetLayout>,
    ) -> Result<()> {
        let shape = &self.shape;
        if classes != shape.classes() {
            return Err(XentError::NotPrepared(format!(
                "prepared for {} classes, called with {classes}",
                shape.classes()
            )));
        }
        if rows > shape.max_rows() {
            return Err(XentError::NotPrepared(format!(
                "prepared for at most {} rows, called with {rows}",
                shape.max_rows()
            )));
        }
        if targets != self.setup.targets {
            return Err(XentError::NotPrepared(format!(
                "prepared for targets {:?}, called with {targets:?}",
                self.setup.targets
            )));
        }
        Ok(())
    }

    /// Checks device inputs and makes the call's bind groups.
    fn bind_device(
        &mut self,
        logits: &DeviceLogits<'_>,
        targets: Option<&DeviceTargets<'_>>,
    ) -> Result<BoundInputs> {
        let (rows, classes) = (logits.rows(), logits.classes());
        self.check_shape(rows, classes, targets.map(|t| t.layout()))?;
        let logit_bytes = rows as u64 * classes as u64 * 4;
        check_view("logits", logits.buffer(), logits.offset(), logit_bytes)?;
        if let Some(t) = targets {
            let bytes = rows as u64 * t.layout().row_bytes(classes);
            check_view("targets", t.buffer(), t.offset(), bytes)?;
        }
        let logit_row = classes as u64 * 4;
        let target_row = self.setup.targets.map_or(0, |t| t.row_bytes(classes));
        let sources: Vec<ChunkSource<'_>> = self
            .chunk_ranges(rows)
            .map(|range| ChunkSource {
                logits: (
                    logits.buffer(),
                    logits.offset() + range.start as u64 * logit_row,
                ),
                targets: targets
                    .map(|t| (t.buffer(), t.offset() + range.start as u64 * target_row)),
            })
            .collect();
        self.bind_sources(rows, &sources)
    }

    /// The row ranges of a call of `rows` rows.
    pub(crate) fn chunk_ranges(&self, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let per = self.rows_per_chunk;
        (0..rows).step_by(per).map(move |s| s..(s + per).min(rows))
    }

    /// Rows per chunk.
    pub(crate) fn rows_per_chunk(&self) -> usize {
        self.rows_per_chunk
    }

    /// Makes the bind groups and parameters of a call of `rows` rows whose chunk k reads from
    /// `sources[k]`.
    pub(crate) fn bind_sources(
        &mut self,
        rows: usize,
        sources: &[ChunkSource<'_>],
    ) -> Result<BoundInputs> {
        let gpu = self.gpu.clone();
        gpu.scoped("binding the inputs", || self.make_call(rows, sources))
    }

    fn make_call(&mut self, rows: usize, sources: &[ChunkSource<'_>]) -> Result<BoundInputs> {
        let classes = self.shape.classes();
        let unit = self.setup.strategy.rows_per_final_group() as usize;
        let ranges: Vec<_> = self.chunk_ranges(rows).collect();
        let groups: usize = ranges.iter().map(|r| r.len().div_ceil(unit)).sum();
        let align = self.gpu.facts.binding_alignment;
        let (ignore_lo, ignore_hi) = self
            .ignore_index
            .map_or((0, 0), |i| (i as u32, (i >> 32) as u32));
        let target_row = self.setup.targets.map_or(0, |t| t.row_bytes(classes));
        let mut group_base = 0;
        let mut chunks = Vec::with_capacity(ranges.len());
        for (range, source) in ranges.iter().zip(sources) {
            let n = range.len();
            let logits = self.views(
                source.logits.0,
                source.logits.1,
                n as u64 * classes as u64 * 4,
                align,
            );
            let targets = match source.targets {
                Some((buffer, offset)) => self.views(buffer, offset, n as u64 * target_row, align),
                None => self.views(source.logits.0, source.logits.1, 4, align),
            };
            let aligned = (logits.element_offset as i64 - targets.element_offset as i64) % 4 == 0;
            let entries = [
                (slot::LOGITS4, logits.vec4),
                (slot::LOGITS, logits.scalar),
                (slot::TARGETS4, targets.vec4),
                (slot::TARGETS, targets.scalar),
            ];
            let entries: Vec<_> = entries
                .iter()
                .map(|(binding, b)| wgpu::BindGroupEntry {
                    binding: *binding,
                    resource: wgpu::BindingResource::Buffer(b.clone()),
                })
                .collect();
            let inputs = self
                .gpu
                .device
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("xent inputs"),
                    layout: &self.gpu.pipelines.input_layout,
                    entries: &entries,
                });
            chunks.push(Chunk {
                rows: n,
                params: Params {
                    rows: n as u32,
                    classes: classes as u32,
                    first_row: range.start as u32,
                    logits_offset: logits.element_offset,
                    targets_offset: targets.element_offset,
                    group_base: group_base as u32,
                    groups: groups as u32,
                    groups_at: self.groups_at,
                    split_at: self.split_at,
                    ignore_lo,
                    ignore_hi,
                    smoothing: self.smoothing as f32,
                    smoothing_per_class: (self.smoothing / classes as f64) as f32,
                    _pad: [0; 3],
                },
                inputs,
                aligned,
            });
            group_base += n.div_ceil(unit);
        }
        if chunks.iter().any(|c| !c.aligned) {
            self.pipes(false);
        }
        Ok(BoundInputs {
            owner: self.id,
            rows,
            chunks,
        })
    }

    /// The two views of `bytes` from `offset` of `buffer`: the binding starts at the aligned
    /// offset below; the vec4 view covers its whole vec4s (or a 16-byte stand-in).
    fn views<'b>(
        &'b self,
        buffer: &'b wgpu::Buffer,
        offset: u64,
        bytes: u64,
        align: u64,
    ) -> Views<'b> {
        let start = offset - offset % align;
        let size = offset + bytes - start;
        let whole = size / 16 * 16;
        let vec4 = if whole >= 16 {
            wgpu::BufferBinding {
                buffer,
                offset: start,
                size: wgpu::BufferSize::new(whole),
            }
        } else {
            self.empty.as_entire_buffer_binding()
        };
        Views {
            vec4,
            scalar: wgpu::BufferBinding {
                buffer,
                offset: start,
                size: wgpu::BufferSize::new(size),
            },
            element_offset: ((offset - start) / 4) as u32,
        }
    }

    /// Records chunks `chunks` of a call: with `begin`, the status is cleared first; with
    /// `finish`, the reduction and the status copy follow.
    pub(crate) fn record_call(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        call: &BoundInputs,
        chunks: std::ops::Range<usize>,
        begin: bool,
        finish: bool,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        for (k, p) in call.chunks.iter().map(|c| c.params).enumerate() {
            if self.written[k] != Some(p) {
                let offset = k as u64 * self.params_stride;
                self.gpu
                    .queue
                    .write_buffer(&self.params, offset, bytemuck::bytes_of(&p));
                self.written[k] = Some(p);
            }
        }
        self.last_rows = call.rows;
        if begin {
            encoder.clear_buffer(&self.status, 0, None);
        }
        let s = self.setup.strategy;
        let max_dim = self.gpu.facts.max_groups_per_dimension;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("xent"),
                timestamp_writes: timestamps,
            });
            let mut last = None;
            for k in chunks {
                let chunk = &call.chunks[k];
                let pipes = self.pipes[chunk.aligned as usize]
                    .as_ref()
                    .expect("pipelines made when the call was bound");
                pass.set_bind_group(0, &self.owned, &[(k as u64 * self.params_stride) as u32]);
                pass.set_bind_group(1, &chunk.inputs, &[]);
                pass.set_pipeline(&pipes.main);
                let main_groups = (chunk.rows as u32).div_ceil(s.rows_per_group()) * s.split;
                let (x, y) = grid(main_groups, max_dim);
                pass.dispatch_workgroups(x, y, 1);
                if let Some(merge) = &pipes.merge {
                    pass.set_pipeline(merge);
                    let (x, y) = grid((chunk.rows as u32).div_ceil(s.workgroup_size), max_dim);
                    pass.dispatch_workgroups(x, y, 1);
                }
                if let Some(map) = &pipes.map {
                    pass.set_pipeline(map);
                    let (x, y) = grid(main_groups, max_dim);
                    pass.dispatch_workgroups(x, y, 1);
                }
                last = Some(pipes);
            }
            if finish && let Some(pipes) = last {
                pass.set_pipeline(&pipes.reduce);
                pass.dispatch_workgroups(1, 1, 1);
            }
        }
        if finish {
            encoder.copy_buffer_to_buffer(&self.status, 0, &self.totals_back, 0, STATUS_BYTES);
            // The host path reads every row: copy them now, so one wait brings back both.
            self.rows_copied = self.setup.chunk_cap.is_some() && self.last_rows > 0;
            if self.rows_copied {
                let bytes = self.last_rows as u64 * ROW_RESULT_BYTES;
                let back = self.rows_back_buffer();
                encoder.copy_buffer_to_buffer(&self.row_results, 0, &back, 0, bytes);
            }
        }
    }

    /// The read-back buffer of the per-row results, made on first use.
    fn rows_back_buffer(&mut self) -> wgpu::Buffer {
        let capacity = self.shape.max_rows() as u64 * ROW_RESULT_BYTES;
        let gpu = &self.gpu;
        self.rows_back
            .get_or_insert_with(|| gpu.readback_buffer("xent row results read-back", capacity))
            .clone()
    }

    /// Maps the status of the last call submitted and returns its totals, or the error the
    /// device found (an out-of-range class index, naming its row and value; a logit beyond
    /// f32's safe range). Waits for the device.
    pub fn read_totals(&mut self) -> Result<LossTotals> {
        let gpu = self.gpu.clone();
        let bytes = gpu.scoped("reading the totals", || {
            Ok(gpu
                .read_back(&[(&self.totals_back, STATUS_BYTES)])?
                .remove(0))
        })?;
        self.totals_from(&bytes)
    }

    /// The totals (or the device's error) from the status bytes.
    fn totals_from(&self, bytes: &[u8]) -> Result<LossTotals> {
        let words: &[u32] = bytemuck::cast_slice(bytes);
        if words[0] != 0 {
            let value = ((words[3] as u64) << 32 | words[2] as u64) as i64;
            let value = match self.setup.targets {
                Some(TargetLayout::ClassIndices(IndexType::I32)) => value as i32 as i64,
                _ => value,
            };
            return Err(XentError::ClassIndexOutOfRange {
                row: (u32::MAX - words[0]) as usize,
                value,
                classes: self.shape.classes(),
                ignore_index: self.ignore_index,
            });
        }
        if words[1] != 0 {
            return Err(XentError::LogitOutOfRange {
                row: (u32::MAX - words[1]) as usize,
            });
        }
        let floats: &[f32] = bytemuck::cast_slice(&bytes[16..]);
        let total = |i: usize| {
            let (hi, lo) = (floats[i] as f64, floats[4 + i] as f64);
            if hi.is_finite() { hi + lo } else { hi }
        };
        let scale = self.weight_scale;
        let (sum, denominator) = (total(0) / scale, total(2) / scale);
        Ok(LossTotals {
            reduction: self.reduction,
            loss: self.reduction.apply(sum, denominator),
            sum,
            mean_denominator: denominator,
            entropy_sum: self.variant.entropy.then(|| total(1)),
            z_loss_sum: None,
            ignored_rows: total(3) as usize,
            rows: self.last_rows,
            classes: self.shape.classes(),
        })
    }

    /// [`PreparedLoss::read_totals`], then the per-row results of the same call: the
    /// [`LossOutput`] the host-slice API returns.
    pub fn read(&mut self) -> Result<LossOutput> {
        let (totals, rows) = if self.rows_copied {
            let gpu = self.gpu.clone();
            let back = self.rows_back_buffer();
            let bytes = self.last_rows as u64 * ROW_RESULT_BYTES;
            let data = gpu.scoped("reading the results", || {
                gpu.read_back(&[(&self.totals_back, STATUS_BYTES), (&back, bytes)])
            })?;
            let rows: Vec<[f32; 4]> = bytemuck::cast_slice(&data[1]).to_vec();
            (self.totals_from(&data[0])?, rows)
        } else {
            (self.read_totals()?, self.read_rows()?)
        };
        let scale = self.weight_scale;
        let column = |c: usize, scale: f64| rows.iter().map(|r| r[c] as f64 / scale).collect();
        Ok(LossOutput::from_totals(
            totals,
            column(0, scale),
            column(1, 1.0),
            self.variant.entropy.then(|| column(2, 1.0)),
        ))
    }

    /// Copies the last call's per-row results back.
    pub(crate) fn read_rows(&mut self) -> Result<Vec<[f32; 4]>> {
        let bytes = self.last_rows as u64 * ROW_RESULT_BYTES;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let gpu = self.gpu.clone();
        let back = self.rows_back_buffer();
        let data = gpu.scoped("reading per-row results", || {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(&self.row_results, 0, &back, 0, bytes);
            gpu.queue.submit([encoder.finish()]);
            Ok(gpu.read_back(&[(&back, bytes)])?.remove(0))
        })?;
        Ok(bytemuck::cast_slice(&data).to_vec())
    }

    /// Copies the log-probabilities of the last chunk recorded (`rows` rows) back.
    pub(crate) fn read_outputs(&mut self, rows: usize) -> Result<Vec<f32>> {
        let bytes = rows as u64 * self.shape.classes() as u64 * 4;
        let gpu = self.gpu.clone();
        let capacity = self.rows_per_chunk as u64 * self.shape.classes() as u64 * 4;
        let back = self
            .outputs_back
            .get_or_insert_with(|| gpu.readback_buffer("xent outputs read-back", capacity));
        let data = gpu.scoped("reading log-probabilities", || {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(&self.outputs, 0, back, 0, bytes);
            gpu.queue.submit([encoder.finish()]);
            Ok(gpu.read_back(&[(back, bytes)])?.remove(0))
        })?;
        Ok(bytemuck::cast_slice(&data).to_vec())
    }

    /// The GPU this loss runs on.
    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

/// The two views of one input of a chunk.
struct Views<'a> {
    vec4: wgpu::BufferBinding<'a>,
    scalar: wgpu::BufferBinding<'a>,
    /// Element (4-byte word) offset of the chunk's data within the views.
    element_offset: u32,
}

/// Bytes one row takes in each input binding: the logits, the targets, and the outputs.
fn row_bytes(classes: usize, setup: &Setup) -> Vec<u64> {
    let logits = classes as u64 * 4;
    let mut bytes = vec![logits];
    if let Some(t) = setup.targets {
        bytes.push(t.row_bytes(classes));
    }
    if setup.output == Output::LogSoftmax {
        bytes.push(logits);
    }
    bytes
}
