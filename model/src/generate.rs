//! Autoregressive generation with the teacher (KFORCING.md section 7, AR case): prefill the
//! prompts into the KV cache, then one token per step per sequence through the one
//! inverse-CDF map (`kf_ops::sampling::sample_inverse_cdf`), stopping a sequence at EOS.
//! Letters: B sequences, L_b prompt lengths, Lmax = max L_b, V vocabulary.
//!
//! # The noise (shared with the student and the evaluation)
//!
//! The uniform for sequence `s` at generated position `j` (0-based: `j = 0` is the first
//! token after the prompt) is
//!
//! ```text
//! u(s, j) = Philox(seed, stream = s).uniform_f64(j)        // see kf_engine::rng
//! ```
//!
//! where `s = first_stream + b` for row `b` of the batch. The token is
//! `inverse_cdf(softmax(logits / tau), u(s, j))`. Because `u` depends on the sequence's
//! stream and position only (never on the batch it ran in or on the other sequences), a
//! sequence generates the same tokens alone or in any batch, cached or not, and a PFLM
//! student fed `u(s, j..j+k)` as hints reproduces the teacher's rollout for the same `u`.
//!
//! # Batching prompts of different lengths
//!
//! Prompts are left-padded to Lmax; `key_skip[b] = Lmax - L_b` hides the padding keys
//! (padding query rows output zeros), and RoPE positions restart at 0 on each sequence's
//! first real token, so row `b` computes exactly what it would alone. A finished sequence
//! stays in the batch (fed its last token, its samples ignored) until every sequence has
//! stopped or `max_new` tokens were generated.

use crate::ddit::Ddit;
use crate::kv_cache::KvCache;
use crate::DditConfig;
use anyhow::{ensure, Result};
use kf_engine::autograd::no_grad;
use kf_engine::rng::Philox;
use kf_engine::{Device, Tensor};
use kf_ops::elementwise::bias_add;
use kf_ops::sampling::sample_inverse_cdf;
use std::time::Instant;

/// Options of [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate per sequence at most (>= 1).
    pub max_new: usize,
    /// Temperature (> 0; 0 is greedy).
    pub tau: f64,
    /// Philox seed of the noise.
    pub seed: u64,
    /// Row `b` uses Philox stream `first_stream + b` (so a sequence generated alone with
    /// `first_stream = s` equals row `b` of a batch with `first_stream + b = s`).
    pub first_stream: u64,
    /// Stop token; `None` runs every sequence to `max_new`.
    pub eos: Option<u32>,
    /// `true`: prefill + KV cache; `false`: recompute the whole sequence every step (the
    /// reference the cached path is tested against).
    pub use_cache: bool,
    /// Ids `>= vocab_limit` are never sampled (their logits are set to -inf before the
    /// map): for a model whose vocabulary is padded past its tokenizer's. `None`: all V.
    pub vocab_limit: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new: 64,
            tau: 1.0,
            seed: 0,
            first_stream: 0,
            eos: None,
            use_cache: true,
            vocab_limit: None,
        }
    }
}

/// What [`generate`] produced.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    /// Generated ids per sequence (prompt excluded), ending with EOS when it stopped there.
    pub tokens: Vec<Vec<u32>>,
    /// Whether each sequence stopped at EOS.
    pub stopped_at_eos: Vec<bool>,
    /// Forward passes run (prefill included).
    pub passes: usize,
    /// Seconds in the prefill pass (with the cache; 0 without).
    pub prefill_secs: f64,
    /// Seconds in the decode steps.
    pub decode_secs: f64,
}

impl Generated {
    /// Tokens generated over all sequences.
    pub fn n_tokens(&self) -> usize {
        self.tokens.iter().map(|t| t.len()).sum()
    }
}

/// The uniform of sequence stream `stream` at generated position `j` (module docs).
pub fn noise_u(seed: u64, stream: u64, j: u64) -> f64 {
    Philox::new(seed, stream).uniform_f64(j)
}

/// Generates a continuation of each prompt (token ids, each non-empty and below V).
/// `on_token(b, token)` is called for every token as soon as it is sampled, in sequence
/// order within a step (EOS included); an error from it stops generation.
pub fn generate(
    model: &Ddit,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generated> {
    let cfg = &model.cfg;
    check_request(cfg, prompts, opts)?;
    let _ng = no_grad();
    let nb = prompts.len();
    let dev = model.device();
    let LeftPadded {
        lmax,
        skips,
        key_skip,
        mut rows,
    } = left_pad(prompts);
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut out = Generated {
        tokens: vec![Vec::new(); nb],
        stopped_at_eos: vec![false; nb],
        ..Default::default()
    };
    let mut done = vec![false; nb];
    let mut cache = if opts.use_cache {
        Some(KvCache::new_on(
            cfg,
            nb,
            lmax + opts.max_new - 1,
            model.dtype(),
            dev,
        )?)
    } else {
        None
    };
    let mut u = vec![0f64; nb];
    let mut logits;
    // prefill (or, without a cache, the first full pass)
    {
        let t0 = Instant::now();
        logits = full_pass(model, &rows, &skips, &key_skip, cache.as_mut())?;
        out.passes += 1;
        let dt = t0.elapsed().as_secs_f64();
        if opts.use_cache {
            out.prefill_secs = dt;
        } else {
            out.decode_secs += dt;
        }
    }
    let t_dec = Instant::now();
    for j in 0..opts.max_new {
        for (b, ub) in u.iter_mut().enumerate() {
            *ub = noise_u(opts.seed, opts.first_stream + b as u64, j as u64);
        }
        if let Some(l) = opts.vocab_limit.filter(|&l| l < cfg.vocab_size) {
            logits = forbid_tail(logits, l)?;
        }
        let ut = Tensor::from_slice(&u, &[nb], dev)?;
        let toks = tokens_to_host(&sample_inverse_cdf(&logits, &ut, opts.tau)?)?;
        for b in 0..nb {
            if done[b] {
                continue;
            }
            out.tokens[b].push(toks[b]);
            on_token(b, toks[b])?;
            if Some(toks[b]) == opts.eos {
                done[b] = true;
                out.stopped_at_eos[b] = true;
            }
        }
        if j + 1 == opts.max_new || done.iter().all(|&d| d) {
            break;
        }
        // feed the sampled token (a finished sequence repeats its last one; ignored)
        for (b, r) in rows.iter_mut().enumerate() {
            let last = *out.tokens[b].last().expect("a token per step until done");
            r.push(last);
        }
        logits = match cache.as_mut() {
            Some(c) => {
                let ids: Vec<u32> = rows.iter().map(|r| *r.last().expect("non-empty")).collect();
                let pos: Vec<u32> = lens.iter().map(|&l| (l + j) as u32).collect();
                let ids = Tensor::from_vec(ids, &[nb, 1], dev)?;
                let pos = Tensor::from_vec(pos, &[nb, 1], dev)?;
                let attn = model.attn_params(c.len(), key_skip.clone());
                let h = model.backbone_hidden(&model.embed(&ids)?, &pos, &attn, Some(&mut *c))?;
                c.commit(1)?;
                model.head(&h)?.reshape(&[nb, cfg.vocab_size])?
            }
            None => full_pass(model, &rows, &skips, &key_skip, None)?,
        };
        out.passes += 1;
    }
    out.decode_secs += t_dec.elapsed().as_secs_f64();
    Ok(out)
}

/// Checks a generation request against the model (shared by AR and PFLM generation):
/// prompts non-empty and inside the vocabulary, room for `max_new`, tau, vocab_limit, EOS.
pub(crate) fn check_request(
    cfg: &DditConfig,
    prompts: &[Vec<u32>],
    o: &GenerateOptions,
) -> Result<()> {
    ensure!(!prompts.is_empty(), "generate: no prompts");
    ensure!(o.max_new >= 1, "generate: max_new must be at least 1");
    ensure!(
        o.tau.is_finite() && o.tau >= 0.0,
        "generate: tau must be finite and >= 0, got {}",
        o.tau
    );
    for (b, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "generate: prompt {b} has no tokens");
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "generate: prompt {b} holds token id {bad}, outside the model's vocabulary of {}",
                cfg.vocab_size
            );
        }
        ensure!(
            p.len() + o.max_new <= cfg.max_seq_len,
            "generate: prompt {b} has {} tokens; with max_new {} that is {} positions, more than the model's max_seq_len {}",
            p.len(),
            o.max_new,
            p.len() + o.max_new,
            cfg.max_seq_len
        );
    }
    if let Some(l) = o.vocab_limit {
        ensure!(
            l >= 1 && l <= cfg.vocab_size,
            "generate: vocab_limit {l} must be in 1..={}",
            cfg.vocab_size
        );
    }
    if let Some(e) = o.eos {
        ensure!(
            (e as usize) < cfg.vocab_size,
            "generate: EOS id {e} is outside the vocabulary of {}",
            cfg.vocab_size
        );
    }
    Ok(())
}

/// One pass over the whole (left-padded) rows; logits `[B, V]` of the last row. With a
/// cache (empty), this is the prefill and commits every row.
pub(crate) fn full_pass(
    model: &Ddit,
    rows: &[Vec<u32>],
    skips: &[usize],
    key_skip: &[usize],
    cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    let (nb, t) = (rows.len(), rows[0].len());
    let ids: Vec<u32> = rows.iter().flatten().copied().collect();
    let pos: Vec<u32> = skips
        .iter()
        .flat_map(|&s| (0..t).map(move |i| i.saturating_sub(s) as u32))
        .collect();
    let ids = Tensor::from_vec(ids, &[nb, t], model.device())?;
    let pos = Tensor::from_vec(pos, &[nb, t], model.device())?;
    let q_start = cache.as_ref().map_or(0, |c| c.len());
    let attn = model.attn_params(q_start, key_skip.to_vec());
    let h0 = model.embed(&ids)?;
    let (h, cache) = match cache {
        Some(c) => {
            let h = model.backbone_hidden(&h0, &pos, &attn, Some(&mut *c))?;
            (h, Some(c))
        }
        None => (model.backbone_hidden(&h0, &pos, &attn, None)?, None),
    };
    if let Some(c) = cache {
        c.commit(t)?;
    }
    // only the last row's logits are needed
    let last = h.narrow(1, t - 1, 1)?;
    model.head(&last)?.reshape(&[nb, model.cfg.vocab_size])
}

/// `logits [.., V]` with columns `l..V` set to -inf: a bias row of 0s and -infs added on the
/// logits' device (x + 0 = x exactly, so the other columns keep their values bit for bit).
pub(crate) fn forbid_tail(logits: Tensor, l: usize) -> Result<Tensor> {
    let v = logits.dim(logits.rank() - 1)?;
    let row: Vec<f64> = (0..v)
        .map(|i| if i < l { 0.0 } else { f64::NEG_INFINITY })
        .collect();
    let row = Tensor::from_vec(row, &[v], Device::Cpu)?
        .to_dtype(logits.dtype())?
        .to_device(logits.device())?;
    bias_add(&logits, &row)
}

/// Sampled token ids to the host, with a device kernel's marker for a NaN or all -inf logit
/// row turned into an error (the CPU sampler reports those itself).
pub(crate) fn tokens_to_host(t: &Tensor) -> Result<Vec<u32>> {
    kf_ops::sampling::tokens_to_host(t)
}

/// A batch of prompts left-padded to a common length.
pub(crate) struct LeftPadded {
    /// Longest prompt length.
    pub lmax: usize,
    /// Padding rows per sequence (`lmax - len`).
    pub skips: Vec<usize>,
    /// `skips` for the attention's `key_skip`, or empty when nothing is padded.
    pub key_skip: Vec<usize>,
    /// The padded sequences (padding repeats the first prompt token).
    pub rows: Vec<Vec<u32>>,
}

/// Left-pad non-empty `prompts` to the longest one.
pub(crate) fn left_pad(prompts: &[Vec<u32>]) -> LeftPadded {
    let lmax = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let skips: Vec<usize> = prompts.iter().map(|p| lmax - p.len()).collect();
    let key_skip = if skips.iter().any(|&s| s > 0) {
        skips.clone()
    } else {
        vec![]
    };
    let rows = prompts
        .iter()
        .zip(&skips)
        .map(|(p, &s)| {
            let mut r = vec![p[0]; s];
            r.extend_from_slice(p);
            r
        })
        .collect();
    LeftPadded {
        lmax,
        skips,
        key_skip,
        rows,
    }
}
