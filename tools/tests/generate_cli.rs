//! `kfrun generate` end to end on a tiny random model: streaming (batch 1), batches,
//! the cache against `--no-cache`, and one clear error for each bad input.

use kf_engine::DType;
use kf_model::tokenizer::{BpeTrainOptions, Tokenizer};
use kf_model::{Ddit, DditConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kfrun(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kfrun"))
        .args(args)
        .output()
        .expect("kfrun runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kfrun-gen-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny model directory with a 300-token BPE (EOS = id 0).
fn model_dir(name: &str) -> PathBuf {
    let dir = tmp(name);
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
    Ddit::init(&cfg, 1).unwrap().save(&dir, DType::F32).unwrap();
    tok.save(dir.join("tokenizer.json")).unwrap();
    dir
}

fn ok(o: &Output) -> (String, String) {
    let (so, se) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "kfrun failed:\n{se}");
    (so, se)
}

fn one_clear_error(o: &Output, needle: &str) {
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got success");
    assert!(se.contains(needle), "stderr lacks {needle:?}:\n{se}");
    assert!(!se.contains("panicked"), "panic instead of an error:\n{se}");
}

fn gen(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--model", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    kfrun(&args)
}

#[test]
fn generates_streams_and_batches() {
    let dir = model_dir("ok");
    let (one, err) = ok(&gen(
        &dir,
        &["--prompt", "the cat", "--max-new", "12", "--seed", "3"],
    ));
    assert!(one.starts_with("the cat"), "{one}");
    assert!(err.contains("tokens/s"), "{err}");
    let (plain, _) = ok(&gen(
        &dir,
        &[
            "--prompt",
            "the cat",
            "--max-new",
            "12",
            "--seed",
            "3",
            "--no-cache",
        ],
    ));
    assert_eq!(one, plain, "cached and uncached generation differ");
    // three sequences of two prompts in one batch: [0] and [2] share the prompt, not the noise
    let (many, _) = ok(&gen(
        &dir,
        &[
            "--prompt",
            "the cat",
            "--prompt",
            "a dog sat",
            "--batch",
            "3",
            "--max-new",
            "12",
            "--seed",
            "3",
        ],
    ));
    let mut lines: Vec<&str> = many.lines().filter(|l| l.starts_with('[')).collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{many}");
    // sequence 0 is the same text as the batch-1 run (same noise stream 0)
    assert_eq!(lines[0], format!("[0] {}", one.trim_end_matches('\n')));
    assert!(lines[1].starts_with("[1] a dog sat"));
    // batch 1 over the same three sequences prints the same texts
    let (seq, _) = ok(&gen(
        &dir,
        &[
            "--prompt",
            "the cat",
            "--prompt",
            "a dog sat",
            "--prompt",
            "the cat",
            "--batch",
            "1",
            "--max-new",
            "12",
            "--seed",
            "3",
        ],
    ));
    let texts: Vec<String> = lines.iter().map(|l| l[4..].to_string()).collect();
    let seq_lines: Vec<&str> = seq.lines().collect();
    assert_eq!(
        seq_lines,
        texts.iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_give_one_clear_error_each() {
    let dir = model_dir("bad");
    let p = ["--prompt", "the cat"];
    one_clear_error(&gen(Path::new("/nonexistent/model"), &p), "does not exist");
    one_clear_error(&gen(&dir, &["--prompt", ""]), "empty after tokenisation");
    one_clear_error(
        &gen(&dir, &["--prompt", "x", "--max-new", "0"]),
        "--max-new must be",
    );
    one_clear_error(
        &gen(&dir, &["--prompt", "x", "--batch", "0"]),
        "--batch must be",
    );
    one_clear_error(
        &gen(&dir, &["--prompt", "x", "--max-new", "48"]),
        "max_seq_len is 48",
    );
    one_clear_error(
        &gen(
            &dir,
            &["--prompt", "the cat sat on the mat", "--max-new", "45"],
        ),
        "max_seq_len 48",
    );
    one_clear_error(&gen(&dir, &["--prompt", "x", "--tau=-1"]), "--tau");
    one_clear_error(
        &gen(&dir, &["--prompt", "x", "--device", "tpu"]),
        "unknown device",
    );
    // malformed tokenizer.json, then a missing one
    let tj = dir.join("tokenizer.json");
    let good_tok = std::fs::read(&tj).unwrap();
    std::fs::write(&tj, "{ not json").unwrap();
    one_clear_error(&gen(&dir, &p), "invalid tokenizer file");
    std::fs::remove_file(&tj).unwrap();
    one_clear_error(&gen(&dir, &p), "has no tokenizer.json");
    std::fs::write(&tj, good_tok).unwrap();
    // malformed config.json
    let cj = dir.join("config.json");
    let good_cfg = std::fs::read(&cj).unwrap();
    std::fs::write(&cj, "{\"n_layers\": 2").unwrap();
    one_clear_error(&gen(&dir, &p), "malformed model config");
    std::fs::write(
        &cj,
        String::from_utf8(good_cfg.clone())
            .unwrap()
            .replace("\"vocab_size\": 300", "\"vocab_size\": 200"),
    )
    .unwrap();
    one_clear_error(&gen(&dir, &p), "does not match");
    std::fs::write(&cj, good_cfg).unwrap();
    // truncated weights
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..100]).unwrap();
    one_clear_error(&gen(&dir, &p), "model.safetensors");
    std::fs::remove_dir_all(&dir).unwrap();
}
