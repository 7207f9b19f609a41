//! The host-slice path, as a client of the prepared loss: host slices are uploaded chunk by
//! chunk into two staging buffers in turn, so the copy of chunk k+1 overlaps the passes on
//! chunk k, and only the small results are read back.

use std::sync::Arc;

use crate::error::Result;
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::spec::CrossEntropy;

use super::context::Gpu;
use super::prepared::{BoundInputs, ChunkSource, Output, PreparedLoss, Setup};
use super::views::{IndexType, LossShape, TargetLayout};

/// Logits uploaded per chunk, about: large enough to amortise a submission, small enough
/// that copies and passes overlap.
const CHUNK_BYTES: u64 = 32 << 20;
/// Rows per prepared call: a longer batch is scored as several calls, summed in f64.
const CALL_ROWS: usize = 1 << 20;
/// Host losses kept per context.
const POOL: usize = 4;

/// Targets as the host path uploads them.
#[derive(Clone, Copy)]
pub(crate) enum HostTargets<'a> {
    /// Statistics only.
    None,
    /// Class indices, uploaded as they are (i64).
    ClassIndices(&'a [i64]),
    /// Probabilities shaped like the logits.
    Probabilities(&'a [f32]),
}

impl HostTargets<'_> {
    /// The bytes of rows `range`.
    fn bytes(&self, range: std::ops::Range<usize>, classes: usize) -> &[u8] {
        match *self {
            HostTargets::None => &[],
            HostTargets::ClassIndices(y) => bytemuck::cast_slice(&y[range]),
            HostTargets::Probabilities(p) => {
                bytemuck::cast_slice(&p[range.start * classes..range.end * classes])
            }
        }
    }
}

/// Called after each chunk is submitted, with the chunk's rows.
type EachChunk<'a> = dyn FnMut(&mut PreparedLoss, std::ops::Range<usize>) -> Result<()> + 'a;

/// A prepared loss with its staging buffers, for one spec, width and setup.
pub(crate) struct HostLoss {
    spec: CrossEntropy,
    setup: Setup,
    classes: usize,
    loss: PreparedLoss,
    /// Two (logits, targets) staging buffers, used by chunks in turn.
    staging: [(wgpu::Buffer, wgpu::Buffer); 2],
    /// The staging buffers bound for calls of the last few row counts.
    bound: Vec<BoundInputs>,
}

impl HostLoss {
    /// The setup the host path uses for a strategy and targets.
    pub(crate) fn setup(
        strategy: super::Strategy,
        classes: usize,
        targets: Option<TargetLayout>,
        output: Output,
    ) -> Setup {
        let unit = strategy.rows_per_final_group() as usize;
        let per_chunk = (CHUNK_BYTES / (classes as u64 * 4)).max(1) as usize;
        Setup {
            strategy,
            targets,
            output,
            chunk_cap: Some(per_chunk.max(unit)),
        }
    }

    fn new(
        gpu: Arc<Gpu>,
        spec: &CrossEntropy,
        classes: usize,
        rows: usize,
        setup: Setup,
    ) -> Result<Self> {
        let capacity = rows.clamp(1, CALL_ROWS).next_power_of_two().min(CALL_ROWS);
        let layout = setup
            .targets
            .unwrap_or(TargetLayout::ClassIndices(IndexType::I64));
        let loss = PreparedLoss::new(
            gpu.clone(),
            spec,
            LossShape::new(capacity, classes, layout),
            setup,
        )?;
        let chunk = loss.rows_per_chunk() as u64;
        // 16 bytes of slack: a chunk keeps the alignment its rows have within the call.
        let logits_bytes = chunk * classes as u64 * 4 + 16;
        let targets_bytes = setup
            .targets
            .map_or(0, |t| chunk * t.row_bytes(classes) + 16);
        let copy = wgpu::BufferUsages::COPY_DST;
        let staging = [0, 1].map(|_| {
            (
                gpu.storage_buffer("xent logits upload", logits_bytes, copy),
                gpu.storage_buffer("xent targets upload", targets_bytes, copy),
            )
        });
        Ok(Self {
            spec: spec.clone(),
            setup,
            classes,
            loss,
            staging,
            bound: Vec::new(),
        })
    }

    fn fits(&self, spec: &CrossEntropy, classes: usize, rows: usize, setup: &Setup) -> bool {
        self.setup == *setup
            && self.classes == classes
            && self.loss.shape().max_rows() >= rows.min(CALL_ROWS)
            && self.spec == *spec
    }

    /// Uploads and records one call of `logits` (at most the prepared rows), submitting chunk
    /// by chunk; with `each_chunk`, waits after each chunk and hands it the chunk's rows.
    fn run_call(
        &mut self,
        logits: Logits<'_>,
        targets: HostTargets<'_>,
        mut each_chunk: Option<&mut EachChunk<'_>>,
    ) -> Result<()> {
        let rows = logits.rows();
        let classes = logits.classes();
        let ranges: Vec<_> = self.loss.chunk_ranges(rows).collect();
        let target_row = self.setup.targets.map_or(0, |t| t.row_bytes(classes));
        // Chunk k starts at the alignment its rows have within the call, so a chunk's rows
        // are read exactly as in one binding of the whole call.
        let phase = |start: usize| (start * classes % 4) as u64 * 4;
        let offsets: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| {
                let p = phase(r.start);
                let t = if target_row == 4 * classes as u64 {
                    p
                } else {
                    0
                };
                (p, t)
            })
            .collect();
        let sources: Vec<ChunkSource<'_>> = ranges
            .iter()
            .zip(&offsets)
            .enumerate()
            .map(|(k, (_, &(l, t)))| {
                let (logits_buf, targets_buf) = &self.staging[k % 2];
                ChunkSource {
                    logits: (logits_buf, l),
                    targets: self.setup.targets.map(|_| (targets_buf, t)),
                }
            })
            .collect();
        let index = match self.bound.iter().position(|b| b.rows() == rows) {
            Some(i) => i,
            None => {
                let bound = self.loss.bind_sources(rows, &sources)?;
                if self.bound.len() == 2 {
                    self.bound.remove(0);
                }
                self.bound.push(bound);
                self.bound.len() - 1
            }
        };
        let call = &self.bound[index];
        let gpu = self.loss.gpu().clone();
        let last = ranges.len().saturating_sub(1);
        for (k, range) in ranges.iter().enumerate() {
            let (logits_buf, targets_buf) = &self.staging[k % 2];
            let (l, t) = offsets[k];
            gpu.scoped("uploading a chunk", || {
                let values = logits.slice_rows(range.clone()).values();
                gpu.queue
                    .write_buffer(logits_buf, l, bytemuck::cast_slice(values));
                let target_bytes = targets.bytes(range.clone(), classes);
                if !target_bytes.is_empty() {
                    gpu.queue.write_buffer(targets_buf, t, target_bytes);
                }
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                self.loss
                    .record_call(&mut encoder, call, k..k + 1, k == 0, k == last, None);
                gpu.queue.submit([encoder.finish()]);
                Ok(())
            })?;
            if let Some(f) = each_chunk.as_mut() {
                f(&mut self.loss, range.clone())?;
            }
        }
        Ok(())
    }
}

impl super::GpuContext {
    /// Runs `work` on a pooled host loss for this spec, width and setup (made if none fits).
    fn with_host_loss<T>(
        &self,
        spec: &CrossEntropy,
        classes: usize,
        rows: usize,
        setup: Setup,
        work: impl FnOnce(&mut HostLoss) -> Result<T>,
    ) -> Result<T> {
        let taken = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|h| h.fits(spec, classes, rows, &setup))
                .map(|i| pool.remove(i))
        };
        let mut host = match taken {
            Some(h) => h,
            None => HostLoss::new(self.gpu.clone(), spec, classes, rows, setup)?,
        };
        let result = work(&mut host);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.insert(0, host);
        pool.truncate(POOL);
        result
    }

    /// Scores host slices through a pooled prepared loss, call by call.
    pub(crate) fn run_host(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: HostTargets<'_>,
        setup: Setup,
    ) -> Result<LossOutput> {
        let (rows, classes) = (logits.rows(), logits.classes());
        self.with_host_loss(spec, classes, rows, setup, |host| {
            let per_call = host.loss.shape().max_rows();
            let mut out: Option<LossOutput> = None;
            for start in (0..rows).step_by(per_call) {
                let range = start..(start + per_call).min(rows);
                let block = logits.slice_rows(range.clone());
                let block_targets = match targets {
                    HostTargets::None => HostTargets::None,
                    HostTargets::ClassIndices(y) => HostTargets::ClassIndices(&y[range.clone()]),
                    HostTargets::Probabilities(p) => {
                        HostTargets::Probabilities(&p[range.start * classes..range.end * classes])
                    }
                };
                host.run_call(block, block_targets, None)?;
                let part = host.loss.read()?;
                match out.as_mut() {
                    None => out = Some(part),
                    Some(o) => o.append(part),
                }
            }
            Ok(out.expect("at least one row"))
        })
    }

    /// Log-probabilities of host logits, chunk by chunk.
    pub(crate) fn run_host_log_softmax(
        &self,
        logits: Logits<'_>,
        setup: Setup,
    ) -> Result<Vec<f32>> {
        let (rows, classes) = (logits.rows(), logits.classes());
        let spec = CrossEntropy::new();
        self.with_host_loss(&spec, classes, rows, setup, |host| {
            let per_call = host.loss.rows_per_chunk();
            let mut out = Vec::with_capacity(rows * classes);
            for start in (0..rows).step_by(per_call) {
                let range = start..(start + per_call).min(rows);
                let mut collect = |loss: &mut PreparedLoss, chunk: std::ops::Range<usize>| {
                    out.extend(loss.read_outputs(chunk.len())?);
                    Ok(())
                };
                host.run_call(
                    logits.slice_rows(range),
                    HostTargets::None,
                    Some(&mut collect),
                )?;
            }
            Ok(out)
        })
    }
}
