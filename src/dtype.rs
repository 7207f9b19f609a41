//! Element types: f32, bf16 and f16 values, borrowed or owned.
//!
//! Half-precision values are widened exactly (every bf16 and f16 is an f32), so the CPU
//! reference sees the very numbers the GPU reads; accumulation is f32 on the GPU and f64 on
//! the CPU whatever the input type.

use std::borrow::Cow;
use std::ops::Range;

use half::{bf16, f16};

/// The type of the values of logits, probabilities or a gradient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    #[default]
    F32,
    /// bfloat16: the upper half of an f32 (8 exponent bits, 7 mantissa bits).
    Bf16,
    /// IEEE binary16 (5 exponent bits, 10 mantissa bits; largest finite 65504).
    F16,
}

impl Dtype {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The name used on the command line and in reports: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// Whether the values are two bytes.
    pub fn is_half(self) -> bool {
        self != Dtype::F32
    }

    /// The spacing of this dtype's values at `x` (one unit in the last place), for tolerances:
    /// 2^(e − mantissa bits) for |x| in [2^e, 2^(e+1)), the subnormal spacing below.
    pub fn ulp(self, x: f64) -> f64 {
        let (mantissa, min_exp) = match self {
            Dtype::F32 => (23, -126),
            Dtype::Bf16 => (7, -126),
            Dtype::F16 => (10, -14),
        };
        let e = if x == 0.0 || !x.is_finite() {
            min_exp
        } else {
            (x.abs().log2().floor() as i32).max(min_exp)
        };
        2f64.powi(e - mantissa)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = crate::XentError;

    /// `f32`/`float32`, `bf16`/`bfloat16` or `f16`/`float16`; anything else is
    /// [`XentError::UnknownName`](crate::XentError::UnknownName).
    fn from_str(s: &str) -> Result<Self, crate::XentError> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            _ => Err(crate::XentError::UnknownName {
                what: "dtype",
                value: s.into(),
                expected: "f32, bf16 or f16",
            }),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A value type xent reads: `f32`, `half::bf16` or `half::f16` (sealed).
pub trait Element: sealed::Sealed + bytemuck::Pod {
    /// The dtype.
    const DTYPE: Dtype;

    /// A slice of these as [`Elements`].
    fn elements(values: &[Self]) -> Elements<'_>;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn elements(values: &[Self]) -> Elements<'_> {
        Elements::F32(values)
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn elements(values: &[Self]) -> Elements<'_> {
        Elements::Bf16(values)
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn elements(values: &[Self]) -> Elements<'_> {
        Elements::F16(values)
    }
}

/// A borrowed slice of values of one dtype, row-major.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Elements<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
    /// f16 values.
    F16(&'a [f16]),
}

impl<'a> Elements<'a> {
    /// A slice of any [`Element`] type.
    pub fn new<T: Element>(values: &'a [T]) -> Self {
        T::elements(values)
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            Elements::F32(_) => Dtype::F32,
            Elements::Bf16(_) => Dtype::Bf16,
            Elements::F16(_) => Dtype::F16,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::Bf16(v) => v.len(),
            Elements::F16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values `range`.
    pub fn slice(&self, range: Range<usize>) -> Elements<'a> {
        match *self {
            Elements::F32(v) => Elements::F32(&v[range]),
            Elements::Bf16(v) => Elements::Bf16(&v[range]),
            Elements::F16(v) => Elements::F16(&v[range]),
        }
    }

    /// The values' bytes, as they lie in memory (little-endian on every platform wgpu runs).
    pub fn bytes(&self) -> &'a [u8] {
        match *self {
            Elements::F32(v) => bytemuck::cast_slice(v),
            Elements::Bf16(v) => bytemuck::cast_slice(v),
            Elements::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Columns `range` of these values as a `[rows, width]` matrix, row-major: a block of
    /// classes copied out.
    pub(crate) fn columns(&self, width: usize, range: Range<usize>) -> ElementVec {
        fn take<T: Copy>(v: &[T], width: usize, range: Range<usize>) -> Vec<T> {
            v.chunks(width.max(1))
                .flat_map(|row| row[range.clone()].iter().copied())
                .collect()
        }
        match *self {
            Elements::F32(v) => ElementVec::F32(take(v, width, range)),
            Elements::Bf16(v) => ElementVec::Bf16(take(v, width, range)),
            Elements::F16(v) => ElementVec::F16(take(v, width, range)),
        }
    }

    /// The values `range` widened exactly to f32 (borrowed when they are f32).
    pub fn to_f32(&self, range: Range<usize>) -> Cow<'a, [f32]> {
        match *self {
            Elements::F32(v) => Cow::Borrowed(&v[range]),
            Elements::Bf16(v) => Cow::Owned(v[range].iter().map(|x| x.to_f32()).collect()),
            Elements::F16(v) => Cow::Owned(v[range].iter().map(|x| x.to_f32()).collect()),
        }
    }
}

/// Owned values of one dtype, row-major: a gradient in the logits' dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum ElementVec {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values.
    Bf16(Vec<bf16>),
    /// f16 values.
    F16(Vec<f16>),
}

impl ElementVec {
    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: Dtype, len: usize) -> Self {
        match dtype {
            Dtype::F32 => ElementVec::F32(vec![0.0; len]),
            Dtype::Bf16 => ElementVec::Bf16(vec![bf16::ZERO; len]),
            Dtype::F16 => ElementVec::F16(vec![f16::ZERO; len]),
        }
    }

    /// `values` rounded once to `dtype`, to nearest, ties to even (f32 values, widened, come
    /// out as they were).
    pub fn rounded(dtype: Dtype, values: impl IntoIterator<Item = f64>) -> Self {
        let values = values.into_iter();
        match dtype {
            Dtype::F32 => ElementVec::F32(values.map(|v| v as f32).collect()),
            Dtype::Bf16 => ElementVec::Bf16(values.map(bf16::from_f64).collect()),
            Dtype::F16 => ElementVec::F16(values.map(f16::from_f64).collect()),
        }
    }

    /// The values borrowed.
    pub fn as_elements(&self) -> Elements<'_> {
        match self {
            ElementVec::F32(v) => Elements::F32(v),
            ElementVec::Bf16(v) => Elements::Bf16(v),
            ElementVec::F16(v) => Elements::F16(v),
        }
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.as_elements().dtype()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.as_elements().len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value widened exactly to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let e = self.as_elements();
        e.to_f32(0..e.len()).into_owned()
    }

    /// The f32 values, if these are f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            ElementVec::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The values' bytes.
    pub fn bytes(&self) -> &[u8] {
        self.as_elements().bytes()
    }

    /// Writes `block`, a `[rows, range.len()]` matrix of the same dtype, into columns `range`
    /// of these values seen as rows `width` wide (the inverse of `Elements::columns`).
    pub(crate) fn set_columns(&mut self, width: usize, range: Range<usize>, block: &ElementVec) {
        let value = self.dtype().bytes();
        let (w, bw) = (width * value, range.len() * value);
        let start = range.start * value;
        let into: &mut [u8] = self.bytes_mut(0..self.len());
        for (row, src) in into
            .chunks_mut(w.max(1))
            .zip(block.bytes().chunks(bw.max(1)))
        {
            row[start..start + bw].copy_from_slice(src);
        }
    }

    /// The bytes of values `range`, to be overwritten.
    pub(crate) fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        match self {
            ElementVec::F32(v) => bytemuck::cast_slice_mut(&mut v[range]),
            ElementVec::Bf16(v) => bytemuck::cast_slice_mut(&mut v[range]),
            ElementVec::F16(v) => bytemuck::cast_slice_mut(&mut v[range]),
        }
    }
}
