//! `kfrun distill`: the chain of distillation stages (KFORCING.md 6.2), AR -> 1 -> 2 -> 4,
//! from a recipe file, resumable within and across stages.
//!
//! # Layout of `OUT`
//! `OUT/k1/`, `OUT/k2/`, `OUT/k4/` ...: one run directory per stage (ckpt/, final/,
//! metrics.jsonl, loss.svg, summary.json, distill.json). A stage whose `final/` and
//! `distill.json` exist is finished and is skipped when the chain runs again; a stage with a
//! checkpoint continues with `resume`. `OUT/summary.json` lists every stage's agreement,
//! loss and wall time; the last stage's `final/` is the distilled student.
//!
//! # Teachers
//! Rollout variant: stage 1 learns from the AR teacher, every later stage from the previous
//! stage's `final/`, and starts from it (every tensor inherited). Inversion variant: every
//! stage learns from the AR teacher; the first starts from the AR teacher's backbone, later
//! ones from the previous stage's student.

use crate::distill::{
    distill_stage_on, DistillConfig, DistillMetrics, StageOptions, TauDist, Variant,
    STAGE_METRICS_FILE,
};
use crate::pflm::NoiseInit;
use crate::train::{Event, OptimConfig, Outcome};
use anyhow::{bail, ensure, Context, Result};
use kf_engine::fs::write_atomic;
use kf_engine::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The optimiser settings shared by the stages (an [`OptimConfig`] without the length).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeOptim {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub grad_accum: usize,
}

/// One stage of a recipe: its k, its length, and optional overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRecipe {
    pub k: usize,
    pub total_steps: u64,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub windows: Option<usize>,
}

/// A distillation recipe (configs/distill-*.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub batch_size: usize,
    pub ctx_len: usize,
    pub eval_windows: usize,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    pub seed: u64,
    #[serde(default)]
    pub tau: TauDist,
    #[serde(default)]
    pub variant: Variant,
    /// How the stage-1 student's noise encoder starts (default: the spec's normal init).
    #[serde(default)]
    pub noise_init: NoiseInit,
    /// Noise windows per context position in training (default 1; see `crate::distill`).
    #[serde(default)]
    pub windows: Option<usize>,
    pub optim: RecipeOptim,
    pub stages: Vec<StageRecipe>,
}

impl Recipe {
    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read distillation recipe {}", path.display()))?;
        let r: Recipe = crate::train::from_json_named(&text)
            .with_context(|| format!("distillation recipe {}", path.display()))?;
        r.tau
            .validate()
            .with_context(|| format!("distillation recipe {}", path.display()))?;
        Ok(r)
    }

    /// The stages that reach `k` (module docs), checked: rollout needs 1, 2, 4, ..., k;
    /// inversion any increasing list ending at k.
    pub fn stages_to(&self, k: usize) -> Result<Vec<StageRecipe>> {
        ensure!(k >= 1, "--k must be at least 1");
        let st: Vec<StageRecipe> = self.stages.iter().filter(|s| s.k <= k).cloned().collect();
        let ks: Vec<usize> = st.iter().map(|s| s.k).collect();
        ensure!(
            ks.last() == Some(&k),
            "the recipe has no stage with k = {k} (its stages: {:?})",
            self.stages.iter().map(|s| s.k).collect::<Vec<_>>()
        );
        match self.variant {
            Variant::Rollout => {
                let want: Vec<usize> = std::iter::successors(Some(1usize), |x| Some(x * 2))
                    .take_while(|&x| x <= k)
                    .collect();
                ensure!(
                    ks == want,
                    "progressive distillation to k = {k} needs the stages {want:?} (k must be a power of two and each stage doubles the last), the recipe gives {ks:?}"
                );
            }
            Variant::Inversion => ensure!(
                ks.windows(2).all(|w| w[0] < w[1]),
                "the recipe's stages must have increasing k, got {ks:?}"
            ),
        }
        Ok(st)
    }

    /// The [`DistillConfig`] of one stage.
    pub fn stage_config(&self, s: &StageRecipe) -> DistillConfig {
        let o = &self.optim;
        DistillConfig {
            optim: OptimConfig {
                lr: s.lr.unwrap_or(o.lr),
                min_lr: s.min_lr.unwrap_or(o.min_lr),
                warmup_steps: s.warmup_steps.unwrap_or(o.warmup_steps),
                total_steps: s.total_steps,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
                grad_clip: o.grad_clip,
                grad_accum: o.grad_accum,
            },
            batch_size: s.batch_size.unwrap_or(self.batch_size),
            ctx_len: self.ctx_len,
            eval_windows: self.eval_windows,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed.wrapping_add(s.k as u64),
            tau: self.tau.clone(),
            variant: self.variant,
            noise_init: self.noise_init,
            windows: s.windows.or(self.windows).unwrap_or(1),
        }
    }
}

/// Options of [`distill_chain`].
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// The AR teacher's model directory.
    pub teacher: PathBuf,
    pub data: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub out: PathBuf,
    pub recipe: Recipe,
    /// The final student's window.
    pub k: usize,
    pub resume: bool,
    /// Per stage, as in `kfrun train --max-steps`.
    pub max_steps: Option<u64>,
    pub stop: Option<Arc<AtomicBool>>,
    /// One rank of several (data parallelism): every rank reads the same files; rank 0
    /// alone writes `out`.
    pub comm: Option<crate::train::SharedCollective>,
}

/// What happened to one stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    pub k: usize,
    pub dir: PathBuf,
    pub steps: u64,
    pub elapsed_s: f64,
    pub metrics: Option<DistillMetrics>,
    /// Already finished before this run (skipped).
    pub skipped: bool,
}

/// Chain events for a progress display.
pub enum ChainEvent<'a> {
    /// Stage `index` of `of` (k = `k`) starts; `skipped` when it was already finished.
    Stage {
        index: usize,
        of: usize,
        k: usize,
        dir: &'a Path,
        skipped: Option<&'a StageReport>,
    },
    /// A training event inside the current stage.
    Run(&'a Event<'a>),
}

/// How the chain ended.
pub enum ChainOutcome {
    /// Every stage finished: the student is `final_dir`.
    Finished {
        final_dir: PathBuf,
        stages: Vec<StageReport>,
    },
    /// A stage stopped (`--max-steps` or Ctrl-C) with a checkpoint; continue with resume.
    Stopped { k: usize, outcome: Outcome },
}

/// The run directory of the stage with window `k`.
pub fn stage_dir(out: &Path, k: usize) -> PathBuf {
    out.join(format!("k{k}"))
}

/// A finished stage's report (None when the stage has not finished).
fn finished(dir: &Path, k: usize) -> Result<Option<StageReport>> {
    let (fin, m, sum) = (
        dir.join(crate::train::run::FINAL_DIR),
        dir.join(STAGE_METRICS_FILE),
        dir.join(crate::train::run::SUMMARY_FILE),
    );
    if !(fin.join("model.safetensors").is_file() && m.is_file() && sum.is_file()) {
        return Ok(None);
    }
    let metrics: DistillMetrics = serde_json::from_str(
        &std::fs::read_to_string(&m).with_context(|| format!("cannot read {}", m.display()))?,
    )
    .with_context(|| format!("{}: not a stage's metrics", m.display()))?;
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&sum).with_context(|| format!("cannot read {}", sum.display()))?,
    )
    .with_context(|| format!("{}: not a run summary", sum.display()))?;
    Ok(Some(StageReport {
        k,
        dir: dir.to_path_buf(),
        steps: s["steps"].as_u64().unwrap_or(0),
        elapsed_s: s["elapsed_s"].as_f64().unwrap_or(0.0),
        metrics: Some(metrics),
        skipped: true,
    }))
}

/// Runs the chain (module docs) on the CPU.
pub fn distill_chain(
    opts: &ChainOptions,
    on_event: &mut dyn FnMut(ChainEvent),
) -> Result<ChainOutcome> {
    distill_chain_on(opts, Device::Cpu, on_event)
}

/// [`distill_chain`] with every stage on `device` (the CPU or a kernel device).
pub fn distill_chain_on(
    opts: &ChainOptions,
    device: Device,
    on_event: &mut dyn FnMut(ChainEvent),
) -> Result<ChainOutcome> {
    let stages = opts.recipe.stages_to(opts.k)?;
    let tcfg = crate::checkpoint::read_config(&opts.teacher)
        .with_context(|| format!("teacher {}", opts.teacher.display()))?;
    if let Some(tk) = tcfg.k {
        bail!(
            "--teacher {} is a k = {tk} student; the chain starts from the AR teacher",
            opts.teacher.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut reports: Vec<StageReport> = Vec::new();
    let mut prev_final: Option<PathBuf> = None;
    let n = stages.len();
    for (i, s) in stages.iter().enumerate() {
        let dir = stage_dir(&opts.out, s.k);
        if let Some(r) = finished(&dir, s.k)? {
            on_event(ChainEvent::Stage {
                index: i,
                of: n,
                k: s.k,
                dir: &dir,
                skipped: Some(&r),
            });
            prev_final = Some(dir.join(crate::train::run::FINAL_DIR));
            reports.push(r);
            continue;
        }
        on_event(ChainEvent::Stage {
            index: i,
            of: n,
            k: s.k,
            dir: &dir,
            skipped: None,
        });
        let (teacher, init) = match (opts.recipe.variant, &prev_final) {
            (_, None) => (opts.teacher.clone(), None),
            (Variant::Rollout, Some(p)) => (p.clone(), None),
            (Variant::Inversion, Some(p)) => (opts.teacher.clone(), Some(p.clone())),
        };
        let r = distill_stage_on(
            &StageOptions {
                teacher,
                init,
                k: s.k,
                data: opts.data.clone(),
                tokenizer: opts.tokenizer.clone(),
                out: dir.clone(),
                config: opts.recipe.stage_config(s),
                resume: opts.resume,
                max_steps: opts.max_steps,
                stop: opts.stop.clone(),
                comm: opts.comm.clone(),
            },
            device,
            &mut |e| on_event(ChainEvent::Run(e)),
        )
        .with_context(|| format!("stage k = {} ({})", s.k, dir.display()))?;
        match r.outcome {
            Outcome::Finished {
                step,
                final_dir,
                elapsed_s,
                ..
            } => {
                reports.push(StageReport {
                    k: s.k,
                    dir: dir.clone(),
                    steps: step,
                    elapsed_s,
                    metrics: r.metrics,
                    skipped: false,
                });
                prev_final = Some(final_dir);
            }
            o => return Ok(ChainOutcome::Stopped { k: s.k, outcome: o }),
        }
    }
    let final_dir = prev_final.expect("at least one stage");
    let summary = serde_json::json!({
        "teacher": opts.teacher,
        "k": opts.k,
        "variant": opts.recipe.variant,
        "student": final_dir,
        "stages": reports,
        "elapsed_s": reports.iter().map(|r| r.elapsed_s).sum::<f64>(),
    });
    if crate::distill::rank_of(&opts.comm)? == 0 {
        write_atomic(
            &opts.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(ChainOutcome::Finished {
        final_dir,
        stages: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(variant: &str, ks: &[usize]) -> Recipe {
        let stages: Vec<String> = ks
            .iter()
            .map(|k| format!(r#"{{"k": {k}, "total_steps": 10}}"#))
            .collect();
        let text = format!(
            r#"{{"batch_size": 2, "ctx_len": 8, "eval_windows": 2, "eval_every": 0,
            "checkpoint_every": 0, "seed": 0, "variant": "{variant}",
            "optim": {{"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "beta1": 0.9,
            "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "grad_accum": 1}},
            "stages": [{}]}}"#,
            stages.join(",")
        );
        crate::train::from_json_named(&text).unwrap()
    }

    #[test]
    fn stage_lists_are_checked() {
        let r = recipe("rollout", &[1, 2, 4, 8]);
        let ks = |v: Vec<StageRecipe>| v.iter().map(|s| s.k).collect::<Vec<_>>();
        assert_eq!(ks(r.stages_to(4).unwrap()), vec![1, 2, 4]);
        assert_eq!(ks(r.stages_to(1).unwrap()), vec![1]);
        let e = format!("{:#}", r.stages_to(3).unwrap_err());
        assert!(e.contains("no stage with k = 3"), "{e}");
        let e = format!("{:#}", recipe("rollout", &[1, 4]).stages_to(4).unwrap_err());
        assert!(e.contains("[1, 2, 4]"), "{e}");
        let inv = recipe("inversion", &[4]);
        assert_eq!(ks(inv.stages_to(4).unwrap()), vec![4]);
        let e = format!(
            "{:#}",
            recipe("inversion", &[2, 2]).stages_to(2).unwrap_err()
        );
        assert!(e.contains("increasing"), "{e}");
        // stage seeds differ; overrides apply
        let c1 = r.stage_config(&r.stages[0]);
        let c2 = r.stage_config(&r.stages[1]);
        assert_ne!(c1.seed, c2.seed);
        assert_eq!(c1.optim.total_steps, 10);
        let typo = r#"{"batch_size": 2, "ctx_len": 8, "eval_windows": 2, "eval_every": 0,
            "checkpoint_every": 0, "seed": 0, "optim": {}, "stages": [], "extra": 1}"#;
        assert!(crate::train::from_json_named::<Recipe>(typo).is_err());
    }
}
