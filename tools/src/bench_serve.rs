//! `kfrun bench serve`: a load test of `kfrun serve` on loopback, bounded in requests and
//! time. For the PFLM student (K = k) and the AR model on its backbone, an in-process server
//! (the same engine and HTTP code as `kfrun serve`) takes C concurrent clients, each sending
//! `--requests` streamed completions one after another (`max_tokens` = `--max-new`,
//! `ignore_eos`, a different seed each). Reported per (model, C): aggregate generated
//! tokens/s (all tokens over the wall time from the first request to the last response),
//! p50/p99 time to first token, and p50/p99 inter-chunk latency (one chunk per decode step:
//! k tokens for the student, 1 for AR). Next to it, `kfrun bench`'s batch-16 tokens/s for the
//! same model (the engine without HTTP or scheduling), and the three ratios.

use crate::bench_gen::{load_pair, measure, median, GenShape};
use crate::serve_cmd::Background;
use crate::weights_arg::ServeAs;
use anyhow::{ensure, Context, Result};
use kf_model::batch::{Model, SeqParams};
use kf_model::serve::{Engine, EngineOptions, Event};
use kf_model::tokenizer::Tokenizer;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// A PFLM student's model directory (the AR runs serve its backbone).
    #[arg(long, conflicts_with = "arch")]
    model: Option<PathBuf>,
    /// Random weights of a preset architecture instead: paper, small or tiny.
    #[arg(long)]
    arch: Option<String>,
    /// The student's k for --arch.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Tokenizer for the prompts and the text (default: the model directory's, else
    /// models/default/student/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    clients: Vec<usize>,
    /// Streamed requests per client, one after another.
    #[arg(long, default_value_t = 3)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_new: usize,
    /// Timed runs of the `kfrun bench` batch-16 reference (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per (model, clients) level at most: clients send no new request after it.
    #[arg(long, default_value_t = 120.0)]
    time_limit: f64,
    /// Weights as f32, f16 or bf16, or the matrices as ggml blocks q8_0, q4_0 or q4_1
    /// (default: the file's precision; f32 for --arch).
    #[arg(long, value_parser = crate::weights_arg::VALUES)]
    dtype: Option<String>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also run each level through the library API (no HTTP), to split the HTTP cost off.
    #[arg(long)]
    direct: bool,
}

/// One (model, clients) level.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub mode: String,
    pub k: usize,
    pub clients: usize,
    pub requests: usize,
    pub tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
}

/// What one client saw of one request.
struct Timing {
    ttft: f64,
    gaps: Vec<f64>,
}

/// The prompt of client `c`, request `r`: a sentence with the client's number (~10 tokens).
fn prompt(c: usize, r: usize) -> String {
    format!("The {c} travellers met at the gate on day {r} and")
}

/// One streamed completion over a fresh connection: time to the first chunk and the gaps
/// between chunks.
fn one_request(addr: SocketAddr, body: &str) -> Result<Timing> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let r = BufReader::new(s);
    let (mut first, mut last, mut gaps) = (None, None::<Instant>, Vec::new());
    let mut status = String::new();
    for line in r.lines() {
        let line = line?;
        if status.is_empty() {
            status = line.clone();
            ensure!(status.contains(" 200 "), "the server answered {status}");
            continue;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        ensure!(!data.contains("\"error\""), "the stream failed: {data}");
        let now = Instant::now();
        match last {
            None => first = Some(now - t0),
            Some(l) => gaps.push((now - l).as_secs_f64()),
        }
        last = Some(now);
    }
    let ttft = first
        .context("the stream ended without a chunk")?
        .as_secs_f64();
    Ok(Timing { ttft, gaps })
}

/// One level through the library API, no HTTP: `clients` threads submitting to `engine`.
fn level_direct(engine: &Engine, tok: &Tokenizer, clients: usize, a: &Args) -> Result<Row> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.time_limit);
    let t0 = Instant::now();
    let timings: Vec<Timing> = std::thread::scope(|sc| -> Result<Vec<Timing>> {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                sc.spawn(move || -> Result<Vec<Timing>> {
                    let mut out = Vec::new();
                    for r in 0..a.requests {
                        if Instant::now() > deadline {
                            break;
                        }
                        let p = SeqParams {
                            max_new: a.max_new,
                            k: engine.info().max_k,
                            seed: (c * 1000 + r) as u64,
                            vocab_limit: Some(tok.vocab_size()),
                            ..SeqParams::new(tok.encode(&prompt(c, r))?)
                        };
                        let t = Instant::now();
                        let (mut first, mut last, mut gaps) = (None, None::<Instant>, vec![]);
                        for ev in engine.submit(p)? {
                            match ev {
                                Event::Tokens { .. } => {
                                    let now = Instant::now();
                                    match last {
                                        None => first = Some((now - t).as_secs_f64()),
                                        Some(l) => gaps.push((now - l).as_secs_f64()),
                                    }
                                    last = Some(now);
                                }
                                Event::Error(e) => anyhow::bail!(e),
                                _ => {}
                            }
                        }
                        let ttft = first.context("no tokens")?;
                        out.push(Timing { ttft, gaps });
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in hs {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
            );
        }
        Ok(all)
    })?;
    Ok(row_of(
        timings,
        clients,
        t0.elapsed().as_secs_f64(),
        a.max_new,
    ))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs one level: `clients` threads against the server at `addr`.
fn level(addr: SocketAddr, clients: usize, a: &Args) -> Result<Row> {
    let deadline = Instant::now() + Duration::from_secs_f64(a.time_limit);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (requests, max_new) = (a.requests, a.max_new);
            std::thread::spawn(move || -> Result<Vec<Timing>> {
                let mut out = Vec::new();
                for r in 0..requests {
                    if Instant::now() > deadline {
                        break;
                    }
                    let body = serde_json::json!({
                        "prompt": prompt(c, r), "max_tokens": max_new, "stream": true,
                        "ignore_eos": true, "seed": (c * 1000 + r) as u64,
                    })
                    .to_string();
                    out.push(one_request(addr, &body)?);
                }
                Ok(out)
            })
        })
        .collect();
    let mut timings = Vec::new();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        timings.extend(t);
    }
    Ok(row_of(
        timings,
        clients,
        t0.elapsed().as_secs_f64(),
        a.max_new,
    ))
}

/// A level's row from its requests' timings.
fn row_of(timings: Vec<Timing>, clients: usize, wall: f64, max_new: usize) -> Row {
    let mut ttft: Vec<f64> = timings.iter().map(|t| t.ttft).collect();
    let mut gaps: Vec<f64> = timings
        .iter()
        .flat_map(|t| t.gaps.iter().copied())
        .collect();
    let tokens = timings.len() * max_new;
    Row {
        mode: String::new(),
        k: 0,
        clients,
        requests: timings.len(),
        tokens,
        wall_s: wall,
        tokens_per_s: tokens as f64 / wall,
        ttft_p50_ms: 1e3 * percentile(&mut ttft, 0.5),
        ttft_p99_ms: 1e3 * percentile(&mut ttft, 0.99),
        itl_p50_ms: 1e3 * percentile(&mut gaps, 0.5),
        itl_p99_ms: 1e3 * percentile(&mut gaps, 0.99),
    }
}

pub fn run(threads: usize, a: &Args) -> Result<()> {
    ensure!(a.requests >= 1, "--requests must be at least 1");
    ensure!(a.max_new >= 1, "--max-new must be at least 1");
    ensure!(
        !a.clients.is_empty() && a.clients.iter().all(|&c| (1..=1024).contains(&c)),
        "--clients: each count must be in 1..=1024"
    );
    ensure!(
        a.time_limit.is_finite() && a.time_limit > 0.0,
        "--time-limit must be > 0 seconds"
    );
    let dtype = ServeAs::of(a.dtype.as_deref())?;
    let (ar, pf, what) = load_pair(a.model.as_ref(), a.arch.as_deref(), a.k, dtype)?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| match &a.model {
        Some(d) => d.join("tokenizer.json"),
        None => PathBuf::from("models/default/student/tokenizer.json"),
    });
    let tok = Arc::new(
        Tokenizer::from_file(&tok_path)
            .with_context(|| format!("--tokenizer {}", tok_path.display()))?,
    );
    let k = pf.k;
    let max_clients = a.clients.iter().copied().max().unwrap_or(1);
    println!(
        "kfrun bench serve: {what}, {threads} threads, {} requests of {} tokens per client, clients {:?}",
        a.requests, a.max_new, a.clients
    );
    // the engine without HTTP: `kfrun bench` at batch 16 (prompt ~ the clients' length)
    let prompt_len = tok.encode(&prompt(0, 0))?.len();
    let shape = GenShape {
        prompt_len,
        max_new: a.max_new,
        runs: a.runs,
    };
    let mut reference = Vec::new();
    for (mode, kk) in [("pflm", k), ("ar", 0)] {
        let (mut times, _, _) = measure(&ar, &pf, kk, 16, shape)?;
        let tps = 16.0 * a.max_new as f64 / median(&mut times);
        println!("  kfrun bench {mode} batch 16: {tps:.1} tokens/s");
        reference.push((mode, tps));
    }
    let mut rows = Vec::new();
    for (mode, model) in [
        ("pflm", Model::Pflm(pf.clone())),
        ("ar", Model::Ar(ar.clone())),
    ] {
        let max_tokens = model.cfg().max_seq_len;
        let opts = EngineOptions {
            max_batch: max_clients.max(1),
            max_queue: max_clients.max(1),
            ..EngineOptions::default()
        };
        let engine = Engine::start(model, None, mode.to_string(), opts)?;
        if a.direct {
            for &c in &a.clients {
                let r = level_direct(&engine, &tok, c, a)?;
                println!(
                    "  {mode:>4} library API, clients {c:>3}: {:>8.1} tokens/s, TTFT p50 {:.1} ms, inter-chunk p50 {:.1} ms p99 {:.1} ms",
                    r.tokens_per_s, r.ttft_p50_ms, r.itl_p50_ms, r.itl_p99_ms
                );
            }
        }
        let server = Background::start(engine, tok.clone(), max_tokens)?;
        for &c in &a.clients {
            let mut r =
                level(server.addr, c, a).with_context(|| format!("{mode} with {c} clients"))?;
            r.mode = mode.into();
            r.k = if mode == "ar" { 1 } else { k };
            println!(
                "  {mode:>4} K={} clients {c:>3}: {:>8.1} tokens/s, TTFT p50 {:.1} ms p99 {:.1} ms, inter-chunk p50 {:.1} ms p99 {:.1} ms ({} requests, {:.1} s)",
                r.k, r.tokens_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, r.requests, r.wall_s
            );
            rows.push(r);
        }
        server.stop()?;
    }
    let find = |m: &str, c: usize| rows.iter().find(|r| r.mode == m && r.clients == c);
    let mut ratios = serde_json::Map::new();
    for (mode, tps) in &reference {
        if let Some(r) = find(mode, 16) {
            let x = r.tokens_per_s / tps;
            println!("  {mode}: 16 clients / kfrun bench batch 16 = {x:.2} (target >= 0.8)");
            ratios.insert(format!("{mode}_16_clients_over_bench_b16"), x.into());
        }
        if let (Some(one), Some(r16)) = (find(mode, 1), find(mode, 16)) {
            let x = r16.itl_p99_ms / one.itl_p50_ms;
            println!(
                "  {mode}: inter-chunk p99 at 16 clients / p50 alone = {x:.2} (target <= 2.5)"
            );
            ratios.insert(format!("{mode}_itl_p99_16_over_p50_1"), x.into());
        }
    }
    if let (Some(p), Some(q)) = (find("pflm", 4), find("ar", 4)) {
        let x = p.tokens_per_s / q.tokens_per_s;
        println!("  PFLM / AR aggregate at 4 clients = {x:.2} (target >= 2)");
        ratios.insert("pflm_over_ar_4_clients".into(), x.into());
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "model": what, "threads": threads, "requests_per_client": a.requests,
            "max_new": a.max_new, "prompt_tokens": prompt_len,
            "bench_batch16_tokens_per_s": reference.iter().map(|(m, t)| (m.to_string(), serde_json::json!(t))).collect::<serde_json::Map<_, _>>(),
            "rows": rows, "ratios": ratios,
        });
        kf_engine::fs::write_atomic(p, serde_json::to_string_pretty(&v)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
