//! `C [m, N] = [C +] x [m, K] · Wᵀ` with W [N, K] kept quantized in memory in the ggml block
//! formats Q8_0, Q4_0 and Q4_1 (32 weights a block along K): the decode product of a
//! quantized model, reading 4.5-8.5 bits a weight instead of 16 or 32. Reached through
//! `xwt` with `WRows::{Q8_0, Q4_0, Q4_1}`.
//!
//! Method (the one llama.cpp uses, written here from the formats): each row of x is quantized
//! once per call to 8-bit blocks of 32 (d_x = max|x| / 127, q = round(x / d_x), ties to
//! even), then every block pair is an integer dot product scaled by d_w·d_x in f32; Q4_1's
//! offset adds m_w·s_x with s_x = d_x·Σq. The integer dots take the weights as the unsigned
//! operand: Q4 nibbles as they are (Q4_0's "- 8" becomes -8·Σq, an integer correction),
//! Q8_0 weights flipped to q + 128 (-128·Σq) for VNNI, or |w| against sign(w)·q with AVX2.
//!
//! x's blocks are laid out in groups of 4 blocks (`XGroup`): 16-byte lane i of `lo` holds
//! elements 0..16 of block i, of `hi` elements 16..32, so one unpacked weight group (4
//! blocks' nibbles: low nibbles = elements 0..16, high = 16..32) meets x with two 512-bit
//! VNNI dots and each block's sum stays in its own four 32-bit lanes, scaled by one vector.
//!
//! Kernels (runtime dispatch): AVX-512 VNNI (512-bit `vpdpbusd`), AVX2 (`vpmaddubsw` +
//! `vpmaddwd`, 2 blocks a vector), portable scalar. A register tile of up to 4 rows of x x
//! 2-4 weight rows unpacks each weight group once for all its rows; the threads split N.

use super::{split, PAR_MIN_WORK};
use anyhow::{ensure, Result};

/// Weights (and activation values) a block.
pub const QK: usize = 32;

/// A ggml block format of quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    /// `{f16 d; i8 qs[32]}`, 34 bytes: x = d·q.
    Q8_0,
    /// `{f16 d; u8 qs[16]}`, 18 bytes: x = d·(q - 8), element j in the low nibble of qs[j],
    /// element j + 16 in its high nibble.
    Q4_0,
    /// `{f16 d; f16 m; u8 qs[16]}`, 20 bytes: x = d·q + m, nibbles as Q4_0.
    Q4_1,
}

impl QFormat {
    /// Bytes of one block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 34,
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
        }
    }
}

impl std::fmt::Display for QFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
        })
    }
}

/// Instruction set of the quantized kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QIsa {
    #[cfg(target_arch = "x86_64")]
    Vnni512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl QIsa {
    /// Whether this CPU runs it.
    pub(crate) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            QIsa::Vnni512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && QIsa::Avx2.available()
            }
            #[cfg(target_arch = "x86_64")]
            QIsa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            QIsa::Portable => true,
        }
    }

    /// The best one of this CPU.
    pub(crate) fn detect() -> QIsa {
        #[cfg(target_arch = "x86_64")]
        for isa in [QIsa::Vnni512, QIsa::Avx2] {
            if isa.available() {
                return isa;
            }
        }
        QIsa::Portable
    }
}

/// Four blocks of one quantized row of x (see the module doc for the lane order).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct XGroup {
    /// Elements 0..16 of block i at bytes [16i, 16i + 16).
    lo: [i8; 64],
    /// Elements 16..32 of block i at bytes [16i, 16i + 16).
    hi: [i8; 64],
    /// d_x of block i in lanes [4i, 4i + 4).
    d: [f32; 16],
    /// Lane 4i: Q4_1: s_x = d_x·Σq of block i (f32 bits); otherwise the integer correction
    /// -off·Σq (i32 bits) of the weights' offset. Other lanes 0.
    s: [u32; 16],
}

const XGROUP_ZERO: XGroup = XGroup {
    lo: [0; 64],
    hi: [0; 64],
    d: [0.0; 16],
    s: [0; 16],
};

/// Offset the integer dots of `isa` add to `fmt`'s weights (corrected by -off·Σq).
fn weight_offset(fmt: QFormat, isa: QIsa) -> i32 {
    match (fmt, isa) {
        (QFormat::Q4_0, _) => 8,
        #[cfg(target_arch = "x86_64")]
        (QFormat::Q8_0, QIsa::Vnni512) => 128,
        _ => 0,
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2^22 (the 1.5·2^23 trick; the
/// result is garbage, never a panic, for larger or NaN v, which are clamped after).
#[inline(always)]
fn round_i32(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

/// Quantizes one row of x (K = `x.len()`, a multiple of 32) into `out` (K / 128 groups
/// rounded up; blocks past K zero). `off`: the weights' integer offset; `with_s`: keep
/// s_x = d_x·Σq (Q4_1) instead.
#[inline(always)]
fn quantize_row(x: &[f32], off: i32, with_s: bool, out: &mut [XGroup]) {
    let nblk = x.len() / QK;
    for (g, xg) in out.iter_mut().enumerate() {
        *xg = XGROUP_ZERO;
        for b in 0..4 {
            let blk = g * 4 + b;
            if blk >= nblk {
                break;
            }
            let xb = &x[blk * QK..blk * QK + QK];
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for j in 0..16 {
                let (q0, q1) = (
                    round_i32(xb[j] * id).clamp(-127, 127),
                    round_i32(xb[j + 16] * id).clamp(-127, 127),
                );
                xg.lo[b * 16 + j] = q0 as i8;
                xg.hi[b * 16 + j] = q1 as i8;
                sum += q0 + q1;
            }
            xg.d[b * 4..b * 4 + 4].fill(d);
            xg.s[b * 4] = if with_s {
                (d * sum as f32).to_bits()
            } else {
                sum.wrapping_mul(-off) as u32
            };
        }
    }
}

/// `quantize_row` compiled for AVX-512 (vectorized by the compiler).
///
/// # Safety
/// The CPU must support AVX-512 F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn quantize_row_avx512(x: &[f32], off: i32, with_s: bool, out: &mut [XGroup]) {
    quantize_row(x, off, with_s, out)
}

/// `quantize_row` compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], off: i32, with_s: bool, out: &mut [XGroup]) {
    quantize_row(x, off, with_s, out)
}

fn quantize_row_isa(isa: QIsa, x: &[f32], off: i32, with_s: bool, out: &mut [XGroup]) {
    match isa {
        // SAFETY: `isa` was checked available on this CPU by the caller (`xwt_q_isa`).
        #[cfg(target_arch = "x86_64")]
        QIsa::Vnni512 => unsafe { quantize_row_avx512(x, off, with_s, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => unsafe { quantize_row_avx2(x, off, with_s, out) },
        QIsa::Portable => quantize_row(x, off, with_s, out),
    }
}

thread_local! {
    /// The quantized x of the calls on this thread, reused (no allocation per call).
    static XQ: std::cell::RefCell<Vec<XGroup>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `xwt` for quantized weights: W is `n` rows of `k / 32` blocks of `fmt`, row `j` at block
/// `j * w_rs / 32` of `w`. Validated; on the current rayon pool.
pub(super) fn xwt_q(
    fmt: QFormat,
    mnk: (usize, usize, usize),
    x: (&[f32], usize),
    w: (&[u8], usize),
    c: (&mut [f32], usize),
    accumulate: bool,
) -> Result<()> {
    xwt_q_isa(QIsa::detect(), fmt, mnk, x, w, c, accumulate)
}

/// `xwt_q` with the instruction set given (an error if this CPU lacks it).
pub(crate) fn xwt_q_isa(
    isa: QIsa,
    fmt: QFormat,
    (m, n, k): (usize, usize, usize),
    (x, x_rs): (&[f32], usize),
    (w, w_rs): (&[u8], usize),
    (c, c_rs): (&mut [f32], usize),
    accumulate: bool,
) -> Result<()> {
    ensure!(isa.available(), "x·Wᵀ {fmt}: this CPU lacks {isa:?}");
    ensure!(
        k % QK == 0,
        "x·Wᵀ {fmt}: K = {k} is not a multiple of the block size {QK}"
    );
    ensure!(
        w_rs % QK == 0 && (n <= 1 || w_rs >= k),
        "x·Wᵀ {fmt}: W's row stride {w_rs} (in elements) must be a multiple of {QK} and at least K = {k}"
    );
    let fits = |len: usize, rows: usize, rs: usize, cols: usize| {
        rows == 0
            || cols == 0
            || ((rows - 1).checked_mul(rs))
                .and_then(|v| v.checked_add(cols))
                .is_some_and(|e| e <= len)
    };
    ensure!(
        (m <= 1 || x_rs >= k) && fits(x.len(), m, x_rs, k),
        "x·Wᵀ {fmt}: x ({} elements, row stride {x_rs}) does not hold {m} x {k}",
        x.len()
    );
    let bb = fmt.block_bytes();
    let row_bytes = w_rs / QK * bb;
    ensure!(
        fits(w.len(), n, row_bytes, k / QK * bb),
        "x·Wᵀ {fmt}: W ({} bytes, {row_bytes} bytes a row) does not hold {n} rows of {k} weights ({} bytes each)",
        w.len(),
        k / QK * bb
    );
    ensure!(
        (m <= 1 || c_rs >= n) && fits(c.len(), m, c_rs, n),
        "x·Wᵀ {fmt}: C ({} elements, row stride {c_rs}) does not hold {m} x {n}",
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
    let threads = if m.saturating_mul(n).saturating_mul(k) < PAR_MIN_WORK {
        1
    } else {
        rayon::current_num_threads().max(1)
    };
    let groups = k.div_ceil(4 * QK);
    // x quantized once: m rows of `groups` groups
    let mut xq = XQ.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if xq.len() < m * groups {
        xq.resize(m * groups, XGROUP_ZERO);
    }
    let (off, with_s) = (weight_offset(fmt, isa), fmt == QFormat::Q4_1);
    {
        let quant = |(i, out): (usize, &mut [XGroup])| {
            quantize_row_isa(isa, &x[i * x_rs..i * x_rs + k], off, with_s, out)
        };
        let xq = &mut xq[..m * groups];
        if threads > 1 && m >= 4 {
            use rayon::prelude::*;
            xq.par_chunks_mut(groups).enumerate().for_each(quant);
        } else {
            xq.chunks_mut(groups).enumerate().for_each(quant);
        }
    }
    let job = Job {
        m,
        groups,
        nblk: k / QK,
        xq: xq.as_ptr(),
        w: w.as_ptr(),
        row_bytes,
        c: c.as_mut_ptr(),
        c_rs,
        accumulate,
    };
    split(n, threads, 4, |j0, j1| {
        // SAFETY: validated above: W holds n rows of k/32 blocks at `row_bytes`, C m rows of
        // n at c_rs, xq m rows of `groups` groups; this share alone writes C columns
        // [j0, j1); `isa` is available on this CPU.
        unsafe { share(isa, fmt, &job, j0, j1) }
    });
    XQ.with(|s| {
        let mut s = s.borrow_mut();
        if xq.len() > s.len() {
            *s = xq;
        }
    });
    Ok(())
}

/// One call's operands for the kernels.
struct Job {
    m: usize,
    /// Groups of 4 blocks a row of x (K / 128 rounded up).
    groups: usize,
    /// Blocks a row of W (K / 32).
    nblk: usize,
    xq: *const XGroup,
    w: *const u8,
    row_bytes: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
}
// SAFETY: the workers of one call only read x and W through it and write disjoint columns
// of C.
unsafe impl Sync for Job {}

impl Job {
    /// Writes (or adds) a tile's sums at rows [i, i + MR) x columns [j, j + NR).
    ///
    /// # Safety
    /// The tile must lie in C and in this worker's columns.
    #[inline(always)]
    unsafe fn put<const MR: usize, const NR: usize>(&self, i: usize, j: usize, s: [[f32; NR]; MR]) {
        for (r, row) in s.iter().enumerate() {
            for (t, &v) in row.iter().enumerate() {
                let p = self.c.add((i + r) * self.c_rs + j + t);
                *p = if self.accumulate { *p + v } else { v };
            }
        }
    }
    /// Row `j` of W.
    #[inline(always)]
    unsafe fn wrow(&self, j: usize) -> *const u8 {
        self.w.add(j * self.row_bytes)
    }
}

/// The kernels of `isa` over W rows [j0, j1).
///
/// # Safety
/// As `xwt_q_isa` sets up: `job` valid, columns [j0, j1) this worker's, `isa` available.
unsafe fn share(isa: QIsa, fmt: QFormat, job: &Job, j0: usize, j1: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        QIsa::Vnni512 => match fmt {
            QFormat::Q8_0 => x86::share_vnni::<Q80>(job, j0, j1),
            QFormat::Q4_0 => x86::share_vnni::<Q40>(job, j0, j1),
            QFormat::Q4_1 => x86::share_vnni::<Q41>(job, j0, j1),
        },
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => match fmt {
            QFormat::Q8_0 => x86::share_avx2::<Q80>(job, j0, j1),
            QFormat::Q4_0 => x86::share_avx2::<Q40>(job, j0, j1),
            QFormat::Q4_1 => x86::share_avx2::<Q41>(job, j0, j1),
        },
        QIsa::Portable => match fmt {
            QFormat::Q8_0 => share_portable::<Q80>(job, j0, j1),
            QFormat::Q4_0 => share_portable::<Q40>(job, j0, j1),
            QFormat::Q4_1 => share_portable::<Q41>(job, j0, j1),
        },
    }
}

/// A block format as the kernels see it.
trait Fmt {
    /// Bytes a block.
    const BB: usize;
    /// Q4_1: a float offset m per block (added as m·s_x).
    const HAS_M: bool;
    /// Q8_0: signed 8-bit weights (otherwise nibbles).
    const Q8: bool;
    /// Offset of qs in a block.
    const QS: usize;
}
struct Q80;
struct Q40;
struct Q41;
impl Fmt for Q80 {
    const BB: usize = 34;
    const HAS_M: bool = false;
    const Q8: bool = true;
    const QS: usize = 2;
}
impl Fmt for Q40 {
    const BB: usize = 18;
    const HAS_M: bool = false;
    const Q8: bool = false;
    const QS: usize = 2;
}
impl Fmt for Q41 {
    const BB: usize = 20;
    const HAS_M: bool = true;
    const Q8: bool = false;
    const QS: usize = 4;
}

/// Row tile shape for m rows: (rows, weight rows) of the main tile.
fn tile_nr(m: usize) -> usize {
    match m {
        1 | 2 => 4,
        3 => 3,
        _ => 2,
    }
}

/// Walks W rows [j0, j1) in tiles of `tile_nr(m)` (single rows at the end) and the rows of x
/// in tiles of up to 4, calling `$tile::<F, MR, NR>(job, i, j)` for each.
macro_rules! walk_tiles {
    ($job:expr, $j0:expr, $j1:expr, $tile:ident, $F:ty) => {{
        let job: &Job = $job;
        let nr_main = tile_nr(job.m);
        let mut j = $j0;
        while j < $j1 {
            let nr = if $j1 - j >= nr_main { nr_main } else { 1 };
            let mut i = 0;
            while i < job.m {
                let mr = (job.m - i).min(4);
                match (mr, nr) {
                    (1, 4) => job.put(i, j, $tile::<$F, 1, 4>(job, i, j)),
                    (2, 4) => job.put(i, j, $tile::<$F, 2, 4>(job, i, j)),
                    (3, 3) => job.put(i, j, $tile::<$F, 3, 3>(job, i, j)),
                    (1, 2) => job.put(i, j, $tile::<$F, 1, 2>(job, i, j)),
                    (2, 2) => job.put(i, j, $tile::<$F, 2, 2>(job, i, j)),
                    (3, 2) => job.put(i, j, $tile::<$F, 3, 2>(job, i, j)),
                    (4, 2) => job.put(i, j, $tile::<$F, 4, 2>(job, i, j)),
                    (1, _) => job.put(i, j, $tile::<$F, 1, 1>(job, i, j)),
                    (2, _) => job.put(i, j, $tile::<$F, 2, 1>(job, i, j)),
                    (3, _) => job.put(i, j, $tile::<$F, 3, 1>(job, i, j)),
                    _ => job.put(i, j, $tile::<$F, 4, 1>(job, i, j)),
                }
                i += mr;
            }
            j += nr;
        }
    }};
}

/// Portable kernel: scalar integer dots per block, the same arithmetic as the SIMD ones.
///
/// # Safety
/// As `share`.
unsafe fn share_portable<F: Fmt>(job: &Job, j0: usize, j1: usize) {
    walk_tiles!(job, j0, j1, tile_portable, F)
}

/// One tile without SIMD: sums of rows [i, i + MR) of x against W rows [j, j + NR).
///
/// # Safety
/// As `share`, for the tile.
#[allow(clippy::needless_range_loop)]
unsafe fn tile_portable<F: Fmt, const MR: usize, const NR: usize>(
    job: &Job,
    i: usize,
    j: usize,
) -> [[f32; NR]; MR] {
    let mut out = [[0f32; NR]; MR];
    for r in 0..MR {
        let xr = core::slice::from_raw_parts(job.xq.add((i + r) * job.groups), job.groups);
        for t in 0..NR {
            let w = core::slice::from_raw_parts(job.wrow(j + t), job.nblk * F::BB);
            let mut acc = 0f32;
            for (blk, wb) in w.chunks_exact(F::BB).enumerate() {
                let (xg, b) = (&xr[blk / 4], blk % 4);
                let h = |o: usize| half::f16::from_le_bytes([wb[o], wb[o + 1]]).to_f32();
                let mut isum = 0i32;
                for e in 0..16 {
                    let (w0, w1) = if F::Q8 {
                        (wb[F::QS + e] as i8 as i32, wb[F::QS + 16 + e] as i8 as i32)
                    } else {
                        ((wb[F::QS + e] & 15) as i32, (wb[F::QS + e] >> 4) as i32)
                    };
                    isum += w0 * xg.lo[b * 16 + e] as i32 + w1 * xg.hi[b * 16 + e] as i32;
                }
                let s = xg.s[b * 4];
                if !F::HAS_M {
                    isum = isum.wrapping_add(s as i32);
                }
                acc += h(0) * xg.d[b * 4] * isum as f32;
                if F::HAS_M {
                    acc += h(2) * f32::from_bits(s);
                }
            }
            out[r][t] = acc;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 VNNI and AVX2 kernels.
    use super::{tile_nr, Fmt, Job, XGroup, QK};
    use core::arch::x86_64::*;

    /// W rows this far ahead of the tile being computed are prefetched, into L2 (rows of
    /// 6-30 cache lines are too short for the hardware prefetchers to get ahead on their
    /// own; prefetches into L1 held its few miss buffers: `kfrun bench decode --dtype q8_0`,
    /// m = 1, Zen 4: W read at 16 GB/s with 8 rows into L1, 26-32 with 16 rows into L2).
    const PREFETCH_ROWS: usize = 16;

    /// Prefetches (into L2) the group of 4 blocks `PREFETCH_ROWS` rows after the one at `p`.
    #[inline(always)]
    unsafe fn prefetch_ahead<F: Fmt>(job: &Job, p: *const u8) {
        // wrapping: past the end of W it is only a hint, never dereferenced
        let ahead = p.wrapping_add(PREFETCH_ROWS * job.row_bytes);
        let mut off = 0;
        while off < 4 * F::BB {
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(off) as *const i8);
            off += 64;
        }
    }

    /// One group of 4 weight blocks unpacked for VNNI: unsigned 8-bit weights of elements
    /// 0..16 (`lo`) and 16..32 (`hi`) of block i in 16-byte lane i, d_w of block i in lanes
    /// [4i, 4i + 4), Q4_1's m_w in lane 4i.
    #[derive(Clone, Copy)]
    struct W512 {
        lo: __m512i,
        hi: __m512i,
        d: __m512,
        m: __m512,
    }

    /// Unpacks the first NB (1..=4) blocks at `p`; lanes of blocks past NB are zero.
    ///
    /// # Safety
    /// `p` must point at NB blocks of `F`; AVX-512 F/BW.
    #[inline(always)]
    unsafe fn prep512<F: Fmt, const NB: usize>(p: *const u8) -> W512 {
        let bb = F::BB;
        // scales: d (and m) of the blocks, f16, gathered with scalar loads into one vector
        // and widened once; each then repeated over its block's 4 lanes
        let u16_at = |b: usize| (p.add(b * bb) as *const u16).read_unaligned() as u64;
        let u32_at = |b: usize| (p.add(b * bb) as *const u32).read_unaligned() as u64;
        let (d, m) = if F::HAS_M {
            let (mut lo, mut hi) = (u32_at(0), 0u64);
            if NB > 1 {
                lo |= u32_at(1) << 32;
            }
            if NB > 2 {
                hi = u32_at(2);
            }
            if NB > 3 {
                hi |= u32_at(3) << 32;
            }
            // [d0, m0, d1, m1, d2, m2, d3, m3]
            let dm = _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64));
            let dm = _mm512_castps256_ps512(dm);
            let di = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
            let mi = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
            (_mm512_permutexvar_ps(di, dm), _mm512_permutexvar_ps(mi, dm))
        } else {
            let mut v = u16_at(0);
            for b in 1..NB {
                v |= u16_at(b) << (16 * b);
            }
            let d = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(v as i64)));
            let di = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            (_mm512_permutexvar_ps(di, d), _mm512_setzero_ps())
        };
        // 16 bytes at offset `o` of each block, block i in 16-byte lane i
        let gather = |o: usize| {
            let l = |b: usize| {
                if b < NB {
                    _mm_loadu_si128(p.add(b * bb + o) as *const __m128i)
                } else {
                    _mm_setzero_si128()
                }
            };
            let v = _mm512_castsi128_si512(l(0));
            let v = _mm512_inserti32x4::<1>(v, l(1));
            let v = _mm512_inserti32x4::<2>(v, l(2));
            _mm512_inserti32x4::<3>(v, l(3))
        };
        let (lo, hi) = if F::Q8 {
            // q + 128 as unsigned (corrected by -128·Σq)
            let flip = _mm512_set1_epi8(-128);
            (
                _mm512_xor_si512(gather(F::QS), flip),
                _mm512_xor_si512(gather(F::QS + 16), flip),
            )
        } else {
            let q = gather(F::QS);
            let nib = _mm512_set1_epi8(15);
            (
                _mm512_and_si512(q, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib),
            )
        };
        W512 { lo, hi, d, m }
    }

    /// Adds one group of rows [0, MR) of x (`x`: row 0's group, rows `xs` groups apart) times
    /// NR unpacked weight groups into `acc`.
    ///
    /// # Safety
    /// The MR groups must exist; AVX-512 F/BW/VNNI.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn step512<F: Fmt, const MR: usize, const NR: usize>(
        acc: &mut [[__m512; NR]; MR],
        wv: &[W512; NR],
        x: *const XGroup,
        xs: usize,
    ) {
        for r in 0..MR {
            let xg = &*x.add(r * xs);
            let xlo = _mm512_loadu_si512(xg.lo.as_ptr() as *const _);
            let xhi = _mm512_loadu_si512(xg.hi.as_ptr() as *const _);
            let xd = _mm512_loadu_ps(xg.d.as_ptr());
            let xsv = _mm512_loadu_si512(xg.s.as_ptr() as *const _);
            for t in 0..NR {
                let init = if F::HAS_M {
                    _mm512_setzero_si512()
                } else {
                    xsv
                };
                let s = _mm512_dpbusd_epi32(init, wv[t].lo, xlo);
                let s = _mm512_dpbusd_epi32(s, wv[t].hi, xhi);
                let sc = _mm512_mul_ps(wv[t].d, xd);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r][t]);
                if F::HAS_M {
                    acc[r][t] = _mm512_fmadd_ps(wv[t].m, _mm512_castsi512_ps(xsv), acc[r][t]);
                }
            }
        }
    }

    /// Group `g` of W row `j` unpacked (the tail group with its 1-3 blocks), prefetching the
    /// rows ahead when `pf`.
    ///
    /// # Safety
    /// Row `j` and group `g` must exist; AVX-512 F/BW.
    #[inline(always)]
    unsafe fn load_w<F: Fmt>(job: &Job, j: usize, g: usize, pf: bool) -> W512 {
        let p = job.wrow(j).add(g * 4 * F::BB);
        match job.nblk - g * 4 {
            1 => prep512::<F, 1>(p),
            2 => prep512::<F, 2>(p),
            3 => prep512::<F, 3>(p),
            _ => {
                if pf {
                    prefetch_ahead::<F>(job, p);
                }
                prep512::<F, 4>(p)
            }
        }
    }

    /// Sums of 4 vectors' lanes, as [a, b, c, d].
    #[inline(always)]
    unsafe fn hsum4(v: [__m512; 4]) -> __m128 {
        let h = |a: __m512| {
            _mm256_add_ps(
                _mm512_castps512_ps256(a),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
            )
        };
        let ab = _mm256_hadd_ps(h(v[0]), h(v[1]));
        let cd = _mm256_hadd_ps(h(v[2]), h(v[3]));
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// Each accumulator's lanes summed, four at a time.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn reduce<const MR: usize, const NR: usize>(
        acc: &[[__m512; NR]; MR],
    ) -> [[f32; NR]; MR] {
        let mut out = [[0f32; NR]; MR];
        let mut q = 0;
        while q < MR * NR {
            let mut v = [_mm512_setzero_ps(); 4];
            for e in 0..4 {
                if q + e < MR * NR {
                    v[e] = acc[(q + e) / NR][(q + e) % NR];
                }
            }
            let mut s = [0f32; 4];
            _mm_storeu_ps(s.as_mut_ptr(), hsum4(v));
            for e in 0..4 {
                if q + e < MR * NR {
                    out[(q + e) / NR][(q + e) % NR] = s[e];
                }
            }
            q += 4;
        }
        out
    }

    /// One VNNI tile: sums of rows [i, i + MR) of x against W rows [j, j + NR), W unpacked
    /// here, or read unpacked from `pack` (group g of row j + t at g·NR + t) when PACKED.
    ///
    /// # Safety
    /// As `super::share`, for the tile; `pack` as described when PACKED; AVX-512 F/BW/VNNI.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_vnni<F: Fmt, const MR: usize, const NR: usize, const PACKED: bool>(
        job: &Job,
        i: usize,
        j: usize,
        pack: *const W512,
    ) -> [[f32; NR]; MR] {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let x = job.xq.add(i * job.groups);
        let zero = W512 {
            lo: _mm512_setzero_si512(),
            hi: _mm512_setzero_si512(),
            d: _mm512_setzero_ps(),
            m: _mm512_setzero_ps(),
        };
        let mut wv = [zero; NR];
        for g in 0..job.groups {
            for t in 0..NR {
                wv[t] = if PACKED {
                    *pack.add(g * NR + t)
                } else {
                    load_w::<F>(job, j + t, g, i == 0)
                };
            }
            step512::<F, MR, NR>(&mut acc, &wv, x.add(g), job.groups);
        }
        reduce(&acc)
    }

    /// `tile_vnni` with W unpacked in the tile.
    #[inline(always)]
    unsafe fn tile_vnni_direct<F: Fmt, const MR: usize, const NR: usize>(
        job: &Job,
        i: usize,
        j: usize,
    ) -> [[f32; NR]; MR] {
        tile_vnni::<F, MR, NR, false>(job, i, j, core::ptr::null())
    }

    thread_local! {
        /// Unpacked weight groups of the tile being computed (more than 4 rows of x).
        static PACK: std::cell::RefCell<Vec<W512>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// The VNNI kernel over W rows [j0, j1).
    ///
    /// # Safety
    /// As `super::share`; the CPU must support AVX-512 F/BW/VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn share_vnni<F: Fmt>(job: &Job, j0: usize, j1: usize) {
        if job.m <= 4 {
            walk_tiles!(job, j0, j1, tile_vnni_direct, F);
            return;
        }
        // More rows: each pair of W rows is unpacked once into `pack` (L1-resident, 256
        // bytes a group a row) and read by every tile of 4 rows of x.
        const NR: usize = 2;
        let mut pack = PACK.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let zero = W512 {
            lo: _mm512_setzero_si512(),
            hi: _mm512_setzero_si512(),
            d: _mm512_setzero_ps(),
            m: _mm512_setzero_ps(),
        };
        if pack.len() < job.groups * NR {
            pack.resize(job.groups * NR, zero);
        }
        let mut j = j0;
        while j < j1 {
            let nr = NR.min(j1 - j);
            for g in 0..job.groups {
                for t in 0..nr {
                    pack[g * nr + t] = load_w::<F>(job, j + t, g, true);
                }
            }
            let pk = pack.as_ptr();
            let mut i = 0;
            while i < job.m {
                let mr = (job.m - i).min(4);
                macro_rules! go {
                    ($mr:literal, $nr:literal) => {
                        job.put(i, j, tile_vnni::<F, $mr, $nr, true>(job, i, j, pk))
                    };
                }
                match (mr, nr) {
                    (4, 2) => go!(4, 2),
                    (3, 2) => go!(3, 2),
                    (2, 2) => go!(2, 2),
                    (1, 2) => go!(1, 2),
                    (4, _) => go!(4, 1),
                    (3, _) => go!(3, 1),
                    (2, _) => go!(2, 1),
                    _ => go!(1, 1),
                }
                i += mr;
            }
            j += nr;
        }
        let _ = PACK.try_with(|s| *s.borrow_mut() = pack);
    }

    /// Two weight blocks unpacked for AVX2: 8-bit weights (unsigned nibbles, or Q8_0's
    /// signed values) of elements 0..16 / 16..32 of block i in 16-byte lane i, d_w of block
    /// i in lanes [4i, 4i + 4), m_w in lane 4i.
    #[derive(Clone, Copy)]
    struct W256 {
        lo: __m256i,
        hi: __m256i,
        d: __m256,
        m: __m256,
    }

    /// Unpacks the 2 blocks at `p`.
    ///
    /// # Safety
    /// `p` must point at 2 blocks of `F`; AVX2, F16C.
    #[inline(always)]
    unsafe fn prep256<F: Fmt>(p: *const u8) -> W256 {
        let bb = F::BB;
        let l = |o: usize| _mm_loadu_si128(p.add(o) as *const __m128i);
        let pair = |o: usize| _mm256_set_m128i(l(bb + o), l(o));
        let h2 = |o: usize| (p.add(o) as *const u16).read_unaligned() as i32;
        // [d0, m0, d1, m1] (m only for Q4_1) as f32
        let dm = if F::HAS_M {
            _mm_cvtph_ps(_mm_set_epi32(
                0,
                0,
                h2(bb) | h2(bb + 2) << 16,
                h2(0) | h2(2) << 16,
            ))
        } else {
            _mm_cvtph_ps(_mm_set_epi32(0, 0, h2(bb), h2(0)))
        };
        let dm = _mm256_castps128_ps256(dm);
        let d = _mm256_permutevar8x32_ps(dm, _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0));
        let m = if F::HAS_M {
            _mm256_permutevar8x32_ps(dm, _mm256_set_epi32(3, 3, 3, 3, 1, 1, 1, 1))
        } else {
            _mm256_setzero_ps()
        };
        let (lo, hi) = if F::Q8 {
            (pair(F::QS), pair(F::QS + 16))
        } else {
            let q = pair(F::QS);
            let nib = _mm256_set1_epi8(15);
            (
                _mm256_and_si256(q, nib),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), nib),
            )
        };
        W256 { lo, hi, d, m }
    }

    /// Adds half `h` (blocks 2h, 2h + 1) of one group of rows [0, MR) of x times NR unpacked
    /// weight pairs into `acc`.
    ///
    /// # Safety
    /// The MR groups must exist; AVX2, FMA.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn step256<F: Fmt, const MR: usize, const NR: usize>(
        acc: &mut [[__m256; NR]; MR],
        wv: &[W256; NR],
        x: *const XGroup,
        xs: usize,
        h: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        for r in 0..MR {
            let xg = &*x.add(r * xs);
            let xlo = _mm256_loadu_si256(xg.lo.as_ptr().add(32 * h) as *const __m256i);
            let xhi = _mm256_loadu_si256(xg.hi.as_ptr().add(32 * h) as *const __m256i);
            let xd = _mm256_loadu_ps(xg.d.as_ptr().add(8 * h));
            let xsv = _mm256_loadu_si256(xg.s.as_ptr().add(8 * h) as *const __m256i);
            for t in 0..NR {
                let s = if F::Q8 {
                    // |w| against sign(w)·q: pairs up to 2·128·127, no saturation
                    let (wl, wh) = (wv[t].lo, wv[t].hi);
                    let pl = _mm256_maddubs_epi16(_mm256_abs_epi8(wl), _mm256_sign_epi8(xlo, wl));
                    let ph = _mm256_maddubs_epi16(_mm256_abs_epi8(wh), _mm256_sign_epi8(xhi, wh));
                    _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones))
                } else {
                    // nibbles: pairs up to 2·15·127, two of them fit in 16 bits
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(wv[t].lo, xlo),
                        _mm256_maddubs_epi16(wv[t].hi, xhi),
                    );
                    let s = _mm256_madd_epi16(p, ones);
                    if F::HAS_M {
                        s
                    } else {
                        _mm256_add_epi32(s, xsv)
                    }
                };
                let sc = _mm256_mul_ps(wv[t].d, xd);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r][t]);
                if F::HAS_M {
                    acc[r][t] = _mm256_fmadd_ps(wv[t].m, _mm256_castsi256_ps(xsv), acc[r][t]);
                }
            }
        }
    }

    /// Horizontal sum of 8 lanes.
    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// One AVX2 tile: sums of rows [i, i + MR) of x against W rows [j, j + NR).
    ///
    /// # Safety
    /// As `super::share`, for the tile; AVX2, FMA, F16C.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile_avx2<F: Fmt, const MR: usize, const NR: usize>(
        job: &Job,
        i: usize,
        j: usize,
    ) -> [[f32; NR]; MR] {
        let pairs = job.nblk / 2;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let x = job.xq.add(i * job.groups);
        let zero = W256 {
            lo: _mm256_setzero_si256(),
            hi: _mm256_setzero_si256(),
            d: _mm256_setzero_ps(),
            m: _mm256_setzero_ps(),
        };
        let mut wv = [zero; NR];
        for p in 0..pairs {
            for t in 0..NR {
                let w = job.wrow(j + t).add(p * 2 * F::BB);
                if i == 0 && p % 2 == 0 {
                    prefetch_ahead::<F>(job, w);
                }
                wv[t] = prep256::<F>(w);
            }
            step256::<F, MR, NR>(&mut acc, &wv, x.add(p / 2), job.groups, p % 2);
        }
        if job.nblk % 2 == 1 {
            let p = pairs;
            for t in 0..NR {
                let mut buf = [0u8; 2 * 34];
                let src = job.wrow(j + t).add(p * 2 * F::BB);
                core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), F::BB);
                wv[t] = prep256::<F>(buf.as_ptr());
            }
            step256::<F, MR, NR>(&mut acc, &wv, x.add(p / 2), job.groups, p % 2);
        }
        let mut out = [[0f32; NR]; MR];
        for r in 0..MR {
            for t in 0..NR {
                out[r][t] = hsum256(acc[r][t]);
            }
        }
        out
    }

    /// The AVX2 kernel over W rows [j0, j1).
    ///
    /// # Safety
    /// As `super::share`; the CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn share_avx2<F: Fmt>(job: &Job, j0: usize, j1: usize) {
        walk_tiles!(job, j0, j1, tile_avx2, F)
    }

    const _: () = assert!(QK == 32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift stream of u64.
    struct Rng(u64);
    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
            ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    const FORMATS: [QFormat; 3] = [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1];

    fn isas() -> Vec<QIsa> {
        let mut v = vec![QIsa::Portable];
        #[cfg(target_arch = "x86_64")]
        v.extend(
            [QIsa::Avx2, QIsa::Vnni512]
                .into_iter()
                .filter(|i| i.available()),
        );
        v
    }

    /// Random blocks: every byte value in qs (Q8_0's -128 included), scales of both signs.
    fn random_blocks(fmt: QFormat, blocks: usize, rng: &mut Rng) -> Vec<u8> {
        let bb = fmt.block_bytes();
        let mut out = vec![0u8; blocks * bb];
        for b in out.chunks_exact_mut(bb) {
            let d = half::f16::from_f32(rng.f() * 0.02);
            b[..2].copy_from_slice(&d.to_le_bytes());
            let qs = if fmt == QFormat::Q4_1 {
                let m = half::f16::from_f32(rng.f() * 0.2);
                b[2..4].copy_from_slice(&m.to_le_bytes());
                4
            } else {
                2
            };
            for q in &mut b[qs..] {
                *q = rng.next() as u8;
            }
        }
        out
    }

    /// Scalar reference dequantizer of one block.
    fn dequant_block(fmt: QFormat, b: &[u8]) -> [f32; QK] {
        let h = |o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        let mut out = [0f32; QK];
        for j in 0..16 {
            let (lo, hi) = match fmt {
                QFormat::Q8_0 => (h(0) * b[2 + j] as i8 as f32, h(0) * b[18 + j] as i8 as f32),
                QFormat::Q4_0 => (
                    h(0) * ((b[2 + j] & 15) as f32 - 8.0),
                    h(0) * ((b[2 + j] >> 4) as f32 - 8.0),
                ),
                QFormat::Q4_1 => (
                    h(0) * (b[4 + j] & 15) as f32 + h(2),
                    h(0) * (b[4 + j] >> 4) as f32 + h(2),
                ),
            };
            out[j] = lo;
            out[j + 16] = hi;
        }
        out
    }

    /// W (n rows of k at `w_rs` elements a row) dequantized, n x k.
    fn dequant(fmt: QFormat, w: &[u8], n: usize, k: usize, w_rs: usize) -> Vec<f32> {
        let bb = fmt.block_bytes();
        let mut out = Vec::with_capacity(n * k);
        for j in 0..n {
            for b in 0..k / QK {
                let at = (j * w_rs / QK + b) * bb;
                out.extend(dequant_block(fmt, &w[at..at + bb]));
            }
        }
        out
    }

    /// The 8-bit activation quantization the kernels use (d = max|x| / 127, q = x·(1/d)
    /// rounded, ties to even), as values d·q, and each block's max|x|.
    fn quantize_x(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut vals, mut amaxes) = (Vec::new(), Vec::new());
        for xb in x.chunks_exact(QK) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            vals.extend(
                xb.iter()
                    .map(|&v| d * (v * id).round_ties_even().clamp(-127.0, 127.0)),
            );
            amaxes.push(amax);
        }
        (vals, amaxes)
    }

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        x_rs: usize,
        w_rs: usize,
        c_rs: usize,
    }

    /// Runs `isa` on `fmt` for the case (2 threads), checking that C's padding is untouched.
    #[allow(clippy::too_many_arguments)]
    fn run(
        isa: QIsa,
        fmt: QFormat,
        cs: &Case,
        x: &[f32],
        w: &[u8],
        c0: &[f32],
        acc: bool,
        pool: &rayon::ThreadPool,
    ) -> Vec<f32> {
        let mut c = c0.to_vec();
        let Case { m, n, k, .. } = *cs;
        pool.install(|| {
            xwt_q_isa(
                isa,
                fmt,
                (m, n, k),
                (x, cs.x_rs),
                (w, cs.w_rs),
                (&mut c, cs.c_rs),
                acc,
            )
        })
        .unwrap();
        for i in 0..m {
            for j in n..cs.c_rs.min(c.len() - i * cs.c_rs) {
                assert_eq!(c[i * cs.c_rs + j].to_bits(), c0[i * cs.c_rs + j].to_bits());
            }
        }
        c
    }

    /// Every format x every ISA of this CPU x m in 1..64 x k in {32, 64, 128, 224, 576, 1536}
    /// (tail groups of 1, 2, 3 blocks and none), N not a multiple of any tile, strided x / W
    /// / C, 2 threads, overwrite and accumulate: against the f64
    /// product of dequantized W with the 8-bit-quantized x (tight: 2e-6 of Σ|w|·|x|), the
    /// same with the exact f32 x (within the worst case of the 8-bit rounding of x:
    /// Σ_blocks max|x|/254 · Σ|w|), and the ISAs against each other (1e-6 of Σ|w|·|x|).
    #[test]
    fn every_format_and_isa_matches_the_dequantized_product() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut rng = Rng::new(11);
        for &m in &[1usize, 2, 3, 4, 5, 8, 16, 33, 64] {
            for &k in &[32usize, 64, 128, 224, 576, 1536] {
                let n = if m * k > 20_000 { 37 } else { 11 };
                // W rows padded by a block when m is odd: the stride is honoured
                let cs = Case {
                    m,
                    n,
                    k,
                    x_rs: k + 3,
                    w_rs: if m % 2 == 1 { k + QK } else { k },
                    c_rs: n + 2,
                };
                let x: Vec<f32> = (0..m * cs.x_rs).map(|_| rng.f() * 3.0).collect();
                let c0: Vec<f32> = (0..m * cs.c_rs).map(|_| rng.f()).collect();
                for fmt in FORMATS {
                    let w = random_blocks(fmt, (n - 1) * cs.w_rs / QK + k / QK, &mut rng);
                    let wd = dequant(fmt, &w, n, k, cs.w_rs);
                    for acc in [false, true] {
                        let mut first: Option<Vec<f32>> = None;
                        for isa in isas() {
                            let c = run(isa, fmt, &cs, &x, &w, &c0, acc, &pool);
                            for i in 0..m {
                                let xr = &x[i * cs.x_rs..i * cs.x_rs + k];
                                let (xq, amax) = quantize_x(xr);
                                for j in 0..n {
                                    let wr = &wd[j * k..(j + 1) * k];
                                    let base = if acc { c0[i * cs.c_rs + j] as f64 } else { 0.0 };
                                    let (mut exact, mut quant, mut mag, mut bound) =
                                        (base, base, 0f64, 0f64);
                                    for t in 0..k {
                                        exact += xr[t] as f64 * wr[t] as f64;
                                        quant += xq[t] as f64 * wr[t] as f64;
                                        mag += (xq[t] as f64 * wr[t] as f64).abs();
                                        bound += amax[t / QK] as f64 / 254.0 * (wr[t] as f64).abs();
                                    }
                                    let got = c[i * cs.c_rs + j] as f64;
                                    let ctx = format!(
                                        "{fmt} {isa:?} m{m} n{n} k{k} acc {acc} C[{i},{j}]"
                                    );
                                    let tight = 2e-6 * mag + 1e-6 * base.abs() + 1e-30;
                                    assert!(
                                        (got - quant).abs() <= tight,
                                        "{ctx} = {got}, want {quant} (8-bit x), tolerance {tight}"
                                    );
                                    assert!(
                                        (got - exact).abs() <= bound + tight,
                                        "{ctx} = {got}, want {exact} (f32 x) within {bound}"
                                    );
                                    if let Some(f) = &first {
                                        let o = f[i * cs.c_rs + j] as f64;
                                        let tol = 1e-6 * mag + 1e-6 * base.abs() + 1e-30;
                                        assert!(
                                            (got - o).abs() <= tol,
                                            "{ctx} = {got}, the first ISA gave {o}"
                                        );
                                    }
                                }
                            }
                            first.get_or_insert(c);
                        }
                    }
                }
            }
        }
    }

    /// All-zero rows of x (d_x = 0) and zero scales give exact zeros, not NaN.
    #[test]
    fn zero_rows_and_scales_give_zero() {
        let (m, n, k) = (3, 9, 96);
        let x = vec![0f32; m * k];
        for fmt in FORMATS {
            let w = random_blocks(fmt, n * k / QK, &mut Rng::new(5));
            for isa in isas() {
                let mut c = vec![1f32; m * n];
                xwt_q_isa(isa, fmt, (m, n, k), (&x, k), (&w, k), (&mut c, n), false).unwrap();
                assert!(c.iter().all(|&v| v == 0.0), "{fmt} {isa:?}: {c:?}");
            }
        }
    }

    /// The public entry: `xwt` with `WRows::Q*` dispatches here (same result as the
    /// detected ISA's kernel).
    #[test]
    fn xwt_dispatches_quantized_rows() {
        let (m, n, k) = (2, 5, 64);
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
        for fmt in FORMATS {
            let w = random_blocks(fmt, n * k / QK, &mut rng);
            let wr = match fmt {
                QFormat::Q8_0 => super::super::WRows::Q8_0(&w),
                QFormat::Q4_0 => super::super::WRows::Q4_0(&w),
                QFormat::Q4_1 => super::super::WRows::Q4_1(&w),
            };
            let mut a = vec![0f32; m * n];
            super::super::xwt(m, n, k, &x, k, wr, k, &mut a, n, false).unwrap();
            let mut b = vec![0f32; m * n];
            let isa = QIsa::detect();
            xwt_q_isa(isa, fmt, (m, n, k), (&x, k), (&w, k), (&mut b, n), false).unwrap();
            assert_eq!(a, b, "{fmt}");
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        let x = vec![0f32; 2 * 64];
        let w = vec![0u8; 3 * 2 * 20];
        let mut c = vec![0f32; 2 * 3];
        let go = |k: usize, w: &[u8], w_rs: usize, c: &mut [f32], x: &[f32]| {
            super::super::xwt(
                2,
                3,
                k,
                x,
                k,
                super::super::WRows::Q4_1(w),
                w_rs,
                c,
                3,
                false,
            )
            .unwrap_err()
            .to_string()
        };
        let e = go(48, &w, 64, &mut c, &x);
        assert!(e.contains("K = 48 is not a multiple"), "{e}");
        let e = go(64, &w, 80, &mut c, &x);
        assert!(e.contains("row stride 80"), "{e}");
        let e = go(64, &w[..119], 64, &mut c, &x);
        assert!(e.contains("W (119 bytes"), "{e}");
        let e = go(64, &w, 96, &mut c, &x);
        assert!(e.contains("W (120 bytes, 60 bytes a row)"), "{e}");
        let e = go(64, &w, 64, &mut c, &x[..127]);
        assert!(e.contains("x (127 elements"), "{e}");
        let e = go(64, &w, 64, &mut c[..5], &x);
        assert!(e.contains("C (5 elements"), "{e}");
        // Q8_0 blocks are 34 bytes: 120 bytes do not hold 3 rows of 2
        let e = super::super::xwt(
            2,
            3,
            64,
            &x,
            64,
            super::super::WRows::Q8_0(&w),
            64,
            &mut c,
            3,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Q8_0: W (120 bytes"), "{e}");
    }
}
