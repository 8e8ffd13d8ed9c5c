//! `kfrun bench train`: training throughput (tokens/s) of our DDiT teacher step next to
//! the same model in JAX (jit, CPU) on the same thread count.
//!
//! Ours: the model of the training config (`Ddit::init` from its seed, vocabulary from
//! `--vocab`, default the preset's) and `kf_model::train::Trainer` with the config's
//! optimiser: one update = `grad_accum` micro-batches of `batch_size` x `seq_len` random
//! tokens (Philox, made before the clock starts), each forward + cross-entropy + backward
//! on the tape, then the averaged gradient clipped and AdamW applied — what `kfrun train`
//! times per step, minus the data loader. The first update and `--warmup` more are not
//! timed; the median of `--steps` timed updates is reported.
//!
//! JAX: `bench/jax_ddit_train.py` (the same DDiT written from KFORCING.md, one jitted
//! step: lax.scan over the micro-batches of value_and_grad, global-norm clipping, optax
//! AdamW with the same schedule and hyper-parameters, parameters donated), run once as a
//! child process pinned to the same number of CPUs, with the same batch, sequence length,
//! accumulation, vocabulary, warm-up and step counts. Its compile step is not timed. The
//! script also checks its forward against the project's float64 numpy reference
//! (`tools/reference/ddit_numpy.py`, which our model is parity-tested against) and
//! reports the relative error, so both sides are known to compute the same function.
//!
//! `--breakdown` also times every op of the model alone at the config's shapes (forward,
//! and backward for a constant output gradient) on both sides, our optimiser tail, and
//! the phases of an update (forward + loss vs the rest), to show where the time goes.
//!
//! The table shows both tokens/s, the ratio (ours / JAX) and the target (>= 1.0x for the
//! `small` preset; other configs are reported without a target). This is a benchmark,
//! not a test: a MISS is reported, never turned into an error. Without python3, jax or
//! optax (`pip install -r tools/bench/requirements.txt`) our numbers are still printed.

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use kf_engine::rng::Philox;
use kf_engine::{DType, Device, Tensor};
use kf_model::train::{Extras, TrainConfig, Trainer};
use kf_model::{Ddit, DditConfig};
use kf_ops::attention::{attention, rope_attention};
use kf_ops::cross_entropy::cross_entropy;
use kf_ops::elementwise::add;
use kf_ops::embedding::embedding;
use kf_ops::gelu::gelu_tanh;
use kf_ops::layernorm::layer_norm;
use kf_ops::matmul::linear;
use kf_ops::reduce::sum;
use kf_ops::rope::rope;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/jax_ddit_train.py");
const REQUIREMENTS: &str = "tools/bench/requirements.txt";
/// Philox stream offset of the benchmark's token batches (apart from the init's streams).
const TOKEN_STREAM: u64 = 1 << 40;

#[derive(Args)]
pub struct TrainBenchArgs {
    /// Training config JSON (configs/small.json, paper.json, ...): model, batch_size,
    /// seq_len, grad_accum and the optimiser's hyper-parameters.
    #[arg(long, default_value = "configs/small.json")]
    config: PathBuf,
    /// Vocabulary size [default: the model preset's: small 8192, paper 30522].
    #[arg(long)]
    vocab: Option<usize>,
    /// Timed updates per side (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed updates after the first one (the first is always untimed: JAX compiles).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Override the config's batch_size (sequences per micro-batch), both sides.
    #[arg(long)]
    batch: Option<usize>,
    /// Override the config's seq_len, both sides.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Override the config's grad_accum (micro-batches per update), both sides.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Python interpreter with jax and optax.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only our side (no JAX child process).
    #[arg(long)]
    no_jax: bool,
    /// Also time each op of the model (forward and backward, at this config's shapes) and
    /// the optimiser on both sides: where an update's time goes.
    #[arg(long)]
    breakdown: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Our measurement.
struct Ours {
    step_s: f64,
    /// Median over the timed updates of the time spent in the loss closures (forward +
    /// cross-entropy of every micro-batch); the rest is backward, accumulation and AdamW.
    fwd_s: f64,
    steps_s: Vec<f64>,
    cpu_util: Option<f64>,
    foreign_cpus: Option<f64>,
    loss_first: f64,
    loss_last: f64,
}

/// Busy jiffies of the whole machine, of this process and of its waited-for children
/// (Linux only).
fn cpu_jiffies() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = me.rsplit(')').next()?.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    let mine = num(11)? + num(12)?;
    let children = num(13)? + num(14)?;
    Some((busy, mine, children))
}

/// `(own CPUs busy on average, other processes' CPUs busy on average)` between two
/// samples `wall_s` apart (100 jiffies per second).
fn loads(
    a: Option<(u64, u64, u64)>,
    b: Option<(u64, u64, u64)>,
    wall_s: f64,
    children: bool,
) -> (Option<f64>, Option<f64>) {
    match (a, b) {
        (Some((b0, m0, c0)), Some((b1, m1, c1))) => {
            let j = wall_s.max(1e-3) * 100.0;
            let own = (m1 - m0) + if children { c1 - c0 } else { 0 };
            (
                Some(own as f64 / j),
                Some((b1 - b0).saturating_sub(own) as f64 / j),
            )
        }
        _ => (None, None),
    }
}

/// `rows` windows of `t + 1` random ids in `0..v` (Philox stream `stream`).
fn random_windows(seed: u64, stream: u64, rows: usize, t: usize, v: usize) -> Vec<u32> {
    let ph = Philox::new(seed, TOKEN_STREAM + stream);
    let n = rows * (t + 1);
    let mut out = Vec::with_capacity(n);
    let mut c = 0u64;
    while out.len() < n {
        for w in ph.block(c) {
            if out.len() < n {
                out.push(w % v as u32);
            }
        }
        c += 1;
    }
    out
}

/// (inputs, targets) of `windows` ([rows, t + 1] row-major).
fn split_windows(windows: &[u32], t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut ids = Vec::with_capacity(windows.len());
    let mut tg = Vec::with_capacity(windows.len());
    for w in windows.chunks_exact(t + 1) {
        ids.extend_from_slice(&w[..t]);
        tg.extend_from_slice(&w[1..]);
    }
    (ids, tg)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Times our training step.
fn bench_ours(cfg: &TrainConfig, mcfg: &DditConfig, steps: usize, warmup: usize) -> Result<Ours> {
    let (b, t, accum, v) = (cfg.batch_size, cfg.seq_len, cfg.grad_accum, mcfg.vocab_size);
    let mut model = Ddit::init(mcfg, cfg.seed)?;
    model.set_trainable(true);
    let mut trainer = Trainer::new(model.params(), cfg.optim())?;
    let total = 1 + warmup + steps;
    let (mut times, mut fwds, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s0, mut w0) = (None, Instant::now());
    for s in 0..total {
        if s == 1 + warmup {
            s0 = cpu_jiffies();
            w0 = Instant::now();
        }
        // this update's micro-batches, made before the clock starts
        let micro: Vec<(Vec<u32>, Vec<u32>)> = (0..accum)
            .map(|j| {
                let w = random_windows(cfg.seed, (s * accum + j) as u64, b, t, v);
                split_windows(&w, t)
            })
            .collect();
        let mut fwd = 0.0;
        let clock = Instant::now();
        let stats = trainer.train_step(|_, j| -> Result<(Tensor, Extras)> {
            let c = Instant::now();
            let (ids, tg) = &micro[j];
            let ids = Tensor::from_vec(ids.clone(), &[b, t], Device::Cpu)?;
            let tg = Tensor::from_vec(tg.clone(), &[b * t], Device::Cpu)?;
            let logits = model.forward_train(&ids)?;
            let flat = logits.reshape(&[b * t, v])?;
            let loss = cross_entropy(&flat, &tg, None)?.0;
            fwd += c.elapsed().as_secs_f64();
            Ok((loss, Vec::new()))
        })?;
        let dt = clock.elapsed().as_secs_f64();
        if s > warmup {
            times.push(dt);
            fwds.push(fwd);
        }
        losses.push(stats.loss);
        eprintln!(
            "  ours: update {}/{total} {:.0} ms, loss {:.4}{}",
            s + 1,
            dt * 1e3,
            stats.loss,
            if s > warmup { "" } else { " (untimed)" }
        );
    }
    let (cpu_util, foreign_cpus) = loads(s0, cpu_jiffies(), w0.elapsed().as_secs_f64(), false);
    Ok(Ours {
        step_s: median(&times),
        fwd_s: median(&fwds),
        steps_s: times,
        cpu_util,
        foreign_cpus,
        loss_first: losses[0],
        loss_last: *losses.last().unwrap(),
    })
}

/// Runs the JAX script; Ok(Err(reason)) when python3, jax or optax is missing or it fails.
#[allow(clippy::too_many_arguments)]
fn bench_jax(
    python: &str,
    config: &Path,
    cfg: &TrainConfig,
    vocab: usize,
    threads: usize,
    steps: usize,
    warmup: usize,
    breakdown: bool,
) -> Result<std::result::Result<(serde_json::Value, Option<f64>), String>> {
    let t = threads.to_string();
    let before = cpu_jiffies();
    let clock = Instant::now();
    let mut cmd = Command::new(python);
    if breakdown {
        cmd.arg(SCRIPT).arg("--breakdown");
    } else {
        cmd.arg(SCRIPT);
    }
    let out = cmd
        .arg("--config")
        .arg(config)
        .args([
            "--vocab",
            &vocab.to_string(),
            "--threads",
            &t,
            "--steps",
            &steps.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--batch",
            &cfg.batch_size.to_string(),
            "--seq-len",
            &cfg.seq_len.to_string(),
            "--grad-accum",
            &cfg.grad_accum.to_string(),
            "--seed",
            &cfg.seed.to_string(),
        ])
        .env("OMP_NUM_THREADS", &t)
        .env("OPENBLAS_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .env("TF_CPP_MIN_LOG_LEVEL", "2")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return Ok(Err(format!("cannot run {python} ({e})"))),
    };
    let (_, foreign) = loads(before, cpu_jiffies(), clock.elapsed().as_secs_f64(), true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<serde_json::Value> = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok());
    Ok(match parsed {
        Some(v) if v.get("error").is_some() => Err(format!(
            "{} (python3 -m pip install -r {REQUIREMENTS})",
            v["error"].as_str().unwrap_or("jax unavailable")
        )),
        Some(v) if out.status.success() && v["tokens_per_s"].is_number() => Ok((v, foreign)),
        _ => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.trim().lines().rev().take(5).collect();
            Err(format!(
                "{SCRIPT} failed ({}): {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    })
}

/// `kfrun bench train`.
pub fn run(threads: usize, a: &TrainBenchArgs) -> Result<()> {
    let (cfg, vocab, mcfg) = resolve(threads, a)?;
    let preset = cfg.model.preset.clone();
    let tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum;
    let name = a
        .config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = (preset.as_deref() == Some("small")).then_some(1.0);

    let ours = bench_ours(&cfg, &mcfg, a.steps, a.warmup)?;
    let ours_tps = tokens_per_step as f64 / ours.step_s;
    let ours_ops = if a.breakdown {
        Some(breakdown_ours(&cfg, &mcfg, 5)?)
    } else {
        None
    };

    let jax = if a.no_jax {
        Err("--no-jax".to_string())
    } else {
        // the script reads the same config file; the overrides go as flags
        bench_jax(
            &a.python,
            &a.config,
            &cfg,
            vocab,
            threads,
            a.steps,
            a.warmup,
            a.breakdown,
        )?
    };
    let (jax_v, jax_foreign) = match &jax {
        Ok((v, f)) => (Some(v.clone()), *f),
        Err(why) => {
            println!("JAX baseline skipped: {why}; showing our numbers only");
            (None, None)
        }
    };
    let jax_tps = jax_v.as_ref().and_then(|v| v["tokens_per_s"].as_f64());
    let ratio = jax_tps.map(|j| ours_tps / j);
    let verdict = match (ratio, target) {
        (Some(r), Some(t)) if r >= t => "PASS",
        (Some(_), Some(_)) => "MISS",
        _ => "-",
    };
    if let Some(v) = &jax_v {
        println!(
            "baseline: jax {} / jaxlib {} / optax {} (XLA CPU, jit), compile {:.1} s, CPU use {:.2} CPUs, forward vs numpy reference: max rel err {}",
            v["jax"].as_str().unwrap_or("?"),
            v["jaxlib"].as_str().unwrap_or("?"),
            v["optax"].as_str().unwrap_or("?"),
            v["compile_s"].as_f64().unwrap_or(f64::NAN),
            v["cpu_util"].as_f64().unwrap_or(f64::NAN),
            v["parity_max_rel_err"]
                .as_f64()
                .map_or("n/a".into(), |x| format!("{x:.1e}")),
        );
    }
    println!(
        "{:<10} {:>12} {:>10} {:>12} {:>10} {:>7} {:>7}  result",
        "config", "ours tok/s", "ours ms", "JAX tok/s", "JAX ms", "ratio", "target"
    );
    println!(
        "{:<10} {:>12.1} {:>10.1} {:>12} {:>10} {:>7} {:>7}  {}",
        name,
        ours_tps,
        ours.step_s * 1e3,
        jax_tps.map_or("-".into(), |x| format!("{x:.1}")),
        jax_v
            .as_ref()
            .and_then(|v| v["step_ms"].as_f64())
            .map_or("-".into(), |x| format!("{x:.1}")),
        ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        target.map_or("-".into(), |t| format!("{t:.1}x")),
        verdict
    );
    println!(
        "losses (random tokens, ln V = {:.3}): ours {:.4} -> {:.4}{}",
        (vocab as f64).ln(),
        ours.loss_first,
        ours.loss_last,
        jax_v.as_ref().map_or(String::new(), |v| format!(
            ", JAX {:.4} -> {:.4}",
            v["loss_first"].as_f64().unwrap_or(f64::NAN),
            v["loss_last"].as_f64().unwrap_or(f64::NAN)
        ))
    );
    for (who, f) in [("ours", ours.foreign_cpus), ("JAX", jax_foreign)] {
        if let Some(f) = f {
            if f >= 0.1 {
                println!("note: other processes kept ~{f:.2} CPU(s) busy while {who} ran; numbers are noisy");
            }
        }
    }
    let breakdown_json = ours_ops
        .as_ref()
        .map(|(rows, opt_s)| print_breakdown(&ours, rows, *opt_s, jax_v.as_ref()));
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "breakdown": breakdown_json,
            "bench": "train",
            "config": a.config,
            "preset": preset,
            "model": {
                "n_layers": mcfg.n_layers, "d_model": mcfg.d_model, "n_heads": mcfg.n_heads,
                "vocab_size": vocab, "n_params": mcfg.n_params(),
            },
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "grad_accum": cfg.grad_accum,
            "tokens_per_step": tokens_per_step,
            "threads": threads,
            "steps": a.steps,
            "untimed_steps": 1 + a.warmup,
            "ours": {
                "tokens_per_s": ours_tps,
                "step_ms": ours.step_s * 1e3,
                "fwd_loss_ms": ours.fwd_s * 1e3,
                "steps_ms": ours.steps_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                "cpu_util": ours.cpu_util,
                "foreign_cpus": ours.foreign_cpus,
                "loss_first": ours.loss_first,
                "loss_last": ours.loss_last,
            },
            "jax": jax_v,
            "jax_foreign_cpus": jax_foreign,
            "jax_skipped": jax.as_ref().err(),
            "ratio": ratio,
            "target": target,
            "pass": match (ratio, target) { (Some(r), Some(t)) => Some(r >= t), _ => None },
        });
        kf_engine::fs::write_atomic(
            path,
            (serde_json::to_string_pretty(&doc)? + "\n").as_bytes(),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The training config with the command line's overrides, the vocabulary and the model
/// config; prints what is measured and refuses a run that would not fit in memory.
fn resolve(threads: usize, a: &TrainBenchArgs) -> Result<(TrainConfig, usize, DditConfig)> {
    ensure!(a.steps >= 1, "--steps must be at least 1");
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(x) = a.batch {
        cfg.batch_size = x;
    }
    if let Some(x) = a.seq_len {
        cfg.seq_len = x;
    }
    if let Some(x) = a.grad_accum {
        cfg.grad_accum = x;
    }
    cfg.validate().context("with the overrides")?;
    let preset = cfg.model.preset.clone();
    let vocab = match a.vocab {
        Some(v) => v,
        None => DditConfig::preset(preset.as_deref().unwrap_or("tiny"))?.vocab_size,
    };
    ensure!(vocab >= 2, "--vocab must be at least 2");
    let mcfg = cfg
        .model_config(vocab, (vocab - 1) as u32)
        .with_context(|| format!("training config {}", a.config.display()))?;
    let tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum;
    println!(
        "train benchmark: {} ({} layers, d {}, {} heads, V {}, {:.1}M params), {} x {} tokens x accum {} = {} tokens/update, {} thread(s), median of {} updates after {} untimed",
        a.config.display(),
        mcfg.n_layers,
        mcfg.d_model,
        mcfg.n_heads,
        vocab,
        mcfg.n_params() as f64 / 1e6,
        cfg.batch_size,
        cfg.seq_len,
        cfg.grad_accum,
        tokens_per_step,
        threads,
        a.steps,
        1 + a.warmup
    );
    if let Some(avail) = available_memory() {
        let need = kf_model::train::estimate_train_bytes(&mcfg, cfg.batch_size, cfg.seq_len);
        if need > avail {
            bail!(
                "this configuration needs about {:.1} GiB for our training step but {:.1} GiB are available: lower --batch (raise --grad-accum)",
                need as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok((cfg, vocab, mcfg))
}

/// One row of the per-op breakdown: median forward and backward seconds of one call at
/// the config's shapes, and calls per update.
struct OpRow {
    name: &'static str,
    calls: usize,
    fwd_s: f64,
    bwd_s: f64,
}

/// Median forward and backward (`backward_with` a constant seed) seconds of `f`.
fn time_op(reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, f64)> {
    let (mut fw, mut bw) = (Vec::new(), Vec::new());
    for r in 0..=reps {
        let c = Instant::now();
        let y = f()?;
        let tf = c.elapsed().as_secs_f64();
        let seed = Tensor::full(y.shape(), 1e-3, DType::F32, Device::Cpu)?;
        let c = Instant::now();
        let g = y.backward_with(seed)?;
        let tb = c.elapsed().as_secs_f64();
        drop(g);
        if r > 0 {
            fw.push(tf);
            bw.push(tb);
        }
    }
    Ok((median(&fw), median(&bw)))
}

/// Times every op of the DDiT training forward in isolation (inputs are variables, so the
/// backward computes what it computes inside the model), and the optimiser tail of an
/// update (gradient accumulation, global-norm clipping, AdamW) through the real Trainer
/// with a loss whose gradients are trivial.
fn breakdown_ours(cfg: &TrainConfig, mcfg: &DditConfig, reps: usize) -> Result<(Vec<OpRow>, f64)> {
    let (b, t, v) = (cfg.batch_size, cfg.seq_len, mcfg.vocab_size);
    let (d, nh, hd, l) = (mcfg.d_model, mcfg.n_heads, mcfg.head_dim(), mcfg.n_layers);
    let a = cfg.grad_accum;
    let n = b * t;
    let mut st = 100u64;
    let mut var = |shape: &[usize]| -> Result<Tensor> {
        st += 1;
        Ok(Tensor::rand_normal(shape, DType::F32, 5, st, Device::Cpu)?.var())
    };
    let model = Ddit::init(mcfg, cfg.seed)?;
    let attn_p = model.attn_params(0, vec![]);
    let pos = kf_model::ddit::positions(t)?;
    let ids = Tensor::from_vec(random_windows(1, 0, b, t - 1, v), &[b, t], Device::Cpu)?;
    let tg = Tensor::from_vec(random_windows(1, 1, n, 0, v), &[n], Device::Cpu)?;
    let table = var(&[v, d])?;
    let x = var(&[b, t, d])?;
    let x2 = var(&[b, t, d])?;
    let lnw = var(&[d])?;
    let w_qkv = var(&[3 * d, d])?;
    let w_o = var(&[d, d])?;
    let w0 = var(&[4 * d, d])?;
    let b0 = var(&[4 * d])?;
    let m = var(&[b, t, 4 * d])?;
    let w2 = var(&[d, 4 * d])?;
    let b2 = var(&[d])?;
    let w_head = var(&[v, d])?;
    let b_head = var(&[v])?;
    let qkv = var(&[b, t, 3 * d])?;
    let q = var(&[b, t, nh, hd])?;
    let k = var(&[b, t, nh, hd])?;
    let logits = var(&[n, v])?;
    let part = |i: usize| -> Result<Tensor> {
        qkv.reshape(&[b, t, 3, nh, hd])?.narrow(2, i, 1)?.squeeze(2)
    };
    let eps = mcfg.ln_eps;
    let freqs = mcfg.rope();
    let mut rows = Vec::new();
    let mut row =
        |name: &'static str, calls: usize, f: &mut dyn FnMut() -> Result<Tensor>| -> Result<()> {
            let (fwd_s, bwd_s) = time_op(reps, f)?;
            eprintln!(
                "  ours op {name}: fwd {:.2} ms, bwd {:.2} ms, x{}",
                fwd_s * 1e3,
                bwd_s * 1e3,
                calls * a
            );
            rows.push(OpRow {
                name,
                calls: calls * a,
                fwd_s,
                bwd_s,
            });
            Ok(())
        };
    row("embedding", 1, &mut || embedding(&ids, &table))?;
    row("layer_norm", 2 * l + 1, &mut || {
        layer_norm(&x, &lnw, None, eps)
    })?;
    row("linear qkv", l, &mut || linear(&x, &w_qkv, None))?;
    // the model runs rope + attention as one op on the qkv view (rope_attention); the
    // separate rows stay for comparison with JAX's, the fused row is what an update pays
    row("rope (q or k)", 2 * l, &mut || {
        rope(&part(0)?, &pos, &freqs)
    })?;
    row("attention", l, &mut || {
        attention(&q, &k, &part(2)?, &attn_p)
    })?;
    let qkv5 = qkv.reshape(&[b, t, 3, nh, hd])?;
    row("rope+attention", l, &mut || {
        rope_attention(&qkv5, &pos, &freqs, &attn_p)
    })?;
    row("linear out", l, &mut || linear(&x, &w_o, None))?;
    row("residual add", 2 * l, &mut || add(&x, &x2))?;
    row("linear mlp0+b", l, &mut || linear(&x, &w0, Some(&b0)))?;
    row("gelu_tanh", l, &mut || gelu_tanh(&m))?;
    row("linear mlp2+b", l, &mut || linear(&m, &w2, Some(&b2)))?;
    row("linear head+b", 1, &mut || {
        linear(&x, &w_head, Some(&b_head))
    })?;
    row("cross_entropy", 1, &mut || {
        Ok(cross_entropy(&logits, &tg, None)?.0)
    })?;

    // the optimiser tail: loss = sum of every parameter (gradients are ones, the tape has
    // one reduction per parameter), through the real Trainer with the config's accumulation
    let mut pm = Ddit::init(mcfg, cfg.seed)?;
    pm.set_trainable(true);
    let mut trainer = Trainer::new(pm.params(), cfg.optim())?;
    let mut opt = Vec::new();
    for r in 0..=reps.min(3) {
        let c = Instant::now();
        trainer.train_step(|_, _| -> Result<(Tensor, Extras)> {
            let mut tot: Option<Tensor> = None;
            for (_, p) in pm.params() {
                let s = sum(p)?;
                tot = Some(match tot {
                    None => s,
                    Some(x) => add(&x, &s)?,
                });
            }
            Ok((tot.unwrap(), Vec::new()))
        })?;
        if r > 0 {
            opt.push(c.elapsed().as_secs_f64());
        }
    }
    Ok((rows, median(&opt)))
}

/// Prints the per-op and per-phase table of `--breakdown` and returns it as JSON.
fn print_breakdown(
    ours: &Ours,
    rows: &[OpRow],
    opt_s: f64,
    jax: Option<&serde_json::Value>,
) -> serde_json::Value {
    let jops = jax.and_then(|v| v["ops"].as_array());
    let find1 = |name: &str| -> Option<(f64, f64)> {
        let r = jops?.iter().find(|r| r["name"].as_str() == Some(name))?;
        Some((r["fwd_ms"].as_f64()?, r["fwd_bwd_ms"].as_f64()?))
    };
    // JAX has no fused row: rope + attention = 2 ropes + 1 attention per call
    let find = |name: &str| -> Option<(f64, f64)> {
        if name == "rope+attention" {
            let (r, a) = (find1("rope (q or k)")?, find1("attention")?);
            return Some((2.0 * r.0 + a.0, 2.0 * r.1 + a.1));
        }
        find1(name)
    };
    println!(
        "\nbreakdown: each op alone at this config's shapes (median of 5), ms per call and per update; ratio = JAX / ours time (> 1: ours faster); the sum counts rope+attention (the model's fused op; JAX: 2 ropes + attention), not its two parts"
    );
    println!(
        "{:<15} {:>6} {:>9} {:>9} {:>11} {:>9} {:>11} {:>11} {:>7}",
        "op", "calls", "ours fwd", "ours bwd", "ours/upd", "JAX fwd", "JAX f+b", "JAX/upd", "ratio"
    );
    let (mut sum_o, mut sum_j) = (0.0, 0.0);
    let mut out = Vec::new();
    for r in rows {
        let per = (r.fwd_s + r.bwd_s) * 1e3 * r.calls as f64;
        let j = find(r.name);
        let jper = j.map(|(_, fb)| fb * r.calls as f64);
        // the model runs the fused row; the separate ones are shown, not summed
        if !matches!(r.name, "rope (q or k)" | "attention") {
            sum_o += per;
            sum_j += jper.unwrap_or(0.0);
        }
        println!(
            "{:<15} {:>6} {:>9.2} {:>9.2} {:>11.1} {:>9} {:>11} {:>11} {:>7}",
            r.name,
            r.calls,
            r.fwd_s * 1e3,
            r.bwd_s * 1e3,
            per,
            j.map_or("-".into(), |x| format!("{:.2}", x.0)),
            j.map_or("-".into(), |x| format!("{:.2}", x.1)),
            jper.map_or("-".into(), |x| format!("{x:.1}")),
            jper.map_or("-".into(), |x| format!("{:.2}x", x / per)),
        );
        out.push(serde_json::json!({
            "name": r.name, "calls_per_update": r.calls,
            "ours_fwd_ms": r.fwd_s * 1e3, "ours_bwd_ms": r.bwd_s * 1e3, "ours_ms_per_update": per,
            "jax_fwd_ms": j.map(|x| x.0), "jax_fwd_bwd_ms": j.map(|x| x.1), "jax_ms_per_update": jper,
        }));
    }
    println!(
        "{:<15} {:>6} {:>9} {:>9} {:>11.1} {:>9} {:>11} {:>11.1} {:>7}",
        "sum of ops",
        "",
        "",
        "",
        sum_o,
        "",
        "",
        sum_j,
        if sum_j > 0.0 {
            format!("{:.2}x", sum_j / sum_o)
        } else {
            "-".into()
        }
    );
    let step = ours.step_s * 1e3;
    let fwd = ours.fwd_s * 1e3;
    println!(
        "ours, one update: {step:.1} ms = forward+loss {fwd:.1} ms + backward, accumulation, clipping and AdamW {:.1} ms; optimiser tail alone (Trainer on a sum-of-parameters loss) {:.1} ms; sum of isolated ops {sum_o:.1} ms ({:+.1} ms unattributed: tape, allocation, fusion-free glue)",
        step - fwd,
        opt_s * 1e3,
        step - sum_o - opt_s * 1e3
    );
    let ph = jax.map(|v| &v["phases"]);
    if let Some(ph) = ph {
        let a = ph["micro_batches"].as_f64().unwrap_or(1.0);
        let g = |k: &str| ph[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "JAX, one update: {:.1} ms; per micro-batch x {a}: forward+loss {:.1} ms, value_and_grad {:.1} ms; optax update {:.1} ms",
            jax.and_then(|v| v["step_ms"].as_f64()).unwrap_or(f64::NAN),
            g("fwd_loss_ms"),
            g("grad_ms"),
            g("optimizer_ms")
        );
    }
    serde_json::json!({
        "ops": out,
        "ours_sum_ops_ms": sum_o,
        "jax_sum_ops_ms": sum_j,
        "ours_fwd_loss_ms": fwd,
        "ours_optimizer_tail_ms": opt_s * 1e3,
        "jax_phases": ph,
    })
}

fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_deterministic_in_range_and_split() {
        let a = random_windows(3, 7, 4, 9, 50);
        assert_eq!(a, random_windows(3, 7, 4, 9, 50));
        assert_ne!(a, random_windows(3, 8, 4, 9, 50));
        assert_eq!(a.len(), 40);
        assert!(a.iter().all(|&x| x < 50));
        let (ids, tg) = split_windows(&a, 9);
        assert_eq!((ids.len(), tg.len()), (36, 36));
        assert_eq!(&ids[..9], &a[..9]);
        assert_eq!(&tg[..9], &a[1..10]);
        assert_eq!(&tg[9..18], &a[11..20]);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
    }
}
