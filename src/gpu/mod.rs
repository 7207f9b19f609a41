//! The GPU path: a context that owns (or borrows) a wgpu device, compiles the kernels once,
//! and scores batches of any size.

mod context;
mod job;
pub mod pipelines;
pub mod planner;
mod timing;

pub use context::{
    GpuOptions, WANTED_FEATURES, describe_adapter, enumerate_adapters, select_adapter,
};
pub use planner::{DeviceFacts, Strategy};
pub use timing::{ReadBandwidth, Timer, Timing};

use crate::Scorer;
use crate::error::Result;
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::spec::CrossEntropy;
use crate::targets::Targets;

use context::Gpu;
use job::{Job, JobTargets};
use pipelines::{Kernel, LossVariant, TargetKind};

/// A GPU device ready to compute losses. Pipelines are compiled once per context (on first
/// use of each variant); calls take `&self` and may come from several threads.
pub struct GpuContext {
    gpu: Gpu,
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
        Ok(Self {
            gpu: Gpu::open(&options)?,
        })
    }

    /// Uses a device the caller already has. xent keeps clones of the handles and leaves the
    /// device's error handler and lost callback as they are.
    pub fn from_device(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        options: GpuOptions,
    ) -> Result<Self> {
        Ok(Self {
            gpu: Gpu::from_device(device, queue, &options)?,
        })
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

    /// The strategy the planner picks for a shape.
    pub fn plan(&self, rows: usize, classes: usize) -> Strategy {
        planner::choose_strategy(rows, classes, &self.gpu.facts)
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
        let (job, denominator, ignored) = self.loss_job(spec, logits, targets, strategy);
        let entropy = job.variant.entropy;
        if logits.rows() == 0 {
            return Ok(LossOutput::empty(
                spec.get_reduction(),
                logits.classes(),
                entropy,
            ));
        }
        let out = job::run(&self.gpu, &job)?;
        let column = |c: usize| out.rows.iter().map(|r| r[c] as f64).collect::<Vec<_>>();
        Ok(LossOutput::with_sums(
            spec.get_reduction(),
            logits.classes(),
            out.loss_sum,
            denominator,
            column(0),
            column(1),
            entropy.then(|| column(2)),
            entropy.then_some(out.entropy_sum),
            ignored,
        ))
    }

    /// The device job for a validated loss call, with the mean's denominator and the
    /// ignored-row count (which the host knows without the device).
    fn loss_job<'a>(
        &self,
        spec: &'a CrossEntropy,
        logits: Logits<'a>,
        targets: Targets<'a>,
        strategy: Strategy,
    ) -> (Job<'a>, f64, usize) {
        let probabilities = targets.is_probabilities();
        let (job_targets, denominator, ignored) = device_targets(spec, &logits, targets);
        let job = Job {
            kernel: Kernel::CrossEntropy,
            logits,
            targets: job_targets,
            weights: spec.get_weights(),
            smoothing: spec.get_label_smoothing(),
            strategy,
            variant: LossVariant {
                target: if probabilities {
                    TargetKind::Probabilities
                } else {
                    TargetKind::ClassIndex
                },
                weights: spec.get_weights().is_some(),
                smoothing: spec.get_label_smoothing() > 0.0,
                entropy: probabilities && spec.get_weights().is_none(),
            },
        };
        (job, denominator, ignored)
    }

    /// Per-row log-sum-exp.
    pub fn log_sum_exp(&self, logits: Logits<'_>) -> Result<Vec<f64>> {
        let out = self.run_targetless(Kernel::CrossEntropy, logits)?;
        Ok(out.rows.iter().map(|r| r[1] as f64).collect())
    }

    /// Log-softmax `z_k − lse(z)`, row-major like the logits.
    pub fn log_softmax(&self, logits: Logits<'_>) -> Result<Vec<f32>> {
        Ok(self.run_targetless(Kernel::LogSoftmax, logits)?.log_probs)
    }

    fn run_targetless(&self, kernel: Kernel, logits: Logits<'_>) -> Result<job::JobOutput> {
        let mut strategy = self.plan(logits.rows(), logits.classes());
        if kernel == Kernel::LogSoftmax {
            strategy.split = 1;
        }
        if logits.rows() == 0 {
            return Ok(job::JobOutput {
                rows: Vec::new(),
                loss_sum: 0.0,
                entropy_sum: 0.0,
                log_probs: Vec::new(),
            });
        }
        let job = Job {
            kernel,
            logits,
            targets: JobTargets::None,
            weights: None,
            smoothing: 0.0,
            strategy,
            variant: LossVariant::LSE_ONLY,
        };
        job::run(&self.gpu, &job)
    }
}

/// Targets as the device takes them (ignored rows as class −1), with the mean's denominator
/// and the ignored-row count, which the host knows without the device.
fn device_targets<'a>(
    spec: &CrossEntropy,
    logits: &Logits<'_>,
    targets: Targets<'a>,
) -> (JobTargets<'a>, f64, usize) {
    match targets {
        Targets::Probabilities(p) => (JobTargets::Probabilities(p), logits.rows() as f64, 0),
        Targets::ClassIndices(y) => {
            let mut denominator = 0.0;
            let mut ignored = 0;
            let mapped = y
                .iter()
                .map(|&v| {
                    if spec.is_ignored(v) {
                        ignored += 1;
                        -1
                    } else {
                        denominator += spec.get_weights().map_or(1.0, |w| w[v as usize] as f64);
                        v as i32
                    }
                })
                .collect();
            (JobTargets::ClassIndices(mapped), denominator, ignored)
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
