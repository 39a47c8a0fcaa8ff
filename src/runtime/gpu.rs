//! Runs a loss's PTX (`backend::ptx`) on an NVIDIA GPU through the CUDA driver
//! (`runtime::cuda`, loaded at run time): the caller's device arrays in, the loss value
//! out, the gradients written in place on the device.
//!
//! The module for each (context, layout) a loss meets is compiled once and cached in the
//! `Loss`. A call allocates the small f64 workspace, launches the kernels in the program's
//! order on the caller's stream, and reads back the loss (which synchronises the stream).

use crate::backend::ptx::{self, Grid, Layout, Program, Target, THREADS};
use crate::error::Error;
use crate::loss::Loss;
use crate::runtime::cuda::{Context, CudaError, Driver, Function, Module, Stream};

/// One input on the device: its `[batch, class, spatial]` extents, its data and its
/// gradient buffer (0: not wanted), as `CUdeviceptr`s.
#[derive(Clone, Copy, Debug)]
pub struct DeviceArray {
    pub shape: [usize; 3],
    pub data: u64,
    pub grad: u64,
}

/// A loss's module loaded in one context.
pub(crate) struct Loaded {
    program: Program,
    functions: Vec<Function>,
    /// Kept alive while the functions are used.
    _module: Module,
    /// Blocks along positions: a few per multiprocessor keep the device busy.
    max_blocks: usize,
}

/// Loaded modules of one loss, by context and layout.
pub(crate) type Cache = crate::runtime::cache::Cache<(Context, Layout), Loaded>;

impl From<CudaError> for Error {
    fn from(e: CudaError) -> Error {
        match e {
            CudaError::NoDriver(_) | CudaError::NoDevice => Error::NoDevice(e.to_string()),
            CudaError::Call { .. } => Error::Device(e.to_string()),
        }
    }
}

/// The loss on device arrays; gradients are written where `grad` is not 0. `stream` is a
/// `CUstream` (0: the default stream).
pub fn evaluate(loss: &Loss, arrays: &[DeviceArray], stream: usize) -> Result<f64, Error> {
    let shapes: Vec<[usize; 3]> = arrays.iter().map(|a| a.shape).collect();
    let ext = loss.extents(&shapes)?;
    let want: Vec<bool> = arrays.iter().map(|a| a.grad != 0).collect();
    let layout = Layout::of(&shapes, ext, &want);
    if let Some(why) = ptx::unsupported(loss, &layout) {
        return Err(Error::Unsupported(why));
    }
    let driver = Driver::get()?;
    let context = driver.context()?;
    let loaded = loss.gpu_cache().get_or_build(&(context, layout.clone()), || load(driver, loss, &layout))?;
    let (b, s) = (ext[0], ext[2]);
    let g = s.div_ceil(THREADS as usize).clamp(1, loaded.max_blocks);
    let y = b.clamp(1, 65535);
    let workspace = driver.alloc(8 * loaded.program.workspace_len(b, g))?;
    let mut values: Vec<u64> = arrays.iter().map(|a| a.data).collect();
    values.extend(arrays.iter().map(|a| a.grad));
    values.extend([workspace.ptr(), b as u64, s as u64, g as u64]);
    let stream = Stream(stream);
    for (launch, f) in loaded.program.launches.iter().zip(&loaded.functions) {
        let grid = match launch.grid {
            Grid::Sweep => [g as u32, y as u32, 1],
            Grid::Single => [1, 1, 1],
        };
        let mut params: Vec<*mut std::ffi::c_void> = values.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        // SAFETY: every kernel takes exactly these parameters (`backend::ptx`), each a u64
        // that `params` points to and that lives across the call; the device pointers are
        // the caller's arrays of the checked shapes and a workspace of the program's size.
        unsafe { driver.launch(f, grid, [THREADS, 1, 1], 0, stream, &mut params) }?;
    }
    let mut out = [0u8; 8];
    driver.copy_from_device(&mut out, workspace.ptr(), stream)?;
    Ok(f64::from_le_bytes(out))
}

/// Emits and loads a loss's program for the current context's device.
fn load(driver: &Driver, loss: &Loss, layout: &Layout) -> Result<Loaded, Error> {
    let info = driver.device_info()?;
    let (major, minor) = info.compute_capability;
    let target = Target::for_device(major.max(0) as u32, minor.max(0) as u32).ok_or_else(|| {
        Error::Unsupported(format!(
            "{} has compute capability {major}.{minor}; lossc's PTX needs 7.0 or newer",
            info.name
        ))
    })?;
    let program = ptx::emit(loss, layout, target)?;
    let module = driver.load_module(&program.text)?;
    let functions = program.launches.iter().map(|l| driver.function(&module, &l.kernel)).collect::<Result<_, _>>()?;
    let max_blocks = 4 * info.multiprocessors.max(1) as usize;
    Ok(Loaded { program, functions, _module: module, max_blocks })
}
