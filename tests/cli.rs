//! The `xent` binary: every golden case through `score` (GPU and --cpu) against PyTorch's
//! values, every kind of bad input (status 2, one line naming the file or argument, nothing
//! on stdout), hostile inputs (headers, shapes, pipes, closed stdout), and `info`, `demo` and
//! `bench` running; training: `--grad` against PyTorch's gradients in one batch and in
//! several, `--grad-output`, `--z-loss` and `--softcap` against the library; float16 and
//! bfloat16 logits and probabilities, `--logits-dtype`, and `--grad` in the logits' dtype.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use common::{GoldenCase, close, golden_case, golden_cases, read_npy};
use npyz::WriterBuilder;

fn xent(args: &[&str]) -> Output {
    xent_with(args, &[], None)
}

/// Runs xent with `args`, environment variables `env`, and `stdin` read from a file.
fn xent_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&Path>) -> Output {
    let mut cmd = Command::cargo_bin("xent").expect("the xent binary");
    cmd.args(args);
    if std::env::var("XENT_SKIP_GPU_TESTS").as_deref() == Ok("1") && !args.contains(&"--cpu") {
        cmd.env("XENT_SKIP_GPU_TESTS", "1");
    }
    cmd.envs(env.iter().copied());
    if let Some(file) = stdin {
        cmd.pipe_stdin(file).expect("stdin file");
    }
    cmd.output().expect("xent runs")
}

/// Checks a failed run: `status`, nothing on stdout, one line on stderr (Mesa's
/// XDG_RUNTIME_DIR notes aside) that starts with "xent: " and holds every fragment.
fn expect_failure(o: &Output, status: i32, fragments: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(status), "stderr: {err}");
    assert!(stdout(o).is_empty(), "a failed run printed {}", stdout(o));
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got {err}");
    assert!(lines[0].starts_with("xent: "), "{}", lines[0]);
    for f in fragments {
        assert!(lines[0].contains(f), "{:?} lacks {f:?}", lines[0]);
    }
    lines[0].to_string()
}

fn gpu_available() -> bool {
    common::gpu().is_some()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "xent failed: {}", stderr(o));
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn score_args<'a>(case: &'a GoldenCase, extra: &[&'a str]) -> Vec<String> {
    score_args_with_logits(case, &case.dir.join("logits.npy"), extra)
}

/// [`score_args`] with the logits from `logits` rather than the case's own file.
fn score_args_with_logits(case: &GoldenCase, logits: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "score".into(),
        "--logits".into(),
        logits.display().to_string(),
        "--targets".into(),
        case.dir.join("targets.npy").display().to_string(),
        "--json".into(),
    ];
    if case.meta["class_weights"].as_bool() == Some(true) {
        args.push("--weights".into());
        args.push(case.dir.join("weights.npy").display().to_string());
    }
    if let Some(i) = case.meta["ignore_index"].as_i64() {
        args.push(format!("--ignore-index={i}"));
    }
    args.push(format!(
        "--label-smoothing={}",
        case.number("label_smoothing")
    ));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn golden_cases_through_score() {
    let dir = tempfile::tempdir().unwrap();
    let paths: &[&[&str]] = if gpu_available() {
        &[&[], &["--cpu"]]
    } else {
        &[&["--cpu"]]
    };
    for case in golden_cases("cross_entropy") {
        let want_rows: Vec<f64> = case.f64s("loss_none.npy");
        for path_args in paths {
            let out_file = dir.path().join(format!("{}.npy", case.name));
            for (reduction, key) in [("mean", "mean"), ("sum", "sum")] {
                let mut extra = vec!["--reduction", reduction];
                extra.extend_from_slice(path_args);
                let per_row = out_file.display().to_string();
                if reduction == "mean" {
                    extra.extend(["--per-row", per_row.as_str()]);
                }
                let args = score_args(&case, &extra);
                let out = json(&xent(&args.iter().map(String::as_str).collect::<Vec<_>>()));
                let want = case.number(key);
                let got = out["loss"].as_f64().unwrap_or(f64::NAN);
                // The per-row tolerance of common::row_tolerance, summed, bounds the reductions;
                // 1e-4 relative is well above it for every golden case.
                assert!(
                    close(got, want, 1e-4 * want.abs().max(1.0)),
                    "{} {path_args:?} {reduction}: {got} vs {want}",
                    case.name
                );
                assert_eq!(out["rows"], case.meta["rows"]);
                assert_eq!(out["classes"], case.meta["classes"]);
                if reduction == "mean" {
                    let rows: Vec<f32> = read_npy(&out_file);
                    assert_eq!(rows.len(), want_rows.len());
                    for (i, (&g, &w)) in rows.iter().zip(&want_rows).enumerate() {
                        assert!(
                            close(g as f64, w, 1e-4 * w.abs().max(1.0)),
                            "{} row {i}: {g} vs {w}",
                            case.name
                        );
                    }
                }
            }
        }
        let none = json(&xent(
            &score_args(&case, &["--reduction", "none", "--cpu"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ));
        assert!(
            none["loss"].is_null(),
            "{}: reduction none has no loss",
            case.name
        );
    }
}

/// Writes an .npy of `shape` with `data`.
fn write_npy<T: npyz::AutoSerialize + npyz::Serialize>(path: &Path, shape: &[u64], data: &[T]) {
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(std::fs::File::create(path).unwrap())
        .begin_nd()
        .unwrap();
    writer.extend(data.iter()).unwrap();
    writer.finish().unwrap();
}

/// Float64 logits and int32 class indices are read too; per-row output follows the logits' type.
#[test]
fn float64_logits_and_int32_targets() {
    let case = golden_case("hard_31x1000");
    let dir = tempfile::tempdir().unwrap();
    let z64: Vec<f64> = case.f32s("logits.npy").iter().map(|&v| v as f64).collect();
    let y32: Vec<i32> = case.i64s("targets.npy").iter().map(|&v| v as i32).collect();
    let (zp, yp, out) = (
        dir.path().join("z.npy"),
        dir.path().join("y.npy"),
        dir.path().join("l.npy"),
    );
    write_npy(&zp, &[31, 1000], &z64);
    write_npy(&yp, &[31], &y32);
    let o = json(&xent(&[
        "score",
        "--logits",
        path(&zp),
        "--targets",
        path(&yp),
        "--json",
        "--cpu",
        "--per-row",
        path(&out),
    ]));
    assert!(close(
        o["loss"].as_f64().unwrap(),
        case.number("mean"),
        1e-9 * case.number("mean")
    ));
    let rows: Vec<f64> = read_npy(&out);
    assert_eq!(rows.len(), 31);
}

struct BadInputs {
    dir: tempfile::TempDir,
}

impl BadInputs {
    fn new() -> Self {
        let b = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        write_npy(
            &b.p("z.npy"),
            &[4, 3],
            &[
                0.5f32, -1.0, 2.0, 0.0, 0.1, 0.2, 3.0, 1.0, -2.0, 0.7, 0.7, 0.7,
            ],
        );
        write_npy(&b.p("y.npy"), &[4], &[2i64, 0, 1, 1]);
        write_npy(&b.p("p.npy"), &[4, 3], &[1.0f32 / 3.0; 12]);
        b
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }

    /// Runs `score` with `args` (file names relative to the temp dir) and checks status 2,
    /// an empty stdout and one stderr line containing every fragment.
    fn expect_error(&self, args: &[&str], fragments: &[&str]) {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".npy") && !a.starts_with('/') {
                    self.s(a)
                } else {
                    a.to_string()
                }
            })
            .collect();
        let mut full = vec!["score"];
        full.extend(args.iter().map(String::as_str));
        full.push("--cpu");
        let o = xent(&full);
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{full:?}: status {:?}, stderr {err}",
            o.status
        );
        assert!(
            stdout(&o).is_empty(),
            "{full:?}: a failed run printed a result: {}",
            stdout(&o)
        );
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
            .collect();
        assert_eq!(lines.len(), 1, "{full:?}: expected one line, got {err}");
        for f in fragments {
            assert!(lines[0].contains(f), "{full:?}: {:?} lacks {f:?}", lines[0]);
        }
    }
}

#[test]
fn bad_files_exit_2_naming_the_file() {
    let b = BadInputs::new();
    // Missing and unreadable.
    b.expect_error(
        &["--logits", "missing.npy", "--targets", "y.npy"],
        &["logits", "missing.npy", "cannot open"],
    );
    std::fs::create_dir(b.p("dir.npy")).unwrap();
    b.expect_error(
        &["--logits", "z.npy", "--targets", "dir.npy"],
        &["targets", "dir.npy"],
    );
    // Not an .npy: garbage, a wrong header, a truncated file, extra bytes.
    std::fs::write(b.p("garbage.npy"), b"hello, world").unwrap();
    b.expect_error(
        &["--logits", "garbage.npy", "--targets", "y.npy"],
        &["logits", "garbage.npy", "not a valid .npy"],
    );
    let mut header = std::fs::read(b.p("z.npy")).unwrap();
    header[12] = b'!';
    header.truncate(40);
    std::fs::write(b.p("badheader.npy"), &header).unwrap();
    b.expect_error(
        &["--logits", "badheader.npy", "--targets", "y.npy"],
        &["badheader.npy", "not a valid .npy"],
    );
    let full = std::fs::read(b.p("z.npy")).unwrap();
    std::fs::write(b.p("short.npy"), &full[..full.len() - 5]).unwrap();
    b.expect_error(
        &["--logits", "short.npy", "--targets", "y.npy"],
        &["short.npy", "truncated"],
    );
    let mut long = full.clone();
    long.extend_from_slice(&[0; 8]);
    std::fs::write(b.p("long.npy"), &long).unwrap();
    b.expect_error(
        &["--logits", "long.npy", "--targets", "y.npy"],
        &["long.npy", "8 bytes after"],
    );
    // Unsupported dtypes.
    write_npy(&b.p("u8.npy"), &[4], &[1u8, 2, 0, 1]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "u8.npy"],
        &["targets", "u8.npy", "unsupported dtype"],
    );
    write_npy(&b.p("zi.npy"), &[4, 3], &[1i64; 12]);
    b.expect_error(
        &["--logits", "zi.npy", "--targets", "y.npy"],
        &[
            "logits",
            "zi.npy",
            "float64, float16 or bfloat16 logits, found int64",
        ],
    );
    // Wrong shapes.
    write_npy(&b.p("z1.npy"), &[12], &[0.0f32; 12]);
    b.expect_error(
        &["--logits", "z1.npy", "--targets", "y.npy"],
        &["logits", "z1.npy", "2-D"],
    );
    write_npy(&b.p("y2.npy"), &[4, 1], &[0i64; 4]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "y2.npy"],
        &["targets", "y2.npy", "[4]"],
    );
    write_npy(&b.p("pf.npy"), &[4], &[0.5f32; 4]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "pf.npy"],
        &["targets", "pf.npy", "probabilities", "[4, 3]"],
    );
    // N or C mismatch between files.
    write_npy(&b.p("y5.npy"), &[5], &[0i64; 5]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "y5.npy"],
        &["targets", "y5.npy", "[4]", "z.npy"],
    );
    write_npy(&b.p("p43.npy"), &[4, 4], &[0.25f32; 16]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "p43.npy"],
        &["targets", "p43.npy", "[4, 3]"],
    );
    write_npy(&b.p("w2.npy"), &[2], &[1.0f32, 2.0]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--weights",
            "w2.npy",
        ],
        &["weights", "w2.npy", "[3]"],
    );
    write_npy(&b.p("wnan.npy"), &[3], &[1.0f32, f32::NAN, 2.0]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--weights",
            "wnan.npy",
        ],
        &["weights", "wnan.npy", "finite"],
    );
}

#[test]
fn bad_values_and_arguments_exit_2() {
    let b = BadInputs::new();
    write_npy(&b.p("ybad.npy"), &[4], &[2i64, 0, 7, 1]);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "ybad.npy"],
        &["targets", "ybad.npy", "row 2", "class index 7", "[0, 3)"],
    );
    write_npy(&b.p("yneg.npy"), &[4], &[2i64, -100, -3, 1]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "yneg.npy",
            "--ignore-index",
            "-100",
        ],
        &["row 2", "class index -3", "ignore_index (-100)"],
    );
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "p.npy",
            "--ignore-index",
            "-100",
        ],
        &["--ignore-index", "probabilit"],
    );
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--label-smoothing",
            "1.5",
        ],
        &["--label-smoothing", "1.5"],
    );
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--per-row",
            "/nonexistent/dir/out.npy",
        ],
        &["--per-row", "/nonexistent/dir/out.npy"],
    );
    // Arguments clap rejects also exit with status 2.
    let o = xent(&[
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--reduction",
        "median",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("median"));
}

/// Files are streamed in batches of rows; a class index out of range deep in the file names
/// its row in the whole file, and nothing is printed as a result.
#[test]
fn errors_in_later_batches_name_the_file_row() {
    let b = BadInputs::new();
    let (rows, classes) = (10_000usize, 30usize);
    let z = vec![0.25f32; rows * classes];
    let mut y = vec![1i64; rows];
    y[9_001] = 30;
    write_npy(&b.p("bigz.npy"), &[rows as u64, classes as u64], &z);
    write_npy(&b.p("bigy.npy"), &[rows as u64], &y);
    let batches = ["--batch-rows", "1000"];
    let mut args = vec!["--logits", "bigz.npy", "--targets", "bigy.npy"];
    args.extend(batches);
    b.expect_error(&args, &["row 9001", "class index 30"]);
    // Without the bad row the whole file scores, on both paths: uniform logits give ln C.
    y[9_001] = 2;
    write_npy(&b.p("bigy.npy"), &[rows as u64], &y);
    let paths: &[&[&str]] = if gpu_available() {
        &[&[], &["--cpu"]]
    } else {
        &[&["--cpu"]]
    };
    let (z, y) = (b.s("bigz.npy"), b.s("bigy.npy"));
    for path_args in paths {
        let mut args = vec!["score", "--logits", &z, "--targets", &y, "--json"];
        args.extend(batches);
        args.extend_from_slice(path_args);
        let out = json(&xent(&args));
        assert_eq!(out["rows"], rows);
        assert!(
            close(out["loss"].as_f64().unwrap(), (classes as f64).ln(), 1e-6),
            "{path_args:?}: {out}"
        );
    }
}

#[test]
fn info_demo_and_bench_run() {
    if !gpu_available() {
        return;
    }
    let info = xent(&["info"]);
    assert!(info.status.success(), "{}", stderr(&info));
    for key in [
        "xent uses:",
        "max_storage_buffer_binding_size",
        "TIMESTAMP_QUERY",
        "SUBGROUP",
        "SHADER_F16",
    ] {
        assert!(stdout(&info).contains(key), "info lacks {key}");
    }
    let demo = xent(&["demo"]);
    assert!(demo.status.success(), "{}", stderr(&demo));
    assert!(stdout(&demo).contains("H(p)") && stdout(&demo).contains("agreement"));
    let bench = json(&xent(&[
        "bench",
        "--quick",
        "--shapes",
        "64x100",
        "--json",
        "--kernel",
        "naive,auto",
    ]));
    let rows = bench.as_array().unwrap();
    assert_eq!(rows.len(), 4, "hard and soft, two kernels");
    for r in rows {
        for key in [
            "rows",
            "classes",
            "target",
            "task",
            "ms",
            "gbps",
            "roofline_fraction",
            "device",
            "timer",
            "strategy",
        ] {
            assert!(!r[key].is_null(), "bench row lacks {key}: {r}");
        }
        assert!(r["ms"].as_f64().unwrap() > 0.0);
        assert_eq!(r["task"], "loss");
    }
    let table = xent(&[
        "bench", "--quick", "--shapes", "64x100", "--runs", "20", "--no-cpu",
    ]);
    assert!(table.status.success() && stdout(&table).contains("roofline"));

    // The bytes each task moves, and the gradient's floor, from the row's own figures: a
    // gradient reads the logits twice and writes them once (class indices, 8 bytes a row, read
    // twice); its floor is one read pass at the read roofline and one read-and-write pass at
    // the read-and-write roofline. Distillation reads two matrices.
    let bench = json(&xent(&[
        "bench",
        "--quick",
        "--shapes",
        "64x100",
        "--json",
        "--no-cpu",
        "--task",
        "loss,grad,distill",
    ]));
    let (logits, labels) = (64.0 * 100.0 * 4.0, 64.0 * 8.0);
    let f = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let mut seen = 0;
    for r in bench.as_array().unwrap() {
        let seconds = f(r, "ms") * 1e-3;
        let (read, rw) = (f(r, "roofline_gbps") * 1e9, f(r, "rw_roofline_gbps") * 1e9);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
        match (r["task"].as_str().unwrap(), r["target"].as_str().unwrap()) {
            ("grad", "hard") => {
                let bytes = 3.0 * logits + 2.0 * labels;
                assert!(close(f(r, "gbps"), bytes / seconds / 1e9), "{r}");
                let floor = (logits + labels) / read + (2.0 * logits + labels) / rw;
                assert!(close(f(r, "rw_roofline_fraction"), floor / seconds), "{r}");
                seen += 1;
            }
            ("distill", _) => {
                assert!(close(f(r, "gbps"), 2.0 * logits / seconds / 1e9), "{r}");
                assert!(r["rw_roofline_fraction"].is_null(), "{r}");
                seen += 1;
            }
            ("loss", _) => assert!(r["rw_roofline_fraction"].is_null(), "{r}"),
            _ => {}
        }
    }
    assert_eq!(seen, 2, "a hard gradient row and a distillation row");
}

/// Writes an .npy with a header of our own making: `dict`, padded as NumPy pads it.
fn write_raw_npy(path: &Path, dict: &str, data: &[u8]) {
    let version_1 = dict.len() + 1 + 64 <= u16::MAX as usize;
    let prefix = if version_1 { 10 } else { 12 };
    let total = (prefix + dict.len() + 1).next_multiple_of(64);
    let header_len = total - prefix;
    let mut bytes = b"\x93NUMPY".to_vec();
    if version_1 {
        bytes.extend([1, 0]);
        bytes.extend((header_len as u16).to_le_bytes());
    } else {
        bytes.extend([2, 0]);
        bytes.extend((header_len as u32).to_le_bytes());
    }
    bytes.extend(dict.as_bytes());
    bytes.resize(total - 1, b' ');
    bytes.push(b'\n');
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// Hostile headers fail at once with a short message: brackets nested 22 deep in an extra
/// key (npyz's parser took 45 s), 40,000 dimensions, 33 dimensions, a truncated header.
#[test]
fn hostile_npy_headers_fail_fast() {
    let b = BadInputs::new();
    let nested = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), 'x': {}{}}}",
        "[".repeat(22),
        "]".repeat(22)
    );
    write_raw_npy(&b.p("nested.npy"), &nested, &[0; 48]);
    let dims = |n: usize| vec!["1"; n].join(", ");
    let wide = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},)}}",
        dims(40_000)
    );
    write_raw_npy(&b.p("wide.npy"), &wide, &[0; 4]);
    let deep = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},)}}",
        dims(33)
    );
    write_raw_npy(&b.p("dims33.npy"), &deep, &[0; 4]);
    let extra = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), 'x': []}";
    write_raw_npy(&b.p("extra.npy"), extra, &[0; 48]);
    for (file, fragment) in [
        ("nested.npy", "nested"),
        ("wide.npy", "header of"),
        ("dims33.npy", "33 dimensions"),
        ("extra.npy", "exactly 'descr', 'fortran_order' and 'shape'"),
    ] {
        let clock = Instant::now();
        b.expect_error(
            &["--logits", file, "--targets", "y.npy"],
            &["logits", file, "not a valid .npy", fragment],
        );
        assert!(
            clock.elapsed() < Duration::from_secs(5),
            "{file} took {:?}",
            clock.elapsed()
        );
    }
    let whole = std::fs::read(b.p("z.npy")).unwrap();
    std::fs::write(b.p("cut.npy"), &whole[..20]).unwrap();
    b.expect_error(
        &["--logits", "cut.npy", "--targets", "y.npy"],
        &["cut.npy", "truncated"],
    );
}

/// A closed stdout ends the command quietly with status 0; a full one is one line and
/// status 1. Never a panic.
#[test]
fn closed_or_full_stdout_is_not_a_panic() {
    let b = BadInputs::new();
    let args = [
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--cpu",
    ];
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let closed = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(closed.status.code(), Some(0), "{}", stderr(&closed));
    assert!(stderr(&closed).is_empty(), "{}", stderr(&closed));
    let full = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(args)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1), "{}", stderr(&full));
    let err = stderr(&full);
    assert!(
        err.starts_with("xent: cannot write to stdout: ") && err.lines().count() == 1,
        "{err}"
    );
}

/// Shapes too large for the kernels' u32 indices or for memory are refused when read.
#[test]
fn absurd_bench_shapes_are_refused() {
    for shape in [
        "99999999x99999999",
        "4294967296x1",
        "18446744073709551615x2",
        "1x0",
    ] {
        let o = xent(&["bench", "--quick", "--shapes", shape]);
        assert_eq!(o.status.code(), Some(2), "{shape}: {}", stderr(&o));
        assert!(stdout(&o).is_empty());
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        if shape != "1x0" {
            assert!(
                stderr(&o).contains("shape too large"),
                "{shape}: {}",
                stderr(&o)
            );
        }
    }
}

/// `--kernel` and `--json-out` are checked before any timing, with plain messages.
#[test]
fn bench_arguments_are_checked_before_any_work() {
    for (kernel, fragment) in [
        ("256/256/65536/vec4", "split 65536"),
        ("256/256/4294967295/vec4", "split 4294967295"),
        ("256/256/4294967296/vec4", "split 4294967296"),
        ("2048/2048/1/vec4", "workgroup size 2048"),
        ("256/512/1/vec4", "lanes per row 512"),
        ("256/4/2/vec4", "LANES = WG"),
        ("256/4/1/vec8", "vec8"),
    ] {
        let clock = Instant::now();
        let o = xent(&["bench", "--quick", "--kernel", kernel]);
        assert_eq!(o.status.code(), Some(2), "{kernel}: {}", stderr(&o));
        assert!(stderr(&o).contains(fragment), "{kernel}: {}", stderr(&o));
        assert!(
            clock.elapsed() < Duration::from_secs(2),
            "{kernel}: checked late"
        );
    }
    for depth in ["0", "7"] {
        let o = xent(&[
            "bench",
            "--quick",
            "--path",
            "pipelined",
            "--in-flight",
            depth,
        ]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "--in-flight {depth}: {}",
            stderr(&o)
        );
        assert!(stderr(&o).contains("--in-flight"), "{}", stderr(&o));
    }
    let o = xent(&[
        "bench",
        "--quick",
        "--json-out",
        "/nonexistent/dir/bench.json",
    ]);
    expect_failure(&o, 2, &["--json-out", "/nonexistent/dir", "does not exist"]);
    if !gpu_available() {
        return;
    }
    // Valid syntax the device refuses: a workgroup smaller than any subgroup.
    let o = xent(&["bench", "--quick", "--kernel", "auto,2/2/1/scalar/sg"]);
    let line = expect_failure(&o, 2, &["--kernel 2/2/1/scalar/sg: "]);
    assert!(!line.contains("Strategy {"), "{line}");
}

/// Infinity and NaN are strings in JSON; null is only for what is absent.
#[test]
fn json_tells_infinity_from_nothing() {
    let b = BadInputs::new();
    write_npy(
        &b.p("zinf.npy"),
        &[2, 2],
        &[f32::NEG_INFINITY, 0.0, 0.0, 0.0],
    );
    write_npy(&b.p("znan.npy"), &[2, 2], &[f32::NAN, 0.0, 0.0, 0.0]);
    write_npy(&b.p("y0.npy"), &[2], &[0i64, 0]);
    let score = |z: &str, reduction: &str| {
        json(&xent(&[
            "score",
            "--logits",
            &b.s(z),
            "--targets",
            &b.s("y0.npy"),
            "--cpu",
            "--json",
            "--reduction",
            reduction,
        ]))
    };
    let inf = score("zinf.npy", "sum");
    assert_eq!(inf["loss"], "inf", "{inf}");
    assert_eq!(inf["sum"], "inf");
    assert_eq!(score("znan.npy", "mean")["loss"], "nan");
    let none = score("zinf.npy", "none");
    assert!(none["loss"].is_null(), "{none}");
    assert_eq!(none["mean"], "inf");
}

/// Negative numbers reach xent's own checks instead of clap's "unexpected argument".
#[test]
fn negative_numbers_reach_the_range_checks() {
    let b = BadInputs::new();
    let base = ["--logits", "z.npy", "--targets", "y.npy"];
    b.expect_error(
        &[&base[..], &["--label-smoothing", "-0.1"]].concat(),
        &[
            "--label-smoothing",
            "label smoothing -0.1 is outside [0, 1]",
        ],
    );
    for rows in ["-1", "0"] {
        b.expect_error(
            &[&base[..], &["--batch-rows", rows]].concat(),
            &[&format!("--batch-rows {rows}: must be at least 1")],
        );
    }
}

/// A WGPU_BACKEND that names no backend is bad input (status 2), said in one line that lists
/// the valid names, without wgpu's warnings; --help documents the exit statuses.
#[test]
fn unknown_wgpu_backend_is_bad_input() {
    for value in ["bogus", "", "vulkan,bogus"] {
        let o = xent_with(&["info"], &[("WGPU_BACKEND", value)], None);
        expect_failure(
            &o,
            2,
            &[
                "WGPU_BACKEND",
                "not a backend",
                "vulkan",
                "metal",
                "dx12",
                "gl",
            ],
        );
    }
    let help = stdout(&xent(&["--help"]));
    for line in ["0  success", "1  no GPU adapter", "2  bad input"] {
        assert!(help.contains(line), "--help lacks {line:?}: {help}");
    }
}

/// Pipes are read front to back: `--logits /dev/stdin`, and per-row losses to /dev/stdout.
#[test]
fn pipes_are_streamed() {
    let b = BadInputs::new();
    let from_file = json(&xent(&[
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--cpu",
        "--json",
    ]));
    let piped = json(&xent_with(
        &[
            "score",
            "--logits",
            "/dev/stdin",
            "--targets",
            &b.s("y.npy"),
            "--cpu",
            "--json",
        ],
        &[],
        Some(&b.p("z.npy")),
    ));
    assert_eq!(piped["loss"], from_file["loss"]);
    let o = xent(&[
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--cpu",
        "--per-row",
        "/dev/stdout",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.starts_with(b"\x93NUMPY"), "{}", stdout(&o));
    // A truncated pipe is found as it is read.
    let whole = std::fs::read(b.p("z.npy")).unwrap();
    std::fs::write(b.p("cut.npy"), &whole[..whole.len() - 6]).unwrap();
    let o = xent_with(
        &[
            "score",
            "--logits",
            "/dev/stdin",
            "--targets",
            &b.s("y.npy"),
            "--cpu",
        ],
        &[],
        Some(&b.p("cut.npy")),
    );
    expect_failure(&o, 2, &["logits /dev/stdin", "truncated"]);
}

/// H(p) + KL only for targets that are distributions; otherwise one line says why.
#[test]
fn entropy_split_only_for_distributions() {
    let b = BadInputs::new();
    write_npy(&b.p("p5.npy"), &[4, 3], &[[1.0f32, 2.0, 2.0]; 4].concat());
    let run = |targets: &str, json_flag: &[&str]| {
        let (z, t) = (b.s("z.npy"), b.s(targets));
        let args = ["score", "--logits", &z, "--targets", &t, "--cpu"];
        xent(&[&args[..], json_flag].concat())
    };
    let good = stdout(&run("p.npy", &[]));
    assert!(
        good.contains("= H(p)") && !good.contains("not shown"),
        "{good}"
    );
    let bad = run("p5.npy", &[]);
    assert!(bad.status.success());
    let text = stdout(&bad);
    assert!(!text.contains("= H(p)"), "{text}");
    assert!(
        text.contains("H(p) and KL not shown: row 0 sums to 5, not 1"),
        "{text}"
    );
    let j = json(&run("p5.npy", &["--json"]));
    assert!(
        j["entropy"].is_null() && j["kl_divergence"].is_null(),
        "{j}"
    );
    assert_eq!(j["decomposition_note"], "row 0 sums to 5, not 1");
    let j = json(&run("p.npy", &["--json"]));
    assert!(
        j["entropy"].is_number() && j["decomposition_note"].is_null(),
        "{j}"
    );
}

/// Per-row losses written batch by batch match a single batch's.
#[test]
fn per_row_output_streams_across_batches() {
    let case = golden_case("soft_21x9");
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for batch in ["3", "1000"] {
        let out = dir.path().join(format!("rows{batch}.npy"));
        let args = score_args(
            &case,
            &["--cpu", "--batch-rows", batch, "--per-row", path(&out)],
        );
        let j = json(&xent(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let rows: Vec<f32> = read_npy(&out);
        assert_eq!(rows.len(), 21);
        results.push((
            j["loss"].as_f64().unwrap(),
            j["entropy"].as_f64().unwrap(),
            rows,
        ));
    }
    let (a, b) = (&results[0], &results[1]);
    assert!(
        close(a.0, b.0, 1e-12) && close(a.1, b.1, 1e-12),
        "{:?} {:?}",
        a.0,
        b.0
    );
    assert_eq!(a.2, b.2);
}

/// --cpu has no GPU binding limit: a row of 67,108,865 classes (more than 256 MiB) scores.
#[test]
fn cpu_scores_a_row_larger_than_a_binding() {
    let b = BadInputs::new();
    let classes = 67_108_865u64;
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (1, {classes}), }}");
    write_raw_npy(&b.p("wide.npy"), &dict, &vec![0; classes as usize * 4]);
    write_npy(&b.p("y1.npy"), &[1], &[7i64]);
    let o = json(&xent(&[
        "score",
        "--logits",
        &b.s("wide.npy"),
        "--targets",
        &b.s("y1.npy"),
        "--cpu",
        "--json",
    ]));
    assert!(
        close(o["loss"].as_f64().unwrap(), (classes as f64).ln(), 1e-9),
        "{o}"
    );
}

/// N = 0 sums to +0, printed without a sign.
#[test]
fn empty_sum_is_positive_zero() {
    let b = BadInputs::new();
    write_npy(&b.p("z0.npy"), &[0, 3], &[0.0f32; 0]);
    write_npy(&b.p("y00.npy"), &[0], &[0i64; 0]);
    let args = [
        "score",
        "--logits",
        &b.s("z0.npy"),
        "--targets",
        &b.s("y00.npy"),
        "--cpu",
        "--reduction",
        "sum",
    ];
    let text = stdout(&xent(&args));
    assert!(text.starts_with("loss (sum): 0.000000000"), "{text}");
    let j = json(&xent(&[&args[..], &["--json"]].concat()));
    assert!(j["loss"].as_f64().unwrap().is_sign_positive(), "{j}");
}

/// --per-row never writes over an input, under any name.
#[test]
fn per_row_refuses_to_overwrite_an_input() {
    let b = BadInputs::new();
    let before = std::fs::read(b.p("z.npy")).unwrap();
    std::os::unix::fs::symlink(b.p("z.npy"), b.p("alias.npy")).unwrap();
    for (out, flag) in [
        ("z.npy", "--logits"),
        ("y.npy", "--targets"),
        ("alias.npy", "--logits"),
    ] {
        b.expect_error(
            &["--logits", "z.npy", "--targets", "y.npy", "--per-row", out],
            &["--per-row", out, flag],
        );
    }
    write_npy(&b.p("w.npy"), &[3], &[1.0f32; 3]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--weights",
            "w.npy",
            "--per-row",
            "w.npy",
        ],
        &["--per-row", "--weights"],
    );
    assert_eq!(std::fs::read(b.p("z.npy")).unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// Training: --grad, --grad-output, --z-loss, --softcap
// ---------------------------------------------------------------------------------------------

/// An .npy that xent wrote: its dtype, shape and float32 values.
fn read_gradient(path: &Path) -> (String, Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = npyz::NpyFile::new(&bytes[..]).unwrap();
    let (dtype, shape) = (file.dtype().descr(), file.shape().to_vec());
    let values = file.into_vec().unwrap();
    (dtype, shape, values)
}

/// Runs `score` on a golden case with `extra` arguments and returns its JSON.
fn score_case(case: &GoldenCase, extra: &[&str]) -> serde_json::Value {
    let args = score_args(case, extra);
    json(&xent(&args.iter().map(String::as_str).collect::<Vec<_>>()))
}

/// The paths to run: the GPU (when there is one) and --cpu.
fn paths() -> Vec<bool> {
    if gpu_available() {
        vec![false, true]
    } else {
        vec![true]
    }
}

/// What a golden case needs for gradient tolerances: the mean's denominator, and per row the
/// largest |logit| and the target mass B.
struct GradScale {
    denominator: f64,
    max_abs: Vec<f64>,
    mass: Vec<f64>,
}

impl GradScale {
    fn of(case: &GoldenCase) -> Self {
        let inputs = common::GoldenInputs::load(case);
        let logits = xent::Logits::new(&inputs.logits, case.rows(), case.classes()).unwrap();
        let out = xent::cpu::cross_entropy(&inputs.spec, logits, inputs.targets()).unwrap();
        Self {
            denominator: out.mean_denominator,
            max_abs: common::max_abs_per_row(&inputs.logits, case.classes()),
            mass: inputs.target_mass(case.classes()),
        }
    }

    /// The tolerance of element (row `i`) of a gradient scaled by `scale` (1/denominator for
    /// the mean) against PyTorch's f64 gradient stored as float32 (`want`), `got` being ours,
    /// also float32.
    ///
    /// Both files round to float32: half an ulp each, so one ulp of the larger value. On top:
    /// - GPU: each element is s·(B·q_k − a_k) with q_k = exp(z_k − m − ln s) in f32; z_k − m is
    ///   off by an ulp of the largest |z| and ln s by a few f32 ulps, so every element is within
    ///   |s|·(1 + B)·(8·ulp(max|z|) + 4e-6) (tests/gradient.rs, element_tolerance);
    /// - CPU: f64 throughout, differing from PyTorch's f64 only in rounding: the error of lse,
    ///   a few f64 ulps of the largest |z|, carried into q_k and B·q_k − a_k:
    ///   |s|·16·ε₆₄·(1 + max|z|)·(1 + B) (tests/gradient_cpu.rs, golden_tolerance).
    fn tolerance(&self, cpu: bool, scale: f64, i: usize, got: f64, want: f64) -> f64 {
        let rounding = common::ulp_f32(got.abs().max(want.abs()));
        let (m, b) = (self.max_abs[i], self.mass[i]);
        let computing = if cpu {
            16.0 * f64::EPSILON * (1.0 + m) * (1.0 + b)
        } else {
            (1.0 + b) * (8.0 * common::ulp_f32(m) + 4e-6)
        };
        rounding + scale.abs() * computing
    }
}

/// Asserts `got` (xent's float32 gradient) against `want` (PyTorch's, scaled), element by
/// element; a zero denominator (every row ignored) must give exact zeros.
fn assert_gradient_matches(
    label: &str,
    case: &GoldenCase,
    cpu: bool,
    scale: f64,
    got: &[f32],
    want: &[f64],
) {
    let classes = case.classes();
    assert_eq!(got.len(), want.len(), "{label}: length");
    let s = GradScale::of(case);
    if s.denominator == 0.0 {
        assert!(
            got.iter().all(|g| g.to_bits() == 0),
            "{label}: every row is ignored, so the gradient is +0 everywhere"
        );
        return;
    }
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let i = j / classes;
        let tol = s.tolerance(cpu, scale, i, g as f64, w);
        assert!(
            close(g as f64, w, tol),
            "{label}: row {i} class {}: {g:e} vs {w:e} (tolerance {tol:e})",
            j % classes
        );
    }
}

/// Every golden case's gradient of the mean through `score --grad`, on the GPU and with
/// --cpu, in one batch and in batches of 3 rows (the mean over the whole file, not of each
/// batch): PyTorch's grad_mean.npy, shape [N, C], float32.
#[test]
fn golden_gradients_through_score() {
    let dir = tempfile::tempdir().unwrap();
    let cases = golden_cases("cross_entropy");
    assert!(cases.len() >= 20, "golden cases missing");
    for case in cases {
        let want: Vec<f64> = case
            .f32s("grad_mean.npy")
            .iter()
            .map(|&v| v as f64)
            .collect();
        let scale = 1.0 / GradScale::of(&case).denominator;
        for cpu in paths() {
            for batches in [&[][..], &["--batch-rows", "3"]] {
                let out = dir.path().join(format!("{}-grad.npy", case.name));
                let mut extra = vec!["--grad", path(&out)];
                extra.extend_from_slice(batches);
                if cpu {
                    extra.push("--cpu");
                }
                let label = format!("{} cpu={cpu} {batches:?}", case.name);
                let j = score_case(&case, &extra);
                let mean = case.number("mean");
                let loss = j["loss"].as_f64().unwrap_or(f64::NAN);
                assert!(
                    close(loss, mean, 1e-4 * mean.abs().max(1.0)),
                    "{label}: loss {loss} vs {mean}"
                );
                let (dtype, shape, got) = read_gradient(&out);
                assert_eq!(dtype, "'<f4'", "{label}");
                assert_eq!(
                    shape,
                    [case.rows() as u64, case.classes() as u64],
                    "{label}"
                );
                assert_gradient_matches(&label, &case, cpu, scale, &got, &want);
                std::fs::remove_file(&out).unwrap();
            }
        }
    }
}

/// `--reduction sum --grad-output 2` is 2·denominator·grad_mean, and so is `--reduction none
/// --grad-output 2` (2 for every row), in batches too.
#[test]
fn sum_and_none_gradients_scale_with_grad_output() {
    let dir = tempfile::tempdir().unwrap();
    for case in golden_cases("cross_entropy") {
        let s = GradScale::of(&case);
        let denominator = s.denominator;
        let want: Vec<f64> = case
            .f32s("grad_mean.npy")
            .iter()
            .map(|&v| 2.0 * denominator * v as f64)
            .collect();
        for cpu in paths() {
            for (reduction, batches) in [("sum", "1000"), ("sum", "3"), ("none", "2")] {
                let out = dir.path().join(format!("{}-{reduction}.npy", case.name));
                let mut extra = vec![
                    "--reduction",
                    reduction,
                    "--grad",
                    path(&out),
                    "--grad-output",
                    "2",
                    "--batch-rows",
                    batches,
                ];
                if cpu {
                    extra.push("--cpu");
                }
                let label = format!("{} cpu={cpu} {reduction} batches of {batches}", case.name);
                score_case(&case, &extra);
                let (_, _, got) = read_gradient(&out);
                assert_eq!(got.len(), want.len(), "{label}");
                if denominator == 0.0 {
                    assert!(got.iter().all(|g| g.to_bits() == 0), "{label}");
                    continue;
                }
                for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let i = j / case.classes();
                    // The golden's float32 rounding is scaled by 2·denominator too.
                    let tol = s.tolerance(cpu, 2.0, i, g as f64, w)
                        + 2.0 * denominator * common::ulp_f32(w / (2.0 * denominator));
                    assert!(
                        close(g as f64, w, tol),
                        "{label}: element {j}: {g:e} vs {w:e} (tolerance {tol:e})"
                    );
                }
            }
        }
    }
}

/// The f64 CPU reference's gradient of one whole batch, rounded to float32.
fn library_gradient(
    case: &GoldenCase,
    spec: &xent::CrossEntropy,
    upstream: xent::Upstream<'_>,
) -> (xent::LossOutput, Vec<f32>) {
    let inputs = common::GoldenInputs::load(case);
    let logits = xent::Logits::new(&inputs.logits, case.rows(), case.classes()).unwrap();
    let (out, grad) =
        xent::cpu::cross_entropy_grad(spec, logits, inputs.targets(), upstream).unwrap();
    (out, grad.into_iter().map(|g| g as f32).collect())
}

/// JSON `z_loss` is λ·Σ_{i not ignored} lse_i² / counted rows under mean (the sum under sum,
/// null under none), computed here from the CPU library's log-sum-exp; the loss is PyTorch's
/// mean plus it; and the gradient in batches of 1 and 3 rows (Upstream::MeanOver) is exactly
/// the library's for the whole file in one call.
#[test]
fn z_loss_is_reported_and_batches_do_not_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let lambda = 0.01;
    for name in ["hard_smoothing_weights_ignore", "hard_ignore", "soft_21x9"] {
        let case = golden_cases("cross_entropy")
            .into_iter()
            .find(|c| c.name == name)
            .unwrap();
        let inputs = common::GoldenInputs::load(&case);
        let logits = xent::Logits::new(&inputs.logits, case.rows(), case.classes()).unwrap();
        let lse = xent::cpu::log_sum_exp(logits);
        let counted: Vec<f64> = lse
            .iter()
            .enumerate()
            .filter(|&(i, _)| inputs.soft || !inputs.spec.is_ignored(inputs.classes_idx[i]))
            .map(|(_, &l)| l)
            .collect();
        assert!(
            counted.len() < case.rows() || inputs.soft,
            "{name}: no ignored row"
        );
        let z_sum: f64 = counted.iter().map(|l| lambda * l * l).sum();
        let z_mean = z_sum / counted.len() as f64;
        assert!(z_mean > 1e-3, "{name}: a z-loss too small to test");
        let spec = inputs
            .spec
            .clone()
            .with_reduction(xent::Reduction::Mean)
            .with_z_loss(lambda);
        let (_, want_grad) = library_gradient(&case, &spec, xent::Upstream::Scalar(1.0));
        for cpu in paths() {
            // The GPU's lse is within f32 rounding: 1e-5 relative covers λ·lse² (common::
            // row_tolerance's relative part, doubled by the square).
            let rel = if cpu { 1e-12 } else { 2e-5 };
            for batches in ["1000", "3", "1"] {
                let out = dir.path().join(format!("{name}-z{batches}.npy"));
                let mut extra = vec![
                    "--z-loss",
                    "0.01",
                    "--batch-rows",
                    batches,
                    "--grad",
                    path(&out),
                ];
                if cpu {
                    extra.push("--cpu");
                }
                let label = format!("{name} cpu={cpu} batches of {batches}");
                let j = score_case(&case, &extra);
                let z = j["z_loss"].as_f64().unwrap_or(f64::NAN);
                assert!(
                    close(z, z_mean, rel * z_mean),
                    "{label}: z_loss {z} vs {z_mean}"
                );
                let z_sum_got = j["z_loss_sum"].as_f64().unwrap_or(f64::NAN);
                assert!(close(z_sum_got, z_sum, rel * z_sum), "{label}: {j}");
                let loss = j["loss"].as_f64().unwrap();
                let want = case.number("mean") + z_mean;
                assert!(
                    close(loss, want, 1e-4 * want),
                    "{label}: loss {loss} vs PyTorch's mean + z-loss {want}"
                );
                let (_, _, got) = read_gradient(&out);
                if cpu {
                    assert_eq!(got, want_grad, "{label}: gradient");
                } else {
                    let s = GradScale::of(&case);
                    for (e, (&g, &w)) in got.iter().zip(&want_grad).enumerate() {
                        // The z-loss term adds s_z·2λ·lse·q_k: its f32 error is that of q_k,
                        // relative, at a scale of 2λ·|lse|·counted/denominator more.
                        let i = e / case.classes();
                        let extra_mass =
                            2.0 * lambda * lse[i].abs() * s.denominator / counted.len() as f64;
                        let tol = s.tolerance(
                            false,
                            (1.0 + extra_mass) / s.denominator,
                            i,
                            g as f64,
                            w as f64,
                        );
                        assert!(
                            close(g as f64, w as f64, tol),
                            "{label}: element {e}: {g:e} vs {w:e} (tolerance {tol:e})"
                        );
                    }
                }
            }
            // Sum: the z-loss summed; none: null, with z_loss_sum still reported.
            let cpu_flag: &[&str] = if cpu { &["--cpu"] } else { &[] };
            let j = score_case(
                &case,
                &[&["--z-loss", "0.01", "--reduction", "sum"][..], cpu_flag].concat(),
            );
            let z = j["z_loss"].as_f64().unwrap_or(f64::NAN);
            assert!(close(z, z_sum, rel * z_sum), "{name} sum: {j}");
            let j = score_case(
                &case,
                &[&["--z-loss", "0.01", "--reduction", "none"][..], cpu_flag].concat(),
            );
            assert!(j["z_loss"].is_null(), "{name} none: {j}");
            assert!(j["z_loss_sum"].is_number(), "{name} none: {j}");
        }
        // Without --z-loss both keys are null; text output names the z-loss part.
        let j = score_case(&case, &["--cpu"]);
        assert!(j["z_loss"].is_null() && j["z_loss_sum"].is_null(), "{j}");
        let args = score_args(&case, &["--cpu", "--z-loss", "0.01"]);
        let args: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|&a| a != "--json")
            .collect();
        let text = stdout(&xent(&args));
        assert!(
            text.contains(&format!("  of which z-loss: {z_mean:.9}")),
            "{text}"
        );
    }
}

/// --softcap changes the loss and the gradient as the library says: the loss of
/// CAP·tanh(z/CAP), not of z.
#[test]
fn softcap_changes_the_loss_as_the_library_says() {
    let dir = tempfile::tempdir().unwrap();
    let case = golden_case("hard_31x1000");
    let inputs = common::GoldenInputs::load(&case);
    let spec = inputs
        .spec
        .clone()
        .with_reduction(xent::Reduction::Mean)
        .with_softcap(2.0);
    let (want, want_grad) = library_gradient(&case, &spec, xent::Upstream::Scalar(1.0));
    let capped = want.loss.unwrap();
    let plain = case.number("mean");
    assert!(
        (capped - plain).abs() > 0.1 * plain.abs(),
        "a cap of 2 must change the loss: {capped} vs {plain}"
    );
    for cpu in paths() {
        let out = dir.path().join("capped.npy");
        let mut extra = vec!["--softcap", "2", "--grad", path(&out), "--batch-rows", "7"];
        if cpu {
            extra.push("--cpu");
        }
        let j = score_case(&case, &extra);
        let loss = j["loss"].as_f64().unwrap();
        let rel = if cpu { 1e-12 } else { 1e-5 };
        assert!(
            close(loss, capped, rel * capped.abs()),
            "cpu={cpu}: {loss} vs the library's {capped}"
        );
        let (_, _, got) = read_gradient(&out);
        if cpu {
            assert_eq!(got, want_grad);
        } else {
            // Capped logits lie in (−2, 2): ulp(2) in the GPU's tolerance, times the slope ≤ 1.
            let s = GradScale::of(&case);
            for (e, (&g, &w)) in got.iter().zip(&want_grad).enumerate() {
                let i = e / case.classes();
                let tol = common::ulp_f32(w as f64)
                    + (1.0 + s.mass[i]) * (8.0 * common::ulp_f32(2.0) + 4e-6) / s.denominator;
                assert!(
                    close(g as f64, w as f64, tol),
                    "element {e}: {g:e} vs {w:e}"
                );
            }
        }
    }
}

/// Bad training options exit 2 naming the argument; --grad never writes over an input or the
/// --per-row file, and a gradient file is removed when the run fails.
#[test]
fn training_options_are_checked() {
    let b = BadInputs::new();
    let base = ["--logits", "z.npy", "--targets", "y.npy"];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    b.expect_error(
        &with(&["--z-loss", "-1"]),
        &["--z-loss", "z-loss coefficient -1 must be finite and >= 0"],
    );
    b.expect_error(&with(&["--z-loss", "nan"]), &["--z-loss", "NaN"]);
    for cap in ["0", "-3", "inf"] {
        b.expect_error(
            &with(&["--softcap", cap]),
            &["--softcap", "soft-cap", "must be finite and > 0"],
        );
    }
    let before = std::fs::read(b.p("z.npy")).unwrap();
    b.expect_error(
        &with(&["--grad", "z.npy"]),
        &["--grad", "z.npy", "is the --logits file"],
    );
    b.expect_error(
        &with(&["--grad", "y.npy"]),
        &["--grad", "y.npy", "is the --targets file"],
    );
    assert_eq!(std::fs::read(b.p("z.npy")).unwrap(), before);
    b.expect_error(
        &with(&["--grad", "/nonexistent/dir/g.npy"]),
        &["--grad /nonexistent/dir/g.npy", "cannot write"],
    );
    b.expect_error(
        &with(&["--grad", "g.npy", "--per-row", "g.npy"]),
        &["--grad", "g.npy", "is the --per-row file"],
    );
    assert!(!b.p("g.npy").exists(), "a refused run left g.npy");
    // An alias of a --per-row file that does not exist yet is found once it does.
    std::os::unix::fs::symlink(b.p("rows.npy"), b.p("alias.npy")).unwrap();
    b.expect_error(
        &with(&["--per-row", "rows.npy", "--grad", "alias.npy"]),
        &["--grad", "alias.npy", "is the --per-row file"],
    );
    assert!(!b.p("rows.npy").exists(), "a refused run left rows.npy");
    b.expect_error(
        &with(&["--grad", "g.npy", "--grad-output", "inf"]),
        &["--grad-output inf: must be finite"],
    );
    // --grad-output without --grad is refused by clap (status 2).
    let o = xent(&[
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--cpu",
        "--grad-output",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--grad"), "{}", stderr(&o));
    // A class index out of range in a later batch: under sum the gradient file was being
    // written and is removed; under mean the targets are read first and nothing is created.
    let (rows, classes) = (10_000usize, 30usize);
    let mut y = vec![1i64; rows];
    y[9_001] = 30;
    write_npy(
        &b.p("bigz.npy"),
        &[rows as u64, classes as u64],
        &vec![0.25f32; rows * classes],
    );
    write_npy(&b.p("bigy.npy"), &[rows as u64], &y);
    for reduction in ["sum", "mean"] {
        b.expect_error(
            &[
                "--logits",
                "bigz.npy",
                "--targets",
                "bigy.npy",
                "--batch-rows",
                "1000",
                "--reduction",
                reduction,
                "--grad",
                "gbig.npy",
            ],
            &["targets", "bigy.npy", "row 9001", "class index 30"],
        );
        assert!(!b.p("gbig.npy").exists(), "{reduction}: gbig.npy was left");
    }
}

/// Float64 logits give a float32 gradient, equal to that of the same values as float32; the
/// text output says where it went.
#[test]
fn gradient_is_float32_for_float64_logits() {
    let case = golden_case("hard_31x1000");
    let dir = tempfile::tempdir().unwrap();
    let z64: Vec<f64> = case.f32s("logits.npy").iter().map(|&v| v as f64).collect();
    let (zp, g32, g64) = (
        dir.path().join("z.npy"),
        dir.path().join("g32.npy"),
        dir.path().join("g64.npy"),
    );
    write_npy(&zp, &[31, 1000], &z64);
    let targets = case.dir.join("targets.npy");
    let run = |logits: &Path, out: &Path| {
        xent(&[
            "score",
            "--logits",
            path(logits),
            "--targets",
            path(&targets),
            "--cpu",
            "--grad",
            path(out),
        ])
    };
    let o = run(&case.dir.join("logits.npy"), &g32);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&zp, &g64);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!(
            "gradient: float32 [31, 1000] written to {}",
            path(&g64)
        )),
        "{text}"
    );
    let (dtype, shape, from64) = read_gradient(&g64);
    assert_eq!(
        (dtype.as_str(), shape.as_slice()),
        ("'<f4'", &[31u64, 1000][..])
    );
    assert_eq!(from64, read_gradient(&g32).2);
}

// Half precision: float16 and bfloat16 .npy logits (and probabilities), --logits-dtype,
// --grad in the logits' dtype

/// The header dict and the data of an .npy file (parsed by hand: npyz does not know `<V2`).
fn read_raw_npy(path: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = String::from_utf8(bytes[10..10 + len].to_vec()).unwrap();
    (dict, bytes[10 + len..].to_vec())
}

/// Golden cases with their logits rounded to float16 (`<f2`) and to bfloat16 — as np.save
/// writes ml_dtypes' bfloat16 (`<V2`), as a `'bfloat16'` descr, and as uint16 bits with
/// `--logits-dtype bf16` — through `score --grad`, on the GPU and with --cpu: the loss is the
/// library's f64 reference on the rounded logits, and the gradient file has the logits' dtype
/// and the reference's gradient within one half ulp (bit for bit on --cpu).
#[test]
fn half_precision_logits_through_score() {
    use xent::{Dtype, ElementVec, Logits, Targets, Upstream, bf16, f16};
    let dir = tempfile::tempdir().unwrap();
    let forms: [(Dtype, &str, Option<&str>); 4] = [
        (Dtype::F16, "<f2", None),
        (Dtype::Bf16, "<V2", None),
        (Dtype::Bf16, "bfloat16", None),
        (Dtype::Bf16, "<u2", Some("bf16")),
    ];
    for name in [
        "hard_9x4",
        "hard_weights_ignore",
        "soft_4x3",
        "hard_31x1000",
    ] {
        let case = golden_case(name);
        let inputs = common::GoldenInputs::load(&case);
        let (rows, classes) = (case.rows(), case.classes());
        for (dtype, descr, flag) in forms {
            let rounded = ElementVec::rounded(dtype, inputs.logits.iter().map(|&v| v as f64));
            let file = dir
                .path()
                .join(format!("{name}-{}.npy", descr.replace(['<', '|'], "")));
            let dict = format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {classes}), }}"
            );
            write_raw_npy(&file, &dict, rounded.bytes());
            let z = Logits::from_elements(rounded.as_elements(), rows, classes).unwrap();
            let spec = inputs.spec.clone();
            let targets: Targets<'_> = inputs.targets();
            let want = xent::cpu::cross_entropy(&spec, z, targets).unwrap();
            let (_, want_grad) =
                xent::cpu::cross_entropy_grad(&spec, z, targets, Upstream::Scalar(1.0)).unwrap();
            let want_rounded = ElementVec::rounded(dtype, want_grad.iter().copied());
            for cpu in paths() {
                let out = dir.path().join("g.npy");
                let mut extra = vec!["--grad", path(&out)];
                if let Some(f) = flag {
                    extra.extend(["--logits-dtype", f]);
                }
                if cpu {
                    extra.push("--cpu");
                }
                let label = format!("{name} {descr} cpu={cpu}");
                let args = score_args_with_logits(&case, &file, &extra);
                let j = json(&xent(&args.iter().map(String::as_str).collect::<Vec<_>>()));
                let loss = j["loss"].as_f64().unwrap_or(f64::NAN);
                let reference = want.loss.unwrap_or(f64::NAN);
                assert!(
                    close(loss, reference, 1e-5 * reference.abs().max(1.0)),
                    "{label}: loss {loss} vs the reference on the rounded logits {reference}"
                );
                let (dict, data) = read_raw_npy(&out);
                let written = if dtype == Dtype::F16 {
                    "'<f2'"
                } else {
                    "'<V2'"
                };
                assert!(dict.contains(written), "{label}: gradient header {dict}");
                assert!(
                    dict.contains(&format!("({rows}, {classes})")),
                    "{label}: {dict}"
                );
                assert_eq!(data.len(), want_rounded.bytes().len(), "{label}");
                if cpu {
                    // The reference rounded once, bit for bit.
                    assert_eq!(data, want_rounded.bytes(), "{label}");
                    continue;
                }
                let scale = 1.0 / want.mean_denominator;
                for (k, (b, &w)) in data.chunks(2).zip(&want_grad).enumerate() {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    let g = match dtype {
                        Dtype::F16 => f16::from_bits(bits).to_f32(),
                        _ => bf16::from_bits(bits).to_f32(),
                    };
                    let tol = dtype.ulp(w) + 1e-5 * scale;
                    assert!(
                        (g as f64 - w).abs() <= tol || (g.is_nan() && w.is_nan()),
                        "{label}: element {k}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// Probabilities in the logits' half dtype are read as such (not widened to f32 first): the
/// loss is the reference's on the half probabilities.
#[test]
fn half_probabilities_through_score() {
    use xent::{Logits, Targets, f16};
    let dir = tempfile::tempdir().unwrap();
    let case = golden_case("soft_8x4099");
    let inputs = common::GoldenInputs::load(&case);
    let (rows, classes) = (case.rows(), case.classes());
    let z: Vec<f16> = inputs.logits.iter().map(|&v| f16::from_f32(v)).collect();
    let p: Vec<f16> = inputs
        .probabilities
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let dict =
        format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, {classes}), }}");
    let (zf, pf) = (dir.path().join("z.npy"), dir.path().join("p.npy"));
    write_raw_npy(&zf, &dict, bytemuck::cast_slice(&z));
    write_raw_npy(&pf, &dict, bytemuck::cast_slice(&p));
    let want = xent::cpu::cross_entropy(
        &inputs.spec,
        Logits::new(&z, rows, classes).unwrap(),
        Targets::probabilities(&p),
    )
    .unwrap()
    .loss
    .unwrap();
    for cpu in paths() {
        let mut args = vec![
            "score",
            "--logits",
            path(&zf),
            "--targets",
            path(&pf),
            "--json",
        ];
        if cpu {
            args.push("--cpu");
        }
        let loss = json(&xent(&args))["loss"].as_f64().unwrap();
        assert!(
            close(loss, want, 1e-5 * want.abs()),
            "cpu={cpu}: {loss} vs {want}"
        );
    }
}

/// uint16 logits need --logits-dtype; --logits-dtype must agree with a file that has a dtype.
#[test]
fn logits_dtype_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bits = dir.path().join("bits.npy");
    write_raw_npy(
        &bits,
        "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 2), }",
        &[0, 0x3c, 0, 0x3c, 0, 0x3c, 0, 0x3c],
    );
    let halves = dir.path().join("halves.npy");
    write_raw_npy(
        &halves,
        "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }",
        &[0, 0x3c, 0, 0x3c, 0, 0x3c, 0, 0x3c],
    );
    let y = dir.path().join("y.npy");
    write_npy(&y, &[2], &[0i64, 1]);
    let run = |z: &Path, extra: &[&str]| {
        let mut args = vec!["score", "--cpu", "--logits", path(z), "--targets", path(&y)];
        args.extend_from_slice(extra);
        xent(&args)
    };
    expect_failure(
        &run(&bits, &[]),
        2,
        &["bits.npy", "uint16", "--logits-dtype"],
    );
    expect_failure(
        &run(&halves, &["--logits-dtype", "bf16"]),
        2,
        &["halves.npy", "float16", "bf16"],
    );
    // f16 ones read as f16: two classes of equal logits, loss ln 2.
    for (z, extra) in [(&bits, &["--logits-dtype", "f16"][..]), (&halves, &[][..])] {
        let mut args = extra.to_vec();
        args.push("--json");
        let j = json(&run(z, &args));
        let loss = j["loss"].as_f64().unwrap();
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-12, "{loss}");
    }
}

/// `--metrics` on the hand-computed example of the scoring reference: row 0 (target 1, not
/// the argmax), row 1 (target 1, the argmax), row 2 ignored. Log-probabilities from Python's
/// math module.
#[test]
fn token_metrics_through_score() {
    let dir = tempfile::tempdir().unwrap();
    let (zp, yp, pp) = (
        dir.path().join("z.npy"),
        dir.path().join("y.npy"),
        dir.path().join("p.npy"),
    );
    let z = [2.0_f32, 1.0, 0.0, -1.0, 4.0, 0.0, 9.0, -9.0, 0.0];
    write_npy(&zp, &[3, 3], &z);
    write_npy(&yp, &[3], &[1_i64, 1, -100]);
    let (l0, l1) = (-1.4076059644443801_f64, -0.024744890138822306_f64);
    let nll = -(l0 + l1) / 2.0;
    let base = [
        "score",
        "--logits",
        path(&zp),
        "--targets",
        path(&yp),
        "--ignore-index",
        "-100",
        "--metrics",
        "--json",
    ];
    let engines = engines();
    for engine in engines {
        for (top_k, want_top_k) in [(None, 1.0), (Some("1"), 0.5)] {
            let mut args: Vec<&str> = base.iter().copied().chain(engine.iter().copied()).collect();
            if let Some(k) = top_k {
                args.extend(["--top-k", k]);
            }
            let v = json(&xent(&args));
            let label = format!("{args:?}");
            assert_eq!(v["accuracy"].as_f64(), Some(0.5), "{label}");
            assert_eq!(v["top_k"].as_u64(), Some(top_k.map_or(5, |_| 1)), "{label}");
            assert_eq!(v["top_k_accuracy"].as_f64(), Some(want_top_k), "{label}");
            let got = v["nll"].as_f64().unwrap();
            assert!((got - nll).abs() < 1e-6, "{label}: nll {got} vs {nll}");
            let ppl = v["perplexity"].as_f64().unwrap();
            assert!(
                (ppl / nll.exp() - 1.0).abs() < 1e-6,
                "{label}: perplexity {ppl}"
            );
            // The loss is the same mean NLL here (no weights, no smoothing).
            assert!((v["loss"].as_f64().unwrap() - nll).abs() < 1e-6, "{label}");
        }
    }
    // Without --metrics the keys are null; with probabilities, --metrics is refused.
    let v = json(&xent(&[
        "score",
        "--logits",
        path(&zp),
        "--targets",
        path(&yp),
        "--ignore-index",
        "-100",
        "--json",
        "--cpu",
    ]));
    assert!(v["accuracy"].is_null() && v["perplexity"].is_null());
    write_npy(&pp, &[3, 3], &[1.0_f32 / 3.0; 9]);
    let o = xent(&[
        "score",
        "--logits",
        path(&zp),
        "--targets",
        path(&pp),
        "--metrics",
        "--cpu",
    ]);
    expect_failure(&o, 2, &["--metrics", "class indices"]);
}

/// `xent eval` on a hand-computed multiple-choice example, C = 2, logits ln 3 and 0 so every
/// probability is 1/2, 3/4 or 1/4:
/// - question 0: choice A (sequence 0, row 0 [ln 3, 0], token 0: ln 3/4, greedy, 1 character),
///   choice B (sequence 1, rows 1–2 [0, 0], token 1 twice: 2·ln 1/2, not greedy as the tie
///   goes to class 0, 100 characters); gold B: acc picks A (0), acc_norm picks B (1);
/// - question 1: choice A (sequence 2, row 3 [0, ln 3], token 1: ln 3/4, greedy), choice B
///   (sequence 3, row 4, token 0: ln 1/4), 5 characters each; gold A: both right.
///
/// With two rows per batch, sequence 1 spans the first two batches. The summary's aggregates
/// (the harness's perplexity, the per-token perplexity, the greedy fraction) are checked
/// against closed forms; zero lengths, empty sequences and uint16 tokens are refused.
#[test]
fn eval_sequences_and_multiple_choice_hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    let ln3 = 3.0_f32.ln();
    write_npy(
        &file("z.npy"),
        &[5, 2],
        &[ln3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ln3, 0.0, ln3],
    );
    write_npy(&file("y.npy"), &[5], &[0_i64, 1, 1, 1, 0]);
    write_npy(&file("o.npy"), &[5], &[0_i64, 1, 3, 4, 5]);
    write_npy(&file("q.npy"), &[4], &[0_i64, 0, 1, 1]);
    write_npy(&file("l.npy"), &[4], &[1_i64, 100, 5, 5]);
    write_npy(&file("g.npy"), &[2], &[1_i64, 0]);
    let (f, h) = ((0.75_f64).ln(), (0.5_f64).ln());
    let want = [
        (f, true, 1),
        (2.0 * h, false, 2),
        (f, true, 1),
        ((0.25_f64).ln(), false, 1),
    ];
    // `xent eval` with the files given by flag (the six above unless replaced) and `extra`.
    let eval = |files: &[(&str, &Path)], extra: &[&str]| {
        let mut args = vec!["eval".to_string()];
        for (flag, name) in [
            ("--logits", "z"),
            ("--targets", "y"),
            ("--offsets", "o"),
            ("--choices", "q"),
            ("--lengths", "l"),
            ("--gold", "g"),
        ] {
            let given = files.iter().find(|(f, _)| *f == flag);
            match given {
                Some((_, p)) if p.as_os_str().is_empty() => continue,
                Some((_, p)) => args.extend([flag.to_string(), path(p).to_string()]),
                None => args.extend([
                    flag.to_string(),
                    path(&file(&format!("{name}.npy"))).to_string(),
                ]),
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        xent(&args)
    };
    let none = Path::new("");
    let base = ["--batch-rows", "2", "--json"];
    let engines = engines();
    for engine in engines {
        let args: Vec<&str> = base.iter().copied().chain(engine.iter().copied()).collect();
        let o = eval(&[], &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines: Vec<serde_json::Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4 + 2 + 1, "{}", stdout(&o));
        for (s, (ll, greedy, tokens)) in want.iter().enumerate() {
            let v = &lines[s];
            assert_eq!(v["sequence"].as_u64(), Some(s as u64));
            let got = v["loglikelihood"].as_f64().unwrap();
            assert!((got - ll).abs() < 1e-6, "sequence {s}: {got} vs {ll}");
            assert_eq!(v["is_greedy"].as_bool(), Some(*greedy), "sequence {s}");
            assert_eq!(v["tokens"].as_u64(), Some(*tokens), "sequence {s}");
            let ppl = v["perplexity"].as_f64().unwrap();
            assert!((ppl / (-ll / *tokens as f64).exp() - 1.0).abs() < 1e-6);
        }
        let q0 = &lines[4];
        assert_eq!(
            (
                q0["acc"].as_bool(),
                q0["acc_norm"].as_bool(),
                q0["predicted"].as_u64()
            ),
            (Some(false), Some(true), Some(0))
        );
        let q1 = &lines[5];
        assert_eq!(
            (q1["acc"].as_bool(), q1["acc_norm"].as_bool()),
            (Some(true), Some(true))
        );
        assert_eq!(lines[6]["acc"].as_f64(), Some(0.5));
        assert_eq!(lines[6]["acc_norm"].as_f64(), Some(1.0));
        assert_eq!(lines[6]["sequences"].as_u64(), Some(4));
        // The aggregates, by hand: Σ ll = 2·ln 3/4 + 4·ln 1/2 = ln 9/256 over 4 sequences and
        // 5 tokens, so the harness's perplexity exp(−Σ ll / 4) = (256/9)^(1/4) = 4/√3 and
        // the per-token one (256/9)^(1/5); 2 of 4 sequences are greedy.
        for (key, want) in [
            ("perplexity", 4.0 / 3.0_f64.sqrt()),
            ("token_perplexity", (256.0_f64 / 9.0).powf(0.2)),
            ("greedy_fraction", 0.5),
        ] {
            let got = lines[6][key].as_f64().unwrap_or(f64::NAN);
            assert!(
                (got - want).abs() < 1e-6,
                "{engine:?} {key}: {got} vs {want}"
            );
        }
    }
    // Text output names the values too.
    let o = eval(&[], &["--batch-rows", "2", "--cpu"]);
    for line in [
        "acc 0.500000, acc_norm 1.000000 over 2 questions",
        "perplexity 2.309401 (exp of minus the mean loglikelihood), token perplexity 1.953437, greedy fraction 0.500000 over 4 sequences",
    ] {
        assert!(stdout(&o).contains(line), "{}", stdout(&o));
    }
    // No sequences: nothing to average, so the aggregates are null.
    let (z0, y0, o0) = (file("z0.npy"), file("y0.npy"), file("o0.npy"));
    write_npy(&z0, &[0, 2], &[0.0_f32; 0]);
    write_npy(&y0, &[0], &[0_i64; 0]);
    write_npy(&o0, &[1], &[0_i64]);
    let nothing = [("--choices", none), ("--lengths", none), ("--gold", none)];
    let o = eval(
        &[
            &nothing[..],
            &[("--logits", &z0), ("--targets", &y0), ("--offsets", &o0)],
        ]
        .concat(),
        &["--cpu", "--json"],
    );
    let summary = json(&o);
    assert_eq!(summary["sequences"].as_u64(), Some(0), "{summary}");
    for key in ["perplexity", "token_perplexity", "greedy_fraction"] {
        assert!(summary[key].is_null(), "{key}: {summary}");
    }

    // Errors name the file at fault.
    let (bad_o, bad_y, bad_g) = (file("bad_o.npy"), file("bad_y.npy"), file("bad_g.npy"));
    write_npy(&bad_o, &[3], &[0_i64, 2, 4]);
    let sequences_only = [("--choices", none), ("--lengths", none), ("--gold", none)];
    let o = eval(
        &[&sequences_only[..], &[("--offsets", &bad_o)]].concat(),
        &["--cpu"],
    );
    expect_failure(&o, 2, &["bad_o.npy", "offsets"]);
    write_npy(&bad_y, &[5], &[0_i64, 1, 2, 1, 0]);
    let o = eval(
        &[&sequences_only[..], &[("--targets", &bad_y)]].concat(),
        &["--cpu"],
    );
    expect_failure(&o, 2, &["bad_y.npy", "row 2", "token 2"]);
    let o = eval(&[("--lengths", none), ("--gold", none)], &["--cpu"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--choices without --lengths and --gold"
    );
    write_npy(&bad_g, &[2], &[2_i64, 0]);
    let o = eval(&[("--gold", &bad_g)], &["--cpu"]);
    expect_failure(&o, 2, &["--gold", "question 0", "2 choices"]);
    // A length of 0 (acc_norm would divide by it) and a sequence of no tokens (it would score
    // 0, above every other choice) are refused, naming the entry.
    let (zero_l, empty_o) = (file("zero_l.npy"), file("empty_o.npy"));
    write_npy(&zero_l, &[4], &[1_i64, 100, 0, 5]);
    let o = eval(&[("--lengths", &zero_l)], &["--cpu"]);
    expect_failure(&o, 2, &["lengths", "zero_l.npy", "value 2 is 0", "≥ 1"]);
    write_npy(&empty_o, &[6], &[0_i64, 1, 3, 3, 4, 5]);
    let o = eval(
        &[
            ("--offsets", &empty_o),
            ("--choices", none),
            ("--lengths", none),
            ("--gold", none),
        ],
        &["--cpu"],
    );
    expect_failure(
        &o,
        2,
        &["offsets", "empty_o.npy", "sequence 2 has no tokens"],
    );
    // uint16 tokens are raw half bits to xent, not integers: the dtype is named.
    let u16_y = file("u16_y.npy");
    write_npy(&u16_y, &[5], &[0_u16, 1, 1, 1, 0]);
    let o = eval(
        &[&sequences_only[..], &[("--targets", &u16_y)]].concat(),
        &["--cpu"],
    );
    expect_failure(&o, 2, &["u16_y.npy", "int64 or int32", "found uint16"]);
}

/// `xent score --teacher` on the golden distillation cases: the mean loss, KL and entropy of
/// case.json, per-row losses and the gradient of the sum (PyTorch's), on the GPU and the CPU
/// reference; T² scaling; the reverse KL on both engines; the errors.
#[test]
fn distillation_through_score() {
    let dir = tempfile::tempdir().unwrap();
    let engines = engines();
    for case in golden_cases("distillation") {
        let (zp, tp) = (case.dir.join("logits.npy"), case.dir.join("teacher.npy"));
        let t = case.number("temperature").to_string();
        let base = [
            "score",
            "--logits",
            path(&zp),
            "--teacher",
            path(&tp),
            "--temperature",
            &t,
            "--json",
        ];
        for engine in &engines {
            let label = format!("{} {engine:?}", case.name);
            let args: Vec<&str> = base.iter().chain(engine).copied().collect();
            let v = json(&xent(&args));
            for (key, want) in [
                ("loss", "mean"),
                ("kl_divergence", "kl_mean"),
                ("entropy", "entropy_mean"),
            ] {
                let got = v[key].as_f64().unwrap();
                let want = case.number(want);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{label} {key}: {got} vs {want}"
                );
            }
            sum_rows_and_gradient(&label, &args, &case, dir.path());
        }
    }
    let case = golden_case("distill_T4");
    let (zp, tp) = (case.dir.join("logits.npy"), case.dir.join("teacher.npy"));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "score",
            "--logits",
            path(&zp),
            "--teacher",
            path(&tp),
            "--json",
        ];
        args.extend(extra);
        json(&xent(&args))
    };
    let plain = run(&["--temperature", "4", "--cpu"]);
    let scaled = run(&["--temperature", "4", "--t2-scale", "--cpu"]);
    assert_eq!(
        scaled["loss"].as_f64().unwrap(),
        16.0 * plain["loss"].as_f64().unwrap()
    );
    let reverse_cpu = run(&["--divergence", "reverse-kl", "--cpu"]);
    assert!(reverse_cpu["entropy"].is_null() && reverse_cpu["kl_divergence"].is_null());
    let r = reverse_cpu["loss"].as_f64().unwrap();
    assert!(r > 0.0);
    if gpu_available() {
        let reverse_gpu = run(&["--divergence", "reverse-kl"]);
        let g = reverse_gpu["loss"].as_f64().unwrap();
        assert!((g - r).abs() <= 1e-5 * r, "reverse KL: GPU {g} vs CPU {r}");
    }
    // JSD with β = 0 is KL(p‖q) (at T = 1 here); β = 0.3 on the GPU as on the CPU.
    let jsd = run(&["--divergence", "jsd", "--beta", "0", "--cpu"]);
    let kl = run(&["--cpu"])["kl_divergence"].as_f64().unwrap();
    assert!((jsd["loss"].as_f64().unwrap() - kl).abs() <= 1e-12 * kl);
    if gpu_available() {
        let cpu = run(&["--divergence", "jsd", "--beta", "0.3", "--cpu"])["loss"]
            .as_f64()
            .unwrap();
        let gpu = run(&["--divergence", "jsd", "--beta", "0.3"])["loss"]
            .as_f64()
            .unwrap();
        assert!(
            (gpu - cpu).abs() <= 1e-5 * cpu,
            "JSD: GPU {gpu} vs CPU {cpu}"
        );
    }

    let score = |extra: &[&str]| {
        let mut args = vec!["score", "--logits", path(&zp)];
        args.extend(extra);
        xent(&args)
    };
    expect_failure(
        &score(&["--teacher", path(&tp), "--temperature", "0", "--cpu"]),
        2,
        &["--temperature"],
    );
    expect_failure(
        &score(&[
            "--teacher",
            path(&tp),
            "--divergence",
            "jsd",
            "--beta",
            "2",
            "--cpu",
        ]),
        2,
        &["--beta"],
    );
    // --beta needs --divergence (clap's usage error), and weighs only jsd.
    assert_eq!(
        score(&["--teacher", path(&tp), "--beta", "0.5", "--cpu"])
            .status
            .code(),
        Some(2)
    );
    expect_failure(
        &score(&[
            "--teacher",
            path(&tp),
            "--divergence",
            "kl",
            "--beta",
            "0.5",
            "--cpu",
        ]),
        2,
        &["--beta", "jsd"],
    );
    let small = dir.path().join("small.npy");
    write_npy(&small, &[2, 3], &[0.0_f32; 6]);
    expect_failure(
        &score(&["--teacher", path(&small), "--cpu"]),
        2,
        &["small.npy", "shaped like"],
    );
    let targets = case.dir.join("logits.npy");
    expect_failure(
        &score(&["--targets", path(&targets), "--temperature", "2", "--cpu"]),
        2,
        &["--temperature", "--teacher"],
    );
}

/// `xent score --topk-indices --topk-probs` on the golden case `sparse_top8`: the sum and mean
/// of case.json, per-row losses and the gradient of the sum, on the GPU and the CPU
/// reference; a repeated index and a shape mismatch name their file.
#[test]
fn top_k_targets_through_score() {
    let case = golden_case("sparse_top8");
    let dir = tempfile::tempdir().unwrap();

    let (zp, ip, pp) = (
        case.dir.join("logits.npy"),
        case.dir.join("topk_idx.npy"),
        case.dir.join("topk_prob.npy"),
    );
    let base = [
        "score",
        "--logits",
        path(&zp),
        "--topk-indices",
        path(&ip),
        "--topk-probs",
        path(&pp),
        "--json",
    ];
    let engines = engines();
    for engine in &engines {
        let args: Vec<&str> = base.iter().chain(engine).copied().collect();
        let v = json(&xent(&args));
        let mean = case.number("mean");
        assert!(
            (v["loss"].as_f64().unwrap() - mean).abs() <= 1e-5 * mean.abs(),
            "{engine:?}"
        );
        let v = sum_rows_and_gradient(&format!("{engine:?}"), &args, &case, dir.path());
        assert_eq!(v["k"].as_u64(), Some(8));
    }
    let mut idx = case.i64s("topk_idx.npy");
    let k = 8;
    idx[5 * k + 3] = idx[5 * k];
    let dup = dir.path().join("dup.npy");
    write_npy(&dup, &[case.rows() as u64, k as u64], &idx);
    let o = xent(&[
        "score",
        "--logits",
        path(&zp),
        "--topk-indices",
        path(&dup),
        "--topk-probs",
        path(&pp),
        "--cpu",
    ]);
    expect_failure(&o, 2, &["dup.npy", "row 5", "more than once"]);
    if gpu_available() {
        let o = xent(&[
            "score",
            "--logits",
            path(&zp),
            "--topk-indices",
            path(&dup),
            "--topk-probs",
            path(&pp),
        ]);
        expect_failure(&o, 2, &["dup.npy", "row 5"]);
    }
    let short = dir.path().join("short.npy");
    write_npy(&short, &[2, k as u64], &[0.1_f32; 16]);
    let o = xent(&[
        "score",
        "--logits",
        path(&zp),
        "--topk-indices",
        path(&ip),
        "--topk-probs",
        path(&short),
        "--cpu",
    ]);
    expect_failure(&o, 2, &["short.npy", "shaped like"]);
}

/// Top-k targets take --z-loss and --softcap as dense targets do: the loss, the z-loss (JSON
/// `z_loss`, `z_loss_sum`) and the gradient of the mean are the library's f64 reference on the
/// golden case's logits, on the CPU and the GPU; options a top-k target does not take are
/// refused, and a bad λ names --z-loss.
#[test]
fn top_k_targets_take_the_z_loss_and_the_softcap() {
    let case = golden_case("sparse_top8");
    let dir = tempfile::tempdir().unwrap();
    let (zp, ip, pp) = (
        case.dir.join("logits.npy"),
        case.dir.join("topk_idx.npy"),
        case.dir.join("topk_prob.npy"),
    );
    let (z, idx, p) = (
        case.f32s("logits.npy"),
        case.i64s("topk_idx.npy"),
        case.f32s("topk_prob.npy"),
    );
    let (rows, classes, k) = (case.rows(), case.classes(), 8);
    let spec = xent::CrossEntropy::new()
        .with_reduction(xent::Reduction::Mean)
        .with_z_loss(0.01)
        .with_softcap(5.0);
    let (want, want_grad) = xent::scoring::sparse_cross_entropy_grad(
        &spec,
        xent::Logits::new(&z, rows, classes).unwrap(),
        xent::scoring::SparseTargets::new(&idx, &p, k),
        xent::Upstream::Scalar(1.0),
    )
    .unwrap();
    let grad_out = dir.path().join("grad.npy");
    let base = [
        "score",
        "--logits",
        path(&zp),
        "--topk-indices",
        path(&ip),
        "--topk-probs",
        path(&pp),
        "--z-loss",
        "0.01",
        "--softcap",
        "5",
        "--grad",
        path(&grad_out),
        "--json",
    ];
    for engine in engines() {
        let args: Vec<&str> = base.iter().chain(&engine).copied().collect();
        let v = json(&xent(&args));
        for (key, w) in [
            ("loss", want.loss.unwrap()),
            ("z_loss", want.reduced_z_loss().unwrap()),
            ("z_loss_sum", want.z_loss_sum.unwrap()),
        ] {
            let got = v[key].as_f64().unwrap();
            assert!(
                (got - w).abs() <= 1e-5 * w.abs(),
                "{engine:?} {key}: {got} vs {w}"
            );
        }
        let grad: Vec<f32> = read_npy(&grad_out);
        for (j, (&g, &w)) in grad.iter().zip(&want_grad).enumerate() {
            // Capped logits lie in (−5, 5): the f32 element tolerance at scale 1/N.
            let tol = (1.0 + 1.0) / rows as f64 * (8.0 * 5.0 * f32::EPSILON as f64 + 4e-6);
            assert!(
                (g as f64 - w).abs() <= tol,
                "{engine:?} gradient {j}: {g} vs {w}"
            );
        }
    }
    let topk = ["--topk-indices", path(&ip), "--topk-probs", path(&pp)];
    for refused in [
        &["--label-smoothing", "0.1"][..],
        &["--ignore-index", "-100"],
    ] {
        let args = [
            &["score", "--logits", path(&zp)][..],
            &topk,
            refused,
            &["--cpu"],
        ]
        .concat();
        let o = xent(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(refused[0]) && err.contains("--topk-indices"),
            "{err}"
        );
    }
    let args = [
        &["score", "--logits", path(&zp)][..],
        &topk,
        &["--z-loss", "-1", "--cpu"],
    ]
    .concat();
    expect_failure(&xent(&args), 2, &["--z-loss", "-1"]);
    // More entries a row than the GPU takes: refused naming the file; the reference takes them.
    let (rows, classes, k) = (2usize, 300usize, xent::gpu::MAX_SPARSE_K + 1);
    let many_z = dir.path().join("many_z.npy");
    let many_i = dir.path().join("many_i.npy");
    let many_p = dir.path().join("many_p.npy");
    write_npy(
        &many_z,
        &[rows as u64, classes as u64],
        &vec![0.5f32; rows * classes],
    );
    let idx: Vec<i64> = (0..rows).flat_map(|_| 0..k as i64).collect();
    write_npy(&many_i, &[rows as u64, k as u64], &idx);
    write_npy(
        &many_p,
        &[rows as u64, k as u64],
        &vec![1.0f32 / k as f32; rows * k],
    );
    let args = [
        "score",
        "--logits",
        path(&many_z),
        "--topk-indices",
        path(&many_i),
        "--topk-probs",
        path(&many_p),
        "--json",
    ];
    if gpu_available() {
        let named = format!("k = {k}");
        expect_failure(&xent(&args), 2, &["many_i.npy", &named, "--cpu"]);
    }
    let cpu: Vec<&str> = args.iter().copied().chain(["--cpu"]).collect();
    let v = json(&xent(&cpu));
    // Uniform logits: each entry costs ln C, and the probabilities sum to 1.
    let want = (classes as f64).ln();
    assert!((v["loss"].as_f64().unwrap() - want).abs() <= 1e-6 * want);
}

/// The engines a CLI test runs: the CPU reference, and the GPU where there is one.
fn engines() -> Vec<Vec<&'static str>> {
    let mut engines = vec![vec!["--cpu"]];
    if gpu_available() {
        engines.push(vec![]);
    }
    engines
}

/// Runs `args` under `sum` with `--per-row` and `--grad` into `dir`, and checks the golden
/// `case`'s sum, per-row losses (`loss_none.npy`) and gradient of the sum (`grad_sum.npy`,
/// PyTorch's, within the f32 element tolerance at scale 1 and the largest |logit| of the
/// case's logits and teacher, plus half an ulp of the stored value); returns the JSON output.
fn sum_rows_and_gradient(
    label: &str,
    args: &[&str],
    case: &GoldenCase,
    dir: &Path,
) -> serde_json::Value {
    let (rows_out, grad_out) = (dir.join("rows.npy"), dir.join("grad.npy"));
    let mut args = args.to_vec();
    args.extend([
        "--reduction",
        "sum",
        "--per-row",
        path(&rows_out),
        "--grad",
        path(&grad_out),
    ]);
    let v = json(&xent(&args));
    let sum = case.number("sum");
    let got = v["loss"].as_f64().unwrap();
    assert!(
        (got - sum).abs() <= 1e-5 * sum.abs(),
        "{label}: sum {got} vs {sum}"
    );
    let per_row: Vec<f32> = read_npy(&rows_out);
    for (i, (g, w)) in per_row.iter().zip(case.f64s("loss_none.npy")).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{label}: row {i}: {g} vs {w}"
        );
    }
    let grad: Vec<f32> = read_npy(&grad_out);
    let want = case.f32s("grad_sum.npy");
    assert_eq!(grad.len(), want.len(), "{label}: gradient length");
    let mut values = case.f32s("logits.npy");
    if case.dir.join("teacher.npy").exists() {
        values.extend(case.f32s("teacher.npy"));
    }
    let max = values.iter().fold(0.0_f64, |m, &v| m.max((v as f64).abs()));
    for (j, (g, w)) in grad.iter().zip(&want).enumerate() {
        let tol = common::element_tolerance(1.0, 1.0, max) + 0.5 * common::ulp_f32(*w as f64);
        assert!(
            (g - w).abs() as f64 <= tol,
            "{label}: gradient {j}: {g} vs {w}"
        );
    }
    v
}

/// The files of `dir` whose names start with a dot: xent's temporary outputs, if any were left.
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// A run that fails part way leaves an existing --per-row or --grad file as it was (the
/// outputs go to a temporary file, renamed over the destination only on success), on the
/// dense, top-k and distillation paths; a run that succeeds replaces the file (through a link,
/// which stays a link), and no temporary file is left either way.
#[test]
fn failed_runs_leave_existing_outputs_untouched() {
    let b = BadInputs::new();
    let old = b"not an npy\n";
    // Row 2 is out of range: batches of one row have written rows 0 and 1 by then.
    write_npy(&b.p("ybad.npy"), &[4], &[2i64, 0, 7, 1]);
    let dense = [
        "--logits",
        "z.npy",
        "--targets",
        "ybad.npy",
        "--batch-rows",
        "1",
    ];
    for (flag, extra) in [
        ("--per-row", &[][..]),
        ("--grad", &["--reduction", "sum"][..]),
        ("--grad", &["--reduction", "none"][..]),
    ] {
        std::fs::write(b.p("out.npy"), old).unwrap();
        b.expect_error(
            &[&dense[..], &[flag, "out.npy"], extra].concat(),
            &["ybad.npy", "row 2"],
        );
        assert_eq!(
            std::fs::read(b.p("out.npy")).unwrap(),
            old,
            "{flag} {extra:?}: the existing file was changed"
        );
    }
    // Both outputs at once, and the top-k path (a repeated index in row 2).
    std::fs::write(b.p("rows.npy"), old).unwrap();
    std::fs::write(b.p("grad.npy"), old).unwrap();
    write_npy(&b.p("ti.npy"), &[4, 2], &[0i64, 1, 2, 0, 1, 1, 0, 2]);
    write_npy(&b.p("tp.npy"), &[4, 2], &[0.5f32; 8]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--topk-indices",
            "ti.npy",
            "--topk-probs",
            "tp.npy",
            "--batch-rows",
            "1",
            "--reduction",
            "sum",
            "--per-row",
            "rows.npy",
            "--grad",
            "grad.npy",
        ],
        &["ti.npy", "row 2", "more than once"],
    );
    // Distillation: a truncated teacher, found in its last batch.
    let teacher = std::fs::read(b.p("z.npy")).unwrap();
    std::fs::write(b.p("cut.npy"), &teacher[..teacher.len() - 4]).unwrap();
    let o = xent_with(
        &[
            "score",
            "--logits",
            &b.s("z.npy"),
            "--teacher",
            "/dev/stdin",
            "--batch-rows",
            "1",
            "--per-row",
            &b.s("rows.npy"),
            "--grad",
            &b.s("grad.npy"),
            "--cpu",
        ],
        &[],
        Some(&b.p("cut.npy")),
    );
    expect_failure(&o, 2, &["teacher /dev/stdin", "truncated"]);
    for name in ["rows.npy", "grad.npy"] {
        assert_eq!(std::fs::read(b.p(name)).unwrap(), old, "{name} was changed");
    }
    assert_eq!(hidden_files(b.dir.path()), Vec::<String>::new());

    // Success replaces the file, through a link that stays a link.
    std::os::unix::fs::symlink(b.p("rows.npy"), b.p("link.npy")).unwrap();
    let o = xent(&[
        "score",
        "--logits",
        &b.s("z.npy"),
        "--targets",
        &b.s("y.npy"),
        "--batch-rows",
        "1",
        "--per-row",
        &b.s("link.npy"),
        "--grad",
        &b.s("grad.npy"),
        "--cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let per_row: Vec<f32> = read_npy(&b.p("rows.npy"));
    assert_eq!(per_row.len(), 4);
    // Row 0: z = [0.5, −1, 2], target 2: lse − 2, by hand.
    let lse = (0.5f64.exp() + (-1.0f64).exp() + 2.0f64.exp()).ln();
    assert!(close(per_row[0] as f64, lse - 2.0, 1e-6), "{per_row:?}");
    assert!(
        std::fs::symlink_metadata(b.p("link.npy"))
            .unwrap()
            .is_symlink()
    );
    let (_, shape, _) = read_gradient(&b.p("grad.npy"));
    assert_eq!(shape, [4, 3]);
    assert_eq!(hidden_files(b.dir.path()), Vec::<String>::new());
}

/// A finite float64 value beyond the float32 range would silently become ±inf (and NaN): it
/// is bad input naming the file, row and column, in logits, teacher logits and
/// probabilities; float32's largest value itself is read.
#[test]
fn float64_beyond_float32_is_refused() {
    let b = BadInputs::new();
    let mut z = vec![0.0f64; 12];
    z[5] = 1e39;
    write_npy(&b.p("z64.npy"), &[4, 3], &z);
    b.expect_error(
        &["--logits", "z64.npy", "--targets", "y.npy"],
        &[
            "logits",
            "z64.npy",
            "row 1, column 2",
            "1e39",
            "float32 range",
        ],
    );
    // In a later batch, the row counts from the start of the file.
    z[5] = 0.0;
    z[10] = -1e300;
    write_npy(&b.p("t64.npy"), &[4, 3], &z);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--teacher",
            "t64.npy",
            "--batch-rows",
            "2",
        ],
        &["teacher", "t64.npy", "row 3, column 1", "float32 range"],
    );
    let mut p = vec![1.0f64 / 3.0; 12];
    p[0] = 5e38;
    write_npy(&b.p("p64.npy"), &[4, 3], &p);
    b.expect_error(
        &["--logits", "z.npy", "--targets", "p64.npy"],
        &["targets", "p64.npy", "row 0, column 0", "float32 range"],
    );
    // The largest float32 is in range: row 0 = [MAX, 0, 0] with target 2 has loss MAX.
    z[10] = 0.0;
    z[0] = f32::MAX as f64;
    write_npy(&b.p("zmax.npy"), &[4, 3], &z);
    let j = json(&xent(&[
        "score",
        "--logits",
        &b.s("zmax.npy"),
        "--targets",
        &b.s("y.npy"),
        "--reduction",
        "none",
        "--cpu",
        "--json",
    ]));
    assert!(j["mean"].as_f64().unwrap().is_finite(), "{j}");
}

/// A finite logit beyond ±2^64 (the GPU's f32 limit) is bad input naming the logits file and
/// row, on every GPU path: class indices (plain, --grad, --metrics), top-k targets and eval;
/// no gradient file is left.
#[test]
fn logits_beyond_2_64_are_bad_input_on_every_path() {
    if !gpu_available() {
        return;
    }
    let b = BadInputs::new();
    let mut z = vec![0.0f32; 12];
    z[7] = 1e20;
    write_npy(&b.p("zbig.npy"), &[4, 3], &z);
    write_npy(&b.p("ti.npy"), &[4, 1], &[0i64, 1, 2, 0]);
    write_npy(&b.p("tp.npy"), &[4, 1], &[1.0f32; 4]);
    let want = ["logits", "zbig.npy", "row 2", "2^64"];
    let run = |args: &[&str]| {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".npy") {
                    b.s(a)
                } else {
                    a.to_string()
                }
            })
            .collect();
        xent(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let dense = ["score", "--logits", "zbig.npy", "--targets", "y.npy"];
    for extra in [
        &[][..],
        &["--grad", "g.npy"],
        &["--grad", "g.npy", "--reduction", "sum", "--batch-rows", "1"],
        &["--metrics"],
    ] {
        expect_failure(&run(&[&dense[..], extra].concat()), 2, &want);
        assert!(!b.p("g.npy").exists(), "{extra:?} left g.npy");
    }
    expect_failure(
        &run(&[
            "score",
            "--logits",
            "zbig.npy",
            "--topk-indices",
            "ti.npy",
            "--topk-probs",
            "tp.npy",
        ]),
        2,
        &want,
    );
    write_npy(&b.p("o.npy"), &[3], &[0i64, 2, 4]);
    expect_failure(
        &run(&[
            "eval",
            "--logits",
            "zbig.npy",
            "--targets",
            "y.npy",
            "--offsets",
            "o.npy",
        ]),
        2,
        &want,
    );
    // The f64 reference has no such limit.
    let o = run(&[&dense[..], &["--cpu"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `bench` refuses a bad --z-loss, --softcap or --shards before any work: status 2, one line,
/// nothing on stdout (no roofline printed first), at once.
#[test]
fn bench_options_are_checked_before_any_output() {
    for (args, fragments) in [
        (&["--z-loss", "-1"][..], &["--z-loss", "-1", ">= 0"][..]),
        (&["--z-loss", "nan"], &["--z-loss", "NaN"]),
        (&["--softcap", "0"], &["--softcap", "> 0"]),
        (&["--softcap", "inf"], &["--softcap", "finite"]),
        // Valid for the f64 reference, but not normal f32s, as the GPU takes them.
        (&["--z-loss", "1e-40"], &["--z-loss", "1.2e-38"]),
        (&["--softcap", "1e39"], &["--softcap", "3.4e38"]),
        (&["--shards", "0"], &["--shards 0", "at least 1"]),
        (&["--shards", "2,0"], &["--shards 0", "at least 1"]),
        (
            &["--shapes", "8x100,8x3", "--shards", "2,4"],
            &["--shards 4", "3 classes", "8x3"],
        ),
    ] {
        let clock = Instant::now();
        let o = xent(&[&["bench", "--quick"][..], args].concat());
        expect_failure(&o, 2, fragments);
        assert!(
            clock.elapsed() < Duration::from_secs(2),
            "{args:?}: checked late"
        );
    }
}

/// Zero counts and unclear messages: --top-k 0, top-k files with k = 0, uint16 targets (the
/// dtype is named), --topk-probs without --topk-indices (said in one line).
#[test]
fn zero_counts_and_dtypes_are_named() {
    let b = BadInputs::new();
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--targets",
            "y.npy",
            "--metrics",
            "--top-k",
            "0",
        ],
        &["--top-k 0", "at least 1"],
    );
    write_npy(&b.p("i0.npy"), &[4, 0], &[0i64; 0]);
    write_npy(&b.p("p0.npy"), &[4, 0], &[0.0f32; 0]);
    b.expect_error(
        &[
            "--logits",
            "z.npy",
            "--topk-indices",
            "i0.npy",
            "--topk-probs",
            "p0.npy",
        ],
        &["i0.npy", "k = 0"],
    );
    for (shape, name) in [(&[4u64, 3][..], "u2x.npy"), (&[4][..], "u2.npy")] {
        let n = shape.iter().product::<u64>() as usize;
        write_npy(&b.p(name), shape, &vec![1u16; n]);
        b.expect_error(
            &["--logits", "z.npy", "--targets", name],
            &["targets", name, "holds uint16", "neither class indices"],
        );
    }
    write_npy(&b.p("tp.npy"), &[4, 1], &[1.0f32; 4]);
    for extra in [&[][..], &["--targets", "y.npy"][..]] {
        b.expect_error(
            &[&["--logits", "z.npy", "--topk-probs", "tp.npy"][..], extra].concat(),
            &["--topk-probs", "needs --topk-indices"],
        );
    }
}
