//! Fuzz driver for kfrun's parsers: runs the hostile-file targets of
//! model/tests/hostile_files.rs (one per format family) for many seeds.
//!
//! cargo run --release --manifest-path fuzz/Cargo.toml -- [TARGET|all] [--cases N] [--rounds R] [--seed S]
//!
//! Targets: weights, config, tokenizer, checkpoint, shards, configs (training config and
//! distillation recipe), gguf (a GGUF file, its tokenizer and chat template). Round r uses
//! seed S + r; every round runs N cases per format. A failing case stops the run and names
//! the kept input file.

#[path = "../../model/tests/hostile/mutate.rs"]
mod mutate;
#[path = "../../model/tests/hostile/targets.rs"]
mod targets;

use std::time::Instant;

type Target = fn(usize, u64) -> Vec<targets::Tally>;

const TARGETS: [(&str, Target); 7] = [
    ("weights", targets::model_weights),
    ("config", targets::model_config),
    ("tokenizer", targets::tokenizer_json),
    ("checkpoint", targets::training_checkpoint),
    ("shards", targets::token_shards),
    ("configs", targets::training_config_and_recipe),
    ("gguf", targets::gguf),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut which, mut cases, mut rounds, mut seed) = ("all".to_string(), 20_000usize, 1u64, 1u64);
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a non-negative integer", args[i]))
        };
        match args[i].as_str() {
            "--cases" => {
                cases = val(i) as usize;
                i += 1;
            }
            "--rounds" => {
                rounds = val(i);
                i += 1;
            }
            "--seed" => {
                seed = val(i);
                i += 1;
            }
            t => which = t.to_string(),
        }
        i += 1;
    }
    let chosen: Vec<_> = TARGETS
        .iter()
        .filter(|(n, _)| which == "all" || *n == which)
        .collect();
    if chosen.is_empty() {
        eprintln!(
            "unknown target {which:?}; one of: all, {}",
            TARGETS.map(|t| t.0).join(", ")
        );
        std::process::exit(2);
    }
    // caught panics are reported per case; keep stderr readable
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let t0 = Instant::now();
    let mut total = 0usize;
    for r in 0..rounds {
        for (name, f) in &chosen {
            for t in f(cases, seed.wrapping_add(r)) {
                total += t.cases;
                println!(
                    "round {r} {name}: {}: {} cases, {} accepted, {} rejected",
                    t.format, t.cases, t.accepted, t.rejected
                );
            }
        }
    }
    println!(
        "{total} cases, no failure, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
