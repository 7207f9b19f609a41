//! The one error type of the crate.

use thiserror::Error;

/// Everything that can go wrong in xent, on the GPU or the CPU path.
///
/// Input errors are found on the host before any GPU work is queued, so a context stays
/// usable after any of them.
///
/// Non-exhaustive: new kinds of errors may come in minor versions.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum XentError {
    /// The logits slice does not hold `rows × classes` values.
    #[error(
        "logits: {len} values do not form a [{rows}, {classes}] matrix (expected {rows} × {classes} values)"
    )]
    LogitsShape {
        /// Values given.
        len: usize,
        /// Rows claimed.
        rows: usize,
        /// Classes claimed.
        classes: usize,
    },
    /// A row of logits must have at least one class.
    #[error("logits: the number of classes is 0; cross-entropy needs at least one class")]
    NoClasses,
    /// The targets do not have the shape the logits call for.
    #[error("targets: expected {expected} values ({what}), got {got}")]
    TargetsShape {
        /// Values expected.
        expected: usize,
        /// Values given.
        got: usize,
        /// What the expected shape is, in words.
        what: String,
    },
    /// Probability targets must be f32 or of the logits' dtype.
    #[error(
        "targets: probabilities of {targets} cannot go with {logits} logits (use f32 or {logits})"
    )]
    TargetsDtype {
        /// The logits' dtype.
        logits: crate::Dtype,
        /// The probabilities' dtype.
        targets: crate::Dtype,
    },
    /// A class index is outside `[0, C)` and is not the ignore index.
    #[error("targets: row {row} has class index {value}, outside [0, {classes}){}", ignore_note(*.ignore_index))]
    ClassIndexOutOfRange {
        /// The offending row.
        row: usize,
        /// Its class index.
        value: i64,
        /// The number of classes.
        classes: usize,
        /// The ignore index in force, if any.
        ignore_index: Option<i64>,
    },
    /// `ignore_index` is only defined for class-index targets (as in PyTorch).
    #[error(
        "ignore_index is only defined for class-index targets, not for probability targets (as in PyTorch)"
    )]
    IgnoreIndexWithProbabilities,
    /// The class weights are not one per class.
    #[error("class weights: expected {expected} values (one per class), got {got}")]
    WeightsLength {
        /// The number of classes.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A class weight is NaN or infinite.
    #[error("class weights: weight {index} is {value}; weights must be finite")]
    WeightNotFinite {
        /// Which class.
        index: usize,
        /// Its weight.
        value: f32,
    },
    /// Label smoothing must lie in `[0, 1]`.
    #[error("label smoothing {0} is outside [0, 1]")]
    LabelSmoothing(f64),
    /// The z-loss coefficient λ must be finite and non-negative; on the GPU, a λ > 0 must
    /// also be a normal f32 (about 1.2e-38 to 3.4e38).
    #[error(
        "z-loss coefficient {0} must be finite and >= 0 (0 turns the z-loss off; on the GPU a positive one lies between about 1.2e-38 and 3.4e38)"
    )]
    ZLoss(f64),
    /// The soft-capping bound must be finite and positive; on the GPU also a normal f32
    /// (about 1.2e-38 to 3.4e38).
    #[error(
        "logit soft-cap {0} must be finite and > 0 (on the GPU between about 1.2e-38 and 3.4e38)"
    )]
    Softcap(f64),
    /// The upstream gradient is not the kind the reduction takes: a scalar for `sum` and
    /// `mean`, one value per row for `none` (as autograd passes `grad_output`).
    #[error("upstream gradient: reduction {reduction} takes {expected}, got {got}")]
    UpstreamKind {
        /// The reduction in force (`none`, `sum` or `mean`).
        reduction: &'static str,
        /// What it takes, in words.
        expected: &'static str,
        /// What was given, in words.
        got: &'static str,
    },
    /// A per-row upstream gradient (reduction `none`) does not have one value per row.
    #[error("upstream gradient: expected {expected} values (one per row), got {got}")]
    UpstreamLength {
        /// The number of rows.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A single row is larger than what one GPU binding can hold.
    #[error(
        "a row of {classes} classes needs {row_bytes} bytes, more than one GPU binding can hold ({limit} bytes)"
    )]
    RowTooLarge {
        /// The number of classes.
        classes: usize,
        /// Bytes of one row of logits.
        row_bytes: u64,
        /// The binding limit in force.
        limit: u64,
    },
    /// A strategy forced by the caller breaks an invariant of the kernels.
    #[error("strategy {strategy}: {why}")]
    InvalidStrategy {
        /// The strategy, as debug text.
        strategy: String,
        /// Which invariant.
        why: &'static str,
    },
    /// A finite logit beyond ±2^64 (in distillation, a student's or teacher's logit divided
    /// by the temperature): the GPU computes in f32, where differences and weighted sums of
    /// such values overflow while the f64 reference stays finite.
    #[error(
        "logits: row {row} has a finite logit beyond ±2^64 (1.8e19), where the GPU's f32 arithmetic overflows; rescale the logits or use the CPU reference"
    )]
    LogitOutOfRange {
        /// The first such row.
        row: usize,
    },
    /// A device buffer given as an input cannot be read as asked.
    #[error("{what}: {why}")]
    DeviceBuffer {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A read found the outputs of an earlier call than the last one recorded: the encoder
    /// holding that call has not been submitted (or its submission failed).
    #[error(
        "prepared loss: the last call recorded has not run; submit the encoder it was recorded into before reading"
    )]
    NotSubmitted,
    /// More calls of one prepared loss were recorded before one submission than it has
    /// parameter slots: the earliest found a later call's parameters in their slot when they
    /// ran, and did nothing (no gradient, totals or per-row results of theirs were written).
    /// Reported by the reads of the first call read after it ran (a pending read dropped
    /// unread takes the report with it, as it does its call's other errors); the loss stays
    /// usable.
    #[error(
        "prepared loss: more than {slots} calls were recorded before one submission; the earliest ran into later calls' parameters and wrote nothing (their gradients are missing). Submit at least every {slots} calls"
    )]
    CallsOverran {
        /// Parameter slots of a prepared loss: the calls one submission may hold.
        slots: usize,
    },
    /// A call does not fit the prepared loss it was given to.
    #[error("prepared loss: {0}")]
    NotPrepared(String),
    /// No GPU adapter could be found.
    #[error(
        "no GPU adapter found ({detail}). Install a GPU driver with Vulkan, Metal or DX12 support, or, on a headless Linux machine, Mesa's software Vulkan: apt-get install mesa-vulkan-drivers"
    )]
    NoAdapter {
        /// What wgpu reported.
        detail: String,
    },
    /// `WGPU_ADAPTER_NAME` names no adapter that exists.
    #[error("WGPU_ADAPTER_NAME={wanted:?} matches no adapter; adapters found: {available}")]
    AdapterNotFound {
        /// The requested name.
        wanted: String,
        /// The adapters that exist.
        available: String,
    },
    /// The adapter refused to open a device.
    #[error("could not open a device on {adapter}: {detail}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// What wgpu reported.
        detail: String,
    },
    /// The GPU ran out of memory.
    #[error("GPU out of memory while {0}")]
    OutOfMemory(String),
    /// The GPU device was lost (driver reset, removal); make a new context.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// Any other failure reported by wgpu.
    #[error("GPU error while {context}: {detail}")]
    Gpu {
        /// What xent was doing.
        context: String,
        /// What wgpu reported.
        detail: String,
    },
    /// `WGPU_BACKEND` names something that is not a backend.
    #[error(
        "WGPU_BACKEND={value:?} is not a backend; use vulkan, metal, dx12 or gl (also vk, mtl, d3d12, opengl, gles, webgpu, noop), or several separated by commas, e.g. WGPU_BACKEND=vulkan,gl; or unset it for all"
    )]
    UnknownBackend {
        /// The variable's value.
        value: String,
    },
    /// The gradient's scale on the GPU (the upstream gradient over the mean's denominator,
    /// times the inverse of the power of two the class weights were scaled by on the device)
    /// is beyond f32: class weights very far from 1 with a large upstream gradient. The host
    /// path refuses such a call; on the device path, whose mean's denominator is the device's
    /// own, the read of the call reports it (its gradient is then ±inf or NaN).
    #[error(
        "gradient: its scale {0:e} (upstream gradient over the class weights' scale) overflows f32 on the GPU; bring the class weights nearer 1 or use the CPU reference"
    )]
    GradientScale(f64),
    /// A name that is not one of a fixed set (a reduction, a dtype), as parsed by `FromStr`.
    #[error("unknown {what} {value:?} (expected {expected})")]
    UnknownName {
        /// What was being named.
        what: &'static str,
        /// The text given.
        value: String,
        /// The names accepted.
        expected: &'static str,
    },
    /// A distillation temperature must be finite and > 0; on the GPU, which scales the
    /// logits by 1/T in f32, 1/T must be a normal f32 too (T between about 3e-39 and 8.5e37).
    #[error(
        "distillation: temperature {0} must be finite and > 0 (on the GPU also between about 3e-39 and 8.5e37, so that 1/T is a normal f32)"
    )]
    Temperature(f64),
    /// The generalised Jensen–Shannon weight β must lie in `[0, 1]`.
    #[error("distillation: JSD weight beta {0} is outside [0, 1]")]
    JsdBeta(f64),
    /// A row of top-k sparse targets names one class twice.
    #[error("sparse targets: row {row} names class {class} more than once")]
    SparseDuplicateIndex {
        /// The offending row.
        row: usize,
        /// The repeated class index.
        class: i64,
    },
    /// Top-k sparse targets take the z-loss and the soft-cap of a spec, not its class
    /// weights, ignore index or label smoothing (each row's k pairs are its whole target).
    #[error(
        "sparse targets: a top-k loss takes no {0} (its rows' k probabilities are the whole target); z-loss and soft-cap are allowed"
    )]
    SparseOption(&'static str),
    /// Top-k sparse targets on the GPU take at most [`crate::gpu::MAX_SPARSE_K`] entries a
    /// row (the f64 reference in [`crate::scoring`] takes any k).
    #[error(
        "sparse targets: k = {k} entries a row; the GPU takes at most {max} (so that the kernels' loops keep within every adapter's budget, llvmpipe's included), the CPU reference any"
    )]
    SparseK {
        /// The entries per row given.
        k: usize,
        /// The most the GPU takes.
        max: usize,
    },
    /// A class index of top-k sparse targets is outside `[0, C)`.
    #[error("sparse targets: row {row} has class index {value}, outside [0, {classes})")]
    SparseIndexOutOfRange {
        /// The offending row.
        row: usize,
        /// Its class index.
        value: i64,
        /// The number of classes.
        classes: usize,
    },
    /// A vocabulary shard that does not fit its vocabulary, or partials that do not fit
    /// together.
    #[error("shard: {0}")]
    Shard(String),
    /// Sequence offsets must start at 0, never decrease and end at the number of rows.
    #[error("sequence offsets: {0}")]
    SequenceOffsets(String),
    /// The inputs of a multiple-choice evaluation do not fit together.
    #[error("multiple choice: {0}")]
    MultipleChoice(String),
}

impl XentError {
    /// The same error with its row counted from `offset` rows earlier (a part of a batch
    /// reported against the whole); errors that name no row are unchanged.
    pub fn with_row_offset(self, offset: usize) -> Self {
        match self {
            XentError::ClassIndexOutOfRange {
                row,
                value,
                classes,
                ignore_index,
            } => XentError::ClassIndexOutOfRange {
                row: row + offset,
                value,
                classes,
                ignore_index,
            },
            XentError::LogitOutOfRange { row } => XentError::LogitOutOfRange { row: row + offset },
            XentError::SparseIndexOutOfRange {
                row,
                value,
                classes,
            } => XentError::SparseIndexOutOfRange {
                row: row + offset,
                value,
                classes,
            },
            XentError::SparseDuplicateIndex { row, class } => XentError::SparseDuplicateIndex {
                row: row + offset,
                class,
            },
            other => other,
        }
    }
}

fn ignore_note(ignore_index: Option<i64>) -> String {
    match ignore_index {
        Some(i) => format!(" and is not ignore_index ({i})"),
        None => String::new(),
    }
}

/// The crate's result type.
pub type Result<T, E = XentError> = std::result::Result<T, E>;
