//! Emulated-kernel parity for the cross-entropy, sampling, argmax and Philox
//! families (kernels/{cross_entropy,sampling,argmax,philox}.cu), run by the
//! CPU emulator with the launch shapes of kf-kernels, against the CPU ops
//! (ops/src/{cross_entropy,sampling,argmax}.rs, engine/src/rng.rs) on ragged
//! shapes and the vocabularies 30522, 50257 and one of 2^18 + 3:
//! - cross-entropy: per-row loss, saved lse, mean, count and dlogits within
//!   f32 tolerances (the GPU's expf and summation order differ from the CPU's);
//! - sampling, its inverse and argmax: tokens, noise and counts bit for bit,
//!   including u right at and next to the CDF steps and ties;
//! - Philox: raw words and uniforms bit for bit.
//!
//! f16/bf16 storage kernels run on inputs rounded to that dtype and are
//! compared with the f32 CPU op on the same rounded values.
//! Letters: N / R / B rows, K positions, V vocabulary.

use kf_engine::rng::Philox;
use kf_engine::{no_grad, DType, Device, Tensor};
use kf_kernels::{argmax, cross_entropy, philox, sampling};
use kf_kernels_emu::{launch, Arg, DeviceBuffer};
use kf_tests::harness::{compare, Gen, Tol};

const TOKEN_NAN: u32 = 0xffff_ffff;
const TOKEN_ALL_NEG_INF: u32 = 0xffff_fffe;

mod common;
use common::{f32s, St, ALL};

/// `rows` rows of `v` logits rounded to the storage dtype: normal with `std`,
/// and -inf at the row indices `mask_every - 1 + j * mask_every` (0 = none).
fn logits(g: &mut Gen, rows: usize, v: usize, std: f64, mask_every: usize, st: St) -> Vec<f32> {
    g.normal_vec(rows * v, std)
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if mask_every > 0 && (i % v) % mask_every == mask_every - 1 {
                f32::NEG_INFINITY
            } else {
                st.round(x as f32)
            }
        })
        .collect()
}

// ------------------------------------------------------------------ cross-entropy

/// (N, V): one row and one logit, odd sizes around a warp and a block (256),
/// and the vocabularies of the issue (BERT, GPT-2, 2^18 + 3).
const CE_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (5, 33),
    (4, 257),
    (3, 1000),
    (2, 30522),
    (2, 50257),
    (1, 262_147),
];

struct CeOut {
    loss: Vec<f64>,
    lse: Vec<f64>,
    mean: f64,
    count: u32,
    dlogits: Vec<f64>,
}

/// Forward, mean and backward kernels on one case.
fn ce_kernels(
    st: St,
    x: &[f32],
    t: &[u32],
    n: usize,
    v: usize,
    ignore: Option<u32>,
    g: f32,
) -> CeOut {
    let sfx = st.suffix();
    let (xb, tb) = (st.upload(x), DeviceBuffer::from_slice(t));
    let (loss, lse) = (DeviceBuffer::uninit(4 * n), DeviceBuffer::uninit(4 * n));
    let (ig, has) = (ignore.unwrap_or(0), ignore.is_some() as i32);
    launch(
        &format!("cross_entropy_fwd_{sfx}"),
        cross_entropy::fwd_config(n, v),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&tb),
            Arg::Buf(&loss),
            Arg::Buf(&lse),
            Arg::U32(n as u32),
            Arg::U32(v as u32),
            Arg::U32(ig),
            Arg::I32(has),
        ],
    )
    .unwrap();
    let (mean, count) = (DeviceBuffer::uninit(4), DeviceBuffer::uninit(4));
    launch(
        "cross_entropy_mean_f32",
        cross_entropy::mean_config(n),
        &[
            Arg::Buf(&loss),
            Arg::Buf(&tb),
            Arg::Buf(&mean),
            Arg::Buf(&count),
            Arg::U32(n as u32),
            Arg::U32(ig),
            Arg::I32(has),
        ],
    )
    .unwrap();
    let gb = DeviceBuffer::from_slice(&[g]);
    let dx = st.alloc(n * v);
    launch(
        &format!("cross_entropy_bwd_{sfx}"),
        cross_entropy::bwd_config(n, v),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&tb),
            Arg::Buf(&lse),
            Arg::Buf(&gb),
            Arg::Buf(&count),
            Arg::Buf(&dx),
            Arg::U32(n as u32),
            Arg::U32(v as u32),
            Arg::U32(ig),
            Arg::I32(has),
        ],
    )
    .unwrap();
    CeOut {
        loss: f32s(&loss),
        lse: f32s(&lse),
        mean: f32s(&mean)[0],
        count: count.to_vec::<u32>()[0],
        dlogits: st.download(&dx),
    }
}

#[test]
fn cross_entropy_forward_and_backward_match_the_cpu_op() {
    for st in ALL {
        for &(n, v) in CE_SHAPES {
            let mut g = Gen::new((n * 1_000_003 + v) as u64);
            // -inf entries (masked logits) every 5th, never at a target
            let x = logits(&mut g, n, v, 2.5, if v > 5 { 5 } else { 0 }, st);
            let pick = |g: &mut Gen| loop {
                let t = g.below(v as u64) as u32;
                if v <= 5 || t % 5 != 4 {
                    break t;
                }
            };
            let base: Vec<u32> = (0..n).map(|_| pick(&mut g)).collect();
            // no ignore; an ignored row (index 7 when V > 7, else outside V); every row ignored
            let ig = if v > 7 { 7 } else { v as u32 + 3 };
            let mut some = base.clone();
            some[0] = ig;
            let cases: Vec<(Vec<u32>, Option<u32>)> = vec![
                (base.clone(), None),
                (some, Some(ig)),
                (vec![ig; n], Some(ig)),
            ];
            for (t, ignore) in cases {
                let gval = -0.375f32;
                let name = format!("cross_entropy {} {n}x{v} ignore={ignore:?}", st.suffix());
                let got = ce_kernels(st, &x, &t, n, v, ignore, gval);

                // the CPU op, f32, on the same (rounded) logits
                let xt = Tensor::from_slice(&x, &[n, v], Device::Cpu).unwrap().var();
                let tt = Tensor::from_slice(&t, &[n], Device::Cpu).unwrap();
                let (mean, per) = kf_ops::cross_entropy::cross_entropy(&xt, &tt, ignore).unwrap();
                let seed = Tensor::full(&[], gval as f64, DType::F32, Device::Cpu).unwrap();
                let grads = mean.backward_with(seed).unwrap();
                let dx_cpu = grads.get(&xt).unwrap().to_vec_f64().unwrap();
                let count = t.iter().filter(|&&ti| Some(ti) != ignore).count();

                compare(
                    &format!("{name} loss"),
                    &got.loss,
                    &per.to_vec_f64().unwrap(),
                    Tol::F32,
                )
                .unwrap();
                // lse against f64 (0 on ignored rows, as the CPU op saves)
                let want_lse: Vec<f64> = (0..n)
                    .map(|i| {
                        if Some(t[i]) == ignore {
                            return 0.0;
                        }
                        let r = &x[i * v..(i + 1) * v];
                        let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                        m + r.iter().map(|&y| (y as f64 - m).exp()).sum::<f64>().ln()
                    })
                    .collect();
                compare(&format!("{name} lse"), &got.lse, &want_lse, Tol::F32).unwrap();
                assert_eq!(got.count as usize, count, "{name} count");
                compare(
                    &format!("{name} mean"),
                    &[got.mean],
                    &[mean.to_scalar_f64().unwrap()],
                    Tol::F32,
                )
                .unwrap();
                // gradients are O(|g| / count) at most; their rounding is
                // relative (f32: expf against the CPU's exp_f32 and a slightly
                // different lse; f16/bf16: one rounding of the result), with an
                // absolute floor below the smallest f16 subnormal where needed
                let scale = if count == 0 {
                    0.0
                } else {
                    gval.abs() as f64 / count as f64
                };
                let tol = match st {
                    St::F32 => Tol::new(1e-6 * scale, 1e-4),
                    St::F16 => Tol::new(6e-8 + 1e-6 * scale, 1.0 / 1024.0),
                    St::Bf16 => Tol::new(1e-6 * scale, 1.0 / 128.0),
                };
                let want_dx: Vec<f64> = dx_cpu.iter().map(|&d| st.round(d as f32) as f64).collect();
                compare(&format!("{name} dlogits"), &got.dlogits, &want_dx, tol).unwrap();
                if count == 0 {
                    assert!(
                        got.dlogits.iter().all(|&d| d == 0.0),
                        "{name}: nonzero grad"
                    );
                    assert_eq!(got.mean, 0.0);
                }
            }
        }
    }
}

#[test]
fn cross_entropy_bad_rows_are_nan() {
    // a fully masked row and a target outside V (both errors of the CPU op)
    let v = 9;
    let mut x = vec![0.5f32; 2 * v];
    x[..v].fill(f32::NEG_INFINITY);
    let got = ce_kernels(St::F32, &x, &[1, 9], 2, v, None, 1.0);
    assert!(got.loss.iter().all(|l| l.is_nan()), "{:?}", got.loss);
    assert!(got.lse.iter().all(|l| l.is_nan()), "{:?}", got.lse);
    let xt = Tensor::from_slice(&x, &[2, v], Device::Cpu).unwrap();
    let tt = Tensor::from_slice(&[1u32, 1], &[2], Device::Cpu).unwrap();
    assert!(kf_ops::cross_entropy::cross_entropy(&xt, &tt, None).is_err());
}

// ------------------------------------------------------------------ sampling

fn sample_kernel(st: St, x: &[f32], u: &[f64], rows: usize, v: usize, tau: f64) -> Vec<u32> {
    let (xb, ub, out) = (
        st.upload(x),
        DeviceBuffer::from_slice(u),
        DeviceBuffer::uninit(4 * rows),
    );
    launch(
        &format!("sample_inverse_cdf_{}", st.suffix()),
        sampling::config(rows, v).unwrap(),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&ub),
            Arg::Buf(&out),
            Arg::U32(rows as u32),
            Arg::U32(v as u32),
            Arg::F64(tau),
        ],
    )
    .unwrap();
    out.to_vec::<u32>()
}

fn noise_kernel(
    st: St,
    x: &[f32],
    toks: &[u32],
    r: &[f64],
    rows: usize,
    v: usize,
    tau: f64,
) -> Vec<f64> {
    let (xb, tb, rb, out) = (
        st.upload(x),
        DeviceBuffer::from_slice(toks),
        DeviceBuffer::from_slice(r),
        DeviceBuffer::uninit(8 * rows),
    );
    launch(
        &format!("inverse_cdf_noise_{}", st.suffix()),
        sampling::config(rows, v).unwrap(),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&tb),
            Arg::Buf(&rb),
            Arg::Buf(&out),
            Arg::U32(rows as u32),
            Arg::U32(v as u32),
            Arg::F64(tau),
        ],
    )
    .unwrap();
    out.to_vec::<f64>()
}

fn t2(x: &[f32], rows: usize, v: usize) -> Tensor {
    Tensor::from_slice(x, &[rows, v], Device::Cpu).unwrap()
}
fn t1(u: &[f64]) -> Tensor {
    Tensor::from_slice(u, &[u.len()], Device::Cpu).unwrap()
}
fn cpu_sample(x: &[f32], u: &[f64], rows: usize, v: usize, tau: f64) -> Vec<u32> {
    kf_ops::sampling::sample_inverse_cdf(&t2(x, rows, v), &t1(u), tau)
        .unwrap()
        .to_vec::<u32>()
        .unwrap()
}
fn next_down(u: f64) -> f64 {
    f64::from_bits(u.to_bits() - 1)
}
fn next_up(u: f64) -> f64 {
    f64::from_bits(u.to_bits() + 1)
}

/// (V, rows): tiny and ragged vocabularies around the 64-block, the
/// vocabularies of the issue, and 2^18 + 3.
const SAMPLE_SHAPES: &[(usize, usize)] = &[
    (1, 3),
    (7, 8),
    (64, 8),
    (65, 8),
    (1000, 12),
    (8192, 8),
    (30522, 6),
    (50257, 6),
    (262_147, 2),
];

/// Tokens of the kernel and the CPU op agree bit for bit: random u, u at the
/// low and high end of the sampled token's interval (from the CPU's noise
/// inversion with r = 0 and r = 1) and one f64 step outside it, where the
/// token must change; several tau and greedy (tau = 0) on rows with ties.
#[test]
fn sampling_matches_the_cpu_sampler_bit_for_bit() {
    let _g = no_grad();
    for st in ALL {
        for &(v, rows) in SAMPLE_SHAPES {
            let mut g = Gen::new((v * 31 + rows) as u64);
            // the reserved token (-inf) every 97th; std 3 (peaked and flat regions)
            let mut x = logits(&mut g, rows, v, 3.0, 97, st);
            // ties for greedy: copy each row's max to a later index in row 1
            if v > 2 {
                let r1 = &mut x[v..2 * v];
                let m = r1.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                r1[v - 2] = m;
            }
            for tau in [1.0, 0.7, 2.5, 0.0] {
                let name = format!("sample {} V={v} rows={rows} tau={tau}", st.suffix());
                let u: Vec<f64> = (0..rows).map(|_| g.unit().clamp(1e-12, 0.999)).collect();
                let want = cpu_sample(&x, &u, rows, v, tau);
                assert_eq!(
                    sample_kernel(st, &x, &u, rows, v, tau),
                    want,
                    "{name} random u"
                );
                if tau == 0.0 {
                    continue;
                }
                // u at both ends of each sampled token's interval and one step outside
                let tt = Tensor::from_slice(&want, &[rows], Device::Cpu).unwrap();
                let lo = kf_ops::sampling::inverse_cdf_noise(
                    &t2(&x, rows, v),
                    &tt,
                    &t1(&vec![0.0; rows]),
                    tau,
                )
                .unwrap()
                .to_vec::<f64>()
                .unwrap();
                let hi = kf_ops::sampling::inverse_cdf_noise(
                    &t2(&x, rows, v),
                    &tt,
                    &t1(&vec![1.0; rows]),
                    tau,
                )
                .unwrap()
                .to_vec::<f64>()
                .unwrap();
                let mut changed = 0;
                for (what, inside, us) in [
                    ("low end", true, lo.clone()),
                    ("high end", true, hi.clone()),
                    (
                        "step below the low end",
                        false,
                        lo.iter().map(|&u| next_down(u)).collect(),
                    ),
                    (
                        "step above the high end",
                        false,
                        hi.iter().map(|&u| next_up(u)).collect(),
                    ),
                ] {
                    let us: Vec<f64> = us
                        .iter()
                        .map(|&u| u.clamp(f64::MIN_POSITIVE, next_down(1.0)))
                        .collect();
                    let want_b = cpu_sample(&x, &us, rows, v, tau);
                    let got_b = sample_kernel(st, &x, &us, rows, v, tau);
                    assert_eq!(got_b, want_b, "{name} u at the {what}");
                    changed += want_b.iter().zip(&want).filter(|(a, b)| a != b).count();
                    if inside {
                        assert_eq!(want_b, want, "{name} {what}");
                    }
                }
                // the steps are real: one f64 step moves most rows to another token
                assert!(
                    v == 1 || changed >= rows,
                    "{name}: only {changed} rows changed token"
                );
            }
        }
    }
}

#[test]
fn sampling_special_rows() {
    let _g = no_grad();
    // +inf logits (equal mass on them), a NaN row, an all -inf row
    let v = 70;
    let mut x = vec![0.0f32; 3 * v];
    x[3] = f32::INFINITY;
    x[66] = f32::INFINITY;
    x[v + 5] = f32::NAN;
    x[2 * v..].fill(f32::NEG_INFINITY);
    for st in ALL {
        let got = sample_kernel(st, &x, &[0.3, 0.5, 0.5], 3, v, 1.0);
        assert_eq!(got, vec![3, TOKEN_NAN, TOKEN_ALL_NEG_INF], "{st:?}");
        let got = sample_kernel(st, &x, &[0.7, 0.5, 0.5], 3, v, 0.5);
        assert_eq!(got[0], 66);
        assert_eq!(
            sample_kernel(st, &x, &[0.7, 0.5, 0.5], 3, v, 0.0),
            vec![3, TOKEN_NAN, TOKEN_ALL_NEG_INF]
        );
        let n = noise_kernel(st, &x, &[66, 0, 0], &[0.5; 3], 3, v, 1.0);
        assert!(n[0] > 0.5 && n[1].is_nan() && n[2].is_nan(), "{n:?}");
    }
    assert_eq!(cpu_sample(&x[..v], &[0.3], 1, v, 1.0), vec![3]);
    assert_eq!(cpu_sample(&x[..v], &[0.7], 1, v, 0.5), vec![66]);
}

/// The noise inversion matches the CPU's bit for bit (r at both ends and
/// inside), maps back to the token through the kernel sampler, and gives NaN
/// where the CPU op errors (zero probability, token out of range, not the
/// greedy choice).
#[test]
fn noise_inversion_matches_the_cpu_op_bit_for_bit() {
    let _g = no_grad();
    for st in ALL {
        for &(v, rows) in SAMPLE_SHAPES.iter().filter(|s| s.0 <= 50257) {
            let mut g = Gen::new((v * 7 + rows) as u64);
            let x = logits(&mut g, rows, v, 2.0, 97, st);
            for tau in [1.0, 0.6, 0.0] {
                let u: Vec<f64> = (0..rows).map(|_| g.unit().clamp(1e-9, 0.999)).collect();
                let toks = cpu_sample(&x, &u, rows, v, tau);
                for r0 in [0.0, 1.0, 0.37, -1.0] {
                    let r: Vec<f64> = (0..rows)
                        .map(|_| if r0 < 0.0 { g.unit() } else { r0 })
                        .collect();
                    let name = format!("noise {} V={v} tau={tau} r={r0}", st.suffix());
                    let want = kf_ops::sampling::inverse_cdf_noise(
                        &t2(&x, rows, v),
                        &Tensor::from_slice(&toks, &[rows], Device::Cpu).unwrap(),
                        &t1(&r),
                        tau,
                    )
                    .unwrap()
                    .to_vec::<f64>()
                    .unwrap();
                    let got = noise_kernel(st, &x, &toks, &r, rows, v, tau);
                    let bits = |a: &[f64]| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{name}");
                    assert_eq!(
                        sample_kernel(st, &x, &got, rows, v, tau),
                        toks,
                        "{name} round trip"
                    );
                }
                // tokens the CPU op rejects: a -inf logit (index 96), out of range, not greedy
                if v > 96 {
                    let bad: Vec<u32> = (0..rows as u32)
                        .map(|i| match i % 3 {
                            0 => 96,
                            1 => v as u32,
                            _ => {
                                if tau == 0.0 {
                                    (toks[i as usize] + 1) % v as u32
                                } else {
                                    96
                                }
                            }
                        })
                        .collect();
                    let got = noise_kernel(st, &x, &bad, &vec![0.5; rows], rows, v, tau);
                    for (i, &gu) in got.iter().enumerate() {
                        assert!(gu.is_nan(), "noise V={v} tau={tau} row {i}: {gu}");
                        let cpu = kf_ops::sampling::inverse_cdf_noise_row(
                            &x[i * v..(i + 1) * v],
                            bad[i],
                            0.5,
                            tau,
                        );
                        assert!(cpu.is_err(), "row {i}: the CPU op accepts token {}", bad[i]);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ argmax

fn argmax_kernel(
    st: St,
    x: &[f32],
    counts: &[u32],
    b: usize,
    k: usize,
    v: usize,
    penalty: f64,
) -> (Vec<u32>, Vec<u32>) {
    let (xb, cb, out) = (
        st.upload(x),
        DeviceBuffer::from_slice(counts),
        DeviceBuffer::uninit(4 * b * k),
    );
    launch(
        &format!("argmax_penalty_{}", st.suffix()),
        argmax::config(b, v),
        &[
            Arg::Buf(&xb),
            Arg::Buf(&cb),
            Arg::Buf(&out),
            Arg::U32(b as u32),
            Arg::U32(k as u32),
            Arg::U32(v as u32),
            Arg::F64(penalty),
        ],
    )
    .unwrap();
    (out.to_vec::<u32>(), cb.to_vec::<u32>())
}

/// Tokens and updated counts bit for bit on logits with many ties (a grid of
/// 1/4), penalties 0 (plain), moderate, and huge (penalty * count overflows
/// and is clamped), counts near u32::MAX (saturation).
#[test]
fn argmax_penalty_matches_the_cpu_op() {
    for st in ALL {
        for &(b, k, v) in &[
            (1, 1, 1),
            (2, 3, 5),
            (3, 4, 33),
            (2, 4, 1000),
            (2, 4, 30522),
            (1, 4, 50257),
        ] {
            let mut g = Gen::new((b * 1000 + k * 100 + v) as u64);
            let x: Vec<f32> = g
                .vec(b * k * v, -8.0, 8.0)
                .iter()
                .enumerate()
                .map(|(i, &y)| {
                    if i % 11 == 10 {
                        f32::NEG_INFINITY
                    } else {
                        st.round(((y * 4.0).round() / 4.0) as f32)
                    }
                })
                .collect();
            let counts: Vec<u32> = (0..b * v)
                .map(|i| match i % 13 {
                    0 => u32::MAX,
                    1 => u32::MAX - 1,
                    _ => g.below(4) as u32,
                })
                .collect();
            for penalty in [0.0, 0.5, 2.0, -0.25, 1e306] {
                let name = format!("argmax {} {b}x{k}x{v} penalty={penalty}", st.suffix());
                let (tok, cnt) = argmax_kernel(st, &x, &counts, b, k, v, penalty);
                let lt = Tensor::from_slice(&x, &[b, k, v], Device::Cpu).unwrap();
                let ct = Tensor::from_slice(&counts, &[b, v], Device::Cpu).unwrap();
                let want = kf_ops::argmax::argmax_penalty(&lt, &ct, penalty)
                    .unwrap()
                    .to_vec::<u32>()
                    .unwrap();
                assert_eq!(tok, want, "{name} tokens");
                assert_eq!(cnt, ct.to_vec::<u32>().unwrap(), "{name} counts");
            }
        }
    }
}

#[test]
fn argmax_bad_positions_give_sentinels() {
    // b 0: NaN at position 1; b 1: all -inf at position 2
    let (b, k, v) = (2, 3, 40);
    let mut x = vec![0.0f32; b * k * v];
    x[3] = 1.0;
    x[v + 7] = f32::NAN;
    x[(k + 2) * v..(k + 3) * v].fill(f32::NEG_INFINITY);
    for st in ALL {
        for penalty in [0.0, 1.0] {
            let (tok, cnt) = argmax_kernel(st, &x, &vec![0; b * v], b, k, v, penalty);
            assert_eq!(tok[..k], [3, TOKEN_NAN, TOKEN_NAN], "{st:?}");
            // b 1: all zeros at positions 0 and 1: token 0, then 1 once 0 is penalised
            let second = if penalty > 0.0 { 1 } else { 0 };
            assert_eq!(tok[k..], [0, second, TOKEN_ALL_NEG_INF], "{st:?}");
            assert_eq!(cnt[3], 1);
            let lt = Tensor::from_slice(&x, &[b, k, v], Device::Cpu).unwrap();
            let ct = Tensor::from_slice(&vec![0u32; b * v], &[b, v], Device::Cpu).unwrap();
            assert!(kf_ops::argmax::argmax_penalty(&lt, &ct, penalty).is_err());
        }
    }
}

// ------------------------------------------------------------------ Philox

const STREAMS: &[(u64, u64, u64)] = &[
    (0, 0, 0),
    (42, 7, 5),
    (
        0x299f31d0_a4093822,
        0x03707344_13198a2e,
        0x85a308d3_243f6a88,
    ),
    (u64::MAX, u64::MAX, u64::MAX - 3),
    (0x1234_5678_9abc_def0, 3, 1 << 32),
];

#[test]
fn philox_words_and_uniforms_match_engine_rng() {
    for &(seed, stream, counter) in STREAMS {
        let p = Philox::new(seed, stream);
        let nb = 37usize;
        let out = DeviceBuffer::uninit(16 * nb);
        launch(
            "philox_u32",
            philox::config(nb as u64),
            &[
                Arg::Buf(&out),
                Arg::U64(nb as u64),
                Arg::U64(seed),
                Arg::U64(stream),
                Arg::U64(counter),
            ],
        )
        .unwrap();
        let want: Vec<u32> = (0..nb as u64)
            .flat_map(|i| p.block(counter.wrapping_add(i)))
            .collect();
        assert_eq!(
            out.to_vec::<u32>(),
            want,
            "words seed={seed} stream={stream}"
        );

        let starts = [0u64, 1, 2, 3, 5, 1001, counter / 8];
        for &start in &starts {
            for n in [1usize, 2, 3, 7, 33, 1000] {
                let o32 = DeviceBuffer::uninit(4 * n);
                let a = |o| {
                    [
                        Arg::Buf(o),
                        Arg::U64(n as u64),
                        Arg::U64(seed),
                        Arg::U64(stream),
                        Arg::U64(start),
                    ]
                };
                launch(
                    "philox_uniform_f32",
                    philox::config(philox::blocks_touched(start, n as u64, 4)),
                    &a(&o32),
                )
                .unwrap();
                let mut w32 = vec![0f32; n];
                p.fill_uniform_f32(start, &mut w32);
                let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits32(&o32.to_vec::<f32>()),
                    bits32(&w32),
                    "f32 start={start} n={n}"
                );

                let o64 = DeviceBuffer::uninit(8 * n);
                launch(
                    "philox_uniform_f64",
                    philox::config(philox::blocks_touched(start, n as u64, 2)),
                    &a(&o64),
                )
                .unwrap();
                let mut w64 = vec![0f64; n];
                p.fill_uniform_f64(start, &mut w64);
                let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits64(&o64.to_vec::<f64>()),
                    bits64(&w64),
                    "f64 start={start} n={n}"
                );
            }
        }
    }
    // the Random123 known answer, through the kernel
    let out = DeviceBuffer::uninit(16);
    launch(
        "philox_u32",
        philox::config(1),
        &[
            Arg::Buf(&out),
            Arg::U64(1),
            Arg::U64(0),
            Arg::U64(0),
            Arg::U64(0),
        ],
    )
    .unwrap();
    assert_eq!(
        out.to_vec::<u32>(),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
}

/// More Philox blocks than one grid (1024 blocks of 256 threads) holds, so
/// the grid-stride loop takes a second step.
#[test]
fn philox_grid_stride() {
    let n = 4 * 1024 * 256 + 6;
    let (seed, stream, start) = (9, 2, 3);
    let out = DeviceBuffer::uninit(4 * n);
    let nb = philox::blocks_touched(start, n as u64, 4);
    assert!(philox::config(nb).grid_dim.0 as u64 * 256 < nb);
    launch(
        "philox_uniform_f32",
        philox::config(nb),
        &[
            Arg::Buf(&out),
            Arg::U64(n as u64),
            Arg::U64(seed),
            Arg::U64(stream),
            Arg::U64(start),
        ],
    )
    .unwrap();
    let mut want = vec![0f32; n];
    Philox::new(seed, stream).fill_uniform_f32(start, &mut want);
    assert!(out.to_vec::<f32>() == want, "grid-stride fill differs");
}
