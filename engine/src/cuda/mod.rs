//! The CUDA device layer (cargo feature `cuda`): one `CudaDevice` per ordinal
//! with one stream, a caching allocator, the PTX modules of kf-kernels loaded
//! lazily per family, a launcher that takes `kf_kernels::LaunchConfig`,
//! host<->device copies and cuBLAS GEMMs. libcuda and libcublas are opened at
//! run time (cudarc dynamic loading), so this builds with no toolkit and no GPU;
//! a missing driver or device is an `Err` with one clear sentence, never a panic.
//! [`Cuda`] (kernel.rs) is this layer as a [`crate::KernelDevice`].

mod alloc;
mod blas;
mod buffer;
mod context;
mod kernel;
mod launch;
mod module;
mod probe;

pub use alloc::{size_class, AllocStats, CachingAllocator, RawMemory};
pub use blas::{GemmElem, GemmShape, RawGemm};
pub use buffer::{CudaBuffer, DeviceElem};
pub use context::CudaDevice;
pub use kernel::{Cuda, CudaBuf};
pub use launch::{check_launch_config, KernelArg, ParamKind};
pub use module::ptx_params;
pub use probe::{check_cublas, check_driver, DRIVER_SYMBOLS};

/// The text of a driver error: its enum name (no driver call), and the
/// driver's own description where it gives one.
pub(crate) fn driver_error_text(e: cudarc::driver::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// `Result<T, DriverError>` -> `anyhow::Result<T>` naming what was attempted.
pub(crate) trait DriverContext<T> {
    fn drv(self, what: impl FnOnce() -> String) -> anyhow::Result<T>;
}

impl<T> DriverContext<T> for Result<T, cudarc::driver::DriverError> {
    fn drv(self, what: impl FnOnce() -> String) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::anyhow!("{}: {}", what(), driver_error_text(e)))
    }
}
