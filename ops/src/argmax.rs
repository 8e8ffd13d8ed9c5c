//! Reading tokens off the student's hint positions (KFORCING.md section 4):
//! argmax with an optional frequency penalty whose counts are updated left to
//! right inside the block. B batch rows, K hint positions, V vocabulary.

use crate::kdev::bridge;
use anyhow::{bail, ensure, Result};
use kf_engine::{DType, Float, OutBuf, Tensor};
use rayon::prelude::*;

/// Below this many logits in total the op stays on one thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Why one position failed (turned into a message naming (b, i)).
#[derive(Debug, Clone, Copy)]
enum PosError {
    Nan { v: usize },
    AllNegInf,
}

/// For each batch row `b` and each position `i = 0..K` in order:
/// `token = argmax_v (logits[b,i,v] - penalty * counts[b,v])` (first maximum
/// on ties), then `counts[b, token] += 1`, so later positions of the same
/// block see it. `logits [B, K, V]` f32/f64, `counts` u32 `[B, V]` contiguous,
/// updated IN PLACE (saturating at u32::MAX). `penalty` must be finite; 0 is
/// a plain argmax (counts are still updated). The scores are computed in f64
/// (`l - penalty * c`), so f32 and f64 logits rank identically when their
/// values agree. Returns u32 `[B, K]`. Errors name (b, i) for a NaN logit or
/// a position whose logits are all -inf. Parallel over b.
pub fn argmax_penalty(logits: &Tensor, counts: &Tensor, penalty: f64) -> Result<Tensor> {
    const OP: &str = "argmax_penalty";
    if let Some(on) = bridge::device_of(OP, &[logits, counts])? {
        let y = launch::argmax_penalty(
            &*on.dev,
            &bridge::dt(logits)?,
            &bridge::dt_in_place(counts)?,
            penalty,
        )?;
        return bridge::back(&on, y);
    }
    let d = crate::util::float_dtype(OP, &[logits])?;
    ensure!(
        logits.rank() == 3,
        "{OP}: logits must have shape [B, K, V], got {:?}",
        logits.shape()
    );
    let (b, k, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    ensure!(
        counts.dtype() == DType::U32,
        "{OP}: counts must be u32, got {}",
        counts.dtype()
    );
    crate::util::expect_shape(OP, "counts", counts, &[b, v])?;
    ensure!(
        counts.is_contiguous(),
        "{OP}: counts (shape {:?}) must be contiguous: it is updated in place",
        counts.shape()
    );
    ensure!(
        penalty.is_finite(),
        "{OP}: penalty must be finite, got {penalty}"
    );
    ensure!(
        v > 0 || b * k == 0,
        "{OP}: empty vocabulary (logits {:?})",
        logits.shape()
    );
    let lc = logits.contiguous()?;
    crate::dispatch_float!(OP, d, go::<T>(&lc, counts, b, k, v, penalty))
}

fn go<T: Float>(
    lc: &Tensor,
    counts: &Tensor,
    b: usize,
    k: usize,
    v: usize,
    penalty: f64,
) -> Result<Tensor> {
    const OP: &str = "argmax_penalty";
    let data = lc.cpu_data::<T>()?;
    let mut out = OutBuf::<u32>::uninit(b * k);
    if b * k == 0 {
        return out.finish(&[b, k], None);
    }
    // One entry per batch row: Ok or the first failing position of that row.
    let res: Vec<Result<(), (usize, PosError)>> = counts.with_cpu_data_mut::<u32, _>(|cnt| {
        let block = |((toks, cnt_row), logit_block): ((&mut [u32], &mut [u32]), &[T])| {
            for (i, tok) in toks.iter_mut().enumerate() {
                let row = &logit_block[i * v..(i + 1) * v];
                let t = if penalty == 0.0 {
                    plain_argmax(row)
                } else {
                    penalised_argmax(row, cnt_row, penalty)
                }
                .map_err(|e| (i, e))?;
                *tok = t as u32;
                cnt_row[t] = cnt_row[t].saturating_add(1);
            }
            Ok(())
        };
        let toks = out.as_mut_slice();
        if b * k * v >= PAR_MIN_ELEMS && b > 1 {
            toks.par_chunks_mut(k)
                .zip(cnt.par_chunks_mut(v))
                .zip(data.par_chunks(k * v))
                .map(block)
                .collect()
        } else {
            toks.chunks_mut(k)
                .zip(cnt.chunks_mut(v))
                .zip(data.chunks(k * v))
                .map(block)
                .collect()
        }
    })?;
    for (bi, r) in res.into_iter().enumerate() {
        match r {
            Ok(()) => {}
            Err((i, PosError::Nan { v })) => {
                bail!("{OP}: logits contain NaN at (b {bi}, i {i}) (vocabulary index {v})")
            }
            Err((i, PosError::AllNegInf)) => {
                bail!("{OP}: all logits are -inf at (b {bi}, i {i})")
            }
        }
    }
    out.finish(&[b, k], None)
}

/// First maximum of one row (compared in the logits' own dtype, which ranks
/// exactly like f64 since the conversion is exact and monotone).
fn plain_argmax<T: Float>(row: &[T]) -> Result<usize, PosError> {
    let mut best = 0;
    let mut m = row[0];
    let mut nan = m.is_nan();
    for (j, &x) in row.iter().enumerate().skip(1) {
        nan |= x.is_nan();
        if x > m {
            m = x;
            best = j;
        }
    }
    if nan {
        let v = row.iter().position(|x| x.is_nan()).unwrap_or(0);
        return Err(PosError::Nan { v });
    }
    if m == T::NEG_INFINITY {
        return Err(PosError::AllNegInf);
    }
    Ok(best)
}

fn penalised_argmax<T: Float>(row: &[T], cnt: &[u32], penalty: f64) -> Result<usize, PosError> {
    let mut best = 0;
    let mut m = f64::NEG_INFINITY;
    let mut nan = false;
    for (j, (&x, &c)) in row.iter().zip(cnt).enumerate() {
        nan |= x.is_nan();
        // penalty * count may overflow f64 (a huge penalty): clamped, so a finite logit
        // keeps a finite score (-inf would make the position look like "all -inf")
        let s = x.to_f64() - (penalty * c as f64).clamp(-f64::MAX, f64::MAX);
        if s > m {
            m = s;
            best = j;
        }
    }
    if nan {
        let v = row.iter().position(|x| x.is_nan()).unwrap_or(0);
        return Err(PosError::Nan { v });
    }
    if m == f64::NEG_INFINITY {
        return Err(PosError::AllNegInf);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kf_engine::Device;

    fn l3(v: &[f64], s: [usize; 3]) -> Tensor {
        Tensor::from_slice(v, &s, Device::Cpu).unwrap()
    }
    fn counts(v: &[u32], s: [usize; 2]) -> Tensor {
        Tensor::from_slice(v, &s, Device::Cpu).unwrap()
    }

    #[test]
    fn penalty_sees_earlier_positions_of_the_block() {
        // two positions with identical logits; the penalty moves the second
        let l = l3(&[1.0, 0.9, 0.0, 1.0, 0.9, 0.0], [1, 2, 3]);
        let c = counts(&[0, 0, 0], [1, 3]);
        let t = argmax_penalty(&l, &c, 0.5).unwrap();
        assert_eq!(t.to_vec::<u32>().unwrap(), vec![0, 1]);
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![1, 1, 0]);
        // penalty 0: plain argmax, counts still updated
        let c = counts(&[5, 0, 0], [1, 3]);
        let t = argmax_penalty(&l, &c, 0.0).unwrap();
        assert_eq!(t.to_vec::<u32>().unwrap(), vec![0, 0]);
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![7, 0, 0]);
    }

    #[test]
    fn ties_take_the_first_and_f32_matches() {
        let l = l3(&[2.0, 3.0, 3.0, f64::NEG_INFINITY], [1, 1, 4]);
        let c = counts(&[0; 4], [1, 4]);
        assert_eq!(
            argmax_penalty(&l, &c, 0.0)
                .unwrap()
                .to_vec::<u32>()
                .unwrap(),
            vec![1]
        );
        let l32 = l.to_dtype(DType::F32).unwrap();
        let c = counts(&[0, 1, 0, 0], [1, 4]);
        assert_eq!(
            argmax_penalty(&l32, &c, 1.0)
                .unwrap()
                .to_vec::<u32>()
                .unwrap(),
            vec![2]
        );
    }

    #[test]
    fn errors_name_the_position() {
        let mut v = vec![0.0; 2 * 3 * 4];
        v[(3 + 2) * 4 + 1] = f64::NAN; // b 1, i 2
        let c = counts(&[0; 8], [2, 4]);
        for p in [0.0, 0.3] {
            let e = argmax_penalty(&l3(&v, [2, 3, 4]), &c, p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("NaN at (b 1, i 2)"), "{e}");
        }
        let l = l3(&[f64::NEG_INFINITY; 4], [1, 1, 4]);
        let c1 = counts(&[0; 4], [1, 4]);
        assert!(argmax_penalty(&l, &c1, 0.0)
            .unwrap_err()
            .to_string()
            .contains("-inf"));
        let l = l3(&[0.0; 8], [2, 1, 4]);
        assert!(argmax_penalty(&l, &counts(&[0; 4], [1, 4]), 0.0).is_err()); // shape
        assert!(argmax_penalty(&l, &c, f64::NAN).is_err());
        let cf = Tensor::zeros(&[2, 4], DType::F32, Device::Cpu).unwrap();
        assert!(argmax_penalty(&l, &cf, 0.0).is_err()); // dtype
        let ct = counts(&[0; 8], [4, 2]).transpose(0, 1).unwrap();
        assert!(argmax_penalty(&l, &ct, 0.0).is_err()); // not contiguous
        assert!(argmax_penalty(&l3(&[0.0; 4], [2, 2, 1]).reshape(&[4]).unwrap(), &c, 0.0).is_err());
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{f32_in, run, Out};
    use crate::kdev::{DTensor, KArg, KernelDevice};
    use anyhow::ensure;
    use kf_engine::DType;
    use kf_kernels::argmax;

    /// Greedy read-off with a frequency penalty (`kf_ops::argmax::argmax_penalty`): for each batch
    /// row b and its K positions in order, the argmax of `logits[b, i] - penalty * counts[b]`,
    /// counting each chosen token into `counts [B, V]` (u32, updated in place on the device).
    /// Returns tokens `[B, K]` u32; a NaN row gives [`TOKEN_NAN`], an all -inf row
    /// [`TOKEN_ALL_NEG_INF`] (see [`tokens_to_host`]).
    pub fn argmax_penalty<D: KernelDevice + ?Sized>(
        dev: &D,
        logits: &DTensor,
        counts: &DTensor,
        penalty: f64,
    ) -> Out {
        let op = "argmax_penalty";
        f32_in(op, "logits", logits)?;
        counts.expect_dtype(op, "counts", DType::U32)?;
        ensure!(
            logits.rank() == 3,
            "{op}: logits must be [B, K, V], got {:?}",
            logits.shape()
        );
        let (b, k, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
        ensure!(
            counts.shape() == [b, v],
            "{op}: counts {:?} must be [B, V] = [{b}, {v}]",
            counts.shape()
        );
        ensure!(v >= 1, "{op}: empty vocabulary");
        ensure!(penalty.is_finite(), "{op}: penalty {penalty} is not finite");
        let out = DTensor::uninit(dev, &[b, k], DType::U32)?;
        if b * k > 0 {
            run(
                dev,
                "argmax_penalty_f32",
                argmax::config(b, v),
                &[
                    KArg::Buf(&logits.buf),
                    KArg::Buf(&counts.buf),
                    KArg::Buf(&out.buf),
                    KArg::U32(b as u32),
                    KArg::U32(k as u32),
                    KArg::U32(v as u32),
                    KArg::F64(penalty),
                ],
            )?;
        }
        Ok(out)
    }
}
