//! Sinusoidal features of a scalar per position (the noise encoder's view of
//! `u` and of `tau`, KFORCING.md section 4). N positions, d feature channels
//! (d/2 frequencies). Not differentiable: its inputs are noise, not parameters.

use crate::kdev::bridge;
use anyhow::{ensure, Result};
use kf_engine::{DType, Device, Element, OutBuf, Tensor};
use rayon::prelude::*;

/// Below this many output elements the kernel stays on one thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Features `[N, d]` of the values `s [N]`: for `j in 0..d/2`,
/// `f_j = 10000^(-j/(d/2))`, `out[n, j] = cos(2π·s_n·f_j)` and
/// `out[n, d/2 + j] = sin(2π·s_n·f_j)`.
///
/// Order: all cosines first, then all sines (concatenated, not interleaved),
/// as in MDLM's `TimestepEmbedder`; KFORCING.md writes `[cos, sin]` without
/// fixing the layout, so this is our choice and the checkpoint format follows
/// it. Computed in f64 whatever the input dtype, then cast to `dtype` (f32 or
/// f64). `d` must be even and positive. No backward node is ever recorded.
pub fn noise_features(s: &Tensor, d: usize, dtype: DType) -> Result<Tensor> {
    if let Some(on) = bridge::device_of("noise_features", &[s])? {
        ensure!(
            s.rank() == 1 && dtype == DType::F32,
            "noise_features on {}: s must be [N] and the features f32 (got {:?}, {dtype})",
            on.device,
            s.shape()
        );
        // the kernel reads f64 levels (the spec computes the features in f64)
        let y = launch::noise_features(&*on.dev, &bridge::dt_as(s, DType::F64)?, d)?;
        return bridge::back(&on, y);
    }
    ensure!(
        s.rank() == 1,
        "noise_features: s must have shape [N], got {:?}",
        s.shape()
    );
    ensure!(
        s.dtype().is_float(),
        "noise_features: s must be a float tensor, got {}",
        s.dtype()
    );
    ensure!(
        s.device() == Device::Cpu,
        "noise_features: s is on {}, the CPU body needs it on the cpu",
        s.device()
    );
    ensure!(
        d > 0 && d & 1 == 0,
        "noise_features: feature size d must be even and positive, got {d}"
    );
    let vals = s.to_vec_f64()?;
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "noise_features: s[{i}] = {} is not finite (s has shape {:?})",
            vals[i],
            s.shape()
        );
    }
    match dtype {
        DType::F32 => features_t::<f32>(&vals, d),
        DType::F64 => features_t::<f64>(&vals, d),
        other => anyhow::bail!("noise_features: output dtype must be f32 or f64, got {other}"),
    }
}

/// The frequencies `f_j = 10000^(-j/half)`, `j = 0..half`.
fn frequencies(half: usize) -> Vec<f64> {
    (0..half)
        .map(|j| 10000f64.powf(-(j as f64) / half as f64))
        .collect()
}

fn features_t<T: Element>(vals: &[f64], d: usize) -> Result<Tensor> {
    let n = vals.len();
    let half = d / 2;
    let freqs = frequencies(half);
    let mut out = OutBuf::<T>::uninit(n * d);
    let fill = |(row, &s): (&mut [T], &f64)| {
        let (cos_part, sin_part) = row.split_at_mut(half);
        for ((c, sn), &f) in cos_part.iter_mut().zip(sin_part.iter_mut()).zip(&freqs) {
            let (sv, cv) = (std::f64::consts::TAU * s * f).sin_cos();
            *c = T::from_f64(cv);
            *sn = T::from_f64(sv);
        }
    };
    if n * d >= PAR_MIN_ELEMS {
        out.as_mut_slice()
            .par_chunks_mut(d)
            .zip(vals.par_iter())
            .for_each(fill);
    } else {
        out.as_mut_slice()
            .chunks_mut(d)
            .zip(vals.iter())
            .for_each(fill);
    }
    out.finish(&[n, d], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn layout_is_cos_then_sin() {
        let out = noise_features(&t(&[0.25]), 4, DType::F64).unwrap();
        assert_eq!(out.shape(), &[1, 4]);
        let v = out.to_vec::<f64>().unwrap();
        // f_0 = 1, f_1 = 10000^(-1/2) = 0.01
        let a0 = std::f64::consts::TAU * 0.25;
        let a1 = std::f64::consts::TAU * 0.25 * 0.01;
        let want = [a0.cos(), a1.cos(), a0.sin(), a1.sin()];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{v:?} vs {want:?}");
        }
    }

    #[test]
    fn f32_output_and_empty_input() {
        let out = noise_features(&t(&[0.5, 1.0]).to_dtype(DType::F32).unwrap(), 8, DType::F32);
        let out = out.unwrap();
        assert_eq!((out.shape(), out.dtype()), (&[2usize, 8][..], DType::F32));
        let e = noise_features(&t(&[]), 6, DType::F32).unwrap();
        assert_eq!(e.shape(), &[0, 6]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = t(&[0.5]);
        assert!(noise_features(&s, 0, DType::F32).is_err());
        assert!(noise_features(&s, 7, DType::F32).is_err());
        assert!(noise_features(&s, 8, DType::U32).is_err());
        assert!(noise_features(&t(&[f64::NAN]), 8, DType::F32).is_err());
        let m = Tensor::from_slice(&[0.5f64, 0.5], &[1, 2], Device::Cpu).unwrap();
        assert!(noise_features(&m, 8, DType::F32).is_err());
        let ids = Tensor::from_slice(&[1u32], &[1], Device::Cpu).unwrap();
        assert!(noise_features(&ids, 8, DType::F32).is_err());
    }
}

/// The kernel launchers of this op family (forward and backward), generic over a
/// [`KernelDevice`]: shapes and dtypes are checked before anything is launched, and errors name
/// the op (see [`crate::kdev`]).
pub mod launch {

    use crate::kdev::{run, Out};
    use crate::kdev::{DTensor, DeviceBuf, KArg, KernelDevice};
    use anyhow::{ensure, Result};
    use kf_engine::DType;
    use kf_kernels::{noise, philox};

    /// Sinusoidal features of f64 noise levels `s [N]` (the CPU op `noise_features`): `[N, d]` f32.
    pub fn noise_features<D: KernelDevice + ?Sized>(dev: &D, s: &DTensor, d: usize) -> Out {
        let out = DTensor::uninit(dev, &[s.numel(), d], DType::F32)?;
        noise_features_into(dev, s, d, &out.buf, d)?;
        Ok(out)
    }

    /// [`noise_features`] into rows `ld` f32 apart of `out` (columns `d..ld` untouched).
    pub fn noise_features_into<D: KernelDevice + ?Sized>(
        dev: &D,
        s: &DTensor,
        d: usize,
        out: &DeviceBuf,
        ld: usize,
    ) -> Result<()> {
        let op = "noise_features";
        s.expect_dtype(op, "noise levels", DType::F64)?;
        ensure!(
            d >= 2 && d.is_multiple_of(2),
            "{op}: d = {d} must be even and >= 2"
        );
        ensure!(ld >= d, "{op}: row stride {ld} below d = {d}");
        let n = s.numel();
        let need = if n == 0 { 0 } else { (n - 1) * ld + d };
        ensure!(
            need <= dev.buf_bytes(out) / 4,
            "{op}: {n} rows of {d} at stride {ld} need {need} f32, the output holds {}",
            dev.buf_bytes(out) / 4
        );
        if n > 0 {
            run(
                dev,
                "noise_features_f32",
                noise::config(n, d),
                &[
                    KArg::Buf(&s.buf),
                    KArg::Buf(out),
                    KArg::U64(n as u64),
                    KArg::U32(d as u32),
                    KArg::U64(ld as u64),
                ],
            )?;
        }
        Ok(())
    }

    /// Elements `start .. start + n` of the f32 uniform stream (seed, stream) of
    /// `kf_engine::rng::Philox::fill_uniform_f32`.
    pub fn philox_uniform_f32<D: KernelDevice + ?Sized>(
        dev: &D,
        n: usize,
        seed: u64,
        stream: u64,
        start: u64,
    ) -> Out {
        philox_uniform(
            dev,
            "philox_uniform_f32",
            DType::F32,
            4,
            n,
            seed,
            stream,
            start,
        )
    }

    /// Elements `start .. start + n` of the f64 uniform stream (`Philox::fill_uniform_f64`).
    pub fn philox_uniform_f64<D: KernelDevice + ?Sized>(
        dev: &D,
        n: usize,
        seed: u64,
        stream: u64,
        start: u64,
    ) -> Out {
        philox_uniform(
            dev,
            "philox_uniform_f64",
            DType::F64,
            2,
            n,
            seed,
            stream,
            start,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn philox_uniform<D: KernelDevice + ?Sized>(
        dev: &D,
        entry: &str,
        dtype: DType,
        per: u64,
        n: usize,
        seed: u64,
        stream: u64,
        start: u64,
    ) -> Out {
        ensure!(
            start.checked_add(n as u64).is_some(),
            "{entry}: start {start} + n {n} overflows"
        );
        let out = DTensor::uninit(dev, &[n], dtype)?;
        if n > 0 {
            run(
                dev,
                entry,
                philox::config(philox::blocks_touched(start, n as u64, per)),
                &[
                    KArg::Buf(&out.buf),
                    KArg::U64(n as u64),
                    KArg::U64(seed),
                    KArg::U64(stream),
                    KArg::U64(start),
                ],
            )?;
        }
        Ok(out)
    }

    /// `nb` raw Philox blocks (4 u32 words each) from `counter` (`Philox::block`): `[nb, 4]` u32.
    pub fn philox_u32<D: KernelDevice + ?Sized>(
        dev: &D,
        nb: usize,
        seed: u64,
        stream: u64,
        counter: u64,
    ) -> Out {
        let out = DTensor::uninit(dev, &[nb, 4], DType::U32)?;
        if nb > 0 {
            run(
                dev,
                "philox_u32",
                philox::config(nb as u64),
                &[
                    KArg::Buf(&out.buf),
                    KArg::U64(nb as u64),
                    KArg::U64(seed),
                    KArg::U64(stream),
                    KArg::U64(counter),
                ],
            )?;
        }
        Ok(out)
    }
}
