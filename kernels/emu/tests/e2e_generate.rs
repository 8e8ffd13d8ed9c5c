//! End to end on the emulated kernels, through the one model code: a tiny random DDiT / PFLM
//! (d 128, 2 heads of head dim 64, 2 layers, V 97) moved to the emulator device
//! (`Device::Emu`) with `to_device` runs the CPU's own forward, KV cache and generation loops,
//! the ops dispatching on the tensors' device:
//! - the AR forward (uncached, and prefill + KV-cached steps with the cache on the device)
//!   against `Ddit::forward_train` on the CPU: logits within f32 tolerance;
//! - AR and PFLM generation (`generate`, `generate_pflm`) against the same calls on the CPU
//!   from the same prompts (left-padded batch), seed and options: tokens identical;
//! - the same models saved as f16 and as bf16 files and loaded (widened) again, moved with
//!   `WeightStore::Exact`: every weight matrix on the device in the file's precision (the
//!   gemv kernels multiply by them), tokens identical to the CPU's.

mod common;

use kf_engine::{no_grad, DType, Device, Tensor};
use kf_model::config::DditConfig;
use kf_model::generate::{generate, GenerateOptions};
use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
use kf_model::weights::{WeightBytes, WeightStore};
use kf_model::{Ddit, KvCache};
use kf_tests::harness::{compare, Tol};

fn cfg() -> DditConfig {
    common::tiny_model_cfg()
}

/// Logits of an f32 model agree with the CPU to f32 rounding of sums over d = 128..512.
const LOGIT_TOL: Tol = Tol::new(1e-4, 1e-4);

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn ar_forward_uncached_and_kv_cached_match_the_cpu() {
    let _g = no_grad();
    let m = Ddit::init(&cfg(), 11).unwrap();
    let dev = m.to_device(Device::Emu).unwrap();
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 31 % 96) as u32).collect();
    let on =
        |d: Device, ids: &[u32], shape: &[usize]| Tensor::from_vec(ids.to_vec(), shape, d).unwrap();
    let cpu = m
        .forward_train(&on(Device::Cpu, &ids, &[b, t]))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let v = m.cfg.vocab_size;
    let got = dev
        .forward_train(&on(Device::Emu, &ids, &[b, t]))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    compare("AR forward logits", &f64s(&got), &f64s(&cpu), LOGIT_TOL).unwrap();
    // the reserved token's logit is exactly -1000 on both
    assert!(got.chunks(v).all(|r| r[96] == -1000.0));

    // prefill 6 rows, then steps of 2 and 1 rows, against the same rows of the full forward
    let mut cache = KvCache::new_on(&m.cfg, b, t, DType::F32, Device::Emu).unwrap();
    let mut at = 0;
    for step in [6, 2, 1] {
        let part: Vec<u32> = (0..b)
            .flat_map(|bi| ids[bi * t + at..bi * t + at + step].to_vec())
            .collect();
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (at..at + step).map(|p| p as u32))
            .collect();
        let h = dev
            .backbone_hidden(
                &dev.embed(&on(Device::Emu, &part, &[b, step])).unwrap(),
                &on(Device::Emu, &pos, &[b, step]),
                &dev.attn_params(at, vec![]),
                Some(&mut cache),
            )
            .unwrap();
        cache.commit(step).unwrap();
        let lg = dev.head(&h).unwrap().to_vec::<f32>().unwrap();
        let want: Vec<f32> = (0..b)
            .flat_map(|bi| cpu[(bi * t + at) * v..(bi * t + at + step) * v].to_vec())
            .collect();
        compare(
            &format!("cached rows {at}..{}", at + step),
            &f64s(&lg),
            &f64s(&want),
            LOGIT_TOL,
        )
        .unwrap();
        at += step;
    }
    assert_eq!(cache.len(), t);

    // a sequence longer than the decode kernels' 32 rows: the 64-row forward tiles
    let t = 40;
    let ids: Vec<u32> = (0..t).map(|i| (i * 7 % 96) as u32).collect();
    let cpu = m
        .forward_train(&on(Device::Cpu, &ids, &[1, t]))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let got = dev
        .forward_train(&on(Device::Emu, &ids, &[1, t]))
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    compare(
        "AR forward logits T = 40",
        &f64s(&got),
        &f64s(&cpu),
        LOGIT_TOL,
    )
    .unwrap();
}

#[test]
fn unsupported_head_dim_is_a_clear_error() {
    let mut c = cfg();
    c.n_heads = 4; // head dim 32
    let _g = no_grad();
    let m = Ddit::init(&c, 1).unwrap().to_device(Device::Emu).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3], &[1, 3], Device::Emu).unwrap();
    let e = format!(
        "{:#}",
        m.forward_train(&ids).err().expect("head dim 32 must fail")
    );
    assert!(e.contains("head dim 32 has no kernel"), "{e}");
}

#[test]
fn pflm_generation_on_the_emulator_gives_the_cpu_tokens() {
    pflm_generation_gives_the_cpu_tokens(Device::Emu, None);
}

/// A model file of `dtype` in a fresh directory, and the model loaded back (widened to f32).
fn through_file<M>(
    dtype: DType,
    what: &str,
    save: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    load: impl FnOnce(&std::path::Path) -> anyhow::Result<M>,
) -> M {
    let dir = std::env::temp_dir().join(format!(
        "kf_e2e_half_{what}_{dtype:?}_{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    save(&dir).unwrap();
    let m = load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    m
}

/// Every weight matrix of a moved model is `dt` (f32 when None), the rest f32.
fn assert_matrices(wb: &WeightBytes, dt: Option<DType>, n_params: usize) {
    let (f, h, b) = wb.matrices;
    match dt {
        None => assert!(
            h == 0 && b == 0 && f > 0 && wb.total == 4 * n_params,
            "{wb:?}"
        ),
        Some(DType::F16) => assert!(f == 0 && b == 0 && h > 0, "{wb:?}"),
        Some(_) => assert!(f == 0 && h == 0 && b > 0, "{wb:?}"),
    }
    if dt.is_some() {
        // the matrices take 2 bytes per weight, the rest 4
        assert_eq!(wb.total, 4 * n_params - (f + h + b), "{wb:?}");
    }
}

/// The upload and generation checks with the models read from f16 and bf16 files: the device
/// keeps their matrices in the file's precision and generates the CPU's tokens.
#[test]
fn half_model_files_generate_the_cpu_tokens_from_half_weights() {
    for dt in [DType::F16, DType::BF16] {
        pflm_generation_gives_the_cpu_tokens(Device::Emu, Some(dt));
        ar_generation_gives_the_cpu_tokens(Device::Emu, Some(dt));
    }
    // an f32 model stays f32 under Exact (its values are not all f16 or bf16)
    let m = Ddit::init(&cfg(), 3).unwrap();
    let dev = m.to_device_with(Device::Emu, WeightStore::Exact).unwrap();
    assert_matrices(&WeightBytes::of(dev.params()), None, m.cfg.n_params());
}

/// PFLM generation on `dev` (k = 4 with penalty and tau 0.8; k = 2 greedy with a vocabulary
/// limit) equals `generate_pflm` on the CPU: tokens, `on_token` order, passes. With `half`, the
/// student goes through a model file of that dtype first and is uploaded with
/// `WeightStore::Exact`.
fn pflm_generation_gives_the_cpu_tokens(device: Device, half: Option<DType>) {
    let _g = no_grad();
    for (k, kk, penalty, tau, limit) in [(4, 4, 0.5, 0.8, None), (2, 2, 0.0, 0.0, Some(90))] {
        let teacher = Ddit::init(&cfg(), 5).unwrap();
        let mut student = Pflm::from_teacher(teacher, k, 6).unwrap();
        let dev = match half {
            None => student.to_device(device).unwrap(),
            Some(dt) => {
                student = through_file(dt, "pflm", |d| student.save(d, dt), Pflm::load);
                let dev = student.to_device_with(device, WeightStore::Exact).unwrap();
                let n: usize = student.params().iter().map(|(_, t)| t.numel()).sum();
                assert_matrices(&WeightBytes::of(&dev.params()), half, n);
                dev
            }
        };
        // prompts of different lengths: left padding, key_skip and per-row positions
        let prompts = vec![vec![3u32, 17, 42, 8, 77], vec![55, 2, 9]];
        let opts = PflmGenerateOptions {
            base: GenerateOptions {
                max_new: 10,
                tau,
                seed: 1234,
                first_stream: 7,
                eos: None,
                use_cache: true,
                vocab_limit: limit,
            },
            k: kk,
            freq_penalty: penalty,
        };
        let mut seen_cpu = vec![];
        let cpu = generate_pflm(&student, &prompts, &opts, |b, t| {
            seen_cpu.push((b, t));
            Ok(())
        })
        .unwrap();
        let mut seen_dev = vec![];
        let got = generate_pflm(&dev, &prompts, &opts, |b, t| {
            seen_dev.push((b, t));
            Ok(())
        })
        .unwrap();
        let name = format!("k {k} K {kk} penalty {penalty} tau {tau} limit {limit:?} {half:?}");
        assert_eq!(got.tokens, cpu.tokens, "{name}");
        assert_eq!(seen_dev, seen_cpu, "{name}: on_token order");
        assert_eq!(got.passes, cpu.passes, "{name}");
        assert!(got.tokens.iter().all(|t| t.len() == 10), "{name}");
        // not a degenerate run: several distinct tokens (more with the frequency penalty)
        let mut distinct = got.tokens.concat();
        distinct.sort();
        distinct.dedup();
        let want = if penalty > 0.0 { 4 } else { 2 };
        assert!(distinct.len() >= want, "{name}: tokens {:?}", got.tokens);
        if let Some(l) = limit {
            assert!(
                got.tokens.concat().iter().all(|&t| (t as usize) < l),
                "{name}"
            );
        }
    }
}

/// AR sampling on the emulator (prefill, KV-cached steps, Philox noise and the fused
/// inverse-CDF sampler on the device) gives the CPU's tokens, with sampling at tau 1 and 0.7,
/// greedy, a vocabulary limit and an EOS stop.
#[test]
fn ar_generation_on_the_emulator_gives_the_cpu_tokens() {
    ar_generation_gives_the_cpu_tokens(Device::Emu, None);
}

/// AR generation on `emu` equals `generate` on the CPU (see the test above; `half` as for
/// the PFLM).
fn ar_generation_gives_the_cpu_tokens(device: Device, half: Option<DType>) {
    let _g = no_grad();
    let mut model = Ddit::init(&cfg(), 9).unwrap();
    let dev = match half {
        None => model.to_device(device).unwrap(),
        Some(dt) => {
            model = through_file(dt, "ar", |d| model.save(d, dt), Ddit::load);
            let dev = model.to_device_with(device, WeightStore::Exact).unwrap();
            assert_matrices(&WeightBytes::of(dev.params()), half, model.cfg.n_params());
            dev
        }
    };
    let prompts = vec![vec![3u32, 17, 42, 8, 77], vec![55, 2, 9]];
    let mut eos_seen = None;
    for (tau, limit, eos) in [
        (1.0, None, None),
        (0.7, Some(90), None),
        (0.0, None, None),
        (1.0, None, Some(u32::MAX)), // EOS = the 4th token of the first run's first sequence
    ] {
        let eos = eos.map(|_| eos_seen.expect("set by the first run"));
        let opts = GenerateOptions {
            max_new: 12,
            tau,
            seed: 99,
            first_stream: 3,
            eos,
            use_cache: true,
            vocab_limit: limit,
        };
        let mut seen_cpu = vec![];
        let cpu = generate(&model, &prompts, &opts, |b, t| {
            seen_cpu.push((b, t));
            Ok(())
        })
        .unwrap();
        let mut seen_dev = vec![];
        let got = generate(&dev, &prompts, &opts, |b, t| {
            seen_dev.push((b, t));
            Ok(())
        })
        .unwrap();
        let name = format!("tau {tau} limit {limit:?} eos {eos:?} {half:?}");
        eos_seen.get_or_insert(cpu.tokens[0][3]);
        if eos.is_some() {
            assert!(got.stopped_at_eos[0] && got.tokens[0].len() <= 4, "{name}");
        }
        assert_eq!(got.tokens, cpu.tokens, "{name}");
        assert_eq!(seen_dev, seen_cpu, "{name}: on_token order");
        assert_eq!(got.passes, cpu.passes, "{name}");
        assert_eq!(got.stopped_at_eos, cpu.stopped_at_eos, "{name}");
        if tau > 0.0 {
            let mut distinct = got.tokens.concat();
            distinct.sort();
            distinct.dedup();
            assert!(distinct.len() >= 4, "{name}: tokens {:?}", got.tokens);
        }
    }
}

/// The same generation checks on a real GPU (`--features cuda`): skipped with the reason when
/// there is none (KF_REQUIRE_GPU=1 makes that a failure).
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_generation_gives_the_cpu_tokens() {
    if kf_engine::cuda::Cuda::for_tests().is_none() {
        return;
    }
    let gpu = Device::Cuda(0);
    pflm_generation_gives_the_cpu_tokens(gpu, None);
    ar_generation_gives_the_cpu_tokens(gpu, None);
    for dt in [DType::F16, DType::BF16] {
        pflm_generation_gives_the_cpu_tokens(gpu, Some(dt));
        ar_generation_gives_the_cpu_tokens(gpu, Some(dt));
    }
}
