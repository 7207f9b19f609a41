//! The host-slice path, as a client of the prepared loss: host slices are uploaded chunk by
//! chunk into two staging buffers in turn, so the copy of chunk k+1 overlaps the passes on
//! chunk k, and only the results are read back (an elementwise output chunk by chunk, while
//! the next chunk runs).

use std::ops::Range;
use std::sync::Arc;

use crate::dtype::{Dtype, ElementVec, Elements};
use crate::error::Result;
use crate::grad::{MeanNormalisers, Upstream};
use crate::logits::Logits;
use crate::output::LossOutput;
use crate::scoring::TokenRow;
use crate::spec::CrossEntropy;

use super::context::{Gpu, Serialised};
use super::prepared::{BoundInputs, ChunkSource, Output, Passes, PreparedLoss, RawRow, Setup};
use super::views::{IndexType, LossShape, TargetLayout};

/// Logits uploaded per chunk, about: large enough to amortise a submission, small enough
/// that copies and passes overlap.
const CHUNK_BYTES: u64 = 32 << 20;
/// Rows per prepared call: a longer batch is scored as several calls, summed in f64.
const CALL_ROWS: usize = 1 << 20;
/// Bytes of the sorted top-k entries a call's prepared loss keeps (4 bytes an entry a row),
/// about: top-k gradient calls take fewer rows.
const TOP_K_ORDER_BYTES: u64 = 64 << 20;

/// Rows per prepared call of a loss set up as `setup`.
fn call_rows(setup: &Setup) -> usize {
    match setup.top_k_order_bytes() {
        0 => CALL_ROWS,
        row => (TOP_K_ORDER_BYTES / row).clamp(1, CALL_ROWS as u64) as usize,
    }
}
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
    Probabilities(Elements<'a>),
    /// Top-k targets packed per row as `TargetLayout::TopK` describes: 2·k words a row.
    TopK { packed: &'a [u32], k: u32 },
}

impl<'a> HostTargets<'a> {
    /// The device layout these upload to.
    pub(crate) fn layout(&self) -> Option<TargetLayout> {
        match self {
            HostTargets::None => None,
            HostTargets::ClassIndices(_) => Some(TargetLayout::ClassIndices(IndexType::I64)),
            HostTargets::Probabilities(p) => Some(TargetLayout::Probabilities(p.dtype())),
            HostTargets::TopK { k, .. } => Some(TargetLayout::TopK { k: *k }),
        }
    }

    /// The targets of rows `range`.
    fn rows(&self, range: Range<usize>, classes: usize) -> HostTargets<'a> {
        match *self {
            HostTargets::None => HostTargets::None,
            HostTargets::ClassIndices(y) => HostTargets::ClassIndices(&y[range]),
            HostTargets::Probabilities(p) => {
                HostTargets::Probabilities(p.slice(range.start * classes..range.end * classes))
            }
            HostTargets::TopK { packed, k } => {
                let words = 2 * k as usize;
                HostTargets::TopK {
                    packed: &packed[range.start * words..range.end * words],
                    k,
                }
            }
        }
    }

    /// Their bytes.
    fn bytes(&self) -> &'a [u8] {
        match *self {
            HostTargets::None => &[],
            HostTargets::ClassIndices(y) => bytemuck::cast_slice(y),
            HostTargets::Probabilities(p) => p.bytes(),
            HostTargets::TopK { packed, .. } => bytemuck::cast_slice(packed),
        }
    }
}

/// What a host call asks for beyond the loss.
#[derive(Clone, Copy, Default)]
pub(crate) struct HostCall<'a> {
    /// The gradient: the upstream gradient, and the mean's (Σ w_y, counted rows).
    pub gradient: Option<(Upstream<'a>, (f64, f64))>,
    /// The k of the token metrics' top-k hits.
    pub top_k: usize,
    /// Per-row stats `(m, ln s, B, counted)` the gradient uses instead of a statistics pass.
    pub row_stats: Option<&'a [[f64; 4]]>,
}

/// What a host call returns: the loss, and what its setup asked for.
pub(crate) struct HostRun {
    pub out: LossOutput,
    /// The gradient, row-major, in the logits' dtype (empty unless asked for).
    pub grad: ElementVec,
    /// Token metrics per row (with `Setup::metrics`).
    pub tokens: Vec<TokenRow>,
    /// The device's per-row results (against a teacher, or a shard's partials).
    pub raw: Vec<RawRow>,
    /// A shard's second vec4 per row: (h, 0, 0, 0).
    pub raw_more: Vec<RawRow>,
    /// The power of two the device's class weights carry.
    pub weight_scale: f64,
}

/// Receives an elementwise output chunk by chunk: the chunk's rows within the call, and the
/// bytes of its values.
type Sink<'a> = dyn FnMut(Range<usize>, &[u8]) + 'a;

/// Bytes of slack in a staging buffer: a chunk starts at the 16-byte alignment its rows have
/// within the call (up to 7 halves, whose f32 probabilities then start 28 bytes in).
const SLACK: u64 = 32;

/// The staging buffers of one turn: inputs up, an elementwise output and its read-back.
struct Staging {
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    outputs: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

/// A prepared loss with its staging buffers, for one spec, width and setup.
pub(crate) struct HostLoss {
    spec: CrossEntropy,
    setup: Setup,
    classes: usize,
    dtype: Dtype,
    loss: PreparedLoss,
    /// Two sets of staging buffers, used by chunks in turn.
    staging: Serialised<[Staging; 2]>,
    /// The staging buffers bound for calls of the last few row counts.
    bound: Vec<BoundInputs>,
}

impl HostLoss {
    /// The setup the host path uses for a strategy and targets.
    pub(crate) fn setup(
        strategy: super::Strategy,
        logits: &Logits<'_>,
        targets: Option<TargetLayout>,
        output: Output,
    ) -> Setup {
        let unit = strategy.rows_per_final_group() as usize;
        let row = logits.classes() as u64 * logits.dtype().bytes() as u64;
        let per_chunk = (CHUNK_BYTES / row).max(1) as usize;
        Setup {
            chunk_cap: Some(per_chunk.max(unit)),
            gradient_calls: output == Output::Gradient,
            ..Setup::new(strategy, targets, output)
        }
    }

    fn new(
        gpu: Arc<Gpu>,
        spec: &CrossEntropy,
        (classes, dtype): (usize, Dtype),
        rows: usize,
        setup: Setup,
    ) -> Result<Self> {
        let call_rows = call_rows(&setup);
        let capacity = rows.clamp(1, call_rows).next_power_of_two().min(call_rows);
        let layout = setup
            .targets
            .unwrap_or(TargetLayout::ClassIndices(IndexType::I64));
        let loss = PreparedLoss::new(
            gpu.clone(),
            spec,
            LossShape::new(capacity, classes, layout).with_dtype(dtype),
            setup,
        )?;
        let chunk = loss.rows_per_chunk() as u64;
        let logits_bytes = chunk * classes as u64 * dtype.bytes() as u64 + SLACK;
        let targets_bytes = setup
            .targets
            .map_or(0, |t| chunk * t.row_bytes(classes) + SLACK);
        let output_bytes = match setup.output {
            Output::LogSoftmax => chunk * classes as u64 * 4 + SLACK,
            _ => logits_bytes,
        };
        let copy_dst = wgpu::BufferUsages::COPY_DST;
        let staging = gpu.scoped("making staging buffers", || {
            Ok([0, 1].map(|_| Staging {
                logits: gpu.storage_buffer("xent logits upload", logits_bytes, copy_dst),
                targets: gpu.storage_buffer("xent targets upload", targets_bytes, copy_dst),
                outputs: (setup.output != Output::Loss).then(|| {
                    (
                        gpu.storage_buffer(
                            "xent outputs",
                            output_bytes,
                            wgpu::BufferUsages::COPY_SRC,
                        ),
                        gpu.readback_buffer("xent outputs read-back", output_bytes),
                    )
                }),
            }))
        })?;
        let staging = Serialised::new(&gpu, staging);
        Ok(Self {
            spec: spec.clone(),
            setup,
            classes,
            dtype,
            loss,
            staging,
            bound: Vec::new(),
        })
    }

    fn fits(&self, spec: &CrossEntropy, shape: (usize, Dtype), rows: usize, setup: &Setup) -> bool {
        self.setup == *setup
            && (self.classes, self.dtype) == shape
            && self.loss.shape().max_rows() >= rows.min(call_rows(setup))
            && self.spec == *spec
    }

    /// The staging buffers bound for a call of `rows` rows (bound once per row count).
    fn bound(&mut self, rows: usize) -> Result<usize> {
        if let Some(i) = self.bound.iter().position(|b| b.rows() == rows) {
            return Ok(i);
        }
        let (classes, dtype, setup) = (self.classes, self.dtype, self.setup);
        let sources: Vec<ChunkSource<'_>> = self
            .loss
            .chunk_ranges(rows)
            .enumerate()
            .map(|(k, range)| {
                let at = ChunkOffsets::new(range.start, classes, dtype, &setup);
                let s = &self.staging[k % 2];
                ChunkSource {
                    logits: (&s.logits, at.logits),
                    targets: self.setup.targets.map(|_| (&s.targets, at.targets)),
                    outputs: s.outputs.as_ref().map(|(o, _)| (o, at.outputs)),
                }
            })
            .collect();
        let bound = self.loss.bind_sources(rows, &sources, None)?;
        if self.bound.len() == 2 {
            self.bound.remove(0);
        }
        self.bound.push(bound);
        Ok(self.bound.len() - 1)
    }

    /// Where a chunk from call row `first_row` lies in its staging buffers: each chunk starts
    /// at the 16-byte alignment its rows have within the call (so its rows are read exactly as
    /// in one binding of the whole call), and its probabilities and outputs at the same
    /// element offset as its logits; class indices start at 0.
    fn offsets(&self, first_row: usize) -> ChunkOffsets {
        ChunkOffsets::new(first_row, self.classes, self.dtype, &self.setup)
    }

    /// Bytes per value of the elementwise output.
    fn output_value(&self) -> usize {
        output_value(self.dtype, &self.setup)
    }

    /// Uploads and records one call of `logits` (at most the prepared rows), submitting chunk
    /// by chunk; an elementwise output goes to `sink` chunk by chunk, each read back while the
    /// next chunk runs.
    fn run_call(
        &mut self,
        logits: Logits<'_>,
        targets: HostTargets<'_>,
        passes: Passes,
        mut sink: Option<&mut Sink<'_>>,
    ) -> Result<()> {
        let rows = logits.rows();
        let classes = logits.classes();
        let ranges: Vec<_> = self.loss.chunk_ranges(rows).collect();
        let index = self.bound(rows)?;
        let gpu = self.loss.gpu().clone();
        let last = ranges.len().saturating_sub(1);
        let output_value = self.output_value() as u64;
        let mut pending: Option<(usize, Range<usize>)> = None;
        for (k, range) in ranges.iter().enumerate() {
            let s = &self.staging[k % 2];
            let at = self.offsets(range.start);
            gpu.scoped("uploading a chunk", || {
                let values = logits.slice_rows(range.clone()).values().bytes();
                write_words(&gpu.queue, &s.logits, at.logits, values);
                let target_bytes = targets.rows(range.clone(), classes).bytes();
                if !target_bytes.is_empty() {
                    write_words(&gpu.queue, &s.targets, at.targets, target_bytes);
                }
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                let call = &self.bound[index];
                self.loss.record_call(
                    &mut encoder,
                    call,
                    k..k + 1,
                    k == 0,
                    k == last,
                    passes,
                    None,
                );
                if let Some((outputs, back)) = &s.outputs {
                    let bytes = (range.len() * classes) as u64 * output_value;
                    let (from, size) = words(at.outputs, bytes);
                    encoder.copy_buffer_to_buffer(outputs, from, back, 0, size);
                }
                gpu.queue.submit([encoder.finish()]);
                Ok(())
            })?;
            // The previous chunk's output, while this one runs.
            if let (Some(f), Some((turn, done))) = (sink.as_mut(), pending.take()) {
                self.drain(turn, done, f)?;
            }
            if s.outputs.is_some() {
                pending = Some((k % 2, range.clone()));
            }
        }
        if let (Some(f), Some((turn, done))) = (sink.as_mut(), pending.take()) {
            self.drain(turn, done, f)?;
        }
        Ok(())
    }

    /// Reads the output of the chunk of rows `range` back from staging turn `turn`.
    fn drain(&self, turn: usize, range: Range<usize>, sink: &mut Sink<'_>) -> Result<()> {
        let Some((_, back)) = &self.staging[turn].outputs else {
            return Ok(());
        };
        let bytes = (range.len() * self.classes * self.output_value()) as u64;
        let from = self.offsets(range.start).outputs;
        let (word, size) = words(from, bytes);
        let gpu = self.loss.gpu();
        let data = gpu.scoped("reading an output chunk", || gpu.read_back(&[(back, size)]))?;
        let skip = (from - word) as usize;
        sink(range, &data[0][skip..skip + bytes as usize]);
        Ok(())
    }
}

/// Byte offsets of a chunk in its staging buffers.
struct ChunkOffsets {
    logits: u64,
    targets: u64,
    outputs: u64,
}

impl ChunkOffsets {
    fn new(first_row: usize, classes: usize, dtype: Dtype, setup: &Setup) -> Self {
        let value = dtype.bytes();
        let element = (first_row * classes % (16 / value)) as u64;
        let targets = match setup.targets {
            Some(TargetLayout::Probabilities(d)) => element * d.bytes() as u64,
            _ => 0,
        };
        ChunkOffsets {
            logits: element * value as u64,
            targets,
            outputs: element * output_value(dtype, setup) as u64,
        }
    }
}

/// Bytes per value of the elementwise output: f32 log-probabilities, or the gradient in the
/// logits' dtype.
fn output_value(dtype: Dtype, setup: &Setup) -> usize {
    match setup.output {
        Output::LogSoftmax => 4,
        _ => dtype.bytes(),
    }
}

/// The whole 4-byte words that hold `bytes` bytes from `offset`: their first byte and size
/// (copies and uploads move whole words).
fn words(offset: u64, bytes: u64) -> (u64, u64) {
    let start = offset & !3;
    (start, (offset + bytes - start).next_multiple_of(4))
}

/// Writes `data` at byte `offset` of `buffer`, as whole words: bytes of the first and last
/// word outside `data` get padding (staging holds one chunk, so nothing else lives there).
pub(crate) fn write_words(queue: &wgpu::Queue, buffer: &wgpu::Buffer, offset: u64, data: &[u8]) {
    let (start, size) = words(offset, data.len() as u64);
    if start == offset && size == data.len() as u64 {
        queue.write_buffer(buffer, offset, data);
        return;
    }
    let Some(size) = wgpu::BufferSize::new(size) else {
        return;
    };
    if let Some(mut view) = queue.write_buffer_with(buffer, start, size) {
        let skip = (offset - start) as usize;
        view.slice(skip..skip + data.len()).copy_from_slice(data);
    }
}

impl super::GpuContext {
    /// Runs `work` on a pooled host loss for this spec, width and setup (made if none fits).
    fn with_host_loss<T>(
        &self,
        spec: &CrossEntropy,
        logits: &Logits<'_>,
        setup: Setup,
        work: impl FnOnce(&mut HostLoss) -> Result<T>,
    ) -> Result<T> {
        let shape = (logits.classes(), logits.dtype());
        let rows = logits.rows();
        let taken = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|h| h.fits(spec, shape, rows, &setup))
                .map(|i| pool.remove(i))
        };
        let mut host = match taken {
            Some(h) => h,
            None => HostLoss::new(self.gpu.clone(), spec, shape, rows, setup)?,
        };
        let result = work(&mut host);
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.insert(0, host);
        pool.truncate(POOL);
        result
    }

    /// Scores host slices through a pooled prepared loss, call by call; with `call.gradient`
    /// (upstream, and the mean's (Σ w_y, counted rows) from the host), the gradient goes to
    /// the returned values, row-major, in the logits' dtype, from the statistics pass or from
    /// `call.row_stats`; with `setup.metrics`, the token metrics (top-k hits counting ranks
    /// below `call.top_k`) to the returned rows; against a teacher or for a shard, the raw
    /// per-row results too.
    pub(crate) fn run_host(
        &self,
        spec: &CrossEntropy,
        logits: Logits<'_>,
        targets: HostTargets<'_>,
        setup: Setup,
        call: HostCall<'_>,
    ) -> Result<HostRun> {
        let HostCall {
            gradient,
            top_k,
            row_stats,
        } = call;
        let (rows, classes) = (logits.rows(), logits.classes());
        let mut grad = ElementVec::zeros(logits.dtype(), 0);
        let mut tokens = Vec::new();
        let mut raw = Vec::new();
        let mut raw_more = Vec::new();
        let mut weight_scale = 1.0;
        let out = self.with_host_loss(spec, &logits, setup, |host| {
            let per_call = host.loss.shape().max_rows();
            let mut out: Option<LossOutput> = None;
            if gradient.is_some() {
                grad = ElementVec::zeros(logits.dtype(), rows * classes);
            }
            for start in (0..rows).step_by(per_call) {
                let range = start..(start + per_call).min(rows);
                host.loss.begin_call();
                let passes = match gradient {
                    Some((upstream, mean)) => {
                        let upstream = match upstream {
                            Upstream::PerRow(g) => Upstream::PerRow(&g[range.clone()]),
                            scalar => scalar,
                        };
                        host.loss.set_upstream(upstream, range.len(), Some(mean))?;
                        match row_stats {
                            Some(stats) => {
                                host.loss.set_row_stats(0, &stats[range.clone()])?;
                                Passes {
                                    statistics: false,
                                    ..Passes::gradient(false)
                                }
                            }
                            None => Passes::gradient(false),
                        }
                    }
                    None => Passes::LOSS,
                };
                let block = logits.slice_rows(range.clone());
                let block_targets = targets.rows(range.clone(), classes);
                let base = range.start * classes;
                let mut collect = |chunk: Range<usize>, bytes: &[u8]| {
                    let at = base + chunk.start * classes;
                    grad.bytes_mut(at..at + chunk.len() * classes)
                        .copy_from_slice(bytes);
                };
                let sink: Option<&mut Sink<'_>> = gradient.map(|_| &mut collect as &mut Sink<'_>);
                host.run_call(block, block_targets, passes, sink)?;
                let part = if setup.metrics {
                    let (part, metrics) = host.loss.read_with_metrics(top_k)?;
                    tokens.extend(metrics.rows);
                    part
                } else if setup.teacher.is_some() || setup.shard.is_some() {
                    let (part, rows, more) = host.loss.read_parts()?;
                    raw.extend(rows);
                    raw_more.extend(more);
                    part
                } else {
                    host.loss.read()?
                };
                match out.as_mut() {
                    None => out = Some(part),
                    Some(o) => o.append(part),
                }
            }
            weight_scale = host.loss.weight_scale();
            Ok(out.expect("at least one row"))
        })?;
        Ok(HostRun {
            out,
            grad,
            tokens,
            raw,
            raw_more,
            weight_scale,
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
        self.with_host_loss(&spec, &logits, setup, |host| {
            let per_call = host.loss.shape().max_rows();
            let mut out = vec![0.0f32; rows * classes];
            let passes = Passes::LOG_SOFTMAX;
            for start in (0..rows).step_by(per_call) {
                let range = start..(start + per_call).min(rows);
                let base = range.start * classes;
                let mut collect = |chunk: Range<usize>, bytes: &[u8]| {
                    let at = base + chunk.start * classes;
                    let values = &mut out[at..at + chunk.len() * classes];
                    bytemuck::cast_slice_mut::<f32, u8>(values).copy_from_slice(bytes);
                };
                host.run_call(
                    logits.slice_rows(range),
                    HostTargets::None,
                    passes,
                    Some(&mut collect),
                )?;
            }
            Ok(out)
        })
    }
}

/// The mean's denominator and counted rows of host targets, as the device would sum them
/// (the host path gives them to the gradient pass, which then needs no device totals).
pub(crate) fn host_mean(
    spec: &CrossEntropy,
    targets: &HostTargets<'_>,
    classes: usize,
    rows: usize,
) -> Result<MeanNormalisers> {
    let mut mean = MeanNormalisers::default();
    match targets {
        HostTargets::ClassIndices(y) => mean.add_class_indices(spec, classes, 0, y)?,
        _ => mean.add_rows(rows),
    }
    Ok(mean)
}
