//! Resource limits and flag validation (issue 8.5), end to end through `kfrun`: requests
//! and configurations that would need more memory than the machine has fail with one
//! clear message before allocating (exit 1, no abort); a k larger than the student's,
//! batch 0 and negative lengths are usage errors; NaN weights are named at load.

use kf_engine::DType;
use kf_model::pflm::Pflm;
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
use kf_model::{Ddit, DditConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kfrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("kfrun runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kfrun-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Exit 1 with one error line on stderr that contains `needle` (progress lines may
/// precede it), no panic, no abort.
fn clear_error(o: &Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1:\n{se}");
    assert!(!se.contains("panicked"), "panic instead of an error:\n{se}");
    let errs: Vec<&str> = se.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errs.len(), 1, "not one error line:\n{se}");
    assert!(errs[0].starts_with("kfrun: error: "), "{se}");
    assert!(
        errs[0].contains(needle),
        "the error lacks {needle:?}:\n{se}"
    );
}

/// A usage error from the argument parser (exit 2).
fn usage_error(o: &Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "expected a usage error:\n{se}");
    assert!(se.contains(needle), "stderr lacks {needle:?}:\n{se}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// An AR model directory and a k = 2 student made from it.
fn models(root: &Path) -> (PathBuf, PathBuf) {
    let text = "the cat sat on the mat. the dog sat on the log. a cat and a dog. ".repeat(20);
    let tok = Tokenizer::train_bpe(
        std::iter::once(text),
        &BpeTrainOptions {
            vocab_size: 300,
            min_frequency: 2,
        },
    )
    .unwrap();
    let mut cfg = DditConfig::preset("tiny").unwrap();
    cfg.vocab_size = 300;
    cfg.max_seq_len = 48;
    cfg.eos_token_id = tok.eos_id();
    let (ar, st) = (root.join("ar"), root.join("student"));
    let m = Ddit::init(&cfg, 1).unwrap();
    m.save(&ar, DType::F32).unwrap();
    tok.save(ar.join("tokenizer.json")).unwrap();
    Pflm::from_teacher(m, 2, 3)
        .unwrap()
        .save(&st, DType::F32)
        .unwrap();
    tok.save(st.join("tokenizer.json")).unwrap();
    (ar, st)
}

#[test]
fn generate_limits_and_flags() {
    let root = tmp("gen");
    let (ar, st) = models(&root);
    let gen = |dir: &Path, extra: &[&str]| {
        let mut a = vec!["generate", "--model", s(dir), "--prompt", "the cat"];
        a.extend_from_slice(extra);
        kfrun(&a)
    };
    // k larger than the student's, k 0, k on an AR model
    clear_error(&gen(&st, &["--k", "3"]), "trained with k = 2");
    clear_error(&gen(&st, &["--k", "0"]), "--k 0");
    clear_error(&gen(&ar, &["--k", "2"]), "--k");
    clear_error(&gen(&ar, &["--batch", "0"]), "--batch must be");
    // negative or non-numeric lengths: usage errors
    usage_error(&gen(&ar, &["--max-new", "-1"]), "--max-new");
    usage_error(&gen(&ar, &["--batch", "-4"]), "--batch");
    usage_error(&gen(&st, &["--k", "-2"]), "--k");
    usage_error(&gen(&ar, &["--seed", "x"]), "--seed");
    // a batch whose KV cache cannot fit: refused before allocating
    for dir in [&ar, &st] {
        clear_error(&gen(dir, &["--batch", "1000000000000"]), "needs about");
    }
    // NaN weights: named at load, not sampled from
    let nan = root.join("nan");
    let mut m = Ddit::load(&ar).unwrap();
    let named: Vec<(String, kf_engine::Tensor)> = m
        .params()
        .iter()
        .map(|(n, t)| {
            let mut v = t.to_vec::<f32>().unwrap();
            if n == "blocks.0.attn_out.weight" {
                v[5] = f32::NAN;
            }
            (
                n.clone(),
                kf_engine::Tensor::from_vec(v, t.shape(), kf_engine::Device::Cpu).unwrap(),
            )
        })
        .collect();
    m = Ddit::from_params(&m.cfg, named).unwrap();
    m.save(&nan, DType::F32).unwrap();
    std::fs::copy(ar.join("tokenizer.json"), nan.join("tokenizer.json")).unwrap();
    clear_error(&gen(&nan, &[]), "blocks.0.attn_out.weight\" holds NaN");
    // a config.json whose model cannot exist
    let cj = ar.join("config.json");
    let good = std::fs::read_to_string(&cj).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["n_layers"] = 1_000_000_000u64.into();
    std::fs::write(&cj, v.to_string()).unwrap();
    clear_error(&gen(&ar, &[]), "n_layers");
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["d_model"] = (1u64 << 40).into();
    v["n_heads"] = 2.into();
    std::fs::write(&cj, v.to_string()).unwrap();
    clear_error(&gen(&ar, &[]), "config.json");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn train_and_distill_limits_and_flags() {
    let root = tmp("train");
    let corpus = repo("data/excerpt/corpus.jsonl");
    let (tok, shards) = (root.join("tok.json"), root.join("shards"));
    assert!(kfrun(&[
        "tokenizer",
        "train",
        "--corpus",
        s(&corpus),
        "--vocab-size",
        "300",
        "--out",
        s(&tok)
    ])
    .status
    .success());
    assert!(kfrun(&[
        "data",
        "prepare",
        "--corpus",
        s(&corpus),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&shards)
    ])
    .status
    .success());
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/tiny.json")).unwrap()).unwrap();
    let train = |name: &str, edit: &dyn Fn(&mut serde_json::Value), extra: &[&str]| {
        let mut c = base.clone();
        edit(&mut c);
        let p = root.join(format!("{name}.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        let out = root.join(name);
        let mut a = vec![
            "train",
            "--config",
            s(&p),
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        kfrun(&a)
    };
    clear_error(
        &train("big-batch", &|c| c["batch_size"] = (1u64 << 40).into(), &[]),
        "needs about",
    );
    clear_error(
        &train(
            "big-accum",
            &|c| c["grad_accum"] = 1_000_000_000_000u64.into(),
            &[],
        ),
        "needs about",
    );
    clear_error(
        &train(
            "big-model",
            &|c| c["model"] = serde_json::json!({"n_layers": 4096, "d_model": 65536, "n_heads": 8}),
            &[],
        ),
        "needs about",
    );
    clear_error(
        &train(
            "overflow",
            &|c| {
                c["model"] =
                    serde_json::json!({"n_layers": 2, "d_model": 4294967296u64, "n_heads": 2})
            },
            &[],
        ),
        "more parameters",
    );
    clear_error(
        &train("zero-batch", &|c| c["batch_size"] = 0.into(), &[]),
        "batch_size",
    );
    clear_error(
        &train("neg-len", &|c| c["seq_len"] = (-8).into(), &[]),
        "seq_len",
    );
    usage_error(
        &train("neg-steps", &|_| {}, &["--max-steps", "-1"]),
        "--max-steps",
    );

    // distillation: a tiny teacher (5 steps), then bad requests
    let teacher = root.join("teacher");
    let o = train(
        "teacher",
        &|c| {
            c["total_steps"] = 5.into();
            c["warmup_steps"] = 1.into();
            c["eval_every"] = 0.into();
            c["checkpoint_every"] = 0.into();
        },
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = teacher;
    let teacher = root.join("teacher").join("final");
    let rbase: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("configs/distill-tiny.json")).unwrap())
            .unwrap();
    let distill = |name: &str, edit: &dyn Fn(&mut serde_json::Value), extra: &[&str]| {
        let mut c = rbase.clone();
        edit(&mut c);
        let p = root.join(format!("{name}.json"));
        std::fs::write(&p, c.to_string()).unwrap();
        let out = root.join(name);
        let mut a = vec![
            "distill",
            "--teacher",
            s(&teacher),
            "--data",
            s(&shards),
            "--tokenizer",
            s(&tok),
            "--recipe",
            s(&p),
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        kfrun(&a)
    };
    clear_error(
        &distill("k8", &|_| {}, &["--k", "8"]),
        "no stage with k = 8",
    );
    clear_error(&distill("k0", &|_| {}, &["--k", "0"]), "--k must be");
    usage_error(&distill("kneg", &|_| {}, &["--k", "-4"]), "--k");
    clear_error(
        &distill(
            "d-big",
            &|c| c["batch_size"] = 1_000_000_000_000u64.into(),
            &["--k", "1"],
        ),
        "needs about",
    );
    clear_error(
        &distill("d-ctx", &|c| c["ctx_len"] = u64::MAX.into(), &["--k", "1"]),
        "ctx_len",
    );
    std::fs::remove_dir_all(&root).unwrap();
}
