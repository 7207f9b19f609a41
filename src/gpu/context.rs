//! The GPU context: adapter choice, device, pipelines, and error capture.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Result, XentError};

use super::pipelines::Pipelines;
use super::planner::DeviceFacts;

/// Options for a [`GpuContext`](super::GpuContext).
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Caps the bytes bound per dispatch below the adapter's own limit; rows are chunked to
    /// fit. Useful to bound memory use, and lets tests exercise chunking without gigabytes.
    pub max_binding_bytes: Option<u64>,
}

/// Every adapter wgpu can see on the backends in `WGPU_BACKEND` (all by default).
pub fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    let instance = instance(wgpu::Backends::all());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// An instance on `WGPU_BACKEND`'s backends, or on `default` when it is not set.
fn instance(default: wgpu::Backends) -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = default.with_env();
    wgpu::Instance::new(descriptor)
}

/// One line per adapter: backend, name, type, driver.
pub fn describe_adapter(info: &wgpu::AdapterInfo) -> String {
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{:?} | {} | {:?} | {}",
        info.backend,
        info.name,
        info.device_type,
        if driver.is_empty() {
            "driver unknown"
        } else {
            &driver
        }
    )
}

/// Picks the adapter: the one whose name contains `WGPU_ADAPTER_NAME` (case-insensitive) if
/// that is set, otherwise wgpu's choice for `WGPU_POWER_PREF` (high performance by default),
/// among the backends in `WGPU_BACKEND`.
pub fn select_adapter() -> Result<wgpu::Adapter> {
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let adapters = enumerate_adapters();
        let needle = wanted.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&needle))
            .ok_or(XentError::AdapterNotFound {
                wanted,
                available: if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                },
            });
    }
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::from_env()
            .unwrap_or(wgpu::PowerPreference::HighPerformance),
        // The adapter's real limits, not a bucketed approximation.
        ..Default::default()
    };
    // Vulkan, Metal and DX12 first; GL only where none of them has an adapter (probing GL
    // first would also make EGL complain on headless machines).
    let request = |backends| pollster::block_on(instance(backends).request_adapter(&options));
    request(wgpu::Backends::PRIMARY)
        .or_else(|_| request(wgpu::Backends::SECONDARY))
        .map_err(|e| XentError::NoAdapter {
            detail: e.to_string(),
        })
}

/// The features xent uses when the adapter has them.
pub const WANTED_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::SHADER_F16);

/// The device and everything compiled for it.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) pipelines: Pipelines,
    pub(crate) facts: DeviceFacts,
    lost: Arc<Mutex<Option<String>>>,
}

/// On GL, one call at a time drives the device, in the whole process.
///
/// wgpu-hal's GLES backend guards its GL context with a lock that waits at most six seconds
/// before panicking with "Could not lock adapter context. This is most-likely a deadlock."
/// (`AdapterContext::lock`, `CONTEXT_LOCK_TIMEOUT_SECS` in `gles/egl.rs`). `Queue::submit`
/// holds that lock while it replays the commands, and llvmpipe runs `glDispatchCompute` to
/// completion before returning; the fence wait (`glClientWaitSync`, up to 2.1 s a call) and
/// buffer mapping hold it too. So one thread's long dispatch made another thread's
/// `create_buffer` panic. Waiting here instead has no timeout.
///
/// One lock for all contexts, not one each: every adapter a wgpu instance enumerates on GL
/// gets a lock of its own but makes the instance's one EGL context current
/// (`enumerate_adapters` in `gles/egl.rs`), so two devices of one instance must not run at
/// once either. Vulkan, Metal and DX12 are free-threaded, and serialising them would only cost
/// throughput. Opening a device and compiling its modules take the lock too; dropping a
/// context does not, and a context on a caller's device does not serialise the caller's own
/// use of it.
static GL_SERIAL: Mutex<()> = Mutex::new(());

/// [`GL_SERIAL`], taken on GL; nothing elsewhere.
fn serialise(info: &wgpu::AdapterInfo) -> Option<MutexGuard<'static, ()>> {
    (info.backend == wgpu::Backend::Gl).then(|| GL_SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Gpu {
    pub(crate) fn open(options: &GpuOptions) -> Result<Self> {
        let adapter = select_adapter()?;
        let info = adapter.get_info();
        log::info!("xent adapter: {}", describe_adapter(&info));
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("xent"),
            required_features: adapter.features() & WANTED_FEATURES,
            // The adapter's own limits: wgpu's defaults cap bindings at 128 MiB.
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let serial = serialise(&info);
        let (device, queue) =
            pollster::block_on(adapter.request_device(&descriptor)).map_err(|e| {
                XentError::RequestDevice {
                    adapter: info.name.clone(),
                    detail: e.to_string(),
                }
            })?;
        let lost = Arc::new(Mutex::new(None));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                *flag.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("{reason:?}: {message}"));
            }
        });
        // wgpu's default handler panics; every operation here runs inside error scopes, so
        // anything that still escapes is logged rather than taking the program down.
        device.on_uncaptured_error(Arc::new(|e| log::error!("uncaptured wgpu error: {e}")));
        drop(serial);
        Self::build(device, queue, info, options, lost)
    }

    pub(crate) fn from_device(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        options: &GpuOptions,
    ) -> Result<Self> {
        let info = device.adapter_info();
        log::info!("xent on a caller's device: {}", describe_adapter(&info));
        Self::build(device.clone(), queue.clone(), info, options, Arc::default())
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        options: &GpuOptions,
        lost: Arc<Mutex<Option<String>>>,
    ) -> Result<Self> {
        let limits = device.limits();
        let binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let facts = DeviceFacts {
            max_binding_bytes: options
                .max_binding_bytes
                .map_or(binding, |cap| cap.min(binding))
                & !15,
            max_groups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_workgroup_size: limits
                .max_compute_workgroup_size_x
                .min(limits.max_compute_invocations_per_workgroup),
            subgroup_lanes: subgroup_lanes(&device, &info),
            cpu: info.device_type == wgpu::DeviceType::Cpu,
        };
        let serial = serialise(&info);
        let pipelines = with_error_scopes(&device, "compiling the shaders", || {
            Ok(Pipelines::new(&device, facts.subgroup_lanes))
        })?;
        drop(serial);
        Ok(Self {
            pipelines,
            device,
            queue,
            info,
            facts,
            lost,
        })
    }

    /// Runs `work` with wgpu's errors captured as [`XentError`]s, failing first if the device
    /// was lost. Every device operation of a call runs in here (pipelines compile on first use
    /// inside it too), so on GL this is where calls from several threads queue up.
    pub(crate) fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let _serial = serialise(&self.info);
        self.check_lost()?;
        let result = with_error_scopes(&self.device, what, work);
        self.check_lost()?;
        result
    }

    fn check_lost(&self) -> Result<()> {
        // A poll delivers a pending device-lost callback.
        let _ = self.device.poll(wgpu::PollType::Poll);
        match &*self.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(XentError::DeviceLost(why.clone())),
            None => Ok(()),
        }
    }
}

/// The smallest subgroup size, when the device has subgroup operations and it is a usable
/// power of two.
fn subgroup_lanes(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<u32> {
    let lanes = info.subgroup_min_size;
    (device.features().contains(wgpu::Features::SUBGROUP)
        && lanes.is_power_of_two()
        && (4..=128).contains(&lanes))
    .then_some(lanes)
}

/// Runs `work` inside wgpu error scopes and turns what they catch into [`XentError`]s.
/// Error scopes are per thread, so concurrent calls do not see each other's errors.
fn with_error_scopes<T>(
    device: &wgpu::Device,
    what: &str,
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = work();
    let validation = pollster::block_on(validation.pop());
    let internal = pollster::block_on(internal.pop());
    let oom = pollster::block_on(oom.pop());
    if oom.is_some() {
        return Err(XentError::OutOfMemory(what.to_string()));
    }
    if let Some(e) = validation.or(internal) {
        return Err(XentError::Gpu {
            context: what.to_string(),
            detail: e.to_string(),
        });
    }
    result
}
