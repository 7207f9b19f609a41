//! A call's totals on their way back: the status words it leaves on the device, turned into
//! [`LossTotals`] or the error the device found; the read-back slots that let several calls'
//! totals be in flight at once; and [`PendingTotals`], a read that does not wait for the
//! calls submitted after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, XentError};
use crate::output::LossTotals;
use crate::spec::Reduction;

use super::context::{Gpu, Serialised};
use super::views::{IndexType, TargetLayout};

/// Bytes of the status buffer: 4 words of errors, then (loss, entropy, denominator, ignored)
/// and the z-loss, each as an unevaluated pair hi + lo of f32.
pub(crate) const STATUS_BYTES: u64 = 80;

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
}

impl TotalsReader {
    /// The totals in `bytes` (a copy of the status buffer), or the error the device found: an
    /// out-of-range class index or top-k entry (naming its row and value), a logit beyond
    /// f32's safe range.
    pub(crate) fn read(&self, bytes: &[u8]) -> Result<LossTotals> {
        let words: &[u32] = bytemuck::cast_slice(bytes);
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
        // Unevaluated pairs hi + lo: (loss, entropy, denominator, ignored), (z-loss, ...).
        let pair = |hi: usize, lo: usize| {
            let (hi, lo) = (floats[hi] as f64, floats[lo] as f64);
            if hi.is_finite() { hi + lo } else { hi }
        };
        let total = |i: usize| pair(i, 4 + i);
        let scale = self.weight_scale;
        let (ce_sum, denominator) = (total(0) / scale, total(2) / scale);
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
            entropy_sum: self.entropy.then(|| total(1)),
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
    mapped: Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>,
    reader: TotalsReader,
    /// The buffer is unmapped and the slot released.
    done: bool,
}

impl PendingTotals {
    /// Starts mapping `slot` (which the call copied its status into); the call has been
    /// submitted. Marks the slot busy.
    pub(crate) fn start(gpu: &Arc<Gpu>, slot: &TotalsSlot, reader: TotalsReader) -> Self {
        let _serial = gpu.serial();
        slot.busy.store(true, Ordering::Release);
        let mapped = Arc::new(Mutex::new(None));
        let signal = mapped.clone();
        slot.buffer
            .slice(..STATUS_BYTES)
            .map_async(wgpu::MapMode::Read, move |r| {
                *signal.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        // An empty submission after the call's: its index bounds the wait (wgpu does not tell
        // which submission a mapping waits for).
        let after = gpu.queue.submit([]);
        PendingTotals {
            gpu: gpu.clone(),
            buffer: Serialised::new(gpu, slot.buffer.clone()),
            busy: slot.busy.clone(),
            after,
            mapped,
            reader,
            done: false,
        }
    }

    /// Whether the call has finished and its totals are mapped, so that
    /// [`PendingTotals::wait`] returns at once. Checks the device without blocking.
    pub fn is_ready(&self) -> bool {
        let _serial = self.gpu.serial();
        let _ = self.gpu.device.poll(wgpu::PollType::Poll);
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits for the call (and the calls submitted before it; not those after) and returns
    /// its totals, or the error the device found in it, as
    /// [`PreparedLoss::read_totals`](crate::PreparedLoss::read_totals) does.
    pub fn wait(mut self) -> Result<LossTotals> {
        let bytes = self.bytes();
        self.release();
        self.reader.read(&bytes?)
    }

    /// The call's status bytes, once mapped.
    fn bytes(&self) -> Result<Vec<u8>> {
        let _serial = self.gpu.serial();
        let error = |detail: String| XentError::Gpu {
            context: "reading a call's totals".into(),
            detail,
        };
        let wait = wgpu::PollType::Wait {
            submission_index: Some(self.after.clone()),
            timeout: None,
        };
        let polled = self.gpu.device.poll(wait);
        self.gpu.lost()?;
        polled.map_err(|e| error(e.to_string()))?;
        let mapped = self
            .mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match mapped {
            Some(Ok(())) => {
                let view = self
                    .buffer
                    .slice(..STATUS_BYTES)
                    .get_mapped_range()
                    .map_err(|e| error(e.to_string()))?;
                Ok(view.to_vec())
            }
            other => Err(error(format!("buffer map failed: {other:?}"))),
        }
    }

    /// Unmaps the buffer (cancelling a map still pending; a map that failed left nothing to
    /// unmap) and frees the slot.
    fn release(&mut self) {
        if !self.done {
            let _serial = self.gpu.serial();
            let failed = matches!(
                *self.mapped.lock().unwrap_or_else(|e| e.into_inner()),
                Some(Err(_))
            );
            if !failed {
                self.buffer.unmap();
            }
            self.busy.store(false, Ordering::Release);
            self.done = true;
        }
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
