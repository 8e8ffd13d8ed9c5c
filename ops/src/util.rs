//! Small helpers every op uses: dtype/device checks with errors that name the
//! op and the shapes, the f32/f64 dispatch of generic CPU kernels, and the
//! row helpers of the row-wise ops (softmax, layer norm, rope, cross-entropy).

use anyhow::{bail, ensure, Result};
use kf_engine::{DType, Device, Float, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The common compute dtype of float inputs (f32 or f64 on the CPU); errors
/// name the op when dtypes differ or are not supported.
pub fn float_dtype(op: &str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts.first().map(|t| t.dtype()).unwrap_or(DType::F32);
    for t in ts {
        ensure!(
            t.dtype() == d,
            "{op}: dtype mismatch ({} vs {})",
            d,
            t.dtype()
        );
        ensure!(
            t.device() == Device::Cpu,
            "{op} runs on the cpu only (no kernel path yet), and an input is on {}: move it \
             with to_device(Device::Cpu)",
            t.device()
        );
    }
    match d {
        DType::F32 | DType::F64 => Ok(d),
        other => bail!("{op}: the CPU kernels compute in f32 or f64, got {other} (convert with to_dtype first)"),
    }
}

/// Error unless `t` has exactly `shape`.
pub fn expect_shape(op: &str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    ensure!(
        t.shape() == shape,
        "{op}: {what} has shape {:?}, expected {shape:?}",
        t.shape()
    );
    Ok(())
}

/// Error unless `t` has rank `r`.
pub fn expect_rank(op: &str, what: &str, t: &Tensor, r: usize) -> Result<()> {
    ensure!(
        t.rank() == r,
        "{op}: {what} must have rank {r}, got shape {:?}",
        t.shape()
    );
    Ok(())
}

/// Call a generic `fn<T: Float>(..) -> Result<Tensor>` at the dtype `d`.
#[macro_export]
macro_rules! dispatch_float {
    ($op:expr, $d:expr, $f:ident :: <T> ( $($arg:expr),* $(,)? )) => {
        match $d {
            kf_engine::DType::F32 => $f::<f32>($($arg),*),
            kf_engine::DType::F64 => $f::<f64>($($arg),*),
            other => anyhow::bail!("{}: unsupported dtype {}", $op, other),
        }
    };
}

/// Below this many elements a row-wise op runs on the calling thread (rayon's
/// fork/join costs a few microseconds, more than such a kernel).
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 14;

/// Call `f(row_index, row)` for every `d`-element row of `out`, in parallel
/// when `out` is large. `d` must be > 0.
pub(crate) fn for_each_row<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    debug_assert!(d > 0);
    if out.len() >= PAR_MIN_ELEMS {
        // at least ~PAR_MIN_ELEMS/2 elements per task
        let min_rows = (PAR_MIN_ELEMS / 2).div_ceil(d).max(1);
        out.par_chunks_mut(d)
            .with_min_len(min_rows)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Sum of `f(v)` over `row`, with 8 independent accumulators (vectorisable,
/// and the rounding error grows with len/8 instead of len).
#[inline(always)]
pub(crate) fn sum_map<T: Float>(row: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = row.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    let mut tail = T::ZERO;
    for &v in rem {
        tail += f(v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Maximum of a row (NaN entries are skipped; `-inf` for an empty row). Eight lanes of
/// compare-and-select, which vectorise (a `fold` over `max` stays scalar).
#[inline(always)]
pub(crate) fn row_max<T: Float>(row: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    rem.iter()
        .chain(acc.iter())
        .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// e^x for f32 in branch-free arithmetic that the compiler vectorises (libm's expf does not):
/// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial for e^r (about
/// 1 ulp), 2^n built in the exponent bits. Inputs below -87.3 give exactly 0, inputs above
/// 88.3 give e^88.3 (finite); NaN stays NaN. (Shared by attention, GELU and cross-entropy.)
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = if x > 88.3 { 88.3 } else { x };
    let xc = if xc < -87.3 { -87.3 } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000); // n, read from t's mantissa
    let pow2 = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * pow2
    }
}

/// `exp` for the generic kernels: [`exp_f32`] for f32 (vectorisable), std's for f64 (the
/// references and gradient checks keep full precision). The type test folds at compile time.
#[inline(always)]
pub(crate) fn fast_exp<T: Float>(x: T) -> T {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // f32 -> f64 -> f32 round trips are exact and fold away
        T::from_f64(exp_f32(x.to_f64() as f32) as f64)
    } else {
        x.exp()
    }
}

/// Whether the CPU has AVX2 and FMA, so the `#[target_feature(enable = "avx2,fma")]` copies
/// of the elementwise kernels may run (they only widen the vectors: no FMA contraction, so
/// the results are bit-identical to the portable copies).
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(max, sum_j exp(x_j - max))` of a row; `None` when the row has no entry
/// above `-inf` (a fully masked row).
#[inline(always)]
pub(crate) fn row_max_sumexp<T: Float>(row: &[T]) -> Option<(T, T)> {
    let m = row_max(row);
    if m == T::NEG_INFINITY {
        return None;
    }
    Some((m, sum_exp(row, m)))
}

/// `sum_j exp(x_j - m)`, equal to `sum_map(row, |v| fast_exp(v - m))` (same accumulation
/// order): the exps are computed a block at a time into a stack buffer, a plain loop the
/// compiler vectorises (inside `sum_map`'s eight-lane body it stays scalar: about 4 ns per
/// element for f32 against 1 ns).
#[inline(always)]
pub(crate) fn sum_exp<T: Float>(row: &[T], m: T) -> T {
    const BLOCK: usize = 256; // a multiple of 8: only the last block has a tail
    let mut buf = [T::ZERO; BLOCK];
    let mut acc = [T::ZERO; 8];
    let mut tail = T::ZERO;
    for blk in row.chunks(BLOCK) {
        let e = &mut buf[..blk.len()];
        for (o, &v) in e.iter_mut().zip(blk) {
            *o = fast_exp(v - m);
        }
        let chunks = e.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                acc[k] += c[k];
            }
        }
        for &v in rem {
            tail += v;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Records the smallest failing row index seen by parallel tasks.
pub(crate) struct FirstBadRow(AtomicUsize);

impl FirstBadRow {
    pub(crate) fn new() -> Self {
        FirstBadRow(AtomicUsize::new(usize::MAX))
    }
    pub(crate) fn mark(&self, row: usize) {
        self.0.fetch_min(row, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> Option<usize> {
        let r = self.0.load(Ordering::Relaxed);
        (r != usize::MAX).then_some(r)
    }
}
