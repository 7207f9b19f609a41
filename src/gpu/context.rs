//! The GPU context: adapter choice, device, pipelines, and error capture.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Result, XentError};

use super::pipelines::Pipelines;
use super::planner::DeviceFacts;

/// Options for a [`GpuContext`](super::GpuContext): `GpuOptions::default()` and the
/// `with_*` methods (non-exhaustive: options may be added in minor versions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GpuOptions {
    /// Caps the bytes bound per dispatch below the adapter's own limit; rows are chunked to
    /// fit. Useful to bound memory use, and lets tests exercise chunking without gigabytes.
    pub max_binding_bytes: Option<u64>,
}

impl GpuOptions {
    /// Caps the bytes bound per dispatch at `bytes` (see
    /// [`GpuOptions::max_binding_bytes`]).
    pub fn with_max_binding_bytes(mut self, bytes: u64) -> Self {
        self.max_binding_bytes = Some(bytes);
        self
    }
}

/// Every adapter wgpu can see on the backends in `WGPU_BACKEND` (all by default); an error
/// when `WGPU_BACKEND` names something that is not a backend.
pub fn enumerate_adapters() -> Result<Vec<wgpu::Adapter>> {
    let instance = instance(wgpu::Backends::all())?;
    Ok(pollster::block_on(
        instance.enumerate_adapters(wgpu::Backends::all()),
    ))
}

/// The names `wgpu::Backends::from_comma_list` accepts (wgpu-types 30), lower case.
const BACKEND_NAMES: [&str; 11] = [
    "vulkan", "vk", "dx12", "d3d12", "metal", "mtl", "opengl", "gles", "gl", "webgpu", "noop",
];

/// An instance on `WGPU_BACKEND`'s backends, or on `default` when it is not set.
///
/// One instance per set of backends for the whole process: wgpu 30 tells resources apart by
/// ids that are unique only within one instance, so a buffer of another instance's device
/// could pass for one of ours. Within one instance, wgpu refuses a buffer of another device
/// with a validation error, which xent reports.
fn instance(default: wgpu::Backends) -> Result<wgpu::Instance> {
    static INSTANCES: Mutex<Vec<(wgpu::Backends, wgpu::Instance)>> = Mutex::new(Vec::new());
    // First: reading the environment, wgpu would warn about a bad WGPU_BACKEND.
    let backends = env_backends(default)?;
    let mut instances = INSTANCES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, instance)) = instances.iter().find(|(b, _)| *b == backends) {
        return Ok(instance.clone());
    }
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = backends;
    let instance = wgpu::Instance::new(descriptor);
    instances.push((backends, instance.clone()));
    Ok(instance)
}

/// `WGPU_BACKEND`'s backends, or `default` when it is not set. wgpu itself skips names it
/// does not know with a warning each (and an empty list leaves no backend at all); here any
/// entry that is not a backend name is an error.
fn env_backends(default: wgpu::Backends) -> Result<wgpu::Backends> {
    let Some(value) = std::env::var_os("WGPU_BACKEND") else {
        return Ok(default);
    };
    let value = value.to_string_lossy().into_owned();
    let known = value
        .to_lowercase()
        .split(',')
        .all(|name| BACKEND_NAMES.contains(&name.trim()));
    if !known {
        return Err(XentError::UnknownBackend { value });
    }
    Ok(wgpu::Backends::from_comma_list(&value))
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
///
/// The same environment gives the same adapter object for the whole process, so every
/// context opens its device on it: on GL, wgpu-hal guards the instance's one EGL context with
/// a lock per adapter, and two adapters of one instance would make that context current on two
/// threads at once (EGL's `BadAccess`), for instance when one thread drops a buffer while
/// another runs a call.
pub fn select_adapter() -> Result<wgpu::Adapter> {
    type Chosen = Vec<([Option<String>; 3], wgpu::Adapter)>;
    static CHOSEN: Mutex<Chosen> = Mutex::new(Vec::new());
    let key =
        ["WGPU_BACKEND", "WGPU_ADAPTER_NAME", "WGPU_POWER_PREF"].map(|v| std::env::var(v).ok());
    let mut chosen = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, adapter)) = chosen.iter().find(|(k, _)| *k == key) {
        return Ok(adapter.clone());
    }
    let adapter = find_adapter()?;
    chosen.push((key, adapter.clone()));
    Ok(adapter)
}

/// [`select_adapter`]'s search.
fn find_adapter() -> Result<wgpu::Adapter> {
    // A bad WGPU_BACKEND is an error before any backend is probed.
    env_backends(wgpu::Backends::all())?;
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let adapters = enumerate_adapters()?;
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
    let request = |backends| {
        pollster::block_on(instance(backends)?.request_adapter(&options)).map_err(|e| {
            XentError::NoAdapter {
                detail: e.to_string(),
            }
        })
    };
    request(wgpu::Backends::PRIMARY).or_else(|_| request(wgpu::Backends::SECONDARY))
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
    /// Device buffers xent has created on this device.
    buffers_created: AtomicU64,
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

thread_local! {
    /// Whether this thread holds [`GL_SERIAL`] (so taking it again is a no-op, not a deadlock).
    static SERIALISED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`GL_SERIAL`] held by this thread, or nothing (other backends, or already held).
pub(crate) struct Serial(Option<MutexGuard<'static, ()>>);

impl Drop for Serial {
    fn drop(&mut self) {
        if self.0.is_some() {
            SERIALISED.with(|s| s.set(false));
        }
    }
}

/// [`GL_SERIAL`], taken on GL (once per thread); nothing elsewhere.
fn serialise_backend(backend: wgpu::Backend) -> Serial {
    if backend != wgpu::Backend::Gl || SERIALISED.with(|s| s.get()) {
        return Serial(None);
    }
    let guard = GL_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    SERIALISED.with(|s| s.set(true));
    Serial(Some(guard))
}

fn serialise(info: &wgpu::AdapterInfo) -> Serial {
    serialise_backend(info.backend)
}

/// A value whose drop touches the device (buffers, bind groups): dropped under the GL
/// serialisation, like every other use of the device, whichever thread drops it.
pub(crate) struct Serialised<T> {
    value: Option<T>,
    backend: wgpu::Backend,
}

impl<T> Serialised<T> {
    pub(crate) fn new(gpu: &Gpu, value: T) -> Self {
        Self {
            value: Some(value),
            backend: gpu.info.backend,
        }
    }
}

impl<T> std::ops::Deref for Serialised<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("present until dropped")
    }
}

impl<T> std::ops::DerefMut for Serialised<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("present until dropped")
    }
}

impl<T> Drop for Serialised<T> {
    fn drop(&mut self) {
        let _serial = serialise_backend(self.backend);
        drop(self.value.take());
    }
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
            binding_alignment: limits.min_storage_buffer_offset_alignment.max(16) as u64,
            max_workgroup_storage_bytes: limits.max_compute_workgroup_storage_size as u64,
            f16_builtin: f16_builtin(&device, &info),
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
            buffers_created: AtomicU64::new(0),
        })
    }

    /// Device buffers xent has created on this device so far.
    pub(crate) fn buffers_created(&self) -> u64 {
        self.buffers_created.load(Ordering::Relaxed)
    }

    /// Creates a buffer (every buffer xent makes comes from here, and is counted).
    pub(crate) fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.buffers_created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer of at least `bytes`, rounded up to whole vec4s (and at least 32 bytes:
    /// an unused binding still needs room for one element of its array).
    pub(crate) fn storage_buffer(
        &self,
        label: &str,
        bytes: u64,
        extra: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        let size = bytes.max(32).next_multiple_of(16);
        self.buffer(label, size, wgpu::BufferUsages::STORAGE | extra)
    }

    /// A buffer to copy results into and map.
    pub(crate) fn readback_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(16).next_multiple_of(16);
        self.buffer(
            label,
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// Waits until the device has done all the work submitted so far.
    pub(crate) fn wait(&self) -> Result<()> {
        self.wait_for(None)
    }

    /// Waits until the device has done `submission` and the work before it (all the work
    /// submitted so far without one). A wait that times out is waited again: GL caps each
    /// wait at about 2 s whatever was asked.
    pub(crate) fn wait_for(&self, submission: Option<wgpu::SubmissionIndex>) -> Result<()> {
        loop {
            let wait = wgpu::PollType::Wait {
                submission_index: submission.clone(),
                timeout: None,
            };
            match self.device.poll(wait) {
                Ok(_) => return Ok(()),
                Err(wgpu::PollError::Timeout) => self.lost()?,
                Err(e) => {
                    return Err(XentError::Gpu {
                        context: "waiting for the device".into(),
                        detail: e.to_string(),
                    });
                }
            }
        }
    }

    /// Unmaps `buffer` whatever became of its map: after a failed map wgpu still records a
    /// mapping that only `unmap` clears (else every later map of the buffer fails), while
    /// its core has nothing mapped and reports the unmap as an error, caught here and dropped.
    pub(crate) fn unmap_quietly(&self, buffer: &wgpu::Buffer) {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        buffer.unmap();
        let _ = pollster::block_on(scope.pop());
    }

    /// Maps `buffers` (each with the byte count wanted), waits, and copies their contents out.
    pub(crate) fn read_back(&self, buffers: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>> {
        let receivers: Vec<_> = buffers
            .iter()
            .map(|(buffer, bytes)| {
                let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
                buffer
                    .slice(..*bytes)
                    .map_async(wgpu::MapMode::Read, move |r| {
                        let _ = tx.send(r);
                    });
                rx
            })
            .collect();
        self.wait()?;
        // Every buffer whose map succeeded is copied and unmapped, even when another's failed:
        // a buffer left mapped would fail the next call that copies into it.
        let mut out = Vec::with_capacity(buffers.len());
        let mut failure = None;
        let error = |detail: String| XentError::Gpu {
            context: "reading results back".into(),
            detail,
        };
        for ((buffer, bytes), rx) in buffers.iter().zip(receivers) {
            match pollster::block_on(rx.receive()) {
                Some(Ok(())) => {
                    match buffer.slice(..*bytes).get_mapped_range() {
                        Ok(view) => out.push(view.to_vec()),
                        Err(e) => {
                            failure.get_or_insert(error(e.to_string()));
                        }
                    }
                    buffer.unmap();
                }
                other => {
                    self.unmap_quietly(buffer);
                    failure.get_or_insert(error(format!("buffer map failed: {other:?}")));
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Runs `work` with wgpu's errors captured as [`XentError`]s, failing first if the device
    /// was lost. Every device operation of a call runs in here (pipelines compile on first use
    /// inside it too), so on GL this is where calls from several threads queue up.
    /// Holds the GL serialisation (on GL) until the returned value is dropped.
    pub(crate) fn serial(&self) -> Serial {
        serialise(&self.info)
    }

    pub(crate) fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let _serial = serialise(&self.info);
        self.check_lost()?;
        let result = with_error_scopes(&self.device, what, work);
        self.check_lost()?;
        result
    }

    /// Maps and reads `buffers` with as little around it as possible (no error scopes, no
    /// extra polls): the per-call read of a prepared loss. The wait's own poll delivers a
    /// device-lost callback, which is checked after it.
    pub(crate) fn fetch(&self, buffers: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>> {
        let _serial = self.serial();
        let result = self.read_back(buffers);
        self.lost()?;
        result
    }

    /// [`XentError::DeviceLost`] if a poll has delivered the device-lost callback.
    pub(crate) fn lost(&self) -> Result<()> {
        match &*self.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(XentError::DeviceLost(why.clone())),
            None => Ok(()),
        }
    }

    fn check_lost(&self) -> Result<()> {
        // A poll delivers a pending device-lost callback.
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.lost()
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

/// Whether shaders may use `unpack2x16float`: wgpu grants it (`DownlevelFlags::SHADER_F16_IN_F32`)
/// everywhere but on Vulkan's llvmpipe without `Features::SHADER_F16` (wgpu-hal's rule; the
/// device alone does not tell its downlevel flags).
fn f16_builtin(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> bool {
    let llvmpipe = info.backend == wgpu::Backend::Vulkan && info.name.contains("llvmpipe");
    !llvmpipe || device.features().contains(wgpu::Features::SHADER_F16)
}
