//! f32/f64 GEMM with arbitrary strides (C = [C +] A·B, validated, on the current rayon pool).
//! Backend per shape, by measured speed (Zen 4, 2 threads, median GFLOP/s, numpy/OpenBLAS
//! 0.3.31 in brackets; `kfrun bench gemm`): own runtime-dispatched AVX-512/AVX2/portable
//! kernels for m or n <= 8 and for x·Wᵀ (B columns contiguous) up to 64 rows, where crates are
//! up to 5x slower (8x768x3072 x·Wᵀ: 171 [48], `gemm` 32, faer 70; 1x768x768: 59 [56]); the
//! `gemm` crate (x86-v4) when B's rows are contiguous (64x768x3072: 209 [159], faer 100-170);
//! faer for larger x·Wᵀ (1024³: 219 [196], `gemm` 176, own 164).
//!
//! The Linear layers' products do not come through `gemm`: [`xwt`] (module `xwt`) is the
//! decode-shaped x·Wᵀ for f32, f16 and bf16 weights (`kfrun bench decode`), and for weights
//! kept in the ggml block formats Q8_0 / Q4_0 / Q4_1 (module `quant`, through the same `xwt`).

use anyhow::{anyhow, ensure, Result};

mod quant;
mod xwt;
pub use quant::{QFormat, QK};
pub use xwt::{xwt, WRows};

/// Element types `gemm` supports (f32 and f64). Sealed: the kernels exist only for these.
pub trait GemmElem: Copy + Send + Sync + 'static + sealed::Elem {}
impl GemmElem for f32 {}
impl GemmElem for f64 {}

/// Rows (of A, after an optional role swap) up to which the own small-m kernels are used.
const SMALL_M: usize = 8;
/// Own dot-product kernels for B-column-contiguous products while min(m, n) is at most
/// this (and k is at least `DOT_MIN_K`); faer's packed kernels win beyond.
const DOT_MAX: usize = 64;
/// Minimum k for the own dot-product kernels above `SMALL_M` rows (short dots lose).
const DOT_MIN_K: usize = 128;
/// Rows kind up to this many rows also splits k into blocks (see `rows_kblocks`).
const ROWS_KSPLIT_M: usize = 1;
/// Below this many multiply-adds a call runs on the calling thread only.
const PAR_MIN_WORK: usize = 1 << 17;

/// Best instruction set of this CPU for the own kernels.
fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

pub(crate) mod sealed {
    /// Instruction set the own kernels run with, detected once per call.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Isa {
        #[cfg(target_arch = "x86_64")]
        Avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        Portable,
    }

    /// Which own kernel family a region is computed with.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        /// B rows contiguous (`b_s` = row stride); A packed k-major (`a[kk*m + i]`); m <= 8.
        Rows,
        /// Dot products: A rows and B columns contiguous along k (`a_s` / `b_s` = their strides).
        Dot,
    }

    /// Raw operands of the own kernels. Every index they derive was validated by `gemm`.
    #[derive(Clone, Copy)]
    pub struct Args<T> {
        pub(super) m: usize,
        pub(super) k: usize,
        pub(super) a: *const T,
        pub(super) a_s: usize,
        pub(super) b: *const T,
        pub(super) b_s: usize,
        pub(super) c: *mut T,
        pub(super) c_rs: usize,
        pub(super) c_cs: usize,
        pub(super) accumulate: bool,
    }
    // SAFETY: `Args` is shared only among the workers of one `gemm` call; they read A and B
    // and write disjoint regions of C, so sending the raw pointers across threads is sound.
    unsafe impl<T> Send for Args<T> {}
    // SAFETY: as above.
    unsafe impl<T> Sync for Args<T> {}

    pub trait Elem:
        Copy
        + Send
        + Sync
        + 'static
        + PartialEq
        + core::ops::Add<Output = Self>
        + core::ops::Mul<Output = Self>
    {
        // Not `ZERO`/`ONE`: callers often also bound T by a float trait with those names.
        const GEMM_ZERO: Self;
        const GEMM_ONE: Self;
        /// `faer`'s matmul on validated operands (`Par::rayon(threads)` or `Par::Seq`).
        ///
        /// # Safety
        /// The pointers and strides must describe valid, in-bounds operands (see `gemm`),
        /// C must not overlap itself or A or B, and all strides must fit in isize.
        #[doc(hidden)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn faer_matmul(
            dims: (usize, usize, usize),
            a: (*const Self, usize, usize),
            b: (*const Self, usize, usize),
            c: (*mut Self, usize, usize),
            accumulate: bool,
            threads: usize,
        );
        /// SIMD lanes of the kernels for `isa`.
        #[doc(hidden)]
        fn lanes(isa: Isa) -> usize;
        /// Computes rows [i0, i1) x columns [j0, j1) of C with the `kind` kernels.
        ///
        /// # Safety
        /// `p` must describe valid operands (see `gemm`), the region must be inside m x n,
        /// no other thread may write it, and `isa` must be supported by this CPU.
        #[doc(hidden)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn region(
            isa: Isa,
            kind: Kind,
            p: &Args<Self>,
            i0: usize,
            i1: usize,
            j0: usize,
            j1: usize,
        );
    }
}
use sealed::{Args, Elem, Isa, Kind};

/// Minimal SIMD vocabulary the own kernels are written in: one implementation per
/// instruction set and element type, `W` lanes per vector.
///
/// # Safety
/// The methods may only run on a CPU with the implementation's instruction set (they are
/// reached only through the matching `region_*` entry point, chosen by `detect_isa`), and
/// `load`/`store` need `W` valid elements at the pointer.
trait Simd: Copy {
    type T: Elem;
    type V: Copy;
    const W: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: Self::T) -> Self::V;
    unsafe fn load(p: *const Self::T) -> Self::V;
    unsafe fn store(p: *mut Self::T, v: Self::V);
    /// a*b + c
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> Self::T;
    unsafe fn sfma(a: Self::T, b: Self::T, c: Self::T) -> Self::T;
}

/// f32 vocabularies that also widen 16-bit floats in registers (16-bit weights are read as
/// such; the products and sums stay f32).
///
/// # Safety
/// As `Simd`; the loads need `W` valid 16-bit elements at the pointer.
trait HalfSimd: Simd<T = f32> {
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn load_bf16(p: *const u16) -> Self::V;
}

/// The storage of a `BElem`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    Native,
    F16,
    Bf16,
}

/// An element of B as the dot kernels read it: the kernel's own type as is, or a 16-bit
/// float widened to f32 (exactly: every f16 / bf16 value is an f32 value).
trait BElem<S: Simd>: Copy {
    /// How the element is stored: `Native` (the kernel's own type), `F16` or `Bf16`, for
    /// kernels written in assembly that pick their load instructions by it.
    const STORED: Stored;
    /// `S::W` elements from `p` as one vector.
    ///
    /// # Safety
    /// `p` must point at `S::W` valid elements; the CPU must support `S`'s ISA.
    unsafe fn vload(p: *const Self) -> S::V;
    fn widen(self) -> S::T;
}
impl<S: Simd<T = f32>> BElem<S> for f32 {
    const STORED: Stored = Stored::Native;
    #[inline(always)]
    unsafe fn vload(p: *const f32) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl<S: Simd<T = f64>> BElem<S> for f64 {
    const STORED: Stored = Stored::Native;
    #[inline(always)]
    unsafe fn vload(p: *const f64) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}
impl<S: HalfSimd> BElem<S> for half::f16 {
    const STORED: Stored = Stored::F16;
    #[inline(always)]
    unsafe fn vload(p: *const half::f16) -> S::V {
        S::load_f16(p as *const u16)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl<S: HalfSimd> BElem<S> for half::bf16 {
    const STORED: Stored = Stored::Bf16;
    #[inline(always)]
    unsafe fn vload(p: *const half::bf16) -> S::V {
        S::load_bf16(p as *const u16)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{HalfSimd, Simd};
    use core::arch::x86_64::*;

    impl HalfSimd for Avx2F32 {
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m256 {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        }
    }

    impl HalfSimd for Avx512F32 {
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u16) -> __m512 {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2F32;
    impl Simd for Avx2F32 {
        type T = f32;
        type V = __m256;
        const W: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn sfma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2F64;
    impl Simd for Avx2F64 {
        type T = f64;
        type V = __m256d;
        const W: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> __m256d {
            _mm256_setzero_pd()
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> __m256d {
            _mm256_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m256d {
            _mm256_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: __m256d) {
            _mm256_storeu_pd(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256d, b: __m256d, c: __m256d) -> __m256d {
            _mm256_fmadd_pd(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256d, b: __m256d) -> __m256d {
            _mm256_add_pd(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256d) -> f64 {
            let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
            let s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
            _mm_cvtsd_f64(s)
        }
        #[inline(always)]
        unsafe fn sfma(a: f64, b: f64, c: f64) -> f64 {
            a.mul_add(b, c)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512F32;
    impl Simd for Avx512F32 {
        type T = f32;
        type V = __m512;
        const W: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn sfma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx512F64;
    impl Simd for Avx512F64 {
        type T = f64;
        type V = __m512d;
        const W: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m512d {
            _mm512_setzero_pd()
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> __m512d {
            _mm512_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> __m512d {
            _mm512_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f64, v: __m512d) {
            _mm512_storeu_pd(p, v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
            _mm512_fmadd_pd(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512d, b: __m512d) -> __m512d {
            _mm512_add_pd(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512d) -> f64 {
            _mm512_reduce_add_pd(v)
        }
        #[inline(always)]
        unsafe fn sfma(a: f64, b: f64, c: f64) -> f64 {
            a.mul_add(b, c)
        }
    }
}

/// Portable fallback: 4 scalar lanes, plain mul + add (no libm fma call).
#[derive(Clone, Copy)]
struct Portable<T>(core::marker::PhantomData<T>);
macro_rules! portable_impl {
    ($t:ty) => {
        impl Simd for Portable<$t> {
            type T = $t;
            type V = [$t; 4];
            const W: usize = 4;
            #[inline(always)]
            unsafe fn zero() -> [$t; 4] {
                [0.0; 4]
            }
            #[inline(always)]
            unsafe fn splat(x: $t) -> [$t; 4] {
                [x; 4]
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> [$t; 4] {
                (p as *const [$t; 4]).read_unaligned()
            }
            #[inline(always)]
            unsafe fn store(p: *mut $t, v: [$t; 4]) {
                (p as *mut [$t; 4]).write_unaligned(v)
            }
            #[inline(always)]
            unsafe fn fma(a: [$t; 4], b: [$t; 4], c: [$t; 4]) -> [$t; 4] {
                [
                    a[0] * b[0] + c[0],
                    a[1] * b[1] + c[1],
                    a[2] * b[2] + c[2],
                    a[3] * b[3] + c[3],
                ]
            }
            #[inline(always)]
            unsafe fn add(a: [$t; 4], b: [$t; 4]) -> [$t; 4] {
                [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
            }
            #[inline(always)]
            unsafe fn sum(v: [$t; 4]) -> $t {
                (v[0] + v[2]) + (v[1] + v[3])
            }
            #[inline(always)]
            unsafe fn sfma(a: $t, b: $t, c: $t) -> $t {
                a * b + c
            }
        }
    };
}
portable_impl!(f32);
portable_impl!(f64);

impl HalfSimd for Portable<f32> {
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> [f32; 4] {
        let h = (p as *const [u16; 4]).read_unaligned();
        h.map(|b| half::f16::from_bits(b).to_f32())
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> [f32; 4] {
        let h = (p as *const [u16; 4]).read_unaligned();
        h.map(|b| f32::from_bits((b as u32) << 16))
    }
}

// ---------------------------------------------------------------------------------------
// Kernels. All are `#[inline(always)]` generics over `Simd`, instantiated inside the
// per-ISA `#[target_feature]` entry points below. Accumulator arrays are indexed only by
// constants (plain index loops over const bounds) so LLVM keeps them in registers.
//
// Safety contract shared by every kernel `unsafe fn` below: `p` describes operands that
// passed `gemm`'s validation (every element reachable from m, k, the region and the
// strides is in bounds; C's positions are distinct), the region lies inside m x n and is
// written by no other thread, and the CPU supports `S`'s instruction set.

/// Writes (or adds, when accumulating) W results from `x` to consecutive columns of one
/// row of C starting at `c`.
#[inline(always)]
unsafe fn store_c<S: Simd>(p: &Args<S::T>, c: *mut S::T, x: *const S::T) {
    if p.c_cs == 1 {
        let x = S::load(x);
        S::store(
            c,
            if p.accumulate {
                S::add(S::load(c), x)
            } else {
                x
            },
        );
    } else {
        for l in 0..S::W {
            let q = c.add(l * p.c_cs);
            *q = if p.accumulate {
                *q + *x.add(l)
            } else {
                *x.add(l)
            };
        }
    }
}

/// Rows kind, one register tile: rows [i0, i0+MR) x columns [j, j+NV*W), all of k.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn rows_tile<S: Simd, const MR: usize, const NV: usize>(
    p: &Args<S::T>,
    i0: usize,
    j: usize,
) {
    let mut acc = [[S::zero(); NV]; MR];
    let mut bp = p.b.add(j);
    let mut ap = p.a.add(i0);
    for _ in 0..p.k {
        let mut bv = [S::zero(); NV];
        for v in 0..NV {
            bv[v] = S::load(bp.add(v * S::W));
        }
        for i in 0..MR {
            let a = S::splat(*ap.add(i));
            for v in 0..NV {
                acc[i][v] = S::fma(a, bv[v], acc[i][v]);
            }
        }
        bp = bp.wrapping_add(p.b_s);
        ap = ap.wrapping_add(p.m);
    }
    // Spill once (constant indices only), then write C from memory.
    let mut out = [[S::zero(); NV]; MR];
    let o: *mut S::T = out.as_mut_ptr().cast();
    for i in 0..MR {
        for v in 0..NV {
            S::store(o.add((i * NV + v) * S::W), acc[i][v]);
        }
    }
    for i in 0..MR {
        let c = p.c.add((i0 + i) * p.c_rs + j * p.c_cs);
        for v in 0..NV {
            store_c::<S>(p, c.add(v * S::W * p.c_cs), o.add((i * NV + v) * S::W));
        }
    }
}

/// Rows kind, one column: rows [i0, i0+MR), all of k (scalar column tail).
#[inline(always)]
unsafe fn rows_col<S: Simd, const MR: usize>(p: &Args<S::T>, i0: usize, j: usize) {
    let mut acc = [S::T::GEMM_ZERO; MR];
    let mut bp = p.b.add(j);
    let mut ap = p.a.add(i0);
    for _ in 0..p.k {
        let b = *bp;
        for (i, x) in acc.iter_mut().enumerate() {
            *x = S::sfma(*ap.add(i), b, *x);
        }
        bp = bp.wrapping_add(p.b_s);
        ap = ap.wrapping_add(p.m);
    }
    for (i, &x) in acc.iter().enumerate() {
        let q = p.c.add((i0 + i) * p.c_rs + j * p.c_cs);
        *q = if p.accumulate { *q + x } else { x };
    }
}

/// Rows kind for m = MR1 + MR2 rows (one or two register tiles stacked), columns [j0, j1).
#[inline(always)]
unsafe fn rows_tiles<S: Simd, const MR1: usize, const MR2: usize, const NV: usize>(
    p: &Args<S::T>,
    j0: usize,
    j1: usize,
) {
    let tw = NV * S::W;
    let mut j = j0;
    while j + tw <= j1 {
        rows_tile::<S, MR1, NV>(p, 0, j);
        if MR2 > 0 {
            rows_tile::<S, MR2, NV>(p, MR1, j);
        }
        j += tw;
    }
    while j + S::W <= j1 {
        rows_tile::<S, MR1, 1>(p, 0, j);
        if MR2 > 0 {
            rows_tile::<S, MR2, 1>(p, MR1, j);
        }
        j += S::W;
    }
    while j < j1 {
        rows_col::<S, MR1>(p, 0, j);
        if MR2 > 0 {
            rows_col::<S, MR2>(p, MR1, j);
        }
        j += 1;
    }
}

/// Rows kind for m = MR (1 or 2): KU rows of B at a time are folded into an L1-resident
/// block of C ("axpy" form), so B is read as a few long sequential row streams. For one or
/// two rows of A this beats register tiles, which walk B down narrow column strips.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn rows_axpy<S: Simd, const MR: usize, const KU: usize>(
    p: &Args<S::T>,
    j0: usize,
    j1: usize,
) {
    let (k, w) = (p.k, S::W);
    // 16 KiB of partial sums, a whole number of vectors per row.
    let cw = ((16384 / core::mem::size_of::<S::T>()) / MR / w).max(1) * w;
    let jv = j0 + (j1 - j0) / w * w;
    let mut scratch = vec![S::T::GEMM_ZERO; MR * cw];
    let buf = scratch.as_mut_ptr();
    let mut c0 = j0;
    while c0 < jv {
        let nv = ((jv - c0).min(cw)) / w;
        for i in 0..MR {
            for v in 0..nv {
                S::store(buf.add(i * cw + v * w), S::zero());
            }
        }
        let mut kk = 0;
        while kk + KU <= k {
            let mut a = [[S::zero(); KU]; MR];
            for i in 0..MR {
                for u in 0..KU {
                    a[i][u] = S::splat(*p.a.add((kk + u) * p.m + i));
                }
            }
            let brow = p.b.add(kk * p.b_s + c0);
            for v in 0..nv {
                let mut bv = [S::zero(); KU];
                for u in 0..KU {
                    bv[u] = S::load(brow.add(u * p.b_s + v * w));
                }
                for i in 0..MR {
                    let q = buf.add(i * cw + v * w);
                    let mut acc = S::load(q);
                    for u in 0..KU {
                        acc = S::fma(a[i][u], bv[u], acc);
                    }
                    S::store(q, acc);
                }
            }
            kk += KU;
        }
        while kk < k {
            let brow = p.b.add(kk * p.b_s + c0);
            for i in 0..MR {
                let a = S::splat(*p.a.add(kk * p.m + i));
                for v in 0..nv {
                    let q = buf.add(i * cw + v * w);
                    S::store(q, S::fma(a, S::load(brow.add(v * w)), S::load(q)));
                }
            }
            kk += 1;
        }
        for i in 0..MR {
            let c = p.c.add(i * p.c_rs + c0 * p.c_cs);
            for v in 0..nv {
                store_c::<S>(p, c.add(v * w * p.c_cs), buf.add(i * cw + v * w));
            }
        }
        c0 += nv * w;
    }
    for j in jv..j1 {
        rows_col::<S, MR>(p, 0, j);
    }
}

/// Register-tile plan of the Rows kind for m = 1..=8: (rows of the first tile, rows of a
/// second stacked tile, vectors per tile row); 0 vectors selects `rows_axpy`. Sized so
/// accumulators + B vectors + a broadcast fit the register file (32 zmm / 16 ymm / 16 xmm).
type RowsPlan = [(usize, usize, usize); 8];
#[rustfmt::skip]
const ROWS_AVX512: RowsPlan = [(1, 0, 0), (2, 0, 8), (3, 0, 6), (4, 0, 5), (5, 0, 4), (6, 0, 4), (7, 0, 3), (8, 0, 3)];
#[rustfmt::skip]
const ROWS_AVX2: RowsPlan = [(1, 0, 0), (2, 0, 0), (3, 0, 3), (4, 0, 3), (3, 2, 3), (3, 3, 3), (4, 3, 3), (4, 4, 3)];
#[rustfmt::skip]
const ROWS_PORTABLE: RowsPlan = [(1, 0, 0), (2, 0, 0), (3, 0, 2), (4, 0, 2), (3, 2, 2), (3, 3, 2), (4, 3, 2), (4, 4, 2)];

fn rows_plan(isa: Isa) -> &'static RowsPlan {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &ROWS_AVX512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => &ROWS_AVX2,
        Isa::Portable => &ROWS_PORTABLE,
    }
}

/// Number of k blocks (1 or 2, each >= 192 rows of B) the Rows kind splits a parallel-sized
/// product with m <= `ROWS_KSPLIT_M` into; a function of the shape only, never of the
/// thread count. (Measured for m = 1: 2 blocks beat 1, 4 or 8; for m = 2 none beat 1.)
fn rows_kblocks(m: usize, n: usize, k: usize) -> usize {
    if m > ROWS_KSPLIT_M || m.saturating_mul(n).saturating_mul(k) < PAR_MIN_WORK || k < 384 {
        1
    } else {
        2
    }
}

/// Column alignment of a thread's share for the Rows kind, so only the last share has tails.
fn rows_align(plan: &RowsPlan, m: usize, w: usize) -> usize {
    w * plan[m - 1].2.max(1)
}

macro_rules! rows_dispatch {
    ($S:ty, $plan:expr, $p:expr, $j0:expr, $j1:expr) => {{
        const P: RowsPlan = $plan;
        match $p.m {
            1 => rows_axpy::<$S, 1, 8>($p, $j0, $j1),
            2 if P[1].2 == 0 => rows_axpy::<$S, 2, 4>($p, $j0, $j1),
            2 => rows_tiles::<$S, 2, 0, { P[1].2 + (P[1].2 == 0) as usize }>($p, $j0, $j1),
            3 => rows_tiles::<$S, { P[2].0 }, { P[2].1 }, { P[2].2 }>($p, $j0, $j1),
            4 => rows_tiles::<$S, { P[3].0 }, { P[3].1 }, { P[3].2 }>($p, $j0, $j1),
            5 => rows_tiles::<$S, { P[4].0 }, { P[4].1 }, { P[4].2 }>($p, $j0, $j1),
            6 => rows_tiles::<$S, { P[5].0 }, { P[5].1 }, { P[5].2 }>($p, $j0, $j1),
            7 => rows_tiles::<$S, { P[6].0 }, { P[6].1 }, { P[6].2 }>($p, $j0, $j1),
            8 => rows_tiles::<$S, { P[7].0 }, { P[7].1 }, { P[7].2 }>($p, $j0, $j1),
            _ => unreachable!("Rows kind is only used for m <= {SMALL_M}"),
        }
    }};
}

/// Hints the cache line at `p` into L1 (`L2 = false`) or into L2 only (`L2 = true`: for
/// streams read far ahead, where L1 prefetches would hold the few L1 miss buffers and stall
/// the loads of the data in use). Never faults, so `p` may point anywhere.
#[inline(always)]
fn prefetch_to<const L2: bool, T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch instructions never fault and do not dereference in the language
    // sense; SSE is part of the x86_64 baseline.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        if L2 {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `prefetch_to` into L1.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    prefetch_to::<false, T>(p)
}

/// `prefetch_to` into L2.
#[inline(always)]
fn prefetch_l2<T>(p: *const T) {
    prefetch_to::<true, T>(p)
}

/// How many B rows ahead a dot tile of `nr` rows prefetches (into L2): two strips, four for
/// 16-bit elements (the same distance in bytes).
#[inline(always)]
const fn prefetch_rows_ahead(elem_bytes: usize, nr: usize) -> usize {
    if elem_bytes == 2 {
        4 * nr
    } else {
        2 * nr
    }
}

/// Dot kind, one register tile: rows [i, i+MR) x columns [j, j+NR), all of k. B is read
/// from `b` (`p.b` retyped: f32 / f64 as is, or 16-bit weights widened in registers).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn dot_tile<S: Simd, H: BElem<S>, const MR: usize, const NR: usize>(
    p: &Args<S::T>,
    b: *const H,
    i: usize,
    j: usize,
) {
    let k = p.k;
    let a = p.a.add(i * p.a_s);
    let b = b.add(j * p.b_s);
    let mut acc = [[S::zero(); NR]; MR];
    let kv = k / S::W * S::W;
    let ahead = prefetch_rows_ahead(core::mem::size_of::<H>(), NR);
    let mut kk = 0;
    while kk < kv {
        let mut bv = [S::zero(); NR];
        for r in 0..NR {
            bv[r] = H::vload(b.add(r * p.b_s + kk));
            // B rows are short streams (k elements) that the hardware prefetcher barely
            // trains on once several A rows share them (`kfrun bench decode`, Zen 4: two
            // strips ahead into L2 reads W at ~30 GB/s for m = 2..4, one strip into L1 ~20)
            prefetch_l2(b.wrapping_add((ahead + r) * p.b_s + kk));
        }
        for ii in 0..MR {
            let av = S::load(a.add(ii * p.a_s + kk));
            for r in 0..NR {
                acc[ii][r] = S::fma(av, bv[r], acc[ii][r]);
            }
        }
        kk += S::W;
    }
    dot_tile_store::<S, H, MR, NR>(p, b, (i, j), &acc, kv)
}

/// The end of a dot tile at rows [i, i+MR) x columns [j, j+NR): each accumulator summed
/// across its lanes, the columns kv..k past the last full vector added one by one (B read
/// from `b`, already at column j), the sums stored to C (or added to it).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn dot_tile_store<S: Simd, H: BElem<S>, const MR: usize, const NR: usize>(
    p: &Args<S::T>,
    b: *const H,
    (i, j): (usize, usize),
    acc: &[[S::V; NR]; MR],
    kv: usize,
) {
    let (k, a) = (p.k, p.a.add(i * p.a_s));
    let mut sums = [[S::T::GEMM_ZERO; NR]; MR];
    for ii in 0..MR {
        for r in 0..NR {
            sums[ii][r] = S::sum(acc[ii][r]);
        }
    }
    for (ii, row) in sums.iter().enumerate() {
        for (r, &x) in row.iter().enumerate() {
            let mut s = x;
            for t in kv..k {
                s = S::sfma(*a.add(ii * p.a_s + t), (*b.add(r * p.b_s + t)).widen(), s);
            }
            let q = p.c.add((i + ii) * p.c_rs + (j + r) * p.c_cs);
            *q = if p.accumulate { *q + s } else { s };
        }
    }
}

/// Dot kind over rows [i0, i1) x columns [j0, j1). Rows of A are taken in blocks that fit
/// in L2; within a block, each NR-column strip of B (kept in L1) meets every MR-row strip.
#[inline(always)]
unsafe fn dot_region<S: Simd, H: BElem<S>, const MR: usize, const NR: usize>(
    p: &Args<S::T>,
    b: *const H,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) {
    let row_bytes = (p.k * core::mem::size_of::<S::T>()).max(1);
    let mb = ((DOT_A_BLOCK_BYTES / row_bytes) / MR).max(1) * MR;
    let mut ib = i0;
    while ib < i1 {
        let ie = (ib + mb).min(i1);
        let mut j = j0;
        while j < j1 {
            let full = j + NR <= j1;
            let mut i = ib;
            while i < ie {
                macro_rules! go {
                    ($mr:expr) => {{
                        if full {
                            dot_tile::<S, H, $mr, NR>(p, b, i, j)
                        } else {
                            dot_tile::<S, H, $mr, 1>(p, b, i, j)
                        }
                        i += $mr;
                    }};
                }
                let rest = ie - i;
                if rest >= MR {
                    go!(MR)
                } else if rest >= 2 && MR > 2 {
                    go!(2)
                } else {
                    go!(1)
                }
            }
            j += if full { NR } else { 1 };
        }
        ib = ie;
    }
}

/// Dot kind for one row of A (a matrix-vector product): B's columns (a weight's rows) one
/// after another, each with four accumulators over k. The weights are read as one
/// sequential stream (when they are stored back to back), which the hardware prefetcher
/// follows at full bandwidth; several rows at a time, each a short stream, do not.
#[inline(always)]
unsafe fn gemv_region<S: Simd, H: BElem<S>>(
    p: &Args<S::T>,
    b: *const H,
    i: usize,
    j0: usize,
    j1: usize,
) {
    let k = p.k;
    let a = p.a.add(i * p.a_s);
    let (k4, kv) = (k / (4 * S::W) * (4 * S::W), k / S::W * S::W);
    for j in j0..j1 {
        let bj = b.add(j * p.b_s);
        let mut acc = [S::zero(); 4];
        let mut kk = 0;
        while kk < k4 {
            // `GEMV_AHEAD` bytes ahead in the weights' byte stream (into the next rows when
            // they are stored back to back), into L2: the prefetcher alone trails 16-bit rows
            let ahead = (bj.wrapping_add(kk) as *const u8).wrapping_add(GEMV_AHEAD);
            for line in 0..(4 * S::W * core::mem::size_of::<H>()).div_ceil(64) {
                prefetch_l2(ahead.wrapping_add(64 * line));
            }
            for (u, acc) in acc.iter_mut().enumerate() {
                let at = kk + u * S::W;
                *acc = S::fma(S::load(a.add(at)), H::vload(bj.add(at)), *acc);
            }
            kk += 4 * S::W;
        }
        while kk < kv {
            acc[0] = S::fma(S::load(a.add(kk)), H::vload(bj.add(kk)), acc[0]);
            kk += S::W;
        }
        let mut s = S::sum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
        for t in kv..k {
            s = S::sfma(*a.add(t), (*bj.add(t)).widen(), s);
        }
        let q = p.c.add(i * p.c_rs + j * p.c_cs);
        *q = if p.accumulate { *q + s } else { s };
    }
}

/// Bytes ahead of the current weight that `gemv_region` prefetches into L2 (`kfrun bench
/// decode` on Zen 4, m = 1: 8 KB reads bf16 weights at ~28 GB/s, 2 KB into L1 at ~19).
const GEMV_AHEAD: usize = 8192;

/// Bytes of A rows processed against each strip of B (fits L2 next to the B strips).
const DOT_A_BLOCK_BYTES: usize = 256 << 10;

// ---------------------------------------------------------------------------------------
// Per-ISA entry points and per-type dispatch.

/// Dot tiles (MR x NR) per ISA: m == 1 uses 1 x 8 (eight B rows streamed against one A row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn region_avx512<S: Simd>(
    k: Kind,
    p: &Args<S::T>,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) where
    S::T: BElem<S>,
{
    match k {
        Kind::Rows => rows_dispatch!(S, ROWS_AVX512, p, j0, j1),
        Kind::Dot => dot_avx512::<S, S::T>(p, p.b, i0, i1, j0, j1),
    }
}

/// The Dot kind with AVX-512, B read from `b` as `H` (see `dot_tile`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512<S: Simd, H: BElem<S>>(
    p: &Args<S::T>,
    b: *const H,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) {
    if i1 - i0 == 1 {
        gemv_region::<S, H>(p, b, i0, j0, j1)
    } else {
        dot_region::<S, H, 4, 4>(p, b, i0, i1, j0, j1)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn region_avx2<S: Simd>(k: Kind, p: &Args<S::T>, i0: usize, i1: usize, j0: usize, j1: usize)
where
    S::T: BElem<S>,
{
    match k {
        Kind::Rows => rows_dispatch!(S, ROWS_AVX2, p, j0, j1),
        Kind::Dot => dot_avx2::<S, S::T>(p, p.b, i0, i1, j0, j1),
    }
}

/// The Dot kind with AVX2 (and F16C for 16-bit weights), B read from `b` as `H`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<S: Simd, H: BElem<S>>(
    p: &Args<S::T>,
    b: *const H,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) {
    if i1 - i0 == 1 {
        gemv_region::<S, H>(p, b, i0, j0, j1)
    } else {
        dot_region::<S, H, 4, 3>(p, b, i0, i1, j0, j1)
    }
}

unsafe fn region_portable<S: Simd>(
    k: Kind,
    p: &Args<S::T>,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) where
    S::T: BElem<S>,
{
    match k {
        Kind::Rows => rows_dispatch!(S, ROWS_PORTABLE, p, j0, j1),
        Kind::Dot => dot_portable::<S, S::T>(p, p.b, i0, i1, j0, j1),
    }
}

/// The Dot kind without SIMD, B read from `b` as `H`.
unsafe fn dot_portable<S: Simd, H: BElem<S>>(
    p: &Args<S::T>,
    b: *const H,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
) {
    dot_region::<S, H, 2, 2>(p, b, i0, i1, j0, j1)
}

macro_rules! elem_impl {
    ($t:ty, $avx2:ty, $avx512:ty) => {
        impl Elem for $t {
            const GEMM_ZERO: Self = 0.0;
            const GEMM_ONE: Self = 1.0;
            unsafe fn faer_matmul(
                (m, n, k): (usize, usize, usize),
                (a, a_rs, a_cs): (*const Self, usize, usize),
                (b, b_rs, b_cs): (*const Self, usize, usize),
                (c, c_rs, c_cs): (*mut Self, usize, usize),
                accumulate: bool,
                threads: usize,
            ) {
                // SAFETY: forwarded from the caller's contract (valid, in-bounds, non-aliased
                // operands with isize strides), which is what these constructors require.
                let (a, b, c) = unsafe {
                    (
                        faer::MatRef::from_raw_parts(a, m, k, a_rs as isize, a_cs as isize),
                        faer::MatRef::from_raw_parts(b, k, n, b_rs as isize, b_cs as isize),
                        faer::MatMut::from_raw_parts_mut(c, m, n, c_rs as isize, c_cs as isize),
                    )
                };
                let accum = if accumulate {
                    faer::Accum::Add
                } else {
                    faer::Accum::Replace
                };
                let par = if threads > 1 {
                    faer::Par::rayon(threads)
                } else {
                    faer::Par::Seq
                };
                faer::linalg::matmul::matmul(c, accum, a, b, 1.0, par);
            }
            fn lanes(isa: Isa) -> usize {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => <$avx512 as Simd>::W,
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => <$avx2 as Simd>::W,
                    Isa::Portable => <Portable<$t> as Simd>::W,
                }
            }
            unsafe fn region(
                isa: Isa,
                kind: Kind,
                p: &Args<Self>,
                i0: usize,
                i1: usize,
                j0: usize,
                j1: usize,
            ) {
                // SAFETY: forwarded from the caller's contract; the ISA-specific entry points
                // are only reached for an `isa` that `detect_isa` found on this CPU.
                unsafe {
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => region_avx512::<$avx512>(kind, p, i0, i1, j0, j1),
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => region_avx2::<$avx2>(kind, p, i0, i1, j0, j1),
                        Isa::Portable => region_portable::<Portable<$t>>(kind, p, i0, i1, j0, j1),
                    }
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
elem_impl!(f32, x86::Avx2F32, x86::Avx512F32);
#[cfg(target_arch = "x86_64")]
elem_impl!(f64, x86::Avx2F64, x86::Avx512F64);
#[cfg(not(target_arch = "x86_64"))]
elem_impl!(f32, Portable<f32>, Portable<f32>);
#[cfg(not(target_arch = "x86_64"))]
elem_impl!(f64, Portable<f64>, Portable<f64>);

// ---------------------------------------------------------------------------------------
// Drivers.

/// Runs `f` on up to `threads` contiguous shares of [0, len), each a multiple of `align`
/// long (except the last), in parallel on the current rayon pool when there is more than one.
fn split(len: usize, threads: usize, align: usize, f: impl Fn(usize, usize) + Sync) {
    let align = align.max(1);
    let per = len.div_ceil(threads.max(1)).div_ceil(align) * align;
    let shares = len.div_ceil(per.max(1));
    if shares <= 1 {
        f(0, len);
        return;
    }
    use rayon::prelude::*;
    (0..shares)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|s| f(s * per, ((s + 1) * per).min(len)));
}

/// Own kernels: C (m x n, strides c_rs/c_cs) = [C +] A·B. Rows kind: `b_s` is B's row
/// stride, its columns are contiguous, m <= SMALL_M. Dot kind: `b_s` is B's column stride,
/// its rows are contiguous. A is repacked as the kind needs (m*k copies).
///
/// # Safety
/// The operands must have passed `gemm`'s validation: every element reachable from the
/// dimensions and strides is inside its slice and C's positions are pairwise distinct.
#[allow(clippy::too_many_arguments)]
unsafe fn own<T: GemmElem>(
    isa: Isa,
    kind: Kind,
    threads: usize,
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, b_s): (&[T], usize),
    (c, c_rs, c_cs): (&mut [T], usize, usize),
    accumulate: bool,
) {
    let packed: Vec<T>;
    let (a_ptr, a_s) = match kind {
        Kind::Rows => {
            packed = (0..k)
                .flat_map(|kk| (0..m).map(move |i| a[i * a_rs + kk * a_cs]))
                .collect();
            (packed.as_ptr(), m)
        }
        Kind::Dot if a_cs == 1 => (a.as_ptr(), a_rs),
        Kind::Dot => {
            packed = (0..m)
                .flat_map(|i| (0..k).map(move |kk| a[i * a_rs + kk * a_cs]))
                .collect();
            (packed.as_ptr(), k)
        }
    };
    let p = Args {
        m,
        k,
        a: a_ptr,
        a_s,
        b: b.as_ptr(),
        b_s,
        c: c.as_mut_ptr(),
        c_rs,
        c_cs,
        accumulate,
    };
    // Computes rows [i0, i1) x columns [j0, j1) of C.
    let run = |i0: usize, i1: usize, j0: usize, j1: usize| {
        // SAFETY: by this function's contract every index of A, B and C reachable from the
        // m x n x k problem is in bounds (the packed copy of A lives until the end of this
        // function) and C does not overlap itself; the shares handed out by `split` are
        // disjoint, so no two threads write the same element of C; `isa` is supported.
        unsafe { T::region(isa, kind, &p, i0, i1, j0, j1) }
    };
    match kind {
        Kind::Rows if m <= ROWS_KSPLIT_M && rows_kblocks(m, n, k) > 1 => {
            // Few rows: also split k, so each task streams one contiguous block of B rows
            // into its own partial C. The k blocks depend only on the shape (never on the
            // thread count) and are summed in order, so every pool gives the same result.
            use rayon::prelude::*;
            let kb = rows_kblocks(m, n, k);
            let per = k.div_ceil(kb);
            let kb = k.div_ceil(per);
            let mut partials = vec![T::GEMM_ZERO; kb * m * n];
            let blocks: Vec<Args<T>> = (0..kb)
                .map(|t| {
                    let k0 = t * per;
                    Args {
                        k: per.min(k - k0),
                        a: p.a.wrapping_add(k0 * m),
                        b: p.b.wrapping_add(k0 * b_s),
                        c: partials.as_mut_ptr().wrapping_add(t * m * n),
                        c_rs: n,
                        c_cs: 1,
                        accumulate: false,
                        ..p
                    }
                })
                .collect();
            let cols = (threads / kb).max(1);
            let align = rows_align(rows_plan(isa), m, T::lanes(isa));
            let col_per = n.div_ceil(cols).div_ceil(align) * align;
            (0..kb * n.div_ceil(col_per))
                .into_par_iter()
                .with_max_len(1)
                .for_each(|task| {
                    let (t, s) = (task % kb, task / kb);
                    let (j0, j1) = (s * col_per, ((s + 1) * col_per).min(n));
                    // SAFETY: block t covers k rows [t*per, t*per + blocks[t].k) of the
                    // validated B and of the packed A, and its C is block t of `partials`
                    // (m x n, row-major), whose column share [j0, j1) only this task writes.
                    unsafe { T::region(isa, kind, &blocks[t], 0, m, j0, j1) }
                });
            for i in 0..m {
                for j in 0..n {
                    let mut sum = partials[i * n + j];
                    for t in 1..kb {
                        sum = sum + partials[(t * m + i) * n + j];
                    }
                    let at = i * c_rs + j * c_cs;
                    c[at] = if accumulate { c[at] + sum } else { sum };
                }
            }
        }
        Kind::Rows => {
            let align = rows_align(rows_plan(isa), m, T::lanes(isa));
            split(n, threads, align, |j0, j1| run(0, m, j0, j1));
        }
        // 24 is a multiple of every dot tile width (8, 4, 3, 2).
        Kind::Dot if n >= m || m <= SMALL_M => split(n, threads, 24, |j0, j1| run(0, m, j0, j1)),
        Kind::Dot => split(m, threads, 4, |i0, i1| run(i0, i1, 0, n)),
    }
}

fn required_len(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

/// True when no two (row, col) positions of a rows x cols view share an element
/// (sufficient check: the inner stride is >= 1 and the outer one spans a whole inner line).
fn injective(rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 || (rows == 1 && cols == 1) {
        return true;
    }
    let ((n_in, s_in), (n_out, s_out)) = if rows <= 1 {
        ((cols, cs), (rows, rs))
    } else if cols <= 1 || rs <= cs {
        ((rows, rs), (cols, cs))
    } else {
        ((cols, cs), (rows, rs))
    };
    if n_in > 1 && s_in == 0 {
        return false;
    }
    n_out <= 1 || n_in.checked_mul(s_in).is_some_and(|span| s_out >= span)
}

fn check_operand(
    name: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    let need = required_len(rows, cols, rs, cs).ok_or_else(|| {
        anyhow!("gemm: {name} extent overflows usize ({rows}x{cols}, strides {rs},{cs})")
    })?;
    ensure!(
        len >= need,
        "gemm: {name} has {len} elements but {rows}x{cols} with strides ({rs},{cs}) needs {need}"
    );
    Ok(())
}

/// C (m x n) = [C if accumulate] + A (m x k) · B (k x n), every operand given by a slice plus
/// row stride and column stride in elements (so transposes are just swapped strides).
///
/// Errors (and touches nothing) when a slice is too short for its dimensions and strides or
/// when C's strides would make two of its elements the same memory. Degenerate sizes are
/// fine: m = 0 or n = 0 does nothing; k = 0 sets C to zero, or leaves it as is when
/// accumulating. Runs on the current rayon pool (`rayon::current_num_threads()` threads),
/// single-threaded below ~128k multiply-adds. With `accumulate == false` C is only written,
/// so it may hold anything (even NaN) on entry.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_rs: usize,
    a_cs: usize,
    b: &[T],
    b_rs: usize,
    b_cs: usize,
    c: &mut [T],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
) -> Result<()> {
    check_operand("C", c.len(), m, n, c_rs, c_cs)?;
    ensure!(
        injective(m, n, c_rs, c_cs),
        "gemm: C strides ({c_rs},{c_cs}) make elements of the {m}x{n} result overlap"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = T::GEMM_ZERO;
                }
            }
        }
        return Ok(());
    }
    check_operand("A", a.len(), m, k, a_rs, a_cs)?;
    check_operand("B", b.len(), k, n, b_rs, b_cs)?;
    // Strides of length-1 dimensions are never used: clamp them (to the slice length) so
    // that every stride fits in isize for the `gemm` crate.
    let unit = |dim: usize, s: usize, len: usize| if dim == 1 { s.min(len) } else { s };
    let (a_rs, a_cs) = (unit(m, a_rs, a.len()), unit(k, a_cs, a.len()));
    let (b_rs, b_cs) = (unit(k, b_rs, b.len()), unit(n, b_cs, b.len()));
    let (c_rs, c_cs) = (unit(m, c_rs, c.len()), unit(n, c_cs, c.len()));

    let threads = if m.saturating_mul(n).saturating_mul(k) < PAR_MIN_WORK {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    // Backend per shape; the module docs give the measurements behind each rule.
    let mn = m.min(n);
    let own_route = if b_rs == 1 && (mn <= SMALL_M || (mn <= DOT_MAX && k >= DOT_MIN_K)) {
        // Columns of B contiguous (x·Wᵀ with W stored [out, in]): dot-product kernels.
        Some((Kind::Dot, false))
    } else if m <= SMALL_M && b_cs == 1 {
        Some((Kind::Rows, false))
    } else if n <= SMALL_M && (a_cs == 1 || a_rs == 1) {
        // Few columns: Cᵀ = Bᵀ·Aᵀ has few rows, and Aᵀ has contiguous columns (a_cs == 1,
        // Dot) or rows (a_rs == 1, Rows); `own` repacks Bᵀ.
        Some((if a_cs == 1 { Kind::Dot } else { Kind::Rows }, true))
    } else {
        None
    };
    if let Some((kind, swap)) = own_route {
        let isa = detect_isa();
        let dot = kind == Kind::Dot;
        // SAFETY: all operands were validated above; swapping A and B (and C's strides)
        // describes Cᵀ = Bᵀ·Aᵀ over exactly the same elements.
        unsafe {
            if swap {
                let a_s = if dot { a_rs } else { a_cs };
                let (dims, a, b, c) = ((n, m, k), (b, b_cs, b_rs), (a, a_s), (c, c_cs, c_rs));
                own(isa, kind, threads, dims, a, b, c, accumulate)
            } else {
                let b_s = if dot { b_cs } else { b_rs };
                let (dims, a, b, c) = ((m, n, k), (a, a_rs, a_cs), (b, b_s), (c, c_rs, c_cs));
                own(isa, kind, threads, dims, a, b, c, accumulate)
            }
        }
        return Ok(());
    }
    if b_rs == 1 {
        // Large x·Wᵀ: faer's packed kernels beat both our dot kernels and `gemm` here.
        // SAFETY: operands validated above (in bounds, C injective, strides <= slice
        // lengths so they fit in isize); `c` is a unique borrow, so it aliases neither A nor B.
        unsafe {
            T::faer_matmul(
                (m, n, k),
                (a.as_ptr(), a_rs, a_cs),
                (b.as_ptr(), b_rs, b_cs),
                (c.as_mut_ptr(), c_rs, c_cs),
                accumulate,
                threads,
            )
        };
        return Ok(());
    }
    let par = if threads > 1 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: every index of A, B and C reachable from the dimensions and strides was
    // validated above against the slice lengths; all strides fit in isize (each is at most
    // a slice length after clamping); C does not overlap itself and, being a unique borrow,
    // cannot alias A or B. T is f32 or f64, both supported by `gemm`.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::GEMM_ONE,
            T::GEMM_ONE,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    trait TestElem: GemmElem + From<f32> {
        fn f(self) -> f64;
    }
    impl TestElem for f32 {
        fn f(self) -> f64 {
            self as f64
        }
    }
    impl TestElem for f64 {
        fn f(self) -> f64 {
            self
        }
    }

    /// Deterministic values in [-1, 1).
    fn fill<T: TestElem>(len: usize, seed: u64) -> Vec<T> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                T::from(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    /// One product to check: sizes, which operands are stored column-major, extra elements
    /// per line (padding), and whether C is accumulated into.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        tc: bool,
        pad: usize,
        acc: bool,
    }

    /// (row stride, col stride, slice length) of a rows x cols operand.
    fn layout(rows: usize, cols: usize, col_major: bool, pad: usize) -> (usize, usize, usize) {
        let (ld, lines) = if col_major {
            (rows + pad, cols)
        } else {
            (cols + pad, rows)
        };
        let (rs, cs) = if col_major { (1, ld) } else { (ld, 1) };
        (
            rs,
            cs,
            if rows == 0 || cols == 0 {
                0
            } else {
                ld * lines
            },
        )
    }

    type Op<'a, T> = (&'a [T], usize, usize);
    type OpMut<'a, T> = (&'a mut [T], usize, usize);
    type Runner<'r, T> = &'r dyn Fn(Op<T>, Op<T>, OpMut<T>);

    /// Runs `run` on random operands laid out per `t` and compares every element of C with
    /// an f64 triple loop; with `acc == false`, C starts as NaN and its padding must stay NaN.
    fn check<T: TestElem>(t: Case, tol: f64, run: Runner<T>) {
        let (a_rs, a_cs, a_len) = layout(t.m, t.k, t.ta, t.pad);
        let (b_rs, b_cs, b_len) = layout(t.k, t.n, t.tb, t.pad);
        let (c_rs, c_cs, c_len) = layout(t.m, t.n, t.tc, t.pad);
        let a: Vec<T> = fill(a_len, (t.m * 31 + t.k) as u64);
        let b: Vec<T> = fill(b_len, (t.k * 17 + t.n) as u64 + 7);
        let c0: Vec<T> = fill(c_len, 3);
        let mut c = if t.acc {
            c0.clone()
        } else {
            vec![T::from(f32::NAN); c_len]
        };
        run((&a, a_rs, a_cs), (&b, b_rs, b_cs), (&mut c, c_rs, c_cs));
        let mut inside = vec![false; c_len];
        for i in 0..t.m {
            for j in 0..t.n {
                let at = i * c_rs + j * c_cs;
                inside[at] = true;
                let mut want = if t.acc { c0[at].f() } else { 0.0 };
                let mut mag = want.abs();
                for p in 0..t.k {
                    let x = a[i * a_rs + p * a_cs].f() * b[p * b_rs + j * b_cs].f();
                    want += x;
                    mag += x.abs();
                }
                let got = c[at].f();
                assert!(
                    (got - want).abs() <= tol * (mag + 1.0),
                    "{t:?}: C[{i},{j}] = {got}, want {want}"
                );
            }
        }
        for (at, x) in c.iter().enumerate() {
            if !inside[at] {
                assert!(
                    x.f() == c0[at].f() || (!t.acc && x.f().is_nan()),
                    "{t:?}: padding {at} written"
                );
            }
        }
    }

    fn via_gemm<T: TestElem>(t: Case) -> impl Fn(Op<T>, Op<T>, OpMut<T>) {
        move |(a, a_rs, a_cs), (b, b_rs, b_cs), (c, c_rs, c_cs)| {
            gemm(
                t.m, t.n, t.k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, t.acc,
            )
            .unwrap()
        }
    }

    /// Every size combination of 1, 3, 17, 65, 129 with all four A/B transpose
    /// combinations, accumulate on and off, C row- or column-major and padded lines: this
    /// reaches the own Rows and Dot kernels, the `gemm` crate and faer.
    fn sweep<T: TestElem>(tol: f64) {
        const SIZES: [usize; 5] = [1, 3, 17, 65, 129];
        for m in SIZES {
            for n in SIZES {
                for k in SIZES {
                    for combo in 0..8usize {
                        let (ta, tb, acc) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
                        let tc = (m + n + k + combo) % 3 == 1;
                        let t = Case {
                            m,
                            n,
                            k,
                            ta,
                            tb,
                            tc,
                            pad: (m + k) % 3,
                            acc,
                        };
                        check::<T>(t, tol, &via_gemm(t));
                    }
                }
            }
        }
    }

    #[test]
    fn f32_matches_reference() {
        sweep::<f32>(1e-5);
    }

    #[test]
    fn f64_matches_reference() {
        sweep::<f64>(1e-12);
    }

    /// Benchmark-like shapes inside a 3-thread pool (uneven thread shares).
    #[test]
    fn multithreaded_pool() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for (m, n, k) in [
                (1, 768, 768),
                (8, 1000, 300),
                (64, 300, 200),
                (300, 5, 200),
                (100, 130, 70),
            ] {
                for combo in 0..8usize {
                    let (ta, tb, acc) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
                    let t = Case {
                        m,
                        n,
                        k,
                        ta,
                        tb,
                        tc: combo % 3 == 1,
                        pad: 1,
                        acc,
                    };
                    check::<f32>(t, 1e-5, &via_gemm(t));
                }
            }
        });
    }

    /// The own kernels on every instruction set this CPU has (the portable one included):
    /// Rows kind for 1..=8 rows, Dot kind for small and larger m, tails of every length,
    /// 1 and 2 threads, f32 and f64.
    #[test]
    fn own_kernels_every_isa() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            for isa in isas {
                for m in (1..=SMALL_M).chain([9, 13, 30]) {
                    for n in [1, 7, 16, 33, 100, 129] {
                        for k in [1, 5, 16, 37, 64] {
                            for combo in 0..8usize {
                                let (ta, tb, acc) =
                                    (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
                                // Rows needs B rows contiguous (and m <= 8), Dot B columns.
                                let kind = if tb { Kind::Dot } else { Kind::Rows };
                                if kind == Kind::Rows && m > SMALL_M {
                                    continue;
                                }
                                let t = Case {
                                    m,
                                    n,
                                    k,
                                    ta,
                                    tb,
                                    tc: combo == 3,
                                    pad: 2,
                                    acc,
                                };
                                for threads in [1, 2] {
                                    macro_rules! run_own {
                                        () => {
                                            &|(a, a_rs, a_cs), (b, b_rs, b_cs), c| {
                                                let b_s = if tb { b_cs } else { b_rs };
                                                // SAFETY: `check` lays the operands out validly.
                                                unsafe {
                                                    own(
                                                        isa,
                                                        kind,
                                                        threads,
                                                        (m, n, k),
                                                        (a, a_rs, a_cs),
                                                        (b, b_s),
                                                        c,
                                                        acc,
                                                    )
                                                }
                                            }
                                        };
                                    }
                                    check::<f32>(t, 1e-5, run_own!());
                                    check::<f64>(t, 1e-12, run_own!());
                                }
                            }
                        }
                    }
                }
            }
        });
    }

    /// Results are bitwise the same on pools of 1, 2 and 3 threads, on every route (own
    /// Rows with and without k blocks, own Dot split by columns or rows, `gemm`, faer).
    #[test]
    fn independent_of_thread_count() {
        let shapes = [
            (1, 768, 768),
            (2, 1000, 500),
            (8, 700, 768),
            (64, 300, 256),
            (300, 64, 256),
            (100, 150, 200),
        ];
        for (m, n, k) in shapes {
            for tb in [false, true] {
                let a: Vec<f32> = fill(m * k, 5);
                let b: Vec<f32> = fill(k * n, 6);
                let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut c = vec![0.0f32; m * n];
                    pool.install(|| gemm(m, n, k, &a, k, 1, &b, b_rs, b_cs, &mut c, n, 1, false))
                        .unwrap();
                    c
                };
                let one = run(1);
                assert!(
                    one == run(2) && one == run(3),
                    "({m},{n},{k}) tb={tb} differs across pools"
                );
            }
        }
    }

    /// Zero strides (a broadcast row of A) and B with no unit stride, on each backend.
    #[test]
    fn unusual_strides() {
        for (m, n, k, b_rowmajor) in [
            (5, 40, 33, true),
            (5, 40, 33, false),
            (70, 80, 150, true),
            (70, 80, 150, false),
        ] {
            let a: Vec<f64> = fill(k, 1);
            let b: Vec<f64> = fill(2 * k * n, 2);
            // B element (p, j) at 2*(p*n + j) or 2*(j*k + p): both strides >= 2.
            let (b_rs, b_cs) = if b_rowmajor { (2 * n, 2) } else { (2, 2 * k) };
            let mut c = vec![0.0f64; m * n];
            gemm(m, n, k, &a, 0, 1, &b, b_rs, b_cs, &mut c, n, 1, false).unwrap();
            // Same with B made contiguous (exercises the own/faer paths) and A broadcast.
            let bc: Vec<f64> = (0..k * n).map(|x| b[2 * x]).collect();
            let (bc_rs, bc_cs) = if b_rowmajor { (n, 1) } else { (1, k) };
            let mut c2 = vec![0.0f64; m * n];
            gemm(m, n, k, &a, 0, 1, &bc, bc_rs, bc_cs, &mut c2, n, 1, false).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| a[p] * b[p * b_rs + j * b_cs]).sum();
                    assert!(
                        (c[i * n + j] - want).abs() < 1e-12 * k as f64,
                        "strided B ({m},{n},{k})"
                    );
                    assert!(
                        (c2[i * n + j] - want).abs() < 1e-12 * k as f64,
                        "broadcast A ({m},{n},{k})"
                    );
                }
            }
        }
    }

    #[test]
    fn degenerate_sizes() {
        // k = 0: C = 0, or unchanged when accumulating.
        let mut c = vec![5.0f32; 6];
        gemm::<f32>(2, 3, 0, &[], 0, 0, &[], 0, 0, &mut c, 3, 1, true).unwrap();
        assert_eq!(c, vec![5.0; 6]);
        gemm::<f32>(2, 3, 0, &[], 0, 0, &[], 0, 0, &mut c, 3, 1, false).unwrap();
        assert_eq!(c, vec![0.0; 6]);
        // m = 0 or n = 0: nothing happens, empty slices are accepted.
        gemm::<f64>(0, 3, 4, &[], 4, 1, &[1.0; 12], 3, 1, &mut [], 3, 1, false).unwrap();
        gemm::<f64>(3, 0, 4, &[1.0; 12], 4, 1, &[], 0, 1, &mut [], 0, 1, false).unwrap();
        // 1x1x1 with huge (unused) strides.
        let mut c = [0.0f32];
        let big = usize::MAX;
        gemm(
            1,
            1,
            1,
            &[2.0f32],
            big,
            big,
            &[3.0],
            big,
            big,
            &mut c,
            big,
            big,
            false,
        )
        .unwrap();
        assert_eq!(c[0], 6.0);
    }

    #[test]
    fn rejects_bad_operands() {
        let a = vec![1.0f32; 12];
        let b = vec![1.0f32; 12];
        let mut c = vec![0.0f32; 9];
        // A too short for 3x4 with row stride 5; B too short; C too short.
        assert!(gemm(3, 3, 4, &a, 5, 1, &b, 3, 1, &mut c, 3, 1, false).is_err());
        assert!(gemm(3, 3, 4, &a, 4, 1, &b[..11], 3, 1, &mut c, 3, 1, false).is_err());
        assert!(gemm(3, 3, 4, &a, 4, 1, &b, 3, 1, &mut c[..8], 3, 1, false).is_err());
        // C overlapping itself: row stride 0, or rows interleaved with columns.
        assert!(gemm(3, 3, 4, &a, 4, 1, &b, 3, 1, &mut c, 0, 1, false).is_err());
        assert!(gemm(3, 3, 4, &a, 4, 1, &b, 3, 1, &mut c, 2, 1, false).is_err());
        // Strides whose extent overflows usize.
        assert!(gemm(3, 3, 4, &a, usize::MAX, 1, &b, 3, 1, &mut c, 3, 1, false).is_err());
        assert_eq!(c, vec![0.0; 9], "a rejected call must not write C");
        gemm(3, 3, 4, &a, 4, 1, &b, 3, 1, &mut c, 3, 1, false).unwrap();
        assert_eq!(c, vec![4.0; 9]);
    }
}
