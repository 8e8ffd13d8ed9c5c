//! Hostile files (issue 8.1): seeded mutations (truncation, flipped bytes, huge, negative
//! and fractional dimensions, overflowing and overlapping offsets, wrong dtypes, NaN/Inf
//! weights, empty files, mistyped and unknown JSON keys, hostile GGUF counts, lengths,
//! type ids and offsets) of valid model weights (safetensors, AR and PFLM; a GGUF file
//! with its tokenizer and chat template), config.json, tokenizer.json, training checkpoints
//! (trainer.json, optimizer.safetensors), token shards (meta.json, train.bin), the JSONL
//! corpus, training configs and distillation recipes, each fed to the loader kfrun uses:
//! Ok, or one error (one line) naming the file; never a panic. Parse-only (no model runs).
//! The same targets run longer in fuzz/ (see fuzz/README.md). Run with --nocapture for
//! the counts per format.

#[path = "hostile/mutate.rs"]
mod mutate;
#[path = "hostile/targets.rs"]
mod targets;

/// Mutated cases per format in CI.
const CASES: usize = 2000;
/// Seed of the CI cases (the fuzz driver draws others).
const SEED: u64 = 0x8_0001;

fn report(t: Vec<targets::Tally>) {
    for x in &t {
        assert_eq!(x.cases, CASES, "{}", x.format);
    }
}

#[test]
fn hostile_model_weights() {
    report(targets::model_weights(CASES, SEED));
}

#[test]
fn hostile_gguf() {
    report(targets::gguf(CASES, SEED));
}

#[test]
fn hostile_model_config() {
    report(targets::model_config(CASES, SEED));
}

#[test]
fn hostile_tokenizer() {
    report(targets::tokenizer_json(CASES, SEED));
}

#[test]
fn hostile_training_checkpoint() {
    report(targets::training_checkpoint(CASES, SEED));
}

#[test]
fn hostile_token_shards() {
    report(targets::token_shards(CASES, SEED));
}

#[test]
fn hostile_training_config_and_recipe() {
    report(targets::training_config_and_recipe(CASES, SEED));
}
