//! The tensor-core attention forward (kernels/attention_mma.cu: mma.sync m16n8k16 bf16,
//! ldmatrix, cp.async) under the emulator against an f64 reference on the same bf16 inputs,
//! causal and full, at head dims 64 and 128, with T not a multiple of the 64-row tiles.
//! Tolerances: P is rounded to bf16 before the P·V product (relative error <= 2^-9 per
//! weight, so |O - O_ref| <= ~2^-8 max|V| = 4e-3 here), the logsumexp is computed in f32
//! from unrounded values (1e-4).

mod common;

use common::{inputs, St};
use kf_kernels_emu::{launch, Arg, DeviceBuffer, LaunchConfig};

#[test]
fn tensor_core_attention_matches_f64_on_bf16_inputs() {
    let (b, h) = (2usize, 3usize);
    for d in [64usize, 128] {
        for (t, causal) in [(100usize, true), (100, false), (64, true), (7, false)] {
            let n = b * t * h * d;
            let (q, k, v) = (
                inputs(n, 1 + d as u64, St::Bf16, -1.0, 1.0),
                inputs(n, 2 + t as u64, St::Bf16, -1.0, 1.0),
                inputs(n, 3, St::Bf16, -1.0, 1.0),
            );
            let scale = 1.0 / (d as f64).sqrt();
            let (qb, kb, vb) = (
                St::Bf16.upload(&q),
                St::Bf16.upload(&k),
                St::Bf16.upload(&v),
            );
            let ob = DeviceBuffer::uninit(4 * n);
            let lb = DeviceBuffer::uninit(4 * b * h * t);
            let kernel = format!("attn_fwd_mma_d{d}_bf16");
            launch(
                &kernel,
                LaunchConfig {
                    grid_dim: (t.div_ceil(64) as u32, h as u32, b as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (5 * 64 * d * 2) as u32,
                },
                &[
                    Arg::Buf(&qb),
                    Arg::Buf(&kb),
                    Arg::Buf(&vb),
                    Arg::Buf(&ob),
                    Arg::Buf(&lb),
                    Arg::I32(t as i32),
                    Arg::I32(h as i32),
                    Arg::I32(causal as i32),
                    Arg::F32(scale as f32),
                ],
            )
            .unwrap_or_else(|e| panic!("{kernel}: {e}"));
            let (o, lse) = (ob.to_vec::<f32>(), lb.to_vec::<f32>());
            let at = |x: &[f32], bi: usize, ti: usize, hi: usize, di: usize| {
                x[((bi * t + ti) * h + hi) * d + di] as f64
            };
            let (mut worst_o, mut worst_l) = (0f64, 0f64);
            for bi in 0..b {
                for hi in 0..h {
                    for qi in 0..t {
                        let keys = if causal { qi + 1 } else { t };
                        let s: Vec<f64> = (0..keys)
                            .map(|ki| {
                                (0..d)
                                    .map(|di| at(&q, bi, qi, hi, di) * at(&k, bi, ki, hi, di))
                                    .sum::<f64>()
                                    * scale
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                        let want_lse = m + z.ln();
                        worst_l =
                            worst_l.max((lse[(bi * h + hi) * t + qi] as f64 - want_lse).abs());
                        for di in 0..d {
                            let want: f64 = s
                                .iter()
                                .enumerate()
                                .map(|(ki, x)| (x - m).exp() / z * at(&v, bi, ki, hi, di))
                                .sum();
                            let got = o[((bi * t + qi) * h + hi) * d + di] as f64;
                            worst_o = worst_o.max((got - want).abs());
                        }
                    }
                }
            }
            eprintln!("d {d} T {t} causal {causal}: max |O - ref| {worst_o:.2e}, max |lse - ref| {worst_l:.2e}");
            assert!(
                worst_o <= 4e-3,
                "d {d} T {t} causal {causal}: O off by {worst_o}"
            );
            assert!(
                worst_l <= 1e-4,
                "d {d} T {t} causal {causal}: lse off by {worst_l}"
            );
        }
    }
}
