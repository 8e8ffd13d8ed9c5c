//! Quality evaluation of a teacher / student pair (issue 5, `kfrun eval`): the paper's
//! axes made precise (KFORCING.md section 8).
//!
//! Prompts: the first `prompt_len` tokens of validation documents (documents shorter than
//! that are skipped). Every configuration generates exactly `max_new` tokens per prompt (no
//! EOS stop) with the same seed, so row `b` uses noise stream `b` and generated token `j` the
//! uniform `noise_u(seed, b, j)` — AR and PFLM consume the same `u` for the same position.
//! Configurations: AR at `tau`, and the student at every `K = 1..=k` and every frequency
//! penalty of the sweep.
//!
//! Metrics per configuration:
//! - generative perplexity: `exp` of the teacher's mean NLL (at tau = 1) of the generated
//!   tokens given the prompt and the tokens before them;
//! - unigram entropy per sample (nats): the entropy of the token histogram of one
//!   generated continuation; mean and standard deviation over prompts;
//! - push-forward agreement (student only): for each K-window of the student's output,
//!   the teacher rolls out the window itself from the same context with the same `u`
//!   (its sequential inverse-CDF samples, feeding its own tokens); `agree_tokens` is the
//!   fraction of positions where the student's token equals the teacher's, `agree_windows`
//!   the fraction of windows where all of them do. For K = 1 this is exactly the stage-1
//!   target of distillation;
//! - judge perplexity (with a [`Judge`]: `kfrun eval --judge`): an independent model with its
//!   own tokenizer scores the text, as the paper scores with GPT-2-Large. Each prompt and its
//!   continuation are detokenised, retokenised with the judge's tokenizer (prompt and
//!   continuation separately, so the scored tokens are exactly the continuation's), and the
//!   judge's mean NLL per judge token of the continuation is exponentiated.

use crate::data::TokenShard;
use crate::ddit::Ddit;
use crate::generate::{forbid_tail, full_pass, generate, noise_u, GenerateOptions, Generated};
use crate::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
use crate::tokenizer::Tokenizer;
use anyhow::{ensure, Context, Result};
use kf_engine::{no_grad, Device, Tensor};
use kf_ops::sampling::sample_inverse_cdf;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The teacher, and a student for its generation: on any one device (the ops dispatch on
/// it: `kfrun eval --device`). Sampling for the agreement rollouts and all metrics stay on
/// the host.
pub struct Models<'a> {
    pub teacher: &'a Ddit,
    pub student: Option<&'a Pflm>,
}

impl Models<'_> {
    fn generate_ar(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Generated> {
        generate(self.teacher, prompts, opts, |_, _| Ok(()))
    }
    fn generate_pflm(&self, prompts: &[Vec<u32>], opts: &PflmGenerateOptions) -> Result<Generated> {
        let student = self
            .student
            .ok_or_else(|| anyhow::anyhow!("eval: no student to generate with"))?;
        generate_pflm(student, prompts, opts, |_, _| Ok(()))
    }
    /// The teacher's logits `[B, T, V]` (row-major f32) of equal-length rows at positions
    /// `0..T`, causal.
    fn teacher_logits(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let _ng = no_grad();
        let shape = [rows.len(), rows[0].len()];
        let ids = Tensor::from_vec(rows.concat(), &shape, self.teacher.device())?;
        self.teacher.forward_train(&ids)?.to_vec::<f32>()
    }
    /// The teacher's logits `[B, V]` of the last position of each equal-length row.
    fn teacher_last_logits(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>> {
        let _ng = no_grad();
        full_pass(self.teacher, rows, &vec![0; rows.len()], &[], None)?.to_vec::<f32>()
    }
}

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub n_prompts: usize,
    pub prompt_len: usize,
    pub max_new: usize,
    pub seed: u64,
    /// Temperature of AR sampling, fed to the student's noise encoder and used by the
    /// teacher's rollout for the agreement.
    pub tau: f64,
    /// Frequency penalties of the student sweep (0 = none).
    pub penalties: Vec<f64>,
    /// Ids `>= vocab_limit` are never produced (the tokenizer's vocabulary).
    pub vocab_limit: Option<usize>,
    /// Student windows to evaluate (default: 1..=k).
    pub ks: Option<Vec<usize>>,
}

/// One configuration's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRow {
    /// "ar" or "pflm".
    pub mode: String,
    /// Tokens per pass (1 for AR).
    pub k: usize,
    pub freq_penalty: f64,
    pub gen_ppl: f64,
    /// Mean teacher NLL per generated token (nats).
    pub gen_nll: f64,
    pub entropy_mean: f64,
    pub entropy_std: f64,
    pub agree_tokens: Option<f64>,
    pub agree_windows: Option<f64>,
    /// The judge's perplexity of the continuations (per judge token), with a [`Judge`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_ppl: Option<f64>,
    /// Judge tokens scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_tokens: Option<usize>,
    /// Generated tokens evaluated.
    pub tokens: usize,
    /// Forward passes of the generation (prefill included).
    pub passes: usize,
    /// Wall time of the generation.
    pub gen_secs: f64,
}

/// Prompts from text, one per line (blank lines skipped): the first `n` lines, each tokenised
/// and cut to its first `len` tokens. A line with fewer tokens is an error naming it (its
/// line number and token count), so every prompt has the same length, as the evaluation
/// needs.
pub fn text_prompts(text: &str, tok: &Tokenizer, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    ensure!(
        n >= 1 && len >= 1,
        "prompts: need at least one prompt of at least one token"
    );
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() == n {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let ids = tok
            .encode(line)
            .with_context(|| format!("line {}", i + 1))?;
        ensure!(
            ids.len() >= len,
            "line {} has {} tokens, fewer than the prompt length {len} (lower --prompt-len or lengthen the line)",
            i + 1,
            ids.len()
        );
        out.push(ids[..len].to_vec());
    }
    ensure!(!out.is_empty(), "no prompts: every line is blank");
    Ok(out)
}

/// The first `len` tokens of each of the first `n` documents of a shard (documents end
/// with `eos`) that have at least `len` tokens.
pub fn document_prompts(
    shard: &TokenShard,
    eos: u32,
    n: usize,
    len: usize,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        n >= 1 && len >= 1,
        "prompts: need at least one prompt of at least one token"
    );
    let all = shard.to_vec();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &t) in all.iter().enumerate() {
        if t == eos {
            if i - start >= len {
                out.push(all[start..start + len].to_vec());
                if out.len() == n {
                    break;
                }
            }
            start = i + 1;
        }
    }
    ensure!(
        !out.is_empty(),
        "{} holds no document of at least {len} tokens",
        shard.path().display()
    );
    Ok(out)
}

/// Teacher NLL (tau = 1) of each generated token: rows `prompt ++ gen` of equal length.
fn teacher_nll(be: &Models, prompts: &[Vec<u32>], gens: &[Vec<u32>]) -> Result<Vec<f64>> {
    let mut nll = Vec::new();
    // a few rows at a time: the logits are [rows, T, V]
    for (ps, gs) in prompts.chunks(8).zip(gens.chunks(8)) {
        let rows: Vec<Vec<u32>> = ps
            .iter()
            .zip(gs)
            .map(|(p, g)| p.iter().chain(g).copied().collect())
            .collect();
        let t = rows[0].len();
        ensure!(
            rows.iter().all(|r| r.len() == t),
            "eval: rows of different lengths"
        );
        let lv = be.teacher_logits(&rows)?;
        let v = lv.len() / (rows.len() * t);
        for (r, (p, g)) in ps.iter().zip(gs).enumerate() {
            for (j, &tok) in g.iter().enumerate() {
                let pos = p.len() - 1 + j;
                let row = &lv[(r * t + pos) * v..(r * t + pos + 1) * v];
                nll.push(log_sum_exp(row) - row[tok as usize] as f64);
            }
        }
    }
    Ok(nll)
}

/// An independent scorer (module docs): a model and its own tokenizer, and the tokenizer
/// that decodes the evaluated models' ids.
pub struct Judge<'a> {
    pub model: &'a Ddit,
    pub tokenizer: &'a Tokenizer,
    /// The teacher's and student's tokenizer.
    pub source: &'a Tokenizer,
}

impl Judge<'_> {
    /// The judge's ids of one prompt and its continuation: both detokenised together (a
    /// character split across the boundary stays whole), the continuation's text is what
    /// follows the prompt's text, and each part is retokenised on its own.
    fn retokenise(&self, prompt: &[u32], gen: &[u32]) -> Result<(Vec<u32>, Vec<u32>)> {
        let ptxt = self.source.decode(prompt)?;
        let full = self.source.decode(&[prompt, gen].concat())?;
        let gtxt = match full.strip_prefix(ptxt.as_str()) {
            Some(rest) => rest.to_string(),
            None => self.source.decode(gen)?,
        };
        Ok((self.tokenizer.encode(&ptxt)?, self.tokenizer.encode(&gtxt)?))
    }

    /// (summed NLL, judge tokens) of the continuations. Rows of a chunk are padded on the
    /// right: under the causal mask padding never reaches a scored position.
    pub fn nll(&self, prompts: &[Vec<u32>], gens: &[Vec<u32>]) -> Result<(f64, usize)> {
        let _ng = no_grad();
        let max_len = self.model.cfg.max_seq_len;
        let mut rows = Vec::with_capacity(prompts.len());
        for (p, g) in prompts.iter().zip(gens) {
            let (jp, jg) = self.retokenise(p, g)?;
            ensure!(
                !jp.is_empty(),
                "judge: a prompt is empty in the judge's tokens"
            );
            ensure!(
                jp.len() + jg.len() <= max_len,
                "judge: a sample is {} judge tokens, more than the judge's max_seq_len {max_len}",
                jp.len() + jg.len()
            );
            rows.push((jp, jg));
        }
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in rows.chunks(8) {
            let t = chunk
                .iter()
                .map(|(p, g)| p.len() + g.len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::with_capacity(chunk.len() * t);
            for (p, g) in chunk {
                ids.extend(p.iter().chain(g));
                ids.resize(ids.len() + t - p.len() - g.len(), 0);
            }
            let x = Tensor::from_vec(ids, &[chunk.len(), t], self.model.device())?;
            let lv = self.model.forward_train(&x)?.to_vec::<f32>()?;
            let v = lv.len() / (chunk.len() * t);
            for (r, (p, g)) in chunk.iter().enumerate() {
                for (j, &tok) in g.iter().enumerate() {
                    let pos = p.len() - 1 + j;
                    let row = &lv[(r * t + pos) * v..(r * t + pos + 1) * v];
                    sum += log_sum_exp(row) - row[tok as usize] as f64;
                    n += 1;
                }
            }
        }
        Ok((sum, n))
    }
}

/// `ln(sum(exp(row)))` in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Unigram entropy (nats) of a token sequence's histogram.
pub fn unigram_entropy(tokens: &[u32]) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    // ordered, so the sum runs in one order and a rerun gives the same bits
    let mut c = std::collections::BTreeMap::<u32, usize>::new();
    for &t in tokens {
        *c.entry(t).or_default() += 1;
    }
    let n = tokens.len() as f64;
    c.values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.ln()
        })
        .sum()
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let m = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// The teacher's own K-token rollouts from every window start of the student's outputs
/// (module docs); returns (matching tokens, windows all matching, windows).
pub fn agreement(
    be: &Models,
    vocab_size: usize,
    prompts: &[Vec<u32>],
    gens: &[Vec<u32>],
    k: usize,
    opts: &EvalOptions,
) -> Result<(usize, usize, usize)> {
    let _ng = no_grad();
    let nb = prompts.len();
    let g = gens[0].len();
    let (mut tok_ok, mut win_ok, mut wins) = (0, 0, 0);
    let mut w0 = 0;
    while w0 < g {
        let kw = k.min(g - w0);
        let mut rows: Vec<Vec<u32>> = prompts
            .iter()
            .zip(gens)
            .map(|(p, s)| p.iter().chain(&s[..w0]).copied().collect())
            .collect();
        let mut all = vec![true; nb];
        for i in 0..kw {
            let mut logits = Tensor::from_vec(
                be.teacher_last_logits(&rows)?,
                &[nb, vocab_size],
                Device::Cpu,
            )?;
            if let Some(l) = opts.vocab_limit.filter(|&l| l < vocab_size) {
                logits = forbid_tail(logits, l)?;
            }
            let u: Vec<f64> = (0..nb)
                .map(|b| noise_u(opts.seed, b as u64, (w0 + i) as u64))
                .collect();
            let ut = Tensor::from_vec(u, &[nb], Device::Cpu)?;
            let toks = sample_inverse_cdf(&logits, &ut, opts.tau)?.to_vec::<u32>()?;
            for b in 0..nb {
                let same = toks[b] == gens[b][w0 + i];
                tok_ok += same as usize;
                all[b] &= same;
                rows[b].push(toks[b]);
            }
        }
        win_ok += all.iter().filter(|&&a| a).count();
        wins += nb;
        w0 += kw;
    }
    Ok((tok_ok, win_ok, wins))
}

#[allow(clippy::too_many_arguments)]
fn row(
    be: &Models,
    judge: Option<&Judge>,
    prompts: &[Vec<u32>],
    gens: &[Vec<u32>],
    mode: &str,
    k: usize,
    penalty: f64,
    passes: usize,
    secs: f64,
) -> Result<EvalRow> {
    let nll = teacher_nll(be, prompts, gens)?;
    let gen_nll = nll.iter().sum::<f64>() / nll.len().max(1) as f64;
    let ent: Vec<f64> = gens.iter().map(|g| unigram_entropy(g)).collect();
    let (entropy_mean, entropy_std) = mean_std(&ent);
    let judged = judge.map(|j| j.nll(prompts, gens)).transpose()?;
    Ok(EvalRow {
        mode: mode.into(),
        k,
        freq_penalty: penalty,
        gen_ppl: gen_nll.exp(),
        gen_nll,
        entropy_mean,
        entropy_std,
        agree_tokens: None,
        agree_windows: None,
        judge_ppl: judged.map(|(s, n)| (s / n.max(1) as f64).exp()),
        judge_tokens: judged.map(|(_, n)| n),
        tokens: nll.len(),
        passes,
        gen_secs: secs,
    })
}

/// Evaluates AR and every student configuration (module docs), the models on any one device,
/// and scores each with `judge` when given. `on_row` sees each row as it is done (progress).
pub fn evaluate(
    teacher: &Ddit,
    student: &Pflm,
    judge: Option<&Judge>,
    prompts: &[Vec<u32>],
    opts: &EvalOptions,
    on_row: &mut dyn FnMut(&EvalRow),
) -> Result<Vec<EvalRow>> {
    let be = &Models {
        teacher,
        student: Some(student),
    };
    ensure!(
        teacher.cfg.vocab_size == student.cfg().vocab_size,
        "teacher and student vocabularies differ ({} vs {})",
        teacher.cfg.vocab_size,
        student.cfg().vocab_size
    );
    ensure!(!prompts.is_empty(), "eval: no prompts");
    let plen = prompts[0].len();
    ensure!(
        prompts.iter().all(|p| p.len() == plen),
        "eval: prompts must have equal lengths"
    );
    ensure!(opts.max_new >= 1, "eval: max_new must be at least 1");
    let ks = opts.ks.clone().unwrap_or_else(|| (1..=student.k).collect());
    for &k in &ks {
        ensure!(
            k >= 1 && k <= student.k,
            "eval: K = {k} is outside 1..={} (the student's k)",
            student.k
        );
    }
    let base = GenerateOptions {
        max_new: opts.max_new,
        tau: opts.tau,
        seed: opts.seed,
        first_stream: 0,
        eos: None,
        use_cache: true,
        vocab_limit: opts.vocab_limit,
    };
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let g = be.generate_ar(prompts, &base)?;
    let r = row(
        be,
        judge,
        prompts,
        &g.tokens,
        "ar",
        1,
        0.0,
        g.passes,
        t0.elapsed().as_secs_f64(),
    )?;
    on_row(&r);
    rows.push(r);
    for &k in &ks {
        for &p in &opts.penalties {
            let t0 = Instant::now();
            let o = PflmGenerateOptions {
                base: base.clone(),
                k,
                freq_penalty: p,
            };
            let g = be.generate_pflm(prompts, &o)?;
            let secs = t0.elapsed().as_secs_f64();
            let mut r = row(be, judge, prompts, &g.tokens, "pflm", k, p, g.passes, secs)?;
            let vs = teacher.cfg.vocab_size;
            let (t, w, n) = agreement(be, vs, prompts, &g.tokens, k, opts)?;
            r.agree_tokens = Some(t as f64 / r.tokens.max(1) as f64);
            r.agree_windows = Some(w as f64 / n.max(1) as f64);
            on_row(&r);
            rows.push(r);
        }
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[EvalRow]) -> String {
    let judged = rows.iter().any(|r| r.judge_ppl.is_some());
    let (jh, jl) = if judged {
        (" judge ppl |", "---:|")
    } else {
        ("", "")
    };
    let mut s = format!(
        "| mode | K | penalty | gen. ppl |{jh} entropy (mean ± sd) | agree tokens | agree windows | passes |\n|---|---:|---:|---:|{jl}---:|---:|---:|---:|\n",
    );
    let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.3}"));
    for r in rows {
        let jc = match (judged, r.judge_ppl) {
            (false, _) => String::new(),
            (true, Some(j)) => format!(" {j:.2} |"),
            (true, None) => " — |".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} |{jc} {:.3} ± {:.3} | {} | {} | {} |\n",
            r.mode,
            r.k,
            r.freq_penalty,
            r.gen_ppl,
            r.entropy_mean,
            r.entropy_std,
            f(r.agree_tokens),
            f(r.agree_windows),
            r.passes
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_histograms() {
        assert_eq!(unigram_entropy(&[]), 0.0);
        assert_eq!(unigram_entropy(&[3, 3, 3]), 0.0);
        assert!((unigram_entropy(&[1, 2]) - 2f64.ln()).abs() < 1e-12);
        assert!((unigram_entropy(&[1, 2, 3, 4]) - 4f64.ln()).abs() < 1e-12);
        let (m, s) = mean_std(&[1.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
    }
}
