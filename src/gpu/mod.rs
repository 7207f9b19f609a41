//! The GPU path: a context that owns (or borrows) a wgpu device, compiles the kernels once,
//! and scores batches of any size, from host slices or from the caller's device buffers
//! through a [`PreparedLoss`].

mod context;
mod host;
// Internals, public for the shader-translation and planner tests only.
#[doc(hidden)]
pub mod pipelines;
#[doc(hidden)]
pub mod planner;
mod prepared;
mod scoring;
mod shard;
mod timing;
mod totals;
mod views;

pub use context::{
    GpuOptions, WANTED_FEATURES, describe_adapter, enumerate_adapters, select_adapter,
};
pub use planner::{DeviceFacts, Strategy};
pub use prepared::{BoundInputs, GradientOutput, MAX_SPARSE_K, PreparedLoss};
pub use shard::{ShardMode, ShardedScorer};
pub use timing::{ReadBandwidth, Task, Timer, Timing};
pub use totals::PendingTotals;
pub use views::{DeviceLogits, DeviceTargets, IndexType, LossShape, TargetLayout};

use std::sync::{Arc, Mutex};

use crate::Scorer;
use crate::dtype::ElementVec;
use crate::error::Result;
use crate::grad::Upstream;
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::spec::CrossEntropy;
use crate::targets::Targets;

use context::Gpu;
use host::{HostCall, HostLoss, HostTargets};
use prepared::{Output, Setup};

/// A GPU device ready to compute losses. Pipelines are compiled once per context (on first
/// use of each variant); calls take `&self` and may come from several threads.
pub struct GpuContext {
    gpu: Arc<Gpu>,
    /// Prepared losses of the host-slice path, reused across calls.
    pool: Mutex<Vec<HostLoss>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &describe_adapter(&self.gpu.info))
            .finish_non_exhaustive()
    }
}

impl GpuContext {
    /// Opens the adapter chosen by wgpu's environment variables (`WGPU_BACKEND`,
    /// `WGPU_ADAPTER_NAME`, `WGPU_POWER_PREF`), the high-performance one by default, with the
    /// adapter's own limits.
    pub fn new() -> Result<Self> {
        Self::with_options(GpuOptions::default())
    }

    /// As [`GpuContext::new`], with options.
    pub fn with_options(options: GpuOptions) -> Result<Self> {
        Ok(Self::wrap(Gpu::open(&options)?))
    }

    /// Uses a device the caller already has. xent keeps clones of the handles and leaves the
    /// device's error handler and lost callback as they are.
    pub fn from_device(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        options: GpuOptions,
    ) -> Result<Self> {
        Ok(Self::wrap(Gpu::from_device(device, queue, &options)?))
    }

    fn wrap(gpu: Gpu) -> Self {
        Self {
            gpu: Arc::new(gpu),
            pool: Mutex::new(Vec::new()),
        }
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.gpu.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.gpu.queue
    }

    /// The limits the planner works with.
    pub fn facts(&self) -> &DeviceFacts {
        &self.gpu.facts
    }

    /// How many device buffers xent has created on this context (prepared losses, the
    /// host path's staging and read-back buffers): repeated calls of a prepared loss leave it
    /// unchanged.
    pub fn buffers_created(&self) -> u64 {
        self.gpu.buffers_created()
    }

    /// The strategy the planner picks for a shape.
    pub fn plan(&self, rows: usize, classes: usize) -> Strategy {
        planner::choose_strategy(rows, classes, &self.gpu.facts)
    }

    /// Prepares `spec` for calls of up to `shape.max_rows()` rows on device buffers: every
    /// buffer, bind group and pipeline is made now (class weights uploaded once), so a call
    /// allocates nothing. See [`PreparedLoss`].
    pub fn prepare(&self, spec: &CrossEntropy, shape: LossShape) -> Result<PreparedLoss> {
        let strategy = self.plan(shape.max_rows(), shape.classes());
        self.prepare_with(spec, shape, strategy)
    }

    /// [`GpuContext::prepare`] with a strategy of the caller's choosing (benchmarks, tests).
    pub fn prepare_with(
        &self,
        spec: &CrossEntropy,
        shape: LossShape,
        strategy: Strategy,
    ) -> Result<PreparedLoss> {
        let setup = Setup::new(strategy, Some(shape.targets()), Output::Loss);
        PreparedLoss::new(self.gpu.clone(), spec, shape, setup)
    }

    /// Cross-entropy with the planner's strategy.
    pub fn cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        let strategy = self.plan(logits.rows(), logits.classes());
        self.cross_entropy_with(spec, logits, targets, strategy)
    }

    /// Cross-entropy with a strategy of the caller's choosing (benchmarks, tests): every
    /// strategy gives the same values up to f32 rounding.
    pub fn cross_entropy_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        strategy: Strategy,
    ) -> Result<LossOutput> {
        spec.validate(&logits, &targets)?;
        strategy.check(&self.gpu.facts)?;
        let probabilities = targets.is_probabilities();
        if logits.rows() == 0 {
            let entropy = probabilities && spec.weights().is_none();
            return Ok(LossOutput::empty_with_z_loss(
                spec.reduction(),
                logits.classes(),
                entropy,
                spec.z_loss() > 0.0,
            ));
        }
        let targets = HostTargets::from(targets);
        let setup = HostLoss::setup(strategy, &logits, targets.layout(), Output::Loss);
        Ok(self
            .run_host(spec, logits, targets, setup, HostCall::default())?
            .out)
    }

    /// The loss and its gradient with respect to the logits (row-major like the logits, in
    /// their dtype: computed in f32 and rounded once, to nearest even), scaled by `upstream`:
    /// a scalar for sum and mean, one value per row for none. Two reads and one write of the
    /// logits on the device.
    pub fn cross_entropy_grad(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(LossOutput, ElementVec)> {
        let strategy = self.plan(logits.rows(), logits.classes());
        self.cross_entropy_grad_with(spec, logits, targets, upstream, strategy)
    }

    /// [`GpuContext::cross_entropy_grad`] with a strategy of the caller's choosing.
    pub fn cross_entropy_grad_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Upstream<'_>,
        strategy: Strategy,
    ) -> Result<(LossOutput, ElementVec)> {
        spec.validate(&logits, &targets)?;
        upstream.check(spec.reduction(), logits.rows())?;
        strategy.check(&self.gpu.facts)?;
        if logits.rows() == 0 {
            let out = self.cross_entropy_with(spec, logits, targets, strategy)?;
            return Ok((out, ElementVec::zeros(logits.dtype(), 0)));
        }
        let targets = HostTargets::from(targets);
        let mean = match upstream.mean_over() {
            Some(given) => given,
            None => {
                let m = host::host_mean(spec, &targets, logits.classes(), logits.rows())?;
                (m.denominator, m.counted_rows as f64)
            }
        };
        let setup = HostLoss::setup(strategy, &logits, targets.layout(), Output::Gradient);
        let gradient = Some((upstream, mean));
        let call = HostCall {
            gradient,
            ..HostCall::default()
        };
        let run = self.run_host(spec, logits, targets, setup, call)?;
        Ok((run.out, run.grad))
    }

    /// Per-row log-sum-exp.
    pub fn log_sum_exp(&self, logits: Logits<'_>) -> Result<Vec<f64>> {
        if logits.rows() == 0 {
            return Ok(Vec::new());
        }
        let strategy = self.plan(logits.rows(), logits.classes());
        let setup = HostLoss::setup(strategy, &logits, None, Output::Loss);
        let out = self.run_host(
            &CrossEntropy::new(),
            logits,
            HostTargets::None,
            setup,
            HostCall::default(),
        )?;
        Ok(out.out.log_sum_exp)
    }

    /// Log-softmax `z_k − lse(z)`, row-major like the logits.
    pub fn log_softmax(&self, logits: Logits<'_>) -> Result<Vec<f32>> {
        if logits.rows() == 0 {
            return Ok(Vec::new());
        }
        let strategy = self.plan(logits.rows(), logits.classes());
        let setup = HostLoss::setup(strategy, &logits, None, Output::LogSoftmax);
        self.run_host_log_softmax(logits, setup)
    }
}

impl<'a> From<Targets<'a>> for HostTargets<'a> {
    fn from(targets: Targets<'a>) -> Self {
        match targets {
            Targets::ClassIndices(y) => HostTargets::ClassIndices(y),
            Targets::Probabilities(p) => HostTargets::Probabilities(p),
        }
    }
}

impl Scorer for GpuContext {
    fn cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        GpuContext::cross_entropy(self, spec, logits, targets)
    }

    fn log_sum_exp(&self, logits: Logits<'_>) -> Result<Vec<f64>> {
        GpuContext::log_sum_exp(self, logits)
    }

    fn describe(&self) -> String {
        describe_adapter(&self.gpu.info)
    }
}
