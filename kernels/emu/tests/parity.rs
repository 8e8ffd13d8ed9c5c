//! Emulated-kernel parity: the elementwise, LayerNorm-forward (and its RMS mode, with the
//! backward) and SwiGLU kernels of kernels/*.cu, run by the CPU emulator with the launch
//! shapes of kf-kernels,
//! against the CPU ops of kf-ops (the specification) on ragged shapes, with the
//! parity harness's comparison and tolerances. f16/bf16 storage kernels are
//! compared with the f32 CPU op on the same rounded inputs, rounded once.
//! Letters: n elements, R rows, D features.

use kf_engine::{no_grad, Tensor};
use kf_kernels::elementwise;
use kf_kernels_emu::{launch, Arg};
use kf_tests::harness::{compare, Tol};

/// Element sizes (n) of the elementwise cases: 1, odd, one off a block
/// (256) either way, several blocks with a tail, and more than the grid cap
/// (1024 blocks of 256) so the grid-stride loop runs twice.
const SIZES: &[usize] = &[1, 7, 33, 255, 257, 1000, 4097];
const BIG: usize = 300_001;

mod common;
use common::{cpu_out, inputs, tensor, ALL};

#[test]
fn elementwise_binary_ops_match_the_cpu_ops() {
    let _g = no_grad();
    type CpuOp = fn(&Tensor, &Tensor) -> anyhow::Result<Tensor>;
    let ops: [(&str, CpuOp); 3] = [
        ("add", kf_ops::elementwise::add),
        ("sub", kf_ops::elementwise::sub),
        ("mul", kf_ops::elementwise::mul),
    ];
    for st in ALL {
        for (op, cpu) in ops {
            for &n in SIZES
                .iter()
                .chain(if op == "add" { &[BIG][..] } else { &[] })
            {
                let a = inputs(n, n as u64, st, -2.0, 2.0);
                let b = inputs(n, n as u64 + 1, st, -2.0, 2.0);
                let (ab, bb, out) = (st.upload(&a), st.upload(&b), st.alloc(n));
                let kernel = format!("{op}_{}", st.suffix());
                launch(
                    &kernel,
                    elementwise::config(n),
                    &[
                        Arg::Buf(&ab),
                        Arg::Buf(&bb),
                        Arg::Buf(&out),
                        Arg::U64(n as u64),
                    ],
                )
                .unwrap();
                let want = cpu_out(&cpu(&tensor(&a, &[n]), &tensor(&b, &[n])).unwrap(), st);
                compare(
                    &format!("{kernel} n={n}"),
                    &st.download(&out),
                    &want,
                    st.tol(),
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn elementwise_unary_and_bias_ops_match_the_cpu_ops() {
    let _g = no_grad();
    for st in ALL {
        for &n in SIZES {
            let x = inputs(n, 7 * n as u64, st, -6.0, 6.0);
            let (xb, out) = (st.upload(&x), st.alloc(n));
            let cfg = elementwise::config(n);
            let sfx = st.suffix();

            launch(
                &format!("scale_{sfx}"),
                cfg,
                &[
                    Arg::Buf(&xb),
                    Arg::Buf(&out),
                    Arg::F32(-0.75),
                    Arg::U64(n as u64),
                ],
            )
            .unwrap();
            let want = cpu_out(
                &kf_ops::elementwise::scale(&tensor(&x, &[n]), -0.75).unwrap(),
                st,
            );
            compare(
                &format!("scale_{sfx} n={n}"),
                &st.download(&out),
                &want,
                st.tol(),
            )
            .unwrap();

            launch(
                &format!("gelu_tanh_{sfx}"),
                cfg,
                &[Arg::Buf(&xb), Arg::Buf(&out), Arg::U64(n as u64)],
            )
            .unwrap();
            let want = cpu_out(&kf_ops::gelu::gelu_tanh(&tensor(&x, &[n])).unwrap(), st);
            compare(
                &format!("gelu_tanh_{sfx} n={n}"),
                &st.download(&out),
                &want,
                st.tol(),
            )
            .unwrap();

            // bias_add over rows of `cols` (n = rows * cols for a few splits)
            for cols in [1, 7, n].into_iter().filter(|c| n % c == 0) {
                let b = inputs(cols, 3 * cols as u64, st, -1.0, 1.0);
                let bb = st.upload(&b);
                launch(
                    &format!("bias_add_{sfx}"),
                    cfg,
                    &[
                        Arg::Buf(&xb),
                        Arg::Buf(&bb),
                        Arg::Buf(&out),
                        Arg::U64(n as u64),
                        Arg::U64(cols as u64),
                    ],
                )
                .unwrap();
                let cpu = kf_ops::elementwise::bias_add(
                    &tensor(&x, &[n / cols, cols]),
                    &tensor(&b, &[cols]),
                )
                .unwrap();
                compare(
                    &format!("bias_add_{sfx} n={n} cols={cols}"),
                    &st.download(&out),
                    &cpu_out(&cpu, st),
                    st.tol(),
                )
                .unwrap();
                // the fused MLP activation: gelu_tanh(x + b) against the two CPU ops
                launch(
                    &format!("bias_gelu_tanh_{sfx}"),
                    cfg,
                    &[
                        Arg::Buf(&xb),
                        Arg::Buf(&bb),
                        Arg::Buf(&out),
                        Arg::U64(n as u64),
                        Arg::U64(cols as u64),
                    ],
                )
                .unwrap();
                compare(
                    &format!("bias_gelu_tanh_{sfx} n={n} cols={cols}"),
                    &st.download(&out),
                    &cpu_out(&kf_ops::gelu::gelu_tanh(&cpu).unwrap(), st),
                    st.tol(),
                )
                .unwrap();
            }
        }
    }
}

/// (R, D): one row and one feature, odd D below a warp and just above it, D
/// not a multiple of the block (256), and D above the shared-memory cache
/// limit (`layernorm::MAX_CACHED_D`) so the uncached path runs too.
const LN_SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (2, 33),
    (5, 256),
    (2, 1000),
    (3, 4097),
    (2, 13_001),
];

#[test]
fn layernorm_forward_matches_the_cpu_op() {
    let _g = no_grad();
    const EPS: f32 = 1e-5;
    for st in ALL {
        for &(rows, d) in LN_SHAPES {
            for bias in [false, true] {
                let seed = (rows * 100_000 + d) as u64;
                // an offset of 3 as in the CPU op's cases: the shifted two-pass must hold up
                let x = inputs(rows * d, seed, st, 2.0, 4.0);
                let w = inputs(d, seed + 1, st, -1.5, 1.5);
                let b = inputs(d, seed + 2, st, -1.0, 1.0);
                let (xb, wb, bb) = (st.upload(&x), st.upload(&w), st.upload(&b));
                let out = st.alloc(rows * d);
                let kernel = format!("layernorm_fwd_{}", st.suffix());
                let bb = bias.then_some(&bb);
                let common::LnStats { mean, rstd } =
                    common::layernorm_fwd(st, &xb, &wb, bb, &out, (rows, d), EPS, false);
                let bt = tensor(&b, &[d]);
                let cpu = kf_ops::layernorm::layer_norm(
                    &tensor(&x, &[rows, d]),
                    &tensor(&w, &[d]),
                    bias.then_some(&bt),
                    EPS as f64,
                )
                .unwrap();
                let name = format!("{kernel} {rows}x{d} bias={bias}");
                compare(&name, &st.download(&out), &cpu_out(&cpu, st), st.tol()).unwrap();
                // the saved statistics, against f64
                let (mut wm, mut wr) = (vec![], vec![]);
                for row in x.chunks(d) {
                    let m = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
                    wm.push(m);
                    wr.push(1.0 / (var + EPS as f64).sqrt());
                }
                let got_m: Vec<f64> = mean.to_vec::<f32>().iter().map(|&v| v as f64).collect();
                let got_r: Vec<f64> = rstd.to_vec::<f32>().iter().map(|&v| v as f64).collect();
                compare(&format!("{name} mean"), &got_m, &wm, Tol::F32).unwrap();
                // 1/std amplifies the f32 error of the variance when var is small (D = 1: var = 0, rstd = 1/sqrt(eps))
                compare(&format!("{name} rstd"), &got_r, &wr, Tol::new(1e-4, 1e-3)).unwrap();
            }
        }
    }
}

/// LayerNorm's kernels in RMS mode (RMSNorm, the Llama family's norm) at every storage dtype:
/// the forward (`rms` = 1: no centring, saved mean 0, rstd = 1/sqrt(mean(x²) + eps)) and the
/// backward (`layernorm_bwd_dx` / `_dwdb` with a null mean) against kf_ops::rmsnorm's CPU op
/// and its gradients on the same rounded inputs.
#[test]
fn rms_mode_matches_the_cpu_rms_norm() {
    const EPS: f32 = 1e-5;
    for st in ALL {
        for &(rows, d) in LN_SHAPES {
            let seed = (rows * 100_000 + d) as u64 + 17;
            let x = inputs(rows * d, seed, st, -2.0, 3.0);
            let w = inputs(d, seed + 1, st, -1.5, 1.5);
            let g = inputs(rows * d, seed + 2, st, -1.0, 1.0);
            let (xb, wb, gb) = (st.upload(&x), st.upload(&w), st.upload(&g));
            let out = st.alloc(rows * d);
            let sfx = st.suffix();
            let common::LnStats { mean, rstd } =
                common::layernorm_fwd(st, &xb, &wb, None, &out, (rows, d), EPS, true);
            let (xt, wt) = (tensor(&x, &[rows, d]).var(), tensor(&w, &[d]).var());
            let cpu = kf_ops::rmsnorm::rms_norm(&xt, &wt, EPS as f64).unwrap();
            let name = format!("rms {sfx} {rows}x{d}");
            compare(&name, &st.download(&out), &cpu_out(&cpu, st), st.tol()).unwrap();
            assert!(
                mean.to_vec::<f32>().iter().all(|&m| m == 0.0),
                "{name}: mean"
            );
            // backward from the forward's rstd, the mean argument null
            let (dx, dw, _) =
                common::layernorm_bwd(st, &xb, &wb, &gb, None, &rstd, (rows, d), false);
            let grads = cpu.backward_with(tensor(&g, &[rows, d])).unwrap();
            let want_dx = cpu_out(grads.get(&xt).unwrap(), st);
            let want_dw: Vec<f64> = grads.get(&wt).unwrap().to_vec_f64().unwrap();
            // sums of D (dx) and R (dw) products in another order than the CPU's
            let t = st.tol();
            let tol = Tol::new(t.atol.max(1e-4), t.rtol.max(1e-3));
            compare(&format!("{name} dx"), &st.download(&dx), &want_dx, tol).unwrap();
            let got_dw: Vec<f64> = dw.to_vec::<f32>().iter().map(|&v| v as f64).collect();
            compare(
                &format!("{name} dw"),
                &got_dw,
                &want_dw,
                Tol::new(1e-4, 1e-3),
            )
            .unwrap();
        }
    }
}

/// SwiGLU's kernels at every storage dtype on ragged row widths, large |gate| both ways,
/// against kf_ops::swiglu's CPU op and its gradient on the same rounded inputs.
#[test]
fn swiglu_matches_the_cpu_op() {
    for st in ALL {
        for &(rows, f) in &[(1usize, 1usize), (3, 5), (7, 129), (2, 1536)] {
            let n = rows * f;
            let mut x = inputs(2 * n, (rows * 1000 + f) as u64, st, -6.0, 6.0);
            if x.len() >= 4 {
                x[0] = st.round(30.0);
                x[1] = st.round(-30.0);
            }
            let g = inputs(n, (rows * 1000 + f) as u64 + 1, st, -1.0, 1.0);
            let (xb, gb, out, dgu) = (st.upload(&x), st.upload(&g), st.alloc(n), st.alloc(2 * n));
            let sfx = st.suffix();
            launch(
                &format!("swiglu_fwd_{sfx}"),
                elementwise::config(n),
                &[
                    Arg::Buf(&xb),
                    Arg::Buf(&out),
                    Arg::U64(n as u64),
                    Arg::U64(f as u64),
                ],
            )
            .unwrap();
            launch(
                &format!("swiglu_bwd_{sfx}"),
                elementwise::config(n),
                &[
                    Arg::Buf(&xb),
                    Arg::Buf(&gb),
                    Arg::Buf(&dgu),
                    Arg::U64(n as u64),
                    Arg::U64(f as u64),
                ],
            )
            .unwrap();
            let xt = tensor(&x, &[rows, 2 * f]).var();
            let cpu = kf_ops::swiglu::swiglu(&xt).unwrap();
            let name = format!("swiglu {sfx} {rows}x{f}");
            compare(&name, &st.download(&out), &cpu_out(&cpu, st), st.tol()).unwrap();
            let grads = cpu.backward_with(tensor(&g, &[rows, f])).unwrap();
            let want = cpu_out(grads.get(&xt).unwrap(), st);
            compare(&format!("{name} d gu"), &st.download(&dgu), &want, st.tol()).unwrap();
        }
    }
}
