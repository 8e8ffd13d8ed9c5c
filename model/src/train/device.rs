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
use super::optim::{read_optimizer, write_optimizer, Extras, ExtrasSum, OptimConfig, StepStats};
use super::run::{Session, TrainTask};
use super::TeacherTask;
use crate::ddit::Ddit;
use crate::distill::{
    inversion_pairs_from_logits, inversion_prefixes, step_extras, DistillMetrics, DistillTask,
    DistillTeacher, MicroInputs, Sums,
};
use crate::kdev_model::{
    rollout_double_dev, stage1_targets_dev, teacher_logits_dev, DevDdit, DevPflm,
};
use crate::kdev_train::{Batch, DevStepStats, DevTrainer, StairBatch};
use crate::pflm::{NoiseEncoder, Pflm};
use anyhow::{Context, Result};
use kf_engine::Tensor;
use kf_ops::kdev::KernelDevice;
use std::path::Path;

/// Sessions on the kernel device `dev`, named `name` in messages ("emu", "cuda:0").
pub struct DevBackend<'d, D: KernelDevice + ?Sized> {
    pub dev: &'d D,
    pub name: String,
}

impl<'d, D: KernelDevice + ?Sized> DevBackend<'d, D> {
    pub fn new(dev: &'d D, name: impl Into<String>) -> Self {
        DevBackend {
            dev,
            name: name.into(),
        }
    }
}

/// Restores the optimizer state of `resume` into `tr` (the CPU trainer's file and checks).
fn restore<D: KernelDevice + ?Sized>(
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
fn save_state<D: KernelDevice + ?Sized>(tr: &DevTrainer<'_, D>, path: &Path) -> Result<()> {
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

impl<D: KernelDevice + ?Sized> TrainBackend for DevBackend<'_, D> {
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
        task: DistillTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, DistillTask>> {
        let (total, accum) = (opt.total_steps, opt.grad_accum);
        let dev = self.dev;
        let teacher = match &task.teacher {
            DistillTeacher::Ar(t) => StageTeacher::Ar(DevDdit::upload(dev, t)?),
            DistillTeacher::Inversion(t) => StageTeacher::Inversion(DevDdit::upload(dev, t)?),
            DistillTeacher::Pflm(t) => StageTeacher::Pflm(Box::new(DevPflm::upload(dev, t)?)),
        };
        let mut trainer = DevTrainer::new_pflm(dev, &task.student, opt)?;
        restore(&mut trainer, resume)?;
        Ok(Box::new(DevStageSession {
            dev,
            trainer,
            teacher,
            task,
            total,
            accum,
        }))
    }
}

/// The AR teacher on a kernel device.
struct DevTeacherSession<'d, D: KernelDevice + ?Sized> {
    trainer: DevTrainer<'d, D>,
    task: TeacherTask,
    total: u64,
    accum: usize,
}

impl<D: KernelDevice + ?Sized> DevTeacherSession<'_, D> {
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

impl<D: KernelDevice + ?Sized> Session for DevTeacherSession<'_, D> {
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
            let l = self.trainer.eval_loss(&batch(&w))?;
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

/// A distillation stage's teacher on the device (the student is the trainer's).
enum StageTeacher {
    Ar(DevDdit),
    Pflm(Box<DevPflm>),
    Inversion(DevDdit),
}

/// A distillation stage on a kernel device: the teacher's targets (stage 1: the AR
/// teacher's inverse-CDF map; k -> 2k: the previous student's double-staircase rollout;
/// the inversion variant: the AR teacher's logits, inverted on the host), the student's
/// staircase updates and the validation all run on the device.
struct DevStageSession<'d, D: KernelDevice + ?Sized> {
    dev: &'d D,
    trainer: DevTrainer<'d, D>,
    teacher: StageTeacher,
    task: DistillTask,
    total: u64,
    accum: usize,
}

/// The staircase batch of `mi`: the contexts, the student's noises and the teacher's
/// targets (as `DistillTeacher::batch` on the CPU).
fn stair_batch<D: KernelDevice + ?Sized>(
    dev: &D,
    teacher: &StageTeacher,
    n: usize,
    k: usize,
    mi: &MicroInputs,
) -> Result<StairBatch> {
    let (rows, w) = (mi.rows, mi.w);
    let ctx: Vec<u32> = (0..rows)
        .flat_map(|r| mi.tokens[r * w..r * w + n].iter().copied())
        .collect();
    let (u, targets) = match teacher {
        StageTeacher::Ar(t) => {
            let u = mi.u.to_vec_f64()?;
            let tg = stage1_targets_dev(dev, t, &ctx, rows, n, &u, mi.tau)
                .context("the AR teacher's targets")?;
            (u, tg)
        }
        StageTeacher::Pflm(t) => {
            let u = mi.u.to_vec_f64()?;
            let tg = rollout_double_dev(dev, t, &ctx, rows, n, &u, mi.tau)
                .context("the teacher's rollout")?;
            (u, tg)
        }
        StageTeacher::Inversion(t) => {
            let seq = inversion_prefixes(&mi.tokens, rows, w, n, k);
            let lg = teacher_logits_dev(dev, t, &seq, rows, n + k - 1)
                .context("the AR teacher's logits")?;
            let (u, tg) = inversion_pairs_from_logits(
                &lg,
                t.cfg.vocab_size,
                &mi.tokens,
                rows,
                w,
                n,
                k,
                &mi.u,
                mi.tau,
            )?;
            (u.to_vec_f64()?, tg.to_vec::<u32>()?)
        }
    };
    Ok(StairBatch {
        b: rows,
        n,
        kk: k,
        ctx,
        u,
        tau: mi.tau,
        targets,
    })
}

/// Whether each prediction equals its target.
fn hits(pred: &[u32], sb: &StairBatch) -> Vec<bool> {
    pred.iter().zip(&sb.targets).map(|(a, b)| a == b).collect()
}

/// The agreement metrics of one batch's per-target losses and predictions.
fn metrics_of(rl: &[f64], pred: &[u32], sb: &StairBatch) -> DistillMetrics {
    let mut s = Sums::new(sb.kk);
    s.add(rl, &hits(pred, sb));
    s.finish()
}

impl<D: KernelDevice + ?Sized> DevStageSession<'_, D> {
    /// The device's parameters into the task's host student.
    fn sync(&mut self) -> Result<()> {
        let s = &self.task.student;
        let (cfg, k, d, eps) = (s.cfg().clone(), s.k, s.cfg().d_model, s.cfg().ln_eps);
        let nb = s.backbone.params().len();
        let mut named = self
            .trainer
            .params_to_host()
            .context("downloading the trained parameters")?;
        let noise = named.split_off(nb);
        let backbone = Ddit::from_params(&cfg, named)?;
        self.task.student =
            Pflm::from_parts(backbone, NoiseEncoder::from_params(d, eps, noise)?, k)?;
        Ok(())
    }

    fn batch(&self, mi: &MicroInputs) -> Result<StairBatch> {
        stair_batch(
            self.dev,
            &self.teacher,
            self.task.ctx_len(),
            self.task.student.k,
            mi,
        )
    }
}

impl<D: KernelDevice + ?Sized> Session for DevStageSession<'_, D> {
    type Task = DistillTask;
    fn step(&self) -> u64 {
        self.trainer.step()
    }
    fn total_steps(&self) -> u64 {
        self.total
    }
    fn train_step(&mut self) -> Result<StepStats> {
        let i = self.trainer.step();
        let mut micro = Vec::with_capacity(self.accum);
        for j in 0..self.accum {
            let mi = self.task.micro_inputs(i, j)?;
            micro.push(
                self.batch(&mi)
                    .with_context(|| format!("step {}, micro-batch {j}", i + 1))?,
            );
        }
        let (st, rows) = self.trainer.train_step_staircase_rows(&micro)?;
        // the CPU's per-step extras: each micro-batch's metrics, averaged
        let mut extras = ExtrasSum::default();
        for ((rl, pred), sb) in rows.iter().zip(&micro) {
            extras.add(step_extras(&metrics_of(rl, pred, sb)));
        }
        Ok(stats(st, extras.mean(micro.len())))
    }
    fn eval(&mut self) -> Result<f64> {
        let k = self.task.student.k;
        let mut sums = Sums::new(k);
        let (dev, teacher, trainer, task) =
            (self.dev, &self.teacher, &mut self.trainer, &self.task);
        task.for_each_eval(|mi| {
            let sb = stair_batch(dev, teacher, task.ctx_len(), k, &mi)?;
            let (rl, pred) = trainer.staircase_eval(&sb)?;
            sums.add(&rl, &hits(&pred, &sb));
            Ok(())
        })
        .context("validation")?;
        let m = sums.finish();
        let loss = m.loss;
        self.task.last_eval = Some(m);
        Ok(loss)
    }
    fn eval_extras(&self) -> Extras {
        self.task.eval_extras()
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
    fn into_task(mut self: Box<Self>) -> Result<DistillTask> {
        self.sync()?;
        Ok(self.task)
    }
}
