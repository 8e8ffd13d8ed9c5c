//! Softmax and log-softmax over the last dimension (max-subtracted, one task
//! per row). Letters: V the softmax dimension.
//! `-inf` entries get probability 0; a row with no finite entry is an error.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{float_dtype, for_each_row, row_max, sum_map, FirstBadRow};
use anyhow::{bail, ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Float, OutBuf, Tensor};
use std::sync::Arc;

/// Row length (last dimension) of a softmax-like op's input; errors on rank 0.
fn last_dim(op: &str, x: &Tensor) -> Result<usize> {
    ensure!(
        x.rank() >= 1,
        "{op}: input must have at least one dimension, got a scalar"
    );
    Ok(x.shape()[x.rank() - 1])
}

fn masked_row_error(op: &str, shape: &[usize], row: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "{op}: row {row} of input {shape:?} has no entry above -inf (a fully masked row)"
    )
}

/// Softmax over the last dimension of `x [..., V]`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("softmax", &[x])? {
        let y = launch::softmax(&*on.dev, &bridge::dt(x)?, false)?;
        return bridge::back_recorded(&on, y, &[x], || node::<f32>(x, false));
    }
    let d = float_dtype("softmax", &[x])?;
    dispatch_float!("softmax", d, softmax_t::<T>(x, false))
}

/// Log-softmax over the last dimension of `x [..., V]` (`-inf` stays `-inf`).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("log_softmax", &[x])? {
        let y = launch::softmax(&*on.dev, &bridge::dt(x)?, true)?;
        return bridge::back_recorded(&on, y, &[x], || node::<f32>(x, true));
    }
    let d = float_dtype("log_softmax", &[x])?;
    dispatch_float!("log_softmax", d, softmax_t::<T>(x, true))
}

fn softmax_t<T: Float>(x: &Tensor, log: bool) -> Result<Tensor> {
    let op = if log { "log_softmax" } else { "softmax" };
    let v = last_dim(op, x)?;
    let xc = x.contiguous()?;
    let xs = xc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(xs.len());
    if v > 0 {
        let bad = FirstBadRow::new();
        for_each_row(out.as_mut_slice(), v, |i, o| {
            let row = &xs[i * v..(i + 1) * v];
            let m = row_max(row);
            if m == T::NEG_INFINITY {
                bad.mark(i);
                o.fill(T::ZERO);
                return;
            }
            if log {
                let lse = m + sum_map(row, |a| (a - m).exp()).ln();
                for (o, &a) in o.iter_mut().zip(row) {
                    *o = a - lse;
                }
            } else {
                // exponentials written once, then scaled by 1/sum
                for (o, &a) in o.iter_mut().zip(row) {
                    *o = (a - m).exp();
                }
                let inv = T::ONE / sum_map(o, |e| e);
                for o in o.iter_mut() {
                    *o *= inv;
                }
            }
        });
        if let Some(r) = bad.get() {
            return Err(masked_row_error(op, x.shape(), r));
        }
    }
    drop(xs);
    let node = should_record(&[x]).then(|| node::<T>(x, log));
    out.finish(x.shape(), node)
}

fn node<T: Float>(x: &Tensor, log: bool) -> Arc<dyn BackwardOp> {
    Arc::new(SoftmaxBackward::<T> {
        x: x.clone(),
        log,
        _t: std::marker::PhantomData,
    })
}

/// Backward of softmax (`dx = y * (g - sum(g * y))`) and of log-softmax
/// (`dx = g - exp(y) * sum(g)`), both from the saved output `y`.
struct SoftmaxBackward<T> {
    x: Tensor,
    log: bool,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for SoftmaxBackward<T> {
    fn name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let v = last_dim(self.name(), out)?;
        if let Some(on) = bridge::device_of(self.name(), &[out, g])? {
            let dx = launch::softmax_bwd(&*on.dev, &bridge::dt(out)?, &bridge::dt(g)?, self.log)?;
            return Ok(vec![Some(bridge::back(&on, dx)?)]);
        }
        let (yc, gc) = (out.contiguous()?, g.contiguous()?);
        let (ys, gs) = (yc.cpu_data::<T>()?, gc.cpu_data::<T>()?);
        if ys.len() != gs.len() {
            bail!(
                "{} backward: gradient {:?} does not match output {:?}",
                self.name(),
                g.shape(),
                out.shape()
            );
        }
        let mut dx = OutBuf::<T>::uninit(ys.len());
        if v > 0 {
            let log = self.log;
            for_each_row(dx.as_mut_slice(), v, |i, d| {
                let y = &ys[i * v..(i + 1) * v];
                let gr = &gs[i * v..(i + 1) * v];
                if log {
                    let sg = sum_map(gr, |a| a);
                    for ((d, &yy), &gg) in d.iter_mut().zip(y).zip(gr) {
                        *d = gg - yy.exp() * sg;
                    }
                } else {
                    let mut dot = T::ZERO;
                    for (&yy, &gg) in y.iter().zip(gr) {
                        dot += yy * gg;
                    }
                    for ((d, &yy), &gg) in d.iter_mut().zip(y).zip(gr) {
                        *d = yy * (gg - dot);
                    }
                }
            });
        }
        Ok(vec![Some(dx.finish(self.x.shape(), None)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    fn t(v: &[f64], s: &[usize]) -> Tensor {
        Tensor::from_slice(v, s, Device::Cpu).unwrap()
    }

    #[test]
    fn masked_entries_and_rows() {
        let ninf = f64::NEG_INFINITY;
        let y = softmax(&t(&[0.0, ninf, 0.0], &[1, 3])).unwrap();
        assert_eq!(y.to_vec::<f64>().unwrap(), vec![0.5, 0.0, 0.5]);
        let l = log_softmax(&t(&[0.0, ninf], &[2])).unwrap();
        assert_eq!(l.to_vec::<f64>().unwrap(), vec![0.0, ninf]);
        let e = softmax(&t(&[1.0, 2.0, ninf, ninf], &[2, 2])).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        assert!(log_softmax(&t(&[ninf], &[1])).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(softmax(&Tensor::scalar(1.0f64, Device::Cpu).unwrap()).is_err());
        let u = Tensor::zeros(&[2, 3], DType::U32, Device::Cpu).unwrap();
        assert!(softmax(&u).is_err());
    }

    #[test]
    fn large_rows_sum_to_one_f32() {
        let n = 50257;
        let v: Vec<f32> = (0..2 * n)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.02)
            .collect();
        let x = Tensor::from_vec(v, &[2, n], Device::Cpu).unwrap();
        let y = softmax(&x).unwrap().to_vec::<f32>().unwrap();
        for r in 0..2 {
            let s: f64 = y[r * n..(r + 1) * n].iter().map(|&a| a as f64).sum();
            assert!((s - 1.0).abs() < 1e-5, "row {r} sums to {s}");
        }
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, same_shape, u32_fits, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::ensure;
    use kf_engine::DType;
    use kf_kernels::softmax;

    /// Softmax (or log-softmax) over the last dimension of `x [..., V]`; a row with no entry
    /// above -inf is an error naming the first such row, as in the CPU op.
    pub fn softmax<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, log: bool) -> Out {
        let op = if log { "log_softmax" } else { "softmax" };
        f32_in(op, "x", x)?;
        let (rows, v) = rows_cols(op, x)?;
        ensure!(
            v > 0,
            "{op}: the softmax dimension is empty ({:?})",
            x.shape()
        );
        ensure!(
            rows <= u32::MAX as usize && v <= u32::MAX as usize,
            "{op}: {:?} too large",
            x.shape()
        );
        let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
        if rows == 0 {
            return Ok(out);
        }
        let bad = DTensor::from_slice(dev, &[softmax::NO_BAD_ROW], &[1])?;
        run(
            dev,
            "softmax_fwd_f32",
            softmax::config(rows, v),
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&out.buf),
                KArg::U32(rows as u32),
                KArg::U32(v as u32),
                KArg::I32(log as i32),
                KArg::Buf(&bad.buf),
            ],
        )?;
        let row = bad.to_vec::<D, u32>(dev)?[0];
        ensure!(
            row == softmax::NO_BAD_ROW,
            "{op}: row {row} of input {:?} has no entry above -inf (a fully masked row)",
            x.shape()
        );
        Ok(out)
    }

    /// Gradient of softmax (or log-softmax) over the last dimension from its output `y`.
    pub fn softmax_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        y: &DTensor,
        g: &DTensor,
        log: bool,
    ) -> Out {
        let op = "softmax_bwd";
        f32_in(op, "y", y)?;
        f32_in(op, "grad", g)?;
        same_shape(op, y, g)?;
        let (rows, v) = rows_cols(op, y)?;
        u32_fits(op, &[rows, v])?;
        let out = DTensor::uninit(dev, y.shape(), DType::F32)?;
        if rows == 0 || v == 0 {
            return Ok(out);
        }
        run(
            dev,
            "softmax_bwd_f32",
            softmax::config(rows, v),
            &[
                KArg::Buf(&y.buf),
                KArg::Buf(&g.buf),
                KArg::Buf(&out.buf),
                KArg::U32(rows as u32),
                KArg::U32(v as u32),
                KArg::I32(log as i32),
            ],
        )?;
        Ok(out)
    }
}
