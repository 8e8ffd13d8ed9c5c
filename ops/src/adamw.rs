//! The AdamW optimiser step (PyTorch `torch.optim.AdamW` semantics, decoupled
//! weight decay), updating a parameter and its two moment buffers in place.
//! Not differentiable; runs outside the tape. All tensors share one shape.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_shape, float_dtype};
use anyhow::{bail, ensure, Result};
use kf_engine::{Float, Tensor};
use rayon::prelude::*;

/// Hyper-parameters of AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// One AdamW step (`step` counts from 1) on `param` with gradient `grad` and
/// moments `m`, `v`, all contiguous, of one shape and float dtype:
/// `p *= 1 - lr·wd; m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²;
/// p -= lr · m̂ / (sqrt(v̂) + eps)` with `m̂ = m / (1-b1^t)`, `v̂ = v / (1-b2^t)`.
/// `param`, `m` and `v` are written in place; `grad` is only read.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    if let Some(on) = bridge::device_of("adamw", &[param, grad, m, v])? {
        // in place on the device buffers the tensors share with their DTensor views: the
        // updated ones must be whole buffers (a gathered copy would drop the update)
        let inplace = crate::kdev::bridge::dt_in_place;
        return launch::adamw_step(
            &*on.dev,
            &inplace(param)?,
            &bridge::dt(grad)?,
            &inplace(m)?,
            &inplace(v)?,
            step,
            cfg,
        );
    }
    let d = float_dtype("adamw", &[param, grad, m, v])?;
    for (what, t) in [("grad", grad), ("m", m), ("v", v)] {
        expect_shape("adamw", what, t, param.shape())?;
    }
    let named = [("param", param), ("grad", grad), ("m", m), ("v", v)];
    for (i, (wa, a)) in named.iter().enumerate() {
        ensure!(
            a.is_contiguous(),
            "adamw: {wa} of shape {:?} is not contiguous (strides {:?})",
            a.shape(),
            a.strides()
        );
        for (wb, b) in &named[i + 1..] {
            // a write lock on a storage we also read would deadlock
            if a.same_storage(b) {
                bail!("adamw: {wa} and {wb} share storage; each needs its own buffer");
            }
        }
    }
    ensure!(step >= 1, "adamw: step counts from 1, got 0");
    ensure!(
        (0.0..1.0).contains(&cfg.beta1) && (0.0..1.0).contains(&cfg.beta2),
        "adamw: betas must lie in [0, 1), got {} and {}",
        cfg.beta1,
        cfg.beta2
    );
    ensure!(
        cfg.lr.is_finite() && cfg.eps.is_finite() && cfg.weight_decay.is_finite() && cfg.eps >= 0.0,
        "adamw: lr, eps and weight_decay must be finite and eps >= 0 ({cfg:?})"
    );
    dispatch_float!("adamw", d, adamw_t::<T>(param, grad, m, v, step, cfg))
}

fn adamw_t<T: Float>(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    // As in PyTorch's single-tensor AdamW: scalars in f64, then cast;
    // p -= step_size · m / (sqrt(v) / sqrt(bc2) + eps) is lr · m̂ / (sqrt(v̂) + eps).
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    let decay = T::from_f64(1.0 - cfg.lr * cfg.weight_decay);
    let (b1, b2) = (T::from_f64(cfg.beta1), T::from_f64(cfg.beta2));
    let (c1, c2) = (T::from_f64(1.0 - cfg.beta1), T::from_f64(1.0 - cfg.beta2));
    let step_size = T::from_f64(cfg.lr / bc1);
    let bc2_sqrt = T::from_f64(bc2.sqrt());
    let eps = T::from_f64(cfg.eps);
    let kernel = |p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *p *= decay;
            *m = b1 * *m + c1 * g;
            *v = b2 * *v + c2 * g * g;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
    };
    let gs = grad.cpu_data::<T>()?;
    param.with_cpu_data_mut::<T, _>(|p| {
        m.with_cpu_data_mut::<T, _>(|ms| {
            v.with_cpu_data_mut::<T, _>(|vs| {
                if p.len() >= 2 * CHUNK {
                    p.par_chunks_mut(CHUNK)
                        .zip(gs.par_chunks(CHUNK))
                        .zip(ms.par_chunks_mut(CHUNK))
                        .zip(vs.par_chunks_mut(CHUNK))
                        .for_each(|(((p, g), m), v)| kernel(p, g, m, v));
                } else {
                    kernel(p, &gs, ms, vs);
                }
            })
        })
    })???;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::{DType, Device};

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn one_step_matches_hand_computation() {
        let (p, g, m, v) = (
            t(&[1.0, -2.0]),
            t(&[0.5, 0.1]),
            t(&[0.0, 0.0]),
            t(&[0.0, 0.0]),
        );
        let cfg = AdamWConfig::default();
        adamw_step(&p, &g, &m, &v, 1, &cfg).unwrap();
        // first step: m̂ = g, v̂ = g², update = lr · g / (|g| + eps) ≈ lr · sign(g)
        let pv = p.to_vec::<f64>().unwrap();
        let want0 = 1.0 * (1.0 - 3e-4 * 0.1) - 3e-4 * 0.5 / (0.5 + 1e-8);
        assert!((pv[0] - want0).abs() < 1e-15);
        assert!((m.to_vec::<f64>().unwrap()[0] - 0.05).abs() < 1e-15);
        assert!((v.to_vec::<f64>().unwrap()[1] - 0.05 * 0.01).abs() < 1e-15);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = AdamWConfig::default();
        let p = t(&[1.0, 2.0]);
        let g = t(&[1.0, 2.0]);
        let m = t(&[0.0, 0.0]);
        let v = t(&[0.0, 0.0]);
        assert!(adamw_step(&p, &g, &m, &v, 0, &cfg).is_err());
        assert!(adamw_step(&p, &g, &m, &t(&[0.0]), 1, &cfg).is_err());
        let e = adamw_step(&p, &g, &m, &m, 1, &cfg).unwrap_err().to_string();
        assert!(e.contains("share storage"), "{e}");
        assert!(adamw_step(&p, &p.detach(), &m, &v, 1, &cfg).is_err());
        let f = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        assert!(adamw_step(&p, &f, &m, &v, 1, &cfg).is_err());
        let nc = Tensor::zeros(&[2, 2], DType::F64, Device::Cpu)
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let z = || Tensor::zeros(&[2, 2], DType::F64, Device::Cpu).unwrap();
        assert!(adamw_step(&nc, &z(), &z(), &z(), 1, &cfg).is_err());
        let bad = AdamWConfig { beta1: 1.0, ..cfg };
        assert!(adamw_step(&p, &g, &m, &v, 1, &bad).is_err());
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, same_shape};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::{ensure, Result};

    use kf_kernels::adamw;

    /// One AdamW step (`step` counted from 1) in place on f32 `p`, moments `m`, `v` with
    /// gradient `g` (same shapes): the CPU op's hyper-parameters and scalars
    /// (`kf_kernels::adamw::Scalars`, PyTorch's order), so the result has the CPU op's bits.
    pub fn adamw_step<D: KernelDevice + ?Sized>(
        dev: &D,
        p: &DTensor,
        g: &DTensor,
        m: &DTensor,
        v: &DTensor,
        step: u64,
        cfg: &crate::adamw::AdamWConfig,
    ) -> Result<()> {
        let op = "adamw";
        ensure!(step >= 1, "{op}: step is counted from 1");
        let s = adamw::Scalars::new(
            cfg.lr,
            cfg.beta1,
            cfg.beta2,
            cfg.eps,
            cfg.weight_decay,
            step,
        );
        for (what, t) in [("param", p), ("grad", g), ("m", m), ("v", v)] {
            f32_in(op, what, t)?;
            same_shape(op, p, t)?;
        }
        let n = p.numel();
        let mut args = vec![
            KArg::Buf(&p.buf),
            KArg::Buf(&g.buf),
            KArg::Buf(&m.buf),
            KArg::Buf(&v.buf),
            KArg::U64(n as u64),
        ];
        args.extend(s.as_array().map(KArg::F32));
        run(dev, "adamw_f32", adamw::config(n), &args)
    }
}
