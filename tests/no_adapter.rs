//! A missing adapter is a clear error that says how to get one. The adapter variables are
//! process-wide, so this binary holds a single test.

use xent::{GpuContext, XentError};

#[test]
fn missing_adapters_are_clear_errors() {
    // SAFETY: the only test in this binary; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("WGPU_ADAPTER_NAME", "no such adapter 7f3a") };
    let err = GpuContext::new()
        .err()
        .expect("an adapter matched a made-up name");
    assert!(matches!(err, XentError::AdapterNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no such adapter 7f3a"), "{err}");

    // A backend with no adapter on this machine: Metal on Linux and Windows, Vulkan on macOS.
    let empty_backend = if cfg!(target_os = "macos") {
        "vulkan"
    } else {
        "metal"
    };
    unsafe {
        std::env::remove_var("WGPU_ADAPTER_NAME");
        std::env::set_var("WGPU_BACKEND", empty_backend);
    }
    let err = GpuContext::new()
        .err()
        .expect("an adapter on an empty backend");
    assert!(matches!(err, XentError::NoAdapter { .. }), "{err}");
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");
}
