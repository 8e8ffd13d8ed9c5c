//! Where a training run's updates happen: [`TrainBackend`] turns a task (the teacher's
//! [`TeacherTask`], a distillation stage's [`DistillTask`]) and its optimizer settings into
//! a [`Session`] for the shared step loop ([`super::drive`]). [`CpuBackend`] is the CPU
//! autograd [`Trainer`]; `super::device::DevBackend` runs the updates and the validation on
//! a kernel device (CUDA, or the emulator of the CUDA sources). Both read and write the same
//! checkpoint files, so a run started on one can be resumed on the other.

use super::optim::{OptimConfig, Trainer};
use super::run::{CpuSession, Session};
use super::TeacherTask;
use crate::distill::DistillTask;
use anyhow::Result;
use std::path::Path;

/// A checkpoint's optimizer file and the step it must hold.
#[derive(Clone, Copy, Debug)]
pub struct ResumeFrom<'a> {
    pub optimizer: &'a Path,
    pub step: u64,
}

/// A boxed session over task `T`, borrowing the backend.
pub type BoxSession<'s, T> = Box<dyn Session<Task = T> + 's>;

/// Makes training sessions on one device.
pub trait TrainBackend {
    /// The device in words, for messages ("cpu", "emu", "cuda:0").
    fn name(&self) -> String;
    /// Whether the run's memory is host memory (then the host memory check applies).
    fn on_host(&self) -> bool;
    /// The AR teacher's session: `task.model` trainable, f32; the optimizer state from
    /// `resume` or zero.
    fn teacher<'s>(
        &'s self,
        task: TeacherTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, TeacherTask>>;
    /// A distillation stage's session (the student `task.student`, its teacher
    /// `task.teacher`).
    fn stage<'s>(
        &'s self,
        task: DistillTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, DistillTask>>;
}

/// The CPU autograd trainer.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl TrainBackend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn on_host(&self) -> bool {
        true
    }
    fn teacher<'s>(
        &'s self,
        task: TeacherTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, TeacherTask>> {
        let mut trainer = Trainer::new(task.model.params(), opt)?;
        if let Some(r) = resume {
            trainer.load_optimizer(r.optimizer, r.step)?;
        }
        Ok(Box::new(CpuSession { trainer, task }))
    }
    fn stage<'s>(
        &'s self,
        task: DistillTask,
        opt: OptimConfig,
        resume: Option<ResumeFrom<'_>>,
    ) -> Result<BoxSession<'s, DistillTask>> {
        let mut trainer = Trainer::new(&task.student.params(), opt)?;
        if let Some(r) = resume {
            trainer.load_optimizer(r.optimizer, r.step)?;
        }
        Ok(Box::new(CpuSession { trainer, task }))
    }
}
