//! Reading .npy inputs (whole, or row batches streamed from disk) and writing per-row results,
//! with errors that name the file and the problem.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use npyz::{DType, Endianness, NpyHeader, Order, TypeChar};

use crate::CliError;

/// The element types xent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    I32,
    I64,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Elem::F32 | Elem::F64)
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F64 => "float64",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
        }
    }
}

/// An opened .npy file, positioned at its next unread element.
pub struct NpyInput {
    /// "logits", "targets" or "weights", for messages.
    pub role: &'static str,
    pub path: PathBuf,
    pub elem: Elem,
    pub shape: Vec<usize>,
    big_endian: bool,
    reader: BufReader<File>,
}

impl NpyInput {
    /// Opens `path` and checks everything that can be checked before reading the data: the
    /// header, the dtype, C order, and that the file holds exactly the data the header promises.
    pub fn open(role: &'static str, path: &Path) -> Result<Self, CliError> {
        let fail =
            |problem: String| CliError::input(format!("{role} {}: {problem}", path.display()));
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| fail(format!("cannot read: {e}")))?
            .len();
        let mut reader = BufReader::new(file);
        let header = NpyHeader::from_reader(&mut reader)
            .map_err(|e| fail(format!("not a valid .npy file ({e})")))?;
        let data_start = reader
            .stream_position()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        let (elem, big_endian) = element_type(&header.dtype()).ok_or_else(|| {
            fail(format!(
                "unsupported dtype {}; xent reads float32, float64, int32 and int64",
                describe_dtype(&header.dtype())
            ))
        })?;
        if header.order() == Order::Fortran && header.shape().len() > 1 {
            return Err(fail("Fortran-ordered arrays are not supported; save with C order (np.ascontiguousarray)".into()));
        }
        let shape: Vec<usize> = header.shape().iter().map(|&d| d as usize).collect();
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let expected = elements
            .and_then(|n| n.checked_mul(elem.size() as u64))
            .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
        let found = file_len - data_start;
        if found < expected {
            return Err(fail(format!(
                "truncated: shape {shape:?} of {} needs {expected} bytes of data, the file has {found}",
                elem.name()
            )));
        }
        if found > expected {
            return Err(fail(format!(
                "{} bytes after the data for shape {shape:?}; not a valid .npy file",
                found - expected
            )));
        }
        Ok(Self {
            role,
            path: path.to_path_buf(),
            elem,
            shape,
            big_endian,
            reader,
        })
    }

    /// "targets T.npy", for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.role, self.path.display())
    }

    pub fn error(&self, problem: impl std::fmt::Display) -> CliError {
        CliError::input(format!("{}: {problem}", self.label()))
    }

    fn read_raw(&mut self, count: usize) -> Result<Vec<u8>, CliError> {
        let mut bytes = vec![0u8; count * self.elem.size()];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|e| self.error(format!("cannot read the data: {e}")))?;
        Ok(bytes)
    }

    /// The next `count` values as f32 (float64 is rounded to float32, as the GPU computes in f32).
    pub fn read_f32(&mut self, count: usize) -> Result<Vec<f32>, CliError> {
        let bytes = self.read_raw(count)?;
        let be = self.big_endian;
        match self.elem {
            Elem::F32 => Ok(decode(&bytes, be, f32::from_le_bytes, f32::from_be_bytes)),
            Elem::F64 => Ok(decode(&bytes, be, f64::from_le_bytes, f64::from_be_bytes)
                .into_iter()
                .map(|v| v as f32)
                .collect()),
            Elem::I32 | Elem::I64 => Err(self.error(format!(
                "expected floating-point values, found {}",
                self.elem.name()
            ))),
        }
    }

    /// The next `count` values as i64 (class indices).
    pub fn read_i64(&mut self, count: usize) -> Result<Vec<i64>, CliError> {
        let bytes = self.read_raw(count)?;
        let be = self.big_endian;
        match self.elem {
            Elem::I32 => Ok(decode(&bytes, be, i32::from_le_bytes, i32::from_be_bytes)
                .into_iter()
                .map(i64::from)
                .collect()),
            Elem::I64 => Ok(decode(&bytes, be, i64::from_le_bytes, i64::from_be_bytes)),
            Elem::F32 | Elem::F64 => {
                Err(self.error(format!("expected integers, found {}", self.elem.name())))
            }
        }
    }
}

/// Decodes whole N-byte values in the file's byte order.
fn decode<const N: usize, T>(
    bytes: &[u8],
    big_endian: bool,
    little: fn([u8; N]) -> T,
    big: fn([u8; N]) -> T,
) -> Vec<T> {
    let from = if big_endian { big } else { little };
    bytes
        .chunks_exact(N)
        .map(|b| from(b.try_into().unwrap_or([0; N])))
        .collect()
}

fn element_type(dtype: &DType) -> Option<(Elem, bool)> {
    let DType::Plain(t) = dtype else { return None };
    let elem = match (t.type_char(), t.size_field()) {
        (TypeChar::Float, 4) => Elem::F32,
        (TypeChar::Float, 8) => Elem::F64,
        (TypeChar::Int, 4) => Elem::I32,
        (TypeChar::Int, 8) => Elem::I64,
        _ => return None,
    };
    Some((elem, t.endianness() == Endianness::Big))
}

fn describe_dtype(dtype: &DType) -> String {
    match dtype {
        DType::Plain(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

/// Writes per-row values as a 1-D .npy of float32 or float64.
pub fn write_per_row(path: &Path, values: &[f64], as_f64: bool) -> Result<(), CliError> {
    let result = if as_f64 {
        npyz::to_file_1d(path, values.iter().copied())
    } else {
        npyz::to_file_1d(path, values.iter().map(|&v| v as f32))
    };
    result.map_err(|e| CliError::input(format!("--per-row {}: cannot write: {e}", path.display())))
}
