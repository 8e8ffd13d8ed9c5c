//! LayerNorm over the last dimension D of `x [..., D]`, with a weight `[D]`
//! and an optional bias `[D]` (the backbone uses weight only, the noise
//! encoder weight + bias). One task per row; mean and 1/std per row are saved
//! for the backward. Letters: R rows (product of the leading dims), D features.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_shape, float_dtype};
use crate::util::{for_each_row, sum_map};
use anyhow::{ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension, with the
/// biased variance (divided by D). Statistics are computed in the compute
/// dtype by a shifted two-pass method: pass 1 sums `x - x[0]` (so a large
/// common offset does not cost precision), pass 2 sums the squared deviations
/// with the usual correction term `(sum d)^2 / D`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = "layer_norm";
    let mut all = vec![x, w];
    all.extend(b);
    if let Some(on) = bridge::device_of(op, &all)? {
        let bd = b.map(bridge::dt).transpose()?;
        let o = launch::layer_norm(
            &*on.dev,
            &bridge::dt(x)?,
            &bridge::dt(w)?,
            bd.as_ref(),
            eps as f32,
            false,
        )?;
        let (mean, rstd) = (bridge::back(&on, o.mean)?, bridge::back(&on, o.rstd)?);
        return bridge::back_recorded(&on, o.y, &all, || {
            Arc::new(LayerNormBackward::<f32> {
                x: x.clone(),
                w: w.clone(),
                b: b.cloned(),
                mean,
                rstd,
                _t: std::marker::PhantomData,
            })
        });
    }
    let dt = float_dtype(op, &all)?;
    ensure!(
        x.rank() >= 1,
        "{op}: input must have at least one dimension, got a scalar"
    );
    let d = x.shape()[x.rank() - 1];
    expect_shape(op, "weight", w, &[d])?;
    if let Some(b) = b {
        expect_shape(op, "bias", b, &[d])?;
    }
    ensure!(
        eps >= 0.0 && eps.is_finite(),
        "{op}: eps must be finite and >= 0, got {eps}"
    );
    dispatch_float!(op, dt, layer_norm_t::<T>(x, w, b, eps))
}

/// Mean and 1/std of one row (shifted two-pass, see `layer_norm`).
#[inline]
fn row_stats<T: Float>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_usize(row.len());
    let k = row[0];
    let mean = k + sum_map(row, |v| v - k) / n;
    let sd = sum_map(row, |v| v - mean);
    let sdd = sum_map(row, |v| (v - mean) * (v - mean));
    let var = ((sdd - sd * sd / n) / n).max(T::ZERO);
    (mean, T::ONE / (var + eps).sqrt())
}

fn layer_norm_t<T: Float>(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let d = x.shape()[x.rank() - 1];
    let xc = x.contiguous()?;
    let wc = w.contiguous()?;
    let bc = b.map(|b| b.contiguous()).transpose()?;
    let xs = xc.cpu_data::<T>()?;
    let ws = wc.cpu_data::<T>()?;
    let bs = bc.as_ref().map(|b| b.cpu_data::<T>()).transpose()?;
    let rows = xs.len().checked_div(d).unwrap_or(0);
    let mut out = OutBuf::<T>::uninit(xs.len());
    let mut mean = vec![T::ZERO; rows];
    let mut rstd = vec![T::ZERO; rows];
    if d > 0 {
        let epst = T::from_f64(eps);
        // stats first (cheap, rows-sized), then the normalised rows
        let stats: Vec<(T, T)> = if xs.len() >= crate::util::PAR_MIN_ELEMS {
            xs.par_chunks(d).map(|r| row_stats(r, epst)).collect()
        } else {
            xs.chunks(d).map(|r| row_stats(r, epst)).collect()
        };
        for (i, &(m, r)) in stats.iter().enumerate() {
            mean[i] = m;
            rstd[i] = r;
        }
        let (ws, bs) = (&*ws, bs.as_deref());
        for_each_row(out.as_mut_slice(), d, |i, o| {
            let row = &xs[i * d..(i + 1) * d];
            let (m, r) = stats[i];
            match bs {
                Some(bs) => {
                    for j in 0..d {
                        o[j] = (row[j] - m) * r * ws[j] + bs[j];
                    }
                }
                None => {
                    for j in 0..d {
                        o[j] = (row[j] - m) * r * ws[j];
                    }
                }
            }
        });
    }
    drop((xs, ws, bs));
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let node = if should_record(&inputs) {
        Some(Arc::new(LayerNormBackward::<T> {
            x: x.clone(),
            w: w.clone(),
            b: b.cloned(),
            mean: Tensor::from_cpu_op(mean, &[rows], None)?,
            rstd: Tensor::from_cpu_op(rstd, &[rows], None)?,
            _t: std::marker::PhantomData,
        }) as Arc<dyn BackwardOp>)
    } else {
        None
    };
    out.finish(x.shape(), node)
}

/// Rows per task of the backward; also the granularity of the partial dw/db
/// sums, which are added in a fixed order (deterministic for any thread count).
const BWD_ROWS: usize = 32;

/// With `xh = (x - mean) * rstd` and `dxh = g * w`:
/// `dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))`,
/// `dw = sum_rows g * xh`, `db = sum_rows g`.
struct LayerNormBackward<T> {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    /// Per-row statistics `[rows]` of the forward, on its device.
    mean: Tensor,
    rstd: Tensor,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for LayerNormBackward<T> {
    fn name(&self) -> &'static str {
        "layer_norm"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone(), self.w.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let d = self.w.numel();
        expect_shape("layer_norm backward", "gradient", g, self.x.shape())?;
        if let Some(on) = bridge::device_of("layer_norm backward", &[&self.x, &self.w, g])? {
            let gr = launch::layer_norm_bwd(
                &*on.dev,
                &bridge::dt(&self.x)?,
                &bridge::dt(&self.w)?,
                &bridge::dt(g)?,
                Some(&bridge::dt(&self.mean)?),
                &bridge::dt(&self.rstd)?,
                self.b.is_some(),
            )?;
            let mut grads = vec![
                Some(bridge::back(&on, gr.dx)?),
                Some(bridge::back(&on, gr.dw)?),
            ];
            if let Some(db) = gr.db {
                grads.push(Some(bridge::back(&on, db)?));
            }
            return Ok(grads);
        }
        let (xc, wc, gc) = (self.x.contiguous()?, self.w.contiguous()?, g.contiguous()?);
        let (xs, ws, gs) = (
            xc.cpu_data::<T>()?,
            wc.cpu_data::<T>()?,
            gc.cpu_data::<T>()?,
        );
        let (mean, rstd) = (self.mean.cpu_data::<T>()?, self.rstd.cpu_data::<T>()?);
        let mut dx = OutBuf::<T>::uninit(xs.len());
        let mut dw = vec![T::ZERO; d];
        let mut db = vec![T::ZERO; d];
        if d > 0 && !xs.is_empty() {
            let inv_d = T::ONE / T::from_usize(d);
            let (xs, ws, gs) = (&*xs, &*ws, &*gs);
            // one block of BWD_ROWS rows: writes its dx rows, returns partial (dw, db)
            let block = |bi: usize, dxb: &mut [T]| -> (Vec<T>, Vec<T>) {
                let mut pdw = vec![T::ZERO; d];
                let mut pdb = vec![T::ZERO; d];
                let mut dxh = vec![T::ZERO; d];
                for (k, dxr) in dxb.chunks_mut(d).enumerate() {
                    let i = bi * BWD_ROWS + k;
                    let (x, g) = (&xs[i * d..(i + 1) * d], &gs[i * d..(i + 1) * d]);
                    let (m, r) = (mean[i], rstd[i]);
                    let (mut s1, mut s2) = (T::ZERO, T::ZERO);
                    for j in 0..d {
                        let xh = (x[j] - m) * r;
                        dxh[j] = g[j] * ws[j];
                        s1 += dxh[j];
                        s2 += dxh[j] * xh;
                        pdw[j] += g[j] * xh;
                        pdb[j] += g[j];
                    }
                    let (c1, c2) = (s1 * inv_d, s2 * inv_d);
                    for j in 0..d {
                        let xh = (x[j] - m) * r;
                        dxr[j] = r * (dxh[j] - c1 - xh * c2);
                    }
                }
                (pdw, pdb)
            };
            let parts: Vec<(Vec<T>, Vec<T>)> = if xs.len() >= crate::util::PAR_MIN_ELEMS {
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
            for (pdw, pdb) in parts {
                for j in 0..d {
                    dw[j] += pdw[j];
                    db[j] += pdb[j];
                }
            }
        }
        let dx = dx.finish(self.x.shape(), None)?;
        let dw = Tensor::from_cpu_op(dw, &[d], None)?;
        let mut grads = vec![Some(dx), Some(dw)];
        if self.b.is_some() {
            grads.push(Some(Tensor::from_cpu_op(db, &[d], None)?));
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::Device;

    fn t(v: &[f64], s: &[usize]) -> Tensor {
        Tensor::from_slice(v, s, Device::Cpu).unwrap()
    }

    #[test]
    fn shape_and_dtype_errors() {
        let x = t(&[1.0; 6], &[2, 3]);
        assert!(layer_norm(&x, &t(&[1.0; 2], &[2]), None, 1e-5).is_err());
        let b = t(&[0.0; 4], &[4]);
        let e = layer_norm(&x, &t(&[1.0; 3], &[3]), Some(&b), 1e-5).unwrap_err();
        assert!(e.to_string().contains("bias"), "{e}");
        let w32 = t(&[1.0; 3], &[3]).to_dtype(kf_engine::DType::F32).unwrap();
        assert!(layer_norm(&x, &w32, None, 1e-5).is_err());
        assert!(layer_norm(
            &Tensor::scalar(1.0f64, Device::Cpu).unwrap(),
            &w32,
            None,
            1e-5
        )
        .is_err());
        assert!(layer_norm(&x, &t(&[1.0; 3], &[3]), None, f64::NAN).is_err());
    }

    #[test]
    fn constant_rows_and_offsets() {
        // a constant row normalises to 0 (then + bias), not NaN
        let x = t(&[5.0, 5.0, 5.0], &[1, 3]);
        let y = layer_norm(
            &x,
            &t(&[2.0; 3], &[3]),
            Some(&t(&[1.0, 2.0, 3.0], &[3])),
            1e-5,
        )
        .unwrap();
        assert_eq!(y.to_vec::<f64>().unwrap(), vec![1.0, 2.0, 3.0]);
        // a large common offset in f32 does not ruin the statistics
        let v: Vec<f32> = (0..768)
            .map(|j| 1.0e4 + ((j * 37) % 11) as f32 - 5.0)
            .collect();
        let x = Tensor::from_vec(v, &[1, 768], Device::Cpu).unwrap();
        let w = Tensor::ones(&[768], kf_engine::DType::F32, Device::Cpu).unwrap();
        let y = layer_norm(&x, &w, None, 0.0)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let m: f64 = y.iter().map(|&a| a as f64).sum::<f64>() / 768.0;
        let v: f64 = y.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / 768.0;
        assert!(
            m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4,
            "mean {m}, var {v}"
        );
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, same_shape, u32_fits};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::{ensure, Result};
    use kf_engine::DType;
    use kf_kernels::{layernorm, layernorm_bwd};

    /// LayerNorm output and the saved statistics (per row, f32) the backward takes.
    pub struct LayerNormOut {
        pub y: DTensor,
        pub mean: DTensor,
        pub rstd: DTensor,
    }

    /// LayerNorm over the last dimension of `x [..., D]` with weight `[D]` and optional bias
    /// `[D]`; with `rms`, RMSNorm (no centring, no bias; `mean` comes back as zeros).
    pub fn layer_norm<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        w: &DTensor,
        b: Option<&DTensor>,
        eps: f32,
        rms: bool,
    ) -> Result<LayerNormOut> {
        let op = if rms { "rms_norm" } else { "layer_norm" };
        ensure!(!(rms && b.is_some()), "{op}: RMSNorm takes no bias");
        f32_in(op, "x", x)?;
        f32_in(op, "weight", w)?;
        let (rows, d) = rows_cols(op, x)?;
        ensure!(
            d > 0,
            "{op}: the normalised dimension is empty ({:?})",
            x.shape()
        );
        ensure!(
            w.shape() == [d],
            "{op}: weight {:?} must be [{d}]",
            w.shape()
        );
        if let Some(b) = b {
            f32_in(op, "bias", b)?;
            ensure!(b.shape() == [d], "{op}: bias {:?} must be [{d}]", b.shape());
        }
        ensure!(
            eps.is_finite() && eps >= 0.0,
            "{op}: eps {eps} must be finite and >= 0"
        );
        ensure!(
            rows <= u32::MAX as usize && d <= u32::MAX as usize,
            "{op}: {:?} too large",
            x.shape()
        );
        let y = DTensor::uninit(dev, x.shape(), DType::F32)?;
        let mean = DTensor::uninit(dev, &[rows], DType::F32)?;
        let rstd = DTensor::uninit(dev, &[rows], DType::F32)?;
        if rows > 0 {
            let (cfg, cached) = layernorm::config(rows, d);
            run(
                dev,
                "layernorm_fwd_f32",
                cfg,
                &[
                    KArg::Buf(&x.buf),
                    KArg::Buf(&w.buf),
                    b.map_or(KArg::Null, |b| KArg::Buf(&b.buf)),
                    KArg::Buf(&y.buf),
                    KArg::Buf(&mean.buf),
                    KArg::Buf(&rstd.buf),
                    KArg::U32(rows as u32),
                    KArg::U32(d as u32),
                    KArg::F32(eps),
                    KArg::I32(cached as i32),
                    KArg::I32(rms as i32),
                ],
            )?;
        }
        Ok(LayerNormOut { y, mean, rstd })
    }

    /// Gradients of LayerNorm over the last dimension: `dx` (shape of x), `dw [D]`, `db [D]`
    /// (when `bias`), from the forward's saved per-row `mean` and `rstd`; without `mean`, of
    /// RMSNorm.
    pub struct LayerNormGrads {
        pub dx: DTensor,
        pub dw: DTensor,
        pub db: Option<DTensor>,
    }

    pub fn layer_norm_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        w: &DTensor,
        g: &DTensor,
        mean: Option<&DTensor>,
        rstd: &DTensor,
        bias: bool,
    ) -> Result<LayerNormGrads> {
        let op = if mean.is_some() {
            "layer_norm_bwd"
        } else {
            "rms_norm_bwd"
        };
        ensure!(mean.is_some() || !bias, "{op}: RMSNorm has no bias");
        for (what, t) in [("x", x), ("weight", w), ("grad", g), ("rstd", rstd)]
            .into_iter()
            .chain(mean.map(|m| ("mean", m)))
        {
            f32_in(op, what, t)?;
        }
        same_shape(op, x, g)?;
        let (rows, d) = rows_cols(op, x)?;
        ensure!(d > 0, "{op}: the normalised dimension is empty");
        ensure!(
            w.shape() == [d],
            "{op}: weight {:?} must be [{d}]",
            w.shape()
        );
        ensure!(
            mean.is_none_or(|m| m.shape() == [rows]) && rstd.shape() == [rows],
            "{op}: mean {:?} / rstd {:?} must be [{rows}]",
            mean.map(|m| m.shape()),
            rstd.shape()
        );
        u32_fits(op, &[rows, d])?;
        let dx = DTensor::uninit(dev, x.shape(), DType::F32)?;
        let dw = DTensor::uninit(dev, &[d], DType::F32)?;
        let db = if bias {
            Some(DTensor::uninit(dev, &[d], DType::F32)?)
        } else {
            None
        };
        if rows == 0 {
            // no rows: zero weight gradients
            let z = DTensor::zeros(dev, &[d], DType::F32)?;
            return Ok(LayerNormGrads {
                dx,
                dw: z,
                db: if bias {
                    Some(DTensor::zeros(dev, &[d], DType::F32)?)
                } else {
                    None
                },
            });
        }
        run(
            dev,
            "layernorm_bwd_dx_f32",
            layernorm_bwd::dx_config(rows, d),
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&w.buf),
                KArg::Buf(&g.buf),
                mean.map_or(KArg::Null, |m| KArg::Buf(&m.buf)),
                KArg::Buf(&rstd.buf),
                KArg::Buf(&dx.buf),
                KArg::U32(rows as u32),
                KArg::U32(d as u32),
            ],
        )?;
        let (cfg, chunk, k) = layernorm_bwd::dwdb_config(rows, d);
        let direct = k == 1;
        let (pw, pb) = if direct {
            (None, None)
        } else {
            (
                Some(DTensor::uninit(dev, &[k as usize, d], DType::F32)?),
                if bias {
                    Some(DTensor::uninit(dev, &[k as usize, d], DType::F32)?)
                } else {
                    None
                },
            )
        };
        let tw = pw.as_ref().unwrap_or(&dw);
        let tb = if direct { db.as_ref() } else { pb.as_ref() };
        run(
            dev,
            "layernorm_bwd_dwdb_f32",
            cfg,
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&g.buf),
                mean.map_or(KArg::Null, |m| KArg::Buf(&m.buf)),
                KArg::Buf(&rstd.buf),
                KArg::Buf(&tw.buf),
                tb.map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
                KArg::U32(rows as u32),
                KArg::U32(d as u32),
                KArg::U32(chunk),
            ],
        )?;
        if !direct {
            run(
                dev,
                "layernorm_bwd_reduce_f32",
                layernorm_bwd::reduce_config(d),
                &[
                    KArg::Buf(&tw.buf),
                    tb.map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
                    KArg::Buf(&dw.buf),
                    db.as_ref().map_or(KArg::Null, |t| KArg::Buf(&t.buf)),
                    KArg::U32(d as u32),
                    KArg::U32(k),
                ],
            )?;
        }
        Ok(LayerNormGrads { dx, dw, db })
    }
}
