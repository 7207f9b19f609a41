//! Views of inputs that already live in the caller's device buffers.

use crate::error::{Result, XentError};

/// Logits `[rows, classes]`, row-major f32, in a caller's `wgpu::Buffer` from byte `offset`.
///
/// The buffer needs `BufferUsages::STORAGE`; the offset must be a multiple of 4 (rows need
/// not start on a 16-byte boundary). A burn or cubecl tensor's handle gives its buffer, offset
/// and size.
#[derive(Clone, Copy, Debug)]
pub struct DeviceLogits<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    rows: usize,
    classes: usize,
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
        }
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
/// (a multiple of 4).
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
    /// f32 probabilities shaped like the logits.
    Probabilities {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of the first probability.
        offset: u64,
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

    /// Probabilities from byte `offset` of `buffer`.
    pub fn probabilities(buffer: &'a wgpu::Buffer, offset: u64) -> Self {
        DeviceTargets::Probabilities { buffer, offset }
    }

    /// The kind of targets, for [`crate::LossShape`].
    pub fn layout(&self) -> TargetLayout {
        match *self {
            DeviceTargets::ClassIndices { index_type, .. } => {
                TargetLayout::ClassIndices(index_type)
            }
            DeviceTargets::Probabilities { .. } => TargetLayout::Probabilities,
        }
    }

    pub(crate) fn buffer(&self) -> &'a wgpu::Buffer {
        match *self {
            DeviceTargets::ClassIndices { buffer, .. }
            | DeviceTargets::Probabilities { buffer, .. } => buffer,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        match *self {
            DeviceTargets::ClassIndices { offset, .. }
            | DeviceTargets::Probabilities { offset, .. } => offset,
        }
    }
}

/// What kind of targets a prepared loss takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetLayout {
    /// One class index per row, of this type.
    ClassIndices(IndexType),
    /// f32 probabilities shaped like the logits.
    Probabilities,
}

impl TargetLayout {
    /// Bytes of targets per row of `classes` logits.
    pub fn row_bytes(self, classes: usize) -> u64 {
        match self {
            TargetLayout::ClassIndices(t) => t.bytes(),
            TargetLayout::Probabilities => classes as u64 * 4,
        }
    }
}

/// What a prepared loss is sized for: up to `max_rows` rows of `classes` logits, and the kind
/// of targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossShape {
    max_rows: usize,
    classes: usize,
    targets: TargetLayout,
}

impl LossShape {
    /// Up to `max_rows` rows of `classes` logits against class indices of `index_type`.
    pub fn class_indices(max_rows: usize, classes: usize, index_type: IndexType) -> Self {
        Self::new(max_rows, classes, TargetLayout::ClassIndices(index_type))
    }

    /// Up to `max_rows` rows of `classes` logits against probabilities.
    pub fn probabilities(max_rows: usize, classes: usize) -> Self {
        Self::new(max_rows, classes, TargetLayout::Probabilities)
    }

    /// The general form.
    pub fn new(max_rows: usize, classes: usize, targets: TargetLayout) -> Self {
        Self {
            max_rows,
            classes,
            targets,
        }
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

/// Checks that `bytes` from `offset` lie in `buffer`, that the offset is a multiple of 4 and
/// that the buffer can be bound as storage. `what` names the input in the error.
pub(crate) fn check_view(
    what: &'static str,
    buffer: &wgpu::Buffer,
    offset: u64,
    bytes: u64,
) -> Result<()> {
    let bad = |why: String| Err(XentError::DeviceBuffer { what, why });
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return bad(format!(
            "the buffer's usage {:?} lacks STORAGE, which xent needs to read it",
            buffer.usage()
        ));
    }
    if !offset.is_multiple_of(4) {
        return bad(format!("offset {offset} is not a multiple of 4 bytes"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= buffer.size() => Ok(()),
        _ => bad(format!(
            "{bytes} bytes from offset {offset} do not fit the buffer's {} bytes",
            buffer.size()
        )),
    }
}
