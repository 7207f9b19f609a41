//! Views of inputs that already live in the caller's device buffers.

use crate::dtype::Dtype;
use crate::error::{Result, XentError};

/// Logits `[rows, classes]`, row-major, in a caller's `wgpu::Buffer` from byte `offset`: f32
/// by default, bf16 or f16 with [`DeviceLogits::with_dtype`].
///
/// The buffer needs `BufferUsages::STORAGE`; the offset must be a multiple of the value size
/// (rows need not start on a 16-byte, nor for halves on a 4-byte, boundary), and the buffer
/// must reach the next multiple of 4 bytes after the last value. A burn or cubecl tensor's
/// handle gives its buffer, offset and size.
#[derive(Clone, Copy, Debug)]
pub struct DeviceLogits<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    rows: usize,
    classes: usize,
    dtype: Dtype,
}

impl<'a> DeviceLogits<'a> {
    /// Views `rows × classes` f32 values of `buffer` from byte `offset`. Checked when the
    /// view is used, before anything is recorded.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64, rows: usize, classes: usize) -> Self {
        Self {
            buffer,
            offset,
            rows,
            classes,
            dtype: Dtype::F32,
        }
    }

    /// The same view with values of `dtype`.
    pub fn with_dtype(self, dtype: Dtype) -> Self {
        Self { dtype, ..self }
    }

    /// The values' type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The buffer.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }

    /// Byte offset of the first logit.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// N.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }
}

/// The integer type of class indices in a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexType {
    /// 32-bit signed.
    I32,
    /// 64-bit signed, as PyTorch and burn write them: a value that does not fit `[0, C)` is
    /// out of range unless it equals the ignore index.
    I64,
}

impl IndexType {
    /// Bytes per index.
    pub fn bytes(self) -> u64 {
        match self {
            IndexType::I32 => 4,
            IndexType::I64 => 8,
        }
    }
}

/// Targets in a caller's device buffer (needs `BufferUsages::STORAGE`), from byte `offset`
/// (a multiple of the value size).
#[derive(Clone, Copy, Debug)]
pub enum DeviceTargets<'a> {
    /// One class index per row.
    ClassIndices {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of the first index.
        offset: u64,
        /// i32 or i64.
        index_type: IndexType,
    },
    /// Probabilities shaped like the logits, f32 or of the logits' dtype.
    Probabilities {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of the first probability.
        offset: u64,
        /// The values' type: f32, or the logits' dtype.
        dtype: Dtype,
    },
    /// Top-k sparse targets packed as [`TargetLayout::TopK`] describes.
    TopK {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of the first row's first index (a multiple of 4).
        offset: u64,
        /// Pairs per row.
        k: u32,
    },
}

impl<'a> DeviceTargets<'a> {
    /// Class indices from byte `offset` of `buffer`.
    pub fn class_indices(buffer: &'a wgpu::Buffer, offset: u64, index_type: IndexType) -> Self {
        DeviceTargets::ClassIndices {
            buffer,
            offset,
            index_type,
        }
    }

    /// f32 probabilities from byte `offset` of `buffer`.
    pub fn probabilities(buffer: &'a wgpu::Buffer, offset: u64) -> Self {
        Self::probabilities_of(buffer, offset, Dtype::F32)
    }

    /// Probabilities of `dtype` (f32, or the logits' dtype) from byte `offset` of `buffer`.
    pub fn probabilities_of(buffer: &'a wgpu::Buffer, offset: u64, dtype: Dtype) -> Self {
        DeviceTargets::Probabilities {
            buffer,
            offset,
            dtype,
        }
    }

    /// Top-k targets packed as [`TargetLayout::TopK`] describes, from byte `offset`.
    pub fn top_k(buffer: &'a wgpu::Buffer, offset: u64, k: u32) -> Self {
        DeviceTargets::TopK { buffer, offset, k }
    }

    /// Targets of any `layout` from byte `offset` of `buffer`.
    pub fn of_layout(buffer: &'a wgpu::Buffer, offset: u64, layout: TargetLayout) -> Self {
        match layout {
            TargetLayout::ClassIndices(t) => Self::class_indices(buffer, offset, t),
            TargetLayout::Probabilities(d) => Self::probabilities_of(buffer, offset, d),
            TargetLayout::TopK { k } => Self::top_k(buffer, offset, k),
        }
    }

    /// The kind of targets, for [`crate::LossShape`].
    pub fn layout(&self) -> TargetLayout {
        match *self {
            DeviceTargets::ClassIndices { index_type, .. } => {
                TargetLayout::ClassIndices(index_type)
            }
            DeviceTargets::Probabilities { dtype, .. } => TargetLayout::Probabilities(dtype),
            DeviceTargets::TopK { k, .. } => TargetLayout::TopK { k },
        }
    }

    pub(crate) fn buffer(&self) -> &'a wgpu::Buffer {
        match *self {
            DeviceTargets::ClassIndices { buffer, .. }
            | DeviceTargets::Probabilities { buffer, .. }
            | DeviceTargets::TopK { buffer, .. } => buffer,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        match *self {
            DeviceTargets::ClassIndices { offset, .. }
            | DeviceTargets::Probabilities { offset, .. }
            | DeviceTargets::TopK { offset, .. } => offset,
        }
    }
}

/// What kind of targets a prepared loss takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetLayout {
    /// One class index per row, of this type.
    ClassIndices(IndexType),
    /// Probabilities shaped like the logits, of this dtype (f32, or the logits').
    Probabilities(Dtype),
    /// Top-k sparse targets: per row `k` class indices (i32) then their `k` probabilities
    /// (f32), packed row by row (`8·k` bytes a row). An index outside `[0, C)` or repeated
    /// within its row is an error naming the row, found on the device.
    TopK {
        /// Pairs per row, at least 1.
        k: u32,
    },
}

impl TargetLayout {
    /// f32 probabilities.
    pub const PROBABILITIES: TargetLayout = TargetLayout::Probabilities(Dtype::F32);

    /// Bytes of targets per row of `classes` logits.
    pub fn row_bytes(self, classes: usize) -> u64 {
        match self {
            TargetLayout::ClassIndices(t) => t.bytes(),
            TargetLayout::Probabilities(d) => classes as u64 * d.bytes() as u64,
            TargetLayout::TopK { k } => 8 * k as u64,
        }
    }

    /// Bytes of one value (a class index, or a probability).
    pub fn element_bytes(self) -> u64 {
        match self {
            TargetLayout::ClassIndices(t) => t.bytes(),
            TargetLayout::Probabilities(d) => d.bytes() as u64,
            TargetLayout::TopK { .. } => 4,
        }
    }

    /// Whether these are probabilities.
    pub fn is_probabilities(self) -> bool {
        matches!(self, TargetLayout::Probabilities(_))
    }
}

/// What a prepared loss is sized for: up to `max_rows` rows of `classes` logits, the
/// logits' dtype (f32 unless [`LossShape::with_dtype`]) and the kind of targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossShape {
    max_rows: usize,
    classes: usize,
    targets: TargetLayout,
    dtype: Dtype,
}

impl LossShape {
    /// Up to `max_rows` rows of `classes` logits against class indices of `index_type`.
    pub fn class_indices(max_rows: usize, classes: usize, index_type: IndexType) -> Self {
        Self::new(max_rows, classes, TargetLayout::ClassIndices(index_type))
    }

    /// Up to `max_rows` rows of `classes` logits against f32 probabilities.
    pub fn probabilities(max_rows: usize, classes: usize) -> Self {
        Self::new(max_rows, classes, TargetLayout::PROBABILITIES)
    }

    /// The general form.
    pub fn new(max_rows: usize, classes: usize, targets: TargetLayout) -> Self {
        Self {
            max_rows,
            classes,
            targets,
            dtype: Dtype::F32,
        }
    }

    /// The same shape for logits of `dtype`.
    pub fn with_dtype(self, dtype: Dtype) -> Self {
        Self { dtype, ..self }
    }

    /// The logits' dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The most rows one call may have.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The kind of targets.
    pub fn targets(&self) -> TargetLayout {
        self.targets
    }
}

/// Checks that `bytes` from `offset` lie in `buffer` (which reaches the next multiple of 4
/// bytes after them: storage bindings are whole words), that the offset is a multiple of
/// `element` bytes and that the buffer can be bound as storage. `what` names the input in
/// the error.
pub(crate) fn check_view(
    what: &'static str,
    buffer: &wgpu::Buffer,
    offset: u64,
    bytes: u64,
    element: u64,
) -> Result<()> {
    let bad = |why: String| Err(XentError::DeviceBuffer { what, why });
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return bad(format!(
            "the buffer's usage {:?} lacks STORAGE, which xent needs to read it",
            buffer.usage()
        ));
    }
    if !offset.is_multiple_of(element) {
        return bad(format!(
            "offset {offset} is not a multiple of {element} bytes"
        ));
    }
    match offset.checked_add(bytes) {
        Some(end) if end.next_multiple_of(4) <= buffer.size() => Ok(()),
        Some(end) if end <= buffer.size() => bad(format!(
            "the buffer's {} bytes end inside the 4-byte word of the last value (at byte \
             {end}); storage bindings are whole words",
            buffer.size()
        )),
        _ => bad(format!(
            "{bytes} bytes from offset {offset} do not fit the buffer's {} bytes",
            buffer.size()
        )),
    }
}
