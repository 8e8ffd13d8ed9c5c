//! Where a training run's updates happen: [`session`] moves a task (the teacher's
//! [`super::TeacherTask`], a distillation stage's `DistillTask`) to a device — the CPU, or a
//! kernel device (CUDA, or the emulator of the CUDA sources) — and pairs it with the autograd
//! [`Trainer`] for the shared step loop ([`super::drive`]). The model code, the autograd and
//! the trainer are the same on every device; the ops dispatch on where the tensors are. The
//! checkpoint files are the same too, so a run started on one device resumes on another.

use super::optim::{OptimConfig, SharedCollective, Trainer};
use super::run::{Session, TrainSession, TrainTask};
use anyhow::{Context, Result};
use kf_engine::Device;
use std::path::Path;

/// A checkpoint's optimizer file and the step it must hold.
#[derive(Clone, Copy, Debug)]
pub struct ResumeFrom<'a> {
    pub optimizer: &'a Path,
    pub step: u64,
}

/// A boxed session over task `T`.
pub type BoxSession<T> = Box<dyn Session<Task = T>>;

/// A training session on `device`: the task's models moved there (the trained one as
/// variables), the optimizer state from `resume` or zero; with `comm`, one rank of several
/// (rank 0's parameters, moments and step are taken by every rank).
pub fn session<T: TrainTask + 'static>(
    mut task: T,
    device: Device,
    opt: OptimConfig,
    resume: Option<ResumeFrom<'_>>,
    comm: Option<SharedCollective>,
) -> Result<BoxSession<T>> {
    if !device.is_cpu() {
        task.to_device(device)
            .with_context(|| format!("moving the models to {device}"))?;
    }
    let mut trainer = Trainer::new(&task.params(), opt)?;
    if let Some(r) = resume {
        trainer.load_optimizer(r.optimizer, r.step)?;
    }
    if let Some(c) = comm {
        trainer.set_collective(c)?;
    }
    Ok(Box::new(TrainSession {
        trainer,
        task,
        device,
    }))
}
