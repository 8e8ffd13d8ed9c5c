//! Launching a kf-kernels entry point: a `kf_kernels::LaunchConfig` (the shape
//! the emulator and benchmarks use too) is checked against the device's limits,
//! the arguments against the entry's PTX parameter list (count, int/float,
//! size), then cuLaunchKernel on the device's stream.

use super::buffer::{CudaBuffer, DeviceElem};
use super::context::CudaDevice;
use super::DriverContext;
use anyhow::{bail, ensure, Result};
use cudarc::driver::result;
use cudarc::driver::sys::CUfunction_attribute;
use kf_kernels::LaunchConfig;
use std::ffi::c_void;

/// Dynamic shared memory a block gets without opting in.
const DEFAULT_SHARED: u32 = 48 * 1024;

/// What a PTX parameter holds: an integer or pointer (`.u64`, `.s32`, `.b16`,
/// ...), a float (`.f32`, `.f64`), or an aggregate passed by value (`.b8 p[N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Int,
    Float,
    Bytes,
}

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device address (`T*` in the kernel).
    Ptr(u64),
    U64(u64),
    I64(i64),
    U32(u32),
    I32(i32),
    F32(f32),
    F64(f64),
}

impl KernelArg {
    /// The address of a device buffer.
    pub fn buf<T: DeviceElem>(b: &CudaBuffer<T>) -> KernelArg {
        KernelArg::Ptr(b.device_ptr())
    }
    /// A `size_t` count.
    pub fn size(n: usize) -> KernelArg {
        KernelArg::U64(n as u64)
    }

    fn kind(&self) -> (ParamKind, usize) {
        match self {
            KernelArg::Ptr(_) | KernelArg::U64(_) | KernelArg::I64(_) => (ParamKind::Int, 8),
            KernelArg::U32(_) | KernelArg::I32(_) => (ParamKind::Int, 4),
            KernelArg::F32(_) => (ParamKind::Float, 4),
            KernelArg::F64(_) => (ParamKind::Float, 8),
        }
    }

    /// The value in the low bytes of a u64 slot (little-endian, as the driver
    /// reads `size` bytes from the slot's address).
    fn slot(&self) -> u64 {
        match *self {
            KernelArg::Ptr(v) | KernelArg::U64(v) => v,
            KernelArg::I64(v) => v as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
            KernelArg::F64(v) => v.to_bits(),
        }
    }
}

/// Check a launch shape against CUDA's limits (`max_shared`: the device's
/// opt-in maximum of dynamic shared memory per block).
pub fn check_launch_config(cfg: &LaunchConfig, max_shared: u32) -> Result<()> {
    let (gx, gy, gz) = cfg.grid_dim;
    let (bx, by, bz) = cfg.block_dim;
    ensure!(
        gx >= 1 && gy >= 1 && gz >= 1,
        "empty grid {:?}",
        cfg.grid_dim
    );
    ensure!(
        gx < (1 << 31) && gy <= 65535 && gz <= 65535,
        "grid {:?} over CUDA's limits (2^31-1, 65535, 65535)",
        cfg.grid_dim
    );
    ensure!(
        bx >= 1 && by >= 1 && bz >= 1,
        "empty block {:?}",
        cfg.block_dim
    );
    ensure!(
        bx <= 1024 && by <= 1024 && bz <= 64 && (bx as u64 * by as u64 * bz as u64) <= 1024,
        "block {:?} over CUDA's limits (1024 threads, z <= 64)",
        cfg.block_dim
    );
    ensure!(
        cfg.shared_mem_bytes <= max_shared,
        "{} bytes of dynamic shared memory, the device allows {max_shared}",
        cfg.shared_mem_bytes
    );
    Ok(())
}

/// Arguments against an entry's PTX parameters.
fn check_args(entry: &str, params: &[(ParamKind, usize)], args: &[KernelArg]) -> Result<()> {
    ensure!(
        params.len() == args.len(),
        "{entry} takes {} arguments, got {}",
        params.len(),
        args.len()
    );
    for (i, (p, a)) in params.iter().zip(args).enumerate() {
        if *p != a.kind() {
            bail!(
                "{entry} argument {i}: the kernel takes {:?} of {} bytes, got {a:?}",
                p.0,
                p.1
            );
        }
    }
    Ok(())
}

impl CudaDevice {
    /// Launch `entry` of kernel family `family` on this device's stream
    /// (asynchronous: errors of the kernel itself surface at the next sync).
    ///
    /// # Safety
    /// Every `KernelArg::Ptr` must be the address of a live buffer of this
    /// device (`KernelArg::buf`) holding every element the kernel reaches with
    /// these arguments and this launch shape. A buffer may be dropped right
    /// after the call: its block is reused only by work queued later on the
    /// same stream.
    pub unsafe fn launch(
        &self,
        family: &str,
        entry: &str,
        cfg: LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()> {
        let f = self.function(family, entry)?;
        check_args(entry, &f.params, args)?;
        check_launch_config(&cfg, self.max_shared_optin.max(DEFAULT_SHARED))
            .map_err(|e| e.context(format!("launching {entry}")))?;
        self.bind()?;
        if cfg.shared_mem_bytes > DEFAULT_SHARED {
            // SAFETY: `f.handle` is a function of a module loaded in this context.
            unsafe {
                result::function::set_function_attribute(
                    f.handle,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_mem_bytes as i32,
                )
            }
            .drv(|| {
                format!(
                    "opting {entry} in to {} bytes of shared memory",
                    cfg.shared_mem_bytes
                )
            })?;
        }
        let mut slots: Vec<u64> = args.iter().map(KernelArg::slot).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the argument count, kinds and sizes match the PTX (checked
        // above) and each param points at a slot that lives until the call
        // returns (the driver copies the values at launch); the pointers'
        // validity is the caller's contract.
        unsafe {
            result::launch_kernel(
                f.handle,
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .drv(|| {
            format!(
                "launching {entry} (grid {:?}, block {:?}, {} B shared) on cuda:{}",
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.ordinal()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_of_kf_kernels_pass_and_bad_ones_fail() {
        let max = 227 * 1024;
        for n in [0usize, 1, 255, 257, 1 << 30] {
            check_launch_config(&kf_kernels::elementwise::config(n), max).unwrap();
        }
        for (r, d) in [(1usize, 1usize), (3, 33), (7, 4097), (2, 50257)] {
            check_launch_config(&kf_kernels::layernorm::config(r, d).0, max).unwrap();
        }
        let ok = kf_kernels::elementwise::config(1000);
        let bad = |f: &dyn Fn(&mut LaunchConfig)| {
            let mut c = ok;
            f(&mut c);
            check_launch_config(&c, 48 * 1024).unwrap_err().to_string()
        };
        assert!(bad(&|c| c.grid_dim.0 = 0).contains("empty grid"));
        assert!(bad(&|c| c.block_dim = (1025, 1, 1)).contains("1024 threads"));
        assert!(bad(&|c| c.block_dim = (64, 32, 1)).contains("1024 threads"));
        assert!(bad(&|c| c.grid_dim.1 = 70000).contains("limits"));
        assert!(bad(&|c| c.shared_mem_bytes = 48 * 1024 + 4).contains("allows 49152"));
    }

    #[test]
    fn arguments_are_checked_against_the_ptx() {
        let ew = kf_kernels::family("elementwise").unwrap().ptx;
        let p = crate::cuda::ptx_params(ew, "scale_f32").unwrap();
        let good = [
            KernelArg::Ptr(1 << 20),
            KernelArg::Ptr(2 << 20),
            KernelArg::F32(0.5),
            KernelArg::size(10),
        ];
        check_args("scale_f32", &p, &good).unwrap();
        let e = check_args("scale_f32", &p, &good[..3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes 4 arguments, got 3"), "{e}");
        let mut wrong = good;
        wrong[2] = KernelArg::F64(0.5);
        let e = check_args("scale_f32", &p, &wrong).unwrap_err().to_string();
        assert!(e.contains("argument 2"), "{e}");
        wrong[2] = KernelArg::U32(1);
        assert!(check_args("scale_f32", &p, &wrong).is_err());
        wrong = good;
        wrong[3] = KernelArg::U32(10); // size_t needs 8 bytes
        assert!(check_args("scale_f32", &p, &wrong).is_err());
    }

    #[test]
    fn argument_slots_hold_the_bits() {
        assert_eq!(KernelArg::F32(1.0).slot(), 0x3f80_0000);
        assert_eq!(KernelArg::I32(-1).slot(), 0xffff_ffff);
        assert_eq!(KernelArg::I64(-1).slot(), u64::MAX);
        assert_eq!(KernelArg::F64(2.0).slot(), 2f64.to_bits());
    }
}
