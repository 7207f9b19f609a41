//! Past one device on the GPU: a vocabulary shard's per-row partials, and a scorer that splits
//! a batch over several contexts by vocabulary or by rows and merges the results
//! ([`crate::shard`] has the statistic, its merge and the f64 reference).

use crate::error::{Result, XentError};
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::shard::{MergeTargets, RowPartial, VocabShard, check_shard_targets, merge_partials};
use crate::spec::CrossEntropy;
use crate::targets::Targets;

use super::GpuContext;
use super::host::{HostLoss, HostTargets};
use super::planner::Strategy;
use super::prepared::{Output, Setup, ShardSetup};

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
        let too_wide = |what| XentError::Shard(format!("{what} beyond 2^32 classes"));
        let setup_shard = ShardSetup {
            offset: u32::try_from(shard.offset()).map_err(|_| too_wide("an offset"))?,
            total: u32::try_from(shard.total()).map_err(|_| too_wide("a vocabulary"))?,
        };
        // The shard's own slice of the class weights.
        let mut own = spec.clone();
        if let Some(w) = spec.weights() {
            own = own.with_weights(w[shard.range(classes)].to_vec());
        }
        let targets = HostTargets::from(targets);
        let setup = Setup {
            shard: Some(setup_shard),
            ..HostLoss::setup(strategy, &logits, targets.layout(), Output::Loss)
        };
        let run = self.run_host(&own, logits, targets, setup, None, 0)?;
        let unscale = 1.0 / run.weight_scale;
        Ok(run
            .raw
            .iter()
            .zip(&run.raw_more)
            .map(|(r, more)| RowPartial {
                // A block of only −inf kept the kernel's finite empty max.
                m: if r[1] == 0.0 { f64::MIN } else { r[0] as f64 },
                s: r[1] as f64,
                a: r[2] as f64 * unscale,
                b: r[3] as f64 * unscale,
                h: more[0] as f64,
            })
            .collect())
    }
}

/// How a [`ShardedScorer`] splits a batch over its contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    fn by_rows(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: Targets<'_>,
    ) -> Result<LossOutput> {
        let rows = logits.rows();
        let k = self.contexts.len().min(rows.max(1));
        let per = rows.div_ceil(k).max(1);
        let classes = logits.classes();
        let outs: Vec<Result<LossOutput>> = std::thread::scope(|scope| {
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
                    let first = range.start;
                    scope.spawn(move || {
                        gpu.cross_entropy(spec, part, t)
                            .map_err(|e| e.with_row_offset(first))
                    })
                })
                .collect();
            handles.into_iter().map(join).collect()
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
        let (rows, classes) = (logits.rows(), logits.classes());
        let shards = VocabShard::split(classes, self.contexts.len());
        let parts: Vec<Result<Vec<RowPartial>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .zip(self.contexts)
                .map(|(&(shard, ref range), gpu)| {
                    let range = range.clone();
                    scope.spawn(move || {
                        let width = range.len();
                        let z = logits.values().columns(classes, range.clone());
                        let block = Logits::from_elements(z.as_elements(), rows, width)?;
                        match targets {
                            Targets::ClassIndices(y) => {
                                gpu.partials(spec, block, Targets::ClassIndices(y), shard)
                            }
                            Targets::Probabilities(p) => {
                                let p = p.columns(classes, range);
                                let t = Targets::Probabilities(p.as_elements());
                                gpu.partials(spec, block, t, shard)
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(join).collect()
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        let views: Vec<&[RowPartial]> = parts.iter().map(Vec::as_slice).collect();
        let merge = match targets {
            Targets::ClassIndices(y) => MergeTargets::ClassIndices(y),
            Targets::Probabilities(_) => MergeTargets::Probabilities,
        };
        merge_partials(spec, classes, &views, merge)
    }
}

/// A scoped thread's result; a panic in one becomes an error, not a panic of the caller.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(XentError::Shard("a shard's thread panicked".into())))
}
