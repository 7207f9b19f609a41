//! Shader assembly and the per-context pipeline cache.
//!
//! Every kernel is one file in `shaders/`, with the shared WGSL (RowStats and its merge, the
//! bindings and row helpers, the lane reduction) prepended. Variants are pipeline-overridable
//! constants of one module, never copies of a shader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::planner::Strategy;
use crate::dtype::Dtype;

/// How f16 values are widened: with the builtin `unpack2x16float`, or with integer operations
/// (exact everywhere, needing no capability).
const F16_UNPACK: &str = include_str!("../../shaders/f16_unpack.wgsl");
const F16_INTEGER: &str = include_str!("../../shaders/f16_integer.wgsl");

/// How a module widens f16 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum F16Widening {
    /// Integer operations: exact, needing no capability (and the prelude of modules that
    /// read no f16).
    Integer,
    /// The builtin `unpack2x16float` (wgpu's `DownlevelFlags::SHADER_F16_IN_F32`: every
    /// backend but Vulkan on llvmpipe without `Features::SHADER_F16`).
    Unpack,
}
/// Shared WGSL, in the order it is prepended.
const ROW_STATS: &str = include_str!("../../shaders/row_stats.wgsl");
const ROWS: &str = include_str!("../../shaders/rows.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");

/// The kernels, one WGSL file each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Loss and log-sum-exp, one read of the logits (`cross_entropy.wgsl`).
    CrossEntropy,
    /// Second pass of a split row (`merge_split_rows.wgsl`).
    MergeSplitRows,
    /// The call's totals from the workgroup sums (`reduce_totals.wgsl`).
    ReduceTotals,
    /// Log-probabilities from the row statistics (`log_softmax.wgsl`).
    LogSoftmax,
    /// The gradient from the row statistics (`gradient.wgsl`).
    Gradient,
}

impl Kernel {
    /// All kernels.
    pub const ALL: [Kernel; 5] = [
        Kernel::CrossEntropy,
        Kernel::MergeSplitRows,
        Kernel::ReduceTotals,
        Kernel::LogSoftmax,
        Kernel::Gradient,
    ];

    /// The kernel's own WGSL file.
    pub fn file_name(self) -> &'static str {
        match self {
            Kernel::CrossEntropy => "cross_entropy.wgsl",
            Kernel::MergeSplitRows => "merge_split_rows.wgsl",
            Kernel::ReduceTotals => "reduce_totals.wgsl",
            Kernel::LogSoftmax => "log_softmax.wgsl",
            Kernel::Gradient => "gradient.wgsl",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Kernel::CrossEntropy => include_str!("../../shaders/cross_entropy.wgsl"),
            Kernel::MergeSplitRows => include_str!("../../shaders/merge_split_rows.wgsl"),
            Kernel::ReduceTotals => include_str!("../../shaders/reduce_totals.wgsl"),
            Kernel::LogSoftmax => include_str!("../../shaders/log_softmax.wgsl"),
            Kernel::Gradient => include_str!("../../shaders/gradient.wgsl"),
        }
    }

    /// Whether the kernel reduces across lanes (and so has a subgroup variant).
    pub fn lane_reductions(self) -> bool {
        matches!(self, Kernel::CrossEntropy | Kernel::MergeSplitRows)
    }

    /// The complete WGSL source: shared code, then the kernel. With `subgroups`, the lane
    /// reductions of a kernel that has them use subgroup shuffles (the module then needs
    /// `Features::SUBGROUP`); `f16` says how it widens f16 values.
    pub fn source(self, subgroups: bool, f16: F16Widening) -> String {
        // Naga takes subgroup operations without WGSL's `enable subgroups;` (it rejects the
        // directive as unimplemented); the device feature gates them instead.
        let reduce = if subgroups && self.lane_reductions() {
            REDUCE_SUBGROUP
        } else {
            REDUCE_WORKGROUP
        };
        let f16 = match f16 {
            F16Widening::Integer => F16_INTEGER,
            F16Widening::Unpack => F16_UNPACK,
        };
        [f16, ROW_STATS, ROWS, reduce, self.body()].join("\n")
    }
}

/// What the targets are; the numbers match `TARGET_*` in `rows.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// Log-sum-exp only.
    None = 0,
    /// One class index per row.
    ClassIndex = 1,
    /// Probabilities shaped like the logits.
    Probabilities = 2,
    /// A teacher's logits shaped like the logits (distillation).
    Teacher = 3,
    /// k (class index, probability) pairs per row.
    TopK = 4,
}

/// The logits' dtype as `DTYPE` in `rows.wgsl` numbers it.
fn dtype_constant(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 0.0,
        Dtype::Bf16 => 1.0,
        Dtype::F16 => 2.0,
    }
}

/// The loss variant a pipeline computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossVariant {
    /// The logits' dtype.
    pub dtype: Dtype,
    /// Probability targets in the logits' (half) dtype rather than f32.
    pub targets_half: bool,
    /// What the targets are.
    pub target: TargetKind,
    /// Class indices are i64 (else i32).
    pub index_i64: bool,
    /// An ignore index is in force.
    pub ignore: bool,
    /// Probability targets share the logits' alignment (vec4 loads of both).
    pub targets_aligned: bool,
    /// Class weights present.
    pub weights: bool,
    /// Label smoothing ε > 0.
    pub smoothing: bool,
    /// Accumulate the target entropy.
    pub entropy: bool,
    /// Logit soft-capping.
    pub softcap: bool,
    /// z-loss.
    pub z_loss: bool,
    /// Keep per-row stats for a gradient pass.
    pub grad_stats: bool,
    /// Token metrics in the statistics pass.
    pub metrics: bool,
    /// Against a teacher: 0 the cross-entropy, 1 the reverse KL(q‖p), 2 the generalised JSD.
    pub divergence: u8,
    /// The JSD's second pass over the logits.
    pub jsd_second: bool,
    /// Per-row partial statistics instead of a loss (a vocabulary shard).
    pub partials: bool,
    /// Top-k targets: the k (0 otherwise).
    pub top_k: u32,
    /// The gradient kernel's: how the upstream gradient comes (0 per row, 1 sum, 2 mean).
    pub reduction: u8,
    /// The gradient kernel's: the mean's scales from the device totals.
    pub scales_from_totals: bool,
    /// The gradient kernel's: overwrite the logits.
    pub in_place: bool,
    /// The gradient kernel's: logits and outputs start at the same parity (halves).
    pub paired: bool,
}

impl LossVariant {
    /// Log-sum-exp only.
    pub const LSE_ONLY: LossVariant = LossVariant {
        dtype: Dtype::F32,
        targets_half: false,
        target: TargetKind::None,
        index_i64: false,
        ignore: false,
        targets_aligned: true,
        weights: false,
        smoothing: false,
        entropy: false,
        softcap: false,
        z_loss: false,
        grad_stats: false,
        metrics: false,
        divergence: 0,
        jsd_second: false,
        partials: false,
        top_k: 0,
        reduction: 2,
        scales_from_totals: false,
        in_place: false,
        paired: true,
    };
}

/// Identifies one compiled pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// Which kernel.
    pub kernel: Kernel,
    /// How rows map to workgroups.
    pub strategy: Strategy,
    /// Which loss.
    pub variant: LossVariant,
}

impl PipelineKey {
    /// How the module widens f16 values.
    pub fn f16_widening(&self) -> F16Widening {
        match (self.variant.dtype, self.strategy.f16_builtin) {
            (Dtype::F16, true) => F16Widening::Unpack,
            _ => F16Widening::Integer,
        }
    }

    /// Whether the module uses subgroup operations.
    pub fn subgroups(&self) -> bool {
        self.strategy.subgroups && self.kernel.lane_reductions()
    }

    /// The pipeline-overridable constants of this pipeline, for a device whose smallest
    /// subgroup has `subgroup_lanes` lanes.
    pub fn constants(&self, subgroup_lanes: u32) -> Vec<(&'static str, f64)> {
        let s = &self.strategy;
        let lanes = match self.kernel {
            Kernel::MergeSplitRows | Kernel::ReduceTotals => 1,
            _ => s.lanes_per_row,
        };
        let v = &self.variant;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut constants = vec![
            ("WORKGROUP_SIZE", s.workgroup_size as f64),
            ("LANES_PER_ROW", lanes as f64),
            ("SPLIT", s.split as f64),
            ("VEC4", flag(s.vec4)),
            ("DTYPE", dtype_constant(v.dtype)),
            ("TARGETS_HALF", flag(v.targets_half)),
            ("TARGET_KIND", v.target as u32 as f64),
            ("INDEX_I64", flag(v.index_i64)),
            ("HAS_IGNORE", flag(v.ignore)),
            ("TARGETS_ALIGNED", flag(v.targets_aligned)),
            ("HAS_WEIGHTS", flag(v.weights)),
            ("HAS_SMOOTHING", flag(v.smoothing)),
            ("ENTROPY", flag(v.entropy)),
            ("SOFTCAP", flag(v.softcap)),
            ("ZLOSS", flag(v.z_loss)),
            ("GRAD_STATS", flag(v.grad_stats)),
            ("METRICS", flag(v.metrics)),
            ("DIVERGENCE", v.divergence as f64),
            ("JSD_SECOND", flag(v.jsd_second)),
            ("PARTIALS", flag(v.partials)),
            ("SPARSE_K", v.top_k as f64),
        ];
        if self.kernel == Kernel::Gradient {
            constants.extend([
                ("REDUCTION", v.reduction as f64),
                ("SCALES_FROM_TOTALS", flag(v.scales_from_totals)),
                ("IN_PLACE", flag(v.in_place)),
                ("PAIRED", flag(v.paired)),
            ]);
        }
        if s.subgroups && self.kernel.lane_reductions() {
            constants.push(("SUBGROUP_LANES", subgroup_lanes as f64));
        }
        constants
    }
}

/// The binding slots of `rows.wgsl`: group 0 holds what a prepared loss owns, group 1 the
/// inputs of a call (the caller's buffers on the device path).
pub mod slot {
    /// Group 0: uniform `Params`, one per chunk at a dynamic offset.
    pub const PARAMS: u32 = 0;
    /// Group 0: class weights.
    pub const WEIGHTS: u32 = 1;
    /// Group 0: per-row results, workgroup sums and row stats.
    pub const RESULTS: u32 = 2;
    /// Group 0: status and totals.
    pub const STATUS: u32 = 3;
    /// Bindings in group 0.
    pub const OWNED_COUNT: u32 = 4;
    /// Group 1: the whole vec4s of the logits.
    pub const LOGITS4: u32 = 0;
    /// Group 1: the logits, element by element.
    pub const LOGITS: u32 = 1;
    /// Group 1: the whole vec4s of the targets.
    pub const TARGETS4: u32 = 2;
    /// Group 1: the targets, word by word.
    pub const TARGETS: u32 = 3;
    /// Group 1: elementwise outputs (log-probabilities, the gradient).
    pub const OUTPUTS: u32 = 4;
    /// Bindings in group 1.
    pub const INPUT_COUNT: u32 = 5;
}

/// A shader module: the kernel, with subgroup reductions, its f16 widening.
type ModuleKey = (Kernel, bool, F16Widening);

/// The shader modules and pipelines made so far, and the two bind-group layouts.
pub struct Pipelines {
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    subgroup_lanes: u32,
    pub(crate) owned_layout: wgpu::BindGroupLayout,
    pub(crate) input_layout: wgpu::BindGroupLayout,
    layout: wgpu::PipelineLayout,
    compiled: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl Pipelines {
    /// Makes the layouts; modules are parsed and pipelines compiled on first use, once per
    /// variant.
    pub fn new(device: &wgpu::Device, subgroup_lanes: Option<u32>) -> Self {
        let entry = |binding: u32, ty, dynamic| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: dynamic,
                min_binding_size: None,
            },
            count: None,
        };
        let read = wgpu::BufferBindingType::Storage { read_only: true };
        let write = wgpu::BufferBindingType::Storage { read_only: false };
        let owned: Vec<_> = (0..slot::OWNED_COUNT)
            .map(|binding| match binding {
                slot::PARAMS => entry(binding, wgpu::BufferBindingType::Uniform, true),
                slot::WEIGHTS => entry(binding, read, false),
                _ => entry(binding, write, false),
            })
            .collect();
        let inputs: Vec<_> = (0..slot::INPUT_COUNT)
            .map(|binding| match binding {
                slot::OUTPUTS => entry(binding, write, false),
                _ => entry(binding, read, false),
            })
            .collect();
        let owned_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("xent owned"),
            entries: &owned,
        });
        let input_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("xent inputs"),
            entries: &inputs,
        });
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("xent rows"),
            bind_group_layouts: &[Some(&owned_layout), Some(&input_layout)],
            immediate_size: 0,
        });
        Self {
            modules: Mutex::new(HashMap::new()),
            subgroup_lanes: subgroup_lanes.unwrap_or(0),
            owned_layout,
            input_layout,
            layout,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline for `key`, compiling it the first time it is asked for.
    pub fn get(&self, device: &wgpu::Device, key: PipelineKey) -> Arc<wgpu::ComputePipeline> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        compiled
            .entry(key)
            .or_insert_with(|| {
                log::debug!("compiling {key:?}");
                let constants = key.constants(self.subgroup_lanes);
                let (subgroups, f16) = (key.subgroups(), key.f16_widening());
                let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
                let module = modules
                    .entry((key.kernel, subgroups, f16))
                    .or_insert_with(|| {
                        device.create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(key.kernel.file_name()),
                            source: wgpu::ShaderSource::Wgsl(
                                key.kernel.source(subgroups, f16).into(),
                            ),
                        })
                    });
                Arc::new(
                    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(key.kernel.file_name()),
                        layout: Some(&self.layout),
                        module,
                        entry_point: Some("main"),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants: &constants,
                            // Every workgroup variable is written before it is read.
                            zero_initialize_workgroup_memory: false,
                        },
                        cache: None,
                    }),
                )
            })
            .clone()
    }
}
