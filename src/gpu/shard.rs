//! Past one device on the GPU: a vocabulary shard's per-row partials, and a scorer that splits
//! a batch over several contexts by vocabulary or by rows and merges the results
//! ([`crate::shard`] has the statistic, its merge and the f64 reference).

use crate::dtype::ElementVec;
use crate::error::{Result, XentError};
use crate::grad::{MeanNormalisers, Upstream};
use crate::logits::Logits;
use crate::output::LossOutput;
use std::ops::Range;

use crate::shard::{
    MergeTargets, RowPartial, VocabShard, check_shard_targets, merge_rows, merged_output,
};
use crate::spec::{CrossEntropy, Reduction};
use crate::targets::Targets;

use super::GpuContext;
use super::host::{HostCall, HostLoss, HostTargets};
use super::planner::Strategy;
use super::prepared::{Output, PreparedLoss, RawRow, Setup, ShardSetup};
use super::views::{LossShape, TargetLayout};

impl GpuContext {
    /// A vocabulary shard's per-row partial statistics on the GPU, as
    /// [`crate::shard::cpu_partials`] computes them in f64: `logits` `[N, C]` are the classes
    /// `shard.range(C)`; class-index targets are of the whole vocabulary (a row whose target
    /// lies in another shard gets only the smoothing term here), probabilities the shard's own
    /// columns; the spec's class weights are the whole vocabulary's. One read of the logits.
    ///
    /// Errors: as [`GpuContext::cross_entropy`] on the whole vocabulary (a class index out of
    /// range names its row), [`XentError::Shard`] when the shard does not fit.
    pub fn partials(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        shard: VocabShard,
    ) -> Result<Vec<RowPartial>> {
        let strategy = self.plan(logits.rows(), logits.classes());
        self.partials_with(spec, logits, targets, shard, strategy)
    }

    /// [`GpuContext::partials`] with a strategy of the caller's choosing.
    pub fn partials_with(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        shard: VocabShard,
        strategy: Strategy,
    ) -> Result<Vec<RowPartial>> {
        let classes = logits.classes();
        shard.check(classes)?;
        check_shard_targets(spec, &logits, &targets, shard)?;
        strategy.check(&self.gpu.facts)?;
        if logits.rows() == 0 {
            return Ok(Vec::new());
        }
        let targets = HostTargets::from(targets);
        let (own, setup) = host_setup(spec, shard, &logits, &targets, strategy, Output::Loss)?;
        let run = self.run_host(&own, logits, targets, setup, HostCall::default())?;
        Ok(partials_from_raw(&run.raw, &run.raw_more, run.weight_scale))
    }

    /// Prepares a vocabulary shard's partials for device buffers, as [`GpuContext::prepare`]
    /// a loss: `shape` is the shard's own `[N, C]` (its targets as for
    /// [`GpuContext::partials`]: class indices of the whole vocabulary, or the shard's
    /// probabilities). After a call, [`PreparedLoss::row_results`] holds per row
    /// `(m, s, a, b)` (a and b times [`PreparedLoss::weight_scale`]) and
    /// [`PreparedLoss::read_partials`] reads them back as [`RowPartial`]s. Its calls have no
    /// totals of their own (the partials merge on the host), so
    /// [`PreparedLoss::read_totals`] and [`PreparedLoss::read`] refuse it.
    ///
    /// Errors: the spec's options on the whole vocabulary; [`XentError::Shard`] when the shard
    /// does not fit it; [`XentError::TargetsDtype`] for probabilities neither f32 nor of the
    /// logits' dtype; [`XentError::NotPrepared`] for top-k targets.
    pub fn prepare_partials(
        &self,
        spec: &CrossEntropy,
        shape: LossShape,
        shard: VocabShard,
    ) -> Result<PreparedLoss> {
        let classes = shape.classes();
        shard.check(classes)?;
        if let TargetLayout::TopK { .. } = shape.targets() {
            return Err(XentError::NotPrepared(
                "a shard's targets are class indices or probabilities (top-k entries are not split \
                 by vocabulary)"
                    .into(),
            ));
        }
        spec.validate_options(shard.total(), shape.targets().is_probabilities())?;
        let (own, setup_shard) = shard_spec(spec, shard, classes)?;
        let strategy = self.plan(shape.max_rows(), classes);
        let setup = Setup {
            shard: Some(setup_shard),
            ..Setup::new(strategy, Some(shape.targets()), Output::Loss)
        };
        PreparedLoss::new(self.gpu.clone(), &own, shape, setup)
    }
}

/// A shard's partials from the device's per-row results `(m, s, a, b)` and `(h, …)`; `a` and
/// `b` carry the device's weight scale.
pub(crate) fn partials_from_raw(
    raw: &[RawRow],
    more: &[RawRow],
    weight_scale: f64,
) -> Vec<RowPartial> {
    let unscale = 1.0 / weight_scale;
    raw.iter()
        .zip(more)
        .map(|(r, more)| RowPartial {
            // A block of only −inf kept the kernel's finite empty max.
            m: if r[1] == 0.0 { f64::MIN } else { r[0] as f64 },
            s: r[1] as f64,
            a: r[2] as f64 * unscale,
            b: r[3] as f64 * unscale,
            h: more[0] as f64,
        })
        .collect()
}

impl GpuContext {
    /// The gradient of a vocabulary-sharded loss with respect to this shard's logits (its
    /// columns of the whole gradient, in the logits' dtype), from every row's partials merged
    /// over the whole vocabulary (`merged[i]`, as [`crate::shard::merge_partials`] merges them): one more
    /// read of the shard's logits and one write, and nothing more exchanged. Scaled by
    /// `upstream` as [`GpuContext::cross_entropy_grad`] scales the whole gradient; under
    /// `mean` the denominator is the whole batch's (from the class indices of the whole
    /// vocabulary, or the row count).
    ///
    /// Errors: those of [`GpuContext::partials`]; [`XentError::Shard`] unless there is one
    /// merged partial per row; the upstream gradient's.
    pub fn partial_gradient(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        shard: VocabShard,
        merged: &[RowPartial],
        upstream: Upstream<'_>,
    ) -> Result<ElementVec> {
        let (rows, classes) = (logits.rows(), logits.classes());
        shard.check(classes)?;
        let mean = check_shard_targets(spec, &logits, &targets, shard)?;
        upstream.check(spec.reduction(), rows)?;
        if merged.len() != rows {
            return Err(XentError::Shard(format!(
                "{} merged partials for {rows} rows",
                merged.len()
            )));
        }
        if rows == 0 {
            return Ok(ElementVec::zeros(logits.dtype(), 0));
        }
        let ignored = |i: usize| match targets {
            Targets::ClassIndices(y) => spec.is_ignored(y[i]),
            Targets::Probabilities(_) => false,
        };
        let mean = upstream
            .mean_over()
            .unwrap_or((mean.denominator, mean.counted_rows as f64));
        let strategy = self.plan(rows, classes);
        let targets = HostTargets::from(targets);
        let (own, setup) = host_setup(spec, shard, &logits, &targets, strategy, Output::Gradient)?;
        // (m, ln s, B, counted) as the statistics pass would keep them for the whole row (B
        // unscaled: the loss applies its weight scale).
        let stats: Vec<[f64; 4]> = merged
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let m = p.m.max(f32::MIN as f64);
                let counted = if ignored(i) { 0.0 } else { 1.0 };
                [m, p.s.ln(), p.b, counted]
            })
            .collect();
        let call = HostCall {
            gradient: Some((upstream, mean)),
            row_stats: Some(&stats),
            ..HostCall::default()
        };
        Ok(self.run_host(&own, logits, targets, setup, call)?.grad)
    }
}

/// Where a shard lies, as the kernels take it (u32 classes).
pub(crate) fn shard_setup(shard: VocabShard) -> Result<ShardSetup> {
    let too_wide = |what| XentError::Shard(format!("{what} beyond 2^32 classes"));
    Ok(ShardSetup {
        offset: u32::try_from(shard.offset()).map_err(|_| too_wide("an offset"))?,
        total: u32::try_from(shard.total()).map_err(|_| too_wide("a vocabulary"))?,
    })
}

/// A shard's own spec (its slice of the class weights) and the host path's setup for it.
fn host_setup(
    spec: &CrossEntropy,
    shard: VocabShard,
    logits: &Logits<'_>,
    targets: &HostTargets<'_>,
    strategy: Strategy,
    output: Output,
) -> Result<(CrossEntropy, Setup)> {
    let (own, setup) = shard_spec(spec, shard, logits.classes())?;
    let setup = Setup {
        shard: Some(setup),
        ..HostLoss::setup(strategy, logits, targets.layout(), output)
    };
    Ok((own, setup))
}

/// A shard's own spec (its slice of the class weights) and where it lies.
fn shard_spec(
    spec: &CrossEntropy,
    shard: VocabShard,
    classes: usize,
) -> Result<(CrossEntropy, ShardSetup)> {
    let setup = shard_setup(shard)?;
    let mut own = spec.clone();
    if let Some(w) = spec.weights() {
        own = own.with_weights(w[shard.range(classes)].to_vec());
    }
    Ok((own, setup))
}

/// How a [`ShardedScorer`] splits a batch over its contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShardMode {
    /// Each context holds a contiguous block of classes of every row (Megatron's
    /// vocabulary-parallel loss): the partials of each row are merged, five numbers a row per
    /// context whatever C.
    Vocabulary,
    /// Each context holds a contiguous block of rows: the per-row results are concatenated and
    /// the sums added.
    Rows,
}

/// Scores one batch over several GPU contexts (several adapters, or one adapter opened more
/// than once), concurrently, one thread per context, and merges the results in context order:
/// the same outputs as one context within the f32 tolerance, the same bits every time for a
/// fixed list of contexts.
#[derive(Debug)]
pub struct ShardedScorer<'a> {
    contexts: &'a [GpuContext],
    mode: ShardMode,
}

impl<'a> ShardedScorer<'a> {
    /// A scorer over `contexts` (at least one) splitting by `mode`.
    pub fn new(contexts: &'a [GpuContext], mode: ShardMode) -> Self {
        Self { contexts, mode }
    }

    /// The split.
    pub fn mode(&self) -> ShardMode {
        self.mode
    }

    /// Cross-entropy of the whole batch, as [`GpuContext::cross_entropy`] on one context.
    ///
    /// Errors: those of [`GpuContext::cross_entropy`] (row numbers of the whole batch);
    /// [`XentError::Shard`] without contexts.
    pub fn cross_entropy(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        if self.contexts.is_empty() {
            return Err(XentError::Shard("a sharded scorer needs a context".into()));
        }
        spec.validate(&logits, &targets)?;
        match self.mode {
            ShardMode::Rows => self.by_rows(spec, logits, targets),
            ShardMode::Vocabulary => self.by_vocabulary(spec, logits, targets),
        }
    }

    /// The loss and its gradient with respect to the logits (in their dtype), as
    /// [`GpuContext::cross_entropy_grad`] on one context. By vocabulary, each context scores
    /// its shard's partials, the partials are merged, and each context writes its shard's
    /// columns of the gradient from the merged statistics; by rows, each context scores its
    /// rows with the whole batch's mean denominators.
    pub fn cross_entropy_grad(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(LossOutput, ElementVec)> {
        if self.contexts.is_empty() {
            return Err(XentError::Shard("a sharded scorer needs a context".into()));
        }
        spec.validate(&logits, &targets)?;
        upstream.check(spec.reduction(), logits.rows())?;
        match self.mode {
            ShardMode::Rows => self.grad_by_rows(spec, logits, targets, upstream),
            ShardMode::Vocabulary => self.grad_by_vocabulary(spec, logits, targets, upstream),
        }
    }

    fn grad_by_rows(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(LossOutput, ElementVec)> {
        let (rows, classes) = (logits.rows(), logits.classes());
        // The whole batch's mean, whatever part a context scores.
        let mut mean = MeanNormalisers::default();
        match targets {
            Targets::ClassIndices(y) => mean.add_class_indices(spec, classes, 0, y)?,
            Targets::Probabilities(_) => mean.add_rows(rows),
        }
        let upstream = match upstream {
            Upstream::Scalar(g) if spec.reduction() == Reduction::Mean => mean.upstream(g),
            other => other,
        };
        let results = self.each_row_block(logits, targets, |gpu, part, t, range| {
            let up = match upstream {
                Upstream::PerRow(g) => Upstream::PerRow(&g[range]),
                other => other,
            };
            gpu.cross_entropy_grad(spec, part, t, up)
        });
        let mut whole: Option<LossOutput> = None;
        let mut grad = ElementVec::zeros(logits.dtype(), rows * classes);
        let mut at = 0;
        for result in results {
            let (out, g) = result?;
            grad.bytes_mut(at..at + g.len()).copy_from_slice(g.bytes());
            at += g.len();
            match whole.as_mut() {
                None => whole = Some(out),
                Some(w) => w.append(out),
            }
        }
        let whole = whole.ok_or_else(|| XentError::Shard("no rows were scored".into()))?;
        Ok((whole, grad))
    }

    fn grad_by_vocabulary(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(LossOutput, ElementVec)> {
        let (rows, classes) = (logits.rows(), logits.classes());
        let (out, merged) = self.merged(spec, logits, targets)?;
        let shards = VocabShard::split(classes, self.contexts.len());
        let blocks = self.each_shard(&shards, logits, targets, |gpu, block, t, shard| {
            gpu.partial_gradient(spec, block, t, shard, &merged, upstream)
        });
        let mut grad = ElementVec::zeros(logits.dtype(), rows * classes);
        for ((_, range), block) in shards.iter().zip(blocks) {
            grad.set_columns(classes, range.clone(), &block?);
        }
        Ok((out, grad))
    }

    fn by_rows(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        let outs = self.each_row_block(logits, targets, |gpu, part, t, _| {
            gpu.cross_entropy(spec, part, t)
        });
        let mut whole: Option<LossOutput> = None;
        for out in outs {
            let out = out?;
            match whole.as_mut() {
                None => whole = Some(out),
                Some(w) => w.append(out),
            }
        }
        whole.ok_or_else(|| XentError::Shard("no rows were scored".into()))
    }

    fn by_vocabulary(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        Ok(self.merged(spec, logits, targets)?.0)
    }

    /// Every shard's partials, merged: the whole batch's output and its per-row statistics.
    fn merged(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<(LossOutput, Vec<RowPartial>)> {
        let shards = VocabShard::split(logits.classes(), self.contexts.len());
        let parts = self.each_shard(&shards, logits, targets, |gpu, block, t, shard| {
            gpu.partials(spec, block, t, shard)
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
        let merged = merge_rows(&views)?;
        let targets = match targets {
            Targets::ClassIndices(y) => MergeTargets::ClassIndices(y),
            Targets::Probabilities(_) => MergeTargets::Probabilities,
        };
        let out = merged_output(spec, logits.classes(), &merged, targets)?;
        Ok((out, merged))
    }

    /// Runs `work` on each context's block of rows, one thread each; the results in context
    /// order, errors naming rows of the whole batch.
    fn each_row_block<T: Send>(
        &self,
        logits: Logits<'_>,
        targets: Targets<'_>,
        work: impl Fn(&GpuContext, Logits<'_>, Targets<'_>, Range<usize>) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let (rows, classes) = (logits.rows(), logits.classes());
        let k = self.contexts.len().min(rows.max(1));
        let per = rows.div_ceil(k).max(1);
        let work = &work;
        std::thread::scope(|scope| {
            let handles: Vec<_> = self.contexts[..k]
                .iter()
                .enumerate()
                .map(|(i, gpu)| {
                    let range = (i * per).min(rows)..((i + 1) * per).min(rows);
                    let part = logits.slice_rows(range.clone());
                    let t = match targets {
                        Targets::ClassIndices(y) => Targets::ClassIndices(&y[range.clone()]),
                        Targets::Probabilities(p) => Targets::Probabilities(
                            p.slice(range.start * classes..range.end * classes),
                        ),
                    };
                    scope.spawn(move || {
                        let first = range.start;
                        work(gpu, part, t, range).map_err(|e| e.with_row_offset(first))
                    })
                })
                .collect();
            handles.into_iter().map(join).collect()
        })
    }

    /// Runs `work` on each context's shard of classes (its columns copied out of the batch),
    /// one thread each; the results in shard order.
    fn each_shard<T: Send>(
        &self,
        shards: &[(VocabShard, Range<usize>)],
        logits: Logits<'_>,
        targets: Targets<'_>,
        work: impl Fn(&GpuContext, Logits<'_>, Targets<'_>, VocabShard) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let (rows, classes) = (logits.rows(), logits.classes());
        let work = &work;
        std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .zip(self.contexts)
                .map(|((shard, range), gpu)| {
                    scope.spawn(move || {
                        let z = logits.values().columns(classes, range.clone());
                        let block = Logits::from_elements(z.as_elements(), rows, range.len())?;
                        match targets {
                            Targets::ClassIndices(y) => {
                                work(gpu, block, Targets::ClassIndices(y), *shard)
                            }
                            Targets::Probabilities(p) => {
                                let p = p.columns(classes, range.clone());
                                work(gpu, block, Targets::Probabilities(p.as_elements()), *shard)
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(join).collect()
        })
    }
}

/// A scoped thread's result; a panic in one becomes an error, not a panic of the caller.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(XentError::Shard("a shard's thread panicked".into())))
}
