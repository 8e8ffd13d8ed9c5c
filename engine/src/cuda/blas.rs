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
        let raw = RawGemm {
            m: s.m,
            n: s.n,
            k: s.k,
            trans_a: s.trans_a,
            trans_b: s.trans_b,
            lda: if s.trans_a { s.m } else { s.k },
            ldb: if s.trans_b { s.k } else { s.n },
            ldc: s.n,
            stride_a: s.m * s.k,
            stride_b: if s.shared_b { 0 } else { s.k * s.n },
            stride_c: s.m * s.n,
            batch: s.batch,
            a: a.device_ptr(),
            b: b.device_ptr(),
            c: c.device_ptr(),
            alpha,
            beta,
        };
        // SAFETY: A, B, C are live buffers of this device whose lengths were
        // checked against the shape above (strides: whole matrices, B's 0 when shared).
        unsafe { self.gemm_raw::<T>(&raw) }.map_err(|e| e.context(format!("gemm {s:?}")))
    }

    /// The row-major strided-batched GEMM of `g` on raw device addresses, in
    /// `T` with f32 accumulation (CUBLAS_COMPUTE_32F): for each batch index i,
    /// `C_i = alpha op(A_i) op(B_i) + beta C_i`, operand i at `ptr + i * stride`
    /// elements, leading dimensions in elements of the stored row-major matrices.
    ///
    /// # Safety
    /// Every operand of every batch lies in a live block of this device, and C
    /// does not overlap A or B.
    pub unsafe fn gemm_raw<T: GemmElem>(&self, g: &RawGemm) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        ensure!(g.k > 0, "gemm: k = 0 (an empty sum) is not sent to cuBLAS");
        let (m, n, k, z) = (
            int(g.m, "M")?,
            int(g.n, "N")?,
            int(g.k, "K")?,
            int(g.batch, "batch")?,
        );
        let (lda, ldb, ldc) = (int(g.lda, "lda")?, int(g.ldb, "ldb")?, int(g.ldc, "ldc")?);
        let stride = |v: usize, what: &str| -> Result<i64> {
            i64::try_from(v).map_err(|_| anyhow!("gemm {what} = {v} exceeds i64"))
        };
        let (sa, sb, sc) = (
            stride(g.stride_a, "stride A")?,
            stride(g.stride_b, "stride B")?,
            stride(g.stride_c, "stride C")?,
        );
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
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
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: cuBLAS gets B
        // first with n and m swapped; each stored row-major matrix is its own transpose
        // in column-major, so the transpose flags carry over unchanged.
        // SAFETY: the operands' extents are the caller's contract; alpha/beta are host
        // f32 as CUBLAS_COMPUTE_32F needs; the handle is used under the lock and runs on
        // the device's stream.
        unsafe {
            blas::gemm_strided_batched_ex(
                h,
                op(g.trans_b),
                op(g.trans_a),
                n,
                m,
                k,
                (&g.alpha as *const f32).cast::<c_void>(),
                g.b as *const c_void,
                T::CUDA_TYPE,
                ldb,
                sb,
                g.a as *const c_void,
                T::CUDA_TYPE,
                lda,
                sa,
                (&g.beta as *const f32).cast::<c_void>(),
                g.c as *mut c_void,
                T::CUDA_TYPE,
                ldc,
                sc,
                z,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow!(
                "cuBLAS gemm {g:?} in {} on cuda:{}: {e}",
                T::DTYPE,
                self.ordinal()
            )
        })
    }
}

/// A row-major strided-batched GEMM on raw device addresses ([`CudaDevice::gemm_raw`]):
/// sizes, leading dimensions and batch strides in elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawGemm {
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
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub alpha: f32,
    pub beta: f32,
}
