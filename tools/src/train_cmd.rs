//! `kfrun train`: trains the AR teacher (kf_model::train) with a progress bar on
//! stderr (loss, lr, tokens/s, ETA), Ctrl-C (also SIGTERM, SIGHUP) -> checkpoint after
//! the current step and exit 130, and a summary on stdout.

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kf_model::train::{self, Event, Outcome, TeacherOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// Training config JSON (configs/tiny.json, small.json, paper.json); optional with
    /// --resume (the checkpoint holds it; if given it must be the same).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prepared token shards (the --out of `kfrun data prepare`).
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer.json the shards were prepared with [default: DATA/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run directory: ckpt/ (latest checkpoint), final/ (the trained model),
    /// metrics.jsonl, loss.svg, summary.json.
    #[arg(long)]
    out: PathBuf,
    /// Continue from OUT's checkpoint (starts fresh when OUT holds none).
    #[arg(long)]
    resume: bool,
    /// Stop with a checkpoint once this many steps (counted from the start of the run)
    /// are done; the schedule still follows the config's total_steps.
    #[arg(long)]
    max_steps: Option<u64>,
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
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

    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("[{bar:20.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let plain = bar.is_hidden();
    let say = |s: String| {
        if plain {
            eprintln!("{s}");
        } else {
            bar.println(s);
        }
    };
    let mut tps_ema: Option<f64> = None;
    let mut every = 1u64;
    let opts = TeacherOptions {
        config: a.config.clone(),
        data: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        out: a.out.clone(),
        resume: a.resume,
        max_steps: a.max_steps,
        stop: Some(stop),
    };
    let res = train::train_teacher(&opts, &mut |ev| match ev {
        Event::Start {
            step,
            total,
            resumed_from,
        } => {
            bar.set_length(*total);
            bar.set_position(*step);
            bar.reset_eta();
            every = (*total / 20).max(1);
            match resumed_from {
                Some(p) => say(format!(
                    "resuming from {} at step {step}/{total}",
                    p.display()
                )),
                None if a.resume => say(format!(
                    "no checkpoint in {}: starting from step 0/{total}",
                    a.out.display()
                )),
                None => say(format!("training {total} steps into {}", a.out.display())),
            }
        }
        Event::Step(r) => {
            let e = tps_ema.map_or(r.tokens_per_s, |e| 0.9 * e + 0.1 * r.tokens_per_s);
            tps_ema = Some(e);
            bar.set_position(r.step);
            bar.set_message(format!(
                "loss {:.3} lr {:.1e} {} tok/s",
                r.loss,
                r.lr,
                human(e)
            ));
            if let Some(v) = r.val_loss {
                say(format!(
                    "step {}: train loss {:.4}, val loss {:.4} (ppl {:.2}), {} tok/s",
                    r.step,
                    r.loss,
                    v,
                    v.exp(),
                    human(e)
                ));
            } else if plain && r.step % every == 0 {
                say(format!(
                    "step {}: loss {:.4} lr {:.2e} grad norm {:.3} {} tok/s",
                    r.step,
                    r.loss,
                    r.lr,
                    r.grad_norm,
                    human(e)
                ));
            }
        }
        Event::Checkpoint { step, path } => {
            say(format!("step {step}: checkpoint {}", path.display()))
        }
        Event::Final { path } => say(format!("model: {}", path.display())),
        Event::Warning(w) => say(format!("warning: {w}")),
    });
    bar.finish_and_clear();
    match res? {
        Outcome::Finished {
            step,
            final_dir,
            val_loss,
            elapsed_s,
            tokens_per_s,
            ..
        } => {
            println!(
                "trained {step} steps in {elapsed_s:.1} s ({} tokens/s)",
                human(tokens_per_s)
            );
            if let Some(v) = val_loss {
                println!(
                    "validation loss {v:.4} nats/token, perplexity {:.2}",
                    v.exp()
                );
            }
            println!("model: {}", final_dir.display());
            println!(
                "metrics: {}, plot: {}",
                a.out.join(train::metrics::METRICS_FILE).display(),
                a.out.join(train::metrics::PLOT_FILE).display()
            );
            Ok(())
        }
        Outcome::Paused { step, checkpoint } => {
            println!(
                "stopped at step {step} (--max-steps); checkpoint {}; continue with --resume",
                checkpoint.display()
            );
            Ok(())
        }
        Outcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "kfrun: interrupted at step {step}; checkpoint {}; continue with --resume",
                checkpoint.display()
            );
            std::process::exit(130);
        }
    }
}
