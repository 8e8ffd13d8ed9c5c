//! Exactness tests a-e of issue 4 (KFORCING.md sections 3-7) on tiny random students:
//! a. the staircase pass equals per-window inference;
//! b. the double-staircase rollout equals two consecutive inference steps;
//! c. K < k at inference gives the first K tokens of the K = k window;
//! d. KV-cached PFLM generation equals recomputing everything without a cache;
//! e. stage-1 targets equal AR sampling with the same u;
//! f. the noise-inversion variant's (u, target) pairs invert the real tokens;
//! g. M noise windows per context in one staircase pass (blocks of hints sharing the context
//!    rows) equal M separate passes, and their stage-1 targets M separate inversions.
//! Plus: save/load round trip and gradients through the staircase pass.

mod common;

use common::{ids, random_model, random_student as student, small_cfg, temp_dir};
use kf_engine::autograd::no_grad;
use kf_engine::{DType, Device, Tensor};
use kf_model::generate::{generate, noise_u, GenerateOptions};
use kf_model::pflm::{generate_pflm, stage1_targets, Pflm, PflmGenerateOptions, ReadOff};
use kf_model::KvCache;

/// Uniforms `[B, N, K]` in (0, 1).
fn uniforms(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|j| noise_u(seed, 99, j as u64)).collect();
    Tensor::from_vec(v, shape, Device::Cpu).unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: element {i}: {x} vs {y} (tol {tol} x {scale})"
        );
    }
}

fn slice3(u: &[f64], shape: [usize; 3], t: usize, lo: usize, hi: usize) -> Vec<f64> {
    let [b, n, k] = shape;
    (0..b)
        .flat_map(|bi| (lo..hi).map(move |i| (bi, i)))
        .map(|(bi, i)| u[(bi * n + t) * k + i])
        .collect()
}

fn prefix(ctx: &[u32], b: usize, n: usize, len: usize) -> Tensor {
    let v: Vec<u32> = (0..b)
        .flat_map(|bi| ctx[bi * n..bi * n + len].to_vec())
        .collect();
    Tensor::from_vec(v, &[b, len], Device::Cpu).unwrap()
}

/// a. Logits at hint (t, i) of one staircase pass == an inference step with context
/// x_0..x_t and hints 1..i (all i hints compared), in f64 (tight) and f32.
#[test]
fn a_staircase_equals_per_window_inference() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        let m = student(3, 1).to_dtype(dtype).unwrap();
        let (b, n, k, v) = (2, 7, 3, m.cfg().vocab_size);
        let ctx_v = ids(b, n, v, 5);
        let ctx = Tensor::from_vec(ctx_v.clone(), &[b, n], Device::Cpu).unwrap();
        let u = uniforms(&[b, n, k], 11);
        let uv = u.to_vec_f64().unwrap();
        let tau = [0.9, 1.3];
        let stair = {
            let _ng = no_grad();
            m.forward_staircase(&ctx, &u, &tau).unwrap()
        };
        assert_eq!(stair.shape(), [b, n, k, v]);
        let sv = stair.to_vec_f64().unwrap();
        for t in 0..n {
            for i in 1..=k {
                let mut cache = KvCache::new(m.cfg(), b, n + k, dtype).unwrap();
                let ut = Tensor::from_vec(slice3(&uv, [b, n, k], t, 0, i), &[b, i], Device::Cpu)
                    .unwrap();
                let got = m
                    .step_logits(
                        &mut cache,
                        &prefix(&ctx_v, b, n, t + 1),
                        &[0, 0],
                        &[],
                        &ut,
                        &tau,
                    )
                    .unwrap();
                assert_eq!(cache.len(), t + 1);
                let gv = got.to_vec_f64().unwrap();
                for bi in 0..b {
                    for j in 0..i {
                        let s0 = ((bi * n + t) * k + j) * v;
                        let g0 = (bi * i + j) * v;
                        close(
                            &sv[s0..s0 + v],
                            &gv[g0..g0 + v],
                            tol,
                            &format!("{dtype} b {bi} t {t} hint {} of {i}", j + 1),
                        );
                    }
                }
            }
        }
        // the pass on the tape computes the same values
        let mut mt = m.to_dtype(dtype).unwrap();
        mt.set_trainable(true);
        let on = mt.forward_staircase(&ctx, &u, &tau).unwrap();
        assert!(on.tracks_grad());
        assert_eq!(on.to_vec_f64().unwrap(), sv);
    }
}

/// b. The double-staircase rollout == two consecutive KV-cached inference steps (window k,
/// then k more with the first window's tokens committed), same noises; and its F1 equals
/// the argmax of the staircase pass.
#[test]
fn b_double_staircase_equals_two_inference_steps() {
    for dtype in [DType::F64, DType::F32] {
        let m = student(2, 2).to_dtype(dtype).unwrap();
        let (b, n, k, v) = (2, 6, 2, m.cfg().vocab_size);
        let ctx_v = ids(b, n, v, 8);
        let ctx = Tensor::from_vec(ctx_v.clone(), &[b, n], Device::Cpu).unwrap();
        let u = uniforms(&[b, n, 2 * k], 12);
        let uv = u.to_vec_f64().unwrap();
        let tau = [1.0];
        let roll = m.rollout_double(&ctx, &u, &tau).unwrap();
        assert_eq!(roll.shape(), [b, n, 2 * k]);
        let rv = roll.to_vec::<u32>().unwrap();
        let read = ReadOff::default();
        for t in 0..n {
            let mut cache = KvCache::new(m.cfg(), b, n + 2 * k, dtype).unwrap();
            let counts = Tensor::zeros(&[b, v], DType::U32, Device::Cpu).unwrap();
            let u1 = Tensor::from_vec(slice3(&uv, [b, n, 2 * k], t, 0, k), &[b, k], Device::Cpu)
                .unwrap();
            let f1 = m
                .step(
                    &mut cache,
                    &prefix(&ctx_v, b, n, t + 1),
                    &[0, 0],
                    &[],
                    &u1,
                    &tau,
                    &read,
                    &counts,
                )
                .unwrap();
            let u2 = Tensor::from_vec(
                slice3(&uv, [b, n, 2 * k], t, k, 2 * k),
                &[b, k],
                Device::Cpu,
            )
            .unwrap();
            let f2 = m
                .step(
                    &mut cache,
                    &f1,
                    &[t + 1, t + 1],
                    &[],
                    &u2,
                    &tau,
                    &read,
                    &counts,
                )
                .unwrap();
            assert_eq!(cache.len(), t + 1 + k);
            let (f1, f2) = (f1.to_vec::<u32>().unwrap(), f2.to_vec::<u32>().unwrap());
            for bi in 0..b {
                let w = &rv[(bi * n + t) * 2 * k..(bi * n + t + 1) * 2 * k];
                assert_eq!(
                    &w[..k],
                    &f1[bi * k..(bi + 1) * k],
                    "{dtype} F1 b {bi} t {t}"
                );
                assert_eq!(
                    &w[k..],
                    &f2[bi * k..(bi + 1) * k],
                    "{dtype} F2 b {bi} t {t}"
                );
            }
        }
        // F1 == argmax of the staircase pass on the first k noises
        let u1: Vec<f64> = uv
            .chunks_exact(2 * k)
            .flat_map(|w| w[..k].to_vec())
            .collect();
        let u1 = Tensor::from_vec(u1, &[b, n, k], Device::Cpu).unwrap();
        let st = {
            let _ng = no_grad();
            m.forward_staircase(&ctx, &u1, &tau).unwrap()
        }
        .to_vec_f64()
        .unwrap();
        for (w, row) in st.chunks_exact(v).enumerate() {
            let am = row
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
                    if x > bv {
                        (i, x)
                    } else {
                        (bi, bv)
                    }
                })
                .0 as u32;
            let (win, i) = (w / k, w % k);
            assert_eq!(
                rv[win * 2 * k + i],
                am,
                "{dtype} staircase argmax window {win} hint {i}"
            );
        }
        // the two-token content actually differs across windows (the test is not vacuous)
        assert!(rv.iter().any(|&x| x != rv[0]));
    }
}

/// c. K < k at inference: the first K tokens (and logits) of the K = k window, with a
/// frequency penalty in play.
#[test]
fn c_smaller_window_is_a_prefix() {
    let m = student(4, 3);
    let (b, n, k, v) = (3, 5, 4, m.cfg().vocab_size);
    let ctx_v = ids(b, n, v, 9);
    let ctx = Tensor::from_vec(ctx_v, &[b, n], Device::Cpu).unwrap();
    let u = uniforms(&[b, k], 13);
    let uv = u.to_vec_f64().unwrap();
    let read = ReadOff {
        penalty: 0.7,
        vocab_limit: Some(90),
    };
    let run = |kk: usize| {
        let mut cache = KvCache::new(m.cfg(), b, n + k, DType::F32).unwrap();
        let counts = Tensor::zeros(&[b, v], DType::U32, Device::Cpu).unwrap();
        let us: Vec<f64> = (0..b)
            .flat_map(|bi| uv[bi * k..bi * k + kk].to_vec())
            .collect();
        let ut = Tensor::from_vec(us, &[b, kk], Device::Cpu).unwrap();
        let logits = m
            .step_logits(&mut cache, &ctx, &[0; 3], &[], &ut, &[1.0])
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let mut cache = KvCache::new(m.cfg(), b, n + k, DType::F32).unwrap();
        let toks = m
            .step(&mut cache, &ctx, &[0; 3], &[], &ut, &[1.0], &read, &counts)
            .unwrap()
            .to_vec::<u32>()
            .unwrap();
        (logits, toks, counts.to_vec::<u32>().unwrap())
    };
    let (lf, tf, _) = run(k);
    assert!(tf.iter().all(|&t| t < 90));
    for kk in 1..k {
        let (l, t, c) = run(kk);
        for bi in 0..b {
            assert_eq!(
                &t[bi * kk..(bi + 1) * kk],
                &tf[bi * k..bi * k + kk],
                "K {kk} b {bi}"
            );
            close(
                &l[bi * kk * v..(bi + 1) * kk * v],
                &lf[bi * k * v..(bi * k + kk) * v],
                1e-5,
                &format!("K {kk} b {bi} logits"),
            );
            assert_eq!(c[bi * v..(bi + 1) * v].iter().sum::<u32>(), kk as u32);
        }
    }
    // K above the trained k is refused
    let mut cache = KvCache::new(m.cfg(), b, n + k + 1, DType::F32).unwrap();
    let u5 = uniforms(&[b, k + 1], 1).reshape(&[b, k + 1]).unwrap();
    assert!(m
        .step_logits(&mut cache, &ctx, &[0; 3], &[], &u5, &[1.0])
        .is_err());
}

/// d. KV-cached generation == recomputing everything without a cache (batched prompts of
/// different lengths, a last window shorter than K, frequency penalty, EOS); and a sequence
/// generates the same alone as in a batch.
#[test]
fn d_cached_generation_equals_recompute() {
    let m = student(3, 4);
    let v = m.cfg().vocab_size;
    let prompts: Vec<Vec<u32>> = vec![ids(1, 1, v, 21), ids(1, 4, v, 22), ids(1, 7, v, 23)];
    for kk in [3, 2, 1] {
        let mut opts = PflmGenerateOptions {
            base: GenerateOptions {
                max_new: 11,
                tau: 1.0,
                seed: 5,
                first_stream: 2,
                eos: None,
                use_cache: true,
                vocab_limit: Some(95),
            },
            k: kk,
            freq_penalty: 0.4,
        };
        let run = |o: &PflmGenerateOptions, p: &[Vec<u32>]| {
            let mut streamed = vec![Vec::new(); p.len()];
            let g = generate_pflm(&m, p, o, |b, t| {
                streamed[b].push(t);
                Ok(())
            })
            .unwrap();
            assert_eq!(streamed, g.tokens);
            g
        };
        let cached = run(&opts, &prompts);
        assert!(cached.tokens.iter().all(|t| t.len() == 11));
        assert_eq!(cached.passes, 1 + 11usize.div_ceil(kk));
        opts.base.use_cache = false;
        let plain = run(&opts, &prompts);
        assert_eq!(cached.tokens, plain.tokens, "K {kk}: cached vs recomputed");
        // with an EOS that occurs mid-window
        let eos = cached.tokens[1][4];
        opts.base.eos = Some(eos);
        let pe = run(&opts, &prompts);
        opts.base.use_cache = true;
        let ce = run(&opts, &prompts);
        assert_eq!(ce.tokens, pe.tokens, "K {kk}: with EOS");
        assert_eq!(ce.stopped_at_eos, pe.stopped_at_eos);
        assert!(ce.stopped_at_eos[1] && *ce.tokens[1].last().unwrap() == eos);
        // alone == in the batch (its own stream)
        opts.base.eos = None;
        opts.base.first_stream = 3;
        let alone = run(&opts, &prompts[1..2]);
        assert_eq!(alone.tokens[0], cached.tokens[1], "K {kk}: alone vs batch");
    }
}

/// e. Stage-1 targets token(p_T(.|x_<=t), u) from full-sequence teacher logits equal what AR
/// generation samples with that u at that position.
#[test]
fn e_stage1_targets_equal_ar_sampling() {
    let cfg = small_cfg();
    let teacher = random_model(&cfg, 6);
    let v = cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = vec![ids(1, 3, v, 31), ids(1, 5, v, 32)];
    for tau in [1.0, 0.7] {
        let opts = GenerateOptions {
            max_new: 14,
            tau,
            seed: 17,
            first_stream: 4,
            ..Default::default()
        };
        let g = generate(&teacher, &prompts, &opts, |_, _| Ok(())).unwrap();
        for (b, p) in prompts.iter().enumerate() {
            let x: Vec<u32> = p.iter().chain(&g.tokens[b]).copied().collect();
            let n = x.len() - 1;
            let l = p.len();
            let u: Vec<f64> = (0..n)
                .map(|t| {
                    if t + 1 >= l {
                        noise_u(opts.seed, opts.first_stream + b as u64, (t + 1 - l) as u64)
                    } else {
                        0.5
                    }
                })
                .collect();
            let ctx = Tensor::from_vec(x[..n].to_vec(), &[1, n], Device::Cpu).unwrap();
            let u = Tensor::from_vec(u, &[1, n], Device::Cpu).unwrap();
            let tg = stage1_targets(&teacher, &ctx, &u, tau)
                .unwrap()
                .to_vec::<u32>()
                .unwrap();
            assert_eq!(&tg[l - 1..], &g.tokens[b][..], "tau {tau} b {b}");
        }
    }
}

#[test]
fn g_several_noise_windows_equal_separate_passes() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        let st = student(2, 3).to_dtype(dtype).unwrap();
        let (b, m, n, k, v) = (2, 3, 5, 2, st.cfg().vocab_size);
        let ctx = Tensor::from_vec(ids(b, n, v, 8), &[b, n], Device::Cpu).unwrap();
        let u = uniforms(&[b, m, n, k], 21);
        let tau = [1.0, 0.8];
        let _ng = no_grad();
        let all = st.forward_staircase(&ctx, &u, &tau).unwrap();
        assert_eq!(all.shape(), [b, m, n, k, v]);
        for j in 0..m {
            let uj = u.narrow(1, j, 1).unwrap().reshape(&[b, n, k]).unwrap();
            let one = st.forward_staircase(&ctx, &uj, &tau).unwrap();
            let got = all.narrow(1, j, 1).unwrap().contiguous().unwrap();
            close(
                &got.to_vec_f64().unwrap(),
                &one.to_vec_f64().unwrap(),
                tol,
                &format!("{dtype} window block {j}"),
            );
        }
    }
    let cfg = small_cfg();
    let teacher = random_model(&cfg, 6);
    let (b, m, n) = (2, 4, 6);
    let ctx = Tensor::from_vec(ids(b, n, cfg.vocab_size, 9), &[b, n], Device::Cpu).unwrap();
    let u = uniforms(&[b, m, n], 23);
    let all = stage1_targets(&teacher, &ctx, &u, 0.9).unwrap();
    assert_eq!(all.shape(), [b, m, n]);
    for j in 0..m {
        let uj = u.narrow(1, j, 1).unwrap().reshape(&[b, n]).unwrap();
        let one = stage1_targets(&teacher, &ctx, &uj, 0.9).unwrap();
        let got = all.narrow(1, j, 1).unwrap().contiguous().unwrap();
        assert_eq!(
            got.to_vec::<u32>().unwrap(),
            one.to_vec::<u32>().unwrap(),
            "window {j}"
        );
    }
}

/// Save/load round trip (f32 exact; config k set; backbone-only loading still works), and
/// the staircase pass on the tape gives gradients to the noise encoder and the backbone.
#[test]
fn save_load_and_gradients() {
    let teacher = random_model(&small_cfg(), 7);
    let m = Pflm::from_teacher(teacher, 2, 3).unwrap();
    assert_eq!(m.cfg().k, Some(2));
    let dir = temp_dir("pflm-rt");
    m.save(&dir, DType::F32).unwrap();
    let l = Pflm::load(&dir).unwrap();
    assert_eq!(l.k, 2);
    let (a, b) = (m.params(), l.params());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(ta.to_vec::<f32>().unwrap(), tb.to_vec::<f32>().unwrap());
    }
    let bb = kf_model::Ddit::load(&dir).unwrap();
    assert_eq!(bb.params().len(), m.backbone.params().len());
    std::fs::remove_dir_all(&dir).unwrap();

    let mut s = student(2, 8);
    s.set_trainable(true);
    let (bsz, n, v) = (2, 4, s.cfg().vocab_size);
    let ctx = Tensor::from_vec(ids(bsz, n, v, 3), &[bsz, n], Device::Cpu).unwrap();
    let u = uniforms(&[bsz, n, 2], 4);
    let out = s.forward_staircase(&ctx, &u, &[1.0]).unwrap();
    let sq = kf_ops::elementwise::mul(&out, &out).unwrap();
    let g = sq.backward().unwrap();
    for name in [
        "noise_encoder.combined_proj.weight",
        "noise_encoder.norm.bias",
        "noise_encoder.mlp.2.bias",
    ] {
        let gt = g.get(s.noise.param(name).unwrap()).expect(name);
        assert!(gt.to_vec_f64().unwrap().iter().any(|&x| x != 0.0), "{name}");
    }
    let ge = g
        .get(s.backbone.param("vocab_embed.embedding").unwrap())
        .expect("embedding grad");
    assert!(ge.to_vec_f64().unwrap().iter().any(|&x| x != 0.0));
}

/// The noise-inversion variant (KFORCING.md 6.3): each pair (u, target) of a window is
/// consistent with the one inverse-CDF map on the true prefix — `token(p_T(· | x_<=t+i-1), u)
/// == target` through the public sampler — and the target is the real next token wherever
/// the teacher gives it an interval.
#[test]
fn f_noise_inversion_pairs_invert_the_real_tokens() {
    use kf_model::distill::DistillTeacher;
    let cfg = small_cfg();
    let (b, n, k) = (2usize, 7usize, 3usize);
    let w = n + k + 1;
    let tokens = ids(b, w, cfg.vocab_size, 41);
    for tau in [1.0, 0.8] {
        let teacher = DistillTeacher::Inversion(random_model(&cfg, 9));
        let r = uniforms(&[b, n, k], 5);
        let (ctx, u, tg) = teacher.batch(&tokens, b, w, n, &r, tau).unwrap();
        let ctx = ctx.to_vec::<u32>().unwrap();
        for row in 0..b {
            assert_eq!(&ctx[row * n..(row + 1) * n], &tokens[row * w..row * w + n]);
        }
        let (u, tg) = (u.to_vec::<f64>().unwrap(), tg.to_vec::<u32>().unwrap());
        let DistillTeacher::Inversion(t) = &teacher else {
            unreachable!()
        };
        let m = n + k - 1;
        let mut real = 0;
        for i in 0..k {
            // hint i of window t predicts token t + i + 1 from teacher row t + i
            for row in 0..b {
                let seq =
                    Tensor::from_vec(tokens[row * w..row * w + m].to_vec(), &[1, m], Device::Cpu)
                        .unwrap();
                let urow: Vec<f64> = (0..m)
                    .map(|j| {
                        if j >= i && j - i < n {
                            u[(row * n + j - i) * k + i]
                        } else {
                            0.5
                        }
                    })
                    .collect();
                let urow = Tensor::from_vec(urow, &[1, m], Device::Cpu).unwrap();
                let back = stage1_targets(t, &seq, &urow, tau)
                    .unwrap()
                    .to_vec::<u32>()
                    .unwrap();
                for tt in 0..n {
                    let at = (row * n + tt) * k + i;
                    assert_eq!(back[tt + i], tg[at], "tau {tau} row {row} t {tt} i {i}");
                    real += (tg[at] == tokens[row * w + tt + i + 1]) as usize;
                }
            }
        }
        // a random unit-scale teacher leaves some real tokens without an f64 interval
        // (probability below ~1e-16); the rest must be the real tokens
        assert!(
            real * 2 > b * n * k,
            "only {real} of {} targets are the real tokens",
            b * n * k
        );
    }
}
