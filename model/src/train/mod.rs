//! Training: the AR teacher (`kfrun train`) on the generic machinery that the
//! distillation stages reuse.
//!
//! * [`optim`]: [`Trainer`] — AdamW (decoupled weight decay, none on rank-1 tensors:
//!   LayerNorm weights and biases), warmup + cosine schedule, gradient accumulation,
//!   global grad-norm clipping; the loss is a closure `(step, micro) -> (loss, extras)`.
//! * [`run`]: [`drive`] — the step loop, validation, metrics.jsonl, loss.svg,
//!   checkpoints, Ctrl-C, NaN stop, the final model directory; the work is a [`TrainTask`].
//! * [`backend`]: where the updates run (a [`Session`] per run).
//! * [`config`]: [`TrainConfig`] and the memory estimates; [`teacher`]: the AR teacher's
//!   task and run (`kfrun train`).
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
pub mod config;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod teacher;

pub use backend::{session, BoxSession, ResumeFrom};
pub use checkpoint::{DataId, TrainerState};
pub use metrics::StepRecord;
pub use optim::{Extras, NonFinite, OptimConfig, SharedCollective, StepStats, Trainer};
pub use run::{drive, Event, Outcome, RunSpec, Session, TrainSession, TrainTask, FINAL_DIR};

pub use config::{
    available_memory, estimate_train_bytes, from_json_named, window_bytes, ModelSpec, TrainConfig,
};
pub use teacher::{train_teacher, train_teacher_on, TeacherOptions, TeacherTask};

pub(crate) use config::json_diff;

use crate::data::TokenData;

pub(crate) fn data_id(data: &TokenData) -> DataId {
    DataId {
        tokenizer_sha256: data.meta.tokenizer_sha256.clone(),
        corpus_sha256: data.meta.corpus_sha256.clone(),
        train_tokens: data.meta.train.tokens,
        val_tokens: data.meta.val.tokens,
    }
}
