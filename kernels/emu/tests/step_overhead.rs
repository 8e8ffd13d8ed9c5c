//! The host-side cost of a decode step on a kernel device, counted by the emulator
//! (`kf_engine::emu::counts`: launches, device copies, uploads, downloads): what a GPU would
//! pay in launch latency and syncs, checked without one. A PFLM K = 4 step at batch 64 and
//! an AR step: launches and device copies per layer (the difference between a 4- and a
//! 2-layer model) at most 15, copies and transfers that do not grow with the batch (no
//! per-row copies), one device-to-host transfer (the tokens). Steps are isolated as the
//! difference between two generation lengths.

mod common;

use kf_engine::emu::{counts, reset_counts, Counts};
use kf_engine::{no_grad, Device};
use kf_model::generate::{generate, GenerateOptions};
use kf_model::pflm::{generate_pflm, Pflm, PflmGenerateOptions};
use kf_model::Ddit;

const K: usize = 4;

/// Counts of `steps` decode steps: generation of `steps + 1` step's tokens minus one step's
/// (the prefill and the first step cancel).
fn per_steps(layers: usize, batch: usize, pflm: bool, steps: usize) -> Counts {
    let _g = no_grad();
    let mut cfg = common::tiny_model_cfg();
    cfg.n_layers = layers;
    let teacher = Ddit::init(&cfg, 5).unwrap();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| vec![(i % 90) as u32 + 1, 5, 9])
        .collect();
    let run = |max_new: usize| -> Counts {
        let base = GenerateOptions {
            max_new,
            tau: 0.8,
            seed: 1,
            use_cache: true,
            ..Default::default()
        };
        if pflm {
            let student = Pflm::from_teacher(teacher.clone(), K, 6).unwrap();
            let dev = student.to_device(Device::Emu).unwrap();
            let opts = PflmGenerateOptions {
                base,
                k: K,
                freq_penalty: 0.5,
            };
            reset_counts();
            generate_pflm(&dev, &prompts, &opts, |_, _| Ok(())).unwrap();
        } else {
            let dev = teacher.to_device(Device::Emu).unwrap();
            reset_counts();
            generate(&dev, &prompts, &base, |_, _| Ok(())).unwrap();
        }
        counts()
    };
    let per = if pflm { K } else { 1 };
    // a warm-up run first: device constants made once per process (the logit mask's value)
    // are then not counted in one run and not the other
    run(per);
    let (a, b) = (run(per), run(per * (steps + 1)));
    Counts {
        launches: b.launches - a.launches,
        copies: b.copies - a.copies,
        uploads: b.uploads - a.uploads,
        downloads: b.downloads - a.downloads,
        allocs: b.allocs - a.allocs,
        by_entry: b
            .by_entry
            .iter()
            .map(|(e, n)| (e.clone(), n - a.by_entry.get(e).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect(),
        trace: None,
    }
}

fn check(pflm: bool) {
    let what = if pflm { "PFLM K = 4" } else { "AR" };
    let steps = 2;
    let (two, four) = (per_steps(2, 64, pflm, steps), per_steps(4, 64, pflm, steps));
    let small = per_steps(2, 8, pflm, steps);
    let ops = |c: &Counts| c.launches + c.copies;
    let per_layer = (ops(&four) - ops(&two)) as f64 / (2 * steps) as f64;
    eprintln!(
        "{what} step at batch 64: {} launches, {} copies ({per_layer} of both per layer), {} uploads, {} downloads; by entry (2 layers, {steps} steps): {:?}",
        two.launches / steps as u64,
        two.copies / steps as u64,
        two.uploads / steps as u64,
        two.downloads / steps as u64,
        two.by_entry
    );
    assert!(
        per_layer <= 15.0,
        "{what}: {per_layer} launches and copies per layer (at most 15): {:?} vs {:?}",
        four.by_entry,
        two.by_entry
    );
    assert_eq!(
        (two.copies, two.uploads, two.downloads),
        (small.copies, small.uploads, small.downloads),
        "{what}: copies / uploads / downloads grow with the batch (per-row work)"
    );
    assert_eq!(
        two.downloads, steps as u64,
        "{what}: one device-to-host transfer per step (the tokens)"
    );
}

#[test]
fn a_pflm_decode_step_has_few_launches_and_one_download() {
    check(true);
}

#[test]
fn an_ar_decode_step_has_few_launches_and_one_download() {
    check(false);
}
