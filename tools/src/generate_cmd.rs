//! `kfrun generate`: text from a model directory (config.json + model.safetensors +
//! tokenizer.json). An AR teacher samples one token per pass (prefill + KV cache, the
//! inverse-CDF sampler with Philox noise; kf_model::generate); a PFLM student (config `k`)
//! emits `--k` tokens per pass (argmax at each hint, optional frequency penalty;
//! kf_model::pflm::generate_pflm). Both stop at EOS.
//!
//! Sequences: the prompts, repeated in order up to `--batch` sequences when more are asked
//! for than given (`--batch 4 --prompt x` samples x four times, with four noise streams);
//! they run `--batch` at a time. Sequence `s` (0-based, over the whole run) uses noise
//! stream `s`, so its text does not depend on the batch size. With a batch of 1 the text is
//! streamed to stdout token by token; with more, each sequence is printed as `[s] text`
//! when it finishes. Progress and timing go to stderr.

use crate::weights_arg::ServeAs;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::Device;
use kf_model::batch::Model;
use kf_model::checkpoint;
use kf_model::generate::{generate, GenerateOptions, Generated};
use kf_model::pflm::{generate_pflm, PflmGenerateOptions};
use kf_model::tokenizer::Tokenizer;
use kf_model::DditConfig;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// The default model directory, relative to the repository root.
const DEFAULT_MODEL: &str = "models/default/student";

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: config.json, model.safetensors, tokenizer.json (an AR teacher or a
    /// PFLM student), a Llama-family GGUF file (`kfrun models fetch`) or a Hugging Face
    /// Llama directory [default: the shipped student, models/default/student].
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt text (repeat the flag for several prompts).
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    /// Sequences decoded together (default: the number of prompts).
    #[arg(long, allow_negative_numbers = true)]
    batch: Option<usize>,
    /// Tokens to generate per sequence at most [default: 64, or fewer where the longest
    /// prompt leaves less room in the model's max_seq_len].
    #[arg(long, allow_negative_numbers = true)]
    max_new: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    tau: f64,
    /// Philox seed of the sampling noise.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Device: cpu (the CPU ops), cuda / cuda:N (the CUDA kernels on a GPU; a build with the
    /// cuda feature), or emu (the same CUDA kernels on the CPU emulator: slow, for checking).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Recompute the whole sequence every step instead of using the KV cache (slow; a
    /// reference for the cached path).
    #[arg(long)]
    no_cache: bool,
    /// Tokens per forward pass, 1..=the student's trained k [default: its k]. Only for a
    /// PFLM student (a model whose config.json has "k").
    #[arg(long, allow_negative_numbers = true)]
    k: Option<usize>,
    /// Frequency penalty of a PFLM student: subtract P * (times the token was generated so
    /// far) from its logits before the argmax.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    freq_penalty: f64,
    /// Serve the weight matrices as f32, f16 or bf16 (rounded; activations and sums stay
    /// f32), or as ggml blocks q8_0, q4_0 or q4_1 (rounded; integer kernels on the CPU, a
    /// GGUF file's own blocks are replaced) [default: the file's precision and blocks].
    #[arg(long, value_parser = crate::weights_arg::VALUES)]
    dtype: Option<String>,
    /// Wrap each prompt as one user turn of the GGUF file's chat template (a chat model
    /// such as SmolLM2-Instruct; ChatML templates).
    #[arg(long)]
    chat: bool,
}

/// The model of `--model`: an AR teacher, or a PFLM student (checked against `--k` and
/// `--freq-penalty`), its matrices as `--dtype` asks, on `device` (kf_model::batch::Model:
/// 16-bit matrices stay 16-bit, on every device).
fn load_model(a: &Args, device: Device) -> Result<Model> {
    match checkpoint::read_config(&a.model)?.k {
        None => {
            ensure!(
                a.k.is_none(),
                "--k: {} is an AR model (one token per pass; its config.json has no \"k\"); --k needs a PFLM student",
                a.model.display()
            );
            ensure!(
                a.freq_penalty == 0.0,
                "--freq-penalty applies to a PFLM student's argmax; {} is an AR model (sampling)",
                a.model.display()
            );
        }
        Some(trained) => {
            if let Some(k) = a.k {
                ensure!(
                    k >= 1 && k <= trained,
                    "--k {k}: the student {} was trained with k = {trained}; choose 1..={trained}",
                    a.model.display()
                );
            }
        }
    }
    let serve_as = ServeAs::of(a.dtype.as_deref())?;
    if let Some(d) = serve_as {
        d.check_device(device)?;
    }
    Model::load_then(&a.model, device, |m| match serve_as {
        Some(d) => d.model(m),
        None => Ok(m),
    })
}

/// `--prompt`s as token ids, each non-empty and shorter than the model's max_seq_len.
fn encode_prompts(a: &Args, tok: &Tokenizer, cfg: &DditConfig) -> Result<Vec<Vec<u32>>> {
    let mut encoded = Vec::with_capacity(a.prompts.len());
    let gguf = if a.chat {
        ensure!(
            kf_model::llama::is_gguf(&a.model),
            "--chat applies a GGUF file's chat template; {} is not a GGUF file",
            a.model.display()
        );
        Some(kf_engine::gguf::Gguf::open(&a.model)?)
    } else {
        None
    };
    for (i, p) in a.prompts.iter().enumerate() {
        let text = match &gguf {
            Some(g) => kf_model::tokenizer::apply_chat_template(g, p)?,
            None => p.clone(),
        };
        let mut ids: Vec<u32> = cfg.bos_token_id.into_iter().collect();
        ids.extend(
            tok.encode(&text)
                .with_context(|| format!("cannot tokenise prompt {i}"))?,
        );
        ensure!(
            !ids.is_empty(),
            "prompt {i} ({p:?}) is empty after tokenisation"
        );
        ensure!(
            ids.len() < cfg.max_seq_len,
            "prompt {i} has {} tokens, which leaves no room in the model's max_seq_len {}",
            ids.len(),
            cfg.max_seq_len
        );
        encoded.push(ids);
    }
    Ok(encoded)
}

pub fn run(a: &Args) -> Result<()> {
    let device = crate::device_arg::select_device(&a.device)?;
    ensure!(a.max_new != Some(0), "--max-new must be at least 1");
    ensure!(
        a.tau.is_finite() && a.tau >= 0.0,
        "--tau must be finite and >= 0 (0 = greedy), got {}",
        a.tau
    );
    if a.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    ensure!(
        a.freq_penalty.is_finite(),
        "--freq-penalty must be finite, got {}",
        a.freq_penalty
    );
    let t_load = Instant::now();
    if a.model == std::path::Path::new(DEFAULT_MODEL) && !a.model.is_dir() {
        bail!(
            "no --model given and the default model {DEFAULT_MODEL} is not here: run from the repository root (it ships there), or pass --model DIR"
        );
    }
    let model = load_model(a, device)?;
    let k = match &model {
        Model::Ar(_) => 1,
        Model::Pflm(m) => a.k.unwrap_or(m.k),
    };
    let cfg = model.cfg();
    let tok = checkpoint::read_tokenizer(&a.model, cfg)?;
    if let Some(n) = a.max_new {
        ensure!(
            n < cfg.max_seq_len,
            "--max-new {n} leaves no room for a prompt: the model's max_seq_len is {}",
            cfg.max_seq_len
        );
    }
    let encoded = encode_prompts(a, &tok, cfg)?;
    let longest = encoded.iter().map(|e| e.len()).max().unwrap_or(0);
    let max_new = a.max_new.unwrap_or(64.min(cfg.max_seq_len - longest));
    for (i, ids) in encoded.iter().enumerate() {
        ensure!(
            ids.len() + max_new <= cfg.max_seq_len,
            "prompt {i} has {} tokens; with --max-new {max_new} that is {} positions, more than the model's max_seq_len {} (shorten the prompt or lower --max-new)",
            ids.len(),
            ids.len() + max_new,
            cfg.max_seq_len
        );
    }
    let eos = cfg.eos_token_id.or(tok.eos_id());
    let batch = a.batch.unwrap_or(encoded.len());
    let need = generate_bytes(cfg, batch, longest + max_new, k);
    if let Some(avail) = kf_model::train::available_memory() {
        ensure!(
            need <= avail,
            "--batch {batch}: decoding {batch} sequences of up to {} positions needs about {:.1} GiB (KV cache and logits) but {:.1} GiB are available; lower --batch or --max-new",
            longest + max_new,
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    let n_seq = batch.max(encoded.len());
    eprintln!(
        "kfrun generate: {} ({}, {} layers, d {}, V {}, {:.1} M parameters) loaded in {:.2} s on {}; {n_seq} sequence(s), batch {batch}, max {} new tokens, tau {}, seed {}, {}{}",
        a.model.display(),
        match &model {
            Model::Ar(_) => "AR, 1 token per pass".to_string(),
            Model::Pflm(m) => format!(
                "PFLM trained k = {}, {k} tokens per pass{}",
                m.k,
                if a.freq_penalty != 0.0 {
                    format!(", frequency penalty {}", a.freq_penalty)
                } else {
                    String::new()
                }
            ),
        },
        cfg.n_layers,
        cfg.d_model,
        cfg.vocab_size,
        cfg.n_params() as f64 / 1e6,
        t_load.elapsed().as_secs_f64(),
        if device.is_cpu() {
            "the CPU".to_string()
        } else {
            format!("{} ({})", device.kernel()?.name(), model.weight_bytes().describe())
        },
        max_new,
        a.tau,
        a.seed,
        if a.no_cache { "no KV cache" } else { "KV cache" },
        match eos {
            Some(e) => format!(", EOS id {e}"),
            None => ", no EOS token".to_string(),
        }
    );
    let (mut total_tokens, mut total_decode) = (0usize, 0f64);
    let mut start = 0;
    while start < n_seq {
        let end = (start + batch).min(n_seq);
        let idx: Vec<usize> = (start..end).collect();
        let prompts: Vec<Vec<u32>> = idx
            .iter()
            .map(|&s| encoded[s % encoded.len()].clone())
            .collect();
        let texts: Vec<&str> = idx
            .iter()
            .map(|&s| a.prompts[s % a.prompts.len()].as_str())
            .collect();
        let opts = GenerateOptions {
            max_new,
            tau: a.tau,
            seed: a.seed,
            first_stream: start as u64,
            eos,
            use_cache: !a.no_cache,
            // a vocabulary padded past the tokenizer's: never sample an id it cannot decode
            vocab_limit: Some(tok.vocab_size()),
        };
        let popts = PflmGenerateOptions {
            base: opts,
            k,
            freq_penalty: a.freq_penalty,
        };
        let g = run_chunk(&model, &tok, &prompts, &texts, start, &popts)?;
        let n = g.0;
        eprintln!(
            "  sequences {start}..{end}: prefill {:.1} ms, {n} tokens in {:.2} s = {:.1} tokens/s ({} passes)",
            g.1 * 1e3,
            g.2,
            n as f64 / g.2.max(1e-9),
            g.3
        );
        total_tokens += n;
        total_decode += g.1 + g.2;
        start = end;
    }
    eprintln!(
        "kfrun generate: {total_tokens} tokens in {total_decode:.2} s (prefill included) = {:.1} tokens/s",
        total_tokens as f64 / total_decode.max(1e-9)
    );
    Ok(())
}

/// A rough upper bound of the memory one batch of generation allocates besides the
/// (memory-mapped) weights: the f32 KV cache of every layer, the logits and the PFLM's
/// counts, the token lists (saturating: absurd requests fail the check instead of wrapping).
fn generate_bytes(cfg: &DditConfig, batch: usize, positions: usize, k: usize) -> u64 {
    let (b, t, d, l, v) = (
        batch as u64,
        positions as u64 + k as u64,
        cfg.d_model as u64,
        cfg.n_layers as u64,
        cfg.vocab_size as u64,
    );
    let kv = b
        .saturating_mul(t)
        .saturating_mul(d)
        .saturating_mul(l)
        .saturating_mul(8);
    let logits = b
        .saturating_mul(2 * k as u64 + 2)
        .saturating_mul(v)
        .saturating_mul(8);
    let acts = b.saturating_mul(t).saturating_mul(d).saturating_mul(4 * 16);
    kv.saturating_add(logits)
        .saturating_add(acts)
        .saturating_add(b.saturating_mul(t).saturating_mul(8))
}

/// Runs the model's generator with `on_token(b, token)` (on the model's device).
fn gen(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &PflmGenerateOptions,
    on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generated> {
    match model {
        Model::Ar(m) => generate(m, prompts, &opts.base, on_token),
        Model::Pflm(m) => generate_pflm(m, prompts, opts, on_token),
    }
}

/// One batch: returns (tokens generated, prefill s, decode s, passes).
fn run_chunk(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    texts: &[&str],
    first: usize,
    popts: &PflmGenerateOptions,
) -> Result<(usize, f64, f64, usize)> {
    let opts = &popts.base;
    let out = std::io::stdout();
    let nb = prompts.len();
    let g = if nb == 1 {
        // stream: the prompt, then each token's text as soon as it is complete
        let mut dec = tok.stream_decoder();
        {
            let mut o = out.lock();
            write!(o, "{}", texts[0])?;
            o.flush()?;
        }
        let g = gen(model, prompts, popts, |_, t| {
            if Some(t) == opts.eos {
                return Ok(());
            }
            let s = dec.push(t)?;
            if !s.is_empty() {
                let mut o = out.lock();
                write!(o, "{s}")?;
                o.flush()?;
            }
            Ok(())
        })?;
        let mut o = out.lock();
        writeln!(o, "{}", dec.finish()?)?;
        o.flush()?;
        g
    } else {
        // print each sequence when it finishes (at EOS, or all at the end)
        let mut printed = vec![false; nb];
        let mut acc: Vec<Vec<u32>> = vec![Vec::new(); nb];
        let print = |b: usize, ids: &[u32]| -> Result<()> {
            let text = tok.decode(ids)?;
            let mut o = out.lock();
            writeln!(o, "[{}] {}{}", first + b, texts[b], text)?;
            o.flush()?;
            Ok(())
        };
        let g = gen(model, prompts, popts, |b, t| {
            if Some(t) == opts.eos {
                printed[b] = true;
                return print(b, &acc[b]);
            }
            acc[b].push(t);
            Ok(())
        })?;
        for b in 0..nb {
            if !printed[b] {
                print(b, &acc[b])?;
            }
        }
        g
    };
    Ok((g.n_tokens(), g.prefill_secs, g.decode_secs, g.passes))
}
