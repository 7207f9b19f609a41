//! `xent info`: what wgpu sees and what xent would use.

use xent::gpu::{GpuContext, describe_adapter, enumerate_adapters};

use crate::CliError;
use crate::out::{Out, outln};

pub fn run() -> Result<(), CliError> {
    let mut out = Out::lock();
    let adapters = enumerate_adapters()?;
    outln!(out, "adapters ({}):", adapters.len())?;
    for a in &adapters {
        outln!(out, "  {}", describe_adapter(&a.get_info()))?;
    }
    let ctx = GpuContext::new()?;
    let info = ctx.adapter_info();
    let device = ctx.device();
    let limits = device.limits();
    let features = device.features();
    outln!(out, "xent uses: {}", describe_adapter(info))?;
    outln!(out, "limits:")?;
    let mib = |b: u64| format!("{b} ({:.0} MiB)", b as f64 / (1 << 20) as f64);
    outln!(
        out,
        "  max_storage_buffer_binding_size  {}",
        mib(limits.max_storage_buffer_binding_size)
    )?;
    outln!(
        out,
        "  max_buffer_size                  {}",
        mib(limits.max_buffer_size)
    )?;
    outln!(
        out,
        "  max_compute_workgroup_storage    {} bytes",
        limits.max_compute_workgroup_storage_size
    )?;
    outln!(
        out,
        "  max_compute_workgroups_per_dim   {}",
        limits.max_compute_workgroups_per_dimension
    )?;
    outln!(
        out,
        "  max_compute_invocations          {}",
        limits.max_compute_invocations_per_workgroup
    )?;
    outln!(out, "features:")?;
    for (name, flag) in [
        ("SUBGROUP", wgpu::Features::SUBGROUP),
        ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
        ("SHADER_F16", wgpu::Features::SHADER_F16),
    ] {
        outln!(
            out,
            "  {name:16} {}",
            if features.contains(flag) { "yes" } else { "no" }
        )?;
    }
    if features.contains(wgpu::Features::SUBGROUP) {
        outln!(
            out,
            "  subgroup size    {}..{}",
            info.subgroup_min_size,
            info.subgroup_max_size
        )?;
    }
    out.finish()
}
