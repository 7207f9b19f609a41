//! Past one device: a vocabulary split into shards, each scored on its own for its per-row
//! partial statistics, and the merge that turns partials into the outputs one device gives.
//!
//! A row's [`RowPartial`] over a block of classes is RowStats (DESIGN.md, "One pass, one
//! statistic") in f64: `m = max z_k`, `s = Σ exp(z_k − m)`, `a = Σ a_k·(z_k − m)`,
//! `b = Σ a_k` with the effective target weights `a_k`, and `h = −Σ p̃_k·ln p̃_k` for
//! probability targets. Partials merge exactly (up to rounding) in any grouping, and the merge
//! of all of a row's partials gives its log-sum-exp `m + ln s` and its loss `b·ln s − a`:
//! Megatron's vocabulary-parallel cross-entropy, in one message of five numbers per row
//! instead of three collectives. The class-index term comes from the shard that holds the
//! target class; label smoothing divides by the whole vocabulary.

use std::ops::Range;

use crate::cpu::{effective_row, target_entropy};
use crate::error::{Result, XentError};
use crate::grad::MeanNormalisers;
use crate::logits::Logits;
use crate::output::{LossOutput, RowOutputs};
use crate::spec::{CrossEntropy, check_targets_dtype};
use crate::targets::Targets;

/// Where a block of classes lies: classes `offset..offset + C` of a vocabulary of `total`,
/// `C` the width of the shard's logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VocabShard {
    offset: usize,
    total: usize,
}

impl VocabShard {
    /// Classes from `offset` of a vocabulary of `total` classes.
    pub fn new(offset: usize, total: usize) -> Self {
        Self { offset, total }
    }

    /// The whole vocabulary as one shard.
    pub fn whole(classes: usize) -> Self {
        Self::new(0, classes)
    }

    /// The shard's first class.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The classes of the whole vocabulary.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The classes of a shard `classes` wide (its end saturating at `usize::MAX`: a shard
    /// that passes [`VocabShard::check`] never gets there).
    pub fn range(&self, classes: usize) -> Range<usize> {
        self.offset..self.offset.saturating_add(classes)
    }

    /// Splits `total` classes into `k` contiguous shards in order, as even as can be (the
    /// first `total % k` one class wider), with their column ranges; `k` is capped at
    /// `total` so that no shard is empty.
    pub fn split(total: usize, k: usize) -> Vec<(VocabShard, Range<usize>)> {
        let k = k.clamp(1, total.max(1));
        let (base, extra) = (total / k, total % k);
        let mut start = 0;
        (0..k)
            .map(|i| {
                let width = base + usize::from(i < extra);
                let range = start..start + width;
                start += width;
                (VocabShard::new(range.start, total), range)
            })
            .collect()
    }

    /// Checks that a shard `classes` wide (at least one) fits the vocabulary (an end past
    /// `usize::MAX` does not).
    pub fn check(&self, classes: usize) -> Result<()> {
        let end = self.offset.checked_add(classes);
        if classes == 0 || end.is_none_or(|end| end > self.total) {
            return Err(XentError::Shard(format!(
                "{classes} classes from class {} do not fit a vocabulary of {}",
                self.offset, self.total
            )));
        }
        Ok(())
    }
}

/// One row's statistics over a block of classes (see the module's description): what a shard
/// sends per row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPartial {
    /// The largest logit (`f64::MIN` for a block of only −inf: a finite stand-in, so that the
    /// merge needs no special case).
    pub m: f64,
    /// `Σ exp(z_k − m)`.
    pub s: f64,
    /// `Σ a_k·(z_k − m)`.
    pub a: f64,
    /// `Σ a_k`.
    pub b: f64,
    /// `−Σ p̃_k·ln p̃_k` (probability targets without class weights, the only case whose
    /// outputs report the targets' entropy; 0 otherwise).
    pub h: f64,
}

impl Default for RowPartial {
    /// [`RowPartial::EMPTY`].
    fn default() -> Self {
        RowPartial::EMPTY
    }
}

impl RowPartial {
    /// The partial of no classes: the identity of [`RowPartial::merge`].
    pub const EMPTY: RowPartial = RowPartial {
        m: f64::MIN,
        s: 0.0,
        a: 0.0,
        b: 0.0,
        h: 0.0,
    };

    /// The partial of both blocks of classes. Commutative; associative up to rounding.
    pub fn merge(self, other: RowPartial) -> RowPartial {
        let m = self.m.max(other.m);
        let part = |p: RowPartial| {
            let scale = if p.m == m { 1.0 } else { (p.m - m).exp() };
            // A part without target mass has nothing to move (and no 0·(−inf)).
            let a = if p.b == 0.0 || p.m == m {
                p.a
            } else {
                p.a + p.b * (p.m - m)
            };
            (p.s * scale, a)
        };
        let ((s1, a1), (s2, a2)) = (part(self), part(other));
        RowPartial {
            m,
            s: s1 + s2,
            a: a1 + a2,
            b: self.b + other.b,
            h: self.h + other.h,
        }
    }

    /// `m + ln s`: the log-sum-exp of the classes merged so far.
    pub fn log_sum_exp(&self) -> f64 {
        self.m + self.s.ln()
    }

    /// `b·ln s − a`: the cross-entropy against the target weights merged so far.
    pub fn loss(&self) -> f64 {
        self.b * self.s.ln() - self.a
    }
}

/// What the merge needs of the targets: the whole batch's class indices (for ignored rows and
/// the mean's Σ w_y), or that they are probabilities (each shard holds its own columns).
#[derive(Clone, Copy, Debug)]
pub enum MergeTargets<'a> {
    /// One class index per row, of the whole vocabulary.
    ClassIndices(&'a [i64]),
    /// Probabilities: their columns stayed with the shards.
    Probabilities,
}

/// The outputs of the whole vocabulary from the partials of every shard: `parts[k][i]` is
/// shard k's partial of row i, merged in the order given (so a fixed shard layout gives the
/// same bits every time). The same [`LossOutput`] an unsharded call gives, within rounding:
/// per-row loss and log-sum-exp, the reduction with PyTorch's denominator, the z-loss, and the
/// entropy of probability targets without class weights (so H and KL).
///
/// Errors: [`XentError::Shard`] unless every shard has one partial per row;
/// [`XentError::ClassIndexOutOfRange`] for a class index outside the vocabulary.
pub fn merge_partials(
    spec: &CrossEntropy,
    classes: usize,
    parts: &[&[RowPartial]],
    targets: MergeTargets<'_>,
) -> Result<LossOutput> {
    merged_output(spec, classes, &merge_rows(parts)?, targets)
}

/// Every row's partials merged over the shards, `parts[k][i]` being shard k's of row i, in the
/// order given.
///
/// Errors: [`XentError::Shard`] unless every shard has one partial per row.
pub fn merge_rows(parts: &[&[RowPartial]]) -> Result<Vec<RowPartial>> {
    let rows = parts.first().map_or(0, |p| p.len());
    if let Some(k) = parts.iter().position(|p| p.len() != rows) {
        return Err(XentError::Shard(format!(
            "shard {k} has {} row partials, shard 0 has {rows}",
            parts[k].len()
        )));
    }
    Ok((0..rows)
        .map(|i| {
            parts
                .iter()
                .fold(RowPartial::EMPTY, |acc, p| acc.merge(p[i]))
        })
        .collect())
}

/// The outputs of the whole vocabulary from every row's merged partial ([`merge_rows`]), as
/// [`merge_partials`] gives them.
///
/// Errors: [`XentError::TargetsShape`] unless there is one class index per row;
/// [`XentError::ClassIndexOutOfRange`] for one outside the vocabulary.
pub fn merged_output(
    spec: &CrossEntropy,
    classes: usize,
    merged: &[RowPartial],
    targets: MergeTargets<'_>,
) -> Result<LossOutput> {
    let rows = merged.len();
    let mut mean = MeanNormalisers::default();
    let ignored: Vec<bool> = match targets {
        MergeTargets::ClassIndices(y) => {
            if y.len() != rows {
                return Err(XentError::TargetsShape {
                    expected: rows,
                    got: y.len(),
                    what: format!("one class index per row, [{rows}]"),
                });
            }
            mean.add_class_indices(spec, classes, 0, y)?;
            y.iter().map(|&v| spec.is_ignored(v)).collect()
        }
        MergeTargets::Probabilities => {
            mean.add_rows(rows);
            vec![false; rows]
        }
    };
    let with_entropy = matches!(targets, MergeTargets::Probabilities) && spec.weights().is_none();
    let mut out = RowOutputs::new(rows, with_entropy, spec.z_loss());
    for (row, &ignored) in merged.iter().zip(&ignored) {
        let loss = if ignored { 0.0 } else { row.loss() };
        out.push(loss, row.log_sum_exp(), !ignored, row.h);
    }
    Ok(out.finish(spec.reduction(), classes, mean.denominator))
}

/// The f64 reference of a shard's partials: `logits` `[N, C]` are the classes
/// `shard.range(C)` of the vocabulary; class-index targets are of the whole vocabulary
/// (checked against it; an ignored row's partial has no target mass), probabilities are the
/// shard's own columns `[N, C]`; `spec`'s class weights are the whole vocabulary's.
///
/// The terms of `a` are those of the unsharded reference ([`crate::cpu::cross_entropy`]): for
/// class indices the target's (where this shard holds it) and, with smoothing, every class's;
/// for probabilities every class's, so that a target weight of 0 on a −inf logit makes the
/// row NaN here as it does there (and in PyTorch).
///
/// Errors: those of [`CrossEntropy::validate`] on the whole vocabulary;
/// [`XentError::Shard`] when the shard does not fit it.
pub fn cpu_partials(
    spec: &CrossEntropy,
    logits: Logits<'_>,
    targets: Targets<'_>,
    shard: VocabShard,
) -> Result<Vec<RowPartial>> {
    let (rows, classes) = (logits.rows(), logits.classes());
    shard.check(classes)?;
    check_shard_targets(spec, &logits, &targets, shard)?;
    let eps = spec.label_smoothing();
    let per_class = eps / shard.total() as f64;
    let weight = |k: usize| spec.weights().map_or(1.0, |w| w[shard.offset() + k] as f64);
    let mut out = Vec::with_capacity(rows);
    for i in 0..rows {
        let z = effective_row(spec, &logits.row(i));
        let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = if top == f64::NEG_INFINITY {
            f64::MIN
        } else {
            top
        };
        let s = z.iter().map(|&v| (v - m).exp()).sum();
        // (a, b) with one more term a_k of class k.
        let add = |(a, b): (f64, f64), w: f64, k: usize| (a + w * (z[k] - m), b + w);
        let (a, b, h) = match targets {
            Targets::ClassIndices(y) if spec.is_ignored(y[i]) => (0.0, 0.0, 0.0),
            Targets::ClassIndices(y) => {
                let mut ab = (0.0, 0.0);
                if eps > 0.0 {
                    ab = (0..classes).fold(ab, |ab, k| add(ab, weight(k) * per_class, k));
                }
                let target = y[i] as usize;
                if shard.range(classes).contains(&target) {
                    let local = target - shard.offset();
                    ab = add(ab, (1.0 - eps) * weight(local), local);
                }
                (ab.0, ab.1, 0.0)
            }
            Targets::Probabilities(_) => {
                let p = targets.probabilities_row(&logits, i).unwrap_or_default();
                let smoothed: Vec<f64> = p
                    .iter()
                    .map(|&v| (1.0 - eps) * v as f64 + per_class)
                    .collect();
                let (a, b) =
                    (0..classes).fold((0.0, 0.0), |ab, k| add(ab, weight(k) * smoothed[k], k));
                let h = if spec.weights().is_none() {
                    target_entropy(smoothed.iter().copied())
                } else {
                    0.0
                };
                (a, b, h)
            }
        };
        out.push(RowPartial { m, s, a, b, h });
    }
    Ok(out)
}

/// Checks a shard's inputs: the spec's options and class weights on the whole vocabulary,
/// class indices of the whole vocabulary, probabilities of the shard's own shape in f32 or
/// the logits' dtype (as [`CrossEntropy::validate`] wants them unsharded). Returns the
/// batch's mean normalisers (Σ w_y of the rows not ignored, or the row count), which the
/// class indices' check sums on the way.
pub(crate) fn check_shard_targets(
    spec: &CrossEntropy,
    logits: &Logits<'_>,
    targets: &Targets<'_>,
    shard: VocabShard,
) -> Result<MeanNormalisers> {
    spec.validate_options(shard.total(), targets.is_probabilities())?;
    let mut mean = MeanNormalisers::default();
    match targets {
        Targets::ClassIndices(y) => {
            if y.len() != logits.rows() {
                return Err(XentError::TargetsShape {
                    expected: logits.rows(),
                    got: y.len(),
                    what: format!("one class index per row, [{}]", logits.rows()),
                });
            }
            mean.add_class_indices(spec, shard.total(), 0, y)?;
        }
        Targets::Probabilities(p) => {
            check_targets_dtype(logits.dtype(), p.dtype())?;
            if p.len() != logits.len() {
                return Err(XentError::TargetsShape {
                    expected: logits.len(),
                    got: p.len(),
                    what: format!(
                        "the shard's probabilities, shaped like its logits [{}, {}]",
                        logits.rows(),
                        logits.classes()
                    ),
                });
            }
            mean.add_rows(logits.rows());
        }
    }
    Ok(mean)
}
