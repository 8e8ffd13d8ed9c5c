//! `C [m, N] = [C +] x [m, K] · Wᵀ` with W stored [N, K] row-major (a Linear layer's weight)
//! in f32, f16 or bf16: the product every decode step runs, m = 1..512 rows of activations
//! against weights that come from DRAM once per step.
//!
//! Two kernels, both reading W's rows in place (no per-step repacking of weights; a half
//! weight is widened block by block into a small per-thread f32 buffer that stays in cache):
//! - `xt` (m >= `XT_MIN_M`, AVX2 / AVX-512): x is transposed once per call into a k-major
//!   panel (m·K copies, small next to m·N·K multiply-adds) and each register tile holds
//!   MV vectors of rows x NW weight rows: per k, MV loads of xᵀ, NW broadcasts of W, MV·NW
//!   FMAs, no horizontal sums. W is split into blocks of `NB` rows x `KC` columns, each
//!   read from memory once and applied to all m rows while it is in L1/L2; the threads
//!   split N.
//! - `strip` (2 <= m < `XT_MIN_M`, AVX2 / AVX-512): W taken a strip of NR rows at a time,
//!   read from memory once (prefetched two strips ahead into L2) and met by every row of x
//!   in MR x NR register tiles of the parent module's dot kernel (no transposes).
//! - `dot` (one row, or no SIMD): the dot-product kernels of the parent module (m = 1: one
//!   sequential stream of W, prefetched 8 KB ahead into L2).

use super::quant::{xwt_q, QFormat};
#[cfg(target_arch = "x86_64")]
use super::{dot_avx2, dot_avx512, dot_tile, dot_tile_store, prefetch_rows_ahead, x86, Stored};
use super::{dot_portable, split, Args, BElem, Elem, HalfSimd, Isa, Portable, Simd, PAR_MIN_WORK};
use anyhow::{ensure, Result};
use half::{bf16, f16};

/// Weight rows as they are stored.
///
/// Dense rows (`F32`, `F16`, `BF16`): `w_rs` is the row stride in elements.
/// Quantized rows (`Q8_0`, `Q4_0`, `Q4_1`, ggml block formats, module `quant`): the slice
/// holds the raw blocks (32 weights each, along K); `w_rs` is still counted in elements and
/// must be a multiple of 32, so row `j` starts at block `j * w_rs / 32` (`w_rs = k`: rows
/// back to back, as in a GGUF tensor). K must be a multiple of 32.
#[derive(Clone, Copy)]
pub enum WRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q8_0(&'a [u8]),
    Q4_0(&'a [u8]),
    Q4_1(&'a [u8]),
}

/// Dense weight rows: what the kernels of this file read.
#[derive(Clone, Copy)]
enum Dense<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Dense<'_> {
    fn elem_bytes(&self) -> usize {
        match self {
            Dense::F32(_) => 4,
            _ => 2,
        }
    }
    /// A hint to bring element `at` into cache; nothing past the end.
    #[inline(always)]
    fn prefetch(&self, at: usize) {
        if at < self.len() {
            let p = match self {
                Dense::F32(w) => w[at..].as_ptr() as *const u8,
                Dense::F16(w) => w[at..].as_ptr() as *const u8,
                Dense::BF16(w) => w[at..].as_ptr() as *const u8,
            };
            super::prefetch(p);
        }
    }
    fn len(&self) -> usize {
        match self {
            Dense::F32(w) => w.len(),
            Dense::F16(w) => w.len(),
            Dense::BF16(w) => w.len(),
        }
    }
}

/// Rows from which the `xt` kernel beats the strip kernel (`kfrun bench decode`, Zen 4:
/// m = 12 strip 80-130 GFLOP/s vs xt 50-90; m = 16 about even).
const XT_MIN_M: usize = 16;
/// Columns of x's rows per block of the strip kernel for long rows (a multiple of 16).
const STRIP_KC: usize = 512;
/// Floats of padding after each row of a packed x block of the strip kernel (one cache
/// line: consecutive rows then start in different L1 sets).
const PACK_PAD: usize = 16;
/// Weight rows per block: a multiple of every tile's NW (6, 8, 12).
const NB: usize = 24;
/// Bytes of the xᵀ block (KC x m) kept in L2 while a weight block meets it.
const XT_BLOCK_BYTES: usize = 512 << 10;

/// `C = [C +] x · Wᵀ`: x is m x k (row stride `x_rs`, unit column stride), W is n x k
/// (row stride `w_rs`), C is m x n (row stride `c_rs`). Validated; on the current rayon pool.
/// Quantized W (`WRows::Q8_0` / `Q4_0` / `Q4_1`) goes to the integer kernels of module
/// `quant` (x rounded to 8-bit blocks of 32 first; K and `w_rs` multiples of 32).
#[allow(clippy::too_many_arguments)]
pub fn xwt(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    x_rs: usize,
    w: WRows<'_>,
    w_rs: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) -> Result<()> {
    let w = match w {
        WRows::F32(v) => Dense::F32(v),
        WRows::F16(v) => Dense::F16(v),
        WRows::BF16(v) => Dense::BF16(v),
        WRows::Q8_0(b) => {
            return xwt_q(
                QFormat::Q8_0,
                (m, n, k),
                (x, x_rs),
                (b, w_rs),
                (c, c_rs),
                accumulate,
            )
        }
        WRows::Q4_0(b) => {
            return xwt_q(
                QFormat::Q4_0,
                (m, n, k),
                (x, x_rs),
                (b, w_rs),
                (c, c_rs),
                accumulate,
            )
        }
        WRows::Q4_1(b) => {
            return xwt_q(
                QFormat::Q4_1,
                (m, n, k),
                (x, x_rs),
                (b, w_rs),
                (c, c_rs),
                accumulate,
            )
        }
    };
    let fits = |len: usize, rows: usize, rs: usize, cols: usize| {
        rows == 0
            || cols == 0
            || ((rows - 1).checked_mul(rs))
                .and_then(|v| v.checked_add(cols))
                .is_some_and(|e| e <= len)
    };
    ensure!(
        (m <= 1 || x_rs >= k) && fits(x.len(), m, x_rs, k),
        "x·Wᵀ: x ({} elements, row stride {x_rs}) does not hold {m} x {k}",
        x.len()
    );
    ensure!(
        (n <= 1 || w_rs >= k) && fits(w.len(), n, w_rs, k),
        "x·Wᵀ: W ({} elements, row stride {w_rs}) does not hold {n} x {k}",
        w.len()
    );
    ensure!(
        (m <= 1 || c_rs >= n) && fits(c.len(), m, c_rs, n),
        "x·Wᵀ: C ({} elements, row stride {c_rs}) does not hold {m} x {n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(c_rs.max(n))
                .take(m)
                .for_each(|r| r[..n].fill(0.0));
        }
        return Ok(());
    }
    let isa = super::detect_isa();
    let threads = if m.saturating_mul(n).saturating_mul(k) < PAR_MIN_WORK {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    let xt_isa = match isa {
        Isa::Portable => None,
        _ if m >= XT_MIN_M => Some(isa),
        _ => None,
    };
    if let Some(xt_isa) = xt_isa {
        let (mnk, cc) = ((m, n, k), (c, c_rs));
        // SAFETY: validated above: x holds m rows of k, W n rows of k, C m rows of n at
        // their strides; `c` is a unique borrow, so it aliases neither x nor W; AVX2 (and
        // F16C) come with every CPU `detect_isa` finds AVX-512 on.
        unsafe { xt_path(xt_isa, threads, mnk, (x, x_rs), (w, w_rs), cc, accumulate) };
        return Ok(());
    }
    // Few rows (or no SIMD): the dot kernels (one row: the gemv stream; 2..15 rows: W in
    // strips, each read once and met by every row), W read in its own dtype (16-bit weights
    // widened in registers, so every dtype sums in one order), the threads splitting N.
    let cp = SyncPtr(c.as_mut_ptr());
    split(n, threads, NB, |j0, j1| {
        let p = Args {
            m,
            k,
            a: x.as_ptr(),
            a_s: x_rs,
            b: core::ptr::null(), // B is passed typed below
            b_s: w_rs,
            c: cp.get(),
            c_rs,
            c_cs: 1,
            accumulate,
        };
        // SAFETY: validated above: x holds m rows of k at stride x_rs, W n rows of k at
        // stride w_rs, C m rows of n; this share alone writes C columns [j0, j1); the
        // entry point matches the ISA detected on this CPU.
        unsafe {
            match w {
                Dense::F32(w) => dot_share(isa, &p, w.as_ptr(), j0, j1),
                Dense::F16(w) => dot_share(isa, &p, w.as_ptr(), j0, j1),
                Dense::BF16(w) => dot_share(isa, &p, w.as_ptr(), j0, j1),
            }
        }
    });
    Ok(())
}

/// The dot kernels of `isa` over rows [0, p.m) x columns [j0, j1), B read from `b` as `H`.
///
/// # Safety
/// As the parent's `region` for `p` with B at `b`; `isa` is this CPU's.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_share<H>(isa: Isa, p: &Args<f32>, b: *const H, j0: usize, j1: usize)
where
    H: BElem<x86::Avx512F32> + BElem<x86::Avx2F32> + BElem<Portable<f32>>,
{
    if p.m > 1 && isa != Isa::Portable {
        // x's rows in blocks of STRIP_KC columns when all of k would not stay in L1 next to
        // the strip: every strip re-reads x, and from L2 the 8 x 2 tile loses a third of its
        // rate (`kfrun bench decode`, mlp down K = 3072, m = 8, Zen 4). A block after the
        // first adds its sums to C's, so the blocks fix one order of sums for every dtype.
        let kc = if p.k > 2 * STRIP_KC { STRIP_KC } else { p.k };
        // A block is copied to rows PACK_PAD floats longer than itself: x's own rows are
        // often a multiple of 4 KB apart (K = 3072 f32), which puts every row's block in
        // the same L1 sets, where 8 rows and the W strip evict each other (mlp down, m = 8:
        // W hot 110 GFLOP/s vs 205 for K = 768). Copies only; the sums are unchanged.
        let mut packed = (kc < p.k).then(|| Scratch::take(&XT, p.m * (kc + PACK_PAD)));
        let mut k0 = 0;
        while k0 < p.k {
            let kb = kc.min(p.k - k0);
            let (a, a_s) = match packed.as_mut() {
                Some(buf) => {
                    let s = kc + PACK_PAD;
                    for r in 0..p.m {
                        // SAFETY: row r's columns [k0, k0 + kb) lie inside x (this
                        // function's contract: x holds p.m rows of p.k at stride p.a_s).
                        let src = core::slice::from_raw_parts(p.a.add(r * p.a_s + k0), kb);
                        buf[r * s..r * s + kb].copy_from_slice(src);
                    }
                    (buf.as_ptr(), s)
                }
                None => (p.a.add(k0), p.a_s),
            };
            let pk = Args {
                k: kb,
                a,
                a_s,
                accumulate: p.accumulate || k0 > 0,
                ..*p
            };
            match isa {
                Isa::Avx512 => strip_avx512::<H>(&pk, b.add(k0), j0, j1),
                _ => strip_avx2::<H>(&pk, b.add(k0), j0, j1),
            }
            k0 += kc;
        }
        return;
    }
    match isa {
        Isa::Avx512 => dot_avx512::<x86::Avx512F32, H>(p, b, 0, p.m, j0, j1),
        Isa::Avx2 => dot_avx2::<x86::Avx2F32, H>(p, b, 0, p.m, j0, j1),
        Isa::Portable => dot_portable::<Portable<f32>, H>(p, b, 0, p.m, j0, j1),
    }
}

/// The dot kernels without SIMD over rows [0, p.m) x columns [j0, j1).
///
/// # Safety
/// As the parent's `region` for `p` with B at `b`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_share<H: BElem<Portable<f32>>>(
    _: Isa,
    p: &Args<f32>,
    b: *const H,
    j0: usize,
    j1: usize,
) {
    dot_portable::<Portable<f32>, H>(p, b, 0, p.m, j0, j1)
}

/// W rows [j0, j1) taken NR at a time (a strip, read from memory once and kept in L1 while
/// it meets every row of x), the m rows of x in register tiles of MR, 6, 4, 2, 1 rows, each
/// tile a call of `$tile` (not inlined: in one large function LLVM spilled an accumulator
/// of the 8 x 2 tile to the stack, a store-to-load round trip per step that halved its
/// rate). Each output's sum runs in the dot kernels' order whatever the tile, so every
/// dtype of W and every m gives the bits of `dot_tile`.
macro_rules! strip_region {
    ($tile:ident, $H:ty, $MR:expr, $NR:expr, $p:expr, $b:expr, $j0:expr, $j1:expr) => {{
        let (p, b, j1) = ($p, $b, $j1);
        let mut j = $j0;
        while j < j1 {
            let full = j + $NR <= j1;
            let mut i = 0;
            while i < p.m {
                macro_rules! go {
                    ($mr:expr) => {{
                        if full {
                            $tile::<$H, $mr, $NR>(p, b, i, j)
                        } else {
                            $tile::<$H, $mr, 1>(p, b, i, j)
                        }
                        i += $mr;
                    }};
                }
                let rest = p.m - i;
                if rest >= $MR {
                    go!($MR)
                } else if rest >= 6 && $MR > 6 {
                    go!(6)
                } else if rest >= 4 && $MR > 4 {
                    go!(4)
                } else if rest >= 2 {
                    go!(2)
                } else {
                    go!(1)
                }
            }
            j += if full { $NR } else { 1 };
        }
    }};
}

/// The strip kernel with AVX-512: tiles of 8 rows x 2 weight rows (16 accumulators;
/// measured against 8 x 3, 6 x 4 and 4 x 4 with `kfrun bench decode`, Zen 4: 8 x 2 was
/// fastest).
///
/// # Safety
/// As `dot_share`; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn strip_avx512<H: BElem<x86::Avx512F32>>(p: &Args<f32>, b: *const H, j0: usize, j1: usize) {
    strip_region!(tile_avx512, H, 8, 2, p, b, j0, j1)
}

/// One AVX-512 register tile of the strip kernel.
///
/// # Safety
/// As `dot_tile`; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline(never)]
unsafe fn tile_avx512<H: BElem<x86::Avx512F32>, const MR: usize, const NR: usize>(
    p: &Args<f32>,
    b: *const H,
    i: usize,
    j: usize,
) {
    if MR == 8 && NR == 2 {
        tile_8x2_avx512(p, b, i, j)
    } else {
        dot_tile::<x86::Avx512F32, H, MR, NR>(p, b, i, j)
    }
}

/// `dot_tile` for 8 rows x 2 weight rows with AVX-512, its loop in assembly: written in
/// Rust (generic or with the 16 accumulators named one by one) LLVM kept one accumulator on
/// the stack and rotated others through register copies every step, and bf16 W ran at
/// 55 GFLOP/s with W in cache (`kfrun bench decode`, m = 8, Zen 4). The same FMAs in the
/// same order as `dot_tile` (x * w + acc, one rounding), so the same bits.
///
/// # Safety
/// As `dot_tile`; the CPU has AVX-512F (its `vcvtph2ps` widens f16 W).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_8x2_avx512<H: BElem<x86::Avx512F32>>(
    p: &Args<f32>,
    b: *const H,
    i: usize,
    j: usize,
) {
    use core::arch::x86_64::*;
    let (k, a_s, b_s) = (p.k, p.a_s, p.b_s);
    let a = p.a.add(i * a_s);
    let b0 = b.add(j * b_s);
    let kv = k / 16 * 16;
    let z = _mm512_setzero_ps();
    let mut c = [z; 16];
    if kv > 0 {
        let eb = core::mem::size_of::<H>();
        // as far ahead as `dot_tile`, in bytes
        let pf = prefetch_rows_ahead(eb, 2) * b_s * eb;
        let (s, s3) = (a_s * 4, a_s * 12);
        let (mut a0, mut a4) = (a, a.add(4 * a_s));
        let (mut w0, mut w1) = (b0 as *const u8, b0.add(b_s) as *const u8);
        let mut n = kv / 16;
        let [mut c0, mut c1, mut c2, mut c3, mut c4, mut c5, mut c6, mut c7, mut c8, mut c9, mut c10, mut c11, mut c12, mut c13, mut c14, mut c15] =
            c;
        macro_rules! run {
            ($load0:literal, $load1:literal, $step:literal) => {
                // SAFETY: n >= 1 steps of 16 columns, each reading 16 W elements from the
                // two strip rows and 16 floats from each of the 8 x rows, all inside the
                // operands (`dot_tile`'s contract); prefetches never fault.
                core::arch::asm!(
                    "2:",
                    $load0,
                    $load1,
                    "prefetcht1 [{w0} + {pf}]",
                    "prefetcht1 [{w1} + {pf}]",
                    "vmovups zmm18, [{a0}]",
                    "vfmadd231ps zmm0, zmm18, zmm16",
                    "vfmadd231ps zmm1, zmm18, zmm17",
                    "vmovups zmm18, [{a0} + {s}]",
                    "vfmadd231ps zmm2, zmm18, zmm16",
                    "vfmadd231ps zmm3, zmm18, zmm17",
                    "vmovups zmm18, [{a0} + {s}*2]",
                    "vfmadd231ps zmm4, zmm18, zmm16",
                    "vfmadd231ps zmm5, zmm18, zmm17",
                    "vmovups zmm18, [{a0} + {s3}]",
                    "vfmadd231ps zmm6, zmm18, zmm16",
                    "vfmadd231ps zmm7, zmm18, zmm17",
                    "vmovups zmm18, [{a4}]",
                    "vfmadd231ps zmm8, zmm18, zmm16",
                    "vfmadd231ps zmm9, zmm18, zmm17",
                    "vmovups zmm18, [{a4} + {s}]",
                    "vfmadd231ps zmm10, zmm18, zmm16",
                    "vfmadd231ps zmm11, zmm18, zmm17",
                    "vmovups zmm18, [{a4} + {s}*2]",
                    "vfmadd231ps zmm12, zmm18, zmm16",
                    "vfmadd231ps zmm13, zmm18, zmm17",
                    "vmovups zmm18, [{a4} + {s3}]",
                    "vfmadd231ps zmm14, zmm18, zmm16",
                    "vfmadd231ps zmm15, zmm18, zmm17",
                    "add {a0}, 64",
                    "add {a4}, 64",
                    concat!("add {w0}, ", $step),
                    concat!("add {w1}, ", $step),
                    "dec {n}",
                    "jnz 2b",
                    a0 = inout(reg) a0,
                    a4 = inout(reg) a4,
                    w0 = inout(reg) w0,
                    w1 = inout(reg) w1,
                    n = inout(reg) n,
                    s = in(reg) s,
                    s3 = in(reg) s3,
                    pf = in(reg) pf,
                    inout("zmm0") c0,
                    inout("zmm1") c1,
                    inout("zmm2") c2,
                    inout("zmm3") c3,
                    inout("zmm4") c4,
                    inout("zmm5") c5,
                    inout("zmm6") c6,
                    inout("zmm7") c7,
                    inout("zmm8") c8,
                    inout("zmm9") c9,
                    inout("zmm10") c10,
                    inout("zmm11") c11,
                    inout("zmm12") c12,
                    inout("zmm13") c13,
                    inout("zmm14") c14,
                    inout("zmm15") c15,
                    out("zmm16") _,
                    out("zmm17") _,
                    out("zmm18") _,
                    options(nostack, readonly),
                )
            };
        }
        match H::STORED {
            Stored::Native => run!("vmovups zmm16, [{w0}]", "vmovups zmm17, [{w1}]", 64),
            Stored::F16 => run!(
                "vcvtph2ps zmm16, ymmword ptr [{w0}]",
                "vcvtph2ps zmm17, ymmword ptr [{w1}]",
                32
            ),
            Stored::Bf16 => run!(
                "vpmovzxwd zmm16, ymmword ptr [{w0}]\n vpslld zmm16, zmm16, 16",
                "vpmovzxwd zmm17, ymmword ptr [{w1}]\n vpslld zmm17, zmm17, 16",
                32
            ),
        }
        let _ = (a0, a4, w0, w1, n);
        c = [
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,
        ];
    }
    let acc = [
        [c[0], c[1]],
        [c[2], c[3]],
        [c[4], c[5]],
        [c[6], c[7]],
        [c[8], c[9]],
        [c[10], c[11]],
        [c[12], c[13]],
        [c[14], c[15]],
    ];
    dot_tile_store::<x86::Avx512F32, H, 8, 2>(p, b0, (i, j), &acc, kv)
}

/// The strip kernel with AVX2: tiles of 4 x 2 (16 registers in all).
///
/// # Safety
/// As `dot_share`; the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn strip_avx2<H: BElem<x86::Avx2F32>>(p: &Args<f32>, b: *const H, j0: usize, j1: usize) {
    strip_region!(tile_avx2, H, 4, 2, p, b, j0, j1)
}

/// One AVX2 register tile of the strip kernel.
///
/// # Safety
/// As `dot_tile`; the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn tile_avx2<H: BElem<x86::Avx2F32>, const MR: usize, const NR: usize>(
    p: &Args<f32>,
    b: *const H,
    i: usize,
    j: usize,
) {
    dot_tile::<x86::Avx2F32, H, MR, NR>(p, b, i, j)
}

thread_local! {
    /// Per-thread buffers reused across calls (a decode step makes dozens of these products:
    /// fresh zeroed allocations cost page faults and memsets): xᵀ panels, Cᵀ blocks, widened
    /// weight blocks.
    static XT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static CT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of at least `len` floats (contents unspecified) taken from a thread's slot and
/// put back when dropped; a fresh one when the slot is empty (a nested call on this thread).
struct Scratch {
    v: Vec<f32>,
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
}

impl Scratch {
    fn take(
        slot: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
        len: usize,
    ) -> Scratch {
        let mut v = slot.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if v.len() < len {
            v.resize(len, 0.0);
        }
        Scratch { v, slot }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.v
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        // keep the larger of the two (a nested call's buffer may be smaller)
        let _ = self.slot.try_with(|s| {
            let mut s = s.borrow_mut();
            if v.len() > s.len() {
                *s = v;
            }
        });
    }
}

/// C's base pointer, shared by the workers of one call (each writes its own columns).
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: the workers of one call write disjoint column ranges of C through it.
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Widens W rows [r0, r0 + rows) x columns [k0, k0 + cols) into `out` (row stride `cols`),
/// a vector at a time with `S`'s loads (16-bit values widened in registers).
///
/// # Safety
/// The block must lie inside `w` (rows of stride `w_rs`), `out` must hold rows x cols, and
/// the CPU must support `S`'s ISA.
#[inline(always)]
unsafe fn widen<S: HalfSimd>(
    w: Dense<'_>,
    (r0, rows): (usize, usize),
    (k0, cols): (usize, usize),
    w_rs: usize,
    out: &mut [f32],
) {
    #[inline(always)]
    unsafe fn rows_of<S: HalfSimd, H: BElem<S>>(
        src: *const H,
        w_rs: usize,
        rows: usize,
        cols: usize,
        out: *mut f32,
    ) {
        let cv = cols / S::W * S::W;
        for r in 0..rows {
            let (s, d) = (src.add(r * w_rs), out.add(r * cols));
            let mut kk = 0;
            while kk < cv {
                S::store(d.add(kk), H::vload(s.add(kk)));
                kk += S::W;
            }
            for t in cv..cols {
                *d.add(t) = (*s.add(t)).widen();
            }
        }
    }
    // The next block's rows (NB rows on), a block ahead: each block starts NB new streams
    // the hardware prefetcher has not seen.
    let line = 64 / w.elem_bytes();
    for r in 0..rows {
        let next = (r0 + r + NB) * w_rs + k0;
        for off in (0..cols).step_by(line) {
            w.prefetch(next + off);
        }
    }
    let at = r0 * w_rs + k0;
    let o = out.as_mut_ptr();
    match w {
        Dense::F32(w) => rows_of::<S, f32>(w[at..].as_ptr(), w_rs, rows, cols, o),
        Dense::F16(w) => rows_of::<S, f16>(w[at..].as_ptr(), w_rs, rows, cols, o),
        Dense::BF16(w) => rows_of::<S, bf16>(w[at..].as_ptr(), w_rs, rows, cols, o),
    }
}

/// One register tile of the `xt` kernel: MV vectors of rows (`xt`: the tile's k-major panel
/// of xᵀ, row stride `xs`) x NW weight rows (`w`, row stride `ws`), over `kc` columns, into
/// `ct` (NW rows of stride `cs`, at the tile's rows), added to it when `add`.
///
/// # Safety
/// `xt` must hold kc rows of MV·W floats at stride `xs`, `w` NW rows of kc floats at stride
/// `ws`, `ct` NW rows of MV·W floats at stride `cs`; the CPU must support `S`'s ISA.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn xt_tile<S: Simd<T = f32>, const MV: usize, const NW: usize>(
    (xt, xs): (*const f32, usize),
    (w, ws): (*const f32, usize),
    kc: usize,
    (ct, cs): (*mut f32, usize),
    add: bool,
) {
    let mut acc = [[S::zero(); MV]; NW];
    if add {
        for r in 0..NW {
            for v in 0..MV {
                acc[r][v] = S::load(ct.add(r * cs + v * S::W));
            }
        }
    }
    for kk in 0..kc {
        let mut xv = [S::zero(); MV];
        for v in 0..MV {
            xv[v] = S::load(xt.add(kk * xs + v * S::W));
        }
        for r in 0..NW {
            let b = S::splat(*w.add(r * ws + kk));
            for v in 0..MV {
                acc[r][v] = S::fma(xv[v], b, acc[r][v]);
            }
        }
    }
    for r in 0..NW {
        for v in 0..MV {
            S::store(ct.add(r * cs + v * S::W), acc[r][v]);
        }
    }
}

/// The `xt` tiles over one weight block: rows [0, rows) of `w` (stride `ws`, `kc` columns)
/// against every row tile of xᵀ (`mp` rows in panels of MVMAX vectors, each panel k-major
/// over all k; columns [kb, kb + kc) are used), into `ct` (`rows` rows of stride `mp`).
///
/// # Safety
/// As `xt_tile`, for every tile: `xt` holds the panels of `xt_path`, `w` `rows` rows of kc,
/// `ct` `rows` rows of `mp`.
#[inline(always)]
unsafe fn xt_block<S: Simd<T = f32>, const MVMAX: usize>(
    (xt, k, kb, mp): (*const f32, usize, usize, usize),
    (w, ws, rows): (*const f32, usize, usize),
    kc: usize,
    ct: *mut f32,
    add: bool,
) {
    let tile = MVMAX * S::W;
    let mut i = 0;
    while i < mp {
        let mv = ((mp - i) / S::W).min(MVMAX);
        // this tile's panel of xᵀ (rows [i, i + tile), k-major, stride `tile`), at column kb
        let x0 = xt.add((i / tile) * k * tile + kb * tile);
        macro_rules! tiles {
            ($mv:literal, $nw:literal) => {{
                let mut r = 0;
                while r + $nw <= rows {
                    let (wr, cr) = (w.add(r * ws), ct.add(r * mp + i));
                    xt_tile::<S, $mv, $nw>((x0, tile), (wr, ws), kc, (cr, mp), add);
                    r += $nw;
                }
                while r < rows {
                    let (wr, cr) = (w.add(r * ws), ct.add(r * mp + i));
                    xt_tile::<S, $mv, 1>((x0, tile), (wr, ws), kc, (cr, mp), add);
                    r += 1;
                }
            }};
        }
        // NW per MV: MV·NW accumulators + MV + 1 registers (32 with AVX-512, 16 with AVX2).
        match (S::W, mv) {
            (16, 4) => tiles!(4, 6),
            (16, 3) => tiles!(3, 8),
            (16, 2) => tiles!(2, 12),
            (_, 2) => tiles!(2, 6),
            _ => tiles!(1, 12),
        }
        i += mv * S::W;
    }
}

/// The `xt` kernel over weight rows [j0, j1) of every row of x; one worker's share.
///
/// # Safety
/// `xt` is the k-major panel of x (k rows of `mp` floats, rows >= m zero), W and C are as
/// validated by `xwt`, and no other worker writes C columns [j0, j1).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn xt_share<S: HalfSimd, const MVMAX: usize>(
    (m, k, mp): (usize, usize, usize),
    xt: &[f32],
    w: Dense<'_>,
    w_rs: usize,
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
    (j0, j1): (usize, usize),
) {
    let kc = ((XT_BLOCK_BYTES / 4 / mp) / 16 * 16)
        .clamp(64, k.max(64))
        .min(k);
    let mut ct = Scratch::take(&CT, NB * mp);
    let mut buf = match w {
        Dense::F32(_) => Scratch::take(&BUF, 0),
        _ => Scratch::take(&BUF, NB * kc),
    };
    let mut nb = j0;
    while nb < j1 {
        let rows = NB.min(j1 - nb);
        let mut kb = 0;
        while kb < k {
            let cols = kc.min(k - kb);
            let (wp, ws) = match w {
                Dense::F32(w) => (w.as_ptr().add(nb * w_rs + kb), w_rs),
                _ => {
                    widen::<S>(w, (nb, rows), (kb, cols), w_rs, &mut buf);
                    (buf.as_ptr(), cols)
                }
            };
            let xb = (xt.as_ptr(), k, kb, mp);
            xt_block::<S, MVMAX>(xb, (wp, ws, rows), cols, ct.as_mut_ptr(), kb > 0);
            kb += cols;
        }
        // Cᵀ block -> C columns [nb, nb + rows)
        for i in 0..m {
            let row = c.add(i * c_rs + nb);
            for r in 0..rows {
                let v = ct[r * mp + i];
                *row.add(r) = if accumulate { *row.add(r) + v } else { v };
            }
        }
        nb += rows;
    }
}

/// Packs xᵀ (k-major, `mp` = m rounded up to the lanes, padding zero) and runs the shares.
///
/// # Safety
/// The operands passed `xwt`'s validation and `c` aliases neither x nor W; `isa` is this
/// CPU's and not `Portable`.
#[allow(clippy::too_many_arguments)]
unsafe fn xt_path(
    isa: Isa,
    threads: usize,
    (m, n, k): (usize, usize, usize),
    (x, x_rs): (&[f32], usize),
    (w, w_rs): (Dense<'_>, usize),
    (c, c_rs): (&mut [f32], usize),
    accumulate: bool,
) {
    let lanes = <f32 as Elem>::lanes(isa);
    let mp = m.div_ceil(lanes) * lanes;
    // xᵀ in panels of `tile` rows (the widest register tile), each k-major over all of k,
    // so a tile reads one sequential stream; 16 columns at a time (one cache line of x per
    // row); the panels in parallel
    let tile = match isa {
        Isa::Avx512 => 4 * lanes,
        _ => 2 * lanes,
    };
    let mut scratch = Scratch::take(&XT, mp.div_ceil(tile) * k * tile);
    let xt = &mut scratch[..mp.div_ceil(tile) * k * tile];
    {
        use rayon::prelude::*;
        let pack = |(p, out): (usize, &mut [f32])| {
            let rows = tile.min(m - (p * tile).min(m));
            // rows m..mp are read by the last tile: zeros (the buffer is reused, not cleared)
            let pad = tile.min(mp - p * tile);
            for k0 in (0..k).step_by(16) {
                for r in 0..rows {
                    let src = &x[(p * tile + r) * x_rs + k0..][..16.min(k - k0)];
                    for (kk, &v) in src.iter().enumerate() {
                        out[(k0 + kk) * tile + r] = v;
                    }
                }
                for kk in k0..(k0 + 16).min(k) {
                    out[kk * tile + rows..kk * tile + pad].fill(0.0);
                }
            }
        };
        if threads > 1 {
            xt.par_chunks_mut(k * tile).enumerate().for_each(pack);
        } else {
            xt.chunks_mut(k * tile).enumerate().for_each(pack);
        }
    }
    let cp = SyncPtr(c.as_mut_ptr());
    split(n, threads, NB, |j0, j1| {
        let dims = (m, k, mp);
        // SAFETY: forwarded from this function's contract; shares are disjoint in N.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => xt_avx512(dims, xt, w, w_rs, (cp.get(), c_rs), accumulate, (j0, j1)),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => xt_avx2(dims, xt, w, w_rs, (cp.get(), c_rs), accumulate, (j0, j1)),
                Isa::Portable => unreachable!("xt_path is not called without SIMD"),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn xt_avx512(
    dims: (usize, usize, usize),
    xt: &[f32],
    w: Dense<'_>,
    w_rs: usize,
    c: (*mut f32, usize),
    accumulate: bool,
    share: (usize, usize),
) {
    xt_share::<super::x86::Avx512F32, 4>(dims, xt, w, w_rs, c, accumulate, share)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn xt_avx2(
    dims: (usize, usize, usize),
    xt: &[f32],
    w: Dense<'_>,
    w_rs: usize,
    c: (*mut f32, usize),
    accumulate: bool,
    share: (usize, usize),
) {
    xt_share::<super::x86::Avx2F32, 2>(dims, xt, w, w_rs, c, accumulate, share)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 reference of `[c +] x·Wᵀ` on the widened weights.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        x: &[f32],
        x_rs: usize,
        w: &[f32],
        w_rs: usize,
        c0: &[f32],
        c_rs: usize,
        acc: bool,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if acc { c0[i * c_rs + j] as f64 } else { 0.0 };
                for t in 0..k {
                    s += x[i * x_rs + t] as f64 * w[j * w_rs + t] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn every_dtype_and_route_matches_f64_and_leaves_the_rest_of_c_alone() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // m across both kernels and every tile shape, ragged N (not a multiple of NB), k
        // across several conversion / xᵀ blocks
        for &(m, n, k) in &[
            (1, 37, 70),
            (2, 3, 15),
            (5, 50, 1030),
            (8, 19, 3072),
            (8, 41, 100),
            (11, 9, 16),
            (14, 33, 48),
            (16, 24, 64),
            (17, 49, 33),
            (33, 30, 200),
            (64, 75, 129),
            (100, 26, 2100),
            (130, 7, 5),
        ] {
            let (x_rs, w_rs, c_rs) = (k + 3, k + 1, n + 2);
            let x = fill(m * x_rs, 1);
            let wf = fill(n * w_rs, 2);
            let c0 = fill(m * c_rs, 3);
            for dt in ["f32", "f16", "bf16"] {
                let (wh16, whb): (Vec<f16>, Vec<bf16>) = (
                    wf.iter().map(|&v| f16::from_f32(v)).collect(),
                    wf.iter().map(|&v| bf16::from_f32(v)).collect(),
                );
                let (w, exact): (WRows, Vec<f32>) = match dt {
                    "f32" => (WRows::F32(&wf), wf.clone()),
                    "f16" => (WRows::F16(&wh16), wh16.iter().map(|v| v.to_f32()).collect()),
                    _ => (WRows::BF16(&whb), whb.iter().map(|v| v.to_f32()).collect()),
                };
                for acc in [false, true] {
                    let want = reference(m, n, k, &x, x_rs, &exact, w_rs, &c0, c_rs, acc);
                    let mut c = c0.clone();
                    pool.install(|| xwt(m, n, k, &x, x_rs, w, w_rs, &mut c, c_rs, acc))
                        .unwrap();
                    for i in 0..m {
                        for j in 0..c_rs {
                            let got = c[i * c_rs + j];
                            if j >= n {
                                assert_eq!(
                                    got.to_bits(),
                                    c0[i * c_rs + j].to_bits(),
                                    "padding of C written"
                                );
                                continue;
                            }
                            let r = want[i * n + j];
                            assert!(
                                (got as f64 - r).abs() <= 1e-5 * (k as f64).sqrt() + 1e-5 * r.abs(),
                                "{dt} m{m} n{n} k{k} acc {acc}: C[{i},{j}] = {got}, want {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn half_weights_give_the_f32_result_on_their_widened_values_bit_for_bit() {
        // Serving from a bf16 file must give the tokens of the f32 model with the same
        // (bf16-exact) weights: the same kernel, the same order of sums.
        for &(m, n, k) in &[(1, 40, 300), (8, 30, 1500), (20, 50, 77), (70, 24, 800)] {
            let x = fill(m * k, 4);
            let wb: Vec<bf16> = fill(n * k, 5).iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = fill(n * k, 6).iter().map(|&v| f16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let run = |w: WRows| {
                let mut c = vec![0f32; m * n];
                xwt(m, n, k, &x, k, w, k, &mut c, n, false).unwrap();
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(WRows::BF16(&wb)), run(WRows::F32(&wbf)), "bf16 m{m}");
            assert_eq!(run(WRows::F16(&wh)), run(WRows::F32(&whf)), "f16 m{m}");
        }
    }

    #[test]
    fn every_strip_tile_gives_the_bits_of_the_two_row_tile() {
        // 8-row tiles (assembly on AVX-512), 6- and 4-row tiles, the ragged last column and
        // k in blocks (k = 1100)
        // against the same rows taken two at a time: one order of sums whatever the tile
        for &(m, n, k) in &[(14, 33, 100), (12, 5, 1100), (8, 7, 31)] {
            let x = fill(m * k, 7);
            for dt in ["f32", "f16", "bf16"] {
                let wf = fill(n * k, 8);
                let (wh, wb): (Vec<f16>, Vec<bf16>) = (
                    wf.iter().map(|&v| f16::from_f32(v)).collect(),
                    wf.iter().map(|&v| bf16::from_f32(v)).collect(),
                );
                let w = match dt {
                    "f32" => WRows::F32(&wf),
                    "f16" => WRows::F16(&wh),
                    _ => WRows::BF16(&wb),
                };
                let mut all = vec![0f32; m * n];
                xwt(m, n, k, &x, k, w, k, &mut all, n, false).unwrap();
                for i in (0..m).step_by(2) {
                    let mut two = vec![0f32; 2 * n];
                    xwt(2, n, k, &x[i * k..], k, w, k, &mut two, n, false).unwrap();
                    for (t, (&a, &b)) in all[i * n..(i + 2) * n].iter().zip(&two).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dt} m {m} row {} col {}",
                            i + t / n,
                            t % n
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_strip_kernel_of_every_isa_this_cpu_has_matches_f64() {
        // `xwt` runs only the widest ISA found; the AVX2 tiles (4 x 2) serve CPUs without
        // AVX-512, so they are called here directly wherever this CPU has AVX2
        let mut isas = vec![];
        if is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            isas.push(Isa::Avx2);
        }
        if isas.is_empty() {
            eprintln!(
                "skipped: this CPU has neither AVX-512 nor AVX2 (the strip kernel needs one)"
            );
            return;
        }
        for &(m, n, k) in &[(15, 9, 1100), (5, 7, 40), (8, 13, 33)] {
            let x = fill(m * k, 9);
            let wf = fill(n * k, 10);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for &isa in &isas {
                for (dt, exact) in [("f32", &wf), ("bf16", &wbf)] {
                    let want = reference(m, n, k, &x, k, exact, k, &[], n, false);
                    let mut c = vec![f32::NAN; m * n];
                    let p = Args {
                        m,
                        k,
                        a: x.as_ptr(),
                        a_s: k,
                        b: core::ptr::null(),
                        b_s: k,
                        c: c.as_mut_ptr(),
                        c_rs: n,
                        c_cs: 1,
                        accumulate: false,
                    };
                    // SAFETY: x holds m rows of k, W n rows of k, C m rows of n; `isa` was
                    // detected on this CPU above.
                    unsafe {
                        if dt == "f32" {
                            dot_share(isa, &p, wf.as_ptr(), 0, n)
                        } else {
                            dot_share(isa, &p, wb.as_ptr(), 0, n)
                        }
                    }
                    for (t, (&got, &r)) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - r).abs() <= 1e-5 * (k as f64).sqrt() + 1e-5 * r.abs(),
                            "{isa:?} {dt} m{m} n{n} k{k}: C[{}] = {got}, want {r}",
                            t
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_operands_that_do_not_hold_the_shape() {
        let x = vec![0f32; 10];
        let w = vec![0f32; 12];
        let mut c = vec![0f32; 8];
        let e = xwt(2, 3, 5, &x, 5, WRows::F32(&w), 5, &mut c, 3, false).unwrap_err();
        assert!(e.to_string().contains("W (12 elements"), "{e}");
        let e = xwt(3, 2, 4, &x, 4, WRows::F32(&w), 4, &mut c, 2, false).unwrap_err();
        assert!(e.to_string().contains("x (10 elements"), "{e}");
        let e = xwt(2, 3, 4, &x, 4, WRows::F32(&w), 4, &mut c[..5], 3, false).unwrap_err();
        assert!(e.to_string().contains("C (5 elements"), "{e}");
    }
}
