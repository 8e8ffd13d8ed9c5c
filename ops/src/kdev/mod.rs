//! The kernel-device abstraction: what a backend that runs the CUDA kernels of kernels/*.cu
//! must offer (device buffers, host <-> device copies, kernel launches by entry point name,
//! and a row-major f32 GEMM), a small device tensor [`DTensor`], and (in [`launch`]) one
//! launcher per kernel op, generic over the device. Two backends implement [`KernelDevice`]:
//! the CPU emulator (`kf_kernels_emu::device::Emu`, which runs the unmodified .cu files and
//! stands in for cuBLAS with the CPU GEMM of [`crate::gemm`]) and, with the `cuda` feature,
//! the CUDA layer of the engine (`cuda::Cuda`: cuBLAS for [`KernelDevice::gemm`]).
//!
//! Buffers are handles: launches write through `&Buf`, as CUDA kernels write through device
//! pointers. Every method returns `anyhow::Result` with the entry point or operation named.

use anyhow::{ensure, Context, Result};
use kf_engine::{DType, Device, Tensor};
pub use kf_kernels::LaunchConfig;

pub mod backward;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod launch;

/// One kernel argument, passed by value like `cuLaunchKernel`'s parameters (the same
/// variants as `kf_kernels_emu::Arg`).
#[derive(Debug)]
pub enum KArg<'a, B> {
    /// The device pointer of a buffer (its first byte).
    Buf(&'a B),
    /// A null device pointer (optional inputs / outputs).
    Null,
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl<B> Clone for KArg<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for KArg<'_, B> {}

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
pub trait KernelDevice {
    /// A device buffer (owned allocation; freed on drop).
    type Buf;

    /// A short name for messages ("emu", "cuda:0").
    fn name(&self) -> String;
    /// `bytes` of zeroed device memory.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buf>;
    /// `bytes` of device memory with unspecified contents (the emulator fills it with 0xFF:
    /// NaN as floats, so an unwritten read shows).
    fn alloc(&self, bytes: usize) -> Result<Self::Buf> {
        self.alloc_zeroed(bytes)
    }
    /// A device copy of `data` (host to device).
    fn upload(&self, data: &[u8]) -> Result<Self::Buf>;
    /// The whole buffer (device to host; waits for the launches before it).
    fn download(&self, buf: &Self::Buf) -> Result<Vec<u8>>;
    /// Size of a buffer in bytes.
    fn buf_bytes(&self, buf: &Self::Buf) -> usize;
    /// Device to device copy of `bytes` bytes, `src[src_off..]` to `dst[dst_off..]` (offsets
    /// in bytes; the ranges must lie in the buffers and, within one buffer, not overlap).
    fn copy(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &Self::Buf,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()>;
    /// Launches the `extern "C" __global__` entry point `entry` (a name of
    /// `kf_kernels::FAMILIES`) over `cfg` with `args`.
    fn launch(&self, entry: &str, cfg: LaunchConfig, args: &[KArg<'_, Self::Buf>]) -> Result<()>;
    /// The f32 GEMM of `spec` on buffers of f32 (cuBLAS on a GPU; the CPU GEMM on the
    /// emulator). `c` must not share memory with `a` or `b`.
    fn gemm(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf, c: &Self::Buf) -> Result<()>;
    /// Waits for the work queued so far (a no-op where launches are synchronous).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// A contiguous row-major tensor on a kernel device: buffer, shape and element type
/// (F32 for activations and weights, U32 for ids / tokens / counts, F64 for noise levels
/// and uniforms).
pub struct DTensor<B> {
    pub buf: B,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B> std::fmt::Debug for DTensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DTensor({:?}, {:?})", self.shape, self.dtype)
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<B> DTensor<B> {
    /// Wraps a buffer; errors when it is smaller than `shape` of `dtype` needs.
    pub fn from_buf<D: KernelDevice<Buf = B>>(
        dev: &D,
        buf: B,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor<B>> {
        let need = numel(shape) * dtype.size();
        ensure!(
            dev.buf_bytes(&buf) >= need,
            "DTensor {shape:?} {dtype:?} needs {need} bytes, the buffer has {}",
            dev.buf_bytes(&buf)
        );
        Ok(DTensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// Zeros of `shape` and `dtype`.
    pub fn zeros<D: KernelDevice<Buf = B>>(
        dev: &D,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor<B>> {
        let buf = dev
            .alloc_zeroed(numel(shape) * dtype.size())
            .with_context(|| format!("allocating {shape:?} {dtype:?} on {}", dev.name()))?;
        Ok(DTensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// Unspecified contents of `shape` and `dtype` (for outputs a kernel writes in full).
    pub fn uninit<D: KernelDevice<Buf = B>>(
        dev: &D,
        shape: &[usize],
        dtype: DType,
    ) -> Result<DTensor<B>> {
        let buf = dev
            .alloc(numel(shape) * dtype.size())
            .with_context(|| format!("allocating {shape:?} {dtype:?} on {}", dev.name()))?;
        Ok(DTensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }
    /// A device copy of host values.
    pub fn from_slice<D: KernelDevice<Buf = B>, T: kf_engine::Element>(
        dev: &D,
        data: &[T],
        shape: &[usize],
    ) -> Result<DTensor<B>> {
        ensure!(
            data.len() == numel(shape),
            "DTensor::from_slice: {} values for shape {shape:?}",
            data.len()
        );
        let buf = dev
            .upload(bytemuck::cast_slice(data))
            .with_context(|| format!("uploading {shape:?} to {}", dev.name()))?;
        Ok(DTensor {
            buf,
            shape: shape.to_vec(),
            dtype: T::DTYPE,
        })
    }
    /// A device copy of a CPU tensor (any layout; F32, F16, BF16, F64, U32 or I32; kernels
    /// compute in f32, half tensors are weights of [`launch::matmul_into`]).
    pub fn upload<D: KernelDevice<Buf = B>>(dev: &D, t: &Tensor) -> Result<DTensor<B>> {
        match t.dtype() {
            DType::F32 => Self::from_slice(dev, &t.to_vec::<f32>()?, t.shape()),
            DType::F16 => Self::from_slice(dev, &t.to_vec::<half::f16>()?, t.shape()),
            DType::BF16 => Self::from_slice(dev, &t.to_vec::<half::bf16>()?, t.shape()),
            DType::F64 => Self::from_slice(dev, &t.to_vec::<f64>()?, t.shape()),
            DType::U32 => Self::from_slice(dev, &t.to_vec::<u32>()?, t.shape()),
            DType::I32 => Self::from_slice(dev, &t.to_vec::<i32>()?, t.shape()),
        }
    }
    /// The values as `T` (which must be this tensor's dtype).
    pub fn to_vec<D: KernelDevice<Buf = B>, T: kf_engine::Element>(
        &self,
        dev: &D,
    ) -> Result<Vec<T>> {
        ensure!(
            T::DTYPE == self.dtype,
            "DTensor::to_vec: the tensor is {:?}, asked for {:?}",
            self.dtype,
            T::DTYPE
        );
        let bytes = dev
            .download(&self.buf)
            .with_context(|| format!("downloading {:?} from {}", self.shape, dev.name()))?;
        let n = self.numel();
        let mut out = vec![T::zeroed(); n];
        let want = n * std::mem::size_of::<T>();
        ensure!(
            bytes.len() >= want,
            "download: {} bytes, need {want}",
            bytes.len()
        );
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..want]);
        Ok(out)
    }
    /// A CPU tensor of the values (same shape and dtype).
    pub fn download<D: KernelDevice<Buf = B>>(&self, dev: &D) -> Result<Tensor> {
        match self.dtype {
            DType::F32 => Tensor::from_vec(self.to_vec::<D, f32>(dev)?, &self.shape, Device::Cpu),
            DType::F16 => {
                Tensor::from_vec(self.to_vec::<D, half::f16>(dev)?, &self.shape, Device::Cpu)
            }
            DType::BF16 => {
                Tensor::from_vec(self.to_vec::<D, half::bf16>(dev)?, &self.shape, Device::Cpu)
            }
            DType::F64 => Tensor::from_vec(self.to_vec::<D, f64>(dev)?, &self.shape, Device::Cpu),
            DType::U32 => Tensor::from_vec(self.to_vec::<D, u32>(dev)?, &self.shape, Device::Cpu),
            DType::I32 => Tensor::from_vec(self.to_vec::<D, i32>(dev)?, &self.shape, Device::Cpu),
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The same values under another shape of as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<DTensor<B>> {
        self.set_shape(shape)?;
        Ok(self)
    }
    /// [`Self::reshape`] in place (for a tensor that is borrowed elsewhere).
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        ensure!(
            numel(shape) == self.numel(),
            "reshape {:?} -> {shape:?}: element counts differ",
            self.shape
        );
        self.shape = shape.to_vec();
        Ok(())
    }
    /// Errors unless the dtype is `want`.
    pub fn expect_dtype(&self, op: &str, what: &str, want: DType) -> Result<()> {
        ensure!(
            self.dtype == want,
            "{op}: {what} must be {want:?}, got {:?} {:?}",
            self.dtype,
            self.shape
        );
        Ok(())
    }
}
