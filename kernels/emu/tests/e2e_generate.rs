//! End to end on the emulated kernels: a tiny random DDiT / PFLM (d 128, 2 heads of head dim
//! 64, 2 layers, V 97) uploaded to the emulator device (`Emu`) runs
//! - the AR forward (uncached, and prefill + KV-cached steps with the cache on the device)
//!   against `Ddit::forward_train` on the CPU: logits within f32 tolerance;
//! - PFLM generation (`generate_pflm_dev`) against `generate_pflm` on the CPU from the same
//!   prompts (left-padded batch), seed and options: tokens identical.

use kf_engine::{no_grad, Device, Tensor};
use kf_kernels_emu::device::Emu;
use kf_model::config::DditConfig;
use kf_model::generate::GenerateOptions;
use kf_model::kdev_model::{generate_pflm_dev, DevDdit, DevKvCache, DevPflm};
use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
use kf_model::Ddit;
use kf_tests::harness::{compare, Tol};

fn cfg() -> DditConfig {
    let mut c = DditConfig::preset("tiny").unwrap();
    c.n_layers = 2;
    c.d_model = 128;
    c.n_heads = 2;
    c.vocab_size = 97;
    c.max_seq_len = 64;
    c.mask_token_id = Some(96);
    c.eos_token_id = None;
    c
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
    let dev = DevDdit::upload(&Emu, &m).unwrap();
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 31 % 96) as u32).collect();
    let cpu = m
        .forward_train(&Tensor::from_vec(ids.clone(), &[b, t], Device::Cpu).unwrap())
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let v = m.cfg.vocab_size;
    let got = dev
        .forward(&Emu, &ids, b, t)
        .unwrap()
        .to_vec::<Emu, f32>(&Emu)
        .unwrap();
    compare("AR forward logits", &f64s(&got), &f64s(&cpu), LOGIT_TOL).unwrap();
    // the reserved token's logit is exactly -1000 on both
    assert!(got.chunks(v).all(|r| r[96] == -1000.0));

    // prefill 6 rows, then steps of 2 and 1 rows, against the same rows of the full forward
    let mut cache = DevKvCache::new(&Emu, &m.cfg, b, t).unwrap();
    let mut at = 0;
    for step in [6, 2, 1] {
        let part: Vec<u32> = (0..b)
            .flat_map(|bi| ids[bi * t + at..bi * t + at + step].to_vec())
            .collect();
        let lg = dev
            .forward_cached(&Emu, &mut cache, &part, b, step)
            .unwrap()
            .to_vec::<Emu, f32>(&Emu)
            .unwrap();
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
        .forward_train(&Tensor::from_vec(ids.clone(), &[1, t], Device::Cpu).unwrap())
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let got = dev
        .forward(&Emu, &ids, 1, t)
        .unwrap()
        .to_vec::<Emu, f32>(&Emu)
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
    let m = Ddit::init(&c, 1).unwrap();
    let e = format!(
        "{:#}",
        DevDdit::upload(&Emu, &m)
            .err()
            .expect("head dim 32 must fail")
    );
    assert!(e.contains("head dim 32 has no kernel"), "{e}");
}

#[test]
fn pflm_generation_on_the_emulator_gives_the_cpu_tokens() {
    let _g = no_grad();
    for (k, kk, penalty, tau, limit) in [(4, 4, 0.5, 0.8, None), (2, 2, 0.0, 0.0, Some(90))] {
        let teacher = Ddit::init(&cfg(), 5).unwrap();
        let student = Pflm::from_teacher(teacher, k, 6).unwrap();
        let dev = DevPflm::upload(&Emu, &student).unwrap();
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
        let got = generate_pflm_dev(&Emu, &dev, &prompts, &opts, |b, t| {
            seen_dev.push((b, t));
            Ok(())
        })
        .unwrap();
        let name = format!("k {k} K {kk} penalty {penalty} tau {tau} limit {limit:?}");
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
