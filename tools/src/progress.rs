//! Progress display shared by `kfrun train` and `kfrun distill`: a bar on stderr (loss,
//! lr, tokens/s, ETA, and the agreement when a run logs one), plain lines when stderr is not
//! a terminal, and the Ctrl-C handler (checkpoint after the current step).

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kf_model::train::{Event, StepRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `1234567` -> `1.23M`, `2500` -> `2.5k`.
pub fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Ctrl-C (also SIGTERM, SIGHUP) sets the returned flag: the run checkpoints after the
/// current step; a second Ctrl-C exits at once (the last checkpoint is kept).
pub fn install_stop_handler() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nkfrun: second Ctrl-C: exiting now; the last checkpoint is kept");
            std::process::exit(130);
        }
        eprintln!("\nkfrun: stop requested: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(stop)
}

fn extra(r: &StepRecord, key: &str) -> Option<f64> {
    r.extras.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// The bar and its state across the events of one or more runs.
pub struct RunProgress {
    bar: ProgressBar,
    plain: bool,
    tps_ema: Option<f64>,
    every: u64,
    /// `--resume` was given (for the "no checkpoint" message).
    resume: bool,
    /// Shows nothing (the ranks other than 0 of a data-parallel run).
    silent: bool,
}

impl RunProgress {
    pub fn new(resume: bool) -> RunProgress {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template("[{bar:20.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let plain = bar.is_hidden();
        RunProgress {
            bar,
            plain,
            tps_ema: None,
            every: 1,
            resume,
            silent: false,
        }
    }

    /// Shows nothing: rank 0 speaks for a data-parallel run.
    pub fn silent(mut self, yes: bool) -> RunProgress {
        if yes {
            self.bar.set_draw_target(ProgressDrawTarget::hidden());
            self.silent = true;
        }
        self
    }

    /// A line above the bar (or on stderr).
    pub fn say(&self, s: String) {
        if self.silent {
            return;
        }
        if self.plain {
            eprintln!("{s}");
        } else {
            self.bar.println(s);
        }
    }

    /// Shows one training event; `out` is the run directory (for messages).
    pub fn event(&mut self, ev: &Event, out: &std::path::Path) {
        if self.silent {
            return;
        }
        match ev {
            Event::Start {
                step,
                total,
                resumed_from,
            } => {
                self.bar.set_length(*total);
                self.bar.set_position(*step);
                self.bar.reset_eta();
                self.tps_ema = None;
                self.every = (*total / 20).max(1);
                match resumed_from {
                    Some(p) => self.say(format!(
                        "resuming from {} at step {step}/{total}",
                        p.display()
                    )),
                    None if self.resume => self.say(format!(
                        "no checkpoint in {}: starting from step 0/{total}",
                        out.display()
                    )),
                    None => self.say(format!("training {total} steps into {}", out.display())),
                }
            }
            Event::Step(r) => {
                let e = self
                    .tps_ema
                    .map_or(r.tokens_per_s, |e| 0.9 * e + 0.1 * r.tokens_per_s);
                self.tps_ema = Some(e);
                self.bar.set_position(r.step);
                let acc = extra(r, "acc").map_or(String::new(), |a| format!(" acc {a:.3}"));
                self.bar.set_message(format!(
                    "loss {:.3}{acc} lr {:.1e} {} tok/s",
                    r.loss,
                    r.lr,
                    human(e)
                ));
                if let Some(v) = r.val_loss {
                    let vacc = extra(r, "val_acc").map_or(String::new(), |a| {
                        let w = extra(r, "val_acc_window")
                            .map_or(String::new(), |w| format!(", whole windows {w:.3}"));
                        format!(", val agreement {a:.4}{w}")
                    });
                    self.say(format!(
                        "step {}: train loss {:.4}, val loss {:.4} (ppl {:.2}){vacc}, {} tok/s",
                        r.step,
                        r.loss,
                        v,
                        v.exp(),
                        human(e)
                    ));
                } else if self.plain && r.step % self.every == 0 {
                    self.say(format!(
                        "step {}: loss {:.4}{acc} lr {:.2e} grad norm {:.3} {} tok/s",
                        r.step,
                        r.loss,
                        r.lr,
                        r.grad_norm,
                        human(e)
                    ));
                }
            }
            Event::Checkpoint { step, path } => {
                self.say(format!("step {step}: checkpoint {}", path.display()))
            }
            Event::Final { path } => self.say(format!("model: {}", path.display())),
            Event::Warning(w) => self.say(format!("warning: {w}")),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
