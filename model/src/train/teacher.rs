//! `kfrun train`: the AR teacher as a [`TrainTask`] (next-token cross-entropy on sampled
//! windows, validation on the held-out windows) and the run around it: fresh or resumed from
//! a checkpoint, on the CPU or a kernel device.

use super::checkpoint::{self, TrainerState};
use super::config::{
    check_host_memory, estimate_train_bytes, json_diff, window_bytes, TrainConfig,
};
use super::{
    backend, data_id, drive, Event, Extras, NonFinite, Outcome, ResumeFrom, RunSpec, TrainTask,
};
use crate::config::DditConfig;
use crate::data::{SequentialWindows, TokenData, TokenShard, WindowBatch, WindowSampler};
use crate::ddit::Ddit;
use anyhow::{bail, ensure, Context, Result};
use kf_engine::{DType, Device, Tensor};
use kf_ops::cross_entropy::cross_entropy;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
    /// One rank of several (data parallelism): every rank reads the same files; rank 0
    /// alone writes `out`.
    pub comm: Option<super::SharedCollective>,
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

/// Loads a checkpoint's model for `cfg` (trainable) and checks its step; every error names
/// the file. The optimizer state is the backend's to load.
fn load_checkpoint(
    dir: &Path,
    state: &TrainerState,
    cfg: &TrainConfig,
    model_cfg: &DditConfig,
) -> Result<Ddit> {
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
    let resume = checkpoint::resume_dir(&opts.out, opts.resume)?;
    let (cfg, state) = match &resume {
        Some(dir) => {
            let st = checkpoint::resume_state(dir, "teacher", &data_id(&data), &opts.data)?;
            let tj = dir.join(checkpoint::TRAINER_FILE);
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
    check_host_memory(
        device,
        need,
        "this configuration",
        &format!(
            "for training ({} parameters, batch {} x {} tokens)",
            mcfg.n_params(),
            cfg.batch_size,
            cfg.seq_len
        ),
        "lower batch_size (raise grad_accum) or the model size",
    )?;
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
    let mut sess = backend::session(task, device, cfg.optim(), from, opts.comm.clone())
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
