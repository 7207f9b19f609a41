//! Every kernel, assembled with its shared WGSL, parses and validates with naga; every variant
//! (each set of pipeline constants, with and without subgroup reductions) translates with the
//! back end of each wgpu backend, under the options wgpu 30 gives it: SPIR-V (Vulkan), MSL
//! (Metal), HLSL (DX12) and GLSL (GL). Metal and DX12 are tested only this way. Needs no
//! adapter.
//!
//! A variant fails exactly where wgpu cannot run it: the subgroup variants on targets where
//! wgpu does not expose `Features::SUBGROUP`. There a device has no subgroup size
//! (`DeviceFacts::subgroup_lanes` is `None`), and the planner never picks them.

use naga::back::{PipelineConstants, glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ResourceBinding, ShaderStage};
use xent::Dtype;
use xent::gpu::pipelines::{F16Widening, Kernel, LossVariant, PipelineKey, TargetKind, slot};
use xent::gpu::planner::{DeviceFacts, Strategy, choose_strategy};

/// Parses `source` and validates it with `capabilities`, as `create_shader_module` does with
/// the capabilities of the device's features.
fn validate(source: &str, capabilities: Capabilities) -> Result<(Module, ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let info = Validator::new(ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
    Ok((module, info))
}

#[test]
fn every_kernel_parses_and_validates() {
    for kernel in Kernel::ALL {
        for subgroups in [false, true] {
            for f16 in [F16Widening::Integer, F16Widening::Unpack] {
                validate(&kernel.source(subgroups, f16), Capabilities::all()).unwrap_or_else(|e| {
                    panic!("{} subgroups={subgroups} {f16:?}: {e}", kernel.file_name())
                });
            }
        }
    }
}

/// One pipeline: a kernel, its reductions, and its pipeline constants.
struct Variant {
    kernel: Kernel,
    subgroups: bool,
    f16: F16Widening,
    constants: PipelineConstants,
}

impl Variant {
    fn label(&self) -> String {
        let mut constants: Vec<_> = self.constants.iter().collect();
        constants.sort_by(|a, b| a.0.cmp(b.0));
        format!("{} {:?} {constants:?}", self.kernel.file_name(), self.f16)
    }
}

/// Every kernel × reductions with and without subgroups × strategies at their corners × loss
/// variants (every flag on in some), with the constants `Pipelines` gives them (a subgroup
/// size of 32).
fn variants() -> Vec<Variant> {
    let strategy = |workgroup_size, lanes_per_row, split, vec4, subgroups, f16_builtin| Strategy {
        workgroup_size,
        lanes_per_row,
        split,
        vec4,
        subgroups,
        f16_builtin,
    };
    let base = LossVariant::LSE_ONLY;
    let losses = [
        base,
        LossVariant {
            target: TargetKind::ClassIndex,
            weights: true,
            smoothing: true,
            ignore: true,
            metrics: true,
            ..base
        },
        LossVariant {
            target: TargetKind::ClassIndex,
            index_i64: true,
            z_loss: true,
            softcap: true,
            grad_stats: true,
            reduction: 0,
            in_place: true,
            ..base
        },
        LossVariant {
            target: TargetKind::Probabilities,
            smoothing: true,
            entropy: true,
            grad_stats: true,
            scales_from_totals: true,
            ..base
        },
        LossVariant {
            target: TargetKind::Probabilities,
            targets_aligned: false,
            weights: true,
            softcap: true,
            z_loss: true,
            reduction: 1,
            ..base
        },
        LossVariant {
            dtype: Dtype::Bf16,
            target: TargetKind::Probabilities,
            targets_half: true,
            grad_stats: true,
            in_place: true,
            ..base
        },
        LossVariant {
            dtype: Dtype::Bf16,
            target: TargetKind::Probabilities,
            targets_aligned: false,
            grad_stats: true,
            paired: false,
            ..base
        },
        LossVariant {
            dtype: Dtype::F16,
            target: TargetKind::ClassIndex,
            softcap: true,
            grad_stats: true,
            paired: false,
            metrics: true,
            ..base
        },
        LossVariant {
            dtype: Dtype::F16,
            target: TargetKind::Probabilities,
            targets_half: true,
            targets_aligned: false,
            grad_stats: true,
            in_place: true,
            ..base
        },
        LossVariant {
            target: TargetKind::Teacher,
            grad_stats: true,
            divergence: 1,
            in_place: true,
            ..base
        },
        LossVariant {
            target: TargetKind::ClassIndex,
            partials: true,
            weights: true,
            smoothing: true,
            grad_stats: true,
            ..base
        },
        LossVariant {
            target: TargetKind::TopK,
            top_k: 8,
            grad_stats: true,
            z_loss: true,
            ..base
        },
        LossVariant {
            target: TargetKind::Teacher,
            divergence: 2,
            jsd_second: true,
            grad_stats: true,
            ..base
        },
        LossVariant {
            dtype: Dtype::Bf16,
            target: TargetKind::Teacher,
            targets_aligned: false,
            grad_stats: true,
            paired: false,
            ..base
        },
    ];
    let mut all = Vec::new();
    for kernel in Kernel::ALL {
        for subgroups in [false, true] {
            for (wg, lanes, split, vec4) in [
                (256, 256, 1, false),
                (256, 1, 1, true),
                (64, 8, 1, true),
                (256, 256, 8, true),
            ] {
                for variant in losses {
                    for native in [false, true] {
                        let key = PipelineKey {
                            kernel,
                            strategy: strategy(wg, lanes, split, vec4, subgroups, native),
                            variant,
                        };
                        if native && key.f16_widening() != F16Widening::Unpack {
                            continue;
                        }
                        let constants = key
                            .constants(32)
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect();
                        all.push(Variant {
                            kernel,
                            subgroups,
                            f16: key.f16_widening(),
                            constants,
                        });
                    }
                }
            }
        }
    }
    all
}

/// The shading language a wgpu backend hands its driver, at one version.
#[derive(Clone, Copy, Debug)]
enum Language {
    SpirV,
    /// Metal Shading Language (major, minor).
    Msl(u8, u8),
    Hlsl(hlsl::ShaderModel),
    Glsl(glsl::Version),
}

/// A backend with one shading-language version wgpu-hal 30 can pick, and whether wgpu exposes
/// `Features::SUBGROUP` there (the only capability the kernels need).
struct Target {
    name: &'static str,
    language: Language,
    subgroups: bool,
}

/// The targets, from wgpu-hal 30's adapters and pipeline code.
fn targets() -> Vec<Target> {
    let target = |name, language, subgroups| Target {
        name,
        language,
        subgroups,
    };
    vec![
        // vulkan/adapter.rs: SUBGROUP where the driver has subgroup shuffles (lavapipe does).
        target("Vulkan", Language::SpirV, true),
        // metal/adapter.rs: MSL 2.0 is macOS 10.13 / iOS 11; SUBGROUP needs the Mac2, Apple7
        // or Metal3 GPU family, queried only from macOS 10.15 / iOS 13, i.e. MSL 2.2.
        target("Metal, MSL 2.0", Language::Msl(2, 0), false),
        target("Metal, MSL 2.2", Language::Msl(2, 2), true),
        // dx12/adapter.rs: shader model 5.1 with FXC; SUBGROUP needs shader model 6.0 (DXC)
        // and wave operations.
        target(
            "DX12, SM 5.1",
            Language::Hlsl(hlsl::ShaderModel::V5_1),
            false,
        ),
        target(
            "DX12, SM 6.0",
            Language::Hlsl(hlsl::ShaderModel::V6_0),
            true,
        ),
        // gles/adapter.rs: the GL context's GLSL version, capped at 4.50 (llvmpipe's); compute
        // needs 4.30 core or ES 3.10; the GL backend never exposes SUBGROUP.
        target("GL 4.3", Language::Glsl(glsl::Version::Desktop(430)), false),
        target("GL 4.5", Language::Glsl(glsl::Version::Desktop(450)), false),
        target(
            "GLES 3.1",
            Language::Glsl(glsl::Version::new_gles(310)),
            false,
        ),
    ]
}

/// Every binding of `rows.wgsl`, in (group, binding) order: group 0 what a prepared loss owns,
/// group 1 a call's inputs and outputs.
fn bindings() -> Vec<ResourceBinding> {
    let group = |group, count| (0..count).map(move |binding| ResourceBinding { group, binding });
    group(0, slot::OWNED_COUNT)
        .chain(group(1, slot::INPUT_COUNT))
        .collect()
}

/// Whether a binding is the uniform parameters.
fn uniform(b: &ResourceBinding) -> bool {
    b.group == 0 && b.binding == slot::PARAMS
}

/// Whether a binding is read-only storage.
fn read_only(b: &ResourceBinding) -> bool {
    match b.group {
        0 => b.binding == slot::WEIGHTS,
        _ => b.binding != slot::OUTPUTS,
    }
}

/// The operands of a SPIR-V module's `OpCapability` instructions.
fn spirv_capabilities(words: &[u32]) -> impl Iterator<Item = u32> + '_ {
    const HEADER_WORDS: usize = 5;
    const OP_CAPABILITY: u32 = 17;
    let mut rest = &words[HEADER_WORDS..];
    std::iter::from_fn(move || {
        loop {
            let (&first, _) = rest.split_first()?;
            let (count, opcode) = ((first >> 16) as usize, first & 0xffff);
            let instruction = rest.get(..count.max(1))?;
            rest = &rest[instruction.len()..];
            if opcode == OP_CAPABILITY && count == 2 {
                return Some(instruction[1]);
            }
        }
    })
}

/// SPIR-V's subgroup capabilities, GroupNonUniform to GroupNonUniformQuad (each of the others
/// implies the first, which naga then leaves out).
const GROUP_NON_UNIFORM: std::ops::RangeInclusive<u32> = 61..=68;

/// Translates `variant` for `target`: validates the kernel with the target's capabilities,
/// applies the constants, and writes it with the options wgpu-hal uses. Returns whether the
/// output uses subgroup operations.
fn translate(target: &Target, variant: &Variant) -> Result<bool, String> {
    // wgpu grants f16 packing (DownlevelFlags::SHADER_F16_IN_F32) on every target here.
    let mut capabilities = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if target.subgroups {
        capabilities |= Capabilities::SUBGROUP;
    }
    let source = variant.kernel.source(variant.subgroups, variant.f16);
    let (module, info) = validate(&source, capabilities)?;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((ShaderStage::Compute, "main")),
        &variant.constants,
    )
    .map_err(|e| e.to_string())?;
    let bindings = bindings().into_iter();
    let count = slot::OWNED_COUNT + slot::INPUT_COUNT;
    let entry_point = || Some((ShaderStage::Compute, "main".to_string()));
    match target.language {
        Language::SpirV => {
            let words = spv::write_vec(&module, &info, &spv::Options::default(), None)
                .map_err(|e| e.to_string())?;
            Ok(spirv_capabilities(&words).any(|c| GROUP_NON_UNIFORM.contains(&c)))
        }
        Language::Msl(major, minor) => {
            // metal/device.rs: a buffer slot per binding, a sizes buffer for the runtime
            // arrays, bounds checks on, no faked bindings.
            let resources = bindings
                .enumerate()
                .map(|(i, b)| {
                    let target = msl::BindTarget {
                        buffer: Some(i as u8),
                        mutable: !uniform(&b) && !read_only(&b),
                        ..Default::default()
                    };
                    (b, target)
                })
                .collect();
            let restrict = naga::proc::BoundsCheckPolicy::Restrict;
            let options = msl::Options {
                lang_version: (major, minor),
                per_entry_point_map: [(
                    "main".to_string(),
                    msl::EntryPointResources {
                        resources,
                        immediates_buffer: None,
                        sizes_buffer: Some(count as u8),
                    },
                )]
                .into(),
                fake_missing_bindings: false,
                bounds_check_policies: naga::proc::BoundsCheckPolicies {
                    index: restrict,
                    buffer: restrict,
                    image_load: restrict,
                    binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
                },
                zero_initialize_workgroup_memory: false,
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: entry_point(),
                ..Default::default()
            };
            let (text, translation) = msl::write_string(&module, &info, &options, &pipeline)
                .map_err(|e| e.to_string())?;
            for name in translation.entry_point_names {
                name.map_err(|e| e.to_string())?;
            }
            Ok(text.contains("simd_"))
        }
        Language::Hlsl(shader_model) => {
            // dx12/device.rs: a register space per bind group, register = binding (the
            // register class follows the address space), no faked bindings.
            let binding_map = bindings
                .map(|b| {
                    let target = hlsl::BindTarget {
                        space: b.group as u8,
                        register: b.binding,
                        ..Default::default()
                    };
                    (b, target)
                })
                .collect();
            let options = hlsl::Options {
                shader_model,
                binding_map,
                fake_missing_bindings: false,
                zero_initialize_workgroup_memory: false,
                ..Default::default()
            };
            let pipeline = hlsl::PipelineOptions {
                entry_point: entry_point(),
            };
            let mut text = String::new();
            let reflection = hlsl::Writer::new(&mut text, &options, &pipeline)
                .write(&module, &info, None)
                .map_err(|e| e.to_string())?;
            for name in reflection.entry_point_names {
                name.map_err(|e| e.to_string())?;
            }
            Ok(text.contains("Wave"))
        }
        Language::Glsl(version) => {
            // gles/device.rs: uniform and storage blocks numbered separately, in (group,
            // binding) order.
            let mut storage_units = 0u8;
            let binding_map = bindings
                .map(|b| {
                    let unit = if uniform(&b) {
                        0
                    } else {
                        storage_units += 1;
                        storage_units - 1
                    };
                    (b, unit)
                })
                .collect();
            let options = glsl::Options {
                version,
                writer_flags: glsl::WriterFlags::ADJUST_COORDINATE_SPACE
                    | glsl::WriterFlags::FORCE_POINT_SIZE,
                binding_map,
                zero_initialize_workgroup_memory: false,
            };
            let pipeline = glsl::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: "main".to_string(),
                multiview: None,
            };
            let mut text = String::new();
            glsl::Writer::new(
                &mut text,
                &module,
                &info,
                &options,
                &pipeline,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut writer| writer.write())
            .map_err(|e| e.to_string())?;
            Ok(text.contains("GL_KHR_shader_subgroup"))
        }
    }
}

#[test]
fn every_variant_translates_wherever_wgpu_can_run_it() {
    let variants = variants();
    for target in targets() {
        for variant in &variants {
            let label = format!("{}: {}", target.name, variant.label());
            // Only a subgroup variant on a target without subgroups is out of reach, and
            // the_planner_never_picks_subgroups_without_them shows xent never asks for it.
            let needs_subgroups = variant.subgroups && variant.kernel.lane_reductions();
            let reachable = !needs_subgroups || target.subgroups;
            match translate(&target, variant) {
                Ok(uses_subgroups) => {
                    assert!(reachable, "{label}: translated, but wgpu could not run it");
                    assert_eq!(
                        uses_subgroups, needs_subgroups,
                        "{label}: subgroup operations in the output"
                    );
                }
                Err(e) => {
                    assert!(!reachable, "{label}: {e}");
                    assert!(
                        e.contains("SUBGROUP"),
                        "{label}: failed for another reason: {e}"
                    );
                }
            }
        }
    }
}

/// Device facts for the planner: `subgroup_lanes` as given, otherwise generous limits.
fn facts(subgroup_lanes: Option<u32>, cpu: bool, max_workgroup_size: u32) -> DeviceFacts {
    DeviceFacts {
        max_binding_bytes: 1 << 30,
        max_groups_per_dimension: 65_535,
        max_workgroup_size,
        subgroup_lanes,
        cpu,
        binding_alignment: 256,
        max_workgroup_storage_bytes: 32_768,
        f16_builtin: false,
    }
}

/// Shapes from one row and one class up to long rows and many rows.
fn shapes() -> impl Iterator<Item = (usize, usize)> {
    let rows = [1, 2, 7, 64, 1000, 1023, 1024, 4096, 70_000];
    let classes = [1, 2, 3, 5, 64, 1000, 4099, 32_000, 50_257, 131_073, 300_001];
    rows.into_iter()
        .flat_map(move |r| classes.into_iter().map(move |c| (r, c)))
}

#[test]
fn the_planner_never_picks_subgroups_without_them() {
    // GL, DX12 on shader model 5.1, older Metal: no subgroup size.
    for cpu in [false, true] {
        for max_workgroup_size in [64, 256, 1024] {
            let device = facts(None, cpu, max_workgroup_size);
            for (rows, classes) in shapes() {
                let s = choose_strategy(rows, classes, &device);
                assert!(!s.subgroups, "{rows}x{classes} on {device:?}: {s:?}");
                s.check(&device)
                    .unwrap_or_else(|e| panic!("{rows}x{classes} on {device:?}: {e}"));
            }
            // A caller's strategy that asks for them is refused.
            let asked = Strategy {
                subgroups: true,
                ..Strategy::NAIVE
            };
            assert!(asked.check(&device).is_err(), "{device:?}");
        }
    }
    // Where a device has them the planner does use them, so the check above means something.
    for cpu in [false, true] {
        let device = facts(Some(8), cpu, 256);
        assert!(
            shapes().all(|(r, c)| choose_strategy(r, c, &device).subgroups),
            "{device:?}"
        );
    }
}

/// The planner checks a strategy against the device's workgroup memory with
/// `Strategy::workgroup_memory`: that estimate must cover what the row kernels really declare
/// (naga's layout of their `var<workgroup>`s, after the pipeline constants), with and without
/// subgroup reductions, or a strategy the planner accepts could fail to compile.
#[test]
fn the_planner_counts_the_kernels_workgroup_memory() {
    for kernel in [Kernel::CrossEntropy, Kernel::MergeSplitRows] {
        for subgroups in [false, true] {
            for (wg, lanes) in [(64u32, 64u32), (256, 8), (256, 256), (1024, 1024)] {
                let strategy = Strategy {
                    workgroup_size: wg,
                    lanes_per_row: lanes,
                    split: 1,
                    vec4: true,
                    subgroups,
                    f16_builtin: false,
                };
                let key = PipelineKey {
                    kernel,
                    strategy,
                    variant: LossVariant {
                        target: TargetKind::ClassIndex,
                        metrics: true,
                        ..LossVariant::LSE_ONLY
                    },
                };
                let constants: PipelineConstants = key
                    .constants(32)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                let source = kernel.source(subgroups, F16Widening::Integer);
                let (module, info) = validate(&source, Capabilities::all()).unwrap();
                let (module, _) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((ShaderStage::Compute, "main")),
                    &constants,
                )
                .unwrap();
                let mut layouter = naga::proc::Layouter::default();
                layouter.update(module.to_ctx()).unwrap();
                let declared: u64 = module
                    .global_variables
                    .iter()
                    .filter(|(_, v)| v.space == naga::AddressSpace::WorkGroup)
                    .map(|(_, v)| layouter[v.ty].size as u64)
                    .sum();
                let device = facts(subgroups.then_some(32), false, 1024);
                let estimate = strategy.workgroup_memory(&device);
                assert!(
                    declared <= estimate,
                    "{} wg {wg} lanes {lanes} subgroups {subgroups}: declares {declared} bytes, the planner counts {estimate}",
                    kernel.file_name()
                );
            }
        }
    }
}
