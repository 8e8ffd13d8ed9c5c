//! Fused cross-entropy: log-softmax + negative log-likelihood of `logits [N, V]`
//! against `targets u32 [N]`, averaged over the rows that are not ignored.
//! One pass per row computes max and log-sum-exp (no `[N, V]` log-probability
//! copy); the backward writes `(softmax - onehot) * g / count` per row.
//! Letters: N rows (positions), V vocabulary.

use crate::dispatch_float;
use crate::kdev::bridge;
use crate::util::{expect_rank, expect_shape, float_dtype};
use crate::util::{fast_exp, for_each_row, has_avx2, row_max_sumexp, FirstBadRow, PAR_MIN_ELEMS};
use anyhow::{bail, ensure, Result};
use kf_engine::autograd::should_record;
use kf_engine::{BackwardOp, DType, Float, OutBuf, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Returns `(mean loss [], per-row losses [N])`. Rows whose target equals
/// `ignore_index` contribute 0 and are not counted; if every row is ignored the
/// loss is 0 with a zero gradient. A target `>= V` that is not the ignore
/// index is an error naming the row. The per-row losses are not
/// differentiable (gradients flow through the mean loss only).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: Option<u32>,
) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    if let Some(on) = bridge::device_of(op, &[logits, targets])? {
        let ce = launch::cross_entropy(
            &*on.dev,
            &bridge::dt(logits)?,
            &bridge::dt(targets)?,
            ignore_index,
        )?;
        let (lse, count) = (bridge::back(&on, ce.lse)?, bridge::back(&on, ce.count)?);
        let mean = bridge::back_recorded(&on, ce.mean.reshape(&[])?, &[logits], || {
            Arc::new(CrossEntropyBackward::<f32> {
                logits: logits.clone(),
                targets: targets.clone(),
                ignore: ignore_index,
                lse,
                count,
                _t: std::marker::PhantomData,
            })
        })?;
        return Ok((mean, bridge::back(&on, ce.loss)?));
    }
    let dt = float_dtype(op, &[logits])?;
    expect_rank(op, "logits", logits, 2)?;
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    ensure!(
        targets.dtype() == DType::U32,
        "{op}: targets must be u32, got {}",
        targets.dtype()
    );
    expect_shape(op, "targets", targets, &[n])?;
    let tv = targets.to_vec::<u32>()?;
    for (i, &t) in tv.iter().enumerate() {
        if Some(t) != ignore_index && t as usize >= v {
            bail!(
                "{op}: target {t} of row {i} is out of range for vocabulary size {v} (logits {:?})",
                logits.shape()
            );
        }
    }
    dispatch_float!(
        op,
        dt,
        cross_entropy_t::<T>(logits, targets, &tv, ignore_index)
    )
}

fn cross_entropy_t<T: Float>(
    logits: &Tensor,
    targets: &Tensor,
    tv: &[u32],
    ignore: Option<u32>,
) -> Result<(Tensor, Tensor)> {
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    let xc = logits.contiguous()?;
    let xs = xc.cpu_data::<T>()?;
    let mut per = OutBuf::<T>::uninit(n);
    let mut lse = vec![T::ZERO; n];
    let count = tv.iter().filter(|&&t| Some(t) != ignore).count();
    if n > 0 {
        // (loss, lse) per row; an ignored row costs nothing
        let bad = FirstBadRow::new();
        let simd = has_avx2();
        let row = |i: usize| -> (T, T) {
            if Some(tv[i]) == ignore {
                return (T::ZERO, T::ZERO);
            }
            let r = &xs[i * v..(i + 1) * v];
            match max_sumexp(r, simd) {
                Some((m, s)) => {
                    let l = m + s.ln();
                    (l - r[tv[i] as usize], l)
                }
                None => {
                    bad.mark(i);
                    (T::ZERO, T::ZERO)
                }
            }
        };
        let res: Vec<(T, T)> = if n * v >= PAR_MIN_ELEMS {
            let min_rows = (PAR_MIN_ELEMS / 2).div_ceil(v.max(1)).max(1);
            (0..n)
                .into_par_iter()
                .with_min_len(min_rows)
                .map(row)
                .collect()
        } else {
            (0..n).map(row).collect()
        };
        if let Some(r) = bad.get() {
            bail!(
                "cross_entropy: row {r} of logits {:?} has no entry above -inf",
                logits.shape()
            );
        }
        for (i, (l, s)) in res.into_iter().enumerate() {
            per.as_mut_slice()[i] = l;
            lse[i] = s;
        }
    }
    drop(xs);
    // the mean over counted rows, accumulated in f64 (N values, cheap)
    let total: f64 = per.as_mut_slice().iter().map(|&l| l.to_f64()).sum();
    let mean = if count == 0 {
        0.0
    } else {
        total / count as f64
    };
    let node = if should_record(&[logits]) {
        Some(Arc::new(CrossEntropyBackward::<T> {
            logits: logits.clone(),
            targets: targets.clone(),
            ignore,
            lse: Tensor::from_cpu_op(lse, &[n], None)?,
            count: Tensor::from_vec(vec![count as u32], &[1], kf_engine::Device::Cpu)?,
            _t: std::marker::PhantomData,
        }) as Arc<dyn BackwardOp>)
    } else {
        None
    };
    let mut lb = OutBuf::<T>::uninit(1);
    lb.as_mut_slice()[0] = T::from_f64(mean);
    Ok((lb.finish(&[], node)?, per.finish(&[n], None)?))
}

/// `dlogits[i, v] = (exp(x[i, v] - lse[i]) - [v == target[i]]) * g / count`,
/// zero rows where the target is ignored.
struct CrossEntropyBackward<T> {
    logits: Tensor,
    targets: Tensor,
    ignore: Option<u32>,
    /// Per-row log-sum-exp `[N]` and the counted rows (u32 `[1]`), on the forward's device.
    lse: Tensor,
    count: Tensor,
    _t: std::marker::PhantomData<T>,
}

impl<T: Float> BackwardOp for CrossEntropyBackward<T> {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.logits.clone(), self.targets.clone()]
    }
    fn backward(&self, _out: &Tensor, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        ensure!(
            g.numel() == 1,
            "cross_entropy backward: gradient of the scalar loss has shape {:?}",
            g.shape()
        );
        let (n, v) = (self.logits.shape()[0], self.logits.shape()[1]);
        if let Some(on) = bridge::device_of("cross_entropy backward", &[&self.logits, g])? {
            let dx = launch::cross_entropy_bwd(
                &*on.dev,
                &bridge::dt(&self.logits)?,
                &bridge::dt(&self.targets)?,
                (&bridge::dt(&self.lse)?, &bridge::dt(&self.count)?),
                &bridge::dt(&g.reshape(&[1])?)?,
                self.ignore,
            )?;
            return Ok(vec![Some(bridge::back(&on, dx)?), None]);
        }
        let count = self.count.to_vec::<u32>()?[0] as usize;
        let lse = self.lse.cpu_data::<T>()?;
        let gv = g.to_vec::<T>()?[0];
        let scale = if count == 0 {
            T::ZERO
        } else {
            gv / T::from_usize(count)
        };
        let tv = self.targets.to_vec::<u32>()?;
        let xc = self.logits.contiguous()?;
        let xs = xc.cpu_data::<T>()?;
        let mut dx = OutBuf::<T>::uninit(n * v);
        if v > 0 {
            let ignore = self.ignore;
            let simd = has_avx2();
            for_each_row(dx.as_mut_slice(), v, |i, d| {
                if Some(tv[i]) == ignore || count == 0 {
                    d.fill(T::ZERO);
                    return;
                }
                grad_row(d, &xs[i * v..(i + 1) * v], lse[i], scale, simd);
                d[tv[i] as usize] -= scale;
            });
        }
        Ok(vec![Some(dx.finish(&[n, v], None)?), None])
    }
}

/// `(max, sum exp(x - max))` of a row (None when fully masked), in AVX2 when `simd`.
#[inline]
fn max_sumexp<T: Float>(r: &[T], simd: bool) -> Option<(T, T)> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is has_avx2().
        return unsafe { max_sumexp_avx2(r) };
    }
    let _ = simd;
    row_max_sumexp(r)
}

/// SAFETY (caller): the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_sumexp_avx2<T: Float>(r: &[T]) -> Option<(T, T)> {
    row_max_sumexp(r)
}

/// `d[j] = exp(x[j] - lse) * scale`, in AVX2 when `simd`.
#[inline]
fn grad_row<T: Float>(d: &mut [T], x: &[T], lse: T, scale: T, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: simd is has_avx2().
        return unsafe { grad_row_avx2(d, x, lse, scale) };
    }
    let _ = simd;
    grad_row_impl(d, x, lse, scale)
}

#[inline(always)]
fn grad_row_impl<T: Float>(d: &mut [T], x: &[T], lse: T, scale: T) {
    for (d, &a) in d.iter_mut().zip(x) {
        *d = fast_exp(a - lse) * scale;
    }
}

/// SAFETY (caller): the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_row_avx2<T: Float>(d: &mut [T], x: &[T], lse: T, scale: T) {
    grad_row_impl(d, x, lse, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::Device;

    fn logits(n: usize, v: usize) -> Tensor {
        let d: Vec<f64> = (0..n * v).map(|i| (i as f64 * 0.7).sin()).collect();
        Tensor::from_vec(d, &[n, v], Device::Cpu).unwrap()
    }
    fn tg(t: &[u32]) -> Tensor {
        Tensor::from_slice(t, &[t.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn bad_targets_are_errors_naming_the_row() {
        let x = logits(3, 5);
        let e = cross_entropy(&x, &tg(&[0, 4, 5]), None).unwrap_err();
        assert!(e.to_string().contains("row 2"), "{e}");
        // the ignore index may lie outside the vocabulary
        assert!(cross_entropy(&x, &tg(&[0, 4, 99]), Some(99)).is_ok());
        assert!(cross_entropy(&x, &tg(&[0, 4]), None).is_err());
        let tf = Tensor::zeros(&[3], DType::F64, Device::Cpu).unwrap();
        assert!(cross_entropy(&x, &tf, None).is_err());
        assert!(cross_entropy(&logits(1, 15).reshape(&[15]).unwrap(), &tg(&[0]), None).is_err());
        let masked = Tensor::full(&[1, 3], f64::NEG_INFINITY, DType::F64, Device::Cpu).unwrap();
        assert!(cross_entropy(&masked, &tg(&[1]), None).is_err());
    }

    #[test]
    fn all_ignored_gives_zero_loss_and_gradient() {
        let x = logits(2, 4).var();
        let (l, per) = cross_entropy(&x, &tg(&[7, 7]), Some(7)).unwrap();
        assert_eq!(l.to_scalar_f64().unwrap(), 0.0);
        assert_eq!(per.to_vec::<f64>().unwrap(), vec![0.0, 0.0]);
        let g = l.backward().unwrap();
        assert!(g
            .get(&x)
            .unwrap()
            .to_vec::<f64>()
            .unwrap()
            .iter()
            .all(|&a| a == 0.0));
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, u32_fits, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::{ensure, Result};
    use kf_engine::DType;
    use kf_kernels::cross_entropy as ce;

    /// Cross-entropy of `logits [N, V]` against u32 `targets [N]`: per-row loss and
    /// log-sum-exp (`[N]`), the mean over rows not ignored (`[1]` f32) and their count (`[1]` u32).
    pub struct CrossEntropy {
        pub loss: DTensor,
        pub lse: DTensor,
        pub mean: DTensor,
        pub count: DTensor,
    }

    fn ce_checks<D: KernelDevice + ?Sized>(
        dev: &D,
        op: &str,
        logits: &DTensor,
        targets: &DTensor,
        ignore: Option<u32>,
    ) -> Result<(usize, usize)> {
        f32_in(op, "logits", logits)?;
        targets.expect_dtype(op, "targets", DType::U32)?;
        ensure!(
            logits.rank() == 2,
            "{op}: logits must be [N, V], got {:?}",
            logits.shape()
        );
        let (n, v) = (logits.shape()[0], logits.shape()[1]);
        ensure!(
            targets.shape() == [n],
            "{op}: targets {:?} must be [{n}]",
            targets.shape()
        );
        ensure!(v > 0, "{op}: no classes");
        u32_fits(op, &[n, v])?;
        if let Some(&bad) = targets
            .to_vec::<D, u32>(dev)?
            .iter()
            .find(|&&t| t as usize >= v && Some(t) != ignore)
        {
            anyhow::bail!("{op}: target {bad} outside the {v} classes");
        }
        Ok((n, v))
    }

    pub fn cross_entropy<D: KernelDevice + ?Sized>(
        dev: &D,
        logits: &DTensor,
        targets: &DTensor,
        ignore: Option<u32>,
    ) -> Result<CrossEntropy> {
        let op = "cross_entropy";
        let (n, v) = ce_checks(dev, op, logits, targets, ignore)?;
        let loss = DTensor::uninit(dev, &[n], DType::F32)?;
        let lse = DTensor::uninit(dev, &[n], DType::F32)?;
        let mean = DTensor::uninit(dev, &[1], DType::F32)?;
        let count = DTensor::uninit(dev, &[1], DType::U32)?;
        let (ig, has) = (ignore.unwrap_or(0), ignore.is_some() as i32);
        if n > 0 {
            run(
                dev,
                "cross_entropy_fwd_f32",
                ce::fwd_config(n, v),
                &[
                    KArg::Buf(&logits.buf),
                    KArg::Buf(&targets.buf),
                    KArg::Buf(&loss.buf),
                    KArg::Buf(&lse.buf),
                    KArg::U32(n as u32),
                    KArg::U32(v as u32),
                    KArg::U32(ig),
                    KArg::I32(has),
                ],
            )?;
        }
        run(
            dev,
            "cross_entropy_mean_f32",
            ce::mean_config(n),
            &[
                KArg::Buf(&loss.buf),
                KArg::Buf(&targets.buf),
                KArg::Buf(&mean.buf),
                KArg::Buf(&count.buf),
                KArg::U32(n as u32),
                KArg::U32(ig),
                KArg::I32(has),
            ],
        )?;
        Ok(CrossEntropy {
            loss,
            lse,
            mean,
            count,
        })
    }

    /// Gradient of the mean cross-entropy w.r.t. the logits, scaled by the device scalar `g`
    /// (`[1]` f32, the gradient of the mean loss; 1 for a loss that is the mean itself), from the
    /// forward's `lse` and `count` ([`CrossEntropy`]).
    pub fn cross_entropy_bwd<D: KernelDevice + ?Sized>(
        dev: &D,
        logits: &DTensor,
        targets: &DTensor,
        (lse, count): (&DTensor, &DTensor),
        g: &DTensor,
        ignore: Option<u32>,
    ) -> Out {
        let op = "cross_entropy_bwd";
        f32_in(op, "logits", logits)?;
        targets.expect_dtype(op, "targets", DType::U32)?;
        f32_in(op, "grad", g)?;
        ensure!(
            logits.rank() == 2,
            "{op}: logits must be [N, V], got {:?}",
            logits.shape()
        );
        let (n, v) = (logits.shape()[0], logits.shape()[1]);
        ensure!(
            targets.shape() == [n] && lse.shape() == [n] && g.numel() == 1,
            "{op}: targets {:?}, lse {:?}, grad {:?} do not fit logits {:?}",
            targets.shape(),
            lse.shape(),
            g.shape(),
            logits.shape()
        );
        let out = DTensor::uninit(dev, logits.shape(), DType::F32)?;
        if n == 0 {
            return Ok(out);
        }
        run(
            dev,
            "cross_entropy_bwd_f32",
            ce::bwd_config(n, v),
            &[
                KArg::Buf(&logits.buf),
                KArg::Buf(&targets.buf),
                KArg::Buf(&lse.buf),
                KArg::Buf(&g.buf),
                KArg::Buf(&count.buf),
                KArg::Buf(&out.buf),
                KArg::U32(n as u32),
                KArg::U32(v as u32),
                KArg::U32(ignore.unwrap_or(0)),
                KArg::I32(ignore.is_some() as i32),
            ],
        )?;
        Ok(out)
    }
}
