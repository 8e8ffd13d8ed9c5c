//! RMSNorm over the last dimension D of `x [..., D]` with a weight `[D]` (the Llama
//! family's norm): `y = x / sqrt(mean(x²) + eps) * w`. LayerNorm without the centring and
//! the bias; 1/rms per row is saved for the backward. On a kernel device it runs LayerNorm's
//! kernels in their RMS mode (kernels/layernorm.cu, `crate::layernorm::launch`), f32.
//! Letters: R rows, D features.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_shape, float_dtype, for_each_row, sum_map};
use anyhow::{ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension (mean of squares in the
/// compute dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let op = "rms_norm";
    if let Some(on) = bridge::device_of(op, &[x, w])? {
        let o = crate::layernorm::launch::layer_norm(
            &*on.dev,
            &bridge::dt(x)?,
            &bridge::dt(w)?,
            None,
            eps as f32,
            true,
        )?;
        let rstd = bridge::back(&on, o.rstd)?;
        return bridge::back_recorded(&on, o.y, &[x, w], || {
            Arc::new(RmsNormBackward::<f32> {
                x: x.clone(),
                w: w.clone(),
                rstd,
                _t: std::marker::PhantomData,
            })
        });
    }
    let dt = float_dtype(op, &[x, w])?;
    ensure!(
        x.rank() >= 1,
        "{op}: input must have at least one dimension, got a scalar"
    );
    let d = x.shape()[x.rank() - 1];
    expect_shape(op, "weight", w, &[d])?;
    ensure!(
        eps >= 0.0 && eps.is_finite(),
        "{op}: eps must be finite and >= 0, got {eps}"
    );
    dispatch_float!(op, dt, rms_norm_t::<T>(x, w, eps))
}

fn rms_norm_t<T: Float>(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.shape()[x.rank() - 1];
    let (xc, wc) = (x.contiguous()?, w.contiguous()?);
    let (xs, ws) = (xc.cpu_data::<T>()?, wc.cpu_data::<T>()?);
    let rows = xs.len().checked_div(d).unwrap_or(0);
    let mut out = OutBuf::<T>::uninit(xs.len());
    let mut rstd = vec![T::ZERO; rows];
    if d > 0 {
        let (epst, n) = (T::from_f64(eps), T::from_usize(d));
        for (r, row) in rstd.iter_mut().zip(xs.chunks(d)) {
            *r = T::ONE / (sum_map(row, |v| v * v) / n + epst).sqrt();
        }
        let (xs, ws, rs) = (&*xs, &*ws, &rstd);
        for_each_row(out.as_mut_slice(), d, |i, o| {
            let (row, r) = (&xs[i * d..(i + 1) * d], rs[i]);
            for j in 0..d {
                o[j] = row[j] * r * ws[j];
            }
        });
    }
    drop((xs, ws));
    let node = if should_record(&[x, w]) {
        Some(Arc::new(RmsNormBackward::<T> {
            x: x.clone(),
            w: w.clone(),
            rstd: Tensor::from_cpu_op(rstd, &[rows], None)?,
            _t: std::marker::PhantomData,
        }) as Arc<dyn BackwardOp>)
    } else {
        None
    };
    out.finish(x.shape(), node)
}

/// Rows per task of the backward; also the granularity of the partial dw sums, added in a
/// fixed order (deterministic for any thread count).
const BWD_ROWS: usize = 32;

/// With `xh = x * rstd` and `dxh = g * w`: `dx = rstd * (dxh - xh * mean(dxh * xh))`,
/// `dw = sum_rows g * xh`.
struct RmsNormBackward<T> {
    x: Tensor,
    w: Tensor,
    rstd: Tensor,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for RmsNormBackward<T> {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.w.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.w.numel();
        expect_shape("rms_norm backward", "gradient", g, self.x.shape())?;
        if let Some(on) = bridge::device_of("rms_norm backward", &[&self.x, &self.w, g])? {
            let gr = crate::layernorm::launch::layer_norm_bwd(
                &*on.dev,
                &bridge::dt(&self.x)?,
                &bridge::dt(&self.w)?,
                &bridge::dt(g)?,
                None,
                &bridge::dt(&self.rstd)?,
                false,
            )?;
            return Ok(vec![
                Some(bridge::back(&on, gr.dx)?),
                Some(bridge::back(&on, gr.dw)?),
            ]);
        }
        let (xc, wc, gc) = (self.x.contiguous()?, self.w.contiguous()?, g.contiguous()?);
        let (xs, ws, gs) = (
            xc.cpu_data::<T>()?,
            wc.cpu_data::<T>()?,
            gc.cpu_data::<T>()?,
        );
        let rstd = self.rstd.cpu_data::<T>()?;
        let mut dx = OutBuf::<T>::uninit(xs.len());
        let mut dw = vec![T::ZERO; d];
        if d > 0 && !xs.is_empty() {
            let inv_d = T::ONE / T::from_usize(d);
            let (xs, ws, gs, rstd) = (&*xs, &*ws, &*gs, &*rstd);
            let block = |bi: usize, dxb: &mut [T]| -> Vec<T> {
                let mut pdw = vec![T::ZERO; d];
                for (k, dxr) in dxb.chunks_mut(d).enumerate() {
                    let i = bi * BWD_ROWS + k;
                    let (x, g, r) = (&xs[i * d..(i + 1) * d], &gs[i * d..(i + 1) * d], rstd[i]);
                    let mut s = T::ZERO;
                    for j in 0..d {
                        let xh = x[j] * r;
                        s += g[j] * ws[j] * xh;
                        pdw[j] += g[j] * xh;
                    }
                    let c = s * inv_d;
                    for j in 0..d {
                        dxr[j] = r * (g[j] * ws[j] - x[j] * r * c);
                    }
                }
                pdw
            };
            let parts: Vec<Vec<T>> = if xs.len() >= crate::util::PAR_MIN_ELEMS {
                dx.as_mut_slice()
                    .par_chunks_mut(BWD_ROWS * d)
                    .enumerate()
                    .map(|(bi, c)| block(bi, c))
                    .collect()
            } else {
                dx.as_mut_slice()
                    .chunks_mut(BWD_ROWS * d)
                    .enumerate()
                    .map(|(bi, c)| block(bi, c))
                    .collect()
            };
            for p in parts {
                for (a, b) in dw.iter_mut().zip(p) {
                    *a += b;
                }
            }
        }
        Ok(vec![
            Some(dx.finish(self.x.shape(), None)?),
            Some(Tensor::from_cpu_op(dw, &[d], None)?),
        ])
    }
}
