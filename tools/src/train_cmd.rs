//! `kfrun train`: trains the AR teacher (kf_model::train) with a progress bar on
//! stderr (loss, lr, tokens/s, ETA), Ctrl-C (also SIGTERM, SIGHUP) -> checkpoint after
//! the current step and exit 130, and a summary on stdout.

use crate::progress::{human, install_stop_handler};
use anyhow::Result;
use clap::Args;
use kf_model::train::{self, Outcome, TeacherOptions};
use std::path::PathBuf;

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
    #[arg(long, allow_negative_numbers = true)]
    max_steps: Option<u64>,
    /// Device of the updates and the validation: cpu, cuda / cuda:N (a build with the cuda
    /// feature), or emu (the CUDA kernels on the CPU emulator: a slow correctness check).
    /// Checkpoints are the same files on every device: a run resumes on any of them.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    dist: crate::dist_arg::DistArgs,
}

pub fn run(a: &TrainArgs) -> Result<()> {
    let crate::dist_arg::RunSetup {
        comm,
        rank,
        device,
        mut progress,
    } = a.dist.setup(&a.device, a.resume, &a.out)?;
    let stop = install_stop_handler()?;
    let opts = TeacherOptions {
        config: a.config.clone(),
        data: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        out: a.out.clone(),
        resume: a.resume,
        max_steps: a.max_steps,
        stop: Some(stop),
        comm,
    };
    if !device.is_cpu() {
        progress.say(format!("the model, its updates and validation on {device}"));
    }
    let res = train::train_teacher_on(&opts, device, &mut |ev| progress.event(ev, &a.out));
    progress.finish();
    let res = res?;
    if rank > 0 {
        // rank 0 reports; an interrupted run still exits 130 everywhere
        if let Outcome::Interrupted { .. } = res {
            std::process::exit(130);
        }
        return Ok(());
    }
    match res {
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
