//! Training on a kernel device (`kf_ops::kdev::KernelDevice`: CUDA, or the CPU emulator of
//! the CUDA sources): [`DevBackend`] makes [`Session`]s whose updates
//! ([`DevTrainer`]: forward, hand-written backward, clip, AdamW) and validation run on the
//! device, while the task (windows, noises, tokenizer, model directory) stays the CPU
//! task's. The device session reads and writes the CPU trainer's files: model.safetensors
//! (f32, downloaded at each checkpoint), optimizer.safetensors (both moments), so a run
//! moves between devices at any checkpoint. Device kernels are deterministic (no float
//! atomics), so a resumed device run repeats the uninterrupted one bit for bit on the same
//! device.

use super::backend::{BoxSession, ResumeFrom, TrainBackend};
use super::optim::{read_optimizer, write_optimizer, Extras, OptimConfig, StepStats};
use super::run::{Session, TrainTask};
use super::TeacherTask;
use crate::ddit::Ddit;
use crate::distill::DistillTask;
use crate::kdev_train::{Batch, DevStepStats, DevTrainer};
use anyhow::{Context, Result};
use kf_engine::Tensor;
use kf_ops::kdev::KernelDevice;
use std::path::Path;

/// Sessions on the kernel device `dev`, named `name` in messages ("emu", "cuda:0").
pub struct DevBackend<'d, D: KernelDevice> {
    pub dev: &'d D,
    pub name: String,
}

impl<'d, D: KernelDevice> DevBackend<'d, D> {
    pub fn new(dev: &'d D, name: impl Into<String>) -> Self {
        DevBackend {
            dev,
            name: name.into(),
        }
    }
}

/// Restores the optimizer state of `resume` into `tr` (the CPU trainer's file and checks).
fn restore<D: KernelDevice>(
    tr: &mut DevTrainer<'_, D>,
    resume: Option<ResumeFrom<'_>>,
) -> Result<()> {
    if let Some(r) = resume {
        let moments = read_optimizer(r.optimizer, r.step, &tr.param_shapes())?;
        tr.load_state(r.step, &moments)
            .with_context(|| format!("optimizer state {}", r.optimizer.display()))?;
    }
    Ok(())
}

/// Writes `tr`'s optimizer state in the CPU trainer's format.
fn save_state<D: KernelDevice>(tr: &DevTrainer<'_, D>, path: &Path) -> Result<()> {
    let mv = tr.moments_to_host()?;
    let items: Vec<(&str, &Tensor, &Tensor)> =
        mv.iter().map(|(n, m, v)| (n.as_str(), m, v)).collect();
    write_optimizer(path, tr.step(), &items)
}

fn stats(s: DevStepStats, extras: Extras) -> StepStats {
    StepStats {
        step: s.step,
        loss: s.loss,
        lr: s.lr,
        grad_norm: s.grad_norm,
        extras,
    }
}

impl<D: KernelDevice> TrainBackend for DevBackend<'_, D> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn on_host(&self) -> bool {
        false
    }
    fn teacher<'s>(
        &'s self,
        task: TeacherTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, TeacherTask>> {
        let total = opt.total_steps;
        let accum = opt.grad_accum;
        let mut trainer = DevTrainer::new(self.dev, &task.model, opt)?;
        restore(&mut trainer, resume)?;
        Ok(Box::new(DevTeacherSession {
            trainer,
            task,
            total,
            accum,
        }))
    }
    fn stage<'s>(
        &'s self,
        _task: DistillTask,
        _opt: OptimConfig,
        _resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, DistillTask>> {
        anyhow::bail!("distillation on a kernel device: not wired yet")
    }
}

/// The AR teacher on a kernel device.
struct DevTeacherSession<'d, D: KernelDevice> {
    trainer: DevTrainer<'d, D>,
    task: TeacherTask,
    total: u64,
    accum: usize,
}

impl<D: KernelDevice> DevTeacherSession<'_, D> {
    /// The device's parameters into the task's host model.
    fn sync(&mut self) -> Result<()> {
        let cfg = self.task.model.cfg.clone();
        self.task.model = Ddit::from_params(&cfg, self.trainer.params_to_host()?)
            .context("downloading the trained parameters")?;
        Ok(())
    }
}

fn batch(w: &crate::data::WindowBatch) -> Batch {
    Batch {
        b: w.rows,
        t: w.seq_len,
        ids: w.inputs(),
        targets: w.targets(),
    }
}

impl<D: KernelDevice> Session for DevTeacherSession<'_, D> {
    type Task = TeacherTask;
    fn step(&self) -> u64 {
        self.trainer.step()
    }
    fn total_steps(&self) -> u64 {
        self.total
    }
    fn train_step(&mut self) -> Result<StepStats> {
        let i = self.trainer.step();
        let micro: Vec<Batch> = (0..self.accum)
            .map(|j| batch(&self.task.micro_windows(i, j)))
            .collect();
        Ok(stats(self.trainer.train_step(&micro)?, Vec::new()))
    }
    fn eval(&mut self) -> Result<f64> {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for w in self.task.val_windows()? {
            // (the loss of the training forward; its gradients are dropped)
            let l = self.trainer.loss_and_grads(&batch(&w))?.0;
            let k = w.rows * w.seq_len;
            sum += l * k as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }
    fn eval_extras(&self) -> Extras {
        Vec::new()
    }
    fn save_model(&mut self, dir: &Path) -> Result<()> {
        self.sync()?;
        self.task.save_model(dir)
    }
    fn save_optimizer(&mut self, path: &Path) -> Result<()> {
        save_state(&self.trainer, path)
    }
    fn tokens_per_step(&self) -> u64 {
        self.task.tokens_per_step()
    }
    fn thread_sensitive(&self) -> bool {
        false
    }
    fn into_task(mut self: Box<Self>) -> Result<TeacherTask> {
        self.sync()?;
        Ok(self.task)
    }
}
