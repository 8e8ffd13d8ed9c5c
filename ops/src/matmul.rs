//! Matrix products on the CPU GEMM: `matmul` (batched, or a right operand shared
//! by every batch) and `linear` (x·Wᵀ + b, W as [OUT, IN]), with backward rules.
//! Letters: A [.., M, K] · B [.., K, N]; a linear input has R rows of IN features.
//! Strided views reach the GEMM as strides; only a matrix with no unit stride is copied.

use crate::dispatch_float;
use crate::elementwise::{sum_rows, with_raw};
use crate::gemm::{gemm, xwt, GemmElem, WRows};
use crate::kdev::bridge;
use crate::util::{expect_rank, expect_shape, float_dtype};
use anyhow::{ensure, Result};
use half::{bf16, f16};
use kf_engine::autograd::{should_record, BackwardOp};
use kf_engine::{DType, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Batches whose single product has fewer multiply-adds than this run in
/// parallel over the batch (each GEMM on one thread); larger ones run one after
/// another, each GEMM using all threads.
const PAR_BATCH_MAX_MACS: usize = 1 << 18;

#[cfg(test)]
thread_local! {
    /// Operand copies made by `prepare` on this thread (tests check views are not copied).
    static OPERAND_COPIES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Strides the GEMM can take for a `rows x cols` matrix with strides `(rs, cs)`:
/// one unit stride and the other at least the extent along it (the BLAS
/// leading-dimension rule, so rows never overlap). Size-1 dims get a canonical
/// stride. `None`: the operand has to be copied first.
fn gemm_strides(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(usize, usize)> {
    match (rows <= 1, cols <= 1) {
        (true, true) => Some((1, 1)),
        (true, false) => match cs {
            0 => None,
            1 => Some((cols, 1)),
            _ => Some((1, cs)),
        },
        (false, true) => match rs {
            0 => None,
            1 => Some((1, rows)),
            _ => Some((rs, 1)),
        },
        (false, false) => {
            if cs == 1 && rs >= cols {
                Some((rs, 1))
            } else if rs == 1 && cs >= rows {
                Some((1, cs))
            } else {
                None
            }
        }
    }
}

/// Collapse all dims but the last into one row dim: `(rows, row stride)` when
/// their strides chain (a contiguous tensor or a strided 2-D view always do).
fn collapse_rows(shape: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let r = shape.len();
    let kept: Vec<usize> = (0..r.saturating_sub(1))
        .filter(|&i| shape[i] != 1)
        .collect();
    let rows: usize = shape[..r.saturating_sub(1)].iter().product();
    for w in kept.windows(2) {
        if strides[w[0]] != strides[w[1]] * shape[w[1]] {
            return None;
        }
    }
    Some((rows, kept.last().map_or(0, |&i| strides[i])))
}

/// A matrix operand: the tensor to read (the input, or a contiguous copy of
/// it), and the GEMM strides of its last two dims.
struct Operand {
    t: Tensor,
    rs: usize,
    cs: usize,
}

/// The operand of `t`'s last two dims, copied only when the GEMM cannot take
/// its strides.
fn prepare(t: &Tensor) -> Result<Operand> {
    let r = t.rank();
    let (rows, cols) = (t.shape()[r - 2], t.shape()[r - 1]);
    let (rs, cs) = (t.strides()[r - 2], t.strides()[r - 1]);
    if let Some((rs, cs)) = gemm_strides(rows, cols, rs, cs) {
        return Ok(Operand {
            t: t.clone(),
            rs,
            cs,
        });
    }
    #[cfg(test)]
    OPERAND_COPIES.with(|c| c.set(c.get() + 1));
    let t = t.contiguous()?;
    let (rs, cs) = gemm_strides(rows, cols, cols, 1).unwrap_or((cols.max(1), 1));
    Ok(Operand { t, rs, cs })
}

/// `op` with unit column stride (a contiguous copy when its columns are strided).
fn unit_cols(op: Operand) -> Result<Operand> {
    if op.cs == 1 {
        return Ok(op);
    }
    let cols = op.t.shape()[op.t.rank() - 1];
    Ok(Operand {
        t: op.t.contiguous()?,
        rs: cols,
        cs: 1,
    })
}

/// As `prepare`, for `t` seen as one [rows, last] matrix over all leading dims
/// (copied when the leading dims do not collapse or the strides do not suit).
fn prepare_rows(t: &Tensor) -> Result<Operand> {
    let cols = t.shape()[t.rank() - 1];
    let cs = t.strides()[t.rank() - 1];
    if let Some((rows, rs)) = collapse_rows(t.shape(), t.strides()) {
        if let Some((rs, cs)) = gemm_strides(rows, cols, rs, cs) {
            return Ok(Operand {
                t: t.clone(),
                rs,
                cs,
            });
        }
    }
    #[cfg(test)]
    OPERAND_COPIES.with(|c| c.set(c.get() + 1));
    let t = t.contiguous()?;
    let rows = t.numel() / cols.max(1);
    let (rs, cs) = gemm_strides(rows, cols, cols, 1).unwrap_or((cols.max(1), 1));
    Ok(Operand { t, rs, cs })
}

/// Storage offsets of every matrix of `t` (row-major over the batch dims).
fn batch_offsets(t: &Tensor) -> Vec<usize> {
    let r = t.rank();
    let (shape, strides) = (&t.shape()[..r - 2], &t.strides()[..r - 2]);
    let n: usize = shape.iter().product();
    (0..n)
        .map(|mut i| {
            let mut off = t.layout().offset();
            for d in (0..shape.len()).rev() {
                off += (i % shape[d]) * strides[d];
                i /= shape[d];
            }
            off
        })
        .collect()
}

/// `a [.., M, K] · b [.., K, N] -> [.., M, N]`. The batch dims of `a` and `b`
/// are equal, or `b` has rank 2 and is shared by every batch.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.rank() >= 2 && b.rank() >= 2,
        "matmul: operands need rank >= 2, got {:?} and {:?}",
        a.shape(),
        b.shape()
    );
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    ensure!(
        k == k2 && (rb == 2 || a.shape()[..ra - 2] == b.shape()[..rb - 2]),
        "matmul: cannot multiply {:?} by {:?} (need [.., M, K] · [.., K, N] with equal batch dims, or a rank-2 right operand)",
        a.shape(),
        b.shape()
    );
    let mut shape = a.shape()[..ra - 2].to_vec();
    shape.extend([m, n]);
    if let Some(on) = bridge::device_of("matmul", &[a, b])? {
        // one batched GEMM over the leading dims (a rank-2 right operand is shared: stride 0)
        // views (a transposed or batched operand) are read in place through lda / ldb
        let batch: usize = a.shape()[..ra - 2].iter().product();
        let (oa, ob) = (bridge::gemm_operand(a)?, bridge::gemm_operand(b)?);
        let spec = crate::kdev::GemmSpec {
            trans_a: oa.trans,
            trans_b: ob.trans,
            lda: oa.ld,
            ldb: ob.ld,
            stride_a: oa.stride,
            stride_b: if rb == 2 { 0 } else { ob.stride },
            stride_c: m * n,
            batch: batch.max(1),
            a_off: oa.off,
            b_off: ob.off,
            ..crate::kdev::GemmSpec::simple(m, n, k, false)
        };
        let c = crate::kdev::DTensor::zeros(&*on.dev, &shape, kf_engine::DType::F32)?;
        if m * n > 0 && k > 0 {
            launch::matmul_into(&*on.dev, &spec, &oa.t, &ob.t, &c)?;
        }
        let node = should_record(&[a, b]).then(|| {
            Arc::new(MatmulBackward {
                a: a.clone(),
                b: b.clone(),
            }) as Arc<dyn BackwardOp>
        });
        return Ok(bridge::back(&on, c)?.rewrap(node));
    }
    let d = float_dtype("matmul", &[a, b])?;
    let node = should_record(&[a, b]).then(|| {
        Arc::new(MatmulBackward {
            a: a.clone(),
            b: b.clone(),
        }) as Arc<dyn BackwardOp>
    });
    dispatch_float!("matmul", d, matmul_t::<T>(a, b, (m, k, n), &shape, node))
}

fn matmul_t<T: Float + GemmElem>(
    a: &Tensor,
    b: &Tensor,
    (m, k, n): (usize, usize, usize),
    shape: &[usize],
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    let batches = numel.checked_div(m * n).unwrap_or(0);
    let mut out = if k == 0 {
        OutBuf::<T>::zeros(numel)
    } else {
        OutBuf::<T>::uninit(numel)
    };
    if numel == 0 || k == 0 {
        return out.finish(shape, node);
    }
    let shared = b.rank() == 2;
    let ob = prepare(b)?;
    // A shared right operand and row-collapsible batches: one GEMM of batches*M rows.
    if shared && batches > 1 && collapse_rows(a.shape(), a.strides()).is_some() {
        let oa = prepare_rows(a)?;
        let (a_off, b_off) = (oa.t.layout().offset(), ob.t.layout().offset());
        with_raw::<T, _>(&oa.t, |xa| {
            with_raw::<T, _>(&ob.t, |xb| {
                gemm(
                    batches * m,
                    n,
                    k,
                    &xa[a_off..],
                    oa.rs,
                    oa.cs,
                    &xb[b_off..],
                    ob.rs,
                    ob.cs,
                    out.as_mut_slice(),
                    n,
                    1,
                    false,
                )
            })
        })???;
        return out.finish(shape, node);
    }
    let oa = prepare(a)?;
    let a_offs = batch_offsets(&oa.t);
    let b_offs = batch_offsets(&ob.t);
    with_raw::<T, _>(&oa.t, |xa| {
        with_raw::<T, _>(&ob.t, |xb| {
            let one = |(i, c): (usize, &mut [T])| {
                let b_off = if shared { b_offs[0] } else { b_offs[i] };
                gemm(
                    m,
                    n,
                    k,
                    &xa[a_offs[i]..],
                    oa.rs,
                    oa.cs,
                    &xb[b_off..],
                    ob.rs,
                    ob.cs,
                    c,
                    n,
                    1,
                    false,
                )
            };
            let mut chunks = out.as_mut_slice().chunks_mut(m * n).enumerate();
            if batches > 1 && m * n * k < PAR_BATCH_MAX_MACS {
                chunks.collect::<Vec<_>>().into_par_iter().try_for_each(one)
            } else {
                chunks.try_for_each(one)
            }
        })
    })???;
    out.finish(shape, node)
}

struct MatmulBackward {
    a: Tensor,
    b: Tensor,
}

impl BackwardOp for MatmulBackward {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (&self.a, &self.b);
        let (ra, rb) = (a.rank(), b.rank());
        // dA = dC · Bᵀ (Bᵀ is a view: the GEMM reads it through strides)
        let ga = if a.tracks_grad() {
            Some(matmul(g, &b.transpose(rb - 2, rb - 1)?)?)
        } else {
            None
        };
        // dB = Aᵀ · dC, summed over the batch when B was shared: then the batch
        // and M dims fold into the GEMM's K, so the sum is free.
        let gb = if b.tracks_grad() {
            Some(if rb == 2 && ra > 2 {
                let (k, n) = (a.shape()[ra - 1], b.shape()[1]);
                let rows: usize = a.shape()[..ra - 1].iter().product();
                let a2 = a.reshape(&[rows, k])?;
                let g2 = g.reshape(&[rows, n])?;
                matmul(&a2.transpose(0, 1)?, &g2)?
            } else {
                matmul(&a.transpose(ra - 2, ra - 1)?, g)?
            })
        } else {
            None
        };
        Ok(vec![ga, gb])
    }
}

/// `x [.., IN] · wᵀ + b -> [.., OUT]` with `w [OUT, IN]` (PyTorch layout) and
/// an optional bias `b [OUT]`: one product over all R leading rows, W read in
/// place, the bias preloaded into the output that the product accumulates into.
/// f32 activations use the decode-shaped kernels (`kf_engine::gemm::xwt`), which also
/// take f16 / bf16 weights as stored (a served model; not on the tape); f64 the GEMM.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut ts = vec![x, w];
    ts.extend(b);
    if let Some(on) = bridge::device_of("linear", &ts)? {
        let bd = b.map(bridge::dt).transpose()?;
        let y = launch::linear(&*on.dev, &bridge::dt(x)?, &bridge::dt(w)?, bd.as_ref())?;
        return bridge::back_recorded(&on, y, &ts, || {
            Arc::new(LinearBackward {
                x: x.clone(),
                w: w.clone(),
                b: b.cloned(),
            })
        });
    }
    let half_w = matches!(w.dtype(), DType::F16 | DType::BF16) && x.dtype() == DType::F32;
    if half_w && should_record(&ts) {
        // half-precision weights on the tape: widened, so the backward sees one dtype
        return linear(x, &w.to_dtype(DType::F32)?, b);
    }
    // half-precision weights (a model served from an f16 / bf16 file) are read as such by
    // the product; activations, bias and sums are f32
    let d = if half_w {
        float_dtype("linear", &[x])?
    } else {
        float_dtype("linear", &ts)?
    };
    expect_rank("linear", "weight", w, 2)?;
    ensure!(x.rank() >= 1, "linear: x must have rank >= 1, got shape []");
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    ensure!(
        x.shape()[x.rank() - 1] == in_f,
        "linear: x of shape {:?} does not end in IN = {in_f} of weight {:?}",
        x.shape(),
        w.shape()
    );
    if let Some(b) = b {
        expect_shape("linear", "bias", b, &[out_f])?;
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = out_f;
    let node = should_record(&ts).then(|| {
        Arc::new(LinearBackward {
            x: x.clone(),
            w: w.clone(),
            b: b.cloned(),
        }) as Arc<dyn BackwardOp>
    });
    dispatch_float!("linear", d, linear_t::<T>(x, w, b, None, &shape, node))
}

/// `h + x [.., IN] · wᵀ + b` with `h [.., OUT]`: a residual branch added by the GEMM itself.
/// The output starts as `h` (plus the bias rows, in the same pass) and the GEMM accumulates
/// into it, so the residual stream is not read and written again by a separate add (on a
/// device: the `bias_add` kernel or a copy, then the GEMM with beta = 1).
pub fn linear_residual(h: &Tensor, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut ts = vec![h, x, w];
    ts.extend(b);
    let node = || {
        Arc::new(LinearResidualBackward {
            h: h.clone(),
            linear: LinearBackward {
                x: x.clone(),
                w: w.clone(),
                b: b.cloned(),
            },
        }) as Arc<dyn BackwardOp>
    };
    if let Some(on) = bridge::device_of("linear_residual", &ts)? {
        let bd = b.map(bridge::dt).transpose()?;
        let (dh, dx, dw) = (bridge::dt(h)?, bridge::dt(x)?, bridge::dt(w)?);
        let y = launch::linear_residual(&*on.dev, &dh, &dx, &dw, bd.as_ref())?;
        return bridge::back_recorded(&on, y, &ts, node);
    }
    let half_w = matches!(w.dtype(), DType::F16 | DType::BF16) && x.dtype() == DType::F32;
    if half_w && should_record(&ts) {
        // half-precision weights on the tape: widened, as `linear` does
        return linear_residual(h, x, &w.to_dtype(DType::F32)?, b);
    }
    let d = if half_w {
        let mut acts = vec![h, x];
        acts.extend(b);
        float_dtype("linear_residual", &acts)?
    } else {
        float_dtype("linear_residual", &ts)?
    };
    expect_rank("linear_residual", "weight", w, 2)?;
    ensure!(
        x.rank() >= 1,
        "linear_residual: x must have rank >= 1, got shape []"
    );
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = out_f;
    ensure!(
        x.shape()[x.rank() - 1] == in_f && h.shape() == shape.as_slice(),
        "linear_residual: x {:?} · weight {:?}ᵀ does not fit the residual {:?}",
        x.shape(),
        w.shape(),
        h.shape()
    );
    if let Some(b) = b {
        expect_shape("linear_residual", "bias", b, &[out_f])?;
    }
    let node = should_record(&ts).then(node);
    dispatch_float!(
        "linear_residual",
        d,
        linear_t::<T>(x, w, b, Some(h), &shape, node)
    )
}

/// The linear rule, with `g` itself as the residual's gradient.
struct LinearResidualBackward {
    h: Tensor,
    linear: LinearBackward,
}

impl BackwardOp for LinearResidualBackward {
    fn name(&self) -> &'static str {
        "linear_residual"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.h.clone()];
        v.extend(self.linear.inputs());
        v
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut grads = vec![self.h.tracks_grad().then(|| g.clone())];
        grads.extend(self.linear.backward(out, g)?);
        Ok(grads)
    }
}

/// `[h +] x · wᵀ [+ b]`: the output starts as `h` and / or the bias rows (one pass), then the
/// GEMM accumulates into it.
fn linear_t<T: Float + GemmElem>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    h: Option<&Tensor>,
    shape: &[usize],
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    let rows: usize = x.shape()[..x.rank() - 1].iter().product();
    let mut out = OutBuf::<T>::uninit(rows * out_f);
    if rows * out_f == 0 {
        return out.finish(shape, node);
    }
    let o = out.as_mut_slice();
    let bc = b.map(|b| b.contiguous()).transpose()?;
    let bs = bc.as_ref().map(|b| b.cpu_data::<T>()).transpose()?;
    let hc = h.map(|h| h.contiguous()).transpose()?;
    let hs = hc.as_ref().map(|h| h.cpu_data::<T>()).transpose()?;
    let init = |(i, r): (usize, &mut [T])| match (&hs, &bs) {
        (Some(hs), Some(bs)) => {
            let hr = &hs[i * out_f..(i + 1) * out_f];
            r.iter_mut()
                .zip(hr.iter().zip(bs.iter()))
                .for_each(|(o, (&a, &c))| *o = a + c);
        }
        (Some(hs), None) => r.copy_from_slice(&hs[i * out_f..(i + 1) * out_f]),
        (None, Some(bs)) => r.copy_from_slice(bs),
        (None, None) => r.fill(T::ZERO),
    };
    let preloaded = hs.is_some() || bs.is_some();
    if preloaded || in_f == 0 {
        if o.len() >= 1 << 14 {
            o.par_chunks_mut(out_f)
                .with_min_len((4096 / out_f).max(1))
                .enumerate()
                .for_each(init);
        } else {
            o.chunks_mut(out_f).enumerate().for_each(init);
        }
    }
    if in_f > 0 {
        let ox = prepare_rows(x)?;
        if T::DTYPE == DType::F32 {
            // f32 activations: the decode-shaped kernels, W read in its own dtype (f32, f16
            // or bf16) with its rows in place
            let (ox, wc) = (unit_cols(ox)?, unit_cols(prepare(w)?)?);
            let o32: &mut [f32] = bytemuck::cast_slice_mut(o);
            let (x_off, w_off) = (ox.t.layout().offset(), wc.t.layout().offset());
            with_raw::<f32, _>(&ox.t, |xx| {
                let x = &xx[x_off..];
                let mut go = |wr: WRows| {
                    xwt(
                        rows, out_f, in_f, x, ox.rs, wr, wc.rs, o32, out_f, preloaded,
                    )
                };
                match w.dtype() {
                    DType::F16 => with_raw::<f16, _>(&wc.t, |ww| go(WRows::F16(&ww[w_off..]))),
                    DType::BF16 => with_raw::<bf16, _>(&wc.t, |ww| go(WRows::BF16(&ww[w_off..]))),
                    _ => with_raw::<f32, _>(&wc.t, |ww| go(WRows::F32(&ww[w_off..]))),
                }
            })???;
            return out.finish(shape, node);
        }
        // Wᵀ [IN, OUT] is w with its strides swapped: no copy.
        let wt = w.transpose(0, 1)?;
        let ow = prepare(&wt)?;
        let (x_off, w_off) = (ox.t.layout().offset(), ow.t.layout().offset());
        with_raw::<T, _>(&ox.t, |xx| {
            with_raw::<T, _>(&ow.t, |xw| {
                gemm(
                    rows,
                    out_f,
                    in_f,
                    &xx[x_off..],
                    ox.rs,
                    ox.cs,
                    &xw[w_off..],
                    ow.rs,
                    ow.cs,
                    o,
                    out_f,
                    1,
                    preloaded,
                )
            })
        })???;
    }
    out.finish(shape, node)
}

struct LinearBackward {
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
}

impl BackwardOp for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn inputs(&self) -> Vec<Tensor> {
        let mut v = vec![self.x.clone(), self.w.clone()];
        v.extend(self.b.clone());
        v
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (&self.x, &self.w);
        let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
        let rows: usize = x.shape()[..x.rank() - 1].iter().product();
        // g as [R, OUT] (a view when g is contiguous)
        let g2 = if g.rank() == 2 {
            g.clone()
        } else {
            g.reshape(&[rows, out_f])?
        };
        // dx = g · W: W [OUT, IN] is the right operand as stored
        let gx = if x.tracks_grad() {
            Some(matmul(&g2, w)?.reshape(x.shape())?)
        } else {
            None
        };
        // dW = gᵀ · x: gᵀ is a view, x read as [R, IN]
        let gw = if w.tracks_grad() {
            let x2 = if x.rank() == 2 {
                x.clone()
            } else {
                x.reshape(&[rows, in_f])?
            };
            Some(matmul(&g2.transpose(0, 1)?, &x2)?)
        } else {
            None
        };
        let mut grads = vec![gx, gw];
        if let Some(b) = &self.b {
            grads.push(if b.tracks_grad() {
                Some(sum_rows(&g2, out_f)?)
            } else {
                None
            });
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    fn randn(shape: &[usize], stream: u64) -> Tensor {
        Tensor::rand_normal(shape, DType::F64, 7, stream, Device::Cpu).unwrap()
    }

    fn copies() -> usize {
        OPERAND_COPIES.with(|c| c.get())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.shape(), b.shape());
        let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn transposed_views_reach_the_gemm_without_a_copy() {
        let a = randn(&[17, 33], 1); // used as Aᵀ: [33, 17]
        let b = randn(&[65, 17], 2); // used as Bᵀ: [17, 65]
        let at = a.transpose(0, 1).unwrap();
        let bt = b.transpose(0, 1).unwrap();
        let before = copies();
        let c = matmul(&at, &bt).unwrap();
        // batched views with a strided batch dim: [M, B, K] permuted to [B, M, K]
        let p = randn(&[5, 3, 17], 3).permute(&[1, 0, 2]).unwrap();
        let cp = matmul(&p, &bt).unwrap();
        let w = randn(&[17, 65], 4).transpose(0, 1).unwrap(); // [65, 17] view
        let lin = linear(&at, &w, None).unwrap();
        assert_eq!(copies(), before, "a transposed or strided view was copied");
        let want = matmul(&at.contiguous().unwrap(), &bt.contiguous().unwrap()).unwrap();
        assert!(max_diff(&c, &want) < 1e-12);
        let want = matmul(&p.contiguous().unwrap(), &bt.contiguous().unwrap()).unwrap();
        assert!(max_diff(&cp, &want) < 1e-12);
        let want = linear(&at.contiguous().unwrap(), &w.contiguous().unwrap(), None).unwrap();
        assert!(max_diff(&lin, &want) < 1e-12);
        // a layout with no unit stride is copied (and still right)
        let s = randn(&[4, 6, 2], 5).narrow(2, 1, 1).unwrap(); // strides [12, 2, 1]
        let s = s.permute(&[2, 0, 1]).unwrap(); // [1, 4, 6], matrix strides (12, 2)
        let before = copies();
        let r = matmul(&s, &randn(&[6, 3], 6)).unwrap();
        assert_eq!(copies(), before + 1);
        assert_eq!(r.shape(), &[1, 4, 3]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = randn(&[2, 3], 1);
        let e = matmul(&a, &randn(&[4, 5], 2)).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
        assert!(matmul(&randn(&[3], 1), &a).is_err());
        assert!(matmul(&randn(&[2, 2, 3], 1), &randn(&[3, 3, 5], 2)).is_err());
        assert!(matmul(&randn(&[2, 3], 1), &randn(&[2, 3, 5], 2)).is_err());
        let f = Tensor::zeros(&[3, 2], DType::F32, Device::Cpu).unwrap();
        assert!(matmul(&a, &f).is_err());
        let w = randn(&[4, 3], 3);
        assert!(linear(&randn(&[2, 4], 1), &w, None).is_err());
        assert!(linear(&a, &w, Some(&randn(&[3], 2))).is_err());
        assert!(linear(&a, &randn(&[4, 3, 1], 2), None).is_err());
        assert!(linear(&a, &w, Some(&randn(&[4], 2))).is_ok());
    }

    #[test]
    fn empty_dims() {
        let c = matmul(&randn(&[2, 3, 0], 1), &randn(&[0, 4], 2)).unwrap();
        assert_eq!(c.to_vec::<f64>().unwrap(), vec![0.0; 24]);
        let c = matmul(&randn(&[0, 3], 1), &randn(&[3, 4], 2)).unwrap();
        assert_eq!(c.shape(), &[0, 4]);
        let b = Tensor::from_vec(vec![1.0, 2.0], &[2], Device::Cpu).unwrap();
        let l = linear(&randn(&[3, 0], 1), &randn(&[2, 0], 2), Some(&b)).unwrap();
        assert_eq!(l.to_vec::<f64>().unwrap(), vec![1., 2., 1., 2., 1., 2.]);
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, rows_cols, run, weight_in, Out};
    use crate::kdev::{DTensor, GemmSpec, KArg, KernelDevice};
    use anyhow::{bail, ensure, Context, Result};
    use kf_engine::DType;
    use kf_kernels::{elementwise, gemv};

    /// `acc += x [..., in] · wᵀ` with `w [out, in]`, `acc [..., out]`: the residual add done by
    /// the GEMM itself (beta = 1), no separate pass over `acc`.
    pub fn linear_acc<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        w: &DTensor,
        acc: &DTensor,
    ) -> Result<()> {
        let op = "linear_acc";
        let (rows, k, n) = linear_dims(op, x, w)?;
        f32_in(op, "acc", acc)?;
        ensure!(
            acc.numel() == rows * n && acc.shape().last() == Some(&n),
            "{op}: x {:?} · weight {:?}ᵀ does not fit acc {:?}",
            x.shape(),
            w.shape(),
            acc.shape()
        );
        let spec = GemmSpec {
            beta: 1.0,
            ..GemmSpec::simple(rows, n, k, true)
        };
        matmul_into(dev, &spec, x, w, acc)
    }

    /// (rows, in, out) of `x [..., in] · wᵀ` with `w [out, in]`, checked: x f32, w f32 / f16 / bf16.
    fn linear_dims(op: &str, x: &DTensor, w: &DTensor) -> Result<(usize, usize, usize)> {
        f32_in(op, "x", x)?;
        weight_in(op, w)?;
        ensure!(
            w.rank() == 2,
            "{op}: weight must be [out, in], got {:?}",
            w.shape()
        );
        let (rows, k) = rows_cols(op, x)?;
        let (n, win) = (w.shape()[0], w.shape()[1]);
        ensure!(
            win == k,
            "{op}: x {:?} has {k} features, weight {:?} takes {win}",
            x.shape(),
            w.shape()
        );
        Ok((rows, k, n))
    }

    /// `h + x [..., in] · wᵀ + b` (`h [..., out]`): the output starts as `h + b` (the
    /// `bias_add` kernel) or a copy of `h`, then [`linear_acc`] accumulates the product into it.
    pub fn linear_residual<D: KernelDevice + ?Sized>(
        dev: &D,
        h: &DTensor,
        x: &DTensor,
        w: &DTensor,
        b: Option<&DTensor>,
    ) -> Out {
        f32_in("linear_residual", "h", h)?;
        let acc = match b {
            Some(b) => {
                crate::elementwise::launch::bias_add(dev, h, b).context("linear_residual: bias")?
            }
            None => {
                let acc = DTensor::uninit(dev, h.shape(), DType::F32)?;
                dev.copy(&h.buf, 0, &acc.buf, 0, 4 * h.numel())?;
                acc
            }
        };
        linear_acc(dev, x, w, &acc).context("linear_residual")?;
        Ok(acc)
    }

    /// `x [..., in] · wᵀ + b` with `w [out, in]` (PyTorch layout) and optional `b [out]`:
    /// `[..., out]`, by [`KernelDevice::gemm`] and the `bias_add` kernel.
    pub fn linear<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        w: &DTensor,
        b: Option<&DTensor>,
    ) -> Out {
        let (rows, k, n) = linear_dims("linear", x, w)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        let out = DTensor::uninit(dev, &shape, DType::F32)?;
        matmul_into(dev, &GemmSpec::simple(rows, n, k, true), x, w, &out)?;
        match b {
            None => Ok(out),
            Some(b) => crate::elementwise::launch::bias_add(dev, &out, b).context("linear: bias"),
        }
    }

    /// The GEMM of `spec` on f32 tensors (checked against their sizes first). B may also be f16 or
    /// bf16 weights in the `x · Wᵀ` form of a linear layer (`trans_b`, no `trans_a`, batch 1,
    /// alpha 1; offsets, leading dimensions and beta as for f32): see [`matmul_half_weights`].
    pub fn matmul_into<D: KernelDevice + ?Sized>(
        dev: &D,
        spec: &GemmSpec,
        a: &DTensor,
        b: &DTensor,
        c: &DTensor,
    ) -> Result<()> {
        if matches!(b.dtype(), DType::F16 | DType::BF16) {
            return matmul_half_weights(dev, spec, a, b, c);
        }
        f32_in("gemm", "A", a)?;
        f32_in("gemm", "B", b)?;
        f32_in("gemm", "C", c)?;
        spec.check(a.numel(), b.numel(), c.numel())?;
        dev.gemm(spec, &a.buf, &b.buf, &c.buf)
            .with_context(|| format!("gemm on {}: {spec:?}", dev.name()))
    }

    /// `C = A · Wᵀ (+ beta C)` with f32 A and C and half-precision weights W (`w`, f16 or bf16,
    /// stored `[n, k]` through `spec.ldb` from `spec.b_off`): every product and sum in f32, so the
    /// result is the f32 GEMM's with the weights widened (exactly) up to the order of the sums. Up
    /// to `kf_kernels::gemv::MAX_ROWS` rows the `gemv_wt` kernel reads the half weights directly (a
    /// decode step moves half the bytes of f32 weights); more rows widen the weights the GEMM reads
    /// into a temporary f32 buffer (`cast_<dtype>_f32`) and run the f32 GEMM (cuBLAS on a GPU).
    pub fn matmul_half_weights<D: KernelDevice + ?Sized>(
        dev: &D,
        spec: &GemmSpec,
        a: &DTensor,
        w: &DTensor,
        c: &DTensor,
    ) -> Result<()> {
        let op = "gemm with half weights";
        f32_in(op, "A", a)?;
        f32_in(op, "C", c)?;
        let suffix = match w.dtype() {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("{op}: weights are {other}, expected f16 or bf16"),
        };
        ensure!(
            spec.trans_b && !spec.trans_a && spec.batch == 1 && spec.alpha == 1.0,
            "{op}: only C = A · Wᵀ (+ beta C) with W stored [n, k] runs on half weights (trans_b, \
             no trans_a, batch 1, alpha 1), got {spec:?}"
        );
        spec.check(a.numel(), w.numel(), c.numel())?;
        let (m, n, k) = (spec.m, spec.n, spec.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        let u32_of = |what: &str, v: usize| -> Result<u32> {
            u32::try_from(v)
                .map_err(|_| anyhow::anyhow!("{op}: {what} {v} exceeds the kernel's u32"))
        };
        if m <= gemv::MAX_ROWS {
            let vec = gemv::vectorized(k, spec.a_off, spec.lda, spec.b_off, spec.ldb);
            return run(
                dev,
                &format!("gemv_wt_{suffix}"),
                gemv::config(m, n),
                &[
                    KArg::Buf(&a.buf),
                    KArg::U64(spec.a_off as u64),
                    KArg::U32(u32_of("lda", spec.lda)?),
                    KArg::Buf(&w.buf),
                    KArg::U64(spec.b_off as u64),
                    KArg::U32(u32_of("ldb", spec.ldb)?),
                    KArg::Buf(&c.buf),
                    KArg::U64(spec.c_off as u64),
                    KArg::U32(u32_of("ldc", spec.ldc)?),
                    KArg::U32(u32_of("m", m)?),
                    KArg::U32(u32_of("n", n)?),
                    KArg::U32(u32_of("k", k)?),
                    KArg::F32(spec.beta),
                    KArg::U32(vec as u32),
                ],
            );
        }
        // the rows of W this product reads, widened: n rows ldb apart from b_off (the last k wide)
        let len = (n - 1) * spec.ldb + k;
        let wide = DTensor::uninit(dev, &[len], DType::F32)?;
        run(
            dev,
            &format!("cast_{suffix}_f32"),
            elementwise::config(len),
            &[
                KArg::Buf(&w.buf),
                KArg::U64(spec.b_off as u64),
                KArg::Buf(&wide.buf),
                KArg::U64(len as u64),
            ],
        )?;
        let wspec = GemmSpec { b_off: 0, ..*spec };
        matmul_into(dev, &wspec, a, &wide, c)
    }

    /// Gradients of `y = x wᵀ (+ b)` with `x [R, in]` (any shape of R * in elements), `w [out, in]`, from `g [.., out]`:
    /// `dx = g w` (shape of x), `dw = gᵀ x` ([out, in]), `db = colsum(g)` (when `bias`).
    pub struct LinearGrads {
        pub dx: DTensor,
        pub dw: DTensor,
        pub db: Option<DTensor>,
    }

    pub fn linear_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        w: &DTensor,
        g: &DTensor,
        bias: bool,
    ) -> Result<LinearGrads> {
        let op = "linear_bwd";
        f32_in(op, "x", x)?;
        f32_in(op, "weight", w)?;
        f32_in(op, "grad", g)?;
        ensure!(
            w.rank() == 2,
            "{op}: weight must be [out, in], got {:?}",
            w.shape()
        );
        let (o, i) = (w.shape()[0], w.shape()[1]);
        // rows from g; x may have any shape of rows * in elements (e.g. attention's
        // [B, T, H, Dh] output read as [N, d]); dx takes x's shape
        let (rows, gout) = rows_cols(op, g)?;
        ensure!(
            gout == o && x.numel() == rows * i,
            "{op}: x {:?}, weight {:?} and grad {:?} do not fit",
            x.shape(),
            w.shape(),
            g.shape()
        );
        let dx = DTensor::uninit(dev, x.shape(), DType::F32)?;
        let dw = DTensor::uninit(dev, &[o, i], DType::F32)?;
        // dx [R, in] = g [R, out] · w [out, in]
        gemm(dev, &GemmSpec::simple(rows, i, o, false), g, w, &dx).context(op)?;
        // dw [out, in] = gᵀ (g stored [R, out]) · x [R, in]
        let spec = GemmSpec {
            trans_a: true,
            lda: o,
            ..GemmSpec::simple(o, i, rows, false)
        };
        gemm(dev, &spec, g, x, &dw).context(op)?;
        let db = if bias {
            Some(crate::reduce::launch::colsum(dev, g)?)
        } else {
            None
        };
        Ok(LinearGrads { dx, dw, db })
    }

    /// The GEMM of `spec` on f32 tensors, checked against their sizes.
    pub fn gemm<D: KernelDevice + ?Sized>(
        dev: &D,
        spec: &GemmSpec,
        a: &DTensor,
        b: &DTensor,
        c: &DTensor,
    ) -> Result<()> {
        super::launch::matmul_into(dev, spec, a, b, c)
    }
}
