//! `kfrun bench` (generation): generated tokens per second of AR decoding and of the PFLM
//! student at K = 1..k, across batch sizes, next to what a roofline model of this machine
//! predicts (issue 5).
//!
//! Each configuration (mode, K, batch B): B random prompts of `--prompt-len` tokens, exactly
//! `--max-new` tokens each (no EOS), one warm-up run, then `--runs` timed runs (prefill
//! included); tokens/s = B * max_new / median seconds. Peak memory is the process's resident
//! high-water mark during the configuration (reset through /proc/self/clear_refs).
//!
//! Roofline: this machine's copy bandwidth (STREAM-style: bytes read + written per second)
//! and f32 GEMM GFLOP/s are measured first. A decode step costs
//! `max(bytes / BW, flops / F)` where bytes = the weights (f32) + the KV cache read, and
//! flops = 2 * (non-embedding parameters) * rows + attention (4 * layers * rows * context * d).
//! AR: 1 row per sequence per token; PFLM: 2K rows per sequence (K committed + K hints) per K
//! tokens. Predicted speedup = AR time per token / (PFLM step time / K).
//!
//! `--peer torch`: the same AR decode and PFLM K-token step in PyTorch eager
//! (tools/bench/torch_ddit_generate.py, written from KFORCING.md; `pip install -r
//! tools/bench/requirements.txt`), run after ours as a child process with the same thread count,
//! architecture, batch sizes, prompt length, generation length and timing (random prompts of
//! the same length: no EOS, so token values do not change the work); both columns and the
//! ratio are printed. Without python3 or torch, ours are still printed with the reason.

use crate::weights_arg::ServeAs;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::{DType, Device, Tensor};
use kf_model::checkpoint;
use kf_model::generate::{generate, GenerateOptions};
use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
use kf_model::weights::WeightStore;
use kf_model::{Ddit, DditConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// A PFLM student's model directory (AR runs use its backbone: same architecture).
    #[arg(long, conflicts_with = "arch")]
    model: Option<PathBuf>,
    /// Random weights of a preset architecture instead of --model: paper (12 layers,
    /// d 768, 12 heads, V 30522), small or tiny. Throughput does not depend on weight values.
    #[arg(long)]
    arch: Option<String>,
    /// The student's k for --arch.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batches: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 6)]
    prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    /// Timed runs per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Write the rows (and the roofline inputs) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the speedup-vs-batch plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Device: cpu (the CPU ops), cuda / cuda:N (the CUDA kernels on a GPU; a build with the
    /// cuda feature), or emu (the same kernels on the CPU emulator: slow, a check only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also run the same steps in PyTorch eager on the same threads (CPU only) and print the
    /// ratio.
    #[arg(long, value_parser = ["torch"])]
    peer: Option<String>,
    /// Python interpreter with torch, for --peer.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Serve the weight matrices and the embedding table as f32, f16 or bf16 (rounded;
    /// activations and sums stay f32), or the matrices as ggml blocks q8_0, q4_0 or q4_1
    /// (rounded; integer kernels, CPU only). Default: the model file's precision for
    /// --model, f32 for --arch.
    #[arg(long, value_parser = crate::weights_arg::VALUES)]
    dtype: Option<String>,
}

const TORCH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/torch_ddit_generate.py");

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// "ar" or "pflm".
    pub mode: String,
    pub k: usize,
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Median seconds of one run (B sequences x max_new tokens, prefill included).
    pub median_s: f64,
    pub runs_s: Vec<f64>,
    /// Forward passes per generated token of one sequence (prefill included).
    pub passes_per_token: f64,
    pub peak_rss_mb: Option<f64>,
    /// PFLM tokens/s over AR tokens/s at the same batch.
    pub speedup: Option<f64>,
    /// The roofline model's speedup at this batch.
    pub predicted_speedup: Option<f64>,
}

/// The machine's measured limits.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub copy_gb_s: f64,
    pub gemm_gflop_s: f64,
    pub threads: usize,
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Resets the resident-set high-water mark (Linux); false where unsupported.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM in MB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// STREAM-style copy bandwidth (GB/s, read + write) over 256 MiB, all threads.
pub(crate) fn copy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20; // f32 elements
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = 1 << 16;
    let mut t = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        t.push(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / median(&mut t) / 1e9
}

/// f32 GEMM GFLOP/s of our matmul on a Transformer-sized product (512 x 768 x 3072).
fn gemm_rate() -> Result<f64> {
    let (m, k, n) = (512, 768, 3072);
    let a = Tensor::rand_uniform(&[m, k], DType::F32, 1, 0, Device::Cpu)?;
    let b = Tensor::rand_uniform(&[k, n], DType::F32, 1, 1, Device::Cpu)?;
    let mut t = Vec::new();
    for _ in 0..7 {
        let t0 = Instant::now();
        std::hint::black_box(kf_ops::matmul::matmul(&a, &b)?);
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / median(&mut t) / 1e9)
}

/// Roofline time (s) of one decode step: `rows` query rows in total over `batch` sequences
/// whose context averages `ctx` positions.
fn step_time(
    cfg: &DditConfig,
    m: &Machine,
    weights: f64,
    batch: usize,
    rows: usize,
    ctx: f64,
) -> f64 {
    let (d, v, l) = (
        cfg.d_model as f64,
        cfg.vocab_size as f64,
        cfg.n_layers as f64,
    );
    let params = cfg.n_params() as f64;
    let kv = 2.0 * l * batch as f64 * ctx * d * 4.0;
    let compute_params = params - v * d; // the embedding table is gathered, not multiplied
    let flops = 2.0 * compute_params * rows as f64 + 4.0 * l * rows as f64 * ctx * d;
    ((weights + kv) / (m.copy_gb_s * 1e9)).max(flops / (m.gemm_gflop_s * 1e9))
}

/// Predicted PFLM-K over AR speedup at `batch` (`weights`: bytes of the parameters as stored).
fn predicted(cfg: &DditConfig, m: &Machine, weights: f64, batch: usize, k: usize, ctx: f64) -> f64 {
    let ar = step_time(cfg, m, weights, batch, batch, ctx);
    let pf = step_time(cfg, m, weights, batch, batch * 2 * k, ctx) / k as f64;
    ar / pf
}

fn random_prompts(b: usize, len: usize, v: usize, seed: u64) -> Vec<Vec<u32>> {
    let rng = kf_engine::rng::Philox::new(seed, 0x5052_4D54);
    (0..b)
        .map(|i| {
            (0..len)
                .map(|j| {
                    let u = rng.uniform_f64((i * len + j) as u64);
                    ((u * (v - 1) as f64) as u32).min(v as u32 - 2)
                })
                .collect()
        })
        .collect()
}

/// The shape of one timed generation: prompt and generated tokens per sequence, timed runs.
#[derive(Clone, Copy)]
pub struct GenShape {
    pub prompt_len: usize,
    pub max_new: usize,
    pub runs: usize,
}

/// Times one configuration (`kfrun bench`'s method; `k == 0` means AR): the run seconds,
/// the passes of one run, and the peak RSS.
pub fn measure(
    ar: &Ddit,
    pf: &Pflm,
    k: usize,
    batch: usize,
    a: GenShape,
) -> Result<(Vec<f64>, usize, Option<f64>)> {
    let prompts = random_prompts(batch, a.prompt_len, ar.cfg.vocab_size, batch as u64);
    let base = GenerateOptions {
        max_new: a.max_new,
        tau: 1.0,
        seed: 0,
        first_stream: 0,
        eos: None,
        use_cache: true,
        vocab_limit: None,
    };
    let run = || -> Result<(f64, usize)> {
        let t0 = Instant::now();
        let g = if k == 0 {
            generate(ar, &prompts, &base, |_, _| Ok(()))?
        } else {
            generate_pflm(
                pf,
                &prompts,
                &PflmGenerateOptions {
                    base: base.clone(),
                    k,
                    freq_penalty: 0.0,
                },
                |_, _| Ok(()),
            )?
        };
        Ok((t0.elapsed().as_secs_f64(), g.passes))
    };
    let tracked = reset_peak();
    let (_, passes) = run()?; // warm-up
    let mut times = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        times.push(run()?.0);
    }
    Ok((times, passes, if tracked { peak_rss_mb() } else { None }))
}

fn load(a: &Args) -> Result<(Ddit, Pflm, String)> {
    load_pair(
        a.model.as_ref(),
        a.arch.as_deref(),
        a.k,
        ServeAs::of(a.dtype.as_deref())?,
    )
}

/// The student of `--model`, or random weights of preset `--arch` with window `k`, cast to
/// `dtype`; the AR runs share its backbone.
pub fn load_pair(
    model: Option<&PathBuf>,
    arch: Option<&str>,
    k: usize,
    dtype: Option<ServeAs>,
) -> Result<(Ddit, Pflm, String)> {
    match (model, arch) {
        (Some(dir), _) => {
            let cfg = checkpoint::read_config(dir)?;
            ensure!(
                cfg.k.is_some(),
                "--model {} is an AR model: pass a PFLM student (its backbone serves the AR runs)",
                dir.display()
            );
            // the file's precision (16-bit tables stay 16-bit), or --dtype's
            let pf = Pflm::load_with(dir, WeightStore::Exact)?;
            let pf = match dtype {
                Some(d) => {
                    let pf = d.pflm(&pf)?;
                    kf_engine::storage::pool::clear();
                    pf
                }
                None => pf,
            };
            // the AR runs share the student's backbone (its tensors, not a second copy)
            Ok((pf.backbone.clone(), pf, format!("{}", dir.display())))
        }
        (None, Some(name)) => {
            let mut cfg = DditConfig::preset(name)?;
            cfg.mask_token_id = Some(cfg.vocab_size as u32 - 1);
            ensure!(k >= 1, "--k must be at least 1");
            let mut pf = Pflm::from_teacher(Ddit::init(&cfg, 0)?, k, 0)?;
            if let Some(d) = dtype {
                pf = d.pflm(&pf)?;
                // the f32 weights just dropped would sit in the buffer pool, counted in RSS
                kf_engine::storage::pool::clear();
            }
            // the AR runs share the student's backbone (same random weights)
            Ok((
                pf.backbone.clone(),
                pf,
                format!("--arch {name} (random weights)"),
            ))
        }
        (None, None) => bail!("pass --model DIR (a PFLM student) or --arch paper|small|tiny"),
    }
}

pub fn run(threads: usize, a: &Args) -> Result<()> {
    let device = crate::device_arg::select_device(&a.device)?;
    if let Some(d) = ServeAs::of(a.dtype.as_deref())? {
        d.check_device(device)?;
    }
    check_args(a)?;
    let (ar, pf, label) = load(a)?;
    let cfg = ar.cfg.clone();
    ensure!(
        a.prompt_len + a.max_new <= cfg.max_seq_len,
        "--prompt-len {} + --max-new {} exceeds max_seq_len {}",
        a.prompt_len,
        a.max_new,
        cfg.max_seq_len
    );
    eprintln!(
        "kfrun bench: {label}: {} layers, d {}, V {}, {:.1} M parameters, student k = {}; {threads} threads; prompts {} tokens, {} new tokens, {} runs (median)",
        cfg.n_layers,
        cfg.d_model,
        cfg.vocab_size,
        cfg.n_params() as f64 / 1e6,
        pf.k,
        a.prompt_len,
        a.max_new,
        a.runs
    );
    // on a kernel device the matrices keep the model file's precision (as kfrun generate)
    let (ar, pf) = if device.is_cpu() {
        (ar, pf)
    } else {
        let store = WeightStore::Exact;
        (
            ar.to_device_with(device, store)?,
            pf.to_device_with(device, store)?,
        )
    };
    let (machine, device_name) = probe_machine(device, threads)?;
    // the parameters as the decode reads them (tables at the served precision)
    // what a step reads whole: every parameter but the gathered embedding table
    let (weight_bytes, weight_desc) = {
        let wb = pf.weight_bytes();
        (wb.read_per_step() as f64, wb.describe())
    };
    let rows = measure_rows(a, &ar, &pf, &machine, weight_bytes)?;
    // batch-1 AR: achieved weight-read bandwidth
    let b1 = rows.iter().find(|r| r.mode == "ar" && r.batch == 1);
    // (the AR runs read the backbone only, not the noise encoder)
    let ar_bytes = ar.weight_bytes().read_per_step() as f64;
    let read_gb_s = b1.map(|r| ar_bytes * r.tokens_per_s / 1e9);
    print_table(&rows);
    let peer = match &a.peer {
        Some(_) => Some(torch_peer(a, &cfg, pf.k, threads)),
        None => None,
    };
    if let Some(p) = &peer {
        print_peer(&rows, p);
    }
    if let Some(g) = read_gb_s {
        println!(
            "batch-1 AR decode reads {:.0} MB a step (every parameter but the gathered embedding table; {weight_desc}) at {g:.1} GB/s = {:.0}% of the measured copy bandwidth ({:.1} GB/s)",
            ar_bytes / 1e6,
            100.0 * g / machine.copy_gb_s,
            machine.copy_gb_s
        );
    }
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "model": label,
            "device": device_name,
            "config": cfg,
            "k": pf.k,
            "prompt_len": a.prompt_len,
            "max_new": a.max_new,
            "runs": a.runs,
            "machine": machine,
            "weight_bytes": weight_bytes,
            "batch1_ar_weight_read_gb_s": read_gb_s,
            "rows": rows,
            "peer": peer.map(|p| p.unwrap_or_else(|e| serde_json::json!({ "error": e }))),
        });
        kf_engine::fs::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
        eprintln!("kfrun bench: wrote {}", p.display());
    }
    if let Some(p) = &a.plot {
        kf_engine::fs::write_atomic(p, speedup_svg(&rows, pf.k, &label).as_bytes())?;
        eprintln!("kfrun bench: wrote {}", p.display());
    }
    Ok(())
}

/// The flag checks that need no model.
fn check_args(a: &Args) -> Result<()> {
    ensure!(a.runs >= 1, "--runs must be at least 1");
    ensure!(a.max_new >= 1, "--max-new must be at least 1");
    ensure!(a.prompt_len >= 1, "--prompt-len must be at least 1");
    ensure!(
        !a.batches.is_empty() && a.batches.iter().all(|&b| b >= 1),
        "--batches must list sizes >= 1"
    );
    ensure!(
        a.peer.is_none() || a.device == "cpu",
        "--peer torch compares the CPU: drop --device {}",
        a.device
    );
    Ok(())
}

/// The roofline's machine (copy bandwidth, f32 GEMM rate) measured on `device`, and its name.
fn probe_machine(device: Device, threads: usize) -> Result<(Machine, String)> {
    let machine = if device.is_cpu() {
        Machine {
            copy_gb_s: copy_bandwidth(),
            gemm_gflop_s: gemm_rate()?,
            threads,
        }
    } else {
        // the emulator is slow: small probes there
        let (bytes, g) = if device == Device::Emu {
            (1 << 22, 256)
        } else {
            (1 << 30, 4096)
        };
        let (copy_gb_s, gemm_gflop_s) =
            crate::bench_kernels::device_probes(&*device.kernel()?, bytes, g)?;
        Machine {
            copy_gb_s,
            gemm_gflop_s,
            threads,
        }
    };
    let device_name = if device.is_cpu() {
        "the CPU".to_string()
    } else {
        device.kernel()?.name()
    };
    eprintln!(
        "{device_name}: copy {:.1} GB/s (read + write), f32 GEMM {:.0} GFLOP/s",
        machine.copy_gb_s, machine.gemm_gflop_s
    );
    Ok((machine, device_name))
}

/// One row per batch and K (0 = the AR teacher): the median over `a.runs`, the speedup over
/// the batch's AR row and the roofline's prediction; each printed as it is measured.
fn measure_rows(
    a: &Args,
    ar: &Ddit,
    pf: &Pflm,
    machine: &Machine,
    weight_bytes: f64,
) -> Result<Vec<Row>> {
    let cfg = &ar.cfg;
    let ctx = a.prompt_len as f64 + a.max_new as f64 / 2.0;
    let mut rows: Vec<Row> = Vec::new();
    for &b in &a.batches {
        let mut ar_tps = 0.0;
        for k in 0..=pf.k {
            let (mut times, passes, peak) = measure(
                ar,
                pf,
                k,
                b,
                GenShape {
                    prompt_len: a.prompt_len,
                    max_new: a.max_new,
                    runs: a.runs,
                },
            )
            .with_context(|| {
                format!(
                    "batch {b}, {}",
                    if k == 0 {
                        "AR".into()
                    } else {
                        format!("PFLM K = {k}")
                    }
                )
            })?;
            let med = median(&mut times);
            let tps = (b * a.max_new) as f64 / med;
            if k == 0 {
                ar_tps = tps;
            }
            let row = Row {
                mode: if k == 0 { "ar" } else { "pflm" }.into(),
                k: k.max(1),
                batch: b,
                tokens_per_s: tps,
                median_s: med,
                runs_s: times,
                passes_per_token: passes as f64 / a.max_new as f64,
                peak_rss_mb: peak,
                speedup: (k > 0).then(|| tps / ar_tps),
                predicted_speedup: (k > 0)
                    .then(|| predicted(cfg, machine, weight_bytes, b, k, ctx)),
            };
            eprintln!(
                "  batch {b:>3} {:>4} K={}: {:>9.1} tokens/s{}",
                row.mode,
                row.k,
                tps,
                match (row.speedup, row.predicted_speedup) {
                    (Some(s), Some(p)) => format!("  speedup {s:.2}x (roofline {p:.2}x)"),
                    _ => String::new(),
                }
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The results as a Markdown table on stdout.
fn print_table(rows: &[Row]) {
    println!("| batch | mode | K | tokens/s | speedup | roofline | passes/token | peak RSS MB |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let f = |x: Option<f64>, u: &str| x.map_or("—".into(), |v| format!("{v:.2}{u}"));
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.3} | {} |",
            r.batch,
            r.mode,
            r.k,
            r.tokens_per_s,
            f(r.speedup, "x"),
            f(r.predicted_speedup, "x"),
            r.passes_per_token,
            r.peak_rss_mb.map_or("—".into(), |m| format!("{m:.0}"))
        );
    }
}

/// Runs the PyTorch peer; its JSON (`rows`: batch, mode, k, tokens_per_s), or why it could not.
fn torch_peer(
    a: &Args,
    cfg: &DditConfig,
    k: usize,
    threads: usize,
) -> std::result::Result<serde_json::Value, String> {
    let t = threads.to_string();
    let batches: Vec<String> = a.batches.iter().map(|b| b.to_string()).collect();
    eprintln!("kfrun bench: the PyTorch peer ({TORCH_SCRIPT}) ...");
    let out = std::process::Command::new(&a.python)
        .arg(TORCH_SCRIPT)
        .args(["--vocab", &cfg.vocab_size.to_string()])
        .args(["--d", &cfg.d_model.to_string()])
        .args(["--layers", &cfg.n_layers.to_string()])
        .args(["--heads", &cfg.n_heads.to_string()])
        .args(["--k", &k.to_string()])
        .args(["--batches", &batches.join(",")])
        .args(["--prompt-len", &a.prompt_len.to_string()])
        .args(["--max-new", &a.max_new.to_string()])
        .args(["--runs", &a.runs.to_string()])
        .args(["--threads", &t])
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {} ({e})", a.python))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .ok_or_else(|| format!("the peer printed no JSON (exit {})", out.status))?;
    match v["error"].as_str() {
        Some(e) => Err(e.to_string()),
        None => Ok(v),
    }
}

/// Ours next to the peer's tokens/s, per (batch, mode, K).
fn print_peer(rows: &[Row], peer: &std::result::Result<serde_json::Value, String>) {
    let v = match peer {
        Ok(v) => v,
        Err(e) => {
            println!("peer: PyTorch not run: {e}");
            return;
        }
    };
    println!(
        "\nPyTorch {} eager, {} threads, same shapes and lengths:",
        v["torch"].as_str().unwrap_or("?"),
        v["threads"]
    );
    println!("| batch | mode | K | ours tokens/s | PyTorch tokens/s | ours / PyTorch |");
    println!("|---:|---|---:|---:|---:|---:|");
    let empty = vec![];
    let theirs = v["rows"].as_array().unwrap_or(&empty);
    for r in rows {
        let t = theirs
            .iter()
            .find(|x| {
                x["batch"].as_u64() == Some(r.batch as u64)
                    && x["mode"].as_str() == Some(r.mode.as_str())
                    && x["k"].as_u64() == Some(r.k as u64)
            })
            .and_then(|x| x["tokens_per_s"].as_f64());
        println!(
            "| {} | {} | {} | {:.1} | {} | {} |",
            r.batch,
            r.mode,
            r.k,
            r.tokens_per_s,
            t.map_or("—".into(), |t| format!("{t:.1}")),
            t.map_or("—".into(), |t| format!("{:.2}x", r.tokens_per_s / t))
        );
    }
}

/// Speedup over AR against batch size (log2 axis): measured (solid, dots) and roofline
/// (dashed) per K.
fn speedup_svg(rows: &[Row], kmax: usize, title: &str) -> String {
    let (w, h, l, r, t, bm) = (720.0, 420.0, 60.0, 120.0, 40.0, 50.0);
    let batches: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.batch).collect();
        v.sort();
        v.dedup();
        v
    };
    let ymax = rows
        .iter()
        .flat_map(|r| [r.speedup, r.predicted_speedup])
        .flatten()
        .fold(1.0f64, f64::max)
        .ceil()
        .max(1.0);
    let (x0, x1) = (
        (*batches.first().unwrap_or(&1) as f64).log2(),
        (*batches.last().unwrap_or(&1) as f64).log2(),
    );
    let xs = |b: usize| {
        let f = if x1 > x0 {
            ((b as f64).log2() - x0) / (x1 - x0)
        } else {
            0.5
        };
        l + f * (w - l - r)
    };
    let ys = |y: f64| t + (1.0 - y / ymax) * (h - t - bm);
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">PFLM speedup over AR vs batch: {}</text>\n",
        (w - r + l) / 2.0,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    for i in 0..=(ymax as usize) {
        let y = ys(i as f64);
        s.push_str(&format!(
            "<line x1=\"{l}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{i}x</text>\n",
            w - r,
            l - 6.0,
            y + 4.0
        ));
    }
    for &b in &batches {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{b}</text>\n",
            xs(b),
            h - bm + 18.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">batch size</text>\n",
        (w - r + l) / 2.0,
        h - 10.0
    ));
    for k in 1..=kmax {
        let c = colors[(k - 1) % colors.len()];
        let pts = |f: &dyn Fn(&Row) -> Option<f64>| -> String {
            rows.iter()
                .filter(|r| r.mode == "pflm" && r.k == k)
                .filter_map(|r| f(r).map(|y| format!("{:.1},{:.1}", xs(r.batch), ys(y))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let meas = pts(&|r: &Row| r.speedup);
        let pred = pts(&|r: &Row| r.predicted_speedup);
        s.push_str(&format!(
            "<polyline points=\"{meas}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>\n<polyline points=\"{pred}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" stroke-dasharray=\"5,4\"/>\n"
        ));
        for p in meas.split(' ').filter(|p| !p.is_empty()) {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            s.push_str(&format!(
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{c}\"/>\n"
            ));
        }
        let ly = t + 16.0 * k as f64;
        s.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">K = {k}</text>\n",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 34.0,
            ly + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\">dashed: roofline</text>\n</svg>\n",
        w - r + 10.0,
        t + 16.0 * (kmax + 1) as f64 + 4.0
    ));
    s
}
