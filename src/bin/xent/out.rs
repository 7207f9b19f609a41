//! Standard output for results, with write errors as [`CliError`]s rather than panics
//! (`println!` panics when stdout is closed or full), and JSON numbers that keep infinities.

use std::fmt;
use std::io::{self, Write};

use crate::CliError;

/// Writes a line to an [`Out`]: `outln!(out, "loss: {loss}")?`.
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Locked standard output. Every write reports its error; [`Out::finish`] flushes.
pub struct Out(io::StdoutLock<'static>);

impl Out {
    /// Locks stdout for this command's results.
    pub fn lock() -> Self {
        Self(io::stdout().lock())
    }

    /// Writes `args` and a newline.
    pub fn line(&mut self, args: fmt::Arguments<'_>) -> Result<(), CliError> {
        writeln!(self.0, "{args}").map_err(CliError::stdout)
    }

    /// Flushes what is still buffered; the last chance to see a write error.
    pub fn finish(mut self) -> Result<(), CliError> {
        self.0.flush().map_err(CliError::stdout)
    }
}

/// A JSON number, or for values JSON has no number for, the strings `"inf"`, `"-inf"` and
/// `"nan"` (serde_json would write `null`, which xent keeps for values that are absent).
pub fn json_f64(v: f64) -> serde_json::Value {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        v.into()
    }
}

/// [`json_f64`] of a value that may be absent (`null`).
pub fn json_opt(v: Option<f64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, json_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_are_strings_and_absent_is_null() {
        assert_eq!(json_f64(1.5), serde_json::json!(1.5));
        assert_eq!(json_f64(f64::INFINITY), serde_json::json!("inf"));
        assert_eq!(json_f64(f64::NEG_INFINITY), serde_json::json!("-inf"));
        assert_eq!(json_f64(f64::NAN), serde_json::json!("nan"));
        assert_eq!(json_opt(None), serde_json::Value::Null);
        assert_eq!(json_opt(Some(f64::NAN)), serde_json::json!("nan"));
    }
}
