//! SwiGLU, the Llama family's MLP activation: `swiglu(gu [.., 2F]) = silu(gate) * up` with
//! `gate = gu[.., :F]`, `up = gu[.., F:]` (the two projections come out of one GEMM whose
//! weight stacks W_gate over W_up) and `silu(a) = a * sigmoid(a)`. On a kernel device:
//! kernels/swiglu.cu (f32).

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_shape, float_dtype, for_each_row};
use anyhow::{ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, Float, OutBuf, Tensor};
use std::sync::Arc;

/// `silu(gu[.., :F]) * gu[.., F:]` of `gu [.., 2F]`: `[.., F]`.
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let op = "swiglu";
    ensure!(
        gu.rank() >= 1 && gu.shape()[gu.rank() - 1] % 2 == 0,
        "{op}: the last dimension must be even ([.., 2F]: gate then up), got {:?}",
        gu.shape()
    );
    if let Some(on) = bridge::device_of(op, &[gu])? {
        let y = launch::swiglu(&*on.dev, &bridge::dt(gu)?)?;
        return bridge::back_recorded(&on, y, &[gu], || {
            Arc::new(SwigluBackward::<f32> {
                gu: gu.clone(),
                _t: std::marker::PhantomData,
            })
        });
    }
    let dt = float_dtype(op, &[gu])?;
    dispatch_float!(op, dt, swiglu_t::<T>(gu))
}

#[inline(always)]
fn sigmoid<T: Float>(a: T) -> T {
    T::ONE / (T::ONE + (-a).exp())
}

fn swiglu_t<T: Float>(gu: &Tensor) -> Result<Tensor> {
    let two_f = gu.shape()[gu.rank() - 1];
    let f = two_f / 2;
    let mut shape = gu.shape().to_vec();
    *shape.last_mut().unwrap() = f;
    let gc = gu.contiguous()?;
    let xs = gc.cpu_data::<T>()?;
    let mut out = OutBuf::<T>::uninit(xs.len() / 2);
    if f > 0 {
        let xs = &*xs;
        for_each_row(out.as_mut_slice(), f, |i, o| {
            let (gate, up) = xs[i * two_f..(i + 1) * two_f].split_at(f);
            for j in 0..f {
                o[j] = gate[j] * sigmoid(gate[j]) * up[j];
            }
        });
    }
    drop(xs);
    let node = should_record(&[gu]).then(|| {
        Arc::new(SwigluBackward::<T> {
            gu: gu.clone(),
            _t: std::marker::PhantomData,
        }) as Arc<dyn BackwardOp>
    });
    out.finish(&shape, node)
}

/// With `s = sigmoid(a)`: `d gate = g * up * s * (1 + a (1 - s))`, `d up = g * a * s`.
struct SwigluBackward<T> {
    gu: Tensor,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for SwigluBackward<T> {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.gu.clone()]
    }
    fn backward(&self, out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        expect_shape("swiglu backward", "gradient", g, out.shape())?;
        if let Some(on) = bridge::device_of("swiglu backward", &[&self.gu, g])? {
            let d = launch::swiglu_bwd(&*on.dev, &bridge::dt(&self.gu)?, &bridge::dt(g)?)?;
            return Ok(vec![Some(bridge::back(&on, d)?)]);
        }
        let two_f = self.gu.shape()[self.gu.rank() - 1];
        let f = two_f / 2;
        let (xc, gc) = (self.gu.contiguous()?, g.contiguous()?);
        let (xs, gs) = (xc.cpu_data::<T>()?, gc.cpu_data::<T>()?);
        let mut dx = OutBuf::<T>::uninit(xs.len());
        if f > 0 {
            let (xs, gs) = (&*xs, &*gs);
            for_each_row(dx.as_mut_slice(), two_f, |i, d| {
                let (gate, up) = xs[i * two_f..(i + 1) * two_f].split_at(f);
                let gr = &gs[i * f..(i + 1) * f];
                let (dg, du) = d.split_at_mut(f);
                for j in 0..f {
                    let (a, s) = (gate[j], sigmoid(gate[j]));
                    dg[j] = gr[j] * up[j] * s * (T::ONE + a * (T::ONE - s));
                    du[j] = gr[j] * a * s;
                }
            });
        }
        Ok(vec![Some(dx.finish(self.gu.shape(), None)?)])
    }
}

/// The kernel launchers of SwiGLU (kernels/swiglu.cu), f32, shapes checked before a launch.
pub mod launch {
    use crate::kdev::{f32_in, run};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::{ensure, Result};
    use kf_engine::DType;
    use kf_kernels::elementwise;

    /// `(rows, F)` of `gu [.., 2F]`.
    fn halves(op: &str, gu: &DTensor) -> Result<(Vec<usize>, usize)> {
        let two_f = gu.shape().last().copied().unwrap_or(0);
        ensure!(
            gu.shape().len() >= 1 && two_f % 2 == 0,
            "{op}: gu {:?} must be [.., 2F]",
            gu.shape()
        );
        let mut shape = gu.shape().to_vec();
        *shape.last_mut().unwrap() = two_f / 2;
        Ok((shape, two_f / 2))
    }

    /// `silu(gu[.., :F]) * gu[.., F:]`: `[.., F]`.
    pub fn swiglu<D: KernelDevice + ?Sized>(dev: &D, gu: &DTensor) -> Result<DTensor> {
        let op = "swiglu";
        f32_in(op, "gu", gu)?;
        let (shape, f) = halves(op, gu)?;
        let y = DTensor::uninit(dev, &shape, DType::F32)?;
        let n = y.numel();
        if n > 0 {
            run(
                dev,
                "swiglu_fwd_f32",
                elementwise::config(n),
                &[
                    KArg::Buf(&gu.buf),
                    KArg::Buf(&y.buf),
                    KArg::U64(n as u64),
                    KArg::U64(f as u64),
                ],
            )?;
        }
        Ok(y)
    }

    /// The gradient of `gu` from `g [.., F]`.
    pub fn swiglu_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        gu: &DTensor,
        g: &DTensor,
    ) -> Result<DTensor> {
        let op = "swiglu_bwd";
        f32_in(op, "gu", gu)?;
        f32_in(op, "grad", g)?;
        let (shape, f) = halves(op, gu)?;
        ensure!(
            g.shape() == shape.as_slice(),
            "{op}: grad {:?} must be {shape:?}",
            g.shape()
        );
        let dgu = DTensor::uninit(dev, gu.shape(), DType::F32)?;
        let n = g.numel();
        if n > 0 {
            run(
                dev,
                "swiglu_bwd_f32",
                elementwise::config(n),
                &[
                    KArg::Buf(&gu.buf),
                    KArg::Buf(&g.buf),
                    KArg::Buf(&dgu.buf),
                    KArg::U64(n as u64),
                    KArg::U64(f as u64),
                ],
            )?;
        }
        Ok(dgu)
    }
}
