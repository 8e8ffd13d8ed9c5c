//! `kfrun bench llama`: batch-1 AR decode and 512-token prefill of a pretrained Llama-family
//! model (GGUF file or Hugging Face directory), ours and llama.cpp's on the same file and
//! the same threads in one run (issue 21). Ours loads the file as `kfrun generate` does (a
//! GGUF's quantized blocks kept); llama.cpp is llama-cpp-python, pinned, through
//! tools/scripts/llama_cpp_speed.py in a child process. Medians of `--runs` after a warm-up.
//! A benchmark: a ratio below the target is reported, never turned into an error.

use crate::bench_gen::median;
use anyhow::{ensure, Context, Result};
use clap::Args as ClapArgs;
use kf_model::checkpoint;
use kf_model::ddit::Ddit;
use kf_model::generate::{generate, GenerateOptions};
use kf_model::weights::WeightStore;
use std::path::PathBuf;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llama_cpp_speed.py");

#[derive(ClapArgs)]
pub struct Args {
    /// The model: a .gguf file or a Hugging Face directory (config.json + model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Tokens decoded after the 8-token prompt.
    #[arg(long, default_value_t = 64)]
    new: usize,
    /// Timed runs per side (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python with llama-cpp-python 0.3.36 (the peer; tools/models/requirements.txt pins it).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Ours only.
    #[arg(long)]
    no_peer: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The prompt of tools/scripts/llama_cpp_speed.py, cut to the same 8 tokens.
const PROMPT: &str = "Once upon a time, in a small village";

pub fn run(threads: usize, a: &Args) -> Result<()> {
    ensure!(
        a.new >= 2,
        "--new must be at least 2 (one prefill token, then decode steps)"
    );
    ensure!(a.runs >= 1, "--runs must be at least 1");
    let cfg = checkpoint::read_config(&a.model)?;
    let tok = checkpoint::read_tokenizer(&a.model, &cfg)?;
    let model = Ddit::load_with(&a.model, WeightStore::Exact)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let ids = tok.encode(PROMPT)?;
    ensure!(
        ids.len() >= 8,
        "the prompt encodes to {} tokens, fewer than 8",
        ids.len()
    );
    let prompt: Vec<u32> = ids[..8].to_vec();
    let long: Vec<u32> = prompt.iter().cycle().take(512).copied().collect();
    ensure!(
        cfg.max_seq_len > 512 && cfg.max_seq_len >= 8 + a.new,
        "{}: max_seq_len {} is below the 513 positions of the prefill test (or 8 + --new)",
        a.model.display(),
        cfg.max_seq_len
    );
    let opts = |max_new: usize| GenerateOptions {
        max_new,
        tau: 0.0,
        seed: 0,
        first_stream: 0,
        eos: None,
        use_cache: true,
        vocab_limit: None,
    };
    eprintln!(
        "ours: {} ({} layers, d {}, {} of its matrices kept quantized), {threads} threads",
        a.model.display(),
        cfg.n_layers,
        cfg.d_model,
        model.n_quantized()
    );
    let (mut dec, mut pre) = (Vec::new(), Vec::new());
    for r in 0..=a.runs {
        let g = generate(
            &model,
            std::slice::from_ref(&prompt),
            &opts(a.new),
            |_, _| Ok(()),
        )?;
        // tokens after the first (which the prefill pass yields) over the decode steps' time
        let d = (g.n_tokens() - 1) as f64 / g.decode_secs.max(1e-9);
        let p = generate(&model, std::slice::from_ref(&long), &opts(1), |_, _| Ok(()))?;
        let pf = long.len() as f64 / p.prefill_secs.max(1e-9);
        if r > 0 {
            dec.push(d);
            pre.push(pf);
        }
    }
    let ours = (median(&mut dec), median(&mut pre));
    let peer = if a.no_peer {
        Err("--no-peer".to_string())
    } else {
        llama_cpp(&a.python, &a.model, threads, a.new, a.runs)
    };
    println!(
        "                decode tok/s (batch 1, {} new)   prefill tok/s (512)",
        a.new
    );
    println!(
        "ours            {:>12.1}                   {:>10.1}",
        ours.0, ours.1
    );
    match &peer {
        Ok((d, p)) => {
            println!("llama.cpp       {d:>12.1}                   {p:>10.1}");
            let rd = ours.0 / d;
            println!(
                "ours / llama.cpp {rd:>11.2}x (target 0.8x: {})   {:>9.2}x",
                if rd >= 0.8 { "met" } else { "MISSED" },
                ours.1 / p
            );
        }
        Err(e) => println!("llama.cpp: not run ({e})"),
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "model": a.model,
            "threads": threads,
            "new": a.new,
            "runs": a.runs,
            "ours": {"decode_tok_s": ours.0, "prefill_tok_s": ours.1, "decode_all": dec, "prefill_all": pre},
            "llama_cpp": peer.as_ref().ok().map(|(d, p)| serde_json::json!({"decode_tok_s": d, "prefill_tok_s": p})),
            "llama_cpp_error": peer.as_ref().err(),
        });
        kf_engine::fs::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}

/// llama.cpp's (decode, prefill) tokens/s, or why it did not run.
fn llama_cpp(
    python: &str,
    model: &std::path::Path,
    threads: usize,
    new: usize,
    runs: usize,
) -> std::result::Result<(f64, f64), String> {
    if !model.is_file() {
        return Err("llama.cpp reads GGUF files only".into());
    }
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(["--new", &new.to_string(), "--runs", &runs.to_string()])
        .output()
        .map_err(|e| format!("cannot run {python} ({e})"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Option<serde_json::Value> = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok());
    match v {
        Some(v) if out.status.success() => {
            match (v["decode_tok_s"].as_f64(), v["prefill_tok_s"].as_f64()) {
                (Some(d), Some(p)) => Ok((d, p)),
                _ => Err(format!("{SCRIPT} printed no speeds: {v}")),
            }
        }
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.trim().lines().rev().take(3).collect();
            Err(format!(
                "{SCRIPT} failed ({}): {} (python -m pip install llama-cpp-python==0.3.36)",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    }
}
