//! A minimal, safe wrapper over the CUDA driver API (libcuda), to run generated PTX kernels.
//!
//! libcuda is opened at run time with `libloading`, never linked: the crate builds, links and
//! passes its tests on machines without an NVIDIA driver, where `Driver::get` returns
//! `CudaError::NoDriver` and callers keep to the CPU engines.
//!
//! Every call that needs a context first makes sure one is current on the calling thread
//! (`Driver::context`): the trainer's context if it made one current (PyTorch, JAX), else
//! device 0's primary context. Kernels, buffers and streams must then be used in that
//! same context.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString, OsStr, OsString};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use libloading::Library;

/// Environment variable naming the libcuda file to load instead of the usual names.
pub const LIBRARY_ENV: &str = "LOSSC_CUDA_LIBRARY";

/// Why the CUDA path cannot run or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No usable libcuda (no NVIDIA driver here): which files were tried and why each failed.
    #[error("CUDA driver not available: {0}")]
    NoDriver(String),
    /// The driver loaded but sees no CUDA device.
    #[error("CUDA driver loaded, but there is no CUDA device")]
    NoDevice,
    /// A driver call failed: the call, its `CUresult` and the driver's name and description of it.
    #[error("CUDA driver call {call} failed with error {code}: {message}")]
    Call { call: &'static str, code: i32, message: String },
}

/// A CUDA context (`CUcontext`) as an integer: modules and buffers belong to one, so callers
/// key their caches by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Context(usize);

impl Context {
    /// The raw `CUcontext` pointer value.
    pub fn raw(self) -> usize {
        self.0
    }
}

/// A CUDA stream (`CUstream`) as its pointer value, so a trainer can pass its current stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stream(pub usize);

impl Stream {
    /// The legacy default stream (the null `CUstream`).
    pub const DEFAULT: Stream = Stream(0);

    fn raw(self) -> CuStream {
        self.0 as CuStream
    }
}

/// What the PTX target and the grid size are chosen from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for `sm_90`.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// The driver's CUDA version as 1000 * major + 10 * minor (12040 for 12.4): the newest PTX
    /// ISA its JIT accepts follows from it.
    pub driver_version: i32,
}

// Raw driver types. Enums are C `int`s; `CUdeviceptr` is 64-bit on 64-bit platforms.
type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;
type CuModule = *mut c_void;
type CuFunction = *mut c_void;
type CuStream = *mut c_void;
type CuDevicePtr = u64;

type CuInit = unsafe extern "C" fn(c_uint) -> CuResult;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> CuResult;
type CuGetErrorText = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> CuResult;
type CuDeviceGet = unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult;
type CuDevicePrimaryCtxRetain = unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult;
type CuCtxGetCurrent = unsafe extern "C" fn(*mut CuContext) -> CuResult;
type CuCtxSetCurrent = unsafe extern "C" fn(CuContext) -> CuResult;
type CuCtxGetDevice = unsafe extern "C" fn(*mut CuDevice) -> CuResult;
type CuCtxPushCurrent = unsafe extern "C" fn(CuContext) -> CuResult;
type CuCtxPopCurrent = unsafe extern "C" fn(*mut CuContext) -> CuResult;
type CuModuleLoadDataEx =
    unsafe extern "C" fn(*mut CuModule, *const c_void, c_uint, *mut c_int, *mut *mut c_void) -> CuResult;
type CuModuleUnload = unsafe extern "C" fn(CuModule) -> CuResult;
type CuModuleGetFunction = unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult;
type CuLaunchKernel = unsafe extern "C" fn(
    CuFunction,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    CuStream,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type CuMemAlloc = unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult;
type CuMemFree = unsafe extern "C" fn(CuDevicePtr) -> CuResult;
type CuMemcpyHtoDAsync = unsafe extern "C" fn(CuDevicePtr, *const c_void, usize, CuStream) -> CuResult;
type CuMemcpyDtoHAsync = unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, CuStream) -> CuResult;
type CuMemsetD8Async = unsafe extern "C" fn(CuDevicePtr, u8, usize, CuStream) -> CuResult;
type CuStreamSynchronize = unsafe extern "C" fn(CuStream) -> CuResult;

const CUDA_SUCCESS: CuResult = 0;
const CUDA_ERROR_NO_DEVICE: CuResult = 100;
const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
const CU_JIT_ERROR_LOG_BUFFER: c_int = 5;
const CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
/// Bytes kept of the PTX JIT's error log.
const JIT_LOG_BYTES: usize = 16 << 10;

/// The driver entry points this module uses, copied out of the library.
struct Fns {
    init: CuInit,
    driver_get_version: CuDriverGetVersion,
    get_error_name: Option<CuGetErrorText>,
    get_error_string: Option<CuGetErrorText>,
    device_get_count: CuDeviceGetCount,
    device_get: CuDeviceGet,
    device_get_name: CuDeviceGetName,
    device_get_attribute: CuDeviceGetAttribute,
    device_primary_ctx_retain: CuDevicePrimaryCtxRetain,
    ctx_get_current: CuCtxGetCurrent,
    ctx_set_current: CuCtxSetCurrent,
    ctx_get_device: CuCtxGetDevice,
    scope: Scope,
    module_load_data_ex: CuModuleLoadDataEx,
    module_unload: CuModuleUnload,
    module_get_function: CuModuleGetFunction,
    launch_kernel: CuLaunchKernel,
    mem_alloc: CuMemAlloc,
    mem_free: CuMemFree,
    memcpy_htod_async: CuMemcpyHtoDAsync,
    memcpy_dtoh_async: CuMemcpyDtoHAsync,
    memset_d8_async: CuMemsetD8Async,
    stream_synchronize: CuStreamSynchronize,
}

/// The loaded libcuda and its entry points. There is one per process (`Driver::get`).
pub struct Driver {
    fns: Fns,
    /// Device 0's primary context once retained: retained once per process, never released.
    primary: Mutex<Option<usize>>,
    /// Keeps the entry points in `fns` valid; never dropped, since the driver lives in a static.
    _lib: Library,
}

/// The files to try for libcuda: the one `LOSSC_CUDA_LIBRARY` names when it is set and not
/// empty, else the platform's usual names. Pure, so tests need not touch the environment.
pub fn library_candidates(env: Option<&OsStr>) -> Vec<OsString> {
    match env {
        Some(path) if !path.is_empty() => vec![path.to_os_string()],
        _ if cfg!(windows) => vec!["nvcuda.dll".into()],
        _ => vec!["libcuda.so.1".into(), "libcuda.so".into()],
    }
}

impl Driver {
    /// The process's driver: libcuda loaded, initialised and checked to have a device on the
    /// first call; later calls return the same driver or the same error.
    pub fn get() -> Result<&'static Driver, CudaError> {
        static DRIVER: OnceLock<Result<Driver, CudaError>> = OnceLock::new();
        DRIVER
            .get_or_init(|| {
                let env = std::env::var_os(LIBRARY_ENV);
                Driver::load(&library_candidates(env.as_deref()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Opens the first candidate that loads, resolves the entry points, runs `cuInit` and
    /// checks there is a device. Not cached: `get` is the way in.
    fn load(candidates: &[OsString]) -> Result<Driver, CudaError> {
        let mut tried = Vec::new();
        let mut found = None;
        for name in candidates {
            // SAFETY: loading libcuda runs its initialisers, which have no preconditions on us;
            // a file that is not libcuda is rejected below when its symbols are missing.
            match unsafe { Library::new(name) } {
                Ok(lib) => {
                    found = Some((name, lib));
                    break;
                }
                Err(e) => {
                    // dlerror already names the file; Windows' message does not.
                    let (name, e) = (name.to_string_lossy(), e.to_string());
                    tried.push(if e.starts_with(&*name) { e } else { format!("{name}: {e}") });
                }
            }
        }
        let Some((name, lib)) = found else {
            return Err(CudaError::NoDriver(format!(
                "could not load libcuda (tried {}; set {LIBRARY_ENV} to its path if it is elsewhere)",
                tried.join("; ")
            )));
        };
        let fns = resolve(&lib)
            .map_err(|e| CudaError::NoDriver(format!("{} is not a usable libcuda: {e}", name.to_string_lossy())))?;
        // SAFETY: cuInit takes flags, which must be 0.
        let code = unsafe { (fns.init)(0) };
        if code == CUDA_ERROR_NO_DEVICE {
            return Err(CudaError::NoDevice);
        }
        fns.check("cuInit", code)?;
        let mut count = 0;
        // SAFETY: the driver is initialised and `count` is a valid out pointer.
        fns.check("cuDeviceGetCount", unsafe { (fns.device_get_count)(&mut count) })?;
        if count <= 0 {
            return Err(CudaError::NoDevice);
        }
        Ok(Driver { fns, primary: Mutex::new(None), _lib: lib })
    }

    /// Makes sure a context is current on the calling thread and returns it: the one already
    /// current (a trainer's), else device 0's primary context, made current.
    pub fn context(&self) -> Result<Context, CudaError> {
        let f = &self.fns;
        let mut ctx: CuContext = ptr::null_mut();
        // SAFETY: `ctx` is a valid out pointer.
        f.check("cuCtxGetCurrent", unsafe { (f.ctx_get_current)(&mut ctx) })?;
        if !ctx.is_null() {
            return Ok(Context(ctx as usize));
        }
        let primary = {
            let mut guard = self.primary.lock().unwrap_or_else(|e| e.into_inner());
            match *guard {
                Some(p) => p as CuContext,
                None => {
                    let mut dev: CuDevice = 0;
                    // SAFETY: the driver is initialised and `dev` is a valid out pointer.
                    f.check("cuDeviceGet", unsafe { (f.device_get)(&mut dev, 0) })?;
                    let mut p: CuContext = ptr::null_mut();
                    // SAFETY: `dev` is a device the driver gave and `p` is a valid out pointer.
                    f.check("cuDevicePrimaryCtxRetain", unsafe { (f.device_primary_ctx_retain)(&mut p, dev) })?;
                    *guard = Some(p as usize);
                    p
                }
            }
        };
        // SAFETY: `primary` is a live context: retained above and never released.
        f.check("cuCtxSetCurrent", unsafe { (f.ctx_set_current)(primary) })?;
        Ok(Context(primary as usize))
    }

    /// Loads PTX into a module of the current context, JIT-compiling it for the device. A PTX
    /// error's message carries the JIT's log.
    pub fn load_module(&self, ptx: &str) -> Result<Module, CudaError> {
        let context = self.context()?;
        let f = &self.fns;
        let image = CString::new(ptx).map_err(|_| CudaError::Call {
            call: "cuModuleLoadDataEx",
            code: 1, // CUDA_ERROR_INVALID_VALUE
            message: "the PTX text contains a NUL byte".into(),
        })?;
        let mut log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
        // The size option's value is the size itself, passed in the pointer slot.
        let mut values = [log.as_mut_ptr().cast::<c_void>(), JIT_LOG_BYTES as *mut c_void];
        let mut module: CuModule = ptr::null_mut();
        // SAFETY: `image` is NUL-terminated PTX; the two options and their values match in count
        // and type, and the log buffer is JIT_LOG_BYTES long and outlives the call.
        let code = unsafe {
            (f.module_load_data_ex)(
                &mut module,
                image.as_ptr().cast(),
                options.len() as c_uint,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if let Err(CudaError::Call { call, code, mut message }) = f.check("cuModuleLoadDataEx", code) {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            if !text.trim().is_empty() {
                message = format!("{message}\nJIT log:\n{}", text.trim_end());
            }
            return Err(CudaError::Call { call, code, message });
        }
        Ok(Module(Arc::new(ModuleInner { raw: module, context, scope: f.scope, unload: f.module_unload })))
    }

    /// The kernel `name` of `module`. It keeps the module loaded while it lives.
    pub fn function(&self, module: &Module, name: &str) -> Result<Function, CudaError> {
        let f = &self.fns;
        let cname = CString::new(name).map_err(|_| CudaError::Call {
            call: "cuModuleGetFunction",
            code: 500, // CUDA_ERROR_NOT_FOUND
            message: format!("kernel name {name:?} contains a NUL byte"),
        })?;
        let mut raw: CuFunction = ptr::null_mut();
        // SAFETY: the module is loaded (we hold it), `cname` is NUL-terminated and `raw` is a
        // valid out pointer.
        let code = unsafe { (f.module_get_function)(&mut raw, module.0.raw, cname.as_ptr()) };
        f.check("cuModuleGetFunction", code).map_err(|e| match e {
            CudaError::Call { call, code, message } => {
                CudaError::Call { call, code, message: format!("{message} (kernel {name:?})") }
            }
            e => e,
        })?;
        Ok(Function { raw, _module: Arc::clone(&module.0) })
    }

    /// Launches `f` on `stream`; returns once it is queued, not run.
    ///
    /// # Safety
    /// `params` must hold one pointer per kernel parameter, in order, each to a value of that
    /// parameter's type (as `cuLaunchKernel`'s `kernelParams`); device pointers among them must
    /// point to memory of the current context that the kernel may read or write; `stream` must
    /// be a live stream of the current context (or `Stream::DEFAULT`).
    pub unsafe fn launch(
        &self,
        f: &Function,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        stream: Stream,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.context()?;
        let kernel_params = if params.is_empty() { ptr::null_mut() } else { params.as_mut_ptr() };
        // SAFETY: `f` is a kernel of a loaded module (it holds the module); the caller vouches
        // for `params` and `stream`; `extra` is null, as allowed when `kernelParams` is used.
        let code = unsafe {
            (self.fns.launch_kernel)(
                f.raw,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared_bytes,
                stream.raw(),
                kernel_params,
                ptr::null_mut(),
            )
        };
        self.fns.check("cuLaunchKernel", code)
    }

    /// `bytes` of device memory in the current context, freed when the buffer is dropped.
    /// Zero bytes gives a null buffer (the driver refuses empty allocations).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        let context = self.context()?;
        let f = &self.fns;
        let mut ptr: CuDevicePtr = 0;
        if bytes > 0 {
            // SAFETY: a context is current and `ptr` is a valid out pointer.
            f.check("cuMemAlloc_v2", unsafe { (f.mem_alloc)(&mut ptr, bytes) })?;
        }
        Ok(DeviceBuffer { ptr, bytes, context, scope: f.scope, free: f.mem_free })
    }

    /// Copies `src` to device address `dst`, in order on `stream`, and waits for the stream,
    /// so `src` may be reused at once (even when it is pinned memory).
    pub fn copy_to_device(&self, dst: u64, src: &[u8], stream: Stream) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        self.context()?;
        // SAFETY: `src` is readable for its length until the stream is synchronised below; the
        // driver checks `dst` and `stream` and reports bad ones as errors.
        let code = unsafe { (self.fns.memcpy_htod_async)(dst, src.as_ptr().cast(), src.len(), stream.raw()) };
        self.fns.check("cuMemcpyHtoDAsync_v2", code)?;
        self.synchronize(stream)
    }

    /// Copies `dst.len()` bytes from device address `src` into `dst`, in order on `stream`, and
    /// waits for the stream so `dst` holds them on return.
    pub fn copy_from_device(&self, dst: &mut [u8], src: u64, stream: Stream) -> Result<(), CudaError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.context()?;
        // SAFETY: `dst` is writable for its length and stays borrowed until the stream is
        // synchronised below; the driver checks `src` and `stream`.
        let code = unsafe { (self.fns.memcpy_dtoh_async)(dst.as_mut_ptr().cast(), src, dst.len(), stream.raw()) };
        self.fns.check("cuMemcpyDtoHAsync_v2", code)?;
        self.synchronize(stream)
    }

    /// Zeroes `bytes` bytes at device address `dst`, in order on `stream` (does not wait).
    pub fn zero(&self, dst: u64, bytes: usize, stream: Stream) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.context()?;
        // SAFETY: only device memory is written; the driver checks `dst`, `bytes` and `stream`.
        let code = unsafe { (self.fns.memset_d8_async)(dst, 0, bytes, stream.raw()) };
        self.fns.check("cuMemsetD8Async", code)
    }

    /// Waits until everything queued on `stream` has run; a kernel's fault is reported here.
    pub fn synchronize(&self, stream: Stream) -> Result<(), CudaError> {
        self.context()?;
        // SAFETY: the driver checks `stream` and reports a bad one as an error.
        let code = unsafe { (self.fns.stream_synchronize)(stream.raw()) };
        self.fns.check("cuStreamSynchronize", code)
    }

    /// The current context's device: name, compute capability, multiprocessors, and the driver
    /// version, from which the PTX target and the grid size are chosen.
    pub fn device_info(&self) -> Result<DeviceInfo, CudaError> {
        self.context()?;
        let f = &self.fns;
        let mut dev: CuDevice = 0;
        // SAFETY: a context is current and `dev` is a valid out pointer.
        f.check("cuCtxGetDevice", unsafe { (f.ctx_get_device)(&mut dev) })?;
        let mut name = [0 as c_char; 256];
        // SAFETY: `name` is writable for the length passed; the driver NUL-terminates within it.
        f.check("cuDeviceGetName", unsafe { (f.device_get_name)(name.as_mut_ptr(), name.len() as c_int, dev) })?;
        // SAFETY: the buffer was zeroed and the driver wrote a NUL-terminated string into it, so
        // a NUL lies within it.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let attribute = |attr: c_int| {
            let mut value = 0;
            // SAFETY: `dev` is a device the driver gave and `value` is a valid out pointer.
            f.check("cuDeviceGetAttribute", unsafe { (f.device_get_attribute)(&mut value, attr, dev) }).map(|()| value)
        };
        let major = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let multiprocessors = attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(0) as u32;
        let mut driver_version = 0;
        // SAFETY: `driver_version` is a valid out pointer.
        f.check("cuDriverGetVersion", unsafe { (f.driver_get_version)(&mut driver_version) })?;
        Ok(DeviceInfo { name, compute_capability: (major, minor), multiprocessors, driver_version })
    }
}

/// Copies every entry point out of `lib`; a missing one means a driver too old for this module.
fn resolve(lib: &Library) -> Result<Fns, libloading::Error> {
    /// # Safety
    /// `T` must be the C signature of `name` in the CUDA driver API.
    unsafe fn sym<T: Copy>(lib: &Library, name: &[u8]) -> Result<T, libloading::Error> {
        // SAFETY: the caller guarantees `T` is the symbol's type; the pointer is copied out and
        // stays valid as long as `lib` is loaded, which the Driver owning both guarantees.
        unsafe { lib.get::<T>(name).map(|s| *s) }
    }
    // SAFETY: each type below is the driver API's signature for the symbol named with it.
    unsafe {
        Ok(Fns {
            init: sym(lib, b"cuInit\0")?,
            driver_get_version: sym(lib, b"cuDriverGetVersion\0")?,
            get_error_name: sym(lib, b"cuGetErrorName\0").ok(),
            get_error_string: sym(lib, b"cuGetErrorString\0").ok(),
            device_get_count: sym(lib, b"cuDeviceGetCount\0")?,
            device_get: sym(lib, b"cuDeviceGet\0")?,
            device_get_name: sym(lib, b"cuDeviceGetName\0")?,
            device_get_attribute: sym(lib, b"cuDeviceGetAttribute\0")?,
            device_primary_ctx_retain: sym(lib, b"cuDevicePrimaryCtxRetain\0")?,
            ctx_get_current: sym(lib, b"cuCtxGetCurrent\0")?,
            ctx_set_current: sym(lib, b"cuCtxSetCurrent\0")?,
            ctx_get_device: sym(lib, b"cuCtxGetDevice\0")?,
            scope: Scope { push: sym(lib, b"cuCtxPushCurrent_v2\0")?, pop: sym(lib, b"cuCtxPopCurrent_v2\0")? },
            module_load_data_ex: sym(lib, b"cuModuleLoadDataEx\0")?,
            module_unload: sym(lib, b"cuModuleUnload\0")?,
            module_get_function: sym(lib, b"cuModuleGetFunction\0")?,
            launch_kernel: sym(lib, b"cuLaunchKernel\0")?,
            mem_alloc: sym(lib, b"cuMemAlloc_v2\0")?,
            mem_free: sym(lib, b"cuMemFree_v2\0")?,
            memcpy_htod_async: sym(lib, b"cuMemcpyHtoDAsync_v2\0")?,
            memcpy_dtoh_async: sym(lib, b"cuMemcpyDtoHAsync_v2\0")?,
            memset_d8_async: sym(lib, b"cuMemsetD8Async\0")?,
            stream_synchronize: sym(lib, b"cuStreamSynchronize\0")?,
        })
    }
}

impl Fns {
    /// `Ok` for CUDA_SUCCESS, else the error naming the call and the driver's words for `code`.
    fn check(&self, call: &'static str, code: CuResult) -> Result<(), CudaError> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        let text = |f: Option<CuGetErrorText>| {
            let mut s: *const c_char = ptr::null();
            // SAFETY: `s` is a valid out pointer; on success the driver points it at a static
            // NUL-terminated string.
            let ok = f.is_some_and(|f| unsafe { f(code, &mut s) } == CUDA_SUCCESS) && !s.is_null();
            // SAFETY: checked above: `s` is the driver's static NUL-terminated string.
            ok.then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
        };
        let message = match (text(self.get_error_name), text(self.get_error_string)) {
            (Some(name), Some(desc)) => format!("{name}: {desc}"),
            (Some(s), None) | (None, Some(s)) => s,
            (None, None) => "unknown CUDA error".into(),
        };
        Err(CudaError::Call { call, code, message })
    }
}

/// Makes a context current around a release (unload, free), which a Drop may run on any thread.
#[derive(Clone, Copy)]
struct Scope {
    push: CuCtxPushCurrent,
    pop: CuCtxPopCurrent,
}

impl Scope {
    /// Runs `f` with `context` current, if it can be made current; errors are ignored, as in Drop.
    fn run(self, context: Context, f: impl FnOnce()) {
        // SAFETY: pushing a context handle the driver gave us; if it was destroyed meanwhile the
        // driver returns an error and we skip `f` rather than run it in the wrong context.
        if unsafe { (self.push)(context.0 as CuContext) } != CUDA_SUCCESS {
            return;
        }
        f();
        let mut popped: CuContext = ptr::null_mut();
        // SAFETY: pops the context pushed above; `popped` is a valid out pointer.
        unsafe { (self.pop)(&mut popped) };
    }
}

/// A loaded PTX module; unloaded when it and every `Function` taken from it are dropped.
#[derive(Clone)]
pub struct Module(Arc<ModuleInner>);

struct ModuleInner {
    raw: CuModule,
    context: Context,
    scope: Scope,
    unload: CuModuleUnload,
}

// SAFETY: a CUmodule is a handle the driver lets any thread use while its context is current
// (every call here makes one current); the driver serialises access internally.
unsafe impl Send for ModuleInner {}
// SAFETY: as for Send: nothing here is mutated through a shared reference.
unsafe impl Sync for ModuleInner {}

impl Module {
    /// The context the module was loaded in: its kernels run only there.
    pub fn context(&self) -> Context {
        self.0.context
    }
}

impl Drop for ModuleInner {
    fn drop(&mut self) {
        let (raw, unload) = (self.raw, self.unload);
        // SAFETY: `raw` was loaded by cuModuleLoadDataEx and is unloaded once, here, when the
        // last holder goes; the library stays loaded (the Driver is a never-dropped static).
        self.scope.run(self.context, || unsafe {
            unload(raw);
        });
    }
}

/// A kernel of a loaded module; holds the module so the kernel stays valid.
#[derive(Clone)]
pub struct Function {
    raw: CuFunction,
    _module: Arc<ModuleInner>,
}

// SAFETY: a CUfunction is a handle into its module, which this keeps loaded; the driver lets
// any thread launch it while the module's context is current.
unsafe impl Send for Function {}
// SAFETY: as for Send: the handle is never mutated.
unsafe impl Sync for Function {}

/// Device memory of one context, freed (`cuMemFree_v2`) when dropped.
pub struct DeviceBuffer {
    ptr: CuDevicePtr,
    bytes: usize,
    context: Context,
    scope: Scope,
    free: CuMemFree,
}

impl DeviceBuffer {
    /// The device address (`CUdeviceptr`), to pass to kernels and copies; 0 for an empty buffer.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether the buffer has no bytes (and no allocation).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> Context {
        self.context
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr == 0 {
            return;
        }
        let (ptr, free) = (self.ptr, self.free);
        // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed once, here; errors (a context
        // already destroyed at exit) are ignored. Kernels still queued on it are the owner's
        // concern: synchronise before dropping.
        self.scope.run(self.context, || unsafe {
            free(ptr);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_candidates_follow_the_environment_variable() {
        let path = OsStr::new("/nonexistent/lossc-test/libcuda.so");
        assert_eq!(library_candidates(Some(path)), vec![path.to_os_string()]);
        let default = library_candidates(None);
        assert!(!default.is_empty());
        assert_eq!(library_candidates(Some(OsStr::new(""))), default);
        if cfg!(unix) {
            assert_eq!(default, vec![OsString::from("libcuda.so.1"), OsString::from("libcuda.so")]);
        }
    }

    #[test]
    fn cuda_missing_library_is_no_driver() {
        let path = OsString::from("/nonexistent/lossc-test/libcuda.so");
        match Driver::load(std::slice::from_ref(&path)) {
            Err(e @ CudaError::NoDriver(_)) => {
                let text = e.to_string();
                assert!(text.contains("CUDA driver"), "{text}");
                assert!(text.contains("/nonexistent/lossc-test/libcuda.so"), "{text}");
                assert!(text.contains(LIBRARY_ENV), "{text}");
            }
            Err(e) => panic!("expected NoDriver, got {e}"),
            Ok(_) => panic!("a nonexistent file loaded"),
        }
    }

    #[test]
    fn cuda_library_without_driver_symbols_is_no_driver() {
        // The C library loads on every Unix but has no cuInit: rejected, not called.
        if !cfg!(target_os = "linux") {
            return;
        }
        match Driver::load(&["libc.so.6".into()]) {
            Err(CudaError::NoDriver(msg)) => assert!(msg.contains("cuInit"), "{msg}"),
            Err(e) => panic!("expected NoDriver, got {e}"),
            Ok(_) => panic!("libc taken for libcuda"),
        }
    }

    #[test]
    fn cuda_get_is_cached_and_never_panics() {
        let first = Driver::get();
        let second = Driver::get();
        match (first, second) {
            (Ok(a), Ok(b)) => assert!(std::ptr::eq(a, b)),
            (Err(a), Err(b)) => {
                eprintln!("{a}");
                assert_eq!(a, b);
                assert!(matches!(a, CudaError::NoDriver(_) | CudaError::NoDevice), "{a}");
                assert!(a.to_string().contains("CUDA"), "{a}");
            }
            _ => panic!("Driver::get changed its answer"),
        }
    }

    #[test]
    fn cuda_error_display_names_the_call() {
        let e = CudaError::Call { call: "cuLaunchKernel", code: 700, message: "CUDA_ERROR_ILLEGAL_ADDRESS".into() };
        let text = e.to_string();
        assert!(text.contains("cuLaunchKernel") && text.contains("700") && text.contains("ILLEGAL_ADDRESS"), "{text}");
        assert!(CudaError::NoDevice.to_string().contains("CUDA"));
    }

    /// Writes `out[i] = i` as f32 for `i < n`.
    const FILL_PTX: &str = r#"
.version 6.0
.target sm_50
.address_size 64

.visible .entry fill(
    .param .u64 fill_out,
    .param .u32 fill_n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [fill_out];
    ld.param.u32 %r2, [fill_n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    cvt.rn.f32.u32 %f1, %r1;
    st.global.f32 [%rd4], %f1;
DONE:
    ret;
}
"#;

    /// Only where a GPU is present: load, launch, copy back; and a bad PTX's error has its log.
    #[test]
    fn cuda_runs_a_kernel_when_a_device_is_present() {
        let Ok(driver) = Driver::get() else { return };
        let info = driver.device_info().expect("device info");
        assert!(info.compute_capability.0 >= 5 && info.multiprocessors > 0, "{info:?}");
        let context = driver.context().expect("context");
        assert_eq!(driver.context().expect("context again"), context);

        let module = driver.load_module(FILL_PTX).expect("load PTX");
        assert_eq!(module.context(), context);
        let kernel = driver.function(&module, "fill").expect("kernel");
        assert!(matches!(driver.function(&module, "missing"), Err(CudaError::Call { .. })));

        let n: u32 = 1000;
        let buf = driver.alloc(n as usize * 4).expect("alloc");
        driver.zero(buf.ptr(), buf.len(), Stream::DEFAULT).expect("zero");
        let mut out_ptr = buf.ptr();
        let mut n_param = n - 1; // the last element stays zero
        let mut params = [(&raw mut out_ptr).cast::<c_void>(), (&raw mut n_param).cast::<c_void>()];
        // SAFETY: the parameters match `fill(.u64, .u32)` and `buf` holds n floats.
        unsafe { driver.launch(&kernel, [n.div_ceil(256), 1, 1], [256, 1, 1], 0, Stream::DEFAULT, &mut params) }
            .expect("launch");
        driver.synchronize(Stream::DEFAULT).expect("synchronize");
        let mut bytes = vec![0u8; buf.len()];
        driver.copy_from_device(&mut bytes, buf.ptr(), Stream::DEFAULT).expect("copy back");
        let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let want: Vec<f32> = (0..n).map(|i| if i < n - 1 { i as f32 } else { 0.0 }).collect();
        assert_eq!(got, want);

        let src: Vec<u8> = (0..=255).collect();
        let small = driver.alloc(src.len()).expect("alloc");
        driver.copy_to_device(small.ptr(), &src, Stream::DEFAULT).expect("copy to device");
        let mut back = vec![0u8; src.len()];
        driver.copy_from_device(&mut back, small.ptr(), Stream::DEFAULT).expect("copy back");
        assert_eq!(back, src);
        assert!(driver.alloc(0).expect("empty alloc").is_empty());

        match driver.load_module(".version 6.0\n.target sm_50\n.address_size 64\nnot ptx at all\n") {
            Err(CudaError::Call { call: "cuModuleLoadDataEx", message, .. }) => {
                assert!(message.contains("JIT log"), "{message}")
            }
            other => panic!("bad PTX loaded: {:?}", other.map(|_| ())),
        }
    }
}
