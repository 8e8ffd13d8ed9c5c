//! Rotary position embedding, rotate-half (NeoX) layout, on `x [B, T, H, D]`
//! with per-row positions `pos [T]` or `[B, T]` (arbitrary, not necessarily
//! increasing: hint rows sit at t + i). Angles are computed in f64 once per
//! position row (`rope_tables`, shared with the CUDA port) and cast.
//! Letters: B batch, T time, H heads, D head dim (even), D/2 frequencies.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::float_dtype;
use crate::util::for_each_row;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, DType, Float, OutBuf, Tensor};
use std::sync::Arc;

/// The rotation's frequencies: `f[j] = base^(-2j/D)`, divided by `div[j]` when the model
/// scales its RoPE (linear, Llama 3 or a GGUF file's `rope_freqs`: a longer context from the
/// same angles); `div` has one entry per frequency, D/2.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFreqs {
    pub base: f64,
    pub div: Option<Arc<[f64]>>,
}

impl RopeFreqs {
    /// Plain RoPE of `base`.
    pub fn plain(base: f64) -> RopeFreqs {
        RopeFreqs { base, div: None }
    }

    /// The frequencies of head dim `d`.
    pub fn inv_freq(&self, d: usize) -> Vec<f64> {
        (0..d / 2)
            .map(|j| {
                let f = self.base.powf(-((2 * j) as f64) / d as f64);
                match &self.div {
                    Some(div) => f / div[j],
                    None => f,
                }
            })
            .collect()
    }

    /// Errors unless usable at head dim `d`: a finite base > 0, D/2 finite divisors > 0.
    pub fn check(&self, op: &str, d: usize) -> Result<()> {
        ensure!(
            self.base.is_finite() && self.base > 0.0,
            "{op}: base must be finite and > 0, got {}",
            self.base
        );
        if let Some(div) = &self.div {
            ensure!(
                div.len() == d / 2,
                "{op}: {} frequency divisors for head dim {d} (want {})",
                div.len(),
                d / 2
            );
            ensure!(
                div.iter().all(|v| v.is_finite() && *v > 0.0),
                "{op}: frequency divisors must be finite and > 0"
            );
        }
        Ok(())
    }
}

/// `(cos, sin)` of `angle[r, j] = pos[r] * f[j]` ([`RopeFreqs`]) for `j < D/2`, each
/// of shape `[len(pos), D/2]`, in f64. `d` must be even.
pub fn rope_tables(pos: &[u32], d: usize, freqs: &RopeFreqs) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let inv_freq = freqs.inv_freq(d);
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
pub fn rope(x: &Tensor, pos: &Tensor, freqs: &RopeFreqs) -> Result<Tensor> {
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
        let (cos, sin) = tables_on(&on, pos, d, freqs)?;
        return rope_on(&on, x, pos, freqs, &cos, &sin);
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
    freqs.check(op, d)?;
    dispatch_float!(op, dt, rope_t::<T>(x, pos, freqs))
}

/// Tables cast to `T`, with sin negated for the inverse rotation.
pub(crate) fn tables_t<T: Float>(
    pos: &Tensor,
    d: usize,
    freqs: &RopeFreqs,
    inverse: bool,
) -> Result<(Vec<T>, Vec<T>)> {
    let p = pos.to_vec::<u32>()?;
    let (c, s) = rope_tables(&p, d, freqs);
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
    freqs: &RopeFreqs,
    inverse: bool,
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    let (b, t, h, d) = (shape[0], shape[1], shape[2], shape[3]);
    let half = d / 2;
    let numel = b * t * h * d;
    let mut out = OutBuf::<T>::uninit(numel);
    if numel > 0 {
        let (cos, sin) = tables_t::<T>(pos, d, freqs, inverse)?;
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

fn rope_t<T: Float>(x: &Tensor, pos: &Tensor, freqs: &RopeFreqs) -> Result<Tensor> {
    let node = should_record(&[x]).then(|| node::<T>(x, pos, freqs));
    rotate::<T>(x, pos, freqs, false, node)
}

fn node<T: Float>(x: &Tensor, pos: &Tensor, freqs: &RopeFreqs) -> Arc<dyn BackwardOp> {
    Arc::new(RopeBackward::<T> {
        x: x.clone(),
        pos: pos.clone(),
        freqs: freqs.clone(),
        _t: std::marker::PhantomData,
    })
}

/// Positions with the rotation's tables made once for a pass: on a kernel device cos / sin
/// are computed here once instead of in every [`rope`] call (two per layer); on the CPU
/// [`RopeAt::apply`] is [`rope`].
pub struct RopeAt {
    pos: Tensor,
    freqs: RopeFreqs,
    tables: Option<(
        bridge::OnDevice,
        usize,
        crate::kdev::DTensor,
        crate::kdev::DTensor,
    )>,
}

impl RopeAt {
    /// The tables of `pos` ([T] or [B, T]) for head dim `d`.
    pub fn new(pos: &Tensor, d: usize, freqs: &RopeFreqs) -> Result<RopeAt> {
        let tables = match bridge::device_of("rope", &[pos])? {
            Some(on) => {
                let (c, s) = tables_on(&on, pos, d, freqs)?;
                Some((on, d, c, s))
            }
            None => None,
        };
        Ok(RopeAt {
            pos: pos.clone(),
            freqs: freqs.clone(),
            tables,
        })
    }

    /// The frequencies the tables were made with.
    pub fn freqs(&self) -> &RopeFreqs {
        &self.freqs
    }

    /// [`rope`] of `x [B, T, H, D]` at these positions.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((on, d, cos, sin)) = &self.tables {
            let s = x.shape();
            let fits = x.device() == on.device
                && x.rank() == 4
                && s[3] == *d
                && (self.pos.shape() == [s[1]] || self.pos.shape() == [s[0], s[1]]);
            if fits {
                return rope_on(on, x, &self.pos, &self.freqs, cos, sin);
            }
        }
        rope(x, &self.pos, &self.freqs)
    }
}

/// [`rope`] on a kernel device with the tables of `pos`: a view whose last dim is unit-stride
/// (q or k of a fused qkv) is read in place, any other is gathered first.
fn rope_on(
    on: &bridge::OnDevice,
    x: &Tensor,
    pos: &Tensor,
    freqs: &RopeFreqs,
    cos: &crate::kdev::DTensor,
    sin: &crate::kdev::DTensor,
) -> Result<Tensor> {
    let s = x.shape();
    let dims = [s[0], s[1], s[2], s[3]];
    let y = if x.dtype() == DType::F32 && (x.strides()[3] == 1 || s[3] <= 1) {
        let st = x.strides();
        let buf = x.storage()?.kernel()?.buf.clone();
        launch::rope_view(
            &*on.dev,
            &buf,
            x.layout().offset(),
            dims,
            [st[0], st[1], st[2]],
            cos,
            sin,
        )?
    } else {
        launch::rope(&*on.dev, &bridge::dt(x)?, cos, sin)?
    };
    bridge::back_recorded(on, y, &[x], || node::<f32>(x, pos, freqs))
}

/// The cos / sin tables of device positions `pos` ([T] or [B, T]) on their device.
fn tables_on(
    on: &bridge::OnDevice,
    pos: &Tensor,
    d: usize,
    freqs: &RopeFreqs,
) -> Result<(crate::kdev::DTensor, crate::kdev::DTensor)> {
    let pos = bridge::dt(&pos.reshape(&[pos.numel()])?)?;
    launch::rope_tables(&*on.dev, &pos, d, freqs)
}

/// The rotation is orthogonal: `dx` is `g` rotated by the negated angles.
struct RopeBackward<T> {
    x: Tensor,
    pos: Tensor,
    freqs: RopeFreqs,
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
            let (cos, sin) = tables_on(&on, &self.pos, g.shape()[3], &self.freqs)?;
            let dx = launch::rope_bwd(&*on.dev, &bridge::dt(g)?, &cos, &sin)?;
            return Ok(vec![Some(bridge::back(&on, dx)?), None]);
        }
        let dx = rotate::<T>(g, &self.pos, &self.freqs, true, None)?;
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
        assert!(rope(&x, &p, &RopeFreqs::plain(1e4))
            .unwrap_err()
            .to_string()
            .contains("even"));
        let x = Tensor::zeros(&[1, 2, 1, 4], DType::F32, Device::Cpu).unwrap();
        let p3 = Tensor::from_vec(vec![0u32, 1, 2], &[3], Device::Cpu).unwrap();
        assert!(rope(&x, &p3, &RopeFreqs::plain(1e4)).is_err());
        let pf = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        assert!(rope(&x, &pf, &RopeFreqs::plain(1e4)).is_err());
        let x3 = Tensor::zeros(&[2, 1, 4], DType::F32, Device::Cpu).unwrap();
        assert!(rope(&x3, &p, &RopeFreqs::plain(1e4)).is_err());
        assert!(rope(&x, &p, &RopeFreqs::plain(0.0)).is_err());
        // divisors: one per frequency, finite and > 0
        let div = |v: Vec<f64>| RopeFreqs {
            base: 1e4,
            div: Some(v.into()),
        };
        assert!(rope(&x, &p, &div(vec![2.0]))
            .unwrap_err()
            .to_string()
            .contains("divisors"));
        assert!(rope(&x, &p, &div(vec![2.0, 0.0])).is_err());
        assert!(rope(&x, &p, &div(vec![2.0, f64::NAN])).is_err());
        assert!(rope(&x, &p, &div(vec![2.0, 3.0])).is_ok());
        assert!(rope(&x, &p, &RopeFreqs::plain(1e4)).is_ok());
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
        let a = rope(&k, &p, &RopeFreqs::plain(1e4))
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        let bb = rope(&k.contiguous().unwrap(), &p, &RopeFreqs::plain(1e4))
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

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, same_shape, u32_fits, view_span, Out};
    use crate::kdev::{DTensor, DeviceBuf, KArg, KernelDevice};
    use anyhow::{bail, ensure, Result};
    use kf_engine::DType;
    use kf_kernels::rope;

    /// `(cos, sin)` tables of [`rope_tables`].
    pub type RopeTables = (DTensor, DTensor);

    /// The RoPE tables of u32 positions `pos [P]` at head dim `d` (even): `(cos, sin)`, each
    /// `[P, d/2]` f32 (the `rope_tables_f32` kernel, `rope_tables_scaled_f32` with the
    /// divisors uploaded when `freqs` scales; within one f32 ulp of the CPU's f64 tables).
    pub fn rope_tables<D: KernelDevice + ?Sized>(
        dev: &D,
        pos: &DTensor,
        d: usize,
        freqs: &super::RopeFreqs,
    ) -> Result<RopeTables> {
        let op = "rope_tables";
        pos.expect_dtype(op, "positions", DType::U32)?;
        ensure!(
            d >= 2 && d.is_multiple_of(2),
            "{op}: head dim {d} must be even and >= 2"
        );
        freqs.check(op, d)?;
        let np = pos.numel();
        let cos = DTensor::uninit(dev, &[np, d / 2], DType::F32)?;
        let sin = DTensor::uninit(dev, &[np, d / 2], DType::F32)?;
        if np > 0 {
            let div = match &freqs.div {
                Some(v) => Some(DTensor::from_slice(dev, v, &[v.len()])?),
                None => None,
            };
            let mut args = vec![
                KArg::Buf(&pos.buf),
                KArg::Buf(&cos.buf),
                KArg::Buf(&sin.buf),
                KArg::U64(np as u64),
                KArg::U32(d as u32),
                KArg::F64(freqs.base),
            ];
            let entry = match &div {
                Some(v) => {
                    args.push(KArg::Buf(&v.buf));
                    "rope_tables_scaled_f32"
                }
                None => "rope_tables_f32",
            };
            run(dev, entry, rope::tables_config(np, d), &args)?;
        }
        Ok((cos, sin))
    }

    /// RoPE of a strided view `x` = `[B, T, H, D]` of the f32 buffer `x` from element `x_off`
    /// (strides over B, T, H in elements, D unit-stride: e.g. q or k of a fused qkv) with tables
    /// from [`rope_tables`]: cos/sin `[T, D/2]` (positions shared by the batch) or `[B*T, D/2]`
    /// (per batch row). Output `[B, T, H, D]` contiguous.
    pub fn rope_view<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DeviceBuf,
        x_off: usize,
        dims: [usize; 4],
        strides: [usize; 3],
        cos: &DTensor,
        sin: &DTensor,
    ) -> Out {
        let op = "rope";
        let [b, t, h, d] = dims;
        ensure!(
            d >= 2 && d.is_multiple_of(2),
            "{op}: head dim {d} must be even and >= 2"
        );
        f32_in(op, "cos", cos)?;
        f32_in(op, "sin", sin)?;
        ensure!(
            cos.shape() == sin.shape(),
            "{op}: cos {:?} and sin {:?} differ",
            cos.shape(),
            sin.shape()
        );
        let batched = if cos.shape() == [t, d / 2] {
            false
        } else if cos.shape() == [b * t, d / 2] {
            true
        } else {
            bail!(
                "{op}: tables {:?} must be [T, D/2] = [{t}, {}] or [B*T, D/2] = [{}, {}]",
                cos.shape(),
                d / 2,
                b * t,
                d / 2
            )
        };
        let span = view_span(dims, strides).saturating_add(x_off);
        let have = dev.buf_bytes(x) / 4;
        ensure!(
            span <= have,
            "{op}: the view {dims:?} with strides {strides:?} spans {span} f32, the buffer holds {have}"
        );
        ensure!(
            b <= u32::MAX as usize && t <= u32::MAX as usize && h <= u32::MAX as usize,
            "{op}: {dims:?} too large"
        );
        let out = DTensor::uninit(dev, &dims, DType::F32)?;
        if span > 0 {
            run(
                dev,
                "rope_fwd_f32",
                rope::config(b, t, h, d),
                &[
                    KArg::Buf(x),
                    KArg::U64(x_off as u64),
                    KArg::Buf(&cos.buf),
                    KArg::Buf(&sin.buf),
                    KArg::Buf(&out.buf),
                    KArg::U32(b as u32),
                    KArg::U32(t as u32),
                    KArg::U32(h as u32),
                    KArg::U32(d as u32),
                    KArg::U64(strides[0] as u64),
                    KArg::U64(strides[1] as u64),
                    KArg::U64(strides[2] as u64),
                    KArg::I32(batched as i32),
                ],
            )?;
        }
        Ok(out)
    }

    /// RoPE of a contiguous `x [B, T, H, D]` (see [`rope_view`]).
    pub fn rope<D: KernelDevice + ?Sized>(
        dev: &D,
        x: &DTensor,
        cos: &DTensor,
        sin: &DTensor,
    ) -> Out {
        f32_in("rope", "x", x)?;
        ensure!(
            x.rank() == 4,
            "rope: x must be [B, T, H, D], got {:?}",
            x.shape()
        );
        let s = x.shape();
        let dims = [s[0], s[1], s[2], s[3]];
        rope_view(
            dev,
            &x.buf,
            0,
            dims,
            [s[1] * s[2] * s[3], s[2] * s[3], s[3]],
            cos,
            sin,
        )
    }

    /// Gradient of RoPE: `g [B, T, H, Dh]` contiguous through the inverse rotation with the
    /// forward's tables `cos`, `sin` (`[T, Dh/2]` or `[B*T, Dh/2]`); contiguous output.
    pub fn rope_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        g: &DTensor,
        cos: &DTensor,
        sin: &DTensor,
    ) -> Out {
        let op = "rope_bwd";
        f32_in(op, "grad", g)?;
        f32_in(op, "cos", cos)?;
        f32_in(op, "sin", sin)?;
        ensure!(
            g.rank() == 4,
            "{op}: grad must be [B, T, H, Dh], got {:?}",
            g.shape()
        );
        let s = g.shape();
        let (b, t, h, d) = (s[0], s[1], s[2], s[3]);
        ensure!(d >= 2 && d % 2 == 0, "{op}: head dim {d} must be even");
        let batched = if cos.shape() == [t, d / 2] {
            false
        } else if cos.shape() == [b * t, d / 2] {
            true
        } else {
            anyhow::bail!(
                "{op}: tables {:?} fit neither [T, Dh/2] nor [B*T, Dh/2]",
                cos.shape()
            )
        };
        same_shape(op, cos, sin)?;
        u32_fits(op, &[b, t, h, d])?;
        let out = DTensor::uninit(dev, s, DType::F32)?;
        if g.numel() == 0 {
            return Ok(out);
        }
        run(
            dev,
            "rope_bwd_f32",
            rope::config(b, t, h, d),
            &[
                KArg::Buf(&g.buf),
                KArg::U64(0),
                KArg::Buf(&cos.buf),
                KArg::Buf(&sin.buf),
                KArg::Buf(&out.buf),
                KArg::U32(b as u32),
                KArg::U32(t as u32),
                KArg::U32(h as u32),
                KArg::U32(d as u32),
                KArg::U64((t * h * d) as u64),
                KArg::U64((h * d) as u64),
                KArg::U64(d as u64),
                KArg::I32(batched as i32),
            ],
        )?;
        Ok(out)
    }
}
