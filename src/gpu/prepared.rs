//! The prepared loss: every buffer, bind group and pipeline of one loss spec and shape, made
//! once. A call records its passes into a command encoder and allocates nothing on the device;
//! its outputs stay on the device until an explicit read.
//!
//! The host-slice API is a client of this (src/gpu/host.rs): it uploads into buffers of its
//! own and records the same passes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};

use crate::dtype::Dtype;
use crate::error::{Result, XentError};
use crate::grad::Upstream;
use crate::output::{LossOutput, LossTotals};
use crate::scoring::{
    Distillation, DistillationOutput, Divergence, TargetScore, TokenMetrics, TokenRow,
};
use crate::shard::RowPartial;
use crate::spec::{CrossEntropy, Reduction, check_targets_dtype};

use super::context::{Gpu, Serialised};
use super::pipelines::{Kernel, LossVariant, PipelineKey, TargetKind, slot};
use super::planner::{ChunkPlan, Strategy, grid};
use super::totals::{
    DistillationSums, OVERRUN_BYTE, PendingTotals, STATUS_BYTES, TotalsReader, TotalsSlot,
};
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
    rows2_at: u32,
    total_rows: u32,
    outputs_offset: u32,
    upstream_at: u32,
    ignore_lo: u32,
    ignore_hi: u32,
    smoothing: f32,
    smoothing_per_class: f32,
    cap: f32,
    z_loss: f32,
    grad_ce: f32,
    grad_z: f32,
    metrics_at: u32,
    inv_temperature: f32,
    beta: f32,
    class_offset: u32,
    total_classes: u32,
    call: u32,
    /// 1.0, which the shaders multiply by where the compiler must not simplify.
    one: f32,
    order_at: u32,
}

/// Parameter slots of a prepared loss: each call takes the next, so that up to this many
/// calls recorded before one submission each run with their own parameters (written with
/// `Queue::write_buffer`, which takes effect at the submission, before any of them runs).
pub(crate) const PARAM_SLOTS: usize = 8;

/// Numbers a call may take (`Params::call`, 1 to this, in turn): a call checks on the device
/// that the parameters in its slot carry its own number, so that a call whose slot a later
/// call overwrote before the submission (more than [`PARAM_SLOTS`] calls recorded before one
/// submission) is found, unless exactly a multiple of this many calls came between them.
const CALL_NUMBERS: u64 = 4096;

/// The most top-k entries a row the kernels take. In the statistics pass the lanes that share a
/// row check each entry against the earlier ones (repeats are errors: k²/2 steps in all,
/// shared), and for a gradient compare it with all k instead, to sort the entries by the
/// gradient lane that writes their class (k² steps); each lane of the gradient pass then walks
/// its own entries once. llvmpipe (Mesa's software Vulkan and GL, the CI's devices) ends a
/// shader's loops silently once they have run 65,535 iterations in all; a row's per-class loop
/// may take 32,768 of them on one lane, and with one lane a row 128 entries add 16,384, which
/// leaves about 16,000. A prepared top-k loss keeps the sorted entries, 4 bytes an entry a
/// row, beside its other per-row results.
pub const MAX_SPARSE_K: usize = 128;

/// Bytes of one row's results, `vec4<f32>` (and of one half of a workgroup sum).
const ROW_RESULT_BYTES: u64 = 16;
/// `vec4`s of one `RowStats` of a split row, and of one workgroup sum.
const ROW_STATS_VEC4S: u64 = 3;
const GROUP_SUM_VEC4S: u64 = 2;

/// What the elementwise pass of a host call writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Output {
    /// Nothing: loss, per-row results and totals only.
    Loss,
    /// Log-probabilities (chunk by chunk).
    LogSoftmax,
    /// The gradient (chunk by chunk).
    Gradient,
}

/// How a prepared loss is set up, beyond the spec and the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Setup {
    pub strategy: Strategy,
    /// `None`: statistics only (log-sum-exp, log-softmax).
    pub targets: Option<TargetLayout>,
    pub output: Output,
    /// Whether calls may write a gradient: any call on the device path; on the host path,
    /// only a gradient loss's (top-k targets then keep their entries sorted for it).
    pub gradient_calls: bool,
    /// Caps the rows of a chunk (the host path pipelines uploads in smaller chunks).
    pub chunk_cap: Option<usize>,
    /// Token metrics in the statistics pass (class indices only).
    pub metrics: bool,
    /// Distillation: the targets are a teacher's logits.
    pub teacher: Option<Teacher>,
    /// A vocabulary shard: per-row partial statistics of these classes, which are
    /// `offset..offset + C` of `total` (class indices are of the whole vocabulary).
    pub shard: Option<ShardSetup>,
}

impl Setup {
    /// A loss with `strategy`, `targets` and `output`: whole chunks, nothing more.
    pub fn new(strategy: Strategy, targets: Option<TargetLayout>, output: Output) -> Self {
        Setup {
            strategy,
            targets,
            output,
            gradient_calls: true,
            chunk_cap: None,
            metrics: false,
            teacher: None,
            shard: None,
        }
    }

    /// Bytes a row of the sorted top-k entries takes in the per-row results (whole vec4s;
    /// `top_k_order_at` in `rows.wgsl`): only top-k targets of a loss whose calls may write
    /// gradients keep them.
    pub fn top_k_order_bytes(&self) -> u64 {
        match self.targets {
            Some(TargetLayout::TopK { k }) if self.gradient_calls => {
                (k as u64).div_ceil(4) * ROW_RESULT_BYTES
            }
            _ => 0,
        }
    }
}

/// Where a prepared loss's classes lie in the whole vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ShardSetup {
    pub offset: u32,
    pub total: u32,
}

/// A distillation loss's setup: the targets bindings hold the teacher's logits, laid out like
/// probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Teacher {
    /// 1/T, as f32 bits.
    pub inv_temperature: u32,
    /// 0 the cross-entropy, 1 the reverse KL(q‖p), 2 the generalised JSD (two passes).
    pub divergence: u8,
    /// The JSD's β, as f32 bits.
    pub beta: u32,
    /// The gradient's factor, the loss scale over T, as f64 bits.
    pub grad_factor: u64,
}

/// Where the gradient goes on the device path.
#[derive(Clone, Copy, Debug)]
pub enum GradientOutput<'a> {
    /// A buffer laid out like the logits, in their dtype, from byte `offset` (needs
    /// `STORAGE`).
    Buffer {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of the first row's gradient (a multiple of the value size).
        offset: u64,
    },
    /// Over the logits themselves, which the call consumes (Liger's trick: no second N × C
    /// buffer). Their buffer then needs `STORAGE` for writing too.
    InPlace,
}

/// One chunk of a call: its parameters and its input bindings.
struct Chunk {
    rows: usize,
    params: Params,
    /// For the statistics (and a gradient that is not in place).
    inputs: wgpu::BindGroup,
    /// For a gradient in place: the logits bound for writing only.
    in_place: Option<wgpu::BindGroup>,
    /// Probability targets at the logits' alignment.
    aligned: bool,
    /// Logits and outputs start at the same parity (halves).
    paired: bool,
}

/// Inputs bound for calls of one prepared loss: the bind groups and parameters of a call on
/// one set of buffers, made once by [`PreparedLoss::bind`] and recorded as often as wanted by
/// [`PreparedLoss::record_bound`] (the buffers are held until it is dropped).
pub struct BoundInputs {
    /// The prepared loss these belong to.
    owner: u64,
    rows: usize,
    chunks: Serialised<Vec<Chunk>>,
    gradient: Option<GradientMode>,
}

impl std::fmt::Debug for BoundInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundInputs")
            .field("rows", &self.rows)
            .field("gradient", &self.gradient)
            .finish_non_exhaustive()
    }
}

/// Where a bound call's gradient goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GradientMode {
    Buffer,
    InPlace,
}

impl BoundInputs {
    /// Rows of the call.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether these inputs include a gradient output.
    pub fn has_gradient(&self) -> bool {
        self.gradient.is_some()
    }
}

/// Tells prepared losses apart, so inputs bound for one are not recorded by another.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Where one chunk's inputs lie: buffers and the byte offsets of the chunk's first row.
#[derive(Clone, Copy)]
pub(crate) struct ChunkSource<'a> {
    pub logits: (&'a wgpu::Buffer, u64),
    pub targets: Option<(&'a wgpu::Buffer, u64)>,
    /// Log-probabilities or the gradient; `None` with `in_place` writes over the logits.
    pub outputs: Option<(&'a wgpu::Buffer, u64)>,
}

/// The pipelines of the statistics passes of one variant.
#[derive(Clone)]
struct Pipes {
    main: Arc<wgpu::ComputePipeline>,
    merge: Option<Arc<wgpu::ComputePipeline>>,
    /// The JSD's second pass over the logits, and its merge of split rows.
    second: Option<(
        Arc<wgpu::ComputePipeline>,
        Option<Arc<wgpu::ComputePipeline>>,
    )>,
    reduce: Arc<wgpu::ComputePipeline>,
}

/// What a call's passes need, beyond the bound inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Passes {
    /// Keep per-row stats and run the gradient pass.
    pub gradient: bool,
    /// Run the log-softmax pass.
    pub log_softmax: bool,
    /// The gradient's mean scales come from the device totals (the pass then follows the
    /// reduction); otherwise from the parameters, right after each chunk's statistics.
    pub scales_from_totals: bool,
    /// Run the statistics passes; without them the gradient uses per-row stats written by
    /// the host (a shard's, merged across the vocabulary).
    pub statistics: bool,
}

impl Passes {
    /// The loss alone.
    pub const LOSS: Passes = Passes {
        gradient: false,
        log_softmax: false,
        scales_from_totals: false,
        statistics: true,
    };

    /// The loss and log-probabilities.
    pub const LOG_SOFTMAX: Passes = Passes {
        log_softmax: true,
        ..Passes::LOSS
    };

    /// The loss and its gradient.
    pub fn gradient(scales_from_totals: bool) -> Passes {
        Passes {
            gradient: true,
            scales_from_totals,
            ..Passes::LOSS
        }
    }
}

/// A loss made ready for one spec and shape on one GPU context: see
/// [`GpuContext::prepare`](crate::GpuContext::prepare).
///
/// It owns every intermediate buffer, bind group and pipeline: calling it again allocates
/// nothing on the device. [`PreparedLoss::record`] binds the input buffers anew on each call
/// (a bind group, no buffer); a loop over the same buffers can bind them once with
/// [`PreparedLoss::bind`] and record with [`PreparedLoss::record_bound`]. Its outputs stay on
/// the device: per-row results in [`PreparedLoss::row_results`], the gradient where the call
/// put it, and the totals and any error found on the device in a small status buffer that
/// [`PreparedLoss::read_totals`] maps.
///
/// Up to 8 calls may be recorded before one queue submission (micro-batches in one encoder,
/// say): each takes its own slot of parameters and per-row upstream gradients, which are
/// written with `Queue::write_buffer` and take effect at that submission. A ninth call reuses
/// the first call's slot before it runs: the first call then finds another call's parameters
/// on the device, does nothing (no gradient of its own is written, rather than a wrong one),
/// and the next read returns [`XentError::CallsOverran`]. The outputs (totals, per-row
/// results) are those of the last call; the gradients are each where its call put them.
/// Submit the encoder before reading: a read that finds an earlier call's status instead of
/// the last one's returns [`XentError::NotSubmitted`].
pub struct PreparedLoss {
    id: u64,
    gpu: Arc<Gpu>,
    reduction: Reduction,
    ignore_index: Option<i64>,
    shape: LossShape,
    setup: Setup,
    variant: LossVariant,
    smoothing: f64,
    cap: f64,
    z_loss: f64,
    weight_scale: f64,
    /// Rows per chunk at `shape.max_rows()`; calls use the same cut.
    rows_per_chunk: usize,
    /// Where the workgroup sums, split-row stats and gradient row stats start in `results`.
    groups_at: u32,
    split_at: u32,
    rows2_at: u32,
    /// Where the per-row token metrics start in `results`, and the rows' top-k entries in the
    /// order the gradient walks them (`top_k_order_at` in `rows.wgsl`).
    metrics_at: u32,
    order_at: u32,
    /// 1/T against a teacher (else 1).
    inv_temperature: f32,
    /// The JSD's β (else 0).
    beta: f32,
    /// The distillation spec a teacher's loss reads its outputs by.
    distillation: Option<Distillation>,
    /// The gradient's factor beyond the reduction's scale (the loss scale over T against a
    /// teacher, else 1).
    grad_factor: f64,
    /// Where the per-row upstream gradient starts in the weights buffer.
    upstream_at: u32,
    params_stride: u64,
    /// Chunks of a call at most: each parameter slot holds this many chunks' parameters.
    chunks: usize,
    /// Calls begun so far: the one being recorded (or last recorded) has parameter slot
    /// `calls % PARAM_SLOTS` and number `(calls − 1) % CALL_NUMBERS + 1`.
    calls: u64,
    /// A read of the last call's status has reported the overrun flag (set or not), or will
    /// (a pending read): the next call clears it.
    clear_overrun: AtomicBool,
    /// What the last recorded call's reduction writes into the status (its number), or 0.
    last_call: u32,
    written: Vec<Option<Params>>,
    /// The last call's per-row results were copied to `rows_back` with its totals.
    rows_copied: bool,
    /// The gradient's scales for the next recording (cross-entropy and z-loss terms).
    grad_scales: Option<(f32, f32)>,
    /// The last call's cross-entropy scale when the device divided it by its own mean's
    /// denominator (a mean's gradient on the device path): its read checks the quotient.
    last_device_scale: Option<f32>,
    /// Rows of the last call recorded.
    last_rows: usize,
    /// The read-back slot of the last call's status.
    slot: usize,
    /// Every device object, dropped under the GL serialisation.
    res: Serialised<Resources>,
}

impl std::fmt::Debug for PreparedLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLoss")
            .field("shape", &self.shape)
            .field("reduction", &self.reduction)
            .field("strategy", &self.setup.strategy)
            .field("last_rows", &self.last_rows)
            .finish_non_exhaustive()
    }
}

/// The device objects of a prepared loss.
struct Resources {
    params: wgpu::Buffer,
    weights: wgpu::Buffer,
    row_results: wgpu::Buffer,
    status: wgpu::Buffer,
    /// The numbers 1 to [`CALL_NUMBERS`], one word each: a call copies its own into the last
    /// word of `weights` as it begins (`own_params` in `rows.wgsl`).
    call_numbers: wgpu::Buffer,
    /// 16-byte stand-ins for views that are not used: read-only, and written (a buffer
    /// cannot be bound both ways in one dispatch).
    empty: wgpu::Buffer,
    empty_out: wgpu::Buffer,
    /// Read-back buffers of calls' status: the last call's is `slots[slot]`; more than one
    /// only while [`PendingTotals`] hold some.
    slots: Vec<TotalsSlot>,
    rows_back: Option<wgpu::Buffer>,
    owned: wgpu::BindGroup,
    pipes: HashMap<(bool, bool), Pipes>,
    elementwise: HashMap<ElementwiseKey, Arc<wgpu::ComputePipeline>>,
}

/// The power of two the device's class weights are multiplied by. As the loss sums weights
/// times losses in f32, the largest weight is brought to [1, 2) when it lies beyond 2^±20 (sums
/// of weights near 1e38 would overflow, and so would a large weight times a large loss). Then
/// no weight may be subnormal, as GPUs flush subnormals to zero (an H200's Vulkan driver does,
/// llvmpipe does not): where the smallest nonzero weight would fall below 2^-125, the scale
/// rises just enough (as long as the largest stays below 2^64), and no further: every bit it
/// rises is a bit less room above for a large weight times a large loss. Only weights spanning
/// more than 2^188 keep a subnormal. The host divides the scale out again in f64, exactly.
fn weight_scale(weights: Option<&[f32]>) -> f64 {
    let nonzero = || {
        weights
            .unwrap_or_default()
            .iter()
            .map(|&w| (w as f64).abs())
            .filter(|&w| w > 0.0)
    };
    let (Some(max), Some(min)) = (nonzero().reduce(f64::max), nonzero().reduce(f64::min)) else {
        return 1.0;
    };
    // max in [2^top, 2^(top + 1)), min in [2^bottom, 2^(bottom + 1)).
    let (top, bottom) = (max.log2().floor() as i32, min.log2().floor() as i32);
    let mut e = if (2f64.powi(-20)..=2f64.powi(20)).contains(&max) {
        0
    } else {
        -top
    };
    if bottom + e < -125 {
        e = (-125 - bottom).min(63 - top);
    }
    2f64.powi(e)
}

/// The options the kernels take as f32: a soft-cap must be a normal f32 (0 or ∞ would make
/// every capped logit NaN), and a z-loss λ > 0 one too (it would vanish or overflow), so that
/// the GPU computes what the f64 reference does rather than quietly something else.
fn check_f32_options(spec: &CrossEntropy) -> Result<()> {
    if let Some(cap) = spec.softcap().filter(|&c| !(c as f32).is_normal()) {
        return Err(XentError::Softcap(cap));
    }
    let lambda = spec.z_loss();
    if lambda > 0.0 && !(lambda as f32).is_normal() {
        return Err(XentError::ZLoss(lambda));
    }
    Ok(())
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
        let probabilities = setup.targets.is_some_and(TargetLayout::is_probabilities);
        spec.validate_options(classes, probabilities)?;
        check_f32_options(spec)?;
        if let Some(TargetLayout::TopK { k }) = setup.targets {
            if k == 0 {
                return Err(XentError::NotPrepared("top-k targets need k ≥ 1".into()));
            }
            if k as usize > MAX_SPARSE_K {
                return Err(XentError::SparseK {
                    k: k as usize,
                    max: MAX_SPARSE_K,
                });
            }
            spec.validate_sparse_options(classes)?;
        }
        let dtype = shape.dtype();
        let targets_dtype = match setup.targets {
            Some(TargetLayout::Probabilities(d)) => d,
            _ => Dtype::F32,
        };
        check_targets_dtype(dtype, targets_dtype)?;
        setup.strategy.check(&gpu.facts)?;
        let max_rows = shape.max_rows().max(1);
        let plan = ChunkPlan::new(
            max_rows,
            classes,
            &setup.strategy,
            &gpu.facts,
            &row_bytes(classes, dtype, &setup),
            setup.chunk_cap,
        )?;
        let has_targets = setup.targets.is_some();
        let variant = LossVariant {
            target: match (setup.targets, setup.teacher) {
                (None, _) => TargetKind::None,
                (Some(TargetLayout::ClassIndices(_)), _) => TargetKind::ClassIndex,
                (Some(TargetLayout::Probabilities(_)), None) => TargetKind::Probabilities,
                (Some(TargetLayout::Probabilities(_)), Some(_)) => TargetKind::Teacher,
                (Some(TargetLayout::TopK { .. }), _) => TargetKind::TopK,
            },
            top_k: match setup.targets {
                Some(TargetLayout::TopK { k }) => k,
                _ => 0,
            },
            divergence: setup.teacher.map_or(0, |t| t.divergence),
            partials: setup.shard.is_some(),
            dtype,
            targets_half: targets_dtype.is_half(),
            index_i64: setup.targets == Some(TargetLayout::ClassIndices(IndexType::I64)),
            ignore: spec.ignore_index().is_some() && !probabilities && has_targets,
            targets_aligned: true,
            weights: spec.weights().is_some() && has_targets,
            smoothing: spec.label_smoothing() > 0.0 && has_targets,
            entropy: probabilities && spec.weights().is_none() && setup.teacher.is_none(),
            softcap: spec.softcap().is_some() && has_targets,
            z_loss: spec.z_loss() > 0.0 && has_targets,
            metrics: false,
            ..LossVariant::LSE_ONLY
        };
        let scale = weight_scale(spec.weights());
        let chunks = max_rows.div_ceil(plan.rows_per_chunk);
        let groups = plan.final_groups(&setup.strategy) as u64;
        let params_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(gpu.device.limits().min_uniform_buffer_offset_alignment as u64);
        let s = &setup.strategy;
        let split_vec4s = if s.split > 1 {
            plan.rows_per_chunk as u64 * s.split as u64 * ROW_STATS_VEC4S
        } else {
            0
        };
        let rows = max_rows as u64;
        let groups_at = rows;
        let split_at = groups_at + groups * GROUP_SUM_VEC4S;
        let rows2_at = split_at + split_vec4s;
        let metrics_at = rows2_at + rows;
        let order_at = metrics_at + rows;
        // The results are bound whole (the top-k entries in the order of the gradient's walk
        // last): within the device's own limits.
        let results_bytes = order_at * ROW_RESULT_BYTES + rows * setup.top_k_order_bytes();
        let limits = gpu.device.limits();
        let most = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if results_bytes > most {
            return Err(XentError::NotPrepared(format!(
                "{rows} rows need {results_bytes} bytes of per-row results ({} a row), more \
                 than this device binds ({most} bytes): prepare fewer rows",
                results_bytes / rows,
            )));
        }
        let upstream_at = (classes as u64).next_multiple_of(4);
        gpu.scoped("preparing a loss", || {
            let copy_src = wgpu::BufferUsages::COPY_SRC;
            let copy_dst = wgpu::BufferUsages::COPY_DST;
            let params = gpu.buffer(
                "xent params",
                (PARAM_SLOTS * chunks) as u64 * params_stride,
                wgpu::BufferUsages::UNIFORM | copy_dst,
            );
            // One region of per-row upstream gradients per parameter slot (reduction none).
            let upstream_rows = match spec.reduction() {
                Reduction::None => PARAM_SLOTS as u64 * rows,
                _ => 0,
            };
            // And a last word for the number of the call being run.
            let weights = gpu.storage_buffer(
                "xent class weights and upstream gradient",
                (upstream_at + upstream_rows + 1) * 4,
                copy_dst,
            );
            let numbers: Vec<u32> = (1..=CALL_NUMBERS as u32).collect();
            let call_numbers =
                gpu.buffer("xent call numbers", CALL_NUMBERS * 4, copy_src | copy_dst);
            gpu.queue
                .write_buffer(&call_numbers, 0, bytemuck::cast_slice(&numbers));
            if let Some(w) = spec.weights().filter(|_| variant.weights) {
                let scaled: Vec<f32> = w.iter().map(|&v| (v as f64 * scale) as f32).collect();
                gpu.queue
                    .write_buffer(&weights, 0, bytemuck::cast_slice(&scaled));
            }
            let row_results = gpu.storage_buffer(
                "xent results",
                results_bytes,
                // Written by the host too: a shard's merged row stats.
                copy_src | copy_dst,
            );
            let status = gpu.storage_buffer("xent status", STATUS_BYTES, copy_src | copy_dst);
            let empty = gpu.storage_buffer("xent empty view", 16, wgpu::BufferUsages::empty());
            let empty_out =
                gpu.storage_buffer("xent empty output", 16, wgpu::BufferUsages::empty());
            let params_size = wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64);
            let entries = [
                wgpu::BindGroupEntry {
                    binding: slot::PARAMS,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: 0,
                        size: params_size,
                    }),
                },
                wgpu::BindGroupEntry {
                    binding: slot::WEIGHTS,
                    resource: weights.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: slot::RESULTS,
                    resource: row_results.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: slot::STATUS,
                    resource: status.as_entire_binding(),
                },
            ];
            let owned = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("xent owned"),
                layout: &gpu.pipelines.owned_layout,
                entries: &entries,
            });
            let mut loss = Self {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                gpu: gpu.clone(),
                reduction: spec.reduction(),
                ignore_index: spec.ignore_index().filter(|_| variant.ignore),
                shape: LossShape::new(max_rows, classes, shape.targets()).with_dtype(dtype),
                setup,
                variant,
                smoothing: if variant.smoothing {
                    spec.label_smoothing()
                } else {
                    0.0
                },
                cap: spec.softcap().unwrap_or(1.0),
                z_loss: spec.z_loss(),
                weight_scale: scale,
                rows_per_chunk: plan.rows_per_chunk,
                groups_at: groups_at as u32,
                split_at: split_at as u32,
                rows2_at: rows2_at as u32,
                metrics_at: metrics_at as u32,
                order_at: order_at as u32,
                inv_temperature: setup
                    .teacher
                    .map_or(1.0, |t| f32::from_bits(t.inv_temperature)),
                beta: setup.teacher.map_or(0.0, |t| f32::from_bits(t.beta)),
                distillation: None,
                grad_factor: setup.teacher.map_or(1.0, |t| f64::from_bits(t.grad_factor)),
                upstream_at: upstream_at as u32,
                params_stride,
                chunks,
                calls: 0,
                clear_overrun: AtomicBool::new(false),
                last_call: 0,
                written: vec![None; PARAM_SLOTS * chunks],
                rows_copied: false,
                grad_scales: None,
                last_device_scale: None,
                res: Serialised::new(
                    &gpu,
                    Resources {
                        params,
                        weights,
                        row_results,
                        status,
                        call_numbers,
                        empty,
                        empty_out,
                        slots: vec![TotalsSlot::new(&gpu)],
                        rows_back: None,
                        owned,
                        pipes: HashMap::new(),
                        elementwise: HashMap::new(),
                    },
                ),
                last_rows: 0,
                slot: 0,
            };
            if setup.metrics {
                loss.set_metrics()?;
            }
            loss.pipes(true, setup.output == Output::Gradient);
            Ok(loss)
        })
    }

    /// The first class of these logits in the whole vocabulary (0 unsharded).
    fn class_offset(&self) -> u32 {
        self.setup.shard.map_or(0, |s| s.offset)
    }

    /// The classes of the whole vocabulary (the logits' own unsharded).
    fn total_classes(&self) -> usize {
        self.setup
            .shard
            .map_or(self.shape.classes(), |s| s.total as usize)
    }

    /// Writes per-row stats `(m, ln s, B, counted)` for rows `first_row..` of the next call,
    /// for a gradient pass without the statistics passes ([`Passes::statistics`]); `B` is
    /// unscaled (the device's weight scale is applied here, in f64: the scale itself may lie
    /// beyond f32, as for weights near 1e-40).
    pub(crate) fn set_row_stats(&mut self, first_row: usize, stats: &[[f64; 4]]) -> Result<()> {
        let scale = self.weight_scale;
        let scaled: Vec<[f32; 4]> = stats
            .iter()
            .map(|s| [s[0] as f32, s[1] as f32, (s[2] * scale) as f32, s[3] as f32])
            .collect();
        let offset = (self.rows2_at as u64 + first_row as u64) * ROW_RESULT_BYTES;
        let gpu = &self.gpu;
        gpu.scoped("writing row statistics", || {
            gpu.queue
                .write_buffer(&self.res.row_results, offset, bytemuck::cast_slice(&scaled));
            Ok(())
        })
    }

    /// Marks a teacher's loss as the distillation `spec` (its outputs' scale and reduction).
    pub(crate) fn set_distillation(&mut self, spec: Distillation) {
        self.distillation = Some(spec);
    }

    /// Turns on token metrics for the calls recorded from now on (see
    /// [`PreparedLoss::with_metrics`]).
    fn set_metrics(&mut self) -> Result<()> {
        if !matches!(self.setup.targets, Some(TargetLayout::ClassIndices(_))) {
            return Err(XentError::NotPrepared(
                "token metrics need class-index targets".into(),
            ));
        }
        self.variant.metrics = true;
        self.setup.metrics = true;
        self.res.pipes.clear();
        // The host path's read-back then holds the metrics beside the per-row results.
        self.res.rows_back = None;
        Ok(())
    }

    /// The same loss, whose calls also compute token metrics in the statistics pass (no
    /// extra read of the logits): per row the argmax (lowest class on ties, as
    /// `torch.argmax`), the target's rank (classes strictly above it), its log-probability,
    /// and the prediction's entropy. Read them with [`PreparedLoss::read_with_metrics`].
    /// On soft-capped logits, the metrics are those of the capped logits.
    ///
    /// Errors: [`XentError::NotPrepared`] unless the targets are class indices.
    pub fn with_metrics(mut self) -> Result<Self> {
        self.set_metrics()?;
        Ok(self)
    }

    /// The statistics pipelines for targets at (`aligned`) or off the logits' alignment, with
    /// or without per-row stats for a gradient; compiled on first use.
    fn pipes(&mut self, aligned: bool, grad_stats: bool) -> Pipes {
        if let Some(p) = self.res.pipes.get(&(aligned, grad_stats)) {
            return p.clone();
        }
        let gpu = &self.gpu;
        let jsd = self.variant.divergence == 2;
        let variant = LossVariant {
            targets_aligned: aligned,
            // The JSD's first pass keeps the row stats for its second.
            grad_stats: grad_stats || jsd,
            ..self.variant
        };
        let split = self.setup.strategy.split > 1;
        let get = |kernel, variant| {
            let key = PipelineKey {
                kernel,
                strategy: self.setup.strategy,
                variant,
            };
            gpu.pipelines.get(&gpu.device, key)
        };
        let second = LossVariant {
            jsd_second: true,
            ..variant
        };
        let pipes = Pipes {
            main: get(Kernel::CrossEntropy, variant),
            merge: split.then(|| get(Kernel::MergeSplitRows, variant)),
            second: jsd.then(|| {
                (
                    get(Kernel::CrossEntropy, second),
                    split.then(|| get(Kernel::MergeSplitRows, second)),
                )
            }),
            reduce: get(Kernel::ReduceTotals, variant),
        };
        self.res.pipes.insert((aligned, grad_stats), pipes.clone());
        pipes
    }

    /// An elementwise pipeline (log-softmax or gradient) for one variant.
    fn elementwise(
        &mut self,
        kernel: Kernel,
        aligned: bool,
        paired: bool,
        scales_from_totals: bool,
        in_place: bool,
    ) -> Arc<wgpu::ComputePipeline> {
        let reduction = match self.reduction {
            Reduction::None => 0,
            Reduction::Sum => 1,
            Reduction::Mean => 2,
        };
        // Only the half gradient reads logits and outputs word by word; in place they are one.
        let paired =
            paired || in_place || !self.variant.dtype.is_half() || kernel != Kernel::Gradient;
        let key = (
            kernel,
            aligned,
            paired,
            reduction,
            scales_from_totals,
            in_place,
        );
        if let Some(p) = self.res.elementwise.get(&key) {
            return p.clone();
        }
        let variant = LossVariant {
            targets_aligned: aligned,
            grad_stats: kernel == Kernel::Gradient,
            metrics: false,
            reduction,
            scales_from_totals,
            in_place,
            paired,
            ..self.variant
        };
        let pipeline = self.gpu.pipelines.get(
            &self.gpu.device,
            PipelineKey {
                kernel,
                strategy: self.setup.strategy,
                variant,
            },
        );
        self.res.elementwise.insert(key, pipeline.clone());
        pipeline
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
    /// largest lies beyond 2^±20 or the smallest nonzero below 2^-125): per-row cross-entropies in
    /// [`PreparedLoss::row_results`] carry it; every value read back through xent, and the
    /// gradient, have it divided out.
    pub fn weight_scale(&self) -> f64 {
        self.weight_scale
    }

    /// Per-row results of the last call, one `vec4<f32>` per row: (cross-entropy × weight
    /// scale, log-sum-exp, entropy of the target or 0, z-loss or 0). A caller may copy or bind
    /// it.
    pub fn row_results(&self) -> &wgpu::Buffer {
        &self.res.row_results
    }

    /// Records one call on the caller's device buffers into `encoder`: clears the status,
    /// then the row passes chunk by chunk, the reduction, and a copy of the status to the
    /// read-back buffer. Every input is checked first; nothing is recorded on an error.
    pub fn record(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
    ) -> Result<()> {
        let bound = self.bind(logits, targets)?;
        self.record_bound(encoder, &bound)
    }

    /// [`PreparedLoss::record`], and the gradient of the loss with respect to the logits,
    /// scaled by `upstream` (a scalar for sum and mean, one value per row for none), into
    /// `gradient`. Two reads and one write of the logits in all.
    pub fn record_gradient(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
        gradient: GradientOutput<'_>,
        upstream: Upstream<'_>,
    ) -> Result<()> {
        let bound = self.bind_gradient(logits, targets, gradient)?;
        self.record_bound_gradient(encoder, &bound, upstream)
    }

    /// Records one call on inputs bound earlier by [`PreparedLoss::bind`]: as
    /// [`PreparedLoss::record`], without making bind groups (no gradient, even when the inputs
    /// have a gradient output).
    pub fn record_bound(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &BoundInputs,
    ) -> Result<()> {
        self.record_bound_timed(encoder, inputs, None, None)
    }

    /// Records one call with its gradient on inputs bound by
    /// [`PreparedLoss::bind_gradient`].
    pub fn record_bound_gradient(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &BoundInputs,
        upstream: Upstream<'_>,
    ) -> Result<()> {
        self.record_bound_timed(encoder, inputs, Some(upstream), None)
    }

    /// Records a call (with its gradient when `upstream` is given), with timestamps around
    /// its compute pass (benchmarks).
    pub(crate) fn record_bound_timed(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &BoundInputs,
        upstream: Option<Upstream<'_>>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        if inputs.owner != self.id {
            return Err(XentError::NotPrepared(
                "these inputs were bound by another prepared loss".into(),
            ));
        }
        if upstream.is_some() && inputs.gradient.is_none() {
            return Err(XentError::NotPrepared(
                "these inputs were bound without a gradient output (use bind_gradient)".into(),
            ));
        }
        // A parameter slot of the call's own (its per-row upstream gradient goes there), given
        // back if the upstream gradient is refused: a refused call must not take one of the 8
        // slots of the calls before the next submission.
        self.begin_call();
        let passes = match upstream {
            None => Passes::LOSS,
            Some(upstream) => {
                if let Err(e) = self.set_upstream(upstream, inputs.rows, None) {
                    self.calls -= 1;
                    return Err(e);
                }
                Passes::gradient(
                    self.reduction == Reduction::Mean && upstream.mean_over().is_none(),
                )
            }
        };
        let chunks = 0..inputs.chunks.len();
        self.record_call(encoder, inputs, chunks, true, true, passes, timestamps);
        Ok(())
    }

    /// Moves to the next parameter slot for a call about to be recorded: the calls recorded
    /// before one submission keep their own parameters and per-row upstream gradients.
    pub(crate) fn begin_call(&mut self) {
        self.calls += 1;
    }

    /// The parameter slot of the call being recorded.
    fn call_slot(&self) -> usize {
        (self.calls % PARAM_SLOTS as u64) as usize
    }

    /// The number of the call being recorded, 1 to [`CALL_NUMBERS`] (0 is no call).
    fn call_number(&self) -> u32 {
        (self.calls.saturating_sub(1) % CALL_NUMBERS) as u32 + 1
    }

    /// Writes the upstream gradient's scales into every chunk's parameters (recorded with the
    /// next call): for the mean, `mean` gives (Σ w_y, counted rows) when the host knows them,
    /// else the device's totals are used.
    pub(crate) fn set_upstream(
        &mut self,
        upstream: Upstream<'_>,
        rows: usize,
        mean: Option<(f64, f64)>,
    ) -> Result<()> {
        upstream.check(self.reduction, rows)?;
        let _serial = self.gpu.serial();
        let unscale = 1.0 / self.weight_scale;
        let (ce, z) = match (self.reduction, upstream) {
            (Reduction::None, Upstream::PerRow(_)) => (unscale, 1.0),
            (Reduction::Sum, Upstream::Scalar(g)) => (g * unscale, g),
            (Reduction::Mean, Upstream::MeanOver { grad, .. }) => {
                let (denominator, counted) = upstream.mean_over().unwrap_or((1.0, 1.0));
                (grad / (denominator * self.weight_scale), grad / counted)
            }
            (Reduction::Mean, Upstream::Scalar(g)) => match mean {
                // The device's a_k and B carry the weight scale; the host's Σ w_y does not.
                Some((denominator, counted)) => {
                    (g / (denominator * self.weight_scale), g / counted)
                }
                // The device divides by its own totals: the weight scale cancels for class
                // indices (their denominator carries it), not for a count of rows.
                None => match self.setup.targets {
                    Some(TargetLayout::ClassIndices(_)) => (g, g),
                    _ => (g * unscale, g),
                },
            },
            // Checked above.
            _ => (0.0, 0.0),
        };
        let ce = ce * self.grad_factor;
        // The kernel multiplies each row's terms by these (and a per-row upstream value) in
        // f32: class weights far from 1 (scaled on the device) with a large upstream gradient
        // could overflow there where the gradient itself is finite.
        let largest = match upstream {
            Upstream::PerRow(g) => g.iter().fold(0.0_f64, |m, v| m.max(v.abs())),
            _ => 1.0,
        };
        // (An infinite scale in f64 is no overflow: a mean over no counted rows, whose
        // gradient is all zeros, or an infinite upstream gradient, as the reference has it.)
        for scale in [ce * largest, z * largest] {
            if scale.is_finite() && !(scale as f32).is_finite() {
                return Err(XentError::GradientScale(scale));
            }
        }
        if let Upstream::PerRow(g) = upstream {
            let values: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            let offset = self.upstream_slot_at() as u64 * 4;
            self.gpu
                .queue
                .write_buffer(&self.res.weights, offset, bytemuck::cast_slice(&values));
        }
        self.grad_scales = Some((ce as f32, z as f32));
        Ok(())
    }

    /// Records and submits one call on its own encoder (for callers that prefer that).
    pub fn run(&mut self, logits: DeviceLogits<'_>, targets: DeviceTargets<'_>) -> Result<()> {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        self.record(&mut encoder, logits, targets)?;
        self.submit(encoder)
    }

    /// [`PreparedLoss::record_gradient`] on its own encoder, submitted.
    pub fn run_gradient(
        &mut self,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
        gradient: GradientOutput<'_>,
        upstream: Upstream<'_>,
    ) -> Result<()> {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        self.record_gradient(&mut encoder, logits, targets, gradient, upstream)?;
        self.submit(encoder)
    }

    fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.gpu.scoped("submitting a loss", || {
            self.gpu.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    /// Checks device inputs and binds them for calls of this loss: the bind groups are made
    /// once, inside an error scope (a buffer of another device is an error here).
    pub fn bind(
        &mut self,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
    ) -> Result<BoundInputs> {
        self.bind_device(&logits, &targets, None)
    }

    /// [`PreparedLoss::bind`] with a gradient output, for
    /// [`PreparedLoss::record_bound_gradient`].
    pub fn bind_gradient(
        &mut self,
        logits: DeviceLogits<'_>,
        targets: DeviceTargets<'_>,
        gradient: GradientOutput<'_>,
    ) -> Result<BoundInputs> {
        if self.setup.shard.is_some() {
            // This loss's row statistics are the shard's own, not the whole vocabulary's.
            return Err(XentError::NotPrepared(
                "a shard's gradient needs the row statistics merged over the whole vocabulary: \
                 GpuContext::partial_gradient computes it"
                    .into(),
            ));
        }
        self.bind_device(&logits, &targets, Some(gradient))
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
        targets: &DeviceTargets<'_>,
        gradient: Option<GradientOutput<'_>>,
    ) -> Result<BoundInputs> {
        let (rows, classes) = (logits.rows(), logits.classes());
        self.check_shape(rows, classes, Some(targets.layout()))?;
        let dtype = self.shape.dtype();
        if logits.dtype() != dtype {
            return Err(XentError::NotPrepared(format!(
                "prepared for {dtype} logits, called with {}",
                logits.dtype()
            )));
        }
        let value = dtype.bytes() as u64;
        let logit_row = classes as u64 * value;
        check_view(
            "logits",
            logits.buffer(),
            logits.offset(),
            rows as u64 * logit_row,
            value,
        )?;
        let target_row = targets.layout().row_bytes(classes);
        check_view(
            "targets",
            targets.buffer(),
            targets.offset(),
            rows as u64 * target_row,
            targets.layout().element_bytes().min(4),
        )?;
        if let Some(GradientOutput::Buffer { buffer, offset }) = gradient {
            check_view("gradient", buffer, offset, rows as u64 * logit_row, value)?;
            // One buffer cannot be read and written by the same dispatch.
            if buffer == logits.buffer() || buffer == targets.buffer() {
                return Err(XentError::DeviceBuffer {
                    what: "gradient",
                    why: "the gradient buffer is also an input of the call; give another \
                          buffer, or GradientOutput::InPlace to write over the logits"
                        .into(),
                });
            }
        }
        if matches!(gradient, Some(GradientOutput::InPlace)) && targets.buffer() == logits.buffer()
        {
            return Err(XentError::DeviceBuffer {
                what: "gradient",
                why: "in place, the logits are written, so the targets must lie in another buffer"
                    .into(),
            });
        }
        let sources: Vec<ChunkSource<'_>> = self
            .chunk_ranges(rows)
            .map(|range| {
                let at = |offset: u64, row: u64| offset + range.start as u64 * row;
                ChunkSource {
                    logits: (logits.buffer(), at(logits.offset(), logit_row)),
                    targets: Some((targets.buffer(), at(targets.offset(), target_row))),
                    outputs: match gradient {
                        Some(GradientOutput::Buffer { buffer, offset }) => {
                            Some((buffer, at(offset, logit_row)))
                        }
                        _ => None,
                    },
                }
            })
            .collect();
        let mode = gradient.map(|g| match g {
            GradientOutput::Buffer { .. } => GradientMode::Buffer,
            GradientOutput::InPlace => GradientMode::InPlace,
        });
        self.bind_sources(rows, &sources, mode)
    }

    /// The row ranges of a call of `rows` rows.
    pub(crate) fn chunk_ranges(&self, rows: usize) -> impl Iterator<Item = Range<usize>> {
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
        gradient: Option<GradientMode>,
    ) -> Result<BoundInputs> {
        let gpu = self.gpu.clone();
        gpu.scoped("binding the inputs", || {
            self.make_call(rows, sources, gradient)
        })
    }

    fn make_call(
        &mut self,
        rows: usize,
        sources: &[ChunkSource<'_>],
        gradient: Option<GradientMode>,
    ) -> Result<BoundInputs> {
        let classes = self.shape.classes();
        let unit = self.setup.strategy.rows_per_final_group() as usize;
        let ranges: Vec<_> = self.chunk_ranges(rows).collect();
        let groups: usize = ranges.iter().map(|r| r.len().div_ceil(unit)).sum();
        let align = self.gpu.facts.binding_alignment;
        let (ignore_lo, ignore_hi) = self
            .ignore_index
            .map_or((0, 0), |i| (i as u32, (i >> 32) as u32));
        let target_row = self.setup.targets.map_or(0, |t| t.row_bytes(classes));
        let target_value = self.setup.targets.map_or(4, |t| t.element_bytes().min(4));
        let value = self.shape.dtype().bytes() as u64;
        let logit_bytes = |n: usize| n as u64 * classes as u64 * value;
        // Log-probabilities are f32; the gradient is in the logits' dtype.
        let output_value = if self.setup.output == Output::LogSoftmax {
            4
        } else {
            value
        };
        let output_bytes = |n: usize| n as u64 * classes as u64 * output_value;
        let mut group_base = 0;
        let mut chunks = Vec::with_capacity(ranges.len());
        for (range, source) in ranges.iter().zip(sources) {
            let n = range.len();
            let (lb, lo) = source.logits;
            let logits = self.views(lb, lo, logit_bytes(n), align, value);
            let targets = match source.targets {
                Some((buffer, offset)) => {
                    self.views(buffer, offset, n as u64 * target_row, align, target_value)
                }
                None => Views::stand_in(&self.res.empty),
            };
            let outputs = match source.outputs {
                Some((buffer, offset)) => {
                    self.views(buffer, offset, output_bytes(n), align, output_value)
                }
                None => Views::stand_in(&self.res.empty_out),
            };
            // Four aligned logits have their four probabilities in one vec4 (f32), or in two
            // whole words (halves).
            let skew = logits.element_offset as i64 - targets.element_offset as i64;
            let aligned = skew % if self.variant.targets_half { 2 } else { 4 } == 0;
            let paired = (logits.element_offset as i64 - outputs.element_offset as i64) % 2 == 0;
            let bind = |logits: &Views<'_>, outputs: &Views<'_>| {
                let entries = [
                    (slot::LOGITS4, logits.vec4.clone()),
                    (slot::LOGITS, logits.scalar.clone()),
                    (slot::TARGETS4, targets.vec4.clone()),
                    (slot::TARGETS, targets.scalar.clone()),
                    (slot::OUTPUTS, outputs.scalar.clone()),
                ];
                let entries: Vec<_> = entries
                    .into_iter()
                    .map(|(binding, b)| wgpu::BindGroupEntry {
                        binding,
                        resource: wgpu::BindingResource::Buffer(b),
                    })
                    .collect();
                self.gpu
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some("xent inputs"),
                        layout: &self.gpu.pipelines.input_layout,
                        entries: &entries,
                    })
            };
            let inputs = bind(&logits, &outputs);
            // In place: the logits bound once, for writing, and no read-only view of them.
            let in_place = (gradient == Some(GradientMode::InPlace))
                .then(|| bind(&Views::stand_in(&self.res.empty), &logits));
            let outputs_offset = if gradient == Some(GradientMode::InPlace) {
                logits.element_offset
            } else {
                outputs.element_offset
            };
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
                    rows2_at: self.rows2_at,
                    total_rows: rows as u32,
                    outputs_offset,
                    upstream_at: self.upstream_at,
                    ignore_lo,
                    ignore_hi,
                    smoothing: self.smoothing as f32,
                    smoothing_per_class: (self.smoothing / self.total_classes() as f64) as f32,
                    cap: self.cap as f32,
                    z_loss: self.z_loss as f32,
                    grad_ce: 0.0,
                    grad_z: 0.0,
                    metrics_at: self.metrics_at,
                    order_at: self.order_at,
                    inv_temperature: self.inv_temperature,
                    beta: self.beta,
                    class_offset: self.class_offset(),
                    total_classes: self.total_classes() as u32,
                    // Set as the call is recorded, with its parameter slot.
                    call: 0,
                    one: 1.0,
                },
                inputs,
                in_place,
                aligned,
                paired,
            });
            group_base += n.div_ceil(unit);
        }
        Ok(BoundInputs {
            owner: self.id,
            rows,
            chunks: Serialised::new(&self.gpu, chunks),
            gradient,
        })
    }

    /// The two views of `bytes` from `offset` of `buffer`, values of `value` bytes: the
    /// binding starts at the aligned offset below and ends on a whole word; the vec4 view
    /// covers its whole vec4s (or a 16-byte stand-in).
    fn views<'b>(
        &'b self,
        buffer: &'b wgpu::Buffer,
        offset: u64,
        bytes: u64,
        align: u64,
        value: u64,
    ) -> Views<'b> {
        let start = offset - offset % align;
        let size = (offset + bytes - start).next_multiple_of(4);
        let whole = size / 16 * 16;
        let vec4 = if whole >= 16 {
            wgpu::BufferBinding {
                buffer,
                offset: start,
                size: wgpu::BufferSize::new(whole),
            }
        } else {
            self.res.empty.as_entire_buffer_binding()
        };
        Views {
            vec4,
            scalar: wgpu::BufferBinding {
                buffer,
                offset: start,
                size: wgpu::BufferSize::new(size),
            },
            element_offset: ((offset - start) / value) as u32,
        }
    }

    /// Records chunks `chunks` of a call: with `begin`, the status is cleared first; with
    /// `finish`, the reduction and the status copy follow. `passes` says which elementwise
    /// pass runs (the gradient before the reduction, chunk by chunk, unless its scales come
    /// from the totals).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_call(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        call: &BoundInputs,
        chunks: Range<usize>,
        begin: bool,
        finish: bool,
        passes: Passes,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        // Writing parameters and compiling pipelines use the device.
        let _serial = self.gpu.serial();
        let (grad_ce, grad_z) = if passes.gradient {
            self.grad_scales.unwrap_or((0.0, 0.0))
        } else {
            (0.0, 0.0)
        };
        // A chunk's parameters take effect at the next submission, the one that runs it; each
        // call has its own slot of them (`begin_call`).
        let first_param = self.call_slot() * self.chunks;
        let call_number = self.call_number();
        for k in chunks.clone() {
            let p = Params {
                grad_ce,
                grad_z,
                upstream_at: self.upstream_slot_at(),
                call: call_number,
                ..call.chunks[k].params
            };
            let k = first_param + k;
            if self.written[k] != Some(p) {
                let offset = k as u64 * self.params_stride;
                self.gpu
                    .queue
                    .write_buffer(&self.res.params, offset, bytemuck::bytes_of(&p));
                self.written[k] = Some(p);
            }
        }
        self.last_rows = call.rows;
        if begin {
            // The status, but for the overrun flag until a read has seen it.
            encoder.clear_buffer(&self.res.status, 0, Some(OVERRUN_BYTE));
            if self.clear_overrun.swap(false, Ordering::Relaxed) {
                encoder.clear_buffer(&self.res.status, OVERRUN_BYTE, Some(4));
            }
            // The call's number, in the encoder's order: what its passes check their
            // parameters against.
            let at = (call_number as u64 - 1) * 4;
            let word = self.res.weights.size() - 4;
            encoder.copy_buffer_to_buffer(&self.res.call_numbers, at, &self.res.weights, word, 4);
        }
        // Every pipeline this call needs, before the pass borrows the encoder.
        let in_place = call.gradient == Some(GradientMode::InPlace);
        let mut stats = Vec::with_capacity(chunks.len());
        let mut elementwise = Vec::with_capacity(chunks.len());
        for k in chunks.clone() {
            let (aligned, paired) = (call.chunks[k].aligned, call.chunks[k].paired);
            stats.push(self.pipes(aligned, passes.gradient));
            elementwise.push(if passes.gradient {
                Some(self.elementwise(
                    Kernel::Gradient,
                    aligned,
                    paired,
                    passes.scales_from_totals,
                    in_place,
                ))
            } else if passes.log_softmax {
                Some(self.elementwise(Kernel::LogSoftmax, aligned, true, false, false))
            } else {
                None
            });
        }
        let s = self.setup.strategy;
        let max_dim = self.gpu.facts.max_groups_per_dimension;
        let stride = self.params_stride;
        let param_offset = |k: usize| ((first_param + k) as u64 * stride) as u32;
        let owned = &self.res.owned;
        let main_groups = |rows: usize| (rows as u32).div_ceil(s.rows_per_group()) * s.split;
        let elementwise_pass =
            |pass: &mut wgpu::ComputePass<'_>, k: usize, pipeline: &wgpu::ComputePipeline| {
                let chunk = &call.chunks[k];
                pass.set_bind_group(0, owned, &[param_offset(k)]);
                pass.set_bind_group(1, chunk.in_place.as_ref().unwrap_or(&chunk.inputs), &[]);
                pass.set_pipeline(pipeline);
                let (x, y) = grid(main_groups(chunk.rows), max_dim);
                pass.dispatch_workgroups(x, y, 1);
            };
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("xent"),
            timestamp_writes: timestamps,
        });
        let late = passes.gradient && passes.scales_from_totals;
        for (i, k) in chunks.clone().enumerate() {
            let chunk = &call.chunks[k];
            let pipes = &stats[i];
            pass.set_bind_group(0, owned, &[param_offset(k)]);
            pass.set_bind_group(1, &chunk.inputs, &[]);
            if !passes.statistics {
                if let Some(p) = &elementwise[i] {
                    elementwise_pass(&mut pass, k, p);
                }
                continue;
            }
            pass.set_pipeline(&pipes.main);
            let (x, y) = grid(main_groups(chunk.rows), max_dim);
            pass.dispatch_workgroups(x, y, 1);
            if let Some(merge) = &pipes.merge {
                pass.set_pipeline(merge);
                let (x, y) = grid((chunk.rows as u32).div_ceil(s.workgroup_size), max_dim);
                pass.dispatch_workgroups(x, y, 1);
            }
            if let Some((second, merge)) = &pipes.second {
                pass.set_pipeline(second);
                let (x, y) = grid(main_groups(chunk.rows), max_dim);
                pass.dispatch_workgroups(x, y, 1);
                if let Some(merge) = merge {
                    pass.set_pipeline(merge);
                    let (x, y) = grid((chunk.rows as u32).div_ceil(s.workgroup_size), max_dim);
                    pass.dispatch_workgroups(x, y, 1);
                }
            }
            if let (false, Some(p)) = (late, &elementwise[i]) {
                elementwise_pass(&mut pass, k, p);
            }
        }
        // (A shard's calls need it too: besides the totals it brings the value of an
        // out-of-range class index into the status.)
        let mut reduced = false;
        if finish
            && passes.statistics
            && let Some(pipes) = stats.last()
        {
            pass.set_pipeline(&pipes.reduce);
            pass.dispatch_workgroups(1, 1, 1);
            reduced = true;
        }
        if late {
            for (i, k) in chunks.enumerate() {
                if let Some(p) = &elementwise[i] {
                    elementwise_pass(&mut pass, k, p);
                }
            }
        }
        drop(pass);
        if finish {
            // A call without a reduction (no rows, or no statistics pass) leaves no number.
            self.last_call = if reduced { call_number } else { 0 };
            self.last_device_scale = (passes.gradient && passes.scales_from_totals)
                .then(|| self.grad_scales.map_or(0.0, |s| s.0));
            self.slot = self.free_slot();
            encoder.copy_buffer_to_buffer(
                &self.res.status,
                0,
                &self.res.slots[self.slot].buffer,
                0,
                STATUS_BYTES,
            );
            // The host path reads every row: copy them now, so one wait brings back both.
            self.rows_copied = self.setup.chunk_cap.is_some() && self.last_rows > 0;
            if self.rows_copied {
                let back = self.rows_back_buffer();
                self.copy_rows(encoder, &back);
            }
        }
    }

    /// A read-back slot no pending read holds: the last call's if it is free, else another,
    /// else a new one.
    fn free_slot(&mut self) -> usize {
        let slots = &self.res.slots;
        if !slots[self.slot].is_busy() {
            return self.slot;
        }
        if let Some(free) = slots.iter().position(|s| !s.is_busy()) {
            return free;
        }
        let slot = TotalsSlot::new(&self.gpu);
        self.res.slots.push(slot);
        self.res.slots.len() - 1
    }

    /// The read-back slot of the last call, unless a pending read holds it.
    fn last_slot(&self) -> Result<&wgpu::Buffer> {
        let slot = &self.res.slots[self.slot];
        if slot.is_busy() {
            return Err(XentError::NotPrepared(
                "the last call's totals are already being read by a PendingTotals (wait on it)"
                    .into(),
            ));
        }
        Ok(&slot.buffer)
    }

    /// What reads the last call's status.
    fn totals_reader(&self) -> TotalsReader {
        TotalsReader {
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            classes: self.shape.classes(),
            total_classes: self.total_classes(),
            targets: self.setup.targets,
            weight_scale: self.weight_scale,
            z_loss: self.variant.z_loss,
            entropy: self.variant.entropy,
            rows: self.last_rows,
            call: self.last_call,
            device_scale: self.last_device_scale,
            distillation: self.distillation.map(|d| DistillationSums {
                scale: d.loss_scale(),
                kl_only: d.divergence() == Divergence::Jsd { beta: 0.0 },
                entropy: d.divergence() == Divergence::ForwardKl,
            }),
        }
    }

    /// Where the current call's per-row upstream gradient starts in the weights buffer.
    fn upstream_slot_at(&self) -> u32 {
        match self.reduction {
            Reduction::None => self.upstream_at + (self.call_slot() * self.shape.max_rows()) as u32,
            _ => self.upstream_at,
        }
    }

    /// Starts reading the totals of the last call, which has been submitted, and returns at
    /// once: [`PendingTotals::wait`] later gives what [`PreparedLoss::read_totals`] would have
    /// given now, waiting for that call only. Meanwhile this loss records and runs further
    /// calls (their totals go to other read-back buffers), so a loop that submits call `i`
    /// and then reads call `i − 1` never leaves the device idle while the host waits.
    ///
    /// Call it after the submission that holds the call (as [`PreparedLoss::run`] makes).
    /// Before it, the read maps the buffer the call is to copy its status into, and wgpu then
    /// refuses the submission that holds the call (a buffer still mapped). A call the device
    /// has already run is read at once, and its read-back buffer freed. Each read also submits
    /// an empty batch, whose index bounds [`PendingTotals::wait`].
    ///
    /// A distillation's totals are its loss's, as [`PreparedLoss::read_totals`] says.
    ///
    /// Errors: [`XentError::NotPrepared`] if the last call's totals are already pending, or
    /// for a shard's loss ([`GpuContext::prepare_partials`](crate::GpuContext::prepare_partials):
    /// its calls have no totals of their own).
    pub fn read_later(&mut self) -> Result<PendingTotals> {
        self.start_read(true)
    }

    /// [`PreparedLoss::read_later`]; `read_early` reads a status whose map is done as the read
    /// begins there and then (false only in tests, to take the waiting path every time).
    pub(crate) fn start_read(&mut self, read_early: bool) -> Result<PendingTotals> {
        self.check_totals()?;
        self.last_slot()?;
        let pending = PendingTotals::start(
            &self.gpu,
            &self.res.slots[self.slot],
            self.totals_reader(),
            read_early,
        );
        // The status it reads was copied before any call recorded from now on runs. (A pending
        // read dropped unread takes its report with it, as it does the call's other errors.)
        self.overrun_reported(!pending.found_unsubmitted());
        Ok(pending)
    }

    /// Vec4s per row that come back: the results, and the token metrics after them.
    fn row_vec4s(&self) -> u64 {
        1 + (self.setup.metrics || self.setup.shard.is_some()) as u64
    }

    /// Records copies of the last call's per-row results (then its token metrics) to `back`.
    fn copy_rows(&self, encoder: &mut wgpu::CommandEncoder, back: &wgpu::Buffer) {
        let bytes = self.last_rows as u64 * ROW_RESULT_BYTES;
        encoder.copy_buffer_to_buffer(&self.res.row_results, 0, back, 0, bytes);
        if self.row_vec4s() > 1 {
            let at = self.metrics_at as u64 * ROW_RESULT_BYTES;
            encoder.copy_buffer_to_buffer(&self.res.row_results, at, back, bytes, bytes);
        }
    }

    /// The read-back buffer of the per-row results, made on first use.
    fn rows_back_buffer(&mut self) -> wgpu::Buffer {
        let capacity = self.shape.max_rows() as u64 * ROW_RESULT_BYTES * self.row_vec4s();
        let gpu = &self.gpu;
        self.res
            .rows_back
            .get_or_insert_with(|| gpu.readback_buffer("xent row results read-back", capacity))
            .clone()
    }

    /// Maps the status of the last call submitted and returns its totals, or the error the
    /// device found (an out-of-range class index, naming its row and value; a logit beyond
    /// f32's safe range). Waits for the device.
    ///
    /// Errors: those the device found; [`XentError::NotSubmitted`] before the call's
    /// submission; [`XentError::CallsOverran`] when a call since the last read found its
    /// parameter slot taken (more than 8 calls before one submission);
    /// [`XentError::NotPrepared`] while a [`PendingTotals`] reads the same call, or for a
    /// shard's loss (read its partials).
    ///
    /// A distillation's totals ([`GpuContext::prepare_distillation`](crate::GpuContext::prepare_distillation))
    /// are its loss's, scaled as its spec says: `sum` and `loss` of the divergence, the mean's
    /// denominator N, and for the forward loss `entropy_sum` (Σ H(p)), so that
    /// [`LossTotals::reduced_kl_divergence`] is the reduced KL(p‖q).
    pub fn read_totals(&mut self) -> Result<LossTotals> {
        self.check_totals()?;
        self.fetch_totals()
    }

    /// Waits for the last call and returns the first error the device found since the last
    /// read (an overrun of the parameter slots included), whatever the kind of loss.
    pub(crate) fn check_last_call(&self) -> Result<()> {
        self.fetch_totals().map(|_| ())
    }

    /// The last call's totals (for a shard, only its errors mean anything).
    fn fetch_totals(&self) -> Result<LossTotals> {
        let bytes = self
            .gpu
            .fetch(&[(self.last_slot()?, STATUS_BYTES)])?
            .remove(0);
        self.decode(&bytes)
    }

    /// The last call's totals from its status `bytes`.
    fn decode(&self, bytes: &[u8]) -> Result<LossTotals> {
        let totals = self.totals_reader().read(bytes);
        self.overrun_reported(!matches!(totals, Err(XentError::NotSubmitted)));
        totals
    }

    /// A read has reported (or, pending, will report) the overrun flag, set or not, when the
    /// status it read is the last call's own (`own_status`: not an earlier call's, found before
    /// the submission): the next call recorded clears the flag, right after that status was
    /// copied in the encoder's order. Not after a call without a reduction, whose status
    /// cannot be told from an earlier one's.
    fn overrun_reported(&self, own_status: bool) {
        if own_status && self.last_call != 0 {
            self.clear_overrun.store(true, Ordering::Relaxed);
        }
    }

    /// [`PreparedLoss::read_totals`], then the per-row results of the same call: the
    /// [`LossOutput`] the host-slice API returns.
    ///
    /// Errors: as [`PreparedLoss::read_totals`], and [`XentError::NotPrepared`] for a
    /// distillation (its per-row output is [`PreparedLoss::read_distillation`]'s).
    pub fn read(&mut self) -> Result<LossOutput> {
        self.check_totals()?;
        if self.distillation.is_some() {
            return Err(XentError::NotPrepared(
                "this loss is a distillation: read_distillation gives its per-row output".into(),
            ));
        }
        Ok(self.read_parts()?.0)
    }

    /// A shard's loss has no totals of its own.
    fn check_totals(&self) -> Result<()> {
        if self.setup.shard.is_some() {
            return Err(XentError::NotPrepared(
                "a shard's calls have no totals of their own: read_partials, then merge them"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The distillation output of the last call of a loss made by
    /// [`GpuContext::prepare_distillation`](crate::GpuContext::prepare_distillation): per row
    /// the loss (and, for the forward loss, H(p) and KL(p‖q)), scaled and reduced as the spec
    /// says.
    ///
    /// Errors: [`XentError::NotPrepared`] for a loss that is not a distillation; the device's
    /// errors as [`PreparedLoss::read_totals`].
    pub fn read_distillation(&mut self) -> Result<DistillationOutput> {
        let Some(spec) = self.distillation else {
            return Err(XentError::NotPrepared(
                "this loss is not a distillation: prepare it with prepare_distillation".into(),
            ));
        };
        let (_, raw, _) = self.read_parts()?;
        Ok(super::scoring::distillation_output(
            &spec,
            &raw,
            self.shape.classes(),
        ))
    }

    /// The per-row partials of the last call of a loss made by
    /// [`GpuContext::prepare_partials`](crate::GpuContext::prepare_partials).
    ///
    /// Errors: [`XentError::NotPrepared`] for a loss that is not a shard's; the device's
    /// errors as [`PreparedLoss::read_totals`].
    pub fn read_partials(&mut self) -> Result<Vec<RowPartial>> {
        if self.setup.shard.is_none() {
            return Err(XentError::NotPrepared(
                "this loss is not a shard's: prepare it with prepare_partials".into(),
            ));
        }
        let (_, raw, more) = self.read_parts()?;
        Ok(super::shard::partials_from_raw(
            &raw,
            &more,
            self.weight_scale,
        ))
    }

    /// [`PreparedLoss::read`], and the token metrics of the same call (a loss made
    /// [`PreparedLoss::with_metrics`]), whose top-k hits count ranks below `top_k`.
    ///
    /// Errors: [`XentError::NotPrepared`] when the loss computes no metrics; the device's
    /// errors as [`PreparedLoss::read_totals`].
    pub fn read_with_metrics(&mut self, top_k: usize) -> Result<(LossOutput, TokenMetrics)> {
        if !self.setup.metrics {
            return Err(XentError::NotPrepared(
                "this loss computes no token metrics: prepare it with_metrics".into(),
            ));
        }
        let (out, rows, metrics) = self.read_parts()?;
        let rows = rows
            .iter()
            .zip(&metrics)
            .zip(&out.log_sum_exp)
            .map(|((r, m), &lse)| {
                let (argmax, rank) = (m[0].to_bits() as usize, m[1].to_bits());
                let target = (rank != u32::MAX).then(|| {
                    let class = r[2].to_bits() as usize;
                    TargetScore::new(class, m[3] as f64, rank as usize, argmax, top_k)
                });
                TokenRow {
                    argmax,
                    entropy: m[2] as f64,
                    log_sum_exp: lse,
                    target,
                }
            })
            .collect();
        Ok((out, TokenMetrics::from_rows(rows, top_k)))
    }

    /// The output, the raw per-row results and (with metrics) the raw per-row metrics.
    pub(crate) fn read_parts(&mut self) -> Result<(LossOutput, Vec<RawRow>, Vec<RawRow>)> {
        let (totals, mut rows) = if self.rows_copied {
            let gpu = self.gpu.clone();
            let back = self.rows_back_buffer();
            let bytes = self.last_rows as u64 * ROW_RESULT_BYTES * self.row_vec4s();
            let data = gpu.fetch(&[(self.last_slot()?, STATUS_BYTES), (&back, bytes)])?;
            let rows: Vec<[f32; 4]> = bytemuck::cast_slice(&data[1]).to_vec();
            (self.decode(&data[0])?, rows)
        } else {
            (self.fetch_totals()?, self.read_rows()?)
        };
        let metrics = rows.split_off(self.last_rows);
        let scale = self.weight_scale;
        let z = self.variant.z_loss;
        let per_row = rows
            .iter()
            .map(|r| r[0] as f64 / scale + if z { r[3] as f64 } else { 0.0 })
            .collect();
        let column = |c: usize| rows.iter().map(|r| r[c] as f64).collect();
        let out = LossOutput::from_totals_with_z_loss(
            totals,
            per_row,
            column(1),
            self.variant.entropy.then(|| column(2)),
            z.then(|| column(3)),
        );
        Ok((out, rows, metrics))
    }

    /// Copies the last call's per-row results back (then its token metrics, with metrics).
    fn read_rows(&mut self) -> Result<Vec<[f32; 4]>> {
        let bytes = self.last_rows as u64 * ROW_RESULT_BYTES * self.row_vec4s();
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let gpu = self.gpu.clone();
        let back = self.rows_back_buffer();
        let data = gpu.scoped("reading per-row results", || {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            self.copy_rows(&mut encoder, &back);
            gpu.queue.submit([encoder.finish()]);
            Ok(gpu.read_back(&[(&back, bytes)])?.remove(0))
        })?;
        Ok(bytemuck::cast_slice(&data).to_vec())
    }

    /// The GPU this loss runs on.
    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

/// An elementwise pipeline of a prepared loss: kernel, targets aligned, logits and outputs
/// paired, reduction, scales from the totals, in place.
type ElementwiseKey = (Kernel, bool, bool, u8, bool, bool);

/// One row's `vec4<f32>` of results or of token metrics, as the device wrote it.
pub(crate) type RawRow = [f32; 4];

/// The two views of one input of a chunk.
struct Views<'a> {
    vec4: wgpu::BufferBinding<'a>,
    scalar: wgpu::BufferBinding<'a>,
    /// Element (value) offset of the chunk's data within the views.
    element_offset: u32,
}

impl<'a> Views<'a> {
    /// Both views of a 16-byte stand-in, for a binding a call does not use.
    fn stand_in(buffer: &'a wgpu::Buffer) -> Self {
        Views {
            vec4: buffer.as_entire_buffer_binding(),
            scalar: buffer.as_entire_buffer_binding(),
            element_offset: 0,
        }
    }
}

/// Bytes one row takes in each input binding: the logits, the targets, and the outputs
/// (f32 log-probabilities, or the gradient in the logits' dtype).
fn row_bytes(classes: usize, dtype: Dtype, setup: &Setup) -> Vec<u64> {
    let logits = classes as u64 * dtype.bytes() as u64;
    let mut bytes = vec![logits];
    if let Some(t) = setup.targets {
        bytes.push(t.row_bytes(classes));
    }
    match setup.output {
        Output::Loss => {}
        Output::LogSoftmax => bytes.push(classes as u64 * 4),
        Output::Gradient => bytes.push(logits),
    }
    bytes
}
