//! cuBLAS GEMM on row-major buffers: C = alpha op(A) op(B) + beta C for a
//! batch of matrices, f32, f16 or bf16 storage, always f32 accumulation
//! (cublasGemmStridedBatchedEx with CUBLAS_COMPUTE_32F: no TF32, no f16
//! accumulation). Letters: C [M, N], op(A) [M, K], op(B) [K, N]; Z batches.
//! Row-major is handled as cuBLAS's column-major of the transposes:
//! Cᵀ = op(B)ᵀ op(A)ᵀ, so cuBLAS gets (B, A) with N and M swapped.

use super::buffer::{CudaBuffer, DeviceElem};
use super::context::{lock, CudaDevice};
use super::probe;
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{result as blas, sys};
use half::{bf16, f16};
use std::ffi::c_void;

/// Storage types cuBLAS multiplies with f32 accumulation.
pub trait GemmElem: DeviceElem {
    const CUDA_TYPE: sys::cudaDataType;
}
impl GemmElem for f32 {
    const CUDA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}
impl GemmElem for f16 {
    const CUDA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16F;
}
impl GemmElem for bf16 {
    const CUDA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

/// A row-major batched GEMM. A holds Z matrices [M, K] ([K, M] if
/// `trans_a`), B holds Z matrices [K, N] ([N, K] if `trans_b`) or one shared by
/// every batch (`shared_b`), C holds Z matrices [M, N]; all contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub shared_b: bool,
}

impl GemmShape {
    /// One plain product [M, K] · [K, N].
    pub fn new(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            shared_b: false,
        }
    }
}

/// The cuBLAS handle of one device, bound to its stream.
pub(super) struct Blas {
    handle: sys::cublasHandle_t,
}

// SAFETY: a cuBLAS handle may move between threads; it is only used under the
// device's `blas` mutex, so never from two threads at once.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate and destroyed once, here.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("gemm {what} = {v} exceeds cuBLAS's 32-bit sizes"))
}

impl CudaDevice {
    /// C = alpha op(A) op(B) + beta C on this device's stream.
    pub fn gemm<T: GemmElem>(
        &self,
        s: GemmShape,
        alpha: f32,
        a: &CudaBuffer<T>,
        b: &CudaBuffer<T>,
        beta: f32,
        c: &mut CudaBuffer<T>,
    ) -> Result<()> {
        for buf in [a.device(), b.device(), c.device()] {
            self.same_device(buf)?;
        }
        let nb = if s.shared_b { 1 } else { s.batch };
        let want = |rows: usize, cols: usize, z: usize| rows.checked_mul(cols)?.checked_mul(z);
        let check = |name: &str, len: usize, rows: usize, cols: usize, z: usize| -> Result<()> {
            ensure!(
                want(rows, cols, z) == Some(len),
                "gemm {s:?}: {name} holds {len} elements, not {z} x {rows} x {cols}"
            );
            Ok(())
        };
        check("A", a.len(), s.m, s.k, s.batch)?;
        check("B", b.len(), s.k, s.n, nb)?;
        check("C", c.len(), s.m, s.n, s.batch)?;
        if s.m == 0 || s.n == 0 || s.batch == 0 {
            return Ok(());
        }
        if s.k == 0 {
            bail!("gemm {s:?}: k = 0 (an empty sum) is not sent to cuBLAS");
        }
        let (m, n, k, z) = (
            int(s.m, "M")?,
            int(s.n, "N")?,
            int(s.k, "K")?,
            int(s.batch, "batch")?,
        );
        // leading dimensions of the row-major operands as cuBLAS sees them
        let lda = if s.trans_a { m } else { k };
        let ldb = if s.trans_b { k } else { n };
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let stride_b = if s.shared_b { 0 } else { (s.k * s.n) as i64 };
        probe::check_cublas()?;
        self.bind()?;
        let mut guard = lock(&self.blas);
        if guard.is_none() {
            let handle = blas::create_handle()
                .map_err(|e| anyhow!("creating a cuBLAS handle on cuda:{}: {e}", self.ordinal()))?;
            let h = Blas { handle };
            // SAFETY: a fresh handle and this device's live stream.
            unsafe { blas::set_stream(h.handle, self.stream.cu_stream() as sys::cudaStream_t) }
                .map_err(|e| {
                    anyhow!(
                        "binding cuBLAS to the stream of cuda:{}: {e}",
                        self.ordinal()
                    )
                })?;
            *guard = Some(h);
        }
        let h = guard.as_ref().map(|b| b.handle).expect("set above");
        // SAFETY: A, B, C are live buffers of this device whose lengths were
        // checked against the shape above (strides: whole matrices, B's 0
        // when shared); alpha/beta are host f32 as CUBLAS_COMPUTE_32F needs;
        // the handle is used under the lock and runs on the device's stream.
        unsafe {
            blas::gemm_strided_batched_ex(
                h,
                op(s.trans_b),
                op(s.trans_a),
                n,
                m,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                b.device_ptr() as *const c_void,
                T::CUDA_TYPE,
                ldb,
                stride_b,
                a.device_ptr() as *const c_void,
                T::CUDA_TYPE,
                lda,
                (s.m * s.k) as i64,
                (&beta as *const f32).cast::<c_void>(),
                c.device_ptr() as *mut c_void,
                T::CUDA_TYPE,
                n,
                (s.m * s.n) as i64,
                z,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow!(
                "cuBLAS gemm {s:?} in {} on cuda:{}: {e}",
                T::DTYPE,
                self.ordinal()
            )
        })
    }
}
