//! Continuous batching, the step level: sequences that join and leave a running batch, each
//! with its own KV cache, prompt length, window `k`, temperature, penalty and noise stream,
//! all advanced together by one ragged forward pass ([`Ddit::ragged_hidden`]) per [`step`].
//! The scheduler that feeds it (queue, threads, cancellation) is [`crate::serve`].
//!
//! A sequence computes here what [`crate::generate::generate`] (AR) and
//! [`crate::pflm::generate_pflm`] (PFLM) compute for it alone: the same noise
//! (`noise_u(seed, stream, j)` for generated position `j`), the same inverse-CDF map or
//! penalised argmax, the same RoPE positions. The one difference is the prompt's first pass:
//! the whole prompt is one step's rows (for the student: `[prompt | K hints]`, hint `i` at
//! position `L - 1 + i`), which is the same causal computation as a prefill followed by a
//! step. So a seeded request gives the same tokens alone or batched with any others (the
//! matrix products see more rows in a batch; their row results do not depend on the others).

use crate::checkpoint;
use crate::ddit::{Ddit, RaggedSeq};
use crate::generate::{forbid_tail, noise_u, tokens_to_host};
use crate::kv_cache::KvCache;
use crate::pflm::Pflm;
use crate::weights::WeightStore;
use crate::DditConfig;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::autograd::no_grad;
use kf_engine::{DType, Device, Tensor};
use kf_ops::argmax::argmax_penalty;
use kf_ops::sampling::sample_inverse_cdf;
use std::path::Path;

/// A model to serve: an AR teacher (one token per pass, sampled) or a PFLM student (up to
/// `k` tokens per pass, read off by argmax).
pub enum Model {
    Ar(Ddit),
    Pflm(Pflm),
}

impl Model {
    /// Loads the model in `dir` (a student when its config.json has `"k"`), keeping 16-bit
    /// matrices as stored, and moves it to `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Model> {
        Model::load_then(dir, device, Ok)
    }

    /// [`Model::load`] with `change` applied on the CPU before the model moves to `device`
    /// (`kfrun serve --dtype`: the matrices rounded to other weights).
    pub fn load_then(
        dir: &Path,
        device: Device,
        change: impl FnOnce(Model) -> Result<Model>,
    ) -> Result<Model> {
        let cfg = checkpoint::read_config(dir)?;
        let store = WeightStore::Exact;
        let m = match cfg.k {
            None => {
                let m = Ddit::load_with(dir, store)?;
                checkpoint::check_finite(&checkpoint::weights_path(dir), m.params())?;
                Model::Ar(m)
            }
            Some(_) => Model::Pflm(Pflm::load_with(dir, store)?),
        };
        let m = change(m)?;
        if device.is_cpu() {
            return Ok(m);
        }
        device.ensure_available()?;
        match &m {
            Model::Ar(a) => a.to_device_with(device, store).map(Model::Ar),
            Model::Pflm(p) => p.to_device_with(device, store).map(Model::Pflm),
        }
        .with_context(|| format!("moving the model to {device}"))
    }
    pub fn cfg(&self) -> &DditConfig {
        &self.backbone().cfg
    }
    /// The bytes of the parameters as a pass reads them (`Ddit::weight_bytes`).
    pub fn weight_bytes(&self) -> crate::weights::WeightBytes {
        match self {
            Model::Ar(m) => m.weight_bytes(),
            Model::Pflm(m) => m.weight_bytes(),
        }
    }
    /// The transformer that runs every pass.
    pub fn backbone(&self) -> &Ddit {
        match self {
            Model::Ar(m) => m,
            Model::Pflm(m) => &m.backbone,
        }
    }
    /// Tokens per pass at most: the student's trained k, 1 for an AR model.
    pub fn max_k(&self) -> usize {
        match self {
            Model::Ar(_) => 1,
            Model::Pflm(m) => m.k,
        }
    }
    pub fn is_pflm(&self) -> bool {
        matches!(self, Model::Pflm(_))
    }
    pub fn device(&self) -> Device {
        self.backbone().device()
    }
}

/// What one sequence asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqParams {
    /// Prompt token ids (non-empty, each below V).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (0: only score the prompt, with `prompt_logprobs`).
    pub max_new: usize,
    /// Temperature: sampling (AR; 0 = greedy) or the student's noise-encoder input.
    pub tau: f64,
    /// Philox seed and stream of the noise (`generate::noise_u`).
    pub seed: u64,
    pub stream: u64,
    /// Tokens per pass: 1 for an AR model, 1..=k for a student.
    pub k: usize,
    /// The student's frequency penalty (0 = none; must be 0 for an AR model).
    pub penalty: f64,
    /// Stop token (emitted, then the sequence ends).
    pub eos: Option<u32>,
    /// Ids `>= vocab_limit` are never produced.
    pub vocab_limit: Option<usize>,
    /// AR only: the log-probability (tau = 1) of each generated token.
    pub logprobs: bool,
    /// AR only: the log-probability of each prompt token after the first.
    pub prompt_logprobs: bool,
}

impl SeqParams {
    /// Defaults for `prompt`: 16 tokens, tau 1, seed 0, stream 0, k 1, no penalty.
    pub fn new(prompt: Vec<u32>) -> SeqParams {
        SeqParams {
            prompt,
            max_new: 16,
            tau: 1.0,
            seed: 0,
            stream: 0,
            k: 1,
            penalty: 0.0,
            eos: None,
            vocab_limit: None,
            logprobs: false,
            prompt_logprobs: false,
        }
    }

    /// Checks the request against the model; the error names the field.
    pub fn check(&self, model: &Model) -> Result<()> {
        let cfg = model.cfg();
        self.check_shape(
            cfg.vocab_size,
            cfg.max_seq_len,
            model.max_k(),
            model.is_pflm(),
        )
    }

    /// [`SeqParams::check`] against a model's vocabulary, context, window and kind.
    pub fn check_shape(
        &self,
        v: usize,
        max_seq_len: usize,
        max_k: usize,
        pflm: bool,
    ) -> Result<()> {
        ensure!(!self.prompt.is_empty(), "prompt: no tokens");
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= v) {
            bail!("prompt: token id {bad} is outside the model's vocabulary of {v}");
        }
        ensure!(
            self.prompt.len() + self.max_new <= max_seq_len,
            "max_new: the prompt's {} tokens plus {} new ones exceed the model's context of {} positions",
            self.prompt.len(),
            self.max_new,
            max_seq_len
        );
        ensure!(
            self.tau.is_finite() && self.tau >= 0.0,
            "tau: must be finite and >= 0, got {}",
            self.tau
        );
        ensure!(
            self.k >= 1 && self.k <= max_k,
            "k: {} is not in 1..={max_k} ({})",
            self.k,
            if pflm {
                "the student's trained k"
            } else {
                "an AR model emits one token per pass"
            }
        );
        ensure!(self.penalty.is_finite(), "penalty: must be finite");
        if !pflm {
            ensure!(
                self.penalty == 0.0,
                "penalty: the frequency penalty applies to a student's argmax; this is an AR model"
            );
        } else {
            ensure!(
                !self.logprobs && !self.prompt_logprobs,
                "logprobs: log-probabilities come from an AR model; this is a PFLM student (argmax read-off)"
            );
        }
        ensure!(
            self.max_new >= 1 || self.prompt_logprobs,
            "max_new: 0 generates nothing; ask for prompt log-probabilities to score a text"
        );
        if let Some(l) = self.vocab_limit {
            ensure!(l >= 1 && l <= v, "vocab_limit: {l} must be in 1..={v}");
        }
        if let Some(e) = self.eos {
            ensure!(
                (e as usize) < v,
                "eos: id {e} is outside the vocabulary of {v}"
            );
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced its stop token.
    Eos,
    /// It produced `max_new` tokens.
    Length,
}

/// One sequence in the batch: its request, KV cache and progress.
pub struct Sequence {
    params: SeqParams,
    cache: KvCache,
    /// Tokens not yet in the cache (the prompt at first, then the last step's tokens).
    pending: Vec<u32>,
    /// RoPE position of `pending[0]`.
    pos0: usize,
    generated: usize,
    /// The student's per-token counts for the frequency penalty, u32 `[1, V]`.
    counts: Option<Tensor>,
    finished: Option<Finish>,
}

/// What a sequence produced in one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOut {
    pub tokens: Vec<u32>,
    /// Per token, when `logprobs` was asked for.
    pub logprobs: Vec<f64>,
    /// On its first step, when `prompt_logprobs` was asked for: one per prompt token after
    /// the first.
    pub prompt_logprobs: Option<Vec<f64>>,
    pub finished: Option<Finish>,
}

impl Sequence {
    /// A sequence for `params` (checked against `model`), its KV cache allocated for the
    /// prompt, the new tokens and one window of hints.
    pub fn new(model: &Model, params: SeqParams) -> Result<Sequence> {
        params.check(model)?;
        let bb = model.backbone();
        let cap = params.prompt.len() + params.max_new + params.k;
        let cache = KvCache::new_on(&bb.cfg, 1, cap, bb.dtype(), bb.device())?;
        let counts = match model {
            Model::Pflm(_) => Some(Tensor::zeros(
                &[1, bb.cfg.vocab_size],
                DType::U32,
                bb.device(),
            )?),
            Model::Ar(_) => None,
        };
        Ok(Sequence {
            pending: params.prompt.clone(),
            params,
            cache,
            pos0: 0,
            generated: 0,
            counts,
            finished: None,
        })
    }
    pub fn params(&self) -> &SeqParams {
        &self.params
    }
    pub fn finished(&self) -> Option<Finish> {
        self.finished
    }
    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }
    /// Rows this sequence adds to the next step.
    pub fn next_rows(&self) -> usize {
        self.pending.len() + self.window()
    }
    /// Hints of the next step (0 for an AR model).
    fn window(&self) -> usize {
        if self.counts.is_some() {
            self.params.k.min(self.params.max_new - self.generated)
        } else {
            0
        }
    }
}

/// Where one sequence's rows sit in a step.
struct Plan {
    /// First row in the packed pass, token rows, hint rows.
    at: usize,
    n_tok: usize,
    n_hint: usize,
    /// First row of the head's input, and how many rows it reads.
    head_at: usize,
    head_rows: usize,
}

/// Advances every sequence (none finished) by one forward pass: AR sequences by one token
/// (their whole prompt on the first step), students by up to `k` tokens. Returns what each
/// produced, in order. On an error the sequences' caches are rolled back to before the step.
pub fn step(model: &Model, seqs: &mut [&mut Sequence]) -> Result<Vec<StepOut>> {
    ensure!(!seqs.is_empty(), "step: no sequences");
    if let Some(i) = seqs.iter().position(|s| s.finished.is_some()) {
        bail!("step: sequence {i} has already finished");
    }
    let _ng = no_grad();
    let bb = model.backbone();
    let dev = bb.device();
    let (d, v) = (bb.cfg.d_model, bb.cfg.vocab_size);
    // the rows: per sequence [pending tokens | hints]
    let mut plans = Vec::with_capacity(seqs.len());
    let (mut ids, mut u, mut tau) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rows, mut head_rows) = (0, 0);
    for s in seqs.iter() {
        let (n_tok, n_hint) = (s.pending.len(), s.window());
        ids.extend_from_slice(&s.pending);
        for i in 0..n_hint {
            let j = (s.generated + i) as u64;
            u.push(noise_u(s.params.seed, s.params.stream, j));
            tau.push(s.params.tau);
        }
        let first = s.generated == 0;
        let hr = match n_hint {
            0 if first && s.params.prompt_logprobs => n_tok,
            0 => 1,
            h => h,
        };
        plans.push(Plan {
            at: rows,
            n_tok,
            n_hint,
            head_at: head_rows,
            head_rows: hr,
        });
        rows += n_tok + n_hint;
        head_rows += hr;
    }
    let emb = bb.embed(&Tensor::from_vec(ids, &[1, rows - u.len()], dev)?)?;
    let h0 = match model {
        Model::Pflm(m) if !u.is_empty() => {
            let hints = m.noise.forward(&u, &tau)?;
            let h0 = Tensor::zeros(&[1, rows, d], bb.dtype(), dev)?;
            let (mut tok_at, mut hint_at) = (0, 0);
            for p in &plans {
                h0.narrow(1, p.at, p.n_tok)?
                    .copy_from(&emb.narrow(1, tok_at, p.n_tok)?)?;
                h0.narrow(1, p.at + p.n_tok, p.n_hint)?
                    .squeeze(0)?
                    .copy_from(&hints.narrow(0, hint_at, p.n_hint)?)?;
                tok_at += p.n_tok;
                hint_at += p.n_hint;
            }
            h0
        }
        _ => emb,
    };
    let h = {
        let mut ragged: Vec<RaggedSeq> = seqs
            .iter_mut()
            .map(|s| {
                let n = s.pending.len();
                let mut pos: Vec<u32> = (s.pos0..s.pos0 + n).map(|p| p as u32).collect();
                pos.extend((1..=s.window()).map(|i| (s.pos0 + n - 1 + i) as u32));
                RaggedSeq {
                    cache: &mut s.cache,
                    pos,
                }
            })
            .collect();
        match bb.ragged_hidden(&h0, &mut ragged) {
            Ok(h) => h,
            Err(e) => {
                for r in ragged.iter_mut() {
                    let len = r.cache.len();
                    r.cache.truncate(len)?;
                }
                return Err(e);
            }
        }
    };
    // the head on the rows that are read: AR the last row (every prompt row when scoring),
    // a student its hint rows
    let hx = Tensor::zeros(&[1, head_rows, d], bb.dtype(), dev)?;
    for p in &plans {
        let from = p.at + p.n_tok + p.n_hint - p.head_rows;
        hx.narrow(1, p.head_at, p.head_rows)?
            .copy_from(&h.narrow(1, from, p.head_rows)?)?;
    }
    let logits = bb.head(&hx)?;
    let mut outs = Vec::with_capacity(seqs.len());
    for (s, p) in seqs.iter_mut().zip(&plans) {
        s.cache.commit(p.n_tok)?;
        let lg = logits.narrow(1, p.head_at, p.head_rows)?;
        let lg = match s.params.vocab_limit.filter(|&l| l < v) {
            Some(l) => forbid_tail(lg.contiguous()?, l)?,
            None => lg,
        };
        let mut out = StepOut::default();
        let toks = if p.n_hint > 0 {
            let counts = s.counts.as_ref().expect("a student's sequence has counts");
            tokens_to_host(&argmax_penalty(
                &lg.contiguous()?,
                counts,
                s.params.penalty,
            )?)?
        } else {
            let last = lg.narrow(1, p.head_rows - 1, 1)?.reshape(&[1, v])?;
            if s.params.prompt_logprobs && s.generated == 0 {
                let all = lg.to_vec_f64()?;
                let lp = (0..p.head_rows - 1)
                    .map(|i| log_prob(&all[i * v..(i + 1) * v], s.pending[i + 1]))
                    .collect();
                out.prompt_logprobs = Some(lp);
            }
            if s.params.max_new == 0 {
                vec![]
            } else {
                let uu = noise_u(s.params.seed, s.params.stream, s.generated as u64);
                let ut = Tensor::from_slice(&[uu], &[1], dev)?;
                let t = tokens_to_host(&sample_inverse_cdf(&last, &ut, s.params.tau)?)?;
                if s.params.logprobs {
                    out.logprobs = vec![log_prob(&last.to_vec_f64()?, t[0])];
                }
                t
            }
        };
        s.pos0 += p.n_tok;
        s.pending.clear();
        for &t in &toks {
            out.tokens.push(t);
            s.pending.push(t);
            s.generated += 1;
            if Some(t) == s.params.eos {
                s.finished = Some(Finish::Eos);
                break;
            }
        }
        out.logprobs.truncate(out.tokens.len());
        if s.finished.is_none() && s.generated >= s.params.max_new {
            s.finished = Some(Finish::Length);
        }
        out.finished = s.finished;
        outs.push(out);
    }
    Ok(outs)
}

/// `log softmax(logits)[tok]`, in f64 (max-shifted log-sum-exp).
pub fn log_prob(logits: &[f64], tok: u32) -> f64 {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
    logits[tok as usize] - lse
}

/// Per-token log-probabilities of `ids` under an AR model, by its full causal forward (the
/// reference for scoring): entry `i` is `log p(ids[i + 1] | ids[..=i])`.
pub fn token_logprobs(model: &Ddit, ids: &[u32]) -> Result<Vec<f64>> {
    ensure!(ids.len() >= 2, "scoring needs at least two tokens");
    let _ng = no_grad();
    let x = Tensor::from_slice(ids, &[1, ids.len()], model.device())?;
    let lg = model.forward_train(&x)?.to_vec_f64()?;
    let v = model.cfg.vocab_size;
    Ok((0..ids.len() - 1)
        .map(|i| log_prob(&lg[i * v..(i + 1) * v], ids[i + 1]))
        .collect())
}
