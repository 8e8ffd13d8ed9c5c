//! Rotary position embedding, rotate-half (NeoX) layout, on `x [B, T, H, D]`
//! with per-row positions `pos [T]` or `[B, T]` (arbitrary, not necessarily
//! increasing: hint rows sit at t + i). Angles are computed in f64 once per
//! position row (`rope_tables`, shared with the CUDA port) and cast.
//! Letters: B batch, T time, H heads, D head dim (even), D/2 frequencies.

use crate::dispatch_float;
use crate::kdev::{bridge, launch};
use crate::util::float_dtype;
use crate::util::for_each_row;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, DType, Float, OutBuf, Tensor};
use std::sync::Arc;

/// `(cos, sin)` of `angle[r, j] = pos[r] * base^(-2j/D)` for `j < D/2`, each
/// of shape `[len(pos), D/2]`, in f64. `d` must be even.
pub fn rope_tables(pos: &[u32], d: usize, base: f64) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|j| base.powf(-((2 * j) as f64) / d as f64))
        .collect();
    let mut cos = Vec::with_capacity(pos.len() * half);
    let mut sin = Vec::with_capacity(pos.len() * half);
    for &p in pos {
        for &f in &inv_freq {
            let (s, c) = (p as f64 * f).sin_cos();
            cos.push(c);
            sin.push(s);
        }
    }
    (cos, sin)
}

/// Rotate each head vector of `x [B, T, H, D]` by the angles of its row's
/// position: for `j < D/2`, `out[j] = x[j] cos - x[j + D/2] sin`,
/// `out[j + D/2] = x[j + D/2] cos + x[j] sin`. `x` may be a strided view
/// (e.g. q narrowed out of a `[B, T, 3H, D]` qkv) whose last dimension has
/// stride 1; it is read in place. The output is contiguous.
pub fn rope(x: &Tensor, pos: &Tensor, base: f64) -> Result<Tensor> {
    let op = "rope";
    ensure!(
        x.rank() == 4,
        "{op}: x must be [B, T, H, D], got shape {:?}",
        x.shape()
    );
    let (b, t, d) = (x.shape()[0], x.shape()[1], x.shape()[3]);
    if let Some(on) = bridge::device_of(op, &[x, pos])? {
        ensure!(
            pos.shape() == [t] || pos.shape() == [b, t],
            "{op}: positions must be [T] or [B, T] = [{b}, {t}], got {:?}",
            pos.shape()
        );
        let (cos, sin) = tables_on(&on, pos, d, base)?;
        let y = launch::rope(&*on.dev, &bridge::dt(x)?, &cos, &sin)?;
        return bridge::back_recorded(&on, y, &[x], || node::<f32>(x, pos, base));
    }
    let dt = float_dtype(op, &[x])?;
    ensure!(
        d % 2 == 0,
        "{op}: head dim D must be even for rotate-half, got shape {:?}",
        x.shape()
    );
    ensure!(
        pos.dtype() == DType::U32,
        "{op}: positions must be u32, got {}",
        pos.dtype()
    );
    ensure!(
        pos.shape() == [t] || pos.shape() == [b, t],
        "{op}: positions have shape {:?}, expected [T] = [{t}] or [B, T] = [{b}, {t}] for x {:?}",
        pos.shape(),
        x.shape()
    );
    ensure!(
        base.is_finite() && base > 0.0,
        "{op}: base must be finite and > 0, got {base}"
    );
    dispatch_float!(op, dt, rope_t::<T>(x, pos, base))
}

/// Tables cast to `T`, with sin negated for the inverse rotation.
pub(crate) fn tables_t<T: Float>(
    pos: &Tensor,
    d: usize,
    base: f64,
    inverse: bool,
) -> Result<(Vec<T>, Vec<T>)> {
    let p = pos.to_vec::<u32>()?;
    let (c, s) = rope_tables(&p, d, base);
    let sg = if inverse { -1.0 } else { 1.0 };
    Ok((
        c.into_iter().map(T::from_f64).collect(),
        s.into_iter().map(|v| T::from_f64(sg * v)).collect(),
    ))
}

/// Apply the rotation to a (possibly strided) `[B, T, H, D]` tensor whose last
/// dim has stride 1, into a fresh contiguous output.
fn rotate<T: Float>(
    x: &Tensor,
    pos: &Tensor,
    base: f64,
    inverse: bool,
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    let (b, t, h, d) = (shape[0], shape[1], shape[2], shape[3]);
    let half = d / 2;
    let numel = b * t * h * d;
    let mut out = OutBuf::<T>::uninit(numel);
    if numel > 0 {
        let (cos, sin) = tables_t::<T>(pos, d, base, inverse)?;
        let batched_pos = pos.rank() == 2;
        // read x in place when its last dim is unit-stride, else copy once
        let xv = if x.strides()[3] == 1 {
            x.clone()
        } else {
            x.contiguous()?
        };
        let st = xv.strides().to_vec();
        let off = xv.layout().offset();
        let guard = xv.storage()?;
        let cpu = guard.cpu()?;
        let data = T::buf(cpu)
            .with_context(|| format!("rope: storage does not hold {}", T::DTYPE))?
            .as_slice();
        ensure!(
            xv.layout().storage_extent() <= data.len(),
            "rope: view exceeds its storage"
        );
        for_each_row(out.as_mut_slice(), h * d, |r, o| {
            let (bi, ti) = (r / t, r % t);
            let prow = if batched_pos { r } else { ti };
            let (c, s) = (
                &cos[prow * half..(prow + 1) * half],
                &sin[prow * half..(prow + 1) * half],
            );
            for hi in 0..h {
                let src = off + bi * st[0] + ti * st[1] + hi * st[2];
                rotate_row(&data[src..src + d], &mut o[hi * d..(hi + 1) * d], c, s);
            }
        });
    }
    out.finish(&shape, node)
}

/// One head vector `x [D]` rotated into `o [D]` by the angles whose cos / sin (D/2 each) are
/// `c` / `s`: `o[j] = x[j] c - x[j + D/2] s`, `o[j + D/2] = x[j + D/2] c + x[j] s`.
#[inline(always)]
pub(crate) fn rotate_row<T: Float>(x: &[T], o: &mut [T], c: &[T], s: &[T]) {
    let half = c.len();
    let (x1, x2) = x[..2 * half].split_at(half);
    let (o1, o2) = o[..2 * half].split_at_mut(half);
    let s = &s[..half];
    for j in 0..half {
        o1[j] = x1[j] * c[j] - x2[j] * s[j];
        o2[j] = x2[j] * c[j] + x1[j] * s[j];
    }
}

fn rope_t<T: Float>(x: &Tensor, pos: &Tensor, base: f64) -> Result<Tensor> {
    let node = should_record(&[x]).then(|| node::<T>(x, pos, base));
    rotate::<T>(x, pos, base, false, node)
}

fn node<T: Float>(x: &Tensor, pos: &Tensor, base: f64) -> Arc<dyn BackwardOp> {
    Arc::new(RopeBackward::<T> {
        x: x.clone(),
        pos: pos.clone(),
        base,
        _t: std::marker::PhantomData,
    })
}

/// The cos / sin tables of device positions `pos` ([T] or [B, T]) on their device.
fn tables_on(
    on: &bridge::OnDevice,
    pos: &Tensor,
    d: usize,
    base: f64,
) -> Result<(crate::kdev::DTensor, crate::kdev::DTensor)> {
    let pos = bridge::dt(&pos.reshape(&[pos.numel()])?)?;
    launch::rope_tables(&*on.dev, &pos, d, base)
}

/// The rotation is orthogonal: `dx` is `g` rotated by the negated angles.
struct RopeBackward<T> {
    x: Tensor,
    pos: Tensor,
    base: f64,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for RopeBackward<T> {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.pos.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        if g.shape() != self.x.shape() || g.dtype() != T::DTYPE {
            bail!(
                "rope backward: gradient {:?} {} does not match x {:?} {}",
                g.shape(),
                g.dtype(),
                self.x.shape(),
                T::DTYPE
            );
        }
        if let Some(on) = bridge::device_of("rope backward", &[g, &self.pos])? {
            let (cos, sin) = tables_on(&on, &self.pos, g.shape()[3], self.base)?;
            let dx = crate::kdev::backward::rope_bwd(&*on.dev, &bridge::dt(g)?, &cos, &sin)?;
            return Ok(vec![Some(bridge::back(&on, dx)?), None]);
        }
        let dx = rotate::<T>(g, &self.pos, self.base, true, None)?;
        Ok(vec![Some(dx), None])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::Device;

    #[test]
    fn bad_inputs_are_errors() {
        let x = Tensor::zeros(&[1, 2, 1, 3], DType::F32, Device::Cpu).unwrap();
        let p = Tensor::from_vec(vec![0u32, 1], &[2], Device::Cpu).unwrap();
        assert!(rope(&x, &p, 1e4).unwrap_err().to_string().contains("even"));
        let x = Tensor::zeros(&[1, 2, 1, 4], DType::F32, Device::Cpu).unwrap();
        let p3 = Tensor::from_vec(vec![0u32, 1, 2], &[3], Device::Cpu).unwrap();
        assert!(rope(&x, &p3, 1e4).is_err());
        let pf = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        assert!(rope(&x, &pf, 1e4).is_err());
        let x3 = Tensor::zeros(&[2, 1, 4], DType::F32, Device::Cpu).unwrap();
        assert!(rope(&x3, &p, 1e4).is_err());
        assert!(rope(&x, &p, 0.0).is_err());
        assert!(rope(&x, &p, 1e4).is_ok());
    }

    #[test]
    fn position_zero_is_identity_and_strided_view_matches_copy() {
        let (b, t, h, d) = (2, 3, 2, 8);
        let v: Vec<f64> = (0..b * t * 3 * h * d)
            .map(|i| (i as f64 * 0.37).sin())
            .collect();
        let qkv = Tensor::from_vec(v, &[b, t, 3 * h, d], Device::Cpu).unwrap();
        let k = qkv.narrow(2, h, h).unwrap();
        assert!(!k.is_contiguous());
        let p = Tensor::from_vec(vec![5u32, 0, 3], &[t], Device::Cpu).unwrap();
        let a = rope(&k, &p, 1e4).unwrap().to_vec::<f64>().unwrap();
        let bb = rope(&k.contiguous().unwrap(), &p, 1e4)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        assert_eq!(a, bb);
        let kv = k.to_vec::<f64>().unwrap();
        // row t = 1 has position 0
        for bi in 0..b {
            let s = (bi * t + 1) * h * d;
            assert_eq!(a[s..s + h * d], kv[s..s + h * d]);
        }
    }
}
