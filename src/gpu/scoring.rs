//! Batched scoring on the GPU (issue 11): token metrics and sequence scores from the loss's
//! own pass, and distillation against a teacher's logits. The f64 reference of each is in
//! [`crate::scoring`]; the host-slice calls here are clients of the prepared loss, like the
//! cross-entropy's.

use crate::dtype::{ElementVec, Elements};
use crate::error::{Result, XentError};
use crate::grad::Upstream;
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::scoring::{
    self, Distillation, DistillationOutput, DistillationTerms, Divergence, SequenceScore,
    SparseTargets, TokenMetrics,
};
use crate::spec::CrossEntropy;
use crate::targets::Targets;

use super::host::{HostCall, HostLoss, HostTargets};
use super::planner::Strategy;
use super::prepared::{Output, PreparedLoss, RawRow, Setup, Teacher};
use super::views::LossShape;

impl super::GpuContext {
    /// Cross-entropy of class-index `targets` and, from the same read of the logits, the
    /// token metrics of every row ([`scoring::token_metrics`] is the f64 reference): the
    /// argmax, the target's log-probability, rank and top-`top_k` hit, the prediction's
    /// entropy; accuracy, top-k accuracy, mean NLL and perplexity over the rows whose target
    /// is not the spec's ignore index. The metrics are of the logits as given (soft-capped
    /// when the spec caps them); weights and smoothing change the loss, not the metrics.
    pub fn cross_entropy_metrics(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: &[i64],
        top_k: usize,
    ) -> Result<(LossOutput, TokenMetrics)> {
        let strategy = self.plan(logits.rows(), logits.classes());
        self.cross_entropy_metrics_with(spec, logits, targets, top_k, strategy)
    }

    /// [`crate::GpuContext::cross_entropy_metrics`] with a strategy of the caller's choosing.
    pub fn cross_entropy_metrics_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: &[i64],
        top_k: usize,
        strategy: Strategy,
    ) -> Result<(LossOutput, TokenMetrics)> {
        let host_targets = Targets::ClassIndices(targets);
        spec.validate(&logits, &host_targets)?;
        strategy.check(&self.gpu.facts)?;
        if logits.rows() == 0 {
            let out = self.cross_entropy_with(spec, logits, host_targets, strategy)?;
            return Ok((out, TokenMetrics::from_rows(Vec::new(), top_k)));
        }
        let targets = HostTargets::from(host_targets);
        let setup = Setup {
            metrics: true,
            ..HostLoss::setup(strategy, &logits, targets.layout(), Output::Loss)
        };
        let call = HostCall {
            top_k,
            ..HostCall::default()
        };
        let run = self.run_host(spec, logits, targets, setup, call)?;
        Ok((run.out, TokenMetrics::from_rows(run.tokens, top_k)))
    }

    /// Token metrics on the GPU, as [`scoring::token_metrics`] computes them in f64.
    pub fn token_metrics(
        &self,
        logits: Logits<'_>,
        targets: &[i64],
        ignore_index: Option<i64>,
        top_k: usize,
    ) -> Result<TokenMetrics> {
        let spec = match ignore_index {
            Some(i) => CrossEntropy::new().with_ignore_index(i),
            None => CrossEntropy::new(),
        };
        Ok(self.cross_entropy_metrics(&spec, logits, targets, top_k)?.1)
    }

    /// Sequence log-likelihoods on the GPU, as [`scoring::sequence_scores`] computes them in
    /// f64: sequence `s` is rows `offsets[s]..offsets[s + 1]` (tokens of one continuation are
    /// consecutive rows), and gets the sum of its tokens' target log-probabilities, whether
    /// every token is its row's argmax (`is_greedy`) and its token count. The rows are scored
    /// in one pass, chunk by chunk; a sequence may span chunks (its sum runs in row order on
    /// the host, in f64). [`scoring::multiple_choice`] turns the scores into `acc` and
    /// `acc_norm`.
    pub fn sequence_scores(
        &self,
        logits: Logits<'_>,
        targets: &[i64],
        offsets: &[usize],
    ) -> Result<Vec<SequenceScore>> {
        scoring::check_offsets(offsets, logits.rows())?;
        let metrics = self.token_metrics(logits, targets, None, 1)?;
        Ok(scoring::sequences_of(&metrics.rows, offsets))
    }

    /// Prepares a distillation loss for device buffers, as [`crate::GpuContext::prepare`] a
    /// cross-entropy: `shape`'s targets are the teacher's logits,
    /// [`TargetLayout::Probabilities`](crate::TargetLayout::Probabilities) of f32 or of the
    /// student's dtype, bound as [`DeviceTargets::Probabilities`](crate::DeviceTargets). Calls
    /// record on the caller's buffers (the gradient into a buffer or over the student's
    /// logits) and [`PreparedLoss::read_distillation`] reads the output.
    ///
    /// Errors: those of [`Distillation::validate`] on the options;
    /// [`XentError::Temperature`] unless 1/T is a normal f32;
    /// [`XentError::NotPrepared`] unless the targets are logits-shaped values.
    pub fn prepare_distillation(
        &self,
        spec: &Distillation,
        shape: LossShape,
    ) -> Result<PreparedLoss> {
        let none = Logits::new::<f32>(&[], 0, shape.classes())?;
        spec.validate(&none, &[])?;
        if !shape.targets().is_probabilities() {
            return Err(XentError::NotPrepared(
                "a teacher's logits are laid out like probabilities (TargetLayout::Probabilities)"
                    .into(),
            ));
        }
        let strategy = self.plan(shape.max_rows(), shape.classes());
        let setup = Setup {
            teacher: Some(Teacher::of(spec)?),
            ..Setup::new(strategy, Some(shape.targets()), Output::Loss)
        };
        let ce = CrossEntropy::new().with_reduction(spec.reduction());
        let mut loss = PreparedLoss::new(self.gpu.clone(), &ce, shape, setup)?;
        loss.set_distillation(*spec);
        Ok(loss)
    }

    /// A distillation loss of the `student` logits against the `teacher`'s (f32, the
    /// student's shape) on the GPU, as [`scoring::distillation`] computes it in f64: one read
    /// of each matrix, the row statistics of both softmaxes at temperature T in one pass:
    /// forward (the cross-entropy H(p) + KL(p‖q), both reported per row) and reverse KL(q‖p).
    /// The generalised JSD needs the mixture's log per class, so a second read of both.
    ///
    /// Errors: those of [`Distillation::validate`]; [`XentError::Temperature`] unless 1/T
    /// is a normal f32; [`XentError::LogitOutOfRange`] for a logit of either that is beyond
    /// ±2^64 once divided by T.
    pub fn distillation(
        &self,
        spec: &Distillation,
        student: Logits<'_>,
        teacher: &[f32],
    ) -> Result<DistillationOutput> {
        let strategy = self.plan(student.rows(), student.classes());
        Ok(self.distill(spec, student, teacher, None, strategy)?.0)
    }

    /// [`crate::GpuContext::distillation`] with a strategy of the caller's choosing.
    pub fn distillation_with(
        &self,
        spec: &Distillation,
        student: Logits<'_>,
        teacher: &[f32],
        strategy: Strategy,
    ) -> Result<DistillationOutput> {
        Ok(self.distill(spec, student, teacher, None, strategy)?.0)
    }

    /// The distillation loss and its gradient with respect to the student's logits (in their
    /// dtype, computed in f32 and rounded once), scaled by `upstream` as autograd passes it, as
    /// [`scoring::distillation_grad`] computes them in f64: two reads of each matrix and one
    /// write of the gradient.
    pub fn distillation_grad(
        &self,
        spec: &Distillation,
        student: Logits<'_>,
        teacher: &[f32],
        upstream: Upstream<'_>,
    ) -> Result<(DistillationOutput, ElementVec)> {
        let strategy = self.plan(student.rows(), student.classes());
        self.distill(spec, student, teacher, Some(upstream), strategy)
    }

    /// [`crate::GpuContext::distillation_grad`] with a strategy of the caller's choosing.
    pub fn distillation_grad_with(
        &self,
        spec: &Distillation,
        student: Logits<'_>,
        teacher: &[f32],
        upstream: Upstream<'_>,
        strategy: Strategy,
    ) -> Result<(DistillationOutput, ElementVec)> {
        self.distill(spec, student, teacher, Some(upstream), strategy)
    }

    fn distill(
        &self,
        spec: &Distillation,
        student: Logits<'_>,
        teacher: &[f32],
        upstream: Option<Upstream<'_>>,
        strategy: Strategy,
    ) -> Result<(DistillationOutput, ElementVec)> {
        spec.validate(&student, teacher)?;
        let (rows, classes) = (student.rows(), student.classes());
        if let Some(u) = &upstream {
            u.check(spec.reduction(), rows)?;
        }
        strategy.check(&self.gpu.facts)?;
        if rows == 0 {
            let out = scoring::distillation(spec, student, teacher)?;
            return Ok((out, ElementVec::zeros(student.dtype(), 0)));
        }
        let ce = CrossEntropy::new().with_reduction(spec.reduction());
        let targets = HostTargets::Probabilities(Elements::new(teacher));
        let output = if upstream.is_some() {
            Output::Gradient
        } else {
            Output::Loss
        };
        let setup = Setup {
            teacher: Some(Teacher::of(spec)?),
            ..HostLoss::setup(strategy, &student, targets.layout(), output)
        };
        // "batchmean": the mean divides by the rows.
        let gradient = upstream.map(|u| (u, u.mean_over().unwrap_or((rows as f64, rows as f64))));
        let call = HostCall {
            gradient,
            ..HostCall::default()
        };
        let run = self.run_host(&ce, student, targets, setup, call)?;
        let out = distillation_output(spec, &run.raw, classes);
        Ok((out, run.grad))
    }

    /// Cross-entropy against top-k sparse targets on the GPU, as
    /// [`scoring::sparse_cross_entropy`] computes it in f64: per row `B·lse(z) − Σ_j p_j·z_{i_j}`
    /// with the full-vocabulary log-sum-exp, `B = Σ_j p_j`, in one read of the logits; the
    /// mean divides by N. The k pairs of a row are gathered once, after its statistics. The
    /// spec's soft-cap and z-loss apply as for dense targets.
    ///
    /// Errors: those of [`CrossEntropy::validate_sparse_options`] (class weights, an ignore
    /// index or label smoothing in the spec), of [`SparseTargets::validate`] (shapes, an index
    /// out of range or repeated, naming the row), and the GPU's f32 bounds on the cap and λ.
    pub fn sparse_cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: SparseTargets<'_>,
    ) -> Result<LossOutput> {
        let strategy = self.plan(logits.rows(), logits.classes());
        Ok(self.sparse(spec, logits, targets, None, strategy)?.0)
    }

    /// [`crate::GpuContext::sparse_cross_entropy`] with a strategy of the caller's choosing.
    pub fn sparse_cross_entropy_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: SparseTargets<'_>,
        strategy: Strategy,
    ) -> Result<LossOutput> {
        Ok(self.sparse(spec, logits, targets, None, strategy)?.0)
    }

    /// [`crate::GpuContext::sparse_cross_entropy`] and its gradient with respect to the logits (in
    /// their dtype), `s_i·(B_i·softmax(z_i)_k − a_ik)` with `a` the row's probabilities
    /// scattered onto its indices, scaled by `upstream` as [`scoring::sparse_cross_entropy_grad`].
    pub fn sparse_cross_entropy_grad(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: SparseTargets<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(LossOutput, ElementVec)> {
        let strategy = self.plan(logits.rows(), logits.classes());
        self.sparse(spec, logits, targets, Some(upstream), strategy)
    }

    /// [`crate::GpuContext::sparse_cross_entropy_grad`] with a strategy of the caller's choosing.
    pub fn sparse_cross_entropy_grad_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: SparseTargets<'_>,
        upstream: Upstream<'_>,
        strategy: Strategy,
    ) -> Result<(LossOutput, ElementVec)> {
        self.sparse(spec, logits, targets, Some(upstream), strategy)
    }

    fn sparse(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: SparseTargets<'_>,
        upstream: Option<Upstream<'_>>,
        strategy: Strategy,
    ) -> Result<(LossOutput, ElementVec)> {
        spec.validate_sparse_options(logits.classes())?;
        targets.validate(&logits)?;
        let rows = logits.rows();
        if let Some(u) = &upstream {
            u.check(spec.reduction(), rows)?;
        }
        strategy.check(&self.gpu.facts)?;
        if rows == 0 || targets.k() == 0 {
            let out = scoring::sparse_cross_entropy(spec, logits, targets)?;
            return Ok((out, ElementVec::zeros(logits.dtype(), 0)));
        }
        // Per row: k indices (checked to fit [0, C), so i32), then k probabilities.
        let packed: Vec<u32> = (0..rows)
            .flat_map(|i| {
                let indices = targets.indices_row(i).iter().map(|&c| c as u32);
                let p = targets.probabilities_row(i).iter().map(|v| v.to_bits());
                indices.chain(p)
            })
            .collect();
        let k = u32::try_from(targets.k())
            .map_err(|_| XentError::NotPrepared(format!("k = {} pairs per row", targets.k())))?;
        let host_targets = HostTargets::TopK { packed: &packed, k };
        let output = if upstream.is_some() {
            Output::Gradient
        } else {
            Output::Loss
        };
        let setup = HostLoss::setup(strategy, &logits, host_targets.layout(), output);
        let gradient = upstream.map(|u| (u, u.mean_over().unwrap_or((rows as f64, rows as f64))));
        let call = HostCall {
            gradient,
            ..HostCall::default()
        };
        let run = self.run_host(spec, logits, host_targets, setup, call)?;
        Ok((run.out, run.grad))
    }
}

impl Teacher {
    /// The kernels' setup of a distillation spec: 1/T, the divergence (0 forward, 1 reverse,
    /// 2 the generalised JSD; the JSD's ends are the two KLs) and its β, the gradient's
    /// factor (the loss scale over T).
    ///
    /// Errors: [`XentError::Temperature`] unless 1/T is a normal f32 (T between about 3e-39
    /// and 8.5e37): the kernels scale both logits by it in f32, where 0 or ∞ would turn
    /// masked and finite logits alike into NaN.
    pub(crate) fn of(spec: &Distillation) -> Result<Teacher> {
        let (divergence, beta) = match spec.divergence() {
            Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => (0, 0.0),
            Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => (1, 0.0),
            Divergence::Jsd { beta } => (2, beta),
        };
        let t = spec.temperature();
        let inv_temperature = (1.0 / t) as f32;
        if !inv_temperature.is_normal() {
            return Err(XentError::Temperature(t));
        }
        Ok(Teacher {
            inv_temperature: inv_temperature.to_bits(),
            divergence,
            beta: (beta as f32).to_bits(),
            grad_factor: (spec.loss_scale() / t).to_bits(),
        })
    }
}

/// A distillation's output from the device's per-row results `(loss, lse, H(p), KL)`, scaled
/// by the loss scale in f64: the loss is the KL column for the JSD's β = 0 end (KL(p‖q)
/// without the entropy); only the forward loss reports H and KL.
pub(crate) fn distillation_output(
    spec: &Distillation,
    raw: &[RawRow],
    classes: usize,
) -> DistillationOutput {
    let scale = spec.loss_scale();
    let column = |c: usize| -> Vec<f64> { raw.iter().map(|r| r[c] as f64 * scale).collect() };
    let per_row = match spec.divergence() {
        Divergence::Jsd { beta: 0.0 } => column(3),
        _ => column(0),
    };
    let sum = per_row.iter().fold(0.0, |a, b| a + b);
    let rows = raw.len();
    DistillationOutput {
        reduction: spec.reduction(),
        loss: spec.reduction().apply(sum, rows as f64),
        sum,
        per_row,
        terms: if spec.divergence() == Divergence::ForwardKl {
            DistillationTerms::CrossEntropy {
                entropy: column(2),
                kl: column(3),
            }
        } else {
            DistillationTerms::DivergenceOnly
        },
        rows,
        classes,
    }
}
