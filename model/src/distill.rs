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
//! context position `t`, offset `i` (0-based, `i < k_student`)) of update `s` is
//! `Philox(seed, NOISE_STREAM).uniform_f64(((s * R + r) * N + t) * k + i)`;
//! validation window `w` uses `Philox(seed, EVAL_NOISE_STREAM)` at `(w * N + t) * k + i`
//! (fixed noises: evaluation is deterministic). The windows themselves come from
//! `WindowSampler(seed)` (its own stream), so the whole stage is a pure function of the
//! seed, the teacher and the data — the condition for exact resume.
//!
//! # Temperature
//! [`TauDist`] is the configured distribution of `tau` (only `Const` for now; default 1);
//! `tau` is fed to the student's noise encoder and divides the AR teacher's logits.
//!
//! # Not here yet
//! Resume of a stage (`--resume`), the noise-inversion variant (6.3), and the CLI
//! (`kfrun distill`) that chains stages AR -> 1 -> 2 -> 4.

use crate::checkpoint;
use crate::data::{SequentialWindows, TokenData, TokenShard, WindowBatch, WindowSampler};
use crate::ddit::Ddit;
use crate::pflm::{stage1_targets, Pflm};
use crate::train::{
    drive, DataId, Event, Extras, OptimConfig, Outcome, RunSpec, TrainTask, Trainer,
};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::rng::Philox;
use kf_engine::{DType, Device, Tensor};
use kf_ops::argmax::argmax_penalty;
use kf_ops::cross_entropy::cross_entropy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Philox stream of the training noises ("DNOI").
pub const NOISE_STREAM: u64 = 0x444E_4F49;
/// Philox stream of the validation noises ("DEVL").
pub const EVAL_NOISE_STREAM: u64 = 0x4445_564C;

/// The distribution `tau` is drawn from during training (a hook: only a constant now).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TauDist {
    Const(f64),
}

impl Default for TauDist {
    fn default() -> Self {
        TauDist::Const(1.0)
    }
}

impl TauDist {
    /// `tau` of sequence `row` of update `step` (unused by `Const`).
    pub fn sample(&self, _seed: u64, _step: u64, _row: usize) -> f64 {
        match self {
            TauDist::Const(t) => *t,
        }
    }
    /// The value used for evaluation.
    pub fn eval_value(&self) -> f64 {
        match self {
            TauDist::Const(t) => *t,
        }
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
}

/// The teacher of a stage.
pub enum DistillTeacher {
    /// Stage 1: the AR teacher (student k = 1).
    Ar(Ddit),
    /// Stage k -> 2k: the previous stage's student, a separate copy (student k = 2 teacher k).
    Pflm(Pflm),
}

impl DistillTeacher {
    /// Targets u32 `[B, N, k_student]` for contexts `[B, N]` and noises `[B, N, k_student]`.
    pub fn targets(&self, ctx: &Tensor, u: &Tensor, tau: f64) -> Result<Tensor> {
        let _ng = kf_engine::no_grad();
        let (b, n, kk) = (u.dim(0)?, u.dim(1)?, u.dim(2)?);
        match self {
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
struct Sums {
    k: usize,
    loss: Vec<f64>,
    right: Vec<usize>,
    windows: usize,
    windows_right: usize,
}

impl Sums {
    fn new(k: usize) -> Sums {
        Sums {
            k,
            loss: vec![0.0; k],
            right: vec![0; k],
            ..Default::default()
        }
    }
    /// `row_loss` and `hit` per target, in `[window][offset]` order.
    fn add(&mut self, row_loss: &[f64], hit: &[bool]) {
        for (l, h) in row_loss.chunks(self.k).zip(hit.chunks(self.k)) {
            for i in 0..self.k {
                self.loss[i] += l[i];
                self.right[i] += h[i] as usize;
            }
            self.windows += 1;
            self.windows_right += h.iter().all(|&x| x) as usize;
        }
    }
    fn finish(&self) -> DistillMetrics {
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
        }
        ensure!(
            cfg.batch_size > 0 && cfg.ctx_len > 0,
            "batch_size and ctx_len must be positive"
        );
        ensure!(cfg.eval_windows > 0, "eval_windows must be at least 1");
        let max = student.cfg().max_seq_len;
        ensure!(
            cfg.ctx_len + k <= max,
            "ctx_len {} + k {k} exceeds the model's max_seq_len {max} (hint positions reach N - 1 + k)",
            cfg.ctx_len
        );
        cfg.optim.validate()?;
        let sampler = WindowSampler::new(
            data.train.clone(),
            cfg.ctx_len,
            cfg.batch_size * cfg.optim.grad_accum,
            cfg.seed,
        )?;
        ensure!(
            data.val.len() > cfg.ctx_len,
            "validation shard {} holds {} tokens, too few for one context of {} (+1)",
            data.val.path().display(),
            data.val.len(),
            cfg.ctx_len
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

    /// Noises `[rows, N, k]` from `stream`, starting at row index `row0` (module docs).
    fn noises(&self, stream: u64, row0: u64, rows: usize) -> Result<Tensor> {
        let (n, k) = (self.cfg.ctx_len, self.student.k);
        let rng = Philox::new(self.cfg.seed, stream);
        let per = (n * k) as u64;
        let v: Vec<f64> = (0..rows * n * k)
            .map(|j| rng.uniform_f64(row0 * per + j as u64))
            .collect();
        Tensor::from_vec(v, &[rows, n, k], Device::Cpu)
    }

    /// Loss on the tape plus per-target losses and hits for contexts `ctx [B, N]`.
    fn window_loss(
        &self,
        ctx: &Tensor,
        u: &Tensor,
        tau: f64,
    ) -> Result<(Tensor, Vec<f64>, Vec<bool>)> {
        let (b, n, k) = (u.dim(0)?, u.dim(1)?, u.dim(2)?);
        let targets = self.teacher.targets(ctx, u, tau)?;
        let logits = self.student.forward_staircase(ctx, u, &[tau])?;
        let v = self.student.cfg().vocab_size;
        let m = b * n * k;
        let tg = targets.reshape(&[m])?;
        let (loss, rows) = cross_entropy(&logits.reshape(&[m, v])?, &tg, None)?;
        let pred = {
            let _ng = kf_engine::no_grad();
            let counts = Tensor::zeros(&[b, v], DType::U32, Device::Cpu)?;
            argmax_penalty(&logits.detach().reshape(&[b, n * k, v])?, &counts, 0.0)?
        };
        let (pv, tv) = (pred.to_vec::<u32>()?, tg.to_vec::<u32>()?);
        let hits = pv.iter().zip(&tv).map(|(a, b)| a == b).collect();
        Ok((loss, rows.to_vec_f64()?, hits))
    }

    /// Loss and agreement on the validation contexts with their fixed noises (no tape).
    pub fn evaluate(&self) -> Result<DistillMetrics> {
        let _ng = kf_engine::no_grad();
        let tau = self.cfg.tau.eval_value();
        let mut sums = Sums::new(self.student.k);
        let mut w0 = 0u64;
        for wb in SequentialWindows::new(
            self.val.clone(),
            self.cfg.ctx_len,
            self.cfg.batch_size,
            Some(self.cfg.eval_windows),
        )? {
            let ctx = Tensor::from_vec(wb.inputs(), &[wb.rows, wb.seq_len], Device::Cpu)?;
            let u = self.noises(EVAL_NOISE_STREAM, w0, wb.rows)?;
            let (_, rl, hits) = self.window_loss(&ctx, &u, tau)?;
            sums.add(&rl, &hits);
            w0 += wb.rows as u64;
        }
        Ok(sums.finish())
    }
}

impl TrainTask for DistillTask {
    fn loss(&mut self, step: u64, micro: usize) -> Result<(Tensor, Extras)> {
        if self.cached.as_ref().map(|c| c.0) != Some(step) {
            self.cached = Some((step, self.sampler.batch(step)));
        }
        let all = &self.cached.as_ref().unwrap().1;
        let (bs, n) = (self.cfg.batch_size, self.cfg.ctx_len);
        let w = n + 1;
        let rows = WindowBatch {
            rows: bs,
            seq_len: n,
            tokens: all.tokens[micro * bs * w..(micro + 1) * bs * w].to_vec(),
        };
        let ctx = Tensor::from_vec(rows.inputs(), &[bs, n], Device::Cpu)?;
        let row0 = step * self.sampler.batch_size() as u64 + (micro * bs) as u64;
        let u = self.noises(NOISE_STREAM, row0, bs)?;
        let tau = self.cfg.tau.sample(self.cfg.seed, step, micro * bs);
        let (loss, rl, hits) = self.window_loss(&ctx, &u, tau)?;
        let mut s = Sums::new(self.student.k);
        s.add(&rl, &hits);
        let m = s.finish();
        let mut ex: Extras = Vec::new();
        for (i, (l, a)) in m.loss_per_offset.iter().zip(&m.acc_per_offset).enumerate() {
            ex.push((format!("loss_o{}", i + 1), *l));
            ex.push((format!("acc_o{}", i + 1), *a));
        }
        ex.push(("acc".into(), m.acc));
        ex.push(("acc_window".into(), m.acc_window));
        Ok((loss, ex))
    }

    fn eval(&mut self) -> Result<f64> {
        let m = self.evaluate()?;
        let l = m.loss;
        self.last_eval = Some(m);
        Ok(l)
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
}

/// Options of [`distill_stage`].
#[derive(Clone, Debug)]
pub struct StageOptions {
    /// The teacher's model directory: an AR teacher (no `k` in config.json: stage 1) or a
    /// PFLM student (`k`: stage k -> 2k).
    pub teacher: PathBuf,
    /// A prepared data directory (meta.json, train.bin, val.bin).
    pub data: PathBuf,
    /// Copied into every model directory (default: `DATA/tokenizer.json` when it exists).
    pub tokenizer: Option<PathBuf>,
    /// Run directory (ckpt/, final/, metrics.jsonl, loss.svg, summary.json).
    pub out: PathBuf,
    pub config: DistillConfig,
    pub max_steps: Option<u64>,
    pub stop: Option<Arc<AtomicBool>>,
}

/// What [`distill_stage`] returns.
pub struct StageResult {
    pub student: Pflm,
    pub outcome: Outcome,
    /// Validation metrics of the last evaluation (at the end of a finished run).
    pub metrics: Option<DistillMetrics>,
}

/// Runs one distillation stage with [`drive`] (fresh runs only; resume is not here yet).
/// The teacher is loaded from disk on its own, so it shares no storage with the student:
/// stage 1 starts the student from the AR teacher's backbone plus a fresh noise encoder
/// (from `config.seed`); stage k -> 2k starts it from every tensor of the k-student.
pub fn distill_stage(opts: &StageOptions, on_event: &mut dyn FnMut(&Event)) -> Result<StageResult> {
    let data = TokenData::open(&opts.data)?;
    let tok = opts.tokenizer.clone().or_else(|| {
        let p = opts.data.join("tokenizer.json");
        p.is_file().then_some(p)
    });
    if let Some(t) = &tok {
        data.check_tokenizer(t)?;
    }
    if let Some(f) = crate::train::checkpoint::find(&opts.out) {
        bail!(
            "{} already holds a checkpoint ({}); resuming a distillation stage is not supported yet: choose another --out",
            opts.out.display(),
            f.display()
        );
    }
    let tcfg = checkpoint::read_config(&opts.teacher)?;
    let (teacher, mut student, kind) = match tcfg.k {
        None => {
            let t = Ddit::load(&opts.teacher)
                .with_context(|| format!("teacher {}", opts.teacher.display()))?;
            let s = Pflm::from_teacher(Ddit::load(&opts.teacher)?, 1, opts.config.seed)?;
            (DistillTeacher::Ar(t), s, "distill-k1".to_string())
        }
        Some(k) => {
            let t = Pflm::load(&opts.teacher)
                .with_context(|| format!("teacher {}", opts.teacher.display()))?;
            let s = Pflm::load(&opts.teacher)?.with_k(2 * k)?;
            (DistillTeacher::Pflm(t), s, format!("distill-k{}", 2 * k))
        }
    };
    ensure!(
        student.cfg().vocab_size == data.meta.vocab_size,
        "teacher {} has a vocabulary of {} but the data {} has {}",
        opts.teacher.display(),
        student.cfg().vocab_size,
        opts.data.display(),
        data.meta.vocab_size
    );
    student.set_trainable(true);
    let mut trainer = Trainer::new(&student.params(), opts.config.optim.clone())?;
    let title = format!(
        "{kind}: {} layers, d {}, V {}, N {}",
        student.cfg().n_layers,
        student.cfg().d_model,
        student.cfg().vocab_size,
        opts.config.ctx_len
    );
    let mut task = DistillTask::new(student, teacher, &data, &opts.config, tok)?;
    let spec = RunSpec {
        out: opts.out.clone(),
        kind,
        title,
        config: serde_json::to_value(&opts.config)?,
        seed: opts.config.seed,
        data: DataId {
            tokenizer_sha256: data.meta.tokenizer_sha256.clone(),
            corpus_sha256: data.meta.corpus_sha256.clone(),
            train_tokens: data.meta.train.tokens,
            val_tokens: data.meta.val.tokens,
        },
        eval_every: opts.config.eval_every,
        checkpoint_every: opts.config.checkpoint_every,
        max_steps: opts.max_steps,
        stop: opts.stop.clone(),
    };
    let outcome = drive(&mut trainer, &mut task, &spec, None, on_event)?;
    let metrics = task.last_eval.take();
    let mut student = task.student;
    student.set_trainable(false);
    Ok(StageResult {
        student,
        outcome,
        metrics,
    })
}
