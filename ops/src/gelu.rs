//! GELU activations, elementwise over any shape: `gelu_tanh` (the backbone
//! MLP's tanh approximation), `bias_gelu_tanh` (the MLP's bias added in the same pass) and
//! `gelu_erf` (exact, the noise encoder's MLP), with analytic derivatives. Also the erfc they
//! rest on (fdlibm's, in f64).

use crate::dispatch_float;
use crate::elementwise::{bias_add, BiasAddBackward};
use crate::kdev::bridge;
use crate::util::{expect_rank, fast_exp, float_dtype, has_avx2};
use anyhow::{bail, ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// sqrt(2/pi)
const K_TANH: f64 = 0.797_884_560_802_865_4;
const A_TANH: f64 = 0.044715;
/// 1/sqrt(2*pi)
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Elements per rayon task (and the size below which we stay on one thread).
const CHUNK: usize = 1 << 13;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tanh,
    Erf,
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as the equal
/// `x * sigmoid(2u)` so that no `1 + tanh` cancels for negative x.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("gelu_tanh", &[x])? {
        let y = launch::gelu_tanh(&*on.dev, &bridge::dt(x)?)?;
        return bridge::back_recorded(&on, y, &[x], || node::<f32>(x, Kind::Tanh));
    }
    let d = float_dtype("gelu_tanh", &[x])?;
    dispatch_float!("gelu_tanh", d, gelu_t::<T>(x, Kind::Tanh))
}

/// `0.5 x (1 + erf(x / sqrt(2)))`, computed as `0.5 x erfc(-x / sqrt(2))`
/// (accurate in the negative tail too). f32 inputs are evaluated in f64.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("gelu_erf", &[x])? {
        let y = launch::gelu_erf(&*on.dev, &bridge::dt(x)?)?;
        return bridge::back_recorded(&on, y, &[x], || node::<f32>(x, Kind::Erf));
    }
    let d = float_dtype("gelu_erf", &[x])?;
    dispatch_float!("gelu_erf", d, gelu_t::<T>(x, Kind::Erf))
}

/// `gelu_tanh(x [.., C] + b [C])` in one pass over x: the MLP's first bias fused into its
/// activation (one kernel on a device instead of a bias pass and a GELU pass).
pub fn bias_gelu_tanh(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let node = || {
        Arc::new(BiasGeluBackward {
            x: x.clone(),
            b: b.clone(),
        }) as Arc<dyn BackwardOp>
    };
    if let Some(on) = bridge::device_of("bias_gelu_tanh", &[x, b])? {
        let y = launch::bias_gelu_tanh(&*on.dev, &bridge::dt(x)?, &bridge::dt(b)?)?;
        return bridge::back_recorded(&on, y, &[x, b], node);
    }
    let d = float_dtype("bias_gelu_tanh", &[x, b])?;
    expect_rank("bias_gelu_tanh", "bias", b, 1)?;
    ensure!(
        x.rank() >= 1 && x.shape()[x.rank() - 1] == b.numel(),
        "bias_gelu_tanh: x of shape {:?} does not end in the bias size {}",
        x.shape(),
        b.numel()
    );
    let node = should_record(&[x, b]).then(node);
    dispatch_float!("bias_gelu_tanh", d, bias_gelu_t::<T>(x, b, node))
}

fn bias_gelu_t<T: Float>(
    x: &Tensor,
    b: &Tensor,
    node: Option<Arc<dyn BackwardOp>>,
) -> Result<Tensor> {
    let (xc, bc) = (x.contiguous()?, b.contiguous()?);
    let (xs, bs) = (xc.cpu_data::<T>()?, bc.cpu_data::<T>()?);
    let n = bs.len();
    let mut out = OutBuf::<T>::uninit(xs.len());
    if n > 0 {
        let simd = has_avx2();
        // whole rows per task, about CHUNK elements
        let per = (CHUNK / n).max(1) * n;
        out.as_mut_slice()
            .par_chunks_mut(per)
            .zip(xs.par_chunks(per))
            .for_each(|(o, x)| bias_tanh_fwd_any(o, x, &bs, simd));
    }
    drop((xs, bs));
    out.finish(x.shape(), node)
}

/// `out[r, j] = gelu_tanh(x[r, j] + b[j])` over whole rows of `b.len()`.
#[inline(always)]
fn bias_tanh_fwd_rows<T: Float>(out: &mut [T], xs: &[T], bs: &[T]) {
    for (o, x) in out.chunks_mut(bs.len()).zip(xs.chunks(bs.len())) {
        for ((o, &a), &c) in o.iter_mut().zip(x).zip(bs) {
            *o = tanh_fwd(a + c);
        }
    }
}

/// SAFETY (caller): the CPU has AVX2 and FMA (`has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_tanh_fwd_rows_avx2<T: Float>(out: &mut [T], xs: &[T], bs: &[T]) {
    bias_tanh_fwd_rows(out, xs, bs)
}

fn bias_tanh_fwd_any<T: Float>(out: &mut [T], xs: &[T], bs: &[T], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is has_avx2(), checked by the caller.
        return unsafe { bias_tanh_fwd_rows_avx2(out, xs, bs) };
    }
    let _ = simd;
    bias_tanh_fwd_rows(out, xs, bs)
}

/// The backward of `bias_gelu_tanh`, written with the rules of its parts (so it runs on every
/// device): `h = x + b` again (cheaper to recompute than to keep), `dh = g * gelu_tanh'(h)`,
/// then the bias_add rule: `dx = dh`, `db = dh` summed over rows.
struct BiasGeluBackward {
    x: Tensor,
    b: Tensor,
}

impl BackwardOp for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "bias_gelu_tanh"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone(), self.b.clone()]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let h = {
            let _g = kf_engine::no_grad();
            bias_add(&self.x, &self.b)?
        };
        // the forward ran at f32 or f64 (a device: f32), as h has
        let gelu = match h.dtype() {
            kf_engine::DType::F64 => node::<f64>(&h, Kind::Tanh),
            _ => node::<f32>(&h, Kind::Tanh),
        };
        let Some(dh) = gelu.backward(out, g)?.into_iter().next().flatten() else {
            bail!("bias_gelu_tanh backward: the GELU rule gave no gradient");
        };
        BiasAddBackward {
            x: self.x.clone(),
            b: self.b.clone(),
        }
        .backward(out, &dh)
    }
}

#[inline(always)]
fn tanh_fwd<T: Float>(x: T) -> T {
    let k = T::from_f64(K_TANH);
    let a = T::from_f64(A_TANH);
    let u = k * (x + a * x * x * x);
    // 0.5 (1 + tanh u) = 1 / (1 + exp(-2u)); exp overflow gives x / inf = -0 (f32's
    // fast_exp saturates at e^88.3 instead: x / 2e38, below any tolerance)
    x / (T::ONE + fast_exp(-(u + u)))
}

#[inline(always)]
fn tanh_grad<T: Float>(x: T) -> T {
    let k = T::from_f64(K_TANH);
    let a = T::from_f64(A_TANH);
    let x2 = x * x;
    let u = k * (x + a * x2 * x);
    // one exp: e = exp(-2|u|) in (0, 1] gives sigmoid(2u) on either side
    // and s (1 - s) = e / (1 + e)^2 without inf/inf for large |u|
    let two_u = u + u;
    let e = fast_exp(-two_u.abs());
    let inv = T::ONE / (T::ONE + e);
    let s = if two_u >= T::ZERO { inv } else { e * inv };
    let s1s = e * inv * inv;
    let du = k * (T::ONE + T::from_f64(3.0 * A_TANH) * x2);
    let full = s + x * s1s * (du + du);
    // a select rather than an early return, so the loop vectorises; e = 0 keeps inf * 0
    // out of the result for huge |x|
    if e == T::ZERO {
        s
    } else {
        full
    }
}

/// `out[i] = gelu_tanh(x[i])` over one chunk.
#[inline(always)]
fn tanh_fwd_chunk<T: Float>(out: &mut [T], xs: &[T]) {
    out.iter_mut().zip(xs).for_each(|(o, &a)| *o = tanh_fwd(a));
}

/// `out[i] = g[i] * gelu_tanh'(x[i])` over one chunk.
#[inline(always)]
fn tanh_bwd_chunk<T: Float>(out: &mut [T], xs: &[T], gs: &[T]) {
    out.iter_mut()
        .zip(xs.iter().zip(gs))
        .for_each(|(o, (&a, &g))| *o = tanh_grad(a) * g);
}

/// The chunk kernels compiled for AVX2 (8 f32 lanes instead of SSE's 4).
///
/// SAFETY (caller): the CPU has AVX2 and FMA (`has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_fwd_chunk_avx2<T: Float>(out: &mut [T], xs: &[T]) {
    tanh_fwd_chunk(out, xs)
}

/// SAFETY (caller): the CPU has AVX2 and FMA (`has_avx2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_bwd_chunk_avx2<T: Float>(out: &mut [T], xs: &[T], gs: &[T]) {
    tanh_bwd_chunk(out, xs, gs)
}

fn tanh_fwd_any<T: Float>(out: &mut [T], xs: &[T], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is has_avx2(), checked by the caller.
        return unsafe { tanh_fwd_chunk_avx2(out, xs) };
    }
    let _ = simd;
    tanh_fwd_chunk(out, xs)
}

fn tanh_bwd_any<T: Float>(out: &mut [T], xs: &[T], gs: &[T], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is has_avx2(), checked by the caller.
        return unsafe { tanh_bwd_chunk_avx2(out, xs, gs) };
    }
    let _ = simd;
    tanh_bwd_chunk(out, xs, gs)
}

/// Standard normal CDF, `0.5 erfc(-x / sqrt(2))`.
#[inline]
fn phi_cdf(x: f64) -> f64 {
    0.5 * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

#[inline]
fn erf_fwd<T: Float>(x: T) -> T {
    let xf = x.to_f64();
    T::from_f64(xf * phi_cdf(xf))
}

#[inline]
fn erf_grad<T: Float>(x: T) -> T {
    let xf = x.to_f64();
    let pdf = INV_SQRT_2PI * (-0.5 * xf * xf).exp();
    T::from_f64(phi_cdf(xf) + if pdf == 0.0 { 0.0 } else { xf * pdf })
}

/// `out[i] = f(x[i])`, chunked over rayon when large.
fn map_into<T: Float>(out: &mut [T], xs: &[T], f: impl Fn(T) -> T + Sync) {
    if out.len() <= CHUNK {
        out.iter_mut().zip(xs).for_each(|(o, &a)| *o = f(a));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &a)| *o = f(a)));
    }
}

fn gelu_t<T: Float>(x: &Tensor, kind: Kind) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let xs = xc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(xs.len());
    match kind {
        Kind::Tanh => {
            let simd = has_avx2();
            let o = out.as_mut_slice();
            if o.len() <= CHUNK {
                tanh_fwd_any(o, &xs, simd);
            } else {
                o.par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(o, x)| tanh_fwd_any(o, x, simd));
            }
        }
        Kind::Erf => map_into(out.as_mut_slice(), &xs, erf_fwd::<T>),
    }
    drop(xs);
    let node = should_record(&[x]).then(|| node::<T>(x, kind));
    out.finish(x.shape(), node)
}

fn node<T: Float>(x: &Tensor, kind: Kind) -> Arc<dyn BackwardOp> {
    Arc::new(GeluBackward::<T> {
        x: x.clone(),
        kind,
        _t: std::marker::PhantomData,
    })
}

/// `dx = g * gelu'(x)` from the saved input.
struct GeluBackward<T> {
    x: Tensor,
    kind: Kind,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for GeluBackward<T> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Tanh => "gelu_tanh",
            Kind::Erf => "gelu_erf",
        }
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.x.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        if let Some(on) = bridge::device_of(self.name(), &[&self.x, g])? {
            let (x, g) = (bridge::dt(&self.x)?, bridge::dt(g)?);
            let dx = match self.kind {
                Kind::Tanh => launch::gelu_tanh_bwd(&*on.dev, &x, &g)?,
                Kind::Erf => launch::gelu_erf_bwd(&*on.dev, &x, &g)?,
            };
            return Ok(vec![Some(bridge::back(&on, dx)?)]);
        }
        let (xc, gc) = (self.x.contiguous()?, g.contiguous()?);
        let (xs, gs) = (xc.cpu_data::<T>()?, gc.cpu_data::<T>()?);
        if xs.len() != gs.len() {
            bail!(
                "{} backward: gradient {:?} does not match input {:?}",
                self.name(),
                g.shape(),
                self.x.shape()
            );
        }
        let mut dx = OutBuf::<T>::uninit(xs.len());
        match self.kind {
            Kind::Tanh => {
                // derivative times g in one pass
                let simd = has_avx2();
                let o = dx.as_mut_slice();
                if o.len() <= CHUNK {
                    tanh_bwd_any(o, &xs, &gs, simd);
                } else {
                    o.par_chunks_mut(CHUNK)
                        .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                        .for_each(|(o, (x, g))| tanh_bwd_any(o, x, g, simd));
                }
            }
            Kind::Erf => {
                // first the derivative, then scale by g in place
                map_into(dx.as_mut_slice(), &xs, erf_grad::<T>);
                dx.as_mut_slice()
                    .iter_mut()
                    .zip(gs.iter())
                    .for_each(|(d, &gg)| *d *= gg);
            }
        }
        Ok(vec![Some(dx.finish(self.x.shape(), None)?)])
    }
}

// ------------------------------------------------------------------- erfc
//
// Port of erfc from FreeBSD msun s_erf.c (via the Rust `libm` crate):
// ====================================================
// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//
// Developed at SunPro, a Sun Microsystems, Inc. business.
// Permission to use, copy, modify, and distribute this
// software is freely granted, provided that this notice
// is preserved.
// ====================================================
// Error below 1 ulp over the whole line. Method, for |x| in
// [0, 0.84375): erf = x + x R(x^2), R a rational of degree 8/10;
// [0.84375, 1.25): erf(1+s) = c + P1(s)/Q1(s), c = 0.84506291151;
// [1.25, 28): erfc = exp(-x^2 - 0.5625 + R(1/x^2)/S(1/x^2)) / x, with
// -x^2 split as -z^2 + (z-x)(z+x) (z = x with its low word cleared) so the
// exponent keeps full precision; erfc(-x) = 2 - erfc(x).

/// The coefficients exactly as published (more digits than f64 holds).
#[allow(clippy::excessive_precision)]
mod coef {
    pub(super) const ERX: f64 = 8.45062911510467529297e-01;
    pub(super) const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    pub(super) const QQ: [f64; 5] = [
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    pub(super) const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    pub(super) const QA: [f64; 6] = [
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    pub(super) const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    pub(super) const SA: [f64; 8] = [
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    pub(super) const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    pub(super) const SB: [f64; 7] = [
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];
}
use coef::*;

/// Horner evaluation of `c[0] + s c[1] + s^2 c[2] + ...`.
#[inline]
fn horner(s: f64, c: &[f64]) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * s + k)
}

/// `1 + s q[0] + s^2 q[1] + ...`.
#[inline]
fn horner1(s: f64, q: &[f64]) -> f64 {
    1.0 + s * horner(s, q)
}

/// erfc(|x|) for 0.84375 <= |x| < 28 (`ix` = high word of |x|).
fn erfc_mid(ix: u32, x: f64) -> f64 {
    let x = x.abs();
    if ix < 0x3ff4_0000 {
        // |x| < 1.25
        let s = x - 1.0;
        return 1.0 - ERX - horner(s, &PA) / horner1(s, &QA);
    }
    let s = 1.0 / (x * x);
    let (r, big_s) = if ix < 0x4006_db6d {
        // |x| < 1/0.35
        (horner(s, &RA), horner1(s, &SA))
    } else {
        (horner(s, &RB), horner1(s, &SB))
    };
    let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - x) * (z + x) + r / big_s).exp() / x
}

/// Complementary error function, `1 - erf(x)`, in f64 (below 1 ulp).
pub fn erfc(x: f64) -> f64 {
    let hi = (x.to_bits() >> 32) as u32;
    let neg = hi >> 31 != 0;
    let ix = hi & 0x7fff_ffff;
    if ix >= 0x7ff0_0000 {
        // NaN -> NaN, +inf -> 0, -inf -> 2
        return if x.is_nan() {
            x
        } else if neg {
            2.0
        } else {
            0.0
        };
    }
    if ix < 0x3feb_0000 {
        // |x| < 0.84375
        if ix < 0x3c70_0000 {
            return 1.0 - x;
        }
        let z = x * x;
        let y = horner(z, &PP) / horner1(z, &QQ);
        if neg || ix < 0x3fd0_0000 {
            return 1.0 - (x + x * y);
        }
        return 0.5 - (x - 0.5 + x * y);
    }
    if ix < 0x403c_0000 {
        // |x| < 28
        let r = erfc_mid(ix, x);
        return if neg { 2.0 - r } else { r };
    }
    if neg {
        2.0
    } else {
        0.0
    }
}

/// Error function in f64, `1 - erfc(x)` (for |x| < 0.84375 from the series
/// form directly, so small arguments keep full relative precision).
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 0.84375 {
        if ax < 3.725_290_298_461_914e-9 {
            // 2^-28: erf(x) = x (1 + 0.128...) without underflow
            return x + x * PP[0];
        }
        let z = x * x;
        return x + x * (horner(z, &PP) / horner1(z, &QQ));
    }
    let r = 1.0 - erfc(ax);
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    #[test]
    fn erf_known_values() {
        // values from the defining integral (high-precision tables)
        let cases = [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 4e-16, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 4e-16);
        }
        // erfc(5) = 1.5374597944280348e-12, erfc(10) = 2.0884875837625446e-45
        assert!((erfc(5.0) / 1.537_459_794_428_034_8e-12 - 1.0).abs() < 1e-14);
        assert!((erfc(10.0) / 2.088_487_583_762_544_6e-45 - 1.0).abs() < 1e-14);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erfc(f64::NAN).is_nan());
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let v = vec![-1e30f32, -1e4, -40.0, 0.0, 40.0, 1e4, 1e30];
        let x = Tensor::from_vec(v.clone(), &[7], Device::Cpu)
            .unwrap()
            .var();
        for f in [gelu_tanh, gelu_erf] {
            let y = f(&x).unwrap();
            let yv = y.to_vec::<f32>().unwrap();
            for (a, b) in yv.iter().zip(&v) {
                let want = if *b > 0.0 { *b } else { 0.0 };
                assert!((a - want).abs() <= 1e-6 * b.abs(), "{a} vs {want}");
            }
            let g = y.backward().unwrap();
            let gv = g.get(&x).unwrap().to_vec::<f32>().unwrap();
            let want = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0];
            for (a, b) in gv.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{gv:?}");
            }
        }
    }

    #[test]
    fn integer_input_is_an_error() {
        let u = Tensor::zeros(&[3], DType::U32, Device::Cpu).unwrap();
        assert!(gelu_tanh(&u).is_err());
        assert!(gelu_erf(&u).is_err());
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, same_shape_binary, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};

    use kf_engine::DType;
    use kf_kernels::{elementwise, gelu};

    /// GELU, tanh approximation (the elementwise family's `gelu_tanh`).
    pub fn gelu_tanh<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
        unary(dev, "gelu_tanh", elementwise::config(x.numel()), x)
    }

    /// GELU with the exact erf.
    pub fn gelu_erf<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor) -> Out {
        unary(dev, "gelu_erf", gelu::config(x.numel()), x)
    }

    /// `entry(x, g, out, n)`: a GELU backward at the forward's input `x`.
    fn gelu_bwd<D: KernelDevice + ?Sized>(dev: &D, entry: &str, x: &DTensor, g: &DTensor) -> Out {
        same_shape_binary(dev, entry, entry, gelu::config(x.numel()), x, g)
    }

    /// Gradient of GELU (tanh approximation) at the forward's input `x`.
    pub fn gelu_tanh_bwd<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, g: &DTensor) -> Out {
        gelu_bwd(dev, "gelu_tanh_bwd_f32", x, g)
    }

    /// Gradient of GELU (erf) at the forward's input `x`.
    pub fn gelu_erf_bwd<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, g: &DTensor) -> Out {
        gelu_bwd(dev, "gelu_erf_bwd_f32", x, g)
    }

    /// The f32 kernel `<op>_f32(x, out, n)` over `cfg`; errors name `op`.
    fn unary<D: KernelDevice + ?Sized>(
        dev: &D,
        op: &str,
        cfg: kf_kernels::LaunchConfig,
        x: &DTensor,
    ) -> Out {
        f32_in(op, "x", x)?;
        let out = DTensor::uninit(dev, x.shape(), DType::F32)?;
        run(
            dev,
            &format!("{op}_f32"),
            cfg,
            &[
                KArg::Buf(&x.buf),
                KArg::Buf(&out.buf),
                KArg::U64(x.numel() as u64),
            ],
        )?;
        Ok(out)
    }

    /// `gelu_tanh(x [..., C] + b [C])` in one pass (the MLP's bias fused into its activation).
    pub fn bias_gelu_tanh<D: KernelDevice + ?Sized>(dev: &D, x: &DTensor, b: &DTensor) -> Out {
        crate::elementwise::launch::row_bias(dev, "bias_gelu_tanh", x, b)
    }
}
