//! The training driver shared by the teacher and the distillation stages: the step
//! loop around a [`Session`]'s update, periodic validation, metrics, checkpoints,
//! the loss plot, stop requests (Ctrl-C) and the final model directory. What is
//! trained and on what data is a [`TrainTask`]; where the updates run (the CPU autograd
//! [`Trainer`] or a kernel device) is the session's business.
//!
//! Order of work at step `s` (1-based): the update; the validation loss when `s` is a
//! multiple of `eval_every` or the last step; the metrics line; a checkpoint when `s` is
//! a multiple of `checkpoint_every`, the last step, `--max-steps`, or after a stop
//! request. A checkpoint therefore always includes its own step's metrics line, and a
//! resumed run continues at `s + 1` exactly as the uninterrupted run would.
//!
//! As one rank of several (a session with a collective), every rank runs this loop in
//! step: the ranks agree on stopping after each step, every rank validates (the same bits),
//! and rank 0 alone writes metrics.jsonl, checkpoints, the plot, summary.json and `final/`;
//! the run ends with a barrier, so no rank moves on before rank 0's files are complete.

use super::checkpoint::{self, DataId, TrainerState, CKPT_DIR, OPTIMIZER_FILE, TRAINER_FORMAT};
use super::metrics::{Curves, MetricsLog, StepRecord, METRICS_FILE, PLOT_FILE};
use super::optim::{Extras, NonFinite, StepStats, Trainer};
use anyhow::{anyhow, Context, Result};
use kf_engine::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Name of the final model directory inside the run directory.
pub const FINAL_DIR: &str = "final";
/// Run summary written next to it.
pub const SUMMARY_FILE: &str = "summary.json";

/// What a run trains.
pub trait TrainTask {
    /// The loss of micro-batch `micro` of update `step` (0-based), on the tape, plus
    /// extra metrics. Must be a pure function of `(step, micro)` and the parameters.
    fn loss(&mut self, step: u64, micro: usize) -> Result<(Tensor, Extras)>;
    /// The validation loss in nats/token (deterministic, no tape).
    fn eval(&mut self) -> Result<f64>;
    /// Writes a complete model directory (config.json, model.safetensors, tokenizer.json)
    /// into `dir`, which exists and is empty.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// Tokens one update consumes (for tokens/s).
    fn tokens_per_step(&self) -> u64;
    /// Extra validation metrics of the last [`TrainTask::eval`], logged as `val_<name>`.
    fn eval_extras(&self) -> Extras {
        Vec::new()
    }
    /// The trained parameters (variables), in a fixed order.
    fn params(&self) -> Vec<(String, Tensor)>;
    /// Moves the task's models to `device`, the trained one as variables again.
    fn to_device(&mut self, device: Device) -> Result<()>;
}

/// What the step loop drives: an optimizer and its task together ([`TrainSession`]).
pub trait Session {
    /// The task the session trains (returned by [`Session::into_task`]).
    type Task;
    /// Completed updates.
    fn step(&self) -> u64;
    fn total_steps(&self) -> u64;
    /// One update (all micro-batches), as [`Trainer::train_step`].
    fn train_step(&mut self) -> Result<StepStats>;
    /// The validation loss in nats/token (deterministic).
    fn eval(&mut self) -> Result<f64>;
    /// Extra validation metrics of the last [`Session::eval`].
    fn eval_extras(&self) -> Extras;
    /// Writes a complete model directory into `dir` (exists, empty).
    fn save_model(&mut self, dir: &Path) -> Result<()>;
    /// Writes the optimizer state (`optimizer.safetensors` format) to `path`.
    fn save_optimizer(&mut self, path: &Path) -> Result<()>;
    fn tokens_per_step(&self) -> u64;
    /// Whether the losses depend on the host's thread count (the CPU path's reductions).
    fn thread_sensitive(&self) -> bool;
    /// The task, its model holding the trained parameters.
    fn into_task(self: Box<Self>) -> Result<Self::Task>;
    /// This process's rank and the number of ranks ((0, 1) for a single process).
    fn rank_size(&self) -> Result<(usize, usize)> {
        Ok((0, 1))
    }
    /// Whether any rank's `flag` is set (the ranks' agreement on stopping).
    fn any_rank(&mut self, flag: bool) -> Result<bool> {
        Ok(flag)
    }
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The autograd [`Trainer`] on a [`TrainTask`] whose models are on `device`.
pub struct TrainSession<T: TrainTask> {
    pub trainer: Trainer,
    pub task: T,
    pub device: Device,
}

impl<T: TrainTask> Session for TrainSession<T> {
    type Task = T;
    fn step(&self) -> u64 {
        self.trainer.step()
    }
    fn total_steps(&self) -> u64 {
        self.trainer.optim().total_steps
    }
    fn train_step(&mut self) -> Result<StepStats> {
        let task = &mut self.task;
        self.trainer.train_step(|i, j| task.loss(i, j))
    }
    fn eval(&mut self) -> Result<f64> {
        self.task.eval()
    }
    fn eval_extras(&self) -> Extras {
        self.task.eval_extras()
    }
    fn save_model(&mut self, dir: &Path) -> Result<()> {
        self.task.save_model(dir)
    }
    fn save_optimizer(&mut self, path: &Path) -> Result<()> {
        self.trainer.save_optimizer(path)
    }
    fn tokens_per_step(&self) -> u64 {
        self.task.tokens_per_step()
    }
    fn thread_sensitive(&self) -> bool {
        // the CPU ops split their sums by thread count; the kernels' reductions are fixed
        self.device.is_cpu()
    }
    fn into_task(self: Box<Self>) -> Result<T> {
        let mut task = self.task;
        if !self.device.is_cpu() {
            task.to_device(Device::Cpu)?;
        }
        Ok(task)
    }
    fn rank_size(&self) -> Result<(usize, usize)> {
        self.trainer.rank_size()
    }
    fn any_rank(&mut self, flag: bool) -> Result<bool> {
        let Some(c) = self.trainer.collective() else {
            return Ok(flag);
        };
        let mut c = c.lock()?;
        Ok(c.all_gather(&[flag as u8])?
            .iter()
            .any(|b| b.first() == Some(&1)))
    }
    fn barrier(&mut self) -> Result<()> {
        let Some(c) = self.trainer.collective() else {
            return Ok(());
        };
        let mut c = c.lock()?;
        c.barrier()
    }
}

/// Where and how a run goes.
pub struct RunSpec {
    /// Run directory: ckpt/, final/, metrics.jsonl, loss.svg, summary.json.
    pub out: PathBuf,
    /// "teacher", or the distillation stage's name (recorded in trainer.json).
    pub kind: String,
    /// Title of the loss plot.
    pub title: String,
    /// The training configuration (recorded in trainer.json and summary.json).
    pub config: serde_json::Value,
    pub seed: u64,
    pub data: DataId,
    /// Validation every this many steps (and at the last step); 0 = only at the end.
    pub eval_every: u64,
    /// Checkpoint every this many steps (and at the last step); 0 = only at the end.
    pub checkpoint_every: u64,
    /// Stop (with a checkpoint) once this many steps are done, before `total_steps`.
    pub max_steps: Option<u64>,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
}

/// Progress reports for a display (the progress bar of `kfrun train`).
#[derive(Debug)]
pub enum Event<'a> {
    /// Training starts or resumes after `step` completed steps.
    Start {
        step: u64,
        total: u64,
        resumed_from: Option<&'a Path>,
    },
    Step(&'a StepRecord),
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
    Final {
        path: &'a Path,
    },
    Warning(String),
}

/// How a run ended (errors, NaN included, are `Err`).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// All `total_steps` done; the model is in `final_dir`.
    Finished {
        step: u64,
        final_dir: PathBuf,
        val_loss: Option<f64>,
        best_val_loss: Option<f64>,
        elapsed_s: f64,
        /// Mean training throughput of this session (update time only).
        tokens_per_s: f64,
    },
    /// `max_steps` reached; resume with `--resume`.
    Paused { step: u64, checkpoint: PathBuf },
    /// A stop request (Ctrl-C) was honoured after a step; resume with `--resume`.
    Interrupted { step: u64, checkpoint: PathBuf },
}

struct Driver<'a> {
    spec: &'a RunSpec,
    /// None on ranks other than 0 (they write nothing).
    log: Option<MetricsLog>,
    curves: Curves,
    best_val: Option<f64>,
    last_val: Option<f64>,
    tokens: u64,
    elapsed0: f64,
    t0: Instant,
    last_ckpt: Option<(u64, PathBuf)>,
}

impl Driver<'_> {
    fn elapsed(&self) -> f64 {
        self.elapsed0 + self.t0.elapsed().as_secs_f64()
    }

    fn state(&mut self, step: u64) -> Result<TrainerState> {
        Ok(TrainerState {
            format: TRAINER_FORMAT.to_string(),
            kind: self.spec.kind.clone(),
            step,
            seed: self.spec.seed,
            config: self.spec.config.clone(),
            data: self.spec.data.clone(),
            best_val_loss: self.best_val,
            last_val_loss: self.last_val,
            metrics_bytes: match &mut self.log {
                Some(l) => l.sync()?,
                None => 0,
            },
            tokens_seen: self.tokens,
            elapsed_s: self.elapsed(),
            threads: rayon::current_num_threads(),
        })
    }

    fn root(&self) -> bool {
        self.log.is_some()
    }

    fn sync_log(&mut self) {
        if let Some(l) = &mut self.log {
            let _ = l.sync();
        }
    }

    fn plot(&self) -> Result<()> {
        if !self.root() {
            return Ok(());
        }
        super::metrics::write_loss_svg(
            &self.spec.out.join(PLOT_FILE),
            &self.curves,
            &self.spec.title,
        )
    }

    fn checkpoint<S: Session + ?Sized>(&mut self, sess: &mut S) -> Result<PathBuf> {
        let step = sess.step();
        if !self.root() {
            // rank 0 writes it; the others know where
            let path = self.spec.out.join(CKPT_DIR);
            self.last_ckpt = Some((step, path.clone()));
            return Ok(path);
        }
        let state = self.state(step)?;
        let path = checkpoint::write_dir_atomic(&self.spec.out, CKPT_DIR, |d| {
            sess.save_model(d)?;
            sess.save_optimizer(&d.join(OPTIMIZER_FILE))?;
            state.write(d)
        })?;
        self.plot()?;
        self.last_ckpt = Some((step, path.clone()));
        Ok(path)
    }

    /// The validation loss at step `s` (an error when it is not finite).
    fn validate<S: Session + ?Sized>(&mut self, sess: &mut S, s: u64) -> Result<f64> {
        let v = sess
            .eval()
            .with_context(|| format!("validation at step {s}; {}", self.where_good()))?;
        if !v.is_finite() {
            self.sync_log();
            return Err(anyhow!(
                "step {s}: the validation loss is {v}: training stopped; {}",
                self.where_good()
            ));
        }
        self.last_val = Some(v);
        self.best_val = Some(self.best_val.map_or(v, |b| b.min(v)));
        Ok(v)
    }

    /// After the last step: a checkpoint of it, the final model directory, the plot and
    /// summary.json.
    fn finish<S: Session + ?Sized>(
        &mut self,
        sess: &mut S,
        train_time: f64,
        trained_tokens: u64,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Outcome> {
        // done: the final model directory (also when resuming a finished run)
        let step = sess.step();
        if self.last_ckpt.as_ref().map(|c| c.0) != Some(step) {
            let p = self.checkpoint(sess)?;
            on_event(&Event::Checkpoint { step, path: &p });
        }
        let final_dir = if self.root() {
            checkpoint::write_dir_atomic(&self.spec.out, FINAL_DIR, |dir| sess.save_model(dir))?
        } else {
            self.spec.out.join(FINAL_DIR)
        };
        self.plot()?;
        let tokens_per_s = if train_time > 0.0 {
            trained_tokens as f64 / train_time
        } else {
            0.0
        };
        let elapsed_s = self.elapsed();
        let summary = serde_json::json!({
            "kind": self.spec.kind,
            "steps": step,
            "tokens": self.tokens,
            "val_loss": self.last_val,
            "val_ppl": self.last_val.map(f64::exp),
            "best_val_loss": self.best_val,
            "elapsed_s": elapsed_s,
            "tokens_per_s_last_session": tokens_per_s,
            "threads": rayon::current_num_threads(),
            "config": self.spec.config,
            "final_dir": final_dir,
        });
        if self.root() {
            kf_engine::fs::write_atomic(
                &self.spec.out.join(SUMMARY_FILE),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
        }
        // no rank goes on (to the next stage, which reads final/) before rank 0 wrote it
        sess.barrier()
            .context("waiting for the other ranks at the end of the run")?;
        on_event(&Event::Final { path: &final_dir });
        Ok(Outcome::Finished {
            step,
            final_dir,
            val_loss: self.last_val,
            best_val_loss: self.best_val,
            elapsed_s,
            tokens_per_s,
        })
    }

    fn where_good(&self) -> String {
        match &self.last_ckpt {
            Some((s, p)) => format!("the last good checkpoint is {} (step {s})", p.display()),
            None => "no checkpoint was written".to_string(),
        }
    }
}

/// Runs a [`Session`] until `total_steps`, `max_steps` or a stop request. `resumed` is
/// the state of the checkpoint the caller restored the model and the optimizer from
/// (then metrics.jsonl is cut back to it); `None` starts a fresh run.
pub fn drive<S: Session + ?Sized>(
    sess: &mut S,
    spec: &RunSpec,
    resumed: Option<(&TrainerState, &Path)>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Outcome> {
    let (rank, _) = sess.rank_size()?;
    let total = sess.total_steps();
    let metrics_path = spec.out.join(METRICS_FILE);
    let (log, curves) = if rank == 0 {
        std::fs::create_dir_all(&spec.out)
            .with_context(|| format!("cannot create {}", spec.out.display()))?;
        checkpoint::remove_stale_temps(&spec.out)?;
        let (l, c) = match resumed {
            Some((st, _)) => MetricsLog::resume(&metrics_path, st.metrics_bytes)?,
            None => (MetricsLog::create(&metrics_path)?, Curves::default()),
        };
        (Some(l), c)
    } else {
        (None, Curves::default())
    };
    let mut d = Driver {
        spec,
        log,
        curves,
        best_val: resumed.and_then(|r| r.0.best_val_loss),
        last_val: resumed.and_then(|r| r.0.last_val_loss),
        tokens: resumed.map_or(0, |r| r.0.tokens_seen),
        elapsed0: resumed.map_or(0.0, |r| r.0.elapsed_s),
        t0: Instant::now(),
        last_ckpt: resumed.map(|(s, p)| (s.step, p.to_path_buf())),
    };
    if let Some((st, _)) = resumed {
        let now = rayon::current_num_threads();
        if sess.thread_sensitive() && st.threads != now {
            on_event(&Event::Warning(format!(
                "the checkpoint was written by a run on {} threads, this one has {now}: the resumed losses may differ in the last bits from an uninterrupted run",
                st.threads
            )));
        }
    }
    on_event(&Event::Start {
        step: sess.step(),
        total,
        resumed_from: resumed.map(|r| r.1),
    });
    let tps = sess.tokens_per_step();
    let (mut train_time, mut trained_tokens) = (0.0f64, 0u64);
    let stop_requested = || spec.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    while sess.step() < total {
        let step = sess.step();
        // every rank stops after the same step
        let stop_now = sess.any_rank(stop_requested())?;
        if stop_now || spec.max_steps.is_some_and(|m| step >= m) {
            let checkpoint = match &d.last_ckpt {
                Some((s, p)) if *s == step => p.clone(),
                _ => {
                    let p = d.checkpoint(sess)?;
                    on_event(&Event::Checkpoint { step, path: &p });
                    p
                }
            };
            return Ok(if stop_now {
                Outcome::Interrupted { step, checkpoint }
            } else {
                Outcome::Paused { step, checkpoint }
            });
        }
        let t = Instant::now();
        let stats = match sess.train_step() {
            Ok(s) => s,
            Err(e) => {
                d.sync_log();
                let _ = d.plot();
                return Err(match e.downcast_ref::<NonFinite>() {
                    Some(nf) => anyhow!("{nf}: training stopped; {}", d.where_good()),
                    None => e.context(format!(
                        "training stopped at step {}; {}",
                        step + 1,
                        d.where_good()
                    )),
                });
            }
        };
        let dt = t.elapsed().as_secs_f64();
        train_time += dt;
        trained_tokens += tps;
        d.tokens += tps;
        let s = stats.step;
        let last = s == total;
        let val_loss = if last || (spec.eval_every > 0 && s % spec.eval_every == 0) {
            Some(d.validate(sess, s)?)
        } else {
            None
        };
        let mut extras = stats.extras;
        if val_loss.is_some() {
            extras.extend(
                sess.eval_extras()
                    .into_iter()
                    .map(|(k, v)| (format!("val_{k}"), v)),
            );
        }
        let rec = StepRecord {
            step: s,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens: d.tokens,
            tokens_per_s: tps as f64 / dt.max(1e-9),
            elapsed_s: d.elapsed(),
            val_loss,
            extras,
        };
        if let Some(l) = &mut d.log {
            l.append(&rec)?;
        }
        d.curves.push(&rec);
        on_event(&Event::Step(&rec));
        if last || (spec.checkpoint_every > 0 && s % spec.checkpoint_every == 0) {
            let p = d.checkpoint(sess)?;
            on_event(&Event::Checkpoint { step: s, path: &p });
        }
    }
    d.finish(sess, train_time, trained_tokens, on_event)
}
