//! The kernel-device abstraction, low enough that tensors can hold device memory: what a
//! backend that runs the CUDA kernels of kernels/*.cu must offer (buffers, host <-> device
//! copies, launches by entry point name, a row-major f32 GEMM). Two backends implement
//! [`KernelDevice`]: the CPU emulator (kernels/emu, which runs the unmodified .cu files) and,
//! with the `cuda` feature, the CUDA layer (cuBLAS for the GEMM).
//!
//! A [`DeviceBuf`] is a type-erased handle to one allocation of one backend; a backend
//! downcasts it to its own buffer type ([`DeviceBuf::get`]), so a buffer used on another
//! device is an error naming both, never undefined behaviour. Launches write through `&DeviceBuf`,
//! as CUDA kernels write through device pointers.

use anyhow::{anyhow, ensure, Result};
pub use kf_kernels::LaunchConfig;
use std::any::Any;

/// One allocation of a backend (its own buffer type behind [`DeviceBuf`]).
pub trait DeviceMemory: Any + Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn bytes(&self) -> usize;
    /// The backend's name, for the error when a buffer is used on another device.
    fn backend(&self) -> &'static str;
}

/// A device buffer of some backend (owned; freed on drop).
#[derive(Debug)]
pub struct DeviceBuf(Box<dyn DeviceMemory>);

impl DeviceBuf {
    pub fn new<M: DeviceMemory>(mem: M) -> DeviceBuf {
        DeviceBuf(Box::new(mem))
    }
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }
    /// The backend's own buffer, or an error when this buffer belongs to another backend.
    pub fn get<M: DeviceMemory>(&self) -> Result<&M> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref::<M>().ok_or_else(|| {
            anyhow!(
                "a buffer of {} used on another kind of device ({})",
                self.0.backend(),
                std::any::type_name::<M>()
            )
        })
    }
}

/// One kernel argument, passed by value like `cuLaunchKernel`'s parameters (the same
/// variants as `kf_kernels_emu::Arg`).
#[derive(Debug)]
pub enum KArg<'a> {
    /// The device pointer of a buffer (its first byte).
    Buf(&'a DeviceBuf),
    /// A null device pointer (optional inputs / outputs).
    Null,
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl Clone for KArg<'_> {
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for KArg<'_> {}

/// A (batched, strided) row-major f32 GEMM: for each batch index `i`,
/// `C_i (m x n) = alpha * op(A_i) (m x k) * op(B_i) (k x n) + beta * C_i`, with
/// `A_i` at element `a_off + i * stride_a` of its buffer, stored row-major with leading dimension
/// `lda` (`op(A) = A`, m x k with `lda >= k`; with `trans_a`, A is stored k x m, `lda >= m`, and
/// `op(A) = Aᵀ`), likewise B (k x n, or n x k with `trans_b`) and C (m x n, `ldc >= n`).
/// `beta == 0` means C is only written (it may hold anything, NaN included, on entry), as in cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    /// Element offsets of the first A, B and C in their buffers.
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
}

impl GemmSpec {
    /// One contiguous product `C = A (m x k) * op(B)`, B `k x n` or (with `trans_b`) `n x k`
    /// (the `x · Wᵀ` of a linear layer with W stored `[out, in]`).
    pub fn simple(m: usize, n: usize, k: usize, trans_b: bool) -> GemmSpec {
        GemmSpec {
            m,
            n,
            k,
            trans_a: false,
            trans_b,
            lda: k,
            ldb: if trans_b { k } else { n },
            ldc: n,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
            alpha: 1.0,
            beta: 0.0,
            a_off: 0,
            b_off: 0,
            c_off: 0,
        }
    }

    /// (rows, cols) of the stored A and B.
    pub fn stored_a(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }
    pub fn stored_b(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Checks leading dimensions and that every operand fits its buffer (`*_len` in f32
    /// elements); both backends call this before touching memory.
    pub fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        ensure!(self.batch >= 1, "gemm: batch must be >= 1");
        let need = |name: &str,
                    (r, c): (usize, usize),
                    ld: usize,
                    off: usize,
                    stride: usize,
                    len: usize| {
            ensure!(
                ld >= c.max(1),
                "gemm {self:?}: leading dimension of {name} is {ld}, below its {c} columns"
            );
            if r == 0 || c == 0 {
                return Ok(());
            }
            let last = off + (self.batch - 1) * stride + (r - 1) * ld + c;
            ensure!(
                last <= len,
                "gemm {self:?}: {name} ({r} x {c}, ld {ld}, offset {off}, batch stride {stride}) \
                 needs {last} elements, its buffer holds {len}"
            );
            Ok(())
        };
        need(
            "A",
            self.stored_a(),
            self.lda,
            self.a_off,
            self.stride_a,
            a_len,
        )?;
        need(
            "B",
            self.stored_b(),
            self.ldb,
            self.b_off,
            self.stride_b,
            b_len,
        )?;
        need(
            "C",
            (self.m, self.n),
            self.ldc,
            self.c_off,
            self.stride_c,
            c_len,
        )?;
        ensure!(
            self.batch == 1
                || self.m == 0
                || self.n == 0
                || self.stride_c >= (self.m - 1) * self.ldc + self.n,
            "gemm {self:?}: batches of C overlap (stride_c {} < one {}x{} matrix of ld {})",
            self.stride_c,
            self.m,
            self.n,
            self.ldc
        );
        Ok(())
    }
}

/// A backend that runs the kernels of kernels/*.cu: device memory, copies, launches, GEMM.
/// Object-safe, so a tensor's storage can hold the device it lives on (`Arc<dyn KernelDevice>`).
pub trait KernelDevice: Send + Sync {
    /// A short name for messages ("emu", "cuda:0").
    fn name(&self) -> String;
    /// `bytes` of zeroed device memory.
    fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuf>;
    /// `bytes` of device memory with unspecified contents (the emulator fills it with 0xFF:
    /// NaN as floats, so an unwritten read shows).
    fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        self.alloc_zeroed(bytes)
    }
    /// A device copy of `data` (host to device).
    fn upload(&self, data: &[u8]) -> Result<DeviceBuf>;
    /// The whole buffer (device to host; waits for the launches before it).
    fn download(&self, buf: &DeviceBuf) -> Result<Vec<u8>>;
    /// Size of a buffer in bytes.
    fn buf_bytes(&self, buf: &DeviceBuf) -> usize {
        buf.bytes()
    }
    /// Device to device copy of `bytes` bytes, `src[src_off..]` to `dst[dst_off..]` (offsets
    /// in bytes; the ranges must lie in the buffers and, within one buffer, not overlap).
    fn copy(
        &self,
        src: &DeviceBuf,
        src_off: usize,
        dst: &DeviceBuf,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()>;
    /// Launches the `extern "C" __global__` entry point `entry` (a name of
    /// `kf_kernels::FAMILIES`) over `cfg` with `args`.
    fn launch(&self, entry: &str, cfg: LaunchConfig, args: &[KArg<'_>]) -> Result<()>;
    /// The f32 GEMM of `spec` on buffers of f32 (cuBLAS on a GPU; the CPU GEMM on the
    /// emulator). `c` must not share memory with `a` or `b`.
    fn gemm(&self, spec: &GemmSpec, a: &DeviceBuf, b: &DeviceBuf, c: &DeviceBuf) -> Result<()>;
    /// Waits for the work queued so far (a no-op where launches are synchronous).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The kernel device behind `device` ([`crate::Device::kernel`]): one per process and device,
/// opened on first use and shared (a GPU context is expensive; the emulator is stateless).
pub fn open(device: crate::Device) -> Result<std::sync::Arc<dyn KernelDevice>> {
    use crate::Device;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<Device, Arc<dyn KernelDevice>>>> = OnceLock::new();
    let open = OPEN.get_or_init(Default::default);
    let mut open = open
        .lock()
        .map_err(|_| anyhow!("kernel device table poisoned by an earlier panic"))?;
    if let Some(d) = open.get(&device) {
        return Ok(d.clone());
    }
    let d: Arc<dyn KernelDevice> = match device {
        Device::Cpu => {
            anyhow::bail!("cpu is not a kernel device: it runs the CPU ops, not kernels/*.cu")
        }
        Device::Emu => Arc::new(crate::emu::Emu),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Arc::new(crate::cuda::Cuda::new(n)?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            return Err(crate::device::built_without_cuda().context(device.to_string()))
        }
    };
    open.insert(device, d.clone());
    Ok(d)
}
