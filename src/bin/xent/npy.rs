//! Reading .npy inputs (whole, or row batches streamed from disk or a pipe) and writing
//! per-row results as they come, with errors that name the file and the problem.
//!
//! The header is parsed here, not by npyz: npyz's header parser (py_literal's grammar) takes
//! time exponential in the nesting depth of brackets, so a 176-byte header with `[]` nested
//! 22 deep took 45 s. This parser reads each byte once, and takes only what NumPy writes and
//! accepts: a dict of exactly 'descr', 'fortran_order' and 'shape'.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use xent::{Dtype, ElementVec, bf16, f16};

use crate::CliError;

/// The largest header accepted (NumPy itself refuses headers over 10,000 bytes by default).
const MAX_HEADER_BYTES: usize = 64 << 10;
/// The most dimensions a shape may have (NumPy's limit before 2.0).
const MAX_DIMS: usize = 32;
/// The deepest nesting of brackets accepted inside the header.
const MAX_DEPTH: usize = 8;

/// The element types xent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    F16,
    /// bfloat16: what NumPy writes for ml_dtypes' bfloat16 (`'<V2'`: its dtype character is
    /// void, so np.save keeps only the size), or a header whose descr is `'bfloat16'`.
    Bf16,
    /// uint16: raw bits of a half type named by `--logits-dtype`.
    U16,
    I32,
    I64,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F16 | Elem::Bf16 | Elem::U16 => 2,
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 | Elem::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Elem::F32 | Elem::F64 | Elem::F16 | Elem::Bf16)
    }

    /// The integer types read as class indices, tokens and counts (uint16 is not one: it
    /// holds raw half bits).
    pub fn is_int(self) -> bool {
        matches!(self, Elem::I32 | Elem::I64)
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F64 => "float64",
            Elem::F16 => "float16",
            Elem::Bf16 => "bfloat16",
            Elem::U16 => "uint16",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
        }
    }

    /// The dtype xent computes with for values of this type (float64 is rounded to f32).
    pub fn dtype(self) -> Option<Dtype> {
        match self {
            Elem::F32 | Elem::F64 => Some(Dtype::F32),
            Elem::F16 => Some(Dtype::F16),
            Elem::Bf16 => Some(Dtype::Bf16),
            Elem::U16 | Elem::I32 | Elem::I64 => None,
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
    /// Values read so far (where the next read starts), for messages naming a row.
    consumed: usize,
}

impl NpyInput {
    /// Opens `path` and checks everything that can be checked before reading the data: the
    /// header, the dtype, C order, and that the file holds exactly the data the header promises.
    pub fn open(role: &'static str, path: &Path) -> Result<Self, CliError> {
        let fail =
            |problem: String| CliError::input(format!("{role} {}: {problem}", path.display()));
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let metadata = file
            .metadata()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if metadata.is_dir() {
            return Err(fail("is a directory, not an .npy file".into()));
        }
        let mut reader = BufReader::new(file);
        let header =
            read_header(&mut reader).map_err(|e| fail(format!("not a valid .npy file ({e})")))?;
        let (elem, big_endian) = element_type(&header.descr).ok_or_else(|| {
            fail(format!(
                "unsupported dtype {}; xent reads float32, float64, float16, bfloat16 ('<V2' as \
                 np.save writes ml_dtypes' bfloat16), uint16 (with --logits-dtype), int32 and int64",
                header.descr
            ))
        })?;
        if header.fortran_order && header.shape.len() > 1 {
            return Err(fail("Fortran-ordered arrays are not supported; save with C order (np.ascontiguousarray)".into()));
        }
        let shape = header.shape;
        let expected = shape
            .iter()
            .try_fold(elem.size() as u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
        // A regular file is checked whole now; a pipe as it is read (NpyInput::finish).
        if metadata.is_file() {
            let found = metadata.len().saturating_sub(header.data_start);
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
        }
        Ok(Self {
            role,
            path: path.to_path_buf(),
            elem,
            shape,
            big_endian,
            reader,
            consumed: 0,
        })
    }

    /// Checks that nothing follows the data (for pipes, whose length is only known at the end).
    pub fn finish(&mut self) -> Result<(), CliError> {
        match self.reader.read(&mut [0u8]) {
            Ok(0) => Ok(()),
            Ok(_) => Err(self.error(format!(
                "bytes after the data for shape {:?}; not a valid .npy file",
                self.shape
            ))),
            Err(e) => Err(self.error(format!("cannot read: {e}"))),
        }
    }

    /// "targets T.npy", for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.role, self.path.display())
    }

    pub fn error(&self, problem: impl std::fmt::Display) -> CliError {
        CliError::input(format!("{}: {problem}", self.label()))
    }

    /// Where the value `index` (counted from the start of the data) lies: "row R, column K"
    /// of a 2-D array, "value I" otherwise.
    fn position(&self, index: usize) -> String {
        match self.shape.as_slice() {
            &[_, width] if width > 0 => {
                format!("row {}, column {}", index / width, index % width)
            }
            _ => format!("value {index}"),
        }
    }

    fn read_raw(&mut self, count: usize) -> Result<Vec<u8>, CliError> {
        self.consumed += count;
        let mut bytes = vec![0u8; count * self.elem.size()];
        self.reader.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                self.error(format!(
                    "truncated: the data ends before the {} values of shape {:?}",
                    self.elem.name(),
                    self.shape
                ))
            } else {
                self.error(format!("cannot read the data: {e}"))
            }
        })?;
        Ok(bytes)
    }

    /// The next `count` values as f32 (float64 is rounded to float32, as the GPU computes in
    /// f32; halves are widened exactly).
    pub fn read_f32(&mut self, count: usize) -> Result<Vec<f32>, CliError> {
        match self.read_values(count, None)? {
            ElementVec::F32(v) => Ok(v),
            halves => Ok(halves.to_f32()),
        }
    }

    /// The next `count` values in their own dtype (float64 rounded to f32); uint16 raw bits as
    /// the half type `bits_as`.
    pub fn read_values(
        &mut self,
        count: usize,
        bits_as: Option<Dtype>,
    ) -> Result<ElementVec, CliError> {
        let elem = match (self.elem, bits_as) {
            (Elem::U16, Some(Dtype::Bf16)) => Elem::Bf16,
            (Elem::U16, Some(Dtype::F16)) => Elem::F16,
            (e, _) => e,
        };
        let first = self.consumed;
        let bytes = self.read_raw(count)?;
        let be = self.big_endian;
        let halves = || decode(&bytes, be, u16::from_le_bytes, u16::from_be_bytes);
        match elem {
            Elem::F32 => Ok(ElementVec::F32(decode(
                &bytes,
                be,
                f32::from_le_bytes,
                f32::from_be_bytes,
            ))),
            Elem::F64 => {
                let wide = decode(&bytes, be, f64::from_le_bytes, f64::from_be_bytes);
                let narrow: Vec<f32> = wide.iter().map(|&v| v as f32).collect();
                // A finite value that float32 cannot hold would silently become ±inf.
                if let Some(i) =
                    (0..wide.len()).find(|&i| narrow[i].is_infinite() && wide[i].is_finite())
                {
                    return Err(self.error(format!(
                        "{}: float64 value {:e} is beyond the float32 range (±3.4e38); xent computes in float32",
                        self.position(first + i),
                        wide[i]
                    )));
                }
                Ok(ElementVec::F32(narrow))
            }
            Elem::F16 => Ok(ElementVec::F16(
                halves().into_iter().map(f16::from_bits).collect(),
            )),
            Elem::Bf16 => Ok(ElementVec::Bf16(
                halves().into_iter().map(bf16::from_bits).collect(),
            )),
            Elem::U16 => {
                Err(self
                    .error("holds uint16: raw bits of a half type need --logits-dtype bf16 or f16"))
            }
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
            _ => Err(self.error(format!(
                "expected integers (int64 or int32), found {}",
                self.elem.name()
            ))),
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

/// The element type and byte order (`true` for big-endian) of a dtype string NumPy writes
/// for xent's types: `<f4`, `>f8`, `<i4`, `|i8` and the like.
fn element_type(descr: &Descr) -> Option<(Elem, bool)> {
    let Descr::Plain(text) = descr else {
        return None;
    };
    let (order, code) = match text.as_bytes().first()? {
        b'<' | b'>' | b'|' | b'=' => text.split_at(1),
        _ => ("=", text.as_str()),
    };
    let elem = match code {
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        "f2" => Elem::F16,
        "V2" | "bfloat16" => Elem::Bf16,
        "u2" => Elem::U16,
        "i4" => Elem::I32,
        "i8" => Elem::I64,
        _ => return None,
    };
    let big_endian = match order {
        ">" => true,
        "<" => false,
        _ => cfg!(target_endian = "big"),
    };
    Some((elem, big_endian))
}

/// The dtype of a header: a string such as `'<f4'`, or a list (a structured dtype).
enum Descr {
    Plain(String),
    Structured,
}

impl std::fmt::Display for Descr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Descr::Plain(text) => write!(f, "{}", shorten(&format!("{text:?}"))),
            Descr::Structured => write!(f, "(a structured dtype)"),
        }
    }
}

/// What the header says.
struct Header {
    descr: Descr,
    fortran_order: bool,
    shape: Vec<usize>,
    /// Where the data starts: the bytes before it.
    data_start: u64,
}

/// Reads the magic string, the version, the header length and the header, and checks the
/// header's dict; the reader is left at the first byte of data.
fn read_header(r: &mut impl Read) -> Result<Header, String> {
    let mut fill = |buf: &mut [u8], what: &str| {
        r.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => format!("truncated: the file ends inside {what}"),
            _ => format!("cannot read {what}: {e}"),
        })
    };
    let mut start = [0u8; 8];
    fill(&mut start, "the magic string")?;
    if &start[..6] != b"\x93NUMPY" {
        return Err("it does not start with the .npy magic string".into());
    }
    let length_bytes = match (start[6], start[7]) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        (major, minor) => return Err(format!("unknown .npy version {major}.{minor}")),
    };
    let mut length = [0u8; 4];
    fill(&mut length[..length_bytes], "the header length")?;
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_HEADER_BYTES {
        return Err(format!(
            "a header of {length} bytes; xent reads headers of at most {MAX_HEADER_BYTES}"
        ));
    }
    let mut text = vec![0u8; length];
    fill(&mut text, &format!("the header of {length} bytes"))?;
    let mut header = parse_header(&text)?;
    header.data_start = (8 + length_bytes + length) as u64;
    Ok(header)
}

/// A Python literal as far as .npy headers use them.
enum Literal {
    Str(String),
    Int(i64),
    Bool(bool),
    /// A tuple (`true`) or a list (`false`).
    Seq(Vec<Literal>, bool),
}

/// Checks the header's dict: exactly the keys 'descr', 'fortran_order' and 'shape', with a
/// dtype, a bool and a tuple of at most 32 non-negative ints.
fn parse_header(text: &[u8]) -> Result<Header, String> {
    let mut parser = Parser { text, pos: 0 };
    let entries = parser.dict()?;
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    for (key, value) in entries {
        let slot = match key.as_str() {
            "descr" => &mut descr,
            "fortran_order" => &mut fortran_order,
            "shape" => &mut shape,
            _ => {
                return Err(format!(
                    "the header has a key {}; a .npy header has exactly 'descr', 'fortran_order' and 'shape'",
                    shorten(&format!("{key:?}"))
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("the header has the key '{key}' twice"));
        }
    }
    let missing = |key| format!("the header has no '{key}'");
    let descr = match descr.ok_or_else(|| missing("descr"))? {
        Literal::Str(s) => Descr::Plain(s),
        Literal::Seq(_, false) => Descr::Structured,
        _ => return Err("the header's 'descr' is not a dtype".into()),
    };
    let Literal::Bool(fortran_order) = fortran_order.ok_or_else(|| missing("fortran_order"))?
    else {
        return Err("the header's 'fortran_order' is not True or False".into());
    };
    let Literal::Seq(dims, true) = shape.ok_or_else(|| missing("shape"))? else {
        return Err("the header's 'shape' is not a tuple".into());
    };
    if dims.len() > MAX_DIMS {
        return Err(format!(
            "the shape has {} dimensions; at most {MAX_DIMS} are allowed",
            dims.len()
        ));
    }
    let shape =
        dims.iter()
            .map(|d| match d {
                Literal::Int(n) => usize::try_from(*n)
                    .map_err(|_| format!("the shape has a negative dimension {n}")),
                _ => Err("the shape holds something other than integers".into()),
            })
            .collect::<Result<_, _>>()?;
    Ok(Header {
        descr,
        fortran_order,
        shape,
        data_start: 0,
    })
}

/// A one-pass parser of the Python literals in a header: every byte is looked at once, and
/// brackets nest at most [`MAX_DEPTH`] deep, so time and stack are linear and bounded.
struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&mut self) -> Option<u8> {
        while self.text.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
        self.text.get(self.pos).copied()
    }

    fn unexpected(&self) -> String {
        match self.text.get(self.pos) {
            Some(&b) => format!(
                "unexpected {} at byte {} of the header",
                shorten(&format!("{:?}", b as char)),
                self.pos
            ),
            None => "the header ends early".to_string(),
        }
    }

    /// Consumes `byte` (after white space) if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        self.pos += usize::from(next);
        next
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    /// `{key: value, ...}` with string keys, then only white space.
    fn dict(&mut self) -> Result<Vec<(String, Literal)>, String> {
        self.expect(b'{')?;
        let mut entries = Vec::new();
        while !self.eat(b'}') {
            let Literal::Str(key) = self.value(1)? else {
                return Err("a key of the header is not a string".into());
            };
            self.expect(b':')?;
            entries.push((key, self.value(1)?));
            if !self.eat(b',') {
                self.expect(b'}')?;
                break;
            }
        }
        if self.peek().is_some() {
            return Err(self.unexpected());
        }
        Ok(entries)
    }

    fn value(&mut self, depth: usize) -> Result<Literal, String> {
        match self.peek() {
            Some(quote @ (b'\'' | b'"')) => self.string(quote),
            Some(open @ (b'(' | b'[')) => {
                if depth >= MAX_DEPTH {
                    return Err(format!(
                        "brackets nested more than {MAX_DEPTH} deep in the header"
                    ));
                }
                self.pos += 1;
                self.sequence(if open == b'(' { b')' } else { b']' }, depth + 1)
            }
            Some(b'-' | b'0'..=b'9') => self.int(),
            Some(b'T' | b'F') => self.bool(),
            _ => Err(self.unexpected()),
        }
    }

    /// The items up to `close`. A parenthesised single item without a comma is that item,
    /// as in Python: `(3)` is 3, `(3,)` a tuple.
    fn sequence(&mut self, close: u8, depth: usize) -> Result<Literal, String> {
        let mut items = Vec::new();
        let mut comma = false;
        while !self.eat(close) {
            items.push(self.value(depth)?);
            comma = self.eat(b',');
            if !comma {
                self.expect(close)?;
                break;
            }
        }
        let tuple = close == b')';
        if tuple && items.len() == 1 && !comma {
            return Ok(items.remove(0));
        }
        Ok(Literal::Seq(items, tuple))
    }

    /// A string without escapes (a backslash is refused; dtype strings have none).
    fn string(&mut self, quote: u8) -> Result<Literal, String> {
        let start = self.pos + 1;
        let len = self.text[start..]
            .iter()
            .position(|&b| b == quote || b == b'\\')
            .ok_or("a string in the header is not closed")?;
        if self.text[start + len] == b'\\' {
            return Err("a string in the header has a backslash escape".into());
        }
        self.pos = start + len + 1;
        Ok(Literal::Str(
            String::from_utf8_lossy(&self.text[start..start + len]).into_owned(),
        ))
    }

    fn int(&mut self) -> Result<Literal, String> {
        let start = self.pos;
        let negative = self.text[start] == b'-';
        let digits_start = start + usize::from(negative);
        let digits = self.text[digits_start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        self.pos = digits_start + digits;
        let text = std::str::from_utf8(&self.text[start..self.pos]).unwrap_or_default();
        match text.parse::<i64>() {
            Ok(n) => Ok(Literal::Int(n)),
            Err(_) if digits == 0 => Err(self.unexpected()),
            Err(_) => Err(format!(
                "the number {} in the header is too large",
                shorten(text)
            )),
        }
    }

    fn bool(&mut self) -> Result<Literal, String> {
        for (word, value) in [(&b"True"[..], true), (b"False", false)] {
            if self.text[self.pos..].starts_with(word) {
                self.pos += word.len();
                return Ok(Literal::Bool(value));
            }
        }
        Err(self.unexpected())
    }
}

/// `text`, cut to 40 characters for a message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// An output .npy written as batches finish (`--per-row`'s losses, `--grad`'s gradient): the
/// header (the final shape is known up front) comes first, then each batch's values in row
/// order, so nothing per row is kept in memory.
///
/// A file (new or existing) is written to a temporary file beside it, renamed over it by
/// [`NpyWriter::finish_all`] once every output is complete: a run that fails leaves no partial
/// file and an existing file as it was (the temporary file is removed when the writer is
/// dropped unfinished). A link is followed, and the file it names is replaced. A pipe or
/// device (`/dev/stdout`) cannot be renamed over and is written directly.
pub struct NpyWriter {
    /// The option that named the file ("--per-row", "--grad"), for messages.
    flag: &'static str,
    /// The path as given, for messages.
    path: PathBuf,
    /// The temporary file and the file it replaces; `None` when writing directly to `path`.
    temp: Option<(PathBuf, PathBuf)>,
    writer: BufWriter<File>,
    /// The values' type: `<f8`, `<f4`, `<f2` or `<V2` (bfloat16, as np.save writes it).
    descr: &'static str,
    /// Values still to come.
    remaining: usize,
    finished: bool,
}

impl NpyWriter {
    /// Creates `path` and writes the header of a float32 array (float64 with `as_f64`) of
    /// `shape`, in C order.
    pub fn create(
        flag: &'static str,
        path: &Path,
        shape: &[usize],
        as_f64: bool,
    ) -> Result<Self, CliError> {
        Self::create_with(flag, path, shape, if as_f64 { "<f8" } else { "<f4" })
    }

    /// [`NpyWriter::create`] for values of `dtype`: `<f4`, `<f2`, or `<V2` for bfloat16 (what
    /// np.save writes for ml_dtypes' bfloat16; read it back with `.view(ml_dtypes.bfloat16)`).
    pub fn create_as(
        flag: &'static str,
        path: &Path,
        shape: &[usize],
        dtype: Dtype,
    ) -> Result<Self, CliError> {
        let descr = match dtype {
            Dtype::F32 => "<f4",
            Dtype::F16 => "<f2",
            Dtype::Bf16 => "<V2",
        };
        Self::create_with(flag, path, shape, descr)
    }

    fn create_with(
        flag: &'static str,
        path: &Path,
        shape: &[usize],
        descr: &'static str,
    ) -> Result<Self, CliError> {
        let fail = |e| write_error(flag, path, e);
        let (file, temp) = match std::fs::metadata(path) {
            // A pipe, a device, or a directory (which fails here with its own message).
            Ok(m) if !m.is_file() => (File::create(path).map_err(fail)?, None),
            existing => {
                let target = destination(path);
                if let Ok(m) = &existing {
                    // An existing file must be writable, as it would be written in place.
                    OpenOptions::new().write(true).open(&target).map_err(fail)?;
                    let (file, temp) = create_temp(&target).map_err(fail)?;
                    let _ = file.set_permissions(m.permissions());
                    (file, Some((temp, target)))
                } else {
                    let (file, temp) = create_temp(&target).map_err(fail)?;
                    (file, Some((temp, target)))
                }
            }
        };
        let mut writer = Self {
            flag,
            path: path.to_path_buf(),
            temp,
            writer: BufWriter::new(file),
            descr,
            remaining: shape.iter().product(),
            finished: false,
        };
        let dims: String = match shape {
            [n] => format!("{n},"),
            _ => shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
        // Magic (6), version (2), length (2), dict, padding, newline: a multiple of 64 bytes.
        let padded = (10 + dict.len() + 1).next_multiple_of(64) - 10;
        let mut header = b"\x93NUMPY\x01\x00".to_vec();
        header.extend_from_slice(&(padded as u16).to_le_bytes());
        header.extend_from_slice(dict.as_bytes());
        header.resize(10 + padded - 1, b' ');
        header.push(b'\n');
        writer.put(&header)?;
        Ok(writer)
    }

    /// Appends the next values (rounded to float32 unless the file is float64).
    pub fn write(&mut self, values: &[f64]) -> Result<(), CliError> {
        self.remaining = self.remaining.saturating_sub(values.len());
        let bytes: Vec<u8> = if self.descr == "<f8" {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect()
        };
        self.put(&bytes)
    }

    /// Appends the next values, of the file's dtype (little-endian, as the platforms wgpu runs
    /// on lay them out).
    pub fn write_values(&mut self, values: &ElementVec) -> Result<(), CliError> {
        debug_assert_ne!(self.descr, "<f8", "values into a float64 file");
        self.remaining = self.remaining.saturating_sub(values.len());
        if cfg!(target_endian = "big") {
            return Err(CliError::runtime(
                "writing .npy values needs a little-endian host",
            ));
        }
        self.put(values.bytes())
    }

    /// Completes a run's outputs together: every file is flushed first, and only then is each
    /// renamed into place, so a failure while flushing leaves every destination untouched.
    pub fn finish_all(writers: impl IntoIterator<Item = NpyWriter>) -> Result<(), CliError> {
        let mut writers: Vec<NpyWriter> = writers.into_iter().collect();
        for w in &mut writers {
            debug_assert_eq!(w.remaining, 0, "the header promised more values");
            w.writer
                .flush()
                .map_err(|e| write_error(w.flag, &w.path, e))?;
        }
        for w in &mut writers {
            if let Some((temp, target)) = &w.temp {
                std::fs::rename(temp, target).map_err(|e| write_error(w.flag, &w.path, e))?;
            }
            w.finished = true;
        }
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CliError> {
        self.writer
            .write_all(bytes)
            .map_err(|e| write_error(self.flag, &self.path, e))
    }
}

impl Drop for NpyWriter {
    fn drop(&mut self) {
        if let (false, Some((temp, _))) = (self.finished, &self.temp) {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// The file `path` names once links are followed (a link to a file not yet there included).
fn destination(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // As many links as Linux follows (a loop ends here too).
    for _ in 0..40 {
        let Ok(link) = std::fs::read_link(&p) else {
            break;
        };
        p = match p.parent() {
            Some(dir) => dir.join(link),
            None => link,
        };
    }
    p
}

/// A new temporary file beside `target`, in its directory (so that a rename replaces it).
fn create_temp(target: &Path) -> std::io::Result<(File, PathBuf)> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = target
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy());
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}.xent-{}-{n}.tmp", std::process::id()));
        match File::create_new(&temp) {
            Ok(file) => return Ok((file, temp)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether two output paths are one file: the same name, the same file once links are
/// followed (also a link to a file not yet there), or the same existing file.
pub fn same_output(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| {
        let d = destination(p);
        let dir = match d.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        match (std::fs::canonicalize(dir), d.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            _ => d,
        }
    };
    a == b || resolved(a) == resolved(b) || same_file(a, b)
}

fn write_error(flag: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::input(format!("{flag} {}: cannot write: {e}", path.display()))
}

/// Whether `a` and `b` are the same existing regular file (through links too).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if !(ma.is_file() && mb.is_file()) {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dict: &str) -> Result<Header, String> {
        parse_header(dict.as_bytes())
    }

    #[test]
    fn numpy_headers_parse() {
        let h = header("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }   \n").unwrap();
        assert_eq!(h.shape, [4, 3]);
        assert!(!h.fortran_order);
        assert_eq!(element_type(&h.descr), Some((Elem::F32, false)));
        let h = header("{\"shape\": (7,), \"fortran_order\": True, \"descr\": \">i8\"}").unwrap();
        assert_eq!(h.shape, [7]);
        assert_eq!(element_type(&h.descr), Some((Elem::I64, true)));
        // Half types: float16, ml_dtypes' bfloat16 as np.save writes it (void, 2 bytes) or
        // named, and uint16 bits.
        for (descr, elem) in [
            ("<f2", Elem::F16),
            ("<V2", Elem::Bf16),
            ("|V2", Elem::Bf16),
            ("bfloat16", Elem::Bf16),
            ("<u2", Elem::U16),
        ] {
            let h = header(&format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 3), }}"
            ))
            .unwrap();
            assert_eq!(element_type(&h.descr).map(|e| e.0), Some(elem), "{descr}");
        }
        for other in ["<V4", "<f1", "<u4"] {
            let h = header(&format!(
                "{{'descr': '{other}', 'fortran_order': False, 'shape': (2,), }}"
            ))
            .unwrap();
            assert_eq!(element_type(&h.descr), None, "{other}");
        }
        assert!(
            header("{'descr': '<f8', 'fortran_order': False, 'shape': ()}")
                .unwrap()
                .shape
                .is_empty()
        );
        let structured = header(
            "{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (2,)}",
        )
        .unwrap();
        assert!(matches!(structured.descr, Descr::Structured));
    }

    #[test]
    fn what_numpy_refuses_is_refused() {
        let bad = [
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), 'x': []}",
                "key \"x\"",
            ),
            ("{'descr': '<f4', 'fortran_order': False}", "no 'shape'"),
            (
                "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                "twice",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4)}",
                "not a tuple",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': [4]}",
                "not a tuple",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 3)}",
                "negative",
            ),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
                "True or False",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
                "too large",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x",
                "unexpected",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,",
                "ends early",
            ),
            ("{'descr': '<f\\x34'}", "backslash"),
        ];
        for (text, fragment) in bad {
            let e = header(text)
                .err()
                .unwrap_or_else(|| panic!("{text} was accepted"));
            assert!(e.contains(fragment), "{text}: {e:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn hostile_headers_fail_fast_with_short_messages() {
        let nested = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': {}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let e = header(&nested).err().unwrap();
        assert!(e.contains("nested"), "{e}");
        let dims = vec!["1"; 40_000].join(", ");
        let wide = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims},)}}");
        let e = header(&wide).err().unwrap();
        assert!(e.contains("40000 dimensions") && e.len() < 100, "{e}");
        let long_key = format!("{{'{}': 1}}", "k".repeat(5000));
        let e = header(&long_key).err().unwrap();
        assert!(e.len() < 200, "{e}");
    }
}
