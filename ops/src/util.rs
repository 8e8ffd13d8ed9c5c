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
            "{op}: only the CPU backend is built"
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
#[inline]
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

/// Maximum of a row (NaN entries are skipped; `-inf` for an empty row).
#[inline]
pub(crate) fn row_max<T: Float>(row: &[T]) -> T {
    row.iter().fold(T::NEG_INFINITY, |m, &v| m.max(v))
}

/// `(max, sum_j exp(x_j - max))` of a row; `None` when the row has no entry
/// above `-inf` (a fully masked row).
#[inline]
pub(crate) fn row_max_sumexp<T: Float>(row: &[T]) -> Option<(T, T)> {
    let m = row_max(row);
    if m == T::NEG_INFINITY {
        return None;
    }
    Some((m, sum_map(row, |v| (v - m).exp())))
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
