//! # xent
//!
//! Numerically stable log-softmax and cross-entropy on any GPU that wgpu reaches (Vulkan,
//! Metal, DX12, GL), in WGSL compute shaders, with an f64 CPU reference that defines the
//! right answer.
//!
//! ```no_run
//! use xent::{CrossEntropy, GpuContext, Logits, Reduction, Targets};
//!
//! let logits = [2.0_f32, 0.5, -1.0, 0.1, 0.2, 3.0]; // [2, 3]
//! let classes = [0_i64, 2];
//! let spec = CrossEntropy::new().with_reduction(Reduction::Mean).with_label_smoothing(0.1);
//!
//! let gpu = GpuContext::new()?;
//! let out = gpu.cross_entropy(&spec, Logits::new(&logits, 2, 3)?, Targets::ClassIndices(&classes))?;
//! let reference = xent::cpu::cross_entropy(&spec, Logits::new(&logits, 2, 3)?, Targets::ClassIndices(&classes))?;
//! println!("loss {:?} (CPU reference {:?})", out.loss, reference.loss);
//! # Ok::<(), xent::XentError>(())
//! ```
//!
//! Every loss is `B·lse − A` for one row, from one statistic (RowStats: running max, Σ exp,
//! A and B), gathered in a single read of the logits; see `DESIGN.md` in the repository.
//!
//! - [`GpuContext`]: the GPU path; [`CpuReference`] and [`cpu`]: the f64 reference. Both
//!   implement [`Scorer`].
//! - [`CrossEntropy`]: the loss spec (reduction, class weights, ignore index, smoothing).
//! - [`Targets`]: class indices or probabilities; [`LossOutput`]: what comes back.
//! - Training: [`cpu::cross_entropy_grad`] gives the loss and its gradient with respect to
//!   the logits, scaled by an [`Upstream`] gradient; [`CrossEntropy::with_z_loss`] and
//!   [`CrossEntropy::with_softcap`] add a z-loss and logit soft-capping.
//! - Inputs already on the GPU: [`GpuContext::prepare`] gives a [`PreparedLoss`] that
//!   records its passes on [`DeviceLogits`] and [`DeviceTargets`] (views of the caller's
//!   `wgpu::Buffer`s) into the caller's command encoder, allocates nothing per call, and reads
//!   back only the [`LossTotals`] (or, on request, the per-row results).
//! - Half precision: [`Logits::new`] takes `f32`, [`bf16`] or [`f16`](struct@f16) values ([`Dtype`]);
//!   every sum is f32 on the GPU, and the gradient comes back in the logits' dtype
//!   ([`ElementVec`]), rounded once to nearest even.
//! - Batched scoring ([`scoring`] is its f64 reference): token metrics from the loss's own pass
//!   ([`GpuContext::cross_entropy_metrics`]: accuracy, rank, top-k, entropy, perplexity),
//!   sequence log-likelihoods with multiple choice as lm-evaluation-harness
//!   ([`GpuContext::sequence_scores`]), knowledge distillation ([`Distillation`]: forward and
//!   reverse KL, generalised JSD; [`GpuContext::distillation`]) and top-k [`SparseTargets`]
//!   ([`GpuContext::sparse_cross_entropy`]), each with its gradient where one exists.
//! - Past one device ([`shard`]): a vocabulary shard's per-row [`RowPartial`]s
//!   ([`GpuContext::partials`]), their merge into the unsharded outputs, each shard's gradient
//!   columns ([`GpuContext::partial_gradient`]), and a [`ShardedScorer`] over several contexts;
//!   `examples/mpi_sharded.rs` does it across MPI processes.

#![warn(missing_docs)]

pub mod cpu;
mod dtype;
mod error;
pub mod gpu;
mod grad;
mod logits;
mod output;
pub mod scoring;
pub mod shard;
mod spec;
mod targets;

pub use cpu::CpuReference;
pub use dtype::{Dtype, Element, ElementVec, Elements};
pub use error::{Result, XentError};
pub use gpu::{
    BoundInputs, DeviceLogits, DeviceTargets, GpuContext, GpuOptions, GradientOutput, IndexType,
    LossShape, PendingTotals, PreparedLoss, ShardMode, ShardedScorer, Strategy, TargetLayout,
};
pub use grad::{MeanNormalisers, Upstream};
pub use half::{bf16, f16};
pub use logits::Logits;
pub use output::{LossOutput, LossTotals};
pub use scoring::{
    Distillation, DistillationOutput, DistillationTerms, Divergence, MetricsSummary,
    MultipleChoiceOutput, SequenceScore, SparseTargets, TokenMetrics,
};
pub use shard::{MergeTargets, RowPartial, VocabShard};
pub use spec::{CrossEntropy, Reduction};
pub use targets::Targets;

/// A path that computes the losses: the GPU ([`GpuContext`]) or the CPU reference
/// ([`CpuReference`]). Both take the same spec and inputs and return the same outputs, so a
/// program (or a test) can run one spec on either.
pub trait Scorer {
    /// Cross-entropy of `logits` against `targets` under `spec`.
    fn cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput>;

    /// Per-row log-sum-exp.
    fn log_sum_exp(&self, logits: Logits<'_>) -> Result<Vec<f64>>;

    /// What computes: the adapter, or the CPU reference.
    fn describe(&self) -> String;
}
