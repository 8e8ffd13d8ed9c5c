//! What the launchers of kf_ops::kdev::launch do beyond the ops (every op's forward, backward
//! and refused inputs run on every backend in the op harness, tests/tests/op_harness.rs),
//! through the emulator device (`Emu`; with `--features cuda` also on a GPU, skipped without
//! one): GEMM specs the ops do not build (batched, transposed A, alpha / beta, offsets) and the
//! GEMM's residual epilogue; each attention path forced (tiles, split-key decode); the errors
//! only the data shows; Philox against the engine's RNG.
//! Letters: n elements, R rows, D features, V vocabulary, B batch, T rows, H heads.

use kf_engine::emu::Emu;
use kf_engine::rng::Philox;
use kf_engine::{no_grad, Device, Tensor};
use kf_ops::attention::{attention_with_lse, AttnParams, AttnPattern};
use kf_ops::kdev::launch as kl;
use kf_ops::kdev::{DTensor, GemmSpec, KernelDevice};
use kf_tests::harness::{compare, Gen, Tol};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap()
}
fn f32v(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    Gen::new(seed)
        .vec(n, lo, hi)
        .iter()
        .map(|&x| x as f32)
        .collect()
}
fn up<D: KernelDevice + ?Sized>(dev: &D, v: &[f32], shape: &[usize]) -> DTensor {
    DTensor::from_slice(dev, v, shape).unwrap()
}
fn got<D: KernelDevice + ?Sized>(dev: &D, d: &DTensor) -> Vec<f64> {
    d.to_vec::<D, f32>(dev)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}
fn want(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}
/// The error's whole chain as text (the shape message is the root cause or a context).
fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn linear_and_gemm_match_the_cpu() {
    linear_and_gemm_match_the_cpu_on(&Emu);
}

fn linear_and_gemm_match_the_cpu_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (b, tt, k, n) = (2, 5, 37, 19);
    let x = f32v(10, b * tt * k, -1.0, 1.0);
    let w = f32v(11, n * k, -1.0, 1.0);
    let bias = f32v(12, n, -1.0, 1.0);
    let (dx, dw, dbias) = (
        up(dev, &x, &[b, tt, k]),
        up(dev, &w, &[n, k]),
        up(dev, &bias, &[n]),
    );
    let y = kl::linear(dev, &dx, &dw, Some(&dbias)).unwrap();
    assert_eq!(y.shape(), [b, tt, n]);
    let tbias = t(&bias, &[n]);
    let cpu = kf_ops::matmul::linear(&t(&x, &[b, tt, k]), &t(&w, &[n, k]), Some(&tbias)).unwrap();
    compare("linear", &got(dev, &y), &want(&cpu), Tol::F32).unwrap();

    // the residual in the GEMM's epilogue: acc += x · wᵀ
    let r0 = f32v(16, b * tt * n, -1.0, 1.0);
    let acc = up(dev, &r0, &[b, tt, n]);
    kl::linear_acc(dev, &dx, &dw, &acc).unwrap();
    let xw = kf_ops::matmul::linear(&t(&x, &[b, tt, k]), &t(&w, &[n, k]), None).unwrap();
    let cpu = kf_ops::elementwise::add(&t(&r0, &[b, tt, n]), &xw).unwrap();
    compare("linear_acc", &got(dev, &acc), &want(&cpu), Tol::F32).unwrap();
    let e = kl::linear_acc(dev, &dx, &dw, &up(dev, &r0[..n], &[n]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit acc"), "{e}");

    // batched, A transposed, alpha / beta, offsets: against a f64 loop
    let (bat, m, n2, k2) = (3, 4, 6, 5);
    let a = f32v(13, 2 + bat * k2 * m, -1.0, 1.0); // A_i stored k x m at offset 2
    let bm = f32v(14, bat * k2 * n2, -1.0, 1.0); // B_i k x n
    let c0 = f32v(15, bat * m * 8, -1.0, 1.0); // C_i m x n with ldc 8
    let spec = GemmSpec {
        m,
        n: n2,
        k: k2,
        trans_a: true,
        trans_b: false,
        lda: m,
        ldb: n2,
        ldc: 8,
        stride_a: k2 * m,
        stride_b: k2 * n2,
        stride_c: m * 8,
        batch: bat,
        alpha: 0.5,
        beta: -2.0,
        a_off: 2,
        b_off: 0,
        c_off: 0,
    };
    let (da, db, dc) = (
        up(dev, &a, &[a.len()]),
        up(dev, &bm, &[bm.len()]),
        up(dev, &c0, &[c0.len()]),
    );
    kl::matmul_into(dev, &spec, &da, &db, &dc).unwrap();
    let mut wantc: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
    for i in 0..bat {
        for r in 0..m {
            for j in 0..n2 {
                let dot: f64 = (0..k2)
                    .map(|p| {
                        a[2 + i * k2 * m + p * m + r] as f64 * bm[i * k2 * n2 + p * n2 + j] as f64
                    })
                    .sum();
                let o = &mut wantc[i * m * 8 + r * 8 + j];
                *o = 0.5 * dot - 2.0 * *o;
            }
        }
    }
    compare("gemm batched", &got(dev, &dc), &wantc, Tol::F32).unwrap();

    let e = err_text(kl::linear(dev, &dx, &up(dev, &w, &[k, n]), None));
    assert!(
        e.contains("has 37 features, weight [37, 19] takes 19"),
        "{e}"
    );
    let bad = GemmSpec { batch: 4, ..spec };
    let e = err_text(kl::matmul_into(dev, &bad, &da, &db, &dc));
    assert!(e.contains("its buffer holds"), "{e}");
}

/// (pattern, B, H, Tq, Tk, q_start, key_skip, path)
type AttnCase = (
    AttnPattern,
    usize,
    usize,
    usize,
    usize,
    usize,
    Vec<usize>,
    kl::AttnPath,
);

#[test]
fn attention_matches_the_cpu_op_on_every_pattern_and_path() {
    attention_matches_the_cpu_op_on_every_pattern_and_path_on(&Emu);
}

fn attention_matches_the_cpu_op_on_every_pattern_and_path_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    use kl::AttnPath::*;
    let d = 64;
    let cases: Vec<AttnCase> = vec![
        (AttnPattern::Causal, 2, 2, 17, 17, 0, vec![3, 0], Tiles),
        (
            AttnPattern::Staircase { n: 5, k: 3 },
            1,
            2,
            20,
            20,
            0,
            vec![],
            Tiles,
        ),
        (
            AttnPattern::DoubleStaircase { n: 3, k: 2 },
            1,
            1,
            10,
            15,
            5,
            vec![],
            Auto,
        ),
        // a KV-cached step: 5 query rows after 145 cached keys, 3 key splits + combine
        (
            AttnPattern::Causal,
            2,
            1,
            5,
            150,
            145,
            vec![2, 0],
            Decode { max_splits: 3 },
        ),
        (AttnPattern::Causal, 1, 2, 3, 70, 67, vec![], Auto),
    ];
    // the Decode case really splits its keys (3 splits, then the combine kernel)
    let plan = kf_kernels::attention::decode(2, 1, 5, 150, d, 3).unwrap();
    assert_eq!((plan.nsplit, plan.combine.is_some()), (3, true));
    for (ci, (pattern, b, h, tq, tk, q_start, skip, path)) in cases.into_iter().enumerate() {
        let p = AttnParams {
            pattern,
            q_start,
            scale: 0.5,
            key_skip: skip,
        };
        let q = f32v(20 + ci as u64, b * tq * h * d, -1.0, 1.0);
        let k = f32v(30 + ci as u64, b * tk * h * d, -1.0, 1.0);
        let v = f32v(40 + ci as u64, b * tk * h * d, -1.0, 1.0);
        let (dq, dk, dv) = (
            up(dev, &q, &[b, tq, h, d]),
            up(dev, &k, &[b, tk, h, d]),
            up(dev, &v, &[b, tk, h, d]),
        );
        let dims = kl::AttnDims { b, h, d, tq, tk };
        let view = |x| kl::AttnView::contiguous(x).unwrap();
        let out = kl::attention(dev, view(&dq), view(&dk), view(&dv), dims, &p, path).unwrap();
        let (o, lse) = attention_with_lse(
            &t(&q, &[b, tq, h, d]),
            &t(&k, &[b, tk, h, d]),
            &t(&v, &[b, tk, h, d]),
            &p,
        )
        .unwrap();
        let name = format!("attention {pattern:?} q_start {q_start} {path:?}");
        compare(&format!("{name} o"), &got(dev, &out.o), &want(&o), Tol::F32).unwrap();
        compare(
            &format!("{name} lse"),
            &got(dev, &out.lse),
            &want(&lse),
            Tol::F32,
        )
        .unwrap();
    }
    let p = AttnParams {
        pattern: AttnPattern::Staircase { n: 5, k: 3 },
        q_start: 0,
        scale: 0.5,
        key_skip: vec![],
    };
    let x = up(dev, &vec![0.0; 19 * 64], &[1, 19, 1, 64]);
    let view = || kl::AttnView::contiguous(&x).unwrap();
    let dims = kl::AttnDims {
        b: 1,
        h: 1,
        d: 64,
        tq: 19,
        tk: 19,
    };
    let e = err_text(kl::attention(dev, view(), view(), view(), dims, &p, Auto));
    assert!(e.contains("Tk = 19 does not fit the pattern"), "{e}");
    let x32 = up(dev, &vec![0.0; 38 * 32], &[1, 38, 1, 32]);
    let v32 = || kl::AttnView::contiguous(&x32).unwrap();
    let dims = kl::AttnDims {
        b: 1,
        h: 1,
        d: 32,
        tq: 38,
        tk: 38,
    };
    let p = AttnParams {
        pattern: AttnPattern::Causal,
        ..p
    };
    let e = err_text(kl::attention(dev, v32(), v32(), v32(), dims, &p, Auto));
    assert!(e.contains("head dim 32 has no kernel"), "{e}");
}

#[test]
fn data_the_kernels_reject_becomes_an_error() {
    data_the_kernels_reject_becomes_an_error_on(&Emu);
}

/// What only the data shows (the shapes are the harness's refused cases): a softmax row with
/// no entry above -inf is reported by the kernel's flag, a NaN logit row by the argmax's
/// sentinel token, each an error naming the row.
fn data_the_kernels_reject_becomes_an_error_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (r, v) = (3, 1000);
    let mut x = f32v(9, r * v, -8.0, 8.0);
    x[2 * v..].fill(f32::NEG_INFINITY);
    let e = err_text(kl::softmax(dev, &up(dev, &x, &[r, v]), false));
    assert!(
        e.contains("row 2 of input [3, 1000] has no entry above -inf"),
        "{e}"
    );
    let (b, k) = (2, 3);
    let mut xn = f32v(61, b * k * v, -4.0, 4.0);
    xn[v + 3] = f32::NAN;
    let counts = DTensor::from_slice(dev, &vec![0u32; b * v], &[b, v]).unwrap();
    let tn = kl::argmax_penalty(dev, &up(dev, &xn, &[b, k, v]), &counts, 0.0).unwrap();
    assert!(err_text(kl::tokens_to_host(dev, &tn))
        .contains("token 1 of [2, 3]: its logit row holds NaN"));
}

#[test]
fn philox_matches_the_engine_rng() {
    philox_matches_the_engine_rng_on(&Emu);
}

fn philox_matches_the_engine_rng_on<D: KernelDevice + ?Sized>(dev: &D) {
    let (seed, stream, start) = (42, 7, 5);
    let p = Philox::new(seed, stream);
    let n = 1001;
    let f = kl::philox_uniform_f32(dev, n, seed, stream, start).unwrap();
    let mut w32 = vec![0f32; n];
    p.fill_uniform_f32(start, &mut w32);
    assert_eq!(f.to_vec::<D, f32>(dev).unwrap(), w32);
    let f = kl::philox_uniform_f64(dev, n, seed, stream, start).unwrap();
    let mut w64 = vec![0f64; n];
    p.fill_uniform_f64(start, &mut w64);
    assert_eq!(f.to_vec::<D, f64>(dev).unwrap(), w64);
    let words = kl::philox_u32(dev, 9, seed, stream, start).unwrap();
    let want: Vec<u32> = (0..9).flat_map(|i| p.block(start + i)).collect();
    assert_eq!(words.to_vec::<D, u32>(dev).unwrap(), want);
    let e = err_text(kl::philox_uniform_f32(dev, 10, seed, stream, u64::MAX - 3));
    assert!(e.contains("overflows"), "{e}");
}

/// The same launcher checks on a real GPU (`--features cuda`): skipped with the reason when
/// there is none (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_the_launchers_match_the_cpu_ops() {
    let Some(dev) = kf_engine::cuda::Cuda::for_tests() else {
        return;
    };
    linear_and_gemm_match_the_cpu_on(&dev);
    attention_matches_the_cpu_op_on_every_pattern_and_path_on(&dev);
    data_the_kernels_reject_becomes_an_error_on(&dev);
    philox_matches_the_engine_rng_on(&dev);
}
