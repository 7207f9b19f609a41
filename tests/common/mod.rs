//! Shared by the integration tests: the GPU context, the golden cases, random inputs and the
//! tolerance every GPU-versus-reference comparison uses.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xent::{
    CrossEntropy, Dtype, GpuContext, GpuOptions, Logits, LossOutput, Strategy, Targets, cpu,
};

/// The GPU context shared by a test binary, or `None` when `XENT_SKIP_GPU_TESTS=1` and there
/// is no adapter. Without that variable a missing adapter fails the test: CI must never pass
/// without having run the GPU.
pub fn gpu() -> Option<&'static GpuContext> {
    static GPU: OnceLock<Option<GpuContext>> = OnceLock::new();
    GPU.get_or_init(|| open(GpuOptions::default())).as_ref()
}

/// A context of its own (its own device), not the shared one; `None` as for [`gpu`].
pub fn fresh_gpu() -> Option<GpuContext> {
    open(GpuOptions::default())
}

/// A context whose bindings are capped at `bytes`, so chunking runs on small inputs.
pub fn gpu_with_binding_cap(bytes: u64) -> Option<GpuContext> {
    open(GpuOptions::default().with_max_binding_bytes(bytes))
}

fn open(options: GpuOptions) -> Option<GpuContext> {
    match GpuContext::with_options(options) {
        Ok(ctx) => {
            static PRINTED: OnceLock<()> = OnceLock::new();
            PRINTED.get_or_init(|| {
                eprintln!(
                    "xent tests: GPU adapter {}",
                    xent::gpu::describe_adapter(ctx.adapter_info())
                )
            });
            Some(ctx)
        }
        Err(e) if std::env::var("XENT_SKIP_GPU_TESTS").as_deref() == Ok("1") => {
            eprintln!("xent tests: skipping GPU checks (XENT_SKIP_GPU_TESTS=1): {e}");
            None
        }
        Err(e) => panic!(
            "no GPU adapter for the GPU tests: {e}\n(set XENT_SKIP_GPU_TESTS=1 to skip them)"
        ),
    }
}

/// Float32 unit in the last place at |x| (for |x| ≥ the smallest normal).
pub fn ulp_f32(x: f64) -> f64 {
    let x = (x.abs() as f32).max(f32::MIN_POSITIVE);
    (f32::from_bits(x.to_bits() + 1) - x) as f64
}

/// The per-row tolerance of a GPU loss against an f64 reference (DESIGN.md, "Numbers").
///
/// The GPU reads the same f32 logits and accumulates in f32. Relative to the reference it
/// makes two kinds of error:
/// - rounding in Σ exp(z − m) and Σ a·(z − m) over up to C terms, in blocked (tree) order:
///   relative error ≲ (log2 C + terms per lane)·2⁻²⁴, far below 1e-5 for every C used here,
///   hence `1e-5·|ref|`;
/// - the absolute error of m + ln s and of a·(z − m) where the logits are large: each term is
///   off by about half an ulp of the largest |z|, weighted by the target mass B (1 for plain
///   class indices; more with weights); four ulps covers the ≤ 3 roundings in m, z − m and the
///   sum, hence `4·ulp(max|z|)·(1 + B)`.
pub fn row_tolerance(reference: f64, max_abs_logit: f64, target_mass: f64) -> f64 {
    1e-5 * reference.abs() + 4.0 * ulp_f32(max_abs_logit) * (1.0 + target_mass)
}

/// The tolerance of one GPU gradient element against an f64 reference, for a row whose
/// gradient is scaled by `scale`, with target mass `mass` and largest |logit| `max_abs`.
///
/// An element is s·(B·q_k − a_k) (+ the z-loss term). The GPU computes q_k = exp((z_k − m) −
/// ln s) in f32: z_k − m is off by up to an ulp of the largest |z|, and ln s by a few f32
/// ulps, so q_k is off by q_k·(2·ulp(max|z|) + 1e-6) relatively; B·q_k − a_k adds a rounding of
/// each term. Summed over the row, q_k ≤ 1: an absolute |s|·(1 + B)·(8·ulp(max|z|) + 4e-6)
/// bounds every element with room to spare.
pub fn element_tolerance(scale: f64, mass: f64, max_abs: f64) -> f64 {
    scale.abs() * (1.0 + mass) * (8.0 * ulp_f32(max_abs) + 4e-6)
}

/// Asserts a GPU gradient against a reference, row by row: within the f32 tolerance of
/// [`element_tolerance`], plus, for a gradient rounded to a half type, one unit in the last
/// place of that type (the one rounding).
#[allow(clippy::too_many_arguments)]
pub fn assert_gradient(
    label: &str,
    got: &[f32],
    want: &[f64],
    classes: usize,
    scale: &dyn Fn(usize) -> f64,
    mass: &[f64],
    max_abs: &[f64],
    rounded_to: Dtype,
) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (g, w)) in got.chunks(classes).zip(want.chunks(classes)).enumerate() {
        let f32_tol = element_tolerance(scale(i), mass[i], max_abs[i]);
        for (k, (&g, &w)) in g.iter().zip(w).enumerate() {
            let tol = f32_tol
                + if rounded_to.is_half() {
                    rounded_to.ulp(w)
                } else {
                    0.0
                };
            assert!(
                (g as f64 - w).abs() <= tol || (w.is_nan() && g.is_nan()),
                "{label}: row {i} class {k}: {g} vs {w} (tolerance {tol:e})"
            );
        }
    }
}

/// A strategy without subgroup reductions, f16 widened by integer operations.
pub fn plain_strategy(workgroup_size: u32, lanes_per_row: u32, split: u32, vec4: bool) -> Strategy {
    Strategy {
        workgroup_size,
        lanes_per_row,
        split,
        vec4,
        subgroups: false,
        f16_builtin: false,
    }
}

/// Whether two values agree within `tol`, treating equal infinities and NaN as agreeing.
pub fn close(got: f64, want: f64, tol: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= tol
}

/// Asserts that a GPU output matches a reference output, row by row and reduced.
/// `mass[i]` is row i's total target weight B, `max_abs[i]` its largest |finite logit|.
pub fn assert_outputs_match(
    label: &str,
    gpu: &LossOutput,
    reference: &LossOutput,
    max_abs: &[f64],
    mass: &[f64],
) {
    assert_eq!(gpu.rows, reference.rows, "{label}: rows");
    assert_eq!(
        gpu.ignored_rows, reference.ignored_rows,
        "{label}: ignored rows"
    );
    // The device sums the weights in f32 within a workgroup (≤ 256 rows: ≤ 8 roundings per
    // term) and then with compensated summation (≤ 2 more); weights are f32, so the reference's
    // f64 sum is exact to 2⁻⁵³.
    let denominator_tol = 10.0 * f32::EPSILON as f64 / 2.0 * reference.mean_denominator.abs();
    assert!(
        close(
            gpu.mean_denominator,
            reference.mean_denominator,
            denominator_tol
        ),
        "{label}: mean denominator {} vs {}",
        gpu.mean_denominator,
        reference.mean_denominator
    );
    let mut abs_budget = 0.0;
    for i in 0..reference.rows {
        let tol = row_tolerance(reference.per_row[i], max_abs[i], mass[i]);
        abs_budget += tol;
        assert!(
            close(gpu.per_row[i], reference.per_row[i], tol),
            "{label}: row {i} loss {} vs reference {} (tolerance {tol:e})",
            gpu.per_row[i],
            reference.per_row[i]
        );
        let lse_tol = row_tolerance(reference.log_sum_exp[i], max_abs[i], 0.0);
        assert!(
            close(gpu.log_sum_exp[i], reference.log_sum_exp[i], lse_tol),
            "{label}: row {i} log-sum-exp {} vs reference {}",
            gpu.log_sum_exp[i],
            reference.log_sum_exp[i]
        );
    }
    // The sum carries each row's error plus f32 rounding of the workgroup partials.
    let sum_tol = abs_budget + 1e-5 * reference.sum.abs();
    assert!(
        close(gpu.sum, reference.sum, sum_tol),
        "{label}: sum {} vs reference {} (tolerance {sum_tol:e})",
        gpu.sum,
        reference.sum
    );
    match (gpu.loss, reference.loss) {
        (Some(g), Some(r)) => assert!(
            close(
                g,
                r,
                sum_tol / reference.mean_denominator.abs().max(1e-300) + 1e-5 * r.abs()
            ),
            "{label}: reduced loss {g} vs reference {r}"
        ),
        (g, r) => assert_eq!(g.is_some(), r.is_some(), "{label}: reduced loss present"),
    }
    match (&gpu.entropy, &reference.entropy) {
        (Some(g), Some(r)) => {
            for i in 0..r.len() {
                let tol = 1e-5 * r[i].abs() + 1e-5;
                assert!(
                    close(g[i], r[i], tol),
                    "{label}: row {i} entropy {} vs {}",
                    g[i],
                    r[i]
                );
            }
        }
        (g, r) => assert_eq!(g.is_some(), r.is_some(), "{label}: entropy present"),
    }
}

/// Largest finite |z| per row (the scale of f32 rounding in that row).
pub fn max_abs_per_row(logits: &[f32], classes: usize) -> Vec<f64> {
    logits
        .chunks(classes)
        .map(|r| {
            r.iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
        })
        .collect()
}

/// A seeded source of test inputs.
pub struct Inputs {
    rng: StdRng,
}

impl Inputs {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Uniform logits in [-scale, scale) plus `offset`.
    pub fn logits(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-scale..scale) + offset)
            .collect()
    }

    pub fn classes(&mut self, rows: usize, classes: usize) -> Vec<i64> {
        (0..rows)
            .map(|_| self.rng.random_range(0..classes as i64))
            .collect()
    }

    /// Rows of probabilities, peaked like real soft labels (cubed uniforms, normalised).
    pub fn probabilities(&mut self, rows: usize, classes: usize) -> Vec<f32> {
        let mut p = Vec::with_capacity(rows * classes);
        for _ in 0..rows {
            let raw: Vec<f64> = (0..classes)
                .map(|_| self.rng.random::<f64>().powi(3))
                .collect();
            let total: f64 = raw.iter().sum::<f64>().max(f64::MIN_POSITIVE);
            p.extend(raw.iter().map(|v| (v / total) as f32));
        }
        p
    }

    pub fn weights(&mut self, classes: usize) -> Vec<f32> {
        (0..classes)
            .map(|_| self.rng.random_range(0.1..2.1))
            .collect()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
}

/// One PyTorch golden case from `tests/golden/<name>/`.
pub struct GoldenCase {
    pub name: String,
    pub dir: PathBuf,
    pub meta: serde_json::Value,
}

impl GoldenCase {
    pub fn rows(&self) -> usize {
        self.meta["rows"].as_u64().unwrap() as usize
    }
    pub fn classes(&self) -> usize {
        self.meta["classes"].as_u64().unwrap() as usize
    }
    pub fn f32s(&self, name: &str) -> Vec<f32> {
        read_npy(&self.dir.join(name))
    }
    pub fn f64s(&self, name: &str) -> Vec<f64> {
        read_npy(&self.dir.join(name))
    }
    pub fn i64s(&self, name: &str) -> Vec<i64> {
        read_npy(&self.dir.join(name))
    }
    /// A number from case.json (NaN is written as the bare token NaN).
    pub fn number(&self, key: &str) -> f64 {
        self.meta[key].as_f64().unwrap_or(f64::NAN)
    }
}

pub fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    npyz::NpyFile::new(&bytes[..])
        .and_then(|f| f.into_vec())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The golden case `name`, of any kind.
pub fn golden_case(name: &str) -> GoldenCase {
    ["cross_entropy", "distillation", "sparse_targets"]
        .into_iter()
        .flat_map(golden_cases)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

/// Every golden case of `kind` ("cross_entropy", "distillation", "sparse_targets"), from
/// `tests/golden/`, or from `XENT_GOLDEN_DIR` (for a test binary run away from its source tree).
pub fn golden_cases(kind: &str) -> Vec<GoldenCase> {
    let root = std::env::var_os("XENT_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"));
    let mut cases: Vec<GoldenCase> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("case.json").exists())
        .map(|dir| {
            let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
            // Python's json writes NaN bare; serde_json wants null.
            let meta = serde_json::from_str(&text.replace("NaN", "null")).unwrap();
            GoldenCase {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                dir,
                meta,
            }
        })
        .filter(|c| c.meta["kind"] == kind)
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// A problem: logits, both kinds of targets, and a spec.
pub struct Problem {
    pub rows: usize,
    pub classes: usize,
    pub logits: Vec<f32>,
    pub labels: Vec<i64>,
    pub probabilities: Vec<f32>,
}

impl Problem {
    pub fn random(seed: u64, rows: usize, classes: usize, scale: f32, offset: f32) -> Self {
        let mut r = Inputs::new(seed);
        Self {
            rows,
            classes,
            logits: r.logits(rows * classes, scale, offset),
            labels: r.classes(rows, classes),
            probabilities: r.probabilities(rows, classes),
        }
    }

    pub fn logits(&self) -> Logits<'_> {
        Logits::new(&self.logits, self.rows, self.classes).unwrap()
    }

    pub fn targets(&self, soft: bool) -> Targets<'_> {
        if soft {
            Targets::probabilities(&self.probabilities)
        } else {
            Targets::ClassIndices(&self.labels)
        }
    }

    /// B per row under `spec` (see common::row_tolerance).
    pub fn mass(&self, spec: &CrossEntropy, soft: bool) -> Vec<f64> {
        let c = self.classes;
        let eps = spec.label_smoothing();
        let w = |k: usize| spec.weights().map_or(1.0, |w| w[k] as f64);
        let all: f64 = (0..c).map(w).sum();
        (0..self.rows)
            .map(|i| {
                if soft {
                    (0..c)
                        .map(|k| {
                            w(k) * ((1.0 - eps) * self.probabilities[i * c + k] as f64
                                + eps / c as f64)
                        })
                        .sum()
                } else if spec.is_ignored(self.labels[i]) {
                    0.0
                } else {
                    (1.0 - eps) * w(self.labels[i] as usize) + eps / c as f64 * all
                }
            })
            .collect()
    }

    /// Runs `spec` on the GPU with `strategy` (the planner's if None) and checks it against
    /// the CPU reference; returns the GPU output.
    pub fn check(
        &self,
        gpu: &GpuContext,
        spec: &CrossEntropy,
        soft: bool,
        strategy: Option<Strategy>,
        label: &str,
    ) -> LossOutput {
        let targets = self.targets(soft);
        let got = match strategy {
            Some(s) => gpu.cross_entropy_with(spec, self.logits(), targets, s),
            None => gpu.cross_entropy(spec, self.logits(), targets),
        }
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let want = cpu::cross_entropy(spec, self.logits(), targets).unwrap();
        let label = format!(
            "{label} [{}x{} soft={soft} {spec:?} {strategy:?}]",
            self.rows, self.classes
        );
        assert_outputs_match(
            &label,
            &got,
            &want,
            &max_abs_per_row(&self.logits, self.classes),
            &self.mass(spec, soft),
        );
        got
    }
}

/// A golden cross-entropy case's inputs and spec.
pub struct GoldenInputs {
    pub logits: Vec<f32>,
    pub classes_idx: Vec<i64>,
    pub probabilities: Vec<f32>,
    pub soft: bool,
    pub spec: CrossEntropy,
}

impl GoldenInputs {
    pub fn load(case: &GoldenCase) -> Self {
        let soft = case.meta["soft_targets"].as_bool().unwrap();
        let mut spec = CrossEntropy::new().with_label_smoothing(case.number("label_smoothing"));
        if let Some(i) = case.meta["ignore_index"].as_i64() {
            spec = spec.with_ignore_index(i);
        }
        if case.meta["class_weights"].as_bool().unwrap() {
            spec = spec.with_weights(case.f32s("weights.npy"));
        }
        Self {
            logits: case.f32s("logits.npy"),
            classes_idx: if soft {
                Vec::new()
            } else {
                case.i64s("targets.npy")
            },
            probabilities: if soft {
                case.f32s("targets.npy")
            } else {
                Vec::new()
            },
            soft,
            spec,
        }
    }

    pub fn targets(&self) -> Targets<'_> {
        if self.soft {
            Targets::probabilities(&self.probabilities)
        } else {
            Targets::ClassIndices(&self.classes_idx)
        }
    }

    /// B per row of probabilities `p` (these or others of the same shape) under this spec.
    pub fn probability_mass(&self, p: &[f32], classes: usize) -> Vec<f64> {
        let eps = self.spec.label_smoothing();
        let w = |k: usize| self.spec.weights().map_or(1.0, |w| w[k] as f64);
        p.chunks(classes)
            .map(|p| {
                (0..classes)
                    .map(|k| w(k) * ((1.0 - eps) * p[k] as f64 + eps / classes as f64))
                    .sum()
            })
            .collect()
    }

    /// B per row: the total effective target weight (0 for an ignored row).
    pub fn target_mass(&self, classes: usize) -> Vec<f64> {
        let eps = self.spec.label_smoothing();
        let w = |k: usize| self.spec.weights().map_or(1.0, |w| w[k] as f64);
        let all: f64 = (0..classes).map(w).sum();
        if self.soft {
            self.probability_mass(&self.probabilities, classes)
        } else {
            self.classes_idx
                .iter()
                .map(|&y| {
                    if self.spec.is_ignored(y) {
                        0.0
                    } else {
                        (1.0 - eps) * w(y as usize) + eps / classes as f64 * all
                    }
                })
                .collect()
        }
    }
}

/// A storage buffer (that tests can copy back) holding `pad` zero bytes, then `data`, then 64
/// more zero bytes.
pub fn buffer_with(gpu: &GpuContext, pad: usize, data: &[u8]) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    let mut bytes = vec![0u8; pad];
    bytes.extend_from_slice(data);
    bytes.extend_from_slice(&[0u8; 64]);
    gpu.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test input"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        })
}

/// `count` f32 values of `buffer` from byte `offset`, copied back.
pub fn read_f32(gpu: &GpuContext, buffer: &wgpu::Buffer, offset: u64, count: usize) -> Vec<f32> {
    let bytes = count as u64 * 4;
    let back = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, offset, &back, 0, bytes);
    gpu.queue().submit([encoder.finish()]);
    back.slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    gpu.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .unwrap();
    let view = back.slice(..).get_mapped_range().unwrap();
    bytemuck::cast_slice(&view).to_vec()
}

/// A few strategies at their corners (scalar and vec4 loads, one lane to a whole workgroup per
/// row, a split row), with subgroups where the device has them.
pub fn corner_strategies(gpu: &GpuContext) -> Vec<Strategy> {
    let s = plain_strategy;
    let mut all = vec![
        Strategy::NAIVE,
        s(256, 1, 1, true),
        s(256, 8, 1, true),
        s(256, 256, 1, true),
        s(256, 256, 3, true),
    ];
    if gpu.facts().subgroup_lanes.is_some_and(|l| l <= 256) {
        all.push(Strategy {
            subgroups: true,
            ..s(256, 32, 1, true)
        });
    }
    all
}
