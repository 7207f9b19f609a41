//! A call's totals on their way back: the status words it leaves on the device, turned into
//! [`LossTotals`] or the error the device found; the read-back slots that let several calls'
//! totals be in flight at once; and [`PendingTotals`], a read that does not wait for the
//! calls submitted after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Result, XentError};
use crate::output::LossTotals;
use crate::spec::Reduction;

use super::context::{Gpu, Serialised};
use super::views::{IndexType, TargetLayout};

/// Bytes of the status buffer: 4 words of errors, then (loss, entropy, denominator, ignored)
/// and the z-loss, each as an unevaluated pair hi + lo of f32, then the number of the call
/// whose reduction wrote them (`Params::call`) and the overrun flag, padded to a whole `vec4`.
pub(crate) const STATUS_BYTES: u64 = 96;

/// The word of the status that holds the call's number.
const CALL_WORD: usize = 20;

/// The word of the status that a call sets when its parameter slot held another call's
/// parameters (`own_params` in `rows.wgsl`), and its byte offset; a call clears the status
/// up to it, and the word itself only after a read.
const OVERRUN_WORD: usize = 21;
pub(crate) const OVERRUN_BYTE: u64 = OVERRUN_WORD as u64 * 4;

/// The high word of a top-k error's value that marks a repeated index (not one out of range).
pub(crate) const TOP_K_DUPLICATE: u32 = 0x4000_0000;

/// What turns one call's status bytes into its totals: the loss as it was at that call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TotalsReader {
    pub reduction: Reduction,
    pub ignore_index: Option<i64>,
    /// Classes of these logits, and of the whole vocabulary (a shard holds some of them).
    pub classes: usize,
    pub total_classes: usize,
    pub targets: Option<TargetLayout>,
    /// The power of two the class weights were multiplied by on the device.
    pub weight_scale: f64,
    pub z_loss: bool,
    pub entropy: bool,
    /// Rows of the call.
    pub rows: usize,
    /// The number the call's reduction writes into the status (its call number), or
    /// 0 for a call without a reduction (nothing to check).
    pub call: u32,
    /// A distillation's totals: what its loss is of the device's sums.
    pub distillation: Option<DistillationSums>,
    /// The cross-entropy scale of a mean's gradient that the device divided by its own
    /// denominator (gradient.wgsl, SCALES_FROM_TOTALS).
    pub device_scale: Option<f32>,
}

/// How a distillation's totals come from the device's sums (Σ loss, Σ H(p)): the loss scale
/// (T² or 1) over both, and whether the loss is the KL alone (the JSD's β = 0 end, which runs
/// the forward kernels: Σ CE − Σ H) and whether H(p) is reported (the forward loss).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DistillationSums {
    pub scale: f64,
    pub kl_only: bool,
    pub entropy: bool,
}

impl TotalsReader {
    /// Whether `bytes` are the status of another call than this one (which has not run).
    fn is_stale(&self, bytes: &[u8]) -> bool {
        let words: &[u32] = bytemuck::cast_slice(bytes);
        self.call != 0 && words[CALL_WORD] != self.call
    }

    /// The totals in `bytes` (a copy of the status buffer), or the error the device found: an
    /// out-of-range class index or top-k entry (naming its row and value), a logit beyond
    /// f32's safe range.
    pub(crate) fn read(&self, bytes: &[u8]) -> Result<LossTotals> {
        let words: &[u32] = bytemuck::cast_slice(bytes);
        if self.is_stale(bytes) {
            // The status of an earlier call (or none): the last one recorded has not run.
            return Err(XentError::NotSubmitted);
        }
        if words[OVERRUN_WORD] != 0 {
            return Err(XentError::CallsOverran {
                slots: super::prepared::PARAM_SLOTS,
            });
        }
        if words[0] != 0 {
            let row = (u32::MAX - words[0]) as usize;
            if let Some(TargetLayout::TopK { .. }) = self.targets {
                return Err(if words[3] == TOP_K_DUPLICATE {
                    XentError::SparseDuplicateIndex {
                        row,
                        class: words[2] as i64,
                    }
                } else {
                    XentError::SparseIndexOutOfRange {
                        row,
                        value: words[2] as i32 as i64,
                        classes: self.classes,
                    }
                });
            }
            let value = ((words[3] as u64) << 32 | words[2] as u64) as i64;
            let value = match self.targets {
                Some(TargetLayout::ClassIndices(IndexType::I32)) => value as i32 as i64,
                _ => value,
            };
            return Err(XentError::ClassIndexOutOfRange {
                row,
                value,
                classes: self.total_classes,
                ignore_index: self.ignore_index,
            });
        }
        if words[1] != 0 {
            return Err(XentError::LogitOutOfRange {
                row: (u32::MAX - words[1]) as usize,
            });
        }
        let floats: &[f32] = bytemuck::cast_slice(&bytes[16..]);
        if let Some(s) = self.device_scale {
            // The kernel's own f32 quotient: beyond f32 (class weights spanning more than f32
            // does, the batch's targets on the smallest) its gradient is ±inf or NaN. (No
            // denominator, no counted row: the gradient is all zeros.)
            let denominator = floats[2] + floats[6];
            if denominator != 0.0 && s.is_finite() && !(s / denominator).is_finite() {
                return Err(XentError::GradientScale(s as f64 / denominator as f64));
            }
        }
        // Unevaluated pairs hi + lo: (loss, entropy, denominator, ignored), (z-loss, ...).
        let pair = |hi: usize, lo: usize| {
            let (hi, lo) = (floats[hi] as f64, floats[lo] as f64);
            if hi.is_finite() { hi + lo } else { hi }
        };
        let total = |i: usize| pair(i, 4 + i);
        let scale = self.weight_scale;
        // The mean's denominator is Σ w_y (weights times the scale) for class indices, a
        // count of rows otherwise.
        let denominator = match self.targets {
            Some(TargetLayout::ClassIndices(_)) => total(2) / scale,
            _ => total(2),
        };
        let mut ce_sum = total(0) / scale;
        let mut entropy_sum = self.entropy.then(|| total(1));
        if let Some(d) = self.distillation {
            let h = total(1);
            ce_sum = d.scale * if d.kl_only { ce_sum - h } else { ce_sum };
            entropy_sum = d.entropy.then_some(d.scale * h);
        }
        let ignored = total(3) as usize;
        let z_loss_sum = self.z_loss.then(|| pair(8, 12));
        let sum = ce_sum + z_loss_sum.unwrap_or(0.0);
        let counted = self.rows.saturating_sub(ignored);
        Ok(LossTotals {
            reduction: self.reduction,
            loss: self
                .reduction
                .apply_with_z_loss(sum, denominator, z_loss_sum, counted),
            sum,
            mean_denominator: denominator,
            entropy_sum,
            z_loss_sum,
            ignored_rows: ignored,
            rows: self.rows,
            classes: self.classes,
        })
    }
}

/// A read-back buffer for one call's status. Busy from the moment a [`PendingTotals`] starts
/// mapping it until that read ends (or is dropped): no call copies into it meanwhile.
pub(crate) struct TotalsSlot {
    pub buffer: wgpu::Buffer,
    busy: Arc<AtomicBool>,
}

impl TotalsSlot {
    pub(crate) fn new(gpu: &Gpu) -> Self {
        TotalsSlot {
            buffer: gpu.readback_buffer("xent totals read-back", STATUS_BYTES),
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

/// The outcome of a map, as its callback reports it (on whichever thread ran the callback).
#[derive(Default)]
struct MapSignal {
    outcome: Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>,
    done: Condvar,
}

impl MapSignal {
    fn set(&self, outcome: std::result::Result<(), wgpu::BufferAsyncError>) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.done.notify_all();
    }

    fn get(&self) -> Option<std::result::Result<(), wgpu::BufferAsyncError>> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The outcome, waiting up to `limit` for a callback that another thread is running.
    fn wait(&self, limit: Duration) -> Option<std::result::Result<(), wgpu::BufferAsyncError>> {
        let guard = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .done
            .wait_timeout_while(guard, limit, |o| o.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

/// The totals of one call of a [`PreparedLoss`](crate::PreparedLoss), on their way back
/// from the device: made by [`PreparedLoss::read_later`](crate::PreparedLoss::read_later)
/// right after the call is submitted, read with [`PendingTotals::wait`], which waits for that
/// call only, not for the calls submitted after it.
///
/// This is how a training loop keeps the device busy: submit step `i`, then read the loss of
/// step `i − 1`. While a read is pending, the prepared loss records its later calls' totals
/// into other read-back buffers (it makes one more the first time every buffer it has is
/// pending, and reuses them after). Dropping a pending read without waiting cancels it.
#[must_use = "the totals are read by `wait`; dropping this cancels the read"]
pub struct PendingTotals {
    gpu: Arc<Gpu>,
    buffer: Serialised<wgpu::Buffer>,
    busy: Arc<AtomicBool>,
    /// A submission made after the call's own: waiting for it waits for the call.
    after: wgpu::SubmissionIndex,
    mapped: Arc<MapSignal>,
    /// The status (or the map's error), when the map was done as the read began.
    early: Option<Result<Vec<u8>>>,
    reader: TotalsReader,
    /// The buffer is unmapped and the slot released.
    done: bool,
}

impl PendingTotals {
    /// Starts mapping `slot` (which the call copied its status into); the call has been
    /// submitted. Marks the slot busy. Where the map is done at once (the call has finished,
    /// or was never submitted), the status is read and the buffer unmapped here, so that no
    /// later submission finds it mapped.
    pub(crate) fn start(
        gpu: &Arc<Gpu>,
        slot: &TotalsSlot,
        reader: TotalsReader,
        read_early: bool,
    ) -> Self {
        let _serial = gpu.serial();
        slot.busy.store(true, Ordering::Release);
        let mapped = Arc::new(MapSignal::default());
        let signal = mapped.clone();
        slot.buffer
            .slice(..STATUS_BYTES)
            .map_async(wgpu::MapMode::Read, move |r| signal.set(r));
        // An empty submission after the call's: its index bounds the wait (wgpu does not tell
        // which submission a mapping waits for). Submitting also runs the callbacks of maps
        // that are due, this one's included when the buffer is idle.
        let after = gpu.queue.submit([]);
        let mut pending = PendingTotals {
            gpu: gpu.clone(),
            buffer: Serialised::new(gpu, slot.buffer.clone()),
            busy: slot.busy.clone(),
            after,
            mapped,
            early: None,
            reader,
            done: false,
        };
        if read_early && pending.mapped.get().is_some() {
            pending.early = Some(pending.mapped_bytes());
            pending.release();
        }
        pending
    }

    /// The read has already found the status of an earlier call: its own was not submitted
    /// when the read began.
    pub(crate) fn found_unsubmitted(&self) -> bool {
        matches!(&self.early, Some(Ok(bytes)) if self.reader.is_stale(bytes))
    }

    /// Whether [`PendingTotals::wait`] would return at once: the call has finished and its
    /// status is mapped (or its map failed). Checks the device without blocking.
    pub fn is_ready(&self) -> bool {
        if self.early.is_some() {
            return true;
        }
        let _serial = self.gpu.serial();
        let _ = self.gpu.device.poll(wgpu::PollType::Poll);
        self.mapped.get().is_some()
    }

    /// Waits for the call (and the calls submitted before it; not those after) and returns
    /// its totals, or the error the device found in it, as
    /// [`PreparedLoss::read_totals`](crate::PreparedLoss::read_totals) does.
    pub fn wait(mut self) -> Result<LossTotals> {
        let bytes = match self.early.take() {
            Some(bytes) => bytes,
            None => self.wait_for_bytes(),
        };
        self.release();
        self.reader.read(&bytes?)
    }

    /// Waits for the call, then for its map's callback, and reads the status.
    fn wait_for_bytes(&self) -> Result<Vec<u8>> {
        {
            let _serial = self.gpu.serial();
            self.gpu.wait_for(Some(self.after.clone()))?;
            self.gpu.lost()?;
        }
        // The wait has made the map due; its callback may be running on another thread that
        // polled at the same moment (without the GL serialisation held, which that thread
        // may need to finish).
        if self.mapped.wait(CALLBACK_LIMIT).is_none() {
            return Err(read_error(
                "the call's status was never mapped: was the call submitted before read_later?"
                    .into(),
            ));
        }
        let _serial = self.gpu.serial();
        self.mapped_bytes()
    }

    /// The status, its map having completed: the bytes, or the map's error.
    fn mapped_bytes(&self) -> Result<Vec<u8>> {
        match self.mapped.get() {
            Some(Ok(())) => self
                .buffer
                .slice(..STATUS_BYTES)
                .get_mapped_range()
                .map(|view| view.to_vec())
                .map_err(|e| read_error(e.to_string())),
            other => Err(read_error(format!("buffer map failed: {other:?}"))),
        }
    }

    /// Unmaps the buffer (cancelling a map still pending) and frees the slot.
    fn release(&mut self) {
        if !self.done {
            let _serial = self.gpu.serial();
            match self.mapped.get() {
                // Mapped, or pending (the unmap aborts it): a valid unmap.
                Some(Ok(())) | None => self.buffer.unmap(),
                Some(Err(_)) => self.gpu.unmap_quietly(&self.buffer),
            }
            self.busy.store(false, Ordering::Release);
            self.done = true;
        }
    }
}

/// How long a map's callback, due after the wait, may take on another thread.
const CALLBACK_LIMIT: Duration = Duration::from_secs(10);

fn read_error(detail: String) -> XentError {
    XentError::Gpu {
        context: "reading a call's totals".into(),
        detail,
    }
}

impl Drop for PendingTotals {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for PendingTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTotals")
            .field("rows", &self.reader.rows)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use wgpu::util::DeviceExt;

    use crate::{CrossEntropy, DeviceLogits, DeviceTargets, GpuContext, IndexType, LossShape};

    /// The waiting path of a pending read, which CPU adapters never take by themselves (they
    /// have run a call by the time `read_later` maps its status): two calls in flight, read
    /// in the opposite order, each giving a blocking read's totals of its own inputs.
    #[test]
    fn reads_that_wait_give_their_own_calls_totals() {
        let gpu = match GpuContext::new() {
            Ok(gpu) => gpu,
            Err(_) if std::env::var("XENT_SKIP_GPU_TESTS").as_deref() == Ok("1") => return,
            Err(e) => panic!("no GPU adapter: {e} (set XENT_SKIP_GPU_TESTS=1 to skip)"),
        };
        let (rows, classes) = (33, 50);
        let logits: Vec<f32> = (0..rows * classes)
            .map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let buffer = |bytes: &[u8]| {
            gpu.device()
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytes,
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let z = buffer(bytemuck::cast_slice(&logits));
        let sets: Vec<wgpu::Buffer> = [3i64, 11]
            .iter()
            .map(|&step| {
                let y: Vec<i64> = (0..rows as i64)
                    .map(|i| (i * step) % classes as i64)
                    .collect();
                buffer(bytemuck::cast_slice(&y))
            })
            .collect();
        let shape = LossShape::class_indices(rows, classes, IndexType::I64);
        let mut loss = gpu.prepare(&CrossEntropy::new(), shape).unwrap();
        let call = |loss: &mut crate::PreparedLoss, y: &wgpu::Buffer| {
            let mut encoder = gpu.device().create_command_encoder(&Default::default());
            loss.record(
                &mut encoder,
                DeviceLogits::new(&z, 0, rows, classes),
                DeviceTargets::class_indices(y, 0, IndexType::I64),
            )
            .unwrap();
            gpu.queue().submit([encoder.finish()]);
        };
        let blocking: Vec<_> = sets
            .iter()
            .map(|y| {
                call(&mut loss, y);
                loss.read_totals().unwrap()
            })
            .collect();
        assert_ne!(blocking[0], blocking[1]);
        call(&mut loss, &sets[0]);
        let first = loss.start_read(false).unwrap();
        call(&mut loss, &sets[1]);
        let second = loss.start_read(false).unwrap();
        assert_eq!(second.wait().unwrap(), blocking[1]);
        assert_eq!(first.wait().unwrap(), blocking[0]);
        // A pending read dropped unread frees its buffer: the next call reads as before.
        call(&mut loss, &sets[1]);
        drop(loss.start_read(false).unwrap());
        call(&mut loss, &sets[0]);
        assert_eq!(loss.read_totals().unwrap(), blocking[0]);
    }
}
