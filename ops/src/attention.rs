//! Flash-style attention over key-range patterns (KFORCING.md section 5): every query row sees at
//! most three key intervals, computed on the fly from (pattern, row); tiles of query rows x key
//! blocks with an online softmax, so no [Tq, Tk] score or mask matrix ever exists in memory.
//! Dimensions: B batch, Tq query rows, Tk keys, H heads, D head dim; N context, k hints per window.

use crate::kdev::bridge;
use crate::util::exp_f32;
use crate::util::float_dtype;
use anyhow::{ensure, Context, Result};
use kf_engine::autograd::{should_record, BackwardOp};
use kf_engine::storage::Storage;
use kf_engine::{Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

// ------------------------------------------------------------------ patterns

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnPattern {
    /// Plain causal over the key sequence (teacher / AR; also the KV-cached inference step, see q_start).
    Causal,
    /// Student training: keys/queries [N context | M blocks of N*k hints] (M >= 1 noise
    /// windows per context position, sharing the context rows); context rows causal; hint
    /// (block, t, i) (t in 0..N, i in 1..=k) sees context 0..=t and hints (block, t, 1..=i).
    /// M follows from the key count: Tk = N + M*N*k.
    Staircase { n: usize, k: usize },
    /// k -> 2k teacher rollout: [N context | N*k F1 | N*k F2]; F1 (t,i) sees ctx 0..=t and
    /// F1 (t,1..=i); F2 (t,i) sees ctx 0..=t, ALL of F1 (t,*), and F2 (t,1..=i).
    DoubleStaircase { n: usize, k: usize },
}

#[derive(Clone, Debug)]
pub struct AttnParams {
    pub pattern: AttnPattern,
    /// Absolute row (in the key sequence) of the first query row: queries are key rows
    /// q_start..q_start+Tq. 0 for training passes; cache_len for a KV-cached step (queries =
    /// [new tokens | hints] over keys [cache | new | hints]: causal by absolute position); N for
    /// the second pass of the double staircase that reuses the context K/V.
    pub q_start: usize,
    /// Softmax scale, usually 1/sqrt(D).
    pub scale: f64,
    /// Optional per-batch count of leading keys to ignore (left padding of prompts of different
    /// lengths in batched generation); empty = none.
    pub key_skip: Vec<usize>,
}

/// Up to three half-open key intervals for absolute query row `row` (sorted, disjoint, non-empty
/// ones first; `len` of them used).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRanges {
    pub ranges: [(usize, usize); 3],
    pub len: usize,
}

impl KeyRanges {
    const EMPTY: KeyRanges = KeyRanges {
        ranges: [(0, 0); 3],
        len: 0,
    };

    /// The used intervals.
    pub fn as_slice(&self) -> &[(usize, usize)] {
        &self.ranges[..self.len]
    }

    /// Number of visible keys.
    pub fn count(&self) -> usize {
        self.as_slice().iter().map(|&(a, b)| b - a).sum()
    }

    #[inline]
    fn push(&mut self, a: usize, b: usize) {
        if a < b {
            self.ranges[self.len] = (a, b);
            self.len += 1;
        }
    }

    /// The intervals with keys `0..skip` removed.
    #[inline]
    fn skip_first(&self, skip: usize) -> KeyRanges {
        let mut out = KeyRanges::EMPTY;
        for &(a, b) in self.as_slice() {
            out.push(a.max(skip), b);
        }
        out
    }

    /// The intervals intersected with `[c0, c1)`, relative to `c0`.
    #[inline(always)]
    fn clip(&self, c0: usize, c1: usize) -> KeyRanges {
        let mut out = KeyRanges::EMPTY;
        for &(a, b) in self.as_slice() {
            let (a, b) = (a.max(c0), b.min(c1));
            if a < b {
                out.push(a - c0, b - c0);
            }
        }
        out
    }
}

/// Number of key rows a pattern defines (None for Causal, whose length is Tk; None also when
/// N + N*k overflows); for a staircase, that of one block of hints (M = 1).
fn pattern_len(pattern: AttnPattern) -> Option<usize> {
    match pattern {
        AttnPattern::Causal => None,
        AttnPattern::Staircase { n, k } => n.checked_mul(k)?.checked_add(n),
        AttnPattern::DoubleStaircase { n, k } => n.checked_mul(k)?.checked_mul(2)?.checked_add(n),
    }
}

/// Whether `tk` keys fit a staircase pattern: N + N*k (N + 2*N*k for the double staircase),
/// or for the staircase N + M*N*k with M >= 1 blocks of hints. True for Causal.
pub fn staircase_fits(pattern: AttnPattern, tk: usize) -> bool {
    match pattern {
        AttnPattern::Causal => true,
        AttnPattern::DoubleStaircase { .. } => pattern_len(pattern) == Some(tk),
        AttnPattern::Staircase { n, k } => match n.checked_mul(k) {
            Some(0) | None => pattern_len(pattern) == Some(tk),
            Some(nk) => tk > n && (tk - n) % nk == 0,
        },
    }
}

/// The key intervals of absolute query row `row`. Pure and allocation-free (the CUDA kernel
/// computes the same on the fly). Rows past the end of a staircase pattern get no interval.
pub fn key_ranges(pattern: AttnPattern, row: usize) -> KeyRanges {
    let mut r = KeyRanges::EMPTY;
    let causal = (0, row.saturating_add(1));
    match pattern {
        AttnPattern::Causal => r.push(causal.0, causal.1),
        AttnPattern::Staircase { n, k } | AttnPattern::DoubleStaircase { n, k } => {
            if row < n {
                r.push(causal.0, causal.1);
                return r;
            }
            if k == 0 {
                return r;
            }
            let h = row - n;
            let (w, i) = (h / k, h % k + 1); // window counted over F1 then F2; 1-based hint
            let double = matches!(pattern, AttnPattern::DoubleStaircase { .. });
            // (the row itself is the window's last visible key: its end is row + 1, and every
            // other bound below is at most row, so nothing overflows)
            let end = row.saturating_add(1);
            if !double || w < n {
                // staircase hint (t = w mod N, in block w / N) or F1 token (t = w): ctx 0..=t,
                // own window 1..=i
                let t = if double { w } else { w % n.max(1) };
                r.push(0, t + 1);
                r.push(end - i, end);
            } else if w - n < n {
                // F2 hint (t = w - n): ctx 0..=t, all of F1 (t, *), F2 (t, 1..=i)
                let t = w - n;
                let f1 = n + t * k;
                r.push(0, t + 1);
                r.push(f1, f1 + k);
                r.push(end - i, end);
            }
        }
    }
    r
}

/// The key intervals of `row` with the first `skip` keys masked.
#[inline]
fn visible_ranges(pattern: AttnPattern, row: usize, skip: usize) -> KeyRanges {
    key_ranges(pattern, row).skip_first(skip)
}

// ---------------------------------------------------------------- validation

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    d: usize,
}

fn validate(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Dims> {
    ensure!(
        q.rank() == 4 && k.rank() == 4 && v.rank() == 4,
        "attention ({:?}, q_start {}): q, k and v must be [B, T, H, D], got q {:?}, k {:?}, v {:?}",
        p.pattern,
        p.q_start,
        q.shape(),
        k.shape(),
        v.shape()
    );
    ensure!(
        k.shape() == v.shape(),
        "attention ({:?}, q_start {}): k and v shapes differ: {:?} vs {:?}",
        p.pattern,
        p.q_start,
        k.shape(),
        v.shape()
    );
    validate_shapes(q, k.shape(), p)
}

/// [`validate`] against the shape `ks` of k (and v) as the kernels see them: `[B, Tk, H, D]`
/// (for grouped-query attention, H counts the query heads).
fn validate_shapes(q: &Tensor, ks: &[usize], p: &AttnParams) -> Result<Dims> {
    let ctx = || {
        format!(
            "attention ({:?}, q_start {}): q {:?}, k and v {:?}",
            p.pattern,
            p.q_start,
            q.shape(),
            ks
        )
    };
    ensure!(
        q.rank() == 4 && ks.len() == 4,
        "{}: q, k and v must be [B, T, H, D]",
        ctx()
    );
    let qs = q.shape();
    ensure!(
        qs[0] == ks[0] && qs[2] == ks[2] && qs[3] == ks[3],
        "{}: batch, heads and head dim of q and k must agree",
        ctx()
    );
    let dims = Dims {
        b: qs[0],
        tq: qs[1],
        tk: ks[1],
        h: qs[2],
        d: qs[3],
    };
    ensure!(dims.d > 0, "{}: head dim D must be at least 1", ctx());
    ensure!(
        p.scale.is_finite(),
        "{}: scale {} is not finite",
        ctx(),
        p.scale
    );
    let q_end = p
        .q_start
        .checked_add(dims.tq)
        .with_context(|| format!("{}: q_start + Tq overflows", ctx()))?;
    if let AttnPattern::Staircase { n, k } | AttnPattern::DoubleStaircase { n, k } = p.pattern {
        let want = pattern_len(p.pattern)
            .with_context(|| format!("{}: the pattern length overflows", ctx()))?;
        let what = if matches!(p.pattern, AttnPattern::Staircase { .. }) {
            "N + M*N*k (M >= 1 blocks of hints)"
        } else {
            "N + 2*N*k"
        };
        ensure!(
            staircase_fits(p.pattern, dims.tk),
            "{}: Tk = {} but the pattern needs {what} = {want}{} (N {n}, k {k})",
            ctx(),
            dims.tk,
            if what.contains('M') {
                " + a multiple of N*k"
            } else {
                ""
            }
        );
    }
    ensure!(
        q_end <= dims.tk,
        "{}: query rows q_start..q_start+Tq = {}..{q_end} exceed Tk = {}",
        ctx(),
        p.q_start,
        dims.tk
    );
    ensure!(
        p.key_skip.is_empty() || p.key_skip.len() == dims.b,
        "{}: key_skip has {} entries, expected B = {} (or none)",
        ctx(),
        p.key_skip.len(),
        dims.b
    );
    // Every row: intervals inside [0, Tk) and at least one visible key after key_skip.
    let mut skips: Vec<(usize, usize)> = if p.key_skip.is_empty() {
        vec![(0, 0)]
    } else {
        p.key_skip
            .iter()
            .copied()
            .enumerate()
            .map(|(b, s)| (s, b))
            .collect()
    };
    skips.sort_unstable();
    skips.dedup_by_key(|x| x.0);
    if dims.b == 0 {
        skips.clear();
    }
    for &(skip, b) in &skips {
        for qi in 0..dims.tq {
            let row = p.q_start + qi;
            let kr = key_ranges(p.pattern, row);
            for &(a, e) in kr.as_slice() {
                ensure!(
                    a < e && e <= dims.tk,
                    "{}: query row {qi} (key row {row}) has key range {a}..{e} outside 0..{}",
                    ctx(),
                    dims.tk
                );
            }
            // A row inside the skipped prefix (the left padding of a batched prefill) sees
            // nothing by design: its output is zeros. Any other row must see a key.
            ensure!(
                row < skip || kr.skip_first(skip).len > 0,
                "{}: query row {qi} (key row {row}) of batch {b} sees no key (key_skip {skip})",
                ctx()
            );
        }
    }
    Ok(dims)
}

// ------------------------------------------------------------ strided inputs

/// A [B, T, H, D] tensor read in place through its strides (last dim stride 1).
struct Src<'a, T> {
    data: &'a [T],
    off: usize,
    sb: usize,
    st: usize,
    sh: usize,
    /// Query heads per stored head: 1, or G for the K/V of grouped-query attention (query
    /// head h reads stored head h / G).
    group: usize,
}

impl<T: Copy> Src<'_, T> {
    /// Storage index of element (b, t, h, 0).
    #[inline(always)]
    fn base(&self, b: usize, t: usize, h: usize) -> usize {
        self.off + b * self.sb + t * self.st + (h / self.group) * self.sh
    }
    #[inline(always)]
    fn row(&self, b: usize, t: usize, h: usize, d: usize) -> &[T] {
        let o = self.base(b, t, h);
        &self.data[o..o + d]
    }
}

/// `t` itself when its rows (last dim) are unit-stride, else a contiguous copy.
fn readable(t: &Tensor) -> Result<Tensor> {
    if t.shape()[3] <= 1 || t.strides()[3] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

fn src<'a, T: Kern>(t: &Tensor, g: &'a Storage) -> Result<Src<'a, T>> {
    let s = g.cpu()?;
    let data = T::buf(s)
        .with_context(|| format!("attention: storage is not {}", T::DTYPE))?
        .as_slice();
    let st = t.strides();
    Ok(Src {
        data,
        off: t.layout().offset(),
        sb: st[0],
        st: st[1],
        sh: st[2],
        group: 1,
    })
}

// ------------------------------------------------------------- kernel basics

/// Query rows per tile.
const BR: usize = 32;
/// Keys per block.
const BC: usize = 64;
/// Register micro-tile of the block products: MR rows x NR columns.
const MR: usize = 4;
const NR: usize = 16;
/// Below this many multiply-adds (upper bound) the op runs on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;
/// Query rows up to which the forward reads K's rows directly (see `direct_scores`).
const DIRECT_MAX_TQ: usize = 2;

/// Float types the attention kernels compute in: fused multiply-add when the CPU has it, and an
/// exp that vectorises for f32.
trait Kern: Float {
    fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self;
    fn exp_k(self) -> Self;
    /// One R x NR tile of `gemm` with explicit SIMD; false where this type has none (then the
    /// portable loop runs). `SIMD` is true only in code compiled for AVX2+FMA.
    #[inline(always)]
    fn tile<const SIMD: bool, const R: usize>(_g: &TileArgs<Self>, _c: &mut [Self]) -> bool {
        false
    }
}

/// Operands of one gemm tile at rows i0.., columns j0.. (see `gemm`).
struct TileArgs<'a, T> {
    i0: usize,
    j0: usize,
    kd: usize,
    a: &'a [T],
    a_off: usize,
    a_rs: usize,
    a_cs: usize,
    b: &'a [T],
    b_off: usize,
    b_rs: usize,
    c_rs: usize,
    acc: bool,
}

impl Kern for f32 {
    #[inline(always)]
    fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn exp_k(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn tile<const SIMD: bool, const R: usize>(g: &TileArgs<f32>, c: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if SIMD && g.in_bounds(R, c.len()) {
            // SAFETY: SIMD is true only inside the *_avx2 functions, which run only after
            // simd_ok() found AVX2 and FMA on this CPU; in_bounds checked every index the
            // kernel touches.
            unsafe { tile_f32_avx2::<R>(g, c) };
            return true;
        }
        let _ = (g, c);
        false
    }
}

impl<T> TileArgs<'_, T> {
    /// Whether every element an R x NR tile reads or writes lies inside `a`, `b` and `c`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn in_bounds(&self, r: usize, c_len: usize) -> bool {
        if self.kd == 0 || r == 0 {
            return false;
        }
        // largest index of off + sum (n_i - 1) * stride_i, None on overflow
        let last = |off: usize, steps: [(usize, usize); 2]| {
            steps.iter().try_fold(off, |acc, &(n, stride)| {
                acc.checked_add((n - 1).checked_mul(stride)?)
            })
        };
        let a0 = self.a_off.checked_add(self.i0.saturating_mul(self.a_rs));
        let a_last = a0.and_then(|o| last(o, [(r, self.a_rs), (self.kd, self.a_cs)]));
        let b_last = last(
            self.b_off.saturating_add(self.j0),
            [(self.kd, self.b_rs), (NR, 1)],
        );
        let c0 = self
            .i0
            .checked_mul(self.c_rs)
            .and_then(|x| x.checked_add(self.j0));
        let c_last = c0.and_then(|o| last(o, [(r, self.c_rs), (NR, 1)]));
        matches!(a_last, Some(x) if x < self.a.len())
            && matches!(b_last, Some(x) if x < self.b.len())
            && matches!(c_last, Some(x) if x < c_len)
    }
}

/// An R x 16 tile of C (+)= A B in f32 with AVX2 FMA: 2R accumulators in registers, one
/// broadcast of A and two loads of B per step of the inner dimension, no bounds checks in the
/// loop (the caller checked the extents). The portable loop is not vectorised by LLVM (it keeps
/// the accumulators as spilled scalars, ~10x slower). R = 6 spills two accumulators with 16 ymm
/// registers, so MR is 4.
///
/// SAFETY (caller): AVX2 and FMA available; `g.in_bounds(R, c.len())`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_f32_avx2<const R: usize>(g: &TileArgs<f32>, c: &mut [f32]) {
    use std::arch::x86_64::*;
    let c0 = g.i0 * g.c_rs + g.j0;
    let cp = c.as_mut_ptr();
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    // SAFETY (every block below): the indices lie inside the extents checked by in_bounds.
    if g.acc {
        for r in 0..R {
            unsafe {
                lo[r] = _mm256_loadu_ps(cp.add(c0 + r * g.c_rs));
                hi[r] = _mm256_loadu_ps(cp.add(c0 + r * g.c_rs + 8));
            }
        }
    }
    let ap = unsafe { g.a.as_ptr().add(g.a_off + g.i0 * g.a_rs) };
    let mut bp = unsafe { g.b.as_ptr().add(g.b_off + g.j0) };
    for kk in 0..g.kd {
        let (b0, b1) = unsafe { (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8))) };
        let ak = unsafe { ap.add(kk * g.a_cs) };
        for r in 0..R {
            let a = unsafe { _mm256_broadcast_ss(&*ak.add(r * g.a_rs)) };
            lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
        }
        if kk + 1 < g.kd {
            bp = unsafe { bp.add(g.b_rs) };
        }
    }
    for r in 0..R {
        unsafe {
            _mm256_storeu_ps(cp.add(c0 + r * g.c_rs), lo[r]);
            _mm256_storeu_ps(cp.add(c0 + r * g.c_rs + 8), hi[r]);
        }
    }
}

impl Kern for f64 {
    #[inline(always)]
    fn madd<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn exp_k(self) -> f64 {
        self.exp()
    }
}

/// Max of `init` and `x` (NaN entries are skipped here; they still poison the exp and sum).
#[inline(always)]
fn lane_max<T: Kern>(x: &[T], init: T) -> T {
    let mut acc = [init; 8];
    let mut ch = x.chunks_exact(8);
    for c in &mut ch {
        for j in 0..8 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = init;
    for &v in ch.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Sum in eight interleaved lanes (vectorises; fixed order, so deterministic).
#[inline(always)]
fn lane_sum<T: Kern>(x: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let mut ch = x.chunks_exact(8);
    for c in &mut ch {
        for j in 0..8 {
            acc[j] += c[j];
        }
    }
    let mut s = T::ZERO;
    for &v in acc.iter().chain(ch.remainder()) {
        s += v;
    }
    s
}

/// Dot product in eight interleaved lanes.
#[inline(always)]
fn lane_dot<T: Kern, const F: bool>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (mut cx, mut cy) = (x.chunks_exact(8), y.chunks_exact(8));
    for (a, b) in (&mut cx).zip(&mut cy) {
        for j in 0..8 {
            acc[j] = T::madd::<F>(a[j], b[j], acc[j]);
        }
    }
    let mut s = lane_sum(&acc);
    for (&a, &b) in cx.remainder().iter().zip(cy.remainder()) {
        s += a * b;
    }
    s
}

/// `C[i, j] (+)= sum_kk A[i, kk] * B[kk, j]` for i < m, j < n, kk < kd, with
/// A[i, kk] = a[a_off + i*a_rs + kk*a_cs], B[kk, j] = b[b_off + kk*b_rs + j], C[i, j] = c[i*c_rs + j].
/// Register-blocked MR x NR; `acc` false overwrites C.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm<T: Kern, const F: bool>(
    (m, n, kd): (usize, usize, usize),
    (a, a_off, a_rs, a_cs): (&[T], usize, usize, usize),
    (b, b_off, b_rs): (&[T], usize, usize),
    (c, c_rs): (&mut [T], usize),
    acc: bool,
) {
    let args = ((a, a_off, a_rs, a_cs), (b, b_off, b_rs));
    let mut i0 = 0;
    while i0 + MR <= m {
        gemm_rows::<T, F, MR>(i0, n, kd, args, (c, c_rs), acc);
        i0 += MR;
    }
    // tails of fewer than MR rows
    for r in [4, 2, 1] {
        if i0 + r <= m {
            match r {
                4 => gemm_rows::<T, F, 4>(i0, n, kd, args, (c, c_rs), acc),
                2 => gemm_rows::<T, F, 2>(i0, n, kd, args, (c, c_rs), acc),
                _ => gemm_rows::<T, F, 1>(i0, n, kd, args, (c, c_rs), acc),
            }
            i0 += r;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_rows<T: Kern, const F: bool, const R: usize>(
    i0: usize,
    n: usize,
    kd: usize,
    ((a, a_off, a_rs, a_cs), (b, b_off, b_rs)): GemmAB<T>,
    (c, c_rs): (&mut [T], usize),
    acc: bool,
) {
    let mut j0 = 0;
    while j0 < n {
        let w = NR.min(n - j0);
        if w == NR {
            let g = TileArgs {
                i0,
                j0,
                kd,
                a,
                a_off,
                a_rs,
                a_cs,
                b,
                b_off,
                b_rs,
                c_rs,
                acc,
            };
            if T::tile::<F, R>(&g, c) {
                j0 += NR;
                continue;
            }
        }
        let mut t = [[T::ZERO; NR]; R];
        if acc {
            for (r, tr) in t.iter_mut().enumerate() {
                let o = (i0 + r) * c_rs + j0;
                tr[..w].copy_from_slice(&c[o..o + w]);
            }
        }
        if w == NR {
            for kk in 0..kd {
                let bo = b_off + kk * b_rs + j0;
                let brow = &b[bo..bo + NR];
                for (r, tr) in t.iter_mut().enumerate() {
                    let av = a[a_off + (i0 + r) * a_rs + kk * a_cs];
                    for jj in 0..NR {
                        tr[jj] = T::madd::<F>(av, brow[jj], tr[jj]);
                    }
                }
            }
        } else {
            for kk in 0..kd {
                let bo = b_off + kk * b_rs + j0;
                let brow = &b[bo..bo + w];
                for (r, tr) in t.iter_mut().enumerate() {
                    let av = a[a_off + (i0 + r) * a_rs + kk * a_cs];
                    for (x, &bv) in tr[..w].iter_mut().zip(brow) {
                        *x = T::madd::<F>(av, bv, *x);
                    }
                }
            }
        }
        for (r, tr) in t.iter().enumerate() {
            let o = (i0 + r) * c_rs + j0;
            c[o..o + w].copy_from_slice(&tr[..w]);
        }
        j0 += w;
    }
}

/// The A (slice, offset, row stride, column stride) and B (slice, offset, row stride) operands.
type GemmAB<'a, T> = ((&'a [T], usize, usize, usize), (&'a [T], usize, usize));

/// Sorted, merged union of the rows' intervals (the keys a tile of rows needs).
fn union_segments(rows: &[KeyRanges]) -> Vec<(usize, usize)> {
    let mut all: Vec<(usize, usize)> = rows
        .iter()
        .flat_map(|r| r.as_slice().iter().copied())
        .collect();
    all.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(all.len().min(8));
    for (a, b) in all {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The block-local key columns a group of MR query rows sees: [lo, hi), and the window
/// [wlo, wlo + w) ⊇ [lo, hi) rounded to whole NR-column tiles for the score products.
#[derive(Clone, Copy)]
struct Span {
    lo: usize,
    hi: usize,
    wlo: usize,
    w: usize,
}

/// `vis[i]`: row i's visible intervals inside the block of `nc` keys (block-local). One entry
/// per MR-row group into `out` (None: the group sees nothing here). Computing only these
/// spans is what keeps the staircase at the cost of its visible pairs: a tile of hint rows
/// spans many windows, each group only its own.
fn group_spans(vis: &[KeyRanges], nc: usize, out: &mut Vec<Option<Span>>) {
    out.clear();
    for g in vis.chunks(MR) {
        let lo = g.iter().filter(|r| r.len > 0).map(|r| r.ranges[0].0).min();
        let hi = g
            .iter()
            .filter(|r| r.len > 0)
            .map(|r| r.ranges[r.len - 1].1)
            .max();
        out.push(match (lo, hi) {
            (Some(lo), Some(hi)) => {
                let w = ((hi - lo).div_ceil(NR) * NR).min(nc);
                Some(Span {
                    lo,
                    hi,
                    wlo: lo.min(nc - w),
                    w,
                })
            }
            _ => None,
        });
    }
}

/// out[i, j] = A[i, :] · B[:, j] for the rows of each group and the columns of its span window;
/// A rows are `d` long from `a_off`, B is [d, *] with row stride `b_rs`, out rows are BC apart.
#[inline(always)]
fn group_scores<T: Kern, const F: bool>(
    spans: &[Option<Span>],
    (m, d): (usize, usize),
    (a, a_off): (&[T], usize),
    (b, b_off, b_rs): (&[T], usize, usize),
    out: &mut [T],
) {
    for (g, sp) in spans.iter().enumerate() {
        if let Some(sp) = sp {
            let g0 = g * MR;
            gemm::<T, F>(
                (MR.min(m - g0), sp.w, d),
                (a, a_off + g0 * d, d, 1),
                (b, b_off + sp.wlo, b_rs),
                (&mut out[g0 * BC + sp.wlo..], BC),
                false,
            );
        }
    }
}

/// `group_scores` reading the keys from K's rows (head `h` of sequence `b`, keys from `c0`)
/// instead of transposed panels: each score summed over d in the same order with the same
/// multiply-adds, so the same bits, without transposing the cache for a few query rows.
#[inline(always)]
fn direct_scores<T: Kern, const F: bool>(
    spans: &[Option<Span>],
    (m, d): (usize, usize),
    q: &[T],
    k: &Src<T>,
    (b, h, c0): (usize, usize, usize),
    out: &mut [T],
) {
    for (g, sp) in spans.iter().enumerate() {
        let Some(sp) = sp else { continue };
        for i in g * MR..(g * MR + MR).min(m) {
            let qi = &q[i * d..(i + 1) * d];
            let o = &mut out[i * BC + sp.wlo..i * BC + sp.wlo + sp.w];
            // four keys at a time: independent chains for the multiply-adds to overlap
            let mut j = 0;
            while j + 4 <= sp.w {
                let kr: [&[T]; 4] = std::array::from_fn(|u| k.row(b, c0 + sp.wlo + j + u, h, d));
                let mut acc = [T::ZERO; 4];
                for (dd, &qv) in qi.iter().enumerate() {
                    for u in 0..4 {
                        acc[u] = T::madd::<F>(qv, kr[u][dd], acc[u]);
                    }
                }
                o[j..j + 4].copy_from_slice(&acc);
                j += 4;
            }
            for (jj, x) in o.iter_mut().enumerate().skip(j) {
                let kr = k.row(b, c0 + sp.wlo + jj, h, d);
                *x = qi
                    .iter()
                    .zip(kr)
                    .fold(T::ZERO, |a, (&qv, &kv)| T::madd::<F>(qv, kv, a));
            }
        }
    }
}

/// Copy `nc` key rows (c0..) of head (b, h) transposed into `dst[dd * BC + j]`.
#[inline(always)]
fn load_transposed<T: Kern>(
    s: &Src<T>,
    (b, h, c0, nc, d): (usize, usize, usize, usize, usize),
    dst: &mut [T],
) {
    for j in 0..nc {
        let row = s.row(b, c0 + j, h, d);
        for (dd, &x) in row.iter().enumerate() {
            dst[dd * BC + j] = x;
        }
    }
}

/// Multiply-adds of a dense pass (an upper bound), to choose between one thread and rayon.
fn work(dm: Dims) -> usize {
    [dm.b, dm.h, dm.tq, dm.tk, dm.d]
        .iter()
        .fold(1usize, |a, &x| a.saturating_mul(x))
}

fn simd_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Map `f` over `0..n`, in parallel when the work is large enough; the order of results (and
/// every value) is the same either way.
fn map_tasks<R: Send>(n: usize, parallel: bool, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    if parallel {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

// ------------------------------------------------------------------- forward

/// q [B, Tq, H, D], k and v [B, Tk, H, D] -> out [B, Tq, H, D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
    Ok(attention_with_lse(q, k, v, p)?.0)
}

/// The forward plus the per-row logsumexp of the scaled scores, lse [B, H, Tq] (in the input
/// dtype), which the backward uses. Records the backward node on `out`.
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
) -> Result<(Tensor, Tensor)> {
    if q.rank() == 4 && k.rank() == 4 && q.shape()[2] != k.shape()[2] {
        return grouped(q, k, v, p);
    }
    if let Some(on) = bridge::device_of("attention", &[q, k, v])? {
        let out = attention_on(&on, q, k, v, p)?;
        let lse = bridge::back(&on, out.lse)?;
        let o = bridge::back_recorded(&on, out.o, &[q, k, v], || node(q, k, v, &lse, p))?;
        return Ok((o, lse));
    }
    let dt = float_dtype("attention", &[q, k, v])?;
    let dims = validate(q, k, v, p)?;
    crate::dispatch_float!("attention", dt, forward_t::<T>(q, k, v, p, dims, simd_ok()))
}

/// Grouped-query attention: k and v `[B, Tk, Hk, D]` with `Hk` dividing the `H` heads of q;
/// query head `h` attends with key/value head `h / (H / Hk)`. A CPU inference pass reads
/// the shared heads in place; on the tape or on a kernel device each K/V head is repeated
/// `H / Hk` times first (a copy whose backward sums the group's gradients).
fn grouped(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<(Tensor, Tensor)> {
    let (h, hk) = (q.shape()[2], k.shape()[2]);
    ensure!(
        hk >= 1 && h.is_multiple_of(hk) && k.shape() == v.shape(),
        "attention: q has {h} heads, so k and v need a number of heads dividing it (grouped-query attention), got k {:?}, v {:?}",
        k.shape(),
        v.shape()
    );
    let on_device = bridge::device_of("attention", &[q, k, v])?.is_some();
    if on_device || should_record(&[q, k, v]) {
        let (k, v) = (repeat_heads(k, h / hk)?, repeat_heads(v, h / hk)?);
        return attention_with_lse(q, &k, &v, p);
    }
    let dt = float_dtype("attention", &[q, k, v])?;
    ensure!(
        k.rank() == 4 && v.rank() == 4,
        "attention: k and v must be [B, T, H, D], got {:?} and {:?}",
        k.shape(),
        v.shape()
    );
    let ks = k.shape();
    let dims = validate_shapes(q, &[ks[0], ks[1], h, ks[3]], p)?;
    crate::dispatch_float!("attention", dt, forward_t::<T>(q, k, v, p, dims, simd_ok()))
}

/// `t [B, T, Hk, D]` with every head repeated `g` times: `[B, T, Hk·g, D]` (head `j` of
/// the result is head `j / g` of `t`).
pub fn repeat_heads(t: &Tensor, g: usize) -> Result<Tensor> {
    if g == 1 {
        return Ok(t.clone());
    }
    let s = t.shape().to_vec();
    ensure!(
        s.len() == 4,
        "repeat_heads: expected [B, T, H, D], got {s:?}"
    );
    t.unsqueeze(3)?
        .broadcast_as(&[s[0], s[1], s[2], g, s[3]])?
        .contiguous()?
        .reshape(&[s[0], s[1], s[2] * g, s[3]])
}

struct FwdCx<'a, T> {
    q: Src<'a, T>,
    k: Src<'a, T>,
    /// K transposed once, in panels [B, H, Tk/BC, D, BC] (see transpose_keys); empty for a
    /// decode step of at most `DIRECT_MAX_TQ` query rows, whose scores read K's rows.
    kt: Vec<T>,
    v: Src<'a, T>,
    p: &'a AttnParams,
    dims: Dims,
}

impl<T> FwdCx<'_, T> {
    fn skip(&self, b: usize) -> usize {
        self.p.key_skip.get(b).copied().unwrap_or(0)
    }
}

struct TileOut<T> {
    o: Vec<T>,
    lse: Vec<T>,
}

/// `simd`: use the AVX2+FMA kernels (only when simd_ok(); false runs the portable code).
fn forward_t<T: Kern>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    dims: Dims,
    simd: bool,
) -> Result<(Tensor, Tensor)> {
    let Dims {
        b: nb,
        tq,
        tk: _,
        h: nh,
        d,
    } = dims;
    let (out, lse) = forward_raw::<T>(q, k, v, p, dims, simd)?;
    let node = should_record(&[q, k, v]).then(|| node(q, k, v, &lse, p));
    Ok((out.finish(&[nb, tq, nh, d], node)?, lse))
}

/// The backward node of attention (any device): the inputs, the saved lse, the parameters.
fn node(q: &Tensor, k: &Tensor, v: &Tensor, lse: &Tensor, p: &AttnParams) -> Arc<dyn BackwardOp> {
    Arc::new(AttentionBackward {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        lse: lse.clone(),
        params: p.clone(),
    })
}

/// The forward's output buffer [B, Tq, H, D] (not yet a tensor, so callers attach their own
/// backward node) and lse [B, H, Tq].
fn forward_raw<T: Kern>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    dims: Dims,
    simd: bool,
) -> Result<(OutBuf<T>, Tensor)> {
    let Dims {
        b: nb,
        tq,
        tk: _,
        h: nh,
        d,
    } = dims;
    let (qc, kc, vc) = (readable(q)?, readable(k)?, readable(v)?);
    let (gq, gk, gv) = (qc.storage()?, kc.storage()?, vc.storage()?);
    let parallel = work(dims) >= PAR_MIN_WORK;
    // grouped-query K/V (fewer stored heads than query heads): read in place
    let group = dims.h / kc.shape()[2].max(1);
    let ks = Src {
        group,
        ..src::<T>(&kc, &gk)?
    };
    let cx = FwdCx {
        q: src::<T>(&qc, &gq)?,
        // a decode step (one or two query rows per sequence) would transpose the whole KV
        // cache to use it once
        kt: if tq <= DIRECT_MAX_TQ {
            Vec::new()
        } else {
            transpose_keys(&ks, dims, parallel)
        },
        k: ks,
        v: Src {
            group,
            ..src::<T>(&vc, &gv)?
        },
        p,
        dims,
    };
    let ntile = tq.div_ceil(BR);
    let tiles = map_tasks(nb * nh * ntile, parallel, |idx| {
        let (bh, tile) = (idx / ntile, idx % ntile);
        fwd_tile(&cx, bh / nh, bh % nh, tile, simd)
    });
    let mut out = OutBuf::<T>::uninit(nb * tq * nh * d);
    let mut lse = OutBuf::<T>::uninit(nb * nh * tq);
    if nh * d > 0 && tq > 0 {
        out.as_mut_slice()
            .par_chunks_mut(nh * d)
            .enumerate()
            .for_each(|(bt, chunk)| {
                let (b, t) = (bt / tq, bt % tq);
                let i = t % BR;
                for h in 0..nh {
                    let r = &tiles[(b * nh + h) * ntile + t / BR];
                    chunk[h * d..(h + 1) * d].copy_from_slice(&r.o[i * d..(i + 1) * d]);
                }
            });
        lse.as_mut_slice()
            .par_chunks_mut(tq)
            .enumerate()
            .for_each(|(bh, chunk)| {
                for (tile, c) in chunk.chunks_mut(BR).enumerate() {
                    c.copy_from_slice(&tiles[bh * ntile + tile].lse);
                }
            });
    }
    Ok((out, lse.finish(&[nb, nh, tq], None)?))
}

/// K [B, Tk, H, D] (strided) -> panels [B, H, Tk/BC, D, BC]: each block of BC keys transposed
/// and contiguous. (Transposing each key block inside every query tile cost about a third of
/// the forward; one [D, Tk] matrix per head made the block product stride by Tk, a power of two
/// at the usual lengths, which thrashes one L1 set.)
fn transpose_keys<T: Kern>(k: &Src<T>, dims: Dims, parallel: bool) -> Vec<T> {
    let Dims {
        b: nb,
        tk,
        h: nh,
        d,
        ..
    } = dims;
    let per_head = tk.div_ceil(BC) * d * BC;
    let mut kt = vec![T::ZERO; nb * nh * per_head];
    if kt.is_empty() {
        return kt;
    }
    let fill = |(bh, dst): (usize, &mut [T])| {
        let (b, h) = (bh / nh, bh % nh);
        for (blk, panel) in dst.chunks_exact_mut(d * BC).enumerate() {
            for j in 0..BC.min(tk - blk * BC) {
                for (dd, &x) in k.row(b, blk * BC + j, h, d).iter().enumerate() {
                    panel[dd * BC + j] = x;
                }
            }
        }
    };
    if parallel {
        kt.par_chunks_mut(per_head).enumerate().for_each(fill);
    } else {
        kt.chunks_mut(per_head).enumerate().for_each(fill);
    }
    kt
}

fn fwd_tile<T: Kern>(cx: &FwdCx<T>, b: usize, h: usize, tile: usize, simd: bool) -> TileOut<T> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU reports AVX2 and FMA (simd_ok).
        return unsafe { fwd_tile_avx2(cx, b, h, tile) };
    }
    let _ = simd;
    fwd_tile_impl::<T, false>(cx, b, h, tile)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile_avx2<T: Kern>(cx: &FwdCx<T>, b: usize, h: usize, tile: usize) -> TileOut<T> {
    fwd_tile_impl::<T, true>(cx, b, h, tile)
}

/// One tile of BR query rows of head (b, h): online softmax over the key blocks of the union of
/// the rows' intervals; each row only takes the keys of its own intervals.
#[inline(always)]
fn fwd_tile_impl<T: Kern, const F: bool>(
    cx: &FwdCx<T>,
    b: usize,
    h: usize,
    tile: usize,
) -> TileOut<T> {
    let Dims {
        tq, tk, h: nh, d, ..
    } = cx.dims;
    let kt_off = (b * nh + h) * tk.div_ceil(BC) * d * BC;
    let r0 = tile * BR;
    let m = BR.min(tq - r0);
    let skip = cx.skip(b);
    let sc = T::from_f64(cx.p.scale);
    let mut qb = vec![T::ZERO; m * d];
    for (i, qr) in qb.chunks_exact_mut(d).enumerate() {
        for (o, &x) in qr.iter_mut().zip(cx.q.row(b, r0 + i, h, d)) {
            *o = x * sc;
        }
    }
    let rr: Vec<KeyRanges> = (0..m)
        .map(|i| visible_ranges(cx.p.pattern, cx.p.q_start + r0 + i, skip))
        .collect();
    let mut o = vec![T::ZERO; m * d];
    let mut mx = vec![T::NEG_INFINITY; m];
    let mut l = vec![T::ZERO; m];
    let mut s = vec![T::ZERO; m * BC];
    let mut vis = vec![KeyRanges::EMPTY; m];
    let mut spans = Vec::with_capacity(m.div_ceil(MR));
    for (a, e) in union_segments(&rr) {
        let mut c0 = a;
        while c0 < e {
            // key blocks aligned to the panels of kt
            let blk = c0 / BC;
            let c1 = ((blk + 1) * BC).min(e);
            let nc = c1 - c0;
            let panel = kt_off + blk * d * BC + (c0 - blk * BC);
            for (v, r) in vis.iter_mut().zip(&rr) {
                *v = r.clip(c0, c1);
            }
            group_spans(&vis, nc, &mut spans);
            if cx.kt.is_empty() {
                direct_scores::<T, F>(&spans, (m, d), &qb, &cx.k, (b, h, c0), &mut s);
            } else {
                group_scores::<T, F>(&spans, (m, d), (&qb, 0), (&cx.kt, panel, BC), &mut s);
            }
            for (i, vis) in vis.iter().enumerate() {
                let srow = &mut s[i * BC..i * BC + nc];
                if vis.len == 0 {
                    srow.fill(T::ZERO);
                    continue;
                }
                let mut rmax = mx[i];
                for &(x0, x1) in vis.as_slice() {
                    rmax = lane_max(&srow[x0..x1], rmax);
                }
                let alpha = if rmax == mx[i] {
                    T::ONE
                } else {
                    (mx[i] - rmax).exp_k()
                };
                let mut sum = T::ZERO;
                let mut prev = 0;
                for &(x0, x1) in vis.as_slice() {
                    srow[prev..x0].fill(T::ZERO);
                    for x in &mut srow[x0..x1] {
                        *x = (*x - rmax).exp_k();
                    }
                    sum += lane_sum(&srow[x0..x1]);
                    prev = x1;
                }
                srow[prev..].fill(T::ZERO);
                l[i] = l[i] * alpha + sum;
                if alpha != T::ONE {
                    for x in &mut o[i * d..(i + 1) * d] {
                        *x *= alpha;
                    }
                }
                mx[i] = rmax;
            }
            let vb = cx.v.base(b, c0, h);
            for (g, sp) in spans.iter().enumerate() {
                if let Some(sp) = sp {
                    let g0 = g * MR;
                    gemm::<T, F>(
                        (MR.min(m - g0), d, sp.hi - sp.lo),
                        (&s, g0 * BC + sp.lo, BC, 1),
                        (cx.v.data, vb + sp.lo * cx.v.st, cx.v.st),
                        (&mut o[g0 * d..], d),
                        true,
                    );
                }
            }
            c0 = c1;
        }
    }
    let mut lse = vec![T::ZERO; m];
    for i in 0..m {
        if rr[i].len == 0 {
            // a padding row (inside key_skip): no keys, output 0 and lse = log 0 = -inf; the
            // backward never reads the lse of such a row and gives it zero gradients
            o[i * d..(i + 1) * d].fill(T::ZERO);
            lse[i] = T::NEG_INFINITY;
            continue;
        }
        let inv = T::ONE / l[i];
        for x in &mut o[i * d..(i + 1) * d] {
            *x *= inv;
        }
        lse[i] = mx[i] + l[i].ln();
    }
    TileOut { o, lse }
}

// ------------------------------------------------------------------ backward

struct AttentionBackward {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    params: AttnParams,
}

impl BackwardOp for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.q.clone(), self.k.clone(), self.v.clone()]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        if let Some(on) = bridge::device_of("attention backward", &[&self.q, out, g])? {
            let gr = attention_bwd_on(
                &on,
                (&self.q, &self.k, &self.v),
                out,
                &self.lse,
                g,
                &self.params,
            )?;
            return Ok(vec![
                Some(bridge::back(&on, gr.dq)?),
                Some(bridge::back(&on, gr.dk)?),
                Some(bridge::back(&on, gr.dv)?),
            ]);
        }
        let (dq, dk, dv) =
            attention_backward(&self.q, &self.k, &self.v, out, &self.lse, g, &self.params)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

/// Gradients (dq, dk, dv) of attention given its output `out`, the saved `lse` [B, H, Tq] and the
/// output gradient `g` [B, Tq, H, D]. Flash-style: probabilities are recomputed block by block
/// from q, k and lse. Parallel over (B, H); each head sweeps its key blocks in a fixed order, so
/// results do not depend on the thread count.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    p: &AttnParams,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dt = float_dtype("attention backward", &[q, k, v, out, lse, g])?;
    let dims = validate(q, k, v, p)?;
    ensure!(
        out.shape() == q.shape() && g.shape() == q.shape() && lse.shape() == [dims.b, dims.h, dims.tq],
        "attention backward ({:?}): out {:?} and grad {:?} must be q's shape {:?}, lse {:?} must be [B, H, Tq]",
        p.pattern,
        out.shape(),
        g.shape(),
        q.shape(),
        lse.shape()
    );
    crate::dispatch_float!(
        "attention backward",
        dt,
        backward_t::<T>(q, k, v, out, lse, g, p, dims, simd_ok())
    )
}

struct BwdCx<'a, T> {
    q: Src<'a, T>,
    k: Src<'a, T>,
    v: Src<'a, T>,
    o: Src<'a, T>,
    g: Src<'a, T>,
    lse: &'a [T],
    p: &'a AttnParams,
    dims: Dims,
}

struct HeadGrads<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

#[allow(clippy::too_many_arguments)]
fn backward_t<T: Kern>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    p: &AttnParams,
    dims: Dims,
    simd: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Dims {
        b: nb,
        tq,
        tk,
        h: nh,
        d,
    } = dims;
    let heads = backward_heads::<T>(q, k, v, out, lse, g, p, dims, simd)?;
    let scatter = |t: usize, pick: &(dyn Fn(&HeadGrads<T>) -> &Vec<T> + Sync)| -> Result<Tensor> {
        let mut buf = OutBuf::<T>::uninit(nb * t * nh * d);
        if nh * d > 0 && t > 0 {
            buf.as_mut_slice()
                .par_chunks_mut(nh * d)
                .enumerate()
                .for_each(|(bt, chunk)| {
                    let (b, row) = (bt / t, bt % t);
                    for h in 0..nh {
                        let src = pick(&heads[b * nh + h]);
                        chunk[h * d..(h + 1) * d].copy_from_slice(&src[row * d..(row + 1) * d]);
                    }
                });
        }
        buf.finish(&[nb, t, nh, d], None)
    };
    Ok((
        scatter(tq, &|x| &x.dq)?,
        scatter(tk, &|x| &x.dk)?,
        scatter(tk, &|x| &x.dv)?,
    ))
}

/// The per-head gradients (dq [Tq, D], dk and dv [Tk, D] of each (b, h), index b * H + h).
#[allow(clippy::too_many_arguments)]
fn backward_heads<T: Kern>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    p: &AttnParams,
    dims: Dims,
    simd: bool,
) -> Result<Vec<HeadGrads<T>>> {
    let nh = dims.h;
    let (qc, kc, vc, oc, gc) = (
        readable(q)?,
        readable(k)?,
        readable(v)?,
        readable(out)?,
        readable(g)?,
    );
    let lc = lse.contiguous()?;
    let lse_data = lc.cpu_data::<T>()?;
    let (gq, gk, gv, go, gg) = (
        qc.storage()?,
        kc.storage()?,
        vc.storage()?,
        oc.storage()?,
        gc.storage()?,
    );
    let cx = BwdCx {
        q: src::<T>(&qc, &gq)?,
        k: src::<T>(&kc, &gk)?,
        v: src::<T>(&vc, &gv)?,
        o: src::<T>(&oc, &go)?,
        g: src::<T>(&gc, &gg)?,
        lse: &lse_data,
        p,
        dims,
    };
    let parallel = work(dims) >= PAR_MIN_WORK;
    Ok(map_tasks(dims.b * nh, parallel, |bh| {
        bwd_head(&cx, bh / nh, bh % nh, simd)
    }))
}

fn bwd_head<T: Kern>(cx: &BwdCx<T>, b: usize, h: usize, simd: bool) -> HeadGrads<T> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when the CPU reports AVX2 and FMA (simd_ok).
        return unsafe { bwd_head_avx2(cx, b, h) };
    }
    let _ = simd;
    bwd_head_impl::<T, false>(cx, b, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_head_avx2<T: Kern>(cx: &BwdCx<T>, b: usize, h: usize) -> HeadGrads<T> {
    bwd_head_impl::<T, true>(cx, b, h)
}

/// All gradients of head (b, h): for each key block (in order), for each query tile that sees
/// it: P = exp(S - lse), dV += Pᵀ dO, dS = P ⊙ (dO Vᵀ - D), dK += dSᵀ Q·scale, dQ += dS K
/// (times scale at the end); D_i = rowsum(dO ⊙ O).
#[inline(always)]
fn bwd_head_impl<T: Kern, const F: bool>(cx: &BwdCx<T>, b: usize, h: usize) -> HeadGrads<T> {
    let Dims {
        tq, tk, h: nh, d, ..
    } = cx.dims;
    let skip = cx.p.key_skip.get(b).copied().unwrap_or(0);
    let sc = T::from_f64(cx.p.scale);
    let mut qs = vec![T::ZERO; tq * d];
    let mut dos = vec![T::ZERO; tq * d];
    let mut di = vec![T::ZERO; tq];
    for i in 0..tq {
        for (o, &x) in qs[i * d..(i + 1) * d].iter_mut().zip(cx.q.row(b, i, h, d)) {
            *o = x * sc;
        }
        let gr = cx.g.row(b, i, h, d);
        dos[i * d..(i + 1) * d].copy_from_slice(gr);
        di[i] = lane_dot::<T, F>(gr, cx.o.row(b, i, h, d));
    }
    let lse = &cx.lse[(b * nh + h) * tq..(b * nh + h + 1) * tq];
    let rr: Vec<KeyRanges> = (0..tq)
        .map(|i| visible_ranges(cx.p.pattern, cx.p.q_start + i, skip))
        .collect();
    let tile_segs: Vec<Vec<(usize, usize)>> = rr.chunks(BR).map(union_segments).collect();
    let mut dq = vec![T::ZERO; tq * d];
    let mut dk = vec![T::ZERO; tk * d];
    let mut dv = vec![T::ZERO; tk * d];
    let mut kt = vec![T::ZERO; d * BC];
    let mut vt = vec![T::ZERO; d * BC];
    let mut pb = vec![T::ZERO; BR * BC];
    let mut ds = vec![T::ZERO; BR * BC];
    let mut vis = vec![KeyRanges::EMPTY; BR];
    let mut spans = Vec::with_capacity(BR.div_ceil(MR));
    let mut c0 = 0;
    while c0 < tk {
        let c1 = (c0 + BC).min(tk);
        let nc = c1 - c0;
        let seen = |segs: &Vec<(usize, usize)>| segs.iter().any(|&(a, e)| a < c1 && e > c0);
        if !tile_segs.iter().any(seen) {
            c0 = c1;
            continue;
        }
        load_transposed(&cx.k, (b, h, c0, nc, d), &mut kt);
        load_transposed(&cx.v, (b, h, c0, nc, d), &mut vt);
        for (tile, segs) in tile_segs.iter().enumerate() {
            if !seen(segs) {
                continue;
            }
            let r0 = tile * BR;
            let m = BR.min(tq - r0);
            for (v, r) in vis.iter_mut().zip(&rr[r0..r0 + m]) {
                *v = r.clip(c0, c1);
            }
            // the box of rows x keys that holds every visible pair of this tile and block
            let Some(r_lo) = vis[..m].iter().position(|v| v.len > 0) else {
                continue;
            };
            let r_hi = m - vis[..m].iter().rev().position(|v| v.len > 0).unwrap_or(0);
            let live = || vis[r_lo..r_hi].iter().filter(|v| v.len > 0);
            let k_lo = live().map(|v| v.ranges[0].0).min().unwrap_or(0);
            let k_hi = live().map(|v| v.ranges[v.len - 1].1).max().unwrap_or(0);
            group_spans(&vis[..m], nc, &mut spans);
            // P = exp(S - lse), zero where not visible
            group_scores::<T, F>(&spans, (m, d), (&qs, r0 * d), (&kt, 0, BC), &mut pb);
            for (i, v) in vis[..m].iter().enumerate() {
                let prow = &mut pb[i * BC..i * BC + nc];
                let li = lse[r0 + i];
                let mut prev = 0;
                for &(x0, x1) in v.as_slice() {
                    prow[prev..x0].fill(T::ZERO);
                    for x in &mut prow[x0..x1] {
                        *x = (*x - li).exp_k();
                    }
                    prev = x1;
                }
                prow[prev..].fill(T::ZERO);
            }
            // dV += Pᵀ dO over the box
            gemm::<T, F>(
                (k_hi - k_lo, d, r_hi - r_lo),
                (&pb, r_lo * BC + k_lo, 1, BC),
                (&dos, (r0 + r_lo) * d, d),
                (&mut dv[(c0 + k_lo) * d..], d),
                true,
            );
            // dP = dO Vᵀ (group spans only), then dS = P ⊙ (dP - D); where P is 0, dP was not
            // computed (stale), so dS is set to 0 by selection rather than by the product
            group_scores::<T, F>(&spans, (m, d), (&dos, r0 * d), (&vt, 0, BC), &mut ds);
            for i in 0..m {
                let dii = di[r0 + i];
                for (x, &pv) in ds[i * BC..i * BC + nc]
                    .iter_mut()
                    .zip(&pb[i * BC..i * BC + nc])
                {
                    *x = if pv == T::ZERO {
                        T::ZERO
                    } else {
                        pv * (*x - dii)
                    };
                }
            }
            // dK += dSᵀ (Q scale) over the box;  dQ += dS K per group span
            gemm::<T, F>(
                (k_hi - k_lo, d, r_hi - r_lo),
                (&ds, r_lo * BC + k_lo, 1, BC),
                (&qs, (r0 + r_lo) * d, d),
                (&mut dk[(c0 + k_lo) * d..], d),
                true,
            );
            let kb = cx.k.base(b, c0, h);
            for (g, sp) in spans.iter().enumerate() {
                if let Some(sp) = sp {
                    let g0 = g * MR;
                    gemm::<T, F>(
                        (MR.min(m - g0), d, sp.hi - sp.lo),
                        (&ds, g0 * BC + sp.lo, BC, 1),
                        (cx.k.data, kb + sp.lo * cx.k.st, cx.k.st),
                        (&mut dq[(r0 + g0) * d..], d),
                        true,
                    );
                }
            }
        }
        c0 = c1;
    }
    for x in &mut dq {
        *x *= sc;
    }
    HeadGrads { dq, dk, dv }
}

// ------------------------------------------------- fused qkv + RoPE + attention

/// Attention straight from a fused projection: `qkv [B, T, 3, H, D]` (q | k | v, the layout of
/// the model's QKV linear viewed 5-d; any strides with a unit last one), RoPE (rotate-half,
/// `freqs`) applied to q and k at positions `pos` (u32 `[T]` or `[B, T]`), then
/// `attention(rope(q), rope(k), v, p)` -> out [B, T, H, D]. The same values as the composed ops;
/// the difference is the backward: it writes dq, dk (rotated back) and dv into ONE
/// [B, T, 3, H, D] gradient, where the composed ops pay two rope backwards and three
/// zero-filled narrow gradients [B, T, 3, H, D] summed by the tape.
pub fn rope_attention(
    qkv: &Tensor,
    pos: &Tensor,
    freqs: &crate::rope::RopeFreqs,
    p: &AttnParams,
) -> Result<Tensor> {
    ensure!(
        qkv.rank() == 5 && qkv.shape()[2] == 3,
        "rope_attention: qkv must be [B, T, 3, H, D], got {:?}",
        qkv.shape()
    );
    if let Some(on) = bridge::device_of("rope_attention", &[qkv, pos])? {
        return rope_attention_on(&on, qkv, pos, freqs, p);
    }
    let dt = float_dtype("rope_attention", &[qkv])?;
    let (q, k, v) = {
        let _g = kf_engine::autograd::no_grad();
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
        (
            crate::rope::rope(&part(0)?, pos, freqs)?,
            crate::rope::rope(&part(1)?, pos, freqs)?,
            part(2)?,
        )
    };
    let dims = validate(&q, &k, &v, p)?;
    crate::dispatch_float!(
        "rope_attention",
        dt,
        rope_attention_t::<T>(qkv, pos, freqs, p, (q, k, v), dims)
    )
}

/// [`attention`] on a kernel device: q `[B, Tq, H, D]`, k and v `[B, Tk, H, D]` (views read
/// in place where the kernels can, see [`DevOperands`]).
fn attention_on(
    on: &bridge::OnDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
) -> Result<launch::AttnOut> {
    let o = DevOperands::new(q, k, v)?;
    launch::attention(
        &*on.dev,
        o.view(0),
        o.view(1),
        o.view(2),
        o.dims,
        p,
        launch::AttnPath::Auto,
    )
}

/// q, k, v as the attention kernels read them — buffers and the strides of B, T, H, without a
/// copy where the layout allows (the rows of a KV cache) — and their dims, after the shape
/// and dtype checks.
struct DevOperands {
    parts: [(Arc<crate::kdev::DeviceBuf>, [usize; 3]); 3],
    dims: launch::AttnDims,
}

impl DevOperands {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<DevOperands> {
        ensure!(
            q.rank() == 4 && k.rank() == 4 && v.rank() == 4,
            "attention: q, k, v must be [B, T, H, D], got {:?} {:?} {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
        let [b, tq, h, d] = q.shape().try_into().expect("rank 4 checked");
        ensure!(
            k.shape() == v.shape() && k.shape()[0] == b && k.shape()[2] == h && k.shape()[3] == d,
            "attention: k {:?} and v {:?} do not fit q {:?}",
            k.shape(),
            v.shape(),
            q.shape()
        );
        for (what, t) in [("q", q), ("k", k), ("v", v)] {
            ensure!(
                t.dtype() == kf_engine::DType::F32,
                "attention: {what} is {}, expected f32",
                t.dtype()
            );
        }
        let tk = k.shape()[1];
        Ok(DevOperands {
            parts: [
                bridge::attn_operand(q)?,
                bridge::attn_operand(k)?,
                bridge::attn_operand(v)?,
            ],
            dims: launch::AttnDims { b, h, d, tq, tk },
        })
    }
    fn view(&self, i: usize) -> launch::AttnView<'_> {
        launch::AttnView {
            buf: &self.parts[i].0,
            strides: self.parts[i].1,
        }
    }
}

/// The attention gradients on a kernel device: q, k, v read as (strided) views, the
/// forward's output `out`, its `lse [B, H, Tq]` and the output gradient `g`.
fn attention_bwd_on(
    on: &bridge::OnDevice,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    p: &AttnParams,
) -> Result<launch::AttnGrads> {
    let o = DevOperands::new(q, k, v)?;
    launch::attention_bwd(
        &*on.dev,
        o.view(0),
        o.view(1),
        o.view(2),
        &bridge::dt(out)?,
        &bridge::dt(lse)?,
        &bridge::dt(g)?,
        o.dims,
        p,
    )
}

/// [`rope_attention`] on a kernel device: the RoPE tables of `pos`, q roped straight from the
/// qkv buffer (a strided view at offset 0), k and v copied out row by row (the launchers take
/// views at offset 0 only), then the attention kernels.
fn rope_attention_on(
    on: &bridge::OnDevice,
    qkv: &Tensor,
    pos: &Tensor,
    freqs: &crate::rope::RopeFreqs,
    p: &AttnParams,
) -> Result<Tensor> {
    let dev = &*on.dev;
    let [b, t, _, h, d] = qkv.shape().try_into().expect("rank 5 checked");
    ensure!(
        pos.shape() == [t] || pos.shape() == [b, t],
        "rope_attention: positions must be [T] or [B, T] = [{b}, {t}], got {:?}",
        pos.shape()
    );
    let x = bridge::dt(qkv)?;
    let pos_t = pos;
    let pos = bridge::dt(&pos.reshape(&[pos.numel()])?)?;
    let (cos, sin) = crate::rope::launch::rope_tables(dev, &pos, d, freqs)?;
    let strides = [t * 3 * h * d, 3 * h * d, d];
    let rope_part = |i: usize| {
        crate::rope::launch::rope_view(dev, &x.buf, i * h * d, [b, t, h, d], strides, &cos, &sin)
    };
    let (q, k) = (rope_part(0)?, rope_part(1)?);
    // v gathered out of the packed rows in one strided copy
    let v = {
        let _g = kf_engine::no_grad();
        bridge::dt(&qkv.narrow(2, 2, 1)?.contiguous()?.reshape(&[b, t, h, d])?)?
    };
    let dims = launch::AttnDims {
        b,
        h,
        d,
        tq: t,
        tk: t,
    };
    let out = launch::attention(
        dev,
        launch::AttnView::contiguous(&q)?,
        launch::AttnView::contiguous(&k)?,
        launch::AttnView::contiguous(&v)?,
        dims,
        p,
        launch::AttnPath::Auto,
    )?;
    if !kf_engine::autograd::should_record(&[qkv]) {
        return bridge::back(on, out.o);
    }
    let node = Arc::new(RopeAttentionBackward {
        qkv: qkv.clone(),
        q: bridge::back(on, q)?,
        k: bridge::back(on, k)?,
        lse: bridge::back(on, out.lse)?,
        pos: pos_t.clone(),
        freqs: freqs.clone(),
        params: p.clone(),
    });
    Ok(bridge::back(on, out.o)?.rewrap(Some(node)))
}

fn rope_attention_t<T: Kern>(
    qkv: &Tensor,
    pos: &Tensor,
    freqs: &crate::rope::RopeFreqs,
    p: &AttnParams,
    (q, k, v): (Tensor, Tensor, Tensor),
    dims: Dims,
) -> Result<Tensor> {
    let (out, lse) = forward_raw::<T>(&q, &k, &v, p, dims, simd_ok())?;
    let node = should_record(&[qkv]).then(|| {
        Arc::new(RopeAttentionBackward {
            qkv: qkv.clone(),
            q,
            k,
            lse,
            pos: pos.clone(),
            freqs: freqs.clone(),
            params: p.clone(),
        }) as Arc<dyn BackwardOp>
    });
    out.finish(&[dims.b, dims.tq, dims.h, dims.d], node)
}

/// Saves the rotated q and k (v is read from qkv) and the lse.
struct RopeAttentionBackward {
    qkv: Tensor,
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    pos: Tensor,
    freqs: crate::rope::RopeFreqs,
    params: AttnParams,
}

impl BackwardOp for RopeAttentionBackward {
    fn name(&self) -> &'static str {
        "rope_attention"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.qkv.clone()]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let v = self.qkv.narrow(2, 2, 1)?.squeeze(2)?;
        let dims = validate(&self.q, &self.k, &v, &self.params)?;
        ensure!(
            out.shape() == self.q.shape() && g.shape() == self.q.shape(),
            "rope_attention backward: out {:?} and grad {:?} must be [B, T, H, D] = {:?}",
            out.shape(),
            g.shape(),
            self.q.shape()
        );
        if let Some(on) = bridge::device_of("rope_attention backward", &[&self.q, out, g])? {
            return Ok(vec![Some(rope_attention_bwd_on(&on, self, &v, out, g)?)]);
        }
        let dt = float_dtype("rope_attention backward", &[&self.q, out, g])?;
        let d = crate::dispatch_float!(
            "rope_attention backward",
            dt,
            rope_attention_bwd::<T>(self, &v, out, g, dims)
        )?;
        Ok(vec![Some(d)])
    }
}

/// [`RopeAttentionBackward`] on a kernel device: the attention gradients, dq and dk through
/// the inverse rotation, written with dv into one `[B, T, 3, H, D]` gradient.
fn rope_attention_bwd_on(
    on: &bridge::OnDevice,
    s: &RopeAttentionBackward,
    v: &Tensor,
    out: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let dev = &*on.dev;
    let gr = attention_bwd_on(on, (&s.q, &s.k, v), out, &s.lse, g, &s.params)?;
    let d = s.q.shape()[3];
    let pos = bridge::dt(&s.pos.reshape(&[s.pos.numel()])?)?;
    let (cos, sin) = crate::rope::launch::rope_tables(dev, &pos, d, &s.freqs)?;
    let dq = crate::rope::launch::rope_bwd(dev, &gr.dq, &cos, &sin)?;
    let dk = crate::rope::launch::rope_bwd(dev, &gr.dk, &cos, &sin)?;
    let dqkv = Tensor::zeros(s.qkv.shape(), kf_engine::DType::F32, on.device)?;
    for (i, part) in [dq, dk, gr.dv].into_iter().enumerate() {
        dqkv.narrow(2, i, 1)?
            .squeeze(2)?
            .copy_from(&bridge::back(on, part)?)?;
    }
    Ok(dqkv)
}

fn rope_attention_bwd<T: Kern>(
    s: &RopeAttentionBackward,
    v: &Tensor,
    out: &Tensor,
    g: &Tensor,
    dims: Dims,
) -> Result<Tensor> {
    let Dims {
        b: nb,
        tq,
        tk,
        h: nh,
        d,
    } = dims;
    ensure!(
        tq == tk,
        "rope_attention backward: {tq} query rows but {tk} keys"
    );
    let heads = backward_heads::<T>(&s.q, &s.k, v, out, &s.lse, g, &s.params, dims, simd_ok())?;
    // the inverse rotation (negated angles) of every position row
    let (cos, sin) = crate::rope::tables_t::<T>(&s.pos, d, &s.freqs, true)?;
    let batched = s.pos.rank() == 2;
    let half = d / 2;
    let row = nh * d;
    let mut buf = OutBuf::<T>::uninit(nb * tq * 3 * row);
    if row > 0 && tq > 0 {
        buf.as_mut_slice()
            .par_chunks_mut(3 * row)
            .enumerate()
            .for_each(|(bt, chunk)| {
                let (b, t) = (bt / tq, bt % tq);
                let pr = if batched { bt } else { t };
                let (c, sn) = (
                    &cos[pr * half..(pr + 1) * half],
                    &sin[pr * half..(pr + 1) * half],
                );
                let (cq, rest) = chunk.split_at_mut(row);
                let (ck, cv) = rest.split_at_mut(row);
                for h in 0..nh {
                    let hg = &heads[b * nh + h];
                    let r = t * d..(t + 1) * d;
                    let o = h * d..(h + 1) * d;
                    crate::rope::rotate_row(&hg.dq[r.clone()], &mut cq[o.clone()], c, sn);
                    crate::rope::rotate_row(&hg.dk[r.clone()], &mut ck[o.clone()], c, sn);
                    cv[o].copy_from_slice(&hg.dv[r]);
                }
            });
    }
    buf.finish(&[nb, tq, 3, nh, d], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_attention_matches_the_composed_ops_bit_for_bit() {
        use crate::rope::rope;
        use kf_engine::{DType, Device};
        let (b, t, h, d) = (2, 37, 2, 8);
        let n = b * t * 3 * h * d;
        let vals: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let pos = Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), &[t], Device::Cpu).unwrap();
        let p = AttnParams {
            pattern: AttnPattern::Causal,
            q_start: 0,
            scale: 0.3,
            key_skip: vec![],
        };
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::from_vec(vals.clone(), &[b, t, 3, h, d], Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
                .var();
            let seed: Vec<f64> = (0..b * t * h * d)
                .map(|i| (i as f64 * 0.11).cos())
                .collect();
            let seed = Tensor::from_vec(seed, &[b, t, h, d], Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let fused = rope_attention(&x, &pos, &crate::rope::RopeFreqs::plain(1e4), &p).unwrap();
            let part = |i: usize| x.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
            let q = rope(&part(0), &pos, &crate::rope::RopeFreqs::plain(1e4)).unwrap();
            let k = rope(&part(1), &pos, &crate::rope::RopeFreqs::plain(1e4)).unwrap();
            let composed = attention(&q, &k, &part(2), &p).unwrap();
            assert_eq!(fused.to_vec_f64().unwrap(), composed.to_vec_f64().unwrap());
            let gf = fused.backward_with(seed.clone()).unwrap();
            let gc = composed.backward_with(seed).unwrap();
            assert_eq!(
                gf.get(&x).unwrap().to_vec_f64().unwrap(),
                gc.get(&x).unwrap().to_vec_f64().unwrap()
            );
        }
        let bad = Tensor::zeros(&[1, 2, 2, 1, 4], DType::F32, Device::Cpu).unwrap();
        assert!(rope_attention(&bad, &pos, &crate::rope::RopeFreqs::plain(1e4), &p).is_err());
    }
    use kf_engine::{DType, Device};

    fn params(pattern: AttnPattern) -> AttnParams {
        AttnParams {
            pattern,
            q_start: 0,
            scale: 0.5,
            key_skip: vec![],
        }
    }

    fn t(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 7.0).collect();
        Tensor::from_vec(v, shape, Device::Cpu).unwrap()
    }

    /// A decode step's one or two query rows read K's rows directly (no transposed panels);
    /// the same rows inside a larger query set take the panel path: the same bits, f32 and
    /// f64, with padding skipped and 100 keys (two key blocks).
    #[test]
    fn direct_decode_scores_give_the_panel_path_bits() {
        let (b, tk, h, d) = (2, 100, 3, 20);
        for dt in [DType::F32, DType::F64] {
            let rnd = |n, seed| {
                Tensor::rand_uniform(&[b, n, h, d], DType::F64, seed, 0, Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
            };
            let (k, v, q) = (rnd(tk, 1), rnd(tk, 2), rnd(5, 3));
            let p = AttnParams {
                q_start: tk - 5,
                key_skip: vec![0, 7],
                ..params(AttnPattern::Causal)
            };
            let all = attention(&q, &k, &v, &p).unwrap();
            for (lo, n) in [(0, 1), (0, 2), (3, 2), (4, 1)] {
                let qs = q.narrow(1, lo, n).unwrap().contiguous().unwrap();
                let pn = AttnParams {
                    q_start: p.q_start + lo,
                    ..p.clone()
                };
                let one = attention(&qs, &k, &v, &pn).unwrap();
                let want = all.narrow(1, lo, n).unwrap().contiguous().unwrap();
                assert_eq!(
                    one.to_vec_f64().unwrap(),
                    want.to_vec_f64().unwrap(),
                    "{dt} rows {lo}..+{n}"
                );
            }
        }
    }

    #[test]
    fn key_ranges_follow_section_5() {
        let s = AttnPattern::Staircase { n: 3, k: 2 };
        let r = |p, row| key_ranges(p, row).as_slice().to_vec();
        assert_eq!(r(s, 0), vec![(0, 1)]);
        assert_eq!(r(s, 2), vec![(0, 3)]);
        assert_eq!(r(s, 3), vec![(0, 1), (3, 4)]); // (t=0, i=1)
        assert_eq!(r(s, 4), vec![(0, 1), (3, 5)]); // (0, 2)
        assert_eq!(r(s, 8), vec![(0, 3), (7, 9)]); // (2, 2)
                                                   // a second block of hints (M = 2 noise windows): the same windows over the same context
        assert_eq!(r(s, 9), vec![(0, 1), (9, 10)]); // (block 1, t=0, i=1)
        assert_eq!(r(s, 14), vec![(0, 3), (13, 15)]); // (block 1, 2, 2)
        let dd = AttnPattern::DoubleStaircase { n: 2, k: 2 };
        // [ctx 0,1 | F1 (0,1) (0,2) (1,1) (1,2) = 2..6 | F2 (0,1) (0,2) (1,1) (1,2) = 6..10]
        assert_eq!(r(dd, 5), vec![(0, 2), (4, 6)]);
        assert_eq!(r(dd, 6), vec![(0, 1), (2, 4), (6, 7)]);
        assert_eq!(r(dd, 9), vec![(0, 2), (4, 6), (8, 10)]);
        assert_eq!(r(dd, 10), vec![]);
        assert_eq!(r(AttnPattern::Causal, 4), vec![(0, 5)]);
        assert_eq!(r(AttnPattern::Staircase { n: 2, k: 0 }, 2), vec![]);
        assert_eq!(r(AttnPattern::Causal, usize::MAX), vec![(0, usize::MAX)]);
        assert_eq!(key_ranges(dd, 9).count(), 6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q = t(&[1, 4, 2, 3]);
        let p = params(AttnPattern::Causal);
        let err = |q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams| {
            attention(q, k, v, p).unwrap_err().to_string()
        };
        assert!(attention(&q, &q, &q, &p).is_ok());
        assert!(err(&t(&[4, 2, 3]), &q, &q, &p).contains("[B, T, H, D]"));
        assert!(err(&q, &t(&[1, 4, 2, 2]), &t(&[1, 4, 2, 2]), &p).contains("head dim"));
        assert!(err(&q, &q, &t(&[1, 5, 2, 3]), &p).contains("k and v"));
        assert!(err(&q, &t(&[1, 3, 2, 3]), &t(&[1, 3, 2, 3]), &p).contains("exceed Tk"));
        let mut ps = p.clone();
        ps.q_start = 1;
        assert!(err(&q, &q, &q, &ps).contains("exceed Tk"));
        ps.q_start = usize::MAX;
        assert!(err(&q, &q, &q, &ps).contains("overflows"));
        let st = params(AttnPattern::Staircase { n: 2, k: 2 });
        let e = err(&q, &q, &q, &st);
        assert!(
            e.contains("N + M*N*k") && e.contains("= 6 + a multiple of N*k"),
            "{e}"
        );
        let st = params(AttnPattern::DoubleStaircase { n: 1, k: 2 });
        assert!(err(&q, &q, &q, &st).contains("N + 2*N*k = 5"));
        let huge = params(AttnPattern::Staircase {
            n: usize::MAX,
            k: 2,
        });
        assert!(err(&q, &q, &q, &huge).contains("overflows"));
        let mut sk = p.clone();
        sk.key_skip = vec![0, 1];
        assert!(err(&q, &q, &q, &sk).contains("key_skip has 2"));
        // rows inside the skipped prefix are padding (zeros), not an error; see
        // `padding_rows_inside_key_skip_are_zero`
        sk.key_skip = vec![2];
        assert!(attention(&q, &q, &q, &sk).is_ok());
        sk.key_skip = vec![0];
        sk.scale = f64::NAN;
        assert!(err(&q, &q, &q, &sk).contains("not finite"));
        let z = t(&[1, 4, 2, 0]);
        assert!(err(&z, &z, &z, &p).contains("at least 1"));
        let qi = Tensor::zeros(&[1, 4, 2, 3], DType::U32, Device::Cpu).unwrap();
        assert!(attention(&qi, &qi, &qi, &p).is_err());
        let q32 = q.to_dtype(DType::F32).unwrap();
        assert!(err(&q32, &q, &q, &p).contains("dtype"));
    }

    #[test]
    fn empty_queries_and_strided_rows() {
        let p = params(AttnPattern::Causal);
        let k = t(&[2, 3, 2, 4]);
        let q0 = t(&[2, 0, 2, 4]);
        assert_eq!(attention(&q0, &k, &k, &p).unwrap().shape(), &[2, 0, 2, 4]);
        // last dim not unit-stride: copied, same result as the contiguous input
        let x = t(&[2, 3, 4, 2]);
        let xt = x.transpose(2, 3).unwrap();
        let a = attention(&xt, &xt, &xt, &p)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        let xc = xt.contiguous().unwrap();
        let b = attention(&xc, &xc, &xc, &p)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        assert_eq!(a, b);
    }

    /// Left padding of a batched prefill: query rows before key_skip[b] see no key; they output
    /// zeros and get (and give) zero gradients, and the other rows equal the unpadded sequence.
    #[test]
    fn padding_rows_inside_key_skip_are_zero() {
        let (nb, tk, nh, d, pad) = (2, 7, 2, 3, 3);
        let shape = [nb, tk, nh, d];
        // distinct values for q, k, v and g so the check is not symmetric
        let (q, k, v, g) = (
            t(&shape).var(),
            affine(&t(&shape), 1.3, -0.1).var(),
            affine(&t(&shape), -0.9, 0.2).var(),
            affine(&t(&shape), -0.7, 0.05),
        );
        for simd in [true, false] {
            if simd && !simd_ok() {
                continue;
            }
            let mut p = params(AttnPattern::Causal);
            p.key_skip = vec![pad, 0];
            let dims = validate(&q, &k, &v, &p).unwrap();
            let (o, lse) = forward_t::<f64>(&q, &k, &v, &p, dims, simd).unwrap();
            let (dq, dk, dv) = backward_t::<f64>(&q, &k, &v, &o, &lse, &g, &p, dims, simd).unwrap();
            // batch 0 alone, without its padding rows
            let cut = |x: &Tensor| {
                x.narrow(0, 0, 1)
                    .unwrap()
                    .narrow(1, pad, tk - pad)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let p1 = params(AttnPattern::Causal);
            let (q1, k1, v1, g1) = (cut(&q), cut(&k), cut(&v), cut(&g));
            let d1 = validate(&q1, &k1, &v1, &p1).unwrap();
            let (o1, l1) = forward_t::<f64>(&q1, &k1, &v1, &p1, d1, simd).unwrap();
            let (dq1, dk1, dv1) =
                backward_t::<f64>(&q1, &k1, &v1, &o1, &l1, &g1, &p1, d1, simd).unwrap();
            for (full, alone) in [(&o, &o1), (&dq, &dq1), (&dk, &dk1), (&dv, &dv1)] {
                let head = full.narrow(0, 0, 1).unwrap().narrow(1, 0, pad).unwrap();
                assert!(head.to_vec::<f64>().unwrap().iter().all(|&x| x == 0.0));
                let a = cut(full).to_vec::<f64>().unwrap();
                let b = alone.to_vec::<f64>().unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-12, "{x} vs {y}");
                }
            }
            let lse0 = lse.narrow(0, 0, 1).unwrap().narrow(2, 0, pad).unwrap();
            assert!(lse0
                .to_vec::<f64>()
                .unwrap()
                .iter()
                .all(|&x| x == f64::NEG_INFINITY));
            // batch 1 (no padding) is the plain causal attention of its rows
            let b1 = |x: &Tensor| x.narrow(0, 1, 1).unwrap().contiguous().unwrap();
            let (o2, _) = forward_t::<f64>(
                &b1(&q),
                &b1(&k),
                &b1(&v),
                &p1,
                validate(&b1(&q), &b1(&k), &b1(&v), &p1).unwrap(),
                simd,
            )
            .unwrap();
            assert_eq!(b1(&o).to_vec::<f64>().unwrap(), o2.to_vec::<f64>().unwrap());
        }
        // through the tape as well: the public op, then backward
        let mut p = params(AttnPattern::Causal);
        p.key_skip = vec![pad, 0];
        let out = attention(&q, &k, &v, &p).unwrap();
        let grads = out.backward_with(g.clone()).unwrap();
        for x in [&q, &k, &v] {
            let gx = grads.get(x).unwrap();
            assert!(gx.to_vec::<f64>().unwrap().iter().all(|x| x.is_finite()));
            let head = gx.narrow(0, 0, 1).unwrap().narrow(1, 0, pad).unwrap();
            assert!(head.to_vec::<f64>().unwrap().iter().all(|&x| x == 0.0));
        }
    }

    fn affine(x: &Tensor, s: f64, c: f64) -> Tensor {
        let v: Vec<f64> = x
            .to_vec::<f64>()
            .unwrap()
            .iter()
            .map(|a| a * s + c)
            .collect();
        Tensor::from_vec(v, x.shape(), Device::Cpu).unwrap()
    }

    /// The AVX2 kernels and the portable ones (what a CPU without AVX2 runs) agree, forward and
    /// backward, on shapes with partial tiles and blocks.
    #[test]
    fn portable_path_matches_simd_path() {
        if !simd_ok() {
            return;
        }
        let shape = [2, 70, 2, 20];
        let mk = |seed: usize| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            Tensor::from_vec(v, &shape, Device::Cpu).unwrap()
        };
        let (q, k, v, g) = (mk(1), mk(2), mk(3), mk(4));
        for pattern in [
            AttnPattern::Causal,
            AttnPattern::Staircase { n: 14, k: 4 },
            AttnPattern::DoubleStaircase { n: 10, k: 3 },
        ] {
            let p = params(pattern);
            let dims = validate(&q, &k, &v, &p).unwrap();
            let run = |simd| {
                let (o, lse) = forward_t::<f32>(&q, &k, &v, &p, dims, simd).unwrap();
                let (dq, dk, dv) =
                    backward_t::<f32>(&q, &k, &v, &o, &lse, &g, &p, dims, simd).unwrap();
                [o, lse, dq, dk, dv].map(|t| t.to_vec::<f32>().unwrap())
            };
            let (a, b) = (run(true), run(false));
            for (x, y) in a.iter().zip(&b) {
                for (u, w) in x.iter().zip(y) {
                    assert!(
                        (u - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                        "{pattern:?}: {u} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x < 5.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert!(got <= 2e-37, "exp({x}) = {got}");
            }
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {
    use crate::attention::{AttnParams, AttnPattern};
    use crate::kdev::{f32_in, run, view_span};
    use crate::kdev::{DTensor, DeviceBuf, KArg, KernelDevice};
    use anyhow::{ensure, Result};
    use kf_engine::DType;
    use kf_kernels::attention as at;

    /// A strided `[B, T, H, D]` operand of attention: a buffer of f32 and its strides over
    /// (batch, row, head) in elements (D unit-stride), e.g. a KV cache `[B, Tmax, H, D]` of which
    /// the first Tk rows are used.
    pub struct AttnView<'a> {
        pub buf: &'a DeviceBuf,
        pub strides: [usize; 3],
    }

    impl<'a> AttnView<'a> {
        /// A contiguous `[B, T, H, D]` tensor.
        pub fn contiguous(t: &'a DTensor) -> Result<AttnView<'a>> {
            ensure!(
                t.rank() == 4,
                "attention: operand must be [B, T, H, D], got {:?}",
                t.shape()
            );
            t.expect_dtype("attention", "operand", DType::F32)?;
            let s = t.shape();
            Ok(AttnView {
                buf: &t.buf,
                strides: [s[1] * s[2] * s[3], s[2] * s[3], s[3]],
            })
        }
    }

    /// Sizes of an attention call: batch, heads, head dim, query rows, keys.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct AttnDims {
        pub b: usize,
        pub h: usize,
        pub d: usize,
        pub tq: usize,
        pub tk: usize,
    }

    /// Which kernels run the forward.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum AttnPath {
        /// Split-key decode kernels up to `kf_kernels::attention::DECODE_MAX_ROWS` query rows,
        /// the forward tiles beyond.
        Auto,
        /// The forward tiles (`attn_fwd_d*`).
        Tiles,
        /// The decode kernels with at most `max_splits` key splits (then `attn_decode_combine`).
        Decode { max_splits: usize },
    }

    /// Attention output `o [B, Tq, H, D]` and the log-sum-exp `lse [B, H, Tq]` (f32) the
    /// backward takes.
    pub struct AttnOut {
        pub o: DTensor,
        pub lse: DTensor,
    }

    /// Errors unless the attention kernels have an instance for head dim `d` (64 and 128).
    pub fn check_head_dim(d: usize) -> Result<()> {
        at::tile(at::Kernel::Fwd, d)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn pattern_code(p: AttnPattern) -> (i32, u32, u32) {
        match p {
            AttnPattern::Causal => (at::CAUSAL, 0, 0),
            AttnPattern::Staircase { n, k } => (at::STAIRCASE, n as u32, k as u32),
            AttnPattern::DoubleStaircase { n, k } => (at::DOUBLE_STAIRCASE, n as u32, k as u32),
        }
    }

    /// Checks of the CPU op that do not need the data: pattern length, query rows inside the keys,
    /// key_skip per batch row, head dim with a kernel, views inside their buffers.
    fn check_attention<D: KernelDevice + ?Sized>(
        dev: &D,
        q: &AttnView<'_>,
        k: &AttnView<'_>,
        v: &AttnView<'_>,
        dims: AttnDims,
        p: &AttnParams,
    ) -> Result<()> {
        let ctx = || {
            format!(
                "attention ({:?}, q_start {}, {dims:?})",
                p.pattern, p.q_start
            )
        };
        at::tile(at::Kernel::Fwd, dims.d).map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
        ensure!(
            p.scale.is_finite(),
            "{}: scale {} is not finite",
            ctx(),
            p.scale
        );
        ensure!(
            dims.b >= 1 && dims.h >= 1,
            "{}: B and H must be >= 1",
            ctx()
        );
        ensure!(dims.tk >= 1 || dims.tq == 0, "{}: no keys", ctx());
        ensure!(
            super::staircase_fits(p.pattern, dims.tk),
            "{}: Tk = {} does not fit the pattern (N + M*N*k keys for M >= 1 blocks of staircase \
             hints, N + 2*N*k for the double staircase)",
            ctx(),
            dims.tk
        );
        ensure!(
            p.q_start.checked_add(dims.tq).is_some_and(|e| e <= dims.tk),
            "{}: query rows {}..{} exceed Tk = {}",
            ctx(),
            p.q_start,
            p.q_start.saturating_add(dims.tq),
            dims.tk
        );
        ensure!(
            p.key_skip.is_empty() || p.key_skip.len() == dims.b,
            "{}: key_skip has {} entries, expected B = {} (or none)",
            ctx(),
            p.key_skip.len(),
            dims.b
        );
        ensure!(
            p.key_skip.iter().all(|&s| s <= u32::MAX as usize) && p.q_start <= u32::MAX as usize,
            "{}: key_skip / q_start past u32",
            ctx()
        );
        for (name, view, rows) in [("q", q, dims.tq), ("k", k, dims.tk), ("v", v, dims.tk)] {
            let span = view_span([dims.b, rows, dims.h, dims.d], view.strides);
            let have = dev.buf_bytes(view.buf) / 4;
            ensure!(
                span <= have,
                "{}: {name} [B, {rows}, H, D] with strides {:?} spans {span} f32, the buffer holds {have}",
                ctx(),
                view.strides
            );
        }
        Ok(())
    }

    /// The per-batch `key_skip` of `p` as a u32 device tensor `[B]`, or `None` when there is none.
    pub(crate) fn key_skip_tensor<D: KernelDevice + ?Sized>(
        dev: &D,
        p: &AttnParams,
        b: usize,
    ) -> Result<Option<DTensor>> {
        if p.key_skip.is_empty() {
            return Ok(None);
        }
        let s: Vec<u32> = p.key_skip.iter().map(|&s| s as u32).collect();
        Ok(Some(DTensor::from_slice(dev, &s, &[b])?))
    }

    /// The inputs every attention kernel takes first (`IN` in kf_kernels::attention): q, k, v,
    /// key_skip, their strides, Tq, Tk, q_start, the pattern code and its (n, k), the scale.
    pub(crate) fn attn_common_args<'a>(
        q: &AttnView<'a>,
        k: &AttnView<'a>,
        v: &AttnView<'a>,
        skip: Option<&'a DTensor>,
        dims: AttnDims,
        p: &AttnParams,
    ) -> Vec<KArg<'a>> {
        let (kind, pn, pk) = pattern_code(p.pattern);
        let mut args: Vec<KArg<'a>> = vec![
            KArg::Buf(q.buf),
            KArg::Buf(k.buf),
            KArg::Buf(v.buf),
            skip.map_or(KArg::Null, |s| KArg::Buf(&s.buf)),
        ];
        for s in [q.strides, k.strides, v.strides] {
            args.extend(s.iter().map(|&x| KArg::U64(x as u64)));
        }
        args.extend([
            KArg::U32(dims.tq as u32),
            KArg::U32(dims.tk as u32),
            KArg::U32(p.q_start as u32),
            KArg::I32(kind),
            KArg::U32(pn),
            KArg::U32(pk),
            KArg::F32(p.scale as f32),
        ]);
        args
    }

    /// Attention forward over key-range patterns (causal, staircase, double staircase, `q_start`,
    /// `key_skip`) on the attention kernels: the 64-row forward tiles, or the split-key decode
    /// kernels and their combine (`path`). Head dims 64 and 128 only (others: an error).
    pub fn attention<D: KernelDevice + ?Sized>(
        dev: &D,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        dims: AttnDims,
        p: &AttnParams,
        path: AttnPath,
    ) -> Result<AttnOut> {
        check_attention(dev, &q, &k, &v, dims, p)?;
        let AttnDims { b, h, d, tq, tk } = dims;
        let o = DTensor::uninit(dev, &[b, tq, h, d], DType::F32)?;
        let lse = DTensor::uninit(dev, &[b, h, tq], DType::F32)?;
        if tq == 0 {
            return Ok(AttnOut { o, lse });
        }
        let skip = key_skip_tensor(dev, p, b)?;
        let mut args = attn_common_args(&q, &k, &v, skip.as_ref(), dims, p);
        let shape_err = |e: at::ShapeError| anyhow::anyhow!("{e}");
        let decode = match path {
            AttnPath::Auto => at::use_decode(tq).then_some(at::MAX_SPLITS),
            AttnPath::Tiles => None,
            AttnPath::Decode { max_splits } => Some(max_splits),
        };
        match decode {
            None => {
                let cfg = at::fwd(b, h, tq, tk, d).map_err(shape_err)?;
                args.extend([
                    KArg::Buf(&o.buf),
                    KArg::Buf(&lse.buf),
                    KArg::Null,
                    KArg::Null,
                    KArg::U32(1),
                    KArg::U32(0),
                ]);
                run(dev, &at::entry(at::Kernel::Fwd, d, "f32"), cfg, &args)?;
            }
            Some(max_splits) => {
                let plan = at::decode(b, h, tq, tk, d, max_splits).map_err(shape_err)?;
                let split = plan.nsplit > 1;
                let rows = plan.part_rows.max(1);
                let opart = DTensor::uninit(dev, &[rows, d], DType::F32)?;
                let lsepart = DTensor::uninit(dev, &[rows], DType::F32)?;
                args.extend([
                    KArg::Buf(&o.buf),
                    KArg::Buf(&lse.buf),
                    if split {
                        KArg::Buf(&opart.buf)
                    } else {
                        KArg::Null
                    },
                    if split {
                        KArg::Buf(&lsepart.buf)
                    } else {
                        KArg::Null
                    },
                    KArg::U32(plan.nsplit),
                    KArg::U32(plan.chunk),
                ]);
                run(
                    dev,
                    &at::entry(at::Kernel::Decode, d, "f32"),
                    plan.main,
                    &args,
                )?;
                if let Some(cfg) = plan.combine {
                    run(
                        dev,
                        "attn_decode_combine_f32",
                        cfg,
                        &[
                            KArg::Buf(&opart.buf),
                            KArg::Buf(&lsepart.buf),
                            KArg::Buf(&o.buf),
                            KArg::Buf(&lse.buf),
                            KArg::U32(tq as u32),
                            KArg::U32(d as u32),
                            KArg::U32(plan.nsplit),
                        ],
                    )?;
                }
            }
        }
        Ok(AttnOut { o, lse })
    }

    /// Gradients of attention `o = Attn(q, k, v)` from `go [B, Tq, H, Dh]` (contiguous), the
    /// forward's output `o` (contiguous) and `lse [B, H, Tq]`: `dq [B, Tq, H, Dh]`,
    /// `dk`, `dv [B, Tk, H, Dh]`, all contiguous. q, k, v are the forward's (strided) views.
    pub struct AttnGrads {
        pub dq: DTensor,
        pub dk: DTensor,
        pub dv: DTensor,
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        q: AttnView<'_>,
        k: AttnView<'_>,
        v: AttnView<'_>,
        o: &DTensor,
        lse: &DTensor,
        go: &DTensor,
        dims: AttnDims,
        p: &AttnParams,
    ) -> Result<AttnGrads> {
        let op = "attention_bwd";
        let AttnDims { b, h, d, tq, tk } = dims;
        f32_in(op, "o", o)?;
        f32_in(op, "lse", lse)?;
        f32_in(op, "grad", go)?;
        ensure!(
            o.shape() == [b, tq, h, d] && go.shape() == [b, tq, h, d] && lse.shape() == [b, h, tq],
            "{op}: o {:?}, grad {:?}, lse {:?} do not fit {dims:?}",
            o.shape(),
            go.shape(),
            lse.shape()
        );
        let shape_err = |e: at::ShapeError| anyhow::anyhow!("{op}: {e}");
        at::tile(at::Kernel::BwdDq, d).map_err(shape_err)?;
        ensure!(
            p.key_skip.is_empty() || p.key_skip.len() == b,
            "{op}: key_skip has {} entries, expected B = {b}",
            p.key_skip.len()
        );
        ensure!(
            p.q_start + tq <= tk,
            "{op}: query rows {}..{} exceed Tk = {tk}",
            p.q_start,
            p.q_start + tq
        );
        for (name, view, rows) in [("q", &q, tq), ("k", &k, tk), ("v", &v, tk)] {
            if b * rows * h * d == 0 {
                continue;
            }
            let s = view.strides;
            let span = (b - 1) * s[0] + (rows - 1) * s[1] + (h - 1) * s[2] + d;
            ensure!(
                span <= dev.buf_bytes(view.buf) / 4,
                "{op}: {name} view with strides {s:?} exceeds its buffer"
            );
        }
        let dq = DTensor::uninit(dev, &[b, tq, h, d], DType::F32)?;
        let dk = DTensor::uninit(dev, &[b, tk, h, d], DType::F32)?;
        let dvv = DTensor::uninit(dev, &[b, tk, h, d], DType::F32)?;
        if tq == 0 {
            // no queries: zero key / value gradients
            return Ok(AttnGrads {
                dq,
                dk: DTensor::zeros(dev, &[b, tk, h, d], DType::F32)?,
                dv: DTensor::zeros(dev, &[b, tk, h, d], DType::F32)?,
            });
        }
        let dvec = DTensor::uninit(dev, &[b, h, tq], DType::F32)?;
        run(
            dev,
            "attn_bwd_dot_f32",
            at::bwd_dot(b, h, tq),
            &[
                KArg::Buf(&o.buf),
                KArg::Buf(&go.buf),
                KArg::Buf(&dvec.buf),
                KArg::U32(b as u32),
                KArg::U32(tq as u32),
                KArg::U32(h as u32),
                KArg::U32(d as u32),
            ],
        )?;
        let skip = key_skip_tensor(dev, p, b)?;
        let common = || attn_common_args(&q, &k, &v, skip.as_ref(), dims, p);
        let mut args = common();
        args.extend([
            KArg::Buf(&go.buf),
            KArg::Buf(&lse.buf),
            KArg::Buf(&dvec.buf),
            KArg::Buf(&dq.buf),
        ]);
        run(
            dev,
            &at::entry(at::Kernel::BwdDq, d, "f32"),
            at::bwd_dq(b, h, tq, tk, d).map_err(shape_err)?,
            &args,
        )?;
        let mut args = common();
        args.extend([
            KArg::Buf(&go.buf),
            KArg::Buf(&lse.buf),
            KArg::Buf(&dvec.buf),
            KArg::Buf(&dk.buf),
            KArg::Buf(&dvv.buf),
        ]);
        run(
            dev,
            &at::entry(at::Kernel::BwdDkdv, d, "f32"),
            at::bwd_dkdv(b, h, tq, tk, d).map_err(shape_err)?,
            &args,
        )?;
        Ok(AttnGrads { dq, dk, dv: dvv })
    }
}
