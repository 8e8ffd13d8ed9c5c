//! Progressive self-forcing distillation (KFORCING.md section 6) as a library: one stage
//! is a [`DistillTask`] (a [`TrainTask`] for the shared [`drive`] loop), and
//! [`distill_stage`] runs one stage from a teacher directory to a student directory.
//!
//! # One stage
//! - stage 1 (AR teacher -> k = 1): target = `token(p_T(· | x_<=t), u)` through the one
//!   inverse-CDF map ([`stage1_targets`]);
//! - stage k -> 2k (previous student as teacher): target = the teacher's own two-step
//!   rollout `[F1 | F2]` ([`Pflm::rollout_double`]) for the same 2k noises.
//!
//! The student sees the same noises as hints ([`Pflm::forward_staircase`]) and is trained
//! with the cross-entropy of its logits `[B, N, k, V]` against the targets, averaged over
//! every window (context position `t = 0..N-1`) and offset `i = 1..k`.
//! Extras logged per step: `loss_o{i}` and `acc_o{i}` (per offset), `acc` (all tokens),
//! `acc_window` (the rate at which all k tokens of a window are right). The student's
//! token is the argmax of its logits (no frequency penalty), as at inference.
//!
//! # Contexts and positions
//! Contexts are the first `N = ctx_len` tokens of [`WindowSampler`] windows (training) and
//! of [`SequentialWindows`] on the validation shard (evaluation). Hint `i` of the window
//! after position `t` sits at RoPE position `t + i <= N - 1 + k`, so `N + k <= max_seq_len`
//! is required.
//!
//! # Noise stream layout (deterministic given (seed, step, micro))
//! Update `s` draws one sampler batch of `R = batch_size * grad_accum` windows; micro-batch
//! `m` uses rows `r = m * batch_size .. (m + 1) * batch_size`. The noise of (row `r`,
//! noise window `j < M` (`windows`, default 1), context position `t`, offset `i` (0-based,
//! `i < k_student`)) of update `s` is
//! `Philox(seed, NOISE_STREAM).uniform_f64((((s * R + r) * M + j) * N + t) * k + i)`;
//! validation window `w` uses `Philox(seed, EVAL_NOISE_STREAM)` at `(w * N + t) * k + i`
//! (fixed noises: evaluation is deterministic). The windows themselves come from
//! `WindowSampler(seed)` (its own stream), so the whole stage is a pure function of the
//! seed, the teacher and the data — the condition for exact resume.
//!
//! # Several noise windows per context (`windows` = M > 1)
//! Each context position opens M windows with independent noises, in M blocks of hints after
//! one copy of the context rows ([`Pflm::forward_staircase`] with `u [B, M, N, k]`): one
//! teacher pass (stage 1: the AR teacher's logits are computed once and inverted for each
//! block; a PFLM teacher rolls out each block) and one context pass serve M (context, u)
//! pairs. The loss averages over all of them. Validation always uses one window (M = 1), so
//! stages with different M are compared on the same pairs. The inversion variant has one
//! window per real continuation (M = 1).
//!
//! # Temperature
//! [`TauDist`] is the configured distribution of `tau` (a constant, default 1, or uniform on
//! a range per micro-batch, evaluated at its top);
//! `tau` is fed to the student's noise encoder and divides the AR teacher's logits.
//!
//! # Noise-inversion variant (6.3)
//! [`Variant::Inversion`]: the teacher is always the AR teacher; the targets are the real
//! next k tokens `x_{t+1..t+k}` of the window and the noises are the teacher's inverse of
//! them (`u = CDF(x-1) + (CDF(x) - CDF(x-1)) r`, `r` from the noise stream), each on the true
//! prefix — one teacher pass over `N + k - 1` tokens. Where a real token's probability is
//! too small for the f64 running sum to give it an interval (no `u` samples it), the pair
//! becomes `(r, token(p, r))` instead, so every (u, target) pair stays consistent with the map.
//!
//! # Resume
//! A stage's checkpoint records its config and the SHA-256 of the teacher's weights; a
//! resumed stage must see the same config, data and teacher. The chain of stages
//! (AR -> 1 -> 2 -> 4) is [`crate::distill_chain`].

use crate::checkpoint;
use crate::data::{SequentialWindows, TokenData, TokenShard, WindowBatch, WindowSampler};
use crate::ddit::Ddit;
use crate::pflm::{stage1_targets, NoiseInit, Pflm};
use crate::train::TrainerState;
use crate::train::{
    drive, session, Event, Extras, OptimConfig, Outcome, ResumeFrom, RunSpec, TrainTask,
};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::rng::Philox;
use kf_engine::{DType, Device, Tensor};
use kf_ops::argmax::argmax_penalty;
use kf_ops::cross_entropy::cross_entropy;
use kf_ops::sampling::{inverse_cdf_noise_row, inverse_cdf_row};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Philox stream of the training noises ("DNOI").
pub const NOISE_STREAM: u64 = 0x444E_4F49;
/// Philox stream of the validation noises ("DEVL").
pub const EVAL_NOISE_STREAM: u64 = 0x4445_564C;

/// The distribution `tau` is drawn from during training: a constant (the default, 1), or
/// uniform on `[lo, hi]` per micro-batch (Philox stream [`TAU_STREAM`] of the seed, counter
/// = the update and row; evaluation uses `hi`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TauDist {
    Const(f64),
    Uniform { lo: f64, hi: f64 },
}

/// Philox stream of the training temperatures ("DTAU").
pub const TAU_STREAM: u64 = 0x4454_4155;

impl Default for TauDist {
    fn default() -> Self {
        TauDist::Const(1.0)
    }
}

impl TauDist {
    /// `tau` of the micro-batch starting at sequence `row` of update `step`.
    pub fn sample(&self, seed: u64, step: u64, row: usize) -> f64 {
        match *self {
            TauDist::Const(t) => t,
            TauDist::Uniform { lo, hi } => {
                let u = Philox::new(seed, TAU_STREAM)
                    .uniform_f64(step.wrapping_mul(1 << 20).wrapping_add(row as u64));
                lo + (hi - lo) * u
            }
        }
    }
    /// The value used for evaluation.
    pub fn eval_value(&self) -> f64 {
        match *self {
            TauDist::Const(t) => t,
            TauDist::Uniform { hi, .. } => hi,
        }
    }
    /// Errors unless every value it can draw is a usable temperature.
    pub fn validate(&self) -> Result<()> {
        let ok = |t: f64| t.is_finite() && t > 0.0;
        match *self {
            TauDist::Const(t) => ensure!(ok(t), "tau.const = {t}: must be finite and > 0"),
            TauDist::Uniform { lo, hi } => ensure!(
                ok(lo) && ok(hi) && lo <= hi,
                "tau.uniform = [{lo}, {hi}]: need 0 < lo <= hi, both finite"
            ),
        }
        Ok(())
    }
}

/// Where a stage's targets come from (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Stage 1 from the AR teacher's inverse CDF, then k -> 2k from the previous student's
    /// own two-step rollout (KFORCING.md 6.1-6.2).
    #[default]
    Rollout,
    /// Real next tokens with the AR teacher's inverse noises (6.3).
    Inversion,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Rollout => "rollout",
            Variant::Inversion => "inversion",
        })
    }
}

/// One distillation stage's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Optimiser and schedule (grad_accum included).
    pub optim: OptimConfig,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Context length N (every position 0..N-1 opens a window); `N + k <= max_seq_len`.
    pub ctx_len: usize,
    /// Validation contexts (the first ones of the validation shard, in order).
    pub eval_windows: usize,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    /// Seeds the windows, the noises and (stage 1) the noise encoder.
    pub seed: u64,
    #[serde(default)]
    pub tau: TauDist,
    #[serde(default)]
    pub variant: Variant,
    /// How a stage-1 student's fresh noise encoder starts.
    #[serde(default)]
    pub noise_init: NoiseInit,
    /// Noise windows per context position in training (module docs); 1 is the paper's.
    #[serde(default = "one_window", skip_serializing_if = "is_one_window")]
    pub windows: usize,
}

fn one_window() -> usize {
    1
}

fn is_one_window(m: &usize) -> bool {
    *m == 1
}

/// The teacher of a stage.
pub enum DistillTeacher {
    /// Stage 1: the AR teacher (student k = 1).
    Ar(Ddit),
    /// Stage k -> 2k: the previous stage's student, a separate copy (student k = 2 teacher k).
    Pflm(Pflm),
    /// The noise-inversion variant: the AR teacher inverts the real next tokens (any k).
    Inversion(Ddit),
}

impl DistillTeacher {
    /// Extra tokens a window needs past its `N` context tokens (the inversion variant reads
    /// the real next `k` tokens; the others need none).
    pub fn lookahead(&self, k: usize) -> usize {
        match self {
            DistillTeacher::Inversion(_) => k,
            _ => 0,
        }
    }

    /// Where the teacher's parameters are.
    pub fn device(&self) -> Device {
        match self {
            DistillTeacher::Ar(t) | DistillTeacher::Inversion(t) => t.device(),
            DistillTeacher::Pflm(t) => t.device(),
        }
    }

    /// A copy with the teacher on `device`.
    pub fn to_device(&self, device: Device) -> Result<DistillTeacher> {
        Ok(match self {
            DistillTeacher::Ar(t) => DistillTeacher::Ar(t.to_device(device)?),
            DistillTeacher::Inversion(t) => DistillTeacher::Inversion(t.to_device(device)?),
            DistillTeacher::Pflm(t) => DistillTeacher::Pflm(t.to_device(device)?),
        })
    }

    /// A training batch from `rows` windows of `w >= N + lookahead` tokens each (`tokens`,
    /// row major) and uniforms `noise [B, N, k]`: (context u32 `[B, N]`, the student's
    /// noises `[B, N, k]` f64, targets u32 `[B, N, k]`).
    pub fn batch(
        &self,
        tokens: &[u32],
        rows: usize,
        w: usize,
        n: usize,
        noise: &Tensor,
        tau: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let k = noise.dim(noise.rank().max(1) - 1)?;
        ensure!(
            w >= n + self.lookahead(k) && tokens.len() == rows * w,
            "distillation batch: {} tokens for {rows} windows of {w} (N {n}, k {k})",
            tokens.len()
        );
        let ctx: Vec<u32> = (0..rows)
            .flat_map(|r| tokens[r * w..r * w + n].iter().copied())
            .collect();
        let ctx = Tensor::from_vec(ctx, &[rows, n], self.device())?;
        match self {
            DistillTeacher::Inversion(t) => {
                ensure!(
                    noise.rank() == 3,
                    "the inversion variant has one noise window per context position"
                );
                let (u, tg) = inversion_pairs(t, tokens, rows, w, n, k, noise, tau)?;
                Ok((ctx, u, tg))
            }
            _ => {
                let tg = self.targets(&ctx, noise, tau)?;
                Ok((ctx, noise.clone(), tg))
            }
        }
    }

    /// Targets u32 `[B, N, k_student]` for contexts `[B, N]` and noises `[B, N, k_student]`
    /// (the rollout variant; the inversion variant makes its pairs in [`Self::batch`]); with
    /// noises `[B, M, N, k]` (M windows per position), targets `[B, M, N, k]`.
    pub fn targets(&self, ctx: &Tensor, u: &Tensor, tau: f64) -> Result<Tensor> {
        let _ng = kf_engine::no_grad();
        if u.rank() == 4 {
            return self.targets_per_window(ctx, u, tau);
        }
        let (b, n, kk) = (u.dim(0)?, u.dim(1)?, u.dim(2)?);
        match self {
            DistillTeacher::Inversion(_) => {
                bail!("the inversion variant's targets are the real tokens: use batch()")
            }
            DistillTeacher::Ar(t) => {
                ensure!(
                    kk == 1,
                    "an AR teacher distils a k = 1 student, not k = {kk}"
                );
                stage1_targets(t, ctx, &u.reshape(&[b, n])?, tau)?.reshape(&[b, n, 1])
            }
            DistillTeacher::Pflm(t) => {
                ensure!(
                    kk == 2 * t.k,
                    "a k = {} teacher distils a k = {} student, not k = {kk}",
                    t.k,
                    2 * t.k
                );
                t.rollout_double(ctx, u, &[tau])
            }
        }
    }
}

impl DistillTeacher {
    /// [`Self::targets`] for noises `[B, M, N, k]`: the AR teacher's logits once, inverted for
    /// every window ([`stage1_targets`]); a PFLM teacher's rollout per window. `[B, M, N, k]`.
    fn targets_per_window(&self, ctx: &Tensor, u: &Tensor, tau: f64) -> Result<Tensor> {
        let (b, m, n, k) = (u.dim(0)?, u.dim(1)?, u.dim(2)?, u.dim(3)?);
        if let DistillTeacher::Ar(t) = self {
            ensure!(k == 1, "an AR teacher distils a k = 1 student, not k = {k}");
            return stage1_targets(t, ctx, &u.reshape(&[b, m, n])?, tau)?.reshape(&[b, m, n, 1]);
        }
        let per = (0..m)
            .map(|j| {
                let uj = u.narrow(1, j, 1)?.reshape(&[b, n, k])?;
                crate::generate::tokens_to_host(&self.targets(ctx, &uj, tau)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // [M][B, N, k] -> [B, M, N, k]
        let row = n * k;
        let out: Vec<u32> = (0..b)
            .flat_map(|r| {
                per.iter()
                    .flat_map(move |w| w[r * row..(r + 1) * row].iter().copied())
            })
            .collect();
        Tensor::from_vec(out, &[b, m, n, k], self.device())
    }
}

/// The noise-inversion pairs (module docs): windows of `w >= N + k` real tokens, uniforms
/// `r [B, N, k]` -> (u f64 `[B, N, k]`, targets u32 `[B, N, k]`). Target (t, i) (i = 1..k) is
/// token `t + i` of the window; its `u` inverts it under the teacher's `p(· | x_<=t+i-1)`.
#[allow(clippy::too_many_arguments)]
fn inversion_pairs(
    teacher: &Ddit,
    tokens: &[u32],
    rows: usize,
    w: usize,
    n: usize,
    k: usize,
    r: &Tensor,
    tau: f64,
) -> Result<(Tensor, Tensor)> {
    let _ng = kf_engine::no_grad();
    let seq = inversion_prefixes(tokens, rows, w, n, k);
    let m = n + k - 1;
    let logits = teacher
        .forward_train(&Tensor::from_vec(seq, &[rows, m], teacher.device())?)?
        .to_dtype(DType::F32)?
        .to_vec::<f32>()?;
    let (u, tg) = inversion_pairs_from_logits(
        &logits,
        teacher.cfg.vocab_size,
        tokens,
        rows,
        w,
        n,
        k,
        r,
        tau,
    )?;
    Ok((u, tg.to_device(teacher.device())?))
}

/// The teacher's input of the inversion pairs: the first `N + k - 1` tokens of each of
/// `rows` windows of `w` tokens, u32 `[rows, N + k - 1]` row-major.
pub(crate) fn inversion_prefixes(
    tokens: &[u32],
    rows: usize,
    w: usize,
    n: usize,
    k: usize,
) -> Vec<u32> {
    let m = n + k - 1; // teacher positions 0..n+k-2
    (0..rows)
        .flat_map(|b| tokens[b * w..b * w + m].iter().copied())
        .collect()
}

/// [`inversion_pairs`] from the teacher's f32 logits `lg [rows, N + k - 1, V]` of
/// [`inversion_prefixes`] (computed on any device).
#[allow(clippy::too_many_arguments)]
pub(crate) fn inversion_pairs_from_logits(
    lg: &[f32],
    v: usize,
    tokens: &[u32],
    rows: usize,
    w: usize,
    n: usize,
    k: usize,
    r: &Tensor,
    tau: f64,
) -> Result<(Tensor, Tensor)> {
    let m = n + k - 1;
    ensure!(
        lg.len() == rows * m * v,
        "inversion pairs: {} logits for {rows} x {m} rows of {v}",
        lg.len()
    );
    let rv = r.to_vec_f64()?;
    let (mut u, mut tg) = (vec![0f64; rows * n * k], vec![0u32; rows * n * k]);
    for b in 0..rows {
        for t in 0..n {
            for i in 0..k {
                let j = t + i; // the teacher row predicting token t + i + 1
                let row = &lg[(b * m + j) * v..(b * m + j + 1) * v];
                let x = tokens[b * w + j + 1];
                let at = (b * n + t) * k + i;
                let ri = rv[at];
                match inverse_cdf_noise_row(row, x, ri, tau) {
                    Ok(ui) => {
                        u[at] = ui;
                        tg[at] = x;
                    }
                    Err(_) => {
                        // no u maps to x: keep the pair consistent with the map instead
                        let ui = ri.clamp(f64::MIN_POSITIVE, 1.0 - f64::EPSILON);
                        u[at] = ui;
                        tg[at] = inverse_cdf_row(row, ui, tau)?;
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(u, &[rows, n, k], Device::Cpu)?,
        Tensor::from_vec(tg, &[rows, n, k], Device::Cpu)?,
    ))
}

/// Agreement and loss of the student against its teacher's targets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DistillMetrics {
    /// Mean cross-entropy (nats per target token).
    pub loss: f64,
    /// Token agreement (argmax == target) over all windows and offsets.
    pub acc: f64,
    /// Rate at which all k tokens of a window are right.
    pub acc_window: f64,
    pub loss_per_offset: Vec<f64>,
    pub acc_per_offset: Vec<f64>,
    /// Target tokens counted.
    pub tokens: usize,
}

/// Running sums behind [`DistillMetrics`].
#[derive(Default)]
pub(crate) struct Sums {
    k: usize,
    loss: Vec<f64>,
    right: Vec<usize>,
    windows: usize,
    windows_right: usize,
}

impl Sums {
    pub(crate) fn new(k: usize) -> Sums {
        Sums {
            k,
            loss: vec![0.0; k],
            right: vec![0; k],
            ..Default::default()
        }
    }
    /// `row_loss` and `hit` per target, in `[window][offset]` order.
    pub(crate) fn add(&mut self, row_loss: &[f64], hit: &[bool]) {
        for (l, h) in row_loss.chunks(self.k).zip(hit.chunks(self.k)) {
            for i in 0..self.k {
                self.loss[i] += l[i];
                self.right[i] += h[i] as usize;
            }
            self.windows += 1;
            self.windows_right += h.iter().all(|&x| x) as usize;
        }
    }
    pub(crate) fn finish(&self) -> DistillMetrics {
        let w = self.windows.max(1) as f64;
        let loss_per_offset: Vec<f64> = self.loss.iter().map(|l| l / w).collect();
        let acc_per_offset: Vec<f64> = self.right.iter().map(|&r| r as f64 / w).collect();
        DistillMetrics {
            loss: loss_per_offset.iter().sum::<f64>() / self.k as f64,
            acc: acc_per_offset.iter().sum::<f64>() / self.k as f64,
            acc_window: self.windows_right as f64 / w,
            loss_per_offset,
            acc_per_offset,
            tokens: self.windows * self.k,
        }
    }
}

/// One distillation stage as a [`TrainTask`] (module docs).
pub struct DistillTask {
    pub student: Pflm,
    pub teacher: DistillTeacher,
    cfg: DistillConfig,
    sampler: WindowSampler,
    val: Arc<TokenShard>,
    tokenizer: Option<PathBuf>,
    cached: Option<(u64, WindowBatch)>,
    /// The metrics of the last [`TrainTask::eval`].
    pub last_eval: Option<DistillMetrics>,
}

impl DistillTask {
    /// `student` should be trainable; its `k` must be 1 (AR teacher) or twice the teacher's.
    pub fn new(
        student: Pflm,
        teacher: DistillTeacher,
        data: &TokenData,
        cfg: &DistillConfig,
        tokenizer: Option<PathBuf>,
    ) -> Result<DistillTask> {
        let k = student.k;
        match &teacher {
            DistillTeacher::Ar(t) => {
                ensure!(
                    k == 1,
                    "stage 1 (AR teacher) trains a k = 1 student, got k = {k}"
                );
                ensure!(
                    t.cfg.vocab_size == student.cfg().vocab_size,
                    "teacher and student vocabularies differ"
                );
            }
            DistillTeacher::Pflm(t) => {
                ensure!(
                    k == 2 * t.k,
                    "a k = {} teacher trains a k = {} student, got k = {k}",
                    t.k,
                    2 * t.k
                );
                ensure!(
                    t.cfg().vocab_size == student.cfg().vocab_size,
                    "teacher and student vocabularies differ"
                );
            }
            DistillTeacher::Inversion(t) => {
                ensure!(
                    t.cfg.vocab_size == student.cfg().vocab_size,
                    "teacher and student vocabularies differ"
                );
            }
        }
        let look = teacher.lookahead(k);
        ensure!(
            cfg.batch_size > 0 && cfg.ctx_len > 0,
            "batch_size and ctx_len must be positive"
        );
        ensure!(cfg.eval_windows > 0, "eval_windows must be at least 1");
        ensure!(
            cfg.windows >= 1,
            "windows (noise windows per context position) must be at least 1"
        );
        ensure!(
            cfg.windows == 1 || !matches!(teacher, DistillTeacher::Inversion(_)),
            "the inversion variant has one noise window per real continuation: windows must be 1, got {}",
            cfg.windows
        );
        let max = student.cfg().max_seq_len;
        ensure!(
            cfg.ctx_len.saturating_add(k) <= max,
            "ctx_len {} + k {k} exceeds the model's max_seq_len {max} (hint positions reach N - 1 + k)",
            cfg.ctx_len
        );
        cfg.optim.validate()?;
        // windows of N + lookahead + 1 tokens (the last one is unused)
        let sampler = WindowSampler::new(
            data.train.clone(),
            cfg.ctx_len + look,
            cfg.batch_size * cfg.optim.grad_accum,
            cfg.seed,
        )?;
        ensure!(
            data.val.len() > cfg.ctx_len + look,
            "validation shard {} holds {} tokens, too few for one window of {} (+1)",
            data.val.path().display(),
            data.val.len(),
            cfg.ctx_len + look
        );
        Ok(DistillTask {
            student,
            teacher,
            cfg: cfg.clone(),
            sampler,
            val: data.val.clone(),
            tokenizer,
            cached: None,
            last_eval: None,
        })
    }

    /// Noises `[rows, N, k]` from `stream`, starting at row index `row0`, or `[rows, M, N, k]`
    /// for `windows` = M > 1 (module docs).
    fn noises(&self, stream: u64, row0: u64, rows: usize, windows: usize) -> Result<Tensor> {
        let (n, k) = (self.cfg.ctx_len, self.student.k);
        let rng = Philox::new(self.cfg.seed, stream);
        let per = (windows * n * k) as u64;
        let v: Vec<f64> = (0..rows * windows * n * k)
            .map(|j| rng.uniform_f64(row0 * per + j as u64))
            .collect();
        match windows {
            1 => Tensor::from_vec(v, &[rows, n, k], Device::Cpu),
            m => Tensor::from_vec(v, &[rows, m, n, k], Device::Cpu),
        }
    }

    /// Loss on the tape plus per-target losses and hits for `rows` windows of `w` tokens
    /// (row major) with uniforms `noise [B, N, k]`.
    fn window_loss(
        &self,
        tokens: &[u32],
        rows: usize,
        w: usize,
        noise: &Tensor,
        tau: f64,
    ) -> Result<(Tensor, Vec<f64>, Vec<bool>)> {
        // noises [B, N, k], or [B, M, N, k] with M windows per context position
        let d = noise.shape().to_vec();
        let (b, n, k) = (d[0], d[d.len() - 2], d[d.len() - 1]);
        let windows: usize = d[1..d.len() - 2].iter().product();
        ensure!(b == rows, "distillation: {rows} windows but noises for {b}");
        let (ctx, u, targets) = self.teacher.batch(tokens, rows, w, n, noise, tau)?;
        let (ctx, u) = (&ctx, &u);
        let logits = self.student.forward_staircase(ctx, u, &[tau])?;
        let v = self.student.cfg().vocab_size;
        let m = b * windows * n * k;
        let tg = targets.reshape(&[m])?;
        let (loss, rows) = cross_entropy(&logits.reshape(&[m, v])?, &tg, None)?;
        let pred = {
            let _ng = kf_engine::no_grad();
            let counts = Tensor::zeros(&[b, v], DType::U32, self.student.device())?;
            argmax_penalty(&logits.detach().reshape(&[b, m / b, v])?, &counts, 0.0)?
        };
        let (pv, tv) = (crate::generate::tokens_to_host(&pred)?, tg.to_vec::<u32>()?);
        let hits = pv.iter().zip(&tv).map(|(a, b)| a == b).collect();
        Ok((loss, rows.to_vec_f64()?, hits))
    }

    /// Loss and agreement on the validation contexts with their fixed noises (no tape).
    pub fn evaluate(&self) -> Result<DistillMetrics> {
        let _ng = kf_engine::no_grad();
        let mut sums = Sums::new(self.student.k);
        self.for_each_eval(|mi| {
            let (_, rl, hits) = self.window_loss(&mi.tokens, mi.rows, mi.w, &mi.u, mi.tau)?;
            sums.add(&rl, &hits);
            Ok(())
        })?;
        Ok(sums.finish())
    }

    /// Calls `f` with every validation batch: its windows and fixed noises, in order.
    pub(crate) fn for_each_eval(&self, mut f: impl FnMut(MicroInputs) -> Result<()>) -> Result<()> {
        let tau = self.cfg.tau.eval_value();
        let mut w0 = 0u64;
        let look = self.teacher.lookahead(self.student.k);
        for wb in SequentialWindows::new(
            self.val.clone(),
            self.cfg.ctx_len + look,
            self.cfg.batch_size,
            Some(self.cfg.eval_windows),
        )? {
            let u = self.noises(EVAL_NOISE_STREAM, w0, wb.rows, 1)?;
            w0 += wb.rows as u64;
            let (rows, w) = (wb.rows, wb.seq_len + 1);
            f(MicroInputs {
                tokens: wb.tokens,
                rows,
                w,
                u,
                tau,
            })?;
        }
        Ok(())
    }

    /// The windows, noises and temperature of micro-batch `micro` of update `step` (0-based).
    pub(crate) fn micro_inputs(&mut self, step: u64, micro: usize) -> Result<MicroInputs> {
        if self.cached.as_ref().map(|c| c.0) != Some(step) {
            self.cached = Some((step, self.sampler.batch(step)));
        }
        let all = &self.cached.as_ref().unwrap().1;
        let bs = self.cfg.batch_size;
        let w = all.seq_len + 1;
        let tokens = all.tokens[micro * bs * w..(micro + 1) * bs * w].to_vec();
        let row0 = step * self.sampler.batch_size() as u64 + (micro * bs) as u64;
        let u = self.noises(NOISE_STREAM, row0, bs, self.cfg.windows)?;
        let tau = self.cfg.tau.sample(self.cfg.seed, step, micro * bs);
        Ok(MicroInputs {
            tokens,
            rows: bs,
            w,
            u,
            tau,
        })
    }

    /// The context length N.
    pub fn ctx_len(&self) -> usize {
        self.cfg.ctx_len
    }
}

/// One batch of windows with its noises: `rows` windows of `w` tokens (row major), the
/// uniforms `u [rows, N, k]` f64 and `tau`.
pub(crate) struct MicroInputs {
    pub tokens: Vec<u32>,
    pub rows: usize,
    pub w: usize,
    pub u: Tensor,
    pub tau: f64,
}

/// The per-step extras of one micro-batch's metrics: `loss_o{i}`, `acc_o{i}`, `acc`,
/// `acc_window`.
pub(crate) fn step_extras(m: &DistillMetrics) -> Extras {
    let mut ex: Extras = Vec::new();
    for (i, (l, a)) in m.loss_per_offset.iter().zip(&m.acc_per_offset).enumerate() {
        ex.push((format!("loss_o{}", i + 1), *l));
        ex.push((format!("acc_o{}", i + 1), *a));
    }
    ex.push(("acc".into(), m.acc));
    ex.push(("acc_window".into(), m.acc_window));
    ex
}

impl TrainTask for DistillTask {
    fn loss(&mut self, step: u64, micro: usize) -> Result<(Tensor, Extras)> {
        let mi = self.micro_inputs(step, micro)?;
        let (loss, rl, hits) = self.window_loss(&mi.tokens, mi.rows, mi.w, &mi.u, mi.tau)?;
        let mut s = Sums::new(self.student.k);
        s.add(&rl, &hits);
        Ok((loss, step_extras(&s.finish())))
    }

    fn eval(&mut self) -> Result<f64> {
        let m = self.evaluate()?;
        let l = m.loss;
        self.last_eval = Some(m);
        Ok(l)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        self.student.params()
    }

    fn to_device(&mut self, device: Device) -> Result<()> {
        self.student = self.student.to_device(device)?;
        self.student.set_trainable(true);
        self.teacher = self.teacher.to_device(device)?;
        Ok(())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.student.save(dir, DType::F32)?;
        if let Some(tok) = &self.tokenizer {
            let dst = dir.join("tokenizer.json");
            std::fs::copy(tok, &dst)
                .with_context(|| format!("cannot copy {} to {}", tok.display(), dst.display()))?;
        }
        Ok(())
    }

    fn tokens_per_step(&self) -> u64 {
        (self.sampler.batch_size() * self.cfg.ctx_len * self.student.k) as u64
    }

    fn eval_extras(&self) -> Extras {
        let Some(m) = &self.last_eval else {
            return Vec::new();
        };
        let mut ex: Extras = vec![("acc".into(), m.acc), ("acc_window".into(), m.acc_window)];
        for (i, a) in m.acc_per_offset.iter().enumerate() {
            ex.push((format!("acc_o{}", i + 1), *a));
        }
        ex
    }
}

/// Options of [`distill_stage`].
#[derive(Clone, Debug)]
pub struct StageOptions {
    /// The teacher's model directory: an AR teacher (no `k` in config.json: stage 1, or
    /// any stage of the inversion variant) or a PFLM student (`k`: stage k -> 2k).
    pub teacher: PathBuf,
    /// The student starts from this model directory [default: the teacher]: an AR model
    /// (the backbone plus a fresh noise encoder) or a PFLM (every tensor, `k` replaced).
    pub init: Option<PathBuf>,
    /// The student's window k.
    pub k: usize,
    /// A prepared data directory (meta.json, train.bin, val.bin).
    pub data: PathBuf,
    /// Copied into every model directory (default: `DATA/tokenizer.json` when it exists).
    pub tokenizer: Option<PathBuf>,
    /// Run directory (ckpt/, final/, metrics.jsonl, loss.svg, summary.json, distill.json).
    pub out: PathBuf,
    pub config: DistillConfig,
    /// Continue from OUT's checkpoint (fresh when there is none).
    pub resume: bool,
    pub max_steps: Option<u64>,
    pub stop: Option<Arc<AtomicBool>>,
    /// One rank of several (data parallelism): every rank reads the same files; rank 0
    /// alone writes `out`.
    pub comm: Option<crate::train::SharedCollective>,
}

/// What [`distill_stage`] returns.
pub struct StageResult {
    pub student: Pflm,
    pub outcome: Outcome,
    /// Validation metrics of the last evaluation (at the end of a finished run).
    pub metrics: Option<DistillMetrics>,
}

/// Validation metrics of a finished stage, next to its summary.json.
pub const STAGE_METRICS_FILE: &str = "distill.json";

/// The student a fresh stage starts from: an AR directory gives its backbone plus a new
/// noise encoder (from `seed`); a PFLM directory gives every tensor with `k` replaced.
fn init_student(dir: &Path, k: usize, seed: u64, how: NoiseInit) -> Result<Pflm> {
    let cfg = checkpoint::read_config(dir)?;
    let s = match cfg.k {
        None => Pflm::from_teacher_with(Ddit::load(dir)?, k, seed, how)?,
        Some(_) => Pflm::load(dir)?.with_k(k)?,
    };
    Ok(s)
}

/// The stage's teacher from `opts.teacher`: the AR teacher (stage 1, or any stage of the
/// inversion variant) or the previous stage's k = K/2 student, checked against the stage's k
/// and variant.
fn load_teacher(opts: &StageOptions) -> Result<DistillTeacher> {
    let k = opts.k;
    let tcfg = checkpoint::read_config(&opts.teacher)
        .with_context(|| format!("teacher {}", opts.teacher.display()))?;
    let teacher = match (opts.config.variant, tcfg.k) {
        (Variant::Inversion, None) => DistillTeacher::Inversion(
            Ddit::load(&opts.teacher)
                .with_context(|| format!("teacher {}", opts.teacher.display()))?,
        ),
        (Variant::Inversion, Some(tk)) => bail!(
            "the inversion variant needs the AR teacher, but {} is a k = {tk} student",
            opts.teacher.display()
        ),
        (Variant::Rollout, None) => {
            ensure!(
                k == 1,
                "an AR teacher ({}) distils a k = 1 student (stage 1), not k = {k}",
                opts.teacher.display()
            );
            DistillTeacher::Ar(
                Ddit::load(&opts.teacher)
                    .with_context(|| format!("teacher {}", opts.teacher.display()))?,
            )
        }
        (Variant::Rollout, Some(tk)) => {
            ensure!(
                k == 2 * tk,
                "a k = {tk} teacher ({}) distils a k = {} student, not k = {k}",
                opts.teacher.display(),
                2 * tk
            );
            DistillTeacher::Pflm(
                Pflm::load(&opts.teacher)
                    .with_context(|| format!("teacher {}", opts.teacher.display()))?,
            )
        }
    };
    if let DistillTeacher::Ar(t) | DistillTeacher::Inversion(t) = &teacher {
        // (a PFLM teacher is checked by Pflm::load)
        checkpoint::check_finite(&opts.teacher.join("model.safetensors"), t.params())?;
    }
    Ok(teacher)
}

/// The stage's student: from the checkpoint `resume` (checked to be this stage's: kind,
/// data, configuration and teacher, k) or fresh from `opts.init` (default: the teacher).
fn stage_student(
    opts: &StageOptions,
    resume: Option<&Path>,
    kind: &str,
    config: &serde_json::Value,
    data: &TokenData,
) -> Result<(Pflm, Option<TrainerState>)> {
    let k = opts.k;
    Ok(match resume {
        Some(dir) => {
            let data_id = crate::train::data_id(data);
            let st = crate::train::checkpoint::resume_state(dir, kind, &data_id, &opts.data)?;
            let tj = dir.join(crate::train::checkpoint::TRAINER_FILE);
            let mut diff = Vec::new();
            crate::train::json_diff(config, &st.config, "", &mut diff);
            ensure!(
                diff.is_empty(),
                "checkpoint {} was written by a stage with another configuration or teacher (differs in: {}); use another --out or the same settings",
                tj.display(),
                diff.join(", ")
            );
            let s = Pflm::load(dir).with_context(|| format!("checkpoint {}", dir.display()))?;
            ensure!(
                s.k == k,
                "checkpoint {}: the student has k = {}, this stage trains k = {k}",
                dir.display(),
                s.k
            );
            (s, Some(st))
        }
        None => {
            let init = opts.init.as_deref().unwrap_or(&opts.teacher);
            let s = init_student(init, k, opts.config.seed, opts.config.noise_init)
                .with_context(|| format!("student init {}", init.display()))?;
            (s, None)
        }
    })
}

/// Runs (or resumes) one distillation stage with [`drive`] on the CPU. The teacher is
/// loaded from disk on its own, so it shares no storage with the student.
pub fn distill_stage(opts: &StageOptions, on_event: &mut dyn FnMut(&Event)) -> Result<StageResult> {
    distill_stage_on(opts, Device::Cpu, on_event)
}

/// [`distill_stage`] with the models, the updates, the teacher's targets and the validation
/// on `device` (the CPU or a kernel device).
pub fn distill_stage_on(
    opts: &StageOptions,
    device: Device,
    on_event: &mut dyn FnMut(&Event),
) -> Result<StageResult> {
    let data = TokenData::open(&opts.data)?;
    let tok = opts.tokenizer.clone().or_else(|| {
        let p = opts.data.join("tokenizer.json");
        p.is_file().then_some(p)
    });
    if let Some(t) = &tok {
        data.check_tokenizer(t)?;
    }
    let k = opts.k;
    ensure!(k >= 1, "the student's k must be at least 1");
    let resume = crate::train::checkpoint::resume_dir(&opts.out, opts.resume)?;
    let teacher = load_teacher(opts)?;
    let teacher_sha = crate::data::file_sha256(&opts.teacher.join("model.safetensors"))?;
    let kind = format!("distill-k{k}");
    let config = serde_json::json!({
        "stage": serde_json::to_value(&opts.config)?,
        "k": k,
        "teacher_sha256": teacher_sha,
    });
    let (mut student, state) = stage_student(opts, resume.as_deref(), &kind, &config, &data)?;
    ensure!(
        student.cfg().vocab_size == data.meta.vocab_size,
        "teacher {} has a vocabulary of {} but the data {} has {}",
        opts.teacher.display(),
        student.cfg().vocab_size,
        opts.data.display(),
        data.meta.vocab_size
    );
    // memory: the student's training step over N context + N k hint positions (a rough
    // upper bound, as for the teacher), the windows of one update and the teacher's pass
    let c = &opts.config;
    ensure!(
        c.ctx_len.saturating_add(k) <= student.cfg().max_seq_len,
        "ctx_len {} + k {k} exceeds the model's max_seq_len {} (hint positions reach N - 1 + k)",
        c.ctx_len,
        student.cfg().max_seq_len
    );
    let positions = c.ctx_len.saturating_mul(k.saturating_add(1));
    let need = crate::train::estimate_train_bytes(student.cfg(), c.batch_size, positions)
        .saturating_add(crate::train::window_bytes(
            c.batch_size,
            c.optim.grad_accum,
            c.ctx_len.saturating_add(k),
        ))
        .saturating_add(
            crate::train::estimate_train_bytes(student.cfg(), c.batch_size, positions) / 4,
        );
    crate::train::config::check_host_memory(
        device,
        need,
        "this stage",
        &format!(
            "({} parameters, batch {} x context {} x k {k})",
            student.cfg().n_params(),
            c.batch_size,
            c.ctx_len
        ),
        "lower batch_size (raise grad_accum) or ctx_len",
    )?;
    student.set_trainable(true);
    if let (Some(dir), Some(st)) = (&resume, &state) {
        ensure!(
            st.step <= opts.config.optim.total_steps,
            "checkpoint {}: step {} is past total_steps {}",
            dir.display(),
            st.step,
            opts.config.optim.total_steps
        );
    }
    let title = format!(
        "{kind} ({}): {} layers, d {}, V {}, N {}",
        opts.config.variant,
        student.cfg().n_layers,
        student.cfg().d_model,
        student.cfg().vocab_size,
        opts.config.ctx_len
    );
    let task = DistillTask::new(student, teacher, &data, &opts.config, tok)?;
    let opt_file = resume
        .as_ref()
        .map(|d| d.join(crate::train::checkpoint::OPTIMIZER_FILE));
    let from = match (&opt_file, &state) {
        (Some(f), Some(st)) => Some(ResumeFrom {
            optimizer: f,
            step: st.step,
        }),
        _ => None,
    };
    let mut sess = session(
        task,
        device,
        opts.config.optim.clone(),
        from,
        opts.comm.clone(),
    )
    .with_context(|| format!("distilling on {device}"))?;
    let spec = RunSpec {
        out: opts.out.clone(),
        kind,
        title,
        config,
        seed: opts.config.seed,
        data: crate::train::data_id(&data),
        eval_every: opts.config.eval_every,
        checkpoint_every: opts.config.checkpoint_every,
        max_steps: opts.max_steps,
        stop: opts.stop.clone(),
    };
    let resumed = match (&resume, &state) {
        (Some(d), Some(s)) => Some((s, d.as_path())),
        _ => None,
    };
    let outcome = drive(sess.as_mut(), &spec, resumed, on_event)?;
    if matches!(outcome, Outcome::Finished { .. }) && sess.eval_extras().is_empty() {
        // a finished run resumed (no evaluation in this session, so no validation
        // extras): evaluate the final student once more
        sess.eval()?;
    }
    let mut task = sess.into_task()?;
    let metrics = task.last_eval.take();
    if let Outcome::Finished { .. } = outcome {
        let metrics = metrics
            .as_ref()
            .context("the final evaluation left no metrics")?;
        if rank_of(&opts.comm)? == 0 {
            kf_engine::fs::write_atomic(
                &opts.out.join(STAGE_METRICS_FILE),
                serde_json::to_string_pretty(metrics)?.as_bytes(),
            )?;
        }
        if let Some(c) = &opts.comm {
            // the next stage (on every rank) looks for this file
            c.lock()?.barrier()?;
        }
    }
    let mut student = task.student;
    student.set_trainable(false);
    Ok(StageResult {
        student,
        outcome,
        metrics,
    })
}

/// This process's rank under `comm` (0 without one).
pub(crate) fn rank_of(comm: &Option<crate::train::SharedCollective>) -> Result<usize> {
    match comm {
        None => Ok(0),
        Some(c) => Ok(c.lock()?.rank()),
    }
}
