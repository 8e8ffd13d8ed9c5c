//! The optimiser side of training, independent of the model: AdamW over named
//! parameters, the warmup + cosine learning-rate schedule, gradient accumulation
//! and global grad-norm clipping. [`Trainer::train_step`] takes the loss as a
//! closure, so the teacher and every distillation stage share it.
//!
//! Numbering: `Trainer::step()` counts completed updates. The update being made
//! has the 0-based index `i = step()`; the closure is called as `loss(i, micro)`, the
//! learning rate is `lr_at(i)`, AdamW's bias-correction step is `i + 1`, and metrics
//! and messages call it step `i + 1` (so "step 1" is the first update).
//!
//! Data parallelism ([`Trainer::set_collective`]): with `W` ranks, rank `r` computes the
//! micro-batches `r * A / W .. (r + 1) * A / W` of each update (`A = grad_accum`, a multiple
//! of `W`) and the gradients are summed by [`Collective::sum_ordered`] in micro-batch order —
//! the very additions a single process makes — so every rank applies the same AdamW update
//! and the result is bit-identical to one process with the same config (and thread count per
//! micro-batch), whatever `W`.

use anyhow::{anyhow, bail, ensure, Context, Result};
use kf_engine::dist::Collective;
use kf_engine::{autograd, DType, Device, Tensor};
use kf_ops::adamw::{adamw_step, AdamWConfig};
use kf_ops::elementwise::scale;
use kf_ops::reduce::sum_squares;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A collective shared by the sessions of one process (the stages of a distillation chain
/// run one after another on the same ranks).
#[derive(Clone)]
pub struct SharedCollective(Arc<Mutex<kf_engine::dist::BoxCollective>>);

impl SharedCollective {
    pub fn new(c: kf_engine::dist::BoxCollective) -> SharedCollective {
        SharedCollective(Arc::new(Mutex::new(c)))
    }

    /// The collective (one user at a time).
    pub fn lock(&self) -> Result<std::sync::MutexGuard<'_, kf_engine::dist::BoxCollective>> {
        self.0
            .lock()
            .map_err(|_| anyhow!("the collective's lock is poisoned (a thread panicked)"))
    }
}

impl std::fmt::Debug for SharedCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedCollective")
    }
}

/// Extra per-step metrics a loss closure reports (name, value); averaged over micro-batches.
pub type Extras = Vec<(String, f64)>;

/// Hyper-parameters of the optimiser and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (`total_steps`).
    pub min_lr: f64,
    /// Linear warmup length in updates: update `i < warmup` uses `lr (i + 1) / warmup`.
    pub warmup_steps: u64,
    /// Length of the run in updates (end of the cosine).
    pub total_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW), applied only to parameters of rank >= 2
    /// (matrices and embedding tables), never to LayerNorm weights or biases.
    pub weight_decay: f64,
    /// Global L2 norm the averaged gradient is clipped to; 0 disables clipping.
    pub grad_clip: f64,
    /// Micro-batches per update; their gradients are summed and divided by this.
    pub grad_accum: usize,
}

impl OptimConfig {
    /// Checks ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: f64| -> Result<()> {
            ensure!(
                v.is_finite() && v > 0.0,
                "{name} must be finite and > 0, got {v}"
            );
            Ok(())
        };
        pos("lr", self.lr)?;
        ensure!(
            self.min_lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "min_lr must lie in [0, lr = {}], got {}",
            self.lr,
            self.min_lr
        );
        ensure!(self.total_steps > 0, "total_steps must be at least 1");
        ensure!(
            self.warmup_steps <= self.total_steps,
            "warmup_steps ({}) must not exceed total_steps ({})",
            self.warmup_steps,
            self.total_steps
        );
        for (n, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            ensure!((0.0..1.0).contains(&b), "{n} must lie in [0, 1), got {b}");
        }
        pos("eps", self.eps)?;
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay must be finite and >= 0, got {}",
            self.weight_decay
        );
        ensure!(
            self.grad_clip.is_finite() && self.grad_clip >= 0.0,
            "grad_clip must be finite and >= 0 (0 = off), got {}",
            self.grad_clip
        );
        ensure!(self.grad_accum >= 1, "grad_accum must be at least 1");
        Ok(())
    }

    /// Learning rate of update `i` (0-based): linear warmup to `lr` over
    /// `warmup_steps`, then a half cosine from `lr` to `min_lr` at `total_steps`.
    pub fn lr_at(&self, i: u64) -> f64 {
        if i < self.warmup_steps {
            return self.lr * (i + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let p = ((i - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Extra metrics summed by name over micro-batches, in first-seen order.
#[derive(Default)]
pub struct ExtrasSum(Extras);

impl ExtrasSum {
    pub fn add(&mut self, ex: Extras) {
        for (k, v) in ex {
            match self.0.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1 += v,
                None => self.0.push((k, v)),
            }
        }
    }

    /// The means over `count` micro-batches.
    pub fn mean(mut self, count: usize) -> Extras {
        for e in self.0.iter_mut() {
            e.1 /= count.max(1) as f64;
        }
        self.0
    }
}

/// One trained tensor and its AdamW moments.
pub struct Param {
    pub name: String,
    /// The model's own handle (a variable): updated in place.
    pub tensor: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    /// Whether weight decay applies (rank >= 2).
    pub decay: bool,
}

/// What one update did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// 1-based number of this update (`Trainer::step()` after it).
    pub step: u64,
    /// Mean of the micro-batch losses.
    pub loss: f64,
    pub lr: f64,
    /// L2 norm of the averaged gradient before clipping.
    pub grad_norm: f64,
    /// Mean of each extra metric over the micro-batches, in first-seen order.
    pub extras: Extras,
}

/// A NaN or infinite loss or gradient norm: the update was not applied.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFinite {
    /// 1-based step.
    pub step: u64,
    /// What was not finite, with its verb: "the training loss is", "the gradient norm is",
    /// "the model's logits hold".
    pub what: &'static str,
    pub value: f64,
    pub micro: Option<usize>,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {}: {} {}", self.step, self.what, self.value)?;
        if let Some(m) = self.micro {
            write!(f, " (micro-batch {m})")?;
        }
        write!(f, "; the update was not applied")
    }
}

impl std::error::Error for NonFinite {}

/// Optimiser state over a fixed list of named parameters.
pub struct Trainer {
    params: Vec<Param>,
    opt: OptimConfig,
    step: u64,
    /// Set when this process is one rank of several.
    comm: Option<SharedCollective>,
}

/// `format` in the optimizer file's metadata.
pub const OPTIMIZER_FORMAT: &str = "kf-adamw-v1";

impl Trainer {
    /// Takes the model's parameter handles (variables: `Ddit::set_trainable(true)` first),
    /// f32 and contiguous, with unique names; moments start at zero, step at 0.
    pub fn new(params: &[(String, Tensor)], opt: OptimConfig) -> Result<Trainer> {
        opt.validate()?;
        ensure!(!params.is_empty(), "trainer: no parameters to train");
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, t) in params {
            ensure!(
                seen.insert(name.as_str()),
                "trainer: duplicate parameter name {name:?}"
            );
            ensure!(
                t.is_var(),
                "trainer: parameter {name} does not require grad (call set_trainable(true) first)"
            );
            ensure!(
                t.dtype() == DType::F32,
                "trainer: parameter {name} has dtype {}; training keeps f32 parameters",
                t.dtype()
            );
            ensure!(
                t.is_contiguous(),
                "trainer: parameter {name} is not contiguous"
            );
            out.push(Param {
                name: name.clone(),
                tensor: t.clone(),
                m: Tensor::zeros(t.shape(), DType::F32, t.device())?,
                v: Tensor::zeros(t.shape(), DType::F32, t.device())?,
                decay: t.rank() >= 2,
            });
        }
        Ok(Trainer {
            params: out,
            opt,
            step: 0,
            comm: None,
        })
    }

    /// Makes this trainer one rank of `comm`'s group: checks that the update's micro-batches
    /// split evenly, then takes rank 0's parameters, moments and step (the broadcast of the
    /// initial or resumed state), so every rank starts from the same bits.
    pub fn set_collective(&mut self, comm: SharedCollective) -> Result<()> {
        {
            let mut c = comm.lock()?;
            let w = c.size();
            ensure!(
                self.opt.grad_accum.is_multiple_of(w),
                "grad_accum {} is not a multiple of the {w} ranks: each rank computes whole micro-batches of an update \
                 (batch_size x grad_accum windows); set grad_accum to a multiple of {w} (and divide batch_size to keep the global batch)",
                self.opt.grad_accum
            );
            if w > 1 {
                self.sync_from_root(&mut **c)
                    .context("taking rank 0's parameters and optimizer state")?;
            }
        }
        self.comm = Some(comm);
        Ok(())
    }

    /// This process's rank and the number of ranks ((0, 1) without a collective).
    pub fn rank_size(&self) -> Result<(usize, usize)> {
        match &self.comm {
            None => Ok((0, 1)),
            Some(c) => {
                let c = c.lock()?;
                Ok((c.rank(), c.size()))
            }
        }
    }

    /// The collective, when there is one.
    pub fn collective(&self) -> Option<&SharedCollective> {
        self.comm.as_ref()
    }

    fn sync_from_root(&mut self, c: &mut dyn Collective) -> Result<()> {
        let mut step = self.step.to_le_bytes().to_vec();
        c.broadcast(0, &mut step)?;
        let got: [u8; 8] = step
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("rank 0 sent a step of {} bytes", step.len()))?;
        self.step = u64::from_le_bytes(got);
        for p in self.params.iter_mut() {
            for t in [&p.tensor, &p.m, &p.v] {
                let mut b: Vec<u8> = bytemuck::cast_slice(&t.to_vec::<f32>()?).to_vec();
                c.broadcast(0, &mut b)?;
                ensure!(
                    b.len() == t.numel() * 4,
                    "{}: rank 0 sent {} bytes for {} values: the ranks built different models",
                    p.name,
                    b.len(),
                    t.numel()
                );
                let v: Vec<f32> = b
                    .chunks_exact(4)
                    .map(|q| f32::from_le_bytes([q[0], q[1], q[2], q[3]]))
                    .collect();
                t.copy_from(&Tensor::from_vec(v, t.shape(), t.device())?)?;
            }
        }
        Ok(())
    }

    /// Completed updates.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn optim(&self) -> &OptimConfig {
        &self.opt
    }

    /// One update: for each micro-batch `j`, `loss_fn(i, j)` builds the loss on the tape
    /// and its gradients are added (in micro-batch order); the sum is divided by
    /// `grad_accum`, clipped to `grad_clip` by global norm, and AdamW applied with
    /// `lr_at(i)`. A non-finite loss or norm returns a [`NonFinite`] error before any
    /// parameter changes.
    pub fn train_step<F>(&mut self, mut loss_fn: F) -> Result<StepStats>
    where
        F: FnMut(u64, usize) -> Result<(Tensor, Extras)>,
    {
        if let Some(comm) = self.comm.clone() {
            let mut c = comm.lock()?;
            if c.size() > 1 {
                return self.train_step_ranks(&mut **c, loss_fn);
            }
        }
        let i = self.step;
        let accum = self.opt.grad_accum;
        // the summed gradients, on the parameters' device
        let mut acc: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let mut loss_sum = 0.0;
        let mut extras = ExtrasSum::default();
        for micro in 0..accum {
            let (lv, ex, grads) = self.micro_grads(&mut loss_fn, i, micro)?;
            loss_sum += lv;
            extras.add(ex);
            for (g, a) in grads.into_iter().zip(acc.iter_mut()) {
                let Some(g) = g else { continue };
                *a = Some(match a.take() {
                    None => g.whole_buffer()?,
                    Some(sum) => sum.add_same_shape(&g)?,
                });
            }
        }
        self.apply(acc, loss_sum, extras)
    }

    /// Micro-batch `micro` of update `i`: its loss (checked finite), extras and the
    /// gradient of every parameter (None where the loss does not reach it).
    #[allow(clippy::type_complexity)]
    fn micro_grads<F>(
        &self,
        loss_fn: &mut F,
        i: u64,
        micro: usize,
    ) -> Result<(f64, Extras, Vec<Option<Tensor>>)>
    where
        F: FnMut(u64, usize) -> Result<(Tensor, Extras)>,
    {
        let step1 = i + 1;
        let (loss, ex) =
            loss_fn(i, micro).with_context(|| format!("step {step1}, micro-batch {micro}"))?;
        ensure!(
            loss.numel() == 1,
            "step {step1}: the loss has shape {:?}, expected a scalar",
            loss.shape()
        );
        let lv = loss.to_scalar_f64()?;
        if !lv.is_finite() {
            return Err(NonFinite {
                step: step1,
                what: "the training loss is",
                value: lv,
                micro: Some(micro),
            }
            .into());
        }
        let grads = loss
            .backward()
            .with_context(|| format!("step {step1}, micro-batch {micro}: backward"))?;
        drop(loss);
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = grads.get(&p.tensor);
            if let Some(g) = g {
                ensure!(
                    g.dtype() == DType::F32 && g.shape() == p.tensor.shape(),
                    "step {step1}: gradient of {} has {} {:?}, expected f32 {:?}",
                    p.name,
                    g.dtype(),
                    g.shape(),
                    p.tensor.shape()
                );
            }
            out.push(g.cloned());
        }
        Ok((lv, ex, out))
    }

    /// [`Trainer::train_step`] as one rank of several (module docs): this rank's
    /// micro-batches, their reports (loss, extras, which gradients exist, or the error)
    /// gathered from every rank, the gradients summed in micro-batch order, then the same
    /// update everywhere. An error on any rank is the error of every rank (the first in
    /// micro-batch order), so the ranks never part ways.
    fn train_step_ranks<F>(&mut self, c: &mut dyn Collective, mut loss_fn: F) -> Result<StepStats>
    where
        F: FnMut(u64, usize) -> Result<(Tensor, Extras)>,
    {
        let i = self.step;
        let step1 = i + 1;
        let (r, w) = (c.rank(), c.size());
        let per = self.opt.grad_accum / w;
        let mut reports: Vec<MicroReport> = Vec::with_capacity(per);
        let mut grads: Vec<Vec<Option<Vec<f32>>>> = Vec::with_capacity(per);
        for micro in r * per..(r + 1) * per {
            let res = self
                .micro_grads(&mut loss_fn, i, micro)
                .and_then(|(lv, ex, g)| {
                    let host = g
                        .iter()
                        .map(|t| t.as_ref().map(|t| t.to_vec::<f32>()).transpose())
                        .collect::<Result<Vec<_>>>()?;
                    Ok((lv, ex, host))
                });
            match res {
                Ok((lv, ex, g)) => {
                    reports.push(MicroReport {
                        micro,
                        loss: lv.to_bits(),
                        extras: ex.into_iter().map(|(k, v)| (k, v.to_bits())).collect(),
                        present: g.iter().map(Option::is_some).collect(),
                        error: None,
                    });
                    grads.push(g);
                }
                Err(e) => {
                    let error = Some(match e.downcast_ref::<NonFinite>() {
                        Some(nf) => MicroError::NonFinite {
                            what: nf.what.to_string(),
                            value: nf.value.to_bits(),
                        },
                        None => MicroError::Other(format!("rank {r}: {e:#}")),
                    });
                    reports.push(MicroReport {
                        micro,
                        loss: 0,
                        extras: Vec::new(),
                        present: Vec::new(),
                        error,
                    });
                    break;
                }
            }
        }
        let gathered = c
            .all_gather(&serde_json::to_vec(&reports)?)
            .with_context(|| format!("step {step1}: gathering the micro-batch reports"))?;
        let mut all: Vec<MicroReport> = Vec::with_capacity(self.opt.grad_accum);
        for (q, b) in gathered.iter().enumerate() {
            let v: Vec<MicroReport> = serde_json::from_slice(b)
                .with_context(|| format!("step {step1}: rank {q}'s report"))?;
            all.extend(v);
        }
        if let Some((micro, e)) = all
            .iter()
            .find_map(|m| m.error.as_ref().map(|e| (m.micro, e)))
        {
            return Err(match e {
                MicroError::NonFinite { what, value } => NonFinite {
                    step: step1,
                    what: static_what(what),
                    value: f64::from_bits(*value),
                    micro: Some(micro),
                }
                .into(),
                MicroError::Other(msg) => anyhow!("step {step1}, micro-batch {micro}: {msg}"),
            });
        }
        ensure!(
            all.len() == self.opt.grad_accum
                && all.iter().enumerate().all(|(j, m)| m.micro == j
                    && m.present.len() == self.params.len()),
            "step {step1}: the ranks' reports do not cover micro-batches 0..{} (ranks built with different configs?)",
            self.opt.grad_accum
        );
        // a gradient exists where any micro-batch has it; elsewhere a part holds zeros
        let present: Vec<bool> = (0..self.params.len())
            .map(|k| all.iter().any(|m| m.present[k]))
            .collect();
        let mut offsets = Vec::with_capacity(self.params.len());
        let mut total = 0usize;
        for (p, &has) in self.params.iter().zip(&present) {
            offsets.push(total);
            if has {
                total += p.tensor.numel();
            }
        }
        let parts: Vec<Vec<f32>> = grads
            .into_iter()
            .map(|g| {
                let mut flat = vec![0f32; total];
                for (k, gk) in g.into_iter().enumerate() {
                    if let (true, Some(v)) = (present[k], gk) {
                        flat[offsets[k]..offsets[k] + v.len()].copy_from_slice(&v);
                    }
                }
                flat
            })
            .collect();
        let refs: Vec<&[f32]> = parts.iter().map(|v| &v[..]).collect();
        let mut sum = vec![0f32; total];
        c.sum_ordered(&refs, &mut sum)
            .with_context(|| format!("step {step1}: summing the gradients over {w} ranks"))?;
        drop(parts);
        let mut acc: Vec<Option<Tensor>> = Vec::with_capacity(self.params.len());
        for (k, p) in self.params.iter().enumerate() {
            acc.push(if present[k] {
                let n = p.tensor.numel();
                Some(Tensor::from_vec(
                    sum[offsets[k]..offsets[k] + n].to_vec(),
                    p.tensor.shape(),
                    p.tensor.device(),
                )?)
            } else {
                None
            });
        }
        // the losses and extras in micro-batch order, as one process adds them
        let mut loss_sum = 0.0;
        let mut extras = ExtrasSum::default();
        for m in all {
            loss_sum += f64::from_bits(m.loss);
            extras.add(
                m.extras
                    .into_iter()
                    .map(|(k, v)| (k, f64::from_bits(v)))
                    .collect(),
            );
        }
        self.apply(acc, loss_sum, extras)
    }

    /// The rest of an update from the summed gradients: global norm, clipping, AdamW.
    fn apply(
        &mut self,
        acc: Vec<Option<Tensor>>,
        loss_sum: f64,
        extras: ExtrasSum,
    ) -> Result<StepStats> {
        let i = self.step;
        let step1 = i + 1;
        let accum = self.opt.grad_accum;
        // global norm of the averaged gradient (kf_ops::reduce::sum_squares: the same bits
        // at any thread count)
        let inv = 1.0 / accum as f64;
        let present: Vec<&Tensor> = acc.iter().flatten().collect();
        let grad_norm = sum_squares(&present, inv)?.sqrt();
        if !grad_norm.is_finite() {
            return Err(NonFinite {
                step: step1,
                what: "the gradient norm is",
                value: grad_norm,
                micro: None,
            }
            .into());
        }
        let clip = if self.opt.grad_clip > 0.0 && grad_norm > self.opt.grad_clip {
            self.opt.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let factor = (clip * inv) as f32;
        let lr = self.opt.lr_at(i);
        let _ng = autograd::no_grad();
        for (p, a) in self.params.iter().zip(acc) {
            let Some(g) = a else { continue };
            let gt = if factor != 1.0 {
                scale(&g, factor as f64)?
            } else {
                g
            };
            let cfg = AdamWConfig {
                lr,
                beta1: self.opt.beta1,
                beta2: self.opt.beta2,
                eps: self.opt.eps,
                weight_decay: if p.decay { self.opt.weight_decay } else { 0.0 },
            };
            adamw_step(&p.tensor, &gt, &p.m, &p.v, step1, &cfg)
                .with_context(|| format!("step {step1}: AdamW on {}", p.name))?;
        }
        self.step = step1;
        let extras = extras.mean(accum);
        Ok(StepStats {
            step: step1,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            extras,
        })
    }

    /// Writes the moments as `m.<name>` and `v.<name>` (f32) with the step in the
    /// metadata (`format` = [`OPTIMIZER_FORMAT`], `step`), atomically.
    pub fn save_optimizer(&self, path: &Path) -> Result<()> {
        let items: Vec<(&str, &Tensor, &Tensor)> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.m, &p.v))
            .collect();
        write_optimizer(path, self.step, &items)
    }

    /// Restores the moments and the step from [`Trainer::save_optimizer`]'s file. Every parameter
    /// must have both moments with its shape, no tensor may be unknown, and the stored
    /// step must equal `expected_step`; errors name the file.
    pub fn load_optimizer(&mut self, path: &Path, expected_step: u64) -> Result<()> {
        let shapes: Vec<(&str, &[usize])> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.tensor.shape()))
            .collect();
        let fresh = read_optimizer(path, expected_step, &shapes)?;
        for (p, (m, v)) in self.params.iter_mut().zip(fresh) {
            p.m = m.to_device(p.tensor.device())?;
            p.v = v.to_device(p.tensor.device())?;
        }
        self.step = expected_step;
        Ok(())
    }
}

/// One micro-batch's outcome, as a rank reports it to the others (f64 as bits: exact, and
/// NaN survives JSON).
#[derive(Serialize, Deserialize)]
struct MicroReport {
    micro: usize,
    loss: u64,
    extras: Vec<(String, u64)>,
    present: Vec<bool>,
    error: Option<MicroError>,
}

#[derive(Serialize, Deserialize)]
enum MicroError {
    NonFinite { what: String, value: u64 },
    Other(String),
}

/// [`NonFinite::what`] for a remote rank's report.
fn static_what(what: &str) -> &'static str {
    match what {
        "the gradient norm is" => "the gradient norm is",
        "the model's logits hold" => "the model's logits hold",
        _ => "the training loss is",
    }
}

/// Writes AdamW moments `(name, m, v)` as `m.<name>` and `v.<name>` with `step` in the
/// metadata (`format` = [`OPTIMIZER_FORMAT`]), atomically: the file of [`Trainer::save_optimizer`],
/// shared by the kernel-device trainers so checkpoints move between devices.
pub fn write_optimizer(path: &Path, step: u64, moments: &[(&str, &Tensor, &Tensor)]) -> Result<()> {
    let names: Vec<(String, String)> = moments
        .iter()
        .map(|(n, _, _)| (format!("m.{n}"), format!("v.{n}")))
        .collect();
    let mut items: Vec<(&str, &Tensor)> = Vec::with_capacity(2 * moments.len());
    for ((_, m, v), (mn, vn)) in moments.iter().zip(&names) {
        items.push((mn, m));
        items.push((vn, v));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), OPTIMIZER_FORMAT.to_string());
    meta.insert("step".to_string(), step.to_string());
    kf_engine::io::save(path, &items, &meta)
}

/// Reads [`write_optimizer`]'s file for parameters `(name, shape)`: (m, v) per parameter in
/// that order, f32 on the CPU. Every parameter must have both moments with its shape, no
/// tensor may be unknown, moments must be finite (second moments >= 0) and the stored step
/// must equal `expected_step`; errors name the file.
pub fn read_optimizer(
    path: &Path,
    expected_step: u64,
    params: &[(&str, &[usize])],
) -> Result<Vec<(Tensor, Tensor)>> {
    let label = path.display();
    // io::load's own errors name the file
    let l = kf_engine::io::load(path).context("optimizer state")?;
    let res = (|| -> Result<Vec<(Tensor, Tensor)>> {
        ensure!(
            l.metadata.get("format").map(String::as_str) == Some(OPTIMIZER_FORMAT),
            "metadata format is {:?}, expected {OPTIMIZER_FORMAT:?}",
            l.metadata.get("format")
        );
        let step: u64 = l
            .metadata
            .get("step")
            .context("metadata has no step")?
            .parse()
            .context("metadata step is not an integer")?;
        ensure!(
            step == expected_step,
            "holds the state of step {step}, but trainer.json says step {expected_step}"
        );
        ensure!(
            l.tensors.len() == 2 * params.len(),
            "holds {} tensors, expected {} (m and v for each of {} parameters)",
            l.tensors.len(),
            2 * params.len(),
            params.len()
        );
        let mut fresh = Vec::with_capacity(params.len());
        for (name, shape) in params {
            let mut mv = Vec::with_capacity(2);
            for which in ["m", "v"] {
                let n = format!("{which}.{name}");
                let t = l
                    .get(&n)
                    .with_context(|| format!("tensor {n} is missing"))?;
                ensure!(
                    t.dtype() == DType::F32 && t.shape() == *shape,
                    "tensor {n} is {} {:?}, but the parameter is f32 {:?}",
                    t.dtype(),
                    t.shape(),
                    shape
                );
                let data = t.to_vec::<f32>()?;
                if which == "v" {
                    if let Some(bad) = data.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                        bail!("tensor {n} holds {bad}: second moments are finite and >= 0");
                    }
                } else if let Some(bad) = data.iter().find(|x| !x.is_finite()) {
                    bail!("tensor {n} holds {bad}: moments must be finite");
                }
                mv.push(Tensor::from_vec(data, shape, Device::Cpu)?);
            }
            let v = mv.pop().unwrap();
            let m = mv.pop().unwrap();
            fresh.push((m, v));
        }
        Ok(fresh)
    })();
    res.with_context(|| format!("optimizer state {label}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt() -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
        }
    }

    #[test]
    fn schedule_shape() {
        let o = opt();
        assert!((o.lr_at(0) - 1e-4).abs() < 1e-18);
        assert!((o.lr_at(9) - 1e-3).abs() < 1e-18);
        assert!((o.lr_at(10) - 1e-3).abs() < 1e-18);
        assert!((o.lr_at(60) - 5.5e-4).abs() < 1e-12);
        assert!((o.lr_at(110) - 1e-4).abs() < 1e-18);
        assert!((o.lr_at(500) - 1e-4).abs() < 1e-18);
        for i in 10..110 {
            assert!(o.lr_at(i + 1) <= o.lr_at(i));
        }
        let none = OptimConfig {
            warmup_steps: 0,
            ..o.clone()
        };
        assert_eq!(none.lr_at(0), 1e-3);
        assert!(OptimConfig {
            min_lr: 1.0,
            ..o.clone()
        }
        .validate()
        .is_err());
        assert!(OptimConfig {
            lr: f64::NAN,
            ..o.clone()
        }
        .validate()
        .is_err());
        assert!(OptimConfig { grad_accum: 0, ..o }.validate().is_err());
    }

    /// Loss = sum(w * x) over micro-batch-specific x: the averaged gradient is the mean x.
    #[test]
    fn accumulation_clipping_and_decay() {
        let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], Device::Cpu)
            .unwrap()
            .var();
        let b = Tensor::from_vec(vec![0.5f32, 0.5], &[2], Device::Cpu)
            .unwrap()
            .var();
        let mut o = opt();
        o.grad_accum = 2;
        o.grad_clip = 0.0;
        o.warmup_steps = 0;
        let mut tr = Trainer::new(&[("w".into(), w.clone()), ("b".into(), b.clone())], o).unwrap();
        assert!(tr.params()[0].decay && !tr.params()[1].decay);
        let xs = [[1.0f32, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]];
        let st = tr
            .train_step(|_, j| {
                let x = Tensor::from_vec(xs[j].to_vec(), &[2, 2], Device::Cpu).unwrap();
                let l = kf_ops::reduce::sum(&kf_ops::elementwise::mul(&w, &x)?)?;
                let l = kf_ops::elementwise::add(&l, &kf_ops::reduce::sum(&b)?)?;
                Ok((l, vec![("j".into(), j as f64)]))
            })
            .unwrap();
        assert_eq!(st.step, 1);
        assert_eq!(st.extras, vec![("j".to_string(), 0.5)]);
        // averaged grads: w -> [0.5, 0, 0, 1], b -> [1, 1]; norm sqrt(0.25 + 1 + 2)
        assert!((st.grad_norm - 3.25f64.sqrt()).abs() < 1e-12);
        assert!((st.loss - (1.0 + 8.0) / 2.0 - 1.0).abs() < 1e-6);
        let wv = w.to_vec::<f32>().unwrap();
        // first AdamW step moves every parameter with a gradient by ~lr against its sign
        let decay = 1.0 - 1e-3 * 0.1;
        assert!((wv[0] as f64 - (1.0 * decay - 1e-3)).abs() < 1e-6);
        assert!(
            (wv[1] as f64 - 2.0 * decay).abs() < 1e-6,
            "zero grad: decay only"
        );
        let bv = b.to_vec::<f32>().unwrap();
        assert!(
            (bv[0] as f64 - (0.5 - 1e-3)).abs() < 1e-6,
            "no decay on rank-1"
        );
    }

    #[test]
    fn non_finite_loss_leaves_parameters_alone() {
        let w = Tensor::from_vec(vec![1.0f32, 2.0], &[2], Device::Cpu)
            .unwrap()
            .var();
        let mut tr = Trainer::new(&[("w".into(), w.clone())], opt()).unwrap();
        let e = tr
            .train_step(|_, _| {
                let l = kf_ops::reduce::sum(&kf_ops::elementwise::scale(&w, f64::NAN)?)?;
                Ok((l, vec![]))
            })
            .unwrap_err();
        let nf = e.downcast_ref::<NonFinite>().expect("a NonFinite error");
        assert_eq!(nf.step, 1);
        assert!(
            e.to_string().contains("step 1: the training loss is NaN"),
            "{e}"
        );
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(tr.step(), 0);
        let plain = Tensor::from_vec(vec![1.0f32], &[1], Device::Cpu).unwrap();
        let e = Trainer::new(&[("p".into(), plain)], opt())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("set_trainable"), "{e}");
    }

    /// One rank of a data-parallel group (or the single process, `comm` None): 5 updates of
    /// a small non-linear loss whose gradients' sum depends on the order of the micro-batches;
    /// returns the final parameters' bits and every step's (loss, grad norm) bits.
    fn dp_run(
        comm: Option<SharedCollective>,
        init: f32,
        nan_at: Option<(u64, usize)>,
    ) -> Result<(Vec<u32>, Vec<(u64, u64)>)> {
        let w0: Vec<f32> = (0..64).map(|k| init + (k as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(w0, &[8, 8], Device::Cpu)?.var();
        let mut o = opt();
        o.grad_accum = 4;
        o.warmup_steps = 0;
        let mut tr = Trainer::new(&[("w".into(), w.clone())], o)?;
        if let Some(c) = comm {
            tr.set_collective(c)?;
        }
        let mut stats = Vec::new();
        for _ in 0..5 {
            let st = tr.train_step(|i, j| {
                // magnitudes spread over 1e-3 .. 1e3: f32 sums differ with the order
                let x: Vec<f32> = (0..64)
                    .map(|k| {
                        ((i as f32 + 1.0) * (j as f32 + 2.0) * k as f32 * 0.11).cos()
                            * 10f32.powi(j as i32 * 2 - 3)
                    })
                    .collect();
                let x = Tensor::from_vec(x, &[8, 8], Device::Cpu)?;
                let ww = kf_ops::elementwise::mul(&w, &w)?;
                let mut l = kf_ops::reduce::sum(&kf_ops::elementwise::mul(&ww, &x)?)?;
                if nan_at == Some((i, j)) {
                    l = kf_ops::elementwise::scale(&l, f64::NAN)?;
                }
                Ok((l, vec![("j".into(), j as f64)]))
            })?;
            stats.push((st.loss.to_bits(), st.grad_norm.to_bits()));
        }
        Ok((
            w.to_vec::<f32>()?.iter().map(|v| v.to_bits()).collect(),
            stats,
        ))
    }

    #[test]
    fn ranks_train_the_bits_of_one_process_and_share_its_errors() {
        use kf_engine::dist::{local::group, Timeout};
        let single = dp_run(None, 0.0, None).unwrap();
        for w in [2usize, 4] {
            let comms = group(w, Timeout::default());
            let runs: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .map(|c| {
                        // every rank but 0 starts elsewhere: rank 0's state is broadcast
                        let init = c.rank() as f32;
                        s.spawn(move || {
                            dp_run(Some(SharedCollective::new(Box::new(c))), init, None)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            for r in runs {
                assert_eq!(r, single, "{w} ranks");
            }
        }
        // the data is order-sensitive: step 1's gradient parts 2 w x_j summed in reverse give
        // other bits somewhere (so equal bits above come from the order, not from luck)
        let w0: Vec<f32> = (0..64).map(|k| (k as f32 * 0.37).sin()).collect();
        let g = |j: usize| -> Vec<f32> {
            (0..64)
                .map(|k| {
                    let x = (1.0 * (j as f32 + 2.0) * k as f32 * 0.11).cos()
                        * 10f32.powi(j as i32 * 2 - 3);
                    2.0 * w0[k] * x
                })
                .collect()
        };
        let fwd: Vec<f32> = (0..64)
            .map(|k| ((g(0)[k] + g(1)[k]) + g(2)[k]) + g(3)[k])
            .collect();
        let rev: Vec<f32> = (0..64)
            .map(|k| ((g(3)[k] + g(2)[k]) + g(1)[k]) + g(0)[k])
            .collect();
        assert_ne!(fwd, rev);

        // a non-finite loss on rank 1's micro-batch 3 is every rank's error, before any update
        let comms = group(2, Timeout::default());
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        dp_run(Some(SharedCollective::new(Box::new(c))), 0.0, Some((0, 3)))
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errs {
            assert!(
                e.contains("step 1: the training loss is NaN (micro-batch 3)")
                    || e.contains("step 1: the training loss is NaN"),
                "{e}"
            );
        }

        // grad_accum must split over the ranks
        let mut comms = group(3, Timeout::default());
        let c = comms.remove(0);
        let e = dp_run(Some(SharedCollective::new(Box::new(c))), 0.0, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("grad_accum 4 is not a multiple of the 3 ranks"),
            "{e}"
        );
    }
}
