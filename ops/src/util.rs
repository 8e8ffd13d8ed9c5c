//! Small helpers every op uses: dtype/device checks with errors that name the
//! op and the shapes, and the f32/f64 dispatch of generic CPU kernels.

use anyhow::{bail, ensure, Result};
use kf_engine::{DType, Device, Tensor};

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
