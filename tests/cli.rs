//! The `xent` binary: every golden case through `score` (GPU and --cpu) against PyTorch's
//! values, every kind of bad input (status 2, one line naming the file or argument, nothing
//! on stdout), hostile inputs (headers, shapes, pipes, closed stdout), and `info`, `demo` and
//! `bench` running.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use common::{GoldenCase, close, golden_cases, read_npy};
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
    let mut args: Vec<String> = vec![
        "score".into(),
        "--logits".into(),
        case.dir.join("logits.npy").display().to_string(),
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
    let case = golden_cases("cross_entropy")
        .into_iter()
        .find(|c| c.name == "hard_31x1000")
        .unwrap();
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
        &["logits", "zi.npy", "float32 or float64"],
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
    let case = golden_cases("cross_entropy")
        .into_iter()
        .find(|c| c.name == "soft_21x9")
        .unwrap();
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
