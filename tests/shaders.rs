//! Every kernel, assembled with its shared WGSL, parses and validates with naga, and so does
//! every variant once its pipeline constants are applied. Needs no adapter.

use xent::gpu::pipelines::Kernel;

fn validate(source: &str, label: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(source)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(source)));
    (module, info)
}

#[test]
fn every_kernel_parses_and_validates() {
    for kernel in Kernel::ALL {
        for subgroups in [false, true] {
            validate(&kernel.source(subgroups), kernel.file_name());
        }
    }
}

#[test]
fn every_variant_compiles_to_spirv() {
    let strategies = [
        (256, 256, 1, 0),
        (256, 1, 1, 1),
        (64, 8, 1, 1),
        (256, 256, 8, 1),
    ];
    for (kernel, subgroups) in Kernel::ALL.iter().flat_map(|&k| [(k, false), (k, true)]) {
        let source = kernel.source(subgroups);
        let (module, info) = validate(&source, kernel.file_name());
        for (wg, lanes, split, vec4) in strategies {
            for (target, weights, smoothing, entropy) in
                [(0, 0, 0, 0), (1, 1, 1, 0), (2, 0, 1, 1), (2, 1, 0, 0)]
            {
                let constants: naga::back::PipelineConstants = [
                    ("WORKGROUP_SIZE", wg),
                    (
                        "LANES_PER_ROW",
                        if kernel == Kernel::MergeSplitRows {
                            1
                        } else {
                            lanes
                        },
                    ),
                    ("SPLIT", split),
                    ("VEC4", vec4),
                    ("TARGET_KIND", target),
                    ("HAS_WEIGHTS", weights),
                    ("HAS_SMOOTHING", smoothing),
                    ("ENTROPY", entropy),
                ]
                .into_iter()
                .chain(subgroups.then_some(("SUBGROUP_LANES", 32)))
                .map(|(k, v)| (k.to_string(), v as f64))
                .collect();
                let label = format!("{} {constants:?}", kernel.file_name());
                let (module, info) = naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, "main")),
                    &constants,
                )
                .unwrap_or_else(|e| panic!("{label}: {e}"));
                let options = naga::back::spv::Options::default();
                naga::back::spv::write_vec(&module, &info, &options, None)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
            }
        }
    }
}
