//! The Llama-family backbone on a small random model (no download): the KV-cached decode
//! and the ragged (continuous-batching) pass equal the full forward, gradients flow
//! through every parameter, and the GGUF and Hugging Face importers read back the same
//! model (the GGUF file written here with llama.cpp's row permutation of q/k, which the
//! importer must undo). Parity with llama.cpp itself: tests/llama_parity.rs.

use kf_engine::gguf::{write_gguf, GgmlType, GgufValue};
use kf_engine::{no_grad, DType, Device, Tensor};
use kf_model::batch::{step, Model, SeqParams, Sequence};
use kf_model::config::Arch;
use kf_model::generate::{generate, GenerateOptions};
use kf_model::{llama, Ddit, DditConfig};

fn cfg(tied: bool) -> DditConfig {
    DditConfig {
        n_layers: 2,
        d_model: 48,
        n_heads: 6,
        vocab_size: 101,
        max_seq_len: 64,
        rope_base: 100000.0,
        ln_eps: 1e-5,
        eos_token_id: None,
        arch: Arch::Llama,
        n_kv_heads: Some(2),
        ffn_dim: Some(80),
        tie_embeddings: tied,
        ..DditConfig::preset("tiny").unwrap()
    }
}

/// Random weights (the norms around 1 so that they matter).
fn model(tied: bool, seed: u64) -> Ddit {
    model_with(cfg(tied), seed)
}

fn model_with(c: DditConfig, seed: u64) -> Ddit {
    let m = Ddit::init(&c, seed).unwrap();
    let named = m
        .params()
        .iter()
        .enumerate()
        .map(|(i, (n, t))| {
            let v = if n.ends_with("norm.weight") {
                let r =
                    Tensor::rand_uniform(t.shape(), DType::F32, seed, 1000 + i as u64, Device::Cpu)
                        .unwrap();
                r.to_vec::<f32>().unwrap().iter().map(|x| 0.5 + x).collect()
            } else {
                // larger than the init's 0.02, so attention is not uniform
                t.to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x * 10.0)
                    .collect()
            };
            (
                n.clone(),
                Tensor::from_vec(v, t.shape(), Device::Cpu).unwrap(),
            )
        })
        .collect();
    Ddit::from_params(&c, named).unwrap()
}

fn logits(m: &Ddit, ids: &[u32]) -> Vec<f32> {
    let _ng = no_grad();
    let t = Tensor::from_vec(ids.to_vec(), &[1, ids.len()], Device::Cpu).unwrap();
    m.forward_train(&t).unwrap().to_vec::<f32>().unwrap()
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 3) % 101)
        .collect()
}

#[test]
fn config_counts_and_round_trips() {
    let c = cfg(true);
    let m = model(true, 1);
    let n: usize = m.params().iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(n, c.n_params());
    let js = c.to_json().unwrap();
    assert!(
        js.contains("\"arch\": \"llama\"") && js.contains("\"n_kv_heads\": 2"),
        "{js}"
    );
    let back: DditConfig = serde_json::from_str(&js).unwrap();
    assert_eq!(back, c);
    // a DDiT config is written as before (no Llama keys)
    let d = DditConfig::preset("tiny").unwrap().to_json().unwrap();
    assert!(!d.contains("arch") && !d.contains("n_kv_heads"), "{d}");
    let mut bad = c.clone();
    bad.n_kv_heads = Some(4);
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("must divide"));
    let mut bad = DditConfig::preset("tiny").unwrap();
    bad.ffn_dim = Some(7);
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("Llama-family"));
}

#[test]
fn cached_and_ragged_decoding_equal_the_full_forward() {
    for tied in [true, false] {
        let m = model(tied, 2);
        let prompt = ids(9, 1);
        let opts = |cache| GenerateOptions {
            max_new: 12,
            tau: 0.0,
            use_cache: cache,
            ..Default::default()
        };
        let a = generate(&m, &[prompt.clone()], &opts(true), |_, _| Ok(())).unwrap();
        let b = generate(&m, &[prompt.clone()], &opts(false), |_, _| Ok(())).unwrap();
        assert_eq!(a.tokens, b.tokens);
        // greedy by hand from full forwards
        let mut seq = prompt.clone();
        for _ in 0..12 {
            let l = logits(&m, &seq);
            let last = &l[l.len() - 101..];
            let next = (0..101)
                .max_by(|&x, &y| last[x].total_cmp(&last[y]))
                .unwrap();
            seq.push(next as u32);
        }
        assert_eq!(&seq[9..], &a.tokens[0][..]);
        // the serving engine's ragged steps, two sequences joined
        let model = Model::Ar(m.clone());
        let mk = |p: Vec<u32>| {
            let mut sp = SeqParams::new(p);
            sp.max_new = 12;
            sp.tau = 0.0;
            Sequence::new(&model, sp).unwrap()
        };
        let (mut s1, mut s2) = (mk(prompt.clone()), mk(ids(5, 4)));
        let mut got1 = vec![];
        while s1.finished().is_none() {
            let mut both: Vec<&mut Sequence> = vec![&mut s1];
            if s2.finished().is_none() {
                both.push(&mut s2);
            }
            let out = step(&model, &mut both).unwrap();
            got1.extend(out[0].tokens.iter().copied());
        }
        assert_eq!(got1, a.tokens[0]);
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let mut m = model(false, 3);
    m.set_trainable(true);
    let t = Tensor::from_vec(ids(10, 2), &[2, 5], Device::Cpu).unwrap();
    let loss = kf_ops::reduce::sum(&m.forward_train(&t).unwrap()).unwrap();
    let g = loss.backward().unwrap();
    for (n, p) in m.params() {
        let gv = g.get(p).unwrap_or_else(|| panic!("no gradient for {n}"));
        let s: f64 = gv.to_vec_f64().unwrap().iter().map(|x| x.abs()).sum();
        assert!(s > 0.0 && s.is_finite(), "{n}: |grad| = {s}");
    }
}

/// llama.cpp's converter permutation of q/k rows within each head.
fn permute(w: &[f32], heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let src = (h * hd + s * hd / 2 + j) * cols;
                let dst = (h * hd + 2 * j + s) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A GGUF tensor to write: name, type, shape, bytes.
type GgufTensor = (String, GgmlType, Vec<usize>, Vec<u8>);

/// The GGUF form of a Llama model as llama.cpp writes it (q/k rows permuted, f32 tensors).
fn gguf_of(m: &Ddit) -> (Vec<(String, GgufValue)>, Vec<GgufTensor>) {
    let c = &m.cfg;
    let (d, hd, f, nh, hk) = (c.d_model, c.head_dim(), c.ffn(), c.n_heads, c.kv_heads());
    let p = |n: &str| m.param(n).unwrap().to_vec::<f32>().unwrap();
    let mut tensors = vec![];
    let mut put = |name: &str, shape: Vec<usize>, v: Vec<f32>| {
        tensors.push((name.to_string(), GgmlType::F32, shape, f32_bytes(&v)));
    };
    put(
        "token_embd.weight",
        vec![c.vocab_size, d],
        p("model.embed_tokens.weight"),
    );
    for i in 0..c.n_layers {
        let l = format!("model.layers.{i}");
        let qkv = p(&format!("{l}.self_attn.qkv_proj.weight"));
        let (q, rest) = qkv.split_at(nh * hd * d);
        let (k, v) = rest.split_at(hk * hd * d);
        let gu = p(&format!("{l}.mlp.gate_up_proj.weight"));
        let b = format!("blk.{i}");
        put(
            &format!("{b}.attn_norm.weight"),
            vec![d],
            p(&format!("{l}.input_layernorm.weight")),
        );
        put(
            &format!("{b}.attn_q.weight"),
            vec![nh * hd, d],
            permute(q, nh, hd, d),
        );
        put(
            &format!("{b}.attn_k.weight"),
            vec![hk * hd, d],
            permute(k, hk, hd, d),
        );
        put(&format!("{b}.attn_v.weight"), vec![hk * hd, d], v.to_vec());
        put(
            &format!("{b}.attn_output.weight"),
            vec![d, nh * hd],
            p(&format!("{l}.self_attn.o_proj.weight")),
        );
        put(
            &format!("{b}.ffn_norm.weight"),
            vec![d],
            p(&format!("{l}.post_attention_layernorm.weight")),
        );
        put(
            &format!("{b}.ffn_gate.weight"),
            vec![f, d],
            gu[..f * d].to_vec(),
        );
        put(
            &format!("{b}.ffn_up.weight"),
            vec![f, d],
            gu[f * d..].to_vec(),
        );
        put(
            &format!("{b}.ffn_down.weight"),
            vec![d, f],
            p(&format!("{l}.mlp.down_proj.weight")),
        );
    }
    put("output_norm.weight", vec![d], p("model.norm.weight"));
    let u = |x: u32| GgufValue::U32(x);
    let meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::Str("llama".into()),
        ),
        ("llama.block_count".into(), u(c.n_layers as u32)),
        ("llama.context_length".into(), u(c.max_seq_len as u32)),
        ("llama.embedding_length".into(), u(d as u32)),
        ("llama.feed_forward_length".into(), u(f as u32)),
        ("llama.attention.head_count".into(), u(nh as u32)),
        ("llama.attention.head_count_kv".into(), u(hk as u32)),
        (
            "llama.rope.freq_base".into(),
            GgufValue::F32(c.rope_base as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(c.ln_eps as f32),
        ),
        ("llama.vocab_size".into(), u(c.vocab_size as u32)),
    ];
    (meta, tensors)
}

#[test]
fn gguf_and_hugging_face_files_load_the_same_model() {
    let m = model(true, 4);
    let (meta, tensors) = gguf_of(&m);
    let dir = std::env::temp_dir().join(format!("kf-llama-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    write_gguf(&path, &meta, &tensors).unwrap();
    let g = Ddit::load(&path).unwrap();
    assert_eq!(g.cfg.arch, Arch::Llama);
    assert!(g.cfg.tie_embeddings);
    let x = ids(20, 5);
    let want = logits(&m, &x);
    let got = logits(&g, &x);
    let err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // rope_base and eps went through f32 metadata
    assert!(err < 1e-4, "GGUF import differs by {err}");
    // the Hugging Face form of it
    let hf = dir.join("hf");
    llama::save_hf(&g, &hf, DType::F32).unwrap();
    assert!(llama::is_hf_dir(&hf) && !llama::is_hf_dir(&dir));
    assert_eq!(logits(&Ddit::load(&hf).unwrap(), &x), got);
    // and our own checkpoint format
    let ours = dir.join("ours");
    g.save(&ours, DType::F32).unwrap();
    assert_eq!(logits(&Ddit::load(&ours).unwrap(), &x), got);
    // a wrong architecture and a missing tensor are named
    let mut meta2 = meta.clone();
    meta2[0].1 = GgufValue::Str("gpt2".into());
    write_gguf(&path, &meta2, &tensors).unwrap();
    let e = format!("{:#}", Ddit::load(&path).unwrap_err());
    assert!(e.contains("\"gpt2\" is not supported"), "{e}");
    write_gguf(&path, &meta, &tensors[..tensors.len() - 1]).unwrap();
    let e = format!("{:#}", Ddit::load(&path).unwrap_err());
    assert!(e.contains("missing tensor output_norm.weight"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The PFLM student on a Llama backbone: the staircase training pass equals per-window
/// KV-cached inference steps, cached k-token generation equals recomputing, and the
/// staircase pass is differentiable (the distillation stages run on it unchanged).
#[test]
fn a_pflm_student_runs_on_the_llama_backbone() {
    use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
    use kf_model::KvCache;
    let m = Pflm::from_teacher(model(false, 5), 3, 7).unwrap();
    let (b, n, k, v) = (2, 5, 3, 101);
    let ctx_v = ids(b * n, 6);
    let ctx = Tensor::from_vec(ctx_v.clone(), &[b, n], Device::Cpu).unwrap();
    let uv: Vec<f64> = (0..b * n * k)
        .map(|i| (i as f64 * 0.6180339887 + 0.1) % 1.0)
        .collect();
    let u = Tensor::from_vec(uv.clone(), &[b, n, k], Device::Cpu).unwrap();
    let tau = [1.0, 0.8];
    let stair = {
        let _ng = no_grad();
        m.forward_staircase(&ctx, &u, &tau)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
    };
    for t in [0, 2, 4] {
        let mut cache = KvCache::new(m.cfg(), b, n + k, DType::F32).unwrap();
        let pre: Vec<u32> = (0..b)
            .flat_map(|bi| ctx_v[bi * n..bi * n + t + 1].to_vec())
            .collect();
        let pre = Tensor::from_vec(pre, &[b, t + 1], Device::Cpu).unwrap();
        let ut: Vec<f64> = (0..b)
            .flat_map(|bi| uv[(bi * n + t) * k..(bi * n + t + 1) * k].to_vec())
            .collect();
        let ut = Tensor::from_vec(ut, &[b, k], Device::Cpu).unwrap();
        let _ng = no_grad();
        let got = m
            .step_logits(&mut cache, &pre, &[0, 0], &[], &ut, &tau)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for bi in 0..b {
            for j in 0..k {
                let s0 = ((bi * n + t) * k + j) * v;
                let g0 = (bi * k + j) * v;
                let err = stair[s0..s0 + v]
                    .iter()
                    .zip(&got[g0..g0 + v])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "t {t} b {bi} hint {j}: {err}");
            }
        }
    }
    let mut opts = PflmGenerateOptions {
        base: GenerateOptions {
            max_new: 10,
            tau: 1.0,
            seed: 3,
            ..Default::default()
        },
        k: 3,
        freq_penalty: 0.5,
    };
    let prompts = vec![ids(4, 1), ids(7, 2)];
    let cached = generate_pflm(&m, &prompts, &opts, |_, _| Ok(())).unwrap();
    opts.base.use_cache = false;
    let plain = generate_pflm(&m, &prompts, &opts, |_, _| Ok(())).unwrap();
    assert_eq!(cached.tokens, plain.tokens);
    let mut mt = m.clone();
    mt.set_trainable(true);
    let out = mt.forward_staircase(&ctx, &u, &tau).unwrap();
    let g = kf_ops::reduce::sum(&out).unwrap().backward().unwrap();
    let (name, p) = &mt.params()[3];
    assert!(g.get(p).is_some(), "no gradient for {name}");
}

/// The Llama backbone on the emulator (RMSNorm through LayerNorm's kernels in RMS mode,
/// SwiGLU's kernels, grouped-query attention; head dim 64, as SmolLM2's, since the attention
/// kernels are instantiated for 64 and 128): the CPU's logits up to f32 rounding, its greedy
/// and sampled tokens exactly, and its gradients.
#[test]
fn the_llama_backbone_runs_on_the_emulator() {
    let c = DditConfig {
        d_model: 128,
        n_heads: 2,
        n_kv_heads: Some(1),
        ..cfg(false)
    };
    let m = model_with(c, 5);
    let on = m.to_device(Device::Emu).unwrap();
    let x = ids(12, 3);
    let (a, b) = {
        let _ng = no_grad();
        let t = Tensor::from_vec(x.clone(), &[2, 6], Device::Cpu).unwrap();
        (
            m.forward_train(&t).unwrap().to_vec::<f32>().unwrap(),
            on.forward_train(&t.to_device(Device::Emu).unwrap())
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
        )
    };
    let worst = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs() / (1.0 + p.abs()))
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "logits differ by {worst} (relative)");
    for tau in [0.0, 0.8] {
        let opts = GenerateOptions {
            max_new: 10,
            tau,
            seed: 7,
            ..Default::default()
        };
        let prompts = [ids(7, 1), ids(4, 2)];
        let want = generate(&m, &prompts, &opts, |_, _| Ok(())).unwrap();
        let got = generate(&on, &prompts, &opts, |_, _| Ok(())).unwrap();
        assert_eq!(got.tokens, want.tokens, "tau {tau}");
    }
    let grads = |m: &Ddit, dev: Device| {
        let mut m = m.clone();
        m.set_trainable(true);
        let t = Tensor::from_vec(x.clone(), &[2, 6], dev).unwrap();
        let loss = kf_ops::reduce::sum(&m.forward_train(&t).unwrap()).unwrap();
        let g = loss.backward().unwrap();
        m.params()
            .iter()
            .map(|(n, p)| (n.clone(), g.get(p).unwrap().to_vec_f64().unwrap()))
            .collect::<Vec<_>>()
    };
    for ((n, gc), (_, ge)) in grads(&m, Device::Cpu).iter().zip(grads(&on, Device::Emu)) {
        let scale = gc.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-3);
        let worst = gc
            .iter()
            .zip(&ge)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-3 * scale,
            "{n}: gradients differ by {worst} (max |g| {scale})"
        );
    }
}

/// RoPE scaling from both file kinds: a Hugging Face config's llama3 `rope_scaling` and a
/// GGUF file's `rope_freqs.weight` (the divisors llama.cpp's converter writes for it) give the
/// model's logits; the scaling changes them; linear scaling is read from GGUF metadata;
/// unsupported kinds are one clear error and the HF writer refuses explicit factors
/// before writing anything.
#[test]
fn rope_scaling_loads_from_gguf_and_hugging_face_files() {
    use kf_model::config::RopeScaling;
    let mut c = cfg(true);
    // head dim 8, base 1e5: wavelengths 6.3, 112, 1986, 35325 against 256 / 4 and 256 / 1:
    // one frequency kept, one blended, two divided by 8
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 256.0,
    };
    c.rope_scaling = Some(llama3.clone());
    let m = model_with(c.clone(), 4);
    let div = llama3.divisors(c.rope_base, c.head_dim());
    assert_eq!((div[0], div[2], div[3]), (1.0, 8.0, 8.0));
    assert!(div[1] > 1.0 && div[1] < 8.0, "{div:?}");
    let x = ids(40, 5);
    let want = logits(&m, &x);
    let mut plain = c.clone();
    plain.rope_scaling = None;
    let unscaled = Ddit::from_params(&plain, m.params().to_vec()).unwrap();
    let moved = want
        .iter()
        .zip(&logits(&unscaled, &x))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the scaling changed nothing ({moved})");
    let dir = std::env::temp_dir().join(format!("kf-llama-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Hugging Face: rope_scaling {"rope_type": "llama3", ...} both ways
    let hf = dir.join("hf");
    llama::save_hf(&m, &hf, DType::F32).unwrap();
    let h = Ddit::load(&hf).unwrap();
    assert_eq!(h.cfg.rope_scaling, Some(llama3));
    assert_eq!(logits(&h, &x), want);
    // GGUF: the divisors as rope_freqs.weight
    let (meta, mut tensors) = gguf_of(&m);
    let d32: Vec<f32> = div.iter().map(|&v| v as f32).collect();
    tensors.push((
        "rope_freqs.weight".into(),
        GgmlType::F32,
        vec![div.len()],
        f32_bytes(&d32),
    ));
    let path = dir.join("scaled.gguf");
    write_gguf(&path, &meta, &tensors).unwrap();
    let g = Ddit::load(&path).unwrap();
    assert!(matches!(
        g.cfg.rope_scaling,
        Some(RopeScaling::Factors { .. })
    ));
    let err = want
        .iter()
        .zip(&logits(&g, &x))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // rope_base and the divisors went through f32
    assert!(err < 1e-4, "GGUF rope_freqs differs by {err}");
    // our own format keeps the factors; Hugging Face's has no form for them
    let ours = dir.join("ours");
    g.save(&ours, DType::F32).unwrap();
    assert_eq!(Ddit::load(&ours).unwrap().cfg, g.cfg);
    let e = format!(
        "{:#}",
        llama::save_hf(&g, &dir.join("hf2"), DType::F32).unwrap_err()
    );
    assert!(e.contains("no Hugging Face config form"), "{e}");
    assert!(!dir.join("hf2").exists());
    // linear scaling from the metadata; yarn refused by name
    let (mut meta, tensors) = gguf_of(&m);
    meta.push((
        "llama.rope.scaling.type".into(),
        GgufValue::Str("linear".into()),
    ));
    meta.push(("llama.rope.scaling.factor".into(), GgufValue::F32(2.0)));
    write_gguf(&path, &meta, &tensors).unwrap();
    let g = Ddit::load(&path).unwrap();
    assert_eq!(
        g.cfg.rope_scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
    let n = meta.len();
    meta[n - 2].1 = GgufValue::Str("yarn".into());
    write_gguf(&path, &meta, &tensors).unwrap();
    let e = format!("{:#}", Ddit::load(&path).unwrap_err());
    assert!(e.contains("RoPE scaling \"yarn\" is not supported"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
