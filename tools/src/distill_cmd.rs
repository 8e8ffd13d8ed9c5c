//! `kfrun distill`: distils an AR teacher into a k-token student through the chain of
//! stages of a recipe (kf_model::distill_chain): AR -> 1 -> 2 -> 4, with a progress bar per
//! stage, Ctrl-C -> checkpoint and exit 130, `--resume` within and across stages, and a
//! per-stage summary on stdout.

use crate::progress::install_stop_handler;
use anyhow::{ensure, Result};
use clap::Args;
use kf_model::distill::Variant;
use kf_model::distill_chain::{distill_chain_on, ChainEvent, ChainOptions, ChainOutcome, Recipe};
use kf_model::train::Outcome;
use std::path::PathBuf;

#[derive(Args)]
pub struct DistillArgs {
    /// The AR teacher's model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    teacher: PathBuf,
    /// The student's window: tokens per forward pass (a power of two for the rollout
    /// variant: stages 1, 2, 4, ... up to k).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    k: usize,
    /// Run directory: OUT/k1, OUT/k2, ... (one per stage), OUT/summary.json; the student is
    /// OUT/k<K>/final.
    #[arg(long)]
    out: PathBuf,
    /// Prepared token shards (the --out of `kfrun data prepare`) from the teacher's tokenizer.
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer.json the shards were prepared with [default: DATA/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Distillation recipe JSON (batch, context length, optimiser, steps per stage).
    #[arg(long, default_value = "configs/distill-small.json")]
    recipe: PathBuf,
    /// Where the targets come from: rollout (KFORCING.md 6.1-6.2) or inversion (6.3: real
    /// tokens, the teacher's inverse noises) [default: the recipe's].
    #[arg(long, value_parser = ["rollout", "inversion"])]
    variant: Option<String>,
    /// Continue: finished stages are skipped, a stage with a checkpoint continues from it.
    #[arg(long)]
    resume: bool,
    /// Stop each stage with a checkpoint after this many of its steps (continue with --resume).
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

pub fn run(a: &DistillArgs) -> Result<()> {
    ensure!(a.k >= 1, "--k must be at least 1");
    // the device (and the ranks) first: a bad --device is the error, whatever else is wrong
    let crate::dist_arg::RunSetup {
        comm,
        rank,
        device,
        mut progress,
    } = a.dist.setup(&a.device, a.resume, &a.out)?;
    let mut recipe = Recipe::from_file(&a.recipe)?;
    match a.variant.as_deref() {
        Some("rollout") => recipe.variant = Variant::Rollout,
        Some("inversion") => recipe.variant = Variant::Inversion,
        _ => {}
    }
    let stop = install_stop_handler()?;
    let opts = ChainOptions {
        teacher: a.teacher.clone(),
        data: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        out: a.out.clone(),
        recipe,
        k: a.k,
        resume: a.resume,
        max_steps: a.max_steps,
        stop: Some(stop),
        comm,
    };
    let mut dir = a.out.clone();
    if !device.is_cpu() {
        progress.say(format!(
            "the models, the updates and validation on {device}"
        ));
    }
    let res = distill_chain_on(&opts, device, &mut |ev| match ev {
        ChainEvent::Stage {
            index,
            of,
            k,
            dir: d,
            skipped,
        } => {
            dir = d.to_path_buf();
            match skipped {
                Some(r) => progress.say(format!(
                    "stage {}/{of} (k = {k}): already finished in {} ({} steps, agreement {})",
                    index + 1,
                    d.display(),
                    r.steps,
                    r.metrics
                        .as_ref()
                        .map_or("?".into(), |m| format!("{:.4}", m.acc))
                )),
                None => progress.say(format!(
                    "stage {}/{of}: k = {k} ({} variant) into {}",
                    index + 1,
                    opts.recipe.variant,
                    d.display()
                )),
            }
        }
        ChainEvent::Run(e) => progress.event(e, &dir),
    });
    progress.finish();
    let res = res?;
    if rank > 0 {
        if let ChainOutcome::Stopped {
            outcome: Outcome::Interrupted { .. },
            ..
        } = res
        {
            std::process::exit(130);
        }
        return Ok(());
    }
    match res {
        ChainOutcome::Finished { final_dir, stages } => {
            println!("stage  steps  wall s  val loss  agreement  whole windows  per offset");
            for s in &stages {
                let (l, acc, w, per) = match &s.metrics {
                    Some(m) => (
                        format!("{:.4}", m.loss),
                        format!("{:.4}", m.acc),
                        format!("{:.4}", m.acc_window),
                        m.acc_per_offset
                            .iter()
                            .map(|x| format!("{x:.3}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    None => ("?".into(), "?".into(), "?".into(), String::new()),
                };
                println!(
                    "k={:<4} {:>5}  {:>6.0}  {l:>8}  {acc:>9}  {w:>13}  {per}",
                    s.k, s.steps, s.elapsed_s
                );
            }
            println!("student: {}", final_dir.display());
            println!("summary: {}", a.out.join("summary.json").display());
            Ok(())
        }
        ChainOutcome::Stopped { k, outcome } => match outcome {
            Outcome::Interrupted { step, checkpoint } => {
                eprintln!(
                    "kfrun: interrupted in stage k = {k} at step {step}; checkpoint {}; continue with --resume",
                    checkpoint.display()
                );
                std::process::exit(130);
            }
            Outcome::Paused { step, checkpoint } => {
                println!(
                    "stopped stage k = {k} at step {step} (--max-steps); checkpoint {}; continue with --resume",
                    checkpoint.display()
                );
                Ok(())
            }
            Outcome::Finished { .. } => unreachable!("a finished stage does not stop the chain"),
        },
    }
}
