//! A missing adapter is a clear error that says how to get one, and a WGPU_BACKEND that names
//! no backend says so. The adapter variables are process-wide, so this binary holds a single
//! test.

use xent::{GpuContext, XentError};

#[test]
fn missing_adapters_are_clear_errors() {
    // SAFETY: the only test in this binary; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("WGPU_ADAPTER_NAME", "no such adapter 7f3a") };
    let err = GpuContext::new().expect_err("an adapter matched a made-up name");
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
    let err = GpuContext::new().expect_err("an adapter on an empty backend");
    assert!(matches!(err, XentError::NoAdapter { .. }), "{err}");
    assert!(err.to_string().contains("mesa-vulkan-drivers"), "{err}");

    // Values that name no backend (wgpu would warn and fall back to none): an error that
    // lists the valid names, from both ways of looking for adapters.
    for value in ["bogus", "", "vulkan,bogus", " , "] {
        unsafe { std::env::set_var("WGPU_BACKEND", value) };
        let err = GpuContext::new().expect_err("an adapter on a bogus backend");
        assert!(
            matches!(&err, XentError::UnknownBackend { value: v } if v == value),
            "{value:?}: {err}"
        );
        for name in ["vulkan", "metal", "dx12", "gl"] {
            assert!(err.to_string().contains(name), "{err}");
        }
        let listed = xent::gpu::enumerate_adapters();
        assert!(
            matches!(listed, Err(XentError::UnknownBackend { .. })),
            "{value:?}"
        );
    }
    // wgpu's spellings, any case, with spaces: accepted (whether adapters exist or not).
    let spelled = format!("{}, {empty_backend}", empty_backend.to_uppercase());
    unsafe { std::env::set_var("WGPU_BACKEND", &spelled) };
    assert!(xent::gpu::enumerate_adapters().is_ok());
    let err = GpuContext::new().expect_err("an adapter on an empty backend");
    assert!(!matches!(err, XentError::UnknownBackend { .. }), "{err}");
}
