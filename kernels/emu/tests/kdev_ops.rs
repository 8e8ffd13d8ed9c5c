//! The launchers of kf_ops::kdev::launch through the emulator device (`Emu`; with `--features cuda`
//! also on a GPU, skipped without one) against the CPU ops
//! of kf-ops, one ragged shape each, with the parity harness's tolerances; and for each, an input
//! of the wrong shape (or dtype) that must be an error, not a launch.
//! Letters: n elements, R rows, D features, V vocabulary, B batch, T rows, H heads.

use kf_engine::emu::Emu;
use kf_engine::rng::Philox;
use kf_engine::{no_grad, DType, Device, Tensor};
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
fn elementwise_and_gelu_match_the_cpu_ops() {
    elementwise_and_gelu_match_the_cpu_ops_on(&Emu);
}

fn elementwise_and_gelu_match_the_cpu_ops_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (r, c) = (8, 125); // n = 1000: not a multiple of the 256-thread block
    let n = r * c;
    let (a, b) = (f32v(1, n, -3.0, 3.0), f32v(2, n, -3.0, 3.0));
    let bias = f32v(3, c, -1.0, 1.0);
    let (da, db, dbias) = (
        up(dev, &a, &[r, c]),
        up(dev, &b, &[r, c]),
        up(dev, &bias, &[c]),
    );
    let (ta, tb) = (t(&a, &[r, c]), t(&b, &[r, c]));
    use kf_ops::elementwise as ew;
    let cases: Vec<(&str, DTensor, Tensor)> = vec![
        (
            "add",
            kl::add(dev, &da, &db).unwrap(),
            ew::add(&ta, &tb).unwrap(),
        ),
        (
            "sub",
            kl::sub(dev, &da, &db).unwrap(),
            ew::sub(&ta, &tb).unwrap(),
        ),
        (
            "mul",
            kl::mul(dev, &da, &db).unwrap(),
            ew::mul(&ta, &tb).unwrap(),
        ),
        (
            "scale",
            kl::scale(dev, &da, -0.75).unwrap(),
            ew::scale(&ta, -0.75).unwrap(),
        ),
        (
            "bias_add",
            kl::bias_add(dev, &da, &dbias).unwrap(),
            ew::bias_add(&ta, &t(&bias, &[c])).unwrap(),
        ),
        (
            "gelu_tanh",
            kl::gelu_tanh(dev, &da).unwrap(),
            kf_ops::gelu::gelu_tanh(&ta).unwrap(),
        ),
        (
            "bias_gelu_tanh",
            kl::bias_gelu_tanh(dev, &da, &dbias).unwrap(),
            kf_ops::gelu::gelu_tanh(&ew::bias_add(&ta, &t(&bias, &[c])).unwrap()).unwrap(),
        ),
        (
            "gelu_erf",
            kl::gelu_erf(dev, &da).unwrap(),
            kf_ops::gelu::gelu_erf(&ta).unwrap(),
        ),
    ];
    for (name, d, cpu) in cases {
        assert_eq!(d.shape(), cpu.shape(), "{name}");
        compare(name, &got(dev, &d), &want(&cpu), Tol::F32).unwrap();
    }
    let e = err_text(kl::add(dev, &da, &up(dev, &b, &[c, r])));
    assert!(
        e.contains("add: shapes [8, 125] and [125, 8] differ"),
        "{e}"
    );
    let e = err_text(kl::bias_add(dev, &da, &up(dev, &bias[..7], &[7])));
    assert!(e.contains("bias [7] must be [125]"), "{e}");
    let ids = DTensor::from_slice(dev, &[1u32, 2], &[2]).unwrap();
    let e = err_text(kl::scale(dev, &ids, 2.0));
    assert!(e.contains("must be F32"), "{e}");
}

#[test]
fn layer_norm_matches_the_cpu_op() {
    layer_norm_matches_the_cpu_op_on(&Emu);
}

fn layer_norm_matches_the_cpu_op_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (r, d) = (5, 77);
    let x = f32v(4, r * d, 2.0, 4.0);
    let (w, b) = (f32v(5, d, -1.5, 1.5), f32v(6, d, -1.0, 1.0));
    let (dx, dw, db) = (up(dev, &x, &[r, d]), up(dev, &w, &[d]), up(dev, &b, &[d]));
    for bias in [false, true] {
        let out = kl::layer_norm(dev, &dx, &dw, bias.then_some(&db), 1e-5).unwrap();
        let tb = t(&b, &[d]);
        let cpu =
            kf_ops::layernorm::layer_norm(&t(&x, &[r, d]), &t(&w, &[d]), bias.then_some(&tb), 1e-5)
                .unwrap();
        compare(
            &format!("layer_norm bias={bias}"),
            &got(dev, &out.y),
            &want(&cpu),
            Tol::F32,
        )
        .unwrap();
        assert_eq!(out.mean.shape(), [r]);
        let m0 = x[..d].iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        compare("mean row 0", &got(dev, &out.mean)[..1], &[m0], Tol::F32).unwrap();
    }
    let e = err_text(kl::layer_norm(
        dev,
        &dx,
        &up(dev, &w[..76], &[76]),
        None,
        1e-5,
    ));
    assert!(e.contains("weight [76] must be [77]"), "{e}");
}

#[test]
fn embedding_matches_the_cpu_op() {
    embedding_matches_the_cpu_op_on(&Emu);
}

fn embedding_matches_the_cpu_op_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (v, d) = (50, 37);
    let table = f32v(7, v * d, -1.0, 1.0);
    let ids: Vec<u32> = (0..21).map(|i| (i * 17 % v) as u32).collect();
    let dt = up(dev, &table, &[v, d]);
    let di = DTensor::from_slice(dev, &ids, &[3, 7]).unwrap();
    let out = kl::embedding(dev, &di, &dt).unwrap();
    assert_eq!(out.shape(), [3, 7, d]);
    let idt = Tensor::from_vec(ids.clone(), &[3, 7], Device::Cpu).unwrap();
    let cpu = kf_ops::embedding::embedding(&idt, &t(&table, &[v, d])).unwrap();
    compare("embedding", &got(dev, &out), &want(&cpu), Tol::EXACT).unwrap();
    let e = err_text(kl::embedding(dev, &di, &up(dev, &table, &[v * d])));
    assert!(e.contains("table must be [V, D]"), "{e}");
    let e = err_text(kl::embedding(dev, &dt, &dt));
    assert!(e.contains("ids must be U32"), "{e}");
}

#[test]
fn rope_matches_the_cpu_op_on_contiguous_and_strided_inputs() {
    rope_matches_the_cpu_op_on_contiguous_and_strided_inputs_on(&Emu);
}

fn rope_matches_the_cpu_op_on_contiguous_and_strided_inputs_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (b, tt, h, d) = (2, 7, 3, 6);
    let base = 10_000.0;
    for batched in [false, true] {
        let np = if batched { b * tt } else { tt };
        let pos: Vec<u32> = (0..np as u32).map(|i| (i * 37 + 5) % 3000).collect();
        let dpos = DTensor::from_slice(dev, &pos, &[np]).unwrap();
        let (cos, sin) = kl::rope_tables(dev, &dpos, d, base).unwrap();
        let pshape: Vec<usize> = if batched { vec![b, tt] } else { vec![tt] };
        let pt = Tensor::from_vec(pos.clone(), &pshape, Device::Cpu).unwrap();
        // q of a fused qkv [B, T, 3, H, D], read in place
        let qkv = f32v(8, b * tt * 3 * h * d, -2.0, 2.0);
        let dqkv = up(dev, &qkv, &[b * tt * 3 * h * d]);
        let out = kl::rope_view(
            dev,
            &dqkv.buf,
            [b, tt, h, d],
            [tt * 3 * h * d, 3 * h * d, d],
            &cos,
            &sin,
        )
        .unwrap();
        let q = t(&qkv, &[b, tt, 3, h, d])
            .narrow(2, 0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(&[b, tt, h, d])
            .unwrap();
        let cpu = kf_ops::rope::rope(&q, &pt, base).unwrap();
        // the device tables are within one f32 ulp of the CPU's f64 tables cast to f32
        let tol = Tol::new(1e-6, 1e-6);
        compare(
            &format!("rope_view batched={batched}"),
            &got(dev, &out),
            &want(&cpu),
            tol,
        )
        .unwrap();
        let qc = up(
            dev,
            &q.contiguous().unwrap().to_vec::<f32>().unwrap(),
            &[b, tt, h, d],
        );
        let out2 = kl::rope(dev, &qc, &cos, &sin).unwrap();
        compare(
            &format!("rope batched={batched}"),
            &got(dev, &out2),
            &want(&cpu),
            tol,
        )
        .unwrap();
    }
    let dpos = DTensor::from_slice(dev, &[0u32, 1, 2], &[3]).unwrap();
    let (cos, sin) = kl::rope_tables(dev, &dpos, d, base).unwrap();
    let x = up(dev, &vec![0.0; b * tt * h * d], &[b, tt, h, d]);
    let e = err_text(kl::rope(dev, &x, &cos, &sin));
    assert!(e.contains("tables [3, 3] must be [T, D/2] = [7, 3]"), "{e}");
    let e = err_text(kl::rope_view(
        dev,
        &x.buf,
        [b, tt, h, d],
        [tt * 3 * h * d, 3 * h * d, d],
        &cos,
        &sin,
    ));
    assert!(e.contains("rope"), "{e}");
}

#[test]
fn softmax_matches_the_cpu_op_and_reports_masked_rows() {
    softmax_matches_the_cpu_op_and_reports_masked_rows_on(&Emu);
}

fn softmax_matches_the_cpu_op_and_reports_masked_rows_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (r, v) = (3, 1000);
    let mut x = f32v(9, r * v, -8.0, 8.0);
    for j in (1..v).step_by(5) {
        x[v + j] = f32::NEG_INFINITY;
    }
    let dx = up(dev, &x, &[r, v]);
    for log in [false, true] {
        let y = kl::softmax(dev, &dx, log).unwrap();
        let tx = t(&x, &[r, v]);
        let cpu = if log {
            kf_ops::softmax::log_softmax(&tx)
        } else {
            kf_ops::softmax::softmax(&tx)
        }
        .unwrap();
        compare(
            &format!("softmax log={log}"),
            &got(dev, &y),
            &want(&cpu),
            Tol::F32,
        )
        .unwrap();
    }
    x[2 * v..].fill(f32::NEG_INFINITY);
    let e = err_text(kl::softmax(dev, &up(dev, &x, &[r, v]), false));
    assert!(
        e.contains("row 2 of input [3, 1000] has no entry above -inf"),
        "{e}"
    );
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
    assert!(e.contains("Tk = 19 but the pattern needs Some(20)"), "{e}");
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
fn noise_features_match_the_cpu_op() {
    noise_features_match_the_cpu_op_on(&Emu);
}

fn noise_features_match_the_cpu_op_on<D: KernelDevice + ?Sized>(dev: &D) {
    let (n, d) = (7, 64);
    let mut s = Gen::new(50).vec(n, 0.0, 1.0);
    s[0] = 1.0;
    let ds = DTensor::from_slice(dev, &s, &[n]).unwrap();
    let out = kl::noise_features(dev, &ds, d).unwrap();
    let cpu = kf_ops::noise::noise_features(
        &Tensor::from_slice(&s, &[n], Device::Cpu).unwrap(),
        d,
        DType::F32,
    )
    .unwrap();
    compare(
        "noise_features",
        &got(dev, &out),
        &want(&cpu),
        Tol::new(1e-7, 1.2e-7),
    )
    .unwrap();
    let e = err_text(kl::noise_features(dev, &up(dev, &[0.5], &[1]), d));
    assert!(e.contains("noise levels must be F64"), "{e}");
}

#[test]
fn argmax_penalty_and_sampling_match_the_cpu_ops_bit_for_bit() {
    argmax_penalty_and_sampling_match_the_cpu_ops_bit_for_bit_on(&Emu);
}

fn argmax_penalty_and_sampling_match_the_cpu_ops_bit_for_bit_on<D: KernelDevice + ?Sized>(dev: &D) {
    let _g = no_grad();
    let (b, k, v) = (2, 3, 1000);
    let mut g = Gen::new(60);
    // a grid of 1/4: many ties
    let x: Vec<f32> = g
        .vec(b * k * v, -8.0, 8.0)
        .iter()
        .map(|&y| ((y * 4.0).round() / 4.0) as f32)
        .collect();
    let counts: Vec<u32> = (0..b * v).map(|_| g.below(3) as u32).collect();
    let dx = up(dev, &x, &[b, k, v]);
    let dc = DTensor::from_slice(dev, &counts, &[b, v]).unwrap();
    let tok = kl::argmax_penalty(dev, &dx, &dc, 0.5).unwrap();
    let ct = Tensor::from_slice(&counts, &[b, v], Device::Cpu).unwrap();
    let want_tok = kf_ops::argmax::argmax_penalty(&t(&x, &[b, k, v]), &ct, 0.5).unwrap();
    assert_eq!(
        kl::tokens_to_host(dev, &tok).unwrap(),
        want_tok.to_vec::<u32>().unwrap()
    );
    assert_eq!(
        dc.to_vec::<D, u32>(dev).unwrap(),
        ct.to_vec::<u32>().unwrap(),
        "counts"
    );
    let e = err_text(kl::argmax_penalty(
        dev,
        &dx,
        &DTensor::from_slice(dev, &counts[..v], &[1, v]).unwrap(),
        0.5,
    ));
    assert!(
        e.contains("counts [1, 1000] must be [B, V] = [2, 1000]"),
        "{e}"
    );
    // a NaN row: the sentinel becomes an error on the host
    let mut xn = x.clone();
    xn[v + 3] = f32::NAN;
    let tn = kl::argmax_penalty(dev, &up(dev, &xn, &[b, k, v]), &dc, 0.0).unwrap();
    assert!(err_text(kl::tokens_to_host(dev, &tn))
        .contains("token 1 of [2, 3]: its logit row holds NaN"));

    let rows = 6;
    let u = g.vec(rows, 0.0, 1.0);
    let lx = f32v(61, rows * v, -4.0, 4.0);
    let du = DTensor::from_slice(dev, &u, &[rows]).unwrap();
    for tau in [0.0, 0.7, 1.0] {
        let tok = kl::sample_inverse_cdf(dev, &up(dev, &lx, &[rows, v]), &du, tau).unwrap();
        let cpu = kf_ops::sampling::sample_inverse_cdf(
            &t(&lx, &[rows, v]),
            &Tensor::from_slice(&u, &[rows], Device::Cpu).unwrap(),
            tau,
        )
        .unwrap();
        assert_eq!(
            tok.to_vec::<D, u32>(dev).unwrap(),
            cpu.to_vec::<u32>().unwrap(),
            "tau {tau}"
        );
    }
    let e = err_text(kl::sample_inverse_cdf(
        dev,
        &up(dev, &lx, &[rows, v]),
        &DTensor::from_slice(dev, &u[..5], &[5]).unwrap(),
        1.0,
    ));
    assert!(e.contains("u [5] must be [6]"), "{e}");
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
fn on_a_gpu_every_launcher_matches_the_cpu_ops() {
    let Some(dev) = kf_engine::cuda::Cuda::for_tests() else {
        return;
    };
    elementwise_and_gelu_match_the_cpu_ops_on(&dev);
    layer_norm_matches_the_cpu_op_on(&dev);
    embedding_matches_the_cpu_op_on(&dev);
    rope_matches_the_cpu_op_on_contiguous_and_strided_inputs_on(&dev);
    softmax_matches_the_cpu_op_and_reports_masked_rows_on(&dev);
    linear_and_gemm_match_the_cpu_on(&dev);
    attention_matches_the_cpu_op_on_every_pattern_and_path_on(&dev);
    noise_features_match_the_cpu_op_on(&dev);
    argmax_penalty_and_sampling_match_the_cpu_ops_bit_for_bit_on(&dev);
    philox_matches_the_engine_rng_on(&dev);
}
