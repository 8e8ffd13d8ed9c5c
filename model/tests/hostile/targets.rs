//! The hostile-input targets shared by model/tests/hostile_files.rs (CI, a few thousand
//! cases per format) and the fuzz driver (fuzz/, as many as you like): for each format a
//! valid file is built, mutated by `mutate.rs`, written and fed to the loader kfrun uses.
//! A case passes when the loader returns Ok, or an error of one line that names the file;
//! a panic (caught) or an anonymous error fails it, and its input is kept under the
//! system temp dir as `kf-hostile-<format>-case<i>.bin`.

use crate::mutate::{self, Rng};
use kf_engine::gguf::{GgmlType, Gguf, GgufValue};
use kf_engine::{Device, Tensor};
use kf_model::checkpoint;
use kf_model::data::{read_corpus, SequentialWindows, TokenData, WindowSampler};
use kf_model::distill_chain::Recipe;
use kf_model::pflm::Pflm;
use kf_model::tokenizer::{apply_chat_template, BpeTrainOptions, Tokenizer};
use kf_model::train::{estimate_train_bytes, OptimConfig, TrainConfig, Trainer, TrainerState};
use kf_model::{Ddit, DditConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

pub struct TmpDir(PathBuf);

impl TmpDir {
    fn new(name: &str) -> TmpDir {
        let p = std::env::temp_dir().join(format!("kf-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Outcome counts of one format.
#[derive(Debug, Default)]
pub struct Tally {
    pub format: String,
    pub cases: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// Runs `n` mutations of `valid` (written to `file` before each `load`) and checks that
/// `load` returns Ok or an error that is one line and contains one of `names`.
#[allow(clippy::too_many_arguments)]
fn fuzz(
    format: &str,
    n: usize,
    seed: u64,
    valid: &[u8],
    file: &Path,
    names: &[&str],
    mutate: impl Fn(&mut Rng, &[u8]) -> Vec<u8>,
    load: impl Fn() -> anyhow::Result<()>,
) -> Tally {
    // the unmutated file must load
    std::fs::write(file, valid).unwrap();
    if let Err(e) = load() {
        panic!("{format}: the valid file does not load: {e:#}");
    }
    let mut t = Tally {
        format: format.to_string(),
        ..Tally::default()
    };
    let mut failures = Vec::new();
    for i in 0..n {
        let mut rng = Rng(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let bytes = mutate(&mut rng, valid);
        std::fs::write(file, &bytes).unwrap();
        let res = catch_unwind(AssertUnwindSafe(&load));
        let problem = match res {
            Err(_) => Some("panicked".to_string()),
            Ok(Ok(())) => {
                t.accepted += 1;
                None
            }
            Ok(Err(e)) => {
                t.rejected += 1;
                let msg = format!("{e:#}");
                if !names.iter().any(|n| msg.contains(n)) {
                    Some(format!("error does not name the file ({names:?}): {msg}"))
                } else if msg.contains('\n') {
                    Some(format!("error is not one line: {msg:?}"))
                } else {
                    None
                }
            }
        };
        t.cases += 1;
        if let Some(p) = problem {
            let keep = std::env::temp_dir().join(format!("kf-hostile-{format}-case{i}.bin"));
            std::fs::write(&keep, &bytes).unwrap();
            failures.push(format!("case {i} ({}): {p}", keep.display()));
        }
    }
    eprintln!(
        "{format}: {} mutated cases, {} accepted, {} rejected with a clear error",
        t.cases, t.accepted, t.rejected
    );
    assert!(
        failures.is_empty(),
        "{format}: {} of {n} cases failed:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(t.rejected > 0, "{format}: no mutation was rejected");
    t
}

fn tiny_cfg() -> DditConfig {
    DditConfig {
        n_layers: 1,
        d_model: 8,
        n_heads: 2,
        vocab_size: 300,
        max_seq_len: 16,
        rope_base: 10000.0,
        ln_eps: 1e-5,
        mask_token_id: None,
        eos_token_id: Some(0),
        ..DditConfig::preset("tiny").unwrap()
    }
}

fn tokenizer() -> Tokenizer {
    let texts = [
        "the cat sat on the mat",
        "a dog ate the bone, then the cat",
        "naïve café — ünïcode ✓ 123",
    ];
    Tokenizer::train_bpe(
        texts.iter().cycle().take(30),
        &BpeTrainOptions {
            vocab_size: 290,
            min_frequency: 1,
        },
    )
    .unwrap()
}

/// A loaded model's weights must be finite (kfrun checks this on every load).
fn finite(path: &Path, params: &[(String, Tensor)]) -> anyhow::Result<()> {
    checkpoint::check_finite(path, params)
}

pub fn model_weights(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("weights");
    let m = Ddit::init(&tiny_cfg(), 1).unwrap();
    m.save(&d.0, kf_engine::DType::F32).unwrap();
    let w = d.0.join("model.safetensors");
    let valid = std::fs::read(&w).unwrap();
    let dir = d.0.clone();
    out.push(fuzz(
        "model.safetensors (AR)",
        cases,
        seed ^ 1,
        &valid,
        &w,
        &["model.safetensors"],
        mutate::mutate_safetensors,
        || {
            let m = Ddit::load(&dir)?;
            finite(&dir.join("model.safetensors"), m.params())
        },
    ));
    // the same bytes through the engine's plain loader
    let w2 = w.clone();
    out.push(fuzz(
        "safetensors (io::load)",
        cases,
        seed ^ 2,
        &valid,
        &w,
        &["model.safetensors"],
        mutate::mutate_safetensors,
        || {
            let l = kf_engine::io::load(&w2)?;
            for (_, t) in &l.tensors {
                // every tensor handed out must be readable
                let _ = t.to_vec_f64()?;
            }
            Ok(())
        },
    ));

    let ds = TmpDir::new("weights-pflm");
    let p = Pflm::from_teacher(m, 2, 3).unwrap();
    p.save(&ds.0, kf_engine::DType::F32).unwrap();
    let ws = ds.0.join("model.safetensors");
    let valid = std::fs::read(&ws).unwrap();
    let dir = ds.0.clone();
    out.push(fuzz(
        "model.safetensors (PFLM)",
        cases,
        seed ^ 3,
        &valid,
        &ws,
        &["model.safetensors"],
        mutate::mutate_safetensors,
        || Pflm::load(&dir).map(|_| ()),
    ));
    out
}

pub fn model_config(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("config");
    let m = Ddit::init(&tiny_cfg(), 1).unwrap();
    m.save(&d.0, kf_engine::DType::F32).unwrap();
    let c = d.0.join("config.json");
    let valid = std::fs::read(&c).unwrap();
    let dir = d.0.clone();
    out.push(fuzz(
        "config.json",
        cases,
        seed ^ 4,
        &valid,
        &c,
        &["config.json"],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || {
            let cfg = checkpoint::read_config(&dir)?;
            // a valid config's sizes never overflow
            let _ = cfg.n_params();
            let _ = estimate_train_bytes(&cfg, 4, 8);
            // the weights (still valid) are checked against it
            Ddit::load(&dir).map(|_| ())
        },
    ));
    out
}

pub fn tokenizer_json(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("tokenizer");
    let tok = tokenizer();
    let f = d.0.join("tokenizer.json");
    let valid = tok.to_json().unwrap().into_bytes();
    let cfg = tiny_cfg();
    let dir = d.0.clone();
    out.push(fuzz(
        "tokenizer.json",
        cases,
        seed ^ 5,
        &valid,
        &f,
        &["tokenizer.json"],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || {
            let t = checkpoint::read_tokenizer(&dir, &cfg)?;
            let ids = t.encode("the cat — naïve ✓ <|endoftext|>")?;
            t.decode(&ids)?;
            let mut s = t.stream_decoder();
            for &i in &ids {
                s.push(i)?;
            }
            s.finish()?;
            // an id past the vocabulary is an error, not a panic
            assert!(t.decode(&[u32::MAX]).is_err());
            Ok(())
        },
    ));
    out
}

pub fn training_checkpoint(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("ckpt");
    // trainer.json as the trainer writes it
    let state = TrainerState {
        format: "kf-trainer-v1".into(),
        kind: "teacher".into(),
        step: 12,
        seed: 3,
        config: serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.json"),
            )
            .unwrap(),
        )
        .unwrap(),
        data: kf_model::train::DataId {
            tokenizer_sha256: "ab".repeat(32),
            corpus_sha256: "cd".repeat(32),
            train_tokens: 1000,
            val_tokens: 100,
        },
        best_val_loss: Some(4.5),
        last_val_loss: Some(4.6),
        metrics_bytes: 1234,
        tokens_seen: 4096,
        elapsed_s: 1.5,
        threads: 2,
    };
    state.write(&d.0).unwrap();
    let tj = d.0.join("trainer.json");
    let valid = std::fs::read(&tj).unwrap();
    let dir = d.0.clone();
    out.push(fuzz(
        "trainer.json",
        cases,
        seed ^ 6,
        &valid,
        &tj,
        &["trainer.json"],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || TrainerState::read(&dir).map(|_| ()),
    ));

    // optimizer.safetensors of a tiny model after two updates
    let mut m = Ddit::init(&tiny_cfg(), 1).unwrap();
    m.set_trainable(true);
    let opt = OptimConfig {
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 1,
        total_steps: 10,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
        grad_accum: 1,
    };
    let mut tr = Trainer::new(m.params(), opt.clone()).unwrap();
    for _ in 0..2 {
        tr.train_step(|_, _| {
            let ids = Tensor::from_vec(vec![1u32, 2, 3, 4], &[1, 4], Device::Cpu)?;
            let tg = Tensor::from_vec(vec![2u32, 3, 4, 5], &[4], Device::Cpu)?;
            let logits = m.forward_train(&ids)?.reshape(&[4, 300])?;
            Ok((
                kf_ops::cross_entropy::cross_entropy(&logits, &tg, None)?.0,
                Vec::new(),
            ))
        })
        .unwrap();
    }
    let of = d.0.join("optimizer.safetensors");
    tr.save_optimizer(&of).unwrap();
    let valid = std::fs::read(&of).unwrap();
    let params = m.params().to_vec();
    out.push(fuzz(
        "optimizer.safetensors",
        cases,
        seed ^ 7,
        &valid,
        &of,
        &["optimizer.safetensors"],
        mutate::mutate_safetensors,
        || {
            let mut t = Trainer::new(&params, opt.clone())?;
            t.load_optimizer(&of, 2)
        },
    ));
    out
}

/// A prepared directory from a tiny corpus.
fn shards(d: &Path) -> PathBuf {
    let corpus = d.join("corpus.jsonl");
    let docs: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"source": "t", "id": format!("d{i}"),
                "text": format!("document {i}: the cat sat on the mat {}", "and ran ".repeat(i))})
            .to_string()
        })
        .collect();
    std::fs::write(&corpus, docs.join("\n")).unwrap();
    let tok = d.join("tokenizer.json");
    tokenizer().save(&tok).unwrap();
    let out = d.join("shards");
    kf_model::data::prepare(
        &corpus,
        &tok,
        &out,
        &kf_model::data::PrepareOptions {
            val_fraction: 0.25,
            seed: 0,
        },
    )
    .unwrap();
    out
}

/// What the trainer does with a prepared directory, short of training.
fn use_shards(dir: &Path) -> anyhow::Result<()> {
    let data = TokenData::open(dir)?;
    if let Ok(s) = WindowSampler::new(data.train.clone(), 8, 3, 1) {
        for step in 0..4 {
            s.batch(step);
        }
    }
    if let Ok(w) = SequentialWindows::new(data.val.clone(), 4, 2, Some(5)) {
        for b in w {
            let _ = (b.inputs(), b.targets());
        }
    }
    Ok(())
}

pub fn token_shards(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("shards");
    let dir = shards(&d.0);
    let meta = dir.join("meta.json");
    let valid = std::fs::read(&meta).unwrap();
    let dname = dir.display().to_string();
    out.push(fuzz(
        "meta.json",
        cases,
        seed ^ 8,
        &valid,
        &meta,
        &[&dname],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || use_shards(&dir),
    ));
    std::fs::write(&meta, &valid).unwrap();
    let train = dir.join("train.bin");
    let valid = std::fs::read(&train).unwrap();
    out.push(fuzz(
        "train.bin",
        cases,
        seed ^ 9,
        &valid,
        &train,
        &["train.bin"],
        mutate::mutate_bytes,
        || use_shards(&dir),
    ));
    let corpus = d.0.join("corpus.jsonl");
    let valid = std::fs::read(&corpus).unwrap();
    out.push(fuzz(
        "corpus.jsonl",
        cases,
        seed ^ 10,
        &valid,
        &corpus,
        &["corpus.jsonl"],
        |r, b| mutate::mutate_jsonl(r, &String::from_utf8_lossy(b)),
        || read_corpus(&corpus).map(|_| ()),
    ));
    out
}

pub fn training_config_and_recipe(cases: usize, seed: u64) -> Vec<Tally> {
    let mut out = Vec::new();
    let d = TmpDir::new("configs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let f = d.0.join("tiny.json");
    let valid = std::fs::read(root.join("configs/tiny.json")).unwrap();
    let f2 = f.clone();
    out.push(fuzz(
        "training config",
        cases,
        seed ^ 11,
        &valid,
        &f,
        &["tiny.json"],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || {
            let c = TrainConfig::from_file(&f2)?;
            let m = c
                .model_config(300, 0)
                .map_err(|e| e.context(format!("training config {}", f2.display())))?;
            let _ = estimate_train_bytes(&m, c.batch_size, c.seq_len);
            Ok(())
        },
    ));
    let f = d.0.join("distill-tiny.json");
    let valid = std::fs::read(root.join("configs/distill-tiny.json")).unwrap();
    let f2 = f.clone();
    out.push(fuzz(
        "distillation recipe",
        cases,
        seed ^ 12,
        &valid,
        &f,
        &["distill-tiny.json"],
        |r, b| mutate::mutate_json(r, std::str::from_utf8(b).unwrap()),
        || {
            let r = Recipe::from_file(&f2)?;
            for k in [1, 2, 4] {
                if let Ok(st) = r.stages_to(k) {
                    for s in &st {
                        let _ = r.stage_config(s).optim.validate();
                    }
                }
            }
            Ok(())
        },
    ));
    out
}

/// A small valid GGUF: a gpt2 tokenizer (byte symbols, merges, a control token), a ChatML
/// template, metadata of several types (a nested array among them) and a tensor of each
/// dequantizable type with deterministic bytes (finite f16 scales).
fn valid_gguf(path: &Path) {
    let s = |x: &str| GgufValue::Str(x.into());
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("llama.block_count".to_string(), GgufValue::U32(1)),
        ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s("smollm")),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(["<|im_start|>", "a", "b", "c", "1", "Ġ", "ab", "Ġc"].map(s).to_vec()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array([3, 1, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(["a b", "Ġ c"].map(s).to_vec()),
        ),
        ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(0)),
        (
            "tokenizer.chat_template".to_string(),
            s("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
        ),
        (
            "test.nested".to_string(),
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
                GgufValue::Array(vec![]),
            ]),
        ),
        ("test.flag".to_string(), GgufValue::Bool(true)),
    ];
    let mut rng = Rng(7);
    let types = [
        (GgmlType::F32, vec![2, 3]),
        (GgmlType::F16, vec![4]),
        (GgmlType::BF16, vec![2, 1]),
        (GgmlType::Q4_0, vec![2, 32]),
        (GgmlType::Q4_1, vec![1, 32]),
        (GgmlType::Q5_0, vec![32]),
        (GgmlType::Q5_1, vec![32]),
        (GgmlType::Q8_0, vec![1, 1, 32]),
        (GgmlType::Q2_K, vec![256]),
        (GgmlType::Q3_K, vec![256]),
        (GgmlType::Q4_K, vec![256]),
        (GgmlType::Q5_K, vec![256]),
        (GgmlType::Q6_K, vec![256]),
    ];
    let tensors: Vec<_> = types
        .into_iter()
        .map(|(ty, shape)| {
            let n = shape.iter().product::<usize>() / ty.block_elems() * ty.block_bytes();
            // small random bytes: every f16/bf16/f32 field stays finite (top byte < 0x3c)
            let bytes = (0..n).map(|_| (rng.next() % 0x3c) as u8).collect();
            (format!("t.{}", ty.name()), ty, shape, bytes)
        })
        .collect();
    kf_engine::gguf::write_gguf(path, &meta, &tensors).unwrap();
}

/// GGUF files: open (validation), dequantize every tensor, build the tokenizer, encode,
/// render the chat template.
pub fn gguf(cases: usize, seed: u64) -> Vec<Tally> {
    let d = TmpDir::new("gguf");
    let f = d.0.join("model.gguf");
    valid_gguf(&f);
    let valid = std::fs::read(&f).unwrap();
    let path = f.clone();
    vec![fuzz(
        "model.gguf",
        cases,
        seed ^ 0x66,
        &valid,
        &f,
        &["model.gguf"],
        mutate::mutate_gguf,
        || {
            let g = Gguf::open(&path)?;
            for t in g.tensors() {
                let x = g.tensor_f32(&t.name)?;
                anyhow::ensure!(x.shape() == &t.shape[..], "internal: shape");
            }
            let tok = Tokenizer::from_gguf(&g)?;
            let ids = tok.encode("ab c1<|im_start|>")?;
            tok.decode(&ids)?;
            apply_chat_template(&g, "hi")?;
            Ok(())
        },
    )]
}
