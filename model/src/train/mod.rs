//! Training: the AR teacher (`kfrun train`) on the generic machinery that the
//! distillation stages reuse.
//!
//! * [`optim`]: [`Trainer`] — AdamW (decoupled weight decay, none on rank-1 tensors:
//!   LayerNorm weights and biases), warmup + cosine schedule, gradient accumulation,
//!   global grad-norm clipping; the loss is a closure `(step, micro) -> (loss, extras)`.
//! * [`run`]: [`drive`] — the step loop, validation, metrics.jsonl, loss.svg,
//!   checkpoints, Ctrl-C, NaN stop, the final model directory; the work is a [`TrainTask`].
//! * [`backend`]: where the updates run (a [`Session`] per run).
//! * [`checkpoint`]: crash-safe checkpoint directories (temporary dir + rename).
//! * [`metrics`]: JSONL metrics and the hand-written SVG plot.
//!
//! # Run directory (`--out DIR`)
//! * `DIR/ckpt/`: the latest checkpoint — `config.json`, `model.safetensors` (f32),
//!   `tokenizer.json` (a complete model directory), `optimizer.safetensors`, `trainer.json`;
//! * `DIR/final/`: the trained model (`config.json`, `model.safetensors`, `tokenizer.json`),
//!   written when the run reaches `total_steps`;
//! * `DIR/metrics.jsonl`, `DIR/loss.svg`, `DIR/summary.json`.
//!
//! # Exact resume
//! Window `b` of update `i` is a pure function of `(seed, i, b)` ([`WindowSampler`]), the
//! model is initialised from `seed`, and a checkpoint holds the f32 parameters, both
//! AdamW moments and the step: a run stopped at any checkpoint and resumed reproduces the
//! uninterrupted run's losses and parameters bit for bit, given the same thread count (on a
//! kernel device: given the same device).
//!
//! # Devices
//! [`backend::session`] moves the task's models to the CPU or a kernel device (CUDA or its
//! emulator): the same model code, autograd and [`Trainer`] run there, through [`drive`],
//! writing the same checkpoint files.

pub mod backend;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod run;

pub use backend::{session, BoxSession, ResumeFrom};
pub use checkpoint::{DataId, TrainerState};
pub use metrics::StepRecord;
pub use optim::{Extras, NonFinite, OptimConfig, StepStats, Trainer};
pub use run::{drive, Event, Outcome, RunSpec, Session, TrainSession, TrainTask, FINAL_DIR};

use crate::config::DditConfig;
use crate::data::{SequentialWindows, TokenData, TokenShard, WindowBatch, WindowSampler};
use crate::ddit::Ddit;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::{DType, Device, Tensor};
use kf_ops::cross_entropy::cross_entropy;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The model part of a training config: a preset and/or explicit dimensions (explicit
/// ones override the preset's). The vocabulary size and EOS id come from the data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_model: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln_eps: Option<f64>,
}

/// A training config file (`configs/*.json`). Every field is required except inside
/// `model`; unknown fields are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSpec,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (training and validation windows).
    pub seq_len: usize,
    /// Micro-batches per update (effective batch = batch_size * grad_accum sequences).
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// AdamW decoupled weight decay on matrices and embeddings (not LN weights, biases).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global grad-norm clip; 0 = off.
    pub grad_clip: f64,
    /// Validation every N steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Validation windows (the first ones of the validation shard, in order).
    pub eval_windows: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Seeds the initialisation and the training windows.
    pub seed: u64,
}

impl TrainConfig {
    /// Parses a config; errors name `label` (the file) and the offending key.
    pub fn from_json(text: &str, label: &str) -> Result<TrainConfig> {
        let c: TrainConfig =
            from_json_named(text).with_context(|| format!("training config {label}"))?;
        c.validate()
            .with_context(|| format!("training config {label}"))?;
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read training config {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            grad_accum: self.grad_accum,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch_size > 0, "batch_size must be at least 1");
        ensure!(self.seq_len > 0, "seq_len must be at least 1");
        ensure!(self.eval_windows > 0, "eval_windows must be at least 1");
        self.optim().validate()?;
        let m = &self.model;
        ensure!(
            m.preset.is_some()
                || (m.n_layers.is_some() && m.d_model.is_some() && m.n_heads.is_some()),
            "model: give a \"preset\" (tiny, small, paper) or all of n_layers, d_model, n_heads"
        );
        Ok(())
    }

    /// The model's architecture for a vocabulary of `vocab_size` ids with EOS `eos`.
    pub fn model_config(&self, vocab_size: usize, eos: u32) -> Result<DditConfig> {
        let m = &self.model;
        // without a preset, the explicit dimensions replace tiny's (rope_base and ln_eps
        // keep the preset's defaults unless given; max_seq_len defaults to seq_len)
        let mut c =
            DditConfig::preset(m.preset.as_deref().unwrap_or("tiny")).context("model.preset")?;
        if m.preset.is_none() {
            c.max_seq_len = self.seq_len;
        }
        if let Some(v) = m.n_layers {
            c.n_layers = v;
        }
        if let Some(v) = m.d_model {
            c.d_model = v;
        }
        if let Some(v) = m.n_heads {
            c.n_heads = v;
        }
        if let Some(v) = m.max_seq_len {
            c.max_seq_len = v;
        }
        if let Some(v) = m.rope_base {
            c.rope_base = v;
        }
        if let Some(v) = m.ln_eps {
            c.ln_eps = v;
        }
        c.vocab_size = vocab_size;
        c.eos_token_id = Some(eos);
        c.mask_token_id = None;
        c.k = None;
        ensure!(c.n_layers > 0, "model: n_layers must be at least 1");
        ensure!(
            c.n_heads > 0 && c.d_model % c.n_heads == 0 && (c.d_model / c.n_heads) % 2 == 0,
            "model: d_model {} must split into n_heads {} heads of even size (RoPE)",
            c.d_model,
            c.n_heads
        );
        ensure!(
            self.seq_len <= c.max_seq_len,
            "seq_len {} exceeds the model's max_seq_len {} (set model.max_seq_len)",
            self.seq_len,
            c.max_seq_len
        );
        ensure!(
            c.rope_base.is_finite() && c.rope_base > 0.0 && c.ln_eps.is_finite() && c.ln_eps > 0.0,
            "model: rope_base and ln_eps must be finite and > 0"
        );
        c.validate().context("model")?;
        Ok(c)
    }
}

/// Deserialises JSON; a type error names the key path (`model.d_model: invalid type ..`).
pub fn from_json_named<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                Err(inner.into())
            } else {
                Err(anyhow::anyhow!("{path}: {inner}"))
            }
        }
    }
}

/// A rough upper estimate of the memory one training step needs: parameters, gradients,
/// their accumulation buffer and two moments (f32), plus the activations the tape keeps
/// for one micro-batch and the logits with their gradient and softmax.
/// Saturates at `u64::MAX` (absurd configurations must fail the memory check, not wrap).
pub fn estimate_train_bytes(c: &DditConfig, batch: usize, seq_len: usize) -> u64 {
    let p = c.n_params() as u64;
    let n = (batch as u64).saturating_mul(seq_len as u64);
    let (d, v, l) = (c.d_model as u64, c.vocab_size as u64, c.n_layers as u64);
    let act = l.saturating_mul(n).saturating_mul(d).saturating_mul(40);
    let logits = n.saturating_mul(v).saturating_mul(4);
    p.saturating_mul(5)
        .saturating_add(act)
        .saturating_add(logits)
        .saturating_mul(4)
}

/// Bytes of the token windows one update draws: `rows` windows of `seq_len + 1` u32.
pub fn window_bytes(rows_per_micro: usize, grad_accum: usize, seq_len: usize) -> u64 {
    (rows_per_micro as u64)
        .saturating_mul(grad_accum as u64)
        .saturating_mul((seq_len as u64).saturating_add(1))
        .saturating_mul(4)
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Options of [`train_teacher`] (the flags of `kfrun train`).
#[derive(Clone, Debug, Default)]
pub struct TeacherOptions {
    /// The training config; optional when resuming (the checkpoint holds it), and when
    /// given on resume it must equal the checkpoint's.
    pub config: Option<PathBuf>,
    /// A prepared directory (meta.json, train.bin, val.bin).
    pub data: PathBuf,
    /// The tokenizer the shards were made with (default: `DATA/tokenizer.json`);
    /// checked against meta.json's SHA-256, copied into every model directory.
    pub tokenizer: Option<PathBuf>,
    pub out: PathBuf,
    /// Continue from `OUT/ckpt` when there is one (else start fresh).
    pub resume: bool,
    pub max_steps: Option<u64>,
    pub stop: Option<Arc<AtomicBool>>,
}

/// The AR teacher as a [`TrainTask`]: next-token cross-entropy on random windows.
pub struct TeacherTask {
    pub model: Ddit,
    sampler: WindowSampler,
    val: Arc<TokenShard>,
    batch: usize,
    seq_len: usize,
    eval_windows: usize,
    tokenizer: PathBuf,
    cached: Option<(u64, WindowBatch)>,
}

impl TeacherTask {
    pub fn new(
        model: Ddit,
        data: &TokenData,
        cfg: &TrainConfig,
        tokenizer: PathBuf,
    ) -> Result<TeacherTask> {
        // one sampler batch per update holds every micro-batch's rows, so the windows do
        // not depend on how the update is split into micro-batches
        let sampler = WindowSampler::new(
            data.train.clone(),
            cfg.seq_len,
            cfg.batch_size * cfg.grad_accum,
            cfg.seed,
        )?;
        ensure!(
            data.val.len() > cfg.seq_len,
            "validation shard {} holds {} tokens, too few for one window of {} (+1)",
            data.val.path().display(),
            data.val.len(),
            cfg.seq_len
        );
        Ok(TeacherTask {
            model,
            sampler,
            val: data.val.clone(),
            batch: cfg.batch_size,
            seq_len: cfg.seq_len,
            eval_windows: cfg.eval_windows,
            tokenizer,
            cached: None,
        })
    }

    /// Mean next-token loss of `rows` windows (`tokens` row-major, `seq_len + 1` each).
    fn window_loss(&self, b: &WindowBatch) -> Result<Tensor> {
        let (rows, t) = (b.rows, b.seq_len);
        let dev = self.model.device();
        let ids = Tensor::from_vec(b.inputs(), &[rows, t], dev)?;
        let tg = Tensor::from_vec(b.targets(), &[rows * t], dev)?;
        let logits = self.model.forward_train(&ids)?;
        let v = *logits.shape().last().context("logits have no dimensions")?;
        let flat = logits.reshape(&[rows * t, v])?;
        match cross_entropy(&flat, &tg, None) {
            Ok((l, _)) => Ok(l),
            Err(e) => {
                // a NaN/Inf in the model's output is reported as such
                let _ng = kf_engine::no_grad();
                if let Some(bad) = flat
                    .detach()
                    .to_vec_f64()?
                    .into_iter()
                    .find(|x| !x.is_finite())
                {
                    return Err(NonFinite {
                        step: 0,
                        what: "the model's logits hold",
                        value: bad,
                        micro: None,
                    }
                    .into());
                }
                Err(e)
            }
        }
    }
}

impl TeacherTask {
    /// The windows of micro-batch `micro` of update `step` (0-based).
    pub fn micro_windows(&mut self, step: u64, micro: usize) -> WindowBatch {
        if self.cached.as_ref().map(|c| c.0) != Some(step) {
            self.cached = Some((step, self.sampler.batch(step)));
        }
        let all = &self.cached.as_ref().unwrap().1;
        let w = self.seq_len + 1;
        WindowBatch {
            rows: self.batch,
            seq_len: self.seq_len,
            tokens: all.tokens[micro * self.batch * w..(micro + 1) * self.batch * w].to_vec(),
        }
    }

    /// The validation windows, in order, `batch_size` per batch.
    pub fn val_windows(&self) -> Result<SequentialWindows> {
        SequentialWindows::new(
            self.val.clone(),
            self.seq_len,
            self.batch,
            Some(self.eval_windows),
        )
    }
}

impl TrainTask for TeacherTask {
    fn loss(&mut self, step: u64, micro: usize) -> Result<(Tensor, Extras)> {
        let rows = self.micro_windows(step, micro);
        match self.window_loss(&rows) {
            Ok(l) => Ok((l, Vec::new())),
            Err(e) => match e.downcast::<NonFinite>() {
                Ok(nf) => Err(NonFinite {
                    step: step + 1,
                    micro: Some(micro),
                    ..nf
                }
                .into()),
                Err(e) => Err(e),
            },
        }
    }

    fn eval(&mut self) -> Result<f64> {
        let _ng = kf_engine::no_grad();
        let (mut sum, mut n) = (0.0f64, 0usize);
        for b in self.val_windows()? {
            let l = self.window_loss(&b)?.to_scalar_f64()?;
            let k = b.rows * b.seq_len;
            sum += l * k as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        self.model.params().to_vec()
    }

    fn to_device(&mut self, device: Device) -> Result<()> {
        self.model = self.model.to_device(device)?;
        self.model.set_trainable(true);
        Ok(())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, DType::F32)?;
        let dst = dir.join("tokenizer.json");
        std::fs::copy(&self.tokenizer, &dst).with_context(|| {
            format!(
                "cannot copy {} to {}",
                self.tokenizer.display(),
                dst.display()
            )
        })?;
        Ok(())
    }

    fn tokens_per_step(&self) -> u64 {
        (self.sampler.batch_size() * self.seq_len) as u64
    }
}

/// The keys whose values differ between two JSON objects (dotted paths).
pub(crate) fn json_diff(
    a: &serde_json::Value,
    b: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => json_diff(u, v, &p, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

pub(crate) fn data_id(data: &TokenData) -> DataId {
    DataId {
        tokenizer_sha256: data.meta.tokenizer_sha256.clone(),
        corpus_sha256: data.meta.corpus_sha256.clone(),
        train_tokens: data.meta.train.tokens,
        val_tokens: data.meta.val.tokens,
    }
}

/// Loads a checkpoint's model for `cfg` (trainable) and checks its step; every error names
/// the file. The optimizer state is the backend's to load.
fn load_checkpoint(
    dir: &Path,
    state: &TrainerState,
    cfg: &TrainConfig,
    model_cfg: &DditConfig,
) -> Result<Ddit> {
    checkpoint::check_files(
        dir,
        &[
            "config.json",
            "model.safetensors",
            checkpoint::OPTIMIZER_FILE,
        ],
    )?;
    let mut model = Ddit::load(dir).with_context(|| format!("checkpoint {}", dir.display()))?;
    crate::checkpoint::check_finite(&dir.join("model.safetensors"), model.params())?;
    let (have, want) = (
        serde_json::to_value(&model.cfg)?,
        serde_json::to_value(model_cfg)?,
    );
    let mut diff = Vec::new();
    json_diff(&have, &want, "", &mut diff);
    ensure!(
        diff.is_empty(),
        "checkpoint {}: the model differs from the one its training config describes in {}",
        dir.join("config.json").display(),
        diff.iter()
            .map(|k| format!(
                "{k} ({} here, {} in the config)",
                have.get(k).unwrap_or(&serde_json::Value::Null),
                want.get(k).unwrap_or(&serde_json::Value::Null)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    model.set_trainable(true);
    ensure!(
        state.step <= cfg.total_steps,
        "checkpoint {}: step {} is past total_steps {}",
        dir.join(checkpoint::TRAINER_FILE).display(),
        state.step,
        cfg.total_steps
    );
    Ok(model)
}

/// `kfrun train`: trains (or resumes) the AR teacher on the CPU. See the module docs for
/// the files.
pub fn train_teacher(opts: &TeacherOptions, on_event: &mut dyn FnMut(&Event)) -> Result<Outcome> {
    train_teacher_on(opts, Device::Cpu, on_event)
}

/// [`train_teacher`] with the model and its updates on `device` (the CPU or a kernel device).
pub fn train_teacher_on(
    opts: &TeacherOptions,
    device: Device,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Outcome> {
    let data = TokenData::open(&opts.data)?;
    let tok = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| opts.data.join("tokenizer.json"));
    ensure!(
        tok.is_file(),
        "no tokenizer: {} does not exist; pass --tokenizer with the tokenizer.json the shards in {} were prepared with",
        tok.display(),
        opts.data.display()
    );
    data.check_tokenizer(&tok)?;
    let given = opts
        .config
        .as_ref()
        .map(|p| TrainConfig::from_file(p))
        .transpose()?;
    let found = checkpoint::find(&opts.out);
    if let (Some(f), false) = (&found, opts.resume) {
        bail!(
            "{} already holds a checkpoint ({}): pass --resume to continue it, or choose another --out",
            opts.out.display(),
            f.display()
        );
    }
    let resume = if opts.resume { found } else { None };
    let (cfg, state) = match &resume {
        Some(dir) => {
            let st = TrainerState::read(dir)?;
            let tj = dir.join(checkpoint::TRAINER_FILE);
            ensure!(
                st.kind == "teacher",
                "checkpoint {}: kind {:?}, not a teacher run",
                tj.display(),
                st.kind
            );
            let ck: TrainConfig = serde_json::from_value(st.config.clone())
                .with_context(|| format!("checkpoint {}: config", tj.display()))?;
            ck.validate()
                .with_context(|| format!("checkpoint {}: config", tj.display()))?;
            if let Some(g) = &given {
                let mut diff = Vec::new();
                json_diff(&serde_json::to_value(g)?, &st.config, "", &mut diff);
                ensure!(
                    diff.is_empty(),
                    "training config {} differs from the one in {} in: {}",
                    opts.config.as_ref().unwrap().display(),
                    tj.display(),
                    diff.join(", ")
                );
            }
            ensure!(
                st.data == data_id(&data),
                "checkpoint {} was trained on other data than {} (tokenizer, corpus or token counts differ)",
                tj.display(),
                opts.data.display()
            );
            ensure!(
                st.seed == ck.seed,
                "checkpoint {}: seed {} differs from its config's {}",
                tj.display(),
                st.seed,
                ck.seed
            );
            (ck, Some(st))
        }
        None => {
            let Some(g) = given else {
                bail!(
                    "--config is required: {} holds no checkpoint to resume",
                    opts.out.display()
                );
            };
            (g, None)
        }
    };
    let cfg_label = match (&resume, &opts.config) {
        (Some(d), _) => d.join(checkpoint::TRAINER_FILE).display().to_string(),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => String::new(),
    };
    let mcfg = cfg
        .model_config(data.meta.vocab_size, data.meta.eos_id)
        .with_context(|| format!("training config {cfg_label}"))?;
    let need = estimate_train_bytes(&mcfg, cfg.batch_size, cfg.seq_len)
        .saturating_add(window_bytes(cfg.batch_size, cfg.grad_accum, cfg.seq_len));
    if let (true, Some(avail)) = (device.is_cpu(), available_memory()) {
        ensure!(
            need <= avail,
            "this configuration needs about {:.1} GiB for training ({} parameters, batch {} x {} tokens) but {:.1} GiB are available: lower batch_size (raise grad_accum) or the model size",
            need as f64 / (1u64 << 30) as f64,
            mcfg.n_params(),
            cfg.batch_size,
            cfg.seq_len,
            avail as f64 / (1u64 << 30) as f64
        );
    }
    let model = match (&resume, &state) {
        (Some(dir), Some(st)) => load_checkpoint(dir, st, &cfg, &mcfg)?,
        _ => {
            let mut m = Ddit::init(&mcfg, cfg.seed)?;
            m.set_trainable(true);
            m
        }
    };
    let task = TeacherTask::new(model, &data, &cfg, tok)?;
    let opt_file = resume.as_ref().map(|d| d.join(checkpoint::OPTIMIZER_FILE));
    let from = match (&opt_file, &state) {
        (Some(f), Some(st)) => Some(ResumeFrom {
            optimizer: f,
            step: st.step,
        }),
        _ => None,
    };
    let mut sess = backend::session(task, device, cfg.optim(), from)
        .with_context(|| format!("training on {device}"))?;
    let spec = RunSpec {
        out: opts.out.clone(),
        kind: "teacher".into(),
        title: format!(
            "teacher: {} layers, d {}, {} heads, V {}, {} params",
            mcfg.n_layers,
            mcfg.d_model,
            mcfg.n_heads,
            mcfg.vocab_size,
            mcfg.n_params()
        ),
        config: serde_json::to_value(&cfg)?,
        seed: cfg.seed,
        data: data_id(&data),
        eval_every: cfg.eval_every,
        checkpoint_every: cfg.checkpoint_every,
        max_steps: opts.max_steps,
        stop: opts.stop.clone(),
    };
    let resumed = match (&resume, &state) {
        (Some(d), Some(s)) => Some((s, d.as_path())),
        _ => None,
    };
    drive(sess.as_mut(), &spec, resumed, on_event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(model: &str) -> TrainConfig {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.json"),
        )
        .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["model"] = serde_json::from_str(model).unwrap();
        TrainConfig::from_json(&v.to_string(), "test").unwrap()
    }

    #[test]
    fn model_from_preset_or_explicit_dimensions() {
        let c = cfg(r#"{"preset": "small"}"#).model_config(1000, 7).unwrap();
        let small = DditConfig::preset("small").unwrap();
        assert_eq!(
            (c.n_layers, c.d_model, c.n_heads),
            (small.n_layers, small.d_model, small.n_heads)
        );
        assert_eq!((c.vocab_size, c.eos_token_id, c.k), (1000, Some(7), None));
        let c = cfg(r#"{"n_layers": 3, "d_model": 32, "n_heads": 2}"#)
            .model_config(100, 0)
            .unwrap();
        assert_eq!(
            (c.n_layers, c.d_model, c.n_heads, c.max_seq_len),
            (3, 32, 2, 64)
        );
        let c = cfg(r#"{"preset": "tiny", "d_model": 96, "n_heads": 3}"#)
            .model_config(100, 0)
            .unwrap();
        assert_eq!((c.n_layers, c.d_model, c.n_heads), (2, 96, 3));
        let e = TrainConfig::from_json(r#"{"model": {"d_model": 32}}"#, "x.json").unwrap_err();
        assert!(format!("{e:#}").contains("x.json"), "{e:#}");
        let e = cfg(r#"{"n_layers": 2, "d_model": 30, "n_heads": 4}"#)
            .model_config(100, 0)
            .unwrap_err();
        assert!(format!("{e:#}").contains("d_model"), "{e:#}");
        assert!(estimate_train_bytes(&DditConfig::preset("paper").unwrap(), 8, 128) > 1 << 30);
    }
}
